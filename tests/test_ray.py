"""`segment --ray`: the Ray Data engine gives the serial engine's files, and survives bad inputs
and a model actor that dies.

One local Ray (2 CPUs) for the module; each run starts its own model actor (about 5 s on two
cores, most of it importing torch). The whole module takes about 45 s.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install samed-adapter[ray]); "
                                       "the Ray engine is not tested")
import ray  # noqa: E402

import samed_adapter  # noqa: E402
from samed_adapter.segment import ray_data as ray_backend  # noqa: E402
from samed_adapter.segment import ray_start  # noqa: E402
from samed_adapter.cli.demo import build_mni_task  # noqa: E402
from samed_adapter.segment.pipeline import SamSource, segment_files  # noqa: E402
from samed_adapter.testing import random_adapter  # noqa: E402

SOURCE = SamSource(backbone="tiny", seed=0)


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local Ray for the module: the engine uses a running Ray and leaves it running."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 ignore_reinit_error=True)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """Four MNI152 slabs in nested folders, a random adapter, and the serial engine's outputs."""
    root = tmp_path_factory.mktemp("ray")
    task = build_mni_task(root / "mni")
    train = nib.load(task / "imagesTr" / "mni_train.nii.gz")
    val = nib.load(task / "imagesTr" / "mni_val.nii.gz")
    t, v = np.asarray(train.dataobj), np.asarray(val.dataobj)
    inputs = root / "in"
    for rel, data, affine in (("a/one.nii.gz", t[:, :, :6], train.affine),
                              ("a/b/two.nii.gz", np.ascontiguousarray(t[::-1, :, 6:12]), train.affine),
                              ("c/three.nii.gz", t[:, :, 12:16], train.affine),
                              ("four.nii.gz", v[:, :, :5], val.affine)):
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), inputs / rel)
    config = samed_adapter.AdapterConfig(num_classes=2, image_size=64, intensity_window=None,
                                         intensity_percentiles=(0.5, 99.5), orientation="RAS")
    adapter = random_adapter(samed_adapter.build_sam("tiny", seed=0), config, seed=1, scale=0.5)
    adapter_path = adapter.save(root / "adapter.safetensors")
    serial = root / "serial"
    results = segment_files([inputs], serial, sam=SOURCE, adapter=adapter_path, engine="serial")
    assert [r.status for r in results] == ["written"] * 4
    labels = [np.asarray(nib.load(p).dataobj) for p in serial.rglob("*.nii.gz")]
    assert any(len(np.unique(x)) > 1 for x in labels)  # labels worth comparing
    return {"root": root, "inputs": inputs, "adapter": adapter_path, "serial": serial}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _assert_same_outputs(out: Path, serial: Path) -> None:
    assert _files(out) == _files(serial)  # same mirrored paths, and nothing else (no temporaries)
    for rel in _files(serial):
        if rel.endswith(".samed-adapter.json"):  # what made the labels: the same adapter and options
            assert (out / rel).read_text() == (serial / rel).read_text(), rel
            continue
        ours, theirs = nib.load(out / rel), nib.load(serial / rel)
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj), err_msg=rel)
        np.testing.assert_array_equal(ours.affine, theirs.affine, err_msg=rel)


def test_ray_matches_serial(archive, tmp_path):
    out = tmp_path / "ray"
    results = segment_files([archive["inputs"]], out, sam=SOURCE, adapter=archive["adapter"], engine="ray",
                            ray_workers=1)
    assert [r.status for r in results] == ["written"] * 4, [r.message for r in results]
    assert {str(f.relative_to(out)) for r in results for f in r.files} == _files(archive["serial"])
    _assert_same_outputs(out, archive["serial"])
    assert ray.is_initialized()  # a Ray it did not start is left running


