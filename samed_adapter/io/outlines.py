"""Outlines of pixel regions as polygons that planning systems fill back to the same pixels.

An RT Structure Set stores a label slice as closed polygons; the reader rasterises them again.
Planning systems and plastimatch keep the pixels whose centres lie inside the polygons; rt-utils
rounds the vertices to pixels and fills including the outline. :func:`pixel_outlines` traces each
region along its pixels' edges (the polygon through the pixel corners, ±0.5 pixel from the border
pixels' centres), drawn :data:`INSET` of a pixel inside, so that both kinds of reader get exactly
the region back: no pixel centre lies on an outline (centre-inside readers decide nothing on an
edge), and every vertex rounds to a border pixel of the region (a vertex at exactly ±0.5 would
round to whichever side floating point noise picks).

- Regions are 4-connected: pixels touching only at a corner are outlined apart, as their squares
  share no edge; a 1-pixel region or a 1-pixel-wide line has its own small polygon.
- A hole is joined to the outline around it by a "keyhole" cut (two coincident segments running
  through the region's pixels, between pixel centres), so that each region is ONE polygon. Readers
  differ on separate hole contours: plastimatch by default ORs a slice's contours (a hole drawn as
  its own contour comes back filled), dcmrtstruct2nii and most planning systems XOR them; a
  keyhole polygon reads the same under both rules, and under even-odd and non-zero winding.

:func:`fill_outlines` is the centre-inside reader (plastimatch's scan-line rule, even-odd across
all polygons of a slice, as DICOM asks for contours nested in a plane).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Union

import numpy as np

__all__ = ["INSET", "fill_outlines", "pixel_outlines"]

#: How far (in pixels) outlines lie inside the pixel edges: 1/64, exact in binary, far above the
#: float32 and 6-decimal rounding that readers and the DS values add, far below what changes an area.
INSET = 1 / 64

_UNIT = 64  # points are integers in 1/64 pixel: lattice corners, ± the inset, bridges at +16
_CUT = 16  # a keyhole cut runs a quarter pixel right of its column's left edge, between pixel centres
# Directions on screen (x right, y down): east, south, west, north. Travel keeps the region on the
# right, so the inward normal of a direction is the next one.
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])
_EAST, _WEST = 0, 2

#: Where holes are joined: loop -> run -> cuts ``(x, y at the run, hole, the hole's top run, y at the hole)``.
_Cuts = dict[int, dict[int, list[tuple[int, int, int, int, int]]]]


def _edges(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundary unit edges of ``padded`` (bool ``(H+2, W+2)``, a background frame around the mask).

    Returns ``starts`` ``(E, 2)`` lattice corners (column, row) (corner (j, i) is the top-left
    corner of padded pixel (i, j)) and ``dirs`` ``(E,)`` in 0..3, each with the region on its right.
    """
    below, above = padded[1:, :], padded[:-1, :]  # horizontal edges on lattice rows 1..H+1
    right, left = padded[:, 1:], padded[:, :-1]  # vertical edges on lattice columns 1..W+1
    parts = []
    for mask, offset, direction in (
        (below & ~above, (0, 1), 0),  # top edge of a region pixel: east from its top-left corner
        (above & ~below, (1, 1), 2),  # bottom edge: west from the top-right corner of the pixel below
        (left & ~right, (1, 0), 1),  # right edge: south from the top-left corner of the pixel right
        (right & ~left, (1, 1), 3),  # left edge: north from its bottom-left corner
    ):
        i, j = np.nonzero(mask)
        parts.append((np.column_stack([j + offset[0], i + offset[1]]), np.full(len(i), direction)))
    starts = np.concatenate([p[0] for p in parts]).astype(np.int64)
    return starts, np.concatenate([p[1] for p in parts])


