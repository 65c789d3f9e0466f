"""mixture_log_prob, described once: the log density of a diagonal Gaussian
mixture, log sum_u softmax(logits)_u N(z; means_u, diag(exp(logvars_u))), for
z (..., L) against U components with means, logvars (U, L) and logits (U,) or
None (equal weights); a VampPrior's or a mixture-of-Gaussians prior's log p(z).

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from ..._dtypes import accumulation_dtype
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("mixture_log_prob_forward", "mixture_log_prob", ("z", "means", "logvars", "logits", "out")),
    Kernel("mixture_log_prob_backward", "mixture_log_prob",
           ("grad_out", "z", "means", "logvars", "logits", "out", "dz", "dmeans", "dlogvars", "dlogits")),
)

OP = Op("mixture_log_prob", tuple(k.name for k in KERNELS), "fastvae/ops/mixture_log_prob/test_mixture_log_prob.py",
        "mixture_log_prob", launches=(1, 2, 0), double_backward="not_twice",
        triton_ops=("mixture_log_prob", "mixture_log_prob_backward"))


# -- the oracle ------------------------------------------------------------------
# z (N, L), means and logvars (U, L), logits (U,) or None (equal weights). The
# oracle materializes the (N, U, L) differences; the kernels stream over
# components instead.


def _mixture_log_weights(logits: Tensor | None, U: int, dtype, device) -> Tensor:
    if logits is None:
        return torch.full((U,), -math.log(U), dtype=dtype, device=device)
    return torch.log_softmax(logits.to(dtype), 0)


def mixture_terms(z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None) -> Tensor:
    """term[..., u] = log softmax(logits)_u + log N(z; means_u, diag(exp(logvars_u))),
    shape (..., U), from direct differences (z - means_u), differentiable."""
    U, L = means.shape
    log_w = _mixture_log_weights(logits, U, z.dtype, z.device)
    d = z[..., None, :] - means  # (..., U, L)
    quad = (d * d * torch.exp(-logvars)).sum(-1)
    return log_w - 0.5 * (logvars.sum(-1) + L * math.log(2 * math.pi) + quad)


def mixture_log_prob(z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None = None) -> Tensor:
    """log sum_u softmax(logits)_u N(z; means_u, diag(exp(logvars_u))) over the
    last dim of z (..., L); shape (...). Differentiable (plain autograd)."""
    return torch.logsumexp(mixture_terms(z, means, logvars, logits), -1)


def mixture_log_prob_forward(z, means, logvars, logits, out) -> None:
    """out (N,) <- mixture_log_prob of z (N, L), means, logvars (U, L), logits (U,) or None."""
    acc = accumulation_dtype(means.dtype)
    out.copy_(mixture_log_prob(z.to(acc), means.to(acc), logvars.to(acc), None if logits is None else logits.to(acc)))


def mixture_log_prob_backward(grad_out, z, means, logvars, logits, out, dz, dmeans, dlogvars, dlogits) -> None:
    """Gradients of mixture_log_prob given grad_out (N,) and the forward's out
    (N,), written into those of dz (N, L), dmeans, dlogvars (U, L) and dlogits
    (U,) that are not None: with w[n, u] = exp(term[n, u] - out[n]) (0 where
    out is -inf) and t = (z - means_u) exp(-logvars_u),
    dz = -g sum_u w t, dmeans = sum_n g w t, dlogvars = sum_n g w (t (z - means_u) - 1) / 2,
    dlogits = sum_n g w - softmax(logits) sum_n g."""
    acc = accumulation_dtype(means.dtype)
    g, z, means, logvars = grad_out.to(acc), z.to(acc), means.to(acc), logvars.to(acc)
    logits = None if logits is None else logits.to(acc)
    out = out.to(acc)
    term = mixture_terms(z, means, logvars, logits)  # (N, U)
    finite = ~torch.isneginf(out)
    w = torch.where(finite[:, None], torch.exp(term - torch.where(finite, out, 0.0)[:, None]), 0.0)
    gw = g[:, None] * w  # (N, U)
    # rows whose out is -inf weigh nothing (their z may be inf: 0 * inf would be NaN)
    d = torch.where(finite[:, None, None], z[:, None, :] - means, 0.0)  # (N, U, L)
    t = d * torch.exp(-logvars)
    if dz is not None:
        dz.copy_(-(gw[..., None] * t).sum(1))
    if dmeans is not None:
        dmeans.copy_((gw[..., None] * t).sum(0))
    if dlogvars is not None:
        dlogvars.copy_(0.5 * (gw[..., None] * (t * d - 1.0)).sum(0))
    if dlogits is not None:
        dlogits.copy_(gw.sum(0) - torch.softmax(logits, 0) * g.sum())


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op mixture_log_prob) --

# U at every ahead-of-time shape (U is not specialized: one count compiles every variant);
# kernels/aot.py's shapes give K, B and L
AOT_COMPONENTS = 100


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s: z holds the
    K * B sample rows of L against U = AOT_COMPONENTS components, with and
    without logits, and the backward for each set of gradients asked for; m
    makes a tensor of the input dtype, r one of its accumulation dtype
    (kernels/aot.py)."""
    K, B, L = s["K"], s["B"], s["L"]
    U = AOT_COMPONENTS
    for logits in (m(U), None):
        args = dict(z=m(K * B, L), means=m(U, L), logvars=m(U, L), logits=logits)
        yield "mixture_log_prob_forward", dict(args, out=r(K * B))
        for dz, dp, dlg in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
            yield "mixture_log_prob_backward", dict(
                grad_out=r(K * B), **args, out=r(K * B), dz=m(K * B, L) if dz else None,
                dmeans=m(U, L) if dp else None, dlogvars=m(U, L) if dp else None,
                dlogits=m(U) if dlg and logits is not None else None)


