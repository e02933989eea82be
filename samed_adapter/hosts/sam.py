"""The stock models SAMed patches: SAM (`segment_anything.Sam`) and SAM 2 (`sam2` SAM2Base).

A Host is what patching, transfer and the SAMed forward need to know about one family: where
the encoder blocks' qkv projections are and what their adapter tensors are named, which
attributes hold the prompt encoder and mask decoder, what changes with the input size, how an
image becomes embeddings and how the decoder turns them into K+1 masks. Everything else
(LoRA, the decoder surgery, the file format, hot swaps) is shared.

The adapter file names the head tensors `prompt_encoder.*` and `mask_decoder.*` for both
families; the encoder LoRA tensors carry the model's own path to the qkv layer
(`image_encoder.blocks.{i}.attn.qkv` for SAM, `image_encoder.trunk.blocks.{i}.attn.qkv` for
SAM 2), so an adapter of one family cannot fit the other.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import sam2 as sam2_host
from ..adapter_file.config import AdapterConfig


class SamHost:
    """segment_anything's Sam: ViT encoder, pos_embed and rel_pos resized to the input size."""

    family = "SAM"
    lora_prefix = "image_encoder.blocks.{i}.attn.qkv"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ------------------------------------------------------------ naming and encoder shapes

    def backbone(self) -> str:
        from .backbones import infer_backbone

        return infer_backbone(self.model)

    def blocks(self) -> nn.ModuleList:
        """The encoder blocks, each with `attn.qkv`."""
        return self.model.image_encoder.blocks

    def qkv_dims(self, block: int) -> tuple[int, int]:
        """(C, C') of block `block`'s qkv, C -> 3C'."""
        qkv = self.blocks()[block].attn.qkv
        layer = getattr(qkv, "base_layer", qkv)
        return layer.in_features, layer.out_features // 3

    def check_image_size(self, image_size: int) -> None:
        """SAM runs at any multiple of 16 (AdapterConfig checks that)."""

    # ------------------------------------------------------------ the parts patching replaces

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.model.prompt_encoder

    @prompt_encoder.setter
    def prompt_encoder(self, module: nn.Module) -> None:
        self.model.prompt_encoder = module

    @property
    def mask_decoder(self) -> nn.Module:
        return self.model.mask_decoder

    @mask_decoder.setter
    def mask_decoder(self, module: nn.Module) -> None:
        self.model.mask_decoder = module

    @property
    def image_size(self) -> int:
        return self.model.image_encoder.img_size

    def stock_parts(self) -> dict[str, Any]:
        """The size-dependent encoder tensors (kept, not copied) and the input size."""
        enc = self.model.image_encoder
        return {
            "img_size": enc.img_size,
            "pos_embed": enc.pos_embed,
            "rel_pos": {
                i: (blk.attn.rel_pos_h, blk.attn.rel_pos_w)
                for i, blk in enumerate(enc.blocks)
                if blk.window_size == 0 and blk.attn.use_rel_pos
            },
        }

    def restore_parts(self, parts: dict[str, Any]) -> None:
        enc = self.model.image_encoder
        enc.img_size = parts["img_size"]
        enc.pos_embed = parts["pos_embed"]
        for i, (rel_h, rel_w) in parts["rel_pos"].items():
            enc.blocks[i].attn.rel_pos_h = rel_h
            enc.blocks[i].attn.rel_pos_w = rel_w

    def move_parts(self, parts: dict[str, Any], device: torch.device) -> None:
        for p in [parts["pos_embed"], *[t for pair in parts["rel_pos"].values() for t in pair]]:
            p.data = p.data.to(device)

    def set_image_size(self, parts: dict[str, Any], config: AdapterConfig) -> None:
        """Resize the encoder's position tensors from the stock ones to `config.image_size`; they stay frozen."""
        enc = self.model.image_encoder
        grid = config.grid_size
        with torch.no_grad():
            pos = resize_pos_embed(parts["pos_embed"], grid)
            enc.pos_embed = parts["pos_embed"] if pos is parts["pos_embed"] else nn.Parameter(pos, requires_grad=False)
            for i, (rel_h, rel_w) in parts["rel_pos"].items():
                for name, rel in (("rel_pos_h", rel_h), ("rel_pos_w", rel_w)):
                    resized = resize_rel_pos(rel, 2 * grid - 1)
                    setattr(enc.blocks[i].attn, name, rel if resized is rel else nn.Parameter(resized, requires_grad=False))
        enc.img_size = config.image_size

    # ------------------------------------------------------------ building the SAMed heads

    def build_prompt_encoder(self, stock: nn.Module, config: AdapterConfig) -> nn.Module:
        """A prompt encoder like `stock` for a `config.image_size` input (values are loaded separately)."""
        from segment_anything.modeling import PromptEncoder

        grid, size = config.grid_size, config.image_size
        return PromptEncoder(
            embed_dim=stock.embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(size, size),
            mask_in_chans=stock.mask_downscaling[0].out_channels * 4,
        )

    def build_mask_decoder(self, stock: nn.Module, num_classes: int, device: torch.device) -> nn.Module:
        """The stock decoder's architecture with K+1 mask tokens (values are loaded separately)."""
        from segment_anything.modeling import MaskDecoder, TwoWayTransformer

        stock_tf = stock.transformer
        attn0 = stock_tf.layers[0].cross_attn_token_to_image
        with torch.device(device):
            transformer = TwoWayTransformer(
                depth=stock_tf.depth,
                embedding_dim=stock_tf.embedding_dim,
                num_heads=stock_tf.num_heads,
                mlp_dim=stock_tf.mlp_dim,
                attention_downsample_rate=attn0.embedding_dim // attn0.internal_dim,
            )
            return MaskDecoder(
                transformer_dim=stock.transformer_dim,
                transformer=transformer,
                num_multimask_outputs=num_classes,
                iou_head_depth=stock.iou_prediction_head.num_layers,
                iou_head_hidden_dim=stock.iou_prediction_head.layers[0].out_features,
            )

    # ------------------------------------------------------------ the image path

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, S, S) normalised -> embeddings (B, D, g, g) and no extra features."""
        return self.model.image_encoder(images), []

    def decode(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, embeddings: torch.Tensor,
               extra: list[torch.Tensor], prompts: Optional[tuple[torch.Tensor, torch.Tensor]] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, g, g) -> low-res logits (B, K+1, 4g, 4g), iou (B, K+1), without prompts, or with
        `prompts` = (sparse (B, N, D), dense (B, D, g, g)), one prompt set per image."""
        if prompts is not None:
            # Stock predict_masks repeats one image once per prompt set (repeat_interleave by the
            # token batch), so B images with B prompt sets go through it one pair at a time.
            sparse, dense = prompts
            pe = prompt_encoder.get_dense_pe()
            pairs = [mask_decoder.predict_masks(image_embeddings=embeddings[b : b + 1], image_pe=pe,
                                                sparse_prompt_embeddings=sparse[b : b + 1].to(embeddings.dtype),
                                                dense_prompt_embeddings=dense[b : b + 1].to(embeddings.dtype))
                     for b in range(embeddings.shape[0])]
            return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        # No prompts: sparse (1, 0, D) and dense no_mask_embed (1, D, g, g), broadcast over the
        # batch inside the decoder exactly as the published SAMed forward does.
        sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)
        return mask_decoder.predict_masks(
            image_embeddings=embeddings,
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(embeddings.dtype),
            dense_prompt_embeddings=dense,
        )


