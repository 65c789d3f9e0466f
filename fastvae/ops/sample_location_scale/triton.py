"""Triton kernels of sample_location_scale: z = loc + exp(log_scale) * e
for K samples, e = F^-1(u) of a standardized family, and log q(z) =
sum_l(log f(e) - log_scale) per sample row from the same e; the backward
regenerates e from (seed, offset) instead of storing it.

The family (uniform, Laplace, logistic, Gumbel, Cauchy: fastvae/_families.py's
LOCATION_SCALE_FAMILIES order) is a constexpr FAMILY: the standardized
inverse CDF is a compile-time variant of one kernel pair. The words, their
uniforms and the launch geometry are the samplers' (kernels/sampler.py).

Layout: loc, log_scale (N, L); z, grad_z (K, N, L); log_q, grad_log_q (K, N);
z[k, n, l] uses the uniform at offset0 + k * sample_stride + n * row_stride + l.
"""
import triton
import triton.language as tl

from fastvae.kernels._common import arrive_last
from fastvae.kernels.philox import _cos_sin_turns
from fastvae.kernels.sampler import (
    block_words,
    family_rows,
    launch_family_backward,
    launch_family_forward,
    log1m,
    noise_start,
    open_uniforms,
    parameter_block,
    row_columns,
    row_words,
    store_rows,
    store_split_parts,
    sum_split_parts,
)
from fastvae.ops.family_kl.triton import _family_kl_bwd_kernel, backward_plan, family_kl_forward

# -- the family's transform and density -------------------------------------


@triton.jit
def _standardized(x, FAMILY: tl.constexpr, ACC: tl.constexpr):
    """(e, log f(e), psi(e) = d log f / de) of the standardized family at
    folded words x (the oracle's standardized gives the formulas)."""
    u, v = open_uniforms(x, ACC)
    lower = x < 1073741824  # u < 1/2, decided on the integer
    if FAMILY == 0:  # uniform
        e = u
        log_f = tl.zeros_like(u)
        psi = tl.zeros_like(u)
    elif FAMILY == 1:  # Laplace
        a = tl.log(2.0 * tl.where(lower, u, v))
        e = tl.where(lower, a, -a)
        log_f = a - 0.6931471805599453
        psi = tl.where(lower, 1.0, -1.0).to(ACC)
    elif FAMILY == 2:  # logistic
        lu = tl.log(u)
        lv = tl.log(v)
        e = lu - lv
        log_f = lu + lv
        psi = v - u
    elif FAMILY == 3:  # Gumbel: t = -log u, the Exp(1) variate
        t = tl.where(lower, -tl.log(u), -log1m(v))
        e = -tl.log(t)
        log_f = -e - t
        psi = t - 1.0
    else:  # Cauchy: e = -/+ cot(pi w), w = min(u, v); 1 + e^2 = 1 / sin^2
        w = tl.where(lower, u, v)
        if ACC == tl.float64:
            c = tl.cos(3.141592653589793 * w)
            s = tl.sin(3.141592653589793 * w)
        else:
            c, s = _cos_sin_turns(0.5 * w)
        sign = tl.where(lower, -1.0, 1.0).to(ACC)
        e = sign * c / s
        log_f = 2.0 * tl.log(s) - 1.1447298858494002
        psi = -2.0 * sign * c * s
    return e, log_f, psi


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "KN", "offset0", "sample_stride", "row_stride"])
def _sample_location_scale_fwd_kernel(
    loc_ptr,  # (N, L)
    log_scale_ptr,  # (N, L)
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L) = (KN, L) sample rows
    log_q_ptr,  # (KN,): log q(z) per sample row, written when WITH_LOG_Q
    offset0, sample_stride, row_stride,  # z[k, n, l]'s noise at offset0 + k * sample_stride + n * row_stride + l
    N, KN, L,  # KN = K * N
    FAMILY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    WITH_LOG_Q: tl.constexpr,
    ALIGNED: tl.constexpr,  # every row's uniforms start a Philox counter
):
    r, g, j, n, seed, log_q = family_rows(seed_ptr, N, ACC, BLOCK_R, BLOCK_L)  # sample rows r = k * N + n
    rr = r[:, None, None]
    for l0 in range(0, L, BLOCK_L):
        cols, mask, idx = row_columns(r, n, g, j, l0, KN, L, L)
        loc = tl.load(loc_ptr + idx, mask=mask, other=0.0).to(ACC)
        ls = tl.load(log_scale_ptr + idx, mask=mask, other=0.0).to(ACC)
        x = row_words(seed, noise_start(offset0, sample_stride, row_stride, r, n, N, l0), g, j, ALIGNED)
        e, log_f, psi = _standardized(x, FAMILY, ACC)
        tl.store(z_ptr + rr * L + cols, (loc + tl.exp(ls) * e).to(z_ptr.dtype.element_ty), mask=mask)
        if WITH_LOG_Q:
            log_q += tl.sum(tl.sum(tl.where(mask, log_f - ls, 0.0), axis=2), axis=1)
    if WITH_LOG_Q:
        store_rows(log_q_ptr, r, log_q, KN)


