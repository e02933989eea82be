"""One replica's SAM and the adapters resident on it: slices of many adapters in one batch.

Plain Python (no Ray), so that what a replica computes is tested without a server. A batch's
slices are grouped by adapter; with ``batching="mixed"`` every group that shares the encoder
(image size and LoRA blocks) goes through one encoder pass (:func:`samed_adapter.resident.mixed_forward`),
with ``"per-adapter"`` each adapter runs its own forward after a hot swap, as Ray Serve's
model multiplexing does (the benchmark's baseline). A batch of one adapter is a plain forward
of the active adapter: the same arithmetic as a local ``segment`` run.

A replica takes one call per request, its whole volume (:class:`VolumeRequest`), and its
:class:`SliceQueue` packs the slices of every request in flight into batches: a batch that one
request cannot fill takes the next requests' slices, whatever their adapters.

Adapters are resident by (name, fingerprint): a request pinned to a version when it started is
answered by that version while it stays resident, though the file behind the name was replaced
meanwhile; once it is gone it is read again from the recorded version with that fingerprint
(:meth:`AdapterCatalog.find`: another version serves since the request started), and the request
fails with 409 only when no file holds it anymore; its slices never come from two versions.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from ..adapter_file.adapter import Adapter, AdapterError
from ..learning.errors import VersionError
from ..segment.pipeline import SamSource
from .catalog import AdapterCatalog, UnknownAdapterError
from .errors import NotFoundError, OverloadedError, ServeError, UnprocessableError

BATCHING = ("mixed", "per-adapter")


class AdapterChangedError(ServeError):
    """The adapter file was replaced or removed while a request pinned to its former version was
    being answered, and that version is not resident here (409: send the request again)."""

    status = 409


@dataclass
class SliceRequest:
    """One slice to predict: (S, S) float32 in [0, 1] at ``adapter``'s image size.

    ``fingerprint`` is the adapter version its request was pinned to when it started
    (:meth:`AdapterCatalog.pin`); None takes the version the catalog sees in the file now.
    ``score`` asks for the slice's :func:`~samed_adapter.datastore.activelearning.uncertainty_sums`.
    """

    adapter: str
    image: np.ndarray
    probabilities: bool = False
    fingerprint: Optional[str] = None
    score: bool = False

    @property
    def key(self) -> tuple[str, Optional[str]]:
        return self.adapter, self.fingerprint


@dataclass
class VolumeRequest:
    """One request's slices, sent to a replica in one call: (n, S, S) float32 in [0, 1], every
    one through version ``fingerprint`` of ``adapter``.

    One Ray call per request, not per slice or chunk: a call through a Ray Serve handle costs more
    than a small model's forward pass (benchmarks/RESULTS.md, issue 30), so the replica packs the
    slices of every request in flight into batches itself (:class:`SliceQueue`). The array
    travels through Ray's object store and is read there without a copy.
    """

    adapter: str
    images: np.ndarray
    probabilities: bool = False
    fingerprint: Optional[str] = None
    #: the front had no other request in progress when it sent this one: its file work does not
    #: compete with the model for the cores meanwhile
    alone: bool = False
    #: answer the volume's uncertainty score (a datastore image's least_sure score), computed here:
    #: the softmax it comes from is (n, K+1, S, S) float32, 420 MB for 100 ViT-B slices at 512 with
    #: K = 3, which would otherwise cross the object store for one number
    score: bool = False

    @property
    def key(self) -> tuple[str, Optional[str]]:
        return self.adapter, self.fingerprint


@dataclass
class VolumeResult:
    """A request's answer: (n, S, S) labels, the (n, K+1, S, S) float32 softmax when asked, the
    batches its slices ran in (for the metrics: each batch once), and where its time went on the
    replica in seconds ("queued": arrival to its first batch, "model": its batches' forward
    passes, "replica": arrival to answer); ``score``: the volume's uncertainty when asked."""

    labels: np.ndarray
    probs: Optional[np.ndarray]
    batches: list[dict[str, Any]]
    times: dict[str, float] = field(default_factory=dict)
    score: Optional[float] = None


