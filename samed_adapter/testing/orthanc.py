"""A real Orthanc (the open PACS) with its DICOMweb plugin, started for a test and stopped after it.

:class:`Orthanc` writes a configuration (storage and index in a private folder, free HTTP and
DICOM ports on 127.0.0.1 only, DICOMweb at ``/dicom-web/``, one user with a password), starts the
``Orthanc`` binary, waits until its REST API answers, and uploads files through ``POST /instances``.
:func:`write_study` makes the synthetic study the DICOMweb tests fetch: CT series built from
pydicom's bundled ``CT_small.dcm`` (no network), and optionally a text report and a localizer,
which are series that cannot be segmented.

Where the binary or the plugin is missing, :func:`missing` says how to install them (Debian:
``apt-get install orthanc orthanc-dicomweb``), for ``pytest.skip``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

__all__ = ["INSTALL_HINT", "Orthanc", "missing", "organs_adapter", "write_study"]

INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb"
#: Where Debian's orthanc-dicomweb package puts the plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def missing() -> Optional[str]:
    """None when Orthanc and its DICOMweb plugin are installed, else why not and how to fix it."""
    if shutil.which("Orthanc") is None:
        return f"the Orthanc binary is not on PATH; install it with `{INSTALL_HINT}`"
    if not DICOMWEB_PLUGIN.is_file():
        return f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is missing; install it with `{INSTALL_HINT}`"
    return None


def _free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; another process could take it first,
    which start() reports as Orthanc failing to bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Orthanc:
    """One Orthanc server in ``root`` (storage, index, configuration and log all live there).

    Use as a context manager, or call :meth:`start` and :meth:`stop`. :meth:`kill` stops it the
    hard way (a PACS going away mid-study); :meth:`start` again brings it back on the same
    storage and ports.
    """

    root: Path
    user: str = "alice"
    password: str = "wonderland-7f3a"
    http_port: int = field(default_factory=_free_port)
    dicom_port: int = field(default_factory=_free_port)
    process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        """The REST API's root, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS and STOW-RS below it)."""
        return f"{self.url}/dicom-web"

    @property
    def log(self) -> Path:
        return Path(self.root) / "orthanc.log"

    def configuration(self) -> dict[str, Any]:
        """Orthanc's JSON configuration: local-only, authenticated, DICOMweb on."""
        root = Path(self.root)
        return {
            "Name": "samed-adapter-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "SAMEDTEST",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False,
            "HttpTimeout": 10,
        }

    def start(self, timeout: float = 30.0) -> "Orthanc":
        """Start the server and wait until ``/system`` answers; RuntimeError (with the log's end)
        when it exits or does not answer in ``timeout`` seconds."""
        import requests

        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        root = Path(self.root)
        root.mkdir(parents=True, exist_ok=True)
        config = root / "orthanc.json"
        config.write_text(json.dumps(self.configuration(), indent=2), encoding="utf-8")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(["Orthanc", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                            cwd=root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.process.returncode}: {self._log_tail()}")
            try:
                if requests.get(f"{self.url}/system", auth=(self.user, self.password), timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s: {self._log_tail()}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) if it runs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Stop the server at once, as a crash or a pulled cable would (SIGKILL, no clean-up)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----------------------------------------------------------------------- the REST API

    def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        """``method`` on the REST API (authenticated); the JSON answer. HTTPError on failure."""
        import requests

        response = requests.request(method, f"{self.url}{path}", auth=(self.user, self.password), timeout=30,
                                    **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def upload(self, files: Sequence[Union[str, os.PathLike]]) -> list[str]:
        """``POST /instances`` for each file; Orthanc's ids of the instances."""
        return [self.rest("POST", "/instances", data=Path(f).read_bytes())["ID"] for f in files]

    def series_uids(self) -> list[str]:
        """The SeriesInstanceUID of every series the server holds, sorted."""
        return sorted(self.rest("GET", f"/series/{sid}")["MainDicomTags"]["SeriesInstanceUID"]
                      for sid in self.rest("GET", "/series"))

    def modalities(self) -> dict[str, str]:
        """SeriesInstanceUID -> Modality of every series the server holds."""
        tags = [self.rest("GET", f"/series/{sid}")["MainDicomTags"] for sid in self.rest("GET", "/series")]
        return {t["SeriesInstanceUID"]: t.get("Modality", "") for t in tags}


# --------------------------------------------------------------------------- a synthetic study


def _dataset(kind: str, study: dict[str, str], series_uid: str, number: int, description: str) -> Any:
    """A dataset with the patient, study and series attributes every instance of the study shares."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = kind
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = kind, ds.file_meta.MediaStorageSOPInstanceUID
    for keyword, value in study.items():
        setattr(ds, keyword, value)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, description
    ds.Manufacturer = "samed-adapter tests"
    return ds


def write_study(folder: Union[str, os.PathLike], *, ct_series: int = 1, slices: int = 4, report: bool = False,
                localizer: bool = False, patient_id: str = "SAMED-0001", study_date: str = "20240615") -> dict[str, Any]:
    """Write one synthetic study into ``folder``: what a scanner would send to a PACS.

    Each CT series has ``slices`` axial slices of pydicom's bundled CT_small (128 x 128),
    5 mm apart, each shifted sideways by 9 more columns so that every slice differs; series k
    is rolled by 5 k rows, so the series differ too. ``report`` adds a Basic Text SR (not an
    image); ``localizer`` adds a one-slice scout (ImageType LOCALIZER). Every instance carries
    the same patient and study.

    Returns:
        ``{"study": StudyInstanceUID, "ct": [SeriesInstanceUID, ...], "report": uid or None,
        "localizer": uid or None, "files": [every file], "folders": {series uid: its folder}}``;
        each series lies in its own subfolder of ``folder``.
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import CTImageStorage, generate_uid

    source = get_testdata_file("CT_small.dcm", download=False)
    if source is None:
        raise RuntimeError("pydicom's bundled test data (CT_small.dcm) is not installed; reinstall pydicom")
    ct = pydicom.dcmread(source)
    folder = Path(folder)
    study = {"PatientID": patient_id, "PatientName": "Test^Samed", "PatientBirthDate": "19700101",
             "PatientSex": "O", "StudyInstanceUID": generate_uid(), "StudyDate": study_date, "StudyTime": "101500",
             "StudyID": "1", "AccessionNumber": "ACC0001", "ReferringPhysicianName": "", "Modality": "CT",
             "StudyDescription": "synthetic CT for samed-adapter"}
    frame = generate_uid()
    made: dict[str, Any] = {"study": study["StudyInstanceUID"], "ct": [], "report": None, "localizer": None,
                            "files": [], "folders": {}}

    def save(ds: Any, series_folder: Path, name: str) -> None:
        series_folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(series_folder / name, enforce_file_format=True)
        made["files"].append(series_folder / name)
        made["folders"][str(ds.SeriesInstanceUID)] = series_folder

    orient = [float(v) for v in ct.ImageOrientationPatient]
    normal = np.cross(orient[:3], orient[3:])
    for s in range(ct_series):
        uid = generate_uid()
        made["ct"].append(uid)
        for k in range(slices):
            ds = _dataset(CTImageStorage, study, uid, s + 2, f"axial {s + 1}")
            ds.FrameOfReferenceUID = frame
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array([float(v) for v in ct.ImagePositionPatient])
                                       + 5.0 * k * normal]
            ds.ImageOrientationPatient, ds.PixelSpacing = ct.ImageOrientationPatient, ct.PixelSpacing
            ds.SliceThickness = 5.0
            ds.Rows, ds.Columns = ct.Rows, ct.Columns
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            pixels = np.roll(np.roll(ct.pixel_array, 9 * k, axis=1), 5 * s, axis=0)
            ds.PixelData = pixels.astype("<i2").tobytes()
            save(ds, folder / f"ct{s + 1}", f"{k:03d}.dcm")
    if localizer:
        ds = _dataset(CTImageStorage, study, generate_uid(), 1, "scout")
        ds.FrameOfReferenceUID = frame
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.InstanceNumber = 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = ["0", "-200", "200"], ["0", "1", "0", "0", "0", "-1"]
        ds.PixelSpacing, ds.SliceThickness = ["2", "2"], 1
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((64, 64), "<i2").tobytes()
        made["localizer"] = str(ds.SeriesInstanceUID)
        save(ds, folder / "scout", "000.dcm")
    if report:
        from pydicom.dataset import Dataset
        from pydicom.uid import BasicTextSRStorage

        ds = _dataset(BasicTextSRStorage, study, generate_uid(), 99, "report")
        ds.Modality = "SR"
        ds.InstanceNumber = 1
        ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
        title = Dataset()
        title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
        ds.ConceptNameCodeSequence = [title]
        ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
        made["report"] = str(ds.SeriesInstanceUID)
        save(ds, folder / "report", "000.dcm")
    return made


def organs_adapter(path: Union[str, os.PathLike]) -> Path:
    """A random 3-class adapter (liver, spleen, right kidney) on the tiny random SAM of seed 0
    (``--sam-backbone tiny --random-sam-seed 0``), saved at ``path``: on :func:`write_study`'s CT
    it predicts several classes, so that its SEG and RTSTRUCT hold more than one segment."""
    from .. import AdapterConfig, build_sam
    from . import random_adapter

    config = AdapterConfig(num_classes=3, image_size=64, intensity_window=None, intensity_percentiles=(1.0, 99.0),
                           class_names=["liver", "spleen", "right kidney"])
    return random_adapter(build_sam("tiny", seed=0), config, seed=4, scale=0.5).save(path)
