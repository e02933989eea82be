"""Hot swaps at speed: the zero-copy file reader, the decoder cache, compiled models and mixed
batches across adapter shapes (K, rank, decoder variant)."""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import samed_adapter as sa
from samed_adapter.adapter_file.adapter import AdapterFormatError
from samed_adapter.surgery.structure import MAX_CACHED_DECODERS, get_stock_state
from samed_adapter.adapter_file import tensor_file
from samed_adapter.surgery.packing import back_to_back_runs, flat_view, packed_copy
from samed_adapter.adapter_file.tensor_file import TensorFile, TensorFileError, all_finite, first_nonfinite
from samed_adapter.testing import assert_unchanged, random_adapter, same_tensors, snapshot
from samed_adapter.testing.tiny import CONFIGS, SIZE, images, stock_sam

K1 = dataclasses.replace(CONFIGS["k3"], num_classes=1, class_names=None)
K8 = dataclasses.replace(CONFIGS["k3"], num_classes=8, class_names=None)


def _parse(data: bytes) -> TensorFile:
    return TensorFile.parse(torch.frombuffer(bytearray(data), dtype=torch.uint8))


# ---------------------------------------------------------------- the file reader


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32, torch.bfloat16)])
def test_tensor_file_reads_what_safetensors_reads(dtypes):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}.weight": torch.randn(3 + i, 5, generator=gen).to(dtypes[i % len(dtypes)]) for i in range(7)}
    tensors["empty"] = torch.zeros(0, 4)
    data = safetensors_save(tensors, metadata={"format": "x", "note": "é"})
    file = _parse(data)
    expected = safetensors_load(data)
    assert file.tensors.keys() == expected.keys() and file.metadata == {"format": "x", "note": "é"}
    for name, tensor in expected.items():
        assert file.tensors[name].dtype == tensor.dtype and torch.equal(file.tensors[name], tensor)
    assert file.first_nonfinite() is None
    # the tensors are views of the one buffer: no copy per tensor
    aligned = [t for t in file.tensors.values() if t.numel()]
    assert all(t.untyped_storage().data_ptr() == file.buffer.untyped_storage().data_ptr() for t in aligned)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_tensor_file_finds_the_non_finite_tensor(bad):
    tensors = {"a": torch.ones(4, 4), "b": torch.ones(3), "c": torch.ones(2).half()}
    tensors["b"][1] = bad
    file = _parse(safetensors_save(tensors))
    assert file.first_nonfinite() == "b"
    assert first_nonfinite({"x": torch.ones(2), "y": torch.tensor([1.0, bad])}) == "y"


def test_an_overflowing_sum_of_finite_values_is_still_finite():
    huge = torch.full((8,), 3e38)
    assert not all_finite([huge])  # the fast pass cannot tell ...
    assert first_nonfinite({"huge": huge}) is None  # ... the exact check then decides
    assert _parse(safetensors_save({"huge": huge})).first_nonfinite() is None


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h["a"].update(data_offsets=[0, 12]), "does not fill"),
    (lambda h: h["a"].update(dtype="F99"), "unknown dtype"),
    (lambda h: h["a"].update(shape=[-1]), "non-negative"),
    (lambda h: h["b"].update(data_offsets=[20, 36]), "starts at byte"),
    (lambda h: h.update(c={"dtype": "F32", "shape": [1], "data_offsets": [32, 36]}), "ends at byte"),
    (lambda h: h.update(__metadata__={"k": 1}), "map of strings"),
    (lambda h: h["a"].pop("shape"), "exactly dtype"),
])
def test_tensor_file_refuses_headers_safetensors_refuses(mutate, message):
    import json
    import struct

    data = safetensors_save({"a": torch.ones(4), "b": torch.ones(4)})
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    mutate(header)
    text = json.dumps(header).encode()
    bad = struct.pack("<Q", len(text)) + text + data[8 + length :]
    with pytest.raises(TensorFileError, match=message):
        _parse(bad)
    with pytest.raises(Exception):
        safetensors_load(bad)


def test_loaded_adapters_equal_the_saved_ones_and_nan_files_are_refused(tmp_path):
    adapter = random_adapter(stock_sam(), CONFIGS["decoder_lora"], seed=1)
    for dtype in (None, torch.float16, torch.bfloat16):
        loaded = sa.Adapter.load(adapter.save(tmp_path / "a.safetensors", dtype=dtype))
        assert same_tensors(loaded, adapter.to(dtype=dtype) if dtype else adapter)
    name = "mask_decoder.mask_tokens.weight"
    tensors = dict(adapter.tensors)
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=adapter.metadata())
    with pytest.raises(AdapterFormatError, match=f"{name}.*NaN"):
        sa.Adapter.load(tmp_path / "nan.safetensors")
    with pytest.raises(AdapterFormatError, match="NaN"):
        sa.Adapter(adapter.config, tensors, adapter.base_fingerprint)


