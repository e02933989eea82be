"""Parity of samed_adapter with an independent reference of the published SAMed model.

The reference (tests/reference_samed.py) is written from the spec, not from the library: it
builds the published model on a stock SAM, writes the published .pth checkpoint dict, and runs
the published forward. The library converts that checkpoint, patches the same stock SAM in place,
and must give the same logits; unpatching must give back the stock SAM exactly.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import samed_adapter  # noqa: E402
from samed_adapter import Adapter, UnsafeCheckpointError, build_sam, convert_published, patch, unpatch  # noqa: E402
from samed_adapter.testing import assert_unchanged, snapshot  # noqa: E402
from reference_samed import build_reference, reference_forward, save_published  # noqa: E402

TINY_SIZE = 128
REL_TOL = 1e-4  # max |library - reference| <= REL_TOL * max |reference logit|
REL_TOL_FP16 = 2e-2
MIX_UP_MARGIN = 20  # how far beyond REL_TOL a wrong mapping must land
VARIANTS = [(False, 3), (False, 5), (True, 3), (True, 5)]  # (decoder_lora, K)
VARIANT_IDS = [f"{'declora' if d else 'enc'}-K{k}" for d, k in VARIANTS]


# ---------------------------------------------------------------- helpers


def _images(batch: int, size: int, seed: int = 123) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().item()
    assert scale > 1e-3, "degenerate reference logits: the comparison would be meaningless"
    return (actual.float() - expected.float()).abs().max().item() / scale


def _assert_parity(actual: dict, expected: dict, tol: float = REL_TOL, what: str = "") -> float:
    """Compare low_res_logits (and masks, iou_predictions) with relative tolerance; return the ratio."""
    worst = 0.0
    for key in ("low_res_logits", "masks", "iou_predictions"):
        r = _ratio(actual[key], expected[key])
        assert r <= tol, f"{what}: {key} differs from the reference by {r:.3g} x max|logit| (tol {tol:g})"
        worst = max(worst, r)
    print(f"[parity] {what}: max diff / max logit = {worst:.3g}")
    return worst


def _run(model, images: torch.Tensor) -> dict:
    with torch.no_grad():
        return model(images)


def _prompted_stock_forward(sam) -> list:
    """Stock SAM's own prompted forward (points, multimask), on a fixed input."""
    size = sam.image_encoder.img_size
    g = torch.Generator().manual_seed(7)
    image = torch.rand(3, size, size, generator=g) * 255
    batched = [{
        "image": image,
        "original_size": (size, size),
        "point_coords": torch.tensor([[[size * 0.3, size * 0.6], [size * 0.7, size * 0.2]]]),
        "point_labels": torch.tensor([[1, 0]]),
    }]
    with torch.no_grad():
        out = sam(batched, multimask_output=True)
    return [{k: v.clone() for k, v in o.items()} for o in out]


def _assert_same_prompted(after: list, before: list) -> None:
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert sorted(a) == sorted(b)
        for k in b:
            assert torch.equal(a[k], b[k]), f"stock prompted forward output {k!r} changed"


# ---------------------------------------------------------------- tiny references (cached)

_CACHE: dict = {}


def _stock(backbone: str):
    """build_sam(backbone, seed=0), with its position tensors scaled up to a realistic size.

    build_sam draws pos_embed and rel_pos with std 0.02, so small that a wrong resize of them
    (e.g. align_corners=True, or nearest) would stay under the 1e-4 tolerance; at std 0.5 such a
    mistake moves the logits by ~3e-3 of their range (see test_parity_detects_wrong_resize).
    """
    sam = build_sam(backbone, seed=0)
    with torch.no_grad():
        for name, param in sam.image_encoder.named_parameters():
            if name == "pos_embed" or ".rel_pos_" in name:
                param.mul_(25.0)
    return sam


def _tiny_stock():
    return _stock("tiny")


def _tiny_reference(decoder_lora: bool, k: int, seed: int) -> tuple[dict, dict]:
    """(published checkpoint dict, reference outputs on _images(2, 128)) for the tiny stock SAM."""
    key = (decoder_lora, k, seed)
    if key not in _CACHE:
        stock = _tiny_stock()
        ref = build_reference(stock, k, image_size=TINY_SIZE, decoder_lora=decoder_lora, seed=seed)
        published = save_published(ref)
        out = reference_forward(ref, _images(2, TINY_SIZE))
        _CACHE[key] = (published, out)
    return _CACHE[key]


