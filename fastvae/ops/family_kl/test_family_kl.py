"""family_kl against its float64 oracle (fastvae/ops/family_kl/__init__.py), per
backend (the root conftest.py), the oracle against torch.distributions, and
the op's cases of the suite-wide checks."""
import math

import pytest
import torch
import torch.distributions as td
from hypothesis import assume, given
from hypothesis import strategies as st

import fastvae
from fastvae._families import KL_FAMILIES
from fastvae.ops import family_kl as oracle
from fastvae.ops.family_kl.op import FamilyKL, family_kl_backward_op, family_kl_op

from helpers import RTOL, assert_close, assert_same_but_fma, reference_tests

LATENT = [1, 2, 3, 7, 32, 33, 100, 1025]
F64 = torch.float64


@st.composite
def problems(draw, families=KL_FAMILIES, spreads=("normal", "wide", "extreme")):
    family = draw(st.sampled_from(families))
    L = draw(st.sampled_from(LATENT))
    batch = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)))
    while math.prod(batch) > max(1, 6000 // L):
        batch = batch[1:]
    prior = draw(st.sampled_from(["full", "per_dim", "broadcast"]))
    # "extreme": log-scales far from 0 (both sides of float32's exp range) but
    # near each other, with locations on the scales' own scale, where the KL
    # is of order one: a form that exponentiates a scale alone overflows
    spread = draw(st.sampled_from(spreads))
    reduce = draw(st.booleans())
    return family, batch, L, prior, spread, reduce, draw(st.integers(0, 2**31 - 1))


def make_params(family, batch, L, prior, spread, g):
    """(q, p) in float64: q (*batch, L), p of the prior's layout."""
    pshape = {"full": (*batch, L), "per_dim": (L,), "broadcast": (1,) * len(batch) + (L,)}[prior]

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=F64)

    # log-scales about a centre per dimension that q and p share, so that the
    # KL stays within float32's range; the Gumbel's e^lgamma(1 + b1/b2) grows
    # as (b1/b2)^(b1/b2): its scales stay within a factor of about 10
    if family == "kumaraswamy":
        return kumaraswamy_params(batch, L, pshape, spread, g)
    if family == "weibull":
        return weibull_params(batch, L, pshape, spread, g)
    width = {"normal": 1.0, "wide": 4.0, "extreme": 80.0}[spread]
    centre = (torch.rand(L, generator=g, dtype=F64) * 2 - 1) * width
    jitter = 0.5 if family == "gumbel" else 1.0
    q_ls, p_ls = centre + randn((*batch, L)) * jitter, centre + randn(pshape) * jitter
    if family == "exponential":
        return (q_ls,), (p_ls,)
    q_loc, p_loc = randn((*batch, L)) * q_ls.exp(), randn(pshape) * p_ls.exp()
    if family == "uniform":  # about half the boxes inside the prior's
        p_ls = p_ls.expand_as(q_ls) if prior == "full" else p_ls
        p_ls = torch.maximum(p_ls, q_ls.reshape(-1, L).max(0).values + 0.5) if prior != "full" else \
            torch.maximum(p_ls, q_ls + 0.5)
        p_loc = (randn(pshape) * 0.2 - 0.3) * p_ls.exp()
        q_loc = p_loc + (torch.rand((*batch, L), generator=g, dtype=F64) * 1.4 - 0.2) * (p_ls.exp() - q_ls.exp())
    return (q_loc, q_ls), (p_loc, p_ls)


def kumaraswamy_params(batch, L, pshape, spread, g):
    """q = (log a, log b), p = (log alpha, log beta): "normal" a, b, alpha, beta
    within a factor of about 3 of 1; "wide" a factor of e^2.5; "extreme" a
    and b from e^-5 to e^5 (b < 1 is the series' slow-convergence region,
    which the kernels truncate as the oracle does), the prior's from e^-3 to
    e^3: past them float32's lgamma of m/a (a << 1) loses the series' terms."""
    half = {"normal": 1.0, "wide": 2.5, "extreme": 5.0}[spread]

    def u(shape, h):
        return (torch.rand(shape, generator=g, dtype=F64) * 2 - 1) * h

    return (u((*batch, L), half), u((*batch, L), half)), (u(pshape, min(half, 3.0)), u(pshape, min(half, 3.0)))


def weibull_params(batch, L, pshape, spread, g):
    """q, p = (log scale, log concentration): the log concentrations about a
    centre per dimension that q and p share (from e^+-1 to e^+-80, both sides
    of float32's exp range: k small and k large), within a factor of about 2
    of each other (the KL grows as (k2/k1)^(k2/k1), the Gumbel's of log z),
    the log scales apart by about 1/k2 (the KL's u = k2 (log lambda1 - log
    lambda2) of order one): lambda1/lambda2 from e^+-1e-35 to e^+-1e35."""
    width = {"normal": 1.0, "wide": 4.0, "extreme": 80.0}[spread]

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=F64)

    centre = (torch.rand(L, generator=g, dtype=F64) * 2 - 1) * width
    q_lc, p_lc = centre + randn((*batch, L)) * 0.5, centre + randn(pshape) * 0.5
    base = randn(L)
    q_ls, p_ls = base + randn((*batch, L)) * (-q_lc).exp(), base + randn(pshape) * (-p_lc).exp()
    return (q_ls, q_lc), (p_ls, p_lc)


