"""Switching adapters: rebuild from the stock checkpoint vs hot swap vs unpatch.

ViT-B-shaped SAM with random weights, saved as a stock checkpoint. Times, in one run:
  (a) what a user without hot-swap does: load the stock checkpoint and build the SAMed model
      with the adapter (`sam_model_registry["vit_b"](checkpoint=...)` then `patch`);
  (b) a hot swap between two different adapters on a loaded model (`patch(sam, other)`),
      from Adapter objects in memory and from the .safetensors files;
  (c) `unpatch`.
Prints medians and the ratio (a)/(b).

    python benchmarks/bench_swap.py [--backbone vit_b] [--repeats 20]
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
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_adapter(sam, seed: int) -> sa.Adapter:
    return random_adapter(sam, sa.AdapterConfig(num_classes=8, image_size=512), seed=seed, scale=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sam = sa.build_sam(args.backbone, seed=0)
        checkpoint = tmp / "sam_stock.pth"
        torch.save(sam.state_dict(), checkpoint)
        adapters = [make_adapter(sam, seed) for seed in (1, 2)]
        paths = [a.save(tmp / f"adapter{i}.safetensors") for i, a in enumerate(adapters)]

        def rebuild():
            fresh = sam_model_registry[args.backbone](checkpoint=str(checkpoint)) if args.backbone != "tiny" \
                else sa.build_sam("tiny", checkpoint=checkpoint)
            sa.patch(fresh, paths[0])

        cold = timed(rebuild, max(3, args.repeats // 5))

        sa.patch(sam, adapters[0])
        turn = [0]

        def swap_memory():
            turn[0] ^= 1
            sa.patch(sam, adapters[turn[0]])

        def swap_file():
            turn[0] ^= 1
            sa.patch(sam, paths[turn[0]])

        swap = timed(swap_memory, args.repeats)
        swap_from_file = timed(swap_file, args.repeats)
        unpatch = timed(lambda: sa.unpatch(sam), args.repeats, setup=lambda: sa.patch(sam, adapters[0]))

    rows = [
        ("(a) load stock checkpoint + build SAMed", cold),
        ("(b) hot swap, Adapter in memory", swap),
        ("(b') hot swap, from .safetensors file", swap_from_file),
        ("(c) unpatch", unpatch),
    ]
    print(f"backbone {args.backbone}, {torch.get_num_threads()} threads, medians of {args.repeats}")
    print(f"| {'step':42s} | {'median ms':>10s} | {'(a) / step':>10s} |")
    print(f"|{'-' * 44}|{'-' * 12}|{'-' * 12}|")
    for name, seconds in rows:
        print(f"| {name:42s} | {seconds * 1e3:10.2f} | {cold / seconds:10.1f} |")


if __name__ == "__main__":
    main()
