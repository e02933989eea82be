"""MONAI Label's datastore on `samed-adapter serve --datastore FOLDER` (issue 32): a real server (local
Ray, Ray Serve, one replica on a tiny random SAM) called with MONAI Label's own client, as 3D Slicer's
module calls it (upload, infer by id, submit a label, next sample) and as its datastore endpoints
answer; every refusal is checked to leave the folder's JSON and files as they were."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'samed-adapter[serve]'")
pytest.importorskip("monailabel", reason="MONAI Label's client is not installed")

from samed_adapter.datastore import DatastoreError, DatastoreFormatError, FolderDatastore, uncertainty  # noqa: E402
from samed_adapter.datastore.opening import open_datastore  # noqa: E402
from samed_adapter.segment.pipeline import SamSource  # noqa: E402
from samed_adapter.serve import ServeSettings, start  # noqa: E402
from samed_adapter.serve.store_routes import SCORES, StoreRoutes  # noqa: E402
from samed_adapter.testing import random_adapter  # noqa: E402
from samed_adapter.testing.tiny import CONFIGS, stock_sam  # noqa: E402

TOKEN, ADMIN = "store-token", "store-admin"
BRAIN = dataclasses.replace(CONFIGS["k3"], num_classes=2, class_names=["grey", "white"])
WIDE = dataclasses.replace(CONFIGS["k3"], class_names=["a", "b", "c"])
SLABS = {"case_a": (30, 36), "case_b": (36, 42), "case_c": (42, 48), "case_d": (48, 54)}


def _slab(array: np.ndarray, affine: np.ndarray, z: tuple[int, int], shift: float = 0.0) -> nib.Nifti1Image:
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.array([0, 0, z[0]]) + affine[:3, 3] + shift
    return nib.Nifti1Image(np.ascontiguousarray(array[:, :, z[0]:z[1]]), moved)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters (K=2 "brain", K=3 "wide") on stock_sam(); slabs of MNI152 with their grey/white labels."""
    from samed_adapter.cli.demo import mni_volumes

    root = tmp_path_factory.mktemp("store")
    (root / "adapters").mkdir()
    random_adapter(stock_sam(), BRAIN, seed=1).save(root / "adapters" / "brain.safetensors")
    random_adapter(stock_sam(), WIDE, seed=2).save(root / "adapters" / "wide.safetensors")
    image, labels, affine = mni_volumes()
    image = image.astype(np.float32) / 255  # the adapters record no intensity window: inputs in [0, 1]
    out: dict[str, Path] = {"root": root, "adapters": root / "adapters"}
    for case, z in SLABS.items():
        nib.save(_slab(image, affine, z), root / f"{case}.nii.gz")
        nib.save(_slab(labels, affine, z), root / f"{case}_label.nii.gz")
        out[case], out[f"{case}_label"] = root / f"{case}.nii.gz", root / f"{case}_label.nii.gz"
    nib.save(_slab(labels, affine, SLABS["case_a"], shift=4.0), root / "shifted_label.nii.gz")
    nib.save(_slab(np.minimum(labels + 1, 3).astype(np.uint8), affine, SLABS["case_a"]), root / "class3.nii.gz")
    nib.save(_slab(image, affine, (60, 66)), root / "other.nii.gz")
    (root / "notes.txt").write_text("not an image")
    out.update(shifted=root / "shifted_label.nii.gz", class3=root / "class3.nii.gz", other=root / "other.nii.gz",
               text=root / "notes.txt")
    return out


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[str(files["adapters"])], port=port,
                             token=TOKEN, admin_token=ADMIN, replicas=1, batch_wait_ms=2,
                             datastore=str(tmp_path_factory.mktemp("datastore")),
                             tmp_dir=str(tmp_path_factory.mktemp("store-tmp")))
    with start(settings) as running:
        yield running


@pytest.fixture()
def client(server, tmp_path):
    from monailabel.client import MONAILabelClient

    made = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="slicer-test")
    made.update_auth({"token_type": "Bearer", "access_token": TOKEN})
    return made


def _http(server, method: str, route: str, token: str = TOKEN, **kwargs):
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{server.url}{route}", headers=headers, timeout=60, **kwargs)


def _status(err: Exception) -> int:
    return int(re.match(r"Status: (\d+);", err.msg).group(1))  # type: ignore[attr-defined, union-attr]


def _snapshot(server) -> dict[str, str]:
    """Every file of the datastore folder (the JSON included) and of the requests' tmp folder, by content hash."""
    seen = {}
    for root in (Path(server.settings.datastore), Path(server.settings.tmp_dir)):
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name != ".lock":
                seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                seen[str(p)] = "folder"
    return seen


