"""Triton kernels of gaussian_log_prob:
    out[k, p] = -0.5 * sum_d((x[p, d] - mean[k, p, d])^2 / var + log var + log 2 pi)
with var = exp(v) or softplus(v) + delta, and the fused backward.

Layout (set up by fastvae/_likelihood_layout.py): mean (K, P, D); x (P, D),
broadcast over K by indexing, never copied; v (K, P, D) per element
(LAYOUT 0), (P, D) per x row (LAYOUT 1) or (D,) per dimension (LAYOUT 2).
Each program owns BLOCK_P rows of x and walks every k for them, so dx (and a
per-row v's gradient) is summed over K in registers.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, blocks, sigmoid, softplus

LOG_2PI = 1.8378770664093453
MAX_BLOCK_D = 1024  # columns per inner step; longer rows loop over D
ELEMENT, ROW, DIM = 0, 1, 2

# -- math helpers -------------------------------------------------------------


@triton.jit
def _inv_and_log_var(v, DELTA: tl.constexpr, SOFTPLUS: tl.constexpr):
    if SOFTPLUS:
        # tl.full keeps DELTA exact in float64 (a bare Python float would be float32)
        var = softplus(v) + tl.full([], DELTA, v.dtype)
        return 1.0 / var, tl.log(var)
    else:
        return tl.exp(-v), v


# -- kernels ------------------------------------------------------------------


@triton.jit
def _gaussian_log_prob_fwd_kernel(
    x_ptr,  # (P, D)
    mean_ptr,  # (K, P, D)
    v_ptr,  # (K, P, D) | (P, D) | (D,)
    out_ptr,  # (K, P)
    K,
    P,
    D,
    LAYOUT: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    DELTA: tl.constexpr,  # variance floor of the softplus form
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    row_ok = rows < P
    for k in range(K):
        r = k * P + rows  # decoder rows, int64
        acc = tl.zeros([BLOCK_P], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            m = tl.load(mean_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            if LAYOUT == 0:
                v = tl.load(v_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            elif LAYOUT == 1:
                v = tl.load(v_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            else:
                v = tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
            inv, log_var = _inv_and_log_var(v, DELTA, SOFTPLUS)
            diff = x - m
            acc += tl.sum(tl.where(mask, diff * diff * inv + log_var, 0.0), axis=1)
        out = -0.5 * (acc + D * tl.full([BLOCK_P], LOG_2PI, ACC))
        tl.store(out_ptr + r, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gaussian_log_prob_bwd_kernel(
    g_ptr,  # (K, P)
    x_ptr,  # (P, D)
    mean_ptr,  # (K, P, D)
    v_ptr,  # (K, P, D) | (P, D) | (D,)
    dx_ptr,  # (P, D), written when HAS_DX
    dmean_ptr,  # (K, P, D)
    dv_ptr,  # when HAS_DV: LAYOUT 0: (K, P, D); 1: (P, D); 2: partial sums (n_programs, D)
    gsum_ptr,  # LAYOUT 2: partial sums of g, (n_programs,)
    K,
    P,
    D,
    LAYOUT: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    DELTA: tl.constexpr,  # variance floor of the softplus form
    HAS_DX: tl.constexpr,
    HAS_DV: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    row_ok = rows < P
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        if LAYOUT == 1:
            v_shared = tl.load(v_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        elif LAYOUT == 2:
            v_shared = tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        else:
            v_shared = tl.zeros([1, BLOCK_D], dtype=ACC)  # unused: v varies per element
        inv_shared, _ = _inv_and_log_var(v_shared, DELTA, SOFTPLUS)
        dx_acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
        a_acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)  # sum_k g (x - m)^2
        g_acc = tl.zeros([BLOCK_P], dtype=ACC)  # sum_k g
        for k in range(K):
            r = k * P + rows
            g = tl.load(g_ptr + r, mask=row_ok, other=0.0).to(ACC)
            m = tl.load(mean_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            diff = x - m
            if LAYOUT == 0:
                v = tl.load(v_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
                inv, _ = _inv_and_log_var(v, DELTA, SOFTPLUS)
                if HAS_DV:
                    if SOFTPLUS:
                        dv = 0.5 * g[:, None] * (diff * diff * inv * inv - inv) * sigmoid(v)
                    else:
                        dv = 0.5 * g[:, None] * (diff * diff * inv - 1.0)
                    tl.store(dv_ptr + r[:, None] * D + cols[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)
            else:
                inv = inv_shared
                a_acc += g[:, None] * diff * diff
                g_acc += g
            gm = g[:, None] * diff * inv
            tl.store(dmean_ptr + r[:, None] * D + cols[None, :], gm.to(dmean_ptr.dtype.element_ty), mask=mask)
            dx_acc -= gm
        if HAS_DX:
            tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx_acc.to(dx_ptr.dtype.element_ty), mask=mask)
        if LAYOUT == 1 and HAS_DV:
            # dv of a shared row from A = sum g (x-m)^2 and G = sum g
            if SOFTPLUS:
                dv = 0.5 * (inv_shared * inv_shared * a_acc - inv_shared * g_acc[:, None]) * sigmoid(v_shared)
            else:
                dv = 0.5 * (inv_shared * a_acc - g_acc[:, None])
            tl.store(dv_ptr + rows[:, None] * D + cols[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)
        if LAYOUT == 2 and HAS_DV:
            tl.store(dv_ptr + pid * D + cols, tl.sum(tl.where(mask, a_acc, 0.0), axis=0), mask=col_ok)
            if d0 == 0:
                tl.store(gsum_ptr + pid, tl.sum(g_acc, axis=0))


# -- launchers ----------------------------------------------------------------



def _layout(v) -> int:
    return {3: ELEMENT, 2: ROW, 1: DIM}[v.dim()]


def gaussian_log_prob_forward(x, mean, var_param, softplus_mode: bool, delta: float, out) -> None:
    """out (K, P) <- log N(x; mean, var(var_param)) summed over D; see the module docstring for shapes."""
    K, P, D = mean.shape
    if K * P == 0:
        return
    BLOCK_P, BLOCK_D = blocks(P, D, MAX_BLOCK_D)
    _gaussian_log_prob_fwd_kernel[(triton.cdiv(P, BLOCK_P),)](
        x, mean, var_param, out, K, P, D,
        LAYOUT=_layout(var_param), SOFTPLUS=softplus_mode, DELTA=delta, ACC=acc_dtype(mean.dtype), BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D,
    )


def gaussian_log_prob_backward(grad_out, x, mean, var_param, softplus_mode: bool, delta: float, dx, dmean, dvar_param) -> None:
    """dmean (K, P, D) and, when they are not None, dvar_param (var_param's shape) and dx (P, D)
    <- gradients given grad_out (K, P)."""
    K, P, D = mean.shape
    if K * P * D == 0:
        for t in (dx, dvar_param):
            if t is not None:
                t.zero_()
        return
    layout = _layout(var_param)
    BLOCK_P, BLOCK_D = blocks(P, D, MAX_BLOCK_D)
    grid = triton.cdiv(P, BLOCK_P)
    part_dtype = torch.float64 if mean.dtype == torch.float64 else torch.float32  # partial sums
    if layout == DIM and dvar_param is not None:
        # per-program partial sums, reduced below: (D,) values summed over all rows
        dv_arg = torch.empty((grid, D), dtype=part_dtype, device=mean.device)
        gsum = torch.empty((grid,), dtype=part_dtype, device=mean.device)
    else:
        dv_arg = gsum = dvar_param if dvar_param is not None else dmean
    _gaussian_log_prob_bwd_kernel[(grid,)](
        grad_out, x, mean, var_param, dx if dx is not None else dmean, dmean, dv_arg, gsum, K, P, D,
        LAYOUT=layout, SOFTPLUS=softplus_mode, DELTA=delta, HAS_DX=dx is not None, HAS_DV=dvar_param is not None, ACC=acc_dtype(mean.dtype),
        BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D,
    )
    if layout == DIM and dvar_param is not None:
        a, G = dv_arg.sum(0), gsum.sum()
        vv = var_param.to(part_dtype)
        if softplus_mode:
            inv = 1.0 / (torch.logaddexp(torch.zeros_like(vv), vv) + delta)
            dvar_param.copy_(0.5 * (inv * inv * a - inv * G) * torch.sigmoid(vv))
        else:
            inv = torch.exp(-vv)
            dvar_param.copy_(0.5 * (inv * a - G))
