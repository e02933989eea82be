"""Fuzz adapter loading: mutate valid adapter files and patch each one onto a tiny SAM.

Two valid adapter files are made from a tiny random SAM (`build_sam("tiny", seed=0)`): the plain
one and the decoder-LoRA variant (K = 3, image size 128). Every case takes one of them, applies
one mutation (see `KINDS`: truncation, flipped bytes, a wrong header length, hostile metadata
JSON, wrong dtypes/shapes/names, non-finite values, a wrong version or backbone, ...) and calls
`samed_adapter.patch` with the file on a SAM that is stock, patched (plain or decoder variant)
or patched and merged. A case passes when it ends in

  (a) an `AdapterError` subclass or a `FileNotFoundError` with a non-empty message, and the SAM
      is exactly as it was (state_dict bytes, module types, requires_grad, adapter config), or
  (b) a clean successful patch (the result is a SAMed model of the file's class count).

Anything else is a failure: another exception type (RuntimeError, ValueError, KeyError,
MemoryError, ...), an empty message, a changed SAM after an error, a case over the time limit
(`--timeout`, a hang), a worker that dies (a crash) or grows past `--max-rss-mib`.

Cases are reproducible: case i of seed s is drawn from `random.Random(f"samed-fuzz/{s}/{i}")`,
so `--case I` reruns one case alone and `--dump DIR` writes its mutated file. Cases run in
`--workers` subprocesses (each keeps one SAM; a hung or crashed worker is killed and replaced),
or in this process with `--workers 0` (the tests do that).

    python benchmarks/fuzz_adapter.py [--cases 10000] [--seed 0] [--workers 2] [--timeout 5]
    python benchmarks/fuzz_adapter.py --case 1234 --dump /tmp/case   # one case, verbosely

Prints a Markdown table of outcomes per mutation kind and exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import os
import random
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

# torch and samed_adapter are imported lazily: the orchestrating process only reads results.

VARIANTS = ("plain", "decoder")
TARGETS = ("stock", "plain", "decoder", "merged")
IMAGE_SIZE = 128
SUCCESS = "success"
ALLOWED_NAMES = ("AdapterFormatError", "AdapterMismatchError", "BaseMismatchError", "FileNotFoundError",
                 "AdapterNotFoundError")
_PROTOCOL = "@@fuzz "


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS of /proc/self/status), 0 where unavailable."""
    return _rss_of("self")


def _rss_of(pid) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- the valid files


def _configs():
    import samed_adapter as sa

    return {
        "plain": sa.AdapterConfig(num_classes=3, image_size=IMAGE_SIZE),
        "decoder": sa.AdapterConfig(num_classes=3, image_size=IMAGE_SIZE, decoder_lora=True),
    }


def trained_adapter(sam, config, seed: int):
    """An adapter whose every trainable tensor moved away from its initial value (as tests/test_patch.py)."""
    from samed_adapter.testing import random_adapter

    return random_adapter(sam, config, seed=seed)


def other_backbone():
    """A small SAM that is not `tiny` (embed dim 32), for adapters made for another backbone."""
    from samed_adapter.backbones import Backbone

    return Backbone("fuzz_other", 32, 2, 2, (1,), image_size=256, window_size=4, prompt_dim=32,
                    decoder_mlp_dim=64, decoder_heads=2, mask_in_chans=4)


class Fixture:
    """The valid adapters and their files; everything a mutation starts from."""

    def __init__(self) -> None:
        import torch
        from safetensors.torch import save

        import samed_adapter as sa

        sam = sa.build_sam("tiny", seed=0)
        self.adapters = {v: trained_adapter(sam, cfg, seed=i + 1) for i, (v, cfg) in enumerate(_configs().items())}
        self.metadata = {v: a.metadata() for v, a in self.adapters.items()}
        self.config = {v: json.loads(m["config"]) for v, m in self.metadata.items()}
        self.files = {v: st_save(a.tensors, self.metadata[v]) for v, a in self.adapters.items()}
        other = trained_adapter(sa.build_sam(other_backbone(), seed=1), _configs()["plain"], seed=3)
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
        """Config fields changed (the value `_DROP` removes the field)."""
        config = dict(self.config[variant])
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key, None)
            else:
                config[key] = value
        return self.with_config_text(variant, json.dumps(config, sort_keys=True))

    def tensors(self, variant: str) -> dict:
        return dict(self.adapters[variant].tensors)


_DROP = object()


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


# --------------------------------------------------------------------------- mutations


@dataclass
class Mutation:
    data: Optional[bytes]  # the file's bytes; None for the "missing" and "dir" layouts
    note: str
    layout: str = "file"  # "file", "missing" (no file at the path) or "dir" (the path is a folder)


Mutator = Callable[[random.Random, Fixture, str], Mutation]
KINDS: dict[str, Mutator] = {}


def kind(name: str):
    def register(fn: Mutator) -> Mutator:
        KINDS[name] = fn
        return fn

    return register


class FirstChoice(random.Random):
    """A Random that always takes the first option: the representative case of each kind.

    The mutators list their canonical option first, so `mutate(kind, FirstChoice(), ...)` is the
    one-case-per-kind example the tests use.
    """

    def __init__(self) -> None:
        super().__init__(0)  # what is drawn but not chosen (e.g. random bytes) is still reproducible

    def random(self) -> float:
        return 0.0

    def choice(self, seq):
        return seq[0]

    def randrange(self, start, stop=None, step=1):
        return 0 if stop is None else start

    def randint(self, a, b):
        return a

    def sample(self, population, k, **kwargs):
        return list(population)[:k]

    def uniform(self, a, b):
        return a

    def shuffle(self, x) -> None:
        pass


def mutate(kind_name: str, rng: random.Random, fx: Fixture, variant: str) -> Mutation:
    return KINDS[kind_name](rng, fx, variant)


@kind("valid")
def _valid(rng, fx, v):
    return Mutation(fx.files[v], "unchanged")


@kind("valid_half_precision")
def _valid_half(rng, fx, v):
    import torch

    dtype = rng.choice(["float16", "bfloat16", "mixed"])
    tensors = fx.tensors(v)
    for i, name in enumerate(sorted(tensors)):
        if dtype == "mixed":
            cast = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
        else:
            cast = getattr(torch, dtype)
        tensors[name] = tensors[name].to(cast)
    return Mutation(fx.rebuild(v, tensors), f"tensors cast to {dtype}")


