"""Triton kernels of mixture_log_prob: out[n] = logsumexp_u term[n, u] with

    term[n, u] = c[u] - 0.5 * sum_l (z[n, l] - means[u, l])^2 * inv_var[u, l],
    c[u] = log_softmax(logits)[u] - 0.5 * sum_l (logvars[u, l] + log 2 pi),

and its gradient. The kernels compute c and inv_var = exp(-logvars) from the
parameters themselves (the logits' log-sum-exp in a short loop over U per
program): no torch work around them (1 launch forward, 2 backward).

Layout: z, dz (N, L) contiguous; means, logvars, dmeans, dlogvars (U, L);
logits, dlogits (U,) or None; out, grad_out (N,).

Forward: a program owns BLOCK_N rows of z and streams over the components in
blocks of BLOCK_U with a running (max, sumexp) state per row; each block's
squared distances are a [BLOCK_N, BLOCK_U, BLOCK_L] tile summed over L in
steps of BLOCK_L (masked past L; padded components get c = -inf, so their
weight is exactly 0). No (N, U) intermediate is stored.

Backward: two kernels, each recomputing the terms from z and the saved out,
w = exp(term - out) (0 where out is -inf):
- dz: programs over rows, dz[n] = -g[n] sum_u w (z - means_u) inv_var_u, in
  registers when L fits one block, else accumulated in dz itself (or, for
  half precision, an ACC-dtype (N, L) scratch the program owns and finally
  casts into dz); the first component block stores, so nothing is zeroed;
- dmeans, dlogvars, dlogits: programs over (row split, component block),
  each writing partial sums of g w t, g w t d, g w and g (t = d inv_var,
  d = z - means_u) over its rows into (splits, U, L) / (splits, U) buffers;
  the last program of each component block to finish (an arrival counter,
  _common.arrive_last) adds them in split order and writes the gradients,
  dlogvars = (V - S) / 2 and dlogits = S - softmax(logits) sum g included
  (deterministic, no float atomics).
"""
import math

import torch
import triton
import triton.language as tl

from fastvae.kernels._common import (
    acc_dtype,
    accumulation_dtype,
    arrive_last,
    cdiv,
    load_tile,
    next_power_of_2,
    program_rows,
    split_samples,
    store_tile,
    tile_counters,
)

# Geometry on a GPU: 16 rows x 16 components x up to 32 latent dims per step
# (8192 elements over 4 warps); K = 30 x B = 1024 rows launch 1920 programs.
BLOCK_N = 16
BLOCK_U = 16
MAX_BLOCK_L = 32
NUM_WARPS = 4
# The interpreter costs about 1 ms a program: fewer, larger ones.
INTERPRETER_BLOCK_N = 64
INTERPRETER_MAX_BLOCK_L = 256

LOG_2PI: tl.constexpr = tl.constexpr(math.log(2.0 * math.pi))


