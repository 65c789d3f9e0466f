"""Triton kernels of stick_breaking: z = stick_breaking(y) on the simplex of
M + 1 components (the formulas: fastvae/ops/stick_breaking/__init__.py), and
its gradient. Each program owns a block of rows and walks their columns in
chunks, carrying each row's running sum from chunk to chunk, so any M works
in one launch: forward the prefix sum of softplus(x), backward the suffix sum
of g = dz * z (chunks from the last).

Layout: y, dy (N, M) contiguous; z, grad_z (N, M + 1).
"""
import triton
import triton.language as tl

from fastvae.kernels._common import MAX_BLOCK_COLS as MAX_BLOCK_M
from fastvae.kernels._common import (
    acc_dtype,
    blocks,
    cdiv,
    load_tile,
    program_rows,
    sigmoid,
    softplus,
    store_tile,
    tile_columns,
)

# elements a program holds per chunk: as kl_normal's tile, which ptxas keeps in
# registers at 4 warps
SB_TILE = 1024


@triton.jit
def _x(y, cols, M, ACC: tl.constexpr):
    """x_j = y_j - log(M - j); columns past M (masked by the callers) read log 1."""
    return y - tl.log(tl.maximum(M - cols, 1).to(ACC))[None, :]


@triton.jit(do_not_specialize=["N"])
def _stick_breaking_fwd_kernel(
    y_ptr,  # (N, M)
    z_ptr,  # (N, M + 1)
    N,
    M,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows, row_ok = program_rows(BLOCK_N, N)
    S = tl.zeros([BLOCK_N], dtype=ACC)  # sum of softplus(x) over the chunks before
    for m0 in range(0, M, BLOCK_M):
        cols, mask = tile_columns(m0, M, row_ok, BLOCK_M)
        x = _x(load_tile(y_ptr, rows, cols, mask, M, ACC), cols, M, ACC)
        sp = tl.where(mask, softplus(x), 0.0)
        store_tile(z_ptr, rows, cols, tl.exp(x - (tl.cumsum(sp, axis=1) + S[:, None])), mask, M + 1)
        S += tl.sum(sp, axis=1)
    tl.store(z_ptr + rows * (M + 1) + M, tl.exp(-S).to(z_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["N"])
def _stick_breaking_bwd_kernel(
    grad_z_ptr,  # (N, M + 1)
    y_ptr,  # (N, M)
    z_ptr,  # (N, M + 1)
    dy_ptr,  # (N, M)
    N,
    M,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows, row_ok = program_rows(BLOCK_N, N)
    last = rows * (M + 1) + M
    # R: sum_{i >= j} g_i over the chunks after, from g_M
    R = (tl.load(grad_z_ptr + last, mask=row_ok, other=0.0).to(ACC)
         * tl.load(z_ptr + last, mask=row_ok, other=0.0).to(ACC))
    n_chunks = tl.cdiv(M, BLOCK_M)
    for i in range(0, n_chunks):
        m0 = (n_chunks - 1 - i) * BLOCK_M
        cols, mask = tile_columns(m0, M, row_ok, BLOCK_M)
        g = load_tile(grad_z_ptr, rows, cols, mask, M + 1, ACC) * load_tile(z_ptr, rows, cols, mask, M + 1, ACC)
        x = _x(load_tile(y_ptr, rows, cols, mask, M, ACC), cols, M, ACC)
        dy = g - sigmoid(x) * (tl.cumsum(g, axis=1, reverse=True) + R[:, None])
        store_tile(dy_ptr, rows, cols, dy, mask, M)
        R += tl.sum(g, axis=1)


# -- launchers ----------------------------------------------------------------


def launch_plan(N: int, M: int, dtype) -> tuple[tuple, dict]:
    """(grid, compile-time parameters) of the forward and of the backward
    over y (N, M), N > 0: what the launchers below launch, and the op's own
    plans (op.py) launch with the same variants."""
    BLOCK_N, BLOCK_M = blocks(N, M, MAX_BLOCK_M, tile=SB_TILE)
    return (cdiv(N, BLOCK_N),), dict(ACC=acc_dtype(dtype), BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M)


def stick_breaking_forward(y, z) -> None:
    """z (N, M + 1) <- stick_breaking of y (N, M)."""
    N, M = y.shape
    if N == 0:
        return
    grid, meta = launch_plan(N, M, y.dtype)
    _stick_breaking_fwd_kernel[grid](y, z, N, M, **meta)


def stick_breaking_backward(grad_z, y, z, dy) -> None:
    """dy (N, M) <- the gradient of stick_breaking for grad_z (N, M + 1)."""
    N, M = y.shape
    if N == 0:
        return
    grid, meta = launch_plan(N, M, y.dtype)
    _stick_breaking_bwd_kernel[grid](grad_z, y, z, dy, N, M, **meta)