def check_against_reference(problem, dtype, device, params=None, need_dp=True):
    """family_kl of the problem's parameters (or ``params``, (q, p) in float64)
    against the oracle, values and gradients (q's alone where not ``need_dp``:
    the prior then wants none)."""
    family, batch, L, prior, spread, reduce, seed = problem
    g = torch.Generator().manual_seed(seed)
    q64, p64 = make_params(family, batch, L, prior, spread, g) if params is None else params
    if dtype in (torch.float16, torch.bfloat16) and spread != "normal":
        # half precision's range is e^+-11 (float16): the wide cases are float32's and float64's
        q64, p64 = make_params(family, batch, L, prior, "normal", g)
    q = [t.to(dtype).to(device).requires_grad_() for t in q64]
    p = [t.to(dtype).to(device).requires_grad_(need_dp) for t in p64]
    kl = fastvae.family_kl(family, tuple(q), tuple(p), reduce=reduce)
    acc = F64 if dtype == F64 else torch.float32
    assert kl.dtype == acc and kl.shape == ((*batch,) if reduce else (*batch, L))

    # the reference, in float64 from the inputs as rounded to dtype
    q_r = [t.detach().double().cpu().requires_grad_() for t in q]
    p_r = [t.detach().double().cpu().requires_grad_() for t in p]
    args = ((None, *q_r, None, *p_r) if family == "exponential" else (*q_r, *p_r))
    fam = KL_FAMILIES.index(family)
    terms = oracle.family_kl_terms(fam, *args)
    ref = terms.sum(-1) if reduce else terms
    w = torch.randn(ref.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad(kl, q + p if need_dp else q, w.to(kl.dtype).to(device))
    assert all(d.dtype == dtype for d in grads) and len(grads) == len(q) + (len(p) if need_dp else 0)
    refs = torch.autograd.grad(ref, q_r + p_r, w, allow_unused=True)
    refs = [torch.zeros_like(t) if r is None else r for r, t in zip(refs, q_r + p_r)]
    # a gradient past the dtype's range is inf there, rightly: not this test's case
    in_range = all(r.abs().max() < torch.finfo(dtype).max / 4 for r in refs if r.numel())
    if params is None:
        assume(in_range)
    else:
        assert in_range, "the given parameters' gradients are past the dtype's range"

    # inf exactly where the reference has it (the uniform's boxes outside the prior's)
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(kl.detach().cpu()), inf), "kl: inf pattern"
    assert not torch.isnan(kl).any()
    # the tolerance: the magnitude of the terms summed, each of which carries
    # its argument's relative error (exp(x) of a rounded x: |x| eps)
    size = term_size(fam, *(None if t is None else t.detach() for t in args))
    kl_scale = size.sum(-1) if reduce else size
    finite = ~inf
    assert_close(kl.detach().cpu()[finite], ref.detach()[finite], kl_scale[finite], "kl")
    # gradients: each term's derivative is of its size, times the arguments' and the upstream weight's
    wd = (w[..., None] if reduce else w).abs()
    gscale = wd * size * (1.0 + grad_size(fam, *(None if t is None else t.detach() for t in args)))
    names = {"exponential": ["dq_log_rate", "dp_log_rate"],
             "kumaraswamy": ["dq_log_a", "dq_log_b", "dp_log_alpha", "dp_log_beta"],
             "weibull": ["dq_log_scale", "dq_log_concentration", "dp_log_scale", "dp_log_concentration"]}.get(
        family, ["dq_loc", "dq_log_scale", "dp_loc", "dp_log_scale"])
    for name, got, want, t in zip(names, grads, refs, q_r + p_r):
        scale = gscale
        if name.endswith("_loc"):  # a location's gradient is per unit of scale
            scale = scale * (torch.exp(-args[1].detach()) + torch.exp(-args[3].detach()))
        if family == "weibull" and name.endswith("_log_scale"):  # per unit of 1/k
            scale = scale * (torch.exp(args[1].detach()) + torch.exp(args[3].detach()))
        if name == "dq_log_b":  # the reference's own error: see torch_trigamma_slack
            scale = scale + wd * torch_trigamma_slack(*(t.detach() for t in args)) / RTOL[dtype]
        scale = scale.sum_to_size(t.shape) if scale.shape != t.shape else scale
        assert_close(got, want, scale, name)


def torch_trigamma_slack(la, lb, lal, lbe):
    """The float64 reference's error in d/dlog b of the Kumaraswamy-Beta KL:
    autograd of torch.digamma(b) is torch.polygamma(1, b), off by up to 5e-10
    relative (the kernels' trigamma is good to 1e-14), times that term,
    (1 - alpha/a) b psi'(b)."""
    b = torch.exp(lb)
    return 1e-9 * (1.0 + torch.exp(lal - la)) * b * torch.polygamma(1, b)


def kumaraswamy_term_size(la, lb, lal, lbe):
    """term_size of the Kumaraswamy-Beta KL: each term times its arguments'
    error (e^x of a rounded x is off by |x| eps; lgamma(v) of a v off by
    d v/v by v psi(v) d v/v), the series' terms with their lgammas' sizes."""
    la, lb, lal, lbe = torch.broadcast_tensors(la, lb, lal, lbe)
    a, b, al, be = (torch.exp(t) for t in (la, lb, lal, lbe))
    ea, eb, eal, ebe = (1.0 + t.abs() for t in (la, lb, lal, lbe))

    def lg(v, e):
        return torch.lgamma(v).abs() + v * torch.digamma(v).abs() * e + 1.0

    psi_1b = torch.digamma(1.0 + b).abs()
    size = (1.0 + al / a * (ea + eal)) * (1.0 + psi_1b + eb) + ea + eb + 1.0 / b * eb
    size = size + lg(al, eal) + lg(be, ebe) + lg(al + be, eal + ebe)
    series = torch.zeros_like(size)
    for m in range(1, 11):
        x = m / a
        t = torch.exp(torch.lgamma(x) + torch.lgamma(b) - torch.lgamma(x + b)) / (m + a * b)
        series = series + t * (lg(x, ea) + lg(x + b, ea + eb) + lg(b, eb) + ea + eb)
    return size + ((be - 1.0).abs() + be * ebe) * b * series


def term_size(family, m1, s1, m2, s2):
    """An upper bound of the size of each additive term of the KL, per element
    (broadcast to q's shape), in float64: rounding errors are relative to these."""
    s1, s2 = torch.broadcast_tensors(s1, s2)
    name = KL_FAMILIES[family]
    if name == "kumaraswamy":
        return kumaraswamy_term_size(m1, s1, m2, s2)
    if name == "exponential":
        return (s1 - s2).abs() + torch.exp(s2 - s1) + 1.0
    d = (m1 - m2).abs()
    if name == "weibull":
        # G = e^(u + lgamma(1 + r)) carries the errors of its argument's parts: u's
        # (k2 = e^s2 of a rounded s2), lgamma(1 + r)'s, and r's (e^(s2 - s1)) times r psi(1 + r)
        r, u = torch.exp(s2 - s1), d * torch.exp(s2)
        lg = torch.lgamma(1 + r)
        big_g = torch.exp(lg + u) * (1.0 + u * (1.0 + s2.abs()) + lg.abs()
                                      + r * torch.digamma(1 + r).abs() * (1.0 + (s1 - s2).abs()))
        return s1.abs() + s2.abs() + 2 * u + 2 * r + big_g + 2.0
    if name == "laplace":
        return s1.abs() + s2.abs() + d * torch.exp(-s2) + torch.exp(s1 - s2) + 1.0
    if name == "uniform":
        return s1.abs() + s2.abs()
    if name == "gumbel":
        r, t = torch.exp(s1 - s2), d * torch.exp(-s2)
        return s1.abs() + s2.abs() + 2 * t + 2 * r + torch.exp(torch.lgamma(1 + r) + t) + 2.0
    m = torch.maximum(s1, s2)
    return 2 * m.abs() + s1.abs() + s2.abs() + 2 * torch.log1p(d * torch.exp(-m)) + 4.0


def grad_size(family, m1, s1, m2, s2):
    """The size of the arguments of the exponentials in a gradient: exp of a
    rounded x is off by |x| eps."""
    s1, s2 = torch.broadcast_tensors(s1, s2)
    if KL_FAMILIES[family] == "exponential":
        return (s1 - s2).abs()
    if KL_FAMILIES[family] == "kumaraswamy":  # d/dv of lgamma(v), psi(v) at v = m/a, b, alpha, beta: v psi'(v)
        vs = [10.0 * torch.exp(-m1), torch.exp(s1), torch.exp(m2), torch.exp(s2)]
        return sum((1.0 + v * torch.polygamma(1, v)) * (1.0 + torch.digamma(v).abs()) for v in vs)
    d = (m1 - m2).abs()
    if KL_FAMILIES[family] == "weibull":  # the Gumbel's of log z: scales 1/k
        return (s1 - s2).abs() + d * (torch.exp(s1) + torch.exp(s2)) + torch.exp(s2 - s1)
    return (s1 - s2).abs() + d * (torch.exp(-s1) + torch.exp(-s2)) + torch.exp(s1 - s2)


test_forward_backward_match_reference, test_half_precision_matches_reference = reference_tests(
    check_against_reference, problems(), half_examples=10)


