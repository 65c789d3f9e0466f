"""Triton kernels of laplace_log_prob:
    out[k, p] = -sum_d(|x[p, d] - loc[k, p, d]| / b + log b + log 2),  b = exp(s)
and the fused backward.

Layout (set up by fastvae/_likelihood_layout.py, as gaussian_log_prob's):
loc (K, P, D); x (P, D), broadcast over K by indexing, never copied; the
log-scale s (K, P, D) per element (LAYOUT 0), (P, D) per x row (LAYOUT 1) or
(D,) per dimension (LAYOUT 2; a fixed scale). One launch forward, one
backward. The forward tiles the K * P decoder rows (about 4096 elements, 8
warps; loops over D). The backward, when nothing is summed over K (no dx, a
per-element or no scale gradient), tiles the decoder rows too; otherwise each
program owns a tile of x's rows x columns and loops over the samples: dloc
(and a per-element ds) per sample, dx and a per-row ds summed in registers and
written once. A per-dimension ds sums over every row: each program stores its
tile's partial, and the last program of each column block to finish adds them
in a fixed order. Where the tiles do not fill a wave the samples are split and
the last program of a tile adds the splits' partials in split order
(deterministic, no float atomics; _common.arrive_last).

Where x == loc exactly, |x - loc| / b is 0 whatever the scale (an underflowing
scale gives 1/b = inf: no 0 * inf = NaN), and sign(0) = 0: loc's gradient is
0 there, as torch's abs gives it.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import (
    acc_dtype,
    cdiv,
    load_layout,
    load_tile,
    sample_rows_of,
    scale_backward_plan,
    scale_layout,
    split_tile,
    store_scale_sums,
    store_tile,
    tile_columns,
    tile_geometry,
)

LOG_2: tl.constexpr = tl.constexpr(0.6931471805599453)

# -- math helpers -------------------------------------------------------------


@triton.jit
def _inv_off_ties(diff, inv):
    """1/b, 0 where x == loc: |x - loc| times it is 0 there even if 1/b
    overflowed, and sign(0) = 0 times it too."""
    return tl.where(diff == 0.0, 0.0, inv)


@triton.jit
def _dev_over_scale(diff, inv):
    """|x - loc| / b, 0 where x == loc even if 1/b overflowed."""
    return tl.abs(diff) * _inv_off_ties(diff, inv)


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["P", "KP"])
def _laplace_log_prob_fwd_kernel(
    x_ptr,  # (P, D)
    loc_ptr,  # (K, P, D) = (KP, D) decoder rows
    s_ptr,  # (K, P, D) | (P, D) | (D,)
    out_ptr,  # (K, P) = (KP,)
    P,
    KP,
    D,
    LAYOUT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r, r_ok, p, acc = sample_rows_of(BLOCK_R, KP, P, ACC)
    for d0 in range(0, D, BLOCK_D):
        cols, mask = tile_columns(d0, D, r_ok, BLOCK_D)
        x = load_tile(x_ptr, p, cols, mask, D, ACC)
        m = load_tile(loc_ptr, r, cols, mask, D, ACC)
        s = load_layout(s_ptr, r, p, cols, mask, D, D, LAYOUT, ACC)
        acc += tl.sum(tl.where(mask, _dev_over_scale(x - m, tl.exp(-s)) + s, 0.0), axis=1)
    out = -(acc + D * tl.full([BLOCK_R], LOG_2, ACC))  # log 2 in ACC, not float32
    tl.store(out_ptr + r, out.to(out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=["P", "R", "K", "K_PER", "SPLITS"])
def _laplace_log_prob_bwd_kernel(
    grad_out_ptr,  # (K, P)
    x_ptr,  # (P, D)
    loc_ptr,  # (K, P, D)
    s_ptr,  # (K, P, D) | (P, D) | (D,)
    dloc_ptr,  # (K, P, D)
    dx_ptr,  # (P, D), when HAS_DX
    ds_ptr,  # log_scale's shape, when HAS_DS
    part_dx_ptr,  # (SPLITS, P, D) ACC: partial dx of each split (SPLITS > 1)
    part_ds_ptr,  # LAYOUT 1: (SPLITS, P, D); LAYOUT 2: (row blocks * SPLITS, D): partial ds, ACC
    counter_ptr,  # int32: tiles counters, then (LAYOUT 2) column-block counters; 0 between launches
    P,
    D,
    R,  # rows the programs tile: P (LOOP_K) or K * P
    K,  # samples each program loops over: K (LOOP_K) or 1
    K_PER,  # samples per split
    SPLITS,
    LAYOUT: tl.constexpr,
    HAS_DX: tl.constexpr,
    HAS_DS: tl.constexpr,
    LOOP_K: tl.constexpr,  # programs own x rows and loop over the samples (something sums over K)
    TILE_SUMS: tl.constexpr,  # dx or a per-row ds: a sum over samples per tile element
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile, split, rows, cols, row_ok, col_ok, mask, k0, k1 = split_tile(R, D, K, K_PER, BLOCK_R, BLOCK_D)
    x_rows = rows if LOOP_K else rows % P
    x = load_tile(x_ptr, x_rows, cols, mask, D, ACC)
    if LAYOUT != 0:
        inv_shared = tl.exp(-load_layout(s_ptr, x_rows, x_rows, cols, mask, D, D, LAYOUT, ACC))
    dx_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    a_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)  # sum_k g |x - loc| / b, for a shared scale
    g_acc = tl.zeros([BLOCK_R], dtype=ACC)  # sum_k g, for a shared scale
    for k in range(k0, k1):
        r = k * R + rows
        g = tl.load(grad_out_ptr + r, mask=row_ok, other=0.0).to(ACC)
        m = load_tile(loc_ptr, r, cols, mask, D, ACC)
        diff = x - m
        if LAYOUT == 0:
            t = _inv_off_ties(diff, tl.exp(-load_layout(s_ptr, r, x_rows, cols, mask, D, D, LAYOUT, ACC)))
        else:
            t = _inv_off_ties(diff, inv_shared)
        q = tl.where(diff > 0.0, t, -t)  # sign(x - loc) / b, 0 at x == loc (t = 0 there)
        gl = g[:, None] * q
        if HAS_DS:  # |x - loc| / b = (x - loc) q
            if LAYOUT == 0:
                ds = g[:, None] * (diff * q - 1.0)
                store_tile(ds_ptr, r, cols, ds, mask, D)
            else:
                a_acc += diff * gl
                g_acc += g
        store_tile(dloc_ptr, r, cols, gl, mask, D)
        if HAS_DX:
            dx_acc -= gl
    # a per-row ds (LAYOUT 1), and this program's share of a per-dimension one
    # (LAYOUT 2): ds[d] = sum g |x - loc| / b[d] - sum g over its rows; what
    # the layout does not store, the compiler drops
    ds_row = tl.where(mask, a_acc - g_acc[:, None], 0.0)
    ds_col = tl.where(col_ok, tl.sum(tl.where(mask, a_acc, 0.0), axis=0) - tl.sum(g_acc, axis=0), 0.0)
    store_scale_sums(dx_acc, ds_row, ds_col, dx_ptr, ds_ptr, part_dx_ptr, part_ds_ptr, counter_ptr, rows, cols, col_ok,
                     mask, tile, split, R, D, SPLITS, LAYOUT, HAS_DX, HAS_DS, TILE_SUMS, ACC, BLOCK_R, BLOCK_D)


# -- launchers ----------------------------------------------------------------


def laplace_log_prob_forward(x, loc, log_scale, out) -> None:
    """out (K, P) <- log Laplace(x; loc, exp(log_scale)) summed over D; see the
    module docstring for shapes (every tensor contiguous)."""
    K, P, D = loc.shape
    if K * P == 0:
        return
    grid, meta = forward_plan(K, P, D, loc.dtype, loc.device, scale_layout(log_scale))
    _laplace_log_prob_fwd_kernel[grid](x, loc, log_scale, out, P, K * P, D, **meta)


def forward_plan(K: int, P: int, D: int, dtype: torch.dtype, device: torch.device,
                 layout: int) -> tuple[tuple[int], dict]:
    """(grid, meta) of the forward kernel for loc (K, P, D) of ``dtype`` (K * P > 0)
    and a scale parameter of ``layout``: the shapes' part of a launch, worked
    out once per call signature by the op's plans (op.py's LaplacePlan)."""
    BLOCK_R, BLOCK_D, warps = tile_geometry(D, device, dtype == torch.float64)
    return (cdiv(K * P, BLOCK_R),), dict(LAYOUT=layout, ACC=acc_dtype(dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                                         num_warps=warps)


def laplace_log_prob_backward(grad_out, x, loc, log_scale, dx, dloc, dlog_scale) -> None:
    """dloc (K, P, D) and, when they are not None, dlog_scale (log_scale's
    shape) and dx (P, D) <- gradients given grad_out (K, P)."""
    K, P, D = loc.shape
    if K * P * D == 0:
        for t in (dx, dlog_scale):
            if t is not None and t.numel():
                t.zero_()  # a sum over no samples or rows
        return
    has_dx, has_ds = dx is not None, dlog_scale is not None
    grid, part_dx, part_ds, counters, ints, meta = scale_backward_plan(K, P, D, scale_layout(log_scale), has_dx,
                                                                       has_ds, loc)
    _laplace_log_prob_bwd_kernel[grid](
        grad_out, x, loc, log_scale, dloc, dx if has_dx else dloc, dlog_scale if has_ds else dloc, part_dx, part_ds,
        counters, P, D, *ints, HAS_DS=has_ds, **meta)
