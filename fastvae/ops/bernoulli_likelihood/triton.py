"""The Triton kernels of bernoulli_log_prob and continuous_bernoulli_log_prob:
one forward and one backward kernel whose per-element formula is the
constexpr KIND (BERNOULLI 0, CONTINUOUS 1), side by side in _log_prob_term
and _dlogit:
    out[k, p] = sum_d(x[p, d] l - softplus(l) [+ log C(l)]),  l = logits[k, p, d],
    dlogits = g (x - sigmoid(l) [+ d log C / dl]),  dx = sum_k g l,
C(l) = l / tanh(l / 2) the continuous Bernoulli's normalizer, whose
derivative is 1/l - 1/sinh(l). log C and its derivative take a Taylor series
in l^2 below |l| = TAYLOR_BELOW (both are 0 / 0 or cancel at l = 0), else the
closed forms in t = e^-|l| (the coefficients are the oracle's CB_TAYLOR,
fastvae/ops/bernoulli_likelihood/__init__.py; bernoulli_likelihood.h says why
the branch points are 1 for float32 and 0.25 for float64). Each op's launchers,
<op>_forward and <op>_backward, are at the end.

Layout: logits (K, P, D); x (P, D) broadcast over K by indexing, never copied.
One launch forward, one backward, no torch work around them:
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

from fastvae.kernels._common import (
    acc_dtype,
    accumulation_dtype,
    bound_buffers,
    bound_epilogue,
    bound_grad,
    cdiv,
    float64_bits,
    load_tile,
    log1p_unit,
    sample_rows_of,
    sigmoid,
    softplus,
    split_samples,
    split_tile,
    store_dterm,
    store_split_sums,
    store_tile,
    tile_columns,
    tile_counters,
    tile_geometry,
)

BERNOULLI = 0
CONTINUOUS = 1

LOG2: tl.constexpr = tl.constexpr(0.6931471805599453)


def taylor_below(kind: int, dtype: torch.dtype) -> float:
    """The branch point of log C's Taylor series for an accumulation in
    ``dtype``'s rule (0.0, unused, for the Bernoulli)."""
    if kind == BERNOULLI:
        return 0.0
    return 0.25 if accumulation_dtype(dtype) == torch.float64 else 1.0


# -- the continuous Bernoulli's log normalizer ----------------------------------


# The series' coefficients for Horner's rule, highest power first: log C(l) - log 2 =
# u sum_n a_n u^(n-1) (_series) and (d log C / dl) / l = sum_n 2 n a_n u^(n-1) (_series_grad), n = 1..8
_SERIES: tl.constexpr = tl.constexpr((
    -1.3883706783700259e-09, 1.565947953183403e-08, -1.8027895356488832e-07, 2.1336045641601195e-06,
    -2.6248346560846562e-05, 3.4171075837742505e-04, -4.861111111111111e-03, 8.333333333333333e-02))
_SERIES_GRAD: tl.constexpr = tl.constexpr((
    -2.2213930853920414e-08, 2.192327134456764e-07, -2.1633474427786596e-06, 2.1336045641601196e-05,
    -2.099867724867725e-04, 2.05026455026455e-03, -1.9444444444444445e-02, 1.6666666666666666e-01))


@triton.jit
def _horner(u, COEFFS: tl.constexpr):
    """sum_i COEFFS[i] u^(7-i) of the 8 coefficients, highest power first."""
    p = COEFFS[0] * u + COEFFS[1]
    for i in tl.static_range(2, 8):
        p = p * u + COEFFS[i]
    return p


@triton.jit
def _series(u):
    """sum_n a_n u^n, n = 1..8: log C(l) - log 2 at u = l^2."""
    return _horner(u, _SERIES) * u


@triton.jit
def _series_grad(u):
    """sum_n 2n a_n u^(n-1): (d log C / dl) / l at u = l^2."""
    return _horner(u, _SERIES_GRAD)


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


# -- the two formulas -----------------------------------------------------------


@triton.jit
def _weighted(w, s):
    """w * s with 0 * inf = 0: a zero weight on a saturated softplus adds nothing."""
    return tl.where(w == 0.0, 0.0, w * s)