@pytest.mark.full_interpreted  # 8 s a case interpreted; the cpp backend's in the quick tier
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(problem=problems(families=("kumaraswamy",), spreads=("extreme",)))
def test_kumaraswamy_extreme_parameters(backend, dtype, problem):
    """The Kumaraswamy-Beta KL at a and b from e^-5 to e^5 (b < 1: where the
    truncated series converges slowly, truncated as the oracle is), the
    prior's from e^-3 to e^3, in every example (not one family of six)."""
    check_against_reference(problem, dtype, backend[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kumaraswamy_across_the_shift_boundaries(backend, dtype):
    """The kernels' lgamma and psi shift their arguments (m/a, m/a + b, 1 + b,
    alpha, beta, alpha + beta) up to 4 in float and 10 in double: arguments
    just below, at and above each, and far from them, every pair of a and b."""
    near = [v * (1 + d) for v in (4.0, 10.0) for d in (-1e-3, 0.0, 1e-3)]
    v = torch.tensor([0.02, 0.5, 1.0, 3.0, 9.0, 40.0, *near], dtype=F64)
    n = len(v)
    la = (1.0 / v).log()[:, None].expand(n, n).contiguous()  # m/a = m v
    lb = v.log()[None, :].expand(n, n).contiguous()
    prior = v.clamp(max=20.0).log()  # the prior's from e^-3 to e^3, as the other tests'
    params = ((la, lb), (prior, prior.flip(0)))
    check_against_reference(("kumaraswamy", (n,), n, "per_dim", "", False, 0), dtype, backend[1], params)
    check_against_reference(("kumaraswamy", (n,), n, "per_dim", "", True, 1), dtype, backend[1], params)


def unit_beta_params(N, L, per_row, mixed, g):
    """Kumaraswamy parameters against a Beta(alpha, 1) prior (log beta = 0),
    per row (N, L) or shared (L,), q and alpha spread as the "wide" cases';
    ``mixed``: some log betas not 0, in one of the kernels' 512-element blocks
    (per row) or one column (shared: in every block)."""
    q = kumaraswamy_params((N,), L, (N, L), "wide", g)[0]
    shape = (N, L) if per_row else (L,)
    log_alpha = (torch.rand(shape, generator=g, dtype=F64) * 2 - 1) * 2.5
    log_beta = torch.zeros(shape, dtype=F64)
    if mixed:
        flat = log_beta.view(-1)
        idx = torch.arange(600, 1000, 7) if per_row else torch.tensor([3])
        flat[idx] = (torch.rand(len(idx), generator=g, dtype=F64) * 2 - 1) * 2.5
    return q, (log_alpha, log_beta)


@pytest.mark.full_interpreted  # 10-20 s a case interpreted; the reference tests check the Triton KL
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
@pytest.mark.parametrize("mixed", [False, True], ids=["unit", "mixed"])
def test_kumaraswamy_against_a_beta_with_unit_beta(backend, dtype, per_row, mixed):
    """Against a Beta(alpha, 1) (the usual prior of a Kumaraswamy posterior)
    the C++ kernels take a block of elements whose log betas are all 0, where
    d/dlog beta is not wanted, in a form without the series: the KL and
    every gradient against the float64 oracle, with and without the prior's
    gradients, reduced or not, at odd sizes (37 rows of 29: three blocks, the
    last partial), blocks of beta = 1 alone and blocks mixing beta = 1 with
    other betas."""
    g = torch.Generator().manual_seed(11 + 2 * per_row + mixed)
    N, L = 37, 29
    params = unit_beta_params(N, L, per_row, mixed, g)
    prior = "full" if per_row else "per_dim"
    for reduce in (False, True):
        for need_dp in (False, True):
            problem = ("kumaraswamy", (N,), L, prior, "wide", reduce, 5 + reduce)
            check_against_reference(problem, dtype, backend[1], params, need_dp=need_dp)


@pytest.mark.full_interpreted  # 10-20 s a case interpreted; the reference tests check the Triton KL
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
def test_kumaraswamy_unit_beta_form_is_the_series_form_bit_for_bit(backend, dtype, per_row):
    """An element against beta = 1 has the same KL and q gradients whether its
    block takes the form without the series (no d/dlog beta wanted, every
    log beta of the block 0) or the general one (d/dlog beta wanted; or a
    block with other betas): the fused samplers' blocks differ from
    family_kl's own, and each must give the other's bits (on a GPU, to the
    FMAs its compiler contracts differently: assert_same_but_fma)."""
    g = torch.Generator().manual_seed(3 + per_row)
    N, L = 37, 29
    (la, lb), (lal, lbe) = unit_beta_params(N, L, per_row, False, g)
    lbe_mixed = lbe.clone()
    lbe_mixed.view(-1)[-1] = 0.5  # the last element: every block mixed (shared), the last (per row)
    device = backend[1]
    runs = []
    for log_beta, need_dp in ((lbe, False), (lbe, True), (lbe_mixed, False)):
        q = [t.to(dtype).to(device).requires_grad_() for t in (la, lb)]
        p = [t.to(dtype).to(device).requires_grad_(need_dp) for t in (lal, log_beta)]
        kl = fastvae.family_kl("kumaraswamy", tuple(q), tuple(p), reduce=False)
        w = torch.randn(kl.shape, generator=torch.Generator().manual_seed(0), dtype=F64).to(kl.dtype).to(device)
        runs.append([kl.detach(), *torch.autograd.grad(kl, q, w)])
    keep = torch.ones(N, L, dtype=torch.bool, device=device)
    keep.view(-1)[-1] = False  # per row: the mixed run's element with beta != 1
    if not per_row:
        keep[:, -1] = False
    for t, general, mixed in zip(runs[0], runs[1], runs[2]):
        assert_same_but_fma(t, general)  # the general form (the prior's gradients wanted)
        assert_same_but_fma(t[keep], mixed[keep])  # a mixed block
    assert not torch.equal(runs[0][0], runs[2][0])  # the mixed run did differ where beta != 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kumaraswamy_unit_beta_forms_agree_in_the_sign_of_zero(backend, dtype):
    """Bit for bit means the sign of a zero too (torch.equal takes -0 for +0):
    q = Kumaraswamy(1, 1) given as log a = log b = -0 against Beta(1, 1) has
    the KL -0 in the form without the series, and the general form (which
    drops its series' term where beta = 1) must give -0 as well, in a block
    of beta = 1 alone and in a mixed one. The C++ kernels', which choose the
    form per block."""
    if backend[0] != "cpp":
        pytest.skip("the C++ kernels' forms")
    N, L = 3, 5
    device = backend[1]
    neg_zero = torch.full((N, L), -0.0, dtype=dtype, device=device)
    log_alpha = torch.zeros(L, dtype=dtype, device=device)
    mixed = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5], dtype=dtype, device=device)
    runs = []
    for log_beta, need_dp in ((torch.zeros_like(log_alpha), False), (torch.zeros_like(log_alpha), True),
                              (mixed, False)):
        q = [neg_zero.clone().requires_grad_() for _ in range(2)]
        p = [t.clone().requires_grad_(need_dp) for t in (log_alpha, log_beta)]
        kl = fastvae.family_kl("kumaraswamy", tuple(q), tuple(p), reduce=False)
        runs.append([kl.detach(), *torch.autograd.grad(kl, q, torch.ones_like(kl))])
    ints = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.signbit(runs[0][0][:, :4]).all() and (runs[0][0][:, :4] == 0).all()
    for run in runs[1:]:
        for i, (want, got) in enumerate(zip(runs[0], run)):
            assert torch.equal(want[:, :4].view(ints), got[:, :4].view(ints)), f"output {i}"


