"""A safetensors file read into one buffer: tensor views, metadata, one finiteness pass.

`safetensors.torch.load` copies every tensor out of the file's bytes (214 copies for a ViT-B
adapter), and `safe_open` keeps ~60 bytes per tensor read for the life of the process, which
adds up over thousands of hot swaps. Here the file is copied once into a uint8 buffer (recycled,
see `_BufferPool`) and each tensor is a view of it, so a swap copies the values once more, from
the buffer into the live model. The header is checked by the rules safetensors itself enforces
(known dtype, shape matching its byte range, ranges contiguous from 0 and covering the data
exactly), so every file this reads is one `safetensors.torch.load` reads the same.

Finiteness costs no pass of its own: a float sum is finite only if every term is (an infinity
or a NaN stays non-finite through any sum), summing is ~10x faster than `isfinite()` on the
CPU, and `TensorFile.read` sums each chunk while the copy has it in cache. A non-finite sum may
instead be an overflow of huge finite values, so the exact per-tensor check then decides and
names the tensor.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
import sys
import threading
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
                 metadata: dict[str, str], regions: list[torch.Tensor], finite: Optional[bool] = None) -> None:
        self.buffer = buffer
        self.tensors = tensors
        self.other_dtypes = other_dtypes
        self.metadata = metadata
        self._regions = regions  # the data region as runs of one dtype, for the finiteness pass
        self._finite = finite  # the read's verdict if it summed every chunk, else None

    @classmethod
    def read(cls, path: os.PathLike) -> "TensorFile":
        """Read and check `path`; TensorFileError says what is wrong with it.

        The file is mapped and copied into the buffer by torch (on its own threads), one
        cache-sized chunk at a time, and each float chunk is summed while it is still in cache:
        the finiteness pass then costs no second trip to memory. The buffer is private, so the
        tensors do not change if the file is rewritten later. Like safetensors' own reader, a
        mapped read would fault if another process truncated the file during the copy (~2 ms
        for ViT-B); files written by `Adapter.save` and the Hub cache are replaced atomically,
        which never does that. Files that cannot be mapped (empty ones, pipes) are read plainly.
        """
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                # A copy-on-write mapping is writable, which torch.frombuffer wants; nothing writes to it.
                mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):
                buffer = torch.empty(size, dtype=torch.uint8)
                if size and f.readinto(memoryview(buffer.numpy())) != size:
                    raise TensorFileError("the file changed size while it was read") from None
                return cls.parse(buffer)
        try:
            return cls._copy_checked(torch.frombuffer(mapping, dtype=torch.uint8), read_buffers.take(size))
        finally:
            try:
                mapping.close()
            except BufferError:  # a traceback still holds a view; the mapping closes with it
                pass

    @classmethod
    def parse(cls, buffer: torch.Tensor) -> "TensorFile":
        """A TensorFile from the file's bytes, (n,) uint8."""
        length, layout = _header(buffer)
        return cls._views(buffer, length, layout, finite=None)

    @classmethod
    def _copy_checked(cls, source: torch.Tensor, buffer: torch.Tensor) -> "TensorFile":
        """Copy `source` (the mapped file) into `buffer`, summing each float chunk as it lands."""
        length, layout = _header(source)
        start, done, sums, fused = 8 + length, 0, [], True
        for dtype, begin, stop, _ in layout.runs:
            begin, stop = start + begin, start + stop
            if begin % _ITEMSIZE[dtype]:  # a hand-made misaligned file: summed after the copy instead
                fused = False
                continue
            buffer[done:begin].copy_(source[done:begin])
            for a in range(begin, stop, _CHUNK_BYTES):
                b = min(a + _CHUNK_BYTES, stop)
                buffer[a:b].copy_(source[a:b])
                sums.append(buffer[a:b].view(dtype).sum(dtype=torch.float32))
            done = stop
        buffer[done:].copy_(source[done:])
        finite = (not sums or math.isfinite(torch.stack(sums).sum().item())) if fused else None
        return cls._views(buffer, length, layout, finite)

    @classmethod
    def _views(cls, buffer: torch.Tensor, length: int, layout: "_Layout", finite: Optional[bool]) -> "TensorFile":
        data = buffer[8 + length :]
        tensors, regions = {}, []
        for dtype, begin, stop, members in layout.runs:
            region = _view(data[begin:stop], dtype, ((stop - begin) // _ITEMSIZE[dtype],))
            regions.append(region)
            # One as_strided per tensor (offsets and strides from the cached layout): 0.39 ms for
            # a ViT-B adapter's 214 tensors, against 0.55 ms for a split and a view each.
            start, strided = region.storage_offset(), region.as_strided
            for name, shape, strides, offset in members:
                tensors[name] = strided(shape, strides, start + offset)
        return cls(buffer, tensors, dict(layout.other_dtypes), dict(layout.metadata), regions, finite)

    def first_nonfinite(self) -> Optional[str]:
        """The name of the first tensor holding NaN or an infinity, or None (one pass over the data,
        or none if the read already summed it)."""
        finite = self._finite if self._finite is not None else all_finite(self._regions)
        return None if finite else first_nonfinite(self.tensors)


class _BufferPool:
    """Read buffers whose memory is used again once nothing refers to them.

    Memory the process has not touched costs a page fault per 4 KiB on first write: 4,800 for
    a ViT-B adapter, 4-8 ms on the development VM, more than the copy itself. Whether malloc
    hands back touched memory for a new 19 MiB buffer depends on the heap's history, so a
    service swapping adapters would see swaps of 8 or of 25 ms by chance. Each buffer is an
    anonymous mapping seen by torch through `torch.frombuffer`, which holds a reference to it
    for as long as any tensor uses the memory: a mapping that only the pool refers to is free.
    At most `MAX_BUFFERS` are kept; the pool holds on to that much memory after the adapters
    that used it are gone (4 x 19 MiB for ViT-B); `read_buffers.clear()` lets it go.
    """

    MAX_BUFFERS = 4

    def __init__(self) -> None:
        # The first mapping is a sentinel that is never handed out: its reference count, taken
        # in the same loop, is what a free buffer's is on this interpreter (CPython 3.14 counts
        # some references differently, so no constant is assumed).
        self._mappings: list[mmap.mmap] = [_anonymous(mmap.PAGESIZE)]
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):  # a child has only the forking thread: a held lock would stay held
            os.register_at_fork(after_in_child=self._forget_lock)

    def _forget_lock(self) -> None:
        self._lock = threading.Lock()

    def take(self, size: int) -> torch.Tensor:
        """A (size,) uint8 tensor on a free buffer of at least `size` bytes, or on a new one."""
        with self._lock:
            free = None
            for mapping in self._mappings:
                if free is None:
                    free = sys.getrefcount(mapping)
                elif len(mapping) >= size and sys.getrefcount(mapping) == free:
                    return torch.frombuffer(mapping, dtype=torch.uint8, count=size)
            mapping = _anonymous(size)
            # the newest first; the oldest forgotten (it lives on while tensors use it)
            self._mappings = [self._mappings[0], mapping, *self._mappings[1 : self.MAX_BUFFERS]]
            return torch.frombuffer(mapping, dtype=torch.uint8, count=size)

    def clear(self) -> None:
        """Forget every buffer (those still in use stay alive as long as their tensors)."""
        with self._lock:
            del self._mappings[1:]


def _anonymous(size: int) -> mmap.mmap:
    # Private, not mmap's default MAP_SHARED: a forked child (data loader workers, Ray) must not
    # write into the memory of the parent's adapters when it reuses a buffer it sees as free.
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, size)  # Windows: no fork


