"""The count likelihoods (poisson_log_prob, negative_binomial_log_prob,
zinb_log_prob) against their float64 oracle (fastvae/ops/count_log_prob/__init__.py)
and their peers, per backend (the root conftest.py): values and gradients,
theta per element and per gene, x = 0 rows, all-zero rows and saturated
zero-inflation logits, the theta -> inf (Poisson) limit, large counts; and the
family's cases of the suite-wide checks.

The helpers come first: scvi-tools' NB and ZINB formulas reimplemented in
float64 (the peers users compare against), torch.distributions peers, random count
problems, the condition-aware tolerance scales and the comparison of an op
against the float64 oracle. scvi-tools (scvi/distributions/_negative_binomial.py)
adds eps = 1e-8 inside its logs and uses F.softplus, which is linear above 20
(an error of e^-20 there); here eps is a parameter (0 in the comparisons: it
only guards log(0)) and softplus is exact, so the formulas are theirs without
those two approximations."""
from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from hypothesis import strategies as st

import fastvae
from fastvae.ops import count_log_prob as oracle
from fastvae.ops.count_log_prob import op as count_module
from fastvae.ops.count_log_prob.op import (
    NegativeBinomialLogProb,
    PoissonLogProb,
    ZinbLogProb,
    negative_binomial_log_prob_backward_op,
    negative_binomial_log_prob_op,
    poisson_log_prob_backward_op,
    poisson_log_prob_op,
    zinb_log_prob_backward_op,
    zinb_log_prob_op,
)

from conftest import INTERPRET
from helpers import (
    assert_close,
    assert_compiled_matches_eager,
    gen,
    likelihood_checks,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    plan_device_fixture,
    reference_tests,
)

F64 = torch.float64
POISSON, NB, ZINB = "poisson_log_prob", "negative_binomial_log_prob", "zinb_log_prob"


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
    """fastvae.<op>'s value and parameter gradients against the oracle's <op>
    in float64, within count_scales; returns (out, grads)."""
    x, *params, g = make(p, dtype, device)
    out = getattr(fastvae, op)(x, *params)
    up = torch.randn(out.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad(out, params, up.to(dtype).to(device))
    x64 = x.double().cpu()
    p64 = [t.detach().double().cpu().requires_grad_() for t in params]
    ref = getattr(oracle, op)(x64, *p64)
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


# -- poisson_log_prob: against the oracle and torch.distributions.Poisson -----------------


def _moderate_counts(p):
    """A problem whose counts fit float16's range (it ends at 65504)."""
    return dict(p, counts="moderate") if p["counts"] == "large" else p


def _sparse_counts_moderate_theta(p):
    """A problem whose counts and theta fit float16's range (it ends at 65504)."""
    if p["lt_range"][1] > 11 or p["counts"] == "large":
        return dict(p, lt_range=(-3.0, 3.0), counts="sparse")
    return p


test_poisson_forward_backward_match_reference, test_poisson_half_precision_matches_reference = reference_tests(
    functools.partial(check_against_reference, POISSON), problems(POISSON), half_problem=_moderate_counts)


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (None, (2, 3), 5), (64, (1,), 40)])
def test_poisson_odd_sizes_and_repeatable(backend, K, batch, D):
    _, device = backend
    check_repeatable(POISSON, dict(D=D, batch=batch, K=K, counts="moderate", lm_range=(-3.0, 3.0), seed=D), device)


def test_poisson_matches_torch_distributions(backend):
    _, device = backend
    g = torch.Generator().manual_seed(1)
    x = random_counts((6, 40), g, "moderate")
    lr = torch.randn(3, 6, 40, generator=g, dtype=F64) * 2
    out = fastvae.poisson_log_prob(x.to(device), lr.to(device))
    assert_close(out, torch_poisson(x, lr), value_scale(x, lr).sum(-1), "vs torch Poisson")


def test_poisson_zero_counts_with_zero_rate(backend):
    """x = 0 with log_rate = -inf: probability 1 (log 0), not 0 * -inf = NaN; x > 0 there: -inf."""
    _, device = backend
    lr = torch.tensor([[-math.inf, 0.0]], device=device, requires_grad=True)
    out = fastvae.poisson_log_prob(torch.tensor([[0.0, 0.0]], device=device), lr)
    assert out.item() == -1.0
    (d,) = torch.autograd.grad(out.sum(), [lr])
    assert torch.equal(d.cpu(), torch.tensor([[0.0, -1.0]]))
    assert fastvae.poisson_log_prob(torch.tensor([[1.0, 0.0]], device=device), lr.detach()).item() == -math.inf


