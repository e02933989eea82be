"""Triton kernels for the fused qkv projection with q/v LoRA bypasses, and their autograd Function.

Layouts (N rows, C channels, R = LoRA rank, BR = the padded inner size of the LoRA products):
  x (N, C); W (3C, C); bias (3C,); A = [A_q; A_v] (n, 2R, C); B = stack(B_q, B_v) (n, 2, C, R)
  with n = 1 for one adapter (a leading stride of 0 is fine); S = x A^T (N, 2R), always fp32.
Output column j of y is a query column for j < C, a key column for C <= j < 2C and a value
column for 2C <= j < 3C; only the query and value thirds get their bypass.

The rank is padded to BR = max(16, next power of two >= 2R) inside the kernels with masked
loads (never with copies), because `tl.dot` needs every dimension >= 16 on a GPU.

This module imports triton at its top: only `samed_adapter.kernels.dispatch` imports it, lazily.
It has no relative imports so that the tests can load a private copy under `TRITON_INTERPRET=1`;
for that copy to run in a process that imported Triton earlier without the interpreter, the
kernels call no `@triton.jit` function of triton.language's standard library (`tl.zeros`,
`tl.cdiv`, `tl.max`, ...): those were compiled-mode functions from the start. Builtins only.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


def padded_rank(rank: int) -> int:
    """BR for a rank R: the two bypasses share one inner dimension of 2R, padded for `tl.dot`."""
    return max(16, triton.next_power_of_2(2 * rank))


def _precision(dtype: torch.dtype) -> str:
    """`input_precision` of every dot (it only matters where both operands are fp32).

    TF32 (Triton's default on NVIDIA) unless fp32 matmuls must be exact, which is torch's
    default for fp32; for fp16/bf16 inputs the fp32 epilogue operands (S, dS) in TF32 keep as
    many mantissa bits as the inputs carry. ROCm builds get IEEE: most AMD GPUs have no TF32.
    """
    if torch.version.hip is not None:
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _blocks(x: torch.Tensor) -> dict[str, int]:
    """Tile sizes: big tiles on a GPU, few programs (hence fast) in the CPU interpreter."""
    if x.device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1)
    if x.dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering of the (m, n) tiles, so that neighbouring programs share L2 lines."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _adapter_range(idx_ptr, rm, mask_m, MULTI: tl.constexpr):
    """Row adapter indices of a row block and the smallest and largest of them."""
    if MULTI:
        idx = tl.load(idx_ptr + rm, mask=mask_m, other=0).to(tl.int32)
        lo = tl.reduce(tl.where(mask_m, idx, 2147483647), 0, _minimum)
        hi = tl.reduce(tl.where(mask_m, idx, -1), 0, _maximum)
    else:
        idx = rm * 0
        lo = 0
        hi = 0
    return idx, lo, hi


@triton.jit
def _down_kernel(
    x_ptr, a_ptr, s_ptr, idx_ptr, N, C, R2,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_sm, stride_sr,
    MULTI: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S[m, :] = x[m, :] A[adapter(m)]^T in fp32; one program per BLOCK_M rows."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < N
    idx, lo, hi = _adapter_range(idx_ptr, rm, mask_m, MULTI)
    s = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for a in range(lo, hi + 1):
        acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                         mask=mask_m[:, None] & (rk[None, :] < C), other=0.0)
            at = tl.load(a_ptr + a * stride_an + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                         mask=(rr[None, :] < R2) & (rk[:, None] < C), other=0.0)
            acc = tl.dot(xt, at.to(xt.dtype), acc, input_precision=PRECISION)
        if MULTI:
            s += tl.where((idx == a)[:, None], acc, 0.0)
        else:
            s += acc
    tl.store(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, s,
             mask=mask_m[:, None] & (rr[None, :] < R2))


@triton.jit
def _up_tile(b_ptr, a, rn, rr, C, R, stride_bn, stride_bh, stride_bc, stride_br):
    """(BLOCK_R, BLOCK_N) tile of the block-structured up-projection, fp32.

    Entry (j, n) is B_q[n, j] for a query column n and j < R, B_v[n - 2C, j - R] for a value
    column n and R <= j < 2R, and 0 elsewhere (key columns, padding).
    """
    is_q = (rr[:, None] < R) & (rn[None, :] < C)
    is_v = (rr[:, None] >= R) & (rr[:, None] < 2 * R) & (rn[None, :] >= 2 * C) & (rn[None, :] < 3 * C)
    off_q = rn[None, :] * stride_bc + rr[:, None] * stride_br
    off_v = stride_bh + (rn[None, :] - 2 * C) * stride_bc + (rr[:, None] - R) * stride_br
    off = tl.where(is_q, off_q, tl.where(is_v, off_v, 0))
    return tl.load(b_ptr + a * stride_bn + off, mask=is_q | is_v, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, idx_ptr, y_ptr, N, C, R, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
    stride_bn, stride_bh, stride_bc, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, MULTI: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = x W^T + bias, plus scale * S B^T (block-structured B) in the epilogue."""
    num_m = (N + BLOCK_M - 1) // BLOCK_M
    num_n = (3 * C + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m, num_n, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < N
    mask_n = rn < 3 * C
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=mask_m[:, None] & (rk[None, :] < C), other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                     mask=mask_n[None, :] & (rk[:, None] < C), other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # Tiles that lie wholly in the key third skip the bypass.
    n0 = pid_n * BLOCK_N
    if (n0 < C) | (n0 + BLOCK_N > 2 * C):
        rr = tl.arange(0, BLOCK_R)
        st = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                     mask=mask_m[:, None] & (rr[None, :] < 2 * R), other=0.0)
        idx, lo, hi = _adapter_range(idx_ptr, rm, mask_m, MULTI)
        lora = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for a in range(lo, hi + 1):
            bt = _up_tile(b_ptr, a, rn, rr, C, R, stride_bn, stride_bh, stride_bc, stride_br)
            if MULTI:
                lora = tl.dot(tl.where((idx == a)[:, None], st, 0.0), bt, lora, input_precision=PRECISION)
            else:
                lora = tl.dot(st, bt, lora, input_precision=PRECISION)
        acc += scale * lora
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bwd_ds_db_kernel(
    dy_ptr, s_ptr, b_ptr, ds_ptr, dbp_ptr, N, C, R, scale,
    stride_dym, stride_dyn, stride_sm, stride_sr, stride_bh, stride_bc, stride_br,
    stride_dsm, stride_dsr, stride_pb, stride_pc, stride_pr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over the q and v thirds of dY for BLOCK_M rows.

    dS = scale * [dY_q B_q, dY_v B_v] (N, 2R), complete per row block;
    dB partial[block] = scale * [dY_q^T S_q, dY_v^T S_v] (C, 2R) over this block's rows only,
    summed over blocks afterwards (deterministic: no atomics).
    """
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < N
    mask_r = rr < 2 * R
    st = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    s_q = tl.where(rr[None, :] < R, st, 0.0)
    s_v = tl.where(rr[None, :] >= R, st, 0.0)
    ds = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        mask_c = rc < C
        tile_mask = mask_m[:, None] & mask_c[None, :]
        dyq = tl.load(dy_ptr + rm[:, None] * stride_dym + rc[None, :] * stride_dyn, mask=tile_mask, other=0.0)
        dyv = tl.load(dy_ptr + rm[:, None] * stride_dym + (2 * C + rc[None, :]) * stride_dyn,
                      mask=tile_mask, other=0.0)
        b_q = tl.load(b_ptr + rc[:, None] * stride_bc + rr[None, :] * stride_br,
                      mask=mask_c[:, None] & (rr[None, :] < R), other=0.0)
        b_v = tl.load(b_ptr + stride_bh + rc[:, None] * stride_bc + (rr[None, :] - R) * stride_br,
                      mask=mask_c[:, None] & (rr[None, :] >= R) & mask_r[None, :], other=0.0)
        ds = tl.dot(dyq, b_q.to(dyq.dtype), ds, input_precision=PRECISION)
        ds = tl.dot(dyv, b_v.to(dyv.dtype), ds, input_precision=PRECISION)
        db = tl.dot(tl.trans(dyq).to(tl.float32), s_q, input_precision=PRECISION)
        db = tl.dot(tl.trans(dyv).to(tl.float32), s_v, db, input_precision=PRECISION)
        tl.store(dbp_ptr + pid * stride_pb + rc[:, None] * stride_pc + rr[None, :] * stride_pr, scale * db,
                 mask=mask_c[:, None] & mask_r[None, :])
    tl.store(ds_ptr + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr, scale * ds,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _bwd_dx_da_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, x_ptr, dx_ptr, dap_ptr, N, C, R2,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_dxm, stride_dxk, stride_pb, stride_pr, stride_pk,
    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Tile (rows rm, channels rk): dX = dY W + dS A (the bypass in the epilogue), and the
    row-block partial dA[block] = dS^T x, summed over blocks afterwards (no atomics)."""
    num_m = (N + BLOCK_M - 1) // BLOCK_M
    num_k = (C + BLOCK_K - 1) // BLOCK_K
    pid_m, pid_k = _tile_ids(tl.program_id(0), num_m, num_k, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < N
    mask_k = rk < C
    mask_r = rr < R2
    dst = tl.load(ds_ptr + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr,
                  mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    if COMPUTE_DX:
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
        for n0 in range(0, 3 * C, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            dyt = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                          mask=mask_m[:, None] & (rn[None, :] < 3 * C), other=0.0)
            wt = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                         mask=(rn[:, None] < 3 * C) & mask_k[None, :], other=0.0)
            acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)
        at = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(dst, at, acc, input_precision=PRECISION)
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_k[None, :])
    if COMPUTE_DA:
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        da = tl.dot(tl.trans(dst), xt, input_precision=PRECISION)
        tl.store(dap_ptr + pid_m * stride_pb + rr[:, None] * stride_pr + rk[None, :] * stride_pk, da,
                 mask=mask_r[:, None] & mask_k[None, :])


# ---------------------------------------------------------------- launchers


def lora_down(x: torch.Tensor, a: torch.Tensor, adapter_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """S = x A^T in fp32: x (N, C), a (2R, C) or (n, 2R, C) with adapter_index (N,) -> (N, 2R)."""
    a3 = a if a.dim() == 3 else a.unsqueeze(0)
    n_rows, dim = x.shape
    r2 = a3.shape[1]
    s = torch.empty(n_rows, r2, device=x.device, dtype=torch.float32)
    cfg = _blocks(x)
    multi = adapter_index is not None
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]),)
    _down_kernel[grid](
        x, a3, s, adapter_index if multi else s, n_rows, dim, r2,
        x.stride(0), x.stride(1), a3.stride(0), a3.stride(1), a3.stride(2), s.stride(0), s.stride(1),
        MULTI=multi, PRECISION=_precision(x.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=padded_rank(r2 // 2), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return s


def lora_qkv_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], s: torch.Tensor, b: torch.Tensor,
    scale: float, adapter_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y (N, 3C) = x W^T + bias + scale * bypass(S, B); b (2, C, R) or (n, 2, C, R)."""
    b4 = b if b.dim() == 4 else b.unsqueeze(0)
    n_rows, dim = x.shape
    rank = b4.shape[-1]
    y = torch.empty(n_rows, 3 * dim, device=x.device, dtype=x.dtype)
    cfg = _blocks(x)
    multi = adapter_index is not None
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]) * triton.cdiv(3 * dim, cfg["BLOCK_N"]),)
    _fwd_kernel[grid](
        x, weight, bias if bias is not None else y, s, b4, adapter_index if multi else s, y,
        n_rows, dim, rank, float(scale),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1),
        b4.stride(0), b4.stride(1), b4.stride(2), b4.stride(3), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, MULTI=multi, PRECISION=_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=padded_rank(rank),
        GROUP_M=8, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def lora_qkv_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor,
    scale: float, need_dx: bool, need_da: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """(dX (N, C) or None, dA (2R, C) or None, dB (2, C, R)) for one adapter; W gets no gradient."""
    n_rows, dim = x.shape
    rank = b.shape[-1]
    br = padded_rank(rank)
    cfg = _blocks(x)
    prec = _precision(x.dtype)
    # One program per row block and nothing else to split on: smaller row blocks than the GEMMs'
    # give a GPU enough programs (the partial dB buffer grows as they shrink: N / 64 * C * 2R fp32).
    bm_ds = 64 if x.device.type == "cuda" else cfg["BLOCK_M"]
    num_ds = triton.cdiv(n_rows, bm_ds)
    ds = torch.empty(n_rows, 2 * rank, device=x.device, dtype=torch.float32)
    db_part = torch.empty(num_ds, dim, 2 * rank, device=x.device, dtype=torch.float32)
    _bwd_ds_db_kernel[(num_ds,)](
        dy, s, b, ds, db_part, n_rows, dim, rank, float(scale),
        dy.stride(0), dy.stride(1), s.stride(0), s.stride(1), b.stride(0), b.stride(1), b.stride(2),
        ds.stride(0), ds.stride(1), db_part.stride(0), db_part.stride(1), db_part.stride(2),
        PRECISION=prec, BLOCK_M=bm_ds, BLOCK_C=cfg["BLOCK_K"], BLOCK_R=br,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # (C, 2R) -> (2, C, R): columns [0, R) are dB_q, [R, 2R) are dB_v.
    db = db_part.sum(0).view(dim, 2, rank).permute(1, 0, 2).to(b.dtype)
    dx = da = None
    if need_dx or need_da:
        bm = cfg["BLOCK_M"]
        num_m = triton.cdiv(n_rows, bm)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else ds
        da_part = torch.empty(num_m, 2 * rank, dim, device=x.device, dtype=torch.float32) if need_da else ds
        bk = cfg["BLOCK_N"]  # dX tiles are (BLOCK_M, BLOCK_N) like y's, reducing over 3C by BLOCK_K
        grid = (num_m * triton.cdiv(dim, bk),)
        _bwd_dx_da_kernel[grid](
            dy, weight, ds, a, x, dx, da_part, n_rows, dim, 2 * rank,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), ds.stride(0), ds.stride(1),
            a.stride(0), a.stride(1), x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
            da_part.stride(0), da_part.stride(1), da_part.stride(-1),
            COMPUTE_DX=need_dx, COMPUTE_DA=need_da, PRECISION=prec,
            BLOCK_M=bm, BLOCK_N=cfg["BLOCK_K"], BLOCK_K=bk, BLOCK_R=br, GROUP_M=8,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        da = da_part.sum(0).to(a.dtype) if need_da else None
        dx = dx if need_dx else None
    return dx, da, db


class LoraQKVFunction(torch.autograd.Function):
    """Autograd for y = x W^T + bias + scale * bypass(x A^T, B) with W and bias frozen.

    Inputs: x (N, C), weight (3C, C), bias (3C,) or None, a (2R, C) = [A_q; A_v],
    b (2, C, R) = stack(B_q, B_v), scale. All floating tensors share one dtype.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
        bias: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor, scale: float,
    ) -> torch.Tensor:
        s = lora_down(x, a)
        y = lora_qkv_forward(x, weight, bias, s, b, scale)
        ctx.save_for_backward(x, weight, a, b, s)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor
    ) -> tuple[Optional[torch.Tensor], ...]:
        x, weight, a, b, s = ctx.saved_tensors
        need_dx, _, _, need_da, need_db, _ = ctx.needs_input_grad
        if not (need_dx or need_da or need_db):
            return None, None, None, None, None, None
        dx, da, db = lora_qkv_backward(dy, x, weight, a, b, s, ctx.scale, need_dx, need_da)
        return dx, None, None, da, db if need_db else None, None


