"""The PACS round trip against a real Orthanc with its DICOMweb plugin (issue 23): a study's series
fetched over WADO-RS give the files of a local run on the same series folder; the DICOM-SEG and
RTSTRUCT stored back (STOW-RS) are found by QIDO-RS in the right study and reference the right
instances, the SEG reads in highdicom and dcmqi without a warning; ``--continue`` stores nothing new, and makes again
what the server holds over other instances or made with other options (issue 28); a wrong password, an unknown study
and a server that goes away mid-study each give one clear error and store nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed: pip install 'samed-adapter[dicomweb]'")

from samed_adapter.testing.orthanc import INSTALL_HINT, Orthanc, missing, organs_adapter, write_study  # noqa: E402

_MISSING = missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING} (Debian: {INSTALL_HINT})")

import samed_adapter as sa  # noqa: E402
from samed_adapter.dicomweb import DicomWebConnectionError, StudyNotFoundError, segment_study  # noqa: E402
from samed_adapter.dicomweb.session import Credentials, open_client  # noqa: E402
from samed_adapter.io import read_image  # noqa: E402
from samed_adapter.io.dicom_derived import adapter_label, labels_digest  # noqa: E402
from samed_adapter.io.dicom_seg import read_dicom_seg  # noqa: E402
from samed_adapter.io.rtstruct import read_rtstruct  # noqa: E402
from samed_adapter.segment.pipeline import SamSource  # noqa: E402
from samed_adapter.testing.cli import run  # noqa: E402

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]
TYPES = "nifti,dicom-seg,dicom-rtstruct"
SEGIMAGE2ITKIMAGE = shutil.which("segimage2itkimage") or shutil.which("segimage2itkimage",
                                                                       path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A random adapter on the tiny random SAM that predicts several classes on CT_small."""
    return organs_adapter(tmp_path_factory.mktemp("adapter") / "organs.safetensors")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """One Orthanc for the module, holding a study of two CT series, a localizer and a report."""
    root = tmp_path_factory.mktemp("pacs")
    study = write_study(root / "study", ct_series=2, report=True, localizer=True)
    with Orthanc(root / "server") as server:
        server.upload(study["files"])
        yield server, study


@pytest.fixture
def password(monkeypatch, pacs):
    server, _ = pacs
    monkeypatch.setenv("SAMED_DICOMWEB_PASSWORD", server.password)
    monkeypatch.delenv("SAMED_DICOMWEB_TOKEN", raising=False)
    return server.password


def _client(server):
    return open_client(server.dicomweb, Credentials(server.user, server.password))


@pytest.fixture(scope="module")
def first_run(pacs, adapter, tmp_path_factory):
    """``segment --dicomweb URL --study UID --store -o OUT``, once for the module's checks."""
    server, study = pacs
    out = tmp_path_factory.mktemp("web") / "out"
    before = server.series_uids()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMED_DICOMWEB_PASSWORD", server.password)
        code, stdout, stderr = run(None, "segment", *TINY, "--adapter", adapter, "--dicomweb", server.dicomweb, "--study",
                                    study["study"], "--store", "-o", out, "--output-type", TYPES,
                                    "--dicomweb-user", server.user)
    return {"code": code, "out": out, "stdout": stdout, "stderr": stderr, "before": before,
            "after": server.series_uids()}


