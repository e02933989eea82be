"""The simulated-click protocol the field evaluates interactive segmentation with.

Per slice and class, the next click corrects the largest error (RITM's `Clicker`, SAM's and
the CVPR 2025 interactive 3D challenge's evaluation, where nnInteractive is measured):

- the error regions are the connected components (8-connected, the 2-D form of the challenge's
  26-connectivity) of the false negatives (truth, not predicted: a positive click) and of the
  false positives (predicted, not truth: a negative click);
- the largest region by pixel count is corrected; ties go to a false-negative region before a
  false-positive one (a missing piece before an extra one), then to the region whose first
  pixel comes first in C (row-major) order;
- the click goes to the point of that region farthest from its boundary: the Euclidean distance
  transform of the region with everything outside it, the image border included, as boundary
  (RITM pads its error masks with zeros, the challenge pads its crop; a region touching the
  border is not treated as running on beyond it); ties go to the first point in C order (RITM
  takes the first of ``np.where``; the challenge draws one at random, which no rerun repeats).

:func:`next_click` places one click; :func:`round_clicks` places one per class and slice where
the labels and the truth differ, for one batched ``ClickSession.refine``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from .prompts import SliceClick

__all__ = ["next_click", "round_clicks"]

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: diagonal neighbours are one region


def next_click(predicted: np.ndarray, truth: np.ndarray) -> Optional[tuple[int, int, bool]]:
    """The next simulated click on one slice and class (see the module docstring).

    Args:
        predicted, truth: (H, W) bool masks of one class.

    Returns:
        (row, col, positive): positive where the class is missing, negative where it is extra;
        None where the masks agree.
    """
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} must be (H, W) masks of one shape")
    differ = predicted != truth
    rows, cols = np.flatnonzero(differ.any(axis=1)), np.flatnonzero(differ.any(axis=0))
    if not len(rows):
        return None
    # Only the box around the errors is searched: same regions, same C order, less work.
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    predicted, truth = predicted[box], truth[box]
    best: Optional[tuple[int, bool, np.ndarray]] = None  # (pixel count, positive, region mask)
    for positive, errors in ((True, truth & ~predicted), (False, predicted & ~truth)):
        region = _largest_region(errors)
        # Strictly larger only: the false negatives come first, and _largest_region keeps the
        # first of equal regions, so ties fall as the module docstring says.
        if region is not None and (best is None or region[0] > best[0]):
            best = (region[0], positive, region[1])
    assert best is not None  # the masks differ inside the box
    row, col = _deepest_point(best[2])
    return int(rows[0]) + row, int(cols[0]) + col, best[1]


def _largest_region(errors: np.ndarray) -> Optional[tuple[int, np.ndarray]]:
    """(H, W) bool -> the pixel count and mask of its largest 8-connected component (the first
    in C order of equal ones), or None when there is none."""
    regions, count = ndimage.label(errors, structure=_EIGHT)  # numbered in C order of first pixels
    if count == 0:
        return None
    sizes = np.bincount(regions.ravel())[1:]
    best = int(np.argmax(sizes))  # the first of equal sizes
    return int(sizes[best]), regions == best + 1


def _deepest_point(region: np.ndarray) -> tuple[int, int]:
    """(H, W) bool region -> (row, col) of its point farthest from the region's boundary, the
    image border counting as boundary; the first in C order of equal ones."""
    rows, cols = np.nonzero(region)
    top, left = rows.min(), cols.min()
    crop = region[top : rows.max() + 1, left : cols.max() + 1]
    # A one-pixel frame of background: the border is boundary, and the crop changes no distance
    # because everything around the region is outside it anyway.
    distance = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(top + row), int(left + col)


def round_clicks(labels: np.ndarray, truth: np.ndarray, num_classes: int) -> list[SliceClick]:
    """One round of the protocol: for each class c in 1..K and each slice d where ``labels == c``
    and ``truth == c`` differ, the :func:`next_click` on that slice.

    Args:
        labels, truth: (D, H, W) integer label maps in the session's slice layout
            (``session.slice_labels`` and ``session.to_slices(truth)``).
        num_classes: K.

    Returns:
        The clicks, by class then slice, for one ``session.refine(clicks)``; empty where the
        labels equal the truth.
    """
    labels, truth = np.asarray(labels), np.asarray(truth)
    if labels.shape != truth.shape or labels.ndim != 3:
        raise ValueError(f"labels {labels.shape} and truth {truth.shape} must be (D, H, W) label maps of one shape; "
                         "cut the truth with session.to_slices(truth)")
    clicks = []
    for label in range(1, num_classes + 1):
        predicted, wanted = labels == label, truth == label
        for d in np.flatnonzero((predicted != wanted).any(axis=(1, 2))):
            click = next_click(predicted[d], wanted[d])
            if click is not None:
                clicks.append(SliceClick(label, int(d), click[0], click[1], click[2]))
    return clicks
