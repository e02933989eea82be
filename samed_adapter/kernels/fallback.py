"""Plain-torch forms of the fused LoRA-qkv projection (any device, any dtype, autograd as usual).

Both avoid writing slices of the output: the two bypasses become one (N, 2R) down-projection
and one block-structured up-projection accumulated into the output by `addmm_`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def block_up_weight(b_q: torch.Tensor, b_v: torch.Tensor) -> torch.Tensor:
    """(3C', 2R) up-projection [[B_q, 0], [0, 0], [0, B_v]] from b_q, b_v (C', R).

    With stacked (n, C', R) inputs: (3C', n * 2R), adapter i in columns [2R i, 2R (i + 1)).
    """
    q = F.pad(b_q, (0, b_q.shape[-1]))  # (..., C, 2R): [B_q, 0]
    v = F.pad(b_v, (b_v.shape[-1], 0))  # (..., C, 2R): [0, B_v]
    if q.dim() == 3:  # (n, C, 2R) -> (C, n * 2R)
        q = q.permute(1, 0, 2).reshape(q.shape[1], -1)
        v = v.permute(1, 0, 2).reshape(v.shape[1], -1)
    return torch.cat([q, q.new_zeros(q.shape), v], dim=0)


def lora_qkv_torch(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_q: torch.Tensor, b_q: torch.Tensor,
    a_v: torch.Tensor, b_v: torch.Tensor, scale: float,
) -> torch.Tensor:
    """x2d (N, C) -> (N, 3C') = x W^T + bias, + scale * B_q A_q x on the query third and
    scale * B_v A_v x on the value third; a_q/a_v (R, C), b_q/b_v (C', R) (C' = C for SAM)."""
    out = F.linear(x2d, weight, bias)
    a = torch.cat([a_q, a_v], dim=0)  # (2R, C): both down-projections in one product
    s = F.linear(x2d, a.to(x2d.dtype))  # (N, 2R)
    b = block_up_weight(b_q, b_v)  # (3C, 2R)
    # Casts to the output's dtype: under autocast F.linear may return a lower precision than the
    # LoRA tensors have, and the in-place addmm_ is not autocast.
    return out.addmm_(s.to(out.dtype), b.t().to(out.dtype), alpha=scale)


def lora_qkv_multi_torch(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_q: torch.Tensor, b_q: torch.Tensor,
    a_v: torch.Tensor, b_v: torch.Tensor, scale: float, adapter_index: torch.Tensor,
) -> torch.Tensor:
    """Like `lora_qkv_torch`, but row m uses adapter adapter_index[m] (N,) of stacked
    a_q/a_v (n, R, C) and b_q/b_v (n, C, R).

    Every row is projected through all n adapters' A (an (N, 2nR) product, small next to the
    (N, 3C) one for a few adapters), the other adapters' columns are zeroed, and one
    block-structured (3C, 2nR) product adds the bypasses: no gathers of per-row weights, no
    loops, deterministic gradients.
    """
    n, rank, dim = a_q.shape
    a = torch.cat([a_q, a_v], dim=1).reshape(n * 2 * rank, dim)  # adapter i: rows [2R i, 2R (i + 1))
    out = F.linear(x2d, weight, bias)
    s = F.linear(x2d, a.to(x2d.dtype)).view(-1, n, 2 * rank)
    keep = F.one_hot(adapter_index.long(), n).to(s.dtype).unsqueeze(-1)  # (N, n, 1)
    s = (s * keep).view(-1, n * 2 * rank)
    b = block_up_weight(b_q, b_v)  # (3C, 2nR)
    return out.addmm_(s.to(out.dtype), b.t().to(out.dtype), alpha=scale)
