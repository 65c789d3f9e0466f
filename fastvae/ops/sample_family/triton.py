"""Triton kernels of sample_location_scale and sample_positive. The family
is a constexpr FAMILY (fastvae/_families.py's order): the transform is a
compile-time variant of one kernel pair per op. The words, their uniforms
and the launch geometry are the samplers' (kernels/sampler.py); the backward
regenerates the noise from (seed, offset) instead of storing it.

Layout: the two parameters (N, L); z, grad_z (K, N, L); log_q, grad_log_q
(K, N); z[k, n, l] uses the uniform at offset0 + k * sample_stride + n *
row_stride + l.

- sample_location_scale: z = loc + exp(log_scale) * e for K samples, e =
  F^-1(u) of a standardized family (uniform, Laplace, logistic, Gumbel,
  Cauchy), and log q(z) = sum_l(log f(e) - log_scale) per sample row from
  the same e.
- sample_positive: the positive inverse-CDF families (exponential, Weibull,
  Kumaraswamy) as transforms of the Exp(1) variate t = -log u; log q(z)
  summed per sample row from the same t. The oracle's positive_terms
  (__init__.py) gives the closed forms. The exponential reads log_p1 not at
  all (its gradient is written as 0).

sample_concrete's kernels: relaxed one-hot (Concrete /
Gumbel-softmax) samples of logits (N, L, C) at a temperature per latent, from
C consecutive Philox uniforms per latent (the samplers' words, kernels/sampler.py),
and log q(z) summed over L from the same Exp(1) noise t = -log u; the backward
regenerates t from (seed, offset) instead of storing it.
The oracle's concrete_terms (__init__.py) gives the closed forms; -inf logits mask their
category (z_c = 0, left out of the density).

One latent's C categories are one row of a 2-D tile, BLOCK_C the next power
of two of C (C up to CONCRETE_MAX_C). A forward program owns BLOCK_R sample rows (k, n)
and takes BLOCK_L of their latents at once: its tile is (BLOCK_R x BLOCK_L,
BLOCK_C), the latents of a row consecutive, and each row's log q and KL are
the tile's per-latent terms summed over the latent axis (a reshape to
(BLOCK_R, BLOCK_L) and a sum: deterministic, no atomics), one chunk of
BLOCK_L latents after another where L is longer than the tile holds. The tile
is CONCRETE_TILE elements (512 on a GPU: 4 a thread at 4 warps, beside Philox's state)
filled latents first, then rows: a sampler's row of L <= 512 / BLOCK_C
latents is one program, so the K N rows all run at once, no SM walking many
rows' latents one after another while the others wait (a Gumbel-softmax
VAE's (100, 30, 10) launches 100 programs, (4096, 32, 16) 4096); a row of
fewer elements shares
a program with others, and a latent of more than CONCRETE_TILE categories is a tile of
one latent (the program loops over the row's latents). The block shapes follow
L and C only, never K or N (no new variant per batch size). The backward's
programs take BLOCK_J = CONCRETE_TILE / BLOCK_C latents and loop over the K samples.
With a prior log-pmf (WITH_KL) the forward also sums the analytic categorical
KL of each row over its latents (stored by the rows of sample 0 only: it has no
noise), and the backward adds its gradient to each latent's. Under the
interpreter (CPU tensors, about 1 ms a program) the tile is CONCRETE_INTERPRETER_TILE
elements, so that few programs run.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import acc_dtype, arrive_last, cdiv, next_power_of_2, program_rows
from fastvae.kernels.philox import _cos_sin_turns
from fastvae.kernels.sampler import (
    block_words,
    exp1,
    family_backward_plan,
    family_forward_plan,
    family_rows,
    family_split_buffers,
    gradient_samples,
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
    words,
)
from fastvae.ops.family_kl.triton import (
    EXPONENTIAL,
    _family_kl_bwd_kernel,
    _kl_grad,
    _kl_term,
    backward_plan,
    family_kl_forward,
)

GUMBEL_KL = 2  # the Gumbel's position in KL_FAMILIES (fastvae/_families.py; tests/test_registry.py checks it)

# -- sample_location_scale: the family's transform and density -------------------


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


@triton.jit
def _draw_columns(loc_ptr, log_scale_ptr, z_ptr, seed, offset0, sample_stride, row_stride, r, n, g, j, l0, N, KN, L,
                  FAMILY: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr):
    """Stores z at the columns l0 + 4 g + j of sample rows r (parameter rows
    n); returns (loc, log_scale, log f(e), cols, mask, idx) there."""
    cols, mask, idx = row_columns(r, n, g, j, l0, KN, L, L)
    loc = tl.load(loc_ptr + idx, mask=mask, other=0.0).to(ACC)
    ls = tl.load(log_scale_ptr + idx, mask=mask, other=0.0).to(ACC)
    x = row_words(seed, noise_start(offset0, sample_stride, row_stride, r, n, N, l0), g, j, ALIGNED)
    e, log_f, psi = _standardized(x, FAMILY, ACC)
    tl.store(z_ptr + r[:, None, None] * L + cols, (loc + tl.exp(ls) * e).to(z_ptr.dtype.element_ty), mask=mask)
    return loc, ls, log_f, cols, mask, idx


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
    for l0 in range(0, L, BLOCK_L):
        loc, ls, log_f, cols, mask, idx = _draw_columns(loc_ptr, log_scale_ptr, z_ptr, seed, offset0, sample_stride,
                                                        row_stride, r, n, g, j, l0, N, KN, L, FAMILY, ACC, ALIGNED)
        if WITH_LOG_Q:
            log_q += tl.sum(tl.sum(tl.where(mask, log_f - ls, 0.0), axis=2), axis=1)
    if WITH_LOG_Q:
        store_rows(log_q_ptr, r, log_q, KN)


@triton.jit
def _prior_index(idx, cols, P_SHARED: tl.constexpr):
    """The prior's index of the parameters' idx: its column where every row shares it."""
    if P_SHARED:
        return cols + tl.zeros_like(idx)
    return idx


@triton.jit(do_not_specialize=["N", "KN", "sample_stride"])
def _sample_location_scale_kl_fwd_kernel(
    loc_ptr, log_scale_ptr,  # (N, L)
    p_loc_ptr, p_ls_ptr,  # the prior's: (L,) when P_SHARED, else (N, L)
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L) = (KN, L) sample rows, the training layout: noise at k * N L + n L + l
    kl_ptr,  # (N,): family_kl's KL_FAMILY closed form of row n, summed over L
    sample_stride,  # N * L
    N, KN, L,
    FAMILY: tl.constexpr,
    KL_FAMILY: tl.constexpr,
    P_SHARED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    r, g, j, n, seed, kl = family_rows(seed_ptr, N, ACC, BLOCK_R, BLOCK_L)
    first = r < N  # sample 0's rows: the KL's, once per parameter row
    with_kl = tl.program_id(0).to(tl.int64) * BLOCK_R < N  # (K N rows may pass 2**31)
    for l0 in range(0, L, BLOCK_L):
        loc, ls, log_f, cols, mask, idx = _draw_columns(loc_ptr, log_scale_ptr, z_ptr, seed, 0, sample_stride, L, r,
                                                        n, g, j, l0, N, KN, L, FAMILY, ACC, ALIGNED)
        if with_kl:
            p_idx = _prior_index(idx, cols, P_SHARED)
            m2 = tl.load(p_loc_ptr + p_idx, mask=mask, other=0.0).to(ACC)
            s2 = tl.load(p_ls_ptr + p_idx, mask=mask, other=0.0).to(ACC)
            term = _kl_term(loc, ls, m2, s2, KL_FAMILY, ACC)
            kl += tl.sum(tl.sum(tl.where(mask & first[:, None, None], term, 0.0), axis=2), axis=1)
    if with_kl:
        store_rows(kl_ptr, r, kl, N)


@triton.jit
def _gradients(acc_z, acc_ze, acc_psi, acc_q, ls):
    """(dloc, dlog_scale) at log-scales ls: dloc = sum dz + (sum dq psi) / s
    (0 stays 0 where 1 / s overflows); dlog_scale = s sum dz e + acc_q."""
    dloc = acc_z + tl.where(acc_psi == 0, 0.0, acc_psi * tl.exp(-ls))
    return dloc, tl.exp(ls) * acc_ze + acc_q


@triton.jit
def _finish(acc_z, acc_ze, acc_psi, acc_q, i, mask, log_scale_ptr, dloc_ptr, dlog_scale_ptr, ACC: tl.constexpr):
    """Stores _gradients of the block's sums."""
    ls = tl.load(log_scale_ptr + i, mask=mask, other=0.0).to(ACC)
    dloc, dls = _gradients(acc_z, acc_ze, acc_psi, acc_q, ls)
    tl.store(dloc_ptr + i, dloc.to(dloc_ptr.dtype.element_ty), mask=mask)
    tl.store(dlog_scale_ptr + i, dls.to(dlog_scale_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _draw_sums(grad_z_ptr, grad_q_ptr, seed, k0, k1, NL, N, start, g4, i, mask, n, FAMILY: tl.constexpr,
               HAS_GRAD_Z: tl.constexpr, HAS_GRAD_Q: tl.constexpr, STOP_SCORE: tl.constexpr, ACC: tl.constexpr,
               BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """The block's sums over the samples [k0, k1) (e regenerated): sum dz,
    sum dz e, and of the log-q gradients sum dq psi, sum dq psi e (STOP_SCORE)
    or -sum dq."""
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
    return acc_z, acc_ze, acc_psi, acc_q


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
    acc_z, acc_ze, acc_psi, acc_q = _draw_sums(grad_z_ptr, grad_q_ptr, tl.load(seed_ptr), k0, k1, NL, N, start, g4, i,
                                               mask, n, FAMILY, HAS_GRAD_Z, HAS_GRAD_Q, STOP_SCORE, ACC, BLOCK, ALIGNED)
    if SPLITS == 1:
        _finish(acc_z, acc_ze, acc_psi, acc_q, i, mask, log_scale_ptr, dloc_ptr, dls_ptr, ACC)
    else:
        store_split_parts(part_ptr, split, SPLITS, NL, i, mask, acc_z, acc_ze, acc_psi, acc_q, True, True)
        if arrive_last(counter_ptr + tile, SPLITS):
            s_z, s_ze, s_psi, s_q = sum_split_parts(part_ptr, SPLITS, NL, i, mask, True, True, ACC, BLOCK)
            _finish(s_z, s_ze, s_psi, s_q, i, mask, log_scale_ptr, dloc_ptr, dls_ptr, ACC)


@triton.jit
def _finish_kl(acc_z, acc_ze, i, mask, n, grad_kl_ptr, loc_ptr, log_scale_ptr, p_loc_ptr, p_ls_ptr, dloc_ptr,
               dlog_scale_ptr, dp_loc_ptr, dp_ls_ptr, L, KL_FAMILY: tl.constexpr, P_SHARED: tl.constexpr,
               HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr, HAS_DP: tl.constexpr, ACC: tl.constexpr):
    """Stores the draw's gradients plus the KL's, each rounded to the
    gradients' dtype before the sum (as family_kl's ACCUMULATE adds them),
    and the prior's per element (HAS_DP)."""
    ls = tl.load(log_scale_ptr + i, mask=mask, other=0.0).to(ACC)
    if HAS_GRAD_Z:
        dloc, dls = _gradients(acc_z, acc_ze, tl.zeros_like(acc_z), tl.zeros_like(acc_z), ls)
    else:  # no draw's gradient: 0, not exp(ls) * 0 (NaN where the scale overflows)
        dloc, dls = acc_z, acc_ze
    dloc = dloc.to(dloc_ptr.dtype.element_ty)
    dls = dls.to(dlog_scale_ptr.dtype.element_ty)
    if HAS_GRAD_KL:
        g = tl.load(grad_kl_ptr + n, mask=mask, other=0.0).to(ACC)
        loc = tl.load(loc_ptr + i, mask=mask, other=0.0).to(ACC)
        p_idx = _prior_index(i, i % L, P_SHARED)
        m2 = tl.load(p_loc_ptr + p_idx, mask=mask, other=0.0).to(ACC)
        s2 = tl.load(p_ls_ptr + p_idx, mask=mask, other=0.0).to(ACC)
        dm1, ds1, dm2, ds2 = _kl_grad(g, loc, ls, m2, s2, KL_FAMILY, ACC)
        dloc = dloc + dm1.to(dloc_ptr.dtype.element_ty)
        dls = dls + ds1.to(dlog_scale_ptr.dtype.element_ty)
        if HAS_DP:
            tl.store(dp_loc_ptr + i, dm2.to(dp_loc_ptr.dtype.element_ty), mask=mask)
            tl.store(dp_ls_ptr + i, ds2.to(dp_ls_ptr.dtype.element_ty), mask=mask)
    tl.store(dloc_ptr + i, dloc, mask=mask)
    tl.store(dlog_scale_ptr + i, dls, mask=mask)


@triton.jit(do_not_specialize=["N", "NL", "K", "K_PER", "SPLITS"])
def _sample_location_scale_kl_bwd_kernel(
    grad_z_ptr,  # (K, N, L), read when HAS_GRAD_Z
    grad_kl_ptr,  # (N,), read when HAS_GRAD_KL
    loc_ptr, log_scale_ptr,  # (N, L)
    p_loc_ptr, p_ls_ptr,  # (L,) when P_SHARED, else (N, L)
    seed_ptr,  # (): int64
    dloc_ptr, dls_ptr,  # (N, L)
    dp_loc_ptr, dp_ls_ptr,  # (N, L): the prior's per element, written when HAS_DP
    part_ptr, counter_ptr,  # the split samples' partial sums and arrival counters (SPLITS > 1)
    N, L, NL, K, K_PER, SPLITS,
    FAMILY: tl.constexpr,
    KL_FAMILY: tl.constexpr,
    P_SHARED: tl.constexpr,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_KL: tl.constexpr,
    HAS_DP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    tile, split, k0, k1, start, g4, i, mask, n = parameter_block(NL, L, K, K_PER, BLOCK)
    acc_z, acc_ze, _, _ = _draw_sums(grad_z_ptr, grad_z_ptr, tl.load(seed_ptr), k0, k1, NL, N, start, g4, i, mask, n,
                                     FAMILY, HAS_GRAD_Z, False, False, ACC, BLOCK, ALIGNED)
    if SPLITS == 1:
        _finish_kl(acc_z, acc_ze, i, mask, n, grad_kl_ptr, loc_ptr, log_scale_ptr, p_loc_ptr, p_ls_ptr, dloc_ptr,
                   dls_ptr, dp_loc_ptr, dp_ls_ptr, L, KL_FAMILY, P_SHARED, HAS_GRAD_Z, HAS_GRAD_KL, HAS_DP, ACC)
    else:
        store_split_parts(part_ptr, split, SPLITS, NL, i, mask, acc_z, acc_ze, acc_z, acc_z, False, False)
        if arrive_last(counter_ptr + tile, SPLITS):
            s_z, s_ze, _, _ = sum_split_parts(part_ptr, SPLITS, NL, i, mask, False, False, ACC, BLOCK)
            _finish_kl(s_z, s_ze, i, mask, n, grad_kl_ptr, loc_ptr, log_scale_ptr, p_loc_ptr, p_ls_ptr, dloc_ptr,
                       dls_ptr, dp_loc_ptr, dp_ls_ptr, L, KL_FAMILY, P_SHARED, HAS_GRAD_Z, HAS_GRAD_KL, HAS_DP, ACC)


# -- launchers ----------------------------------------------------------------


# Each family sampler's partial sums a split of its backward keeps per element
# (family_split_buffers): the location-scale sampler's four (dloc, dlog_scale
# and the score's two), the positive sampler's two.
SPLIT_SUMS = {"sample_location_scale": 4, "sample_positive": 2}


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
    launch_family_backward(_sample_location_scale_bwd_kernel, SPLIT_SUMS["sample_location_scale"], grad_z,
                           grad_log_q, loc, log_scale, seed, family, stop_score, dloc, dlog_scale)


def kl_forward_plan(K: int, N: int, L: int, dtype: torch.dtype, device: torch.device, family: int, kl_family: int,
                    p_shared: bool) -> tuple[tuple, dict]:
    """(grid, compile-time parameters) of the draw and KL in one forward over
    (K, N, L), K N L > 0: what sample_location_scale_kl_forward launches, and
    the objectives' plans (fastvae/_plan.py) launch with the same variants."""
    grid, meta = family_forward_plan(K, N, L, dtype, device, family, False, 0, N * L, L)
    del meta["WITH_LOG_Q"]
    return grid, dict(meta, KL_FAMILY=int(kl_family), P_SHARED=bool(p_shared))


def kl_backward_plan(K: int, N: int, L: int, dtype: torch.dtype, device: torch.device, family: int, kl_family: int,
                     p_shared: bool, has_grad_z: bool, has_grad_kl: bool,
                     has_dp: bool) -> tuple[tuple, dict, int, int, int]:
    """(grid, compile-time parameters, blocks, splits, samples per split) of
    the draw's and the KL's gradients in one backward over (N, L), N L > 0,
    and K samples (0 without grad_z)."""
    # the Gumbel KL's lgamma and digamma beside the draw's sums spill in float64
    # (python -m fastvae.kernels.aot --arch sm_90 sm_80 --dtype float64): half the block
    narrow = 2 if dtype == torch.float64 and kl_family == GUMBEL_KL else 1
    grid, meta, blocks, splits, per_split = family_backward_plan(K, N, L, dtype, device, family, has_grad_z, False,
                                                                 False, narrow)
    del meta["HAS_GRAD_Q"], meta["STOP_SCORE"]
    meta.update(KL_FAMILY=int(kl_family), P_SHARED=bool(p_shared), HAS_GRAD_KL=has_grad_kl, HAS_DP=has_dp)
    return grid, meta, blocks, splits, per_split


def sample_location_scale_kl_forward(loc, log_scale, prior_loc, prior_log_scale, seed, family, kl_family, z,
                                     kl) -> None:
    """z (K, N, L) at the training layout's noise and kl (N,) <- the draw and
    family_kl's closed form against the prior (L,) or (N, L), summed over L:
    one kernel, the KL from sample 0's rows as they are drawn."""
    K, N, L = z.shape
    if K * N * L == 0:
        kl.zero_()
        return
    grid, meta = kl_forward_plan(K, N, L, loc.dtype, loc.device, family, kl_family, prior_log_scale.dim() == 1)
    _sample_location_scale_kl_fwd_kernel[grid](loc, log_scale, prior_loc, prior_log_scale, seed, z, kl, N * L, N,
                                               K * N, L, **meta)


def sample_location_scale_kl_backward(grad_z, grad_kl, loc, log_scale, prior_loc, prior_log_scale, seed, family,
                                      kl_family, dloc, dlog_scale, dprior_loc, dprior_log_scale) -> None:
    """dloc, dlog_scale (N, L) <- the draw's gradients plus the KL's, and
    dprior_* (N, L) <- the prior's per element where given and grad_kl is: one
    kernel. grad_z (K, N, L) and grad_kl (N,) are None where absent."""
    N, L = loc.shape
    if N * L == 0:
        return
    if grad_z is None and grad_kl is None:
        for t in (dloc, dlog_scale, dprior_loc, dprior_log_scale):
            if t is not None:
                t.zero_()
        return
    has_dp = dprior_log_scale is not None and grad_kl is not None
    if dprior_log_scale is not None and not has_dp:
        dprior_loc.zero_()
        dprior_log_scale.zero_()
    K = 0 if grad_z is None else grad_z.shape[0]
    grid, meta, blocks, splits, per_split = kl_backward_plan(K, N, L, loc.dtype, loc.device, family, kl_family,
                                                             prior_log_scale.dim() == 1, grad_z is not None,
                                                             grad_kl is not None, has_dp)
    part, counters = family_split_buffers(2, N, L, loc.dtype, loc.device, blocks, splits)
    _sample_location_scale_kl_bwd_kernel[grid](
        loc if grad_z is None else grad_z, loc if grad_kl is None else grad_kl, loc, log_scale, prior_loc,
        prior_log_scale, seed, dloc, dlog_scale, dloc if not has_dp else dprior_loc,
        dlog_scale if not has_dp else dprior_log_scale, part, counters, N, L, N * L, K, per_split, splits, **meta)


# -- sample_positive ---------------------------------------------------------------


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
    launch_family_backward(_sample_positive_bwd_kernel, SPLIT_SUMS["sample_positive"], grad_z, grad_log_q,
                           log_p0, log_p1, seed, family, stop_score, dlog_p0, dlog_p1)


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


# -- sample_concrete ----------------------------------------------------------------

CONCRETE_MAX_C = 1 << 14
# Elements of a program's tile on a GPU (forward and backward): 4 a thread at 4
# warps, Philox's state and the noise's logs and exps holding the rest of the
# registers; a latent of more categories is a tile alone, at 8 warps.
CONCRETE_TILE = 512
CONCRETE_INTERPRETER_TILE = 1 << 14
# Left to itself ptxas gave the backward's grad_z + grad_kl variant 64 registers
# and a spill (float16, sm_90; float64: 128 and 24 bytes): a cap above what
# every variant of a CONCRETE_TILE-element tile uses keeps them all in registers.
CONCRETE_BACKWARD_MAXNREG = 128
CONCRETE_FP64_BACKWARD_MAXNREG = 168


@triton.jit
def _latents(x, a, lam, cols, C, ACC: tl.constexpr):
    """(z, log q, w, count) of a (rows, BLOCK_C) tile of latents: folded words
    x, logits a (-inf: masked or padding), temperatures lam (rows,)."""
    valid = (a > float("-inf")) & (cols < C)
    t = exp1(x, ACC)
    t = tl.where(valid, t, 1.0)
    lt = tl.log(t)
    # shifted by the latent's largest logit (only differences matter): y stays
    # finite for logits of any size at any temperature
    top = tl.max(tl.where(valid, a, float("-inf")), axis=1)
    top = tl.where(top > float("-inf"), top, 0.0)
    y = tl.where(valid, ((a - top[:, None]) - lt) / lam[:, None], float("-inf"))
    m = tl.max(y, axis=1)
    e = tl.where(valid, tl.exp(y - m[:, None]), 0.0)
    ls = tl.log(tl.sum(e, axis=1))
    lz = tl.where(valid, y - m[:, None] - ls[:, None], 0.0)
    z = tl.where(valid, tl.exp(lz), 0.0)
    count = tl.sum(valid.to(ACC), axis=1)
    tv = tl.where(valid, t, 0.0)
    sum_t = tl.sum(tv, axis=1)
    colf = cols.to(ACC)
    lgam = tl.sum(tl.where((colf >= 1.0) & (colf < count[:, None]), tl.log(tl.maximum(colf, 1.0)), 0.0), axis=1)
    log_q = (lgam + (count - 1.0) * tl.log(lam) - tl.sum(lz, axis=1) + tl.sum(tl.where(valid, lt, 0.0), axis=1)
             - count * tl.log(sum_t))
    w = tv / sum_t[:, None]
    return z, log_q, w, count, y, m, valid


@triton.jit
def _categorical_kl(a, lp, valid):
    """(KL per row, pi, log pi, live) of a (rows, BLOCK_C) tile of logits a and
    prior log-pmf lp: sum_c pi_c (log pi_c - log p_c) over the categories with
    pi_c > 0 (masked ones, and underflowed ones, add 0 as in torch's
    where(pi > 0, ...), even where log p_c = -inf)."""
    top = tl.max(tl.where(valid, a, float("-inf")), axis=1)
    top = tl.where(top > float("-inf"), top, 0.0)
    s = tl.where(valid, tl.exp(a - top[:, None]), 0.0)
    ls = tl.log(tl.sum(s, axis=1))
    lpi = tl.where(valid, (a - top[:, None]) - ls[:, None], 0.0)
    pi = tl.where(valid, tl.exp(lpi), 0.0)
    live = pi > 0.0
    diff = lpi - tl.where(live, lp, 0.0)
    kl = tl.sum(tl.where(live, pi * diff, 0.0), axis=1)
    return kl, pi, diff, live


@triton.jit(do_not_specialize=["N", "KN", "L", "C", "offset0", "sample_stride", "row_stride", "lp_stride"])
def _sample_concrete_fwd_kernel(
    a_ptr,  # (N, L, C)
    lam_ptr,  # (N, L)
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L, C)
    log_q_ptr,  # (K, N): written when WITH_LOG_Q
    log_p_ptr,  # (L, C), rows lp_stride apart (0: one (C,) prior for every latent): read when WITH_KL
    kl_ptr,  # (N,): written when WITH_KL
    offset0, sample_stride, row_stride,  # z[k, n, l, c]'s noise at offset0 + k sample_stride + n row_stride + l C + c
    N, KN, L, C, lp_stride,  # KN = K * N sample rows of L latents of C categories
    HARD: tl.constexpr,  # straight-through: z is the one-hot of the relaxed z's argmax
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,  # the tile
    WITH_LOG_Q: tl.constexpr, WITH_KL: tl.constexpr,  # which of log q and the KL it writes
):
    # tile row i is latent i % BLOCK_L of the program's row i // BLOCK_L
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    i = tl.arange(0, BLOCK_R * BLOCK_L)
    r = pid * BLOCK_R + (i // BLOCK_L).to(tl.int64)
    lat = i % BLOCK_L
    rmask = r < KN
    n = r % N
    k = r // N
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK_C)
    first_offset = offset0 + k * sample_stride + n * row_stride
    log_q = tl.zeros([BLOCK_R], dtype=ACC)
    kl = tl.zeros([BLOCK_R], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        li = l0 + lat
        live = rmask & (li < L)
        cmask = live[:, None] & (cols[None, :] < C)
        j = n * L + li
        a = tl.load(a_ptr + j[:, None] * C + cols[None, :], mask=cmask, other=float("-inf")).to(ACC)
        a = tl.where(live[:, None], a, tl.where(cols[None, :] == 0, 0.0, float("-inf")))  # dead rows: finite
        lam = tl.load(lam_ptr + j, mask=live, other=1.0).to(ACC)
        x = words(seed, (first_offset + li * C)[:, None] + cols[None, :])
        z, lq, w, count, y, m, valid = _latents(x, a, lam, cols[None, :], C, ACC)
        if HARD:
            first = tl.min(tl.where(valid & (y == m[:, None]), cols[None, :], BLOCK_C), axis=1)
            z = tl.where(cols[None, :] == first[:, None], 1.0, 0.0)
        tl.store(z_ptr + (r * L + li)[:, None] * C + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=cmask)
        log_q += tl.sum(tl.reshape(tl.where(live, lq, 0.0), (BLOCK_R, BLOCK_L)), axis=1)
        if WITH_KL:
            lp = tl.load(log_p_ptr + li[:, None] * lp_stride + cols[None, :],
                         mask=(li < L)[:, None] & (cols[None, :] < C), other=0.0).to(ACC)
            kl_l = _categorical_kl(a, lp, valid)[0]
            kl += tl.sum(tl.reshape(tl.where(live, kl_l, 0.0), (BLOCK_R, BLOCK_L)), axis=1)
    if WITH_LOG_Q:
        tl.store(log_q_ptr + rows, log_q.to(log_q_ptr.dtype.element_ty), mask=rows < KN)
    if WITH_KL:  # the rows of sample 0: r < N
        tl.store(kl_ptr + rows, kl.to(kl_ptr.dtype.element_ty), mask=rows < N)


@triton.jit(do_not_specialize=["N", "L", "NL", "C", "K", "lp_stride"])
def _sample_concrete_bwd_kernel(
    grad_z_ptr,  # (K, N, L, C), read when HAS_GRAD_Z
    grad_q_ptr,  # (K, N), read when HAS_GRAD_Q
    a_ptr,  # (N, L, C)
    lam_ptr,  # (N, L)
    seed_ptr,  # (): int64
    d_ptr,  # (N, L, C)
    grad_kl_ptr,  # (N,), read when HAS_GRAD_KL
    log_p_ptr,  # (L, C), rows lp_stride apart: read when HAS_GRAD_KL
    N, L, NL, C, K, lp_stride,  # NL = N * L latents, each of C categories, K samples of each
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_Q: tl.constexpr, HAS_GRAD_KL: tl.constexpr,  # the gradients given
    STOP_SCORE: tl.constexpr,  # log q's gradient without the score term (STL, DReG)
    ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    j, jmask = program_rows(BLOCK_J, NL)
    n = j // L
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK_C)
    cmask = jmask[:, None] & (cols[None, :] < C)
    idx = j[:, None] * C + cols[None, :]
    a = tl.load(a_ptr + idx, mask=cmask, other=float("-inf")).to(ACC)
    a = tl.where(jmask[:, None], a, tl.where(cols[None, :] == 0, 0.0, float("-inf")))  # dead rows: finite
    lam = tl.load(lam_ptr + j, mask=jmask, other=1.0).to(ACC)
    acc = tl.zeros([BLOCK_J, BLOCK_C], dtype=ACC)
    NLC = NL * C
    for k in range(0, K):
        x = words(seed, k * NLC + idx)
        z, lq, w, count, y, m, valid = _latents(x, a, lam, cols[None, :], C, ACC)
        if HAS_GRAD_Z:
            g = tl.load(grad_z_ptr + k * NLC + idx, mask=cmask, other=0.0).to(ACC)
            zg = tl.sum(z * g, axis=1)
            acc += z * (g - zg[:, None])
        if HAS_GRAD_Q:
            gq = tl.load(grad_q_ptr + k * N + n, mask=jmask, other=0.0).to(ACC)
            if STOP_SCORE:
                h = count[:, None] * z + (count * lam)[:, None] * w - (lam + 1.0)[:, None]
            else:
                h = count[:, None] * z - 1.0
            acc += gq[:, None] * h
    ok = a > float("-inf")
    d = tl.where(ok, acc / lam[:, None], 0.0)
    if HAS_GRAD_KL:  # d KL_l / d a_c = pi_c ((log pi_c - log p_c) - KL_l), after the noise terms' 1 / lam
        lp = tl.load(log_p_ptr + (j % L)[:, None] * lp_stride + cols[None, :], mask=cmask, other=0.0).to(ACC)
        kl, pi, diff, live = _categorical_kl(a, lp, ok & (cols[None, :] < C))
        gk = tl.load(grad_kl_ptr + n, mask=jmask, other=0.0).to(ACC)
        d += tl.where(live, gk[:, None] * pi * (diff - kl[:, None]), 0.0)
    tl.store(d_ptr + idx, d.to(d_ptr.dtype.element_ty), mask=cmask)


def _check_categories(C: int) -> int:
    """BLOCK_C, the next power of two of C (at least 2)."""
    if C > CONCRETE_MAX_C:
        raise ValueError(f"sample_concrete's Triton kernels take at most {CONCRETE_MAX_C} categories, got C = {C}")
    return next_power_of_2(max(C, 2))


def _concrete_tile(device_type: str) -> int:
    return CONCRETE_INTERPRETER_TILE if device_type == "cpu" else CONCRETE_TILE


def _concrete_warps(elements: int, device_type: str) -> int:
    return 4 if device_type == "cpu" or elements <= CONCRETE_TILE else 8


def concrete_forward_geometry(K: int, N: int, L: int, C: int, device_type: str = "cuda") -> tuple[int, dict]:
    """(programs, meta) of the forward at K samples of N rows of L latents of
    C categories on a device of this type ("cpu": the interpreter): meta's
    BLOCK_R, BLOCK_L, BLOCK_C and num_warps follow L and C alone. The tile
    takes as many of a row's latents as it holds (at least one), then as many
    rows; the programs are cdiv(K N, BLOCK_R)."""
    block_c = _check_categories(C)
    tile = _concrete_tile(device_type)
    block_l = min(next_power_of_2(max(L, 1)), max(1, tile // block_c))
    block_r = max(1, tile // (block_l * block_c))
    meta = dict(BLOCK_R=block_r, BLOCK_L=block_l, BLOCK_C=block_c,
                num_warps=_concrete_warps(block_r * block_l * block_c, device_type))
    return cdiv(K * N, block_r), meta


def concrete_backward_geometry(N: int, L: int, C: int, device_type: str = "cuda",
                               fp64: bool = False) -> tuple[int, dict]:
    """(programs, meta) of the backward: BLOCK_J = the tile's latents of C
    categories (at least one), each program looping over the samples. A GPU
    tile of CONCRETE_TILE elements is compiled with at most CONCRETE_BACKWARD_MAXNREG registers
    (CONCRETE_FP64_BACKWARD_MAXNREG for float64)."""
    block_c = _check_categories(C)
    block_j = max(1, _concrete_tile(device_type) // block_c)
    meta = dict(BLOCK_J=block_j, BLOCK_C=block_c, num_warps=_concrete_warps(block_j * block_c, device_type))
    if device_type != "cpu" and block_j * block_c <= CONCRETE_TILE:
        meta["maxnreg"] = CONCRETE_FP64_BACKWARD_MAXNREG if fp64 else CONCRETE_BACKWARD_MAXNREG
    return cdiv(N * L, block_j), meta


def concrete_forward_launch(K: int, N: int, L: int, C: int, dtype: torch.dtype, device_type: str, hard: bool,
                            with_log_q: bool, with_kl: bool) -> tuple[tuple, dict]:
    """(grid, meta) of one forward variant: concrete_forward_geometry's programs and
    blocks with the compile-time flags. sample_concrete_forward launches
    with these and op.py's plans keep them, so the two launch the same variant."""
    programs, meta = concrete_forward_geometry(K, N, L, C, device_type)
    return (programs,), dict(HARD=bool(hard), ACC=acc_dtype(dtype), WITH_LOG_Q=with_log_q, WITH_KL=with_kl, **meta)


def concrete_backward_launch(N: int, L: int, C: int, dtype: torch.dtype, device_type: str, has_grad_z: bool,
                             has_grad_q: bool, has_grad_kl: bool, stop_score: bool) -> tuple[tuple, dict]:
    """(grid, meta) of one backward variant (concrete_backward_geometry's with the
    compile-time flags), shared by sample_concrete_backward and op.py's plans."""
    programs, meta = concrete_backward_geometry(N, L, C, device_type, dtype == torch.float64)
    return (programs,), dict(HAS_GRAD_Z=has_grad_z, HAS_GRAD_Q=has_grad_q, HAS_GRAD_KL=has_grad_kl,
                             STOP_SCORE=bool(stop_score), ACC=acc_dtype(dtype), **meta)


def _rows_of(log_p):
    """log_p (L, C) with unit column stride, its rows at any stride: a (C,)
    prior expanded over L (row stride 0) is read in place, with no copy launched."""
    return log_p if log_p.stride(1) == 1 else log_p.contiguous()


def sample_concrete_forward(logits, temperature, seed, hard, offset0, sample_stride, row_stride, z, log_q, log_p,
                            kl) -> None:
    """z (K, N, L, C) <- softmax((logits - log t) / temperature) (one-hot of its
    argmax when hard), t the Exp(1) variate at offset0 + k * sample_stride +
    n * row_stride + l * C + c; log_q (K, N), when not None, <- the Concrete
    log-density summed over L from the same t; kl (N,), with the prior
    log-pmf log_p (L, C), <- the analytic categorical KL summed over L."""
    K, N, L, C = z.shape
    if K * N == 0:
        return
    if L * C == 0:
        if log_q is not None:
            log_q.zero_()
        if kl is not None:
            kl.zero_()
        return
    with_log_q, with_kl = log_q is not None, kl is not None
    grid, meta = concrete_forward_launch(K, N, L, C, logits.dtype, logits.device.type, hard, with_log_q, with_kl)
    log_p = _rows_of(log_p) if with_kl else logits
    _sample_concrete_fwd_kernel.run(
        logits, temperature, seed, z, log_q if with_log_q else z, log_p, kl if with_kl else z,
        offset0, sample_stride, row_stride, N, K * N, L, C, log_p.stride(0) if with_kl else 0,
        grid=grid, warmup=False, **meta,
    )


def sample_concrete_backward(grad_z, grad_log_q, logits, temperature, seed, stop_score, dlogits, grad_kl,
                             log_p) -> None:
    """dlogits (N, L, C) <- sum_k (z (grad_z - <z, grad_z>) + grad_log_q h) /
    temperature with t regenerated, plus grad_kl's analytic-KL term with the
    prior log-pmf log_p (L, C) (the oracle's sample_concrete_backward)."""
    N, L, C = logits.shape
    if N * L * C == 0:
        return
    K = gradient_samples(grad_z, grad_log_q)
    grid, meta = concrete_backward_launch(N, L, C, logits.dtype, logits.device.type, grad_z is not None,
                                          grad_log_q is not None, grad_kl is not None, stop_score)
    log_p = _rows_of(log_p) if grad_kl is not None else logits
    _sample_concrete_bwd_kernel.run(
        grad_z if grad_z is not None else logits, grad_log_q if grad_log_q is not None else logits, logits,
        temperature, seed, dlogits, grad_kl if grad_kl is not None else logits,
        log_p, N, L, N * L, C, K, log_p.stride(0) if grad_kl is not None else 0, grid=grid, warmup=False, **meta,
    )
