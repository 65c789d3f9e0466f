"""Triton kernels of the importance-weighting ops over the K rows of (K, M)
log-weights: the column states (max, sumexp) with logmeanexp and the
effective sample size, the elementwise e * (a + b e) pass behind the
gradients and the normalized weights, and the softmax backward.

Layout: lw, dlw, w, grad_w (K, M) contiguous, reduced down the columns; the
per-column vectors (M,). Programs tile BLOCK_K rows x BLOCK_M contiguous
columns (coalesced along M).

The forward streams K with an online running max and sum per column (one
read of lw, no second K-sized buffer) and, when one program owns each column,
finishes the column in the same launch: one launch. When M is small and K
large (e.g. K = 5000 samples of 512 examples) a column's K is split over
SPLITS programs instead, each leaving its partial state in a (SPLITS, M)
buffer, and a finish kernel with one program per FINISH_BLOCK_M columns
merges them with the associative rule, a tile of FINISH_BLOCK_S splits at a
time: two launches, both filling the GPU.

The evaluation's variant (logmeanexp_accumulate, fastvae/evaluation.py) folds
lw + latent, and merges the chunk's states of lw and of 2 lw into running
states in place, in the same launches: no torch op per chunk.

Under the interpreter (CPU tensors, about 1 ms a program) the tiles are
INTERPRETER_TILE elements, so programs stay few.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import (
    TARGET_PROGRAMS,
    acc_dtype,
    blocks,
    bound_epilogue,
    bound_grad,
    bound_parts,
    cdiv,
    next_power_of_2,
    program_rows,
    split_block,
    tile_counters,
)

MAX_BLOCK_M = 128  # columns per tile; the rest of the tile goes to rows
CHUNKS_PER_SPLIT = 16  # a K-split folds at most this many tiles before the merge
# The finish of split columns: a tile of FINISH_BLOCK_S partial states of
# FINISH_BLOCK_M columns a program (2048 elements, 4 warps), so that e.g.
# K = 5000 samples of 512 columns finish in 16 programs, not one.
FINISH_BLOCK_S = 64
FINISH_BLOCK_M = 32
# Under the interpreter (about 1 ms a program) tiles are larger
INTERPRETER_TILE = 65536
INTERPRETER_MAX_BLOCK_M = 1024

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
def _fold(lw_ptr, latent_ptr, cols, col_ok, k_begin, k_end, M,
          HAS_LATENT: tl.constexpr, HAS_S2: tl.constexpr, ACC: tl.constexpr,
          BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    # the (max, sumexp, sum of squares) state of rows [k_begin, k_end) of the
    # columns, streamed with a running max; lw + latent when HAS_LATENT
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], dtype=ACC)
    s2 = tl.zeros([BLOCK_M], dtype=ACC)
    for k0 in range(k_begin, k_end, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = (rows < k_end)[:, None] & col_ok[None, :]
        idx = rows[:, None] * M + cols[None, :]
        x = tl.load(lw_ptr + idx, mask=mask, other=float("-inf")).to(ACC)
        if HAS_LATENT:
            x += tl.load(latent_ptr + idx, mask=mask, other=0.0).to(ACC)
        # NaN never becomes the max (GPU and interpreter max differ on NaN);
        # it still reaches the sum below, which it turns into NaN
        m_new = tl.maximum(m, tl.max(tl.where(x == x, x, float("-inf")), axis=0))
        f = _rescale(m, m_new)
        e = tl.exp(x - _shift(m_new)[None, :])
        s = s * f + tl.sum(e, axis=0)
        if HAS_S2:
            s2 = s2 * (f * f) + tl.sum(e * e, axis=0)
        m = m_new
    return m, s, s2


@triton.jit
def _value(m, s, K, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    # logmeanexp of the columns from their finished state: log(0) = -inf for an
    # empty column; shift 0 keeps it -inf, not NaN
    return _shift(m) + tl.log(s) - tl.log(tl.zeros([BLOCK_M], dtype=ACC) + K)


@triton.jit
def _emit(m, s, s2, cols, col_ok, K, first,
          max_ptr, sumexp_ptr, out_ptr, ess_ptr, sq_max_ptr, sq_sumexp_ptr,
          ACCUMULATE: tl.constexpr, HAS_OUT: tl.constexpr, HAS_ESS: tl.constexpr,
          ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    # the finished state (m, s) of the columns, with s2 = sum exp(2 (lw - shift)):
    # stored with logmeanexp and the ESS, or (ACCUMULATE) merged into the
    # running states of lw (max, sumexp) and of 2 lw (sq_max, sq_sumexp), whose
    # state here is (2 m, s2); with first != 0 the running states are not read
    # (an empty state, (-inf, 0), merges as nothing)
    if ACCUMULATE:
        keep = col_ok & ((tl.zeros([BLOCK_M], dtype=tl.int32) + first) == 0)  # a tensor mask
        rm = tl.load(max_ptr + cols, mask=keep, other=float("-inf")).to(ACC)
        rs = tl.load(sumexp_ptr + cols, mask=keep, other=0.0).to(ACC)
        qm = tl.load(sq_max_ptr + cols, mask=keep, other=float("-inf")).to(ACC)
        qs = tl.load(sq_sumexp_ptr + cols, mask=keep, other=0.0).to(ACC)
        nm = tl.maximum(rm, m)
        ns = rs * _rescale(rm, nm) + s * _rescale(m, nm)
        m2 = 2.0 * m
        nq = tl.maximum(qm, m2)
        nqs = qs * _rescale(qm, nq) + s2 * _rescale(m2, nq)
        tl.store(max_ptr + cols, nm, mask=col_ok)
        tl.store(sumexp_ptr + cols, ns, mask=col_ok)
        tl.store(sq_max_ptr + cols, nq, mask=col_ok)
        tl.store(sq_sumexp_ptr + cols, nqs, mask=col_ok)
    else:
        tl.store(max_ptr + cols, m, mask=col_ok)
        tl.store(sumexp_ptr + cols, s, mask=col_ok)
        if HAS_OUT:
            tl.store(out_ptr + cols, _value(m, s, K, ACC, BLOCK_M).to(out_ptr.dtype.element_ty), mask=col_ok)
        if HAS_ESS:
            ess = tl.where(s == 0.0, 0.0, s * s / tl.where(s == 0.0, 1.0, s2))
            tl.store(ess_ptr + cols, ess.to(ess_ptr.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["K", "M", "ROWS_PER_SPLIT", "first", "divisor"])
def _logmeanexp_fwd_kernel(
    lw_ptr,  # (K, M)
    latent_ptr,  # (K, M), added to lw; unused unless HAS_LATENT
    part_m_ptr,  # (SPLITS, M): ACC, when SPLIT; with REDUCE the bound's partial sums (programs,)
    part_s_ptr,  # (SPLITS, M): ACC, unused unless SPLIT
    part_s2_ptr,  # (SPLITS, M): ACC, unused unless SPLIT and HAS_S2
    max_ptr,  # (M,): ACC; the running state when ACCUMULATE
    sumexp_ptr,  # (M,): ACC
    out_ptr,  # (M,), unused unless HAS_OUT
    ess_ptr,  # (M,), unused unless HAS_ESS
    sq_max_ptr,  # (M,): ACC, the running state of 2 lw; unused unless ACCUMULATE
    sq_sumexp_ptr,  # (M,): ACC, unused unless ACCUMULATE
    counter_ptr,  # one zeroed int32 arrival counter, when REDUCE
    K,
    M,
    ROWS_PER_SPLIT,  # rows of lw folded by one split (a multiple of BLOCK_K)
    first,  # ACCUMULATE: nonzero when there is no running state yet
    divisor,  # REDUCE: the columns' sum is divided by this (their count for a mean, or 1)
    SPLIT: tl.constexpr,  # several programs share a column: write partial states
    REDUCE: tl.constexpr,  # out a scalar: the columns' logmeanexp summed (_common.bound_epilogue)
    ACCUMULATE: tl.constexpr,
    HAS_LATENT: tl.constexpr,
    HAS_S2: tl.constexpr,
    HAS_OUT: tl.constexpr,
    HAS_ESS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    _, split, cols, col_ok = split_block(BLOCK_M, M)
    k_begin = split * ROWS_PER_SPLIT
    k_end = tl.minimum(k_begin + ROWS_PER_SPLIT, K)
    m, s, s2 = _fold(lw_ptr, latent_ptr, cols, col_ok, k_begin, k_end, M,
                     HAS_LATENT, HAS_S2, ACC, BLOCK_K, BLOCK_M)
    if SPLIT:
        out = split * M + cols
        tl.store(part_m_ptr + out, m, mask=col_ok)
        tl.store(part_s_ptr + out, s, mask=col_ok)
        if HAS_S2:
            tl.store(part_s2_ptr + out, s2, mask=col_ok)
    else:
        _emit(m, s, s2, cols, col_ok, K, first, max_ptr, sumexp_ptr, out_ptr, ess_ptr, sq_max_ptr, sq_sumexp_ptr,
              ACCUMULATE, HAS_OUT, HAS_ESS, ACC, BLOCK_M)
        if REDUCE:  # HAS_OUT is off: out_ptr is the bound's scalar
            bound_epilogue(_value(m, s, K, ACC, BLOCK_M), cols, col_ok, out_ptr, out_ptr, 0, part_m_ptr, counter_ptr,
                           divisor, False, True, ACC)


@triton.jit(do_not_specialize=["K", "M", "SPLITS", "first"])
def _logmeanexp_finish_kernel(
    part_m_ptr,  # (SPLITS, M): ACC
    part_s_ptr,  # (SPLITS, M): ACC
    part_s2_ptr,  # (SPLITS, M): ACC, unused unless HAS_S2
    max_ptr,  # (M,): ACC; the running state when ACCUMULATE
    sumexp_ptr,  # (M,): ACC
    out_ptr,  # (M,), unused unless HAS_OUT
    ess_ptr,  # (M,), unused unless HAS_ESS
    sq_max_ptr,  # (M,): ACC, unused unless ACCUMULATE
    sq_sumexp_ptr,  # (M,): ACC, unused unless ACCUMULATE
    K,
    M,
    SPLITS,
    first,
    ACCUMULATE: tl.constexpr,
    HAS_S2: tl.constexpr,
    HAS_OUT: tl.constexpr,
    HAS_ESS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # one program per block of BLOCK_M columns: the partial states of BLOCK_S
    # splits at a time, reduced as a tile (a fixed order: deterministic)
    cols, col_ok = program_rows(BLOCK_M, M)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], dtype=ACC)
    s2 = tl.zeros([BLOCK_M], dtype=ACC)
    for sp0 in range(0, SPLITS, BLOCK_S):
        sp = sp0 + tl.arange(0, BLOCK_S).to(tl.int64)
        mask = (sp < SPLITS)[:, None] & col_ok[None, :]
        idx = sp[:, None] * M + cols[None, :]
        pm = tl.load(part_m_ptr + idx, mask=mask, other=float("-inf"))
        ps = tl.load(part_s_ptr + idx, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(pm, axis=0))
        fa = _rescale(m, m_new)
        fb = _rescale(pm, m_new[None, :])
        s = s * fa + tl.sum(ps * fb, axis=0)
        if HAS_S2:
            ps2 = tl.load(part_s2_ptr + idx, mask=mask, other=0.0)
            s2 = s2 * (fa * fa) + tl.sum(ps2 * (fb * fb), axis=0)
        m = m_new
    _emit(m, s, s2, cols, col_ok, K, first, max_ptr, sumexp_ptr, out_ptr, ess_ptr, sq_max_ptr, sq_sumexp_ptr,
          ACCUMULATE, HAS_OUT, HAS_ESS, ACC, BLOCK_M)


@triton.jit(do_not_specialize=["K", "M", "g_divisor"])
def _logmeanexp_bwd_kernel(
    lw_ptr,  # (K, M)
    max_ptr,  # (M,): ACC
    sumexp_ptr,  # (M,): ACC
    g_ptr,  # (M,); with G_SCALAR a scalar (the reduced bound's gradient)
    g_sumexp_ptr,  # (M,), unused unless HAS_G_SUMEXP
    ess_ptr,  # (M,), unused unless HAS_ESS
    dlw_ptr,  # (K, M)
    dlw_weighted_ptr,  # (K, M): dlw times the normalized weights e / sumexp (DReG), when WEIGHTED
    K,
    M,
    g_divisor,  # G_SCALAR: each column's gradient is g[0] / g_divisor
    G_SCALAR: tl.constexpr,
    WEIGHTED: tl.constexpr,
    HAS_G_SUMEXP: tl.constexpr,
    HAS_ESS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
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
    g = bound_grad(g_ptr, cols, col_ok, g_divisor, G_SCALAR, ACC)
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
    if WEIGHTED:  # the weights as the backward at gradient 1 gives them: e (1 / sumexp + 0)
        w = e * (inv[None, :] + 0.0 * e)
        tl.store(dlw_weighted_ptr + idx, (d.to(dlw_ptr.dtype.element_ty).to(ACC)
                                          * w.to(dlw_ptr.dtype.element_ty).to(ACC)).to(dlw_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _weights_tile(gw_ptr, w_ptr, k0, cols, col_ok, K, M, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """(idx, mask, g, w) of the BLOCK_K rows from k0 of the weights' (K, M) tile at cols: the
    elements' offsets and mask, and the incoming gradient and the weights there, in ACC."""
    rows = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    mask = (rows < K)[:, None] & col_ok[None, :]
    idx = rows[:, None] * M + cols[None, :]
    return idx, mask, tl.load(gw_ptr + idx, mask=mask, other=0.0).to(ACC), tl.load(w_ptr + idx, mask=mask,
                                                                                  other=0.0).to(ACC)


