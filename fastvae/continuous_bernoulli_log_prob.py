"""continuous_bernoulli_log_prob: the continuous Bernoulli likelihood
(Loaiza-Ganem and Cunningham 2019) with logits, fused forward and backward,
with x in [0, 1] broadcast over decoder samples:

    log p(x | l) = x l - softplus(l) + log C(l),   C(l) = l / tanh(l / 2),

the Bernoulli term plus the log normalizer, written in the logit (C equals
2 atanh(1 - 2 lambda) / (1 - 2 lambda), lambda = sigmoid(l)). C is even in l
and 0 / 0 at l = 0, where the kernels take its Taylor series in l^2 (and for
the gradient, 1/l - 1/sinh(l), which cancels there); at large |l|,
log C = log|l| - log(1 - e^-|l|) + log1p(e^-|l|), exact as |l| grows.
The ops and their Function are bernoulli_log_prob's
(fastvae/_bernoulli_likelihood.py).
"""
from __future__ import annotations

from torch import Tensor

from . import _bernoulli_likelihood as B
from . import _double_backward, _validate, _value_checks
from ._likelihood_layout import broadcast_x

_OPS = B.define_ops("continuous_bernoulli_log_prob")
continuous_bernoulli_log_prob_op, continuous_bernoulli_log_prob_backward_op = _OPS
ContinuousBernoulliLogProb = B.autograd_function("ContinuousBernoulliLogProb", __name__, _OPS,
                                                 _double_backward.continuous_bernoulli_log_prob)


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
    _value_checks.bernoulli_data(x, likelihood="continuous_bernoulli")
    _value_checks.bernoulli_logits(logits, likelihood="continuous_bernoulli")
    return continuous_bernoulli_log_prob_unchecked(x, logits, event_dims)


def continuous_bernoulli_log_prob_unchecked(x: Tensor, logits: Tensor, event_dims: int = 1) -> Tensor:
    """continuous_bernoulli_log_prob after the metadata checks, without the value checks."""
    if event_dims != 1:
        x, logits = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(logits, "logits", event_dims)
    x = broadcast_x(x, logits, "logits")
    return ContinuousBernoulliLogProb.apply(x, logits)


def decoder_log_prob(x: Tensor, logits: Tensor, probs_given: bool) -> Tensor:
    """likelihood="continuous_bernoulli" in the objectives and evaluation: x
    (*batch, D) against decode(z)'s logits (*sample_shape, *batch, D), shapes
    checked and events flattened by fastvae._decoder."""
    _validate.float_tensors(x=x, logits=logits)
    _value_checks.bernoulli_data(x, "x (likelihood='continuous_bernoulli')", "continuous_bernoulli")
    if not probs_given:  # logits derived from a distribution's probs= may lie in [0, 1]
        _value_checks.bernoulli_logits(logits, "decode(z) (likelihood='continuous_bernoulli')",
                                      "continuous_bernoulli")
    return continuous_bernoulli_log_prob_unchecked(x, logits)
