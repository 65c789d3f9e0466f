"""bernoulli_log_prob and continuous_bernoulli_log_prob, described once: a
family of two decoder likelihoods with logits that share their layout, their
kernels (one per backend, the formula a variant) and their front end:

    bernoulli_log_prob:            log p(x | l) = sum_d x l - softplus(l),
    continuous_bernoulli_log_prob: log p(x | l) = sum_d x l - softplus(l) + log C(l),

C(l) = l / tanh(l / 2) the continuous Bernoulli's normalizer (Loaiza-Ganem and
Cunningham 2019), for x (..., D) broadcast against logits (K, ..., D); the
decoder likelihoods of likelihood="bernoulli" and "continuous_bernoulli".

This file is the family's description (its ops' registry entries, their
kernels' argument names, their ahead-of-time cases and their benchmark row)
and its oracle: the plain-PyTorch formulas the reference backend runs and the
tests compare with. The rest of the family sits beside it
(fastvae/ops/__init__.py lists the files).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._oracle_math import softplus, sum_to
from ..._spec import BOUND_BACKWARD, BOUND_FORWARD, Bench, Kernel, Op

KERNELS = (
    Kernel("bernoulli_log_prob_forward", "bernoulli_likelihood", ("x", "logits", "out"), BOUND_FORWARD,
           heavy="D", vector_loads=True),
    Kernel("bernoulli_log_prob_backward", "bernoulli_likelihood", ("grad_out", "x", "logits", "dx", "dlogits"),
           BOUND_BACKWARD, heavy="D"),
    Kernel("continuous_bernoulli_log_prob_forward", "bernoulli_likelihood", ("x", "logits", "out"), heavy="D"),
    Kernel("continuous_bernoulli_log_prob_backward", "bernoulli_likelihood",
           ("grad_out", "x", "logits", "dx", "dlogits"), heavy="D"),
)

_TEST = "fastvae/ops/bernoulli_likelihood/test_bernoulli_likelihood.py"
OPS = (
    Op("bernoulli_log_prob", ("bernoulli_log_prob_forward", "bernoulli_log_prob_backward"), _TEST,
       "bernoulli_likelihood", torch_ops=("bernoulli_log_prob",), likelihood="bernoulli",
       route="bernoulli_route", plan_tail="BernoulliTail",
       triton_ops=("bernoulli_log_prob", "bernoulli_log_prob_backward"),
       model_bytes=lambda shape, dtype: _bench_min_bytes({**shape, "logits": dtype})),
    Op("continuous_bernoulli_log_prob",
       ("continuous_bernoulli_log_prob_forward", "continuous_bernoulli_log_prob_backward"), _TEST,
       "bernoulli_likelihood", likelihood="continuous_bernoulli",
       route="continuous_bernoulli_route",
       triton_ops=("continuous_bernoulli_log_prob", "continuous_bernoulli_log_prob_backward")),
)


# -- the oracle ------------------------------------------------------------------
# Kernel layout (set up by fastvae/_likelihood_layout.py): logits (K, P, D); x (P, D)
# broadcast over K. Plain broadcasting covers every case here.


def _times(a: Tensor, b: Tensor) -> Tensor:
    """a * b with 0 * inf = 0: a certain outcome weighted by zero contributes nothing.
    Only those elements are masked, so every other one keeps its gradient."""
    zero = (a == 0) & b.isinf()
    return torch.where(zero, 0.0, a) * torch.where(zero, 0.0, b)


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """sum(x * logits - softplus(logits)) over the last dim: log Bernoulli(x; sigmoid(logits)),
    written -(x softplus(-l) + (1 - x) softplus(l)) so that saturated logits (+-inf) give
    0 where the outcome is certain and right and -inf where it is certain and wrong."""
    return -torch.sum(_times(x, softplus(-logits)) + _times(1.0 - x, softplus(logits)), dim=-1)


def _log_prob_into(log_prob, x, logits, out) -> None:
    """out <- log_prob(x, logits) in the accumulation dtype: both likelihoods' forward kernel."""
    acc = accumulation_dtype(logits.dtype)
    out.copy_(log_prob(x.to(acc), logits.to(acc)))


def _gradients_into(dlogits_of, grad_out, x, logits, dx, dlogits) -> None:
    """dlogits <- dlogits_of(g, x, l) and dx (if given) <- g l summed to its
    shape, in the accumulation dtype: both likelihoods' backward kernel."""
    acc = accumulation_dtype(logits.dtype)
    x, logits, g = x.to(acc), logits.to(acc), grad_out.to(acc)[..., None]
    dlogits.copy_(dlogits_of(g, x, logits))
    if dx is not None:
        dx.copy_(sum_to(g * logits, dx.shape))


def bernoulli_log_prob_forward(x, logits, out) -> None:
    _log_prob_into(bernoulli_log_prob, x, logits, out)


def bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """d/dlogits = g (x - sigmoid(l));  d/dx = g l."""
    _gradients_into(lambda g, x, lg: _times(g, x - torch.sigmoid(lg)), grad_out, x, logits, dx, dlogits)


