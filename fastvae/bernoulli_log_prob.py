"""bernoulli_log_prob: the Bernoulli reconstruction term with logits, fused
forward and backward, with x broadcast over decoder samples."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate
from ._backend import backend_for
from ._likelihood_layout import broadcast_x, kernel_views


# -- custom ops ----------------------------------------------------------------


@torch.library.custom_op("fastvae::bernoulli_log_prob", mutates_args=(), device_types=("cpu", "cuda"))
def bernoulli_log_prob_op(x: Tensor, logits: Tensor) -> Tensor:
    """sum_D(x * logits - softplus(logits)), shape logits.shape[:-1]; x is
    logits' shape or logits.shape[1:] (broadcast over K)."""
    backend = backend_for(logits.device)
    _validate.dtype_for_backend(backend, logits.dtype)
    x2, l3, K, P, D = kernel_views(x, logits)
    out = _backend.empty_output((K, P), like=logits)
    _backend.launch(
        backend, "bernoulli_log_prob", "bernoulli_log_prob_forward", x2, l3, out, work=l3.numel(),
    )
    return out.reshape(logits.shape[:-1])


@bernoulli_log_prob_op.register_fake
def _(x, logits):
    return logits.new_empty(logits.shape[:-1])


@torch.library.custom_op(
    "fastvae::bernoulli_log_prob_backward", mutates_args=(), device_types=("cpu", "cuda")
)
def bernoulli_log_prob_backward_op(g: Tensor, x: Tensor, logits: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """(dx, dlogits); dx is an empty (0,) tensor unless need_dx."""
    backend = backend_for(logits.device)
    x2, l3, K, P, D = kernel_views(x, logits)
    g2 = g.to(logits.dtype).reshape(K, P).contiguous()
    dx = _backend.empty_output((P, D) if need_dx else (0,), like=logits)
    dlogits = _backend.empty_output((K, P, D), like=logits)
    dx_arg = dx if need_dx else None
    _backend.launch(
        backend, "bernoulli_log_prob", "bernoulli_log_prob_backward", g2, x2, l3, dx_arg, dlogits, work=dlogits.numel(),
    )
    return (dx.reshape(x.shape) if need_dx else dx), dlogits.reshape(logits.shape)


@bernoulli_log_prob_backward_op.register_fake
def _(g, x, logits, need_dx):
    return x.new_empty(x.shape if need_dx else (0,)), torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, g):
    x, logits = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dlogits = bernoulli_log_prob_backward_op(g, x, logits, need_dx)
    return (dx if need_dx else None), dlogits


bernoulli_log_prob_op.register_autograd(_backward, setup_context=_setup_context)


# -- public function -----------------------------------------------------------


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last dimension D.

    Args:
        x: data of shape (..., D), binary or in [0, 1] (continuous Bernoulli
            targets are used as is, without the normalizing constant); it
            broadcasts against ``logits`` of shape (K, ..., D) without being
            copied K times. Values are not checked (that would cost a host sync).
        logits: decoder logits, shape (K, ..., D) or (..., D).

    Returns:
        sum(x * logits - softplus(logits)) over D, with ``logits``' leading
        shape. softplus is evaluated as max(l, 0) + log1p(exp(-|l|)), exact for
        |logits| of 100 and beyond. Differentiable in logits and in x when x
        requires grad.
    """
    _validate.float_tensors(x=x, logits=logits)
    _validate.event_dim("logits", logits)
    return bernoulli_log_prob_op(broadcast_x(x, logits, "logits"), logits)
