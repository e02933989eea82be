"""patch / inject / swap / merge / unpatch on small random SAMs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.adapter_file.adapter import FORMAT_VERSION
from samed_adapter.surgery.lora import LoraQKV
from samed_adapter.testing import assert_unchanged, random_adapter, snapshot
from samed_adapter.testing.tiny import CONFIGS, SIZE, images, stock_sam


def test_fresh_adapter_leaves_encoder_stock_and_freezes_it():
    sam = stock_sam()
    x = torch.randn(2, 8, 8, 64)
    qkv = sam.image_encoder.blocks[0].attn.qkv
    expected = qkv(x)
    model = sa.inject(sam, CONFIGS["k3"])
    layer = model.sam.image_encoder.blocks[0].attn.qkv
    assert isinstance(layer, LoraQKV) and layer.base_layer is qkv
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    trainable = {n for n, p in model.sam.named_parameters() if p.requires_grad}
    assert trainable and all(
        ".lora_" in n or n.startswith(("prompt_encoder.", "mask_decoder.")) for n in trainable
    )
    assert not any(n.startswith("image_encoder.") and ".lora_" not in n for n in trainable)
    out = model(images())
    assert out["masks"].shape == (2, 4, SIZE, SIZE)
    assert out["low_res_logits"].shape == (2, 4, SIZE // 4, SIZE // 4)
    assert out["iou_predictions"].shape == (2, 4)


def test_decoder_lora_variant_freezes_the_transformer():
    model = sa.inject(stock_sam(), CONFIGS["decoder_lora"])
    params = dict(model.sam.mask_decoder.named_parameters())
    lora = [n for n in params if ".lora_" in n]
    assert len(lora) == 2 * 2 * (3 * 2 + 1)  # A and B, q and v, 7 attentions
    assert all(params[n].requires_grad for n in lora)
    assert not any(p.requires_grad for n, p in params.items() if n.startswith("transformer.") and n not in lora)
    assert params["mask_tokens.weight"].requires_grad


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adapter_round_trip_reproduces_the_model(name, tmp_path):
    config = CONFIGS[name]
    adapter = random_adapter(stock_sam(), config, seed=1)
    path = adapter.save(tmp_path / "a.safetensors")
    loaded = sa.Adapter.load(path)
    assert loaded.config == dataclasses.replace(config, backbone="tiny")
    assert loaded.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)

    sam = stock_sam()
    model = sa.patch(sam, path)
    x = torch.rand(2, 3, config.image_size, config.image_size)
    again = sa.patch(stock_sam(), adapter)
    torch.testing.assert_close(model(x)["low_res_logits"], again(x)["low_res_logits"], rtol=0, atol=0)
    # The adapter read back from the patched model holds the same values.
    back = model.adapter()
    assert back.tensors.keys() == adapter.tensors.keys()
    for k in adapter.tensors:
        torch.testing.assert_close(back.tensors[k], adapter.tensors[k], rtol=0, atol=1e-6)


def test_half_precision_save_halves_the_file(tmp_path):
    adapter = random_adapter(stock_sam(), CONFIGS["k3"], seed=2)
    full = adapter.save(tmp_path / "f32.safetensors").stat().st_size
    half = adapter.save(tmp_path / "f16.safetensors", dtype=torch.float16).stat().st_size
    bf16 = sa.Adapter.load(adapter.save(tmp_path / "bf16.safetensors", dtype=torch.bfloat16))
    assert half < 0.6 * full
    assert bf16.dtype == torch.bfloat16
    x = images()
    reference = sa.patch(stock_sam(), adapter)(x)["low_res_logits"]
    halved = sa.patch(stock_sam(), tmp_path / "f16.safetensors")(x)["low_res_logits"]
    assert (halved - reference).abs().max() <= 2e-2 * reference.abs().max()


def test_swaps_equal_a_fresh_patch_and_unpatch_restores_stock():
    a = random_adapter(stock_sam(), CONFIGS["k3"], seed=3)
    others = [random_adapter(stock_sam(), CONFIGS[n], seed=4 + i)
              for i, n in enumerate(["k5_rank2_blocks", "decoder_lora", "size_96"])]
    sam = stock_sam()
    stock = snapshot(sam)
    prompt_input = [{
        "image": torch.rand(3, 256, 256) * 255,
        "original_size": (256, 256),
        "point_coords": torch.tensor([[[40.0, 50.0]]]),
        "point_labels": torch.tensor([[1]]),
    }]
    with torch.no_grad():
        prompted = sam(prompt_input, multimask_output=True)[0]["low_res_logits"]

    model = sa.patch(sam, a)
    for other in others + [a, others[1], a]:
        model = sa.patch(sam, other)
    model.merge()
    model.unmerge()
    fresh = sa.patch(stock_sam(), a)
    assert model.config == fresh.config
    live, ref = sam.state_dict(), fresh.sam.state_dict()
    assert list(live) == list(ref)
    assert all(torch.equal(live[k], ref[k]) for k in ref)

    assert sa.unpatch(model) is sam
    assert_unchanged(sam, stock)
    with torch.no_grad():
        again = sam(prompt_input, multimask_output=True)[0]["low_res_logits"]
    assert torch.equal(again, prompted)


def test_merge_is_close_and_unmerge_is_exact():
    sam = stock_sam()
    stock_qkv = {i: b.attn.qkv.weight.detach().clone() for i, b in enumerate(sam.image_encoder.blocks)}
    model = sa.patch(sam, random_adapter(stock_sam(), CONFIGS["k3"], seed=5))
    x = images()
    unmerged = model(x)["low_res_logits"]
    for _ in range(5):
        model.merge()
        assert model.merged
        torch.testing.assert_close(model(x)["low_res_logits"], unmerged, rtol=1e-4, atol=1e-4)
        merged_weight = sam.image_encoder.blocks[0].attn.qkv.base_layer.weight
        assert not torch.equal(merged_weight, stock_qkv[0])
        model.unmerge()
    for i, blk in enumerate(sam.image_encoder.blocks):
        assert torch.equal(blk.attn.qkv.base_layer.weight, stock_qkv[i])
    assert torch.equal(model(x)["low_res_logits"], unmerged)
    merged = sa.patch(sam, random_adapter(stock_sam(), CONFIGS["k3"], seed=6), merge=True)
    assert merged.merged


def _write_with_metadata(adapter, path, **changes):
    from safetensors.torch import save_file

    meta = adapter.metadata()
    meta.update(changes)
    save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "change, error",
    [
        ({"format_version": str(FORMAT_VERSION + 1)}, sa.AdapterFormatError),
        ({"format": "something-else"}, sa.AdapterFormatError),
        ({"config": "{not json"}, sa.AdapterFormatError),
        ({"config": json.dumps({"num_classes": 3, "image_size": SIZE, "colour": 1})}, sa.AdapterFormatError),
        ({"config": json.dumps({"num_classes": 4, "image_size": SIZE})}, sa.AdapterFormatError),
        ({"config": json.dumps({"num_classes": 3, "image_size": SIZE, "backbone": "vit_b"})}, sa.AdapterMismatchError),
        ({"config": json.dumps({"num_classes": 3, "image_size": SIZE, "rank": 8})}, sa.AdapterFormatError),
        ({"base_fingerprint": "sha256:" + "0" * 64}, sa.BaseMismatchError),
    ],
)
def test_bad_adapters_are_refused_and_sam_is_unchanged(change, error, tmp_path):
    adapter = random_adapter(stock_sam(), CONFIGS["k3"], seed=7)
    path = _write_with_metadata(adapter, tmp_path / "bad.safetensors", **change)
    for patched_first in (False, True):
        sam = stock_sam()
        if patched_first:
            sa.patch(sam, random_adapter(stock_sam(), CONFIGS["decoder_lora"], seed=8))
        before = snapshot(sam)
        with pytest.raises(error) as info:
            sa.patch(sam, path)
        assert str(info.value)
        assert_unchanged(sam, before)


def test_base_mismatch_is_allowed_only_when_asked(tmp_path):
    adapter = random_adapter(stock_sam(seed=1), CONFIGS["k3"], seed=9)
    sam = stock_sam(seed=0)
    with pytest.raises(sa.BaseMismatchError, match="allow_base_mismatch"):
        sa.patch(sam, adapter)
    model = sa.patch(sam, adapter, allow_base_mismatch=True)
    assert model.config.num_classes == 3


def test_adapter_for_another_shape_is_refused():
    adapter = random_adapter(stock_sam(), CONFIGS["k3"], seed=10)
    tensors = dict(adapter.tensors)
    for k in [k for k in tensors if k.startswith("image_encoder.")]:
        tensors[k] = torch.randn(4, 32) if "lora_A" in k else torch.randn(32, 4)
    odd = sa.Adapter(adapter.config, tensors, adapter.base_fingerprint)
    sam = stock_sam()
    before = snapshot(sam)
    with pytest.raises(sa.AdapterMismatchError, match="wrong shape"):
        sa.patch(sam, odd)
    assert_unchanged(sam, before)
    extra = dict(adapter.tensors, **{"mask_decoder.unknown.weight": torch.zeros(2)})
    with pytest.raises(sa.AdapterMismatchError, match="unexpected"):
        sa.patch(sam, sa.Adapter(adapter.config, extra, adapter.base_fingerprint))
    assert_unchanged(sam, before)


def test_non_finite_tensors_are_refused():
    adapter = random_adapter(stock_sam(), CONFIGS["k3"], seed=11)
    tensors = dict(adapter.tensors)
    tensors["prompt_encoder.no_mask_embed.weight"] = torch.full_like(tensors["prompt_encoder.no_mask_embed.weight"], float("nan"))
    with pytest.raises(sa.AdapterFormatError, match="NaN"):
        sa.Adapter(adapter.config, tensors, adapter.base_fingerprint)


def test_config_validation_says_what_to_fix():
    with pytest.raises(ValueError, match="multiple of 16"):
        sa.AdapterConfig(image_size=500)
    with pytest.raises(ValueError, match="one name per foreground class"):
        sa.AdapterConfig(num_classes=2, class_names=["a"])
    with pytest.raises(ValueError, match="lo < hi"):
        sa.AdapterConfig(intensity_window=(10, -10))
    config = sa.AdapterConfig(num_classes=2, lora_blocks=[3, 1])
    assert config.lora_blocks == [1, 3] and config.class_names == ["class_1", "class_2"]
    assert sa.AdapterConfig.from_json(config.to_json()) == config


def test_segment_slices_and_volumes():
    model = sa.patch(stock_sam(), random_adapter(stock_sam(), CONFIGS["k3"], seed=12))
    rng = np.random.default_rng(0)
    volume = rng.random((3, 70, 90)).astype(np.float32)
    labels = model.segment(volume, batch_size=2)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert labels.max() <= 3
    # Slice by slice equals the whole volume, and equals argmax of the forward at image size.
    assert np.array_equal(model.segment(volume[1]), labels[1])
    x = torch.nn.functional.interpolate(torch.from_numpy(volume[:1, None]), (SIZE, SIZE), mode="bilinear",
                                        align_corners=False)
    with torch.no_grad():
        full = model(x.expand(-1, 3, -1, -1))["masks"].argmax(1, keepdim=True).float()
    expected = torch.nn.functional.interpolate(full, (70, 90), mode="nearest")[0, 0].numpy()
    assert np.array_equal(labels[0], expected)


def test_segment_applies_the_intensity_window():
    windowed = dataclasses.replace(CONFIGS["k3"], intensity_window=(-100.0, 300.0))
    adapter = random_adapter(stock_sam(), windowed, seed=13)
    model = sa.patch(stock_sam(), adapter)
    hu = np.random.default_rng(1).uniform(-1000, 1000, size=(40, 40))
    scaled = (np.clip(hu, -100, 300) + 100) / 400
    windowed = model.segment(hu)
    unwindowed = sa.patch(model, dataclasses.replace(adapter, config=dataclasses.replace(adapter.config, intensity_window=None)))
    assert np.array_equal(windowed, unwindowed.segment(scaled))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3, 4, 5)), "shape"),
        (np.zeros((0, 5)), "empty"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_segment_rejects_bad_input(bad, message):
    model = sa.inject(stock_sam(), CONFIGS["k3"])
    with pytest.raises(ValueError, match=message):
        model.segment(bad)


def test_inputs_outside_unit_range_need_a_window():
    model = sa.inject(stock_sam(), CONFIGS["k3"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.segment(np.full((8, 8), 255.0))


def test_forward_rejects_wrong_image_size():
    model = sa.inject(stock_sam(), CONFIGS["k3"])
    with pytest.raises(ValueError, match="images must be"):
        model(torch.rand(1, 3, 64, 64))
