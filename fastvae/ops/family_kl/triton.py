"""Triton kernels of family_kl: the closed-form KL of a latent family against
a prior of the same family, or the Kumaraswamy's against a Beta (FAMILY,
KL_FAMILIES' position), per element,
summed over L (REDUCE) or not, and its gradients; the formulas of the C++
kernels (family_kl.cpp), in the same forms.

Layout: q_loc, q_log_param (N, L) contiguous; p_loc, p_log_param (N, L), or
(L,) for a prior every row shares (P_SHARED); the locations unused for the
exponential (its log-rates sit in the log_param arrays; the Weibull's log
scales in the loc arrays, its log concentrations in the log_param ones); kl, grad_kl (N,)
when REDUCE, else (N, L); every gradient (N, L).
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import MAX_BLOCK_COLS as MAX_BLOCK_L
from fastvae.kernels._common import acc_dtype, blocks, cdiv
from fastvae.ops.count_log_prob.triton import _digamma_pos, _lgamma_pos

# 1024 elements a program, as kl_normal's; the backward keeps eight tiles live and
# the Gumbel's lgamma and digamma besides: half the tile, or a half-precision
# backward spills on sm_90
KL_TILE = 1024
KL_BACKWARD_TILE = 512
# the Kumaraswamy-Beta series keeps its sums and each term's lgammas and digammas
# live besides: a quarter of the others' forward tile, an eighth of the backward's
# (python -m fastvae.kernels.aot --arch sm_90 --op family_kl: no spills then)
KUMARASWAMY_TILE = 256
KUMARASWAMY_BACKWARD_TILE = 128
EXPONENTIAL = 4  # KL_FAMILIES' positions (fastvae/_families.py): the family without a location
KUMARASWAMY = 5
WEIBULL = 6
EULER_GAMMA = tl.constexpr(0.5772156649015329)
LOG_4 = tl.constexpr(1.3862943611198906)
KUMARASWAMY_TERMS = tl.constexpr(10)  # KUMARASWAMY_KL_TERMS (fastvae/_families.py)
# the Kumaraswamy's lgamma/psi shifts (the C++ kKumaShift): to w >= 4 in float32, 10 in float64
KUMARASWAMY_SHIFT = tl.constexpr(4)
KUMARASWAMY_SHIFT_F64 = tl.constexpr(10)

# -- math helpers -------------------------------------------------------------


@triton.jit
def _cauchy_parts(m1, s1, m2, s2):
    """m = max(s1, s2), big = max(a, |dd|), a / big, dd / big and
    s = (a^2 + dd^2) / big^2 in [1, 2], for a = (b1 + b2) / e^m in [1, 2] and
    dd = (m1 - m2) / e^m: the scales relative to the larger one."""
    m = tl.maximum(s1, s2)
    a = tl.exp(s1 - m) + tl.exp(s2 - m)
    d = m1 - m2
    dd = tl.where(d == 0.0, 0.0, d * tl.exp(-m))
    big = tl.maximum(a, tl.abs(dd))
    ra = a / big
    rd = dd / big
    return m, big, ra, rd, ra * ra + rd * rd


@triton.jit
def _shift_up(z, SHIFT: tl.constexpr, PSI: tl.constexpr):
    """z > 0 shifted to w >= SHIFT by the recurrences (the C++ shift_up):
    (w, prod = z (z + 1) ... (w - 1), its derivative in z (PSI))."""
    w = z
    prod = tl.zeros_like(z) + 1.0
    dprod = tl.zeros_like(z)
    for _ in tl.static_range(SHIFT):
        c = w < SHIFT
        if PSI:
            dprod = tl.where(c, dprod * w + prod, dprod)
        prod = tl.where(c, prod * w, prod)
        w = tl.where(c, w + 1.0, w)
    return w, prod, dprod


@triton.jit
def _stirling(w, iw, PSI: tl.constexpr):
    """(lgamma(w), psi(w) (PSI)) by the asymptotic series, iw = 1/w (the C++ stirling)."""
    lw = tl.log(w)
    iw2 = iw * iw
    corr = iw * (1.0 / 12 - iw2 * (1.0 / 360 - iw2 * (1.0 / 1260 - iw2 * (1.0 / 1680 - iw2 * (1.0 / 1188)))))
    lg = (w - 0.5) * lw - w + 0.91893853320467274178 + corr
    psi = tl.zeros_like(w)
    if PSI:
        dcorr = iw2 * (1.0 / 12 - iw2 * (1.0 / 120 - iw2 * (1.0 / 252 - iw2 * (1.0 / 240 - iw2 * (1.0 / 132)))))
        psi = lw - 0.5 * iw - dcorr
    return lg, psi


@triton.jit
def _kuma_lgamma(z, SHIFT: tl.constexpr):
    w, prod, dprod = _shift_up(z, SHIFT, False)
    lg, psi = _stirling(w, 1.0 / w, False)
    return lg - tl.log(prod)


@triton.jit
def _kuma_digamma(z, SHIFT: tl.constexpr):
    w, prod, dprod = _shift_up(z, SHIFT, True)
    lg, psi = _stirling(w, 1.0 / w, True)
    return psi - dprod / prod


@triton.jit
def _shifted_pair(x, y, SHIFT: tl.constexpr, PSI: tl.constexpr):
    """x and y shifted, their 1/w from one division, each w capped at 1e18 in
    it (the C++ shifted_pair): (prod, dprod, lgamma, psi of x's w, then y's)."""
    wx, px, dpx = _shift_up(x, SHIFT, PSI)
    wy, py, dpy = _shift_up(y, SHIFT, PSI)
    cx = tl.minimum(wx, 1e18)
    cy = tl.minimum(wy, 1e18)
    ixy = 1.0 / (cx * cy)
    lgx, psix = _stirling(wx, cy * ixy, PSI)
    lgy, psiy = _stirling(wy, cx * ixy, PSI)
    return px, dpx, lgx, psix, py, dpy, lgy, psiy


@triton.jit
def _trigamma_pos(z, SHIFT: tl.constexpr):
    """psi'(z), z > 0: shifted to w >= SHIFT, then the asymptotic series."""
    w = z
    acc = tl.zeros_like(z)
    for _ in tl.static_range(SHIFT):
        c = w < SHIFT
        acc = tl.where(c, acc + 1.0 / (w * w), acc)
        w = tl.where(c, w + 1.0, w)
    iw = 1.0 / w
    iw2 = iw * iw
    tail = 1.0 / 42 - iw2 * (1.0 / 30 - iw2 * (5.0 / 66 - iw2 * (691.0 / 2730)))
    return acc + iw + iw2 * (0.5 + iw * (1.0 / 6 - iw2 * (1.0 / 30 - iw2 * tail)))


