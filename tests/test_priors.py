"""Posterior objects (DiagonalNormal, TrilNormal), priors (StandardNormal,
MixtureOfGaussians, VampPrior, a learned DiagonalNormal) and prior= in the
objectives and evaluation, against torch.distributions in float64 and against
models whose log p(x) is known in closed form."""
import math

import pytest
import torch
import torch.distributions as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvae
from fastvae.objectives import DREG_COMPILES
from fastvae.priors import MixtureOfGaussians, VampPrior

from conftest import INTERPRET
from helpers import assert_close, gen

F64 = torch.float64
main_process_only = pytest.mark.skipif(INTERPRET, reason="main-process tests (backend-independent)")


def random_tril(shape, L, g, spread=1.0):
    """Lower-triangular (…, L, L) with a positive diagonal in exp(±spread) and garbage (NaN) above it."""
    S = torch.randn(*shape, L, L, generator=g, dtype=F64).tril(-1) * 0.7
    diag = torch.exp((torch.rand(*shape, L, generator=g, dtype=F64) * 2 - 1) * spread)
    S = S + torch.diag_embed(diag)
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)
    return torch.where(upper, torch.full_like(S, math.nan), S)


# -- the objects against torch.distributions -----------------------------------------


@given(L=st.sampled_from([1, 2, 5, 33]), batch=st.sampled_from([(), (1,), (4,), (2, 3)]),
       K=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_diagonal_normal_log_prob_and_kl(backend, L, batch, K, seed):
    _, device = backend
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(*batch, L, generator=g, dtype=F64).requires_grad_()
    lv = ((torch.rand(*batch, L, generator=g, dtype=F64) * 2 - 1) * 5).requires_grad_()
    z = torch.randn(*((K,) if K else ()), *batch, L, generator=g, dtype=F64).requires_grad_()
    q = fastvae.DiagonalNormal(mu.to(device), lv.to(device))
    got = q.log_prob(z.to(device))
    want = dist.Independent(dist.Normal(mu, torch.exp(0.5 * lv)), 1).log_prob(z)
    scale = 1 + (0.5 * (z - mu) ** 2 * torch.exp(-lv) + lv.abs()).sum(-1)
    assert_close(got, want, scale, "log_prob")
    for a, b in zip(torch.autograd.grad(got.sum(), (mu, lv, z)), torch.autograd.grad(want.sum(), (mu, lv, z))):
        assert_close(a, b, 1 + b.abs() + torch.exp(-lv).expand_as(b), "log_prob gradient")
    pm, plv = torch.randn(L, generator=g, dtype=F64), torch.randn(L, generator=g, dtype=F64)
    prior = fastvae.DiagonalNormal(pm.to(device), plv.to(device))  # the oracle keeps the CPU copies
    kl = fastvae.priors.analytic_kl(q, prior)
    want_kl = dist.kl_divergence(dist.Independent(dist.Normal(mu, torch.exp(0.5 * lv)), 1),
                                 dist.Independent(dist.Normal(pm, torch.exp(0.5 * plv)), 1))
    assert_close(kl, want_kl, 1 + want_kl.abs() + torch.exp(lv - plv).sum(-1), "diag-diag KL")


@given(L=st.sampled_from([1, 2, 5, 17]), batch=st.sampled_from([(), (1,), (4,), (2, 3)]),
       K=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_tril_normal_log_prob_and_kls(L, batch, K, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(*batch, L, generator=g, dtype=F64).requires_grad_()
    S = random_tril(batch, L, g).requires_grad_()
    z = torch.randn(*((K,) if K else ()), *batch, L, generator=g, dtype=F64)
    q = fastvae.TrilNormal(mu, S)
    mvn = dist.MultivariateNormal(mu, scale_tril=S.tril())
    got, want = q.log_prob(z), mvn.log_prob(z)
    assert_close(got, want, 1 + want.abs() + (z * z).sum(-1), "tril log_prob")
    ga = torch.autograd.grad(got.sum(), (mu, S))
    gb = torch.autograd.grad(want.sum(), (mu, S))
    for a, b in zip(ga, gb):
        assert_close(a, b, 10 + b.abs(), "tril log_prob gradient")  # NaN in S's upper triangle reaches neither
    assert (ga[1].triu(1) == 0).all()  # the strict upper triangle is never read
    # against the standard normal and against a diagonal prior, in closed form
    std = dist.MultivariateNormal(torch.zeros(L, dtype=F64), scale_tril=torch.eye(L, dtype=F64))
    want_kl = dist.kl_divergence(mvn, std)
    assert_close(q.kl_standard_normal(), want_kl, 1 + want_kl.abs() + (S.tril() ** 2).sum((-2, -1)),
                 "tril-standard KL")
    pm, plv = torch.randn(L, generator=g, dtype=F64), torch.randn(L, generator=g, dtype=F64)
    kl = fastvae.priors.analytic_kl(q, fastvae.DiagonalNormal(pm, plv))
    want_kl = dist.kl_divergence(mvn, dist.MultivariateNormal(pm, scale_tril=torch.diag(torch.exp(0.5 * plv))))
    assert_close(kl, want_kl, 1 + want_kl.abs() + ((S.tril() ** 2).sum(-1) * torch.exp(-plv)).sum(-1),
                 "tril-diag KL")
    for a, b in zip(torch.autograd.grad(kl.sum(), (mu, S)), torch.autograd.grad(want_kl.sum(), (mu, S))):
        assert_close(a, b.tril() if b.dim() > mu.dim() else b, 1 + b.abs(), "tril-diag KL gradient")


@main_process_only
def test_objects_reject_bad_input():
    mu = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="shape mismatch: mu has shape \\(3, 4\\)"):
        fastvae.DiagonalNormal(mu, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="scale_tril must have shape \\(3, 4, 4\\)"):
        fastvae.TrilNormal(mu, torch.zeros(3, 4))
    with pytest.raises(TypeError, match="mu must be"):
        fastvae.DiagonalNormal([0.0], torch.zeros(1))
    with pytest.raises(ValueError, match="must end in the latent size 4"):
        fastvae.DiagonalNormal(mu, mu).log_prob(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="shape mismatch: means has shape \\(2, 3\\)"):
        MixtureOfGaussians(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="logits must have shape \\(2,\\)"):
        MixtureOfGaussians(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="pseudo_inputs must be a batch"):
        VampPrior(lambda x: x, torch.zeros(5))
    with pytest.raises(TypeError, match="encode must be callable"):
        VampPrior(3, torch.zeros(5, 2))
    x = torch.zeros(3, 6)
    decode = lambda z: z.new_zeros(*z.shape[:-1], 6)  # noqa: E731
    # a torch Normal is a prior (tests/test_latents.py); other objects are not
    with pytest.raises(TypeError, match="prior must be fastvae.priors.StandardNormal"):
        fastvae.elbo(x, mu, mu, decode, likelihood="gaussian", prior="normal")
    with pytest.raises(ValueError, match="a DiagonalNormal prior has shape \\(L,\\)"):
        fastvae.elbo(x, mu, mu, decode, likelihood="gaussian", prior=fastvae.DiagonalNormal(mu, mu))
    with pytest.raises(ValueError, match="over 2 latent dimensions, the posterior over 4"):
        fastvae.iwae(x, mu, mu, decode, likelihood="gaussian", prior=fastvae.DiagonalNormal(mu[0, :2], mu[0, :2]))
    S = torch.eye(4).expand(3, 4, 4)
    with pytest.raises(ValueError, match="free_bits needs the KL of each latent dimension"):
        fastvae.elbo(x, fastvae.TrilNormal(mu, S), decode, likelihood="gaussian", free_bits=0.1)
    with pytest.raises(TypeError, match="VampPrior needs a diagonal encoder"):
        VampPrior(lambda u: fastvae.TrilNormal(u[:, :4], S[: u.shape[0]]), torch.zeros(3, 6)).log_prob(mu)


# -- a linear-Gaussian model with a full-covariance exact posterior -----------------------


def linear_gaussian(B=6, D=5, L=3, sigma=0.7, seed=0, device="cpu"):
    """z ~ N(0, I), x | z ~ N(W z + b, sigma^2 I) with a W whose posterior
    covariance (I + W^T W / sigma^2)^-1 is far from diagonal. Returns x, exact
    log p(x), the exact posterior as a TrilNormal encoder, and the decoder, on
    ``device`` (computed on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, L, generator=g, dtype=F64)
    b = torch.randn(D, generator=g, dtype=F64)
    x = torch.randn(B, L, generator=g, dtype=F64) @ W.T + b + sigma * torch.randn(B, D, generator=g, dtype=F64)
    exact = dist.MultivariateNormal(b, W @ W.T + sigma**2 * torch.eye(D, dtype=F64)).log_prob(x)
    cov = torch.linalg.inv(torch.eye(L, dtype=F64) + W.T @ W / sigma**2)
    S = torch.linalg.cholesky(cov)
    W, b, x, exact, cov, S = (t.to(device) for t in (W, b, x, exact, cov, S))

    def encode(xx):
        return fastvae.TrilNormal((xx - b) @ W @ cov.T / sigma**2, S.expand(xx.shape[0], L, L))

    def decode(z):
        return z @ W.T + b, torch.full((D,), 2 * math.log(sigma), dtype=F64, device=device)

    return x, exact, encode, decode, cov


@pytest.mark.parametrize("estimator", ["iwae", "dreg", "stl"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_exact_full_covariance_posterior_gives_log_px(backend, estimator, alpha):
    """With q the exact (full-covariance) posterior every log-weight is log p(x): every
    estimator returns it exactly, and STL / DReG give the encoder a zero gradient."""
    _, device = backend
    x, exact, encode, decode, cov = linear_gaussian(device=device)
    assert (cov - torch.diag(torch.diagonal(cov))).abs().max() > 0.05  # not diagonal
    q = encode(x)
    mu = q.mu.detach().requires_grad_()
    S = q.scale_tril.detach().clone().requires_grad_()
    for k in (1, 7):
        bound = fastvae.iwae(x, fastvae.TrilNormal(mu, S), decode, k=k, likelihood="gaussian",
                             estimator=estimator, alpha=alpha, reduction="none", generator=gen(k))
        assert_close(bound, exact, 100 * (1 + exact.abs()), f"{estimator} k={k}")
        if estimator != "iwae":
            dmu, dS = torch.autograd.grad(bound.sum(), (mu, S))
            assert dmu.abs().max() < 1e-9 and dS.abs().max() < 1e-9, (dmu.abs().max(), dS.abs().max())
    torch_q = dist.MultivariateNormal(q.mu, scale_tril=q.scale_tril)  # the torch posterior maps to the same path
    same = fastvae.iwae(x, torch_q, decode, k=3, likelihood="gaussian", reduction="none", generator=gen(1))
    assert_close(same, exact, 100 * (1 + exact.abs()), "MultivariateNormal posterior")


def test_exact_full_covariance_posterior_in_evaluation(backend):
    _, device = backend
    x, exact, encode, decode, _ = linear_gaussian(B=9, device=device)
    for chunk in (1, 4, None):
        stats = fastvae.log_likelihood(x, encode, decode, k=10, chunk_size=chunk, likelihood="gaussian",
                                       generator=gen(0), return_stats=True)
        assert_close(stats.log_likelihood, exact, 100 * (1 + exact.abs()), f"log_likelihood chunk={chunk}")
        assert (stats.ess - 10).abs().max() < 1e-9
    result = fastvae.evaluate([x[:4], x[4:]], encode, decode, k=6, likelihood="gaussian", generator=gen(0),
                              progress=False)
    assert_close(result.per_example, exact, 100 * (1 + exact.abs()), "evaluate")


@pytest.mark.parametrize("dtype, log_scale", [(torch.float32, -1.0), (torch.float32, -12.0), (torch.float32, -20.0),
                                               (torch.float64, -50.0)])
def test_diagonal_tril_matches_the_diagonal_path_at_tiny_scales(backend, dtype, log_scale):
    """A diagonal TrilNormal draws the diagonal path's eps; log q from a
    triangular solve of z - mu would lose z's bits: 0.033 nats off at S_ii =
    e^-12 in float32, 2.9 at e^-20 (float64: 2.9 at e^-50), in iwae and in
    elbo's Monte Carlo KL (mixture prior, VampPrior). So log q comes from eps:
    the same bound and gradients as (mu, logvar = 2 log S_ii)."""
    name, device = backend
    g = torch.Generator().manual_seed(0)
    B, L, D = 4, 3, 6
    W = torch.randn(L, D, generator=g, dtype=F64).to(device, dtype)
    x = torch.randn(B, D, generator=g, dtype=F64).to(device, dtype)
    mu0 = (torch.randn(B, L, generator=g, dtype=F64) * 3).to(device, dtype)
    lv0 = torch.full((B, L), 2 * log_scale, dtype=dtype, device=device)
    means, logvars = torch.randn(5, L, generator=g, dtype=F64).to(device, dtype), torch.zeros(5, L, device=device,
                                                                                                  dtype=dtype)
    pseudo = torch.randn(2, D, generator=g, dtype=F64).to(device, dtype)
    priors = {"mixture": MixtureOfGaussians(means, logvars),
              "vamp": VampPrior(lambda u: (u @ W.T[:, :L] * 0.1, torch.zeros(u.shape[0], L, device=device,
                                                                                dtype=dtype)), pseudo)}

    def bound(tril, key):
        mu, lv = mu0.clone().requires_grad_(), lv0.clone().requires_grad_()
        # logvar's gradient through S = diag(exp(logvar / 2)): the same parameters in both
        args = (fastvae.TrilNormal(mu, torch.diag_embed(torch.exp(0.5 * lv))),) if tril else (mu, lv)
        if key in priors:
            v = fastvae.elbo(x, *args, lambda z: z @ W, likelihood="gaussian", n_samples=3, prior=priors[key],
                             reduction="sum", generator=gen(3))
        else:
            v = fastvae.iwae(x, *args, lambda z: z @ W, k=7, likelihood="gaussian", estimator=key,
                             reduction="sum", generator=gen(3))
        return (v, *torch.autograd.grad(v, (mu, lv)))

    for key in ("iwae", "dreg", "stl", *priors):
        for i, (a, b) in enumerate(zip(bound(True, key), bound(False, key))):
            assert torch.isfinite(a).all(), (name, key, i)
            # STL's and DReG's dmu sums the score's terms c_k eps_k / S_ii (sum_k c_k <= 1, |eps| < 4)
            terms = 4 * math.exp(-log_scale) if key in ("dreg", "stl") and i == 1 else 0.0
            assert_close(a, b, 1 + b.abs() + terms,
                         f"{name} {key} {('bound', 'dmu', 'dlogvar')[i]} at S_ii = e^{log_scale}")


@main_process_only
def test_full_covariance_evaluation_draws_the_diagonal_noise():
    """A TrilNormal with a diagonal factor draws the same z as (mu, logvar), in evaluation too."""
    g = torch.Generator().manual_seed(5)
    B, L, D = 4, 3, 6
    mu, lv = torch.randn(B, L, generator=g, dtype=F64), torch.randn(B, L, generator=g, dtype=F64)
    W = torch.randn(L, D, generator=g, dtype=F64)
    x = torch.randn(B, D, generator=g, dtype=F64)

    def decode(z):
        return z @ W

    tril = fastvae.TrilNormal(mu, torch.diag_embed(torch.exp(0.5 * lv)))
    for fn in (fastvae.log_likelihood, fastvae.reconstruction_probability):
        kw = dict(k=11) if fn is fastvae.log_likelihood else dict(n_samples=11)
        a = fn(x, lambda _: (mu, lv), decode, likelihood="gaussian", generator=gen(3), chunk_size=3, **kw)
        b = fn(x, lambda _: tril, decode, likelihood="gaussian", generator=gen(3), chunk_size=3, **kw)
        assert_close(b, a, 1 + a.abs(), fn.__name__)


# -- priors in the objectives ---------------------------------------------------------


@main_process_only
def test_learned_diagonal_prior_in_every_objective():
    """A DiagonalNormal prior: the ELBO's KL is the closed form, the IWAE weights use
    log p(z); both equal a hand computation with torch.distributions and the same z."""
    g = torch.Generator().manual_seed(2)
    B, L, D = 5, 3, 4
    x = torch.randn(B, D, generator=g, dtype=F64)
    mu, lv = torch.randn(B, L, generator=g, dtype=F64), torch.randn(B, L, generator=g, dtype=F64)
    pm = torch.randn(L, generator=g, dtype=F64).requires_grad_()
    plv = torch.randn(L, generator=g, dtype=F64).requires_grad_()
    W = torch.randn(L, D, generator=g, dtype=F64)
    prior = fastvae.DiagonalNormal(pm, plv)

    def decode(z):
        return z @ W

    terms = fastvae.elbo_terms(x, mu, lv, decode, likelihood="gaussian", prior=prior, reduction="none",
                               generator=gen(4))
    assert terms.kl_analytic
    q_t = dist.Independent(dist.Normal(mu, torch.exp(0.5 * lv)), 1)
    p_t = dist.Independent(dist.Normal(pm, torch.exp(0.5 * plv)), 1)
    want_kl = dist.kl_divergence(q_t, p_t)
    assert_close(terms.kl, want_kl, 1 + want_kl.abs(), "kl")
    assert_close(terms.kl_per_dim.sum(-1), want_kl, 1 + want_kl.abs(), "kl_per_dim")
    z = fastvae.sample_normal(mu, lv, 6, generator=gen(5))[0]
    lw = fastvae.gaussian_log_prob(x, decode(z)) + p_t.log_prob(z) - q_t.log_prob(z)
    want = torch.logsumexp(lw, 0) - math.log(6)
    got = fastvae.iwae(x, mu, lv, decode, k=6, likelihood="gaussian", prior=prior, reduction="none",
                       generator=gen(5))
    assert_close(got, want, 1 + lw.abs().max(0).values, "iwae with a learned prior")
    ga = torch.autograd.grad(got.sum(), (pm, plv))
    gb = torch.autograd.grad(want.sum(), (pm, plv))
    for a, b in zip(ga, gb):
        assert_close(a, b, 1 + b.abs(), "prior gradient")


# -- mixture priors -------------------------------------------------------------------------


def mixture_model(B=5, D=4, L=2, U=3, sigma=0.6, seed=0, device="cpu"):
    """z ~ sum_u pi_u N(m_u, diag(v_u)), x | z ~ N(W z + b, sigma^2 I): p(x) is the
    Gaussian mixture sum_u pi_u N(x; W m_u + b, W diag(v_u) W^T + sigma^2 I).
    Everything it returns lives on ``device`` (computed on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, L, generator=g, dtype=F64)
    b = torch.randn(D, generator=g, dtype=F64)
    means = torch.randn(U, L, generator=g, dtype=F64) * 2
    logvars = torch.randn(U, L, generator=g, dtype=F64) * 0.5 - 1
    logits = torch.randn(U, generator=g, dtype=F64)
    u = torch.multinomial(torch.softmax(logits, 0), B, replacement=True, generator=g)
    z = means[u] + torch.exp(0.5 * logvars[u]) * torch.randn(B, L, generator=g, dtype=F64)
    x = z @ W.T + b + sigma * torch.randn(B, D, generator=g, dtype=F64)
    covs = W @ torch.diag_embed(torch.exp(logvars)) @ W.T + sigma**2 * torch.eye(D, dtype=F64)
    px = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.MultivariateNormal(means @ W.T + b, covs))
    # a proposal: the exact posterior under one broad Gaussian prior N(0, 4 I), diagonal part
    cov_q = torch.linalg.inv(torch.eye(L, dtype=F64) / 4 + W.T @ W / sigma**2)
    log_px = px.log_prob(x)
    W, b, means, logvars, logits, x, log_px, cov_q = (
        t.to(device) for t in (W, b, means, logvars, logits, x, log_px, cov_q))

    def encode(xx):
        return (xx - b) @ W @ cov_q.T / sigma**2, torch.log(torch.diagonal(cov_q)).expand(xx.shape[0], L)

    def decode(zz):
        return zz @ W.T + b, torch.full((D,), 2 * math.log(sigma), dtype=F64, device=device)

    prior = MixtureOfGaussians(means, logvars, logits)
    torch_prior = dist.MixtureSameFamily(dist.Categorical(logits=logits),
                                         dist.Independent(dist.Normal(means, torch.exp(0.5 * logvars)), 1))
    return x, log_px, encode, decode, prior, torch_prior


@pytest.mark.full_interpreted  # a convergence, 8 s interpreted; the cpp backend's in the quick tier
def test_mixture_prior_iwae_converges_to_the_closed_form(backend):
    """Under a Gaussian-mixture prior p(x) is a closed-form mixture: the IWAE estimate
    rises toward it as K grows and is within its Monte Carlo error at K = 5000."""
    _, device = backend
    x, exact, encode, decode, prior, _ = mixture_model(device=device)

    def worse(xx):  # a shifted, inflated proposal: a loose bound at small K
        mu, lv = encode(xx)
        return mu + 0.5, lv + 1.0

    gaps = []
    for K in (1, 30, 5000):
        stats = fastvae.log_likelihood(x, worse, decode, k=K, likelihood="gaussian", prior=prior,
                                       generator=gen(K), return_stats=True)
        gaps.append((exact - stats.log_likelihood).mean().item())
    assert gaps[0] > 1.0 and gaps[0] > gaps[1] > gaps[2], gaps
    # at K = 5000 every example is within its Monte Carlo error of the closed form
    err = (exact - stats.log_likelihood).abs()
    assert (err <= 4 * stats.stderr + 0.01).all(), (err, stats.stderr)
    assert abs(gaps[2]) < 0.02 * gaps[0]


@main_process_only
def test_mixture_prior_objectives_match_torch_distributions():
    """elbo (Monte Carlo KL) and every IWAE estimator under a mixture prior equal the
    same formulas written with torch.distributions on the same z; the prior's
    parameters get the plain IWAE gradient from every estimator."""
    x, _, encode, decode, prior, torch_prior = mixture_model(B=4)
    mu, lv = encode(x)
    means, logvars, logits = (t.clone().requires_grad_() for t in prior.components())
    learned = MixtureOfGaussians(means, logvars, logits)
    p_t = dist.MixtureSameFamily(dist.Categorical(logits=logits),
                                 dist.Independent(dist.Normal(means, torch.exp(0.5 * logvars)), 1))
    q_t = dist.Independent(dist.Normal(mu, torch.exp(0.5 * lv)), 1)

    def log_px_z(z):
        m, v = decode(z)
        return dist.Independent(dist.Normal(m, torch.exp(0.5 * v)), 1).log_prob(x)

    terms = fastvae.elbo_terms(x, mu, lv, decode, likelihood="gaussian", prior=learned, n_samples=3,
                               reduction="none", generator=gen(1))
    z = fastvae.sample_normal(mu, lv, 3, generator=gen(1))[0]
    assert not terms.kl_analytic and terms.kl_per_dim is None
    want_kl = (q_t.log_prob(z) - p_t.log_prob(z)).mean(0)
    assert_close(terms.kl, want_kl, 1 + want_kl.abs(), "Monte Carlo KL")
    assert_close(terms.bound, log_px_z(z).mean(0) - want_kl, 1 + terms.bound.abs(), "elbo")
    z = fastvae.sample_normal(mu, lv, 5, generator=gen(2))[0]
    want = torch.logsumexp(log_px_z(z) + p_t.log_prob(z) - q_t.log_prob(z), 0) - math.log(5)
    plain = None
    for estimator in ("iwae", "dreg", "stl"):
        got = fastvae.iwae(x, mu, lv, decode, k=5, likelihood="gaussian", prior=learned, estimator=estimator,
                           reduction="none", generator=gen(2))
        assert_close(got, want, 1 + want.abs(), estimator)
        grads = torch.autograd.grad(got.sum(), (means, logvars, logits))
        if plain is None:
            plain = torch.autograd.grad(want.sum(), (means, logvars, logits))
        for a, b in zip(grads, plain):
            assert_close(a, b, 1 + b.abs(), f"{estimator}: prior gradient")


@main_process_only
def test_vampprior_is_the_encoders_mixture_and_learns_its_pseudo_inputs():
    g = torch.Generator().manual_seed(3)
    D, L, U, B = 6, 3, 4, 5
    enc = torch.nn.Linear(D, 2 * L).double()
    pseudo = torch.nn.Parameter(torch.randn(U, D, generator=g, dtype=F64))
    x = torch.randn(B, D, generator=g, dtype=F64)
    W = torch.randn(L, D, generator=g, dtype=F64)

    def encode(xx):
        return tuple(enc(xx).chunk(2, -1))

    prior = VampPrior(lambda xx: fastvae.DiagonalNormal(*encode(xx)), pseudo)
    z = torch.randn(7, B, L, generator=g, dtype=F64)
    pm, plv = encode(pseudo)
    p_t = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(U, dtype=F64)),
                                 dist.Independent(dist.Normal(pm, torch.exp(0.5 * plv)), 1))
    got, want = prior.log_prob(z), p_t.log_prob(z)
    assert_close(got, want, 1 + want.abs(), "VampPrior log_prob")
    params = (pseudo, enc.weight, enc.bias)
    for a, b in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
        assert_close(a, b, 1 + b.abs(), "VampPrior gradient")
    loss = -fastvae.elbo(x, *encode(x), lambda zz: zz @ W, likelihood="gaussian", prior=prior)
    loss.backward()
    assert pseudo.grad is not None and pseudo.grad.abs().sum() > 0 and pseudo.grad.isfinite().all()
    samples = prior.sample(1000, generator=gen(0))
    assert samples.shape == (1000, L) and samples.isfinite().all()