def test_fetched_series_give_the_files_of_a_local_run(first_run, pacs, adapter, tmp_path, capsys):
    server, study = pacs
    assert first_run["code"] == 0, first_run["stderr"]
    assert "Traceback" not in first_run["stderr"] and server.password not in first_run["stdout"] + first_run["stderr"]
    # What cannot be segmented is listed with its reason; the CT series went on.
    assert "not segmented: series 1_scout: a localizer" in first_run["stderr"]
    assert "not segmented: series 99_report: not an image (SR" in first_run["stderr"]
    assert "segmented 2 of 2 series of 1 study" in first_run["stdout"], first_run["stdout"]

    for k, name in enumerate(["2_axial_1", "3_axial_2"]):
        local = tmp_path / name  # the same series in a local folder of the same name
        shutil.copytree(study["folders"][study["ct"][k]], local)
        code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, local, "-o", tmp_path / "local",
                           "--output-type", TYPES)
        assert code == 0, err
        web, here = first_run["out"], tmp_path / "local"
        assert sorted(p.name for p in web.iterdir() if p.name.startswith(name)) == \
               sorted(p.name for p in here.iterdir() if p.name.startswith(name)) == \
               [f"{name}.nii.gz", f"{name}_rtstruct.dcm", f"{name}_seg.dcm"]
        theirs, ours = nib.load(web / f"{name}.nii.gz"), nib.load(here / f"{name}.nii.gz")
        labels = np.asarray(ours.dataobj)
        assert len(set(np.unique(labels).tolist()) - {0}) >= 2, "a random adapter that predicts one class tests little"
        np.testing.assert_array_equal(np.asarray(theirs.dataobj), labels)
        np.testing.assert_allclose(theirs.affine, ours.affine)
        volume = read_image(local)
        for suffix, read in (("_seg.dcm", read_dicom_seg), ("_rtstruct.dcm", read_rtstruct)):
            np.testing.assert_array_equal(read(web / f"{name}{suffix}", volume), read(here / f"{name}{suffix}", volume))
        # The record --continue compares is the local run's too.
        record = json.loads((web / f".{name}.samed-adapter.json").read_text())
        assert record == json.loads((here / f".{name}.samed-adapter.json").read_text())


def _rtstruct_references(ds) -> tuple[set[str], set[str]]:
    """(series, instances) an RTSTRUCT references through its frame of reference and its contours."""
    series = {str(s.SeriesInstanceUID) for f in ds.ReferencedFrameOfReferenceSequence
              for st in f.RTReferencedStudySequence for s in st.RTReferencedSeriesSequence}
    instances = {str(image.ReferencedSOPInstanceUID) for roi in ds.ROIContourSequence
                 for contour in roi.get("ContourSequence", []) for image in contour.ContourImageSequence}
    return series, instances


