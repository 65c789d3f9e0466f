"""The per-example log p(x) of a pythae VAE with a Gaussian posterior,
streamed over K by fastvae (docs/integrations.md).

pythae is imported when :func:`log_likelihood` is called, not when this
module is imported: ``pip install fastvae[integrations]`` adds it.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._validate import positive_int
from ..evaluation import LogLikelihoodStats
from ._common import RowNoise, evaluate

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# pythae models built on its VAE class whose log p(x) this adapter does not
# estimate, each with the reason (checked in this order: a subclass first)
_REFUSED = (
    ("VAMP", "its prior is a VampPrior (a mixture over learned pseudo-inputs), not N(0, I): this adapter's "
             "log-weight uses the standard normal prior"),
    ("VAE_IAF", "its posterior is a normalizing flow (inverse autoregressive) on top of the Gaussian: "
                "q(z | x) is not the Gaussian this adapter samples from"),
    ("VAE_LinNF", "its posterior is a normalizing flow (planar/radial) on top of the Gaussian: q(z | x) is "
                  "not the Gaussian this adapter samples from"),
    ("RHVAE", "its posterior is reached by Riemannian Hamiltonian flows: the density of a sample is not "
              "tractable as a Gaussian's"),
    ("HVAE", "its posterior is reached by Hamiltonian flows: the density of a sample is not tractable as a "
             "Gaussian's"),
    ("SVAE", "its posterior and prior are von Mises-Fisher on the hypersphere, not Gaussian"),
    ("PoincareVAE", "its posterior and prior live on the Poincaré ball (wrapped or Riemannian normal), "
                    "not Gaussian on R^L"),
    ("VAEGAN", "its reconstruction term is a discriminator's feature loss, not a likelihood p(x | z)"),
    ("MSSSIM_VAE", "it is trained with the MS-SSIM similarity, not a likelihood p(x | z)"),
)
# pythae's autoencoders without a posterior to sample from
_DETERMINISTIC = ("AE", "RAE_GP", "RAE_L2", "WAE_MMD", "VQVAE")


def log_likelihood(
    model: Any,
    data: Tensor,
    k: int = 5000,
    chunk_size: int | None = None,
    target_stderr: float | None = None,
    return_stats: bool = False,
    generator: torch.Generator | None = None,
    memory_budget: int | None = None,
    bytes_per_sample: int | None = None,
    progress: bool = False,
    batch_size: int = 256,
) -> Tensor | LogLikelihoodStats:
    """log p(x_i) of each example of ``data`` under a pythae VAE, by importance
    sampling from its encoder: log p̂(x_i) = logmeanexp_k [log p(x_i | z_ik)
    + log N(z_ik; 0, I) − log N(z_ik; μ_i, diag σ_i²)], the per-example
    quantity whose mean ``model.get_nll(data, n_samples=k)`` returns, with the
    diagnostics of :func:`fastvae.log_likelihood`.

    p(x | z) is the model's own: for ``reconstruction_loss="bce"`` the
    Bernoulli with means ``decoder(z)["reconstruction"]`` (log terms clamped
    at -100 as torch's binary_cross_entropy, pythae's training loss, does),
    for ``"mse"`` the unit-variance Gaussian centred there. The encoder runs
    once per example (in batches of ``batch_size``), and each chunk of samples
    runs the decoder on all its rows at once.

    Args:
        model: a trained pythae model of the VAE family with a Gaussian
            posterior and a standard normal prior: VAE, BetaVAE,
            DisentangledBetaVAE, BetaTCVAE, FactorVAE, INFOVAE_MMD, IWAE,
            CIWAE, MIWAE, PIWAE, Adversarial_AE, or a subclass of these that
            keeps VAE's ``get_nll``.
        data: the examples, (B, *model.input_dim), on the model's device.
        k: samples per example (K >= 1; 5000 is the usual report).
        chunk_size, memory_budget, bytes_per_sample, generator, progress:
            as in :func:`fastvae.importance_log_likelihood`; the chunk size by
            default comes from the memory the decoder is measured to use per
            sample of an example.
        target_stderr: stop sampling an example once its standard error
            reaches this (nats), as in :func:`fastvae.log_likelihood`.
        return_stats: return a :class:`fastvae.LogLikelihoodStats` instead of
            the estimates alone.
        batch_size: examples per encoder pass.

    Returns:
        (B,) estimates of log p(x_i) in nats (float32; float64 for a float64
        model and data), or LogLikelihoodStats with ``return_stats=True``.

    Raises:
        TypeError: when ``model`` is not a pythae model, or is one whose
            log p(x) this adapter does not estimate, naming why: a
            deterministic encoder (AE, RAE_GP, RAE_L2, WAE_MMD, VQVAE: no
            posterior), a VampPrior (VAMP), a flow or Hamiltonian posterior
            (VAE_IAF, VAE_LinNF, HVAE, RHVAE), a non-Gaussian posterior (SVAE,
            PoincareVAE), a reconstruction that is not a likelihood (VAEGAN,
            MSSSIM_VAE), or a subclass that overrides ``get_nll``.
        ValueError: when ``reconstruction_loss`` is neither "bce" nor "mse",
            when data's shape is not (B, *model.input_dim), or for an invalid
            k, chunk_size, memory_budget, target_stderr or batch_size.

    Runs under torch.no_grad() with the model in eval mode, restored after.
    """
    from pythae.models import VAE, BaseAE

    _check_model(model, BaseAE, VAE)
    k = positive_int("k", k)
    if not isinstance(data, Tensor):
        raise TypeError(f"data must be a tensor (B, *input_dim), got {type(data).__name__}")
    input_dim = tuple(model.input_dim) if getattr(model, "input_dim", None) is not None else tuple(data.shape[1:])
    if data.dim() < 2 or data.shape[0] < 1 or tuple(data.shape[1:]) != input_dim:
        raise ValueError(f"data must have shape (B, *input_dim) = (B, {', '.join(map(str, input_dim))}) with "
                         f"B >= 1, got {tuple(data.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    recon = model.model_config.reconstruction_loss
    B = data.shape[0]
    x = data.reshape(B, -1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            mus, log_vars = [], []
            for b0 in range(0, B, batch_size):
                out = model.encoder(data[b0:b0 + batch_size])
                mus.append(out.embedding.reshape(out.embedding.shape[0], -1))
                log_vars.append(out.log_covariance.reshape(out.embedding.shape[0], -1))
            mu, log_var = torch.cat(mus), torch.cat(log_vars)
        # binarized data (the usual case for "bce"), checked once
        binary = recon == "bce" and bool(((x == 0) | (x == 1)).all())
        x_bool = x.bool() if binary else None
        std = (0.5 * log_var).exp()
        half_log_var_sum = 0.5 * log_var.sum(-1)
        constant = -x.shape[1] * _HALF_LOG_2PI  # the unit-variance Gaussian's normalizer

        noise = RowNoise(B, k, mu.shape[1], mu.dtype, mu.device, generator)

        def log_weight_fn(x_rep: Tensor) -> Tensor:
            n, b = x_rep.shape
            rows = x_rep[0].long()
            take = (lambda t: t) if b == B else (lambda t: t[rows])
            m, s = take(mu), take(std)
            eps = noise(rows, n)
            z = torch.addcmul(m, s, eps)
            log_w = 0.5 * (eps.square() - z.square()).sum(-1) + take(half_log_var_sum)  # log p(z) - log q(z)
            mean = model.decoder(z.reshape(n * b, -1))["reconstruction"].reshape(n, b, -1)
            xs = take(x).expand(n, b, -1)
            if binary:  # one log per pixel, not two: binary_cross_entropy's value for x in {0, 1}
                log_px = torch.where(take(x_bool), mean, 1 - mean).log_().clamp_(min=-100).sum(-1)
            elif recon == "bce":
                log_px = -torch.nn.functional.binary_cross_entropy(mean, xs, reduction="none").sum(-1)
            else:
                log_px = -0.5 * (mean - xs).square().sum(-1) + constant
            return log_w + log_px

        out = evaluate(B, data.device, torch.float64 if data.dtype == torch.float64 else torch.int64, log_weight_fn,
                       k=k, chunk_size=chunk_size, generator=generator, progress=progress, return_stats=return_stats,
                       memory_budget=memory_budget, bytes_per_sample=bytes_per_sample, target_stderr=target_stderr)
    finally:
        model.train(was_training)
    return out


def _check_model(model: Any, base_ae: type, vae: type) -> None:
    """Refuses, naming the reason, the models whose log p(x) is not the
    Gaussian-posterior, standard-normal-prior estimate this adapter computes."""
    names = [c.__name__ for c in type(model).__mro__]
    if not isinstance(model, base_ae):
        raise TypeError(f"model must be a pythae model (pythae.models.BaseAE), got {type(model).__name__}")
    for name, why in _REFUSED:
        if name in names:
            raise TypeError(f"pythae's {name} is not supported by fastvae.integrations.pythae: {why}")
    if not isinstance(model, vae):
        kind = next((n for n in names if n in _DETERMINISTIC), type(model).__name__)
        raise TypeError(f"pythae's {kind} has no posterior q(z | x) to sample from (a deterministic encoder): "
                        f"importance sampling needs one, so it has no log p(x) estimate; use a VAE-family model")
    if type(model).get_nll is not vae.get_nll:
        raise TypeError(f"{type(model).__name__} overrides pythae's VAE.get_nll: its log p(x) is not the "
                        f"Gaussian-posterior, standard-normal-prior estimate fastvae.integrations.pythae computes")
    recon = model.model_config.reconstruction_loss
    if recon not in ("bce", "mse"):
        raise ValueError(f"model.model_config.reconstruction_loss must be 'bce' or 'mse' (the likelihoods "
                         f"p(x | z) this adapter knows), got {recon!r}")
