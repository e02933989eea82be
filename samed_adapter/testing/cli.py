"""Run the command line inside a test and read what it printed."""

from __future__ import annotations

from typing import Any

__all__ = ["run"]


def run(capsys: Any, *argv: object) -> tuple[int, str, str]:
    """``samed-adapter ARGV...`` in this process: (exit code, stdout, stderr); arguments are str()-ed.

    ``capsys`` is pytest's fixture.
    """
    from ..cli import main

    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