def lora_qkv_triton(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_q: torch.Tensor, b_q: torch.Tensor,
    a_v: torch.Tensor, b_v: torch.Tensor, scale: float,
) -> torch.Tensor:
    """The Triton path of `lora_qkv` (no device or dtype checks: the dispatcher makes them).

    x2d (N, C), weight (3C, C), bias (3C,) or None, a_q/a_v (R, C), b_q/b_v (C, R) -> (N, 3C).
    Differentiable in x2d and the four LoRA tensors; weight and bias get no gradient.
    """
    a = torch.cat([a_q, a_v], dim=0)  # (2R, C): the tiny copies autograd splits back for us
    b = torch.stack([b_q, b_v], dim=0)  # (2, C, R)
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with stride 1
    return LoraQKVFunction.apply(x2d, weight, bias, a, b, float(scale))


@torch.no_grad()
def lora_qkv_multi_triton(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_q: torch.Tensor, b_q: torch.Tensor,
    a_v: torch.Tensor, b_v: torch.Tensor, scale: float, adapter_index: torch.Tensor,
) -> torch.Tensor:
    """Forward only: row m uses adapter adapter_index[m] of the stacked a_q/a_v (n, R, C), b_q/b_v (n, C, R).

    A row block whose rows use several adapters loops over them (once per distinct index between
    the block's smallest and largest), so rows grouped by image cost one pass.
    """
    a = torch.cat([a_q, a_v], dim=1)  # (n, 2R, C)
    b = torch.stack([b_q, b_v], dim=1)  # (n, 2, C, R)
    index = adapter_index.to(torch.int32).contiguous()
    bias = bias.contiguous() if bias is not None else None
    s = lora_down(x2d, a, index)
    return lora_qkv_forward(x2d, weight, bias, s, b, scale, index)
