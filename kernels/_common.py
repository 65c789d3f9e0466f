"""What the Triton kernels share: the accumulation dtype, the launch geometry,
and the numerically safe softplus / sigmoid.

Geometry (docs/internals/triton.md). Tiles of a few thousand elements at 4-8
warps a program, so that each thread keeps several independent loads in
flight; at least one wave over an H100's 132 SMs where the problem has a tile
per SM, and fewer, full programs below that rather than many near-empty ones;
contiguous rows read 128 bits at a time. The rule is judged by measured
bandwidth, not by a program count (tests/test_aot.py checks warps, waves,
spills and 128-bit loads without a GPU). The kernels tile rows (a sample's row
of L or D values, or a column of log-weights) in blocks of rows and at most
MAX_BLOCK_COLS columns (longer rows loop). Block shapes depend only on the row
length, bucketed to a power of two, never on the number of rows, samples or
batch size: a training or evaluation run whose batch size or K varies compiles
no new variants. Row and sample counts are also exempt from Triton's integer
specialization (do_not_specialize), which would otherwise compile one variant
per divisibility class of the batch size.

TARGET_PROGRAMS and sample_splits are the earlier rule's (at least 2 programs
per SM): launchers still size their splits over samples with them.
"""
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for the launchers' host code, triton.cdiv's formula. Triton's
    own is a constexpr_function (from Triton 3.5), whose call from Python
    unwraps its arguments first: about 1.5 us a call on a development CPU,
    several of them a launch, against 0.04 us here."""
    return (x + (y - 1)) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for 0) for the launchers' host code,
    triton.next_power_of_2's value without its constexpr_function call (cdiv
    says why)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


# 2 programs per SM of an H100 (132 SMs): the fewest programs a reduction over
# samples is split into, so that even one row of data fills the GPU.
TARGET_PROGRAMS = 264
# Rows per program. Small enough that the smallest training shape the kernels
# are sized for (K = 5 samples of B = 256 rows) launches over 264 programs.
BLOCK_ROWS = 4
MAX_BLOCK_COLS = 1024


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fastvae's one accumulation rule: reductions and noise run in float64 for
    float64 inputs, else in float32 (never in half precision). The kernels keep
    their own copy so that they import nothing from the front end
    (fastvae._backend.accumulation_dtype states the same rule;
    tests/test_registry.py checks that the two agree)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_dtype(dtype: torch.dtype):
    """The Triton type of accumulation_dtype: float64 stays float64; bf16, fp16
    and fp32 accumulate in fp32."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


# Backward kernels keep accumulator tiles live across their loop over samples:
# half the columns per step keeps them in registers at 8 warps.
MAX_BLOCK_COLS_BACKWARD = 512


def block_cols(cols: int, max_cols: int = MAX_BLOCK_COLS) -> int:
    """Columns per inner step: the row length rounded up to a power of two, at
    most max_cols (longer rows loop)."""
    return min(next_power_of_2(max(cols, 1)), max_cols)


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
    splits = min(samples, max(1, cdiv(TARGET_PROGRAMS, max(row_blocks, 1))))
    per_split = cdiv(samples, splits)
    return cdiv(samples, per_split), per_split


def blocks(rows: int, cols: int, max_cols: int, tile: int = 4096) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) of a row-by-column tile of about ``tile``
    elements: as many columns as the rows have, up to max_cols, the rest of the
    tile to rows; independent of the number of rows (no recompilation per batch)."""
    cols_block = min(next_power_of_2(max(cols, 1)), max_cols)
    return max(1, tile // cols_block), cols_block


@triton.jit
def program_rows(BLOCK: tl.constexpr, R):
    """(rows, ok) of the program's tile of BLOCK consecutive rows (int64
    indices, so that row * D cannot overflow) and which of them lie in the R."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return rows, rows < R


