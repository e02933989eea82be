"""Are a DICOM series' slices evenly spaced? One affine (NIfTI, the model's grid) needs them to be.

A NIfTI affine places slice ``k`` at ``origin + k * step``. A series read into one volume must
therefore have every slice within a tolerance of that line, or the file would put a slice where
it was not (pydicom's ``77654033/CT2``: slices at z = -99.48, 103.02, 104.27, 105.52 mm; a mean
step of 68.33 mm puts two of them at -31.15 and 37.19 mm).

The tolerance
-------------
``SPACING_ATOL + SPACING_RTOL * step``, i.e. 0.01 mm plus 1 % of the step. ImagePositionPatient
is a decimal string (DS); scanners write 2 to 6 decimals, so each position may be off its true
value by up to 0.005 mm and a step by up to 0.01 mm (two roundings). Positions that a scanner
computed in float32 and printed in full carry a relative error of about 1e-7 of their magnitude
(5e-5 mm at 500 mm). The relative term allows for table positions that scanners report with a
little jitter: a slice misplaced by 1 % of a step still lies well inside its own voxel. What must
be caught is off by a whole step or more (a missing slice, a localizer, a second stack) and is
far outside it: for a 0.5 mm step the tolerance is 0.015 mm, for a 5 mm step 0.06 mm.

What is checked is each slice's distance from the line through the first and the last slice
(all three coordinates, so a shear that a gantry tilt gives stays allowed, an irregular one does
not), which is exactly how far the affine would misplace it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SPACING_ATOL", "SPACING_RTOL", "SliceRun", "even_run", "is_even", "shortened"]

SPACING_ATOL = 0.01  # mm: two roundings of a position written with 2 decimals
SPACING_RTOL = 1e-2  # of the step: sub-voxel, far below a missing slice
#: A slice left out at an end must stand at least this many steps from the even run: a gap of
#: 2 or 3 steps looks like missing slices (refused, never guessed), a localizer stands far apart.
OUTLIER_STEPS = 4.0


@dataclass(frozen=True)
class SliceRun:
    """The slices one affine can hold: ``keep`` indices into the sorted slices, their step.

    Attributes:
        keep: indices (into the sorted slices) of the even run, consecutive.
        step: the run's step along the normal in mm (0.0 for a single slice).
        dropped: indices of slices left out (a localizer or stray slice at an end).
    """

    keep: tuple[int, ...]
    step: float
    dropped: tuple[int, ...] = ()


def _tolerance(step: float) -> float:
    return SPACING_ATOL + SPACING_RTOL * abs(step)


def is_even(positions: np.ndarray) -> bool:
    """Whether ``(N, 3)`` positions (sorted along the normal) lie within tolerance of one line.

    Every slice must be within the tolerance of ``first + k * (last - first) / (N - 1)``.
    """
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    if n < 3:
        return True
    step = (positions[-1] - positions[0]) / (n - 1)
    line = positions[0] + np.arange(n)[:, None] * step
    misplaced = np.linalg.norm(positions - line, axis=1).max()
    return bool(misplaced <= _tolerance(float(np.linalg.norm(step))))


def even_run(positions: np.ndarray, offsets: np.ndarray) -> SliceRun | None:
    """The slices of ``positions`` one affine can hold, or None when they are uneven.

    Args:
        positions: ``(N, 3)`` ImagePositionPatient values, sorted along the slice normal.
        offsets: ``(N,)`` their projections on the normal (mm), sorted ascending.

    Returns:
        All slices when they are even. Else, when leaving out the first and/or the last slice
        leaves an even run of at least 3 slices and each left-out slice stands more than
        :data:`OUTLIER_STEPS` steps from it (a localizer stored in the series), that run with
        ``dropped`` set. Else None: the series is uneven (missing or irregular slices).
    """
    n = len(positions)
    if is_even(positions):
        step = float(offsets[-1] - offsets[0]) / (n - 1) if n > 1 else 0.0
        return SliceRun(tuple(range(n)), step)
    for start, stop in ((1, n), (0, n - 1), (1, n - 1)):
        if stop - start < 3 or not is_even(positions[start:stop]):
            continue
        step = float(offsets[stop - 1] - offsets[start]) / (stop - start - 1)
        dropped = tuple(range(start)) + tuple(range(stop, n))
        gaps = [offsets[start] - offsets[0]] * start + [offsets[-1] - offsets[stop - 1]] * (n - stop)
        if all(gap > OUTLIER_STEPS * step for gap in gaps):
            return SliceRun(tuple(range(start, stop)), step, dropped)
    return None


def shortened(offsets: np.ndarray, limit: int = 8) -> str:
    """``"-99.48, 103.02, 104.27, 105.52"``; long lists keep their ends: ``"0, 2, 4, ..., 96, 98 (50 slices)"``."""
    values = [f"{v:.2f}".rstrip("0").rstrip(".") for v in np.asarray(offsets, dtype=np.float64)]
    if len(values) <= limit:
        return ", ".join(values)
    half = limit // 2
    return ", ".join(values[:half]) + ", ..., " + ", ".join(values[-half:]) + f" ({len(values)} slices)"
