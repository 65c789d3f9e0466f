"""continuous_bernoulli_log_prob: the continuous Bernoulli likelihood
(Loaiza-Ganem and Cunningham 2019) with logits, fused forward and backward,
with x in [0, 1] broadcast over decoder samples:

    log p(x | l) = x l - softplus(l) + log C(l),   C(l) = l / tanh(l / 2),

the Bernoulli term plus the log normalizer, written in the logit (C equals
2 atanh(1 - 2 lambda) / (1 - 2 lambda), lambda = sigmoid(l)). C is even in l
and 0 / 0 at l = 0, where the kernels take its Taylor series in l^2 (and for
the gradient, 1/l - 1/sinh(l), which cancels there); at large |l|,
log C = log|l| - log(1 - e^-|l|) + log1p(e^-|l|), exact as |l| grows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate, _value_checks, reference
from ._double_backward import _acc, _like
from ._likelihood_layout import broadcast_x, fold_samples, folded, kernel_views, unfold_rows
from ._op import define, run, shaped


def _forward(x: Tensor, logits: Tensor) -> Tensor:
    """sum_D(x l - softplus(l) + log C(l)), shape (K, P), for x (P, D) and
    logits (K, P, D), both contiguous."""
    backend = _backend.backend_for(logits.device)
    dtype = _backend.compute_dtype(x, logits)
    x, logits = _backend.kernel_input(backend, x, dtype), _backend.kernel_input(backend, logits, dtype, True)
    if fold_samples(backend, logits):  # few x rows against many samples: every thread gets work
        K, P, _ = logits.shape
        x, folded_logits, _ = folded(x, logits)
        out = _backend.empty_output((1, K * P), like=logits, dtype=dtype)
        _backend.launch(backend, "continuous_bernoulli_log_prob_forward", logits.numel(), x=x,
                        logits=folded_logits, out=out)
        return out.view(K, P)
    out = _backend.empty_output(logits.shape[:2], like=logits, dtype=dtype)
    _backend.launch(backend, "continuous_bernoulli_log_prob_forward", logits.numel(), x=x, logits=logits, out=out)
    return out


def _backward(grad_out: Tensor, x: Tensor, logits: Tensor, need_dx: bool) -> list[Tensor]:
    """[dlogits (K, P, D)], and dx (P, D) when need_dx, each in its input's dtype."""
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
        backend, "continuous_bernoulli_log_prob_backward", dlogits.numel(),
        grad_out=shaped(grad_out, l3.shape[:2]).contiguous(), x=x2, logits=l3, dx=dx, dlogits=dlogits,
    )
    dlogits = _backend.in_dtype(dlogits.view(K, P, D) if fold else dlogits, logits_dtype)
    if not need_dx:
        return [dlogits]
    return [dlogits, _backend.in_dtype(unfold_rows(dx, K, P) if fold else dx, x_dtype)]


continuous_bernoulli_log_prob_op = define(
    "continuous_bernoulli_log_prob(Tensor x, Tensor logits) -> Tensor",
    _forward,
    lambda x, logits: logits.new_empty(logits.shape[:2], dtype=_backend.compute_dtype(x, logits)),
)
continuous_bernoulli_log_prob_backward_op = define(
    "continuous_bernoulli_log_prob_backward(Tensor grad_out, Tensor x, Tensor logits, bool need_dx) -> Tensor[]",
    _backward,
    lambda grad_out, x, logits, need_dx: [torch.empty_like(logits)] + ([torch.empty_like(x)] if need_dx else []),
)


def _double_backward(grad_out, x, logits, needs):
    """dx, dlogits as differentiable torch code (create_graph=True): the
    reference's d log C / dl (a Taylor branch near 0) carries the second derivative."""
    g, xx, lg = _acc(grad_out).unsqueeze(-1), _acc(x), _acc(logits)
    dl = g * (xx - torch.sigmoid(lg) + reference._cb_log_norm_grad(lg))
    return (_like((g * lg).sum_to_size(x.shape), x, needs[0]), _like(dl.sum_to_size(logits.shape), logits, needs[1]))


