"""How a server runs: what it serves, where it listens, how it batches and what it accepts."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Optional

from ..segment.pipeline import SamSource
from .residents import BATCHING

#: the environment variable a token may come from, so that it stays out of `ps` and shell history.
TOKEN_VARIABLE = "SAMED_SERVE_TOKEN"
#: the same for the admin token (training, serving another version, deleting datastore images)
ADMIN_TOKEN_VARIABLE = "SAMED_SERVE_ADMIN_TOKEN"


@dataclass
class ServeSettings:
    """Everything `samed-adapter serve` takes (see its --help for each field's flag).

    Attributes:
        sam: how each replica gets its stock SAM (a checkpoint, or a random backbone for demos).
        adapters, adapter_files, hub_adapters: the catalog (:class:`~samed_adapter.serve.catalog.AdapterCatalog`).
        host, port: where HTTP is served; any host but a loopback one needs ``token``.
        token: the bearer token every request but ``/healthz`` must carry (None: no check).
        replicas, gpus_per_replica, device: the model replicas (each one SAM).
        max_resident: adapters kept on each replica's SAM.
        max_batch_size, batch_wait_ms: slices per forward pass, and how long a batch waits to fill.
        batching: "mixed" (adapters share a forward pass) or "per-adapter" (the baseline).
        max_queue: segment requests in progress at once; more are answered 503.
        max_upload_mb: the largest upload; max_voxels: the largest scan (as `segment --max-voxels`).
        body_timeout_s: seconds a request's body may take to arrive; later it is answered 408 and
            its slot freed (a client that declares a body and stalls would hold it until it closes).
        ray_address: an existing Ray cluster (None: a local Ray started by the server).
        max_sessions, session_memory: click sessions (MONAI Label's ``/session/``): images kept by
            the front, and click sessions per replica; ``session_memory`` bounds the bytes of a
            replica's kept embeddings (on its device). The least recently used go first.
        datastore: a folder of images and labels in MONAI Label's local datastore format
            (``/datastore/*``, infer by image id, ``/activelearning/*``, ``/train/*``).
        datastore_dicomweb: a PACS's DICOMweb URL as the datastore instead (MONAI Label's DICOMweb
            datastore), with local copies of its series and labels in ``datastore_cache``.
        datastore_cache: that folder (None: ``dicomweb-cache`` beside the ``versions`` folder).
        versions: where trained adapter versions are kept (``NAME@N``); None: ``<datastore>/versions``.
        admin_token: the bearer token that starting or stopping training, serving another version
            and deleting datastore images need (None: ``token``).
    """

    sam: SamSource
    adapters: list[str] = field(default_factory=list)
    adapter_files: dict[str, str] = field(default_factory=dict)
    hub_adapters: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None
    replicas: int = 1
    gpus_per_replica: float = 0.0
    device: str = "cpu"
    max_resident: int = 8
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    batching: str = "mixed"
    max_queue: int = 32
    max_upload_mb: float = 1024.0
    body_timeout_s: float = 60.0
    max_voxels: Optional[int] = None
    allow_base_mismatch: bool = False
    ray_address: Optional[str] = None
    local_files_only: bool = False
    #: where each request's private folder is made (an absolute path; None: the system's temporary folder)
    tmp_dir: Optional[str] = None
    max_sessions: int = 16
    session_memory: int = 4 * 2**30
    datastore: Optional[str] = None
    datastore_dicomweb: Optional[str] = None
    datastore_cache: Optional[str] = None
    versions: Optional[str] = None
    admin_token: Optional[str] = None

    def __post_init__(self) -> None:
        # Replicas run in Ray's worker processes, whose working folder is not the command's.
        self.adapters = [os.path.abspath(f) for f in self.adapters]
        self.adapter_files = {n: os.path.abspath(p) for n, p in self.adapter_files.items()}
        if self.sam.checkpoint is not None:
            self.sam = dataclasses.replace(self.sam, checkpoint=os.path.abspath(self.sam.checkpoint))
        if self.tmp_dir is not None:
            # Checked now: a missing folder would fail each request with a 500 instead.
            self.tmp_dir = os.path.abspath(self.tmp_dir)
            if not os.path.isdir(self.tmp_dir):
                raise ValueError(f"tmp_dir {self.tmp_dir} is not a folder: create it first, or leave tmp_dir out "
                                 "to use the system's temporary folder")
        if self.datastore is not None and self.datastore_dicomweb is not None:
            raise ValueError("give --datastore FOLDER or --datastore-dicomweb URL, not both")
        if self.datastore is not None:
            self.datastore = os.path.abspath(self.datastore)
        if self.datastore_dicomweb is not None and self.versions is None:
            raise ValueError("--datastore-dicomweb keeps no folder of its own: give --versions FOLDER for the adapter "
                             "versions that training makes")
        if self.versions is None and self.datastore is not None:
            self.versions = os.path.join(self.datastore, "versions")
        if self.versions is not None:
            self.versions = os.path.abspath(self.versions)
        if self.datastore_cache is None and self.datastore_dicomweb is not None:
            self.datastore_cache = os.path.join(os.path.dirname(self.versions.rstrip(os.sep)) or ".", "dicomweb-cache")
        if self.datastore_cache is not None:
            self.datastore_cache = os.path.abspath(self.datastore_cache)
        if self.token is None:
            self.token = os.environ.get(TOKEN_VARIABLE) or None
        if self.admin_token is None:
            self.admin_token = os.environ.get(ADMIN_TOKEN_VARIABLE) or None
        if not _is_loopback(self.host) and not self.token:
            raise ValueError(f"--host {self.host} lets other machines call this server, so it needs a token: pass "
                             f"--token T or set {TOKEN_VARIABLE}, and clients send 'Authorization: Bearer <token>'")
        checks = {"--port": (self.port, 1, 65535), "--replicas": (self.replicas, 1, None),
                  "--max-resident": (self.max_resident, 1, None), "--max-batch-size": (self.max_batch_size, 1, None),
                  "--max-queue": (self.max_queue, 1, None), "--max-sessions": (self.max_sessions, 1, None),
                  "--session-memory": (self.session_memory, 1, None)}
        for flag, (value, low, high) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
                span = f"{low}..{high}" if high is not None else f"at least {low}"
                raise ValueError(f"{flag} must be an integer {span}, got {value!r}")
        if self.gpus_per_replica < 0 or self.batch_wait_ms < 0 or self.max_upload_mb <= 0 or not self.body_timeout_s > 0:
            raise ValueError("--gpus-per-replica and --batch-wait-ms must be at least 0, --max-upload-mb and "
                             "--body-timeout above 0")
        if self.batching not in BATCHING:
            raise ValueError(f"--batching must be {' or '.join(BATCHING)}, got {self.batching!r}")
        if self.gpus_per_replica > 0 and self.device == "cpu":
            self.device = "cuda"  # a GPU reserved per replica is a GPU to run on

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
