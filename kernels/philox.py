"""The noise stream shared by every Triton kernel (and reproduced by csrc/philox.h
and fastvae.reference): element offset i is lane i % 4 of Box-Muller on the
four words of Philox4x32-10 counter i // 4 (tl.randint4x), the noise contract
of docs/architecture.md.

Two ways to draw it: ``randn`` for any offsets (one Philox call per element,
of which one lane is kept), and ``randn4`` for runs that start at an offset
divisible by 4 (one call per four elements, all lanes kept). Kernels take the
second where their launcher can prove the alignment (an ``ALIGNED``
constexpr).
"""
import triton
import triton.language as tl

from ._common import cdiv

# -- math helpers -----------------------------------------------------------


@triton.jit
def _cos_sin_turns(u):
    """cos and sin of 2 pi u for u in [0, 1], float32, as csrc/philox.h does it:
    the reduction in turns is exact (4u - round(4u)), so no Payne-Hanek path;
    Cephes polynomials on [-pi/4, pi/4], then a quarter-turn rotation."""
    q = tl.floor(4.0 * u + 0.5)
    x = (4.0 * u - q) * 1.5707963267948966
    z = x * x
    c = 1.0 - 0.5 * z + z * z * ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2)
    s = x + x * z * ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1)
    k = q.to(tl.int32) & 3
    odd = (k & 1) == 1
    cc = tl.where(odd, s, c)
    ss = tl.where(odd, c, s)
    return tl.where((k == 1) | (k == 2), -cc, cc), tl.where(k >= 2, -ss, ss)


@triton.jit
def _uniform64(bits):
    """(x + 1/2) / 2**31 for the word's folded int32 x: exact in float64, in (0, 1)."""
    x = bits.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    return (x.to(tl.float64) + 0.5) * 4.656612873077393e-10


@triton.jit
def _box_muller(a, b, ACC: tl.constexpr):
    """(r cos 2 pi u2, r sin 2 pi u2), r = sqrt(-2 log u1), from two words. float32:
    Triton's uniforms with u1 clamped to 1e-7 (tl.randn4x's); float64: the exact
    uniforms of _uniform64 and libdevice's cos and sin."""
    if ACC == tl.float64:
        r = tl.sqrt(-2.0 * tl.log(_uniform64(a)))
        theta = 6.283185307179586 * _uniform64(b)
        return r * tl.cos(theta), r * tl.sin(theta)
    else:
        r = tl.sqrt(-2.0 * tl.log(tl.maximum(1.0e-7, tl.uint_to_uniform_float(a))))
        c, s = _cos_sin_turns(tl.uint_to_uniform_float(b))
        return r * c, r * s


@triton.jit
def randn(seed, offsets, ACC: tl.constexpr):
    """The normal at each int64 element offset, in ACC (float32 or float64):
    one Philox call per element. Prefer randn4 where runs are aligned."""
    w0, w1, w2, w3 = tl.randint4x(seed, offsets >> 2)
    lane = offsets & 3
    second = lane >= 2
    c, s = _box_muller(tl.where(second, w2, w0), tl.where(second, w3, w1), ACC)
    return tl.where((lane & 1) == 1, s, c)


@triton.jit
def randn4(seed, counters, ACC: tl.constexpr):
    """The four normals of each Philox counter: counters (..., 1) int64 ->
    (..., 4), [..., j] = lane j, the normal at element offset 4 * counter + j.

    Kernels lay a run of 4G elements that starts at an offset divisible by 4
    out as a (..., G, 4) tile: each thread then holds whole counters, so a
    Philox call serves four elements and the lanes need no data movement
    (tl.join and a reshape to 1-d cost shared-memory round trips)."""
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    n0, n1 = _box_muller(w0, w1, ACC)
    n2, n3 = _box_muller(w2, w3, ACC)
    lane = tl.arange(0, 4)
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


# -- kernels ------------------------------------------------------------------


@triton.jit
def _uniform_kernel(
    seed_ptr,  # (): int64
    u1_ptr,  # (n,): float32
    u2_ptr,  # (n,): float32
    offset0,  # first Philox offset
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    offsets = offset0 + idx
    w0, w1, w2, w3 = tl.randint4x(tl.load(seed_ptr), offsets >> 2)
    second = (offsets & 3) >= 2
    tl.store(u1_ptr + idx, tl.uint_to_uniform_float(tl.where(second, w2, w0)), mask=mask)
    tl.store(u2_ptr + idx, tl.uint_to_uniform_float(tl.where(second, w3, w1)), mask=mask)


# offsets, strides and widths vary with the evaluation chunk: no variant per
# divisibility class of them
@triton.jit(do_not_specialize=["offset0", "cols", "row_stride", "col_blocks"])
def _randn_kernel(
    seed_ptr,  # (): int64
    out_ptr,  # (rows, cols): float32 or float64, contiguous
    offset0,  # Philox offset of out[0, 0]
    cols,
    row_stride,  # Philox offsets between the starts of consecutive rows
    col_blocks,  # cdiv(cols, BLOCK)
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # offset0, row_stride and cols divisible by 4
):
    # One program per (row, block of columns): a 1-d grid, because grid
    # dimensions 1 and 2 are capped at 65535 on CUDA and rows can exceed that.
    pid = tl.program_id(0).to(tl.int64)
    if ALIGNED:  # no-ops that show the compiler the alignment: 128-bit stores
        cols = cols // 4 * 4
    row = pid // col_blocks
    c0 = (pid % col_blocks) * BLOCK
    seed = tl.load(seed_ptr)
    first = offset0 + row * row_stride + c0
    # the block as (BLOCK // 4, 4): column c0 + 4g + j
    g = tl.arange(0, BLOCK // 4)[:, None]
    j = tl.arange(0, 4)[None, :]
    col = c0 + 4 * g + j
    if ALIGNED:
        eps = randn4(seed, (first >> 2) + g, out_ptr.dtype.element_ty)
    else:
        eps = randn(seed, first + 4 * g + j, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * cols + col, eps, mask=col < cols)


# -- launchers ----------------------------------------------------------------


def aligned(*offsets: int) -> bool:
    """Whether runs starting at these offsets (and sums of them) begin a Philox counter."""
    return all(o % 4 == 0 for o in offsets)


def uniform_fill(seed, offset0: int, u1, u2) -> None:
    """u1, u2 (n,) float32 <- the two uniforms behind each normal at offset0 + i."""
    n = u1.numel()
    BLOCK = 1024
    _uniform_kernel[(cdiv(n, BLOCK),)](seed, u1, u2, offset0, n, BLOCK=BLOCK)


def randn_fill(seed, offset0: int, out, row_stride: int | None = None) -> None:
    """out (n,) <- randn(seed, offset0 + i); out (rows, cols) <- randn(seed,
    offset0 + r * row_stride + c), row_stride defaulting to cols. out is contiguous."""
    rows, cols = (1, out.shape[0]) if out.dim() == 1 else out.shape
    if row_stride is None:
        row_stride = cols
    BLOCK = 1024
    col_blocks = cdiv(cols, BLOCK)
    if rows * col_blocks == 0:
        return
    _randn_kernel[(rows * col_blocks,)](seed, out, offset0, cols, row_stride, col_blocks, BLOCK=BLOCK,
                                        ALIGNED=aligned(offset0, row_stride, cols))
