"""AdapterConfig: everything about an adapter that is not a tensor."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

# Synapse multi-organ CT, in the processed label order of the published SAMed code.
SYNAPSE_CLASS_NAMES = (
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "liver",
    "stomach",
    "aorta",
    "pancreas",
)
CT_ABDOMEN_WINDOW = (-125.0, 275.0)
# Bounds that no real adapter comes near; a value past them is a corrupt or hostile file, and
# checking here keeps such a file from allocating unbounded memory before it is refused.
MAX_CLASSES = 1024
# SAM (ViT) and SAM 2 (Hiera) were trained at 1024 x 1024 and SAMed at 512: past 1024 the
# position embeddings are stretched beyond anything trained, and the encoder's global attention
# grows as (S / 16)^4, so 4096 asks for 16 GiB per input; no adapter gains from it.
MAX_IMAGE_SIZE = 1024
MAX_LORA_SCALE = 1e4
# Inputs are in [0, 1]; dividing by a std below this scales them past 1000 and, at 1e-30, turns
# the encoder's logits into NaN. Real normalisations use 0.2 to 1 (ImageNet's in [0, 1]: 0.225).
MIN_PIXEL_STD = 1e-3


@dataclass
class AdapterConfig:
    """How a SAMed adapter changes a stock SAM.

    The defaults are the published SAMed (ViT-B) settings for Synapse.
    """

    num_classes: int = field(
        default=8, metadata={"help": "K, the number of foreground classes; the model predicts K+1 masks."}
    )
    rank: int = field(default=4, metadata={"help": "Rank r of the encoder's q/v LoRA bypasses."})
    lora_scale: float = field(
        default=1.0, metadata={"help": "Factor on the LoRA bypass output (published SAMed: 1, no alpha/r)."}
    )
    lora_blocks: Optional[list[int]] = field(
        default=None, metadata={"help": "Encoder blocks that get a LoRA bypass; None means all of them."}
    )
    image_size: int = field(
        default=512, metadata={"help": "Input side length S the encoder runs at; a multiple of 16."}
    )
    backbone: Optional[str] = field(
        default=None,
        metadata={"help": "vit_b, vit_l, vit_h (or a custom name); None: inferred from the SAM when patching."},
    )
    class_names: Optional[list[str]] = field(
        default=None, metadata={"help": "K names for classes 1..K; None gives class_1 .. class_K."}
    )
    pixel_mean: tuple[float, float, float] = field(
        default=(0.0, 0.0, 0.0), metadata={"help": "Per-channel mean subtracted from inputs in [0, 1]."}
    )
    pixel_std: tuple[float, float, float] = field(
        default=(1.0, 1.0, 1.0), metadata={"help": "Per-channel std dividing inputs in [0, 1]."}
    )
    intensity_window: Optional[tuple[float, float]] = field(
        default=CT_ABDOMEN_WINDOW,
        metadata={"help": "Raw intensities are clipped to [lo, hi] and scaled to [0, 1]; None: already in [0, 1]."},
    )
    intensity_percentiles: Optional[tuple[float, float]] = field(
        default=None,
        metadata={"help": "MR: each volume is clipped to its own (p_lo, p_hi) percentiles and scaled to [0, 1]; "
                          "needs intensity_window=None."},
    )
    orientation: Optional[tuple[str, str, str]] = field(
        default=None,
        metadata={"help": "Axis codes (nibabel's aff2axcodes, e.g. ('L', 'P', 'S')) every volume is reoriented to "
                          "before slicing, as in training; None: slices cut as stored."},
    )
    slice_axis: int = field(
        default=2, metadata={"help": "The axis of the (reoriented) volume the 2-D slices are cut along."}
    )
    decoder_lora: bool = field(
        default=False,
        metadata={"help": "SAMed_s variant: LoRA on the decoder transformer's q_proj/v_proj, transformer frozen."},
    )
    decoder_lora_rank: int = field(default=4, metadata={"help": "Rank of the decoder LoRA bypasses."})
    clicks: bool = field(
        default=False,
        metadata={"help": "Trained to refine one class from clicks as well (a (K+1, 256) class embedding in the "
                          "decoder, `mask_decoder.class_embed.weight`); see samed_adapter.interactive."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or not (
            1 <= self.num_classes <= MAX_CLASSES
        ):
            raise ValueError(f"num_classes must be an int in 1..{MAX_CLASSES} (foreground classes), got {self.num_classes!r}")
        for name in ("rank", "decoder_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (not isinstance(self.lora_scale, (int, float)) or isinstance(self.lora_scale, bool)
                or not abs(self.lora_scale) <= MAX_LORA_SCALE):
            raise ValueError(f"lora_scale must be a number within +-{MAX_LORA_SCALE:g}, got {self.lora_scale!r}")
        self.lora_scale = float(self.lora_scale)
        if (not isinstance(self.image_size, int) or isinstance(self.image_size, bool)
                or not 16 <= self.image_size <= MAX_IMAGE_SIZE or self.image_size % 16):
            raise ValueError(
                f"image_size must be a multiple of 16 (SAM's patch size) in 16..{MAX_IMAGE_SIZE} (SAM and SAM 2 were "
                f"trained at 1024; larger inputs stretch their position embeddings and cost (S/16)^4 attention), "
                f"got {self.image_size!r}"
            )
        for name in ("decoder_lora", "clicks"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.lora_blocks is not None:
            blocks = list(self.lora_blocks)
            if not blocks or any(not isinstance(b, int) or b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
                raise ValueError(f"lora_blocks must be distinct non-negative block indices or None, got {self.lora_blocks!r}")
            self.lora_blocks = sorted(blocks)
        if self.class_names is None:
            self.class_names = [f"class_{k}" for k in range(1, self.num_classes + 1)]
        if isinstance(self.class_names, (str, bytes)) or not all(isinstance(n, str) for n in self.class_names):
            raise TypeError(f"class_names must be a list of strings, got {self.class_names!r}")
        self.class_names = list(self.class_names)
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}; "
                "give one name per foreground class (background is implicit)"
            )
        self.pixel_mean = _triple("pixel_mean", self.pixel_mean)
        self.pixel_std = _triple("pixel_std", self.pixel_std)
        if any(s < MIN_PIXEL_STD for s in self.pixel_std):
            raise ValueError(f"pixel_std must be at least {MIN_PIXEL_STD:g} per channel (inputs are in [0, 1]; a smaller "
                             f"std scales them past 1000 and gives non-finite logits), got {self.pixel_std}")
        if self.intensity_window is not None:
            try:
                lo, hi = (float(v) for v in self.intensity_window)
            except (TypeError, ValueError):
                raise ValueError(f"intensity_window must be two numbers (lo, hi) or None, got {self.intensity_window!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"intensity_window must be finite (lo, hi) with lo < hi, got {self.intensity_window!r}")
            self.intensity_window = (lo, hi)
        if self.intensity_percentiles is not None:
            if self.intensity_window is not None:
                raise ValueError(
                    "intensity_percentiles (MR) and intensity_window (CT) exclude each other; pass "
                    "intensity_window=None with intensity_percentiles"
                )
            from ..volume.preprocessing import Intensity

            self.intensity_percentiles = Intensity(percentiles=self.intensity_percentiles).percentiles
        from ..volume.geometry import check_slice_axis, parse_orientation

        self.orientation = parse_orientation(self.orientation)
        self.slice_axis = check_slice_axis(self.slice_axis)
        if self.backbone is not None and not isinstance(self.backbone, str):
            raise TypeError(f"backbone must be a string such as 'vit_b' or None, got {self.backbone!r}")

    @property
    def grid_size(self) -> int:
        """g = image_size // 16, the side of the encoder's token grid."""
        return self.image_size // 16

    # The fields that decide which modules and tensor shapes an adapter has (the rest are values
    # or metadata): adapters with equal keys fit the same patched SAM modules.
    STRUCTURE_FIELDS = ("rank", "lora_blocks", "lora_scale", "image_size", "num_classes", "decoder_lora",
                        "decoder_lora_rank", "clicks")

    def structure_key(self) -> tuple[tuple[str, Any], ...]:
        """((field, value), ...) over STRUCTURE_FIELDS, hashable: equal keys, equal structure."""
        values = (getattr(self, name) for name in self.STRUCTURE_FIELDS)
        return tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in zip(self.STRUCTURE_FIELDS, values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise TypeError(f"an adapter config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown adapter config fields {unknown}; this version knows {sorted(known)}")
        kwargs = dict(data)
        for key in ("pixel_mean", "pixel_std", "intensity_window", "intensity_percentiles", "orientation"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"the adapter config is not valid JSON: {err}") from None
        return cls.from_dict(data)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (one per RGB channel), got {value!r}") from None
    if len(values) != 3 or not all(v == v and abs(v) != float("inf") for v in values):
        raise ValueError(f"{name} must be three finite numbers (one per RGB channel), got {value!r}")
    return values  # type: ignore[return-value]