def _file_with(tmp_path, tensors, name="t.safetensors"):
    path = tmp_path / name
    path.write_bytes(safetensors_save(tensors))
    return path


@pytest.mark.parametrize("chunk", [64, 1 << 20])  # many chunks per tensor, or one for the whole file
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32, torch.bfloat16)])
def test_reading_a_file_gives_what_safetensors_reads_and_names_the_non_finite_tensor(tmp_path, monkeypatch,
                                                                                     chunk, dtypes):
    monkeypatch.setattr(tensor_file, "_CHUNK_BYTES", chunk)
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(40 + i, 3, generator=gen).to(dtypes[i % len(dtypes)]) for i in range(6)}
    path = _file_with(tmp_path, tensors)
    file = TensorFile.read(path)
    expected = safetensors_load(path.read_bytes())
    assert file.tensors.keys() == expected.keys()
    assert all(torch.equal(file.tensors[k], v) and file.tensors[k].dtype == v.dtype for k, v in expected.items())
    assert file.first_nonfinite() is None
    for name in ("t0", "t5"):  # the first chunk and the last
        bad = {k: v.clone() for k, v in tensors.items()}
        bad[name][-1, -1] = float("nan")
        assert TensorFile.read(_file_with(tmp_path, bad, "bad.safetensors")).first_nonfinite() == name
    huge = TensorFile.read(_file_with(tmp_path, {"huge": torch.full((64,), 3e38)}, "huge.safetensors"))
    assert huge.first_nonfinite() is None  # the chunk sums overflow; the exact check decides


def test_a_read_file_is_a_private_copy_and_its_buffer_is_reused_once_nothing_uses_it(tmp_path):
    tensor_file.read_buffers.clear()
    path = _file_with(tmp_path, {"a": torch.arange(1000.0), "b": torch.ones(10)})
    first = TensorFile.read(path)
    path.write_bytes(safetensors_save({"a": torch.zeros(1000), "b": torch.zeros(10)}))  # rewritten in place
    assert torch.equal(first.tensors["a"], torch.arange(1000.0))
    address = first.buffer.data_ptr()
    kept = first.tensors["b"]  # a view keeps the buffer in use
    del first
    second = TensorFile.read(path)
    assert second.buffer.data_ptr() != address and torch.equal(kept, torch.ones(10))
    del kept
    third = TensorFile.read(path)
    assert third.buffer.data_ptr() == address and torch.equal(third.tensors["a"], torch.zeros(1000))
    assert torch.equal(second.tensors["a"], torch.zeros(1000))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_reusing_a_buffer_does_not_write_into_the_parents_adapter(tmp_path):
    tensor_file.read_buffers.clear()
    kept = TensorFile.read(_file_with(tmp_path, {"a": torch.arange(1000.0)}, "kept.safetensors"))
    other = _file_with(tmp_path, {"a": torch.zeros(1000)}, "other.safetensors")
    pid = os.fork()
    if pid == 0:  # the child lets the adapter go and reads another file into its buffer
        try:
            address = kept.buffer.data_ptr()
            del kept
            reused = TensorFile.read(other)
            os._exit(0 if reused.buffer.data_ptr() == address else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # the child did reuse that memory ...
    assert torch.equal(kept.tensors["a"], torch.arange(1000.0))  # ... its own copy of it


def test_a_hand_made_misaligned_file_is_read_and_checked(tmp_path):
    import json
    import struct

    values = torch.tensor([1.0, 2.0, float("inf")])
    header = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode() + b" "
    assert (8 + len(header)) % 4  # the data starts off a 4-byte boundary
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + values.numpy().tobytes())
    file = TensorFile.read(path)
    assert torch.equal(file.tensors["x"], values) and file.first_nonfinite() == "x"
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(TensorFileError, match="too short"):
        TensorFile.read(tmp_path / "empty.safetensors")


# ---------------------------------------------------------------- the decoder write


def test_back_to_back_runs_join_only_tensors_that_share_memory_in_order():
    base = torch.arange(10.0)
    a, b, c = base[:3], base[3:5], base[5:]
    assert back_to_back_runs([a, b, c]) == [(0, 3)] and torch.equal(flat_view([a, b, c]), base)
    assert back_to_back_runs([a, c, b]) == [(0, 1), (1, 2), (2, 3)]
    assert back_to_back_runs([a, b, c], [a, b, torch.ones(5)]) == [(0, 2), (2, 3)]  # every column must join
    assert back_to_back_runs([base.view(2, 5).t(), torch.ones(2)]) == [(0, 1), (1, 2)]  # not contiguous
    # adjacent in memory but two storages (two allocations as torch sees them): never joined
    import numpy as np

    array = np.arange(8, dtype=np.float32)
    left, right = torch.from_numpy(array[:4]), torch.from_numpy(array[4:])
    assert left.data_ptr() + 16 == right.data_ptr()
    assert back_to_back_runs([left, right]) == [(0, 1), (1, 2)]


