"""Triton kernels of gaussian_log_prob:
    out[k, p] = -0.5 * sum_d((x[p, d] - mean[k, p, d])^2 / var + log var + log 2 pi)
with var = exp(v) or softplus(v) + delta, and the fused backward.

Layout (set up by fastvae/_likelihood_layout.py): mean (K, P, D); x (P, D),
broadcast over K by indexing, never copied; v (K, P, D) per element
(LAYOUT 0), (P, D) per x row (LAYOUT 1) or (D,) per dimension (LAYOUT 2).
The forward tiles the K * P decoder rows. The backward gives each program rows
of x and a range of samples: dmean (and a per-element dv) per sample, and
partial sums over its samples of what is summed over K (dx; for a shared
variance A = sum g (x - m)^2 and G = sum g), which the launcher reduces in a
fixed order and turns into dv (docs/triton.md).

Where x == mean exactly, (x - m)^2 / var is 0 whatever the variance, so an
underflowing variance (1/var = inf) gives no 0 * inf = NaN.
"""
import torch
import triton
import triton.language as tl

from ._common import (
    MAX_BLOCK_COLS_BACKWARD,
    acc_dtype,
    accumulation_dtype,
    block_cols,
    block_rows,
    num_warps,
    sample_splits,
    sigmoid,
    softplus,
)

LOG_2PI: tl.constexpr = tl.constexpr(1.8378770664093453)
ELEMENT, ROW, DIM = 0, 1, 2

# -- math helpers -------------------------------------------------------------


@triton.jit
def _inv_and_log_var(v, delta, SOFTPLUS: tl.constexpr):
    if SOFTPLUS:
        var = softplus(v) + delta
        return 1.0 / var, tl.log(var)
    else:
        return tl.exp(-v), v


@triton.jit
def _over_var(diff, inv):
    """(x - m) / var, 0 where x == m even if 1/var overflowed."""
    return tl.where(diff == 0.0, 0.0, diff * inv)