def test_poisson_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = random_counts((3, 5), g, "moderate").to(device)
    lr = (torch.randn(2, 3, 5, generator=g, dtype=F64) * 2).to(device).requires_grad_()
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(PoissonLogProb.apply, (x, lr), fast_mode=INTERPRET)
    assert torch.autograd.gradgradcheck(lambda t: fastvae.poisson_log_prob(x, t), (lr,), fast_mode=INTERPRET)


def test_poisson_opcheck(backend):
    _, device = backend
    x = torch.randint(0, 9, (3, 7), device=device).float()
    lr = torch.randn(2, 3, 7, device=device)
    torch.library.opcheck(poisson_log_prob_op, (x, lr))
    torch.library.opcheck(poisson_log_prob_backward_op, (torch.randn(2, 3, device=device), x, lr, True))


def test_poisson_errors_on_bad_input(backend):
    _, device = backend
    lr = torch.zeros(2, 4, 3, device=device)
    likelihood_checks.refuses_bad_x(fastvae.poisson_log_prob, lr, device, (4, 2), torch.bool)
    fastvae.set_value_checks("always")  # on the Triton path only the first call of a kind is checked
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.poisson_log_prob(torch.full((4, 3), -2.0, device=device), lr)
    assert fastvae.poisson_log_prob(torch.ones(4, 3, dtype=torch.long, device=device), lr).dtype == torch.float32


def test_poisson_objectives_and_evaluation_take_the_likelihood(backend):
    """likelihood="poisson" with the log rate from decode, and a torch Poisson decoder."""
    _, device = backend
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(7), dtype=F64).to(device)
    check_objectives(device, "poisson", lambda z: z @ w, lambda x, z: torch_poisson(x, z @ w),
                     lambda z: torch.distributions.Independent(torch.distributions.Poisson((z @ w).exp()), 1))


# -- negative_binomial_log_prob: against the oracle and its peers (scvi-tools'
# log_nb_positive, torch.distributions.NegativeBinomial) ---------------------------------


test_negative_binomial_forward_backward_match_reference, test_negative_binomial_half_precision_matches_reference = \
    reference_tests(functools.partial(check_against_reference, NB), problems(NB),
                    half_problem=_sparse_counts_moderate_theta)


@pytest.mark.parametrize("theta", ["element", "gene"])
def test_negative_binomial_matches_scvi_and_torch_distributions(backend, theta):
    """float64, moderate values: scvi-tools' log_nb_positive and
    torch.distributions.NegativeBinomial(total_count=theta, logits=log mu - log theta)."""
    _, device = backend
    g = torch.Generator().manual_seed(1)
    x = random_counts((6, 40), g, "moderate")
    lm = torch.randn(3, 6, 40, generator=g, dtype=F64) * 2
    lt = torch.randn(*((3, 6, 40) if theta == "element" else (40,)), generator=g, dtype=F64) * 2
    lm_d, lt_d = lm.to(device).requires_grad_(), lt.to(device).requires_grad_()
    out = fastvae.negative_binomial_log_prob(x.to(device), lm_d, lt_d)
    lm_r, lt_r = lm.clone().requires_grad_(), lt.clone().requires_grad_()
    scvi = log_nb_positive(x, lm_r.exp(), lt_r.exp()).sum(-1)
    scale = value_scale(x, lm, lt.expand_as(lm)).sum(-1)
    assert_close(out, scvi.detach(), scale, "vs scvi log_nb_positive")
    assert_close(out, torch_nb(x, lm, lt), scale, "vs torch NegativeBinomial")
    got = torch.autograd.grad(out.sum(), [lm_d, lt_d])
    want = torch.autograd.grad(scvi.sum(), [lm_r, lt_r])
    gs = grad_scale(x, lm, lt.expand_as(lm))
    assert_close(got[0], want[0], gs, "dlog_mean")
    assert_close(got[1], want[1], gs.sum_to_size(lt.shape), "dlog_theta")


