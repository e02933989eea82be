"""Several resident adapters on one SAM and batches that mix them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import samed_adapter as sa
from samed_adapter.testing import assert_unchanged, random_adapter, snapshot
from samed_adapter.testing.tiny import CONFIGS, SIZE, images, stock_sam


@pytest.mark.parametrize("config_name", ["k3", "decoder_lora", "size_96"])
def test_a_mixed_batch_equals_each_image_alone_with_its_adapter(config_name):
    config = CONFIGS[config_name]
    adapters = {f"a{i}": random_adapter(stock_sam(), config, seed=20 + i) for i in range(3)}
    sam = stock_sam()
    model = sa.patch(sam, adapters["a0"], adapter_name="a0")
    for name in ("a1", "a2"):
        model.load_adapter(adapters[name], name)
    assert model.adapter_names == ["a0", "a1", "a2"] and model.active_adapter == "a0"
    before = snapshot(sam)
    # size_96: a 6 x 6 grid, so the windowed blocks pad (the padding's qkv is per image too).
    x = images(batch=4, seed=3)[..., : config.image_size, : config.image_size]
    names = ["a2", "a0", "a2", "a1"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
    assert_unchanged(sam, before)  # the active adapter is untouched
    for b, name in enumerate(names):
        alone = sa.patch(stock_sam(), adapters[name])
        with torch.no_grad():
            expected = alone(x[b : b + 1])
        for key in ("low_res_logits", "iou_predictions", "masks"):
            torch.testing.assert_close(mixed[key][b : b + 1], expected[key], rtol=1e-5, atol=1e-5)


def test_set_adapter_swaps_and_delete_refuses_the_active_one(tmp_path):
    a = random_adapter(stock_sam(), CONFIGS["k3"], seed=30)
    b = random_adapter(stock_sam(), CONFIGS["k3"], seed=31)
    path = b.save(tmp_path / "b.safetensors")
    model = sa.patch(stock_sam(), a)
    model.load_adapter(path, "b")
    model.set_adapter("b")
    assert model.active_adapter == "b"
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["low_res_logits"], sa.patch(stock_sam(), b)(x)["low_res_logits"],
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="active adapter"):
        model.delete_adapter("b")
    model.set_adapter("default").delete_adapter("b")
    assert model.adapter_names == ["default"]
    with pytest.raises(KeyError, match="no resident adapter"):
        model.set_adapter("b")


def test_mixed_batches_need_adapters_of_one_image_size_and_keep_merging():
    model = sa.patch(stock_sam(), random_adapter(stock_sam(), CONFIGS["k3"], seed=32), merge=True)
    model.load_adapter(random_adapter(stock_sam(), CONFIGS["k3"], seed=33), "same")
    other = dataclasses.replace(CONFIGS["k3"], image_size=96)
    model.load_adapter(random_adapter(stock_sam(), other, seed=34), "other")
    with torch.no_grad():
        out = model(images(batch=2), adapter_names=["same", "default"])
        assert model.merged
        with pytest.raises(ValueError, match="one image_size"):
            model(images(batch=2), adapter_names=["other", "default"])
        with pytest.raises(ValueError, match="adapter names for a batch"):
            model(images(batch=2), adapter_names=["same"])
    assert out["low_res_logits"].shape == (2, 4, SIZE // 4, SIZE // 4)


def test_an_adapter_that_does_not_fit_is_not_made_resident():
    model = sa.patch(stock_sam(), random_adapter(stock_sam(), CONFIGS["k3"], seed=35))
    foreign = random_adapter(stock_sam(seed=1), CONFIGS["k3"], seed=36)
    with pytest.raises(sa.BaseMismatchError):
        model.load_adapter(foreign, "foreign")
    assert model.adapter_names == ["default"]
