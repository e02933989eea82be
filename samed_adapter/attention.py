"""SAM's encoder attention through `F.scaled_dot_product_attention`, switchable per module.

The stock `Attention.forward` materialises the (B*heads, L, L) score matrix, adds the decomposed
relative-position terms, and runs softmax and the value product as separate ops. Here the
relative-position terms (computed exactly as `add_decomposed_rel_pos` does) become SDPA's
additive `attn_mask`, so that torch can pick a fused kernel (memory-efficient attention on CUDA)
instead of the separate score, softmax and product passes.

Windowed blocks also change order: stock pads the normalised tokens to a multiple of the window
and runs the qkv and output projections on the padded windows (at 512, 42 x 42 tokens for a
32 x 32 grid, 72 % more rows). A padded token is zero after padding, so its qkv is `qkv(0)`;
`windowed_block_forward` projects only the real tokens, fills the padding with `qkv(0)`, and
projects the output after the windows are put back, which gives the stock result with fewer
rows in both projections.

Switching is per instance and leaves no trace: `enable_sdpa` puts a `forward` attribute on each
stock `Attention` instance and on each windowed `Block` (a `functools.partial`, so the model
still deep-copies and pickles), `disable_sdpa` deletes them. Module types, parameters, buffers
and `state_dict` never change.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos, window_partition, window_unpartition
from torch import nn

# On the CPU a fresh tensor above glibc's mmap threshold (32 MiB at most) is new pages, and the
# page faults of writing it cost more than the bias arithmetic; at 512 one global block's bias is
# 48 MiB. Building the bias for a few heads at a time keeps each piece in reused heap memory.
_CPU_BIAS_CHUNK_BYTES = 16 << 20


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
        (B, L, L), contiguous, with bias[b, (h, w), (kh, kw)] = rel_h[b, h, w, kh] + rel_w[b, h, w, kw].
    """
    height, width = size
    rh = get_rel_pos(height, height, rel_pos_h)  # (H, H, head_dim)
    rw = get_rel_pos(width, width, rel_pos_w)  # (W, W, head_dim)
    batch, length, dim = q.shape
    r_q = q.reshape(batch, height, width, dim)
    # einsum returns permuted strides; made contiguous, the broadcast sum below is contiguous
    # too and the final reshape is a view rather than a second (B, L, L) copy.
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh).contiguous()  # (B, H, W, H)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw).contiguous()  # (B, H, W, W)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, length, length)


def attend(attn: Attention, qkv: torch.Tensor) -> torch.Tensor:
    """The attention between `attn.qkv` and `attn.proj`: qkv (B, H, W, 3C) -> (B, H, W, C)."""
    batch, height, width, _ = qkv.shape
    length = height * width
    heads = attn.num_heads
    # (3, B * heads, L, head_dim), as in stock.
    q, k, v = qkv.reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, batch * heads, length, -1)
    rows = batch * heads
    step = rows
    if attn.use_rel_pos and q.device.type == "cpu":
        step = max(1, _CPU_BIAS_CHUNK_BYTES // (length * length * q.element_size()))
    outs = []
    for start in range(0, rows, step):
        part = slice(start, start + step)
        mask: Optional[torch.Tensor] = None
        if attn.use_rel_pos:
            # The bias uses the unscaled queries, as stock does.
            mask = decomposed_rel_pos_bias(q[part], attn.rel_pos_h, attn.rel_pos_w, (height, width))
        outs.append(F.scaled_dot_product_attention(q[part], k[part], v[part], attn_mask=mask, scale=attn.scale))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (B * heads, L, head_dim)
    return out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)


def sdpa_attention_forward(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Stock `Attention.forward` via `F.scaled_dot_product_attention`: x (B, H, W, C) -> (B, H, W, C).

    Equal to the stock forward (and its gradients) up to float rounding; `attn.qkv` is called as
    a module, so a LoRA-wrapped qkv works unchanged.
    """
    return attn.proj(attend(attn, attn.qkv(x)))


def windowed_block_forward(block: Block, x: torch.Tensor) -> torch.Tensor:
    """Stock `Block.forward` of a windowed block, projecting only the unpadded tokens.

    x (B, H, W, C) -> (B, H, W, C). The rows of every qkv call stay grouped by image in batch
    order, as the mixed-adapter LoRA needs.
    """
    attn, size = block.attn, block.window_size
    shortcut = x
    x = block.norm1(x)
    batch, height, width, dim = x.shape
    qkv = attn.qkv(x)  # (B, H, W, 3C)
    pad_h, pad_w = -height % size, -width % size
    if pad_h or pad_w:
        # Stock pads with zeros before the projection: the padding's qkv is qkv(0) (per image,
        # so that a per-image adapter sees its own row).
        fill = attn.qkv(x.new_zeros(batch, 1, 1, dim))  # (B, 1, 1, 3C)
        qkv = torch.cat([qkv, fill.expand(batch, height, pad_w, -1)], dim=2)
        qkv = torch.cat([qkv, fill.expand(batch, pad_h, width + pad_w, -1)], dim=1)
    windows, padded = window_partition(qkv, size)  # (B * windows, ws, ws, 3C)
    out = window_unpartition(attend(attn, windows), size, padded, (height, width))  # (B, H, W, C)
    x = shortcut + attn.proj(out)
    return x + block.mlp(block.norm2(x))


def _is_ours(forward: object) -> bool:
    return isinstance(forward, functools.partial) and forward.func in (sdpa_attention_forward, windowed_block_forward)


def _targets(module: nn.Module) -> list[tuple[nn.Module, Callable]]:
    """(module, our forward for it) for every encoder Attention and windowed Block under `module`."""
    found = []
    for m in module.modules():
        if isinstance(m, Attention):
            found.append((m, sdpa_attention_forward))
        elif isinstance(m, Block) and m.window_size > 0 and isinstance(m.attn, Attention):
            found.append((m, windowed_block_forward))
    return found


def enable_sdpa(module: nn.Module) -> int:
    """Run every SAM encoder `Attention` under `module` (an image encoder, a Sam, ...) through SDPA,
    and every windowed `Block` through `windowed_block_forward`.

    Sets instance-level `forward`s; idempotent. A module that already carries some other
    instance-level `forward` is left alone. Returns how many `Attention` modules now run SDPA.
    """
    count = 0
    for target, forward in _targets(module):
        current: Callable | None = target.__dict__.get("forward")
        if current is None:
            target.forward = functools.partial(forward, target)
        elif not _is_ours(current):
            continue
        count += isinstance(target, Attention)
    return count


def disable_sdpa(module: nn.Module) -> int:
    """Undo `enable_sdpa`: remove the instance `forward`s it set (only those).

    Returns how many `Attention` modules it switched back.
    """
    count = 0
    for target, _ in _targets(module):
        if _is_ours(target.__dict__.get("forward")):
            del target.forward
            count += isinstance(target, Attention)
    return count


def sdpa_enabled(module: nn.Module) -> bool:
    """Whether every SAM encoder `Attention` under `module` runs SDPA (False if there is none)."""
    attns = [m for m in module.modules() if isinstance(m, Attention)]
    return bool(attns) and all(_is_ours(a.__dict__.get("forward")) for a in attns)
