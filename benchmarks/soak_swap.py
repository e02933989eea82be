"""Hot-swap soak: many swaps, merges and unmerges on one SAM; exact end state, flat memory.

One stock SAM (random weights) is patched back and forth between two adapters that differ in
structure: A (K = 3, encoder LoRA) and B (K = 5, the decoder-LoRA variant). Swap i applies
A (odd i) or B (even i), in a rotating way: from the Adapter object, from its file, with
`merge=True`, or followed by `model.merge()` and `model.unmerge()`; every seventh swap also
merges and leaves it merged, so the next swap starts from a merged SAM. At the end:

- the SAM equals a fresh stock SAM patched once with the last adapter, in the same merge state
  (every state_dict tensor with torch.equal, the same module types and requires_grad flags);
- `unpatch` then gives the stock SAM back bit for bit;
- resident memory (VmRSS of /proc/self/status, after gc.collect() and glibc's malloc_trim(0),
  see `trimmed_rss_bytes`) grows by less than 1 MiB from swap `--measure-from` (default 100)
  to the last swap. RSS without the trim, and the counts of live tensors and of gc-tracked
  objects, are printed beside it: the counts are exact where RSS is noisy.

    python benchmarks/soak_swap.py [--swaps 1000] [--backbone tiny|vit_b] [--measure-from 100] [--no-files]

Every fourth swap reads its adapter from the .safetensors file (`--no-files`: from the Adapter
object instead): reading a file with safetensors' torch loader keeps ~60 bytes per tensor read
(safetensors 0.8.0), which shows here as RSS growth of ~9 KiB per file swap on tiny.

Exits 1 if the end state differs or RSS grew by 1 MiB or more.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

import samed_adapter as sa
from samed_adapter.testing import differences, random_adapter, snapshot

MIB = 2**20
RSS_LIMIT = 1 * MIB
IMAGE_SIZE = {"tiny": 128, "vit_b": 512}


def rss_bytes() -> int:
    """VmRSS of this process, from /proc/self/status."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


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
    gc.collect()
    objects = gc.get_objects()
    tensors = sum(1 for o in objects if issubclass(type(o), torch.Tensor))  # type(): no lazy attribute lookups
    return tensors, len(objects)


def soak(swaps: int = 1000, backbone: str = "tiny", measure_from: int = 100, seed: int = 0,
         log=None, trace_every: int = 0, from_files: bool = True) -> dict:
    """Run the soak (under torch.no_grad()); returns the figures (see `main` for what is printed)."""
    if swaps < 2 or not 0 < measure_from < swaps:
        raise ValueError(f"need swaps >= 2 and 0 < measure_from < swaps, got {swaps} and {measure_from}")
    with torch.no_grad():
        return _soak(swaps, backbone, measure_from, seed, log, trace_every, from_files)


