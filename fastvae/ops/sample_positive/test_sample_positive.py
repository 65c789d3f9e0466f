"""sample_positive against its float64 oracle (fastvae/ops/sample_positive/__init__.py),
per backend (the root conftest.py): values and gradients of every family
(exponential, Weibull, Kumaraswamy), the samples' distribution against the
closed-form CDFs, log q against torch.distributions, the Kumaraswamy at a, b
in [1e-3, 1e3], the evaluation's layout, errors, and the double backward; and
its cases of the suite-wide checks."""
import math

import pytest
import torch
import torch.distributions as td
from hypothesis import strategies as st

import fastvae
from fastvae import _philox
from fastvae.ops import sample_positive as described
from fastvae.ops.sample_positive.op import FAMILIES, SamplePositive, positive_at

from conftest import INTERPRET
from helpers import assert_close, float_dtype_examples, gen, sampler_checks, seed_tensor

EXAMPLES = 6 if INTERPRET else 30
LATENT = [1, 3, 7, 32, 33]


@st.composite
def problems(draw):
    """(family, batch, L, K, data seed, log-parameter bound)."""
    family = draw(st.sampled_from(FAMILIES))
    L = draw(st.sampled_from(LATENT))
    batch = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    K = draw(st.sampled_from([1, 2, 5]))
    # a Kumaraswamy b << 1 puts z within float64's rounding of 1, where torch's
    # log_prob (the stop-score oracle) is NaN: its extremes have their own test
    bounds = [0.5] if family == "kumaraswamy" else [0.5, 2.0]
    return family, batch, L, K, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(bounds))


