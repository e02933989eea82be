"""SAMed on SAM 2: the same API and file format on stock sam2 models (random hiera_t weights)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("sam2", reason="SAM 2 is optional: SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0")

import samed_adapter as sa  # noqa: E402
from samed_adapter.cli import main as cli  # noqa: E402
from samed_adapter.cli.demo import MNI_CLASS_NAMES, MNI_PERCENTILES, build_mni_task  # noqa: E402
from samed_adapter.testing import assert_unchanged, random_adapter, same_tensors, snapshot  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

BACKBONE = "sam2.1_hiera_t"
SIZE = 128  # a multiple of 32, as Hiera needs
CONFIG = sa.AdapterConfig(num_classes=3, image_size=SIZE, intensity_window=None)


def stock_sam2(seed: int = 0):
    return sa.build_sam(BACKBONE, seed=seed)


@pytest.fixture(scope="module")
def adapters() -> dict[str, sa.Adapter]:
    sam2 = stock_sam2()
    variant = sa.AdapterConfig(num_classes=5, rank=2, image_size=SIZE, decoder_lora=True, intensity_window=None)
    return {"a": random_adapter(sam2, CONFIG, seed=1), "b": random_adapter(sam2, CONFIG, seed=2),
            "variant": random_adapter(sam2, variant, seed=3)}


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def predictor_masks(model) -> np.ndarray:
    """sam2's own image predictor on a fixed image and point: what a stock SAM 2 user runs."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    masks, _, _ = predictor.predict(point_coords=np.array([[500, 400]]), point_labels=np.array([1]),
                                    return_logits=True)
    return masks


def test_patch_then_unpatch_gives_the_stock_sam2_bit_for_bit(adapters):
    sam2 = stock_sam2()
    before, expected = snapshot(sam2), predictor_masks(sam2)
    model = sa.patch(sam2, adapters["a"])
    assert model.config.backbone == BACKBONE and sam2.image_size == SIZE
    with torch.no_grad():
        out = model(images())
    assert out["masks"].shape == (2, 4, SIZE, SIZE) and out["iou_predictions"].shape == (2, 4)
    sa.unpatch(sam2)
    assert_unchanged(sam2, before)
    assert sam2.image_size == 1024 and "pixel_mean" not in dict(sam2.named_buffers())
    np.testing.assert_array_equal(predictor_masks(sam2), expected)


def test_a_fresh_inject_leaves_the_encoder_stock():
    from samed_adapter.hosts import sam2 as sam2_host

    stock = stock_sam2()
    sam2 = stock_sam2()
    model = sa.inject(sam2, CONFIG)
    x = images()
    with torch.no_grad():
        live, live_high = model.encode(x)
        sam2_host.set_image_size(stock, SIZE)
        expected, expected_high = sam2_host.image_features(stock, x)  # the config's mean 0, std 1
    torch.testing.assert_close(live, expected, rtol=0, atol=1e-6)
    for a, b in zip(live_high, expected_high):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    trainable = {n for n, p in sam2.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith(("sam_prompt_encoder.", "sam_mask_decoder."))
                             for n in trainable)
    assert not any(n.startswith(("memory_", "obj_ptr")) for n in trainable)  # video parts stay frozen


def test_a_hot_swap_between_sam2_adapters_equals_a_fresh_patch(adapters, tmp_path):
    sam2 = stock_sam2()
    sa.patch(sam2, adapters["a"])
    path = adapters["variant"].save(tmp_path / "variant.safetensors")
    for adapter in (adapters["b"], sa.Adapter.load(path), adapters["a"]):
        model = sa.patch(sam2, adapter)
        fresh = sa.patch(stock_sam2(), adapter)
        with torch.no_grad():
            torch.testing.assert_close(model(images())["masks"], fresh(images())["masks"], rtol=0, atol=0)
        assert same_tensors(model.adapter(), adapter)


def test_merge_equals_unmerged(adapters):
    model = sa.patch(stock_sam2(), adapters["a"])
    with torch.no_grad():
        unmerged = model(images())["masks"]
        merged = model.merge()(images())["masks"]
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert not torch.equal(merged, unmerged)  # it really ran the folded weights


