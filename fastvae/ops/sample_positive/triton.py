"""Triton kernels of sample_positive: the positive inverse-CDF
families (exponential, Weibull, Kumaraswamy: fastvae/_families.py's
POSITIVE_FAMILIES order, a constexpr FAMILY) as transforms of the Exp(1)
variate t = -log u of the element's Philox uniform; log q(z) summed per sample
row from the same t; the backward regenerates t from (seed, offset) instead
of storing it. The oracle's positive_terms (__init__.py) gives the closed forms.

The words, their uniforms and the launch geometry are the samplers'
(kernels/sampler.py). Layout: log_p0, log_p1 (N, L); z, grad_z (K, N, L);
log_q, grad_log_q (K, N); z[k, n, l] uses the uniform at offset0 + k *
sample_stride + n * row_stride + l. The exponential reads log_p1 not at all
(its gradient is written as 0).
"""
import triton
import triton.language as tl

from fastvae.kernels._common import arrive_last
from fastvae.kernels.sampler import (
    block_words,
    exp1,
    family_rows,
    launch_family_backward,
    launch_family_forward,
    log1m,
    noise_start,
    parameter_block,
    row_columns,
    row_words,
    store_rows,
    store_split_parts,
    sum_split_parts,
)
from fastvae.ops.family_kl.triton import EXPONENTIAL, _family_kl_bwd_kernel, backward_plan, family_kl_forward


@triton.jit
def _expm1_neg(x):
    """expm1(x) for x <= 0 to x's relative precision (Kahan: (w - 1) x / log w,
    x where w = e^x rounds to 1, -1 where it underflows; no libdevice)."""
    w = tl.exp(x)
    one = w == 1.0
    zero = w == 0.0
    lw = tl.log(tl.where(one | zero, 0.5, w))
    return tl.where(one, x, tl.where(zero, -1.0, (w - 1.0) * x / lw))


@triton.jit
def _terms(x, p0, p1, FAMILY: tl.constexpr, ACC: tl.constexpr):
    """(z, log f, c0, c1, f0, f1, s0, s1) of the family at folded words x and
    log parameters p0, p1 (the oracle's positive_terms)."""
    t = exp1(x, ACC)
    log_t = tl.log(t)
    zero = tl.zeros_like(t)
    one = zero + 1.0
    if FAMILY == 0:  # exponential(rate = e^p0)
        z = t * tl.exp(-p0)
        log_f = p0 - t
        c0 = -one
        c1 = zero
        f0 = one
        f1 = zero
        s0 = t
        s1 = zero
    elif FAMILY == 1:  # Weibull(scale = e^p0, k = e^p1)
        ik = tl.exp(-p1)
        k = tl.exp(p1)
        c1 = -log_t * ik
        w = (k - 1.0) - k * t
        z = tl.exp(p0 - c1)
        log_f = p1 - p0 + (1.0 - ik) * log_t - t
        c0 = one
        f0 = -one
        f1 = 1.0 - c1
        s0 = w
        s1 = w * c1
    else:  # Kumaraswamy(a = e^p0, b = e^p1), in log space
        a = tl.exp(p0)
        b = tl.exp(p1)
        ia = tl.exp(-p0)
        s = t * tl.exp(-p1)
        y = tl.exp(-s)
        m = -_expm1_neg(-s)
        log_m = tl.where(s > 0.6931471805599453, log1m(tl.minimum(y, 0.5)), tl.log(m))
        log_z = log_m * ia
        if ACC == tl.float64:
            # bounds made in float64: a Python float within float32's range is a float32 constant in a
            # kernel, and 1 - 2**-53 rounded to 1.0 (z = 1 on an H200, where the interpreter kept it)
            z = tl.minimum(tl.maximum(tl.exp(log_z), tl.full(log_z.shape, 2.2250738585072014e-308, tl.float64)),
                           tl.full(log_z.shape, 0.9999999999999999, tl.float64))
        else:
            z = tl.minimum(tl.maximum(tl.exp(log_z), 1.1754943508222875e-38), 0.9999999403953552)
        r = s * y / m
        ynz = y == 0.0
        q = tl.where(ynz, -m, m * log_m / tl.where(ynz, 1.0, y))
        log_f = p0 + p1 + (1.0 - ia) * log_m - t + s
        c0 = -log_z
        c1 = -r * ia
        f0 = 1.0 + log_z
        f1 = 1.0 - s - (1.0 - ia) * r
        s0 = (b - 1.0) * q - (a - 1.0) * log_z
        s1 = (b - 1.0) * s - (a - 1.0) * r * ia
    return z, log_f, c0, c1, f0, f1, s0, s1


