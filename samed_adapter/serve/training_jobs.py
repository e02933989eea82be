"""MONAI Label's training on the service: one Ray actor that runs the learning jobs, never a replica.

``samed-adapter serve --datastore FOLDER`` starts :class:`TrainingJobs` as a named Ray actor
(:func:`start_actor`, no CPU reserved: it only checks labels and waits). ``POST /train/{model}``
asks it to start a :class:`~samed_adapter.learning.job.LearningJob` for that adapter: the job's
checks run before the request is answered (an empty datastore, too few labels, a label with
classes the adapter lacks: one line, 422), then it trains on Ray Train's workers (placed by Ray
where their CPUs or GPUs are free: on this machine, or a cluster's nodes when the server joins
one) in a thread of the actor. One job per adapter at a time (409 for a second); ``GET`` reads its
state and progress, ``DELETE`` stops it (nothing is recorded). A version the job records as
serving is what the catalog's next read finds: the replicas swap to it on their next batch.

The actor answers with plain dicts, or with the :class:`~.errors.ServeError` to answer (Ray would
wrap a raised one in its own error).
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from ..dicomweb.errors import DicomWebError
from ..learning.job import JobOptions, LearningJob, LearningJobError
from .errors import BadGatewayError, BadRequestError, NotFoundError, ServeError, UnprocessableError
from .store_routes import pacs_failed

__all__ = ["ACTOR_NAMESPACE", "ConflictError", "TrainingJobs", "actor_name", "start_actor", "trainers"]

#: the Ray namespace of the actor (the front finds it by name from Serve's own namespace)
ACTOR_NAMESPACE = "samed-adapter"
#: what /info/ advertises as each trainer's config (3D Slicer shows it as the train options): the jobs' defaults
TRAINER_CONFIG = {"max_epochs": JobOptions.epochs, "holdout": JobOptions.holdout, "seed": JobOptions.seed,
                  "threshold": JobOptions.threshold, "workers": JobOptions.workers}


class ConflictError(ServeError):
    """A job for that adapter is already running (409: wait for it, or stop it first)."""

    status = 409


def actor_name(settings: Any) -> str:
    """The actor's name for a server (by port: two servers on one Ray cluster keep their own)."""
    return f"training-jobs-{settings.port}"


def start_actor(settings: Any) -> Any:
    """Start the jobs' actor for ``settings`` on the Ray this process is connected to; its handle.

    Not detached: it goes with the process that started the server (and its jobs' workers with it).
    """
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=16)(TrainingJobs)
    return actor.options(name=actor_name(settings), namespace=ACTOR_NAMESPACE).remote(settings)


def trainers(names: list[str], settings: Any) -> dict[str, Any]:
    """``/info/``'s ``trainers``: every served adapter can be trained (3D Slicer shows its Train button)."""
    config = {**TRAINER_CONFIG, "device": settings.device}
    return {name: {"description": f"a new version of adapter {name} from the datastore's final labels, served "
                                  "only if its held-out Dice is not lower", "config": dict(config)}
            for name in names}


