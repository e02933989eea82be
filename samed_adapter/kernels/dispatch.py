"""Choose between the Triton kernels and the torch fallback for the fused LoRA-qkv projection.

The Triton path runs when the input is on CUDA, Triton imports, the environment variable
`SAMED_ADAPTER_KERNELS` is not "0", the dtype is fp32/fp16/bf16 and the frozen projection
needs no gradient; everything else takes the torch fallback. Triton is imported on first use only.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Optional

import torch

from .fallback import lora_qkv_multi_torch, lora_qkv_torch

ENV_VAR = "SAMED_ADAPTER_KERNELS"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernels_enabled() -> bool:
    """False when the environment variable SAMED_ADAPTER_KERNELS is "0" (read at every call)."""
    return os.environ.get(ENV_VAR, "1").strip() != "0"


@functools.lru_cache(maxsize=None)
def _kernel_module() -> Optional[ModuleType]:
    try:
        return importlib.import_module("samed_adapter.kernels.triton_lora_qkv")
    except Exception:  # no triton, or a triton too old for the kernels: use the fallback
        return None


def triton_available() -> bool:
    """Whether Triton imports and the kernels module loads (cached after the first call)."""
    return _kernel_module() is not None


def _check_shapes(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_q: torch.Tensor, b_q: torch.Tensor,
    a_v: torch.Tensor, b_v: torch.Tensor, stacked: bool,
) -> None:
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be (N, C), got shape {tuple(x2d.shape)}")
    dim = x2d.shape[1]
    # SAM's qkv is square per third (C -> 3C); a Hiera block at a stage boundary widens (C -> 3C').
    if weight.dim() != 2 or weight.shape[1] != dim or weight.shape[0] % 3:
        raise ValueError(f"weight must be (3C', C) with C = {dim}, got {tuple(weight.shape)}")
    out = weight.shape[0] // 3
    if bias is not None and tuple(bias.shape) != (3 * out,):
        raise ValueError(f"bias must be (3C',) = ({3 * out},), got {tuple(bias.shape)}")
    lead = tuple(a_q.shape[:1]) if stacked else ()
    if a_q.dim() != 2 + stacked or a_q.shape[-1] != dim:
        what = "(n, R, C)" if stacked else "(R, C)"
        raise ValueError(f"a_q must be {what} with C = {dim}, got {tuple(a_q.shape)}")
    rank = a_q.shape[-2]
    want_a, want_b = lead + (rank, dim), lead + (out, rank)
    for name, t, want in (("a_v", a_v, want_a), ("b_q", b_q, want_b), ("b_v", b_v, want_b)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _use_triton(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if not (x2d.is_cuda and kernels_enabled() and triton_available()):
        return False
    if weight.shape[0] != 3 * weight.shape[1]:  # the kernels tile square thirds (SAM's C -> 3C)
        return False
    # The kernels index with 32-bit offsets, and an empty grid is no launch at all.
    if not 0 < x2d.shape[0] * 3 * x2d.shape[1] < 2**31:
        return False
    if x2d.dtype not in _KERNEL_DTYPES or weight.dtype != x2d.dtype or (bias is not None and bias.dtype != x2d.dtype):
        return False
    # The kernels' backward treats the projection as frozen.
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
    return frozen or not torch.is_grad_enabled()


def _autocast_inputs(tensors: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """Under CUDA autocast, cast everything to the autocast dtype, as F.linear would."""
    if not torch.is_autocast_enabled("cuda"):
        return tensors
    dtype = torch.get_autocast_dtype("cuda")
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def lora_qkv(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_q: torch.Tensor, b_q: torch.Tensor,
    a_v: torch.Tensor, b_v: torch.Tensor, scale: float,
) -> torch.Tensor:
    """SAM's fused qkv projection with rank-R LoRA bypasses on the query and value thirds.

    y = x W^T + bias;  y[:, :C'] += scale * (x A_q^T) B_q^T;  y[:, 2C':] += scale * (x A_v^T) B_v^T.

    Args:
        x2d: (N, C) input rows.
        weight: (3C', C) frozen qkv weight (C' = C for SAM, 2C at a Hiera stage boundary;
            the Triton kernels serve C' = C, the torch fallback any); bias: (3C',) or None.
        a_q, a_v: (R, C) down-projections; b_q, b_v: (C', R) up-projections (cast to x's dtype).
        scale: the LoRA scale.
    Returns:
        (N, 3C') in x's dtype; differentiable in x2d and the LoRA tensors (and, on the torch path,
        in weight and bias too).
    """
    _check_shapes(x2d, weight, bias, a_q, b_q, a_v, b_v, stacked=False)
    if _use_triton(x2d, weight, bias):
        x2d, weight, bias, a_q, b_q, a_v, b_v = _autocast_inputs([x2d, weight, bias, a_q, b_q, a_v, b_v])
        dtype = x2d.dtype
        with torch.autocast("cuda", enabled=False):
            return _kernel_module().lora_qkv_triton(
                x2d, weight, bias, a_q.to(dtype), b_q.to(dtype), a_v.to(dtype), b_v.to(dtype), scale
            )
    return lora_qkv_torch(x2d, weight, bias, a_q, b_q, a_v, b_v, scale)


def lora_qkv_multi(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_q: torch.Tensor, b_q: torch.Tensor,
    a_v: torch.Tensor, b_v: torch.Tensor, scale: float, adapter_index: torch.Tensor,
) -> torch.Tensor:
    """`lora_qkv` with n adapters at once: row m uses adapter adapter_index[m].

    Args:
        a_q, a_v: (n, R, C); b_q, b_v: (n, C, R) stacked per adapter.
        adapter_index: (N,) integers in [0, n); see `row_adapter_index` to build it per image.
    Returns:
        (N, 3C). The Triton kernel serves inference (no gradient needed); training takes the
        differentiable torch fallback. The index range is checked, which costs one device sync.
    """
    _check_shapes(x2d, weight, bias, a_q, b_q, a_v, b_v, stacked=True)
    if adapter_index.shape != (x2d.shape[0],) or adapter_index.is_floating_point() or adapter_index.is_complex():
        raise ValueError(f"adapter_index must be ({x2d.shape[0]},) integers, got {adapter_index.dtype} "
                         f"{tuple(adapter_index.shape)}")
    n = a_q.shape[0]
    if adapter_index.numel():
        lo, hi = (int(v) for v in torch.aminmax(adapter_index))
        if lo < 0 or hi >= n:
            raise ValueError(f"adapter_index values must lie in [0, {n}), got [{lo}, {hi}]")
    lora = (a_q, b_q, a_v, b_v)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x2d, *lora))
    if _use_triton(x2d, weight, bias) and not needs_grad:
        x2d, weight, bias, *lora = _autocast_inputs([x2d, weight, bias, *lora])
        with torch.autocast("cuda", enabled=False):
            return _kernel_module().lora_qkv_multi_triton(
                x2d, weight, bias, *(t.to(x2d.dtype) for t in lora), scale, adapter_index.to(x2d.device)
            )
    return lora_qkv_multi_torch(x2d, weight, bias, a_q, b_q, a_v, b_v, scale, adapter_index.to(x2d.device))


def row_adapter_index(image_adapter: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row adapter index for rows grouped by image: image_adapter (B,) -> (rows,).

    `rows` must be a multiple of B; each image owns rows // B consecutive rows (true for SAM's
    encoder, whose windows stay in batch order after `window_partition`).
    """
    batch = image_adapter.shape[0]
    if image_adapter.dim() != 1 or batch == 0 or rows % batch:
        raise ValueError(f"{rows} rows cannot be split evenly over {tuple(image_adapter.shape)} images")
    return image_adapter.repeat_interleave(rows // batch)
