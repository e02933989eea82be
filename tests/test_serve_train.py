"""MONAI Label's training on `samed-adapter serve --datastore FOLDER` (issue 32): POST /train/{model}
starts a learning job in the server's training actor (Ray Train workers, never a replica), GET says
its progress, DELETE stops it; a second job for the same adapter gets 409; the admin token starts
and stops, the plain token reads. Called with MONAI Label's own client where it has the call.

A real server (local Ray, Ray Serve, one replica on a tiny random SAM at 128), a random 2-class
adapter, and three slabs of nilearn's MNI152 T1 with their grey/white-matter labels as final labels.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("ray.train", reason="Ray Train is not installed: pip install 'samed-adapter[serve]'")
pytest.importorskip("monailabel", reason="MONAI Label's client is not installed")

from samed_adapter.adapter_file.config import AdapterConfig  # noqa: E402
from samed_adapter.cli.demo import MNI_PERCENTILES, mni_volumes  # noqa: E402
from samed_adapter.datastore import FolderDatastore  # noqa: E402
from samed_adapter.segment.pipeline import SamSource  # noqa: E402
from samed_adapter.serve import ServeSettings, start  # noqa: E402
from samed_adapter.testing import random_adapter  # noqa: E402
from samed_adapter.testing.tiny import stock_sam  # noqa: E402

TOKEN, ADMIN = "train-token", "train-admin"
BRAIN = AdapterConfig(num_classes=2, image_size=128, class_names=["grey", "white"], intensity_window=None,
                      intensity_percentiles=MNI_PERCENTILES)
SLABS = {"case_a": (30, 36), "case_b": (36, 42), "case_c": (42, 48)}


def _slab(array: np.ndarray, affine: np.ndarray, z: tuple[int, int]) -> nib.Nifti1Image:
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.array([0, 0, z[0]]) + affine[:3, 3]
    return nib.Nifti1Image(np.ascontiguousarray(array[:, :, z[0]:z[1]]), moved)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "adapters").mkdir()
    random_adapter(stock_sam(), BRAIN, seed=1).save(root / "adapters" / "brain.safetensors")
    image, labels, affine = mni_volumes()
    store = FolderDatastore(root / "datastore")
    for case, z in SLABS.items():
        nib.save(_slab(image, affine, z), root / f"{case}.nii.gz")
        nib.save(_slab(labels, affine, z), root / f"{case}_label.nii.gz")
        store.add_image(case, root / f"{case}.nii.gz")
        store.save_label(case, root / f"{case}_label.nii.gz", "final")
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[str(root / "adapters")], port=port,
                             token=TOKEN, admin_token=ADMIN, replicas=1, batch_wait_ms=2,
                             datastore=str(root / "datastore"))
    with start(settings) as running:
        yield running


@pytest.fixture()
def client(server, tmp_path):
    from monailabel.client import MONAILabelClient

    made = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="slicer-test")
    made.update_auth(made.auth_token("admin", ADMIN))  # 3D Slicer's login, with the admin token as password
    return made


def _http(server, method: str, route: str, token: str = TOKEN, **kwargs):
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{server.url}{route}", headers=headers, timeout=60, **kwargs)


def _wait(server, until, timeout: float = 240.0) -> dict:
    """GET /train/brain until ``until(state)``; every state seen is kept in ``state["seen"]``."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        state = _http(server, "GET", "/train/brain").json()
        seen.append(state)
        if until(state):
            return {**state, "seen": seen}
        assert time.monotonic() < deadline, f"the job did not get there in {timeout} s: {state}"
        time.sleep(0.5)


def _versions_json(server) -> bytes:
    path = Path(server.settings.versions) / "brain" / "versions.json"
    return path.read_bytes() if path.exists() else b""


