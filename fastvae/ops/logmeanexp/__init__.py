"""The importance-weighting family, described once: logmeanexp,
importance_weights and effective_sample_size over the sample dimension K of
log-weights lw, which share their kernels (the (max, sumexp) state of a
column, and the e * (a + b e) pass behind the gradients and the weights), and
the evaluation's logmeanexp_accumulate, which folds chunks of K into running
states.

This file is the family's description (its registry entries, its kernels'
argument names, its ahead-of-time cases and its benchmark row) and its oracle:
the plain-PyTorch formulas the reference backend runs and the tests compare
with. The rest of the family sits beside it (fastvae/ops/__init__.py lists the
files).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("logmeanexp_forward", "logmeanexp", ("lw", "lw_max", "sumexp", "out", "ess"), ("divisor",)),
    Kernel("logmeanexp_backward", "logmeanexp", ("lw", "lw_max", "sumexp", "grad_out", "grad_sumexp", "ess", "dlw"),
           ("g_divisor", "dlw_weighted")),
    # the evaluation's chunk: the states of lw (+ latent) and of twice that, merged
    # into running states in place (sq_*: the state of 2 lw, i.e. of w^2)
    Kernel("logmeanexp_accumulate", "logmeanexp",
           ("lw", "latent", "lw_max", "sumexp", "sq_max", "sq_sumexp", "first")),
    Kernel("importance_weights_backward", "logmeanexp", ("grad_w", "w", "dlw")),
)

_TEST = "fastvae/ops/logmeanexp/test_logmeanexp.py"
OPS = (
    Op("logmeanexp", ("logmeanexp_forward", "logmeanexp_backward", "logmeanexp_accumulate"), _TEST, "logmeanexp",
       launches=(1, 2, 0), torch_ops=("logmeanexp",), triton_ops=("logmeanexp", "logmeanexp_backward"),
       model_bytes=lambda shape, dtype: _bench_min_bytes(shape, getattr(torch, dtype).itemsize)),
    # forward: the log-mean-exp state, then its backward kernel at gradient 1 (a ones_like)
    Op("importance_weights", ("importance_weights_backward", "logmeanexp_backward"), _TEST, "logmeanexp",
       launches=(2, 1, 1), other_kernels=("ones_like",)),
    Op("effective_sample_size", ("logmeanexp_forward", "logmeanexp_backward"), _TEST, "logmeanexp"),
)


# -- the oracle ------------------------------------------------------------------
# Log-weights lw are (K, ...), reduced over the leading
# sample dim K. A column's state is (m, s): m the largest non-NaN log-weight
# (-inf if none), s = sum_k exp(lw_k - shift(m)) with shift(m) = m when finite,
# else 0. The differentiable oracles below route their gradients around the
# empty (all -inf) columns with where() on safe values, so those get zero
# gradients instead of inf * 0 = NaN.


def _lme_shift(m: Tensor) -> Tensor:
    return torch.where(m.isinf(), torch.zeros_like(m), m)


def logmeanexp_state(lw: Tensor) -> tuple[Tensor, Tensor]:
    """(m, s) over dim 0; m carries no gradient (the shift cancels in every
    quantity derived from the state), s does."""
    m = torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw).amax(0).detach()
    return m, torch.exp(lw - _lme_shift(m)).sum(0)


def _logmeanexp_from_state(m: Tensor, s: Tensor, K: int) -> Tensor:
    empty = s == 0
    out = _lme_shift(m) + torch.log(torch.where(empty, torch.ones_like(s), s)) - math.log(K)
    return torch.where(empty, torch.full_like(s, -math.inf), out)


def logmeanexp(lw: Tensor) -> Tensor:
    """log(mean_k exp(lw_k)) over dim 0: -inf with zero gradient for an all -inf column."""
    return _logmeanexp_from_state(*logmeanexp_state(lw), lw.shape[0])


def importance_weights(lw: Tensor) -> Tensor:
    """softmax over dim 0; all-zero weights for an all -inf column."""
    m, s = logmeanexp_state(lw)
    return torch.exp(lw - _lme_shift(m)) / torch.where(s == 0, torch.ones_like(s), s)


def effective_sample_size(lw: Tensor) -> Tensor:
    """1 / sum_k w_k^2 of the normalized weights; 0 for an all -inf column."""
    q = importance_weights(lw).square().sum(0)
    empty = q == 0
    return torch.where(empty, torch.zeros_like(q), 1.0 / torch.where(empty, torch.ones_like(q), q))


def logmeanexp_forward(lw, lw_max, sumexp, out, ess) -> None:
    """lw_max, sumexp (M,) <- the state of lw (K, M); out = logmeanexp and
    ess = sumexp^2 / sum_k exp(2 (lw_k - shift)) (0 if sumexp = 0) when given."""
    x = lw.to(accumulation_dtype(lw.dtype))
    m_ref, s_ref = logmeanexp_state(x)
    lw_max.copy_(m_ref)
    sumexp.copy_(s_ref)
    if out is not None:
        out.copy_(_logmeanexp_from_state(m_ref, s_ref, x.shape[0]))
    if ess is not None:
        s2 = torch.exp(2.0 * (x - _lme_shift(m_ref))).sum(0)
        ess.copy_(torch.where(s_ref == 0, torch.zeros_like(s_ref), s_ref * s_ref / s2))


def _merge_state(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """The state of the union of two disjoint sample sets; an empty side
    (max -inf) contributes 0 (its sum, 0 or NaN, times 0)."""
    m = torch.maximum(m1, m2)

    def rescale(mo):
        return torch.where(mo == -math.inf, torch.zeros_like(mo), torch.exp(_lme_shift(mo) - _lme_shift(m)))

    return m, s1 * rescale(m1) + s2 * rescale(m2)


def logmeanexp_accumulate(lw, latent, lw_max, sumexp, sq_max, sq_sumexp, first) -> None:
    """(lw_max, sumexp) <- its merge with the state of x = lw + latent (K, M)
    (lw when latent is None), (sq_max, sq_sumexp) <- its merge with the state
    of 2 x; with first the states of x and 2 x are written instead."""
    acc = accumulation_dtype(lw.dtype)
    x = lw.to(acc) if latent is None else lw.to(acc) + latent.to(acc)
    for mx, sx, y in ((lw_max, sumexp, x), (sq_max, sq_sumexp, 2.0 * x)):
        m, s = logmeanexp_state(y)
        if not first:
            m, s = _merge_state(mx.to(acc), sx.to(acc), m, s)
        mx.copy_(m)
        sx.copy_(s)


def logmeanexp_backward(lw, lw_max, sumexp, grad_out, grad_sumexp, ess, dlw) -> None:
    """dlw = e * (a + b e), e = exp(lw - lw_max) (exp(lw) where lw_max = -inf); per column,
    inv = 1 / sumexp (0 where sumexp = 0): a = grad_out inv + grad_sumexp, b = 0 without
    ess; a = 2 grad_out ess inv, b = -a ess inv with ess."""
    acc = accumulation_dtype(lw.dtype)
    mx = lw_max.to(acc)
    # shift by lw_max itself unless it is -inf (a +inf column then gives 0, and NaN
    # at the +inf entry, as the gradient of torch.logsumexp)
    e = torch.exp(lw.to(acc) - torch.where(mx == -math.inf, torch.zeros_like(mx), mx))
    s, g = sumexp.to(acc), grad_out.to(acc)
    inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    if ess is None:
        a = g * inv + (0.0 if grad_sumexp is None else grad_sumexp.to(acc))
        dlw.copy_(e * a)
    else:
        ess = ess.to(acc)
        dlw.copy_(2.0 * g * ess * inv * e * (1.0 - ess * inv * e))


def importance_weights_backward(grad_w, w, dlw) -> None:
    """dlw = w * (grad_w - sum_k grad_w * w)."""
    acc = accumulation_dtype(w.dtype)
    grad_w, w = grad_w.to(acc), w.to(acc)
    dlw.copy_(w * (grad_w - (grad_w * w).sum(0)))


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op logmeanexp) -----


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the family makes for the log-weights
    of K samples of B examples at shape s: logmeanexp (and logmeanexp_state)
    and effective_sample_size, forward and backward; importance_weights'
    forward (the state alone, then the backward kernel writing the weights)
    and backward; and the evaluation's chunk, merged into running states,
    without and with its latent term. m makes a tensor of the input dtype, r
    one of its accumulation dtype (kernels/aot.py); the state, the weights and
    the gradients of the outputs are of the accumulation dtype (float32 for
    half lw)."""
    K, B = s["K"], s["B"]
    state = dict(lw_max=r(B), sumexp=r(B))
    for ess in (False, True):  # logmeanexp, effective_sample_size
        yield "logmeanexp_forward", dict(lw=m(K, B), **state, out=None if ess else r(B), ess=r(B) if ess else None)
        yield "logmeanexp_backward", dict(lw=m(K, B), **state, grad_out=r(B), grad_sumexp=None if ess else r(B),
                                          ess=r(B) if ess else None, dlw=m(K, B))
    # importance_weights: the state, the weights (float32 for half lw), their backward
    yield "logmeanexp_forward", dict(lw=m(K, B), **state, out=None, ess=None)
    yield "logmeanexp_backward", dict(lw=m(K, B), **state, grad_out=r(B), grad_sumexp=None, ess=None, dlw=r(K, B))
    yield "importance_weights_backward", dict(grad_w=r(K, B), w=r(K, B), dlw=r(K, B))
    for latent in (None, m(K, B)):  # the evaluation's chunk (fastvae/evaluation.py)
        yield "logmeanexp_accumulate", dict(lw=m(K, B), latent=latent, lw_max=r(B), sumexp=r(B), sq_max=r(B),
                                            sq_sumexp=r(B), first=False)
    # the objectives' reduced IWAE bound (fastvae/_plan.py; Kernel.bound), where
    # one program reduces each column (the plans' case): lw in the compute dtype
    from .triton import forward_plan
    if forward_plan(K, B, r().dtype, r().device, True) is not None:
        yield "logmeanexp_forward", dict(lw=r(K, B), **state, out=r(), ess=None, divisor=B)
    for reduced, dreg in ((True, False), (True, True), (False, True)):  # DReG: also dlw times the weights
        yield "logmeanexp_backward", dict(lw=r(K, B), **state, grad_out=r() if reduced else r(B), grad_sumexp=None,
                                          ess=None, dlw=r(K, B), g_divisor=B if reduced else None,
                                          dlw_weighted=r(K, B) if dreg else None)


