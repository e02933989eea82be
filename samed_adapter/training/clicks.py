"""Simulated clicks in the training loop: the adapter learns to refine one class from clicks.

As SAM and micro-sam train their prompts: after the automatic forward (the K+1 output and its
loss, unchanged), each image of the batch refines one class c for a few rounds on the SAME
image embeddings (the encoder runs once per step; the click loss reaches the LoRA through them):

- c is drawn uniformly among the foreground classes present in the slice's truth or in its
  automatic prediction (a class predicted but absent teaches negative clicks); a slice with
  neither has no click rounds.
- The current mask starts as the automatic prediction's mask of c (argmax, detached). Each round
  adds one click on its errors (:func:`sample_click`): half of them where `evaluate --clicks`
  puts them (the point deepest inside the largest error region), half uniformly over the error
  pixels; positive iff the class is missing there. The click's error region (8-connected, of
  its kind) is then set right in the current mask: that is the round's target.
- Every round asks the decoder for c from all clicks so far, with the automatic mask as SAM's
  mask prompt (the clicks painted into it, see `interactive.prompts`), as the session asks it.
- Each round's loss is BCE-with-logits of channel c's low-res logits against the target, its
  clicked region weighted REGION_WEIGHT + 1; an image's loss is the mean over its rounds, the
  click loss the mean over images (across processes under DDP, see :func:`mean_click_loss`).

Why the target is the clicked region set right and not the whole truth: measured on the quick
start (a random tiny SAM, 140 steps), a decoder taught the whole truth from a click learns to
re-predict the class (no better than the automatic output) and to ignore the click; taught to
fix what was clicked, it learns a local correction, which the session adds to the automatic
logits (benchmarks/RESULTS.md, "Clicks").

Clicks are drawn on the low-res label grid (4g x 4g) and turned into prompts by
`samed_adapter.interactive.prompts` (`click_coords`, `mask_prompt`, `decode_clicks`), the code
the Python session, the service and `evaluate --clicks` build theirs with, so the adapter is
asked what it learnt. Each slice's clicks come from its own generator, seeded by (seed, epoch,
index), so a resumed run and N processes draw the same clicks as one uninterrupted process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from ..interactive.prompts import SliceClick, click_coords, decode_clicks, mask_prompt
from ..interactive.protocol import next_click

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..model import SAMed

__all__ = ["CLICK_STREAM", "PROTOCOL_SHARE", "REGION_WEIGHT", "ClickTraining", "choose_class", "click_rounds_loss",
           "mask_loss", "mean_click_loss", "sample_click"]

# A slice's click generator is seeded by (seed, epoch, index, CLICK_STREAM): another stream than
# its augmentation's (seed, epoch, index).
CLICK_STREAM = 31
# The share of training clicks placed as `evaluate --clicks` places them; the rest are uniform
# over the error pixels, so that clicks off the deepest point are learnt too.
PROTOCOL_SHARE = 0.5
# How much more a pixel of the clicked error region weighs in a round's loss than any other: the
# region is a few dozen of the 4g x 4g pixels, and fixing it is what the round teaches.
REGION_WEIGHT = 5.0

_EIGHT = np.ones((3, 3), dtype=bool)


def choose_class(prediction: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> int:
    """The class one image refines: uniform among foreground classes in `truth` or `prediction`
    (both (h, w) ints); 0 when the slice has none."""
    present = np.union1d(np.unique(prediction), np.unique(truth))
    present = present[present > 0]
    return int(rng.choice(present)) if present.size else 0


def sample_click(mask: np.ndarray, truth: np.ndarray, rng: np.random.Generator
                 ) -> tuple[int, int, bool, np.ndarray]:
    """One simulated click for the current `mask` of a class against its `truth` (both (h, w) bool).

    With probability PROTOCOL_SHARE at the protocol's point (:func:`next_click`), else uniform over
    the error pixels (FN: truth not in mask, FP: mask not in truth); positive iff FN. Without
    error, a positive uniform inside the truth; with no truth either, a negative anywhere.

    Returns:
        (row, col, positive, region): region (h, w) bool is the click's error region, the
        8-connected component of its kind (FN or FP) that holds it; empty without error.
    """
    error = mask != truth
    if not error.any():
        pool = truth if truth.any() else np.ones_like(truth)
        flat = np.flatnonzero(pool)
        row, col = divmod(int(flat[rng.integers(flat.size)]), truth.shape[1])
        return row, col, bool(truth[row, col]), np.zeros_like(truth)
    if rng.random() < PROTOCOL_SHARE:
        row, col, positive = next_click(mask, truth)
    else:
        flat = np.flatnonzero(error)
        row, col = divmod(int(flat[rng.integers(flat.size)]), truth.shape[1])
        positive = bool(truth[row, col])  # FN pixels lie in the truth, FP pixels outside it
    regions, _ = ndimage.label(truth & ~mask if positive else mask & ~truth, structure=_EIGHT)
    return row, col, positive, regions == regions[row, col]


def mask_loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Weighted BCE-with-logits per image: (B, h, w) logits, bool target and float weights -> (B,),
    the mean over pixels of weight x BCE."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return (weight.to(logits.dtype) * bce).mean((1, 2))


def click_rounds_loss(model: "SAMed", embeddings: Tensor, extra: Sequence[Tensor], automatic: Tensor, target: Tensor,
                      rngs: Sequence[np.random.Generator], rounds: int) -> tuple[Tensor, int]:
    """The click rounds of one batch: the sum over its images of their mean round loss, and how many
    images had a class to refine.

    Args:
        embeddings, extra: (B, D, g, g) and its extra features, from `model.encode`, with gradients.
        automatic: (B, K+1, 4g, 4g) the automatic low-res logits of the same images.
        target: (B, 4g, 4g) int64 low-res labels.
        rngs: one generator per image (see CLICK_STREAM).
        rounds: clicks per image, one per round.

    Returns:
        (0-d sum with gradients, count); with no image to refine, a zero still tied to the graph
        of `automatic`, so that every process of a DDP run back-propagates through the same ops.
    """
    prediction = automatic.detach().argmax(1).cpu().numpy()
    truth = target.cpu().numpy()
    picks = [(b, c) for b, c in ((b, choose_class(prediction[b], truth[b], rngs[b])) for b in range(len(rngs))) if c]
    if not picks:
        return automatic.sum() * 0.0, 0
    device = embeddings.device
    index = torch.tensor([b for b, _ in picks], device=device)
    classes = torch.tensor([c for _, c in picks])
    automatic_masks = np.stack([prediction[b] == c for b, c in picks])
    masks = automatic_masks.copy()  # the automatic masks with each clicked region set right so far
    truths = np.stack([truth[b] == c for b, c in picks])
    embeddings, extra = embeddings[index], [e[index] for e in extra]
    size, grid, image_size = truths.shape[1:], model.config.grid_size, model.config.image_size
    prompts = mask_prompt(torch.from_numpy(automatic_masks), grid)
    clicks: list[list[SliceClick]] = [[] for _ in picks]
    total = torch.zeros(len(picks), device=device)
    for _ in range(rounds):
        regions = np.zeros_like(masks)
        for i, (b, c) in enumerate(picks):
            row, col, positive, regions[i] = sample_click(masks[i], truths[i], rngs[b])
            masks[i][regions[i]] = positive
            clicks[i].append(SliceClick(c, 0, row, col, positive))
        coords, labels = click_coords(clicks, size, image_size)
        logits = decode_clicks(model, embeddings, extra, coords, labels, classes, prompts)
        weight = 1.0 + REGION_WEIGHT * torch.from_numpy(regions).to(device)
        total = total + mask_loss(logits, torch.from_numpy(masks).to(device), weight)
    return (total / rounds).sum(), len(picks)


def mean_click_loss(loss_sum: Tensor, count: int, reduce_fn: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """The click loss of the (global) batch: summed image losses over the images refined.

    With `reduce_fn` (losses.all_reduce_sum under DDP) both are summed over processes first, as
    the segmentation loss's Dice sums are: every process gets the global mean, and the gradient
    scaling rule of `losses` holds unchanged (back-propagate it as it is).
    """
    packed = torch.stack([loss_sum.float(), loss_sum.new_tensor(float(count), dtype=torch.float32)])
    if reduce_fn is not None:
        packed = reduce_fn(packed)
    return packed[0] / packed[1].clamp(min=1.0)


class ClickTraining(nn.Module):
    """One training forward with clicks: the automatic low-res logits, then the click rounds on the
    same embeddings. A module so that DistributedDataParallel (and torch.compile) wrap the whole step.
    """

    def __init__(self, model: "SAMed", rounds: int, seed: int) -> None:
        super().__init__()
        self.model, self.rounds, self.seed = model, rounds, seed

    def forward(self, images: Tensor, target: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, int]:
        """(B, 3, S, S) images, (B, 4g, 4g) labels, (B, 2) (epoch, index) of each slice ->
        automatic low-res logits (B, K+1, 4g, 4g), the click rounds' summed loss and image count."""
        embeddings, extra = self.model.encode(images)
        low_res, _ = self.model.decode(embeddings, extra)
        rngs = [np.random.default_rng([self.seed, int(e), int(i), CLICK_STREAM]) for e, i in keys.tolist()]
        loss_sum, count = click_rounds_loss(self.model, embeddings, extra, low_res, target, rngs, self.rounds)
        return low_res, loss_sum, count
