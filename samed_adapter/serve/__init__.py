"""The segmentation service on Ray Serve: many adapters on one SAM, batches that mix them, the
native HTTP API and MONAI Label's; imports every stage below it (core, segment, io, ...).

- :mod:`.settings` (how a server runs), :mod:`.catalog` (adapter names and ``NAME@N`` -> files),
- :mod:`.version_routes` (listing an adapter's versions, serving another one),
- :mod:`.residents` (one replica's SAM and its resident adapters; mixed batches, no Ray),
- :mod:`.segmenter` (the model replicas, ``@serve.batch``), :mod:`.frontend` (the ingress: native
  API and plumbing), :mod:`.app` (the FastAPI app, the error answer), the route groups it inherits
  (:mod:`.monai_routes`, :mod:`.session_routes`, :mod:`.datastore_routes`, :mod:`.train_routes`),
- :mod:`.uploads`, :mod:`.monai_label`, :mod:`.metrics`, :mod:`.errors` (what the routes use),
- :mod:`.server` (start / stop), :mod:`.client` (``segment --server``).

``ray[serve]`` is imported by the modules that need it, so ``import samed_adapter.serve`` is light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AdapterCatalog", "ServeSettings", "Server", "ServerClient", "start"]

_EXPORTS = {"AdapterCatalog": "catalog", "ServeSettings": "settings", "Server": "server", "start": "server",
            "ServerClient": "client"}


def __getattr__(name: str) -> Any:
    import importlib

    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'samed_adapter.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


if TYPE_CHECKING:  # pragma: no cover
    from .catalog import AdapterCatalog
    from .client import ServerClient
    from .server import Server, start
    from .settings import ServeSettings
