"""The Volume every reader returns and every writer takes: a slices-first array and its geometry.

Axis convention
---------------
Every :class:`Volume` stores ``array`` **slices first**: ``(D, H, W)`` for a
3-D image and ``(H, W)`` for a 2-D one, so ``array[k]`` is one axial slice as
the model sees it.  The mapping to NIfTI voxel indices is the same for every
format::

    array[k, j, i]  <->  nifti_data[i, j, k]      (3-D)
    array[j, i]     <->  nifti_data[i, j]         (2-D)

i.e. ``array = nifti_data.transpose(2, 1, 0)``; :func:`write_labels` applies
the inverse, so a label map written for a NIfTI input has exactly the voxel
order of that input.  ``Volume.affine`` maps NIfTI voxel indices
``(i, j, k, 1)`` to RAS+ millimetres and ``Volume.spacing`` lists voxel sizes
in ``array`` order, ``(dk, dj, di)``.

For DICOM, ``i`` runs along a row, ``j`` down the rows and ``k`` over slices
sorted along the slice normal.  Nothing is reoriented, for any format: labels
written back line up voxel for voxel with what was read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..volume.geometry import SliceGeometry, voxel_sizes as _column_sizes

__all__ = ["Volume", "label_dtype", "uneven_message", "voxel_sizes"]


@dataclass
class Volume:
    """An image in the model's slices-first layout plus its geometry.

    Attributes:
        array: image values, ``(D, H, W)`` (3-D) or ``(H, W)`` (2-D); float32
            for everything :func:`read_image` returns.
        affine: ``(4, 4)`` map from NIfTI voxel ``(i, j, k, 1)`` (see the
            module docstring, ``array[k, j, i]``) to RAS+ mm, or ``None`` when
            the format carries no geometry (PNG, NPY).
        header: the nibabel header of a NIfTI input, else ``None``; used to
            write labels with the same qform/sform.
        spacing: voxel size in mm in ``array`` axis order, ``(dk, dj, di)`` or
            ``(dj, di)``; ones when unknown.
        source: the path the volume was read from, if any.
        files: for a DICOM input, the file of each slice in ``array`` order
            (``array[k]`` comes from ``files[k]``), so writers such as DICOM-SEG
            can reference the source instances; ``()`` for other formats.
        messages: what the reader did that the user should hear of, one line each (a
            localizer left out of a DICOM series, ...); also given as ``UserWarning``.
        uneven: the slices are unevenly spaced (a DICOM series read with
            ``allow_uneven=True``): ``affine``'s slice step is only approximate, so the NIfTI
            writers refuse the volume; outputs that reference each file in ``files`` are exact.
        positions: for a DICOM input, each slice's position along the slice normal in mm
            (LPS), in ``array`` order; ``()`` for other formats.
    """

    array: np.ndarray
    affine: np.ndarray | None = None
    header: Any = None
    spacing: tuple[float, ...] = ()
    source: Path | None = None
    files: tuple[Path, ...] = ()
    messages: tuple[str, ...] = ()
    uneven: bool = False
    positions: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.array.ndim not in (2, 3):
            raise ValueError(f"Volume.array must be (H, W) or (D, H, W), got {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing) or (1.0,) * self.array.ndim
        if len(self.spacing) != self.array.ndim:
            raise ValueError(f"spacing {self.spacing} needs one value per axis {self.array.shape}")
        if self.affine is not None:
            self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine is not None and self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {self.affine.shape}")
        if self.source is not None:
            self.source = Path(self.source)
        self.files = tuple(Path(f) for f in self.files)
        self.messages = tuple(str(m) for m in self.messages)
        self.uneven = bool(self.uneven)
        self.positions = tuple(float(z) for z in self.positions)
        # A file list that does not match the slices would reference the wrong instances.
        slices = self.array.shape[0] if self.array.ndim == 3 else 1
        if self.files and len(self.files) != slices:
            raise ValueError(f"files lists {len(self.files)} files but array {self.array.shape} "
                             f"has {slices} slices; give one file per slice, or none")

    # The affine's voxel order (i, j, k) is the one geometry works in; ``array`` is its transpose.

    @property
    def voxels(self) -> np.ndarray:
        """The image as ``(I, J, K)`` voxels in the affine's order (a view; 2-D gives K = 1)."""
        return self.to_voxels(self.array)

    def to_voxels(self, array: np.ndarray) -> np.ndarray:
        """An array in ``self.array``'s layout (labels, say) -> ``(I, J, K)`` voxel order (a view)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume's {self.array.shape}")
        return array.T if array.ndim == 3 else array.T[..., None]

    def from_voxels(self, voxels: np.ndarray) -> np.ndarray:
        """``(I, J, K)`` voxels -> ``self.array``'s layout: the inverse of :meth:`to_voxels`."""
        voxels = np.asarray(voxels)
        return voxels.T if self.array.ndim == 3 else voxels[..., 0].T

    def geometry(self, orientation: Any = None, slice_axis: int = 2) -> SliceGeometry:
        """How to cut this volume into model slices for an adapter's orientation and slice axis.

        Without an affine (PNG, NPY) there is nothing to reorient by: ``array`` is taken as
        the slices, as given.
        """
        if self.affine is None:
            return SliceGeometry.for_volume(self.voxels.shape, None, None, 2)
        return SliceGeometry.for_volume(self.voxels.shape, self.affine, orientation, slice_axis)


def voxel_sizes(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    """Voxel sizes in ``array`` order, ``(dk, dj, di)`` or ``(dj, di)``, from the affine's columns.

    The affine is the one source of voxel size everywhere (as nibabel and MONAI take it):
    column norms stay right for oblique affines.
    """
    return tuple(float(s) for s in _column_sizes(affine)[:ndim][::-1])


def label_dtype(labels: np.ndarray, fmt: str) -> np.dtype:
    """uint8 when the labels fit, else int16; reject what would be mangled."""
    if labels.dtype == bool or labels.size == 0:
        return np.dtype(np.uint8)
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating) and not (labels == np.round(labels)).all():
        raise ValueError("labels hold non-integer values; take argmax/round to class ids first")
    lo, hi = labels.min(), labels.max()
    if lo >= 0 and hi < 256:
        return np.dtype(np.uint8)
    if fmt == ".png":
        raise ValueError(f"labels range [{lo}, {hi}] does not fit an 8-bit PNG; write .nii.gz")
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    raise ValueError(f"labels range [{lo}, {hi}] does not fit int16; class ids must be < 32768")


def uneven_message(like: Volume) -> str:
    """Why an unevenly spaced volume gets no NIfTI: the slice positions and what to do instead."""
    from .slice_spacing import shortened

    where = like.source or "the image"
    shown = f" at {shortened(like.positions)} mm along the slice normal" if like.positions else ""
    return (f"{where}: its slices are unevenly spaced{shown}, and a NIfTI places slices at one even step, so it would "
            "put some where they were not; use --output-type dicom-seg (exact per instance)")
