"""SAMed: a patched SAM that predicts K+1 class masks without prompts."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Optional, Sequence, Union

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from .adapter import Adapter
from .config import AdapterConfig
from .geometry import SliceGeometry
from .preprocessing import Intensity, contrast_warning
from .surgery import encoder_lora_layers, get_stock_state
from .transfer import extract_adapter

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .io.volumes import Volume


class SAMed(nn.Module):
    """A view on a SAM patched in place by `patch` or `inject`.

    `model.sam` is the user's own SAM object; its adapter config lives with the kept stock
    tensors, so every SAMed view of one SAM agrees after a hot swap.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        if get_stock_state(sam) is None:
            raise ValueError("this SAM is not patched; use samed_adapter.patch(sam, adapter) or inject(sam, config)")
        self.sam = sam

    @property
    def config(self) -> AdapterConfig:
        stock = get_stock_state(self.sam)
        if stock is None:
            raise RuntimeError("this SAM was unpatched; patch it again to use the SAMed model")
        return stock.config

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in encoder_lora_layers(self.sam).values())

    def merge(self) -> "SAMed":
        """Fold the encoder LoRA into `qkv` for inference (zero bypass cost)."""
        for layer in encoder_lora_layers(self.sam).values():
            layer.merge()
        return self

    def unmerge(self) -> "SAMed":
        """Restore the exact stock `qkv` weights and the live bypass."""
        for layer in encoder_lora_layers(self.sam).values():
            layer.unmerge()
        return self

    def adapter(self) -> Adapter:
        """The current adapter tensors and config (trained values, deltas against stock)."""
        stock = get_stock_state(self.sam)
        if stock is None:
            raise RuntimeError("this SAM was unpatched; there is no adapter to extract")
        return extract_adapter(self.sam, stock)

    def forward(self, images: torch.Tensor, adapter_names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """Predict K+1 class logits for a batch of images, without prompts.

        Args:
            images: (B, 3, S, S) float in model space ([0, 1] before the config's
                pixel mean/std), S = config.image_size.
            adapter_names: optional, one resident adapter name per image (see
                `load_adapter`): image b is predicted with adapter_names[b].

        Returns:
            "masks": (B, K+1, S, S) logits, "low_res_logits": (B, K+1, 4g, 4g),
            "iou_predictions": (B, K+1); channel 0 is background.
        """
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"images must be (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if adapter_names is not None:
            from .resident import mixed_forward

            return mixed_forward(self, images, adapter_names)
        embeddings = self.sam.image_encoder(self.normalize(images))  # (B, D, g, g)
        return self.outputs(*self.decode(embeddings))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> the encoder's input, with the config's pixel mean and std."""
        return (images - self.sam.pixel_mean) / self.sam.pixel_std

    def decode(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, g, g) image embeddings -> low-res logits (B, K+1, 4g, 4g), iou (B, K+1)."""
        sam = self.sam
        # No prompts: sparse (1, 0, D) and dense no_mask_embed (1, D, g, g), broadcast over the
        # batch inside the decoder exactly as the published SAMed forward does.
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        return sam.mask_decoder.predict_masks(
            image_embeddings=embeddings,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(embeddings.dtype),
            dense_prompt_embeddings=dense,
        )

    def outputs(self, low_res: torch.Tensor, iou: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.config.image_size
        masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        return {"masks": masks, "low_res_logits": low_res, "iou_predictions": iou}

    # ----------------------------------------------------------- resident adapters (peft-style names)

    @property
    def active_adapter(self) -> Optional[str]:
        """The name of the adapter the model runs now (None for a freshly injected one)."""
        return get_stock_state(self.sam).active_adapter

    @property
    def adapter_names(self) -> list[str]:
        return sorted(get_stock_state(self.sam).adapters)

    def load_adapter(self, source: Union[Adapter, str, os.PathLike], adapter_name: str, *,
                     allow_base_mismatch: bool = False) -> "SAMed":
        """Validate an adapter (file, Hub id or Adapter) and keep it resident under `adapter_name`."""
        from .resident import load_adapter

        load_adapter(self.sam, source, adapter_name, allow_base_mismatch=allow_base_mismatch)
        return self

    def set_adapter(self, adapter_name: str) -> "SAMed":
        """Make a resident adapter the active one (a hot swap)."""
        from .patching import patch
        from .resident import resident_adapter

        patch(self.sam, resident_adapter(self.sam, adapter_name), adapter_name=adapter_name,
              allow_base_mismatch=True)  # checked when it was loaded
        return self

    def delete_adapter(self, adapter_name: str) -> "SAMed":
        from .resident import delete_adapter

        delete_adapter(self.sam, adapter_name)
        return self

    def intensity(self, window: Optional[tuple[float, float]] = None,
                  percentiles: Optional[tuple[float, float]] = None) -> Intensity:
        """The adapter's intensity preprocessing, or the override given (a window or percentiles)."""
        if window is not None or percentiles is not None:
            return Intensity(window, percentiles)
        return Intensity.from_config(self.config)

    def preprocess(self, slices: np.ndarray, **override: Optional[tuple[float, float]]) -> np.ndarray:
        """Raw intensities (..., H, W) -> float32 in [0, 1] with the adapter's preprocessing.

        ``window=(lo, hi)`` or ``percentiles=(lo, hi)`` replace the adapter's for this call.
        """
        intensity = self.intensity(**override)
        return intensity(slices) if intensity.scales else _check_unit_range(slices)

    def slice_geometry(self, volume: "Volume") -> SliceGeometry:
        """How `volume` is cut into this adapter's slices (its recorded orientation and slice axis)."""
        return volume.geometry(self.config.orientation, self.config.slice_axis)

    @torch.inference_mode()
    def segment(
        self,
        image: Union[np.ndarray, torch.Tensor, "Volume", "nib.spatialimages.SpatialImage", str, os.PathLike],
        *,
        batch_size: int = 8,
        preprocessed: bool = False,
        window: Optional[tuple[float, float]] = None,
        percentiles: Optional[tuple[float, float]] = None,
        return_probabilities: bool = False,
    ) -> Union[np.ndarray, "nib.Nifti1Image", tuple]:
        """Label map for a slice, a volume, a scan file or a nibabel image.

        Args:
            image: one of
                - a path (NIfTI, DICOM series folder, PNG, NPY) or a nibabel image: reoriented to
                  the adapter's orientation, cut into slices, predicted and put back on the
                  input's own voxel grid; returns a ``nibabel.Nifti1Image`` of labels with the
                  input's shape, affine and header (save it with ``nib.save``);
                - a :class:`samed_adapter.io.Volume`: the same, returning labels in the layout of
                  ``volume.array`` (write them with ``io.write_labels(labels, volume, path)``);
                - a bare array or tensor, (H, W) or (D, H, W): already the model's slices, used
                  as given (no geometry to reorient by); returns labels of its shape.
                Intensities are raw (Hounsfield units for CT) unless ``preprocessed``.
            batch_size: slices per forward pass.
            preprocessed: the values are already in [0, 1] (skip the intensity preprocessing).
            window, percentiles: replace the adapter's intensity preprocessing for this call
                (a CT window (lo, hi), or MR percentiles (p_lo, p_hi) of the whole input).
            return_probabilities: also return the softmax of every class, float16, class axis
                first and then the layout of the labels' data ((K+1, I, J, K) on a file's voxel
                grid, (K+1, *volume.array.shape) for a Volume, (K+1, *array.shape) for an
                array); its argmax over the class axis equals the labels.

        Returns:
            Integer labels 0..K (uint8 when K < 255), as described for each kind of input, or
            ``(labels, probabilities)`` with ``return_probabilities``.
        """
        from .io.volumes import Volume, label_nifti, read_image, volume_from_nifti

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        options = dict(batch_size=batch_size, preprocessed=preprocessed, window=window, percentiles=percentiles,
                       probabilities=return_probabilities)
        if isinstance(image, (str, os.PathLike, nib.spatialimages.SpatialImage)):
            volume = read_image(image) if isinstance(image, (str, os.PathLike)) else volume_from_nifti(image)
            result = self._segment_volume(volume, **options)
            if not return_probabilities:
                return label_nifti(result, volume)
            labels, probs = result
            return label_nifti(labels, volume), np.stack([volume.to_voxels(p) for p in probs])
        if isinstance(image, Volume):
            return self._segment_volume(image, **options)
        volume = _check_image(image)
        squeeze = volume.ndim == 2
        volume = volume[None] if squeeze else volume
        override = dict(window=window, percentiles=percentiles)
        volume = _check_unit_range(volume) if preprocessed else self.preprocess(volume, **override)
        result = self._predict_slices(volume, batch_size, return_probabilities)
        if not return_probabilities:
            return result[0] if squeeze else result
        labels, probs = result  # (D, H, W), (D, C, H, W)
        probs = probs.transpose(1, 0, 2, 3)
        return (labels[0], probs[:, 0]) if squeeze else (labels, probs)

    def _segment_volume(self, volume: "Volume", *, batch_size: int, preprocessed: bool,
                        window: Optional[tuple[float, float]], percentiles: Optional[tuple[float, float]],
                        probabilities: bool = False):
        """Labels in ``volume.array``'s layout (and probabilities, class axis first): reorient,
        preprocess, predict, put back."""
        if self.config.orientation is None and volume.affine is not None:
            warnings.warn(
                "this adapter records no orientation, so slices are cut as each file stores them (axis "
                f"{self.config.slice_axis}, rows along the next stored axis); if it was trained on another "
                "orientation, record it with `samed-adapter convert ADAPTER OUT --orientation CODES`",
                UserWarning, stacklevel=3,
            )
        geometry = self.slice_geometry(volume)
        slices = geometry.to_slices(volume.voxels)
        _check_image(slices)
        if preprocessed:
            slices = _check_unit_range(slices)
        else:
            intensity = self.intensity(window, percentiles)
            message = contrast_warning(slices, intensity, str(volume.source or "the image"))
            if message:
                warnings.warn(message, UserWarning, stacklevel=3)
            slices = intensity(slices) if intensity.scales else _check_unit_range(slices)
        result = self._predict_slices(slices, batch_size, probabilities)
        if not probabilities:
            return volume.from_voxels(geometry.from_slices(result))
        labels, probs = result  # (D, H, W), (D, C, H, W) in slice layout
        back = geometry.from_slices(probs.transpose(0, 2, 3, 1))  # (I, J, K, C): extra axes ride along
        probs = np.ascontiguousarray(np.moveaxis(back, -1, 0))  # (C, I, J, K)
        return volume.from_voxels(geometry.from_slices(labels)), np.stack([volume.from_voxels(p) for p in probs])

    def _predict_slices(self, volume: np.ndarray, batch_size: int, probabilities: bool = False):
        """(D, H, W) float32 in [0, 1] -> (D, H, W) labels, batch by batch.

        With ``probabilities``, also the softmax of every class, (D, K+1, H, W) float16, resized to
        (H, W) exactly as the labels are (nearest), so its argmax equals the labels.
        """
        depth, height, width = volume.shape
        size = self.config.image_size
        param = next(self.sam.image_encoder.parameters())
        dtype = np.uint8 if self.config.num_classes < 255 else np.int32
        labels = np.empty((depth, height, width), dtype=dtype)
        probs = np.empty((depth, self.config.num_classes + 1, height, width), np.float16) if probabilities else None
        was_training = self.training
        self.eval()
        try:
            for start in range(0, depth, batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(volume[start : start + batch_size]))
                x = chunk.to(param.device, torch.float32).unsqueeze(1)  # (b, 1, H, W)
                x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False,
                                  antialias=height > size or width > size)
                logits = self(x.expand(-1, 3, -1, -1).to(param.dtype))["masks"]
                pred = logits.argmax(dim=1, keepdim=True).float()  # (b, 1, S, S)
                pred = F.interpolate(pred, (height, width), mode="nearest")
                chunk_labels = pred[:, 0].to(torch.int32).cpu().numpy()
                labels[start : start + batch_size] = chunk_labels
                if probs is not None:
                    soft = F.interpolate(torch.softmax(logits.float(), dim=1), (height, width), mode="nearest")
                    probs[start : start + batch_size] = _agreeing_half(soft.cpu().numpy(), chunk_labels)
        finally:
            self.train(was_training)
        return labels if probs is None else (labels, probs)


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


def _check_unit_range(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(
            f"values span [{x.min():g}, {x.max():g}] but inputs already in [0, 1] are expected here "
            "(the adapter records no intensity preprocessing, or preprocessed=True); scale the image to [0, 1] "
            "first, or give a window=(lo, hi) / percentiles=(lo, hi) (CLI: --window / --percentiles)"
        )
    return x


def _check_image(array: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
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
