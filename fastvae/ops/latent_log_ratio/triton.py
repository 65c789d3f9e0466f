"""Triton kernels of latent_log_ratio: r = log N(z; 0, I) - log N(z; mu, e^logvar)
summed over L, i.e. 0.5 * sum(eps^2 - z^2 + logvar) with eps = (z - mu) e^(-logvar/2),
and its gradient in full or in the "stop the score" mode (dz only).

Layout: z, dz (K, N, L) contiguous; mu, logvar, dmu, dlogvar (N, L), shared by
the K samples (read per sample, never broadcast in memory); out, grad_out (K, N).
One launch forward, one backward, no torch work around them. The
forward tiles the K * N sample rows (about 4096 elements, 8 warps). The
backward in the stop-score mode tiles the sample rows too (nothing is summed);
in full, each program owns a tile of mu's rows x columns and loops over the
samples: dz per sample, dmu and dlogvar summed in registers and written once.
Where those tiles do not fill a wave the samples are split and the last
program of a tile adds the splits' partials in split order (deterministic;
_common.arrive_last).
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import (
    acc_dtype,
    accumulation_dtype,
    arrive_last,
    cdiv,
    load_tile,
    sample_rows_of,
    split_samples,
    split_tile,
    tile_columns,
    tile_counters,
    tile_geometry,
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
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    r, r_ok, n, acc = sample_rows_of(BLOCK_R, KN, N, ACC)
    for l0 in range(0, L, BLOCK_L):
        cols, mask = tile_columns(l0, L, r_ok, BLOCK_L)
        idx = n[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        z = load_tile(z_ptr, r, cols, mask, L, ACC)
        eps = (z - mu) * tl.exp(-0.5 * lv)
        # eps^2 - z^2 as (eps - z)(eps + z): +-inf, not inf - inf, for an overflowing z
        acc += tl.sum(tl.where(mask, (eps - z) * (eps + z) + lv, 0.0), axis=1)
    tl.store(out_ptr + r, (0.5 * acc).to(out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=["N", "R", "K", "K_PER", "SPLITS"])
def _latent_log_ratio_bwd_kernel(
    grad_out_ptr,  # (K, N)
    z_ptr,  # (K, N, L)
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    dz_ptr,  # (K, N, L)
    dmu_ptr,  # (N, L), unless STOP_SCORE
    dlv_ptr,  # (N, L), unless STOP_SCORE
    part_ptr,  # (2, SPLITS, N, L) ACC: partial dmu, dlogvar of each split (SPLITS > 1)
    counter_ptr,  # (tiles,) int32, 0 between launches (SPLITS > 1)
    N,
    L,
    R,  # rows the programs tile: N (full: each loops over the samples) or K * N (STOP_SCORE)
    K,  # samples each program loops over: K or 1
    K_PER,  # samples per split
    SPLITS,
    STOP_SCORE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    tile, split, rows, cols, row_ok, col_ok, mask, k0, k1 = split_tile(R, L, K, K_PER, BLOCK_R, BLOCK_L)
    n = rows % N if STOP_SCORE else rows
    idx = n[:, None] * L + cols[None, :]
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
    inv_s = tl.exp(-0.5 * tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC))
    acc_mu = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
    acc_lv = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
    for k in range(k0, k1):
        r = k * R + rows
        off = r[:, None] * L + cols[None, :]  # int64: k * N * L overflows int32
        g = tl.load(grad_out_ptr + r, mask=row_ok, other=0.0).to(ACC)[:, None]
        z = tl.load(z_ptr + off, mask=mask, other=0.0).to(ACC)
        eps = (z - mu) * inv_s
        tl.store(dz_ptr + off, (g * (eps * inv_s - z)).to(dz_ptr.dtype.element_ty), mask=mask)
        if not STOP_SCORE:
            acc_mu += g * eps
            acc_lv += g * (1.0 - eps * eps)
    if not STOP_SCORE:
        dmu = -acc_mu * inv_s
        dlv = 0.5 * acc_lv
        if SPLITS == 1:
            tl.store(dmu_ptr + idx, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
            tl.store(dlv_ptr + idx, dlv.to(dlv_ptr.dtype.element_ty), mask=mask)
        else:
            NL = N * L
            tl.store(part_ptr + split * NL + idx, dmu, mask=mask)
            tl.store(part_ptr + (SPLITS + split) * NL + idx, dlv, mask=mask)
            if arrive_last(counter_ptr + tile, SPLITS):
                sum_mu = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
                sum_lv = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
                for s in range(0, SPLITS):
                    sum_mu += tl.load(part_ptr + s * NL + idx, mask=mask, other=0.0, cache_modifier=".cg")
                    sum_lv += tl.load(part_ptr + (SPLITS + s) * NL + idx, mask=mask, other=0.0,
                                      cache_modifier=".cg")
                tl.store(dmu_ptr + idx, sum_mu.to(dmu_ptr.dtype.element_ty), mask=mask)
                tl.store(dlv_ptr + idx, sum_lv.to(dlv_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def latent_log_ratio_forward(z, mu, logvar, out) -> None:
    """out (K, N) <- latent_log_ratio of z (K, N, L) and mu, logvar (N, L)."""
    K, N, L = z.shape
    if K * N == 0:
        return
    BLOCK_R, BLOCK_L, warps = tile_geometry(L, z.device, mu.dtype == torch.float64)
    _latent_log_ratio_fwd_kernel[(cdiv(K * N, BLOCK_R),)](
        z, mu, logvar, out, N, K * N, L, ACC=acc_dtype(mu.dtype), BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L,
        num_warps=warps,
    )


# Backward tiles of the full mode (the sums stay live across the loop over samples).
BACKWARD_TILE = 1024


def latent_log_ratio_backward(grad_out, z, mu, logvar, dz, dmu, dlogvar) -> None:
    """dz (K, N, L) and, unless dmu and dlogvar are None (stop the score),
    dmu, dlogvar (N, L) <- gradients of latent_log_ratio given grad_out (K, N)."""
    K, N, L = z.shape
    if N * L == 0:
        return
    stop_score = dmu is None
    if K == 0:
        if not stop_score:
            dmu.zero_()  # a sum over no samples: no training shape takes this path
            dlogvar.zero_()
        return
    BLOCK_R, BLOCK_L, warps = tile_geometry(L, z.device, mu.dtype == torch.float64,
                                            4096 if stop_score else BACKWARD_TILE)
    R, k_loop = (K * N, 1) if stop_score else (N, K)
    tiles = cdiv(R, BLOCK_R) * cdiv(L, BLOCK_L)
    splits, per_split = (1, 1) if stop_score else split_samples(tiles, K, z.device)
    part = torch.empty((2, splits, N, L) if splits > 1 else (1,), dtype=accumulation_dtype(mu.dtype),
                       device=z.device)
    _latent_log_ratio_bwd_kernel[(tiles * splits,)](
        grad_out, z, mu, logvar, dz, dz if stop_score else dmu, dz if stop_score else dlogvar, part,
        tile_counters(z.device, tiles, splits), N, L, R, k_loop, per_split, splits,
        STOP_SCORE=stop_score, ACC=acc_dtype(mu.dtype), BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, num_warps=warps,
    )