@triton.jit
def _finish(acc_z, acc_ze, acc_psi, acc_q, i, mask, log_scale_ptr, dloc_ptr, dlog_scale_ptr, ACC: tl.constexpr):
    """dloc = sum dz + (sum dq psi) / s (0 stays 0 where 1 / s overflows);
    dlog_scale = s sum dz e + acc_q."""
    ls = tl.load(log_scale_ptr + i, mask=mask, other=0.0).to(ACC)
    dloc = acc_z + tl.where(acc_psi == 0, 0.0, acc_psi * tl.exp(-ls))
    dls = tl.exp(ls) * acc_ze + acc_q
    tl.store(dloc_ptr + i, dloc.to(dloc_ptr.dtype.element_ty), mask=mask)
    tl.store(dlog_scale_ptr + i, dls.to(dlog_scale_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "NL", "K", "K_PER", "SPLITS"])
def _sample_location_scale_bwd_kernel(
    grad_z_ptr,  # (K, N, L), read when HAS_GRAD_Z
    grad_q_ptr,  # (K, N), read when HAS_GRAD_Q
    loc_ptr,  # (N, L): not read (z's path does not need loc)
    log_scale_ptr,  # (N, L)
    seed_ptr,  # (): int64
    dloc_ptr,  # (N, L)
    dls_ptr,  # (N, L)
    part_ptr,  # (4, SPLITS, N * L) ACC: each split's sums (SPLITS > 1)
    counter_ptr,  # (blocks,) int32 arrival counters, 0 between launches (SPLITS > 1)
    N, L, NL, K, K_PER, SPLITS,  # launch_family_backward's geometry: NL = N * L, samples K, K_PER per split
    FAMILY: tl.constexpr,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_Q: tl.constexpr,
    STOP_SCORE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # L divisible by 4: each sample's block starts a Philox counter
):
    tile, split, k0, k1, start, g4, i, mask, n = parameter_block(NL, L, K, K_PER, BLOCK)
    seed = tl.load(seed_ptr)
    acc_z = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dz
    acc_ze = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dz e
    acc_psi = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dq psi (STOP_SCORE)
    acc_q = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dq psi e (STOP_SCORE), else -sum_k dq
    for k in range(k0, k1):
        base = k * NL
        x = block_words(seed, base, start, g4, i, ALIGNED)
        e, log_f, psi = _standardized(x, FAMILY, ACC)
        if HAS_GRAD_Z:
            dz = tl.load(grad_z_ptr + base + i, mask=mask, other=0.0).to(ACC)
            acc_z += dz
            acc_ze += dz * e
        if HAS_GRAD_Q:
            gq = tl.load(grad_q_ptr + k * N + n, mask=mask, other=0.0).to(ACC)
            if STOP_SCORE:
                acc_psi += gq * psi
                acc_q += gq * psi * e
            else:
                acc_q -= gq
    if SPLITS == 1:
        _finish(acc_z, acc_ze, acc_psi, acc_q, i, mask, log_scale_ptr, dloc_ptr, dls_ptr, ACC)
    else:
        store_split_parts(part_ptr, split, SPLITS, NL, i, mask, acc_z, acc_ze, acc_psi, acc_q, True, True)
        if arrive_last(counter_ptr + tile, SPLITS):
            s_z, s_ze, s_psi, s_q = sum_split_parts(part_ptr, SPLITS, NL, i, mask, True, True, ACC, BLOCK)
            _finish(s_z, s_ze, s_psi, s_q, i, mask, log_scale_ptr, dloc_ptr, dls_ptr, ACC)


