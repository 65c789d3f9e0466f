"""negative_binomial_log_prob: the negative binomial likelihood of counts in
scvi-tools' parameterization (log mean, log inverse dispersion theta), fused
forward and backward, with x broadcast over decoder samples and theta per
element or per gene (shared machinery: fastvae/_count_likelihood.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate
from . import _count_likelihood as C
from ._likelihood_layout import broadcast_x
from ._op import define, run, shaped

OP = "negative_binomial_log_prob"

negative_binomial_log_prob_op = define(
    "negative_binomial_log_prob(Tensor x, Tensor log_mean, Tensor log_theta) -> Tensor",
    lambda x, log_mean, log_theta: C.forward(OP, x, log_mean, log_theta, None),
    C.fake_forward,
)
negative_binomial_log_prob_backward_op = define(
    "negative_binomial_log_prob_backward(Tensor grad_out, Tensor x, Tensor log_mean, Tensor log_theta, "
    "bool need_log_mean, bool need_log_theta) -> Tensor[]",
    lambda grad_out, x, log_mean, log_theta, need_lm, need_lt: C.backward(
        OP, grad_out, x, log_mean, log_theta, None, (need_lm, need_lt)),
    C.fake_backward(OP),
)


class NegativeBinomialLogProb(torch.autograd.Function):
    """Autograd of fastvae::negative_binomial_log_prob in the kernels' layout
    (log_theta (K, P, D) or (D,)); counts get no gradient."""

    @staticmethod
    def forward(ctx, x, log_mean, log_theta):
        x2, lm3, lt, _ = C.kernel_layout(x, log_mean, log_theta, None)
        ctx.save_for_backward(x2, lm3, lt, x, log_mean, log_theta)
        return shaped(run(negative_binomial_log_prob_op, x2, lm3, lt), log_mean.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, lm3, lt, x, log_mean, log_theta = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        if not any(needs):
            return None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            return (None, *C.double_backward(OP, grad_out, x, (log_mean, log_theta), needs))
        grads = iter(run(negative_binomial_log_prob_backward_op, grad_out, x2, lm3, lt, *needs))
        return (None, *(shaped(next(grads), t.shape) if n else None for t, n in zip((log_mean, log_theta), needs)))


def negative_binomial_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor, *, event_dims: int = 1) -> Tensor:
    """log NB(x; mean mu, inverse dispersion theta) summed over the last dimension D.

    The parameterization of scvi-tools' ``log_nb_positive`` (mean mu, variance
    mu + mu^2 / theta), and of ``torch.distributions.NegativeBinomial(
    total_count=theta, logits=log_mean - log_theta)``.

    Args:
        x: counts (..., D), integer or floating-point, >= 0 (a negative or NaN
            count raises); broadcast against ``log_mean`` (K, ..., D) without K
            copies. Counts get no gradient.
        log_mean: log mu, shape (K, ..., D) or (..., D).
        log_theta: log theta, of log_mean's shape (per element), (D,) per
            gene (scVI's common case: computed once per x row, its gradient
            summed over every row), a scalar, or anything that broadcasts.
        event_dims: trailing dimensions that form one event, summed over.

    Returns:
        log NB summed over D with ``log_mean``'s leading shape:
        -x softplus(-a) - theta softplus(a) + lgamma(x + theta) - lgamma(theta)
        - lgamma(x + 1), a = log mu - log theta, evaluated in forms without
        cancellation for large counts and as theta -> inf, where it tends to the
        Poisson log-likelihood (csrc/count_likelihood.h): exact to float64
        rounding in float64; in float32, counts near 1e5 are off by about 0.1
        nat and the log theta gradient at theta >= 1e6 is mostly rounding, as
        with any float32 evaluation of these terms (docs/likelihoods.md); x = 0
        gives theta log(theta / (theta + mu)) exactly. float32 for half-precision
        inputs, float64 when any is; differentiable in log_mean and log_theta
        (twice too, through the reference formula).
    """
    C.check_inputs(x, log_mean=log_mean, log_theta=log_theta)
    if type(event_dims) is not int or event_dims < 1:
        event_dims = _validate.positive_int("event_dims", event_dims)
    C.check_counts(x, likelihood="negative_binomial")
    return negative_binomial_log_prob_unchecked(x, log_mean, log_theta, event_dims)


def negative_binomial_log_prob_unchecked(x: Tensor, log_mean: Tensor, log_theta: Tensor,
                                         event_dims: int = 1) -> Tensor:
    """negative_binomial_log_prob after its checks (the caller ran them)."""
    if event_dims != 1:
        log_theta = C.flatten_param(log_theta, log_mean, event_dims)
        x, log_mean = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(
            log_mean, "log_mean", event_dims)
    x = broadcast_x(C.counts_as(x, _backend.compute_dtype(log_mean, log_theta)), log_mean, "log_mean")
    log_theta = C.broadcast_param(log_theta, "log_theta", log_mean, "log_mean", per_gene=True)
    return NegativeBinomialLogProb.apply(x, log_mean, log_theta)
