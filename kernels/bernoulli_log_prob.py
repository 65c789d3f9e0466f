"""Triton kernels of bernoulli_log_prob:
    out[k, p] = sum_d(x[p, d] * l - softplus(l)),  l = logits[k, p, d],
and the fused backward dlogits = g (x - sigmoid(l)), dx = sum_k g l.

Layout: logits (K, P, D); x (P, D) broadcast over K by indexing, never copied.
"""
import triton
import triton.language as tl

from ._common import acc_dtype, blocks, sigmoid, softplus
from .gaussian_log_prob import MAX_BLOCK_D

# -- kernels ------------------------------------------------------------------


@triton.jit
def _bernoulli_log_prob_fwd_kernel(
    x_ptr,  # (P, D)
    logits_ptr,  # (K, P, D)
    out_ptr,  # (K, P)
    K,
    P,
    D,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    row_ok = rows < P
    for k in range(K):
        r = k * P + rows
        acc = tl.zeros([BLOCK_P], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            lg = tl.load(logits_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            acc += tl.sum(tl.where(mask, x * lg - softplus(lg), 0.0), axis=1)
        tl.store(out_ptr + r, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _bernoulli_log_prob_bwd_kernel(
    g_ptr,  # (K, P)
    x_ptr,  # (P, D)
    logits_ptr,  # (K, P, D)
    dx_ptr,  # (P, D), written when HAS_DX
    dlogits_ptr,  # (K, P, D)
    K,
    P,
    D,
    HAS_DX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    row_ok = rows < P
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        dx_acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
        for k in range(K):
            r = k * P + rows
            g = tl.load(g_ptr + r, mask=row_ok, other=0.0).to(ACC)[:, None]
            lg = tl.load(logits_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            dl = g * (x - sigmoid(lg))
            tl.store(dlogits_ptr + r[:, None] * D + cols[None, :], dl.to(dlogits_ptr.dtype.element_ty), mask=mask)
            dx_acc += g * lg
        if HAS_DX:
            tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx_acc.to(dx_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------


def bernoulli_log_prob_forward(x, logits, out) -> None:
    """out (K, P) <- sum_d(x l - softplus(l)) for x (P, D), logits (K, P, D)."""
    K, P, D = logits.shape
    if K * P == 0:
        return
    BLOCK_P, BLOCK_D = blocks(P, D, MAX_BLOCK_D)
    _bernoulli_log_prob_fwd_kernel[(triton.cdiv(P, BLOCK_P),)](
        x, logits, out, K, P, D, ACC=acc_dtype(logits.dtype), BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D
    )


def bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """dlogits (K, P, D) and, when dx is not None, dx (P, D) <- gradients given grad_out (K, P)."""
    K, P, D = logits.shape
    if K * P * D == 0:
        if dx is not None:
            dx.zero_()
        return
    BLOCK_P, BLOCK_D = blocks(P, D, MAX_BLOCK_D)
    _bernoulli_log_prob_bwd_kernel[(triton.cdiv(P, BLOCK_P),)](
        grad_out, x, logits, dx if dx is not None else dlogits, dlogits, K, P, D,
        HAS_DX=dx is not None, ACC=acc_dtype(logits.dtype), BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D,
    )
