"""Inference in three stages, so that a pipeline can run each where it belongs.

1. :func:`prepare_volume` (CPU, no model): reorient the scan to the adapter's orientation, cut
   its slices, scale intensities to [0, 1] and resize every slice to the model's S x S.
2. :func:`predict` (the model's device): logits of a batch of S x S slices, argmax (and softmax).
3. :func:`restore` (CPU): labels back to each slice's size (nearest) and onto the scan's grid.

`SAMed.segment` runs them one after the other; `segment_files` overlaps them across volumes and
packs slices of several volumes into one batch. Both give the same labels: the slices are
resized on the CPU in both, and one slice's logits do not depend on the other slices of its batch.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..adapter_file.config import AdapterConfig
from ..volume.geometry import SliceGeometry
from ..volume.preprocessing import Intensity, contrast_warning

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..io.volume import Volume
    from ..model import SAMed

__all__ = ["NonFiniteLogitsError", "Prepared", "check_finite_logits", "check_image", "check_model_size", "check_unit_range", "eval_mode", "predict",
           "predict_prepared", "prepare_volume", "resize_slices", "restore", "run", "scale_slices", "to_model_size"]


class NonFiniteLogitsError(ValueError):
    """The model gave NaN or infinite logits, so its labels would mean nothing: an error, never labels.

    Inputs are checked finite and scaled to [0, 1], so the cause is the weights: an adapter (or a
    SAM) whose finite but huge values overflow, or a pixel_std near zero.

    Attributes:
        rows: the batch rows (slices) whose logits are not all finite.
    """

    def __init__(self, message: str, rows: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.rows = tuple(rows)

    def __reduce__(self):  # keeps `rows` across processes (Ray, worker pools)
        return type(self), (str(self), self.rows)


def check_finite_logits(model: "SAMed", logits: torch.Tensor) -> None:
    """Raise NonFiniteLogitsError unless every one of the (b, K+1, S, S) ``logits`` is finite."""
    if bool(torch.isfinite(logits).all()):  # one pass per batch, next to the model's own cost
        return
    rows = (~torch.isfinite(logits)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    name = model.active_adapter
    who = f"adapter {name!r}" if name else "the adapter"
    raise NonFiniteLogitsError(
        f"{who} gives NaN or infinite logits on {len(rows)} of {logits.shape[0]} slices, so no labels are made "
        "from them: its weights (or the SAM's) overflow, or its pixel_std is near zero; retrain it, or export it "
        "again from a checkpoint that predicts finite values", rows)


@dataclass
class Prepared:
    """A scan ready for the model.

    Attributes:
        inputs: (D, 1, S, S) float32 on the CPU, values in [0, 1].
        size: (H, W), the slices' own size, to which labels are resized back.
        volume, geometry: where the slices came from (None for a bare array).
        messages: warnings about the input (no recorded orientation, flat contrast).
    """

    inputs: torch.Tensor
    size: tuple[int, int]
    volume: Optional["Volume"] = None
    geometry: Optional[SliceGeometry] = None
    messages: list[str] = field(default_factory=list)

    @property
    def num_slices(self) -> int:
        return int(self.inputs.shape[0])


def check_unit_range(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(
            f"values span [{x.min():g}, {x.max():g}] but inputs already in [0, 1] are expected here "
            "(the adapter records no intensity preprocessing, or preprocessed=True); scale the image to [0, 1] "
            "first, or give a window=(lo, hi) / percentiles=(lo, hi) (CLI: --window / --percentiles)"
        )
    return x


def check_image(array: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """A (H, W) or (D, H, W) array of finite numbers (from numpy or torch), else a ValueError saying why."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    volume = np.asarray(array)
    if volume.ndim not in (2, 3):
        raise ValueError(
            f"expected a (H, W) slice or a (D, H, W) volume, got an array of shape {volume.shape}; "
            "drop channel axes (e.g. array[..., 0]) or split 4-D series first"
        )
    if volume.size == 0:
        raise ValueError(f"the image is empty (shape {volume.shape})")
    if volume.dtype.kind not in "biuf":
        raise ValueError(f"expected numeric intensities, got dtype {volume.dtype}")
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        raise ValueError("the image contains NaN or infinite values; replace them (e.g. np.nan_to_num) first")
    return volume


