"""Stock SAM <-> SAMed: the structural changes, the stock tensors kept aside, and their return.

Patching changes a stock SAM (or SAM 2, see hosts.py) in place:
- the encoder runs at `image_size`: for SAM, `pos_embed` and the global blocks' `rel_pos_h/w`
  are resized from the stock tensors (which are kept, not copied); SAM 2 records the size;
- every chosen block's `attn.qkv` is wrapped in a `LoraQKV` (the stock Linear is its
  `base_layer`);
- the prompt encoder and the mask decoder are replaced by SAMed ones (K+1 mask tokens); the
  stock objects are kept;
- `pixel_mean`/`pixel_std` become the adapter's (SAM 2, which normalises outside the model,
  gets the two buffers while patched).
The kept objects live in a `StockState` attached to the model (not a submodule, so they appear
in no `state_dict()` or `parameters()`). `restore_stock` puts every one of them back.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..adapter_file.adapter import Adapter
from .attention import disable_sdpa
from ..adapter_file.config import AdapterConfig
from ..hosts.sam import SamHost, host_of
from .lora import LoraQKV, is_peft_lora, wrap_linear_with_peft
from .packing import packed_copy

_STOCK_ATTR = "_samed_stock"
DECODER_LORA_ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
# Built SAMed decoders kept for a swap back to their structure (another K, or the decoder-LoRA
# variant): ~16 MiB each in float32 for SAM's decoders (4.1 M values, any backbone), so the
# cache holds at most 64 MiB beside the live decoder.
MAX_CACHED_DECODERS = 4


class NotPatchedError(RuntimeError):
    """An operation that needs a patched SAM was given a stock (or unpatched) one."""


@dataclass
class StockState:
    """The stock tensors and modules that patching took out of a SAM, each kept once.

    Beside them it carries what patching keeps per patched SAM: the config the live modules
    have, the resident adapters, and the bookkeeping of hot swaps (`tracked`, `versions`,
    `expected`).
    """

    fingerprint: str
    config: AdapterConfig
    host: SamHost
    parts: dict  # the host's size-dependent stock parts (SamHost.stock_parts)
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    pixel_mean: Optional[torch.Tensor]  # None: the stock model has no such buffer (SAM 2)
    pixel_std: Optional[torch.Tensor]
    requires_grad: dict[str, bool]
    prompt_state: dict[str, torch.Tensor] = field(default_factory=dict)
    decoder_state: dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: dict[str, Adapter] = field(default_factory=dict)  # resident Adapters by name
    active_adapter: Optional[str] = None
    # The adapter's live tensors and their in-place update counters (`_version`) when it was
    # last written: unchanged counters mean nobody trained the model since (see patching).
    tracked: list[torch.Tensor] = field(default_factory=list)
    versions: Optional[tuple[int, ...]] = None
    # {config.structure_key(): expected_tensors(...)}: the table of tensors an adapter of one
    # structure must hold, built once per structure.
    expected: dict[tuple, dict[str, tuple[tuple[int, ...], bool]]] = field(default_factory=dict)
    # Built SAMed decoders not in use, by decoder_key(config), oldest first (see MAX_CACHED_DECODERS).
    decoders: dict[tuple, nn.Module] = field(default_factory=dict)
    device: torch.device = field(init=False)  # where the kept tensors are (set from the stock decoder)
    # Set by SAMed.compile: the encoder LoRA is built at this rank and lower ranks are zero-padded,
    # so that swaps keep every shape the compiled graph was traced with.
    lora_capacity: Optional[int] = None
    # transfer's write plans, by prompt encoder or decoder module (dropped with the module).
    write_plans: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    # The SAMed view `patch` returns, one per SAM, so that a compiled view stays the one in use.
    view: Optional[nn.Module] = None

    def __post_init__(self) -> None:
        self.device = self.mask_decoder.iou_token.weight.device
        self.write_plans.clear()  # they hold the stock tensors of before a move
        self.prompt_state = dict(self.prompt_encoder.state_dict())
        # A copy packed in the file's name order (16 MiB for SAM's decoder): swaps write the
        # decoder as stock + delta with one add instead of ~150 (see `packing`).
        self.decoder_state = packed_copy(self.mask_decoder.state_dict())

    def to(self, device: torch.device) -> None:
        """Move the kept stock tensors to `device` (after the user moved the model)."""
        self.prompt_encoder.to(device)
        self.mask_decoder.to(device)
        for decoder in self.decoders.values():
            decoder.to(device)
        self.__post_init__()
        self.host.move_parts(self.parts, device)
        self.device = device


def get_stock_state(sam: nn.Module) -> Optional[StockState]:
    """The StockState of a patched SAM, or None for a stock one."""
    return sam.__dict__.get(_STOCK_ATTR)


def require_stock_state(sam: nn.Module) -> StockState:
    """The StockState of a patched SAM; NotPatchedError for a stock one."""
    stock = get_stock_state(sam)
    if stock is None:
        raise NotPatchedError(
            "this SAM is not patched (or was unpatched); call samed_adapter.patch(sam, adapter) or "
            "samed_adapter.inject(sam, config) first"
        )
    return stock


def stock_fingerprint(sam: nn.Module) -> str:
    """sha256 over the stock SAM's tensors (names, shapes, float32 values), cached once patched."""
    stock = get_stock_state(sam)
    if stock is not None:
        return stock.fingerprint
    digest = hashlib.sha256()
    state = sam.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(memoryview(tensor.numpy()).cast("B"))
    return "sha256:" + digest.hexdigest()


