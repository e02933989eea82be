"""The q/v LoRA bypass on SAM's fused qkv projection: five ways, in one run.

  frozen      the stock qkv Linear alone (C -> 3C), the floor;
  published   SAMed's formulation: separate A/B nn.Linear modules and in-place slice additions
              `qkv[..., :C] += new_q; qkv[..., -C:] += new_v`;
  peft        peft's LoRA Linear on the whole fused C -> 3C Linear (the closest peft can do: it
              adapts all three thirds, keys included);
  fallback    this project's torch path (`lora_qkv_torch`: one down and one block-structured up
              product added by addmm_);
  kernel      this project's Triton kernels (`lora_qkv` on CUDA; "n/a" elsewhere).

Forward, and forward+backward with W frozen (gradients for x and the LoRA tensors): median time,
peak memory above what was allocated before the call (CUDA only), and ratios to `frozen`.
Prints a Markdown table.

    python benchmarks/bench_lora_qkv.py [--device cuda] [--dtype bfloat16] [--tokens 24576] [--dim 768] [--rank 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from samed_adapter.kernels import lora_qkv, lora_qkv_torch, triton_available

Step = Callable[[], torch.Tensor]


class PublishedLoraQKV(nn.Module):
    """SAMed's `_LoRA_qkv`: the stock qkv plus separate A/B Linears and slice additions."""

    def __init__(self, qkv: nn.Linear, a_q: nn.Linear, b_q: nn.Linear, a_v: nn.Linear, b_v: nn.Linear) -> None:
        super().__init__()
        self.qkv, self.a_q, self.b_q, self.a_v, self.b_v = qkv, a_q, b_q, a_v, b_v
        self.dim = qkv.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        new_q = self.b_q(self.a_q(x))
        new_v = self.b_v(self.a_v(x))
        qkv[..., : self.dim] += new_q
        qkv[..., -self.dim :] += new_v
        return qkv


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps: dict[str, Step], device: torch.device, repeats: int, warmup: int) -> dict[str, tuple]:
    """name -> (median seconds, peak MiB above what was allocated before the call, None off CUDA).

    Round-robin over the methods, so that a slow spell of a shared machine hits them all alike.
    """
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, Optional[float]] = {name: None for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                peaks[name] = max(peaks[name] or 0.0, peak)
    return {name: (statistics.median(times[name]), peaks[name]) for name in steps}


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """name -> forward(x) for every method, all sharing the same frozen weight and LoRA values."""
    dim, rank, scale = args.dim, args.rank, 1.0
    torch.manual_seed(0)
    qkv = nn.Linear(dim, 3 * dim).to(device, dtype).requires_grad_(False)

    def lin(i: int, o: int) -> nn.Linear:
        layer = nn.Linear(i, o, bias=False).to(device, dtype)
        nn.init.normal_(layer.weight, std=i**-0.5)  # nonzero B: no shortcut for anyone
        return layer

    a_q, b_q, a_v, b_v = lin(dim, rank), lin(rank, dim), lin(dim, rank), lin(rank, dim)
    published = PublishedLoraQKV(qkv, a_q, b_q, a_v, b_v)
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    config = LoraConfig(r=rank, lora_alpha=rank * scale, lora_dropout=0.0)
    peft_layer = PeftLoraLinear(nn.Linear(dim, 3 * dim).to(device, dtype), "default", config=config, r=rank,
                                lora_alpha=rank * scale)
    peft_layer.base_layer.load_state_dict(qkv.state_dict())
    peft_layer.base_layer.requires_grad_(False)
    nn.init.normal_(peft_layer.lora_B["default"].weight, std=rank**-0.5)
    peft_layer.to(device, dtype)
    lora = (a_q.weight, b_q.weight, a_v.weight, b_v.weight)
    methods: dict[str, Callable] = {
        "frozen qkv Linear": qkv,
        "published (slice +=)": published,
        "peft LoRA on fused qkv": peft_layer,
        "fallback (addmm_)": lambda x: lora_qkv_torch(x, qkv.weight, qkv.bias, *lora, scale),
    }
    if device.type == "cuda" and triton_available():
        methods["kernel (Triton)"] = lambda x: lora_qkv(x, qkv.weight, qkv.bias, *lora, scale)
    else:
        methods["kernel (Triton)"] = None
    methods["_params"] = lambda: [p for m in (published, peft_layer) for p in m.parameters() if p.requires_grad]
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--tokens", type=int, default=None, help="rows N (default 24*1024 on CUDA, 4*1024 on CPU)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    tokens = args.tokens or (24 * 1024 if on_cuda else 4 * 1024)
    repeats = args.repeats or (50 if on_cuda else 11)
    methods = build(args, device, dtype)
    params = methods.pop("_params")()

    x = torch.randn(tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, 3 * args.dim, device=device, dtype=dtype)

    def fwd(forward: Callable) -> Step:
        def step() -> torch.Tensor:
            with torch.no_grad():
                return forward(x)
        return step

    def fwd_bwd(forward: Callable) -> Step:
        def step() -> torch.Tensor:
            x.grad = None
            for p in params:
                p.grad = None
            y = forward(x)
            y.backward(grad)
            return y
        return step

    live = {name: f for name, f in methods.items() if f is not None}
    forward_only = measure({name: fwd(f) for name, f in live.items()}, device, repeats, 2)
    both = measure({name: fwd_bwd(f) for name, f in live.items()}, device, repeats, 2)
    results: dict[str, Optional[tuple]] = {
        name: (*forward_only[name], *both[name]) if name in live else None for name in methods
    }
    base = results["frozen qkv Linear"]
    name = torch.cuda.get_device_name(device) if on_cuda else "CPU"
    print(f"\nLoRA-qkv, {name}, {dtype}, N={tokens}, C={args.dim}, r={args.rank}, median of {repeats}\n")
    print("| method | fwd ms | fwd × frozen | fwd+bwd ms | fwd+bwd × frozen | fwd peak MiB | fwd+bwd peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, res in results.items():
        if res is None:
            print(f"| {name} | n/a (needs CUDA) | | | | | |")
            continue
        t_f, m_f, t_b, m_b = res
        mem = [f"{m:.0f}" if m is not None else "n/a" for m in (m_f, m_b)]
        print(f"| {name} | {t_f * 1e3:.2f} | {t_f / base[0]:.2f} | {t_b * 1e3:.2f} | {t_b / base[2]:.2f} | "
              f"{mem[0]} | {mem[1]} |")


if __name__ == "__main__":
    main()
