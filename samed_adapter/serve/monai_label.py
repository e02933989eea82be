"""MONAI Label's REST API, the part a segmentation model needs, so that 3D Slicer's MONAI Label
module and OHIF connect: ``GET /info/``, ``POST /infer/{model}`` with the image uploaded, and
``/auth/`` for servers that need a token.

Shapes follow MONAI Label 0.8's server (``monailabel/endpoints/infer.py``,
``MONAILabelApp.info``) and its client (``monailabel/client/client.py``), which parses the
default answer as multipart: a ``params`` JSON part and the label image as a file part.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Optional

from ..version import __version__


def model_info(entry: dict[str, Any]) -> dict[str, Any]:
    """One adapter as a MONAI Label model (``labels``: name -> label value).

    A plain adapter is a "segmentation" model. A click-trained one (``config.clicks``) is a
    "deepedit" model with its labels and "background": 0, the type 3D Slicer's module
    (``plugins/slicer/MONAILabel/MONAILabel.py``) offers its point tools for, per segment
    ("landmarks"), sending every label's points at once and reading back the whole label map as
    a segmentation model's; the background segment's points are its negative clicks. Dimension
    3: Slicer sends the points of every slice and takes the whole volume back.
    """
    labels = {name: i for i, name in enumerate(entry["class_names"], start=1)}
    clicks = bool(entry.get("config", {}).get("clicks"))
    kind = "click-trained, automatic then refined from points" if clicks else "automatic"
    return {
        "type": "deepedit" if clicks else "segmentation",
        "labels": {**labels, "background": 0} if clicks else labels,
        "dimension": 3,
        "description": f"SAMed adapter {entry['name']} ({entry['backbone']}, {entry['num_classes']} classes, {kind})",
        "config": {},
    }


def app_info(entries: list[dict[str, Any]], datastore: Optional[dict[str, Any]] = None,
             strategies: Optional[dict[str, Any]] = None, trainers: Optional[dict[str, Any]] = None,
             train_stats: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``GET /info/``: every adapter as a model; the app's labels are all of theirs, in order.

    ``datastore`` (its ``status()``) and ``strategies`` ({name: {"description", "config"}}) as
    MONAI Label's app gives them, on a server with a datastore: 3D Slicer fills its strategy list
    (its *Next Sample* button) and progress bar from them; ``trainers`` ({name: {"description",
    "config"}}) show its Train button, and ``train_stats`` ({name: {"epoch", "total_epochs",
    "best_metric", ...}}) its training progress."""
    models = {entry["name"]: model_info(entry) for entry in entries}
    labels: list[str] = []
    for model in models.values():
        labels += [name for name in model["labels"] if name not in labels]
    return {
        "name": "samed-adapter",
        "description": "SAMed adapters on one Segment Anything Model (samed-adapter serve)",
        "version": __version__,
        "labels": labels,
        "models": models,
        "trainers": trainers or {},
        "strategies": strategies or {},
        "scoring": {},
        "train_stats": train_stats or {},
        "datastore": datastore or {"total": 0, "completed": 0, "label_tags": {}, "train": 0},
    }


def answer_name(name: str) -> str:
    """The file name an answer carries: the output's own name with a random part before its
    suffixes (``mni.nii.gz`` -> ``mni.3f9c0a1b.nii.gz``).

    MONAI Label's client saves an answer as ``tmpdir/<that name>``, and 3D Slicer shares one client
    (and one tmpdir) across requests: with a fixed name, two answers in flight overwrite each other's
    file while it is being read (seen as an empty NIfTI under concurrent requests). MONAI Label's own
    server names its answers after a temporary file, unique for the same reason."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}.{secrets.token_hex(4)}{dot}{suffix}"


def multipart(params: dict[str, Any], filename: str, data: bytes) -> tuple[bytes, str]:
    """``POST /infer``'s default answer: (body, content type) with a ``params`` JSON part and the
    label file as an ``image`` part, as MONAI Label's MultipartEncoder writes it."""
    boundary = secrets.token_hex(16)
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n"
            f"Content-Type: application/json\r\n\r\n{json.dumps(params)}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
