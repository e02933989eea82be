"""Start and stop a server: Ray (local or a cluster), Ray Serve's HTTP proxy, the replicas."""

from __future__ import annotations

import logging
import math
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .catalog import catalog_for
from .settings import ServeSettings

APP_NAME = "samed-adapter"
#: requests the front takes at once. Ray Serve answers a request over this, or over its queue,
#: itself, with a plain-text 503; the front's own bound (--max-queue, a JSON 503 before the body is
#: read) and --body-timeout come first, so this is set out of reach, and Ray's queue left unbounded.
FRONT_ONGOING = 100_000


class DeployError(RuntimeError):
    """Ray Serve gave up starting a deployment: its replicas' constructor failed (one line, the
    replica's exception)."""


@dataclass
class Server:
    """A running server: ``url`` to call, :meth:`shutdown` to stop it (and the Ray it started)."""

    url: str
    settings: ServeSettings
    started_ray: bool
    #: the training jobs' actor (``--datastore``; :mod:`.training_jobs`), None without a datastore
    jobs: Any = None

    def check(self) -> None:
        """Raise :class:`DeployError` if Ray Serve gave up starting a replica: the model replicas
        may still be starting when the front first answers, and fail after that."""
        from ray import serve

        app = serve.status().applications.get(APP_NAME)
        if app is None or app.status != "DEPLOY_FAILED":
            return
        # A deployment's message ends with its replica's exception (the traceback before it is Ray's log's).
        why = [f"{name}: {status.message.strip().splitlines()[-1]}" for name, status in app.deployments.items()
               if status.status == "DEPLOY_FAILED" and status.message.strip()]
        raise DeployError(f"the server's replicas failed to start ({'; '.join(why) or app.message}); the replica's "
                          "log in Ray's session folder (logs/serve/; /tmp/ray/session_latest for a Ray started here) "
                          "has the traceback")

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.delete(APP_NAME)
            if self.jobs is not None:  # its jobs' Ray Train workers go with it; no version is half-written
                ray.kill(self.jobs)
        finally:
            # A Ray started here stops with Serve's actors in it; serve.shutdown first would have Ray
            # print its controller's shutdown task as failed (killed while it ran).
            if self.started_ray:
                ray.shutdown()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _import_serve() -> Any:
    try:
        from ray import serve
    except ImportError as err:
        raise ImportError(f"samed-adapter serve needs Ray Serve: pip install 'samed-adapter[serve]' ({err})") from err
    return serve


def start(settings: ServeSettings, *, ready_timeout_s: float = 300.0) -> Server:
    """Start serving ``settings``' adapters; returns once ``/healthz`` answers (the model replicas
    may still be starting: requests wait for them, and :meth:`Server.check` raises if they fail).

    The catalog is checked here first (folders and files exist), so a typo is one line, not a
    replica that fails to start; each replica then builds its SAM from ``settings.sam``.
    """
    catalog_for(settings)
    if settings.datastore or settings.datastore_dicomweb:  # a damaged one is one line here, not a failed replica
        from ..datastore.opening import open_datastore

        open_datastore(settings.datastore, settings.datastore_dicomweb, settings.datastore_cache)
    if settings.sam.checkpoint is not None:
        from pathlib import Path

        if not Path(settings.sam.checkpoint).is_file():
            raise FileNotFoundError(f"--sam {settings.sam.checkpoint}: no such file")
    _check_port(settings.host, settings.port)
    serve = _import_serve()
    import ray

    from ..segment.ray_start import init_ray
    from .frontend import Frontend
    from .segmenter import Segmenter

    started_ray = not ray.is_initialized() and settings.ray_address is None
    if not ray.is_initialized():
        init_ray(ray, settings.ray_address)
    # Serve's INFO lines (started, "connecting to existing app", ready, deleting) say what the
    # command says itself in one line; its warnings and errors still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    jobs = None
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        if settings.datastore or settings.datastore_dicomweb:  # /train/: jobs in their own actor, not a replica
            from .training_jobs import start_actor

            jobs = start_actor(settings)
        segmenter = Segmenter.options(
            num_replicas=settings.replicas,
            # Every request in flight is one ongoing call (its slices wait in the replica's own queue).
            max_ongoing_requests=max(64, 4 * settings.max_batch_size),
            ray_actor_options=_replica_resources(ray, settings, local=settings.ray_address is None),
        ).bind(settings)
        frontend = Frontend.options(
            max_ongoing_requests=FRONT_ONGOING, ray_actor_options={"num_cpus": 0},
        ).bind(segmenter, settings)
        # serve.run returns once every replica runs, polling each second; the front answers before
        # the model replicas are up (requests wait for them), so readiness is its first answer.
        # serve._run (in ray.serve's __all__) is serve.run that can leave the waiting to us.
        deploy = getattr(serve, "_run", None)
        if deploy is not None:
            deploy(frontend, _blocking=False, name=APP_NAME, route_prefix="/")
        else:
            serve.run(frontend, name=APP_NAME, route_prefix="/", blocking=False)
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        server = Server(f"http://{host}:{settings.port}", settings, started_ray, jobs)
    except BaseException:
        if jobs is not None:
            ray.kill(jobs)
        if started_ray:
            ray.shutdown()
        raise
    try:
        _wait_healthy(server, ready_timeout_s)
    except BaseException:
        server.shutdown()
        raise
    return server


def _check_port(host: str, port: int) -> None:
    """OSError naming the port when something listens there (Ray Serve's own error is a remote traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: connections of a server stopped a moment ago (TIME_WAIT) do not count,
        # a socket listening there does (Linux).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise OSError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); stop what "
                          "uses that port, or pass another --port") from None


def _replica_resources(ray: Any, settings: ServeSettings, *, local: bool) -> dict[str, float]:
    """What each model replica reserves, so that --replicas fit the Ray they start on.

    Ray Serve waits, without a word, for replicas that no node can hold; so on a local Ray the
    GPUs asked for must be there (an error otherwise), and CPU replicas share the CPUs when there
    are fewer than replicas (the model uses the cores the OS gives it either way). A cluster given
    by address may add nodes as it scales, so there Ray waits for them.
    """
    resources = ray.cluster_resources()
    if settings.gpus_per_replica:
        need, have = settings.replicas * settings.gpus_per_replica, float(resources.get("GPU", 0.0))
        if local and have < need:
            raise ValueError(f"--replicas {settings.replicas} --gpus-per-replica {settings.gpus_per_replica:g} needs "
                             f"{need:g} GPUs but this machine's Ray sees {have:g}; use fewer replicas, "
                             "--gpus-per-replica 0, or --ray-address for a cluster with GPUs")
        return {"num_cpus": 0, "num_gpus": settings.gpus_per_replica}
    cpus = float(resources.get("CPU", 1.0))
    # Rounded down: three replicas of round(2 / 3, 4) = 0.6667 CPU would want 2.0001 of 2.
    share = 1.0 if not local or cpus >= settings.replicas else math.floor(cpus / settings.replicas * 1e4) / 1e4
    return {"num_cpus": share, "num_gpus": 0}


def _wait_healthy(server: Server, timeout_s: float) -> None:
    """Return once ``/healthz`` answers 200 (Ray Serve's proxy answers 404 until the route is
    there, then holds a request until the front runs); raise what failed the deployment first."""
    deadline = time.monotonic() + timeout_s
    while True:
        server.check()
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=max(0.5, min(left, 5.0))) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if left < 0:
            raise TimeoutError(f"the server at {server.url} did not answer /healthz within {timeout_s:.0f} s")
        time.sleep(0.1)