@pytest.mark.parametrize("dtype,log_theta", [(F64, 25.0), (F64, 60.0), (torch.float32, 30.0), (torch.float32, 80.0),
                                             (torch.float32, 100.0)])
def test_negative_binomial_theta_to_infinity_is_poisson(backend, dtype, log_theta):
    """theta -> inf: the Poisson log-likelihood, to O((x^2 + mu^2) / theta) plus
    rounding of the Poisson terms (no cancellation of x log theta), and a log
    theta gradient that tends to 0; also where theta overflows the dtype (e^100
    in float32: the limit itself, never inf * 0 = NaN)."""
    _, device = backend
    g = torch.Generator().manual_seed(2)
    x = random_counts((4, 50), g, "moderate")
    lm = torch.randn(2, 4, 50, generator=g, dtype=F64) + 2
    lt = torch.full((50,), log_theta, dtype=F64)
    lt_d = lt.to(dtype).to(device).requires_grad_()
    out = fastvae.negative_binomial_log_prob(x.to(dtype).to(device), lm.to(dtype).to(device), lt_d)
    poisson = torch_poisson(x, lm.to(dtype).double())
    theta = math.exp(log_theta)
    limit = ((x * x + lm.exp() ** 2) / theta).sum(-1)
    rtol = 1e-12 if dtype == F64 else 2e-5
    err = (out.double().cpu() - poisson).abs()
    assert (err <= limit + rtol * value_scale(x, lm).sum(-1)).all(), err.max()
    (dlt,) = torch.autograd.grad(out.sum(), [lt_d])
    assert torch.isfinite(dlt).all()
    assert (dlt.double().cpu().abs() <= 2 * ((x * x + lm.exp() ** 2) / theta).sum((0, 1)) + rtol * 8 * (
        x.sum(0) + lm.exp().sum((0, 1)) + 1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_negative_binomial_zero_rows_are_exact(backend, dtype):
    """x = 0: log p = -theta log(1 + mu / theta) exactly (no lgamma terms), its gradients too."""
    _, device = backend
    g = torch.Generator().manual_seed(3)
    lm = (torch.randn(3, 2, 37, generator=g, dtype=F64) * 3).to(dtype).to(device).requires_grad_()
    lt = (torch.randn(37, generator=g, dtype=F64) * 3).to(dtype).to(device).requires_grad_()
    out = fastvae.negative_binomial_log_prob(torch.zeros(2, 37, dtype=dtype, device=device), lm, lt)
    lm64, lt64 = lm.detach().double().cpu(), lt.detach().double().cpu()
    theta, mu = lt64.exp(), lm64.exp()
    want = (-theta * torch.log1p(mu / theta)).sum(-1)
    assert_close(out, want, (mu + 1).sum(-1), "log_prob")
    dlm, dlt = torch.autograd.grad(out.sum(), [lm, lt])
    assert_close(dlm, -theta * mu / (theta + mu), mu + 1, "dlog_mean")
    assert_close(dlt, (theta * mu / (theta + mu) - theta * torch.log1p(mu / theta)).sum((0, 1)),
                 (mu + 1).sum((0, 1)), "dlog_theta")


@pytest.mark.parametrize("log_theta", [-2.0, 0.0, 2.3, 7.0, 11.5])
def test_negative_binomial_large_counts_match_scvi_in_float64(backend, log_theta):
    """Counts up to 1e5 (the lgamma differences of the Stirling forms) against
    scvi-tools' formula in float64, whose lgammas of 1e6 carry ~1e-10 rounding."""
    _, device = backend
    g = torch.Generator().manual_seed(4)
    x = random_counts((5, 60), g, "large")
    lm = torch.log(x + 1) + torch.randn(2, 5, 60, generator=g, dtype=F64) * 0.3
    lt = torch.full((60,), log_theta, dtype=F64)
    out = fastvae.negative_binomial_log_prob(x.to(device), lm.to(device), lt.to(device))
    want = log_nb_positive(x, lm.exp(), lt.exp()).sum(-1)
    assert_close(out, want, value_scale(x, lm, lt.expand_as(lm)).sum(-1) * 100, "vs scvi (float64)")


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (4, (300,), 3), (None, (2, 3), 5),
                                       (64, (1,), 40)])
