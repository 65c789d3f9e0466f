"""Triton kernels of the count likelihoods (poisson_log_prob,
negative_binomial_log_prob, zinb_log_prob): the math of count_log_prob.h
(its header explains the forms: lgamma and digamma of positive arguments by
shifting to 10 and Stirling, the NB normalizer split into a "Poisson side"
theta >= 10, theta >= x + 1, where x log theta is folded into the x term so
theta -> inf tends to Poisson without cancellation, a large-count Stirling
form and a direct one), one forward and one backward kernel whose
per-element formula is the constexpr KIND (0 Poisson, 1 NB, 2 ZINB), and
each op's launchers, which call them with its KIND:
- poisson_log_prob: out[k, p] = sum_d(x l - e^l - lgamma(x + 1)),
  l = log_rate[k, p, d], and the backward dlog_rate = g (x - e^l);
- negative_binomial_log_prob: scvi-tools' log_nb_positive in log mean / log
  theta, with log theta per element (K, P, D) or per gene (D,);
- zinb_log_prob: scvi-tools' log_zinb_positive (log mean, log theta per
  element or per gene, zero-inflation logits).

Layout: x (P, D) broadcast over K by indexing; log_mean (the Poisson log rate)
and zi_logits (K, P, D); log_theta (K, P, D) or per gene (D,) (THETA_DIM).
Programs tile the K * P decoder rows (BLOCK_R rows x BLOCK_D columns, about
4096 elements: _common.tile_geometry); the forward loops over D. The
backward writes the per-element gradients, and for a per-gene log_theta each
program's column sums of its rows into a (row tiles, D) float32/float64
buffer, which the last program of each column block to finish adds in
row-tile order (_common.arrive_last: deterministic, no float atomics, no
torch work after the launch).
Only libdevice-free tl.log / tl.exp are used, so the interpreter runs them.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import (
    acc_dtype,
    accumulation_dtype,
    arrive_last,
    cdiv,
    load_tile,
    log1p_unit,
    sample_rows_of,
    sigmoid,
    softplus,
    tile_counters,
    tile_geometry,
)

POISSON = 0
NB = 1
ZINB = 2

# Elements per program: the lgamma/digamma series keep many values live per
# element, so tiles are smaller than the other likelihoods' 4096: at 1024 the forward
# spills on sm_90 (255 registers), at 512 neither kernel does (python -m fastvae.kernels.aot).
FORWARD_TILE = 512
BACKWARD_TILE = 512
MAX_COLS = 256

# -- math helpers -------------------------------------------------------------


@triton.jit
def _stirling_corr(z):
    """lgamma(z) - ((z - 1/2) log z - z + log(2 pi)/2) for z >= 10."""
    iz = 1.0 / z
    iz2 = iz * iz
    return iz * (1.0 / 12 - iz2 * (1.0 / 360 - iz2 * (1.0 / 1260 - iz2 * (1.0 / 1680 - iz2 * (1.0 / 1188)))))


@triton.jit
def _digamma_corr(z):
    """log z - 1/(2z) - digamma(z) for z >= 10."""
    iz2 = 1.0 / (z * z)
    return iz2 * (1.0 / 12 - iz2 * (1.0 / 120 - iz2 * (1.0 / 252 - iz2 * (1.0 / 240 - iz2 * (1.0 / 132)))))


@triton.jit
def _lgamma_pos(z):
    """lgamma(z), z > 0: shifted to w >= 10, then Stirling."""
    w = z
    prod = tl.zeros_like(z) + 1.0
    for _ in tl.static_range(10):
        c = w < 10.0
        prod = tl.where(c, prod * w, prod)
        w = tl.where(c, w + 1.0, w)
    return (w - 0.5) * tl.log(w) - w + 0.91893853320467274178 + _stirling_corr(w) - tl.log(prod)


@triton.jit
def _digamma_pos(z):
    """digamma(z), z > 0, the same way."""
    w = z
    acc = tl.zeros_like(z)
    for _ in tl.static_range(10):
        c = w < 10.0
        acc = tl.where(c, acc + 1.0 / w, acc)
        w = tl.where(c, w + 1.0, w)
    return tl.log(w) - 0.5 / w - _digamma_corr(w) - acc


@triton.jit
def _log1p_any(v):
    """log1p(v) for v > -1 (Goldberg's correction)."""
    u = 1.0 + v
    du = u - 1.0
    return tl.where(du == 0.0, v, tl.log(u) * (v / tl.where(du == 0.0, 1.0, du)))


@triton.jit
def _log1p_horner(s, p0, HI: tl.constexpr, LO: tl.constexpr):
    """Horner from p0 through the log1p series' coefficients (-1)^(k+1)/k, k = HI down to LO."""
    p = tl.zeros_like(s) + p0
    for k in tl.static_range(HI, LO - 1, -1):
        p = p * s + (1.0 if k % 2 == 1 else -1.0) / k
    return p


@triton.jit
def _log1pmx_poly(s):
    """(log1p(s) - s) / s^2 = -1/2 + s/3 - ... (15 terms) for |s| < 0.1."""
    return _log1p_horner(s, -1.0 / 16, 15, 2)


@triton.jit
def _log1pmx(s):
    small = tl.abs(s) < 0.1
    return tl.where(small, s * s * _log1pmx_poly(s), _log1p_any(s) - s)


@triton.jit
def _log1pmx_over(t):
    """(log1p(t) - t) / t for t in [0, 1]."""
    small = t < 0.1
    return tl.where(small, t * _log1pmx_poly(t), (log1p_unit(t) - t) / tl.where(small, 1.0, t))


@triton.jit
def _log1p_over(u, log1p_u):
    """log1p(u) / u for u in [0, 1] (1 at 0): sum (-u)^n / (n + 1), n <= 12."""
    p = _log1p_horner(u, 1.0 / 13, 12, 1)
    small = u < 0.05
    return tl.where(small, p, log1p_u / tl.where(small, 1.0, u))


@triton.jit
def _sigmoid_minus_log1p_over(u, log1p_u):
    """1/(1 + u) - log1p(u)/u for u in [0, 1]."""
    t = -u
    p = tl.zeros_like(t) + (12.0 / 13)
    for k in tl.static_range(12, 1, -1):
        p = p * t + (k - 1.0) / k
    small = u < 0.05
    return tl.where(small, -u * p, 1.0 / (1.0 + u) - log1p_u / tl.where(small, 1.0, u))


@triton.jit
def _poisson_side(x, theta):
    return (theta >= 10.0) & (theta >= x + 1.0)


@triton.jit
def _nb_lgamma_term(x, theta):
    """lgamma(x + theta) - lgamma(theta) - lgamma(x + 1), minus x log theta on the Poisson side; 0 at x = 0."""
    y = x + 1.0
    lg_y = _lgamma_pos(y)
    lg_th = _lgamma_pos(theta)
    t = x / theta
    c1 = (x * _log1pmx_over(tl.minimum(t, 1.0)) + (x - 0.5) * log1p_unit(tl.minimum(t, 1.0))
          + _stirling_corr(theta + x) - _stirling_corr(tl.maximum(theta, 10.0)) - lg_y)
    yb = tl.maximum(y, 10.0)
    b = theta - 1.0
    s = b / yb
    c2 = (b * tl.log(yb) + yb * _log1pmx(s) + (b - 0.5) * _log1p_any(s) + _stirling_corr(yb + b)
          - _stirling_corr(yb) - lg_th)
    c3 = _lgamma_pos(x + theta) - lg_th - lg_y
    c = tl.where(_poisson_side(x, theta), c1, tl.where(y >= 10.0, c2, c3))
    return tl.where(x == 0.0, 0.0, c)


@triton.jit
def _nb_digamma_term(x, theta):
    """theta (psi(x + theta) - psi(theta)), minus x on the Poisson side; 0 at x = 0."""
    t = x / theta
    th = tl.maximum(theta, 10.0)
    # theta * dcorr is O(x / theta): 0 when dcorr is, also for theta = inf (the Poisson limit)
    dcorr = _digamma_corr(th) - _digamma_corr(th + x)
    e = (x * _log1pmx_over(tl.minimum(t, 1.0)) + x / (2.0 * (x + theta))
         + tl.where(dcorr == 0.0, 0.0, theta * dcorr))
    psi = theta * (_digamma_pos(x + theta) - _digamma_pos(theta))
    return tl.where(x == 0.0, 0.0, tl.where(_poisson_side(x, theta), e, psi))


@triton.jit
def _nb_parts(lm, lt):
    """(a, u, m, neg, log1p(u)): a = lm - lt, u = e^-|a|, m = e^min(lm, lt)."""
    a = lm - lt
    neg = a < 0.0
    u = tl.exp(-tl.abs(a))
    m = tl.exp(tl.minimum(lm, lt))
    return a, u, m, neg, log1p_unit(u)


@triton.jit
def _nb_t1(a, u, m, neg, l1pu):
    """theta softplus(a), -> mu as theta -> inf."""
    return m * tl.where(neg, _log1p_over(u, l1pu), a + l1pu)


@triton.jit
def _times0(x, t):
    """x t with 0 where x == 0 (a zero count times log mu = -inf adds nothing)."""
    return tl.where(x == 0.0, 0.0, x * t)


@triton.jit
def _nb_value(x, lm, theta, c, a, u, m, neg, l1pu):
    xs = tl.where(_poisson_side(x, theta), _times0(x, lm - tl.maximum(a, 0.0) - l1pu),
                  -_times0(x, tl.maximum(-a, 0.0) + l1pu))
    return xs - _nb_t1(a, u, m, neg, l1pu) + c


@triton.jit
def _nb_v(a, u, m, neg, l1pu):
    """theta sigmoid(a) - theta softplus(a)."""
    return m * tl.where(neg, _sigmoid_minus_log1p_over(u, l1pu), 1.0 / (1.0 + u) - a - l1pu)


@triton.jit
def _count_term(x, lm, lt, zl, KIND: tl.constexpr):
    """One element's log p."""
    if KIND == 0:
        return _times0(x, lm) - tl.exp(lm) - tl.where(x == 0.0, 0.0, _lgamma_pos(x + 1.0))
    else:
        theta = tl.exp(lt)
        a, u, m, neg, l1pu = _nb_parts(lm, lt)
        nb = _nb_value(x, lm, theta, _nb_lgamma_term(x, theta), a, u, m, neg, l1pu)
        if KIND == 2:
            spz = softplus(zl)
            p = -softplus(-zl)
            q = -spz - _nb_t1(a, u, m, neg, l1pu)
            mx = tl.maximum(p, q)
            d = -tl.abs(p - q)
            zero = mx + log1p_unit(tl.exp(tl.where(d == d, d, 0.0)))
            zero = tl.where(mx == -float("inf"), mx, zero)
            nb = tl.where(x == 0.0, zero, nb - spz)
        return nb


# -- tile loads ---------------------------------------------------------------


@triton.jit
def _tile(r, r_ok, cols, P, D):
    """(col_ok, mask, p, idx) of rows r and columns cols: p = r % P the rows of
    x (broadcast over K), idx the (K, P, D) offsets."""
    col_ok = cols < D
    mask = r_ok[:, None] & col_ok[None, :]
    p = r % P
    return col_ok, mask, p, r[:, None] * D + cols[None, :]


@triton.jit
def _load_x_lm(x_ptr, lm_ptr, p, cols, idx, mask, D, ACC: tl.constexpr):
    """x at rows p = r % P (broadcast over K) and the log mean at idx."""
    x = load_tile(x_ptr, p, cols, mask, D, ACC)
    return x, tl.load(lm_ptr + idx, mask=mask, other=0.0).to(ACC)


@triton.jit
def _load_lt(lt_ptr, cols, col_ok, idx, mask, lm, THETA_DIM: tl.constexpr, ACC: tl.constexpr):
    """log theta of the tile, a per-gene one broadcast to lm's shape."""
    if THETA_DIM:
        return tl.load(lt_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :] + tl.zeros_like(lm)
    else:
        return tl.load(lt_ptr + idx, mask=mask, other=0.0).to(ACC)


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["P", "KP"])
def _count_fwd_kernel(
    x_ptr,  # (P, D)
    lm_ptr,  # (K, P, D) = (KP, D): log mean / log rate
    lt_ptr,  # (K, P, D), or (D,) when THETA_DIM; unused for KIND 0
    zl_ptr,  # (K, P, D); used for KIND 2
    out_ptr,  # (K, P) = (KP,)
    P,
    KP,
    D,
    KIND: tl.constexpr,
    THETA_DIM: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r, r_ok, p, acc = sample_rows_of(BLOCK_R, KP, P, ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok, mask, _, idx = _tile(r, r_ok, cols, P, D)  # p, loop-invariant, is taken once above
        x, lm = _load_x_lm(x_ptr, lm_ptr, p, cols, idx, mask, D, ACC)
        lt = lm
        zl = lm
        if KIND != 0:
            lt = _load_lt(lt_ptr, cols, col_ok, idx, mask, lm, THETA_DIM, ACC)
        if KIND == 2:
            zl = tl.load(zl_ptr + idx, mask=mask, other=0.0).to(ACC)
        acc += tl.sum(tl.where(mask, _count_term(x, lm, lt, zl, KIND), 0.0), axis=1)
    tl.store(out_ptr + r, acc.to(out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=["P", "KP", "ROW_TILES"])
def _count_bwd_kernel(
    grad_out_ptr,  # (K, P)
    x_ptr,  # (P, D)
    lm_ptr,  # (K, P, D)
    lt_ptr,  # (K, P, D) or (D,)
    zl_ptr,  # (K, P, D)
    dlm_ptr,  # (K, P, D), when HAS_DLM
    dlt_ptr,  # (K, P, D), or (D,) when THETA_DIM; when HAS_DLT
    part_ptr,  # (ROW_TILES, D) ACC: per-gene dlt partial sums, when HAS_DLT and THETA_DIM and ROW_TILES > 1
    counter_ptr,  # (column blocks,) int32 arrival counters, zero between launches, likewise
    dzl_ptr,  # (K, P, D), when HAS_DZL
    P,
    KP,
    D,
    ROW_TILES,
    KIND: tl.constexpr,
    THETA_DIM: tl.constexpr,
    HAS_DLM: tl.constexpr,
    HAS_DLT: tl.constexpr,
    HAS_DZL: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    col_blocks = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0).to(tl.int64)
    row_tile = pid // col_blocks
    r = row_tile * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = (pid % col_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < KP
    col_ok, mask, p, idx = _tile(r, r_ok, cols, P, D)
    g = tl.load(grad_out_ptr + r, mask=r_ok, other=0.0).to(ACC)[:, None]
    x, lm = _load_x_lm(x_ptr, lm_ptr, p, cols, idx, mask, D, ACC)
    if KIND == 0:
        tl.store(dlm_ptr + idx, (g * (x - tl.exp(lm))).to(dlm_ptr.dtype.element_ty), mask=mask)
    else:
        lt = _load_lt(lt_ptr, cols, col_ok, idx, mask, lm, THETA_DIM, ACC)
        theta = tl.exp(lt)
        a, u, m, neg, l1pu = _nb_parts(lm, lt)
        inv = 1.0 / (1.0 + u)
        sig_a = tl.where(neg, u * inv, inv)
        sig_neg_a = tl.where(neg, inv, u * inv)
        v = _nb_v(a, u, m, neg, l1pu)
        gm = _times0(x, sig_neg_a) - m * inv
        gt = tl.zeros_like(lm)
        if HAS_DLT:
            xs = tl.where(_poisson_side(x, theta), _times0(x, sig_a), -_times0(x, sig_neg_a))
            gt = xs + v + _nb_digamma_term(x, theta)
        if KIND == 2:
            zl = tl.load(zl_ptr + idx, mask=mask, other=0.0).to(ACC)
            lpi = -softplus(-zl)
            lnb0 = -softplus(zl) - _nb_t1(a, u, m, neg, l1pu)
            dd = lpi - lnb0
            dd = tl.where(dd == dd, dd, 0.0)
            w = sigmoid(-dd)
            zero = x == 0.0
            if HAS_DZL:
                gz = tl.where(zero, sigmoid(dd) * sigmoid(-zl) - w * sigmoid(zl), -sigmoid(zl))
                tl.store(dzl_ptr + idx, (g * gz).to(dzl_ptr.dtype.element_ty), mask=mask)
            gm = tl.where(zero, -w * (m * inv), gm)
            gt = tl.where(zero, w * v, gt)
        if HAS_DLM:
            tl.store(dlm_ptr + idx, (g * gm).to(dlm_ptr.dtype.element_ty), mask=mask)
        if HAS_DLT:
            if THETA_DIM:
                col_sum = tl.sum(tl.where(mask, g * gt, 0.0), axis=0)
                if ROW_TILES == 1:
                    tl.store(dlt_ptr + cols, col_sum.to(dlt_ptr.dtype.element_ty), mask=col_ok)
                else:
                    # the last row tile of a column block to finish adds the partials in row-tile order
                    tl.store(part_ptr + row_tile * D + cols, col_sum, mask=col_ok)
                    if arrive_last(counter_ptr + pid % col_blocks, ROW_TILES):
                        total = tl.zeros([BLOCK_D], dtype=ACC)
                        for s in range(0, ROW_TILES):
                            total += tl.load(part_ptr + s * D + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
                        tl.store(dlt_ptr + cols, total.to(dlt_ptr.dtype.element_ty), mask=col_ok)
            else:
                tl.store(dlt_ptr + idx, (g * gt).to(dlt_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def _geometry(D: int, dtype: torch.dtype, device: torch.device, tile: int):
    """(BLOCK_R, BLOCK_D, warps) of a launch over (K, P, D) with about tile elements a program."""
    return tile_geometry(D, device, dtype == torch.float64, tile, MAX_COLS)


def _or_lm(lm, *tensors):
    """The tensors with None replaced by lm: a kernel never reads a pointer its constexprs switch off."""
    return [lm if t is None else t for t in tensors]


def forward_plan(kind: int, K: int, P: int, D: int, dtype: torch.dtype, device: torch.device,
                 theta_dim: bool) -> tuple[tuple[int], dict]:
    """(grid, meta) of the forward kernel for the decoder outputs (K, P, D) of
    ``dtype`` (K * P > 0), log theta per gene (``theta_dim``) or per element:
    the shapes' part of a launch, worked out once per call signature by the
    op's plans (op.py's CountPlan)."""
    BLOCK_R, BLOCK_D, warps = _geometry(D, dtype, device, FORWARD_TILE // 2 if kind == ZINB else FORWARD_TILE)
    return (cdiv(K * P, BLOCK_R),), dict(KIND=kind, THETA_DIM=theta_dim, ACC=acc_dtype(dtype), BLOCK_R=BLOCK_R,
                                         BLOCK_D=BLOCK_D, num_warps=warps)


def backward_plan(kind: int, K: int, P: int, D: int, dtype: torch.dtype, device: torch.device, theta_dim: bool,
                  has_dlm: bool, has_dlt: bool, has_dzl: bool):
    """(grid, meta, row tiles, the per-gene dlt's partial sums' shape ((1,):
    none), the arrival counters tile_counters hands out (n, splits)) of the
    backward kernel, as forward_plan's (K * P * D > 0)."""
    BLOCK_R, BLOCK_D, warps = _geometry(D, dtype, device, BACKWARD_TILE)
    row_tiles = cdiv(K * P, BLOCK_R)
    col_blocks = cdiv(D, BLOCK_D)
    reduce = has_dlt and theta_dim and row_tiles > 1
    return ((row_tiles * col_blocks,),
            dict(KIND=kind, THETA_DIM=theta_dim, HAS_DLM=has_dlm, HAS_DLT=has_dlt, HAS_DZL=has_dzl,
                 ACC=acc_dtype(dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps),
            row_tiles, (row_tiles, D) if reduce else (1,), (col_blocks, row_tiles if reduce else 1))


def count_forward(kind: int, x, lm, lt, zl, out) -> None:
    """out (K, P) <- sum_d log p for x (P, D) and the decoder outputs in the kernel layout."""
    K, P, D = lm.shape
    if K * P == 0:
        return
    grid, meta = forward_plan(kind, K, P, D, lm.dtype, lm.device, lt is not None and lt.dim() == 1)
    _count_fwd_kernel[grid](x, lm, *_or_lm(lm, lt, zl), out, P, K * P, D, **meta)


def count_backward(kind: int, grad_out, x, lm, lt, zl, dlm, dlt, dzl) -> None:
    """The gradients that are not None, for grad_out (K, P); a per-gene dlt (D,)
    is summed over rows in the kernel (the last row tile of each column block
    adds the partials in order: deterministic, no float atomics)."""
    K, P, D = lm.shape
    theta_dim = lt is not None and lt.dim() == 1
    if K * P * D == 0:
        if dlt is not None and theta_dim and dlt.numel():
            dlt.zero_()  # a sum over no rows; not a path of any training shape
        return
    grid, meta, row_tiles, part_shape, counters = backward_plan(
        kind, K, P, D, lm.dtype, lm.device, theta_dim, dlm is not None, dlt is not None, dzl is not None)
    part = torch.empty(part_shape, dtype=accumulation_dtype(lm.dtype), device=lm.device)
    _count_bwd_kernel[grid](grad_out, x, lm, *_or_lm(lm, lt, zl, dlm, dlt), part,
                            tile_counters(lm.device, *counters), *_or_lm(lm, dzl), P, K * P, D, row_tiles, **meta)


# -- each op's launchers (the shared kernels with its KIND) --------------------------


def poisson_log_prob_forward(x, log_rate, out) -> None:
    """out (K, P) <- log Poisson for x (P, D), log_rate (K, P, D)."""
    count_forward(POISSON, x, log_rate, None, None, out)


def poisson_log_prob_backward(grad_out, x, log_rate, dlog_rate) -> None:
    """dlog_rate (K, P, D) <- grad_out (K, P) (x - e^log_rate)."""
    count_backward(POISSON, grad_out, x, log_rate, None, None, dlog_rate, None, None)


def negative_binomial_log_prob_forward(x, log_mean, log_theta, out) -> None:
    """out (K, P) <- log NB for x (P, D), log_mean (K, P, D), log_theta (K, P, D) or (D,)."""
    count_forward(NB, x, log_mean, log_theta, None, out)


def negative_binomial_log_prob_backward(grad_out, x, log_mean, log_theta, dlog_mean, dlog_theta) -> None:
    """dlog_mean (K, P, D) and dlog_theta (log_theta's shape; a per-gene one
    summed over rows), each when not None, given grad_out (K, P)."""
    count_backward(NB, grad_out, x, log_mean, log_theta, None, dlog_mean, dlog_theta, None)


def zinb_log_prob_forward(x, log_mean, log_theta, zi_logits, out) -> None:
    """out (K, P) <- log ZINB for x (P, D) and (K, P, D) parameters (log_theta may be (D,))."""
    count_forward(ZINB, x, log_mean, log_theta, zi_logits, out)


def zinb_log_prob_backward(grad_out, x, log_mean, log_theta, zi_logits, dlog_mean, dlog_theta, dzi_logits) -> None:
    """dlog_mean, dlog_theta (log_theta's shape), dzi_logits, each when not None."""
    count_backward(ZINB, grad_out, x, log_mean, log_theta, zi_logits, dlog_mean, dlog_theta, dzi_logits)
