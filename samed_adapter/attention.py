"""SAM's encoder attention through `F.scaled_dot_product_attention`, switchable per module.

The stock `Attention.forward` materialises the (B*heads, L, L) score matrix, adds the decomposed
relative-position terms, and runs softmax and the value product as separate ops. Here the
relative-position terms (computed exactly as `add_decomposed_rel_pos` does) become SDPA's
additive `attn_mask`, so that torch can pick a fused kernel (memory-efficient attention on CUDA)
instead of the separate score, softmax and product passes.

Switching is per instance and leaves no trace: `enable_sdpa` puts a `forward` attribute on each
stock `Attention` instance (a `functools.partial`, so the model still deep-copies and pickles),
`disable_sdpa` deletes it. Module types, parameters, buffers and `state_dict` never change.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The additive attention bias of `add_decomposed_rel_pos` for square (q == k) windows.

    Args:
        q: (B, L, head_dim) unscaled queries, L = H * W (B counts batch and heads together).
        rel_pos_h, rel_pos_w: (2H - 1, head_dim), (2W - 1, head_dim) (resized by `get_rel_pos`
            if their length differs, as in stock).
        size: (H, W).
    Returns:
        (B, L, L) with bias[b, (h, w), (kh, kw)] = rel_h[b, h, w, kh] + rel_w[b, h, w, kw].
    """
    height, width = size
    rh = get_rel_pos(height, height, rel_pos_h)  # (H, H, head_dim)
    rw = get_rel_pos(width, width, rel_pos_w)  # (W, W, head_dim)
    batch, length, dim = q.shape
    r_q = q.reshape(batch, height, width, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)  # (B, H, W, H)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)  # (B, H, W, W)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, length, length)


def sdpa_attention_forward(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Stock `Attention.forward` via `F.scaled_dot_product_attention`: x (B, H, W, C) -> (B, H, W, C).

    Equal to the stock forward (and its gradients) up to float rounding; `attn.qkv` is called as
    a module, so a LoRA-wrapped qkv works unchanged.
    """
    batch, height, width, _ = x.shape
    length = height * width
    heads = attn.num_heads
    # (3, B, heads, L, head_dim), as in stock.
    qkv = attn.qkv(x).reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    mask: Optional[torch.Tensor] = None
    if attn.use_rel_pos:
        # The bias uses the unscaled queries, as stock does.
        bias = decomposed_rel_pos_bias(
            q.reshape(batch * heads, length, -1), attn.rel_pos_h, attn.rel_pos_w, (height, width)
        )
        mask = bias.view(batch, heads, length, length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)  # (B, heads, L, hd)
    out = out.permute(0, 2, 1, 3).reshape(batch, height, width, -1)
    return attn.proj(out)


def _is_ours(forward: object) -> bool:
    return isinstance(forward, functools.partial) and forward.func is sdpa_attention_forward


def _attentions(module: nn.Module) -> list[Attention]:
    return [m for m in module.modules() if isinstance(m, Attention)]


def enable_sdpa(module: nn.Module) -> int:
    """Run every SAM encoder `Attention` under `module` (an image encoder, a Sam, ...) through SDPA.

    Sets an instance-level `forward`; idempotent. An `Attention` that already carries some other
    instance-level `forward` is left alone. Returns how many modules now run SDPA.
    """
    count = 0
    for attn in _attentions(module):
        current: Callable | None = attn.__dict__.get("forward")
        if current is None:
            attn.forward = functools.partial(sdpa_attention_forward, attn)
        elif not _is_ours(current):
            continue
        count += 1
    return count


def disable_sdpa(module: nn.Module) -> int:
    """Undo `enable_sdpa`: remove the instance `forward` it set (only that). Returns how many."""
    count = 0
    for attn in _attentions(module):
        if _is_ours(attn.__dict__.get("forward")):
            del attn.forward
            count += 1
    return count


def sdpa_enabled(module: nn.Module) -> bool:
    """Whether every SAM encoder `Attention` under `module` runs SDPA (False if there is none)."""
    attns = _attentions(module)
    return bool(attns) and all(_is_ours(a.__dict__.get("forward")) for a in attns)
