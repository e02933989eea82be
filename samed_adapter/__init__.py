"""samed-adapter: hot-swap SAMed adapters onto a stock Segment Anything Model.

The public names below are imported on first use (PEP 562), so that `import samed_adapter` and
`samed-adapter --help` do not pay for torch and segment_anything until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "Adapter": "adapter",
    "AdapterError": "adapter",
    "AdapterFormatError": "adapter",
    "AdapterMismatchError": "adapter",
    "BaseMismatchError": "adapter",
    "build_sam": "backbones",
    "infer_backbone": "backbones",
    "list_backbones": "backbones",
    "load_stock_sam": "backbones",
    "UnsafeCheckpointError": "checkpoints",
    "convert_published": "convert",
    "SYNAPSE_CLASS_NAMES": "config",
    "AdapterConfig": "config",
    "RADIOLOGICAL": "geometry",
    "SliceGeometry": "geometry",
    "axis_codes": "geometry",
    "push_to_hub": "hub",
    "SAMed": "model",
    "CompiledSwapWarning": "patching",
    "inject": "patching",
    "patch": "patching",
    "unpatch": "patching",
    "Intensity": "preprocessing",
    "segment_file": "segmentation",
    "segment_files": "pipeline",
    "label_statistics": "statistics",
    "stock_fingerprint": "surgery",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'samed_adapter' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .adapter import Adapter, AdapterError, AdapterFormatError, AdapterMismatchError, BaseMismatchError
    from .backbones import build_sam, infer_backbone, list_backbones, load_stock_sam
    from .checkpoints import UnsafeCheckpointError
    from .config import SYNAPSE_CLASS_NAMES, AdapterConfig
    from .convert import convert_published
    from .geometry import RADIOLOGICAL, SliceGeometry, axis_codes
    from .hub import push_to_hub
    from .model import SAMed
    from .patching import CompiledSwapWarning, inject, patch, unpatch
    from .pipeline import segment_files
    from .preprocessing import Intensity
    from .segmentation import segment_file
    from .statistics import label_statistics
    from .surgery import stock_fingerprint
