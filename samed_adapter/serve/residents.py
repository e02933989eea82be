"""One replica's SAM and the adapters resident on it: slices of many adapters in one batch.

Plain Python (no Ray), so that what a replica computes is tested without a server. A batch's
slices are grouped by adapter; with ``batching="mixed"`` every group that shares the encoder
(image size and LoRA blocks) goes through one encoder pass (:func:`samed_adapter.resident.mixed_forward`),
with ``"per-adapter"`` each adapter runs its own forward after a hot swap, as Ray Serve's
model multiplexing does (the benchmark's baseline). A batch of one adapter is a plain forward
of the active adapter: the same arithmetic as a local ``segment`` run.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from ..adapter_file.adapter import Adapter, AdapterError
from ..segment.pipeline import SamSource
from .catalog import AdapterCatalog, Stamp, UnknownAdapterError
from .errors import NotFoundError, OverloadedError, ServeError, UnprocessableError

BATCHING = ("mixed", "per-adapter")


@dataclass
class SliceRequest:
    """One slice to predict: (S, S) float32 in [0, 1] at ``adapter``'s image size."""

    adapter: str
    image: np.ndarray
    probabilities: bool = False


@dataclass
class SliceChunk:
    """Consecutive slices of one request, sent to a replica in one call: (n, S, S) float32.

    One call per slice costs more in Ray than a small model's forward pass (measured: 16
    slices took 160 ms as 16 calls, 32 ms in the model), so slices travel in chunks, and
    ``@serve.batch`` counts slices (:func:`slices_in`), not calls, against --max-batch-size.
    """

    adapter: str
    images: np.ndarray
    probabilities: bool = False

    def requests(self) -> list[SliceRequest]:
        return [SliceRequest(self.adapter, image, self.probabilities) for image in self.images]


def slices_in(chunks: list[SliceChunk]) -> int:
    """A batch's size in slices (Ray Serve's ``batch_size_fn``)."""
    return sum(len(chunk.images) for chunk in chunks)


