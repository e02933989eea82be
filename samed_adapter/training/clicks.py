"""Simulated clicks in the training loop: the adapter learns to refine one class from clicks.

As SAM and micro-sam train their prompts: after the automatic forward (the K+1 output and its
loss, unchanged), each image of the batch refines one class c for a few rounds on the SAME
image embeddings (the encoder runs once per step; the click loss reaches the LoRA through them):

- c is drawn uniformly among the foreground classes present in the slice's truth or in its
  automatic prediction (a class predicted but absent teaches negative clicks); a slice with
  neither has no click rounds.
- Round 1 starts from the automatic prediction's mask of c (argmax, detached). Each round adds
  one click drawn uniformly from the error pixels (FN or FP; positive iff FN), or, where there
  is no error, a positive inside the truth (a negative anywhere when c is absent and predicted
  nowhere), and asks the decoder for c from all clicks so far and the current mask as SAM's mask
  prompt; the refined mask (logits > 0, detached) is the next round's mask prompt.
- Each round's loss is BCE-with-logits + soft Dice of channel c's low-res logits against the
  low-res truth mask of c; an image's loss is the mean over its rounds, the click loss the mean
  over images (across processes under DDP, see :func:`mean_click_loss`).

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
from torch import Tensor, nn

from ..interactive.prompts import SliceClick, click_coords, decode_clicks, mask_prompt

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..model import SAMed

__all__ = ["CLICK_STREAM", "ClickTraining", "choose_class", "click_rounds_loss", "mask_loss", "mean_click_loss",
           "sample_click"]

# A slice's click generator is seeded by (seed, epoch, index, CLICK_STREAM): another stream than
# its augmentation's (seed, epoch, index).
CLICK_STREAM = 31


def choose_class(prediction: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> int:
    """The class one image refines: uniform among foreground classes in `truth` or `prediction`
    (both (h, w) ints); 0 when the slice has none."""
    present = np.union1d(np.unique(prediction), np.unique(truth))
    present = present[present > 0]
    return int(rng.choice(present)) if present.size else 0


def sample_click(mask: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> tuple[int, int, bool]:
    """One simulated click for the current `mask` of a class against its `truth` (both (h, w) bool).

    Uniform over the error pixels (FN: truth not in mask, FP: mask not in truth), positive iff FN;
    without error, a positive uniform inside the truth; with no truth either, a negative anywhere.

    Returns:
        (row, col, positive).
    """
    error = mask != truth
    pool = error if error.any() else truth if truth.any() else np.ones_like(truth)
    flat = np.flatnonzero(pool)
    row, col = divmod(int(flat[rng.integers(flat.size)]), truth.shape[1])
    # FN pixels lie in the truth and FP pixels outside it; so do the fallbacks' pools.
    return row, col, bool(truth[row, col])


def mask_loss(logits: Tensor, truth: Tensor, eps: float = 1e-5) -> Tensor:
    """BCE-with-logits + soft Dice per image: (B, h, w) logits, (B, h, w) bool truth -> (B,).

    Dice as SAMed's: 1 - (2 sum(p t) + eps) / (sum(p^2) + sum(t^2) + eps), p = sigmoid(logits).
    """
    logits = logits.float()
    target = truth.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2))
    p = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (p * target).sum((1, 2)) + eps) / ((p * p).sum((1, 2)) + (target * target).sum((1, 2)) + eps)
    return bce + dice


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
    index = torch.tensor([b for b, _ in picks], device=embeddings.device)
    classes = torch.tensor([c for _, c in picks])
    masks = np.stack([prediction[b] == c for b, c in picks])
    truths = np.stack([truth[b] == c for b, c in picks])
    truth_tensor = torch.from_numpy(truths).to(embeddings.device)
    embeddings, extra = embeddings[index], [e[index] for e in extra]
    size, grid, image_size = truths.shape[1:], model.config.grid_size, model.config.image_size
    clicks: list[list[SliceClick]] = [[] for _ in picks]
    total = torch.zeros(len(picks), device=embeddings.device)
    for _ in range(rounds):
        for i, (b, c) in enumerate(picks):
            row, col, positive = sample_click(masks[i], truths[i], rngs[b])
            clicks[i].append(SliceClick(c, 0, row, col, positive))
        coords, labels = click_coords(clicks, size, image_size)
        logits = decode_clicks(model, embeddings, extra, coords, labels, classes,
                               mask_prompt(torch.from_numpy(masks), grid))
        total = total + mask_loss(logits, truth_tensor)
        masks = (logits.detach() > 0).cpu().numpy()
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