def _sha(path: Path) -> str:
    return "SHA256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fingerprint(server, name: str) -> str:
    return next(a["fingerprint"] for a in _http(server, "GET", "/v1/adapters").json()["adapters"] if a["name"] == name)


def test_a_damaged_datastore_stops_the_start_in_one_line(tmp_path, files):
    # first in the file: without the check, start() would deploy a front that fails (a DeployError, later)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "datastore_v2.json").write_text("{damaged")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[str(files["adapters"])], port=port,
                             datastore=str(tmp_path / "store"))
    with pytest.raises(DatastoreFormatError, match="damaged .* restore it from a backup"):
        start(settings)


def test_info_advertises_the_datastore_and_the_three_strategies(client, files):
    client.upload_image(str(files["case_d"]), "case_d")
    info = client.info()
    assert list(info["strategies"]) == ["first", "random", "least_sure"]
    assert info["strategies"]["least_sure"]["config"] == {"model": ["brain", "wide"]}  # Slicer: a drop-down
    assert info["datastore"]["total"] >= 1 and "completed" in info["datastore"]


def test_upload_list_and_fetch_back_byte_equal(client, server, files, tmp_path):
    assert client.upload_image(str(files["case_a"]), "case_a") == {"image": "case_a"}
    objects = client.datastore()["objects"]
    assert objects["case_a"]["image"]["info"]["checksum"] == _sha(files["case_a"])
    assert objects["case_a"]["image"]["info"]["client_id"] == "slicer-test"
    got = _http(server, "GET", "/datastore/image?image=case_a")
    assert got.status_code == 200 and got.content == files["case_a"].read_bytes()
    assert _http(server, "HEAD", f"/datastore/image?image=case_a&check_sum={_sha(files['case_a'])}").status_code == 200
    assert _http(server, "HEAD", "/datastore/image?image=case_a&check_sum=SHA256:00").status_code == 404
    # PUT /datastore/image is the same upload; the same image again (Slicer's Run after a restart) is no error
    again = _http(server, "PUT", "/datastore/image?image=case_a", files={"file": ("x.nii.gz", got.content)})
    assert again.status_code == 200 and again.json() == {"image": "case_a", "exists": True}
    resaved = nib.load(files["case_a"])  # other bytes (an uncompressed file, another header), the same voxels
    resaved.header["descrip"] = b"saved again by a viewer"
    nib.save(resaved, tmp_path / "resaved.nii")
    assert client.upload_image(str(tmp_path / "resaved.nii"), "case_a") == {"image": "case_a", "exists": True}
    assert _http(server, "GET", "/datastore/?output=stats").json()["total"] == len(client.datastore()["objects"])
    train = _http(server, "GET", "/datastore/?output=train").json()
    assert isinstance(train, list)
    info = _http(server, "GET", "/datastore/image/info?image=case_a").json()
    assert info["name"] == "case_a.nii.gz" and info["checksum"] == _sha(files["case_a"])
    put = _http(server, "PUT", "/datastore/image/info?image=case_a", data={"info": json.dumps({"site": "north"})})
    assert put.status_code == 200 and put.json()["site"] == "north"


def test_infer_by_id_equals_the_upload_and_keeps_the_original_label(client, server, files):
    client.upload_image(str(files["case_b"]), "case_b")
    by_file, _ = client.infer("brain", "case_b", {}, file=str(files["case_b"]))
    by_id, params = client.infer("brain", "case_b", {"save_label": True})
    expected = np.asarray(nib.load(by_file).dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(by_id).dataobj), expected)
    score = params["datastore"]["uncertainty"]
    assert 0.0 < score < 1.0 and params["datastore"]["label_tag"] == "original"
    original = client.datastore()["objects"]["case_b"]["labels"]["original"]["info"]
    assert original["params"]["label_names"] == {"grey": 1, "white": 2}  # what Slicer reads with a next sample
    assert original["model"] == "brain"
    saved = client.download_label("case_b", "original")
    np.testing.assert_array_equal(np.asarray(nib.load(saved).dataobj), expected)
    recorded = _http(server, "GET", "/datastore/image/info?image=case_b").json()[SCORES]
    assert recorded[_fingerprint(server, "brain")]["uncertainty"] == score


