"""Triton kernels of continuous_bernoulli_log_prob:
    out[k, p] = sum_d(x[p, d] l - softplus(l) + log C(l)),  l = logits[k, p, d],
C(l) = l / tanh(l / 2) the continuous Bernoulli's normalizer, and the fused
backward dlogits = g (x - sigmoid(l) + 1/l - 1/sinh(l)), dx = sum_k g l.

The kernels are bernoulli_log_prob's with KIND = CONTINUOUS
(kernels/_bernoulli_likelihood.py: the layout, the tiles, the split of dx's
sum over samples, and log C's Taylor and closed-form branches); these are
its launchers.
"""
from ._bernoulli_likelihood import CONTINUOUS, bernoulli_backward, bernoulli_forward


def continuous_bernoulli_log_prob_forward(x, logits, out) -> None:
    """out (K, P) <- sum_d(x l - softplus(l) + log C(l)) for x (P, D), logits (K, P, D)."""
    bernoulli_forward(CONTINUOUS, x, logits, out)


def continuous_bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """dlogits (K, P, D) and, when dx is not None, dx (P, D) <- gradients given grad_out (K, P)."""
    bernoulli_backward(CONTINUOUS, grad_out, x, logits, dx, dlogits)
