"""Inference: stock SAM's encoder against the patched model and the published formulation.

All rows run the same SAMed forward (encoder at S, no-prompt decoder) on ViT-B-shaped random
weights and differ only in the encoder:
  stock          the stock qkv Linear and stock attention (what stock SAM computes at S),
  published      separate A/B Linears with in-place slice additions, stock attention,
  unmerged       this project's LoRA-qkv (Triton kernel on CUDA, addmm fallback elsewhere) + SDPA,
  merged         LoRA folded into qkv + SDPA attention.
One 512 slice and a batch of 8, in one run, the rows timed in turn; ratios to the stock row.

With --backbones: the SAMed forward (unmerged LoRA, K = 8, at S) through SAM 2's Hiera
encoders (hiera_t, hiera_s, hiera_b+; random weights of the stock sam2 classes) against SAM
ViT-B, with each adapter's file size; ratios to ViT-B.

    python benchmarks/bench_inference.py [--device cuda] [--dtype bfloat16] [--repeats 5]
    python benchmarks/bench_inference.py --backbones [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import samed_adapter as sa
from samed_adapter.surgery.attention import disable_sdpa, enable_sdpa
from samed_adapter.surgery.lora import LoraQKV

from bench_train_step import PublishedLoRAqkv


def configure(model: sa.SAMed, mode: str, layers: dict[int, LoraQKV]) -> None:
    encoder = model.sam.image_encoder
    model.unmerge()
    for i, blk in enumerate(encoder.blocks):
        blk.attn.qkv = {"stock": layers[i].base_layer, "published": PublishedLoRAqkv(layers[i])}.get(mode, layers[i])
    if mode in ("stock", "published"):
        disable_sdpa(encoder)
    else:
        enable_sdpa(encoder)
    if mode == "merged":
        model.merge()


def timed(model: sa.SAMed, images: torch.Tensor, dtype) -> float:
    """Seconds for one forward (the caller warms up and repeats)."""
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype or torch.float32,
                                                enabled=dtype is not None):
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(images)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


BACKBONES = ("vit_b", "sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+")


def round_robin(run, rows, args, device: torch.device) -> dict[tuple[str, int], float]:
    """{(row, batch): median seconds of `run(row, images)`} for batches 1 and 8.

    Round-robin over the rows, each warmed up once first, so that a slow spell of a shared
    machine (or a clock ramping up) spreads over every row instead of landing on one.
    """
    results = {}
    for batch in (1, 8):
        images = torch.rand(batch, 3, args.image_size, args.image_size, device=device)
        times = {row: [] for row in rows}
        for repeat in range(-1, args.repeats):
            for row in rows:
                seconds = run(row, images)
                if repeat >= 0:
                    times[row].append(seconds)
        for row in rows:
            results[row, batch] = statistics.median(times[row])
    return results


def backbone_rows(args, device: torch.device, dtype) -> None:
    """The --backbones table: SAMed through each encoder, batch 1 and 8, round-robin."""
    models, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in BACKBONES:
            torch.manual_seed(0)
            model = sa.inject(sa.build_sam(name, seed=0), sa.AdapterConfig(num_classes=8, image_size=args.image_size))
            with torch.no_grad():  # trained-looking: every trainable tensor off its start, as in a real file
                for param in model.parameters():
                    if param.requires_grad:
                        param.add_(torch.randn_like(param) * 0.01)
            sizes[name] = model.adapter().save(Path(tmp) / f"{name}.safetensors").stat().st_size
            models[name] = model.to(device).eval()
    print(f"SAMed forward at {args.image_size}, K = 8, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"median of {args.repeats}")
    print("| encoder | adapter MiB | batch 1 ms | vs vit_b | batch 8 ms | vs vit_b |")
    print("|---|---|---|---|---|---|")
    results = round_robin(lambda name, images: timed(models[name], images, dtype), BACKBONES, args, device)
    for name in BACKBONES:
        cells = [f"{sizes[name] / 2**20:.1f}"]
        for batch in (1, 8):
            cells += [f"{results[name, batch] * 1e3:.0f}", f"{results[name, batch] / results['vit_b', batch]:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbones", action="store_true", help="SAM 2 encoders against ViT-B (needs sam2)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = None if name == "float32" else getattr(torch, name)
    if args.backbones:
        return backbone_rows(args, device, dtype)

    torch.manual_seed(0)
    model = sa.inject(sa.build_sam(args.backbone, seed=0), sa.AdapterConfig(num_classes=8, image_size=args.image_size))
    with torch.no_grad():
        for layer in model.sam.image_encoder.blocks:
            layer.attn.qkv.q.lora_B.weight.normal_(0, 0.01)
            layer.attn.qkv.v.lora_B.weight.normal_(0, 0.01)
    model.to(device).eval()
    layers = {i: blk.attn.qkv for i, blk in enumerate(model.sam.image_encoder.blocks)}
    modes = ("stock", "published", "unmerged", "merged")
    print(f"{args.backbone} at {args.image_size}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{name}, median of {args.repeats}")
    print("| encoder | batch 1 ms | vs stock | batch 8 ms | vs stock |")
    print("|---|---|---|---|---|")
    def run(mode: str, images: torch.Tensor) -> float:
        configure(model, mode, layers)
        return timed(model, images, dtype)

    results = round_robin(run, modes, args, device)
    for mode in modes:
        cells = []
        for batch in (1, 8):
            seconds = results[mode, batch]
            cells += [f"{seconds * 1e3:.1f}", f"{seconds / results['stock', batch]:.3f}"]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    for mode in ("unmerged", "merged"):
        speedups = [results["published", batch] / results[mode, batch] for batch in (1, 8)]
        print(f"{mode}: {speedups[0]:.2f}x / {speedups[1]:.2f}x as fast as the published formulation (batch 1 / 8)")
    configure(model, "unmerged", layers)


if __name__ == "__main__":
    main()
