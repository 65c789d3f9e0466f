"""Triton kernels of continuous_bernoulli_log_prob:
    out[k, p] = sum_d(x[p, d] l - softplus(l) + log C(l)),  l = logits[k, p, d],
C(l) = l / tanh(l / 2) the continuous Bernoulli's normalizer, and the fused
backward dlogits = g (x - sigmoid(l) + 1/l - 1/sinh(l)), dx = sum_k g l.

The layout, tiles and the split of dx's sum over samples are
bernoulli_log_prob's (kernels/bernoulli_log_prob.py). log C and its
derivative take a Taylor series in l^2 below |l| = TAYLOR_BELOW (both are
0 / 0 or cancel at l = 0), else the closed forms in t = e^-|l| (the
coefficients are fastvae.reference.CB_TAYLOR; csrc/continuous_bernoulli_log_prob.cpp
says why the branch points are 1 for float32 and 0.25 for float64).
"""
import torch
import triton
import triton.language as tl

from ._common import (
    acc_dtype,
    accumulation_dtype,
    arrive_last,
    log1p_unit,
    sigmoid,
    softplus,
    split_samples,
    split_tile,
    tile_counters,
    tile_geometry,
)

LOG2: tl.constexpr = tl.constexpr(0.6931471805599453)


def taylor_below(dtype: torch.dtype) -> float:
    """The branch point of the Taylor series for an accumulation in ``dtype``'s rule."""
    return 0.25 if accumulation_dtype(dtype) == torch.float64 else 1.0


# -- math helpers -------------------------------------------------------------


@triton.jit
def _series(u):
    """sum_n a_n u^n, n = 1..8: log C(l) - log 2 at u = l^2."""
    p = -1.3883706783700259e-09 * u + 1.565947953183403e-08
    p = p * u - 1.8027895356488832e-07
    p = p * u + 2.1336045641601195e-06
    p = p * u - 2.6248346560846562e-05
    p = p * u + 3.4171075837742505e-04
    p = p * u - 4.861111111111111e-03
    p = p * u + 8.333333333333333e-02
    return p * u


@triton.jit
def _series_grad(u):
    """sum_n 2n a_n u^(n-1): (d log C / dl) / l at u = l^2."""
    p = -2.2213930853920414e-08 * u + 2.192327134456764e-07
    p = p * u - 2.1633474427786596e-06
    p = p * u + 2.1336045641601196e-05
    p = p * u - 2.099867724867725e-04
    p = p * u + 2.05026455026455e-03
    p = p * u - 1.9444444444444445e-02
    return p * u + 1.6666666666666666e-01


@triton.jit
def log_norm(lg, TAYLOR_BELOW: tl.constexpr):
    """log C(l) = log(l / tanh(l / 2)); the exact branch reads |l| clamped to
    the branch point, so neither branch makes an inf or NaN the other discards."""
    a = tl.abs(lg)
    small = a < TAYLOR_BELOW
    ab = tl.maximum(a, TAYLOR_BELOW)
    t = tl.exp(-ab)
    exact = tl.log(ab) - tl.log(1.0 - t) + log1p_unit(t)
    ls = tl.where(small, lg, 0.0)
    return tl.where(small, LOG2 + _series(ls * ls), exact)


@triton.jit
def log_norm_grad(lg, TAYLOR_BELOW: tl.constexpr):
    """d log C / dl = 1/l - 1/sinh(l)."""
    a = tl.abs(lg)
    small = a < TAYLOR_BELOW
    ab = tl.maximum(a, TAYLOR_BELOW)
    t = tl.exp(-ab)
    one_t2 = (1.0 - t) * (1.0 + t)
    mag = (one_t2 - 2.0 * t * ab) / (ab * one_t2)  # 1/|l| - 2t / (1 - t^2), one division
    ls = tl.where(small, lg, 0.0)
    return tl.where(small, ls * _series_grad(ls * ls), tl.where(lg < 0.0, -mag, mag))


