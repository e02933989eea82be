"""Adapter: the tensors of a SAMed adapter plus its config, and the `.safetensors` file format.

File format (version 2): one safetensors file whose header metadata holds
    format = "samed-adapter", format_version = "2", config = AdapterConfig as JSON,
    base_fingerprint = "sha256:..." of the stock SAM tensors it applies to,
    lineage = JSON (optional): where a trained version came from (parent version, datastore items,
    held-out ids, the datastore); not part of the fingerprint.
Tensor names (float32, float16 or bfloat16):
    image_encoder.blocks.{i}.attn.qkv.{q,v}.lora_A.weight   (r, C)   LoRA, peft naming
    image_encoder.blocks.{i}.attn.qkv.{q,v}.lora_B.weight   (C, r)
        (SAM 2: image_encoder.trunk.blocks.{i}..., lora_B (C', r) where a Hiera block widens C -> C')
    prompt_encoder.{name}                whole; no_mask_embed.weight always, others if not stock
    mask_decoder.{name}                  whole: the K-sized tensors (mask_tokens,
                                         output_hypernetworks_mlps.*, the iou head's last layer)
                                         and the decoder-LoRA variant's ...{q,v}_proj.lora_{A,B}.weight;
                                         a click-trained adapter's class_embed.weight (K+1, D)
    delta.mask_decoder.{name}            (trained - stock) for decoder tensors with a stock
                                         counterpart; absent means equal to stock
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import AdapterConfig
from ..volume.geometry import describe_orientation
from ..volume.preprocessing import Intensity
from ..io.files import atomic_path
from .tensor_file import TensorFile, TensorFileError, first_nonfinite

FORMAT_NAME = "samed-adapter"
FORMAT_VERSION = 2
# Version 1 configs lack intensity_percentiles, orientation and slice_axis; their defaults (none,
# as stored, axis 2) are exactly how version 1 adapters were applied, so they load unchanged.
READABLE_VERSIONS = ("1", "2")
DELTA_PREFIX = "delta."
_STORABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# SAM's encoder blocks, or SAM 2's Hiera trunk blocks (`image_encoder.trunk.blocks...`).
_ENCODER_LORA = re.compile(r"image_encoder\.(trunk\.)?blocks\.(\d+)\.attn\.qkv\.([qv])\.lora_([AB])\.weight")
_NAME = re.compile(r"(delta\.)?(prompt_encoder|mask_decoder)\.[A-Za-z0-9_.]+")


class AdapterError(ValueError):
    """Base class: an adapter cannot be read or used."""


class AdapterFormatError(AdapterError):
    """The file or tensors are not a valid samed-adapter adapter."""


class AdapterMismatchError(AdapterError):
    """The adapter does not fit this SAM (backbone, shapes or class count)."""


class BaseMismatchError(AdapterMismatchError):
    """The adapter was trained on other stock SAM weights (fingerprint differs)."""


@dataclass
class Adapter:
    """A SAMed adapter: named tensors (see the module docstring) and their AdapterConfig.

    Constructing one validates names, dtypes, shapes against the config and finiteness.
    `finite_checked=True` is for readers that have already checked every value (`load` does,
    in one pass over the file); the rest is checked all the same. `lineage` (a JSON-able dict or
    None) says where a trained version came from; it travels in the file but not in the fingerprint.
    """

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    base_fingerprint: str
    finite_checked: InitVar[bool] = False
    lineage: Optional[dict[str, Any]] = field(default=None, compare=False)

    def __post_init__(self, finite_checked: bool = False) -> None:
        if not isinstance(self.config, AdapterConfig):
            raise TypeError(f"config must be an AdapterConfig, got {type(self.config).__name__}")
        if not isinstance(self.base_fingerprint, str) or not self.base_fingerprint.startswith("sha256:"):
            raise AdapterFormatError(f"base_fingerprint must be 'sha256:<hex>', got {self.base_fingerprint!r}")
        _validate_tensors(self.tensors, self.config)
        if self.lineage is not None:
            _lineage_json(self.lineage)
        if not finite_checked:
            bad = first_nonfinite(self.tensors)
            if bad is not None:
                raise AdapterFormatError(f"{bad!r} holds NaN or infinite values")

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def fingerprint(self) -> str:
        """``"sha256:<hex>"`` of what the adapter predicts with: its config, base fingerprint and tensors.

        Two adapters with the same fingerprint give the same labels on the same SAM; file name,
        storage order and ``created_by`` do not enter it. Computed once (about 20 ms for ViT-B's
        4.9 M values); the tensors are not expected to change afterwards.
        """
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            digest = hashlib.sha256(self.config.to_json().encode())
            digest.update(self.base_fingerprint.encode())
            for name in sorted(self.tensors):
                t = self.tensors[name].detach().to("cpu").contiguous()
                digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            cached = self.__dict__["_fingerprint"] = "sha256:" + digest.hexdigest()
        return cached

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the tensors (the widest one if mixed)."""
        return max((t.dtype for t in self.tensors.values()), key=lambda d: torch.finfo(d).bits)

    def to(self, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None) -> "Adapter":
        """A copy with tensors cast and/or moved."""
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        return Adapter(self.config, tensors, self.base_fingerprint, lineage=self.lineage)

    def metadata(self) -> dict[str, str]:
        from ..version import __version__

        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "config": self.config.to_json(),
            "base_fingerprint": self.base_fingerprint,
            "created_by": f"samed-adapter {__version__}",
        }
        if self.lineage is not None:
            meta["lineage"] = _lineage_json(self.lineage)
        return meta

    def save(self, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> Path:
        """Write the adapter as one `.safetensors` file, atomically.

        Args:
            dtype: None keeps the tensors' dtype; torch.float16 or torch.bfloat16 halve the file.
        """
        from safetensors.torch import save_file

        if dtype is not None and dtype not in _STORABLE_DTYPES:
            raise ValueError(f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        path = Path(path)
        tensors = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in self.tensors.items()}
        if dtype is not None:
            bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
            if bad:
                raise ValueError(f"{len(bad)} tensors overflow {dtype} (e.g. {bad[0]}); save as float32 or bfloat16")
        with atomic_path(path) as tmp:
            save_file(tensors, os.fspath(tmp), metadata=self.metadata())
        return path

    @classmethod
    def load(
        cls,
        path_or_repo_id: Union[str, os.PathLike],
        *,
        revision: Optional[str] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        local_files_only: bool = False,
        token: Union[str, bool, None] = None,
        device: Union[str, torch.device] = "cpu",
    ) -> "Adapter":
        """Read an adapter file written by `save`, from a local path or a Hugging Face Hub id.

        A local path always wins: an existing file (or a folder holding `adapter.safetensors`)
        is read even if its name looks like a Hub id. Otherwise a string `"org/name"` or
        `"org/name@revision"` is resolved through the Hub cache (see `samed_adapter.hub`);
        `revision`, `cache_dir`, `local_files_only` and `token` apply to Hub ids only.

        Raises:
            FileNotFoundError: no such file, and not a Hub id.
            samed_adapter.adapter_file.hub_cache.AdapterNotFoundError (a FileNotFoundError): the Hub id could not
                be resolved (e.g. offline and not cached); the message says how to get the file.
            AdapterFormatError: not a safetensors file, or not a valid adapter.
            ValueError: `revision` given with a local path.
        """
        from ..io.paths import looks_like_repo_id
        from .hub_cache import ADAPTER_FILENAME, hf_hub_adapter_path

        path = Path(path_or_repo_id)
        if path.is_dir() and (path / ADAPTER_FILENAME).is_file():
            path = path / ADAPTER_FILENAME
        if path.exists():
            if revision is not None:
                raise ValueError(
                    f"revision={revision!r} applies to Hub ids, but {path} is a local file (a local path wins "
                    "over a Hub id); rename or move the local file to load the Hub adapter"
                )
        elif looks_like_repo_id(path_or_repo_id):
            path = hf_hub_adapter_path(
                os.fspath(path_or_repo_id), revision=revision, cache_dir=cache_dir,
                local_files_only=local_files_only, token=token,
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"no adapter file at {path}; give the path of an adapter .safetensors file or a Hugging Face "
                "Hub id such as 'org/name'"
            )
        file = _read_tensor_file(path)
        config, fingerprint = _parse_metadata(file.metadata, path)
        lineage = _parse_lineage(file.metadata.get("lineage"), path)
        try:
            if file.other_dtypes:
                name, code = next(iter(file.other_dtypes.items()))
                raise AdapterFormatError(f"{name!r} has dtype {code}; adapters hold float32/float16/bfloat16")
            bad = file.first_nonfinite()
            if bad is not None:
                raise AdapterFormatError(f"{bad!r} holds NaN or infinite values")
            tensors = file.tensors
            if str(device) != "cpu":
                tensors = {name: t.to(device) for name, t in tensors.items()}
            return cls(config, tensors, fingerprint, finite_checked=True, lineage=lineage)
        except AdapterFormatError as err:
            raise AdapterFormatError(f"{path}: {err}") from None


def _read_tensor_file(path: Path) -> TensorFile:
    try:
        return TensorFile.read(path)
    except (TensorFileError, OSError) as err:
        raise AdapterFormatError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
            "was it truncated, or is it a .pth checkpoint (use `samed-adapter convert`)?"
        ) from None