@kind("missing_file")
def _missing(rng, fx, v):
    return Mutation(None, "no file at the path", layout="missing")


@kind("directory")
def _directory(rng, fx, v):
    return Mutation(None, "the path is a folder without adapter.safetensors", layout="dir")


@kind("empty_file")
def _empty(rng, fx, v):
    return Mutation(b"", "0 bytes")


@kind("not_safetensors")
def _not_safetensors(rng, fx, v):
    import gzip

    import torch

    what = rng.choice(["text", "random", "pickle", "gzip", "json", "png", "zeros"])
    if what == "text":
        data = b"this is not an adapter\n" * rng.randint(1, 50)
    elif what == "random":
        data = rng.randbytes(rng.randint(1, 4096))
    elif what == "pickle":
        buf = io.BytesIO()
        torch.save(fx.adapters[v].tensors, buf)
        data = buf.getvalue()
    elif what == "gzip":
        data = gzip.compress(fx.files[v])
    elif what == "json":
        data = json.dumps(fx.metadata[v]).encode()
    elif what == "png":
        data = b"\x89PNG\r\n\x1a\n" + rng.randbytes(64)
    else:
        data = bytes(rng.randint(1, 4096))
    return Mutation(data, f"not a safetensors file: {what} ({len(data)} bytes)")


@kind("truncate")
def _truncate(rng, fx, v):
    data = fx.files[v]
    length = split_file(data)[0]
    region = rng.choice(["data", "header", "length"])
    if region == "data":
        cut = rng.randrange(8 + length, len(data))
    elif region == "header":
        cut = rng.randrange(8, 8 + length)
    else:
        cut = rng.randrange(1, 8)
    return Mutation(data[:cut], f"truncated at byte {cut} of {len(data)} (in the {region})")


@kind("header_length_too_large")
def _length_large(rng, fx, v):
    data = fx.files[v]
    length = split_file(data)[0]
    value = rng.choice([len(data), len(data) + 1, len(data) - 7, length + 8 * rng.randint(1, 64),
                        2**32 + 8, 100 * 2**20 + 8, 2**63, 2**64 - 1])
    return Mutation(with_length(data, value), f"header length {value} (file {len(data)} bytes, header {length})")


@kind("header_length_too_small")
def _length_small(rng, fx, v):
    data = fx.files[v]
    length = split_file(data)[0]
    value = rng.choice([length - 8, 0, 1, rng.randrange(0, length)])
    return Mutation(with_length(data, value), f"header length {value} (true {length})")


@kind("flip_length_field")
def _flip_length(rng, fx, v):
    data = fx.files[v]
    positions = rng.sample(range(8), rng.randint(1, 3))
    masks = [1 << rng.randrange(8) for _ in positions]
    return Mutation(flip(data, positions, masks), f"bits flipped in the length field at {positions}")


@kind("flip_header")
def _flip_header(rng, fx, v):
    data = fx.files[v]
    length = split_file(data)[0]
    count = rng.randint(1, 4)
    positions = [rng.randrange(8, 8 + length) for _ in range(count)]
    masks = [rng.choice([0xFF, 1 << rng.randrange(8), rng.randrange(1, 256)]) for _ in positions]
    return Mutation(flip(data, positions, masks), f"header bytes flipped at {positions} with {masks}")


@kind("flip_data")
def _flip_data(rng, fx, v):
    data = fx.files[v]
    length = split_file(data)[0]
    start = 8 + length
    count = rng.randint(1, 8)
    positions = [rng.randrange(start, len(data)) for _ in range(count)]
    masks = [rng.choice([1 << rng.randrange(8), 0xFF, rng.randrange(1, 256)]) for _ in positions]
    return Mutation(flip(data, positions, masks), f"data bytes flipped at {positions} with {masks}")


