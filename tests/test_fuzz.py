"""Adapter-loading fuzz: the harness of benchmarks/fuzz_adapter.py, for a few hundred cases.

`samed_adapter.testing.mutations` and `samed_adapter.testing.fuzz` are the one implementation
(mutations, the SAM-state digest, the outcome rules), shared with the script. Every case must
end in a documented error (an AdapterError subclass or a FileNotFoundError with a message, the
SAM unchanged) or in a clean patch.
"""

from __future__ import annotations

import json

import pytest
import torch

import samed_adapter as sa
from samed_adapter.testing import fuzz, fuzz_files, mutations

# Every mutation kind now ends cleanly (the bugs the first 10,000-case run found are fixed).
KNOWN_BUG_KINDS: set[str] = set()

# The representative case of every kind (mutations.FirstChoice takes each mutator's first option)
# and the exact outcome it must have, on a stock SAM and as a hot swap.
EXPECTED = {
    "valid": "success",
    "valid_half_precision": "success",
    "missing_file": "FileNotFoundError",
    "directory": "FileNotFoundError",
    "empty_file": "AdapterFormatError",
    "not_safetensors": "AdapterFormatError",
    "truncate": "AdapterFormatError",
    "header_length_too_large": "AdapterFormatError",
    "header_length_too_small": "AdapterFormatError",
    "flip_length_field": "AdapterFormatError",
    "flip_header": "AdapterFormatError",
    "flip_data": "success",  # the lowest bit of one float: still a valid adapter
    "hostile_header_json": "AdapterFormatError",
    "metadata_missing": "AdapterFormatError",
    "format_wrong": "AdapterFormatError",
    "format_version_wrong": "AdapterFormatError",
    "fingerprint_other": "BaseMismatchError",
    "fingerprint_malformed": "AdapterFormatError",
    "backbone_wrong": "AdapterMismatchError",
    "other_backbone_file": "AdapterMismatchError",
    "config_not_json": "AdapterFormatError",
    "config_deep_nesting": "AdapterFormatError",
    "config_huge_string": "success",  # a 1 MiB class name is a valid (if odd) name
    "config_wrong_types": "AdapterFormatError",
    "config_unknown_field": "AdapterFormatError",
    "config_field_missing": "success",  # no backbone: inferred from the SAM
    "config_nan": "AdapterFormatError",
    "num_classes_bad": "AdapterFormatError",
    "num_classes_huge": "AdapterFormatError",
    "num_classes_mismatch": "AdapterFormatError",
    "class_names_wrong_length": "AdapterFormatError",
    "image_size_bad": "AdapterFormatError",
    "image_size_huge": "AdapterFormatError",
    "image_size_other": "success",
    "lora_scale_extreme": "AdapterFormatError",
    "dtype_wrong": "AdapterFormatError",
    "shape_wrong": "AdapterMismatchError",
    "tensor_missing": "AdapterMismatchError",
    "tensor_extra": "AdapterMismatchError",
    "non_finite_values": "AdapterFormatError",
    "values_extreme": "success",  # LoRA values of 3e38 patch fine unmerged (merged: refused)
}
_BUGGY_REPRESENTATIVES: set[str] = set()


@pytest.fixture(scope="module")
def fx():
    return fuzz_files.Fixture()


@pytest.fixture(scope="module")
def runner(fx, tmp_path_factory):
    return fuzz.Runner(fx, tmp_path_factory.mktemp("fuzz"), timeout=10.0)


def _case(fx, kind: str, target: str, variant: str = "plain", merge: bool = False, index: int = 1):
    # index 1: the success check does not run a forward pass (only every tenth case does)
    return mutations.Case(index, kind, variant, target, merge, mutations.mutate(kind, mutations.FirstChoice(), fx, variant))


def test_every_kind_has_an_expected_outcome():
    assert set(EXPECTED) == set(mutations.KINDS)
    assert KNOWN_BUG_KINDS <= set(mutations.KINDS)


def test_random_cases_end_in_documented_errors_or_clean_patches(fx):
    kinds = [k for k in mutations.KINDS if k not in KNOWN_BUG_KINDS]
    report = fuzz.run_in_process(300, seed=0, timeout=10.0, kinds=kinds, fx=fx)
    assert len(report.results) == 300
    assert report.failures == [], fuzz.failure_examples(report)
    outcomes = {r["outcome"] for r in report.results}
    assert {"success", "AdapterFormatError", "AdapterMismatchError", "BaseMismatchError",
            "FileNotFoundError"} <= outcomes
    assert {r["kind"] for r in report.results} == set(kinds)
    assert {r["target"] for r in report.results} == set(fuzz_files.TARGETS)
    table = fuzz.markdown(report)
    assert "| **all** | **300** |" in table and table.rstrip().endswith("| **0** |")


