"""Training with simulated clicks (`train --clicks`): the click sampler on hand-made masks, the
automatic loss untouched by the click rounds, the click loss learnt, and a trained adapter that
takes clicks; the command line's flag, kept by a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.cli.train import run_clicks
from samed_adapter.testing import random_adapter
from samed_adapter.testing.tiny import CONFIGS, SIZE, stock_sam
from samed_adapter.interactive.protocol import next_click
from samed_adapter.training.clicks import ClickTraining, choose_class, sample_click
from samed_adapter.training.config import TrainConfig
from samed_adapter.training.loop import train
from samed_adapter.training.losses import segmentation_loss
from samed_adapter.training.schedule import lr_at

PLAIN, CLICKS = CONFIGS["k3"], CONFIGS["clicks"]


class Shapes(torch.utils.data.Dataset):
    """Slices of three bright shapes (classes 1..3) on a dark noisy background, moving a little."""

    def __init__(self, count: int = 8, size: int = 64) -> None:
        rng = np.random.default_rng(0)
        self.items = []
        for i in range(count):
            label = np.zeros((size, size), np.int64)
            label[8:28, 6 + i : 36] = 1
            label[34:56, 16 : 48 - i] = 2
            label[4 + i // 2 : 16, 44:60] = 3
            image = 0.15 + 0.25 * label + 0.1 * rng.random((size, size))
            self.items.append({"image": image.astype(np.float32), "label": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def fresh(config: sa.AdapterConfig) -> sa.SAMed:
    torch.manual_seed(0)
    return sa.inject(stock_sam(), config)


def run_config(out: Path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(out), batch_size=4, max_epochs=4, stop_epoch=4, warmup_iters=2, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def steps(out: Path) -> list[dict]:
    return [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "iter" in e]


# --- the sampler ---------------------------------------------------------------------------------

def test_a_click_lies_in_the_error_region_and_is_positive_iff_the_class_is_missing_there():
    truth = np.zeros((12, 16), bool)
    truth[2:8, 3:10] = True
    mask = np.zeros_like(truth)
    mask[4:10, 6:14] = True  # overlaps the truth: FN on its left and top, FP on its right and bottom
    fn, fp = truth & ~mask, mask & ~truth
    rng = np.random.default_rng(0)
    seen, deepest = set(), 0
    for _ in range(400):
        row, col, positive, region = sample_click(mask, truth, rng)
        assert fn[row, col] or fp[row, col], (row, col)
        assert positive == bool(fn[row, col])
        # Its region: the connected errors of its kind that hold it (here FN and FP are one piece each).
        np.testing.assert_array_equal(region, fn if positive else fp)
        seen.add((row, col))
        deepest += (row, col, positive) == next_click(mask, truth)
    # Half at the protocol's point, the rest uniform over FN and FP: nearly every error pixel is
    # drawn, none of the correct ones.
    assert len(seen) > 0.9 * (fn | fp).sum()
    assert 0.4 < deepest / 400 < 0.6


def test_a_clicks_region_is_its_own_connected_piece_of_errors_of_its_kind():
    truth = np.zeros((10, 20), bool)
    truth[2:8, 2:6] = True
    truth[2:8, 12:16] = True  # two pieces of the class, both missing from the mask
    mask = np.zeros_like(truth)
    mask[0, 18:20] = True  # and a small extra piece
    rng = np.random.default_rng(2)
    for _ in range(100):
        row, col, positive, region = sample_click(mask, truth, rng)
        expected = np.zeros_like(truth)
        if positive:  # the missing piece the click is in, not the other one
            left = 2 if col < 10 else 12
            expected[2:8, left : left + 4] = True
        else:
            expected = mask
        np.testing.assert_array_equal(region, expected)


def test_without_error_a_click_is_positive_inside_the_truth_or_negative_where_there_is_none():
    truth = np.zeros((10, 10), bool)
    truth[3:5, 6:9] = True
    rng = np.random.default_rng(1)
    for _ in range(50):
        row, col, positive, region = sample_click(truth.copy(), truth, rng)
        assert truth[row, col] and positive and not region.any()
    empty = np.zeros_like(truth)
    assert not any(sample_click(empty, empty, rng)[2] for _ in range(20))


def test_the_refined_class_is_one_present_in_the_truth_or_the_prediction():
    truth = np.zeros((6, 6), np.int64)
    truth[1:3, 1:3] = 1
    prediction = np.zeros_like(truth)
    prediction[4:, 4:] = 3  # predicted, absent from the truth: its clicks are negative
    rng = np.random.default_rng(0)
    picked = {choose_class(prediction, truth, rng) for _ in range(100)}
    assert picked == {1, 3}
    assert choose_class(np.zeros_like(truth), np.zeros_like(truth), rng) == 0


# --- the loop ------------------------------------------------------------------------------------

def test_without_clicks_the_loss_is_the_automatic_loss_of_todays_loop(tmp_path):
    """One batch of all slices, no augmentation: the loop's logged losses must be those of a
    plain step (the model's forward, SAMed's loss, AdamW at the schedule's lr) on that batch."""
    data = Shapes(count=4)
    config = run_config(tmp_path, batch_size=4, max_epochs=3, stop_epoch=3, augment=False)
    train(fresh(PLAIN), data, config)
    logged = steps(tmp_path)

    from samed_adapter.training.augment import augment

    model = fresh(PLAIN)
    model.train()
    params = [p for p in model.sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.base_lr, betas=config.betas, weight_decay=config.weight_decay)
    for epoch in range(3):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(data))
        items = [augment(data[i]["image"], data[i]["label"], SIZE, np.random.default_rng(0), train=False) for i in order]
        images = torch.from_numpy(np.stack([x["image"] for x in items]))
        target = torch.from_numpy(np.stack([x["low_res_label"] for x in items]))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(max(epoch - 1, 0), base_lr=config.base_lr, warmup_iters=config.warmup_iters,
                                max_iters=3, power=config.power)
        loss = segmentation_loss(model(images)["low_res_logits"], target)
        assert [logged[epoch][k] for k in ("loss", "ce", "dice")] == [loss.total.item(), loss.ce.item(), loss.dice.item()]
        assert "click" not in logged[epoch]
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()