@pytest.mark.parametrize("family", KL_FAMILIES)
def test_oracle_matches_torch_distributions(family):
    """The oracle against torch.distributions.kl_divergence (float64), and the
    Cauchy's against its textbook formula, which torch does not register."""
    g = torch.Generator().manual_seed(1)
    q_loc, q_ls, p_loc, p_ls = (torch.randn(50, 6, generator=g, dtype=F64) for _ in range(4))
    fam = KL_FAMILIES.index(family)
    if family == "exponential":
        got = oracle.family_kl_terms(fam, None, q_ls, None, p_ls)
        want = td.kl_divergence(td.Exponential(q_ls.exp()), td.Exponential(p_ls.exp()))
    elif family == "cauchy":
        got = oracle.family_kl_terms(fam, q_loc, q_ls, p_loc, p_ls)
        b1, b2 = q_ls.exp(), p_ls.exp()
        want = torch.log(((b1 + b2) ** 2 + (q_loc - p_loc) ** 2) / (4 * b1 * b2))
    elif family == "kumaraswamy":
        check_kumaraswamy_oracle_by_quadrature()
        return
    elif family == "weibull":
        check_weibull_oracle_by_quadrature_and_monte_carlo()
        return
    elif family == "uniform":
        p_ls = p_ls.abs() + 1.0
        q_loc = p_loc + torch.rand(50, 6, generator=g, dtype=F64) * 1.2 * (p_ls.exp() - q_ls.exp())
        got = oracle.family_kl_terms(fam, q_loc, q_ls, p_loc, p_ls)
        want = td.kl_divergence(td.Uniform(q_loc, q_loc + q_ls.exp()), td.Uniform(p_loc, p_loc + p_ls.exp()))
        assert 0 < int(torch.isinf(want).sum()) < want.numel()
    else:
        cls = {"laplace": td.Laplace, "gumbel": td.Gumbel}[family]
        got = oracle.family_kl_terms(fam, q_loc, q_ls, p_loc, p_ls)
        want = td.kl_divergence(cls(q_loc, q_ls.exp()), cls(p_loc, p_ls.exp()))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-12)


def check_kumaraswamy_oracle_by_quadrature():
    """torch registers no Kumaraswamy-Beta KL: the oracle's series, with
    enough terms for its tail to vanish (b >= 2.5), against E_q[log q - log p]
    by the midpoint rule on 400000 points (log q written out: torch's
    Kumaraswamy.log_prob is NaN within rounding of 1); with the default 10
    terms where beta = 1 (the series is multiplied by beta - 1)."""
    a = torch.tensor([1.5, 2.0, 3.0, 5.0, 1.7], dtype=F64)
    b = torch.tensor([2.5, 4.0, 2.5, 3.0, 6.0], dtype=F64)
    for alpha, beta, terms in ((torch.tensor([1.2, 0.5, 1.0, 3.0, 2.0], dtype=F64),
                                torch.tensor([2.0, 3.0, 4.0, 0.7, 1.5], dtype=F64), 3000),
                               (torch.tensor([1.2, 0.5, 1.0, 3.0, 2.0], dtype=F64), torch.ones(5, dtype=F64), 10)):
        n = 400000
        z = ((torch.arange(n, dtype=F64) + 0.5) / n)[:, None]
        log_q = a.log() + b.log() + (a - 1) * z.log() + (b - 1) * torch.log1p(-z ** a)
        quad = (log_q.exp() * (log_q - td.Beta(alpha, beta).log_prob(z))).mean(0)
        got = oracle.kumaraswamy_beta_terms(a.log(), b.log(), alpha, beta, terms=terms)
        torch.testing.assert_close(got, quad, rtol=1e-6, atol=1e-7)
        fam = KL_FAMILIES.index("kumaraswamy")
        if terms == 10:
            torch.testing.assert_close(oracle.family_kl_terms(fam, a.log(), b.log(), alpha.log(), beta.log()), got,
                                       rtol=1e-14, atol=1e-14)


def check_weibull_oracle_by_quadrature_and_monte_carlo():
    """torch registers no Weibull-Weibull KL: the oracle (and Bauckhage's form
    as written, in scales and concentrations) against E_q[log q - log p] with
    torch's Weibull.log_prob, by the trapezoid rule in x = log t for z =
    lambda1 t^(1/k1), t ~ Exp(1) (the integrand decays as e^x at one end and
    e^-e^x at the other: the rule converges geometrically), and by Monte Carlo
    on 1e6 draws, within 5 standard errors, in float64. k from 0.3 to 8, the
    scales from 0.01 to 50 apart."""
    k1 = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.3, 8.0, 1.5, 1.0], dtype=F64)
    lam1 = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 0.02, 40.0], dtype=F64)
    k2 = torch.tensor([0.7, 1.0, 1.5, 5.0, 0.4, 6.0, 1.2, 2.0], dtype=F64)
    lam2 = torch.tensor([1.5, 2.0, 1.0, 1.2, 1.0, 1.1, 1.0, 1.0], dtype=F64)
    fam = KL_FAMILIES.index("weibull")
    got = oracle.family_kl_terms(fam, lam1.log(), k1.log(), lam2.log(), k2.log())
    bauckhage = (torch.log(k1 / lam1 ** k1) - torch.log(k2 / lam2 ** k2) + (k1 - k2) * (lam1.log() - EULER / k1)
                 + (lam1 / lam2) ** k2 * torch.exp(torch.lgamma(k2 / k1 + 1)) - 1)
    torch.testing.assert_close(got, bauckhage, rtol=1e-12, atol=1e-12)
    q, p = td.Weibull(lam1, k1), td.Weibull(lam2, k2)
    assert got[1].abs() < 1e-15  # q = p
    x = torch.linspace(-60.0, 4.5, 400001, dtype=F64)[:, None]
    t = x.exp()
    z = lam1 * t ** (1 / k1)
    integrand = torch.exp(x - t) * (q.log_prob(z) - p.log_prob(z))
    quad = torch.trapezoid(integrand, x, dim=0)
    torch.testing.assert_close(got, quad, rtol=1e-9, atol=1e-10)
    u = torch.rand(1_000_000, len(k1), generator=torch.Generator().manual_seed(8), dtype=F64)
    draws = lam1 * (-torch.log1p(-u)) ** (1 / k1)  # the inverse CDF: q's draws, seeded
    diff = q.log_prob(draws) - p.log_prob(draws)
    mc, se = diff.mean(0), diff.std(0) / math.sqrt(diff.shape[0])
    assert ((mc - got).abs() <= 5 * se + 1e-12).all(), (mc, got, se)


