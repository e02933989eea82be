"""The fused LoRA-qkv kernels (in Triton's CPU interpreter) and the torch fallback vs a reference.

The interpreter is chosen when a `@triton.jit` function is decorated, so the kernels module is
loaded here as a private copy with TRITON_INTERPRET=1 set only while it is decorated. That works
whatever imported triton earlier in this pytest process (torchvision does), because the kernels
use builtins only (see samed_adapter/kernels/triton_lora_qkv.py), and leaves every other Triton user of
the session (torch.compile, the real kernels on a GPU) in compiled mode.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import pytest
import torch

from samed_adapter import kernels
from samed_adapter.kernels import lora_qkv, lora_qkv_multi, lora_qkv_multi_torch, lora_qkv_torch, row_adapter_index

triton = pytest.importorskip("triton")

KERNELS_FILE = Path(kernels.__file__).with_name("triton_lora_qkv.py")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SCALE = 2.0


@pytest.fixture(scope="module")
def interp() -> ModuleType:
    """A private copy of the Triton kernels module whose kernels run in the interpreter."""
    spec = importlib.util.spec_from_file_location("_samed_lora_qkv_interpreted", KERNELS_FILE)
    module = importlib.util.module_from_spec(spec)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    assert type(module._fwd_kernel).__name__ == "InterpretedFunction"
    return module


def make_inputs(
    n_rows: int, dim: int, rank: int, dtype: torch.dtype, device: str = "cpu", *, n_adapters: Optional[int] = None,
    bias: bool = True, seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """x (N, C), W (3C, C), bias, a_q, b_q, a_v, b_v; bypass and frozen path of similar size."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if n_adapters is None else (n_adapters,)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    x = rand(n_rows, dim)
    weight = rand(3 * dim, dim, std=dim**-0.5)
    b = rand(3 * dim) if bias else None
    lora = [rand(*lead, rank, dim, std=0.3 * dim**-0.5), rand(*lead, dim, rank, std=0.3)]  # a_q, b_q
    lora += [rand(*lead, rank, dim, std=0.3 * dim**-0.5), rand(*lead, dim, rank, std=0.3)]  # a_v, b_v
    return (x, weight, b, *lora)


def reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_q: torch.Tensor, b_q: torch.Tensor,
    a_v: torch.Tensor, b_v: torch.Tensor, scale: float, adapter_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The straightforward formulation (slices of the fused output), per row for several adapters."""
    dim = x.shape[1]
    if adapter_index is not None:
        a_q, b_q, a_v, b_v = (t[adapter_index] for t in (a_q, b_q, a_v, b_v))  # per row
        new_q = torch.einsum("nrc,nc->nr", a_q, x)
        new_q = torch.einsum("ncr,nr->nc", b_q, new_q)
        new_v = torch.einsum("ncr,nr->nc", b_v, torch.einsum("nrc,nc->nr", a_v, x))
    else:
        new_q = (x @ a_q.t()) @ b_q.t()
        new_v = (x @ a_v.t()) @ b_v.t()
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return torch.cat([y[:, :dim] + scale * new_q, y[:, dim : 2 * dim], y[:, 2 * dim :] + scale * new_v], dim=1)


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Max error relative to the largest expected magnitude."""
    assert actual.shape == expected.shape, what
    assert actual.dtype == dtype, what
    err = (actual.double() - expected.double()).abs().max().item()
    size = expected.double().abs().max().item()
    assert err <= TOL[dtype] * max(size, 1e-6), f"{what}: max error {err:.3g} vs magnitude {size:.3g}"


def run_and_compare(
    fn: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]], dtype: torch.dtype,
    grad_of: tuple[int, ...] = (0, 3, 4, 5, 6), **extra: torch.Tensor,
) -> None:
    """fn(*inputs, SCALE, **extra) vs the float64 reference, forward and the gradients of grad_of."""
    leaves = [t.detach().clone().requires_grad_(i in grad_of) if t is not None else None for i, t in enumerate(inputs)]
    y = fn(*leaves, SCALE, **extra)
    ref_leaves = [t.detach().double().requires_grad_(i in grad_of) if t is not None else None
                  for i, t in enumerate(inputs)]
    y_ref = reference(*ref_leaves, SCALE, **extra)
    check(y, y_ref, dtype, "forward")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(y, [leaves[i] for i in grad_of], grad)
    want = torch.autograd.grad(y_ref, [ref_leaves[i] for i in grad_of], grad.double())
    names = ("x", "weight", "bias", "a_q", "b_q", "a_v", "b_v")
    for i, g, w in zip(grad_of, got, want):
        check(g, w, dtype, f"grad {names[i]}")