@triton.jit
def _kuma_element(la, lb, SHIFT: tl.constexpr):
    """(b, lgamma(b), psi(1 + b), C = -gamma - psi(1 + b), 1/a, a b), the C++
    kuma_element: lgamma(b) = lgamma(1 + b) - log b."""
    a = tl.exp(la)
    b = tl.exp(lb)
    w, prod, dprod = _shift_up(1.0 + b, SHIFT, True)
    lg, psi = _stirling(w, 1.0 / w, True)
    psi_1b = psi - dprod / prod
    return b, lg - tl.log(prod) - lb, psi_1b, -EULER_GAMMA - psi_1b, 1.0 / a, a * b


@triton.jit
def _kumaraswamy_kl(la, lb, lal, lbe, SHIFT: tl.constexpr):
    """KL(Kumaraswamy(e^la, e^lb) || Beta(e^lal, e^lbe)), the C++ kumaraswamy_kl:
    SHIFT is the C++ kKumaShift (4 in float32, 10 in float64)."""
    b, lg_b, psi_1b, c, ia, ab = _kuma_element(la, lb, SHIFT)
    al = tl.exp(lal)
    be = tl.exp(lbe)
    log_beta_fn = _kuma_lgamma(al, SHIFT) + _kuma_lgamma(be, SHIFT) - _kuma_lgamma(al + be, SHIFT)
    s = tl.zeros_like(la)
    for m in range(1, KUMARASWAMY_TERMS + 1):
        x = m * ia
        px, dpx, lgx, psix, pxb, dpxb, lgxb, psixb = _shifted_pair(x, x + b, SHIFT, False)
        s += tl.exp(lg_b + lgx - lgxb) * pxb / (px * (m + ab))
    return (1.0 - al * ia) * c + la + lb + log_beta_fn - (b - 1.0) / b + (be - 1.0) * b * s


