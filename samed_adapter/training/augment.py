"""Per-slice augmentation and resizing, as in the published SAMed ``RandomGenerator``.

Randomness comes only from a :class:`numpy.random.Generator` handed in by the caller, so a run can
be reproduced (and resumed mid-way) from its seeds; nothing here touches numpy's or Python's
global random state. The training loop seeds one generator per slice from (seed, epoch, index).
"""

from __future__ import annotations

import numpy as np

__all__ = ["augment", "low_res_size"]

# The SAMed recipe: rotations by an integer angle drawn from [-20, 20).
_MAX_ANGLE = 20


def low_res_size(image_size: int) -> int:
    """Side of SAM's low-resolution mask logits, 4 * g with g = image_size // 16 the token grid.

    For the bare image size the augmentation works with; given an AdapterConfig, this is
    ``4 * config.grid_size``.
    """
    _check_image_size(image_size)
    return 4 * (image_size // 16)


def augment(
    image: np.ndarray,
    label: np.ndarray,
    image_size: int,
    rng: np.random.Generator | None,
    *,
    train: bool = True,
) -> dict[str, np.ndarray]:
    """Augment (when ``train``) and resize one 2-D slice and its label.

    With probability 0.5: ``np.rot90`` by k in {0, 1, 2, 3} quarter turns, then ``np.flip`` along
    axis 0 or 1. Otherwise, with probability 0.5: ``scipy.ndimage.rotate`` by an integer angle in
    [-20, 20) degrees, nearest neighbour (order 0) for image and label, ``reshape=False`` (corners
    that rotate in are filled with 0, i.e. background). Then the slice is resized to
    ``image_size`` (cubic spline, order 3, for the image; nearest, order 0, for the label) and a
    low-resolution label of side :func:`low_res_size` is made from the resized label (order 0).
    With ``train=False`` only the resizing happens and ``rng`` is not used (it may be ``None``).

    Args:
        image: (H, W) float array, intensities in [0, 1].
        label: (H, W) integer-valued array (any int dtype, or floats holding whole numbers).
        image_size: S, the side the encoder runs at; a positive multiple of 16.
        rng: the only source of randomness (unused, may be ``None``, when ``train`` is false).
        train: apply the random rotation/flip before resizing.

    Returns:
        ``{"image": (3, S, S) float32, "label": (S, S) int64, "low_res_label": (4g, 4g) int64}``;
        the image is the slice repeated over three channels. The cubic resize can overshoot
        [0, 1] slightly near sharp edges; values are not clipped, as in the published code.
    """
    from scipy import ndimage  # here, not at import: the command line declares its flags without scipy

    _check_image_size(image_size)
    image = np.asarray(image)
    label = as_int_label(label)
    if image.ndim != 2 or image.shape != label.shape:
        raise ValueError(
            f"augment takes one 2-D slice and a label of the same shape, got image {image.shape} and "
            f"label {label.shape}; slice volumes before augmenting"
        )
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    if train:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), got {type(rng).__name__}"
            )
        # Two independent draws, as in SAMed: rot/flip with p=0.5, else rotate with p=0.5 (0.25 overall).
        if rng.random() < 0.5:
            k = int(rng.integers(0, 4))
            axis = int(rng.integers(0, 2))
            image = np.flip(np.rot90(image, k), axis=axis)
            label = np.flip(np.rot90(label, k), axis=axis)
        elif rng.random() < 0.5:
            angle = int(rng.integers(-_MAX_ANGLE, _MAX_ANGLE))
            image = ndimage.rotate(image, angle, order=0, reshape=False)
            label = ndimage.rotate(label, angle, order=0, reshape=False)
    image = np.ascontiguousarray(image)
    label = np.ascontiguousarray(label)

    h, w = image.shape
    if (h, w) != (image_size, image_size):
        image = ndimage.zoom(image, (image_size / h, image_size / w), order=3)
        label = ndimage.zoom(label, (image_size / h, image_size / w), order=0)
    low = low_res_size(image_size)
    low_res_label = ndimage.zoom(label, (low / image_size, low / image_size), order=0)

    image3 = np.repeat(image.astype(np.float32, copy=False)[None], 3, axis=0)
    return {
        "image": image3,
        "label": label.astype(np.int64, copy=False),
        "low_res_label": low_res_label.astype(np.int64, copy=False),
    }


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 16 or image_size % 16:
        raise ValueError(f"image_size must be a positive multiple of 16 (SAM's patch size), got {image_size!r}")


def as_int_label(label: np.ndarray, where: object = "label") -> np.ndarray:
    """Class indices as int64; float arrays are accepted when they hold whole numbers."""
    label = np.asarray(label)
    if np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_:
        return label.astype(np.int64, copy=False)
    if np.issubdtype(label.dtype, np.floating):
        # Synapse's npz files (and some NIfTI labels) store class indices as floats.
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise ValueError(
                f"{where} holds non-integer values; labels must be class indices (was an image passed as the "
                "label, or was the label resampled with interpolation instead of nearest neighbour?)"
            )
        return rounded.astype(np.int64)
    raise TypeError(f"{where} must be an integer (or whole-number float) array, got dtype {label.dtype}")
