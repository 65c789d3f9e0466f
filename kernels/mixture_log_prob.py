"""Triton kernels of mixture_log_prob: out[n] = logsumexp_u term[n, u] with

    term[n, u] = c[u] - 0.5 * sum_l (z[n, l] - means[u, l])^2 * inv_var[u, l],
    c[u] = log_softmax(logits)[u] - 0.5 * sum_l (logvars[u, l] + log 2 pi),

and its gradient. c (U,) and inv_var = exp(-logvars) (U, L) are prepared once
per call by the launcher, in the accumulation dtype (O(U * L)).

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
  registers when L fits one block, else accumulated in an ACC-dtype (N, L)
  buffer that the program owns;
- dmeans, dlogvars, dlogits: programs over (row split, component block),
  each writing partial sums of g w t, g w t d and g w (t = d inv_var,
  d = z - means_u) over its rows into (splits, U, L) / (splits, U) buffers
  that the launcher reduces with sum(0), in a fixed order (no atomics).
"""
import math

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, accumulation_dtype, sample_splits

# Geometry on a GPU: 16 rows x 16 components x up to 32 latent dims per step
# (8192 elements over 4 warps); K = 30 x B = 1024 rows launch 1920 programs.
BLOCK_N = 16
BLOCK_U = 16
MAX_BLOCK_L = 32
NUM_WARPS = 4
# The interpreter costs about 1 ms a program: fewer, larger ones.
INTERPRETER_BLOCK_N = 64
INTERPRETER_MAX_BLOCK_L = 256

_LOG_2PI = math.log(2.0 * math.pi)


