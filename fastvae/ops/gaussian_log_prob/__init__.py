"""gaussian_log_prob, described once: the Gaussian reconstruction term
log N(x; mean, diag(var)) summed over the last dimension, for x (..., D)
broadcast against the decoder mean (K, ..., D), var = exp(logvar), a fixed
scale^2, or softplus(softplus_var) + delta; the decoder likelihood of
likelihood="gaussian".

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._oracle_math import softplus, sum_to
from ..._spec import BOUND_BACKWARD, BOUND_FORWARD, Bench, Kernel, Op

KERNELS = (
    Kernel("gaussian_log_prob_forward", "gaussian_log_prob",
           ("x", "mean", "var_param", "softplus_mode", "delta", "out"), BOUND_FORWARD, heavy="D", vector_loads=True),
    Kernel("gaussian_log_prob_backward", "gaussian_log_prob",
           ("grad_out", "x", "mean", "var_param", "softplus_mode", "delta", "dx", "dmean", "dvar_param"),
           BOUND_BACKWARD, heavy="D"),
)

OP = Op("gaussian_log_prob", tuple(k.name for k in KERNELS), "fastvae/ops/gaussian_log_prob/test_gaussian_log_prob.py",
        "gaussian_log_prob", torch_ops=("gaussian_log_prob",), likelihood="gaussian",
        plan_tail="GaussianTail", triton_ops=("gaussian_log_prob", "gaussian_log_prob_backward"),
        # the model's Gaussian: a fixed standard deviation, decoder outputs in the model's dtype
        model_bytes=lambda shape, dtype: _bench_min_bytes({**shape, "variance": "scale", "decoder_dtype": dtype}))


# -- the oracle ------------------------------------------------------------------
# Kernel layout (set up by fastvae/_likelihood_layout.py): mean (K, P, D); x (P, D)
# broadcast over K, or (K, P, D); the variance parameter v is (K, P, D),
# (P, D) or (D,). Plain broadcasting covers every case here.

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """-0.5 * sum((x - mean)^2 * exp(-logvar) + logvar + log 2 pi) over the last dim (broadcasting).

    Where x == mean exactly the squared term is 0 whatever the variance: an
    underflowing variance (exp(-logvar) = inf) must not give 0 * inf = NaN, in
    the value or, through the unselected branch of a where, in the gradient."""
    diff = x - mean
    exact = diff == 0
    return -0.5 * torch.sum(diff * diff * torch.exp(-torch.where(exact, 0.0, logvar)) + logvar + LOG_2PI, dim=-1)


def gaussian_log_prob_softplus(x: Tensor, mean: Tensor, softplus_var: Tensor, delta: float) -> Tensor:
    """The same with variance softplus(softplus_var) + delta (the lecture notes' decoder)."""
    var = softplus(softplus_var) + delta
    return -0.5 * torch.sum((x - mean) ** 2 / var + torch.log(var) + LOG_2PI, dim=-1)


def gaussian_log_prob_forward(x, mean, var_param, softplus_mode: bool, delta: float, out) -> None:
    acc = accumulation_dtype(mean.dtype)
    x, mean, v = x.to(acc), mean.to(acc), var_param.to(acc)
    if softplus_mode:
        out.copy_(gaussian_log_prob_softplus(x, mean, v, delta))
    else:
        out.copy_(gaussian_log_prob(x, mean, v))


def gaussian_log_prob_backward(grad_out, x, mean, var_param, softplus_mode, delta, dx, dmean, dvar_param) -> None:
    """d/dmean = g (x - m) / var;  d/dlogvar = g ((x - m)^2 / var - 1) / 2;
    softplus: d/dr = g ((x - m)^2 / var^2 - 1 / var) / 2 * sigmoid(r);  d/dx = -d/dmean."""
    acc = accumulation_dtype(mean.dtype)
    x, mean, v, g = x.to(acc), mean.to(acc), var_param.to(acc), grad_out.to(acc)[..., None]
    diff = x - mean
    if softplus_mode:
        var = softplus(v) + delta
        inv = 1.0 / var
        gv = 0.5 * g * (diff * diff * inv * inv - inv) * torch.sigmoid(v)
    else:
        inv = torch.where(diff == 0, 0.0, torch.exp(-v))  # x == mean: no 0 * inf
        gv = 0.5 * g * (diff * diff * inv - 1.0)
    gm = g * diff * inv
    dmean.copy_(gm)
    if dvar_param is not None:
        dvar_param.copy_(sum_to(gv, dvar_param.shape))
    if dx is not None:
        dx.copy_(sum_to(-gm, dx.shape))


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op gaussian_log_prob) --


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s: x (B, D)
    against mean (K, B, D), the variance parameter per element, per x row and
    per dimension, each as a log-variance and as softplus_var, the forward and
    the backward with each gradient the front end asks for; m makes a tensor
    of the input dtype, r one of its accumulation dtype (kernels/aot.py)."""
    K, B, D = s["K"], s["B"], s["D"]
    for var_shape, softplus_mode in itertools.product(((K, B, D), (B, D), (D,)), (False, True)):
        args = dict(x=m(B, D), mean=m(K, B, D), var_param=m(*var_shape), softplus_mode=softplus_mode, delta=1e-6)
        yield "gaussian_log_prob_forward", dict(args, out=r(K, B))
        # (False, False): a fixed variance and x without a gradient, the training
        # decoder of a mean alone (unit variance), which the objectives' plans launch too
        for need_dx, need_dv in ((False, True), (True, False), (False, False)):
            yield "gaussian_log_prob_backward", dict(
                grad_out=r(K, B), **args, dx=m(B, D) if need_dx else None, dmean=m(K, B, D),
                dvar_param=m(*var_shape) if need_dv else None)
    # the objectives' bound (fastvae/_plan.py), reduced or per row: x and the latent
    # term in the compute dtype (float32 under autocast), a per-element
    # log-variance with its gradient or a fixed (D,) one (a mean alone)
    for var_shape, reduced in itertools.product(((K, B, D), (D,)), (False, True)):
        args = dict(x=r(B, D), mean=m(K, B, D), var_param=m(*var_shape), softplus_mode=False, delta=1.0)
        yield "gaussian_log_prob_forward", dict(args, out=r() if reduced else r(K, B), term=r(K, B), weight=-1.0,
                                                divisor=B if reduced else None)
        yield "gaussian_log_prob_backward", dict(
            grad_out=r() if reduced else r(K, B), **args, dx=None, dmean=m(K, B, D),
            dvar_param=m(*var_shape) if len(var_shape) == 3 else None, dterm=r(K, B), weight=-1.0,
            g_divisor=B if reduced else None)


# -- the benchmark row (python -m benchmarks.bench_op gaussian_log_prob) -----------


def _bench_dtype(size: dict) -> torch.dtype:
    return getattr(torch, size["decoder_dtype"])


def _bench_inputs(size: dict, device):
    B, D, K, dtype = size["B"], size["D"], size["K"], _bench_dtype(size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, D, generator=g).to(device)
    mean = torch.rand(K, B, D, generator=g).to(dtype).to(device).requires_grad_()
    up = torch.randn(K, B, generator=g).to(device)
    if size["variance"] == "logvar":
        logvar = (torch.randn(K, B, D, generator=g) - 2).to(dtype).to(device).requires_grad_()
        return (x, mean, logvar), [mean, logvar], up
    return (x, mean), [mean], up


def _bench_eager(x: Tensor, mean: Tensor, logvar: Tensor | None = None) -> Tensor:
    """The formula as users write it, broadcasting doing the K copies of x
    implicitly, on float32 copies of bfloat16 decoder outputs (as autocast
    computes it): a predicted log-variance, or the fixed scale 0.5;
    "compiled" is torch.compile of it."""
    if logvar is None:
        x, mean = (t.float() for t in (x, mean))
        return -0.5 * torch.sum((x - mean) ** 2 / 0.25 + math.log(0.25) + LOG_2PI, dim=-1)
    x, mean, logvar = (t.float() for t in (x, mean, logvar))
    return -0.5 * torch.sum((x - mean) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI, dim=-1)


def _bench_call(fn, x: Tensor, mean: Tensor, logvar: Tensor | None = None) -> Tensor:
    """fastvae.gaussian_log_prob with the predicted log-variance, or scale=0.5."""
    return fn(x, mean, scale=0.5) if logvar is None else fn(x, mean, logvar)


def _bench_min_bytes(size: dict) -> dict[str, int]:
    """The fewest bytes: forward reads x once, mean (and logvar) once and writes
    the (K, B) result; backward reads them again with the upstream gradient and
    writes dmean (and dlogvar)."""
    B, D, K = size["B"], size["D"], size["K"]
    n = 4  # float32 bytes (x, the result)
    h = torch.empty((), dtype=_bench_dtype(size)).element_size()  # the decoder outputs' bytes
    per_out = 2 if size["variance"] == "logvar" else 1  # mean (and logvar): read, and their grads written
    fwd = n * (B * D + K * B) + h * per_out * K * B * D
    bwd = n * (K * B + B * D) + h * 2 * per_out * K * B * D
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def _bench_sizes(B: int, D: int, ks: tuple[int, ...], bf16_ks: tuple[int, ...]) -> tuple[dict, ...]:
    """Per variance ("logvar": a decoder that predicts a per-element log-variance,
    the most bytes; "scale": a fixed standard deviation, the squared-error case),
    float32 at each K of ks, then bfloat16 decoder outputs (mean and logvar) with
    float32 x (a decoder under autocast) at each K of bf16_ks."""
    return tuple({"variance": variance, "decoder_dtype": dtype, "B": B, "D": D, "K": K}
                 for variance in ("logvar", "scale")
                 for dtype, kk in (("float32", ks), ("bfloat16", bf16_ks)) for K in kk)


# x (B, D) broadcast against decoder means (K, B, D); each case at the harness's
# default repeat count
BENCH = Bench("gaussian_log_prob, B={B}, D={D}, float32 and bfloat16",
              sizes=_bench_sizes(4096, 784, (1, 8), (1, 8)), quick=_bench_sizes(512, 784, (1, 4), (4,)),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=_bench_min_bytes, fastvae="gaussian_log_prob",
              label_keys=("variance", "K", "decoder_dtype"), call=_bench_call, repeats=lambda size: None)
