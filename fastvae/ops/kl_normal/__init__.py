"""kl_normal, described once: the analytic KL between diagonal Gaussians,
KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) summed over the last
dimension, with the standard normal prior when no prior is given.

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("kl_normal_forward", "kl_normal", ("mu", "logvar", "prior_mu", "prior_logvar", "kl")),
    Kernel("kl_normal_backward", "kl_normal", ("grad_kl", "mu", "logvar", "prior_mu", "prior_logvar",
                                               "dmu", "dlogvar", "dprior_mu", "dprior_logvar")),
)

OP = Op("kl_normal", tuple(k.name for k in KERNELS), "fastvae/ops/kl_normal/test_kl_normal.py", "kl_normal",
        torch_ops=("kl_normal",),
        model_bytes=lambda shape, dtype: _bench_min_bytes(shape, getattr(torch, dtype).itemsize))


# -- the oracle ------------------------------------------------------------------


def kl_normal(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None,
              prior_logvar: Tensor | None = None) -> Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) summed over the last dim;
    the prior is N(0, I) when both prior arguments are None. Differentiable."""
    if prior_mu is None:
        return 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1.0 - logvar, dim=-1)
    d = mu - prior_mu
    return 0.5 * torch.sum(prior_logvar - logvar + (torch.exp(logvar) + d * d) * torch.exp(-prior_logvar) - 1.0, dim=-1)


def _up(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def kl_normal_forward(mu, logvar, prior_mu, prior_logvar, kl) -> None:
    acc = accumulation_dtype(mu.dtype)
    kl.copy_(kl_normal(_up(mu, acc), _up(logvar, acc), _up(prior_mu, acc), _up(prior_logvar, acc)))


def kl_normal_grad(g: Tensor, mu: Tensor, var: Tensor, prior_mu: Tensor | None = None,
                   prior_logvar: Tensor | None = None) -> tuple[Tensor, ...]:
    """The gradient of KL(N(mu, var) || prior) times g (broadcast over L: (..., 1)):
    (dmu, dlogvar) for the prior N(0, I), else (dmu, dlogvar, dprior_mu, dprior_logvar).
    The one Python copy of kl_normal's gradient formula: the reference backend's
    kl_normal_backward and sample_normal_backward (the oracles) and the double
    backwards of kl_normal and sample_normal (their op.py) all call it,
    with the var each computes (e^logvar, or s * s from the sampler's s = e^(logvar/2)).
    Plain differentiable torch ops, so a create_graph=True backward records it;
    the tests check it against autograd of ``kl_normal`` and by gradgradcheck."""
    if prior_mu is None:
        return g * mu, 0.5 * g * (var - 1.0)
    inv_pvar = torch.exp(-prior_logvar)
    d = mu - prior_mu
    dmu = g * d * inv_pvar
    return dmu, 0.5 * g * (var * inv_pvar - 1.0), -dmu, 0.5 * g * (1.0 - (var + d * d) * inv_pvar)


def kl_normal_backward(grad_kl, mu, logvar, prior_mu, prior_logvar, dmu, dlogvar, dprior_mu, dprior_logvar) -> None:
    acc = accumulation_dtype(mu.dtype)
    grads = kl_normal_grad(grad_kl.to(acc)[..., None], mu.to(acc), torch.exp(logvar.to(acc)),
                           _up(prior_mu, acc), _up(prior_logvar, acc))
    for out, grad in zip((dmu, dlogvar, dprior_mu, dprior_logvar), grads):
        out.copy_(grad)


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op kl_normal) -----


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (B rows of L):
    without and with a prior; m makes a tensor of the input dtype, r one of its
    accumulation dtype (kernels/aot.py)."""
    B, L = s["B"], s["L"]
    for prior in (None, m(B, L)):
        yield "kl_normal_forward", dict(mu=m(B, L), logvar=m(B, L), prior_mu=prior, prior_logvar=prior, kl=r(B))
        yield "kl_normal_backward", dict(grad_kl=r(B), mu=m(B, L), logvar=m(B, L), prior_mu=prior,
                                         prior_logvar=prior, dmu=m(B, L), dlogvar=m(B, L),
                                         dprior_mu=prior, dprior_logvar=prior)


# -- the benchmark row (python -m benchmarks.bench_op kl_normal) ------------------


def _bench_inputs(size: dict, device):
    B, L = size["B"], size["L"]
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, L, generator=g).to(device).requires_grad_()
    logvar = (torch.randn(B, L, generator=g) - 1.0).to(device).requires_grad_()
    return (mu, logvar), [mu, logvar], (torch.randn(B, generator=g).to(device),)


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    B, L = size["B"], size["L"]
    fwd = (2 * B * L + B) * itemsize  # mu, logvar -> kl
    bwd = (B + 2 * B * L + 2 * B * L) * itemsize  # dkl, mu, logvar -> dmu, dlogvar
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


# (100, 8): the per-call cost of the op layer is most of the time (the
# target: within 1.25x of the eager formula, forward+backward); (65536, 32): bandwidth
BENCH = Bench("kl_normal, float32", sizes=({"B": 100, "L": 8}, {"B": 65536, "L": 32}),
              quick=({"B": 100, "L": 8}, {"B": 4096, "L": 32}), inputs=_bench_inputs, eager=kl_normal,
              min_bytes=_bench_min_bytes, fastvae="kl_normal")