def _successors(starts: np.ndarray, dirs: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The edge that follows each edge (right turn, else straight on, else left turn), and the
    edge leaving each corner in each direction: ``(E,)`` and ``(H+1, W+1, 4)`` ids, -1 for none.

    ``shape``: the padded mask's. Turning right first keeps a loop around the same pixel where two
    region pixels touch at a corner only, so that such pixels lie in different loops.
    """
    outgoing = np.full((shape[0] + 1, shape[1] + 1, 4), -1, np.int64)  # (row, column, direction)
    outgoing[starts[:, 1], starts[:, 0], dirs] = np.arange(len(dirs))
    ends = starts + _STEP[dirs]
    found = np.full(len(dirs), -1, np.int64)
    for turn in (1, 0, 3):
        candidate = outgoing[ends[:, 1], ends[:, 0], (dirs + turn) % 4]
        found = np.where(found < 0, candidate, found)
    return found, outgoing


def _loops(successor: np.ndarray) -> list[np.ndarray]:
    """The cycles of the permutation ``successor``, each as edge ids in travel order."""
    nxt = successor.tolist()
    seen = bytearray(len(nxt))
    loops = []
    for first in range(len(nxt)):
        if seen[first]:
            continue
        loop, e = [], first
        while not seen[e]:
            seen[e] = 1
            loop.append(e)
            e = nxt[e]
        loops.append(np.array(loop, np.int64))
    return loops


class _Loops:
    """Every boundary loop of a padded mask, as rings of inset corners.

    ``rings[n]``: loop n's corners where its direction turns, moved inward by the inset along both
    edges' normals, ``(N, 2)`` int points in 1/64 pixel. ``loop_of[e]`` / ``run_of[e]``: the loop
    of edge e and the ring's run (``rings[n][k] -> rings[n][k + 1]``) it lies on.
    ``outer[n]``: whether loop n runs around a region (positive area), not around a hole.
    """

    def __init__(self, starts: np.ndarray, dirs: np.ndarray, successor: np.ndarray) -> None:
        loops = _loops(successor)
        order = np.concatenate(loops)  # edge ids, loop after loop, each in travel order
        lengths = np.array([len(loop) for loop in loops])
        self.loop_of = np.empty(len(dirs), np.int64)
        self.loop_of[order] = np.repeat(np.arange(len(loops)), lengths)
        previous = np.empty_like(successor)
        previous[successor] = np.arange(len(successor))
        before, after = dirs[previous[order]], dirs[order]
        turn = before != after
        corners = starts[order] * _UNIT + _STEP[(after + 1) % 4] + _STEP[(before + 1) % 4]
        turns = np.add.reduceat(turn.astype(np.int64), np.cumsum(lengths) - lengths)  # every loop turns 4 times or more
        self.rings = np.split(corners[turn], np.cumsum(turns)[:-1])
        # An edge lies on the run of the last turn at or before it (the loop's last run before its first turn).
        first_turn = np.repeat(np.cumsum(turns) - turns, lengths)
        self.run_of = np.empty(len(dirs), np.int64)
        self.run_of[order] = (np.cumsum(turn) - 1 - first_turn) % np.repeat(turns, lengths)
        # Twice the signed area, summed over unit edges: east -y, west +y, south +x, north -x.
        sign = np.array([-1, 1, 1, -1])[dirs] * np.where(dirs % 2 == 0, starts[:, 1], starts[:, 0])
        self.outer = np.bincount(self.loop_of, weights=sign, minlength=len(loops)) > 0


def _cuts(padded: np.ndarray, starts: np.ndarray, dirs: np.ndarray, outgoing: np.ndarray,
          loops: _Loops) -> _Cuts:
    """Where each hole is joined to the loop around it: loop -> run -> cuts, in travel order.

    A cut leaves the top edge of the hole's first pixel in raster order straight up, through the
    region's pixels of that column, to the first pixel above that is not the region's; that
    pixel's bottom edge lies on the region's outer loop or on a hole whose first pixel comes
    earlier (so the cuts join every hole to its outer loop without a cycle). Each cut is
    ``(x, y at the run above, hole, the hole's top run, y at the hole)`` in 1/64 pixel.
    """
    width = padded.shape[1] + 1
    west = np.nonzero((dirs == _WEST) & ~loops.outer[loops.loop_of])[0]  # hole top edges: region above
    key = np.full(len(loops.rings), np.iinfo(np.int64).max)
    # A westward edge from corner (j + 1, i) is the top edge of hole pixel (i, j).
    np.minimum.at(key, loops.loop_of[west], starts[west, 1] * width + starts[west, 0] - 1)
    holes = np.nonzero(~loops.outer)[0]
    row, column = key[holes] // width, key[holes] % width
    last_outside = np.maximum.accumulate(np.where(padded, -1, np.arange(padded.shape[0])[:, None]), axis=0)
    above = last_outside[row - 1, column]  # the first pixel up the column that is not the region's
    hit = outgoing[above + 1, column, _EAST]  # that pixel's bottom edge
    top = outgoing[row, column + 1, _WEST]
    cuts: _Cuts = {}
    for n in range(len(holes)):
        cut = (int(column[n]) * _UNIT + _CUT, int(above[n] + 1) * _UNIT + 1, int(holes[n]),
               int(loops.run_of[top[n]]), int(row[n]) * _UNIT - 1)
        cuts.setdefault(int(loops.loop_of[hit[n]]), {}).setdefault(int(loops.run_of[hit[n]]), []).append(cut)
    for runs in cuts.values():
        for found in runs.values():
            found.sort()  # along an eastward run
    return cuts


def _walk(loops: _Loops, cuts: _Cuts, loop: int, start: int) -> Iterator[Union[np.ndarray, tuple[int, int]]]:
    """Loop ``loop``'s ring from corner ``start`` all the way round, with the keyhole cuts on its
    runs: yields ``(N, 2)`` point blocks, and ``(hole, start)`` where a hole's ring goes in."""
    ring, runs = loops.rings[loop], cuts.get(loop, {})
    n = len(ring)
    done = 0
    for offset in sorted((run - start) % n for run in runs):
        yield np.take(ring, np.arange(start + done, start + offset + 1), axis=0, mode="wrap")
        done = offset + 1
        for x, y_run, hole, hole_run, y_hole in runs[(start + offset) % n]:
            yield np.array([[x, y_run], [x, y_hole]])  # down the cut
            yield hole, hole_run + 1  # the hole from just past the cut, round to the cut
            yield np.array([[x, y_hole], [x, y_run]])  # and back up
    yield np.take(ring, np.arange(start + done, start + n), axis=0, mode="wrap")


def pixel_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Outline each 4-connected region of ``mask`` as one polygon (holes joined by keyhole cuts).

    Args:
        mask: ``(H, W)`` bool, one slice.

    Returns:
        ``(N, 2)`` float64 polygons (column, row) in pixel coordinates (pixel (r, c)'s centre is
        (c, r)); closed (the last point joins the first), none repeated. Each runs along its
        region's pixel edges, :data:`INSET` inside; the centres of exactly the region's pixels
        lie inside the polygons.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return []
    # Traced within the region's bounding box (an organ covers a small part of a slice), then moved back.
    padded = np.pad(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1)
    starts, dirs = _edges(padded)
    successor, outgoing = _successors(starts, dirs, padded.shape)
    loops = _Loops(starts, dirs, successor)
    cuts = _cuts(padded, starts, dirs, outgoing, loops)
    polygons = []
    for loop in np.nonzero(loops.outer)[0]:
        blocks, stack = [], [_walk(loops, cuts, int(loop), 0)]
        while stack:  # holes inside holes' regions nest deeply: no recursion
            block = next(stack[-1], None)
            if block is None:
                stack.pop()
            elif isinstance(block, tuple):
                stack.append(_walk(loops, cuts, *block))
            else:
                blocks.append(block)
        # Lattice corner j is padded column j's left edge, i.e. column j - 1.5 of the box.
        polygons.append(np.concatenate(blocks) / _UNIT - 1.5 + [cols[0], rows[0]])
    return polygons


def fill_outlines(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The pixels whose centres lie inside ``polygons``, even-odd across all of them.

    Args:
        polygons: ``(N, 2)`` (column, row) closed polygons in pixel coordinates, on one slice.
        shape: ``(H, W)`` of the slice.

    Returns:
        ``(H, W)`` bool. Plastimatch's scan-line rule: an edge counts on the rows ``y`` with
        ``min(y0, y1) <= y < max(y0, y1)``, and a crossing at ``x0`` counts for pixels ``x >= x0``.
    """
    rows, cols = shape
    toggles = np.zeros((rows, cols + 1), np.int64)
    if not len(polygons):
        return np.zeros(shape, bool)
    # Every polygon's edges at once (p[e] -> q[e]): their crossings add up, even-odd.
    p = np.concatenate([np.asarray(polygon, np.float64).reshape(-1, 2) for polygon in polygons])
    q = np.concatenate([np.roll(np.asarray(polygon, np.float64).reshape(-1, 2), -1, axis=0) for polygon in polygons])
    lo, hi = np.minimum(p[:, 1], q[:, 1]), np.maximum(p[:, 1], q[:, 1])
    first, last = np.clip(np.ceil(lo), 0, rows), np.clip(np.ceil(hi), 0, rows)  # rows first..last-1
    count = np.maximum(last - first, 0).astype(np.int64)
    # A few edges at a time: an edge may cross every row, and a file may hold any number of them.
    bounds = np.searchsorted(np.cumsum(count), np.arange(1, int(count.sum()) // _CROSSINGS + 1) * _CROSSINGS)
    for edges in np.split(np.arange(len(p)), np.unique(bounds + 1)):
        _toggle(toggles, p[edges], q[edges], first[edges], count[edges])
    return (np.cumsum(toggles, axis=1)[:, :cols] % 2).astype(bool)


_CROSSINGS = 1 << 20  # scan-line crossings computed at once by fill_outlines


def _toggle(toggles: np.ndarray, p: np.ndarray, q: np.ndarray, first: np.ndarray, count: np.ndarray) -> None:
    """Add each crossing of edges ``p[e] -> q[e]`` with rows ``first[e] .. first[e] + count[e] - 1``
    to ``toggles`` ``(H, W + 1)``, at the first column at or right of it."""
    edge = np.repeat(np.arange(len(p)), count)
    y = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    t = (y - p[edge, 1]) / (q[edge, 1] - p[edge, 1])
    x = p[edge, 0] + t * (q[edge, 0] - p[edge, 0])
    np.add.at(toggles, (y.astype(np.int64), np.clip(np.ceil(x), 0, toggles.shape[1] - 1).astype(np.int64)), 1)