@main_process_only
def test_priors_and_tril_posterior_compile_without_graph_breaks():
    torch.manual_seed(0)
    B, L, D, U = 8, 3, 5, 4
    x = torch.randn(B, D)
    enc, dec = torch.nn.Linear(D, 2 * L), torch.nn.Linear(L, D)
    means, lvs = torch.nn.Parameter(torch.randn(U, L)), torch.nn.Parameter(torch.zeros(U, L))

    def step(x):
        mu, lv = enc(x).chunk(2, -1)
        q = fastvae.TrilNormal(mu, torch.diag_embed(torch.exp(0.5 * lv)))
        prior = MixtureOfGaussians(means, lvs)
        return (fastvae.elbo(x, q, dec, likelihood="gaussian", prior=prior)
                + fastvae.iwae(x, mu, lv, dec, k=4, likelihood="gaussian", prior=prior,
                               estimator="dreg" if DREG_COMPILES else "stl"))  # DReG compiles from torch 2.13

    params = (means, lvs, *enc.parameters())
    torch.manual_seed(1)
    eager = step(x)
    g_eager = torch.autograd.grad(eager, params)
    torch.manual_seed(1)
    compiled = torch.compile(step, fullgraph=True)(x)
    for a, b in zip(torch.autograd.grad(compiled, params), g_eager):
        assert_close(a, b, 1 + b.abs(), "compiled gradient")
    assert_close(compiled, eager, 1 + eager.abs(), "compiled value")