def model_device(sam: nn.Module) -> torch.device:
    """Where the model's encoder lives (the device its inputs go to)."""
    return next(sam.image_encoder.parameters()).device


def take_stock(sam: nn.Module, config: AdapterConfig, fingerprint: str) -> StockState:
    """Record the stock parts of an unpatched SAM or SAM 2 and attach them to it."""
    host = host_of(sam)
    stock = StockState(
        fingerprint=fingerprint,
        config=config,
        host=host,
        parts=host.stock_parts(),
        prompt_encoder=host.prompt_encoder,
        mask_decoder=host.mask_decoder,
        pixel_mean=getattr(sam, "pixel_mean", None),
        pixel_std=getattr(sam, "pixel_std", None),
        requires_grad={name: p.requires_grad for name, p in sam.named_parameters()},
    )
    sam.__dict__[_STOCK_ATTR] = stock
    return stock


def restore_stock(sam: nn.Module) -> nn.Module:
    """Undo every structural change: the exact stock objects and tensors go back."""
    stock = get_stock_state(sam)
    if stock is None:
        return sam
    device = model_device(sam)
    if stock.device != device:
        stock.to(device)
    host = stock.host
    host.restore_parts(stock.parts)
    for blk in host.blocks():
        if isinstance(blk.attn.qkv, LoraQKV):
            blk.attn.qkv.unmerge()
            blk.attn.qkv = blk.attn.qkv.base_layer
    host.prompt_encoder = stock.prompt_encoder
    host.mask_decoder = stock.mask_decoder
    for name in ("pixel_mean", "pixel_std"):
        kept = getattr(stock, name)
        if kept is None:
            del sam._buffers[name]
        else:
            sam.register_buffer(name, kept.to(device), False)
    for name, param in sam.named_parameters():
        param.requires_grad_(stock.requires_grad.get(name, param.requires_grad))
    disable_sdpa(sam.image_encoder)
    del sam.__dict__[_STOCK_ATTR]
    return sam


# ---------------------------------------------------------------- encoder


def lora_blocks(sam: nn.Module, config: AdapterConfig) -> list[int]:
    depth = len(host_of(sam).blocks())
    return list(range(depth)) if config.lora_blocks is None else list(config.lora_blocks)


def lora_rank(stock: StockState, config: AdapterConfig) -> int:
    """The rank the live encoder LoRA is built at: the config's, or the compiled capacity above it."""
    capacity = stock.lora_capacity
    return config.rank if capacity is None or config.rank > capacity else capacity


