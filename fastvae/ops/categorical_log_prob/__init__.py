"""categorical_log_prob, described once: the categorical likelihood with
logits, log p(x | l) = sum_d log softmax(l[..., d, :])[x[..., d]], for x of
integer class indices (..., D) against decoder logits (K, ..., D, C), the C
classes innermost; the decoder likelihood of likelihood="categorical".

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("categorical_log_prob_forward", "categorical_log_prob", ("x", "logits", "out")),
    Kernel("categorical_log_prob_backward", "categorical_log_prob", ("grad_out", "x", "logits", "dlogits")),
)

OP = Op("categorical_log_prob", tuple(k.name for k in KERNELS),
        "fastvae/ops/categorical_log_prob/test_categorical_log_prob.py", "categorical_log_prob",
        likelihood="categorical", class_dims=1,
        triton_ops=("categorical_log_prob", "categorical_log_prob_backward"))


# -- the oracle ------------------------------------------------------------------
# x (P, D) integer class indices against logits (K, P, D, C);
# out[k, p] = sum_d (logits[k, p, d, x[p, d]] - logsumexp_c logits[k, p, d, c]).


def categorical_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """sum_d log softmax(logits[..., d, :])[x[..., d]] over the last dim of x
    (x broadcasts against logits' leading dims). A class whose logit is -inf
    has probability 0 (log-probability -inf, finite gradient); a row whose
    every logit is -inf has log-probability -inf."""
    x = torch.broadcast_to(x, logits.shape[:-1]).to(torch.int64)
    m = logits.detach().amax(-1, keepdim=True)  # a constant shift: it cancels in value and gradient
    shifted = logits - torch.where(torch.isneginf(m), 0.0, m)
    picked = torch.gather(shifted, -1, x[..., None])[..., 0]
    lse = torch.logsumexp(shifted, -1)
    return torch.where(torch.isneginf(picked), picked, picked - lse).sum(-1)


def categorical_log_prob_forward(x, logits, out) -> None:
    acc = accumulation_dtype(logits.dtype)
    out.copy_(categorical_log_prob(x, logits.to(acc)))


def categorical_log_prob_backward(grad_out, x, logits, dlogits) -> None:
    """d/dlogits = g (onehot(x) - softmax(logits)); a row of all -inf logits gets 0 from its softmax."""
    acc = accumulation_dtype(logits.dtype)
    logits, g = logits.to(acc), grad_out.to(acc)[..., None, None]
    x = torch.broadcast_to(x, logits.shape[:-1]).to(torch.int64)
    # (l - max) - log sum e^(l - max): l - lse would round through a large lse
    m = logits.amax(-1, keepdim=True)
    shifted = logits - torch.where(torch.isneginf(m), 0.0, m)
    log_sum = torch.logsumexp(shifted, -1, keepdim=True)
    empty = torch.isneginf(log_sum)  # every logit -inf: no softmax
    p = torch.where(empty, 0.0, torch.exp(shifted - torch.where(empty, 0.0, log_sum)))
    onehot = torch.zeros_like(logits).scatter_(-1, x[..., None], 1.0)
    dlogits.copy_(g * (onehot - p))


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op categorical_log_prob) --

# C at every ahead-of-time shape (a binary class, 256-way pixels and a
# 4096-class vocabulary); copied from kernels/aot.py's CATEGORICAL_CLASSES, whose
# shapes give K, B and D
AOT_CLASSES = (2, 256, 4096)


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s: x (B, D)
    int64 classes against logits (K, B, D, C) for each C of AOT_CLASSES, the
    forward and the backward; m makes a tensor of the input dtype, r one of its
    accumulation dtype (kernels/aot.py)."""
    K, B, D = s["K"], s["B"], s["D"]
    for C in AOT_CLASSES:
        x = torch.empty((B, D), dtype=torch.int64, device="meta")
        yield "categorical_log_prob_forward", dict(x=x, logits=m(K, B, D, C), out=r(K, B))
        yield "categorical_log_prob_backward", dict(grad_out=r(K, B), x=x, logits=m(K, B, D, C),
                                                    dlogits=m(K, B, D, C))


# -- the benchmark row (python -m benchmarks.bench_op categorical_log_prob) -------


def _bench_inputs(size: dict, device):
    B, D, C, K = size["B"], size["D"], size["C"], size["K"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, C, (B, D), generator=g).to(device)
    logits = (torch.randn(K, B, D, C, generator=g) * 3).to(device).requires_grad_()
    return (x, logits), [logits], torch.randn(K, B, generator=g).to(device)


def _bench_eager(x: Tensor, logits: Tensor) -> Tensor:
    """log_softmax + gather, as users write it (the same formula as
    torch.distributions.Categorical's log_prob); "compiled" is torch.compile of it."""
    idx = x.expand(logits.shape[:-1])[..., None]
    return torch.log_softmax(logits, -1).gather(-1, idx)[..., 0].sum(-1)


def _bench_min_bytes(size: dict) -> dict[str, int]:
    B, D, C, K = size["B"], size["D"], size["C"], size["K"]
    fwd = 8 * B * D + 4 * K * B + 4 * K * B * D * C  # x (int64), logits -> out
    bwd = 4 * K * B + 8 * B * D + 2 * 4 * K * B * D * C  # g, x, logits -> dlogits
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def _bench_sizes(B: int, D: int, C: int, ks: tuple[int, ...]) -> tuple[dict, ...]:
    return tuple({"B": B, "D": D, "C": C, "K": K} for K in ks)


# x (B, D) broadcast against logits (K, B, D, C), float32: 256-way pixels (C = 256,
# a PixelRNN-style decoder) and a few thousand classes (C = 4096, a vocabulary);
# each case at the harness's default repeat count
BENCH = Bench("categorical_log_prob, float32 logits (K, B, D, C)",
              sizes=_bench_sizes(64, 784, 256, (1, 4)) + _bench_sizes(64, 16, 4096, (1, 4)),
              quick=_bench_sizes(16, 64, 256, (1, 4)) + _bench_sizes(16, 4, 4096, (1,)),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=_bench_min_bytes, fastvae="categorical_log_prob",
              label_keys=("C", "K"), repeats=lambda size: None)