@pytest.mark.quick_one  # a compile each (15 s); one proves the mechanism
@main_process_only
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_a_diagonal_prior_compiles_to_eagers_bound_as_shapes_change(objective, monkeypatch):
    """Under torch.compile a diagonal prior's KL (elbo) and log-ratio to N(0, I)
    (iwae) are torch expressions Inductor fuses, not the fused ops eager
    calls: the compiled bound and its gradients (the prior's included) are
    eager's, on a learned (L,) prior and on a per-example one, as the batch
    and the latent size change between calls; and the KL is the float64
    closed form."""
    torch.manual_seed(0)

    def loss(x, a, b, p_loc, p_scale):
        q = dist.Normal(a, torch.nn.functional.softplus(b) + 1e-3)
        prior = dist.Normal(p_loc, p_scale)
        if objective == "elbo":
            return fastvae.elbo(x, q, lambda z: 1.5 * z - 0.25, likelihood="bernoulli", prior=prior)
        return fastvae.iwae(x, q, lambda z: 1.5 * z - 0.25, k=3, likelihood="bernoulli", prior=prior)

    compiled = torch.compile(loss, fullgraph=True)
    for B, L, per_example in ((7, 5, False), (1, 3, False), (12, 5, True)):
        x = (torch.rand(B, L) < 0.5).float()
        a, b = torch.randn(B, L, requires_grad=True), torch.randn(B, L, requires_grad=True)
        shape = (B, L) if per_example else (L,)
        p_loc = torch.randn(shape, requires_grad=True)
        p_scale = (torch.rand(shape) + 0.5).requires_grad_()
        params = (a, b, p_loc, p_scale)
        torch.manual_seed(3)  # the same Philox seed drawn by both
        want = loss(x, *params)
        torch.manual_seed(3)
        got = compiled(x, *params)
        assert_close(got, want, 1 + want.abs(), "compiled bound")
        for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            assert g.isfinite().all()
            assert_close(g, w, 1 + w.abs(), "compiled gradient")
    # The compiled path's KL, called directly: the float64 KL, and half
    # precision widened to float32 as the fused op's output is.
    from fastvae import _backend
    from fastvae.priors import analytic_kl

    mu, lv, pm, plv = (torch.randn(4, 6, dtype=torch.float64) for _ in range(4))
    monkeypatch.setattr(_backend, "compiling", lambda: True)
    got = analytic_kl(fastvae.DiagonalNormal(mu.float(), lv.float()),
                      fastvae.DiagonalNormal(pm[0].float(), plv[0].float()))
    want = dist.kl_divergence(dist.Normal(mu, (0.5 * lv).exp()), dist.Normal(pm[0], (0.5 * plv[0]).exp())).sum(-1)
    assert got.dtype == torch.float32
    assert_close(got, want.float(), 1 + want.float().abs(), "KL terms")
    half = analytic_kl(fastvae.DiagonalNormal(mu.half(), lv.half()), fastvae.DiagonalNormal(pm.half(), plv.half()))
    assert half.dtype == torch.float32 and half.isfinite().all()

