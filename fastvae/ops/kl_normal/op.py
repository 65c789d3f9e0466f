"""kl_normal's front end: the public function, the torch.library ops
fastvae::kl_normal and fastvae::kl_normal_backward, and their autograd Function
(its double backward included)."""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _backend, _validate
from ..._dtypes import accumulation_dtype
from ..._op import define, flat, run, shaped
from . import kl_normal_grad


def _forward(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None) -> Tensor:
    """kl (N,) for mu, logvar and (optional, same shape) prior_mu, prior_logvar (N, L), contiguous."""
    backend = _backend.backend_for(mu.device)
    dtype = _backend.compute_dtype(mu, logvar, prior_mu, prior_logvar)
    mu, logvar, prior_mu, prior_logvar = (_backend.kernel_input(backend, t, dtype)
                                          for t in (mu, logvar, prior_mu, prior_logvar))
    kl = _backend.empty_output(mu.shape[:1], like=mu, dtype=dtype)
    _backend.launch(backend, "kl_normal_forward", mu.numel(), mu=mu, logvar=logvar,
                    prior_mu=prior_mu, prior_logvar=prior_logvar, kl=kl)
    return kl


def _backward(grad_kl: Tensor, mu: Tensor, logvar: Tensor, prior_mu: Tensor | None,
              prior_logvar: Tensor | None) -> list[Tensor]:
    """[dmu, dlogvar], and dprior_mu, dprior_logvar when a prior is given,
    each (N, L), in the layout of _forward and its input's dtype."""
    backend = _backend.backend_for(mu.device)
    has_prior = prior_mu is not None
    inputs = (mu, logvar, prior_mu, prior_logvar)[:4 if has_prior else 2]
    dtype = _backend.compute_dtype(*inputs)
    mu, logvar, prior_mu, prior_logvar = (_backend.kernel_input(backend, t, dtype)
                                          for t in (mu, logvar, prior_mu, prior_logvar))
    grad_kl = _backend.kernel_input(backend, grad_kl, dtype)
    grads = [_backend.empty_output(mu.shape, like=t) for t in (mu, logvar, prior_mu, prior_logvar)[:len(inputs)]]
    _backend.launch(
        backend, "kl_normal_backward", mu.numel(),
        grad_kl=grad_kl.contiguous(), mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
        dmu=grads[0], dlogvar=grads[1], dprior_mu=grads[2] if has_prior else None,
        dprior_logvar=grads[3] if has_prior else None,
    )
    return [_backend.in_dtype(g, t.dtype) for g, t in zip(grads, inputs)]


def _backward_fake(grad_kl, mu, logvar, prior_mu, prior_logvar):
    return [torch.empty_like(t) for t in (mu, logvar, prior_mu, prior_logvar)[:2 if prior_mu is None else 4]]


kl_normal_op = define(
    "kl_normal(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar) -> Tensor",
    _forward,
    lambda mu, logvar, prior_mu, prior_logvar: mu.new_empty(
        mu.shape[:1], dtype=_backend.compute_dtype(mu, logvar, prior_mu, prior_logvar)),
    cpu=lambda mu, logvar, prior_mu, prior_logvar: (mu, logvar, prior_mu, prior_logvar),
)
kl_normal_backward_op = define(
    "kl_normal_backward(Tensor grad_kl, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar)"
    " -> Tensor[]",
    _backward,
    _backward_fake,
    cpu=lambda grad_kl, mu, logvar, prior_mu, prior_logvar: (mu, logvar, prior_mu, prior_logvar, grad_kl),
)


def _double_backward(grad_kl, mu, logvar, prior_mu, prior_logvar, needs):
    """dmu, dlogvar[, dprior_mu, dprior_logvar] as differentiable torch ops, for a
    create_graph=True backward: the oracle's kl_normal_grad in the accumulation
    dtype, each gradient in its input's dtype (None where none is needed)."""
    def up(t):
        return None if t is None else t.to(accumulation_dtype(t.dtype))

    grads = kl_normal_grad(up(grad_kl).unsqueeze(-1), up(mu), torch.exp(up(logvar)), up(prior_mu), up(prior_logvar))
    inputs = (mu, logvar) if prior_mu is None else (mu, logvar, prior_mu, prior_logvar)
    out = tuple(d.to(t.dtype) if need else None for d, t, need in zip(grads, inputs, needs))
    return out + (None, None) * (prior_mu is None)


class KLNormal(torch.autograd.Function):
    """Autograd of fastvae::kl_normal. The op takes (N, L) contiguous tensors;
    made here once, and saved, so the backward reuses them; the inputs
    themselves are saved too, for a double backward."""

    @staticmethod
    def forward(ctx, mu, logvar, prior_mu, prior_logvar):
        ctx.shape = mu.shape
        mu2, lv2 = flat(mu), flat(logvar)
        pm2 = None if prior_mu is None else flat(prior_mu)
        plv2 = None if prior_logvar is None else flat(prior_logvar)
        ctx.save_for_backward(mu2, lv2, pm2, plv2, mu, logvar, prior_mu, prior_logvar)
        return shaped(run(kl_normal_op, mu2, lv2, pm2, plv2), mu.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        mu2, lv2, pm2, plv2, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return _double_backward(grad_kl, *inputs, ctx.needs_input_grad)
        grads = run(kl_normal_backward_op, shaped(grad_kl, mu2.shape[:1]), mu2, lv2, pm2, plv2)
        shape = ctx.shape
        if pm2 is None:  # the op returns no prior gradients: allocating empty ones cost as much as the kernel
            return shaped(grads[0], shape), shaped(grads[1], shape), None, None
        return tuple(shaped(g, shape) for g in grads)


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
        return _kl_normal(mu, logvar, None, None)
    _validate.float_tensors(mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    _validate.event_dim("mu", mu)
    _validate.same_shape(mu=mu, logvar=logvar)
    for name, p in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if not _validate.broadcasts_to(p.shape, mu.shape):
            raise ValueError(
                f"{name} of shape {tuple(p.shape)} does not broadcast to mu's shape {tuple(mu.shape)}"
            )
    # expand is a view; the op makes it contiguous, and autograd's expand
    # backward sums the prior gradients back to the prior's own shape
    return _kl_normal(mu, logvar, prior_mu.expand(mu.shape), prior_logvar.expand(mu.shape))


def _kl_normal(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None) -> Tensor:
    """KLNormal, or for eager CPU calls the C++ operator that does the same (csrc/torch_ops.cpp)."""
    ops = _backend.torch_ops(mu, logvar, prior_mu, prior_logvar)
    if ops is not None:
        return ops.kl_normal(mu, logvar, prior_mu, prior_logvar)
    return KLNormal.apply(mu, logvar, prior_mu, prior_logvar)
