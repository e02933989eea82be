"""The hot-swap soak: many swaps, merges and unmerges on one SAM; exact end state, flat memory.

One stock SAM (random weights) is patched back and forth between two adapters that differ in
structure: A (K = 3, encoder LoRA) and B (K = 5, the decoder-LoRA variant). Swap i applies
A (odd i) or B (even i), in a rotating way: from the Adapter object, from its file, with
`merge=True`, or followed by `model.merge()` and `model.unmerge()`; every seventh swap also
merges and leaves it merged, so the next swap starts from a merged SAM. `soak` returns figures
for the end state:

- whether the SAM equals a fresh stock SAM patched once with the last adapter, in the same merge
  state (every state_dict tensor with torch.equal, the same module types and requires_grad flags);
- whether `unpatch` then gives the stock SAM back bit for bit;
- resident memory (`trimmed_rss_bytes`) and the counts of live tensors and of gc-tracked objects
  at swap `measure_from` and at the last swap: the counts are exact where RSS is noisy.

`benchmarks/soak_swap.py` runs it long and prints the figures; tests/test_soak.py runs it short.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from . import differences, random_adapter, snapshot
from .fuzz import rss_bytes as _fuzz_rss_bytes

# torch and samed_adapter are imported when a soak runs, as in the rest of this package.

__all__ = ["IMAGE_SIZE", "MIB", "RSS_LIMIT", "live_counts", "rss_bytes", "soak", "trimmed_rss_bytes"]

MIB = 2**20
RSS_LIMIT = 1 * MIB  # growth from swap measure_from to the last swap that counts as a leak
IMAGE_SIZE = {"tiny": 128, "vit_b": 512}


def rss_bytes() -> int:
    """VmRSS of this process, from /proc/self/status (the soak needs a reading: none is an error)."""
    rss = _fuzz_rss_bytes()
    if not rss:
        raise RuntimeError("no VmRSS in /proc/self/status")
    return rss


def trimmed_rss_bytes() -> int:
    """VmRSS after glibc's malloc_trim(0) has handed free heap pages back to the system.

    Raw RSS also counts memory that malloc keeps after `free` for reuse; with ViT-B tensors of
    several MiB that is tens to hundreds of MiB and moves from one reading to the next. After
    a trim, RSS is what is live (plus fragmentation that cannot be returned), which is what a
    leak grows. Where glibc is not the allocator this is the raw RSS.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def live_counts() -> tuple[int, int]:
    """(live torch tensors, gc-tracked objects), after a full collection."""
    import torch

    gc.collect()
    objects = gc.get_objects()
    tensors = sum(1 for o in objects if issubclass(type(o), torch.Tensor))  # type(): no lazy attribute lookups
    return tensors, len(objects)


def soak(swaps: int = 1000, backbone: str = "tiny", measure_from: int = 100, seed: int = 0,
         log: Optional[Callable[[str], None]] = None, trace_every: int = 0, from_files: bool = True) -> dict:
    """Run the soak (under torch.no_grad()) and return its figures.

    Args:
        swaps: how many swaps; the last adapter is A for an odd count, B for an even one.
        backbone: the random SAM's backbone ("tiny" runs at 128, others at 512).
        measure_from: the swap whose memory is the baseline of the growth figures.
        log: called with a line after the measured swaps (and every `trace_every` swaps).
        from_files: every fourth swap reads its adapter file (else the Adapter object again).

    Returns:
        ``swaps``, ``last_adapter``, ``merged_at_end``, ``config_equal``, ``end_differences``
        and ``unpatch_differences`` (empty: identical), ``rss_growth``, ``raw_rss_growth``,
        ``tensor_growth``, ``object_growth``, ``median_swap_ms``, ``seconds``, and the readings
        ``rss_N``, ``raw_rss_N``, ``tensors_N``, ``objects_N`` at N = measure_from and swaps.
    """
    import torch

    if swaps < 2 or not 0 < measure_from < swaps:
        raise ValueError(f"need swaps >= 2 and 0 < measure_from < swaps, got {swaps} and {measure_from}")
    with torch.no_grad():
        return _soak(swaps, backbone, measure_from, seed, log, trace_every, from_files)