@kind("hostile_header_json")
def _hostile_header(rng, fx, v):
    data = fx.files[v]
    _, header_bytes, body = split_file(data)
    header = json.loads(header_bytes)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    what = rng.choice(["not_object", "dtype", "shape", "offsets", "metadata_not_strings", "metadata_nested",
                       "unknown_entry", "drop_entry", "duplicate_key", "bad_utf8", "nul", "trailing_garbage"])
    note = what
    if what == "not_object":
        return Mutation(assemble(rng.choice([[], "header", 1, None, [header]]), body), "header is not an object")
    if what == "dtype":
        entry["dtype"] = rng.choice(["F99", "", 5, None, "I32", "U8", "F16", "f32", "BOOL", "F64", "C64"])
        note = f"{name} dtype {entry['dtype']!r}"
    elif what == "shape":
        entry["shape"] = rng.choice([[-1, 4], [2**62, 2**62], [], "x", [1.5], [0], [2**64], None,
                                     list(reversed(entry["shape"])), entry["shape"] + [1]])
        note = f"{name} shape {entry['shape']!r}"
    elif what == "offsets":
        lo, hi = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[0, 2**63], [hi, lo], [lo, lo], [lo, len(body) + 4], [-4, hi],
                                            [lo + 1, hi + 1], [0, hi - lo], [lo], None, "0-4"])
        note = f"{name} data_offsets {entry['data_offsets']!r}"
    elif what == "metadata_not_strings":
        header["__metadata__"] = dict(header["__metadata__"], format_version=rng.choice([1, None, [1], {"v": 1}]))
    elif what == "metadata_nested":
        depth = rng.choice([200, 10000])
        text = json.dumps(header, separators=(",", ":")).replace(
            '"__metadata__":{', '"__metadata__":{"deep":' + nested(depth, "object", '"x"') + ",", 1)
        return Mutation(assemble(text, body), f"metadata nested {depth} deep")
    elif what == "unknown_entry":
        header["zzz.weight"] = rng.choice([{"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]},
                                           {}, "x", {"dtype": "F32"}])
    elif what == "drop_entry":
        del header[name]
        note = f"entry {name} removed (its bytes stay)"
    elif what == "duplicate_key":
        text = json.dumps(header, separators=(",", ":"))
        dup = json.dumps({name: entry}, separators=(",", ":"))[1:-1]
        return Mutation(assemble(text[:-1] + "," + dup + "}", body), f"entry {name} twice")
    elif what == "bad_utf8":
        raw = json.dumps(header, separators=(",", ":")).encode().replace(b"created_by", b"created\xff\xfeby", 1)
        return Mutation(assemble(raw, body), "invalid UTF-8 in the header")
    elif what == "nul":
        raw = json.dumps(header, separators=(",", ":")).encode()
        pos = rng.randrange(1, len(raw))
        return Mutation(assemble(raw[:pos] + b"\x00" + raw[pos:], body), f"NUL byte at {pos}")
    else:
        raw = json.dumps(header, separators=(",", ":")) + rng.choice(["x", "}", ",{}", "[]"])
        return Mutation(assemble(raw, body), "garbage after the header object")
    return Mutation(assemble(header, body), note)


@kind("metadata_missing")
def _metadata_missing(rng, fx, v):
    what = rng.choice(["all", "format", "format_version", "config", "base_fingerprint", "created_by", "empty"])
    if what == "all":
        return Mutation(fx.rebuild(v, drop_metadata=True), "no __metadata__")
    if what == "empty":
        return Mutation(fx.rebuild(v, metadata={}), "empty __metadata__")
    return Mutation(fx.with_metadata(v, **{what: None}), f"metadata key {what!r} removed")


@kind("format_wrong")
def _format_wrong(rng, fx, v):
    value = rng.choice(["something-else", "", "samed_adapter", "SAMED-ADAPTER", "samed-adapter ", "peft",
                        "samed-adapter\x00", "x" * 2**20])
    return Mutation(fx.with_metadata(v, format=value), f"format {value[:40]!r}")


@kind("format_version_wrong")
def _version_wrong(rng, fx, v):
    value = rng.choice(["3", "0", "1.0", " 1", "1 ", "", "01", "+1", "\u0661", "99999999999999999999999", "v1", "-1"])
    return Mutation(fx.with_metadata(v, format_version=value), f"format_version {value!r}")


@kind("fingerprint_other")
def _fingerprint_other(rng, fx, v):
    value = "sha256:" + rng.choice(["0" * 64, rng.randbytes(32).hex(), "", "zz", "x" * 10000])
    return Mutation(fx.with_metadata(v, base_fingerprint=value), f"base_fingerprint {value[:30]!r}...")


@kind("fingerprint_malformed")
def _fingerprint_malformed(rng, fx, v):
    good = fx.metadata[v]["base_fingerprint"]
    value = rng.choice(["", good.upper(), good[len("sha256:"):], "md5:" + "0" * 32, "sha256", " " + good])
    return Mutation(fx.with_metadata(v, base_fingerprint=value), f"base_fingerprint {value[:30]!r}")


@kind("backbone_wrong")
def _backbone_wrong(rng, fx, v):
    value = rng.choice(["vit_b", "vit_l", "vit_h", "", "Tiny", "tiny ", "custom_64x2x2", "tiny\x00", "x" * 100000])
    return Mutation(fx.with_config(v, backbone=value), f"backbone {value[:30]!r}")


@kind("other_backbone_file")
def _other_backbone(rng, fx, v):
    meta = dict(fx.other_metadata)
    config = json.loads(meta["config"])
    what = rng.choice(["as_made", "backbone_none", "backbone_tiny", "backbone_tiny_and_our_fingerprint"])
    if what != "as_made":
        config["backbone"] = None if what == "backbone_none" else "tiny"
    if what == "backbone_tiny_and_our_fingerprint":
        meta["base_fingerprint"] = fx.metadata[v]["base_fingerprint"]
    meta["config"] = json.dumps(config)
    return Mutation(st_save(fx.other_tensors, meta), f"adapter of a 32-dim SAM, {what}")


@kind("config_not_json")
def _config_not_json(rng, fx, v):
    text = fx.metadata[v]["config"]
    value = rng.choice(["{not json", "", "{", "null", "[]", '"config"', "3", "{'num_classes': 3}",
                        text[: rng.randrange(1, len(text))], text + "}", rng.randbytes(32).hex()])
    return Mutation(fx.with_config_text(v, value), f"config {value[:40]!r}")


@kind("config_deep_nesting")
def _config_deep(rng, fx, v):
    depth = rng.choice([100000, 1000, 5000, 10**6])
    shape = rng.choice(["list", "object"])
    where = rng.choice(["whole", "num_classes", "class_names", "unknown", "pixel_mean", "lora_blocks"])
    if where == "whole":
        text = nested(depth, shape)
    else:
        config = dict(fx.config[v])
        config[where if where != "unknown" else "zzz"] = "@@DEEP@@"
        text = json.dumps(config).replace('"@@DEEP@@"', nested(depth, shape))
    return Mutation(fx.with_config_text(v, text), f"{shape} nested {depth} deep at {where}")


@kind("config_huge_string")
def _config_huge(rng, fx, v):
    size = rng.choice([2**20, 4 * 2**20, 16 * 2**20])
    where = rng.choice(["class_name", "backbone", "unknown_key", "num_classes_digits", "created_by",
                        "lora_scale_digits"])
    s = "x" * size
    if where == "class_name":
        return Mutation(fx.with_config(v, class_names=[s, "b", "c"]), f"a {size}-char class name")
    if where == "backbone":
        return Mutation(fx.with_config(v, backbone=s), f"a {size}-char backbone")
    if where == "unknown_key":
        return Mutation(fx.with_config(v, **{s: 1}), f"a {size}-char unknown field")
    if where == "created_by":
        return Mutation(fx.with_metadata(v, created_by=s), f"a {size}-char created_by")
    config = json.dumps(fx.config[v])
    field = "num_classes" if where == "num_classes_digits" else "lora_scale"
    text = config.replace(f'"{field}": {fx.config[v][field]}', f'"{field}": 1' + "0" * size, 1)
    return Mutation(fx.with_config_text(v, text), f"{field} with {size} digits")


# (field, value) pairs of the wrong type; some are accepted by design (e.g. lora_scale true is 1.0).
WRONG_TYPES = [
    ("num_classes", "3"), ("num_classes", 3.0), ("num_classes", None), ("num_classes", [3]), ("num_classes", True),
    ("rank", "4"), ("rank", 4.0), ("rank", None), ("rank", True),
    ("image_size", "128"), ("image_size", 128.0), ("image_size", None), ("image_size", [128]),
    ("lora_scale", "1"), ("lora_scale", None), ("lora_scale", [1]), ("lora_scale", True),
    ("lora_blocks", 5), ("lora_blocks", "ab"), ("lora_blocks", [0.5]), ("lora_blocks", [-1]), ("lora_blocks", [0, 0]),
    ("lora_blocks", {}), ("lora_blocks", []), ("lora_blocks", [True]),
    ("class_names", 5), ("class_names", True), ("class_names", "abc"), ("class_names", {"a": 1}),
    ("pixel_mean", "abc"), ("pixel_mean", 1), ("pixel_mean", [1, 2]), ("pixel_mean", None), ("pixel_mean", [[1], 2, 3]),
    ("pixel_std", [0, 1, 1]), ("pixel_std", [-1, 1, 1]),
    ("intensity_window", 5), ("intensity_window", [1]), ("intensity_window", [1, 2, 3]),
    ("intensity_window", ["a", "b"]),
    ("intensity_window", {}), ("intensity_window", [2, 1]), ("intensity_window", [1, 1]),
    ("intensity_percentiles", 5), ("intensity_percentiles", [1]), ("intensity_percentiles", [-1, 50]),
    ("intensity_percentiles", [99, 1]), ("intensity_percentiles", ["a", "b"]), ("intensity_percentiles", [1, 101]),
    ("orientation", 5), ("orientation", "LRS"), ("orientation", ["L", "P"]), ("orientation", {"L": 1}),
    ("orientation", "XYZ"), ("orientation", [1, 2, 3]), ("orientation", "L" * 4096),
    ("slice_axis", 3), ("slice_axis", -1), ("slice_axis", "2"), ("slice_axis", True), ("slice_axis", None),
    ("slice_axis", 2.0),
    ("decoder_lora", "yes"), ("decoder_lora", None), ("decoder_lora", [1]),
    ("backbone", 5), ("backbone", []), ("backbone", {}), ("backbone", True),
    ("decoder_lora_rank", "4"), ("decoder_lora_rank", 0), ("decoder_lora_rank", -1), ("decoder_lora_rank", None),
]


@kind("config_wrong_types")
def _config_types(rng, fx, v):
    field, value = rng.choice(WRONG_TYPES)
    return Mutation(fx.with_config(v, **{field: value}), f"{field} = {value!r}")


@kind("config_unknown_field")
def _config_unknown(rng, fx, v):
    key = rng.choice(["colour", "", "num_classes ", "NUM_CLASSES", "__class__", "__init__", "self", "\u00fc"])
    return Mutation(fx.with_config(v, **{key: rng.choice([1, None, "x", [], {}])}), f"unknown field {key!r}")


@kind("config_field_missing")
def _config_missing(rng, fx, v):
    fields = sorted(fx.config[v])
    drop = rng.sample(fields, rng.randint(1, 3))
    return Mutation(fx.with_config(v, **{k: _DROP for k in drop}), f"config fields {drop} removed")


@kind("config_nan")
def _config_nan(rng, fx, v):
    value = rng.choice(["NaN", "Infinity", "-Infinity"])
    where = rng.choice(["lora_scale", "pixel_mean", "pixel_std", "intensity_window", "num_classes", "image_size",
                        "rank", "intensity_window_both"])
    config = dict(fx.config[v])
    if where in ("pixel_mean", "pixel_std", "intensity_window"):
        config[where] = list(config[where])
        config[where][rng.randrange(len(config[where]))] = "@@X@@"
    elif where == "intensity_window_both":
        config["intensity_window"] = ["@@X@@", "@@X@@"]
    else:
        config[where] = "@@X@@"
    text = json.dumps(config).replace('"@@X@@"', value)
    return Mutation(fx.with_config_text(v, text), f"{where} holds {value}")


@kind("num_classes_bad")
def _num_classes_bad(rng, fx, v):
    value = rng.choice([0, -1, -3, -(2**63), -(10**30)])
    return Mutation(fx.with_config(v, num_classes=value, class_names=None), f"num_classes {value}")


@kind("num_classes_huge")
def _num_classes_huge(rng, fx, v):
    value = rng.choice([10**9, 2**31 - 1, 2**63, 10**30])
    return Mutation(fx.with_config(v, num_classes=value, class_names=None), f"num_classes {value}, no class_names")


@kind("num_classes_mismatch")
def _num_classes_mismatch(rng, fx, v):
    value = rng.choice([4, 1, 2, 5, 8, 16, 254, 255, 1000])
    return Mutation(fx.with_config(v, num_classes=value, class_names=[f"c{i}" for i in range(value)]),
                    f"num_classes {value} with {value} names; the file has 3 classes")


@kind("class_names_wrong_length")
def _class_names_length(rng, fx, v):
    count = rng.choice([2, 0, 1, 4, 100])
    return Mutation(fx.with_config(v, class_names=[f"n{i}" for i in range(count)]),
                    f"{count} class names for 3 classes")


@kind("image_size_bad")
def _image_size_bad(rng, fx, v):
    value = rng.choice([0, -16, 8, 15, 17, 100, 127, 1, -(2**63)])
    return Mutation(fx.with_config(v, image_size=value), f"image_size {value}")


@kind("image_size_huge")
def _image_size_huge(rng, fx, v):
    value = rng.choice([16 * 10**6, 2**40, 16 * 2**20, 2**64])
    return Mutation(fx.with_config(v, image_size=value), f"image_size {value}")


@kind("image_size_other")
def _image_size_other(rng, fx, v):
    value = rng.choice([64, 32, 16, 96, 256])
    return Mutation(fx.with_config(v, image_size=value), f"image_size {value} (valid)")


@kind("lora_scale_extreme")
def _lora_scale(rng, fx, v):
    value = rng.choice([1e300, 0.0, -1.0, 1e-45, 1e30, 3.4e38, -1e300])
    return Mutation(fx.with_config(v, lora_scale=value), f"lora_scale {value!r}")


@kind("dtype_wrong")
def _dtype_wrong(rng, fx, v):
    dtype = rng.choice(fx.bad_dtypes)
    tensors = fx.tensors(v)
    names = sorted(tensors) if rng.random() < 0.3 else rng.sample(sorted(tensors), rng.randint(1, 3))
    for name in names:
        tensors[name] = tensors[name].to(dtype)
    return Mutation(fx.rebuild(v, tensors), f"{len(names)} tensors as {dtype} (e.g. {names[0]})")


@kind("shape_wrong")
def _shape_wrong(rng, fx, v):
    import torch

    tensors = fx.tensors(v)
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    how = rng.choice(["transpose", "unsqueeze", "flatten", "scalar", "empty", "doubled", "drop_row", "rank_plus_one"])
    if how == "transpose":
        new = t.t() if t.dim() == 2 else t.flip(0).unsqueeze(-1)
    elif how == "unsqueeze":
        new = t.unsqueeze(0)
    elif how == "flatten":
        new = t.reshape(-1)
    elif how == "scalar":
        new = t.reshape(-1)[0]
    elif how == "empty":
        new = t.new_zeros((0,) + tuple(t.shape[1:]))
    elif how == "doubled":
        new = torch.cat([t, t])
    elif how == "drop_row":
        new = t[1:] if t.shape and t.shape[0] > 1 else t.new_zeros((0,))
    else:
        new = torch.cat([t, t[:1]])
    tensors[name] = new.contiguous()
    return Mutation(fx.rebuild(v, tensors), f"{name} {tuple(t.shape)} -> {tuple(new.shape)} ({how})")


@kind("tensor_missing")
def _tensor_missing(rng, fx, v):
    tensors = fx.tensors(v)
    names = sorted(tensors)
    what = rng.choice(["one_required", "one", "some", "all", "all_delta", "all_lora"])
    if what == "one_required":
        drop = [rng.choice([n for n in names if not n.startswith("delta.")])]
    elif what == "one":
        drop = [rng.choice(names)]
    elif what == "some":
        drop = rng.sample(names, rng.randint(2, len(names) - 1))
    elif what == "all":
        drop = names
    elif what == "all_delta":
        drop = [n for n in names if n.startswith("delta.")]
    else:
        drop = [n for n in names if ".lora_" in n]
    for name in drop:
        del tensors[name]
    return Mutation(fx.rebuild(v, tensors), f"{len(drop)} tensors removed ({what}, e.g. {drop[0] if drop else '-'})")


EXTRA_NAMES = [
    "mask_decoder.unknown.weight", "prompt_encoder.foo", "delta.mask_decoder.bar", "delta.delta.mask_decoder.x",
    "image_encoder.blocks.7.attn.qkv.q.lora_A.weight", "image_encoder.pos_embed", "", "weird name \u00fc",
    "a" * 10000, "mask_decoder.transformer.layers.0.self_attn.q_proj.lora_A.weight", "delta.prompt_encoder.x",
    "mask_decoder..weight", "image_encoder.blocks.-1.attn.qkv.q.lora_A.weight",
]


@kind("tensor_extra")
def _tensor_extra(rng, fx, v):
    import torch

    tensors = fx.tensors(v)
    name = rng.choice(EXTRA_NAMES)
    rank = fx.adapters[v].config.rank
    shape = rng.choice([(rank, 64), (2,), (64, rank), (1, 32)])
    tensors[name] = torch.zeros(shape)
    return Mutation(fx.rebuild(v, tensors), f"extra tensor {name[:60]!r} {shape}")


@kind("non_finite_values")
def _non_finite(rng, fx, v):
    import torch

    tensors = fx.tensors(v)
    name = rng.choice(sorted(tensors))
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    t = tensors[name].to(dtype).clone()
    flat = t.view(-1)
    for _ in range(rng.randint(1, 3)):
        flat[rng.randrange(flat.numel())] = value
    tensors[name] = t
    return Mutation(fx.rebuild(v, tensors), f"{value} in {name} ({dtype})")


@kind("values_extreme")
def _values_extreme(rng, fx, v):
    import torch

    tensors = fx.tensors(v)
    what = rng.choice(["lora_max", "delta_max", "subnormal", "negative_zero", "fp16_max"])
    lora = sorted(n for n in tensors if n.startswith("image_encoder.") and n.endswith(".weight"))
    if what == "lora_max":
        for name in lora[:4]:
            tensors[name] = torch.full_like(tensors[name], 3e38)
    elif what == "delta_max":
        deltas = sorted(n for n in tensors if n.startswith("delta.")) or lora
        tensors[deltas[0]] = torch.full_like(tensors[deltas[0]], 3.4e38)
    elif what == "subnormal":
        for name in lora:
            tensors[name] = torch.full_like(tensors[name], 1e-44)
    elif what == "negative_zero":
        for name in lora:
            tensors[name] = torch.full_like(tensors[name], -0.0)
    else:
        for name in lora[:4]:
            tensors[name] = torch.full_like(tensors[name], 65504.0).half()
    return Mutation(fx.rebuild(v, tensors), what)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    index: int
    kind: str
    variant: str
    target: str
    merge: bool
    mutation: Mutation

    def describe(self) -> str:
        return (f"case {self.index}: {self.kind} of the {self.variant} file ({self.mutation.note}) onto a "
                f"{self.target} SAM, merge={self.merge}")


def make_case(seed: int, index: int, fx: Fixture, kinds: Optional[list[str]] = None) -> Case:
    rng = random.Random(f"samed-fuzz/{seed}/{index}")
    name = rng.choice(kinds or list(KINDS))
    variant = rng.choice(VARIANTS)
    target = rng.choice(TARGETS)
    merge = rng.random() < 0.15
    return Case(index, name, variant, target, merge, mutate(name, rng, fx, variant))


class CaseTimeout(BaseException):
    """Raised by the alarm inside a case that ran past its time limit (a BaseException, so that no
    `except Exception` in the library turns it into an ordinary error)."""


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def state_digest(sam) -> dict[str, str]:
    """A fast fingerprint of everything a failed patch must leave alone: {part: digest}.

    Every state_dict tensor (its dtype, shape and bytes; byte equality is torch.equal for
    finite tensors), the module types, requires_grad flags, the patched config and image size.
    """
    import torch

    from samed_adapter.surgery import get_stock_state

    parts: dict[str, str] = {}
    for name, tensor in sam.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h = hashlib.blake2b(f"{t.dtype}{tuple(tensor.shape)}".encode(), digest_size=16)
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
        parts[name] = h.hexdigest()
    parts["<module types>"] = _digest(f"{n}:{type(m).__module__}.{type(m).__qualname__}"
                                      for n, m in sam.named_modules())
    parts["<requires_grad>"] = _digest(f"{n}:{p.requires_grad}" for n, p in sam.named_parameters())
    stock = get_stock_state(sam)
    parts["<patched config>"] = _digest([stock.config.to_json() if stock is not None else "stock",
                                         str(sam.image_encoder.img_size)])
    return parts


def _digest(items) -> str:
    h = hashlib.blake2b(digest_size=16)
    for item in items:
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()


class Runner:
    """Runs cases in this process, on one reusable tiny SAM per starting state (`TARGETS`).

    A SAM is re-prepared (unpatched, then patched with the valid adapter) only after a case
    changed it, i.e. after a successful patch; its digest is taken once per preparation, and
    compared with a new one only after a failed patch.
    """

    def __init__(self, fx: Fixture, workdir: Path, timeout: Optional[float] = 5.0) -> None:
        self.fx = fx
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.sams: dict = {}  # target -> SAM
        self.clean: set[str] = set()  # targets whose SAM is in its prepared state
        self.before: dict[str, dict[str, str]] = {}  # target -> digest of the prepared state

    def prepare(self, target: str):
        """The SAM of `target`, put (back) in that state if a case changed it."""
        import samed_adapter as sa

        if target in self.clean:
            return self.sams[target]
        sam = self.sams.get(target)
        if sam is None:
            sam = self.sams[target] = sa.build_sam("tiny", seed=0)
        sa.unpatch(sam)
        if target != "stock":
            variant = "decoder" if target == "decoder" else "plain"
            sa.patch(sam, self.fx.adapters[variant], merge=target == "merged")
        self.before[target] = state_digest(sam)
        self.clean.add(target)
        return sam

    def discard(self, target: str) -> None:
        """Forget a SAM whose state is unknown (interrupted, or changed by a failed patch)."""
        self.sams.pop(target, None)
        self.clean.discard(target)

    def materialize(self, case: Case) -> Path:
        """Lay the case out on disk: the mutated file, a folder, or nothing at the path."""
        for old in self.workdir.iterdir():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        path = self.workdir / f"case{case.index}.safetensors"
        if case.mutation.layout == "dir":
            path.mkdir()
        elif case.mutation.layout == "file":
            path.write_bytes(case.mutation.data)
        return path

    def run(self, case: Case) -> dict:
        """Run one case; returns {"outcome", "failed", "message", "seconds"}."""
        import samed_adapter as sa

        sam = self.prepare(case.target)
        path = self.materialize(case)
        arg = str(path) if case.index % 2 else path
        start = time.perf_counter()
        error: Optional[BaseException] = None
        model = None
        try:
            with time_limit(self.timeout):
                model = sa.patch(sam, arg, merge=case.merge)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # CaseTimeout and every other type are classified below
            error = err
        seconds = time.perf_counter() - start
        if isinstance(error, CaseTimeout):
            self.discard(case.target)  # interrupted mid-patch: start again from a fresh SAM
            return _result("hang", True, f"no result within {self.timeout:g} s", seconds)
        if error is None:
            self.clean.discard(case.target)
            return self._check_success(case, sam, model, seconds)
        name = type(error).__name__
        message = _safe_str(error)
        try:
            after = state_digest(sam)
        except Exception as err:  # the failed patch left a SAM that cannot even be read
            self.discard(case.target)
            return _result(f"SAM broken after {name}", True, f"state_dict() raised {type(err).__name__}: "
                           f"{_safe_str(err)[:200]}; {name}: {message[:300]}", seconds)
        before = self.before[case.target]
        changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
        if changed:
            self.discard(case.target)
            return _result(f"SAM changed after {name}", True,
                           f"{len(changed)} parts differ (e.g. {', '.join(changed[:3])}); {name}: {message[:300]}",
                           seconds)
        if not isinstance(error, (sa.AdapterError, FileNotFoundError)):
            return _result(name, True, message[:500], seconds)
        if not message.strip():
            return _result(f"{name} (empty message)", True, "", seconds)
        return _result(name, False, message[:200], seconds)

    def _check_success(self, case: Case, sam, model, seconds: float) -> dict:
        import torch

        import samed_adapter as sa

        if not isinstance(model, sa.SAMed) or model.sam is not sam:
            return _result("success without a SAMed model", True, repr(type(model)), seconds)
        k = model.config.num_classes
        if sam.mask_decoder.num_mask_tokens != k + 1:
            return _result("success with the wrong decoder", True,
                           f"{sam.mask_decoder.num_mask_tokens} mask tokens for K={k}", seconds)
        size = model.config.image_size
        if case.index % 10 == 0 and size <= 256:
            try:
                with torch.no_grad():
                    out = model(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(case.index)))
            except Exception as err:
                return _result("success but forward fails", True, f"{type(err).__name__}: {_safe_str(err)[:300]}",
                               seconds)
            if out["masks"].shape != (1, k + 1, size, size):
                return _result("success but wrong output shape", True, str(tuple(out["masks"].shape)), seconds)
        return _result(SUCCESS, False, "", seconds)


