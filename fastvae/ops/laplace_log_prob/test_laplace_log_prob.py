"""laplace_log_prob against its float64 oracle
(fastvae/ops/laplace_log_prob/__init__.py) and torch.distributions.Laplace,
per backend (the root conftest.py); and its cases of the suite-wide checks."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import fastvae
from fastvae.ops import laplace_log_prob as oracle
from fastvae.ops.laplace_log_prob import op as laplace_module
from fastvae.ops.laplace_log_prob.op import LaplaceLogProb, laplace_log_prob_backward_op, laplace_log_prob_op

from conftest import INTERPRET
from helpers import (
    SCALE_LAYOUTS,
    assert_close,
    grads_and_float64_leaves,
    likelihood_checks,
    needs_plan_triton,
    plan_device_fixture,
    reference_tests,
    scale_likelihood_op_plans_check,
    summed_like,
)

# D values: odd, powers of two and +-1, the MNIST size, and longer than one Triton block
DIMS = [1, 2, 3, 31, 32, 33, 100, 784, 1025]
SCALES = ["element", "row", "dim", "scalar", "scale_float", "scale_tensor", "scale_tensor_dim", "default"]


@st.composite
def problems(draw):
    D, batch, K = likelihood_checks.location_scale_shapes(draw, DIMS)
    return dict(
        D=D, batch=batch, K=K, scale=draw(st.sampled_from(SCALES)), x_grad=draw(st.booleans()),
        s_grad=draw(st.booleans()), s_bound=draw(st.sampled_from([1.0, 5.0, 20.0])), ties=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(p, dtype, device):
    """(x, loc, the scale argument, kwargs for fastvae, inputs to differentiate);
    with p["ties"] some elements have x == loc exactly (sign(0) = 0)."""
    g = torch.Generator().manual_seed(p["seed"])
    D, batch, K = p["D"], p["batch"], p["K"]
    out_shape = (*(() if K is None else (K,)), *batch, D)

    def uniform(shape, bound):
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound

    x = (torch.randn((*batch, D), generator=g, dtype=torch.float64) * 2).to(dtype)
    loc = (torch.randn(out_shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    if p["ties"]:
        loc = torch.where(torch.rand(out_shape, generator=g) < 0.3, x.expand(out_shape), loc)
    x = x.to(device).requires_grad_(p["x_grad"])
    loc = loc.to(device).requires_grad_()
    kind, b = p["scale"], p["s_bound"]
    shapes = {"element": out_shape, "row": (*batch, D), "dim": (D,), "scalar": ()}
    if kind in shapes:
        s = uniform(shapes[kind], b)
    elif kind == "scale_tensor":
        s = torch.rand((), generator=g, dtype=torch.float64) + 0.1
    elif kind == "scale_tensor_dim":
        s = torch.rand((D,), generator=g, dtype=torch.float64) * 3 + 0.05
    else:
        s = None
    if s is not None:
        s = s.to(dtype).to(device).requires_grad_(p["s_grad"])
    kw = {"scale_float": dict(scale=0.7), "default": {}}.get(kind)
    if kw is None:
        kw = dict(scale=s) if kind.startswith("scale_tensor") else dict(log_scale=s)
    inputs = [t for t in (x, loc, s) if t is not None and t.requires_grad]
    return x, loc, s, kw, inputs


def log_scale_of(s, kw):
    """The float64 log-scale the call means."""
    if "log_scale" in kw:
        return s
    if "scale" in kw and isinstance(kw["scale"], torch.Tensor):
        return torch.log(s)
    return torch.tensor(math.log(kw.get("scale", 1.0)), dtype=torch.float64)


def check_against_reference(p, dtype, device):
    """Value and every gradient asked for in p against the float64 oracle, and
    the value against torch.distributions.Laplace."""
    x, loc, s, kw, inputs = build(p, dtype, device)
    out = fastvae.laplace_log_prob(x, loc, **kw)
    g, grads, leaves, as64 = grads_and_float64_leaves(out, inputs, p["seed"] + 1, dtype, device)
    x64, l64 = as64(x), as64(loc)
    ls64 = log_scale_of(as64(s), kw)
    ref = oracle.laplace_log_prob(x64, l64, ls64)
    torch_ref = torch.distributions.Laplace(l64.detach(), ls64.detach().exp()).log_prob(x64.detach()).sum(-1)
    torch.testing.assert_close(ref.detach(), torch_ref, rtol=1e-10, atol=1e-10)
    # never a half-precision bound: float32 for half inputs
    assert out.shape == ref.shape and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    b = ls64.detach().exp()
    terms = (x64.detach() - l64.detach()).abs() / b + ls64.detach().abs() + oracle.LOG_2
    assert_close(out, ref.detach(), terms.sum(-1), "log_prob")
    ref_grads = torch.autograd.grad(ref, [leaves[id(t)] for t in inputs], g.to(dtype).double())
    # every gradient element is a sum over K (and rows) of g * O(|x - loc| / b + 1 / b + 1)
    elem = g.abs()[..., None] * ((x64.detach() - l64.detach()).abs() / b + 1.0 / b + 1.0)
    for t, got, want in zip(inputs, grads, ref_grads):
        scale = summed_like(elem, want)
        if t is s and "scale" in kw:  # d log b / db = 1 / b
            scale = scale / s.detach().double().cpu()
        name = "dx" if t is x else "dloc" if t is loc else "dscale"
        assert_close(got, want, scale, name)
    return out, grads


# the gradients' 1/b must fit float16's 65504
test_forward_backward_match_reference, test_half_precision_matches_reference = reference_tests(
    check_against_reference, problems(), float16_caps={"s_bound": 5.0})


@pytest.mark.parametrize("scale", ["element", "row", "dim", "scalar", "scale_float", "scale_tensor_dim"])
@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (4, (300,), 3), (None, (2, 3), 5)])
def test_sums_over_samples_in_one_backward(backend, sample_splits, scale, K, batch, D):
    """dx of x broadcast over K, a shared scale's gradient (per row: summed over
    K; per dimension or a scalar: over every row), K = 1, one-row batches, odd
    D, and more rows than one interpreter program: against the float64
    reference, with the samples in one pass or split; a second call gives the
    same bits."""
    p = dict(D=D, batch=batch, K=K, scale=scale, x_grad=True, s_grad=True, s_bound=2.0, ties=True, seed=K or 0)
    likelihood_checks.same_bits_twice(check_against_reference, p, torch.float32, backend[1])


def test_gradient_at_x_equal_to_loc_uses_sign_zero(backend):
    """x == loc exactly: loc's and x's gradients are 0 (sign(0) = 0, as
    torch's Laplace.log_prob through abs gives them) and log_scale's is -g
    per element; the value is -(log b + log 2) per element."""
    _, device = backend
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64, device=device, requires_grad=True)
    loc = torch.tensor([[[0.5, -1.0, 3.0]], [[1.5, -1.0, 2.0]]], dtype=torch.float64, device=device,
                       requires_grad=True)
    log_scale = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, device=device, requires_grad=True)
    out = fastvae.laplace_log_prob(x, loc, log_scale)
    dx, dloc, ds = torch.autograd.grad(out.sum(), [x, loc, log_scale])
    x_t, loc_t, s_t = (t.detach().cpu().requires_grad_() for t in (x, loc, log_scale))
    want = torch.distributions.Laplace(loc_t, s_t.exp()).log_prob(x_t).sum(-1)
    torch.testing.assert_close(out.cpu(), want.detach(), rtol=1e-14, atol=1e-14)
    for got, expected in zip((dx, dloc, ds), torch.autograd.grad(want.sum(), [x_t, loc_t, s_t])):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-14, atol=1e-14)
    inv = torch.exp(-log_scale.detach().cpu())
    assert dloc[0, 0, :2].tolist() == [0.0, 0.0] and dloc[1, 0, 1:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(dloc[0, 0, 2].cpu(), -inv[2])  # x < loc: -1 / b
    # x < loc at (sample 1, d 0) and (sample 0, d 2): -sign(x - loc) / b each; nothing from the ties
    torch.testing.assert_close(dx.cpu(), torch.stack([inv[0], torch.zeros(()), inv[2]])[None])
    # log_scale: -1 per tie, |x - loc| / b - 1 = 1 / b - 1 at the two others
    torch.testing.assert_close(ds.cpu(), torch.stack([inv[0] - 2, torch.full((), -2.0), inv[2] - 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l1_loss_is_minus_the_log_prob_under_unit_scale(backend, dtype):
    """-laplace_log_prob(x, loc) (scale 1) = F.l1_loss(loc, x, reduction='sum')
    + D log 2 per row, and its gradient in loc is F.l1_loss's (sign(0) = 0 both)."""
    _, device = backend
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 29, generator=g, dtype=dtype).to(device)
    loc = torch.randn(6, 29, generator=g, dtype=dtype).to(device)
    loc[:, ::4] = x[:, ::4]
    loc.requires_grad_()
    nll = -fastvae.laplace_log_prob(x, loc)
    l1 = torch.stack([F.l1_loss(loc[i], x[i], reduction="sum") for i in range(6)])
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(nll, l1 + 29 * math.log(2.0), rtol=rtol, atol=0)
    (got,) = torch.autograd.grad(nll.sum(), [loc])
    (want,) = torch.autograd.grad(l1.sum(), [loc])
    assert torch.equal(got, want)


