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


def check_objectives(device, likelihood, decode, ref_log_lik, torch_decode=None):
    """fastvae.iwae / elbo / log_likelihood with likelihood=``likelihood`` (decode
    returning plain tensors), against a float64 hand computation with the same
    noise (ref_log_lik(x, z) -> (k, B) log p(x | z)), gradients included; and, with
    torch_decode (a torch.distributions decoder), the same numbers from the
    mapped distribution without likelihood=."""
    from test_objectives import same_noise

    import fastvae

    from helpers import assert_close, gen

    g = torch.Generator().manual_seed(0)
    B, L, k = 3, 2, 4
    mu = torch.randn(B, L, generator=g, dtype=F64).to(device).requires_grad_()
    logvar = (0.3 * torch.randn(B, L, generator=g, dtype=F64)).to(device).requires_grad_()
    x = random_counts((B, 6), g, "sparse").to(device)
    bound = fastvae.iwae(x, mu, logvar, decode, k=k, likelihood=likelihood, generator=gen(1), reduction="none")
    eps = same_noise(1, k, (B, L), device)
    z = mu + torch.exp(logvar / 2) * eps
    normal = torch.distributions.Normal
    lw = (ref_log_lik(x, z) + normal(0.0, 1.0).log_prob(z).sum(-1)
          - normal(mu, torch.exp(logvar / 2)).log_prob(z).sum(-1))
    want = torch.logsumexp(lw, 0) - math.log(k)
    assert_close(bound, want, 1 + lw.abs().amax(0), f"iwae, likelihood={likelihood!r}")
    got = torch.autograd.grad(bound.sum(), [mu, logvar])
    ref = torch.autograd.grad(want.sum(), [mu, logvar])
    for a, b in zip(got, ref):
        assert_close(a, b, 1 + lw.abs().amax(0)[:, None], "encoder gradient")
    elbo = fastvae.elbo(x, mu, logvar, decode, likelihood=likelihood, n_samples=3, generator=gen(2))
    assert torch.isfinite(elbo)
    encode = lambda t: (mu.detach(), logvar.detach())  # noqa: E731
    ll = fastvae.log_likelihood(x, encode, decode, k=8, likelihood=likelihood, generator=gen(3))
    assert ll.shape == (B,) and torch.isfinite(ll).all()
    if torch_decode is not None:
        mapped = fastvae.iwae(x, mu, logvar, torch_decode, k=k, generator=gen(1), reduction="none")
        assert_close(mapped, bound, 1 + lw.abs().amax(0), f"iwae, torch distribution for {likelihood!r}")
        ll_mapped = fastvae.log_likelihood(x, encode, torch_decode, k=8, generator=gen(3))
        assert_close(ll_mapped, ll, 1 + ll.abs(), "log_likelihood, torch distribution")