def test_click_rounds_leave_the_automatic_forward_as_it_is(tmp_path):
    """The first step of a click run sees the same weights as a plain run: its automatic parts must
    be equal to the last bit, and its loss the automatic loss plus the weighted click loss."""
    data = Shapes()
    train(fresh(PLAIN), data, run_config(tmp_path / "plain", stop_epoch=1))
    train(fresh(CLICKS), data, run_config(tmp_path / "clicks", stop_epoch=1, click_weight=0.5))
    plain, clicks = steps(tmp_path / "plain")[0], steps(tmp_path / "clicks")[0]
    assert (clicks["ce"], clicks["dice"]) == (plain["ce"], plain["dice"])
    assert clicks["click"] > 0
    assert clicks["loss"] == pytest.approx(plain["loss"] + 0.5 * clicks["click"], rel=1e-6)


def test_click_training_learns_to_refine_and_writes_an_adapter_that_takes_clicks(tmp_path):
    data = Shapes()
    config = run_config(tmp_path, max_epochs=30, stop_epoch=30, warmup_iters=4, base_lr=0.01)
    path = train(fresh(CLICKS), data, config)
    log = steps(tmp_path)
    first, last = np.mean([e["click"] for e in log[:5]]), np.mean([e["click"] for e in log[-5:]])
    assert last < 0.6 * first, (first, last)

    adapter = sa.Adapter.load(path)
    assert adapter.config.clicks
    embed = adapter.tensors["mask_decoder.class_embed.weight"]
    assert embed.shape == (CLICKS.num_classes + 1, stock_sam().mask_decoder.transformer_dim)
    # The clicks trained the prompt encoder's point embeddings too, not the box corners.
    assert "prompt_encoder.point_embeddings.1.weight" in adapter.tensors
    assert "prompt_encoder.point_embeddings.2.weight" not in adapter.tensors

    session = sa.patch(stock_sam(), path).interactive(np.stack([data[i]["image"] for i in range(3)]))
    auto = session.labels
    assert np.mean(auto[1] == data[1]["label"]) > 0.8  # the automatic labels were learnt too
    # A positive click for class 2 in class 1's shape: the decoder's refinement moves a region
    # (the session itself only gives the clicked voxel its class).
    assert auto[1, 18, 20] != 2
    after = session.click(2, (1, 18, 20), positive=True)
    assert after[1, 18, 20] == 2
    changed = np.argwhere(after != auto)
    assert set(changed[:, 0]) == {1} and len(changed) > 20


