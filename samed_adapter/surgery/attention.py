"""SAM's encoder attention through `F.scaled_dot_product_attention`, switchable per module.

The stock `Attention.forward` materialises the (B*heads, L, L) score matrix, adds the decomposed
relative-position terms, and runs softmax and the value product as separate ops. Here the
relative-position terms (computed exactly as `add_decomposed_rel_pos` does) become SDPA's
additive `attn_mask`, so that torch can pick a fused kernel (memory-efficient attention on CUDA)
instead of the separate score, softmax and product passes.

Windowed blocks also skip the padding's wasted work. Stock pads the normalised tokens to a
multiple of the window and runs the qkv projection, every window's attention rows and the
output projection on the padded grid (at 512, 42 x 42 tokens for a 32 x 32 grid; at 256,
28 x 28 for 16 x 16), then drops the padded rows. A padded token is zero after padding, so its
qkv is `qkv(0)`: `windowed_block_forward` projects only the real tokens, fills the padding's
keys and values with `qkv(0)`, computes attention rows for real queries only (a window on the
grid's edge has fewer), and projects the output of the real tokens. The result is stock's, up to
float rounding, with fewer rows everywhere.

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
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from torch import nn

# On the CPU a fresh tensor above glibc's mmap threshold (32 MiB at most) is new pages, and the
# page faults of writing it cost more than the bias arithmetic; at 512 one global block's bias is
# 48 MiB. Building the bias for a few heads at a time keeps each piece in reused heap memory
# (4 MiB, one global head at 512, measured fastest of 1 to 64 MiB).
_CPU_BIAS_CHUNK_BYTES = 4 << 20


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, q_size: tuple[int, int]
) -> torch.Tensor:
    """The additive attention bias of `add_decomposed_rel_pos`.

    Args:
        q: (B, qh * qw, head_dim) unscaled queries (B counts batch and heads together).
        rel_h, rel_w: (qh, kh, head_dim), (qw, kw, head_dim) relative-position embeddings per
            (query, key) coordinate pair, as `get_rel_pos` returns them (cropped to the first qh
            or qw query coordinates for queries in a window's top-left corner).
        q_size: (qh, qw).
    Returns:
        (B, qh * qw, kh * kw), contiguous, with
        bias[b, (h, w), (i, j)] = q[b, (h, w)] . rel_h[h, i] + q[b, (h, w)] . rel_w[w, j].
    """
    height, width = q_size
    batch, length, dim = q.shape
    r_q = q.reshape(batch, height, width, dim)
    # einsum returns permuted strides; made contiguous, the broadcast sum below is contiguous
    # too and the final reshape is a view rather than a second (B, Lq, Lk) copy.
    bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h).contiguous()  # (B, qh, qw, kh)
    bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w).contiguous()  # (B, qh, qw, kw)
    return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(batch, length, -1)


def _explicit_scores(*tensors: torch.Tensor) -> bool:
    # On the CPU, SDPA cannot differentiate its mask in a fused kernel and falls back to a math
    # path with extra passes for fully masked rows; one baddbmm and a softmax are faster there.
    return (tensors[0].device.type == "cpu" and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors))


def attend(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_size: tuple[int, int], k_size: tuple[int, int],
) -> torch.Tensor:
    """Multi-head attention between `attn.qkv` and `attn.proj`, with SAM's relative positions.

    Args:
        q: (B, qh * qw, C) queries, the top-left (qh, qw) corner of a (kh, kw) window
            (q_size == k_size for whole windows and global attention).
        k, v: (B, kh * kw, C).
    Returns:
        (B, qh * qw, C), the heads concatenated as stock does.
    """
    batch, length, dim = q.shape
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B * heads, L, head_dim)
        return t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2).reshape(batch * heads, t.shape[1], -1)

    q, k, v = split(q), split(k), split(v)
    rel: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    if attn.use_rel_pos:
        rel = (get_rel_pos(k_size[0], k_size[0], attn.rel_pos_h)[: q_size[0]],
               get_rel_pos(k_size[1], k_size[1], attn.rel_pos_w)[: q_size[1]])
    explicit = _explicit_scores(q, k, v, *(rel or ()))
    rows = batch * heads
    step = rows
    if rel is not None and q.device.type == "cpu":
        step = max(1, _CPU_BIAS_CHUNK_BYTES // (length * k.shape[1] * q.element_size()))
    outs = []
    for start in range(0, rows, step):
        part = slice(start, start + step)
        # The bias uses the unscaled queries, as stock does.
        mask = None if rel is None else decomposed_rel_pos_bias(q[part], *rel, q_size)
        if explicit:
            k_t = k[part].transpose(1, 2)
            if mask is None:
                scores = (q[part] * attn.scale) @ k_t
            else:
                scores = torch.baddbmm(mask, q[part], k_t, alpha=attn.scale)  # bias + scale * q kᵀ
            outs.append(scores.softmax(dim=-1) @ v[part])
        else:
            outs.append(F.scaled_dot_product_attention(q[part], k[part], v[part], attn_mask=mask, scale=attn.scale))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (B * heads, Lq, head_dim)
    return out.view(batch, heads, length, -1).transpose(1, 2).reshape(batch, length, dim)


def sdpa_attention_forward(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Stock `Attention.forward` via `attend`: x (B, H, W, C) -> (B, H, W, C).

    Equal to the stock forward (and its gradients) up to float rounding; `attn.qkv` is called as
    a module, so a LoRA-wrapped qkv works unchanged.
    """
    batch, height, width, dim = x.shape
    q, k, v = attn.qkv(x).reshape(batch, height * width, 3, dim).unbind(2)
    out = attend(attn, q, k, v, (height, width), (height, width))
    return attn.proj(out.view(batch, height, width, dim))


def _to_windows(t: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, nr * h, nc * w, D) -> (B * nr * nc, h * w, D) for a (nr, nc) grid of (h, w) windows."""
    (nr, nc), (h, w) = grid, size
    batch, dim = t.shape[0], t.shape[-1]
    return t.reshape(batch, nr, h, nc, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(batch * nr * nc, h * w, dim)


def _from_windows(t: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `_to_windows`: (B * nr * nc, h * w, D) -> (B, nr * h, nc * w, D)."""
    (nr, nc), (h, w) = grid, size
    dim = t.shape[-1]
    return t.reshape(-1, nr, nc, h, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, nr * h, nc * w, dim)


def _spans(extent: int, size: int) -> list[tuple[int, int, int]]:
    """(first window, windows, query rows per window) for the whole windows and the cut last one."""
    spans = [(0, extent // size, size)] if extent >= size else []
    if extent % size:
        spans.append((extent // size, 1, extent % size))
    return spans


def windowed_block_forward(block: Block, x: torch.Tensor) -> torch.Tensor:
    """Stock `Block.forward` of a windowed block without the padding's projections and queries.

    x (B, H, W, C) -> (B, H, W, C). The rows of every qkv call stay grouped by image in batch
    order, as the mixed-adapter LoRA needs.
    """
    attn, size = block.attn, block.window_size
    shortcut = x
    x = block.norm1(x)
    batch, height, width, dim = x.shape
    qkv = attn.qkv(x)  # (B, H, W, 3C)
    q, kv = qkv[..., :dim], qkv[..., dim:]
    pad_h, pad_w = -height % size, -width % size
    if pad_h or pad_w:
        # Stock pads with zeros before the projection: the padding's keys and values are those
        # of qkv(0) (per image, so that a per-image adapter sees its own row).
        fill = attn.qkv(x.new_zeros(batch, 1, 1, dim))[..., dim:]  # (B, 1, 1, 2C)
        kv = torch.cat([kv, fill.expand(batch, height, pad_w, -1)], dim=2)
        kv = torch.cat([kv, fill.expand(batch, pad_h, width + pad_w, -1)], dim=1)
    # Windows on the last row or column hold fewer real queries: attend in up to four groups of
    # equal query shape, each over its windows' full (size x size) keys.
    rows = []
    for r0, nr, qh in _spans(height, size):
        parts = []
        for c0, nc, qw in _spans(width, size):
            grid = (nr, nc)
            queries = _to_windows(q[:, r0 * size : r0 * size + nr * qh, c0 * size : c0 * size + nc * qw], grid, (qh, qw))
            keys_values = _to_windows(kv[:, r0 * size : (r0 + nr) * size, c0 * size : (c0 + nc) * size], grid, (size, size))
            k, v = keys_values.chunk(2, dim=-1)
            out = attend(attn, queries, k, v, (qh, qw), (size, size))
            parts.append(_from_windows(out, grid, (qh, qw)))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)  # (B, H, W, C)
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
    """Whether every SAM encoder `Attention` and windowed `Block` under `module` runs this
    module's forward (False if there is none)."""
    targets = _targets(module)
    return bool(targets) and all(_is_ours(m.__dict__.get("forward")) for m, _ in targets)