def _safe_str(err: BaseException) -> str:
    try:
        return str(err)
    except Exception as inner:  # a message that cannot be formatted is itself a failure of clarity
        return f"<str() raised {type(inner).__name__}>"


def _result(outcome: str, failed: bool, message: str, seconds: float) -> dict:
    return {"outcome": outcome, "failed": failed, "message": message, "seconds": round(seconds, 4)}


# --------------------------------------------------------------------------- running many


@dataclass
class Report:
    results: list[dict]  # one per case: index, kind, variant, target, merge, note, outcome, failed, message, seconds
    seconds: float
    rss: dict  # memory figures

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.results if r["failed"]]


def run_in_process(cases: int, seed: int = 0, timeout: Optional[float] = 5.0, kinds: Optional[list[str]] = None,
                   indices: Optional[list[int]] = None, fx: Optional[Fixture] = None) -> Report:
    """Run cases in this process (one SAM); what the tests use."""
    fx = fx or Fixture()
    start = time.perf_counter()
    results = []
    rss = {}
    with tempfile.TemporaryDirectory(prefix="samed-fuzz-") as tmp:
        runner = Runner(fx, Path(tmp), timeout)
        for n, index in enumerate(indices if indices is not None else range(cases)):
            case = make_case(seed, index, fx, kinds)
            results.append(_record(case, runner.run(case)))
            if n == min(100, cases // 10):
                gc.collect()
                rss["start"] = rss_bytes()
    gc.collect()
    rss["end"] = rss_bytes()
    rss.setdefault("start", rss["end"])
    return Report(results, time.perf_counter() - start, rss)


def _record(case: Case, result: dict) -> dict:
    return {"index": case.index, "kind": case.kind, "variant": case.variant, "target": case.target,
            "merge": case.merge, "note": case.mutation.note[:200], **result}


def _worker(seed: int, timeout: float, kinds: Optional[list[str]]) -> None:
    """Subprocess loop: read case indices from stdin, write one JSON line per case to stdout."""
    import warnings

    warnings.simplefilter("ignore")
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the library prints stays off the protocol channel
    fx = Fixture()
    with tempfile.TemporaryDirectory(prefix="samed-fuzz-") as tmp:
        runner = Runner(fx, Path(tmp), timeout)
        out.write(_PROTOCOL + json.dumps({"ready": True, "rss": rss_bytes()}) + "\n")
        out.flush()
        done = 0
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            index = int(line)
            case = make_case(seed, index, fx, kinds)
            out.write(_PROTOCOL + json.dumps({"begin": index, "kind": case.kind, "variant": case.variant,
                                               "target": case.target, "merge": case.merge,
                                               "note": case.mutation.note[:200]}) + "\n")
            out.flush()
            result = _record(case, runner.run(case))
            done += 1
            if done % 50 == 0:
                gc.collect()
            result["rss"] = rss_bytes()
            out.write(_PROTOCOL + json.dumps({"end": index, **result}) + "\n")
            out.flush()


class _Worker:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, bufsize=1)
        self.buffer = ""
        self.ready = False
        self.current: Optional[dict] = None  # the "begin" message of the case in flight
        self.sent_at = 0.0
        self.first_rss: Optional[int] = None  # after case 100 (warm-up over)
        self.rss_1000: Optional[int] = None
        self.last_rss = 0
        self.max_rss = 0
        self.cases = 0

    def send(self, index: int) -> None:
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()
        self.sent_at = time.monotonic()
        self.current = {"begin": index}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_workers(cases: int, seed: int, workers: int, timeout: float, hard_timeout: float, max_rss: int,
                kinds: Optional[list[str]], progress: bool = True) -> Report:
    """Run cases in `workers` subprocesses; a worker that hangs, crashes or grows too big is replaced."""
    args = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed), "--timeout", str(timeout)]
    if kinds:
        args += ["--kinds", ",".join(kinds)]
    start = time.perf_counter()
    queue = list(range(cases))[::-1]
    results: list[dict] = []
    lifetimes: list[dict] = []
    sel = selectors.DefaultSelector()
    pool: list[_Worker] = []
    logs = Path(tempfile.mkdtemp(prefix="samed-fuzz-logs-"))
    spawned = [0]

    def spawn() -> None:
        spawned[0] += 1
        w = _Worker(args, logs / f"worker{spawned[0]}.log")
        os.set_blocking(w.proc.stdout.fileno(), False)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        pool.append(w)

    def retire(w: _Worker, outcome: Optional[str], message: str) -> None:
        if outcome is not None and w.current is not None:
            c = w.current
            results.append({"index": c["begin"], "kind": c.get("kind", "?"), "variant": c.get("variant", "?"),
                            "target": c.get("target", "?"), "merge": c.get("merge"), "note": c.get("note", ""),
                            "outcome": outcome, "failed": True, "message": message,
                            "seconds": round(time.monotonic() - w.sent_at, 3)})
        sel.unregister(w.proc.stdout)
        w.kill()
        pool.remove(w)
        lifetimes.append({"cases": w.cases, "first_rss": w.first_rss, "rss_1000": w.rss_1000, "last_rss": w.last_rss,
                          "max_rss": w.max_rss})

    for _ in range(max(1, min(workers, cases))):
        spawn()
    last_print = time.monotonic()
    while queue or any(w.current is not None for w in pool):
        for key, _ in sel.select(timeout=0.05):
            w: _Worker = key.data
            try:
                chunk = w.proc.stdout.read()
            except (BlockingIOError, ValueError):
                chunk = None
            if chunk:
                w.buffer += chunk
            while "\n" in w.buffer:
                line, w.buffer = w.buffer.split("\n", 1)
                if not line.startswith(_PROTOCOL):
                    continue
                msg = json.loads(line[len(_PROTOCOL):])
                if msg.get("ready"):
                    w.ready = True
                elif "begin" in msg:
                    w.current = msg
                elif "end" in msg:
                    rss = msg.pop("rss", 0)
                    msg["index"] = msg.pop("end")
                    results.append(msg)
                    w.current = None
                    w.cases += 1
                    w.last_rss, w.max_rss = rss, max(w.max_rss, rss)
                    if w.cases == 100:
                        w.first_rss = rss
                    elif w.cases == 1000:
                        w.rss_1000 = rss
        now = time.monotonic()
        for w in list(pool):
            if w.current is not None:
                if w.proc.poll() is not None:
                    retire(w, "crash", f"worker exited with code {w.proc.returncode}")
                elif now - w.sent_at > hard_timeout:
                    retire(w, "hang", f"no result within {hard_timeout:g} s (killed)")
                elif _rss_of(w.proc.pid) > max_rss:
                    retire(w, "memory", f"worker RSS over {max_rss / 2**20:.0f} MiB (killed)")
            elif w.proc.poll() is not None:
                if not w.ready:
                    tail = w.log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"a fuzz worker failed to start (exit code {w.proc.returncode}):\n{tail}")
                retire(w, None, "")
        while queue and len(pool) < workers:
            spawn()
        for w in pool:
            if w.ready and w.current is None and queue:
                w.send(queue.pop())
        if progress and now - last_print > 30:
            last_print = now
            failed = sum(r["failed"] for r in results)
            print(f"  ... {len(results)}/{cases} cases, {failed} failures, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    for w in list(pool):
        retire(w, None, "")
    shutil.rmtree(logs, ignore_errors=True)
    results.sort(key=lambda r: r["index"])
    rss = {"workers": lifetimes}
    return Report(results, time.perf_counter() - start, rss)


# --------------------------------------------------------------------------- reporting


def markdown(report: Report) -> str:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in report.results:
        by_kind[r["kind"]][r["outcome"]] += 1
    ok_columns = [SUCCESS] + [n for n in ALLOWED_NAMES if any(n in c for c in by_kind.values())]
    lines = ["| kind | cases | " + " | ".join(ok_columns) + " | failures |",
             "|---|---:|" + "---:|" * len(ok_columns) + "---|"]
    total: Counter = Counter()
    for name in [k for k in KINDS if k in by_kind] + sorted(set(by_kind) - set(KINDS)):
        counts = by_kind[name]
        total.update(counts)
        failed = {o: n for o, n in counts.items() if o not in ok_columns}
        cells = " | ".join(str(counts.get(c, 0) or "") for c in ok_columns)
        lines.append(f"| {name} | {sum(counts.values())} | " + cells
                     + " | " + (", ".join(f"{o}: {n}" for o, n in sorted(failed.items())) or "0") + " |")
    failed = {o: n for o, n in total.items() if o not in ok_columns}
    lines.append(f"| **all** | **{sum(total.values())}** | " + " | ".join(f"**{total.get(c, 0)}**" for c in ok_columns)
                 + " | **" + (", ".join(f"{o}: {n}" for o, n in sorted(failed.items())) or "0") + "** |")
    return "\n".join(lines)


def failure_examples(report: Report, per_group: int = 2) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in report.failures:
        groups[(r["kind"], r["outcome"])].append(r)
    lines = []
    for (name, outcome), items in sorted(groups.items()):
        lines.append(f"- {name} -> {outcome}: {len(items)} cases, e.g.")
        for r in items[:per_group]:
            lines.append(f"    - case {r['index']} ({r['variant']} file onto a {r['target']} SAM, merge={r['merge']}; "
                         f"{r['note']}): {r['message'][:240]}")
    return "\n".join(lines)


def memory_summary(report: Report) -> str:
    mib = 2**20
    if "workers" in report.rss:
        parts = []
        for i, w in enumerate(report.rss["workers"]):
            if not w["cases"]:
                continue
            line = (f"worker {i}: {w['cases']} cases, RSS at the end {w['last_rss'] / mib:.0f} MiB, "
                    f"max {w['max_rss'] / mib:.0f} MiB")
            if w["first_rss"]:
                line += f"; growth from case 100 to the end {(w['last_rss'] - w['first_rss']) / mib:+.1f} MiB"
            if w["rss_1000"]:
                line += f", from case 1000 to the end {(w['last_rss'] - w['rss_1000']) / mib:+.1f} MiB"
            parts.append(line)
        return "\n".join(parts)
    return (f"RSS {report.rss['start'] / mib:.0f} MiB after warm-up, {report.rss['end'] / mib:.0f} MiB at the end "
            f"({(report.rss['end'] - report.rss['start']) / mib:+.1f} MiB)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="subprocesses (default: one per CPU); 0 runs in this process")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--max-rss-mib", type=float, default=4096, help="a worker above this RSS is killed (a failure)")
    parser.add_argument("--kinds", help="comma-separated mutation kinds to draw from (default: all)")
    parser.add_argument("--exclude-kinds", help="comma-separated mutation kinds to leave out")
    parser.add_argument("--case", type=int, help="run this one case in this process and print it")
    parser.add_argument("--dump", help="with --case: write the mutated file into this folder")
    parser.add_argument("--json", metavar="PATH", help="also write every case's result as JSON lines here")
    parser.add_argument("--list-kinds", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    kinds = args.kinds.split(",") if args.kinds else None
    if args.exclude_kinds:
        kinds = [k for k in (kinds or list(KINDS)) if k not in set(args.exclude_kinds.split(","))]
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    if args.list_kinds:
        print("\n".join(KINDS))
        return 0
    if args.worker:
        _worker(args.seed, args.timeout, kinds)
        return 0
    if args.case is not None:
        fx = Fixture()
        case = make_case(args.seed, args.case, fx, kinds)
        print(case.describe())
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            if case.mutation.data is not None:
                out = Path(args.dump) / f"case{case.index}.safetensors"
                out.write_bytes(case.mutation.data)
                print(f"wrote {out}")
        report = run_in_process(1, args.seed, args.timeout, kinds, indices=[args.case], fx=fx)
        r = report.results[0]
        print(f"-> {r['outcome']}{' (FAILURE)' if r['failed'] else ''} in {r['seconds']} s: {r['message']}")
        return 1 if r["failed"] else 0

    print(f"fuzzing adapter loading: {args.cases} cases, seed {args.seed}, {args.workers} workers, "
          f"{args.timeout:g} s per case, {len(kinds or KINDS)} mutation kinds", flush=True)
    if args.workers > 0:
        report = run_workers(args.cases, args.seed, args.workers, args.timeout, args.timeout + 30,
                             int(args.max_rss_mib * 2**20), kinds)
    else:
        report = run_in_process(args.cases, args.seed, args.timeout, kinds)
    if args.json:
        with open(args.json, "w") as fh:
            for r in report.results:
                fh.write(json.dumps(r) + "\n")
    print()
    print(markdown(report))
    print()
    seconds = [r["seconds"] for r in report.results]
    per_case = report.seconds / max(1, len(seconds)) * 1000
    print(f"{len(report.results)} cases in {report.seconds:.0f} s ({per_case:.1f} ms "
          f"per case wall; slowest case {max(seconds, default=0):.2f} s); {len(report.failures)} failures")
    print(memory_summary(report))
    if report.failures:
        print("\nfailures (rerun one with --case N):")
        print(failure_examples(report))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
