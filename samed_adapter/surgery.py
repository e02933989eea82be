"""Stock SAM <-> SAMed: the structural changes, the stock tensors kept aside, and their return.

Patching changes a stock SAM in place:
- the encoder runs at `image_size`: `pos_embed` and the global blocks' `rel_pos_h/w` are
  resized from the stock tensors (which are kept, not copied);
- every chosen block's `attn.qkv` is wrapped in a `LoraQKV` (the stock Linear is its
  `base_layer`);
- the prompt encoder and the mask decoder are replaced by SAMed ones (K+1 mask tokens); the
  stock objects are kept;
- `pixel_mean`/`pixel_std` become the adapter's.
The kept objects live in a `StockState` attached to the SAM (not a submodule, so they appear
in no `state_dict()` or `parameters()`). `restore_stock` puts every one of them back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from .adapter import Adapter
from .attention import disable_sdpa
from .config import AdapterConfig
from .lora import LoraQKV, is_peft_lora, wrap_linear_with_peft

_STOCK_ATTR = "_samed_stock"
DECODER_LORA_ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")


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
    img_size: int
    pos_embed: nn.Parameter
    rel_pos: dict[int, tuple[nn.Parameter, nn.Parameter]]
    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
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

    def __post_init__(self) -> None:
        self.prompt_state = dict(self.prompt_encoder.state_dict())
        self.decoder_state = dict(self.mask_decoder.state_dict())

    def to(self, device: torch.device) -> None:
        """Move the kept stock tensors to `device` (after the user moved the model)."""
        self.prompt_encoder.to(device)
        self.mask_decoder.to(device)
        self.__post_init__()
        for p in [self.pos_embed, *[t for pair in self.rel_pos.values() for t in pair]]:
            p.data = p.data.to(device)


def get_stock_state(sam: Sam) -> Optional[StockState]:
    """The StockState of a patched SAM, or None for a stock one."""
    return sam.__dict__.get(_STOCK_ATTR)


def require_stock_state(sam: Sam) -> StockState:
    """The StockState of a patched SAM; NotPatchedError for a stock one."""
    stock = get_stock_state(sam)
    if stock is None:
        raise NotPatchedError(
            "this SAM is not patched (or was unpatched); call samed_adapter.patch(sam, adapter) or "
            "samed_adapter.inject(sam, config) first"
        )
    return stock


def stock_fingerprint(sam: Sam) -> str:
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


def take_stock(sam: Sam, config: AdapterConfig, fingerprint: str) -> StockState:
    """Record the stock parts of an unpatched SAM and attach them to it."""
    enc = sam.image_encoder
    stock = StockState(
        fingerprint=fingerprint,
        config=config,
        img_size=enc.img_size,
        pos_embed=enc.pos_embed,
        rel_pos={
            i: (blk.attn.rel_pos_h, blk.attn.rel_pos_w)
            for i, blk in enumerate(enc.blocks)
            if blk.window_size == 0 and blk.attn.use_rel_pos
        },
        prompt_encoder=sam.prompt_encoder,
        mask_decoder=sam.mask_decoder,
        pixel_mean=sam.pixel_mean,
        pixel_std=sam.pixel_std,
        requires_grad={name: p.requires_grad for name, p in sam.named_parameters()},
    )
    sam.__dict__[_STOCK_ATTR] = stock
    return stock


def restore_stock(sam: Sam) -> Sam:
    """Undo every structural change: the exact stock objects and tensors go back."""
    stock = get_stock_state(sam)
    if stock is None:
        return sam
    device = sam.pixel_mean.device
    if stock.pos_embed.device != device:
        stock.to(device)
    enc = sam.image_encoder
    enc.img_size = stock.img_size
    enc.pos_embed = stock.pos_embed
    for i, (rel_h, rel_w) in stock.rel_pos.items():
        enc.blocks[i].attn.rel_pos_h = rel_h
        enc.blocks[i].attn.rel_pos_w = rel_w
    for blk in enc.blocks:
        if isinstance(blk.attn.qkv, LoraQKV):
            blk.attn.qkv.unmerge()
            blk.attn.qkv = blk.attn.qkv.base_layer
    sam.prompt_encoder = stock.prompt_encoder
    sam.mask_decoder = stock.mask_decoder
    sam.register_buffer("pixel_mean", stock.pixel_mean.to(device), False)
    sam.register_buffer("pixel_std", stock.pixel_std.to(device), False)
    for name, param in sam.named_parameters():
        param.requires_grad_(stock.requires_grad.get(name, param.requires_grad))
    disable_sdpa(enc)
    del sam.__dict__[_STOCK_ATTR]
    return sam


# ---------------------------------------------------------------- encoder


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, G, G, C) -> (1, grid, grid, C), bilinear, align_corners=False."""
    if pos_embed.shape[1] == grid and pos_embed.shape[2] == grid:
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1).contiguous()


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """(L, head_dim) -> (length, head_dim), linear along the first axis, align_corners=False."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t().contiguous()


def set_image_size(sam: Sam, stock: StockState, config: AdapterConfig) -> None:
    """Resize the encoder's position tensors from the stock ones to `config.image_size`; they stay frozen."""
    enc = sam.image_encoder
    grid = config.grid_size
    with torch.no_grad():
        pos = resize_pos_embed(stock.pos_embed, grid)
        enc.pos_embed = stock.pos_embed if pos is stock.pos_embed else nn.Parameter(pos, requires_grad=False)
        for i, (rel_h, rel_w) in stock.rel_pos.items():
            for name, rel in (("rel_pos_h", rel_h), ("rel_pos_w", rel_w)):
                resized = resize_rel_pos(rel, 2 * grid - 1)
                setattr(enc.blocks[i].attn, name, rel if resized is rel else nn.Parameter(resized, requires_grad=False))
    enc.img_size = config.image_size


