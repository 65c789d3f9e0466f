"""Shared by the count-likelihood tests: scvi-tools' NB and ZINB formulas
reimplemented in float64 (the peers the issue names), torch.distributions
peers, random count problems and the condition-aware tolerance scales.

scvi-tools (scvi/distributions/_negative_binomial.py) adds eps = 1e-8 inside
its logs and uses F.softplus, which is linear above 20 (an error of e^-20 there);
here eps is a parameter (0 in the comparisons: it only guards log(0)) and
softplus is exact, so the formulas are theirs without those two
approximations."""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def softplus(t):
    return torch.logaddexp(torch.zeros_like(t), t)


def log_nb_positive(x, mu, theta, eps=0.0):
    """scvi-tools' log_nb_positive, per element."""
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (theta * (torch.log(theta + eps) - log_theta_mu_eps) + x * (torch.log(mu + eps) - log_theta_mu_eps)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))


def log_zinb_positive(x, mu, theta, pi, eps=0.0):
    """scvi-tools' log_zinb_positive, per element (pi: the zero-inflation logits)."""
    softplus_pi = softplus(-pi)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (log_theta_eps - log_theta_mu_eps)
    case_zero = softplus(pi_theta_log) - softplus_pi
    mul_case_zero = (x < 1e-8).to(x.dtype) * case_zero
    case_non_zero = (-softplus_pi + pi_theta_log + x * (torch.log(mu + eps) - log_theta_mu_eps)
                     + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    mul_case_non_zero = (x > 1e-8).to(x.dtype) * case_non_zero
    return mul_case_zero + mul_case_non_zero


def torch_nb(x, log_mean, log_theta):
    """torch.distributions.NegativeBinomial(total_count=theta, logits=log mu - log theta), summed over D."""
    d = torch.distributions.NegativeBinomial(total_count=log_theta.exp(), logits=log_mean - log_theta,
                                             validate_args=False)
    return d.log_prob(x).sum(-1)


def torch_poisson(x, log_rate):
    return torch.distributions.Poisson(log_rate.exp(), validate_args=False).log_prob(x).sum(-1)


def random_counts(shape, g, kind: str) -> torch.Tensor:
    """float64 counts: "zeros" (all 0), "sparse" (mostly 0, scRNA-like), "moderate"
    (0..50), "large" (up to 1e5)."""
    u = torch.rand(shape, generator=g, dtype=F64)
    if kind == "zeros":
        return torch.zeros(shape, dtype=F64)
    if kind == "sparse":
        return torch.where(u < 0.7, 0.0, torch.floor(-3.0 * torch.log(torch.rand(shape, generator=g, dtype=F64))))
    if kind == "moderate":
        return torch.floor(u * 51)
    return torch.floor(torch.exp(u * math.log(1e5)))


def value_scale(x, log_mean, log_theta=None):
    """Bounds the size of the terms a kernel evaluates for one element's log p:
    x log mu, mu, lgamma(x + 1), and, where theta is not the large one, the
    lgamma-sized terms in theta (the shifted Stirling series evaluates terms of
    about 13 for any argument below 10, hence the constant)."""
    lm = log_mean.detach().double()
    s = 16.0 + x * (1.0 + lm.abs()) + lm.exp() + torch.lgamma(x + 1.0)
    if log_theta is not None:
        lt = log_theta.detach().double()
        theta = lt.exp()
        s = s + x * lt.abs() + torch.minimum(theta, x + 1.0) * (1.0 + lt.abs() + torch.log1p(x))
    return s


def grad_scale(x, log_mean, log_theta=None):
    """The same for d/dlog_mean and d/dlog_theta: x, mu, theta-sized terms."""
    lm = log_mean.detach().double()
    s = 1.0 + x + lm.exp()
    if log_theta is not None:
        lt = log_theta.detach().double()
        theta = lt.exp()
        s = s + torch.minimum(lm, lt).exp() + torch.minimum(theta, x + 1.0) * (2.0 + lt.abs() + torch.log1p(x))
    return s
