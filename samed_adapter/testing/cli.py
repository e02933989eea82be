"""Run the command line inside a test and read what it printed, on small scans and adapters."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

__all__ = ["random_scan", "run", "two_adapters"]


def run(capsys: Any, *argv: object) -> tuple[int, str, str]:
    """``samed-adapter ARGV...`` in this process: (exit code, stdout, stderr); arguments are str()-ed.

    ``capsys`` is pytest's fixture; None (a module or session fixture, which cannot take it)
    captures what the command prints itself.
    """
    from ..cli import main

    if capsys is not None:
        code = main.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def random_scan(path: Path, seed: int = 0, shape: tuple[int, ...] = (40, 36, 4)) -> Path:
    """A NIfTI at ``path`` (folders made) of uniform noise in 0..100, 1 x 1 x 2 mm voxels."""
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).uniform(0.0, 100.0, size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def two_adapters(root: Path) -> dict[str, Path]:
    """Two different random 2-class adapters for the tiny SAM of seed 0 (``--sam-backbone tiny
    --random-sam-seed 0``), at 64 pixels with the window 0..100: ``{"a": file, "b": file}``."""
    from .. import AdapterConfig, build_sam
    from . import random_adapter

    config = AdapterConfig(num_classes=2, image_size=64, intensity_window=(0.0, 100.0),
                           class_names=["white matter", "grey matter"])
    sam = build_sam("tiny", seed=0)
    return {name: random_adapter(sam, config, seed=seed).save(root / f"{name}.safetensors")
            for name, seed in (("a", 1), ("b", 2))}
