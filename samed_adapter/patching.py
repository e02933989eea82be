"""The public entry points that change a SAM: `patch`, `inject` and `unpatch`."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

from segment_anything.modeling import Sam

from .adapter_file.adapter import Adapter, AdapterFormatError, AdapterMismatchError, BaseMismatchError
from .surgery.attention import enable_sdpa
from .hosts.backbones import build_hint, command_line_hint
from .hosts.sam import host_of
from .adapter_file.config import AdapterConfig
from .model import SAMed
from .surgery.structure import (
    StockState,
    encoder_lora_layers,
    get_stock_state,
    lora_rank,
    model_device,
    restore_stock,
    set_encoder_lora,
    set_structure,
    set_trainable,
    stock_fingerprint,
    take_stock,
)
from .surgery.lora import NonFiniteMergeError
from .surgery.transfer import check_fits, expected_tensors, extract_adapter, load_values, reset_values

AdapterSource = Union[Adapter, str, os.PathLike]


def patch(
    sam: Union[Sam, SAMed],
    adapter: AdapterSource,
    *,
    allow_base_mismatch: bool = False,
    merge: bool = False,
    adapter_name: str = "default",
) -> SAMed:
    """Turn a stock SAM into SAMed with `adapter`, in place; on a patched SAM, hot-swap.

    Everything is validated before anything changes: a failed patch leaves `sam` exactly as it
    was. Swapping never reloads the base: the stock tensors kept at the first patch are reused.

    Args:
        sam: a stock `segment_anything` Sam (or one already patched, or its SAMed view).
        adapter: an Adapter, the path of an adapter `.safetensors` file, or a Hub id
            "org/name" or "org/name@revision" (a local path wins).
        allow_base_mismatch: accept an adapter trained on different stock SAM weights.
        merge: fold the encoder LoRA into `qkv` (fastest inference; `model.unmerge()` undoes it).
        adapter_name: the name it stays resident under (see `SAMed.load_adapter`).

    Returns:
        The SAMed model around `sam`.
    """
    sam = _as_sam(sam)
    if not isinstance(adapter, Adapter):
        adapter = Adapter.load(adapter)
    stock = get_stock_state(sam)
    config, fingerprint = validate(sam, adapter, allow_base_mismatch=allow_base_mismatch)

    def write(stock: StockState) -> None:
        load_values(sam, stock, adapter)
        stock.adapters[adapter_name] = adapter
        stock.active_adapter = adapter_name

    return _apply(sam, stock, config, fingerprint, write, merge)


def validate(sam: Sam, adapter: Adapter, *, allow_base_mismatch: bool = False) -> tuple[AdapterConfig, str]:
    """Check that `adapter` fits `sam` (changing nothing); return its resolved config and the base fingerprint."""
    stock = get_stock_state(sam)
    config = _config_for(sam, adapter.config)
    fingerprint = stock.fingerprint if stock is not None else stock_fingerprint(sam)
    if adapter.base_fingerprint != fingerprint and not allow_base_mismatch:
        facts = (f"the adapter was made for stock SAM weights {adapter.base_fingerprint[:19]}..., but this SAM's "
                 f"are {fingerprint[:19]}...")
        raise _worded(
            BaseMismatchError(f"{facts}; load the checkpoint it was trained on, or pass allow_base_mismatch=True "
                              "to apply it anyway"),
            f"{facts}; pass the checkpoint it was trained on (--sam), or --allow-base-mismatch to apply it anyway",
        )
    host = host_of(sam)
    prompt_state = stock.prompt_state if stock is not None else host.prompt_encoder.state_dict()
    stock_decoder = stock.mask_decoder if stock is not None else host.mask_decoder
    check_fits(adapter, _expected(stock, sam, prompt_state, stock_decoder, config))
    return config, fingerprint


def inject(sam: Union[Sam, SAMed], config: AdapterConfig) -> SAMed:
    """A fresh, trainable SAMed adapter on `sam` (in place): LoRA B = 0, so the encoder is stock.

    The stock encoder is frozen; the LoRA, the prompt encoder and the decoder are trainable
    (for the decoder-LoRA variant, the decoder transformer stays frozen but for its LoRA).
    The K+1-sized decoder parts are freshly initialised from torch's global RNG.
    """
    sam = _as_sam(sam)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"inject takes an AdapterConfig, got {type(config).__name__}")
    stock = get_stock_state(sam)
    config = _config_for(sam, config)
    fingerprint = stock.fingerprint if stock is not None else stock_fingerprint(sam)

    def write(stock: StockState) -> None:
        reset_values(sam, stock)
        stock.active_adapter = None  # the live adapter is being trained, not a resident one

    return _apply(sam, stock, config, fingerprint, write, merge=False, fresh_decoder=True)


def unpatch(sam: Union[Sam, SAMed]) -> Sam:
    """Restore the stock SAM: the same modules, parameters and values as before the first patch."""
    return restore_stock(_as_sam(sam))


def _apply(sam: Sam, stock: Optional[StockState], config: AdapterConfig, fingerprint: str, write_values,
           merge: bool, fresh_decoder: bool = False) -> SAMed:
    first = stock is None
    was_merged = any(layer.merged for layer in encoder_lora_layers(sam).values())
    previous = None if first else _Previous.capture(sam, stock, was_merged)
    try:
        if first:
            stock = take_stock(sam, config, fingerprint)
        elif stock.device != model_device(sam):
            stock.to(model_device(sam))
        for layer in encoder_lora_layers(sam).values():
            layer.unmerge()
        rebuilt = set_structure(sam, stock, config, fresh_decoder=fresh_decoder)
        write_values(stock)
        if first or rebuilt:
            set_trainable(sam, config)
            enable_sdpa(sam.image_encoder)
        model = stock.view if stock.view is not None else SAMed(sam)
        if merge or was_merged:
            model.merge()
    except BaseException as err:
        if first:
            restore_stock(sam)
        else:
            previous.restore(sam, stock)
        if isinstance(err, NonFiniteMergeError):
            raise AdapterFormatError(f"{err}; the SAM was left as it was") from None
        raise
    if rebuilt and not first and stock.lora_capacity is not None:
        warnings.warn(
            f"this swap changed the compiled model's structure (encoder LoRA rank {config.rank} vs compiled "
            f"max_rank {stock.lora_capacity}, K, decoder variant, LoRA scale or image size), so the next call "
            "recompiles; compile with model.compile(max_rank=...) at the highest rank you swap to, and keep "
            "adapters of one K and variant on one compiled model",
            CompiledSwapWarning,
            stacklevel=3,
        )
    stock.view = model
    _track(sam, stock, rebuilt=first or rebuilt)
    return model


class CompiledSwapWarning(UserWarning):
    """A hot swap on a compiled SAMed model changed module shapes, so the model recompiles."""


def set_lora_capacity(sam: Sam, stock: StockState, rank: int) -> None:
    """Rebuild the encoder LoRA at `rank` (values kept, zero-padded) for SAMed.compile."""
    was_merged = any(layer.merged for layer in encoder_lora_layers(sam).values())
    live = extract_adapter(sam, stock)
    for layer in encoder_lora_layers(sam).values():
        layer.unmerge()
    stock.lora_capacity = rank
    set_encoder_lora(sam, stock.config, lora_rank(stock, stock.config))
    load_values(sam, stock, live)
    set_trainable(sam, stock.config)
    enable_sdpa(sam.image_encoder)
    if was_merged:
        for layer in encoder_lora_layers(sam).values():
            layer.merge()
    _track(sam, stock, rebuilt=True)


def _track(sam: Sam, stock: StockState, rebuilt: bool) -> None:
    """Note the in-place update counters of the adapter's live tensors: if they are unchanged at
    the next swap, nobody trained the model since, and the resident adapter still describes it."""
    if rebuilt or stock.versions is None:
        params = [*stock.host.prompt_encoder.parameters(), *stock.host.mask_decoder.parameters()]
        for layer in encoder_lora_layers(sam).values():
            params += [layer.q.lora_A.weight, layer.q.lora_B.weight, layer.v.lora_A.weight, layer.v.lora_B.weight]
        stock.tracked = params
    stock.versions = _versions(stock)


def _versions(stock: StockState) -> tuple[int, ...]:
    return tuple(p._version for p in stock.tracked)


@dataclass
class _Previous:
    """What a hot swap replaces, to put back if the swap fails half way."""

    config: AdapterConfig
    adapter: Adapter
    adapters: dict[str, Adapter]
    active: Optional[str]
    merged: bool

    @classmethod
    def capture(cls, sam: Sam, stock: StockState, merged: bool) -> "_Previous":
        adapter = stock.adapters.get(stock.active_adapter) if stock.active_adapter is not None else None
        if adapter is None or stock.versions != _versions(stock):
            adapter = extract_adapter(sam, stock)  # trained since its patch: keep the live values
        return cls(stock.config, adapter, dict(stock.adapters), stock.active_adapter, merged)

    def restore(self, sam: Sam, stock: StockState) -> None:
        for layer in encoder_lora_layers(sam).values():
            layer.unmerge()
        set_structure(sam, stock, self.config)
        load_values(sam, stock, self.adapter)
        set_trainable(sam, self.config)
        enable_sdpa(sam.image_encoder)
        stock.adapters.clear()
        stock.adapters.update(self.adapters)
        stock.active_adapter = self.active
        if self.merged:
            for layer in encoder_lora_layers(sam).values():
                layer.merge()
        _track(sam, stock, rebuilt=True)


def _as_sam(sam: Union[Sam, SAMed]) -> Sam:
    if isinstance(sam, SAMed):
        return sam.sam
    if host_of(sam) is None:
        raise TypeError(
            f"expected a segment_anything Sam (e.g. sam_model_registry['vit_b'](checkpoint=...)) or a sam2 "
            f"SAM2Base (sam2.build_sam.build_sam2(config, checkpoint)), got {type(sam).__name__}"
        )
    return sam


def _config_for(sam: Sam, config: AdapterConfig) -> AdapterConfig:
    """The config with its backbone filled in, after checking it fits this SAM's encoder."""
    host = host_of(sam)
    backbone = host.backbone()
    if config.backbone is not None and config.backbone != backbone:
        facts = (f"the adapter is for a {config.backbone} {_family(config.backbone)} but this {host.family} "
                 f"is {backbone}")
        raise _worded(AdapterMismatchError(f"{facts}; build {build_hint(config.backbone)} instead"),
                      f"{facts}; use {command_line_hint(config.backbone)}")
    depth = len(host.blocks())
    if config.lora_blocks is not None and max(config.lora_blocks) >= depth:
        raise AdapterMismatchError(f"lora_blocks {config.lora_blocks} name blocks beyond this encoder's {depth}")
    try:
        host.check_image_size(config.image_size)
    except ValueError as err:
        raise AdapterMismatchError(str(err)) from None
    return dataclasses.replace(config, backbone=backbone)


def _worded(error: Exception, command_line: str) -> Exception:
    """`error` (worded for Python: keyword arguments, calls) with `command_line`, the same
    facts and remedy for the command line (flags), which `samed-adapter` prints instead."""
    error.command_line = command_line  # type: ignore[attr-defined]
    return error


def _family(backbone: str) -> str:
    return "SAM 2" if "hiera" in backbone else "SAM"


def _expected(stock: Optional[StockState], sam: Sam, prompt_state, stock_decoder, config: AdapterConfig):
    # The table depends only on the structure, so a hot swap between adapters of one shape
    # reuses it instead of rebuilding it.
    if stock is None:
        return expected_tensors(sam, prompt_state, stock_decoder, config)
    key = config.structure_key()
    if key not in stock.expected:
        stock.expected[key] = expected_tensors(sam, prompt_state, stock_decoder, config)
    return stock.expected[key]
