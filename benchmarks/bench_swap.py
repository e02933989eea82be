"""Switching adapters: rebuild from the stock checkpoint vs hot swaps of every kind vs unpatch.

ViT-B-shaped SAM with random weights, saved as a stock checkpoint. Times, in one run:
  (a) what a user without hot swap does: load the stock checkpoint and build the SAMed model
      with the adapter (`sam_model_registry["vit_b"](checkpoint=...)` then `patch`);
  (b) a hot swap between two different adapters of one shape (K = 8), from Adapter objects in
      memory and from the .safetensors files (read, every value checked, copied in);
  (d) a hot swap across shapes, K = 8 <-> K = 1 (each structure's decoder built once, then
      cached), in memory and from files;
  (c) `unpatch`;
  (e) with --compiled: a model compiled with `model.compile(max_rank=8)`, swapped between
      adapters of ranks 2, 4 and 8: the swap, and the first forward after it (one 512 slice)
      against the same forward eager. Compiling ViT-B with inductor takes minutes on a CPU.
Prints medians and the ratio (a)/step.

    python benchmarks/bench_swap.py [--backbone vit_b] [--repeats 20] [--compiled [--backend inductor]] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from segment_anything import sam_model_registry

import samed_adapter as sa
from samed_adapter.testing import random_adapter


def timed(fn, repeats: int, setup=None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def make_adapter(sam, seed: int, **config) -> sa.Adapter:
    return random_adapter(sam, sa.AdapterConfig(**{"num_classes": 8, "image_size": 512, **config}), seed=seed,
                          scale=0.01)


def alternate(swap, items):
    """A function that swaps to the next of `items` on each call."""
    turn = [0]

    def step():
        turn[0] = (turn[0] + 1) % len(items)
        swap(items[turn[0]])

    return step


def compiled_rows(sam, adapters: list[sa.Adapter], backend: str, repeats: int) -> list[tuple[str, float]]:
    """(e): swap and first-forward times on a compiled model, and the eager forward they compare with."""
    x = torch.rand(1, 3, 512, 512, device=next(sam.parameters()).device)
    model = sa.patch(sam, adapters[0])
    eager = timed(lambda: model(x), max(3, repeats // 5))
    start = time.perf_counter()
    model.compile(max_rank=max(a.config.rank for a in adapters), backend=backend)
    model(x)
    sync()
    compile_seconds = time.perf_counter() - start
    swaps, forwards = [], []
    for i in range(max(3, repeats // 2)):
        adapter = adapters[i % len(adapters)]
        sync()
        start = time.perf_counter()
        sa.patch(sam, adapter)
        sync()
        swaps.append(time.perf_counter() - start)
        start = time.perf_counter()
        model(x)
        sync()
        forwards.append(time.perf_counter() - start)
    ranks = "/".join(str(a.config.rank) for a in adapters)
    return [
        (f"(e) compile ({backend}) + first forward", compile_seconds),
        (f"(e) compiled: hot swap, ranks {ranks}", statistics.median(swaps)),
        ("(e) compiled: first forward after swap", statistics.median(forwards)),
        ("(e) eager: forward, one 512 slice", eager),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compiled", action="store_true", help="add the compiled-model rows (e)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for (e)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sam = sa.build_sam(args.backbone, seed=0)
        checkpoint = tmp / "sam_stock.pth"
        torch.save(sam.state_dict(), checkpoint)
        sam.to(args.device)
        adapters = [make_adapter(sam, seed) for seed in (1, 2)]
        paths = [a.save(tmp / f"adapter{i}.safetensors") for i, a in enumerate(adapters)]
        shapes = [adapters[0], make_adapter(sam, 3, num_classes=1)]  # K = 8 and K = 1
        shape_paths = [a.save(tmp / f"shape{i}.safetensors") for i, a in enumerate(shapes)]

        def rebuild():
            fresh = sam_model_registry[args.backbone](checkpoint=str(checkpoint)) if args.backbone != "tiny" \
                else sa.build_sam("tiny", checkpoint=checkpoint)
            sa.patch(fresh.to(args.device), paths[0])

        cold = timed(rebuild, max(3, args.repeats // 5))

        def swap(adapter):
            sa.patch(sam, adapter)

        sa.patch(sam, adapters[0])
        rows = [
            ("(a) load stock checkpoint + build SAMed", cold),
            ("(b) hot swap, Adapter in memory", timed(alternate(swap, adapters), args.repeats)),
            ("(b') hot swap, from .safetensors file", timed(alternate(swap, paths), args.repeats)),
        ]
        for item in shapes:  # build each structure's decoder once, as a service would at start-up
            sa.patch(sam, item)
        rows += [
            ("(d) swap across shapes K=8 <-> K=1, memory", timed(alternate(swap, shapes), args.repeats)),
            ("(d') swap across shapes, from files", timed(alternate(swap, shape_paths), args.repeats)),
            ("(c) unpatch", timed(lambda: sa.unpatch(sam), args.repeats, setup=lambda: sa.patch(sam, adapters[0]))),
        ]
        if args.compiled:
            sa.unpatch(sam)
            ranked = [make_adapter(sam, 10 + r, rank=r) for r in (4, 2, 8)]
            rows += compiled_rows(sam, ranked, args.backend, args.repeats)

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"backbone {args.backbone}, {args.device} ({where}), medians of {args.repeats}")
    print(f"| {'step':44s} | {'median ms':>10s} | {'(a) / step':>10s} |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|")
    for name, seconds in rows:
        print(f"| {name:44s} | {seconds * 1e3:10.2f} | {cold / seconds:10.1f} |")


if __name__ == "__main__":
    main()
