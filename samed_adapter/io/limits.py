"""How big an image may be, checked from what a file claims before any voxel is read.

A NIfTI header, a ``.npy`` header, a PNG's IHDR chunk and DICOM Rows x Columns x slices all say
how many voxels follow; a hostile or damaged 416-byte file can claim 16 GiB. Every reader asks
:func:`check_voxels` with the claimed shape first, so such a file costs a few bytes of memory and
a one-line :class:`~samed_adapter.io.errors.ImageTooLargeError`, never a MemoryError or swap.

The same check bounds what an image becomes: a volume of 8 x 8 x 30000 voxels is small, but cut
into 30000 slices of the model's 512 x 512 inputs it asks for 7.9 GB; :func:`check_voxels` with
``(slices, image_size, image_size)`` says so before preparing them.

:func:`read_bounded` inflates a gzip stream up to a bound and no further, so a 1 MB gzip bomb
stops at the size its header claimed.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

from .errors import ImageReadError, ImageTooLargeError, TruncatedImageError

__all__ = ["DEFAULT_MAX_VOXELS", "check_voxels", "read_bounded", "resolve_max_voxels"]

#: 2**30 voxels (4 GiB as float32). The largest real CTs fit with room to spare: a thin-slice
#: whole-body CT is 512 x 512 x 3000 = 0.79 Gi voxels and a 1024-matrix photon-counting scan of
#: 1000 slices exactly 1 Gi; an MRI or a PET is far smaller. Past it, a header is more likely
#: damaged or hostile than real, and the float32 copy plus the model's inputs would not fit the
#: memory of most machines that run this tool. ``--max-voxels`` raises it.
DEFAULT_MAX_VOXELS = 2**30

_CHUNK = 1 << 20  # inflate 1 MiB at a time: the most a stream may overrun its bound by


def resolve_max_voxels(max_voxels: Optional[int]) -> int:
    """``max_voxels`` checked (a positive int); None gives :data:`DEFAULT_MAX_VOXELS`.

    Raises:
        ValueError: not a positive int.
    """
    if max_voxels is None:
        return DEFAULT_MAX_VOXELS
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1:
        raise ValueError(f"max_voxels must be a positive int (voxels), got {max_voxels!r}")
    return max_voxels


def check_voxels(shape: Sequence[int], max_voxels: Optional[int] = DEFAULT_MAX_VOXELS,
                 source: str | os.PathLike[str] | None = None, what: str = "image") -> int:
    """The number of voxels of ``shape``, or an error when that exceeds ``max_voxels``.

    Args:
        shape: the size a file claims (any number of axes), or what it will become, e.g.
            ``(slices, image_size, image_size)`` for the model's inputs.
        max_voxels: the limit (None: :data:`DEFAULT_MAX_VOXELS`).
        source: the file, named in the message.
        what: what ``shape`` is the size of, e.g. ``"image"`` or ``"model input"``.

    Raises:
        ImageReadError: an axis is negative (a damaged header).
        ImageTooLargeError: more than ``max_voxels`` voxels; the one-line message names the
            size, the limit and ``--max-voxels``.
    """
    limit = resolve_max_voxels(max_voxels)
    name = f"{source}: " if source is not None else ""
    sizes = [int(s) for s in shape]
    if any(s < 0 for s in sizes):
        raise ImageReadError(f"{name}{what} size {tuple(sizes)} has a negative axis; the header is damaged")
    total = 1
    for s in sizes:
        total *= s  # Python ints: no overflow, however large the claim
    if total > limit:
        dims = " x ".join(str(s) for s in sizes)
        raise ImageTooLargeError(
            f"{name}{what} of {dims} = {total:,} voxels ({total * 4 / 2**30:.3g} GiB as float32) exceeds the "
            f"limit of {limit:,} voxels; if it is real and the memory is there, raise the limit with "
            "--max-voxels (Python: max_voxels=)")
    return total


def read_bounded(stream: BinaryIO, size: int, source: str | os.PathLike[str], *, exact: bool = True,
                 prefix: bytes = b"") -> bytes:
    """``prefix`` and then exactly ``size`` bytes from a (gzip) stream, inflating no more than ``size`` + 1 MiB.

    Args:
        stream: a binary stream, typically a :class:`gzip.GzipFile`.
        size: the bytes the file's header says follow.
        source: the file, named in messages.
        exact: also require the stream to end there (a gzip holding more than its header claims
            is damaged or a bomb: one more byte is read to see it, never the rest).
        prefix: bytes of the stream read before (the header): returned in front of the rest
            (joined once, so the data is not copied twice) and counted in messages.

    Raises:
        TruncatedImageError: the stream ends early, or its gzip data is cut off.
        ImageReadError: the stream holds more than ``size`` bytes (``exact``), or is not gzip.
    """
    chunks, held, already = [prefix], 0, len(prefix)
    try:
        while held < size:
            chunk = stream.read(min(_CHUNK, size - held))
            if not chunk:
                break
            chunks.append(chunk)
            held += len(chunk)
        extra = stream.read(1) if exact and held == size else b""
    except (EOFError, zlib.error) as exc:  # a cut-off stream, or damaged deflate data
        raise TruncatedImageError(f"{source}: the gzip stream is cut off or damaged after {already + held:,} of "
                                  f"{already + size:,} bytes ({exc}); copy the file again from the source") from exc
    except gzip.BadGzipFile as exc:  # a failed CRC or length check, bytes after the last member that are not gzip
        raise ImageReadError(f"{source}: the gzip stream is damaged ({exc}); copy the file again from the source") from exc
    if held < size:
        raise TruncatedImageError(f"{source}: truncated: its header claims {already + size:,} bytes, the file holds "
                                  f"{already + held:,}; copy it again from the source")
    if extra:
        raise ImageReadError(f"{source}: holds more data than its header claims ({already + size:,} bytes); the file is "
                             "damaged or not what it says: copy it again from the source")
    return b"".join(chunks)


def file_size(path: Path) -> int:
    """Size of ``path`` in bytes (0 when it cannot be stat'ed: the read then names the error)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