@triton.jit
def sample_rows_of(BLOCK: tl.constexpr, KP, P, ACC: tl.constexpr):
    """(rows, ok, p, acc) of the program's tile of a (K, P) grid of rows
    (program_rows of the KP): the rows, which lie in the KP, each row's row
    p in P (the sample's data row), and a zeroed ACC sum per row."""
    rows, ok = program_rows(BLOCK, KP)
    return rows, ok, rows % P, tl.zeros([BLOCK], dtype=ACC)


@triton.jit
def load_tile(ptr, rows, cols, mask, C, ACC: tl.constexpr):
    """ptr[rows, cols] of a row-major tensor of C columns, in ACC; 0 outside mask."""
    return tl.load(ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def store_tile(ptr, rows, cols, val, mask, C):
    """Stores val at ptr[rows, cols] of a row-major tensor of C columns, in its dtype, where mask."""
    tl.store(ptr + rows[:, None] * C + cols[None, :], val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_layout(ptr, r, p, cols, mask, D, S, LAYOUT: tl.constexpr, ACC: tl.constexpr):
    """A decoder parameter at cols, in ACC, per its scale_layout: LAYOUT 0 one
    per decoder row r (rows S apart), 1 one per data row p (rows D apart),
    2 one per column."""
    if LAYOUT == 0:
        return load_tile(ptr, r, cols, mask, S, ACC)
    elif LAYOUT == 1:
        return load_tile(ptr, p, cols, mask, D, ACC)
    else:
        return tl.load(ptr + cols, mask=cols < D, other=0.0).to(ACC)[None, :]


@triton.jit
def tile_columns(c0, C, row_ok, BLOCK: tl.constexpr):
    """(cols, mask) of the BLOCK columns from c0 of a row tile: the columns,
    and which elements lie in a valid row and in the C columns."""
    cols = c0 + tl.arange(0, BLOCK)
    return cols, row_ok[:, None] & (cols < C)[None, :]


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


# -- one launch a pass ------------------------------------------------------------

# One program per SM of an H100: a backward whose tiles over rows reach this
# many programs loops over every sample in one program (no split over samples).
WAVE_PROGRAMS = 132
# Tests set this to force a split over samples under the interpreter too.
FORCE_SPLITS: int | None = None


def tile_geometry(cols: int, device: torch.device, fp64: bool, tile: int = 4096,
                  max_cols: int = MAX_BLOCK_COLS) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of a row-by-column tile of about ``tile``
    elements (a quarter for float64), from the row length only (no variant
    per batch size): 8 warps for 4096 float32 or 1024 float64 elements, 4
    below. Under the interpreter (cpu) programs take INTERPRETER_BLOCK_ROWS rows."""
    if device.type == "cpu":
        return INTERPRETER_BLOCK_ROWS, block_cols(cols, max_cols), 4
    tile = tile // 4 if fp64 else tile  # float64 math (libdevice log, exp) holds twice the registers
    rows, cols_block = blocks(1, cols, max_cols, tile)
    tile_bytes = rows * cols_block * (8 if fp64 else 4)
    return rows, cols_block, 8 if tile_bytes >= (8192 if fp64 else 16384) else 4


def split_samples(tiles: int, samples: int, device: torch.device) -> tuple[int, int]:
    """(splits, samples_per_split) of a backward whose programs own a tile and
    loop over samples: one split (every sample in one program, the final
    gradient written directly) where the tiles fill a wave or under the
    interpreter; else enough splits for TARGET_PROGRAMS programs, whose
    partial sums the last program of each tile to finish adds in split order
    (deterministic; see arrive_last)."""
    if FORCE_SPLITS is not None and samples > 1:
        splits = min(samples, FORCE_SPLITS)
    elif device.type == "cpu" or samples <= 1 or tiles >= WAVE_PROGRAMS:
        return 1, max(samples, 1)
    else:
        splits = min(samples, cdiv(TARGET_PROGRAMS, max(tiles, 1)))
    per_split = cdiv(samples, splits)
    return cdiv(samples, per_split), per_split


_COUNTERS: dict = {}


def tile_counters(device: torch.device, n: int, splits: int = 2) -> torch.Tensor:
    """A zeroed int32 buffer of at least n arrival counters, made once per
    device and stream (and grown by doubling): every kernel that counts
    arrivals sets its counters back to 0 when the last program arrives, so
    the buffer is zero before and after each launch and needs no fill per call.
    With splits <= 1 (nothing split) an int32 placeholder the kernel never touches."""
    if splits <= 1:
        return torch.empty((1,), dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 2 * (0 if buf is None else buf.numel()), 64), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


@triton.jit
def tile_and_split(tiles, K, K_PER):
    """The one prologue of every backward split over samples (split_samples):
    the grid is tiles x splits, tiles fastest; (tile, split, k0, k1), this
    program's samples being k0 <= k < k1 (int64)."""
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles
    split = pid // tiles
    k0 = split * K_PER
    k1 = tl.minimum(k0 + K_PER, K)
    return tile, split, k0, k1


@triton.jit
def split_block(BLOCK: tl.constexpr, N):
    """(block, split, idx, ok) of a program of a flat grid of blocks x splits,
    blocks fastest (one grid dimension: a GPU's second and third allow only
    65535 programs): its block of BLOCK of the N indices, its split, the
    block's int64 indices and which of them lie in the N."""
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(N, BLOCK)
    block = pid % blocks
    split = pid // blocks
    idx = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return block, split, idx, idx < N


@triton.jit
def split_tile(R, C, K, K_PER, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The prologue of a backward program that owns a tile of R rows x C
    columns and a split of the samples (the grid is tiles x splits, tiles
    fastest; split_samples): (tile, split, rows, cols, row_ok, col_ok, mask,
    k0, k1), the program's samples being k0 <= k < k1. Rows are int64 (row
    offsets times a sample's size overflow int32)."""
    col_blocks = tl.cdiv(C, BLOCK_C)
    tile, split, k0, k1 = tile_and_split(tl.cdiv(R, BLOCK_R) * col_blocks, K, K_PER)
    rows = (tile // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = (tile % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    return tile, split, rows, cols, row_ok, col_ok, mask, k0, k1


@triton.jit
def tile_blocks(tile, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(row_blocks, tiles, rb, cb) of split_tile's tile of an (R, C) matrix:
    the row blocks, the tiles, and the tile's row and column block, as
    store_column_sum takes them."""
    col_blocks = tl.cdiv(C, BLOCK_C)
    row_blocks = tl.cdiv(R, BLOCK_R)
    return row_blocks, row_blocks * col_blocks, tile // col_blocks, tile % col_blocks


@triton.jit
def arrive_last(counter_ptr, splits):
    """Called by every program of a tile after it stored its partial sums: True
    in the one program that arrives last (which then adds the partials in split
    order) and resets the tile's counter to 0 for the next launch. The barrier
    orders the whole program's stores before the gpu-scope acq_rel atomic (the
    cooperative-groups grid-sync pattern); the second orders the winner's reads
    of the other programs' partials after it."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == splits - 1
    tl.atomic_xchg(counter_ptr, 0, mask=last, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    return last


@triton.jit
def store_split_sums(a, b, a_ptr, b_ptr, part_a_ptr, part_b_ptr, at, mask, split, R, C, counter_ptr, tile, SPLITS,
                     HAS_A: tl.constexpr, HAS_B: tl.constexpr):
    """Stores a tile's sums over samples a and b (ACC; each where HAS_ it) at
    ``at`` of a_ptr and b_ptr, (R, C) matrices. With one split straight;
    otherwise each split stores its partials (part_*_ptr, one (R, C) matrix
    per split) and the last of the tile's programs to arrive (its counter
    counter_ptr[tile]) adds them in split order: deterministic, no float
    atomics."""
    if SPLITS == 1:
        if HAS_A:
            tl.store(a_ptr + at, a.to(a_ptr.dtype.element_ty), mask=mask)
        if HAS_B:
            tl.store(b_ptr + at, b.to(b_ptr.dtype.element_ty), mask=mask)
    else:
        part = split * R * C + at
        if HAS_A:
            tl.store(part_a_ptr + part, a, mask=mask)
        if HAS_B:
            tl.store(part_b_ptr + part, b, mask=mask)
        if arrive_last(counter_ptr + tile, SPLITS):
            a_sum = tl.zeros_like(a)
            b_sum = tl.zeros_like(b)
            for s in range(0, SPLITS):
                if HAS_A:
                    a_sum += tl.load(part_a_ptr + s * R * C + at, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_B:
                    b_sum += tl.load(part_b_ptr + s * R * C + at, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_A:
                tl.store(a_ptr + at, a_sum.to(a_ptr.dtype.element_ty), mask=mask)
            if HAS_B:
                tl.store(b_ptr + at, b_sum.to(b_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_column_sum(col, cols, col_ok, D, out_ptr, part_ptr, counter_ptr, tiles, cb, rb, row_blocks, split, SPLITS,
                     ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stores a sum over every row of column block cb: ``col`` (ACC), the
    share of this program (row block rb of row_blocks, a split of SPLITS),
    goes to out_ptr[cols] when it is the only one; otherwise to its row of
    the (row_blocks * SPLITS, D) partials, and the last of the column block's
    programs to arrive (its counter counter_ptr[tiles + cb], after the tiles')
    adds them in row order."""
    parts = row_blocks * SPLITS
    if parts == 1:
        tl.store(out_ptr + cols, col.to(out_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(part_ptr + (split * row_blocks + rb) * D + cols, col, mask=col_ok)
        if arrive_last(counter_ptr + tiles + cb, parts):
            total = tl.zeros([BLOCK_D], dtype=ACC)
            for j in range(0, parts):
                total += tl.load(part_ptr + j * D + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def store_scale_sums(dx, dp_row, dp_col, dx_ptr, dp_ptr, part_dx_ptr, part_dp_ptr, counter_ptr, rows, cols, col_ok,
                     mask, tile, split, R, D, SPLITS, LAYOUT: tl.constexpr, HAS_DX: tl.constexpr,
                     HAS_DP: tl.constexpr, TILE_SUMS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """The end of a location-scale likelihood's backward program of
    scale_backward_plan: its tile's sums over samples, dx and a per-row
    (LAYOUT 1) scale parameter's gradient dp_row, stored (store_split_sums),
    and a per-dimension (LAYOUT 2) one's share dp_col of its column block,
    added over the row blocks (store_column_sum). dp_row and dp_col are read
    only where the layout and HAS_DP have them (anything fills them
    otherwise)."""
    if TILE_SUMS:
        store_split_sums(dx, dp_row, dx_ptr, dp_ptr, part_dx_ptr, part_dp_ptr, rows[:, None] * D + cols[None, :], mask,
                         split, R, D, counter_ptr, tile, SPLITS, HAS_DX, LAYOUT == 1 and HAS_DP)
    if LAYOUT == 2 and HAS_DP:
        row_blocks, tiles, rb, cb = tile_blocks(tile, R, D, BLOCK_R, BLOCK_D)
        store_column_sum(dp_col, cols, col_ok, D, dp_ptr, part_dp_ptr, counter_ptr, tiles, cb, rb, row_blocks, split,
                         SPLITS, ACC, BLOCK_D)


# -- the objectives' bound, fused into the kernels that finish it -------------------
# fastvae.elbo / fastvae.iwae combine each row's log-likelihood with a latent
# term (- beta KL, or + the latent log-ratio) and reduce the rows to a mean or
# a sum. On the plans' path (fastvae/_plan.py) the likelihood and log-mean-exp
# kernels do that in their epilogue instead of three torch ops after them (a
# subtraction, a mean, and in the backward a division), each a launch and
# about 10 us of host time on a GPU. TERM and REDUCE are
# compile-time switches: off, the epilogue is the plain store the kernels
# always made, so the ops' own launches are unchanged. The rows' sum is
# deterministic: each program stores its partial sum, and the last to arrive
# (arrive_last) adds them in program order.

# Partial sums the finishing program reads at a time.
BOUND_BLOCK = tl.constexpr(1024)


def float64_bits(value: float) -> int:
    """The bits of ``value`` as a float64, as an int64 kernel argument (a
    bound's weight -beta, the Gaussian's variance floor): Triton passes a Python
    float as float32, which would round it for a float64 kernel; a new value
    compiles nothing and makes no tensor."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


@triton.jit
def float64_arg(bits, ACC: tl.constexpr):
    """The float64 whose bits are ``bits`` (float64_bits), in ACC."""
    return tl.cast(bits, tl.float64, bitcast=True).to(ACC)


@triton.jit
def bound_epilogue(val, rows, row_ok, out_ptr, term_ptr, term_bits, part_ptr, counter_ptr, divisor,
                   TERM: tl.constexpr, REDUCE: tl.constexpr, ACC: tl.constexpr):
    """Finishes this program's rows of ``val`` (ACC): with TERM adds
    w * term[rows] (w the float64 of term_bits); then stores them to
    out_ptr[rows], or with REDUCE adds them into out_ptr[0], a scalar: their
    sum over every program's rows, divided by ``divisor`` (the row count for a
    mean, 1 for a sum). part_ptr holds one ACC partial sum per program and
    counter_ptr one zeroed arrival counter (tile_counters)."""
    if TERM:
        val += float64_arg(term_bits, ACC) * tl.load(term_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    if REDUCE:
        tl.store(part_ptr + tl.program_id(0), tl.sum(tl.where(row_ok, val, 0.0), axis=0))
        programs = tl.num_programs(0)
        if arrive_last(counter_ptr, programs):
            total = tl.zeros([BOUND_BLOCK], dtype=ACC)
            for i in range(0, programs, BOUND_BLOCK):
                j = i + tl.arange(0, BOUND_BLOCK)
                total += tl.load(part_ptr + j, mask=j < programs, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr, (tl.sum(total, axis=0) / divisor).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + rows, val.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def bound_grad(grad_ptr, rows, row_ok, divisor, G_SCALAR: tl.constexpr, ACC: tl.constexpr):
    """The gradient of each row's value: grad_ptr[rows], or with G_SCALAR the
    reduced bound's gradient grad_ptr[0] / divisor (bound_epilogue's REDUCE)."""
    if G_SCALAR:
        return tl.load(grad_ptr + rows * 0, mask=row_ok, other=0.0).to(ACC) / divisor
    return tl.load(grad_ptr + rows, mask=row_ok, other=0.0).to(ACC)


@triton.jit
def store_dterm(g, rows, row_ok, col_block, dterm_ptr, term_bits, ACC: tl.constexpr):
    """The latent term's gradient w * g at rows (bound_epilogue's TERM, w the
    float64 of term_bits), stored by the programs of the first column block
    (col_block 0) alone."""
    first = (rows * 0 + col_block) == 0  # a tensor mask
    tl.store(dterm_ptr + rows, (float64_arg(term_bits, ACC) * g).to(dterm_ptr.dtype.element_ty),
             mask=row_ok & first)


def bound_parts(programs: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The REDUCE epilogue's partial sums: one accumulation-dtype slot a program."""
    return torch.empty((max(programs, 1),), dtype=accumulation_dtype(dtype), device=device)


def bound_buffers(programs: int, dtype: torch.dtype, out: torch.Tensor, reduce: bool):
    """(partial sums, arrival counter) of a launch with bound_epilogue: with
    REDUCE fresh partials and the stream's counter; else ``out`` twice, a
    placeholder the kernel never touches (no allocation per call)."""
    if not reduce:
        return out, out
    return bound_parts(programs, dtype, out.device), tile_counters(out.device, 1)


# -- the location-scale likelihoods' backward (gaussian_log_prob, laplace_log_prob) --
# The scale parameter's layouts: per element, per x row, per dimension.
ELEMENT, ROW, DIM = 0, 1, 2
# Backward tiles where programs loop over samples: the sums stay live across the loop.
SCALE_BACKWARD_TILE = 1024
SCALE_BACKWARD_MAX_COLS = 256


def scale_layout(param: torch.Tensor) -> int:
    """The layout of a scale parameter (K, P, D), (P, D) or (D,)."""
    return {3: ELEMENT, 2: ROW, 1: DIM}[param.dim()]


class ScaleBackward(NamedTuple):
    """The shapes' part of a location-scale likelihood's backward launch
    (scale_backward_geometry): the grid; the shapes of the splits' partial
    dx and parameter gradients, in the accumulation dtype ((1,): a
    placeholder the kernel never touches); the arrival counters tile_counters
    hands out (n, splits); the kernel's (R, K, K_PER, SPLITS); its meta."""

    grid: tuple[int]
    part_dx_shape: tuple[int, ...]
    part_dparam_shape: tuple[int, ...]
    counters: tuple[int, int]
    ints: tuple[int, int, int, int]
    meta: dict


def scale_backward_geometry(K: int, P: int, D: int, layout: int, has_dx: bool, has_dparam: bool,
                            dtype: torch.dtype, device: torch.device) -> ScaleBackward:
    """The launch of a location-scale likelihood's backward for a decoder
    output (K, P, D) of ``dtype`` on ``device``, without its buffers (an op's
    plan works it out once per call signature; scale_backward_plan allocates
    them). Where nothing sums over the samples (no dx, a per-element or no
    parameter gradient) the programs tile the K * P decoder rows; otherwise
    each owns a tile of x's rows x columns and loops over the samples, split
    where the tiles do not fill a wave (split_samples), with the splits'
    partial dx and per-row parameter gradients in part_dx and part_dparam. A
    per-dimension gradient's partials, one per row block and split, go to
    part_dparam too."""
    loop_k = has_dx or (has_dparam and layout != ELEMENT)
    BLOCK_R, BLOCK_D, warps = tile_geometry(D, device, dtype == torch.float64,
                                            SCALE_BACKWARD_TILE if loop_k else 4096,
                                            SCALE_BACKWARD_MAX_COLS if loop_k else 1024)
    R, k_loop = (P, K) if loop_k else (K * P, 1)
    row_blocks, col_blocks = cdiv(R, BLOCK_R), cdiv(D, BLOCK_D)
    tiles = row_blocks * col_blocks
    splits, per_split = split_samples(tiles, K, device) if loop_k else (1, 1)
    tile_sums = has_dx or (has_dparam and layout == ROW)
    part_dx = (splits, P, D) if has_dx and splits > 1 else (1,)
    if has_dparam and layout == ROW and splits > 1:
        part_dparam = (splits, P, D)
    elif has_dparam and layout == DIM and row_blocks * splits > 1:
        part_dparam = (row_blocks * splits, D)
    else:
        part_dparam = (1,)
    counting = (tile_sums and splits > 1) or (has_dparam and layout == DIM and row_blocks * splits > 1)
    meta = dict(LAYOUT=layout, HAS_DX=has_dx, LOOP_K=loop_k, TILE_SUMS=tile_sums, ACC=acc_dtype(dtype),
                BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps)
    return ScaleBackward((tiles * splits,), part_dx, part_dparam, (tiles + col_blocks, 2 if counting else 1),
                         (R, k_loop, per_split, splits), meta)


def scale_backward_plan(K: int, P: int, D: int, layout: int, has_dx: bool, has_dparam: bool, like: torch.Tensor):
    """scale_backward_geometry's launch for a decoder output ``like`` (K, P,
    D), with its buffers: (grid, part_dx, part_dparam, counters, ints, meta),
    ``ints`` the kernel's (R, K, K_PER, SPLITS), ``meta`` its LAYOUT, HAS_DX,
    LOOP_K, TILE_SUMS, ACC, blocks and warps."""
    g = scale_backward_geometry(K, P, D, layout, has_dx, has_dparam, like.dtype, like.device)
    acc, device = accumulation_dtype(like.dtype), like.device
    part_dx = torch.empty(g.part_dx_shape, dtype=acc, device=device)
    part_dparam = torch.empty(g.part_dparam_shape, dtype=acc, device=device)
    return g.grid, part_dx, part_dparam, tile_counters(device, *g.counters), g.ints, g.meta
