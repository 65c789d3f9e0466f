"""Triton kernels of zinb_log_prob (scvi-tools' log_zinb_positive: log mean,
log theta per element or per gene, zero-inflation logits): the count
likelihoods' shared kernels with KIND = 2 (kernels/_count_likelihood.py)."""
from ._count_likelihood import ZINB, count_backward, count_forward


def zinb_log_prob_forward(x, log_mean, log_theta, zi_logits, out) -> None:
    """out (K, P) <- log ZINB for x (P, D) and (K, P, D) parameters (log_theta may be (D,))."""
    count_forward(ZINB, x, log_mean, log_theta, zi_logits, out)


def zinb_log_prob_backward(grad_out, x, log_mean, log_theta, zi_logits, dlog_mean, dlog_theta, dzi_logits) -> None:
    """dlog_mean, dlog_theta (log_theta's shape), dzi_logits, each when not None."""
    count_backward(ZINB, grad_out, x, log_mean, log_theta, zi_logits, dlog_mean, dlog_theta, dzi_logits)
