"""The DICOMweb datastore (issue 32) against a real Orthanc with its DICOMweb plugin: the PACS's
image series listed by SeriesInstanceUID (MONAI Label's ids), fetched once into the cache with the
voxels of the series read locally; a final label stored as a DICOM SEG that QIDO-RS finds in the
image's study, referencing the image series and carrying the label's segments, read back equal
(by a fresh cache, for training); a SEG made by another tool taken as a final label; and the
refusals: a label on another grid or with classes the adapter lacks (nothing stored), an unknown
series, a SEG of another patient or study naming the series (not taken as its label).

One Orthanc for the module holds two CT series of one patient, a report, and a CT series of
another patient (pydicom's CT_small, through `samed_adapter.testing.orthanc.write_study`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import nibabel as nib
import numpy as np
import pytest
import requests

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed: pip install 'samed-adapter[dicomweb]'")
pytest.importorskip("highdicom", reason="highdicom is not installed: pip install 'samed-adapter[io]'")

from samed_adapter.testing.orthanc import INSTALL_HINT, Orthanc, missing, write_study  # noqa: E402

_MISSING = missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING} (Debian: {INSTALL_HINT})")

import pydicom  # noqa: E402

from samed_adapter.adapter_file.config import AdapterConfig  # noqa: E402
from samed_adapter.datastore import (DatastoreError, EmptyDatastoreError, ImageNotFoundError,  # noqa: E402
                                     LabelClassError, LabelGridError, LabelNotFoundError)
from samed_adapter.datastore import dicomweb as dicomweb_datastore  # noqa: E402
from samed_adapter.datastore.dicomweb import DicomWebDatastore  # noqa: E402
from samed_adapter.dicomweb.errors import BadAnswerError, DicomWebError, LimitError  # noqa: E402
from samed_adapter.dicomweb.limits import Limits  # noqa: E402
from samed_adapter.dicomweb.session import Credentials, open_client  # noqa: E402
from samed_adapter.io import read_image  # noqa: E402
from samed_adapter.io.dicom_seg import read_dicom_seg, write_dicom_seg  # noqa: E402

CONFIG = AdapterConfig(num_classes=2, image_size=64, intensity_window=None, intensity_percentiles=(1.0, 99.0),
                       class_names=["liver", "spleen"])


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """(Orthanc, the patient's study, the other patient's study), one server for the module."""
    root = tmp_path_factory.mktemp("pacs")
    study = write_study(root / "study", ct_series=2, report=True)
    other = write_study(root / "other", ct_series=1, patient_id="OTHER-0002")
    with Orthanc(root / "server") as server:
        server.upload(study["files"] + other["files"])
        yield server, study, other


def _store(pacs, cache) -> DicomWebDatastore:
    server = pacs[0]
    return DicomWebDatastore(server.dicomweb, cache, credentials=Credentials(server.user, server.password))


@pytest.fixture(scope="module")
def store(pacs, tmp_path_factory) -> DicomWebDatastore:
    return _store(pacs, tmp_path_factory.mktemp("cache"))


def _label(image, path, *, shift: float = 0.0, top: int = 2):
    """A label of classes 1..top on `image`'s grid (moved `shift` mm along x), saved at `path`; its array."""
    labels = np.zeros(image.array.shape, np.uint8)
    labels[:, 30:60, 40:80] = 1
    labels[1:3, 70:90, 20:50] = top
    affine = image.affine.copy()
    affine[0, 3] += shift
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.T), affine), path)
    return labels


def _ensure_final(store, uid, tmp_path) -> None:
    """A final label of `uid` in the PACS (the one an earlier test saved, else a new one), so each test runs alone."""
    if "final" not in store.get_labels_by_image_id(uid):
        _label(read_image(store.image_path(uid)), tmp_path / "ensured.nii.gz")
        store.save_label(uid, tmp_path / "ensured.nii.gz", "final", config=CONFIG)


def _seg_series(server) -> set[str]:
    return {uid for uid, modality in server.modalities().items() if modality == "SEG"}


def test_lists_the_image_series_by_their_uid(store, pacs):
    _, study, other = pacs
    assert sorted(store.list_images()) == sorted(study["ct"] + other["ct"])  # the report is no image
    assert store.name() == pacs[0].dicomweb
    info = store.get_image_info(study["ct"][0])
    assert info["StudyInstanceUID"] == study["study"] and info["PatientID"] == "SAMED-0001"
    assert info["Modality"] == "CT" and info["SeriesInstanceUID"] == study["ct"][0]
    assert store.get_image_info(study["report"]) == {} and store.get_image_uri(study["report"]) == ""


