"""`samed-adapter serve` as a user starts it: a process that answers until Ctrl-C, then stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'samed-adapter[serve]'")

import samed_adapter as sa  # noqa: E402
from samed_adapter.testing import random_adapter  # noqa: E402


def test_serve_answers_until_ctrl_c(tmp_path):
    config = sa.AdapterConfig(num_classes=2, image_size=64, class_names=["liver", "spleen"])
    random_adapter(sa.build_sam("tiny", seed=0), config, seed=3).save(tmp_path / "organs.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SAMED_SERVE_TOKEN": "t0ken"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "samed_adapter.cli", "serve", "--sam-backbone", "tiny", "--random-sam-seed", "0",
         "--adapters", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background child ignores Ctrl-C
    try:
        line = proc.stdout.readline()
        assert f"serving at http://127.0.0.1:{port}" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        assert requests.get(f"{url}/info/", timeout=30).status_code == 401  # the token from the environment
        info = requests.get(f"{url}/info/", headers={"Authorization": "Bearer t0ken"}, timeout=30).json()
        assert info["models"]["organs"]["labels"] == {"liver": 1, "spleen": 2}
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
        out, err = line + proc.stdout.read(), proc.stderr.read()
        assert code == 0 and "stopped" in err and "Traceback" not in err, err
        # Nothing of Ray's: its token-auth notice on start, its controller's "graceful_shutdown failed" on stop.
        theirs = [text for text in (out + err).splitlines() if text and not text.startswith("samed-adapter serve:")]
        assert not theirs, theirs
        time.sleep(0.5)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_gpus_the_local_ray_does_not_have(tmp_path, capsys):
    """Ray Serve would wait without a word for replicas no node can hold."""
    import ray

    from samed_adapter.testing.cli import run

    config = sa.AdapterConfig(num_classes=1, image_size=64, class_names=["liver"])
    random_adapter(sa.build_sam("tiny", seed=0), config, seed=4).save(tmp_path / "liver.safetensors")
    code, _, err = run(capsys, "serve", "--sam-backbone", "tiny", "--random-sam-seed", 0, "--adapters", tmp_path,
                       "--replicas", 64, "--gpus-per-replica", 1)
    assert code == 2 and "needs 64 GPUs" in err and "Traceback" not in err, err
    assert not ray.is_initialized()  # the Ray it started is gone again
    with socket.socket() as busy:  # a port something else listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = run(capsys, "serve", "--sam-backbone", "tiny", "--random-sam-seed", 0, "--adapters", tmp_path,
                           "--port", busy.getsockname()[1])
    assert code == 2 and "cannot listen there" in err and "another --port" in err and "Traceback" not in err, err


def test_serve_says_in_one_line_that_its_model_replicas_failed(tmp_path):
    """The front answers before the model replicas run; one that fails to start ends the command
    with its exception in one line (was Ray's traceback, "Failed to update the deployments")."""
    config = sa.AdapterConfig(num_classes=1, image_size=64, class_names=["liver"])
    random_adapter(sa.build_sam("tiny", seed=0), config, seed=4).save(tmp_path / "liver.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "samed_adapter.cli", "serve", "--sam-backbone", "tiny", "--random-sam-seed", "0",
         "--adapters", str(tmp_path), "--port", str(port), "--device", "nope"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(error) == 1 and "replicas failed to start (Segmenter: RuntimeError:" in error[0], done.stderr
    assert "nope" in error[0], error
