"""Segment a scan and write the files clinicians and pipelines use, for the CLI and for Python.

One input gives, next to its label file ``out/<name>.nii.gz`` (PNG/NPY for 2-D inputs):

- ``<name>_seg.dcm``: a DICOM Segmentation object over the source series (DICOM inputs);
- ``<name>_rtstruct.dcm``: a DICOM RT Structure Set, one contoured ROI per class (DICOM inputs);
- ``<name>_statistics.json``: per-class voxels, mm³, intensity mean/std and bounding box;
- ``<name>/<class>.nii.gz``: one binary mask per class, on the input's grid;
- ``<name>.npz``: the softmax of every class, float16, on the label file's grid, with its axes
  and (for NIfTI) affine recorded beside it (not nnU-Net's layout, which is (C, z, y, x) plus a
  pickle of properties);
- ``<name>_overlay.png``: axial slices with the labels drawn, in the radiological view.

Everything one input writes appears atomically and all together: a failure removes what that
input had written, so an existing file is always a complete one.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np

from ..io.files import atomic_path, held_lock, remove_stale_temporaries

if TYPE_CHECKING:  # pragma: no cover - typing only
    import nibabel as nib
    from segment_anything.modeling import Sam

    from ..adapter_file.adapter import Adapter
    from ..adapter_file.config import AdapterConfig
    from ..inference.stages import Prepared
    from ..io.volume import Volume
    from ..model import SAMed

__all__ = ["OUTPUT_TYPES", "OutputsBusyError", "OutputOptions", "claim_outputs", "lock_path", "output_files",
           "owns_outputs", "provenance", "record_path", "resolve_classes", "same_record", "segment_file",
           "writing_outputs", "write_outputs", "write_prepared"]

#: ``nifti``: the label file (PNG/NPY for 2-D inputs); ``dicom-seg``: a DICOM Segmentation;
#: ``dicom-rtstruct``: a DICOM RT Structure Set.
OUTPUT_TYPES = ("nifti", "dicom-seg", "dicom-rtstruct")
#: The output types that reference the instances of a DICOM series, and so need one as input.
DICOM_OUTPUT_TYPES = ("dicom-seg", "dicom-rtstruct")
#: Seconds an input waits for another run that is writing the same outputs, before it fails.
LOCK_TIMEOUT = 600.0


class OutputsBusyError(OSError):
    """Another run held an input's outputs for :data:`LOCK_TIMEOUT` seconds; nothing was written."""


@dataclass
class OutputOptions:
    """What `segment` writes for each input, and how it predicts.

    Attributes:
        output_types: any of :data:`OUTPUT_TYPES`.
        classes: class ids to keep (others become background in every output); None keeps all.
        statistics, split, save_probabilities, overlay: the extra files of the module docstring.
        batch_size, window, percentiles, preprocessed: as for :meth:`SAMed.segment`
            (``preprocessed=True``: the inputs are already in [0, 1]). ``window`` may also be
            the command line's text, ``"LO,HI"`` or ``"none"`` (the same as ``preprocessed=True``).
        adapter_name: how the DICOM-SEG and RTSTRUCT name the adapter (its file name or Hub id).
        max_voxels: the most voxels an input may hold, checked from its header before it is
            read (None: :data:`samed_adapter.io.DEFAULT_MAX_VOXELS`).
        record: what made the outputs (see :func:`provenance`); when set, it is written last,
            beside the label file as :func:`record_path`, so that ``--continue`` can tell
            outputs made by another adapter or with other options from its own.
    """

    output_types: Sequence[str] = ("nifti",)
    classes: Optional[Sequence[int]] = None
    statistics: bool = False
    split: bool = False
    save_probabilities: bool = False
    overlay: bool = False
    batch_size: int = 8
    window: Optional[tuple[float, float]] = None
    percentiles: Optional[tuple[float, float]] = None
    preprocessed: bool = False
    adapter_name: str = "adapter"
    record: Optional[dict[str, Any]] = None
    max_voxels: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.output_types, str):
            self.output_types = tuple(t.strip() for t in self.output_types.split(","))
        unknown = [t for t in self.output_types if t not in OUTPUT_TYPES]
        if unknown or not self.output_types:
            raise ValueError(f"output type {', '.join(unknown) or '(none)'} unknown; use {' or '.join(OUTPUT_TYPES)} "
                             "(several: nifti,dicom-seg)")
        if isinstance(self.window, str):
            from ..volume.preprocessing import WindowChoice

            choice = WindowChoice.parse(self.window)
            self.window, self.preprocessed = choice.bounds, self.preprocessed or choice.preprocessed
        if (self.window is not None or self.preprocessed) and self.percentiles is not None:
            raise ValueError("--window and --percentiles exclude each other; give one")
        if self.window is not None and self.preprocessed:
            raise ValueError("preprocessed inputs take no window; give one of window and preprocessed=True")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        if self.max_voxels is not None and (isinstance(self.max_voxels, bool) or not isinstance(self.max_voxels, int)
                                            or self.max_voxels < 1):
            raise ValueError(f"--max-voxels must be a positive integer, got {self.max_voxels!r}")

    def scaling(self) -> dict[str, Any]:
        """The intensity keyword arguments of :func:`samed_adapter.inference.stages.prepare_volume`."""
        return {"window": self.window, "percentiles": self.percentiles, "preprocessed": self.preprocessed}

    def preparing(self) -> dict[str, Any]:
        """Every keyword argument of :func:`samed_adapter.inference.stages.prepare_volume`."""
        return {**self.scaling(), "max_voxels": self.max_voxels}