def test_an_image_is_fetched_once_with_the_voxels_of_the_series(store, pacs, monkeypatch):
    _, study, _ = pacs
    uid = study["ct"][1]
    path = store.image_path(uid)
    assert path.name == f"{uid}.nii.gz" and path.parent == store.root
    fetched, local = read_image(path), read_image(study["folders"][uid])
    np.testing.assert_array_equal(fetched.array, local.array)
    np.testing.assert_allclose(fetched.affine, local.affine, atol=1e-5)
    calls = []
    monkeypatch.setattr(dicomweb_datastore, "fetch_series_files", lambda *a, **k: calls.append(a))
    assert store.get_image_uri(uid) == str(path) and calls == []  # the cache answers: no second fetch
    assert store.get_image_info(uid)["path"] == str(path)


def test_a_final_label_becomes_a_seg_in_the_pacs_and_reads_back(store, pacs, tmp_path):
    server, study, _ = pacs
    uid = study["ct"][0]
    image = read_image(store.image_path(uid))
    labels = _label(image, tmp_path / "final.nii.gz")
    before = _seg_series(server)
    assert store.save_label(uid, tmp_path / "final.nii.gz", "final", {"user": "radiologist"}, config=CONFIG) == uid
    new = _seg_series(server) - before
    assert len(new) == 1
    seg_uid = new.pop()
    # QIDO-RS finds it in the image's study; its metadata references the image series and its classes.
    client = open_client(server.dicomweb, Credentials(server.user, server.password))
    found = client.search_for_series(study["study"], search_filters={"Modality": "SEG"})
    assert seg_uid in {item["0020000E"]["Value"][0] for item in found}
    meta = pydicom.Dataset.from_json(client.retrieve_series_metadata(study["study"], seg_uid)[0],
                                     bulk_data_uri_handler=lambda *_: None)
    assert [str(s.SeriesInstanceUID) for s in meta.ReferencedSeriesSequence] == [uid]
    assert meta.PatientID == "SAMED-0001" and meta.StudyInstanceUID == study["study"]
    assert [s.SegmentLabel for s in meta.SegmentSequence] == ["liver", "spleen"]
    assert {s.SegmentAlgorithmType for s in meta.SegmentSequence} == {"SEMIAUTOMATIC"}
    # The SEG the PACS holds decodes to the label on the series read locally.
    stored = client.retrieve_instance(study["study"], seg_uid, meta.SOPInstanceUID)
    stored.save_as(tmp_path / "stored.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "stored.dcm", read_image(study["folders"][uid])), labels)
    # The cache keeps the label and its SEG; the datastore answers as MONAI Label's.
    np.testing.assert_array_equal(read_image(store.label_path(uid)).array, labels)
    assert (store.root / "seg" / f"{uid}.dcm").is_file()
    assert store.get_label_info(uid, "final")["SeriesInstanceUID"] == seg_uid
    assert store.get_label_info(uid, "final")["user"] == "radiologist"
    assert store.get_labels_by_image_id(uid) == {"final": uid}
    assert store.status()["completed"] == 1 and uid in store.get_labeled_images()


def test_a_fresh_cache_reads_the_finals_of_the_pacs_for_training(store, pacs, tmp_path):
    """Another server (a fresh cache) trains on what the PACS holds: our SEG, and one another tool made."""
    server, study, _ = pacs
    first, second = study["ct"]
    _ensure_final(store, first, tmp_path)
    # A SEG of the second series made elsewhere (as OHIF or 3D Slicer store one), only in the PACS.
    volume = read_image(study["folders"][second])
    theirs = np.zeros(volume.array.shape, np.uint8)
    theirs[:, 10:40, 10:40] = 2
    write_dicom_seg(theirs, volume, ["liver", "spleen"], tmp_path / "theirs.dcm", adapter_name="viewer")
    server.upload([tmp_path / "theirs.dcm"])
    fresh = _store(pacs, tmp_path / "cache")
    items = {item.image_id: item for item in fresh.training_items()}
    assert sorted(items) == sorted([first, second])
    np.testing.assert_array_equal(read_image(items[second].label).array, theirs)
    np.testing.assert_array_equal(read_image(items[first].label).array, read_image(store.label_path(first)).array)
    np.testing.assert_array_equal(read_image(items[second].image).array, volume.array)
    assert fresh.datalist() == [{"image": str(items[k].image), "label": str(items[k].label)}
                                for k in fresh.list_images() if k in items]
    assert fresh.status()["completed"] == 2


def test_a_label_on_another_grid_or_with_other_classes_stores_nothing(store, pacs, tmp_path):
    server, study, other = pacs
    uid = other["ct"][0]
    image = read_image(store.image_path(uid))
    before, files = server.series_uids(), sorted(p.name for p in store.root.rglob("*"))
    _label(image, tmp_path / "moved.nii.gz", shift=3.0)
    with pytest.raises(LabelGridError, match="away from its image"):
        store.save_label(uid, tmp_path / "moved.nii.gz", "final", config=CONFIG)
    _label(image, tmp_path / "three.nii.gz", top=3)
    with pytest.raises(LabelClassError, match="class ids 3 beyond"):
        store.save_label(uid, tmp_path / "three.nii.gz", "final", config=CONFIG)
    assert server.series_uids() == before
    assert sorted(p.name for p in store.root.rglob("*")) == files
    assert "final" not in store.get_labels_by_image_id(uid)
    with pytest.raises(LabelNotFoundError, match="has no 'final' label"):
        store.label_path(uid)


def test_an_unknown_series_is_refused(store, pacs, tmp_path):
    _, study, _ = pacs
    image = read_image(study["folders"][study["ct"][0]])
    _label(image, tmp_path / "l.nii.gz")
    for unknown in ("1.2.3.4", study["report"]):
        assert store.get_image_uri(unknown) == "" and store.get_labels_by_image_id(unknown) == {}
        with pytest.raises(ImageNotFoundError, match="list_images"):
            store.image_path(unknown)
        with pytest.raises(ImageNotFoundError, match="no image series"):
            store.save_label(unknown, tmp_path / "l.nii.gz", "final")


def _retagged(path, out, **changes):
    """A copy of a SEG as another series (new UIDs) with ``changes`` to its attributes."""
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(out, enforce_file_format=True)
    return str(ds.SeriesInstanceUID)


def test_a_seg_of_another_patient_or_study_is_not_taken_as_a_label(store, pacs, tmp_path):
    """SEGs that name the series but lie with another patient or study: never its label."""
    server, _, other = pacs
    uid = other["ct"][0]
    volume = read_image(other["folders"][uid])
    write_dicom_seg(np.ones(volume.array.shape, np.uint8), volume, ["liver"], tmp_path / "seg.dcm",
                    adapter_name="viewer")
    patient = _retagged(tmp_path / "seg.dcm", tmp_path / "patient.dcm", PatientID="SAMED-0001")
    study = _retagged(tmp_path / "seg.dcm", tmp_path / "study.dcm", StudyInstanceUID=pydicom.uid.generate_uid())
    server.upload([tmp_path / "patient.dcm", tmp_path / "study.dcm"])
    store.refresh()
    assert uid not in store.get_labeled_images() and "final" not in store.get_labels_by_image_id(uid)
    assert "another patient" in store.refused[patient]
    assert "not in its image series' study" in store.refused[study]
    assert store.get_label_uri(uid, "final") == "" and uid not in [i.image_id for i in store.training_items()]


def test_what_the_pacs_owns_is_changed_there(store, pacs, tmp_path):
    """add_image and removing a final label are refused (the PACS owns them); remove_image drops the cache copy."""
    _, study, other = pacs
    with pytest.raises(DatastoreError, match="send x.nii.gz to the PACS"):
        store.add_image("x", tmp_path / "x.nii.gz")
    labelled = study["ct"][0]
    _ensure_final(store, labelled, tmp_path)
    with pytest.raises(DatastoreError, match="delete that series there"):
        store.remove_label(labelled, "final")
    uid = other["ct"][0]
    path = store.image_path(uid)
    store.remove_image(uid)
    assert not path.exists() and not (store.root / "dicom" / uid).exists()
    assert uid in store.list_images() and store.image_path(uid) == path and path.is_file()  # fetched again


def test_an_empty_datastore_and_a_gone_pacs_say_so(tmp_path):
    with Orthanc(tmp_path / "server") as server:
        empty = DicomWebDatastore(server.dicomweb, tmp_path / "cache",
                                  credentials=Credentials(server.user, server.password))
        with pytest.raises(EmptyDatastoreError, match="none of its 0 image series"):
            empty.training_items()
    with pytest.raises(DicomWebError, match="could not be reached"):
        empty.refresh()
        empty.list_images()


def test_serve_opens_it_from_the_url_with_the_password_from_the_environment(pacs, tmp_path, monkeypatch):
    """`serve --datastore-dicomweb http://USER@host/dicom-web`: the password comes from SAMED_DICOMWEB_PASSWORD."""
    from samed_adapter.datastore.opening import open_datastore

    server, study, other = pacs
    url = server.dicomweb.replace("http://", f"http://{server.user}@")
    monkeypatch.setenv("SAMED_DICOMWEB_PASSWORD", server.password)
    store = open_datastore(dicomweb=url, cache=tmp_path / "cache")
    assert isinstance(store, DicomWebDatastore) and store.name() == server.dicomweb
    assert sorted(store.list_images()) == sorted(study["ct"] + other["ct"])
    with pytest.raises(DatastoreError, match="--datastore-cache"):
        open_datastore(dicomweb=url)
    with pytest.raises(DicomWebError, match="password in the URL"):
        open_datastore(dicomweb=url.replace("@", f":{server.password}@"), cache=tmp_path / "cache")
    monkeypatch.setenv("SAMED_DICOMWEB_PASSWORD", "wrong")
    with pytest.raises(DicomWebError, match="refused the credentials"):
        open_datastore(dicomweb=url, cache=tmp_path / "other").list_images()


@contextmanager
def swapping_proxy(server, wanted: str, sent: str) -> Iterator[str]:
    """A DICOMweb root on 127.0.0.1 that forwards to ``server``, except that WADO-RS of the series
    path ``wanted`` answers with that of ``sent`` (a PACS that mixes up series). Each answer is
    Orthanc's (bounded); the proxy stops when the block ends."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path
            if path.split("?")[0].endswith(wanted):
                path = path.replace(wanted, sent)
            answer = requests.get(f"{server.url}{path}", auth=(server.user, server.password), timeout=30,
                                  headers={"Accept": self.headers.get("Accept", "*/*")})
            self.send_response(answer.status_code)
            self.send_header("Content-Type", answer.headers.get("Content-Type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}/dicom-web"
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)


def test_a_pacs_that_sends_another_series_or_too_much_caches_nothing(pacs, tmp_path):
    """What the PACS sends is checked: another patient's series for the one asked for, or an
    instance beyond the limits, is refused in one line, and nothing of it reaches the cache."""
    server, study, other = pacs
    mine, theirs = study["ct"][0], other["ct"][0]
    wanted, sent = f"studies/{study['study']}/series/{mine}", f"studies/{other['study']}/series/{theirs}"
    with swapping_proxy(server, wanted, sent) as url:
        store = DicomWebDatastore(url, tmp_path / "swapped", credentials=Credentials(server.user, server.password))
        assert mine in store.list_images()
        refusal = f"series {mine}: the server sent an instance of study .*; nothing of it was kept: check the PACS$"
        with pytest.raises(BadAnswerError, match=refusal):
            store.image_path(mine)
        assert store.local.list_images() == [] and not any((store.root / "dicom").iterdir())
    small = DicomWebDatastore(server.dicomweb, tmp_path / "small",
                              credentials=Credentials(server.user, server.password),
                              limits=Limits(max_series_bytes=40 << 10))  # a slice is 39 KiB
    with pytest.raises(LimitError, match="sent a series of more than --max-series-size 40K"):
        small.image_path(mine)
    assert small.local.list_images() == [] and not any((small.root / "dicom").iterdir())


def test_a_seg_made_on_other_slices_is_refused_and_the_previous_one_serves(pacs, tmp_path):
    """A SEG that names the series but was made from another series' slices is not its label (it
    does not read on its slices); the series' newest SEG that does read is its final label."""
    server, study, _ = pacs
    target, elsewhere = study["ct"][1], study["ct"][0]
    volume = read_image(study["folders"][target])
    good = np.zeros(volume.array.shape, np.uint8)
    good[:, 50:70, 50:70] = 1
    write_dicom_seg(good, volume, ["liver", "spleen"], tmp_path / "good.dcm", adapter_name="viewer")
    write_dicom_seg(np.ones_like(good), read_image(study["folders"][elsewhere]), ["liver"], tmp_path / "other.dcm",
                    adapter_name="viewer")
    ds = pydicom.dcmread(tmp_path / "other.dcm")
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = target  # names the target, references other slices
    ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    server.upload([tmp_path / "good.dcm", tmp_path / "bad.dcm"])
    fresh = _store(pacs, tmp_path / "cache")
    np.testing.assert_array_equal(read_image(fresh.label_path(target)).array, good)
    assert "does not read as a label of series" in fresh.refused[str(ds.SeriesInstanceUID)]
    assert fresh.get_label_info(target, "final")["SeriesInstanceUID"] == str(pydicom.dcmread(tmp_path / "good.dcm")
                                                                               .SeriesInstanceUID)
