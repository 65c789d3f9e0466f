"""Triton kernels of kl_normal: KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar))
summed over L, with the standard normal prior when HAS_PRIOR is false.

Layout: mu, logvar, prior_mu, prior_logvar (N, L) contiguous; kl, dkl (N,).
"""
import triton
import triton.language as tl

from fastvae.kernels._common import MAX_BLOCK_COLS as MAX_BLOCK_L
from fastvae.kernels._common import acc_dtype, blocks, cdiv, program_rows, tile_columns

# 1024 elements a program at 4 warps: 8 a thread, which ptxas keeps in
# registers for the backward's five live tiles (4096 spilled).
KL_TILE = 1024

# -- math helpers -------------------------------------------------------------


@triton.jit
def _kl_terms(mu, lv, pm, plv, HAS_PRIOR: tl.constexpr):
    if HAS_PRIOR:
        d = mu - pm
        return plv - lv + (tl.exp(lv) + d * d) * tl.exp(-plv) - 1.0
    else:
        return tl.exp(lv) + mu * mu - 1.0 - lv


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["N"])
def _kl_normal_fwd_kernel(
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    prior_mu_ptr,  # (N, L), unused unless HAS_PRIOR
    prior_logvar_ptr,  # (N, L), unused unless HAS_PRIOR
    kl_ptr,  # (N,)
    N,
    L,
    HAS_PRIOR: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows, row_ok = program_rows(BLOCK_N, N)
    kl = tl.zeros([BLOCK_N], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        cols, mask = tile_columns(l0, L, row_ok, BLOCK_L)
        idx = rows[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        pm = mu
        plv = lv
        if HAS_PRIOR:
            pm = tl.load(prior_mu_ptr + idx, mask=mask, other=0.0).to(ACC)
            plv = tl.load(prior_logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        kl += tl.sum(tl.where(mask, _kl_terms(mu, lv, pm, plv, HAS_PRIOR), 0.0), axis=1)
    tl.store(kl_ptr + rows, (0.5 * kl).to(kl_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["N"])
def _kl_normal_bwd_kernel(
    dkl_ptr,  # (N,)
    mu_ptr,  # (N, L)
    logvar_ptr,  # (N, L)
    prior_mu_ptr,  # (N, L), unused unless HAS_PRIOR
    prior_logvar_ptr,  # (N, L), unused unless HAS_PRIOR
    dmu_ptr,  # (N, L)
    dlogvar_ptr,  # (N, L)
    dprior_mu_ptr,  # (N, L), unused unless HAS_PRIOR
    dprior_logvar_ptr,  # (N, L), unused unless HAS_PRIOR
    N,
    L,
    HAS_PRIOR: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows, row_ok = program_rows(BLOCK_N, N)
    g = tl.load(dkl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    for l0 in range(0, L, BLOCK_L):
        cols, mask = tile_columns(l0, L, row_ok, BLOCK_L)
        idx = rows[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        var = tl.exp(lv)
        if HAS_PRIOR:
            pm = tl.load(prior_mu_ptr + idx, mask=mask, other=0.0).to(ACC)
            plv = tl.load(prior_logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
            inv_pvar = tl.exp(-plv)
            d = mu - pm
            dmu = g * d * inv_pvar
            tl.store(dprior_mu_ptr + idx, (-dmu).to(dprior_mu_ptr.dtype.element_ty), mask=mask)
            dplv = 0.5 * g * (1.0 - (var + d * d) * inv_pvar)
            tl.store(dprior_logvar_ptr + idx, dplv.to(dprior_logvar_ptr.dtype.element_ty), mask=mask)
            dlv = 0.5 * g * (var * inv_pvar - 1.0)
        else:
            dmu = g * mu
            dlv = 0.5 * g * (var - 1.0)
        tl.store(dmu_ptr + idx, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
        tl.store(dlogvar_ptr + idx, dlv.to(dlogvar_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def kl_normal_forward(mu, logvar, prior_mu, prior_logvar, kl) -> None:
    """kl (N,) <- kl_normal of (N, L) inputs; prior_mu, prior_logvar both None or both (N, L)."""
    N, L = mu.shape
    if N * L == 0:
        kl.zero_()
        return
    has_prior = prior_mu is not None
    BLOCK_N, BLOCK_L = blocks(N, L, MAX_BLOCK_L, tile=KL_TILE)
    _kl_normal_fwd_kernel[(cdiv(N, BLOCK_N),)](
        mu, logvar, prior_mu if has_prior else mu, prior_logvar if has_prior else logvar, kl,
        N, L, HAS_PRIOR=has_prior, ACC=acc_dtype(mu.dtype), BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L,
    )


def kl_normal_backward(grad_kl, mu, logvar, prior_mu, prior_logvar, dmu, dlogvar, dprior_mu, dprior_logvar) -> None:
    """dmu, dlogvar (and dprior_mu, dprior_logvar when the prior is given) <- gradients of kl_normal."""
    N, L = mu.shape
    if N * L == 0:
        return
    has_prior = prior_mu is not None
    BLOCK_N, BLOCK_L = blocks(N, L, MAX_BLOCK_L, tile=KL_TILE)
    _kl_normal_bwd_kernel[(cdiv(N, BLOCK_N),)](
        grad_kl, mu, logvar,
        prior_mu if has_prior else mu, prior_logvar if has_prior else logvar,
        dmu, dlogvar,
        dprior_mu if has_prior else dmu, dprior_logvar if has_prior else dlogvar,
        N, L, HAS_PRIOR=has_prior, ACC=acc_dtype(mu.dtype), BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L,
    )
