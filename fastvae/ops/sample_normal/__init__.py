"""sample_normal, described once: reparameterized samples from a diagonal
Gaussian q = N(mu, diag(e^logvar)), z = mu + e^(logvar / 2) * eps (K, ..., L),
with the analytic KL(q || N(0, I)) (...) fused, and for the IWAE's latent term
(sample_normal_with_ratio) log N(z; 0, I) - log q(z) (K, ...) from the same eps.

The op's description and its oracle, which draws the kernels' noise from the
Philox emulation in fastvae/_philox.py (the one the reference backend serves
too); fastvae/ops/__init__.py lists the folder's files. The noise stream
itself (the Philox words, normals and fills: kernels/philox.py,
csrc/philox.cpp) is shared by every sampler and stays outside this folder.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._philox import philox_randn, sample_noise
from ..._spec import Bench, Kernel, Op
from ..kl_normal import kl_normal_grad

KERNELS = (
    Kernel("sample_normal_forward", "sample_normal",
           ("mu", "logvar", "seed", "offset0", "sample_stride", "row_stride", "z", "kl", "log_ratio"),
           heavy="L", vector_loads=True),
    Kernel("sample_normal_backward", "sample_normal",
           ("grad_z", "grad_kl", "grad_log_ratio", "mu", "logvar", "seed", "stop_score", "dmu", "dlogvar"),
           ("z_scale",), heavy="L"),  # z_scale: the objectives' DReG (fastvae/_plan.py), Triton only
)

OP = Op("sample_normal", tuple(k.name for k in KERNELS), "fastvae/ops/sample_normal/test_sample_normal.py",
        "sample_normal", launches=(1, 1, 1),
        # and the DReG weights' hooks on sample_normal_with_ratio's z and log-ratio (objectives._dreg_z_scale)
        # and the (mu, scale) form of a torch Normal's parameters (objectives: eager CPU ELBOs)
        torch_ops=("sample_normal", "sample_normal_of_scale", "sample_normal_with_ratio", "sample_normal_dreg_hooks"),
        triton_ops=("sample_normal", "sample_normal_with_ratio", "sample_normal_backward"),
        model_bytes=lambda shape, dtype: _bench_min_bytes(shape, getattr(torch, dtype).itemsize))


# -- the oracle ------------------------------------------------------------------


def sample_normal(mu: Tensor, logvar: Tensor, seed: int, n_samples: int) -> tuple[Tensor, Tensor]:
    """z = mu + exp(logvar / 2) * eps, shape (n_samples, ..., L), and
    kl = KL(N(mu, diag(exp(logvar))) || N(0, I)) summed over L, shape (...).

    Differentiable with plain autograd; computed in the dtype of the inputs.
    """
    eps = sample_noise(seed, n_samples, mu.shape, mu.dtype, mu.device)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1.0 - logvar, dim=-1)
    return z, kl


def sample_normal_forward(mu: Tensor, logvar: Tensor, seed: int, offset0: int, sample_stride: int,
                          row_stride: int, z: Tensor, kl: Tensor, log_ratio: Tensor | None) -> None:
    """Writes sample_normal into z (K, N, L) and kl (N,); inputs (N, L). z[k, n, l]
    uses the noise at offset0 + k * sample_stride + n * row_stride + l. log_ratio
    (K, N), when given, gets log N(z; 0, I) - log q(z) = 0.5 * sum_l(eps^2 +
    logvar - z^2) from the known eps (never divided back out of z)."""
    acc = accumulation_dtype(mu.dtype)
    K, N, L = z.shape
    k, n, c = (torch.arange(d, dtype=torch.int64, device=mu.device) for d in (K, N, L))
    offsets = offset0 + k[:, None, None] * sample_stride + n[None, :, None] * row_stride + c
    eps = philox_randn(seed, offsets, acc)
    mu, logvar = mu.to(acc), logvar.to(acc)
    zz = mu + torch.exp(0.5 * logvar) * eps
    z.copy_(zz)
    kl.copy_(0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1.0 - logvar, dim=-1))
    if log_ratio is not None:
        log_ratio.copy_(0.5 * torch.sum(eps * eps + logvar - zz * zz, dim=-1))


def sample_normal_backward(grad_z: Tensor | None, grad_kl: Tensor | None, grad_log_ratio: Tensor | None, mu: Tensor,
                           logvar: Tensor, seed: int, stop_score: bool, dmu: Tensor, dlogvar: Tensor) -> None:
    """Gradients of sample_normal and of its log-ratio output (sample_normal_with_ratio),
    each upstream gradient None when its output has none. With eps regenerated,
    s = exp(logvar / 2) and z = mu + s * eps:
    dz_k = grad_z_k + grad_log_ratio_k * (-z_k, or eps_k / s - z_k with stop_score);
    dmu = sum_k dz_k + grad_kl * mu;
    dlogvar = sum_k dz_k * eps_k * s / 2 + grad_kl * (exp(logvar) - 1) / 2
              (+ sum_k grad_log_ratio_k / 2 without stop_score).
    The stop-score term enters as (sum_k grad_log_ratio_k eps_k) / s in dmu and
    sum_k grad_log_ratio_k eps_k^2 / 2 in dlogvar, its exact product with
    eps_k s / 2: never (z - mu) * exp(-logvar), which is 0 * inf for a collapsed
    posterior, nor (eps / s) * s, which is inf * 0 once 1 / s overflows."""
    acc = accumulation_dtype(mu.dtype)
    mu, logvar = mu.to(acc), logvar.to(acc)
    samples = grad_z if grad_z is not None else grad_log_ratio
    K = 0 if samples is None else samples.shape[0]
    eps = sample_noise(seed, K, mu.shape, acc, mu.device)
    s = torch.exp(0.5 * logvar)
    dz = torch.zeros_like(eps) if grad_z is None else grad_z.to(acc)
    extra_mu, extra_lv = torch.zeros_like(mu), torch.zeros_like(mu)
    if grad_log_ratio is not None:
        g = grad_log_ratio.to(acc)[..., None]
        dz = dz - g * (mu + s * eps)
        if stop_score:
            score = (g * eps).sum(0)
            # a zero sum stays 0 where 1 / s overflows (0 * inf)
            extra_mu = torch.where(score == 0, 0.0, score * torch.exp(-0.5 * logvar))
            extra_lv = 0.5 * (g * eps * eps).sum(0)
        else:
            extra_lv = 0.5 * g.sum(0)
    d_mu = dz.sum(0) + extra_mu
    d_lv = 0.5 * (dz * eps).sum(0) * s + extra_lv
    if grad_kl is not None:
        kl_mu, kl_lv = kl_normal_grad(grad_kl.to(acc)[..., None], mu, torch.exp(logvar))
        d_mu = d_mu + kl_mu
        d_lv = d_lv + kl_lv
    dmu.copy_(d_mu)
    dlogvar.copy_(d_lv)


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op sample_normal) --


def _meta(*shape, dtype=torch.float32) -> Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (K samples of
    B rows of L): the forward and backward in each mode the front end uses;
    m makes a tensor of the input dtype, r one of its accumulation dtype
    (kernels/aot.py); the Philox seed is a 0-d int64 tensor. The noise
    stream's own fills (randn_fill, the evaluation's strided fill of a
    full-covariance posterior, and uniform_fill, the uniforms' test hook:
    kernels/philox.py, shared by every sampler) are compiled here with the
    sampler whose stream they read."""
    K, B, L = s["K"], s["B"], s["L"]
    seed = _meta(dtype=torch.int64)
    for ratio in (None, r(K, B)):  # training; iwae, which takes log p(z) - log q(z) from the sampler
        yield "sample_normal_forward", dict(mu=m(B, L), logvar=m(B, L), seed=seed, offset0=0,
                                            sample_stride=B * L, row_stride=L, z=m(K, B, L), kl=r(B),
                                            log_ratio=ratio)
    # training (z and kl); iwae (z, kl and the log-ratio, with and without the score)
    for ratio, stop in ((None, False), (r(K, B), False), (r(K, B), True)):
        yield "sample_normal_backward", dict(grad_z=m(K, B, L), grad_kl=r(B), grad_log_ratio=ratio, mu=m(B, L),
                                             logvar=m(B, L), seed=seed, stop_score=stop, dmu=m(B, L),
                                             dlogvar=m(B, L))
    # the objectives' DReG (fastvae/_plan.py): z and its weights in the compute dtype
    yield "sample_normal_backward", dict(grad_z=r(K, B, L), grad_kl=None, grad_log_ratio=r(K, B), mu=m(B, L),
                                         logvar=m(B, L), seed=seed, stop_score=True, dmu=m(B, L), dlogvar=m(B, L),
                                         z_scale=r(K, B))
    # evaluation: the example-major layout of a chunk
    yield "sample_normal_forward", dict(mu=m(B, L), logvar=m(B, L), seed=seed, offset0=7 * L, sample_stride=L,
                                        row_stride=K * L, z=m(K, B, L), kl=r(B), log_ratio=None)
    # a latent size not divisible by 4 and a chunk at an odd offset: the noise's unaligned paths
    yield "sample_normal_backward", dict(grad_z=m(K, B, L - 2), grad_kl=r(B), grad_log_ratio=None, mu=m(B, L - 2),
                                         logvar=m(B, L - 2), seed=seed, stop_score=False, dmu=m(B, L - 2),
                                         dlogvar=m(B, L - 2))
    yield "sample_normal_forward", dict(mu=m(B, L), logvar=m(B, L), seed=seed, offset0=7 * L + 1, sample_stride=L,
                                        row_stride=K * L, z=m(K, B, L), kl=r(B), log_ratio=None)
    yield "randn_fill", dict(seed=seed, offset0=0, out=r(B, K * L), row_stride=K * L)
    yield "randn_fill", dict(seed=seed, offset0=1, out=r(B, K * L), row_stride=K * L)
    yield "uniform_fill", dict(seed=seed, offset0=0, u1=_meta(B * L), u2=_meta(B * L))


