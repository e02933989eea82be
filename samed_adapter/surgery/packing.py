"""Tensors laid back to back in one buffer, so that a write over many of them is one op.

A hot swap writes SAM's mask decoder as stock + delta: 93 tensors for ViT-B, most of them
small, where one `torch.add` per tensor costs 2.7 ms and a single add over the same 3.5 M
values 1.6 ms (2-core CPU, measured in the swap loop); the encoder LoRA (48 tensors) and the
decoder's class-sized tensors (57) are copied whole. The live tensors and the kept stock ones
are therefore packed in the order of the file's names (safetensors writes tensors sorted by
name, so a file's deltas lie back to back too), and `back_to_back_runs` finds where the
columns line up. Nothing here assumes the packing still holds: a model moved or cast since,
an adapter built in memory or a compiled model's zero-padded LoRA falls back to one op per
tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch


def packed_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of `tensors` (same keys, same order) that are views of one buffer per dtype and
    device, laid out in sorted-name order."""
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name in sorted(tensors):
        groups.setdefault((tensors[name].dtype, tensors[name].device), []).append(name)
    copies: dict[str, torch.Tensor] = {}
    for (dtype, device), names in groups.items():
        flat = torch.empty(sum(tensors[n].numel() for n in names), dtype=dtype, device=device)
        for name, piece in zip(names, flat.split([tensors[n].numel() for n in names])):
            copies[name] = piece.view(tensors[name].shape).copy_(tensors[name].detach())
    return {name: copies[name] for name in tensors}


@torch.no_grad()
def pack_in_place(tensors: Sequence[torch.Tensor]) -> None:
    """Move the data of `tensors` (parameters or buffers of one dtype and device) into one buffer,
    in the order given; the tensor objects, and so the module's parameters, stay the same."""
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return  # mixed: left as they are (writes fall back to one op per tensor)
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    for tensor, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
        piece.copy_(tensor.reshape(-1))
        tensor.data = piece.view(tensor.shape)


def back_to_back_runs(*columns: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """[(start, stop)] of the longest index ranges in which, in every column, the tensors are
    contiguous, of one dtype, each beginning where the previous ended, all within the first
    one's storage (so that `flat_view` of the range sees exactly them); the columns' i-th
    tensors must have one size. A swap calls this on every write: give the column least likely
    to join first (the adapter's), so that one built in memory costs one column's check."""
    n = len(columns[0])
    sizes = [t.numel() for t in columns[0]]
    joins = [True] * max(n - 1, 0)
    for column in columns:
        same = [True] * n if column is columns[0] else [t.numel() == size for t, size in zip(column, sizes)]
        ptrs = [t.data_ptr() for t in column]
        ends = [p + size * t.element_size() if t.is_contiguous() else -1 for p, size, t in zip(ptrs, sizes, column)]
        dtypes = [t.dtype for t in column]
        joins = [j and a and b and end == p and d == e for j, a, b, end, p, d, e
                 in zip(joins, same, same[1:], ends, ptrs[1:], dtypes, dtypes[1:])]
        if not any(joins):
            return [(i, i + 1) for i in range(n)]  # e.g. an adapter built in memory: no column left to check
    runs, start = [], 0
    for stop in [i + 1 for i, joined in enumerate(joins) if not joined] + [n]:
        if stop - start > 1 and not all(_within_storage(column[start:stop]) for column in columns):
            runs += [(i, i + 1) for i in range(start, stop)]  # adjacent by chance, in two allocations
        elif stop > start:
            runs.append((start, stop))
        start = stop
    return runs


def _within_storage(tensors: Sequence[torch.Tensor]) -> bool:
    first, last = tensors[0], tensors[-1]
    storage = first.untyped_storage()
    end = last.data_ptr() + last.numel() * last.element_size()
    return storage.data_ptr() <= first.data_ptr() and end <= storage.data_ptr() + storage.nbytes()


def flat_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One 1-D view over `tensors`, a range that `back_to_back_runs` returned."""
    first, last = tensors[0], tensors[-1]
    count = (last.data_ptr() - first.data_ptr()) // first.element_size() + last.numel()
    return first.as_strided((count,), (1,), first.storage_offset())
