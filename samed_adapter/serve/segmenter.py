"""The model replicas: each holds one SAM and its resident adapters, and batches slices across
requests with Ray Serve's ``@serve.batch``."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Union

from ray import serve

from .catalog import AdapterCatalog
from .errors import ServeError
from .residents import ServingModel, SliceChunk, SliceResult, slices_in
from .settings import ServeSettings


@serve.deployment(name="Segmenter")
class Segmenter:
    """One replica: ``await handle.remote(SliceChunk)`` -> one SliceResult or ServeError per slice."""

    def __init__(self, settings: ServeSettings) -> None:
        catalog = AdapterCatalog(settings.adapters, settings.adapter_files, settings.hub_adapters,
                                 local_files_only=settings.local_files_only)
        self.model = ServingModel(settings.sam, catalog, max_resident=settings.max_resident, device=settings.device,
                                  batching=settings.batching, allow_base_mismatch=settings.allow_base_mismatch)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests of the class itself)
            self.replica = "local"
        if self.model.device.type == "cpu":  # Ray gives an actor one thread per CPU it reserved; the model uses the cores
            import os

            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.replicas))
        self.predict_batch.set_max_batch_size(settings.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        # One thread runs the model, so the event loop keeps taking slices for the next batch meanwhile.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="samed-model")

    def _predict(self, chunks: list[SliceChunk]) -> list[list[Union[SliceResult, ServeError]]]:
        results = self.model.predict_chunks(chunks)
        for result in (r for chunk in results for r in chunk):
            if isinstance(result, SliceResult):
                result.batch.update(replica=self.replica, loads=self.model.loads,
                                    resident=self.model.resident_versions())
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=slices_in)
    async def predict_batch(self, chunks: list[SliceChunk]) -> list[Any]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._predict, chunks)

    async def __call__(self, chunk: SliceChunk) -> Any:
        return await self.predict_batch(chunk)