def test_cases_are_reproducible(fx):
    for index in (3, 77, 1234):
        a, b = mutations.make_case(5, index, fx), mutations.make_case(5, index, fx)
        assert (a.kind, a.variant, a.target, a.merge, a.mutation.note) == (b.kind, b.variant, b.target, b.merge,
                                                                          b.mutation.note)
        assert a.mutation.data == b.mutation.data
    assert [mutations.make_case(5, i, fx).kind for i in range(20)] != [mutations.make_case(6, i, fx).kind for i in range(20)]


@pytest.mark.parametrize("target", ["stock", "decoder"])
@pytest.mark.parametrize("kind", [k for k in mutations.KINDS if k not in _BUGGY_REPRESENTATIVES])
def test_each_mutation_kind_gives_its_exact_outcome(runner, fx, kind, target):
    result = runner.run(_case(fx, kind, target))
    assert result["outcome"] == EXPECTED[kind], result
    assert not result["failed"], result
    if result["outcome"] != "success":
        assert result["message"].strip()


def test_the_harness_catches_undocumented_errors_and_changed_sams(runner, fx, monkeypatch):
    """The failure rules themselves: a raw error, a SAM left changed, a hang."""
    import samed_adapter.patching as patching

    case = _case(fx, "valid", "plain")
    runner.prepare("plain")  # before the library is broken below

    def change_then_fail(sam, stock, adapter):
        with torch.no_grad():
            sam.mask_decoder.mask_tokens.weight.add_(1.0)
        raise KeyError("x")

    monkeypatch.setattr(patching, "load_values", change_then_fail)
    result = runner.run(case)
    assert result["failed"] and result["outcome"] == "SAM changed after KeyError", result
    assert "mask_decoder.mask_tokens.weight" in result["message"]
    monkeypatch.undo()
    runner.prepare("plain")  # the changed SAM was discarded; a fresh one is prepared

    monkeypatch.setattr(sa.Adapter, "load", lambda source: (_ for _ in ()).throw(RuntimeError("raw")))
    result = runner.run(case)
    assert (result["outcome"], result["failed"], result["message"]) == ("RuntimeError", True, "raw")

    monkeypatch.setattr(sa.Adapter, "load", lambda source: (_ for _ in ()).throw(sa.AdapterFormatError("")))
    result = runner.run(case)
    assert (result["outcome"], result["failed"]) == ("AdapterFormatError (empty message)", True)

    def slow(source):
        import time
        time.sleep(5)

    monkeypatch.setattr(sa.Adapter, "load", slow)
    runner.timeout, timeout = 0.5, runner.timeout
    try:
        result = runner.run(case)
    finally:
        runner.timeout = timeout
    assert (result["outcome"], result["failed"]) == ("hang", True), result


def test_header_helpers_build_what_they_say(fx):
    data = fx.files["plain"]
    length, header, body = fuzz_files.split_file(data)
    assert fuzz_files.assemble(json.loads(header), body)[8:].startswith(header.rstrip())
    assert fuzz_files.split_file(fuzz_files.with_length(data, 2**64 - 1))[0] == 2**64 - 1
    assert fuzz_files.flip(b"\x00\x0f", [1], [0xFF]) == b"\x00\xf0"
    assert json.loads(fuzz_files.nested(3)) == [[[3]]]


# --------------------------------------------------------------------------- known bugs


def _run_one(runner, fx, kind, target, *, variant="plain", merge=False, mutation=None, index=1):
    case = _case(fx, kind, target, variant, merge, index)
    if mutation is not None:
        case.mutation = mutation
    return runner.run(case)


def test_huge_num_classes_is_refused_quickly(runner, fx):
    runner.timeout, timeout = 2.0, runner.timeout
    try:
        result = _run_one(runner, fx, "num_classes_huge", "stock")
    finally:
        runner.timeout = timeout
    assert result["outcome"] == "AdapterFormatError", result


@pytest.mark.parametrize("target", ["stock", "merged"])
def test_huge_image_size_is_refused_cleanly(runner, fx, target):
    result = _run_one(runner, fx, "image_size_huge", target)
    assert result["outcome"] in ("AdapterFormatError", "AdapterMismatchError"), result


def test_overflowing_lora_scale_is_refused(runner, fx):
    result = _run_one(runner, fx, "lora_scale_extreme", "stock", index=10)  # index 10: runs a forward pass
    assert result["outcome"] == "AdapterFormatError", result


@pytest.mark.parametrize("kind", ["values_extreme", "lora_scale_extreme"])
def test_overflowing_merge_in_a_swap_leaves_the_sam_as_it_was(runner, fx, kind):
    result = _run_one(runner, fx, kind, "merged")
    assert not result["failed"], result


