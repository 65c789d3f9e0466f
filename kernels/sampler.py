"""What the samplers' Triton kernels share (sample_normal, sample_location_scale,
sample_positive, sample_concrete): the folded Philox words of an element,
their open uniforms and Exp(1) variate, and the launch geometry of a sampler
over (K, N, L).

The uniforms (docs/architecture.md, "The RNG contract"): element i takes the
folded word x of lane i % 4 of Philox counter i // 4 and maps it into the
open (0, 1) from the integer, both u and v = 1 - u, so that the upper tail
keeps its bits. A family's kernels add only its transform and its density.

Geometry (docs/internals/triton.md): the forward tiles the K * N sample rows of z in
tiles of about FORWARD_TILE elements (rows x columns, columns in fours so that
a thread holds whole Philox counters), so a large-K evaluation of one example
is as parallel as a training batch. The backward owns BACKWARD_TILE
consecutive elements of the parameters, loops over the samples in registers
and, where the blocks alone do not fill a wave, splits the samples
(_common.split_samples, arrive_last).
"""
import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETER_BLOCK_ROWS,
    MAX_BLOCK_COLS,
    acc_dtype,
    accumulation_dtype,
    block_cols,
    cdiv,
    split_samples,
    tile_and_split,
    tile_counters,
)
from .philox import aligned

# Elements per forward program on a GPU (a quarter for float64): 8 float32
# values a thread per live tile at 8 warps. 4096 spilled in bfloat16 (ptxas,
# sm_90: 8-36 bytes, the noise's registers); 2048 spills in no dtype but float64.
FORWARD_TILE = 2048
# Elements of the parameters per backward program (a quarter for float64) at
# 8 warps; the sums over samples stay in registers.
BACKWARD_TILE = 2048
# Under the interpreter (CPU tensors) a program costs about 1 ms whatever its
# size: few, large programs.
INTERPRETER_BACKWARD_TILE = 1 << 16

# -- the words and their uniforms ----------------------------------------------


@triton.jit
def folded(bits):
    """The word as int32, negatives folded by ~x: an integer in [0, 2**31)."""
    x = bits.to(tl.int32, bitcast=True)
    return tl.where(x < 0, -x - 1, x)


@triton.jit
def words4(seed, counters):
    """The folded words of each Philox counter (..., 1) -> (..., 4): lane j at [..., j]."""
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    lane = tl.arange(0, 4)
    w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return folded(w)


@triton.jit
def words(seed, offsets):
    """The folded word at each int64 element offset (one Philox call each)."""
    w0, w1, w2, w3 = tl.randint4x(seed, offsets >> 2)
    lane = offsets & 3
    return folded(tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3))))


@triton.jit
def row_words(seed, first, g, j, ALIGNED: tl.constexpr):
    """The folded words of columns 4 g + j of rows whose first element's offset
    is ``first``: one Philox call per four elements where every row starts a
    counter (ALIGNED), one per element otherwise."""
    if ALIGNED:
        x = words4(seed, (first >> 2) + g)
    else:
        x = words(seed, first + 4 * g + j)
    return x


@triton.jit
def block_words(seed, base, start, g4, i, ALIGNED: tl.constexpr):
    """The folded words of a backward's block of elements i = start + 4 g4 + j
    in the sample whose noise starts at offset base: one Philox call per four
    elements where base + start starts a counter (ALIGNED), one per element
    otherwise."""
    if ALIGNED:
        x = words4(seed, ((base + start) >> 2) + g4)
    else:
        x = words(seed, base + i)
    return x


