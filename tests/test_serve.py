"""`samed-adapter serve` end to end: a real server (local Ray and Ray Serve, a tiny random SAM),
called with MONAI Label's own client, `segment --server` and plain HTTP."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'samed-adapter[serve]'")

import samed_adapter as sa  # noqa: E402
from samed_adapter.segment.outputs import record_path, same_record  # noqa: E402
from samed_adapter.segment.pipeline import SamSource  # noqa: E402
from samed_adapter.serve import ServeSettings, start  # noqa: E402
from samed_adapter.serve.client import ServerError, segment_on_server  # noqa: E402
from samed_adapter.testing import random_adapter  # noqa: E402
from samed_adapter.testing.cli import run  # noqa: E402
from samed_adapter.testing.dicom import write_ct_slice  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KINDS = {"liver3": (3, 11), "other3": (3, 12), "liver1": (1, 13)}  # name: (K, seed); two K's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three adapters made on build_sam("tiny", seed=0), that SAM's checkpoint, two real scans:
    a crop of nilearn's MNI152 template (NIfTI) and a CT series from pydicom's CT_small."""
    from nilearn.datasets import load_mni152_template

    root = tmp_path_factory.mktemp("serve")
    sam = sa.build_sam("tiny", seed=0)
    (root / "adapters").mkdir()
    for name, (k, seed) in KINDS.items():
        config = sa.AdapterConfig(num_classes=k, image_size=64, class_names=["liver", "kidney", "spleen"][:k],
                                  intensity_window=(0.0, 1.0))
        random_adapter(sam, config, seed=seed).save(root / "adapters" / f"{name}.safetensors")
    torch.save(sam.state_dict(), root / "sam_tiny.pth")
    mni = load_mni152_template(resolution=2)
    data = np.asarray(mni.dataobj, dtype=np.float32)[20:70, 30:90, 30:60]
    (root / "scans").mkdir()
    nib.save(nib.Nifti1Image(data / data.max(), mni.affine), root / "scans" / "mni.nii.gz")
    return {"root": root, "adapters": root / "adapters", "sam": root / "sam_tiny.pth",
            "mni": root / "scans" / "mni.nii.gz"}


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    # A temporary folder of its own: another `samed-adapter serve` on this machine has its requests'
    # folders in the shared one.
    settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[str(files["adapters"])],
                             port=_free_port(), token=TOKEN, max_batch_size=8, batch_wait_ms=20, max_queue=8,
                             max_upload_mb=2, max_resident=2, tmp_dir=str(tmp_path_factory.mktemp("serve-tmp")))
    with start(settings) as running:
        yield running


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _local(capsys, files, adapter: str, inputs, out: Path, *extra) -> None:
    code, _, err = run(capsys, "segment", "--sam", files["sam"], "--adapter", files["adapters"] / f"{adapter}.safetensors",
                       *inputs, "-o", out, *extra)
    assert code == 0, err


