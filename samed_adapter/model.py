"""SAMed: a patched SAM that predicts K+1 class masks without prompts."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Sequence, Union

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from .adapter_file.adapter import Adapter
from .adapter_file.config import AdapterConfig
from .volume.geometry import SliceGeometry
from .inference import stages as inference
from .inference.stages import check_image, check_unit_range
from .interactive.session import ClickSession
from .volume.preprocessing import Intensity
from .surgery.structure import encoder_lora_layers, require_stock_state
from .surgery.transfer import extract_adapter

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .io.volume import Volume


class SAMed(nn.Module):
    """A view on a SAM patched in place by `patch` or `inject`.

    `model.sam` is the user's own SAM object; its adapter config lives with the kept stock
    tensors, so every SAMed view of one SAM agrees after a hot swap.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        require_stock_state(sam)
        self.sam = sam
        self.training = sam.training  # a view: in the mode of the SAM it views (only its own flag)

    @property
    def config(self) -> AdapterConfig:
        return require_stock_state(self.sam).config

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

    def compile(self, max_rank: Optional[int] = None, **torch_compile_kwargs) -> "SAMed":
        """`torch.compile` this model so that hot swaps keep the compiled graphs.

        The encoder LoRA is rebuilt at rank `max_rank` (default: the current adapter's) and every
        adapter of lower rank is zero-padded into it, as peft's
        `prepare_model_for_compiled_hotswap` does, so a later `patch` / `set_adapter` of an
        adapter with rank <= max_rank and the same K, decoder variant, LoRA scale and image size
        copies values into the traced tensors and recompiles nothing. A swap that cannot avoid
        recompiling warns. `patch` keeps returning this same compiled model object.

        Args:
            max_rank: the highest encoder LoRA rank later swaps will bring.
            torch_compile_kwargs: passed to `torch.compile` (backend, mode, dynamic, ...).
        """
        from .patching import set_lora_capacity

        stock = require_stock_state(self.sam)
        rank = self.config.rank if max_rank is None else max_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < self.config.rank:
            raise ValueError(
                f"max_rank must be an int >= the current adapter's rank {self.config.rank}, got {max_rank!r}"
            )
        set_lora_capacity(self.sam, stock, rank)
        super().compile(**torch_compile_kwargs)
        return self

    def adapter(self) -> Adapter:
        """The current adapter tensors and config (trained values, deltas against stock)."""
        return extract_adapter(self.sam, require_stock_state(self.sam))

    def forward(self, images: torch.Tensor, adapter_names: Optional[Sequence[str]] = None) -> dict:
        """Predict K+1 class logits for a batch of images, without prompts.

        Args:
            images: (B, 3, S, S) float in model space ([0, 1] before the config's
                pixel mean/std), S = config.image_size.
            adapter_names: optional, one resident adapter name per image (see
                `load_adapter`): image b is predicted with adapter_names[b]. The adapters may
                differ in K, rank and decoder variant, not in image size or LoRA blocks.

        Returns:
            "masks": (B, K+1, S, S) logits, "low_res_logits": (B, K+1, 4g, 4g),
            "iou_predictions": (B, K+1); channel 0 is background. A mixed batch whose adapters
            differ in K gives a list of one tensor per image for each key instead
            ((K_b+1, S, S), (K_b+1, 4g, 4g), (K_b+1,)).
        """
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"images must be (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if adapter_names is not None:
            from .resident import mixed_forward

            return mixed_forward(self, images, adapter_names)
        embeddings, extra = self.encode(images)
        return self.outputs(*self.decode(embeddings, extra))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, S, S) in [0, 1] -> image embeddings (B, D, g, g) and the host's extra features
        (none for SAM; SAM 2's two high-resolution FPN levels, (B, 256, 4g, 4g), (B, 256, 2g, 2g))."""
        return require_stock_state(self.sam).host.image_features(self.normalize(images))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> the encoder's input, with the config's pixel mean and std."""
        return (images - self.sam.pixel_mean) / self.sam.pixel_std

    def decode(self, embeddings: torch.Tensor, extra: Sequence[torch.Tensor] = (),
               mask_decoder: Optional[nn.Module] = None,
               prompts: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, g, g) image embeddings (and `encode`'s extra features) -> low-res logits
        (B, K+1, 4g, 4g), iou (B, K+1).

        `mask_decoder` replaces the live one (a mixed batch's decoder of another K or variant).
        `prompts` = (sparse (B, N, D), dense (B, D, g, g)) gives each image its own prompt set
        (clicks, see samed_adapter.interactive); None decodes without prompts, as SAMed does.
        """
        host = require_stock_state(self.sam).host
        decoder = host.mask_decoder if mask_decoder is None else mask_decoder
        return host.decode(host.prompt_encoder, decoder, embeddings, list(extra), prompts)

    def outputs(self, low_res: torch.Tensor, iou: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.config.image_size
        masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        return {"masks": masks, "low_res_logits": low_res, "iou_predictions": iou}

    # ----------------------------------------------------------- resident adapters (peft-style names)

    @property
    def active_adapter(self) -> Optional[str]:
        """The name of the adapter the model runs now (None for a freshly injected one)."""
        return require_stock_state(self.sam).active_adapter

    @property
    def adapter_names(self) -> list[str]:
        return sorted(require_stock_state(self.sam).adapters)

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
        return Intensity.from_config(self.config, window, percentiles)

    def preprocess(self, slices: np.ndarray, **override: Optional[tuple[float, float]]) -> np.ndarray:
        """Raw intensities (..., H, W) -> float32 in [0, 1] with the adapter's preprocessing.

        ``window=(lo, hi)`` or ``percentiles=(lo, hi)`` replace the adapter's for this call.
        """
        intensity = self.intensity(**override)
        return intensity(slices) if intensity.scales else check_unit_range(slices)

    def slice_geometry(self, volume: "Volume") -> SliceGeometry:
        """How `volume` is cut into this adapter's slices (its recorded orientation and slice axis)."""
        return volume.geometry(self.config.orientation, self.config.slice_axis)

    def interactive(
        self,
        image: Union[np.ndarray, torch.Tensor, "Volume", "nib.spatialimages.SpatialImage", str, os.PathLike],
        *,
        batch_size: int = 8,
        window: Optional[tuple[float, float]] = None,
        percentiles: Optional[tuple[float, float]] = None,
        preprocessed: bool = False,
        propagate: int = 0,
    ) -> ClickSession:
        """A click session over `image` (a click-trained adapter only, see `train --clicks`).

        The encoder runs once per slice now and its embeddings are kept; ``session.labels`` are
        the automatic labels `segment` gives (as an array on the same grid), and
        ``session.click("liver", (i, j, k), positive=True)`` refines one class on the clicked slice
        (and, with ``propagate=n``, on up to n neighbouring slices each way, see ClickSession).

        Raises:
            ClicksNotTrainedError: the adapter was trained without clicks (it says how to make one).
        """
        return ClickSession(self, image, batch_size=batch_size, window=window, percentiles=percentiles,
                            preprocessed=preprocessed, propagate=propagate)

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
        from .io.nifti import label_nifti, volume_from_nifti
        from .io.volume import Volume
        from .io.volumes import read_image

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        scaling = dict(window=window, percentiles=percentiles, preprocessed=preprocessed)
        if isinstance(image, (str, os.PathLike, nib.spatialimages.SpatialImage)):
            volume = read_image(image) if isinstance(image, (str, os.PathLike)) else volume_from_nifti(image)
            prepared = inference.prepare_volume(self.config, volume, **scaling)
            result = inference.run(self, prepared, batch_size, return_probabilities)
            if not return_probabilities:
                return label_nifti(result, volume)
            labels, probs = result
            return label_nifti(labels, volume), np.stack([volume.to_voxels(p) for p in probs])
        if isinstance(image, Volume):
            return inference.run(self, inference.prepare_volume(self.config, image, **scaling), batch_size,
                                 return_probabilities)
        array = check_image(image)
        squeeze = array.ndim == 2
        array = array[None] if squeeze else array
        scaled, messages = inference.scale_slices(self.config, array, **scaling)
        prepared = inference.Prepared(inference.to_model_size(scaled, self.config.image_size), scaled.shape[1:],
                                      messages=messages)
        result = inference.run(self, prepared, batch_size, return_probabilities)
        if not return_probabilities:
            return result[0] if squeeze else result
        labels, probs = result  # (D, H, W), (C, D, H, W)
        return (labels[0], probs[:, 0]) if squeeze else (labels, probs)
