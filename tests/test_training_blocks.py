"""Tests for samed_adapter.training: augmentation, loss (incl. 2-process gloo), schedule, readers."""

from __future__ import annotations

import datetime
import os
import pickle
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import ndimage

from samed_adapter.training import (
    SYNAPSE_LABEL_MAP,
    LossOutput,
    NiftiSlices,
    NiftiVolumes,
    SynapseSlices,
    SynapseVolumes,
    all_reduce_sum,
    augment,
    dice_loss,
    find_nifti_cases,
    lr_at,
    segmentation_loss,
    set_lr,
    split_cases,
)

# ---------------------------------------------------------------------------------------------
# augmentation


def _slice(h: int = 40, w: int = 56, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random((h, w)), 2).astype(np.float32)
    image = (image - image.min()) / (image.max() - image.min())
    label = np.zeros((h, w), dtype=np.int64)
    label[5:20, 8:30] = 3
    label[22:35, 30:50] = 7
    return image, label


def test_augment_shapes_dtypes_and_label_values() -> None:
    image, label = _slice()
    seen_changes = 0
    for seed in range(12):
        out = augment(image, label, 64, np.random.default_rng(seed))
        assert out["image"].shape == (3, 64, 64) and out["image"].dtype == np.float32
        assert out["label"].shape == (64, 64) and out["label"].dtype == np.int64
        assert out["low_res_label"].shape == (16, 16) and out["low_res_label"].dtype == np.int64
        np.testing.assert_array_equal(out["image"][0], out["image"][2])
        # Nearest neighbour everywhere: no new label values (0 is already present).
        assert set(np.unique(out["label"])) <= {0, 3, 7}
        assert set(np.unique(out["low_res_label"])) <= {0, 3, 7}
        plain = augment(image, label, 64, None, train=False)
        seen_changes += not np.array_equal(out["label"], plain["label"])
    assert seen_changes >= 4  # about 5/8 of the draws transform the slice
    assert augment(image, label, 224, np.random.default_rng(0))["low_res_label"].shape == (56, 56)