def _metric(server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", headers=AUTH, timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_three_adapters_interleaved_equal_local_runs(capsys, files, server, ct_series, tmp_path):
    from monailabel.client import MONAILabelClient

    inputs = [files["mni"], ct_series]
    local = {}
    for name in KINDS:
        _local(capsys, files, name, inputs, tmp_path / f"local_{name}")
        local[name] = {"mni": _labels(tmp_path / f"local_{name}" / "mni.nii.gz"),
                       "ct": _labels(tmp_path / f"local_{name}" / "ct.nii.gz")}
    assert local["liver1"]["mni"].max() <= 1 < local["liver3"]["mni"].max()

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    client.update_auth({"token_type": "Bearer", "access_token": TOKEN})
    info = client.info()
    assert set(info["models"]) == set(KINDS)
    assert info["models"]["liver1"]["labels"] == {"liver": 1} and info["models"]["liver3"]["type"] == "segmentation"

    def remote(name: str, i: int):
        if i % 2:  # MONAI Label's own client, as 3D Slicer's module calls it
            path, params = client.infer(name, "mni", {}, file=str(files["mni"]))
            return name, "monai", _labels(Path(path)), params
        results = segment_on_server(inputs, tmp_path / f"server_{name}_{i}", server=server.url, adapter=name,
                                    token=TOKEN, workers=1)
        assert [r.status for r in results] == ["written", "written"], [r.message for r in results]
        out = tmp_path / f"server_{name}_{i}"
        return name, "native", {"mni": _labels(out / "mni.nii.gz"), "ct": _labels(out / "ct.nii.gz")}, None

    work = [(name, i) for i in range(2) for name in KINDS]  # interleaved: liver3, other3, liver1, liver3, ...
    # Whether slices of two requests meet in one batch depends on this machine's timing; every
    # round checks every answer, and some round (of at most three) must have mixed adapters.
    for _ in range(3):
        batches, mixed = _metric(server, "samed_batch_adapters_count"), _metric(server, "samed_batch_adapters_sum")
        with ThreadPoolExecutor(len(work)) as pool:
            answers = list(pool.map(lambda w: remote(*w), work))
        for name, kind, labels, params in answers:
            if kind == "monai":
                np.testing.assert_array_equal(labels, local[name]["mni"])
                assert params["label_names"] == {n: i for i, n in
                                                 enumerate(["liver", "kidney", "spleen"][:KINDS[name][0]], 1)}
            else:
                np.testing.assert_array_equal(labels["mni"], local[name]["mni"])
                np.testing.assert_array_equal(labels["ct"], local[name]["ct"])
        new_batches = _metric(server, "samed_batch_adapters_count") - batches
        if _metric(server, "samed_batch_adapters_sum") - mixed > new_batches:  # a batch held two adapters
            break
    else:
        pytest.fail("in three rounds of six concurrent requests for three adapters, no batch mixed adapters")


def test_monai_label_answers_never_overwrite_each_other_in_the_clients_folder(files, server, tmp_path):
    # 3D Slicer keeps one client, and the client saves each answer as tmpdir/<the answer's file name>.
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    client.update_auth({"token_type": "Bearer", "access_token": TOKEN})
    first, _ = client.infer("liver3", "mni", {}, file=str(files["mni"]))
    kept = Path(first).read_bytes()
    second, _ = client.infer("liver1", "mni", {}, file=str(files["mni"]))
    assert first != second and Path(first).name.startswith("mni.") and second.endswith(".nii.gz")
    assert Path(first).read_bytes() == kept
    assert _labels(Path(first)).max() > 1 >= _labels(Path(second)).max()


def test_segment_server_writes_what_a_local_run_writes(capsys, files, server, ct_series, tmp_path):
    extra = ["--statistics", "--split", "--classes", "liver,spleen", "--save-probabilities"]
    _local(capsys, files, "liver3", [files["mni"], ct_series], tmp_path / "local", *extra)
    code, out, err = run(capsys, "segment", "--server", server.url, "--token", TOKEN, "--adapter", "liver3",
                         files["mni"], ct_series, "-o", tmp_path / "remote", *extra)
    assert code == 0, err
    assert "segmented 2 of 2 inputs" in out
    local_files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    remote_files = sorted(p.relative_to(tmp_path / "remote") for p in (tmp_path / "remote").rglob("*") if p.is_file())
    assert remote_files == local_files and len(local_files) == 2 * 6  # labels, stats, 2 masks, npz, record
    for rel in local_files:
        a, b = tmp_path / "local" / rel, tmp_path / "remote" / rel
        if rel.name.endswith(".nii.gz"):
            np.testing.assert_array_equal(_labels(a), _labels(b))
            np.testing.assert_array_equal(nib.load(a).affine, nib.load(b).affine)
        elif rel.suffix == ".npz":
            # Batches of other sizes than a local run's round a few float16 values the other way (one
            # unit in the last place); the labels they give are equal, voxel for voxel, as asserted above.
            with np.load(a) as x, np.load(b) as y:
                np.testing.assert_allclose(x["probabilities"].astype(np.float32),
                                           y["probabilities"].astype(np.float32), rtol=0, atol=5e-4)
                np.testing.assert_array_equal(x["probabilities"].argmax(0), y["probabilities"].argmax(0))
        elif rel.name.endswith("_statistics.json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text())
    # A DICOM series goes up zipped; its DICOM-SEG and RTSTRUCT cover the same voxels as a local run's.
    from samed_adapter.io import read_dicom_seg, read_image, read_rtstruct

    both = ["--output-type", "nifti,dicom-seg,dicom-rtstruct"]
    _local(capsys, files, "other3", [ct_series], tmp_path / "local_seg", *both)
    code, _, err = run(capsys, "segment", "--server", server.url, "--token", TOKEN, "--adapter", "other3",
                       ct_series, "-o", tmp_path / "remote_seg", *both)
    assert code == 0, err
    volume = read_image(ct_series)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "remote_seg" / "ct_seg.dcm", volume),
                                  read_dicom_seg(tmp_path / "local_seg" / "ct_seg.dcm", volume))
    np.testing.assert_array_equal(read_rtstruct(tmp_path / "remote_seg" / "ct_rtstruct.dcm", volume),
                                  read_rtstruct(tmp_path / "local_seg" / "ct_rtstruct.dcm", volume))
    # --continue: the records say the server's outputs were made as asked, so nothing is sent again.
    code, out, _ = run(capsys, "segment", "--server", server.url, "--token", TOKEN, "--adapter", "liver3",
                       files["mni"], ct_series, "-o", tmp_path / "remote", *extra, "--continue")
    assert code == 0 and "segmented 0 of 2 inputs" in out and "2 skipped" in out