class TrainingJobs:
    """The learning jobs of one server, by adapter name (a Ray actor's class: see :func:`start_actor`)."""

    def __init__(self, settings: Any) -> None:
        from ..learning.versions import VersionStore
        from .catalog import AdapterCatalog

        self.settings = settings
        self.versions = VersionStore(settings.versions)
        # The files as the server was given them (version 1 is adopted from these), not the serving versions.
        self.catalog = AdapterCatalog(settings.adapters, settings.adapter_files, settings.hub_adapters,
                                      local_files_only=settings.local_files_only)
        self._datastore: Any = None
        self.jobs: dict[str, Any] = {}
        self.order: list[str] = []  # adapter names, the latest job's last
        self._lock = threading.Lock()

    def _open(self) -> Any:
        if self._datastore is None:
            from ..datastore.opening import open_datastore

            s = self.settings
            self._datastore = open_datastore(s.datastore, s.datastore_dicomweb, s.datastore_cache,
                                             max_voxels=s.max_voxels)
        return self._datastore

    def start(self, name: str, params: dict[str, Any]) -> Any:
        """Check and start a job for adapter ``name``; its state, or the ServeError to answer."""
        try:
            return self._start(name, params)
        except ServeError as err:
            return err

    def _start(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        from .catalog import UnknownAdapterError

        try:
            path = self.catalog.path(name)
        except UnknownAdapterError as err:
            raise NotFoundError(str(err)) from None
        try:
            options = JobOptions.from_params(params, device=self.settings.device)
        except (LearningJobError, TypeError) as err:
            raise BadRequestError(f"train params: {err}") from None
        with self._lock:
            running = self.jobs.get(name)
            if running is not None and running.state.status == "RUNNING":
                raise ConflictError(f"a training job for adapter {name!r} is running (epoch "
                                    f"{running.state.to_dict()['epoch']} of {running.state.epochs}); wait for it "
                                    f"(GET /train/{name}) or stop it (DELETE /train/{name}) first")
            job = LearningJob(self._open(), self.versions, name, self.settings.sam, options, catalog_file=path)
            self.jobs[name] = job  # held under the lock: a second request now meets this one
            self.order = [n for n in self.order if n != name] + [name]
        try:
            job.prepare()
        except (ValueError, OSError) as err:  # the datastore's, the versions' and the job's own refusals
            line = (str(err).splitlines() or [type(err).__name__])[0]
            job.state.set(status="ERROR", phase="ERROR", error=line)
            raise UnprocessableError(line) from None
        except DicomWebError as err:  # --datastore-dicomweb's PACS failed listing the finals: 502, the slot is free
            job.state.set(status="ERROR", phase="ERROR", error=pacs_failed(err))
            raise BadGatewayError(pacs_failed(err)) from None
        threading.Thread(target=self._run, args=(job,), name=f"train-{name}", daemon=True).start()
        return job.state.to_dict()

    @staticmethod
    def _run(job: Any) -> None:
        import logging

        try:
            job.run()
        except Exception:  # noqa: BLE001 - the state holds its one line; the actor's log the traceback
            logging.getLogger(__name__).exception("training job for %s failed", job.name)

    def status(self, name: Optional[str] = None) -> Any:
        """The job's state (``name``), or the latest job's; a NotFoundError when there is none."""
        with self._lock:
            name = name or (self.order[-1] if self.order else None)
            job = self.jobs.get(name) if name else None
        if job is None:
            what = f"adapter {name!r}" if name else "any adapter"
            return NotFoundError(f"no training job for {what} since the server started; start one with "
                                 "POST /train/{model} (the admin token)")
        return job.state.to_dict()

    def stop(self, name: Optional[str] = None) -> Any:
        """Stop ``name``'s running job (None: every running one); their states, or a NotFoundError."""
        with self._lock:
            chosen = [self.jobs[n] for n in ([name] if name else self.order) if n in self.jobs]
        running = [job for job in chosen if job.state.status == "RUNNING"]
        if name and not running:
            return NotFoundError(f"no training job for adapter {name!r} is running; GET /train/{name} says how "
                                 "the last one ended")
        for job in running:
            job.stop()
        return {job.name: job.state.to_dict() for job in running}

    def list(self) -> list[dict[str, Any]]:
        """Every adapter's latest job's state, the latest job last."""
        with self._lock:
            jobs = [self.jobs[n] for n in self.order]
        return [job.state.to_dict() for job in jobs]

    def train_stats(self) -> dict[str, Any]:
        """``/info/``'s ``train_stats`` as MONAI Label's trainers give them (3D Slicer's progress bar):
        the running job first."""
        stats = {}
        for state in sorted(self.list(), key=lambda s: s["status"] != "RUNNING"):
            entry = {"epoch": state["epoch"], "total_epochs": state["total_epochs"], "status": state["status"],
                     "best_metric": (state["holdout_dice"] or 0.0) / 100.0, "start_ts": state["start_ts"]}
            if state["end_ts"] is not None:
                entry["total_time"] = round(state["end_ts"] - state["start_ts"], 3)
            stats[state["adapter"]] = entry
        return stats
