"""A folder datastore in MONAI Label's own on-disk format, so both can share one folder.

The layout is MONAI Label 0.8.5's ``LocalDatastore``'s (``monailabel/datastore/local.py``)::

    FOLDER/
      datastore_v2.json       {"name", "description", "images_dir": ".", "labels_dir": "labels",
                               "objects": {id: {"image": {"ext", "info"}, "labels": {tag: {"ext", "info"}}}}}
      .lock                   the flock both take around every read and write of the JSON
      <id>.nii.gz | <id>.nii  the images, in the root (``images_dir``)
      labels/final/<id>.nii.gz      a person's label ("Submit label" in 3D Slicer, OHIF)
      labels/original/<id>.nii.gz   the model's label

An image id is its file name less the NIfTI extension; a label has its image's id. Each info
holds ``ts`` (seconds since the epoch) and ``name`` (the file name) as MONAI Label writes them,
plus ``checksum`` (``SHA256:<hex>``, MONAI Label's format for the field it leaves commented out)
and whatever the caller gave (the user, the client id).

Unlike MONAI Label's, every write is atomic: a file is copied into a hidden staging folder,
checked there, then linked (a new image: never over an existing file) or moved (a label saved
again on purpose) into place, and the JSON is re-read, changed and replaced under the lock, so
two writers (threads, processes, or a MONAI Label server on the same folder) never lose each
other's entries. A refused request leaves every file as it was.
"""

from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from ..io.errors import ImageReadError
from ..io.files import atomic_path
from ..io.limits import DEFAULT_MAX_VOXELS
from ..io.volumes import read_image
from .checks import EXTENSIONS, check_id, check_label, check_round_trip, file_checksum, split_name
from .errors import (DatastoreError, EmptyDatastoreError, ImageExistsError, ImageNotFoundError,
                     LabelNotFoundError)
from .folder import (LOCK_NAME, STAGING_NAME, file_identity, folder_lock, json_info, keep_aside, link_new,
                     remove_stale_staging, stage_copy)
from .index import merged_index, new_index, read_index

if TYPE_CHECKING:
    from ..adapter_file.config import AdapterConfig

__all__ = ["FINAL", "JSON_NAME", "ORIGINAL", "FolderDatastore", "Item"]

JSON_NAME = "datastore_v2.json"
FINAL, ORIGINAL = "final", "original"


@dataclass
class _Edit:
    """One change of the JSON (``model``) and of the files it names (see ``FolderDatastore._editing``)."""

    model: dict[str, Any]
    undo: list[Callable[[], None]] = field(default_factory=list)
    after: list[Callable[[], None]] = field(default_factory=list)


@dataclass(frozen=True)
class Item:
    """One training item: an image and its final label, as a training job reads them."""

    image_id: str
    image: Path
    label: Path


