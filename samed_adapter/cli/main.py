"""`samed-adapter` command line: a thin front over the Python API.

Each subcommand is a module of this folder (convert, info, segment, evaluate, train, quickstart,
hub for push and pull, serve) with one `add_<name>_parser(sub)` function that declares its
arguments and sets `func` to its `cmd_<name>(args) -> int`; what they share is in `common`.
`build_parser` calls them in order, so adding a command is one more module. Exit codes: 0
success, 1 some `segment` inputs failed (the others were written), 2 an error that stopped the
command (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

try:  # a Ctrl-C while these load (numpy, PIL: a second on a busy machine) is one line too, as in main()
    from .common import fail
    from .convert import add_convert_parser
    from .evaluate import add_evaluate_parser
    from .hub import add_pull_parser, add_push_parser
    from .info import add_info_parser
    from .quickstart import add_quickstart_parser
    from .segment import add_segment_parser
    from .serve import add_serve_parser
    from .train import add_train_parser
except KeyboardInterrupt:  # pragma: no cover - a matter of timing
    print("samed-adapter: interrupted (Ctrl-C)", file=sys.stderr)
    raise SystemExit(130) from None


# The top-level --help's epilog: the main commands as a new user runs them (each command's own
# --help has more).
_EXAMPLES = """\
examples:
  samed-adapter quickstart --out runs/quickstart   # try it: no weights, no downloads
  samed-adapter convert epoch_159.pth synapse.safetensors --sam sam_vit_b_01ec64.pth
  samed-adapter info synapse.safetensors
  samed-adapter segment --sam sam_vit_b_01ec64.pth --adapter synapse.safetensors ct.nii.gz -o labels/
  samed-adapter pull org/synapse-adapter           # into the Hugging Face cache, for offline use

'samed-adapter COMMAND --help' shows each command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    """The `samed-adapter` parser: one `add_<command>_parser` per subcommand."""
    parser = argparse.ArgumentParser(
        prog="samed-adapter",
        description="Hot-swap SAMed adapters onto a stock Segment Anything Model.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_convert_parser, add_info_parser, add_segment_parser, add_evaluate_parser, add_train_parser,
                add_quickstart_parser, add_push_parser, add_pull_parser, add_serve_parser):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (2 for an error, with a message on stderr;
    130 for Ctrl-C, in one line wherever it comes: loading torch, reading the SAM, ...)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    # AdapterError and UnsafeCheckpointError are ValueErrors: no torch import needed to catch them.
    except (FileNotFoundError, ValueError, OSError) as err:
        # Errors raised by the Python API may carry the same message worded for the command line
        # (flags instead of keyword arguments; see patching._worded).
        fail(args.command, getattr(err, "command_line", None) or str(err))
        return 2
    except KeyboardInterrupt:  # a command's own handler says more where it knows more (segment)
        print(f"samed-adapter{'' if args is None else ' ' + args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