def _soak(swaps: int, backbone: str, measure_from: int, seed: int, log, trace_every: int, from_files: bool) -> dict:
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
            name = "A" if i % 2 else "B"
            how = (i // 2) % 4  # each adapter meets every way of swapping
            if how == 1 and not from_files:
                how = 0
            t0 = time.perf_counter()
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
            times.append(time.perf_counter() - t0)
            if how == 2 and i % 7:
                model.unmerge()  # mostly unmerged between swaps ...
            elif how != 2 and i % 7 == 0:
                model.merge()  # ... but every seventh swap leaves a merged SAM for the next one
            if trace_every and i % trace_every == 0 and log and i not in (measure_from, swaps):
                gc.collect()
                raw = rss_bytes()
                log(f"after swap {i}: RSS {trimmed_rss_bytes() / MIB:.2f} MiB (before malloc_trim {raw / MIB:.2f})")
            if i == measure_from or i == swaps:
                # live_counts() builds a list of every object (MiBs); whatever of it malloc keeps
                # must be in the baseline, not in the growth: count before the first RSS reading
                # and after the last.
                if i == measure_from:
                    tensors, objects = live_counts()
                gc.collect()
                figures[f"raw_rss_{i}"] = rss_bytes()
                figures[f"rss_{i}"] = trimmed_rss_bytes()
                if i == swaps:
                    tensors, objects = live_counts()
                figures[f"tensors_{i}"] = tensors
                figures[f"objects_{i}"] = objects
                if log:
                    log(f"after swap {i}: RSS {figures[f'rss_{i}'] / MIB:.2f} MiB (before malloc_trim "
                        f"{figures[f'raw_rss_{i}'] / MIB:.2f}), {tensors} live tensors, {objects} gc objects")
        figures["seconds"] = time.perf_counter() - start
    last = "A" if swaps % 2 else "B"
    merged = model.merged
    fresh_sam = sa.build_sam(backbone, seed=seed)
    fresh = sa.patch(fresh_sam, adapters[last], merge=merged)
    figures["last_adapter"] = last
    figures["merged_at_end"] = merged
    figures["config_equal"] = model.config == fresh.config
    figures["end_differences"] = differences(sam, snapshot(fresh_sam))
    sa.unpatch(sam)
    figures["unpatch_differences"] = differences(sam, stock)
    figures["median_swap_ms"] = statistics.median(times) * 1000
    figures["rss_growth"] = figures[f"rss_{swaps}"] - figures[f"rss_{measure_from}"]
    figures["raw_rss_growth"] = figures[f"raw_rss_{swaps}"] - figures[f"raw_rss_{measure_from}"]
    figures["tensor_growth"] = figures[f"tensors_{swaps}"] - figures[f"tensors_{measure_from}"]
    figures["object_growth"] = figures[f"objects_{swaps}"] - figures[f"objects_{measure_from}"]
    return figures


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=1000)
    parser.add_argument("--backbone", default="tiny", choices=["tiny", "vit_b"])
    parser.add_argument("--measure-from", type=int, default=100, help="the swap whose RSS is the baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace-every", type=int, default=0, help="also print RSS every N swaps")
    parser.add_argument("--no-files", dest="from_files", action="store_false",
                        help="swap from Adapter objects only (default: every fourth swap reads the .safetensors file)")
    args = parser.parse_args(argv)
    f = soak(args.swaps, args.backbone, args.measure_from, args.seed, log=print, trace_every=args.trace_every,
             from_files=args.from_files)
    n, m = args.swaps, args.measure_from
    print()
    source = "objects and files" if args.from_files else "Adapter objects only"
    print(f"| {args.backbone}: {n} swaps (A K=3 <-> B K=5 decoder-LoRA, with merges; from {source}) | value |")
    print("|---|---|")
    print(f"| time | {f['seconds']:.1f} s, median swap {f['median_swap_ms']:.1f} ms |")
    print(f"| RSS after swap {m} / {n} | {f[f'rss_{m}'] / MIB:.2f} / {f[f'rss_{n}'] / MIB:.2f} MiB |")
    print(f"| RSS growth, swap {m} -> {n} | {f['rss_growth'] / MIB:+.3f} MiB (limit < 1 MiB) |")
    print(f"| same without malloc_trim | {f['raw_rss_growth'] / MIB:+.3f} MiB "
          f"({f[f'raw_rss_{m}'] / MIB:.2f} / {f[f'raw_rss_{n}'] / MIB:.2f} MiB) |")
    print(f"| live tensors, swap {m} -> {n} | {f[f'tensors_{m}']} -> {f[f'tensors_{n}']} ({f['tensor_growth']:+d}) |")
    print(f"| gc objects, swap {m} -> {n} | {f[f'objects_{m}']} -> {f[f'objects_{n}']} ({f['object_growth']:+d}) |")
    end = "yes" if not f["end_differences"] and f["config_equal"] else "NO: " + "; ".join(
        f["end_differences"][:5] or ["the configs differ"])
    print(f"| end state == fresh patch of {f['last_adapter']} (merged={f['merged_at_end']}) | {end} |")
    unpatched = "yes" if not f["unpatch_differences"] else "NO: " + "; ".join(f["unpatch_differences"][:5])
    print(f"| unpatch == stock | {unpatched} |")
    ok = not f["end_differences"] and f["config_equal"] and not f["unpatch_differences"] and f["rss_growth"] < RSS_LIMIT
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