@triton.jit(do_not_specialize=["K", "M"])
def _importance_weights_bwd_kernel(
    gw_ptr,  # (K, M)
    w_ptr,  # (K, M)
    dlw_ptr,  # (K, M)
    K,
    M,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    cols, col_ok = program_rows(BLOCK_M, M)
    dot = tl.zeros([BLOCK_M], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        idx, mask, g, w = _weights_tile(gw_ptr, w_ptr, k0, cols, col_ok, K, M, ACC, BLOCK_K)
        dot += tl.sum(g * w, axis=0)
    for k0 in range(0, K, BLOCK_K):
        idx, mask, g, w = _weights_tile(gw_ptr, w_ptr, k0, cols, col_ok, K, M, ACC, BLOCK_K)
        tl.store(dlw_ptr + idx, (w * (g - dot[None, :])).to(dlw_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------------


def _tile(K: int, M: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_M): a 4096-element tile of MAX_BLOCK_M columns on a GPU
    (and for the ahead-of-time tool's meta tensors) whatever M and K are, so
    that no batch size or K compiles a variant of its own (M is the batch);
    INTERPRETER_TILE under the interpreter, which compiles nothing."""
    if device.type == "cpu":
        return blocks(K, M, INTERPRETER_MAX_BLOCK_M, INTERPRETER_TILE)
    return 4096 // MAX_BLOCK_M, MAX_BLOCK_M


def _splits(K: int, M: int, BLOCK_K: int, BLOCK_M: int, device: torch.device) -> int:
    """How many programs share one column's K: enough that none folds more than
    CHUNKS_PER_SPLIT tiles, and off the interpreter enough to launch
    TARGET_PROGRAMS programs. The geometry follows from the shapes alone, so
    the ahead-of-time tool (meta tensors) sees what a GPU runs; the
    interpreter, at about 1 ms a program, keeps the fewest."""
    chunks = cdiv(max(K, 1), BLOCK_K)
    splits = cdiv(chunks, CHUNKS_PER_SPLIT)
    if device.type != "cpu":
        splits = max(splits, cdiv(TARGET_PROGRAMS, cdiv(M, BLOCK_M)))
    return max(1, min(splits, chunks))


def _geometry(K: int, M: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_K, BLOCK_M, splits, rows per split) of the forward."""
    BLOCK_K, BLOCK_M = _tile(K, M, device)
    splits = _splits(K, M, BLOCK_K, BLOCK_M, device)
    rows_per_split = cdiv(cdiv(max(K, 1), BLOCK_K), splits) * BLOCK_K
    return BLOCK_K, BLOCK_M, cdiv(max(K, 1), rows_per_split), rows_per_split


def forward_plan(K: int, M: int, dtype: torch.dtype, device: torch.device, reduce: bool = False
                 ) -> tuple[tuple[int], dict, int] | None:
    """(grid, meta, rows per split) of logmeanexp_forward's one launch with
    out (no ESS, no latent) for lw (K, M) of ``dtype`` (M > 0), or with
    ``reduce`` of its reduced bound's, worked out once per call signature by
    the objectives' plans (fastvae/_plan.py); None where the columns are split
    over programs (a second, finishing launch: the plan calls
    logmeanexp_forward then)."""
    BLOCK_K, BLOCK_M, splits, rows_per_split = _geometry(K, M, device)
    if splits != 1:
        return None
    return (cdiv(M, BLOCK_M),), dict(
        SPLIT=False, REDUCE=reduce, HAS_LATENT=False, ACCUMULATE=False, HAS_S2=False, HAS_OUT=not reduce,
        HAS_ESS=False,
        ACC=acc_dtype(dtype), BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M, num_warps=1 if device.type == "cpu" else 8,
    ), rows_per_split


def backward_plan(K: int, M: int, dtype: torch.dtype, device: torch.device, has_grad_sumexp: bool, has_ess: bool,
                  g_scalar: bool = False, weighted: bool = False) -> tuple[tuple[int], dict]:
    """(grid, meta) of logmeanexp_backward for lw (K, M) of ``dtype`` (K * M > 0);
    ``g_scalar``: the reduced bound's gradient (_common.bound_grad); ``weighted``:
    also dlw times the normalized weights (DReG)."""
    BLOCK_K, BLOCK_M = _tile(K, M, device)
    return (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),), dict(
        G_SCALAR=g_scalar, WEIGHTED=weighted, HAS_G_SUMEXP=has_grad_sumexp, HAS_ESS=has_ess, ACC=acc_dtype(dtype),
        BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
        num_warps=8,  # 16 elements a thread: 4 warps spilled in fp16
    )


def split_plan(K: int, M: int, dtype: torch.dtype, device: torch.device, has_latent: bool = False,
               accumulate: bool = False, has_s2: bool = False, has_out: bool = True, has_ess: bool = False
               ) -> tuple[tuple[int], dict, tuple[int], dict, int, int]:
    """(the forward's grid and meta, the finish kernel's grid and meta, splits,
    rows per split) of the two launches that reduce lw (K, M) where its
    columns are split over programs (forward_plan's None; M > 0): what the
    objectives' plans (fastvae/_plan.py) work out once, and _reduce per call."""
    BLOCK_K, BLOCK_M, splits, rows_per_split = _geometry(K, M, device)
    gpu = device.type != "cpu"
    flags = dict(ACCUMULATE=accumulate, HAS_S2=has_s2, HAS_OUT=has_out, HAS_ESS=has_ess, ACC=acc_dtype(dtype))
    warps = 8 if gpu else 1  # a 4096-element tile: 16 float32 elements a thread
    if gpu:
        block_s, block_m = FINISH_BLOCK_S, FINISH_BLOCK_M
    else:
        block_s, block_m = 16, min(next_power_of_2(M), INTERPRETER_TILE // 16)
    return ((cdiv(M, BLOCK_M) * splits,), dict(SPLIT=True, REDUCE=False, HAS_LATENT=has_latent, **flags,
                                                      BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M, num_warps=warps),
            (cdiv(M, block_m),), dict(**flags, BLOCK_S=block_s, BLOCK_M=block_m, num_warps=4 if gpu else 1),
            splits, rows_per_split)


def _reduce(lw, latent, lw_max, sumexp, out, ess, sq_max, sq_sumexp, first: bool, accumulate: bool) -> None:
    """The column states of lw (+ latent) (K, M), finished by _emit: one launch
    when every column is one program's (few rows or many columns), else the
    split programs' partial states and one finish launch, one program per
    FINISH_BLOCK_M columns (split_plan)."""
    K, M = lw.shape
    if M == 0:
        return
    acc = acc_dtype(lw.dtype)
    gpu = lw.device.type != "cpu"
    BLOCK_K, BLOCK_M, splits, rows_per_split = _geometry(K, M, lw.device)
    has_s2 = accumulate or ess is not None
    flags = dict(ACCUMULATE=accumulate, HAS_S2=has_s2, HAS_OUT=out is not None, HAS_ESS=ess is not None, ACC=acc)
    # absent outputs get a pointer that is never read or written
    outs = (lw_max, sumexp, sumexp if out is None else out, sumexp if ess is None else ess,
            sumexp if sq_max is None else sq_max, sumexp if sq_sumexp is None else sq_sumexp)
    first = int(bool(first))
    lat = lw if latent is None else latent
    if splits == 1:
        _logmeanexp_fwd_kernel[(cdiv(M, BLOCK_M),)](
            lw, lat, sumexp, sumexp, sumexp, *outs, sumexp, K, M, rows_per_split, first, 1,
            SPLIT=False, REDUCE=False, HAS_LATENT=latent is not None, **flags, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
            num_warps=8 if gpu else 1,  # a 4096-element tile: 16 float32 elements a thread
        )
        return
    grid, meta, finish_grid, finish_meta, splits, rows_per_split = split_plan(
        K, M, lw.dtype, lw.device, latent is not None, accumulate, has_s2, out is not None, ess is not None)
    part_m = torch.empty((splits, M), dtype=sumexp.dtype, device=lw.device)
    part_s = torch.empty_like(part_m)
    part_s2 = torch.empty_like(part_m) if has_s2 else part_s
    _logmeanexp_fwd_kernel[grid](lw, lat, part_m, part_s, part_s2, *outs, sumexp, K, M, rows_per_split, first, 1,
                                 **meta)
    _logmeanexp_finish_kernel[finish_grid](part_m, part_s, part_s2, *outs, K, M, splits, first, **finish_meta)


def logmeanexp_forward(lw, lw_max, sumexp, out, ess, divisor: int | None = None) -> None:
    """lw_max, sumexp (M,) <- the column states of lw (K, M); out (logmeanexp) and
    ess (effective sample size), both (M,), when not None. With ``divisor``
    (and no ess) out is a scalar: the columns' logmeanexp summed, divided by
    divisor (the objectives' reduced IWAE bound, _common.bound_epilogue), in
    one launch, for the shapes forward_plan plans (one program a column)."""
    if divisor is None:
        _reduce(lw, None, lw_max, sumexp, out, ess, None, None, True, False)
        return
    K, M = lw.shape
    planned = forward_plan(K, M, lw.dtype, lw.device, True) if ess is None and M > 0 else None
    if planned is None:
        raise ValueError(f"a reduced logmeanexp is one launch without ess: lw of shape {tuple(lw.shape)} has none")
    grid, meta, rows_per_split = planned
    part = bound_parts(grid[0], lw.dtype, lw.device)
    _logmeanexp_fwd_kernel[grid](lw, lw, part, sumexp, sumexp, lw_max, sumexp, out, sumexp, sumexp, sumexp,
                                 tile_counters(lw.device, 1), K, M, rows_per_split, 1, divisor, **meta)


def logmeanexp_accumulate(lw, latent, lw_max, sumexp, sq_max, sq_sumexp, first) -> None:
    """The column states of lw + latent (K, M) (lw alone when latent is None),
    and of twice that, merged into the running states (lw_max, sumexp) and
    (sq_max, sq_sumexp), each (M,), in place; with first they are written
    without being read."""
    _reduce(lw, latent, lw_max, sumexp, None, None, sq_max, sq_sumexp, first, True)


def logmeanexp_backward(lw, lw_max, sumexp, grad_out, grad_sumexp, ess, dlw, g_divisor: int | None = None,
                        dlw_weighted=None) -> None:
    """dlw (K, M) <- e * (a + b e), e = exp(lw - lw_max) (exp(lw) where lw_max = -inf), with per column
    a = grad_out / sumexp + grad_sumexp, b = 0 (ess None), or a = 2 grad_out ess / sumexp,
    b = -a ess / sumexp (1 / sumexp read as 0 for an empty column). With
    ``g_divisor`` grad_out is a scalar and each column's grad_out / g_divisor
    (the reduced bound's gradient); ``dlw_weighted`` (K, M) <- dlw times the
    normalized weights e / sumexp, each rounded to dlw's dtype first, as a
    product of the two tensors gives it (DReG's latent gradient; no ess)."""
    K, M = lw.shape
    if K * M == 0:
        return
    has_gs, has_ess = grad_sumexp is not None, ess is not None
    grid, meta = backward_plan(K, M, lw.dtype, lw.device, has_gs, has_ess, g_divisor is not None,
                               dlw_weighted is not None)
    _logmeanexp_bwd_kernel[grid](
        lw, lw_max, sumexp, grad_out, grad_sumexp if has_gs else grad_out, ess if has_ess else grad_out, dlw,
        dlw if dlw_weighted is None else dlw_weighted, K, M, 1 if g_divisor is None else g_divisor, **meta)


def importance_weights_backward(grad_w, w, dlw) -> None:
    """dlw (K, M) <- w * (grad_w - sum_k grad_w * w) for grad_w, w (K, M)."""
    K, M = w.shape
    if K * M == 0:
        return
    BLOCK_K, BLOCK_M = _tile(K, M, w.device)
    _importance_weights_bwd_kernel[(cdiv(M, BLOCK_M),)](
        grad_w, w, dlw, K, M, ACC=acc_dtype(w.dtype), BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
    )