@triton.jit
def _load_var(v_ptr, r, p, cols, mask, D, LAYOUT: tl.constexpr, ACC: tl.constexpr):
    """The variance parameter of decoder rows r (x rows p) at cols, per LAYOUT."""
    if LAYOUT == 0:
        return tl.load(v_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
    elif LAYOUT == 1:
        return tl.load(v_ptr + p[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
    else:
        return tl.load(v_ptr + cols, mask=cols < D, other=0.0).to(ACC)[None, :]


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["P", "KP"])
def _gaussian_log_prob_fwd_kernel(
    x_ptr,  # (P, D)
    mean_ptr,  # (K, P, D) = (KP, D) decoder rows
    v_ptr,  # (K, P, D) | (P, D) | (D,)
    delta_ptr,  # (): the variance floor of the softplus form, in ACC
    out_ptr,  # (K, P) = (KP,)
    P,
    KP,
    D,
    LAYOUT: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_ok = r < KP
    p = r % P
    delta = tl.load(delta_ptr)
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + p[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        m = tl.load(mean_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        inv, log_var = _inv_and_log_var(_load_var(v_ptr, r, p, cols, mask, D, LAYOUT, ACC), delta, SOFTPLUS)
        diff = x - m
        acc += tl.sum(tl.where(mask, diff * _over_var(diff, inv) + log_var, 0.0), axis=1)
    out = -0.5 * (acc + D * tl.full([BLOCK_R], LOG_2PI, ACC))  # log 2 pi in ACC, not float32
    tl.store(out_ptr + r, out.to(out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=["P", "K", "K_PER"])
def _gaussian_log_prob_bwd_kernel(
    grad_out_ptr,  # (K, P)
    x_ptr,  # (P, D)
    mean_ptr,  # (K, P, D)
    v_ptr,  # (K, P, D) | (P, D) | (D,)
    delta_ptr,  # ()
    dmean_ptr,  # (K, P, D)
    dv_ptr,  # LAYOUT 0 with HAS_DV: (K, P, D)
    part_dx_ptr,  # (splits, P, D): -sum_k dmean over the split, when HAS_DX
    part_a_ptr,  # LAYOUT 1: (splits, P, D); LAYOUT 2: (programs, D): sum g (x - m)^2, when HAS_DV
    part_g_ptr,  # LAYOUT 1: (splits, P); LAYOUT 2: (programs,): sum g, when HAS_DV
    P,
    D,
    K,
    K_PER,  # samples per split
    LAYOUT: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_DX: tl.constexpr,
    HAS_DV: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_blocks = tl.cdiv(P, BLOCK_R)
    split = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < P
    k0 = split * K_PER
    k1 = tl.minimum(k0 + K_PER, K)
    delta = tl.load(delta_ptr)
    g_acc = tl.zeros([BLOCK_R], dtype=ACC)  # sum_k g, for a shared variance
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        if LAYOUT != 0:
            inv_shared, log_var_unused = _inv_and_log_var(
                _load_var(v_ptr, rows, rows, cols, mask, D, LAYOUT, ACC), delta, SOFTPLUS)
        dx_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        a_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)  # sum_k g (x - m)^2
        g_acc = tl.zeros([BLOCK_R], dtype=ACC)
        for k in range(k0, k1):
            r = k * P + rows
            g = tl.load(grad_out_ptr + r, mask=row_ok, other=0.0).to(ACC)
            m = tl.load(mean_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            diff = x - m
            if LAYOUT == 0:
                v = _load_var(v_ptr, r, rows, cols, mask, D, LAYOUT, ACC)
                inv, log_var_unused = _inv_and_log_var(v, delta, SOFTPLUS)
                if HAS_DV:
                    if SOFTPLUS:
                        dv = 0.5 * g[:, None] * (diff * diff * inv * inv - inv) * sigmoid(v)
                    else:
                        dv = 0.5 * g[:, None] * (diff * _over_var(diff, inv) - 1.0)
                    tl.store(dv_ptr + r[:, None] * D + cols[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)
            else:
                inv = inv_shared
                a_acc += g[:, None] * diff * diff
                g_acc += g
            gm = g[:, None] * _over_var(diff, inv)
            tl.store(dmean_ptr + r[:, None] * D + cols[None, :], gm.to(dmean_ptr.dtype.element_ty), mask=mask)
            dx_acc -= gm
        if HAS_DX:
            tl.store(part_dx_ptr + split * P * D + rows[:, None] * D + cols[None, :], dx_acc, mask=mask)
        if LAYOUT == 1 and HAS_DV:
            tl.store(part_a_ptr + split * P * D + rows[:, None] * D + cols[None, :], a_acc, mask=mask)
        if LAYOUT == 2 and HAS_DV:
            tl.store(part_a_ptr + pid * D + cols, tl.sum(tl.where(mask, a_acc, 0.0), axis=0), mask=col_ok)
    if LAYOUT == 1 and HAS_DV:
        tl.store(part_g_ptr + split * P + rows, g_acc, mask=row_ok)
    if LAYOUT == 2 and HAS_DV:
        tl.store(part_g_ptr + pid, tl.sum(g_acc, axis=0))


# -- launchers ----------------------------------------------------------------


def _layout(v) -> int:
    return {3: ELEMENT, 2: ROW, 1: DIM}[v.dim()]


def _delta(delta: float, mean) -> torch.Tensor:
    # a tensor, so that float64 kernels read delta exactly (a float argument
    # is float32) and a new delta compiles nothing
    return torch.full((), delta, dtype=accumulation_dtype(mean.dtype), device=mean.device)


def gaussian_log_prob_forward(x, mean, var_param, softplus_mode: bool, delta: float, out) -> None:
    """out (K, P) <- log N(x; mean, var(var_param)) summed over D; see the module docstring for shapes."""
    K, P, D = mean.shape
    rows = block_rows(mean.device)  # rows per program
    if K * P == 0:
        return
    BLOCK_D = block_cols(D)
    _gaussian_log_prob_fwd_kernel[(triton.cdiv(K * P, rows),)](
        x, mean, var_param, _delta(delta, mean), out, P, K * P, D,
        LAYOUT=_layout(var_param), SOFTPLUS=softplus_mode, ACC=acc_dtype(mean.dtype),
        BLOCK_R=rows, BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_D, mean.dtype == torch.float64),
    )


def gaussian_log_prob_backward(grad_out, x, mean, var_param, softplus_mode: bool, delta: float, dx, dmean,
                               dvar_param) -> None:
    """dmean (K, P, D) and, when they are not None, dvar_param (var_param's shape) and dx (P, D)
    <- gradients given grad_out (K, P)."""
    K, P, D = mean.shape
    rows = block_rows(mean.device)  # rows per program
    if K * P * D == 0:
        for t in (dx, dvar_param):
            if t is not None:
                t.zero_()
        return
    layout = _layout(var_param)
    has_dx, has_dv = dx is not None, dvar_param is not None
    BLOCK_D = block_cols(D, MAX_BLOCK_COLS_BACKWARD)
    row_blocks = triton.cdiv(P, rows)
    sums_over_k = has_dx or (has_dv and layout != ELEMENT)
    splits, per_split = sample_splits(K, row_blocks, mean.device) if sums_over_k else (K, 1)
    acc, device = accumulation_dtype(mean.dtype), mean.device
    part_dx = torch.empty((splits, P, D) if has_dx else (1,), dtype=acc, device=device)
    shared_dv = has_dv and layout != ELEMENT
    part_a = torch.empty(((splits, P, D) if layout == ROW else (row_blocks * splits, D)) if shared_dv else (1,),
                         dtype=acc, device=device)
    part_g = torch.empty(((splits, P) if layout == ROW else (row_blocks * splits,)) if shared_dv else (1,),
                         dtype=acc, device=device)
    delta_t = _delta(delta, mean)
    _gaussian_log_prob_bwd_kernel[(row_blocks * splits,)](
        grad_out, x, mean, var_param, delta_t, dmean, dvar_param if layout == ELEMENT and has_dv else dmean,
        part_dx, part_a, part_g, P, D, K, per_split,
        LAYOUT=layout, SOFTPLUS=softplus_mode, HAS_DX=has_dx, HAS_DV=has_dv, ACC=acc_dtype(mean.dtype),
        BLOCK_R=rows, BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_D, mean.dtype == torch.float64),
    )
    if has_dx:
        dx.copy_(part_dx.sum(0))
    if shared_dv:
        # dv of a shared variance from A = sum g (x - m)^2 and G = sum g over its rows
        a = part_a.sum(0)
        G = part_g.sum(0)[:, None] if layout == ROW else part_g.sum()
        v = var_param.to(acc)
        if softplus_mode:
            inv = 1.0 / (torch.logaddexp(torch.zeros_like(v), v) + delta_t)
            dvar_param.copy_(0.5 * (inv * inv * a - inv * G) * torch.sigmoid(v))
        else:
            inv_a = torch.where(a == 0, 0.0, torch.exp(-v) * a)  # every x == m: 0, not 0 * inf
            dvar_param.copy_(0.5 * (inv_a - G))
