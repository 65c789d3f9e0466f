"""stick_breaking against its float64 oracle (fastvae/ops/stick_breaking/__init__.py),
per backend (the root conftest.py), and its cases of the suite-wide checks."""
import math

import pytest
import torch
import torch.distributions as td
from hypothesis import strategies as st

import fastvae
from fastvae.ops import stick_breaking as oracle
from fastvae.ops.stick_breaking import op as stick_breaking_module
from fastvae.ops.stick_breaking.op import StickBreaking, stick_breaking_backward_op, stick_breaking_op

from conftest import INTERPRET
from helpers import (
    assert_close,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    plan_device_fixture,
    reference_tests,
)

WIDTHS = [1, 2, 3, 7, 32, 33, 100, 1025, 1537]
BATCHES = [(), (1,), (3,), (2, 5), (7, 3), (64,)]


@st.composite
def problems(draw):
    M = draw(st.sampled_from(WIDTHS))
    batch = draw(st.sampled_from(BATCHES))
    if math.prod(batch) * M > 20000:
        batch = (1,)
    return batch, M, draw(st.sampled_from([1.0, 5.0, 30.0])), draw(st.integers(0, 2**31 - 1))


def scales(y64, z64):
    """The condition-aware scales of z and of dy's terms: log z_j is
    x_j - S_j, computed to a rounding of |x_j| + S_j, so z_j is to a relative
    rounding of that (an infinite x_j is exact: it makes z_j 0, or NaN)."""
    x = oracle._x(y64)
    sp = oracle._softplus(x)
    S = torch.cumsum(torch.where(torch.isfinite(sp), sp, 0.0), -1)
    terms = torch.where(torch.isfinite(x), x.abs(), 0.0) + S
    z = z64.nan_to_num(0.0)
    # a z of 0 is exact whatever its terms (float64's sums of 1e308 overflow)
    return torch.where(z == 0, 0.0, z * (torch.cat((terms, S[..., -1:]), -1) + 1.0)), torch.sigmoid(x)


def grad_scale(gz, zscale, sigma):
    """dy_j's scale: its g_j's, and sigmoid(x_j) times those of the suffix sum R_j."""
    M = sigma.shape[-1]
    gscale = gz.double().abs() * zscale
    return gscale[..., :M] + sigma * gscale.flip(-1).cumsum(-1).flip(-1)[..., :M]