def _stem(label_path: Path) -> str:
    from ..io.paths import image_stem

    return image_stem(label_path)


def _suffix(label_path: Path) -> str:
    from ..io.paths import image_suffix

    return image_suffix(label_path)


def class_file_name(name: str, label: int, taken: set[str]) -> str:
    """A file-name-safe form of a class name (``right kidney`` -> ``right_kidney``), unique in ``taken``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or f"class_{label}"
    if safe.lower() in taken:
        safe = f"{safe}_{label}"
    taken.add(safe.lower())
    return safe


def output_files(label_path: Path, options: OutputOptions, class_names: Sequence[str]) -> list[Path]:
    """Every file `write_outputs` writes for an input whose label file is ``label_path``."""
    stem, suffix, parent = _stem(label_path), _suffix(label_path), label_path.parent
    files = [label_path] if "nifti" in options.output_types else []
    if "dicom-seg" in options.output_types:
        files.append(parent / f"{stem}_seg.dcm")
    if "dicom-rtstruct" in options.output_types:
        files.append(parent / f"{stem}_rtstruct.dcm")
    if options.statistics:
        files.append(parent / f"{stem}_statistics.json")
    if options.split:
        taken: set[str] = set()
        for c in _kept(options, len(class_names)):
            files.append(parent / stem / f"{class_file_name(class_names[c - 1], c, taken)}{suffix}")
    if options.save_probabilities:
        files.append(parent / f"{stem}.npz")
    if options.overlay:
        files.append(parent / f"{stem}_overlay.png")
    if options.record is not None:
        files.append(record_path(label_path))
    return files


def record_path(label_path: Path) -> Path:
    """Where the record of what made ``label_path``'s outputs lives: a hidden sibling JSON file.

    Hidden so that archive searches and viewers pass it by; beside the outputs (not one file
    per folder) so that machines splitting an archive with ``--num-parts`` never write one file.
    """
    return label_path.parent / f".{_stem(label_path)}.samed-adapter.json"


def provenance(adapter: "Adapter", options: OutputOptions, **labels_options: Any) -> dict[str, Any]:
    """What makes the labels of `segment` what they are, as JSON: compared by ``--continue``.

    The adapter by content (:attr:`Adapter.fingerprint`, not its file name, which a retrained
    adapter keeps), the outputs asked for, every option that changes a label or probability,
    and ``labels_options`` (e.g. ``allow_base_mismatch``). The tool's version is recorded but
    not compared: a new version gives the same labels unless its notes say otherwise.
    """
    return {
        "adapter": options.adapter_name,
        "adapter_fingerprint": adapter.fingerprint,
        "base_fingerprint": adapter.base_fingerprint,
        "output_types": list(options.output_types),
        "classes": None if options.classes is None else [int(c) for c in options.classes],
        "window": None if options.window is None else [float(v) for v in options.window],
        "percentiles": None if options.percentiles is None else [float(v) for v in options.percentiles],
        "preprocessed": bool(options.preprocessed),
        "statistics": options.statistics, "split": options.split,
        "save_probabilities": options.save_probabilities, "overlay": options.overlay,
        **labels_options,
    }


def same_record(label_path: Path, record: dict[str, Any]) -> bool:
    """Whether ``label_path``'s record says its outputs were made as ``record`` would make them.

    A missing or unreadable record counts as made otherwise (outputs of another tool or version).
    The adapter's name and the tool's version are recorded for people, not compared: the same
    adapter named by another path makes the same labels.
    """
    found = _read_record(label_path)
    ignored = ("version", "adapter")
    return found is not None and ({k: v for k, v in found.items() if k not in ignored}
                                  == {k: v for k, v in record.items() if k not in ignored})


def _read_record(label_path: Path) -> Optional[dict[str, Any]]:
    try:
        found = json.loads(record_path(label_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and "adapter_fingerprint" in found else None


def owns_outputs(label_path: Path) -> bool:
    """Whether a record beside ``label_path`` says samed-adapter writes its outputs: files there
    are ours to make again, any other file at a planned path is somebody's (a manual
    segmentation, another tool's result) and is kept unless the caller asks to overwrite."""
    return _read_record(label_path) is not None