def test_the_stored_results_are_found_by_qido_in_the_study_and_reference_the_right_instances(first_run, pacs,
                                                                                             adapter, tmp_path):
    import highdicom as hd

    server, study = pacs
    assert first_run["code"] == 0, first_run["stderr"]
    new = sorted(set(first_run["after"]) - set(first_run["before"]))
    modalities = server.modalities()
    assert sorted(modalities[uid] for uid in new) == ["RTSTRUCT", "RTSTRUCT", "SEG", "SEG"]
    client = _client(server)
    for modality in ("SEG", "RTSTRUCT"):  # QIDO-RS finds them in the source's study
        found = client.search_for_series(study["study"], search_filters={"Modality": modality})
        assert sorted(item["0020000E"]["Value"][0] for item in found) == sorted(u for u in new
                                                                               if modalities[u] == modality)
    fingerprint = sa.Adapter.load(adapter).fingerprint
    results = [client.retrieve_series(study["study"], uid)[0] for uid in new]
    for k, source_series in enumerate(study["ct"]):
        sources = {item["00080018"]["Value"][0] for item in client.search_for_instances(study["study"], source_series)}
        assert len(sources) == 4
        segs = [ds for ds in results if ds.Modality == "SEG"
                and {str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence} == {source_series}]
        rts = [ds for ds in results if ds.Modality == "RTSTRUCT" and _rtstruct_references(ds)[0] == {source_series}]
        assert len(segs) == len(rts) == 1, f"one SEG and one RTSTRUCT per CT series (series {k})"
        seg_ds, rt_ds = segs[0], rts[0]
        first = pydicom_read(study["folders"][source_series])
        for ds in (seg_ds, rt_ds):  # the source's patient and study; a new series of its own
            for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                            "StudyDate", "StudyTime", "StudyID"):
                assert str(ds.get(keyword)) == str(first.get(keyword)), (ds.Modality, keyword)
            assert ds.SeriesInstanceUID not in study["ct"] and ds.SeriesInstanceUID in new
        assert seg_ds.AccessionNumber == first.AccessionNumber
        assert seg_ds.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert rt_ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == first.FrameOfReferenceUID
        # The algorithm: this library, its version, the adapter's fingerprint, the digest of the record's label
        # options (what --continue compares on the server) and the adapter's name.
        record = json.loads((first_run["out"] / f".{['2_axial_1', '3_axial_2'][k]}.samed-adapter.json").read_text())
        digest = labels_digest(record)
        for segment in seg_ds.SegmentSequence:
            (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
            assert algorithm.AlgorithmName == "samed-adapter" and algorithm.AlgorithmVersion == sa.__version__
            assert algorithm.AlgorithmParameters.endswith(
                f"adapter_fingerprint={fingerprint},labels={digest},adapter={adapter_label(str(adapter))}")
        assert rt_ds.StructureSetDescription == \
            f"samed-adapter {sa.__version__}, adapter_fingerprint={fingerprint}, labels={digest}, " \
            f"adapter={adapter_label(str(adapter))}"
        assert _rtstruct_references(rt_ds)[1] <= sources and _rtstruct_references(rt_ds)[1]
        path = tmp_path / f"seg{k}.dcm"
        seg_ds.save_as(path, enforce_file_format=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # highdicom's reader: no warning
            seg = hd.seg.segread(path)
        assert {sop for _, _, sop in seg.get_source_image_uids()} == sources
        assert {series for _, series, _ in seg.get_source_image_uids()} == {source_series}
        if k == 0 and SEGIMAGE2ITKIMAGE is not None:  # dcmqi (3D Slicer's reader) reads what the PACS holds
            read = tmp_path / "dcmqi"
            read.mkdir()
            done = subprocess.run([SEGIMAGE2ITKIMAGE, "--inputDICOM", str(path), "--outputDirectory", str(read),
                                   "--outputType", "nifti"], capture_output=True, text=True, timeout=120)
            log = done.stdout + done.stderr
            assert done.returncode == 0 and "W:" not in log and "warning" not in log.lower(), log
            assert sorted(p.name for p in read.iterdir()) == ["1.nii.gz", "2.nii.gz", "3.nii.gz", "meta.json"]


def test_the_stored_rtstruct_carries_the_accession_number(first_run, pacs):
    server, study = pacs
    client = _client(server)
    found = client.search_for_series(study["study"], search_filters={"Modality": "RTSTRUCT"})[0]
    ds = client.retrieve_series(study["study"], found["0020000E"]["Value"][0])[0]
    assert ds.get("AccessionNumber") == "ACC0001" and "ReferringPhysicianName" in ds


def pydicom_read(folder: Path):
    import pydicom

    return pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)


def test_continue_stores_nothing_new_and_query_finds_the_study(first_run, pacs, adapter, tmp_path, password, capsys):
    server, study = pacs
    assert first_run["code"] == 0, first_run["stderr"]
    before = server.series_uids()
    assert before == first_run["after"]
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", server.dicomweb, "--query",
                         "--patient-id", "SAMED-0001", "--modality", "CT", "--study-date", "20240101-20241231",
                         "--store", "--continue", "--output-type", TYPES, "--dicomweb-user", server.user)
    assert code == 0, err
    assert f"1 study match the query:\n  {study['study']}  patient SAMED-0001  20240615" in out, out
    assert out.count("skipped, the server holds this adapter's results (--continue)") == 2, out
    assert "stored 0 instance" not in out
    assert "segmented 0 of 2 series of 1 study" in out and "2 skipped" in out, out
    assert server.series_uids() == before  # nothing new stored
    # A query nothing matches segments nothing, and says so.
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", server.dicomweb, "--query",
                         "--patient-id", "NOBODY", "-o", tmp_path / "none", "--dicomweb-user", server.user)
    assert code == 0 and "0 studies match the query" in out, out + err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "warning: using random SAM weights" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_wrong_password_is_one_line_and_stores_nothing(pacs, adapter, tmp_path, monkeypatch, capsys):
    server, study = pacs
    before = server.series_uids()
    monkeypatch.setenv("SAMED_DICOMWEB_PASSWORD", "not-her-password")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", server.dicomweb, "--study",
                         study["study"], "--store", "--dicomweb-user", server.user)
    line = _one_error_line(err)
    assert code == 2 and "refused the credentials (HTTP 401)" in line and "SAMED_DICOMWEB_PASSWORD" in line, line
    assert "not-her-password" not in out + err
    assert server.series_uids() == before


