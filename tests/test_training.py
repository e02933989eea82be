"""The training loop on real data (MNI152 from nilearn), resume, DDP equivalence, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.cli.demo import MNI_CLASS_NAMES, MNI_PERCENTILES, best_constant_dice, build_mni_task
from samed_adapter.evaluation.evaluate import evaluate, predict_volume_samed
from samed_adapter.training import NiftiSlices, NiftiVolumes, lr_at
from samed_adapter.training.loop import NonFiniteLossError, TrainConfig, iterations_per_epoch, train

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128


@pytest.fixture(scope="module")
def mni(tmp_path_factory) -> Path:
    return build_mni_task(tmp_path_factory.mktemp("mni"))


def fresh_model(seed: int = 0) -> sa.SAMed:
    torch.manual_seed(seed)
    config = sa.AdapterConfig(num_classes=2, image_size=SIZE, class_names=list(MNI_CLASS_NAMES), intensity_window=None)
    return sa.inject(sa.build_sam("tiny", seed=0), config)


def run_config(out: Path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(out), batch_size=8, max_epochs=3, stop_epoch=3, warmup_iters=4, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def read_log(out: Path) -> list[dict]:
    entries = []
    for line in (out / "log.jsonl").read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        if "iter" in entry:
            entries.append(entry)
    return entries


def assert_adapters_equal(a: Path, b: Path, atol: float = 0.0) -> None:
    x, y = sa.Adapter.load(a), sa.Adapter.load(b)
    assert x.tensors.keys() == y.tensors.keys()
    for k in x.tensors:
        if atol == 0.0:
            assert torch.equal(x.tensors[k], y.tensors[k]), k
        else:
            torch.testing.assert_close(x.tensors[k], y.tensors[k], rtol=0, atol=atol, msg=k)


def test_training_on_mni_learns_grey_and_white_matter(mni, tmp_path):
    model = fresh_model()
    slices = NiftiSlices(mni, ["mni_train"], window=None, percentiles=MNI_PERCENTILES)
    path = train(model, slices, run_config(tmp_path, max_epochs=20, stop_epoch=20, warmup_iters=10))
    log = read_log(tmp_path)
    assert len(log) == 20 * iterations_per_epoch(len(slices), 8)
    first, last = np.mean([e["loss"] for e in log[:5]]), np.mean([e["loss"] for e in log[-5:]])
    assert last < 0.7 * first
    # Held-out slices, scored after patching the saved adapter onto a new SAM.
    model = sa.patch(sa.build_sam("tiny", seed=0), path)
    volumes = NiftiVolumes(mni, ["mni_val"], window=None, percentiles=MNI_PERCENTILES)
    summary, _ = evaluate(model, volumes)
    trivial = best_constant_dice(volumes[0]["image"], volumes[0]["label"], 2)
    assert summary.mean_dice > trivial + 0.1, (summary.class_dice, trivial)
    assert all(d > 0.3 for d in summary.class_dice)


def test_learning_rate_follows_the_published_schedule(mni, tmp_path):
    slices = NiftiSlices(mni, ["mni_train"], window=None, percentiles=MNI_PERCENTILES)
    config = run_config(tmp_path, max_epochs=4, stop_epoch=2, base_lr=0.01, warmup_iters=5, power=0.9)
    train(fresh_model(), slices, config)
    per_epoch = iterations_per_epoch(len(slices), 8)
    lrs = [e["lr"] for e in read_log(tmp_path)]
    assert len(lrs) == 2 * per_epoch
    for j, lr in enumerate(lrs):  # step j runs at lr_at(j - 1): the published loop sets it after each step
        assert lr == pytest.approx(lr_at(max(j - 1, 0), base_lr=0.01, warmup_iters=5, max_iters=4 * per_epoch, power=0.9))


class CrashingSlices(torch.utils.data.Dataset):
    """Slices that raise (a simulated crash) or return NaN after `after` items."""

    def __init__(self, slices, after: int, mode: str) -> None:
        self.slices, self.after, self.mode, self.served = slices, after, mode, 0

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index):
        self.served += 1
        item = self.slices[index]
        if self.served > self.after:
            if self.mode == "crash":
                raise KeyboardInterrupt("simulated crash")
            item = dict(item, image=np.full_like(item["image"], np.nan))
        return item


def test_crash_then_resume_equals_an_uninterrupted_run(mni, tmp_path):
    slices = NiftiSlices(mni, ["mni_train"], window=None, percentiles=MNI_PERCENTILES)
    whole = train(fresh_model(), slices, run_config(tmp_path / "whole"))
    crashed = tmp_path / "crashed"
    config = run_config(crashed, save_every_iters=3)
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), CrashingSlices(slices, after=8 * 7 + 3, mode="crash"), config)
    saved = torch.load(crashed / "train_state.pt", weights_only=True)["iteration"]
    assert 0 < saved < 3 * iterations_per_epoch(len(slices), 8)
    resumed = train(fresh_model(), slices, config, resume=True)
    assert_adapters_equal(whole, resumed)
    assert [e["iter"] for e in read_log(crashed)] == list(range(1, len(read_log(tmp_path / "whole")) + 1))


def test_sigkill_then_resume_equals_an_uninterrupted_run(mni, tmp_path):
    args = [sys.executable, str(ROOT / "examples" / "train.py"), "--format", "nifti", "--data", str(mni),
            "--window", "none", "--num-classes", "2", "--sam-backbone", "tiny", "--random-sam-seed", "0",
            "--image-size", str(SIZE), "--batch-size", "8", "--max-epochs", "3", "--stop-epoch", "3",
            "--warmup-iters", "4", "--save-every-iters", "2", "--no-progress"]
    # Only mni_train: keep the held-out case out of this run.
    data = tmp_path / "data"
    for folder in ("imagesTr", "labelsTr"):
        (data / folder).mkdir(parents=True)
        os.symlink(mni / folder / "mni_train.nii.gz", data / folder / "mni_train.nii.gz")
    args[args.index(str(mni))] = str(data)
    subprocess.run(args + ["-o", str(tmp_path / "whole")], check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    total = len(read_log(tmp_path / "whole"))
    rng = np.random.default_rng(7)
    # Kill it at several random moments (each run resuming the last), then let it finish.
    for kill_at in sorted(rng.choice(np.arange(2, total - 1), size=3, replace=False)):
        resume = ["--resume"] if (killed / "log.jsonl").exists() else []
        proc = subprocess.Popen(args + ["-o", str(killed)] + resume, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (killed / "log.jsonl").exists() and len(read_log(killed)) >= kill_at:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (killed / "adapter.safetensors").exists()
    subprocess.run(args + ["-o", str(killed), "--resume"], check=True, capture_output=True, timeout=300)
    assert_adapters_equal(tmp_path / "whole" / "adapter.safetensors", killed / "adapter.safetensors")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(mni, tmp_path):
    slices = NiftiSlices(mni, ["mni_train"], window=None, percentiles=MNI_PERCENTILES)
    config = run_config(tmp_path, save_every=1)
    per_epoch = iterations_per_epoch(len(slices), 8)
    with pytest.raises(NonFiniteLossError, match=f"the checkpoint after step {per_epoch} is kept"):
        train(fresh_model(), CrashingSlices(slices, after=8 * (per_epoch + 1), mode="nan"), config)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["iteration"] == per_epoch
    adapter = sa.Adapter.load(tmp_path / "adapter_epoch001.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.tensors.values())
    assert not (tmp_path / "adapter.safetensors").exists()


def test_two_process_ddp_equals_one_process_with_the_whole_batch(mni, tmp_path):
    data = tmp_path / "data"
    for folder in ("imagesTr", "labelsTr"):
        (data / folder).mkdir(parents=True)
        os.symlink(mni / folder / "mni_train.nii.gz", data / folder / "mni_train.nii.gz")
    common = [str(ROOT / "examples" / "train.py"), "--format", "nifti", "--data", str(data), "--window", "none",
              "--num-classes", "2", "--sam-backbone", "tiny", "--random-sam-seed", "0", "--image-size", str(SIZE),
              "--batch-size", "8", "--max-epochs", "2", "--stop-epoch", "2", "--warmup-iters", "4", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    *common, "-o", str(tmp_path / "ddp")], check=True, capture_output=True, timeout=300, env=env)
    subprocess.run([sys.executable, *common, "-o", str(tmp_path / "single")], check=True, capture_output=True,
                   timeout=300, env=env)
    assert_adapters_equal(tmp_path / "ddp" / "adapter.safetensors", tmp_path / "single" / "adapter.safetensors",
                          atol=1e-5)
    assert len(read_log(tmp_path / "ddp")) == len(read_log(tmp_path / "single"))


def test_samed_protocol_round_trips_through_224(mni):
    model = fresh_model()
    volume = NiftiVolumes(mni, ["mni_val"], window=None, percentiles=MNI_PERCENTILES)[0]
    image = volume["image"][:2]
    labels = predict_volume_samed(model, image)
    from scipy.ndimage import zoom

    h, w = image.shape[1:]
    small = zoom(image[1], (224 / h, 224 / w), order=3)
    big = zoom(small, (SIZE / 224, SIZE / 224), order=3)
    with torch.no_grad():
        masks = model(torch.from_numpy(big.astype(np.float32))[None, None].expand(-1, 3, -1, -1))["masks"]
    expected = zoom(masks.argmax(1)[0].numpy(), (h / SIZE, w / SIZE), order=0)
    assert labels.shape == image.shape
    assert np.array_equal(labels[1], expected)
    summary, _ = evaluate(model, [dict(volume, image=image, label=volume["label"][:2])], protocol="samed")
    assert len(summary.class_dice) == 2


def test_cli_train_then_evaluate_writes_tables(tmp_path, capsys):
    from samed_adapter.cli.main import main

    data = tmp_path / "mni"
    common = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]
    assert main(["train", "--format", "mni", "--data", str(data), *common, "--image-size", str(SIZE),
                 "--batch-size", "8", "--max-epochs", "2", "--stop-epoch", "2", "--warmup-iters", "4",
                 "--no-progress", "-o", str(tmp_path / "run")]) == 0
    adapter = tmp_path / "run" / "adapter.safetensors"
    assert sa.Adapter.load(adapter).config.class_names == list(MNI_CLASS_NAMES)
    assert main(["evaluate", "--adapter", str(adapter), *common, "--data", str(data), "--cases", "mni_val",
                 "-o", str(tmp_path / "eval")]) == 0
    markdown = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "grey matter" in markdown and "white matter" in markdown and "mni_val" in markdown
    rows = (tmp_path / "eval" / "evaluation.csv").read_text().splitlines()
    header, values = rows[0].split(","), [r.split(",") for r in rows[1:]]
    assert header[:4] == ["case", "class", "dice", "hd95"]
    dice = [float(r[2]) for r in values if r[0] == "mni_val"]
    assert len(dice) == 2 and all(0.0 <= d <= 1.0 for d in dice)
    assert "error" not in capsys.readouterr().err


def test_activation_checkpointing_recomputes_blocks_with_equal_gradients():
    from samed_adapter.training.loop import _checkpointed_blocks

    model = fresh_model()
    model.train()
    blocks = list(model.sam.image_encoder.blocks)
    before = [blk.__dict__.get("forward") for blk in blocks]
    assert any(f is not None for f in before)  # the windowed SDPA path, which must survive
    runs = []
    blocks[0].norm1.register_forward_hook(lambda *_: runs.append(1))
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads():
        runs.clear()
        loss = model(x)["low_res_logits"].square().mean()
        return torch.autograd.grad(loss, params, allow_unused=True), len(runs)  # the IoU head is unused

    plain, plain_runs = grads()
    with _checkpointed_blocks(model, True):
        recomputed, checkpoint_runs = grads()
    assert (plain_runs, checkpoint_runs) == (1, 2)  # the block ran again in the backward
    assert sum(g is not None for g in plain) > 10
    for got, want in zip(recomputed, plain):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert [blk.__dict__.get("forward") for blk in blocks] == before
