"""bernoulli_log_prob: the Bernoulli reconstruction term with logits, fused
forward and backward, with x broadcast over decoder samples (the ops and
their Function are shared with continuous_bernoulli_log_prob:
fastvae/_bernoulli_likelihood.py)."""
from __future__ import annotations

from torch import Tensor

from . import _bernoulli_likelihood as B
from . import _double_backward, _validate, _value_checks
from ._likelihood_layout import broadcast_x, likelihood_torch_ops

_OPS = B.define_ops("bernoulli_log_prob", cpu=True)
bernoulli_log_prob_op, bernoulli_log_prob_backward_op = _OPS
BernoulliLogProb = B.autograd_function("BernoulliLogProb", __name__, _OPS, _double_backward.bernoulli_log_prob)


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