# -- the benchmark row (python -m benchmarks.bench_op sample_normal) --------------


def _bench_inputs(size: dict, device):
    B, L, K = size["B"], size["L"], size["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, L, generator=g).to(device).requires_grad_()
    # Encoders emit log-variances around a few units below zero; the value does
    # not change the work, only keeps exp() in a realistic range.
    logvar = (torch.randn(B, L, generator=g) - 1.0).to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g).to(device)
    gk = torch.randn(B, generator=g).to(device)
    return (mu, logvar, K), [mu, logvar], (gz, gk)


def _bench_eager(mu: Tensor, logvar: Tensor, n_samples: int):
    """The formula as VAE users write it: torch.randn, exp, sum."""
    eps = torch.randn((n_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1 - logvar, -1)
    return z, kl


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    """Fewest bytes each mode must move: every input read once, every output
    written once, no noise tensor stored."""
    B, L, K = size["B"], size["L"], size["K"]
    fwd = (2 * B * L + K * B * L + B) * itemsize  # mu, logvar -> z, kl
    bwd = (K * B * L + B + 2 * B * L + 2 * B * L) * itemsize  # dz, dkl, mu, logvar -> dmu, dlogvar
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


# B = 65536 rows of L = 32, K = 1 and 16 samples (the cases' labels give K); K = 16
# moves about 10x more data per call: fewer repeats keep the run short. The noise
# generator alone, per C++ noise path: python -m benchmarks.bench_noise.
BENCH = Bench("sample_normal, B={B}, L={L}, float32",
              sizes=({"B": 65536, "L": 32, "K": 1}, {"B": 65536, "L": 32, "K": 16}),
              quick=({"B": 4096, "L": 32, "K": 1}, {"B": 4096, "L": 32, "K": 4}), inputs=_bench_inputs,
              eager=_bench_eager, min_bytes=_bench_min_bytes, fastvae="sample_normal", label_keys=("K",),
              repeats=lambda size: 20 if size["K"] < 8 else 10)
