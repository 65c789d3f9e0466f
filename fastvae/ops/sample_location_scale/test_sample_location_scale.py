"""sample_location_scale against its float64 oracle (fastvae/ops/sample_location_scale/__init__.py),
per backend (the root conftest.py): values and gradients for every family, the
uniforms bit for bit, the samples' distribution against scipy's CDFs, log q
against torch.distributions, the extremes of the scale, errors, and the double
backward; and its cases of the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import strategies as st

import fastvae
from fastvae import _philox
from fastvae.ops.sample_location_scale import sample_location_scale_forward, standardized
from fastvae.ops.sample_location_scale.op import FAMILIES, SampleLocationScale, location_scale_at

from conftest import INTERPRET
from helpers import assert_close, float_dtype_examples, fused_kl_checks, gen, sampler_checks, seed_tensor

# the interpreter runs each Triton program as Python (~1 ms): fewer examples there
EXAMPLES = 8 if INTERPRET else 40

LATENT = [1, 2, 3, 7, 32, 33, 1025]


@st.composite
def problems(draw):
    """(family, batch, L, K, data seed, log-scale bound), K * B * L kept small."""
    family = draw(st.sampled_from(FAMILIES))
    L = draw(st.sampled_from(LATENT))
    max_rows = max(1, 3000 // L)
    batch = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    while math.prod(batch) > max_rows:
        batch = batch[1:]
    K = draw(st.sampled_from([1, 2, 5]))
    return family, batch, L, K, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.5, 3.0, 20.0]))


def make_inputs(batch, L, data_seed, bound, dtype, device, requires_grad=False):
    g = torch.Generator().manual_seed(data_seed)
    loc = (torch.randn((*batch, L), generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    ls = ((torch.rand((*batch, L), generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
    return loc.requires_grad_(requires_grad), ls.requires_grad_(requires_grad)


def oracle_noise(family, seed, shape, dtype):
    """(e, log f, psi) in float64 from the uniforms a `dtype` op draws (the training layout)."""
    offsets = torch.arange(math.prod(shape), dtype=torch.int64)
    x = _philox.philox_word(seed, offsets)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return tuple(t.reshape(shape) for t in standardized(FAMILIES.index(family), x, acc))


def oracle(family, loc64, ls64, seed, K, dtype, stop_score=False):
    """(z, log q) differentiable in float64 loc64, ls64; with stop_score log q's
    parameters are detached and z keeps d/dz log q = psi / scale."""
    e, log_f, psi = oracle_noise(family, seed, (K, *loc64.shape), dtype)
    z = loc64 + torch.exp(ls64) * e
    if not stop_score:
        return z, (log_f - ls64).sum(-1)
    value = (log_f - ls64.detach()).sum(-1)
    return z, value + (psi * torch.exp(-ls64.detach()) * (z - z.detach())).sum(-1)


@float_dtype_examples(EXAMPLES, problem=problems())
def test_forward_matches_reference(backend, dtype, problem):
    family, K = problem[0], problem[3]
    seed, loc, ls, z, log_q = sampler_checks.forward(SampleLocationScale.apply, FAMILIES, make_inputs, problem, dtype,
                                                     backend[1])
    loc64, ls64 = loc.double().cpu(), ls.double().cpu()
    e, log_f, _ = oracle_noise(family, seed, (K, *loc64.shape), dtype)
    z_ref, q_ref = oracle(family, loc64, ls64, seed, K, dtype)
    s = torch.exp(ls64)
    assert_close(z, z_ref, loc64.abs() + s * (e.abs() + 2.0), "z")
    assert_close(log_q, q_ref, (log_f.abs() + ls64.abs() + 2.0).sum(-1), "log_q")


@float_dtype_examples(EXAMPLES, problem=problems(), stop_score=st.booleans())
def test_backward_matches_reference_autograd(backend, dtype, problem, stop_score):
    family, K = problem[0], problem[3]
    seed, gz, gq, (dloc, dls), (loc64, ls64) = sampler_checks.backward(
        SampleLocationScale.apply, FAMILIES, make_inputs, problem, dtype, backend[1], stop_score)
    z_ref, q_ref = oracle(family, loc64, ls64, seed, K, dtype, stop_score)
    dloc_ref, dls_ref = torch.autograd.grad((z_ref, q_ref), (loc64, ls64), (gz.double(), gq.double()))
    e, _, psi = oracle_noise(family, seed, (K, *loc64.shape), dtype)
    s = torch.exp(ls64.detach())
    gqe = gq.double()[..., None].abs()
    dloc_scale = gz.double().abs().sum(0) + (gqe * psi.abs()).sum(0) / s
    dls_scale = s * (gz.double().abs() * (e.abs() + 1.0)).sum(0) + (gqe * (psi * e).abs() + gqe).sum(0)
    assert dloc.dtype == dtype and dls.dtype == dtype
    assert_close(dloc, dloc_ref, dloc_scale, "dloc")
    assert_close(dls, dls_ref, dls_scale, "dlog_scale")


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_split_over_samples(backend, family, sample_splits):
    """K = 7 samples of one short row: the Triton backward's split path (forced), every family."""
    loc, ls = make_inputs((2,), 5, 3, 1.0, torch.float32, backend[1], requires_grad=True)
    dloc, dls = sampler_checks.split_over_samples(SampleLocationScale.apply, oracle, FAMILIES, family, loc, ls)
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