@triton.jit
def _log_prob_term(x, lg, KIND: tl.constexpr, TAYLOR_BELOW: tl.constexpr):
    """x l - softplus(l) as -(x softplus(-l) + (1 - x) softplus(l)); the
    Bernoulli's saturated logits (+-inf) give 0 where the outcome is certain
    and right, -inf where it is certain and wrong, never NaN. The continuous
    Bernoulli (finite logits) adds log C(l)."""
    if KIND == 0:
        return -(_weighted(x, softplus(-lg)) + _weighted(1.0 - x, softplus(lg)))
    else:
        return -(x * softplus(-lg) + (1.0 - x) * softplus(lg)) + log_norm(lg, TAYLOR_BELOW)


@triton.jit
def _dlogit(g, x, lg, KIND: tl.constexpr, TAYLOR_BELOW: tl.constexpr):
    """g (x - sigmoid(l)), exactly 0 where a saturated logit is right; the
    continuous Bernoulli adds g d log C / dl."""
    if KIND == 0:
        return _weighted(g, x - sigmoid(lg))
    else:
        return g * (x - sigmoid(lg) + log_norm_grad(lg, TAYLOR_BELOW))


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["P", "KP", "term_bits", "divisor"])
def _bernoulli_log_prob_fwd_kernel(
    x_ptr,  # (P, D)
    logits_ptr,  # (K, P, D) = (KP, D) decoder rows
    out_ptr,  # (K, P) = (KP,); with REDUCE a scalar
    term_ptr,  # (K, P): the objectives' latent term, when TERM (_common.bound_epilogue)
    part_ptr,  # (programs,) ACC partial sums, when REDUCE
    counter_ptr,  # one zeroed int32 arrival counter, when REDUCE
    P,
    KP,
    D,
    term_bits,  # int64: the float64 bits of the term's weight
    divisor,  # REDUCE: the rows' sum is divided by this (a mean's row count, or 1)
    KIND: tl.constexpr,
    TERM: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC: tl.constexpr,
    TAYLOR_BELOW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r, r_ok, p, acc = sample_rows_of(BLOCK_R, KP, P, ACC)
    for d0 in range(0, D, BLOCK_D):
        cols, mask = tile_columns(d0, D, r_ok, BLOCK_D)
        x = load_tile(x_ptr, p, cols, mask, D, ACC)
        lg = load_tile(logits_ptr, r, cols, mask, D, ACC)
        acc += tl.sum(tl.where(mask, _log_prob_term(x, lg, KIND, TAYLOR_BELOW), 0.0), axis=1)
    bound_epilogue(acc, r, r_ok, out_ptr, term_ptr, term_bits, part_ptr, counter_ptr, divisor, TERM, REDUCE, ACC)


@triton.jit(do_not_specialize=["P", "R", "K", "K_PER", "SPLITS", "term_bits", "g_divisor"])
def _bernoulli_log_prob_bwd_kernel(
    grad_out_ptr,  # (K, P); with G_SCALAR a scalar (the reduced bound's gradient)
    x_ptr,  # (P, D)
    logits_ptr,  # (K, P, D)
    dlogits_ptr,  # (K, P, D)
    dx_ptr,  # (P, D), when HAS_DX
    part_ptr,  # (SPLITS, P, D) ACC: partial dx of each split, when SPLITS > 1
    counter_ptr,  # (tiles,) int32 arrival counters, zero between launches, when SPLITS > 1
    dterm_ptr,  # (K, P): the latent term's gradient, when HAS_DTERM (_common.store_dterm)
    P,
    D,
    R,  # rows the programs tile: P (HAS_DX: each loops over the samples) or K * P
    K,  # samples each tile loops over: K (HAS_DX) or 1
    K_PER,  # samples per split
    SPLITS,
    term_bits,  # int64: the float64 bits of the term's weight
    g_divisor,  # G_SCALAR: each row's gradient is grad_out[0] / g_divisor
    KIND: tl.constexpr,
    G_SCALAR: tl.constexpr,
    HAS_DTERM: tl.constexpr,
    HAS_DX: tl.constexpr,
    ACC: tl.constexpr,
    TAYLOR_BELOW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile, split, rows, cols, row_ok, col_ok, mask, k0, k1 = split_tile(R, D, K, K_PER, BLOCK_R, BLOCK_D)
    x_rows = rows if HAS_DX else rows % P
    x = load_tile(x_ptr, x_rows, cols, mask, D, ACC)
    dx_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    col_block = tile % tl.cdiv(D, BLOCK_D)
    for k in range(k0, k1):
        r = k * R + rows
        g_row = bound_grad(grad_out_ptr, r, row_ok, g_divisor, G_SCALAR, ACC)
        if HAS_DTERM:
            store_dterm(g_row, r, row_ok, col_block, dterm_ptr, term_bits, ACC)
        g = g_row[:, None]
        lg = load_tile(logits_ptr, r, cols, mask, D, ACC)
        dl = _dlogit(g, x, lg, KIND, TAYLOR_BELOW)
        store_tile(dlogits_ptr, r, cols, dl, mask, D)
        if HAS_DX:
            dx_acc += g * lg
    if HAS_DX:
        idx = rows[:, None] * D + cols[None, :]
        store_split_sums(dx_acc, dx_acc, dx_ptr, dx_ptr, part_ptr, part_ptr, idx, mask, split, R, D,
                         counter_ptr, tile, SPLITS, True, False)


# -- launchers ----------------------------------------------------------------


def forward_plan(kind: int, K: int, P: int, D: int, dtype: torch.dtype, device: torch.device, term: bool = False,
                 reduce: bool = False) -> tuple[tuple[int], dict]:
    """(grid, meta) of the forward kernel for logits (K, P, D) of ``dtype``
    (K * P > 0): the shapes' part of a launch, worked out once per call
    signature by the objectives' plans (fastvae/_plan.py), on every call by
    bernoulli_forward. ``term`` and ``reduce``: the objectives' bound
    (_common.bound_epilogue)."""
    fp64 = dtype == torch.float64
    BLOCK_R, BLOCK_D, warps = tile_geometry(D, device, fp64)
    if kind == CONTINUOUS and fp64 and device.type != "cpu":
        # float64 log C (a polynomial and three libdevice logs) spilled 16 bytes
        # on sm_80 at 4 elements a thread: 2 a thread (8 warps over 512)
        BLOCK_R, BLOCK_D, warps = 1, min(BLOCK_D, 512), 8
    return (cdiv(K * P, BLOCK_R),), dict(
        KIND=kind, TERM=term, REDUCE=reduce, ACC=acc_dtype(dtype), TAYLOR_BELOW=taylor_below(kind, dtype),
        BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps)


def bernoulli_forward(kind: int, x, logits, out, term=None, weight: float = 0.0, divisor: int | None = None
                      ) -> None:
    """out (K, P) <- the formula KIND summed over D, for x (P, D), logits (K, P, D);
    with ``term`` (K, P) plus weight * term, and with ``divisor`` out a
    scalar: the sum over the rows divided by divisor (the objectives' bound,
    _common.bound_epilogue; K * P > 0 then)."""
    K, P, D = logits.shape
    if K * P == 0:
        return
    reduce = divisor is not None
    grid, meta = forward_plan(kind, K, P, D, logits.dtype, logits.device, term is not None, reduce)
    part, counter = bound_buffers(grid[0], logits.dtype, out, reduce)
    _bernoulli_log_prob_fwd_kernel[grid](
        x, logits, out, out if term is None else term, part, counter, P, K * P, D,
        0 if term is None else float64_bits(weight), 1 if divisor is None else divisor, **meta)


# Backward tiles: dx's accumulator stays live across the loop over samples.
BACKWARD_TILE = 1024
BACKWARD_MAX_COLS = 256


def backward_plan(kind: int, K: int, P: int, D: int, dtype: torch.dtype, device: torch.device, has_dx: bool,
                  g_scalar: bool = False, has_dterm: bool = False) -> tuple[tuple[int], dict, tuple[int, ...], int]:
    """(grid, meta, the runtime integers (P, D, R, K loop, samples per split,
    splits), tiles) of the backward kernel for logits (K, P, D) (K * P * D > 0);
    ``g_scalar`` and ``has_dterm``: the objectives' bound (_common.bound_grad,
    store_dterm)."""
    BLOCK_R, BLOCK_D, warps = tile_geometry(D, device, dtype == torch.float64,
                                            BACKWARD_TILE if has_dx else 4096,
                                            BACKWARD_MAX_COLS if has_dx else 1024)
    R, k_loop = (P, K) if has_dx else (K * P, 1)
    tiles = cdiv(R, BLOCK_R) * cdiv(D, BLOCK_D)
    splits, per_split = split_samples(tiles, K, device) if has_dx else (1, 1)
    return (tiles * splits,), dict(
        KIND=kind, G_SCALAR=g_scalar, HAS_DTERM=has_dterm, HAS_DX=has_dx, ACC=acc_dtype(dtype),
        TAYLOR_BELOW=taylor_below(kind, dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps), (
        P, D, R, k_loop, per_split, splits), tiles


def backward_part_shape(ints: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the backward's partial sums over sample splits, for
    backward_plan's runtime integers: (splits, P, D), or (1,), a placeholder
    the kernel never touches, where nothing is split."""
    P, D, splits = ints[0], ints[1], ints[-1]
    return (splits, P, D) if splits > 1 else (1,)


def backward_part(ints: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh buffer of backward_part_shape, in the accumulation dtype (the
    op's plans keep a template of it instead: fastvae._launch.template)."""
    return torch.empty(backward_part_shape(ints), dtype=accumulation_dtype(dtype), device=device)


def bernoulli_backward(kind: int, grad_out, x, logits, dx, dlogits, dterm=None, weight: float = 0.0,
                       g_divisor: int | None = None) -> None:
    """dlogits (K, P, D) and, when dx is not None, dx (P, D) <- gradients of
    the formula KIND given grad_out (K, P); with ``g_divisor`` grad_out is a
    scalar, each row's gradient grad_out / g_divisor, and with ``dterm`` (K,
    P) <- weight times each row's gradient (the objectives' bound)."""
    K, P, D = logits.shape
    if K * P * D == 0:
        if dx is not None and dx.numel():
            # K == 0 samples (or P == 0 rows): dx is a sum over nothing. Not a
            # path of any training shape; kept out of the kernels.
            dx.zero_()
        return
    has_dx = dx is not None
    grid, meta, ints, tiles = backward_plan(kind, K, P, D, logits.dtype, logits.device, has_dx,
                                            g_divisor is not None, dterm is not None)
    part = backward_part(ints, logits.dtype, logits.device)
    _bernoulli_log_prob_bwd_kernel[grid](
        grad_out, x, logits, dlogits, dx if has_dx else dlogits, part,
        tile_counters(logits.device, tiles, ints[-1]), dlogits if dterm is None else dterm, *ints,
        0 if dterm is None else float64_bits(weight), 1 if g_divisor is None else g_divisor, **meta)


# -- the ops' launchers ----------------------------------------------------------
# bernoulli_log_prob:
#     out[k, p] = sum_d(x[p, d] * l - softplus(l)),  l = logits[k, p, d],
# and the fused backward dlogits = g (x - sigmoid(l)), dx = sum_k g l: the
# kernels above with KIND = BERNOULLI.


def bernoulli_log_prob_forward(x, logits, out, term=None, weight: float = 0.0, divisor: int | None = None) -> None:
    """out (K, P) <- sum_d(x l - softplus(l)) for x (P, D), logits (K, P, D);
    ``term``, ``weight``, ``divisor``: the objectives' bound (bernoulli_forward)."""
    bernoulli_forward(BERNOULLI, x, logits, out, term, weight, divisor)


def bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits, dterm=None, weight: float = 0.0,
                                g_divisor: int | None = None) -> None:
    """dlogits (K, P, D) and, when dx is not None, dx (P, D) <- gradients given grad_out (K, P);
    ``dterm``, ``weight``, ``g_divisor``: the objectives' bound (bernoulli_backward)."""
    bernoulli_backward(BERNOULLI, grad_out, x, logits, dx, dlogits, dterm, weight, g_divisor)


# continuous_bernoulli_log_prob:
#     out[k, p] = sum_d(x[p, d] l - softplus(l) + log C(l)),  l = logits[k, p, d],
# C(l) = l / tanh(l / 2) the continuous Bernoulli's normalizer, and the fused
# backward dlogits = g (x - sigmoid(l) + 1/l - 1/sinh(l)), dx = sum_k g l: the
# kernels above with KIND = CONTINUOUS (log C's Taylor and closed-form branches).


def continuous_bernoulli_log_prob_forward(x, logits, out) -> None:
    """out (K, P) <- sum_d(x l - softplus(l) + log C(l)) for x (P, D), logits (K, P, D)."""
    bernoulli_forward(CONTINUOUS, x, logits, out)


def continuous_bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """dlogits (K, P, D) and, when dx is not None, dx (P, D) <- gradients given grad_out (K, P)."""
    bernoulli_backward(CONTINUOUS, grad_out, x, logits, dx, dlogits)