# ---------------------------------------------------------------- Triton kernels (interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("rank", [4, 8])
def test_kernel_forward_and_grads(interp: ModuleType, dtype: torch.dtype, dim: int, rank: int) -> None:
    # 37 rows: not a multiple of any block size.
    run_and_compare(interp.lora_qkv_triton, make_inputs(37, dim, rank, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_tiles_straddle_thirds(interp: ModuleType, dtype: torch.dtype) -> None:
    # C = 48: 3C = 144 puts tile edges inside the query and value thirds, and the K loop masks.
    run_and_compare(interp.lora_qkv_triton, make_inputs(45, 48, 4, dtype), dtype)


def test_kernel_without_bias_one_row_large_rank(interp: ModuleType) -> None:
    run_and_compare(interp.lora_qkv_triton, make_inputs(1, 64, 4, torch.float32, bias=False), torch.float32)
    # Rank 12 pads 2R = 24 to 32.
    run_and_compare(interp.lora_qkv_triton, make_inputs(20, 64, 12, torch.float32), torch.float32)


def test_kernel_partial_grads(interp: ModuleType) -> None:
    inputs = make_inputs(37, 64, 4, torch.float32)
    run_and_compare(interp.lora_qkv_triton, inputs, torch.float32, grad_of=(4, 6))  # only B: no dX, no dA
    run_and_compare(interp.lora_qkv_triton, inputs, torch.float32, grad_of=(3, 4, 5, 6))  # no dX
    run_and_compare(interp.lora_qkv_triton, inputs, torch.float32, grad_of=(0,))  # dX only


def test_kernel_strided_input_and_grad(interp: ModuleType) -> None:
    x, *rest = make_inputs(37, 64, 4, torch.float32)
    x_t = x.t().contiguous().t()  # column-major view
    leaves = [x_t.requires_grad_(), *[t.requires_grad_() if i >= 2 else t for i, t in enumerate(rest)]]
    y = interp.lora_qkv_triton(*leaves, SCALE)
    check(y, reference(*(t.double() for t in (x, *rest)), SCALE), torch.float32, "forward")
    # An expanded (stride-0) output gradient, as `y.sum()` produces.
    grads = torch.autograd.grad(y.sum(), [leaves[0], *leaves[3:]])
    ref = [t.detach().double().requires_grad_() for t in (x, *rest)]
    want = torch.autograd.grad(reference(*ref, SCALE).sum(), [ref[0], *ref[3:]])
    for g, w in zip(grads, want):
        check(g, w, torch.float32, "grad")


def test_kernel_backward_is_deterministic(interp: ModuleType) -> None:
    inputs = make_inputs(70, 64, 4, torch.float32)
    inputs = [t.requires_grad_() if i not in (1, 2) else t for i, t in enumerate(inputs)]
    y = interp.lora_qkv_triton(*inputs, SCALE)
    grad = torch.randn_like(y)
    first = torch.autograd.grad(y, [inputs[0], *inputs[3:]], grad, retain_graph=True)
    second = torch.autograd.grad(y, [inputs[0], *inputs[3:]], grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_multi_adapter_kernel(interp: ModuleType, dtype: torch.dtype) -> None:
    inputs = make_inputs(39, 48, 4, dtype, n_adapters=3)
    # Three images of 13 rows: row blocks of the kernel straddle images (and adapters).
    index = row_adapter_index(torch.tensor([2, 0, 1]), 39)
    y = interp.lora_qkv_multi_triton(*inputs, SCALE, index)
    check(y, reference(*(t.double() for t in inputs), SCALE, adapter_index=index), dtype, "forward")
    # Unsorted, arbitrary per-row indices too.
    index = torch.randint(0, 3, (39,), generator=torch.Generator().manual_seed(3))
    y = interp.lora_qkv_multi_triton(*inputs, SCALE, index)
    check(y, reference(*(t.double() for t in inputs), SCALE, adapter_index=index), dtype, "forward")


# bf16 is not run here: tl.dot on bfloat16 is wrong in Triton's CPU interpreter. test_gpu_kernel
# and tests/test_attention.py::test_gpu_patched_model_equals_the_cpu check it on a GPU.


# ---------------------------------------------------------------- torch fallback and dispatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim,rank", [(64, 4), (128, 8)])
def test_fallback(dtype: torch.dtype, dim: int, rank: int) -> None:
    run_and_compare(lora_qkv_torch, make_inputs(37, dim, rank, dtype), dtype)
    run_and_compare(lora_qkv_torch, make_inputs(37, dim, rank, dtype), dtype, grad_of=(0, 1, 2, 3, 4, 5, 6))


def test_multi_fallback_forward_and_grads() -> None:
    inputs = make_inputs(39, 48, 4, torch.float32, n_adapters=3)
    index = torch.randint(0, 3, (39,), generator=torch.Generator().manual_seed(3))
    run_and_compare(lora_qkv_multi_torch, inputs, torch.float32, adapter_index=index)


def test_dispatch_on_cpu_uses_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs(37, 64, 4, torch.float32)
    expected = lora_qkv_torch(*inputs, SCALE)
    assert torch.equal(lora_qkv(*inputs, SCALE), expected)
    monkeypatch.setenv(kernels.ENV_VAR, "0")
    assert not kernels.kernels_enabled()
    assert torch.equal(lora_qkv(*inputs, SCALE), expected)
    index = torch.zeros(37, dtype=torch.long)
    stacked = make_inputs(37, 64, 4, torch.float32, n_adapters=2)
    assert lora_qkv_multi(*stacked, SCALE, index).shape == (37, 192)


def test_dispatch_rejects_bad_shapes() -> None:
    x, w, b, a_q, b_q, a_v, b_v = make_inputs(5, 64, 4, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        lora_qkv(x, w[:100], b, a_q, b_q, a_v, b_v, SCALE)
    with pytest.raises(ValueError, match="b_v"):
        lora_qkv(x, w, b, a_q, b_q, a_v, b_v.t(), SCALE)
    with pytest.raises(ValueError, match="x2d"):
        lora_qkv(x[None], w, b, a_q, b_q, a_v, b_v, SCALE)
    stacked = make_inputs(5, 64, 4, torch.float32, n_adapters=2)
    with pytest.raises(ValueError, match="adapter_index values"):
        lora_qkv_multi(*stacked, SCALE, torch.tensor([0, 1, 2, 0, 0]))
    with pytest.raises(ValueError, match="adapter_index must"):
        lora_qkv_multi(*stacked, SCALE, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="evenly"):
        row_adapter_index(torch.tensor([0, 1]), 5)


# ---------------------------------------------------------------- ahead-of-time compilation (no GPU)


def _signature(fn, consts: dict, pointers: dict, floats: tuple[str, ...] = ()) -> dict[str, str]:
    return {name: "constexpr" if name in consts else pointers.get(name, "fp32" if name in floats else "i32")
            for name in fn.arg_names}


def test_kernels_compile_for_sm90() -> None:
    """Compile to a cubin for an H100 on the CPU: catches what the interpreter lets through
    (bf16 dots, dot shape limits, control flow on tensors) without a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module = importlib.import_module("samed_adapter.kernels.triton_lora_qkv")
    if not isinstance(module._fwd_kernel, JITFunction):
        pytest.skip("TRITON_INTERPRET was set when the kernels module was imported")
    target = GPUTarget("cuda", 90, 32)
    dt, f32 = "*bf16", "*fp32"
    cases = [
        (module._down_kernel, dict(x_ptr=dt, a_ptr=dt, s_ptr=f32, idx_ptr="*i32"), (),
         dict(MULTI=True, PRECISION="tf32", BLOCK_M=128, BLOCK_K=64, BLOCK_R=16)),
        (module._fwd_kernel, dict(x_ptr=dt, w_ptr=dt, bias_ptr=dt, s_ptr=f32, b_ptr=dt, idx_ptr="*i32", y_ptr=dt),
         ("scale",), dict(HAS_BIAS=True, MULTI=True, PRECISION="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                          BLOCK_R=16, GROUP_M=8)),
        (module._bwd_ds_db_kernel, dict(dy_ptr=dt, s_ptr=f32, b_ptr=dt, ds_ptr=f32, dbp_ptr=f32), ("scale",),
         dict(PRECISION="tf32", BLOCK_M=64, BLOCK_C=64, BLOCK_R=16)),
        (module._bwd_dx_da_kernel, dict(dy_ptr=dt, w_ptr=dt, ds_ptr=f32, a_ptr=dt, x_ptr=dt, dx_ptr=dt, dap_ptr=f32),
         (), dict(COMPUTE_DX=True, COMPUTE_DA=True, PRECISION="tf32", BLOCK_M=128, BLOCK_N=64, BLOCK_K=128,
                  BLOCK_R=16, GROUP_M=8)),
    ]
    for fn, pointers, floats, consts in cases:
        try:
            src = ASTSource(fn, _signature(fn, consts, pointers, floats), consts)
            compiled = triton.compile(src, target=target, options={"num_warps": 8, "num_stages": 3})
        except FileNotFoundError as err:  # no ptxas next to this Triton
            pytest.skip(f"no CUDA toolchain for Triton's ahead-of-time compiler: {err}")
        assert compiled.asm.get("cubin"), fn.__name__


# ---------------------------------------------------------------- compiled kernels on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_rows,dim,rank", [(37, 64, 4), (4100, 768, 4), (1000, 1280, 8)])
def test_gpu_kernel(dtype: torch.dtype, n_rows: int, dim: int, rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert kernels.triton_available()
    inputs = make_inputs(n_rows, dim, rank, dtype, "cuda")
    run_and_compare(lora_qkv, inputs, dtype)
    stacked = make_inputs(n_rows, dim, rank, dtype, "cuda", n_adapters=3)
    index = torch.randint(0, 3, (n_rows,), device="cuda")
    with torch.no_grad():
        y = lora_qkv_multi(*stacked, SCALE, index)
    check(y, reference(*(t.double() for t in stacked), SCALE, adapter_index=index), dtype, "multi forward")