def test_overflowing_merge_on_a_stock_sam_is_rolled_back(runner, fx):
    """The first patch does restore the SAM (only the error type is wrong)."""
    result = _run_one(runner, fx, "values_extreme", "stock", merge=True)
    assert result["outcome"] == "AdapterFormatError" and "non-finite" in result["message"], result


def test_the_state_digest_sees_one_changed_value(runner):
    sam = runner.prepare("decoder")
    before = fuzz.state_digest(sam)
    with torch.no_grad():
        sam.mask_decoder.mask_tokens.weight[0, 0] += 1e-6
    after = fuzz.state_digest(sam)
    runner.discard("decoder")
    assert [k for k in before if before[k] != after[k]] == ["mask_decoder.mask_tokens.weight"]


def test_an_infinite_intensity_window_is_refused(runner, fx):
    text = json.dumps(dict(fx.config["plain"], intensity_window=[float("-inf"), 275.0]))  # -Infinity in the JSON
    assert "-Infinity" in text
    mutation = mutations.Mutation(fx.with_config_text("plain", text), "intensity_window [-Infinity, 275]")
    result = _run_one(runner, fx, "config_nan", "stock", mutation=mutation)
    assert result["outcome"] == "AdapterFormatError", result


# --------------------------------------------------------------------------- hostile images (issue 20)

# The outcome every image kind must have whatever its random choice; None: ImageReadError or any
# subclass (which one depends on the bytes flipped or cut).
EXPECTED_IMAGES = {
    "valid": "success",
    "valid_gz": "success",
    "huge_dims": "ImageTooLargeError",
    "huge_dims_gz": "ImageTooLargeError",
    "negative_dims": "ImageReadError",
    "zero_dims": "ImageReadError",
    "bad_dim0": "ImageReadError",
    "nan_pixdim": "ImageReadError",
    "zero_pixdim": "success",  # nibabel reads 0 as 1 mm, as it warns
    "nan_sform": "ImageReadError",
    "nan_qform": "ImageReadError",
    "bad_vox_offset": "ImageReadError",
    "bad_vox_offset_gz": None,
    "bad_datatype": "ImageReadError",
    "bad_sizeof_hdr": "ImageReadError",
    "huge_scl_slope": "success",  # finite header, odd values: the intensity window copes
    "truncated": None,
    "header_bytes_flipped": None,
    "gzip_bomb": "ImageReadError",
    "gzip_truncated": "TruncatedImageError",
    "gzip_trailing_garbage": "ImageReadError",
    "gzip_zero_padding": "success",
    "gzip_second_member": "ImageReadError",
    "gzip_bad_crc": "ImageReadError",
    "gzip_not_gzip": "ImageReadError",
    "gzip_flipped": None,
}


def test_every_image_kind_has_an_expected_outcome():
    assert set(EXPECTED_IMAGES) == set(fuzz.IMAGE_KINDS)


def test_hostile_images_end_in_read_errors_with_bounded_memory(tmp_path):
    records = fuzz.run_image_cases(tmp_path, repeats=4)
    assert len(records) == 4 * len(fuzz.IMAGE_KINDS)
    failures = [r for r in records if r["failed"]]
    assert failures == [], failures[:3]
    for r in records:
        expected = EXPECTED_IMAGES[r["kind"]]
        if expected is None:
            assert r["outcome"] in ("success", "ImageReadError", "TruncatedImageError", "ImageTooLargeError"), r
        else:
            assert r["outcome"] == expected, r
        assert r["peak"] < fuzz.IMAGE_MEMORY_BOUND
    bombs = [r for r in records if r["kind"] == "gzip_bomb"]
    # 256 MiB of zeros behind a 864-byte image: stopped after one more byte, not inflated.
    assert all("more data than its header claims (864 bytes)" in r["message"] and r["peak"] < 4 * 2**20 for r in bombs)
    assert not list(tmp_path.iterdir())  # the harness removes its files


def test_the_image_harness_catches_other_exceptions_and_memory(tmp_path, monkeypatch):
    import numpy as np

    import samed_adapter.io as sio

    path = tmp_path / "x.nii"
    path.write_bytes(fuzz._nifti_bytes())

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(sio, "read_image", out_of_memory)
    result = fuzz.run_image_case(path)
    assert result["failed"] and result["outcome"] == "MemoryError"

    def greedy(*args, **kwargs):
        np.ones(fuzz.IMAGE_MEMORY_BOUND + 2**20, dtype=np.uint8)  # traced by tracemalloc

    monkeypatch.setattr(sio, "read_image", greedy)
    result = fuzz.run_image_case(path)
    assert result["failed"] and result["outcome"] == "success" and result["message"].startswith("peak ")
