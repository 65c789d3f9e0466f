"""Triton kernels of sample_normal: z = mu + exp(logvar / 2) * eps for K samples
with the analytic KL(q || N(0, I)) per row, and the backward that regenerates
eps from (seed, offset) instead of storing it.

Layout: mu, logvar (N, L) contiguous; z, grad_z (K, N, L); kl, grad_kl (N,).
The offset of z[k, n, l] is k * N * L + n * L + l (int64).

Geometry (docs/triton.md): the forward tiles the K * N sample rows of z, so a
large-K evaluation of one example is as parallel as a training batch. The
backward sums over K: each program owns BLOCK_ROWS rows of mu and a range of
samples, writes partial sums, and the launcher reduces them in a fixed order.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, accumulation_dtype, block_cols, block_rows, num_warps, sample_splits
from .philox import aligned, randn, randn4

# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "KN", "offset0", "sample_stride", "row_stride"])
def _sample_normal_fwd_kernel(
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L) = (KN, L) sample rows
    kl_ptr,  # (N,)
    ratio_ptr,  # (KN,): log N(z; 0, I) - log q(z) per sample row, written when WITH_RATIO
    offset0,  # z[k, n, l] uses the noise at offset0 + k * sample_stride + n * row_stride + l
    sample_stride,
    row_stride,
    N,
    KN,  # K * N
    L,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    WITH_RATIO: tl.constexpr,
    ALIGNED: tl.constexpr,  # every row's noise starts a Philox counter: four normals per call
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # sample rows k * N + n
    n = r % N
    seed = tl.load(seed_ptr)
    kl = tl.zeros([BLOCK_R], dtype=ACC)
    ratio = tl.zeros([BLOCK_R], dtype=ACC)
    # a block of columns as (BLOCK_L // 4, 4): column l0 + 4g + j, so that with
    # ALIGNED each thread holds whole Philox counters (philox.randn4)
    g = tl.arange(0, BLOCK_L // 4)[None, :, None]
    j = tl.arange(0, 4)[None, None, :]
    rr = r[:, None, None]
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + 4 * g + j
        mask = (rr < KN) & (cols < L)
        idx = n[:, None, None] * L + cols
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        s = tl.exp(0.5 * lv)
        kl += tl.sum(tl.sum(tl.where(mask, s * s + mu * mu - 1.0 - lv, 0.0), axis=2), axis=1)
        first = (offset0 + (r // N) * sample_stride + n * row_stride + l0)[:, None, None]
        if ALIGNED:
            eps = randn4(seed, (first >> 2) + g, ACC)
        else:
            eps = randn(seed, first + 4 * g + j, ACC)
        z = mu + s * eps
        tl.store(z_ptr + rr * L + cols, z.to(z_ptr.dtype.element_ty), mask=mask)
        if WITH_RATIO:  # from the eps just drawn, never divided back out of z
            ratio += tl.sum(tl.sum(tl.where(mask, eps * eps + lv - z * z, 0.0), axis=2), axis=1)
    # the first sample's rows carry the KL of their row
    tl.store(kl_ptr + r, (0.5 * kl).to(kl_ptr.dtype.element_ty), mask=r < N)
    if WITH_RATIO:
        tl.store(ratio_ptr + r, (0.5 * ratio).to(ratio_ptr.dtype.element_ty), mask=r < KN)


@triton.jit(do_not_specialize=["N", "K", "K_PER"])
def _sample_normal_bwd_kernel(
    grad_z_ptr,  # (K, N, L)
    logvar_ptr,  # (N, L)
    seed_ptr,  # (): int64
    part_mu_ptr,  # (splits, N, L): sum over the split's samples of grad_z
    part_lv_ptr,  # (splits, N, L): sum over the split's samples of grad_z * eps * s / 2
    N,
    L,
    K,
    K_PER,  # samples per split
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ALIGNED: tl.constexpr,  # L divisible by 4: every row's noise starts a Philox counter
):
    pid = tl.program_id(0).to(tl.int64)
    row_blocks = tl.cdiv(N, BLOCK_R)
    split = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    k0 = split * K_PER
    k1 = tl.minimum(k0 + K_PER, K)
    seed = tl.load(seed_ptr)
    g4 = tl.arange(0, BLOCK_L // 4)[None, :, None]  # columns l0 + 4 g4 + j, as in the forward
    j = tl.arange(0, 4)[None, None, :]
    rr = rows[:, None, None]
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + 4 * g4 + j
        mask = (rr < N) & (cols < L)
        idx = rr * L + cols
        s = tl.exp(0.5 * tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC))
        acc_mu = tl.zeros([BLOCK_R, BLOCK_L // 4, 4], dtype=ACC)
        acc_lv = tl.zeros([BLOCK_R, BLOCK_L // 4, 4], dtype=ACC)
        for k in range(k0, k1):
            off = k * N * L + idx
            g = tl.load(grad_z_ptr + off, mask=mask, other=0.0).to(ACC)
            acc_mu += g
            if ALIGNED:
                eps = randn4(seed, ((k * N * L + rr * L + l0) >> 2) + g4, ACC)
            else:
                eps = randn(seed, off, ACC)
            acc_lv += g * eps
        part = split * N * L + idx
        tl.store(part_mu_ptr + part, acc_mu, mask=mask)
        tl.store(part_lv_ptr + part, 0.5 * acc_lv * s, mask=mask)


# -- launchers ----------------------------------------------------------------


def sample_normal_forward(mu, logvar, seed, offset0, sample_stride, row_stride, z, kl, log_ratio) -> None:
    """z (K, N, L), kl (N,) <- sample_normal of mu, logvar (N, L); seed: () int64 tensor;
    z[k, n, l] uses the noise at offset0 + k * sample_stride + n * row_stride + l;
    log_ratio (K, N), when not None, <- 0.5 * sum_l(eps^2 + logvar - z^2)."""
    K, N, L = z.shape
    rows = block_rows(mu.device)  # rows per program
    if N * L == 0:
        kl.zero_()
        if log_ratio is not None:  # an empty latent: log p(z) - log q(z) = 0
            log_ratio.zero_()
        return
    if K == 0:  # the KL still has to be written
        z = torch.empty((1, N, L), dtype=z.dtype, device=z.device)
    BLOCK_L = max(4, block_cols(L))  # whole Philox counters: columns in fours
    KN = z.shape[0] * N
    with_ratio = log_ratio is not None and log_ratio.numel() > 0
    _sample_normal_fwd_kernel[(triton.cdiv(KN, rows),)](
        mu, logvar, seed, z, kl, log_ratio if with_ratio else kl, offset0, sample_stride, row_stride, N, KN, L,
        ACC=acc_dtype(mu.dtype), BLOCK_R=rows, BLOCK_L=BLOCK_L, WITH_RATIO=with_ratio,
        ALIGNED=aligned(offset0, sample_stride, row_stride),
        num_warps=num_warps(BLOCK_L, mu.dtype == torch.float64),
    )


def sample_normal_backward(grad_z, grad_kl, mu, logvar, seed, dmu, dlogvar) -> None:
    """dmu, dlogvar (N, L) <- gradients of sample_normal given grad_z (K, N, L), grad_kl (N,):
    dmu = sum_k grad_z + grad_kl mu, dlogvar = sum_k grad_z eps s / 2 + grad_kl (s^2 - 1) / 2."""
    K, N, L = grad_z.shape
    rows = block_rows(mu.device)  # rows per program
    if N * L == 0:
        return
    acc = accumulation_dtype(mu.dtype)
    BLOCK_L = max(4, block_cols(L))  # whole Philox counters: columns in fours
    row_blocks = triton.cdiv(N, rows)
    splits, per_split = sample_splits(K, row_blocks, mu.device)
    part_mu = torch.zeros((splits, N, L), dtype=acc, device=mu.device)
    part_lv = torch.zeros_like(part_mu)
    if K > 0:
        _sample_normal_bwd_kernel[(row_blocks * splits,)](
            grad_z, logvar, seed, part_mu, part_lv, N, L, K, per_split,
            ACC=acc_dtype(mu.dtype), BLOCK_R=rows, BLOCK_L=BLOCK_L, ALIGNED=aligned(L),
            num_warps=num_warps(BLOCK_L, mu.dtype == torch.float64, per_thread=4),
        )
    g_kl = grad_kl.to(acc)[:, None]
    var = torch.exp(logvar.to(acc))
    dmu.copy_(part_mu.sum(0) + g_kl * mu.to(acc))
    dlogvar.copy_(part_lv.sum(0) + 0.5 * g_kl * (var - 1.0))
