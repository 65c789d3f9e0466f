"""The noise stream shared by every Triton kernel (and reproduced by csrc/philox.h
and fastvae.reference): Triton's Philox4x32-10 at the element's flat int64
offset, turned into a standard normal the way tl.randn does it."""
import triton
import triton.language as tl

# -- math helpers -----------------------------------------------------------


@triton.jit
def randn(seed, offsets, ACC: tl.constexpr):
    """tl.randn(seed, offsets), with log/sqrt/cos evaluated in ACC.

    For ACC = float32 this is tl.randn itself. For float64 the uniforms and
    theta are still the float32 values of the stream, so float32 and float64
    tensors see the same noise.
    """
    r0, r1, _, _ = tl.randint4x(seed, offsets)
    u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(r0))
    theta = 6.283185307179586 * tl.uint_to_uniform_float(r1)
    return tl.sqrt(-2.0 * tl.log(u1.to(ACC))) * tl.cos(theta.to(ACC))


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
    r0, r1, _, _ = tl.randint4x(tl.load(seed_ptr), offset0 + idx)
    tl.store(u1_ptr + idx, tl.uint_to_uniform_float(r0), mask=mask)
    tl.store(u2_ptr + idx, tl.uint_to_uniform_float(r1), mask=mask)


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
):
    # One program per (row, block of columns): a 1-d grid, because grid
    # dimensions 1 and 2 are capped at 65535 on CUDA and rows can exceed that.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    col = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = col < cols
    eps = randn(tl.load(seed_ptr), offset0 + row * row_stride + col, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * cols + col, eps, mask=mask)


# -- launchers ----------------------------------------------------------------


def uniform_fill(seed, offset0: int, u1, u2) -> None:
    """u1, u2 (n,) float32 <- the two uniforms behind each normal at offset0 + i."""
    n = u1.numel()
    BLOCK = 1024
    _uniform_kernel[(triton.cdiv(n, BLOCK),)](seed, u1, u2, offset0, n, BLOCK=BLOCK)


def randn_fill(seed, offset0: int, out, row_stride: int | None = None) -> None:
    """out (n,) <- randn(seed, offset0 + i); out (rows, cols) <- randn(seed,
    offset0 + r * row_stride + c), row_stride defaulting to cols. out is contiguous."""
    rows, cols = (1, out.shape[0]) if out.dim() == 1 else out.shape
    if row_stride is None:
        row_stride = cols
    BLOCK = 1024
    col_blocks = triton.cdiv(cols, BLOCK)
    if rows * col_blocks == 0:
        return
    _randn_kernel[(rows * col_blocks,)](seed, out, offset0, cols, row_stride, col_blocks, BLOCK=BLOCK)
