"""laplace_log_prob, described once: the Laplace reconstruction term
log Laplace(x; loc, b) = -|x - loc| / b - log(2 b) summed over the last
dimension, for x (..., D) broadcast against the decoder location (K, ..., D),
with b = exp(log_scale) or a fixed scale; the decoder likelihood of
likelihood="laplace" (the L1 loss: -log p under b = 1 is
F.l1_loss(reduction='sum') plus D log 2).

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._oracle_math import sum_to
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("laplace_log_prob_forward", "laplace_log_prob", ("x", "loc", "log_scale", "out"), heavy="D",
           vector_loads=True),
    Kernel("laplace_log_prob_backward", "laplace_log_prob",
           ("grad_out", "x", "loc", "log_scale", "dx", "dloc", "dlog_scale"), heavy="D"),
)

OP = Op("laplace_log_prob", tuple(k.name for k in KERNELS), "fastvae/ops/laplace_log_prob/test_laplace_log_prob.py",
        "laplace_log_prob", torch_ops=("laplace_log_prob",), likelihood="laplace",
        triton_ops=("laplace_log_prob", "laplace_log_prob_backward"))


# -- the oracle ------------------------------------------------------------------
# Kernel layout (set up by fastvae/_likelihood_layout.py, as gaussian_log_prob's):
# loc (K, P, D); x (P, D) broadcast over K, or (K, P, D); log_scale (K, P, D),
# (P, D) or (D,). Plain broadcasting covers every case here.

LOG_2 = math.log(2.0)


def laplace_log_prob(x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """-sum(|x - loc| * exp(-log_scale) + log_scale + log 2) over the last dim (broadcasting).

    Where x == loc exactly the deviation term is 0 whatever the scale: a scale
    that underflows (exp(-log_scale) = inf) must not give 0 * inf = NaN, in the
    value or, through the unselected branch of a where, in the gradient. The
    gradient in loc there is 0: torch's abs has sign(0) = 0, as
    torch.distributions.Laplace.log_prob's gradient does."""
    dev = (x - loc).abs()
    exact = dev == 0
    return -torch.sum(dev * torch.exp(-torch.where(exact, 0.0, log_scale)) + log_scale + LOG_2, dim=-1)


def laplace_log_prob_forward(x, loc, log_scale, out) -> None:
    acc = accumulation_dtype(loc.dtype)
    out.copy_(laplace_log_prob(x.to(acc), loc.to(acc), log_scale.to(acc)))


def laplace_log_prob_backward(grad_out, x, loc, log_scale, dx, dloc, dlog_scale) -> None:
    """d/dloc = g sign(x - loc) / b;  d/dlog_scale = g (|x - loc| / b - 1);
    d/dx = -d/dloc; sign(0) = 0, so at x == loc d/dloc = 0 and d/dlog_scale = -g."""
    acc = accumulation_dtype(loc.dtype)
    x, loc, s, g = x.to(acc), loc.to(acc), log_scale.to(acc), grad_out.to(acc)[..., None]
    diff = x - loc
    inv = torch.where(diff == 0, 0.0, torch.exp(-s))  # x == loc: no 0 * inf
    gl = g * torch.sign(diff) * inv
    dloc.copy_(gl)
    if dlog_scale is not None:
        dlog_scale.copy_(sum_to(g * (diff.abs() * inv - 1.0), dlog_scale.shape))
    if dx is not None:
        dx.copy_(sum_to(-gl, dx.shape))


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op laplace_log_prob) --


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s: x (B, D)
    against loc (K, B, D), the log-scale per element, per x row and per
    dimension (a fixed scale is a (D,) one), the forward and the backward with
    each gradient the front end asks for; m makes a tensor of the input dtype,
    r one of its accumulation dtype (kernels/aot.py)."""
    K, B, D = s["K"], s["B"], s["D"]
    for scale_shape in ((K, B, D), (B, D), (D,)):
        args = dict(x=m(B, D), loc=m(K, B, D), log_scale=m(*scale_shape))
        yield "laplace_log_prob_forward", dict(args, out=r(K, B))
        # (False, False): a fixed scale and x without a gradient (a location alone)
        for need_dx, need_ds in ((False, True), (True, False), (False, False)):
            yield "laplace_log_prob_backward", dict(
                grad_out=r(K, B), **args, dx=m(B, D) if need_dx else None, dloc=m(K, B, D),
                dlog_scale=m(*scale_shape) if need_ds else None)


# -- the benchmark row (python -m benchmarks.bench_op laplace_log_prob) ------------


def _bench_inputs(size: dict, device):
    B, D, K = size["B"], size["D"], size["K"]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, D, generator=g).to(device)
    loc = torch.rand(K, B, D, generator=g).to(device).requires_grad_()
    up = torch.randn(K, B, generator=g).to(device)
    if size["scale"] == "log_scale":
        log_scale = (torch.randn(K, B, D, generator=g) - 2).to(device).requires_grad_()
        return (x, loc, log_scale), [loc, log_scale], up
    return (x, loc), [loc], up


def _bench_eager(x: Tensor, loc: Tensor, log_scale: Tensor | None = None) -> Tensor:
    """The formula as users write it, broadcasting doing the K copies of x
    implicitly: a predicted log-scale, or the fixed scale 1 (the L1 loss);
    "compiled" is torch.compile of it."""
    if log_scale is None:
        return -torch.sum((x - loc).abs() + LOG_2, dim=-1)
    return -torch.sum((x - loc).abs() * torch.exp(-log_scale) + log_scale + LOG_2, dim=-1)


def _bench_min_bytes(size: dict) -> dict[str, int]:
    """The fewest bytes (float32): forward reads x once, loc (and log_scale)
    once and writes the (K, B) result; backward reads them again with the
    upstream gradient and writes dloc (and dlog_scale)."""
    B, D, K = size["B"], size["D"], size["K"]
    per_out = 2 if size["scale"] == "log_scale" else 1
    fwd = 4 * (B * D + K * B + per_out * K * B * D)
    bwd = 4 * (K * B + B * D + 2 * per_out * K * B * D)
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def _bench_sizes(B: int, D: int, ks: tuple[int, ...]) -> tuple[dict, ...]:
    """Per scale ("log_scale": a decoder that predicts a per-element log-scale;
    "fixed": scale 1, the L1 loss), float32, at each K of ks."""
    return tuple({"scale": scale, "B": B, "D": D, "K": K}
                 for scale, K in itertools.product(("log_scale", "fixed"), ks))


# x (B, D) broadcast against decoder locations (K, B, D)
BENCH = Bench("laplace_log_prob, B={B}, D={D}, float32",
              sizes=_bench_sizes(4096, 784, (1, 8)), quick=_bench_sizes(512, 784, (1, 4)),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=_bench_min_bytes, fastvae="laplace_log_prob",
              label_keys=("scale", "K"), repeats=lambda size: None)
