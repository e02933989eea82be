"""Moving tensors between an Adapter and a patched SAM, and checking that they fit.

Every live SAMed tensor is written from the adapter or from the kept stock tensors, so the
result of a load does not depend on what was loaded before it.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from .adapter import DELTA_PREFIX, Adapter, AdapterMismatchError
from .config import AdapterConfig
from .surgery import (
    StockState,
    build_mask_decoder,
    encoder_lora_layers,
    file_lora_key,
    is_class_sized,
    lora_blocks,
    stock_decoder_key,
)

_REQUIRED, _OPTIONAL = True, False


def expected_tensors(
    sam: Sam, prompt_state: dict[str, torch.Tensor], stock_decoder: torch.nn.Module, config: AdapterConfig
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{file name: (shape, required)} for an adapter with `config` on this SAM."""
    dim = sam.image_encoder.patch_embed.proj.out_channels
    table: dict[str, tuple[tuple[int, ...], bool]] = {}
    for i in lora_blocks(sam, config):
        for part in ("q", "v"):
            prefix = f"image_encoder.blocks.{i}.attn.qkv.{part}"
            table[f"{prefix}.lora_A.weight"] = ((config.rank, dim), _REQUIRED)
            table[f"{prefix}.lora_B.weight"] = ((dim, config.rank), _REQUIRED)
    for name, tensor in prompt_state.items():
        table[f"prompt_encoder.{name}"] = (tuple(tensor.shape), name == "no_mask_embed.weight")
    decoder = build_mask_decoder(stock_decoder, config, device=torch.device("meta"))
    for name, tensor in decoder.state_dict().items():
        shape = tuple(tensor.shape)
        if ".lora_" in name:
            table[f"mask_decoder.{file_lora_key(name)}"] = (shape, _REQUIRED)
        elif is_class_sized(name, decoder):
            table[f"mask_decoder.{name}"] = (shape, _REQUIRED)
        elif not (config.decoder_lora and name.startswith("transformer.")):
            table[f"{DELTA_PREFIX}mask_decoder.{stock_decoder_key(name)}"] = (shape, _OPTIONAL)
    return table


def check_fits(adapter: Adapter, expected: dict[str, tuple[tuple[int, ...], bool]]) -> None:
    """Raise AdapterMismatchError naming what does not fit; change nothing."""
    names = set(adapter.tensors)
    unexpected = sorted(names - set(expected))
    missing = sorted(k for k, (_, required) in expected.items() if required and k not in names)
    wrong = [
        f"{k} {tuple(adapter.tensors[k].shape)} (expected {shape})"
        for k, (shape, _) in expected.items()
        if k in names and tuple(adapter.tensors[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise AdapterMismatchError(
            "the adapter does not fit this SAM: " + "; ".join(problems)
            + ". Check that it was made for this backbone (see `samed-adapter info`)."
        )


@torch.no_grad()
def load_values(sam: Sam, stock: StockState, adapter: Adapter) -> None:
    """Write every live SAMed tensor from the adapter (or from stock where the adapter is silent)."""
    tensors = adapter.tensors
    for i, layer in encoder_lora_layers(sam).items():
        for part in ("q", "v"):
            bypass = getattr(layer, part)
            prefix = f"image_encoder.blocks.{i}.attn.qkv.{part}"
            bypass.lora_A.weight.copy_(tensors[f"{prefix}.lora_A.weight"])
            bypass.lora_B.weight.copy_(tensors[f"{prefix}.lora_B.weight"])
    load_head_values(sam, stock, adapter)


@torch.no_grad()
def load_head_values(sam: Sam, stock: StockState, adapter: Adapter) -> None:
    """Write the prompt encoder and mask decoder tensors (everything after the encoder)."""
    tensors = adapter.tensors
    for name, live in sam.prompt_encoder.state_dict(keep_vars=True).items():
        live.copy_(tensors.get(f"prompt_encoder.{name}", stock.prompt_state[name]))
    decoder = sam.mask_decoder
    for name, live in decoder.state_dict(keep_vars=True).items():
        if ".lora_" in name or is_class_sized(name, decoder):
            live.copy_(tensors[f"mask_decoder.{file_lora_key(name)}"])
            continue
        key = stock_decoder_key(name)
        base = stock.decoder_state[key]
        delta = tensors.get(f"{DELTA_PREFIX}mask_decoder.{key}")
        if delta is None:
            live.copy_(base)
        else:
            torch.add(base, delta.to(device=base.device, dtype=base.dtype), out=live)


@torch.no_grad()
def reset_values(sam: Sam, stock: StockState) -> None:
    """Fresh adapter values: LoRA A random and B zero; stock prompt encoder; stock decoder except
    the K-sized parts and decoder LoRA, which keep their fresh initialisation."""
    for layer in encoder_lora_layers(sam).values():
        layer.q.reset_parameters()
        layer.v.reset_parameters()
    sam.prompt_encoder.load_state_dict(stock.prompt_state)
    decoder = sam.mask_decoder
    for name, live in decoder.state_dict(keep_vars=True).items():
        if ".lora_" not in name and not is_class_sized(name, decoder):
            live.copy_(stock.decoder_state[stock_decoder_key(name)])


@torch.no_grad()
def extract_adapter(sam: Sam, stock: StockState) -> Adapter:
    """The Adapter that reproduces the live SAMed tensors (deltas against the kept stock)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in encoder_lora_layers(sam).items():
        for part in ("q", "v"):
            bypass = getattr(layer, part)
            prefix = f"image_encoder.blocks.{i}.attn.qkv.{part}"
            tensors[f"{prefix}.lora_A.weight"] = bypass.lora_A.weight.detach().cpu().clone()
            tensors[f"{prefix}.lora_B.weight"] = bypass.lora_B.weight.detach().cpu().clone()
    for name, live in sam.prompt_encoder.state_dict().items():
        if name == "no_mask_embed.weight" or not torch.equal(live, stock.prompt_state[name].to(live.device)):
            tensors[f"prompt_encoder.{name}"] = live.detach().cpu().clone()
    decoder = sam.mask_decoder
    for name, live in decoder.state_dict().items():
        if ".lora_" in name or is_class_sized(name, decoder):
            tensors[f"mask_decoder.{file_lora_key(name)}"] = live.detach().cpu().clone()
            continue
        key = stock_decoder_key(name)
        base = stock.decoder_state[key].to(live.device)
        if not torch.equal(live, base):
            tensors[f"{DELTA_PREFIX}mask_decoder.{key}"] = (live - base).detach().cpu()
    return Adapter(stock.config, tensors, stock.fingerprint)