def test_click_loss_of_a_batch_is_the_sum_of_its_slices_losses():
    """Each slice draws its clicks from its own generator, so a batch split between processes
    (DDP) refines the same classes with the same clicks as the whole batch."""
    model = fresh(CLICKS)
    trainer = ClickTraining(model, rounds=2, seed=3)
    data = Shapes(count=4)
    from samed_adapter.training.augment import augment

    items = [augment(data[i]["image"], data[i]["label"], SIZE, np.random.default_rng(0), train=False) for i in range(4)]
    images = torch.from_numpy(np.stack([x["image"] for x in items]))
    target = torch.from_numpy(np.stack([x["low_res_label"] for x in items]))
    keys = torch.tensor([[0, i] for i in range(4)])
    with torch.no_grad():
        _, whole, count = trainer(images, target, keys)
        halves = [trainer(images[s], target[s], keys[s]) for s in (slice(0, 2), slice(2, 4))]
    assert count == 4 == sum(h[2] for h in halves)
    assert whole.item() == pytest.approx(sum(h[1].item() for h in halves), rel=1e-5)


def test_the_click_loss_reaches_the_class_embedding_the_prompt_path_and_the_lora_through_the_embeddings():
    model = fresh(CLICKS)
    model.train()
    data = Shapes(count=2)
    from samed_adapter.training.augment import augment
    from samed_adapter.training.clicks import mean_click_loss

    items = [augment(data[i]["image"], data[i]["label"], SIZE, None, train=False) for i in range(2)]
    images = torch.from_numpy(np.stack([x["image"] for x in items]))
    target = torch.from_numpy(np.stack([x["low_res_label"] for x in items]))
    _, loss_sum, count = ClickTraining(model, rounds=2, seed=0)(images, target, torch.tensor([[0, 0], [0, 1]]))
    mean_click_loss(loss_sum, count).backward()  # the click loss alone
    grads = {name: p.grad for name, p in model.sam.named_parameters() if p.grad is not None}
    assert grads["mask_decoder.class_embed.weight"][1:].abs().sum() > 0
    assert grads["mask_decoder.class_embed.weight"][0].abs().sum() == 0  # background is never refined
    for name in ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.mask_downscaling.6.weight"):
        assert grads[name].abs().sum() > 0, name
    # Negative or positive clicks, as the errors fall: one of the two point embeddings learns.
    points = [grads.get(f"prompt_encoder.point_embeddings.{i}.weight") for i in (0, 1)]
    assert sum(g.abs().sum() for g in points if g is not None) > 0
    # LoRA B starts at 0, so only B's gradient is non-zero at the first step.
    lora_b = [g for name, g in grads.items() if "image_encoder" in name and "lora_B" in name]
    assert lora_b and all(g.abs().sum() > 0 for g in lora_b)


class Crashing(torch.utils.data.Dataset):
    """`Shapes` that raise KeyboardInterrupt (a simulated crash) after `after` items."""

    def __init__(self, after: int) -> None:
        self.shapes, self.after, self.served = Shapes(), after, 0

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict:
        self.served += 1
        if self.served > self.after:
            raise KeyboardInterrupt("simulated crash")
        return self.shapes[index]