read_buffers = _BufferPool()  # the pool every read draws from


# Chunks small enough to stay in the two cores' L2 (2.5 MiB each here) between the copy and the
# sum: read + finiteness of a ViT-B adapter 3.1 ms instead of 4.5 with a separate sum pass.
_CHUNK_BYTES = 1 << 20


def _header(buffer: torch.Tensor) -> tuple[int, "_Layout"]:
    """The header's length and its checked layout, from the file's bytes (n,) uint8."""
    raw = buffer.numpy()
    if len(raw) < 8:
        raise TensorFileError(f"{len(raw)} bytes is too short for a safetensors header")
    (length,) = struct.unpack("<Q", raw[:8].tobytes())
    if length > MAX_HEADER_BYTES or 8 + length > len(raw):
        raise TensorFileError(f"the header length {length} does not fit a {len(raw)}-byte file")
    return length, _layout(raw[8 : 8 + length].tobytes(), len(raw) - 8 - length)


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
    """What a header says, checked: runs of one float dtype [(dtype, begin, end, members)], each
    member (name, shape, contiguous strides, element offset in the run); other dtypes by name;
    the metadata."""

    runs: list
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
    end = 0
    for name, dtype, shape, begin, stop in entries:
        if begin != end:
            raise TensorFileError(f"{name!r}: its data starts at byte {begin}, not at {end} where the previous ended")
        if stop > size:
            raise TensorFileError(f"{name!r} ends at byte {stop} of a {size}-byte data region (truncated?)")
        if dtype is not None:  # other dtypes are reported by the adapter's own check
            if not runs or runs[-1][0] != dtype or runs[-1][2] != begin:
                runs.append([dtype, begin, begin, []])
            runs[-1][3].append((name, shape, _contiguous_strides(shape), (begin - runs[-1][1]) // _ITEMSIZE[dtype]))
            runs[-1][2] = stop
        end = stop
    if end != size:
        raise TensorFileError(f"the tensors cover {end} bytes of a {size}-byte data region")
    others = {name: info["dtype"] for name, info in header.items() if info["dtype"] not in FLOAT_DTYPES}
    return _Layout(runs, others, metadata)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


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
