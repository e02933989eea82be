"""The valid adapter files of the loading fuzz and the byte-level edits its mutations make.

Two valid adapter files are made from a tiny random SAM (`build_sam("tiny", seed=0)`): the plain
one and the decoder-LoRA variant (K = 3, image size 128), held with their SAMs by `Fixture`.
`split_file`, `assemble`, `with_length`, `flip` and `nested` take a safetensors file apart and put
it together again; the mutations themselves are `samed_adapter.testing.mutations`.
"""

from __future__ import annotations

import json
import struct
from typing import Optional

# torch and samed_adapter are imported lazily, as in the harness.

VARIANTS = ("plain", "decoder")
TARGETS = ("stock", "plain", "decoder", "merged")
IMAGE_SIZE = 128


# --------------------------------------------------------------------------- the valid files


def _configs():
    import samed_adapter as sa

    return {
        "plain": sa.AdapterConfig(num_classes=3, image_size=IMAGE_SIZE),
        "decoder": sa.AdapterConfig(num_classes=3, image_size=IMAGE_SIZE, decoder_lora=True),
    }


def other_backbone():
    """A small SAM that is not `tiny` (embed dim 32), for adapters made for another backbone."""
    from samed_adapter.hosts.backbones import Backbone

    return Backbone("fuzz_other", 32, 2, 2, (1,), image_size=256, window_size=4, prompt_dim=32,
                    decoder_mlp_dim=64, decoder_heads=2, mask_in_chans=4)


class Fixture:
    """The valid adapters and their files; everything a mutation starts from."""

    def __init__(self) -> None:
        import torch
        from safetensors.torch import save

        import samed_adapter as sa

        from . import random_adapter

        sam = sa.build_sam("tiny", seed=0)
        self.adapters = {v: random_adapter(sam, cfg, seed=i + 1) for i, (v, cfg) in enumerate(_configs().items())}
        self.metadata = {v: a.metadata() for v, a in self.adapters.items()}
        self.config = {v: json.loads(m["config"]) for v, m in self.metadata.items()}
        self.files = {v: st_save(a.tensors, self.metadata[v]) for v, a in self.adapters.items()}
        other = random_adapter(sa.build_sam(other_backbone(), seed=1), _configs()["plain"], seed=3)
        self.other_tensors = _contiguous(other.tensors)
        self.other_metadata = other.metadata()
        self.bad_dtypes = []
        for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
                      torch.float64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64):
            try:
                save({"x": torch.zeros(2, dtype=dtype)})
            except Exception:  # an older safetensors without this dtype
                continue
            self.bad_dtypes.append(dtype)

    def rebuild(self, variant: str, tensors=None, metadata: Optional[dict] = None,
                drop_metadata: bool = False) -> bytes:
        """A safetensors file of `variant` with replaced tensors and/or metadata."""
        tensors = self.adapters[variant].tensors if tensors is None else tensors
        meta = None if drop_metadata else (self.metadata[variant] if metadata is None else metadata)
        return st_save(tensors, meta)

    def with_metadata(self, variant: str, /, **changes) -> bytes:
        """Metadata keys changed (a value of None removes the key)."""
        meta = dict(self.metadata[variant])
        for key, value in changes.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        return self.rebuild(variant, metadata=meta)

    def with_config_text(self, variant: str, text: str) -> bytes:
        return self.with_metadata(variant, config=text)

    def with_config(self, variant: str, /, **changes) -> bytes:
        """Config fields changed (the value `DROP` removes the field)."""
        config = dict(self.config[variant])
        for key, value in changes.items():
            if value is DROP:
                config.pop(key, None)
            else:
                config[key] = value
        return self.with_config_text(variant, json.dumps(config, sort_keys=True))

    def tensors(self, variant: str) -> dict:
        return dict(self.adapters[variant].tensors)


DROP = object()  # a config value that removes the field (Fixture.with_config)


def st_save(tensors: dict, metadata: Optional[dict] = None) -> bytes:
    """`safetensors.torch.save`, with the header's keys in a fixed order (safetensors writes the
    metadata in hash order, which would make the same case differ byte for byte between runs)."""
    from safetensors.torch import save

    _, header, body = split_file(save(_contiguous(tensors), metadata=metadata))
    return assemble(json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")), body)


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def split_file(data: bytes) -> tuple[int, bytes, bytes]:
    """(header length, header JSON bytes, tensor data) of a safetensors file."""
    (length,) = struct.unpack("<Q", data[:8])
    return length, data[8 : 8 + length], data[8 + length :]


def assemble(header, body: bytes, length: Optional[int] = None) -> bytes:
    """A safetensors file from a header (dict, str or bytes) and data; `length` overrides the length field."""
    if isinstance(header, (dict, list)) or header is None or isinstance(header, (int, float)):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    header = header + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header) if length is None else length) + header + body


def with_length(data: bytes, length: int) -> bytes:
    """The file with its u64 header-length field replaced."""
    return struct.pack("<Q", length % 2**64) + data[8:]


def flip(data: bytes, positions, masks=None) -> bytes:
    """XOR the bytes at `positions` with `masks` (default 0xFF)."""
    out = bytearray(data)
    for i, pos in enumerate(positions):
        out[pos] ^= (masks[i] if masks is not None else 0xFF) or 0xFF
    return bytes(out)


def nested(depth: int, kind: str = "list", leaf: str = "3") -> str:
    """JSON text nested `depth` deep."""
    if kind == "list":
        return "[" * depth + leaf + "]" * depth
    return '{"a":' * depth + leaf + "}" * depth
