"""A tiny random SAM, images for it, and adapter configurations that between them cover every
structural variant patching handles (rank, blocks, decoder LoRA, another image size): the common
ground of the patching tests (test_patch, test_resident, test_hostile_input).

Adapters for them come from `samed_adapter.testing.random_adapter`, e.g.
``random_adapter(stock_sam(), CONFIGS["k3"], seed=1)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..adapter_file.config import AdapterConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from segment_anything.modeling import Sam

__all__ = ["CONFIGS", "SIZE", "images", "stock_sam"]

SIZE = 128

CONFIGS = {
    "k3": AdapterConfig(num_classes=3, image_size=SIZE, intensity_window=None),
    "clicks": AdapterConfig(num_classes=3, image_size=SIZE, intensity_window=None, clicks=True),
    "k5_rank2_blocks": AdapterConfig(num_classes=5, rank=2, lora_blocks=[1], image_size=SIZE),
    "decoder_lora": AdapterConfig(num_classes=3, image_size=SIZE, decoder_lora=True, decoder_lora_rank=2),
    "size_96": AdapterConfig(num_classes=2, image_size=96, lora_scale=0.5),
}


def stock_sam(seed: int = 0) -> "Sam":
    """``build_sam("tiny", seed=seed)``: random weights, the same for the same seed, so that an
    adapter made on one seed-0 SAM fits every other (and one made on seed 1 does not)."""
    from ..hosts.backbones import build_sam

    return build_sam("tiny", seed=seed)


def images(batch: int = 2, seed: int = 0) -> "torch.Tensor":
    """(batch, 3, SIZE, SIZE) uniform in [0, 1): already preprocessed inputs, the same for a seed."""
    import torch

    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