class _Ticket:
    """A request in a :class:`SliceQueue`: its slices taken so far and their results."""

    def __init__(self, request: VolumeRequest, future: Any) -> None:
        self.request, self.future = request, future
        self.taken = 0
        self.results: list[Optional[SliceResult]] = [None] * len(request.images)
        self.got = 0
        self.batches: dict[int, dict[str, Any]] = {}
        self.arrived = time.perf_counter()
        self.first: Optional[float] = None
        self.model_s = 0.0

    @property
    def left(self) -> int:
        return len(self.request.images) - self.taken

    def answer(self) -> VolumeResult:
        labels = np.stack([r.labels for r in self.results])  # type: ignore[union-attr]
        probs = np.stack([r.probs for r in self.results]) if self.request.probabilities else None  # type: ignore
        score = None
        if self.request.score:
            from ..datastore.activelearning import uncertainty_of

            score = uncertainty_of(np.sum([r.score_sums for r in self.results], axis=0))  # type: ignore[union-attr]
        now = time.perf_counter()
        return VolumeResult(labels, probs, list(self.batches.values()),
                            {"queued": (self.first or now) - self.arrived, "model": self.model_s,
                             "replica": now - self.arrived}, score)


class SliceQueue:
    """The slices of every request in flight on one replica, packed into batches of at most
    ``max_batch`` slices.

    ``"mixed"``: the oldest slices first, whatever their adapter, so a batch that one request
    cannot fill takes the next requests' slices (several adapters in one encoder pass).
    ``"per-adapter"``: the oldest request's adapter version, with its slices of every request in
    flight, as Ray Serve's model multiplexing batches (the benchmark's baseline).

    Plain Python, on one thread (the replica's event loop); a request's ``future`` (asyncio's or
    concurrent.futures') gets its :class:`VolumeResult`, or the first :class:`ServeError` of its
    slices, and a request whose future is done (cancelled: its caller went away) is skipped.
    """

    def __init__(self, max_batch: int, batching: str = "mixed") -> None:
        if batching not in BATCHING:
            raise ValueError(f"--batching must be {' or '.join(BATCHING)}, got {batching!r}")
        self.max_batch = max_batch
        self.batching = batching
        self._waiting: list[_Ticket] = []  # requests with slices not yet taken, oldest first

    def put(self, request: VolumeRequest, future: Any) -> None:
        if len(request.images) == 0:
            future.set_result(VolumeResult(np.zeros((0, 0, 0), np.uint8), None, []))
            return
        self._waiting.append(_Ticket(request, future))

    def waiting(self) -> int:
        """Slices not yet taken into a batch."""
        return sum(t.left for t in self._waiting if not t.future.done())

    def alone(self, batch: list[tuple[_Ticket, int]]) -> bool:
        """Whether every request of ``batch``, and every one still waiting, came while its front had
        no other request in progress (:attr:`VolumeRequest.alone`)."""
        return all(t.request.alone for t, _ in batch) and all(t.request.alone for t in self._waiting
                                                                  if not t.future.done())

    def take(self) -> list[tuple[_Ticket, int]]:
        """The next batch: (request, slice index) pairs, at most ``max_batch``; [] when none wait."""
        self._waiting = [t for t in self._waiting if not t.future.done()]
        if not self._waiting:
            return []
        key = self._waiting[0].request.key if self.batching == "per-adapter" else None
        batch: list[tuple[_Ticket, int]] = []
        now = time.perf_counter()
        for ticket in self._waiting:
            if key is not None and ticket.request.key != key:
                continue
            count = min(self.max_batch - len(batch), ticket.left)
            batch += [(ticket, i) for i in range(ticket.taken, ticket.taken + count)]
            ticket.taken += count
            ticket.first = ticket.first or now
            if len(batch) == self.max_batch:
                break
        self._waiting = [t for t in self._waiting if t.left]
        return batch

    @staticmethod
    def items(batch: list[tuple[_Ticket, int]]) -> list[SliceRequest]:
        """The batch's slices for :meth:`ServingModel.predict` (views of the requests' arrays, not copies)."""
        return [SliceRequest(t.request.adapter, t.request.images[i], t.request.probabilities, t.request.fingerprint,
                             t.request.score) for t, i in batch]

    @staticmethod
    def deliver(batch: list[tuple[_Ticket, int]], results: list[Union[SliceResult, ServeError]],
                seconds: float = 0.0) -> None:
        """Hand each slice's result to its request; answer the requests now complete, or failed."""
        for ticket in dict.fromkeys(t for t, _ in batch):
            ticket.model_s += seconds
        for (ticket, i), result in zip(batch, results):
            if ticket.future.done():
                continue
            if isinstance(result, ServeError):  # the request fails with its first error; its other slices are dropped
                ticket.future.set_result(result)
                continue
            ticket.results[i] = result
            ticket.got += 1
            ticket.batches.setdefault(int(result.batch.get("batch", 0)), result.batch)
            if ticket.got == len(ticket.results):
                ticket.future.set_result(ticket.answer())

    @staticmethod
    def fail(batch: list[tuple[_Ticket, int]], error: BaseException) -> None:
        """Every request of a batch that failed as a whole gets ``error``."""
        for ticket in dict.fromkeys(t for t, _ in batch):
            if not ticket.future.done():
                ticket.future.set_exception(error)