def lora_blocks(sam: Sam, config: AdapterConfig) -> list[int]:
    depth = len(sam.image_encoder.blocks)
    return list(range(depth)) if config.lora_blocks is None else list(config.lora_blocks)


def set_encoder_lora(sam: Sam, config: AdapterConfig) -> None:
    """Wrap the chosen blocks' qkv in LoraQKV (re-wrapping where rank or scale changed)."""
    wanted = set(lora_blocks(sam, config))
    for i, blk in enumerate(sam.image_encoder.blocks):
        layer = blk.attn.qkv
        if isinstance(layer, LoraQKV):
            if i in wanted and layer.rank == config.rank and layer.scale == config.lora_scale:
                continue
            layer.unmerge()
            layer = layer.base_layer
        if i in wanted:
            device, dtype = layer.weight.device, layer.weight.dtype
            layer = LoraQKV(layer, config.rank, config.lora_scale).to(device=device, dtype=dtype)
        blk.attn.qkv = layer


def encoder_lora_layers(sam: Sam) -> dict[int, LoraQKV]:
    return {i: blk.attn.qkv for i, blk in enumerate(sam.image_encoder.blocks) if isinstance(blk.attn.qkv, LoraQKV)}


# ---------------------------------------------------------------- prompt encoder and decoder


def build_prompt_encoder(stock: PromptEncoder, config: AdapterConfig) -> PromptEncoder:
    """A prompt encoder like `stock` for a `config.image_size` input (values are loaded separately)."""
    grid, size = config.grid_size, config.image_size
    return PromptEncoder(
        embed_dim=stock.embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(size, size),
        mask_in_chans=stock.mask_downscaling[0].out_channels * 4,
    )


def build_mask_decoder(stock: MaskDecoder, config: AdapterConfig, device: Optional[torch.device] = None) -> MaskDecoder:
    """A SAMed decoder: stock architecture with K+1 mask tokens, decoder LoRA for the variant."""
    stock_tf = stock.transformer
    attn0 = stock_tf.layers[0].cross_attn_token_to_image
    with torch.device(device or stock.iou_token.weight.device):
        transformer = TwoWayTransformer(
            depth=stock_tf.depth,
            embedding_dim=stock_tf.embedding_dim,
            num_heads=stock_tf.num_heads,
            mlp_dim=stock_tf.mlp_dim,
            attention_downsample_rate=attn0.embedding_dim // attn0.internal_dim,
        )
        decoder = MaskDecoder(
            transformer_dim=stock.transformer_dim,
            transformer=transformer,
            num_multimask_outputs=config.num_classes,
            iou_head_depth=stock.iou_prediction_head.num_layers,
            iou_head_hidden_dim=stock.iou_prediction_head.layers[0].out_features,
        )
        if config.decoder_lora:
            for attn in decoder_lora_attentions(decoder):
                attn.q_proj = wrap_linear_with_peft(attn.q_proj, config.decoder_lora_rank, config.lora_scale)
                attn.v_proj = wrap_linear_with_peft(attn.v_proj, config.decoder_lora_rank, config.lora_scale)
    return decoder.to(dtype=stock.iou_token.weight.dtype)