def claim_outputs(label_path: Path, record: dict[str, Any]) -> Path:
    """Write ``label_path``'s record as pending, before any of its outputs: a run stopped between
    two outputs leaves files that :func:`owns_outputs` still calls ours, and that ``--continue``
    makes again (a pending record never matches :func:`same_record`). The finished record
    replaces it last."""
    from ..version import __version__

    label_path.parent.mkdir(parents=True, exist_ok=True)
    return _write_json({**record, "version": __version__, "pending": True}, record_path(label_path))


def lock_path(label_path: Path) -> Path:
    """The lock file two runs writing ``label_path``'s outputs take turns on (hidden; it exists
    only while one of them writes)."""
    return label_path.parent / f".{_stem(label_path)}.samed-adapter.lock"


@contextmanager
def writing_outputs(label_path: Path, planned: Sequence[Path],
                    record: Optional[dict[str, Any]]) -> Iterator[list[Path]]:
    """Hold ``label_path``'s outputs while one input writes them: ``with writing_outputs(...) as
    written: ...`` (append each file to ``written`` as it lands).

    Under the lock (:func:`lock_path`) a second run, local, on Ray or via ``--server``, waits
    before it writes any of them, so the label file and the record beside it always come from
    one run (two runs writing in turns gave one's labels beside the other's record). Under it,
    the temporaries a killed writer left are removed and the pending record is written
    (:func:`claim_outputs`); on any error the files in ``written`` are removed, and the claim
    if nothing planned is left.

    Raises:
        OutputsBusyError: another run held them for :data:`LOCK_TIMEOUT` seconds.
    """
    label_path.parent.mkdir(parents=True, exist_ok=True)
    held = False
    try:
        with held_lock(lock_path(label_path), timeout=LOCK_TIMEOUT):
            held = True
            for path in planned:
                remove_stale_temporaries(path)  # safe now: no other writer of these paths runs
            written: list[Path] = []
            if record is not None:
                claim_outputs(label_path, record)
            try:
                yield written
            except BaseException:
                _undo(label_path, planned, written, record is not None)
                raise
    except TimeoutError:
        if held:  # the writing's own (a slow disk, a socket), not the lock's
            raise
        raise OutputsBusyError(f"{label_path}: another samed-adapter run has been writing this input's outputs for "
                               f"{LOCK_TIMEOUT:.0f} s (it holds {lock_path(label_path)}); nothing was written for it: "
                               "let that run finish, then run again with --continue") from None


def _undo(label_path: Path, planned: Sequence[Path], written: Sequence[Path], claimed: bool) -> None:
    """All or nothing per input: remove what this input wrote (and its claim, on nothing left)."""
    for path in written:
        path.unlink(missing_ok=True)
    if claimed and not any(p.exists() for p in planned[:-1]):
        record_path(label_path).unlink(missing_ok=True)
    split_dir = label_path.parent / _stem(label_path)
    if split_dir.is_dir() and split_dir in {p.parent for p in planned} and not any(split_dir.iterdir()):
        split_dir.rmdir()


def _kept(options: OutputOptions, num_classes: int) -> list[int]:
    return sorted(options.classes) if options.classes is not None else list(range(1, num_classes + 1))


def resolve_classes(names: Union[str, Sequence[str], None], class_names: Sequence[str]) -> Optional[list[int]]:
    """``"liver,spleen"`` -> their class ids in the adapter; None keeps every class.

    Raises:
        ValueError: a name the adapter does not have (the message lists the ones it has).
    """
    if names is None:
        return None
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    lookup = {n.lower(): i for i, n in enumerate(class_names, start=1)}
    # The names --split gives its files (white_matter for "white matter") are accepted too, so a
    # name copied from an output file works; a class's own name wins if the two forms collide.
    taken: set[str] = set()
    for i, n in enumerate(class_names, start=1):
        lookup.setdefault(class_file_name(n, i, taken).lower(), i)
    unknown = [n for n in wanted if n.lower() not in lookup]
    if unknown or not wanted:
        raise ValueError(f"--classes names {', '.join(map(repr, unknown)) or 'no class'}; this adapter's classes are "
                         f"{', '.join(class_names)}")
    return sorted({lookup[n.lower()] for n in wanted})


