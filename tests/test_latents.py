"""The latent families beyond the Gaussian (fastvae/latents.py) in every
objective: elbo, iwae (iwae, STL, DReG, Renyi), their terms, log_likelihood,
against hand-written torch.distributions estimates built on the same noise
(the seed fastvae draws is reproduced from the same generator), in float64 on
every backend; the closed-form KLs against torch's kl_divergence; priors given
as torch objects; torch.compile; errors."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributions as td
from torch import Tensor

import fastvae
from fastvae import _philox, reference
from fastvae._families import LOCATION_SCALE_FAMILIES as FAMILIES
from fastvae.ops.sample_family import concrete_noise, standardized

from conftest import INTERPRET
from helpers import NEEDS_DREG_COMPILE, assert_compiled_matches_eager, gen, philox_seed_of

B, L, D = 5, 3, 4
TORCH_CLASS = {"uniform": td.Uniform, "laplace": td.Laplace, "gumbel": td.Gumbel, "cauchy": td.Cauchy}


def _data(device):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(B, D, generator=g) < 0.5).double().to(device)
    W = (torch.randn(L + 1, D, generator=g, dtype=torch.float64) * 0.5).to(device)
    loc = (torch.randn(B, L, generator=g, dtype=torch.float64) * 0.5).to(device).requires_grad_()
    scale = (torch.rand(B, L, generator=g, dtype=torch.float64) * 0.8 + 0.3).to(device).requires_grad_()
    return x, W, loc, scale


def _decode(W):
    return lambda z: z @ W[: z.shape[-1]]


def _noise(family, seed, K, device):
    """The standardized e of the training layout (float64 uniforms), (K, B, L)."""
    x = _philox.philox_word(seed, torch.arange(K * B * L))
    e, _, _ = standardized(FAMILIES.index(family), x, torch.float64)
    return e.reshape(K, B, L).to(device)


def _posterior(family, loc, scale, torch_object):
    """(what the user passes, the torch distribution of the hand-written version, z of e)."""
    if family == "logistic":  # torch has no Logistic: fastvae's record
        q = fastvae.LocationScale("logistic", loc, torch.log(scale))
        return q, q.torch_distribution(), lambda e: loc + scale * e
    if family == "uniform":
        d = td.Independent(td.Uniform(loc, loc + scale), 1)
    else:
        d = td.Independent(TORCH_CLASS[family](loc, scale), 1)
    user = d if torch_object else fastvae.LocationScale(family, loc, torch.log(scale))
    return user, d, lambda e: loc + scale * e


def _prior(family, kind, device):
    """(prior=, the torch prior of the hand-written version, analytic)."""
    zeros, ones = torch.zeros(L, dtype=torch.float64, device=device), torch.ones(L, dtype=torch.float64, device=device)
    if kind == "normal":
        return td.Normal(0.0, 1.0), td.Independent(td.Normal(zeros, ones), 1), False
    if family == "logistic":
        p = fastvae.LocationScale("logistic", zeros - 0.2, zeros + 0.1)
        return p, p.torch_distribution(), False
    if family == "uniform":
        d = td.Independent(td.Uniform(zeros - 3.0, ones * 4.0), 1)
    else:
        d = td.Independent(TORCH_CLASS[family](zeros - 0.2, ones * 1.3), 1)
    return d, d, True


@pytest.mark.parametrize("torch_object", [False, True], ids=["record", "torch"])
@pytest.mark.parametrize("kind", ["same", "normal"])
@pytest.mark.parametrize("family", FAMILIES)
def test_elbo_matches_handwritten(backend, family, kind, torch_object):
    _, device = backend
    x, W, loc, scale = _data(device)
    user_q, q, z_of = _posterior(family, loc, scale, torch_object)
    prior, p, analytic = _prior(family, kind, device)
    terms = fastvae.elbo_terms(x, user_q, _decode(W), likelihood="bernoulli", n_samples=2, prior=prior,
                               generator=gen(7), reduction="sum")
    assert terms.kl_analytic == analytic
    grads = torch.autograd.grad(terms.bound, (loc, scale), retain_graph=True)

    z = z_of(_noise(family, philox_seed_of(7), 2, device))
    rec = td.Independent(td.Bernoulli(logits=_decode(W)(z)), 1).log_prob(x).mean(0)
    kl = td.kl_divergence(q, p) if analytic else (q.log_prob(z) - p.log_prob(z)).mean(0)
    bound = (rec - kl).sum()
    expected = torch.autograd.grad(bound, (loc, scale))
    torch.testing.assert_close(terms.bound, bound, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl, kl.sum(), rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("estimator,alpha", [("iwae", 0.0), ("stl", 0.0), ("dreg", 0.0), ("dreg", 0.5),
                                             ("iwae", 0.5)])
@pytest.mark.parametrize("family", FAMILIES)
def test_iwae_matches_handwritten(backend, family, estimator, alpha):
    _, device = backend
    x, W, loc, scale = _data(device)
    user_q, q, z_of = _posterior(family, loc, scale, True)
    prior, p, _ = _prior(family, "same", device)
    bound = fastvae.iwae(x, user_q, _decode(W), k=4, likelihood="bernoulli", estimator=estimator, alpha=alpha,
                         prior=prior, generator=gen(3), reduction="sum")
    grads = torch.autograd.grad(bound, (loc, scale), retain_graph=True)

    z = z_of(_noise(family, philox_seed_of(3), 4, device))
    rec = td.Independent(td.Bernoulli(logits=_decode(W)(z)), 1).log_prob(x)
    lw = rec + p.log_prob(z) - q.log_prob(z)
    a = alpha
    value = (torch.logsumexp((1 - a) * lw, 0) - math.log(4)) / (1 - a)
    if estimator == "iwae":
        surrogate = value
    else:  # q's score stopped: log q of z with detached parameters
        _, q_stop, _ = _posterior(family, loc.detach(), scale.detach(), True)
        lw_stop = rec + p.log_prob(z) - q_stop.log_prob(z)
        v = torch.softmax((1 - a) * lw.detach(), 0)
        c = v if estimator == "stl" else v * (a + (1 - a) * v)
        surrogate = (c * lw_stop).sum(0)
    torch.testing.assert_close(bound, value.sum(), rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, torch.autograd.grad(surrogate.sum(), (loc, scale))):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def _normal_transform(name, mu, s, torch_object):
    cls = {"lognormal": (td.LogNormal, fastvae.LogNormal), "logisticnormal": (td.LogisticNormal,
                                                                              fastvae.LogisticNormal)}[name]
    d = cls[0](mu, s)
    d = td.Independent(d, 1) if name == "lognormal" else d
    return (d if torch_object else cls[1](mu, 2 * torch.log(s))), d


def _transform(name, y):
    return torch.exp(y) if name == "lognormal" else td.transforms.StickBreakingTransform()(y)


@pytest.mark.parametrize("torch_object", [False, True], ids=["record", "torch"])
@pytest.mark.parametrize("name", ["lognormal", "logisticnormal"])
def test_normal_transforms_match_handwritten(backend, name, torch_object):
    """elbo (analytic KL against the same family), iwae (STL) and the Monte
    Carlo KL against a prior of another family, on the same noise."""
    _, device = backend
    x, W, mu, s = _data(device)
    user_q, q = _normal_transform(name, mu, s, torch_object)
    p_mu = torch.full((L,), 0.1, dtype=torch.float64, device=device)
    p_s = torch.full((L,), 0.9, dtype=torch.float64, device=device)
    _, p = _normal_transform(name, p_mu, p_s, True)
    y = mu + s * reference.sample_noise(philox_seed_of(5), 3, mu.shape, torch.float64, "cpu").to(device)
    z = _transform(name, y)
    rec = td.Independent(td.Bernoulli(logits=_decode(W)(z)), 1).log_prob(x)

    terms = fastvae.elbo_terms(x, user_q, _decode(W), likelihood="bernoulli", n_samples=3, prior=p,
                               generator=gen(5), reduction="sum")
    assert terms.kl_analytic
    torch.testing.assert_close(terms.bound, (rec.mean(0) - td.kl_divergence(q, p)).sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(terms.bound, mu, retain_graph=True)[0],
                               torch.autograd.grad((rec.mean(0) - td.kl_divergence(q, p)).sum(), mu,
                                                   retain_graph=True)[0])

    other = td.Independent(td.Gamma(torch.full((L + (name != "lognormal"),), 2.0, dtype=torch.float64,
                                                device=device), 1.0), 1)
    if name == "lognormal":  # a Monte Carlo KL against a prior of another family
        terms = fastvae.elbo_terms(x, user_q, _decode(W), likelihood="bernoulli", n_samples=3, prior=other,
                                   generator=gen(5), reduction="sum")
        assert not terms.kl_analytic
        torch.testing.assert_close(terms.kl, (q.log_prob(z) - other.log_prob(z)).mean(0).sum())

    bound = fastvae.iwae(x, user_q, _decode(W), k=3, likelihood="bernoulli", estimator="stl", prior=p,
                         generator=gen(5), reduction="sum")
    lw = rec + p.log_prob(z) - q.log_prob(z)
    torch.testing.assert_close(bound, (torch.logsumexp(lw, 0) - math.log(3)).sum(), rtol=1e-10, atol=1e-10)
    q_stop = _normal_transform(name, mu.detach(), s.detach(), True)[1]
    surrogate = (torch.softmax(lw.detach(), 0) * (rec + p.log_prob(z) - q_stop.log_prob(z))).sum()
    for got, want in zip(torch.autograd.grad(bound, (mu, s), retain_graph=True),
                         torch.autograd.grad(surrogate, (mu, s))):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("prior_kind", ["record", "torch"])
@pytest.mark.parametrize("name", ["lognormal", "logisticnormal"])
def test_normal_transforms_against_the_standard_prior(backend, name, prior_kind):
    """Against the family's standard prior (a record of zeros, torch's
    LogNormal(0, 1) / LogisticNormal(0, 1)) the KL is the sampler's own (on
    the CPU): the ELBO and its gradients, and rsample_with_log_q_and_kl's
    z, log q and KL, against torch on the same noise."""
    _, device = backend
    x, W, mu, s = _data(device)
    user_q, q = _normal_transform(name, mu, s, False)
    zeros = torch.zeros(L, dtype=torch.float64, device=device)
    if prior_kind == "record":
        prior = type(user_q)(zeros, zeros)
    else:
        prior = _normal_transform(name, zeros, zeros + 1.0, True)[1]
    p = _normal_transform(name, zeros, zeros + 1.0, True)[1]
    y = mu + s * reference.sample_noise(philox_seed_of(5), 2, mu.shape, torch.float64, "cpu").to(device)
    z = _transform(name, y)
    rec = td.Independent(td.Bernoulli(logits=_decode(W)(z)), 1).log_prob(x)
    kl = td.kl_divergence(q, p)
    terms = fastvae.elbo_terms(x, user_q, _decode(W), likelihood="bernoulli", n_samples=2, prior=prior,
                               generator=gen(5), reduction="sum")
    assert terms.kl_analytic
    want = (rec.mean(0) - kl).sum()
    torch.testing.assert_close(terms.bound, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl, kl.sum(), rtol=1e-10, atol=1e-10)
    for got, expected in zip(torch.autograd.grad(terms.bound, (mu, s)), torch.autograd.grad(want, (mu, s))):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)

    check = fastvae.priors.check_prior(prior, L)
    torch.manual_seed(3)
    zz, log_q, kl_fused = user_q.rsample_with_log_q_and_kl(2, check)
    torch.manual_seed(3)
    z_ref, log_q_ref = user_q.rsample_with_log_q(2, None, False)
    torch.testing.assert_close(zz, z_ref, rtol=0, atol=0)
    torch.testing.assert_close(log_q, log_q_ref, rtol=0, atol=0)
    torch.testing.assert_close(log_q, q.log_prob(zz), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kl_fused, kl, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="prior: the closed-form KL of a"):
        user_q.rsample_with_log_q_and_kl(1, fastvae.priors.StandardNormal())


@pytest.mark.parametrize("family", ["laplace", "uniform", "gumbel", "cauchy"])
def test_analytic_kl_matches_torch(family):
    g = torch.Generator().manual_seed(1)
    loc, scale = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.rand(6, 4, generator=g,
                                                                                  dtype=torch.float64) + 0.2
    q = fastvae.LocationScale(family, loc, torch.log(scale))
    if family == "uniform":
        p = td.Uniform(torch.full((4,), -5.0, dtype=torch.float64), torch.full((4,), 6.0, dtype=torch.float64))
    else:
        p = TORCH_CLASS[family](torch.full((4,), 0.3, dtype=torch.float64), torch.full((4,), 1.7,
                                                                                       dtype=torch.float64))
    prior = fastvae.priors.check_prior(p, 4)
    expected = td.kl_divergence(q.torch_distribution().base_dist, p)
    torch.testing.assert_close(q.kl_per_dim(prior), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.analytic_kl(prior), expected.sum(-1), rtol=1e-12, atol=1e-12)


def test_uniform_kl_outside_the_support_is_infinite():
    q = fastvae.LocationScale("uniform", torch.tensor([[0.0, 2.0]]), torch.zeros(1, 2))
    prior = fastvae.priors.check_prior(td.Uniform(torch.zeros(2), torch.full((2,), 2.5)), 2)
    per_dim = q.kl_per_dim(prior)  # [0, 1] inside [0, 2.5]: log 2.5; [2, 3] sticks out: inf
    assert math.isclose(per_dim[0, 0].item(), math.log(2.5), rel_tol=1e-6) and math.isinf(per_dim[0, 1].item())


@pytest.mark.parametrize("prior", [td.Normal(0.0, 1.0), td.Independent(td.Normal(torch.zeros(L), torch.ones(L)), 1)],
                         ids=["Normal", "Independent"])
def test_torch_normal_prior_for_a_gaussian_posterior(backend, prior):
    """Was a TypeError: now the standard normal, with the fused analytic KL."""
    _, device = backend
    x, W, loc, scale = _data(device)
    if isinstance(prior, td.Independent):
        prior = td.Independent(td.Normal(torch.zeros(L, dtype=torch.float64, device=device),
                                         torch.ones(L, dtype=torch.float64, device=device)), 1)
    q = fastvae.DiagonalNormal(loc, 2 * torch.log(scale))
    got = fastvae.elbo_terms(x, q, _decode(W), likelihood="bernoulli", prior=prior, generator=gen(2))
    want = fastvae.elbo_terms(x, q, _decode(W), likelihood="bernoulli", generator=gen(2))
    assert got.kl_analytic
    torch.testing.assert_close(got.bound, want.bound, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["laplace", "cauchy", "lognormal"])
def test_log_likelihood_matches_handwritten(backend, family):
    """log_likelihood at K = 7 with chunks of 3: the noise of sample k of
    example g at offset (g K + k) L + l, the same for any chunk size."""
    _, device = backend
    x, W, loc, scale = _data(device)
    K = 7
    if family == "lognormal":
        q = td.Independent(td.LogNormal(loc.detach(), scale.detach()), 1)
        e = reference.philox_randn(philox_seed_of(4), torch.arange(B * K * L), torch.float64)
        z = torch.exp(loc.detach() + scale.detach() * e.reshape(B, K, L).transpose(0, 1).to(device))
    else:
        q = td.Independent(TORCH_CLASS[family](loc.detach(), scale.detach()), 1)
        ex = standardized(FAMILIES.index(family), _philox.philox_word(philox_seed_of(4), torch.arange(B * K * L)),
                          torch.float64)[0]
        z = loc.detach() + scale.detach() * ex.reshape(B, K, L).transpose(0, 1).to(device)
    p = td.Independent(td.Normal(torch.zeros(L, dtype=torch.float64, device=device),
                                 torch.ones(L, dtype=torch.float64, device=device)), 1)
    lw = td.Independent(td.Bernoulli(logits=_decode(W)(z)), 1).log_prob(x) + p.log_prob(z) - q.log_prob(z)
    expected = torch.logsumexp(lw, 0) - math.log(K)
    for chunk in (3, 7):
        got = fastvae.log_likelihood(x, lambda _: q, _decode(W), k=K, likelihood="bernoulli", chunk_size=chunk,
                                     generator=gen(4))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
@NEEDS_DREG_COMPILE
def test_compiled_elbo_and_dreg_match_eager(backend):
    """torch.compile(fullgraph=True) through the Laplace posterior (a torch object) and its prior."""
    _, device = backend
    x, W, loc, scale = _data(device)
    prior = td.Laplace(torch.zeros(L, dtype=torch.float64, device=device),
                       torch.ones(L, dtype=torch.float64, device=device))

    def loss(loc, scale):
        q = td.Laplace(loc, scale, validate_args=False)
        e = fastvae.elbo(x, q, _decode(W), likelihood="bernoulli", n_samples=2, prior=prior)
        i = fastvae.iwae(x, fastvae.LocationScale("gumbel", loc, torch.log(scale)), _decode(W), k=3,
                         likelihood="bernoulli", estimator="dreg")
        return -(e + i)

    assert_compiled_matches_eager(loss, (loc, scale), (loc, scale))


def _every_family(loc, scale, W):
    """(posterior, decoder, prior) of each family from the same two (B, L)
    parameter tensors: the torch objects users pass, and fastvae's records."""
    zeros, ones = torch.zeros_like(loc[0]).detach(), torch.ones_like(loc[0]).detach()
    logits = torch.stack((loc, scale, -loc), -1)  # (B, L, 3)
    dec, cat_dec = _decode(W), (lambda z: z.flatten(-2) @ W.new_ones(3 * L, D) * 0.1)
    lam = torch.tensor(0.5, dtype=loc.dtype, device=loc.device)
    return {
        "exponential": (td.Exponential(scale), dec, td.Exponential(ones)),
        "weibull": (td.Weibull(scale, scale + 0.5), dec, None),
        "kumaraswamy": (td.Kumaraswamy(scale + 0.5, scale + 1.0), dec, td.Beta(ones, ones)),
        "lognormal": (td.LogNormal(loc, scale), dec, td.LogNormal(zeros, ones)),
        "logisticnormal": (fastvae.LogisticNormal(loc[..., :2], 2 * torch.log(scale[..., :2])), dec,
                           td.LogisticNormal(zeros[:2], ones[:2])),
        "concrete": (td.Independent(td.RelaxedOneHotCategorical(lam, logits=logits), 1), cat_dec,
                     td.Independent(td.OneHotCategorical(logits=torch.zeros_like(logits[0])), 1)),
        "relaxed_bernoulli": (td.Independent(td.RelaxedBernoulli(lam, logits=loc), 1), dec,
                              td.Independent(td.RelaxedBernoulli(lam, logits=zeros), 1)),
    }


