"""The SAM backbones this library knows, and a builder for stock SAM models.

The builder makes the stock `segment_anything` classes exactly as
`segment_anything.build_sam` does (1024 input, 4 mask tokens), optionally at a smaller
size for tests (`"tiny"`), from a checkpoint or with random weights. SAM 2 backbones
(`sam2.1_hiera_t`, ..., see `sam2_host.SAM2_CONFIGS`) are built by sam2's own `build_sam2`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer


@dataclass(frozen=True)
class Backbone:
    """Hyper-parameters of a stock SAM (encoder ViT plus prompt encoder and decoder)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    window_size: int = 14
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mask_in_chans: int = 16


_BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> Backbone:
    """Add a backbone to the table; a name can be registered once."""
    if backbone.name in _BACKBONES:
        raise ValueError(f"a backbone named {backbone.name!r} is already registered")
    _BACKBONES[backbone.name] = backbone
    return backbone


def list_backbones() -> list[str]:
    """SAM backbones (registered) and SAM 2 ones (sam2's configs; building them needs `sam2`)."""
    from .sam2 import SAM2_CONFIGS

    return sorted(_BACKBONES) + list(SAM2_CONFIGS)


# The backbones segment_anything's own `sam_model_registry` builds ("default" is vit_h).
STOCK_BACKBONES = ("vit_b", "vit_l", "vit_h")


def build_hint(name: str) -> str:
    """How to build a SAM of backbone `name`, for error messages."""
    from .sam2 import SAM2_CONFIGS

    if name in SAM2_CONFIGS:
        return f"sam2.build_sam.build_sam2({SAM2_CONFIGS[name]!r}, checkpoint) (a SAM 2 {name})"
    if name in STOCK_BACKBONES:
        return f"segment_anything.sam_model_registry[{name!r}](checkpoint=...)"
    if name in _BACKBONES:  # only this library knows it
        return f"samed_adapter.build_sam({name!r}, checkpoint=...)"
    return f"the SAM the adapter was made on (a {name} encoder)"


# Meta's checkpoint file names: SAM's by backbone, SAM 2's by Hiera size (`sam2.1_hiera_t` is
# in `sam2.1_hiera_tiny.pt`).
STOCK_CHECKPOINTS = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
_HIERA_SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}


def checkpoint_name(name: str) -> Optional[str]:
    """Meta's checkpoint file for backbone `name` (`sam_vit_b_01ec64.pth`, `sam2.1_hiera_tiny.pt`),
    or None for a backbone without published weights (`tiny`)."""
    if name in STOCK_CHECKPOINTS:
        return STOCK_CHECKPOINTS[name]
    version, _, size = name.partition("_hiera_")
    if version in ("sam2", "sam2.1") and size in _HIERA_SIZES:
        return f"{version}_hiera_{_HIERA_SIZES[size]}.pt"
    return None


def command_line_hint(name: str) -> str:
    """How to get a SAM of backbone `name` from `samed-adapter segment` / `evaluate`, for messages
    a command-line user reads (`build_hint` gives the Python call)."""
    from .sam2 import SAM2_CONFIGS

    random = f"--sam-backbone {name} --random-sam-seed N for random weights (tests only)"
    checkpoint = checkpoint_name(name)
    if name in SAM2_CONFIGS:
        return f"--sam {checkpoint} --sam2-config {name} (a SAM 2 {name} checkpoint), or {random}"
    if checkpoint is not None:
        return f"--sam {checkpoint}, or {random}"
    if name in _BACKBONES:
        return random
    return f"--sam with the checkpoint of the SAM the adapter was made on (a {name} encoder)"


def get_backbone(name: str) -> Backbone:
    try:
        return _BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}") from None


register_backbone(Backbone("vit_b", 768, 12, 12, (2, 5, 8, 11)))
register_backbone(Backbone("vit_l", 1024, 24, 16, (5, 11, 17, 23)))
register_backbone(Backbone("vit_h", 1280, 32, 16, (7, 15, 23, 31)))
# A few-hundred-kB SAM with the stock classes, for tests and demos on a CPU. It keeps the stock
# mask_in_chans of 16: with 4, the mask prompt's first LayerNorm2d normalises a single channel to
# zero, so a click adapter on it never saw the mask (or the clicks painted into it).
register_backbone(
    Backbone(
        "tiny", 64, 2, 2, (1,), image_size=256, window_size=4,
        prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2,
    )
)


