"""Triton kernels of the importance-weighting ops over the K rows of (K, M)
log-weights: the column states (max, sumexp) with logmeanexp and the
effective sample size, the elementwise e * (a + b e) pass behind the
gradients and the normalized weights, and the softmax backward.

Layout: lw, dlw, w, grad_w (K, M) contiguous, reduced down the columns; the
per-column vectors (M,). Programs tile BLOCK_K rows x BLOCK_M contiguous
columns (coalesced along M).

The forward streams K with an online running max and sum per column (one
read of lw, no second K-sized buffer). A column's K can also be split over
SPLITS programs, each leaving its partial state in a (SPLITS, M) buffer that a
second, small kernel merges with the associative rule: that keeps a GPU busy
when M is small and K large (e.g. K = 5000 samples of 512 examples).
"""
import torch
import triton
import triton.language as tl

from ._common import TARGET_PROGRAMS, acc_dtype, blocks

MAX_BLOCK_M = 128  # columns per tile; the rest of the tile goes to rows
CHUNKS_PER_SPLIT = 16  # a K-split folds at most this many tiles before the merge

# -- math helpers ---------------------------------------------------------------


@triton.jit
def _shift(m):
    # exponent shift of a column: its max when finite, else 0, so that
    # exp(lw - shift) is never exp(-inf - (-inf)) = NaN
    return tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)


@triton.jit
def _rescale(m_old, m_new):
    # moves a sum kept at shift(m_old) to shift(m_new); an empty state
    # (m_old = -inf) has sum 0, or NaN, which the factor 0 keeps
    return tl.where(m_old == float("-inf"), 0.0, tl.exp(_shift(m_old) - _shift(m_new)))


# -- kernels ----------------------------------------------------------------------


