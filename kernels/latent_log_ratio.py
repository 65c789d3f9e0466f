"""Triton kernels of latent_log_ratio: r = log N(z; 0, I) - log N(z; mu, e^logvar)
summed over L, i.e. 0.5 * sum(eps^2 - z^2 + logvar) with eps = (z - mu) e^(-logvar/2),
and its gradient in full or in the "stop the score" mode (dz only).

Layout: z, dz (K, N, L) contiguous; mu, logvar, dmu, dlogvar (N, L), shared by
the K samples (read per sample, never broadcast in memory); out, grad_out (K, N).
The forward tiles the K * N sample rows; the backward gives each program rows
of mu and a range of samples, with partial sums for dmu and dlogvar reduced by
the launcher in a fixed order (docs/triton.md).
"""
import torch
import triton
import triton.language as tl

from ._common import (
    MAX_BLOCK_COLS_BACKWARD,
    acc_dtype,
    accumulation_dtype,
    block_cols,
    block_rows,
    num_warps,
    sample_splits,
)

# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "KN"])
def _latent_log_ratio_fwd_kernel(
    z_ptr,  # (K, N, L) = (KN, L) sample rows
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    out_ptr,  # (K, N) = (KN,)
    N,
    KN,
    L,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_ok = r < KN
    n = r % N
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = r_ok[:, None] & (cols < L)[None, :]
        idx = n[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        z = tl.load(z_ptr + r[:, None] * L + cols[None, :], mask=mask, other=0.0).to(ACC)
        eps = (z - mu) * tl.exp(-0.5 * lv)
        acc += tl.sum(tl.where(mask, eps * eps - z * z + lv, 0.0), axis=1)
    tl.store(out_ptr + r, (0.5 * acc).to(out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=["N", "K", "K_PER"])
def _latent_log_ratio_bwd_kernel(
    grad_out_ptr,  # (K, N)
    z_ptr,  # (K, N, L)
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    dz_ptr,  # (K, N, L)
    part_mu_ptr,  # (splits, N, L): -sum_k g eps / s over the split, unless STOP_SCORE
    part_lv_ptr,  # (splits, N, L): sum_k g (1 - eps^2) / 2 over the split, unless STOP_SCORE
    N,
    L,
    K,
    K_PER,  # samples per split
    STOP_SCORE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_blocks = tl.cdiv(N, BLOCK_R)
    split = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < N
    k0 = split * K_PER
    k1 = tl.minimum(k0 + K_PER, K)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        idx = rows[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        inv_s = tl.exp(-0.5 * tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC))
        acc_mu = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
        acc_lv = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
        for k in range(k0, k1):
            off = k * N * L + idx  # int64: k * N * L overflows int32
            g = tl.load(grad_out_ptr + k * N + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
            z = tl.load(z_ptr + off, mask=mask, other=0.0).to(ACC)
            eps = (z - mu) * inv_s
            tl.store(dz_ptr + off, (g * (eps * inv_s - z)).to(dz_ptr.dtype.element_ty), mask=mask)
            if not STOP_SCORE:
                acc_mu += g * eps
                acc_lv += g * (1.0 - eps * eps)
        if not STOP_SCORE:
            part = split * N * L + idx
            tl.store(part_mu_ptr + part, -acc_mu * inv_s, mask=mask)
            tl.store(part_lv_ptr + part, 0.5 * acc_lv, mask=mask)


# -- launchers ----------------------------------------------------------------


def latent_log_ratio_forward(z, mu, logvar, out) -> None:
    """out (K, N) <- latent_log_ratio of z (K, N, L) and mu, logvar (N, L)."""
    K, N, L = z.shape
    rows = block_rows(z.device)  # rows per program
    if K * N == 0:
        return
    BLOCK_L = block_cols(L)
    _latent_log_ratio_fwd_kernel[(triton.cdiv(K * N, rows),)](
        z, mu, logvar, out, N, K * N, L, ACC=acc_dtype(mu.dtype), BLOCK_R=rows, BLOCK_L=BLOCK_L,
        num_warps=num_warps(BLOCK_L, mu.dtype == torch.float64),
    )


def latent_log_ratio_backward(grad_out, z, mu, logvar, dz, dmu, dlogvar) -> None:
    """dz (K, N, L) and, unless dmu and dlogvar are None (stop the score),
    dmu, dlogvar (N, L) <- gradients of latent_log_ratio given grad_out (K, N)."""
    K, N, L = z.shape
    rows = block_rows(z.device)  # rows per program
    if N * L == 0:
        return
    stop_score = dmu is None
    acc = accumulation_dtype(mu.dtype)
    BLOCK_L = block_cols(L, MAX_BLOCK_COLS_BACKWARD)
    row_blocks = triton.cdiv(N, rows)
    # without dmu and dlogvar nothing is summed over samples: one sample per program
    splits, per_split = (max(K, 1), 1) if stop_score else sample_splits(K, row_blocks, z.device)
    part_shape = (1,) if stop_score else (splits, N, L)
    part_mu = torch.zeros(part_shape, dtype=acc, device=mu.device)
    part_lv = torch.zeros_like(part_mu)
    if K > 0:
        _latent_log_ratio_bwd_kernel[(row_blocks * splits,)](
            grad_out, z, mu, logvar, dz, part_mu, part_lv, N, L, K, per_split,
            STOP_SCORE=stop_score, ACC=acc_dtype(mu.dtype), BLOCK_R=rows, BLOCK_L=BLOCK_L,
            num_warps=num_warps(BLOCK_L, mu.dtype == torch.float64),
        )
    if not stop_score:
        dmu.copy_(part_mu.sum(0))
        dlogvar.copy_(part_lv.sum(0))
