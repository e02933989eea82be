"""SDPA attention vs SAM's stock encoder attention, and the reversibility of the switch."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block

import samed_adapter.surgery.attention as attention
from samed_adapter.surgery.attention import (
    disable_sdpa,
    enable_sdpa,
    sdpa_attention_forward,
    sdpa_enabled,
    windowed_block_forward,
)
from samed_adapter.hosts.backbones import build_sam


@pytest.fixture(scope="module")
def sam():
    return build_sam("tiny", seed=0)


def stock_forward(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    return Attention.forward(attn, x)


def grads_of(fn, attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients w.r.t. x, rel_pos_h, rel_pos_w and the qkv weight."""
    x = x.detach().clone().requires_grad_()
    params = [attn.rel_pos_h, attn.rel_pos_w, attn.qkv.weight]
    for p in params:
        p.requires_grad_(True)
    out = fn(attn, x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out.detach(), list(torch.autograd.grad(out, [x, *params], grad))


@pytest.fixture(params=["explicit", "sdpa"])
def scores(request, monkeypatch) -> str:
    """With gradients the CPU takes explicit scores; "sdpa" forces the fused path CUDA takes."""
    if request.param == "sdpa":
        monkeypatch.setattr(attention, "_explicit_scores", lambda *tensors: False)
    return request.param


@pytest.mark.parametrize("block", [0, 1], ids=["windowed", "global"])
@pytest.mark.parametrize("batch", [1, 3])
def test_sdpa_equals_stock(sam, block: int, batch: int, scores: str) -> None:
    blk = sam.image_encoder.blocks[block]
    attn = blk.attn
    # Windowed blocks see (B * windows, ws, ws, C); the global block the whole 16 x 16 grid.
    side = blk.window_size if blk.window_size > 0 else 16
    x = torch.randn(batch, side, side, attn.qkv.in_features, generator=torch.Generator().manual_seed(0))
    ref, ref_grads = grads_of(stock_forward, attn, x)
    out, out_grads = grads_of(sdpa_attention_forward, attn, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["x", "rel_pos_h", "rel_pos_w", "qkv.weight"], out_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_sdpa_with_resized_rel_pos(sam) -> None:
    # A grid whose size differs from the rel_pos length: both paths interpolate it the same way.
    attn = sam.image_encoder.blocks[1].attn
    x = torch.randn(2, 10, 10, attn.qkv.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(sdpa_attention_forward(attn, x), stock_forward(attn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [14, 16, 3], ids=["padded", "whole-windows", "smaller-than-a-window"])
def test_windowed_block_equals_stock(sam, side: int, scores: str) -> None:
    # 14 is not a multiple of the window (4): stock projects 16 x 16 padded tokens and computes
    # 16 x 16 query rows, this path 14 x 14 of each (windows of 4 x 4, 4 x 2, 2 x 4, 2 x 2 queries).
    blk = sam.image_encoder.blocks[0]
    assert blk.window_size == 4
    params = [blk.attn.qkv.weight, blk.attn.qkv.bias, blk.attn.proj.weight, blk.attn.rel_pos_h, blk.norm1.weight]
    x = torch.randn(2, side, side, blk.attn.qkv.in_features, generator=torch.Generator().manual_seed(4))
    results = []
    for forward in (Block.forward, windowed_block_forward):
        xg = x.clone().requires_grad_()
        for p in params:
            p.requires_grad_(True)
        out = forward(blk, xg)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        results.append((out.detach(), torch.autograd.grad(out, [xg, *params], grad)))
    (ref, ref_grads), (out, out_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["x", "qkv.weight", "qkv.bias", "proj.weight", "rel_pos_h", "norm1"], out_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")


def test_cpu_bias_is_built_a_few_heads_at_a_time(sam, monkeypatch) -> None:
    # A budget of one head's bias: every head gets its own SDPA call, and the result is unchanged.
    attn = sam.image_encoder.blocks[1].attn
    x = torch.randn(2, 16, 16, attn.qkv.in_features, generator=torch.Generator().manual_seed(6))
    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[0])
        return sdpa(q, *args, **kwargs)

    with torch.no_grad():
        whole = sdpa_attention_forward(attn, x)
        monkeypatch.setattr(attention, "_CPU_BIAS_CHUNK_BYTES", 256 * 256 * 4)
        monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
        chunked = sdpa_attention_forward(attn, x)
    assert calls == [1] * (2 * attn.num_heads)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_cpu_takes_explicit_scores_only_when_differentiating(sam, monkeypatch) -> None:
    attn = sam.image_encoder.blocks[1].attn
    x = torch.randn(1, 16, 16, attn.qkv.in_features, generator=torch.Generator().manual_seed(7))
    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    sdpa_attention_forward(attn, x.requires_grad_())
    assert calls == []
    with torch.no_grad():
        sdpa_attention_forward(attn, x)
    assert calls


def test_whole_encoder_and_reversibility(sam) -> None:
    model = copy.deepcopy(sam)
    enc = model.image_encoder
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock_out = enc(image)
    assert enable_sdpa(model) == len(enc.blocks)
    assert enable_sdpa(model) == len(enc.blocks)  # idempotent
    assert sdpa_enabled(enc)
    with torch.no_grad():
        sdpa_out = enc(image)
    torch.testing.assert_close(sdpa_out, stock_out, rtol=1e-4, atol=1e-5)
    # Nothing visible to state_dict or module types, while enabled and after.
    for state in (model.state_dict(), None):
        if state is None:
            assert disable_sdpa(model) == len(enc.blocks)
            state = model.state_dict()
        assert list(state) == list(before)
        assert all(torch.equal(state[k], before[k]) for k in before)
        assert [type(m) for m in model.modules()] == types
    assert not sdpa_enabled(enc)
    assert all("forward" not in blk.attn.__dict__ and "forward" not in blk.__dict__ for blk in enc.blocks)
    assert disable_sdpa(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(enc(image), stock_out, rtol=0, atol=0)


def test_enabled_model_copies_and_keeps_foreign_forward(sam) -> None:
    model = copy.deepcopy(sam)
    enable_sdpa(model)
    clone = copy.deepcopy(model)
    block = clone.image_encoder.blocks[0]
    assert sdpa_enabled(clone)
    # Bound to the copy, not the original.
    assert block.attn.forward.args[0] is block.attn and block.forward.args[0] is block
    disable_sdpa(model)
    # Someone else's instance forward is neither replaced nor removed.
    other = model.image_encoder.blocks[0].attn

    def custom(x: torch.Tensor) -> torch.Tensor:
        return x

    other.forward = custom
    assert enable_sdpa(model) == len(model.image_encoder.blocks) - 1
    assert not sdpa_enabled(model)
    assert disable_sdpa(model) == len(model.image_encoder.blocks) - 1
    assert other.forward is custom
    # The same for a windowed block's forward.
    del other.forward
    block = model.image_encoder.blocks[0]
    block.forward = custom
    enable_sdpa(model)
    assert not sdpa_enabled(model) and block.forward is custom
    disable_sdpa(model)
    assert block.forward is custom


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_patched_model_equals_the_cpu(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # On CUDA the patched model runs SDPA, the padding-free windowed blocks and the Triton LoRA
    # kernels; the CPU fp32 run (explicit scores, torch fallback) is the reference. 224 pads the
    # 14 x 14 grid for the 4 x 4 windows.
    import samed_adapter as sa
    from samed_adapter.testing import random_adapter

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    config = sa.AdapterConfig(num_classes=3, image_size=224)
    adapter = random_adapter(build_sam("tiny", seed=0), config, seed=1)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    results = {}
    for device in ("cpu", "cuda"):
        model = sa.patch(build_sam("tiny", seed=0), adapter).to(device).train()
        with torch.autocast("cuda", dtype=dtype, enabled=device == "cuda" and dtype != torch.float32):
            logits = model(x.to(device))["low_res_logits"]
        loss = logits.float().square().mean()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results[device] = (logits.float().cpu(), [None if g is None else g.float().cpu() for g in grads])
    (ref, ref_grads), (out, out_grads) = results["cpu"], results["cuda"]
    # bf16 keeps 8 bits of mantissa; gradients pass through more rounded products than logits.
    tol, grad_tol = (1e-4, 1e-4) if dtype == torch.float32 else (5e-2, 1e-1)
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    for got, want in zip(out_grads, ref_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert (got - want).abs().max() <= grad_tol * want.abs().max().clamp_min(1e-12) + 1e-7
