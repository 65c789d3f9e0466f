"""Triton kernels of bernoulli_log_prob:
    out[k, p] = sum_d(x[p, d] * l - softplus(l)),  l = logits[k, p, d],
and the fused backward dlogits = g (x - sigmoid(l)), dx = sum_k g l.

The kernels are shared with continuous_bernoulli_log_prob, with KIND =
BERNOULLI (kernels/_bernoulli_likelihood.py: the layout, the tiles and the
split of dx's sum over samples); these are its launchers.
"""
from ._bernoulli_likelihood import BERNOULLI, bernoulli_backward, bernoulli_forward


def bernoulli_log_prob_forward(x, logits, out) -> None:
    """out (K, P) <- sum_d(x l - softplus(l)) for x (P, D), logits (K, P, D)."""
    bernoulli_forward(BERNOULLI, x, logits, out)


def bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """dlogits (K, P, D) and, when dx is not None, dx (P, D) <- gradients given grad_out (K, P)."""
    bernoulli_backward(BERNOULLI, grad_out, x, logits, dx, dlogits)
