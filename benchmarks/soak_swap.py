"""Hot-swap soak: many swaps, merges and unmerges on one SAM; exact end state, flat memory.

The soak itself is `samed_adapter.testing.soak` (tests/test_soak.py runs it short): one stock SAM
(random weights) patched back and forth between A (K = 3, encoder LoRA) and B (K = 5, the
decoder-LoRA variant), from the Adapter object, from its file, with `merge=True`, or followed by
`model.merge()` and `model.unmerge()`; every seventh swap leaves the SAM merged. At the end:

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
import sys
from typing import Optional

from samed_adapter.testing.soak import MIB, RSS_LIMIT, soak


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
