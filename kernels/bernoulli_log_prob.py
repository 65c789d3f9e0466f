"""Triton kernels of bernoulli_log_prob:
    out[k, p] = sum_d(x[p, d] * l - softplus(l)),  l = logits[k, p, d],
and the fused backward dlogits = g (x - sigmoid(l)), dx = sum_k g l.

Layout: logits (K, P, D); x (P, D) broadcast over K by indexing, never copied.
The forward tiles the K * P decoder rows; the backward gives each program rows
of x and a range of samples, with partial sums of dx reduced by the launcher
in a fixed order (docs/triton.md).
"""
import torch
import triton
import triton.language as tl

from ._common import (
    MAX_BLOCK_COLS_BACKWARD,
    acc_dtype,
    accumulation_dtype,
    block_cols,
    block_rows,
    num_warps,
    sample_splits,
    sigmoid,
    softplus,
)

# -- math helpers -------------------------------------------------------------


@triton.jit
def _weighted(w, s):
    """w * s with 0 * inf = 0: a zero weight on a saturated softplus adds nothing."""
    return tl.where(w == 0.0, 0.0, w * s)


@triton.jit
def _log_prob_term(x, lg):
    """x l - softplus(l) as -(x softplus(-l) + (1 - x) softplus(l)): saturated
    logits (+-inf) give 0 where the outcome is certain and right, -inf where
    it is certain and wrong, never NaN."""
    return -(_weighted(x, softplus(-lg)) + _weighted(1.0 - x, softplus(lg)))


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["P", "KP"])
def _bernoulli_log_prob_fwd_kernel(
    x_ptr,  # (P, D)
    logits_ptr,  # (K, P, D) = (KP, D) decoder rows
    out_ptr,  # (K, P) = (KP,)
    P,
    KP,
    D,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_ok = r < KP
    p = r % P
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + p[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        lg = tl.load(logits_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        acc += tl.sum(tl.where(mask, _log_prob_term(x, lg), 0.0), axis=1)
    tl.store(out_ptr + r, acc.to(out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=["P", "K", "K_PER"])
def _bernoulli_log_prob_bwd_kernel(
    grad_out_ptr,  # (K, P)
    x_ptr,  # (P, D)
    logits_ptr,  # (K, P, D)
    dlogits_ptr,  # (K, P, D)
    part_dx_ptr,  # (splits, P, D): sum_k g l over the split, when HAS_DX
    P,
    D,
    K,
    K_PER,  # samples per split
    HAS_DX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_blocks = tl.cdiv(P, BLOCK_R)
    split = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < P
    k0 = split * K_PER
    k1 = tl.minimum(k0 + K_PER, K)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        dx_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        for k in range(k0, k1):
            r = k * P + rows
            g = tl.load(grad_out_ptr + r, mask=row_ok, other=0.0).to(ACC)[:, None]
            lg = tl.load(logits_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            dl = _weighted(g, x - sigmoid(lg))  # exactly 0 where a saturated logit is right
            tl.store(dlogits_ptr + r[:, None] * D + cols[None, :], dl.to(dlogits_ptr.dtype.element_ty), mask=mask)
            if HAS_DX:
                dx_acc += g * lg
        if HAS_DX:
            tl.store(part_dx_ptr + split * P * D + rows[:, None] * D + cols[None, :], dx_acc, mask=mask)


# -- launchers ----------------------------------------------------------------


def bernoulli_log_prob_forward(x, logits, out) -> None:
    """out (K, P) <- sum_d(x l - softplus(l)) for x (P, D), logits (K, P, D)."""
    K, P, D = logits.shape
    rows = block_rows(logits.device)  # rows per program
    if K * P == 0:
        return
    BLOCK_D = block_cols(D)
    _bernoulli_log_prob_fwd_kernel[(triton.cdiv(K * P, rows),)](
        x, logits, out, P, K * P, D, ACC=acc_dtype(logits.dtype), BLOCK_R=rows, BLOCK_D=BLOCK_D,
        num_warps=num_warps(BLOCK_D, logits.dtype == torch.float64),
    )


def bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """dlogits (K, P, D) and, when dx is not None, dx (P, D) <- gradients given grad_out (K, P)."""
    K, P, D = logits.shape
    rows = block_rows(logits.device)  # rows per program
    if K * P * D == 0:
        if dx is not None:
            dx.zero_()
        return
    has_dx = dx is not None
    BLOCK_D = block_cols(D, MAX_BLOCK_COLS_BACKWARD)
    row_blocks = triton.cdiv(P, rows)
    # without dx nothing is summed over samples: one sample per program
    splits, per_split = sample_splits(K, row_blocks, logits.device) if has_dx else (K, 1)
    acc = accumulation_dtype(logits.dtype)
    part_dx = torch.empty((splits, P, D) if has_dx else (1,), dtype=acc, device=logits.device)
    _bernoulli_log_prob_bwd_kernel[(row_blocks * splits,)](
        grad_out, x, logits, dlogits, part_dx, P, D, K, per_split,
        HAS_DX=has_dx, ACC=acc_dtype(logits.dtype), BLOCK_R=rows, BLOCK_D=BLOCK_D,
        num_warps=num_warps(BLOCK_D, logits.dtype == torch.float64),
    )
    if has_dx:
        dx.copy_(part_dx.sum(0))