@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
@pytest.mark.parametrize("family", ["exponential", "weibull", "kumaraswamy", "lognormal", "logisticnormal", "concrete",
                                    "relaxed_bernoulli"])
@pytest.mark.quick_one  # a compile each (5-10 s); the quick tier compiles one, eager tests take every case
def test_every_family_compiles_in_elbo_and_iwae(backend, family):
    """torch.compile(fullgraph=True) through each family's posterior (the torch
    object, or the record where torch has none) in elbo (with its prior) and
    iwae: eager's values and gradients."""
    _, device = backend
    x, W, loc, scale = _data(device)

    def loss(loc, scale):
        q, dec, prior = _every_family(loc, scale, W)[family]
        unused = 0.0 * (loc.sum() + scale.sum())  # a family of one parameter leaves the other out of the graph
        e = fastvae.elbo(x, q, dec, likelihood="bernoulli", n_samples=2, prior=prior)
        if family == "concrete":  # iwae needs a relaxed prior's density
            return unused - e
        return unused - (e + fastvae.iwae(x, q, dec, k=3, likelihood="bernoulli", prior=prior))

    assert_compiled_matches_eager(loss, (loc, scale), (loc, scale))


@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
def test_concrete_default_prior_compiles_across_batch_sizes(backend):
    """prior=None's uniform categorical prior inside a compiled graph (built in
    the graph, not read from the eager cache), at two batch sizes in turn as a
    training loop's last batch gives: eager's values and gradients."""
    _, device = backend
    x, W, logits = _concrete_data(device)

    def loss(x, logits):
        return -fastvae.elbo(x, fastvae.Concrete(logits, LAM), _concrete_decode(W), likelihood="bernoulli")

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    for rows in (B, B - 2, B):
        ls = logits.detach()[:rows].requires_grad_()
        results = []
        for f in (loss, compiled):
            torch.manual_seed(rows)  # the same Philox seed drawn
            value = f(x[:rows], ls)
            results.append((value, torch.autograd.grad(value, ls)[0]))
        (v, g), (cv, cg) = results
        torch.testing.assert_close(cv, v, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cg, g, rtol=1e-8, atol=1e-10)


def test_free_bits_and_per_dim_kl(backend):
    _, device = backend
    x, W, loc, scale = _data(device)
    q = td.Laplace(loc, scale)
    prior = td.Laplace(torch.zeros(L, dtype=torch.float64, device=device),
                       torch.ones(L, dtype=torch.float64, device=device))
    terms = fastvae.elbo_terms(x, q, _decode(W), likelihood="bernoulli", prior=prior, free_bits=0.5)
    per_dim = td.kl_divergence(q, prior)
    torch.testing.assert_close(terms.kl_per_dim, per_dim.mean(0))
    torch.testing.assert_close(terms.kl, torch.clamp_min(per_dim.mean(0), 0.5).sum())
    with pytest.raises(ValueError, match="free_bits needs the KL of each latent dimension"):
        fastvae.elbo(x, q, _decode(W), likelihood="bernoulli", free_bits=0.5)


def test_bad_parameters_are_refused_by_name():
    fastvae.set_value_checks("always")  # the Triton path checks each kind once per process otherwise
    x, W = torch.zeros(2, D), torch.zeros(L, D)
    loc = torch.zeros(2, L)
    with pytest.raises(ValueError, match="scale"):
        fastvae.elbo(x, td.Laplace(loc, torch.zeros(2, L), validate_args=False), _decode(W), likelihood="bernoulli")
    with pytest.raises(ValueError, match="high - low"):
        fastvae.elbo(x, td.Uniform(loc, loc - 1, validate_args=False), _decode(W), likelihood="bernoulli")
    with pytest.raises(ValueError, match="family must be one of"):
        fastvae.LocationScale("weibull", loc, loc)
    with pytest.raises(TypeError, match="the posterior must be"):
        fastvae.elbo(x, td.Beta(torch.ones(2, L), torch.ones(2, L)), _decode(W), likelihood="bernoulli")
    with pytest.raises(ValueError, match="prior has shape"):
        fastvae.elbo(x, td.Laplace(loc, torch.ones(2, L)), _decode(W), likelihood="bernoulli",
                     prior=fastvae.LocationScale("laplace", loc, loc))


def test_the_kl_estimate_agrees_with_the_closed_form():
    """The Monte Carlo KL, log q from the fused sampler minus torch's log p of
    its samples, within 4 standard errors of the closed form (5000 samples)."""
    loc = torch.full((1, 6), 0.4, dtype=torch.float64)
    ls = torch.full((1, 6), -0.3, dtype=torch.float64)
    q = fastvae.LocationScale("laplace", loc, ls)
    p = td.Laplace(torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))
    torch.manual_seed(0)
    z, log_q = q.rsample_with_log_q(5000, None, False)
    mc = log_q - p.log_prob(z).sum(-1)
    exact = td.kl_divergence(q.torch_distribution().base_dist, p).sum()
    assert abs(mc.mean() - exact) < 4 * mc.std() / math.sqrt(mc.numel())


@pytest.mark.parametrize("name", ["gumbel", "lognormal", "logisticnormal"])
def test_reconstruction_probability_and_evaluate(backend, name):
    """reconstruction_probability draws z at log_likelihood's offsets (no
    latent term): log mean_k p(x | z_k) of the same samples; evaluate runs a
    dataset through the same path (its mean equals log_likelihood's)."""
    _, device = backend
    x, W, loc, scale = _data(device)
    loc, scale = loc.detach(), scale.detach()
    K = 5
    if name == "gumbel":
        q = td.Gumbel(loc, scale)
        e = standardized(FAMILIES.index("gumbel"), _philox.philox_word(philox_seed_of(6), torch.arange(B * K * L)),
                         torch.float64)[0]
        z = loc + scale * e.reshape(B, K, L).transpose(0, 1).to(device)
    else:
        q = td.LogNormal(loc, scale) if name == "lognormal" else td.LogisticNormal(loc, scale)
        e = reference.philox_randn(philox_seed_of(6), torch.arange(B * K * L), torch.float64)
        z = _transform(name, loc + scale * e.reshape(B, K, L).transpose(0, 1).to(device))
    rec = td.Independent(td.Bernoulli(logits=_decode(W)(z)), 1).log_prob(x)
    got = fastvae.reconstruction_probability(x, lambda _: q, _decode(W), n_samples=K, likelihood="bernoulli",
                                             chunk_size=2, generator=gen(6))
    torch.testing.assert_close(got, torch.logsumexp(rec, 0) - math.log(K), rtol=1e-10, atol=1e-10)
    # the logistic-normal's z lies on a simplex: no N(0, I) default, its family's standard prior
    prior = td.LogisticNormal(torch.zeros(L, device=device), torch.ones(L, device=device)) \
        if name == "logisticnormal" else None
    ll = fastvae.log_likelihood(x, lambda _: q, _decode(W), k=K, likelihood="bernoulli", generator=gen(6),
                                prior=prior)
    with warnings.catch_warnings():  # K = 5: the low-ESS and Pareto warnings are not the point here
        warnings.simplefilter("ignore")
        result = fastvae.evaluate([x], lambda _: q, _decode(W), k=K, likelihood="bernoulli", generator=gen(6),
                                  prior=prior)
    torch.testing.assert_close(result.per_example.to(ll.device), ll, rtol=1e-10, atol=1e-10)


