"""bernoulli_log_prob and continuous_bernoulli_log_prob against their float64
oracle (fastvae/ops/bernoulli_likelihood/__init__.py), per backend (the root
conftest.py), continuous_bernoulli_log_prob also against
torch.distributions.ContinuousBernoulli where torch's normalizer is accurate;
and the family's cases of the suite-wide checks.

One front end and one kernel per backend, with the formula as a variant:
random problems, the comparison against the float64 oracle, and the check
that dx of x broadcast over K comes out the same twice are shared."""
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvae
from fastvae.ops import bernoulli_likelihood as oracle
from fastvae.ops.bernoulli_likelihood import op as bernoulli_op
from fastvae.ops.bernoulli_likelihood.op import (
    BernoulliLogProb,
    ContinuousBernoulliLogProb,
    bernoulli_log_prob_backward_op,
    bernoulli_log_prob_op,
    continuous_bernoulli_log_prob_backward_op,
    continuous_bernoulli_log_prob_op,
)

from conftest import INTERPRET
from helpers import (
    assert_close,
    likelihood_checks,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    plan_device_fixture,
)

# -- shared by the two ops' tests ---------------------------------------------------


@st.composite
def problems(draw, dims, bounds):
    """x (*batch, D) against logits (K, *batch, D) (no K: logits of x's shape),
    logits uniform in +-bound, at most about 12000 elements."""
    D = draw(st.sampled_from(dims))
    batch = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    K = draw(st.sampled_from([None, 1, 2, 5]))
    while math.prod(batch) * (K or 1) * D > 12000 and batch:
        batch = batch[1:]
    return dict(D=D, batch=batch, K=K, x_kind=draw(st.sampled_from(["binary", "unit"])),
                bound=draw(st.sampled_from(bounds)), x_grad=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def _check_against_reference(p, dtype, device, op, ref_op, terms):
    """Value and gradients (dx when p asks for it) of ``op`` against the float64
    ``ref_op``; terms(x64, l64) bounds the size of the terms behind each value."""
    g = torch.Generator().manual_seed(p["seed"])
    D, batch, K = p["D"], p["batch"], p["K"]
    out_shape = (*(() if K is None else (K,)), *batch, D)
    x = torch.rand((*batch, D), generator=g, dtype=torch.float64)
    if p["x_kind"] == "binary":
        x = (x > 0.5).double()
    logits = (torch.rand(out_shape, generator=g, dtype=torch.float64) * 2 - 1) * p["bound"]
    x = x.to(dtype).to(device).requires_grad_(p["x_grad"])
    logits = logits.to(dtype).to(device).requires_grad_()
    inputs = [t for t in (x, logits) if t.requires_grad]

    out = op(x, logits)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, up.to(dtype).to(device))

    x64 = x.detach().double().cpu().requires_grad_(p["x_grad"])
    l64 = logits.detach().double().cpu().requires_grad_()
    ref = ref_op(x64, l64)
    ref_grads = torch.autograd.grad(ref, [t for t in (x64, l64) if t.requires_grad], up.to(dtype).double())
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # never a half-precision bound
    assert_close(out, ref.detach(), terms(x64.detach(), l64.detach()).sum(-1), "log_prob")
    for t, got, want in zip(inputs, grads, ref_grads):
        # dlogits = up (x - E[x]) is bounded by |up|; dx = sum_k up l grows with |l|
        scale = up.abs()[..., None] * ((1.0 + l64.detach().abs()) if t is x else torch.ones_like(l64))
        while scale.dim() > want.dim():
            scale = scale.sum(0)
        assert_close(got, want, scale, "dx" if t is x else "dlogits")
    return out, grads


def _check_dx_twice(K, batch, D, device, op, ref_op, terms):
    """dx of x broadcast over K against the reference, and a second call with
    the same bits (the Triton split's arrival counters are back at 0)."""
    p = dict(D=D, batch=batch, K=K, x_kind="unit", bound=3.0, x_grad=True, seed=D)
    out, grads = _check_against_reference(p, torch.float32, device, op, ref_op, terms)
    again, grads_again = _check_against_reference(p, torch.float32, device, op, ref_op, terms)
    assert torch.equal(out, again)
    for a, b in zip(grads, grads_again):
        assert torch.equal(a, b)


# -- bernoulli_log_prob ------------------------------------------------------------

BERNOULLI_DIMS = [1, 2, 3, 31, 32, 33, 100, 784, 1025, 1537]
BERNOULLI_BOUNDS = [3.0, 30.0, 90.0, 200.0]