def to_model_size(slices: np.ndarray, image_size: int) -> torch.Tensor:
    """(D, H, W) float32 in [0, 1] -> (D, 1, S, S) float32 on the CPU (bilinear; antialiased when shrinking)."""
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).unsqueeze(1)
    height, width = x.shape[-2:]
    if (height, width) == (image_size, image_size):
        return x
    return F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=height > image_size or width > image_size)


def scale_slices(config: AdapterConfig, slices: np.ndarray, *, window=None, percentiles=None,
                 preprocessed: bool = False, where: str = "the image") -> tuple[np.ndarray, list[str]]:
    """Raw (D, H, W) -> [0, 1] float32 with the adapter's (or the given) intensity preprocessing."""
    if preprocessed:
        return check_unit_range(slices), []
    intensity = Intensity.from_config(config, window, percentiles)
    message = contrast_warning(slices, intensity, where)
    scaled = intensity(slices) if intensity.scales else check_unit_range(slices)
    return scaled, [message] if message else []


def check_model_size(num_slices: int, image_size: int, max_voxels: Optional[int], where: str = "the image") -> None:
    """Refuse a scan whose slices, resized to the model's ``image_size``, exceed ``max_voxels``.

    The file's own size says little here: 8 x 8 x 30000 voxels (1.9 M) become 30000 slices of
    S x S, 7.9 GB of float32 at S = 256, allocated before the first batch runs.

    Raises:
        ImageTooLargeError: naming the slices, the size and the limit.
    """
    from ..io.errors import ImageTooLargeError
    from ..io.limits import DEFAULT_MAX_VOXELS

    limit = DEFAULT_MAX_VOXELS if max_voxels is None else max_voxels
    need = num_slices * image_size * image_size
    if need > limit:
        raise ImageTooLargeError(
            f"{where}: {num_slices} slices at the model's size {image_size} x {image_size} are {need:,} voxels "
            f"({need * 4 / 2**30:.1f} GiB as float32), over the limit of {limit:,}; crop the scan, or raise "
            "--max-voxels (max_voxels=) if this machine has the memory")


def prepare_volume(config: AdapterConfig, volume: "Volume", *, window=None, percentiles=None,
                   preprocessed: bool = False, max_voxels: Optional[int] = None) -> Prepared:
    """Stage 1 for a scan: reorient to ``config``'s orientation, cut, scale and resize its slices.

    ``max_voxels`` (None: :data:`samed_adapter.io.DEFAULT_MAX_VOXELS`) bounds the slices at the
    model's size, checked before they are made (:func:`check_model_size`).
    """
    messages = list(getattr(volume, "messages", ()))  # what the reader had to say (a localizer left out, ...)
    if config.orientation is None and volume.affine is not None:
        messages.append(
            "this adapter records no orientation, so slices are cut as each file stores them (axis "
            f"{config.slice_axis}, rows along the next stored axis); if it was trained on another "
            "orientation, record it with `samed-adapter convert ADAPTER OUT --orientation CODES`"
        )
    geometry = volume.geometry(config.orientation, config.slice_axis)
    check_image(volume.array)
    check_model_size(geometry.slices_shape[0], config.image_size, max_voxels,
                     str(volume.source or "the image"))
    # Scaling is elementwise (percentiles ignore order), so it runs on the stored voxels, in memory
    # order, before the reorientation view: the same numbers, without strided passes.
    scaled, notes = scale_slices(config, volume.voxels, window=window, percentiles=percentiles,
                                 preprocessed=preprocessed, where=str(volume.source or "the image"))
    slices = geometry.to_slices(scaled)
    return Prepared(to_model_size(slices, config.image_size), slices.shape[1:], volume, geometry, messages + notes)