def test_an_unknown_study_is_one_line(pacs, adapter, tmp_path, password, capsys):
    server, study = pacs
    code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", server.dicomweb, "--study",
                       "1.2.3.999", "-o", tmp_path / "out", "--dicomweb-user", server.user)
    line = _one_error_line(err)
    assert code == 2 and "no study 1.2.3.999" in line, line
    assert not (tmp_path / "out").exists()
    with pytest.raises(StudyNotFoundError, match="has no series 1.2.3.4"):  # a series that is not the study's
        segment_study(server.dicomweb, study["study"], series=["1.2.3.4"], sam=SamSource(backbone="tiny", seed=0),
                      adapter=adapter, output_dir=tmp_path / "out", user=server.user, password=server.password)


def test_a_server_that_goes_away_mid_study_stores_nothing(adapter, tmp_path, monkeypatch, capsys):
    study = write_study(tmp_path / "study", ct_series=2)
    server = Orthanc(tmp_path / "server").start()
    try:
        server.upload(study["files"])
        before = server.series_uids()
        written = []

        def crash(result):  # the first series is segmented and written: the PACS goes away
            written.append(result.name)
            server.kill()

        with pytest.raises(DicomWebConnectionError, match="went away while storing the results of series 2_axial_1"
                                                          ".*; nothing was stored;"):
            segment_study(server.dicomweb, study["study"], sam=SamSource(backbone="tiny", seed=0), adapter=adapter,
                          store=True, user=server.user, password=server.password, on_result=crash)
        assert len(written) == 2  # both series were segmented, neither stored
        server.start()
        assert server.series_uids() == before

        # The command line: the server goes away after the study was fetched, before anything is stored.
        from samed_adapter.dicomweb import store

        original = store.store_series
        monkeypatch.setattr(store, "store_series", lambda *a, **k: (server.kill(), original(*a, **k))[1])
        monkeypatch.setenv("SAMED_DICOMWEB_PASSWORD", server.password)
        code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", server.dicomweb, "--study",
                             study["study"], "--store", "-o", tmp_path / "out", "--dicomweb-user", server.user)
        line = _one_error_line(err)
        assert code == 2 and "could not be reached or went away" in line and "--continue" in line, line
        assert server.password not in out + err
        assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == \
               ["2_axial_1.nii.gz", "2_axial_1_seg.dcm", "3_axial_2.nii.gz", "3_axial_2_seg.dcm"]
        server.start()
        assert server.series_uids() == before
        # Once the server is back, --continue stores what the folder holds, without segmenting again.
        monkeypatch.setattr(store, "store_series", original)
        written_at = (tmp_path / "out" / "2_axial_1_seg.dcm").stat().st_mtime_ns
        code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", server.dicomweb, "--study",
                             study["study"], "--store", "--continue", "-o", tmp_path / "out",
                             "--dicomweb-user", server.user)
        assert code == 0, err
        assert "2_axial_1_seg.dcm; stored 1 instance(s)" in out, out
        assert (tmp_path / "out" / "2_axial_1_seg.dcm").stat().st_mtime_ns == written_at  # not made again
        assert sorted(server.modalities().values()) == ["CT", "CT", "SEG", "SEG"]
        # Asked for an RTSTRUCT too, --continue segments again but stores only what the server lacks.
        code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", server.dicomweb, "--study",
                             study["study"], "--store", "--continue", "--output-type", "dicom-seg,dicom-rtstruct",
                             "--dicomweb-user", server.user)
        assert code == 0 and out.count("stored 1 instance(s)") == 2, out + err
        assert sorted(server.modalities().values()) == ["CT", "CT", "RTSTRUCT", "RTSTRUCT", "SEG", "SEG"]
    finally:
        server.stop()


