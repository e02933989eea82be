"""Several adapters resident on one SAM, and batches that mix them.

Resident adapters are kept as Adapter objects beside the stock tensors. `set_adapter` is a hot
swap. A mixed batch runs the encoder once, with each image's LoRA picked by index inside the
LoRA-qkv kernel (each block of rows belongs to one image), then the prompt encoder and decoder
once per adapter on that adapter's images.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch
from segment_anything.modeling import Sam

from .adapter import Adapter
from .surgery import StockState, encoder_lora_layers, get_stock_state
from .transfer import load_head_values

_STRUCTURE = ("rank", "lora_blocks", "lora_scale", "image_size", "num_classes", "decoder_lora", "decoder_lora_rank")


def _stock(sam: Sam) -> StockState:
    stock = get_stock_state(sam)
    if stock is None:
        raise RuntimeError("this SAM is not patched; patch it first")
    return stock


def load_adapter(sam: Sam, source: Union[Adapter, str, os.PathLike], adapter_name: str, *,
                 allow_base_mismatch: bool = False) -> Adapter:
    """Validate an adapter against `sam` and keep it resident under `adapter_name` (not active)."""
    from .patching import _load, validate

    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    adapter = source if isinstance(source, Adapter) else _load(source)
    stock = _stock(sam)
    validate(sam, adapter, allow_base_mismatch=allow_base_mismatch)
    stock.adapters[adapter_name] = adapter
    return adapter


def delete_adapter(sam: Sam, adapter_name: str) -> None:
    stock = _stock(sam)
    if adapter_name not in stock.adapters:
        raise KeyError(f"no resident adapter named {adapter_name!r}; resident: {sorted(stock.adapters)}")
    if adapter_name == stock.active_adapter:
        raise ValueError(f"{adapter_name!r} is the active adapter; set_adapter() another one before deleting it")
    del stock.adapters[adapter_name]


def resident_adapter(sam: Sam, adapter_name: str) -> Adapter:
    stock = _stock(sam)
    try:
        return stock.adapters[adapter_name]
    except KeyError:
        raise KeyError(f"no resident adapter named {adapter_name!r}; resident: {sorted(stock.adapters)}") from None


def mixed_forward(model, images: torch.Tensor, adapter_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """`model(images)` with image b predicted by resident adapter `adapter_names[b]`.

    All adapters in one batch must share the encoder LoRA shape, image size and K.
    """
    sam = model.sam
    stock = _stock(sam)
    if len(adapter_names) != images.shape[0]:
        raise ValueError(f"{len(adapter_names)} adapter names for a batch of {images.shape[0]} images")
    names = list(dict.fromkeys(adapter_names))
    adapters = [resident_adapter(sam, n) for n in names]
    reference = stock.config
    for name, adapter in zip(names, adapters):
        different = [f for f in _STRUCTURE if getattr(adapter.config, f) != getattr(reference, f)]
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
        for i, layer in layers.items():
            prefix = f"image_encoder.blocks.{i}.attn.qkv"
            dtype = layer.base_layer.weight.dtype
            stacks = [
                torch.stack([a.tensors[f"{prefix}.{part}.lora_{ab}.weight"] for a in adapters]).to(device, dtype)
                for part, ab in (("q", "A"), ("q", "B"), ("v", "A"), ("v", "B"))
            ]
            layer.mixed = (*stacks, index)
        embeddings = sam.image_encoder(model.normalize(images))
        for layer in layers.values():
            layer.mixed = None
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
        for layer in layers.values():
            layer.mixed = None
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