@torch.inference_mode()
def predict(model: "SAMed", inputs: torch.Tensor, probabilities: bool = False
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Stage 2: (b, 1, S, S) slices -> (b, S, S) uint8/int32 labels on the CPU, and the (b, K+1, S, S)
    float32 softmax when asked. The model must be in eval mode.

    Raises:
        NonFiniteLogitsError: some logit of the batch is NaN or infinite.
    """
    param = next(model.sam.image_encoder.parameters())
    x = inputs.to(param.device, param.dtype, non_blocking=True).expand(-1, 3, -1, -1)
    logits = model(x)["masks"]
    check_finite_logits(model, logits)
    return to_labels(logits, probabilities)


def to_labels(logits: torch.Tensor, probabilities: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(b, K+1, S, S) logits -> (b, S, S) labels on the CPU (uint8, int32 from 255 classes on), and
    the float32 softmax when asked: what every path that predicts (local, Ray, a server) returns."""
    dtype = torch.uint8 if logits.shape[1] - 1 < 255 else torch.int32
    # max(dim).indices is argmax (the first maximum on ties) and 7x faster on the CPU for (b, C, S, S).
    labels = logits.max(dim=1).indices.to(dtype).cpu()
    probs = torch.softmax(logits.float(), dim=1).cpu() if probabilities else None
    return labels, probs


def resize_slices(labels: torch.Tensor, probs: Optional[torch.Tensor], size: tuple[int, int]
                  ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(D, S, S) labels (and (D, C, S, S) softmax) -> (D, H, W) (and (D, C, H, W) float16), nearest.

    The probabilities are resized exactly as the labels, so their argmax stays the labels.
    """
    out = F.interpolate(labels[:, None].float(), size, mode="nearest")[:, 0].to(labels.dtype).numpy()
    if probs is None:
        return out, None
    soft = F.interpolate(probs, size, mode="nearest").numpy()
    return out, _agreeing_half(soft, out)


def _agreeing_half(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(b, C, H, W) float32 probabilities -> float16 whose argmax is exactly ``labels`` (b, H, W).

    Rounding to float16 can tie (or, from float32 ties, flip) the top two classes of a voxel;
    there the labelled class is raised to the next float16 above the largest value, a change of
    one unit in the last place, so the saved file and the labels never disagree.
    """
    half = probs.astype(np.float16)
    wrong = half.argmax(axis=1) != labels
    if wrong.any():
        b, y, x = np.nonzero(wrong)
        top = half[b, :, y, x].max(axis=1)
        half[b, labels[b, y, x], y, x] = np.nextafter(top, np.float16(np.inf))
    return half


def restore(prepared: Prepared, labels: np.ndarray, probs: Optional[np.ndarray] = None):
    """Stage 3: (D, H, W) slice labels (and (D, C, H, W) probabilities) -> the scan's
    ``volume.array`` layout (probabilities class axis first); bare arrays pass through."""
    if prepared.geometry is None or prepared.volume is None:
        return labels if probs is None else (labels, probs.transpose(1, 0, 2, 3))
    volume, geometry = prepared.volume, prepared.geometry
    out = volume.from_voxels(geometry.from_slices(labels))
    if probs is None:
        return out
    back = geometry.from_slices(probs.transpose(0, 2, 3, 1))  # (I, J, K, C): extra axes ride along
    return out, np.stack([volume.from_voxels(back[..., c]) for c in range(back.shape[-1])])


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, and every submodule's own train/eval flag back after (not one flag for
    all: a SAMed view says training while the user's SAM under it is in eval mode)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def predict_prepared(model: "SAMed", prepared: Prepared, batch_size: int, probabilities: bool = False
                     ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Stages 2 and the resize of 3 for one input, in batches of its own slices: (D, H, W) labels
    and, when asked, (D, C, H, W) float16 probabilities, still in slice layout."""
    labels, probs = [], []
    with eval_mode(model):
        for start in range(0, prepared.num_slices, batch_size):
            chunk = prepared.inputs[start : start + batch_size]
            small, soft = resize_slices(*predict(model, chunk, probabilities), prepared.size)
            labels.append(small)
            probs.append(soft)
    return np.concatenate(labels), (np.concatenate(probs) if probabilities else None)


def run(model: "SAMed", prepared: Prepared, batch_size: int, probabilities: bool = False):
    """All three stages for one prepared input (what `SAMed.segment` does)."""
    labels, probs = predict_prepared(model, prepared, batch_size, probabilities)
    for message in prepared.messages:
        warnings.warn(message, UserWarning, stacklevel=4)
    return restore(prepared, labels, probs)