def test_negative_binomial_per_gene_theta_gradient_sums_over_rows(backend, K, batch, D):
    """Odd sizes, K = 1, one row (the folded layout at K = 64): the per-gene
    dlog_theta sums over samples and rows; a second call gives the same bits."""
    _, device = backend
    p = dict(D=D, batch=batch, K=K, counts="sparse", theta="gene", lt_range=(-2.0, 3.0), lm_range=(-3.0, 3.0), seed=D)
    check_repeatable(NB, p, device)


def test_negative_binomial_integer_counts_and_no_count_gradient(backend):
    _, device = backend
    x = torch.tensor([[0, 3, 10]], device=device)
    lm = torch.zeros(2, 1, 3, device=device, requires_grad=True)
    lt = torch.zeros(3, device=device)
    out = fastvae.negative_binomial_log_prob(x, lm, lt)
    assert out.dtype == torch.float32 and out.shape == (2, 1)
    torch.testing.assert_close(out, fastvae.negative_binomial_log_prob(x.float(), lm, lt))
    xf = x.float().requires_grad_()
    out = fastvae.negative_binomial_log_prob(xf, lm, lt)
    assert torch.autograd.grad(out.sum(), [xf], allow_unused=True) == (None,)


def test_negative_binomial_gradcheck_float64(backend):
    """Under the interpreter in gradcheck's fast mode (random directions)."""
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = random_counts((3, 5), g, "moderate").to(device)
    lm = (torch.randn(2, 3, 5, generator=g, dtype=F64) * 2).to(device).requires_grad_()
    for lt in (torch.randn(2, 3, 5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64) * 3,
               torch.randn(5, generator=g, dtype=F64) + 12):
        lt = lt.to(device).requires_grad_()
        assert torch.autograd.gradcheck(NegativeBinomialLogProb.apply, (x, lm, lt), fast_mode=INTERPRET)
    assert torch.autograd.gradgradcheck(lambda m, t: fastvae.negative_binomial_log_prob(x, m, t), (lm, lt),
                                        fast_mode=INTERPRET)


def test_negative_binomial_opcheck(backend):
    _, device = backend
    x = torch.randint(0, 9, (3, 7), device=device).float()
    lm = torch.randn(2, 3, 7, device=device)
    for lt in (torch.randn(2, 3, 7, device=device), torch.randn(7, device=device)):
        torch.library.opcheck(negative_binomial_log_prob_op, (x, lm, lt))
        for need in ((True, True), (True, False), (False, True)):
            args = (torch.randn(2, 3, device=device), x, lm, lt, *need)
            torch.library.opcheck(negative_binomial_log_prob_backward_op, args)


def test_negative_binomial_errors_on_bad_input(backend):
    _, device = backend
    lm = torch.zeros(2, 4, 3, device=device)
    lt = torch.zeros(3, device=device)
    with pytest.raises(ValueError, match=r"x of shape \(4, 2\)"):
        fastvae.negative_binomial_log_prob(torch.zeros(4, 2, device=device), lm, lt)
    with pytest.raises(ValueError, match=r"log_theta of shape \(2,\)"):
        fastvae.negative_binomial_log_prob(torch.zeros(4, 3, device=device), lm, torch.zeros(2, device=device))
    with pytest.raises(TypeError, match="bool"):
        fastvae.negative_binomial_log_prob(torch.zeros(4, 3, dtype=torch.bool, device=device), lm, lt)
    with pytest.raises(TypeError, match="log_theta"):
        fastvae.negative_binomial_log_prob(torch.zeros(4, 3, device=device), lm, torch.zeros(3, dtype=torch.long))
    fastvae.set_value_checks("always")  # on the Triton path only the first call of a kind is checked
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.negative_binomial_log_prob(torch.full((4, 3), -1.0, device=device), lm, lt)
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.negative_binomial_log_prob(torch.full((4, 3), math.nan, device=device), lm, lt)


def test_negative_binomial_event_dims(backend):
    _, device = backend
    g = torch.Generator().manual_seed(6)
    x = random_counts((2, 3, 4), g, "sparse").to(device)
    lm = torch.randn(5, 2, 3, 4, generator=g, dtype=F64).to(device)
    lt = torch.randn(3, 4, generator=g, dtype=F64).to(device)
    out = fastvae.negative_binomial_log_prob(x, lm, lt, event_dims=2)
    want = oracle.negative_binomial_log_prob(x.reshape(2, 12).cpu(), lm.reshape(5, 2, 12).cpu(),
                                                lt.reshape(12).cpu())
    torch.testing.assert_close(out.cpu(), want)


