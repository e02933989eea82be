"""The model replicas: each holds one SAM and its resident adapters, takes one call per request
(its whole volume of slices) and packs the slices of every request in flight into batches
itself (:class:`~.residents.SliceQueue`): adapters mixed across requests, no wait that a full
batch does not need."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

import torch
from ray import serve

from .catalog import catalog_for
from .errors import ServeError
from .residents import ServingModel, SliceQueue, SliceResult, VolumeRequest, VolumeResult
from .sessions import ClickRequest, ClickResult, KeptSessions, SessionMissing, answer_clicks
from .settings import ServeSettings

#: session ids a replica reports to Ray Serve's router; what it keeps is bounded by --max-sessions
#: and --session-memory (:class:`~.sessions.KeptSessions`), this only names where they were made
ROUTED_SESSIONS = 4096


def cpu_threads(cpus: int, replicas: int, *, alone: bool = False) -> int:
    """Torch threads for each CPU replica: the cores shared by the replicas, but one while the
    front has other requests in progress (``alone``: it has none).

    Ray gives an actor one thread per CPU it reserved, and the model would use them all; but the
    front reads, prepares and writes every scan and Ray's HTTP proxy carries it, on these cores
    too, and OpenMP threads that lose their core to them spin: on 2 cores a replica of 2 threads
    used 160 ms of CPU per 16-slice request where 1 thread used 72, and served 1.5x fewer slices/s
    (benchmarks/RESULTS.md, issue 30). A request alone has the cores to itself.
    """
    return max(1, (cpus if alone else cpus - 1) // replicas)


@serve.deployment(name="Segmenter")
class Segmenter:
    """One replica: ``await handle.remote(VolumeRequest)`` -> its VolumeResult, or the ServeError
    of its first slice that failed."""

    def __init__(self, settings: ServeSettings) -> None:
        catalog = catalog_for(settings)
        self.model = ServingModel(settings.sam, catalog, max_resident=settings.max_resident, device=settings.device,
                                  batching=settings.batching, allow_base_mismatch=settings.allow_base_mismatch)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests of the class itself)
            self.replica = "local"
        self._threads: dict[bool, int] = {}  # torch threads on a CPU replica, by "the batch's requests are alone"
        if self.model.device.type == "cpu":
            self._threads = {alone: cpu_threads(os.cpu_count() or 1, settings.replicas, alone=alone)
                             for alone in (False, True)}
            torch.set_num_threads(self._threads[False])
        self.queue = SliceQueue(settings.max_batch_size, settings.batching)
        self.wait_s = settings.batch_wait_ms / 1000
        # One thread runs the model, so the event loop keeps taking requests for the next batch meanwhile.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="samed-model")
        self._arrived: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None
        self.sessions = KeptSessions(settings.max_sessions, settings.session_memory)
        self.tmp_dir = settings.tmp_dir

    async def __call__(self, request: VolumeRequest) -> Union[VolumeResult, ServeError]:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():  # first call, on the replica's own loop
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._batches())
        future: asyncio.Future = loop.create_future()
        self.queue.put(request, future)
        self._arrived.set()  # type: ignore[union-attr]
        return await future  # cancelled when the caller goes away: its slices left in the queue are dropped

    async def clicks(self, request: ClickRequest) -> Union[ClickResult, SessionMissing, ServeError]:
        """A click request (``handle.options(method_name="clicks")``), on the model thread between
        batches. A session's requests come with its id as Ray Serve's multiplexed model id: the
        replica that holds or builds it reports it, and the router sends its next requests here
        (one without it does not: the router would then split the session's requests between them)."""
        result = await asyncio.get_running_loop().run_in_executor(self._thread, self._clicks, request)
        if request.session_id and isinstance(result, ClickResult):
            await self._route(request.session_id)
        return result

    @serve.multiplexed(max_num_models_per_replica=ROUTED_SESSIONS)
    async def _route(self, session_id: str) -> str:
        """Record ``session_id`` as held here, for the router (its click sessions are in ``self.sessions``)."""
        return session_id

    def _clicks(self, request: ClickRequest) -> Union[ClickResult, SessionMissing, ServeError]:
        if self._threads and torch.get_num_threads() != self._threads[False]:
            torch.set_num_threads(self._threads[False])
        try:
            return answer_clicks(self.model, self.sessions, request, replica=self.replica, tmp_dir=self.tmp_dir)
        except ServeError as err:
            return err

    async def _batches(self) -> None:
        """Run batches while slices wait: at once when a full batch waits or the model has just run
        one (more slices would come only by waiting), else after up to ``--batch-wait-ms`` for more."""
        arrived = self._arrived
        assert arrived is not None
        loop = asyncio.get_running_loop()
        idle = True  # the model ran no batch since the queue was last empty
        while True:
            if not self.queue.waiting():
                idle = True
                arrived.clear()
                await arrived.wait()
            if idle:
                await self._fill()
            batch = self.queue.take()
            if not batch:
                continue
            idle = False
            alone = self.queue.alone(batch)
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._thread, self._predict, SliceQueue.items(batch), alone)
            except Exception as err:  # noqa: BLE001 - the batch's requests fail, the replica goes on
                SliceQueue.fail(batch, err)
                continue
            SliceQueue.deliver(batch, results, time.perf_counter() - start)

    async def _fill(self) -> None:
        """Wait up to ``--batch-wait-ms`` for a batch to fill, after the model was idle."""
        deadline = time.perf_counter() + self.wait_s
        arrived = self._arrived
        assert arrived is not None
        while self.queue.waiting() < self.queue.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _predict(self, items: list[Any], alone: bool = False) -> list[Union[SliceResult, ServeError]]:
        if self._threads and torch.get_num_threads() != self._threads[alone]:
            torch.set_num_threads(self._threads[alone])
        results = self.model.predict(items)
        info = next((r.batch for r in results if isinstance(r, SliceResult)), None)
        if info is not None:  # one dict shared by the batch's slices
            info.update(replica=self.replica, loads=self.model.loads, resident=self.model.resident_versions())
        return results