@triton.jit(do_not_specialize=["N", "KN", "offset0", "sample_stride", "row_stride"])
def _sample_positive_fwd_kernel(
    p0_ptr,  # (N, L)
    p1_ptr,  # (N, L)
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L) = (KN, L) sample rows
    log_q_ptr,  # (KN,): written when WITH_LOG_Q
    offset0, sample_stride, row_stride,  # z[k, n, l]'s noise at offset0 + k * sample_stride + n * row_stride + l
    N, KN, L,  # KN = K * N
    FAMILY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    WITH_LOG_Q: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    r, g, j, n, seed, log_q = family_rows(seed_ptr, N, ACC, BLOCK_R, BLOCK_L)  # sample rows r = k * N + n
    rr = r[:, None, None]
    for l0 in range(0, L, BLOCK_L):
        cols, mask, idx = row_columns(r, n, g, j, l0, KN, L, L)
        p0 = tl.load(p0_ptr + idx, mask=mask, other=0.0).to(ACC)
        if FAMILY == 0:
            p1 = p0
        else:
            p1 = tl.load(p1_ptr + idx, mask=mask, other=0.0).to(ACC)
        x = row_words(seed, noise_start(offset0, sample_stride, row_stride, r, n, N, l0), g, j, ALIGNED)
        z, log_f, c0, c1, f0, f1, s0, s1 = _terms(x, p0, p1, FAMILY, ACC)
        tl.store(z_ptr + rr * L + cols, z.to(z_ptr.dtype.element_ty), mask=mask)
        if WITH_LOG_Q:
            log_q += tl.sum(tl.sum(tl.where(mask, log_f, 0.0), axis=2), axis=1)
    if WITH_LOG_Q:
        store_rows(log_q_ptr, r, log_q, KN)