def test_a_mixed_batch_of_sam2_adapters_equals_each_image_alone(adapters):
    model = sa.patch(stock_sam2(), adapters["a"], adapter_name="a")
    model.load_adapter(adapters["b"], "b")
    model.load_adapter(adapters["variant"], "variant")
    names = ["b", "variant", "a", "b"]
    x = images(batch=4, seed=3)
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
    for b, name in enumerate(names):
        with torch.no_grad():
            alone = sa.patch(stock_sam2(), adapters[name])(x[b : b + 1])
        for key in ("masks", "iou_predictions"):
            torch.testing.assert_close(mixed[key][b], alone[key][0], rtol=1e-5, atol=1e-5)


def test_sam_and_sam2_adapters_are_refused_on_each_other(adapters):
    sam = sa.build_sam("tiny", seed=0)
    sam_adapter = random_adapter(sam, sa.AdapterConfig(num_classes=3, image_size=SIZE), seed=4)
    before = snapshot(sam)
    with pytest.raises(sa.AdapterMismatchError, match=f"for a {BACKBONE} SAM 2 but this SAM is tiny; build "
                                                      r"sam2\.build_sam\.build_sam2"):
        sa.patch(sam, adapters["a"])
    assert_unchanged(sam, before)
    sam2 = stock_sam2()
    before = snapshot(sam2)
    with pytest.raises(sa.AdapterMismatchError, match=f"for a tiny SAM but this SAM 2 is {BACKBONE}"):
        sa.patch(sam2, sam_adapter)
    with pytest.raises(sa.AdapterMismatchError, match="multiple of 32"):
        sa.inject(sam2, sa.AdapterConfig(num_classes=3, image_size=144))
    assert_unchanged(sam2, before)


def test_a_few_training_steps_on_mni_lower_the_loss(tmp_path):
    from samed_adapter.training import NiftiSlices
    from samed_adapter.training.loop import TrainConfig, train

    data = build_mni_task(tmp_path / "mni")
    torch.manual_seed(0)
    config = sa.AdapterConfig(num_classes=2, image_size=64, class_names=list(MNI_CLASS_NAMES),
                              intensity_window=None, intensity_percentiles=MNI_PERCENTILES)
    model = sa.inject(stock_sam2(), config)
    slices = NiftiSlices(data, ["mni_train"], window=None, percentiles=MNI_PERCENTILES)
    out = tmp_path / "run"
    path = train(model, slices, TrainConfig(output_dir=str(out), batch_size=4, max_epochs=2, stop_epoch=2,
                                            warmup_iters=2, progress=False))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) >= 8
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    adapter = sa.Adapter.load(path)
    assert adapter.config.backbone == BACKBONE
    assert any(k.startswith("image_encoder.trunk.blocks.") for k in adapter.tensors)


def test_cli_segment_writes_sam2_labels_on_the_input_grid(adapters, tmp_path):
    data = build_mni_task(tmp_path / "mni")
    scan = data / "imagesTr" / "mni_val.nii.gz"
    adapter = sa.Adapter(
        sa.AdapterConfig(**{**adapters["a"].config.to_dict(), "intensity_percentiles": MNI_PERCENTILES}),
        adapters["a"].tensors, adapters["a"].base_fingerprint)
    path = adapter.save(tmp_path / "adapter.safetensors")
    code = cli.main(["segment", "--sam-backbone", BACKBONE, "--random-sam-seed", "0", "--adapter", str(path),
                     str(scan), "-o", str(tmp_path / "labels")])
    assert code == 0
    labels = nib.load(tmp_path / "labels" / "mni_val.nii.gz")
    image = nib.load(scan)
    assert labels.shape == image.shape and np.allclose(labels.affine, image.affine)
    model = sa.patch(stock_sam2(), path)
    np.testing.assert_array_equal(np.asarray(labels.dataobj), np.asarray(model.segment(scan).dataobj))
    # The same SAM 2 as a checkpoint file (Meta's layout: the state dict under "model").
    checkpoint = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": stock_sam2().state_dict()}, checkpoint)
    code = cli.main(["segment", "--sam", str(checkpoint), "--sam2-config", BACKBONE, "--adapter", str(path),
                     str(scan), "-o", str(tmp_path / "from_checkpoint")])
    assert code == 0
    again = nib.load(tmp_path / "from_checkpoint" / "mni_val.nii.gz")
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(labels.dataobj))