def test_augment_reproducible_and_uses_only_the_given_generator() -> None:
    image, label = _slice()
    np.random.seed(1)
    a = augment(image, label, 32, np.random.default_rng(123))
    np.random.seed(2)
    b = augment(image, label, 32, np.random.default_rng(123))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    outs = [augment(image, label, 32, np.random.default_rng(s))["label"] for s in range(8)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_augment_matches_the_spec_draws() -> None:
    image, label = _slice()
    for seed in range(10):
        rng = np.random.default_rng(seed)
        draw = np.random.default_rng(seed)
        if draw.random() < 0.5:
            k, axis = int(draw.integers(0, 4)), int(draw.integers(0, 2))
            img, lab = np.flip(np.rot90(image, k), axis), np.flip(np.rot90(label, k), axis)
        elif draw.random() < 0.5:
            angle = int(draw.integers(-20, 20))
            img = ndimage.rotate(image, angle, order=0, reshape=False)
            lab = ndimage.rotate(label, angle, order=0, reshape=False)
        else:
            img, lab = image, label
        h, w = img.shape
        out = augment(image, label, 48, rng)
        np.testing.assert_array_equal(out["image"][1], ndimage.zoom(np.ascontiguousarray(img), (48 / h, 48 / w), order=3))
        np.testing.assert_array_equal(out["label"], ndimage.zoom(np.ascontiguousarray(lab), (48 / h, 48 / w), order=0))


def test_augment_eval_is_exactly_the_resize() -> None:
    image, label = _slice()
    out = augment(image, label, 64, None, train=False)
    np.testing.assert_array_equal(out["image"][0], ndimage.zoom(image, (64 / 40, 64 / 56), order=3))
    np.testing.assert_array_equal(out["label"], ndimage.zoom(label, (64 / 40, 64 / 56), order=0))
    np.testing.assert_array_equal(out["low_res_label"], ndimage.zoom(out["label"], (16 / 64, 16 / 64), order=0))
    same = augment(image[:32, :32], label[:32, :32], 32, None, train=False)
    np.testing.assert_array_equal(same["image"][0], image[:32, :32])


def test_augment_rejects_bad_input() -> None:
    image, label = _slice()
    with pytest.raises(ValueError, match="multiple of 16"):
        augment(image, label, 50, np.random.default_rng(0))
    with pytest.raises(ValueError, match="same shape"):
        augment(image, label[:10], 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="non-integer"):
        augment(image, image, 64, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        augment(image, label, 64, 3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# loss


def _logits_and_target(b: int = 4, k: int = 3, h: int = 8, w: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k + 1, h, w, generator=g, dtype=torch.float64)
    target = torch.randint(0, k + 1, (b, h, w), generator=g)
    return logits, target


def _hand_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, 1)
    losses = []
    for c in range(logits.shape[1]):
        t = (target == c).to(p.dtype)
        inter = (p[:, c] * t).sum()
        losses.append(1 - (2 * inter + 1e-5) / ((p[:, c] ** 2).sum() + (t**2).sum() + 1e-5))
    return torch.stack(losses)


def test_loss_parts_match_reference_formulas() -> None:
    logits, target = _logits_and_target()
    out = segmentation_loss(logits, target)
    assert isinstance(out, LossOutput) and out.grad_scale == 1.0
    torch.testing.assert_close(out.ce, F.cross_entropy(logits, target), rtol=0, atol=1e-12)
    hand = _hand_dice(logits, target)
    torch.testing.assert_close(out.dice_per_class, hand, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.dice, hand.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.total, 0.2 * out.ce + 0.8 * out.dice, rtol=0, atol=1e-12)
    other = segmentation_loss(logits, target, ce_weight=0.5, dice_weight=0.25)
    torch.testing.assert_close(other.total, 0.5 * out.ce + 0.25 * out.dice, rtol=0, atol=1e-12)
    mean, per_class = dice_loss(logits, target)
    torch.testing.assert_close(per_class, hand, rtol=0, atol=1e-12)
    # Half-precision logits are summed in float32.
    half = segmentation_loss(logits.to(torch.bfloat16), target)
    assert half.total.dtype == torch.float32


def test_perfect_prediction_gives_near_zero_dice() -> None:
    _, target = _logits_and_target(k=4)
    logits = F.one_hot(target, 5).permute(0, 3, 1, 2).double() * 50.0
    out = segmentation_loss(logits, target)
    assert float(out.dice) < 1e-6 and float(out.ce) < 1e-12
    # A class absent from target and prediction: (0 + eps)/(0 + eps), so loss 0, not 1.
    no_class_4 = target.clamp(max=3)
    out = segmentation_loss(F.one_hot(no_class_4, 5).permute(0, 3, 1, 2).double() * 50.0, no_class_4)
    assert float(out.dice_per_class[4]) < 1e-6


def test_loss_rejects_bad_targets() -> None:
    logits, target = _logits_and_target()
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        segmentation_loss(logits, target + 1)
    with pytest.raises(ValueError, match="low-resolution"):
        segmentation_loss(logits, target[:, :4])
    with pytest.raises(TypeError, match="integer"):
        segmentation_loss(logits, target.float())
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce_sum()


def _ddp_worker(rank: int, world: int, store_path: str, tmp: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        data = torch.load(os.path.join(tmp, "data.pt"))
        model = torch.nn.Conv2d(5, 4, 1).double()
        model.load_state_dict(data["state"])
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        b = data["x"].shape[0] // world
        x, target = data["x"][rank * b : (rank + 1) * b], data["target"][rank * b : (rank + 1) * b]
        logits = ddp(x)
        logits.retain_grad()
        out = segmentation_loss(logits, target, reduce_fn=all_reduce_sum())
        (out.total * out.grad_scale).backward()
        torch.save(
            {
                "total": out.total.detach(),
                "ce": out.ce.detach(),
                "dice": out.dice.detach(),
                "logits_grad": logits.grad,
                "param_grads": [p.grad for p in model.parameters()],
            },
            os.path.join(tmp, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
    # The results are saved. Gloo's threads can abort the interpreter's own teardown after this
    # ("terminate called without an active exception", about one run in four on 2 cores), which
    # the parent would take for a crash: leave without that teardown.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_distributed_loss_equals_full_batch_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(5, 4, 1).double()
    x = torch.randn(4, 5, 8, 6, dtype=torch.float64)
    target = torch.randint(0, 4, (4, 8, 6))
    target[:2] = target[:2].clamp(max=2)  # class 3 only in the second half: sums must be global
    torch.save({"state": model.state_dict(), "x": x, "target": target}, tmp_path / "data.pt")

    logits = model(x)
    logits.retain_grad()
    ref = segmentation_loss(logits, target)
    ref.total.backward()

    # spawn, not fork: autograd already ran in this process, and forked children can deadlock in backward.
    ctx = torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the 2-process gloo run did not finish in 120 s")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, res in enumerate(results):
        for key in ("total", "ce", "dice"):
            torch.testing.assert_close(res[key], getattr(ref, key).detach(), rtol=0, atol=1e-12)
        # Each process receives N x its share of the gradient; DDP's 1/N averaging removes it.
        torch.testing.assert_close(res["logits_grad"] / 2, logits.grad[2 * r : 2 * r + 2], rtol=0, atol=1e-6)
        for got, want in zip(res["param_grads"], model.parameters()):
            torch.testing.assert_close(got, want.grad, rtol=0, atol=1e-6)
    # A naive per-process loss (no reduce_fn) would differ: the check above is not vacuous.
    naive = segmentation_loss(logits[:2].detach(), target[:2]).total
    assert abs(float(naive) - float(ref.total.detach())) > 1e-3


# ---------------------------------------------------------------------------------------------
# schedule


def test_lr_schedule_values() -> None:
    kw = dict(base_lr=0.005, warmup_iters=250, max_iters=1000, power=0.9)
    assert lr_at(0, **kw) == pytest.approx(0.005 / 250, rel=1e-12)
    assert lr_at(249, **kw) == pytest.approx(0.005, rel=1e-12)
    assert lr_at(250, **kw) == pytest.approx(0.005, rel=1e-12)
    assert lr_at(999, **kw) == pytest.approx(0.005 * (1 - 749 / 1000) ** 0.9, rel=1e-12)
    assert lr_at(999, **{**kw, "power": 7.0}) == pytest.approx(0.005 * 0.251**7, rel=1e-12)
    assert lr_at(1250, **kw) == 0.0 and lr_at(5000, **kw) == 0.0
    assert lr_at(0, base_lr=0.01, warmup_iters=0, max_iters=10, power=1.0) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="max_iters"):
        lr_at(0, max_iters=0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    set_lr(opt, 0.003)
    assert [g["lr"] for g in opt.param_groups] == [0.003, 0.003]


# ---------------------------------------------------------------------------------------------
# Synapse readers


def _resize_to_32(sample: dict) -> dict:
    return {**sample, **augment(sample["image"], sample["label"], 32, None, train=False)}


def test_synapse_slices_and_volumes(tmp_path: Path) -> None:
    (tmp_path / "train_npz").mkdir()
    (tmp_path / "lists_Synapse").mkdir()
    rng = np.random.default_rng(0)
    names = ["case0005_slice000", "case0005_slice001", "case0010_slice042"]
    arrays = {}
    for name in names:
        image = rng.random((12, 10)).astype(np.float32)
        label = rng.integers(0, 9, (12, 10)).astype(np.float32)
        np.savez(tmp_path / "train_npz" / f"{name}.npz", image=image, label=label)
        arrays[name] = (image, label)
    (tmp_path / "lists_Synapse" / "train.txt").write_text("\n".join(names) + "\n")
    ds = SynapseSlices(tmp_path, "lists_Synapse/train.txt")
    assert len(ds) == 3
    item = ds[2]
    assert (item["case"], item["slice"]) == ("case0010", 42)
    assert item["label"].dtype == np.int64 and item["image"].dtype == np.float32
    np.testing.assert_array_equal(item["image"], arrays[names[2]][0])
    np.testing.assert_array_equal(item["label"], arrays[names[2]][1].astype(np.int64))
    aug = SynapseSlices(tmp_path, tmp_path / "lists_Synapse" / "train.txt", transform=_resize_to_32)[0]
    assert aug["image"].shape == (3, 32, 32) and aug["case"] == "case0005"

    (tmp_path / "lists_Synapse" / "bad.txt").write_text("case0099_slice000\n")
    with pytest.raises(FileNotFoundError, match="case0099_slice000.npz"):
        SynapseSlices(tmp_path, "lists_Synapse/bad.txt")
    with pytest.raises(FileNotFoundError, match="test_vol_h5"):
        SynapseVolumes(tmp_path, "lists_Synapse/test_vol.txt")

    (tmp_path / "test_vol_h5").mkdir()
    vol = rng.random((4, 12, 10)).astype(np.float32)
    lab = rng.integers(0, 9, (4, 12, 10)).astype(np.uint8)
    with h5py.File(tmp_path / "test_vol_h5" / "case0008.npy.h5", "w") as f:
        f["image"], f["label"] = vol, lab
    (tmp_path / "lists_Synapse" / "test_vol.txt").write_text("case0008\n")
    vds = SynapseVolumes(tmp_path, "lists_Synapse/test_vol.txt")
    item = vds[0]
    assert len(vds) == 1 and item["case"] == "case0008" and item["label"].dtype == np.int64
    np.testing.assert_array_equal(item["image"], vol)
    np.testing.assert_array_equal(item["label"], lab)

    np.savez(tmp_path / "train_npz" / "case0005_slice000.npz", image=rng.random((12, 10)) * 400 - 100, label=np.zeros((12, 10)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ds[0]


# ---------------------------------------------------------------------------------------------
# NIfTI readers on nilearn's MNI152 template (package data, no download)


@pytest.fixture(scope="module")
def mni_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    gm = np.asanyarray(datasets.load_mni152_gm_template(resolution=2).dataobj)
    root = tmp_path_factory.mktemp("mni")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    label = np.zeros(gm.shape, dtype=np.uint8)
    label[gm > 0.2] = 3
    label[gm > 0.5] = 7
    label[(np.asanyarray(template.dataobj) > 0.8) & (gm <= 0.2)] = 11
    # nnU-Net naming for one case, MSD naming for the other; plus a macOS "._" file to ignore.
    nib.save(template, root / "imagesTr" / "brain_001_0000.nii.gz")
    nib.save(nib.Nifti1Image(label, template.affine), root / "labelsTr" / "brain_001.nii.gz")
    flipped = np.asanyarray(template.dataobj)[::-1].astype(np.float32) * 1000.0 - 200.0
    nib.save(nib.Nifti1Image(flipped, template.affine), root / "imagesTr" / "brain_002.nii.gz")
    nib.save(nib.Nifti1Image(label[::-1].copy(), template.affine), root / "labelsTr" / "brain_002.nii.gz")
    (root / "imagesTr" / "._brain_002.nii.gz").write_bytes(b"junk")
    return root


def _full(root: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    name = "brain_001_0000" if case == "brain_001" else case
    image = np.asarray(nib.load(root / "imagesTr" / f"{name}.nii.gz").dataobj, dtype=np.float64)
    label = np.asarray(nib.load(root / "labelsTr" / f"{case}.nii.gz").dataobj).astype(np.int64)
    return image, label


def test_nifti_slices_equal_volume_slices(mni_root: Path) -> None:
    assert find_nifti_cases(mni_root) == ["brain_001", "brain_002"]
    ds = NiftiSlices(mni_root, window=(0.2, 0.8))
    assert len(ds) == 2 * 95
    image, label = _full(mni_root, "brain_001")
    assert set(np.unique(label)) == {0, 3, 7, 11}
    for k in (0, 40, 94):
        item = ds[k]
        assert (item["case"], item["slice"]) == ("brain_001", k)
        # As stored, slice k is data[:, :, k].T: rows along j, as SAMed's Synapse slices and `segment`.
        expect = (np.clip(image[..., k], 0.2, 0.8) - 0.2) / 0.6
        np.testing.assert_allclose(item["image"], expect.T, rtol=0, atol=1e-6)
        assert item["image"].dtype == np.float32 and item["image"].shape == (117, 99)
        np.testing.assert_array_equal(item["label"], label[..., k].T)
    assert ds[95 + 50]["case"] == "brain_002" and ds[-1]["slice"] == 94
    sagittal = NiftiSlices(mni_root, ["brain_001"], window=None, slice_axis=0)
    assert len(sagittal) == 99
    np.testing.assert_allclose(sagittal[30]["image"], image[30].T, rtol=0, atol=1e-6)
    with pytest.raises(IndexError):
        ds[190]


def test_nifti_index_is_lazy(mni_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nibabel.arrayproxy import ArrayProxy

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("voxel data read")

    with monkeypatch.context() as m:
        m.setattr(ArrayProxy, "__array__", refuse)
        m.setattr(ArrayProxy, "__getitem__", refuse)
        m.setattr(ArrayProxy, "get_unscaled", refuse)
        ds = NiftiSlices(mni_root, label_map=SYNAPSE_LABEL_MAP)
        assert len(ds) == 190
    # Window mode reads one slice per item, never the whole volume.
    with monkeypatch.context() as m:
        m.setattr(ArrayProxy, "__array__", refuse)
        assert ds[10]["image"].shape == (117, 99)
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers started with spawn pickle it
    np.testing.assert_array_equal(clone[10]["label"], ds[10]["label"])


def test_nifti_percentiles_and_label_map(mni_root: Path) -> None:
    image, label = _full(mni_root, "brain_002")
    lo, hi = np.percentile(image, [0.5, 99.5])
    ds = NiftiSlices(mni_root, ["brain_002"], window=None, percentiles=(0.5, 99.5), label_map={3: 1, 7: 2})
    item = ds[47]
    np.testing.assert_allclose(item["image"], ((np.clip(image[..., 47], lo, hi) - lo) / (hi - lo)).T, rtol=0, atol=1e-6)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    expect = np.select([label[..., 47] == 3, label[..., 47] == 7], [1, 2], 0).T
    np.testing.assert_array_equal(item["label"], expect)  # 11 is unmapped -> 0
    assert set(np.unique(item["label"])) == {0, 1, 2}
    assert ds._bounds["brain_002"] == pytest.approx((lo, hi))

    vols = NiftiVolumes(mni_root, window=(-125, 275), label_map=SYNAPSE_LABEL_MAP, slice_axis=1)
    vol = vols[1]
    # Cut along j: slices (j, k, i), rows along k, columns along i.
    assert vol["case"] == "brain_002" and vol["image"].shape == (117, 95, 99)
    np.testing.assert_allclose(vol["image"], ((np.clip(image, -125, 275) + 125) / 400).transpose(1, 2, 0), rtol=0,
                               atol=1e-6)
    synapse = np.select([label == 3, label == 7, label == 11], [3, 6, 8], 0)  # raw 3 -> 3, 7 -> 6, 11 -> 8
    np.testing.assert_array_equal(vol["label"], synapse.transpose(1, 2, 0))
    np.testing.assert_array_equal(vols.to_stored("brain_002", vol["label"]), synapse)
    np.testing.assert_allclose(vol["spacing"], [2.0, 2.0, 2.0])
    assert vol["affine"].shape == (4, 4)
    slices = NiftiSlices(mni_root, ["brain_002"], window=(-125, 275), label_map=SYNAPSE_LABEL_MAP, slice_axis=1)
    np.testing.assert_array_equal(slices[60]["image"], vol["image"][60])


def test_nifti_errors(mni_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="imagesTr"):
        NiftiSlices(tmp_path)
    with pytest.raises(FileNotFoundError, match="brain_999"):
        NiftiSlices(mni_root, ["brain_999"])
    with pytest.raises(ValueError, match="not both"):
        NiftiSlices(mni_root, window=(0, 1), percentiles=(1, 99))
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine), tmp_path / "imagesTr" / "a.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"labelsTr/a\.nii\.gz"):
        NiftiSlices(tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 7), np.uint8), affine), tmp_path / "labelsTr" / "a.nii.gz")
    with pytest.raises(ValueError, match="must match"):
        NiftiVolumes(tmp_path)


def test_split_cases_deterministic_and_disjoint() -> None:
    cases = [f"case{i:03d}" for i in range(20)]
    train, val = split_cases(cases, 0.2, seed=7)
    assert len(val) == 4 and len(train) == 16
    assert not set(train) & set(val) and sorted(train + val) == cases
    assert split_cases(cases[::-1], 0.2, seed=7) == (train, val)
    assert split_cases(cases, 0.2, seed=8) != (train, val)
    assert split_cases(cases, 0.0, seed=7) == (cases, [])
    assert len(split_cases(cases[:3], 0.1, seed=0)[1]) == 1
    with pytest.raises(ValueError, match="duplicate"):
        split_cases(["a", "a", "b"], 0.5, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_cases(cases, 1.0, seed=0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