def test_negative_binomial_objectives_and_evaluation_take_the_likelihood(backend):
    """likelihood="negative_binomial" with (log mean, per-gene log theta) from
    decode, and a torch NegativeBinomial(total_count=theta, logits) decoder."""
    _, device = backend
    g = torch.Generator().manual_seed(7)
    w = torch.randn(2, 6, generator=g, dtype=F64).to(device)
    lt = torch.randn(6, generator=g, dtype=F64).to(device)
    check_objectives(device, "negative_binomial", lambda z: (z @ w, lt),
                     lambda x, z: log_nb_positive(x, (z @ w).exp(), lt.exp()).sum(-1),
                     lambda z: torch.distributions.NegativeBinomial(lt.exp(), logits=z @ w - lt))


# -- zinb_log_prob: against the oracle and scvi-tools' log_zinb_positive ------------------


test_zinb_forward_backward_match_reference, test_zinb_half_precision_matches_reference = reference_tests(
    functools.partial(check_against_reference, ZINB), problems(ZINB), half_problem=_sparse_counts_moderate_theta)


@pytest.mark.parametrize("theta", ["element", "gene"])
def test_zinb_matches_scvi(backend, theta):
    """float64, moderate values: scvi-tools' log_zinb_positive, values and gradients."""
    _, device = backend
    p = dict(D=40, batch=(6,), K=3, counts="sparse", theta=theta, lt_range=(-3.0, 3.0), lm_range=(-3.0, 3.0),
             zi_bound=4.0, seed=11)
    x, lm, lt, zl, _ = make(p, F64, device)
    out = fastvae.zinb_log_prob(x, lm, lt, zl)
    p64 = [t.detach().cpu().requires_grad_() for t in (lm, lt, zl)]
    scvi = log_zinb_positive(x.cpu(), p64[0].exp(), p64[1].exp(), p64[2]).sum(-1)
    vs, gs = count_scales(x.cpu(), *p64)
    assert_close(out, scvi.detach(), vs.sum(-1), "vs scvi log_zinb_positive")
    got = torch.autograd.grad(out.sum(), [lm, lt, zl])
    want = torch.autograd.grad(scvi.sum(), p64)
    for name, a, b, t in zip(("dlog_mean", "dlog_theta", "dzi_logits"), got, want, p64):
        assert_close(a, b, gs.sum_to_size(t.shape), name)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zinb_all_zero_rows_and_saturated_logits(backend, dtype):
    """All-zero rows: sum of logsumexp(log pi, log(1 - pi) - theta log(1 + mu/theta));
    zi_logits of +-60 (pi = 1 or 0 to the dtype) give the limits without NaN."""
    _, device = backend
    g = torch.Generator().manual_seed(3)
    D = 29
    lm = (torch.randn(2, 3, D, generator=g, dtype=F64) * 2).to(dtype).to(device).requires_grad_()
    lt = (torch.randn(D, generator=g, dtype=F64) * 2).to(dtype).to(device).requires_grad_()
    zl = torch.cat([torch.full((2, 3, 10), 60.0, dtype=F64), torch.full((2, 3, 10), -60.0, dtype=F64),
                    torch.randn(2, 3, D - 20, generator=g, dtype=F64)], -1).to(dtype).to(device).requires_grad_()
    x = torch.zeros(3, D, dtype=dtype, device=device)
    x[1, :] = 2.0  # one nonzero row: log(1 - pi) = -60 there
    out = fastvae.zinb_log_prob(x, lm, lt, zl)
    x64, p64 = x.double().cpu(), [t.detach().double().cpu() for t in (lm, lt, zl)]
    theta, mu = p64[1].exp(), p64[0].exp()
    nb0 = -theta * torch.log1p(mu / theta)
    zero = torch.logaddexp(-softplus(-p64[2]), -softplus(p64[2]) + nb0)
    want = torch.where(x64 == 0, zero, oracle.nb_log_prob_terms(x64, p64[0], p64[1]) - softplus(p64[2])).sum(-1)
    vs, _ = count_scales(x64, *p64)
    assert_close(out, want, vs.sum(-1), "log_prob")
    grads = torch.autograd.grad(out.sum(), [lm, lt, zl])
    assert all(torch.isfinite(t).all() for t in grads)