def test_a_scalar_torch_normal_prior_follows_the_posteriors_device():
    """prior=torch.distributions.Normal(0.0, 1.0) holds 0-d CPU tensors, which
    torch's arithmetic lets meet tensors on any device: its DiagonalNormal
    takes the posterior's device (with CUDA latents it was CPU, and the KL
    failed with a device mismatch on an H200). Parameters of shape (L,) stay
    where they are: torch would not move them either."""
    from fastvae.priors import check_prior

    meta = torch.device("meta")
    p = check_prior(dist.Normal(0.0, 1.0), 3, meta)
    assert isinstance(p, fastvae.DiagonalNormal) and p.mu.device == p.logvar.device == meta
    assert p.mu.shape == (3,)
    p = check_prior(dist.Independent(dist.Normal(torch.zeros(3), torch.ones(3)), 1), 3, meta)
    assert p.mu.device.type == "cpu"
    assert check_prior(dist.Normal(0.0, 1.0), 3).mu.device.type == "cpu"  # no posterior device: as given


def _location_scale_prior(family, shape, dtype, requires_grad=False, independent=False):
    g = torch.Generator().manual_seed(len(family) + len(shape))
    a = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 0.2).to(dtype)
    if family == "uniform":
        a, b = a - 6.0, a + 6.0 + b
    a, b = a.requires_grad_(requires_grad), b.requires_grad_(requires_grad)
    cls = {"laplace": dist.Laplace, "gumbel": dist.Gumbel, "cauchy": dist.Cauchy, "uniform": dist.Uniform}[family]
    d = cls(a, b) if shape else cls(a, b).expand((7,))
    return (dist.Independent(d, 1) if independent else d), (a, b)


