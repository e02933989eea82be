"""Geometry: from a volume on its own voxel grid to the model's 2-D slices, and back.

The model is 2-D, so whatever cuts the slices decides what it sees. Every path that feeds it
(the training datasets, `evaluate`, `segment`, the quick start, `SAMed.segment`) cuts them here.

The model's slices
------------------
A volume's voxel data ``data[i, j, k]`` (nibabel's order: the affine maps ``(i, j, k, 1)`` to
RAS+ mm) is first reoriented to a target orientation, given as nibabel axis codes of the
reoriented volume (``("L", "P", "S")``: voxel axis 0 runs towards the patient's left, axis 1
towards posterior, axis 2 towards superior). Then it is cut along ``slice_axis`` and each
slice is laid out with rows along the later remaining axis and columns along the earlier one:
for ``slice_axis = 2`` that is ``data.transpose(2, 1, 0)``, slice ``k`` being ``data[:, :, k].T``.
This is the layout of the preprocessing in wide use for Synapse (the published SAMed models
saw it) and of :class:`samed_adapter.io.Volume`.

Reorienting permutes and flips axes only (nibabel's ``io_orientation`` / ``ornt_transform`` /
``apply_orientation``), never resamples: an oblique affine is reoriented along its closest axes,
and labels mapped back land on the input's own voxels. ``orientation=None`` means "as stored":
no reorientation, the slices are cut from the data in its stored voxel order.

With the target ``("L", "P", "S")`` and ``slice_axis = 2`` the slices are axial images in the
radiological view: anterior up, the patient's right on the image's left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
from nibabel import orientations as ornts

__all__ = [
    "RADIOLOGICAL",
    "Orientation",
    "SliceGeometry",
    "axis_codes",
    "check_slice_axis",
    "check_voxel_sizes",
    "describe_orientation",
    "parse_orientation",
    "voxel_size_disagreement",
    "voxel_sizes",
]

Orientation = tuple[str, str, str]
#: Axial slices in the radiological view (anterior up, patient right on the image's left).
RADIOLOGICAL: Orientation = ("L", "P", "S")
_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


def parse_orientation(codes: Union[str, Sequence[str], None]) -> Optional[Orientation]:
    """``"LPS"``, ``"l,p,s"`` or ``("L", "P", "S")`` -> ``("L", "P", "S")``; None stays None.

    Raises:
        ValueError: not three codes, one from each of L/R, A/P and S/I.
    """
    if codes is None:
        return None
    if isinstance(codes, str):
        letters = [c for c in codes.upper() if c not in ", "]
    else:
        try:
            letters = [str(c).upper() for c in codes]
        except TypeError:
            letters = []
    if len(letters) != 3 or any(sum(c in pair for c in letters) != 1 for pair in _PAIRS):
        raise ValueError(
            f"orientation must be three axis codes, one of L/R, one of A/P and one of S/I "
            f"(e.g. LPS or RAS, nibabel's aff2axcodes convention), got {str(codes)[:40]!r}"
        )
    return (letters[0], letters[1], letters[2])


def axis_codes(affine: np.ndarray) -> Orientation:
    """The axis codes of ``affine``'s voxel axes along their closest RAS+ axes (``("R", "A", "S")`` ...).

    Raises:
        ValueError: the affine is degenerate (a voxel axis has no direction).
    """
    ornt = _io_orientation(affine)
    return tuple(ornts.ornt2axcodes(ornt))  # type: ignore[return-value]


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes ``(di, dj, dk)`` in mm: the norms of the affine's first three columns.

    The one source of voxel size for statistics, HD95 and everything else, as nibabel and MONAI
    take it: a NIfTI's pixdim may disagree with its sform, and the sform is what places voxels.
    """
    return tuple(float(s) for s in np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def voxel_size_disagreement(affine: np.ndarray, zooms: Sequence[float], name: object = "the image") -> Optional[str]:
    """The one-line warning for a header whose ``zooms`` (pixdim) differ from ``affine``'s voxel sizes, else None.

    Axes a 2-D header leaves out (or gives as 0) are not compared.
    """
    sizes = voxel_sizes(affine)
    stated = [float(z) for z in zooms][:3]
    if not any(z > 0 and not np.isclose(s, z, rtol=1e-3, atol=1e-5) for s, z in zip(sizes, stated)):
        return None
    shown = ", ".join(f"{z:.4g}" for z in stated)
    return (f"{name}: the header's voxel size (pixdim {shown} mm) disagrees with its affine "
            f"({', '.join(f'{s:.4g}' for s in sizes[:len(stated)])} mm); using the affine's, which places the voxels")


def check_voxel_sizes(affine: np.ndarray, zooms: Sequence[float], name: object = "the image") -> tuple[float, float, float]:
    """:func:`voxel_sizes` of ``affine``, with a ``UserWarning`` when a header's ``zooms`` (pixdim) differ.

    SimpleITK warns the same way; the affine wins, since it is what places the voxels.
    """
    message = voxel_size_disagreement(affine, zooms, name)
    if message:
        import warnings

        warnings.warn(message, UserWarning, stacklevel=2)
    return voxel_sizes(affine)


def _io_orientation(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        # numpy's SVD would fail with "SVD did not converge", which names nothing the user can fix.
        raise ValueError("the affine holds NaN or infinity; the file's header (qform/sform or pixdim) is damaged: "
                         "fix it before segmenting it")
    ornt = ornts.io_orientation(affine)
    if np.isnan(ornt).any():
        raise ValueError(
            f"the affine {np.asarray(affine).round(4).tolist()} gives a voxel axis no direction in space; "
            "fix the file's header (qform/sform) before segmenting it"
        )
    return ornt


def check_slice_axis(slice_axis: int) -> int:
    if isinstance(slice_axis, bool) or not isinstance(slice_axis, (int, np.integer)) or slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2 (an axis of the reoriented volume), got {slice_axis!r}")
    return int(slice_axis)


@dataclass(frozen=True)
class SliceGeometry:
    """How one volume's stored voxel grid maps to the model's slices and back.

    Attributes:
        shape: the stored voxel shape ``(I, J, K)``.
        transform: ``(3, 2)`` nibabel orientation transform from the stored axes to the target
            ones (row ``s``: target axis of stored axis ``s``, and 1 or -1 for a flip).
        slice_axis: the target axis the slices are cut along.
    """

    shape: tuple[int, int, int]
    transform: np.ndarray
    slice_axis: int = 2

    @classmethod
    def for_volume(
        cls,
        shape: Sequence[int],
        affine: Optional[np.ndarray],
        orientation: Union[str, Sequence[str], None] = None,
        slice_axis: int = 2,
    ) -> "SliceGeometry":
        """The geometry of a stored ``(I, J, K)`` volume with ``affine`` cut for ``orientation``.

        ``orientation=None`` or ``affine=None`` (no geometry, e.g. PNG/NPY): as stored.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ValueError(f"shape must be (I, J, K), got {shape}")
        target = parse_orientation(orientation)
        identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)
        if target is None or affine is None:
            transform = identity
        else:
            transform = ornts.ornt_transform(_io_orientation(affine), ornts.axcodes2ornt(target))
        return cls(shape, transform, check_slice_axis(slice_axis))

    # ------------------------------------------------------------------ shapes

    @property
    def target_shape(self) -> tuple[int, int, int]:
        """Voxel shape after reorientation, in target axis order."""
        out = [0, 0, 0]
        for stored, (target, _) in enumerate(self.transform):
            out[int(target)] = self.shape[stored]
        return (out[0], out[1], out[2])

    @property
    def _order(self) -> tuple[int, int, int]:
        """Target axes in slice layout: (slice axis, row axis, column axis)."""
        a, b = (t for t in range(3) if t != self.slice_axis)
        return (self.slice_axis, b, a)

    @property
    def slices_shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of :meth:`to_slices`."""
        target = self.target_shape
        return tuple(target[t] for t in self._order)  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        return self.slices_shape[0]

    def spacing(self, zooms: Sequence[float]) -> tuple[float, float, float]:
        """Voxel sizes ``(di, dj, dk)`` of the stored axes -> ``(D, H, W)`` order of the slices."""
        target = [0.0, 0.0, 0.0]
        for stored, (t, _) in enumerate(self.transform):
            target[int(t)] = float(zooms[stored])
        return tuple(target[t] for t in self._order)  # type: ignore[return-value]

    # ------------------------------------------------------------------ data

    def _check(self, data: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
        data = np.asarray(data)
        if data.shape != shape:
            raise ValueError(f"{name} has shape {data.shape}, expected {shape}")
        return data

    def to_slices(self, data: np.ndarray) -> np.ndarray:
        """Stored ``(I, J, K)`` data -> the model's ``(D, H, W)`` slices (a view where possible)."""
        data = self._check(data, "the volume", self.shape)
        return ornts.apply_orientation(data, self.transform).transpose(self._order)

    def from_slices(self, slices: np.ndarray) -> np.ndarray:
        """``(D, H, W)`` slices (labels, probabilities, ...) -> the stored ``(I, J, K)`` grid.

        The exact inverse of :meth:`to_slices`; extra trailing axes are carried along.
        """
        slices = np.asarray(slices)
        if slices.shape[:3] != self.slices_shape:
            raise ValueError(f"the slices have shape {slices.shape}, expected {self.slices_shape}")
        perm = np.argsort(self._order)
        target = slices.transpose(*perm, *range(3, slices.ndim))
        # Inverse transform: target axis t came from stored axis s, with the same flip.
        inverse = np.zeros((3, 2))
        for stored, (t, flip) in enumerate(self.transform):
            inverse[int(t)] = (stored, flip)
        return ornts.apply_orientation(target, inverse)

    def point_to_slices(self, point: Sequence[int]) -> tuple[int, int, int]:
        """A stored voxel index ``(i, j, k)`` -> its ``(d, row, col)`` in :meth:`to_slices`'s layout.

        Raises:
            IndexError: the point is not a voxel of this volume.
        """
        ijk = tuple(int(v) for v in point)
        if len(ijk) != 3 or not all(0 <= v < n for v, n in zip(ijk, self.shape)):
            raise IndexError(f"voxel {tuple(point)} is outside the volume of shape {self.shape}")
        target = [0, 0, 0]
        for stored, (t, flip) in enumerate(self.transform):
            target[int(t)] = ijk[stored] if flip > 0 else self.shape[stored] - 1 - ijk[stored]
        d, row, col = (target[t] for t in self._order)
        return d, row, col

    def slice(self, dataobj: Any, k: int) -> np.ndarray:
        """Slice ``k`` of :meth:`to_slices`, reading only that plane of ``dataobj``.

        ``dataobj`` is anything indexable like a stored ``(I, J, K)`` array: an ndarray or a
        nibabel ``ArrayProxy``, which then reads one plane from disk.
        """
        depth = self.num_slices
        if not -depth <= k < depth:
            raise IndexError(f"slice {k} out of range for {depth} slices")
        k %= depth
        stored = int(np.flatnonzero(self.transform[:, 0] == self.slice_axis)[0])
        flip = self.transform[stored, 1] < 0
        index: list[Union[slice, int]] = [slice(None)] * 3
        index[stored] = self.shape[stored] - 1 - k if flip else k
        plane = np.asarray(dataobj[tuple(index)])
        rest = [s for s in range(3) if s != stored]  # the plane's axes, in stored order
        for axis, s in enumerate(rest):
            if self.transform[s, 1] < 0:
                plane = np.flip(plane, axis=axis)
        # Rows run along the later target axis, columns along the earlier one.
        if self.transform[rest[0], 0] < self.transform[rest[1], 0]:
            plane = plane.T
        return plane


def describe_orientation(config: Any) -> str:
    """One line on how an adapter's slices are cut (for `info` and messages)."""
    axis = config.slice_axis
    if config.orientation is None:
        return f"as stored (not recorded): slices along stored voxel axis {axis}"
    codes = "".join(config.orientation)
    return f"{codes}: volumes reoriented to {codes}, slices along axis {axis} ({config.orientation[axis]})"
