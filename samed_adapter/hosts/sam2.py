"""SAM 2 as a SAMed host: everything SAM-2-specific, on the stock `sam2` classes.

The SAM 2 variant of SAMed, relative to a stock `sam2.modeling.sam2_base.SAM2Base` (as
`sam2.build_sam.build_sam2(config, checkpoint)` builds it):

- Encoder LoRA: rank-r bypasses on the query and value thirds of every Hiera trunk block's
  fused `attn.qkv` (Linear dim -> 3 * dim_out; the key third untouched). At a stage boundary
  (the first block of stages 2..4) dim_out = 2 * dim, so `lora_A` is (r, dim) and `lora_B`
  (dim_out, r). The live tensors sit under `image_encoder.trunk.blocks.{i}.attn.qkv`.
- Image path: that of `SAM2ImagePredictor.set_image` (trunk + FPN neck, the decoder's
  `conv_s0`/`conv_s1` on the two high-resolution levels, `no_mem_embed` added to the
  lowest-resolution level): embeddings (B, 256, g, g) with g = S / 16, high-resolution
  features (B, 32, 4g, 4g) and (B, 64, 2g, 2g).
- Input size S (512 by default, a multiple of 32): nothing in the trunk is resized. Hiera
  interpolates its background position embedding (bicubic, 7x7 or 14x14 -> S/4 x S/4) and
  tiles the 8x8 window embedding on every forward (`Hiera._get_pos_embed`), and its window
  attention pads windows that do not divide the grid; both are what sam2 itself does for any
  input size. Only the prompt encoder (and `image_size`, `sam_image_embedding_size`) change.
- No prompts: sparse embeddings empty (B, 0, 256), dense `no_mask_embed` broadcast to
  (B, 256, g, g), exactly as the stock prompt encoder gives for points=boxes=masks=None.
- Decoder: sam2's own MaskDecoder with the stock hyper-parameters but K+1 mask tokens; all
  K+1 masks come back (channel 0 background, k class k). The object-score token stays (it is
  one of the transformer's tokens, so it shapes every mask) but its score is unused, as are
  the multimask-stability and object-pointer settings (they act only in `forward`).

`sam2` is imported lazily: this module imports without it.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam.prompt_encoder import PromptEncoder
    from sam2.modeling.sam2_base import SAM2Base

# Backbone name -> the hydra config sam2 ships (inside the package, module `sam2`).
SAM2_CONFIGS: dict[str, str] = {
    f"{version}_hiera_{size}": f"configs/{version}/{version}_hiera_{size}.yaml"
    for version in ("sam2.1", "sam2")
    for size in ("t", "s", "b+", "l")
}

# Trunk shapes that tell the four Hiera sizes apart: (embed_dim, num_heads, blocks per stage).
# 2.0 and 2.1 share them; `no_obj_embed_spatial` tells the versions apart (see below).
_TRUNKS: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "hiera_t": (96, 1, (1, 2, 7, 2)),
    "hiera_s": (96, 1, (1, 2, 11, 2)),
    "hiera_b+": (112, 2, (2, 3, 16, 3)),
    "hiera_l": (144, 2, (2, 6, 36, 4)),
}


QKV_PREFIX = "image_encoder.trunk.blocks.{i}.attn.qkv"


# ---------------------------------------------------------------- building and naming


def is_sam2(model: Any) -> bool:
    """Whether `model` is a sam2 SAM2Base (False without importing sam2 if nobody has)."""
    if "sam2" not in sys.modules:
        return False
    from sam2.modeling.sam2_base import SAM2Base

    return isinstance(model, SAM2Base)


def sam2_config(backbone: str) -> str:
    """The hydra config name of a SAM 2 backbone ("sam2.1_hiera_t" -> "configs/sam2.1/sam2.1_hiera_t.yaml")."""
    try:
        return SAM2_CONFIGS[backbone]
    except KeyError:
        raise ValueError(f"unknown SAM 2 backbone {backbone!r}; known: {', '.join(SAM2_CONFIGS)}") from None


@contextmanager
def _sam2_hydra(config_name: str) -> Iterator[None]:
    """Hydra's global state set up so that `compose(config_name)` finds sam2's configs.

    Importing sam2 initialises GlobalHydra with its config module, and compose only reads that
    state, so repeated builds need nothing. Someone may have cleared it (then it is set up again,
    as the import does) or initialised it for their own app (then sam2's is swapped in for the
    call and theirs put back).
    """
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    if not hydra.is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    if _finds(hydra, config_name):
        yield
        return
    theirs = hydra.hydra
    hydra.clear()
    try:
        initialize_config_module("sam2", version_base="1.2")
        yield
    finally:
        GlobalHydra.instance().hydra = theirs


def _finds(hydra: Any, config_name: str) -> bool:
    try:
        return hydra.hydra.config_loader.repository.config_exists(config_name)
    except AttributeError:  # another hydra version's internals: let compose say
        return True


def build_sam2(
    backbone: str = "sam2.1_hiera_t",
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    *,
    seed: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
) -> "SAM2Base":
    """A stock SAM2Base in eval mode, built by sam2's own `build_sam2` (1024 input, 4 mask tokens).

    Args:
        backbone: a key of SAM2_CONFIGS ("sam2.1_hiera_t", ..., "sam2_hiera_l").
        checkpoint: Meta's checkpoint file (a dict with the state dict under "model"), read by
            sam2's loader (`weights_only=True`, strict).
        seed: without a checkpoint, every floating tensor is drawn at random from this seed
            (norms near identity, small weights), so that tests exercise all of them; stock
            initialises some at zero (the trunk's position embeddings).
        device: where the model lives.

    On two CPU cores building takes about 1.5 s for hiera_t and 3.5 s for hiera_l (the hydra
    compose is a few ms; the rest is sam2's weight init), and `seed` adds 2 s and 7 s.
    sam2's `apply_postprocessing` defaults stay on (they touch only `forward`'s single-mask
    choice and video settings).
    """
    import sam2  # noqa: F401  (initialises hydra with sam2's configs)
    from sam2.build_sam import build_sam2 as sam2_build_sam2

    config = sam2_config(backbone)
    path = None
    if checkpoint is not None:
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no SAM 2 checkpoint at {path}")
    with _sam2_hydra(config):
        model = sam2_build_sam2(config, None, device="cpu", mode="eval")
    if path is not None:
        from sam2.build_sam import _load_checkpoint

        try:
            _load_checkpoint(model, path)
        except (KeyError, RuntimeError) as err:  # sam2 raises a bare RuntimeError() on missing keys
            raise ValueError(_checkpoint_mismatch(path, backbone, err)) from None
    elif seed is not None:
        from .random_weights import randomize_weights

        randomize_weights(model, seed)
    return model.to(device)


def _checkpoint_mismatch(path: str, backbone: str, err: Exception) -> str:
    message = f"{path} is not a stock {backbone} SAM 2 checkpoint"
    try:
        found = sam2_backbone_for_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    except Exception:  # not a SAM 2 checkpoint at all
        found = None
    if found is not None and found != backbone:
        return f"{message}: its tensors are those of {found}"
    detail = str(err).strip().splitlines()
    return f"{message} (a dict with the model's state dict under 'model')" + (f": {detail[0]}" if detail else "")


def _backbone_name(embed_dim: int, stages: tuple[int, ...], is_2_1: bool, num_heads: Optional[int] = None) -> str:
    """The SAM2_CONFIGS name of a trunk shape (heads checked when known), else a custom name."""
    version = "sam2.1" if is_2_1 else "sam2"
    for name, (dim, heads, blocks) in _TRUNKS.items():
        if (dim, blocks) == (embed_dim, stages) and num_heads in (None, heads):
            return f"{version}_{name}"
    heads = "" if num_heads is None else f"x{num_heads}"
    return f"custom_{version}_hiera_{embed_dim}x{'-'.join(map(str, stages))}{heads}"


def infer_sam2_backbone(model: "SAM2Base") -> str:
    """The SAM2_CONFIGS name whose shapes match `model`, else a descriptive custom name.

    The size comes from the trunk (embed_dim, heads of block 0, blocks per stage). 2.0 and 2.1
    configs build the same trunk and decoder; 2.1 adds `no_obj_embed_spatial` (and a Linear
    `obj_ptr_tpos_proj`), which is what tells them apart (and keeps 2.0 checkpoints from loading
    into 2.1 models).
    """
    trunk = model.image_encoder.trunk
    ends = [-1, *trunk.stage_ends]
    stages = tuple(b - a for a, b in zip(ends, ends[1:]))
    return _backbone_name(
        trunk.patch_embed.proj.out_channels, stages, model.no_obj_embed_spatial is not None,
        trunk.blocks[0].attn.num_heads,
    )


def sam2_backbone_for_state_dict(state: dict[str, torch.Tensor]) -> str:
    """The backbone name of a SAM 2 state dict (a checkpoint's "model" entry), from its shapes.

    Stage boundaries are the blocks with a `proj` (dim != dim_out); heads are not in the
    shapes, but embed_dim and the stages already tell the stock sizes apart.
    """
    prefix = "image_encoder.trunk.blocks."
    if prefix + "0.attn.qkv.weight" not in state:
        raise ValueError("not a SAM 2 state dict: it has no 'image_encoder.trunk.blocks.0.attn.qkv.weight'")
    depth = len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    starts = [0] + [i for i in range(depth) if f"{prefix}{i}.proj.weight" in state] + [depth]
    stages = tuple(b - a for a, b in zip(starts, starts[1:]))
    embed_dim = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    return _backbone_name(embed_dim, stages, "no_obj_embed_spatial" in state)


# ---------------------------------------------------------------- encoder


def check_image_size(model: "SAM2Base", image_size: int) -> None:
    """Raise ValueError unless the trunk runs exactly at `image_size`.

    Hiera needs S / 4 (patch stride) to halve cleanly at every q-pool stage and to be a
    multiple of the window embedding's side (8) it tiles: S a multiple of 32 for every stock
    config. (SAM's 16 is not enough: at 528 the window tiling fails inside sam2.)
    """
    trunk = model.image_encoder.trunk
    stride = 4 * trunk.q_stride[0] ** len(trunk.q_pool_blocks)
    window = trunk.pos_embed_window.shape[-1]
    multiple = max(stride, 4 * window)
    if image_size % multiple or image_size <= 0:
        raise ValueError(f"a SAM 2 {infer_sam2_backbone(model)} encoder needs an image size that is a multiple "
                         f"of {multiple}, got {image_size}")


def image_features(model: "SAM2Base", images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The encoder half of the image path: trunk + neck, `no_mem_embed` on the lowest resolution.

    Args:
        images: (B, 3, S, S), already normalised (the predictor feeds ImageNet-normalised
            [0, 1] pixels; SAMed feeds its config's), S a multiple of 32.

    Returns:
        embeddings (B, 256, g, g), g = S / 16, and the two high-resolution FPN levels before the
        decoder's projection, [(B, 256, 4g, 4g), (B, 256, 2g, 2g)] (empty when the model does not
        use them).

    dtype: sam2 expects autocast for half precision (then everything runs). The neck upsamples
    the stride-32 level in float32, so a model cast to bfloat16 gives float32 embeddings beside
    bfloat16 high-resolution levels, and sam2's own prompt encoder then fails in `get_dense_pe`
    (a float32 grid times its bfloat16 Gaussian matrix).
    """
    out = model.image_encoder(images)
    # The high-resolution levels as the neck gave them: `forward_image` projects these very
    # tensors, and their memory layout (channels-last from the trunk's permute) decides the conv's
    # rounding, so they must not go through the flatten below first.
    high_res = list(out["backbone_fpn"][-model.num_feature_levels : -1])
    _, feats, _, sizes = model._prepare_backbone_features(out)  # each (HW, B, C)
    lowest = feats[-1]
    if model.directly_add_no_mem_embed:  # as the image predictor does: no memory on an image
        lowest = lowest + model.no_mem_embed
    embeddings = lowest.permute(1, 2, 0).view(images.shape[0], -1, *sizes[-1])
    return embeddings, high_res


def project_high_res(mask_decoder: "MaskDecoder", features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The decoder's 1x1 convs on the high-resolution levels (`SAM2Base.forward_image` does this).

    [(B, 256, 4g, 4g), (B, 256, 2g, 2g)] -> [(B, 32, 4g, 4g), (B, 64, 2g, 2g)]. The convs are
    decoder weights, so a SAMed decoder's (trained) convs replace the stock ones here.
    """
    if not features:
        return []
    return [mask_decoder.conv_s0(features[0]), mask_decoder.conv_s1(features[1])]


# ---------------------------------------------------------------- prompt encoder and decoder


def build_prompt_encoder(stock: "PromptEncoder", image_size: int) -> "PromptEncoder":
    """A prompt encoder like `stock` for an (image_size, image_size) input (values loaded separately).

    Its tensors have the stock shapes, so the stock state dict loads into it as it is.
    """
    from sam2.modeling.sam.prompt_encoder import PromptEncoder

    stride = stock.input_image_size[0] // stock.image_embedding_size[0]  # 16
    grid = image_size // stride
    with torch.device(stock.no_mask_embed.weight.device):
        encoder = PromptEncoder(
            embed_dim=stock.embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=stock.mask_downscaling[0].out_channels * 4,
            activation=type(stock.mask_downscaling[2]),
        )
    return encoder.to(dtype=stock.no_mask_embed.weight.dtype)


def build_mask_decoder(
    stock: "MaskDecoder", num_classes: int, device: Optional[torch.device] = None
) -> "MaskDecoder":
    """sam2's MaskDecoder with `stock`'s hyper-parameters but K + 1 mask tokens (K = num_classes).

    Values are loaded separately: every tensor that is not class-sized (`is_class_sized`) has
    its stock shape. Kept from stock: the transformer, high-resolution convs (`conv_s0`,
    `conv_s1`), sigmoid iou head, object-score token and head (MLP), stability settings.
    """
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam.transformer import TwoWayTransformer
    from sam2.modeling.sam2_utils import MLP

    tf = stock.transformer
    attn0 = tf.layers[0].cross_attn_token_to_image
    with torch.device(device or stock.iou_token.weight.device):
        transformer = TwoWayTransformer(
            depth=tf.depth,
            embedding_dim=tf.embedding_dim,
            num_heads=tf.num_heads,
            mlp_dim=tf.mlp_dim,
            activation=type(tf.layers[0].mlp.act),
            attention_downsample_rate=attn0.embedding_dim // attn0.internal_dim,
        )
        decoder = MaskDecoder(
            transformer_dim=stock.transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_classes,
            activation=type(stock.output_upscaling[2]),
            iou_head_depth=stock.iou_prediction_head.num_layers,
            iou_head_hidden_dim=stock.iou_prediction_head.layers[0].out_features,
            use_high_res_features=stock.use_high_res_features,
            iou_prediction_use_sigmoid=stock.iou_prediction_head.sigmoid_output,
            dynamic_multimask_via_stability=stock.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=stock.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=stock.dynamic_multimask_stability_thresh,
            pred_obj_scores=stock.pred_obj_scores,
            pred_obj_scores_mlp=stock.pred_obj_scores and isinstance(stock.pred_obj_score_head, MLP),
            use_multimask_token_for_obj_ptr=stock.use_multimask_token_for_obj_ptr,
        )
    return decoder.to(dtype=stock.iou_token.weight.dtype)


def is_class_sized(name: str, decoder: "MaskDecoder") -> bool:
    """Decoder tensors whose shape depends on K: mask tokens, hypernetworks, the iou head's last layer.

    The same three groups as SAM's decoder; sam2's extra tensors (`obj_score_token`,
    `pred_obj_score_head.*`, `conv_s0`, `conv_s1`) have stock shapes.
    """
    last_iou = f"iou_prediction_head.layers.{decoder.iou_prediction_head.num_layers - 1}."
    return name.startswith(("mask_tokens.", "output_hypernetworks_mlps.", last_iou))


def decode(
    prompt_encoder: "PromptEncoder",
    mask_decoder: "MaskDecoder",
    embeddings: torch.Tensor,
    high_res_features: Optional[list[torch.Tensor]] = None,
    prompts: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All K+1 masks, without prompts or with one prompt set per image.

    Args:
        embeddings: (B, 256, g, g) from `image_features`; g must be the prompt encoder's grid.
        high_res_features: [(B, 32, 4g, 4g), (B, 64, 2g, 2g)], projected by this decoder's convs
            (needed when the decoder uses them, as every stock config does).
        prompts: (sparse (B, N, 256), dense (B, 256, g, g)) from the prompt encoder; None: no prompt.

    Returns:
        low_res_logits (B, K+1, 4g, 4g) and iou (B, K+1), channel k for mask token k. For the stock
        decoder (K = 3), channels 1..3 are its `multimask_output=True` output.
    """
    grid = tuple(embeddings.shape[-2:])
    if grid != tuple(prompt_encoder.image_embedding_size):
        raise ValueError(f"embeddings are {grid[0]}x{grid[1]} but the prompt encoder was built for "
                         f"{prompt_encoder.image_embedding_size}; build it for this image size")
    # Without prompts sam2's prompt encoder gives one empty sparse row and `no_mask_embed`
    # (1, 256, g, g); expanding both over the batch (free: views) equals running it with batch B,
    # so the decoder gets one token set per image and no `repeat_image`.
    sparse, dense = prompt_encoder(points=None, boxes=None, masks=None) if prompts is None else prompts
    batch = embeddings.shape[0]
    sparse = sparse.to(embeddings.dtype).expand(batch, -1, -1)
    dense = dense.to(embeddings.dtype).expand(batch, -1, -1, -1)
    # predict_masks, not forward: forward slices (channels 1.. or 0) and we want every token.
    masks, iou, _, _ = mask_decoder.predict_masks(
        image_embeddings=embeddings,
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=high_res_features,
    )
    return masks, iou


# ---------------------------------------------------------------- the input size


def set_image_size(model: "SAM2Base", image_size: int) -> None:
    """Record the input size on the model as sam2 reads it (`image_size`, `sam_image_embedding_size`)."""
    check_image_size(model, image_size)
    model.image_size = image_size
    model.sam_image_embedding_size = image_size // model.backbone_stride
