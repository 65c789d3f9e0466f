"""Triton kernels of sample_normal_tril: z = mu + tril(S) @ eps for K samples with
the analytic KL(N(mu, S S^T) || N(0, I)) per row, and the backward that
regenerates eps from (seed, offset) instead of storing it.

Layout: mu (N, L), S (N, L, L) contiguous (only the lower triangle is read);
z, grad_z (K, N, L); kl, grad_kl (N,). eps of z[k, n, :] is sample_normal's:
randn(seed, k * N * L + n * L + l) (int64 offsets, philox.randn).

Geometry (docs/internals/triton.md): programs cover (sample split, block of rows). For
L <= MAX_SINGLE_L a program holds its rows' whole triangle (BLOCK_R x BL x BL,
BL = L rounded up to a power of two) in registers and walks its samples: S is
read once per program, each sample costs one normal per element and a
row-by-row reduction. Longer rows loop over BL x BL chunks of the triangle
(the noise of a chunk of columns is drawn again for each chunk of rows). The
forward splits the samples over programs on a GPU (_common.sample_splits:
nothing is summed over them; the first split writes kl). The backward is one
launch with no torch work around it: each program owns a block of
rows, loops over every sample accumulating sum_k grad_z eps^T in registers in
the same tiles, adds the KL's terms (when kl has a gradient) and writes dmu
and dS once (deterministic, no atomics, no partial sums).
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import acc_dtype, cdiv, next_power_of_2, program_rows, sample_splits, tile_and_split
from fastvae.kernels.philox import randn

# Rows of up to 64 latents keep their whole triangle in registers (64 x 64 =
# 4096 values per row: 16 per thread at 8 warps); longer rows loop over chunks.
MAX_SINGLE_L = 64
CHUNK_L = 32  # the chunk width for rows longer than MAX_SINGLE_L
# About this many triangle values per program on a GPU: one row at L = 64 or
# 32, four at L <= 16 (so B = 4096 rows launch >= 1024 programs).
TILE_GPU = 1024
MAX_ROWS_GPU = 4
# The interpreter (CPU tensors) costs about 1 ms a program: few, large ones.
TILE_INTERPRETER = 1 << 16
MAX_ROWS_INTERPRETER = 256


def geometry(L: int, device: torch.device) -> tuple[int, int, bool, int]:
    """(BLOCK_R, BLOCK_L, SINGLE, num_warps) for rows of L latents. Depends on L
    and the device type only, never on N or K (no recompilation per batch)."""
    single = L <= MAX_SINGLE_L
    bl = next_power_of_2(max(L, 1)) if single else CHUNK_L
    interp = device.type == "cpu"
    tile, max_rows = (TILE_INTERPRETER, MAX_ROWS_INTERPRETER) if interp else (TILE_GPU, MAX_ROWS_GPU)
    br = max(1, min(max_rows, tile // (bl * bl)))
    # 8 warps: swept with the AOT tool in a fresh Triton cache (sm_90, sm_80;
    # fp32, bf16, fp16, fp64; L = 1 .. 128, K = 1 and 16), 8 never spills,
    # while 1 to 4 spill at some sizes (fp64 backward at L <= 8 with 4; the
    # cosine's argument reduction held per thread).
    warps = 8
    return br, bl, single, warps


# -- kernels ------------------------------------------------------------------


@triton.jit
def _kl_terms(mu_ptr, s_ptr, rows, row_ok, L, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """|mu|^2 + |tril(S)|_F^2 - 2 sum_i log S_ii per row, in ACC, chunk by chunk
    (rows longer than one tile)."""
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    ci = tl.arange(0, BLOCK_L)
    for i0 in range(0, L, BLOCK_L):
        ii = i0 + ci
        m2 = row_ok[:, None] & (ii < L)[None, :]
        mu = tl.load(mu_ptr + rows[:, None] * L + ii[None, :], mask=m2, other=0.0).to(ACC)
        d = tl.load(s_ptr + rows[:, None] * L * L + ii[None, :] * (L + 1), mask=m2, other=1.0).to(ACC)
        acc += tl.sum(mu * mu - 2.0 * tl.log(d), axis=1)
        for j0 in range(0, i0 + BLOCK_L, BLOCK_L):
            jj = j0 + ci
            tri = (jj[None, :] <= ii[:, None]) & (ii < L)[:, None]
            m3 = row_ok[:, None, None] & tri[None, :, :]
            s = tl.load(s_ptr + rows[:, None, None] * L * L + ii[None, :, None] * L + jj[None, None, :],
                        mask=m3, other=0.0).to(ACC)
            acc += tl.sum(tl.sum(s * s, axis=2), axis=1)
    return acc


@triton.jit(do_not_specialize=["N", "K", "K_PER"])
def _sample_normal_tril_fwd_kernel(
    mu_ptr,  # (N, L)
    s_ptr,  # (N, L, L): lower triangle read
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L)
    kl_ptr,  # (N,): written by the first split
    N,
    L,
    K,
    K_PER,  # samples per split
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SINGLE: tl.constexpr,  # L <= BLOCK_L: the whole triangle in one tile
):
    tile, split, k0, k1 = tile_and_split(tl.cdiv(N, BLOCK_R), K, K_PER)
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < N
    seed = tl.load(seed_ptr)
    NL = N * L
    ci = tl.arange(0, BLOCK_L)
    kl_rows = N - tl.minimum(split, 1) * N  # the first split writes the KL: N rows, the others 0

    if SINGLE:
        m2 = row_ok[:, None] & (ci < L)[None, :]
        idx = rows[:, None] * L + ci[None, :]
        mu = tl.load(mu_ptr + idx, mask=m2, other=0.0).to(ACC)
        tri = (ci[None, :] <= ci[:, None]) & (ci < L)[:, None]
        s = tl.load(s_ptr + rows[:, None, None] * L * L + ci[None, :, None] * L + ci[None, None, :],
                    mask=row_ok[:, None, None] & tri[None, :, :], other=0.0).to(ACC)
        d = tl.load(s_ptr + rows[:, None] * L * L + ci[None, :] * (L + 1), mask=m2, other=1.0).to(ACC)
        kl = tl.sum(tl.sum(s * s, axis=2), axis=1) + tl.sum(mu * mu - 2.0 * tl.log(d), axis=1)
        tl.store(kl_ptr + rows, (0.5 * (kl - L)).to(kl_ptr.dtype.element_ty), mask=rows < kl_rows)
        for k in range(k0, k1):
            off = k * NL + idx
            eps = randn(seed, off, ACC)  # indexed by the column j
            z = mu + tl.sum(s * eps[:, None, :], axis=2)
            tl.store(z_ptr + off, z.to(z_ptr.dtype.element_ty), mask=m2)
    else:
        kl = 0.5 * (_kl_terms(mu_ptr, s_ptr, rows, row_ok, L, ACC, BLOCK_R, BLOCK_L) - L)
        tl.store(kl_ptr + rows, kl.to(kl_ptr.dtype.element_ty), mask=rows < kl_rows)
        for k in range(k0, k1):
            for i0 in range(0, L, BLOCK_L):
                ii = i0 + ci
                m2 = row_ok[:, None] & (ii < L)[None, :]
                idx = rows[:, None] * L + ii[None, :]
                z = tl.load(mu_ptr + idx, mask=m2, other=0.0).to(ACC)
                for j0 in range(0, i0 + BLOCK_L, BLOCK_L):
                    jj = j0 + ci
                    eps = randn(seed, k * NL + rows[:, None] * L + jj[None, :], ACC)
                    tri = (jj[None, :] <= ii[:, None]) & (ii < L)[:, None]
                    s = tl.load(s_ptr + rows[:, None, None] * L * L + ii[None, :, None] * L + jj[None, None, :],
                                mask=row_ok[:, None, None] & tri[None, :, :], other=0.0).to(ACC)
                    z += tl.sum(s * eps[:, None, :], axis=2)
                tl.store(z_ptr + k * NL + idx, z.to(z_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _kl_grad_tile(mu_ptr, s_ptr, gkl_ptr, rows, row_ok, ii, jj, L, ACC: tl.constexpr):
    """The KL's gradient on an (ii, jj) tile of the triangle, (rows, ii, jj):
    grad_kl * (S - diag(1 / S_ii)), NaN on a negative diagonal, 0 where
    grad_kl is 0."""
    tri = (jj[None, :] <= ii[:, None]) & (ii < L)[:, None]
    m3 = row_ok[:, None, None] & tri[None, :, :]
    s = tl.load(s_ptr + rows[:, None, None] * L * L + ii[None, :, None] * L + jj[None, None, :],
                mask=m3, other=0.0).to(ACC)
    on_diag = (ii[:, None] == jj[None, :])[None, :, :]
    d = tl.where(on_diag & m3, s, 1.0)
    inv = tl.where(d < 0.0, tl.sqrt(d), 1.0 / d)  # the square root of a negative is NaN
    g = tl.load(gkl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None, None]
    term = g * (s - tl.where(on_diag, inv, 0.0))
    return tl.where(m3 & (g != 0.0), term, 0.0)


@triton.jit(do_not_specialize=["N", "K"])
def _sample_normal_tril_bwd_kernel(
    grad_z_ptr,  # (K, N, L), read when HAS_GRAD_Z
    gkl_ptr,  # (N,), read when HAS_GRAD_KL
    mu_ptr,  # (N, L)
    s_ptr,  # (N, L, L)
    seed_ptr,  # (): int64
    dmu_ptr,  # (N, L): sum_k grad_z + grad_kl mu
    ds_ptr,  # (N, L, L): sum_k grad_z eps^T on the triangle + the KL's terms, 0 above
    N,
    L,
    K,  # samples (0 without grad_z)
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_KL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SINGLE: tl.constexpr,
):
    rows, row_ok = program_rows(BLOCK_R, N)
    seed = tl.load(seed_ptr)
    NL = N * L
    ci = tl.arange(0, BLOCK_L)
    if SINGLE:  # one tile: the triangle's accumulator stays in registers across the samples
        m2 = row_ok[:, None] & (ci < L)[None, :]
        idx = rows[:, None] * L + ci[None, :]
        acc_mu = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
        acc = tl.zeros([BLOCK_R, BLOCK_L, BLOCK_L], dtype=ACC)
        if HAS_GRAD_Z:
            for k in range(0, K):
                gz = tl.load(grad_z_ptr + k * NL + idx, mask=m2, other=0.0).to(ACC)
                eps = randn(seed, k * NL + idx, ACC)
                acc_mu += gz
                acc += gz[:, :, None] * eps[:, None, :]
        _store_grads(mu_ptr, s_ptr, gkl_ptr, dmu_ptr, ds_ptr, acc_mu, acc, rows, row_ok, ci, ci, L, True,
                     HAS_GRAD_KL, ACC)
    else:
        for i0 in range(0, L, BLOCK_L):
            ii = i0 + ci
            m2 = row_ok[:, None] & (ii < L)[None, :]
            idx = rows[:, None] * L + ii[None, :]
            acc_mu = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
            if HAS_GRAD_Z:
                for k in range(0, K):
                    acc_mu += tl.load(grad_z_ptr + k * NL + idx, mask=m2, other=0.0).to(ACC)
            # the tiles (ii, jj) of these rows of the triangle, and the zeros above it
            for j0 in range(0, L, BLOCK_L):
                jj = j0 + ci
                acc = tl.zeros([BLOCK_R, BLOCK_L, BLOCK_L], dtype=ACC)
                if HAS_GRAD_Z:
                    if j0 <= i0:
                        for k in range(0, K):
                            gz = tl.load(grad_z_ptr + k * NL + idx, mask=m2, other=0.0).to(ACC)
                            eps = randn(seed, k * NL + rows[:, None] * L + jj[None, :], ACC)
                            acc += gz[:, :, None] * eps[:, None, :]
                _store_grads(mu_ptr, s_ptr, gkl_ptr, dmu_ptr, ds_ptr, acc_mu, acc, rows, row_ok, ii, jj, L, j0 == 0,
                             HAS_GRAD_KL, ACC)


@triton.jit
def _store_grads(mu_ptr, s_ptr, gkl_ptr, dmu_ptr, ds_ptr, acc_mu, acc, rows, row_ok, ii, jj, L, with_mu,
                 HAS_GRAD_KL: tl.constexpr, ACC: tl.constexpr):
    """Stores the (ii, jj) tile of dS (the lower triangle of acc plus the KL's
    terms, 0 above the diagonal) and, with_mu, the ii tile of dmu (acc_mu plus
    grad_kl * mu)."""
    tri = (jj[None, :] <= ii[:, None])[None, :, :]
    ds = tl.where(tri, acc, 0.0)
    if HAS_GRAD_KL:
        ds += _kl_grad_tile(mu_ptr, s_ptr, gkl_ptr, rows, row_ok, ii, jj, L, ACC)
    m3 = row_ok[:, None, None] & ((ii < L)[:, None] & (jj < L)[None, :])[None, :, :]
    tl.store(ds_ptr + rows[:, None, None] * L * L + ii[None, :, None] * L + jj[None, None, :],
             ds.to(ds_ptr.dtype.element_ty), mask=m3)
    if with_mu:
        m2 = row_ok[:, None] & (ii < L)[None, :]
        idx = rows[:, None] * L + ii[None, :]
        dmu = acc_mu
        if HAS_GRAD_KL:
            g = tl.load(gkl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
            mu = tl.load(mu_ptr + idx, mask=m2, other=0.0).to(ACC)
            dmu += tl.where(g != 0.0, g * mu, 0.0)
        tl.store(dmu_ptr + idx, dmu.to(dmu_ptr.dtype.element_ty), mask=m2)


# -- launchers ----------------------------------------------------------------


def forward_plan(K: int, N: int, L: int, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict, tuple]:
    """(grid, meta, the runtime integers (N, L, K, samples per split)) of the
    forward kernel for K samples of N rows of L latents (N L > 0): the shapes'
    part of a launch, worked out once per call signature by the op's plans
    (op.py's TrilPlan)."""
    br, bl, single, warps = geometry(L, device)
    row_blocks = cdiv(N, br)
    splits, per_split = sample_splits(K, row_blocks, device)
    return ((row_blocks * splits,), dict(ACC=acc_dtype(dtype), BLOCK_R=br, BLOCK_L=bl, SINGLE=single,
                                         num_warps=warps), (N, L, K, per_split))


def backward_plan(N: int, L: int, dtype: torch.dtype, device: torch.device, has_grad_z: bool,
                  has_grad_kl: bool) -> tuple[tuple, dict]:
    """(grid, meta) of the backward kernel, as forward_plan's."""
    br, bl, single, warps = geometry(L, device)
    return (cdiv(N, br),), dict(HAS_GRAD_Z=has_grad_z, HAS_GRAD_KL=has_grad_kl, ACC=acc_dtype(dtype), BLOCK_R=br,
                                BLOCK_L=bl, SINGLE=single, num_warps=warps)


def sample_normal_tril_forward(mu, scale_tril, seed, z, kl) -> None:
    """z (K, N, L), kl (N,) <- sample_normal_tril of mu (N, L), scale_tril (N, L, L);
    seed: () int64 tensor; z[k, n] uses the noise at offsets k * N * L + n * L + [0, L)."""
    K, N, L = z.shape
    if N == 0:
        return
    if L == 0:
        kl.zero_()
        return
    grid, meta, ints = forward_plan(K, N, L, mu.dtype, mu.device)
    _sample_normal_tril_fwd_kernel[grid](mu, scale_tril, seed, z, kl, *ints, **meta)


def sample_normal_tril_backward(grad_z, grad_kl, mu, scale_tril, seed, dmu, dscale_tril) -> None:
    """dmu (N, L), dscale_tril (N, L, L) <- gradients of sample_normal_tril given
    grad_z (K, N, L), grad_kl (N,), either None when its output has no gradient:
    dmu = sum_k grad_z + grad_kl mu,
    dS = tril(sum_k grad_z eps^T) + grad_kl (tril(S) - diag(1 / S_ii)), 0 above the diagonal.
    One launch: each program loops over every sample (no partial sums)."""
    N, L = mu.shape
    if N * L == 0:
        return
    K = 0 if grad_z is None else grad_z.shape[0]
    grid, meta = backward_plan(N, L, mu.dtype, mu.device, grad_z is not None, grad_kl is not None)
    _sample_normal_tril_bwd_kernel[grid](
        grad_z if grad_z is not None else mu, grad_kl if grad_kl is not None else mu, mu, scale_tril, seed, dmu,
        dscale_tril, N, L, K, **meta)