def test_extreme_scales_match_reference(backend):
    """log b of -30 and 30 (1/b of 1e13 and 1e-13) in float32, per element and
    per dimension, with ties: the float64 reference's values and gradients."""
    _, device = backend
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 33, generator=g).to(device)
    mean = torch.randn(2, 5, 33, generator=g)
    mean[..., ::3] = x.cpu()[..., ::3]
    loc = mean.to(device).requires_grad_()
    for lv in (-30.0, 30.0):
        for shape in ((2, 5, 33), (33,)):
            log_scale = torch.full(shape, lv, device=device, requires_grad=True)
            out, grads, ref, ref_grads, (x64, l64, s64) = likelihood_checks.against_oracle(
                fastvae.laplace_log_prob, oracle.laplace_log_prob, x, loc, log_scale)
            terms = (x64 - l64).abs() * torch.exp(-s64) + abs(lv) + 1.0
            assert_close(out, ref, terms.sum(-1), f"log_prob, log_scale {lv}")
            assert_close(grads[0], ref_grads[0], ref_grads[0].abs() + 1e-30, f"dloc, log_scale {lv}")
            assert_close(grads[1], ref_grads[1], terms.sum_to_size(shape), f"dlog_scale, log_scale {lv}")


def test_underflowing_scale_at_an_exact_match_is_finite(backend):
    """x == loc with log_scale = -100 in float32: exp(100) overflows, and the
    deviation term must be 0, not 0 * inf = NaN, in the value and the gradients."""
    _, device = backend
    x = torch.zeros(2, 5, device=device)
    loc = torch.zeros(3, 2, 5, device=device, requires_grad=True)
    for shape in ((3, 2, 5), (2, 5), (5,)):
        log_scale = torch.full(shape, -100.0, device=device, requires_grad=True)
        out = fastvae.laplace_log_prob(x, loc, log_scale)
        torch.testing.assert_close(out.double().cpu(), torch.full((3, 2), -5 * (-100.0 + math.log(2.0)),
                                                                  dtype=torch.float64), rtol=1e-6, atol=0)
        dloc, ds = torch.autograd.grad(out.sum(), [loc, log_scale])
        assert torch.equal(dloc.cpu(), torch.zeros(3, 2, 5)), shape
        torch.testing.assert_close(ds.cpu(), torch.full((3, 2, 5), -1.0).sum_to_size(shape))