# -- launchers ----------------------------------------------------------------


def sample_location_scale_forward(loc, log_scale, seed, family, offset0, sample_stride, row_stride, z,
                                  log_q) -> None:
    """z (K, N, L) <- loc + exp(log_scale) * e of loc, log_scale (N, L), e the
    family's standardized variate at offset0 + k * sample_stride + n * row_stride + l;
    log_q (K, N), when not None, <- sum_l(log f(e) - log_scale)."""
    launch_family_forward(_sample_location_scale_fwd_kernel, loc, log_scale, seed, family, offset0, sample_stride,
                          row_stride, z, log_q)


def sample_location_scale_backward(grad_z, grad_log_q, loc, log_scale, seed, family, stop_score, dloc,
                                   dlog_scale) -> None:
    """dloc, dlog_scale (N, L) <- the gradients of sample_location_scale given
    grad_z (K, N, L) and grad_log_q (K, N), each None when its output has none:
    dloc = sum_k grad_z_k (+ (sum_k grad_log_q_k psi_k) / s with stop_score),
    dlog_scale = s sum_k grad_z_k e_k + (sum_k grad_log_q_k psi_k e_k with
    stop_score, else -sum_k grad_log_q_k); e regenerated, s = exp(log_scale)."""
    launch_family_backward(_sample_location_scale_bwd_kernel, 4, grad_z, grad_log_q, loc, log_scale, seed, family,
                           stop_score, dloc, dlog_scale)


def sample_location_scale_kl_forward(loc, log_scale, prior_loc, prior_log_scale, seed, family, kl_family, z,
                                     kl) -> None:
    """The draw at the training layout's offsets, then family_kl's forward:
    two kernels (the objectives' plans launch the same pair)."""
    N, L = loc.shape
    sample_location_scale_forward(loc, log_scale, seed, family, 0, N * L, L, z, None)
    family_kl_forward(loc, log_scale, prior_loc, prior_log_scale, kl_family, kl)


def sample_location_scale_kl_backward(grad_z, grad_kl, loc, log_scale, prior_loc, prior_log_scale, seed, family,
                                      kl_family, dloc, dlog_scale, dprior_loc, dprior_log_scale) -> None:
    """The sampler's backward, then family_kl's adding q's gradients to it
    (ACCUMULATE): two kernels, as the objectives' plans launch them."""
    N, L = loc.shape
    if grad_z is not None:
        sample_location_scale_backward(grad_z, None, loc, log_scale, seed, family, False, dloc, dlog_scale)
    else:
        dloc.zero_()
        dlog_scale.zero_()
    if grad_kl is None:
        if dprior_loc is not None:
            dprior_loc.zero_()
            dprior_log_scale.zero_()
        return
    if N * L == 0:
        return
    has_dp = dprior_log_scale is not None
    grid, meta = backward_plan(N, L, loc.dtype, kl_family, prior_log_scale.dim() == 1, True, has_dp, True)
    _family_kl_bwd_kernel[grid](grad_kl, loc, log_scale, prior_loc, prior_log_scale, dloc, dlog_scale,
                                dloc if dprior_loc is None else dprior_loc,
                                dlog_scale if dprior_log_scale is None else dprior_log_scale, N, L, **meta)