@triton.jit
def _kumaraswamy_kl_grad(g, la, lb, lal, lbe, SHIFT: tl.constexpr):
    """g times the gradient of _kumaraswamy_kl in (la, lb, lal, lbe), the C++
    kumaraswamy_kl_grad: 1/b - b psi'(b) = -b psi'(1 + b)."""
    b, lg_b, psi_1b, c, ia, ab = _kuma_element(la, lb, SHIFT)
    al = tl.exp(lal)
    be = tl.exp(lbe)
    ratio = al * ia
    s = tl.zeros_like(la)
    sa = tl.zeros_like(la)
    sb = tl.zeros_like(la)
    for m in range(1, KUMARASWAMY_TERMS + 1):
        x = m * ia
        px, dpx, lgx, psix, pxb, dpxb, lgxb, psixb = _shifted_pair(x, x + b, SHIFT, True)
        ip = 1.0 / (px * pxb)  # both products' reciprocals from one division
        psi_x = psix - dpx * (pxb * ip)
        psi_xb = psixb - dpxb * (px * ip)
        r = 1.0 / (m + ab)
        t = tl.exp(lg_b + lgx - lgxb) * pxb * (pxb * ip) * r
        e = ab * r
        s += t
        sa += t * (x * (psi_xb - psi_x) - e)
        sb += t * (b * (psi_1b - psi_xb) - 1.0 - e)  # b (psi(b) - psi(x + b)) - e
    w = (be - 1.0) * b
    psi_sum = _kuma_digamma(al + be, SHIFT)
    da = g * (ratio * c + 1.0 + w * sa)
    db = g * (-(1.0 - ratio) * b * _trigamma_pos(1.0 + b, SHIFT) + 1.0 - 1.0 / b + w * (s + sb))
    dal = g * (al * (_kuma_digamma(al, SHIFT) - psi_sum) - ratio * c)
    dbe = g * (be * (_kuma_digamma(be, SHIFT) - psi_sum) + be * b * s)
    return da, db, dal, dbe


@triton.jit
def _weibull_kl(a1, s1, a2, s2, SHIFT: tl.constexpr):
    """The Weibull-Weibull KL of (log scale, log concentration) pairs, the C++
    weibull_kl: s1 - s2 + gamma (r - 1) - u + e^(u + lgamma(1 + r)) - 1 with
    r = e^(s2 - s1), u = e^s2 (a1 - a2); inf where r is (lgamma takes finite
    arguments)."""
    r = tl.exp(s2 - s1)
    u = (a1 - a2) * tl.exp(s2)
    kl = s1 - s2 + EULER_GAMMA * (r - 1.0) - u + tl.exp(u + _kuma_lgamma(1.0 + r, SHIFT)) - 1.0
    return tl.where(r == float("inf"), r, kl)


@triton.jit
def _weibull_kl_grad(g, a1, s1, a2, s2, SHIFT: tl.constexpr):
    """g times the gradient of _weibull_kl in (a1, s1, a2, s2), the C++
    weibull_kl_grad: lgamma(1 + r) and psi(1 + r) from one shift."""
    k2 = tl.exp(s2)
    r = tl.exp(s2 - s1)
    u = (a1 - a2) * k2
    w, prod, dprod = _shift_up(1.0 + r, SHIFT, True)
    lg, psi = _stirling(w, 1.0 / w, True)
    big_g = tl.exp(u + lg - tl.log(prod))
    psi_r = (psi - dprod / prod) * r
    rg = r * EULER_GAMMA
    da1 = g * k2 * (big_g - 1.0)
    return da1, g * (1.0 - rg - big_g * psi_r), -da1, g * (rg - 1.0 - u + big_g * (u + psi_r))