def _soak(swaps: int, backbone: str, measure_from: int, seed: int, log, trace_every: int, from_files: bool) -> dict:
    import torch

    import samed_adapter as sa

    size = IMAGE_SIZE.get(backbone, 512)
    sam = sa.build_sam(backbone, seed=seed)
    with torch.enable_grad():
        adapters = {
            "A": random_adapter(sam, sa.AdapterConfig(num_classes=3, image_size=size), seed=1),
            "B": random_adapter(sam, sa.AdapterConfig(num_classes=5, image_size=size, decoder_lora=True), seed=2),
        }
    stock = snapshot(sam)
    figures: dict = {"swaps": swaps, "backbone": backbone, "measure_from": measure_from, "from_files": from_files}
    times = []
    with tempfile.TemporaryDirectory(prefix="samed-soak-") as tmp:
        files = {name: a.save(Path(tmp) / f"{name}.safetensors") for name, a in adapters.items()}
        model = None
        start = time.perf_counter()
        for i in range(1, swaps + 1):
            t0 = time.perf_counter()
            model = _swap(sam, i, adapters, files, from_files)
            times.append(time.perf_counter() - t0)
            if trace_every and i % trace_every == 0 and log and i not in (measure_from, swaps):
                gc.collect()
                raw = rss_bytes()
                log(f"after swap {i}: RSS {trimmed_rss_bytes() / MIB:.2f} MiB (before malloc_trim {raw / MIB:.2f})")
            if i == measure_from or i == swaps:
                _measure(figures, i, first=i == measure_from, log=log)
        figures["seconds"] = time.perf_counter() - start
    figures.update(_end_state(sam, model, adapters, stock, backbone, seed, swaps))
    figures["median_swap_ms"] = statistics.median(times) * 1000
    n, m = swaps, measure_from
    figures["rss_growth"] = figures[f"rss_{n}"] - figures[f"rss_{m}"]
    figures["raw_rss_growth"] = figures[f"raw_rss_{n}"] - figures[f"raw_rss_{m}"]
    figures["tensor_growth"] = figures[f"tensors_{n}"] - figures[f"tensors_{m}"]
    figures["object_growth"] = figures[f"objects_{n}"] - figures[f"objects_{m}"]
    return figures


def _swap(sam, i: int, adapters: dict, files: dict, from_files: bool):
    """Swap i: A (odd i) or B (even i), from the object, its file, merged, or merged and unmerged."""
    import samed_adapter as sa

    name = "A" if i % 2 else "B"
    how = (i // 2) % 4  # each adapter meets every way of swapping
    if how == 1 and not from_files:
        how = 0
    if how == 0:
        model = sa.patch(sam, adapters[name])
    elif how == 1:
        model = sa.patch(sam, files[name])
    elif how == 2:
        model = sa.patch(sam, adapters[name], merge=True)
    else:
        model = sa.patch(sam, adapters[name])
        model.merge()
        model.unmerge()
    if how == 2 and i % 7:
        model.unmerge()  # mostly unmerged between swaps ...
    elif how != 2 and i % 7 == 0:
        model.merge()  # ... but every seventh swap leaves a merged SAM for the next one
    return model


def _measure(figures: dict, i: int, *, first: bool, log) -> None:
    """Record RSS (trimmed and raw) and the live counts after swap i."""
    # live_counts() builds a list of every object (MiBs); whatever of it malloc keeps must be in
    # the baseline, not in the growth: count before the first RSS reading and after the last.
    if first:
        tensors, objects = live_counts()
    gc.collect()
    figures[f"raw_rss_{i}"] = rss_bytes()
    figures[f"rss_{i}"] = trimmed_rss_bytes()
    if not first:
        tensors, objects = live_counts()
    figures[f"tensors_{i}"] = tensors
    figures[f"objects_{i}"] = objects
    if log:
        log(f"after swap {i}: RSS {figures[f'rss_{i}'] / MIB:.2f} MiB (before malloc_trim "
            f"{figures[f'raw_rss_{i}'] / MIB:.2f}), {tensors} live tensors, {objects} gc objects")


def _end_state(sam, model, adapters: dict, stock: dict, backbone: str, seed: int, swaps: int) -> dict:
    """The soaked SAM against a fresh patch of the last adapter, then unpatched against stock."""
    import samed_adapter as sa

    last = "A" if swaps % 2 else "B"
    merged = model.merged
    fresh_sam = sa.build_sam(backbone, seed=seed)
    fresh = sa.patch(fresh_sam, adapters[last], merge=merged)
    figures = {"last_adapter": last, "merged_at_end": merged, "config_equal": model.config == fresh.config,
               "end_differences": differences(sam, snapshot(fresh_sam))}
    sa.unpatch(sam)
    figures["unpatch_differences"] = differences(sam, stock)
    return figures
