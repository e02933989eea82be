"""What a DICOM object derived from a series (a SEG, an RT Structure Set) shares with its source:
the source headers, the label stack in slice order, the classes written, text values, numbering.

Used by :mod:`.dicom_seg` and :mod:`.rtstruct`, so that both refuse the same inputs with the same
words and join the source's study the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .volume import Volume

#: AlgorithmName of every segment, and maker of every structure set, written here.
ALGORITHM_NAME = "samed-adapter"

# A derived object joins its source's study and frame of reference: without these it cannot.
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
               "FrameOfReferenceUID")
# Patient and study attributes highdicom copies; DICOM lets them be empty (type 2), and
# de-identification tools sometimes drop them altogether.
COPIED_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")

#: What in a segment job's record (segment.outputs.provenance) changes no label of a SEG or RTSTRUCT.
_NOT_LABELS = ("version", "adapter", "pending", "output_types", "statistics", "split", "save_probabilities",
               "overlay")


def labels_digest(record: dict[str, Any]) -> str:
    """``sha256:<16 hex>`` of what in ``record`` changes the labels: the adapter by fingerprint, the
    classes kept, the intensity options, and any option added to the record later.

    A SEG records it in each segment's AlgorithmParameters (``labels=``), an RTSTRUCT in its
    StructureSetDescription, so that ``segment --dicomweb --continue`` takes a result on a server
    as done only where this run would make the same labels (what a local ``--continue`` reads
    from the record beside the files).
    """
    import hashlib
    import json

    kept = {key: value for key, value in record.items() if key not in _NOT_LABELS}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


NO_SERIES = ("{kind} needs a DICOM series input ({what}); "
             "write NIfTI (.nii.gz) labels for NIfTI, PNG and NPY inputs")


def dicom_text(text: str) -> str:
    """``text`` as a valid LO value: at most 64 characters, no ``\\`` (the value separator)."""
    return " ".join(str(text).replace("\\", "/").split())[:64]


def adapter_label(adapter_name: str | os.PathLike[str]) -> str:
    """How a file made for others names the adapter: a Hub id as given, a local adapter by its
    file (or folder) name alone.

    The path an adapter was loaded from (a home folder, a mount point) says where the file was
    made, which is no reader's business; the fingerprint recorded beside the name identifies the
    adapter itself.
    """
    from .paths import looks_like_repo_id

    text = os.fspath(adapter_name)
    if looks_like_repo_id(text) and not os.path.exists(text):
        return text
    return re.split(r"[\\/]", text.rstrip("/\\"))[-1] or text


def require_series(volume: Volume, kind: str = "DICOM-SEG") -> None:
    """Raise unless ``volume`` was read from DICOM slices (only those can be referenced)."""
    if not volume.files:
        raise ValueError(NO_SERIES.format(kind=kind, what=f"{volume.source or 'the volume'} has no "
                                                          "DICOM slice files (Volume.files is empty)"))


def slice_stack(labels: Any, volume: Volume, kind: str = "DICOM-SEG") -> np.ndarray:
    """``labels`` checked against ``volume`` and viewed as ``(D, H, W)`` (one frame per file)."""
    require_series(volume, kind)
    labels = np.asarray(labels)
    if labels.shape != volume.array.shape:
        raise ValueError(f"labels shape {labels.shape} does not match image shape "
                         f"{volume.array.shape}; pass labels in the layout of Volume.array")
    return labels.reshape((len(volume.files), *labels.shape[-2:]))


def class_ids(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``labels`` as int64 class ids, each in 0..num_classes; else a ValueError saying why."""
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating) and not (labels == np.round(labels)).all():
        raise ValueError("labels hold non-integer values; take argmax/round to class ids first")
    lo, hi = (labels.min(), labels.max()) if labels.size else (0, 0)
    if lo < 0 or hi > num_classes:
        raise ValueError(f"labels range [{lo}, {hi}] is outside 0..{num_classes}: class_names "
                         f"names {num_classes} classes (1..{num_classes}); pass one name per class")
    return labels.astype(np.int64)


def chosen_classes(classes: Optional[Sequence[int]], num_classes: int) -> list[int]:
    """The class ids to write, sorted: ``classes`` checked against 1..num_classes."""
    if num_classes < 1:
        raise ValueError("class_names is empty; give one name per foreground class")
    if classes is None:
        return list(range(1, num_classes + 1))
    chosen = sorted({int(c) for c in classes})
    if not chosen or chosen[0] < 1 or chosen[-1] > num_classes:
        raise ValueError(f"classes {list(classes)} must be a non-empty subset of "
                         f"1..{num_classes} (0 is background and gets no segment)")
    return chosen


def source_header(path: Path, step: float, kind: str = "DICOM-SEG") -> Any:
    """The header of source slice ``path``, ready for highdicom (pixel data is not needed).

    ``step`` (mm between slices) stands in for a missing SliceThickness: the SEG's
    pixel measures need one, and each label voxel covers one step.
    """
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    missing = [tag for tag in SOURCE_UIDS if not ds.get(tag)]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}, which a {kind} must share with "
                         "its source series; write NIfTI for this input instead")
    for tag in COPIED_TYPE2:
        if tag not in ds:
            setattr(ds, tag, "")  # present but empty: "unknown", as the standard allows
    if not ds.get("SliceThickness"):
        ds.SliceThickness = f"{step:.6g}"
    return ds


def derived_series_number(first: Any) -> int:
    """The source's SeriesNumber + 1000, so viewers list the SEG after, and near, its source."""
    try:
        number = int(first.get("SeriesNumber") or 0)
    except (TypeError, ValueError):  # malformed IS: any number will do
        number = 0
    return number + 1000 if 0 <= number < 2**31 - 1001 else 1000
