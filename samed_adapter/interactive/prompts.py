"""Clicks as SAM prompts: one class refined from its current mask and the clicks on its slice.

A click-trained adapter (``config.clicks``) refines class c of one slice from
- the clicks on that slice and class: SAM's point embeddings (positive 1, negative 0) at the
  click's position in the model's S x S input,
- the class's automatic mask: SAM's mask prompt, the mask at 4g x 4g as +-MASK_LOGIT logits,
  with each click also painted into it as a disk of CLICK_RADIUS cells (+MASK_LOGIT positive,
  -MASK_LOGIT negative, later clicks over earlier ones),
- the class: one extra sparse token, row c of the decoder's `class_embed` (K+1, D),
and reads the decoder's output channel c: logits of "class c here" (B, 4g, 4g). Training
(`train --clicks`), the Python session, the service and `evaluate --clicks` all build their
prompts here, so what the adapter learnt is what it is asked.

Why the disks: SAM's point prompts reach the image only through attention, which must learn to
be local; SAM learnt that from a billion masks. The mask prompt is added to the image embedding
cell by cell, so a disk in it is local from the first step. On the quick start (a random tiny
SAM, 140 training steps) clicks as points alone never changed even the clicked pixel; with the
disks they do (benchmarks/RESULTS.md, "Clicks").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from ..adapter_file.config import AdapterConfig
from ..surgery.structure import require_stock_state

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..model import SAMed

__all__ = ["CLICK_RADIUS", "MASK_LOGIT", "ClicksNotTrainedError", "SliceClick", "click_coords", "decode_clicks",
           "mask_prompt", "paint_clicks", "require_clicks"]

# The current mask enters as logits of this size: SAM feeds back its previous low-res logits,
# whose confident values lie around +-10 (its 0 threshold in between).
MASK_LOGIT = 10.0
# A click's disk in the mask prompt, in cells of its 4g x 4g grid (4 input pixels at SAMed's 512):
# 1.5 covers the cell and its 8 neighbours.
CLICK_RADIUS = 1.5


class ClicksNotTrainedError(ValueError):
    """The adapter was trained without clicks, so it has no class embedding to refine a class with."""


def require_clicks(config: AdapterConfig, name: str = "this adapter") -> None:
    """Raise ClicksNotTrainedError, saying how to make an adapter that takes clicks, unless it does."""
    if not config.clicks:
        raise ClicksNotTrainedError(
            f"{name} was trained without clicks, so it segments automatically but cannot refine a class from "
            "clicks; train one that can with `samed-adapter train --clicks ...`, or use `segment` for "
            "automatic labels")


@dataclass(frozen=True)
class SliceClick:
    """One click on the model's slices.

    Attributes:
        label: the class it refines, 1..K.
        slice: d, the slice in the (D, H, W) slice layout.
        row, col: the pixel in that slice's own H x W grid.
        positive: True where the class should be, False where it should not.
    """

    label: int
    slice: int
    row: int
    col: int
    positive: bool = True


def click_coords(clicks: Sequence[Sequence[SliceClick]], size: tuple[int, int], image_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt set, its clicks -> SAM point coords (B, N, 2) as (x, y) in the S x S input, and
    labels (B, N): 1 positive, 0 negative, -1 padding (sets with fewer than N clicks).

    Pixel centres map to pixel centres: col c of W becomes x = (c + 0.5) S / W - 0.5 (SAM's
    prompt encoder adds the 0.5 back).
    """
    height, width = size
    n = max((len(c) for c in clicks), default=0)
    coords = torch.zeros(len(clicks), n, 2)
    labels = -torch.ones(len(clicks), n)
    for b, row in enumerate(clicks):
        for i, click in enumerate(row):
            coords[b, i, 0] = (click.col + 0.5) * image_size / width - 0.5
            coords[b, i, 1] = (click.row + 0.5) * image_size / height - 0.5
            labels[b, i] = 1.0 if click.positive else 0.0
    return coords, labels


def mask_prompt(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, W) bool or {0, 1} masks -> SAM's mask prompt (B, 1, 4g, 4g): the fraction of each
    low-res cell inside the mask, mapped to [-MASK_LOGIT, MASK_LOGIT]."""
    frac = F.interpolate(masks[:, None].float(), (4 * grid, 4 * grid), mode="area")
    return (2.0 * frac - 1.0) * MASK_LOGIT


def paint_clicks(masks: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 1, n, n) mask prompts -> a copy with each click's disk of CLICK_RADIUS cells set to
    +MASK_LOGIT (positive) or -MASK_LOGIT (negative), in click order; padding (label -1) paints nothing.

    Args:
        coords, labels: (B, N, 2) in the S x S input and (B, N), from :func:`click_coords`.
    """
    painted = masks.clone()
    n = masks.shape[-1]
    coords, labels = coords.to(masks.device, torch.float32), labels.to(masks.device)
    centres = (coords + 0.5) * n / image_size - 0.5  # the inverse of click_coords' map, on n cells
    cells = torch.arange(n, device=masks.device, dtype=torch.float32)
    for i in range(coords.shape[1]):
        x, y = centres[:, i, 0, None, None], centres[:, i, 1, None, None]
        disk = (cells[None, None, :] - x) ** 2 + (cells[None, :, None] - y) ** 2 <= CLICK_RADIUS ** 2
        disk &= (labels[:, i] >= 0)[:, None, None]
        value = torch.where(labels[:, i] == 1, MASK_LOGIT, -MASK_LOGIT).to(masks.dtype)[:, None, None]
        painted[:, 0] = torch.where(disk, value, painted[:, 0])
    return painted


def decode_clicks(model: "SAMed", embeddings: torch.Tensor, extra: Sequence[torch.Tensor], coords: torch.Tensor,
                  labels: torch.Tensor, classes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Refine one class per image from its clicks and current mask.

    Args:
        embeddings: (B, D, g, g) from `model.encode`, and its `extra` features (SAM 2).
        coords, labels: (B, N, 2), (B, N) from :func:`click_coords` (N may be 0).
        classes: (B,) long, the class each image refines (1..K).
        masks: (B, 1, 4g, 4g) mask prompts from :func:`mask_prompt`; the clicks are painted
            into them here (:func:`paint_clicks`).

    Returns:
        (B, 4g, 4g) logits of each image's class (> 0: the class is there).
    """
    require_clicks(model.config, repr(model.active_adapter) if model.active_adapter else "this adapter")
    host = require_stock_state(model.sam).host
    device = embeddings.device
    classes = classes.to(device=device, dtype=torch.long)
    masks = paint_clicks(masks, coords, labels, model.config.image_size)
    points = (coords.to(device, embeddings.dtype), labels.to(device))
    sparse, dense = host.prompt_encoder(points=points, boxes=None, masks=masks.to(device, embeddings.dtype))
    token = host.mask_decoder.class_embed(classes)[:, None, :]
    sparse = torch.cat([sparse, token.to(sparse.dtype)], dim=1)
    low_res, _ = model.decode(embeddings, extra, prompts=(sparse, dense))
    return low_res[torch.arange(len(classes), device=device), classes]