def test_a_submitted_label_is_kept_and_read_back(client, server, files):
    client.upload_image(str(files["case_c"]), "case_c")
    label_info = [{"name": "grey", "idx": 1}, {"name": "white", "idx": 2}]
    answer = client.save_label("case_c", str(files["case_c_label"]),
                               params={"label_info": label_info, "model": "brain"})
    assert answer == {"image": "case_c", "label": "case_c", "tag": "final"}
    assert Path(client.download_label("case_c", "final")).read_bytes() == files["case_c_label"].read_bytes()
    info = _http(server, "GET", "/datastore/label/info?label=case_c&tag=final").json()
    assert info["label_info"] == label_info and info["checksum"] == _sha(files["case_c_label"])
    assert _http(server, "HEAD", "/datastore/label?image=case_c&tag=final").status_code == 200
    assert _http(server, "HEAD", "/datastore/label?image=case_c&tag=nope").status_code == 404
    train = _http(server, "GET", "/datastore/?output=train").json()  # what a training job reads
    assert [Path(i["label"]).name for i in train] == ["case_c.nii.gz"]
    put = _http(server, "PUT", "/datastore/label/info?label=case_c&tag=final", data={"info": '{"reviewed": true}'})
    assert put.json()["reviewed"] is True


def test_ohifs_binary_label_is_read_as_monai_label_reads_it(client, server, files, tmp_path):
    """OHIF's panel submits a label as its voxel buffer (``label.bin``, one byte per voxel, the first
    axis fastest): it is kept as the NIfTI label on its image's grid; a buffer of another size is refused."""
    client.upload_image(str(files["case_d"]), "case_d")
    truth = np.asarray(nib.load(files["case_d_label"]).dataobj).astype(np.uint8)
    (tmp_path / "label.bin").write_bytes(truth.tobytes(order="F"))
    answer = client.save_label("case_d", str(tmp_path / "label.bin"), params={"model": "brain"})
    assert answer == {"image": "case_d", "label": "case_d", "tag": "final"}
    kept = nib.load(client.download_label("case_d", "final"))
    np.testing.assert_array_equal(np.asarray(kept.dataobj), truth)
    np.testing.assert_allclose(kept.affine, nib.load(files["case_d"]).affine)
    before = _snapshot(server)
    (tmp_path / "short.bin").write_bytes(truth.tobytes(order="F")[:-1])
    with pytest.raises(Exception) as refused:
        client.save_label("case_d", str(tmp_path / "short.bin"), params={"model": "brain"})
    assert _status(refused.value) == 422 and "one byte per voxel" in refused.value.msg
    assert _snapshot(server) == before


def test_refusals_change_nothing_on_disk(client, server, files):
    client.upload_image(str(files["case_a"]), "case_a") if "case_a" not in client.datastore()["objects"] else None
    before = _snapshot(server)
    refusals = [
        (lambda: client.save_label("case_a", str(files["shifted"]), params={"model": "brain"}), 422, "grid"),
        (lambda: client.save_label("case_a", str(files["class3"]), params={"model": "brain"}), 422, "class ids"),
        (lambda: client.save_label("no_such_case", str(files["case_a_label"])), 404, "no image"),
        (lambda: client.save_label("a/../../x", str(files["case_a_label"])), 422, "path separator"),
        (lambda: client.upload_image(str(files["case_a"]), "a/../../escape"), 422, "path separator"),
        (lambda: client.upload_image(str(files["other"]), "case_a"), 409, "rename the volume"),
        (lambda: client.upload_image(str(files["text"]), "notes"), 422, ".nii.gz"),
        (lambda: client.infer("brain", "no_such_case", {}), 404, "no image"),
        (lambda: client.infer("brain", "case_a", {"save_label": True, "label_tag": "final"}), 422, "final"),
    ]
    for call, status, words in refusals:
        with pytest.raises(Exception) as refused:
            call()
        assert _status(refused.value) == status and words in refused.value.msg, refused.value.msg
    for method, route, token, status in [
            ("GET", "/datastore/?output=all", "wrong", 401), ("DELETE", "/datastore/image?id=case_a", TOKEN, 403),
            ("DELETE", "/datastore/label?id=case_a&tag=final", "wrong", 401),
            ("GET", "/datastore/image?image=no_such_case", TOKEN, 404),
            ("PUT", "/datastore/image/info?image=case_a", TOKEN, 400),
            ("PUT", "/datastore/image/info?image=a/../../x", TOKEN, 422),
            ("GET", "/datastore/label?label=.hidden&tag=final", TOKEN, 422)]:
        answer = _http(server, method, route, token, data={"info": '{"checksum": "forged"}'})
        assert answer.status_code == status and answer.json()["status"] == status
    assert _snapshot(server) == before


