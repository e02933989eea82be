"""Evaluation protocols: a SAMed model over labelled volumes -> per-case, per-class scores.

- "samed": the published protocol. Per slice: resize to 224 and back to the model size (cubic
  splines), predict, resize the labels back (nearest); Dice and HD95 in voxels (unit spacing);
  a class absent from the truth but predicted scores Dice 1 / HD95 0, absent from the prediction
  Dice 0 / HD95 0.
- "default": no round trip; HD95 in millimetres from the volume's voxel spacing (the affine's
  voxel sizes, as statistics take them, never a pixdim that disagrees); cases whose truth lacks a
  class are reported apart instead of being scored 1 or 0.

With ``clicks=N`` (default protocol, a click-trained adapter) each case also runs N rounds of
simulated clicks from its automatic labels (:mod:`.clicks`), kept as ``summary.clicks``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Optional

import numpy as np
import torch
from scipy.ndimage import zoom

from ..inference.stages import eval_mode
from ..interactive.prompts import require_clicks
from .clicks import CaseClicks, ClickSummary, click_case
from .metrics import PROTOCOLS, ClassScore, ConfusionCounts, confusion_counts, score_case
from .summary import Summary, summarize
from ..model import SAMed

SAMED_ROUND_TRIP = 224  # the published training slices were stored at 224 x 224


def predict_volume_samed(model: SAMed, volume: np.ndarray, *, round_trip: int = SAMED_ROUND_TRIP) -> np.ndarray:
    """The published inference path for one (D, H, W) volume already in [0, 1] -> (D, H, W) labels."""
    size = model.config.image_size
    labels = np.zeros(volume.shape, dtype=np.int64)
    param = next(model.sam.image_encoder.parameters())
    with eval_mode(model):
        with torch.inference_mode():
            for k, image in enumerate(volume):
                h, w = image.shape
                if (h, w) != (round_trip, round_trip):
                    image = zoom(image, (round_trip / h, round_trip / w), order=3)
                if image.shape != (size, size):
                    image = zoom(image, (size / image.shape[0], size / image.shape[1]), order=3)
                x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
                x = x.expand(-1, 3, -1, -1).to(param.device, param.dtype)
                masks = model(x)["masks"]
                pred = torch.argmax(torch.softmax(masks, dim=1), dim=1)[0].cpu().numpy()
                labels[k] = zoom(pred, (h / size, w / size), order=0) if (h, w) != (size, size) else pred
    return labels


def evaluate(
    model: SAMed,
    volumes: Iterable[Mapping],
    *,
    protocol: str = "default",
    batch_size: int = 8,
    progress: bool = False,
    clicks: int = 0,
) -> tuple[Summary, dict[str, np.ndarray]]:
    """Score `model` on labelled volumes.

    Args:
        volumes: items with "image" (D, H, W) float in [0, 1] (already windowed, as the
            dataset readers give them), "label" (D, H, W) ints 0..K, "case" (str) and, for the
            default protocol, "spacing" (3,) voxel sizes in (D, H, W) order (NiftiVolumes gives
            the affine's, :func:`samed_adapter.volume.geometry.voxel_sizes`).
        protocol: "samed" (published) or "default" (see the module docstring).
        clicks: N > 0 also runs N rounds of simulated clicks per case, from a click session's
            automatic labels (the labels scored here, which equal `segment`'s), into
            ``summary.clicks`` (:class:`.clicks.ClickSummary`). Default protocol only.

    Raises:
        ClicksNotTrainedError: clicks > 0 and the adapter was trained without clicks (before
            any case is read).

    Returns:
        The Summary (per-class means, per-case table) and the predicted labels per case. The
        Summary also carries the protocol and each case's per-class voxel counts (TP, FP, FN,
        TN of the same predictions against the same labels), so ``summary.to_json(path)``
        writes nnU-Net v2's ``summary.json`` without running the model again.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if isinstance(clicks, bool) or not isinstance(clicks, int) or clicks < 0:
        raise ValueError(f"clicks must be a number of rounds >= 0, got {clicks!r}")
    if clicks and protocol != "default":
        raise ValueError("clicks are scored under the default protocol (a click session's labels are segment's, "
                         "not the published 224 round trip); drop protocol='samed'")
    config = model.config
    if clicks:
        require_clicks(config, repr(model.active_adapter) if model.active_adapter else "this adapter")
    cases: dict[str, list[ClassScore]] = {}
    clicked: dict[str, CaseClicks] = {}
    counts: dict[str, list[ConfusionCounts]] = {}
    predictions: dict[str, np.ndarray] = {}
    items = volumes
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(volumes, desc=f"evaluate ({protocol})", unit="case")
    for item in items:
        image = np.asarray(item["image"], dtype=np.float32)
        truth = np.asarray(item["label"]).astype(np.int64)
        case = str(item["case"])
        if image.ndim == 2:
            image, truth = image[None], truth[None]
        if protocol == "samed":
            pred = predict_volume_samed(model, image)
            spacing: Optional[tuple[float, ...]] = None
        else:
            spacing = tuple(float(s) for s in item["spacing"]) if item.get("spacing") is not None else None
            if clicks:  # the session's automatic labels are segment's: one encoder pass for both
                session = model.interactive(image, batch_size=batch_size, preprocessed=True)
                pred = session.labels.astype(np.int64)
                clicked[case] = click_case(session, truth, clicks)
            else:
                pred = model.segment(image, batch_size=batch_size, preprocessed=True).astype(np.int64)
        cases[case] = score_case(pred, truth, config.num_classes, protocol=protocol, spacing=spacing)
        counts[case] = confusion_counts(pred, truth, config.num_classes)
        predictions[case] = pred
    if not cases:
        raise ValueError("no volumes to evaluate")
    summary = summarize(cases, list(config.class_names or []), counts=counts, protocol=protocol)
    if clicks:
        summary = dataclasses.replace(summary, clicks=ClickSummary(summary.class_names, clicks, clicked))
    return summary, predictions