def decoder_lora_attentions(decoder: MaskDecoder) -> list[nn.Module]:
    """The decoder attentions that carry LoRA in the variant, in published order."""
    tf = decoder.transformer
    return [getattr(layer, name) for layer in tf.layers for name in DECODER_LORA_ATTENTIONS] + [
        tf.final_attn_token_to_image
    ]


def decoder_structure_matches(decoder: MaskDecoder, config: AdapterConfig) -> bool:
    if decoder.num_mask_tokens != config.num_classes + 1:
        return False
    q_proj = decoder.transformer.final_attn_token_to_image.q_proj
    if config.decoder_lora:
        return is_peft_lora(q_proj) and q_proj.r["default"] == config.decoder_lora_rank and (
            q_proj.scaling["default"] == config.lora_scale
        )
    return not is_peft_lora(q_proj)


def is_class_sized(name: str, decoder: MaskDecoder) -> bool:
    """Decoder tensors whose shape depends on K: tokens, hypernetworks, the iou head's last layer."""
    last_iou = f"iou_prediction_head.layers.{decoder.iou_prediction_head.num_layers - 1}."
    return name.startswith(("mask_tokens.", "output_hypernetworks_mlps.", last_iou))


def stock_decoder_key(live_key: str) -> str:
    """Decoder state key under a peft wrapper -> the stock key (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
    return live_key.replace(".base_layer.", ".")


def file_lora_key(live_key: str) -> str:
    """peft's live name `...lora_A.default.weight` -> the file name `...lora_A.weight`."""
    return live_key.replace(".default.", ".")


def set_structure(sam: Sam, stock: StockState, config: AdapterConfig) -> bool:
    """Make `sam`'s modules match `config` (values are set separately), reusing what matches.

    Returns whether any module was rebuilt.
    """
    before = (sam.prompt_encoder, sam.mask_decoder, [blk.attn.qkv for blk in sam.image_encoder.blocks])
    device = sam.pixel_mean.device
    if sam.image_encoder.img_size != config.image_size or sam.prompt_encoder is stock.prompt_encoder:
        set_image_size(sam, stock, config)
        sam.prompt_encoder = build_prompt_encoder(stock.prompt_encoder, config).to(device)
    set_encoder_lora(sam, config)
    if sam.mask_decoder is stock.mask_decoder or not decoder_structure_matches(sam.mask_decoder, config):
        sam.mask_decoder = build_mask_decoder(stock.mask_decoder, config, device=device)
    sam.register_buffer("pixel_mean", torch.tensor(config.pixel_mean, device=device).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(config.pixel_std, device=device).view(-1, 1, 1), False)
    stock.config = config
    after = (sam.prompt_encoder, sam.mask_decoder, [blk.attn.qkv for blk in sam.image_encoder.blocks])
    return before[0] is not after[0] or before[1] is not after[1] or any(
        a is not b for a, b in zip(before[2], after[2])
    )


def set_trainable(sam: Sam, config: AdapterConfig) -> None:
    """Freeze stock SAM; train the LoRA, the prompt encoder and the decoder (the variant: not its transformer)."""
    for param in sam.image_encoder.parameters():
        param.requires_grad_(False)
    for layer in encoder_lora_layers(sam).values():
        for param in (*layer.q.parameters(), *layer.v.parameters()):
            param.requires_grad_(True)
    for param in sam.prompt_encoder.parameters():
        param.requires_grad_(True)
    for name, param in sam.mask_decoder.named_parameters():
        frozen = config.decoder_lora and name.startswith("transformer.") and "lora_" not in name
        param.requires_grad_(not frozen)