def test_zinb_theta_to_infinity_is_zero_inflated_poisson(backend):
    _, device = backend
    g = torch.Generator().manual_seed(4)
    x = random_counts((4, 30), g, "sparse")
    lm = torch.randn(2, 4, 30, generator=g, dtype=F64)
    zl = torch.randn(2, 4, 30, generator=g, dtype=F64)
    out = fastvae.zinb_log_prob(x.to(device), lm.to(device), torch.full((30,), 60.0, dtype=F64, device=device),
                                zl.to(device))
    pois = x * lm - lm.exp() - torch.lgamma(x + 1)
    want = torch.where(x == 0, torch.logaddexp(-softplus(-zl), -softplus(zl) - lm.exp()), pois - softplus(zl)).sum(-1)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (None, (2, 3), 5), (64, (1,), 40)])
def test_zinb_odd_sizes_and_repeatable(backend, K, batch, D):
    _, device = backend
    p = dict(D=D, batch=batch, K=K, counts="sparse", theta="gene", lt_range=(-2.0, 3.0), lm_range=(-3.0, 3.0),
             zi_bound=3.0, seed=D)
    check_repeatable(ZINB, p, device)


def test_zinb_gradcheck_float64(backend):
    """Under the interpreter (a Python loop per kernel program) in gradcheck's
    fast mode: the Jacobian along random directions, not column by column."""
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = random_counts((3, 5), g, "sparse").to(device)
    lm = (torch.randn(2, 3, 5, generator=g, dtype=F64) * 2).to(device).requires_grad_()
    zl = torch.randn(2, 3, 5, generator=g, dtype=F64).to(device).requires_grad_()
    for lt in (torch.randn(2, 3, 5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64) * 3):
        lt = lt.to(device).requires_grad_()
        assert torch.autograd.gradcheck(ZinbLogProb.apply, (x, lm, lt, zl), fast_mode=INTERPRET)
    assert torch.autograd.gradgradcheck(lambda m, t, z: fastvae.zinb_log_prob(x, m, t, z), (lm, lt, zl),
                                        fast_mode=INTERPRET)


def test_zinb_opcheck(backend):
    _, device = backend
    x = torch.randint(0, 3, (3, 7), device=device).float()
    lm, zl = torch.randn(2, 3, 7, device=device), torch.randn(2, 3, 7, device=device)
    for lt in (torch.randn(2, 3, 7, device=device), torch.randn(7, device=device)):
        torch.library.opcheck(zinb_log_prob_op, (x, lm, lt, zl))
        for need in ((True, True, True), (False, False, True), (True, False, False)):
            args = (torch.randn(2, 3, device=device), x, lm, lt, zl, *need)
            torch.library.opcheck(zinb_log_prob_backward_op, args)


def test_zinb_errors_on_bad_input(backend):
    _, device = backend
    lm, zl = torch.zeros(2, 4, 3, device=device), torch.zeros(2, 4, 3, device=device)
    lt = torch.zeros(3, device=device)
    with pytest.raises(ValueError, match=r"zi_logits of shape \(2, 4, 2\)"):
        fastvae.zinb_log_prob(torch.zeros(4, 3, device=device), lm, lt, torch.zeros(2, 4, 2, device=device))
    fastvae.set_value_checks("always")  # on the Triton path only the first call of a kind is checked
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.zinb_log_prob(torch.full((4, 3), -1.0, device=device), lm, lt, zl)
    with pytest.raises(TypeError, match="zi_logits"):
        fastvae.zinb_log_prob(torch.zeros(4, 3, device=device), lm, lt, zl.long())


def test_zinb_objectives_and_evaluation_take_the_likelihood(backend):
    """likelihood="zinb" with (log mean, per-gene log theta, zero-inflation logits) from decode."""
    _, device = backend
    g = torch.Generator().manual_seed(7)
    w, wz = (torch.randn(2, 6, generator=g, dtype=F64).to(device) for _ in range(2))
    lt = torch.randn(6, generator=g, dtype=F64).to(device)
    check_objectives(device, "zinb", lambda z: (z @ w, lt, z @ wz),
                     lambda x, z: log_zinb_positive(x, (z @ w).exp(), lt.exp(), z @ wz).sum(-1))


