"""Which image to label next: MONAI Label's ``first`` and ``random``, and ``least_sure``.

``first`` and ``random`` choose as MONAI Label 0.8.5's strategies do
(``monailabel/tasks/activelearning/first.py``, ``random.py``): among the images without a final
label, the first id in sorted order; or one drawn with weight ``now - ts``, where ``ts`` is when
this strategy last gave that image (``info["strategy"][name]["ts"]``, which MONAI Label's server
records after each pick, 0 if never), so recently given images are seldom given again.

``least_sure`` is none of MONAI Label's: the unlabeled image whose automatic labels the current
adapter is least sure of, by a score the caller computes from the model's probabilities with
:func:`uncertainty`.
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from .local import FolderDatastore

__all__ = ["STRATEGIES", "first", "least_sure", "random_image", "uncertainty", "uncertainty_of",
           "uncertainty_sums"]

#: Strategy name -> description, as MONAI Label's ``/info`` lists them (its own words for its two).
STRATEGIES: dict[str, str] = {
    "first": "Get First Sample",
    "random": "Random Strategy",
    "least_sure": "The unlabeled image whose automatic labels the serving adapter is least sure of",
}


def first(datastore: "FolderDatastore", label_tag: Optional[str] = None) -> Optional[dict[str, Any]]:
    """``{"id": ...}`` of the first unlabeled image in sorted id order; ``None`` when all are labeled."""
    images = sorted(datastore.get_unlabeled_images(label_tag))
    return {"id": images[0]} if images else None


def random_image(datastore: "FolderDatastore", label_tag: Optional[str] = None, *, strategy: str = "random",
                 rng: Optional[random.Random] = None, now: Optional[int] = None) -> Optional[dict[str, Any]]:
    """``{"id", "weight"}`` of an unlabeled image drawn with weight ``now - ts`` (MONAI Label's ``Random``).

    Args:
        strategy: the name under which picks are recorded in the images' info.
        rng: the generator; by default the ``random`` module's, as MONAI Label draws (so the same
            seed picks the same image as MONAI Label's strategy on the same datastore).
        now: seconds since the epoch (default: the clock, whole seconds as MONAI Label takes it).

    Returns:
        ``None`` when all images are labeled. ``weight`` is the chosen image's (MONAI Label
        0.8.5 answers the first image's weight whichever it chose).
    """
    images = datastore.get_unlabeled_images(label_tag)
    if not images:
        return None
    now = int(time.time()) if now is None else int(now)
    weights = [now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0) for i in images]
    # MONAI Label's draw fails when every image was given this very second (or, with a clock set
    # back, has a negative weight): those draw evenly instead.
    usable = [max(w, 0) for w in weights] if sum(max(w, 0) for w in weights) > 0 else [1] * len(images)
    choice = (rng or random).choices(range(len(images)), weights=usable)[0]
    return {"id": images[choice], "weight": weights[choice]}


def least_sure(datastore: "FolderDatastore", scores: Mapping[str, float],
               label_tag: Optional[str] = None) -> Optional[dict[str, Any]]:
    """``{"id", "score"}`` of the unlabeled image with the highest uncertainty score.

    Args:
        scores: image id -> :func:`uncertainty` of the serving adapter's probabilities; unlabeled
            images without a score are left out (not yet predicted), ids that are labeled or
            unknown are ignored. Ties go to the first id in sorted order.

    Returns:
        ``None`` when no unlabeled image has a score.

    Raises:
        ValueError: a score is not a finite number.
    """
    bad = {k: v for k, v in scores.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise ValueError(f"uncertainty scores must be finite numbers, got {bad!r}; compute them with uncertainty()")
    candidates = sorted(i for i in datastore.get_unlabeled_images(label_tag) if i in scores)
    if not candidates:
        return None
    best = min(candidates, key=lambda i: -scores[i])  # min keeps the first of equals
    return {"id": best, "score": float(scores[best])}


def uncertainty(probabilities: np.ndarray, method: str = "entropy") -> float:
    """How unsure a model is of its labels of one image, in [0, 1] (0: certain).

    Args:
        probabilities: ``(K+1, ...)`` class probabilities per voxel (background first), summing
            to 1 over axis 0: what the model computes before its argmax.
        method: ``"entropy"``, the per-voxel entropy over ``log(K+1)``; or ``"max_prob"``,
            ``(1 - max probability) * (K+1) / K``. Both are 0 for a one-hot voxel and 1 for a
            uniform one.

    Returns:
        The mean over the voxels the model labels foreground (argmax > 0), where its labels
        are; over all voxels when it labels none (an adapter that finds nothing on a shifted
        domain is then ranked by how unsure it is of the background).

    Raises:
        ValueError: not (K+1, ...) with K >= 1, not finite, negative, or not summing to 1.
    """
    return uncertainty_of(uncertainty_sums(probabilities, method))


def uncertainty_sums(probabilities: np.ndarray, method: str = "entropy") -> tuple[float, int, float, int]:
    """:func:`uncertainty`'s parts, which add up over the slices of an image: (sum over the
    foreground voxels, their count, sum over all voxels, their count). A model replica sends
    these four numbers per slice rather than the (K+1, S, S) softmax (serve.residents).

    Raises:
        ValueError: as :func:`uncertainty`.
    """
    p = np.asarray(probabilities)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float32)
    _check_probabilities(p)
    classes = p.shape[0]
    # One class at a time and a voxel-sized array at most: a CT's (K+1, D, H, W) may be gigabytes.
    if method == "entropy":
        from scipy.special import entr  # -p log p, 0 at p = 0

        per_voxel = entr(p[0])
        for k in range(1, classes):
            per_voxel += entr(p[k])
        per_voxel /= math.log(classes)
    elif method == "max_prob":
        per_voxel = (1.0 - p.max(axis=0)) * (classes / (classes - 1))
    else:
        raise ValueError(f"unknown uncertainty method {method!r}; use 'entropy' or 'max_prob'")
    foreground = p[1:].max(axis=0) > p[0]  # argmax > 0 (argmax gives ties to the background)
    return (float(per_voxel[foreground].sum(dtype=np.float64)), int(foreground.sum()),
            float(per_voxel.sum(dtype=np.float64)), int(per_voxel.size))


def uncertainty_of(sums: Sequence[float]) -> float:
    """:func:`uncertainty` from the :func:`uncertainty_sums` of an image's parts, added up."""
    foreground, count, everything, total = sums
    mean = foreground / count if count else everything / max(total, 1)
    return float(np.clip(mean, 0.0, 1.0))


def _check_probabilities(p: np.ndarray) -> None:
    if p.ndim < 2 or p.shape[0] < 2 or p[0].size == 0:
        raise ValueError(f"probabilities of shape {p.shape} are not (K+1, ...) with K >= 1 classes and voxels; "
                         "pass the softmax over classes, background first")
    if not np.isfinite(p).all() or p.min() < -1e-6:
        raise ValueError("probabilities hold NaN, infinity or negative values; pass the softmax, not logits")
    worst = float(np.abs(p.sum(axis=0) - 1.0).max())
    if worst > 1e-3:
        raise ValueError(f"probabilities do not sum to 1 over the classes (off by up to {worst:.3g}); pass the "
                         "softmax over axis 0, background included")
