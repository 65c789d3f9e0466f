"""Triton kernels of sample_normal_kl: one latent group, z = mu_q + sigma_q * eps
and KL(q || p) per element or summed per row, and the backward that
regenerates eps from (seed, offset).

Layout: mu, log_scale, prior_mu, prior_log_scale, z, grad_z (N, L)
contiguous; kl, grad_kl (N, L) per element or (N,) row sums. The noise of
element (n, l) is at offset n * L + l (sample_normal's training layout).

Geometry (docs/internals/triton.md): the forward tiles rows by columns; a group has
few rows (the batch) of many elements (C x H x W), so the columns are split
over programs until a wave is full. With the KL summed, each split stores
its rows' partial sums and the last program of a row tile to arrive adds
them in split order (deterministic, no float atomics: _common.arrive_last).
The backward is elementwise over the flat N x L elements.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels import _common
from fastvae.kernels._common import (
    INTERPRETER_BLOCK_ROWS,
    TARGET_PROGRAMS,
    acc_dtype,
    accumulation_dtype,
    arrive_last,
    block_cols,
    cdiv,
    next_power_of_2,
    split_block,
    tile_columns,
    tile_counters,
)
from fastvae.kernels.philox import randn

# Elements per program on a GPU: 8 float32 values a thread per live tile at 8
# warps (4 warps spilled the forward's noise registers, ptxas sm_90); a quarter
# for float64, whose math holds more registers.
TILE = 2048
NUM_WARPS = 8
# Under the interpreter (CPU tensors) a program costs about 1 ms whatever its
# size: few, large programs.
INTERPRETER_TILE = 1 << 18

# -- math helpers -------------------------------------------------------------


@triton.jit
def _group_terms(m, ls, pm, pls, LOGVAR: tl.constexpr, RESIDUAL: tl.constexpr):
    """(mu_q, log sigma_q, d = mu_q - mu_p, delta = log sigma_q - log sigma_p, b = log sigma_p)."""
    if LOGVAR:
        c = 0.5
    else:
        c = 1.0
    b = c * pls
    if RESIDUAL:
        delta = c * ls
        return pm + m, b + delta, m, delta, b
    else:
        a = c * ls
        return m, a, m - pm, a - b, b


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "L", "COLS_PER", "SPLITS"])
def _sample_normal_kl_fwd_kernel(
    mu_ptr, ls_ptr, pm_ptr, pls_ptr,  # (N, L) each: the posterior's and the prior's location and scale parameter
    seed_ptr,  # (): int64
    z_ptr,  # (N, L)
    kl_ptr,  # (N, L), or (N,) when REDUCE
    partial_ptr,  # (SPLITS, N): the splits' row sums, when REDUCE and SPLITS > 1
    counter_ptr,  # int32 arrival counters, one per row tile, when REDUCE and SPLITS > 1
    N,
    L,
    COLS_PER,  # columns per split, a multiple of BLOCK_C
    SPLITS,
    LOGVAR: tl.constexpr,
    RESIDUAL: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile, split, rows, row_ok = split_block(BLOCK_R, N)
    seed = tl.load(seed_ptr)
    c0 = split * COLS_PER
    c1 = tl.minimum(c0 + COLS_PER, L)
    kl = tl.zeros([BLOCK_R], dtype=ACC)
    for l0 in range(c0, c1, BLOCK_C):
        cols, mask = tile_columns(l0, c1, row_ok, BLOCK_C)
        idx = rows[:, None] * L + cols[None, :]
        m = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        ls = tl.load(ls_ptr + idx, mask=mask, other=0.0).to(ACC)
        pm = tl.load(pm_ptr + idx, mask=mask, other=0.0).to(ACC)
        pls = tl.load(pls_ptr + idx, mask=mask, other=0.0).to(ACC)
        mq, a, d, delta, b = _group_terms(m, ls, pm, pls, LOGVAR, RESIDUAL)
        u = d * tl.exp(-b)
        t = 0.5 * (tl.exp(2.0 * delta) + u * u - 1.0) - delta
        eps = randn(seed, idx, ACC)
        tl.store(z_ptr + idx, (mq + tl.exp(a) * eps).to(z_ptr.dtype.element_ty), mask=mask)
        if REDUCE:
            kl += tl.sum(tl.where(mask, t, 0.0), axis=1)
        else:
            tl.store(kl_ptr + idx, t.to(kl_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        if SPLITS == 1:
            tl.store(kl_ptr + rows, kl.to(kl_ptr.dtype.element_ty), mask=row_ok)
        else:
            tl.store(partial_ptr + split * N + rows, kl, mask=row_ok)
            if arrive_last(counter_ptr + tile, SPLITS):
                total = tl.zeros([BLOCK_R], dtype=ACC)
                for s in range(0, SPLITS):
                    total += tl.load(partial_ptr + s * N + rows, mask=row_ok, other=0.0)
                tl.store(kl_ptr + rows, total.to(kl_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["NL", "L"])
def _sample_normal_kl_bwd_kernel(
    grad_z_ptr,  # (N, L), read when HAS_GRAD_Z
    grad_kl_ptr,  # (N, L), or (N,) when KL_ROWS; read when HAS_GRAD_KL
    mu_ptr, ls_ptr, pm_ptr, pls_ptr,  # (N, L) each, as in the forward
    seed_ptr,  # (): int64
    dmu_ptr, dls_ptr, dpm_ptr, dpls_ptr,  # (N, L) each: their gradients
    NL,
    L,
    LOGVAR: tl.constexpr,
    RESIDUAL: tl.constexpr,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_KL: tl.constexpr,
    KL_ROWS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < NL
    m = tl.load(mu_ptr + i, mask=mask, other=0.0).to(ACC)
    ls = tl.load(ls_ptr + i, mask=mask, other=0.0).to(ACC)
    pm = tl.load(pm_ptr + i, mask=mask, other=0.0).to(ACC)
    pls = tl.load(pls_ptr + i, mask=mask, other=0.0).to(ACC)
    mq, a, d, delta, b = _group_terms(m, ls, pm, pls, LOGVAR, RESIDUAL)
    if LOGVAR:
        c = 0.5
    else:
        c = 1.0
    gz = tl.zeros([BLOCK], dtype=ACC)
    zs = tl.zeros([BLOCK], dtype=ACC)
    if HAS_GRAD_Z:
        gz = tl.load(grad_z_ptr + i, mask=mask, other=0.0).to(ACC)
        zs = gz * tl.exp(a) * randn(tl.load(seed_ptr), i, ACC)
    gd = tl.zeros([BLOCK], dtype=ACC)
    gdelta = tl.zeros([BLOCK], dtype=ACC)
    gb = tl.zeros([BLOCK], dtype=ACC)
    if HAS_GRAD_KL:
        if KL_ROWS:
            g = tl.load(grad_kl_ptr + i // L, mask=mask, other=0.0).to(ACC)
        else:
            g = tl.load(grad_kl_ptr + i, mask=mask, other=0.0).to(ACC)
        ib = tl.exp(-b)
        u = d * ib
        gd = g * u * ib
        gdelta = g * (tl.exp(2.0 * delta) - 1.0)
        gb = -g * u * u
    tl.store(dmu_ptr + i, (gz + gd).to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dls_ptr + i, (c * (zs + gdelta)).to(dls_ptr.dtype.element_ty), mask=mask)
    if RESIDUAL:
        tl.store(dpm_ptr + i, gz.to(dpm_ptr.dtype.element_ty), mask=mask)
        tl.store(dpls_ptr + i, (c * (zs + gb)).to(dpls_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dpm_ptr + i, (-gd).to(dpm_ptr.dtype.element_ty), mask=mask)
        tl.store(dpls_ptr + i, (c * (gb - gdelta)).to(dpls_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def _column_splits(row_tiles: int, L: int, block_c: int, device: torch.device) -> int:
    """Splits of the columns: one under the interpreter (or FORCE_SPLITS, the
    tests' switch), else enough for TARGET_PROGRAMS programs."""
    col_blocks = cdiv(max(L, 1), block_c)
    if _common.FORCE_SPLITS is not None:
        return min(col_blocks, _common.FORCE_SPLITS)
    if device.type == "cpu":
        return 1
    return max(1, min(col_blocks, cdiv(TARGET_PROGRAMS, row_tiles)))


def _tile(dtype: torch.dtype, device: torch.device) -> int:
    if device.type == "cpu":
        return INTERPRETER_TILE
    return TILE // 8 if dtype == torch.float64 else TILE


def forward_plan(N: int, L: int, dtype: torch.dtype, device: torch.device, logvar: bool, residual: bool,
                 reduce: bool) -> tuple[tuple[int], dict, int, int, int]:
    """(grid, meta, columns per split, splits, row tiles) of the forward kernel
    for inputs (N, L) of ``dtype`` (N * L > 0): what depends on the shapes
    alone, worked out once per call signature by the op's plans
    (fastvae/ops/sample_normal_kl/op.py) and on every call by
    sample_normal_kl_forward, so both launch the same variants."""
    block_c = block_cols(L)
    tile = _tile(dtype, device)
    block_r = max(1, min(INTERPRETER_BLOCK_ROWS if device.type == "cpu" else tile, tile // block_c))
    if device.type == "cpu":  # the interpreter: no lanes past the rows (a GPU keeps one variant per row length)
        block_r = min(block_r, next_power_of_2(N))
    row_tiles = cdiv(N, block_r)
    splits = _column_splits(row_tiles, L, block_c, device)
    cols_per = cdiv(cdiv(L, splits), block_c) * block_c
    splits = cdiv(L, cols_per)
    meta = dict(LOGVAR=bool(logvar), RESIDUAL=bool(residual), REDUCE=reduce, ACC=acc_dtype(dtype), BLOCK_R=block_r,
                BLOCK_C=block_c, num_warps=NUM_WARPS)
    return (row_tiles * splits,), meta, cols_per, splits, row_tiles


def forward_buffers(N: int, dtype: torch.dtype, device: torch.device, row_tiles: int, splits: int,
                    reduce: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(partial, counters) of the forward: the splits' row sums (None where the
    KL is not summed over split columns: the kernel never touches it, and the
    launch passes kl in its place) and the arrival counters (_common.tile_counters)."""
    split = reduce and splits > 1
    partial = torch.empty((splits, N), dtype=accumulation_dtype(dtype), device=device) if split else None
    return partial, tile_counters(device, row_tiles, splits if reduce else 1)


def sample_normal_kl_forward(mu, log_scale, prior_mu, prior_log_scale, seed, logvar, residual, z, kl) -> None:
    """z (N, L) and kl ((N, L), or (N,) row sums) <- one group's draw and KL."""
    N, L = mu.shape
    reduce = kl.dim() == 1
    if N * L == 0:
        kl.zero_()
        return
    grid, meta, cols_per, splits, row_tiles = forward_plan(N, L, mu.dtype, mu.device, logvar, residual, reduce)
    partial, counters = forward_buffers(N, mu.dtype, mu.device, row_tiles, splits, reduce)
    _sample_normal_kl_fwd_kernel[grid](
        mu, log_scale, prior_mu, prior_log_scale, seed, z, kl, kl if partial is None else partial, counters, N, L,
        cols_per, splits, **meta)


def backward_plan(N: int, L: int, dtype: torch.dtype, device: torch.device, logvar: bool, residual: bool,
                  has_grad_z: bool, has_grad_kl: bool, kl_rows: bool) -> tuple[tuple[int], dict]:
    """(grid, meta) of the backward kernel for inputs (N, L) of ``dtype`` (N * L
    > 0) and the gradients given (``kl_rows``: grad_kl is per row, (N,)):
    the op's plans' and sample_normal_kl_backward's, as forward_plan."""
    # one variant whatever the size on a GPU (the tail masked); the interpreter sizes it to the problem
    tile = _tile(dtype, device)
    block = tile if device.type != "cpu" else next_power_of_2(min(N * L, tile))
    return (cdiv(N * L, block),), dict(
        LOGVAR=bool(logvar), RESIDUAL=bool(residual), HAS_GRAD_Z=has_grad_z, HAS_GRAD_KL=has_grad_kl,
        KL_ROWS=has_grad_kl and kl_rows, ACC=acc_dtype(dtype), BLOCK=block, num_warps=NUM_WARPS)


def sample_normal_kl_backward(grad_z, grad_kl, mu, log_scale, prior_mu, prior_log_scale, seed, logvar, residual,
                              dmu, dlog_scale, dprior_mu, dprior_log_scale) -> None:
    """dmu, dlog_scale, dprior_mu, dprior_log_scale (N, L) <- the gradients of
    z (grad_z) and of the KL (grad_kl, per element or per row), each None
    when its output has none."""
    N, L = mu.shape
    if N * L == 0:
        return
    grid, meta = backward_plan(N, L, mu.dtype, mu.device, logvar, residual, grad_z is not None, grad_kl is not None,
                               grad_kl is not None and grad_kl.dim() == 1)
    _sample_normal_kl_bwd_kernel[grid](
        mu if grad_z is None else grad_z, mu if grad_kl is None else grad_kl, mu, log_scale, prior_mu,
        prior_log_scale, seed, dmu, dlog_scale, dprior_mu, dprior_log_scale, N * L, L, **meta)
