"""Triton kernels of sample_concrete: relaxed one-hot (Concrete /
Gumbel-softmax) samples of logits (N, L, C) at a temperature per latent, from
C consecutive Philox uniforms per latent (the samplers' words, kernels/sampler.py),
and log q(z) summed over L from the same Exp(1) noise t = -log u; the backward
regenerates t from (seed, offset) instead of storing it.
The oracle's concrete_terms (__init__.py) gives the closed forms; -inf logits mask their
category (z_c = 0, left out of the density).

One latent's C categories are one row of a (rows, BLOCK_C) tile, BLOCK_C the
next power of two of C (C up to MAX_C). The forward's programs take BLOCK_R
sample rows (k, n) and loop over the L latents; the backward's take BLOCK_J
latents and loop over the K samples.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import acc_dtype, program_rows
from fastvae.kernels.sampler import exp1, gradient_samples, words

MAX_C = 1 << 14
FORWARD_TILE = 2048
INTERPRETER_TILE = 1 << 14


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


@triton.jit(do_not_specialize=["N", "KN", "L", "C", "offset0", "sample_stride", "row_stride"])
def _sample_concrete_fwd_kernel(
    a_ptr,  # (N, L, C)
    lam_ptr,  # (N, L)
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L, C)
    log_q_ptr,  # (K, N): written when WITH_LOG_Q
    offset0,
    sample_stride,
    row_stride,
    N,
    KN,
    L,
    C,
    HARD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WITH_LOG_Q: tl.constexpr,
):
    r, rmask = program_rows(BLOCK_R, KN)
    n = r % N
    k = r // N
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK_C)
    cmask = rmask[:, None] & (cols[None, :] < C)
    log_q = tl.zeros([BLOCK_R], dtype=ACC)
    for li in range(0, L):
        j = n * L + li
        a = tl.load(a_ptr + j[:, None] * C + cols[None, :], mask=cmask, other=float("-inf")).to(ACC)
        a = tl.where(rmask[:, None], a, tl.where(cols[None, :] == 0, 0.0, float("-inf")))  # dead rows: finite
        lam = tl.load(lam_ptr + j, mask=rmask, other=1.0).to(ACC)
        offs = (offset0 + k * sample_stride + n * row_stride + li * C)[:, None] + cols[None, :]
        x = words(seed, offs)
        z, lq, w, count, y, m, valid = _latents(x, a, lam, cols[None, :], C, ACC)
        if HARD:
            first = tl.min(tl.where(valid & (y == m[:, None]), cols[None, :], BLOCK_C), axis=1)
            z = tl.where(cols[None, :] == first[:, None], 1.0, 0.0)
        tl.store(z_ptr + (r * L + li)[:, None] * C + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=cmask)
        log_q += lq
    if WITH_LOG_Q:
        tl.store(log_q_ptr + r, log_q.to(log_q_ptr.dtype.element_ty), mask=rmask)


@triton.jit(do_not_specialize=["N", "L", "NL", "C", "K"])
def _sample_concrete_bwd_kernel(
    grad_z_ptr,  # (K, N, L, C), read when HAS_GRAD_Z
    grad_q_ptr,  # (K, N), read when HAS_GRAD_Q
    a_ptr,  # (N, L, C)
    lam_ptr,  # (N, L)
    seed_ptr,  # (): int64
    d_ptr,  # (N, L, C)
    N,
    L,
    NL,
    C,
    K,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_Q: tl.constexpr,
    STOP_SCORE: tl.constexpr,
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
    tl.store(d_ptr + idx, tl.where(ok, acc / lam[:, None], 0.0).to(d_ptr.dtype.element_ty), mask=cmask)


def _geometry(C: int, device: torch.device, fp64: bool) -> tuple[int, int]:
    if C > MAX_C:
        raise ValueError(f"sample_concrete's Triton kernels take at most {MAX_C} categories, got C = {C}")
    block_c = triton.next_power_of_2(max(C, 2))
    tile = INTERPRETER_TILE if device.type == "cpu" else (FORWARD_TILE // 2 if fp64 else FORWARD_TILE)
    return max(1, tile // block_c), block_c


def sample_concrete_forward(logits, temperature, seed, hard, offset0, sample_stride, row_stride, z, log_q) -> None:
    """z (K, N, L, C) <- softmax((logits - log t) / temperature) (one-hot of its
    argmax when hard), t the Exp(1) variate at offset0 + k * sample_stride +
    n * row_stride + l * C + c; log_q (K, N), when not None, <- the Concrete
    log-density summed over L from the same t."""
    K, N, L, C = z.shape
    if K * N == 0:
        return
    if L * C == 0:
        if log_q is not None:
            log_q.zero_()
        return
    BLOCK_R, BLOCK_C = _geometry(C, logits.device, logits.dtype == torch.float64)
    with_log_q = log_q is not None
    _sample_concrete_fwd_kernel[(triton.cdiv(K * N, BLOCK_R),)](
        logits, temperature, seed, z, log_q if with_log_q else z, offset0, sample_stride, row_stride, N, K * N, L, C,
        HARD=bool(hard), ACC=acc_dtype(logits.dtype), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, WITH_LOG_Q=with_log_q,
        num_warps=4 if logits.device.type == "cpu" else 8,  # 4 spills on sm_90 (tests/test_aot.py)
    )


def sample_concrete_backward(grad_z, grad_log_q, logits, temperature, seed, stop_score, dlogits) -> None:
    """dlogits (N, L, C) <- sum_k (z (grad_z - <z, grad_z>) + grad_log_q h) /
    temperature with t regenerated (the oracle's sample_concrete_backward)."""
    N, L, C = logits.shape
    if N * L * C == 0:
        return
    K = gradient_samples(grad_z, grad_log_q)
    BLOCK_J, BLOCK_C = _geometry(C, logits.device, logits.dtype == torch.float64)
    _sample_concrete_bwd_kernel[(triton.cdiv(N * L, BLOCK_J),)](
        grad_z if grad_z is not None else logits, grad_log_q if grad_log_q is not None else logits, logits,
        temperature, seed, dlogits, N, L, N * L, C, K, HAS_GRAD_Z=grad_z is not None,
        HAS_GRAD_Q=grad_log_q is not None, STOP_SCORE=bool(stop_score), ACC=acc_dtype(logits.dtype),
        BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C, num_warps=4,
    )