def test_next_sample_by_each_strategy(client, server, files):
    for case in ("case_a", "case_b", "case_d"):
        if case not in client.datastore()["objects"]:
            client.upload_image(str(files[case]), case)
    objects = client.datastore()["objects"]
    unlabeled = sorted(k for k, v in objects.items() if "final" not in v["labels"])
    picked = client.next_sample("first", {})
    assert picked["id"] == unlabeled[0] and picked["name"] == f"{unlabeled[0]}.nii.gz"
    stamp = client.datastore()["objects"][unlabeled[0]]["image"]["info"]["strategy"]["first"]
    assert stamp["client_id"] == "slicer-test" and stamp["ts"] > 0
    assert client.next_sample("random", {})["id"] in unlabeled
    sure = client.next_sample("least_sure", {"model": "wide"})  # every unlabeled image unscored: all scored now
    fingerprint = _fingerprint(server, "wide")
    scores = {k: v["image"]["info"][SCORES][fingerprint]["uncertainty"]
              for k, v in client.datastore()["objects"].items() if k in unlabeled}
    assert set(scores) == set(unlabeled) and len(set(scores.values())) == len(scores)  # the model's, per image
    assert sure["id"] == max(scores, key=scores.get) and sure["score"] == scores[sure["id"]]
    assert sure["unscored"] == 0
    with pytest.raises(Exception) as unknown:
        client.next_sample("most_wanted", {})
    assert _status(unknown.value) == 404 and "least_sure" in unknown.value.msg


def test_least_sure_scores_at_most_the_number_asked_before_it_picks(client, server, files):
    client.upload_image(str(files["other"]), "late") if "late" not in client.datastore()["objects"] else None
    fingerprint = _fingerprint(server, "wide")

    def unscored() -> list[str]:
        return sorted(k for k, v in client.datastore()["objects"].items()
                      if "final" not in v["labels"] and fingerprint not in v["image"]["info"].get(SCORES, {}))
    before = unscored()
    assert "late" in before
    client.next_sample("least_sure", {"model": "wide", "score": 0})
    assert unscored() == before
    picked = client.next_sample("least_sure", {"model": "wide", "score": 1})
    assert unscored() == before[1:] and picked["unscored"] == len(before) - 1
    with pytest.raises(Exception) as many:
        client.next_sample("least_sure", {"model": "wide", "score": 99})
    assert _status(many.value) == 400 and "0 to 32" in many.value.msg
    with pytest.raises(Exception) as which:
        client.next_sample("least_sure", {})  # two adapters: which one's labels
    assert _status(which.value) == 400 and "brain" in which.value.msg


def test_an_upload_over_the_limit_is_refused_before_its_body(server):
    import http.client
    from urllib.parse import urlparse

    before = _snapshot(server)
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.putrequest("PUT", "/datastore/image?image=huge")
    for key, value in {"Authorization": f"Bearer {TOKEN}", "Content-Length": str(2**40),
                       "Content-Type": "multipart/form-data; boundary=x"}.items():
        connection.putheader(key, value)
    connection.endheaders(b"--x\r\n")  # a little of the terabyte it declared
    answer = connection.getresponse()
    assert answer.status == 413 and "--max-upload-mb" in json.loads(answer.read())["error"]
    connection.close()
    assert _snapshot(server) == before


def test_delete_needs_the_admin_token(client, server, files):
    client.upload_image(str(files["case_d"]), "gone") if "gone" not in client.datastore()["objects"] else None
    client.save_label("gone", str(files["case_d_label"]), params={"model": "brain"})
    label = Path(server.settings.datastore) / "labels" / "final" / "gone.nii.gz"
    assert label.is_file()
    assert _http(server, "DELETE", "/datastore/label?id=gone&tag=final", TOKEN).status_code == 403
    assert _http(server, "DELETE", "/datastore/label?id=gone&tag=final", ADMIN).json() == {}
    assert not label.exists() and "final" not in client.datastore()["objects"]["gone"]["labels"]
    assert _http(server, "DELETE", "/datastore/image?id=gone", ADMIN).status_code == 200
    assert "gone" not in client.datastore()["objects"]
    assert not (Path(server.settings.datastore) / "gone.nii.gz").exists()
    assert _http(server, "DELETE", "/datastore/image?id=gone", ADMIN).status_code == 404


