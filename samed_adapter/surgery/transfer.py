"""Moving tensors between an Adapter and a patched SAM, and checking that they fit.

Every live SAMed tensor is written from the adapter or from the kept stock tensors, so the
result of a load does not depend on what was loaded before it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.autograd.graph import increment_version

from ..adapter_file.adapter import DELTA_PREFIX, Adapter, AdapterMismatchError
from ..adapter_file.config import AdapterConfig
from ..hosts.sam import host_of
from .packing import back_to_back_runs, flat_view, pack_in_place
from .structure import (
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
    sam: nn.Module, prompt_state: dict[str, torch.Tensor], stock_decoder: nn.Module, config: AdapterConfig
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{file name: (shape, required)} for an adapter with `config` on this SAM (or SAM 2)."""
    host = host_of(sam)
    table: dict[str, tuple[tuple[int, ...], bool]] = {}
    for i in lora_blocks(sam, config):
        dim, out = host.qkv_dims(i)
        for part in ("q", "v"):
            prefix = f"{host.lora_prefix.format(i=i)}.{part}"
            table[f"{prefix}.lora_A.weight"] = ((config.rank, dim), _REQUIRED)
            table[f"{prefix}.lora_B.weight"] = ((out, config.rank), _REQUIRED)
    for name, tensor in prompt_state.items():
        table[f"prompt_encoder.{name}"] = (tuple(tensor.shape), name == "no_mask_embed.weight")
    decoder = build_mask_decoder(host, stock_decoder, config, device=torch.device("meta"))
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
def load_values(sam: nn.Module, stock: StockState, adapter: Adapter) -> None:
    """Write every live SAMed tensor from the adapter (or from stock where the adapter is silent).

    Live LoRA built at a higher rank than the adapter's (a compiled model's capacity) gets the
    adapter's rows and columns first and zeros after them: the same bypass.
    """
    tensors = adapter.tensors
    _copy_all([(live, tensors[key]) for live, key in _lora_plan(sam, stock)])
    load_head_values(sam, stock, adapter)


def _lora_plan(sam: nn.Module, stock: StockState) -> list[tuple[torch.Tensor, str]]:
    """(live LoRA weight, file name) for every encoder LoRA tensor, in the file's name order, the
    live weights packed in that order; made again when the LoRA layers were rebuilt."""
    layers = encoder_lora_layers(sam)
    made = stock.write_plans.get(sam.image_encoder)
    if made is None or made[0] != tuple(layers.values()):
        plan = sorted(
            ((getattr(getattr(layer, part), f"lora_{half}").weight,
              f"{stock.host.lora_prefix.format(i=i)}.{part}.lora_{half}.weight")
             for i, layer in layers.items() for part in ("q", "v") for half in ("A", "B")),
            key=lambda entry: entry[1],
        )
        pack_in_place([live for live, _ in plan])
        made = stock.write_plans[sam.image_encoder] = (tuple(layers.values()), plan)
    return made[1]


def copy_padded(live: torch.Tensor, value: torch.Tensor) -> None:
    """live[:a, :b] = value, zeros elsewhere; value (a, b) no larger than live."""
    if live.shape == value.shape:
        live.copy_(value)
        return
    live.zero_()
    live[: value.shape[0], : value.shape[1]].copy_(value)


@torch.no_grad()
def load_head_values(sam: nn.Module, stock: StockState, adapter: Adapter, prompt_encoder: Optional[nn.Module] = None,
                     decoder: Optional[nn.Module] = None) -> None:
    """Write the prompt encoder and mask decoder tensors (everything after the encoder), into
    the live modules or the ones given (of the adapter's structure)."""
    tensors = adapter.tensors
    prompt_encoder = stock.host.prompt_encoder if prompt_encoder is None else prompt_encoder
    for live, key, base in _write_plan(stock, prompt_encoder, _prompt_plan):
        live.copy_(tensors.get(key, base))
    decoder = stock.host.mask_decoder if decoder is None else decoder
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    sums: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for live, key, base in _write_plan(stock, decoder, _decoder_plan):
        value = tensors[key] if base is None else tensors.get(key)
        if value is None:
            copies.append((live, base))
        elif base is None:
            copies.append((live, value))
        else:
            sums.append((live, value, base))
    _copy_all(copies)
    _add_deltas(sums)


@torch.no_grad()
def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """live = value for each (live, value), zero-padded where live is larger (`copy_padded`),
    one copy per run of them lying back to back in both (see `packing`)."""
    if not pairs:
        return
    lives, values = zip(*pairs)
    for start, stop in back_to_back_runs(values, lives):
        if stop - start > 1:
            flat_view(lives[start:stop]).copy_(flat_view(values[start:stop]))
            increment_version(lives[start:stop])  # the view counts as a write to the first one only
        else:
            copy_padded(lives[start], values[start])