def set_encoder_lora(sam: nn.Module, config: AdapterConfig, rank: Optional[int] = None) -> None:
    """Wrap the chosen blocks' qkv in LoraQKV of `rank` (default: the config's), re-wrapping
    where rank or scale changed."""
    rank = config.rank if rank is None else rank
    wanted = set(lora_blocks(sam, config))
    for i, blk in enumerate(host_of(sam).blocks()):
        layer = blk.attn.qkv
        if isinstance(layer, LoraQKV):
            if i in wanted and layer.rank == rank and layer.scale == config.lora_scale:
                continue
            layer.unmerge()
            layer = layer.base_layer
        if i in wanted:
            device, dtype = layer.weight.device, layer.weight.dtype
            layer = LoraQKV(layer, rank, config.lora_scale).to(device=device, dtype=dtype)
        blk.attn.qkv = layer


def encoder_lora_layers(sam: nn.Module) -> dict[int, LoraQKV]:
    return {i: blk.attn.qkv for i, blk in enumerate(host_of(sam).blocks()) if isinstance(blk.attn.qkv, LoraQKV)}


# ---------------------------------------------------------------- prompt encoder and decoder


def build_mask_decoder(host: SamHost, stock: nn.Module, config: AdapterConfig,
                       device: Optional[torch.device] = None) -> nn.Module:
    """A SAMed decoder: stock architecture with K+1 mask tokens, decoder LoRA for the variant, and
    for a click-trained adapter a (K+1, D) `class_embed`: the token that says which class a
    click refines (see samed_adapter.interactive)."""
    device = device or stock.iou_token.weight.device
    decoder = host.build_mask_decoder(stock, config.num_classes, device)
    if config.clicks:
        with torch.device(device):
            decoder.class_embed = nn.Embedding(config.num_classes + 1, stock.transformer_dim)
    if config.decoder_lora:
        for attn in decoder_lora_attentions(decoder):
            attn.q_proj = wrap_linear_with_peft(attn.q_proj, config.decoder_lora_rank, config.lora_scale)
            attn.v_proj = wrap_linear_with_peft(attn.v_proj, config.decoder_lora_rank, config.lora_scale)
    return decoder.to(dtype=stock.iou_token.weight.dtype)


def decoder_lora_attentions(decoder: nn.Module) -> list[nn.Module]:
    """The decoder attentions that carry LoRA in the variant, in published order."""
    tf = decoder.transformer
    return [getattr(layer, name) for layer in tf.layers for name in DECODER_LORA_ATTENTIONS] + [
        tf.final_attn_token_to_image
    ]


def decoder_key(config: AdapterConfig) -> tuple:
    """What decides a SAMed decoder's modules: K, the decoder LoRA's rank and scale if any, and
    whether it takes clicks."""
    if config.decoder_lora:
        return (config.num_classes, config.decoder_lora_rank, config.lora_scale, config.clicks)
    return (config.num_classes, None, None, config.clicks)


def built_decoder_key(decoder: nn.Module) -> tuple:
    """decoder_key of the config a built SAMed decoder was made for."""
    q_proj = decoder.transformer.final_attn_token_to_image.q_proj
    clicks = hasattr(decoder, "class_embed")
    if is_peft_lora(q_proj):
        return (decoder.num_mask_tokens - 1, q_proj.r["default"], q_proj.scaling["default"], clicks)
    return (decoder.num_mask_tokens - 1, None, None, clicks)


def decoder_structure_matches(decoder: nn.Module, config: AdapterConfig) -> bool:
    return built_decoder_key(decoder) == decoder_key(config)


def take_decoder(stock: StockState, config: AdapterConfig, device: torch.device) -> nn.Module:
    """A SAMed decoder for `config`: the cached one if it was built before, else a new one."""
    decoder = stock.decoders.pop(decoder_key(config), None)
    if decoder is None:
        decoder = build_mask_decoder(stock.host, stock.mask_decoder, config, device=device)
    return decoder


