"""What the Triton kernels share: the accumulation dtype, the launch geometry,
and the numerically safe softplus / sigmoid.

Geometry. An H100 has 132 SMs, so a launch needs at least 2 * 132 programs to
keep every SM busy while one program waits on memory. The kernels tile rows
(a sample's row of L or D values, or a column of log-weights) in blocks of
BLOCK_ROWS rows and at most MAX_BLOCK_COLS columns (longer rows loop). Block
shapes depend only on the row length, bucketed to a power of two, never on the
number of rows, samples or batch size: a training or evaluation run whose
batch size or K varies compiles no new variants. Row and sample counts are
also exempt from Triton's integer specialization (do_not_specialize), which
would otherwise compile one variant per divisibility class of the batch size.
"""
import torch
import triton
import triton.language as tl

from fastvae._backend import accumulation_dtype

# 2 programs per SM of an H100 (132 SMs): the fewest programs a reduction over
# samples is split into, so that even one row of data fills the GPU.
TARGET_PROGRAMS = 264
# Rows per program. Small enough that the smallest training shape the kernels
# are sized for (K = 5 samples of B = 256 rows) launches over 264 programs.
BLOCK_ROWS = 4
MAX_BLOCK_COLS = 1024


def acc_dtype(dtype: torch.dtype):
    """The Triton type of fastvae's one accumulation rule (_backend.accumulation_dtype):
    float64 stays float64; bf16, fp16 and fp32 accumulate in fp32."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


# Backward kernels keep accumulator tiles live across their loop over samples:
# half the columns per step keeps them in registers at 8 warps.
MAX_BLOCK_COLS_BACKWARD = 512


def block_cols(cols: int, max_cols: int = MAX_BLOCK_COLS) -> int:
    """Columns per inner step: the row length rounded up to a power of two, at
    most max_cols (longer rows loop)."""
    return min(triton.next_power_of_2(max(cols, 1)), max_cols)


def num_warps(block_cols: int, fp64: bool = False, per_thread: int = 8) -> int:
    """Warps for a BLOCK_ROWS x block_cols tile: about per_thread float32
    elements per thread per live tile (half for float64, whose registers are
    twice as wide), from 1 warp for short rows to 8. ptxas reports no spills
    at these sizes for fp32/bf16/fp16 (python -m fastvae.kernels.aot); kernels
    that generate noise hold Philox's state too and ask for per_thread=4."""
    per_thread = max(1, per_thread // 2) if fp64 else per_thread
    return max(1, min(8, BLOCK_ROWS * block_cols // (32 * per_thread)))  # GPU tiles


# The Triton interpreter (CPU tensors) costs about 1 ms a program whatever its
# size: there, programs take many rows and all samples.
INTERPRETER_BLOCK_ROWS = 256


def block_rows(device: torch.device) -> int:
    """Rows per program: BLOCK_ROWS on a GPU (and for the ahead-of-time tool's
    meta tensors), INTERPRETER_BLOCK_ROWS under the interpreter."""
    return INTERPRETER_BLOCK_ROWS if device.type == "cpu" else BLOCK_ROWS


def sample_splits(samples: int, row_blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits, samples_per_split) for a kernel that sums over samples: each
    program owns a block of rows and a contiguous range of samples, and writes
    a partial sum that a second pass reduces in a fixed order (deterministic,
    no atomics). Enough splits to launch TARGET_PROGRAMS programs (one split
    under the interpreter)."""
    if samples <= 1 or device.type == "cpu":
        return 1, max(samples, 1)
    splits = min(samples, max(1, triton.cdiv(TARGET_PROGRAMS, max(row_blocks, 1))))
    per_split = triton.cdiv(samples, splits)
    return triton.cdiv(samples, per_split), per_split


def blocks(rows: int, cols: int, max_cols: int, tile: int = 4096) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) of a row-by-column tile of about ``tile``
    elements: as many columns as the rows have, up to max_cols, the rest of the
    tile to rows; independent of the number of rows (no recompilation per batch)."""
    cols_block = min(triton.next_power_of_2(max(cols, 1)), max_cols)
    return max(1, tile // cols_block), cols_block


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