def chunk_size(max_batch_size: int) -> int:
    """Slices per call: a quarter of a batch, so that a batch holds slices of about four requests."""
    return max(1, max_batch_size // 4)


@dataclass
class SliceResult:
    """(S, S) labels (uint8, int32 for 255 classes or more), the (K+1, S, S) float32 softmax
    when asked, and what the batch it ran in was (for the metrics)."""

    labels: np.ndarray
    probs: Optional[np.ndarray]
    batch: dict[str, Any] = field(default_factory=dict)


class ServingModel:
    """A stock SAM patched on first use, and at most ``max_resident`` adapters kept on it.

    An adapter is loaded from its file (the catalog's) on the first slice that asks for it, and
    again when its file changed; the least recently used one goes when there are too many.
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
        self.resident: OrderedDict[str, Stamp] = OrderedDict()  # least recently used first
        self.loads = 0
        self.batches = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ adapters

    def _load(self, name: str) -> None:
        try:
            path = self.catalog.path(name)
            stamp = Stamp.of(path)
        except UnknownAdapterError as err:
            raise NotFoundError(str(err)) from None
        except OSError as err:
            raise NotFoundError(f"adapter {name!r}: its file cannot be read ({err.strerror or err})") from None
        if self.resident.get(name) == stamp:
            self.resident.move_to_end(name)
            return
        try:
            adapter = Adapter.load(path)
            if self.model is None:
                from ..patching import patch

                self.model = patch(self.sam, adapter, adapter_name=name, allow_base_mismatch=self.allow_base_mismatch)
                self.model.eval()
            else:
                self.model.load_adapter(adapter, name, allow_base_mismatch=self.allow_base_mismatch)
                if self.model.active_adapter == name:  # its file changed: the live values too
                    self.model.set_adapter(name)
        except (AdapterError, OSError) as err:
            raise UnprocessableError(f"adapter {name!r} cannot run on this server's SAM: {err}") from None
        self.resident[name] = stamp
        self.resident.move_to_end(name)
        self.loads += 1

    def _evict(self, keep: set[str]) -> None:
        for name in list(self.resident):
            if len(self.resident) <= self.max_resident:
                return
            if name in keep or name == self.model.active_adapter:
                continue
            self.model.delete_adapter(name)
            del self.resident[name]

    def ensure(self, names: list[str]) -> dict[str, ServeError]:
        """Make ``names`` resident; returns the error of each one that cannot be."""
        errors: dict[str, ServeError] = {}
        for name in names:
            try:
                self._load(name)
            except ServeError as err:
                errors[name] = err
        if self.model is not None:
            self._evict(set(names))
        return errors

    # ------------------------------------------------------------------ prediction

    def _groups(self, names: list[str]) -> list[list[str]]:
        """Adapters that can share one forward pass."""
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
    def _forward(self, names: list[str], images: torch.Tensor, per_image: list[str]) -> list[torch.Tensor]:
        """(n, 3, S, S) -> one (K_b+1, S, S) logit tensor per image."""
        if len(names) == 1:
            if self.model.active_adapter != names[0]:
                self.model.set_adapter(names[0])
            return list(self.model(images)["masks"])
        if self.model.active_adapter not in names:  # the live adapter sets the shared encoder structure
            self.model.set_adapter(names[0])
        masks = self.model(images, adapter_names=per_image)["masks"]
        return list(masks)

    def predict_chunks(self, chunks: list[SliceChunk]) -> list[list[Union[SliceResult, ServeError]]]:
        """:meth:`predict` for whole chunks: one list of per-slice results per chunk."""
        flat = self.predict([item for chunk in chunks for item in chunk.requests()])
        out, at = [], 0
        for chunk in chunks:
            out.append(flat[at : at + len(chunk.images)])
            at += len(chunk.images)
        return out

    def predict(self, items: list[SliceRequest]) -> list[Union[SliceResult, ServeError]]:
        """Predict every slice; a slice whose adapter cannot run, or whose logits are not finite,
        gets its error and the others their results."""
        with self._lock:
            return self._predict(items)

    def _predict(self, items: list[SliceRequest]) -> list[Union[SliceResult, ServeError]]:
        out: list[Union[SliceResult, ServeError, None]] = [None] * len(items)
        names = list(dict.fromkeys(item.adapter for item in items))
        errors = self.ensure(names)
        ready = [n for n in names if n not in errors]
        groups = self._groups(ready) if ready else []
        self.batches += 1
        info = {"size": len(items), "adapters": len(names), "forwards": len(groups), "batch": self.batches}
        for group in groups:
            rows = [i for i, item in enumerate(items) if item.adapter in group]
            try:
                images = torch.from_numpy(np.stack([items[i].image for i in rows]).astype(np.float32, copy=False))
                param = next(self.sam.image_encoder.parameters())
                x = images[:, None].to(param.device, param.dtype).expand(-1, 3, -1, -1)
                logits = self._forward(group, x, [items[i].adapter for i in rows])
            except torch.cuda.OutOfMemoryError:
                for i in rows:
                    out[i] = OverloadedError("out of GPU memory on this replica; retry, or start the server with a "
                                             "smaller --max-batch-size")
                continue
            except (RuntimeError, ValueError) as err:
                for i in rows:
                    out[i] = UnprocessableError(f"adapter {items[i].adapter!r}: {err}")
                continue
            for i, logit in zip(rows, logits):
                out[i] = self._result(items[i], logit, info)
        for i, item in enumerate(items):
            if item.adapter in errors:
                out[i] = errors[item.adapter]
        return out  # type: ignore[return-value]

    def _result(self, item: SliceRequest, logits: torch.Tensor, info: dict[str, Any]
                ) -> Union[SliceResult, ServeError]:
        """As :func:`samed_adapter.inference.stages.predict` does for one image."""
        from ..inference.stages import to_labels

        if not bool(torch.isfinite(logits).all()):
            return UnprocessableError(
                f"adapter {item.adapter!r} gives NaN or infinite logits on this image, so no labels are made from "
                "them: its weights (or the SAM's) overflow, or its pixel_std is near zero")
        labels, probs = to_labels(logits[None], item.probabilities)
        return SliceResult(labels[0].numpy(), None if probs is None else probs[0].numpy(), info)
