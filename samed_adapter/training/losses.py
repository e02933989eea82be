"""SAMed's training loss on the low-resolution mask logits: weighted cross-entropy + Dice.

Distributed training
--------------------
Dice is not a mean over pixels, so averaging per-process Dice losses is not the Dice loss of the
whole batch. Pass ``reduce_fn=all_reduce_sum()`` and the per-class sums (and the summed
cross-entropy and pixel count) are added up across processes *before* the ratios are formed:
every process then computes exactly the loss of the global batch (N processes with batch b give
the loss of one process with batch N * b).

Gradient scaling rule (read this before calling ``backward``): :func:`all_reduce_sum` is
differentiable, and its backward pass is again a sum over processes. Each process back-propagates
the same global loss L, so the gradient that arrives at process r's own logits is N * dL/dx_r
(N contributions of dL/dx_r, one from each process's backward). DistributedDataParallel then
*averages* parameter gradients over the N processes, which divides that factor N away again:
the parameters receive exactly dL/dtheta, the gradient of one process with the full batch.
So: call ``out.total.backward()`` as it is -- do NOT multiply or divide by the world size.
``LossOutput.grad_scale`` records the factor (1.0) so a training loop can apply it blindly.
(With a custom ``reduce_fn`` whose backward passes gradients through unchanged, i.e. only the
local share, each process would receive dL/dx_r and DDP's averaging would leave dL/dtheta / N:
such a loop must multiply the loss by N. Only the built-in :func:`all_reduce_sum` is tested.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossOutput", "segmentation_loss", "dice_loss", "all_reduce_sum"]

ReduceFn = Callable[[Tensor], Tensor]


@dataclass
class LossOutput:
    """What :func:`segmentation_loss` returns; every tensor is a 0-d tensor unless noted.

    ``total``: ce_weight * ce + dice_weight * dice, with gradients; back-propagate this.
    ``ce``, ``dice``: the two parts (with gradients; detach them for logging).
    ``dice_per_class``: (K+1,) Dice loss per class, background first.
    ``grad_scale``: the factor to multiply ``total`` by before ``backward`` so that, after DDP's
    averaging, parameters get the one-process full-batch gradient; 1.0 (see the module docstring).
    ``click``: a click-trained adapter's click-refinement loss (training.clicks), which the
    training loop adds to ``total`` with its weight; None otherwise.
    """

    total: Tensor
    ce: Tensor
    dice: Tensor
    dice_per_class: Tensor
    grad_scale: float = 1.0
    click: Optional[Tensor] = None


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward is again a sum over processes.

    Same semantics as ``torch.distributed.nn.functional.all_reduce(x, SUM)``, which torch 2.x
    deprecates with a FutureWarning on every call; keeping the five lines here also pins the
    backward rule that the gradient scaling documented above depends on.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(group: Optional[dist.ProcessGroup] = None) -> ReduceFn:
    """A ``reduce_fn`` for :func:`segmentation_loss`: differentiable sum over the processes of
    ``group`` (default: the world group). Needs an initialised ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "all_reduce_sum needs torch.distributed to be initialised; call "
            "torch.distributed.init_process_group(...) first, or pass reduce_fn=None for one process"
        )

    def reduce(tensor: Tensor) -> Tensor:
        return _AllReduceSum.apply(tensor, group)

    return reduce