EULER = 0.5772156649015329


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(problem=problems(families=("weibull",), spreads=("wide", "extreme")))
def test_weibull_extreme_parameters(backend, dtype, problem):
    """The Weibull-Weibull KL at concentrations from e^-80 to e^80 (past
    float32's exp range on both sides in e^s1 and 1/e^s2 products) and scales
    as far apart as 1/k2 allows a KL of order one, in every example."""
    check_against_reference(problem, dtype, backend[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weibull_across_concentration_ratios(backend, dtype):
    """Every pair of concentrations from 0.02 to 50 with k2/k1 up to 20 (the
    KL's Gamma(1 + k2/k1) up to e^42, across the lgamma shift's boundaries at
    1 + r = 4 and 10) and scales apart by u = k2 log(lambda1/lambda2) from -20
    to 3: values and gradients against the oracle, no NaN."""
    lk = torch.tensor([0.02, 0.1, 0.5, 1.0, 2.0, 3.0 / 2.9, 9.0 / 8.9, 7.0, 50.0], dtype=F64).log()
    pairs = [(a, b) for a in lk for b in lk if b - a <= math.log(20.0)]
    us = torch.tensor([-20.0, -1.0, 0.0, 0.5, 3.0], dtype=F64)
    s1 = torch.tensor([a for a, _ in pairs], dtype=F64)[:, None].expand(-1, len(us))
    s2 = torch.tensor([b for _, b in pairs], dtype=F64)[:, None].expand(-1, len(us))
    a2 = torch.linspace(-3.0, 3.0, len(pairs), dtype=F64)[:, None].expand(-1, len(us))
    a1 = a2 + us / s2.exp()
    n = len(pairs)
    params = ((a1.contiguous(), s1.contiguous()), (a2.contiguous(), s2.contiguous()))
    check_against_reference(("weibull", (n,), len(us), "full", "", False, 0), dtype, backend[1], params)
    check_against_reference(("weibull", (n,), len(us), "full", "", True, 1), dtype, backend[1], params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", [True, False])
def test_weibull_half_precision(backend, dtype, reduce):
    """Half-precision Weibull parameters (computed in float32, the gradients
    in the inputs' dtype) at an odd size, a per-row and a shared prior."""
    for seed, prior in ((0, "full"), (1, "per_dim"), (2, "broadcast")):
        check_against_reference(("weibull", (3, 5), 7, prior, "normal", reduce, seed), dtype, backend[1],
                                _weibull_problem(seed, (3, 5), 7, prior))


def _weibull_problem(seed, batch, L, prior):
    g = torch.Generator().manual_seed(seed)
    pshape = {"full": (*batch, L), "per_dim": (L,), "broadcast": (1,) * len(batch) + (L,)}[prior]
    # the "normal" parameters drawn closer together: KLs and gradients of order one to a hundred,
    # within half precision's range (float16's 65504)
    return tuple((0.3 * a, 0.5 * c) for a, c in weibull_params(batch, L, pshape, "normal", g))


def test_weibull_is_the_gumbel_of_log_z():
    """log z of a Weibull(lambda, k) is a minimum-Gumbel of location log lambda
    and scale 1/k, and a KL is invariant under the bijection: the oracle's
    Weibull KL is its Gumbel KL of (-log lambda, -log k) (a maximum-Gumbel of
    -log z, the same KL), float64."""
    g = torch.Generator().manual_seed(7)
    a1, s1, a2, s2 = (0.5 * torch.randn(40, 3, generator=g, dtype=F64) for _ in range(4))
    weibull = oracle.family_kl_terms(KL_FAMILIES.index("weibull"), a1, s1, a2, s2)
    gumbel = oracle.family_kl_terms(KL_FAMILIES.index("gumbel"), -a1, -s1, -a2, -s2)
    torch.testing.assert_close(weibull, gumbel, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", KL_FAMILIES)
def test_oracle_gradient_formulas_match_autograd(family):
    """The oracle's closed-form gradients (the reference backend's backward,
    the kernels' formulas) against autograd of its KL, float64."""
    g = torch.Generator().manual_seed(5)
    fam = KL_FAMILIES.index(family)
    q, p = make_params(family, (40,), 6, "full", "normal", g)
    q_loc, q_ls = (None, *q) if family == "exponential" else q
    p_loc, p_ls = (None, *p) if family == "exponential" else p
    leaves = [None if t is None else t.clone().requires_grad_() for t in (q_loc, q_ls, p_loc, p_ls)]
    terms = oracle.family_kl_terms(fam, *leaves)
    w = torch.randn(terms.shape, generator=g, dtype=F64)
    used = [t for t in leaves if t is not None]
    auto = torch.autograd.grad(terms, used, w, allow_unused=True)
    auto = [torch.zeros_like(t) if a is None else a for a, t in zip(auto, used)]
    dm1, ds1, dm2, ds2 = oracle.family_kl_grads(fam, w, q_loc, q_ls, p_loc, p_ls)
    closed = [ds1, ds2] if family == "exponential" else [dm1, ds1, dm2, ds2]
    for a, c in zip(auto, closed):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", [f for f in KL_FAMILIES if f != "kumaraswamy"])
def test_same_distribution_has_zero_kl(backend, family):
    """KL(q || q) = 0 (the terms cancel to rounding), the uniform's included
    (its support inside its own), with zero gradients in q at this minimum
    (the uniform's log(w2 / w1) has -1 in q's log-scale: no minimum there)."""
    _, device = backend
    g = torch.Generator().manual_seed(2)
    params = [(torch.randn(4, 9, generator=g) * 2).to(device).requires_grad_() for _ in range(2)]
    q = tuple(params[1:] if family == "exponential" else params)
    kl = fastvae.family_kl(family, q, tuple(t.detach() for t in q), reduce=False)
    assert torch.isfinite(kl).all()
    assert kl.abs().max() < 1e-5
    grads = torch.autograd.grad(kl.sum(), q)
    if family == "uniform":
        assert torch.equal(grads[0].cpu(), torch.zeros(4, 9)) and torch.equal(grads[1].cpu(), -torch.ones(4, 9))
    else:
        assert all(d.abs().max() < 1e-4 for d in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kumaraswamy_equal_to_its_beta_has_zero_kl(backend, dtype):
    """Kumaraswamy(a, 1) is Beta(a, 1) (both have CDF z^a): the KL is 0 (the
    series vanishes with beta - 1), and so are its gradients in q and in the
    prior's alpha at this minimum, for a from e^-4 to e^4. (Its gradient in
    beta, b times the series, is the truncation's: the oracle's.)"""
    _, device = backend
    log_a = torch.linspace(-4.0, 4.0, 18, dtype=dtype, device=device).reshape(2, 9).requires_grad_()
    log_b = torch.zeros(2, 9, dtype=dtype, device=device, requires_grad=True)
    log_alpha = log_a.detach().clone().requires_grad_()
    log_beta = torch.zeros(9, dtype=dtype, device=device, requires_grad=True)
    kl = fastvae.family_kl("kumaraswamy", (log_a, log_b), (log_alpha, log_beta), reduce=False)
    tol = 1e-12 if dtype == F64 else 1e-4
    assert not torch.isnan(kl).any() and kl.abs().max() < tol
    grads = torch.autograd.grad(kl.sum(), [log_a, log_b, log_alpha, log_beta])
    for d in grads[:3]:
        assert not torch.isnan(d).any() and d.abs().max() < 100 * tol
    leaves = [t.detach().double().cpu().requires_grad_() for t in (log_a, log_b, log_alpha, log_beta)]
    ref = oracle.family_kl_terms(KL_FAMILIES.index("kumaraswamy"), *leaves)
    want = torch.autograd.grad(ref.sum(), leaves[3])[0]
    assert want.abs().min() > 0.1
    assert_close(grads[3], want, want.abs() + 1.0, "d log_beta")


@pytest.mark.parametrize("family", ["laplace", "cauchy"])
def test_equal_locations_with_scales_past_float32_exp_range(backend, family):
    """m1 = m2 with log-scales of +-100 (exp over- or underflows in float32):
    the KL and its gradients are those of the scales alone, finite (no 0 * inf,
    no (b1 + b2)^2 overflow), where the float64 reference is too."""
    _, device = backend
    s1 = torch.tensor([[-100.0, 100.0, -100.0, 100.0]], device=device, requires_grad=True)
    s2 = torch.tensor([[-101.0, 99.5, -100.0, 100.0]], device=device, requires_grad=True)
    m = torch.tensor([[0.5, -2.0, 0.0, 3.0]], device=device, requires_grad=True)
    kl = fastvae.family_kl(family, (m, s1), (m.detach(), s2), reduce=False)
    args = [t.detach().double().cpu() for t in (m, s1, m, s2)]
    leaves = [a.requires_grad_() for a in args]
    ref = oracle.family_kl_terms(KL_FAMILIES.index(family), *leaves)
    assert_close(kl, ref.detach(), 2 + 200 + ref.detach().abs(), "kl")
    grads = torch.autograd.grad(kl.sum(), [m, s1, s2])
    refs = torch.autograd.grad(ref.sum(), [leaves[0], leaves[1], leaves[3]], allow_unused=True)
    for name, got, want in zip(["dm", "ds1", "ds2"], grads, refs):
        assert_close(got, want, torch.full_like(want, 4.0), name)


def test_uniform_outside_the_prior_is_inf_with_zero_gradient(backend):
    """The uniform's KL is inf where q's box leaves p's (below, above, wider),
    as torch.distributions' is, and its gradients there are 0; inside, log(w2 / w1)."""
    _, device = backend
    q_loc = torch.tensor([-1.5, 0.5, -0.5, 0.0], device=device, requires_grad=True)
    q_ls = torch.log(torch.tensor([1.0, 1.0, 3.0, 0.5], device=device)).requires_grad_()
    p_loc, p_ls = torch.tensor(-1.0, device=device), torch.tensor(math.log(2.0), device=device)
    p_ls.requires_grad_()
    kl = fastvae.family_kl("uniform", (q_loc, q_ls), (p_loc.expand(4), p_ls.expand(4)), reduce=False)
    want = torch.tensor([math.inf, math.inf, math.inf, math.log(4.0)])
    assert torch.isinf(kl.cpu()[:3]).all() and abs(float(kl[3]) - math.log(4.0)) < 1e-6
    assert torch.equal(torch.isinf(kl.cpu()), torch.isinf(want))
    dq_loc, dq_ls, dp_ls = torch.autograd.grad(kl[3] + (kl[:3] * 0).nan_to_num(0.0).sum(), [q_loc, q_ls, p_ls])
    assert torch.equal(dq_loc.cpu(), torch.zeros(4))
    assert torch.equal(dq_ls.cpu(), torch.tensor([0.0, 0.0, 0.0, -1.0]))
    assert float(dp_ls) == 1.0


def uniform_edge_params(N, L, shared, dtype, g):
    """(q, p) of the uniform in dtype: q's boxes well inside a wide prior's,
    with edges at fixed elements: q's low end on p's, q's low end one float
    below p's, a NaN location or log-scale, a zero width (log-scale -inf),
    which leave the kernels' block check passing (those blocks take no exp),
    and in the first 300 elements alone q = p exactly and q's high end past
    p's, which fail it (that block takes the elementwise form)."""
    pshape = (L,) if shared else (N, L)
    p_loc = (-3.0 + 0.1 * torch.randn(pshape, generator=g, dtype=F64)).to(dtype)
    p_ls = torch.full(pshape, math.log(8.0), dtype=dtype)
    P_loc, P_ls = p_loc.expand(N, L), p_ls.expand(N, L)
    q_loc = P_loc + (0.1 + 0.9 * torch.rand(N, L, generator=g, dtype=F64)).to(dtype)
    q_ls = torch.log(0.1 + 1.9 * torch.rand(N, L, generator=g, dtype=F64)).to(dtype)
    flat = torch.arange(N * L).view(N, L)
    edge = torch.full((N, L), -1)
    for k, at in enumerate((0, 5, 11, 17, 23, 29, 31)):  # one edge kind per position, every 41 elements
        edge[(flat % 41 == at) & (flat % 3 != 2) & ((k not in (0, 3)) | (flat < 300))] = k
    q_loc = torch.where(edge == 0, P_loc, q_loc)
    q_ls = torch.where(edge == 0, P_ls, q_ls)
    q_loc = torch.where(edge == 1, P_loc, q_loc)
    q_loc = torch.where(edge == 2, torch.nextafter(P_loc, torch.tensor(-math.inf, dtype=dtype)), q_loc)
    q_ls = torch.where(edge == 3, P_ls, q_ls)  # with q_loc above p's: its high end past p's by as much
    q_loc = torch.where(edge == 4, torch.full_like(q_loc, math.nan), q_loc)
    q_ls = torch.where(edge == 5, torch.full_like(q_ls, math.nan), q_ls)
    q_ls = torch.where(edge == 6, torch.full_like(q_ls, -math.inf), q_ls)
    return (q_loc, q_ls), (p_loc, p_ls), edge


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("N, L", [(1, 1), (37, 1), (9, 7), (40, 32), (5, 33), (3, 512), (2, 513), (1, 1100)])
def test_uniform_support_edges_against_the_oracle(backend, dtype, shared, N, L):
    """The uniform's KL where q's box touches p's ends, leaves them by one
    float or by a margin, or has NaN parameters, among boxes well inside (the
    kernels decide such blocks once, with no exp per element): inf (gradient
    0) exactly where the float64 oracle of the rounded inputs has it, NaN
    parameters' elements outside as the oracle's comparisons put them, the
    values and gradients (the prior's, per row or summed to its (L,)) the
    oracle's; each row as computed alone."""
    _, device = backend
    g = torch.Generator().manual_seed(N * 7919 + L)
    (q_loc, q_ls), (p_loc, p_ls), edge = uniform_edge_params(N, L, shared, dtype, g)
    q = [t.to(device).requires_grad_() for t in (q_loc, q_ls)]
    p = [t.to(device).requires_grad_() for t in (p_loc, p_ls)]
    fam = KL_FAMILIES.index("uniform")
    q_r = [t.detach().double().cpu().requires_grad_() for t in q]
    p_r = [t.detach().double().cpu().requires_grad_() for t in p]
    ref = oracle.family_kl_terms(fam, *q_r, *p_r)
    outside = (edge == 2) | (edge == 3) | (edge == 4) | (edge == 5)
    zero_width = edge == 6  # inside, log(w2 / 0) = inf, as the oracle's
    assert torch.equal(torch.isinf(ref), outside | zero_width)
    assert not torch.isnan(ref).any()
    for reduce in (False, True):
        kl = fastvae.family_kl("uniform", tuple(q), tuple(p), reduce=reduce)
        want = ref.sum(-1) if reduce else ref
        got = kl.detach().cpu()
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and not torch.isnan(got).any()
        finite = torch.isfinite(want)
        assert_close(got[finite], want.detach()[finite], torch.full_like(want.detach()[finite], 4.0), "kl")
        w = torch.randn(want.shape, generator=g, dtype=F64)
        grads = torch.autograd.grad(kl, q + p, w.to(kl.dtype).to(device))
        # the oracle's gradient: -w, w in the log-scales inside (inf terms included: their
        # gradient is the same +-w where the box is inside, 0 outside), 0 in the locations
        wd = (w[..., None] if reduce else w).expand(N, L)
        inside = ~outside
        refs = [torch.zeros(N, L, dtype=F64), torch.where(inside, -wd, 0.0),
                torch.zeros(N, L, dtype=F64), torch.where(inside, wd, 0.0)]
        for name, got_d, want_d, t in zip(["dq_loc", "dq_log_scale", "dp_loc", "dp_log_scale"], grads, refs,
                                          q + p):
            want_d = want_d.sum_to_size(t.shape)
            assert got_d.shape == t.shape and not torch.isnan(got_d).any()
            # each element's gradient is w's rounding; a shared prior's sums N of them
            assert_close(got_d, want_d, wd.abs().sum_to_size(t.shape) + 1e-3, name)
        # the same elements, one row at a time
        for row in {0, N // 2, N - 1}:
            pr = [t if shared else t[row:row + 1] for t in p]
            one = fastvae.family_kl("uniform", (q[0][row:row + 1], q[1][row:row + 1]), tuple(pr), reduce=reduce)
            assert torch.equal(one, kl[row:row + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_rounding_ties_decide_as_alone(backend, dtype):
    """q's high end on p's to rounding (m1 + e^s1 = m2 + e^s2 up to the last
    bit, m1 above m2), where the decision is the kernels' float rounding's:
    a box among boxes well inside (whose blocks the kernels decide at once)
    gets the KL and gradients it gets alone in a call."""
    _, device = backend
    g = torch.Generator().manual_seed(11)
    N, L = 64, 32
    (q_loc, q_ls), (p_loc, p_ls), _ = uniform_edge_params(N, L, True, dtype, g)
    q_loc, q_ls = q_loc.clone(), q_ls.clone()
    d = 0.25 + torch.rand(N, L, generator=g, dtype=F64)
    tie_ls = torch.log(torch.exp(p_ls.double()) - d)
    tie = (torch.arange(N * L).view(N, L) % 13) == 4
    q_loc = torch.where(tie, (p_loc.double() + d).to(dtype), q_loc)
    for nudge in (-1, 0, 1):  # the log-scale one float either side as well
        ls = tie_ls.to(dtype)
        if nudge:
            ls = torch.nextafter(ls, torch.tensor(nudge * math.inf, dtype=dtype))
        qs = torch.where(tie, ls, q_ls)
        q = [t.to(device).requires_grad_() for t in (q_loc, qs)]
        p = [t.to(device).requires_grad_() for t in (p_loc, p_ls)]
        kl = fastvae.family_kl("uniform", tuple(q), tuple(p), reduce=False)
        grads = torch.autograd.grad(kl.nan_to_num(posinf=0.0).sum(), q + p)
        for i in tie.nonzero()[:40].tolist():
            r, c = i
            q1 = [t[r:r + 1, c:c + 1].detach().requires_grad_() for t in q]
            p1 = [t[c:c + 1].detach().requires_grad_() for t in p]
            one = fastvae.family_kl("uniform", tuple(q1), tuple(p1), reduce=False)
            assert torch.equal(one[0, 0], kl[r, c])
            g1 = torch.autograd.grad(one.nan_to_num(posinf=0.0).sum(), q1 + p1)
            assert torch.equal(g1[1][0, 0], grads[1][r, c])


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    for family in ("laplace", "gumbel", "cauchy", "exponential", "kumaraswamy", "weibull"):
        fam = KL_FAMILIES.index(family)
        args = [torch.randn(3, 4, generator=g, dtype=F64).to(device).requires_grad_() for _ in range(3)]
        args.append(torch.randn(4, generator=g, dtype=F64).to(device).requires_grad_())  # a shared prior
        if family == "weibull":  # the concentrations within e^+-1 of each other: a KL of order one
            args = [(0.5 * t).detach().requires_grad_() for t in args]
        if family == "exponential":
            assert torch.autograd.gradcheck(lambda s1, s2, fam=fam: FamilyKL.apply(fam, True, None, s1, None, s2),
                                            [args[1], args[3]])
        else:
            assert torch.autograd.gradcheck(lambda *a, fam=fam: FamilyKL.apply(fam, False, *a), args)


def test_opcheck(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)  # fixed inputs: the Gumbel's KL is finite at these scales
    q = [torch.randn(6, 5, generator=g).to(device) for _ in range(2)]
    p = [torch.randn(5, generator=g).to(device) for _ in range(2)]
    torch.library.opcheck(family_kl_op, (q[1], q[0], p[1], p[0], 0, True))
    torch.library.opcheck(family_kl_op, (q[1], None, q[0], None, 4, False))
    torch.library.opcheck(family_kl_backward_op,
                          (torch.randn(6, generator=g).to(device), q[1], q[0], p[1], p[0], 2, True))
    torch.library.opcheck(family_kl_backward_op,
                          (torch.randn(6, 5, generator=g).to(device), None, q[1], None, q[0], 4, False))
    torch.library.opcheck(family_kl_op, (q[1], q[0], p[1], p[0], 5, False))
    torch.library.opcheck(family_kl_backward_op,
                          (torch.randn(6, generator=g).to(device), q[0], q[1], p[0], p[1], 5, True))
    torch.library.opcheck(family_kl_op, (q[1], q[0], p[1], p[0], 6, False))
    torch.library.opcheck(family_kl_backward_op,
                          (torch.randn(6, generator=g).to(device), q[0], q[1], p[0], p[1], 6, True))


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
@pytest.mark.parametrize("reduce", [True, False])
def test_empty(backend, shape, reduce):
    _, device = backend
    q_loc = torch.zeros(shape, device=device, requires_grad=True)
    p = torch.zeros(shape[-1], device=device, requires_grad=True)
    kl = fastvae.family_kl("laplace", (q_loc, torch.zeros(shape, device=device)), (p, p), reduce=reduce)
    assert kl.shape == (shape[:-1] if reduce else shape)
    assert torch.equal(kl.cpu(), torch.zeros(kl.shape))
    kl.sum().backward()
    assert q_loc.grad.shape == shape and torch.equal(p.grad.cpu(), torch.zeros(shape[-1]))


def test_non_contiguous_and_one_row(backend):
    _, device = backend
    g = torch.Generator().manual_seed(3)
    q_loc, q_ls = (torch.randn(7, 5, generator=g).to(device).t() for _ in range(2))
    # the prior from the same generator: moderate scales, so that the Gumbel KL is finite
    p_loc, p_ls = (torch.randn(7, generator=g).to(device) for _ in range(2))
    a = fastvae.family_kl("gumbel", (q_loc, q_ls), (p_loc, p_ls))
    assert torch.isfinite(a).all()
    b = fastvae.family_kl("gumbel", (q_loc.contiguous(), q_ls.contiguous()), (p_loc, p_ls))
    assert torch.equal(a, b)
    one = fastvae.family_kl("gumbel", (q_loc[2:3], q_ls[2:3]), (p_loc, p_ls))
    assert one.shape == (1,)
    assert_close(one, a[2:3].double(), a[2:3].abs() + 10.0, "one row")


def test_errors_on_bad_input(backend):
    _, device = backend
    t = torch.zeros(4, 3, device=device)
    with pytest.raises(ValueError, match="family must be one of .*'laplace'.*got 'normal'"):
        fastvae.family_kl("normal", (t, t), (t, t))
    with pytest.raises(ValueError, match=r"q: the exponential family takes \(log_rate\)"):
        fastvae.family_kl("exponential", (t, t), (t,))
    with pytest.raises(ValueError, match=r"p: the laplace family takes \(loc, log_scale\)"):
        fastvae.family_kl("laplace", (t, t), t)
    with pytest.raises(ValueError, match=r"p: the kumaraswamy family takes \(log_alpha, log_beta\)"):
        fastvae.family_kl("kumaraswamy", (t, t), (t,))
    with pytest.raises(ValueError, match=r"p's log_beta of shape \(2,\) does not broadcast"):
        fastvae.family_kl("kumaraswamy", (t, t), (t, torch.zeros(2, device=device)))
    with pytest.raises(ValueError, match=r"p's log_scale of shape \(2,\) does not broadcast"):
        fastvae.family_kl("laplace", (t, t), (t, torch.zeros(2, device=device)))
    with pytest.raises(ValueError, match=r"q's loc has shape \(4, 3\), q's log_scale has shape \(3, 4\)"):
        fastvae.family_kl("laplace", (t, torch.zeros(3, 4, device=device)), (t, t))
    with pytest.raises(TypeError, match="int32"):
        fastvae.family_kl("cauchy", (t, t.int()), (t, t))
    with pytest.raises(TypeError, match="reduce must be True or False"):
        fastvae.family_kl("cauchy", (t, t), (t, t), reduce="sum")
    with pytest.raises(ValueError, match="0-d"):
        fastvae.family_kl("exponential", (torch.zeros((), device=device),), (torch.zeros((), device=device),))


def test_matches_torch_distributions_at_float32(backend):
    """The fused KL against torch.distributions.kl_divergence in float32, as a
    user compares them."""
    _, device = backend
    g = torch.Generator().manual_seed(4)
    loc, ls = torch.randn(64, 8, generator=g).to(device), (torch.randn(64, 8, generator=g) * 0.5).to(device)
    for family, cls in (("laplace", td.Laplace), ("gumbel", td.Gumbel)):
        got = fastvae.family_kl(family, (loc, ls), (torch.zeros(8, device=device), torch.zeros(8, device=device)))
        want = td.kl_divergence(cls(loc, ls.exp()), cls(torch.zeros_like(loc), torch.ones_like(loc))).sum(-1)
        torch.testing.assert_close(got, want, rtol=RTOL[torch.float32], atol=1e-4)


# -- the op's cases of the suite-wide checks -----------------------------------------


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size, a
    learned (L,) prior."""
    return op(lambda ql, qs, pl, ps: fastvae.family_kl("laplace", (ql, qs), (pl, ps)), (B, L), (B, L), (L,), (L,))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (a learned (L,) prior: its
    gradients are sums over rows)."""
    ql, qs, pl, ps = leaf(20000, 8), leaf(20000, 8), leaf(8), leaf(8)
    return [lambda: run(lambda *a: fastvae.family_kl("cauchy", a[:2], a[2:]), ql, qs, pl, ps),
            lambda: run(lambda *a: fastvae.family_kl("laplace", a[:2], a[2:], reduce=False), ql, qs, pl, ps)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    ql, qs = leaf(3, 4), leaf(3, 4)
    return lambda: run(lambda a, b: fastvae.family_kl("cauchy", (a, b), (b[0], a[1])), ql, qs)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck. The
    parameters are scaled to 0.3: the Gumbel's KL grows as (b1/b2)^(b1/b2),
    past what finite differences resolve at unit log-scales."""
    def kl(family):
        return lambda ql, qs, pl, ps: fastvae.family_kl(family, (0.3 * ql, 0.3 * qs), (0.3 * pl, 0.3 * ps))

    cases = {f"family_kl_{family}": (kl(family), [r(3, 4), r(3, 4), r(4), r(4)], False)
             for family in ("laplace", "gumbel", "cauchy", "kumaraswamy", "weibull")}
    cases["family_kl_exponential"] = (
        lambda qs, ps: fastvae.family_kl("exponential", (qs,), (ps,), reduce=False), [r(3, 4), r(3, 4)], False)
    return cases


@pytest.mark.parametrize("family", KL_FAMILIES)
def test_latent_records_take_the_fused_kl(backend, family):
    """A torch posterior and a same-family torch prior, through fastvae.latents:
    the record's KL (summed and per dimension) and its gradients are the
    oracle's, the torch formulas the records computed before the fused op."""
    from fastvae import latents
    from fastvae.priors import TorchPrior

    _, device = backend
    g = torch.Generator().manual_seed(6)
    loc = (torch.randn(5, 3, generator=g) * 0.2).to(device).requires_grad_()
    ls = (torch.randn(5, 3, generator=g) * 0.3 - 1.0).to(device).requires_grad_()
    p_loc, p_ls = torch.full((3,), -0.5, device=device), torch.zeros(3, device=device)
    if family == "exponential":
        q, prior = latents.Positive("exponential", ls), td.Exponential(p_ls.exp())
    elif family == "kumaraswamy":  # against Beta(e^-0.5, 2)
        q, prior = latents.Positive("kumaraswamy", loc, ls), td.Beta(p_loc.exp(), p_ls.exp() * 2.0)
    elif family == "uniform":
        q = latents.LocationScale("uniform", loc, ls)
        prior = td.Uniform(p_loc - 1.0, p_loc + 2.0)
    elif family == "weibull":  # (log scale, log concentration) against Weibull(e^-0.5, e^-1): k2/k1 near 1
        p_ls = p_ls - 1.0
        q, prior = latents.Positive("weibull", loc, ls), td.Weibull(p_loc.exp(), p_ls.exp())
    else:
        cls = {"laplace": td.Laplace, "gumbel": td.Gumbel, "cauchy": td.Cauchy}[family]
        q, prior = latents.LocationScale(family, loc, ls), cls(p_loc, p_ls.exp())
    prior = TorchPrior(td.Independent(prior, 1))
    kl, per_dim = q.analytic_kl(prior), q.kl_per_dim(prior)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (loc, ls)]  # the oracle's, on the CPU
    fam = KL_FAMILIES.index(family)
    if family == "exponential":
        ref = oracle.family_kl_terms(fam, None, leaves[1], None, p_ls.double().cpu())
    elif family == "kumaraswamy":
        ref = oracle.family_kl_terms(fam, *leaves, p_loc.double().cpu(), p_ls.double().cpu() + math.log(2.0))
        # today's torch form, which the record computed before the fused op, to rounding
        old = latents.kumaraswamy_beta_kl(*leaves, p_loc.double().cpu().exp(), 2 * p_ls.double().cpu().exp())
        torch.testing.assert_close(ref, old, rtol=1e-14, atol=1e-14)
    elif family == "uniform":
        p_width = torch.full((3,), math.log(3.0), dtype=F64)
        ref = oracle.family_kl_terms(fam, *leaves, p_loc.double().cpu() - 1.0, p_width)
    else:
        ref = oracle.family_kl_terms(fam, *leaves, p_loc.double().cpu(), p_ls.double().cpu())
    assert torch.isfinite(ref).all()
    assert_close(per_dim, ref.detach(), ref.detach().abs() + 2.0, "kl per dim")
    assert_close(kl, ref.detach().sum(-1), ref.detach().abs().sum(-1) + 6.0, "kl")
    wanted = [ls] if family == "exponential" else [loc, ls]
    got = torch.autograd.grad(kl.sum(), wanted)
    want = torch.autograd.grad(ref.sum(), leaves[1:] if family == "exponential" else leaves, allow_unused=True)
    for name, a, b in zip(["d first", "d second"], got, want):
        b = torch.zeros_like(a, dtype=F64) if b is None else b
        assert_close(a, b, torch.full_like(b, 10.0), name)