def test_corrupt_input_fails_alone(archive, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(archive["inputs"], inputs)
    broken = inputs / "a" / "broken.nii.gz"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    out = tmp_path / "ray"
    results = segment_files([inputs], out, sam=SOURCE, adapter=archive["adapter"], engine="ray")
    by_name = {Path(r.name).name: r for r in results}
    assert len(results) == 5 and by_name["broken.nii.gz"].status == "failed"
    assert str(broken) in by_name["broken.nii.gz"].message
    assert [r.status for n, r in by_name.items() if n != "broken.nii.gz"] == ["written"] * 4
    _assert_same_outputs(out, archive["serial"])


def test_dead_actor_is_replaced_and_its_input_retried(archive, tmp_path, monkeypatch):
    # The model actor kills its own process (os._exit) on reaching two.nii.gz, once: see
    # ray_backend.KILL_ONCE_ENV. Ray restarts it, rebuilding its SAM, and sends the volume again.
    marker = tmp_path / "kill-once"
    marker.write_text("two.nii.gz")
    monkeypatch.setenv(ray_backend.KILL_ONCE_ENV, str(marker))
    out = tmp_path / "ray"
    results = segment_files([archive["inputs"]], out, sam=SOURCE, adapter=archive["adapter"], engine="ray")
    assert not marker.exists()  # the actor did die
    assert [r.status for r in results] == ["written"] * 4, [r.message for r in results]
    _assert_same_outputs(out, archive["serial"])  # no partial or temporary files either


def test_model_setup_error_is_raised(archive, tmp_path):
    from samed_adapter.adapter_file.adapter import BaseMismatchError

    with pytest.raises(BaseMismatchError, match="allow_base_mismatch"):
        segment_files([archive["inputs"]], tmp_path / "ray", sam=SamSource(backbone="tiny", seed=1),
                      adapter=archive["adapter"], engine="ray")
    assert not (tmp_path / "ray").exists() or not _files(tmp_path / "ray")


def test_without_ray_says_how_to_install(archive, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(ImportError, match=r"pip install samed-adapter\[ray\]"):
        segment_files([archive["inputs"]], tmp_path / "ray", sam=SOURCE, adapter=archive["adapter"], engine="ray")


def test_a_ray_run_started_by_the_command_says_only_its_own_lines(archive, tmp_path):
    """Issue 20: Ray started inside `segment --ray` printed its notice that token authentication
    is on (it is) and, from its C++ core, an actor "error" on every run (Ray Data's actors take
    their stages from the object store and may restart: ray-project/ray#53727). When nothing
    fails, every line on stderr is the command's own.

    A fresh process, as a user runs it: this module's Ray is already running in the test process,
    and the command starts its own Ray only where none is (capfd would see the same file
    descriptors that capture_output does)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != ray_start.BACKEND_LOG_LEVEL_ENV}
    done = subprocess.run([sys.executable, "-m", "samed_adapter.cli", "segment", "--sam-backbone", "tiny",
                           "--random-sam-seed", "0", "--adapter", str(archive["adapter"]), str(archive["inputs"]),
                           "-o", str(tmp_path / "out"), "--ray"], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "Token authentication" not in done.stderr, done.stderr
    assert "core_worker" not in done.stderr and "max_restarts" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith("samed-adapter segment: warning: ") for line in lines), done.stderr
    assert "segmented 4 of 4 inputs" in done.stdout
    _assert_same_outputs(tmp_path / "out", archive["serial"])


def test_ray_core_logging_is_fatal_only_while_ray_starts_unless_the_user_chose(monkeypatch):
    """The level is what the processes Ray starts read once; the caller's environment is as before,
    and a level the user set is left alone."""
    seen = []

    class FakeRay:
        def init(self, **options):
            seen.append(os.environ.get(ray_start.BACKEND_LOG_LEVEL_ENV))
            os.write(2, b"[2026-01-01 00:00:00,000 I 1 1] logging.cc:303: Set ray log level from environment "
                        b"variable RAY_BACKEND_LOG_LEVEL to 5\n")

    monkeypatch.delenv(ray_start.BACKEND_LOG_LEVEL_ENV, raising=False)
    ray_start.init_ray(FakeRay(), None)
    assert seen == ["fatal"] and ray_start.BACKEND_LOG_LEVEL_ENV not in os.environ
    monkeypatch.setenv(ray_start.BACKEND_LOG_LEVEL_ENV, "debug")
    ray_start.init_ray(FakeRay(), None)
    assert seen == ["fatal", "debug"] and os.environ[ray_start.BACKEND_LOG_LEVEL_ENV] == "debug"


def test_native_stderr_passes_on_all_but_the_unwanted_lines(capfd):
    """What C++ writes to descriptor 2 while Ray starts comes back in order, less Ray's notice."""
    print("before", file=sys.stderr)
    with ray_start._native_stderr_without("Set ray log level"):
        os.write(2, b"a real problem\n[...] logging.cc:303: Set ray log level from environment variable\n")
        os.write(2, b"another\n")
    print("after", file=sys.stderr)
    assert capfd.readouterr().err == "before\na real problem\nanother\nafter\n"