def test_decoder_output_errors(backend):
    _, device = backend
    x = torch.zeros(3, 4, dtype=F64, device=device)
    mu = torch.zeros(3, 2, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"decode returns \(log_mean, log_theta, zi_logits\)"):
        fastvae.elbo(x, mu, mu, lambda z: (z.new_zeros(3, 4), z.new_zeros(4)), likelihood="zinb")
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.elbo(x - 1, mu, mu, lambda z: z.new_zeros(3, 4), likelihood="poisson")


@pytest.mark.skipif(INTERPRET, reason="compiles a graph: once, in the main process")
def test_compile_fullgraph(backend):
    """The three count likelihoods trace with no graph break (one opaque op each)."""
    _, device = backend
    g = torch.Generator().manual_seed(9)
    x = random_counts((4, 7), g, "sparse").to(device)
    lm, zl = (torch.randn(3, 4, 7, generator=g).to(device).requires_grad_() for _ in range(2))
    lt = torch.randn(7, generator=g).to(device).requires_grad_()

    def loss(lm, lt, zl):
        return (fastvae.zinb_log_prob(x, lm, lt, zl).sum() + fastvae.negative_binomial_log_prob(x, lm, lt).sum()
                + fastvae.poisson_log_prob(x, zl).sum())

    assert_compiled_matches_eager(loss, (lm, lt, zl), [lm, lt, zl])


# -- the family's cases of the suite-wide checks -------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the ops: test_registry.py fails when
# one is missing. launch_case, thread_count_calls and fallback_call give
# {op name: its case} for each op of the family (helpers.PER_OP_CASES).


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward of each op at a training
    size; ``op`` makes the call from the function and its leaves' shapes (x:
    binary counts, made without a draw; log theta per gene)."""
    x = (torch.arange(B * D).reshape(B, D) % 2).float()
    return {
        POISSON: op(lambda lr: fastvae.poisson_log_prob(x, lr), (K, B, D)),
        NB: op(lambda m, t: fastvae.negative_binomial_log_prob(x, m, t), (K, B, D), (D,)),
        ZINB: op(lambda m, t, z: fastvae.zinb_log_prob(x, m, t, z), (K, B, D), (D,), (K, B, D)),
    }


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count: few x rows against many samples
    (the folded layout) and many rows; the per-gene log theta gradient sums
    over slabs of rows."""
    x_few, mean_few, var_dim = leaf(8, 16), leaf(1000, 8, 16), leaf(16)
    x_many, mean_many = leaf(600, 40), leaf(4, 600, 40)
    lg = leaf(1000, 8, 16, scale=4)
    return {
        NB: [
            lambda: run(lambda b, c: fastvae.negative_binomial_log_prob(x_many.detach().abs().round(), b, c),
                        mean_many, var_dim[:1].expand(40).contiguous().detach().requires_grad_()),
            lambda: run(lambda b, c: fastvae.negative_binomial_log_prob(x_few.detach().abs().round(), b, c),
                        mean_few, var_dim)],
        ZINB: [lambda: run(lambda b, c, d: fastvae.zinb_log_prob(x_few.detach().abs().round(), b, c, d),
                           mean_few, var_dim, lg)],
        POISSON: [lambda: run(lambda b: fastvae.poisson_log_prob(x_few.detach().abs().round(), b), mean_few)],
    }


def fallback_call(leaf, run):
    """tests/test_backend.py: small calls (the folded layout: few x rows against
    many samples), run with and without the extension."""
    counts = (torch.arange(32, dtype=torch.float64) % 4).reshape(2, 16)
    mean, log_theta = leaf(2048, 2, 16), leaf(4)
    return {
        POISSON: lambda: run(lambda b: fastvae.poisson_log_prob(counts, b), mean),
        NB: lambda: run(lambda b, c: fastvae.negative_binomial_log_prob(counts, b, c), mean, log_theta.repeat(4)),
        ZINB: lambda: run(lambda b, c: fastvae.zinb_log_prob(counts, b, c, b), mean, log_theta.repeat(4)),
    }


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck; counts are
    data (no gradient): a constant of the function, on the leaves' device."""
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0, 7.0]] * 3, dtype=F64)
    return {
        POISSON: (lambda lr: fastvae.poisson_log_prob(counts.to(lr.device), lr), [r(2, 3, 5)], False),
        NB: (lambda m, t: fastvae.negative_binomial_log_prob(counts.to(m.device), m, t), [r(2, 3, 5), r(5)], False),
        ZINB: (lambda m, t, z: fastvae.zinb_log_prob(counts.to(m.device), m, t, z),
               [r(2, 3, 5), r(2, 3, 5), r(2, 3, 5)], False),
    }