@dataclass
class SliceResult:
    """(S, S) labels (uint8, int32 for 255 classes or more), the (K+1, S, S) float32 softmax
    when asked, what the batch it ran in was (for the metrics), and the slice's
    ``uncertainty_sums`` when asked."""

    labels: np.ndarray
    probs: Optional[np.ndarray]
    batch: dict[str, Any] = field(default_factory=dict)
    score_sums: Optional[tuple[float, int, float, int]] = None


class ServingModel:
    """A stock SAM patched on first use, and at most ``max_resident`` adapter versions kept on it.

    An adapter version, (name, fingerprint), is loaded from the catalog's file on the first slice
    that asks for it, under a slot name of its own on the SAM, so that a replaced file's former
    version still answers the requests pinned to it; the least recently used version goes when
    there are too many.
    """

    def __init__(self, source: SamSource, catalog: AdapterCatalog, *, max_resident: int = 8,
                 device: Union[str, torch.device] = "cpu", batching: str = "mixed",
                 allow_base_mismatch: bool = False) -> None:
        if batching not in BATCHING:
            raise ValueError(f"--batching must be {' or '.join(BATCHING)}, got {batching!r}")
        if max_resident < 1:
            raise ValueError(f"--max-resident must be at least 1, got {max_resident}")
        self.catalog = catalog
        self.device = torch.device(device)
        self.sam = source.build().to(self.device).eval()
        self.model: Any = None  # the SAMed view, once the first adapter is patched on
        self.max_resident = max_resident
        self.batching = batching
        self.allow_base_mismatch = allow_base_mismatch
        #: (name, fingerprint) -> its slot on the SAM, least recently used first
        self.resident: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.loads = 0
        self.batches = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ adapters

    def _current(self, name: str) -> str:
        """The fingerprint of the version in ``name``'s file now (for slices not pinned to one)."""
        try:
            return self.catalog.describe(name)["fingerprint"]
        except UnknownAdapterError as err:
            raise NotFoundError(str(err)) from None
        except OSError as err:
            raise NotFoundError(f"adapter {name!r}: its file cannot be read ({err.strerror or err})") from None
        except AdapterError as err:
            raise UnprocessableError(f"adapter {name!r} cannot run on this server's SAM: {err}") from None
        except VersionError as err:  # a recorded version's file was changed, or the versions' JSON is damaged
            raise UnprocessableError(f"adapter {name!r}: {err}") from None

    def _read(self, name: str, fingerprint: str) -> Adapter:
        """Version ``fingerprint`` of adapter ``name``: from the file ``name`` names now, else from the
        recorded version with that fingerprint (another version serves since the request was
        pinned); AdapterChangedError when no file holds it anymore."""
        try:
            adapter = self._load_file(name, self.catalog.path(name))
        except UnknownAdapterError as err:
            adapter, removed = None, err
        except VersionError as err:  # the versions' JSON is damaged: the store's own words say what to do
            raise UnprocessableError(f"adapter {name!r}: {err}") from None
        else:
            if adapter.fingerprint == fingerprint:
                return adapter
        kept = self.catalog.find(name, fingerprint)
        if kept is not None:
            older = self._load_file(name, kept)
            if older.fingerprint == fingerprint:
                return older
        if adapter is None:
            raise AdapterChangedError(f"adapter {name!r} was removed from the server while this request was being "
                                      f"answered; send the request again ({removed})") from None
        raise AdapterChangedError(
            f"adapter {name!r} was replaced on the server while this request was being answered (it started with "
            f"{fingerprint[:19]}..., the file now holds {adapter.fingerprint[:19]}...); no answer mixes two "
            "versions: send the request again")

    @staticmethod
    def _load_file(name: str, path: "os.PathLike[str]") -> Adapter:
        """The adapter in ``path`` (served as ``name``), its failures as the HTTP errors they are."""
        try:
            return Adapter.load(path)
        except OSError as err:
            raise NotFoundError(f"adapter {name!r}: its file cannot be read ({err.strerror or err})") from None
        except AdapterError as err:
            raise UnprocessableError(f"adapter {name!r} cannot run on this server's SAM: {err}") from None

    def _load(self, name: str, fingerprint: Optional[str]) -> tuple[str, str]:
        """Make version ``fingerprint`` of ``name`` resident (None: the file's version now); its key."""
        key = (name, fingerprint if fingerprint is not None else self._current(name))
        key = (name.partition("@")[0], key[1])  # NAME@N and NAME are one resident when they are one version
        if key in self.resident:
            self.resident.move_to_end(key)
            return key
        adapter = self._read(*key)
        slot = f"{name}@{key[1]}"
        try:
            if self.model is None:
                from ..patching import patch

                self.model = patch(self.sam, adapter, adapter_name=slot, allow_base_mismatch=self.allow_base_mismatch)
                self.model.eval()
            else:
                self.model.load_adapter(adapter, slot, allow_base_mismatch=self.allow_base_mismatch)
        except (AdapterError, OSError) as err:
            raise UnprocessableError(f"adapter {name!r} cannot run on this server's SAM: {err}") from None
        self.resident[key] = slot
        self.loads += 1
        return key

    def _evict(self, keep: set[tuple[str, str]]) -> None:
        for key in list(self.resident):
            if len(self.resident) <= self.max_resident:
                return
            if key in keep:
                continue
            if self.resident[key] == self.model.active_adapter:
                if not keep:
                    continue
                self.model.set_adapter(self.resident[next(iter(keep))])  # this batch's forward swaps to it anyway
            self.model.delete_adapter(self.resident.pop(key))

    def ensure(self, keys: list[tuple[str, Optional[str]]]) -> tuple[dict[tuple[str, Optional[str]], str],
                                                                      dict[tuple[str, Optional[str]], ServeError]]:
        """Make the versions ``keys`` ask for resident: the slot of each one that is, the error of each one that cannot be."""
        slots: dict[tuple[str, Optional[str]], str] = {}
        errors: dict[tuple[str, Optional[str]], ServeError] = {}
        for key in keys:
            try:
                slots[key] = self.resident[self._load(*key)]
            except ServeError as err:
                errors[key] = err
        if self.model is not None:
            self._evict({k for k in self.resident if self.resident[k] in slots.values()})
        return slots, errors

    def resident_versions(self) -> list[list[str]]:
        """``[name, fingerprint]`` of each resident version (for the metrics and ``GET /v1/adapters``)."""
        return [list(key) for key in self.resident]

    # ------------------------------------------------------------------ prediction

    def _groups(self, names: list[str]) -> list[list[str]]:
        """Resident slots that can share one forward pass."""
        if self.batching == "per-adapter":
            return [[n] for n in names]
        from ..surgery.structure import require_stock_state

        adapters = require_stock_state(self.sam).adapters
        groups: dict[tuple, list[str]] = {}
        for name in names:
            config = adapters[name].config
            groups.setdefault((config.image_size, tuple(config.lora_blocks or ())), []).append(name)
        return list(groups.values())

    @torch.no_grad()  # not inference_mode: a swap writes into the SAM's parameters, which must stay normal tensors
    def _forward(self, names: list[str], images: torch.Tensor, per_image: list[str]
                 ) -> Union[torch.Tensor, list[torch.Tensor]]:
        """(n, 3, S, S) -> (n, K+1, S, S) logits, or one (K_b+1, S, S) tensor per image where K differs."""
        if len(names) == 1:
            if self.model.active_adapter != names[0]:
                self.model.set_adapter(names[0])
            return self.model(images)["masks"]
        if self.model.active_adapter not in names:  # the live adapter sets the shared encoder structure
            self.model.set_adapter(names[0])
        return self.model(images, adapter_names=per_image)["masks"]

    def predict(self, items: list[SliceRequest]) -> list[Union[SliceResult, ServeError]]:
        """Predict every slice; a slice whose adapter cannot run, or whose logits are not finite,
        gets its error and the others their results."""
        with self._lock:
            return self._predict(items)

    def _predict(self, items: list[SliceRequest]) -> list[Union[SliceResult, ServeError]]:
        out: list[Union[SliceResult, ServeError, None]] = [None] * len(items)
        slots, errors = self.ensure(list(dict.fromkeys(item.key for item in items)))
        ready = list(dict.fromkeys(slots.values()))
        groups = self._groups(ready) if ready else []
        self.batches += 1
        info = {"size": len(items), "adapters": len(ready), "forwards": len(groups), "batch": self.batches}
        for group in groups:
            rows = [i for i, item in enumerate(items) if slots.get(item.key) in group]
            try:
                images = torch.from_numpy(np.stack([items[i].image for i in rows]).astype(np.float32, copy=False))
                param = next(self.sam.image_encoder.parameters())
                x = images[:, None].to(param.device, param.dtype).expand(-1, 3, -1, -1)
                logits = self._forward(group, x, [slots[items[i].key] for i in rows])
            except torch.cuda.OutOfMemoryError:
                for i in rows:
                    out[i] = OverloadedError("out of GPU memory on this replica; retry, or start the server with a "
                                             "smaller --max-batch-size")
                continue
            except (RuntimeError, ValueError) as err:
                for i in rows:
                    out[i] = UnprocessableError(f"adapter {items[i].adapter!r}: {err}")
                continue
            for i, result in zip(rows, self._results([items[i] for i in rows], logits, info)):
                out[i] = result
        for i, item in enumerate(items):
            if item.key in errors:
                out[i] = errors[item.key]
        return out  # type: ignore[return-value]

    def _results(self, items: list[SliceRequest], logits: Union[torch.Tensor, list[torch.Tensor]],
                 info: dict[str, Any]) -> list[Union[SliceResult, ServeError]]:
        """As :func:`samed_adapter.inference.stages.predict` does for each image; a batch's labels in
        one pass where its adapters share K (slice by slice, the checks and the argmax cost as much
        as a small model's forward)."""
        if isinstance(logits, torch.Tensor):
            return self._batch_results(items, logits, info)
        return [self._batch_results([item], logit[None], info)[0] for item, logit in zip(items, logits)]

    @staticmethod
    def _batch_results(items: list[SliceRequest], logits: torch.Tensor, info: dict[str, Any]
                       ) -> list[Union[SliceResult, ServeError]]:
        """(b, K+1, S, S) logits of the b ``items`` -> their results."""
        from ..datastore.activelearning import uncertainty_sums
        from ..inference.stages import to_labels

        low, high = torch.aminmax(logits.flatten(1), dim=1)  # NaN and infinities show in one or the other
        finite = (torch.isfinite(low) & torch.isfinite(high)).tolist()
        labels, probs = to_labels(logits, any(item.probabilities or item.score for item in items))
        out: list[Union[SliceResult, ServeError]] = []
        for j, item in enumerate(items):
            if not finite[j]:
                out.append(UnprocessableError(
                    f"adapter {item.adapter!r} gives NaN or infinite logits on this image, so no labels are made "
                    "from them: its weights (or the SAM's) overflow, or its pixel_std is near zero"))
                continue
            sums = uncertainty_sums(probs[j].numpy()) if item.score else None
            out.append(SliceResult(labels[j].numpy(), probs[j].numpy() if item.probabilities else None, info, sums))
        return out