def make_inputs(batch, L, data_seed, bound, dtype, device, requires_grad=False):
    g = torch.Generator().manual_seed(data_seed)
    p0 = ((torch.rand((*batch, L), generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
    p1 = ((torch.rand((*batch, L), generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
    return p0.requires_grad_(requires_grad), p1.requires_grad_(requires_grad)


def oracle_terms(family, seed, K, p0, p1, dtype):
    """The oracle's positive_terms (float64) from the uniforms a `dtype` op draws."""
    shape = (K, *p0.shape)
    offsets = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    return described.positive_noise(FAMILIES.index(family), seed, offsets, p0.detach().double().cpu(),
                                    p1.detach().double().cpu(), dtype)


def torch_q(family, p0, p1):
    a, b = torch.exp(p0), torch.exp(p1)
    if family == "exponential":
        return td.Exponential(a)
    return td.Weibull(a, b) if family == "weibull" else td.Kumaraswamy(a, b)


def oracle(family, p0, p1, seed, K, dtype, stop_score=False):
    """(z, log q) differentiable in float64 p0, p1 (plain autograd of the
    reference); with stop_score log q is the family's log density of z with
    the parameters detached (the score reaches them along z only): torch's
    log_prob, the Kumaraswamy's written in log z."""
    shape = (K, *p0.shape)
    x = _philox.philox_word(seed, torch.arange(math.prod(shape), dtype=torch.int64)).reshape(shape)
    t, log_t = described.positive_exp1(x, torch.float64 if dtype == torch.float64 else torch.float32)
    # z clamped at float64's limits: torch's log_prob of a z clamped at float32's
    # (a Kumaraswamy z within 2**-24 of 1) would not be the density the noise drew
    z, log_f, c0 = described.positive_terms(FAMILIES.index(family), t, log_t, p0, p1, torch.float64)[:3]
    log_q = log_f.sum(-1)
    if stop_score and family == "kumaraswamy":
        # log a + log b + (a - 1) log z + (b - 1) log(1 - z^a) along log z = -c0:
        # torch's log_prob forms 1 - z^a from z rounded near 1, which costs
        # eps z^a / (1 - z^a) relative (2e-11 at 1 - z = 5e-6), more than the op's
        # float64 tolerance; -expm1(a log z) keeps every digit of 1 - z^a
        a, b = torch.exp(p0.detach()), torch.exp(p1.detach())
        log_z = -c0
        log_q = (p0.detach() + p1.detach() + (a - 1.0) * log_z
                 + (b - 1.0) * torch.log(-torch.expm1(a * log_z))).sum(-1)
    elif stop_score:
        log_q = torch_q(family, p0.detach(), p1.detach()).log_prob(z).sum(-1)
    return z, log_q


def _log_q_scale(terms, p0, p1):
    z, log_f = terms[0], terms[1]
    p0, p1 = p0.detach().double().cpu(), p1.detach().double().cpu()
    amp = 1.0 + torch.exp(-p0) + torch.exp(-p1)
    return ((log_f.abs() + p0.abs() + p1.abs() + z.log().abs() + 4.0) * amp).sum(-1)


@float_dtype_examples(EXAMPLES, problem=problems())
def test_forward_matches_reference(backend, dtype, problem):
    family, K = problem[0], problem[3]
    seed, p0, p1, z, log_q = sampler_checks.forward(SamplePositive.apply, FAMILIES, make_inputs, problem, dtype,
                                                    backend[1])
    terms = oracle_terms(family, seed, K, p0, p1, dtype)
    z_ref = terms[0]
    assert_close(z, z_ref, z_ref * (z_ref.log().abs() + p0.double().cpu().abs() + 4.0), "z")
    assert_close(log_q, terms[1].sum(-1), _log_q_scale(terms, p0, p1), "log_q")


@float_dtype_examples(EXAMPLES, problem=problems(), stop_score=st.booleans())
def test_backward_matches_reference_autograd(backend, dtype, problem, stop_score):
    family, K = problem[0], problem[3]
    seed, gz, gq, grads, (a, b) = sampler_checks.backward(SamplePositive.apply, FAMILIES, make_inputs, problem, dtype,
                                                          backend[1], stop_score)
    z_ref, q_ref = oracle(family, a, b, seed, K, dtype, stop_score)
    expected = torch.autograd.grad((z_ref, q_ref), (a, b), (gz.double(), gq.double()), allow_unused=True)
    zz, _, c0, c1, f0, f1, s0, s1 = oracle_terms(family, seed, K, a, b, dtype)
    gza, gqa = gz.double().abs() * zz, gq.double().abs()[..., None]
    scales = [(gza * (c.abs() + 1.0)).sum(0) + (gqa * (f.abs() + s.abs() + 1.0)).sum(0) + 1.0
              for c, f, s in ((c0, f0, s0), (c1, f1, s1))]
    for name, got, want, scale in zip(("dlog_p0", "dlog_p1"), grads, expected, scales):
        if family == "exponential" and name == "dlog_p1":
            assert got is None
            continue
        assert got.dtype == dtype
        assert_close(got, want, scale * (1.0 + a.detach().abs() + b.detach().abs()), name)


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_split_over_samples(backend, family, sample_splits):
    """K = 7 samples of one short row: the Triton backward's split path (forced)."""
    p0, p1 = make_inputs((2,), 5, 3, 1.0, torch.float64, backend[1], requires_grad=True)
    d0, d1 = sampler_checks.split_over_samples(SamplePositive.apply, oracle, FAMILIES, family, p0, p1)
    assert_close(p0.grad, d0, d0.abs() + 50.0, "dlog_p0")
    if family != "exponential":
        assert_close(p1.grad, d1, d1.abs() + 50.0, "dlog_p1")


@pytest.mark.parametrize("family", FAMILIES)
def test_log_q_matches_torch_distributions(backend, family):
    """log q of the drawn z equals torch.distributions' log_prob of that z (float64)."""
    _, device = backend
    p0, p1 = make_inputs((4,), 9, 21, 1.5, torch.float64, device)
    torch.manual_seed(0)
    args = (p0,) if family == "exponential" else (p0, p1)
    z, log_q = fastvae.sample_positive(family, *args, n_samples=3)
    expected = td.Independent(torch_q(family, p0, p1), 1).log_prob(z)
    assert_close(log_q, expected, expected.abs() + 10.0, "log_q")
    assert_close(log_q, fastvae.Positive(family, *args).log_prob(z), expected.abs() + 10.0, "record log_prob")


def _cdf(family, z, a, b):
    if family == "exponential":
        return 1.0 - math.exp(-a * z)
    if family == "weibull":
        return 1.0 - math.exp(-((z / a) ** b))
    return 1.0 - (1.0 - z**a) ** b


def _ks(sample, cdf):
    """The two-sided Kolmogorov-Smirnov statistic of a sample against a CDF."""
    x = sorted(sample)
    n = len(x)
    return max(max((i + 1) / n - cdf(v), cdf(v) - i / n) for i, v in enumerate(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_follow_the_distribution(backend, family):
    """Kolmogorov-Smirnov against the closed-form CDF, three seeds of 6000
    samples: D < 1.95 / sqrt(n) (p ~ 1e-3 each)."""
    _, device = backend
    a, b = 1.7, 0.6
    p0 = torch.full((20, 30), math.log(a), device=device)
    p1 = torch.full((20, 30), math.log(b), device=device)
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        args = (p0,) if family == "exponential" else (p0, p1)
        z, _ = fastvae.sample_positive(family, *args, n_samples=10)
        sample = z.double().flatten().cpu().tolist()
        d = _ks(sample, lambda v: _cdf(family, v, a, b))
        assert d < 1.95 / math.sqrt(len(sample)), (family, seed, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kumaraswamy_extreme_parameters(backend, dtype):
    """a, b over [1e-3, 1e3] (a grid of 7 x 7) and the extreme uniforms: z in
    (0, 1) (clamped at tiny and 1 - ulp), log q and the gradients finite and
    equal to the reference's."""
    _, device = backend
    v = torch.tensor([1e-3, 1e-2, 0.3, 1.0, 5.0, 1e2, 1e3], dtype=torch.float64).log()
    la, lb = torch.meshgrid(v, v, indexing="ij")
    p0 = la.reshape(1, 49).to(dtype).to(device).requires_grad_()
    p1 = lb.reshape(1, 49).to(dtype).to(device).requires_grad_()
    z, log_q = SamplePositive.apply(p0, p1, seed_tensor(5, device), 2, 64, True)
    assert (z > 0).all() and (z < 1).all()
    assert torch.isfinite(log_q).all()
    (z.sum() + log_q.sum()).backward()
    assert torch.isfinite(p0.grad).all() and torch.isfinite(p1.grad).all()
    terms = oracle_terms("kumaraswamy", 5, 64, p0, p1, dtype)
    assert_close(z, terms[0], terms[0] * (terms[0].log().abs() + 4.0), "z")
    # log q's terms reach 1e3 * |log m| ~ 3e4: judged against them
    assert_close(log_q, terms[1].sum(-1), _log_q_scale(terms, p0, p1), "log_q")
    # full-mode gradients of the extreme uniforms' words (u = 2**-32 and 1 - 2**-32)
    x = torch.tensor([0, 2**31 - 1])
    t, log_t = described.positive_exp1(x, torch.float64)
    out = described.positive_terms(2, t[:, None], log_t[:, None], la.reshape(1, 49), lb.reshape(1, 49),
                                   torch.float64)
    assert all(torch.isfinite(o).all() for o in out)


def test_exponential_is_weibull_with_concentration_one(backend):
    """Weibull(1 / rate, 1) draws the exponential's z and log q from the same t."""
    _, device = backend
    lr = torch.linspace(-2, 2, 12, dtype=torch.float64, device=device).reshape(3, 4)
    ze, qe = SamplePositive.apply(lr, lr, seed_tensor(4, device), 0, 3, False)
    zw, qw = SamplePositive.apply(-lr, torch.zeros_like(lr), seed_tensor(4, device), 1, 3, False)
    torch.testing.assert_close(ze, zw, rtol=1e-13, atol=0)
    torch.testing.assert_close(qe, qw, rtol=1e-13, atol=1e-13)


def test_evaluation_layout_matches_the_reference(backend):
    """positive_at at an offset not divisible by 4 and a row stride (the evaluation's layout)."""
    p0, p1 = make_inputs((3,), 6, 11, 1.0, torch.float32, backend[1])
    for family, z, log_q, zr, qr in sampler_checks.evaluation_layout(positive_at, described.sample_positive_forward,
                                                                     FAMILIES, p0, p1):
        assert_close(z, zr, zr * (zr.log().abs() + 4.0), f"z ({family})")
        assert_close(log_q, qr, qr.abs() + 100.0, f"log_q ({family})")


def test_empty_and_one_sample(backend):
    _, device = backend
    x = torch.zeros(0, 3, device=device)
    z, log_q = fastvae.sample_positive("weibull", x, x, 2)
    assert z.shape == (2, 0, 3) and log_q.shape == (2, 0)
    z, log_q = fastvae.sample_positive("exponential", torch.zeros(3, device=device))
    assert z.shape == (3,) and log_q.shape == () and (z > 0).all()


def test_errors_name_the_argument():
    fastvae.set_value_checks("always")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="family must be one of"):
        fastvae.sample_positive("gamma", x, x)
    with pytest.raises(ValueError, match="log_concentration must be finite"):
        fastvae.sample_positive("weibull", x, torch.full((2, 3), math.nan))
    with pytest.raises(ValueError, match="log_rate must be finite"):
        fastvae.sample_positive("exponential", torch.full((2, 3), math.inf))
    with pytest.raises(ValueError, match="log_b must be finite"):
        fastvae.Positive("kumaraswamy", x, torch.full((2, 3), -math.inf))
    with pytest.raises(TypeError, match="log_a must be a floating-point"):
        fastvae.sample_positive("kumaraswamy", torch.zeros(2, 3, dtype=torch.int64), x)
    with pytest.raises(ValueError, match="shape mismatch: log_scale"):
        fastvae.sample_positive("weibull", x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="takes one parameter"):
        fastvae.sample_positive("exponential", x, x)
    with pytest.raises(ValueError, match="takes two parameters"):
        fastvae.sample_positive("weibull", x)
    with pytest.raises(ValueError, match="n_samples"):
        fastvae.sample_positive("weibull", x, x, 0)


# the closed form is torch code on every backend, which only draws t: one case under the interpreter
@pytest.mark.parametrize("stop_score", [True] if INTERPRET else [False, True])
@pytest.mark.parametrize("family", ("kumaraswamy",) if INTERPRET else FAMILIES)
def test_double_backward(backend, family, stop_score):
    """create_graph=True: the closed form's second derivative (gradgradcheck, float64)."""
    p0, p1 = make_inputs((3,), 4, 6, 0.7, torch.float64, backend[1], requires_grad=True)
    assert sampler_checks.double_backward(SamplePositive.apply, FAMILIES, family, p0, p1, stop_score,
                                          reads_p1=family != "exponential")


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(lambda a, b: fastvae.sample_positive("weibull", a, b, K), (B, L), (B, L))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (the backward sums over samples)."""
    p0, p1 = leaf(20000, 8, scale=0.3), leaf(20000, 8, scale=0.3)
    return [lambda: run(lambda a, b: fastvae.sample_positive("weibull", a, b, 4, generator=gen(2)), p0, p1)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    p0, p1 = leaf(3, 4), leaf(3, 4)
    return lambda: run(lambda a, b: fastvae.sample_positive("kumaraswamy", a * 0.3, b * 0.3, 5, generator=gen(1)),
                       p0, p1)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck (every family
    and the stop-score mode: test_double_backward above)."""
    return {
        "sample_positive": (lambda a, b: fastvae.sample_positive("kumaraswamy", a, b, 2, generator=gen(3)),
                            [r(3, 4), r(3, 4)], False),
    }
