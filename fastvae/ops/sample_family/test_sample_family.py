"""sample_location_scale and sample_positive against their float64 oracles
(fastvae/ops/sample_family/__init__.py), per backend (the root conftest.py).
sample_location_scale: values and gradients for every family, the uniforms
bit for bit, the samples' distribution against scipy's CDFs, log q against
torch.distributions, the extremes of the scale, errors, and the double
backward. sample_positive: values and gradients of every family (exponential,
Weibull, Kumaraswamy), the samples' distribution against the closed-form
CDFs, log q against torch.distributions, the Kumaraswamy at a, b in
[1e-3, 1e3], the evaluation's layout, errors, and the double backward. Then
each op's draw with the closed-form KL fused, and the family's cases of the
suite-wide checks.
sample_concrete (the section below its header): values and gradients (plain and stop-score), the straight-through (hard)
variant, log q against torch.distributions' RelaxedOneHotCategorical, the
Gumbel-max property and a Kolmogorov-Smirnov test of the two-category
marginal, temperatures over [1e-3, 1e3], masked (-inf) categories, half
precision, the evaluation's layout, errors (its double backward's:
tests/test_double_backward.py); and its cases of the suite-wide checks."""
import math

import pytest
import torch
import torch.distributions as td
from hypothesis import strategies as st

import fastvae
from fastvae import _philox
from fastvae._families import LOCATION_SCALE_FAMILIES, POSITIVE_FAMILIES
from fastvae.ops import sample_family as described
from fastvae.ops.sample_family import op as family_op
from fastvae.ops.sample_family import sample_location_scale_forward, standardized
from fastvae.ops.sample_family.op import (
    SampleConcrete,
    SampleLocationScale,
    SamplePositive,
    concrete_at,
    location_scale_at,
    positive_at,
    sample_concrete_unchecked,
)

from conftest import INTERPRET
from helpers import (
    RTOL,
    assert_close,
    assert_same_but_fma,
    float_dtype_examples,
    fused_kl_checks,
    gen,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    philox_seed_of,
    plan_device_fixture,
    sampler_checks,
    seed_tensor,
)

FUSED_PRIORS = [(), (1,), (5,), (1, 5), (3, 5), (2, 3, 5)]  # every form that broadcasts to q's (2, 3, 5)


def _kl_binding_arrays():
    """The fused KL bindings' valid arrays: q's two parameters (4, 3), a
    shared prior parameter (3,), z (1, 4, 3) and kl (4,)."""
    return (torch.zeros(4, 3).numpy(), torch.zeros(4, 3).numpy(), torch.zeros(3).numpy(),
            torch.zeros(1, 4, 3).numpy(), torch.zeros(4).numpy())


# -- sample_location_scale ---------------------------------------------------------

# the interpreter runs each Triton program as Python (~1 ms): fewer examples there
LOCATION_SCALE_EXAMPLES = 8 if INTERPRET else 40

LOCATION_SCALE_LATENT = [1, 2, 3, 7, 32, 33, 1025]


@st.composite
def location_scale_problems(draw):
    """(family, batch, L, K, data seed, log-scale bound), K * B * L kept small."""
    family = draw(st.sampled_from(LOCATION_SCALE_FAMILIES))
    L = draw(st.sampled_from(LOCATION_SCALE_LATENT))
    max_rows = max(1, 3000 // L)
    batch = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    while math.prod(batch) > max_rows:
        batch = batch[1:]
    K = draw(st.sampled_from([1, 2, 5]))
    return family, batch, L, K, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.5, 3.0, 20.0]))