def _parse_metadata(metadata: dict[str, str], path: Path) -> tuple[AdapterConfig, str]:
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFormatError(
            f"{path} is a safetensors file but not a samed-adapter adapter (metadata 'format' is "
            f"{metadata.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise AdapterFormatError(
            f"{path} has adapter format version {version!r}; this samed-adapter reads versions "
            f"{', '.join(READABLE_VERSIONS)}. Upgrade samed-adapter to read newer files."
        )
    try:
        config = AdapterConfig.from_json(metadata.get("config", ""))
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"{path} has an invalid adapter config: {err}") from None
    return config, metadata.get("base_fingerprint", "")


def _lineage_json(lineage: Any) -> str:
    """``lineage`` as the file's metadata text (AdapterFormatError when it is no JSON object)."""
    if not isinstance(lineage, dict):
        raise AdapterFormatError(f"lineage must be a dict, got {type(lineage).__name__}")
    try:
        return json.dumps(lineage, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"lineage must hold JSON only (numbers, strings, lists, dicts): {err}") from None


def _parse_lineage(text: Optional[str], path: Path) -> Optional[dict[str, Any]]:
    if text is None:  # files written before lineage existed, and adapters not made from a datastore
        return None
    try:
        lineage = json.loads(text)
    except ValueError as err:
        raise AdapterFormatError(f"{path} has a damaged lineage record: {err}") from None
    if not isinstance(lineage, dict):
        raise AdapterFormatError(f"{path} has a lineage record that is no JSON object")
    return lineage


