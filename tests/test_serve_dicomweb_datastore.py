"""`samed-adapter serve --datastore-dicomweb URL` end to end (issue 32): a real server (local Ray, Ray
Serve, one replica on a tiny random SAM) whose datastore is a real Orthanc, called with MONAI Label's
own client as OHIF's MONAI Label panel and 3D Slicer call it: /info/ lists the datastore, the PACS's
series are the images (by SeriesInstanceUID), inference by a series' uid answers labels on its grid
(NIfTI; NRRD in patient space as OHIF's panel asks; a DICOM SEG over the series), a final label
becomes a DICOM SEG in the PACS that references the series, the next sample is an unlabelled series
(first, least_sure), and /train makes a version from the PACS's final labels. A PACS that fails
(gone, refusing, answering what no PACS sends, past a bound) is a 502 naming it, never a 500 (nor a
503 and a stuck job on /train), and /info/ still answers.

One Orthanc and one server for the module: three CT series of one patient (pydicom's CT_small through
`samed_adapter.testing.orthanc.write_study`) and a report (no image). A series' label is what a
threshold of its Hounsfield units gives (soft tissue 1, bone 2), so labels and images agree.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("ray.train", reason="Ray Train is not installed: pip install 'samed-adapter[serve]'")
pytest.importorskip("monailabel", reason="MONAI Label's client is not installed")
pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed: pip install 'samed-adapter[dicomweb]'")
pytest.importorskip("highdicom", reason="highdicom is not installed: pip install 'samed-adapter[io]'")

from samed_adapter.testing.orthanc import INSTALL_HINT, Orthanc, missing, write_study  # noqa: E402

_MISSING = missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING} (Debian: {INSTALL_HINT})")

import pydicom  # noqa: E402

from samed_adapter.adapter_file.config import AdapterConfig  # noqa: E402
from samed_adapter.io import read_image  # noqa: E402
from samed_adapter.learning.versions import VersionStore  # noqa: E402
from samed_adapter.segment.pipeline import SamSource  # noqa: E402
from samed_adapter.serve import ServeSettings, start  # noqa: E402
from samed_adapter.testing import random_adapter  # noqa: E402
from samed_adapter.testing.tiny import stock_sam  # noqa: E402

TOKEN, ADMIN = "pacs-token", "pacs-admin"
CT = AdapterConfig(num_classes=2, image_size=128, intensity_window=None, intensity_percentiles=(1.0, 99.0),
                   class_names=["soft tissue", "bone"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _truth(folder: Path, out: Path) -> np.ndarray:
    """The label of the series in ``folder``: soft tissue (-100..300 HU) 1, bone (over 300 HU) 2, saved at
    ``out`` on the series' grid; its (z, y, x) array."""
    image = read_image(folder)
    labels = np.zeros(image.array.shape, np.uint8)
    labels[(image.array > -100) & (image.array <= 300)] = 1
    labels[image.array > 300] = 2
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.T), image.affine), out)
    return labels


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(the running server, the Orthanc, the study written, {series uid: its true label file})."""
    root = tmp_path_factory.mktemp("pacs-site")
    study = write_study(root / "study", ct_series=3, report=True)
    truths = {uid: root / f"truth{k}.nii.gz" for k, uid in enumerate(study["ct"])}
    for uid, path in truths.items():
        _truth(study["folders"][uid], path)
    (root / "adapters").mkdir()
    (root / "tmp").mkdir()
    random_adapter(stock_sam(), CT, seed=1).save(root / "adapters" / "ct.safetensors")
    with Orthanc(root / "orthanc") as pacs, pytest.MonkeyPatch.context() as env:
        pacs.upload(study["files"])
        env.setenv("SAMED_DICOMWEB_PASSWORD", pacs.password)  # the replicas and the jobs' actor read it
        settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[str(root / "adapters")],
                                 port=_free_port(), token=TOKEN, admin_token=ADMIN, replicas=1, batch_wait_ms=2,
                                 datastore_dicomweb=pacs.dicomweb.replace("http://", f"http://{pacs.user}@"),
                                 versions=str(root / "versions"), datastore_cache=str(root / "cache"),
                                 tmp_dir=str(root / "tmp"))
        with start(settings) as running:
            yield running, pacs, study, truths


@pytest.fixture()
def client(site, tmp_path):
    from monailabel.client import MONAILabelClient

    made = MONAILabelClient(site[0].url, tmpdir=str(tmp_path), client_id="ohif-test")
    made.update_auth(made.auth_token("admin", ADMIN))  # one login: the admin token reads, saves and trains
    return made


def _http(server, method: str, route: str, token: str = TOKEN, **kwargs):
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{server.url}{route}", headers=headers, timeout=120, **kwargs)


def _segs(pacs) -> dict[str, str]:
    """{SEG series uid: the image series it references}, from the PACS's own QIDO-RS and WADO-RS."""
    from samed_adapter.dicomweb.session import Credentials, open_client

    dicomweb = open_client(pacs.dicomweb, Credentials(pacs.user, pacs.password))
    found = {}
    for item in dicomweb.search_for_series(search_filters={"Modality": "SEG"}):
        study, series = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        meta = pydicom.Dataset.from_json(dicomweb.retrieve_series_metadata(study, series)[0],
                                         bulk_data_uri_handler=lambda *_: None)
        found[series] = str(meta.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return found


def _ensure_final(client, uid: str, truth: Path) -> None:
    """A final label of ``uid`` (an earlier test's, else submitted now), so each test runs alone."""
    objects = client.datastore()["objects"]
    if "final" not in objects[uid]["labels"]:
        client.save_label(uid, str(truth), tag="final", params={"model": "ct"})


def test_info_and_the_listing_are_the_pacs_series(client, site):
    _, _, study, _ = site
    info = client.info()  # what OHIF's panel and 3D Slicer connect with
    assert info["datastore"]["total"] == 3 and list(info["trainers"]) == ["ct"]
    assert list(info["strategies"]) == ["first", "random", "least_sure"]
    objects = client.datastore()["objects"]  # GET /datastore/?output=all
    assert sorted(objects) == sorted(study["ct"])  # the report is no image
    first = objects[study["ct"][0]]["image"]["info"]
    assert first["StudyInstanceUID"] == study["study"] and first["PatientID"] == "SAMED-0001"
    assert first["SeriesInstanceUID"] == study["ct"][0] and first["Modality"] == "CT"


def test_infer_by_series_uid_answers_labels_on_its_grid(client, site):
    server, _, study, _ = site
    uid = study["ct"][2]
    label, answer = client.infer("ct", uid, {})  # 3D Slicer's and OHIF's: ?image=<SeriesInstanceUID>
    local = read_image(study["folders"][uid])
    got = read_image(label)
    assert got.array.shape == local.array.shape == (4, 128, 128)
    np.testing.assert_allclose(got.affine, local.affine, atol=1e-4)
    assert set(np.unique(got.array)) <= {0, 1, 2} and answer["label_names"] == {"soft tissue": 1, "bone": 2}
    assert answer["datastore"]["image"] == uid and answer["datastore"]["uncertainty"] > 0


def test_ohif_gets_nrrd_on_the_series_patient_space(client, site, tmp_path):
    """OHIF's panel asks output=image with result_extension .nrrd (uint16, raw) and reads NRRD: each voxel
    where the DICOM series has it, in patient space (LPS), read here by ITK's NRRD reader."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (ITK's NRRD reader) is not installed")
    server, _, study, _ = site
    uid = study["ct"][2]
    label, _ = client.infer("ct", uid, {})
    ohif = _http(server, "POST", f"/infer/ct?image={uid}&output=image",
                 data={"params": json.dumps({"result_extension": ".nrrd", "result_dtype": "uint16",
                                             "result_compress": False})}, files={"_": ("", b"")})
    assert ohif.status_code == 200, ohif.text
    assert ohif.content.startswith(b"NRRD0004\ntype: unsigned short\n") and b"encoding: raw" in ohif.content
    (tmp_path / "ohif.nrrd").write_bytes(ohif.content)
    nrrd = sitk.ReadImage(str(tmp_path / "ohif.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nrrd), read_image(label).array)  # (z, y, x)
    slices = [pydicom.dcmread(f) for f in sorted(Path(study["folders"][uid]).glob("*.dcm"))]
    positions = sorted(tuple(float(v) for v in ds.ImagePositionPatient) for ds in slices)
    corners = sorted(nrrd.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(nrrd.GetSize()[2]))
    np.testing.assert_allclose(corners, positions, atol=1e-3)  # each slice where the series has it
    row = np.array(nrrd.TransformIndexToPhysicalPoint((1, 0, 0))) - nrrd.TransformIndexToPhysicalPoint((0, 0, 0))
    orient, spacing = [float(v) for v in slices[0].ImageOrientationPatient], float(slices[0].PixelSpacing[1])
    np.testing.assert_allclose(row, spacing * np.array(orient[:3]), atol=1e-4)  # x along the DICOM rows
    gzipped = _http(server, "POST", f"/infer/ct?image={uid}&output=image",
                    data={"params": json.dumps({"result_extension": ".nrrd", "result_compress": True})},
                    files={"_": ("", b"")})
    assert b"type: unsigned char" in gzipped.content and b"encoding: gzip" in gzipped.content
    bad = _http(server, "POST", f"/infer/ct?image={uid}&output=image",
                data={"params": json.dumps({"result_extension": ".nrrd", "result_dtype": "float32"})},
                files={"_": ("", b"")})
    assert bad.status_code == 400 and "result_dtype 'float32'" in bad.json()["error"]


def test_infer_by_series_uid_as_dicom_seg_over_the_series(client, site, tmp_path):
    """output=dicom_seg for a PACS's series: a SEG over that series' instances, holding the labels of the
    NIfTI answer (the series needs no upload: the server made its copy from the PACS)."""
    from samed_adapter.io.dicom_seg import read_dicom_seg

    server, _, study, _ = site
    uid = study["ct"][2]
    label, _ = client.infer("ct", uid, {})
    answer = _http(server, "POST", f"/infer/ct?image={uid}&output=dicom_seg", data={"params": "{}"},
                   files={"_": ("", b"")})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom"
    (tmp_path / "seg.dcm").write_bytes(answer.content)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study["study"]
    assert [str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence] == [uid]
    series = read_image(study["folders"][uid])
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", series), read_image(label).array)
    before = client.datastore()["objects"][uid]
    kept = _http(server, "POST", f"/infer/ct?image={uid}&output=dicom_seg",
                 data={"params": json.dumps({"save_label": True})}, files={"_": ("", b"")})
    assert kept.status_code == 400 and "ask output=image, all or json to save them" in kept.json()["error"]
    assert client.datastore()["objects"][uid]["labels"] == before["labels"]  # no SEG file kept as a label


def test_a_final_label_is_a_seg_in_the_pacs_referencing_the_series(client, site):
    _, pacs, study, truths = site
    uid = study["ct"][0]
    before = _segs(pacs)
    saved = client.save_label(uid, str(truths[uid]), tag="final", params={"model": "ct"})  # Slicer's Submit
    assert saved == {"image": uid, "label": uid, "tag": "final"}
    new = {seg: ref for seg, ref in _segs(pacs).items() if seg not in before}
    assert list(new.values()) == [uid]  # one SEG, referencing the image series
    objects = client.datastore()["objects"]
    assert "final" in objects[uid]["labels"]
    assert objects[uid]["labels"]["final"]["info"]["SeriesInstanceUID"] == next(iter(new))
    assert client.info()["datastore"]["completed"] >= 1


def test_the_next_sample_is_an_unlabelled_series(client, site):
    _, _, study, truths = site
    uid = study["ct"][0]
    _ensure_final(client, uid, truths[uid])
    unlabelled = sorted(set(study["ct"]) - {uid} - {u for u, o in client.datastore()["objects"].items()
                                                   if "final" in o["labels"]})
    pick = client.next_sample("first", {})
    assert pick["id"] == unlabelled[0] and pick["SeriesInstanceUID"] == unlabelled[0]
    stamp = client.datastore()["objects"][pick["id"]]["image"]["info"]["strategy"]["first"]
    assert stamp["client_id"] == "ohif-test"  # recorded in the cache's info, as MONAI Label's server does
    # least_sure scores the unlabelled series by inferring them by uid, then picks the least sure
    unsure = client.next_sample("least_sure", {"model": "ct"})
    scores = {u: client.datastore()["objects"][u]["image"]["info"]["least_sure"] for u in unlabelled}
    uncertainty = {u: next(iter(kept.values()))["uncertainty"] for u, kept in scores.items()}
    assert unsure["id"] == max(uncertainty, key=uncertainty.get) and unsure["unscored"] == 0


def _wait(server, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while (state := _http(server, "GET", "/train/ct").json())["status"] == "RUNNING":
        assert time.monotonic() < deadline, f"the job did not end in {timeout} s: {state}"
        time.sleep(0.5)
    return state


def test_train_makes_a_version_from_the_pacs_final_labels(client, site):
    server, _, study, truths = site
    labelled = study["ct"][:2]
    for uid in labelled:
        _ensure_final(client, uid, truths[uid])
    started = client.train_start("ct", {"max_epochs": 1, "seed": 0})
    assert started["status"] == "RUNNING" and started["total_epochs"] == 1
    done = _wait(server)
    assert done["status"] == "DONE", done
    result = done["result"]
    assert result["version"] == 2 and result["ref"] == "ct@2"
    assert result["figures"]["train_images"] == 1 and result["figures"]["holdout_images"] == 1
    listed = _http(server, "GET", "/v1/adapters/ct/versions").json()
    assert [v["version"] for v in listed["versions"]] == [1, 2]
    made = VersionStore(server.settings.versions).get("ct", 2)
    trained = [i["image"] for i in made.items]
    assert len(trained) == len(made.holdout) == 1  # one series trained on, the other held out
    assert sorted(trained + made.holdout) == sorted(labelled)  # the PACS's finals, nothing else


class _Hostile(BaseHTTPRequestHandler):
    """A 'PACS' whose QIDO-RS answers what is not DICOM JSON (below /locked/: refuses every user)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"<html>maintenance</html>"
        self.send_response(401 if self.path.startswith("/locked/") else 200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def hostile():
    """The DICOMweb root of a :class:`_Hostile` server on 127.0.0.1 (stopped after the test)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def test_pacs_faults_on_the_datastore_routes_are_502_naming_the_pacs(hostile, tmp_path):
    """A PACS that answers garbage, takes longer than its bound or is gone: the routes' work raises 502, one line."""
    import asyncio

    from samed_adapter.datastore.dicomweb import DicomWebDatastore
    from samed_adapter.dicomweb.limits import Limits
    from samed_adapter.serve.errors import ServeError
    from samed_adapter.serve.store_routes import StoreRoutes

    gone = f"http://127.0.0.1:{_free_port()}/dicom-web"
    cases = {"garbage": (DicomWebDatastore(hostile, tmp_path / "a"), "not JSON"),
             "too slow": (DicomWebDatastore(hostile, tmp_path / "b", limits=Limits(max_run_time=1e-9)), "max-run-time"),
             "gone": (DicomWebDatastore(gone, tmp_path / "c"), "could not be reached"),
             "locked": (DicomWebDatastore(hostile.replace("/dicom-web", "/locked/dicom-web"), tmp_path / "d"),
                        "refused the credentials")}
    for name, (store, says) in cases.items():
        with pytest.raises(ServeError) as err:
            asyncio.run(StoreRoutes(store).listing("all"))
        message = str(err.value)
        assert err.value.status == 502, (name, message)
        assert store.name() in message and says in message and "\n" not in message, (name, message)
        check = "SAMED_DICOMWEB_PASSWORD" if name == "locked" else "retry once it answers"
        assert check in message, (name, message)
        # the service's fix, never the hints of `segment --dicomweb`'s flags
        assert "--continue" not in message and "--dicomweb-user" not in message, (name, message)


def test_a_pacs_gone_mid_session_is_502_and_info_still_answers(client, site, tmp_path):
    """The last test on the module's server: its Orthanc stops for good."""
    server, pacs, study, truths = site
    uid = study["ct"][1]
    pacs.kill()
    refused = _http(server, "PUT", f"/datastore/label?image={uid}&tag=final",
                    files={"label": ("label.nii.gz", truths[uid].read_bytes())},
                    data={"params": json.dumps({"model": "ct"})})
    assert refused.status_code == 502, refused.text
    assert pacs.dicomweb in refused.json()["error"] and "retry once it answers" in refused.json()["error"]
    listing = _http(server, "GET", "/datastore/?output=all")
    assert listing.status_code == 502 and pacs.dicomweb in listing.json()["error"]
    for _ in range(2):  # a job that could not list the PACS's finals holds no slot: the second is no 409
        train = _http(server, "POST", "/train/ct", token=ADMIN, json={"max_epochs": 1})
        assert train.status_code == 502 and pacs.dicomweb in train.json()["error"], train.text
    state = _http(server, "GET", "/train/ct").json()
    assert state["status"] == "ERROR" and pacs.dicomweb in state["error"]
    info = client.info()  # 3D Slicer and OHIF connect with /info/: it answers, saying what failed
    assert list(info["trainers"]) == ["ct"] and list(info["strategies"]) == ["first", "random", "least_sure"]
    assert set(info["datastore"]) == {"error"} and pacs.dicomweb in info["datastore"]["error"]


def test_dicom_seg_by_id_from_a_folder_datastore_says_what_to_ask(tmp_path):
    import asyncio

    from samed_adapter.datastore import FolderDatastore
    from samed_adapter.serve.errors import ServeError
    from samed_adapter.serve.store_routes import StoreRoutes

    with pytest.raises(ServeError) as err:
        asyncio.run(StoreRoutes(FolderDatastore(tmp_path / "store")).series_folder("case_a"))
    assert err.value.status == 400 and "this datastore's images are NIfTI files: ask output=image" in str(err.value)
