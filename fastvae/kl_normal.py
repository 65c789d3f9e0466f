"""kl_normal: analytic KL between diagonal Gaussians, fused forward and backward."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate
from ._likelihood_layout import broadcasts_to
from ._backend import backend_for
from .sample_normal import _flat


# -- custom ops ----------------------------------------------------------------


@torch.library.custom_op("fastvae::kl_normal", mutates_args=(), device_types=("cpu", "cuda"))
def kl_normal_op(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None) -> Tensor:
    """kl (...) for mu, logvar and (optional, same shape) prior_mu, prior_logvar (..., L)."""
    backend = backend_for(mu.device)
    _validate.dtype_for_backend(backend, mu.dtype)
    mu2, lv2 = _flat(mu), _flat(logvar)
    pm2 = None if prior_mu is None else _flat(prior_mu)
    plv2 = None if prior_logvar is None else _flat(prior_logvar)
    kl = _backend.empty_output((mu2.shape[0],), like=mu)
    _backend.launch(backend, "kl_normal", "kl_normal_forward", mu2, lv2, pm2, plv2, kl, work=mu2.numel())
    return kl.reshape(mu.shape[:-1])


@kl_normal_op.register_fake
def _(mu, logvar, prior_mu, prior_logvar):
    return mu.new_empty(mu.shape[:-1])


@torch.library.custom_op("fastvae::kl_normal_backward", mutates_args=(), device_types=("cpu", "cuda"))
def kl_normal_backward_op(
    dkl: Tensor, mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dmu, dlogvar, dprior_mu, dprior_logvar); the prior gradients are empty
    (0,)-shaped tensors when no prior is given."""
    backend = backend_for(mu.device)
    mu2, lv2 = _flat(mu), _flat(logvar)
    N, L = mu2.shape
    g = dkl.to(mu.dtype).reshape(N).contiguous()
    has_prior = prior_mu is not None
    pm2 = _flat(prior_mu) if has_prior else None
    plv2 = _flat(prior_logvar) if has_prior else None
    dmu, dlv = _backend.empty_output((N, L), like=mu), _backend.empty_output((N, L), like=mu)
    dpm = _backend.empty_output((N, L) if has_prior else (0,), like=mu)
    dplv = _backend.empty_output((N, L) if has_prior else (0,), like=mu)
    dpm_arg, dplv_arg = (dpm, dplv) if has_prior else (None, None)
    _backend.launch(
        backend, "kl_normal", "kl_normal_backward",
        g, mu2, lv2, pm2, plv2, dmu, dlv, dpm_arg, dplv_arg,
        work=mu2.numel(),
    )
    if has_prior:
        dpm, dplv = dpm.reshape(mu.shape), dplv.reshape(mu.shape)
    return dmu.reshape(mu.shape), dlv.reshape(mu.shape), dpm, dplv


@kl_normal_backward_op.register_fake
def _(dkl, mu, logvar, prior_mu, prior_logvar):
    prior_shape = mu.shape if prior_mu is not None else (0,)
    return (torch.empty_like(mu), torch.empty_like(mu), mu.new_empty(prior_shape), mu.new_empty(prior_shape))


def _setup_context(ctx, inputs, output):
    mu, logvar, prior_mu, prior_logvar = inputs
    ctx.has_prior = prior_mu is not None
    ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar)


def _backward(ctx, dkl):
    mu, logvar, prior_mu, prior_logvar = ctx.saved_tensors
    dmu, dlv, dpm, dplv = kl_normal_backward_op(dkl, mu, logvar, prior_mu, prior_logvar)
    if not ctx.has_prior:
        return dmu, dlv, None, None
    return dmu, dlv, dpm, dplv


kl_normal_op.register_autograd(_backward, setup_context=_setup_context)


# -- public function -----------------------------------------------------------


def kl_normal(
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Tensor | None = None,
    prior_logvar: Tensor | None = None,
) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || prior), summed over the last dimension.

    Args:
        mu, logvar: shape (..., L).
        prior_mu, prior_logvar: both None for the prior N(0, I), or both tensors
            broadcastable to mu's shape (e.g. (L,) for a learned prior) for the
            diagonal Gaussian N(prior_mu, diag(exp(prior_logvar))).

    Returns:
        kl of shape (...): 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar) for the
        standard prior, else 0.5 * sum(plv - logvar + (exp(logvar) + (mu - pm)^2) / exp(plv) - 1).
        Differentiable in every tensor argument.
    """
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError("prior_mu and prior_logvar must both be given or both be None")
    if prior_mu is None:
        _validate.float_tensors(mu=mu, logvar=logvar)
        _validate.event_dim("mu", mu)
        _validate.same_shape(mu=mu, logvar=logvar)
        return kl_normal_op(mu, logvar, None, None)
    _validate.float_tensors(mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    _validate.event_dim("mu", mu)
    _validate.same_shape(mu=mu, logvar=logvar)
    for name, p in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if not broadcasts_to(p.shape, mu.shape):
            raise ValueError(
                f"{name} of shape {tuple(p.shape)} does not broadcast to mu's shape {tuple(mu.shape)}"
            )
    # expand is a view; the op makes it contiguous, and autograd's expand
    # backward sums the prior gradients back to the prior's own shape
    return kl_normal_op(mu, logvar, prior_mu.expand(mu.shape), prior_logvar.expand(mu.shape))