def _geometry(L: int, device: torch.device, fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_U, BLOCK_L): depends on L only (no variant per batch size)."""
    if device.type == "cpu":
        return INTERPRETER_BLOCK_N, BLOCK_U, min(triton.next_power_of_2(max(L, 1)), INTERPRETER_MAX_BLOCK_L)
    max_l = MAX_BLOCK_L // 2 if fp64 else MAX_BLOCK_L
    return BLOCK_N, BLOCK_U, min(triton.next_power_of_2(max(L, 1)), max_l)


def _prepare(means, logvars, logits):
    """(c (U,), inv_var (U, L)) in the accumulation dtype."""
    acc = accumulation_dtype(means.dtype)
    U, L = means.shape
    lv = logvars.to(acc)
    if logits is None:
        log_w = torch.full((U,), -math.log(U), dtype=acc, device=means.device)
    else:
        log_w = torch.log_softmax(logits.to(acc), 0)
    c = log_w - 0.5 * (lv.sum(1) + L * _LOG_2PI)
    return c.contiguous(), torch.exp(-lv).contiguous()


# -- kernels ------------------------------------------------------------------


@triton.jit
def _quad(z_ptr, m_ptr, iv_ptr, rows, row_ok, comps, u_ok, L,
          ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_L: tl.constexpr):
    """sum_l (z[row, l] - means[comp, l])^2 inv_var[comp, l] as [BLOCK_N, BLOCK_U];
    masked lanes load 0 (mean and inv_var 0: they add 0)."""
    q = tl.zeros([BLOCK_N, BLOCK_U], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        l_ok = cols < L
        z = tl.load(z_ptr + rows[:, None] * L + cols[None, :], mask=row_ok[:, None] & l_ok[None, :],
                    other=0.0).to(ACC)
        cm = u_ok[:, None] & l_ok[None, :]
        m = tl.load(m_ptr + comps[:, None] * L + cols[None, :], mask=cm, other=0.0).to(ACC)
        iv = tl.load(iv_ptr + comps[:, None] * L + cols[None, :], mask=cm, other=0.0)
        d = z[:, None, :] - m[None, :, :]
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
    iv_ptr,  # (U, L) exp(-logvars), ACC
    c_ptr,  # (U,) ACC
    out_ptr,  # (N,)
    N,
    U,
    L,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    run_max = tl.full([BLOCK_N], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_N], dtype=ACC)
    for u0 in range(0, U, BLOCK_U):
        comps = u0 + tl.arange(0, BLOCK_U)
        u_ok = comps < U
        q = _quad(z_ptr, m_ptr, iv_ptr, rows, row_ok, comps, u_ok, L, ACC, BLOCK_N, BLOCK_U, BLOCK_L)
        c = tl.load(c_ptr + comps, mask=u_ok, other=float("-inf"))
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
    iv_ptr,  # (U, L) ACC
    c_ptr,  # (U,) ACC
    out_ptr,  # (N,)
    dz_ptr,  # (N, L): dz itself (SINGLE_L) or a zeroed ACC buffer
    N,
    U,
    L,
    SINGLE_L: tl.constexpr,  # L fits one BLOCK_L: dz stays in registers
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    g, o, live = _row_state(g_ptr, out_ptr, rows, row_ok, ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_L], dtype=ACC)
    for u0 in range(0, U, BLOCK_U):
        comps = u0 + tl.arange(0, BLOCK_U)
        u_ok = comps < U
        q = _quad(z_ptr, m_ptr, iv_ptr, rows, row_ok, comps, u_ok, L, ACC, BLOCK_N, BLOCK_U, BLOCK_L)
        c = tl.load(c_ptr + comps, mask=u_ok, other=float("-inf"))
        gw = _weights(g, o, live, c, q, u_ok)
        for l0 in range(0, L, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L)
            l_ok = cols < L
            zmask = row_ok[:, None] & l_ok[None, :]
            z = tl.load(z_ptr + rows[:, None] * L + cols[None, :], mask=zmask & live[:, None], other=0.0).to(ACC)
            cm = u_ok[:, None] & l_ok[None, :]
            m = tl.load(m_ptr + comps[:, None] * L + cols[None, :], mask=cm, other=0.0).to(ACC)
            iv = tl.load(iv_ptr + comps[:, None] * L + cols[None, :], mask=cm, other=0.0)
            t = (z[:, None, :] - m[None, :, :]) * iv[None, :, :]
            contrib = -tl.sum(gw[:, :, None] * t, axis=1)
            if SINGLE_L:
                acc += contrib
            else:
                ptrs = dz_ptr + rows[:, None] * L + cols[None, :]
                tl.store(ptrs, tl.load(ptrs, mask=zmask, other=0.0) + contrib, mask=zmask)
    if SINGLE_L:
        cols = tl.arange(0, BLOCK_L)
        zmask = row_ok[:, None] & (cols < L)[None, :]
        tl.store(dz_ptr + rows[:, None] * L + cols[None, :], acc.to(dz_ptr.dtype.element_ty), mask=zmask)


@triton.jit(do_not_specialize=["N", "U", "ROWS_PER"])
def _mixture_params_kernel(
    g_ptr,  # (N,)
    z_ptr,  # (N, L)
    m_ptr,  # (U, L)
    iv_ptr,  # (U, L) ACC
    c_ptr,  # (U,) ACC
    out_ptr,  # (N,)
    part_m_ptr,  # (splits, U, L) ACC, zeroed: sum g w t over the split's rows
    part_v_ptr,  # (splits, U, L) ACC, zeroed: sum g w t d
    part_s_ptr,  # (splits, U) ACC: sum g w
    N,
    U,
    L,
    ROWS_PER,  # rows per split (a multiple of BLOCK_N)
    PARAMS: tl.constexpr,  # dmeans or dlogvars wanted (else only sum g w, for dlogits)
    SINGLE_L: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    u_blocks = tl.cdiv(U, BLOCK_U)
    split = pid // u_blocks
    comps = (pid % u_blocks).to(tl.int32) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = comps < U
    c = tl.load(c_ptr + comps, mask=u_ok, other=float("-inf"))
    n0 = split * ROWS_PER
    n1 = tl.minimum(n0 + ROWS_PER, N)
    acc_m = tl.zeros([BLOCK_U, BLOCK_L], dtype=ACC)
    acc_v = tl.zeros([BLOCK_U, BLOCK_L], dtype=ACC)
    acc_s = tl.zeros([BLOCK_U], dtype=ACC)
    part = split * U * L + comps[:, None] * L
    for r0 in range(n0, n1, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < n1
        g, o, live = _row_state(g_ptr, out_ptr, rows, row_ok, ACC)
        q = _quad(z_ptr, m_ptr, iv_ptr, rows, row_ok, comps, u_ok, L, ACC, BLOCK_N, BLOCK_U, BLOCK_L)
        gw = _weights(g, o, live, c, q, u_ok)
        acc_s += tl.sum(gw, axis=0)
        if PARAMS:
            for l0 in range(0, L, BLOCK_L):
                cols = l0 + tl.arange(0, BLOCK_L)
                l_ok = cols < L
                # dead rows read as 0: their z may be inf, and 0 * inf is NaN
                z = tl.load(z_ptr + rows[:, None] * L + cols[None, :], mask=live[:, None] & l_ok[None, :],
                            other=0.0).to(ACC)
                cm = u_ok[:, None] & l_ok[None, :]
                m = tl.load(m_ptr + comps[:, None] * L + cols[None, :], mask=cm, other=0.0).to(ACC)
                iv = tl.load(iv_ptr + comps[:, None] * L + cols[None, :], mask=cm, other=0.0)
                d = z[:, None, :] - m[None, :, :]
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
    if PARAMS:
        if SINGLE_L:
            cols = tl.arange(0, BLOCK_L)
            cm = u_ok[:, None] & (cols < L)[None, :]
            tl.store(part_m_ptr + part + cols[None, :], acc_m, mask=cm)
            tl.store(part_v_ptr + part + cols[None, :], acc_v, mask=cm)


# -- launchers ----------------------------------------------------------------


def mixture_log_prob_forward(z, means, logvars, logits, out) -> None:
    """out (N,) <- mixture_log_prob of z (N, L), means, logvars (U, L), logits (U,) or None."""
    N, L = z.shape
    U = means.shape[0]
    if N == 0:
        return
    c, inv_var = _prepare(means, logvars, logits)
    bn, bu, bl = _geometry(L, z.device, means.dtype == torch.float64)
    _mixture_fwd_kernel[(triton.cdiv(N, bn),)](
        z, means, inv_var, c, out, N, U, L, ACC=acc_dtype(means.dtype), BLOCK_N=bn, BLOCK_U=bu, BLOCK_L=bl,
        num_warps=NUM_WARPS,
    )


def mixture_log_prob_backward(grad_out, z, means, logvars, logits, out, dz, dmeans, dlogvars, dlogits) -> None:
    """Writes whichever of dz (N, L), dmeans, dlogvars (U, L), dlogits (U,) are
    not None, given grad_out (N,) and the forward's out (N,)."""
    N, L = z.shape
    U = means.shape[0]
    acc = accumulation_dtype(means.dtype)
    c, inv_var = _prepare(means, logvars, logits)
    bn, bu, bl = _geometry(L, z.device, means.dtype == torch.float64)
    single_l = L <= bl
    ACC = acc_dtype(means.dtype)
    if dz is not None and N > 0:
        buf = dz if single_l else torch.zeros((N, L), dtype=acc, device=z.device)
        _mixture_dz_kernel[(triton.cdiv(N, bn),)](
            grad_out, z, means, inv_var, c, out, buf, N, U, L, SINGLE_L=single_l, ACC=ACC,
            BLOCK_N=bn, BLOCK_U=bu, BLOCK_L=bl, num_warps=NUM_WARPS,
        )
        if buf is not dz:
            dz.copy_(buf)
    params = dmeans is not None or dlogvars is not None
    if not params and dlogits is None:
        return
    u_blocks = triton.cdiv(U, bu)
    row_blocks = triton.cdiv(N, bn)
    splits, per_split = sample_splits(row_blocks, u_blocks, z.device)
    splits = max(splits, 1)
    part_shape = (splits, U, L) if params else (1,)
    part_m = torch.zeros(part_shape, dtype=acc, device=z.device)
    part_v = torch.zeros_like(part_m)
    part_s = torch.zeros((splits, U), dtype=acc, device=z.device)
    if N > 0:
        _mixture_params_kernel[(u_blocks * splits,)](
            grad_out, z, means, inv_var, c, out, part_m, part_v, part_s, N, U, L, per_split * bn,
            PARAMS=params, SINGLE_L=single_l, ACC=ACC, BLOCK_N=bn, BLOCK_U=bu, BLOCK_L=bl, num_warps=NUM_WARPS,
        )
    s = part_s.sum(0)
    if dmeans is not None:
        dmeans.copy_(part_m.sum(0))
    if dlogvars is not None:
        dlogvars.copy_(0.5 * (part_v.sum(0) - s[:, None]))
    if dlogits is not None:
        dlogits.copy_(s - torch.softmax(logits.to(acc), 0) * grad_out.to(acc).sum())