# -- the continuous Bernoulli ------------------------------------------------------
# continuous_bernoulli_log_prob: the Bernoulli term plus the log normalizer log C(l)
# of Loaiza-Ganem and Cunningham (2019).
#
# log C(l) = log(l / tanh(l / 2)) = log 2 + sum_n CB_TAYLOR[n - 1] l^(2n), and
# d log C / dl = 1/l - 1/sinh(l) = sum_n 2n CB_TAYLOR[n - 1] l^(2n - 1): the
# coefficients 2 (2^(2n-1) - 1) B_2n / (2n)! / (2n) of the csch series, B the
# Bernoulli numbers (ratio about 1/pi^2 from one to the next).
CB_TAYLOR = (1 / 12, -7 / 1440, 31 / 90720, -127 / 4838400, 73 / 34214400, -1414477 / 7846046208000,
             8191 / 523069747200, -16931177 / 12194997534720000)
# Below this |logit| the gradient's Taylor branch: 1/l - 1/sinh(l) cancels
# there (l = 0.25 loses 7 bits); 8 terms leave 3e-21 at the branch point.
CB_TAYLOR_BELOW = 0.25


def _cb_log_norm_grad(lg: Tensor) -> Tensor:
    a = lg.abs()
    small = a < CB_TAYLOR_BELOW
    ls = torch.where(small, lg, 0.0)
    u = ls * ls
    poly = torch.zeros_like(lg)
    for n in range(len(CB_TAYLOR), 0, -1):
        poly = poly * u + 2 * n * CB_TAYLOR[n - 1]
    a_big = torch.where(small, 1.0, a)
    t = torch.exp(-a_big)
    exact = torch.sign(lg) * (1.0 / a_big - 2.0 * t / ((1.0 - t) * (1.0 + t)))
    return torch.where(small, poly * ls, exact)


class _CBLogNorm(torch.autograd.Function):
    """log C(l) by the closed form log(a / -expm1(-a)) + log1p(e^-a), a = |l|
    (accurate for every a > 0 in float64: expm1 is), log 2 at 0; its
    gradient 1/l - 1/sinh(l) with a Taylor branch near 0."""

    @staticmethod
    def forward(ctx, lg):
        ctx.save_for_backward(lg)
        a = lg.abs()
        zero = a == 0
        a1 = torch.where(zero, 1.0, a)
        value = torch.log(a1 / -torch.expm1(-a1)) + torch.log1p(torch.exp(-a1))
        return torch.where(zero, math.log(2.0), value)

    @staticmethod
    def backward(ctx, g):
        (lg,) = ctx.saved_tensors
        return g * _cb_log_norm_grad(lg)


def continuous_bernoulli_log_norm(lg: Tensor) -> Tensor:
    """log C(l), the continuous Bernoulli's log normalizer at logit l: C(l) =
    l / tanh(l / 2) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda), lambda = sigmoid(l)."""
    return _CBLogNorm.apply(lg)


def continuous_bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """sum over the last dim of x l - softplus(l) + log C(l) (finite logits, x in [0, 1])."""
    return (x * logits - softplus(logits) + continuous_bernoulli_log_norm(logits)).sum(-1)


def continuous_bernoulli_log_prob_forward(x, logits, out) -> None:
    _log_prob_into(continuous_bernoulli_log_prob, x, logits, out)


def continuous_bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """d/dlogits = g (x - sigmoid(l) + 1/l - 1/sinh(l));  d/dx = g l (summed over samples)."""
    _gradients_into(lambda g, x, lg: g * (x - torch.sigmoid(lg) + _cb_log_norm_grad(lg)), grad_out, x, logits, dx,
              dlogits)


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op bernoulli_log_prob) --


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the family makes at shape s (K samples
    of B rows of D), each op's forward and its backward without and with dx;
    m makes a tensor of the input dtype, r one of its accumulation dtype
    (kernels/aot.py). x in the logits' dtype (a model cast to half precision),
    and for half logits float32 x (autocast: a half decoder output against
    float32 data); continuous_bernoulli_log_prob's launches are
    bernoulli_log_prob's. Then bernoulli_log_prob's with the
    objectives' bound (Kernel.bound), as their plans launch them."""
    K, B, D = s["K"], s["B"], s["D"]
    x_dtypes = (m,) if m().dtype == r().dtype else (m, r)
    for op in OPS:
        for make_x in x_dtypes:
            x = make_x(B, D)
            yield f"{op.name}_forward", dict(x=x, logits=m(K, B, D), out=r(K, B))
            for dx in (None, make_x(B, D)):
                yield f"{op.name}_backward", dict(grad_out=r(K, B), x=x, logits=m(K, B, D), dx=dx,
                                                  dlogits=m(K, B, D))
    # the objectives' bound (fastvae/_plan.py): x, the latent term and the bound
    # in the compute dtype (float32 under autocast); reduced or per row
    x, term = r(B, D), r(K, B)
    for reduced in (False, True):
        yield "bernoulli_log_prob_forward", dict(x=x, logits=m(K, B, D), out=r() if reduced else r(K, B), term=term,
                                                 weight=-1.0, divisor=B if reduced else None)
        yield "bernoulli_log_prob_backward", dict(grad_out=r() if reduced else r(K, B), x=x, logits=m(K, B, D),
                                                  dx=None, dlogits=m(K, B, D), dterm=r(K, B), weight=-1.0,
                                                  g_divisor=B if reduced else None)