def build_sam(
    backbone: Union[str, Backbone] = "vit_b",
    *,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    seed: Optional[int] = None,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> Sam:
    """Build a stock SAM (or SAM 2) in eval mode.

    Args:
        backbone: a registered name ("vit_b", "vit_l", "vit_h", "tiny") or a Backbone; or a SAM 2
            name ("sam2.1_hiera_t", ..., built by sam2's `build_sam2`; needs the `sam2` package).
        checkpoint: a stock SAM state dict file (Meta's `sam_vit_b_01ec64.pth`), read with
            `weights_only=True` on the CPU.
        state_dict: the checkpoint's tensors, already read (so a file is read once).
        seed: without a checkpoint, every tensor (position embeddings included, which stock
            initialises at zero) is drawn at random from this seed, so that tests exercise
            them.
    """
    from .sam2 import SAM2_CONFIGS

    if isinstance(backbone, str) and backbone in SAM2_CONFIGS:
        return _build_sam2(backbone, checkpoint, seed, state_dict)
    bb = get_backbone(backbone) if isinstance(backbone, str) else backbone
    grid = bb.image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=bb.depth,
            embed_dim=bb.embed_dim,
            img_size=bb.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=bb.num_heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=bb.global_attn_indexes,
            window_size=bb.window_size,
            out_chans=bb.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=bb.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(bb.image_size, bb.image_size),
            mask_in_chans=bb.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=bb.prompt_dim, mlp_dim=bb.decoder_mlp_dim, num_heads=bb.decoder_heads
            ),
            transformer_dim=bb.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256 if bb.prompt_dim == 256 else bb.prompt_dim,
        ),
    )
    sam.eval()
    if checkpoint is not None or state_dict is not None:
        from ..adapter_file.checkpoints import load_state_dict_file

        state = state_dict if state_dict is not None else load_state_dict_file(checkpoint)
        try:
            sam.load_state_dict(state)
        except RuntimeError as err:
            where = os.fspath(checkpoint) if checkpoint is not None else "the state dict"
            raise ValueError(
                f"{where} is not a stock {bb.name} SAM checkpoint: {str(err).splitlines()[0]}"
            ) from None
    elif seed is not None:
        from .random_weights import randomize_weights

        randomize_weights(sam, seed)
    return sam


def _build_sam2(name: str, checkpoint, seed: Optional[int], state_dict: Optional[dict[str, torch.Tensor]]):
    from .sam2 import build_sam2, sam2_backbone_for_state_dict

    if state_dict is None:
        return build_sam2(name, checkpoint, seed=seed)
    found = sam2_backbone_for_state_dict(state_dict)
    if found != name:
        raise ValueError(f"{os.fspath(checkpoint) if checkpoint else 'the state dict'} holds a {found}, not a {name}")
    model = build_sam2(name)
    model.load_state_dict(state_dict)
    return model


def infer_backbone(sam: Sam) -> str:
    """The registered name whose shapes match `sam`'s encoder, else a descriptive custom name
    (for a SAM 2 model, its `sam2_host.SAM2_CONFIGS` name)."""
    from .sam2 import infer_sam2_backbone, is_sam2

    if is_sam2(sam):
        return infer_sam2_backbone(sam)
    enc = sam.image_encoder
    embed_dim = enc.patch_embed.proj.out_channels
    depth = len(enc.blocks)
    num_heads = enc.blocks[0].attn.num_heads
    for bb in _BACKBONES.values():
        if (bb.embed_dim, bb.depth, bb.num_heads) == (embed_dim, depth, num_heads):
            return bb.name
    return f"custom_{embed_dim}x{depth}x{num_heads}"


def backbone_for_state_dict(
    state: dict[str, torch.Tensor], source: Optional[Union[str, os.PathLike]] = None
) -> Backbone:
    """Identify a stock SAM state dict's backbone from its tensor shapes.

    `source`, the file the dict came from, is named in the errors.
    """
    what = f"{os.fspath(source)} is not" if source is not None else "not"
    try:
        embed_dim = state["image_encoder.patch_embed.proj.weight"].shape[0]
    except KeyError:
        hint = ""
        if any("lora_" in k for k in state):  # the adapter file given where the SAM belongs
            hint = " (its LoRA tensors make it look like an adapter file, which goes with the SAM, not in its place)"
        raise ValueError(
            f"{what} a SAM state dict: it has no 'image_encoder.patch_embed.proj.weight'{hint}; expected a "
            "stock SAM checkpoint such as sam_vit_b_01ec64.pth"
        ) from None
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for bb in _BACKBONES.values():
        if (bb.embed_dim, bb.depth) == (embed_dim, depth):
            return bb
    where = f" ({os.fspath(source)})" if source is not None else ""
    raise ValueError(
        f"no registered SAM backbone has embed dim {embed_dim} and depth {depth}{where}; known: "
        f"{', '.join(list_backbones())} (register_backbone adds one)"
    )


def load_stock_sam(checkpoint: Union[str, os.PathLike], sam2_config: Optional[str] = None) -> Sam:
    """The stock SAM (or SAM 2) a checkpoint file holds, its backbone read from the tensor shapes.

    Args:
        sam2_config: a SAM 2 backbone name ("sam2.1_hiera_t", ...) to build instead of reading the
            backbone from the shapes (SAM 2.0 and 2.1 checkpoints differ in one tensor only).

    Raises:
        FileNotFoundError, ValueError: no such file, or not a SAM checkpoint (the message says
            what was expected).
    """
    from ..adapter_file.checkpoints import load_state_dict_file
    from .sam2 import sam2_backbone_for_state_dict, sam2_config as config_of

    if sam2_config is not None:
        config_of(sam2_config)  # an unknown name fails before the file is read
    state = load_state_dict_file(checkpoint)  # read once: 2.4 GB for ViT-H
    if "image_encoder.trunk.patch_embed.proj.weight" in state or sam2_config is not None:
        return _build_sam2(sam2_config or sam2_backbone_for_state_dict(state), checkpoint, None, state)
    return build_sam(backbone_for_state_dict(state, source=checkpoint), checkpoint=checkpoint, state_dict=state)
