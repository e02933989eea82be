"""Ray start-up for a run or a server: ``ray.init`` with its logging kept to what matters, and a
Ray started here listening on 127.0.0.1. The Ray Data engine (:mod:`.ray_data`) and the service
(:mod:`samed_adapter.serve.server`) both start Ray through :func:`init_ray`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Any, Iterator, Optional

__all__ = ["BACKEND_LOG_LEVEL_ENV", "init_ray"]

#: The level of Ray's C++ core (raylet, GCS, workers and this process's core worker). Ray Data
#: hands every actor its stages through the object store and lets actors restart, a pairing Ray's
#: core logs as an error on every run (ray-project/ray#53727: "Actor with class name ... has
#: constructor arguments in the object store and max_restarts > 0"), on the driver's stderr, where
#: no Python logger level reaches. A failure that matters reaches the user as an exception or an
#: input's error either way. Set by the user, the variable is left as it is.
BACKEND_LOG_LEVEL_ENV = "RAY_BACKEND_LOG_LEVEL"
# What Ray's core says, on the driver's stderr, on reading the variable: nothing to the user.
_LEVEL_NOTICE = "Set ray log level from environment variable " + BACKEND_LOG_LEVEL_ENV
# Ray takes any machine for a cluster node and listens on all its interfaces (metrics exporters
# without a token among them) unless this is 0, its default on macOS and Windows: then a Ray
# started here listens on 127.0.0.1 only, which is all that a Ray started inside a command needs.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Logged by every Ray started here that keeps Ray's default, token authentication: nothing to do.
_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


@contextlib.contextmanager
def _native_stderr_without(unwanted: str) -> Iterator[None]:
    """Hold what is written to file descriptor 2 inside the block (C++ code writes there, past
    ``sys.stderr``) and pass it on afterwards, less the lines that contain ``unwanted``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if unwanted not in line]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def _loopback_if_started_here(address: Optional[str]) -> Iterator[None]:
    """Inside the block, a Ray that ``ray.init`` starts (no address given, none in ``RAY_ADDRESS``)
    takes 127.0.0.1 for its node's address, so that all its sockets but one listen there (see
    :data:`_CLUSTER_ENV`; the processes it starts read the variable, this one Ray's constant).
    Ray Serve's replicas still listen on all interfaces for each other (a port hard-coded in
    ``ray/serve/_private/replica.py``), behind Ray's token."""
    if address is not None or os.environ.get("RAY_ADDRESS"):
        yield
        return
    from ray._private import ray_constants

    before, os.environ[_CLUSTER_ENV] = os.environ.get(_CLUSTER_ENV), "0"
    cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        if before is None:
            del os.environ[_CLUSTER_ENV]
        else:
            os.environ[_CLUSTER_ENV] = before


def init_ray(ray: Any, address: Optional[str]) -> None:
    """``ray.init`` for the Ray this run starts or connects to, its logging kept to what matters:
    Python warnings and errors, and Ray's core only where it fails (fatal), unless the user chose
    the core's level in ``RAY_BACKEND_LOG_LEVEL`` (see :data:`BACKEND_LOG_LEVEL_ENV`). A Ray
    started here listens on 127.0.0.1 (:func:`_loopback_if_started_here`)."""
    notice = logging.Filter()
    notice.filter = lambda record: _TOKEN_NOTICE not in record.getMessage()  # type: ignore[method-assign]
    token_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    token_logger.addFilter(notice)
    try:
        with _loopback_if_started_here(address):
            _init_ray_quietly(ray, address)
    finally:
        token_logger.removeFilter(notice)


def _init_ray_quietly(ray: Any, address: Optional[str]) -> None:
    options = dict(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                   logging_level=logging.WARNING, configure_logging=True)
    if os.environ.get(BACKEND_LOG_LEVEL_ENV):
        ray.init(**options)
        return
    # Ray reads the variable once per process, as each starts: the processes started here and this
    # process's core worker, all inside ray.init. Afterwards it is unset again, as it was.
    os.environ[BACKEND_LOG_LEVEL_ENV] = "fatal"
    try:
        with _native_stderr_without(_LEVEL_NOTICE):
            ray.init(**options)
    finally:
        del os.environ[BACKEND_LOG_LEVEL_ENV]
