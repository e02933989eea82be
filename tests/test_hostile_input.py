"""Hostile inputs: odd arrays for `SAMed.segment`, broken files for `samed-adapter segment`, and a
full disk while a checkpoint or an adapter is written.

Each case must end in a clear error (a ValueError with a message, or a CLI error naming the
file and a non-zero exit, with no partial output left) or in valid labels.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.testing.cli import run
from samed_adapter.testing import random_adapter
from samed_adapter.testing.tiny import CONFIGS

K = 3
SIZE = 64
LO, HI = sa.AdapterConfig().intensity_window  # the CT window: (-125, 275)
CONFIG = sa.AdapterConfig(num_classes=K, image_size=SIZE)


@pytest.fixture(scope="module")
def model():
    return sa.patch(sa.build_sam("tiny", seed=0), random_adapter(sa.build_sam("tiny", seed=0), CONFIG, seed=1))


def _valid_labels(labels: np.ndarray, shape) -> None:
    assert isinstance(labels, np.ndarray)
    assert labels.shape == tuple(shape)
    assert labels.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() <= K


# --------------------------------------------------------------------------- model.segment


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((0, 5)), "empty"),
        (np.zeros((0, 4, 4)), "empty"),
        (np.zeros((3, 0, 4)), "empty"),
        (np.zeros((1, 2, 3, 4)), r"\(H, W\) slice or a \(D, H, W\) volume"),
        (np.zeros((1, 1, 1, 1, 1)), r"\(H, W\) slice or a \(D, H, W\) volume"),
        (np.zeros(5), r"\(H, W\) slice or a \(D, H, W\) volume"),
        (np.array(3.0), r"\(H, W\) slice or a \(D, H, W\) volume"),
        (np.full((4, 4), np.nan), "NaN or infinite"),
        (np.where(np.eye(4, dtype=bool), np.nan, 0.0), "NaN or infinite"),
        (np.full((2, 4, 4), np.inf), "NaN or infinite"),
        (np.full((4, 4), -np.inf, dtype=np.float16), "NaN or infinite"),
        (torch.full((4, 4), float("nan")), "NaN or infinite"),
        (np.array([[1, 2], [3, 4]], dtype=object), "numeric"),
        (np.array([[None, 1.0]], dtype=object), "numeric"),
        (np.ones((4, 4), dtype=complex), "numeric"),
        (np.array([["a", "b"]]), "numeric"),
        (np.zeros((2, 2), dtype=[("a", "f4")]), "numeric"),
        (np.array([["2020-01-01"]], dtype="datetime64[D]"), "numeric"),
    ],
    ids=["empty-2d", "empty-depth", "empty-height", "4d", "5d", "1d", "0d", "nan", "one-nan", "inf", "f16-neg-inf",
         "torch-nan", "object", "object-none", "complex", "str", "structured", "datetime"],
)
def test_segment_refuses_bad_arrays_with_a_clear_message(model, array, message):
    with pytest.raises(ValueError, match=message) as info:
        model.segment(array)
    assert type(info.value) is ValueError and len(str(info.value)) > 20


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 1), (1, 300), (3, 1, 2)])
def test_segment_of_tiny_and_thin_images_gives_labels_of_their_shape(model, shape):
    image = np.random.default_rng(0).uniform(LO, HI, size=shape)
    labels = model.segment(image)
    _valid_labels(labels, shape)
    if shape in ((1, 1), (1, 1, 1)):
        # one pixel is resized to a constant S x S image; nearest resizing back takes the label at (0, 0)
        full = model.segment(np.full((SIZE, SIZE), image.item(), dtype=np.float32))
        assert labels.item() == full[0, 0]


@pytest.mark.parametrize(
    "array, same_as",
    [
        (np.full((5, 7), np.iinfo(np.int64).max, dtype=np.int64), HI),
        (np.full((5, 7), np.iinfo(np.int64).min, dtype=np.int64), LO),
        (np.full((5, 7), np.iinfo(np.uint64).max, dtype=np.uint64), HI),
        (np.full((5, 7), np.iinfo(np.uint16).max, dtype=np.uint16), HI),
        (np.full((5, 7), np.iinfo(np.int8).min, dtype=np.int8), LO),
        (np.full((5, 7), 1e300), HI),
        (np.full((5, 7), -1e300), LO),
        (np.full((5, 7), np.finfo(np.float32).max, dtype=np.float32), HI),
        (np.full((5, 7), np.finfo(np.float16).max, dtype=np.float16), HI),
    ],
    ids=["int64-max", "int64-min", "uint64-max", "uint16-max", "int8-min", "f64-1e300", "f64-neg-1e300",
         "f32-max", "f16-max"],
)
def test_extreme_values_are_clipped_by_the_window_not_crashed_on(model, array, same_as):
    with np.errstate(over="ignore"):  # 1e300 -> float32 overflows to inf, then clips to the window
        labels = model.segment(array)
    _valid_labels(labels, array.shape)
    np.testing.assert_array_equal(labels, model.segment(np.full(array.shape, same_as)))


def test_mixed_extremes_in_one_volume_equal_their_clipped_values(model):
    rng = np.random.default_rng(1)
    volume = rng.choice(np.array([np.iinfo(np.int64).min, -5, 0, 100, np.iinfo(np.int64).max]), size=(2, 16, 16))
    labels = model.segment(volume)
    _valid_labels(labels, volume.shape)
    np.testing.assert_array_equal(labels, model.segment(np.clip(volume, LO, HI).astype(np.float64)))


@pytest.mark.parametrize("as_torch", [False, True])
def test_bool_images_segment_like_zeros_and_ones(model, as_torch):
    mask = np.random.default_rng(2).random((2, 12, 12)) > 0.5
    labels = model.segment(torch.from_numpy(mask) if as_torch else mask)
    _valid_labels(labels, mask.shape)
    np.testing.assert_array_equal(labels, model.segment(mask.astype(np.float32)))


def test_lists_and_non_contiguous_arrays_segment_like_their_copies(model):
    image = np.random.default_rng(3).uniform(LO, HI, size=(20, 30))
    expected = model.segment(image)
    np.testing.assert_array_equal(model.segment(image.tolist()), expected)
    fortran = np.asfortranarray(image)
    np.testing.assert_array_equal(model.segment(fortran), expected)
    flipped = image[::-1, ::-1]
    np.testing.assert_array_equal(model.segment(flipped), model.segment(flipped.copy()))


def test_values_outside_unit_range_need_a_window_even_when_huge():
    config = sa.AdapterConfig(num_classes=K, image_size=SIZE, intensity_window=None)
    model = sa.patch(sa.build_sam("tiny", seed=0), random_adapter(sa.build_sam("tiny", seed=0), config, seed=1))
    with np.errstate(over="ignore"), pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.segment(np.full((4, 4), 1e300))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.segment(np.full((4, 4), np.iinfo(np.int64).max))
    _valid_labels(model.segment(np.ones((4, 4), dtype=bool)), (4, 4))


def test_segment_of_a_bfloat16_tensor_gives_labels(model):
    image = torch.full((6, 6), 100.0, dtype=torch.bfloat16)
    _valid_labels(model.segment(image), (6, 6))


@pytest.mark.parametrize("batch_size", [0, -1])
def test_segment_with_a_nonpositive_batch_size_is_a_clear_error_or_works(model, batch_size):
    volume = np.zeros((3, 8, 8))
    try:
        labels = model.segment(volume, batch_size=batch_size)
    except ValueError as err:
        assert "batch_size" in str(err)
    else:
        np.testing.assert_array_equal(labels, model.segment(volume, batch_size=1))


# --------------------------------------------------------------------------- the segment command


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_cli")
    adapter = random_adapter(sa.build_sam("tiny", seed=0), CONFIG, seed=1).save(root / "tiny.safetensors")
    good = root / "good.nii.gz"
    image = np.random.default_rng(0).uniform(LO, HI, size=(16, 12, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([0.8, 0.8, 2.5, 1.0])), good)
    return {"root": root, "adapter": adapter, "good": good}


def _segment(capsys, cli_files, *inputs, out, extra=()):
    argv = ["segment", "--sam-backbone", "tiny", "--random-sam-seed", "0", "--adapter", str(cli_files["adapter"]),
            *map(str, inputs), "-o", str(out), *extra]
    return run(capsys, *argv)


def _bad_inputs(folder: Path, good: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    made = {
        "empty": folder / "empty.nii.gz",
        "truncated": folder / "truncated.nii.gz",
        "truncated_inside": folder / "truncated_inside.nii.gz",
        "four_d": folder / "four_d.nii.gz",
        "text_png": folder / "text.png",
        "garbage_npy": folder / "garbage.npy",
    }
    made["empty"].write_bytes(b"")
    made["truncated"].write_bytes(raw[: len(raw) // 2])  # the gzip stream ends early
    made["truncated_inside"].write_bytes(gzip.compress(gzip.decompress(raw)[:400]))  # whole gzip, cut NIfTI
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 2), np.float32), np.eye(4)), made["four_d"])
    made["text_png"].write_text("this PNG is really text\n")
    made["garbage_npy"].write_bytes(b"\x93NUMPY garbage")
    return made


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("name", ["empty", "truncated", "truncated_inside", "four_d", "text_png", "garbage_npy"])
def test_segment_command_names_a_bad_file_and_leaves_nothing(capsys, cli_files, tmp_path, name):
    bad = _bad_inputs(tmp_path, cli_files["good"])[name]
    out = tmp_path / "out"
    code, stdout, stderr = _segment(capsys, cli_files, bad, out=out, extra=["--overlay"])
    assert code == 1, stderr
    assert str(bad) in stderr and "error" in stderr
    assert "segmented 0 of 1" in stdout
    assert _leftovers(out) == []


def test_segment_command_writes_the_good_inputs_and_only_them(capsys, cli_files, tmp_path):
    bad = _bad_inputs(tmp_path, cli_files["good"])
    out = tmp_path / "out"
    code, stdout, stderr = _segment(capsys, cli_files, *bad.values(), cli_files["good"], out=out, extra=["--overlay"])
    assert code == 1
    assert f"segmented 1 of {len(bad) + 1}" in stdout
    for path in bad.values():
        assert str(path) in stderr
    assert _leftovers(out) == [".good.samed-adapter.json", "good.nii.gz", "good_overlay.png"]  # no partial files
    labels = nib.load(out / "good.nii.gz")
    assert labels.shape == (16, 12, 3)
    data = np.asarray(labels.dataobj)
    assert data.min() >= 0 and data.max() <= K


@pytest.mark.parametrize("kind", ["truncated", "text", "missing"])
def test_segment_command_with_a_broken_adapter_stops_and_names_it(capsys, cli_files, tmp_path, kind):
    adapter = tmp_path / "broken.safetensors"
    if kind == "truncated":
        raw = Path(cli_files["adapter"]).read_bytes()
        adapter.write_bytes(raw[: len(raw) // 3])
    elif kind == "text":
        adapter.write_text("not an adapter")
    out = tmp_path / "out"
    argv = ["segment", "--sam-backbone", "tiny", "--random-sam-seed", "0", "--adapter", str(adapter),
            str(cli_files["good"]), "-o", str(out)]
    code, _, stderr = run(capsys, *argv)
    assert code == 2
    assert str(adapter) in stderr
    assert _leftovers(out) == []


def test_evaluate_command_with_mismatched_label_files(capsys, tmp_path):
    adapter = random_adapter(sa.build_sam("tiny", seed=0), CONFIGS["k3"], seed=0).save(tmp_path / "a.safetensors")
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), data / "imagesTr" / "case.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 3), np.uint8), np.eye(4)), data / "labelsTr" / "case.nii.gz")
    out = tmp_path / "eval"
    code, _, stderr = run(capsys, "evaluate", "--adapter", str(adapter), "--sam-backbone", "tiny",
                          "--random-sam-seed", "0", "--data", str(data), "--window", "none", "-o", str(out))
    assert code == 2
    assert "case" in stderr and "shape" in stderr
    assert not out.exists() or list(out.iterdir()) == []


# --------------------------------------------------------------------------- a full disk


def _half_then_enospc(write_real):
    """A writer that puts half the real bytes at the target and then fails as a full disk does."""

    def writer(obj, target, *args, **kwargs):
        buf = io.BytesIO()
        write_real(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(target, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    return writer


def test_full_disk_while_saving_a_training_state_keeps_the_previous_one(tmp_path, monkeypatch):
    from samed_adapter.training.state import TrainingState, load_state, save_state

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    named = list(module.named_parameters())
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = tmp_path / "train_state.pt"
    save_state(path, named, optimizer, scaler, TrainingState(iteration=10, best_dice=0.5))
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    saved_bytes = path.read_bytes()

    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", _half_then_enospc(real_save))
    with pytest.raises(OSError) as info:
        save_state(path, named, optimizer, scaler, TrainingState(iteration=20, best_dice=0.7))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()

    assert path.read_bytes() == saved_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]  # no temporary file left
    fresh = torch.nn.Linear(4, 3)
    fresh_named = list(fresh.named_parameters())
    state = load_state(path, fresh_named, torch.optim.AdamW(fresh.parameters(), lr=1e-3), scaler)
    assert (state.iteration, state.best_dice) == (10, 0.5)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())


def test_full_disk_while_saving_an_adapter_keeps_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    first = random_adapter(sa.build_sam("tiny", seed=0), CONFIG, seed=1)
    second = random_adapter(sa.build_sam("tiny", seed=0), CONFIG, seed=2)
    path = first.save(tmp_path / "adapter.safetensors")
    saved_bytes = path.read_bytes()

    def real_save_file(tensors, target, metadata=None):
        target.write(safetensors.torch.save(tensors, metadata=metadata))

    writer = _half_then_enospc(real_save_file)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, filename, metadata=None: writer(
        tensors, filename, metadata=metadata))
    with pytest.raises(OSError) as info:
        second.save(path)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        second.save(tmp_path / "new.safetensors", dtype=torch.float16)  # no previous file: none appears
    monkeypatch.undo()

    assert path.read_bytes() == saved_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
    loaded = sa.Adapter.load(path)
    assert loaded.config == first.config and loaded.base_fingerprint == first.base_fingerprint
    assert loaded.tensors.keys() == first.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], first.tensors[k]) for k in first.tensors)
    assert not torch.equal(loaded.tensors["prompt_encoder.no_mask_embed.weight"],
                           second.tensors["prompt_encoder.no_mask_embed.weight"])


# --------------------------------------------------------------------------- messages that name the real problem


def _one_line_error(read) -> str:
    from samed_adapter.io import ImageReadError

    with pytest.raises(ImageReadError) as err:
        read()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_truncated_dicom_is_called_truncated_not_missing_a_decoder(tmp_path):
    from samed_adapter.io import TruncatedImageError, read_image
    from samed_adapter.testing.dicom import write_ct_slice

    path = tmp_path / "cut.dcm"
    write_ct_slice(path, np.zeros((64, 64)), [0.0, 0.0, 0.0], iop=[1, 0, 0, 0, 1, 0], spacing=[1, 1], series="1.2.3")
    path.write_bytes(path.read_bytes()[:-3000])
    message = _one_line_error(lambda: read_image(path))
    assert "truncated: 8192 bytes of pixel data expected (64 x 64 x 16 bits), the file holds 5192" in message
    assert "decoder" not in message and "pylibjpeg" not in message
    with pytest.raises(TruncatedImageError):
        read_image(path)


def test_an_unreadable_file_is_called_unreadable_not_incomplete(tmp_path, monkeypatch):
    import builtins

    from samed_adapter.io import read_image

    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)
    real_open = builtins.open

    def no_permission(file, *args, **kwargs):  # root reads any file: imitate chmod 000
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_permission)
    message = _one_line_error(lambda: read_image(path))
    assert message == (f"{path}: cannot open the file (Permission denied); check that it is readable "
                       "(its permissions, the disk or network share it is on)")
    assert "complete" not in message


def test_a_damaged_file_is_called_damaged(tmp_path):
    from samed_adapter.io import read_image

    path = tmp_path / "noise.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    message = _one_line_error(lambda: read_image(path))
    assert "could not decode it as .png" in message and "damaged or not really .png" in message


def test_a_nan_affine_is_named_not_svd(tmp_path):
    import struct

    from samed_adapter.volume.geometry import SliceGeometry
    from samed_adapter.io import read_image

    img = nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(np.eye(4), code=1)
    path = tmp_path / "nan.nii"
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    raw[280:284] = struct.pack("<f", float("nan"))  # srow_x[0]
    path.write_bytes(bytes(raw))
    message = _one_line_error(lambda: read_image(path))
    assert "affine (sform/qform or pixdim) holds NaN or infinity" in message and "SVD" not in message
    nan_affine = np.eye(4)
    nan_affine[0, 0] = np.nan
    with pytest.raises(ValueError, match="the affine holds NaN or infinity") as err:
        SliceGeometry.for_volume((3, 3, 3), nan_affine, "LPS")  # the training path, without read_image
    assert "SVD" not in str(err.value)


def test_an_all_zero_dicom_orientation_is_named_not_shared_positions(tmp_path):
    from samed_adapter.io import read_image
    from samed_adapter.testing.dicom import write_ct_slice

    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(3):
        write_ct_slice(folder / f"{k}.dcm", np.zeros((4, 4)), [0.0, 0.0, 2.0 * k], iop=[0.0] * 6, spacing=[1, 1],
                       series="1.2.3")
    message = _one_line_error(lambda: read_image(folder))
    assert "ImageOrientationPatient [0.0, 0.0, 0.0, 0.0, 0.0, 0.0] is not two unit vectors at right angles" in message
    assert "share one position" not in message


@pytest.mark.parametrize("keep", [140, 300, 500])
def test_a_dicom_cut_inside_its_header_is_called_truncated_not_a_non_image(tmp_path, keep):
    from samed_adapter.io import find_dicom, read_image
    from samed_adapter.testing.dicom import write_ct_slice

    path = tmp_path / "cut.dcm"
    write_ct_slice(path, np.zeros((8, 8)), [0.0, 0.0, 0.0], iop=[1, 0, 0, 0, 1, 0], spacing=[1, 1], series="1.2.3")
    path.write_bytes(path.read_bytes()[:keep])
    message = _one_line_error(lambda: read_image(path))
    # 140 bytes end inside the file meta, before even the SOP class.
    what = "no SOP Class, Modality or Rows: the header ends early" if keep == 140 else "CT Image Storage, but no Rows/Columns"
    assert f"cut.dcm: truncated or damaged ({what}); copy it again from the source" in message
    assert "not an image" not in message
    assert find_dicom(tmp_path).skipped == [(path, f"truncated or damaged ({what}); copy it again from the source")]
