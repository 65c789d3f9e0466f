"""Shared by the count-likelihood tests: scvi-tools' NB and ZINB formulas
reimplemented in float64 (the peers the issue names), torch.distributions
peers, random count problems, the condition-aware tolerance scales and the
comparison of an op against the float64 reference.

scvi-tools (scvi/distributions/_negative_binomial.py) adds eps = 1e-8 inside
its logs and uses F.softplus, which is linear above 20 (an error of e^-20 there);
here eps is a parameter (0 in the comparisons: it only guards log(0)) and
softplus is exact, so the formulas are theirs without those two
approximations."""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

import fastvae
from fastvae import reference

from helpers import assert_close, gen

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


def count_scales(x, log_mean, log_theta=None, zi_logits=None):
    """value_scale and grad_scale with log_theta broadcast to log_mean, plus the
    zero-inflation softplus for ZINB."""
    lt = None if log_theta is None else log_theta.detach().double().expand_as(log_mean)
    vs, gs = value_scale(x, log_mean, lt), grad_scale(x, log_mean, lt)
    if zi_logits is None:
        return vs, gs
    return vs + softplus(zi_logits.detach().double().abs()), gs + 1


LT_RANGES = [(-3.0, 3.0), (-8.0, 1.0), (2.0, 12.0), (10.0, 30.0)]
LM_RANGES = [(-3.0, 3.0), (-10.0, 6.0)]
# Per op: the element cap of a problem, the fields drawn after "counts" (in
# draw order, so each op's Hypothesis examples stay the ones it always drew)
# and the names of its parameters' gradients.
OPS = {
    "poisson_log_prob": (8000, dict(lm_range=[(-3.0, 3.0), (-20.0, 5.0)]), ("dlog_rate",)),
    "negative_binomial_log_prob": (6000, dict(theta=["element", "gene", "scalar"], lt_range=LT_RANGES,
                                              lm_range=LM_RANGES), ("dlog_mean", "dlog_theta")),
    "zinb_log_prob": (6000, dict(theta=["element", "gene"], lt_range=LT_RANGES, lm_range=LM_RANGES,
                                 zi_bound=[3.0, 30.0]), ("dlog_mean", "dlog_theta", "dzi_logits")),
}


@st.composite
def problems(draw, op):
    """x (*batch, D) against parameters (K, *batch, D) (no K: x's shape), at
    most OPS[op]'s element cap, with that op's parameter ranges."""
    cap, fields, _ = OPS[op]
    D = draw(st.sampled_from([1, 2, 3, 31, 33, 100, 257, 1025]))
    batch = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    K = draw(st.sampled_from([None, 1, 2, 5]))
    while math.prod(batch) * (K or 1) * D > cap and batch:
        batch = batch[1:]
    return dict(D=D, batch=batch, K=K, counts=draw(st.sampled_from(["zeros", "sparse", "moderate", "large"])),
                **{k: draw(st.sampled_from(v)) for k, v in fields.items()}, seed=draw(st.integers(0, 2**31 - 1)))


def make(p, dtype, device):
    """(x, log_mean, [log_theta, [zi_logits,]] generator): log_theta where p has
    lt_range (per element, per gene or scalar by p["theta"]), zi_logits where it
    has zi_bound; the parameters require grad."""
    g = torch.Generator().manual_seed(p["seed"])
    D, batch, K = p["D"], p["batch"], p["K"]
    out_shape = (*(() if K is None else (K,)), *batch, D)
    x = random_counts((*batch, D), g, p["counts"])
    lo, hi = p["lm_range"]
    params = [lo + (hi - lo) * torch.rand(out_shape, generator=g, dtype=F64)]
    if p["counts"] == "large":  # a mean near the counts, as a trained decoder gives
        params[0] = torch.log(x + 1.0) + torch.randn(out_shape, generator=g, dtype=F64) * 0.5
    if "lt_range" in p:
        lo, hi = p["lt_range"]
        lt_shape = {"element": out_shape, "gene": (D,), "scalar": ()}[p["theta"]]
        params.append(lo + (hi - lo) * torch.rand(lt_shape, generator=g, dtype=F64))
    if "zi_bound" in p:
        params.append((torch.rand(out_shape, generator=g, dtype=F64) * 2 - 1) * p["zi_bound"])
    return (x.to(dtype).to(device), *(t.to(dtype).to(device).requires_grad_() for t in params), g)


def check_against_reference(op, p, dtype, device):
    """fastvae.<op>'s value and parameter gradients against reference.<op> in
    float64, within count_scales; returns (out, grads)."""
    x, *params, g = make(p, dtype, device)
    out = getattr(fastvae, op)(x, *params)
    up = torch.randn(out.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad(out, params, up.to(dtype).to(device))
    x64 = x.double().cpu()
    p64 = [t.detach().double().cpu().requires_grad_() for t in params]
    ref = getattr(reference, op)(x64, *p64)
    ref_grads = torch.autograd.grad(ref, p64, up)
    assert out.shape == ref.shape and out.dtype == (F64 if dtype == F64 else torch.float32)
    vs, gs = count_scales(x64, *p64)
    assert_close(out, ref.detach(), vs.sum(-1), "log_prob")
    gs = up.abs()[..., None] * gs
    for name, got, want, t in zip(OPS[op][2], grads, ref_grads, p64):
        assert_close(got, want, gs.sum_to_size(t.shape), name)
    return out, grads


def check_repeatable(op, p, device):
    """check_against_reference twice in float32: the same bits (the per-gene
    reduction's arrival counters are back at 0)."""
    out, grads = check_against_reference(op, p, torch.float32, device)
    again, grads_again = check_against_reference(op, p, torch.float32, device)
    assert torch.equal(out, again)
    for a, b in zip(grads, grads_again):
        assert torch.equal(a, b)


def check_objectives(device, likelihood, decode, ref_log_lik, torch_decode=None):
    """fastvae.iwae / elbo / log_likelihood with likelihood=``likelihood`` (decode
    returning plain tensors), against a float64 hand computation with the same
    noise (ref_log_lik(x, z) -> (k, B) log p(x | z)), gradients included; and, with
    torch_decode (a torch.distributions decoder), the same numbers from the
    mapped distribution without likelihood=."""
    from test_objectives import same_noise

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