def _convert(published: dict, sam, tmp_path, name: str) -> Adapter:
    path = tmp_path / f"{name}.pth"
    torch.save(published, path)
    return convert_published(path, sam, image_size=TINY_SIZE)


# ---------------------------------------------------------------- the reference is sane


def test_reference_published_layout():
    stock = _tiny_stock()
    ref = build_reference(stock, 5, image_size=TINY_SIZE, decoder_lora=True, seed=1)
    d = save_published(ref)
    depth, dim = 2, 64
    for i in range(2 * depth):
        assert d[f"w_a_{i:03d}"].shape == (4, dim) and d[f"w_b_{i:03d}"].shape == (dim, 4)
        assert d[f"w_b_{i:03d}"].abs().min() > 0  # B is not zero: the bypass is live
    assert d["mask_decoder.mask_tokens.weight"].shape == (6, 32)
    assert d["mask_decoder.iou_prediction_head.layers.2.weight"].shape[0] == 6
    assert not any(k.startswith("mask_decoder.transformer.") for k in d)
    for short in ("sa", "cti", "cit"):
        assert {k for k in d if k.startswith(f"{short}_")} == {f"{short}_{ab}_{i:03d}" for ab in "ab" for i in range(4)}
    assert d["sa_b_000"].shape == (32, 4) and d["cti_b_000"].shape == (16, 4) and d["cti_a_001"].shape == (4, 32)
    assert {k for k in d if k.startswith("fati_")} == {"fati_qa", "fati_qb", "fati_va", "fati_vb"}
    # pos_embed / rel_pos resized from the stock ones (stock 256 input -> grid 16; here grid 8)
    enc = ref.sam.image_encoder
    assert enc.pos_embed.shape == (1, 8, 8, dim)
    assert enc.blocks[1].attn.rel_pos_h.shape == (15, 32) and enc.blocks[0].attn.rel_pos_h.shape == (7, 32)
    assert torch.equal(enc.blocks[0].attn.rel_pos_h, stock.image_encoder.blocks[0].attn.rel_pos_h)
    # the prompt encoder's Gaussian matrix stays stock; the transformer of the variant too
    assert torch.equal(d["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
                       stock.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)
    ref_layer, stock_layer = ref.sam.mask_decoder.transformer.layers[1], stock.mask_decoder.transformer.layers[1]
    assert torch.equal(ref_layer.cross_attn_image_to_token.v_proj.proj.weight,
                       stock_layer.cross_attn_image_to_token.v_proj.weight)
    assert torch.equal(ref_layer.mlp.lin2.weight, stock_layer.mlp.lin2.weight)
    # the LoRA bypass changes the output substantially (so the parity tests can fail)
    out = reference_forward(ref, _images(2, TINY_SIZE))
    for blk in ref.sam.image_encoder.blocks:
        blk.attn.qkv.linear_b_q.weight.data.zero_()
        blk.attn.qkv.linear_b_v.weight.data.zero_()
    no_lora = reference_forward(ref, _images(2, TINY_SIZE))
    assert _ratio(no_lora["low_res_logits"], out["low_res_logits"]) > 1e-2


# ---------------------------------------------------------------- tiny parity


@pytest.mark.parametrize("decoder_lora,k", VARIANTS, ids=VARIANT_IDS)
def test_parity_convert_patch_merge(decoder_lora, k, tmp_path):
    published, expected = _tiny_reference(decoder_lora, k, seed=1)
    sam = _tiny_stock()
    before = snapshot(sam)
    adapter = _convert(published, sam, tmp_path, "a")
    assert_unchanged(sam, before)  # converting leaves the stock SAM alone
    assert adapter.config.num_classes == k and adapter.config.decoder_lora == decoder_lora
    assert adapter.config.rank == 4 and adapter.config.image_size == TINY_SIZE
    # the in-memory dict converts to the same adapter as the file
    from_dict = convert_published(published, sam, image_size=TINY_SIZE)
    assert sorted(from_dict.tensors) == sorted(adapter.tensors)
    assert all(torch.equal(from_dict.tensors[n], adapter.tensors[n]) for n in adapter.tensors)

    model = patch(sam, adapter)
    images = _images(2, TINY_SIZE)
    out = _run(model, images)
    assert out["low_res_logits"].shape == (2, k + 1, 32, 32)
    assert out["masks"].shape == (2, k + 1, TINY_SIZE, TINY_SIZE)
    assert out["iou_predictions"].shape == (2, k + 1)
    _assert_parity(out, expected, what=f"patched {VARIANT_IDS[VARIANTS.index((decoder_lora, k))]}")

    model.merge()
    assert model.merged
    _assert_parity(_run(model, images), expected, what="merged")
    model.unmerge()
    assert not model.merged
    _assert_parity(_run(model, images), expected, what="unmerged")


@pytest.mark.parametrize("decoder_lora,k", VARIANTS, ids=VARIANT_IDS)
def test_parity_hot_swap(decoder_lora, k, tmp_path):
    published1, expected1 = _tiny_reference(decoder_lora, k, seed=1)
    published2, expected2 = _tiny_reference(decoder_lora, k, seed=2)
    other = (not decoder_lora, 8 - k)  # the other variant and the other class count
    published3, expected3 = _tiny_reference(*other, seed=3)
    sam = _tiny_stock()
    before = snapshot(sam)
    prompted = _prompted_stock_forward(sam)
    a1 = _convert(published1, sam, tmp_path, "a1")
    a2 = _convert(published2, sam, tmp_path, "a2")
    images = _images(2, TINY_SIZE)

    model = patch(sam, a1)
    _assert_parity(_run(model, images), expected1, what="adapter 1")
    # converting against an already patched SAM gives the same adapter
    a3 = _convert(published3, sam, tmp_path, "a3")
    a3_stock = _convert(published3, _tiny_stock(), tmp_path, "a3s")
    assert sorted(a3.tensors) == sorted(a3_stock.tensors)
    assert all(torch.equal(a3.tensors[n], a3_stock.tensors[n]) for n in a3.tensors)

    model = patch(sam, a2)
    _assert_parity(_run(model, images), expected2, what="swapped to adapter 2")
    model = patch(sam, a3)
    _assert_parity(_run(model, images), expected3, what="swapped to the other variant")
    model = patch(sam, a1)
    _assert_parity(_run(model, images), expected1, what="swapped back to adapter 1")
    # swapping while merged keeps the model merged and exact
    model.merge()
    model = patch(sam, a2)
    assert model.merged
    _assert_parity(_run(model, images), expected2, what="merged, swapped to adapter 2")
    model = patch(sam, a1)
    _assert_parity(_run(model, images), expected1, what="merged, swapped back to adapter 1")

    unpatch(sam)
    assert_unchanged(sam, before)
    _assert_same_prompted(_prompted_stock_forward(sam), prompted)


@pytest.mark.parametrize("decoder_lora,k", VARIANTS, ids=VARIANT_IDS)
def test_parity_after_safetensors_roundtrip(decoder_lora, k, tmp_path):
    published, expected = _tiny_reference(decoder_lora, k, seed=1)
    converter = _tiny_stock()
    adapter = _convert(published, converter, tmp_path, "a")
    adapter.save(tmp_path / "a32.safetensors")
    adapter.save(tmp_path / "a16.safetensors", dtype=torch.float16)
    images = _images(2, TINY_SIZE)

    loaded32 = Adapter.load(tmp_path / "a32.safetensors")
    assert sorted(loaded32.tensors) == sorted(adapter.tensors)
    assert all(torch.equal(loaded32.tensors[n], adapter.tensors[n]) for n in adapter.tensors)
    assert loaded32.config == adapter.config and loaded32.base_fingerprint == adapter.base_fingerprint
    sam = _tiny_stock()
    _assert_parity(_run(patch(sam, loaded32), images), expected, what="float32 .safetensors")
    # patching straight from the path
    sam_path = _tiny_stock()
    _assert_parity(_run(patch(sam_path, tmp_path / "a32.safetensors"), images), expected, what="patch(path)")

    loaded16 = Adapter.load(tmp_path / "a16.safetensors")
    assert all(t.dtype == torch.float16 for t in loaded16.tensors.values())
    sam16 = _tiny_stock()
    r16 = _assert_parity(_run(patch(sam16, loaded16), images), expected, tol=REL_TOL_FP16, what="float16 .safetensors")
    assert r16 > 0  # it did go through float16
    # hot swap from the float16 adapter to the float32 one is exact again
    _assert_parity(_run(patch(sam16, loaded32), images), expected, what="float16 -> float32 swap")


@pytest.mark.parametrize("decoder_lora,k", VARIANTS, ids=VARIANT_IDS)
def test_unpatch_restores_stock(decoder_lora, k, tmp_path):
    published, _ = _tiny_reference(decoder_lora, k, seed=1)
    sam = _tiny_stock()
    before = snapshot(sam)
    prompted = _prompted_stock_forward(sam)
    adapter = _convert(published, sam, tmp_path, "a")
    model = patch(sam, adapter, merge=True)
    _run(model, _images(2, TINY_SIZE))
    restored = unpatch(sam)
    assert restored is sam
    assert_unchanged(sam, before)
    _assert_same_prompted(_prompted_stock_forward(sam), prompted)
    # and it can be patched again, with the same result as the first time
    _, expected = _tiny_reference(decoder_lora, k, seed=1)
    _assert_parity(_run(patch(sam, adapter), _images(2, TINY_SIZE)), expected, what="re-patched after unpatch")
    unpatch(sam)
    assert_unchanged(sam, before)


def test_parity_detects_wrong_checkpoint_mapping(tmp_path):
    """The comparison is sharp enough: a q/v mix-up or a class-token mix-up is caught, by a margin
    of MIX_UP_MARGIN over the tolerance the parity tests allow (on the tiny random SAM a swap of
    two blocks' decoder LoRA moves the logits by about 0.9 % of their range)."""
    published, expected = _tiny_reference(False, 3, seed=1)
    images = _images(2, TINY_SIZE)
    swapped = dict(published)
    swapped["w_a_000"], swapped["w_a_001"] = published["w_a_001"], published["w_a_000"]
    swapped["w_b_000"], swapped["w_b_001"] = published["w_b_001"], published["w_b_000"]
    sam = _tiny_stock()
    out = _run(patch(sam, _convert(swapped, sam, tmp_path, "qv")), images)
    assert _ratio(out["low_res_logits"], expected["low_res_logits"]) > MIX_UP_MARGIN * REL_TOL

    published_d, expected_d = _tiny_reference(True, 3, seed=1)
    swapped = dict(published_d)
    for ab in "ab":
        swapped[f"sa_{ab}_000"], swapped[f"sa_{ab}_001"] = published_d[f"sa_{ab}_001"], published_d[f"sa_{ab}_000"]
    sam = _tiny_stock()
    out = _run(patch(sam, _convert(swapped, sam, tmp_path, "dec_qv")), images)
    assert _ratio(out["low_res_logits"], expected_d["low_res_logits"]) > MIX_UP_MARGIN * REL_TOL

    rolled = dict(published)
    rolled["mask_decoder.mask_tokens.weight"] = published["mask_decoder.mask_tokens.weight"].roll(1, 0)
    sam = _tiny_stock()
    out = _run(patch(sam, _convert(rolled, sam, tmp_path, "tok")), images)
    assert _ratio(out["low_res_logits"], expected["low_res_logits"]) > MIX_UP_MARGIN * REL_TOL


def test_parity_detects_wrong_resize(monkeypatch):
    """A reference that resized pos_embed / rel_pos with align_corners=True is told apart."""
    import reference_samed

    published, expected = _tiny_reference(False, 3, seed=1)
    real_interpolate = torch.nn.functional.interpolate

    def corners(*args, **kwargs):
        kwargs["align_corners"] = True
        return real_interpolate(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(reference_samed.F, "interpolate", corners)
        ref = build_reference(_tiny_stock(), 3, image_size=TINY_SIZE, seed=1)
    wrong = reference_forward(ref, _images(2, TINY_SIZE))
    assert torch.equal(save_published(ref)["w_b_000"], published["w_b_000"])  # same adapter values
    assert _ratio(wrong["low_res_logits"], expected["low_res_logits"]) > 10 * REL_TOL


# ---------------------------------------------------------------- unsafe checkpoints


class _Pwned:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_published_checkpoint_is_refused(tmp_path, capsys):
    published, _ = _tiny_reference(False, 3, seed=1)
    path = tmp_path / "evil.pth"
    torch.save({**published, "payload": _Pwned()}, path)
    capsys.readouterr()
    with pytest.raises(UnsafeCheckpointError):
        convert_published(path, _tiny_stock(), image_size=TINY_SIZE)
    assert "pwned" not in capsys.readouterr().out
    assert issubclass(samed_adapter.UnsafeCheckpointError, ValueError)


# ---------------------------------------------------------------- real ViT-B shapes


def test_parity_vit_b_real_shapes(tmp_path):
    """ViT-B (random weights), 512 input, K = 8, batch 1, encoder-only: the published setting."""
    size, k = 512, 8
    stock = _stock("vit_b")
    images = _images(1, size, seed=5)
    published, expected = {}, {}
    for seed in (1, 2):
        ref = build_reference(stock, k, image_size=size, seed=seed)
        expected[seed] = reference_forward(ref, images)
        published[seed] = save_published(ref)
        del ref
        gc.collect()
    assert expected[1]["low_res_logits"].shape == (1, 9, 128, 128)
    assert _ratio(expected[2]["low_res_logits"], expected[1]["low_res_logits"]) > 1e-2

    before = snapshot(stock)
    paths = {}
    for seed in (1, 2):
        paths[seed] = tmp_path / f"samed_{seed}.pth"
        torch.save(published[seed], paths[seed])
    del published
    gc.collect()
    a1 = convert_published(paths[1], stock, image_size=size)
    a2 = convert_published(paths[2], stock, image_size=size)
    assert a1.config.num_classes == 8 and a1.config.backbone == "vit_b" and not a1.config.decoder_lora
    assert list(a1.config.class_names) == list(samed_adapter.SYNAPSE_CLASS_NAMES)

    # parameter counts and file sizes against the spec
    encoder_lora = sum(t.numel() for n, t in a1.tensors.items() if n.startswith("image_encoder."))
    decoder = sum(t.numel() for n, t in a1.tensors.items() if "mask_decoder." in n)
    prompt = sum(t.numel() for n, t in a1.tensors.items() if n.startswith("prompt_encoder."))
    assert encoder_lora == 147_456
    assert decoder == 4_759_945
    assert prompt == 6_220  # every trainable prompt-encoder tensor differs from stock here
    assert a1.num_parameters == 147_456 + 6_220 + 4_759_945
    a1.save(tmp_path / "a32.safetensors")
    a1.save(tmp_path / "a16.safetensors", dtype=torch.float16)
    size32 = os.path.getsize(tmp_path / "a32.safetensors")
    size16 = os.path.getsize(tmp_path / "a16.safetensors")
    print(f"[size] float32 {size32 / 2**20:.3f} MiB, float16 {size16 / 2**20:.3f} MiB")
    assert size32 <= 18.8 * 2**20
    assert size16 <= 9.5 * 2**20

    model = patch(stock, a1)
    _assert_parity(_run(model, images), expected[1], what="vit_b patched")
    patched_state = {n: v.clone() for n, v in stock.state_dict().items()}
    model.merge()
    assert model.merged
    merged_state = {n: v.clone() for n, v in stock.state_dict().items()}
    assert any(not torch.equal(merged_state[n], patched_state[n]) for n in patched_state), "merge changed nothing"
    _assert_parity(_run(model, images), expected[1], what="vit_b merged")

    # hot swap while merged, then run: checks the swap and the merged encoder at real shapes
    model = patch(stock, a2)
    assert model.merged
    _assert_parity(_run(model, images), expected[2], what="vit_b swapped to adapter 2 (merged)")
    model = patch(stock, a1)  # and back: the very same tensors as before the swap
    assert model.merged
    state = stock.state_dict()
    assert list(state) == list(merged_state)
    assert all(torch.equal(state[n], merged_state[n]) for n in merged_state), "swapping back is not exact"
    model.unmerge()
    assert not model.merged
    state = stock.state_dict()
    assert list(state) == list(patched_state)
    assert all(torch.equal(state[n], patched_state[n]) for n in patched_state), "unmerge is not exact"
    del patched_state, merged_state, state
    unpatch(stock)
    assert_unchanged(stock, before)