@triton.jit
def _kl_term(m1, s1, m2, s2, FAMILY: tl.constexpr, ACC: tl.constexpr):
    if FAMILY == 4:  # exponential, log-rates
        kl = (s1 - s2) + tl.exp(s2 - s1) - 1.0
    elif FAMILY == 5:  # kumaraswamy (log a, log b) against the Beta's (log alpha, log beta)
        if ACC == tl.float64:
            kl = _kumaraswamy_kl(m1, s1, m2, s2, KUMARASWAMY_SHIFT_F64)
        else:
            kl = _kumaraswamy_kl(m1, s1, m2, s2, KUMARASWAMY_SHIFT)
    elif FAMILY == 6:  # weibull (log scale, log concentration) pairs
        if ACC == tl.float64:
            kl = _weibull_kl(m1, s1, m2, s2, KUMARASWAMY_SHIFT_F64)
        else:
            kl = _weibull_kl(m1, s1, m2, s2, KUMARASWAMY_SHIFT)
    elif FAMILY == 0:  # laplace
        d = tl.abs(m1 - m2)
        exact = d == 0.0  # the d terms are 0 whatever the scales
        u = tl.where(exact, 0.0, d * tl.exp(-s1))
        v = tl.where(exact, 0.0, d * tl.exp(-s2))
        kl = s2 - s1 + v + tl.exp(s1 - s2 - u) - 1.0
    elif FAMILY == 1:  # uniform
        inside = (m1 >= m2) & (m1 + tl.exp(s1) <= m2 + tl.exp(s2))
        kl = tl.where(inside, s2 - s1, float("inf"))
    elif FAMILY == 2:  # gumbel
        t = (m1 - m2) * tl.exp(-s2)
        r = tl.exp(s1 - s2)
        kl = s2 - s1 + t + r * EULER_GAMMA + tl.exp(_lgamma_pos(1.0 + r) - t) - (1.0 + EULER_GAMMA)
        kl = tl.where(r == float("inf"), r, kl)
    else:  # cauchy
        m, big, ra, rd, s = _cauchy_parts(m1, s1, m2, s2)
        kl = 2.0 * (m + tl.log(big)) + tl.log(s) - LOG_4 - s1 - s2
    return kl


@triton.jit
def _kl_grad(g, m1, s1, m2, s2, FAMILY: tl.constexpr, ACC: tl.constexpr):
    """g times the gradient in (m1, s1, m2, s2); the prior's location gradient
    is -dm1 but the Kumaraswamy's (its m2 is the Beta's log alpha; the
    Weibull's, -dm1 too, comes from its own helper)."""
    if FAMILY == 4:
        ds1 = g * (1.0 - tl.exp(s2 - s1))
        ds2 = -ds1
        dm1 = tl.zeros_like(g)
    elif FAMILY == 5:
        if ACC == tl.float64:
            dm1, ds1, dm2, ds2 = _kumaraswamy_kl_grad(g, m1, s1, m2, s2, KUMARASWAMY_SHIFT_F64)
        else:
            dm1, ds1, dm2, ds2 = _kumaraswamy_kl_grad(g, m1, s1, m2, s2, KUMARASWAMY_SHIFT)
    elif FAMILY == 6:  # weibull
        if ACC == tl.float64:
            dm1, ds1, dm2, ds2 = _weibull_kl_grad(g, m1, s1, m2, s2, KUMARASWAMY_SHIFT_F64)
        else:
            dm1, ds1, dm2, ds2 = _weibull_kl_grad(g, m1, s1, m2, s2, KUMARASWAMY_SHIFT)
    elif FAMILY == 0:
        diff = m1 - m2
        d = tl.abs(diff)
        exact = d == 0.0
        ip = tl.exp(-s2)
        u = tl.where(exact, 0.0, d * tl.exp(-s1))
        e = tl.exp(s1 - s2 - u)
        ds1 = g * (tl.where(e == 0.0, 0.0, e * (1.0 + u)) - 1.0)
        ds2 = g * (1.0 - tl.where(exact, 0.0, d * ip) - e)
        sgn = tl.where(diff > 0.0, 1.0, -1.0)
        dm1 = tl.where(exact, 0.0, g * sgn * ip * (1.0 - tl.exp(-u)))  # sign(0) = 0
    elif FAMILY == 1:
        inside = (m1 >= m2) & (m1 + tl.exp(s1) <= m2 + tl.exp(s2))
        ds1 = tl.where(inside, -g, 0.0)
        ds2 = tl.where(inside, g, 0.0)
        dm1 = tl.zeros_like(g)
    elif FAMILY == 2:
        ip = tl.exp(-s2)
        t = (m1 - m2) * ip
        r = tl.exp(s1 - s2)
        big_g = tl.exp(_lgamma_pos(1.0 + r) - t)
        psi_r = _digamma_pos(1.0 + r) * r
        rg = r * EULER_GAMMA
        dm1 = g * ip * (1.0 - big_g)
        ds1 = g * (rg + big_g * psi_r - 1.0)
        ds2 = g * (1.0 - t - rg + big_g * (t - psi_r))
    else:
        m, big, ra, rd, s = _cauchy_parts(m1, s1, m2, s2)
        far = big == float("inf")  # the KL's limit: its gradients are 0 and -1
        w = 2.0 / (big * s)
        dm1 = tl.where(far | (rd == 0.0), 0.0, g * w * rd * tl.exp(-m))  # m1 = m2: no 0 * inf
        ds1 = tl.where(far, -g, g * (w * ra * tl.exp(s1 - m) - 1.0))
        ds2 = tl.where(far, -g, g * (w * ra * tl.exp(s2 - m) - 1.0))
    if FAMILY != 5 and FAMILY != 6:
        dm2 = -dm1
    return dm1, ds1, dm2, ds2