def test_continue_makes_again_results_on_the_server_of_other_instances_or_other_options(adapter, tmp_path,
                                                                                        monkeypatch, capsys):
    """A SEG of this adapter over 4 of a series' 8 instances, and one made with other --classes, are not this
    run's results: --continue makes them again and says why; then it skips both (issue 28)."""
    study = write_study(tmp_path / "study", ct_series=2, slices=8)
    server = Orthanc(tmp_path / "server").start()
    try:
        server.upload(study["files"])
        first, second = study["ct"]
        half = tmp_path / "2_axial_1"  # a local run on 4 of the first series' instances
        half.mkdir()
        for path in sorted(study["folders"][first].iterdir())[:4]:
            shutil.copy(path, half)
        for source, extra in ((half, ()), (study["folders"][second], ("--classes", "liver"))):
            code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, source, "-o", tmp_path / "earlier",
                               "--output-type", "dicom-seg", *extra)
            assert code == 0, err
        server.upload([tmp_path / "earlier" / "2_axial_1_seg.dcm", tmp_path / "earlier" / "ct2_seg.dcm"])
        before = server.series_uids()
        monkeypatch.setenv("SAMED_DICOMWEB_PASSWORD", server.password)
        command = ["segment", *TINY, "--adapter", adapter, "--dicomweb", server.dicomweb, "--study", study["study"],
                   "--store", "--continue", "--dicomweb-user", server.user]
        code, out, err = run(capsys, *command)
        assert code == 0, err
        assert "note: series 2_axial_1: its SEG on the server references 4 of the series' 8 instances; made " \
               "again" in err, err
        assert "note: series 3_axial_2: its SEG on the server was made with other options (--classes" in err, err
        assert out.count("stored 1 instance(s)") == 2 and "segmented 2 of 2 series" in out, out
        assert "2 made again (the server's results did not count, listed above)" in out, out
        after = server.series_uids()
        assert len(set(after) - set(before)) == 2  # the earlier SEGs stay; the new ones join them
        code, out, err = run(capsys, *command)  # now the server holds this run's results of both
        assert code == 0 and "segmented 0 of 2 series" in out and "2 skipped" in out and "made again" not in out, \
            out + err
        assert server.series_uids() == after
    finally:
        server.stop()


def test_credentials_come_from_the_environment_never_a_flag(monkeypatch):
    monkeypatch.setenv("SAMED_DICOMWEB_TOKEN", "t0k3n")
    monkeypatch.delenv("SAMED_DICOMWEB_PASSWORD", raising=False)
    token = Credentials.resolve()
    assert token.token == "t0k3n" and "t0k3n" not in repr(token)
    client = open_client("http://127.0.0.1:9/dicom-web", token)
    assert client._session.headers["Authorization"] == "Bearer t0k3n"
    monkeypatch.setenv("MY_TOKEN", "other")
    assert Credentials.resolve(token_env="MY_TOKEN").token == "other"
    monkeypatch.setenv("SAMED_DICOMWEB_PASSWORD", "s3cret")
    basic = Credentials.resolve("alice")
    assert (basic.user, basic.password, basic.token) == ("alice", "s3cret", None) and "s3cret" not in repr(basic)
    assert Credentials.resolve("bob", prompt=lambda text: "typed").password == "s3cret"  # the variable comes first
    monkeypatch.delenv("SAMED_DICOMWEB_PASSWORD")
    assert Credentials.resolve("bob", prompt=lambda text: "typed").password == "typed"
    with pytest.raises(sa.DicomWebError, match="set SAMED_DICOMWEB_PASSWORD"):
        Credentials.resolve("bob")
    with pytest.raises(sa.DicomWebError, match="UNSET_VAR, which is not set"):
        Credentials.resolve(token_env="UNSET_VAR")


@pytest.mark.parametrize("argv, message", [
    (["--dicomweb", "http://x/dicom-web", "-o", "o"], "needs one of --study UID and --query"),
    (["--dicomweb", "http://x/dicom-web", "--study", "1.2", "in.nii.gz", "-o", "o"], "takes no INPUT"),
    (["--dicomweb", "http://x/dicom-web", "--study", "1.2"], "give -o OUTDIR for the outputs, --store"),
    (["--dicomweb", "http://x/dicom-web", "--query", "--store"], "--query needs at least one of"),
    (["--dicomweb", "http://x/dicom-web", "--query", "--study-date", "2024", "--store"], "is not a date or range"),
    (["--dicomweb", "http://x/dicom-web", "--study", "1.2", "--patient-id", "p", "--store"], "is a filter of --query"),
    (["--study", "1.2", "-o", "o"], "--study goes with --dicomweb URL"),
    (["-o", "o"], "give the inputs to segment"),
])
def test_options_that_do_not_go_together_fail_before_any_work(argv, message, capsys):
    code, _, err = run(capsys, "segment", *TINY, "--adapter", "missing.safetensors", *argv)
    assert code == 2 and message in err, err
