"""What a request brings: its upload in a private folder (:mod:`.folders`), a zipped DICOM series
unpacked with care, and its options checked into :class:`~samed_adapter.segment.outputs.OutputOptions`.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import stat
import struct
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Optional

from ..io.paths import image_suffix
from .errors import BadRequestError, PayloadTooLargeError, RequestTimeoutError, UnprocessableError

#: the uploads a request may carry: a NIfTI volume, or a zip of one DICOM series.
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".zip")
#: a zip of a DICOM series holds one file per slice; more members than this is not one series.
MAX_ZIP_MEMBERS = 20_000
#: how answers name the uploaded file (its path here is a private temporary one).
UPLOAD = "the upload"
_MAX_MESSAGES = 60_000  # a zip comment holds 65535 bytes
# The zip records read before zipfile parses anything (PKWARE APPNOTE 4.3.12-4.3.16): the end of
# central directory record, the zip64 locator just before it and the zip64 record before that,
# and the fixed part of one central directory header (its name, extra and comment follow it).
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def bound_body(request: Any, seconds: float) -> None:
    """Give ``request``'s body ``seconds`` from now to arrive: a read of it after that raises
    :class:`RequestTimeoutError` (408), so that a client that declares a body and stalls frees its
    slot instead of holding it until it closes (``serve --body-timeout``).

    Starlette reads every body (a form, JSON, a stream) through the request's ``_receive``, the
    ASGI channel, so the deadline is put there; once the last part of the body came, reads pass.
    """
    receive = request._receive
    deadline = time.monotonic() + seconds
    arrived = False

    async def bounded() -> dict[str, Any]:
        nonlocal arrived
        if arrived:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"the request's body did not arrive within {seconds:g} s (this server's "
                                      "--body-timeout); send it again, on a faster link, or ask for a longer "
                                      "samed-adapter serve --body-timeout") from None
        arrived = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    request._receive = bounded


def too_large(message: str, source: Path) -> PayloadTooLargeError:
    """A scan over the voxel limit, worded for a client: the limit is the server's to raise, so the
    local hint (``--max-voxels (Python: max_voxels=)``) becomes the server's flag."""
    text = message.replace(str(source), UPLOAD)
    text = re.sub(r"(the limit with )?--max-voxels \((Python: )?max_voxels=\)",
                  "the server's limit (samed-adapter serve --max-voxels)", text)
    return PayloadTooLargeError(text)


def upload_suffix(filename: Optional[str]) -> str:
    """The suffix of an upload's name, if it is one the server reads (else 422 naming them)."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    suffix = image_suffix(Path(name)) if name else ""
    if suffix not in UPLOAD_SUFFIXES:
        raise UnprocessableError(f"the upload {name or '(no file name)'!r} is not a NIfTI volume (.nii, .nii.gz) or a "
                                 "zip of one DICOM series (.zip); send one of those, named with its suffix")
    return suffix


def upload_stem(filename: Optional[str]) -> str:
    """The upload's name without folders and suffix, for naming the outputs (``input`` if unusable)."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    suffix = image_suffix(Path(name)) if name else ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem).strip("._")
    return safe or "input"