def _bernoulli_terms(x64, l64):
    """The size of the terms behind each value: |x l| and softplus(l)."""
    return (x64 * l64).abs() + oracle.softplus(l64)


def check_bernoulli_against_reference(p, dtype, device):
    return _check_against_reference(p, dtype, device, fastvae.bernoulli_log_prob, oracle.bernoulli_log_prob,
                                    _bernoulli_terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(p=problems(BERNOULLI_DIMS, BERNOULLI_BOUNDS))
def test_bernoulli_forward_backward_match_reference(backend, dtype, p):
    check_bernoulli_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (4, (300,), 3), (None, (2, 3), 5)])
def test_bernoulli_dx_sums_over_samples_in_one_backward(backend, sample_splits, K, batch, D):
    """dx of x broadcast over K (K = 1, one row, odd D, more rows than one
    interpreter program) against the float64 reference, the samples in one
    pass or split; a second call gives the same bits (the split's arrival
    counters are back at 0)."""
    _check_dx_twice(K, batch, D, backend[1], fastvae.bernoulli_log_prob, oracle.bernoulli_log_prob,
                    _bernoulli_terms)


@pytest.mark.parametrize("lg", [-90.0, 90.0, -1000.0, 1000.0])
def test_bernoulli_large_logits_are_exact(backend, lg):
    """softplus(90) is 90 to float32 precision and softplus(-90) is ~1e-39: no inf, no NaN, no cut-off."""
    _, device = backend
    x = torch.tensor([[0.0, 1.0, 0.25]], device=device)
    logits = torch.full((2, 1, 3), lg, device=device, requires_grad=True)
    out = fastvae.bernoulli_log_prob(x, logits)
    expected = (x.double().cpu() * lg - max(lg, 0.0) - math.log1p(math.exp(-abs(lg)))).sum(-1).expand(2, 1)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-6, atol=0)
    (dl,) = torch.autograd.grad(out.sum(), [logits])
    torch.testing.assert_close(dl.double().cpu(), (x.double().cpu() - (1.0 if lg > 0 else 0.0)).expand(2, 1, 3),
                               rtol=0, atol=1e-30)


def test_bernoulli_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    logits = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 4).to(device).requires_grad_()
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(BernoulliLogProb.apply, (x, logits), fast_mode=INTERPRET)
    assert torch.autograd.gradcheck(BernoulliLogProb.apply, (x, logits[0]), fast_mode=INTERPRET)


@pytest.mark.parametrize("ops", [(bernoulli_log_prob_op, bernoulli_log_prob_backward_op),
                                 (continuous_bernoulli_log_prob_op, continuous_bernoulli_log_prob_backward_op)],
                         ids=["bernoulli", "continuous_bernoulli"])
def test_opcheck(backend, ops):
    """Each likelihood's operator and its backward, x with and without a gradient."""
    _, device = backend
    forward, backward = ops
    x = torch.rand(3, 7, device=device, requires_grad=True)
    logits = torch.randn(2, 3, 7, device=device, requires_grad=True)
    torch.library.opcheck(forward, (x, logits))
    torch.library.opcheck(forward, (x.detach(), logits))
    for need_dx in (False, True):
        args = (torch.randn(2, 3, device=device), x.detach(), logits.detach(), need_dx)
        torch.library.opcheck(backward, args)


