"""gaussian_log_prob against its float64 oracle
(fastvae/ops/gaussian_log_prob/__init__.py), per backend (the root
conftest.py); and its cases of the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import strategies as st

import fastvae
from fastvae.ops import gaussian_log_prob as oracle
from fastvae.ops.gaussian_log_prob import op as gaussian_module
from fastvae.ops.gaussian_log_prob.op import (
    GaussianLogProb,
    gaussian_log_prob_backward_op,
    gaussian_log_prob_op,
    gaussian_log_prob_packed,
)

from conftest import INTERPRET
from helpers import (
    RTOL,
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
DIMS = [1, 2, 3, 31, 32, 33, 100, 784, 1025, 1537]
VARIANCES = ["element", "row", "dim", "scalar", "scale_float", "scale_tensor", "default",
             "softplus_element", "softplus_row", "softplus_dim"]


@st.composite
def problems(draw):
    D, batch, K = likelihood_checks.location_scale_shapes(draw, DIMS)
    return dict(
        D=D, batch=batch, K=K, variance=draw(st.sampled_from(VARIANCES)),
        x_grad=draw(st.booleans()), v_grad=draw(st.booleans()), lv_bound=draw(st.sampled_from([1.0, 5.0, 20.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(p, dtype, device):
    """(x, mean, kwargs for fastvae, reference closure over float64 copies, inputs to differentiate)."""
    g = torch.Generator().manual_seed(p["seed"])
    D, batch, K = p["D"], p["batch"], p["K"]
    out_shape = (*(() if K is None else (K,)), *batch, D)

    def rnd(shape, kind="normal", bound=1.0):
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 2 if kind == "normal" else \
            (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
        return t.to(dtype).to(device).requires_grad_()

    x = rnd((*batch, D)).detach().requires_grad_(p["x_grad"])
    mean = rnd(out_shape)
    var, kw = p["variance"], {}
    b = p["lv_bound"]
    if var in ("element", "softplus_element"):
        v = rnd(out_shape, "uniform", b)
    elif var in ("row", "softplus_row"):
        v = rnd((*batch, D), "uniform", b)
    elif var in ("dim", "softplus_dim"):
        v = rnd((D,), "uniform", b)
    elif var == "scalar":
        v = rnd((), "uniform", b)
    elif var == "scale_tensor":
        v = (torch.rand((), generator=g, dtype=torch.float64) + 0.1).to(dtype).to(device).requires_grad_()
    else:
        v = None
    if v is not None:
        v.requires_grad_(p["v_grad"])
    if var.startswith("softplus"):
        kw = dict(softplus_var=v, delta=1e-3)
    elif var == "scale_tensor":
        kw = dict(scale=v)
    elif var == "scale_float":
        kw = dict(scale=0.7)
    elif var != "default":
        kw = dict(logvar=v)
    inputs = [t for t in (x, mean, v) if t is not None and t.requires_grad]
    return x, mean, v, kw, inputs


def reference_of(x, mean, v, kw):
    """float64 value and the per-row scale of its terms (for the tolerance)."""
    x, mean = x.double().cpu(), mean.double().cpu()
    v = None if v is None else v.double().cpu()
    if "softplus_var" in kw:
        var = oracle.softplus(v) + kw["delta"]
        out = oracle.gaussian_log_prob_softplus(x, mean, v, kw["delta"])
    else:
        lv = v if "logvar" in kw else 2 * torch.log(v) if "scale" in kw and v is not None else \
            torch.tensor(2 * math.log(kw.get("scale", 1.0)), dtype=torch.float64)
        var = torch.exp(lv)
        out = oracle.gaussian_log_prob(x, mean, lv)
    terms = ((x - mean) ** 2 / var + torch.log(var).abs() + oracle.LOG_2PI).sum(-1)
    return out, terms, var


def check_against_reference(p, dtype, device):
    """Value and every gradient asked for in p against the float64 oracle."""
    x, mean, v, kw, inputs = build(p, dtype, device)
    out = fastvae.gaussian_log_prob(x, mean, **kw)
    g, grads, leaves, as64 = grads_and_float64_leaves(out, inputs, p["seed"] + 1, dtype, device)
    kw64 = {k: as64(a) if isinstance(a, torch.Tensor) else a for k, a in kw.items()}
    ref, terms, var = reference_of(as64(x), as64(mean), as64(v), kw64)
    # never a half-precision bound: float32 for half inputs
    assert out.shape == ref.shape and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref.detach(), terms.detach(), "log_prob")
    ref_grads = torch.autograd.grad(ref, [leaves[id(t)] for t in inputs], g.to(dtype).double())
    # every gradient element is a sum over K (and rows) of g * O((x-m)^2/var + 1)
    x64, m64 = x.detach().double().cpu(), mean.detach().double().cpu()
    elem = g.abs()[..., None] * ((x64 - m64) ** 2 / var.detach() + (x64 - m64).abs() / var.detach() + 1.0)
    # a scale tensor's gradient is the log-variance one times d(2 log s)/ds = 2/s
    chain = 2.0 / v.detach().double().cpu() if "scale" in kw and v is not None else 1.0
    for t, got, want in zip(inputs, grads, ref_grads):
        scale = summed_like(elem, want)
        name = "dx" if t is x else "dmean" if t is mean else "dvar"
        got, want, scale = overflowed_to_inf(got, want, scale * (chain if t is v else 1.0), name)
        assert_close(got, want, scale, name)
    return out, grads


def overflowed_to_inf(got, want, scale, name):
    """A shared variance's gradient sums a term per element, so in float16 it can
    pass 65504: there it must be inf of the right sign, as torch's own gradient in
    the input's dtype is. Returns the elements left to compare."""
    top = torch.finfo(got.dtype).max
    want = want.detach()
    big = want.abs() >= top * (1 - RTOL[got.dtype])
    if not big.any():
        return got, want, scale
    g = got.detach().double().cpu()
    w = want.double().cpu()
    b = big.cpu()
    assert (torch.sign(g[b]) == torch.sign(w[b])).all() and (g[b].abs() >= top * (1 - 2 * RTOL[got.dtype])).all(), \
        f"{name}: a gradient past the dtype's range is {g[b].tolist()}, expected {w[b].tolist()}"
    keep = ~b
    return got.detach().cpu()[keep], want.cpu()[keep], scale.detach().cpu().expand_as(want)[keep]


