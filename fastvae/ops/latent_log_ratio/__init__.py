"""latent_log_ratio, described once: log p(z) - log q(z|x) per sample, for the
prior N(0, I) and the encoder's q = N(mu, diag(exp(logvar))), summed over the
last dimension; z carries K samples (K, ..., L) of the (..., L) encoder outputs.

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("latent_log_ratio_forward", "latent_log_ratio", ("z", "mu", "logvar", "out"), heavy="L"),
    Kernel("latent_log_ratio_backward", "latent_log_ratio",
           ("grad_out", "z", "mu", "logvar", "dz", "dmu", "dlogvar"), heavy="L"),
)

OP = Op("latent_log_ratio", tuple(k.name for k in KERNELS),
        "fastvae/ops/latent_log_ratio/test_latent_log_ratio.py", "latent_log_ratio",
        model_bytes=lambda shape, dtype: _bench_min_bytes(shape, getattr(torch, dtype).itemsize))


# -- the oracle ------------------------------------------------------------------


def latent_log_ratio(z: Tensor, mu: Tensor, logvar: Tensor, stop_score: bool = False) -> Tensor:
    """log N(z; 0, I) - log N(z; mu, diag(exp(logvar))) summed over the last dim:
    0.5 * sum(eps^2 - z^2 + logvar), eps = (z - mu) exp(-logvar / 2). Where z^2
    overflows (|z| = 1e30 in float32) eps^2 - z^2 is taken as (eps - z)(eps + z),
    the rounding of the exact value (+-inf, or finite where eps = z), as the
    kernels do, never inf - inf = NaN; elsewhere as written, whose autograd
    gradient stays exact where z >> eps. stop_score: mu and logvar enter
    detached (STL / DReG), z keeps its gradient."""
    if stop_score:
        mu, logvar = mu.detach(), logvar.detach()
    eps = (z - mu) * torch.exp(-0.5 * logvar)
    diff = torch.where(torch.isinf(z.detach() * z.detach()), (eps - z) * (eps + z), eps * eps - z * z)
    return 0.5 * torch.sum(diff + logvar, dim=-1)


def latent_log_ratio_forward(z, mu, logvar, out) -> None:
    """out (K, N) <- latent_log_ratio of z (K, N, L), mu, logvar (N, L)."""
    acc = accumulation_dtype(mu.dtype)
    out.copy_(latent_log_ratio(z.to(acc), mu.to(acc), logvar.to(acc)))


def latent_log_ratio_backward(grad_out, z, mu, logvar, dz, dmu, dlogvar) -> None:
    """dz = g (eps / s - z); dmu = -sum_k g eps / s; dlogvar = sum_k g (1 - eps^2) / 2,
    with g = grad_out and s = exp(logvar / 2); dmu, dlogvar None in the stop-the-score mode."""
    acc = accumulation_dtype(mu.dtype)
    g, z, mu, logvar = grad_out.to(acc)[..., None], z.to(acc), mu.to(acc), logvar.to(acc)
    inv_s = torch.exp(-0.5 * logvar)
    eps = (z - mu) * inv_s
    dz.copy_(g * (eps * inv_s - z))
    if dmu is not None:
        dmu.copy_(-(g * eps).sum(0) * inv_s)
        dlogvar.copy_(0.5 * (g * (1.0 - eps * eps)).sum(0))


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op latent_log_ratio) --


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (K samples of
    B rows of L): the forward, and the backward in full and in the stop-score
    mode; m makes a tensor of the input dtype, r one of its accumulation dtype
    (kernels/aot.py)."""
    K, B, L = s["K"], s["B"], s["L"]
    yield "latent_log_ratio_forward", dict(z=m(K, B, L), mu=m(B, L), logvar=m(B, L), out=r(K, B))
    for stop in (False, True):
        d = None if stop else m(B, L)
        yield "latent_log_ratio_backward", dict(grad_out=r(K, B), z=m(K, B, L), mu=m(B, L), logvar=m(B, L),
                                                dz=m(K, B, L), dmu=d, dlogvar=d)


# -- the benchmark row (python -m benchmarks.bench_op latent_log_ratio) -----------


def _bench_inputs(size: dict, device):
    B, L, K = size["B"], size["L"], size["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, L, generator=g).to(device).requires_grad_()
    logvar = (torch.randn(B, L, generator=g) - 1.0).to(device).requires_grad_()
    z = torch.randn(K, B, L, generator=g).to(device).requires_grad_()
    return (z, mu, logvar), [z, mu, logvar], (torch.randn(K, B, generator=g).to(device),)


def _bench_eager(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    eps = (z - mu) * torch.exp(-0.5 * logvar)
    return 0.5 * torch.sum(eps * eps - z * z + logvar, -1)


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    B, L, K = size["B"], size["L"], size["K"]
    fwd = (K * B * L + 2 * B * L + K * B) * itemsize  # z, mu, logvar -> r
    bwd = (K * B + K * B * L + 2 * B * L + K * B * L + 2 * B * L) * itemsize  # g, z, mu, logvar -> dz, dmu, dlv
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


# B = 65536 rows of L = 32, K = 1 and 16 samples: mu and logvar read once per
# sample, never broadcast in memory
BENCH = Bench("latent_log_ratio, B={B}, L={L}, float32",
              sizes=tuple({"B": 65536, "L": 32, "K": K} for K in (1, 16)),
              quick=tuple({"B": 4096, "L": 32, "K": K} for K in (1, 4)), inputs=_bench_inputs, eager=_bench_eager,
              min_bytes=_bench_min_bytes, fastvae="latent_log_ratio", label_keys=("K",),
              repeats=lambda size: 20 if size["K"] < 8 else 10)
