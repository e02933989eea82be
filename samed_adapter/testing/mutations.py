"""Adapter-file mutations for the loading fuzz: every way of breaking the valid files.

The two valid adapter files (:mod:`.fuzz_files`) are made from a tiny random SAM
(`build_sam("tiny", seed=0)`): the plain one and the decoder-LoRA variant (K = 3, image size
128). A case (`make_case`) takes one of them, applies one mutation (see `KINDS`: truncation,
flipped bytes, a wrong header length, hostile metadata JSON, wrong dtypes/shapes/names, non-finite
values, a wrong version or backbone, ...) and names the SAM it is patched onto. Case i of seed s is drawn from
`random.Random(f"samed-fuzz/{s}/{i}")`, so cases are reproducible. The harness that runs them is
`samed_adapter.testing.fuzz`; the command line is `benchmarks/fuzz_adapter.py`.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Callable, Optional

from .fuzz_files import (DROP, TARGETS, VARIANTS, Fixture, assemble, flip, nested, split_file, st_save,
                         with_length)


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
    return Mutation(fx.with_config(v, **{k: DROP for k in drop}), f"config fields {drop} removed")


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
