"""Triton kernels of latent_log_ratio: r = log N(z; 0, I) - log N(z; mu, e^logvar)
summed over L, i.e. 0.5 * sum(eps^2 - z^2 + logvar) with eps = (z - mu) e^(-logvar/2),
and its gradient in full or in the "stop the score" mode (dz only).

Layout: z, dz (K, N, L) contiguous; mu, logvar, dmu, dlogvar (N, L), shared by
the K samples (read per sample, never broadcast in memory); r, g (K, N).
"""
import triton
import triton.language as tl

from ._common import acc_dtype, blocks
from .sample_normal import MAX_BLOCK_L

# -- kernels ------------------------------------------------------------------


@triton.jit
def _latent_log_ratio_fwd_kernel(
    z_ptr,  # (K, N, L)
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    r_ptr,  # (K, N)
    N,
    L,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # one flat grid dimension (sample k, row block): a GPU's second one allows
    # only 65535 programs, fewer than the samples of a large-K evaluation
    pid = tl.program_id(0).to(tl.int64)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    k = pid // n_row_blocks
    rows = (pid % n_row_blocks) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        idx = rows[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        z = tl.load(z_ptr + k * N * L + idx, mask=mask, other=0.0).to(ACC)
        eps = (z - mu) * tl.exp(-0.5 * lv)
        acc += tl.sum(tl.where(mask, eps * eps - z * z + lv, 0.0), axis=1)
    tl.store(r_ptr + k * N + rows, (0.5 * acc).to(r_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _latent_log_ratio_bwd_kernel(
    g_ptr,  # (K, N)
    z_ptr,  # (K, N, L)
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    dz_ptr,  # (K, N, L)
    dmu_ptr,  # (N, L), unused if STOP_SCORE
    dlogvar_ptr,  # (N, L), unused if STOP_SCORE
    N,
    L,
    NL,  # N * L: the offset stride of one sample
    K,
    STOP_SCORE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        idx = rows[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        inv_s = tl.exp(-0.5 * lv)
        acc_mu = tl.zeros([BLOCK_N, BLOCK_L], dtype=ACC)
        acc_lv = tl.zeros([BLOCK_N, BLOCK_L], dtype=ACC)
        off = idx  # int64 offsets, advanced per sample: k * N * L overflows int32
        g_off = rows
        for _ in range(K):
            g = tl.load(g_ptr + g_off, mask=row_ok, other=0.0).to(ACC)[:, None]
            z = tl.load(z_ptr + off, mask=mask, other=0.0).to(ACC)
            eps = (z - mu) * inv_s
            tl.store(dz_ptr + off, (g * (eps * inv_s - z)).to(dz_ptr.dtype.element_ty), mask=mask)
            if not STOP_SCORE:
                acc_mu += g * eps
                acc_lv += g * (1.0 - eps * eps)
            off += NL
            g_off += N
        if not STOP_SCORE:
            tl.store(dmu_ptr + idx, (-acc_mu * inv_s).to(dmu_ptr.dtype.element_ty), mask=mask)
            tl.store(dlogvar_ptr + idx, (0.5 * acc_lv).to(dlogvar_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def latent_log_ratio_forward(z, mu, logvar, out) -> None:
    """out (K, N) <- latent_log_ratio of z (K, N, L) and mu, logvar (N, L)."""
    K, N, L = z.shape
    if K * N == 0:
        return
    BLOCK_N, BLOCK_L = blocks(N, L, MAX_BLOCK_L)
    _latent_log_ratio_fwd_kernel[(triton.cdiv(N, BLOCK_N) * K,)](
        z, mu, logvar, out, N, L, ACC=acc_dtype(mu.dtype), BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L,
    )


def latent_log_ratio_backward(grad_out, z, mu, logvar, dz, dmu, dlogvar) -> None:
    """dz (K, N, L) and, unless dmu and dlogvar are None (stop the score),
    dmu, dlogvar (N, L) <- gradients of latent_log_ratio given grad_out (K, N)."""
    K, N, L = z.shape
    if N * L == 0:
        return
    stop_score = dmu is None
    if K == 0:
        if not stop_score:
            dmu.zero_()
            dlogvar.zero_()
        return
    BLOCK_N, BLOCK_L = blocks(N, L, MAX_BLOCK_L)
    _latent_log_ratio_bwd_kernel[(triton.cdiv(N, BLOCK_N),)](
        grad_out, z, mu, logvar, dz, dz if stop_score else dmu, dz if stop_score else dlogvar, N, L, N * L, K,
        STOP_SCORE=stop_score, ACC=acc_dtype(mu.dtype), BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L,
    )
