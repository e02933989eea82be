"""Dataset readers: SAMed's preprocessed Synapse files and nnU-Net / MSD NIfTI folders.

Every slice dataset returns ``{"image": (H, W) float32 in [0, 1], "label": (H, W) int64,
"case": str, "slice": int}`` (numpy arrays), passed through an optional ``transform`` callable
(the training loop augments with :func:`~samed_adapter.training.augment.augment`). Volume datasets
return ``{"image": (D, H, W) float32, "label": (D, H, W) int64, "case": str}`` (NIfTI ones add
``"spacing"`` and ``"affine"``), D being the axis that the slice datasets cut along.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import h5py
import nibabel as nib
import numpy as np
from torch.utils.data import Dataset

from ..adapter_file.config import CT_ABDOMEN_WINDOW
from ..volume.geometry import SliceGeometry, axis_codes, check_slice_axis, check_voxel_sizes, parse_orientation
from ..io.limits import check_voxels
from ..io.nifti import nifti_voxels
from ..volume.preprocessing import Intensity
from .augment import as_int_label

__all__ = [
    "SYNAPSE_LABEL_MAP",
    "SynapseSlices",
    "SynapseVolumes",
    "NiftiSlices",
    "NiftiVolumes",
    "find_nifti_cases",
    "find_nifti_images",
    "adapter_data_options",
    "split_cases",
]

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]
PathLike = Union[str, Path]

# Raw Synapse / BTCV label -> SAMed's 8 classes (spleen, right kidney, left kidney, gallbladder,
# liver, stomach, aorta, pancreas); oesophagus, IVC, veins and adrenals (5, 9, 10, 12, 13) -> 0.
SYNAPSE_LABEL_MAP: dict[int, int] = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
# Preprocessed images should be in [0, 1]; allow float round-off from whoever wrote them.
_RANGE_TOL = 1e-3
_SLICE_NAME = re.compile(r"^(?P<case>.+)_slice(?P<slice>\d+)$")


def _listed_files(root: Path, folder: str, list_file: PathLike, suffix: str) -> tuple[Path, list[str]]:
    """(root/folder, names read from list_file), checking that every root/folder/<name><suffix> exists."""
    data_dir = root / folder
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} is not a folder; expected root/{folder}/<name>{suffix} (SAMed's Synapse layout)")
    given = Path(list_file)
    found = [p for p in (given, root / given) if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"list file {str(list_file)!r} not found (looked at {given} and {root / given}); expected a text file with "
            "one name per line, e.g. lists_Synapse/train.txt or test_vol.txt from the SAMed/TransUNet repository"
        )
    names = [n for n in (line.strip() for line in found[0].read_text().splitlines()) if n and not n.startswith("#")]
    if not names:
        raise ValueError(f"list file {found[0]} names no samples; expected one name per line")
    missing = [n for n in names if not (data_dir / f"{n}{suffix}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} names listed in {found[0]} have no file in {data_dir}, e.g. {missing[0]}{suffix}; "
            "check that the list file belongs to this data folder"
        )
    return data_dir, names


def _check_image(image: np.ndarray, label: np.ndarray, ndim: int, where: object) -> tuple[np.ndarray, np.ndarray]:
    if image.ndim != ndim or image.shape != label.shape:
        raise ValueError(f"{where}: expected {ndim}-D image and label of equal shape, got {image.shape} and {label.shape}")
    image = image.astype(np.float32, copy=False)
    if image.size and (float(image.min()) < -_RANGE_TOL or float(image.max()) > 1 + _RANGE_TOL):
        raise ValueError(
            f"{where}: image intensities span [{image.min():.4g}, {image.max():.4g}] but preprocessed Synapse data is in "
            "[0, 1]; raw CT must be windowed to [-125, 275] HU and scaled first (NiftiSlices does this)"
        )
    return image, as_int_label(label, where)


def _apply(transform: Optional[Transform], sample: Sample) -> Sample:
    return sample if transform is None else transform(sample)


class SynapseSlices(Dataset):
    """Training slices of SAMed's preprocessed Synapse data.

    Layout: ``root/train_npz/caseXXXX_sliceYYY.npz`` with ``image`` (H, W) float32 in [0, 1] and
    ``label`` (H, W) with values 0..8; ``split_file`` lists the slice names, one per line (a path,
    or relative to ``root``; e.g. ``lists_Synapse/train.txt``). Items:
    ``{"image": (H, W) float32, "label": (H, W) int64, "case": "caseXXXX", "slice": YYY}`` passed
    through ``transform``. Names not of the form ``<case>_slice<digits>`` get ``slice = -1``.
    """

    def __init__(self, root: PathLike, split_file: PathLike = "lists_Synapse/train.txt", *, transform: Optional[Transform] = None) -> None:
        self.root = Path(root)
        self.data_dir, self.names = _listed_files(self.root, "train_npz", split_file, ".npz")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        name = self.names[index]
        path = self.data_dir / f"{name}.npz"
        with np.load(path) as data:
            if "image" not in data or "label" not in data:
                raise ValueError(f"{path} holds arrays {sorted(data.files)}; expected 'image' and 'label'")
            image, label = _check_image(data["image"], data["label"], 2, path)
        match = _SLICE_NAME.match(name)
        case, slice_index = (match["case"], int(match["slice"])) if match else (name, -1)
        return _apply(self.transform, {"image": image, "label": label, "case": case, "slice": slice_index})


class SynapseVolumes(Dataset):
    """Test volumes of SAMed's preprocessed Synapse data, for evaluation.

    Layout: ``root/test_vol_h5/caseXXXX.npy.h5`` with datasets ``image`` (D, H, W) in [0, 1] and
    ``label`` (D, H, W); ``list_file`` (a path, or relative to ``root``; e.g.
    ``lists_Synapse/test_vol.txt``) names the cases. Items: ``{"image": (D, H, W) float32,
    "label": (D, H, W) int64, "case": str}`` passed through ``transform``.
    """

    def __init__(self, root: PathLike, list_file: PathLike = "lists_Synapse/test_vol.txt", *, transform: Optional[Transform] = None) -> None:
        self.root = Path(root)
        self.data_dir, self.cases = _listed_files(self.root, "test_vol_h5", list_file, ".npy.h5")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> Sample:
        case = self.cases[index]
        path = self.data_dir / f"{case}.npy.h5"
        with h5py.File(path, "r") as data:
            if "image" not in data or "label" not in data:
                raise ValueError(f"{path} holds datasets {sorted(data.keys())}; expected 'image' and 'label'")
            image, label = _check_image(data["image"][()], data["label"][()], 3, path)
        return _apply(self.transform, {"image": image, "label": label, "case": case})


def _nifti_files(root: PathLike) -> tuple[Path, Path, dict[str, Path]]:
    root = Path(root)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is not a folder; expected root/imagesTr/<case>.nii.gz (or <case>_0000.nii.gz) and "
                "root/labelsTr/<case>.nii.gz (nnU-Net / Medical Segmentation Decathlon layout)"
            )
    found: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        match = re.fullmatch(r"(.+?)\.nii(\.gz)?", path.name)
        # "._x.nii.gz" are macOS resource forks shipped inside the MSD tarballs, not images.
        if match is None or path.name.startswith("."):
            continue
        case = stem = match[1]
        channel = re.fullmatch(r"(.+)_(\d{4})", stem)
        # nnU-Net names images <case>_0000; MSD names them <case>. The label file decides.
        if channel and _label_path(labels_dir, stem) is None:
            if channel[2] != "0000":
                continue  # further channels of a multi-modal case; only channel 0 is read
            case = channel[1]
        if case in found:
            raise ValueError(f"case {case!r} has two image files, {found[case].name} and {path.name}; keep one")
        found[case] = path
    return images_dir, labels_dir, found


def _label_path(labels_dir: Path, case: str) -> Optional[Path]:
    for suffix in (".nii.gz", ".nii"):
        if (labels_dir / f"{case}{suffix}").is_file():
            return labels_dir / f"{case}{suffix}"
    return None


def find_nifti_images(root: PathLike) -> dict[str, Path]:
    """Case name -> image file in ``root/imagesTr`` (see :func:`find_nifti_cases`)."""
    return _nifti_files(root)[2]


def find_nifti_cases(root: PathLike) -> list[str]:
    """Sorted case names in ``root/imagesTr`` (``x.nii.gz`` or nnU-Net's ``x_0000.nii.gz`` -> ``x``)."""
    return sorted(_nifti_files(root)[2])


def split_cases(cases: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split case names into ``(train, val)``, both sorted, by case (never by slice).

    The result depends only on the set of names, ``val_fraction`` and ``seed`` (not on the input
    order). ``round(val_fraction * n)`` cases go to validation, at least one when val_fraction > 0.
    """
    names = [str(c) for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("cases contains duplicate names; pass each case once")
    if not isinstance(val_fraction, numbers.Real) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(names)
    n_val = int(math.floor(val_fraction * n + 0.5))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= n and n_val > 0:
        raise ValueError(f"val_fraction={val_fraction} of {n} cases leaves no training case; lower it or add cases")
    ordered = sorted(names)
    perm = np.random.default_rng(seed).permutation(n)
    val = sorted(ordered[i] for i in perm[:n_val])
    train = sorted(ordered[i] for i in perm[n_val:])
    return train, val


def adapter_data_options(config: Any) -> dict[str, Any]:
    """The NIfTI datasets' options that cut and scale a volume as ``segment`` does for an adapter
    of ``config`` (an :class:`~samed_adapter.adapter_file.config.AdapterConfig`): its intensity
    window or percentiles, orientation and slice axis; labels are taken as they are (class ids)."""
    return {"window": config.intensity_window, "percentiles": config.intensity_percentiles,
            "orientation": config.orientation, "slice_axis": config.slice_axis}


class _NiftiDataset(Dataset):
    """Header index, lazy voxel access and intensity/label conversion shared by the NIfTI datasets.

    Every case is cut into slices by :class:`~samed_adapter.volume.geometry.SliceGeometry`: reoriented
    to ``orientation`` (axis codes such as ``"LPS"``; None keeps each file's stored axes) and cut
    along ``slice_axis``, exactly as `segment` cuts a file for an adapter that records them.
    """

    def __init__(
        self,
        root: PathLike,
        cases: Optional[Sequence[str]] = None,
        *,
        window: Optional[tuple[float, float]] = CT_ABDOMEN_WINDOW,
        percentiles: Optional[tuple[float, float]] = None,
        label_map: Optional[Mapping[int, int]] = None,
        orientation: Union[str, Sequence[str], None] = None,
        slice_axis: int = 2,
        transform: Optional[Transform] = None,
        max_cached_volumes: int = 2,
        max_voxels: Optional[int] = None,
    ) -> None:
        self._set_options(window, percentiles, label_map, orientation, slice_axis, transform, max_cached_volumes)
        self.root = Path(root)
        images_dir, labels_dir, found = _nifti_files(self.root)
        if cases is None and not found:
            raise FileNotFoundError(f"no .nii.gz / .nii images in {images_dir}")
        cases = sorted(found) if cases is None else [str(c) for c in cases]
        unknown = [c for c in cases if c not in found]
        if unknown:
            raise FileNotFoundError(f"cases {unknown[:5]} have no image in {images_dir} (found {len(found)} cases)")
        pairs: dict[str, tuple[Path, Path]] = {}
        for case in dict.fromkeys(cases):
            label_path = _label_path(labels_dir, case)
            if label_path is None:
                raise FileNotFoundError(f"no label for case {case!r}: expected {labels_dir / (case + '.nii.gz')}")
            pairs[case] = (found[case], label_path)
        self._index(cases, pairs, max_voxels)

    @classmethod
    def from_pairs(cls, pairs: Union[Mapping[str, tuple[PathLike, PathLike]], Sequence[tuple[str, PathLike, PathLike]]],
                   **options: Any):
        """The dataset of explicit ``(case, image file, label file)`` pairs (e.g. a datastore's items),
        read and cut exactly as from a folder; ``options`` as for the constructor (not ``root``/``cases``).

        ``dataset.root`` is the first image's folder. Raises ValueError for no pairs or a case named
        twice, FileNotFoundError for a missing file.
        """
        listed = list(pairs.items()) if isinstance(pairs, Mapping) else [(c, (i, lb)) for c, i, lb in pairs]
        if not listed:
            raise ValueError("no (case, image, label) pairs given; pass at least one")
        cases = [str(c) for c, _ in listed]
        paths = {str(c): (Path(i), Path(lb)) for c, (i, lb) in listed}
        for case, files in paths.items():
            for path in files:
                if not path.is_file():
                    raise FileNotFoundError(f"case {case!r}: {path} is no file")
        self = cls.__new__(cls)
        # The constructor's keyword options and their defaults, as it declares them.
        defaults = {p.name: p.default for p in inspect.signature(_NiftiDataset.__init__).parameters.values()
                    if p.kind is p.KEYWORD_ONLY}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(f"unknown options {unknown}; from_pairs takes {', '.join(defaults)}")
        given = {**defaults, **options}
        max_voxels = given.pop("max_voxels")
        self._set_options(**given)
        self.root = paths[cases[0]][0].parent
        self._index(cases, paths, max_voxels)
        return self

    def _set_options(self, window: Optional[tuple[float, float]], percentiles: Optional[tuple[float, float]],
                     label_map: Optional[Mapping[int, int]], orientation: Union[str, Sequence[str], None],
                     slice_axis: int, transform: Optional[Transform], max_cached_volumes: int) -> None:
        if window is not None and percentiles is not None:
            raise ValueError("give either window (CT) or percentiles (MR), not both; set the other to None")
        self.intensity = Intensity(window, percentiles)
        self.window, self.percentiles = self.intensity.window, self.intensity.percentiles
        self.label_map = _check_label_map(label_map)
        self.orientation = parse_orientation(orientation)
        self.slice_axis = check_slice_axis(slice_axis)
        if not isinstance(max_cached_volumes, int) or max_cached_volumes < 0:
            raise ValueError(f"max_cached_volumes must be a non-negative int, got {max_cached_volumes!r}")
        self.max_cached_volumes, self.transform = max_cached_volumes, transform

    def _index(self, cases: Sequence[str], pairs: Mapping[str, tuple[Path, Path]], max_voxels: Optional[int]) -> None:
        """Read the headers of every case's (image, label) pair and index its slices."""
        self.cases = [str(c) for c in cases]
        if len(set(self.cases)) != len(self.cases):
            raise ValueError("cases contains duplicate names; pass each case once")
        # Only headers are read here; voxel data stays on disk until a slice is asked for.
        self.images: dict[str, Any] = {}
        self.labels: dict[str, Any] = {}
        self.geometries: dict[str, SliceGeometry] = {}
        found = {case: pair[0] for case, pair in pairs.items()}
        for case in self.cases:
            label_path = pairs[case][1]
            image, label = nib.load(found[case]), nib.load(label_path)
            # The sizes the headers claim, before a voxel is read: a damaged or hostile 416-byte
            # file in a dataset may claim 16 GiB (the same bound as segment's).
            check_voxels(image.shape, max_voxels, found[case])
            check_voxels(label.shape, max_voxels, label_path, what="label image")
            if len(image.shape) != 3:
                raise ValueError(
                    f"{found[case]} has shape {image.shape}; expected a 3-D volume (split multi-channel 4-D images "
                    "into nnU-Net's <case>_0000.nii.gz, <case>_0001.nii.gz, ... files)"
                )
            if image.shape != label.shape:
                raise ValueError(f"image {found[case]} has shape {image.shape} but label {label_path} has {label.shape}; they must match")
            if axis_codes(image.affine) != axis_codes(label.affine):
                raise ValueError(
                    f"image {found[case]} is stored {''.join(axis_codes(image.affine))} but label {label_path} "
                    f"{''.join(axis_codes(label.affine))}; save the label on the image's voxel grid"
                )
            self.images[case], self.labels[case] = image, label
            self.geometries[case] = SliceGeometry.for_volume(image.shape, image.affine, self.orientation, self.slice_axis)
        # Start of each case in the flat slice index (used by NiftiSlices).
        self._offsets = np.cumsum([0] + [self.geometries[c].num_slices for c in self.cases])
        self._volumes: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bounds: dict[str, Optional[tuple[float, float]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a pickled copy under spawn: send the index, not cached volumes.
        return {**self.__dict__, "_volumes": OrderedDict()}

    def _read_image(self, case: str) -> np.ndarray:
        """The stored (I, J, K) voxels as float32, read as `segment` reads the file."""
        return nifti_voxels(self.images[case])

    def _cached_image(self, case: str) -> np.ndarray:
        if case not in self._volumes:
            self._volumes[case] = self._read_image(case)
        self._volumes.move_to_end(case)
        volume = self._volumes[case]
        while len(self._volumes) > self.max_cached_volumes:
            self._volumes.popitem(last=False)
        return volume

    def intensity_bounds(self, case: str, volume: Optional[np.ndarray] = None) -> Optional[tuple[float, float]]:
        """(lo, hi) mapped to (0, 1) for ``case``: the window, the volume's percentiles, or None.

        Percentiles are computed on first use per process; calling this for every case before
        starting DataLoader workers computes them once instead of once per worker.
        """
        if self.percentiles is None:
            return self.window
        if case not in self._bounds:
            self._bounds[case] = self.intensity.bounds(self._cached_image(case) if volume is None else volume)
        return self._bounds[case]

    def _normalise(self, case: str, raw: np.ndarray, volume: Optional[np.ndarray] = None) -> np.ndarray:
        return self.intensity.apply(raw, self.intensity_bounds(case, volume))

    def _remap(self, raw: np.ndarray, case: str) -> np.ndarray:
        label = as_int_label(raw, f"label of case {case!r}")
        if self.label_map is None:
            return label
        out = np.zeros_like(label)
        for source, target in self.label_map.items():
            out[label == source] = target
        return out

    def to_stored(self, case: str, slices: np.ndarray) -> np.ndarray:
        """(D, H, W) slices of ``case`` (e.g. predicted labels) -> the file's own (I, J, K) voxel grid."""
        return self.geometries[case].from_slices(slices)


class _Float32Slices:
    """Index a NIfTI image's voxels one plane at a time, scaled exactly as :func:`nifti_voxels`."""

    def __init__(self, image: Any) -> None:
        self.image = image

    def __getitem__(self, index: tuple) -> np.ndarray:
        return nifti_voxels(self.image, index)


def _check_label_map(label_map: Optional[Mapping[int, int]]) -> Optional[dict[int, int]]:
    if label_map is None:
        return None
    try:
        checked = {int(k): int(v) for k, v in dict(label_map).items()}
    except (TypeError, ValueError):
        raise ValueError(f"label_map must map raw int labels to new int labels, got {label_map!r}") from None
    if any(v < 0 for v in checked.values()):
        raise ValueError(f"label_map targets must be non-negative class indices, got {label_map!r}")
    return checked


class NiftiSlices(_NiftiDataset):
    """2-D slices drawn lazily from 3-D NIfTI volumes in the nnU-Net / MSD layout.

    Reads ``root/imagesTr/<case>.nii.gz`` (or
    nnU-Net's ``<case>_0000.nii.gz``) and ``root/labelsTr/<case>.nii.gz``; ``cases=None`` takes
    all (see :func:`find_nifti_cases`, :func:`split_cases`). Construction reads only headers, to
    index every (case, slice); an item reads one slice from disk, so volumes never sit in memory
    together. Slices are cut by :mod:`samed_adapter.volume.geometry`: each volume is reoriented to
    ``orientation`` (None: as stored) and slice ``k`` along ``slice_axis`` is laid out with rows
    along the later remaining axis (as stored, ``dataobj[:, :, k].T``, the layout of SAMed's
    preprocessed Synapse data and of what `segment` feeds the model).

    Intensities: ``window=(lo, hi)`` (CT) clips to [lo, hi] and scales to [0, 1];
    ``percentiles=(p_lo, p_hi)`` (MR; with ``window=None``) does the same between per-volume
    percentiles, computed from the whole volume on first use and cached per process (the volume
    goes to an LRU cache of ``max_cached_volumes`` and later slices are cut from it); both None:
    raw values. ``label_map`` (e.g. :data:`SYNAPSE_LABEL_MAP`) maps raw -> new labels, every
    unmapped label becoming 0. ``max_voxels`` (None: :data:`samed_adapter.io.DEFAULT_MAX_VOXELS`)
    bounds every image and label, checked from the headers before any voxel is read.

    Items: ``{"image": (H, W) float32, "label": (H, W) int64, "case": str, "slice": k}`` passed
    through ``transform``.
    """

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[str, int]:
        """Dataset index -> (case, slice index along ``slice_axis``)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} slices")
        index %= n
        i = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.cases[i], int(index - self._offsets[i])

    def __getitem__(self, index: int) -> Sample:
        case, k = self.locate(index)
        self.intensity_bounds(case)  # percentile mode: may load (and cache) the whole volume once
        geometry = self.geometries[case]
        if case in self._volumes:
            self._volumes.move_to_end(case)
            raw = geometry.slice(self._volumes[case], k)
        else:
            raw = geometry.slice(_Float32Slices(self.images[case]), k)
        label = self._remap(geometry.slice(self.labels[case].dataobj, k), case)
        return _apply(self.transform, {"image": self._normalise(case, raw), "label": label, "case": case, "slice": k})


class NiftiVolumes(_NiftiDataset):
    """Whole NIfTI volumes for evaluation; same layout and options as :class:`NiftiSlices`
    (``max_cached_volumes`` is unused: each volume is read once per item).

    Items: ``{"image": (D, H, W) float32, "label": (D, H, W) int64, "case": str,
    "spacing": (3,) float64 voxel sizes in (D, H, W) order, "affine": (4, 4) float64}``, the
    slices of :class:`NiftiSlices` (``image[k]`` is its slice k). The affine is the file's, for
    its stored voxel grid: ``dataset.to_stored(case, pred)`` puts predictions back on that grid.
    """

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> Sample:
        case = self.cases[index]
        raw = self._read_image(case)
        geometry = self.geometries[case]
        image = self._normalise(case, geometry.to_slices(raw), volume=raw)
        label = self._remap(geometry.to_slices(np.asarray(self.labels[case].dataobj)), case)
        nifti = self.images[case]
        sample = {
            "image": np.ascontiguousarray(image),
            "label": np.ascontiguousarray(label),
            "case": case,
            # The affine's voxel size, as statistics take it (a warning when pixdim says otherwise).
            "spacing": np.asarray(geometry.spacing(check_voxel_sizes(nifti.affine, nifti.header.get_zooms()[:3], case)),
                                  dtype=np.float64),
            "affine": np.asarray(nifti.affine, dtype=np.float64),
        }
        return _apply(self.transform, sample)