def unpack_series(archive: Path, into: Path, *, max_bytes: int) -> Path:
    """Extract a zip of one DICOM series into ``into`` and return that folder.

    Refused (nothing extracted): members with an absolute path or ``..``, links, more than
    :data:`MAX_ZIP_MEMBERS` members (counted before zipfile parses the zip), or more than ``max_bytes`` once inflated (the sizes the
    zip declares; zipfile stops each member at its declared size and checks its CRC).
    """
    check_zip_entries(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                raise _too_many(str(len(members)))
            total = 0
            for member in zf.infolist():
                path = PurePosixPath(member.filename.replace("\\", "/"))
                if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
                    raise BadRequestError(f"the zip member {member.filename!r} has an absolute path or '..'; zip the "
                                          "series folder with relative names (e.g. `zip -r series.zip series/`)")
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise BadRequestError(f"the zip member {member.filename!r} is a link; zip the files themselves")
                total += member.file_size
            if total > max_bytes:
                raise PayloadTooLargeError(f"the zip inflates to {total / 2**20:.0f} MiB, over this server's limit of "
                                           f"{max_bytes / 2**20:.0f} MiB; send a smaller series")
            if not members:
                raise UnprocessableError("the zip holds no files; send a zip of one DICOM series")
            into.mkdir()
            for i, member in enumerate(members):
                # Flat, numbered names: what a member is called inside the zip never becomes a path here.
                with zf.open(member) as src, open(into / f"{i:06d}.dcm", "xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as err:
        raise UnprocessableError(f"the upload is not a readable zip ({err}); send a zip of one DICOM series") from None
    return into


def _too_many(count: str) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the zip holds {count} files, more than a series ({MAX_ZIP_MEMBERS}); send one "
                                "DICOM series per request")


def check_zip_entries(archive: Path) -> None:
    """Refuse (413) a zip of more than :data:`MAX_ZIP_MEMBERS` entries before zipfile parses it.

    :class:`zipfile.ZipFile` builds an object for every entry of the central directory before the
    count can be checked (a 47 MB zip of a million entries costs 0.4 GB), so the count is read
    from the end record (zip64's where there is one), and the central directory's headers are
    then stepped over, at most ``MAX_ZIP_MEMBERS + 1`` of them, since zipfile reads as many as
    fit in the directory's size whatever count the record gives. It reads at most 64 KiB at once.
    A file with no end record is not a zip (422).
    """
    with open(archive, "rb") as f:
        count, start, size = _central_directory(f)
        if count > MAX_ZIP_MEMBERS:
            raise _too_many(str(count))
        f.seek(start)
        walked = read = 0
        while read < size:
            head = f.read(_CENTRAL.size)
            if len(head) < _CENTRAL.size or head[:4] != b"PK\x01\x02":
                return  # not a central directory header: zipfile says what is wrong (422)
            fields = _CENTRAL.unpack(head)
            skip = fields[10] + fields[11] + fields[12]  # the name's, extra field's and comment's lengths
            f.seek(skip, 1)
            read += _CENTRAL.size + skip
            walked += 1
            if walked > MAX_ZIP_MEMBERS:  # the end record understates the count
                raise _too_many(f"more than {MAX_ZIP_MEMBERS}")


def _central_directory(f: BinaryIO) -> tuple[int, int, int]:
    """(entries, start, size) of the central directory of the zip open as ``f``, from its end
    record, located as zipfile locates it: the directory ends where the end record (or the zip64
    record before it) begins, whatever offset the record gives (data may precede the zip)."""
    end = f.seek(0, 2)
    f.seek(max(0, end - _EOCD.size - 0xFFFF))  # the record, then a comment of up to 65535 bytes
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise UnprocessableError("the upload is not a readable zip (no end of central directory); send a zip of one "
                                 "DICOM series")
    location = end - len(tail) + at
    _, _, _, _, count, size, _, _ = _EOCD.unpack_from(tail, at)
    if location >= _EOCD64_LOCATOR.size + _EOCD64.size:
        f.seek(location - _EOCD64_LOCATOR.size - _EOCD64.size)
        record, locator = f.read(_EOCD64.size), f.read(_EOCD64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07" and record[:4] == b"PK\x06\x06":
            _, _, _, _, _, _, _, count, size, _ = _EOCD64.unpack(record)
            location -= _EOCD64_LOCATOR.size + _EOCD64.size
    return count, max(0, location - size), size


def flag(form: Any, name: str, default: bool = False) -> bool:
    value = form.get(name)
    if value is None:
        return default
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadRequestError(f"{name}={value!r}: give true or false")


def text(form: Any, name: str) -> Optional[str]:
    value = form.get(name)
    if value is None or not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def segment_options(form: Any, *, dicom: bool) -> dict[str, Any]:
    """The keyword arguments of :func:`samed_adapter.segment.pipeline.check_request` for a
    ``POST /v1/segment`` form, named as the command line's options."""
    from ..volume.preprocessing import WindowChoice, parse_bounds

    options: dict[str, Any] = {
        "output_types": text(form, "output_type") or "nifti",
        "classes": text(form, "classes"),
        "statistics": flag(form, "statistics"),
        "split": flag(form, "split"),
        "save_probabilities": flag(form, "probabilities"),
        "overlay": flag(form, "overlay"),
    }
    window, percentiles = text(form, "window"), text(form, "percentiles")
    try:
        if window is not None:
            choice = WindowChoice.parse(window)
            options.update(window=choice.bounds, preprocessed=choice.preprocessed)
        if percentiles is not None:
            options["percentiles"] = parse_bounds(percentiles)
    except ValueError as err:
        raise BadRequestError(f"{'window' if window is not None else 'percentiles'}: {err}") from None
    types = [t.strip() for t in options["output_types"].split(",")]
    if not dicom and any(t.startswith("dicom") for t in types):
        raise BadRequestError(f"output_type={options['output_types']} needs a DICOM series (a .zip); a NIfTI upload "
                              "gives output_type=nifti")
    return options


def params_json(value: Any, example: str = "params={}") -> dict[str, Any]:
    """MONAI Label's ``params`` (a form field's text, or a request body's bytes): a JSON object
    (400 otherwise, naming ``example``); nothing is ``{}``."""
    if value is None or value == "" or value == b"":
        return {}
    try:
        params = json.loads(value)
    except (TypeError, ValueError):  # UnicodeDecodeError is a ValueError
        raise BadRequestError(f"params must be a JSON object, e.g. {example}") from None
    if not isinstance(params, dict):
        raise BadRequestError(f"params must be a JSON object, e.g. {example}")
    return params


def label_name(value: Any, stem: str) -> str:
    """The label file's name: the form field ``name`` (a plain NIfTI file name) or ``<stem>.nii.gz``."""
    if value is None or value == "":
        return f"{stem}.nii.gz"
    name = str(value)
    if PurePosixPath(name).name != name or name in (".", "..") or "\\" in name or \
            not name.lower().endswith((".nii.gz", ".nii")) or name.startswith("."):
        raise BadRequestError(f"name={name!r}: give a plain file name ending in .nii.gz or .nii, e.g. ct.nii.gz")
    return name


def zip_outputs(files: list[Path], root: Path, archive: Path, messages: list[str]) -> None:
    """The outputs, relative to ``root``, in the order written (the record last); the messages
    about the input ride in the zip's comment as JSON."""
    with zipfile.ZipFile(archive, "x", compression=zipfile.ZIP_STORED) as zf:
        for path in files:
            zf.write(path, path.relative_to(root).as_posix())
        comment = json.dumps({"messages": messages}).encode()
        zf.comment = comment if len(comment) <= _MAX_MESSAGES else json.dumps(
            {"messages": [m[:500] for m in messages[:50]]}).encode()[:_MAX_MESSAGES]