@triton.jit(do_not_specialize=["N", "NL", "K", "K_PER", "SPLITS"])
def _sample_positive_bwd_kernel(
    grad_z_ptr,  # (K, N, L), read when HAS_GRAD_Z
    grad_q_ptr,  # (K, N), read when HAS_GRAD_Q
    p0_ptr,  # (N, L)
    p1_ptr,  # (N, L)
    seed_ptr,  # (): int64
    d0_ptr,  # (N, L)
    d1_ptr,  # (N, L)
    part_ptr,  # (2, SPLITS, N * L) ACC: each split's sums (SPLITS > 1)
    counter_ptr,  # (blocks,) int32 arrival counters (SPLITS > 1)
    N, L, NL, K, K_PER, SPLITS,  # launch_family_backward's geometry: NL = N * L, samples K, K_PER per split
    FAMILY: tl.constexpr,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_Q: tl.constexpr,
    STOP_SCORE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    tile, split, k0, k1, start, g4, i, mask, n = parameter_block(NL, L, K, K_PER, BLOCK)
    seed = tl.load(seed_ptr)
    p0 = tl.load(p0_ptr + i, mask=mask, other=0.0).to(ACC)
    if FAMILY == 0:
        p1 = p0
    else:
        p1 = tl.load(p1_ptr + i, mask=mask, other=0.0).to(ACC)
    acc0 = tl.zeros([BLOCK // 4, 4], dtype=ACC)
    acc1 = tl.zeros([BLOCK // 4, 4], dtype=ACC)
    for k in range(k0, k1):
        base = k * NL
        x = block_words(seed, base, start, g4, i, ALIGNED)
        z, log_f, c0, c1, f0, f1, s0, s1 = _terms(x, p0, p1, FAMILY, ACC)
        if HAS_GRAD_Z:
            gz = tl.load(grad_z_ptr + base + i, mask=mask, other=0.0).to(ACC) * z
            acc0 += gz * c0
            acc1 += gz * c1
        if HAS_GRAD_Q:
            gq = tl.load(grad_q_ptr + k * N + n, mask=mask, other=0.0).to(ACC)
            if STOP_SCORE:
                acc0 += gq * s0
                acc1 += gq * s1
            else:
                acc0 += gq * f0
                acc1 += gq * f1
    if SPLITS == 1:
        tl.store(d0_ptr + i, acc0.to(d0_ptr.dtype.element_ty), mask=mask)
        tl.store(d1_ptr + i, acc1.to(d1_ptr.dtype.element_ty), mask=mask)
    else:
        store_split_parts(part_ptr, split, SPLITS, NL, i, mask, acc0, acc1, acc0, acc1, False, False)
        if arrive_last(counter_ptr + tile, SPLITS):
            t0, t1, _, _ = sum_split_parts(part_ptr, SPLITS, NL, i, mask, False, False, ACC, BLOCK)
            tl.store(d0_ptr + i, t0.to(d0_ptr.dtype.element_ty), mask=mask)
            tl.store(d1_ptr + i, t1.to(d1_ptr.dtype.element_ty), mask=mask)


def sample_positive_forward(log_p0, log_p1, seed, family, offset0, sample_stride, row_stride, z, log_q) -> None:
    """z (K, N, L) <- the family's sample from t = -log u at offset0 + k *
    sample_stride + n * row_stride + l with log parameters log_p0, log_p1 (N, L);
    log_q (K, N), when not None, <- sum_l log f from the same t."""
    launch_family_forward(_sample_positive_fwd_kernel, log_p0, log_p1, seed, family, offset0, sample_stride,
                          row_stride, z, log_q)


def sample_positive_backward(grad_z, grad_log_q, log_p0, log_p1, seed, family, stop_score, dlog_p0,
                             dlog_p1) -> None:
    """dlog_p0, dlog_p1 (N, L) <- sum_k grad_z_k z_k c_j + grad_log_q_k (s_j with
    stop_score, else f_j) of the oracle's positive_terms, t regenerated; grad_z
    (K, N, L) and grad_log_q (K, N) each None when its output has no gradient."""
    launch_family_backward(_sample_positive_bwd_kernel, 2, grad_z, grad_log_q, log_p0, log_p1, seed, family,
                           stop_score, dlog_p0, dlog_p1)


def sample_positive_kl_forward(log_p0, log_p1, prior_log_p0, prior_log_p1, seed, family, kl_family, z, kl) -> None:
    """The draw at the training layout's offsets, then family_kl's forward
    (the exponential's log-rates alone; the Weibull's and the Kumaraswamy's
    two parameters as its (loc, log_param)): two kernels."""
    N, L = log_p0.shape
    sample_positive_forward(log_p0, log_p1, seed, family, 0, N * L, L, z, None)
    if kl_family == EXPONENTIAL:
        family_kl_forward(None, log_p0, None, prior_log_p0, kl_family, kl)
    else:
        family_kl_forward(log_p0, log_p1, prior_log_p0, prior_log_p1, kl_family, kl)


def sample_positive_kl_backward(grad_z, grad_kl, log_p0, log_p1, prior_log_p0, prior_log_p1, seed, family,
                                kl_family, dlog_p0, dlog_p1, dprior_log_p0, dprior_log_p1) -> None:
    """The sampler's backward, then family_kl's adding q's gradients to it
    (ACCUMULATE): two kernels. The exponential's second parameters are
    stand-ins: the sampler writes 0 to dlog_p1, and dprior_log_p1 is 0."""
    N, L = log_p0.shape
    if grad_z is not None:
        sample_positive_backward(grad_z, None, log_p0, log_p1, seed, family, False, dlog_p0, dlog_p1)
    else:
        dlog_p0.zero_()
        dlog_p1.zero_()
    has_dp = dprior_log_p0 is not None
    exponential = kl_family == EXPONENTIAL
    if grad_kl is None or exponential:
        if has_dp:
            dprior_log_p0.zero_()
            dprior_log_p1.zero_()
    if grad_kl is None or N * L == 0:
        return
    # the exponential's kernel reads and writes no location: its pointers are the log-rates'
    q = (log_p0, log_p0) if exponential else (log_p0, log_p1)
    p = (prior_log_p0, prior_log_p0) if exponential else (prior_log_p0, prior_log_p1)
    dq = (dlog_p0, dlog_p0) if exponential else (dlog_p0, dlog_p1)
    dp = (dprior_log_p0, dprior_log_p0) if exponential else (dprior_log_p0, dprior_log_p1)
    grid, meta = backward_plan(N, L, log_p0.dtype, kl_family, prior_log_p0.dim() == 1, True, has_dp, True)
    _family_kl_bwd_kernel[grid](grad_kl, *q, *p, *dq, *(dp if has_dp else dq), N, L, **meta)