@torch.no_grad()
def _add_deltas(sums: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """live = base + delta for each (live, delta, base), one add per run of them lying back to
    back in all three (see `packing`)."""
    if not sums:
        return
    lives, deltas, bases = zip(*sums)
    for start, stop in back_to_back_runs(deltas, lives, bases):
        live, delta, base = (flat_view(column[start:stop]) if stop - start > 1 else column[start]
                             for column in (lives, deltas, bases))
        torch.add(base, delta.to(device=base.device, dtype=base.dtype), out=live)
        if stop - start > 1:
            increment_version(lives[start:stop])


WritePlan = list[tuple[torch.Tensor, str, Optional[torch.Tensor]]]


def _write_plan(stock: StockState, module: nn.Module, make) -> WritePlan:
    """(live tensor, file name, stock tensor or None) for every tensor of `module`, made once per
    module: a hot swap then only copies (walking state_dict and matching names cost ~1 ms)."""
    plan = stock.write_plans.get(module)
    if plan is None:
        plan = stock.write_plans[module] = make(stock, module)
    return plan


def _prompt_plan(stock: StockState, prompt_encoder: nn.Module) -> WritePlan:
    """Written from `prompt_encoder.{name}` if the file has it, else from the stock tensor."""
    return [(live, f"prompt_encoder.{name}", stock.prompt_state[name])
            for name, live in prompt_encoder.state_dict(keep_vars=True).items()]


def _decoder_plan(stock: StockState, decoder: nn.Module) -> WritePlan:
    """LoRA and class-sized tensors come whole from the file (stock None); the rest are the
    stock tensor plus the file's `delta.` tensor if it has one. Those come last, in the file's
    name order, and their live tensors are packed in that order (so are the kept stock ones,
    see StockState), so that `_add_deltas` writes them with one add."""
    whole: WritePlan = []
    added: WritePlan = []
    for name, live in decoder.state_dict(keep_vars=True).items():
        if ".lora_" in name or is_class_sized(name, decoder):
            whole.append((live, f"mask_decoder.{file_lora_key(name)}", None))
        else:
            key = stock_decoder_key(name)
            added.append((live, f"{DELTA_PREFIX}mask_decoder.{key}", stock.decoder_state[key]))
    for part in (whole, added):
        part.sort(key=lambda entry: entry[1])
        pack_in_place([live for live, _, _ in part])
    return whole + added


@torch.no_grad()
def reset_values(sam: nn.Module, stock: StockState) -> None:
    """Fresh adapter values: LoRA A random and B zero; stock prompt encoder; stock decoder except
    the K-sized parts and decoder LoRA, which keep their fresh initialisation."""
    rank = stock.config.rank
    for layer in encoder_lora_layers(sam).values():
        for bypass in (layer.q, layer.v):
            bypass.reset_parameters()
            bypass.lora_A.weight[rank:].zero_()  # rows beyond the config's rank: a compiled model's padding
    stock.host.prompt_encoder.load_state_dict(stock.prompt_state)
    decoder = stock.host.mask_decoder
    for name, live in decoder.state_dict(keep_vars=True).items():
        if ".lora_" not in name and not is_class_sized(name, decoder):
            live.copy_(stock.decoder_state[stock_decoder_key(name)])


@torch.no_grad()
def extract_adapter(sam: nn.Module, stock: StockState) -> Adapter:
    """The Adapter that reproduces the live SAMed tensors (deltas against the kept stock)."""
    tensors: dict[str, torch.Tensor] = {}
    rank = stock.config.rank  # the live LoRA may be zero-padded beyond it (a compiled model)
    for i, layer in encoder_lora_layers(sam).items():
        for part in ("q", "v"):
            bypass = getattr(layer, part)
            prefix = f"{stock.host.lora_prefix.format(i=i)}.{part}"
            tensors[f"{prefix}.lora_A.weight"] = bypass.lora_A.weight[:rank].detach().cpu().clone()
            tensors[f"{prefix}.lora_B.weight"] = bypass.lora_B.weight[:, :rank].detach().cpu().clone()
    for name, live in stock.host.prompt_encoder.state_dict().items():
        if name == "no_mask_embed.weight" or not torch.equal(live, stock.prompt_state[name].to(live.device)):
            tensors[f"prompt_encoder.{name}"] = live.detach().cpu().clone()
    decoder = stock.host.mask_decoder
    for name, live in decoder.state_dict().items():
        if ".lora_" in name or is_class_sized(name, decoder):
            tensors[f"mask_decoder.{file_lora_key(name)}"] = live.detach().cpu().clone()
            continue
        key = stock_decoder_key(name)
        base = stock.decoder_state[key].to(live.device)
        if not torch.equal(live, base):
            tensors[f"{DELTA_PREFIX}mask_decoder.{key}"] = (live - base).detach().cpu()
    return Adapter(stock.config, tensors, stock.fingerprint)
