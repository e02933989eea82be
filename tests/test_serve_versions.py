"""Adapter versions on a running server (local Ray Serve, a tiny random SAM): listing them, a
rollback over HTTP with the admin token, requests that name ``NAME@N``, refusals in one line."""

from __future__ import annotations

import gzip
import io
import socket
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'samed-adapter[serve]'")

import samed_adapter as sa  # noqa: E402
from samed_adapter.learning import VersionStore  # noqa: E402
from samed_adapter.segment.pipeline import SamSource  # noqa: E402
from samed_adapter.serve import ServeSettings, start  # noqa: E402
from samed_adapter.testing import random_adapter  # noqa: E402

TOKEN, ADMIN = "plain-token", "admin-token"
AUTH, ADMIN_AUTH = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"Bearer {ADMIN}"}
FINGERPRINT = "X-Adapter-Fingerprint"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Adapter "liver" with version 1 (the folder's file, adopted) and version 2 (serving), a scan."""
    root = tmp_path_factory.mktemp("serve-versions")
    sam = sa.build_sam("tiny", seed=0)
    config = sa.AdapterConfig(num_classes=3, image_size=64, class_names=["liver", "kidney", "spleen"],
                              intensity_window=(0.0, 1.0))
    first, second = (random_adapter(sam, config, seed=seed) for seed in (21, 22))
    (root / "adapters").mkdir()
    first.save(root / "adapters" / "liver.safetensors")
    store = VersionStore(root / "versions")
    store.adopt("liver", root / "adapters" / "liver.safetensors")
    store.add("liver", second, parent=1, figures={"holdout_dice": {"current": 50.0, "new": 55.5}},
              items=[{"image": "ct1", "label_checksum": "sha256:aa"}], holdout=["ct9"], serve=True)
    volume = np.random.default_rng(3).random((40, 40, 6), dtype=np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "scan.nii.gz")
    return {"root": root, "fingerprints": {1: first.fingerprint, 2: second.fingerprint}}


@pytest.fixture(scope="module")
def server(setup):
    root = setup["root"]
    settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[str(root / "adapters")],
                             port=_free_port(), token=TOKEN, admin_token=ADMIN, versions=str(root / "versions"),
                             max_batch_size=8, batch_wait_ms=5, max_resident=1)
    with start(settings) as running:
        yield running


def _segment(server, adapter: str) -> tuple[str, np.ndarray]:
    """/v1/segment of the scan with ``adapter``: the answer's fingerprint header and labels."""
    scan = (Path(server.settings.adapters[0]).parent / "scan.nii.gz").read_bytes()
    answer = requests.post(f"{server.url}/v1/segment", headers=AUTH, data={"adapter": adapter},
                           files={"file": ("scan.nii.gz", scan)}, timeout=120)
    assert answer.status_code == 200, answer.text
    with zipfile.ZipFile(io.BytesIO(answer.content)) as z:
        name = next(n for n in z.namelist() if n.endswith(".nii.gz"))
        labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(z.read(name))).dataobj)
    return answer.headers[FINGERPRINT], labels