def test_tokens_params_and_info(server, client):
    # The admin's login gives the admin token, which reads as the plain one does (Slicer holds one token).
    assert client._headers["Authorization"] == f"bearer {ADMIN}"
    info = client.info()  # 3D Slicer shows its Train button for the trainers, with their config as options
    assert list(info["trainers"]) == ["brain"] and info["trainers"]["brain"]["config"]["max_epochs"] == 10
    assert _http(server, "POST", "/train/brain", token="").status_code == 401
    refused = _http(server, "POST", "/train/brain", token=TOKEN, json={"max_epochs": 1})
    assert refused.status_code == 403 and "admin token" in refused.json()["error"]
    assert _http(server, "GET", "/train/brain", token="").status_code == 401
    assert _http(server, "DELETE", "/train/brain", token=TOKEN).status_code == 403
    unknown = _http(server, "POST", "/train/nothing", token=ADMIN)
    assert unknown.status_code == 404 and "no adapter named 'nothing'" in unknown.json()["error"]
    bad = _http(server, "POST", "/train/brain", token=ADMIN, json={"max_epochs": 0})
    assert bad.status_code == 400 and "epochs must be" in bad.json()["error"]
    assert _http(server, "GET", "/train/brain").status_code == 404  # nothing started by any of these
    assert _versions_json(server) == b""


def test_a_job_reports_progress_makes_a_version_and_a_second_gets_409(server, client):
    from monailabel.client.client import MONAILabelClientException

    started = client.train_start("brain", {"max_epochs": 2, "seed": 0})  # MONAI Label's client: a JSON body
    assert started["status"] == "RUNNING" and started["total_epochs"] == 2
    with pytest.raises(MONAILabelClientException) as second:
        client.train_start("brain", {"max_epochs": 1})
    assert second.value.msg.startswith("Status: 409;") and "is running" in second.value.msg
    assert client.train_status(check_if_running=True) is True
    done = _wait(server, lambda s: s["status"] != "RUNNING")
    assert done["status"] == "DONE", done
    assert [p["epoch"] for p in done["progress"]] == [1, 2] and all(p["loss"] > 0 for p in done["progress"])
    assert any(s["phase"] == "training" for s in done["seen"])  # readable while it ran
    result = done["result"]
    assert result["version"] == 2 and result["ref"] == "brain@2"
    dice = result["figures"]["holdout_dice"]
    assert result["serving"] == (dice["new"] >= dice["current"])
    assert done["progress"][-1]["holdout_dice"] == pytest.approx(dice["new"], abs=1e-6)
    listed = _http(server, "GET", "/v1/adapters/brain/versions").json()
    assert [v["version"] for v in listed["versions"]] == [1, 2]
    assert listed["serving"] == (2 if result["serving"] else 1)
    served = next(a for a in _http(server, "GET", "/v1/adapters").json()["adapters"] if a["name"] == "brain")
    assert (served["fingerprint"] == result["fingerprint"]) == result["serving"]  # swapped in, or not
    # MONAI Label's status (Slicer's progress bar reads train_stats from /info/).
    assert client.train_status(check_if_running=True) is False
    assert client.train_status()["status"] == "DONE"
    stats = client.info()["train_stats"]["brain"]
    assert stats["epoch"] == 2 and stats["total_epochs"] == 2 and stats["total_time"] > 0


def test_delete_stops_a_job_and_records_nothing(server, client):
    before = _versions_json(server)
    # Two workers (DDP): they stop together at an epoch's end.
    started = _http(server, "POST", "/train/brain", token=ADMIN, json={"max_epochs": 200, "workers": 2, "cpus": 0.5})
    assert started.status_code == 200, started.text
    _wait(server, lambda s: s["phase"] == "training")
    stopped = _http(server, "DELETE", "/train/brain", token=ADMIN)
    assert stopped.status_code == 200 and stopped.json()["brain"]["phase"] == "stopping"
    done = _wait(server, lambda s: s["status"] != "RUNNING")
    assert done["status"] == "STOPPED" and done["result"] == {"stopped": True}
    assert done["epoch"] < 200 and _versions_json(server) == before
    assert _http(server, "DELETE", "/train/brain", token=ADMIN).status_code == 404  # nothing runs now
    assert json.loads(json.dumps(client.train_stop())) == {}  # MONAI Label's "stop all": none running


def test_without_the_jobs_actor_info_still_answers_and_train_says_503(server, client):
    import ray

    ray.kill(server.jobs, no_restart=True)  # last in the file: the jobs' actor is gone for good
    deadline = time.monotonic() + 30
    while (answer := _http(server, "GET", "/train/brain")).status_code != 503:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)
    assert "restart the server" in answer.json()["error"]
    info = client.info()  # 3D Slicer connects with /info/: it must not fail with the actor
    assert list(info["trainers"]) == ["brain"] and info["train_stats"] == {}
