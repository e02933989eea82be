"""An independent reference of the PUBLISHED SAMed model (Zhang & Liu 2023), for parity tests.

Written from the spec (shared/spec/SAMED.md, sections 1 and 2) and the structure of the published
code, not from `samed_adapter`: it builds a fresh SAM at `image_size`, loads the stock weights the
way the published `load_from` does (dropping the K-sized decoder parts, resizing `pos_embed` and the
global blocks' relative positions with a 2-D bilinear interpolate), wraps `attn.qkv` in the
published `_LoRA_qkv` and (decoder variant) the decoder's `q_proj`/`v_proj` in `_LoRA_qkv_proj`,
and fills every trainable tensor with non-trivial random values from a seed.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

# Keys the published `load_from` does not take from the stock checkpoint.
_EXCEPT_KEYS = ("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head")
_DECODER_ATTNS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
_PUBLISHED_SHORT = {"self_attn": "sa", "cross_attn_token_to_image": "cti", "cross_attn_image_to_token": "cit"}


class _LoRA_qkv(nn.Module):
    """The published encoder bypass: q and v thirds of the fused qkv get B(A(x)), k untouched."""

    def __init__(self, qkv: nn.Linear, linear_a_q: nn.Linear, linear_b_q: nn.Linear,
                 linear_a_v: nn.Linear, linear_b_v: nn.Linear) -> None:
        super().__init__()
        self.qkv = qkv
        self.linear_a_q = linear_a_q
        self.linear_b_q = linear_b_q
        self.linear_a_v = linear_a_v
        self.linear_b_v = linear_b_v
        self.dim = qkv.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, H, W, 3C)
        new_q = self.linear_b_q(self.linear_a_q(x))
        new_v = self.linear_b_v(self.linear_a_v(x))
        qkv[:, :, :, : self.dim] += new_q
        qkv[:, :, :, -self.dim :] += new_v
        return qkv


class _LoRA_qkv_proj(nn.Module):
    """The published decoder bypass: proj(x) + w_b(w_a(x))."""

    def __init__(self, proj: nn.Linear, w_a: nn.Linear, w_b: nn.Linear) -> None:
        super().__init__()
        self.proj = proj
        self.w_a = w_a
        self.w_b = w_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.w_b(self.w_a(x))


class ReferenceSAMed(nn.Module):
    """The published LoRA_Sam: `sam` (patched in place) plus its LoRA linears, in published order."""

    def __init__(self, sam: Sam, image_size: int, num_classes: int, decoder_lora: bool) -> None:
        super().__init__()
        self.sam = sam
        self.image_size = image_size
        self.num_classes = num_classes
        self.decoder_lora = decoder_lora
        self.w_As = nn.ModuleList()  # even: q of block i // 2, odd: v
        self.w_Bs = nn.ModuleList()
        self.dec_As = nn.ModuleDict({short: nn.ModuleList() for short in _PUBLISHED_SHORT.values()})
        self.dec_Bs = nn.ModuleDict({short: nn.ModuleList() for short in _PUBLISHED_SHORT.values()})
        self.fati: dict[str, nn.Linear] = {}


def _hyper_parameters(stock: Sam) -> dict:
    enc = stock.image_encoder
    blocks = list(enc.blocks)
    dec = stock.mask_decoder
    layer0 = dec.transformer.layers[0]
    return dict(
        embed_dim=enc.patch_embed.proj.out_channels,
        patch_size=enc.patch_embed.proj.kernel_size[0],
        depth=len(blocks),
        num_heads=blocks[0].attn.num_heads,
        mlp_ratio=blocks[0].mlp.lin1.out_features / enc.patch_embed.proj.out_channels,
        qkv_bias=blocks[0].attn.qkv.bias is not None,
        use_rel_pos=blocks[0].attn.use_rel_pos,
        norm_eps=blocks[0].norm1.eps,
        window_size=max(b.window_size for b in blocks),
        global_attn_indexes=tuple(i for i, b in enumerate(blocks) if b.window_size == 0),
        out_chans=enc.neck[0].out_channels,
        prompt_dim=stock.prompt_encoder.embed_dim,
        mask_in_chans=stock.prompt_encoder.mask_downscaling[3].out_channels,
        transformer_depth=len(dec.transformer.layers),
        decoder_mlp_dim=layer0.mlp.lin1.out_features,
        decoder_heads=dec.transformer.num_heads,
        attention_downsample_rate=layer0.cross_attn_token_to_image.embedding_dim
        // layer0.cross_attn_token_to_image.internal_dim,
        iou_head_depth=dec.iou_prediction_head.num_layers,
        iou_head_hidden_dim=dec.iou_prediction_head.layers[0].out_features,
    )


def _fresh_sam(hp: dict, image_size: int, num_classes: int) -> Sam:
    g = image_size // hp["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=hp["patch_size"],
            embed_dim=hp["embed_dim"],
            depth=hp["depth"],
            num_heads=hp["num_heads"],
            mlp_ratio=hp["mlp_ratio"],
            out_chans=hp["out_chans"],
            qkv_bias=hp["qkv_bias"],
            norm_layer=partial(nn.LayerNorm, eps=hp["norm_eps"]),
            use_rel_pos=hp["use_rel_pos"],
            window_size=hp["window_size"],
            global_attn_indexes=hp["global_attn_indexes"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=hp["prompt_dim"],
            image_embedding_size=(g, g),
            input_image_size=(image_size, image_size),
            mask_in_chans=hp["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=num_classes,
            transformer=TwoWayTransformer(
                depth=hp["transformer_depth"],
                embedding_dim=hp["prompt_dim"],
                mlp_dim=hp["decoder_mlp_dim"],
                num_heads=hp["decoder_heads"],
                attention_downsample_rate=hp["attention_downsample_rate"],
            ),
            transformer_dim=hp["prompt_dim"],
            iou_head_depth=hp["iou_head_depth"],
            iou_head_hidden_dim=hp["iou_head_hidden_dim"],
        ),
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )


def _load_from(sam: Sam, state_dict: dict, image_size: int, patch_size: int, global_attn_indexes) -> None:
    """The published `load_from`: stock tensors but the K-sized decoder parts, resized positions."""
    sam_dict = sam.state_dict()
    new_state = {
        k: v.clone() for k, v in state_dict.items()
        if k in sam_dict and not any(e in k for e in _EXCEPT_KEYS)
    }
    token_size = image_size // patch_size
    pos_embed = new_state["image_encoder.pos_embed"]
    if pos_embed.shape[1] != token_size:
        pos_embed = pos_embed.permute(0, 3, 1, 2)  # (1, C, h, w)
        pos_embed = F.interpolate(pos_embed, (token_size, token_size), mode="bilinear", align_corners=False)
        new_state["image_encoder.pos_embed"] = pos_embed.permute(0, 2, 3, 1)
        for i in global_attn_indexes:
            for hw in "hw":
                key = f"image_encoder.blocks.{i}.attn.rel_pos_{hw}"
                rel = new_state[key]
                _, w = rel.shape
                rel = F.interpolate(rel[None, None], (token_size * 2 - 1, w), mode="bilinear", align_corners=False)
                new_state[key] = rel[0, 0]
    sam_dict.update(new_state)
    sam.load_state_dict(sam_dict)


def _is_norm(module: nn.Module) -> bool:
    return "LayerNorm" in type(module).__name__


def _randomize_trainable(module: nn.Module, generator: torch.Generator, skip_prefix: str | None = None) -> None:
    """Non-trivial random values for every parameter (not buffers) of `module`."""
    norms = {name for name, m in module.named_modules() if _is_norm(m)}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if skip_prefix is not None and name.startswith(skip_prefix):
                continue
            owner, _, leaf = name.rpartition(".")
            noise = torch.randn(param.shape, generator=generator)
            if owner in norms:
                value = noise * 0.1 + (1.0 if leaf == "weight" else 0.0)
            elif param.dim() > 1:
                fan_in = param.numel() // param.shape[0]
                value = noise / math.sqrt(max(fan_in, 1))
            else:
                value = noise * 0.1
            param.copy_(value)


def _lora_pair(in_features: int, out_features: int, rank: int, generator: torch.Generator):
    a = nn.Linear(in_features, rank, bias=False)
    b = nn.Linear(rank, out_features, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.randn(a.weight.shape, generator=generator) / math.sqrt(in_features))
        b.weight.copy_(torch.randn(b.weight.shape, generator=generator) * 0.05)
    return a, b


def build_reference(stock_sam: Sam, num_classes: int, image_size: int = 512, rank: int = 4,
                    decoder_lora: bool = False, seed: int = 0) -> ReferenceSAMed:
    """A published-style SAMed built on the stock weights of `stock_sam` (left unchanged).

    Every LoRA tensor (A and B) and every trainable prompt-encoder / mask-decoder tensor gets
    random values from `seed`; for the decoder-LoRA variant the decoder transformer stays stock.
    """
    hp = _hyper_parameters(stock_sam)
    sam = _fresh_sam(hp, image_size, num_classes)
    _load_from(sam, stock_sam.state_dict(), image_size, hp["patch_size"], hp["global_attn_indexes"])
    sam.eval()
    for p in sam.parameters():
        p.requires_grad_(False)
    ref = ReferenceSAMed(sam, image_size, num_classes, decoder_lora)
    generator = torch.Generator().manual_seed(seed)

    _randomize_trainable(sam.prompt_encoder, generator)
    _randomize_trainable(sam.mask_decoder, generator, skip_prefix="transformer." if decoder_lora else None)

    for blk in sam.image_encoder.blocks:
        qkv = blk.attn.qkv
        dim = qkv.in_features
        a_q, b_q = _lora_pair(dim, dim, rank, generator)
        a_v, b_v = _lora_pair(dim, dim, rank, generator)
        ref.w_As.extend([a_q, a_v])
        ref.w_Bs.extend([b_q, b_v])
        blk.attn.qkv = _LoRA_qkv(qkv, a_q, b_q, a_v, b_v)

    if decoder_lora:
        transformer = sam.mask_decoder.transformer
        for layer in transformer.layers:
            for attn_name in _DECODER_ATTNS:
                attn = getattr(layer, attn_name)
                short = _PUBLISHED_SHORT[attn_name]
                for proj_name in ("q_proj", "v_proj"):
                    proj = getattr(attn, proj_name)
                    a, b = _lora_pair(proj.in_features, proj.out_features, rank, generator)
                    ref.dec_As[short].append(a)
                    ref.dec_Bs[short].append(b)
                    setattr(attn, proj_name, _LoRA_qkv_proj(proj, a, b))
        attn = transformer.final_attn_token_to_image
        for p in "qv":
            proj = getattr(attn, f"{p}_proj")
            a, b = _lora_pair(proj.in_features, proj.out_features, rank, generator)
            ref.fati[f"{p}a"], ref.fati[f"{p}b"] = a, b
            setattr(attn, f"{p}_proj", _LoRA_qkv_proj(proj, a, b))
    ref.eval()
    return ref


def save_published(ref: ReferenceSAMed) -> dict[str, torch.Tensor]:
    """The published checkpoint dict (spec section 2)."""
    out: dict[str, torch.Tensor] = {}
    for i, (a, b) in enumerate(zip(ref.w_As, ref.w_Bs)):
        out[f"w_a_{i:03d}"] = a.weight.detach().clone()
        out[f"w_b_{i:03d}"] = b.weight.detach().clone()
    for key, value in ref.sam.state_dict().items():
        if key.startswith("prompt_encoder."):
            out[key] = value.detach().clone()
        elif key.startswith("mask_decoder."):
            if ref.decoder_lora and key.startswith("mask_decoder.transformer."):
                continue
            out[key] = value.detach().clone()
    if ref.decoder_lora:
        for short in _PUBLISHED_SHORT.values():
            for i, (a, b) in enumerate(zip(ref.dec_As[short], ref.dec_Bs[short])):
                out[f"{short}_a_{i:03d}"] = a.weight.detach().clone()
                out[f"{short}_b_{i:03d}"] = b.weight.detach().clone()
        for key, lin in ref.fati.items():
            out[f"fati_{key}"] = lin.weight.detach().clone()
    return out


@torch.no_grad()
def reference_forward(ref: ReferenceSAMed, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The published forward: no prompts, all K+1 masks, bilinear upsampling to image_size."""
    sam = ref.sam
    x = (images - sam.pixel_mean) / sam.pixel_std
    embeddings = sam.image_encoder(x)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    low_res, iou = sam.mask_decoder.predict_masks(
        image_embeddings=embeddings,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
    )
    size = ref.image_size
    masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    return {"masks": masks, "low_res_logits": low_res, "iou_predictions": iou}