def _check_inputs(logits: Tensor, target: Tensor) -> None:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("logits and target must be torch tensors")
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, K+1, h, w), got shape {tuple(logits.shape)}")
    if target.ndim != 3 or target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(
            f"target must be (B, h, w) matching logits (B, K+1, h, w) = {tuple(logits.shape)}, got "
            f"{tuple(target.shape)}; compare against the low-resolution label (4g x 4g), not the full-size one"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices (int64), got {target.dtype}")
    if target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= logits.shape[1]:
            raise ValueError(
                f"target values must lie in [0, {logits.shape[1] - 1}] for {logits.shape[1]} output masks, found "
                f"[{lo}, {hi}]; remap the raw labels (command line: --label-map synapse for raw Synapse/BTCV labels; "
                "Python: label_map=SYNAPSE_LABEL_MAP) or raise the number of classes (--num-classes)"
            )


def _dice_sums(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class sum(p t), sum(p^2), sum(t^2) over batch and space, each (K+1,)."""
    # float32 at least: bf16/fp16 sums over 10^5+ pixels lose the small classes entirely.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(dtype), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(dtype)
    dims = (0, 2, 3)
    return (probs * onehot).sum(dims), (probs * probs).sum(dims), (onehot * onehot).sum(dims)


def _dice_from_sums(intersect: Tensor, z_sum: Tensor, y_sum: Tensor, eps: float) -> Tensor:
    return 1.0 - (2.0 * intersect + eps) / (z_sum + y_sum + eps)


def dice_loss(
    logits: Tensor, target: Tensor, *, eps: float = 1e-5, reduce_fn: Optional[ReduceFn] = None
) -> tuple[Tensor, Tensor]:
    """Soft Dice loss over all K+1 classes, background included.

    d_c = 1 - (2 sum(p t) + eps) / (sum(p^2) + sum(t^2) + eps), sums over batch and both spatial
    axes (and over processes when ``reduce_fn`` is given), p = softmax(logits), t = one-hot(target).

    Args:
        logits: (B, K+1, h, w) raw mask logits.
        target: (B, h, w) int64 class indices in [0, K].

    Returns:
        ``(mean over classes, per-class (K+1,))``.
    """
    _check_inputs(logits, target)
    intersect, z_sum, y_sum = _dice_sums(logits, target)
    if reduce_fn is not None:
        c = intersect.shape[0]
        reduced = reduce_fn(torch.cat([intersect, z_sum, y_sum]))
        intersect, z_sum, y_sum = reduced[:c], reduced[c : 2 * c], reduced[2 * c :]
    per_class = _dice_from_sums(intersect, z_sum, y_sum, eps)
    return per_class.mean(), per_class


def segmentation_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ce_weight: float = 0.2,
    dice_weight: float = 0.8,
    eps: float = 1e-5,
    reduce_fn: Optional[ReduceFn] = None,
) -> LossOutput:
    """SAMed's loss: ``ce_weight * cross_entropy + dice_weight * dice`` on low-res logits.

    Args:
        logits: (B, K+1, h, w) low-resolution mask logits (h = w = 4 * config.grid_size, `low_res_size`).
        target: (B, h, w) int64 class indices in [0, K] (the augmentation's ``low_res_label``).
        ce_weight, dice_weight: weights of the two parts (SAMed: 0.2 and 0.8).
        eps: Dice smoothing term added to numerator and denominator.
        reduce_fn: ``None`` for one process; :func:`all_reduce_sum` under DistributedDataParallel,
            which makes the result the loss of the global batch (cross-entropy becomes the sum of
            per-pixel losses over all processes divided by the global pixel count). Must be called
            on every process, in step. See the module docstring for gradient scaling: none needed.

    Returns:
        :class:`LossOutput`; back-propagate ``total * grad_scale`` (grad_scale is 1.0).
    """
    _check_inputs(logits, target)
    for name, value in (("ce_weight", ce_weight), ("dice_weight", dice_weight), ("eps", eps)):
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) < float("inf"):
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")

    dtype = torch.promote_types(logits.dtype, torch.float32)
    ce_sum = F.cross_entropy(logits.to(dtype), target.long(), reduction="sum")
    count = torch.tensor(float(target.numel()), dtype=dtype, device=logits.device)
    intersect, z_sum, y_sum = _dice_sums(logits, target)
    c = intersect.shape[0]

    if reduce_fn is not None:
        # One collective for everything: [intersect | z_sum | y_sum | ce_sum | count].
        packed = reduce_fn(torch.cat([intersect, z_sum, y_sum, ce_sum[None], count[None]]))
        if packed.shape != (3 * c + 2,):
            raise ValueError(f"reduce_fn must return a tensor of the shape it was given ({3 * c + 2},), got {tuple(packed.shape)}")
        intersect, z_sum, y_sum = packed[:c], packed[c : 2 * c], packed[2 * c : 3 * c]
        ce_sum, count = packed[3 * c], packed[3 * c + 1]

    if float(count.detach()) <= 0:
        raise ValueError("the batch has no pixels (empty target); skip empty batches before computing the loss")
    ce = ce_sum / count
    per_class = _dice_from_sums(intersect, z_sum, y_sum, eps)
    dice = per_class.mean()
    total = ce_weight * ce + dice_weight * dice
    return LossOutput(total=total, ce=ce, dice=dice, dice_per_class=per_class, grad_scale=1.0)
