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
suite-wide checks."""
import math

import pytest
import torch
import torch.distributions as td
from hypothesis import strategies as st

import fastvae
from fastvae import _philox
from fastvae._families import LOCATION_SCALE_FAMILIES, POSITIVE_FAMILIES
from fastvae.ops import sample_family as described
from fastvae.ops.sample_family import sample_location_scale_forward, standardized
from fastvae.ops.sample_family.op import SampleLocationScale, SamplePositive, location_scale_at, positive_at

from conftest import INTERPRET
from helpers import assert_close, float_dtype_examples, fused_kl_checks, gen, sampler_checks, seed_tensor

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
    (float32): the stated tails (docs/latents.md)."""
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


def _location_scale_fused(backend_name, q, p, seed, family, kl_family, K, grad_z, grad_kl, need_dp):
    """The fused kernels' (z, kl) and (dloc, dlog_scale, dprior_loc, dprior_log_scale)."""
    (loc, ls), (p_loc, p_ls) = q, p
    N, L = loc.shape
    z, kl = loc.new_empty(K, N, L), loc.new_empty(N)
    fastvae._backend.launch(backend_name, "sample_location_scale_kl_forward", z.numel(), loc=loc, log_scale=ls,
                            prior_loc=p_loc, prior_log_scale=p_ls, seed=seed, family=family, kl_family=kl_family,
                            z=z, kl=kl)
    d = [torch.full_like(loc, float("nan")) for _ in range(4 if need_dp else 2)] + [None] * (0 if need_dp else 2)
    fastvae._backend.launch(backend_name, "sample_location_scale_kl_backward", z.numel(), grad_z=grad_z,
                            grad_kl=grad_kl, loc=loc, log_scale=ls, prior_loc=p_loc, prior_log_scale=p_ls, seed=seed,
                            family=family, kl_family=kl_family, dloc=d[0], dlog_scale=d[1], dprior_loc=d[2],
                            dprior_log_scale=d[3])
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
    """The same bits; or, for the Triton kernel's KL row sums (``row_sums``),
    the same up to the order of the sum: the fused kernel adds the L terms in
    its draw's tiles, family_kl's kernel in its own. Each order is within
    (L - 1) eps of the sum of the terms' magnitudes, and every term of a KL is
    >= 0 up to its own rounding, so 2 L eps |kl| bounds their difference; the
    infinite sums must agree exactly."""
    if not row_sums:
        assert torch.equal(got, want)
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
    from fastvae._families import KL_FAMILIES
    from fastvae.ops.family_kl import family_kl_terms
    from fastvae.ops.family_kl.test_family_kl import grad_size, term_size

    name, device = backend
    if family == "gumbel":  # family_kl's domain: e^lgamma(1 + b1/b2) grows as (b1/b2)^(b1/b2), scales within ~10x
        bound = min(bound, 1.0)
    (loc, ls), (p_loc, p_ls, grad_z, grad_kl) = _location_scale_kl_problem(family, N, L, K, shared, bound, dtype,
                                                                           device)
    seed = N * 1000 + L
    (z, kl), d = _location_scale_fused(name, (loc, ls), (p_loc, p_ls), seed_tensor(seed, device),
                                       LOCATION_SCALE_FAMILIES.index(family), KL_FAMILIES.index(family), K, grad_z,
                                       grad_kl, True)
    leaves = [t.double().cpu().requires_grad_() for t in (loc, ls, p_loc, p_ls)]
    z_ref, _ = location_scale_oracle(family, leaves[0], leaves[1], seed, K, dtype)
    terms = family_kl_terms(KL_FAMILIES.index(family), *leaves)
    kl_ref = terms.sum(-1)
    gz, gkl = grad_z.double().cpu(), grad_kl.double().cpu()
    refs = torch.autograd.grad((z_ref * gz).sum() + (kl_ref * gkl).sum(), leaves, allow_unused=True)
    refs = [torch.zeros_like(t) if r is None else r for r, t in zip(refs, leaves)]  # (the uniform's prior loc)
    e, _, _ = oracle_noise(family, seed, (K, N, L), dtype)
    args = [t.detach() for t in leaves]
    s = torch.exp(args[1])
    assert_close(z, z_ref, args[0].abs() + s * (e.abs() + 2.0), "z")
    # the KL's part: family_kl's own tolerance (its terms' sizes, their arguments' relative errors)
    size = term_size(KL_FAMILIES.index(family), *args)
    assert_close(kl, kl_ref, size.sum(-1), "kl")
    kl_scale = gkl.abs()[:, None] * size * (1.0 + grad_size(KL_FAMILIES.index(family), *args))
    per_unit = torch.exp(-args[1]) + torch.exp(-args[3].expand_as(args[1]))  # a location's: per unit of scale
    sampler = (gz.abs().sum(0), (gz * e).abs().sum(0) * s)
    for name, got, want, scale in (("dloc", d[0], refs[0], sampler[0] + kl_scale * per_unit),
                                   ("dlog_scale", d[1], refs[1], sampler[1] + kl_scale),
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
                assert not torch.isnan(a).any() and torch.equal(a, b)


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
            assert not torch.isnan(a).any() and torch.equal(a, b)


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
        assert torch.equal(z, z2) and torch.equal(kl, kl2)
        for u, v in zip(grads, grads2):
            assert (u is None) == (v is None) and (u is None or torch.equal(u, v))


# -- the family's cases of the suite-wide checks -------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the ops: test_registry.py fails when
# one is missing. Each gives {op name: its case}; double_backward_cases all of them.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward of each op at a training size."""
    return {"sample_location_scale": location_scale_launch_case(op, B, L, K, D),
            "sample_positive": positive_launch_case(op, B, L, K, D)}


def thread_count_calls(leaf, run):
    """tests/test_backend.py: each op's calls with enough work for several threads."""
    return {"sample_location_scale": location_scale_thread_count_calls(leaf, run),
            "sample_positive": positive_thread_count_calls(leaf, run)}


def fallback_call(leaf, run):
    """tests/test_backend.py: each op's small call, run with and without the extension."""
    return {"sample_location_scale": location_scale_fallback_call(leaf, run),
            "sample_positive": positive_fallback_call(leaf, run)}


def double_backward_cases(r):
    """tests/test_double_backward.py: both ops' gradgradcheck cases."""
    return {**location_scale_double_backward_cases(r), **positive_double_backward_cases(r)}