def _post(server, *, adapter="liver3", file=("ct.nii.gz", b""), headers=AUTH, **fields):
    return requests.post(f"{server.url}/v1/segment", headers=headers, data={"adapter": adapter, **fields},
                         files={"file": file}, timeout=60)


def test_ctrl_c_stops_a_server_run_and_sends_nothing_more(files, server, tmp_path):
    """Ctrl-C while answers come back (here: raised where the first result is reported): the inputs
    not yet sent are never sent, the one in flight finishes, every file written is complete."""
    inputs = [tmp_path / "in" / f"s{i}.nii.gz" for i in range(8)]
    inputs[0].parent.mkdir()
    for path in inputs:
        path.write_bytes(files["mni"].read_bytes())
    seen = []

    def stop(result):
        seen.append(result)
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        segment_on_server([inputs[0].parent], out, server=server.url, adapter="liver3", token=TOKEN, workers=1,
                          on_result=stop)
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(seen) == 1 and 1 <= len(written) <= 2, written  # the reported one, and at most one in flight
    for name in written:
        assert _labels(out / name).shape == _labels(files["mni"]).shape
        assert same_record(out / name, json.loads(record_path(out / name).read_text()))  # finished, not pending
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_bad_requests_get_their_codes_and_the_server_goes_on(files, server, tmp_path):
    mni = files["mni"].read_bytes()
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../etc/evil.dcm", b"x")
    header = nib.Nifti1Header()  # a 46.6 GiB float32 volume, by its header; the file is 1.4 kB
    header.set_data_shape((5000, 5000, 500))
    header.set_data_dtype(np.float32)
    bomb = header.binaryblock + b"\0" * 1004
    no_study = io.BytesIO()  # slices without StudyInstanceUID: a NIfTI can be made, a DICOM-SEG cannot
    with zipfile.ZipFile(no_study, "w") as zf:
        for k in range(3):
            write_ct_slice(tmp_path / f"s{k}.dcm", np.full((32, 32), 40 * k), [0.0, 0.0, 2.0 * k],
                           iop=[1, 0, 0, 0, 1, 0], spacing=[0.7, 0.7], series="1.2.840.99.78", intercept=0.0)
            zf.write(tmp_path / f"s{k}.dcm", f"s{k}.dcm")
    cases = [
        (dict(file=("ct.zip", no_study.getvalue()), output_type="dicom-seg"), 422, "StudyInstanceUID"),
        (dict(adapter="nope", file=("mni.nii.gz", mni)), 404, "no adapter named 'nope'"),
        (dict(file=("bomb.nii", bomb)), 413, "1,073,741,824 voxels; if it is real and the memory is there, "
                                             "raise the server's limit (samed-adapter serve --max-voxels)"),
        (dict(file=("mni.nii.gz", mni), headers={}), 401, "Bearer"),
        (dict(file=("mni.nii.gz", mni), headers={"Authorization": "Bearer wrong"}), 401, "Bearer"),
        (dict(file=("mni.nii.gz", b"not a nifti at all")), 422, "upload"),
        (dict(file=("scan.png", b"\x89PNG")), 422, "NIfTI"),
        (dict(file=("big.nii.gz", b"\0" * (3 * 2**20))), 413, "--max-upload-mb"),
        (dict(file=("mni.nii.gz", mni), classes="brain"), 400, "classes"),
        (dict(file=("mni.nii.gz", mni), window="abc"), 400, "window"),
        (dict(file=("mni.nii.gz", mni), output_type="dicom-seg"), 400, "DICOM"),
        (dict(file=("series.zip", evil.getvalue())), 400, "'..'"),
        (dict(file=("mni.nii.gz", mni), name="../x.nii.gz"), 400, "plain file name"),
    ]
    for kwargs, status, words in cases:
        answer = _post(server, **kwargs)
        assert answer.status_code == status, (kwargs.get("adapter"), answer.text)
        body = answer.json()
        assert body["status"] == status and words in body["error"] and "Traceback" not in body["error"]
        assert "samed-serve-" not in body["error"], body  # the server's folders are its own business
    answer = requests.post(f"{server.url}/infer/nope", headers=AUTH, files={"file": ("mni.nii.gz", mni)}, timeout=60)
    assert answer.status_code == 404 and "nope" in answer.json()["error"]
    answer = requests.post(f"{server.url}/v1/segment", data=b"garbage", timeout=60,
                           headers={**AUTH, "Content-Type": "multipart/form-data"})  # no boundary
    assert answer.status_code == 400 and "multipart" in answer.json()["error"]
    answer = requests.get(f"{server.url}/v2/segment", headers=AUTH, timeout=60)
    assert answer.status_code == 404 and "POST /v1/segment" in answer.json()["error"]
    with pytest.raises(ServerError, match="401"):
        segment_on_server([files["mni"]], tmp_path / "x", server=server.url, adapter="liver3", token="wrong")
    # Still answering, with the right labels, and no upload left behind; the folder of another
    # server's request in the shared temporary folder is neither counted nor touched.
    other = Path(tempfile.mkdtemp(prefix="samed-serve-"))
    try:
        answer = _post(server, file=("mni.nii.gz", mni))
        assert answer.status_code == 200 and "mni.nii.gz" in zipfile.ZipFile(io.BytesIO(answer.content)).namelist()
        assert requests.get(f"{server.url}/healthz", timeout=10).json()["status"] == "ok"
        assert _no_folder_left(server) and other.is_dir()
    finally:
        other.rmdir()


