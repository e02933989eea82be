"""Argument types shared by the command line and `examples/train.py` (no torch, no nibabel)."""

from __future__ import annotations

import argparse
from typing import Optional

from ..volume.preprocessing import WindowChoice, parse_bounds

__all__ = ["orientation_argument", "pair_argument", "window_argument"]


def pair_argument(text: str) -> Optional[tuple[float, float]]:
    """``LO,HI`` -> (lo, hi); ``none`` -> None."""
    try:
        return parse_bounds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. -125,275) or none, got {text!r}") from None


def window_argument(text: str) -> WindowChoice:
    """``--window LO,HI``, or ``none``: the inputs are already in [0, 1]."""
    try:
        return WindowChoice.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def orientation_argument(text: str) -> tuple[str, str, str]:
    """``--orientation CODES`` such as LPS (nibabel, through geometry, is imported only when used)."""
    from ..volume.geometry import parse_orientation

    try:
        return parse_orientation(text)  # type: ignore[return-value]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