def test_x_is_not_copied_per_sample(backend):
    """x (B, D) against loc (K, B, D): the op sees x at its own size, and dx sums over K."""
    x, loc, dx = likelihood_checks.x_is_not_copied_per_sample(fastvae.laplace_log_prob, backend[1])
    torch.testing.assert_close(dx, torch.sign(loc - x).detach().sum(0), rtol=1e-12, atol=1e-12)


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()  # noqa: E731
    x, loc = r(3, 5), r(2, 3, 5)
    for s in (r(2, 3, 5), r(3, 5), r(5)):
        # fast_mode under the interpreter, where each of the full check's evaluations runs interpreted kernels
        assert torch.autograd.gradcheck(LaplaceLogProb.apply, (x, loc, s), fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    x = torch.randn(3, 7, device=device, requires_grad=True)
    loc = torch.randn(2, 3, 7, device=device, requires_grad=True)
    for s in (torch.randn(2, 3, 7, device=device), torch.randn(3, 7, device=device), torch.randn(7, device=device)):
        torch.library.opcheck(laplace_log_prob_op, (x, loc, s.requires_grad_()))
    g = torch.randn(2, 3, device=device)
    for need_dx in (False, True):
        for need_ds in (False, True):
            args = (g, x.detach(), loc.detach(), torch.randn(7, device=device), need_dx, need_ds)
            torch.library.opcheck(laplace_log_prob_backward_op, args)


def test_unusual_broadcast_is_materialized(backend):
    _, device = backend
    x = torch.randn(1, 6, device=device, dtype=torch.float64, requires_grad=True)
    loc = torch.randn(4, 6, device=device, dtype=torch.float64)
    out = fastvae.laplace_log_prob(x, loc, scale=0.5)
    ref = oracle.laplace_log_prob(x, loc, torch.tensor(math.log(0.5), dtype=torch.float64))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (dx,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(dx, (torch.sign(loc - x.detach()) / 0.5).sum(0, keepdim=True), rtol=1e-12, atol=1e-12)


def test_empty(backend):
    _, device = backend
    loc = torch.zeros(2, 0, 5, device=device, requires_grad=True)
    log_scale = torch.zeros(5, device=device, requires_grad=True)
    out = fastvae.laplace_log_prob(torch.zeros(0, 5, device=device), loc, log_scale)
    assert out.shape == (2, 0)
    out.sum().backward()
    assert loc.grad.shape == (2, 0, 5) and torch.equal(log_scale.grad.cpu(), torch.zeros(5))


def test_errors_on_bad_input(backend):
    _, device = backend
    x, loc = likelihood_checks.refuses_bad_location_scale_input(fastvae.laplace_log_prob, "log_scale", device)
    with pytest.raises(ValueError, match=r"scale must be > 0, got a value of -1"):
        fastvae.laplace_log_prob(x, loc, scale=torch.tensor([1.0, -1.0, 2.0], device=device))


@pytest.mark.parametrize("bad", [math.inf, math.nan, 0.0, -1.0, True])
def test_invalid_float_scale_is_refused_on_every_backend(backend, bad):
    _, device = backend
    x, loc = torch.zeros(2, 3, device=device), torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match="scale must be a finite float > 0"):
        fastvae.laplace_log_prob(x, loc, scale=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", ["same", torch.float32])
def test_half_precision(backend, dtype, x_dtype):
    """Half-precision loc and log_scale, x in half precision or float32 (as
    under autocast): the float32 log-probability of the float64 oracle at the
    same rounded inputs, to float32 accumulation error; each input's gradient
    in its dtype."""
    x, loc, log_scale, out = likelihood_checks.location_scale_half_precision(fastvae.laplace_log_prob, dtype,
                                                                            x_dtype, backend[1])
    x64, l64, s64 = (t.detach().double().cpu() for t in (x, loc, log_scale))
    ref = oracle.laplace_log_prob(x64, l64, s64)
    terms = ((x64 - l64).abs() * torch.exp(-s64) + s64.abs() + 1.0).sum(-1)
    assert_close(out, ref, terms, "log_prob")
    grads = torch.autograd.grad(out.sum(), [x, loc, log_scale])
    assert [t.dtype for t in grads] == [x.dtype, dtype, dtype]
    leaves = [t.requires_grad_() for t in (x64, l64, s64)]
    ref_grads = torch.autograd.grad(oracle.laplace_log_prob(*leaves).sum(), leaves)
    for got, want, name in zip(grads, ref_grads, ("dx", "dloc", "dlog_scale")):
        assert_close(got, want, want.abs() + 3 * torch.exp(-s64).sum(0) * (want.dim() < 3) + 1.0, name)


def test_event_dims_sum_over_image_dimensions(backend):
    """event_dims=3 on (K, B, C, H, W) equals the flattened (K, B, C*H*W) call,
    with x broadcast over K and a per-channel log-scale."""
    likelihood_checks.event_dims_flatten(fastvae.laplace_log_prob, backend[1], "laplace")


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


# tests/test_launches.py's and tests/test_backend.py's calls, as every
# location-scale likelihood's, with the log-scale as the scale parameter
launch_case, thread_count_calls, fallback_call = likelihood_checks.location_scale_cases(fastvae.laplace_log_prob,
                                                                                         "log_scale")


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck: every
    log-scale layout, no sample dimension, a scale tensor and a fixed scale. (The Laplace's second derivative in
    loc is 0 away from x == loc; its derivatives through the scale are not.)"""
    return likelihood_checks.location_scale_double_backward_cases("laplace_log_prob", fastvae.laplace_log_prob, r)


def _twin_inputs(seed, P, D, K):
    """x (P, D) and a decoder location (K, P, D), from their own generator,
    with x == loc at every third element of the first sample (sign(0) = 0)."""
    g = torch.Generator().manual_seed(seed)
    x, loc = torch.randn(P, D, generator=g), torch.randn(K, P, D, generator=g)
    loc[0, :, ::3] = x[:, ::3]
    return x, loc


def compile_cases(mu, lv):
    """tests/test_compile.py: (name, function, float inputs) whose compiled graph
    calls the C++ twins, forward and backward (mu, lv: (5, 2, 3), unused: the
    likelihood takes x (6, 7) against a location (4, 6, 7))."""
    x, loc = _twin_inputs(3, 6, 7, 4)
    return [("laplace_log_prob (log_scale per element)", lambda a, m, s: fastvae.laplace_log_prob(a, m, log_scale=s),
             (x, loc, loc.flip(0) * 0.5)),
            ("laplace_log_prob (log_scale per dimension)", lambda a, m, s: fastvae.laplace_log_prob(a, m, s),
             (x, loc, loc[0, 0]))]


def twin_op_cases(m2, l2):
    """tests/test_torch_ops.py: (twin, arguments) in the Python op's layout, each
    checked bit for bit against fastvae::<twin> and by opcheck (m2, l2: (12, 6),
    unused: x (5, 7) against a location (3, 5, 7))."""
    x, loc = _twin_inputs(8, 5, 7, 3)
    return [("laplace_log_prob", (x, loc, loc.flip(0))),
            ("laplace_log_prob", (x, loc, x.flip(1))),
            ("laplace_log_prob_backward", (torch.randn(3, 5), x, loc, loc[0, 0], True, True)),
            ("laplace_log_prob_backward", (torch.randn(3, 5), x, loc, x, False, True)),
            ("laplace_log_prob_backward", (torch.randn(3, 5), x, loc, loc.flip(0), True, False))]


# -- the ops' own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(laplace_module)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, P, D, splits", [(1, 1, 1, None), (3, 5, 7, None), (3, 5, 7, 2), (2, 3, 1030, None)])
@pytest.mark.parametrize("layout", SCALE_LAYOUTS)
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, K, P, D, splits,
                                                                    layout):
    """fastvae::laplace_log_prob and its backward called as a compiled graph
    calls them (x (P, D), loc (K, P, D), the log-scale per element, per x
    row or per dimension, contiguous): on the triton backend from a plan of
    the call's signature (OP_PLANS), with the general launch's
    log-likelihood and every gradient bit for bit, for each set of gradients
    asked for, from the first call and the second; one element, odd sizes, D
    past one block, samples split (the splits' partial sums); the calls the
    plans refuse make none (helpers.scale_likelihood_op_plans_check)."""
    scale_likelihood_op_plans_check(monkeypatch, laplace_module, laplace_log_prob_op, laplace_log_prob_backward_op,
                                    (), (K, P, D), splits, layout, dtype, plan_device)