def test_packed_copies_keep_keys_and_values():
    tensors = {"z": torch.randn(3, 2), "a": torch.randn(4), "m": torch.ones(2, dtype=torch.float16)}
    packed = packed_copy(tensors)
    assert list(packed) == ["z", "a", "m"]
    assert all(torch.equal(packed[k], v) and packed[k].dtype == v.dtype for k, v in tensors.items())
    assert back_to_back_runs([packed["a"], packed["z"]]) == [(0, 2)]  # laid out in name order
    packed["a"].zero_()
    assert tensors["a"].abs().sum() > 0  # copies


def test_a_file_swap_writes_stock_plus_delta_into_packed_decoder_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from samed_adapter.surgery.structure import stock_decoder_key

    sam = stock_sam()
    sa.patch(sam, random_adapter(stock_sam(), CONFIGS["k3"], seed=2))
    sa.patch(sam, random_adapter(stock_sam(), CONFIGS["k3"], seed=3).save(tmp_path / "a.safetensors"))
    stock = get_stock_state(sam)
    adapter = stock.adapters["default"]
    lives = []
    for name, live in sam.mask_decoder.state_dict(keep_vars=True).items():
        delta = adapter.tensors.get(f"delta.mask_decoder.{stock_decoder_key(name)}")
        if delta is not None:
            assert torch.equal(live, stock.decoder_state[stock_decoder_key(name)] + delta), name
            lives.append((f"delta.mask_decoder.{stock_decoder_key(name)}", live))
    assert len(back_to_back_runs([live for _, live in sorted(lives, key=lambda e: e[0])])) == 1
    state = {k: v.contiguous() for k, v in sam.state_dict().items()}
    save_file(state, str(tmp_path / "sam.safetensors"))  # packed views do not overlap: safetensors saves them
    assert all(torch.equal(v, state[k]) for k, v in load_file(str(tmp_path / "sam.safetensors")).items())


def test_a_swap_between_a_forward_and_its_backward_is_caught_by_autograd(tmp_path):
    paths = [random_adapter(stock_sam(), CONFIGS["k3"], seed=s).save(tmp_path / f"{s}.safetensors") for s in (4, 5)]
    model = sa.patch(stock_sam(), paths[0])
    sa.patch(model, paths[1])  # the write plans are made and the tensors packed
    out = model(images(batch=1, seed=2))
    sa.patch(model, paths[0])  # writes the packed decoder tensors through views of their runs
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out["low_res_logits"].sum().backward()


# ---------------------------------------------------------------- swaps across shapes


def test_swaps_across_shapes_reuse_cached_decoders_and_equal_fresh_patches():
    configs = [CONFIGS["k3"], K8, CONFIGS["decoder_lora"], dataclasses.replace(K1, clicks=True)]
    adapters = [random_adapter(stock_sam(), c, seed=40 + i) for i, c in enumerate(configs)]
    sam = stock_sam()
    model = sa.patch(sam, adapters[0])
    decoders = {}
    x = images(batch=2, seed=5)
    for round_ in range(2):
        for adapter in adapters[1:] + adapters[:1]:
            model = sa.patch(sam, adapter)
            key = adapter.config.num_classes, adapter.config.decoder_lora, adapter.config.clicks
            if round_ == 0:
                decoders[key] = sam.mask_decoder
            else:  # the module built for this structure came back from the cache
                assert sam.mask_decoder is decoders[key]
            with torch.no_grad():
                got = model(x)
                expected = sa.patch(stock_sam(), adapter)(x)
            for name in ("masks", "iou_predictions"):
                torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
            assert same_tensors(model.adapter(), adapter)
    stock = get_stock_state(sam)
    assert len(stock.decoders) == len(configs) - 1 <= MAX_CACHED_DECODERS
    sa.unpatch(sam)
    assert_unchanged(sam, snapshot(stock_sam()))


def test_the_decoder_cache_is_bounded_and_delete_adapter_frees_it():
    sam = stock_sam()
    configs = [dataclasses.replace(CONFIGS["k3"], num_classes=k, class_names=None)
               for k in range(1, MAX_CACHED_DECODERS + 4)]
    adapters = {f"k{c.num_classes}": random_adapter(stock_sam(), c, seed=c.num_classes) for c in configs}
    model = sa.patch(sam, adapters["k1"], adapter_name="k1")
    for name, adapter in adapters.items():
        model.load_adapter(adapter, name)
        model.set_adapter(name)
    stock = get_stock_state(sam)
    assert len(stock.decoders) == MAX_CACHED_DECODERS
    cached = sorted(key[0] for key in stock.decoders)
    assert cached == list(range(len(configs) - MAX_CACHED_DECODERS, len(configs)))  # the newest ones
    for k in cached[:-1]:
        model.delete_adapter(f"k{k}")
    assert sorted(key[0] for key in stock.decoders) == cached[-1:]  # still resident: kept