def test_a_click_run_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    whole = train(fresh(CLICKS), Shapes(), run_config(tmp_path / "whole"))
    config = run_config(tmp_path / "crashed", save_every_iters=1)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(CLICKS), Crashing(after=4 * 5 + 2), config)
    resumed = train(fresh(CLICKS), Shapes(), config, resume=True)
    a, b = sa.Adapter.load(whole), sa.Adapter.load(resumed)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert [e["click"] for e in steps(tmp_path / "crashed")] == [e["click"] for e in steps(tmp_path / "whole")]


def test_a_click_run_resumes_with_clicks_and_refuses_the_opposite_flag(tmp_path):
    from argparse import Namespace

    out = tmp_path / "run"
    out.mkdir()
    random_adapter(stock_sam(), CLICKS, seed=1).save(out / "adapter_last.safetensors")
    (out / "train_state.pt").write_bytes(b"")  # only its presence matters here
    args = dict(output=str(out), resume=True)
    assert run_clicks(Namespace(clicks=None, **args)) is True
    assert run_clicks(Namespace(clicks=True, **args)) is True
    with pytest.raises(ValueError, match="trained with clicks; resume it with --clicks"):
        run_clicks(Namespace(clicks=False, **args))
    # A plain run resumes plain, whatever the default for new runs.
    random_adapter(stock_sam(), PLAIN, seed=1).save(out / "adapter_last.safetensors")
    assert run_clicks(Namespace(clicks=None, **args)) is False
    with pytest.raises(ValueError, match="without clicks; resume it with --no-clicks"):
        run_clicks(Namespace(clicks=True, **args))
    # A new run: the flag, else the default.
    assert run_clicks(Namespace(clicks=False, output=str(tmp_path / "new"), resume=False)) is False


def test_cli_clicks_under_two_process_ddp_equal_one_process_with_the_whole_batch(tmp_path):
    """The click loss is summed over processes before its mean, like the Dice sums, and each slice
    draws its own clicks: 2 gloo processes end with the adapter of 1 process with the whole batch."""
    import os
    import subprocess
    import sys

    from samed_adapter.cli.demo import build_mni_task

    mni = build_mni_task(tmp_path / "mni")
    data = tmp_path / "data"
    for folder in ("imagesTr", "labelsTr"):
        (data / folder).mkdir(parents=True)
        os.symlink(mni / folder / "mni_train.nii.gz", data / folder / "mni_train.nii.gz")
    common = [str(Path(__file__).resolve().parents[1] / "examples" / "train.py"), "--format", "nifti", "--data",
              str(data), "--window", "none", "--num-classes", "2", "--sam-backbone", "tiny", "--random-sam-seed", "0",
              "--image-size", str(SIZE), "--batch-size", "8", "--max-epochs", "2", "--stop-epoch", "1",
              "--warmup-iters", "2", "--no-progress", "--clicks"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    *common, "-o", str(tmp_path / "ddp")], check=True, capture_output=True, timeout=300, env=env)
    subprocess.run([sys.executable, *common, "-o", str(tmp_path / "single")], check=True, capture_output=True,
                   timeout=300, env=env)
    ddp, single = (sa.Adapter.load(tmp_path / name / "adapter.safetensors") for name in ("ddp", "single"))
    assert ddp.config.clicks and single.config.clicks
    assert ddp.tensors.keys() == single.tensors.keys()
    for key in ddp.tensors:
        torch.testing.assert_close(ddp.tensors[key], single.tensors[key], rtol=0, atol=1e-5, msg=key)
    clicks = [[e["click"] for e in steps(tmp_path / name)] for name in ("ddp", "single")]
    assert len(clicks[0]) == 4 and clicks[0] == pytest.approx(clicks[1], rel=1e-5)