def location_scale_make_inputs(batch, L, data_seed, bound, dtype, device, requires_grad=False):
    g = torch.Generator().manual_seed(data_seed)
    loc = (torch.randn((*batch, L), generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    ls = ((torch.rand((*batch, L), generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
    return loc.requires_grad_(requires_grad), ls.requires_grad_(requires_grad)


def oracle_noise(family, seed, shape, dtype):
    """(e, log f, psi) in float64 from the uniforms a `dtype` op draws (the training layout)."""
    offsets = torch.arange(math.prod(shape), dtype=torch.int64)
    x = _philox.philox_word(seed, offsets)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return tuple(t.reshape(shape) for t in standardized(LOCATION_SCALE_FAMILIES.index(family), x, acc))


def location_scale_oracle(family, loc64, ls64, seed, K, dtype, stop_score=False):
    """(z, log q) differentiable in float64 loc64, ls64; with stop_score log q's
    parameters are detached and z keeps d/dz log q = psi / scale."""
    e, log_f, psi = oracle_noise(family, seed, (K, *loc64.shape), dtype)
    z = loc64 + torch.exp(ls64) * e
    if not stop_score:
        return z, (log_f - ls64).sum(-1)
    value = (log_f - ls64.detach()).sum(-1)
    return z, value + (psi * torch.exp(-ls64.detach()) * (z - z.detach())).sum(-1)


@float_dtype_examples(LOCATION_SCALE_EXAMPLES, problem=location_scale_problems())
def test_location_scale_forward_matches_reference(backend, dtype, problem):
    family, K = problem[0], problem[3]
    seed, loc, ls, z, log_q = sampler_checks.forward(SampleLocationScale.apply, LOCATION_SCALE_FAMILIES,
                                                     location_scale_make_inputs, problem, dtype, backend[1])
    loc64, ls64 = loc.double().cpu(), ls.double().cpu()
    e, log_f, _ = oracle_noise(family, seed, (K, *loc64.shape), dtype)
    z_ref, q_ref = location_scale_oracle(family, loc64, ls64, seed, K, dtype)
    s = torch.exp(ls64)
    assert_close(z, z_ref, loc64.abs() + s * (e.abs() + 2.0), "z")
    assert_close(log_q, q_ref, (log_f.abs() + ls64.abs() + 2.0).sum(-1), "log_q")


@float_dtype_examples(LOCATION_SCALE_EXAMPLES, problem=location_scale_problems(), stop_score=st.booleans())
def test_location_scale_backward_matches_reference_autograd(backend, dtype, problem, stop_score):
    family, K = problem[0], problem[3]
    seed, gz, gq, (dloc, dls), (loc64, ls64) = sampler_checks.backward(
        SampleLocationScale.apply, LOCATION_SCALE_FAMILIES, location_scale_make_inputs, problem, dtype, backend[1],
        stop_score)
    z_ref, q_ref = location_scale_oracle(family, loc64, ls64, seed, K, dtype, stop_score)
    dloc_ref, dls_ref = torch.autograd.grad((z_ref, q_ref), (loc64, ls64), (gz.double(), gq.double()))
    e, _, psi = oracle_noise(family, seed, (K, *loc64.shape), dtype)
    s = torch.exp(ls64.detach())
    gqe = gq.double()[..., None].abs()
    dloc_scale = gz.double().abs().sum(0) + (gqe * psi.abs()).sum(0) / s
    dls_scale = s * (gz.double().abs() * (e.abs() + 1.0)).sum(0) + (gqe * (psi * e).abs() + gqe).sum(0)
    assert dloc.dtype == dtype and dls.dtype == dtype
    assert_close(dloc, dloc_ref, dloc_scale, "dloc")
    assert_close(dls, dls_ref, dls_scale, "dlog_scale")


@pytest.mark.parametrize("family", LOCATION_SCALE_FAMILIES)
def test_location_scale_backward_split_over_samples(backend, family, sample_splits):
    """K = 7 samples of one short row: the Triton backward's split path (forced), every family."""
    loc, ls = location_scale_make_inputs((2,), 5, 3, 1.0, torch.float32, backend[1], requires_grad=True)
    dloc, dls = sampler_checks.split_over_samples(SampleLocationScale.apply, location_scale_oracle,
                                                  LOCATION_SCALE_FAMILIES, family, loc, ls)
    assert_close(loc.grad, dloc, dloc.abs() + 50.0, "dloc")
    assert_close(ls.grad, dls, dls.abs() + 50.0, "dlog_scale")


def test_uniforms_are_bit_exact(backend):
    """family "uniform" at loc 0, scale 1 returns u itself: the float32 uniforms
    of the RNG contract, bit for bit on every backend, in (0, 1) at both ends."""
    _, device = backend
    n = 4 * 1031
    loc = torch.zeros(1, n, device=device)
    z, log_q = SampleLocationScale.apply(loc, loc, seed_tensor(2024, device), 0, 3, False)
    x = _philox.philox_word(2024, torch.arange(3 * n))
    u, _ = _philox.open_uniforms(x, torch.float32)
    assert torch.equal(z.cpu().flatten(), u)
    assert (u > 0).all() and (u < 1).all()
    assert torch.equal(log_q.cpu(), torch.zeros(3, 1))


def test_open_uniforms_clip_the_tails():
    """The extreme words map to 2**-32 and 1 - 2**-32 (float64) / 1 - 2**-24
    (float32): the stated tails (docs/internals/latents.md)."""
    x = torch.tensor([0, 2**31 - 1, 2**30 - 1, 2**30])
    u64, v64 = _philox.open_uniforms(x, torch.float64)
    assert u64.tolist()[:2] == [2.0**-32, 1 - 2.0**-32] and torch.equal(u64 + v64, torch.ones(4, dtype=torch.float64))
    u32, v32 = _philox.open_uniforms(x, torch.float32)
    assert u32[0].item() == 2.0**-32 and u32[1].item() == 1 - 2.0**-24 and v32[1].item() == 2.0**-32
    e, _, _ = standardized(1, x[:2], torch.float64)  # Laplace: +-log(2**31)
    assert torch.allclose(e, torch.tensor([-31 * math.log(2.0), 31 * math.log(2.0)], dtype=torch.float64))


def test_location_scale_evaluation_layout_matches_the_reference(backend):
    """location_scale_at at an offset not divisible by 4 and a row stride (the evaluation's layout)."""
    loc, ls = location_scale_make_inputs((3,), 6, 11, 2.0, torch.float32, backend[1])
    for family, z, log_q, zr, qr in sampler_checks.evaluation_layout(location_scale_at, sample_location_scale_forward,
                                                                     LOCATION_SCALE_FAMILIES, loc, ls):
        # the reference above drew float64 uniforms: compare at the float32 uniforms' rounding
        assert_close(z, zr, zr.abs() + 1.0, f"z ({family})")
        assert_close(log_q, qr, qr.abs() + 10.0, f"log_q ({family})")


SCIPY = {"uniform": "uniform", "laplace": "laplace", "logistic": "logistic", "gumbel": "gumbel_r",
         "cauchy": "cauchy"}


@pytest.mark.parametrize("family", LOCATION_SCALE_FAMILIES)
def test_location_scale_samples_follow_the_distribution(backend, family):
    """Kolmogorov-Smirnov against scipy's CDF, three seeds of 12000 samples each."""
    stats = pytest.importorskip("scipy.stats")
    _, device = backend
    loc = torch.full((40, 30), 0.7, device=device)
    ls = torch.full((40, 30), math.log(1.3), device=device)
    dist = getattr(stats, SCIPY[family])(loc=0.7, scale=1.3)
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        z, _ = fastvae.sample_location_scale(family, loc, ls, 10)
        sample = z.double().flatten().cpu().numpy()
        p = stats.kstest(sample, dist.cdf).pvalue
        assert p > 1e-3, (family, seed, p)


@pytest.mark.parametrize("family", LOCATION_SCALE_FAMILIES)
def test_location_scale_log_q_matches_torch_distributions(backend, family):
    """log q of the drawn z equals torch.distributions' log_prob of that z (float64)."""
    _, device = backend
    loc, ls = location_scale_make_inputs((4,), 9, 21, 2.0, torch.float64, device)
    torch.manual_seed(0)
    z, log_q = fastvae.sample_location_scale(family, loc, ls, 3)
    q = fastvae.LocationScale(family, loc, ls).torch_distribution()
    expected = q.log_prob(z)
    assert_close(log_q, expected, expected.abs() + 10.0, "log_q")


@pytest.mark.parametrize("ls_value", [-30.0, 30.0])
@pytest.mark.parametrize("family", LOCATION_SCALE_FAMILIES)
def test_extreme_scales_match_reference(backend, family, ls_value):
    """scale -> 0 and -> inf: finite values and gradients, equal to the float64 reference."""
    _, device = backend
    loc = torch.linspace(-5, 5, 2 * 37, device=device).reshape(2, 37).requires_grad_()
    ls = torch.full((2, 37), ls_value, device=device, requires_grad=True)
    index = LOCATION_SCALE_FAMILIES.index(family)
    z, log_q = SampleLocationScale.apply(loc, ls, seed_tensor(8, device), index, 3, True)
    (z.sum() + log_q.sum()).backward()
    loc64 = loc.detach().double().cpu().requires_grad_()
    ls64 = ls.detach().double().cpu().requires_grad_()
    z_ref, q_ref = location_scale_oracle(family, loc64, ls64, 8, 3, torch.float32, True)
    (z_ref.sum() + q_ref.sum()).backward()
    e, _, psi = oracle_noise(family, 8, (3, 2, 37), torch.float32)
    s = torch.exp(ls64.detach())
    assert_close(z, z_ref, loc64.detach().abs() + s * (e.abs() + 2), "z")
    assert_close(log_q, q_ref, torch.full((3, 2), 40.0 * 37), "log_q")
    assert_close(loc.grad, loc64.grad, 3 + psi.abs().sum(0) / s, "dloc")
    assert_close(ls.grad, ls64.grad, s * (e.abs() + 1).sum(0) + (psi * e).abs().sum(0) + 3, "dlog_scale")


def test_half_precision_inputs(backend):
    """bfloat16 loc and log_scale: z in bfloat16, log q in float32, against the
    float64 reference of the rounded inputs."""
    _, device = backend
    loc, ls = location_scale_make_inputs((5,), 8, 4, 2.0, torch.bfloat16, device)
    z, log_q = SampleLocationScale.apply(loc, ls, seed_tensor(3, device), 1, 2, False)
    assert z.dtype == torch.bfloat16 and log_q.dtype == torch.float32
    z_ref, q_ref = location_scale_oracle("laplace", loc.double().cpu(), ls.double().cpu(), 3, 2, torch.float32)
    assert_close(z, z_ref, z_ref.abs() + 1.0, "z")
    assert_close(log_q, q_ref, q_ref.abs() + 10.0, "log_q")


def test_location_scale_empty_and_one_sample(backend):
    _, device = backend
    z, log_q = fastvae.sample_location_scale("gumbel", torch.zeros(0, 3, device=device),
                                             torch.zeros(0, 3, device=device), 2)
    assert z.shape == (2, 0, 3) and log_q.shape == (2, 0)
    z, log_q = fastvae.sample_location_scale("gumbel", torch.zeros(3, device=device), torch.zeros(3, device=device))
    assert z.shape == (3,) and log_q.shape == () and torch.isfinite(z).all()


def test_location_scale_errors_name_the_argument():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="family must be one of"):
        fastvae.sample_location_scale("student", x, x)
    with pytest.raises(ValueError, match="shape mismatch: loc"):
        fastvae.sample_location_scale("laplace", x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="log_scale must be a floating-point"):
        fastvae.sample_location_scale("laplace", x, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_samples"):
        fastvae.sample_location_scale("laplace", x, x, 0)



def test_evaluation_layout_refuses_offsets_out_of_range():
    """The draw's offsets are checked by name before any kernel runs."""
    x = torch.zeros(2, 3)
    seed = seed_tensor(5, x.device)
    with pytest.raises(ValueError, match="the noise offsets run from 0 to"):
        location_scale_at(1, x, x, seed, 3, offset0=0, sample_stride=2**62, row_stride=3)
    with pytest.raises(ValueError, match="the noise offsets run from -1 to"):
        location_scale_at(1, x, x, seed, 2, offset0=-1, sample_stride=6, row_stride=3)


@pytest.mark.skipif(INTERPRET, reason="main-process tests (cpp backend)")
@pytest.mark.parametrize("op, families, p0", [("sample_location_scale", 5, "loc"), ("sample_positive", 3, "log_p0")])
def test_family_binding_checks_by_name(op, families, p0):
    """The family samplers' shared C++ binding names what it refuses: the family
    index (with the choices), a gradient of the wrong rank, a parameter's shape."""
    from fastvae import _backend
    if not _backend.cpp_available():
        pytest.skip("the cpp backend is not built")
    cpp = _backend.cpp_module()
    a = torch.zeros(2, 3).numpy()
    z, q = torch.zeros(1, 2, 3).numpy(), torch.zeros(1, 2).numpy()
    forward, backward = getattr(cpp, f"{op}_forward"), getattr(cpp, f"{op}_backward")
    with pytest.raises(ValueError, match=f"family: expected 0-{families - 1} .*got {families}"):
        forward(a, a, 5, families, 0, 6, 3, z, q, 1)
    with pytest.raises(ValueError, match="z: expected a 3-d"):
        forward(a, a, 5, 0, 0, 6, 3, a, q, 1)
    with pytest.raises(ValueError, match=f"{p0}: expected a 2-d"):
        forward(z, a, 5, 0, 0, 6, 3, z, q, 1)
    with pytest.raises(ValueError, match="grad_z: expected a 3-d"):
        backward(a, None, a, a, 5, 0, False, a.copy(), a.copy(), 1)
    with pytest.raises(ValueError, match="grad_log_q: expected a 2-d"):
        backward(None, z, a, a, 5, 0, False, a.copy(), a.copy(), 1)
    d0, d1 = a + float("nan"), a + float("nan")
    backward(z + 1.0, q, a, a, 5, 0, True, d0, d1, 1)  # well-formed: both gradients written
    assert torch.isfinite(torch.from_numpy(d0)).all() and torch.isfinite(torch.from_numpy(d1)).all()

# the closed form is torch code on every backend, which only draws e: one case under the interpreter
@pytest.mark.full_interpreted  # 10-15 s interpreted; the replay is the same Functions' on every backend
@pytest.mark.parametrize("stop_score", [True] if INTERPRET else [False, True])
@pytest.mark.parametrize("family", ("gumbel",) if INTERPRET else LOCATION_SCALE_FAMILIES)
def test_location_scale_double_backward(backend, family, stop_score):
    """create_graph=True: the closed form's second derivative (gradgradcheck, float64)."""
    loc, ls = location_scale_make_inputs((3,), 4, 6, 1.0, torch.float64, backend[1], requires_grad=True)
    assert sampler_checks.double_backward(SampleLocationScale.apply, LOCATION_SCALE_FAMILIES, family, loc, ls,
                                          stop_score)


# -- the op's cases of the suite-wide checks (the family's, below, gives them) ----------


def location_scale_launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(lambda loc, ls: fastvae.sample_location_scale("laplace", loc, ls, K), (B, L), (B, L))


def location_scale_thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (the backward sums over samples)."""
    loc, ls = leaf(20000, 8), leaf(20000, 8)
    return [lambda: run(lambda a, b: fastvae.sample_location_scale("laplace", a, b, 4, generator=gen(2)), loc, ls)]


def location_scale_fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    loc, ls = leaf(3, 4), leaf(3, 4)
    return lambda: run(lambda a, b: fastvae.sample_location_scale("logistic", a, b, 5, generator=gen(1)), loc, ls)


def location_scale_double_backward_cases(r):
    """tests/test_location_scale_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck (every family
    and the stop-score mode: test_location_scale_double_backward above)."""
    return {
        "sample_location_scale": (lambda loc, ls: fastvae.sample_location_scale("logistic", loc, ls, 2,
                                                                                generator=gen(3)),
                                  [r(3, 4), r(3, 4)], False),
    }


# -- the closed-form KL fused into the draw (sample_location_scale_kl_*) -------------------

LOCATION_SCALE_KL_CASES = [  # (N, L, K, prior shared, log-scale bound)
    (1, 1, 1, True, 0.5), (37, 5, 1, False, 3.0), (13, 33, 3, True, 3.0), (3, 1025, 2, False, 0.5),
    (5, 7, 1, True, 20.0),
]
KL_LOCATION_FAMILIES = ("laplace", "uniform", "gumbel", "cauchy")


def _location_scale_kl_problem(name, N, L, K, shared, bound, dtype, device):
    """(q (loc, log_scale), prior (loc, log_scale), grad_z, grad_kl): a uniform
    prior wide enough that q's support lies inside it (a finite KL)."""
    loc, ls = location_scale_make_inputs((N,), L, N * L + K, bound, dtype, device)
    g = torch.Generator().manual_seed(N + L)
    p_shape = (L,) if shared else (N, L)
    p_loc = (0.5 * torch.randn(p_shape, generator=g, dtype=torch.float64))
    p_ls = (0.3 * torch.randn(p_shape, generator=g, dtype=torch.float64))
    if name == "uniform":
        p_loc, p_ls = p_loc - 60.0 - 2 * math.exp(bound), p_ls + math.log(120.0) + bound + 1.0
    grad_z = torch.randn(K, N, L, generator=g, dtype=torch.float64)
    grad_kl = torch.randn(N, generator=g, dtype=torch.float64)
    return (loc, ls), tuple(t.to(dtype).to(device) for t in (p_loc, p_ls, grad_z, grad_kl))


def _location_scale_fused(backend_name, q, p, seed, family, kl_family, K, grad_z, grad_kl, need_dp,
                          of_scale=False):
    """The fused kernels' (z, kl) and (dloc, dlog_scale, dprior_loc, dprior_log_scale);
    with ``of_scale`` (cpp alone) q as (loc, scale), and its scale's gradient in dlog_scale's place."""
    (loc, ls), (p_loc, p_ls) = q, p
    N, L = loc.shape
    z, kl = loc.new_empty(K, N, L), loc.new_empty(N)
    if of_scale:
        def launch(_, kernel, work, **args):
            fastvae._backend.launch_cpp(kernel, work, {"of_scale": True}, **args)
    else:
        launch = fastvae._backend.launch
    launch(backend_name, "sample_location_scale_kl_forward", z.numel(), loc=loc, log_scale=ls, prior_loc=p_loc,
           prior_log_scale=p_ls, seed=seed, family=family, kl_family=kl_family, z=z, kl=kl)
    d = [torch.full_like(loc, float("nan")) for _ in range(4 if need_dp else 2)] + [None] * (0 if need_dp else 2)
    launch(backend_name, "sample_location_scale_kl_backward", z.numel(), grad_z=grad_z, grad_kl=grad_kl, loc=loc,
           log_scale=ls, prior_loc=p_loc, prior_log_scale=p_ls, seed=seed, family=family, kl_family=kl_family,
           dloc=d[0], dlog_scale=d[1], dprior_loc=d[2], dprior_log_scale=d[3])
    return (z, kl), d


def _location_scale_separate(backend_name, q, p, seed, family, kl_family, K, grad_z, grad_kl, need_dp):
    """The same from the sampler's and family_kl's own kernels, their q
    gradients added as autograd adds them."""
    (loc, ls), (p_loc, p_ls) = q, p
    N, L = loc.shape
    launch = fastvae._backend.launch
    z, kl = loc.new_empty(K, N, L), loc.new_empty(N)
    launch(backend_name, "sample_location_scale_forward", z.numel(), loc=loc, log_scale=ls, seed=seed, family=family,
           offset0=0, sample_stride=N * L, row_stride=L, z=z, log_q=None)
    launch(backend_name, "family_kl_forward", N * L, q_loc=loc, q_log_param=ls, p_loc=p_loc, p_log_param=p_ls,
           family=kl_family, kl=kl)
    ds = [torch.empty_like(loc) for _ in range(2)]
    dk = [torch.empty_like(loc) for _ in range(4 if need_dp else 2)] + [None] * (0 if need_dp else 2)
    if grad_z is not None:
        launch(backend_name, "sample_location_scale_backward", z.numel(), grad_z=grad_z, grad_log_q=None, loc=loc,
               log_scale=ls, seed=seed, family=family, stop_score=False, dloc=ds[0], dlog_scale=ds[1])
    if grad_kl is not None:
        launch(backend_name, "family_kl_backward", N * L, grad_kl=grad_kl, q_loc=loc, q_log_param=ls, p_loc=p_loc,
               p_log_param=p_ls, family=kl_family, dq_loc=dk[0], dq_log_param=dk[1], dp_loc=dk[2],
               dp_log_param=dk[3])
    if grad_z is None:
        ds = dk[:2]
    elif grad_kl is not None:
        ds = [a + b for a, b in zip(ds, dk[:2])]
    return (z, kl), ds + (dk[2:] if grad_kl is not None else [torch.zeros_like(loc)] * 2 if need_dp else [None] * 2)


@pytest.mark.parametrize("family", KL_LOCATION_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K, shared, bound", LOCATION_SCALE_KL_CASES)
def test_location_scale_fused_kl_is_the_sampler_and_family_kl_bit_for_bit(backend, family, dtype, N, L, K, shared,
                                                                           bound):
    """z and the KL's row sums, and the gradients (q's the sampler's plus the
    KL's, the prior's per row): the same bits as the sampler's and
    family_kl's kernels run one after the other, with both upstream
    gradients, either alone, and with or without the prior's (the Triton
    kernel's KL row sums: up to the order of the sum, assert_same)."""
    from fastvae._families import KL_FAMILIES

    name, device = backend
    q, (p_loc, p_ls, grad_z, grad_kl) = _location_scale_kl_problem(family, N, L, K, shared, bound, dtype, device)
    seed = seed_tensor(N * 1000 + L, device)
    index, kl_index = LOCATION_SCALE_FAMILIES.index(family), KL_FAMILIES.index(family)
    for gz, gkl, need_dp in ((grad_z, grad_kl, True), (grad_z, grad_kl, False), (None, grad_kl, True),
                             (grad_z, None, False), (grad_z, None, True)):
        fused = _location_scale_fused(name, q, (p_loc, p_ls), seed, index, kl_index, K, gz, gkl, need_dp)
        separate = _location_scale_separate(name, q, (p_loc, p_ls), seed, index, kl_index, K, gz, gkl, need_dp)
        for i, (a, b) in enumerate(zip((*fused[0], *fused[1]), (*separate[0], *separate[1]))):
            assert (a is None) == (b is None)
            if a is not None:
                assert not torch.isnan(a).any()  # (a Gumbel KL at scale ratio e^20 is inf)
                assert_same(a, b, i == 1 and name == "triton", L)


def assert_same(got, want, row_sums: bool, L: int) -> None:
    """The same bits (off a GPU; assert_same_but_fma); or, for the Triton kernel's KL row sums (``row_sums``),
    the same up to the order of the sum: the fused kernel adds the L terms in
    its draw's tiles, family_kl's kernel in its own. Each order is within
    (L - 1) eps of the sum of the terms' magnitudes, and every term of a KL is
    >= 0 up to its own rounding, so 2 L eps |kl| bounds their difference; the
    infinite sums must agree exactly."""
    if not row_sums:
        assert_same_but_fma(got, want)
        return
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite], want[~finite])
    eps = torch.finfo(want.dtype).eps
    assert ((got[finite] - want[finite]).abs() <= 2 * L * eps * want[finite].abs() + eps).all()


@pytest.mark.parametrize("family", KL_LOCATION_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K, shared, bound", LOCATION_SCALE_KL_CASES[:4])
def test_location_scale_fused_kl_matches_the_float64_oracle(backend, family, dtype, N, L, K, shared, bound):
    """Values and every gradient against plain float64 autograd of the draw
    and family_kl's formula, with the prior's gradients summed back to a
    shared prior's (L,) as the objectives do."""
    _check_fused_kl_against_the_oracle(backend, family, dtype, N, L, K, shared, bound, False)


@pytest.mark.skipif(not fastvae._backend.cpp_available(), reason="the C++ kernels' scale form")
@pytest.mark.parametrize("family", KL_LOCATION_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# and q's of several of the forward's tiles (8192 elements each), with a prior per row and a shared one
@pytest.mark.parametrize("N, L, K, shared, bound",
                         LOCATION_SCALE_KL_CASES + [(301, 33, 2, False, 3.0), (263, 41, 1, True, 3.0)])
def test_location_scale_fused_kl_of_scale_matches_the_float64_oracle(family, dtype, N, L, K, shared, bound):
    """The C++ kernels with q's scale as it is (of_scale: a torch object's,
    logged in the kernels): values and every gradient, the scale's own in
    place of the log-scale's, against float64 autograd through log(scale);
    odd sizes, several samples, rows longer than a block, several tiles,
    scales e^-20 to e^20."""
    _check_fused_kl_against_the_oracle(("cpp", "cpu"), family, dtype, N, L, K, shared, bound, True)


def _check_fused_kl_against_the_oracle(backend, family, dtype, N, L, K, shared, bound, of_scale):
    from fastvae._families import KL_FAMILIES
    from fastvae.ops.family_kl import family_kl_terms
    from fastvae.ops.family_kl.test_family_kl import grad_size, term_size

    name, device = backend
    if family == "gumbel":  # family_kl's domain: e^lgamma(1 + b1/b2) grows as (b1/b2)^(b1/b2), scales within ~10x
        bound = min(bound, 1.0)
    (loc, ls), (p_loc, p_ls, grad_z, grad_kl) = _location_scale_kl_problem(family, N, L, K, shared, bound, dtype,
                                                                           device)
    seed = N * 1000 + L
    q_b = torch.exp(ls) if of_scale else ls  # the scale in the input dtype, as a torch object holds it
    (z, kl), d = _location_scale_fused(name, (loc, q_b), (p_loc, p_ls), seed_tensor(seed, device),
                                       LOCATION_SCALE_FAMILIES.index(family), KL_FAMILIES.index(family), K, grad_z,
                                       grad_kl, True, of_scale)
    leaves = [t.double().cpu().requires_grad_() for t in (loc, q_b, p_loc, p_ls)]
    q_ls = torch.log(leaves[1]) if of_scale else leaves[1]
    z_ref, _ = location_scale_oracle(family, leaves[0], q_ls, seed, K, dtype)
    terms = family_kl_terms(KL_FAMILIES.index(family), leaves[0], q_ls, *leaves[2:])
    kl_ref = terms.sum(-1)
    gz, gkl = grad_z.double().cpu(), grad_kl.double().cpu()
    refs = torch.autograd.grad((z_ref * gz).sum() + (kl_ref * gkl).sum(), leaves, allow_unused=True)
    refs = [torch.zeros_like(t) if r is None else r for r, t in zip(refs, leaves)]  # (the uniform's prior loc)
    e, _, _ = oracle_noise(family, seed, (K, N, L), dtype)
    args = [t.detach() for t in (leaves[0], q_ls, *leaves[2:])]
    s = torch.exp(args[1])
    assert_close(z, z_ref, args[0].abs() + s * (e.abs() + 2.0), "z")
    # the KL's part: family_kl's own tolerance (its terms' sizes, their arguments' relative errors)
    size = term_size(KL_FAMILIES.index(family), *args)
    assert_close(kl, kl_ref, size.sum(-1), "kl")
    kl_scale = gkl.abs()[:, None] * size * (1.0 + grad_size(KL_FAMILIES.index(family), *args))
    per_unit = torch.exp(-args[1]) + torch.exp(-args[3].expand_as(args[1]))  # a location's: per unit of scale
    sampler = (gz.abs().sum(0), (gz * e).abs().sum(0) * s)
    for name, got, want, scale in (("dloc", d[0], refs[0], sampler[0] + kl_scale * per_unit),
                                   ("dlog_scale", d[1], refs[1], (sampler[1] + kl_scale) / (s if of_scale else 1.0)),
                                   ("dprior_loc", d[2], refs[2], kl_scale * per_unit),
                                   ("dprior_log_scale", d[3], refs[3], kl_scale)):
        if shared and name.startswith("dprior"):  # per row: summed back to the (L,) prior
            got, scale = got.sum(0), scale.sum(0)
        assert_close(got, want, scale, name)


@pytest.mark.skipif(not fastvae._backend.cpp_available(), reason="the C++ binding's checks")
def test_location_scale_fused_kl_binding_names_a_wrong_argument():
    C, (loc, ls, p, z, kl) = fastvae._backend.cpp_module(), _kl_binding_arrays()
    C.sample_location_scale_kl_forward(loc, ls, p, p, 1, 1, 0, z, kl, 1)  # the valid call
    with pytest.raises(ValueError, match="kl_family"):  # the exponential has no location
        C.sample_location_scale_kl_forward(loc, ls, p, p, 1, 1, 4, z, kl, 1)
    for kl_family in (5, 6, 7):  # the Kumaraswamy's and the Weibull's (positive families), none
        with pytest.raises(ValueError, match="kl_family: expected one of family_kl's location-scale"):
            C.sample_location_scale_kl_forward(loc, ls, p, p, 1, 1, kl_family, z, kl, 1)
    with pytest.raises(ValueError, match="prior_loc"):
        C.sample_location_scale_kl_forward(loc, ls, torch.zeros(4).numpy(), p, 1, 1, 0, z, kl, 1)
    with pytest.raises(ValueError, match="prior_log_scale"):
        C.sample_location_scale_kl_forward(loc, ls, torch.zeros(4, 3).numpy(), torch.zeros(4, 2).numpy(), 1, 1, 0,
                                           z, kl, 1)
    with pytest.raises(ValueError, match="kl"):
        C.sample_location_scale_kl_forward(loc, ls, p, p, 1, 1, 0, z, torch.zeros(5).numpy(), 1)
    with pytest.raises(ValueError, match="family"):
        C.sample_location_scale_kl_forward(loc, ls, p, p, 1, 5, 0, z, kl, 1)
    d = [torch.zeros(4, 3).numpy() for _ in range(4)]
    with pytest.raises(ValueError, match="dprior_loc and dprior_log_scale"):
        C.sample_location_scale_kl_backward(z, kl, loc, ls, p, p, 1, 1, 0, d[0], d[1], d[2], None, 1)
    with pytest.raises(ValueError, match="grad_kl"):
        C.sample_location_scale_kl_backward(z, torch.zeros(3).numpy(), loc, ls, p, p, 1, 1, 0, d[0], d[1], None,
                                            None, 1)
    with pytest.raises((ValueError, TypeError), match="float"):
        C.sample_location_scale_kl_forward(loc.astype("float16"), ls.astype("float16"), p.astype("float16"),
                                           p.astype("float16"), 1, 1, 0, z.astype("float16"),
                                           kl.astype("float16"), 1)


@pytest.mark.skipif(not fastvae._backend.cpp_available(), reason="the C++ binding's checks")
def test_only_the_location_scale_fused_kl_takes_a_scale():
    """of_scale is sample_location_scale_kl_*'s keyword (off by default); the
    positive sampler, whose parameters are logs, refuses it by name."""
    C, (a, b, p, z, kl) = fastvae._backend.cpp_module(), _kl_binding_arrays()
    scale = torch.ones(4, 3).numpy()
    kl.fill(1.0)
    C.sample_location_scale_kl_forward(a, scale, p, p, 1, 1, 0, z, kl, 1, of_scale=True)
    z_log, kl_log = z.copy(), kl.copy()
    C.sample_location_scale_kl_forward(a, b, p, p, 1, 1, 0, z_log, kl_log, 1)  # log-scale 0: the same unit scales
    assert (z == z_log).all() and (kl == 0).all() and (kl_log == 0).all()  # Laplace(0, 1) against itself
    with pytest.raises(ValueError, match="of_scale: sample_positive takes its parameters as logs"):
        C.sample_positive_kl_forward(a, b, p, p, 1, 0, 4, z, kl, 1, of_scale=True)
    d = [torch.zeros(4, 3).numpy() for _ in range(2)]
    with pytest.raises(ValueError, match="of_scale: sample_positive takes its parameters as logs"):
        C.sample_positive_kl_backward(z, kl, a, b, p, p, 1, 0, 4, d[0], d[1], None, None, 1, of_scale=True)


# -- the log-ratio to a prior of the posterior's own family (C++ prior_a, prior_b) ----------

RATIO_CASES = [  # (N, L, K): one element, odd sizes, rows across blocks, several tiles, rows longer than a block
    (1, 1, 1), (3, 7, 2), (17, 33, 3), (301, 41, 2), (5, 600, 1)]


@pytest.fixture
def cpp_backend():
    """The cpp backend for the test's duration: the ratio's kernels are C++
    ones, and the composite they are checked against must draw the same z
    (the interpreter run's triton sampler rounds its transforms otherwise)."""
    with fastvae.use_backend("cpp"):
        yield


def _ratio_problem(family, N, L, K, dtype, bound=2.0):
    """q's (loc, log_scale) (N, L), the prior's (a, b) (L,) (a uniform's
    around every z q can draw), and upstream gradients, in dtype."""
    g = torch.Generator().manual_seed(N * 100 + L * 10 + K)
    loc = torch.randn(N, L, generator=g, dtype=torch.float64)
    ls = bound * (2 * torch.rand(N, L, generator=g, dtype=torch.float64) - 1)
    if family == "uniform":
        a = loc.min(0).values - 1.0 - torch.rand(L, generator=g, dtype=torch.float64)
        b = (loc + ls.exp()).max(0).values + 1.0 + torch.rand(L, generator=g, dtype=torch.float64)
    else:
        a = 0.5 * torch.randn(L, generator=g, dtype=torch.float64)
        b = 0.5 + torch.rand(L, generator=g, dtype=torch.float64)
    grad_z = torch.randn(K, N, L, generator=g, dtype=torch.float64)
    grad_r = torch.randn(K, N, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (loc, ls, a, b, grad_z, grad_r)]


def _ratio_composite(family, loc, ls, a, b, seed, K, stop_score):
    """(z, log q - log p) as the unfused ops compose them: sample_location_scale's
    Function, then the prior's log-density in torch."""
    index = LOCATION_SCALE_FAMILIES.index(family)
    z, log_q = SampleLocationScale.apply(loc, ls, seed, index, K, stop_score)
    return z, log_q - family_op.prior_log_density(index, z, a, b)


@pytest.mark.skipif(not fastvae._backend.cpp_available(), reason="the C++ kernels' prior options")
@pytest.mark.parametrize("family", LOCATION_SCALE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K", RATIO_CASES)
@pytest.mark.parametrize("stop_score", [False, True])
@pytest.mark.parametrize("learned_prior", [False, True])
def test_location_scale_ratio_matches_the_float64_composite(cpp_backend, family, dtype, N, L, K, stop_score,
                                                            learned_prior):
    """SampleLocationScaleRatio (the C++ kernels with prior_a, prior_b): z is
    sample_location_scale's bit for bit, and log q - log p and every gradient
    (q's; the prior's where it learns) agree with the float64 composition of
    sample_location_scale's Function and the prior's torch log-density, to
    the kernels' rounding of each term's size."""
    index = LOCATION_SCALE_FAMILIES.index(family)
    loc, ls, a, b, grad_z, grad_r = _ratio_problem(family, N, L, K, dtype)
    seed = seed_tensor(N * 7 + L, "cpu")
    leaves = [loc.requires_grad_(), ls.requires_grad_(), a.requires_grad_(learned_prior),
              b.requires_grad_(learned_prior)]
    z, ratio = family_op.SampleLocationScaleRatio.apply(*leaves, seed, index, K, stop_score)
    wrt = leaves if learned_prior else leaves[:2]
    got = torch.autograd.grad([z, ratio], wrt, [grad_z, grad_r])
    z_alone, _ = SampleLocationScale.apply(loc.detach(), ls.detach(), seed, index, K, stop_score)
    assert torch.equal(z, z_alone)

    ref = [t.detach().double().requires_grad_() for t in leaves]
    z64, ratio64 = _ratio_composite(family, *ref, seed, K, stop_score)
    want = torch.autograd.grad([z64, ratio64], ref if learned_prior else ref[:2],
                               [grad_z.double(), grad_r.double()])
    # the tolerances: each term's size, from float64 (e, the family's scores, t = (z - a) / b)
    e = ((z64 - ref[0]) * torch.exp(-ref[1])).detach()
    s, inv_b = torch.exp(ref[1]).detach(), 1.0 / (ref[3] - ref[2] if family == "uniform" else ref[3]).detach()
    z_d = z64.detach().requires_grad_()
    lp = family_op.prior_log_density(index, z_d, ref[2].detach(), ref[3].detach()).sum()
    dlp = torch.autograd.grad(lp, z_d)[0] if lp.requires_grad else torch.zeros_like(z_d)  # (none: the uniform's)
    t = (z64.detach() - ref[2].detach()) * inv_b
    psi = family_op._score(index, e)
    gz, gr = grad_z.double().abs(), grad_r.double().abs()[..., None]
    log_f = family_op.prior_log_density(index, z64.detach(), ref[2].detach(), ref[3].detach())
    size = (torch.log(s).abs() + e.abs() + 2.0 + t.abs() + torch.log(inv_b).abs()).sum(-1) + log_f.abs()
    assert_close(ratio, ratio64, size, "log q - log p")
    scales = [(gz + gr * (dlp.abs() + psi.abs() / s)).sum(0),
              (s * e.abs() * (gz + gr * dlp.abs()) + gr * (1.0 + (psi * e).abs())).sum(0),
              (gr * dlp.abs()).sum((0, 1)) + (gr * inv_b).sum((0, 1)),
              (gr * (dlp.abs() * t.abs() + inv_b)).sum((0, 1))]
    for name, g, w, scale in zip(("dloc", "dlog_scale", "dprior_a", "dprior_b"), got, want, scales):
        assert_close(g, w, scale + 1e-300, name)


@pytest.mark.skipif(not fastvae._backend.cpp_available(), reason="the C++ kernels' prior options")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_location_scale_ratio_is_inf_outside_a_uniform_prior(cpp_backend, dtype):
    """A z outside the uniform prior's [low, high) gives log q - log p = +inf
    (torch's log p there is -inf), inside the composite's value; the
    gradients stay finite and the composite's: the prior's -log(high - low)
    has its gradient wherever z lies, and no z gradient passes the support's step."""
    N, L, K = 9, 2, 3
    g = torch.Generator().manual_seed(5)
    # rows whose z lies inside [-0.5, 1) always, outside always, and either
    loc = torch.tensor([0.0, -1.0, 0.8], dtype=dtype).repeat_interleave(3)[:, None].expand(N, L).contiguous()
    ls = torch.full((N, L), math.log(0.5), dtype=dtype)
    a = torch.full((L,), -0.5, dtype=dtype, requires_grad=True)
    b = torch.full((L,), 1.0, dtype=dtype, requires_grad=True)
    leaves = [loc.requires_grad_(), ls.requires_grad_(), a, b]
    seed = seed_tensor(3, "cpu")
    z, ratio = family_op.SampleLocationScaleRatio.apply(*leaves, seed, 0, K, False)
    outside = ((z < a) | (z >= b)).any(-1)
    assert outside.any() and (~outside).any()
    assert torch.equal(torch.isinf(ratio), outside) and (ratio[outside] > 0).all()
    z2, ratio2 = _ratio_composite("uniform", *leaves, seed, K, False)
    assert torch.equal(z, z2)
    assert_close(ratio[~outside], ratio2[~outside], ratio2[~outside].abs() + 1.0, "inside")
    grad_r = torch.where(outside, 0.0, torch.randn(K, N, generator=g, dtype=dtype))  # an IWAE's weight 0 there
    got = torch.autograd.grad(ratio, leaves, grad_r)
    want = torch.autograd.grad(ratio2, leaves, grad_r, allow_unused=True)
    for name, x, y in zip(("dloc", "dlog_scale", "dlow", "dhigh"), got, want):
        y = torch.zeros_like(x) if y is None else y
        assert torch.isfinite(x).all()
        assert_close(x, y, y.abs() + 1.0, name)


@pytest.mark.skipif(not fastvae._backend.cpp_available(), reason="the C++ kernels' prior options")
@pytest.mark.parametrize("family", LOCATION_SCALE_FAMILIES)
def test_location_scale_ratio_double_backward_is_the_composites(cpp_backend, family):
    """A create_graph backward of SampleLocationScaleRatio replays the
    composition: its gradients' own gradients are the composite's (float64)."""
    index = LOCATION_SCALE_FAMILIES.index(family)
    loc, ls, a, b, grad_z, grad_r = _ratio_problem(family, 4, 3, 2, torch.float64)
    seed = seed_tensor(11, "cpu")
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (loc, ls, a, b)]
        if fused:
            z, ratio = family_op.SampleLocationScaleRatio.apply(*leaves, seed, index, 2, True)
        else:
            z, ratio = _ratio_composite(family, *leaves, seed, 2, True)
        first = torch.autograd.grad([z, ratio], leaves, [grad_z, grad_r], create_graph=True, allow_unused=True)
        first = [torch.zeros_like(t) if d is None else d for d, t in zip(first, leaves)]
        total = sum((d * d).sum() for d in first if d.requires_grad)
        second = torch.autograd.grad(total, leaves, allow_unused=True)
        results.append([torch.zeros_like(t) if d is None else d for d, t in zip(second, leaves)])
    for name, x, y in zip(("loc", "log_scale", "prior_a", "prior_b"), *results):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12), name


@pytest.mark.skipif(not fastvae._backend.cpp_available(), reason="the C++ binding's checks")
def test_location_scale_ratio_binding_names_a_wrong_argument():
    """prior_a, prior_b come together, are the location-scale sampler's
    alone, need log_q, and are (L,); the backward's dprior_a, dprior_b come
    together and need the prior."""
    C = fastvae._backend.cpp_module()
    N, L, K = 4, 3, 2
    loc, ls = torch.zeros(N, L).numpy(), torch.zeros(N, L).numpy()
    p = torch.ones(L).numpy()
    z, q = torch.zeros(K, N, L).numpy(), torch.zeros(K, N).numpy()
    C.sample_location_scale_forward(loc, ls, 1, 1, 0, N * L, L, z, q, 1, prior_a=p * 0, prior_b=p)  # the valid call
    assert (q == 0).all()  # Laplace(0, 1) against itself
    with pytest.raises(ValueError, match="prior_a and prior_b: give both or neither"):
        C.sample_location_scale_forward(loc, ls, 1, 1, 0, N * L, L, z, q, 1, prior_a=p)
    with pytest.raises(ValueError, match="log_q: the log-ratio to the prior needs its output"):
        C.sample_location_scale_forward(loc, ls, 1, 1, 0, N * L, L, z, None, 1, prior_a=p, prior_b=p)
    with pytest.raises(ValueError, match="prior_b"):
        C.sample_location_scale_forward(loc, ls, 1, 1, 0, N * L, L, z, q, 1, prior_a=p,
                                        prior_b=torch.ones(L + 1).numpy())
    with pytest.raises(ValueError, match="sample_positive takes no prior_a, prior_b"):
        C.sample_positive_forward(loc, ls, 1, 0, 0, N * L, L, z, q, 1, prior_a=p, prior_b=p)
    d = [torch.zeros(N, L).numpy() for _ in range(4)]
    C.sample_location_scale_backward(z, q, loc, ls, 1, 1, False, d[0], d[1], 1, prior_a=p, prior_b=p, dprior_a=d[2],
                                     dprior_b=d[3])
    with pytest.raises(ValueError, match="dprior_a, dprior_b: the prior's gradients need prior_a, prior_b"):
        C.sample_location_scale_backward(z, q, loc, ls, 1, 1, False, d[0], d[1], 1, dprior_a=d[2], dprior_b=d[3])
    with pytest.raises(ValueError, match="dprior_a and dprior_b: give both or neither"):
        C.sample_location_scale_backward(z, q, loc, ls, 1, 1, False, d[0], d[1], 1, prior_a=p, prior_b=p,
                                         dprior_a=d[2])
    with pytest.raises(ValueError, match="sample_positive takes no prior_a, prior_b"):
        C.sample_positive_backward(z, q, loc, ls, 1, 0, False, d[0], d[1], 1, prior_a=p, prior_b=p)
    # no gradient of the ratio: the draw's alone, and the prior's 0
    d[2].fill(7.0)
    d[3].fill(7.0)
    C.sample_location_scale_backward(z, None, loc, ls, 1, 1, False, d[0], d[1], 1, prior_a=p, prior_b=p,
                                     dprior_a=d[2], dprior_b=d[3])
    assert (d[2] == 0).all() and (d[3] == 0).all()


def _location_scale_fused_and_separate(family, p_shape, dtype, device, K, create_graph=False):
    """SampleLocationScaleKL and the two Functions it fuses, on the same leaves:
    (their outputs, their gradients in q's and the prior's parameters)."""
    from fastvae._families import KL_FAMILIES
    from fastvae.ops.family_kl.op import FamilyKL
    from fastvae.ops.sample_family.op import SampleLocationScaleKL

    g = torch.Generator().manual_seed(len(p_shape) * 7 + K)
    loc = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    ls = (0.5 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)).to(dtype).to(device).requires_grad_()
    p_loc = (0.3 * torch.randn(p_shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
    p_ls = (0.3 * torch.randn(p_shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
    if family == "uniform":
        p_loc, p_ls = p_loc - 20.0, p_ls + math.log(60.0)
    p_loc, p_ls = p_loc.requires_grad_(), p_ls.requires_grad_()
    leaves = [loc, ls, p_loc, p_ls]
    index, kl_index = LOCATION_SCALE_FAMILIES.index(family), KL_FAMILIES.index(family)

    def separate(seed):
        z, _ = SampleLocationScale.apply(loc, ls, seed, index, K, False)
        return z, FamilyKL.apply(kl_index, True, loc, ls, p_loc, p_ls)

    return fused_kl_checks.fused_and_separate(
        lambda seed: SampleLocationScaleKL.apply(loc, ls, p_loc, p_ls, seed, index, kl_index, K), separate, leaves,
        K, (2, 3, 5), g, dtype, device, create_graph), leaves


@pytest.mark.parametrize("family", KL_LOCATION_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p_shape", FUSED_PRIORS)
def test_location_scale_fused_function_is_the_two_functions_bit_for_bit(backend, family, dtype, p_shape):
    """SampleLocationScaleKL (the records' ELBO draw against a prior of their
    family) gives SampleLocationScale's z and FamilyKL's KL (on Triton up to
    the order of its row sums), and their summed gradients, the prior's
    summed back to each shape a prior takes."""
    name, device = backend
    for K in (1, 3):
        (fused, separate), leaves = _location_scale_fused_and_separate(family, p_shape, dtype, device, K)
        for i, (a, b) in enumerate(zip((*fused[0], *fused[1]), (*separate[0], *separate[1]))):
            if b is None:  # the uniform's KL does not read the prior's location
                assert a is None or torch.equal(a, torch.zeros_like(a))
                continue
            assert a.shape == b.shape and a.dtype == b.dtype
            assert not torch.isnan(a).any()
            assert_same(a, b, i == 1 and name == "triton", 5)


def test_location_scale_fused_function_differentiates_twice_as_the_two_functions(backend):
    fused_kl_checks.differentiates_twice(_location_scale_fused_and_separate("laplace", (5,), torch.float64,
                                                                            backend[1], 2, create_graph=True))


@pytest.mark.quick_one  # a compile each; one proves the mechanism
@pytest.mark.skipif(INTERPRET, reason="torch.compile traces the main process's ops")
@pytest.mark.parametrize("op, family, kl_family", [("sample_location_scale", 1, 0), ("sample_positive", 2, 5)])
def test_fused_function_compiles_with_changing_shapes(backend, op, family, kl_family):
    """Each op's fused draw and KL, compiled while the shapes change
    (fused_kl_checks): a Laplace against a Laplace prior (family 1, KL family
    0); a Kumaraswamy against a Beta prior (family 2, KL family 5)."""
    from fastvae.ops.sample_family import op as front_end

    unchecked = getattr(front_end, f"{op}_kl_unchecked")
    fused_kl_checks.compiles_with_changing_shapes(unchecked, family, kl_family, backend[1])


# -- sample_positive ---------------------------------------------------------------

POSITIVE_EXAMPLES = 6 if INTERPRET else 30
POSITIVE_LATENT = [1, 3, 7, 32, 33]


@st.composite
def positive_problems(draw):
    """(family, batch, L, K, data seed, log-parameter bound)."""
    family = draw(st.sampled_from(POSITIVE_FAMILIES))
    L = draw(st.sampled_from(POSITIVE_LATENT))
    batch = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    K = draw(st.sampled_from([1, 2, 5]))
    # a Kumaraswamy b << 1 puts z within float64's rounding of 1, where torch's
    # log_prob (the stop-score positive_oracle) is NaN: its extremes have their own test
    bounds = [0.5] if family == "kumaraswamy" else [0.5, 2.0]
    return family, batch, L, K, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(bounds))


def positive_make_inputs(batch, L, data_seed, bound, dtype, device, requires_grad=False):
    g = torch.Generator().manual_seed(data_seed)
    p0 = ((torch.rand((*batch, L), generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
    p1 = ((torch.rand((*batch, L), generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
    return p0.requires_grad_(requires_grad), p1.requires_grad_(requires_grad)


def oracle_terms(family, seed, K, p0, p1, dtype):
    """The positive_oracle's positive_terms (float64) from the uniforms a `dtype` op draws."""
    shape = (K, *p0.shape)
    offsets = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    return described.positive_noise(POSITIVE_FAMILIES.index(family), seed, offsets, p0.detach().double().cpu(),
                                    p1.detach().double().cpu(), dtype)


def torch_q(family, p0, p1):
    a, b = torch.exp(p0), torch.exp(p1)
    if family == "exponential":
        return td.Exponential(a)
    return td.Weibull(a, b) if family == "weibull" else td.Kumaraswamy(a, b)


def positive_oracle(family, p0, p1, seed, K, dtype, stop_score=False):
    """(z, log q) differentiable in float64 p0, p1 (plain autograd of the
    reference); with stop_score log q is the family's log density of z with
    the parameters detached (the score reaches them along z only): torch's
    log_prob, the Kumaraswamy's written in log z."""
    shape = (K, *p0.shape)
    x = _philox.philox_word(seed, torch.arange(math.prod(shape), dtype=torch.int64)).reshape(shape)
    t, log_t = described.positive_exp1(x, torch.float64 if dtype == torch.float64 else torch.float32)
    # z clamped at float64's limits: torch's log_prob of a z clamped at float32's
    # (a Kumaraswamy z within 2**-24 of 1) would not be the density the noise drew
    z, log_f, c0 = described.positive_terms(POSITIVE_FAMILIES.index(family), t, log_t, p0, p1, torch.float64)[:3]
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


@float_dtype_examples(POSITIVE_EXAMPLES, problem=positive_problems())
def test_positive_forward_matches_reference(backend, dtype, problem):
    family, K = problem[0], problem[3]
    seed, p0, p1, z, log_q = sampler_checks.forward(SamplePositive.apply, POSITIVE_FAMILIES, positive_make_inputs,
                                                    problem, dtype, backend[1])
    terms = oracle_terms(family, seed, K, p0, p1, dtype)
    z_ref = terms[0]
    assert_close(z, z_ref, z_ref * (z_ref.log().abs() + p0.double().cpu().abs() + 4.0), "z")
    assert_close(log_q, terms[1].sum(-1), _log_q_scale(terms, p0, p1), "log_q")


@float_dtype_examples(POSITIVE_EXAMPLES, problem=positive_problems(), stop_score=st.booleans())
def test_positive_backward_matches_reference_autograd(backend, dtype, problem, stop_score):
    family, K = problem[0], problem[3]
    seed, gz, gq, grads, (a, b) = sampler_checks.backward(SamplePositive.apply, POSITIVE_FAMILIES, positive_make_inputs,
                                                          problem, dtype, backend[1], stop_score)
    z_ref, q_ref = positive_oracle(family, a, b, seed, K, dtype, stop_score)
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


@pytest.mark.parametrize("family", POSITIVE_FAMILIES)
def test_positive_backward_split_over_samples(backend, family, sample_splits):
    """K = 7 samples of one short row: the Triton backward's split path (forced)."""
    p0, p1 = positive_make_inputs((2,), 5, 3, 1.0, torch.float64, backend[1], requires_grad=True)
    d0, d1 = sampler_checks.split_over_samples(SamplePositive.apply, positive_oracle, POSITIVE_FAMILIES, family, p0, p1)
    assert_close(p0.grad, d0, d0.abs() + 50.0, "dlog_p0")
    if family != "exponential":
        assert_close(p1.grad, d1, d1.abs() + 50.0, "dlog_p1")


@pytest.mark.parametrize("family", POSITIVE_FAMILIES)
def test_positive_log_q_matches_torch_distributions(backend, family):
    """log q of the drawn z equals torch.distributions' log_prob of that z (float64)."""
    _, device = backend
    p0, p1 = positive_make_inputs((4,), 9, 21, 1.5, torch.float64, device)
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


@pytest.mark.parametrize("family", POSITIVE_FAMILIES)
def test_positive_samples_follow_the_distribution(backend, family):
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


def test_positive_evaluation_layout_matches_the_reference(backend):
    """positive_at at an offset not divisible by 4 and a row stride (the evaluation's layout)."""
    p0, p1 = positive_make_inputs((3,), 6, 11, 1.0, torch.float32, backend[1])
    for family, z, log_q, zr, qr in sampler_checks.evaluation_layout(positive_at, described.sample_positive_forward,
                                                                     POSITIVE_FAMILIES, p0, p1):
        assert_close(z, zr, zr * (zr.log().abs() + 4.0), f"z ({family})")
        assert_close(log_q, qr, qr.abs() + 100.0, f"log_q ({family})")


def test_positive_empty_and_one_sample(backend):
    _, device = backend
    x = torch.zeros(0, 3, device=device)
    z, log_q = fastvae.sample_positive("weibull", x, x, 2)
    assert z.shape == (2, 0, 3) and log_q.shape == (2, 0)
    z, log_q = fastvae.sample_positive("exponential", torch.zeros(3, device=device))
    assert z.shape == (3,) and log_q.shape == () and (z > 0).all()


def test_positive_errors_name_the_argument():
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
@pytest.mark.full_interpreted  # 10-15 s interpreted; the replay is the same Functions' on every backend
@pytest.mark.parametrize("stop_score", [True] if INTERPRET else [False, True])
@pytest.mark.parametrize("family", ("kumaraswamy",) if INTERPRET else POSITIVE_FAMILIES)
def test_positive_double_backward(backend, family, stop_score):
    """create_graph=True: the closed form's second derivative (gradgradcheck, float64)."""
    p0, p1 = positive_make_inputs((3,), 4, 6, 0.7, torch.float64, backend[1], requires_grad=True)
    assert sampler_checks.double_backward(SamplePositive.apply, POSITIVE_FAMILIES, family, p0, p1, stop_score,
                                          reads_p1=family != "exponential")


# -- the op's cases of the suite-wide checks (the family's, below, gives them) ----------


def positive_launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(lambda a, b: fastvae.sample_positive("weibull", a, b, K), (B, L), (B, L))


def positive_thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (the backward sums over samples)."""
    p0, p1 = leaf(20000, 8, scale=0.3), leaf(20000, 8, scale=0.3)
    return [lambda: run(lambda a, b: fastvae.sample_positive("weibull", a, b, 4, generator=gen(2)), p0, p1)]


def positive_fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    p0, p1 = leaf(3, 4), leaf(3, 4)
    return lambda: run(lambda a, b: fastvae.sample_positive("kumaraswamy", a * 0.3, b * 0.3, 5, generator=gen(1)),
                       p0, p1)


def positive_double_backward_cases(r):
    """tests/test_positive_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck (every family
    and the stop-score mode: test_positive_double_backward above)."""
    return {
        "sample_positive": (lambda a, b: fastvae.sample_positive("kumaraswamy", a, b, 2, generator=gen(3)),
                            [r(3, 4), r(3, 4)], False),
    }


# -- the closed-form KL fused into the draw (sample_positive_kl_*) -------------------

POSITIVE_KL_CASES = [  # (N, L, K, prior shared)
    (1, 1, 1, True), (1, 1, 3, False), (37, 5, 1, False), (37, 5, 3, True), (13, 33, 3, True), (13, 33, 1, False),
    (3, 1025, 1, True), (3, 1025, 3, False),
]
KL_POSITIVE_FAMILIES = ("exponential", "kumaraswamy", "weibull")  # against an exponential, a Beta, a Weibull
# the interpreter (~1 ms a program): every size, both sample counts and both priors' layouts still
INTERPRET_KL_CASES = POSITIVE_KL_CASES[::2]


def _kl_indices(family):
    from fastvae._families import KL_FAMILIES

    return POSITIVE_FAMILIES.index(family), KL_FAMILIES.index(family)


def _kl_layout(family, p0, p1, r0, r1):
    """family_kl's (q_loc, q_log_param, p_loc, p_log_param): the exponential's log-rates alone."""
    return (None, p0, None, r0) if family == "exponential" else (p0, p1, r0, r1)


def _positive_kl_problem(N, L, K, shared, dtype, device):
    """(q (log_p0, log_p1), prior (log_p0, log_p1), grad_z, grad_kl); the
    exponential's second parameters are values its kernels must not read."""
    p0, p1 = positive_make_inputs((N,), L, N * L + K, 1.0, dtype, device)
    g = torch.Generator().manual_seed(N + L)
    p_shape = (L,) if shared else (N, L)
    r0, r1 = (0.3 * torch.randn(p_shape, generator=g, dtype=torch.float64) for _ in range(2))
    grad_z = torch.randn(K, N, L, generator=g, dtype=torch.float64)
    grad_kl = torch.randn(N, generator=g, dtype=torch.float64)
    return (p0, p1), tuple(t.to(dtype).to(device) for t in (r0, r1, grad_z, grad_kl))


def _positive_fused(backend_name, family, q, p, seed, K, grad_z, grad_kl, need_dp):
    """The fused kernels' (z, kl) and (dlog_p0, dlog_p1, dprior_log_p0, dprior_log_p1)."""
    (p0, p1), (r0, r1) = q, p
    index, kl_index = _kl_indices(family)
    N, L = p0.shape
    z, kl = p0.new_empty(K, N, L), p0.new_empty(N)
    fastvae._backend.launch(backend_name, "sample_positive_kl_forward", z.numel(), log_p0=p0, log_p1=p1,
                            prior_log_p0=r0, prior_log_p1=r1, seed=seed, family=index, kl_family=kl_index, z=z,
                            kl=kl)
    d = [torch.full_like(p0, float("nan")) for _ in range(4 if need_dp else 2)] + [None] * (0 if need_dp else 2)
    fastvae._backend.launch(backend_name, "sample_positive_kl_backward", z.numel(), grad_z=grad_z, grad_kl=grad_kl,
                            log_p0=p0, log_p1=p1, prior_log_p0=r0, prior_log_p1=r1, seed=seed, family=index,
                            kl_family=kl_index, dlog_p0=d[0], dlog_p1=d[1], dprior_log_p0=d[2],
                            dprior_log_p1=d[3])
    return (z, kl), d


def _positive_separate(backend_name, family, q, p, seed, K, grad_z, grad_kl, need_dp):
    """The same from the sampler's and family_kl's own kernels, q's gradients
    added as autograd adds them; the exponential's second parameters' 0."""
    (p0, p1), (r0, r1) = q, p
    index, kl_index = _kl_indices(family)
    exponential = family == "exponential"
    N, L = p0.shape
    launch = fastvae._backend.launch
    q_loc, q_lp, p_loc, p_lp = _kl_layout(family, p0, p1, r0, r1)
    z, kl = p0.new_empty(K, N, L), p0.new_empty(N)
    launch(backend_name, "sample_positive_forward", z.numel(), log_p0=p0, log_p1=p1, seed=seed, family=index,
           offset0=0, sample_stride=N * L, row_stride=L, z=z, log_q=None)
    launch(backend_name, "family_kl_forward", N * L, q_loc=q_loc, q_log_param=q_lp, p_loc=p_loc, p_log_param=p_lp,
           family=kl_index, kl=kl)
    ds = [torch.zeros_like(p0), torch.zeros_like(p0)]
    if grad_z is not None:
        ds = [torch.empty_like(p0) for _ in range(2)]
        launch(backend_name, "sample_positive_backward", z.numel(), grad_z=grad_z, grad_log_q=None, log_p0=p0,
               log_p1=p1, seed=seed, family=index, stop_score=False, dlog_p0=ds[0], dlog_p1=ds[1])
    dp = [torch.zeros_like(p0), torch.zeros_like(p0)] if need_dp else [None, None]
    if grad_kl is not None:
        dk = [torch.empty_like(p0) for _ in range(4)]
        launch(backend_name, "family_kl_backward", N * L, grad_kl=grad_kl, q_loc=q_loc, q_log_param=q_lp,
               p_loc=p_loc, p_log_param=p_lp, family=kl_index, dq_loc=None if exponential else dk[0],
               dq_log_param=dk[1], dp_loc=None if exponential or not need_dp else dk[2],
               dp_log_param=dk[3] if need_dp else None)
        dq = [dk[1], None] if exponential else dk[:2]
        ds = [d if g is None else (g if grad_z is None else d + g) for d, g in zip(ds, dq)]
        if need_dp:
            dp = [dk[3], dp[1]] if exponential else dk[2:]
    return (z, kl), ds + dp


@pytest.mark.parametrize("family", KL_POSITIVE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K, shared", INTERPRET_KL_CASES if INTERPRET else POSITIVE_KL_CASES)
def test_positive_fused_kl_is_the_sampler_and_family_kl_bit_for_bit(backend, family, dtype, N, L, K, shared):
    """z and the KL's row sums, and the gradients (q's the sampler's plus the
    KL's, the prior's per row; the exponential's second parameters' 0): the
    same bits as the sampler's and family_kl's kernels run one after the
    other, with both upstream gradients, either alone, and with or without
    the prior's."""
    name, device = backend
    q, (r0, r1, grad_z, grad_kl) = _positive_kl_problem(N, L, K, shared, dtype, device)
    seed = seed_tensor(N * 1000 + L, device)
    for gz, gkl, need_dp in ((grad_z, grad_kl, True), (grad_z, grad_kl, False), (None, grad_kl, True),
                             (grad_z, None, False), (grad_z, None, True)):
        fused = _positive_fused(name, family, q, (r0, r1), seed, K, gz, gkl, need_dp)
        separate = _positive_separate(name, family, q, (r0, r1), seed, K, gz, gkl, need_dp)
        for a, b in zip((*fused[0], *fused[1]), (*separate[0], *separate[1])):
            assert (a is None) == (b is None)
            if a is not None:
                assert_same_but_fma(a, b)


@pytest.mark.parametrize("family", KL_POSITIVE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K, shared", POSITIVE_KL_CASES[2:4] if INTERPRET else POSITIVE_KL_CASES[1:6])
def test_positive_fused_kl_matches_the_float64_oracle(backend, family, dtype, N, L, K, shared):
    """Values and every gradient against plain float64 autograd of the draw
    and family_kl's formula, with the prior's gradients summed back to a
    shared prior's (L,) as the objectives do."""
    from fastvae.ops.family_kl import family_kl_terms
    from fastvae.ops.family_kl.test_family_kl import grad_size, term_size, torch_trigamma_slack

    from helpers import RTOL

    name, device = backend
    index, kl_index = _kl_indices(family)
    (p0, p1), (r0, r1, grad_z, grad_kl) = _positive_kl_problem(N, L, K, shared, dtype, device)
    seed = N * 1000 + L
    (z, kl), d = _positive_fused(name, family, (p0, p1), (r0, r1), seed_tensor(seed, device), K, grad_z, grad_kl, True)
    leaves = [t.double().cpu().requires_grad_() for t in (p0, p1, r0, r1)]
    z_ref, _ = positive_oracle(family, leaves[0], leaves[1], seed, K, dtype)
    layout = _kl_layout(family, *leaves)
    kl_ref = family_kl_terms(kl_index, *layout).sum(-1)
    gz, gkl = grad_z.double().cpu(), grad_kl.double().cpu()
    refs = torch.autograd.grad((z_ref * gz).sum() + (kl_ref * gkl).sum(), leaves, allow_unused=True)
    refs = [torch.zeros_like(t) if r is None else r for r, t in zip(refs, leaves)]  # the exponential's seconds
    assert_close(z, z_ref, z_ref * (z_ref.log().abs() + leaves[0].detach().abs() + 4.0), "z")
    args = [None if t is None else t.detach() for t in layout]
    size = term_size(kl_index, *args)
    assert_close(kl, kl_ref, size.sum(-1), "kl")
    # the sampler's part as test_positive_backward_matches_reference_autograd's, the KL's as family_kl's tests'
    zz, _, c0, c1 = oracle_terms(family, seed, K, p0, p1, dtype)[:4]
    a, b = (t.detach() for t in leaves[:2])
    sampler = [(gz.abs() * zz * (c.abs() + 1.0)).sum(0) * (1.0 + a.abs() + b.abs()) + 1.0 for c in (c0, c1)]
    kl_scale = gkl.abs()[:, None] * size * (1.0 + grad_size(kl_index, *args))
    if family == "kumaraswamy":  # the reference's own error in d/d log b (family_kl's tests)
        sampler[1] = sampler[1] + gkl.abs()[:, None] * torch_trigamma_slack(*args) / RTOL[dtype]
    for i, (got, want, scale) in enumerate(zip(d, refs, (sampler[0] + kl_scale, sampler[1] + kl_scale, kl_scale,
                                                          kl_scale))):
        if family == "exponential" and i % 2:  # the stand-ins': 0
            assert torch.equal(got, torch.zeros_like(got))
            continue
        if shared and i >= 2:  # per row: summed back to the (L,) prior
            got, scale = got.sum(0), scale.sum(0)
        assert_close(got, want, scale, ("dlog_p0", "dlog_p1", "dprior_log_p0", "dprior_log_p1")[i])


@pytest.mark.skipif(not fastvae._backend.cpp_available(), reason="the C++ binding's checks")
def test_positive_fused_kl_binding_names_a_wrong_argument():
    C, (p0, p1, r, z, kl) = fastvae._backend.cpp_module(), _kl_binding_arrays()
    C.sample_positive_kl_forward(p0, p1, r, r, 1, 0, 4, z, kl, 1)  # the valid calls: exponential, Kumaraswamy,
    C.sample_positive_kl_forward(p0, p1, r, r, 1, 2, 5, z, kl, 1)
    C.sample_positive_kl_forward(p0, p1, r, r, 1, 1, 6, z, kl, 1)  # Weibull
    with pytest.raises(ValueError, match="kl_family: expected 6"):  # the Weibull's is the Weibull's
        C.sample_positive_kl_forward(p0, p1, r, r, 1, 1, 4, z, kl, 1)
    with pytest.raises(ValueError, match="kl_family: expected 5"):
        C.sample_positive_kl_forward(p0, p1, r, r, 1, 2, 4, z, kl, 1)
    with pytest.raises(ValueError, match="kl_family: expected 4"):
        C.sample_positive_kl_forward(p0, p1, r, r, 1, 0, 0, z, kl, 1)
    with pytest.raises(ValueError, match="family"):
        C.sample_positive_kl_forward(p0, p1, r, r, 1, 3, 5, z, kl, 1)
    with pytest.raises(ValueError, match="prior_log_p0"):
        C.sample_positive_kl_forward(p0, p1, torch.zeros(4).numpy(), r, 1, 2, 5, z, kl, 1)
    with pytest.raises(ValueError, match="prior_log_p1"):
        C.sample_positive_kl_forward(p0, p1, torch.zeros(4, 3).numpy(), torch.zeros(4, 2).numpy(), 1, 2, 5, z, kl,
                                     1)
    with pytest.raises(ValueError, match="log_p1"):
        C.sample_positive_kl_forward(p0, torch.zeros(4, 2).numpy(), r, r, 1, 2, 5, z, kl, 1)
    with pytest.raises(ValueError, match="kl"):
        C.sample_positive_kl_forward(p0, p1, r, r, 1, 2, 5, z, torch.zeros(5).numpy(), 1)
    d = [torch.zeros(4, 3).numpy() for _ in range(4)]
    C.sample_positive_kl_backward(z, kl, p0, p1, r, r, 1, 2, 5, d[0], d[1], d[2], d[3], 1)
    with pytest.raises(ValueError, match="dprior_log_p0 and dprior_log_p1"):
        C.sample_positive_kl_backward(z, kl, p0, p1, r, r, 1, 2, 5, d[0], d[1], d[2], None, 1)
    with pytest.raises(ValueError, match="grad_kl"):
        C.sample_positive_kl_backward(z, torch.zeros(3).numpy(), p0, p1, r, r, 1, 2, 5, d[0], d[1], None, None, 1)
    with pytest.raises(ValueError, match="dlog_p1"):
        C.sample_positive_kl_backward(z, kl, p0, p1, r, r, 1, 2, 5, d[0], torch.zeros(3, 4).numpy(), None, None, 1)
    with pytest.raises(ValueError, match="kl_family"):
        C.sample_positive_kl_backward(z, kl, p0, p1, r, r, 1, 0, 5, d[0], d[1], None, None, 1)
    with pytest.raises((ValueError, TypeError), match="float"):
        C.sample_positive_kl_forward(p0.astype("float16"), p1.astype("float16"), r.astype("float16"),
                                     r.astype("float16"), 1, 2, 5, z.astype("float16"), kl.astype("float16"), 1)


def _positive_fused_and_separate(family, p_shape, dtype, device, K, create_graph=False):
    """SamplePositiveKL and the two Functions it fuses, on the same leaves:
    (their outputs, their gradients in q's and the prior's parameters); the
    exponential's second parameters detached aliases of its first, as the
    records make them."""
    from fastvae.ops.family_kl.op import FamilyKL
    from fastvae.ops.sample_family.op import SamplePositiveKL

    g = torch.Generator().manual_seed(len(p_shape) * 7 + K)
    p0, p1 = ((0.5 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)).to(dtype).to(device).requires_grad_()
              for _ in range(2))
    r0, r1 = ((0.3 * torch.randn(p_shape, generator=g, dtype=torch.float64)).to(dtype).to(device).requires_grad_()
              for _ in range(2))
    exponential = family == "exponential"
    if exponential:
        p1, r1 = p0.detach(), r0.detach()
    leaves = [p0, r0] if exponential else [p0, p1, r0, r1]
    index, kl_index = _kl_indices(family)

    def separate(seed):
        z, _ = SamplePositive.apply(p0, p1, seed, index, K, False)
        return z, FamilyKL.apply(kl_index, True, *_kl_layout(family, p0, p1, r0, r1))

    return fused_kl_checks.fused_and_separate(
        lambda seed: SamplePositiveKL.apply(p0, p1, r0, r1, seed, index, kl_index, K), separate, leaves, K,
        (2, 3, 5), g, dtype, device, create_graph), leaves


@pytest.mark.parametrize("family", KL_POSITIVE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p_shape", FUSED_PRIORS[::2] if INTERPRET else FUSED_PRIORS)
def test_positive_fused_function_is_the_two_functions_bit_for_bit(backend, family, dtype, p_shape):
    """SamplePositiveKL (the records' ELBO draw against a prior with a closed
    form) gives SamplePositive's z and FamilyKL's KL, and their summed
    gradients, the prior's summed back to each shape a prior takes."""
    _, device = backend
    for K in (1, 3):
        (fused, separate), _ = _positive_fused_and_separate(family, p_shape, dtype, device, K)
        for a, b in zip((*fused[0], *fused[1]), (*separate[0], *separate[1])):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert_same_but_fma(a, b)


@pytest.mark.parametrize("family", KL_POSITIVE_FAMILIES)
def test_positive_fused_function_differentiates_twice_as_the_two_functions(backend, family):
    fused_kl_checks.differentiates_twice(_positive_fused_and_separate(family, (5,), torch.float64, backend[1], 2,
                                                             create_graph=True))


@pytest.mark.parametrize("family", ("exponential", "kumaraswamy", "weibull"))
def test_the_records_elbo_draw_is_the_general_draw_bit_for_bit(backend, family):
    """Positive.sample_with_kl against a prior with a closed form (a torch
    Exponential, a Beta, a Weibull) runs the fused op: z, the KL and every
    gradient are the general draw's (sampler, then family_kl) bit for bit."""
    from fastvae.latents import Positive, _Latent
    from fastvae.priors import TorchPrior

    _, device = backend
    g = torch.Generator().manual_seed(5)
    p0, p1 = ((0.5 * torch.randn(4, 3, 5, generator=g, dtype=torch.float64)).to(device).requires_grad_()
              for _ in range(2))
    c0, c1 = ((torch.rand(5, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_() for _ in range(2))
    q = Positive(family, p0) if family == "exponential" else Positive(family, p0, p1)
    leaves = [p0, c0] if family == "exponential" else [p0, p1, c0, c1]

    def prior():  # (a torch Weibull's graph from its parameters is built once, at construction)
        if family == "exponential":
            return TorchPrior(td.Independent(td.Exponential(c0), 1))
        return TorchPrior(td.Independent(td.Beta(c0, c1) if family == "kumaraswamy" else td.Weibull(c0, c1), 1))

    results = []
    for draw in (q.sample_with_kl, lambda *args: _Latent.sample_with_kl(q, *args)):
        for n_samples in (None, 2):
            z, kl, analytic = draw(n_samples, prior(), gen(9))
            assert analytic
            results.append((z, kl, torch.autograd.grad(z.sum() + (kl * kl).sum(), leaves, allow_unused=True)))
    for (z, kl, grads), (z2, kl2, grads2) in zip(results[:2], results[2:]):
        assert_same_but_fma(z, z2)
        assert_same_but_fma(kl, kl2)
        for u, v in zip(grads, grads2):
            assert (u is None) == (v is None)
            if u is not None:
                assert_same_but_fma(u, v)


# -- the family's cases of the suite-wide checks -------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the ops: test_registry.py fails when
# one is missing. Each gives {op name: its case}; double_backward_cases all of them.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward of each op at a training size."""
    return {"sample_location_scale": location_scale_launch_case(op, B, L, K, D),
            "sample_positive": positive_launch_case(op, B, L, K, D),
            "sample_concrete": concrete_launch_case(op, B, L, K, D)}


def thread_count_calls(leaf, run):
    """tests/test_backend.py: each op's calls with enough work for several threads."""
    return {"sample_location_scale": location_scale_thread_count_calls(leaf, run),
            "sample_positive": positive_thread_count_calls(leaf, run),
            "sample_concrete": concrete_thread_count_calls(leaf, run)}


def fallback_call(leaf, run):
    """tests/test_backend.py: each op's small call, run with and without the extension."""
    return {"sample_location_scale": location_scale_fallback_call(leaf, run),
            "sample_positive": positive_fallback_call(leaf, run),
            "sample_concrete": concrete_fallback_call(leaf, run)}


def double_backward_cases(r):
    """tests/test_double_backward.py: both ops' gradgradcheck cases."""
    return {**location_scale_double_backward_cases(r), **positive_double_backward_cases(r)}


# == sample_concrete ============================================================

CONCRETE_EXAMPLES = 6 if INTERPRET else 30
TEMPERATURES = [1e-3, 0.1, 0.5, 1.0, 3.0, 1e3]


@st.composite
def concrete_problems(draw):
    """(batch, L, C, K, data seed, temperature)."""
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    return (batch, draw(st.sampled_from([1, 3, 7])), draw(st.sampled_from([2, 3, 5, 16, 33])),
            draw(st.sampled_from([1, 2, 5])), draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(TEMPERATURES)))


def make_logits(shape, data_seed, dtype, device, requires_grad=False, bound=3.0):
    g = torch.Generator().manual_seed(data_seed)
    a = ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
    return a.requires_grad_(requires_grad)


def noise(seed, K, shape, dtype, offset0=0):
    """The Exp(1) variates t (K, *shape) in float64 from the uniforms a `dtype` op draws."""
    n = K * math.prod(shape)
    offsets = offset0 + torch.arange(n, dtype=torch.int64)
    return described.concrete_noise(seed, offsets, dtype).reshape(K, *shape)


def oracle(logits, lam, seed, K, dtype, stop_score=False):
    """(z, log q) differentiable in float64 logits: plain autograd of the
    reference's closed form; with stop_score log q is the Concrete density of
    the (differentiable) z with the logits detached, written in log z."""
    t = noise(seed, K, logits.shape, dtype)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(logits.shape[:-1])
    z, log_q = described.concrete_terms(logits, lam, t)[:2]
    if stop_score:
        C = logits.shape[-1]
        log_z = torch.log_softmax((logits - torch.log(t)) / lam[..., None], -1)
        log_pi = torch.log_softmax(logits.detach(), -1)
        lm = lam[..., None]
        log_q = (math.lgamma(C) + (C - 1) * torch.log(lam) + (log_pi - (lm + 1) * log_z).sum(-1)
                 - C * torch.logsumexp(log_pi - lm * log_z, -1))
    return z, log_q.sum(-1)


def scales(logits, lam, t):
    """Per-latent condition numbers: Y = sum_c (|a_c| + |log t_c| + 1) / lam
    bounds the rounding of y = (a - log t) / lam and of everything made from it."""
    a = logits.detach().double().cpu()
    a = torch.where(a > -math.inf, a, 0.0)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(a.shape[:-1])[..., None]
    return ((a.abs() + t.log().abs() + 1.0) / lam).sum(-1, keepdim=True) + 1.0


def check_forward(z, log_q, logits, lam, seed, K, dtype, hard=False):
    t = noise(seed, K, logits.shape, dtype)
    a = logits.detach().double().cpu()
    lam64 = torch.as_tensor(lam, dtype=torch.float64).cpu().expand(a.shape[:-1])
    z_ref, q_ref = described.concrete_terms(a, lam64, t)[:2]
    Y = scales(logits, lam64, t)
    C = a.shape[-1]
    if hard:
        assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == 1).all()
        agree = z.double().cpu().argmax(-1) == z_ref.argmax(-1)
        # the argmax may differ only where the two largest are within rounding
        top2 = z_ref.topk(min(2, C), -1).values
        close = (top2[..., 0] - top2[..., -1]) <= 4 * RTOL[torch.float32] * (Y[..., 0] * top2[..., 0] + 1e-30)
        assert (agree | close).all()
    else:
        assert_close(z, z_ref, z_ref * Y, "z")
    q_scale = (Y[..., 0] * C + t.log().abs().sum(-1) + math.lgamma(C) + C * 2 + C * lam64.log().abs()).sum(-1)
    assert_close(log_q, q_ref.sum(-1), q_scale, "log_q")


@float_dtype_examples(CONCRETE_EXAMPLES, problem=concrete_problems(), hard=st.booleans())
def test_forward_matches_reference(backend, dtype, problem, hard):
    _, device = backend
    batch, L, C, K, data_seed, lam = problem
    logits = make_logits((*batch, L, C), data_seed, dtype, device)
    seed = data_seed * 31 + 7
    z, log_q = SampleConcrete.apply(logits, torch.full((*batch, L), lam, dtype=dtype, device=device),
                                    seed_tensor(seed, device), hard, K, False)
    assert z.dtype == dtype and log_q.dtype == dtype
    assert z.shape == (K, *batch, L, C) and log_q.shape == (K, *batch)
    check_forward(z, log_q, logits, lam, seed, K, dtype, hard)


@float_dtype_examples(CONCRETE_EXAMPLES, problem=concrete_problems(), stop_score=st.booleans(), hard=st.booleans())
def test_backward_matches_reference_autograd(backend, dtype, problem, stop_score, hard):
    """Gradients of z (relaxed, and straight-through: the same) and log q."""
    _, device = backend
    batch, L, C, K, data_seed, lam = problem
    logits = make_logits((*batch, L, C), data_seed, dtype, device, requires_grad=True)
    seed = data_seed * 13 + 5
    g = torch.Generator().manual_seed(data_seed + 1)
    gz = torch.randn((K, *batch, L, C), generator=g, dtype=torch.float64).to(dtype)
    gq = torch.randn((K, *batch), generator=g, dtype=torch.float64).to(dtype)
    z, log_q = SampleConcrete.apply(logits, torch.full((*batch, L), lam, dtype=dtype, device=device),
                                    seed_tensor(seed, device), hard, K, stop_score)
    (got,) = torch.autograd.grad((z, log_q), (logits,), (gz.to(device), gq.to(device)))
    a = logits.detach().double().cpu().requires_grad_()
    z_ref, q_ref = oracle(a, lam, seed, K, dtype, stop_score)
    (want,) = torch.autograd.grad((z_ref, q_ref), (a,), (gz.double(), gq.double()))
    t = noise(seed, K, a.shape, dtype)
    Y = scales(a, lam, t)
    zd = z_ref.detach()
    gza, gqa = gz.double().abs(), gq.double().abs()[..., None, None]
    scale = ((zd * (gza + (zd * gza).sum(-1, keepdim=True)) * Y + gqa * (C * zd * Y + C * lam + lam + 2.0)).sum(0)
             / lam + 1e-300)
    assert got.dtype == dtype
    assert_close(got, want, scale, "dlogits")


def test_log_q_matches_torch_distributions(backend):
    """log q of the drawn z equals RelaxedOneHotCategorical.log_prob of that z
    (float64, where torch's value is finite), at several temperatures."""
    _, device = backend
    logits = make_logits((4, 5, 6), 21, torch.float64, device)
    for seed, lam in enumerate((0.3, 0.5, 1.0, 2.0, 7.0)):
        torch.manual_seed(seed)
        z, log_q = fastvae.sample_concrete(logits, lam, n_samples=3)
        assert z.shape == (3, 4, 5, 6) and log_q.shape == (3, 4)
        torch.testing.assert_close(z.sum(-1), torch.ones(3, 4, 5, dtype=torch.float64, device=device))
        temperature = torch.tensor(lam, dtype=torch.float64, device=device)
        expected = td.Independent(td.RelaxedOneHotCategorical(temperature, logits=logits), 1).log_prob(z)
        assert torch.isfinite(expected).all()
        assert_close(log_q, expected, expected.abs() + 100.0, f"log_q at {lam}")


def test_gumbel_max_frequencies(backend):
    """The straight-through one-hot is argmax(logits + Gumbel): its category
    frequencies follow softmax(logits), whatever the temperature (three seeds,
    |f - p| < 4.5 standard errors)."""
    _, device = backend
    probs = torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64)
    logits = probs.log().expand(50, 40, 4).contiguous().to(device)
    for seed, lam in ((1, 0.2), (2, 1.0), (3, 10.0)):
        torch.manual_seed(seed)
        z, _ = fastvae.sample_concrete(logits, lam, n_samples=5, hard=True)
        f = z.double().cpu().reshape(-1, 4).mean(0)
        n = z.numel() // 4
        assert ((f - probs).abs() < 4.5 * (probs * (1 - probs) / n).sqrt()).all(), (seed, f)


def test_two_category_marginal_kolmogorov_smirnov(backend):
    """C = 2: z_0 = sigmoid((a_0 - a_1 + logistic) / lam), so
    P(z_0 <= s) = sigmoid(lam logit(s) - (a_0 - a_1)); D < 1.95 / sqrt(n) over three seeds."""
    _, device = backend
    lam, delta = 0.7, 0.8
    logits = torch.tensor([delta, 0.0], device=device).expand(60, 50, 2).contiguous()
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        z, _ = fastvae.sample_concrete(logits, lam, n_samples=2)
        x = z[..., 0].double().flatten().cpu().sort().values
        s = x.clamp(1e-300, 1 - 1e-16)
        cdf = torch.sigmoid(lam * (s.log() - torch.log1p(-s)) - delta)
        n = x.numel()
        i = torch.arange(n, dtype=torch.float64)
        d = torch.maximum((i + 1) / n - cdf, cdf - i / n).max().item()
        assert d < 1.95 / math.sqrt(n), (seed, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_temperatures(backend, dtype):
    """lam in [1e-3, 1e3]: z on the simplex (nearly one-hot at 1e-3, nearly
    uniform at 1e3), log q finite (the 1e-3 density is ~1e3 C nats, taken
    from the noise: z itself underflows) and equal to the reference, gradients finite."""
    _, device = backend
    lam = torch.tensor([1e-3, 1e-2, 1.0, 1e2, 1e3], dtype=dtype, device=device)
    logits = make_logits((3, 5, 9), 4, dtype, device, requires_grad=True, bound=5.0)
    z, log_q = SampleConcrete.apply(logits, lam.expand(3, 5), seed_tensor(8, device), False, 4, False)
    assert torch.isfinite(z).all() and (z >= 0).all() and torch.isfinite(log_q).all()
    assert (z[:, :, 0] == 0).any()  # the coldest latent's z underflows somewhere
    check_forward(z, log_q, logits, lam.double().cpu().expand(3, 5), 8, 4, dtype)
    (z.sum() + log_q.sum() + (z * torch.arange(9, device=device)).sum()).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_logits_at_tiny_temperatures(backend, dtype):
    """Only the logits' differences matter: each latent's largest logit is
    subtracted before the division by the temperature, so logits far above
    where logits / temperature overflows (float32: about 3e35 at 1e-3) give
    finite z, log q and gradients, equal to the float64 reference; NaN never
    passes. Equal huge logits give exactly the sample of zero logits."""
    _, device = backend
    top = 1e37 if dtype == torch.float32 else 1e306
    lam = torch.tensor([1e-3, 1e-2, 0.5], dtype=dtype, device=device).expand(2, 3).contiguous()
    # per latent: top * (1 - 2^-e) for e in 10..14, and one category masked in latent (1, 2)
    frac = torch.tensor([0.0, 2.0**-10, 2.0**-12, 2.0**-13, 2.0**-14], dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)[:, None]  # latent 1: all logits near -top
    logits = (top * sign * (1.0 - frac)).expand(2, 3, 5).clone()
    logits[1, 2, 3] = -math.inf
    logits = logits.to(dtype).to(device).requires_grad_()
    for hard in (False, True):
        z, log_q = SampleConcrete.apply(logits, lam, seed_tensor(4, device), hard, 3, False)
        assert torch.isfinite(z).all() and torch.isfinite(log_q).all()
        t = noise(4, 3, (2, 3, 5), dtype)
        a = logits.detach().double().cpu()
        z_ref, q_ref = described.concrete_terms(a, lam.double().cpu(), t)[:2]
        ok = a > -math.inf
        shifted = torch.where(ok, a - a.amax(-1, keepdim=True), 0.0)
        Y = ((shifted.abs() + t.log().abs() + 1.0) / lam.double().cpu()[..., None]).sum(-1, keepdim=True) + 1.0
        if hard:
            assert (z.double().cpu().argmax(-1) == z_ref.argmax(-1)).all()
        else:
            assert_close(z, z_ref, z_ref * Y, "z")
        assert_close(log_q, q_ref.sum(-1), (Y[..., 0] * 5 + 100.0).sum(-1), "log_q")
        (grad,) = torch.autograd.grad((z * torch.arange(5.0, dtype=dtype, device=device)).sum() + log_q.sum(),
                                      logits)
        assert torch.isfinite(grad).all() and (grad[1, 2, 3] == 0)
    # equal logits: y = -log t / lam whatever their common value, bit for bit
    big = torch.full((2, 3, 5), top, dtype=dtype, device=device)
    zero = torch.zeros(2, 3, 5, dtype=dtype, device=device)
    z_big, q_big = SampleConcrete.apply(big, lam, seed_tensor(9, device), False, 2, False)
    z_zero, q_zero = SampleConcrete.apply(zero, lam, seed_tensor(9, device), False, 2, False)
    torch.testing.assert_close(z_big, z_zero, rtol=0, atol=0)
    torch.testing.assert_close(q_big, q_zero, rtol=0, atol=0)
    assert (z_big > 0).any(dim=-1).all() and (z_big[..., 2, :] < 1).all()  # lam = 0.5: not one-hot


def test_masked_categories(backend):
    """-inf logits: z_c = 0 exactly, log q finite and equal to the Concrete
    density on the remaining categories (torch's, with those columns dropped);
    the masked logits get zero gradient. A latent with one category left is
    its one-hot with log q = 0."""
    _, device = backend
    logits = make_logits((2, 3, 5), 9, torch.float64, device).detach()
    mask = torch.zeros(2, 3, 5, dtype=torch.bool, device=device)
    mask[:, :, 1] = True
    mask[1, 2, :4] = True  # one category left
    logits = logits.masked_fill(mask, -math.inf).requires_grad_()
    z, log_q = fastvae.sample_concrete(logits, 0.6, n_samples=4)
    assert (z[:, mask] == 0).all() and torch.isfinite(log_q).all()
    assert (z[:, 1, 2, 4] == 1).all()
    keep = [0, 2, 3, 4]
    torch.manual_seed(3)
    z, log_q = fastvae.sample_concrete(logits[0], 0.6, n_samples=4)
    expected = td.Independent(td.RelaxedOneHotCategorical(torch.tensor(0.6, dtype=torch.float64, device=device),
                                                          logits=logits[0][:, keep].detach()), 1).log_prob(z[..., keep])
    assert_close(log_q, expected, expected.abs() + 100.0, "log_q")
    (z * torch.randn_like(z)).sum().add(log_q.sum()).backward()
    assert (logits.grad[mask] == 0).all() and torch.isfinite(logits.grad).all()
    assert (logits.grad[0][:, keep] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    """Half-precision logits compute in float32: z in their dtype, log q in float32."""
    _, device = backend
    logits = make_logits((4, 3, 6), 2, dtype, device, requires_grad=True)
    z, log_q = SampleConcrete.apply(logits, torch.full((4, 3), 0.5, device=device), seed_tensor(6, device), False,
                                    2, False)
    assert z.dtype == dtype and log_q.dtype == torch.float32
    t = noise(6, 2, (4, 3, 6), torch.float32)
    z_ref, q_ref = described.concrete_terms(logits.detach().double().cpu(), torch.full((4, 3), 0.5).double(), t)[:2]
    assert_close(z, z_ref, z_ref + 1e-3, "z")
    assert_close(log_q, q_ref.sum(-1), (q_ref.abs() + 10.0).sum(-1) * scales(logits, 0.5, t).sum((-1, -2)), "log_q")
    (z.float().sum() + log_q.sum()).backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()


def test_hard_gradient_is_the_relaxed_gradient(backend):
    _, device = backend
    logits = make_logits((3, 4, 7), 5, torch.float64, device, requires_grad=True)
    lam = torch.full((3, 4), 0.4, dtype=torch.float64, device=device)
    w = torch.randn(2, 3, 4, 7, dtype=torch.float64, device=device)
    grads = []
    for hard in (False, True):
        z, log_q = SampleConcrete.apply(logits, lam, seed_tensor(3, device), hard, 2, False)
        grads.append(torch.autograd.grad((z * w).sum() + log_q.sum(), logits)[0])
        if hard:
            assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == 1).all()
            z_soft = SampleConcrete.apply(logits, lam, seed_tensor(3, device), False, 2, False)[0]
            assert (z.argmax(-1) == z_soft.argmax(-1)).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_evaluation_layout_matches_the_reference(backend):
    """concrete_at at an offset not divisible by 4 and a row stride (the evaluation's layout)."""
    _, device = backend
    logits = make_logits((3, 2, 5), 11, torch.float32, device)
    lam = torch.full((3, 2), 0.8, device=device)
    z, log_q = concrete_at(logits, lam, seed_tensor(5, device), 4, False, offset0=7, sample_stride=10,
                           row_stride=4 * 10)
    zr = torch.empty(4, 3, 2, 5, dtype=torch.float64)
    qr = torch.empty(4, 3, dtype=torch.float64)
    described.sample_concrete_forward(logits.double().cpu(), lam.double().cpu(), 5, False, 7, 10, 40, zr, qr)
    assert_close(z, zr, zr * 100.0, "z")
    assert_close(log_q, qr, qr.abs() + 100.0, "log_q")


def test_empty_and_one_sample(backend):
    _, device = backend
    z, log_q = fastvae.sample_concrete(torch.zeros(0, 3, 4, device=device), 1.0, 2)
    assert z.shape == (2, 0, 3, 4) and log_q.shape == (2, 0)
    z, log_q = fastvae.sample_concrete(torch.zeros(3, 4, device=device), 1.0)
    assert z.shape == (3, 4) and log_q.shape == () and torch.isfinite(log_q)
    torch.testing.assert_close(z.sum(-1), torch.ones(3, device=device))


def test_generator_reproduces(backend):
    _, device = backend
    logits = torch.randn(2, 3, 4, device=device)
    a = fastvae.sample_concrete(logits, 0.5, 2, generator=torch.Generator().manual_seed(4))
    b = fastvae.sample_concrete(logits, 0.5, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_errors_name_the_argument():
    fastvae.set_value_checks("always")
    x = torch.zeros(2, 3, 4)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fastvae.sample_concrete(x, bad)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastvae.sample_concrete(x, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="temperature must not require grad"):
        fastvae.sample_concrete(x, torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="temperature of shape"):
        fastvae.sample_concrete(x, torch.ones(5))
    with pytest.raises(ValueError, match="logits must have C >= 2"):
        fastvae.sample_concrete(torch.zeros(2, 3, 1), 1.0)
    with pytest.raises(ValueError, match="logits must have shape"):
        fastvae.sample_concrete(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="logits must be finite or -inf"):
        fastvae.sample_concrete(torch.full((2, 3, 4), math.nan), 1.0)
    with pytest.raises(ValueError, match="logits must be finite or -inf"):
        fastvae.sample_concrete(x.index_fill(2, torch.tensor([0]), math.inf), 1.0)
    with pytest.raises(ValueError, match="logits has a latent with every category -inf"):
        fastvae.sample_concrete(torch.full((2, 3, 4), -math.inf), 1.0)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        fastvae.sample_concrete(torch.zeros(2, 3, 4, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="n_samples"):
        fastvae.sample_concrete(x, 1.0, 0)


def test_logits_checks_read_the_leading_latents_whole():
    """On the CPU the logits' value check reads the value-check policy's
    prefix (whole leading rows), not every value of a large batch: a NaN in
    the leading rows is refused by name, one far past them is not read. With
    more categories than the prefix holds, whole latents are read, so that a
    latent masked only in its first categories is not taken for a wholly
    masked one. Mode "always" checks every call on every backend (under
    "auto" the triton backend checks a kind's first call only)."""
    fastvae.set_value_checks("always")
    big = torch.zeros(4096, 8, 16)
    lead = big.clone()
    lead[0, 3, 5] = math.nan
    with pytest.raises(ValueError, match="logits must be finite or -inf"):
        fastvae.sample_concrete(lead, 1.0)
    far = big.clone()
    far[-1, 3, 5] = math.inf
    z, _ = fastvae.sample_concrete(far, 1.0)  # past the prefix: not read
    assert torch.isfinite(z[:-1]).all()
    wide = torch.zeros(2, 5000)
    wide[:, :4500] = -math.inf  # every latent keeps 500 finite categories, past the prefix's 4096
    z, log_q = fastvae.sample_concrete(wide, 1.0)
    assert torch.isfinite(z).all() and torch.isfinite(log_q).all()
    assert z[:, :4500].eq(0).all()
    wide[1, 4500:] = -math.inf
    with pytest.raises(ValueError, match="logits has a latent with every category -inf"):
        fastvae.sample_concrete(wide, 1.0)


def test_double_backward_is_a_named_error(backend):
    """create_graph=True: the first derivative is the kernel's (usable as a
    number); differentiating it again raises an error naming the op."""
    _, device = backend
    logits = make_logits((2, 3, 4), 6, torch.float64, device, requires_grad=True)
    z, log_q = fastvae.sample_concrete(logits, 0.5, 2, generator=torch.Generator().manual_seed(1))
    loss = (z.pow(2) * torch.arange(4, device=device)).sum() + log_q.sum()
    plain = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    (d,) = torch.autograd.grad(loss, logits, create_graph=True)
    torch.testing.assert_close(d, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"fastvae\.sample_concrete does not support double backward"):
        torch.autograd.grad((d**2).sum(), logits)


@pytest.mark.full_interpreted  # 26 s interpreted; test_compile_changes.py compiles the Triton path in the quick tier
def test_compiles_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) traces sample_concrete (float and tensor
    temperatures, hard or not) and gives eager's values and gradients."""
    _, device = backend
    logits = make_logits((3, 4, 5), 12, torch.float32, device, requires_grad=True)
    lam = torch.full((3, 4), 0.7, device=device)
    w = torch.randn(2, 3, 4, 5).to(device)

    def f(a):
        z, log_q = fastvae.sample_concrete(a, 0.5, 2)
        z2, log_q2 = fastvae.sample_concrete(a, lam, 2, hard=True)
        return (z * w).sum() + log_q.sum() + (z2 * w).sum() + log_q2.sum(), z, z2

    from helpers import assert_compiled_matches_eager
    assert_compiled_matches_eager(f, (logits,), [logits])


def test_opcheck(backend):
    from fastvae.ops.sample_family.op import sample_concrete_backward_op, sample_concrete_op
    _, device = backend
    logits = make_logits((4, 3, 5), 6, torch.float32, device)
    lam = torch.full((4, 3), 0.6, device=device)
    seed = seed_tensor(2024, device)
    torch.library.opcheck(sample_concrete_op, (logits, lam, seed, False, 3))
    torch.library.opcheck(sample_concrete_op, (logits, lam, seed, True, 2))
    dz = torch.randn(3, 4, 3, 5, device=device)
    dq = torch.randn(3, 4, device=device)
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, dz, dq, False))
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, None, dq, True))
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, dz, None, False))
    log_p = torch.log_softmax(torch.randn(3, 5, device=device), -1)
    torch.library.opcheck(sample_concrete_op, (logits, lam, seed, False, 2, log_p))
    dk = torch.randn(4, device=device)
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, dz, dq, False, dk, log_p))
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, None, None, False, dk, log_p))


# -- the analytic categorical KL (a prior log-pmf log_p) ----------------------------------


def torch_kl(logits, log_p):
    """What Concrete.kl_per_dim computed before the kernels did: the per-latent
    KL (..., L) in torch ops, pi = softmax(logits), where(pi > 0, ...)."""
    log_pi = torch.log_softmax(logits, -1)
    pi = torch.exp(log_pi)
    return torch.where(pi > 0, pi * (log_pi - log_p.to(log_pi.dtype)), 0.0).sum(-1)


def make_log_p(L, C, per_latent, data_seed, dtype, device, requires_grad=False):
    """A non-uniform normalized prior log-pmf, (C,) or (L, C)."""
    g = torch.Generator().manual_seed(data_seed + 3)
    shape = (L, C) if per_latent else (C,)
    lp = torch.log_softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, -1)
    return lp.to(dtype).to(device).requires_grad_(requires_grad)


def kl_scale(logits, log_p):
    """Per-row condition number of the KL: (sum_l sum_c pi_c (|log pi_c| + |log p_c| + 1) + 1) C."""
    a = logits.detach().double().cpu()
    lp = log_p.detach().double().cpu().expand(a.shape[-2:])
    log_pi = torch.log_softmax(a, -1)
    pi = torch.exp(log_pi)
    live = pi > 0
    t = torch.where(live, pi * (log_pi.abs() + torch.where(live, lp, 0.0).abs() + 1.0), 0.0)
    return (t.sum(-1).sum(-1) + 1.0) * a.shape[-1]


def test_the_kl_oracle_is_torch_s_and_its_closed_form_gradient_is_autograd_s():
    """concrete_kl equals torch's KL of the two Categoricals (and the torch
    formula Concrete used), a masked category adds 0, a prior -inf where pi > 0
    gives +inf; concrete_kl_grad is plain autograd of concrete_kl."""
    logits = make_logits((3, 4, 5), 1, torch.float64, "cpu", requires_grad=True)
    log_p = make_log_p(4, 5, True, 1, torch.float64, "cpu", requires_grad=True)
    kl = described.concrete_kl(logits, log_p)
    want = td.kl_divergence(td.Categorical(logits=logits), td.Categorical(logits=log_p))
    torch.testing.assert_close(kl, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, torch_kl(logits, log_p), rtol=1e-12, atol=1e-12)
    g = torch.randn(3, 4, dtype=torch.float64)
    da, dp = torch.autograd.grad(kl, (logits, log_p), g)
    ga, gp = described.concrete_kl_grad(logits.detach(), log_p.detach())
    torch.testing.assert_close(da, (g[..., None] * ga), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dp, (g[..., None] * gp).sum(0), rtol=1e-12, atol=1e-14)
    masked = logits.detach().clone()
    masked[:, 0, 2] = -math.inf
    lp = log_p.detach().clone()
    lp[0, 2] = -math.inf
    assert torch.isfinite(described.concrete_kl(masked, lp)).all()
    ga = described.concrete_kl_grad(masked, lp)[0]
    assert torch.isfinite(ga).all() and (ga[:, 0, 2] == 0).all()
    assert described.concrete_kl(logits.detach(), lp)[:, 0].eq(math.inf).all()


def kl_oracle(logits, lam, seed, K, dtype, log_p, stop_score=False):
    """(z, log q, kl) differentiable in the float64 logits and log_p."""
    z, log_q = oracle(logits, lam, seed, K, dtype, stop_score)
    return z, log_q, described.concrete_kl(logits, log_p).sum(-1)


@float_dtype_examples(CONCRETE_EXAMPLES, problem=concrete_problems(), hard=st.booleans(), stop_score=st.booleans(),
                      per_latent=st.booleans(), masked=st.booleans())
def test_kl_matches_the_oracle_forward_and_backward(backend, dtype, problem, hard, stop_score, per_latent, masked):
    """With a prior log-pmf ((C,) or (L, C), non-uniform) the op adds the
    analytic KL per row (no sample dimension) and its gradient; z and log q
    keep the bits they have without it."""
    check_with_kl(backend[1], dtype, problem, hard, stop_score, per_latent, masked)


def check_with_kl(device, dtype, problem, hard, stop_score, per_latent, masked, forward=False):
    """test_kl_matches_the_oracle_forward_and_backward's checks of one
    problem (batch, L, C, K, data seed, temperature); with ``forward`` also z
    and log q against the oracle (check_forward)."""
    batch, L, C, K, data_seed, lam = problem
    logits = make_logits((*batch, L, C), data_seed, dtype, device)
    stop_score = stop_score and not masked  # the test's stop-score oracle (log_softmax) takes no mask
    if masked and logits.numel():
        logits.view(-1, C)[::2, C // 2] = -math.inf  # every other latent has a masked category
    logits.requires_grad_()
    log_p = make_log_p(L, C, per_latent, data_seed, dtype, device)
    seed = data_seed * 7 + 1
    temperature = torch.full((*batch, L), lam, dtype=dtype, device=device)
    z, log_q, kl = SampleConcrete.apply(logits, temperature, seed_tensor(seed, device), hard, K, stop_score,
                                        log_p.expand(L, C))
    z0, log_q0 = SampleConcrete.apply(logits, temperature, seed_tensor(seed, device), hard, K, stop_score)
    assert torch.equal(z, z0) and torch.equal(log_q, log_q0)
    assert kl.shape == batch and kl.dtype == dtype
    if forward:
        check_forward(z, log_q, logits, lam, seed, K, dtype, hard)
    a = logits.detach().double().cpu().requires_grad_()
    z_ref, q_ref, kl_ref = kl_oracle(a, lam, seed, K, dtype, log_p.double().cpu(), stop_score)
    assert_close(kl, kl_ref, kl_scale(a, log_p), "kl")
    assert_close(kl, torch_kl(logits.detach(), log_p).sum(-1), kl_scale(a, log_p), "kl (torch's formula)")
    g = torch.Generator().manual_seed(data_seed + 2)
    gz = torch.randn((K, *batch, L, C), generator=g, dtype=torch.float64).to(dtype)
    gq = torch.randn((K, *batch), generator=g, dtype=torch.float64).to(dtype)
    gk = torch.randn(batch, generator=g, dtype=torch.float64).to(dtype)
    (got,) = torch.autograd.grad((z, log_q, kl), (logits,), (gz.to(device), gq.to(device), gk.to(device)),
                                 retain_graph=True)
    (want,) = torch.autograd.grad((z_ref, q_ref, kl_ref), (a,), (gz.double(), gq.double(), gk.double()),
                                  retain_graph=True)
    # the KL's alone, against the oracle and against autograd of torch's formula
    (got_kl,) = torch.autograd.grad(kl, (logits,), gk.to(device))
    (want_kl,) = torch.autograd.grad(kl_ref, (a,), gk.double())
    b = logits.detach().double().cpu().requires_grad_()
    (torch_grad,) = torch.autograd.grad(torch_kl(b, log_p.double().cpu()).sum(-1), (b,), gk.double())
    t = noise(seed, K, a.shape, dtype)
    Y = scales(a, lam, t)
    zd = z_ref.detach()
    gza, gqa = gz.double().abs(), gq.double().abs()[..., None, None]
    pi = torch.softmax(a.detach(), -1)
    k_scale = gk.double().abs()[..., None, None] * pi * (kl_scale(a, log_p)[..., None, None] + 1.0)
    scale = ((zd * (gza + (zd * gza).sum(-1, keepdim=True)) * Y + gqa * (C * zd * Y + C * lam + lam + 2.0)).sum(0)
             / lam + k_scale + 1e-300)
    assert got.dtype == dtype
    assert_close(got, want, scale, "dlogits")
    assert_close(got_kl, want_kl, k_scale + 1e-300, "dlogits (the KL's)")
    if not masked:  # torch's formula: a masked category's 0 * inf makes its latent's gradient NaN
        assert_close(got_kl, torch_grad, k_scale + 1e-300, "dlogits (torch's formula)")
    if masked and logits.numel():
        assert (got_kl.reshape(-1, C)[::2, C // 2] == 0).all()


# -- the Triton forward's tiles (fastvae/ops/sample_family/triton.py) --------------------
# (batch, L, C, K, tile): the tile (elements, on the GPU and under the interpreter
# alike) shrunk so that small problems take each of the forward's forms.
CONCRETE_TILE_CASES = [
    pytest.param((5,), 7, 5, 1, 64, id="two-latent-chunks-two-rows-a-program"),  # BLOCK_L 4 < L, the last chunk
    # and program part dead
    pytest.param((1,), 37, 16, 3, 64, id="one-row-ten-chunks"),  # BLOCK_L 4, BLOCK_R 1
    pytest.param((3, 2), 3, 33, 2, 64, id="a-latent-a-tile"),  # BLOCK_C 64 = the tile: BLOCK_L 1
    pytest.param((2,), 5, 100, 1, 64, id="large-C"),  # BLOCK_C 128 > the tile: one latent, a loop over L
    pytest.param((9,), 30, 10, 1, 512, id="gpu-tile-(9,30,10)"),  # the GPU's: a row a program, L whole
    pytest.param((3,), 5, 3, 2, 512, id="gpu-tile-rows-share"),  # the GPU's: 16 rows of 8 x 4 a program
]


@pytest.fixture
def concrete_tile(request, monkeypatch):
    """Sets the Triton kernels' tile (GPU and interpreter) to request.param."""
    kernels = pytest.importorskip("fastvae.ops.sample_family.triton")
    monkeypatch.setattr(kernels, "CONCRETE_TILE", request.param)
    monkeypatch.setattr(kernels, "CONCRETE_INTERPRETER_TILE", request.param)
    family_op.PLANS.clear()  # the plans hold the geometry they were made with
    yield request.param
    family_op.PLANS.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,L,C,K,concrete_tile", CONCRETE_TILE_CASES, indirect=["concrete_tile"])
def test_triton_tiles_match_the_oracle(backend, batch, L, C, K, concrete_tile, dtype):
    """Every form of the Triton forward's tile (latent chunks, rows sharing a
    program, a latent a tile, large C) against the float64 oracle, forward
    (z, log q, KL) and backward, relaxed and hard, with masked categories and
    a per-latent prior; the stop-score backward on the unmasked logits."""
    name, device = backend
    if name != "triton":
        pytest.skip("the tile is the Triton kernels'")
    for hard, stop_score, per_latent, masked in ((False, False, True, True), (True, False, False, True),
                                                 (False, True, True, False)):
        check_with_kl(device, dtype, (batch, L, C, K, 41 + L, 0.5), hard, stop_score, per_latent, masked,
                      forward=True)


def test_triton_tiles_keep_the_bits_of_z():
    """z's bits do not follow the tile (each element keeps its Philox offset):
    the same draw at four tiles; log q, the KL and the backward within
    rounding (their sums change order)."""
    kernels = pytest.importorskip("fastvae.ops.sample_family.triton")
    if INTERPRET:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        pytest.skip("the Triton kernels run under the interpreter or on a GPU")
    logits = make_logits((6, 13, 11), 4, torch.float32, device)
    logits[0, 0, 3] = -math.inf
    lam = torch.full((6, 13), 0.7, device=device)
    log_p = make_log_p(13, 11, True, 4, torch.float32, device)
    g = torch.Generator().manual_seed(5)
    gz, gq, gk = (torch.randn(shape, generator=g).to(device) for shape in ((2, 6, 13, 11), (2, 6), (6,)))
    outs, tiles = [], (kernels.CONCRETE_TILE, kernels.CONCRETE_INTERPRETER_TILE)
    for tile in (16, 64, 512, 1 << 14):
        kernels.CONCRETE_TILE = kernels.CONCRETE_INTERPRETER_TILE = tile
        try:
            z = torch.full((2, 6, 13, 11), math.nan, device=device)
            q = torch.full((2, 6), math.nan, device=device)
            kl = torch.full((6,), math.nan, device=device)
            kernels.sample_concrete_forward(logits, lam, seed_tensor(9, device), False, 5, 6 * 13 * 11, 13 * 11, z, q,
                                            log_p, kl)
            dz = torch.full_like(logits, math.nan)
            kernels.sample_concrete_backward(gz, gq, logits, lam, seed_tensor(9, device), False, dz, gk, log_p)
        finally:
            kernels.CONCRETE_TILE, kernels.CONCRETE_INTERPRETER_TILE = tiles
        assert not (z.isnan().any() or q.isnan().any() or kl.isnan().any() or dz.isnan().any())
        outs.append((z, q, kl, dz))
    for z, q, kl, dz in outs[1:]:
        assert torch.equal(z, outs[0][0])
        torch.testing.assert_close(q, outs[0][1], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(kl, outs[0][2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dz, outs[0][3], rtol=1e-5, atol=1e-6)  # a row's sums may change order on a GPU


def test_triton_geometry_fills_an_h100():
    """The GPU launch's program counts, a function of the shape alone (nothing
    launched): a Gumbel-softmax VAE's sampler (100, 30, 10) runs its K N = 100
    rows at once, one program each, and (4096, 32, 16) at least 2 programs per
    SM of an H100 (132 SMs); the backward's latents at (100, 30, 10) run in
    tiles of 32 latents (94 programs, 24 with the forward's former tile).
    The block shapes follow L and C only (no variant per batch size)."""
    kernels = pytest.importorskip("fastvae.ops.sample_family.triton")
    sms = 132
    for N, L, C in ((100, 30, 10), (4096, 32, 16)):
        programs, meta = kernels.concrete_forward_geometry(1, N, L, C)
        assert programs >= min(2 * sms, N), (N, L, C, programs)
        assert meta["BLOCK_L"] >= L and meta["num_warps"] >= 4
        assert meta["BLOCK_R"] * meta["BLOCK_L"] * meta["BLOCK_C"] <= kernels.CONCRETE_TILE
        for K, M in ((5, 17), (50, 1023)):
            assert kernels.concrete_forward_geometry(K, M, L, C)[1] == meta
    assert kernels.concrete_forward_geometry(1, 100, 30, 10)[0] == 100
    assert kernels.concrete_backward_geometry(100, 30, 10) == (94, dict(BLOCK_J=32, BLOCK_C=16, num_warps=4,
                                                                        maxnreg=128))
    assert kernels.concrete_backward_geometry(4096, 32, 16)[0] >= 2 * sms
    # L longer than the tile holds: chunks of latents; C more than it holds: one latent a tile, 8 warps
    assert kernels.concrete_forward_geometry(1, 100, 200, 10)[1] == dict(BLOCK_R=1, BLOCK_L=32, BLOCK_C=16,
                                                                         num_warps=4)
    assert kernels.concrete_forward_geometry(1, 100, 30, 2000)[1] == dict(BLOCK_R=1, BLOCK_L=1, BLOCK_C=2048,
                                                                          num_warps=8)
    # the interpreter's tile: few programs
    assert kernels.concrete_forward_geometry(1, 100, 30, 10, "cpu")[0] == 4
    with pytest.raises(ValueError, match="C = 16385"):
        kernels.concrete_forward_geometry(1, 2, 3, kernels.CONCRETE_MAX_C + 1)


@pytest.mark.parametrize("per_latent", [False, True], ids=["(C,)", "(L,C)"])
def test_a_learned_prior_gets_its_gradient(backend, per_latent):
    """log_p requiring grad (a learned prior): d log_p = -sum over rows of
    grad_kl pi, summed back to log_p's shape; the Python Function serves it
    (the C++ operator takes fixed priors only)."""
    _, device = backend
    L, C = 3, 5
    logits = make_logits((4, 2, L, C), 8, torch.float64, device, requires_grad=True)
    raw = make_log_p(L, C, per_latent, 8, torch.float64, device, requires_grad=True)
    log_p = torch.log_softmax(raw, -1)
    z, log_q, kl = fastvae.sample_concrete(logits, 0.5, 2, generator=gen(3), log_p=log_p)
    assert "SampleConcrete" in kl.grad_fn.name() and "CppNode" not in kl.grad_fn.name()
    gk = torch.randn(4, 2, dtype=torch.float64, device=device)
    got = torch.autograd.grad(kl, (logits, raw), gk)
    a, r = logits.detach().cpu().requires_grad_(), raw.detach().cpu().requires_grad_()
    want = torch.autograd.grad(described.concrete_kl(a, torch.log_softmax(r, -1)).sum(-1), (a, r), gk.cpu())
    for x, y, name in zip(got, want, ("dlogits", "dlog_p")):
        assert_close(x, y, y.abs() + 1.0, name)


def test_kl_at_extreme_logits_and_a_prior_that_rules_a_category_out(backend):
    """Logits of 1e30 (float32: the shifted softmax stays finite), a masked
    category beside a prior that rules it out (adds 0), and a prior log p = -inf
    where pi > 0 (+inf, as torch's formula gives); a one-row batch."""
    _, device = backend
    C = 4
    logits = torch.tensor([[[1e30, -1e30, 0.0, -math.inf], [-3.0, 50.0, -50.0, -math.inf]]], device=device)
    log_p = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], device=device))
    log_p_ruled = log_p.clone()
    log_p_ruled[3] = -math.inf
    lam = torch.full((1, 2), 0.3, device=device)
    for lp in (log_p, log_p_ruled):
        a = logits.clone().requires_grad_()
        z, log_q, kl = SampleConcrete.apply(a, lam, seed_tensor(4, device), False, 1, False, lp.expand(2, C))
        want = described.concrete_kl(logits.double().cpu(), lp.double().cpu()).sum(-1)
        assert torch.isfinite(want).all()
        assert_close(kl, want, kl_scale(logits, lp), "kl")
        (g,) = torch.autograd.grad(kl.sum(), a)
        gw = described.concrete_kl_grad(logits.double().cpu(), lp.double().cpu())[0]
        assert_close(g, gw, gw.abs() + 1.0, "dlogits")
        assert g[0, 0, 3] == 0
    ruled = log_p.clone()
    ruled[1] = -math.inf
    kl = SampleConcrete.apply(logits, lam, seed_tensor(4, device), False, 1, False, ruled.expand(2, C))[2]
    assert kl.item() == math.inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kl_in_half_precision(backend, dtype):
    """Half-precision logits: the KL in float32 against the oracle of the rounded logits."""
    _, device = backend
    logits = make_logits((3, 4, 6), 2, dtype, device, requires_grad=True)
    log_p = make_log_p(4, 6, True, 2, torch.float32, device)
    z, log_q, kl = SampleConcrete.apply(logits, torch.full((3, 4), 0.5, device=device), seed_tensor(6, device),
                                        False, 2, False, log_p)
    assert kl.dtype == torch.float32 and kl.shape == (3,)
    a = logits.detach().double().cpu().requires_grad_()
    want = described.concrete_kl(a, log_p.double().cpu()).sum(-1)
    assert_close(kl, want, kl_scale(a, log_p) * 10, "kl")
    gk = torch.randn(3, dtype=torch.float64)
    (got,) = torch.autograd.grad(kl, logits, gk.float().to(device))
    (ref,) = torch.autograd.grad(want, a, gk)
    assert got.dtype == dtype
    assert_close(got, ref.to(dtype), ref.abs() + 1e-2, "dlogits")


def test_the_public_function_takes_log_p_and_checks_it(backend):
    """fastvae.sample_concrete(log_p=...) returns (z, log q, kl), z and log q
    those of the call without it; a bad log_p is refused by name."""
    _, device = backend
    logits = make_logits((5, 3, 4), 9, torch.float32, device)
    log_p = make_log_p(3, 4, False, 9, torch.float32, device)
    for K in (None, 1, 3):
        z, log_q, kl = fastvae.sample_concrete(logits, 0.5, K, generator=gen(2), log_p=log_p)
        z0, log_q0 = fastvae.sample_concrete(logits, 0.5, K, generator=gen(2))
        assert torch.equal(z, z0) and torch.equal(log_q, log_q0) and kl.shape == (5,)
        assert_close(kl, torch_kl(logits.double(), log_p.double()).sum(-1), kl_scale(logits, log_p), "kl")
    for shape in ((0, 3, 4), (2, 0, 4)):  # no rows; no latents (a KL of 0)
        a = torch.zeros(shape, device=device, requires_grad=True)
        z, log_q, kl = fastvae.sample_concrete(a, 0.5, 2, log_p=log_p)
        assert kl.shape == shape[:1] and (kl == 0).all()
        (kl.sum() + log_q.sum()).backward()
        assert a.grad.shape == shape
    fastvae.set_value_checks("always")
    with pytest.raises(ValueError, match="log_p must be a prior log-pmf of shape"):
        fastvae.sample_concrete(logits, 0.5, log_p=torch.zeros(5, device=device))
    with pytest.raises(ValueError, match="log_p must be a prior log-pmf of shape"):
        fastvae.sample_concrete(logits, 0.5, log_p=torch.zeros(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="log_p must be finite or -inf"):
        fastvae.sample_concrete(logits, 0.5, log_p=torch.full((4,), math.nan, device=device))
    with pytest.raises(TypeError, match="log_p must be a floating-point"):
        fastvae.sample_concrete(logits, 0.5, log_p=torch.zeros(4, dtype=torch.int64, device=device))


@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
def test_kl_compiles_across_batch_sizes_and_sample_counts(backend):
    """torch.compile(fullgraph=True) with a prior log-pmf, as the batch (B,
    B - 2, B) and the sample count change between calls: eager's values and
    gradients."""
    _, device = backend
    logits = make_logits((7, 3, 5), 12, torch.float32, device)
    log_p = make_log_p(3, 5, True, 12, torch.float32, device)

    def f(a, K):
        z, log_q, kl = fastvae.sample_concrete(a, 0.7, K, log_p=log_p)
        return (z * torch.arange(5.0, device=a.device)).sum() + log_q.sum() + 2.0 * kl.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for rows, K in ((7, 2), (5, 2), (7, 2), (7, 1), (7, 3)):
        a = logits[:rows].detach().requires_grad_()
        results = []
        for fn in (f, compiled):
            torch.manual_seed(rows + K)
            value = fn(a, K)
            results.append((value, torch.autograd.grad(value, a)[0]))
        (v, g), (cv, cg) = results
        torch.testing.assert_close(cv, v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cg, g, rtol=1e-5, atol=1e-6)


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing. Its double backward is refused by name (not_twice):
# tests/test_double_backward.py tests the error, so it has no double_backward_cases.


def concrete_launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(lambda a: fastvae.sample_concrete(a, 0.5, K), (B, L, 5))


def concrete_thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (the backward sums over samples)."""
    logits = leaf(5000, 8, 4)
    return [lambda: run(lambda a: fastvae.sample_concrete(a, 0.5, 4, generator=gen(2)), logits)]


@pytest.mark.skipif(not fastvae._backend.cpp_available(), reason="the cpp kernels' thread counts")
def test_concrete_kernels_take_a_second_thread_at_a_small_models_size(monkeypatch):
    """The Concrete's kernels count each element as sample_family.h's
    kConcreteWork elements in the thread rule (they cost about that many
    elementwise kernels' time per element): a Gumbel-softmax VAE's
    (100, 30, 10) call, which the unweighted rule would give one thread (under
    2 x MIN_WORK_PER_THREAD elements), runs forward and backward on two
    threads; a tiny call stays on the calling thread. (Watched through the
    Function path; torch_op.cpp applies the same weight.)"""
    monkeypatch.setattr(fastvae._backend, "torch_ops", lambda *t: None)
    seen = {}
    for name in ("sample_concrete_forward", "sample_concrete_backward"):
        real = fastvae._backend.kernel_function("cpp", name)
        monkeypatch.setitem(fastvae._backend._functions, ("cpp", name),
                            lambda *args, name=name, real=real: (seen.__setitem__(name, args[-1]), real(*args)))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with fastvae.use_backend("cpp"):
            for shape, threads in (((100, 30, 10), 2), ((2, 3, 4), 1)):
                assert math.prod(shape) < 2 * fastvae._backend.cpp_module().MIN_WORK_PER_THREAD
                a = torch.randn(shape, requires_grad=True)
                z, _ = fastvae.sample_concrete(a, 1.0, generator=gen(0))
                z.sum().backward()
                assert seen == {"sample_concrete_forward": threads, "sample_concrete_backward": threads}, shape
    finally:
        torch.set_num_threads(previous)


def concrete_fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    logits = leaf(3, 4, 3)
    return lambda: run(lambda a: fastvae.sample_concrete(a, 0.5, 5, generator=gen(1)), logits)


def compile_cases(mu, lv):
    """tests/test_compile.py: (name, function, float inputs) whose compiled graph
    calls the C++ twins, forward and backward (mu, read as logits: (5, 2, 3))."""
    return [
        ("sample_concrete", lambda a: fastvae.sample_concrete(a, 0.5, 3), (mu,)),
        ("sample_concrete (hard)", lambda a: fastvae.sample_concrete(a, 2.0, hard=True), (mu,)),
        ("sample_concrete (kl)",
         lambda a: fastvae.sample_concrete(a, 0.5, 2, log_p=torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=a.dtype))),
         (mu,)),
    ]


def twin_op_cases(m2, l2):
    """tests/test_torch_ops.py: (twin, arguments) in the Python op's layout, each
    checked bit for bit against fastvae::<twin> and by opcheck (m2, l2: (12, 6),
    read here as logits (4, 3, 6) and a temperature (4, 3))."""
    logits, lam, seed = m2.reshape(4, 3, 6), l2[:, 0].reshape(4, 3).exp(), torch.tensor(2024)
    return [
        ("sample_concrete", (logits, lam, seed, False, 3)),
        ("sample_concrete", (logits, lam, seed, True, 1)),
        ("sample_concrete_backward", (logits, lam, seed, torch.randn(3, 4, 3, 6), torch.randn(3, 4), False)),
        ("sample_concrete_backward", (logits, lam, seed, None, torch.randn(2, 4), True)),
        ("sample_concrete_backward", (logits, lam, seed, torch.randn(2, 4, 3, 6), None, False)),
        ("sample_concrete", (logits, lam, seed, False, 2, torch.log_softmax(m2[:3], -1))),
        ("sample_concrete_backward", (logits, lam, seed, torch.randn(2, 4, 3, 6), torch.randn(2, 4), False,
                                      torch.randn(4), torch.log_softmax(m2[:3], -1))),
        ("sample_concrete_backward", (logits, lam, seed, None, None, False, torch.randn(4),
                                      torch.log_softmax(m2[:3], -1))),
    ]


# -- the eager C++ operator (fastvae_cpp::sample_concrete) -----------------------------

needs_torch_ops = pytest.mark.skipif(
    not fastvae._backend.cpp_available() or not fastvae._backend.cpp_module().HAS_TORCH_OPS,
    reason="built without torch headers: no C++ operators")


def _draw_with_grads(logits, temperature, K, hard, stop_score):
    """(z, log q, dlogits, the node's name) of one seeded draw and backward."""
    from fastvae.ops.sample_family.op import check_args, sample_concrete_unchecked
    a = logits.detach().clone().requires_grad_()
    torch.manual_seed(5)
    z, log_q = sample_concrete_unchecked(a, check_args(a, temperature), K, hard, stop_score, None)
    g = torch.Generator().manual_seed(6)
    gz, gq = torch.randn(z.shape, generator=g, dtype=z.dtype), torch.randn(log_q.shape, generator=g, dtype=z.dtype)
    ((z * gz).sum() + (log_q * gq).sum()).backward()
    return z.detach(), log_q.detach(), a.grad, z.grad_fn.name()


@needs_torch_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hard,stop_score", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shape,K,temperature", [((100, 30, 10), None, 0.5), ((100, 30, 10), 1, 0.5),
                                                 ((3, 4, 5, 2), 3, 1e-3),
                                                 ((7, 16), 2, "tensor"), ((0, 3, 4), 2, 1.0)])
def test_eager_cpu_calls_take_the_cpp_operator_with_the_functions_bits(monkeypatch, dtype, hard, stop_score, shape,
                                                                        K, temperature):
    """On the cpp backend an eager float32/float64 CPU call runs the C++
    operator, whose values and gradients equal the Python Function's bit for
    bit (same kernels), with masked categories, a per-latent temperature and
    non-contiguous logits; n_samples None gives one sample with no sample
    dimension either way."""
    fastvae._backend.set_backend(None)
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(*shape, generator=g, dtype=dtype) * 3).transpose(-1, -2).contiguous().transpose(-1, -2)
    if logits.numel():
        logits[..., 0, 1] = -math.inf
    if temperature == "tensor":
        temperature = torch.rand(shape[:-1], generator=g, dtype=dtype) + 0.1
    ours = _draw_with_grads(logits, temperature, K, hard, stop_score)
    monkeypatch.setattr(fastvae._backend, "torch_ops", lambda *t: None)
    function = _draw_with_grads(logits, temperature, K, hard, stop_score)
    assert "CppNode" in ours[3] and "SampleConcrete" in ours[3] and "CppNode" not in function[3]
    for a, b in zip(ours[:3], function[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    samples = () if K is None else (K,)
    assert ours[0].shape == (*samples, *shape) and ours[1].shape == (*samples, *shape[:-2])


@needs_torch_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [None, 1, 3])
@pytest.mark.parametrize("per_latent", [False, True], ids=["(C,)", "(L,C)"])
def test_the_cpp_operator_gives_the_kl_with_the_functions_bits(monkeypatch, dtype, K, per_latent):
    """With a (fixed) prior log-pmf the eager C++ operator's z, log q, kl and
    gradients equal the Python Function's bit for bit, masked category included."""
    from fastvae.ops.sample_family.op import check_args, sample_concrete_unchecked
    fastvae._backend.set_backend(None)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 4, 5, generator=g, dtype=dtype) * 3
    logits[0, 1, 2] = -math.inf
    log_p = make_log_p(4, 5, per_latent, 3, dtype, "cpu")

    def draw():
        a = logits.clone().requires_grad_()
        torch.manual_seed(5)
        z, log_q, kl = sample_concrete_unchecked(a, check_args(a, 0.5), K, False, False, None, log_p)
        gz, gq, gk = (torch.randn(t.shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
                      for t in (z, log_q, kl))
        ((z * gz).sum() + (log_q * gq).sum() + (kl * gk).sum()).backward()
        return z.detach(), log_q.detach(), kl.detach(), a.grad, kl.grad_fn.name()

    ours = draw()
    monkeypatch.setattr(fastvae._backend, "torch_ops", lambda *t: None)
    function = draw()
    assert "CppNode" in ours[4] and "CppNode" not in function[4]
    for a, b in zip(ours[:4], function[:4]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert ours[2].shape == (9,)


@needs_torch_ops
@pytest.mark.parametrize("stop_score", [False, True])
@pytest.mark.parametrize("K", [None, 3])
def test_the_cpp_operators_backward_reads_the_relaxed_z_with_the_functions_bits(monkeypatch, stop_score, K):
    """The eager operator's backward reads the forward's relaxed z instead of
    regenerating the noise: a gradient through z alone (which the stop-score
    term does not touch) equals the Python Function's, which regenerates,
    bit for bit, masked category included. The z it reads cannot change
    under it: an in-place write to the returned z is refused."""
    fastvae._backend.set_backend(None)
    logits = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(8)) * 2
    logits[1, 2, 3] = -math.inf

    def grad():
        a = logits.clone().requires_grad_()
        torch.manual_seed(2)
        z, _ = fastvae.ops.sample_family.op.sample_concrete_unchecked(
            a, torch.full(a.shape[:-1], 0.7), K, False, stop_score, None)
        (z * torch.linspace(-1, 1, z.numel()).reshape(z.shape)).sum().backward()
        return a.grad

    ours = grad()
    monkeypatch.setattr(fastvae._backend, "torch_ops", lambda *t: None)
    assert torch.equal(ours, grad()) and torch.isfinite(ours).all() and ours[1, 2, 3] == 0
    monkeypatch.undo()
    fastvae._backend.set_backend(None)
    a = logits.clone().requires_grad_()
    z, _ = fastvae.sample_concrete(a, 0.7)
    with pytest.raises(RuntimeError, match="inplace"):
        z.mul_(2.0)


@needs_torch_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stop_score", [False, True])
def test_the_backward_twin_given_z_keeps_the_bits_and_passes_opcheck(dtype, stop_score):
    """fastvae_cpu::sample_concrete_backward handed the forward's relaxed z
    (what the compiled graph passes) gives what fastvae::sample_concrete_backward,
    which regenerates the noise, gives, bit for bit (a masked category
    included), and torch.library.opcheck passes with z."""
    fastvae._backend.set_backend(None)
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(4, 3, 6, generator=g) * 2).to(dtype)
    logits[1, 2, 0] = -math.inf
    lam, seed = (torch.rand(4, 3, generator=g) + 0.3).to(dtype), torch.tensor(2024)
    z = torch.ops.fastvae.sample_concrete(logits, lam, seed, False, 3)[0]
    gz, gq = torch.randn(3, 4, 3, 6, generator=g).to(dtype), torch.randn(3, 4, generator=g).to(dtype)
    want = torch.ops.fastvae.sample_concrete_backward(logits, lam, seed, gz, gq, stop_score)
    got = torch.ops.fastvae_cpu.sample_concrete_backward(logits, lam, seed, gz, gq, stop_score, None, None, z)
    assert got.dtype == want.dtype and torch.equal(got, want) and torch.isfinite(got).all()
    torch.library.opcheck(torch.ops.fastvae_cpu.sample_concrete_backward.default,
                          (logits, lam, seed, gz, gq, stop_score, None, None, z))
    with pytest.raises(RuntimeError, match="z: expected the forward's relaxed z"):  # refused by name
        torch.ops.fastvae_cpu.sample_concrete_backward(logits, lam, seed, gz, gq, stop_score, None, None, z[:2])


@needs_torch_ops
@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
@pytest.mark.parametrize("hard", [False, True])
def test_the_compiled_backward_reads_the_relaxed_z(hard):
    """Under torch.compile on the CPU the graph's backward twin is handed the
    forward's relaxed z (when hard, the copy kept beside the one-hot), and
    the gradients equal eager's bit for bit as the batch and K change."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    fastvae._backend.set_backend(None)
    seen = []

    def backward_graph(gm, example_inputs):
        seen.extend(n for n in gm.graph.nodes if n.target is torch.ops.fastvae_cpu.sample_concrete_backward.default)
        return make_boxed_func(gm)

    def f(a, K):
        z, log_q = fastvae.sample_concrete(a, 0.6, K, hard=hard)
        return (z * torch.linspace(-1, 1, z.shape[-1])).sum() + log_q.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm),
                                                                     bw_compiler=backward_graph))
    logits = torch.randn(9, 4, 6, generator=torch.Generator().manual_seed(3)) * 2
    logits[2, 1, 0] = -math.inf
    for rows, K in ((9, 2), (7, 2), (9, 1)):
        grads = []
        for fn in (f, compiled):
            a = logits[:rows].clone().requires_grad_()
            torch.manual_seed(rows + K)
            grads.append(torch.autograd.grad(fn(a, K), a)[0])
        assert torch.equal(grads[0], grads[1]) and torch.isfinite(grads[0]).all()
    assert seen
    for node in seen:
        z = node.kwargs.get("z", node.args[8] if len(node.args) > 8 else None)
        assert z is not None, node.format_node()


@needs_torch_ops
def test_the_cpp_operator_refuses_a_double_backward_as_the_function_does(monkeypatch):
    """create_graph=True gives the kernel's gradient, and differentiating it
    again raises the Python Function's error, by name."""
    logits = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    messages = []
    for path in ("cpp", "function"):
        if path == "function":
            monkeypatch.setattr(fastvae._backend, "torch_ops", lambda *t: None)
        messages.append(_second_backward_error(logits, 1, lambda z, _: (z * torch.arange(5.0, dtype=z.dtype)).sum()))
    _assert_same_double_backward_error(*messages)


def _second_backward_error(logits, seed, loss_of):
    """The first line of the error a second backward through a
    create_graph=True gradient of ``loss_of(z, log_q)`` raises (the first
    gives a gradient that requires grad)."""
    z, log_q = fastvae.sample_concrete(logits, 0.5, generator=gen(seed))
    (d,) = torch.autograd.grad(loss_of(z, log_q), logits, create_graph=True)
    assert d.requires_grad
    with pytest.raises(RuntimeError) as err:
        d.sum().backward()
    return str(err.value).splitlines()[0]


def _assert_same_double_backward_error(first, second):
    assert "fastvae.sample_concrete does not support double backward" in first
    assert first == second


@needs_torch_ops
def test_the_cpp_operator_checks_its_arguments():
    """The boundary's checks by name (the public function's own checks run first)."""
    op = torch.ops.fastvae_cpp.sample_concrete
    logits = torch.zeros(4, 3, 5)
    lam = torch.ones(4, 3)
    with pytest.raises(RuntimeError, match="temperature: expected shape"):
        op(logits, torch.ones(4, 5), 1, False, 1, False)
    with pytest.raises(RuntimeError, match="temperature: expected dtype"):
        op(logits, lam.double(), 1, False, 1, False)
    with pytest.raises(RuntimeError, match="logits: the cpp backend supports float32 and float64"):
        op(logits.half(), lam, 1, False, 1, False)
    with pytest.raises(RuntimeError, match="logits: expected a tensor"):
        op(torch.zeros(5), torch.ones(()), 1, False, 1, False)
    with pytest.raises(RuntimeError, match="n_samples must be >= 1"):
        op(logits, lam, 1, False, 0, False)
    with pytest.raises(RuntimeError, match="seed must be >= 0"):
        op(logits, lam, -1, False, 1, False)
    with pytest.raises(RuntimeError, match="seed: expected a 0-d int64 CPU tensor"):
        torch.ops.fastvae_cpu.sample_concrete(logits, lam, torch.tensor(1.0), False, 1)
    with pytest.raises(ValueError, match="logits must be finite or -inf"):
        fastvae.sample_concrete(torch.full((4, 3, 5), math.nan, requires_grad=True), 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_hard_sample_keeps_its_relaxed_z_for_the_backward(backend, dtype):
    """keep_relaxed: the op returns, beside the one-hot z, the relaxed z it is
    the argmax of, bit for bit the relaxed sample of the same noise (the C++
    twin in the same pass, the other backends by a relaxed launch); the
    backward that reads it gives the gradients of the one that regenerates
    the noise, bit for bit (odd sizes, masked categories, K = 3)."""
    from fastvae.ops.sample_family.op import _forward, sample_concrete_backward_op

    name, device = backend
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(5, 7, 9, generator=g, dtype=torch.float64) * 3).to(dtype)
    a[0, 0, :4] = -math.inf
    a, lam = a.to(device), (torch.rand(5, 7, generator=g, dtype=torch.float64) + 0.2).to(dtype).to(device)
    seed = seed_tensor(11, device)
    with fastvae.use_backend(name):
        relaxed = _forward(a, lam, seed, False, 3)[0]
        one_hot, _, _, kept = _forward(a, lam, seed, True, 3, None, True)
        assert _forward(a, lam, seed, True, 3)[3].numel() == 0  # not asked: nothing kept
        assert torch.equal(kept, relaxed)
        assert torch.equal(one_hot, torch.nn.functional.one_hot(relaxed.argmax(-1), 9).to(dtype))
        twins = [torch.ops.fastvae_cpu.sample_concrete] if name == "cpp" else []
        for op in twins:
            out = op(a, lam, seed, True, 3, None, True)
            assert torch.equal(out[0], one_hot) and torch.equal(out[3], relaxed)
        gz = torch.randn(relaxed.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        gq = torch.randn(3, 5, generator=g, dtype=torch.float64).to(dtype).to(device)
        for op in [sample_concrete_backward_op, *(torch.ops.fastvae_cpu.sample_concrete_backward for _ in twins)]:
            read = op(a, lam, seed, gz, gq, False, None, None, kept)
            regenerated = op(a, lam, seed, gz, gq, False)
            assert torch.isfinite(read).all() and torch.equal(read, regenerated)


# -- the plans (op.py): eager calls on the triton backend ------------------------------
# The planned path launches the general path's kernel variants (triton.py's
# forward_launch / backward_launch) on the same inputs, so its values and
# gradients are the general path's bit for bit, under the interpreter (which
# runs each Launch through kernel.run, checking its grid, meta and argument
# order) and on a GPU. About 1 ms an interpreted program: few, small calls.

plan_device = plan_device_fixture(family_op)


def planned_and_general(monkeypatch, device, shape, dtype, n_samples, hard, stop_score, prior, masked,
                        public=True):
    """[(outputs, dlogits) of the planned path, of the general path] of one
    call (the public function, or sample_concrete_unchecked as the latents
    call it) on the same logits with the same seed; the loss weighs every
    output, so each gradient's kernel term is taken."""
    L, C = shape[-2:]
    logits = make_logits(shape, 7, dtype, device, requires_grad=True)
    if masked:
        with torch.no_grad():
            logits[..., 0, 1] = -math.inf
    log_p = None if prior is None else make_log_p(L, C, prior == "per-latent", 7, dtype, device)
    lam = torch.full(shape[:-1], 0.6, dtype=dtype, device=device)
    out = []
    for enabled in (True, False):
        monkeypatch.setattr(family_op, "ENABLED", enabled)
        if public:
            res = fastvae.sample_concrete(logits, 0.6, n_samples, hard=hard, generator=gen(11), log_p=log_p)
        else:
            res = sample_concrete_unchecked(logits, lam, n_samples, hard, stop_score, gen(11), log_p)
        g = torch.Generator().manual_seed(2)
        loss = sum((r * torch.randn(r.shape, generator=g, dtype=torch.float64).to(dtype).to(device)).sum()
                   for r in res)
        d, = torch.autograd.grad(loss, logits)
        out.append((res, d))
    return out


def assert_same_bits(a, b):
    """Bit for bit (the same kernels on the same inputs), no NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape and not torch.isnan(a).any()
    assert torch.equal(a, b)


PLAN_CASES = [  # (shape, n_samples, hard, stop_score, prior, masked, public)
    pytest.param((4, 3, 5), None, False, False, None, False, True, id="relaxed"),
    pytest.param((2, 3, 3, 5), 3, True, False, "shared", True, True, id="hard-K3-shared-prior-masked"),
    pytest.param((4, 3, 5), 3, False, True, "per-latent", False, False, id="stop-score-K3-per-latent"),
    pytest.param((1, 6, 4), None, True, True, "shared", True, False, id="one-row-hard-stop-score"),
    pytest.param((4, 3, 5), None, False, False, "per-latent", True, False, id="unchecked-per-latent-masked"),
]


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, n_samples, hard, stop_score, prior, masked, public", PLAN_CASES)
def test_planned_path_equals_the_general_path(plan_device, monkeypatch, dtype, shape, n_samples, hard, stop_score,
                                              prior, masked, public):
    """The plan's launches give the general path's z, log q, KL and
    gradients bit for bit, from the signature's first call (which makes the
    plan) and from its second (which finds it); one plan serves both."""
    for _ in range(2):
        (res, d), (res0, d0) = planned_and_general(monkeypatch, plan_device, shape, dtype, n_samples, hard,
                                                   stop_score, prior, masked, public)
        assert len(res) == len(res0) == (2 if prior is None else 3)
        for a, b in zip((*res, d), (*res0, d0)):
            assert_same_bits(a, b)
        assert type(res[0].grad_fn).__name__ == "PlannedSampleConcreteBackward"
        assert len(family_op.PLANS) == 1 and next(iter(family_op.PLANS.values())) is not None


@needs_plan_triton
def test_planned_gradient_of_one_output(plan_device, monkeypatch):
    """A backward given z's gradient alone, log q's alone or the KL's alone
    (each a backward variant of the plan) gives the general path's bits."""
    logits = make_logits((3, 4, 5), 2, torch.float32, plan_device, requires_grad=True)
    log_p = make_log_p(4, 5, False, 2, torch.float32, plan_device)
    for which in range(3):
        grads = []
        for enabled in (True, False):
            monkeypatch.setattr(family_op, "ENABLED", enabled)
            res = fastvae.sample_concrete(logits, 0.5, 2, generator=gen(4), log_p=log_p)
            grads.append(torch.autograd.grad((res[which] * res[which]).sum(), logits)[0])
        assert_same_bits(*grads)
    assert len(next(iter(family_op.PLANS.values())).launches()) == 4


@needs_plan_triton
def test_planned_double_backward_is_refused_as_the_general_path(plan_device, monkeypatch):
    """create_graph=True through the plan: the kernel's gradient, then the
    general path's named error at a second backward."""
    logits = make_logits((2, 3, 4), 1, torch.float32, plan_device, requires_grad=True)
    messages = []
    for enabled in (True, False):
        monkeypatch.setattr(family_op, "ENABLED", enabled)
        messages.append(_second_backward_error(logits, 3, lambda z, log_q: (z * z).sum() + log_q.sum()))
    _assert_same_double_backward_error(*messages)


@needs_plan_triton
def test_planned_signature_errors_as_the_general_path(plan_device):
    """A bad argument on a planned signature raises the general path's error
    (the public function checks every call: its values as the value-check
    policy says, here "always")."""
    x = torch.zeros(2, 3, 4, device=plan_device)
    fastvae.sample_concrete(x, 0.5)
    assert len(family_op.PLANS) == 1
    bad = x.clone()
    bad[0, 0, 0] = math.nan
    fastvae.set_value_checks("always")
    try:
        with pytest.raises(ValueError, match="logits must be finite or -inf"):
            fastvae.sample_concrete(bad, 0.5)
    finally:
        fastvae.set_value_checks("auto")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastvae.sample_concrete(x, -1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastvae.sample_concrete(x, torch.zeros(2, 3, device=plan_device))
    with pytest.raises(ValueError, match="log_p must be a prior log-pmf"):
        fastvae.sample_concrete(x, 0.5, log_p=torch.zeros(5, device=plan_device))


@needs_plan_triton
def test_each_signature_has_its_plan_and_the_cache_is_bounded(plan_device, monkeypatch):
    """Another shape or strides make another plan (the oracle's values); a
    signature the plans do not serve (half precision) is kept as None and
    takes the general path, as does a learned prior; past PLANS.max_plans the plans are
    forgotten, not grown."""
    for shape, make in [((2, 3, 4), lambda t: t), ((5, 3, 4), lambda t: t),
                        ((5, 3, 4), lambda t: t.transpose(0, 1).contiguous().transpose(0, 1))]:
        logits = make(make_logits(shape, 5, torch.float64, plan_device))
        z, log_q = fastvae.sample_concrete(logits, 0.5, generator=gen(6))
        seed = philox_seed_of(6)
        offsets = torch.arange(logits.numel(), dtype=torch.int64).reshape(shape)
        z_ref, lq_ref = described.concrete_terms(logits.detach().double().cpu(), torch.full(shape[:-1], 0.5,
                                                 dtype=torch.float64),
                                                 described.concrete_noise(seed, offsets, torch.float64))[:2]
        assert_close(z, z_ref, z_ref.abs() + 1e-3, "z")
        assert_close(log_q, lq_ref.sum(-1), lq_ref.abs().sum(-1) + 1.0, "log_q")
    assert len(family_op.PLANS) == 3 and all(p is not None for p in family_op.PLANS.values())
    logits = make_logits((2, 3, 4), 5, torch.float32, plan_device, requires_grad=True)
    learned = make_log_p(3, 4, False, 5, torch.float32, plan_device, requires_grad=True)
    z, log_q, kl = fastvae.sample_concrete(logits, 0.5, log_p=learned)
    assert type(z.grad_fn).__name__ != "PlannedSampleConcreteBackward"
    kl.sum().backward()
    assert learned.grad is not None and torch.isfinite(learned.grad).all()
    assert len(family_op.PLANS) == 3  # a learned prior is refused before any look-up
    z, log_q = fastvae.sample_concrete(logits.detach().half(), 0.5)
    assert type(z.grad_fn).__name__ != "PlannedSampleConcreteBackward" and z.dtype == torch.float16
    assert len(family_op.PLANS) == 4 and None in family_op.PLANS.values()
    monkeypatch.setattr(family_op.PLANS, "max_plans", 4)
    fastvae.sample_concrete(make_logits((3, 3, 4), 5, torch.float64, plan_device), 0.5)  # a fifth signature
    assert len(family_op.PLANS) == 1


@needs_plan_triton
def test_a_compiling_call_takes_the_general_path(plan_device, monkeypatch):
    """Under torch.compile (here: _backend.compiling() made true) no plan is
    looked up or made."""
    monkeypatch.setattr(fastvae._backend, "compiling", lambda: True)
    x = make_logits((2, 3, 4), 1, torch.float32, plan_device)
    lam = torch.full((2, 3), 0.5, device=plan_device)
    assert family_op._plan_for(x, lam, None, False, False, None, None) is None
    assert len(family_op.PLANS) == 0


OP_PLAN_CASES = [  # (N, L, C, n_samples, hard, stop_score, prior, grads)
    pytest.param(4, 3, 5, 1, False, False, None, "zq", id="relaxed"),
    pytest.param(2, 3, 5, 3, True, False, "shared", "zqk", id="hard-K3-shared-prior"),
    pytest.param(3, 4, 6, 2, False, True, "per-latent", "zk", id="stop-score-per-latent"),
    pytest.param(1, 6, 4, 1, True, True, "shared", "k", id="one-row-kl-alone"),
]


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, C, n_samples, hard, stop_score, prior, grads", OP_PLAN_CASES)
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, N, L, C,
                                                                     n_samples, hard, stop_score, prior, grads):
    """fastvae::sample_concrete and its backward called as a compiled graph
    calls them (flat contiguous logits and temperature): on the triton
    backend they launch from a plan of the call's signature (OP_PLANS), with
    the general launch's z, log q, KL and dlogits bit for bit, from the first
    call and from the second; signatures the plans do not serve (half
    precision, a strided temperature, a kept relaxed z) take the general
    launch and make no plan."""
    family_op.OP_PLANS.clear()
    g = torch.Generator().manual_seed(3)
    a = make_logits((N, L, C), 8, dtype, plan_device)
    lam = torch.full((N, L), 0.7, dtype=dtype, device=plan_device)
    log_p = None if prior is None else make_log_p(L, C, prior == "per-latent", 8, dtype, plan_device).expand(L, C)
    seed = seed_tensor(99, plan_device)
    gz = torch.randn(n_samples, N, L, C, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    gq = torch.randn(n_samples, N, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    gk = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    given = (gz if "z" in grads else None, gq if "q" in grads else None, gk if "k" in grads else None)
    op_plans_match_the_general_launch(monkeypatch, family_op, lambda: (
        *family_op.sample_concrete_op(a, lam, seed, hard, n_samples, log_p, False),
        family_op.sample_concrete_backward_op(a, lam, seed, *given[:2], stop_score, given[2],
                                              None if given[2] is None else log_p, None)))
    family_op.OP_PLANS.clear()
    family_op.sample_concrete_op(a.half(), lam.half(), seed, hard, n_samples, None, False)
    family_op.sample_concrete_op(a, torch.full((N, 2 * L), 0.7, dtype=dtype, device=plan_device)[:, ::2], seed,
                                 hard, n_samples, None, False)
    family_op.sample_concrete_op(a, lam, seed, True, n_samples, None, True)
    assert len(family_op.OP_PLANS) == 0


@needs_plan_triton
@pytest.mark.parametrize("family", KL_LOCATION_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K, shared, bound", [(5, 7, 1, True, 0.5), (13, 6, 3, False, 3.0)])
def test_the_fused_location_scale_ops_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, family,
                                                                                dtype, N, L, K, shared, bound):
    """fastvae::sample_location_scale_kl and its backward called as a
    compiled graph calls them: on the triton backend from a plan of the
    call's signature (OP_PLANS), with the general launch's z, KL and every
    gradient bit for bit (both upstream gradients, either alone, with and
    without the prior's), from the first call and the second; half
    precision and a prior's gradient without the KL's take the general
    launch and make no plan."""
    from fastvae._families import KL_FAMILIES

    family_op.OP_PLANS.clear()
    fused = family_op.LOCATION_SCALE_KL
    (loc, ls), (p_loc, p_ls, grad_z, grad_kl) = _location_scale_kl_problem(family, N, L, K, shared, bound, dtype,
                                                                           plan_device)
    loc, ls = loc.detach(), ls.detach()
    seed = seed_tensor(N * 1000 + L, plan_device)
    index, kl_index = LOCATION_SCALE_FAMILIES.index(family), KL_FAMILIES.index(family)
    cases = ((grad_z, grad_kl, True), (grad_z, grad_kl, False), (None, grad_kl, True), (grad_z, None, False))
    op_plans_match_the_general_launch(monkeypatch, family_op, lambda: (
        *fused.op(loc, ls, p_loc, p_ls, seed, index, kl_index, K),
        *(d for gz, gkl, need_dp in cases
          for d in fused.backward_op(gz, gkl, loc, ls, p_loc, p_ls, seed, index, kl_index, need_dp))))
    family_op.OP_PLANS.clear()
    fused.op(loc.half(), ls.half(), p_loc.half(), p_ls.half(), seed, index, kl_index, K)
    fused.backward_op(grad_z, None, loc, ls, p_loc, p_ls, seed, index, kl_index, True)
    assert len(family_op.OP_PLANS) == 0


@needs_plan_triton
@pytest.mark.parametrize("sampler, family", [*(("location_scale", f) for f in LOCATION_SCALE_FAMILIES),
                                             *(("positive", f) for f in POSITIVE_FAMILIES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K, splits", [(1, 1, 1, None), (13, 6, 3, None), (13, 6, 3, 2)])
def test_the_samplers_own_ops_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, sampler, family,
                                                                     dtype, N, L, K, splits):
    """fastvae::sample_location_scale and fastvae::sample_positive (the draw
    with log q: an IWAE's, a Monte Carlo KL's) and their backwards called as
    a compiled graph calls them: on the triton backend from a plan of the
    call's signature (OP_PLANS), with the general launch's z, log q and both
    gradients bit for bit, for either upstream gradient and both, with and
    without stop_score (STL, DReG), from the first call and the second, K =
    1 and 3, one element and a batch, samples split (the splits' partial
    sums); half precision, strided parameters and a gradient of another
    dtype take the general launch and make no plan."""
    from fastvae.kernels import _common

    if splits is not None:
        monkeypatch.setattr(_common, "FORCE_SPLITS", splits)
    family_op.OP_PLANS.clear()
    fs = family_op.LOCATION_SCALE_SAMPLER if sampler == "location_scale" else family_op.POSITIVE_SAMPLER
    families = LOCATION_SCALE_FAMILIES if sampler == "location_scale" else POSITIVE_FAMILIES
    make = location_scale_make_inputs if sampler == "location_scale" else positive_make_inputs
    p0, p1 = make((N,), L, N * L + K, 0.5, dtype, plan_device)
    index = families.index(family)
    seed = seed_tensor(N * 1000 + L, plan_device)
    g = torch.Generator().manual_seed(K)
    grad_z = torch.randn(K, N, L, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    grad_log_q = torch.randn(K, N, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    cases = [(gz, gq, stop) for gz, gq in ((grad_z, None), (None, grad_log_q), (grad_z, grad_log_q))
             for stop in (False, True)]
    op_plans_match_the_general_launch(monkeypatch, family_op, lambda: (
        *fs.op(p0, p1, seed, index, K),
        *(d for gz, gq, stop in cases for d in fs.backward_op(p0, p1, seed, index, gz, gq, stop))))
    (plan,) = family_op.OP_PLANS.values()
    assert len(plan.launches()) == 1 + len(cases)
    if splits is not None:
        assert all(made[-1] == 2 for made in plan._backward.values())  # the splits the partial sums add
    family_op.OP_PLANS.clear()
    fs.op(p0.half(), p1.half(), seed, index, K)
    if N * L > 1:
        fs.op(torch.cat([p0, p0], -1)[:, ::2], p1, seed, index, K)
    other = torch.float64 if dtype is torch.float32 else torch.float32
    fs.backward_op(p0, p1, seed, index, grad_z.to(other), None, False)
    assert len(family_op.OP_PLANS) == 0


@needs_plan_triton
@pytest.mark.parametrize("family", KL_POSITIVE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K, shared", [(1, 1, 1, True), (13, 6, 3, False)])
def test_the_fused_positive_ops_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, family, dtype,
                                                                       N, L, K, shared):
    """fastvae::sample_positive_kl and its backward called as a compiled
    graph calls them: on the triton backend from a plan of the call's
    signature (OP_PLANS; the sampler's and family_kl's kernels), with the
    general launch's z, KL and every gradient bit for bit (both upstream
    gradients, either alone, with and without the prior's; the
    exponential's second parameters' 0), from the first call and the
    second, K = 1 and 3, one element and a batch, the prior shared and per
    row; half precision and a prior's gradient without the KL's take the
    general launch and make no plan."""
    family_op.OP_PLANS.clear()
    fused = family_op.POSITIVE_KL
    (p0, p1), (r0, r1, grad_z, grad_kl) = _positive_kl_problem(N, L, K, shared, dtype, plan_device)
    if family == "exponential":  # the Function's stand-ins: the first parameters again
        p1, r1 = p0, r0
    seed = seed_tensor(N * 1000 + L, plan_device)
    index, kl_index = _kl_indices(family)
    cases = ((grad_z, grad_kl, True), (grad_z, grad_kl, False), (None, grad_kl, True), (grad_z, None, False),
             (None, grad_kl, False))
    op_plans_match_the_general_launch(monkeypatch, family_op, lambda: (
        *fused.op(p0, p1, r0, r1, seed, index, kl_index, K),
        *(d for gz, gkl, need_dp in cases for d in fused.backward_op(gz, gkl, p0, p1, r0, r1, seed, index,
                                                                        kl_index, need_dp))))
    family_op.OP_PLANS.clear()
    fused.op(p0.half(), p1.half(), r0.half(), r1.half(), seed, index, kl_index, K)
    fused.backward_op(grad_z, None, p0, p1, r0, r1, seed, index, kl_index, True)
    assert len(family_op.OP_PLANS) == 0