@triton.jit
def _logmeanexp_partial_kernel(
    lw_ptr,  # (K, M)
    part_m_ptr,  # (SPLITS, M): ACC
    part_s_ptr,  # (SPLITS, M): ACC
    part_s2_ptr,  # (SPLITS, M): ACC, unused unless HAS_S2
    K,
    M,
    ROWS_PER_SPLIT,  # rows of lw folded by one split (a multiple of BLOCK_K)
    HAS_S2: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # one flat grid dimension: a GPU's second and third allow only 65535 programs
    pid = tl.program_id(0).to(tl.int64)
    n_col_blocks = tl.cdiv(M, BLOCK_M)
    pid_m = pid % n_col_blocks
    split = pid // n_col_blocks
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    col_ok = cols < M
    k_begin = split * ROWS_PER_SPLIT
    k_end = tl.minimum(k_begin + ROWS_PER_SPLIT, K)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], dtype=ACC)
    s2 = tl.zeros([BLOCK_M], dtype=ACC)
    for k0 in range(k_begin, k_end, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = (rows < k_end)[:, None] & col_ok[None, :]
        x = tl.load(lw_ptr + rows[:, None] * M + cols[None, :], mask=mask, other=float("-inf")).to(ACC)
        # NaN never becomes the max (GPU and interpreter max differ on NaN);
        # it still reaches the sum below, which it turns into NaN
        m_new = tl.maximum(m, tl.max(tl.where(x == x, x, float("-inf")), axis=0))
        f = _rescale(m, m_new)
        e = tl.exp(x - _shift(m_new)[None, :])
        s = s * f + tl.sum(e, axis=0)
        if HAS_S2:
            s2 = s2 * (f * f) + tl.sum(e * e, axis=0)
        m = m_new
    out = split * M + cols
    tl.store(part_m_ptr + out, m, mask=col_ok)
    tl.store(part_s_ptr + out, s, mask=col_ok)
    if HAS_S2:
        tl.store(part_s2_ptr + out, s2, mask=col_ok)


@triton.jit
def _logmeanexp_finish_kernel(
    part_m_ptr,  # (SPLITS, M): ACC
    part_s_ptr,  # (SPLITS, M): ACC
    part_s2_ptr,  # (SPLITS, M): ACC, unused unless HAS_ESS
    max_ptr,  # (M,): ACC
    sumexp_ptr,  # (M,): ACC
    out_ptr,  # (M,), unused unless HAS_OUT
    ess_ptr,  # (M,), unused unless HAS_ESS
    K,
    M,
    SPLITS,
    HAS_OUT: tl.constexpr,
    HAS_ESS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    col_ok = cols < M
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], dtype=ACC)
    s2 = tl.zeros([BLOCK_M], dtype=ACC)
    idx = cols  # int64, advanced by M per split
    for _ in range(0, SPLITS):
        pm = tl.load(part_m_ptr + idx, mask=col_ok, other=float("-inf"))
        ps = tl.load(part_s_ptr + idx, mask=col_ok, other=0.0)
        m_new = tl.maximum(m, pm)
        fa = _rescale(m, m_new)
        fb = _rescale(pm, m_new)
        s = s * fa + ps * fb
        if HAS_ESS:
            ps2 = tl.load(part_s2_ptr + idx, mask=col_ok, other=0.0)
            s2 = s2 * (fa * fa) + ps2 * (fb * fb)
        m = m_new
        idx += M
    tl.store(max_ptr + cols, m, mask=col_ok)
    tl.store(sumexp_ptr + cols, s, mask=col_ok)
    if HAS_OUT:
        # log(0) = -inf for an empty column; shift 0 keeps it -inf, not NaN
        # K + zeros: K may arrive as a constexpr (Triton specializes K = 1)
        out = _shift(m) + tl.log(s) - tl.log(tl.zeros([BLOCK_M], dtype=ACC) + K)
        tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)
    if HAS_ESS:
        ess = tl.where(s == 0.0, 0.0, s * s / tl.where(s == 0.0, 1.0, s2))
        tl.store(ess_ptr + cols, ess.to(ess_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _logmeanexp_bwd_kernel(
    lw_ptr,  # (K, M)
    max_ptr,  # (M,): ACC
    sumexp_ptr,  # (M,): ACC
    g_ptr,  # (M,)
    g_sumexp_ptr,  # (M,), unused unless HAS_G_SUMEXP
    ess_ptr,  # (M,), unused unless HAS_ESS
    dlw_ptr,  # (K, M)
    K,
    M,
    HAS_G_SUMEXP: tl.constexpr,
    HAS_ESS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # flat, as in the partial kernel
    n_col_blocks = tl.cdiv(M, BLOCK_M)
    pid_m = pid % n_col_blocks
    pid_k = pid // n_col_blocks
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    col_ok = cols < M
    mask = (rows < K)[:, None] & col_ok[None, :]
    m = tl.load(max_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    s = tl.load(sumexp_ptr + cols, mask=col_ok, other=1.0).to(ACC)
    g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    # 1 / sumexp, 0 for an empty column (whose e are all 0): no 0 * inf
    inv = tl.where(s == 0.0, 0.0, 1.0 / tl.where(s == 0.0, 1.0, s))
    if HAS_ESS:
        ess = tl.load(ess_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        a = 2.0 * g * ess * inv
        ab = -a * ess * inv
    else:
        a = g * inv
        if HAS_G_SUMEXP:
            a += tl.load(g_sumexp_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        ab = tl.zeros_like(a)
    idx = rows[:, None] * M + cols[None, :]
    x = tl.load(lw_ptr + idx, mask=mask, other=float("-inf")).to(ACC)
    # shift by the max itself unless it is -inf: with a +inf max (1 / sumexp = 0)
    # finite lw give 0 and the +inf one NaN, as torch.logsumexp's gradient
    e = tl.exp(x - tl.where(m == float("-inf"), 0.0, m)[None, :])
    d = e * (a[None, :] + ab[None, :] * e)
    tl.store(dlw_ptr + idx, d.to(dlw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _importance_weights_bwd_kernel(
    gw_ptr,  # (K, M)
    w_ptr,  # (K, M)
    dlw_ptr,  # (K, M)
    K,
    M,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    col_ok = cols < M
    dot = tl.zeros([BLOCK_M], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = (rows < K)[:, None] & col_ok[None, :]
        idx = rows[:, None] * M + cols[None, :]
        g = tl.load(gw_ptr + idx, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(ACC)
        dot += tl.sum(g * w, axis=0)
    for k0 in range(0, K, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = (rows < K)[:, None] & col_ok[None, :]
        idx = rows[:, None] * M + cols[None, :]
        g = tl.load(gw_ptr + idx, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(ACC)
        tl.store(dlw_ptr + idx, (w * (g - dot[None, :])).to(dlw_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------------


def _splits(K: int, M: int, BLOCK_K: int, BLOCK_M: int, device: torch.device) -> int:
    """How many programs share one column's K: enough that none folds more than
    CHUNKS_PER_SPLIT tiles, and off the interpreter enough to launch
    TARGET_PROGRAMS programs. The geometry follows from the shapes alone, so
    the ahead-of-time tool (meta tensors) sees what a GPU runs; the
    interpreter, at about 1 ms a program, keeps the fewest."""
    chunks = triton.cdiv(max(K, 1), BLOCK_K)
    splits = triton.cdiv(chunks, CHUNKS_PER_SPLIT)
    if device.type != "cpu":
        splits = max(splits, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(M, BLOCK_M)))
    return max(1, min(splits, chunks))


def logmeanexp_forward(lw, lw_max, sumexp, out, ess) -> None:
    """lw_max, sumexp (M,) <- the column states of lw (K, M); out (logmeanexp) and
    ess (effective sample size), both (M,), when not None."""
    K, M = lw.shape
    if M == 0:
        return
    acc = acc_dtype(lw.dtype)
    BLOCK_K, BLOCK_M = blocks(K, M, MAX_BLOCK_M)
    splits = _splits(K, M, BLOCK_K, BLOCK_M, lw.device)
    rows_per_split = triton.cdiv(triton.cdiv(max(K, 1), BLOCK_K), splits) * BLOCK_K
    splits = triton.cdiv(max(K, 1), rows_per_split)
    has_ess = ess is not None
    part_m = torch.empty((splits, M), dtype=sumexp.dtype, device=lw.device)
    part_s = torch.empty_like(part_m)
    part_s2 = torch.empty_like(part_m) if has_ess else part_s
    _logmeanexp_partial_kernel[(triton.cdiv(M, BLOCK_M) * splits,)](
        lw, part_m, part_s, part_s2, K, M, rows_per_split,
        HAS_S2=has_ess, ACC=acc, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
    )
    FINISH_BLOCK = min(triton.next_power_of_2(M), 1024)
    _logmeanexp_finish_kernel[(triton.cdiv(M, FINISH_BLOCK),)](
        part_m, part_s, part_s2, lw_max, sumexp,
        out if out is not None else sumexp, ess if has_ess else sumexp,
        K, M, splits, HAS_OUT=out is not None, HAS_ESS=has_ess, ACC=acc, BLOCK_M=FINISH_BLOCK,
    )


def logmeanexp_backward(lw, lw_max, sumexp, grad_out, grad_sumexp, ess, dlw) -> None:
    """dlw (K, M) <- e * (a + b e), e = exp(lw - lw_max) (exp(lw) where lw_max = -inf), with per column
    a = grad_out / sumexp + grad_sumexp, b = 0 (ess None), or a = 2 grad_out ess / sumexp,
    b = -a ess / sumexp (1 / sumexp read as 0 for an empty column)."""
    K, M = lw.shape
    if K * M == 0:
        return
    BLOCK_K, BLOCK_M = blocks(K, M, MAX_BLOCK_M)
    has_gs, has_ess = grad_sumexp is not None, ess is not None
    _logmeanexp_bwd_kernel[(triton.cdiv(M, BLOCK_M) * triton.cdiv(K, BLOCK_K),)](
        lw, lw_max, sumexp, grad_out, grad_sumexp if has_gs else grad_out, ess if has_ess else grad_out, dlw, K, M,
        HAS_G_SUMEXP=has_gs, HAS_ESS=has_ess, ACC=acc_dtype(lw.dtype), BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
        num_warps=8,  # 16 elements a thread: 4 warps spilled in fp16
    )


def importance_weights_backward(grad_w, w, dlw) -> None:
    """dlw (K, M) <- w * (grad_w - sum_k grad_w * w) for grad_w, w (K, M)."""
    K, M = w.shape
    if K * M == 0:
        return
    BLOCK_K, BLOCK_M = blocks(K, M, MAX_BLOCK_M)
    _importance_weights_bwd_kernel[(triton.cdiv(M, BLOCK_M),)](
        grad_w, w, dlw, K, M, ACC=acc_dtype(w.dtype), BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
    )
