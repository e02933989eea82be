"""Training never loses a run and never fails in silence (issue 20): a folder holding a run is
refused (or overwritten on request), a diverging loss names the checkpoint it really kept,
Ctrl-C saves and says how to continue, a damaged train_state.pt and a device that cannot train
are one-line errors, and only the final, last and best adapters are kept unless asked."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.cli.main import main
from samed_adapter.cli.demo import MNI_CLASS_NAMES, MNI_PERCENTILES, build_mni_task
from samed_adapter.testing.cli import run
from samed_adapter.training import (NiftiSlices, NiftiVolumes, NonFiniteLossError, RunFolderError, TrainingError,
                                    TrainingInterrupted, TrainingStateError, iterations_per_epoch)
from samed_adapter.training import loop
from samed_adapter.training.folder import run_files
from samed_adapter.training.loop import TrainConfig, train

SIZE = 64
EPOCHS = 2


@pytest.fixture(scope="module")
def mni(tmp_path_factory) -> Path:
    return build_mni_task(tmp_path_factory.mktemp("mni"))


@pytest.fixture(scope="module")
def train_only(mni, tmp_path_factory) -> Path:
    """The MNI task without its held-out case (what the command-line runs train on)."""
    data = tmp_path_factory.mktemp("train_only")
    for folder in ("imagesTr", "labelsTr"):
        (data / folder).mkdir()
        os.symlink(mni / folder / "mni_train.nii.gz", data / folder / "mni_train.nii.gz")
    return data


@pytest.fixture(scope="module")
def slices(mni) -> NiftiSlices:
    return NiftiSlices(mni, ["mni_train"], window=None, percentiles=MNI_PERCENTILES)


def fresh_model(rank: int = 4) -> sa.SAMed:
    torch.manual_seed(0)
    config = sa.AdapterConfig(num_classes=2, rank=rank, image_size=SIZE, class_names=list(MNI_CLASS_NAMES),
                              intensity_window=None)
    return sa.inject(sa.build_sam("tiny", seed=0), config)


def run_config(out: Path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(out), batch_size=8, max_epochs=EPOCHS, stop_epoch=EPOCHS, warmup_iters=2,
                  progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--format", "nifti", "--data", str(data), "--window", "none", "--num-classes", "2",
            "--sam-backbone", "tiny", "--random-sam-seed", "0", "--image-size", str(SIZE), "--batch-size", "8",
            "--max-epochs", str(EPOCHS), "--stop-epoch", str(EPOCHS), "--warmup-iters", "2", "--no-progress",
            "-o", str(out), *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def logged_iterations(out: Path) -> list[int]:
    return [e["iter"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "iter" in e]


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = sa.Adapter.load(a), sa.Adapter.load(b)
    assert x.tensors.keys() == y.tensors.keys()
    for key in x.tensors:
        assert torch.equal(x.tensors[key], y.tensors[key]), key


def one_error_line(err: str, command: str = "samed-adapter train") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def finished(slices, tmp_path_factory) -> Path:
    """A finished 2-epoch run (the reference for resumed and refused runs)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(fresh_model(), slices, run_config(out))
    return out


@pytest.fixture(scope="module")
def cli_finished(train_only, tmp_path_factory) -> Path:
    """The same run through the command line (which seeds and orients as the CLI does)."""
    out = tmp_path_factory.mktemp("cli_finished") / "run"
    assert main(cli_args(train_only, out)) == 0
    return out


# --------------------------------------------------------------------------- 1. a folder holding a run


class FailingSlices(torch.utils.data.Dataset):
    """Slices whose labels are out of range: training fails at its first step."""

    def __init__(self, slices) -> None:
        self.slices = slices

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index):
        item = self.slices[index]
        return dict(item, label=np.full_like(item["label"], 99))


def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(finished, slices):
    before = snapshot(finished)
    with pytest.raises(RunFolderError) as caught:
        train(fresh_model(), slices, run_config(finished))
    message = str(caught.value)
    assert "resume=True" in message and "overwrite=True" in message and "--" not in message
    assert caught.value.for_cli().count("--resume") == 1 and "--overwrite" in caught.value.for_cli()
    assert [p.name for p in caught.value.files] == ["adapter.safetensors", "adapter_last.safetensors",
                                                    "log.jsonl", "train_state.pt"]
    # Before the fix the old log.jsonl was deleted when the new run failed at its first step.
    with pytest.raises(RunFolderError):
        train(fresh_model(), FailingSlices(slices), run_config(finished))
    assert snapshot(finished) == before


