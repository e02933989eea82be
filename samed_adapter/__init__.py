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
    "Adapter": "adapter_file.adapter",
    "AdapterError": "adapter_file.adapter",
    "AdapterFormatError": "adapter_file.adapter",
    "AdapterMismatchError": "adapter_file.adapter",
    "BaseMismatchError": "adapter_file.adapter",
    "build_sam": "hosts.backbones",
    "infer_backbone": "hosts.backbones",
    "list_backbones": "hosts.backbones",
    "load_stock_sam": "hosts.backbones",
    "UnsafeCheckpointError": "adapter_file.checkpoints",
    "convert_published": "convert",
    "SYNAPSE_CLASS_NAMES": "adapter_file.config",
    "AdapterConfig": "adapter_file.config",
    "RADIOLOGICAL": "volume.geometry",
    "SliceGeometry": "volume.geometry",
    "axis_codes": "volume.geometry",
    "push_to_hub": "hub",
    "SAMed": "model",
    "ClickSession": "interactive.session",
    "ClicksNotTrainedError": "interactive.prompts",
    "CompiledSwapWarning": "patching",
    "inject": "patching",
    "patch": "patching",
    "unpatch": "patching",
    "Intensity": "volume.preprocessing",
    "segment_file": "segment.outputs",
    "segment_files": "segment.pipeline",
    "segment_study": "dicomweb.job",
    "DicomWebError": "dicomweb.errors",
    "FolderDatastore": "datastore.local",
    "DicomWebDatastore": "datastore.dicomweb",
    "VersionStore": "learning.versions",
    "LearningJob": "learning.job",
    "JobOptions": "learning.job",
    "label_statistics": "segment.statistics",
    "stock_fingerprint": "surgery.structure",
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
    from .adapter_file.adapter import Adapter, AdapterError, AdapterFormatError, AdapterMismatchError, BaseMismatchError
    from .hosts.backbones import build_sam, infer_backbone, list_backbones, load_stock_sam
    from .adapter_file.checkpoints import UnsafeCheckpointError
    from .adapter_file.config import SYNAPSE_CLASS_NAMES, AdapterConfig
    from .convert import convert_published
    from .volume.geometry import RADIOLOGICAL, SliceGeometry, axis_codes
    from .hub import push_to_hub
    from .interactive import ClickSession, ClicksNotTrainedError
    from .model import SAMed
    from .patching import CompiledSwapWarning, inject, patch, unpatch
    from .segment.pipeline import segment_files
    from .dicomweb.errors import DicomWebError
    from .dicomweb.job import segment_study
    from .datastore.dicomweb import DicomWebDatastore
    from .datastore.local import FolderDatastore
    from .learning.job import JobOptions, LearningJob
    from .learning.versions import VersionStore
    from .volume.preprocessing import Intensity
    from .segment.outputs import segment_file
    from .segment.statistics import label_statistics
    from .surgery.structure import stock_fingerprint
