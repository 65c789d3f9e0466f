"""Triton kernels of negative_binomial_log_prob (scvi-tools' log_nb_positive
in log mean / log theta, with log theta per element (K, P, D) or per gene
(D,)): the count likelihoods' shared kernels with KIND = 1
(kernels/_count_likelihood.py, whose docstring gives the stable forms)."""
from ._count_likelihood import NB, count_backward, count_forward


def negative_binomial_log_prob_forward(x, log_mean, log_theta, out) -> None:
    """out (K, P) <- log NB for x (P, D), log_mean (K, P, D), log_theta (K, P, D) or (D,)."""
    count_forward(NB, x, log_mean, log_theta, None, out)


def negative_binomial_log_prob_backward(grad_out, x, log_mean, log_theta, dlog_mean, dlog_theta) -> None:
    """dlog_mean (K, P, D) and dlog_theta (log_theta's shape; a per-gene one
    summed over rows), each when not None, given grad_out (K, P)."""
    count_backward(NB, grad_out, x, log_mean, log_theta, None, dlog_mean, dlog_theta, None)