@pytest.mark.parametrize("name", ["best.safetensors", "adapter_epoch007.safetensors", "log.jsonl",
                                  ".train_state.0123abcd.tmp.pt", "tensorboard/events.out.tfevents.1.host"])
def test_any_file_of_a_run_marks_the_folder(slices, tmp_path, name):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b"old")
    with pytest.raises(RunFolderError, match="already holds a training run"):
        train(fresh_model(), slices, run_config(tmp_path))
    assert snapshot(tmp_path) == {name: b"old"}


def test_overwrite_deletes_only_the_runs_files_and_starts_over(finished, slices, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("adapter.safetensors", "adapter_epoch007.safetensors", "train_state.pt", "log.jsonl",
                 ".adapter_last.00ff.tmp.safetensors"):
        (out / name).write_bytes(b"old run")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"old run")
    (out / "notes.txt").write_text("mine")
    (out / "mine.safetensors").write_bytes(b"mine")
    path = train(fresh_model(), slices, run_config(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_last.safetensors", "log.jsonl",
                                                      "mine.safetensors", "notes.txt", "train_state.pt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine.safetensors").read_bytes() == b"mine"
    assert_same_adapter(path, finished / "adapter.safetensors")
    assert logged_iterations(out) == logged_iterations(finished)


def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(finished, slices, tmp_path):
    out = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(out)
    with pytest.raises(ValueError, match="too few for one batch"):
        train(fresh_model(), torch.utils.data.Subset(slices, []), run_config(out), overwrite=True)
    assert snapshot(out) == before


def test_resume_and_overwrite_exclude_each_other(finished, slices, train_only, capsys):
    before = snapshot(finished)
    with pytest.raises(TrainingError, match="resume=True and overwrite=True exclude each other"):
        train(fresh_model(), slices, run_config(finished), resume=True, overwrite=True)
    assert main(cli_args(train_only, finished, "--resume", "--overwrite")) == 2
    assert "--resume and --overwrite exclude each other" in one_error_line(capsys.readouterr().err)
    assert snapshot(finished) == before


def test_cli_refuses_a_run_folder_in_one_line_before_reading_anything(finished, tmp_path, capsys):
    before = snapshot(finished)
    missing = tmp_path / "no_such_data"  # never read: the folder is checked first
    assert main(cli_args(missing, finished)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{finished} already holds a training run" in line
    assert "pass --resume to continue it, --overwrite to delete its files" in line and "=True" not in line
    assert snapshot(finished) == before


def test_cli_overwrite_starts_over(cli_finished, train_only, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_epoch001.safetensors").write_bytes(b"old run")
    assert main(cli_args(train_only, out, "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_last.safetensors", "log.jsonl",
                                                      "train_state.pt"]
    assert_same_adapter(out / "adapter.safetensors", cli_finished / "adapter.safetensors")


# --------------------------------------------------------------------------- 2. a diverging loss


class NanAfter(torch.utils.data.Dataset):
    """Slices that turn NaN after `after` items were served."""

    def __init__(self, slices, after: int) -> None:
        self.slices, self.after, self.served = slices, after, 0

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index):
        self.served += 1
        item = self.slices[index]
        return item if self.served <= self.after else dict(item, image=np.full_like(item["image"], np.nan))


def test_a_loss_that_diverges_before_any_checkpoint_claims_none(slices, tmp_path):
    with pytest.raises(NonFiniteLossError) as caught:
        train(fresh_model(), NanAfter(slices, after=8), run_config(tmp_path))  # step 2 of epoch 1
    err = caught.value
    assert (err.step, err.epoch, err.kept) == (2, 1, None)
    assert "nothing to resume from" in str(err) and "kept" not in str(err)
    assert "base_lr" in str(err) and "--base-lr" in err.for_cli()
    assert not (tmp_path / "adapter_last.safetensors").exists() and not (tmp_path / "train_state.pt").exists()


def test_a_loss_that_diverges_after_a_checkpoint_names_it(slices, tmp_path):
    per_epoch = iterations_per_epoch(len(slices), 8)
    with pytest.raises(NonFiniteLossError) as caught:
        train(fresh_model(), NanAfter(slices, after=8 * (per_epoch + 1)), run_config(tmp_path))
    err = caught.value
    assert err.step == per_epoch + 2 and err.kept == (per_epoch, [tmp_path / "adapter_last.safetensors",
                                                                  tmp_path / "train_state.pt"])
    assert f"the checkpoint after step {per_epoch} is kept ({tmp_path / 'adapter_last.safetensors'}" in str(err)
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["iteration"] == per_epoch


def test_cli_diverging_train_is_one_line_and_fails(train_only, tmp_path, capsys):
    # A learning rate this large sends the weights to infinity within a few steps.
    code = main(cli_args(train_only, tmp_path / "run", "--base-lr", "1e30"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert re.search(r"the loss became (nan|inf|-inf) at step \d+ \(epoch 1\)", line), line
    assert "nothing to resume from" in line and "--base-lr (now 1e+30)" in line
    assert "kept" not in line


# --------------------------------------------------------------------------- 3. Ctrl-C


def interrupt_at(monkeypatch, step: int) -> None:
    """Make step `step` (1-based) raise KeyboardInterrupt before it changes anything."""
    real = loop._forward_backward

    def forward_backward(run, config, batch, it, out):
        if it + 1 == step:
            raise KeyboardInterrupt
        return real(run, config, batch, it, out)

    monkeypatch.setattr(loop, "_forward_backward", forward_backward)


def test_ctrl_c_saves_the_step_and_resume_ends_as_an_uninterrupted_run(finished, slices, tmp_path, monkeypatch):
    out = tmp_path / "run"
    model = fresh_model()
    interrupt_at(monkeypatch, 4)  # mid epoch 1: no checkpoint yet
    with pytest.raises(TrainingInterrupted) as caught:
        train(model, slices, run_config(out))
    stop = caught.value
    assert isinstance(stop, KeyboardInterrupt)
    assert (stop.step, stop.total) == (3, EPOCHS * iterations_per_epoch(len(slices), 8))
    assert stop.saved == [out / "adapter_last.safetensors", out / "train_state.pt"]
    assert "resume=True continues the run" in str(stop)
    assert torch.load(out / "train_state.pt", weights_only=True)["iteration"] == 3
    live = model.adapter()
    saved = sa.Adapter.load(out / "adapter_last.safetensors")
    assert all(torch.equal(saved.tensors[k], live.tensors[k]) for k in live.tensors)
    assert not (out / "adapter.safetensors").exists()
    monkeypatch.undo()
    resumed = train(fresh_model(), slices, run_config(out), resume=True)
    assert_same_adapter(resumed, finished / "adapter.safetensors")
    assert logged_iterations(out) == logged_iterations(finished)


def test_ctrl_c_before_the_first_step_saves_nothing_and_leaves_no_run(slices, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 1)
    with pytest.raises(TrainingInterrupted, match="before the first step") as caught:
        train(fresh_model(), slices, run_config(tmp_path / "run"))
    assert caught.value.saved == [] and caught.value.step == 0
    assert run_files(tmp_path / "run") == []  # the same command runs again without --resume


def test_cli_ctrl_c_prints_the_resume_command_that_finishes_the_run(cli_finished, train_only, tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 5)
    assert main(cli_args(train_only, out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == (f"samed-adapter train: interrupted after step 4 of {len(logged_iterations(cli_finished))}; saved "
                        f"{out / 'adapter_last.safetensors'}, {out / 'train_state.pt'}; --resume continues the run")
    prefix = "continue with: samed-adapter train "
    assert len(lines) == 2 and lines[1].startswith(prefix) and lines[1].endswith(" --resume")
    monkeypatch.undo()
    assert main(["train", *shlex.split(lines[1][len(prefix):])]) == 0
    assert_same_adapter(out / "adapter.safetensors", cli_finished / "adapter.safetensors")
    assert logged_iterations(out) == logged_iterations(cli_finished)


def test_the_resume_command_spells_every_flag_as_given():
    import argparse

    from samed_adapter.cli.train import add_arguments, resume_command

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.set_defaults(invocation="python examples/train.py")
    given = ["--data", "my data", "--window", "none", "--percentiles", "0.5,99.5", "--orientation", "LPS",
             "--base-lr", "0.0001234567", "--no-augment", "--decoder-lora", "-o", "runs/x", "--overwrite"]
    command = resume_command(parser.parse_args(given))
    assert command.startswith("python examples/train.py ")
    words = shlex.split(command)[2:]
    assert "--overwrite" not in words and words[-1] == "--resume"
    assert vars(parser.parse_args(words)) == {**vars(parser.parse_args(given)), "resume": True, "overwrite": False}


def test_a_ctrl_c_signal_waits_for_the_update_in_flight():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with loop._sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the update")
    assert done == ["the rest of the update"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --------------------------------------------------------------------------- 4. a damaged train_state.pt


def state_cases(finished: Path) -> dict[str, tuple[callable, str]]:
    good = (finished / "train_state.pt").read_bytes()

    def truncated(path):
        path.write_bytes(good[: len(good) // 2])

    def foreign(path):
        torch.save({"weights": torch.zeros(3), "step": 7}, path)

    def not_a_dict(path):
        torch.save(torch.zeros(3), path)

    def other_rank(path):  # the state of a rank-8 adapter: same tensor names, other shapes
        state = torch.load(finished / "train_state.pt", weights_only=True)
        state["trainable"] = {k: torch.zeros(*(8 if s == 4 else s for s in v.shape))
                              for k, v in state["trainable"].items()}
        torch.save(state, path)

    def other_tensors(path):
        state = torch.load(finished / "train_state.pt", weights_only=True)
        state["trainable"] = {"mask_decoder.something_else": torch.zeros(3)}
        torch.save(state, path)

    def bad_optimizer(path):
        state = torch.load(finished / "train_state.pt", weights_only=True)
        state["optimizer"]["param_groups"][0]["params"] = [0]
        torch.save(state, path)

    return {
        "truncated": (truncated, "is not a readable training state"),
        "foreign": (foreign, "is no training state written by train"),
        "not_a_dict": (not_a_dict, "is no training state written by train"),
        "other_rank": (other_rank, "where this adapter has"),
        "other_tensors": (other_tensors, "saved for other trainable tensors"),
        "bad_optimizer": (bad_optimizer, "optimizer state does not fit this adapter"),
    }


@pytest.mark.parametrize("case", ["truncated", "foreign", "not_a_dict", "other_rank", "other_tensors",
                                  "bad_optimizer"])
def test_resume_from_a_damaged_state_is_a_training_state_error(finished, slices, tmp_path, case):
    out = tmp_path / "run"
    out.mkdir()
    write, problem = state_cases(finished)[case]
    write(out / "train_state.pt")
    before = snapshot(out)
    model = fresh_model()
    tensors = {k: v.clone() for k, v in model.adapter().tensors.items()}
    with pytest.raises(TrainingStateError) as caught:
        train(model, slices, run_config(out), resume=True)
    message = str(caught.value)
    assert message.startswith(f"cannot resume from {out / 'train_state.pt'}: ") and problem in message
    assert "\n" not in message and "overwrite=True" in message
    assert snapshot(out) == before
    assert all(torch.equal(model.adapter().tensors[k], v) for k, v in tensors.items())


def test_resume_without_a_state_beside_adapters_is_refused(finished, slices, tmp_path):
    out = shutil.copytree(finished, tmp_path / "run")
    (out / "train_state.pt").unlink()
    before = snapshot(out)
    with pytest.raises(TrainingStateError, match=r"it does not exist, though the folder holds the final adapter "
                                                 r"of a run \(adapter.safetensors\)"):
        train(fresh_model(), slices, run_config(out), resume=True)
    assert snapshot(out) == before


def test_cli_resume_from_a_truncated_state_is_one_line(finished, train_only, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    state_cases(finished)["truncated"][0](out / "train_state.pt")
    assert main(cli_args(train_only, out, "--resume")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is not a readable training state" in line and "start over with --overwrite" in line


def test_examples_train_speaks_in_one_line_too(finished, train_only, tmp_path):
    """examples/train.py has no cli.main around it: its errors are its own one line (no traceback)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "train.py"
    before = snapshot(finished)
    done = subprocess.run([sys.executable, str(script), *cli_args(train_only, finished)[1:]], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "pass --resume to continue it" in one_error_line(done.stderr, command="train")
    done = subprocess.run([sys.executable, str(script), *cli_args(train_only, tmp_path / "run", "--device", "meta")[1:]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--device meta cannot train" in one_error_line(done.stderr, command="train")
    assert snapshot(finished) == before and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 5. devices that cannot train


@pytest.mark.parametrize("device, said", [
    ("meta", "--device meta cannot train (it holds shapes but no values); use --device "),
    ("gpu", "--device 'gpu' is not a torch device; use --device "),
    ("cuda:64", "--device cuda:64 but "),
])
def test_cli_device_that_cannot_train_is_one_line(train_only, tmp_path, capsys, device, said):
    assert main(cli_args(train_only, tmp_path / "run", "--device", device)) == 2
    assert said in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_model_on_the_meta_device_is_refused_before_any_write(slices, tmp_path):
    with pytest.raises(TrainingError, match="the model is on the meta device, which cannot train"):
        train(fresh_model().to("meta"), slices, run_config(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 6. what is kept


def test_by_default_only_the_final_last_and_best_adapters_are_kept(mni, slices, tmp_path):
    volumes = NiftiVolumes(mni, ["mni_val"], window=None, percentiles=MNI_PERCENTILES)
    train(fresh_model(), slices, run_config(tmp_path, max_epochs=3, stop_epoch=3, val_every=1), val_volumes=volumes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_last.safetensors",
                                                          "best.safetensors", "log.jsonl", "train_state.pt"]
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["iteration"] == 3 * iterations_per_epoch(
        len(slices), 8)


def test_save_every_keeps_every_nth_epoch(slices, train_only, tmp_path):
    train(fresh_model(), slices, run_config(tmp_path / "api", max_epochs=4, stop_epoch=4, save_every=2))
    assert sorted(p.name for p in (tmp_path / "api").glob("adapter_epoch*")) == [
        "adapter_epoch002.safetensors", "adapter_epoch004.safetensors"]
    assert main(cli_args(train_only, tmp_path / "cli", "--save-every", "1")) == 0
    assert sorted(p.name for p in (tmp_path / "cli").glob("adapter_epoch*")) == [
        "adapter_epoch001.safetensors", "adapter_epoch002.safetensors"]
    with pytest.raises(ValueError, match="save_every must be 0"):
        run_config(tmp_path, save_every=-1)


def test_cli_refuses_a_bad_save_every_with_its_flag(train_only, tmp_path, capsys):
    assert main(cli_args(train_only, tmp_path / "run", "--save-every", "-1")) == 2
    assert one_error_line(capsys.readouterr().err).endswith("error: --save-every must be 0 (off) or more, got -1")
    assert not (tmp_path / "run").exists()


def test_a_dataset_header_claiming_16_gib_is_refused_before_reading(tmp_path):
    """A 352-byte NIfTI header in imagesTr that claims 4096 x 4096 x 256 float32 voxels (16 GiB):
    the dataset refuses it from the header, before a voxel is read (issue 20)."""
    import tracemalloc

    import nibabel as nib

    from samed_adapter.io import ImageTooLargeError

    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 256))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    (tmp_path / "imagesTr" / "case.nii").write_bytes(header.binaryblock + b"\0" * 4)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.uint8), np.eye(4)), tmp_path / "labelsTr" / "case.nii.gz")
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match=r"case.nii: image of 4096 x 4096 x 256 = 4,294,967,296 voxels"):
            NiftiSlices(tmp_path, ["case"], window=(0.0, 1.0))
        assert tracemalloc.get_traced_memory()[1] < 32 * 2**20
    finally:
        tracemalloc.stop()
    with pytest.raises(ImageTooLargeError, match="limit of 100 voxels"):  # and the limit is the caller's
        NiftiSlices(tmp_path, ["case"], window=(0.0, 1.0), max_voxels=100)


def test_cli_train_bounds_the_dataset_with_max_voxels(tmp_path, capsys):
    import nibabel as nib

    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.uint8), np.eye(4)), tmp_path / "data" / folder / "case.nii.gz")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "data"), "--num-classes", "1", "--sam-backbone",
                       "tiny", "--random-sam-seed", "0", "--image-size", "64", "--max-voxels", "1000", "--device",
                       "cpu", "-o", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1, err
    assert "16 x 16 x 4 = 1,024 voxels" in err and "limit of 1,000 voxels" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
