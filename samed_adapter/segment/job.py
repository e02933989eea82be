"""The segment job: one input and where its outputs go (:class:`Job`), what became of it
(:class:`InputResult`), and the search of files and folders for inputs.

The outputs of one scan (:mod:`.outputs`), the archive engines (:mod:`.pipeline`) and Ray Data
(:mod:`.ray_data`) all import this module; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

from ..io.paths import image_suffix

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..io.dicom_folders import DicomSeries
    from ..io.volume import Volume
    from .outputs import OutputOptions

__all__ = ["InputResult", "Job", "find_inputs", "find_jobs", "input_files", "select_part"]

_NIFTI = (".nii", ".nii.gz")
_NOT_DICOM = (".nii", ".nii.gz", ".png", ".npy", ".npz", ".json", ".txt", ".csv", ".md", ".jpg", ".jpeg", ".gz",
              ".zip", ".xml", ".pdf", ".py", ".html")


@dataclass
class Job:
    """One label file to write: from a file, a DICOM series folder, or one series of a folder."""

    source: str
    out: Path
    series: Optional["DicomSeries"] = None
    #: the output types this input can have when not all asked for can be made (a NIfTI input
    #: with ``nifti,dicom-seg`` gets no DICOM-SEG, nor with ``dicom-rtstruct`` an RTSTRUCT); None: as asked.
    output_types: Optional[tuple[str, ...]] = None

    @property
    def name(self) -> str:
        return f"{self.source} (series {self.series.name})" if self.series is not None else self.source

    @property
    def is_dicom(self) -> bool:
        """Whether the input is DICOM (a series folder, one series of a folder, or a DICOM file)."""
        from ..io.dicom_folders import is_dicom_file

        path = Path(self.source)
        return self.series is not None or path.is_dir() or image_suffix(path) == ".dcm" or is_dicom_file(path)

    def options(self, options: OutputOptions) -> OutputOptions:
        """``options`` as they apply to this input."""
        if self.output_types is None:
            return options
        return dataclasses.replace(options, output_types=self.output_types)

    def read(self, options: Optional[OutputOptions] = None) -> "Volume":
        """The input as a Volume, bounded by ``options.max_voxels``.

        An unevenly spaced DICOM series is read only when every output asked for references the
        source instances (a DICOM-SEG, an RTSTRUCT, an overlay); else it is an UnevenSpacingError, since one
        affine would put some of its slices where they were not.
        """
        from ..io import DEFAULT_MAX_VOXELS, read_dicom_series, read_image

        options = self.options(options) if options is not None else None
        limit = DEFAULT_MAX_VOXELS if options is None or options.max_voxels is None else options.max_voxels
        uneven = options is not None and "nifti" not in options.output_types and not (options.split or options.statistics)
        if self.series is not None:
            return read_dicom_series(self.series, Path(self.source), max_voxels=limit, allow_uneven=uneven)
        return read_image(self.source, max_voxels=limit, allow_uneven=uneven)


@dataclass
class InputResult:
    """What became of one job.

    ``status`` is "written", "skipped" (outputs existed and were made as asked: ``--continue``),
    "failed", or "ignored" (a DICOM file that is no slice of a volume, such as a CR image or a
    report, or a hidden NIfTI file that a folder search passes by: ``message`` says why). ``redone``: written again by ``--continue`` because the
    outputs there were made by another adapter or with other options.
    """

    name: str
    status: str
    files: list[Path] = field(default_factory=list)
    message: str = ""
    redone: bool = False


# --------------------------------------------------------------------------- finding inputs


@dataclass
class _Found:
    """What a search of the inputs gave: jobs, problems (inputs left out), and DICOM files that
    are not segmented, each with why (``"CR/6154: single projection image (CR): ..."``)."""

    jobs: list[Job] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _dicom_jobs(folder: Path, out: Path, found: _Found) -> int:
    """Add one job per segmentable series directly in ``folder`` (several give
    ``<out stem>_<number>_<description>`` files) and note the DICOM files in none.

    Returns how many series ``folder`` holds.
    """
    from ..io.dicom_folders import find_dicom

    dicom = find_dicom(folder)
    found.ignored.extend(f"{path}: {reason}" for path, reason in dicom.skipped)
    if len(dicom.series) == 1:
        found.jobs.append(Job(str(folder), out))
    elif dicom.series:
        stem = out.name[: -len(".nii.gz")]
        found.jobs.extend(Job(str(folder), out.with_name(f"{stem}_{s.name}.nii.gz"), s) for s in dicom.series)
    return len(dicom.series)


#: Why a folder search leaves a hidden NIfTI file out (said for each), locally and with --server alike.
_HIDDEN_NOTE = ("hidden (its name starts with '.'; macOS's ._ files beside copied scans hold no image), so a folder "
               "search leaves it out; name the file itself as an input to segment it")


def _hidden(path: Path) -> bool:
    """Whether a folder search passes ``path`` by: a name starting with '.' (``.git``, macOS's
    ``._ct.nii.gz``, our own records). A hidden file named as an input is segmented like any other."""
    return path.name.startswith(".")


def _real_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _walk(root: Path, out_dir: Path, rel: Path, found: _Found, seen: set[tuple[int, int]], skip: Path,
          top: Optional[str] = None) -> None:
    """Jobs below ``root``, their outputs at the same relative place under ``out_dir``.

    ``top`` (the folder given, by its real name): a series directly in it is one input named
    ``out_dir/<top>.nii.gz`` and its subfolders are not searched, as for a series folder. Each real folder is visited once (a symlink loop or a second link to a folder adds nothing),
    the output folder ``skip`` is never searched (its labels are not inputs of the next run), and
    a folder that cannot be listed is a problem of its own while the search goes on.
    """
    from ..io import output_path

    try:
        entries = sorted(root.iterdir())
    except OSError as err:
        found.problems.append(f"{root}: cannot list this folder ({err.strerror or err}); its scans are left out, "
                              "check its permissions")
        return
    folders = []
    for path in entries:
        if _hidden(path):
            if image_suffix(path) in _NIFTI and not path.is_dir():
                found.ignored.append(f"{path}: {_HIDDEN_NOTE}")
            continue
        try:
            if path.is_dir():
                key = _real_key(path)
                if key not in seen and path.resolve() != skip:
                    seen.add(key)
                    folders.append(path)
            elif image_suffix(path) in _NIFTI:
                found.jobs.append(Job(str(path), output_path(path, out_dir / rel)))
        except (OSError, ValueError) as err:
            found.problems.append(f"{path}: {err}")
    try:
        series = _dicom_jobs(root, out_dir / (str(rel) + ".nii.gz") if rel.parts else out_dir / f"{top}.nii.gz", found)
    except (OSError, ValueError) as err:
        found.problems.append(str(err) if str(root) in str(err) else f"{root}: {err}")
        series = 0
    if top is not None and series:
        return
    for folder in folders:
        _walk(folder, out_dir, rel / folder.name, found, seen, skip)


def find_inputs(inputs: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike]) -> _Found:
    """What a search of ``inputs`` gives (:func:`find_jobs`), with the DICOM files it leaves out and why."""
    from ..io import ImageReadError, output_path

    out_dir = Path(out_dir)
    skip = out_dir.resolve()
    found = _Found()
    for given in inputs:
        path = Path(given)
        try:
            if not path.exists():
                raise ImageReadError(f"{given}: no such file or folder")
            if path.is_file():
                found.jobs.append(Job(str(given), output_path(path, out_dir)))
                continue
            before = (len(found.jobs), len(found.problems), len(found.ignored))
            _walk(path, out_dir, Path(), found, {_real_key(path)}, skip, top=path.resolve().name)
            if len(found.jobs) == before[0] and len(found.problems) == before[1]:
                what = "no NIfTI files or DICOM series found in this folder or below"
                if len(found.ignored) > before[2]:
                    what += f"; {len(found.ignored) - before[2]} file(s) found and left out (listed above)"
                raise ImageReadError(f"{given}: {what}")
        except (ImageReadError, ValueError, OSError) as err:
            found.problems.append(str(err) if str(given) in str(err) else f"{given}: {err}")
    return found


def find_jobs(inputs: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike]) -> tuple[list[Job], list[str]]:
    """(jobs, problems) for files and folders.

    A file gives one job (``out_dir/<name>``). A folder that holds DICOM slices is a series (or
    several: one job each); any other folder is searched recursively for NIfTI files and DICOM
    series folders, whose outputs mirror their place below it (each real folder once, never the
    output folder). Inputs that cannot be used are reported in ``problems`` and left out.
    """
    found = find_inputs(inputs, out_dir)
    return found.jobs, found.problems


def select_part(jobs: Sequence[Job], num_parts: int, part_id: int) -> list[Job]:
    """This machine's share: every ``num_parts``-th job of the list sorted by output, from ``part_id``.

    The same inputs give the same split on every machine (nnU-Net's ``-num_parts``/``-part_id``).
    """
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"--num-parts must be a positive integer, got {num_parts!r}")
    if isinstance(part_id, bool) or not isinstance(part_id, int) or not 0 <= part_id < num_parts:
        raise ValueError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id!r}")
    ordered = sorted(jobs, key=lambda j: str(j.out))
    return ordered[part_id::num_parts]


def input_files(jobs: Sequence[Job], given: Sequence[Union[str, os.PathLike]]) -> dict[Path, str]:
    """Every file a run reads, by real path (symlinks followed): files named, found, and the files
    of every DICOM folder (a series' slices and whatever lies beside them)."""
    files: dict[Path, str] = {}
    for job in jobs:
        path = Path(job.source)
        if job.series is not None:
            files.update((Path(f).resolve(), str(f)) for f in job.series.files)
        elif path.is_dir():
            try:
                files.update((f.resolve(), str(f)) for f in path.iterdir() if f.is_file())
            except OSError:  # reported when it is read
                pass
        else:
            files[path.resolve()] = str(path)
    for item in given:
        if Path(item).is_file():
            files[Path(item).resolve()] = str(item)
    return files