def _infer(server, model: str) -> str:
    scan = (Path(server.settings.adapters[0]).parent / "scan.nii.gz").read_bytes()
    answer = requests.post(f"{server.url}/infer/{model}?output=json", headers=AUTH,
                           files={"file": ("scan.nii.gz", scan)}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["adapter"] == {"name": model, "fingerprint": answer.headers[FINGERPRINT]}
    return answer.headers[FINGERPRINT]


def test_versions_are_listed_with_their_figures_and_the_serving_one(server, setup):
    answer = requests.get(f"{server.url}/v1/adapters/liver/versions", headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["name"], body["serving"]) == ("liver", 2)
    assert [(v["version"], v["parent"], v["serving"], v["items"], v["holdout"], v["fingerprint"])
            for v in body["versions"]] == [(1, None, False, 0, 0, setup["fingerprints"][1]),
                                           (2, 1, True, 1, 1, setup["fingerprints"][2])]
    assert body["versions"][1]["figures"] == {"holdout_dice": {"current": 50.0, "new": 55.5}}
    [entry] = requests.get(f"{server.url}/v1/adapters", headers=AUTH, timeout=30).json()["adapters"]
    assert (entry["name"], entry["version"], entry["fingerprint"]) == ("liver", 2, setup["fingerprints"][2])
    assert requests.get(f"{server.url}/v1/adapters/liver/versions", timeout=30).status_code == 401
    missing = requests.get(f"{server.url}/v1/adapters/kidney/versions", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and "kidney" in missing.json()["error"]


def test_a_rollback_over_http_serves_the_version_named_and_name_at_n_names_one(server, setup):
    fingerprints = setup["fingerprints"]
    served, labels_2 = _segment(server, "liver")
    assert served == fingerprints[2]
    assert _segment(server, "liver@1")[0] == fingerprints[1]
    assert _infer(server, "liver@1") == fingerprints[1]

    plain = requests.post(f"{server.url}/v1/adapters/liver/serve?version=1", headers=AUTH, timeout=60)
    assert plain.status_code == 403 and "admin token" in plain.json()["error"]
    assert _segment(server, "liver")[0] == fingerprints[2]  # the refused rollback changed nothing
    answer = requests.post(f"{server.url}/v1/adapters/liver/serve?version=1", headers=ADMIN_AUTH, timeout=60)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["serving"]["version"], answer.json()["previous"]) == (1, 2)
    try:
        served, labels_1 = _segment(server, "liver")
        assert served == fingerprints[1] and _infer(server, "liver") == fingerprints[1]
        assert not np.array_equal(labels_1, labels_2)
        again, labels_at_2 = _segment(server, "liver@2")  # the version no longer serving still answers by name
        assert again == fingerprints[2]
        np.testing.assert_array_equal(labels_at_2, labels_2)
    finally:
        forward = requests.post(f"{server.url}/v1/adapters/liver/serve?version=2", headers=ADMIN_AUTH, timeout=60)
        assert forward.status_code == 200 and forward.json()["serving"]["version"] == 2


def test_segment_on_the_server_takes_name_at_n(server, setup, capsys, tmp_path):
    """`samed-adapter segment --server URL --adapter liver@1` is answered by version 1 (not the
    serving 2), and the record beside the labels names version 1's fingerprint."""
    import json

    from samed_adapter.segment.outputs import record_path
    from samed_adapter.testing.cli import run

    scan = Path(server.settings.adapters[0]).parent / "scan.nii.gz"
    code, out, err = run(capsys, "segment", "--server", server.url, "--token", TOKEN, "--adapter", "liver@1",
                         str(scan), "-o", str(tmp_path / "v1"))
    assert code == 0, err
    labels = np.asarray(nib.load(tmp_path / "v1" / "scan.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, _segment(server, "liver@1")[1])
    assert not np.array_equal(labels, _segment(server, "liver")[1])
    record = json.loads(record_path(tmp_path / "v1" / "scan.nii.gz").read_text())
    assert (record["adapter"], record["adapter_fingerprint"]) == ("liver@1", setup["fingerprints"][1])
    code, out, err = run(capsys, "segment", "--server", server.url, "--token", TOKEN, "--adapter", "liver@7",
                         str(scan), "-o", str(tmp_path / "v7"))
    assert code != 0 and "has no version 7; it has 1, 2" in err and not (tmp_path / "v7").exists()


@pytest.mark.parametrize("query, status, said", [("version=9", 404, "no version 9 (versions: 1, 2)"),
                                                 ("version=two", 400, "?version=N"), ("", 400, "?version=N")])
def test_a_bad_version_is_refused_in_one_line_and_changes_nothing(server, query, status, said):
    answer = requests.post(f"{server.url}/v1/adapters/liver/serve?{query}", headers=ADMIN_AUTH, timeout=60)
    assert answer.status_code == status and said in answer.json()["error"]
    assert "\n" not in answer.json()["error"]
    assert requests.get(f"{server.url}/v1/adapters/liver/versions", headers=AUTH,
                        timeout=30).json()["serving"] == 2
    unknown = requests.post(f"{server.url}/v1/segment", headers=AUTH, data={"adapter": "liver@9"},
                            files={"file": ("scan.nii.gz", b"x")}, timeout=60)
    assert unknown.status_code == 404 and "no version 9" in unknown.json()["error"]


def test_requests_during_swaps_all_succeed_each_answered_by_one_version(server, setup):
    """Rollbacks and promotions while a steady client load runs: no request fails, and each answer's
    labels are exactly those of the version its header names (never a mix of two)."""
    from concurrent.futures import ThreadPoolExecutor

    fingerprints = setup["fingerprints"]
    expected = {fingerprints[n]: _segment(server, f"liver@{n}")[1] for n in (1, 2)}
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(_segment, server, "liver") for _ in range(12)]
        for version in (1, 2, 1, 2, 1, 2):
            swap = requests.post(f"{server.url}/v1/adapters/liver/serve?version={version}", headers=ADMIN_AUTH,
                                 timeout=60)
            assert swap.status_code == 200, swap.text
        results = [a.result(timeout=300) for a in answers]  # _segment asserts 200 on each
    for served, labels in results:
        np.testing.assert_array_equal(labels, expected[served])
    assert requests.get(f"{server.url}/v1/adapters/liver/versions", headers=AUTH, timeout=30).json()["serving"] == 2


@pytest.mark.parametrize("adapters, versions, said", [
    (b"not json", b"{}", "without a list of adapters"),
    (b'[{"name": "liver"}]', b"{}", "without a list of adapters"),
    (b'{"adapters": [{"name": "liver", "config": {"num_classes": 1}}]}', b"{}", "without its fingerprint"),
    (None, b'{"versions": "many"}', "without a list of versions"),
    (None, b'{"versions": [{"version": 1}]}', "lists adapter 'liver@1' without its fingerprint"),
])
def test_a_peer_answering_other_than_a_server_is_one_line_not_a_traceback(setup, adapters, versions, said):
    """`segment --server` against a peer whose adapter or version list is not what samed-adapter
    serves: a ServerError naming what is missing, never a KeyError or TypeError."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from samed_adapter.serve.client import ServerClient, ServerError

    good = {"name": "liver", "fingerprint": setup["fingerprints"][2], "base_fingerprint": "sha256:" + "0" * 64,
            "config": sa.AdapterConfig(num_classes=3, image_size=64).to_dict()}
    bodies = {"/v1/adapters": adapters or json.dumps({"adapters": [good]}).encode(),
              "/v1/adapters/liver/versions": versions}

    class Peer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = bodies.get(self.path, b"{}")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    peer = ThreadingHTTPServer(("127.0.0.1", 0), Peer)
    threading.Thread(target=peer.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ServerError, match=said) as raised:
            ServerClient(f"http://127.0.0.1:{peer.server_address[1]}").adapter("liver@1")
        assert "\n" not in str(raised.value)
    finally:
        peer.shutdown()
