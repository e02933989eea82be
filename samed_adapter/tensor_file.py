"""A safetensors file read into one buffer: tensor views, metadata, one finiteness pass.

`safetensors.torch.load` copies every tensor out of the file's bytes (214 copies for a ViT-B
adapter), and `safe_open` keeps ~60 bytes per tensor read for the life of the process, which
adds up over thousands of hot swaps. Here the file is read once into a uint8 tensor and each
tensor is a view of it, so a swap copies the values once, from the file's buffer into the live
model. The header is checked by the rules safetensors itself enforces (known dtype, shape
matching its byte range, ranges contiguous from 0 and covering the data exactly), so every file
this reads is one `safetensors.torch.load` reads the same.

Finiteness costs one pass per dtype over the data region: a float sum is finite only if every
term is (an infinity or a NaN stays non-finite through any sum), and summing is ~10x faster than
`isfinite()` on the CPU. A non-finite sum may instead be an overflow of huge finite values, so
the exact per-tensor check then decides and names the tensor.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, NamedTuple, Optional

import torch

# safetensors' dtype codes; the ones an adapter may hold map to torch dtypes.
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
OTHER_DTYPES = {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "I32", "U32", "F64", "I64", "U64", "C64",
                "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class TensorFileError(ValueError):
    """The bytes are not a safetensors file this library can read."""


class TensorFile:
    """The tensors and header metadata of one safetensors file, as views of one buffer.

    Attributes:
        tensors: {name: tensor}, in header order, views of `buffer` (float32/float16/bfloat16).
        other_dtypes: {name: safetensors dtype code} of the tensors of any other dtype (not read).
        metadata: the header's ``__metadata__`` (str -> str).
        buffer: (n,) uint8, the whole file.
    """

    def __init__(self, buffer: torch.Tensor, tensors: dict[str, torch.Tensor], other_dtypes: dict[str, str],
                 metadata: dict[str, str], regions: list[torch.Tensor]) -> None:
        self.buffer = buffer
        self.tensors = tensors
        self.other_dtypes = other_dtypes
        self.metadata = metadata
        self._regions = regions  # the data region as runs of one dtype, for the finiteness pass

    @classmethod
    def read(cls, path: os.PathLike) -> "TensorFile":
        """Read and check `path`; TensorFileError says what is wrong with it."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buffer = torch.empty(size, dtype=torch.uint8)
            _read_into(f, memoryview(buffer.numpy()))
        return cls.parse(buffer)

    @classmethod
    def parse(cls, buffer: torch.Tensor) -> "TensorFile":
        """A TensorFile from the file's bytes, (n,) uint8."""
        raw = buffer.numpy()
        if len(raw) < 8:
            raise TensorFileError(f"{len(raw)} bytes is too short for a safetensors header")
        (length,) = struct.unpack("<Q", raw[:8].tobytes())
        if length > MAX_HEADER_BYTES or 8 + length > len(raw):
            raise TensorFileError(f"the header length {length} does not fit a {len(raw)}-byte file")
        layout = _layout(raw[8 : 8 + length].tobytes(), len(raw) - 8 - length)
        data = buffer[8 + length :]
        tensors, regions = {}, []
        for dtype, begin, stop, members in layout.runs:
            region = _view(data[begin:stop], dtype, ((stop - begin) // _ITEMSIZE[dtype],))
            regions.append(region)
            # One split into views per run instead of a slice and two views per tensor.
            for (name, shape), piece in zip(members, region.split(layout.counts[len(regions) - 1])):
                tensors[name] = piece.view(shape)
        return cls(buffer, tensors, dict(layout.other_dtypes), dict(layout.metadata), regions)

    def first_nonfinite(self) -> Optional[str]:
        """The name of the first tensor holding NaN or an infinity, or None (one pass over the data)."""
        if all_finite(self._regions):
            return None
        return first_nonfinite(self.tensors)


# Copying a file out of the page cache runs at one core's memcpy speed: two threads reading
# halves of an 18.8 MiB adapter take 1.5 ms instead of 3.3 ms on the 2-core development machine.
_PARALLEL_READ_BYTES = 4 << 20
_read_pool: Optional[ThreadPoolExecutor] = None


def _forget_read_pool() -> None:
    global _read_pool
    _read_pool = None  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_read_pool)


def _read_into(f, view: memoryview) -> None:
    """Fill `view` from the start of open file `f`, in parallel chunks where the OS allows."""
    global _read_pool
    parts = min(4, torch.get_num_threads(), len(view) // _PARALLEL_READ_BYTES)
    if parts < 2 or not hasattr(os, "preadv"):
        if f.readinto(view) != len(view):
            raise TensorFileError("the file changed size while it was read")
        return
    if _read_pool is None:
        _read_pool = ThreadPoolExecutor(4, thread_name_prefix="samed-read")
    step = -(-len(view) // parts)
    chunks = [(view[i : i + step], i) for i in range(0, len(view), step)]
    for done in _read_pool.map(lambda chunk: _pread_fully(f.fileno(), *chunk), chunks):
        if not done:
            raise TensorFileError("the file changed size while it was read")


def _pread_fully(fd: int, view: memoryview, offset: int) -> bool:
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            return False
        view, offset = view[got:], offset + got
    return True


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value is finite; False may also mean an overflowing sum (see the module docstring)."""
    for tensor in tensors:
        if tensor.numel() and not math.isfinite(tensor.sum(dtype=torch.float32).item()):
            return False
    return True


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first tensor holding NaN or an infinity, or None."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors.values():
        by_dtype.setdefault(tensor.dtype, []).append(tensor.reshape(-1))
    if all_finite(torch.cat(group) if len(group) > 1 else group[0] for group in by_dtype.values()):
        return None
    return next((name for name, t in tensors.items() if not torch.isfinite(t).all()), None)


class _Layout(NamedTuple):
    """What a header says, checked: runs of one float dtype [(dtype, begin, end, [(name, shape)])],
    the element count of each tensor per run, other dtypes by name, and the metadata."""

    runs: list
    counts: list[list[int]]
    other_dtypes: dict[str, str]
    metadata: dict[str, str]


@functools.lru_cache(maxsize=16)
def _layout(header_bytes: bytes, size: int) -> _Layout:
    """Check a header against a data region of `size` bytes. Cached by the header's bytes: a
    service swapping among a few adapter files parses each header once (1.5 ms for ViT-B)."""
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise TensorFileError(f"the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise TensorFileError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorFileError("the header metadata is not a map of strings")
    entries = sorted((_entry(name, info) for name, info in header.items()), key=lambda e: e[3])
    runs: list[list] = []
    counts: list[list[int]] = []
    end = 0
    for name, dtype, shape, begin, stop in entries:
        if begin != end:
            raise TensorFileError(f"{name!r}: its data starts at byte {begin}, not at {end} where the previous ended")
        if stop > size:
            raise TensorFileError(f"{name!r} ends at byte {stop} of a {size}-byte data region (truncated?)")
        if dtype is not None:  # other dtypes are reported by the adapter's own check
            if not runs or runs[-1][0] != dtype or runs[-1][2] != begin:
                runs.append([dtype, begin, begin, []])
                counts.append([])
            runs[-1][2] = stop
            runs[-1][3].append((name, shape))
            counts[-1].append((stop - begin) // _ITEMSIZE[dtype])
        end = stop
    if end != size:
        raise TensorFileError(f"the tensors cover {end} bytes of a {size}-byte data region")
    others = {name: info["dtype"] for name, info in header.items() if info["dtype"] not in FLOAT_DTYPES}
    return _Layout(runs, counts, others, metadata)


def _entry(name: str, info) -> tuple[str, Optional[torch.dtype], tuple[int, ...], int, int]:
    """(name, float dtype or None for another known dtype, shape, begin, end) of a header entry."""
    if type(info) is not dict or len(info) != 3 or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise TensorFileError(f"{name!r}: a tensor entry needs exactly dtype, shape and data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if type(code) is not str or code not in FLOAT_DTYPES and code not in OTHER_DTYPES:
        raise TensorFileError(f"{name!r}: unknown dtype {code!r}")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise TensorFileError(f"{name!r}: the shape {shape!r} is not a list of non-negative ints")
    if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]):
        raise TensorFileError(f"{name!r}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    dtype = FLOAT_DTYPES.get(code)
    if dtype is not None and math.prod(shape) * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
        raise TensorFileError(f"{name!r}: shape {shape} of {code} does not fill its {offsets[1] - offsets[0]} bytes")
    return name, dtype, tuple(shape), offsets[0], offsets[1]


def _view(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 slice of the file seen as `dtype` and `shape`, copied only if misaligned."""
    if data.storage_offset() % _ITEMSIZE[dtype]:
        data = data.clone()  # a dtype view needs an aligned start; writers align, hand-made files may not
    return data.view(dtype).view(shape)