def test_evaluation_layout_matches_the_reference(backend):
    """location_scale_at at an offset not divisible by 4 and a row stride (the evaluation's layout)."""
    loc, ls = make_inputs((3,), 6, 11, 2.0, torch.float32, backend[1])
    for family, z, log_q, zr, qr in sampler_checks.evaluation_layout(location_scale_at, sample_location_scale_forward,
                                                                     FAMILIES, loc, ls):
        # the reference above drew float64 uniforms: compare at the float32 uniforms' rounding
        assert_close(z, zr, zr.abs() + 1.0, f"z ({family})")
        assert_close(log_q, qr, qr.abs() + 10.0, f"log_q ({family})")


SCIPY = {"uniform": "uniform", "laplace": "laplace", "logistic": "logistic", "gumbel": "gumbel_r",
         "cauchy": "cauchy"}


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_follow_the_distribution(backend, family):
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


@pytest.mark.parametrize("family", FAMILIES)
def test_log_q_matches_torch_distributions(backend, family):
    """log q of the drawn z equals torch.distributions' log_prob of that z (float64)."""
    _, device = backend
    loc, ls = make_inputs((4,), 9, 21, 2.0, torch.float64, device)
    torch.manual_seed(0)
    z, log_q = fastvae.sample_location_scale(family, loc, ls, 3)
    q = fastvae.LocationScale(family, loc, ls).torch_distribution()
    expected = q.log_prob(z)
    assert_close(log_q, expected, expected.abs() + 10.0, "log_q")


