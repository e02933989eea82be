"""Intensity preprocessing: raw scanner values -> the model's [0, 1], one definition for every path.

An adapter records how its training data was scaled (``AdapterConfig.intensity_window`` or
``intensity_percentiles``), and training, `evaluate`, `segment` and `SAMed.segment` all scale
through :class:`Intensity`, so the same file gives the same numbers on every path.

- window ``(lo, hi)`` (CT, in HU): clip to [lo, hi], scale linearly to [0, 1].
- percentiles ``(p_lo, p_hi)`` (MR): the same between the volume's own p_lo-th and p_hi-th
  percentiles, computed over the whole volume (a 2-D input: over the slice).
- neither: the values are used as they are (they must already be in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["Intensity", "WindowChoice", "contrast_warning", "parse_bounds"]

Bounds = tuple[float, float]
# A window that maps the middle 98 % of a volume's voxels into less than this share of [0, 1]
# leaves the model a nearly constant image (MR in [0, 1] under the CT window: 0.0025).
_MIN_CONTRAST = 0.02


def _pair(name: str, value: Any, limits: Optional[Bounds] = None) -> Optional[Bounds]:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (lo, hi), got {value!r}") from None
    inside = limits is None or limits[0] <= lo < hi <= limits[1]
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and inside):
        where = f" inside [{limits[0]:g}, {limits[1]:g}]" if limits else ""
        raise ValueError(f"{name} must be finite (lo, hi) with lo < hi{where}, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class Intensity:
    """How raw intensities become the model's [0, 1]: a window, percentiles, or nothing."""

    window: Optional[Bounds] = None
    percentiles: Optional[Bounds] = None

    def __post_init__(self) -> None:
        if self.window is not None and self.percentiles is not None:
            raise ValueError("give either an intensity window (CT) or percentiles (MR), not both")
        object.__setattr__(self, "window", _pair("intensity window", self.window))
        object.__setattr__(self, "percentiles", _pair("percentiles", self.percentiles, (0.0, 100.0)))

    @classmethod
    def from_config(cls, config: Any, window: Optional[Bounds] = None,
                    percentiles: Optional[Bounds] = None) -> "Intensity":
        """The preprocessing an :class:`~samed_adapter.AdapterConfig` records, unless a window or
        percentiles are given to replace it."""
        if window is not None or percentiles is not None:
            return cls(window, percentiles)
        return cls(config.intensity_window, getattr(config, "intensity_percentiles", None))

    @property
    def scales(self) -> bool:
        """False when values are used as they are (and so must already lie in [0, 1])."""
        return self.window is not None or self.percentiles is not None

    def bounds(self, volume: np.ndarray) -> Optional[Bounds]:
        """(lo, hi) mapped to (0, 1) for this volume; None when nothing is scaled."""
        if self.percentiles is None:
            return self.window
        lo, hi = np.percentile(volume, self.percentiles)
        return float(lo), float(hi)

    def apply(self, raw: np.ndarray, bounds: Optional[Bounds]) -> np.ndarray:
        """Scale ``raw`` (any shape) with ``bounds`` from :meth:`bounds` -> float32.

        Given the bounds of the whole volume, a slice scales exactly as it would inside it.
        """
        raw = np.asarray(raw, dtype=np.float32)
        if bounds is None:
            return raw
        lo, hi = bounds
        if hi <= lo:  # a constant volume under percentiles
            return np.zeros(raw.shape, dtype=np.float32)
        out = np.clip(raw, lo, hi)  # one new array (in raw's memory order), then in place
        out -= np.float32(lo)
        out /= np.float32(hi - lo)
        return out

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        """The whole volume scaled to [0, 1] (float32)."""
        return self.apply(volume, self.bounds(volume))

    def describe(self) -> str:
        if self.window is not None:
            return f"window {self.window[0]:g},{self.window[1]:g}"
        if self.percentiles is not None:
            return f"percentiles {self.percentiles[0]:g},{self.percentiles[1]:g}"
        return "none (inputs already in [0, 1])"


def contrast_warning(raw: np.ndarray, intensity: Intensity, where: str) -> Optional[str]:
    """A message when ``intensity`` flattens ``raw`` into a tiny band of [0, 1], else None.

    The classic case is MR data in [0, 1] under the CT window [-125, 275]: every voxel lands
    in [0.3125, 0.315] and the model sees a blank image without any error.
    """
    if intensity.window is None:
        return None
    values = np.asarray(raw, dtype=np.float32).ravel(order="K")  # a view for transposed volumes
    if values.size > 1_000_000:  # a strided sample is plenty for two percentiles
        values = values[:: values.size // 1_000_000]
    p1, p99 = np.percentile(values, (1, 99))
    lo, hi = intensity.window
    spread = (min(max(p99, lo), hi) - min(max(p1, lo), hi)) / (hi - lo)
    if spread >= _MIN_CONTRAST:
        return None
    return (
        f"{where}: the intensity window {lo:g},{hi:g} leaves almost no contrast: the middle 98 % of the "
        f"voxels ({p1:.4g} .. {p99:.4g}) fill {100 * spread:.2g} % of the model's [0, 1] range. Give a window "
        "that fits the data (--window LO,HI; CT: -125,275 HU) or MR percentile normalisation "
        "(--percentiles 0.5,99.5)"
    )


def as_pair(name: str, value: Optional[Sequence[float]]) -> Optional[Bounds]:
    """Validate an optional (lo, hi) pair the way Intensity does (for config fields and flags)."""
    return _pair(name, value)


def parse_bounds(text: str) -> Optional[Bounds]:
    """``LO,HI`` -> (lo, hi); ``none`` (any case) -> None; ValueError for anything else."""
    if text.lower() == "none":
        return None
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


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
            return cls(parse_bounds(text))
        except ValueError:
            raise ValueError(f"--window takes LO,HI (e.g. -125,275) or none, got {text!r}") from None
