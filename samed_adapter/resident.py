"""Several adapters resident on one SAM, and batches that mix them.

Resident adapters are kept as Adapter objects beside the stock tensors. `set_adapter` is a hot
swap. A mixed batch runs the encoder once, with each image's LoRA picked by index inside the
LoRA-qkv kernel (each block of rows belongs to one image), then the prompt encoder and decoder
once per adapter on that adapter's images.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Sequence, Union

import torch
from segment_anything.modeling import Sam

from .adapter import Adapter
from .lora import MixedLora
from .surgery import encoder_lora_layers, require_stock_state
from .transfer import load_head_values


def load_adapter(sam: Sam, source: Union[Adapter, str, os.PathLike], adapter_name: str, *,
                 allow_base_mismatch: bool = False) -> Adapter:
    """Validate an adapter against `sam` and keep it resident under `adapter_name` (not active)."""
    from .patching import validate

    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    adapter = source if isinstance(source, Adapter) else Adapter.load(source)
    stock = require_stock_state(sam)
    validate(sam, adapter, allow_base_mismatch=allow_base_mismatch)
    stock.adapters[adapter_name] = adapter
    return adapter


def delete_adapter(sam: Sam, adapter_name: str) -> None:
    stock = require_stock_state(sam)
    if adapter_name not in stock.adapters:
        raise KeyError(f"no resident adapter named {adapter_name!r}; resident: {sorted(stock.adapters)}")
    if adapter_name == stock.active_adapter:
        raise ValueError(f"{adapter_name!r} is the active adapter; set_adapter() another one before deleting it")
    del stock.adapters[adapter_name]


def resident_adapter(sam: Sam, adapter_name: str) -> Adapter:
    stock = require_stock_state(sam)
    try:
        return stock.adapters[adapter_name]
    except KeyError:
        raise KeyError(f"no resident adapter named {adapter_name!r}; resident: {sorted(stock.adapters)}") from None


def mixed_forward(model, images: torch.Tensor, adapter_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """`model(images)` with image b predicted by resident adapter `adapter_names[b]`.

    All adapters in one batch must share the encoder LoRA shape, image size and K.
    """
    sam = model.sam
    stock = require_stock_state(sam)
    if len(adapter_names) != images.shape[0]:
        raise ValueError(f"{len(adapter_names)} adapter names for a batch of {images.shape[0]} images")
    names = list(dict.fromkeys(adapter_names))
    adapters = [resident_adapter(sam, n) for n in names]
    reference = stock.config.structure_key()
    for name, adapter in zip(names, adapters):
        different = [f for (f, value), (_, ours) in zip(adapter.config.structure_key(), reference) if value != ours]
        if different:
            raise ValueError(
                f"adapter {name!r} differs from the active one in {different}; a mixed batch needs adapters of "
                "one shape (run such adapters in separate batches with set_adapter)"
            )
    device = images.device
    index = torch.tensor([names.index(n) for n in adapter_names], device=device)
    layers = encoder_lora_layers(sam)
    was_merged = model.merged
    saved = {k: v.clone() for k, v in _head_state(sam).items()}
    try:
        model.unmerge()
        with ExitStack() as mixing:
            for i, layer in layers.items():
                prefix = f"image_encoder.blocks.{i}.attn.qkv"
                dtype = layer.base_layer.weight.dtype
                stacks = [
                    torch.stack([a.tensors[f"{prefix}.{part}.lora_{ab}.weight"] for a in adapters]).to(device, dtype)
                    for part, ab in (("q", "A"), ("q", "B"), ("v", "A"), ("v", "B"))
                ]
                mixing.enter_context(layer.mixing(MixedLora(*stacks, index)))
            embeddings = sam.image_encoder(model.normalize(images))
        low_res, iou = None, None
        for j, adapter in enumerate(adapters):
            chosen = (index == j).nonzero().squeeze(1)
            load_head_values(sam, stock, adapter)
            part_low, part_iou = model.decode(embeddings[chosen])
            if low_res is None:
                low_res = part_low.new_empty((images.shape[0], *part_low.shape[1:]))
                iou = part_iou.new_empty((images.shape[0], *part_iou.shape[1:]))
            low_res[chosen] = part_low
            iou[chosen] = part_iou
    finally:
        with torch.no_grad():
            for key, value in _head_state(sam).items():
                value.copy_(saved[key])
        if was_merged:
            model.merge()
    return model.outputs(low_res, iou)


def _head_state(sam: Sam) -> dict[str, torch.Tensor]:
    state = {f"prompt_encoder.{k}": v for k, v in sam.prompt_encoder.state_dict(keep_vars=True).items()}
    state.update({f"mask_decoder.{k}": v for k, v in sam.mask_decoder.state_dict(keep_vars=True).items()})
    return state