@pytest.mark.parametrize("ls_value", [-30.0, 30.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_extreme_scales_match_reference(backend, family, ls_value):
    """scale -> 0 and -> inf: finite values and gradients, equal to the float64 reference."""
    _, device = backend
    loc = torch.linspace(-5, 5, 2 * 37, device=device).reshape(2, 37).requires_grad_()
    ls = torch.full((2, 37), ls_value, device=device, requires_grad=True)
    z, log_q = SampleLocationScale.apply(loc, ls, seed_tensor(8, device), FAMILIES.index(family), 3, True)
    (z.sum() + log_q.sum()).backward()
    loc64 = loc.detach().double().cpu().requires_grad_()
    ls64 = ls.detach().double().cpu().requires_grad_()
    z_ref, q_ref = oracle(family, loc64, ls64, 8, 3, torch.float32, True)
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
    loc, ls = make_inputs((5,), 8, 4, 2.0, torch.bfloat16, device)
    z, log_q = SampleLocationScale.apply(loc, ls, seed_tensor(3, device), 1, 2, False)
    assert z.dtype == torch.bfloat16 and log_q.dtype == torch.float32
    z_ref, q_ref = oracle("laplace", loc.double().cpu(), ls.double().cpu(), 3, 2, torch.float32)
    assert_close(z, z_ref, z_ref.abs() + 1.0, "z")
    assert_close(log_q, q_ref, q_ref.abs() + 10.0, "log_q")


def test_empty_and_one_sample(backend):
    _, device = backend
    z, log_q = fastvae.sample_location_scale("gumbel", torch.zeros(0, 3, device=device),
                                             torch.zeros(0, 3, device=device), 2)
    assert z.shape == (2, 0, 3) and log_q.shape == (2, 0)
    z, log_q = fastvae.sample_location_scale("gumbel", torch.zeros(3, device=device), torch.zeros(3, device=device))
    assert z.shape == (3,) and log_q.shape == () and torch.isfinite(z).all()


def test_errors_name_the_argument():
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
@pytest.mark.parametrize("family", ("gumbel",) if INTERPRET else FAMILIES)
def test_double_backward(backend, family, stop_score):
    """create_graph=True: the closed form's second derivative (gradgradcheck, float64)."""
    loc, ls = make_inputs((3,), 4, 6, 1.0, torch.float64, backend[1], requires_grad=True)
    assert sampler_checks.double_backward(SampleLocationScale.apply, FAMILIES, family, loc, ls, stop_score)


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(lambda loc, ls: fastvae.sample_location_scale("laplace", loc, ls, K), (B, L), (B, L))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (the backward sums over samples)."""
    loc, ls = leaf(20000, 8), leaf(20000, 8)
    return [lambda: run(lambda a, b: fastvae.sample_location_scale("laplace", a, b, 4, generator=gen(2)), loc, ls)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    loc, ls = leaf(3, 4), leaf(3, 4)
    return lambda: run(lambda a, b: fastvae.sample_location_scale("logistic", a, b, 5, generator=gen(1)), loc, ls)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck (every family
    and the stop-score mode: test_double_backward above)."""
    return {
        "sample_location_scale": (lambda loc, ls: fastvae.sample_location_scale("logistic", loc, ls, 2,
                                                                                generator=gen(3)),
                                  [r(3, 4), r(3, 4)], False),
    }


# -- the closed-form KL fused into the draw (sample_location_scale_kl_*) -------------------

KL_CASES = [  # (N, L, K, prior shared, log-scale bound)
    (1, 1, 1, True, 0.5), (37, 5, 1, False, 3.0), (13, 33, 3, True, 3.0), (3, 1025, 2, False, 0.5),
    (5, 7, 1, True, 20.0),
]
KL_LOCATION_FAMILIES = ("laplace", "uniform", "gumbel", "cauchy")


def _kl_problem(name, N, L, K, shared, bound, dtype, device):
    """(q (loc, log_scale), prior (loc, log_scale), grad_z, grad_kl): a uniform
    prior wide enough that q's support lies inside it (a finite KL)."""
    loc, ls = make_inputs((N,), L, N * L + K, bound, dtype, device)
    g = torch.Generator().manual_seed(N + L)
    p_shape = (L,) if shared else (N, L)
    p_loc = (0.5 * torch.randn(p_shape, generator=g, dtype=torch.float64))
    p_ls = (0.3 * torch.randn(p_shape, generator=g, dtype=torch.float64))
    if name == "uniform":
        p_loc, p_ls = p_loc - 60.0 - 2 * math.exp(bound), p_ls + math.log(120.0) + bound + 1.0
    grad_z = torch.randn(K, N, L, generator=g, dtype=torch.float64)
    grad_kl = torch.randn(N, generator=g, dtype=torch.float64)
    return (loc, ls), tuple(t.to(dtype).to(device) for t in (p_loc, p_ls, grad_z, grad_kl))


def _fused(backend_name, q, p, seed, family, kl_family, K, grad_z, grad_kl, need_dp):
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


def _separate(backend_name, q, p, seed, family, kl_family, K, grad_z, grad_kl, need_dp):
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
@pytest.mark.parametrize("N, L, K, shared, bound", KL_CASES)
def test_the_fused_kl_is_the_sampler_and_family_kl_bit_for_bit(backend, family, dtype, N, L, K, shared, bound):
    """z and the KL's row sums, and the gradients (q's the sampler's plus the
    KL's, the prior's per row): the same bits as the sampler's and
    family_kl's kernels run one after the other, with both upstream
    gradients, either alone, and with or without the prior's (the Triton
    kernel's KL row sums: up to the order of the sum, assert_same)."""
    from fastvae._families import KL_FAMILIES

    name, device = backend
    q, (p_loc, p_ls, grad_z, grad_kl) = _kl_problem(family, N, L, K, shared, bound, dtype, device)
    seed = seed_tensor(N * 1000 + L, device)
    index, kl_index = FAMILIES.index(family), KL_FAMILIES.index(family)
    for gz, gkl, need_dp in ((grad_z, grad_kl, True), (grad_z, grad_kl, False), (None, grad_kl, True),
                             (grad_z, None, False), (grad_z, None, True)):
        fused = _fused(name, q, (p_loc, p_ls), seed, index, kl_index, K, gz, gkl, need_dp)
        separate = _separate(name, q, (p_loc, p_ls), seed, index, kl_index, K, gz, gkl, need_dp)
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
@pytest.mark.parametrize("N, L, K, shared, bound", KL_CASES[:4])
def test_the_fused_kl_matches_the_float64_oracle(backend, family, dtype, N, L, K, shared, bound):
    """Values and every gradient against plain float64 autograd of the draw
    and family_kl's formula, with the prior's gradients summed back to a
    shared prior's (L,) as the objectives do."""
    from fastvae._families import KL_FAMILIES
    from fastvae.ops.family_kl import family_kl_terms
    from fastvae.ops.family_kl.test_family_kl import grad_size, term_size

    name, device = backend
    if family == "gumbel":  # family_kl's domain: e^lgamma(1 + b1/b2) grows as (b1/b2)^(b1/b2), scales within ~10x
        bound = min(bound, 1.0)
    (loc, ls), (p_loc, p_ls, grad_z, grad_kl) = _kl_problem(family, N, L, K, shared, bound, dtype, device)
    seed = N * 1000 + L
    (z, kl), d = _fused(name, (loc, ls), (p_loc, p_ls), seed_tensor(seed, device), FAMILIES.index(family),
                        KL_FAMILIES.index(family), K, grad_z, grad_kl, True)
    leaves = [t.double().cpu().requires_grad_() for t in (loc, ls, p_loc, p_ls)]
    z_ref, _ = oracle(family, leaves[0], leaves[1], seed, K, dtype)
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
def test_the_fused_kl_binding_names_a_wrong_argument():
    C = fastvae._backend.cpp_module()
    loc, ls = torch.zeros(4, 3).numpy(), torch.zeros(4, 3).numpy()
    p = torch.zeros(3).numpy()
    z, kl = torch.zeros(1, 4, 3).numpy(), torch.zeros(4).numpy()
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


FUSED_PRIORS = [(), (1,), (5,), (1, 5), (3, 5), (2, 3, 5)]  # every form that broadcasts to q's (2, 3, 5)


def _fused_and_separate(family, p_shape, dtype, device, K, create_graph=False):
    """SampleLocationScaleKL and the two Functions it fuses, on the same leaves:
    (their outputs, their gradients in q's and the prior's parameters)."""
    from fastvae._families import KL_FAMILIES
    from fastvae.ops.family_kl.op import FamilyKL
    from fastvae.ops.sample_location_scale.op import SampleLocationScaleKL

    g = torch.Generator().manual_seed(len(p_shape) * 7 + K)
    loc = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    ls = (0.5 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)).to(dtype).to(device).requires_grad_()
    p_loc = (0.3 * torch.randn(p_shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
    p_ls = (0.3 * torch.randn(p_shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
    if family == "uniform":
        p_loc, p_ls = p_loc - 20.0, p_ls + math.log(60.0)
    p_loc, p_ls = p_loc.requires_grad_(), p_ls.requires_grad_()
    leaves = [loc, ls, p_loc, p_ls]
    index, kl_index = FAMILIES.index(family), KL_FAMILIES.index(family)

    def separate(seed):
        z, _ = SampleLocationScale.apply(loc, ls, seed, index, K, False)
        return z, FamilyKL.apply(kl_index, True, loc, ls, p_loc, p_ls)

    return fused_kl_checks.fused_and_separate(
        lambda seed: SampleLocationScaleKL.apply(loc, ls, p_loc, p_ls, seed, index, kl_index, K), separate, leaves,
        K, (2, 3, 5), g, dtype, device, create_graph), leaves


@pytest.mark.parametrize("family", KL_LOCATION_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p_shape", FUSED_PRIORS)
def test_the_fused_function_is_the_two_functions_bit_for_bit(backend, family, dtype, p_shape):
    """SampleLocationScaleKL (the records' ELBO draw against a prior of their
    family) gives SampleLocationScale's z and FamilyKL's KL (on Triton up to
    the order of its row sums), and their summed gradients, the prior's
    summed back to each shape a prior takes."""
    name, device = backend
    for K in (1, 3):
        (fused, separate), leaves = _fused_and_separate(family, p_shape, dtype, device, K)
        for i, (a, b) in enumerate(zip((*fused[0], *fused[1]), (*separate[0], *separate[1]))):
            if b is None:  # the uniform's KL does not read the prior's location
                assert a is None or torch.equal(a, torch.zeros_like(a))
                continue
            assert a.shape == b.shape and a.dtype == b.dtype
            assert not torch.isnan(a).any()
            assert_same(a, b, i == 1 and name == "triton", 5)


def test_the_fused_function_differentiates_twice_as_the_two_functions(backend):
    fused_kl_checks.differentiates_twice(_fused_and_separate("laplace", (5,), torch.float64, backend[1], 2,
                                                             create_graph=True))


@pytest.mark.skipif(INTERPRET, reason="torch.compile traces the main process's ops")
def test_the_fused_function_compiles_with_changing_shapes(backend):
    """A Laplace draw and KL against a Laplace prior (family 1, KL family 0),
    compiled while the shapes change (fused_kl_checks)."""
    from fastvae.ops.sample_location_scale.op import sample_location_scale_kl_unchecked

    fused_kl_checks.compiles_with_changing_shapes(sample_location_scale_kl_unchecked, 1, 0, backend[1])
