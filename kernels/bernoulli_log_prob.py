"""Triton kernels of bernoulli_log_prob:
    out[k, p] = sum_d(x[p, d] * l - softplus(l)),  l = logits[k, p, d],
and the fused backward dlogits = g (x - sigmoid(l)), dx = sum_k g l.

Layout: logits (K, P, D); x (P, D) broadcast over K by indexing, never copied.
One launch forward, one backward, no torch work around them (issue 23):
- forward: programs of BLOCK_R decoder rows x BLOCK_D columns (about 4096
  elements, 8 warps; _common.tile_geometry), looping over D;
- backward: without dx, programs tile the K * P decoder rows x D (nothing is
  summed); with dx, each program owns a tile of x's rows x columns and loops
  over the samples, dx summed in registers and written once. Where those
  tiles do not fill a wave (few rows of x against many samples) the samples
  are split: each program stores a partial dx and the last of a tile's
  programs to finish adds them in split order (deterministic, no float
  atomics; _common.arrive_last).
"""
import torch
import triton
import triton.language as tl

from ._common import (
    acc_dtype,
    accumulation_dtype,
    arrive_last,
    sigmoid,
    softplus,
    split_samples,
    split_tile,
    tile_counters,
    tile_geometry,
)

# -- math helpers -------------------------------------------------------------


@triton.jit
def _weighted(w, s):
    """w * s with 0 * inf = 0: a zero weight on a saturated softplus adds nothing."""
    return tl.where(w == 0.0, 0.0, w * s)


@triton.jit
def _log_prob_term(x, lg):
    """x l - softplus(l) as -(x softplus(-l) + (1 - x) softplus(l)): saturated
    logits (+-inf) give 0 where the outcome is certain and right, -inf where
    it is certain and wrong, never NaN."""
    return -(_weighted(x, softplus(-lg)) + _weighted(1.0 - x, softplus(lg)))


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["P", "KP"])
def _bernoulli_log_prob_fwd_kernel(
    x_ptr,  # (P, D)
    logits_ptr,  # (K, P, D) = (KP, D) decoder rows
    out_ptr,  # (K, P) = (KP,)
    P,
    KP,
    D,
    ACC: tl.constexpr,
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
        acc += tl.sum(tl.where(mask, _log_prob_term(x, lg), 0.0), axis=1)
    tl.store(out_ptr + r, acc.to(out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=["P", "R", "K", "K_PER", "SPLITS"])
def _bernoulli_log_prob_bwd_kernel(
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
        dl = _weighted(g, x - sigmoid(lg))  # exactly 0 where a saturated logit is right
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


def bernoulli_log_prob_forward(x, logits, out) -> None:
    """out (K, P) <- sum_d(x l - softplus(l)) for x (P, D), logits (K, P, D)."""
    K, P, D = logits.shape
    if K * P == 0:
        return
    BLOCK_R, BLOCK_D, warps = tile_geometry(D, logits.device, logits.dtype == torch.float64)
    _bernoulli_log_prob_fwd_kernel[(triton.cdiv(K * P, BLOCK_R),)](
        x, logits, out, P, K * P, D, ACC=acc_dtype(logits.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        num_warps=warps,
    )


# Backward tiles: dx's accumulator stays live across the loop over samples.
BACKWARD_TILE = 1024
BACKWARD_MAX_COLS = 256


def bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """dlogits (K, P, D) and, when dx is not None, dx (P, D) <- gradients given grad_out (K, P)."""
    K, P, D = logits.shape
    if K * P * D == 0:
        if dx is not None and dx.numel():
            _zero_dx(dx)
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
    _bernoulli_log_prob_bwd_kernel[(tiles * splits,)](
        grad_out, x, logits, dlogits, dx if has_dx else dlogits, part,
        tile_counters(logits.device, tiles, splits), P, D, R, k_loop, per_split, splits,
        HAS_DX=has_dx, ACC=acc_dtype(logits.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps,
    )


def _zero_dx(dx) -> None:
    # K == 0 samples (or P == 0 rows): dx is a sum over nothing. Not a path of
    # any training shape; kept out of the kernels.
    dx.zero_()