def test_inject_builds_a_fresh_decoder_not_the_cached_one():
    sam = stock_sam()
    sa.patch(sam, random_adapter(stock_sam(), CONFIGS["k3"], seed=1))
    trained = sam.mask_decoder
    sa.patch(sam, random_adapter(stock_sam(), K8, seed=2))
    model = sa.inject(sam, CONFIGS["k3"])
    assert sam.mask_decoder is not trained
    assert all(p.requires_grad for n, p in sam.mask_decoder.named_parameters())
    assert model.adapter().tensors["image_encoder.blocks.0.attn.qkv.q.lora_B.weight"].abs().sum() == 0


# ---------------------------------------------------------------- mixed batches across shapes


def test_a_mixed_batch_of_a_k1_and_a_k8_adapter_equals_each_image_alone():
    adapters = {
        "liver": random_adapter(stock_sam(), K1, seed=50),
        "synapse": random_adapter(stock_sam(), dataclasses.replace(K8, rank=2), seed=51),
        "variant": random_adapter(stock_sam(), dataclasses.replace(K8, decoder_lora=True, lora_scale=0.5), seed=52),
    }
    sam = stock_sam()
    model = sa.patch(sam, adapters["synapse"], adapter_name="synapse")
    for name in ("liver", "variant"):
        model.load_adapter(adapters[name], name)
    before = snapshot(sam)
    names = ["liver", "synapse", "variant", "liver"]
    x = images(batch=4, seed=6)
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
    assert_unchanged(sam, before)
    assert [t.shape[0] for t in mixed["masks"]] == [2, 9, 9, 2]
    for b, name in enumerate(names):
        with torch.no_grad():
            alone = sa.patch(stock_sam(), adapters[name])(x[b : b + 1])
        for key in ("masks", "low_res_logits", "iou_predictions"):
            torch.testing.assert_close(mixed[key][b], alone[key][0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # adapters of one K keep the batched tensors of a plain forward
        same_k = model(x[:2], adapter_names=["variant", "synapse"])
    assert same_k["masks"].shape == (2, 9, SIZE, SIZE)


def test_a_mixed_batch_refuses_adapters_of_another_image_size():
    model = sa.patch(stock_sam(), random_adapter(stock_sam(), CONFIGS["k3"], seed=1))
    model.load_adapter(random_adapter(stock_sam(), CONFIGS["size_96"], seed=2), "small")
    with pytest.raises(ValueError, match="image_size=96.*one image_size"):
        model(images(batch=2), adapter_names=["small", "default"])


# ---------------------------------------------------------------- compiled models


def test_compiled_swaps_of_lower_ranks_recompile_nothing():
    from torch._dynamo.utils import counters

    ranks = [4, 2, 8, 4, 2, 8]
    adapters = [random_adapter(stock_sam(), dataclasses.replace(CONFIGS["k3"], rank=r), seed=60 + i)
                for i, r in enumerate(ranks)]
    sam = stock_sam()
    model = sa.patch(sam, adapters[0])
    x = images(batch=2, seed=7)
    torch._dynamo.reset()
    model.compile(max_rank=8, backend="aot_eager")
    counters.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", sa.CompiledSwapWarning)
        model(x)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        for adapter in adapters[1:]:
            assert sa.patch(sam, adapter) is model  # patch keeps returning the compiled view
            got = model(x)
            expected = sa.patch(stock_sam(), adapter)(x)
            torch.testing.assert_close(got["masks"], expected["masks"], rtol=1e-5, atol=1e-5)
            assert same_tensors(model.adapter(), adapter)  # the padding is not part of the adapter
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["recompiles"]


def test_a_compiled_swap_that_must_recompile_says_so():
    sam = stock_sam()
    adapters = [random_adapter(stock_sam(), dataclasses.replace(CONFIGS["k3"], rank=r), seed=r) for r in (2, 8)]
    model = sa.patch(sam, adapters[0])
    torch._dynamo.reset()
    model.compile(backend="eager")  # max_rank: the current rank, 2
    with pytest.raises(ValueError, match="max_rank must be an int >= the current adapter's rank 2"):
        model.compile(max_rank=1, backend="eager")
    with pytest.warns(sa.CompiledSwapWarning, match="rank 8 vs compiled max_rank 2"):
        sa.patch(sam, adapters[1])
    with torch.no_grad():
        torch.testing.assert_close(model(images())["masks"], sa.patch(stock_sam(), adapters[1])(images())["masks"])
