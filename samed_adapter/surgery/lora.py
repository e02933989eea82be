"""LoRA layers: the q/v bypass on SAM's fused `qkv` projection, and peft's Linear for the decoder.

Naming follows peft: the wrapped layer is `base_layer`, the bypass halves `lora_A` (in -> r) and
`lora_B` (r -> out). The fused projection carries two bypasses, `q` and `v`, so its tensors are
`qkv.q.lora_A.weight`, `qkv.q.lora_B.weight`, `qkv.v.lora_A.weight`, `qkv.v.lora_B.weight`.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn

from ..kernels import lora_qkv, lora_qkv_multi, row_adapter_index


class NonFiniteMergeError(ValueError):
    """Folding the bypass into the projection would give NaN or infinite weights."""


class LoraBypass(nn.Module):
    """x -> lora_B(lora_A(x)) with rank r and no bias; a fresh one is a no-op (B = 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def get_delta_weight(self) -> torch.Tensor:
        """(out, in) weight that the bypass adds to the layer it sits beside."""
        return self.lora_B.weight @ self.lora_A.weight


class MixedLora(NamedTuple):
    """Several adapters' bypasses for one LoraQKV, and which one each image of the batch uses."""

    a_q: torch.Tensor  # (n, r, C): lora_A of the query bypass, one per adapter
    b_q: torch.Tensor  # (n, C, r)
    a_v: torch.Tensor  # (n, r, C)
    b_v: torch.Tensor  # (n, C, r)
    image_adapter: torch.Tensor  # (B,) int: the adapter of each image


class LoraQKV(nn.Module):
    """A fused `attn.qkv` Linear (C -> 3C') with rank-r bypasses on the query and value thirds.

    y = qkv(x);  y[..., :C'] += scale * B_q A_q x;  y[..., 2C':] += scale * B_v A_v x.
    The key third is untouched. SAM's blocks have C' = C; a SAM 2 Hiera block that starts a
    stage widens the tokens, C' = 2C.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        if base_layer.out_features % 3:
            raise ValueError(
                f"expected a fused qkv Linear C -> 3C', got {base_layer.in_features} -> {base_layer.out_features}"
            )
        dim, out = base_layer.in_features, base_layer.out_features // 3
        self.base_layer = base_layer
        self.q = LoraBypass(dim, out, rank)
        self.v = LoraBypass(dim, out, rank)
        self.rank = rank
        self.scale = scale
        # While merged, `base_layer.weight` is a new tensor and the untouched stock weight waits
        # here, so that unmerge is exact however many times it is done.
        self._stock_weight: Optional[nn.Parameter] = None
        # Set only inside `mixing(...)`, a mixed-adapter forward (see resident.py).
        self._mixed: Optional[MixedLora] = None

    @property
    def merged(self) -> bool:
        return self._stock_weight is not None

    def get_delta_weight(self) -> torch.Tensor:
        """(3C', C) weight delta: B_q A_q in the query rows, B_v A_v in the value rows, zero keys."""
        zeros = self.q.lora_A.weight.new_zeros(self.base_layer.out_features // 3, self.base_layer.in_features)
        return self.scale * torch.cat([self.q.get_delta_weight(), zeros, self.v.get_delta_weight()], dim=0)

    def merge(self) -> None:
        """Fold the bypass into the projection (inference only: the bypass stops training)."""
        if self.merged:
            return
        stock = self.base_layer.weight
        with torch.no_grad():
            merged = stock + self.get_delta_weight().to(stock.dtype)
        if not torch.isfinite(merged).all():
            raise NonFiniteMergeError("merging would produce non-finite weights; the adapter's LoRA tensors are not usable")
        self._stock_weight = stock
        self.base_layer.weight = nn.Parameter(merged, requires_grad=False)

    def unmerge(self) -> None:
        """Put the exact stock weight back."""
        if self._stock_weight is not None:
            self.base_layer.weight = self._stock_weight
            self._stock_weight = None

    @contextmanager
    def mixing(self, mixed: MixedLora) -> Iterator["LoraQKV"]:
        """Within the block, forward uses `mixed`'s bypasses (image b: adapter image_adapter[b])
        instead of its own; x must then be (B, ..., C) with B = len(image_adapter)."""
        self._mixed = mixed
        try:
            yield self
        finally:
            self._mixed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., 3C')."""
        if self.merged:
            return self.base_layer(x)
        dim, out = self.base_layer.in_features, self.base_layer.out_features
        if self._mixed is not None:
            a_q, b_q, a_v, b_v, image_adapter = self._mixed
            x2d = x.reshape(-1, dim)
            rows = row_adapter_index(image_adapter, x2d.shape[0])
            y = lora_qkv_multi(x2d, self.base_layer.weight, self.base_layer.bias, a_q, b_q, a_v, b_v, self.scale, rows)
            return y.view(*x.shape[:-1], out)
        # The fused Triton kernel on CUDA; elsewhere one addmm into the output, no slice copies.
        y = lora_qkv(
            x.reshape(-1, dim), self.base_layer.weight, self.base_layer.bias,
            self.q.lora_A.weight, self.q.lora_B.weight, self.v.lora_A.weight, self.v.lora_B.weight, self.scale,
        )
        return y.view(*x.shape[:-1], out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, merged={self.merged}"


def wrap_linear_with_peft(layer: nn.Linear, rank: int, scale: float) -> nn.Module:
    """peft's own LoRA Linear around a plain Linear (adapter name "default", no dropout)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    alpha = scale * rank  # peft scales the bypass by alpha / r
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True)
    return PeftLoraLinear(layer, "default", config=config, r=rank, lora_alpha=alpha)


def is_peft_lora(module: nn.Module) -> bool:
    # Importing peft costs seconds (it pulls in transformers); if nobody has imported it yet,
    # no module can be one of its layers.
    if "peft" not in sys.modules:
        return False
    from peft.tuners.lora.layer import LoraLayer

    return isinstance(module, LoraLayer)