def keep_decoder(stock: StockState, decoder: nn.Module) -> None:
    """Cache a built SAMed decoder that goes out of use, dropping the oldest beyond the bound."""
    if decoder is stock.mask_decoder:
        return
    stock.decoders[built_decoder_key(decoder)] = decoder
    while len(stock.decoders) > MAX_CACHED_DECODERS:
        del stock.decoders[next(iter(stock.decoders))]


def is_class_sized(name: str, decoder: nn.Module) -> bool:
    """Decoder tensors whose shape depends on K: tokens, hypernetworks, the iou head's last layer
    (the same groups in SAM's and SAM 2's decoders), and a click-trained adapter's class embedding."""
    last_iou = f"iou_prediction_head.layers.{decoder.iou_prediction_head.num_layers - 1}."
    return name.startswith(("mask_tokens.", "output_hypernetworks_mlps.", last_iou, "class_embed."))


def stock_decoder_key(live_key: str) -> str:
    """Decoder state key under a peft wrapper -> the stock key (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
    return live_key.replace(".base_layer.", ".")


def file_lora_key(live_key: str) -> str:
    """peft's live name `...lora_A.default.weight` -> the file name `...lora_A.weight`."""
    return live_key.replace(".default.", ".")


def set_structure(sam: nn.Module, stock: StockState, config: AdapterConfig, fresh_decoder: bool = False) -> bool:
    """Make `sam`'s modules match `config` (values are set separately), reusing what matches.

    A decoder of another structure goes to the cache and comes back from it when a later config
    needs it (`fresh_decoder` builds a new one instead, for a freshly initialised adapter).
    Returns whether any module was replaced.
    """
    host = stock.host
    before = (host.prompt_encoder, host.mask_decoder, [blk.attn.qkv for blk in host.blocks()])
    device = model_device(sam)
    if host.image_size != config.image_size or host.prompt_encoder is stock.prompt_encoder:
        host.set_image_size(stock.parts, config)
        host.prompt_encoder = host.build_prompt_encoder(stock.prompt_encoder, config).to(device)
    set_encoder_lora(sam, config, lora_rank(stock, config))
    live = host.mask_decoder
    if fresh_decoder or live is stock.mask_decoder or not decoder_structure_matches(live, config):
        keep_decoder(stock, live)
        if fresh_decoder:
            stock.decoders.pop(decoder_key(config), None)
        host.mask_decoder = take_decoder(stock, config, device)
    # In place where the shapes allow, so that a compiled model sees the same buffers.
    for name, values in (("pixel_mean", config.pixel_mean), ("pixel_std", config.pixel_std)):
        live = sam._buffers.get(name)
        if live is None or live is getattr(stock, name):
            sam.register_buffer(name, torch.tensor(values, device=device).view(-1, 1, 1), False)
        else:
            live.copy_(torch.tensor(values).view(-1, 1, 1))
    stock.config = config
    after = (host.prompt_encoder, host.mask_decoder, [blk.attn.qkv for blk in host.blocks()])
    return before[0] is not after[0] or before[1] is not after[1] or any(
        a is not b for a, b in zip(before[2], after[2])
    )


def set_trainable(sam: nn.Module, config: AdapterConfig) -> None:
    """Freeze the stock model; train the LoRA, the prompt encoder and the decoder (the variant:
    not its transformer). SAM 2's memory modules, unused by SAMed, stay frozen."""
    host = host_of(sam)
    for param in sam.parameters():
        param.requires_grad_(False)
    for layer in encoder_lora_layers(sam).values():
        for param in (*layer.q.parameters(), *layer.v.parameters()):
            param.requires_grad_(True)
    for param in host.prompt_encoder.parameters():
        param.requires_grad_(True)
    for name, param in host.mask_decoder.named_parameters():
        frozen = config.decoder_lora and name.startswith("transformer.") and "lora_" not in name
        param.requires_grad_(not frozen)