@triton.jit
def _log_prob_term(x, lg, TAYLOR_BELOW: tl.constexpr):
    """x l - softplus(l) + log C(l), the Bernoulli part as -(x softplus(-l) + (1 - x) softplus(l))."""
    return -(x * softplus(-lg) + (1.0 - x) * softplus(lg)) + log_norm(lg, TAYLOR_BELOW)


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["P", "KP"])
def _continuous_bernoulli_log_prob_fwd_kernel(
    x_ptr,  # (P, D)
    logits_ptr,  # (K, P, D) = (KP, D) decoder rows
    out_ptr,  # (K, P) = (KP,)
    P,
    KP,
    D,
    ACC: tl.constexpr,
    TAYLOR_BELOW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_ok = r < KP
    p = r % P
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + p[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        lg = tl.load(logits_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        acc += tl.sum(tl.where(mask, _log_prob_term(x, lg, TAYLOR_BELOW), 0.0), axis=1)
    tl.store(out_ptr + r, acc.to(out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=["P", "R", "K", "K_PER", "SPLITS"])
def _continuous_bernoulli_log_prob_bwd_kernel(
    grad_out_ptr,  # (K, P)
    x_ptr,  # (P, D)
    logits_ptr,  # (K, P, D)
    dlogits_ptr,  # (K, P, D)
    dx_ptr,  # (P, D), when HAS_DX
    part_ptr,  # (SPLITS, P, D) ACC: partial dx of each split, when SPLITS > 1
    counter_ptr,  # (tiles,) int32 arrival counters, zero between launches, when SPLITS > 1
    P,
    D,
    R,  # rows the programs tile: P (HAS_DX: each loops over the samples) or K * P
    K,  # samples each tile loops over: K (HAS_DX) or 1
    K_PER,  # samples per split
    SPLITS,
    HAS_DX: tl.constexpr,
    ACC: tl.constexpr,
    TAYLOR_BELOW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile, split, rows, cols, row_ok, col_ok, mask, k0, k1 = split_tile(R, D, K, K_PER, BLOCK_R, BLOCK_D)
    x_rows = rows if HAS_DX else rows % P
    x = tl.load(x_ptr + x_rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
    dx_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for k in range(k0, k1):
        r = k * R + rows
        g = tl.load(grad_out_ptr + r, mask=row_ok, other=0.0).to(ACC)[:, None]
        lg = tl.load(logits_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        dl = g * (x - sigmoid(lg) + log_norm_grad(lg, TAYLOR_BELOW))
        tl.store(dlogits_ptr + r[:, None] * D + cols[None, :], dl.to(dlogits_ptr.dtype.element_ty), mask=mask)
        if HAS_DX:
            dx_acc += g * lg
    if HAS_DX:
        idx = rows[:, None] * D + cols[None, :]
        if SPLITS == 1:
            tl.store(dx_ptr + idx, dx_acc.to(dx_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + split * R * D + idx, dx_acc, mask=mask)
            if arrive_last(counter_ptr + tile, SPLITS):
                total = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
                for s in range(0, SPLITS):
                    total += tl.load(part_ptr + s * R * D + idx, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(dx_ptr + idx, total.to(dx_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def continuous_bernoulli_log_prob_forward(x, logits, out) -> None:
    """out (K, P) <- sum_d(x l - softplus(l) + log C(l)) for x (P, D), logits (K, P, D)."""
    K, P, D = logits.shape
    if K * P == 0:
        return
    fp64 = logits.dtype == torch.float64
    BLOCK_R, BLOCK_D, warps = tile_geometry(D, logits.device, fp64)
    if fp64 and logits.device.type != "cpu":
        # float64 log C (a polynomial and three libdevice logs) spilled 16 bytes
        # on sm_80 at 4 elements a thread: 2 a thread (8 warps over 512)
        BLOCK_R, BLOCK_D, warps = 1, min(BLOCK_D, 512), 8
    _continuous_bernoulli_log_prob_fwd_kernel[(triton.cdiv(K * P, BLOCK_R),)](
        x, logits, out, P, K * P, D, ACC=acc_dtype(logits.dtype), TAYLOR_BELOW=taylor_below(logits.dtype),
        BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps,
    )


# Backward tiles: dx's accumulator stays live across the loop over samples.
BACKWARD_TILE = 1024
BACKWARD_MAX_COLS = 256


def continuous_bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """dlogits (K, P, D) and, when dx is not None, dx (P, D) <- gradients given grad_out (K, P)."""
    K, P, D = logits.shape
    if K * P * D == 0:
        if dx is not None and dx.numel():
            dx.zero_()  # a sum over no samples
        return
    has_dx = dx is not None
    BLOCK_R, BLOCK_D, warps = tile_geometry(D, logits.device, logits.dtype == torch.float64,
                                            BACKWARD_TILE if has_dx else 4096,
                                            BACKWARD_MAX_COLS if has_dx else 1024)
    R, k_loop = (P, K) if has_dx else (K * P, 1)
    tiles = triton.cdiv(R, BLOCK_R) * triton.cdiv(D, BLOCK_D)
    splits, per_split = split_samples(tiles, K, logits.device) if has_dx else (1, 1)
    acc = accumulation_dtype(logits.dtype)
    part = torch.empty((splits, P, D) if splits > 1 else (1,), dtype=acc, device=logits.device)
    _continuous_bernoulli_log_prob_bwd_kernel[(tiles * splits,)](
        grad_out, x, logits, dlogits, dx if has_dx else dlogits, part,
        tile_counters(logits.device, tiles, splits), P, D, R, k_loop, per_split, splits,
        HAS_DX=has_dx, ACC=acc_dtype(logits.dtype), TAYLOR_BELOW=taylor_below(logits.dtype),
        BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps,
    )
