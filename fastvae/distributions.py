"""Gaussian posteriors (and diagonal priors) as objects: what an encoder may
return to fastvae's objectives and evaluation, and what a learned prior is.

- ``DiagonalNormal(mu, logvar)``: N(mu, diag(exp(logvar))) over the last
  dimension; sampled by the fused ``sample_normal``, its density by the fused
  ``gaussian_log_prob``. Of shape (L,) it is a learned diagonal prior.
- ``TrilNormal(mu, scale_tril)``: N(mu, S Sᵀ) with S lower triangular and a
  positive diagonal (torch's ``MultivariateNormal(scale_tril=)``); sampled by
  the fused ``sample_normal_tril``; its density is one triangular solve (the
  objectives take log q of their own samples from the eps that drew them).

Both are light records of their parameters (no validation of values, so no
host sync): build them inside a training step, under torch.compile too.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, _validate
from .ops.gaussian_log_prob.op import gaussian_log_prob
from .ops.kl_normal.op import kl_normal
from .ops.sample_normal.op import sample_normal
from .ops.sample_normal_tril.op import sample_normal_tril

LOG_2PI = math.log(2.0 * math.pi)


class PosteriorShapes:
    """The shapes every posterior (these and fastvae/latents.py's records)
    reads from its mu (..., L)."""

    mu: Tensor

    @property
    def latent_size(self) -> int:
        """L, the noise dimensions per example (a LogisticNormal's z has L + 1)."""
        return self.mu.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.mu.shape[:-1]


class _Gaussian(PosteriorShapes):
    """What the two posteriors share: mu (..., L) and the checks on z."""

    def _check_z(self, z: Tensor) -> None:
        _validate.float_tensors(z=z)
        if z.shape[-1:] != self.mu.shape[-1:]:
            raise ValueError(f"z of shape {tuple(z.shape)} must end in the latent size {self.latent_size}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(latent_size={self.latent_size}, batch_shape={tuple(self.batch_shape)})"


class DiagonalNormal(_Gaussian):
    """N(mu, diag(exp(logvar))) over the last dimension L.

    Args:
        mu, logvar: tensors of the same shape (..., L), any batch shape (none
            for a prior over z).
    """

    def __init__(self, mu: Tensor, logvar: Tensor):
        _validate.float_tensors(mu=mu, logvar=logvar)
        _validate.event_dim("mu", mu)
        _validate.same_shape(mu=mu, logvar=logvar)
        self.mu, self.logvar = mu, logvar

    def log_prob(self, z: Tensor) -> Tensor:
        """log N(z; mu, diag(exp(logvar))) summed over L: z of shape (..., L)
        broadcasting against the batch shape (z (K, *batch, L) for K samples),
        result z's leading shape. Fused (gaussian_log_prob, symmetric in z and mu)."""
        self._check_z(z)
        return gaussian_log_prob(self.mu, z, self.logvar)

    def rsample(self, n_samples: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterized z (fused sample_normal): (..., L), or (K, ..., L) for n_samples=K."""
        return sample_normal(self.mu, self.logvar, n_samples, generator=generator)[0]

    def kl_standard_normal(self) -> Tensor:
        """Analytic KL(self || N(0, I)) summed over L, shape (...) (fused kl_normal)."""
        return kl_normal(self.mu, self.logvar)


class TrilNormal(_Gaussian):
    """N(mu, S Sᵀ) with S = scale_tril lower triangular, positive diagonal.

    Args:
        mu: (..., L).
        scale_tril: (..., L, L), mu's batch shape. Only the lower triangle is
            read (the strict upper triangle may hold anything and gets no
            gradient), as ``MultivariateNormal(scale_tril=)`` assumes. The
            diagonal is not checked (a host sync): a non-positive entry makes
            the KL and log-densities NaN, never a silent number.
    """

    def __init__(self, mu: Tensor, scale_tril: Tensor):
        _validate.float_tensors(mu=mu, scale_tril=scale_tril)
        _validate.event_dim("mu", mu)
        L = mu.shape[-1]
        if scale_tril.shape != (*mu.shape, L):
            raise ValueError(f"scale_tril must have shape {(*mu.shape, L)} (mu's shape then L), "
                             f"got {tuple(scale_tril.shape)}")
        self.mu, self.scale_tril = mu, scale_tril

    def log_prob(self, z: Tensor) -> Tensor:
        """log N(z; mu, S Sᵀ) for z (..., L) broadcasting against the batch
        shape (z (K, *batch, L) for K samples): one triangular solve per row."""
        self._check_z(z)
        return tril_log_prob(z, self.mu, self.scale_tril)

    def rsample(self, n_samples: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterized z = mu + S eps (fused sample_normal_tril)."""
        return sample_normal_tril(self.mu, self.scale_tril, n_samples, generator=generator)[0]

    def kl_standard_normal(self) -> Tensor:
        """Analytic KL(self || N(0, I)), shape (...)."""
        mu, S = widened(self.mu, self.scale_tril)
        S = S.tril()
        diag = torch.diagonal(S, dim1=-2, dim2=-1)
        return 0.5 * ((S * S).sum((-2, -1)) + (mu * mu).sum(-1) - self.latent_size
                      - 2.0 * torch.log(diag).sum(-1))


class _StoppedScore(torch.autograd.Function):
    """value (K, ...) with the gradient d/dz log q(z) = -u (u = S^-T eps) along z
    (K, ..., L) only: log q with its parameters' score stopped (STL / DReG).
    A Function, not value + (z - z.detach()) * u, whose value is 0 * inf once
    u overflows for a collapsed posterior."""

    @staticmethod
    def forward(ctx, z, value, u):
        ctx.save_for_backward(u)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return -grad.unsqueeze(-1) * u, None, None


def sample_tril_with_log_q(q: TrilNormal, n_samples: int | None, generator: torch.Generator | None,
                           stop_score: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(z, kl to N(0, I), log q(z)) for arguments the caller has validated (the
    objectives). log q = -||eps||^2 / 2 - sum log S_ii - L/2 log 2 pi comes from
    the eps that drew z (the same seed's noise, drawn again as sample_normal of
    N(0, I)), exact however small S is: a triangular solve of z - mu
    loses z's bits (2.9 nats at S_ii = e^-20 in float32). Its gradient is the
    total derivative along z = mu + S eps, -d sum log S_ii; with stop_score the
    parameters get no score and z gets d/dz log q = -S^-T eps."""
    from ._backend import accumulation_dtype
    from ._op import draw_seed
    from .ops.sample_normal.op import SampleNormal
    from .ops.sample_normal_tril.op import SampleNormalTril

    mu, S = q.mu, q.scale_tril
    seed = draw_seed(mu.device, generator)
    z, kl = SampleNormalTril.apply(mu, S, seed, n_samples)
    # sample_normal of N(0, I) is the eps itself (an op, so torch.compile traces it)
    zero = torch.zeros(mu.shape, dtype=accumulation_dtype(mu.dtype), device=mu.device)
    with torch.no_grad():
        eps = SampleNormal.apply(zero, zero, seed, n_samples)[0]
    L = mu.shape[-1]
    # in the compute dtype: a log-density is never rounded to half precision
    (Sw,) = widened(S)
    log_diag = torch.log(torch.diagonal(Sw.tril(), dim1=-2, dim2=-1)).sum(-1)
    log_q = (-0.5 * (eps * eps).sum(-1) - 0.5 * L * LOG_2PI).to(log_diag.dtype)
    if not stop_score:
        return z, kl, log_q - log_diag
    St = Sw.detach().tril().to(eps.dtype)
    u = torch.linalg.solve_triangular(St.mT.expand(*eps.shape[:-1], L, L), eps.unsqueeze(-1),
                                      upper=True).squeeze(-1).to(z.dtype)
    return z, kl, _StoppedScore.apply(z, log_q - log_diag.detach(), u)


def widened(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in their compute dtype (_backend.compute_dtype: float32 for
    half precision), for the closed forms written in torch ops: a log-density
    or KL is never rounded to half precision, and CPU has no bfloat16
    triangular solve. They are encoder-sized (..., L) or (..., L, L): the
    copies are small."""
    dtype = _backend.compute_dtype(*tensors)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def tril_log_prob(z: Tensor, mu: Tensor, scale_tril: Tensor) -> Tensor:
    """log N(z; mu, S Sᵀ) summed over L, z (..., L) broadcasting against mu (..., L)."""
    z, mu, scale_tril = widened(z, mu, scale_tril)
    S = scale_tril.tril()
    diff = z - mu
    batch = torch.broadcast_shapes(diff.shape[:-1], S.shape[:-2])
    L = mu.shape[-1]
    diff = diff.expand(*batch, L)
    # solve S w = diff for every sample: S broadcasts over the sample dimensions
    w = torch.linalg.solve_triangular(S.expand(*batch, L, L), diff.unsqueeze(-1), upper=False).squeeze(-1)
    log_det = torch.log(torch.diagonal(S, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (w * w).sum(-1) - log_det - 0.5 * L * LOG_2PI
