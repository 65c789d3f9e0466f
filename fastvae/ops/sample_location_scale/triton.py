"""Triton kernels of sample_location_scale: z = loc + exp(log_scale) * e
for K samples, e = F^-1(u) of a standardized family, and log q(z) =
sum_l(log f(e) - log_scale) per sample row from the same e; the backward
regenerates e from (seed, offset) instead of storing it.

The family (uniform, Laplace, logistic, Gumbel, Cauchy: fastvae/_families.py's
LOCATION_SCALE_FAMILIES order) is a constexpr FAMILY: the standardized
inverse CDF is a compile-time variant of one kernel pair. Element i's uniform
is the folded word of lane i % 4 of Philox counter i // 4, mapped into the open
(0, 1) from the integer (both u and v = 1 - u, so the upper tail keeps its
bits): docs/architecture.md, "The RNG contract".

Layout and geometry are sample_normal's: loc, log_scale (N, L); z, grad_z
(K, N, L); log_q, grad_log_q (K, N); z[k, n, l] uses the uniform at
offset0 + k * sample_stride + n * row_stride + l. The forward tiles the K * N
sample rows (columns in fours: whole Philox counters per thread); the backward
owns BLOCK flat elements of loc, loops over the samples in registers and, where
the blocks alone do not fill a wave, splits them (_common.split_samples,
arrive_last), as sample_normal's does.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import (
    INTERPRETER_BLOCK_ROWS,
    MAX_BLOCK_COLS,
    acc_dtype,
    accumulation_dtype,
    arrive_last,
    block_cols,
    split_samples,
    tile_and_split,
    tile_counters,
)
from fastvae.kernels.philox import _cos_sin_turns, aligned

FORWARD_TILE = 2048
BACKWARD_TILE = 2048
INTERPRETER_BACKWARD_TILE = 1 << 16

# -- math helpers -------------------------------------------------------------


@triton.jit
def _folded(bits):
    """The word as int32, negatives folded by ~x: an integer in [0, 2**31)."""
    x = bits.to(tl.int32, bitcast=True)
    return tl.where(x < 0, -x - 1, x)


@triton.jit
def _open_uniforms(x, ACC: tl.constexpr):
    """(u, v = 1 - u) of folded words, each from the integer: (x + 1/2) / 2**31
    and (2**31 - 1/2 - x) / 2**31. float32 in float32 arithmetic, at most
    1 - 2**-24, bit for bit the reference's and the C++ kernel's; float64 exact."""
    if ACC == tl.float64:
        u = (x.to(tl.float64) + 0.5) * 4.656612873077393e-10
        v = (2147483647.5 - x.to(tl.float64)) * 4.656612873077393e-10
    else:
        u = tl.minimum((x.to(tl.float32) + 0.5) * 4.656612873077393e-10, 0.9999999403953552)
        v = tl.minimum(((2147483647 - x).to(tl.float32) + 0.5) * 4.656612873077393e-10, 0.9999999403953552)
    return u, v


@triton.jit
def _log1m(v):
    """log(1 - v) for v in (0, 1/2] to v's relative precision: log w corrected
    by the rounding of w = 1 - v (Goldberg), -v where w rounds to 1 (the
    interpreter has no log1p)."""
    w = 1.0 - v
    one = w == 1.0
    return tl.where(one, -v, tl.log(w) * (-v / tl.where(one, -1.0, w - 1.0)))


@triton.jit
def _standardized(x, FAMILY: tl.constexpr, ACC: tl.constexpr):
    """(e, log f(e), psi(e) = d log f / de) of the standardized family at
    folded words x (the oracle's standardized gives the formulas)."""
    u, v = _open_uniforms(x, ACC)
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
        t = tl.where(lower, -tl.log(u), -_log1m(v))
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


@triton.jit
def _words4(seed, counters):
    """The folded words of each Philox counter (..., 1) -> (..., 4): lane j at [..., j]."""
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    lane = tl.arange(0, 4)
    w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return _folded(w)


@triton.jit
def _words(seed, offsets):
    """The folded word at each int64 element offset (one Philox call each)."""
    w0, w1, w2, w3 = tl.randint4x(seed, offsets >> 2)
    lane = offsets & 3
    return _folded(tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3))))


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "KN", "offset0", "sample_stride", "row_stride"])
def _sample_location_scale_fwd_kernel(
    loc_ptr,  # (N, L)
    log_scale_ptr,  # (N, L)
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L) = (KN, L) sample rows
    log_q_ptr,  # (KN,): log q(z) per sample row, written when WITH_LOG_Q
    offset0,
    sample_stride,
    row_stride,
    N,
    KN,  # K * N
    L,
    FAMILY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    WITH_LOG_Q: tl.constexpr,
    ALIGNED: tl.constexpr,  # every row's uniforms start a Philox counter
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # sample rows k * N + n
    n = r % N
    seed = tl.load(seed_ptr)
    log_q = tl.zeros([BLOCK_R], dtype=ACC)
    g = tl.arange(0, BLOCK_L // 4)[None, :, None]
    j = tl.arange(0, 4)[None, None, :]
    rr = r[:, None, None]
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + 4 * g + j
        mask = (rr < KN) & (cols < L)
        idx = n[:, None, None] * L + cols
        loc = tl.load(loc_ptr + idx, mask=mask, other=0.0).to(ACC)
        ls = tl.load(log_scale_ptr + idx, mask=mask, other=0.0).to(ACC)
        first = (offset0 + (r // N) * sample_stride + n * row_stride + l0)[:, None, None]
        if ALIGNED:
            x = _words4(seed, (first >> 2) + g)
        else:
            x = _words(seed, first + 4 * g + j)
        e, log_f, psi = _standardized(x, FAMILY, ACC)
        tl.store(z_ptr + rr * L + cols, (loc + tl.exp(ls) * e).to(z_ptr.dtype.element_ty), mask=mask)
        if WITH_LOG_Q:
            log_q += tl.sum(tl.sum(tl.where(mask, log_f - ls, 0.0), axis=2), axis=1)
    if WITH_LOG_Q:
        tl.store(log_q_ptr + r, log_q.to(log_q_ptr.dtype.element_ty), mask=r < KN)


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
    log_scale_ptr,  # (N, L)
    seed_ptr,  # (): int64
    dloc_ptr,  # (N, L)
    dls_ptr,  # (N, L)
    part_ptr,  # (4, SPLITS, N * L) ACC: each split's sums (SPLITS > 1)
    counter_ptr,  # (blocks,) int32 arrival counters, 0 between launches (SPLITS > 1)
    N,
    L,
    NL,
    K,
    K_PER,
    SPLITS,
    FAMILY: tl.constexpr,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_Q: tl.constexpr,
    STOP_SCORE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # L divisible by 4: each sample's block starts a Philox counter
):
    tile, split, k0, k1 = tile_and_split(tl.cdiv(NL, BLOCK), K, K_PER)
    start = tile * BLOCK
    g4 = tl.arange(0, BLOCK // 4)[:, None]
    i = start + 4 * g4 + tl.arange(0, 4)[None, :]
    mask = i < NL
    n = i // L
    seed = tl.load(seed_ptr)
    acc_z = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dz
    acc_ze = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dz e
    acc_psi = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dq psi (STOP_SCORE)
    acc_q = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dq psi e (STOP_SCORE), else -sum_k dq
    for k in range(k0, k1):
        base = k * NL
        if ALIGNED:
            x = _words4(seed, ((base + start) >> 2) + g4)
        else:
            x = _words(seed, base + i)
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
        part = split * NL + i
        tl.store(part_ptr + part, acc_z, mask=mask)
        tl.store(part_ptr + SPLITS * NL + part, acc_ze, mask=mask)
        tl.store(part_ptr + 2 * SPLITS * NL + part, acc_psi, mask=mask)
        tl.store(part_ptr + 3 * SPLITS * NL + part, acc_q, mask=mask)
        if arrive_last(counter_ptr + tile, SPLITS):
            s_z = tl.zeros([BLOCK // 4, 4], dtype=ACC)
            s_ze = tl.zeros([BLOCK // 4, 4], dtype=ACC)
            s_psi = tl.zeros([BLOCK // 4, 4], dtype=ACC)
            s_q = tl.zeros([BLOCK // 4, 4], dtype=ACC)
            for sp in range(0, SPLITS):
                at = sp * NL + i
                s_z += tl.load(part_ptr + at, mask=mask, other=0.0, cache_modifier=".cg")
                s_ze += tl.load(part_ptr + SPLITS * NL + at, mask=mask, other=0.0, cache_modifier=".cg")
                s_psi += tl.load(part_ptr + 2 * SPLITS * NL + at, mask=mask, other=0.0, cache_modifier=".cg")
                s_q += tl.load(part_ptr + 3 * SPLITS * NL + at, mask=mask, other=0.0, cache_modifier=".cg")
            _finish(s_z, s_ze, s_psi, s_q, i, mask, log_scale_ptr, dloc_ptr, dls_ptr, ACC)


# -- launchers ----------------------------------------------------------------


def forward_geometry(L: int, device: torch.device, fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_L, num_warps) from the row length only, as sample_normal's."""
    cols = max(4, block_cols(L, MAX_BLOCK_COLS))
    if device.type == "cpu":
        return INTERPRETER_BLOCK_ROWS, cols, 4
    tile = FORWARD_TILE // 4 if fp64 else FORWARD_TILE
    rows = max(1, tile // cols)
    return rows, cols, 8 if rows * cols >= tile else 4


def sample_location_scale_forward(loc, log_scale, seed, family, offset0, sample_stride, row_stride, z,
                                  log_q) -> None:
    """z (K, N, L) <- loc + exp(log_scale) * e of loc, log_scale (N, L), e the
    family's standardized variate at offset0 + k * sample_stride + n * row_stride + l;
    log_q (K, N), when not None, <- sum_l(log f(e) - log_scale)."""
    K, N, L = z.shape
    if K * N == 0:
        return
    if L == 0:
        if log_q is not None:
            log_q.zero_()
        return
    BLOCK_R, BLOCK_L, warps = forward_geometry(L, loc.device, loc.dtype == torch.float64)
    with_log_q = log_q is not None
    _sample_location_scale_fwd_kernel[(triton.cdiv(K * N, BLOCK_R),)](
        loc, log_scale, seed, z, log_q if with_log_q else z, offset0, sample_stride, row_stride, N, K * N, L,
        FAMILY=int(family), ACC=acc_dtype(loc.dtype), BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, WITH_LOG_Q=with_log_q,
        ALIGNED=aligned(offset0, sample_stride, row_stride), num_warps=warps,
    )


def sample_location_scale_backward(grad_z, grad_log_q, loc, log_scale, seed, family, stop_score, dloc,
                                   dlog_scale) -> None:
    """dloc, dlog_scale (N, L) <- the gradients of sample_location_scale given
    grad_z (K, N, L) and grad_log_q (K, N), each None when its output has none:
    dloc = sum_k grad_z_k (+ (sum_k grad_log_q_k psi_k) / s with stop_score),
    dlog_scale = s sum_k grad_z_k e_k + (sum_k grad_log_q_k psi_k e_k with
    stop_score, else -sum_k grad_log_q_k); e regenerated, s = exp(log_scale)."""
    N, L = loc.shape
    if N * L == 0:
        return
    samples = grad_z if grad_z is not None else grad_log_q
    K = 0 if samples is None else samples.shape[0]
    fp64 = loc.dtype == torch.float64
    BLOCK = INTERPRETER_BACKWARD_TILE if loc.device.type == "cpu" else (BACKWARD_TILE // 4 if fp64 else BACKWARD_TILE)
    NL = N * L
    blocks = triton.cdiv(NL, BLOCK)
    splits, per_split = split_samples(blocks, K, loc.device)
    part = torch.empty((4, splits, NL) if splits > 1 else (1,), dtype=accumulation_dtype(loc.dtype),
                       device=loc.device)
    _sample_location_scale_bwd_kernel[(blocks * splits,)](
        grad_z if grad_z is not None else loc, grad_log_q if grad_log_q is not None else loc, log_scale, seed,
        dloc, dlog_scale, part, tile_counters(loc.device, blocks, splits), N, L, NL, K, per_split, splits,
        FAMILY=int(family), HAS_GRAD_Z=grad_z is not None, HAS_GRAD_Q=grad_log_q is not None,
        STOP_SCORE=bool(stop_score), ACC=acc_dtype(loc.dtype), BLOCK=BLOCK, ALIGNED=aligned(L),
        num_warps=4 if loc.device.type == "cpu" else 8,
    )
