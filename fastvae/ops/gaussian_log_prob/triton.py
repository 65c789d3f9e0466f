"""Triton kernels of gaussian_log_prob:
    out[k, p] = -0.5 * sum_d((x[p, d] - mean[k, p, d])^2 / var + log var + log 2 pi)
with var = exp(v) or softplus(v) + delta, and the fused backward.

Layout (set up by fastvae/_likelihood_layout.py): mean (K, P, D); x (P, D),
broadcast over K by indexing, never copied; v (K, P, D) per element
(LAYOUT 0), (P, D) per x row (LAYOUT 1) or (D,) per dimension (LAYOUT 2).
One launch forward, one backward, no torch work around them: the
variance floor delta goes to the kernels as the bits of a float64 (read
exactly in float64, rounded once in float32). The forward tiles the K * P
decoder rows (BLOCK_R x BLOCK_D, about 4096 elements, 8 warps; loops over D).
The backward, when nothing is summed over K (no dx, a per-element or no
variance gradient), tiles the decoder rows too; otherwise each program owns a
tile of x's rows x columns and loops over the samples: dmean (and a
per-element dv) per sample, dx and a per-row variance's dv summed in
registers and written once. A per-dimension variance's dv sums over every
row: each program stores its tile's partial, and the last program of each
column block to finish adds them in a fixed order. Where the tiles do not
fill a wave (few x rows against many samples) the samples are split and the
last program of a tile adds the splits' partials in split order
(deterministic, no float atomics; _common.arrive_last).

Where x == mean exactly, (x - m)^2 / var is 0 whatever the variance, so an
underflowing variance (1/var = inf) gives no 0 * inf = NaN.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import (
    DIM,
    ELEMENT,
    ROW,
    acc_dtype,
    bound_buffers,
    bound_epilogue,
    bound_grad,
    cdiv,
    float64_arg,
    float64_bits,
    load_layout,
    load_tile,
    sample_rows_of,
    scale_backward_plan,
    scale_layout,
    sigmoid,
    softplus,
    split_tile,
    store_dterm,
    store_scale_sums,
    store_tile,
    tile_blocks,
    tile_columns,
    tile_geometry,
)

LOG_2PI: tl.constexpr = tl.constexpr(1.8378770664093453)
LAYOUTS = ELEMENT, ROW, DIM  # the variance parameter's, which the objectives' plans name from here

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
def _shared_dv(a, gsum, v, inv, SOFTPLUS: tl.constexpr):
    """dv of a variance shared by terms with A = sum g (x - m)^2 and G = sum g:
    0.5 (A / var - G) d log var / dv (0, not 0 * inf, where every x == m)."""
    if SOFTPLUS:
        return 0.5 * (inv * inv * a - inv * gsum) * sigmoid(v)
    else:
        return 0.5 * (tl.where(a == 0.0, 0.0, inv * a) - gsum)


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["P", "KP", "delta_bits", "term_bits", "divisor"])
def _gaussian_log_prob_fwd_kernel(
    x_ptr,  # (P, D)
    mean_ptr,  # (K, P, D) = (KP, D) decoder rows
    v_ptr,  # (K, P, D) | (P, D) | (D,)
    delta_bits,  # int64: the float64 bits of the softplus form's variance floor
    out_ptr,  # (K, P) = (KP,); with REDUCE a scalar
    term_ptr,  # (K, P): the objectives' latent term, when TERM (_common.bound_epilogue)
    part_ptr,  # (programs,) ACC partial sums, when REDUCE
    counter_ptr,  # one zeroed int32 arrival counter, when REDUCE
    P,
    KP,
    D,
    S,  # the decoder rows' stride (mean, a per-element v): D, or 2 D for the halves of one tensor
    term_bits,  # int64: the float64 bits of the term's weight
    divisor,  # REDUCE: the rows' sum is divided by this (a mean's row count, or 1)
    TERM: tl.constexpr,
    REDUCE: tl.constexpr,
    LAYOUT: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r, r_ok, p, acc = sample_rows_of(BLOCK_R, KP, P, ACC)
    delta = float64_arg(delta_bits, ACC)
    for d0 in range(0, D, BLOCK_D):
        cols, mask = tile_columns(d0, D, r_ok, BLOCK_D)
        x = load_tile(x_ptr, p, cols, mask, D, ACC)
        m = load_tile(mean_ptr, r, cols, mask, S, ACC)
        inv, log_var = _inv_and_log_var(load_layout(v_ptr, r, p, cols, mask, D, S, LAYOUT, ACC), delta, SOFTPLUS)
        diff = x - m
        acc += tl.sum(tl.where(mask, diff * _over_var(diff, inv) + log_var, 0.0), axis=1)
    out = -0.5 * (acc + D * tl.full([BLOCK_R], LOG_2PI, ACC))  # log 2 pi in ACC, not float32
    bound_epilogue(out, r, r_ok, out_ptr, term_ptr, term_bits, part_ptr, counter_ptr, divisor, TERM, REDUCE, ACC)


@triton.jit(do_not_specialize=["P", "R", "K", "K_PER", "SPLITS", "delta_bits", "term_bits", "g_divisor", "dv_offset"])
def _gaussian_log_prob_bwd_kernel(
    grad_out_ptr,  # (K, P); with G_SCALAR a scalar (the reduced bound's gradient)
    x_ptr,  # (P, D)
    mean_ptr,  # (K, P, D)
    v_ptr,  # (K, P, D) | (P, D) | (D,)
    delta_bits,  # int64: float64 bits of delta
    dmean_ptr,  # (K, P, D)
    dx_ptr,  # (P, D), when HAS_DX
    dv_ptr,  # var_param's shape, when HAS_DV
    part_dx_ptr,  # (SPLITS, P, D) ACC: partial dx of each split (SPLITS > 1)
    part_dv_ptr,  # LAYOUT 1: (SPLITS, P, D); LAYOUT 2: (row blocks * SPLITS, D): partial dv, ACC
    counter_ptr,  # int32: tiles counters, then (LAYOUT 2) column-block counters; 0 between launches
    dterm_ptr,  # (K, P): the latent term's gradient, when HAS_DTERM (_common.store_dterm)
    P,
    D,
    S,  # the decoder rows' stride (mean, dmean, a per-element v and dv): D, or 2 D for halves of one tensor
    R,  # rows the programs tile: P (LOOP_K) or K * P
    K,  # samples each program loops over: K (LOOP_K) or 1
    K_PER,  # samples per split
    SPLITS,
    term_bits,  # int64: the float64 bits of the term's weight
    g_divisor,  # G_SCALAR: each row's gradient is grad_out[0] / g_divisor
    dv_offset,  # dv starts this many elements past dv_ptr (the plans: dmean's buffer, whose second half dv is)
    G_SCALAR: tl.constexpr,
    HAS_DTERM: tl.constexpr,
    LAYOUT: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_DX: tl.constexpr,
    HAS_DV: tl.constexpr,
    LOOP_K: tl.constexpr,  # programs own x rows and loop over the samples (something sums over K)
    TILE_SUMS: tl.constexpr,  # dx or a per-row dv: a sum over samples per tile element
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile, split, rows, cols, row_ok, col_ok, mask, k0, k1 = split_tile(R, D, K, K_PER, BLOCK_R, BLOCK_D)
    dv_ptr += dv_offset
    row_blocks, tiles, rb, cb = tile_blocks(tile, R, D, BLOCK_R, BLOCK_D)
    x_rows = rows if LOOP_K else rows % P
    delta = float64_arg(delta_bits, ACC)
    x = load_tile(x_ptr, x_rows, cols, mask, D, ACC)
    if LAYOUT != 0:
        v_shared = load_layout(v_ptr, x_rows, x_rows, cols, mask, D, S, LAYOUT, ACC)
        inv_shared, log_var_unused = _inv_and_log_var(v_shared, delta, SOFTPLUS)
    dx_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    a_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)  # sum_k g (x - m)^2, for a shared variance
    g_acc = tl.zeros([BLOCK_R], dtype=ACC)  # sum_k g, for a shared variance
    for k in range(k0, k1):
        r = k * R + rows
        g = bound_grad(grad_out_ptr, r, row_ok, g_divisor, G_SCALAR, ACC)
        if HAS_DTERM:
            store_dterm(g, r, row_ok, cb, dterm_ptr, term_bits, ACC)
        m = load_tile(mean_ptr, r, cols, mask, S, ACC)
        diff = x - m
        if LAYOUT == 0:
            v = load_layout(v_ptr, r, x_rows, cols, mask, D, S, LAYOUT, ACC)
            inv, log_var_unused = _inv_and_log_var(v, delta, SOFTPLUS)
            if HAS_DV:
                if SOFTPLUS:
                    dv = 0.5 * g[:, None] * (diff * diff * inv * inv - inv) * sigmoid(v)
                else:
                    dv = 0.5 * g[:, None] * (diff * _over_var(diff, inv) - 1.0)
                store_tile(dv_ptr, r, cols, dv, mask, S)
        else:
            inv = inv_shared
            if HAS_DV:
                a_acc += g[:, None] * diff * diff
                g_acc += g
        gm = g[:, None] * _over_var(diff, inv)
        store_tile(dmean_ptr, r, cols, gm, mask, S)
        if HAS_DX:
            dx_acc -= gm
    dv_row = dx_acc  # dv_row and dv_col are stored only where the layout has them
    dv_col = dx_acc
    if LAYOUT == 1 and HAS_DV:
        dv_row = tl.where(mask, _shared_dv(a_acc, g_acc[:, None], v_shared, inv_shared, SOFTPLUS), 0.0)
    if LAYOUT == 2 and HAS_DV:
        # this program's share of dv[d] = 0.5 (A[d] / var[d] - G) ..., linear in (A, G)
        v_col = tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        inv_col, log_var_unused = _inv_and_log_var(v_col, delta, SOFTPLUS)
        a_col = tl.sum(tl.where(mask, a_acc, 0.0), axis=0)
        dv_col = tl.where(col_ok, _shared_dv(a_col, tl.sum(g_acc, axis=0), v_col, inv_col, SOFTPLUS), 0.0)
    store_scale_sums(dx_acc, dv_row, dv_col, dx_ptr, dv_ptr, part_dx_ptr, part_dv_ptr, counter_ptr, rows, cols, col_ok,
                     mask, tile, split, R, D, SPLITS, LAYOUT, HAS_DX, HAS_DV, TILE_SUMS, ACC, BLOCK_R, BLOCK_D)


# -- launchers ----------------------------------------------------------------


def _row_stride(mean, *per_element) -> int:
    """The stride of the decoder rows of mean (K, P, D), which every
    per-element tensor (v, dmean, dv of LAYOUT 0) shares: D when contiguous,
    2 D for the (mean, logvar) halves of one decoder output (K, P, 2 D), which
    are read and written in place (no copies; the gradients go into one
    (K, P, 2 D) buffer)."""
    K, P, D = mean.shape
    S = mean.stride(1) if P > 1 else (mean.stride(0) // P if K > 1 else D)
    for t in (mean, *(t for t in per_element if t is not None and t.dim() == 3)):
        assert t.stride(2) == 1 or D == 1, "decoder rows must be contiguous"
        assert (P == 1 or t.stride(1) == S) and (K == 1 or t.stride(0) == P * S), "one row stride"
    return S


def gaussian_log_prob_forward(x, mean, var_param, softplus_mode: bool, delta: float, out, term=None,
                              weight: float = 0.0, divisor: int | None = None) -> None:
    """out (K, P) <- log N(x; mean, var(var_param)) summed over D; see the module
    docstring for shapes. With ``term`` (K, P) plus weight * term, and with
    ``divisor`` out a scalar: the sum over the rows divided by divisor (the
    objectives' bound, _common.bound_epilogue; K * P > 0 then)."""
    K, P, D = mean.shape
    if K * P == 0:
        return
    reduce = divisor is not None
    grid, meta = forward_plan(K, P, D, mean.dtype, mean.device, scale_layout(var_param), softplus_mode,
                              term is not None, reduce)
    part, counter = bound_buffers(grid[0], mean.dtype, out, reduce)
    _gaussian_log_prob_fwd_kernel[grid](
        x, mean, var_param, float64_bits(delta), out, out if term is None else term, part, counter, P, K * P, D,
        _row_stride(mean, var_param), 0 if term is None else float64_bits(weight), 1 if divisor is None else divisor,
        **meta)


def forward_plan(K: int, P: int, D: int, dtype: torch.dtype, device: torch.device, layout: int, softplus_mode: bool,
                 term: bool = False, reduce: bool = False) -> tuple[tuple[int], dict]:
    """(grid, meta) of the forward kernel for mean (K, P, D) of ``dtype`` (K * P > 0):
    the shapes' part of a launch, worked out once per call signature by the
    objectives' plans (fastvae/_plan.py). ``term`` and ``reduce``: the
    objectives' bound (_common.bound_epilogue)."""
    BLOCK_R, BLOCK_D, warps = tile_geometry(D, device, dtype == torch.float64)
    return (cdiv(K * P, BLOCK_R),), dict(
        TERM=term, REDUCE=reduce, LAYOUT=layout, SOFTPLUS=softplus_mode, ACC=acc_dtype(dtype), BLOCK_R=BLOCK_R,
        BLOCK_D=BLOCK_D, num_warps=warps)


def gaussian_log_prob_backward(grad_out, x, mean, var_param, softplus_mode: bool, delta: float, dx, dmean,
                               dvar_param, dterm=None, weight: float = 0.0, g_divisor: int | None = None) -> None:
    """dmean (K, P, D) and, when they are not None, dvar_param (var_param's shape) and dx (P, D)
    <- gradients given grad_out (K, P); with ``g_divisor`` grad_out is a
    scalar, each row's gradient grad_out / g_divisor, and with ``dterm`` (K,
    P) <- weight times each row's gradient (the objectives' bound)."""
    K, P, D = mean.shape
    if K * P * D == 0:
        for t in (dx, dvar_param):
            if t is not None and t.numel():
                t.zero_()  # a sum over no samples or rows: no training shape takes this path
        return
    layout = scale_layout(var_param)
    has_dx, has_dv = dx is not None, dvar_param is not None
    grid, part_dx, part_dv, counters, ints, meta = scale_backward_plan(K, P, D, layout, has_dx, has_dv, mean)
    dv, dv_offset = dvar_param if has_dv else dmean, 0
    if (has_dv and layout == ELEMENT and dvar_param._base is not None and dvar_param._base is dmean._base
            and dvar_param.storage_offset() > dmean.storage_offset()):
        # dmean and dvar_param the halves of one buffer: dv addressed from dmean's
        # start, as the objectives' plans do (one pointer alignment, one variant)
        dv, dv_offset = dmean, dvar_param.storage_offset() - dmean.storage_offset()
    _gaussian_log_prob_bwd_kernel[grid](
        grad_out, x, mean, var_param, float64_bits(delta), dmean, dx if has_dx else dmean, dv, part_dx, part_dv,
        counters, dmean if dterm is None else dterm, P, D, _row_stride(mean, var_param, dmean, dvar_param), *ints,
        0 if dterm is None else float64_bits(weight), 1 if g_divisor is None else g_divisor, dv_offset,
        G_SCALAR=g_divisor is not None, HAS_DTERM=dterm is not None, SOFTPLUS=softplus_mode, HAS_DV=has_dv, **meta)


def pointwise_backward_plan(K: int, P: int, D: int, dtype: torch.dtype, device: torch.device, layout: int,
                            has_dv: bool, g_scalar: bool = False, has_dterm: bool = False) -> tuple[tuple[int], dict]:
    """(grid, meta) of the backward without dx where nothing is summed over
    samples (no partial sums), as gaussian_log_prob_backward launches it: a
    per-element log-variance with its gradient (the objectives' (mean, logvar)
    decoder: layout ELEMENT, has_dv) or a fixed (D,) one without (a mean
    alone, unit variance: layout DIM). The other integers are (P, D, row
    stride, K * P, 1, 1, 1, the term's weight bits, the gradient's divisor,
    dv's offset).
    ``g_scalar`` and ``has_dterm``: the objectives' bound (_common.bound_grad,
    store_dterm)."""
    assert layout == ELEMENT or not has_dv, "a DIM or ROW variance gradient sums over rows"
    BLOCK_R, BLOCK_D, warps = tile_geometry(D, device, dtype == torch.float64, 4096, 1024)
    tiles = cdiv(K * P, BLOCK_R) * cdiv(D, BLOCK_D)
    return (tiles,), dict(
        G_SCALAR=g_scalar, HAS_DTERM=has_dterm, LAYOUT=layout, SOFTPLUS=False, HAS_DX=False, HAS_DV=has_dv,
        LOOP_K=False, TILE_SUMS=False, ACC=acc_dtype(dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps)