def _geometry(L: int, device: torch.device, fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_U, BLOCK_L): depends on L only (no variant per batch size)."""
    if device.type == "cpu":
        return INTERPRETER_BLOCK_N, BLOCK_U, min(next_power_of_2(max(L, 1)), INTERPRETER_MAX_BLOCK_L)
    max_l = MAX_BLOCK_L // 2 if fp64 else MAX_BLOCK_L
    return BLOCK_N, BLOCK_U, min(next_power_of_2(max(L, 1)), max_l)


# -- kernels ------------------------------------------------------------------


@triton.jit
def _log_norm(logits_ptr, U, HAS_LOGITS: tl.constexpr, ACC: tl.constexpr, BLOCK_U: tl.constexpr):
    """log sum_u exp(logits[u]) (log U for equal weights): the normalizer of log_softmax."""
    if HAS_LOGITS:
        run_max = tl.full([BLOCK_U], float("-inf"), ACC)
        run_sum = tl.zeros([BLOCK_U], dtype=ACC)
        for u0 in range(0, U, BLOCK_U):
            comps = u0 + tl.arange(0, BLOCK_U)
            lg = tl.load(logits_ptr + comps, mask=comps < U, other=float("-inf")).to(ACC)
            new_max = tl.maximum(run_max, lg)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(tl.where(run_max == float("-inf"), float("-inf"), run_max - shift)) \
                + tl.exp(lg - shift)
            run_max = new_max
        top = tl.max(run_max, axis=0)
        shift = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(run_sum * tl.exp(tl.where(run_max == float("-inf"), float("-inf"), run_max - shift)), axis=0)
        return shift + tl.log(total)
    else:
        return tl.log(U.to(ACC))


@triton.jit
def _component_c(lv_ptr, logits_ptr, comps, u_ok, L, log_norm, HAS_LOGITS: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_U: tl.constexpr, BLOCK_L: tl.constexpr):
    """c[u] = log_softmax(logits)[u] - 0.5 (sum_l logvars[u, l] + L log 2 pi), -inf for padded components."""
    slv = tl.zeros([BLOCK_U], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        cm = u_ok[:, None] & (cols < L)[None, :]
        slv += tl.sum(load_tile(lv_ptr, comps, cols, cm, L, ACC), axis=1)
    if HAS_LOGITS:
        log_w = tl.load(logits_ptr + comps, mask=u_ok, other=0.0).to(ACC) - log_norm
    else:
        log_w = tl.zeros([BLOCK_U], dtype=ACC) - log_norm
    c = log_w - 0.5 * (slv + L * tl.full([BLOCK_U], LOG_2PI, ACC))  # log 2 pi in ACC, not float32
    return tl.where(u_ok, c, float("-inf"))


@triton.jit
def _inv_var(lv_ptr, comps, cols, cm, L, ACC: tl.constexpr):
    """exp(-logvars) of the components at cols, 0 where masked (adds nothing)."""
    lv = load_tile(lv_ptr, comps, cols, cm, L, ACC)
    return tl.where(cm, tl.exp(-lv), 0.0)


@triton.jit
def _differences(z_ptr, m_ptr, lv_ptr, rows, z_ok, comps, u_ok, l0, L, ACC: tl.constexpr, BLOCK_L: tl.constexpr):
    """(cols, cm, d, iv) of the BLOCK_L latent dims from l0: the dims, the
    components' mask there, z[row] - means[comp] as [rows, comps, dims] (z 0 in
    the rows not z_ok) and the components' inv_var (0 where masked)."""
    cols = l0 + tl.arange(0, BLOCK_L)
    l_ok = cols < L
    z = tl.load(z_ptr + rows[:, None] * L + cols[None, :], mask=z_ok[:, None] & l_ok[None, :], other=0.0).to(ACC)
    cm = u_ok[:, None] & l_ok[None, :]
    m = load_tile(m_ptr, comps, cols, cm, L, ACC)
    iv = _inv_var(lv_ptr, comps, cols, cm, L, ACC)
    return cols, cm, z[:, None, :] - m[None, :, :], iv


