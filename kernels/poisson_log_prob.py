"""Triton kernels of poisson_log_prob:
    out[k, p] = sum_d(x l - e^l - lgamma(x + 1)),  l = log_rate[k, p, d],
and the backward dlog_rate = g (x - e^l) (counts get no gradient). The
kernels are the count likelihoods' shared ones with KIND = 0
(kernels/_count_likelihood.py): x (P, D) broadcast over K by indexing."""
from ._count_likelihood import POISSON, count_backward, count_forward


def poisson_log_prob_forward(x, log_rate, out) -> None:
    """out (K, P) <- log Poisson for x (P, D), log_rate (K, P, D)."""
    count_forward(POISSON, x, log_rate, None, None, out)


def poisson_log_prob_backward(grad_out, x, log_rate, dlog_rate) -> None:
    """dlog_rate (K, P, D) <- grad_out (K, P) (x - e^log_rate)."""
    count_backward(POISSON, grad_out, x, log_rate, None, None, dlog_rate, None, None)