@pytest.mark.parametrize("family", ["laplace", "gumbel", "cauchy", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, independent", [((7,), False), ((7,), True), ((), False)])
@pytest.mark.parametrize("z_shape", [(3, 5, 7), (1, 1, 7), (7,)])
def test_a_torch_location_scale_priors_log_density_is_torchs(family, dtype, shape, independent, z_shape):
    """A torch Laplace, Gumbel, Cauchy or Uniform prior's log p(z) summed over
    L, as fastvae takes it in fewer passes over z: the float64 log_prob's
    values, and its gradients to z and to learned (L,) or 0-d parameters, to
    float rounding; z of several samples, one row, and a single latent."""
    from fastvae.priors import TorchPrior

    d, params = _location_scale_prior(family, shape, dtype, requires_grad=True, independent=independent)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(z_shape, generator=g, dtype=torch.float64) * 3
    if family == "uniform":  # inside the prior's support (a z outside it: the test below)
        z = z.clamp(-5.0, 5.0)
    z = z.to(dtype).requires_grad_()
    got = TorchPrior(d).log_prob(z)
    d64, params64 = _location_scale_prior(family, shape, torch.float64, requires_grad=True, independent=independent)
    z64 = z.detach().double().requires_grad_()
    want = d64.log_prob(z64)
    want = want if independent else want.sum(-1)
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.isfinite(want).all()
    assert_close(got, want, 1 + want.abs(), family)
    leaves, leaves64 = [z, *params], [z64, *params64]
    grads = torch.autograd.grad(got.sum(), leaves, allow_unused=True)
    grads64 = torch.autograd.grad(want.sum(), leaves64, allow_unused=True)
    for name, a, b in zip(("z", "a", "b"), grads, grads64):
        if b is None or (family == "uniform" and name == "z"):  # (a uniform's density has no z gradient)
            assert a is None or not a.abs().any(), name
            continue
        assert_close(a, b, 1 + b.abs(), f"{family} d{name}")


@pytest.mark.parametrize("validate", [True, False])
def test_a_torch_uniform_priors_density_outside_its_support(validate):
    """A z outside a torch Uniform prior's [low, high): -inf for that row
    without argument validation (torch's value); with it (torch's default),
    torch's own error, as before. A z at high is inside torch's check and
    outside the density: -inf either way."""
    from fastvae.priors import TorchPrior

    prior = TorchPrior(dist.Uniform(torch.zeros(3), torch.ones(3), validate_args=validate))
    z = torch.tensor([[0.5, 0.5, 0.5], [0.5, 1.5, 0.5], [0.0, 0.25, 1.0]])
    if validate:
        with pytest.raises(ValueError, match="support"):
            prior.log_prob(z)
        assert prior.log_prob(z[[0, 2]]).tolist() == [0.0, -math.inf]
    else:
        assert prior.log_prob(z).tolist() == [0.0, -math.inf, -math.inf]


@pytest.mark.parametrize("family", ["laplace", "gumbel", "cauchy"])
def test_a_nan_z_meets_torchs_check_of_a_location_scale_prior(family):
    """A NaN in z: torch's argument check refuses it by name where the prior
    validates (its default), and the density is NaN where it does not, as
    torch's own log_prob gives them; never a finite number."""
    from fastvae.priors import TorchPrior

    cls = {"laplace": dist.Laplace, "gumbel": dist.Gumbel, "cauchy": dist.Cauchy}[family]
    z = torch.tensor([[0.5, math.nan], [0.1, 0.2]])
    with pytest.raises(ValueError, match="support"):
        TorchPrior(cls(torch.zeros(2), torch.ones(2), validate_args=True)).log_prob(z)
    lp = TorchPrior(cls(torch.zeros(2), torch.ones(2), validate_args=False)).log_prob(z)
    assert math.isnan(lp[0]) and math.isfinite(lp[1])


def test_a_location_scale_prior_of_other_shapes_keeps_torchs_log_prob(monkeypatch):
    """A prior with a batch shape, or of another dtype than z, takes torch's
    own log_prob (the faster form reads (L,) or 0-d parameters of z's dtype)."""
    import fastvae.priors as priors

    calls = []
    fast = priors._location_scale_log_prob
    monkeypatch.setattr(priors, "_location_scale_log_prob", lambda d, z: calls.append(fast(d, z)) or calls[-1])
    z = torch.randn(4, 3)
    for d in (dist.Laplace(torch.zeros(4, 3), torch.ones(4, 3)), dist.Laplace(torch.zeros(3).double(), torch.ones(3))):
        got = priors.TorchPrior(d).log_prob(z)
        assert calls[-1] is None
        assert torch.allclose(got, d.log_prob(z.to(d.loc.dtype)).sum(-1).to(got.dtype))
    priors.TorchPrior(dist.Laplace(torch.zeros(3), torch.ones(3))).log_prob(z)
    assert calls[-1] is not None


@pytest.mark.parametrize("family", ["laplace", "gumbel", "cauchy", "uniform"])
def test_a_half_precision_z_takes_a_float32_location_scale_prior_density(family):
    """A bfloat16 z (a half-precision encoder's sample) is widened to float32
    first: a float32 log p(z), torch's log_prob of the widened z to rounding."""
    from fastvae.priors import TorchPrior

    d, _ = _location_scale_prior(family, (7,), torch.float32)
    z = (torch.randn(4, 7, generator=torch.Generator().manual_seed(2)).clamp(-4, 4)).bfloat16()
    got = TorchPrior(d).log_prob(z)
    want = d.log_prob(z.float()).sum(-1)
    assert got.dtype == torch.float32
    assert_close(got, want, 1 + want.abs(), family)


def test_a_laplace_priors_density_under_cpu_autocast_stays_float32():
    """Under autocast (bfloat16 matmuls) a Laplace prior's sum over L is not a
    half-precision product: its float32 value, to float32 rounding."""
    from fastvae.priors import TorchPrior

    d, _ = _location_scale_prior("laplace", (7,), torch.float32)
    z = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(4)) * 3
    want = d.log_prob(z.double()).sum(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = TorchPrior(d).log_prob(z)
    assert got.dtype == torch.float32
    assert_close(got, want, 1 + want.abs(), "laplace under autocast")


def _positive_prior(family, shape, dtype, requires_grad=False, independent=False, validate=None):
    g = torch.Generator().manual_seed(len(family) + 3 * len(shape))
    a = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype).requires_grad_(requires_grad)
    b = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype).requires_grad_(requires_grad)
    d = {"exponential": lambda: dist.Exponential(a, validate_args=validate),
         "weibull": lambda: dist.Weibull(a, b, validate_args=validate),
         "beta": lambda: dist.Beta(a, b, validate_args=validate)}[family]()
    d = d if shape else d.expand((7,))
    return (dist.Independent(d, 1) if independent else d), ((a,) if family == "exponential" else (a, b))


