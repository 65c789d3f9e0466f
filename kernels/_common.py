"""What the Triton kernels share: the accumulation dtype, the block shapes of
a row-by-column tile, and the numerically safe softplus / sigmoid."""
import torch
import triton
import triton.language as tl

TILE = 4096  # target elements per program (BLOCK_ROWS * BLOCK_COLS)


def acc_dtype(dtype: torch.dtype):
    """float64 stays float64; bf16, fp16 and fp32 accumulate in fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def blocks(rows: int, cols: int, max_cols: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) of a TILE-element tile: as many columns as the
    rows have, up to max_cols (longer rows loop), the rest of the tile to rows."""
    block_cols = min(triton.next_power_of_2(max(cols, 1)), max_cols)
    block_rows = max(1, min(TILE // block_cols, triton.next_power_of_2(max(rows, 1))))
    return block_rows, block_cols


@triton.jit
def log1p_unit(t):
    """log(1 + t) for t in [0, 1] (Goldberg's correction; libdevice log1p is
    missing under the interpreter)."""
    u = 1.0 + t
    du = u - 1.0
    return tl.where(du == 0.0, t, tl.log(u) * (t / tl.where(du == 0.0, 1.0, du)))


@triton.jit
def softplus(r):
    return tl.maximum(r, 0.0) + log1p_unit(tl.exp(-tl.abs(r)))


@triton.jit
def sigmoid(r):
    e = tl.exp(-tl.abs(r))
    s = 1.0 / (1.0 + e)
    return tl.where(r >= 0.0, s, e * s)