# -- the benchmark row (python -m benchmarks.bench_op bernoulli_likelihood) --------
# x (B, D) broadcast against logits (K, B, D); the size's "op" chooses the op:
# bernoulli_log_prob against binary_cross_entropy_with_logits as users write it,
# float32, and bfloat16 logits with float32 x (a decoder under autocast: there
# eager does what autocast does with this float32-list op, copies the logits to
# float32 first; fastvae reads them as they are and returns float32);
# continuous_bernoulli_log_prob, float32, x in [0, 1], against the same formula
# (the Bernoulli term plus log C(l) = log(l / tanh(l / 2)), with the Taylor
# branch near 0 written as a torch.where, as a user who wants it exact writes
# it; torch.distributions.ContinuousBernoulli's own log_prob is slower still and
# drifts at large |l|). Each case at the harness's default repeat count.


def _bench_bernoulli(x: Tensor, logits: Tensor) -> Tensor:
    # half-precision logits: the float32 copy autocast makes for this op
    logits = logits if logits.dtype == x.dtype else logits.to(x.dtype)
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def _bench_continuous_bernoulli(x: Tensor, logits: Tensor) -> Tensor:
    a = logits.abs()
    small = a < 1.0
    u = torch.where(small, logits, 0.0) ** 2
    taylor = math.log(2.0) + u * (1 / 12 + u * (-7 / 1440 + u * (31 / 90720 + u * (-127 / 4838400))))
    ab = torch.where(small, 1.0, a)
    exact = torch.log(ab) - torch.log(-torch.expm1(-ab)) + torch.log1p(torch.exp(-ab))
    bern = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    return (bern + torch.where(small, taylor, exact)).sum(-1)


_BENCH_EAGER = {"bernoulli_log_prob": _bench_bernoulli, "continuous_bernoulli_log_prob": _bench_continuous_bernoulli}


def _bench_eager(op: str, x: Tensor, logits: Tensor) -> Tensor:
    """The size's op as users write it."""
    return _BENCH_EAGER[op](x, logits)


def _bench_call(fn, op: str, x: Tensor, logits: Tensor) -> Tensor:
    """fastvae.<op>: the row's ``fastvae`` is one op of the family, whose
    public functions share one module (op.py), where the size's op is found."""
    return getattr(sys.modules[fn.__module__], op)(x, logits)


def _bench_inputs(size: dict, device):
    B, D, K = size["B"], size["D"], size["K"]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, D, generator=g)
    if size["op"] == "bernoulli_log_prob":  # binary data; the continuous Bernoulli's in [0, 1]
        x = (x > 0.5).float()
    logits = (torch.randn(K, B, D, generator=g) * 3).to(getattr(torch, size["logits"])).to(device).requires_grad_()
    return (size["op"], x.to(device), logits), [logits], torch.randn(K, B, generator=g).to(device)


def _bench_min_bytes(size: dict) -> dict[str, int]:
    B, D, K = size["B"], size["D"], size["K"]
    itemsize = getattr(torch, size["logits"]).itemsize  # the logits' and dlogits' bytes
    fwd = 4 * (B * D + K * B) + itemsize * K * B * D  # x, logits -> out
    bwd = 4 * (K * B + B * D) + 2 * itemsize * K * B * D  # g, x, logits -> dlogits
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def _bench_sizes(op: str, B: int, D: int, ks: tuple[int, ...], logits: str = "float32") -> tuple[dict, ...]:
    return tuple({"op": op, "B": B, "D": D, "K": K, "logits": logits} for K in ks)


BENCH = Bench("bernoulli_likelihood, B={B}, D={D}, float32 and bfloat16 logits",
              sizes=_bench_sizes("bernoulli_log_prob", 4096, 784, (1, 8))
              + _bench_sizes("bernoulli_log_prob", 4096, 784, (1, 8), "bfloat16")
              + _bench_sizes("continuous_bernoulli_log_prob", 4096, 784, (1, 8)),
              quick=_bench_sizes("bernoulli_log_prob", 512, 784, (1, 4))
              + _bench_sizes("bernoulli_log_prob", 512, 784, (4,), "bfloat16")
              + _bench_sizes("continuous_bernoulli_log_prob", 512, 784, (1, 4)),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=_bench_min_bytes, fastvae="bernoulli_log_prob",
              label_keys=("op", "K", "logits"), call=_bench_call, repeats=lambda size: None)
