"""Published SAMed checkpoints (`torch.save`d .pth) -> Adapter.

Published keys: `w_a_{i:03d}` (r, C) / `w_b_{i:03d}` (C, r), even i the query bypass of encoder
block i // 2, odd i its value bypass; `prompt_encoder.*` and `mask_decoder.*` state dicts; the
decoder-LoRA variant adds `sa_`/`cti_`/`cit_` `{a,b}_{i:03d}` (i = 2 * layer + (0 q, 1 v)) and
`fati_{q,v}{a,b}`, and its `mask_decoder.*` leaves out `transformer.*`.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Union

import torch
from segment_anything.modeling import Sam

from .adapter_file.adapter import DELTA_PREFIX, Adapter, AdapterFormatError
from .hosts.backbones import infer_backbone
from .adapter_file.checkpoints import load_state_dict_file
from .adapter_file.config import CT_ABDOMEN_WINDOW, SYNAPSE_CLASS_NAMES, AdapterConfig
from .surgery.structure import get_stock_state, is_class_sized, stock_fingerprint
from .surgery.transfer import check_fits, expected_tensors

_PUBLISHED_DECODER_LORA = {
    "sa": "self_attn",
    "cti": "cross_attn_token_to_image",
    "cit": "cross_attn_image_to_token",
}
_DEFAULT_WINDOW = object()


def convert_published(
    checkpoint: Union[str, os.PathLike, dict[str, torch.Tensor]],
    sam: Sam,
    *,
    image_size: int = 512,
    class_names: Optional[Sequence[str]] = None,
    intensity_window: Union[tuple[float, float], None, object] = _DEFAULT_WINDOW,
    lora_blocks: Optional[Sequence[int]] = None,
    orientation: Union[str, Sequence[str], None] = None,
    slice_axis: int = 2,
) -> Adapter:
    """Convert a published SAMed checkpoint for the stock weights of `sam`.

    Args:
        checkpoint: the .pth path (read with `weights_only=True`) or its loaded dict.
        sam: the stock SAM the checkpoint was trained on (e.g. built from sam_vit_b_01ec64.pth);
            used for the decoder deltas and the base fingerprint, left unchanged.
        image_size: the input size it was trained at (published: 512).
        class_names: K names; default the Synapse organs when K = 8.
        intensity_window: default the CT window (-125, 275); None for inputs already in [0, 1].
        lora_blocks: the encoder blocks that carry LoRA, when not all of them.
        orientation, slice_axis: the axis codes of the volumes its training slices were cut
            from, and the axis they were cut along (see `samed_adapter.volume.geometry`); default not
            recorded, so volumes are cut as stored (the published Synapse models saw the raw
            files' stored axes, each slice ``data[:, :, k].T``).
    """
    state = load_state_dict_file(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    stock = get_stock_state(sam)
    prompt_state = stock.prompt_state if stock is not None else sam.prompt_encoder.state_dict()
    stock_decoder = stock.mask_decoder if stock is not None else sam.mask_decoder
    decoder_state = stock.decoder_state if stock is not None else stock_decoder.state_dict()
    remaining = dict(state)

    encoder_lora = _encoder_lora(remaining, sam, lora_blocks)
    decoder_lora = _decoder_lora(remaining)
    try:
        tokens = state["mask_decoder.mask_tokens.weight"]
    except KeyError:
        raise AdapterFormatError("not a SAMed checkpoint: it has no mask_decoder.mask_tokens.weight") from None
    num_classes = tokens.shape[0] - 1
    rank = next(iter(encoder_lora.values())).shape[0]
    if class_names is None and num_classes == len(SYNAPSE_CLASS_NAMES):
        class_names = SYNAPSE_CLASS_NAMES
    config = AdapterConfig(
        num_classes=num_classes,
        rank=rank,
        lora_blocks=None if lora_blocks is None else list(lora_blocks),
        image_size=image_size,
        backbone=infer_backbone(sam),
        class_names=None if class_names is None else list(class_names),
        intensity_window=CT_ABDOMEN_WINDOW if intensity_window is _DEFAULT_WINDOW else intensity_window,  # type: ignore[arg-type]
        orientation=orientation,
        slice_axis=slice_axis,
        decoder_lora=bool(decoder_lora),
        decoder_lora_rank=next(iter(decoder_lora.values())).shape[0] if decoder_lora else 4,
    )

    tensors = {**encoder_lora, **decoder_lora}
    for name, base in prompt_state.items():
        value = remaining.pop(f"prompt_encoder.{name}", None)
        if value is None:
            raise AdapterFormatError(f"the checkpoint has no prompt_encoder.{name}")
        if name == "no_mask_embed.weight" or not torch.equal(value, base):
            tensors[f"prompt_encoder.{name}"] = value.float()
    for name, base in decoder_state.items():
        if is_class_sized(name, stock_decoder):
            continue  # K-sized: taken whole below, with this checkpoint's K
        value = remaining.pop(f"mask_decoder.{name}", None)
        if value is None:
            if config.decoder_lora and name.startswith("transformer."):
                continue  # the variant's transformer is stock and frozen
            raise AdapterFormatError(f"the checkpoint has no mask_decoder.{name}")
        if value.shape != base.shape:
            raise AdapterFormatError(f"mask_decoder.{name} has shape {tuple(value.shape)}, stock {tuple(base.shape)}")
        if not torch.equal(value, base):
            tensors[f"{DELTA_PREFIX}mask_decoder.{name}"] = value.float() - base.float()
    for name in [k for k in remaining if k.startswith("mask_decoder.")]:
        short = name[len("mask_decoder."):]
        if is_class_sized(short, stock_decoder):
            tensors[name] = remaining.pop(name).float()
    if remaining:
        raise AdapterFormatError(f"unexpected keys in the checkpoint: {sorted(remaining)[:5]}")
    adapter = Adapter(config, tensors, stock_fingerprint(sam))
    check_fits(adapter, expected_tensors(sam, prompt_state, stock_decoder, config))
    return adapter


def _encoder_lora(remaining: dict[str, torch.Tensor], sam: Sam, blocks: Optional[Sequence[int]]) -> dict[str, torch.Tensor]:
    indices = sorted(int(m.group(1)) for k in remaining if (m := re.fullmatch(r"w_a_(\d+)", k)))
    if not indices:
        raise AdapterFormatError("not a SAMed checkpoint: it has no w_a_000 (encoder LoRA) tensors")
    if indices != list(range(len(indices))) or len(indices) % 2:
        raise AdapterFormatError(f"the encoder LoRA keys w_a_* are not 0..2L-1: {indices[:6]}...")
    depth = len(sam.image_encoder.blocks)
    blocks = list(range(depth)) if blocks is None else list(blocks)
    if len(indices) != 2 * len(blocks):
        raise AdapterFormatError(
            f"the checkpoint has LoRA for {len(indices) // 2} blocks but {len(blocks)} are expected "
            f"(this encoder has {depth}); is it for another backbone, or pass lora_blocks=[...]"
        )
    tensors = {}
    for i in indices:
        part = "q" if i % 2 == 0 else "v"
        prefix = f"image_encoder.blocks.{blocks[i // 2]}.attn.qkv.{part}"
        tensors[f"{prefix}.lora_A.weight"] = remaining.pop(f"w_a_{i:03d}").float()
        try:
            tensors[f"{prefix}.lora_B.weight"] = remaining.pop(f"w_b_{i:03d}").float()
        except KeyError:
            raise AdapterFormatError(f"the checkpoint has w_a_{i:03d} but no w_b_{i:03d}") from None
    return tensors


def _decoder_lora(remaining: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {}
    prefix = "mask_decoder.transformer"
    for short, attn in _PUBLISHED_DECODER_LORA.items():
        for key in [k for k in remaining if re.fullmatch(rf"{short}_[ab]_\d+", k)]:
            _, ab, index = key.split("_")
            layer, proj = divmod(int(index), 2)
            name = f"{prefix}.layers.{layer}.{attn}.{'qv'[proj]}_proj.lora_{ab.upper()}.weight"
            tensors[name] = remaining.pop(key).float()
    for proj in "qv":
        for ab in "ab":
            key = f"fati_{proj}{ab}"
            if key in remaining:
                name = f"{prefix}.final_attn_token_to_image.{proj}_proj.lora_{ab.upper()}.weight"
                tensors[name] = remaining.pop(key).float()
    return tensors