@triton.jit
def open_uniforms(x, ACC: tl.constexpr):
    """(u, v = 1 - u) of folded words, each from the integer: (x + 1/2) / 2**31
    and (2**31 - 1/2 - x) / 2**31. float32 in float32 arithmetic, at most
    1 - 2**-24, bit for bit the reference's and the C++ kernels'; float64 exact."""
    if ACC == tl.float64:
        u = (x.to(tl.float64) + 0.5) * 4.656612873077393e-10
        v = (2147483647.5 - x.to(tl.float64)) * 4.656612873077393e-10
    else:
        u = tl.minimum((x.to(tl.float32) + 0.5) * 4.656612873077393e-10, 0.9999999403953552)
        v = tl.minimum(((2147483647 - x).to(tl.float32) + 0.5) * 4.656612873077393e-10, 0.9999999403953552)
    return u, v


@triton.jit
def log1m(v):
    """log(1 - v) for v in (0, 1/2] to v's relative precision: log w corrected
    by the rounding of w = 1 - v (Goldberg), -v where w rounds to 1 (the
    interpreter has no log1p)."""
    w = 1.0 - v
    one = w == 1.0
    return tl.where(one, -v, tl.log(w) * (-v / tl.where(one, -1.0, w - 1.0)))


@triton.jit
def exp1(x, ACC: tl.constexpr):
    """The Exp(1) variate t = -log u of folded words x: -log1p(-v) above 1/2
    (decided on the integer), so that the upper tail keeps its bits."""
    u, v = open_uniforms(x, ACC)
    return tl.where(x < 1073741824, -tl.log(u), -log1m(v))


# -- a forward's tile of sample rows ---------------------------------------------


