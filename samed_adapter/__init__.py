"""samed-adapter: hot-swap SAMed adapters onto a stock Segment Anything Model."""

__version__ = "0.1.0"

from .adapter import (
    Adapter,
    AdapterError,
    AdapterFormatError,
    AdapterMismatchError,
    BaseMismatchError,
)
from .backbones import build_sam, infer_backbone, list_backbones
from .checkpoints import UnsafeCheckpointError
from .convert import convert_published
from .config import SYNAPSE_CLASS_NAMES, AdapterConfig
from .geometry import RADIOLOGICAL, SliceGeometry, axis_codes
from .hub import push_to_hub
from .model import SAMed
from .patching import inject, patch, unpatch
from .preprocessing import Intensity
from .segmentation import segment_file
from .statistics import label_statistics
from .surgery import stock_fingerprint

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterError",
    "AdapterFormatError",
    "AdapterMismatchError",
    "BaseMismatchError",
    "Intensity",
    "RADIOLOGICAL",
    "SAMed",
    "SYNAPSE_CLASS_NAMES",
    "SliceGeometry",
    "UnsafeCheckpointError",
    "axis_codes",
    "build_sam",
    "convert_published",
    "infer_backbone",
    "inject",
    "label_statistics",
    "list_backbones",
    "patch",
    "push_to_hub",
    "segment_file",
    "stock_fingerprint",
    "unpatch",
]
