"""bernoulli_log_prob: the Bernoulli reconstruction term with logits, fused
forward and backward, with x broadcast over decoder samples."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _double_backward, _validate, _value_checks
from ._likelihood_layout import broadcast_x, fold_samples, folded, kernel_views, likelihood_torch_ops, unfold_rows
from ._op import define, run, shaped


def _forward(x: Tensor, logits: Tensor) -> Tensor:
    """sum_D(x * logits - softplus(logits)), shape (K, P), for x (P, D) and
    logits (K, P, D), both contiguous (kernel_views makes them so)."""
    backend = _backend.backend_for(logits.device)
    dtype = _backend.compute_dtype(x, logits)
    # logits are read in their own dtype (a bfloat16 decoder output is never
    # copied to float32); the result is float32, or float64
    x, logits = _backend.kernel_input(backend, x, dtype), _backend.kernel_input(backend, logits, dtype, True)
    if fold_samples(backend, logits):
        K, P, _ = logits.shape
        x, folded_logits, _ = folded(x, logits)
        out = _backend.empty_output((1, K * P), like=logits, dtype=dtype)
        _backend.launch(backend, "bernoulli_log_prob_forward", logits.numel(), x=x, logits=folded_logits, out=out)
        return out.view(K, P)
    out = _backend.empty_output(logits.shape[:2], like=logits, dtype=dtype)
    _backend.launch(backend, "bernoulli_log_prob_forward", logits.numel(), x=x, logits=logits, out=out)
    return out


def _backward(grad_out: Tensor, x: Tensor, logits: Tensor, need_dx: bool) -> list[Tensor]:
    """[dlogits (K, P, D)], and dx (P, D) when need_dx, for grad_out (K, P)
    and the layout of _forward (an unwanted gradient is not allocated at all:
    that cost as much as a small kernel). Each gradient in its input's dtype."""
    backend = _backend.backend_for(logits.device)
    K, P, D = logits.shape
    dtype = _backend.compute_dtype(x, logits)
    x_dtype, logits_dtype = x.dtype, logits.dtype
    x, logits = _backend.kernel_input(backend, x, dtype), _backend.kernel_input(backend, logits, dtype, True)
    grad_out = _backend.kernel_input(backend, grad_out, dtype)
    x2, l3 = x, logits
    fold = fold_samples(backend, logits)
    if fold:
        x2, l3, _ = folded(x, logits)
    dlogits = _backend.empty_output(l3.shape, like=logits)
    dx = _backend.empty_output((l3.shape[1], D), like=x) if need_dx else None
    _backend.launch(
        backend, "bernoulli_log_prob_backward", dlogits.numel(),
        grad_out=shaped(grad_out, l3.shape[:2]).contiguous(), x=x2, logits=l3, dx=dx, dlogits=dlogits,
    )
    dlogits = _backend.in_dtype(dlogits.view(K, P, D) if fold else dlogits, logits_dtype)
    if not need_dx:
        return [dlogits]
    return [dlogits, _backend.in_dtype(unfold_rows(dx, K, P) if fold else dx, x_dtype)]


bernoulli_log_prob_op = define(
    "bernoulli_log_prob(Tensor x, Tensor logits) -> Tensor",
    _forward,
    lambda x, logits: logits.new_empty(logits.shape[:2], dtype=_backend.compute_dtype(x, logits)),
)
bernoulli_log_prob_backward_op = define(
    "bernoulli_log_prob_backward(Tensor grad_out, Tensor x, Tensor logits, bool need_dx) -> Tensor[]",
    _backward,
    lambda grad_out, x, logits, need_dx: [torch.empty_like(logits)] + ([torch.empty_like(x)] if need_dx else []),
)


class BernoulliLogProb(torch.autograd.Function):
    """Autograd of fastvae::bernoulli_log_prob. The op takes the kernels'
    layout, x (P, D) and logits (K, P, D); made here once, and saved, so the
    backward reuses it (the inputs too, for a double backward)."""

    @staticmethod
    def forward(ctx, x, logits):
        x2, l3 = kernel_views(x, logits)
        ctx.save_for_backward(x2, l3, x, logits)
        ctx.shapes = x.shape, logits.shape
        return shaped(run(bernoulli_log_prob_op, x2, l3), logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, l3, x, logits = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return _double_backward.bernoulli_log_prob(grad_out, x, logits, ctx.needs_input_grad)
        need_dx = ctx.needs_input_grad[0]
        grads = run(bernoulli_log_prob_backward_op, grad_out, x2, l3, need_dx)
        x_shape, logits_shape = ctx.shapes
        return (shaped(grads[1], x_shape) if need_dx else None), shaped(grads[0], logits_shape)


# -- public function -----------------------------------------------------------


def bernoulli_log_prob(x: Tensor, logits: Tensor, *, event_dims: int = 1) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last dimension D.

    Args:
        x: data of shape (..., D), binary or in [0, 1] (continuous Bernoulli
            targets are used as is, without the normalizing constant); it
            broadcasts against ``logits`` of shape (K, ..., D) without being
            copied K times. Values outside [0, 1] give a number that is no
            log-likelihood: fastvae warns (on CPU at every call, on CUDA at
            the first; ``fastvae.set_value_checks``).
        logits: decoder logits, shape (K, ..., D) or (..., D): the
            pre-sigmoid output. Probabilities (a decoder ending in a sigmoid)
            give a wrong likelihood without an error; fastvae warns when every
            value it reads lies in [0, 1].
        event_dims: how many trailing dimensions form one event, summed over:
            3 for (..., C, H, W) images (x then ends in (C, H, W) too).

    Returns:
        sum(x * logits - softplus(logits)) over D, with ``logits``' leading
        shape. softplus is evaluated as max(l, 0) + log1p(exp(-|l|)), exact for
        |logits| of 100 and beyond. Differentiable in logits and in x when x
        requires grad.

    Dtypes may differ (bfloat16 logits with float32 x, as under autocast):
    each is read in its own dtype; the result is float32 when any input is
    half precision (float64 when any is float64), and each gradient comes
    back in its input's dtype.
    """
    _validate.float_tensors(x=x, logits=logits)
    _validate.event_dim("logits", logits)
    if type(event_dims) is not int or event_dims < 1:  # True and 1.0 must not pass as 1
        event_dims = _validate.positive_int("event_dims", event_dims)
    _value_checks.bernoulli_data(x)
    _value_checks.bernoulli_logits(logits)
    return bernoulli_log_prob_unchecked(x, logits, event_dims)


def bernoulli_log_prob_unchecked(x: Tensor, logits: Tensor, event_dims: int = 1) -> Tensor:
    """bernoulli_log_prob after the metadata checks and without the value
    checks (the caller ran them, with its own argument names)."""
    if event_dims != 1:
        x, logits = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(logits, "logits", event_dims)
    x = broadcast_x(x, logits, "logits")
    ops = likelihood_torch_ops(x, logits)
    if ops is not None:
        return ops.bernoulli_log_prob(x, logits)
    return BernoulliLogProb.apply(x, logits)
