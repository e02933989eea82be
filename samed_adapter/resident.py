"""Several adapters resident on one SAM, and batches that mix them.

Resident adapters are kept as Adapter objects beside the stock tensors. `set_adapter` is a hot
swap. A mixed batch runs the encoder once, with each image's LoRA picked by index inside the
LoRA-qkv kernel (each block of rows belongs to one image), then the prompt encoder and decoder
once per adapter on that adapter's images; adapters of another K or decoder variant than the
live one run on decoders from the decoder cache (see surgery.MAX_CACHED_DECODERS).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Sequence, Union

from .adapter_file.config import AdapterConfig

import torch
from segment_anything.modeling import Sam

from .adapter_file.adapter import Adapter
from .surgery.lora import MixedLora
from .surgery.structure import (
    decoder_key,
    decoder_structure_matches,
    encoder_lora_layers,
    keep_decoder,
    require_stock_state,
    take_decoder,
)
from .surgery.transfer import load_head_values

# SAMed.forward's dict, or with adapters of several K its values as lists of one tensor per image.
MixedOutputs = dict[str, Union[torch.Tensor, list[torch.Tensor]]]


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
    # Cached decoders of structures no remaining adapter has go with it.
    in_use = {decoder_key(a.config) for a in stock.adapters.values()}
    for key in [k for k in stock.decoders if k not in in_use]:
        del stock.decoders[key]


def resident_adapter(sam: Sam, adapter_name: str) -> Adapter:
    stock = require_stock_state(sam)
    try:
        return stock.adapters[adapter_name]
    except KeyError:
        raise KeyError(f"no resident adapter named {adapter_name!r}; resident: {sorted(stock.adapters)}") from None


def mixed_forward(model, images: torch.Tensor, adapter_names: Sequence[str]) -> MixedOutputs:
    """`model(images)` with image b predicted by resident adapter `adapter_names[b]`.

    The adapters may differ in K, encoder LoRA rank and scale, and decoder variant; they must
    share the image size and the encoder blocks that carry LoRA (one encoder pass serves them
    all). Lower ranks are zero-padded to the highest in the batch, and a scale other than the
    live one is folded into that adapter's lora_B, so each image gets its own bypass.

    Returns:
        When every adapter has the same K, the dict of `SAMed.forward`. Otherwise the same keys
        with a list of one tensor per image: "masks" (K_b+1, S, S), "low_res_logits"
        (K_b+1, 4g, 4g), "iou_predictions" (K_b+1,).
    """
    sam = model.sam
    stock = require_stock_state(sam)
    if len(adapter_names) != images.shape[0]:
        raise ValueError(f"{len(adapter_names)} adapter names for a batch of {images.shape[0]} images")
    names = list(dict.fromkeys(adapter_names))
    adapters = [resident_adapter(sam, n) for n in names]
    _check_shared_encoder(stock.config, names, adapters)
    index = torch.tensor([names.index(n) for n in adapter_names], device=images.device)
    was_merged = model.merged
    saved = {k: v.clone() for k, v in _head_state(sam).items()}
    try:
        model.unmerge()
        embeddings, extra = _mixed_encoder(model, images, adapters, index)
        outputs: list = [None] * images.shape[0]
        for j, adapter in enumerate(adapters):
            chosen = (index == j).nonzero().squeeze(1)
            low_res, iou = _decode_with(model, stock, adapter, embeddings[chosen], [f[chosen] for f in extra])
            part = model.outputs(low_res, iou)
            for row, b in enumerate(chosen.tolist()):
                outputs[b] = {key: value[row] for key, value in part.items()}
    finally:
        with torch.no_grad():
            for key, value in _head_state(sam).items():
                value.copy_(saved[key])
        if was_merged:
            model.merge()
    if len({a.config.num_classes for a in adapters}) == 1:
        return {key: torch.stack([o[key] for o in outputs]) for key in outputs[0]}
    return {key: [o[key] for o in outputs] for key in outputs[0]}


def _check_shared_encoder(live: AdapterConfig, names: list[str], adapters: list[Adapter]) -> None:
    for name, adapter in zip(names, adapters):
        for field in ("image_size", "lora_blocks"):
            if getattr(adapter.config, field) != getattr(live, field):
                raise ValueError(
                    f"adapter {name!r} has {field}={getattr(adapter.config, field)!r} but the active one has "
                    f"{getattr(live, field)!r}; a mixed batch shares one encoder pass, so its adapters need one "
                    f"{field} (run such adapters in separate batches with set_adapter)"
                )


def _mixed_encoder(model, images: torch.Tensor, adapters: list[Adapter], index: torch.Tensor
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, 3, S, S) -> `model.encode`'s embeddings and extra features, image b through adapter
    index[b]'s encoder LoRA."""
    sam = model.sam
    host = require_stock_state(sam).host
    rank = max(a.config.rank for a in adapters)
    with ExitStack() as mixing:
        for i, layer in encoder_lora_layers(sam).items():
            prefix = host.lora_prefix.format(i=i)
            dtype, device = layer.base_layer.weight.dtype, images.device
            stacks = []
            for part in ("q", "v"):
                a = [_pad(ad.tensors[f"{prefix}.{part}.lora_A.weight"], rank, 0) for ad in adapters]
                b = [_pad(ad.tensors[f"{prefix}.{part}.lora_B.weight"], rank, 1) for ad in adapters]
                b = [t if ad.config.lora_scale == layer.scale else t * (ad.config.lora_scale / layer.scale)
                     for t, ad in zip(b, adapters)]
                stacks += [torch.stack(a).to(device, dtype), torch.stack(b).to(device, dtype)]
            mixing.enter_context(layer.mixing(MixedLora(*stacks, index)))
        return model.encode(images)


def _pad(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad a LoRA factor's rank dimension `dim` to `rank` (the same bypass)."""
    missing = rank - tensor.shape[dim]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def _decode_with(model, stock, adapter: Adapter, embeddings: torch.Tensor, extra: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`adapter`'s prompt encoder and decoder on (b, D, g, g) embeddings; a decoder of another
    structure than the live one comes from (and goes back to) the decoder cache."""
    sam = model.sam
    live = stock.host.mask_decoder
    decoder = live if decoder_structure_matches(live, adapter.config) else take_decoder(
        stock, adapter.config, live.iou_token.weight.device)
    try:
        load_head_values(sam, stock, adapter, decoder=decoder)
        return model.decode(embeddings, extra, mask_decoder=decoder)
    finally:
        if decoder is not live:
            keep_decoder(stock, decoder)


def _head_state(sam: Sam) -> dict[str, torch.Tensor]:
    host = require_stock_state(sam).host
    state = {f"prompt_encoder.{k}": v for k, v in host.prompt_encoder.state_dict(keep_vars=True).items()}
    state.update({f"mask_decoder.{k}": v for k, v in host.mask_decoder.state_dict(keep_vars=True).items()})
    return state