# -- the benchmark row (python -m benchmarks.bench_op mixture_log_prob) -----------


def _bench_inputs(size: dict, device):
    K, B, U, L = size["K"], size["B"], size["U"], size["L"]
    g = torch.Generator(device="cpu").manual_seed(0)
    means = torch.randn(U, L, generator=g).to(device).requires_grad_()
    logvars = (torch.randn(U, L, generator=g) * 0.5 - 1.0).to(device).requires_grad_()
    logits = torch.randn(U, generator=g).to(device).requires_grad_()
    z = torch.randn(K, B, L, generator=g).to(device).requires_grad_()
    gr = torch.randn(K, B, generator=g).to(device)
    return (z, means, logvars, logits), [z, means, logvars, logits], (gr,)


def _bench_eager(z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor) -> Tensor:
    """torch.distributions as users write it (argument validation off, its best
    case), which materializes (K, B, U, L) tensors: 2 GB each at U = 500;
    "compiled" is torch.compile of the same code."""
    comp = Independent(Normal(means, torch.exp(0.5 * logvars), validate_args=False), 1, validate_args=False)
    mix = MixtureSameFamily(Categorical(logits=logits, validate_args=False), comp, validate_args=False)
    return mix.log_prob(z)


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    N, U, L = size["K"] * size["B"], size["U"], size["L"]
    params = 2 * U * L + U  # means, logvars, logits
    fwd = (N * L + params + N) * itemsize  # z, params -> out
    bwd = (N + N * L + params + N + N * L + params) * itemsize  # g, z, params, out -> dz, dparams
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def _bench_size(K: int, B: int, U: int, L: int, itemsize: int = 4) -> dict:
    """A case: its dimensions, and io_mb, the inputs and outputs of a forward+backward
    (z, means, logvars, logits, grad_out -> out, dz, dmeans, dlogvars, dlogits) in MB,
    the yardstick for the peak memory that --memory measures."""
    N, params = K * B, 2 * U * L + U
    return {"K": K, "B": B, "U": U, "L": L, "io_mb": (2 * (N * L + params) + 2 * N) * itemsize / 2**20}


# z (K, B, L) = (30, 1024, 32) against U = 10, 100 and 500 components; the eager
# baseline takes seconds a call at U = 500: fewer repeats there
BENCH = Bench("mixture_log_prob, K={K}, B={B}, L={L}, float32",
              sizes=tuple(_bench_size(30, 1024, U, 32) for U in (10, 100, 500)),
              quick=tuple(_bench_size(2, 64, U, 32) for U in (4, 16)), inputs=_bench_inputs, eager=_bench_eager,
              min_bytes=_bench_min_bytes, fastvae="mixture_log_prob", label_keys=("U",),
              repeats=lambda size: {10: 15, 100: 5, 500: 3}.get(size["U"]))