# -- the benchmark row (python -m benchmarks.bench_op logmeanexp) -----------------


def _bench_inputs(size: dict, device):
    K, B = size["K"], size["B"]
    g = torch.Generator(device="cpu").manual_seed(0)
    # log-weights of a trained IWAE spread over tens of nats within a column
    lw = (torch.randn(K, B, generator=g, dtype=torch.float32) * 10 - 100).to(device).requires_grad_()
    return (lw,), [lw], (torch.randn(B, generator=g, dtype=torch.float32).to(device),)


def _bench_eager(lw: Tensor) -> Tensor:
    """The baseline, written the way an IWAE user writes it."""
    return torch.logsumexp(lw, 0) - math.log(lw.shape[0])


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    """Fewest bytes each mode must move: lw read once per pass, outputs written once."""
    K, B = size["K"], size["B"]
    fwd = (K * B + B) * itemsize  # lw -> out
    bwd = (K * B + B + K * B) * itemsize  # lw, grad -> dlw (the (B,) state is noise)
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


# logmeanexp over K of (K, B) log-weights, one size per regime: K = 5000 of
# B = 512 (large-K evaluation: long columns, few of them) and K = 64 of
# B = 65536 (training: few samples, a wide batch)
BENCH = Bench("logmeanexp over K, float32", sizes=({"K": 5000, "B": 512}, {"K": 64, "B": 65536}),
              quick=({"K": 500, "B": 64}, {"K": 16, "B": 4096}), inputs=_bench_inputs, eager=_bench_eager,
              min_bytes=_bench_min_bytes, fastvae="logmeanexp", repeats=30)
