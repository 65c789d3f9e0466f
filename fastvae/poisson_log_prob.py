"""poisson_log_prob: the Poisson likelihood of counts with a log rate, fused
forward and backward, with x broadcast over decoder samples
(shared machinery: fastvae/_count_likelihood.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate
from . import _count_likelihood as C
from ._likelihood_layout import broadcast_x
from ._op import define, run, shaped

OP = "poisson_log_prob"

poisson_log_prob_op = define(
    "poisson_log_prob(Tensor x, Tensor log_rate) -> Tensor",
    lambda x, log_rate: C.forward(OP, x, log_rate, None, None),
    C.fake_forward,
)
poisson_log_prob_backward_op = define(
    "poisson_log_prob_backward(Tensor grad_out, Tensor x, Tensor log_rate, bool need_log_rate) -> Tensor[]",
    lambda grad_out, x, log_rate, need: C.backward(OP, grad_out, x, log_rate, None, None, (need,)),
    C.fake_backward(OP),
)


class PoissonLogProb(torch.autograd.Function):
    """Autograd of fastvae::poisson_log_prob in the kernels' layout (made once
    here and saved); counts get no gradient."""

    @staticmethod
    def forward(ctx, x, log_rate):
        x2, lr3, _, _ = C.kernel_layout(x, log_rate, None, None)
        ctx.save_for_backward(x2, lr3, x, log_rate)
        return shaped(run(poisson_log_prob_op, x2, lr3), log_rate.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, lr3, x, log_rate = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        if torch.is_grad_enabled():  # create_graph=True: the closed form g (x - e^l), differentiable
            acc = _backend.compute_dtype(x, log_rate)
            lr = log_rate.to(acc)
            d = grad_out.to(acc).unsqueeze(-1) * (x.detach().to(acc) - torch.exp(lr))
            return None, d.sum_to_size(log_rate.shape).to(log_rate.dtype)
        (d,) = run(poisson_log_prob_backward_op, grad_out, x2, lr3, True)
        return None, shaped(d, log_rate.shape)


def poisson_log_prob(x: Tensor, log_rate: Tensor, *, event_dims: int = 1) -> Tensor:
    """log Poisson(x; exp(log_rate)) summed over the last dimension D.

    Args:
        x: counts of shape (..., D), integer or floating-point, >= 0 (a
            negative or NaN count raises); broadcast against ``log_rate``
            (K, ..., D) without K copies. Counts get no gradient.
        log_rate: the decoder's log rate, shape (K, ..., D) or (..., D).
        event_dims: trailing dimensions that form one event, summed over.

    Returns:
        sum(x log_rate - exp(log_rate) - lgamma(x + 1)) over D, with
        ``log_rate``'s leading shape (x = 0 with log_rate = -inf gives 0, not
        NaN); equals torch.distributions.Poisson(log_rate.exp()).log_prob(x)
        summed. float32 for half-precision inputs, float64 when any is;
        differentiable in log_rate (twice as well).
    """
    C.check_inputs(x, log_rate=log_rate)
    if type(event_dims) is not int or event_dims < 1:
        event_dims = _validate.positive_int("event_dims", event_dims)
    C.check_counts(x, likelihood="poisson")
    return poisson_log_prob_unchecked(x, log_rate, event_dims)


def poisson_log_prob_unchecked(x: Tensor, log_rate: Tensor, event_dims: int = 1) -> Tensor:
    """poisson_log_prob after its checks (the caller ran them)."""
    if event_dims != 1:
        x, log_rate = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(
            log_rate, "log_rate", event_dims)
    x = broadcast_x(C.counts_as(x, _backend.compute_dtype(log_rate)), log_rate, "log_rate")
    return PoissonLogProb.apply(x, log_rate)