@triton.jit
def _load_params(q_loc_ptr, q_lp_ptr, p_loc_ptr, p_lp_ptr, idx, cols, mask, FAMILY: tl.constexpr,
                 P_SHARED: tl.constexpr, ACC: tl.constexpr):
    s1 = tl.load(q_lp_ptr + idx, mask=mask, other=0.0).to(ACC)
    if P_SHARED:
        p_idx = tl.zeros_like(idx) + cols[None, :]
    else:
        p_idx = idx
    s2 = tl.load(p_lp_ptr + p_idx, mask=mask, other=0.0).to(ACC)
    if FAMILY == 4:
        m1 = s1
        m2 = s2
    else:
        m1 = tl.load(q_loc_ptr + idx, mask=mask, other=0.0).to(ACC)
        m2 = tl.load(p_loc_ptr + p_idx, mask=mask, other=0.0).to(ACC)
    return m1, s1, m2, s2


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["N"])
def _family_kl_fwd_kernel(
    q_loc_ptr, q_lp_ptr, p_loc_ptr, p_lp_ptr,  # the layout above
    kl_ptr,  # (N,) when REDUCE, else (N, L)
    N,
    L,
    FAMILY: tl.constexpr,
    P_SHARED: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        idx = rows[:, None] * L + cols[None, :]
        m1, s1, m2, s2 = _load_params(q_loc_ptr, q_lp_ptr, p_loc_ptr, p_lp_ptr, idx, cols, mask, FAMILY, P_SHARED,
                                      ACC)
        kl = _kl_term(m1, s1, m2, s2, FAMILY, ACC)
        if REDUCE:
            acc += tl.sum(tl.where(mask, kl, 0.0), axis=1)
        else:
            tl.store(kl_ptr + idx, kl.to(kl_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        tl.store(kl_ptr + rows, acc.to(kl_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["N"])
def _family_kl_bwd_kernel(
    grad_kl_ptr,  # (N,) when REDUCE, else (N, L)
    q_loc_ptr, q_lp_ptr, p_loc_ptr, p_lp_ptr,  # the layout above
    dq_loc_ptr, dq_lp_ptr, dp_loc_ptr, dp_lp_ptr,  # (N, L); the prior's unused unless HAS_DP
    N,
    L,
    FAMILY: tl.constexpr,
    P_SHARED: tl.constexpr,
    REDUCE: tl.constexpr,
    HAS_DP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ACCUMULATE: tl.constexpr = False,  # add q's gradients to what dq_loc, dq_lp hold (the plans' sampler's)
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    if REDUCE:
        g_row = tl.load(grad_kl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        idx = rows[:, None] * L + cols[None, :]
        if REDUCE:
            g = g_row + tl.zeros([BLOCK_N, BLOCK_L], dtype=ACC)
        else:
            g = tl.load(grad_kl_ptr + idx, mask=mask, other=0.0).to(ACC)
        m1, s1, m2, s2 = _load_params(q_loc_ptr, q_lp_ptr, p_loc_ptr, p_lp_ptr, idx, cols, mask, FAMILY, P_SHARED,
                                      ACC)
        dm1, ds1, dm2, ds2 = _kl_grad(g, m1, s1, m2, s2, FAMILY, ACC)
        ds1 = ds1.to(dq_lp_ptr.dtype.element_ty)
        if ACCUMULATE:
            ds1 = tl.load(dq_lp_ptr + idx, mask=mask, other=0.0) + ds1
        tl.store(dq_lp_ptr + idx, ds1, mask=mask)
        if FAMILY != 4:
            dm1_out = dm1.to(dq_loc_ptr.dtype.element_ty)
            if ACCUMULATE:
                dm1_out = tl.load(dq_loc_ptr + idx, mask=mask, other=0.0) + dm1_out
            tl.store(dq_loc_ptr + idx, dm1_out, mask=mask)
        if HAS_DP:
            tl.store(dp_lp_ptr + idx, ds2.to(dp_lp_ptr.dtype.element_ty), mask=mask)
            if FAMILY != 4:
                tl.store(dp_loc_ptr + idx, dm2.to(dp_loc_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def forward_plan(N: int, L: int, dtype: torch.dtype, family: int, p_shared: bool, reduce: bool) -> tuple[tuple, dict]:
    """(grid, compile-time parameters) of the forward over q's (N, L), N * L > 0:
    what family_kl_forward launches, and the objectives' plans (fastvae/_plan.py)
    launch with the same variants."""
    BLOCK_N, BLOCK_L = blocks(N, L, MAX_BLOCK_L, tile=KUMARASWAMY_TILE if family == KUMARASWAMY else KL_TILE)
    meta = dict(FAMILY=family, P_SHARED=p_shared, REDUCE=reduce, ACC=acc_dtype(dtype), BLOCK_N=BLOCK_N,
                BLOCK_L=BLOCK_L)
    return (cdiv(N, BLOCK_N),), meta


def backward_plan(N: int, L: int, dtype: torch.dtype, family: int, p_shared: bool, reduce: bool,
                  has_dp: bool, accumulate: bool = False) -> tuple[tuple, dict]:
    """(grid, compile-time parameters) of the backward over q's (N, L), N * L > 0;
    ``accumulate``: q's gradients added to what their outputs hold, in their
    dtype (the objectives' plans add the sampler's gradient so, as autograd would)."""
    tile = KUMARASWAMY_BACKWARD_TILE if family == KUMARASWAMY else KL_BACKWARD_TILE
    if accumulate and dtype == torch.float64 and family != KUMARASWAMY:
        tile //= 2  # the loads of q's gradients spilled 8 bytes on sm_90 (the uniform's)
    BLOCK_N, BLOCK_L = blocks(N, L, MAX_BLOCK_L, tile=tile)
    meta = dict(FAMILY=family, P_SHARED=p_shared, REDUCE=reduce, HAS_DP=has_dp, ACC=acc_dtype(dtype),
                BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L)
    if accumulate:
        meta["ACCUMULATE"] = True
    return (cdiv(N, BLOCK_N),), meta


def family_kl_forward(q_loc, q_log_param, p_loc, p_log_param, family, kl) -> None:
    """kl (N,) or (N, L) <- the closed-form KL of the layout above."""
    N, L = q_log_param.shape
    if N * L == 0:
        kl.zero_()
        return
    grid, meta = forward_plan(N, L, q_log_param.dtype, family, p_log_param.dim() == 1, kl.dim() == 1)
    _family_kl_fwd_kernel[grid](
        q_log_param if q_loc is None else q_loc, q_log_param,
        p_log_param if p_loc is None else p_loc, p_log_param, kl, N, L, **meta,
    )


def family_kl_backward(grad_kl, q_loc, q_log_param, p_loc, p_log_param, family,
                       dq_loc, dq_log_param, dp_loc, dp_log_param) -> None:
    """dq_loc, dq_log_param (and dp_loc, dp_log_param when given) <- the gradients of family_kl."""
    N, L = q_log_param.shape
    if N * L == 0:
        return
    has_dp = dp_log_param is not None
    grid, meta = backward_plan(N, L, q_log_param.dtype, family, p_log_param.dim() == 1, grad_kl.dim() == 1, has_dp)
    _family_kl_bwd_kernel[grid](
        grad_kl, q_log_param if q_loc is None else q_loc, q_log_param,
        p_log_param if p_loc is None else p_loc, p_log_param,
        dq_log_param if dq_loc is None else dq_loc, dq_log_param,
        dq_log_param if dp_loc is None else dp_loc, dp_log_param if has_dp else dq_log_param, N, L, **meta,
    )