@triton.jit
def _quad(z_ptr, m_ptr, lv_ptr, rows, row_ok, comps, u_ok, L,
          ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_L: tl.constexpr):
    """sum_l (z[row, l] - means[comp, l])^2 inv_var[comp, l] as [BLOCK_N, BLOCK_U];
    masked lanes load 0 (mean and inv_var 0: they add 0)."""
    q = tl.zeros([BLOCK_N, BLOCK_U], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        cols, cm, d, iv = _differences(z_ptr, m_ptr, lv_ptr, rows, row_ok, comps, u_ok, l0, L, ACC, BLOCK_L)
        q += tl.sum(d * d * iv[None, :, :], axis=2)
    return q


@triton.jit
def _row_state(g_ptr, out_ptr, rows, row_ok, ACC: tl.constexpr):
    """(g, out) of the rows, both 0 for padded rows and for rows whose out is
    -inf (every term -inf: they weigh nothing), so exp(term - out) never sees
    -inf - -inf."""
    o = tl.load(out_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    live = row_ok & (o != float("-inf"))
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    return tl.where(live, g, 0.0), tl.where(live, o, 0.0), live


@triton.jit
def _weights(g, o, live, c, q, u_ok):
    """g w = g exp(term - out) as [BLOCK_N, BLOCK_U], exactly 0 for dead rows and
    padded components (the exponent is -inf there, so nothing overflows)."""
    e = tl.where(live[:, None] & u_ok[None, :], c[None, :] - 0.5 * q - o[:, None], float("-inf"))
    return g[:, None] * tl.exp(e)


@triton.jit(do_not_specialize=["N", "U"])
def _mixture_fwd_kernel(
    z_ptr,  # (N, L)
    m_ptr,  # (U, L) means
    lv_ptr,  # (U, L) logvars
    logits_ptr,  # (U,) when HAS_LOGITS
    out_ptr,  # (N,)
    N,
    U,
    L,
    HAS_LOGITS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    rows, row_ok = program_rows(BLOCK_N, N)
    log_norm = _log_norm(logits_ptr, U, HAS_LOGITS, ACC, BLOCK_U)
    run_max = tl.full([BLOCK_N], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_N], dtype=ACC)
    for u0 in range(0, U, BLOCK_U):
        comps = u0 + tl.arange(0, BLOCK_U)
        u_ok = comps < U
        q = _quad(z_ptr, m_ptr, lv_ptr, rows, row_ok, comps, u_ok, L, ACC, BLOCK_N, BLOCK_U, BLOCK_L)
        c = _component_c(lv_ptr, logits_ptr, comps, u_ok, L, log_norm, HAS_LOGITS, ACC, BLOCK_U, BLOCK_L)
        # padded components are -inf outright (their 0 * inf for an inf z would be NaN)
        term = tl.where(u_ok[None, :], c[None, :] - 0.5 * q, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(term, axis=1))
        old_shift = tl.where(run_max == float("-inf"), 0.0, run_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        # an empty state (sum 0) is not rescaled: exp(old - new) may overflow there
        scale = tl.where(run_sum == 0.0, 0.0, tl.exp(tl.where(run_sum == 0.0, 0.0, old_shift - shift)))
        run_sum = run_sum * scale + tl.sum(tl.exp(term - shift[:, None]), axis=1)
        run_max = new_max
    shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    safe_sum = tl.where(run_sum == 0.0, 1.0, run_sum)
    out = tl.where(run_sum == 0.0, float("-inf"), shift + tl.log(safe_sum))
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["N", "U"])
def _mixture_dz_kernel(
    g_ptr,  # (N,) grad_out
    z_ptr,  # (N, L)
    m_ptr,  # (U, L)
    lv_ptr,  # (U, L)
    logits_ptr,  # (U,) when HAS_LOGITS
    out_ptr,  # (N,)
    dz_ptr,  # (N, L)
    buf_ptr,  # (N, L) ACC running sums when not SINGLE_L: dz itself, or a scratch when CAST
    N,
    U,
    L,
    HAS_LOGITS: tl.constexpr,
    SINGLE_L: tl.constexpr,  # L fits one BLOCK_L: dz stays in registers
    CAST: tl.constexpr,  # not SINGLE_L and dz is not in ACC: buf is a scratch, cast into dz at the end
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    rows, row_ok = program_rows(BLOCK_N, N)
    g, o, live = _row_state(g_ptr, out_ptr, rows, row_ok, ACC)
    log_norm = _log_norm(logits_ptr, U, HAS_LOGITS, ACC, BLOCK_U)
    acc = tl.zeros([BLOCK_N, BLOCK_L], dtype=ACC)
    for u0 in range(0, U, BLOCK_U):
        comps = u0 + tl.arange(0, BLOCK_U)
        u_ok = comps < U
        q = _quad(z_ptr, m_ptr, lv_ptr, rows, row_ok, comps, u_ok, L, ACC, BLOCK_N, BLOCK_U, BLOCK_L)
        c = _component_c(lv_ptr, logits_ptr, comps, u_ok, L, log_norm, HAS_LOGITS, ACC, BLOCK_U, BLOCK_L)
        gw = _weights(g, o, live, c, q, u_ok)
        for l0 in range(0, L, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L)
            l_ok = cols < L
            zmask = row_ok[:, None] & l_ok[None, :]
            z = tl.load(z_ptr + rows[:, None] * L + cols[None, :], mask=zmask & live[:, None], other=0.0).to(ACC)
            cm = u_ok[:, None] & l_ok[None, :]
            m = load_tile(m_ptr, comps, cols, cm, L, ACC)
            iv = _inv_var(lv_ptr, comps, cols, cm, L, ACC)
            t = (z[:, None, :] - m[None, :, :]) * iv[None, :, :]
            contrib = -tl.sum(gw[:, :, None] * t, axis=1)
            if SINGLE_L:
                acc += contrib
            else:
                # the first component block stores, the others add: the buffer needs no zeroing
                ptrs = buf_ptr + rows[:, None] * L + cols[None, :]
                prev = tl.load(ptrs, mask=zmask & (u0 > 0), other=0.0).to(ACC)
                tl.store(ptrs, (prev + contrib).to(buf_ptr.dtype.element_ty), mask=zmask)
    if SINGLE_L:
        cols = tl.arange(0, BLOCK_L)
        zmask = row_ok[:, None] & (cols < L)[None, :]
        store_tile(dz_ptr, rows, cols, acc, zmask, L)
    elif CAST:
        for l0 in range(0, L, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L)
            zmask = row_ok[:, None] & (cols < L)[None, :]
            total = tl.load(buf_ptr + rows[:, None] * L + cols[None, :], mask=zmask, other=0.0)
            store_tile(dz_ptr, rows, cols, total, zmask, L)


@triton.jit(do_not_specialize=["N", "U", "ROWS_PER", "SPLITS"])
def _mixture_params_kernel(
    g_ptr,  # (N,)
    z_ptr,  # (N, L)
    m_ptr,  # (U, L)
    lv_ptr,  # (U, L)
    logits_ptr,  # (U,) when HAS_LOGITS
    out_ptr,  # (N,)
    dm_ptr,  # (U, L) dmeans, when HAS_DM
    dlv_ptr,  # (U, L) dlogvars, when HAS_DLV
    dlg_ptr,  # (U,) dlogits, when HAS_DLG
    part_m_ptr,  # (SPLITS, U, L) ACC: sum g w t over the split's rows, when PARAMS
    part_v_ptr,  # (SPLITS, U, L) ACC: sum g w t d, when PARAMS
    part_s_ptr,  # (SPLITS, U) ACC: sum g w
    part_g_ptr,  # (SPLITS, component blocks) ACC: sum g over the split's rows
    counter_ptr,  # (component blocks,) int32, 0 between launches
    N,
    U,
    L,
    ROWS_PER,  # rows per split (a multiple of BLOCK_N)
    SPLITS,
    HAS_LOGITS: tl.constexpr,
    PARAMS: tl.constexpr,  # dmeans or dlogvars wanted (else only sum g w, for dlogits)
    HAS_DM: tl.constexpr,
    HAS_DLV: tl.constexpr,
    HAS_DLG: tl.constexpr,
    SINGLE_L: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    u_blocks = tl.cdiv(U, BLOCK_U)
    ub = pid % u_blocks
    split = pid // u_blocks
    comps = ub.to(tl.int32) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = comps < U
    log_norm = _log_norm(logits_ptr, U, HAS_LOGITS, ACC, BLOCK_U)
    c = _component_c(lv_ptr, logits_ptr, comps, u_ok, L, log_norm, HAS_LOGITS, ACC, BLOCK_U, BLOCK_L)
    n0 = split * ROWS_PER
    n1 = tl.minimum(n0 + ROWS_PER, N)
    acc_m = tl.zeros([BLOCK_U, BLOCK_L], dtype=ACC)
    acc_v = tl.zeros([BLOCK_U, BLOCK_L], dtype=ACC)
    acc_s = tl.zeros([BLOCK_U], dtype=ACC)
    acc_g = tl.zeros([BLOCK_N], dtype=ACC)
    UL = U * L
    part = split * UL + comps[:, None] * L
    if PARAMS and not SINGLE_L:
        # this program's slots start at 0: the row loop adds to them (and may be empty)
        for l0 in range(0, L, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L)
            cm = u_ok[:, None] & (cols < L)[None, :]
            tl.store(part_m_ptr + part + cols[None, :], tl.zeros([BLOCK_U, BLOCK_L], dtype=ACC), mask=cm)
            tl.store(part_v_ptr + part + cols[None, :], tl.zeros([BLOCK_U, BLOCK_L], dtype=ACC), mask=cm)
    for r0 in range(n0, n1, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < n1
        acc_g += tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        g, o, live = _row_state(g_ptr, out_ptr, rows, row_ok, ACC)
        q = _quad(z_ptr, m_ptr, lv_ptr, rows, row_ok, comps, u_ok, L, ACC, BLOCK_N, BLOCK_U, BLOCK_L)
        gw = _weights(g, o, live, c, q, u_ok)
        acc_s += tl.sum(gw, axis=0)
        if PARAMS:
            for l0 in range(0, L, BLOCK_L):
                # dead rows read as 0: their z may be inf, and 0 * inf is NaN
                cols, cm, d, iv = _differences(z_ptr, m_ptr, lv_ptr, rows, live, comps, u_ok, l0, L, ACC, BLOCK_L)
                t = gw[:, :, None] * d * iv[None, :, :]
                pm = tl.sum(t, axis=0)
                pv = tl.sum(t * d, axis=0)
                if SINGLE_L:
                    acc_m += pm
                    acc_v += pv
                else:
                    off = part + cols[None, :]
                    tl.store(part_m_ptr + off, tl.load(part_m_ptr + off, mask=cm, other=0.0) + pm, mask=cm)
                    tl.store(part_v_ptr + off, tl.load(part_v_ptr + off, mask=cm, other=0.0) + pv, mask=cm)
    tl.store(part_s_ptr + split * U + comps, acc_s, mask=u_ok)
    tl.store(part_g_ptr + split * u_blocks + ub, tl.sum(acc_g, axis=0))
    if PARAMS and SINGLE_L:
        cols = tl.arange(0, BLOCK_L)
        cm = u_ok[:, None] & (cols < L)[None, :]
        tl.store(part_m_ptr + part + cols[None, :], acc_m, mask=cm)
        tl.store(part_v_ptr + part + cols[None, :], acc_v, mask=cm)
    last = SPLITS == 1  # one split: this program finishes, no counter touched
    if SPLITS > 1:
        last = arrive_last(counter_ptr + ub, SPLITS)
    if last:
        _params_finish(dm_ptr, dlv_ptr, dlg_ptr, logits_ptr, part_m_ptr, part_v_ptr, part_s_ptr, part_g_ptr, comps,
                       u_ok, ub, u_blocks, U, L, SPLITS, log_norm, PARAMS, HAS_DM, HAS_DLV, HAS_DLG, ACC,
                       BLOCK_U, BLOCK_L)


@triton.jit
def _params_finish(dm_ptr, dlv_ptr, dlg_ptr, logits_ptr, part_m_ptr, part_v_ptr, part_s_ptr, part_g_ptr, comps,
                   u_ok, ub, u_blocks, U, L, SPLITS, log_norm, PARAMS: tl.constexpr, HAS_DM: tl.constexpr,
                   HAS_DLV: tl.constexpr, HAS_DLG: tl.constexpr, ACC: tl.constexpr, BLOCK_U: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    """The component block's gradients from the splits' partials, added in split order."""
    UL = U * L
    s_sum = tl.zeros([BLOCK_U], dtype=ACC)
    g_sum = tl.zeros([1], dtype=ACC)
    for sp in range(0, SPLITS):
        s_sum += tl.load(part_s_ptr + sp * U + comps, mask=u_ok, other=0.0, cache_modifier=".cg")
        g_sum += tl.load(part_g_ptr + sp * u_blocks + ub + tl.zeros([1], dtype=tl.int64), cache_modifier=".cg")
    if HAS_DLG:
        soft = tl.exp(tl.load(logits_ptr + comps, mask=u_ok, other=0.0).to(ACC) - log_norm)
        tl.store(dlg_ptr + comps, (s_sum - soft * tl.sum(g_sum, axis=0)).to(dlg_ptr.dtype.element_ty), mask=u_ok)
    if PARAMS:
        for l0 in range(0, L, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L)
            cm = u_ok[:, None] & (cols < L)[None, :]
            m_sum = tl.zeros([BLOCK_U, BLOCK_L], dtype=ACC)
            v_sum = tl.zeros([BLOCK_U, BLOCK_L], dtype=ACC)
            for sp in range(0, SPLITS):
                off = sp * UL + comps[:, None] * L + cols[None, :]
                m_sum += tl.load(part_m_ptr + off, mask=cm, other=0.0, cache_modifier=".cg")
                v_sum += tl.load(part_v_ptr + off, mask=cm, other=0.0, cache_modifier=".cg")
            idx = comps[:, None] * L + cols[None, :]
            if HAS_DM:
                tl.store(dm_ptr + idx, m_sum.to(dm_ptr.dtype.element_ty), mask=cm)
            if HAS_DLV:
                tl.store(dlv_ptr + idx, (0.5 * (v_sum - s_sum[:, None])).to(dlv_ptr.dtype.element_ty), mask=cm)


# -- launchers ----------------------------------------------------------------


def forward_plan(N: int, U: int, L: int, dtype: torch.dtype, device: torch.device,
                 has_logits: bool) -> tuple[tuple[int], dict]:
    """(grid, meta) of the forward kernel for z (N, L) against U components of
    ``dtype`` (N > 0): the shapes' part of a launch, worked out once per call
    signature by the op's plans (op.py's MixturePlan)."""
    bn, bu, bl = _geometry(L, device, dtype == torch.float64)
    return (cdiv(N, bn),), dict(HAS_LOGITS=has_logits, ACC=acc_dtype(dtype), BLOCK_N=bn, BLOCK_U=bu, BLOCK_L=bl,
                                num_warps=NUM_WARPS)


def dz_plan(N: int, U: int, L: int, dtype: torch.dtype, device: torch.device, has_logits: bool,
            cast: bool) -> tuple[tuple[int], dict]:
    """(grid, meta) of the dz kernel (N > 0); ``cast``: dz is written through an
    accumulation-dtype buffer (several blocks of L, dz in another dtype)."""
    bn, bu, bl = _geometry(L, device, dtype == torch.float64)
    return (cdiv(N, bn),), dict(HAS_LOGITS=has_logits, SINGLE_L=L <= bl, CAST=cast, ACC=acc_dtype(dtype),
                                BLOCK_N=bn, BLOCK_U=bu, BLOCK_L=bl, num_warps=NUM_WARPS)


def params_plan(N: int, U: int, L: int, dtype: torch.dtype, device: torch.device, has_logits: bool, has_dm: bool,
                has_dlv: bool, has_dlg: bool):
    """(grid, meta, the runtime integers (rows per split, splits), the shapes of
    the splits' partial sums (means', logvars', the weights', the logits'),
    the arrival counters tile_counters hands out (n, splits)) of the
    parameters' gradient kernel."""
    bn, bu, bl = _geometry(L, device, dtype == torch.float64)
    params = has_dm or has_dlv
    u_blocks = cdiv(U, bu)
    splits, per_split = split_samples(u_blocks, cdiv(N, bn), device)
    part_ml = (splits, U, L) if params else (1,)
    return ((u_blocks * splits,),
            dict(HAS_LOGITS=has_logits, PARAMS=params, HAS_DM=has_dm, HAS_DLV=has_dlv, HAS_DLG=has_dlg,
                 SINGLE_L=L <= bl, ACC=acc_dtype(dtype), BLOCK_N=bn, BLOCK_U=bu, BLOCK_L=bl, num_warps=NUM_WARPS),
            (per_split * bn, splits), (part_ml, part_ml, (splits, U), (splits, u_blocks)), (u_blocks, splits))


def mixture_log_prob_forward(z, means, logvars, logits, out) -> None:
    """out (N,) <- mixture_log_prob of z (N, L), means, logvars (U, L), logits (U,) or None."""
    N, L = z.shape
    U = means.shape[0]
    if N == 0:
        return
    grid, meta = forward_plan(N, U, L, means.dtype, z.device, logits is not None)
    _mixture_fwd_kernel[grid](z, means, logvars, means if logits is None else logits, out, N, U, L, **meta)


def mixture_log_prob_backward(grad_out, z, means, logvars, logits, out, dz, dmeans, dlogvars, dlogits) -> None:
    """Writes whichever of dz (N, L), dmeans, dlogvars (U, L), dlogits (U,) are
    not None, given grad_out (N,) and the forward's out (N,)."""
    N, L = z.shape
    U = means.shape[0]
    acc = accumulation_dtype(means.dtype)
    has_logits = logits is not None
    lg = logits if has_logits else means
    if dz is not None and N > 0:
        cast = L > _geometry(L, z.device, means.dtype == torch.float64)[2] and dz.dtype != acc
        buf = torch.empty((N, L), dtype=acc, device=z.device) if cast else dz
        grid, meta = dz_plan(N, U, L, means.dtype, z.device, has_logits, cast)
        _mixture_dz_kernel[grid](grad_out, z, means, logvars, lg, out, dz, buf, N, U, L, **meta)
    if dmeans is None and dlogvars is None and dlogits is None:
        return
    grid, meta, ints, part_shapes, counters = params_plan(N, U, L, means.dtype, z.device, has_logits,
                                                          dmeans is not None, dlogvars is not None,
                                                          dlogits is not None)
    parts = [torch.empty(shape, dtype=acc, device=z.device) for shape in part_shapes]
    _mixture_params_kernel[grid](
        grad_out, z, means, logvars, lg, out, means if dmeans is None else dmeans,
        means if dlogvars is None else dlogvars, means if dlogits is None else dlogits, *parts,
        tile_counters(z.device, *counters), N, U, L, *ints, **meta)
