"""Random weights for stock models, for tests and demos that have no checkpoint."""

from __future__ import annotations

import torch


def randomize_weights(sam: torch.nn.Module, seed: int) -> None:
    """Draw every floating tensor of a SAM (or SAM 2) at random; norms stay near identity so
    activations stay sane. For tests and demos: stock initialises some tensors at zero."""
    generator = torch.Generator().manual_seed(seed)
    norms = {name for name, m in sam.named_modules() if "LayerNorm" in type(m).__name__}
    with torch.no_grad():
        for name, tensor in sam.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            module_name, _, leaf = name.rpartition(".")
            if module_name in norms:
                noise = noise * 0.1 + (1.0 if leaf == "weight" else 0.0)
            elif "gaussian" not in name:  # the prompt encoder's random features are N(0, 1) in stock too
                noise = noise * (0.02 if tensor.dim() > 1 else 0.1)
            tensor.copy_(noise)
