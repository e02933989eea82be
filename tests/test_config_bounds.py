"""AdapterConfig refuses sizes and normalisations no backbone can serve (issue 20)."""

from __future__ import annotations

import math

import pytest

import samed_adapter as sa
from samed_adapter.adapter_file.config import MAX_IMAGE_SIZE, MIN_PIXEL_STD


@pytest.mark.parametrize("size", [4096, 2048, 1040])
def test_image_size_past_what_sam_was_trained_at_is_refused(size: int) -> None:
    # 4096 asked for 16 GiB per input before; SAM and SAM 2 were trained at 1024.
    with pytest.raises(ValueError, match=rf"in 16\.\.1024 .*trained at 1024.*got {size}"):
        sa.AdapterConfig(image_size=size)


@pytest.mark.parametrize("size", [16, 224, 512, 1024])
def test_image_sizes_real_adapters_use_are_accepted(size: int) -> None:
    assert MAX_IMAGE_SIZE == 1024
    assert sa.AdapterConfig(image_size=size).image_size == size


@pytest.mark.parametrize("std", [1e-30, 1e-4, 0.0, -1.0])
def test_absurdly_small_or_non_positive_pixel_std_is_refused(std: float) -> None:
    # pixel_std 1e-30 gave NaN logits and all-background labels with exit 0.
    with pytest.raises(ValueError, match=r"pixel_std must be at least 0\.001 .*non-finite logits"):
        sa.AdapterConfig(pixel_std=(1.0, std, 1.0))


@pytest.mark.parametrize("field", ["pixel_mean", "pixel_std"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_normalisation_is_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{field} must be three finite numbers"):
        sa.AdapterConfig(**{field: (0.5, value, 0.5)})


def test_real_normalisations_are_accepted() -> None:
    imagenet = sa.AdapterConfig(pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))
    assert imagenet.pixel_std == (0.229, 0.224, 0.225)
    assert sa.AdapterConfig(pixel_std=(MIN_PIXEL_STD,) * 3).pixel_std == (MIN_PIXEL_STD,) * 3