# -- the ops' own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(count_module)
_OPS = {"poisson_log_prob": (poisson_log_prob_op, poisson_log_prob_backward_op),
        "negative_binomial_log_prob": (negative_binomial_log_prob_op, negative_binomial_log_prob_backward_op),
        "zinb_log_prob": (zinb_log_prob_op, zinb_log_prob_backward_op)}


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, P, D", [(1, 1, 1), (3, 5, 7), (3, 100, 7)])
@pytest.mark.parametrize("op, theta", [("poisson_log_prob", None), ("negative_binomial_log_prob", "element"),
                                       ("negative_binomial_log_prob", "gene"), ("zinb_log_prob", "element"),
                                       ("zinb_log_prob", "gene")])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, K, P, D, op,
                                                                    theta):
    """The count likelihoods' ops and their backwards called as a compiled
    graph calls them (x (P, D) counts, the log mean (K, P, D), log theta per
    element or per gene, the zero-inflation logits (K, P, D), contiguous): on
    the triton backend from a plan of the call's signature (OP_PLANS), with
    the general launch's log-likelihood and gradients bit for bit, for every
    set of gradients, from the first call and the second; one element, odd
    sizes, a per-gene theta's gradient summed over two row tiles (the last
    shape, 300 rows of the interpreter's 256-row tiles), zero counts; half precision, a strided log mean, an empty batch
    and a gradient of another dtype take the general launch and make no plan."""
    forward_op, backward_op = _OPS[op]
    count_module.OP_PLANS.clear()
    g = torch.Generator().manual_seed(K * 100 + P * 10 + D)

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(plan_device)

    lm = rnd(K, P, D)
    x = torch.poisson(torch.full((P, D), 2.0, dtype=torch.float64), generator=g).to(dtype).to(plan_device)
    x.view(-1)[0] = 0.0
    params = [lm] + ([] if theta is None else [rnd(K, P, D) if theta == "element" else rnd(D)])
    if op == "zinb_log_prob":
        params.append(rnd(K, P, D))
    grad_out = rnd(K, P)
    n = len(params)

    def calls():
        got = [forward_op(x, *params)]
        for needs in itertools.product((False, True), repeat=n):
            if any(needs):
                got += backward_op(grad_out, x, *params, *needs)
        return got

    op_plans_match_the_general_launch(monkeypatch, count_module, calls)
    (plan,) = count_module.OP_PLANS.values()
    assert len(plan.launches()) == 2 ** n
    if theta == "gene" and K * P > 256:  # the per-gene theta's gradient summed over two row tiles' partials
        assert any(part_like.shape == (2, D) for _, _, part_like, _, _ in plan._backward.values())
    count_module.OP_PLANS.clear()
    forward_op(x.half(), *(t.half() for t in params))
    if K * P > 1:
        forward_op(x, torch.cat([lm, lm], -1)[..., :D], *params[1:])
    forward_op(x[:0], lm[:, :0], *(t[:, :0] if t.dim() == 3 else t for t in params[1:]))
    other = torch.float64 if dtype is torch.float32 else torch.float32
    backward_op(grad_out.to(other), x, *params, *([True] * n))
    assert len(count_module.OP_PLANS) == 0


@needs_plan_triton
def test_the_plans_formulas_are_the_kernels():
    """op.py's KINDS names each op's formula by the Triton module's constants."""
    from fastvae.ops.count_log_prob import triton as kern
    assert count_module.KINDS == {"poisson_log_prob": kern.POISSON, "negative_binomial_log_prob": kern.NB,
                                  "zinb_log_prob": kern.ZINB}