def check_against_reference(problem, dtype, device):
    batch, M, bound, seed = problem
    g = torch.Generator().manual_seed(seed)
    y = ((torch.rand((*batch, M), generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
    y.requires_grad_()
    gz = torch.randn((*batch, M + 1), generator=g, dtype=torch.float64).to(dtype)

    z = fastvae.stick_breaking(y)
    assert z.dtype == dtype and z.shape == (*batch, M + 1)
    (dy,) = torch.autograd.grad(z, y, gz.to(device))
    assert dy.dtype == dtype

    y64 = y.detach().double().cpu()
    z64 = oracle.stick_breaking(y64)
    dy64 = oracle.stick_breaking_grad(gz.double(), y64, z64)
    zscale, sigma = scales(y64, z64)
    assert_close(z, z64, zscale, "z")
    assert_close(dy, dy64, grad_scale(gz, zscale, sigma), "dy")


test_forward_backward_match_reference, test_half_precision_matches_reference = reference_tests(
    check_against_reference, problems())


@pytest.mark.parametrize("M", [1024, 1025, 2100])
def test_rows_longer_than_a_chunk(backend, M):
    """Rows of one chunk (the Triton kernels' 1024 columns), one more, and
    three chunks: the running sums carry across the chunks, forward (the prefix
    sums, from the first) and backward (the suffix sums, from the last)."""
    check_against_reference(((3,), M, 5.0, M), torch.float32, backend[1])


def test_oracle_gradient_is_autograd_of_the_oracle():
    """The oracle's backward formula against autograd of its forward (away
    from x_j = 0, where autograd's derivative of |x| is one-sided), at odd
    widths, large y included."""
    g = torch.Generator().manual_seed(3)
    for M in (1, 2, 7, 33):
        y = (torch.randn(5, M, generator=g, dtype=torch.float64) * 15).requires_grad_()
        gz = torch.randn(5, M + 1, generator=g, dtype=torch.float64)
        z = oracle.stick_breaking(y)
        (dy,) = torch.autograd.grad(z, y, gz)
        torch.testing.assert_close(oracle.stick_breaking_grad(gz, y.detach(), z.detach()), dy, rtol=1e-12,
                                   atol=1e-14)


def test_matches_torch_stick_breaking_transform(backend):
    """The oracle is torch's StickBreakingTransform, computed in log space."""
    _, device = backend
    y = torch.randn(4, 3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    z = fastvae.stick_breaking(y.to(device)).cpu()
    torch.testing.assert_close(z, td.transforms.StickBreakingTransform()(y), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(z, oracle.stick_breaking(y), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(z.sum(-1), torch.ones(4, 3, dtype=torch.float64), rtol=1e-12, atol=0)


EXTREMES = [0.0, 1e4, -1e4, 1e30, -1e30, 30.0, -30.0, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_extreme_values_match_the_oracle(backend, dtype):
    """Every pair of extreme values in a row of M = 3 (y = 0 beside them), forward
    and backward, against the float64 oracle of the same inputs (NaN among
    them): where the oracle is finite the op matches it, and NaN only where the oracle has NaN (+inf
    makes inf - inf); never NaN from finite input."""
    _, device = backend
    big = torch.finfo(dtype).max
    values = [math.copysign(big, v) if math.isfinite(v) and abs(v) > big else v for v in EXTREMES]
    y = torch.tensor([[a, 0.0, b] for a in values for b in values], dtype=torch.float64).to(dtype)
    gz = torch.randn(y.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype)
    yd = y.to(device).requires_grad_()
    z = fastvae.stick_breaking(yd)
    (dy,) = torch.autograd.grad(z, yd, gz.to(device))

    y64 = y.double()
    z64 = oracle.stick_breaking(y64)
    dy64 = oracle.stick_breaking_grad(gz.double(), y64, z64)
    zscale, sigma = scales(y64, z64)
    finite_in = torch.isfinite(y).all(-1)
    for name, got, ref, scale in (("z", z, z64, zscale), ("dy", dy, dy64, grad_scale(gz, zscale, sigma))):
        got = got.detach().double().cpu()
        assert not got[finite_in].isnan().any(), f"{name}: NaN from finite input"
        assert torch.equal(got.isnan(), ref.isnan()), f"{name}: NaN where the oracle has none, or none where it has"
        ok = ~ref.isnan()
        # exact where the oracle is: a stick of 1 beside a huge y, and 0
        exact = ok & ((ref == 1) | (ref == 0) & (scale == 0))
        assert torch.equal(got[exact], ref[exact]), f"{name}: not exactly the oracle's 0 or 1"
        assert_close(got[ok].to(dtype), ref[ok], scale[ok], name)


def test_rows_lie_on_the_simplex(backend):
    _, device = backend
    y = torch.randn(50, 40, generator=torch.Generator().manual_seed(2)).to(device) * 10
    z = fastvae.stick_breaking(y)
    assert (z >= 0).all()
    torch.testing.assert_close(z.sum(-1), torch.ones(50, device=device), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [1, 5])
def test_gradcheck_float64(backend, M):
    _, device = backend
    y = torch.randn(3, M, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    y.requires_grad_()
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    for fn in (StickBreaking.apply, fastvae.stick_breaking):
        assert torch.autograd.gradcheck(fn, (y,), fast_mode=INTERPRET)
        assert torch.autograd.gradgradcheck(fn, (y,), fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    # the op takes the kernels' (N, M) layout; StickBreaking brings any (..., M) to it
    y = torch.randn(6, 5, device=device, requires_grad=True)
    torch.library.opcheck(stick_breaking_op, (y,))
    torch.library.opcheck(stick_breaking_backward_op,
                          (torch.randn(6, 6, device=device), y.detach(), stick_breaking_op(y.detach())))


@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 3)])
def test_empty(backend, shape):
    _, device = backend
    y = torch.zeros(shape, device=device, requires_grad=True)
    z = fastvae.stick_breaking(y)
    assert z.shape == (*shape[:-1], shape[-1] + 1)
    z.sum().backward()
    assert y.grad.shape == shape


def test_non_contiguous(backend):
    _, device = backend
    y = torch.randn(8, 6, device=device).t()
    ref = oracle.stick_breaking(y.double().cpu())
    assert_close(fastvae.stick_breaking(y), ref, ref * 20, "z")


def test_errors_on_bad_input(backend):
    _, device = backend
    with pytest.raises(TypeError, match="y must be a floating-point tensor.*int32"):
        fastvae.stick_breaking(torch.zeros(4, 3, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        fastvae.stick_breaking([0.0, 1.0])
    with pytest.raises(ValueError, match=r"y must have a last dimension of at least 1.*\(\)"):
        fastvae.stick_breaking(torch.tensor(0.5, device=device))
    with pytest.raises(ValueError, match=r"y must have a last dimension of at least 1.*\(4, 0\)"):
        fastvae.stick_breaking(torch.zeros(4, 0, device=device))


@pytest.mark.skipif(INTERPRET, reason="compiles: the main process checks it on cpp and reference")
def test_compiles_fullgraph_with_changing_shapes(backend):
    """torch.compile(fullgraph=True) of the op and its backward: shapes that
    change between calls (rows, width, batch dimensions) recompile or take a
    dynamic graph, never break it, and give eager's values and gradients."""
    _, device = backend
    torch._dynamo.reset()
    fn = torch.compile(lambda y: fastvae.stick_breaking(y) * 2.0, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    for shape in [(4, 3), (7, 3), (5, 6), (2, 3, 9), (11, 1), (9,)]:
        y = torch.randn(shape, generator=g).to(device)
        gz = torch.randn((*shape[:-1], shape[-1] + 1), generator=g).to(device)
        leaves = [y.clone().requires_grad_(), y.clone().requires_grad_()]
        outs = [f(t) for f, t in zip((fn, lambda t: fastvae.stick_breaking(t) * 2.0), leaves)]
        grads = [torch.autograd.grad(o, t, gz)[0] for o, t in zip(outs, leaves)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_latents_stick_breaking_is_the_op(backend):
    """The logistic-normal posterior's transform (latents.stick_breaking) is
    this op: the same bits, value and gradient."""
    from fastvae.latents import stick_breaking as latent_stick_breaking

    _, device = backend
    y = torch.randn(5, 7, device=device, requires_grad=True)
    a, b = fastvae.stick_breaking(y), latent_stick_breaking(y)
    assert torch.equal(a, b)
    gz = torch.randn(5, 8, device=device)
    assert torch.equal(*(torch.autograd.grad(t, y, gz)[0] for t in (a, b)))


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(fastvae.stick_breaking, (B, L))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: a call with enough work for several threads, whose
    bits must not depend on the thread count."""
    y = leaf(20000, 8)
    return [lambda: run(fastvae.stick_breaking, y)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    y = leaf(3, 4)
    return lambda: run(fastvae.stick_breaking, y)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck."""
    return {"stick_breaking": (fastvae.stick_breaking, [r(3, 4)], True),
            "stick_breaking_width_1": (fastvae.stick_breaking, [r(2, 3, 1)], True)}


def compile_cases(mu, lv):
    """tests/test_compile.py: (name, function, float inputs) whose compiled graph
    calls the C++ twins, forward and backward (mu, lv: (5, 2, 3))."""
    return [("stick_breaking", fastvae.stick_breaking, (mu,))]


def twin_op_cases(m2, l2):
    """tests/test_torch_ops.py: (twin, arguments) in the Python op's layout, each
    checked bit for bit against fastvae::<twin> and by opcheck (m2, l2: (12, 6))."""
    return [("stick_breaking", (m2,)),
            ("stick_breaking_backward", (torch.randn(12, 7), m2, oracle.stick_breaking(m2.detach())))]


# -- the op's own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(stick_breaking_module)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, M", [(1, 1), (5, 7), (3, 700)])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, N, M):
    """fastvae::stick_breaking and its backward called as a compiled graph
    calls them (y (N, M) contiguous): on the triton backend from a plan of
    the call's signature (OP_PLANS), with the general launch's z and dy bit
    for bit, from the first call and the second, one element, odd sizes and
    an M past one chunk; half precision, a strided y, an empty batch and a
    gradient of another dtype take the general launch and make no plan."""
    stick_breaking_module.OP_PLANS.clear()
    g = torch.Generator().manual_seed(N + M)
    y = (2 * torch.randn(N, M, generator=g, dtype=torch.float64)).to(dtype).to(plan_device)
    grad_z = torch.randn(N, M + 1, generator=g, dtype=torch.float64).to(dtype).to(plan_device)

    def calls():
        z = stick_breaking_op(y)
        return z, stick_breaking_backward_op(grad_z, y, z)

    op_plans_match_the_general_launch(monkeypatch, stick_breaking_module, calls)
    stick_breaking_module.OP_PLANS.clear()
    stick_breaking_op(y.half())
    if M > 1:
        stick_breaking_op(torch.cat([y, y], -1)[:, ::2])
    stick_breaking_op(y[:0])
    z = stick_breaking_op(y)
    stick_breaking_module.OP_PLANS.clear()
    stick_breaking_backward_op(grad_z.to(torch.float64 if dtype is torch.float32 else torch.float32), y, z)
    assert len(stick_breaking_module.OP_PLANS) == 0