def test_the_replicas_score_is_the_entropy_of_the_volumes_softmax_and_is_kept(tmp_path, files):
    """The replica answers each slice's uncertainty sums, never the softmax; added up over the
    request's slices they give `uncertainty` of the whole (n, K+1, S, S) softmax."""
    import asyncio
    from concurrent.futures import Future

    import torch

    from samed_adapter.serve.residents import ServingModel, SliceQueue, SliceRequest, VolumeRequest

    logits = torch.from_numpy(np.random.default_rng(0).normal(0, 2, (6, 3, 8, 8)).astype(np.float32))
    logits[2, 0] += 20  # one slice sure of its background: it labels nothing there
    queue, answered = SliceQueue(max_batch=4), Future()
    queue.put(VolumeRequest("wide", np.zeros((6, 8, 8), np.float32), score=True), answered)
    while batch := queue.take():  # two batches, 4 and 2 slices, as the replica runs them
        items = SliceQueue.items(batch)
        assert all(isinstance(item, SliceRequest) and item.score for item in items)
        results = ServingModel._batch_results(items, logits[[i for _, i in batch]], {})
        assert all(r.probs is None and len(r.score_sums) == 4 for r in results)  # no softmax in the answer
        SliceQueue.deliver(batch, results)
    volume = answered.result(timeout=0)
    assert volume.probs is None
    whole = uncertainty(np.moveaxis(torch.softmax(logits, 1).numpy(), 1, 0))
    assert 0.0 < whole < 1.0 and volume.score == pytest.approx(whole, rel=1e-6)

    store = StoreRoutes(FolderDatastore(tmp_path / "store"))
    store.datastore.add_image("case_a", files["case_a"])
    entry = {"name": "wide", "fingerprint": "f" * 64}
    assert asyncio.run(store.record_score("case_a", entry, whole)) == whole
    assert store.datastore.get_image_info("case_a")[SCORES]["f" * 64]["uncertainty"] == whole
    for i in range(10):  # only the newest versions' scores are kept
        asyncio.run(store.record_score("case_a", {"name": "wide", "fingerprint": str(i)}, whole))
    assert len(store.datastore.get_image_info("case_a")[SCORES]) == 8


def test_scores_of_several_versions_written_at_once_are_all_kept(tmp_path, files):
    """Each score is merged into the image's info under the datastore's lock, read and written there:
    versions scoring one image at the same moment (requests on two servers) lose none."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path / "store"
    StoreRoutes(FolderDatastore(folder)).datastore.add_image("case_a", files["case_a"])
    stores = [StoreRoutes(FolderDatastore(folder)) for _ in range(6)]  # as six processes would: one object each

    def score(i: int) -> None:
        asyncio.run(stores[i].record_score("case_a", {"name": "wide", "fingerprint": f"v{i}"}, i / 10))

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(score, range(6)))
    kept = FolderDatastore(folder).get_image_info("case_a")[SCORES]
    assert {fp: r["uncertainty"] for fp, r in kept.items()} == {f"v{i}": i / 10 for i in range(6)}


def test_open_datastore_takes_one_kind(tmp_path):
    assert open_datastore(tmp_path / "a").status() == {"total": 0, "completed": 0, "label_tags": {}}
    with pytest.raises(DatastoreError, match="exactly one"):
        open_datastore()
    with pytest.raises(DatastoreError, match="exactly one"):
        open_datastore(tmp_path / "b", "http://127.0.0.1:1/dicom-web")


def test_without_a_datastore_the_routes_say_to_start_with_one():
    import asyncio
    from types import SimpleNamespace

    from samed_adapter.serve.errors import BadRequestError
    from samed_adapter.serve.frontend import Frontend
    from samed_adapter.serve.errors import NoDatastoreError

    front = Frontend.func_or_class  # the class Ray Serve runs; every datastore route starts with require_store()
    with pytest.raises(NoDatastoreError, match="start it with samed-adapter serve --datastore FOLDER") as none:
        front.require_store(SimpleNamespace(store=None))
    assert none.value.status == 501 and "\n" not in str(none.value)
    with pytest.raises(BadRequestError, match="start the server with --datastore FOLDER to infer by image id"):
        asyncio.run(front.stored_image(SimpleNamespace(store=None), "case_a"))


@pytest.mark.parametrize("body", [b"[1]", b"\xff\xfe", b"{", b'"text"'])
def test_a_params_body_that_is_not_a_json_object_is_one_400(body):
    """/activelearning and /train take MONAI Label's params as a JSON body: anything else is one line."""
    from samed_adapter.serve.errors import BadRequestError
    from samed_adapter.serve.store_routes import json_body

    assert json_body(b" \n") == {} and json_body(b'{"client_id": "slicer"}') == {"client_id": "slicer"}
    with pytest.raises(BadRequestError, match=r"^params must be a JSON object, e\.g\. a body of") as refused:
        json_body(body)
    assert refused.value.status == 400