class FolderDatastore:
    """Images and labels in a folder, as MONAI Label's ``LocalDatastore`` keeps them.

    Methods keep MONAI Label's names, arguments and answers (``list_images``, ``add_image``,
    ``save_label``, ``get_image_uri`` giving ``""`` for an unknown id, ...); ``training_items``
    and the checks are this package's.

    Args:
        path: the folder; made if missing, with ``labels/final`` and ``labels/original``.
        extensions: the image and label files kept (MONAI Label's default ``.nii.gz``, ``.nii``).
        lock_timeout: seconds to wait for another writer before :class:`DatastoreBusyError`.
        read_only: do not reconcile the JSON with the files on opening (MONAI Label's flag).
        max_voxels: the largest image or label read for the checks.
    """

    def __init__(self, path: Union[str, os.PathLike], *, extensions: Sequence[str] = EXTENSIONS,
                 lock_timeout: float = 60.0, read_only: bool = False, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
        self.root = Path(path).resolve()
        self.extensions = tuple(extensions)
        self.lock_timeout = float(lock_timeout)
        self.max_voxels = int(max_voxels)
        self._json = self.root / JSON_NAME
        # (the JSON's stat, the model read from it, entries left unread): re-read when the stat changes
        self._cache: tuple[Optional[tuple[int, int, int]], dict[str, Any], dict[str, Any]] = (None, new_index(), {})
        self.root.mkdir(parents=True, exist_ok=True)
        model = self._load()
        for folder in (self._images(model), self._labels(model), self._labels(model) / FINAL,
                       self._labels(model) / ORIGINAL):
            folder.mkdir(parents=True, exist_ok=True)
        if not read_only:
            (self.root / STAGING_NAME).mkdir(exist_ok=True)  # here, so that no refused request makes it
            remove_stale_staging(self.root)
            self.refresh()

    # ---- the JSON, read and written under the lock ----

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with folder_lock(self.root / LOCK_NAME, timeout=self.lock_timeout):
            yield

    def _stat(self) -> Optional[tuple[int, int, int]]:
        """What tells a rewritten JSON from the one read (a MONAI Label writer rewrites it in place)."""
        stamp = file_identity(self._json)
        return stamp if stamp != (0, 0, 0) else None

    def _load(self) -> dict[str, Any]:
        """The JSON as it is on disk now (re-read only when the file changed)."""
        stamp, model, _ = self._cache
        if stamp is not None and stamp == self._stat():
            return model
        with self._locked():
            return self._read_locked()

    def _read_locked(self) -> dict[str, Any]:
        stamp = self._stat()
        if stamp is not None and stamp == self._cache[0]:
            return self._cache[1]
        model, hidden = read_index(self._json, self.root, self.extensions) if stamp else (new_index(), {})
        self._cache = (stamp, model, hidden)
        return model

    @contextmanager
    def _editing(self) -> Iterator["_Edit"]:
        """The JSON re-read under the lock for the block to change, and written back when it succeeds.

        When the block or the write fails (a full disk), the block's ``undo`` steps put its files
        back, still under the lock; its ``after`` steps (deletions) run only once the JSON is written.
        """
        with self._locked():
            edit = _Edit(copy.deepcopy(self._read_locked()))
            try:
                yield edit
                self._write_locked(edit.model)
            except BaseException:
                for step in reversed(edit.undo):
                    step()
                raise
            for step in edit.after:
                step()

    def _write_locked(self, model: dict[str, Any]) -> None:
        """Replace the JSON with ``model`` plus the entries it left unread (those whose image is still there)."""
        stored, unread = merged_index(model, self._cache[2])
        with atomic_path(self._json) as tmp:
            tmp.write_text(json.dumps(stored, indent=2, default=str), encoding="utf-8")
        self._cache = (self._stat(), model, unread)

    # ---- paths ----

    def _images(self, model: Mapping[str, Any]) -> Path:
        return (self.root / str(model["images_dir"])).resolve()

    def _labels(self, model: Mapping[str, Any]) -> Path:
        return (self.root / str(model["labels_dir"])).resolve()

    def _image_file(self, model: Mapping[str, Any], image_id: str) -> Path:
        return self._images(model) / (image_id + model["objects"][image_id]["image"]["ext"])

    def _label_file(self, model: Mapping[str, Any], image_id: str, tag: str) -> Path:
        return self._labels(model) / tag / (image_id + model["objects"][image_id]["labels"][tag]["ext"])

    # ---- reading (MONAI Label's names and answers) ----

    def name(self) -> str:
        return str(self._load()["name"])

    def description(self) -> str:
        return str(self._load()["description"])

    def list_images(self) -> list[str]:
        """Every image id, in the JSON's order (MONAI Label's)."""
        return list(self._load()["objects"])

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[list[str]] = None) -> list[str]:
        """Ids of the images with a label of ``label_tag`` (default ``final``, MONAI Label's only choice)."""
        tag = label_tag or FINAL
        return [k for k, v in self._load()["objects"].items() if tag in v["labels"]]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[list[str]] = None) -> list[str]:
        """Ids of the images without a label of ``label_tag`` (default ``final``)."""
        tag = label_tag or FINAL
        return [k for k, v in self._load()["objects"].items() if tag not in v["labels"]]

    def get_image_uri(self, image_id: str) -> str:
        """The image's absolute path, ``""`` for an unknown id (MONAI Label's answer)."""
        model = self._load()
        return str(self._image_file(model, image_id)) if image_id in model["objects"] else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        """The label's absolute path, ``""`` when the image or that tag's label is unknown."""
        model = self._load()
        entry = model["objects"].get(label_id)
        return str(self._label_file(model, label_id, label_tag)) if entry and label_tag in entry["labels"] else ""

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """A copy of the image's info plus its ``path``; ``{}`` for an unknown id."""
        model = self._load()
        if image_id not in model["objects"]:
            return {}
        return {**copy.deepcopy(model["objects"][image_id]["image"]["info"]),
                "path": str(self._image_file(model, image_id))}

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        """A copy of the label's info; ``{}`` when there is none."""
        entry = self._load()["objects"].get(label_id)
        label = entry["labels"].get(label_tag) if entry else None
        return copy.deepcopy(label["info"]) if label else {}

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        """{tag: label id} of the image's labels (a label's id is its image's)."""
        entry = self._load()["objects"].get(image_id)
        return {tag: image_id for tag in entry["labels"]} if entry else {}

    def image_path(self, image_id: str) -> Path:
        """The image's path, or :class:`ImageNotFoundError` (the service's 404)."""
        uri = self.get_image_uri(image_id)
        if not uri:
            raise ImageNotFoundError(f"{self.root}: no image {image_id!r}; list_images() gives the ids it holds")
        return Path(uri)

    def label_path(self, image_id: str, label_tag: str = FINAL) -> Path:
        """The label's path, or :class:`ImageNotFoundError` / :class:`LabelNotFoundError`."""
        self.image_path(image_id)
        uri = self.get_label_uri(image_id, label_tag)
        if not uri:
            raise LabelNotFoundError(f"{self.root}: image {image_id!r} has no {label_tag!r} label; its labels: "
                                     f"{sorted(self.get_labels_by_image_id(image_id)) or 'none'}")
        return Path(uri)

    def datalist(self) -> list[dict[str, str]]:
        """[{"image": path, "label": path}] of the images with a final label (MONAI Label's training list)."""
        return [{"image": str(i.image), "label": str(i.label)} for i in self._final_items()]

    def training_items(self) -> list[Item]:
        """The images with a final label, for a training job.

        Raises:
            EmptyDatastoreError: none has one.
        """
        items = self._final_items()
        if not items:
            total = len(self.list_images())
            raise EmptyDatastoreError(f"{self.root}: none of its {total} images has a final label; correct some "
                                      "automatic labels and submit them (tag 'final') before training")
        return items

    def _final_items(self) -> list[Item]:
        model = self._load()
        return [Item(k, self._image_file(model, k), self._label_file(model, k, FINAL))
                for k, v in model["objects"].items() if FINAL in v["labels"]]

    def status(self) -> dict[str, Any]:
        """{"total": images, "completed": with a final label, "label_tags": {tag: count}} (MONAI Label's)."""
        objects = self._load()["objects"]
        tags: dict[str, int] = {}
        for entry in objects.values():
            for tag in entry["labels"]:
                tags[tag] = tags.get(tag, 0) + 1
        return {"total": len(objects), "completed": sum(FINAL in v["labels"] for v in objects.values()),
                "label_tags": tags}

    def json(self) -> dict[str, Any]:
        """The datastore's JSON as MONAI Label's ``/datastore/?output=all`` gives it."""
        return copy.deepcopy(self._load())

    # ---- writing ----

    def refresh(self) -> None:
        """Reconcile the JSON with the files, as MONAI Label does on opening.

        Entries whose files are gone are dropped; image files in the root and label files under
        ``labels/<tag>/`` that the JSON does not list are added (``ts`` and ``name`` only).
        """
        with self._locked():
            model = self._read_locked()
            fixed = self._reconciled(copy.deepcopy(model))
            if fixed != model or not self._json.exists():
                self._write_locked(fixed)

    def _reconciled(self, model: dict[str, Any]) -> dict[str, Any]:
        objects = model["objects"]
        for image_id in list(objects):
            if not self._image_file(model, image_id).is_file():
                del objects[image_id]
                continue
            labels = objects[image_id]["labels"]
            for tag in list(labels):
                if not self._label_file(model, image_id, tag).is_file():
                    del labels[tag]
        for image_id, ext in self._files(self._images(model)):
            objects.setdefault(image_id, {"image": {"ext": ext, "info": _found(image_id + ext)}, "labels": {}})
        labels_dir = self._labels(model)
        tags = sorted(p.name for p in labels_dir.iterdir() if p.is_dir()) if labels_dir.is_dir() else []
        for tag in filter(lambda t: _plain(t, "label tag"), tags):
            for image_id, ext in self._files(labels_dir / tag):
                if image_id in objects:
                    objects[image_id]["labels"].setdefault(tag, {"ext": ext, "info": _found(image_id + ext)})
        return model

    def _files(self, folder: Path) -> list[tuple[str, str]]:
        """(id, extension) of the files in ``folder`` that the datastore keeps, sorted by name."""
        found: list[tuple[str, str]] = []
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            try:
                image_id, ext = split_name(p.name, self.extensions)
                check_round_trip(check_id(image_id), ext, self.extensions)
            except DatastoreError:
                continue  # not ours to list (other kinds of files, hidden temporaries)
            if p.is_file():
                found.append((image_id, ext))
        return found

    def _read(self, staged: Path, src: Path) -> Any:
        """The Volume of a staged file; a read error names the caller's file, not the copy."""
        try:
            return read_image(staged, max_voxels=self.max_voxels)
        except ImageReadError as exc:
            raise type(exc)(str(exc).replace(str(staged), str(src))) from exc

    def add_image(self, image_id: Optional[str], image_filename: Union[str, os.PathLike],
                  image_info: Optional[Mapping[str, Any]] = None) -> str:
        """Copy an image in under ``image_id`` (default: its file name less the extension); return the id.

        Raises:
            UnsafeIdError, UnsupportedFileError: the id or the file's kind.
            ImageExistsError: the id is taken (adding never overwrites).
            ImageReadError: the file is not a readable image.
        """
        src = Path(image_filename)
        file_id, ext = split_name(src.name, self.extensions)
        image_id = check_id(image_id or file_id)
        check_round_trip(image_id, ext, self.extensions)
        info = json_info(image_info)
        self._refuse_taken(self._load(), image_id)
        staged = stage_copy(self.root, _existing(src), image_id + ext)
        try:
            self._read(staged, src)
            info.update(ts=int(time.time()), checksum=file_checksum(staged), name=image_id + ext)
            with self._editing() as edit:
                self._refuse_taken(edit.model, image_id)
                dest = self._images(edit.model) / (image_id + ext)
                link_new(staged, dest)
                edit.undo.append(lambda: dest.unlink(missing_ok=True))
                edit.model["objects"][image_id] = {"image": {"ext": ext, "info": info}, "labels": {}}
        except FileExistsError:
            raise ImageExistsError(self._taken_message(image_id)) from None
        finally:
            staged.unlink(missing_ok=True)
        return image_id

    def _refuse_taken(self, model: Mapping[str, Any], image_id: str) -> None:
        taken = image_id in model["objects"] or any(
            (self._images(model) / (image_id + e)).exists() for e in self.extensions)
        if taken:
            raise ImageExistsError(self._taken_message(image_id))

    def _taken_message(self, image_id: str) -> str:
        return (f"{self.root}: image {image_id!r} exists and adding never replaces it; to replace it, "
                f"remove_image({image_id!r}) first (its labels go too), or add it under another id")

    def save_label(self, image_id: str, label_filename: Union[str, os.PathLike], label_tag: str = FINAL,
                   label_info: Optional[Mapping[str, Any]] = None, *, config: Optional["AdapterConfig"] = None) -> str:
        """Save a label of ``image_id`` under ``label_tag``, replacing that tag's previous label; return its id.

        The label must lie on its image's voxel grid and, given an adapter ``config``, hold only
        its class ids (:func:`~samed_adapter.datastore.checks.check_label`).

        Raises:
            UnsafeIdError, UnsupportedFileError, ImageNotFoundError, LabelGridError,
            LabelClassError, ImageReadError; nothing is written then.
        """
        check_id(image_id)
        check_id(label_tag, "label tag")
        src = Path(label_filename)
        _, ext = split_name(src.name, self.extensions)
        info = json_info(label_info)
        image = self.image_path(image_id)
        before = file_identity(image)
        staged = stage_copy(self.root, _existing(src), image_id + ext)
        try:
            check_label(self._read(staged, src), read_image(image, max_voxels=self.max_voxels), config, name=src)
            info.update(ts=int(time.time()), checksum=file_checksum(staged), name=image_id + ext)
            with self._editing() as edit:
                self._replace_label(edit, image_id, label_tag, staged, ext, before)
                edit.model["objects"][image_id]["labels"][label_tag] = {"ext": ext, "info": info}
        finally:
            staged.unlink(missing_ok=True)
        return image_id

    def _replace_label(self, edit: _Edit, image_id: str, tag: str, staged: Path, ext: str,
                       checked: tuple[int, int, int]) -> None:
        """Move a checked label into place (under the lock), the previous one kept aside until the JSON is written."""
        model = edit.model
        if image_id not in model["objects"] or file_identity(self._image_file(model, image_id)) != checked:
            raise ImageNotFoundError(f"{self.root}: image {image_id!r} was removed or replaced while its label "
                                     "was checked; save the label again")
        dest = self._labels(model) / tag / (image_id + ext)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            aside = keep_aside(self.root, dest)
            edit.undo.append(lambda: os.replace(aside, dest))
            edit.after.append(lambda: aside.unlink(missing_ok=True))
        else:
            edit.undo.append(lambda: dest.unlink(missing_ok=True))
        os.replace(staged, dest)
        old = model["objects"][image_id]["labels"].get(tag)
        if old and old["ext"] != ext:  # the previous version under the other extension
            edit.after.append(lambda: (dest.parent / (image_id + old["ext"])).unlink(missing_ok=True))

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Delete one label (MONAI Label's ``remove_label``); the file goes once the JSON no longer names it."""
        with self._editing() as edit:
            entry = edit.model["objects"].get(label_id)
            if not entry or label_tag not in entry["labels"]:
                raise LabelNotFoundError(f"{self.root}: image {label_id!r} has no {label_tag!r} label to remove")
            edit.after.append(partial(self._label_file(edit.model, label_id, label_tag).unlink, missing_ok=True))
            del entry["labels"][label_tag]

    def remove_image(self, image_id: str) -> None:
        """Delete an image and all its labels (MONAI Label's ``remove_image``)."""
        with self._editing() as edit:
            model = edit.model
            if image_id not in model["objects"]:
                raise ImageNotFoundError(f"{self.root}: no image {image_id!r} to remove")
            files = [self._label_file(model, image_id, tag) for tag in model["objects"][image_id]["labels"]]
            edit.after.extend(partial(p.unlink, missing_ok=True) for p in files + [self._image_file(model, image_id)])
            del model["objects"][image_id]

    def update_image_info(self, image_id: str, info: Mapping[str, Any]) -> None:
        """Merge ``info`` into the image's (MONAI Label's server records strategy picks so)."""
        info = json_info(info)
        with self._editing() as edit:
            if image_id not in edit.model["objects"]:
                raise ImageNotFoundError(f"{self.root}: no image {image_id!r}; list_images() gives the ids it holds")
            edit.model["objects"][image_id]["image"]["info"].update(info)

    def change_image_info(self, image_id: str, change: Callable[[dict[str, Any]], Mapping[str, Any]]) -> None:
        """Merge ``change(info)`` into the image's info, ``info`` read under the same lock as the write:
        two writers that each add to one key (the least_sure scores of two adapter versions) both
        keep theirs, where a read then an :meth:`update_image_info` could lose one."""
        with self._editing() as edit:
            if image_id not in edit.model["objects"]:
                raise ImageNotFoundError(f"{self.root}: no image {image_id!r}; list_images() gives the ids it holds")
            info = edit.model["objects"][image_id]["image"]["info"]
            info.update(json_info(change(copy.deepcopy(info))))

    def update_label_info(self, label_id: str, label_tag: str, info: Mapping[str, Any]) -> None:
        """Merge ``info`` into the label's (MONAI Label's ``update_label_info``)."""
        info = json_info(info)
        with self._editing() as edit:
            entry = edit.model["objects"].get(label_id)
            if not entry or label_tag not in entry["labels"]:
                raise LabelNotFoundError(f"{self.root}: image {label_id!r} has no {label_tag!r} label; its labels: "
                                         f"{sorted(entry['labels']) if entry else 'none (no such image)'}")
            entry["labels"][label_tag]["info"].update(info)


def _found(name: str) -> dict[str, Any]:
    """The info MONAI Label gives a file it finds on disk."""
    return {"ts": int(time.time()), "name": name}


def _plain(name: str, what: str) -> bool:
    try:
        check_id(name, what)
    except DatastoreError:
        return False
    return True


def _existing(src: Path) -> Path:
    if not src.is_file():
        raise ImageNotFoundError(f"{src}: no such file; give the path of a NIfTI file to copy in")
    return src