def _write_json(data: Any, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    return path


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with atomic_path(path) as tmp, open(tmp, "xb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def write_outputs(model: "SAMed", volume: "Volume", label_path: Union[str, os.PathLike],
                  options: OutputOptions) -> tuple[np.ndarray, list[Path]]:
    """Segment ``volume`` and write every output ``options`` asks for.

    Returns:
        (labels in ``volume.array``'s layout, after ``options.classes``; the files written).
        On any error the files this call wrote are removed before the error propagates.
    """
    from ..inference import stages as inference

    prepared = inference.prepare_volume(model.config, volume, **options.preparing())
    labels, probs = inference.predict_prepared(model, prepared, options.batch_size, options.save_probabilities)
    for message in prepared.messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    return write_prepared(prepared, labels, probs, label_path, options, model.config, return_labels=True)


def _digest(options: OutputOptions) -> Optional[str]:
    """What the DICOM results record of the labels' making, for ``--dicomweb --continue``."""
    from ..io.dicom_derived import labels_digest

    return None if options.record is None else labels_digest(options.record)


def write_prepared(prepared: "Prepared", labels: np.ndarray, probs: Optional[np.ndarray],
                   label_path: Union[str, os.PathLike], options: OutputOptions, config: "AdapterConfig",
                   *, return_labels: bool = False):
    """Stage 3 and the files: put (D, H, W) slice labels (and (D, C, H, W) probabilities) back on
    the scan's grid and write every output ``options`` asks for.

    Returns the files written (and, with ``return_labels``, the labels in ``volume.array``'s
    layout first). On any error the files this call wrote are removed before the error propagates.
    """
    from ..inference import stages as inference
    from ..io import overlay_volume, write_labels
    from ..volume.preprocessing import Intensity
    from .statistics import label_statistics

    label_path = Path(label_path)
    volume = prepared.volume
    names = list(config.class_names or [])
    restored = inference.restore(prepared, labels, probs)
    labels, probs = restored if probs is not None else (restored, None)
    kept = _kept(options, len(names))
    if options.classes is not None:
        labels = np.where(np.isin(labels, kept), labels, 0).astype(labels.dtype)
    planned = output_files(label_path, options, names)
    files = iter(planned)
    with writing_outputs(label_path, planned, options.record) as written:
        if "nifti" in options.output_types:
            written.append(write_labels(labels, volume, next(files)))
        # The fingerprint and digest (of the record of a segment job) let --dicomweb --continue know
        # our SEG and RTSTRUCT, made as this run makes them.
        dicom = dict(adapter_name=options.adapter_name, classes=kept, labels_digest=_digest(options),
                     adapter_fingerprint=(options.record or {}).get("adapter_fingerprint"))
        if "dicom-seg" in options.output_types:
            from ..io.dicom_seg import write_dicom_seg

            written.append(write_dicom_seg(labels, volume, names, next(files), **dicom))
        if "dicom-rtstruct" in options.output_types:
            from ..io.rtstruct import write_rtstruct

            written.append(write_rtstruct(labels, volume, names, next(files), **dicom))
        if options.statistics:
            stats = label_statistics(labels, volume, names)
            written.append(_write_json({n: stats[n] for n in (names[c - 1] for c in kept)}, next(files)))
        if options.split:
            for c in kept:
                written.append(write_labels((labels == c).astype(np.uint8), volume, next(files)))
        if probs is not None:
            # On the label file's grid: a NIfTI's voxel order, else the array's own layout. The
            # axes (and a NIfTI's affine) travel in the file, so nobody has to guess them.
            nifti = label_path.name.lower().endswith((".nii", ".nii.gz"))
            grid = np.stack([volume.to_voxels(p) for p in probs]) if nifti else probs
            axes = ("class", "i", "j", "k")[: grid.ndim] if nifti else \
                ("class", *("slice", "row", "column")[4 - grid.ndim:])
            extra = {"affine": np.asarray(volume.affine, dtype=np.float64)} if nifti else {}
            written.append(_write_npz(next(files), probabilities=grid, class_names=np.array(["background", *names]),
                                      axes=np.array(axes), **extra))
        if options.overlay:
            scaling = options.scaling()
            intensity = Intensity.from_config(config, scaling["window"], scaling["percentiles"])
            written.append(overlay_volume(volume, labels, names, next(files), intensity=intensity))
        if options.record is not None:  # last: its presence says every other output is complete
            from ..version import __version__

            written.append(_write_json({**options.record, "version": __version__}, next(files)))
    return (labels, written) if return_labels else written


def _check_spares_input(input: Union[str, os.PathLike], label_path: Path, options: OutputOptions,
                        class_names: Sequence[str]) -> None:
    """ValueError when an output of ``label_path`` is the input or one of its files (symlinks followed),
    before anything is read or written: ``segment_file("ct.nii.gz", "ct.nii.gz")`` would replace the scan."""
    from .job import Job, input_files

    reads = input_files([Job(source=os.fspath(input), out=label_path)], [input])
    hit = next((o for o in output_files(label_path, options, class_names) if o.resolve() in reads), None)
    if hit is not None:
        raise ValueError(f"output {hit} would overwrite the input {reads[hit.resolve()]}; nothing was written: "
                         "choose another output path")


def segment_file(
    input: Union[str, os.PathLike, "nib.spatialimages.SpatialImage"],
    output: Union[str, os.PathLike, None] = None,
    *,
    sam: Union["Sam", str, os.PathLike],
    adapter: Union["Adapter", str, os.PathLike],
    device: str = "cpu",
    merge: bool = False,
    allow_base_mismatch: bool = False,
    **options: Any,
) -> "nib.Nifti1Image":
    """Segment one scan, as `samed-adapter segment` does, and return its labels.

    Args:
        input: a path (NIfTI, DICOM series folder, PNG, NPY) or a nibabel image.
        output: the label file to write (``.nii.gz``, ...), with any extra outputs beside it
            (``statistics=True``, ``split=True``, ``save_probabilities=True``,
            ``output_types="nifti,dicom-seg,dicom-rtstruct"``, ``classes="liver,spleen"``, ``overlay=True``,
            ``window``, ``percentiles``, ``preprocessed``, ``batch_size``: see :class:`OutputOptions`); None
            writes nothing.
        sam: a stock SAM (left as it was found) or its checkpoint file.
        adapter: an adapter file, Hub id or :class:`~samed_adapter.Adapter`.

    Returns:
        The labels as a ``nibabel.Nifti1Image`` on the input's grid (its shape, affine, header).

    For many files, patch once (``model = samed_adapter.patch(sam, adapter)``) and call
    ``model.segment`` (or use the command line), instead of patching per file here.
    """
    import nibabel as nib

    from ..adapter_file.adapter import Adapter
    from ..io.nifti import label_nifti, volume_from_nifti
    from ..io.volumes import read_image
    from ..patching import patch, unpatch
    from ..surgery.structure import get_stock_state

    if isinstance(sam, (str, os.PathLike)):
        from ..hosts.backbones import load_stock_sam

        sam = load_stock_sam(sam)
    names = options.pop("classes", None)
    options.setdefault("adapter_name", os.fspath(adapter) if isinstance(adapter, (str, os.PathLike)) else "adapter")
    adapter = adapter if isinstance(adapter, Adapter) else Adapter.load(adapter)
    was_patched = get_stock_state(sam) is not None
    model = patch(sam.to(device), adapter, merge=merge, allow_base_mismatch=allow_base_mismatch)
    try:
        opts = OutputOptions(classes=resolve_classes(names, model.config.class_names or []), **options)
        # The record a `segment` run writes: its later runs into this folder know these files as ours.
        opts.record = provenance(adapter, opts, allow_base_mismatch=bool(allow_base_mismatch))
        if output is not None and isinstance(input, (str, os.PathLike)):
            _check_spares_input(input, Path(output), opts, model.config.class_names or [])
        volume = volume_from_nifti(input) if isinstance(input, nib.spatialimages.SpatialImage) else read_image(input)
        if output is None:
            labels = model.segment(volume, batch_size=opts.batch_size, **opts.scaling())
            if opts.classes is not None:
                labels = np.where(np.isin(labels, opts.classes), labels, 0).astype(labels.dtype)
        else:
            labels, _ = write_outputs(model, volume, output, opts)
        return label_nifti(labels, volume)
    finally:
        if not was_patched:
            unpatch(sam)
