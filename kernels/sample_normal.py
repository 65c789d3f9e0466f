"""Triton kernels of sample_normal: z = mu + exp(logvar / 2) * eps for K samples
with the analytic KL(q || N(0, I)) per row, and the backward that regenerates
eps from (seed, offset) instead of storing it.

Layout: mu, logvar (N, L) contiguous; z, dz (K, N, L); kl, dkl (N,). The
offset of z[k, n, l] is k * N * L + n * L + l (int64).
"""
import triton
import triton.language as tl

from ._common import acc_dtype, blocks
from .philox import randn

MAX_BLOCK_L = 1024  # columns per inner step; longer rows loop over L

# -- kernels ------------------------------------------------------------------


@triton.jit
def _sample_normal_fwd_kernel(
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L)
    kl_ptr,  # (N,)
    N,
    L,
    NL,  # N * L: the offset stride of one sample
    K,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    seed = tl.load(seed_ptr)
    kl = tl.zeros([BLOCK_N], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        idx = rows[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        s = tl.exp(0.5 * lv)
        kl += tl.sum(tl.where(mask, s * s + mu * mu - 1.0 - lv, 0.0), axis=1)
        off = idx
        for _ in range(K):
            eps = randn(seed, off, ACC)
            tl.store(z_ptr + off, (mu + s * eps).to(z_ptr.dtype.element_ty), mask=mask)
            off += NL
    tl.store(kl_ptr + rows, (0.5 * kl).to(kl_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _sample_normal_bwd_kernel(
    dz_ptr,  # (K, N, L)
    dkl_ptr,  # (N,)
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    seed_ptr,  # (): int64
    dmu_ptr,  # (N, L)
    dlogvar_ptr,  # (N, L)
    N,
    L,
    NL,  # N * L: the offset stride of one sample
    K,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    seed = tl.load(seed_ptr)
    g_kl = tl.load(dkl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        idx = rows[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        s = tl.exp(0.5 * lv)
        acc_mu = tl.zeros([BLOCK_N, BLOCK_L], dtype=ACC)
        acc_lv = tl.zeros([BLOCK_N, BLOCK_L], dtype=ACC)
        off = idx
        for _ in range(K):
            g = tl.load(dz_ptr + off, mask=mask, other=0.0).to(ACC)
            acc_mu += g
            acc_lv += g * randn(seed, off, ACC)
            off += NL
        dmu = acc_mu + g_kl * mu
        dlv = 0.5 * (acc_lv * s + g_kl * (s * s - 1.0))
        tl.store(dmu_ptr + idx, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
        tl.store(dlogvar_ptr + idx, dlv.to(dlogvar_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def sample_normal_forward(mu, logvar, seed, z, kl) -> None:
    """z (K, N, L), kl (N,) <- sample_normal of mu, logvar (N, L); seed: () int64 tensor."""
    K, N, L = z.shape
    if N * L == 0:
        kl.zero_()
        return
    BLOCK_N, BLOCK_L = blocks(N, L, MAX_BLOCK_L)
    grid = (triton.cdiv(N, BLOCK_N),)
    _sample_normal_fwd_kernel[grid](
        mu, logvar, seed, z, kl, N, L, N * L, K, ACC=acc_dtype(mu.dtype), BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L
    )


def sample_normal_backward(grad_z, grad_kl, mu, logvar, seed, dmu, dlogvar) -> None:
    """dmu, dlogvar (N, L) <- gradients of sample_normal given grad_z (K, N, L), grad_kl (N,)."""
    K, N, L = grad_z.shape
    if N * L == 0:
        return
    BLOCK_N, BLOCK_L = blocks(N, L, MAX_BLOCK_L)
    grid = (triton.cdiv(N, BLOCK_N),)
    _sample_normal_bwd_kernel[grid](
        grad_z, grad_kl, mu, logvar, seed, dmu, dlogvar, N, L, N * L, K,
        ACC=acc_dtype(mu.dtype), BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L,
    )
