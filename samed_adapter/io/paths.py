"""File names of images and label maps: suffixes (``.nii.gz`` as one) and the label file of an input;
whether a name is a Hub id or a local path."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

__all__ = ["READ_SUFFIXES", "WRITE_SUFFIXES", "image_stem", "image_suffix", "looks_like_repo_id", "output_path"]

#: Suffixes accepted by :func:`read_image` (a folder is read as a DICOM series, and so is a file
#: of any name holding ``DICM`` at byte 128).
READ_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".dcm", ".png", ".npy")
#: Suffixes accepted by :func:`write_labels`.
WRITE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".png", ".npy")


def image_suffix(path: Path) -> str:
    """Lower-case suffix, treating ``.nii.gz`` as one suffix."""
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def image_stem(path: Path) -> str:
    """File name without the suffix returned by :func:`image_suffix`."""
    suffix = image_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def output_path(
    input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], suffix: str | None = None
) -> Path:
    """Name the label file for ``input_path`` inside ``out_dir``.

    ``case.nii.gz -> out/case.nii.gz``, ``case.nii -> out/case.nii``,
    ``.png -> .png``, ``.npy -> .npy``; a DICOM series folder ``series1/``
    gives ``out/series1.nii.gz`` and ``slice.dcm`` gives ``out/slice.nii.gz``.
    ``suffix`` (e.g. ``".nii.gz"`` or ``"npy"``) overrides the output format.

    Raises:
        ValueError: for an unsupported suffix, or when the result would
            overwrite the input image itself.
    """
    src = Path(input_path)
    in_suffix = "" if src.is_dir() else image_suffix(src)
    stem = image_stem(src) if in_suffix else src.name
    if suffix is None:
        suffix = ".nii.gz" if in_suffix in ("", ".dcm") else in_suffix  # DICOM -> NIfTI
    suffix = "." + suffix.lower().lstrip(".")
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"cannot write labels as {suffix!r}; use one of {WRITE_SUFFIXES}")
    if not stem:
        raise ValueError(f"cannot derive an output name from {str(input_path)!r}")
    out = Path(out_dir) / (stem + suffix)
    if out.resolve() == src.resolve():
        raise ValueError(f"output {out} would overwrite the input image; choose another out_dir")
    return out


# "org/name" or "org/name@revision"; each name part as the Hub allows (letters, digits, - _ .).
_REPO_ID = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(\S+))?")
# A name ending like a file is a local path that is missing, not a Hub repository.
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pkl")


def looks_like_repo_id(text: Union[str, os.PathLike]) -> bool:
    """Whether `text` has the form of a Hub id, `"org/name"` or `"org/name@revision"`.

    Only strings qualify (a `pathlib.Path` is always a local path), and names that end like a
    file (`.safetensors`, `.pth`, ...) or start with `.`, `/` or `~` are taken as local paths.
    """
    if not isinstance(text, str):
        return False
    match = _REPO_ID.fullmatch(text)
    return bool(match) and not match.group(1).lower().endswith(_FILE_SUFFIXES)
