"""Plain-PyTorch reference of every fastvae op not yet moved to a folder of its
own (an op folder's oracle is its ``__init__.py``): the test oracle and the
``reference`` backend.

Everything here is written for clarity, not speed, and runs in float64 when
given float64. The Philox stream is emulated with int64 tensor arithmetic
(fastvae/_philox.py) so that the reference draws exactly the noise the
kernels draw (see the RNG contract in docs/architecture.md): the float32
uniforms are bit-exact, and the Box-Muller transform is then evaluated in
float64.

Functions named ``<op>`` are differentiable (plain autograd) and serve as the
oracle for gradients; ``<op>_forward`` / ``<op>_backward`` are the explicit
formulas that the reference backend runs inside the custom ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._dtypes import accumulation_dtype
from ._philox import (  # noqa: F401 (the reference backend's randn_fill and uniform_fill; the tests read the stream here)
    folded,
    philox_bits,
    philox_randn,
    philox_uniform,
    philox_words,
    randn_fill,
    sample_noise,
    uniform64_from_bits,
    uniform_fill,
    uniform_from_bits,
)
from .ops.kl_normal import kl_normal_grad


def _compute_dtype(x: Tensor) -> torch.dtype:
    return accumulation_dtype(x.dtype)


# --------------------------------------------------------------------------
# sample_normal
# --------------------------------------------------------------------------


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
    acc = _compute_dtype(mu)
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
    acc = _compute_dtype(mu)
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
