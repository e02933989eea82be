"""The datastore's JSON (MONAI Label's ``datastore_v2.json``): what we use of it, and what we leave as it is.

Entries of kinds a folder datastore does not keep (a MONAI Label app set up for ``.nrrd``, an id
that is a path, a hand-edited entry without an extension) are neither listed nor used to build a
path, and are written back as they were: nothing another tool stored is lost.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .checks import check_id
from .errors import DatastoreError, DatastoreFormatError

__all__ = ["merged_index", "new_index", "read_index"]

logger = logging.getLogger(__name__)

#: What makes an entry unusable: a field missing or of the wrong type, an unsafe id or tag, another extension.
_UNUSABLE = (DatastoreError, KeyError, TypeError, AttributeError)


def new_index() -> dict[str, Any]:
    """The JSON of an empty datastore, keys in MONAI Label's order."""
    return {"name": "new-dataset", "description": "New Dataset", "images_dir": ".", "labels_dir": "labels",
            "objects": {}}


def read_index(path: Path, root: Path, extensions: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the index we use, the entries left unread) of the JSON at ``path`` in the datastore ``root``.

    Unread entries are ``{id: {"entry": raw}}`` (the image itself) or ``{id: {"labels": {tag: raw}}}``.

    Raises:
        DatastoreFormatError: not JSON, not a MONAI Label datastore file, or folders outside ``root``.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatastoreFormatError(
            f"{path}: damaged ({type(exc).__name__}: {exc}); restore it from a backup, or move it aside to "
            "rebuild it from the files (their label info is then lost)") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("objects", {}), dict):
        raise DatastoreFormatError(f"{path}: not a MONAI Label datastore file (no 'objects' map); move it aside "
                                   "to rebuild it from the files")
    model = {**new_index(), **raw}
    for key in ("images_dir", "labels_dir"):
        inside = (root / str(model[key])).resolve()
        if inside != root and root not in inside.parents:
            raise DatastoreFormatError(f"{path}: {key} {model[key]!r} points outside {root}; set it to a folder "
                                       "inside the datastore")
    objects: dict[str, Any] = {}
    unread: dict[str, Any] = {}
    for image_id, entry in model["objects"].items():
        try:
            objects[check_id(image_id)] = {"image": _part(entry["image"], extensions), "labels": {}}
        except _UNUSABLE as exc:
            logger.warning("%s: entry %r left as it is (%s)", path, image_id, exc)
            unread[image_id] = {"entry": entry}
            continue
        for tag, label in dict(entry.get("labels") or {}).items():
            try:
                objects[image_id]["labels"][check_id(tag, "label tag")] = _part(label, extensions)
            except _UNUSABLE:
                unread.setdefault(image_id, {"labels": {}})["labels"][tag] = label
    model["objects"] = objects
    return model, unread


def _part(value: Any, extensions: Sequence[str]) -> dict[str, Any]:
    """An image's or label's {"ext", "info"}, if it is a file kind the datastore keeps."""
    if value["ext"] not in extensions or not isinstance(value.get("info", {}), dict):
        raise TypeError(f"extension {value['ext']!r} or info not kept here")
    return {"ext": value["ext"], "info": dict(value.get("info", {}))}


def merged_index(model: dict[str, Any], unread: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the JSON to store: ``model`` plus the unread entries whose image it still has, those entries)."""
    stored, kept = copy.deepcopy(model), {}
    for image_id, entry in unread.items():
        if "entry" in entry and image_id not in stored["objects"]:
            stored["objects"][image_id], kept[image_id] = entry["entry"], entry
        elif "labels" in entry and image_id in stored["objects"]:
            labels = stored["objects"][image_id]["labels"]
            kept[image_id] = {"labels": {t: v for t, v in entry["labels"].items() if t not in labels}}
            labels.update(kept[image_id]["labels"])
    return stored, kept
