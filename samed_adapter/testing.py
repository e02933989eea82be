"""Helpers for tests, benchmarks and demos that have no trained adapter at hand."""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from .adapter import Adapter
from .config import AdapterConfig


def random_adapter(sam: Sam, config: AdapterConfig, *, seed: int = 0, scale: float = 0.05) -> Adapter:
    """An adapter for stock `sam` whose every trainable tensor is moved randomly off its start.

    Not a trained model: a fresh adapter is a no-op in the encoder (LoRA B = 0), which would let
    tests of patching pass trivially. `sam` is patched and unpatched again, so it ends stock.
    """
    from .patching import inject, unpatch

    torch.manual_seed(seed)
    model = inject(sam, config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)
    adapter = model.adapter()
    unpatch(sam)
    return adapter
