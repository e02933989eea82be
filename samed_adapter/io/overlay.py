"""PNG montages of axial slices with coloured label overlays, for quick review.

Rendering uses numpy and Pillow only (no matplotlib), so pixel positions are
exact: every panel is the slice, upscaled by an integer factor, drawn at a
fixed place in the grid.  :func:`overlay_montage` draws the arrays it is given
as they are (row 0 at the top, column 0 at the left); :func:`overlay_volume`
first turns a :class:`Volume` with geometry into axial slices in the
radiological view (anterior up, the patient's right on the image's left), as
radiologists read them.
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samed_adapter.volume.geometry import RADIOLOGICAL
from samed_adapter.io.files import atomic_path
from samed_adapter.io.volume import Volume

__all__ = ["colour_table", "overlay_montage", "overlay_volume"]

# Strong, mutually distinct colours first (Trubetskoy's 20-colour list with
# greys, white and pastels dropped, as they vanish on a CT/MR grayscale).
_BASE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128),
    (170, 110, 40), (128, 0, 0), (128, 128, 0), (0, 0, 128), (250, 190, 212),
    (170, 255, 195),
)

_ALPHA = 0.5  # label opacity: the anatomy stays visible under the colour
_PAD = 6  # px around tiles
_GAP = 2  # px between the panels of one tile
_MIN_PANEL = 256  # px; small slices are upscaled to at least this on the long side
_BG = (0, 0, 0)
_TEXT = (255, 255, 255)


def colour_table(num_classes: int) -> np.ndarray:
    """Fixed colours for label values ``0..num_classes``.

    Returns:
        ``(num_classes + 1, 3)`` uint8; row 0 (background) is black and is
        never drawn, row ``c`` is the colour of class ``c``.  The first 16
        colours are hand-picked; further ones step the hue by the golden
        ratio so neighbours stay distinguishable.  The same ``c`` always gets
        the same colour, whatever ``num_classes`` is.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    table = np.zeros((num_classes + 1, 3), dtype=np.uint8)
    for c in range(1, num_classes + 1):
        if c <= len(_BASE_COLOURS):
            table[c] = _BASE_COLOURS[c - 1]
        else:
            hue = ((c - len(_BASE_COLOURS)) * 0.618033988749895) % 1.0
            sat, val = (0.85, 0.95) if c % 2 else (0.6, 0.8)
            table[c] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return table


def _as_slices(name: str, array: np.ndarray) -> np.ndarray:
    """View a ``(H, W)`` or ``(D, H, W)`` array as ``(D, H, W)``."""
    array = np.asarray(array)
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be (H, W) or (D, H, W), got shape {array.shape}")
    return array


def _check_labels(name: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not (labels == np.round(labels)).all():
            raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > num_classes):
        raise ValueError(
            f"{name} holds values {int(labels.min())}..{int(labels.max())} but class_names "
            f"names {num_classes} classes (label 1..{num_classes}); pass one name per label value"
        )


def _pick_slices(foreground: np.ndarray, depth: int, max_slices: int) -> list[int]:
    """Up to ``max_slices`` indices spread evenly over the slices with foreground."""
    candidates = np.flatnonzero(foreground) if foreground.any() else np.arange(depth)
    count = min(max_slices, candidates.size)
    picks = np.round(np.linspace(0, candidates.size - 1, count)).astype(int)
    return sorted({int(candidates[i]) for i in picks})


