"""A datastore whose images and final labels live in a PACS, as MONAI Label's ``DICOMWebDatastore`` keeps them.

MONAI Label's (``monailabel/datastore/dicom.py``), which 3D Slicer's and OHIF's MONAI Label
clients talk to through the same ``/datastore`` routes as the folder datastore's:

- an image is a series of the PACS (QIDO-RS), its id the SeriesInstanceUID (what OHIF sends as
  ``image=`` for inference and "Submit label"); it is fetched once (WADO-RS) into a local cache,
  ``CACHE/<hash of the URL>/`` (MONAI Label's ``cache_path/md5(url)``), as a NIfTI
  (``<uid>.nii.gz``, what the rest of the library reads) beside its DICOM files
  (``dicom/<uid>/``); the cache is a :class:`~.local.FolderDatastore`;
- a ``final`` label saved is written as a DICOM SEG of the image series and stored to the PACS
  (STOW-RS), then kept in the cache (the NIfTI under ``labels/final/``, the SEG under ``seg/``);
  other tags (``original``, the model's) stay in the cache only, as MONAI Label's do;
- the final labels are the PACS's: the newest SEG series referencing an image series, in its
  study and of its patient (whoever made it: OHIF, 3D Slicer, another server); ``datalist`` and
  ``training_items`` fetch those the cache lacks, and drop cached finals the PACS no longer has.
- ``add_image``: MONAI Label's copies the file into its cache, where its PACS listing never shows
  it; here it is refused with what to do instead (send the series to the PACS).
  ``remove_image``: as MONAI Label's, the cached copy and the cached labels go; the PACS keeps the
  series, which is still listed (and fetched again when asked for). ``remove_label`` of a final
  label is refused: it is a SEG series in the PACS, removed there.

What comes over the wire is checked (:mod:`.pacs`): a fetched series is the one asked for, of its
study and patient, exactly the instances QIDO-RS lists; a SEG is taken as a label only where it
references one listed image series, in its study, of its patient, and reads on that series'
slices and grid; every answer is read under the DICOMweb limits, each operation on its own clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..dicomweb.errors import DicomWebError, shown_url
from ..dicomweb.limits import Limits
from ..dicomweb.session import Credentials, open_client
from ..io.limits import DEFAULT_MAX_VOXELS
from ..io.volumes import read_image
from .checks import check_id, check_label, check_label_classes, split_name
from .errors import DatastoreError, EmptyDatastoreError, ImageNotFoundError, LabelClassError, LabelNotFoundError
from .folder import json_info
from .local import FINAL, FolderDatastore, Item
from .pacs import (PacsLabel, PacsSeries, SegFacts, fetch_series_files, final_labels, image_nifti, image_series)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..adapter_file.config import AdapterConfig
    from ..io.volume import Volume

__all__ = ["DicomWebDatastore"]

logger = logging.getLogger(__name__)

#: Seconds a PACS listing is reused (MONAI Label caches its listing for 2 hours; a save forgets it).
LIST_TTL = 30.0
#: Class ids a label may hold when no adapter config names them (one SEG segment each).
MAX_UNNAMED_CLASSES = 255


def _split_credentials(url: str, credentials: Optional[Credentials]) -> tuple[str, Credentials]:
    """(the URL without ``user@``, the credentials): a user in the URL takes its password from
    ``SAMED_DICOMWEB_PASSWORD`` (never from the URL); else a bearer token from ``SAMED_DICOMWEB_TOKEN``."""
    parts = urlsplit(url)
    if parts.password:
        raise DicomWebError(f"{shown_url(url)}: a password in the URL shows in process lists and logs; give "
                            "http://USER@host/... and the password in SAMED_DICOMWEB_PASSWORD")
    if credentials is not None or not parts.username:
        return url, credentials or Credentials.resolve()
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), Credentials.resolve(parts.username)


class DicomWebDatastore:
    """Images and final labels in a PACS (DICOMweb), as MONAI Label's ``DICOMWebDatastore`` (see the module).

    Methods keep :class:`~.local.FolderDatastore`'s names and answers (MONAI Label's).

    Args:
        url: the DICOMweb root, e.g. ``http://host:8042/dicom-web`` (``http://USER@host/...``: HTTP
            basic, the password from ``SAMED_DICOMWEB_PASSWORD``).
        cache: the folder for local copies; this PACS's are in ``cache/<hash of url>/``.
        credentials: instead of those the URL and environment give.
        modalities: the image series listed (MONAI Label's ``search_filter``); None: every series
            of an image modality.
        limits: the bounds on each operation's answers (each gets a fresh clock).
        list_ttl: seconds a listing of the PACS is reused.
    """

    def __init__(self, url: str, cache: Union[str, os.PathLike], *, credentials: Optional[Credentials] = None,
                 modalities: Optional[Sequence[str]] = None, limits: Optional[Limits] = None,
                 list_ttl: float = LIST_TTL, lock_timeout: float = 60.0, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
        url, self._credentials = _split_credentials(url, credentials)
        self.url = url.rstrip("/")
        open_client(self.url, self._credentials)  # refuses what is no http(s) URL before any folder is made
        self.modalities = tuple(modalities) if modalities else None
        self.limits = limits or Limits()
        self.list_ttl = float(list_ttl)
        self.max_voxels = int(max_voxels)
        self.root = Path(cache).resolve() / hashlib.sha256(shown_url(self.url).encode()).hexdigest()[:16]
        self.local = FolderDatastore(self.root, lock_timeout=lock_timeout, max_voxels=max_voxels)
        self.extensions = self.local.extensions  # the label files save_label takes
        for folder in (self.root / "dicom", self.root / "seg"):
            folder.mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._fetching: dict[str, threading.Lock] = {}
        self._images_seen: tuple[float, dict[str, PacsSeries]] = (float("-inf"), {})
        self._labels_seen: tuple[float, dict[str, PacsLabel]] = (float("-inf"), {})
        self._facts: dict[str, SegFacts] = {}
        self._unreadable: dict[str, str] = {}  # SEG series uid -> why it did not read as its series' label
        #: SEG series uid -> why it is not taken as a final label (as the last listing found).
        self.refused: dict[str, str] = {}

    # ---- the PACS, listed under a short-lived memo ----

    def _client(self) -> tuple[Any, Limits]:
        limits = dataclasses.replace(self.limits, started=time.monotonic())
        return open_client(self.url, self._credentials, limits=limits), limits

    def _images(self) -> dict[str, PacsSeries]:
        with self._lock:
            stamp, images = self._images_seen
            if time.monotonic() - stamp > self.list_ttl:
                client, limits = self._client()
                images = image_series(client, self.url, limits, self.modalities)
                self._images_seen = (time.monotonic(), images)
            return images

    def _finals(self) -> dict[str, PacsLabel]:
        with self._lock:
            images = self._images()
            stamp, labels = self._labels_seen
            if time.monotonic() - stamp > self.list_ttl:
                client, limits = self._client()
                labels, refused = final_labels(client, self.url, limits, images, self._facts, self._unreadable)
                for seg in refused.keys() - self.refused.keys():  # said once, not at every listing
                    logger.warning("%s: SEG series %s is not taken as a final label: %s", self.name(), seg,
                                   refused[seg])
                self.refused = refused
                self._labels_seen = (time.monotonic(), labels)
            return labels

    def refresh(self) -> None:
        """Forget the listings: the next call asks the PACS again."""
        with self._lock:
            self._images_seen = (float("-inf"), {})
            self._labels_seen = (float("-inf"), {})

    def _series(self, image_id: str) -> PacsSeries:
        series = self._images().get(image_id)
        if series is None:
            kinds = f" of modality {', '.join(self.modalities)}" if self.modalities else ""
            raise ImageNotFoundError(f"{shown_url(self.url)}: no image series {image_id!r}{kinds} in the PACS; "
                                     "list_images() gives the SeriesInstanceUIDs it holds")
        return series

    # ---- the cache: an image fetched once ----

    def _fetched(self, image_id: str) -> Path:
        """The cached NIfTI of a listed image, fetched (WADO-RS) with its DICOM files when missing."""
        series = self._series(image_id)
        with self._lock:
            gate = self._fetching.setdefault(image_id, threading.Lock())
        with gate:  # one fetch of a series at a time in this process; another process's add wins below
            dicom = self.root / "dicom" / image_id
            if self.local.get_image_uri(image_id) and dicom.is_dir():
                return self.local.image_path(image_id)
            with tempfile.TemporaryDirectory(prefix=".fetch-", dir=self.root) as tmp:
                client, limits = self._client()
                folder = fetch_series_files(client, self.url, limits, series.study, image_id, series.patient,
                                            Path(tmp))
                volume = read_image(folder, max_voxels=self.max_voxels)
                if not self.local.get_image_uri(image_id):
                    self._add_image(image_id, volume, series, Path(tmp))
                if not dicom.is_dir():
                    os.replace(folder, dicom)
            return self.local.image_path(image_id)

    def _add_image(self, image_id: str, volume: "Volume", series: PacsSeries, tmp: Path) -> None:
        from .errors import ImageExistsError

        nifti = image_nifti(volume, tmp / f"{image_id}.nii.gz")
        try:
            self.local.add_image(image_id, nifti, {**series.info, "source": "dicomweb"})
        except ImageExistsError:
            pass  # another process cached it first: the same series

    def series_folder(self, image_id: str) -> Path:
        """The cached DICOM files of image series ``image_id`` (fetched when missing): what a DICOM SEG of
        the model's labels is made over (``/infer/...?image=UID&output=dicom_seg``)."""
        self._fetched(image_id)
        return self.root / "dicom" / image_id

    def _dicom_volume(self, image_id: str) -> "Volume":
        return read_image(self.series_folder(image_id), max_voxels=self.max_voxels)

    # ---- reading (MONAI Label's names and answers) ----

    def name(self) -> str:
        """The DICOMweb root (MONAI Label's answer), without any user name."""
        return shown_url(self.url)

    def description(self) -> str:
        return f"DICOMweb datastore of {shown_url(self.url)} (cached in {self.root})"

    def list_images(self) -> list[str]:
        """Every image series' SeriesInstanceUID, in the PACS's order."""
        return list(self._images())

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[list[str]] = None) -> list[str]:
        """Ids of the images with a label of ``label_tag`` (default ``final``: a SEG in the PACS)."""
        tag = label_tag or FINAL
        done = set(self._finals()) if tag == FINAL else set(self.local.get_labeled_images(tag))
        return [k for k in self._images() if k in done]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[list[str]] = None) -> list[str]:
        """Ids of the images without a label of ``label_tag`` (default ``final``)."""
        done = set(self.get_labeled_images(label_tag))
        return [k for k in self._images() if k not in done]

    def get_image_uri(self, image_id: str) -> str:
        """The cached NIfTI's path, fetched first when missing; ``""`` for an unknown id (MONAI Label's answer)."""
        return str(self._fetched(image_id)) if image_id in self._images() else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        """The cached label's path (a final one fetched from the PACS first); ``""`` when there is none."""
        if label_id not in self._images():
            return ""
        if label_tag == FINAL:
            path = self._synced_final(label_id)
            return str(path) if path else ""
        return self.local.get_label_uri(label_id, label_tag)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """MONAI Label's DICOM info of the series (plus the cache's info and ``path`` once fetched); ``{}``
        for an unknown id."""
        series = self._images().get(image_id)
        return {**series.info, **self.local.get_image_info(image_id)} if series else {}

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        """The label's info; a final label not cached yet gives its SEG's UIDs. ``{}`` when there is none."""
        if label_tag != FINAL:
            return self.local.get_label_info(label_id, label_tag) if label_id in self._images() else {}
        label = self._finals().get(label_id)
        if label is None:
            return {}
        cached = self.local.get_label_info(label_id, FINAL)
        if cached.get("SeriesInstanceUID") == label.seg:
            return cached
        return {"SeriesInstanceUID": label.seg, "StudyInstanceUID": label.study, "PatientID": label.patient}

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        """{tag: label id} of the image's labels (a label's id is its image's)."""
        if image_id not in self._images():
            return {}
        tags = {t: image_id for t in self.local.get_labels_by_image_id(image_id) if t != FINAL}
        return {**tags, FINAL: image_id} if image_id in self._finals() else tags

    def image_path(self, image_id: str) -> Path:
        """The cached image's path (fetched when missing), or :class:`ImageNotFoundError`."""
        return self._fetched(image_id)

    def label_path(self, image_id: str, label_tag: str = FINAL) -> Path:
        """The cached label's path, or :class:`ImageNotFoundError` / :class:`LabelNotFoundError`."""
        self._series(image_id)
        uri = self.get_label_uri(image_id, label_tag)
        if not uri:
            raise LabelNotFoundError(f"{shown_url(self.url)}: image series {image_id!r} has no {label_tag!r} label; "
                                     f"its labels: {sorted(self.get_labels_by_image_id(image_id)) or 'none'}")
        return Path(uri)

    def datalist(self) -> list[dict[str, str]]:
        """[{"image": path, "label": path}] of the images with a final label, fetched as needed (MONAI Label's)."""
        return [{"image": str(i.image), "label": str(i.label)} for i in self._final_items()]

    def training_items(self) -> list[Item]:
        """The images with a final label in the PACS, fetched into the cache, for a training job: the PACS is
        listed anew (a job trains on what it holds now, never on the routes' listing of up to ``list_ttl`` ago).

        Raises:
            EmptyDatastoreError: none has one.
            DicomWebError: the PACS failed.
        """
        self.refresh()
        items = self._final_items()
        if not items:
            raise EmptyDatastoreError(f"{shown_url(self.url)}: none of its {len(self._images())} image series has a "
                                      "final label (a SEG series in the PACS); correct some automatic labels and "
                                      "submit them (tag 'final') before training")
        return items

    def _final_items(self) -> list[Item]:
        finals = self._finals()
        for image_id in self.local.get_labeled_images(FINAL):
            if image_id not in finals:  # the PACS no longer holds it (MONAI Label drops it too)
                self.local.remove_label(image_id, FINAL)
        items = []
        for image_id in self._images():
            label = self._synced_final(image_id) if image_id in finals else None
            if label is not None:
                items.append(Item(image_id, self.local.image_path(image_id), label))
        return items

    def status(self) -> dict[str, Any]:
        """{"total": images, "completed": with a final label, "label_tags": {tag: count}} (MONAI Label's)."""
        images = self._images()
        tags: dict[str, int] = {}
        for image_id in images:
            for tag in self.get_labels_by_image_id(image_id):
                tags[tag] = tags.get(tag, 0) + 1
        return {"total": len(images), "completed": tags.get(FINAL, 0), "label_tags": tags}

    def json(self) -> dict[str, Any]:
        """The datastore as MONAI Label's ``/datastore/?output=all`` gives it: every listed series."""
        objects = {}
        for image_id in self._images():
            labels = {tag: {"ext": ".nii.gz", "info": self.get_label_info(image_id, tag)}
                      for tag in self.get_labels_by_image_id(image_id)}
            objects[image_id] = {"image": {"ext": ".nii.gz", "info": self.get_image_info(image_id)}, "labels": labels}
        return {"name": self.name(), "description": self.description(), "images_dir": ".", "labels_dir": "labels",
                "objects": objects}

    # ---- final labels: SEG series of the PACS, read into the cache ----

    def _synced_final(self, image_id: str) -> Optional[Path]:
        """The cached NIfTI of the image's final label in the PACS, fetched when the cache lacks it."""
        label = self._finals().get(image_id)
        if label is None:
            return None
        if self.local.get_label_info(image_id, FINAL).get("SeriesInstanceUID") == label.seg:
            return self.local.label_path(image_id, FINAL)
        try:
            return self._read_final(image_id, label)
        except (ValueError, KeyError, AttributeError, TypeError) as exc:  # a SEG that does not lie on its series
            why = f"it does not read as a label of series {image_id} ({type(exc).__name__}: {str(exc)[:200]})"
            logger.warning("%s: SEG series %s is not taken as a final label: %s", self.name(), label.seg, why)
            with self._lock:
                self._unreadable[label.seg] = self.refused[label.seg] = why
                self._labels_seen = (float("-inf"), {})  # an older SEG of the series may be its label
            return self._synced_final(image_id)

    def _read_final(self, image_id: str, label: PacsLabel) -> Path:
        from ..io.dicom_seg import read_dicom_seg
        from ..io.nifti import label_nifti

        import nibabel as nib

        dicom = self._dicom_volume(image_id)
        image = read_image(self.local.image_path(image_id), max_voxels=self.max_voxels)
        with tempfile.TemporaryDirectory(prefix=".seg-", dir=self.root) as tmp:
            client, limits = self._client()
            folder = fetch_series_files(client, self.url, limits, label.study, label.seg, label.patient, Path(tmp),
                                        image=False)
            files = sorted(folder.iterdir())
            if len(files) != 1:
                raise ValueError(f"SEG series {label.seg} came as {len(files)} instances, not one")
            classes = read_dicom_seg(files[0], dicom)
            nifti = Path(tmp) / f"{image_id}.nii.gz"
            nib.save(label_nifti(classes, image), nifti)
            self.local.save_label(image_id, nifti, FINAL, {"SeriesInstanceUID": label.seg, "StudyInstanceUID":
                                                           label.study, "PatientID": label.patient,
                                                           "source": "dicomweb"})
            os.replace(files[0], self.root / "seg" / f"{image_id}.dcm")
        return self.local.label_path(image_id, FINAL)

    # ---- writing ----

    def save_label(self, image_id: str, label_filename: Union[str, os.PathLike], label_tag: str = FINAL,
                   label_info: Optional[Mapping[str, Any]] = None, *, config: Optional["AdapterConfig"] = None) -> str:
        """Save a label of ``image_id``; a ``final`` one is stored to the PACS as a DICOM SEG first.

        The label is checked as the folder datastore checks it (its image's grid; the adapter's
        classes given ``config``) before anything is stored. Other tags stay in the cache.

        Raises:
            ImageNotFoundError, UnsafeIdError, UnsupportedFileError, LabelGridError, LabelClassError,
            ImageReadError: nothing is stored. DicomWebError: the PACS failed the fetch or the STOW-RS
            (see :func:`samed_adapter.dicomweb.store.store_series`); nothing is kept in the cache then.
        """
        check_id(label_tag, "label tag")
        series = self._series(image_id)
        src = Path(label_filename)
        split_name(src.name, self.local.extensions)
        if not src.is_file():
            raise ImageNotFoundError(f"{src}: no such file; give the path of a NIfTI label to save")
        if label_tag != FINAL:
            self._fetched(image_id)
            return self.local.save_label(image_id, src, label_tag, label_info, config=config)
        info = json_info(label_info)
        label = read_image(src, max_voxels=self.max_voxels)
        check_label(label, read_image(self._fetched(image_id), max_voxels=self.max_voxels), config, name=src)
        names = _class_names(label, config, info, src)
        with tempfile.TemporaryDirectory(prefix=".stow-", dir=self.root) as tmp:
            seg = _final_seg(label.array, self._dicom_volume(image_id), names, Path(tmp) / "label.dcm", info)
            self._store(series, seg, image_id)
            uid = _series_uid(seg)
            info.update(SeriesInstanceUID=uid, Modality=series.info["Modality"], PatientID=series.patient,
                        StudyInstanceUID=series.study)
            self.local.save_label(image_id, src, FINAL, info, config=config)
            os.replace(seg, self.root / "seg" / f"{image_id}.dcm")
        with self._lock:
            self._labels_seen = (float("-inf"), {})
        return image_id

    def _store(self, series: PacsSeries, seg: Path, image_id: str) -> None:
        from ..dicomweb.store import store_series

        client, _ = self._client()
        store_series(client, self.url, series.study, [seg], f"the final label of series {image_id}")

    def add_image(self, image_id: Optional[str], image_filename: Union[str, os.PathLike],
                  image_info: Optional[Mapping[str, Any]] = None) -> str:
        """Refused: the images are the PACS's series (MONAI Label's copies the file into its cache, never listed)."""
        raise DatastoreError(f"{shown_url(self.url)}: the images of a DICOMweb datastore are the PACS's series; send "
                             f"{Path(image_filename).name} to the PACS (C-STORE or STOW-RS) and it is listed")

    def remove_image(self, image_id: str) -> None:
        """Drop the cached copy of an image and its cached labels (MONAI Label's); the PACS keeps the series."""
        self._series(image_id)
        if self.local.get_image_uri(image_id):
            self.local.remove_image(image_id)
        shutil.rmtree(self.root / "dicom" / image_id, ignore_errors=True)
        (self.root / "seg" / f"{image_id}.dcm").unlink(missing_ok=True)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Delete a cached label; a final label is a SEG series of the PACS, removed there (refused here)."""
        if label_tag == FINAL and label_id in self._finals():
            raise DatastoreError(f"{shown_url(self.url)}: the final label of series {label_id} is SEG series "
                                 f"{self._finals()[label_id].seg} in the PACS; delete that series there")
        self.local.remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: Mapping[str, Any]) -> None:
        """Merge ``info`` into the cached image's info (the image is fetched first)."""
        self._fetched(image_id)
        self.local.update_image_info(image_id, info)

    def change_image_info(self, image_id: str, change: Callable[[dict[str, Any]], Mapping[str, Any]]) -> None:
        """:meth:`FolderDatastore.change_image_info` on the cached image (fetched first)."""
        self._fetched(image_id)
        self.local.change_image_info(image_id, change)

    def update_label_info(self, label_id: str, label_tag: str, info: Mapping[str, Any]) -> None:
        """Merge ``info`` into the cached label's info (a final label is fetched first)."""
        if label_tag == FINAL:
            self.label_path(label_id, FINAL)
        self.local.update_label_info(label_id, label_tag, info)