def _folders(server) -> list[Path]:
    return list(Path(server.settings.tmp_dir).glob("samed-serve-*"))


def _no_folder_left(server, timeout_s: float = 10.0) -> bool:
    """Whether the server's temporary folder holds no request folder, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while _folders(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _folders(server)


def test_an_overloaded_server_answers_503_and_the_rest_200(files, server):
    mni = files["mni"].read_bytes()
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: _post(server, file=("mni.nii.gz", mni)), range(24)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) == {200, 503} and codes.count(200) >= 8, codes
    busy = next(a for a in answers if a.status_code == 503)
    assert "--max-queue" in busy.json()["error"] and busy.headers["Retry-After"]


def test_files_added_later_are_found_and_the_least_recently_used_goes(files, server):
    source = files["adapters"] / "liver1.safetensors"
    late = files["adapters"] / "late.safetensors"
    late.write_bytes(source.read_bytes())
    try:
        listed = requests.get(f"{server.url}/v1/adapters", headers=AUTH, timeout=30).json()["adapters"]
        assert {a["name"]: a["resident"] for a in listed}["late"] is False
        assert {"name", "class_names", "backbone", "image_size", "rank", "fingerprint", "base_fingerprint",
                "resident"} <= set(listed[0])
        mni = files["mni"].read_bytes()
        first = _post(server, adapter="late", file=("mni.nii.gz", mni))
        again = _post(server, adapter="liver1", file=("mni.nii.gz", mni))
        assert first.status_code == again.status_code == 200
        listed = requests.get(f"{server.url}/v1/adapters", headers=AUTH, timeout=30).json()["adapters"]
        resident = {a["name"] for a in listed if a["resident"]}
        assert resident == {"late", "liver1"}  # --max-resident 2: the two used last
        a, b = (zipfile.ZipFile(io.BytesIO(x.content)).read("mni.nii.gz") for x in (first, again))
        assert nib.Nifti1Image.from_bytes(_gunzip(a)).get_fdata().tolist() == \
            nib.Nifti1Image.from_bytes(_gunzip(b)).get_fdata().tolist()
    finally:
        late.unlink()


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data)


def test_serve_refuses_an_open_host_without_a_token(capsys, files, monkeypatch):
    monkeypatch.delenv("SAMED_SERVE_TOKEN", raising=False)
    code, _, err = run(capsys, "serve", "--sam-backbone", "tiny", "--random-sam-seed", 0, "--adapters",
                       files["adapters"], "--host", "0.0.0.0")
    assert code == 2 and "needs a token" in err and "Traceback" not in err
    code, _, err = run(capsys, "segment", "--adapter", "liver3", files["mni"], "-o", "out")
    assert code == 2 and "--server URL" in err


def test_a_tmp_dir_that_is_no_folder_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match=r"tmp_dir .*missing is not a folder: create it first"):
        ServeSettings(sam=SamSource(backbone="tiny", seed=0), tmp_dir=str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()
    assert ServeSettings(sam=SamSource(backbone="tiny", seed=0), tmp_dir=str(tmp_path)).tmp_dir == str(tmp_path)


def test_a_replica_that_dies_is_replaced_and_no_answer_is_wrong(files, server):
    """Ray Serve starts a new replica; meanwhile a client gets 503 (retry) or the right labels."""
    import ray

    mni = files["mni"].read_bytes()
    expected = zipfile.ZipFile(io.BytesIO(_post(server, file=("mni.nii.gz", mni)).content)).read("mni.nii.gz")
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Segmenter" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    codes = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = _post(server, file=("mni.nii.gz", mni))
        codes.append(answer.status_code)
        if answer.status_code == 200:
            got = zipfile.ZipFile(io.BytesIO(answer.content)).read("mni.nii.gz")
            assert _gunzip(got) == _gunzip(expected)
            break
        assert answer.status_code == 503 and "retry" in answer.json()["error"], answer.text
        time.sleep(1)
    assert codes[-1] == 200, codes
    now = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Segmenter" in a["name"]]
    assert now and replicas[0]["name"] not in now  # answered by the new replica


def test_3d_slicer_logs_in_with_the_token_as_password(server):
    """MONAI Label's login (what 3D Slicer's module does when the server says auth is enabled)."""
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    client = MONAILabelClient(server.url)
    assert client.auth_enabled() is True
    with pytest.raises(MONAILabelClientException, match="401"):
        client.auth_token("radiologist", "wrong")
    client.update_auth(client.auth_token("radiologist", TOKEN))
    assert client.auth_valid_token() is True
    assert set(client.info()["models"]) == set(KINDS)


def _multipart(fields: dict[str, str], file: tuple[str, bytes]) -> tuple[str, bytes]:
    """(Content-Type, body) of a form as `curl -F` sends it."""
    boundary = "samed-test-boundary-7f3a"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file[0]}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + file[1] + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def _dropping_client(server, upload: bytes, body_part: float, read: int, **fields: str) -> bytes:
    """POST /v1/segment of ``upload`` over a raw socket: send ``body_part`` of the body, wait until the server
    holds the request's folder (a partial upload) or read ``read`` bytes of the answer (-1: its
    headers), then close the socket. Returns what was read."""
    content_type, body = _multipart({"adapter": "liver3", **fields}, ("mni.nii.gz", upload))
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    head = (f"POST /v1/segment HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    got = b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + body[: int(len(body) * body_part)])
        if body_part < 1:
            deadline = time.monotonic() + 30
            while not _folders(server) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _folders(server), "the server made no request folder in its --tmp-dir for the upload"
            return got
        while read and (b"\r\n\r\n" not in got if read < 0 else len(got) < read):
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    return got


def test_a_client_that_drops_leaves_no_scan_on_the_servers_disk(files, server):
    """Gone during the upload, before the answer, after its headers or in its middle: the request's
    folder (upload, labels, zip) is removed each time, by the time the server is done with it."""
    mni = files["mni"].read_bytes()
    # Noise, so that its probabilities make an answer of some MB, which takes a while to go out.
    noise = np.random.default_rng(3).integers(0, 255, (120, 120, 100), dtype=np.uint8)
    upload = _gzip(nib.Nifti1Image(noise, np.eye(4)).to_bytes())
    _dropping_client(server, mni, 0.5, 0)  # during the upload
    assert _no_folder_left(server, 30)
    _dropping_client(server, mni, 1, 0)  # before the answer
    assert _no_folder_left(server, 30)
    head = _dropping_client(server, upload, 1, -1, probabilities="true")  # after the headers
    assert head.startswith(b"HTTP/1.1 200") and b"x-adapter-fingerprint: sha256:" in head.lower()
    assert _no_folder_left(server, 30)
    part = _dropping_client(server, upload, 1, 100_000, probabilities="true")  # in the middle of the answer
    assert part.startswith(b"HTTP/1.1 200") and len(part) >= 100_000
    assert _no_folder_left(server, 30)
    answer = _post(server, file=("mni.nii.gz", mni))  # and it goes on
    assert answer.status_code == 200 and _no_folder_left(server)


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1)


def _replace_keeping_size_and_mtime(path: Path, source: Path) -> None:
    """Overwrite ``path`` in place with ``source``'s bytes and put its mtime back, as `cp -p` does."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(source.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _answer(response) -> tuple[str, dict, bytes]:
    """(the X-Adapter-Fingerprint header, the record, the labels' NIfTI bytes) of a /v1/segment answer."""
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    record = json.loads(archive.read(record_path(Path("mni.nii.gz")).as_posix()))
    return response.headers["X-Adapter-Fingerprint"], record, _gunzip(archive.read("mni.nii.gz"))


