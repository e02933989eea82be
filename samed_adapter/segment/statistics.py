"""Per-class statistics of a label map: what clinicians read off a segmentation.

For every class: voxel count, volume in mm³, mean and standard deviation of the raw image
intensity inside the mask (Hounsfield units for CT), and the bounding box in voxels, as
TotalSegmentator's ``--statistics`` reports them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..volume.geometry import check_voxel_sizes

__all__ = ["label_statistics"]


def _as_voxels(name: str, value: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(array on the file's voxel grid, affine or None) of an ndarray, a Volume or a nibabel image."""
    from ..io.volume import Volume

    if isinstance(value, Volume):
        return value.voxels, value.affine
    if isinstance(value, nib.spatialimages.SpatialImage):
        affine = np.asarray(value.affine, dtype=np.float64)
        check_voxel_sizes(affine, value.header.get_zooms()[:3], f"the {name}")  # warns when pixdim disagrees
        return np.asanyarray(value.dataobj), affine
    if isinstance(value, np.ndarray):
        return value, None
    raise TypeError(f"{name} must be a numpy array, a samed_adapter.io.Volume or a nibabel image, "
                    f"got {type(value).__name__}")


def label_statistics(
    labels: Union[np.ndarray, "nib.spatialimages.SpatialImage", Any],
    image: Union[np.ndarray, "nib.spatialimages.SpatialImage", Any],
    class_names: Sequence[str],
    *,
    spacing: Optional[Sequence[float]] = None,
) -> dict[str, dict[str, Any]]:
    """Statistics of every class of ``labels`` over the raw ``image``.

    Args:
        labels: class ids 0..K on the image's grid: an array of the image's shape, a nibabel
            image (what ``SAMed.segment(path)`` returns) or an array in a ``Volume``'s layout
            when ``image`` is that Volume.
        image: the raw intensities: an array, a :class:`samed_adapter.io.Volume` or a nibabel
            image. With a Volume, labels given as an array are in ``volume.array``'s layout.
        class_names: K names of classes 1..K.
        spacing: voxel sizes in mm along the arrays' axes, for bare arrays (default 1 mm).
            Volumes and nibabel images use their affine; the voxel volume is |det| of its
            3 x 3 part, right for oblique grids too (a ``UserWarning`` when a nibabel
            image's pixdim disagrees: the affine, which places the voxels, wins everywhere).

    Returns:
        ``{name: {"label": c, "voxels": n, "volume_mm3": v, "intensity_mean": m,
        "intensity_std": s, "bbox": {"min": [...], "max": [...]}}}`` for every class 1..K, in
        class order. The bounding box holds inclusive voxel indices on the input's own grid
        (``(i, j, k)`` for NIfTI and DICOM inputs); the standard deviation is the population
        one (ddof 0). An empty class has 0 voxels and ``None`` for the mean, std and box.
    """
    from ..io.volume import Volume

    raw, affine = _as_voxels("image", image)
    if isinstance(image, Volume) and isinstance(labels, np.ndarray):
        labels = image.to_voxels(labels)
    ids, label_affine = _as_voxels("labels", labels)
    ids = np.asarray(ids)
    raw = np.asarray(raw)
    if ids.shape != raw.shape:
        raise ValueError(f"labels shape {ids.shape} does not match the image's {raw.shape}; "
                         "pass labels on the image's grid (as segment writes them)")
    if ids.dtype.kind not in "biu":
        if ids.dtype.kind != "f" or not np.array_equal(ids, np.round(ids)):
            raise ValueError(f"labels must hold integer class ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    names = list(class_names)
    if ids.size and (ids.min() < 0 or ids.max() > len(names)):
        raise ValueError(f"labels hold values {int(ids.min())}..{int(ids.max())} but {len(names)} class names "
                         f"were given (labels 1..{len(names)}); pass one name per class")
    affine = affine if affine is not None else label_affine
    if affine is not None:
        voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    else:
        sizes = [1.0] * ids.ndim if spacing is None else [float(s) for s in spacing]
        if len(sizes) != ids.ndim:
            raise ValueError(f"spacing {tuple(sizes)} needs one value per axis of shape {ids.shape}")
        voxel_mm3 = float(np.prod(sizes))

    # Counts, means, then squared deviations from each class's mean (two passes: no cancellation
    # for classes far from zero, such as bone in HU), all in float64; boxes in one more pass.
    flat_ids, values = ids.ravel(), raw.astype(np.float64, copy=False).ravel()
    bins = len(names) + 1
    counts = np.bincount(flat_ids, minlength=bins)
    means = np.bincount(flat_ids, weights=values, minlength=bins) / np.maximum(counts, 1)
    deviations = values - means[flat_ids]
    squares = np.bincount(flat_ids, weights=deviations * deviations, minlength=bins)
    boxes = ndimage.find_objects(ids, max_label=len(names))

    stats: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names, start=1):
        n = int(counts[c])
        # Rounded to 10^-6 mm³: det() of an axis-aligned 2 mm grid is 7.999999999999998.
        entry: dict[str, Any] = {"label": c, "voxels": n, "volume_mm3": round(n * voxel_mm3, 6),
                                 "intensity_mean": None, "intensity_std": None, "bbox": None}
        if n:
            entry["intensity_mean"] = float(means[c])
            entry["intensity_std"] = float(np.sqrt(squares[c] / n))
            box = boxes[c - 1]
            entry["bbox"] = {"min": [int(s.start) for s in box], "max": [int(s.stop) - 1 for s in box]}
        stats[name] = entry
    return stats
