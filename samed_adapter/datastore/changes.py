"""What a training job saw of a datastore, and which of those items changed since.

A job calls :func:`record` on the items it is about to read and :func:`check_unchanged` before
it publishes a version: a label saved again, an image replaced or removed while it trained means
the version was trained on data that no longer exists, and the version's file would name items
it did not see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from .checks import file_checksum
from .errors import DatastoreChangedError

if TYPE_CHECKING:
    from .local import FolderDatastore, Item

__all__ = ["changed_since", "check_unchanged", "record"]


def record(items: Sequence["Item"]) -> dict[str, tuple[str, str]]:
    """{image id: (image checksum, final label checksum)} of the files as they are now.

    Hash the files the job reads, when it reads them: the checksums then describe what it saw.
    """
    return {item.image_id: (file_checksum(item.image), file_checksum(item.label)) for item in items}


def changed_since(datastore: "FolderDatastore", seen: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """{image id: what changed} for the recorded items that differ now; ``{}`` when none does.

    What changed is one of ``"removed"`` (the image is gone), ``"final label removed"``,
    ``"image changed"``, ``"label changed"``.
    """
    changed: dict[str, str] = {}
    for image_id, (image_sum, label_sum) in seen.items():
        image, label = datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, "final")
        if not image:
            changed[image_id] = "removed"
        elif not label:
            changed[image_id] = "final label removed"
        elif _checksum(image) != image_sum:
            changed[image_id] = "image changed"
        elif _checksum(label) != label_sum:
            changed[image_id] = "label changed"
    return changed


def _checksum(path: str) -> str:
    try:
        return file_checksum(path)
    except FileNotFoundError:  # removed behind the JSON's back
        return ""


def check_unchanged(datastore: "FolderDatastore", seen: Mapping[str, tuple[str, str]]) -> None:
    """Raise :class:`DatastoreChangedError` when any recorded item changed (see :func:`changed_since`)."""
    changed = changed_since(datastore, seen)
    if changed:
        listed = ", ".join(f"{k} ({v})" for k, v in sorted(changed.items())[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise DatastoreChangedError(f"{datastore.root}: items changed while the job trained: {listed}{more}; the "
                                    "new version was not kept: start the job again to train on the current labels",
                                    changed)
