"""zinb_log_prob: the zero-inflated negative binomial likelihood of counts as
in scvi-tools (log mean, log inverse dispersion theta, zero-inflation logits),
fused forward and backward, with x broadcast over decoder samples and theta
per element or per gene (shared machinery: fastvae/_count_likelihood.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate
from . import _count_likelihood as C
from ._likelihood_layout import broadcast_x
from ._op import define, run, shaped

OP = "zinb_log_prob"

zinb_log_prob_op = define(
    "zinb_log_prob(Tensor x, Tensor log_mean, Tensor log_theta, Tensor zi_logits) -> Tensor",
    lambda x, log_mean, log_theta, zi_logits: C.forward(OP, x, log_mean, log_theta, zi_logits),
    C.fake_forward,
)
zinb_log_prob_backward_op = define(
    "zinb_log_prob_backward(Tensor grad_out, Tensor x, Tensor log_mean, Tensor log_theta, Tensor zi_logits, "
    "bool need_log_mean, bool need_log_theta, bool need_zi_logits) -> Tensor[]",
    lambda grad_out, x, log_mean, log_theta, zi_logits, need_lm, need_lt, need_zl: C.backward(
        OP, grad_out, x, log_mean, log_theta, zi_logits, (need_lm, need_lt, need_zl)),
    C.fake_backward(OP),
)


class ZinbLogProb(torch.autograd.Function):
    """Autograd of fastvae::zinb_log_prob in the kernels' layout (log_theta
    (K, P, D) or (D,), zi_logits (K, P, D)); counts get no gradient."""

    @staticmethod
    def forward(ctx, x, log_mean, log_theta, zi_logits):
        x2, lm3, lt, zl3 = C.kernel_layout(x, log_mean, log_theta, zi_logits)
        ctx.save_for_backward(x2, lm3, lt, zl3, x, log_mean, log_theta, zi_logits)
        return shaped(run(zinb_log_prob_op, x2, lm3, lt, zl3), log_mean.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, lm3, lt, zl3, x, log_mean, log_theta, zi_logits = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        params = (log_mean, log_theta, zi_logits)
        if not any(needs):
            return None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            return (None, *C.double_backward(OP, grad_out, x, params, needs))
        grads = iter(run(zinb_log_prob_backward_op, grad_out, x2, lm3, lt, zl3, *needs))
        return (None, *(shaped(next(grads), t.shape) if n else None for t, n in zip(params, needs)))


def zinb_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor, zi_logits: Tensor, *,
                  event_dims: int = 1) -> Tensor:
    """log ZINB(x; mu, theta, pi = sigmoid(zi_logits)) summed over the last dimension D.

    scvi-tools' ``log_zinb_positive``: a zero with probability pi, else a
    NB(mu, theta) count (negative_binomial_log_prob's parameterization).

    Args:
        x: counts (..., D), integer or floating-point, >= 0 (a negative or NaN
            count raises); broadcast against ``log_mean`` (K, ..., D) without K
            copies. Counts get no gradient.
        log_mean: log mu, shape (K, ..., D) or (..., D).
        log_theta: log theta: per element, (D,) per gene, a scalar, or anything
            that broadcasts against log_mean.
        zi_logits: zero-inflation logits (pi = sigmoid(zi_logits)), broadcast
            against log_mean.
        event_dims: trailing dimensions that form one event, summed over.

    Returns:
        The sum over D of logsumexp(log pi, log(1 - pi) + log NB(0)) where x = 0
        and log(1 - pi) + log NB(x) elsewhere, with ``log_mean``'s leading
        shape; float32 for half-precision inputs, float64 when any is;
        differentiable in log_mean, log_theta and zi_logits (twice too,
        through the reference formula).
    """
    C.check_inputs(x, log_mean=log_mean, log_theta=log_theta, zi_logits=zi_logits)
    if type(event_dims) is not int or event_dims < 1:
        event_dims = _validate.positive_int("event_dims", event_dims)
    C.check_counts(x, likelihood="zinb")
    return zinb_log_prob_unchecked(x, log_mean, log_theta, zi_logits, event_dims)


def zinb_log_prob_unchecked(x: Tensor, log_mean: Tensor, log_theta: Tensor, zi_logits: Tensor,
                            event_dims: int = 1) -> Tensor:
    """zinb_log_prob after its checks (the caller ran them)."""
    if event_dims != 1:
        log_theta = C.flatten_param(log_theta, log_mean, event_dims)
        zi_logits = C.flatten_param(zi_logits, log_mean, event_dims)
        x, log_mean = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(
            log_mean, "log_mean", event_dims)
    x = broadcast_x(C.counts_as(x, _backend.compute_dtype(log_mean, log_theta, zi_logits)), log_mean, "log_mean")
    log_theta = C.broadcast_param(log_theta, "log_theta", log_mean, "log_mean", per_gene=True)
    zi_logits = C.broadcast_param(zi_logits, "zi_logits", log_mean, "log_mean", per_gene=False)
    return ZinbLogProb.apply(x, log_mean, log_theta, zi_logits)