def _validate_tensors(tensors: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    if not isinstance(tensors, dict) or not tensors:
        raise AdapterFormatError("an adapter needs a non-empty dict of tensors")
    dims: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise AdapterFormatError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in _STORABLE_DTYPES:
            raise AdapterFormatError(f"{name!r} has dtype {tensor.dtype}; adapters hold float32/float16/bfloat16")
        lora = _ENCODER_LORA.fullmatch(name)
        if lora:
            shape = tuple(tensor.shape)
            is_a = lora.group(4) == "A"
            if len(shape) != 2 or (shape[0] if is_a else shape[1]) != config.rank:
                raise AdapterFormatError(f"{name!r} has shape {shape}; rank {config.rank} LoRA needs "
                                         f"{'(r, C)' if is_a else '(C, r)'}")
            if not lora.group(1):  # SAM's blocks share one width; Hiera's widen stage by stage
                dims.add(shape[1] if is_a else shape[0])
        elif not _NAME.fullmatch(name) or name.startswith("image_encoder."):
            raise AdapterFormatError(f"unexpected tensor name {name!r} in an adapter")
    if len(dims) > 1:
        raise AdapterFormatError(f"the encoder LoRA tensors disagree on the embedding size: {sorted(dims)}")
    tokens = tensors.get("mask_decoder.mask_tokens.weight")
    if tokens is None or "prompt_encoder.no_mask_embed.weight" not in tensors:
        raise AdapterFormatError("an adapter needs mask_decoder.mask_tokens.weight and prompt_encoder.no_mask_embed.weight")
    if tokens.dim() != 2 or tokens.shape[0] != config.num_classes + 1:
        raise AdapterFormatError(
            f"mask_tokens has shape {tuple(tokens.shape)} but the config says {config.num_classes} classes "
            f"({config.num_classes + 1} tokens with background)"
        )
    class_embed = tensors.get("mask_decoder.class_embed.weight")
    if (class_embed is not None) != config.clicks:
        raise AdapterFormatError(
            f"the config says clicks={config.clicks} but the file {'has' if class_embed is not None else 'has no'} "
            "mask_decoder.class_embed.weight (the class embedding that click refinement needs)")
    if class_embed is not None and (class_embed.dim() != 2 or class_embed.shape[0] != config.num_classes + 1):
        raise AdapterFormatError(f"class_embed has shape {tuple(class_embed.shape)} but the config says "
                                 f"{config.num_classes} classes ({config.num_classes + 1} rows with background)")
    has_decoder_lora = any(k.startswith("mask_decoder.") and ".lora_" in k for k in tensors)
    if has_decoder_lora != config.decoder_lora:
        raise AdapterFormatError(
            f"the config says decoder_lora={config.decoder_lora} but the file "
            f"{'has' if has_decoder_lora else 'has no'} decoder LoRA tensors"
        )


def describe(adapter: Adapter) -> str:
    """Human-readable summary (used by `samed-adapter info`)."""
    cfg = adapter.config
    lines = [
        f"backbone          {cfg.backbone or '(any, inferred when patching)'}",
        f"classes           {cfg.num_classes}: {', '.join(cfg.class_names or [])}",
        f"image size        {cfg.image_size}",
        f"encoder LoRA      rank {cfg.rank}, scale {cfg.lora_scale}, blocks "
        f"{'all' if cfg.lora_blocks is None else cfg.lora_blocks}",
        f"decoder LoRA      {'rank ' + str(cfg.decoder_lora_rank) if cfg.decoder_lora else 'no'}",
        f"clicks            {'yes: refines a class from clicks' if cfg.clicks else 'no (train with --clicks)'}",
        f"preprocessing     {Intensity.from_config(cfg).describe()}",
        f"orientation       {describe_orientation(cfg)}",
        f"tensors           {len(adapter.tensors)}",
        f"parameters        {adapter.num_parameters:,}",
        f"size              {adapter.nbytes / 2**20:.2f} MiB",
        f"dtype             {str(adapter.dtype).replace('torch.', '')}",
        f"base fingerprint  {adapter.base_fingerprint}",
        f"config            {json.dumps(cfg.to_dict(), sort_keys=True)}",
    ]
    if adapter.lineage is not None:
        lines.append(f"lineage           {_describe_lineage(adapter.lineage)}")
    return "\n".join(lines)


def _describe_lineage(lineage: dict[str, Any]) -> str:
    """``"liver@3 from version 2: 12 datastore items, 3 held out (/data/store)"``, from what it holds."""
    name = f"{lineage.get('adapter', '?')}@{lineage['version']}" if "version" in lineage else "a version"
    items, holdout = lineage.get("items") or [], lineage.get("holdout") or []
    where = f" ({lineage['datastore']})" if lineage.get("datastore") else ""
    return f"{name} from version {lineage.get('parent')}: {len(items)} datastore items, {len(holdout)} held out{where}"