def test_an_adapter_replaced_with_the_same_size_and_mtime_answers_as_the_new_one(files, server):
    """`cp -p` over a served adapter: the next request is answered by the new file, and says so."""
    mni = files["mni"].read_bytes()
    swap, liver3, other3 = (files["adapters"] / f"{n}.safetensors" for n in ("swap", "liver3", "other3"))
    shutil.copyfile(liver3, swap)
    try:
        before = _answer(_post(server, adapter="swap", file=("mni.nii.gz", mni)))  # now resident
        assert before[0] == before[1]["adapter_fingerprint"] == sa.Adapter.load(liver3).fingerprint
        _replace_keeping_size_and_mtime(swap, other3)
        after = _answer(_post(server, adapter="swap", file=("mni.nii.gz", mni)))
        want = _answer(_post(server, adapter="other3", file=("mni.nii.gz", mni)))
        assert after[0] == after[1]["adapter_fingerprint"] == want[0] == sa.Adapter.load(other3).fingerprint
        assert after[2] == want[2] != before[2]
    finally:
        swap.unlink()


def test_an_adapter_replaced_while_requests_run_never_gives_a_mixed_answer(files, server):
    """A file flipped between two versions every 10 ms while six requests are answered: each answer
    is one version's labels, and its header and record name that version, or it is a 409."""
    mni = files["mni"].read_bytes()
    sources = [files["adapters"] / "liver3.safetensors", files["adapters"] / "other3.safetensors"]
    versions = {fingerprint: labels for fingerprint, _, labels in
                (_answer(_post(server, adapter=p.stem, file=("mni.nii.gz", mni))) for p in sources)}
    assert len(versions) == 2 and len(set(versions.values())) == 2
    flip, staged = files["adapters"] / "flip.safetensors", files["root"] / "flip.staged"
    shutil.copyfile(sources[0], flip)
    stop = threading.Event()

    def flipper() -> None:
        for i in range(3000):  # at most 30 s
            if stop.wait(0.01):
                return
            shutil.copyfile(sources[i % 2], staged)
            os.replace(staged, flip)

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    try:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: _post(server, adapter="flip", file=("mni.nii.gz", mni)), range(6)))
    finally:
        stop.set()
        thread.join()
        flip.unlink()
    assert {a.status_code for a in answers} <= {200, 409} and 200 in {a.status_code for a in answers}
    for answer in answers:
        if answer.status_code == 409:
            assert "'flip' was replaced" in answer.json()["error"]
            continue
        header, record, labels = _answer(answer)
        assert header == record["adapter_fingerprint"] and labels == versions[header]