# the gradients' 1/var must fit float16's 65504
test_forward_backward_match_reference, test_half_precision_matches_reference = reference_tests(
    check_against_reference, problems(), float16_caps={"lv_bound": 5.0})


@pytest.mark.parametrize("variance", ["element", "row", "dim", "scalar", "softplus_element", "softplus_row",
                                      "softplus_dim", "scale_float"])
@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (4, (300,), 3), (None, (2, 3), 5)])
def test_sums_over_samples_in_one_backward(backend, sample_splits, variance, K, batch, D):
    """dx of x broadcast over K, a shared variance's gradient (per row: summed
    over K; per dimension or a scalar: over every row), K = 1, one row, odd D,
    and more rows than one interpreter program: against the float64 reference,
    with the samples in one pass or split; a second call gives the same bits
    (the split's arrival counters are back at 0)."""
    p = dict(D=D, batch=batch, K=K, variance=variance, x_grad=True, v_grad=True, lv_bound=2.0, seed=K or 0)
    likelihood_checks.same_bits_twice(check_against_reference, p, torch.float32, backend[1])


def test_x_is_not_copied_per_sample(backend):
    """x (B, D) against mean (K, B, D): the op sees x at its own size, and dx sums over K."""
    x, mean, dx = likelihood_checks.x_is_not_copied_per_sample(fastvae.gaussian_log_prob, backend[1])
    torch.testing.assert_close(dx, (mean - x).detach().sum(0), rtol=1e-12, atol=1e-12)


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()  # noqa: E731
    x, mean = r(3, 5), r(2, 3, 5)
    for v, sp in ((r(2, 3, 5), False), (r(3, 5), False), (r(5), False), (r(2, 3, 5), True), (r(5), True)):
        # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
        # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
        assert torch.autograd.gradcheck(lambda a, b, c, sp=sp: GaussianLogProb.apply(a, b, c, sp, 1e-3), (x, mean, v),
                                        fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    x = torch.randn(3, 7, device=device, requires_grad=True)
    mean = torch.randn(2, 3, 7, device=device, requires_grad=True)
    for v in (torch.randn(2, 3, 7, device=device), torch.randn(3, 7, device=device), torch.randn(7, device=device)):
        for sp in (False, True):
            torch.library.opcheck(gaussian_log_prob_op, (x, mean, v.requires_grad_(), sp, 1e-4))
    g = torch.randn(2, 3, device=device)
    for need_dx in (False, True):
        for need_dv in (False, True):
            args = (g, x.detach(), mean.detach(), torch.randn(7, device=device), False, 1e-4, need_dx, need_dv)
            torch.library.opcheck(gaussian_log_prob_backward_op, args)


def test_extreme_log_variance_matches_reference(backend):
    _, device = backend
    x = torch.randn(5, 33, device=device)
    mean = torch.randn(2, 5, 33, device=device, requires_grad=True)
    for lv in (-30.0, 30.0):
        logvar = torch.full((2, 5, 33), lv, device=device, requires_grad=True)
        out, grads, ref, ref_grads, (x64, m64, lv64) = likelihood_checks.against_oracle(
            fastvae.gaussian_log_prob, oracle.gaussian_log_prob, x, mean, logvar)
        terms = (x64 - m64) ** 2 * torch.exp(-lv64) + lv64.abs() + 2.0
        assert_close(out, ref, terms.sum(-1), f"log_prob, logvar {lv}")
        assert_close(grads[0], ref_grads[0], ref_grads[0].abs() + 1e-30, f"dmean, logvar {lv}")
        assert_close(grads[1], ref_grads[1], terms, f"dlogvar, logvar {lv}")


def test_unusual_broadcast_is_materialized(backend):
    _, device = backend
    x = torch.randn(1, 6, device=device, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(4, 6, device=device, dtype=torch.float64)
    out = fastvae.gaussian_log_prob(x, mean, scale=0.5)
    ref = oracle.gaussian_log_prob(x, mean, torch.tensor(2 * math.log(0.5), dtype=torch.float64))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (dx,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(dx, ((mean - x.detach()) / 0.25).sum(0, keepdim=True), rtol=1e-12, atol=1e-12)


def test_empty(backend):
    _, device = backend
    mean = torch.zeros(2, 0, 5, device=device, requires_grad=True)
    out = fastvae.gaussian_log_prob(torch.zeros(0, 5, device=device), mean)
    assert out.shape == (2, 0)
    out.sum().backward()
    assert mean.grad.shape == (2, 0, 5)


def test_errors_on_bad_input(backend):
    _, device = backend
    x, mean = likelihood_checks.refuses_bad_location_scale_input(fastvae.gaussian_log_prob, "logvar", device)
    with pytest.raises(ValueError, match="scale"):
        fastvae.gaussian_log_prob(x, mean, scale=-1.0)
    with pytest.raises(ValueError, match="delta"):
        fastvae.gaussian_log_prob(x, mean, softplus_var=torch.zeros(3, device=device), delta=0.0)
    with pytest.raises(ValueError, match="smallest normal"):
        fastvae.gaussian_log_prob(x, mean, softplus_var=torch.zeros(3, device=device), delta=1e-45)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", ["same", torch.float32])
def test_half_precision(backend, dtype, x_dtype):
    """Half-precision mean and logvar, x in half precision or float32 (as under
    autocast), on every backend: the float32 log-probability of the float64
    oracle at the same rounded inputs, to float32 accumulation error; each
    input's gradient in its dtype."""
    x, mean, logvar, out = likelihood_checks.location_scale_half_precision(fastvae.gaussian_log_prob, dtype, x_dtype,
                                                                          backend[1])
    ref, terms, _ = reference_of(x.detach(), mean.detach(), logvar.detach(), dict(logvar=logvar))
    assert_close(out, ref, terms, "log_prob")
    grads = torch.autograd.grad(out.sum(), [x, mean, logvar])
    assert [t.dtype for t in grads] == [x.dtype, dtype, dtype]
    # a float32 mean with a half logvar: both are read in float32 on cpp
    out2 = fastvae.gaussian_log_prob(x, mean.float(), logvar)
    assert out2.dtype == torch.float32
    assert_close(out2, ref, terms, "log_prob (float32 mean)")


def test_underflowing_variance_at_an_exact_match_is_finite(backend):
    """x == mean with logvar = -100 in float32: exp(100) overflows, and the squared
    term must be 0, not 0 * inf = NaN, in the value and the gradients."""
    _, device = backend
    x = torch.zeros(2, 5, device=device)
    mean = torch.zeros(3, 2, 5, device=device, requires_grad=True)
    for layout in ("element", "row", "dim"):
        shape = {"element": (3, 2, 5), "row": (2, 5), "dim": (5,)}[layout]
        logvar = torch.full(shape, -100.0, device=device, requires_grad=True)
        out = fastvae.gaussian_log_prob(x, mean, logvar)
        expected = -0.5 * 5 * (-100.0 + math.log(2 * math.pi))  # 245.405
        torch.testing.assert_close(out.double().cpu(), torch.full((3, 2), expected, dtype=torch.float64),
                                   rtol=1e-6, atol=0, msg=layout)
        dmean, dlv = torch.autograd.grad(out.sum(), [mean, logvar])
        assert torch.equal(dmean.cpu(), torch.zeros(3, 2, 5)), layout
        per_element = torch.full((3, 2, 5), -0.5)
        torch.testing.assert_close(dlv.cpu(), per_element.sum_to_size(shape), msg=layout)


@pytest.mark.parametrize("bad", [math.inf, math.nan, 0.0, -1.0])
def test_infinite_or_invalid_delta_and_scale_are_refused_on_every_backend(backend, bad):
    _, device = backend
    x, mean = torch.zeros(2, 3, device=device), torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match="delta must be a finite float > 0"):
        fastvae.gaussian_log_prob(x, mean, softplus_var=torch.zeros(3, device=device), delta=bad)
    with pytest.raises(ValueError, match="scale must be a finite float > 0"):
        fastvae.gaussian_log_prob(x, mean, scale=bad)


def test_event_dims_sum_over_image_dimensions(backend):
    """event_dims=3 on (K, B, C, H, W) equals the flattened (K, B, C*H*W) call,
    with x broadcast over K and a per-channel log-variance; and the Bernoulli's."""
    x, logits = likelihood_checks.event_dims_flatten(fastvae.gaussian_log_prob, backend[1], "gaussian")
    K, B = logits.shape[:2]
    got = fastvae.bernoulli_log_prob(torch.sigmoid(x), logits, event_dims=3)
    want = fastvae.bernoulli_log_prob(torch.sigmoid(x).reshape(B, -1), logits.reshape(K, B, -1))
    assert_close(got, want, 1 + want.abs(), "bernoulli event_dims=3")
    with pytest.raises(ValueError, match="event_dims must be >= 1"):
        fastvae.bernoulli_log_prob(x, logits, event_dims=0)


# (lead shape, event shape, chunk dim): (mean, logvar) as the two halves of one decoder output
PACKED = [((5, 3), (33,), -1), ((3,), (1,), -1), ((1,), (300,), -1), ((4, 2), (2, 3, 5), 2), ((2, 3), (4,), -1)]


@pytest.mark.parametrize("lead,event,dim", PACKED)
@pytest.mark.parametrize("x_grad", [False, True])
def test_packed_halves_match_separate_tensors(backend, sample_splits, lead, event, dim, x_grad):
    """gaussian_log_prob_packed (the kernels read the two halves of one output
    in place and write one gradient for it) gives the bits of gaussian_log_prob
    on copies of the halves, values and gradients (x's summed over samples,
    also split), and packed_mean_logvar finds the packed tensor behind slices
    and chunks of a contiguous output (a conv decoder's channel halves too)."""
    from fastvae.ops.gaussian_log_prob.op import packed_mean_logvar
    _, device = backend
    g = torch.Generator().manual_seed(len(lead) + event[-1])
    full = (*lead, *event[:-1], 2 * event[-1]) if dim == -1 else (*lead, 2 * event[0], *event[1:])
    h_leaf = torch.randn(full, generator=g).to(device).requires_grad_()
    x = torch.randn((*lead[1:], *event) if len(lead) > 1 else event, generator=g).to(device)
    x = x.reshape(*x.shape[:len(lead) - 1], -1).requires_grad_(x_grad)
    h = h_leaf * 1.0  # a non-leaf, as a decoder's output
    mean, logvar = h.chunk(2, dim)
    packed = packed_mean_logvar(mean, logvar, len(lead))
    assert packed is not None and packed.shape == (*lead, 2 * math.prod(event))
    E = math.prod(event)
    got = gaussian_log_prob_packed(x, packed)
    want = fastvae.gaussian_log_prob(x, mean.reshape(*lead, E).clone(), logvar.reshape(*lead, E).clone())
    assert torch.equal(got, want)
    w = torch.randn(got.shape, generator=g).to(device)
    inputs = [h_leaf] + ([x] if x_grad else [])
    got_grads = torch.autograd.grad((got * w).sum(), inputs, retain_graph=True)
    want_grads = torch.autograd.grad((want * w).sum(), inputs)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)


def test_packed_halves_are_found_only_where_they_are_exact(backend):
    """Not halves of one contiguous output, or a path that is not views only
    (an in-place change of a half), or only one half differentiable: None,
    and the pair goes to gaussian_log_prob as it is."""
    from fastvae.ops.gaussian_log_prob.op import packed_mean_logvar
    _, device = backend
    h = torch.randn(3, 4, 10, device=device, requires_grad=True) * 1.0
    assert packed_mean_logvar(h[..., :5], h[..., 5:], 2) is not None
    assert packed_mean_logvar(h[..., 5:], h[..., :5], 2) is None  # logvar first
    assert packed_mean_logvar(h[..., :4], h[..., 6:], 2) is None  # not adjacent
    assert packed_mean_logvar(h[..., :5], h.detach()[..., 5:], 2) is None  # logvar without a gradient
    assert packed_mean_logvar(h.mT[..., :2], h.mT[..., 2:], 2) is None  # the base is not row-contiguous
    assert packed_mean_logvar(h[:, :2, :5], h[:, 2:, :5], 2) is None  # not the halves of each row
    a = h * 1.0
    mean, logvar = a[..., :5], a[..., 5:]
    mean.mul_(2.0)  # an in-place change: the path from mean to a is not views only
    assert packed_mean_logvar(mean, logvar, 2) is None
    with torch.no_grad():
        b = torch.randn(3, 4, 10, device=device)
        assert packed_mean_logvar(b[..., :5], b[..., 5:], 2) is not None  # evaluation: read in place


class _Halves(torch.autograd.Function):
    """A custom Function that returns views of its input (autograd records them
    as views of it) with a backward of its own, which reading the input in
    place would skip."""

    @staticmethod
    def forward(ctx, h):
        return h[..., :5], h[..., 5:]

    @staticmethod
    def backward(ctx, gm, gv):
        return 3.0 * torch.cat([gm, gv], -1)


@pytest.mark.parametrize("finder", ["packed_mean_logvar", "packed_halves"])
def test_packed_halves_refuse_views_a_custom_function_returned(backend, finder):
    """Views a custom Function returned are views of its input to autograd (with
    a multi-output creation record, as a split's), but their gradient is the
    Function's: refused. packed_halves (the objectives' plans, with the layout
    worked out once) finds what packed_mean_logvar finds for that layout."""
    from fastvae.ops.gaussian_log_prob import op
    _, device = backend
    h = torch.randn(3, 4, 10, device=device, requires_grad=True) * 1.0
    layout = op.packed_layout(torch.Size((3, 4, 5)), 2)
    find = {"packed_mean_logvar": lambda m, v: op.packed_mean_logvar(m, v, 2),
            "packed_halves": lambda m, v: op.packed_halves(m, v, layout)}[finder]
    assert find(h[..., :5], h[..., 5:]) is h
    assert find(*h.chunk(2, -1)) is h
    mean, logvar = _Halves.apply(h)
    assert mean._base is h and find(mean, logvar) is None
    assert find(h[..., 5:], h[..., :5]) is None  # logvar first
    assert find(h[..., :5], h.detach()[..., 5:]) is None  # logvar without a gradient
    a = h * 1.0
    mean, logvar = a[..., :5], a[..., 5:]
    mean.mul_(2.0)  # an in-place change: not views only
    assert find(mean, logvar) is None
    assert op.packed_halves(h[..., :5], h[..., 5:], op.packed_layout(torch.Size((3, 4, 6)), 2)) is None  # shape


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


# tests/test_launches.py: a training-size call (a per-element log-variance);
# tests/test_backend.py: calls whose bits must not depend on the thread count (a
# per-dimension log-variance's gradient sums over every row), and a small call
# run with and without the extension
launch_case, thread_count_calls, fallback_call = likelihood_checks.location_scale_cases(fastvae.gaussian_log_prob,
                                                                                         "logvar")


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck: every variance
    layout, a fixed scale (float and tensor), the softplus variance, and
    (mean, logvar) as the halves of one decoder output, read in place."""
    return {
        **likelihood_checks.location_scale_double_backward_cases("gaussian_log_prob", fastvae.gaussian_log_prob, r),
        "gaussian_log_prob_packed": (lambda x, h: gaussian_log_prob_packed(x, h), [r(3, 5), r(2, 3, 10)], False),
        "gaussian_log_prob_softplus": (lambda x, m, v: fastvae.gaussian_log_prob(x, m, softplus_var=v, delta=1e-3),
                                       [r(3, 5), r(2, 3, 5), r(2, 3, 5)], True),
    }


def _twin_inputs(seed, P, D, K):
    """x (P, D) in [0, 1) and a decoder mean (K, P, D), from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(P, D, generator=g), torch.randn(K, P, D, generator=g)


def compile_cases(mu, lv):
    """tests/test_compile.py: (name, function, float inputs) whose compiled graph
    calls the C++ twins, forward and backward (mu, lv: (5, 2, 3), unused: the
    likelihood takes x (6, 7) against a mean (4, 6, 7))."""
    x, out = _twin_inputs(3, 6, 7, 4)
    return [("gaussian_log_prob (logvar per element)", lambda a, m, v: fastvae.gaussian_log_prob(a, m, logvar=v),
             (x, out, out.flip(0))),
            ("gaussian_log_prob (softplus, per dimension)",
             lambda a, m, v: fastvae.gaussian_log_prob(a, m, softplus_var=v, delta=1e-3), (x, out, out[0, 0]))]


def twin_op_cases(m2, l2):
    """tests/test_torch_ops.py: (twin, arguments) in the Python op's layout, each
    checked bit for bit against fastvae::<twin> and by opcheck (m2, l2: (12, 6),
    unused: x (5, 7) against a mean (3, 5, 7))."""
    x, out = _twin_inputs(8, 5, 7, 3)
    return [("gaussian_log_prob", (x, out, out.flip(0), False, 1e-6)),
            ("gaussian_log_prob", (x, out, x.flip(1), True, 1e-3)),
            ("gaussian_log_prob_backward", (torch.randn(3, 5), x, out, out[0, 0], True, 1e-3, True, True)),
            ("gaussian_log_prob_backward", (torch.randn(3, 5), x, out, x, False, 1e-6, False, True))]


# -- the ops' own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(gaussian_module)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, P, D, splits", [(1, 1, 1, None), (3, 5, 7, None), (3, 5, 7, 2), (2, 3, 1030, None)])
@pytest.mark.parametrize("layout", SCALE_LAYOUTS)
@pytest.mark.parametrize("softplus", [False, True])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, K, P, D, splits,
                                                                    layout, softplus):
    """fastvae::gaussian_log_prob and its backward called as a compiled graph
    calls them (x (P, D), mean (K, P, D), the variance parameter per element,
    per x row or per dimension, contiguous), in either variance form: on the
    triton backend from a plan of the call's signature (OP_PLANS), with the
    general launch's log-likelihood and every gradient bit for bit, for each
    set of gradients asked for, from the first call and the second; one
    element, odd sizes, D past one block, samples split (the splits' partial
    sums); the calls the plans refuse make none
    (helpers.scale_likelihood_op_plans_check)."""
    scale_likelihood_op_plans_check(monkeypatch, gaussian_module, gaussian_log_prob_op, gaussian_log_prob_backward_op,
                                    (softplus, 1e-3 if softplus else 1e-6), (K, P, D), splits, layout, dtype,
                                    plan_device)