def test_autocast_matches_float32_on_the_rounded_encoder(backend):
    """Under CPU autocast a bfloat16 Laplace posterior gives the float32 bound
    of its rounded parameters (z in float32: sample_normal's z_dtype rule)."""
    _, device = backend
    if device != "cpu":
        pytest.skip("CPU autocast")
    x, W, loc, scale = _data(device)
    loc16, scale16 = loc.detach().to(torch.bfloat16), scale.detach().to(torch.bfloat16)
    prior = td.Laplace(torch.zeros(L), torch.ones(L))
    x32, W32 = x.float(), W.float()

    def decode(z):  # elementwise (autocast leaves it in float32), so only the encoder is rounded
        return (z.unsqueeze(-1) * W32[:L]).sum(-2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastvae.elbo(x32, td.Laplace(loc16, scale16), decode, likelihood="bernoulli", n_samples=3,
                           prior=prior, generator=gen(8))
    want = fastvae.elbo(x32, td.Laplace(loc16.float(), scale16.float()), decode, likelihood="bernoulli",
                        n_samples=3, prior=prior, generator=gen(8))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- the positive families (exponential, Weibull, Kumaraswamy) ---------------------

from fastvae._families import POSITIVE_FAMILIES as POSITIVE  # noqa: E402
from fastvae.latents import KUMARASWAMY_KL_TERMS, kumaraswamy_beta_kl  # noqa: E402
from fastvae.ops.sample_family import positive_exp1, positive_terms  # noqa: E402


def _positive_data(device):
    g = torch.Generator().manual_seed(1)
    x, W, _, _ = _data(device)
    p0 = (torch.rand(B, L, generator=g, dtype=torch.float64) * 0.6 + 0.2).to(device).requires_grad_()
    p1 = (torch.rand(B, L, generator=g, dtype=torch.float64) * 0.6 + 0.5).to(device).requires_grad_()
    return x, W, p0, p1


def _positive_torch(family, p0, p1):
    """The torch distribution of positive parameters p0, p1 (> 0), Independent over L."""
    if family == "exponential":
        return td.Independent(td.Exponential(p0), 1)
    if family == "weibull":
        return td.Independent(td.Weibull(p0, p1), 1)
    return td.Independent(td.Kumaraswamy(p0, p1), 1)


def _positive_z(family, seed, K, p0, p1):
    """z of the training layout from the float64 uniforms, differentiable in p0, p1 (> 0)."""
    x = _philox.philox_word(seed, torch.arange(K * B * L)).reshape(K, B, L)
    t, log_t = positive_exp1(x, torch.float64)
    t, log_t = t.to(p0.device), log_t.to(p0.device)
    return positive_terms(POSITIVE.index(family), t, log_t, torch.log(p0), torch.log(p1), torch.float64)[0]


def _positive_prior(family, kind, device):
    """(prior=, the torch prior of the hand-written version, analytic)."""
    ones = torch.ones(L, dtype=torch.float64, device=device)
    if kind == "normal":
        return td.Normal(0.5, 1.0), td.Independent(td.Normal(ones * 0.5, ones), 1), False
    if family == "exponential":
        d = td.Independent(td.Exponential(ones * 1.3), 1)
        return d, d, True
    if family == "weibull":
        d = td.Independent(td.Weibull(ones * 1.2, ones * 1.5), 1)
        return d, d, True
    d = td.Independent(td.Beta(ones * 1.5, ones * 3.0), 1)
    return d, d, True


@pytest.mark.parametrize("torch_object", [False, True], ids=["record", "torch"])
@pytest.mark.parametrize("kind", ["same", "normal"])
@pytest.mark.parametrize("family", POSITIVE)
def test_positive_elbo_matches_handwritten(backend, family, kind, torch_object):
    _, device = backend
    x, W, p0, p1 = _positive_data(device)
    q = _positive_torch(family, p0, p1)
    if torch_object:
        user_q = q
    else:
        user_q = fastvae.Positive(family, torch.log(p0), None if family == "exponential" else torch.log(p1))
    prior, p, analytic = _positive_prior(family, kind, device)
    terms = fastvae.elbo_terms(x, user_q, _decode(W), likelihood="bernoulli", n_samples=2, prior=prior,
                               generator=gen(7), reduction="sum")
    assert terms.kl_analytic == analytic
    params = (p0,) if family == "exponential" else (p0, p1)
    grads = torch.autograd.grad(terms.bound, params, retain_graph=True)

    z = _positive_z(family, philox_seed_of(7), 2, p0, p1)
    rec = td.Independent(td.Bernoulli(logits=_decode(W)(z)), 1).log_prob(x).mean(0)
    if analytic and family == "exponential":
        kl = td.kl_divergence(q, p)
    elif analytic and family == "weibull":  # Bauckhage's closed form, written out in float64
        kl = _weibull_kl_by_hand(p0, p1, p.base_dist.scale, p.base_dist.concentration).sum(-1)
    elif analytic:  # Kumaraswamy-Beta: the truncated series (its own test below)
        kl = kumaraswamy_beta_kl(torch.log(p0), torch.log(p1), p.base_dist.concentration1,
                                 p.base_dist.concentration0).sum(-1)
    else:
        kl = (q.log_prob(z) - p.log_prob(z)).mean(0)
    bound = (rec - kl).sum()
    expected = torch.autograd.grad(bound, params)
    torch.testing.assert_close(terms.bound, bound, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl, kl.sum(), rtol=1e-10, atol=1e-10)
    # the Kumaraswamy-Beta series: autograd of the hand-written torch.digamma(b)
    # is torch.polygamma(1, b), off by up to 5e-10 relative (about 2e-9 at
    # b = 0.5); the fused KL's trigamma is good to 1e-14
    atol = 1e-8 if analytic and family == "kumaraswamy" else 1e-10
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=atol)


def _weibull_kl_by_hand(lam1, k1, lam2, k2):
    """KL(Weibull(lam1, k1) || Weibull(lam2, k2)) per element as Bauckhage (2013)
    writes it: log(k1 / lam1^k1) - log(k2 / lam2^k2) + (k1 - k2)(log lam1 -
    gamma / k1) + (lam1 / lam2)^k2 Gamma(k2 / k1 + 1) - 1."""
    gamma = 0.5772156649015329
    return (torch.log(k1 / lam1 ** k1) - torch.log(k2 / lam2 ** k2) + (k1 - k2) * (torch.log(lam1) - gamma / k1)
            + (lam1 / lam2) ** k2 * torch.exp(torch.lgamma(k2 / k1 + 1)) - 1)