@triton.jit
def sample_rows(BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """(r, g, j) of the program: its BLOCK_R sample rows r = k * N + n (int64),
    and a block of columns as (BLOCK_L // 4, 4), column l0 + 4 g + j, so that
    where the rows start a Philox counter each thread holds whole counters."""
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    g = tl.arange(0, BLOCK_L // 4)[None, :, None]
    j = tl.arange(0, 4)[None, None, :]
    return r, g, j


@triton.jit
def family_rows(seed_ptr, N, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """(r, g, j, n, seed, log_q) of a forward's program: sample_rows, the
    parameter rows n of its sample rows r = k * N + n, the seed, and a zeroed
    ACC sum per row."""
    r, g, j = sample_rows(BLOCK_R, BLOCK_L)
    return r, g, j, r % N, tl.load(seed_ptr), tl.zeros([BLOCK_R], dtype=ACC)


@triton.jit
def noise_start(offset0, sample_stride, row_stride, r, n, N, l0):
    """The noise offset of column l0 of sample rows r = k * N + n, as (rows, 1, 1):
    offset0 + k * sample_stride + n * row_stride + l0."""
    return (offset0 + (r // N) * sample_stride + n * row_stride + l0)[:, None, None]


@triton.jit
def store_rows(ptr, r, val, R):
    """Stores the per-row val at ptr[r], in ptr's dtype, for the rows r < R."""
    tl.store(ptr + r, val.to(ptr.dtype.element_ty), mask=r < R)


@triton.jit
def row_columns(r, n, g, j, l0, KN, L, in_stride):
    """(cols, mask, idx) of the columns l0 + 4 g + j of sample rows r (of
    parameter rows n, in_stride elements apart): the columns, which of them
    lie in the K * N rows of L, and their parameters' index."""
    cols = l0 + 4 * g + j
    mask = (r[:, None, None] < KN) & (cols < L)
    idx = n[:, None, None] * in_stride + cols
    return cols, mask, idx


@triton.jit
def parameter_block(NL, L, K, K_PER, BLOCK: tl.constexpr):
    """(tile, split, k0, k1, start, g4, i, mask, n) of a backward's program:
    its block of BLOCK flat elements i = start + 4 g4 + j of the (N, L)
    parameters (as (BLOCK // 4, 4): whole Philox counters per thread), which
    of them lie in the N * L, their rows n, and its samples [k0, k1) of split
    ``split`` (_common.tile_and_split)."""
    tile, split, k0, k1 = tile_and_split(tl.cdiv(NL, BLOCK), K, K_PER)
    start = tile * BLOCK
    g4 = tl.arange(0, BLOCK // 4)[:, None]
    i = start + 4 * g4 + tl.arange(0, 4)[None, :]
    return tile, split, k0, k1, start, g4, i, i < NL, i // L


@triton.jit
def store_split_parts(part_ptr, split, SPLITS, NL, i, mask, a, b, c, d, HAS_C: tl.constexpr, HAS_D: tl.constexpr):
    """Stores a backward block's sums over its split's samples: a and b, and c
    and d where HAS_, each in its (SPLITS, N * L) slice of part_ptr."""
    part = split * NL + i
    tl.store(part_ptr + part, a, mask=mask)
    tl.store(part_ptr + SPLITS * NL + part, b, mask=mask)
    if HAS_C:
        tl.store(part_ptr + 2 * SPLITS * NL + part, c, mask=mask)
    if HAS_D:
        tl.store(part_ptr + 3 * SPLITS * NL + part, d, mask=mask)


@triton.jit
def sum_split_parts(part_ptr, SPLITS, NL, i, mask, HAS_C: tl.constexpr, HAS_D: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    """(a, b, c, d): the sums of store_split_parts' partials over every split,
    in split order (c and d 0 unless HAS_), read past the cache (.cg): the
    last program of a block to arrive (arrive_last) calls it."""
    sa = tl.zeros([BLOCK // 4, 4], dtype=ACC)
    sb = tl.zeros([BLOCK // 4, 4], dtype=ACC)
    sc = tl.zeros([BLOCK // 4, 4], dtype=ACC)
    sd = tl.zeros([BLOCK // 4, 4], dtype=ACC)
    for sp in range(0, SPLITS):
        at = sp * NL + i
        sa += tl.load(part_ptr + at, mask=mask, other=0.0, cache_modifier=".cg")
        sb += tl.load(part_ptr + SPLITS * NL + at, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_C:
            sc += tl.load(part_ptr + 2 * SPLITS * NL + at, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_D:
            sd += tl.load(part_ptr + 3 * SPLITS * NL + at, mask=mask, other=0.0, cache_modifier=".cg")
    return sa, sb, sc, sd


# -- launch geometry -----------------------------------------------------------


def forward_geometry(L: int, device: torch.device, fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_L, num_warps) of a sampler's forward from the row length
    only (no variant per batch size or K): columns in fours (whole Philox
    counters), up to MAX_BLOCK_COLS, and rows for a tile of about FORWARD_TILE
    elements (a quarter for float64, whose noise holds twice the registers) at
    8 warps, 4 for a smaller tile. Under the interpreter INTERPRETER_BLOCK_ROWS rows."""
    cols = max(4, block_cols(L, MAX_BLOCK_COLS))
    if device.type == "cpu":
        return INTERPRETER_BLOCK_ROWS, cols, 4
    tile = FORWARD_TILE // 4 if fp64 else FORWARD_TILE
    rows = max(1, tile // cols)
    return rows, cols, 8 if rows * cols >= tile else 4


def backward_geometry(device: torch.device, fp64: bool) -> tuple[int, int]:
    """(BLOCK, num_warps) of a sampler's backward: elements of the parameters per program."""
    if device.type == "cpu":
        return INTERPRETER_BACKWARD_TILE, 4
    return (BACKWARD_TILE // 4 if fp64 else BACKWARD_TILE), 8


def gradient_samples(grad_z, grad_log_q) -> int:
    """K of a backward: from whichever per-sample gradient is given, 0 with neither."""
    samples = grad_z if grad_z is not None else grad_log_q
    return 0 if samples is None else samples.shape[0]


# -- the launchers of a family sampler (two (N, L) parameters, a constexpr FAMILY) --


def family_forward_plan(K: int, N: int, L: int, dtype: torch.dtype, device: torch.device, family: int,
                        with_log_q: bool, offset0: int, sample_stride: int, row_stride: int) -> tuple[tuple, dict]:
    """(grid, compile-time parameters) of a family sampler's forward over (K, N,
    L), K * N * L > 0: what launch_family_forward launches, and the objectives'
    plans (fastvae/_plan.py) launch with the same variants."""
    BLOCK_R, BLOCK_L, warps = forward_geometry(L, device, dtype == torch.float64)
    meta = dict(FAMILY=int(family), ACC=acc_dtype(dtype), BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, WITH_LOG_Q=with_log_q,
                ALIGNED=aligned(offset0, sample_stride, row_stride), num_warps=warps)
    return (cdiv(K * N, BLOCK_R),), meta


def launch_family_forward(kernel, p0, p1, seed, family, offset0, sample_stride, row_stride, z, log_q) -> None:
    """z (K, N, L) and log_q (K, N) (None: not written) <- ``kernel`` of a family
    sampler over p0, p1 (N, L), the noise of z[k, n, l] at offset0 + k *
    sample_stride + n * row_stride + l."""
    K, N, L = z.shape
    if K * N == 0:
        return
    if L == 0:
        if log_q is not None:
            log_q.zero_()
        return
    with_log_q = log_q is not None
    grid, meta = family_forward_plan(K, N, L, p0.dtype, p0.device, family, with_log_q, offset0, sample_stride,
                                     row_stride)
    kernel[grid](p0, p1, seed, z, log_q if with_log_q else z, offset0, sample_stride, row_stride, N, K * N, L,
                 **meta)


def family_backward_plan(K: int, N: int, L: int, dtype: torch.dtype, device: torch.device, family: int,
                         has_grad_z: bool, has_grad_log_q: bool, stop_score: bool,
                         narrow: int = 1) -> tuple[tuple, dict, int, int, int]:
    """(grid, compile-time parameters, blocks, splits, samples per split) of a
    family sampler's backward over parameters (N, L), N * L > 0, and K
    samples; ``narrow``: the block divided so (a kernel that keeps more live)."""
    BLOCK, warps = backward_geometry(device, dtype == torch.float64)
    BLOCK //= narrow
    blocks = cdiv(N * L, BLOCK)
    splits, per_split = split_samples(blocks, K, device)
    meta = dict(FAMILY=int(family), HAS_GRAD_Z=has_grad_z, HAS_GRAD_Q=has_grad_log_q, STOP_SCORE=bool(stop_score),
                ACC=acc_dtype(dtype), BLOCK=BLOCK, ALIGNED=aligned(L), num_warps=warps)
    return (blocks * splits,), meta, blocks, splits, per_split


def family_split_buffers(sums: int, N: int, L: int, dtype: torch.dtype, device: torch.device, blocks: int,
                         splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial sums, arrival counters) of a family sampler's backward: each
    split's ``sums`` partial sums where the samples split, else placeholders
    the kernel never touches."""
    part = torch.empty((sums, splits, N * L) if splits > 1 else (1,), dtype=accumulation_dtype(dtype),
                       device=device)
    return part, tile_counters(device, blocks, splits)


def launch_family_backward(kernel, sums: int, grad_z, grad_log_q, p0, p1, seed, family, stop_score, d0,
                           d1) -> None:
    """d0, d1 (N, L) <- ``kernel`` of a family sampler given grad_z (K, N, L)
    and grad_log_q (K, N), each None when its output has no gradient; the
    samples split where the blocks alone do not fill a wave, each split's
    ``sums`` partial sums in a scratch buffer."""
    N, L = p0.shape
    if N * L == 0:
        return
    K = gradient_samples(grad_z, grad_log_q)
    grid, meta, blocks, splits, per_split = family_backward_plan(
        K, N, L, p0.dtype, p0.device, family, grad_z is not None, grad_log_q is not None, stop_score)
    part, counters = family_split_buffers(sums, N, L, p0.dtype, p0.device, blocks, splits)
    kernel[grid](
        grad_z if grad_z is not None else p0, grad_log_q if grad_log_q is not None else p0, p0, p1, seed, d0, d1,
        part, counters, N, L, N * L, K, per_split, splits, **meta,
    )
