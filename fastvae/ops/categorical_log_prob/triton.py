"""Triton kernels of categorical_log_prob:
    out[k, p] = sum_d(l[x[p, d]] - logsumexp_c l),  l = logits[k, p, d, :],
and the backward dlogits = g (onehot(x) - softmax(l)).

Layout: logits (K, P, D, C), the class dim C innermost and contiguous; x (P,
D) int64, broadcast over K by indexing. A class row is read in tiles of
BLOCK_C classes with the online log-sum-exp (a running max and a sum rescaled
when the max grows), so C of a few thousand needs no more registers than
C = BLOCK_C. The picked logit is one masked load at x's index: an index
outside [0, C) never reads memory and gives NaN (the front end refuses it
before, with an error naming x).
- forward: a program owns BLOCK_KP output rows (k, p) and walks their D
  class rows BLOCK_D at a time, a [BLOCK_KP * BLOCK_D, BLOCK_C] tile, summing
  over d in registers (one store per output, no partial sums);
- backward: a program owns BLOCK_R class rows (k, p, d), recomputes their
  log-sum-exp in one pass over C and writes dlogits in a second.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import INTERPRETER_BLOCK_ROWS, acc_dtype, cdiv, next_power_of_2, program_rows

# Class tiles: a row of C classes is read in tiles of at most MAX_BLOCK_C.
MAX_BLOCK_C = 1024
TILE = 4096  # elements per program and class tile on a GPU (8 warps at 4096 float32)
# Class rows per program at most: each row keeps a running max, sum, class
# index and int64 offsets live; 512 or more rows of C = 2 spilled on sm_80/sm_90.
MAX_ROWS = 256

# -- kernels ------------------------------------------------------------------


@triton.jit
def _row_state(logits_ptr, base, ok, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """(shift, log sum_c e^(l_c - shift)) of BLOCK_R class rows starting at
    ``base``: the online log-sum-exp over tiles of BLOCK_C classes; shift is
    the row's max where finite, else 0 (a row of all -inf has log-sum -inf)."""
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = ok[:, None] & (c < C)[None, :]
        lg = tl.load(logits_ptr + base[:, None] + c[None, :], mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(lg, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(lg - shift[:, None]), axis=1)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    return shift, tl.log(s)


@triton.jit
def _picked(logits_ptr, base, ok, cls, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """l[cls] of each row, NaN where cls is outside [0, C) (that load is masked:
    it never leaves the row)."""
    inside = (cls >= 0) & (cls < C)
    safe = tl.where(inside & ok, cls, 0)
    lg = tl.load(logits_ptr + base + safe, mask=ok & inside, other=0.0).to(ACC)
    return tl.where(inside, lg, float("nan"))


@triton.jit(do_not_specialize=["P", "KP"])
def _categorical_log_prob_fwd_kernel(
    x_ptr,  # (P, D) int64
    logits_ptr,  # (K, P, D, C) = (KP, D, C)
    out_ptr,  # (K, P) = (KP,)
    P,
    KP,
    D,
    C,
    ACC: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_KP * BLOCK_D)
    kp = pid * BLOCK_KP + (i // BLOCK_D).to(tl.int64)
    kp_ok = kp < KP
    p = kp % P
    acc = tl.zeros([BLOCK_KP], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + i % BLOCK_D
        ok = kp_ok & (d < D)
        row = kp * D + d
        base = row * C
        cls = tl.load(x_ptr + p * D + d, mask=ok, other=0)
        shift, log_sum = _row_state(logits_ptr, base, ok, C, BLOCK_KP * BLOCK_D, BLOCK_C, ACC)
        picked = _picked(logits_ptr, base, ok, cls, C, BLOCK_KP * BLOCK_D, BLOCK_C, ACC)
        # (l[x] - shift) - log sum: a large max never rounds the result
        term = tl.where(picked == float("-inf"), picked, (picked - shift) - log_sum)
        term = tl.where(ok, term, 0.0)
        acc += tl.sum(tl.reshape(term, [BLOCK_KP, BLOCK_D]), axis=1)
    r = pid * BLOCK_KP + tl.arange(0, BLOCK_KP).to(tl.int64)
    tl.store(out_ptr + r, acc.to(out_ptr.dtype.element_ty), mask=r < KP)


@triton.jit(do_not_specialize=["P", "R"])
def _categorical_log_prob_bwd_kernel(
    grad_out_ptr,  # (K, P) = (KP,)
    x_ptr,  # (P, D) int64
    logits_ptr,  # (K, P, D, C) = (R, C), R = K * P * D class rows
    dlogits_ptr,  # (R, C)
    P,
    D,
    R,
    C,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, ok = program_rows(BLOCK_R, R)
    kp = row // D
    d = row % D
    cls = tl.load(x_ptr + (kp % P) * D + d, mask=ok, other=0)
    g = tl.load(grad_out_ptr + kp, mask=ok, other=0.0).to(ACC)
    base = row * C
    shift, log_sum = _row_state(logits_ptr, base, ok, C, BLOCK_R, BLOCK_C, ACC)
    keep = tl.where(log_sum == float("-inf"), 0.0, 1.0)  # every logit -inf: no softmax
    log_sum = tl.where(log_sum == float("-inf"), 0.0, log_sum)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = ok[:, None] & (c < C)[None, :]
        lg = tl.load(logits_ptr + base[:, None] + c[None, :], mask=mask, other=float("-inf")).to(ACC)
        prob = keep[:, None] * tl.exp((lg - shift[:, None]) - log_sum[:, None])
        onehot = tl.where(c[None, :] == cls[:, None], 1.0, 0.0)
        dl = g[:, None] * (onehot - prob)
        tl.store(dlogits_ptr + base[:, None] + c[None, :], dl.to(dlogits_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def _geometry(D: int, C: int, device: torch.device, fp64: bool) -> tuple[int, int, int, int]:
    """(BLOCK_KP, BLOCK_D, BLOCK_C, num_warps): class tiles of up to
    MAX_BLOCK_C, and as many class rows as fill a tile of TILE elements (a
    quarter for float64); under the interpreter (cpu) INTERPRETER_BLOCK_ROWS
    rows whatever C. From D and C only: no variant per batch size or K."""
    block_c = min(next_power_of_2(max(C, 1)), MAX_BLOCK_C)
    if device.type == "cpu":
        rows, warps = INTERPRETER_BLOCK_ROWS, 4
    else:
        tile = TILE // 4 if fp64 else TILE
        rows = max(1, min(MAX_ROWS, tile // block_c))
        warps = 8 if rows * block_c * (8 if fp64 else 4) >= (8192 if fp64 else 16384) else 4
    block_d = min(next_power_of_2(max(D, 1)), rows)
    return max(1, rows // block_d), block_d, block_c, warps


def forward_plan(K: int, P: int, D: int, C: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[tuple[int], dict]:
    """(grid, meta) of the forward kernel for logits (K, P, D, C) of ``dtype``
    (K * P > 0): the shapes' part of a launch, worked out once per call
    signature by the op's plans (op.py's CategoricalPlan)."""
    block_kp, block_d, block_c, warps = _geometry(D, C, device, dtype == torch.float64)
    return (cdiv(K * P, block_kp),), dict(ACC=acc_dtype(dtype), BLOCK_KP=block_kp, BLOCK_D=block_d,
                                          BLOCK_C=block_c, num_warps=warps)


def backward_plan(K: int, P: int, D: int, C: int, dtype: torch.dtype, device: torch.device
                  ) -> tuple[tuple[int], dict]:
    """(grid, meta) of the backward kernel, as forward_plan's (K * P * D > 0)."""
    block_r, _, block_c, warps = _geometry(1, C, device, dtype == torch.float64)
    return (cdiv(K * P * D, block_r),), dict(ACC=acc_dtype(dtype), BLOCK_R=block_r, BLOCK_C=block_c,
                                             num_warps=warps)


def categorical_log_prob_forward(x, logits, out) -> None:
    """out (K, P) <- sum_d(l[x] - logsumexp(l)) for x (P, D) int64, logits (K, P, D, C)."""
    K, P, D, C = logits.shape
    if K * P == 0:
        return
    grid, meta = forward_plan(K, P, D, C, logits.dtype, logits.device)
    _categorical_log_prob_fwd_kernel[grid](x, logits, out, P, K * P, D, C, **meta)


def categorical_log_prob_backward(grad_out, x, logits, dlogits) -> None:
    """dlogits (K, P, D, C) <- g (onehot(x) - softmax(l)) given grad_out (K, P)."""
    K, P, D, C = logits.shape
    if K * P * D == 0:
        return
    grid, meta = backward_plan(K, P, D, C, logits.dtype, logits.device)
    _categorical_log_prob_bwd_kernel[grid](grad_out, x, logits, dlogits, P, D, K * P * D, C, **meta)
