"""One training step: the published formulation against this project's fastest configuration.

Published: separate A/B nn.Linear bypasses with in-place slice additions on the qkv output,
stock attention, fp32, the published loss (per-class Python loop Dice + nn.CrossEntropyLoss).
This project: the fused LoRA-qkv path (Triton kernel on CUDA, addmm fallback elsewhere), SDPA
attention with the relative-position bias as its mask, the vectorised loss, bf16 autocast on a
GPU. Same SAM weights, batch and input size, in one run, steps taken in turn. Prints images
per second, the peak memory a step allocates (CUDA) and the ratios.

A third row is this project's step with simulated clicks (`train --clicks`: 3 rounds of one
click per image on the same embeddings, samed_adapter.training.clicks), and the last line what
the clicks cost against the same step without them.

    python benchmarks/bench_train_step.py                      # CPU: ViT-B at 256, batch 2
    python benchmarks/bench_train_step.py --device cuda --image-size 512 --batch 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import samed_adapter as sa
from samed_adapter.surgery.attention import disable_sdpa
from samed_adapter.surgery.lora import LoraQKV
from samed_adapter.training import segmentation_loss
from samed_adapter.training.clicks import ClickTraining, mean_click_loss


class PublishedLoRAqkv(nn.Module):
    """The published `_LoRA_qkv`: four Linear modules and in-place slice additions."""

    def __init__(self, layer: LoraQKV) -> None:
        super().__init__()
        self.qkv = layer.base_layer
        self.linear_a_q, self.linear_b_q = layer.q.lora_A, layer.q.lora_B
        self.linear_a_v, self.linear_b_v = layer.v.lora_A, layer.v.lora_B
        self.dim = self.qkv.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        new_q = self.linear_b_q(self.linear_a_q(x))
        new_v = self.linear_b_v(self.linear_a_v(x))
        qkv[:, :, :, : self.dim] += new_q
        qkv[:, :, :, -self.dim :] += new_v
        return qkv


def published_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0.2 CE + 0.8 Dice as the published DiceLoss computes it: one-hot by a loop, a loop per class."""
    ce = nn.CrossEntropyLoss()(logits, target.long())
    score = torch.softmax(logits, dim=1)
    onehot = torch.cat([(target == i).unsqueeze(1) for i in range(num_classes)], dim=1).float()
    dice = 0.0
    for i in range(num_classes):
        s, t = score[:, i], onehot[:, i]
        intersect, y_sum, z_sum = torch.sum(s * t), torch.sum(t * t), torch.sum(s * s)
        dice = dice + 1 - (2 * intersect + 1e-5) / (z_sum + y_sum + 1e-5)
    return 0.2 * ce + 0.8 * dice / num_classes


def build(backbone: str, image_size: int, device: torch.device, published: bool, clicks: bool = False):
    torch.manual_seed(0)
    sam = sa.build_sam(backbone, seed=0)
    model = sa.inject(sam, sa.AdapterConfig(num_classes=8, image_size=image_size, clicks=clicks))
    if published:
        # inject switched on this project's attention path; the published code runs stock SAM's.
        disable_sdpa(sam.image_encoder)
        for blk in sam.image_encoder.blocks:
            blk.attn.qkv = PublishedLoRAqkv(blk.attn.qkv)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)


def step_fn(model, optimizer, images, target, published: bool, autocast_dtype, clicks: bool = False):
    # Every step draws the same clicks (slice keys (0, b)): the rounds' cost, not their luck, is timed.
    trainer = ClickTraining(model, rounds=3, seed=0) if clicks else None
    keys = torch.stack([torch.zeros(len(images), dtype=torch.long), torch.arange(len(images))], 1)

    def step():
        with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            if trainer is not None:
                logits, click_sum, count = trainer(images, target, keys)
            else:
                logits = model(images)["low_res_logits"]
        if published:
            loss = published_loss(logits.float(), target, 9)
        else:
            loss = segmentation_loss(logits.float(), target).total
        if trainer is not None:
            loss = loss + mean_click_loss(click_sum, count)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(steps: list, device: torch.device, repeats: int) -> list[tuple[float, float]]:
    """Median seconds per step and peak working memory (MiB, CUDA only) for each step function.

    The steps run in turn, round-robin, so that a slow spell of a shared machine spreads over
    every configuration. Peak memory is what a step allocates above what was resident before it
    (both models' weights and optimizer states), so each configuration is charged its own
    activations and gradients only.
    """
    for step in steps:
        step()  # warm-up (allocations, autotuning, the optimizer's state)
    times = [[] for _ in steps]
    peaks = [float("nan")] * len(steps)
    for repeat in range(repeats):
        for i, step in enumerate(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[i] = max(peaks[i] if repeat else 0.0, (torch.cuda.max_memory_allocated() - resident) / 2**20)
    return [(statistics.median(t), peak) for t, peak in zip(times, peaks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--image-size", type=int, default=None, help="default 256 on CPU, 512 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="default 2 on CPU, 12 on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.image_size or (512 if device.type == "cuda" else 256)
    batch = args.batch or (12 if device.type == "cuda" else 2)
    fast_dtype = torch.bfloat16 if device.type == "cuda" else None
    images = torch.rand(batch, 3, size, size, device=device)
    target = torch.randint(0, 9, (batch, size // 4, size // 4), device=device)

    fast = f"samed-adapter fastest ({'bf16' if fast_dtype else 'fp32'})"
    configs = (("published formulation (fp32)", True, None, False), (fast, False, fast_dtype, False),
               (f"{fast} + clicks (3 rounds)", False, fast_dtype, True))
    steps = []
    for _, published, dtype, clicks in configs:
        model, optimizer = build(args.backbone, size, device, published, clicks)
        steps.append(step_fn(model, optimizer, images, target, published, dtype, clicks))
    rows = [(name, batch / seconds, peak)
            for (name, *_), (seconds, peak) in zip(configs, measure(steps, device, args.repeats))]
    base_ips, base_mem = rows[0][1], rows[0][2]
    print(f"{args.backbone} at {size}, batch {batch}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"median of {args.repeats} steps")
    print("| configuration | images/s | step peak MiB | speed-up | memory ratio |")
    print("|---|---|---|---|---|")
    for name, ips, peak in rows:
        mem = "n/a" if peak != peak else f"{peak:.0f}"
        ratio = "n/a" if peak != peak else f"{peak / base_mem:.2f}"
        print(f"| {name} | {ips:.2f} | {mem} | {ips / base_ips:.2f}x | {ratio} |")
    (_, plain_ips, plain_mem), (_, click_ips, click_mem) = rows[1], rows[2]
    memory = "" if plain_mem != plain_mem else f", {click_mem / plain_mem:.2f}x the step memory"
    print(f"clicks: a step takes {plain_ips / click_ips:.2f}x the time of the same step without them{memory}")


if __name__ == "__main__":
    main()