class ContinuousBernoulliLogProb(torch.autograd.Function):
    """Autograd of fastvae::continuous_bernoulli_log_prob; saves x (P, D) and
    the logits in the kernel layout (and the inputs, for a double backward)."""

    @staticmethod
    def forward(ctx, x, logits):
        x2, l3 = kernel_views(x, logits)
        ctx.save_for_backward(x2, l3, x, logits)
        ctx.shapes = x.shape, logits.shape
        return shaped(run(continuous_bernoulli_log_prob_op, x2, l3), logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, l3, x, logits = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return _double_backward(grad_out, x, logits, ctx.needs_input_grad)
        need_dx = ctx.needs_input_grad[0]
        grads = run(continuous_bernoulli_log_prob_backward_op, grad_out, x2, l3, need_dx)
        x_shape, logits_shape = ctx.shapes
        return (shaped(grads[1], x_shape) if need_dx else None), shaped(grads[0], logits_shape)


# -- public function -----------------------------------------------------------


def continuous_bernoulli_log_prob(x: Tensor, logits: Tensor, *, event_dims: int = 1) -> Tensor:
    """log ContinuousBernoulli(x; logits) summed over the last dimension D:
    the normalized density of Loaiza-Ganem and Cunningham (2019), for data
    in [0, 1] such as grey-scale pixels.

    Args:
        x: data of shape (..., D) in [0, 1]; it broadcasts against ``logits``
            of shape (K, ..., D) without being copied K times (fastvae warns
            when x leaves [0, 1]).
        logits: decoder logits, shape (K, ..., D) or (..., D), finite.
        event_dims: how many trailing dimensions form one event, summed over:
            3 for (..., C, H, W) images.

    Returns:
        sum(x l - softplus(l) + log C(l)) over D with C(l) = l / tanh(l / 2)
        (= 2 atanh(1 - 2 sigmoid(l)) / (1 - 2 sigmoid(l))): log C is 2 at
        l = 0, taken from its Taylor series near 0 and from
        log|l| - log(1 - e^-|l|) + log1p(e^-|l|) beyond, exact at large |l|
        (torch.distributions.ContinuousBernoulli's normalizer, computed from
        the probability, drifts there). Equal to
        ``ContinuousBernoulli(logits=logits).log_prob(x).sum(-1)`` where that
        is accurate. Differentiable in logits, and in x when x requires grad.

    Dtypes may differ as in :func:`fastvae.bernoulli_log_prob`; half-precision
    inputs give a float32 result.
    """
    _validate.float_tensors(x=x, logits=logits)
    _validate.event_dim("logits", logits)
    if type(event_dims) is not int or event_dims < 1:
        event_dims = _validate.positive_int("event_dims", event_dims)
    _value_checks.bernoulli_data(x)
    _value_checks.bernoulli_logits(logits)
    return continuous_bernoulli_log_prob_unchecked(x, logits, event_dims)


def continuous_bernoulli_log_prob_unchecked(x: Tensor, logits: Tensor, event_dims: int = 1) -> Tensor:
    """continuous_bernoulli_log_prob after the metadata checks, without the value checks."""
    if event_dims != 1:
        x, logits = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(logits, "logits", event_dims)
    x = broadcast_x(x, logits, "logits")
    return ContinuousBernoulliLogProb.apply(x, logits)


def decoder_log_prob(x: Tensor, logits: Tensor, from_distribution: bool) -> Tensor:
    """likelihood="continuous_bernoulli" in the objectives and evaluation: x
    (*batch, D) against decode(z)'s logits (*sample_shape, *batch, D), shapes
    checked and events flattened by fastvae._decoder."""
    _validate.float_tensors(x=x, logits=logits)
    _value_checks.bernoulli_data(x, "x (likelihood='continuous_bernoulli')")
    if not from_distribution:
        _value_checks.bernoulli_logits(logits, "decode(z) (likelihood='continuous_bernoulli')")
    return continuous_bernoulli_log_prob_unchecked(x, logits)
