"""mixture_log_prob's front end: the public function, the torch.library ops
fastvae::mixture_log_prob and fastvae::mixture_log_prob_backward, their
autograd Function (whose double backward is not_twice's named error), and the
checks on a mixture's parameters (also fastvae.priors').

The log density of a diagonal Gaussian mixture (a VampPrior
or a mixture-of-Gaussians prior),

    log p(z) = log sum_u softmax(logits)_u N(z; means_u, diag(exp(logvars_u))),

for z (..., L) against U components with means, logvars (U, L) and mixture
logits (U,) (None: equal weights 1/U).

The kernels stream over the components with a running (max, sumexp)
log-sum-exp state per row of z, so memory is O(size of z + U * L): no
(..., U, L) differences and no (..., U) table of per-component terms. The
backward keeps only z and the output: it recomputes each component's term
from them, w = exp(term - out) (the posterior responsibility of component u),
and sums the gradients of means, logvars and logits over rows in per-thread
(per-program) partial sums reduced in a fixed order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _backend, _double_backward, _validate
from ..._op import define, flat, run, shaped


def _forward(z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None) -> Tensor:
    """out (N,) for z (N, L), means and logvars (U, L), logits (U,) or None."""
    backend = _backend.backend_for(z.device)
    dtype = _backend.compute_dtype(z, means, logvars, logits)
    z, means, logvars, logits = (_backend.kernel_input(backend, t, dtype) for t in (z, means, logvars, logits))
    N, L = z.shape
    U = means.shape[0]
    out = _backend.empty_output((N,), like=z, dtype=dtype)
    _backend.launch(
        backend, "mixture_log_prob_forward", N * U * max(L, 1),
        z=z.contiguous(), means=means.contiguous(), logvars=logvars.contiguous(),
        logits=None if logits is None else logits.contiguous(), out=out,
    )
    return out


def _backward(grad_out: Tensor, z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None, out: Tensor,
              need_dz: bool, need_dmeans: bool, need_dlogvars: bool, need_dlogits: bool) -> list[Tensor]:
    """The gradients asked for, in the order dz (N, L), dmeans, dlogvars (U, L), dlogits (U,)."""
    backend = _backend.backend_for(z.device)
    N, L = z.shape
    U = means.shape[0]
    need_dlogits = need_dlogits and logits is not None
    inputs = z, means, logvars, logits
    dtype = _backend.compute_dtype(*inputs)
    z, means, logvars, logits, out = (_backend.kernel_input(backend, t, dtype) for t in (*inputs, out))
    dz = _backend.empty_output((N, L), like=z) if need_dz else None
    dmeans = _backend.empty_output((U, L), like=means) if need_dmeans else None
    dlogvars = _backend.empty_output((U, L), like=logvars) if need_dlogvars else None
    dlogits = _backend.empty_output((U,), like=logits) if need_dlogits else None
    if need_dz or need_dmeans or need_dlogvars or need_dlogits:
        _backend.launch(
            backend, "mixture_log_prob_backward", N * U * max(L, 1),
            grad_out=grad_out.to(dtype).reshape(N).contiguous(), z=z.contiguous(), means=means.contiguous(),
            logvars=logvars.contiguous(), logits=None if logits is None else logits.contiguous(),
            out=out.contiguous(), dz=dz, dmeans=dmeans, dlogvars=dlogvars, dlogits=dlogits,
        )
    return [_backend.in_dtype(g, t.dtype) for g, t in zip((dz, dmeans, dlogvars, dlogits), inputs) if g is not None]


def _backward_fake(grad_out, z, means, logvars, logits, out, need_dz, need_dmeans, need_dlogvars, need_dlogits):
    grads = []
    if need_dz:
        grads.append(torch.empty_like(z))
    grads += [torch.empty_like(t) for t, need in ((means, need_dmeans), (logvars, need_dlogvars)) if need]
    if need_dlogits and logits is not None:
        grads.append(torch.empty_like(logits))
    return grads


mixture_log_prob_op = define(
    "mixture_log_prob(Tensor z, Tensor means, Tensor logvars, Tensor? logits) -> Tensor",
    _forward,
    lambda z, means, logvars, logits: z.new_empty(z.shape[:1], dtype=_backend.compute_dtype(z, means, logvars, logits)),
)
mixture_log_prob_backward_op = define(
    "mixture_log_prob_backward(Tensor grad_out, Tensor z, Tensor means, Tensor logvars, Tensor? logits,"
    " Tensor out, bool need_dz, bool need_dmeans, bool need_dlogvars, bool need_dlogits) -> Tensor[]",
    _backward,
    _backward_fake,
)


class MixtureLogProb(torch.autograd.Function):
    """Autograd of fastvae::mixture_log_prob: saves z (as (N, L)), the
    parameters and the output (N,), never per-component terms."""

    @staticmethod
    def forward(ctx, z, means, logvars, logits):
        z2 = flat(z)
        out = run(mixture_log_prob_op, z2, means, logvars, logits)
        ctx.z_shape = z.shape
        ctx.save_for_backward(z2, means, logvars, logits, out, z)  # z itself links a double backward's error
        return shaped(out, z.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        z2, means, logvars, logits, out, z = ctx.saved_tensors
        need = ctx.needs_input_grad[:3] + (ctx.needs_input_grad[3] and logits is not None,)
        grads = iter(run(mixture_log_prob_backward_op, grad_out, z2, means, logvars, logits, out, *need))
        dz, dmeans, dlogvars, dlogits = (next(grads) if n else None for n in need)
        if dz is not None:
            dz = shaped(dz, ctx.z_shape)
        if torch.is_grad_enabled():  # create_graph=True: no closed form of the kernel's (N, U, L)-free backward
            return _double_backward.not_twice("mixture_log_prob", (dz, dmeans, dlogvars, dlogits),
                                              (grad_out, z, means, logvars, logits))
        return dz, dmeans, dlogvars, dlogits


# -- public function -----------------------------------------------------------


def mixture_log_prob(z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None = None) -> Tensor:
    """log sum_u softmax(logits)_u N(z; means_u, diag(exp(logvars_u))): the log
    density of a diagonal Gaussian mixture at z, summed over the L latent dims.

    Args:
        z: points of shape (..., L): any number of leading dims, none included.
        means, logvars: the U components' means and log-variances, shape (U, L).
        logits: mixture logits of shape (U,) (unnormalized log weights), or
            None for equal weights 1/U.

    Returns:
        Shape (...). Computed with a running log-sum-exp over the components,
        so a component far from z never underflows the result; memory is
        O(size of z + U * L). Differentiable in z, means, logvars and logits.
    """
    check_components(means, logvars, logits, z=z)
    L = means.shape[1]
    _validate.event_dim("z", z)
    if z.shape[-1] != L:
        raise ValueError(f"z of shape {tuple(z.shape)} must end in the latent dim L={L} of means {tuple(means.shape)}")
    return MixtureLogProb.apply(z, means, logvars, logits)


def check_components(means: Tensor, logvars: Tensor, logits: Tensor | None, **others: Tensor) -> None:
    """The checks on a mixture's parameters (also fastvae.priors.MixtureOfGaussians'),
    with ``others`` (z) held to their dtype and device."""
    tensors = dict(**others, means=means, logvars=logvars)
    if logits is not None:
        tensors["logits"] = logits
    _validate.float_tensors(**tensors)
    if means.dim() != 2:
        raise ValueError(f"means must be a 2-d (U, L) tensor, got shape {tuple(means.shape)}")
    _validate.same_shape(means=means, logvars=logvars)
    U = means.shape[0]
    if U < 1:
        raise ValueError("means must have at least one component (U >= 1), got shape (0, L)")
    if logits is not None and logits.shape != (U,):
        raise ValueError(f"logits must have shape ({U},) (one per component of means), got {tuple(logits.shape)}")