def test_bernoulli_errors_on_bad_input(backend):
    _, device = backend
    logits = torch.zeros(2, 4, 3, device=device)
    likelihood_checks.refuses_bad_x(fastvae.bernoulli_log_prob, logits, device, (4, 2), torch.bool)
    # mixed dtypes are read as they are; a float64 input makes the result float64
    assert fastvae.bernoulli_log_prob(torch.zeros(4, 3, dtype=torch.float64, device=device), logits).dtype == \
        torch.float64
    with pytest.raises(ValueError, match="0-d"):
        fastvae.bernoulli_log_prob(torch.zeros((), device=device), torch.zeros((), device=device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", ["same", torch.float32])
def test_bernoulli_half_precision(backend, dtype, x_dtype):
    """Logits in half precision and x in it or in float32 (autocast's): the
    oracle's value to float32 accumulation error, gradients in the inputs' dtypes."""
    g = torch.Generator().manual_seed(5)
    x, logits = likelihood_checks.half_precision_leaves(
        dtype, x_dtype, backend[1], torch.rand(4, 37, generator=g) > 0.5, torch.randn(3, 4, 37, generator=g) * 5)
    out = fastvae.bernoulli_log_prob(x, logits)
    assert out.dtype == torch.float32
    x64, l64 = x.detach().double().cpu(), logits.detach().double().cpu()
    terms = ((x64 * l64).abs() + oracle.softplus(l64)).sum(-1)
    assert_close(out, oracle.bernoulli_log_prob(x64, l64), terms, "log_prob")
    dx, dl = torch.autograd.grad(out.sum(), [x, logits])
    assert (dx.dtype, dl.dtype) == (x.dtype, dtype)
    assert_close(dl, x64 - torch.sigmoid(l64), torch.ones_like(l64), "dlogits")
    assert_close(dx, l64.sum(0), l64.abs().sum(0) + 1, "dx")


@settings(max_examples=8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(p=problems(BERNOULLI_DIMS, BERNOULLI_BOUNDS))
def test_bernoulli_half_precision_matches_reference(backend, dtype, p):
    """The Hypothesis problems in half precision (float32 results; the float64
    reference sees the same rounded inputs, so the float32 tolerance applies to
    the value, the half one to the stored gradients)."""
    check_bernoulli_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_saturated_logits_give_the_limit_not_nan(backend, dtype):
    """logits of +-inf: 0 where the outcome is certain and right, -inf where it is
    certain and wrong, and the gradient x - sigmoid(l), which is 0 where exact."""
    _, device = backend
    x = torch.tensor([0.0, 1.0, 0.25, 0.0, 1.0, 0.25], dtype=dtype, device=device)
    lg = torch.tensor([math.inf] * 3 + [-math.inf] * 3, dtype=dtype, device=device)
    logits = lg[:, None].clone().requires_grad_()  # one element per row: each limit on its own
    out = fastvae.bernoulli_log_prob(x[:, None], logits)
    expected = torch.tensor([-math.inf, 0.0, -math.inf, 0.0, -math.inf, -math.inf], dtype=torch.float64)
    assert torch.equal(out.double().cpu(), expected)
    (dl,) = torch.autograd.grad(out.sum(), [logits])
    expected_grad = (x - (lg > 0).to(dtype)).double().cpu()
    assert torch.equal(dl[:, 0].double().cpu(), expected_grad)
    # one saturated, certain-and-right sample among finite ones changes nothing
    mixed = torch.tensor([[math.inf, 2.0, -1.0]], dtype=dtype, device=device)
    xm = torch.tensor([[1.0, 1.0, 0.0]], dtype=dtype, device=device)
    finite = fastvae.bernoulli_log_prob(xm[:, 1:], mixed[:, 1:])
    torch.testing.assert_close(fastvae.bernoulli_log_prob(xm, mixed), finite)


# -- continuous_bernoulli_log_prob -------------------------------------------------

CB_DIMS = [1, 2, 3, 31, 33, 100, 784, 1025]
CB_BOUNDS = [0.02, 0.3, 2.0, 30.0, 200.0]  # straddle both branch points (0.25 in float64, 1 in float32), saturate


def _cb_terms(x64, l64):
    """The size of the terms behind each value: |x l|, softplus(l) and |log C(l)|."""
    return (x64 * l64).abs() + oracle.softplus(l64) + oracle.continuous_bernoulli_log_norm(l64).abs()


def check_cb_against_reference(p, dtype, device):
    return _check_against_reference(p, dtype, device, fastvae.continuous_bernoulli_log_prob,
                                    oracle.continuous_bernoulli_log_prob, _cb_terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(p=problems(CB_DIMS, CB_BOUNDS))
def test_continuous_bernoulli_forward_backward_match_reference(backend, dtype, p):
    check_cb_against_reference(p, dtype, backend[1])


@settings(max_examples=8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(p=problems(CB_DIMS, CB_BOUNDS))
def test_continuous_bernoulli_half_precision_matches_reference(backend, dtype, p):
    """Half-precision logits and x: a float32 result equal to the float64 one of
    the same rounded inputs; gradients in their dtype."""
    check_cb_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (4, (300,), 3), (None, (2, 3), 5)])
def test_continuous_bernoulli_dx_sums_over_samples(backend, sample_splits, K, batch, D):
    """dx of x broadcast over K (K = 1, one row, odd D, the folded CPU layout)
    against the reference, twice with the same bits."""
    _check_dx_twice(K, batch, D, backend[1], fastvae.continuous_bernoulli_log_prob,
                    oracle.continuous_bernoulli_log_prob, _cb_terms)


def _log_norm_exact(lg: float) -> float:
    """log(l / tanh(l / 2)) from exact rational arithmetic of its series / closed form in
    float64 with math.expm1 (accurate everywhere): an oracle independent of the reference's."""
    if lg == 0:
        return math.log(2.0)
    a = abs(lg)
    if a < 1e-3:  # the series to l^6 in exact fractions (the rest is below 1e-22)
        u = Fraction(a) ** 2
        return math.log(2.0) + float(u / 12 - 7 * u**2 / 1440 + 31 * u**3 / 90720)
    return math.log(a / -math.expm1(-a)) + math.log1p(math.exp(-a))


LOGITS = [0.0, 1e-8, -3e-4, 0.1, -0.2499, 0.25, 0.2501, -0.5, 0.9999, 1.0, -1.0001, 3.0, -17.0, 40.0, -90.0,
          1e3, -1e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_bernoulli_log_normalizer_near_zero_and_at_large_logits(backend, dtype):
    """log C at and around the branch points (0.25, 1), at 0, and saturated
    logits, against an independent float64 oracle; the gradient against
    1/l - 1/sinh(l) in exact fractions near 0 and in float64 beyond: no NaN,
    no cancellation."""
    _, device = backend
    lg = torch.tensor(LOGITS, dtype=dtype, device=device)
    x = torch.full_like(lg, 0.5)  # x l - softplus(l) = -log(2 cosh(l / 2)): kept apart from log C
    logits = lg[:, None].clone().requires_grad_()
    out = fastvae.continuous_bernoulli_log_prob(x[:, None], logits)
    l64 = lg.double().cpu()
    bern = 0.5 * l64 - oracle.softplus(l64)
    want = torch.tensor([_log_norm_exact(v) for v in l64.tolist()], dtype=torch.float64) + bern
    assert_close(out, want, bern.abs() + 1.0, "log_prob")
    (dl,) = torch.autograd.grad(out.sum(), [logits])

    def grad_exact(v):
        if abs(v) < 1e-2:  # 1/l - 1/sinh(l) by its series in exact fractions
            u = Fraction(v)
            return float(u / 6 - 7 * u**3 / 360 + 31 * u**5 / 15120 - 127 * u**7 / 604800)
        return 1.0 / v - 1.0 / math.sinh(v) if abs(v) < 700 else 1.0 / v

    want_grad = torch.tensor([0.5 - 1 / (1 + math.exp(-v)) + grad_exact(v) if v > -700 else 0.5 + grad_exact(v)
                              for v in l64.tolist()], dtype=torch.float64)
    assert_close(dl[:, 0], want_grad, torch.ones_like(want_grad), "dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_bernoulli_matches_torch_distributions_where_torch_is_accurate(backend, dtype):
    """Equal to ContinuousBernoulli(logits).log_prob(x) for |l| <= 8 (torch's
    normalizer is computed from the probability, which loses digits as
    sigmoid(l) nears 1: its log1p(-p) drifts by 1e-7 at |l| = 8 in float32),
    values and gradients; beyond that, against the float64 oracle."""
    _, device = backend
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 40, generator=g, dtype=torch.float64)
    logits = (torch.rand(4, 6, 40, generator=g, dtype=torch.float64) * 16 - 8)
    logits[0, 0, :5] = torch.tensor([0.0, 1e-3, -2e-3, 0.499, -0.01])  # torch's own Taylor window
    xd = x.to(dtype).to(device)
    ld = logits.to(dtype).to(device).requires_grad_()
    out = fastvae.continuous_bernoulli_log_prob(xd, ld)
    l64 = logits.clone().requires_grad_()
    peer = torch.distributions.ContinuousBernoulli(logits=l64).log_prob(x).sum(-1)
    terms = _cb_terms(x, logits).sum(-1)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double().cpu(), peer.detach(), rtol=0, atol=rtol * terms.max().item())
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (dl,) = torch.autograd.grad(out, [ld], up.to(dtype).to(device))
    (dpeer,) = torch.autograd.grad(peer, [l64], up)
    torch.testing.assert_close(dl.double().cpu(), dpeer, rtol=0, atol=(1e-8 if dtype == torch.float64 else 1e-5)
                               * up.abs().max().item())
    # saturated logits, where torch drifts: the reference instead
    big = torch.tensor([[30.0, -30.0, 200.0, -500.0]], dtype=dtype, device=device)
    xb = torch.tensor([[0.9, 0.1, 1.0, 0.0]], dtype=dtype, device=device)
    want = oracle.continuous_bernoulli_log_prob(xb.double().cpu(), big.double().cpu())
    assert_close(fastvae.continuous_bernoulli_log_prob(xb, big), want,
                 _cb_terms(xb.double().cpu(), big.double().cpu()).sum(-1), "saturated")


def test_continuous_bernoulli_density_integrates_to_one():
    """The normalizer is right: the density integrates to 1 over [0, 1] (a
    midpoint rule in float64, whose error is below 2e-8 at n = 20000) at
    logits across both branches."""
    n = 20000
    x = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    for lg in (0.0, 1e-4, 0.2, 0.7, 3.0, -12.0):
        density = torch.exp(fastvae.continuous_bernoulli_log_prob(x, torch.full((n, 1), lg, dtype=torch.float64)))
        assert abs(density.mean().item() - 1.0) < 1e-6, lg


def test_continuous_bernoulli_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    logits = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2).to(device)
    logits[0, 0, :3] = torch.tensor([0.0, 0.2, -0.3])
    logits.requires_grad_()
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(ContinuousBernoulliLogProb.apply, (x, logits), fast_mode=INTERPRET)
    assert torch.autograd.gradcheck(ContinuousBernoulliLogProb.apply, (x, logits[0]), fast_mode=INTERPRET)
    assert torch.autograd.gradgradcheck(fastvae.continuous_bernoulli_log_prob, (x, logits), fast_mode=INTERPRET)


def test_continuous_bernoulli_errors_on_bad_input(backend):
    _, device = backend
    logits = torch.zeros(2, 4, 3, device=device)
    with pytest.warns(UserWarning, match="outside"):  # first: on the triton backend only the first call is read
        fastvae.continuous_bernoulli_log_prob(torch.full((4, 3), 2.0, device=device), logits)
    likelihood_checks.refuses_bad_x(fastvae.continuous_bernoulli_log_prob, logits, device, (4, 2), torch.int64)


def test_continuous_bernoulli_compiles_without_graph_breaks(backend):
    _, device = backend
    x = torch.rand(3, 7, device=device)
    logits = torch.randn(2, 3, 7, device=device, requires_grad=True)
    f = torch.compile(fastvae.continuous_bernoulli_log_prob, fullgraph=True)
    torch.testing.assert_close(f(x, logits), fastvae.continuous_bernoulli_log_prob(x, logits))


# -- the family's cases of the suite-wide checks -------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the ops: test_registry.py fails when
# one is missing. launch_case, thread_count_calls and fallback_call give
# {op name: its case} (a family's, tests/helpers.py PER_OP_CASES).


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size, per op;
    ``op`` makes the call from the function and its leaves' shapes (x: binary,
    made without a draw)."""
    x = (torch.arange(B * D).reshape(B, D) % 2).float()
    return {"bernoulli_log_prob": op(lambda lg: fastvae.bernoulli_log_prob(x, lg), (K, B, D)),
            "continuous_bernoulli_log_prob": op(lambda lg: fastvae.continuous_bernoulli_log_prob(x, lg), (K, B, D))}


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count, per op (few x rows against many
    samples: the folded layout)."""
    x, logits = torch.sigmoid(leaf(8, 16)).detach().requires_grad_(), leaf(1000, 8, 16, scale=4)
    return {"bernoulli_log_prob": [lambda: run(fastvae.bernoulli_log_prob, x, logits)],
            "continuous_bernoulli_log_prob": [lambda: run(fastvae.continuous_bernoulli_log_prob, x, logits)]}


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call per op, run with and without the
    extension (few x rows against many samples)."""
    x, logits = leaf(2, 16), leaf(2048, 2, 16)
    return {"bernoulli_log_prob": lambda: run(lambda a, b: fastvae.bernoulli_log_prob(torch.sigmoid(a), b), x, logits),
            "continuous_bernoulli_log_prob": lambda: run(
                lambda a, b: fastvae.continuous_bernoulli_log_prob(torch.sigmoid(a), b), x, logits)}


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck (x in (0, 1)
    as sigmoid(r(...)))."""
    return {
        "bernoulli_log_prob": (lambda x, lg: fastvae.bernoulli_log_prob(x, lg),
                               [torch.sigmoid(r(3, 5)), r(2, 3, 5)], True),
        "bernoulli_log_prob_no_samples": (lambda x, lg: fastvae.bernoulli_log_prob(x, lg), [r(3, 5), r(3, 5)], True),
        "continuous_bernoulli_log_prob": (lambda x, lg: fastvae.continuous_bernoulli_log_prob(x, lg),
                                          [torch.sigmoid(r(3, 5)), r(2, 3, 5)], False),
    }


def compile_cases(mu, lv):
    """tests/test_compile.py: (name, function, float inputs) whose compiled graph
    calls the C++ twins, forward and backward (bernoulli_log_prob's; the
    continuous Bernoulli has none)."""
    g = torch.Generator().manual_seed(3)
    x, out = torch.rand(6, 7, generator=g), torch.randn(4, 6, 7, generator=g)
    return [("bernoulli_log_prob", fastvae.bernoulli_log_prob, (x, out))]


def twin_op_cases(m2, l2):
    """tests/test_torch_ops.py: (twin, arguments) in the Python op's layout, each
    checked bit for bit against fastvae::<twin> and by opcheck."""
    g = torch.Generator().manual_seed(8)
    x, out = torch.rand(5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    return [("bernoulli_log_prob", (x, out)),
            ("bernoulli_log_prob_backward", (torch.randn(3, 5, generator=g), x, out, True)),
            ("bernoulli_log_prob_backward", (torch.randn(3, 5, generator=g), x, out, False))]


# -- the plans: eager bernoulli_log_prob on the triton backend (op.py's PLANS) ------
# A plan launches the general path's kernel variants (triton.py's forward_plan
# / backward_plan) on the same inputs, so its values and gradients are the
# general path's bit for bit, under the interpreter (which runs each Launch
# through kernel.run, checking its grid, meta and argument order) and on a
# GPU. About 1 ms an interpreted program: few, small calls.

plan_device = plan_device_fixture(bernoulli_op)


def _plan_inputs(x_shape, logits_shape, dtype, device, x_grad, extreme, layout):
    """x and logits (leaves) of the shapes asked for; ``extreme``: logits of
    +-inf and +-1000 among finite ones; ``layout``: "transposed" logits (not
    contiguous) or "expanded" x (a stride-0 view that the Function copies)."""
    g = torch.Generator().manual_seed(sum(logits_shape))
    x = (torch.rand(x_shape, generator=g, dtype=torch.float64) > 0.5).to(dtype)
    logits = (torch.randn(logits_shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    if extreme:
        flat = logits.view(-1)
        flat[: min(4, flat.numel())] = torch.tensor([math.inf, -math.inf, 1000.0, -1000.0], dtype=dtype)[
            : min(4, flat.numel())]
    x, logits = x.to(device).requires_grad_(x_grad), logits.to(device).requires_grad_()
    if layout == "transposed":
        logits = logits.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    return x, logits


def _planned_and_general(monkeypatch, x, logits, layout, create_graph=False):
    """[(value, gradients) with the plans, without] of one public call; the
    incoming gradient is random, and x is expanded first where ``layout`` says."""
    out = []
    for enabled in (True, False):
        monkeypatch.setattr(bernoulli_op, "ENABLED", enabled)
        xx = x.expand(logits.shape) if layout == "expanded" else x
        value = fastvae.bernoulli_log_prob(xx, logits)
        up = torch.randn(value.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        inputs = [t for t in (x, logits) if t.requires_grad]
        grads = torch.autograd.grad(value, inputs, up.to(value.dtype).to(value.device), create_graph=create_graph)
        out.append((value, grads, type(value.grad_fn).__name__))
    return out


def _same_bits(a, b):
    """Bit for bit (the same kernels on the same inputs), no NaN (infinite
    logits give infinite values and gradients, never NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape and not torch.isnan(a).any()
    assert torch.equal(a, b)


PLAN_CASES = [  # (x shape, logits shape, x requires grad, extreme logits, layout)
    pytest.param((5, 33), (3, 5, 33), True, False, "plain", id="K3-odd-dx"),
    pytest.param((5, 33), (5, 33), False, False, "plain", id="no-samples"),
    pytest.param((1, 7), (4, 1, 7), True, True, "plain", id="one-row-K4-extreme"),
    pytest.param((2, 3, 5), (2, 2, 3, 5), True, False, "transposed", id="batch2d-transposed-logits"),
    pytest.param((1, 9), (6, 9), True, False, "expanded", id="x-expanded"),
    pytest.param((3, 1), (7, 3, 1), False, True, "plain", id="D1-extreme"),
]


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_shape, logits_shape, x_grad, extreme, layout", PLAN_CASES)
def test_planned_path_equals_the_general_path(plan_device, monkeypatch, dtype, x_shape, logits_shape, x_grad,
                                              extreme, layout):
    """The plan's launches give the general path's value and gradients bit
    for bit, from the signature's first call (which makes the plan) and from
    its second (which finds it); one plan serves both."""
    x, logits = _plan_inputs(x_shape, logits_shape, dtype, plan_device, x_grad, extreme, layout)
    for _ in range(2):
        (value, grads, node), (value0, grads0, node0) = _planned_and_general(monkeypatch, x, logits, layout)
        assert node == "PlannedBernoulliLogProbBackward" and node0 == "BernoulliLogProbBackward"
        _same_bits(value, value0)
        assert len(grads) == len(grads0) == (2 if x_grad else 1)
        for a, b in zip(grads, grads0):
            _same_bits(a, b)
        assert len(bernoulli_op.PLANS) == 1 and next(iter(bernoulli_op.PLANS.values())) is not None


@needs_plan_triton
def test_planned_gradient_of_a_sum_and_of_another_dtype(plan_device, monkeypatch):
    """The backward of value.sum() (an expanded scalar comes in) and one
    given a float64 gradient for a float32 value (the engine casts it) give
    the general path's bits."""
    x, logits = _plan_inputs((3, 5), (2, 3, 5), torch.float32, plan_device, True, False, "plain")
    for up in (None, torch.linspace(-2, 2, 6, dtype=torch.float64, device=plan_device).reshape(2, 3)):
        grads = []
        for enabled in (True, False):
            monkeypatch.setattr(bernoulli_op, "ENABLED", enabled)
            value = fastvae.bernoulli_log_prob(x, logits)
            grads.append(torch.autograd.grad(value.sum() if up is None else value, [x, logits],
                                             None if up is None else up))
        assert len(bernoulli_op.PLANS) == 1
        for a, b in zip(*grads):
            _same_bits(a, b)


@needs_plan_triton
def test_planned_backward_split_over_samples(plan_device, monkeypatch, sample_splits):
    """Where the backward splits dx's sum over samples (forced: 3 splits), the
    plan launches it with its partials and arrival counters: the general
    path's bits on every call (the counters are back at 0 after each)."""
    x, logits = _plan_inputs((2, 5), (7, 2, 5), torch.float32, plan_device, True, False, "plain")
    for _ in range(2):
        (value, grads, node), (value0, grads0, _) = _planned_and_general(monkeypatch, x, logits, "plain")
        assert node == "PlannedBernoulliLogProbBackward"
        _same_bits(value, value0)
        for a, b in zip(grads, grads0):
            _same_bits(a, b)
    (plan,) = bernoulli_op.PLANS.values()
    assert len(plan.launches()) == 2 and plan.backward(True)[-1] == (sample_splits or 1)


@needs_plan_triton
def test_planned_double_backward_equals_the_general_path(plan_device, monkeypatch):
    """create_graph=True through the plan differentiates the general path's
    closed form: the same first and second derivatives."""
    x, logits = _plan_inputs((3, 6), (2, 3, 6), torch.float64, plan_device, True, False, "plain")
    seconds = []
    (_, grads, node), (_, grads0, _) = _planned_and_general(monkeypatch, x, logits, "plain", create_graph=True)
    assert node == "PlannedBernoulliLogProbBackward"
    for a, b in zip(grads, grads0):
        assert a.requires_grad and b.requires_grad
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g in (grads, grads0):
        seconds.append(torch.autograd.grad(sum((t * t).sum() for t in g), [x, logits]))
    for a, b in zip(*seconds):
        _same_bits(a, b)


@needs_plan_triton
def test_planned_signature_errors_as_the_general_path(plan_device):
    """A bad argument on a planned signature raises the general path's error."""
    x, logits = torch.zeros(4, 3, device=plan_device), torch.zeros(2, 4, 3, device=plan_device)
    fastvae.bernoulli_log_prob(x, logits)
    assert len(bernoulli_op.PLANS) == 1
    with pytest.raises(ValueError, match="does not broadcast"):
        fastvae.bernoulli_log_prob(torch.zeros(5, 3, device=plan_device), logits)
    with pytest.raises(ValueError, match="event_dims"):
        fastvae.bernoulli_log_prob(x, logits, event_dims=0)
    with pytest.raises(TypeError):
        fastvae.bernoulli_log_prob(x.bool(), logits)


@needs_plan_triton
def test_each_signature_has_its_plan_and_the_cache_is_bounded(plan_device, monkeypatch):
    """Another shape or strides make another plan; a signature the plans do
    not serve (half precision, mixed dtypes) is kept as None and takes the
    general path; past PLANS.max_plans the plans are forgotten, not grown."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, device=plan_device)
    for logits in (torch.randn(2, 4, 3, device=plan_device), torch.randn(5, 4, 3, device=plan_device),
                   torch.randn(3, 3, 4, device=plan_device).transpose(1, 2)):
        out = fastvae.bernoulli_log_prob(x, logits.requires_grad_())
        x64, l64 = x.double().cpu(), logits.detach().double().cpu()
        assert_close(out, oracle.bernoulli_log_prob(x64, l64), _bernoulli_terms(x64, l64).sum(-1), "log_prob")
        assert type(out.grad_fn).__name__ == "PlannedBernoulliLogProbBackward"
    assert len(bernoulli_op.PLANS) == 3 and all(p is not None for p in bernoulli_op.PLANS.values())
    for xx, lg in ((x.half(), torch.randn(2, 4, 3, device=plan_device).half()),
                   (x.double(), torch.randn(2, 4, 3, device=plan_device))):
        out = fastvae.bernoulli_log_prob(xx, lg.requires_grad_())
        assert type(out.grad_fn).__name__ == "BernoulliLogProbBackward"
    assert len(bernoulli_op.PLANS) == 5 and list(bernoulli_op.PLANS.values()).count(None) == 2
    monkeypatch.setattr(bernoulli_op.PLANS, "max_plans", 5)
    fastvae.bernoulli_log_prob(x, torch.randn(6, 4, 3, device=plan_device))  # a sixth signature
    assert len(bernoulli_op.PLANS) == 1


@needs_plan_triton
def test_a_compiling_or_transformed_call_takes_the_general_path(plan_device, monkeypatch):
    """Under torch.compile (here: _backend.compiling() made true) and inside
    a functorch transform no plan is looked up or made."""
    torch.manual_seed(0)
    x, logits = torch.rand(4, 3, device=plan_device), torch.randn(2, 4, 3, device=plan_device)

    def probe(lg):
        assert bernoulli_op._plan_for(x, lg) is None
        return lg.sum()

    torch.func.grad(probe)(logits)
    assert len(bernoulli_op.PLANS) == 0
    monkeypatch.setattr(fastvae._backend, "compiling", lambda: True)
    assert bernoulli_op._plan_for(x, logits) is None
    assert len(bernoulli_op.PLANS) == 0


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, P, D", [(1, 3, 7), (4, 2, 5), (7, 2, 5)])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, sample_splits, dtype,
                                                                     K, P, D):
    """bernoulli_log_prob's and continuous_bernoulli_log_prob's ops and their
    backwards called as a compiled graph calls them (x (P, D), logits (K, P,
    D), contiguous): on the triton backend they launch from a plan of the
    signature and formula (OP_PLANS), with the general launch's values and
    gradients bit for bit, from the first call and the second, with and
    without dx and with a split sum over samples; the continuous Bernoulli's
    logits near 0 (its log C's Taylor branch) among large ones; half
    precision and a strided x take the general launch and make no plan."""
    bernoulli_op.OP_PLANS.clear()
    x, logits = _plan_inputs((P, D), (K, P, D), dtype, plan_device, False, True, "plain")
    x, logits = x.detach(), logits.detach()
    # finite logits for the continuous Bernoulli (its argument check), a few near 0
    finite = logits.nan_to_num(posinf=40.0, neginf=-40.0)
    finite.view(-1)[-2:] = torch.tensor([1e-3, -2e-4], dtype=dtype)
    g = torch.randn(K, P, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype).to(plan_device)
    op_plans_match_the_general_launch(monkeypatch, bernoulli_op, lambda: (
        bernoulli_log_prob_op(x, logits), *bernoulli_log_prob_backward_op(g, x, logits, True),
        *bernoulli_log_prob_backward_op(g, x, logits, False),
        continuous_bernoulli_log_prob_op(x, finite), *continuous_bernoulli_log_prob_backward_op(g, x, finite, True),
        *continuous_bernoulli_log_prob_backward_op(g, x, finite, False)))
    # one plan per formula serves the forward and both backwards
    assert sorted(plan.kind for plan in bernoulli_op.OP_PLANS.values()) == [0, 1]
    bernoulli_op.OP_PLANS.clear()
    continuous_bernoulli_log_prob_op(x.half(), finite.half())
    bernoulli_log_prob_op(x.half(), logits.half())
    bernoulli_log_prob_op(torch.cat([x, x], -1)[:, ::2], logits)
    assert len(bernoulli_op.OP_PLANS) == 0


@needs_plan_triton
def test_the_plans_formulas_are_the_kernels():
    """op.py's _KINDS names each op's formula by the Triton module's constants."""
    from fastvae.ops.bernoulli_likelihood import triton as kern
    assert bernoulli_op._KINDS == {"bernoulli_log_prob_forward": kern.BERNOULLI,
                                   "bernoulli_log_prob_backward": kern.BERNOULLI,
                                   "continuous_bernoulli_log_prob_forward": kern.CONTINUOUS,
                                   "continuous_bernoulli_log_prob_backward": kern.CONTINUOUS}