def _class_names(label: "Volume", config: Optional["AdapterConfig"], info: Mapping[str, Any], src: Path) -> list[str]:
    """The K class names the SEG's segments carry: the adapter's, else MONAI Label's ``label_info``, else
    ``class k``."""
    if config is not None:
        count, named = int(config.num_classes), list(config.class_names or [])
    else:
        count = max(1, int(np.nanmax(label.array, initial=0)))
        if count > MAX_UNNAMED_CLASSES:
            raise LabelClassError(f"{src}: holds class ids up to {count}; without the adapter's classes a label may "
                                  f"hold {MAX_UNNAMED_CLASSES} (save it through the service, which checks it)")
        check_label_classes(label, count, src)
        named = [str(e.get("name", "")) for e in info.get("label_info", []) if isinstance(e, dict)]
    return [named[k] if k < len(named) and named[k] else f"class {k + 1}" for k in range(count)]


def _final_seg(labels: np.ndarray, dicom: "Volume", names: list[str], path: Path, info: Mapping[str, Any]) -> Path:
    """A DICOM SEG of a person's label: a model's label corrected, so its segments are SEMIAUTOMATIC."""
    import pydicom

    from ..io.dicom_seg import write_dicom_seg
    from ..io.files import atomic_path

    write_dicom_seg(labels, dicom, names, path, adapter_name=str(info.get("model") or "final label"),
                    series_description="samed-adapter final label")
    ds = pydicom.dcmread(path)
    for segment in ds.SegmentSequence:
        segment.SegmentAlgorithmType = "SEMIAUTOMATIC"
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