@pytest.mark.parametrize("family", ["exponential", "weibull", "beta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, independent", [((7,), False), ((7,), True), ((), False)])
@pytest.mark.parametrize("z_shape", [(3, 5, 7), (1, 1, 7), (7,)])
def test_a_torch_positive_priors_log_density_is_torchs(family, dtype, shape, independent, z_shape):
    """A torch Exponential, Weibull or Beta prior's log p(z) summed over L, as
    fastvae takes it in fewer passes over z: the float64 log_prob's values,
    and its gradients to z and to learned (L,) or 0-d parameters, to float
    rounding; z of several samples, one row, and a single latent, from near
    the support's edge to its bulk."""
    from fastvae.priors import TorchPrior

    d, params = _positive_prior(family, shape, dtype, requires_grad=True, independent=independent)
    g = torch.Generator().manual_seed(5)
    z = torch.rand(z_shape, generator=g, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    z = (z if family == "beta" else z * 4).to(dtype).requires_grad_()
    got = TorchPrior(d).log_prob(z)
    d64, params64 = _positive_prior(family, shape, torch.float64, requires_grad=True, independent=independent)
    z64 = z.detach().double().requires_grad_()
    want = d64.log_prob(z64)
    want = want if independent else want.sum(-1)
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.isfinite(want).all()
    # the terms' sizes: log z and log(1 - z) reach |log 1e-3| ~ 7 per latent
    assert_close(got, want, 1 + want.abs() + 10 * z.shape[-1], family)
    leaves, leaves64 = [z, *params], [z64, *params64]
    grads = torch.autograd.grad(got.sum(), leaves)
    grads64 = torch.autograd.grad(want.sum(), leaves64)
    for name, a, b in zip(("z", "p0", "p1"), grads, grads64):
        assert_close(a, b, 1 + b.abs(), f"{family} d{name}")


@pytest.mark.parametrize("family, outside", [("exponential", -0.5), ("weibull", -0.5), ("weibull", 0.0),
                                             ("beta", 1.5), ("beta", -0.25), ("exponential", math.nan),
                                             ("weibull", math.nan), ("beta", math.nan)])
def test_a_positive_priors_support_is_torchs(family, outside):
    """A z outside an Exponential's, Weibull's or Beta's support (or a NaN):
    where the prior validates (torch's default), torch's own error; where it
    does not, torch's own log_prob's value or its NaN, never a finite number
    torch would not give."""
    from fastvae.priors import TorchPrior

    z = torch.tensor([[0.5, 0.25, 0.75], [0.5, outside, 0.25]], dtype=torch.float64)
    d, _ = _positive_prior(family, (3,), torch.float64, validate=True)
    with pytest.raises(ValueError, match="support"):
        TorchPrior(d).log_prob(z)
    assert torch.isfinite(TorchPrior(d).log_prob(z[:1])).all()
    d, _ = _positive_prior(family, (3,), torch.float64, validate=False)
    got, want = TorchPrior(d).log_prob(z), d.log_prob(z).sum(-1)
    assert torch.isfinite(got[0]) and torch.allclose(got[0], want[0], rtol=1e-12, atol=1e-12)
    if torch.isfinite(want[1]):  # an exponential's density formula holds below 0: torch's value
        assert torch.allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
    else:
        assert not torch.isfinite(got[1])


def test_a_beta_priors_density_at_its_supports_edge_is_torchs():
    """z = 0 or 1 is inside a Beta's closed support: where the density there
    is -inf (a > 1) or finite (a = 1: torch's xlogy takes 0 log 0 as 0),
    torch's value, with or without its argument check."""
    from fastvae.priors import TorchPrior

    z = torch.tensor([[0.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    for validate in (True, False):
        for a in (torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64)):
            d = dist.Beta(a, a.flip(0), validate_args=validate)
            assert torch.equal(TorchPrior(d).log_prob(z), d.log_prob(z).sum(-1))


def test_a_positive_prior_of_other_shapes_or_under_compile_keeps_torchs_log_prob(monkeypatch):
    """A prior with a batch shape, of another dtype than z, or traced by
    torch.compile takes torch's own log_prob (the faster form reads (L,) or
    0-d parameters of z's dtype, eagerly)."""
    import fastvae.priors as priors

    calls = []
    fast = priors._positive_log_prob
    monkeypatch.setattr(priors, "_positive_log_prob", lambda d, z: calls.append(fast(d, z)) or calls[-1])
    z = torch.rand(4, 3) + 0.1
    for d in (dist.Weibull(torch.ones(4, 3), torch.ones(4, 3)), dist.Exponential(torch.ones(3).double())):
        got = priors.TorchPrior(d).log_prob(z)
        assert calls[-1] is None
        assert torch.allclose(got, d.log_prob(z.to(got.dtype)).sum(-1).to(got.dtype))
    beta = dist.Beta(torch.ones(3) * 2, torch.ones(3))
    priors.TorchPrior(beta).log_prob(z / 2)
    assert calls[-1] is not None
    monkeypatch.setattr(priors._backend, "compiling", lambda: True)
    priors.TorchPrior(beta).log_prob(z / 2)
    assert calls[-1] is None


@pytest.mark.parametrize("family", ["exponential", "weibull", "beta"])
def test_a_positive_priors_density_takes_half_precision_z_and_autocast_in_float32(family):
    """A bfloat16 z is widened to float32 first, and under CPU autocast the
    sums over L are not half-precision products: float32 values, torch's to
    float32 rounding."""
    from fastvae.priors import TorchPrior

    d, _ = _positive_prior(family, (7,), torch.float32)
    z = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(4)).clamp(0.01, 0.99)
    want = d.log_prob(z.double()).sum(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = TorchPrior(d).log_prob(z)
    assert got.dtype == torch.float32
    assert_close(got, want, 1 + want.abs(), f"{family} under autocast")
    zb = z.bfloat16()
    got = TorchPrior(d).log_prob(zb)
    assert got.dtype == torch.float32
    assert_close(got, d.log_prob(zb.double()).sum(-1), 1 + want.abs(), f"{family} of bfloat16 z")
