"""Argument types shared by the command line and `examples/train.py` (no torch, no nibabel)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

__all__ = ["WindowChoice", "orientation_argument", "pair_argument", "window_argument"]


def _pair_or_none(text: str) -> Optional[tuple[float, float]]:
    """``LO,HI`` -> (lo, hi); ``none`` (any case) -> None; ValueError for anything else."""
    if text.lower() == "none":
        return None
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


def pair_argument(text: str) -> Optional[tuple[float, float]]:
    """``LO,HI`` -> (lo, hi); ``none`` -> None."""
    try:
        return _pair_or_none(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. -125,275) or none, got {text!r}") from None


@dataclass(frozen=True)
class WindowChoice:
    """What ``--window`` asked for: a CT window, or ``none``, inputs already in [0, 1].

    ``none`` is not "no window given" (that is None, the adapter's own preprocessing) but "skip
    the preprocessing", so it is carried as its own flag for `SAMed.segment(preprocessed=True)`.

    Attributes:
        bounds: (lo, hi) to clip to and scale to [0, 1]; None for ``none``.
    """

    bounds: Optional[tuple[float, float]]

    @property
    def preprocessed(self) -> bool:
        """True for ``none``: the values are already in [0, 1] and are used as they are."""
        return self.bounds is None

    @classmethod
    def parse(cls, text: str) -> "WindowChoice":
        """``LO,HI`` or ``none`` (any case).

        Raises:
            ValueError: anything else.
        """
        try:
            return cls(_pair_or_none(text))
        except ValueError:
            raise ValueError(f"--window takes LO,HI (e.g. -125,275) or none, got {text!r}") from None


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