def _to_gray(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Window ``(H, W)`` intensities to uint8 gray."""
    lo, hi = window
    scaled = (np.nan_to_num(image.astype(np.float64), nan=lo) - lo) / max(hi - lo, 1e-12)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _blend(gray: np.ndarray, labels: np.ndarray | None, colours: np.ndarray) -> np.ndarray:
    """``(H, W)`` gray + labels -> ``(H, W, 3)`` uint8; label 0 stays see-through."""
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if labels is None:
        return rgb
    mask = labels > 0
    tint = colours[labels[mask].astype(np.intp)].astype(np.float64)
    rgb[mask] = np.round((1 - _ALPHA) * rgb[mask] + _ALPHA * tint).astype(np.uint8)
    return rgb


def _montage_inputs(
    image: np.ndarray, labels: np.ndarray, class_names: Sequence[str], truth: np.ndarray | None, max_slices: int
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    """(names of labels 1..K, image, labels, truth) with the arrays as ``(D, H, W)``, all checked."""
    names = list(class_names)
    if names and names[0].strip().lower() in ("background", "bg"):
        names = names[1:]
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    volume, pred = _as_slices("image", image), _as_slices("labels", labels)
    ref = None if truth is None else _as_slices("truth", truth)
    for name, other in (("labels", pred), ("truth", ref)):
        if other is not None and other.shape != volume.shape:
            raise ValueError(f"{name} shape {other.shape} differs from image {volume.shape}")
        if other is not None:
            _check_labels(name, other, len(names))
    return names, volume, pred, ref


def _flat(value: float) -> tuple[float, float]:
    """The window that shows ``value``, the only one there is, as mid-grey (black would vanish
    into the sheet's background and read as "no image")."""
    if not math.isfinite(value):  # nothing to show but where the labels are
        return (-0.5, 0.5)
    half = max(0.5, abs(value) * 2.0**-20)  # +-0.5 is lost in the rounding of a value near 1e20
    return (value - half, value + half)


def _display_window(shown: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    """The window given (checked), or the 0.5th..99.5th percentile of the finite values shown
    (a flat grey for slices of one value)."""
    if window is not None:
        if not window[1] > window[0]:
            raise ValueError(f"window must be (low, high) with high > low, got {window}")
        return window
    finite = shown[np.isfinite(shown)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    return (float(lo), float(hi)) if hi > lo else _flat(float(lo))


@dataclass(frozen=True)
class _Grid:
    """Where the tiles go: the layout of :func:`overlay_montage`'s docstring, in pixels."""

    scale: int  # every slice is upscaled by this integer factor
    panel_w: int  # one panel, upscaled
    tile_w: int
    tile_h: int
    line_h: int  # a caption's height, and a legend line's
    cols: int
    width: int  # the tiles with their padding (the legend may be wider)
    height: int  # the tiles with their padding, legend not counted

    @classmethod
    def of(cls, slice_shape: tuple[int, ...], n_panels: int, n_tiles: int, line_h: int) -> _Grid:
        height, width = slice_shape
        scale = max(1, _MIN_PANEL // max(height, width))
        tile_w = n_panels * width * scale + (n_panels - 1) * _GAP
        tile_h = height * scale
        cols = min(n_tiles, max(1, round(math.sqrt(n_tiles * tile_h / tile_w))))
        rows = math.ceil(n_tiles / cols)
        return cls(scale, width * scale, tile_w, tile_h, line_h, cols,
                   width=cols * tile_w + (cols + 1) * _PAD, height=rows * (line_h + tile_h) + (rows + 1) * _PAD)

    def origin(self, n: int) -> tuple[int, int]:
        """(left, top) of tile ``n``; tiles fill the grid row by row."""
        row, col = divmod(n, self.cols)
        return _PAD + col * (self.tile_w + _PAD), _PAD + row * (self.line_h + self.tile_h + _PAD)


@dataclass(frozen=True)
class _Legend:
    """A colour swatch and ``c: name`` per class, left to right, wrapped where the canvas ends."""

    entries: list[tuple[int, str, int, int]]  # (label, text, x, line)
    width: int  # of the canvas: the grid's, or wider for one long entry
    lines: int

    @classmethod
    def of(cls, names: Sequence[str], font, grid: _Grid) -> _Legend:
        texts = [f"{c + 1}: {n}" for c, n in enumerate(names)]
        widths = [grid.line_h + int(font.getlength(text)) + 12 for text in texts]  # swatch, gap, text, space
        canvas_w = max(grid.width, max(widths, default=0) + 2 * _PAD)
        entries, x, line = [], _PAD, 0
        for c, (text, w) in enumerate(zip(texts, widths, strict=True)):
            if x + w > canvas_w - _PAD and x > _PAD:
                x, line = _PAD, line + 1
            entries.append((c + 1, text, x, line))
            x += w
        return cls(entries, canvas_w, line + 1)

    def draw(self, draw, top: int, line_h: int, colours: np.ndarray, font) -> None:
        swatch = line_h - 4
        for label, text, x, line in self.entries:
            y = top + line * line_h
            draw.rectangle([x, y + 2, x + swatch - 1, y + 1 + swatch], fill=tuple(int(v) for v in colours[label]))
            draw.text((x + swatch + 4, y + 1), text, fill=_TEXT, font=font)


def _draw_tiles(canvas, draw, grid: _Grid, slices: tuple[np.ndarray, np.ndarray, np.ndarray | None],
                picks: Sequence[int], window: tuple[float, float], colours: np.ndarray, font) -> None:
    """Each picked slice under its caption: the prediction drawn on it, or image | truth | prediction."""
    from PIL import Image

    volume, pred, ref = slices
    for n, z in enumerate(picks):
        left, top = grid.origin(n)
        gray = _to_gray(volume[z], window)
        panels = [pred[z]] if ref is None else [None, ref[z], pred[z]]
        caption = f"slice {z}" + ("   image | truth | prediction" if ref is not None else "")
        draw.text((left, top + 1), caption, fill=_TEXT, font=font)
        for p, lab in enumerate(panels):
            rgb = _blend(gray, lab, colours)
            tile = Image.fromarray(np.repeat(np.repeat(rgb, grid.scale, axis=0), grid.scale, axis=1))
            canvas.paste(tile, (left + p * (grid.panel_w + _GAP), top + grid.line_h))


def overlay_montage(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    truth: np.ndarray | None = None,
    max_slices: int = 12,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write a PNG grid of axial slices with the labels drawn in colour.

    Args:
        image: intensities, ``(D, H, W)`` or ``(H, W)`` (a ``Volume.array``).
        labels: predicted class ids, same shape; 0 is background.
        class_names: names of labels ``1..K`` in order (``class_names[0]``
            names label 1).  A leading ``"background"`` entry is dropped, so
            lists that include it also work.
        path: output ``.png``; written atomically, folders created.
        truth: optional reference labels, same shape.  Each tile then shows
            ``image | truth | prediction`` side by side.
        max_slices: at most this many tiles, spread evenly over the slices
            where ``labels`` (or ``truth``) has foreground, or over all slices
            when there is none.
        window: ``(low, high)`` intensity window, e.g. ``(-160, 240)`` for CT
            abdomen; by default the 0.5th..99.5th percentile of the shown slices.

    Layout: each tile is ``tile_w = n_panels * W*s + (n_panels - 1) * 2`` by
    ``tile_h = H*s`` pixels (``s = max(1, 256 // max(H, W))``) under a
    one-line caption; ``max(1, round(sqrt(n_tiles * tile_h / tile_w)))`` columns keep
    the sheet roughly square, with 6 px padding; a legend of colour swatches
    and class names closes the bottom.

    Returns:
        ``Path(path)``.
    """
    from PIL import Image, ImageDraw, ImageFont

    names, volume, pred, ref = _montage_inputs(image, labels, class_names, truth, max_slices)
    foreground = (pred > 0).any(axis=(1, 2))
    if ref is not None:
        foreground |= (ref > 0).any(axis=(1, 2))
    picks = _pick_slices(foreground, volume.shape[0], max_slices)
    window = _display_window(volume[picks], window)
    colours = colour_table(len(names))
    font = ImageFont.load_default()
    grid = _Grid.of(volume.shape[1:], 1 if ref is None else 3, len(picks), int(font.getbbox("Ag")[3]) + 4)
    legend = _Legend.of(names, font, grid)
    canvas = Image.new("RGB", (legend.width, grid.height + legend.lines * grid.line_h + _PAD), _BG)
    draw = ImageDraw.Draw(canvas)
    _draw_tiles(canvas, draw, grid, (volume, pred, ref), picks, window, colours, font)
    legend.draw(draw, grid.height, grid.line_h, colours, font)

    out = Path(path)
    with atomic_path(out) as tmp, open(tmp, "xb") as fh:
        canvas.save(fh, format="PNG")
    return out


def overlay_volume(
    volume: Volume,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    truth: np.ndarray | None = None,
    intensity: object | None = None,
    max_slices: int = 12,
) -> Path:
    """:func:`overlay_montage` of a scan in the radiological view.

    Args:
        volume: the scan as read (:func:`~samed_adapter.io.read_image`).
        labels, truth: class ids in ``volume.array``'s layout (what ``SAMed.segment(volume)``
            returns and :func:`~samed_adapter.io.write_labels` takes).
        intensity: an :class:`~samed_adapter.volume.preprocessing.Intensity` whose window (or
            percentiles of the volume) sets the grey levels; default percentiles of the slices.

    A volume with an affine is shown as axial slices with anterior up and the patient's right
    on the image's left (reoriented to L, P, S: axis permutations and flips, no resampling); one
    without (PNG, NPY) as stored.
    """
    geometry = volume.geometry(RADIOLOGICAL if volume.affine is not None else None, 2)
    image = geometry.to_slices(volume.voxels)
    shown = [geometry.to_slices(volume.to_voxels(a)) for a in (labels, truth) if a is not None]
    window = None
    bounds = getattr(intensity, "bounds", None)
    if bounds is not None:
        window = bounds(image)
        # Percentiles of a constant volume are (v, v): no window, yet a picture to show (the
        # model saw one value everywhere too), so its labels are never lost to an error here.
        if window is not None and not window[1] > window[0]:
            window = _flat(window[0])
    return overlay_montage(image, shown[0], class_names, path, truth=shown[1] if truth is not None else None,
                           max_slices=max_slices, window=window)