class Sam2Host(SamHost):
    """sam2's SAM2Base: Hiera trunk + FPN neck, nothing in the trunk resized (see sam2_host)."""

    family = "SAM 2"
    lora_prefix = sam2_host.QKV_PREFIX

    def backbone(self) -> str:
        return sam2_host.infer_sam2_backbone(self.model)

    def blocks(self) -> nn.ModuleList:
        return self.model.image_encoder.trunk.blocks

    def check_image_size(self, image_size: int) -> None:
        sam2_host.check_image_size(self.model, image_size)

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.model.sam_prompt_encoder

    @prompt_encoder.setter
    def prompt_encoder(self, module: nn.Module) -> None:
        self.model.sam_prompt_encoder = module

    @property
    def mask_decoder(self) -> nn.Module:
        return self.model.sam_mask_decoder

    @mask_decoder.setter
    def mask_decoder(self, module: nn.Module) -> None:
        self.model.sam_mask_decoder = module

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def stock_parts(self) -> dict[str, Any]:
        return {name: getattr(self.model, name) for name in ("image_size", "sam_image_embedding_size")}

    def restore_parts(self, parts: dict[str, Any]) -> None:
        for name, value in parts.items():
            setattr(self.model, name, value)

    def move_parts(self, parts: dict[str, Any], device: torch.device) -> None:
        """Nothing to move: the parts are plain ints."""

    def set_image_size(self, parts: dict[str, Any], config: AdapterConfig) -> None:
        sam2_host.set_image_size(self.model, config.image_size)

    def build_prompt_encoder(self, stock: nn.Module, config: AdapterConfig) -> nn.Module:
        return sam2_host.build_prompt_encoder(stock, config.image_size)

    def build_mask_decoder(self, stock: nn.Module, num_classes: int, device: torch.device) -> nn.Module:
        return sam2_host.build_mask_decoder(stock, num_classes, device=device)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, S, S) normalised -> embeddings (B, 256, g, g) and the two high-resolution FPN
        levels [(B, 256, 4g, 4g), (B, 256, 2g, 2g)], before the decoder's projections (so that
        adapters with other decoders share one encoder pass)."""
        return sam2_host.image_features(self.model, images)

    def decode(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, embeddings: torch.Tensor,
               extra: list[torch.Tensor], prompts: Optional[tuple[torch.Tensor, torch.Tensor]] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        high_res = sam2_host.project_high_res(mask_decoder, extra)
        return sam2_host.decode(prompt_encoder, mask_decoder, embeddings, high_res, prompts)


def host_of(model: Any) -> Optional[SamHost]:
    """The Host for a stock or patched SAM or SAM 2, None for anything else."""
    from segment_anything.modeling import Sam

    if isinstance(model, Sam):
        return SamHost(model)
    if sam2_host.is_sam2(model):
        return Sam2Host(model)
    return None


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