# a Monte Carlo KL, 14 s interpreted: the interpreter child would prove it twice, since the Triton
# kernels of the KL and the sampler equal the reference's (test_family_kl, test_sample_family)
@pytest.mark.skipif(INTERPRET, reason="the reference backend's Monte Carlo KL proves it; the Triton kernels equal it")
@pytest.mark.parametrize("torch_object", [False, True], ids=["record", "torch"])
def test_weibull_elbo_s_closed_form_kl_is_the_monte_carlo_kl_in_expectation(backend, torch_object):
    """fastvae.elbo with a Weibull posterior and a Weibull prior takes the
    closed-form KL (the fused draw): the hand-written ELBO with the Monte
    Carlo KL, E_q[log q(z) - log p(z)] over 40000 draws per row, agrees with
    it within 5 standard errors per row; and it is Bauckhage's form written
    out by hand in float64, to rounding."""
    _, device = backend
    x, W, p0, p1 = _positive_data(device)
    q = _positive_torch("weibull", p0, p1)
    user_q = q if torch_object else fastvae.Positive("weibull", torch.log(p0), torch.log(p1))
    prior, p, _ = _positive_prior("weibull", "same", device)
    terms = fastvae.elbo_terms(x, user_q, _decode(W), likelihood="bernoulli", n_samples=1, prior=prior,
                               generator=gen(7), reduction="none")
    assert terms.kl_analytic
    n = 40000
    with torch.no_grad():
        z, log_q = fastvae.sample_positive("weibull", torch.log(p0), torch.log(p1), n, generator=gen(8))
        mc = log_q - p.log_prob(z)  # (n, B)
        mean, se = mc.mean(0), mc.std(0) / math.sqrt(n)
    assert ((terms.kl.detach() - mean).abs() <= 5 * se).all(), (terms.kl, mean, se)
    assert float(se.max()) < 0.05  # a test that tells a wrong KL of this size apart
    closed = _weibull_kl_by_hand(p0, p1, p.base_dist.scale, p.base_dist.concentration).sum(-1)
    torch.testing.assert_close(terms.kl, closed, rtol=1e-12, atol=1e-12)
    # the prior as a record: the same closed form, the same bound
    record = fastvae.Positive("weibull", torch.log(p.base_dist.scale), torch.log(p.base_dist.concentration))
    same = fastvae.elbo_terms(x, user_q, _decode(W), likelihood="bernoulli", n_samples=1, prior=record,
                              generator=gen(7), reduction="none")
    assert same.kl_analytic
    torch.testing.assert_close(same.kl, terms.kl, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(same.bound, terms.bound, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@pytest.mark.parametrize("family", POSITIVE)
def test_positive_iwae_matches_handwritten(backend, family, estimator):
    _, device = backend
    x, W, p0, p1 = _positive_data(device)
    q = _positive_torch(family, p0, p1)
    prior, p, _ = _positive_prior(family, "same", device)
    bound = fastvae.iwae(x, q, _decode(W), k=4, likelihood="bernoulli", estimator=estimator, prior=prior,
                         generator=gen(3), reduction="sum")
    params = (p0,) if family == "exponential" else (p0, p1)
    grads = torch.autograd.grad(bound, params, retain_graph=True)

    z = _positive_z(family, philox_seed_of(3), 4, p0, p1)
    rec = td.Independent(td.Bernoulli(logits=_decode(W)(z)), 1).log_prob(x)
    lw = rec + p.log_prob(z) - q.log_prob(z)
    value = torch.logsumexp(lw, 0) - math.log(4)
    if estimator == "iwae":
        surrogate = value
    else:
        q_stop = _positive_torch(family, p0.detach(), p1.detach())
        lw_stop = rec + p.log_prob(z) - q_stop.log_prob(z)
        v = torch.softmax(lw.detach(), 0)
        c = v if estimator == "stl" else v * v
        surrogate = (c * lw_stop).sum(0)
    torch.testing.assert_close(bound, value.sum(), rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, torch.autograd.grad(surrogate.sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("family", POSITIVE)
def test_positive_log_likelihood_matches_handwritten(backend, family):
    """log_likelihood at K = 7 with chunks of 3: the noise of sample k of example
    g at offset (g K + k) L + l (the evaluation's layout)."""
    _, device = backend
    x, W, p0, p1 = _positive_data(device)
    p0, p1 = p0.detach(), p1.detach()
    q = _positive_torch(family, p0, p1)
    K = 7
    xw = _philox.philox_word(philox_seed_of(4), torch.arange(B * K * L)).reshape(B, K, L).transpose(0, 1)
    t, log_t = positive_exp1(xw, torch.float64)
    z = positive_terms(POSITIVE.index(family), t.to(device), log_t.to(device), torch.log(p0), torch.log(p1),
                       torch.float64)[0]
    prior, p, _ = _positive_prior(family, "same", device)
    lw = td.Independent(td.Bernoulli(logits=_decode(W)(z)), 1).log_prob(x) + p.log_prob(z) - q.log_prob(z)
    expected = torch.logsumexp(lw, 0) - math.log(K)
    for chunk in (3, 7):
        got = fastvae.log_likelihood(x, lambda _: q, _decode(W), k=K, likelihood="bernoulli", chunk_size=chunk,
                                     generator=gen(4), prior=prior)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_exponential_kl_matches_torch():
    lq = torch.linspace(-3, 3, 7, dtype=torch.float64)
    rate_p = torch.tensor(0.7, dtype=torch.float64)
    prior = fastvae.priors.check_prior(td.Exponential(rate_p), 7)  # as the objectives wrap it
    got = fastvae.Positive("exponential", lq[None]).analytic_kl(prior)
    want = td.kl_divergence(td.Exponential(torch.exp(lq)), td.Exponential(rate_p)).sum()
    torch.testing.assert_close(got, want[None], rtol=1e-13, atol=1e-13)


@pytest.mark.full  # a Monte Carlo KL, ~27 s a case; family_kl's tests check the series
# the interpreter child would prove it twice: the Triton sampler equals the reference's (test_sample_family)
@pytest.mark.skipif(INTERPRET, reason="the reference backend's Monte Carlo KL proves it; the Triton sampler equals it")
@pytest.mark.parametrize("a,b,alpha,beta", [(1.5, 4.0, 1.2, 2.0), (0.8, 3.0, 2.0, 1.5), (3.0, 2.5, 1.0, 4.0)])
def test_kumaraswamy_beta_kl_series_matches_monte_carlo(a, b, alpha, beta):
    """The series truncated at KUMARASWAMY_KL_TERMS against 400000 Monte Carlo
    samples of log q - log p: within 4 standard errors plus the truncated tail
    (bounded by the next 10**4 terms' sum)."""
    la = torch.tensor([math.log(a)], dtype=torch.float64)
    lb = torch.tensor([math.log(b)], dtype=torch.float64)
    al, be = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    series = kumaraswamy_beta_kl(la, lb, al, be)
    tail = (kumaraswamy_beta_kl(la, lb, al, be, terms=10**4) - series).abs()
    q = fastvae.Positive("kumaraswamy", la, lb)
    torch.manual_seed(0)
    z, log_q = q.rsample_with_log_q(400000, None, False)
    mc = log_q - td.Beta(al, be).log_prob(z).sum(-1)
    assert abs(mc.mean() - series) < 4 * mc.std() / math.sqrt(mc.numel()) + tail, (series, mc.mean(), tail)
    assert KUMARASWAMY_KL_TERMS == 10


def test_positive_errors_name_the_argument():
    fastvae.set_value_checks("always")
    x, W = torch.zeros(2, D), torch.zeros(L, D)
    ones = torch.ones(2, L)
    with pytest.raises(ValueError, match="rate"):
        fastvae.elbo(x, td.Exponential(-ones, validate_args=False), _decode(W), likelihood="bernoulli")
    with pytest.raises(ValueError, match="concentration"):
        fastvae.elbo(x, td.Weibull(ones, 0 * ones, validate_args=False), _decode(W), likelihood="bernoulli")
    with pytest.raises(ValueError, match="concentration0"):
        fastvae.elbo(x, td.Kumaraswamy(ones, -ones, validate_args=False), _decode(W), likelihood="bernoulli")
    with pytest.raises(ValueError, match="prior: the exponential posterior"):
        fastvae.elbo(x, td.Exponential(ones), _decode(W), likelihood="bernoulli",
                     prior=td.Beta(torch.ones(L), torch.ones(L)))
    with pytest.raises(ValueError, match="log_scale must be finite"):
        fastvae.elbo(x, fastvae.Positive("weibull", torch.full((2, L), math.nan), ones), _decode(W),
                     likelihood="bernoulli")
    with pytest.raises(TypeError, match="log_rate must be a floating-point"):
        fastvae.Positive("exponential", torch.zeros(2, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="the prior's rate"):
        fastvae.elbo(x, td.Exponential(ones), _decode(W), likelihood="bernoulli",
                     prior=td.Exponential(-torch.ones(L), validate_args=False))


# -- the relaxed categorical (Concrete / Gumbel-softmax) -----------------------------

CC = 4  # categories per latent
LAM = 0.6


def _concrete_data(device):
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(B, D, generator=g) < 0.5).double().to(device)
    W = (torch.randn(L * CC, D, generator=g, dtype=torch.float64) * 0.5).to(device)
    logits = torch.randn(B, L, CC, generator=g, dtype=torch.float64).to(device).requires_grad_()
    return x, W, logits


def _concrete_decode(W):
    return lambda z: z.flatten(-2) @ W


def _concrete_q(logits):
    return td.Independent(td.RelaxedOneHotCategorical(torch.tensor(LAM, dtype=torch.float64, device=logits.device),
                                                      logits=logits), 1)


def _concrete_prior(device):
    return td.Independent(td.RelaxedOneHotCategorical(torch.tensor(LAM, dtype=torch.float64, device=device),
                                                      logits=torch.zeros(L, CC, dtype=torch.float64,
                                                                         device=device)), 1)


def _concrete_z(seed, K, logits, offsets=None):
    """The relaxed z of the training layout (float64 uniforms), differentiable in the logits."""
    if offsets is None:
        offsets = torch.arange(K * B * L * CC)
    t = concrete_noise(seed, offsets, torch.float64).reshape(K, B, L, CC).to(logits.device)
    return torch.softmax((logits - torch.log(t)) / LAM, -1)


@pytest.mark.parametrize("prior_kind", ["relaxed", "categorical"])
@pytest.mark.parametrize("torch_object", [False, True], ids=["record", "torch"])
def test_concrete_elbo_matches_handwritten(backend, torch_object, prior_kind):
    """The same noise by hand: Monte Carlo KL against a relaxed prior (torch's
    log_prob), the analytic categorical KL against a uniform OneHotCategorical."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    user_q = _concrete_q(logits) if torch_object else fastvae.Concrete(logits, LAM)
    if prior_kind == "relaxed":
        prior = _concrete_prior(device)
    else:
        prior = td.OneHotCategorical(logits=torch.zeros(CC, dtype=torch.float64, device=device))
    terms = fastvae.elbo_terms(x, user_q, _concrete_decode(W), likelihood="bernoulli", n_samples=2, prior=prior,
                               generator=gen(7), reduction="sum")
    assert terms.kl_analytic == (prior_kind == "categorical")
    (grad,) = torch.autograd.grad(terms.bound, logits, retain_graph=True)
    z = _concrete_z(philox_seed_of(7), 2, logits)
    rec = td.Independent(td.Bernoulli(logits=_concrete_decode(W)(z)), 1).log_prob(x).mean(0)
    q = _concrete_q(logits)
    if prior_kind == "relaxed":
        kl = (q.log_prob(z) - prior.log_prob(z)).mean(0)
    else:
        kl = td.kl_divergence(td.Categorical(logits=logits), td.Categorical(logits=torch.zeros_like(logits))).sum(-1)
    bound = (rec - kl).sum()
    torch.testing.assert_close(terms.bound, bound, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl, kl.sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, torch.autograd.grad(bound, logits)[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("binary", [False, True], ids=["concrete", "binary"])
def test_the_default_uniform_prior_is_built_once_and_equals_the_explicit_one(backend, binary, monkeypatch):
    """prior=None's uniform OneHotCategorical (BinaryConcrete: Bernoulli(1/2))
    gives the explicit prior's bound and gradient; it is built once per size,
    dtype and device (not on every call), and one first built under
    inference_mode serves a later call that differentiates."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    if binary:
        logits = logits[..., 0].detach().requires_grad_()
        make, pmf = fastvae.BinaryConcrete, td.Bernoulli(logits=torch.zeros(L, dtype=torch.float64, device=device))

        def decode(z):
            return z @ W[:L]
    else:
        make, decode = fastvae.Concrete, _concrete_decode(W)
        pmf = td.OneHotCategorical(logits=torch.zeros(CC, dtype=torch.float64, device=device))
    monkeypatch.setattr(fastvae.latents, "_UNIFORM_PRIORS", {})
    with torch.inference_mode():  # the first call, building the cached prior, in inference mode
        fastvae.elbo(x, make(logits.detach(), LAM), decode, likelihood="bernoulli", generator=gen(2))
    built = []
    family = td.Bernoulli if binary else td.OneHotCategorical
    init = family.__init__
    monkeypatch.setattr(family, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    bounds = {}
    for prior in (None, pmf):
        bound = fastvae.elbo(x, make(logits, LAM), decode, likelihood="bernoulli", prior=prior, generator=gen(2),
                             reduction="sum")
        bounds[prior is None] = (bound, torch.autograd.grad(bound, logits)[0])
    assert not built, "the default prior was built again"
    torch.testing.assert_close(bounds[True][0], bounds[False][0], rtol=0, atol=0)
    torch.testing.assert_close(bounds[True][1], bounds[False][1], rtol=0, atol=0)
    # another dtype gets its own prior, in that dtype
    half = fastvae.elbo(x.float(), make(logits.detach().float(), LAM), lambda z: decode(z.double()).float(),
                        likelihood="bernoulli", generator=gen(2), reduction="sum")
    assert half.dtype == torch.float32 and len(built) == 1
    torch.testing.assert_close(half.double(), bounds[True][0].detach(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_concrete_iwae_matches_handwritten(backend, estimator):
    _, device = backend
    x, W, logits = _concrete_data(device)
    prior = _concrete_prior(device)
    bound = fastvae.iwae(x, _concrete_q(logits), _concrete_decode(W), k=4, likelihood="bernoulli",
                         estimator=estimator, prior=prior, generator=gen(3), reduction="sum")
    (grad,) = torch.autograd.grad(bound, logits, retain_graph=True)
    z = _concrete_z(philox_seed_of(3), 4, logits)
    rec = td.Independent(td.Bernoulli(logits=_concrete_decode(W)(z)), 1).log_prob(x)
    lw = rec + prior.log_prob(z) - _concrete_q(logits).log_prob(z)
    value = torch.logsumexp(lw, 0) - math.log(4)
    if estimator == "iwae":
        surrogate = value
    else:
        lw_stop = rec + prior.log_prob(z) - _concrete_q(logits.detach()).log_prob(z)
        v = torch.softmax(lw.detach(), 0)
        surrogate = ((v if estimator == "stl" else v * v) * lw_stop).sum(0)
    torch.testing.assert_close(bound, value.sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, torch.autograd.grad(surrogate.sum(), logits)[0], rtol=1e-7, atol=1e-10)


def test_concrete_log_likelihood_matches_handwritten(backend):
    """log_likelihood at K = 7 with chunks of 3: the noise of sample k of example
    g at offset (g K + k) L C + l C + c (the evaluation's layout)."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    logits = logits.detach()
    K = 7
    offsets = torch.arange(B * K * L * CC).reshape(B, K, L, CC).transpose(0, 1).reshape(-1)
    z = _concrete_z(philox_seed_of(4), K, logits, offsets)
    prior = _concrete_prior(device)
    lw = (td.Independent(td.Bernoulli(logits=_concrete_decode(W)(z)), 1).log_prob(x) + prior.log_prob(z)
          - _concrete_q(logits).log_prob(z))
    expected = torch.logsumexp(lw, 0) - math.log(K)
    for chunk in (3, 7):
        got = fastvae.log_likelihood(x, lambda _: _concrete_q(logits), _concrete_decode(W), k=K,
                                     likelihood="bernoulli", chunk_size=chunk, generator=gen(4), prior=prior)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    result = fastvae.evaluate([x], lambda _: fastvae.Concrete(logits, LAM), _concrete_decode(W), k=K,
                              likelihood="bernoulli", generator=gen(4), prior=prior)
    assert math.isfinite(result.log_likelihood)


def test_concrete_elbo_agrees_with_torch_sampling_within_monte_carlo_error(backend):
    """fastvae's ELBO (its own noise) against torch's rsample + log_prob (torch's
    noise), 4000 samples each: |difference| < 4 standard errors, three seeds."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    logits = logits.detach()
    prior = _concrete_prior(device)
    n = 4000
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        terms = fastvae.elbo_terms(x, _concrete_q(logits), _concrete_decode(W), likelihood="bernoulli",
                                   n_samples=n, prior=prior, reduction="none")
        q = _concrete_q(logits)
        z = q.rsample((n,))
        per = (td.Independent(td.Bernoulli(logits=_concrete_decode(W)(z)), 1).log_prob(x) + prior.log_prob(z)
               - q.log_prob(z))
        se = per.std(0) * math.sqrt(2.0 / n)  # two independent means of n samples
        assert ((terms.bound - per.mean(0)).abs() < 4 * se).all(), (seed, terms.bound, per.mean(0), se)


def test_concrete_hard_elbo_takes_the_categorical_kl(backend):
    """hard=True: the decoder gets one-hot z (straight-through), the KL is the categorical one."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    prior = td.OneHotCategorical(logits=torch.zeros(CC, dtype=torch.float64, device=device))
    seen = []

    def decode(z):
        seen.append(z)
        return _concrete_decode(W)(z)

    terms = fastvae.elbo_terms(x, fastvae.Concrete(logits, LAM, hard=True), decode, likelihood="bernoulli",
                               prior=prior, generator=gen(5), free_bits=0.01)
    assert terms.kl_analytic and ((seen[0] == 0) | (seen[0] == 1)).all()
    terms.bound.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad != 0).any()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_concrete_free_bits_with_a_categorical_prior(backend, reduction):
    """Free bits take the analytic categorical KL of each latent,
    sum_c pi_c log(pi_c / p_c) with pi = softmax(logits), against a
    OneHotCategorical prior of shape (L, C) (a different p per latent)."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    p_logits = torch.randn(L, CC, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    prior = td.OneHotCategorical(logits=p_logits)
    log_pi = torch.log_softmax(logits, -1)
    per_dim = (log_pi.exp() * (log_pi - torch.log_softmax(p_logits, -1))).sum(-1)  # (B, L)
    lam = per_dim.mean(0).sort().values[:2].mean().item()  # between two latents' KLs: floors one
    for hard in (False, True):
        terms = fastvae.elbo_terms(x, fastvae.Concrete(logits, LAM, hard=hard), _concrete_decode(W),
                                   likelihood="bernoulli", prior=prior, free_bits=lam, n_samples=2,
                                   generator=gen(3), reduction=reduction)
        assert terms.kl_analytic
        floored = torch.where(per_dim.mean(0) < lam, torch.full_like(per_dim, lam), per_dim).sum(-1)  # (B,)
        if reduction == "mean":
            torch.testing.assert_close(terms.kl_per_dim, per_dim.mean(0), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(terms.kl, floored.mean(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(terms.kl, torch.clamp_min(per_dim.mean(0), lam).sum(), rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(terms.kl_per_dim, per_dim, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(terms.kl, floored, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(terms.bound.sum(), logits)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("n_samples", [1, 3])
def test_concrete_free_bits_with_a_relaxed_prior(backend, n_samples):
    """Against a RelaxedOneHotCategorical prior the KL is Monte Carlo, and it
    splits by latent: log q_l(z_l) - log p_l(z_l) of the same samples (the
    latents are independent under q and p). kl_per_dim is their mean over the
    samples, free bits floor its batch mean, and the bound and its gradient
    equal torch's on the same noise."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    prior = td.Independent(td.RelaxedOneHotCategorical(
        torch.tensor(LAM, dtype=torch.float64, device=device),
        logits=torch.randn(L, CC, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device)), 1)
    z = _concrete_z(philox_seed_of(4), n_samples, logits)
    q_lat = td.RelaxedOneHotCategorical(torch.tensor(LAM, dtype=torch.float64, device=device), logits=logits)
    terms_bl = (q_lat.log_prob(z) - prior.base_dist.log_prob(z)).mean(0)  # (B, L)
    rec = td.Independent(td.Bernoulli(logits=_concrete_decode(W)(z)), 1).log_prob(x).mean(0)

    plain = fastvae.elbo_terms(x, fastvae.Concrete(logits, LAM), _concrete_decode(W), likelihood="bernoulli",
                               prior=prior, n_samples=n_samples, generator=gen(4), reduction="sum")
    assert not plain.kl_analytic
    torch.testing.assert_close(plain.kl_per_dim, terms_bl.sum(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(plain.kl, terms_bl.sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(plain.bound, (rec - terms_bl.sum(-1)).sum(), rtol=1e-10, atol=1e-10)

    lam = terms_bl.mean(0).sort().values[:2].mean().item()  # between two latents' KLs: floors one
    floored = torch.where(terms_bl.mean(0) < lam, torch.full_like(terms_bl, lam), terms_bl).sum(-1)  # (B,)
    assert (terms_bl.mean(0) < lam).any() and (terms_bl.mean(0) > lam).any()
    terms = fastvae.elbo_terms(x, _concrete_q(logits), _concrete_decode(W), likelihood="bernoulli", prior=prior,
                               free_bits=lam, n_samples=n_samples, generator=gen(4), reduction="mean")
    torch.testing.assert_close(terms.kl_per_dim, terms_bl.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl, floored.mean(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl, torch.clamp_min(terms_bl.mean(0), lam).sum(), rtol=1e-10, atol=1e-10)
    want = (rec - floored).mean()
    torch.testing.assert_close(terms.bound, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(terms.bound, logits)[0], torch.autograd.grad(want, logits)[0],
                               rtol=1e-8, atol=1e-10)
    bound = fastvae.elbo(x, fastvae.Concrete(logits, LAM), _concrete_decode(W), likelihood="bernoulli", prior=prior,
                         free_bits=lam, n_samples=n_samples, generator=gen(4))
    torch.testing.assert_close(bound, terms.bound, rtol=1e-12, atol=1e-12)
    record_prior = fastvae.Concrete(prior.base_dist.logits, LAM)  # a record of shape (L, C) is the same prior
    same = fastvae.elbo_terms(x, fastvae.Concrete(logits, LAM), _concrete_decode(W), likelihood="bernoulli",
                              prior=record_prior, free_bits=lam, n_samples=n_samples, generator=gen(4))
    torch.testing.assert_close(same.kl_per_dim, terms.kl_per_dim, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(same.bound, terms.bound, rtol=1e-12, atol=1e-12)


def test_free_bits_errors_say_why_the_kl_does_not_split(backend):
    _, device = backend
    x, W, logits = _concrete_data(device)
    ones = torch.ones(B, L, dtype=torch.float64, device=device)
    gamma = td.Independent(td.Gamma(torch.full((L,), 2.0, dtype=torch.float64, device=device), 1.0), 1)
    with pytest.raises(ValueError, match=r"free_bits needs the KL of each latent dimension.*Positive\('weibull'\)"
                                         r".*torch Gamma.*Monte Carlo KL"):
        fastvae.elbo(torch.zeros(B, D, dtype=torch.float64, device=device), td.Weibull(ones, ones), _decode(W),
                     likelihood="bernoulli", prior=gamma, free_bits=0.1)
    with pytest.raises(ValueError, match=r"free_bits needs the KL of each latent dimension.*Concrete.*torch Dirichlet"):
        fastvae.elbo(x, fastvae.Concrete(logits, LAM), _concrete_decode(W), likelihood="bernoulli",
                     prior=td.Dirichlet(torch.ones(CC, dtype=torch.float64, device=device)), free_bits=0.1)
    with pytest.raises(ValueError, match="hard=True takes a OneHotCategorical prior"):
        fastvae.elbo(x, fastvae.Concrete(logits, LAM, hard=True), _concrete_decode(W), likelihood="bernoulli",
                     prior=_concrete_prior(device), free_bits=0.1)


def test_concrete_errors_name_the_argument(backend):
    _, device = backend
    x, W, logits = _concrete_data(device)
    categorical = td.OneHotCategorical(logits=torch.zeros(CC, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="OneHotCategorical prior has no density at a relaxed z"):
        fastvae.iwae(x, _concrete_q(logits), _concrete_decode(W), likelihood="bernoulli", prior=categorical)
    with pytest.raises(ValueError, match="hard=True takes a OneHotCategorical prior"):
        fastvae.elbo(x, fastvae.Concrete(logits, LAM, hard=True), _concrete_decode(W), likelihood="bernoulli",
                     prior=_concrete_prior(device))
    with pytest.raises(ValueError, match="hard=True has no density"):
        fastvae.iwae(x, fastvae.Concrete(logits, LAM, hard=True), _concrete_decode(W), likelihood="bernoulli",
                     prior=_concrete_prior(device))
    with pytest.raises(ValueError, match="hard=True has no density"):  # a relaxed prior at the one-hot z
        fastvae.log_likelihood(x.detach(), lambda _: fastvae.Concrete(logits.detach(), LAM, hard=True),
                               _concrete_decode(W), k=3, likelihood="bernoulli", prior=_concrete_prior(device))
    with pytest.raises(ValueError, match="OneHotCategorical prior has no density at a relaxed z"):
        fastvae.log_likelihood(x.detach(), lambda _: fastvae.Concrete(logits.detach(), LAM), _concrete_decode(W),
                               k=3, likelihood="bernoulli", prior=categorical)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastvae.Concrete(logits, 0.0)


@pytest.mark.parametrize("prior_shape", ["uniform", "per-latent"])
def test_concrete_hard_log_likelihood_takes_the_categorical_weights(backend, prior_shape):
    """hard=True with a OneHotCategorical prior: the one-hot z of the evaluation's
    noise layout (the argmax of the relaxed sample) and the weights of the two
    categorical pmfs, log p(x|z) + sum_l log p(c_l) - log pi(c_l); a masked
    category (-inf logit) is never drawn and never enters the sum."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    logits = logits.detach().clone()
    logits[0, 1, 2] = -math.inf
    g = torch.Generator().manual_seed(11)
    prior_logits = (torch.zeros(CC, dtype=torch.float64) if prior_shape == "uniform"
                    else torch.randn(L, CC, generator=g, dtype=torch.float64)).to(device)
    prior = td.OneHotCategorical(logits=prior_logits)
    K = 7
    offsets = torch.arange(B * K * L * CC).reshape(B, K, L, CC).transpose(0, 1).reshape(-1)
    c = _concrete_z(philox_seed_of(4), K, logits, offsets).argmax(-1)  # (K, B, L)
    z = torch.nn.functional.one_hot(c, CC).double()
    assert not (c[:, 0, 1] == 2).any()
    log_ratio = (td.Categorical(logits=prior_logits).log_prob(c) - td.Categorical(logits=logits).log_prob(c)).sum(-1)
    lw = td.Independent(td.Bernoulli(logits=_concrete_decode(W)(z)), 1).log_prob(x) + log_ratio
    expected = torch.logsumexp(lw, 0) - math.log(K)
    assert torch.isfinite(expected).all()
    for chunk in (3, 7):
        got = fastvae.log_likelihood(x, lambda _: fastvae.Concrete(logits, LAM, hard=True), _concrete_decode(W),
                                     k=K, likelihood="bernoulli", chunk_size=chunk, generator=gen(4), prior=prior)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    result = fastvae.evaluate([x], lambda _: fastvae.Concrete(logits, LAM, hard=True), _concrete_decode(W), k=K,
                              likelihood="bernoulli", generator=gen(4), prior=prior, progress=False)
    torch.testing.assert_close(result.per_example, expected, rtol=1e-10, atol=1e-10)


def test_concrete_hard_log_likelihood_estimates_the_discrete_model(backend):
    """The discrete model's log p(x) = log sum_z p(z) p(x|z), enumerated over the
    C^L one-hot configurations: log_likelihood of a hard=True posterior
    (categorical weights) agrees within 4 of its standard errors plus the
    estimator's bias bound, whatever the temperature (it only shapes the
    relaxed sample, not its argmax)."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    logits = logits.detach()
    prior_logits = torch.zeros(CC, dtype=torch.float64, device=device)
    configs = torch.cartesian_prod(*[torch.arange(CC)] * L).to(device)  # (C^L, L)
    z_all = torch.nn.functional.one_hot(configs, CC).double().unsqueeze(1)  # (C^L, 1, L, C)
    log_pz = td.Categorical(logits=prior_logits).log_prob(configs).sum(-1)  # (C^L,)
    rec = td.Independent(td.Bernoulli(logits=_concrete_decode(W)(z_all)), 1).log_prob(x)  # (C^L, B)
    exact = torch.logsumexp(rec + log_pz.unsqueeze(-1), 0)
    K = 400 if INTERPRET else 3000
    for lam in (0.3, 2.0):
        with warnings.catch_warnings():  # a k̂ near 0.7 for an example or two (random logits, K = 3000)
            warnings.filterwarnings("ignore", category=fastvae.EvaluationWarning)
            stats = fastvae.log_likelihood(x, lambda _, lam=lam: fastvae.Concrete(logits, lam, hard=True),
                                           _concrete_decode(W), k=K, likelihood="bernoulli", generator=gen(12),
                                           prior=td.OneHotCategorical(logits=prior_logits), return_stats=True)
        assert ((stats.log_likelihood - exact).abs() < 4 * stats.stderr + 1e-3).all(), (lam, stats, exact)


@pytest.mark.parametrize("hard", [False, True])
def test_concrete_reconstruction_probability_matches_handwritten(backend, hard):
    """log mean_k p(x | z_k) over the evaluation's noise layout (no prior, so hard=True is fine)."""
    _, device = backend
    x, W, logits = _concrete_data(device)
    logits = logits.detach()
    K = 6
    offsets = torch.arange(B * K * L * CC).reshape(B, K, L, CC).transpose(0, 1).reshape(-1)
    z = _concrete_z(philox_seed_of(9), K, logits, offsets)
    if hard:
        z = torch.nn.functional.one_hot(z.argmax(-1), CC).double()
    rec = td.Independent(td.Bernoulli(logits=_concrete_decode(W)(z)), 1).log_prob(x)
    expected = torch.logsumexp(rec, 0) - math.log(K)
    got = fastvae.reconstruction_probability(x, lambda _: fastvae.Concrete(logits, LAM, hard=hard),
                                             _concrete_decode(W), n_samples=K, likelihood="bernoulli",
                                             generator=gen(9))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _categorical_case(device, binary, per_latent, masked, learned=False):
    """(posterior, decode, prior, logits leaf, prior leaf or None, the prior's
    log-pmf (L, C') as the sampler takes it) of a non-uniform categorical prior:
    a OneHotCategorical of logits (C,) or (L, C) for a Concrete, a Bernoulli of
    probabilities () or (L,) for a BinaryConcrete (its log-pmf (log p, log(1 - p)))."""
    g = torch.Generator().manual_seed(11)
    x, W, _ = _concrete_data(device)
    if binary:
        logits = torch.randn(B, L, generator=g, dtype=torch.float64).to(device)
        if masked:
            logits[0, 1] = -math.inf  # z = 0 there
        raw = torch.randn((L,) if per_latent else (), generator=g, dtype=torch.float64).to(device)
        raw.requires_grad_(learned)
        prior = td.Bernoulli(logits=raw)
        log_p = torch.stack((torch.nn.functional.logsigmoid(raw), torch.nn.functional.logsigmoid(-raw)), -1)
        logits.requires_grad_()
        return (fastvae.BinaryConcrete(logits, LAM), lambda z: z @ W[:L], prior, logits, raw if learned else None,
                log_p)
    logits = torch.randn(B, L, CC, generator=g, dtype=torch.float64).to(device)
    if masked:
        logits[0, 1, 2] = -math.inf
    raw = torch.randn((L, CC) if per_latent else (CC,), generator=g, dtype=torch.float64).to(device) * 2
    raw.requires_grad_(learned)
    prior = td.OneHotCategorical(logits=raw)
    logits.requires_grad_()
    return (fastvae.Concrete(logits, LAM), _concrete_decode(W), prior, logits, raw if learned else None,
            torch.log_softmax(raw, -1))


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("per_latent", [False, True], ids=["shared", "per-latent"])
@pytest.mark.parametrize("binary", [False, True], ids=["concrete", "binary"])
def test_the_categorical_kl_comes_from_the_sampler(backend, binary, per_latent, masked, K, monkeypatch):
    """elbo against a non-uniform categorical prior takes the analytic KL from
    the sampler's own launch (the record's torch formula is not called): the
    bound and its gradient those of the same z by hand with the float64
    oracle's KL, the KL torch's kl_divergence (where no category is masked)."""
    from fastvae.ops.sample_family import concrete_kl
    _, device = backend
    x = _concrete_data(device)[0]
    q, decode, prior, logits, _, log_p = _categorical_case(device, binary, per_latent, masked)

    def refused(*args):
        raise AssertionError("the torch formula ran: the sampler's KL was not used")

    monkeypatch.setattr(fastvae.latents.Concrete, "kl_per_dim", refused)
    got = fastvae.elbo(x, q, decode, likelihood="bernoulli", n_samples=K, prior=prior, generator=gen(7),
                       reduction="none")
    (grad,) = torch.autograd.grad(got.sum(), logits)
    monkeypatch.undo()
    # elbo_terms' kl is the sampler's too (its per-latent terms, for logging, torch's formula)
    terms = fastvae.elbo_terms(x, q, decode, likelihood="bernoulli", n_samples=K, prior=prior, generator=gen(7),
                               reduction="none")
    assert terms.kl_analytic and terms.kl.shape == (B,)
    torch.testing.assert_close(terms.bound, got, rtol=0, atol=0)
    torch.testing.assert_close(terms.kl_per_dim.sum(-1), terms.kl, rtol=1e-12, atol=1e-12)
    # free bits take the per-latent KL (the record's torch formula): finite gradients beside a masked category
    floored = fastvae.elbo(x, q, decode, likelihood="bernoulli", n_samples=K, prior=prior, generator=gen(7),
                           free_bits=0.01)
    assert torch.isfinite(torch.autograd.grad(floored, logits)[0]).all()
    z = q.rsample(K, generator=gen(7))  # the same seed: the same z
    rec = td.Independent(td.Bernoulli(logits=decode(z)), 1).log_prob(x).mean(0)
    stacked = torch.stack((logits, torch.zeros_like(logits)), -1) if binary else logits
    kl = concrete_kl(stacked, log_p).sum(-1)
    torch.testing.assert_close(terms.kl, kl, rtol=1e-12, atol=1e-12)
    if not masked:
        want = td.kl_divergence(td.Bernoulli(logits=logits), td.Bernoulli(logits=prior.logits.expand(B, L))) \
            if binary else \
            td.kl_divergence(td.Categorical(logits=logits), td.Categorical(logits=prior.logits))
        torch.testing.assert_close(terms.kl, want.sum(-1), rtol=1e-12, atol=1e-12)
    bound = rec - kl
    torch.testing.assert_close(terms.bound, bound, rtol=1e-10, atol=1e-10)
    (want_grad,) = torch.autograd.grad(bound.sum(), logits)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("binary", [False, True], ids=["concrete", "binary"])
def test_a_learned_categorical_prior_gets_its_gradient(backend, binary):
    """A prior whose logits are learned: elbo's gradient to them (and to the
    posterior's logits) is the float64 oracle's, one-row batch included."""
    from fastvae.ops.sample_family import concrete_kl
    _, device = backend
    x = _concrete_data(device)[0]
    q, decode, _, logits, raw, _ = _categorical_case(device, binary, True, False, learned=True)
    for rows in (B, 1):
        sub = q.rows(0, rows)
        prior = td.Bernoulli(logits=raw) if binary else td.OneHotCategorical(logits=raw)  # its graph: each call's
        log_p = torch.stack((torch.nn.functional.logsigmoid(raw), torch.nn.functional.logsigmoid(-raw)), -1) \
            if binary else torch.log_softmax(raw, -1)
        bound = fastvae.elbo(x[:rows], sub, decode, likelihood="bernoulli", n_samples=2, prior=prior,
                             generator=gen(3), reduction="sum")
        got = torch.autograd.grad(bound, (logits, raw))
        z = sub.rsample(2, generator=gen(3))
        rec = td.Independent(td.Bernoulli(logits=decode(z)), 1).log_prob(x[:rows]).mean(0)
        stacked = torch.stack((logits, torch.zeros_like(logits)), -1) if binary else logits
        want_bound = (rec - concrete_kl(stacked[:rows], log_p).sum(-1)).sum()
        torch.testing.assert_close(bound, want_bound, rtol=1e-10, atol=1e-10)
        want = torch.autograd.grad(want_bound, (logits, raw), retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.quick_one  # a compile each (5-10 s); the quick tier compiles one, eager tests take every case
@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
@pytest.mark.parametrize("binary", [False, True], ids=["concrete", "binary"])
def test_the_categorical_kl_compiles_across_batch_sizes_and_sample_counts(backend, binary):
    """torch.compile(fullgraph=True) of elbo against a non-uniform categorical
    prior (the sampler's KL in the graph), as the batch (B, B - 2, B) and the
    sample count change between calls: eager's values and gradients."""
    _, device = backend
    x = _concrete_data(device)[0]
    q, decode, prior, logits, _, _ = _categorical_case(device, binary, True, False)
    make = fastvae.BinaryConcrete if binary else fastvae.Concrete

    def loss(x, logits, K):
        return -fastvae.elbo(x, make(logits, LAM), decode, likelihood="bernoulli", prior=prior, n_samples=K)

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    for rows, K in ((B, 1), (B - 2, 1), (B, 1), (B, 3)):
        ls = logits.detach()[:rows].requires_grad_()
        results = []
        for f in (loss, compiled):
            torch.manual_seed(rows + K)  # the same Philox seed drawn
            value = f(x[:rows], ls, K)
            results.append((value, torch.autograd.grad(value, ls)[0]))
        (v, g), (cv, cg) = results
        torch.testing.assert_close(cv, v, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cg, g, rtol=1e-8, atol=1e-10)


# -- the relaxed Bernoulli (BinaryConcrete, torch's RelaxedBernoulli) --------------------------------------------


def _binary_data(device):
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(B, D, generator=g) < 0.5).double().to(device)
    W = (torch.randn(L, D, generator=g, dtype=torch.float64) * 0.5).to(device)
    logits = torch.randn(B, L, generator=g, dtype=torch.float64).to(device).requires_grad_()
    return x, W, logits


def _binary_decode(W):
    return lambda z: z @ W


def _binary_q(logits, lam=LAM):
    return td.Independent(td.RelaxedBernoulli(torch.tensor(lam, dtype=torch.float64, device=logits.device),
                                              logits=logits), 1)


def _binary_prior(device, kind):
    p_logits = torch.randn(L, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(device)
    if kind == "bernoulli":
        return td.Independent(td.Bernoulli(probs=torch.sigmoid(p_logits)), 1)
    return td.Independent(td.RelaxedBernoulli(torch.tensor(0.8, dtype=torch.float64, device=device),
                                              logits=p_logits), 1)


def _binary_z(seed, K, logits, offsets=None):
    """The relaxed z of the training layout: sigmoid((l - log t_1 + log t_2) / lambda), the
    first component of the Concrete of logits (l, 0) (2 uniforms per latent)."""
    if offsets is None:
        offsets = torch.arange(K * B * L * 2)
    t = concrete_noise(seed, offsets, torch.float64).reshape(K, B, L, 2).to(logits.device)
    return torch.sigmoid((logits - torch.log(t[..., 0]) + torch.log(t[..., 1])) / LAM)


@pytest.mark.parametrize("shape", [(1, 5), (B, 3)], ids=["one-row", "batch"])
@pytest.mark.parametrize("lam", [1e-2, 0.6, 10.0])
def test_binary_concrete_log_q_matches_torch(backend, lam, shape):
    """The Concrete of logits (l, 0) at (z, 1 - z) is torch's RelaxedBernoulli at z:
    log q of each latent (each its own sampler row) against torch's log_prob where
    z is not rounded to 0 or 1 (at lambda = 1e-2 most z are; the sampler's log q,
    from the noise, stays finite), and the record's log q is their sum."""
    _, device = backend
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    K = 60
    stacked = torch.stack((logits, torch.zeros_like(logits)), -1).unsqueeze(-2)  # each latent its own row
    z, log_q = fastvae.sample_concrete(stacked, lam, K, generator=gen(2))
    z = z[..., 0, 0]  # (K, b, L)
    torch_lp = td.RelaxedBernoulli(torch.tensor(lam, dtype=torch.float64, device=device), logits=logits).log_prob(z)
    inside = (z > 1e-6) & (z < 1 - 1e-6)
    assert inside.sum() >= 10 and torch.isfinite(log_q).all()
    torch.testing.assert_close(log_q[inside], torch_lp[inside], rtol=1e-7, atol=1e-7)
    record = fastvae.BinaryConcrete(logits, lam)
    z_rec, log_q_rec = record.rsample_with_log_q(K, gen(2), False)
    torch.testing.assert_close(z_rec, z, rtol=0, atol=0)
    torch.testing.assert_close(log_q_rec, log_q.sum(-1), rtol=1e-12, atol=1e-10)
    rows = inside.all(-1)
    torch.testing.assert_close(record.log_prob(z)[rows], log_q_rec[rows], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("prior_kind", ["relaxed", "bernoulli"])
@pytest.mark.parametrize("torch_object", [False, True], ids=["record", "torch"])
def test_binary_concrete_elbo_matches_handwritten(backend, torch_object, prior_kind):
    """The same noise by hand: the Monte Carlo KL against a RelaxedBernoulli prior
    (torch's log_prob), the analytic KL of the two Bernoullis (torch's
    kl_divergence) against a Bernoulli prior; kl_per_dim and free bits per latent."""
    _, device = backend
    x, W, logits = _binary_data(device)
    user_q = _binary_q(logits) if torch_object else fastvae.BinaryConcrete(logits, LAM)
    prior = _binary_prior(device, prior_kind)
    terms = fastvae.elbo_terms(x, user_q, _binary_decode(W), likelihood="bernoulli", n_samples=2, prior=prior,
                               generator=gen(7), reduction="sum")
    assert terms.kl_analytic == (prior_kind == "bernoulli")
    (grad,) = torch.autograd.grad(terms.bound, logits, retain_graph=True)
    z = _binary_z(philox_seed_of(7), 2, logits)
    assert z.shape == (2, B, L)
    rec = td.Independent(td.Bernoulli(logits=_binary_decode(W)(z)), 1).log_prob(x).mean(0)
    if prior_kind == "relaxed":
        per_dim = (_binary_q(logits).base_dist.log_prob(z) - prior.base_dist.log_prob(z)).mean(0)  # (B, L)
    else:
        per_dim = td.kl_divergence(td.Bernoulli(logits=logits), td.Bernoulli(probs=prior.base_dist.probs.expand(B, L)))
    kl = per_dim.sum(-1)
    bound = (rec - kl).sum()
    torch.testing.assert_close(terms.bound, bound, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl, kl.sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl_per_dim, per_dim.sum(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, torch.autograd.grad(bound, logits)[0], rtol=1e-8, atol=1e-10)
    lam = per_dim.mean(0).sort().values[:2].mean().item()  # between two latents' KLs: floors one
    floored = torch.clamp_min(per_dim.mean(0), lam).sum()
    fb = fastvae.elbo_terms(x, user_q, _binary_decode(W), likelihood="bernoulli", n_samples=2, prior=prior,
                            generator=gen(7), free_bits=lam)
    torch.testing.assert_close(fb.kl, floored, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_binary_concrete_iwae_matches_handwritten(backend, estimator):
    _, device = backend
    x, W, logits = _binary_data(device)
    prior = _binary_prior(device, "relaxed")
    bound = fastvae.iwae(x, _binary_q(logits), _binary_decode(W), k=4, likelihood="bernoulli",
                         estimator=estimator, prior=prior, generator=gen(3), reduction="sum")
    (grad,) = torch.autograd.grad(bound, logits, retain_graph=True)
    z = _binary_z(philox_seed_of(3), 4, logits)
    rec = td.Independent(td.Bernoulli(logits=_binary_decode(W)(z)), 1).log_prob(x)
    lw = rec + prior.log_prob(z) - _binary_q(logits).log_prob(z)
    value = torch.logsumexp(lw, 0) - math.log(4)
    if estimator == "iwae":
        surrogate = value
    else:
        lw_stop = rec + prior.log_prob(z) - _binary_q(logits.detach()).log_prob(z)
        v = torch.softmax(lw.detach(), 0)
        surrogate = ((v if estimator == "stl" else v * v) * lw_stop).sum(0)
    torch.testing.assert_close(bound, value.sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, torch.autograd.grad(surrogate.sum(), logits)[0], rtol=1e-7, atol=1e-10)


def test_binary_concrete_log_likelihood_matches_handwritten(backend):
    """log_likelihood at K = 7 with chunks of 3, a RelaxedBernoulli posterior and
    prior: the noise of sample k of example g at offset (g K + k) 2 L + 2 l + c."""
    _, device = backend
    x, W, logits = _binary_data(device)
    logits = logits.detach()
    K = 7
    offsets = torch.arange(B * K * L * 2).reshape(B, K, L, 2).transpose(0, 1).reshape(-1)
    z = _binary_z(philox_seed_of(4), K, logits, offsets)
    prior = _binary_prior(device, "relaxed")
    lw = (td.Independent(td.Bernoulli(logits=_binary_decode(W)(z)), 1).log_prob(x) + prior.log_prob(z)
          - _binary_q(logits).log_prob(z))
    expected = torch.logsumexp(lw, 0) - math.log(K)
    assert torch.isfinite(expected).all()
    for chunk in (3, 7):
        got = fastvae.log_likelihood(x, lambda _: _binary_q(logits), _binary_decode(W), k=K,
                                     likelihood="bernoulli", chunk_size=chunk, generator=gen(4), prior=prior)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    result = fastvae.evaluate([x], lambda _: fastvae.BinaryConcrete(logits, LAM), _binary_decode(W), k=K,
                              likelihood="bernoulli", generator=gen(4), prior=prior, progress=False)
    torch.testing.assert_close(result.per_example, expected, rtol=1e-10, atol=1e-10)


def test_binary_concrete_hard_is_straight_through(backend):
    """hard=True: the decoder gets z in {0, 1} (the relaxed z > 1/2), the gradient
    is the relaxed z's (z_hard + z - z.detach() by hand), the KL the Bernoullis'."""
    _, device = backend
    x, W, logits = _binary_data(device)
    prior = _binary_prior(device, "bernoulli")
    seen = []

    def decode(z):
        seen.append(z)
        return _binary_decode(W)(z)

    terms = fastvae.elbo_terms(x, fastvae.BinaryConcrete(logits, LAM, hard=True), decode, likelihood="bernoulli",
                               prior=prior, generator=gen(5), reduction="sum")
    assert terms.kl_analytic and seen[0].shape == (B, L) and ((seen[0] == 0) | (seen[0] == 1)).all()
    relaxed = _binary_z(philox_seed_of(5), 1, logits)[0]
    hard = (relaxed > 0.5).double()
    assert torch.equal(seen[0].detach(), hard)
    z = hard + relaxed - relaxed.detach()
    rec = td.Independent(td.Bernoulli(logits=_binary_decode(W)(z)), 1).log_prob(x)
    p = td.Bernoulli(probs=prior.base_dist.probs.expand(B, L))
    bound = (rec - td.kl_divergence(td.Bernoulli(logits=logits), p).sum(-1)).sum()
    torch.testing.assert_close(terms.bound, bound, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(terms.bound, logits)[0]
    torch.testing.assert_close(got, torch.autograd.grad(bound, logits)[0], rtol=1e-8, atol=1e-10)
    assert (got != 0).any()


def test_binary_concrete_hard_log_likelihood_takes_the_bernoulli_weights(backend):
    """hard=True with a Bernoulli prior: z = 1[relaxed z > 1/2] ~ Bernoulli(sigmoid(l)),
    weights log p(x|z) + sum_l log p(z_l) - log q(z_l) of the two Bernoulli pmfs."""
    _, device = backend
    x, W, logits = _binary_data(device)
    logits = logits.detach()
    prior = _binary_prior(device, "bernoulli")
    K = 7
    offsets = torch.arange(B * K * L * 2).reshape(B, K, L, 2).transpose(0, 1).reshape(-1)
    z = (_binary_z(philox_seed_of(4), K, logits, offsets) > 0.5).double()
    log_ratio = (prior.base_dist.log_prob(z) - td.Bernoulli(logits=logits).log_prob(z)).sum(-1)
    lw = td.Independent(td.Bernoulli(logits=_binary_decode(W)(z)), 1).log_prob(x) + log_ratio
    expected = torch.logsumexp(lw, 0) - math.log(K)
    got = fastvae.log_likelihood(x, lambda _: fastvae.BinaryConcrete(logits, LAM, hard=True), _binary_decode(W),
                                 k=K, likelihood="bernoulli", chunk_size=3, generator=gen(4), prior=prior)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_binary_concrete_elbo_agrees_with_torch_sampling_within_monte_carlo_error(backend):
    """fastvae's ELBO (its own noise) against torch's RelaxedBernoulli rsample +
    log_prob (torch's noise), 4000 samples each: |difference| < 3 standard errors
    plus 1e-3, three seeds."""
    _, device = backend
    x, W, logits = _binary_data(device)
    logits = logits.detach()
    prior = _binary_prior(device, "relaxed")
    n = 4000
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        terms = fastvae.elbo_terms(x, _binary_q(logits), _binary_decode(W), likelihood="bernoulli",
                                   n_samples=n, prior=prior, reduction="none")
        q = _binary_q(logits)
        z = q.rsample((n,))
        per = (td.Independent(td.Bernoulli(logits=_binary_decode(W)(z)), 1).log_prob(x) + prior.log_prob(z)
               - q.log_prob(z))
        se = per.std(0) * math.sqrt(2.0 / n)  # two independent means of n samples
        assert ((terms.bound - per.mean(0)).abs() < 3 * se + 1e-3).all(), (seed, terms.bound, per.mean(0), se)


def test_binary_concrete_errors_name_the_argument(backend):
    _, device = backend
    x, W, logits = _binary_data(device)
    bernoulli = _binary_prior(device, "bernoulli")
    with pytest.raises(ValueError, match="Bernoulli prior has no density at a relaxed z"):
        fastvae.iwae(x, _binary_q(logits), _binary_decode(W), likelihood="bernoulli", prior=bernoulli)
    with pytest.raises(ValueError, match="Bernoulli prior has no density at a relaxed z"):
        fastvae.log_likelihood(x, lambda _: _binary_q(logits.detach()), _binary_decode(W), k=3,
                               likelihood="bernoulli", prior=bernoulli)
    relaxed_categorical = td.RelaxedOneHotCategorical(torch.tensor(LAM, dtype=torch.float64, device=device),
                                                      logits=torch.zeros(L, CC, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="RelaxedOneHotCategorical prior takes the z .* of a Concrete posterior"):
        fastvae.iwae(x, _binary_q(logits), _binary_decode(W), likelihood="bernoulli", prior=relaxed_categorical)
    with pytest.raises(ValueError, match="BinaryConcrete posterior with hard=True takes a Bernoulli prior"):
        fastvae.elbo(x, fastvae.BinaryConcrete(logits, LAM, hard=True), _binary_decode(W), likelihood="bernoulli",
                     prior=_binary_prior(device, "relaxed"))
    with pytest.raises(ValueError, match="BinaryConcrete posterior with hard=True has no density"):
        fastvae.iwae(x, fastvae.BinaryConcrete(logits, LAM, hard=True), _binary_decode(W), likelihood="bernoulli",
                     prior=_binary_prior(device, "relaxed"))
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature must be"):
            fastvae.BinaryConcrete(logits, bad)
    with pytest.raises(ValueError, match="temperature must be"):
        fastvae.elbo(x, _binary_q(logits, 0.0), _binary_decode(W), likelihood="bernoulli")
    with pytest.raises(ValueError, match="logits must have a last"):
        fastvae.BinaryConcrete(torch.tensor(0.5, dtype=torch.float64), LAM)


@pytest.mark.parametrize("hard", [False, True])
def test_binary_concrete_reconstruction_probability_matches_handwritten(backend, hard):
    """log mean_k p(x | z_k) over the evaluation's noise layout (2 uniforms per latent), z (K, B, L)."""
    _, device = backend
    x, W, logits = _binary_data(device)
    logits = logits.detach()
    K = 6
    offsets = torch.arange(B * K * L * 2).reshape(B, K, L, 2).transpose(0, 1).reshape(-1)
    z = _binary_z(philox_seed_of(9), K, logits, offsets)
    if hard:
        z = (z > 0.5).double()
    rec = td.Independent(td.Bernoulli(logits=_binary_decode(W)(z)), 1).log_prob(x)
    expected = torch.logsumexp(rec, 0) - math.log(K)
    got = fastvae.reconstruction_probability(x, lambda _: fastvae.BinaryConcrete(logits, LAM, hard=hard),
                                             _binary_decode(W), n_samples=K, likelihood="bernoulli",
                                             generator=gen(9))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# -- every family without prior=; temperatures as torch takes them -------------------

C = 3  # the categories of the Concrete cases
_DEFAULT_CASES = ["normal", "tril", *FAMILIES, "lognormal", "logisticnormal", "exponential", "weibull", "kumaraswamy",
                  "concrete", "concrete-hard", "binary", "binary-hard"]


def _default_case(name, device):
    """(posterior, decode, what prior=None means in elbo: a prior, or the start of the ValueError)."""
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(B, L, generator=g, dtype=torch.float64) * 0.5).to(device).requires_grad_()
    b = (torch.randn(B, L, generator=g, dtype=torch.float64) * 0.3).to(device)
    W = (torch.randn(L * C, D, generator=g, dtype=torch.float64) * 0.5).to(device)
    zeros = torch.zeros(L, dtype=torch.float64, device=device)
    dec = _decode(W)
    normal = fastvae.priors.StandardNormal()
    if name == "normal":
        return td.Normal(a, b.exp()), dec, normal
    if name == "tril":
        return td.MultivariateNormal(a, scale_tril=torch.diag_embed(b.exp())), dec, normal
    if name in FAMILIES:
        return fastvae.LocationScale(name, a, b), dec, normal
    if name == "lognormal":
        return fastvae.LogNormal(a, b), dec, normal
    if name == "logisticnormal":
        return fastvae.LogisticNormal(a, b), dec, "prior: a LogisticNormal posterior's z lies on the simplex"
    if name in ("exponential", "weibull", "kumaraswamy"):
        return fastvae.Positive(name, a, None if name == "exponential" else b), dec, normal
    hard = name.endswith("hard")
    if name.startswith("concrete"):
        logits = (torch.randn(B, L, C, generator=g, dtype=torch.float64)).to(device).requires_grad_()
        q = fastvae.Concrete(logits, 0.5, hard=hard)
        return q, lambda z: z.flatten(-2) @ W, td.OneHotCategorical(logits=torch.zeros(C, dtype=torch.float64,
                                                                                         device=device))
    return fastvae.BinaryConcrete(a, 0.5, hard=hard), dec, td.Bernoulli(logits=zeros)


@pytest.mark.parametrize("name", _DEFAULT_CASES)
def test_every_family_without_a_prior(backend, name):
    """prior=None in elbo and iwae: N(0, I) where z lies in R^L or (0, inf)
    (the same bound as prior=StandardNormal(), value and gradient); the uniform
    categorical prior for a Concrete or BinaryConcrete in elbo (docs/latents.md);
    a ValueError saying which prior to pass where no default has a density at z
    (a LogisticNormal's simplex; iwae of a relaxed z; a one-hot z in iwae)."""
    _, device = backend
    x = _data(device)[0]
    q, dec, default = _default_case(name, device)
    leaf = q.logits if name.startswith("concrete") else q.binary_logits if name.startswith("binary") else \
        q.loc if isinstance(q, td.Distribution) else q.mu
    if isinstance(default, str):
        with pytest.raises(ValueError, match=default):
            fastvae.elbo(x, q, dec, likelihood="bernoulli")
    else:
        got = fastvae.elbo(x, q, dec, likelihood="bernoulli", n_samples=2, generator=gen(4))
        want = fastvae.elbo(x, q, dec, likelihood="bernoulli", n_samples=2, generator=gen(4), prior=default)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(got, leaf)[0], torch.autograd.grad(want, leaf)[0],
                                   rtol=0, atol=0)
    if name in ("concrete", "binary"):
        relaxed = "RelaxedOneHotCategorical" if name == "concrete" else "RelaxedBernoulli"
        with pytest.raises(ValueError, match=rf"prior: iwae of a relaxed \w+ posterior needs .* {relaxed}"):
            fastvae.iwae(x, q, dec, likelihood="bernoulli")
        with pytest.raises(ValueError, match=r"prior: log_likelihood / evaluate of a relaxed"):
            fastvae.log_likelihood(x, lambda x_: q, dec, k=4, likelihood="bernoulli")
    elif name.endswith("hard"):
        with pytest.raises(ValueError, match="hard=True has no density at its one-hot z"):
            fastvae.iwae(x, q, dec, likelihood="bernoulli")
        got = fastvae.log_likelihood(x, lambda x_: q, dec, k=4, likelihood="bernoulli", generator=gen(4))
        want = fastvae.log_likelihood(x, lambda x_: q, dec, k=4, likelihood="bernoulli", generator=gen(4),
                                      prior=default)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    elif isinstance(default, str):
        with pytest.raises(ValueError, match=default):
            fastvae.iwae(x, q, dec, likelihood="bernoulli")
    else:
        got = fastvae.iwae(x, q, dec, k=3, likelihood="bernoulli", generator=gen(4))
        want = fastvae.iwae(x, q, dec, k=3, likelihood="bernoulli", generator=gen(4), prior=default)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_gaussian_prior_passed_for_a_simplex_posterior_is_refused_by_name():
    x = _data("cpu")[0]
    q = fastvae.Concrete(torch.randn(B, L, C, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match=r"prior: a Concrete posterior's z lies on the simplex, where a "
                                         r"StandardNormal prior has no density; .*logits=torch.zeros\(3, 3\)"):
        fastvae.elbo(x, q, lambda z: z.flatten(-2) @ torch.ones(L * C, D, dtype=torch.float64), likelihood="bernoulli",
                     prior=fastvae.priors.StandardNormal())
    with pytest.raises(ValueError, match=r"prior: a LogisticNormal posterior.* a DiagonalNormal prior"):
        fastvae.iwae(x, fastvae.LogisticNormal(torch.zeros(B, L), torch.zeros(B, L)),
                     lambda z: z @ torch.ones(L + 1, D), likelihood="bernoulli",
                     prior=fastvae.DiagonalNormal(torch.zeros(L), torch.zeros(L)))


TEMPERATURES = [0.5, np.float32(0.3), np.float64(0.7), torch.tensor(0.5, dtype=torch.float64)]


@pytest.mark.parametrize("temperature", TEMPERATURES, ids=["float", "np.float32", "np.float64", "0-d tensor"])
@pytest.mark.parametrize("binary", [False, True], ids=["RelaxedOneHotCategorical", "RelaxedBernoulli"])
def test_temperatures_as_torch_takes_them(backend, binary, temperature):
    """A Python or NumPy float temperature, or a 0-d tensor, in torch's relaxed
    posteriors and priors and in fastvae's records: the values of a float64
    tensor temperature, in elbo and iwae (an annealing schedule's np.float32
    crashed before)."""
    _, device = backend
    x = _data(device)[0]
    g = torch.Generator().manual_seed(5)
    shape = (B, L) if binary else (B, L, C)
    logits = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    W = (torch.randn(L * C, D, generator=g, dtype=torch.float64) * 0.5).to(device)
    dec = _decode(W) if binary else (lambda z: z.flatten(-2) @ W)
    Relaxed, Record = (td.RelaxedBernoulli, fastvae.BinaryConcrete) if binary else (td.RelaxedOneHotCategorical,
                                                                                   fastvae.Concrete)
    exact = torch.tensor(float(temperature), dtype=torch.float64, device=device)
    lam = temperature.to(device) if isinstance(temperature, torch.Tensor) else temperature
    prior_logits = torch.zeros(shape[1:], dtype=torch.float64, device=device)
    for q, want_q in ((Relaxed(lam, logits=logits), Relaxed(exact, logits=logits)),
                      (Record(logits, lam), Record(logits, exact))):
        got = fastvae.elbo(x, q, dec, likelihood="bernoulli", generator=gen(1), prior=Relaxed(lam, logits=prior_logits))
        want = fastvae.elbo(x, want_q, dec, likelihood="bernoulli", generator=gen(1),
                            prior=Relaxed(exact, logits=prior_logits))
        assert torch.isfinite(got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        got = fastvae.iwae(x, q, dec, k=3, likelihood="bernoulli", generator=gen(1),
                           prior=Relaxed(lam, logits=prior_logits))
        want = fastvae.iwae(x, want_q, dec, k=3, likelihood="bernoulli", generator=gen(1),
                            prior=Relaxed(exact, logits=prior_logits))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if not binary:
        z, log_q = fastvae.sample_concrete(logits, lam, 2, generator=gen(1))
        z_ref, log_q_ref = fastvae.sample_concrete(logits, exact, 2, generator=gen(1))
        torch.testing.assert_close((z, log_q), (z_ref, log_q_ref), rtol=0, atol=0)


def _transform_case(name, device, batch, latent, prior_kind):
    """(x, W, mu, s, the prior as passed, the torch prior of the hand-written
    version, the tensors whose gradients are compared) in float64."""
    g = torch.Generator().manual_seed(11)
    M = latent + (name == "logisticnormal")
    x = (torch.rand(batch, 7, generator=g) < 0.5).double().to(device)
    W = (torch.randn(M, 7, generator=g, dtype=torch.float64) * 0.5).to(device).requires_grad_()
    mu = (torch.randn(batch, latent, generator=g, dtype=torch.float64) * 0.5).to(device).requires_grad_()
    s = (torch.rand(batch, latent, generator=g, dtype=torch.float64) * 0.8 + 0.3).to(device).requires_grad_()
    if prior_kind == "standard":
        p_loc, p_scale = torch.zeros(latent, dtype=torch.float64, device=device), \
            torch.ones(latent, dtype=torch.float64, device=device)
        wrt = (mu, s, W)
    else:  # a learned prior: tensor parameters with gradients
        p_loc = (0.3 * torch.randn(latent, generator=g, dtype=torch.float64)).to(device).requires_grad_()
        p_scale = (torch.rand(latent, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
        wrt = (mu, s, W, p_loc, p_scale)
    _, p = _normal_transform(name, p_loc, p_scale, True)
    prior = p if prior_kind != "record" else type(_normal_transform(name, p_loc, p_scale, False)[0])(
        p_loc, 2 * torch.log(p_scale))
    return x, W, mu, s, prior, p, wrt


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("prior_kind", ["standard", "tensor", "record"])
@pytest.mark.parametrize("batch,latent,K", [(5, 3, 1), (1, 7, 5), (3, 1, 5)])
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
@pytest.mark.parametrize("name", ["lognormal", "logisticnormal"])
def test_normal_transforms_through_their_normals(backend, name, objective, batch, latent, K, prior_kind,
                                                 reduction):
    """elbo and iwae of a LogNormal / LogisticNormal posterior against a prior
    of its family take the Gaussian's route on the underlying normals (the KL
    and the latent log-ratio of the normals, z = T(y) before the decoder):
    values and gradients (to q, the decoder and a learned prior) against a
    float64 torch.distributions objective on the same noise, and against the
    record's route (elbo_terms / iwae_terms, which keep it)."""
    _, device = backend
    x, W, mu, s, prior, p, wrt = _transform_case(name, device, batch, latent, prior_kind)
    user_q, q = _normal_transform(name, mu, s, True)
    decode = lambda z: z @ W  # noqa: E731
    y = mu + s * reference.sample_noise(philox_seed_of(4), K, mu.shape, torch.float64, "cpu").to(device)
    z = _transform(name, y)
    rec = td.Independent(td.Bernoulli(logits=decode(z)), 1).log_prob(x)
    if objective == "elbo":
        got = fastvae.elbo(x, user_q, decode, likelihood="bernoulli", n_samples=K, prior=prior, generator=gen(4),
                           reduction=reduction)
        old = fastvae.elbo_terms(x, user_q, decode, likelihood="bernoulli", n_samples=K, prior=prior,
                                 generator=gen(4), reduction=reduction).bound
        want = rec.mean(0) - td.kl_divergence(q, p)
    else:
        got = fastvae.iwae(x, user_q, decode, k=K, likelihood="bernoulli", prior=prior, generator=gen(4),
                           reduction=reduction)
        old = fastvae.iwae_terms(x, user_q, decode, k=K, likelihood="bernoulli", prior=prior, generator=gen(4),
                                 reduction=reduction).bound
        want = torch.logsumexp(rec + p.log_prob(z) - q.log_prob(z), 0) - math.log(K)
    want = {"none": want, "sum": want.sum(), "mean": want.mean()}[reduction]
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, old, rtol=1e-10, atol=1e-10)
    v = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad((got * v).sum(), wrt, retain_graph=True)  # a record prior's graph is shared
    for g_got, g_want, g_old in zip(grads, torch.autograd.grad((want * v).sum(), wrt, retain_graph=True),
                                    torch.autograd.grad((old * v).sum(), wrt)):
        assert torch.isfinite(g_got).all()
        torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g_got, g_old, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
@pytest.mark.parametrize("name", ["lognormal", "logisticnormal"])
def test_normal_transforms_through_their_normals_stop_score(backend, name, estimator):
    """STL and DReG on the normals' route: the encoder's gradient of the
    hand-written surrogate (q's score stopped, weights w~ or w~^2), the
    decoder's and a learned prior's the plain IWAE gradient's."""
    _, device = backend
    x, W, mu, s, prior, p, wrt = _transform_case(name, device, 4, 3, "tensor")
    user_q, q = _normal_transform(name, mu, s, True)
    decode = lambda z: z @ W  # noqa: E731
    bound = fastvae.iwae(x, user_q, decode, k=5, likelihood="bernoulli", estimator=estimator, prior=prior,
                         generator=gen(9), reduction="sum")
    y = mu + s * reference.sample_noise(philox_seed_of(9), 5, mu.shape, torch.float64, "cpu").to(device)
    z = _transform(name, y)
    rec = td.Independent(td.Bernoulli(logits=decode(z)), 1).log_prob(x)
    lw = rec + p.log_prob(z) - q.log_prob(z)
    torch.testing.assert_close(bound, (torch.logsumexp(lw, 0) - math.log(5)).sum(), rtol=1e-10, atol=1e-10)
    q_stop = _normal_transform(name, mu.detach(), s.detach(), True)[1]
    v = torch.softmax(lw.detach(), 0)
    c = v if estimator == "stl" else v * v
    encoder = (c * (rec + p.log_prob(z) - q_stop.log_prob(z))).sum()
    want = (*torch.autograd.grad(encoder, (mu, s), retain_graph=True),
            *torch.autograd.grad(torch.logsumexp(lw, 0).sum(), wrt[2:]))
    for got, expected in zip(torch.autograd.grad(bound, wrt), want):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_stick_breaking_matches_torch_and_differentiates_twice():
    """The decoder's z of a LogisticNormal (one node): torch's
    StickBreakingTransform, its gradient and its second derivative."""
    from fastvae.latents import stick_breaking

    y = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True) * 2
    y.retain_grad()
    torch.testing.assert_close(stick_breaking(y), td.transforms.StickBreakingTransform()(y), rtol=1e-12,
                               atol=1e-14)
    torch.autograd.gradcheck(stick_breaking, (y.detach().requires_grad_(),))
    torch.autograd.gradgradcheck(stick_breaking, (y.detach().requires_grad_(),))


@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiled_stick_breaking_gradient(compiler, dtype):
    """stick_breaking traced by Dynamo (the LogisticNormal's decoder input on
    the normals' route) has eager's gradient: its Function returns no tensor
    of a no-op cast, whose gradient torch 2.11's Dynamo lost (all zeros)."""
    from fastvae.latents import stick_breaking

    g = torch.Generator().manual_seed(3)
    y = torch.randn(3, 2, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = torch.randn(5, 3, generator=g, dtype=torch.float64).to(dtype)

    def f(y):
        return (stick_breaking(y) @ W).float().sin().sum()

    torch._dynamo.reset()
    want = torch.autograd.grad(f(y), y)[0]
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend=compiler)(y), y)[0]
    assert want.abs().min() > 0  # a gradient that the lost one (zeros) cannot match
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.quick_one  # a compile each (5-10 s); the quick tier compiles one, eager tests take every case
@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
@pytest.mark.parametrize("prior_kind", ["standard", "tensor"])
@pytest.mark.parametrize("name", ["lognormal", "logisticnormal"])
def test_compiled_normal_transforms_through_their_normals(backend, name, prior_kind):
    """torch.compile(fullgraph=True) of elbo and iwae on the normals' route,
    against eager, as the batch changes between calls (a recompile)."""
    _, device = backend
    torch._dynamo.reset()
    for batch in (4, 3):
        x, W, mu, s, prior, _, wrt = _transform_case(name, device, batch, 3, prior_kind)

        def loss(mu, s, W, prior=prior, x=x):
            q = _normal_transform(name, mu, s, True)[0]
            e = fastvae.elbo(x, q, lambda z: z @ W, likelihood="bernoulli", prior=prior)
            i = fastvae.iwae(x, q, lambda z: z @ W, k=3, likelihood="bernoulli", prior=prior, reduction="sum")
            return -(e + i)

        def run(f, mu=mu, s=s, W=W, wrt=wrt):
            torch.manual_seed(0)
            out = f(mu, s, W)
            return out, torch.autograd.grad(out, wrt)

        eager, eager_grads = run(loss)
        compiled, compiled_grads = run(torch.compile(loss, fullgraph=True))
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10)
        for a, b in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
@pytest.mark.parametrize("name", ["lognormal", "logisticnormal"])
def test_normal_transforms_through_their_normals_twice(backend, name, objective):
    """create_graph=True on the normals' route: the second derivative (a
    Hessian-vector product in q's parameters and a learned prior's) equals
    the record's route's (elbo_terms / iwae_terms)."""
    _, device = backend
    x, W, mu, s, prior, _, wrt = _transform_case(name, device, 3, 2, "tensor")
    user_q = _normal_transform(name, mu, s, True)[0]
    decode = lambda z: z @ W  # noqa: E731

    def hvp(f):
        value = f(x, user_q, decode, likelihood="bernoulli", prior=prior, generator=gen(2), reduction="sum",
                  **({"k": 3} if objective == "iwae" else {}))
        value = value if isinstance(value, Tensor) else value.bound
        grads = torch.autograd.grad(value, wrt, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), wrt)

    new = fastvae.elbo if objective == "elbo" else fastvae.iwae
    old = fastvae.elbo_terms if objective == "elbo" else fastvae.iwae_terms
    for a, b in zip(hvp(new), hvp(old)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["lognormal", "logisticnormal"])
def test_normal_transforms_through_their_normals_under_autocast(backend, name):
    """Under CPU autocast (a bfloat16 encoder) the normals' route gives the
    record's route's float32 bound and gradients."""
    _, device = backend
    if device != "cpu":
        pytest.skip("CPU autocast")
    g = torch.Generator().manual_seed(5)
    mu = (0.5 * torch.randn(4, 3, generator=g)).to(torch.bfloat16).requires_grad_()
    s = (torch.rand(4, 3, generator=g) + 0.4).to(torch.bfloat16).requires_grad_()
    W = torch.randn(3 + (name == "logisticnormal"), 6, generator=g).requires_grad_()
    x = (torch.rand(4, 6, generator=g) < 0.5).float()
    prior = _normal_transform(name, torch.full((3,), 0.2), torch.full((3,), 0.8), True)[1]
    for objective, old in ((fastvae.elbo, fastvae.elbo_terms), (fastvae.iwae, fastvae.iwae_terms)):
        got = []
        for f in (objective, old):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                v = f(x, _normal_transform(name, mu, s, True)[0], lambda z: z @ W, likelihood="bernoulli",
                      prior=prior, generator=gen(1))
            v = v if isinstance(v, Tensor) else v.bound
            assert v.dtype == torch.float32
            got.append((v, torch.autograd.grad(v, (mu, s, W))))
        (a, ga), (b, gb) = got
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for p, q in zip(ga, gb):
            assert p.dtype == q.dtype
            torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-2)


def test_a_learned_prior_of_parameters_takes_the_fused_draw(monkeypatch):
    """A learned prior's location held as an nn.Parameter (a module's) is a
    plain tensor to the kernels: a Laplace ELBO against it draws z and the
    closed-form KL fused, never through the general draw, with the values and
    gradients of the same prior made of plain tensors."""
    g = torch.Generator().manual_seed(0)
    B, L, D = 6, 4, 5
    x = (torch.rand(B, D, generator=g) > 0.5).double()
    W = torch.randn(L, D, generator=g, dtype=torch.float64)
    loc = torch.randn(B, L, generator=g, dtype=torch.float64)
    scale = torch.rand(B, L, generator=g, dtype=torch.float64) + 0.5
    p_loc, p_raw = torch.randn(L, generator=g, dtype=torch.float64), torch.randn(L, generator=g, dtype=torch.float64)

    def general_draw(*args, **kwargs):
        raise AssertionError("the general (unfused) draw was taken")

    monkeypatch.setattr(fastvae.latents._Latent, "sample_with_kl", general_draw)
    results = []
    for make in (torch.nn.Parameter, lambda t: t.clone().requires_grad_()):
        leaves = [make(t.clone()) for t in (loc, p_loc, p_raw)]
        prior = td.Laplace(leaves[1], torch.nn.functional.softplus(leaves[2]))
        bound = fastvae.elbo(x, td.Laplace(leaves[0], scale), _decode(W), likelihood="bernoulli", prior=prior,
                             generator=gen(3), reduction="sum")
        results.append([bound.detach(), *torch.autograd.grad(bound, leaves)])
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def _own_family_prior(family, form, dtype, learned, device):
    """A prior of the posterior's own family on ``device``: (a function that
    builds prior=, its parameters that may learn)."""
    g = torch.Generator().manual_seed(4)
    if family == "uniform":
        a, b = -3.0 - torch.rand(L, generator=g, dtype=dtype), 4.0 + torch.rand(L, generator=g, dtype=dtype)
    else:
        a, b = 0.3 * torch.randn(L, generator=g, dtype=dtype), 0.7 + torch.rand(L, generator=g, dtype=dtype)
    a, b = a.to(device), b.to(device)
    if form == "scalar":
        a, b = a[0].clone(), b[0].clone()
    a, b = a.requires_grad_(learned), b.requires_grad_(learned)

    def make():
        if form == "record" or family == "logistic":  # torch has no Logistic: fastvae's record
            width = b - a if family == "uniform" else b
            return fastvae.LocationScale(family, a.expand(L), torch.log(width).expand(L))
        d = TORCH_CLASS[family](a, b)
        return td.Independent(d, 1) if form == "independent" and d.batch_shape else d
    return make, (a, b)


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@pytest.mark.parametrize("form", ["independent", "plain", "scalar", "record"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_iwae_weights_from_the_sampler_equal_the_priors_log_prob(backend, monkeypatch, family, dtype, form,
                                                                        estimator, learned):
    """On the cpp backend a location-scale posterior's IWAE takes log q - log p
    of a prior of its own family ((L,) or () parameters: a torch object, an
    Independent of one, or the record) from the sampler's kernels: the same
    bound and gradients (q's, and a learned prior's) as the prior's own
    log_prob, for every estimator. DReG with a learned prior keeps log_prob
    (DReG scales the sampler's term, and the prior's gradient must not be)."""
    from fastvae import latents

    name, device = backend
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(B, D, generator=g) < 0.5).to(device, dtype)
    W = (0.5 * torch.randn(L, D, generator=g, dtype=dtype)).to(device)
    loc = (0.5 * torch.randn(B, L, generator=g, dtype=dtype)).to(device).requires_grad_()
    raw = torch.randn(B, L, generator=g, dtype=dtype).to(device).requires_grad_()
    make_prior, params = _own_family_prior(family, form, dtype, learned, device)
    fused = []
    real = latents.sample_location_scale_ratio_unchecked
    monkeypatch.setattr(latents, "sample_location_scale_ratio_unchecked",
                        lambda *args: fused.append(1) or real(*args))
    results = []
    for on in (True, False):
        monkeypatch.setattr(latents, "RATIO_IN_KERNELS", on)
        scale = torch.nn.functional.softplus(raw) + 0.1
        q = td.Uniform(loc, loc + scale) if family == "uniform" else fastvae.LocationScale(
            family, loc, torch.log(scale)) if family == "logistic" else TORCH_CLASS[family](loc, scale)
        bound = fastvae.iwae(x, q, lambda z: z @ W, k=3, likelihood="bernoulli", estimator=estimator,
                             prior=make_prior(), generator=gen(9), reduction="sum")
        leaves = (loc, raw, *params) if learned else (loc, raw)
        results.append((bound, *torch.autograd.grad(bound, leaves)))
    assert len(fused) == (name == "cpp" and not (estimator == "dreg" and learned))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("prior_kind", ["batch-shaped", "other dtype", "other family"])
def test_family_iwae_keeps_the_priors_log_prob_where_the_sampler_cannot_take_it(backend, monkeypatch, prior_kind):
    """A prior with a batch shape, of another dtype than q, or of another
    family goes through its own log_prob: the sampler's kernels take (L,)
    parameters of q's own family in q's dtype."""
    from fastvae import latents

    _, device = backend
    calls = []
    monkeypatch.setattr(latents, "sample_location_scale_ratio_unchecked", lambda *a: calls.append(1))
    x, W, loc, scale = _data(device)
    prior = {"batch-shaped": td.Laplace(torch.zeros(B, L, dtype=torch.float64, device=device), 1.0),
             "other dtype": td.Laplace(torch.zeros(L, device=device), torch.ones(L, device=device)),
             "other family": td.Cauchy(torch.zeros(L, dtype=torch.float64, device=device), 1.0)}[prior_kind]
    bound = fastvae.iwae(x, td.Laplace(loc, scale), _decode(W), k=2, likelihood="bernoulli", prior=prior)
    assert torch.isfinite(bound) and not calls


@pytest.mark.parametrize("validate", [True, False])
def test_a_uniform_priors_support_holds_with_the_samplers_weights(backend, monkeypatch, validate):
    """A z outside a torch Uniform prior's [low, high): where the prior
    validates its arguments, torch's own error, as its log_prob raises it;
    where not, a weight of 0 (log p = -inf), as its log_prob gives it."""
    from fastvae import latents

    _, device = backend
    x, W, loc, scale = _data(device)
    prior = td.Uniform(torch.full((L,), -0.2, dtype=torch.float64, device=device),
                       torch.full((L,), 0.2, dtype=torch.float64, device=device), validate_args=validate)
    q = td.Uniform(loc, loc + scale)  # loc ~ 0.5 N(0, 1), width 0.3-1.1: some z fall outside (-0.2, 0.2)
    results = []
    for on in (True, False):
        monkeypatch.setattr(latents, "RATIO_IN_KERNELS", on)
        if validate:
            with pytest.raises(ValueError, match="support"):
                fastvae.iwae(x, q, _decode(W), k=3, likelihood="bernoulli", prior=prior, generator=gen(2))
        else:
            results.append(fastvae.iwae_terms(x, q, _decode(W), k=3, likelihood="bernoulli", prior=prior,
                                              generator=gen(2)).log_weights)
    if not validate:
        assert torch.isneginf(results[0]).any() and torch.isfinite(results[0]).any()
        torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_log_likelihood_takes_its_weights_from_the_sampler(backend, monkeypatch, family):
    """fastvae.log_likelihood with a location-scale posterior and a prior of
    its own family: on the cpp backend the evaluation's draw takes log q -
    log p from the sampler's kernels (its layout's offsets, chunk by chunk),
    with the estimate of the prior's own log_prob."""
    from fastvae import latents

    _, device = backend
    x, W, loc, scale = _data(device)
    make_prior, _ = _own_family_prior(family, "independent", torch.float64, False, device)
    calls = []
    real = latents.location_scale_ratio_at
    monkeypatch.setattr(latents, "location_scale_ratio_at", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def encode(_):
        if family == "uniform":
            return td.Uniform(loc.detach(), (loc + scale).detach())
        if family == "logistic":
            return fastvae.LocationScale(family, loc.detach(), torch.log(scale).detach())
        return TORCH_CLASS[family](loc.detach(), scale.detach())

    results = []
    for on in (True, False):
        monkeypatch.setattr(latents, "RATIO_IN_KERNELS", on)
        results.append(fastvae.log_likelihood(x, encode, _decode(W), k=37, chunk_size=10, likelihood="bernoulli",
                                              prior=make_prior(), generator=gen(6)))
    assert bool(calls) == (backend[0] == "cpp")
    assert torch.isfinite(results[0]).all()
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
