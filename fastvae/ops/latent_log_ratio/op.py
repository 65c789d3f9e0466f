"""latent_log_ratio's front end: the public function, the torch.library ops
fastvae::latent_log_ratio and fastvae::latent_log_ratio_backward, and their
autograd Function (its double backward included).

log p(z) - log q(z|x) per sample, fused, for the prior
p = N(0, I) and the encoder's q = N(mu, diag(exp(logvar))):

    r = sum_l(-z^2 / 2 + eps^2 / 2 + logvar / 2),   eps = (z - mu) exp(-logvar / 2)

(the log 2pi terms cancel). z carries K samples, (K, ..., L), of the (..., L)
encoder outputs, which the kernels read once per sample instead of
broadcasting them in memory.

Two gradient modes: full (plain autograd semantics), and ``stop_score=True``
(STL, Roeder et al. 2017; DReG, Tucker et al. 2018): the explicit mu and logvar
arguments of log q get no gradient, while the path through z keeps its
gradient; when z comes from fastvae.sample_normal that path still reaches mu
and logvar through the reparameterization.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _backend, _validate
from ..._dtypes import accumulation_dtype
from ..._op import define, flat, run


def _forward(z: Tensor, mu: Tensor, logvar: Tensor, stop_score: bool) -> Tensor:
    """r (K, ...) for z (K, ..., L) and mu, logvar (..., L); stop_score only
    changes the gradient."""
    backend = _backend.backend_for(z.device)
    dtype = _backend.compute_dtype(z, mu, logvar)
    mu2 = _backend.kernel_input(backend, flat(mu), dtype)
    N, L = mu2.shape
    K = z.shape[0]
    out = _backend.empty_output((K, N), like=z, dtype=dtype)
    _backend.launch(
        backend, "latent_log_ratio_forward", K * N * L,
        z=_backend.kernel_input(backend, z.reshape(K, N, L).contiguous(), dtype), mu=mu2,
        logvar=_backend.kernel_input(backend, flat(logvar), dtype), out=out,
    )
    return out.reshape(z.shape[:-1])


def _backward(grad_out: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, stop_score: bool) -> list[Tensor]:
    """[dz (K, ..., L)], then dmu, dlogvar (..., L) unless stop_score, which
    gives them no gradient (none is computed or allocated)."""
    backend = _backend.backend_for(z.device)
    dtype = _backend.compute_dtype(z, mu, logvar)
    mu2 = _backend.kernel_input(backend, flat(mu), dtype)
    lv2 = _backend.kernel_input(backend, flat(logvar), dtype)
    N, L = mu2.shape
    K = z.shape[0]
    z3 = _backend.kernel_input(backend, z.reshape(K, N, L).contiguous(), dtype)
    dz = _backend.empty_output((K, N, L), like=z3)
    dmu = None if stop_score else _backend.empty_output((N, L), like=mu2)
    dlv = None if stop_score else _backend.empty_output((N, L), like=lv2)
    _backend.launch(
        backend, "latent_log_ratio_backward", K * N * L,
        grad_out=grad_out.to(dtype).reshape(K, N).contiguous(), z=z3,
        mu=mu2, logvar=lv2, dz=dz, dmu=dmu, dlogvar=dlv,
    )
    dz = _backend.in_dtype(dz, z.dtype).reshape(z.shape)
    if stop_score:
        return [dz]
    return [dz, _backend.in_dtype(dmu, mu.dtype).reshape(mu.shape),
            _backend.in_dtype(dlv, logvar.dtype).reshape(mu.shape)]


def _backward_fake(grad_out, z, mu, logvar, stop_score):
    return [torch.empty_like(z)] if stop_score else [torch.empty_like(z), torch.empty_like(mu),
                                                     torch.empty_like(logvar)]


latent_log_ratio_op = define(
    "latent_log_ratio(Tensor z, Tensor mu, Tensor logvar, bool stop_score) -> Tensor",
    _forward,
    lambda z, mu, logvar, stop_score: z.new_empty(z.shape[:-1], dtype=_backend.compute_dtype(z, mu, logvar)),
)
latent_log_ratio_backward_op = define(
    "latent_log_ratio_backward(Tensor grad_out, Tensor z, Tensor mu, Tensor logvar, bool stop_score) -> Tensor[]",
    _backward,
    _backward_fake,
)


def _double_backward(grad_out, z, mu, logvar, stop_score, needs):
    """dz, dmu, dlogvar of sum(-z^2/2 + (z - mu)^2 e^(-logvar) / 2 + logvar / 2) for z (K, ..., L)
    as differentiable torch ops, for a create_graph=True backward, in the accumulation
    dtype, each gradient in its input's dtype (None where none is needed); with
    stop_score mu and logvar enter as constants (and get no gradient)."""
    def up(t):
        return t.to(accumulation_dtype(t.dtype))

    def like(d, t, need):
        return d.to(t.dtype) if need else None

    g, zz = up(grad_out).unsqueeze(-1), up(z)
    m, lv = up(mu), up(logvar)
    if stop_score:
        m, lv = m.detach(), lv.detach()
    inv_var = torch.exp(-lv)
    d = zz - m
    dz = like(g * (d * inv_var - zz), z, needs[0])
    if stop_score:
        return dz, None, None
    return (dz, like(-(g * d).sum(0) * inv_var, mu, needs[1]),
            like(0.5 * (g * (1.0 - d * d * inv_var)).sum(0), logvar, needs[2]))


class LatentLogRatio(torch.autograd.Function):
    """Autograd of fastvae::latent_log_ratio: saves z, mu and logvar."""

    @staticmethod
    def forward(ctx, z, mu, logvar, stop_score):
        ctx.stop_score = stop_score
        ctx.save_for_backward(z, mu, logvar)
        return run(latent_log_ratio_op, z, mu, logvar, stop_score)

    @staticmethod
    def backward(ctx, grad_out):
        z, mu, logvar = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (*_double_backward(grad_out, z, mu, logvar, ctx.stop_score, ctx.needs_input_grad), None)
        grads = run(latent_log_ratio_backward_op, grad_out, z, mu, logvar, ctx.stop_score)
        if ctx.stop_score:
            return grads[0], None, None, None
        return grads[0], grads[1], grads[2], None


# -- public function -----------------------------------------------------------


def latent_log_ratio(z: Tensor, mu: Tensor, logvar: Tensor, *, stop_score: bool = False) -> Tensor:
    """log N(z; 0, I) - log N(z; mu, diag(exp(logvar))), summed over the last dim.

    Args:
        z: samples of shape (K, ..., L), or (..., L) for a single sample.
        mu, logvar: the encoder outputs, shape (..., L), shared by the K samples.
        stop_score: False for plain autograd gradients; True for the "stop the
            score" estimators (STL, DReG): mu and logvar get no gradient from
            this term, z keeps its (path) gradient.

    Returns:
        r of shape (K, ...) (or (...)): sum(-z^2/2 + eps^2/2 + logvar/2) with
        eps = (z - mu) exp(-logvar/2). Added to log p(x|z) it gives the
        importance log-weight log p(x, z) - log q(z|x) of fastvae.logmeanexp.
    """
    _validate.float_tensors(z=z, mu=mu, logvar=logvar)
    _validate.event_dim("mu", mu)
    _validate.same_shape(mu=mu, logvar=logvar)
    if not isinstance(stop_score, bool):
        raise TypeError(f"stop_score must be a bool, got {type(stop_score).__name__}")
    if z.shape == mu.shape:
        return LatentLogRatio.apply(z.unsqueeze(0), mu, logvar, stop_score)[0]
    if z.dim() == mu.dim() + 1 and z.shape[1:] == mu.shape:
        return LatentLogRatio.apply(z, mu, logvar, stop_score)
    raise ValueError(
        f"z of shape {tuple(z.shape)} must have mu's shape {tuple(mu.shape)} or (K, *{tuple(mu.shape)})"
    )
