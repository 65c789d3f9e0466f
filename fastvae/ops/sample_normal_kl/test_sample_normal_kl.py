"""sample_normal_kl against its float64 oracle (fastvae/ops/sample_normal_kl/__init__.py),
per backend (the root conftest.py): z and the KL per element and reduced, in
every form (log-std, log-variance, NVAE's residual form), forward and
backward, a broadcast prior, extreme scales, half-precision inputs, the
noise (sample_normal's), z's moments, VDVAE's and NVAE's own formulas, free
bits, errors, gradcheck and the double backward; the triton backend's plans
(the general path's numbers bit for bit, one plan per call signature, the
same errors, direct launches); and its cases of the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import strategies as st

import fastvae
from fastvae import _launch, _philox
from fastvae.ops.sample_normal_kl import group_kl, group_terms, row_sums, vdvae_group
from fastvae.ops.sample_normal_kl import op as kl_op
from fastvae.ops.sample_normal_kl.op import SampleNormalKL

from conftest import INTERPRET
from helpers import (
    assert_close,
    float_dtype_examples,
    gen,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    plan_device_fixture,
    seed_tensor,
)

# the interpreter runs each Triton program as Python (~1 ms): fewer examples there
EXAMPLES = 8 if INTERPRET else 40

SHAPES = [(7,), (3, 5), (1, 3), (2, 3, 5, 7), (1, 16, 4, 4), (3, 1, 1, 1), (2, 1025)]


@st.composite
def problems(draw):
    """(shape, param, residual, reduce, data seed, log-scale bound)."""
    shape = draw(st.sampled_from(SHAPES))
    B = draw(st.sampled_from([1, 2, 5]))
    return ((B, *shape[1:]) if len(shape) > 1 else (B,), draw(st.sampled_from(["logvar", "logstd"])),
            draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)),
            draw(st.sampled_from([0.5, 3.0, 8.0])))


def make_inputs(shape, data_seed, bound, dtype, device, requires_grad=False):
    g = torch.Generator().manual_seed(data_seed)
    out = []
    for i in range(4):
        if i % 2 == 0:
            t = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        else:
            t = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
        out.append(t.to(dtype).to(device).requires_grad_(requires_grad))
    return out


def noise(seed, shape, dtype):
    """eps (float64) as a `dtype` op draws it: float32 normals for float32 and half inputs."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return _philox.sample_noise(seed, 1, torch.Size(shape), acc, "cpu")[0].double()


def oracle(inputs64, eps, param, residual, reduce):
    """(z, kl) in float64, differentiable in the four inputs, from the given eps."""
    logvar = param == "logvar"
    m, ls, pm, pls = inputs64
    mq, a, d, delta = group_terms(m, ls, pm, pls, logvar, residual)
    kl = group_kl(d, delta, (0.5 if logvar else 1.0) * pls)
    return mq + torch.exp(a) * eps, row_sums(kl) if reduce else kl


def kl_scale(inputs64, param, residual, reduce):
    """The size of the terms each KL value sums (its tolerance's scale)."""
    logvar = param == "logvar"
    m, ls, pm, pls = (t.detach() for t in inputs64)
    _, _, d, delta = group_terms(m, ls, pm, pls, logvar, residual)
    u = d * torch.exp(-(0.5 if logvar else 1.0) * pls)
    s = 0.5 * (torch.exp(2 * delta) + u * u + 1) + delta.abs() + 1.0
    return row_sums(s) if reduce else s


def call(inputs, seed, device, param, residual, reduce):
    return SampleNormalKL.apply(*inputs, seed_tensor(seed, device), param == "logvar", residual, reduce)


@float_dtype_examples(EXAMPLES, problem=problems())
def test_forward_matches_reference(backend, dtype, problem):
    _, device = backend
    shape, param, residual, reduce, data_seed, bound = problem
    inputs = make_inputs(shape, data_seed, bound, dtype, device)
    seed = data_seed * 31 + 7
    z, kl = call(inputs, seed, device, param, residual, reduce)
    inputs64 = [t.double().cpu() for t in inputs]
    eps = noise(seed, shape, dtype)
    z_ref, kl_ref = oracle(inputs64, eps, param, residual, reduce)
    assert z.dtype == dtype and kl.dtype == dtype
    assert z.shape == shape and kl.shape == (shape[:1] if reduce else shape)
    mq, a, _, _ = group_terms(*inputs64, param == "logvar", residual)
    assert_close(z, z_ref, mq.abs() + torch.exp(a) * eps.abs() + 1e-30, "z")
    assert_close(kl, kl_ref, kl_scale(inputs64, param, residual, reduce), "kl")


@float_dtype_examples(EXAMPLES, problem=problems(), which=st.sampled_from(["both", "z", "kl"]))
def test_backward_matches_reference_autograd(backend, dtype, problem, which):
    _, device = backend
    shape, param, residual, reduce, data_seed, bound = problem
    inputs = make_inputs(shape, data_seed, bound, dtype, device, requires_grad=True)
    seed = data_seed * 31 + 7
    z, kl = call(inputs, seed, device, param, residual, reduce)
    g = torch.Generator().manual_seed(data_seed + 1)
    gz = torch.randn(z.shape, generator=g, dtype=torch.float64)
    gk = torch.randn(kl.shape, generator=g, dtype=torch.float64)
    if which == "z":
        loss = (z * gz.to(dtype).to(device)).sum()
    elif which == "kl":
        loss = (kl * gk.to(dtype).to(device)).sum()
    else:
        loss = (z * gz.to(dtype).to(device)).sum() + (kl * gk.to(dtype).to(device)).sum()
    grads = torch.autograd.grad(loss, inputs)
    inputs64 = [t.detach().double().cpu().requires_grad_() for t in inputs]
    z_ref, kl_ref = oracle(inputs64, noise(seed, shape, dtype), param, residual, reduce)
    loss_ref = ((z_ref * gz.to(dtype).double()).sum() if which != "kl" else 0.0) + (
        (kl_ref * gk.to(dtype).double()).sum() if which != "z" else 0.0)
    refs = [torch.zeros_like(t) if r is None else r
            for t, r in zip(inputs64, torch.autograd.grad(loss_ref, inputs64, allow_unused=True))]
    # the gradients' terms are bounded by the KL's terms and |grad_z| (sigma_q eps) per element
    gk_elem = gk.abs().reshape(shape[0], *([1] * (len(shape) - 1))) if reduce else gk.abs()
    mq, a, d, delta = group_terms(*[t.detach() for t in inputs64], param == "logvar", residual)
    pls = inputs64[3].detach() * (0.5 if param == "logvar" else 1.0)
    u = d * torch.exp(-pls)
    terms = gk_elem * (torch.exp(2 * delta) + u * u + u.abs() * torch.exp(-pls) + 1) + gz.abs() * (
        1 + torch.exp(a) * noise(seed, shape, dtype).abs())
    for name, grad, ref in zip(("dmu", "dlog_scale", "dprior_mu", "dprior_log_scale"), grads, refs):
        assert grad.dtype == dtype
        assert_close(grad, ref, terms + ref.abs(), name)


def test_prior_broadcasts_and_its_gradient_is_summed(backend):
    """A prior of shape (C, 1, 1) against q (B, C, H, W): the prior's gradient
    sums over the batch and the spatial positions, as autograd's expand does."""
    _, device = backend
    mu, ls, _, _ = make_inputs((3, 4, 5, 5), 2, 2.0, torch.float64, device, requires_grad=True)
    pm = torch.randn(4, 1, 1, dtype=torch.float64, device=device).requires_grad_()
    pls = (0.3 * torch.randn(4, 1, 1, dtype=torch.float64, device=device)).requires_grad_()
    z, kl = fastvae.sample_normal_kl(mu, ls, pm, pls, param="logstd", reduce=True, generator=gen(4))
    (z.sum() + kl.sum()).backward()
    leaves64 = [t.detach().cpu().requires_grad_() for t in (mu, ls, pm, pls)]
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=gen(4)))
    z_ref, kl_ref = oracle([leaves64[0], leaves64[1], leaves64[2].expand(3, 4, 5, 5),
                            leaves64[3].expand(3, 4, 5, 5)], noise(seed, (3, 4, 5, 5), torch.float64),
                           "logstd", False, True)
    (z_ref.sum() + kl_ref.sum()).backward()
    for t, ref in zip((mu, ls, pm, pls), leaves64):
        assert t.grad.shape == ref.shape
        assert_close(t.grad, ref.grad, ref.grad.abs() + 1.0)
    assert_close(kl, kl_ref, kl_ref.abs() + 1.0)


def test_noise_is_sample_normal_s(backend):
    """The RNG contract: for the same seed, z is sample_normal's one sample of
    N(mu, e^logvar) (the log-variance form, q given directly)."""
    _, device = backend
    mu, lv, pm, pls = make_inputs((2, 3, 5, 6), 5, 2.0, torch.float32, device)
    z, _ = fastvae.sample_normal_kl(mu, lv, pm, pls, param="logvar", generator=gen(9))
    z_sn, _ = fastvae.sample_normal(mu, lv, generator=gen(9))
    assert_close(z, z_sn, z_sn.abs() + 1.0, "z")


def test_z_has_q_s_moments(backend):
    """z - mu_q over sigma_q: mean 0 and variance 1 over 2**17 draws, within 5 standard errors."""
    _, device = backend
    shape = (2, 16, 64, 64)
    mu = torch.full(shape, 1.5, device=device)
    lsd = torch.full(shape, -0.7, device=device)
    for residual in (False, True):
        prior_mu = torch.full(shape, -0.5, device=device)
        z, _ = fastvae.sample_normal_kl(mu, lsd, prior_mu, torch.full(shape, 0.2, device=device), param="logstd",
                                        residual=residual, generator=gen(3))
        mean_q = 1.0 if residual else 1.5
        std_q = math.exp(0.2 - 0.7) if residual else math.exp(-0.7)
        e = ((z.double().cpu() - mean_q) / std_q).flatten()
        n = e.numel()
        assert abs(e.mean().item()) < 5 / math.sqrt(n)
        assert abs(e.var().item() - 1.0) < 5 * math.sqrt(2 / n)


def test_matches_vdvae_and_nvae_formulas(backend):
    """VDVAE's gaussian_analytical_kl (log-std) and NVAE's residual KL,
    written as their papers' code does."""
    _, device = backend
    qm, qs, pm, ps = make_inputs((3, 4, 5, 5), 7, 1.5, torch.float64, device)
    torch.manual_seed(0)
    _, kl_v = vdvae_group(qm, qs, pm, ps)
    _, kl = fastvae.sample_normal_kl(qm, qs, pm, ps, param="logstd", reduce=True)
    assert_close(kl, kl_v, kl_v.abs() + 1.0, "vdvae")
    dmu, dls = qm, qs  # NVAE: q = N(mu_p + dmu, sigma_p e^dls)
    nvae = 0.5 * (dmu ** 2 / torch.exp(ps) ** 2 + torch.exp(dls) ** 2) - dls - 0.5
    _, kl_r = fastvae.sample_normal_kl(dmu, dls, pm, ps, param="logstd", residual=True)
    assert_close(kl_r, nvae, nvae.abs() + 1.0, "nvae")
    # the residual form is q given directly at mu_p + dmu, log sigma_p + dls; log-variances halve
    _, kl_d = fastvae.sample_normal_kl(pm + dmu, 2 * (ps + dls), pm, 2 * ps, param="logvar")
    assert_close(kl_d, nvae, nvae.abs() + 1.0, "direct")


@pytest.mark.parametrize("value", [-30.0, 30.0])
@pytest.mark.parametrize("param", ["logvar", "logstd"])
def test_extreme_scales_match_reference(backend, param, value):
    """A collapsed (log-scale -30) or huge (+30) q against a prior of scale 1:
    KL, z and the gradients stay finite and match the oracle (float32)."""
    _, device = backend
    shape = (2, 9)
    c = 0.5 if param == "logvar" else 1.0
    if c * value > 40:  # e^(2 * 30) overflows float32: the KL is infinite
        value = 40.0 / c
    mu = torch.linspace(-2, 2, 18, device=device).reshape(shape).requires_grad_()
    ls = torch.full(shape, value * 0.5 if param == "logstd" else value, device=device).requires_grad_()
    pm = torch.zeros(shape, device=device).requires_grad_()
    pls = torch.zeros(shape, device=device).requires_grad_()
    z, kl = call([mu, ls, pm, pls], 11, device, param, False, True)
    (z.sum() + kl.sum()).backward()
    inputs64 = [t.detach().double().cpu().requires_grad_() for t in (mu, ls, pm, pls)]
    z_ref, kl_ref = oracle(inputs64, noise(11, shape, torch.float32), param, False, True)
    (z_ref.sum() + kl_ref.sum()).backward()
    assert_close(kl, kl_ref, kl_scale(inputs64, param, False, True), "kl")
    assert_close(z, z_ref, z_ref.abs() + 1.0, "z")
    for t, ref in zip((mu, ls, pm, pls), inputs64):
        assert torch.isfinite(t.grad).all()
        assert_close(t.grad, ref.grad, ref.grad.abs() + 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    """Half-precision parameters: z in their dtype, the KL in float32, the
    gradients in their dtype, against the float64 oracle of the rounded inputs."""
    _, device = backend
    inputs = make_inputs((3, 4, 3, 5), 8, 2.0, dtype, device, requires_grad=True)
    z, kl = call(inputs, 5, device, "logstd", True, True)
    assert z.dtype == dtype and kl.dtype == torch.float32
    (z.float().sum() + kl.sum()).backward()
    inputs64 = [t.detach().double().cpu().requires_grad_() for t in inputs]
    z_ref, kl_ref = oracle(inputs64, noise(5, (3, 4, 3, 5), dtype), "logstd", True, True)
    (z_ref.sum() + kl_ref.sum()).backward()
    assert_close(z, z_ref, z_ref.abs() + 1.0, "z")
    assert_close(kl, kl_ref, kl_scale(inputs64, "logstd", True, True), "kl")
    for t, ref in zip(inputs, inputs64):
        assert t.grad.dtype == dtype
        assert_close(t.grad, ref.grad, ref.grad.abs() + 1.0)


def test_reduced_kl_split_over_programs(backend, sample_splits):
    """Rows of thousands of elements (a 64 x 64 group): on Triton the columns
    split over programs, whose row sums the last to arrive adds."""
    _, device = backend
    shape = (2, 3, 40, 41)
    inputs = make_inputs(shape, 12, 2.0, torch.float32, device)
    z, kl = call(inputs, 13, device, "logvar", False, True)
    inputs64 = [t.double().cpu() for t in inputs]
    z_ref, kl_ref = oracle(inputs64, noise(13, shape, torch.float32), "logvar", False, True)
    assert_close(kl, kl_ref, kl_scale(inputs64, "logvar", False, True), "kl")
    assert_close(z, z_ref, z_ref.abs() + 1.0, "z")


def test_free_bits_floor_the_batch_mean(backend):
    _, device = backend
    mu, ls, pm, pls = make_inputs((4, 6), 3, 0.5, torch.float64, device, requires_grad=True)
    _, kl = fastvae.sample_normal_kl(mu, ls, pm, pls, param="logstd", reduce=True, generator=gen(1))
    mean = kl.mean().item()
    _, low = fastvae.sample_normal_kl(mu, ls, pm, pls, param="logstd", reduce=True, free_bits=mean / 2,
                                      generator=gen(1))
    assert torch.equal(low, kl)  # above the floor: the KL itself
    _, high = fastvae.sample_normal_kl(mu, ls, pm, pls, param="logstd", reduce=True, free_bits=2 * mean,
                                       generator=gen(1))
    assert torch.equal(high, torch.full_like(kl, 2 * mean))  # below: the floor, with no gradient
    assert all(g is None or (g == 0).all() for g in torch.autograd.grad(high.sum(), (mu, ls, pm, pls),
                                                                         allow_unused=True))
    _, tensor_floor = fastvae.sample_normal_kl(mu, ls, pm, pls, param="logstd", reduce=True,
                                               free_bits=torch.tensor(2 * mean, dtype=torch.float64), generator=gen(1))
    assert torch.equal(tensor_floor, high)


def test_empty_inputs(backend):
    _, device = backend
    for shape in ((0, 3, 2), (2, 0)):
        x = torch.zeros(shape, device=device, requires_grad=True)
        z, kl = fastvae.sample_normal_kl(x, x, x, x, param="logvar", reduce=True)
        assert z.shape == shape and kl.shape == shape[:1] and (kl == 0).all()
        (z.sum() + kl.sum()).backward()
        assert x.grad.shape == shape


def test_errors_name_the_argument():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="param"):
        fastvae.sample_normal_kl(x, x, x, x)
    with pytest.raises(ValueError, match="param must be one of"):
        fastvae.sample_normal_kl(x, x, x, x, param="std")
    with pytest.raises(ValueError, match="shape mismatch: mu"):
        fastvae.sample_normal_kl(x, torch.zeros(2, 4), x, x, param="logvar")
    with pytest.raises(ValueError, match="prior_log_scale of shape"):
        fastvae.sample_normal_kl(x, x, x, torch.zeros(4), param="logvar")
    with pytest.raises(TypeError, match="prior_mu must be a floating-point"):
        fastvae.sample_normal_kl(x, x, torch.zeros(2, 3, dtype=torch.int64), x, param="logvar")
    with pytest.raises(ValueError, match="batch dimension"):
        fastvae.sample_normal_kl(torch.zeros(()), torch.zeros(()), torch.zeros(()), torch.zeros(()), param="logvar")
    with pytest.raises(ValueError, match="free_bits .*reduce=True"):
        fastvae.sample_normal_kl(x, x, x, x, param="logvar", free_bits=0.5)
    with pytest.raises(ValueError, match="free_bits must be >= 0"):
        fastvae.sample_normal_kl(x, x, x, x, param="logvar", reduce=True, free_bits=-1.0)


FORMS = [(p, r, red) for p in ("logvar", "logstd") for r in (False, True) for red in (False, True)]


# check -> (its function, data seed, Philox seed, atol, rtol)
GRADCHECKS = {"gradcheck": (torch.autograd.gradcheck, 9, 21, 1e-7, 1e-6),
              "double_backward": (torch.autograd.gradgradcheck, 10, 22, 1e-6, 1e-5)}


# the closed form is torch code on every backend, which only draws eps: fewer cases under the interpreter
@pytest.mark.parametrize("check", GRADCHECKS)
@pytest.mark.parametrize("param, residual, reduce", FORMS[::3] if INTERPRET else FORMS)
def test_gradcheck(backend, check, param, residual, reduce):
    """float64 gradcheck, and gradgradcheck (create_graph=True: the closed
    form's second derivative)."""
    _, device = backend
    run, data_seed, philox_seed, atol, rtol = GRADCHECKS[check]
    inputs = make_inputs((2, 3, 2), data_seed, 1.0, torch.float64, device, requires_grad=True)
    seed = seed_tensor(philox_seed, device)

    def f(*t):
        return SampleNormalKL.apply(*t, seed, param == "logvar", residual, reduce)

    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert run(f, tuple(inputs), atol=atol, rtol=rtol, fast_mode=INTERPRET)


@pytest.mark.skipif(INTERPRET, reason="torch.compile of the op: the cpp and reference backends")
def test_compiled_matches_eager(backend):
    _, device = backend
    inputs = make_inputs((2, 4, 3, 3), 14, 1.0, torch.float32, device, requires_grad=True)

    def f(*t):
        z, kl = fastvae.sample_normal_kl(*t, param="logstd", residual=True, reduce=True)
        return (z * z).sum() + kl.sum()

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        torch.manual_seed(3)
        loss = fn(*inputs)
        results.append((loss.detach(), *torch.autograd.grad(loss, inputs)))
    for eager, compiled in zip(*results):
        assert_close(compiled, eager, eager.abs() + 1.0)


# -- the plans (op.py): eager calls on the triton backend ------------------------------
# The planned path launches the general path's kernel variants (triton.py's
# forward_plan / backward_plan) on the same inputs, so under the interpreter
# its values and gradients are the general path's bit for bit; on a GPU too
# (the same compiled kernels). The interpreter costs about 1 ms a program:
# few, small calls.

TRITON = INTERPRET or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="the plans serve the triton backend (interpreter child, GPU)")


@pytest.fixture
def triton_device():
    """The device the triton backend runs on here (CPU tensors under the interpreter), no plan kept."""
    device = "cpu" if INTERPRET else "cuda"
    fastvae.set_backend(None if device == "cuda" else "triton")
    kl_op.PLANS.clear()
    yield device
    kl_op.PLANS.clear()


def planned_and_general(monkeypatch, device, shapes, dtype, create_graph=False, **kw):
    """[(z, kl, grads) of the planned path, of the general path] of one call
    with q of shapes[0] and the prior of shapes[1] (a broadcast prior), the
    gradients of a loss of z and the KL; the same seed and inputs for both.
    ``kw`` goes to sample_normal_kl (``which``: "both", "z" or "kl" take the loss's part)."""
    which = kw.pop("which", "both")
    shape, prior_shape = shapes
    g = torch.Generator().manual_seed(3)
    mu, ls = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
              for _ in range(2))
    pm, pls = (torch.randn(prior_shape, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
               for _ in range(2))
    out = []
    for enabled in (True, False):
        monkeypatch.setattr(kl_op, "ENABLED", enabled)
        z, kl = fastvae.sample_normal_kl(mu, ls, pm, pls, generator=gen(5), **kw)
        loss = (z * z).sum() if which != "kl" else 0.0
        loss = loss + (kl * torch.arange(kl.numel(), device=device).reshape(kl.shape)).sum() if which != "z" else loss
        grads = torch.autograd.grad(loss, (mu, ls, pm, pls), create_graph=create_graph)
        out.append((z, kl, grads))
    return out


def assert_same(a, b):
    """Bit for bit under the interpreter and on a GPU (the same kernels on the same inputs)."""
    assert a.dtype == b.dtype and a.shape == b.shape and not torch.isnan(a).any()
    assert torch.equal(a, b)


PLAN_CASES = [  # (shapes of q and of the prior, keywords)
    (((3, 2, 5, 7), (3, 2, 5, 7)), dict(param="logstd", reduce=True)),  # VDVAE's group
    (((3, 2, 5, 7), (2, 1, 1)), dict(param="logvar", residual=True)),  # a learned prior, broadcast
    (((4, 9), (4, 9)), dict(param="logstd", residual=True, reduce=True, free_bits=50.0, which="z")),
    (((4, 9), (4, 9)), dict(param="logvar", which="kl")),
]


@needs_triton
@pytest.mark.parametrize("shapes, kw", PLAN_CASES)
def test_planned_path_equals_the_general_path(triton_device, monkeypatch, shapes, kw):
    """The plan's launches give the general path's z, KL and gradients bit
    for bit, in each form, from the signature's first call (which makes the
    plan) and from its second (which finds it)."""
    for _ in range(2):
        (z, kl, grads), (z0, kl0, grads0) = planned_and_general(monkeypatch, triton_device, shapes, torch.float32,
                                                                **kw)
        for a, b in zip((z, kl, *grads), (z0, kl0, *grads0)):
            assert_same(a, b)
        assert len(kl_op.PLANS) == 1 and next(iter(kl_op.PLANS.values())) is not None


@needs_triton
def test_each_signature_has_its_plan(triton_device, monkeypatch):
    """A call with another shape (as a compiled model's next batch size) or
    strides makes another plan, with correct values (the oracle's); a
    signature the plans do not serve (mixed dtypes) is kept as None and takes
    the general path; past PLANS.max_plans the plans are forgotten, not grown."""
    for shape, make in [((2, 3, 4), lambda t: t), ((5, 3, 4), lambda t: t),
                        ((5, 3, 4), lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))]:
        inputs = [make(t) for t in make_inputs(shape, 4, 2.0, torch.float64, triton_device)]
        z, kl = fastvae.sample_normal_kl(*inputs, param="logvar", reduce=True, generator=gen(6))
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=gen(6)))
        inputs64 = [t.cpu() for t in inputs]
        z_ref, kl_ref = oracle(inputs64, noise(seed, shape, torch.float64), "logvar", False, True)
        assert_close(z, z_ref, z_ref.abs() + 1.0, "z")
        assert_close(kl, kl_ref, kl_scale(inputs64, "logvar", False, True), "kl")
    assert len(kl_op.PLANS) == 3 and all(p is not None for p in kl_op.PLANS.values())
    mixed = make_inputs((2, 3), 4, 2.0, torch.float32, triton_device)
    mixed[3] = mixed[3].double()
    z, kl = fastvae.sample_normal_kl(*mixed, param="logvar")
    assert kl.dtype == torch.float64 and len(kl_op.PLANS) == 4 and None in kl_op.PLANS.values()
    monkeypatch.setattr(kl_op.PLANS, "max_plans", 4)
    fastvae.sample_normal_kl(*mixed[:3], mixed[2], param="logvar")
    assert len(kl_op.PLANS) == 1


@needs_triton
def test_planned_double_backward(triton_device, monkeypatch):
    """create_graph=True through the plan: the general path's gradients with
    their graph (the same closed form), and its second derivatives."""
    shapes = ((2, 3, 2), (2, 3, 2))
    (z, kl, grads), (z0, kl0, grads0) = planned_and_general(monkeypatch, triton_device, shapes, torch.float64,
                                                            create_graph=True, param="logstd", reduce=True)
    assert type(z.grad_fn).__name__ == "PlannedSampleNormalKLBackward"
    for a, b in zip(grads, grads0):
        assert a.requires_grad
        assert_same(a, b)
    monkeypatch.setattr(kl_op, "ENABLED", True)
    inputs = make_inputs((2, 3, 2), 10, 1.0, torch.float64, triton_device, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda *t: fastvae.sample_normal_kl(*t, param="logvar", residual=True, reduce=True, generator=gen(2)),
        tuple(inputs), atol=1e-6, rtol=1e-5)
    assert len(kl_op.PLANS) == 2


@needs_triton
def test_planned_signature_errors_as_the_general_path(triton_device):
    """A bad argument raises the general path's error on the first call of
    its signature, and keeps no plan; a per-call value (free_bits) is checked
    on every call, planned or not."""
    x = torch.zeros(2, 3, device=triton_device)
    fastvae.sample_normal_kl(x, x, x, x, param="logvar", reduce=True)  # a plan for these tensors
    assert len(kl_op.PLANS) == 1
    with pytest.raises(ValueError, match="param must be one of"):
        fastvae.sample_normal_kl(x, x, x, x, param="std")
    with pytest.raises(ValueError, match="shape mismatch: mu"):
        fastvae.sample_normal_kl(x, torch.zeros(2, 4, device=triton_device), x, x, param="logvar")
    with pytest.raises(ValueError, match="prior_log_scale of shape"):
        fastvae.sample_normal_kl(x, x, x, torch.zeros(4, device=triton_device), param="logvar")
    with pytest.raises(TypeError, match="residual must be a bool"):
        fastvae.sample_normal_kl(x, x, x, x, param="logvar", residual=1, reduce=True)
    with pytest.raises(ValueError, match="free_bits must be >= 0"):
        fastvae.sample_normal_kl(x, x, x, x, param="logvar", reduce=True, free_bits=-1.0)
    with pytest.raises(ValueError, match="free_bits must be finite"):
        fastvae.sample_normal_kl(x, x, x, x, param="logvar", reduce=True, free_bits=math.nan)
    with pytest.raises(ValueError, match="free_bits .*reduce=True"):
        fastvae.sample_normal_kl(x, x, x, x, param="logvar", free_bits=0.5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fastvae.sample_normal_kl(x, x, x, x, param="logvar", reduce=True, generator=3)
    assert len(kl_op.PLANS) == 1


class _CompiledStandIn:
    """Stands in for the CompiledKernel a CUDA launch returns (no CUDA here):
    its launcher runs the interpreted kernel with every argument, constexprs
    included, bound by position, so an argument out of place gives other
    numbers or an error."""

    function = packed_metadata = object()

    def __init__(self, kernel, run, calls):
        self.kernel, self.interpreted_run, self.calls = kernel, run, calls

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter_hook, exit_hook, *args):
        self.calls.append(self.kernel)
        self.interpreted_run(self.kernel, *args, grid=(g0, g1, g2), warmup=False)


class _RuntimeStandIn:
    """Triton's driver calls as _launch.Launch makes them."""

    def __init__(self):
        from types import SimpleNamespace
        self.knobs = SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))

    @staticmethod
    def current_device():
        return 0

    @staticmethod
    def current_stream(device):
        return 0

    @staticmethod
    def is_compiled(kernel):
        return isinstance(kernel, _CompiledStandIn)


@pytest.mark.skipif(not INTERPRET, reason="a stand-in for CUDA's compiled kernels around the interpreter")
@pytest.mark.parametrize("shapes, kw", PLAN_CASES[:2])
def test_direct_launches_give_the_general_path_s_numbers(triton_device, monkeypatch, shapes, kw):
    """After a plan's first launches, each goes to the compiled kernel's
    launcher directly (as on CUDA; here a stand-in around the interpreter),
    every argument where Triton's binder puts it: the general path's values
    and gradients bit for bit."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted_run = InterpretedFunction.run
    direct, through_run = [], []

    def run_returning_a_compiled_kernel(self, *args, **kwargs):
        through_run.append(self)
        interpreted_run(self, *args, **kwargs)
        return _CompiledStandIn(self, interpreted_run, direct)

    monkeypatch.setattr(InterpretedFunction, "run", run_returning_a_compiled_kernel)
    monkeypatch.setattr(_launch, "_runtime", _RuntimeStandIn())
    planned_and_general(monkeypatch, triton_device, shapes, torch.float32, **kw)  # the plan's first launches
    (plan,) = kl_op.PLANS.values()
    launches = plan.launches()
    assert len(launches) == 2 and all(launch.direct for launch in launches)
    direct.clear(), through_run.clear()
    (z, kl, grads), (z0, kl0, grads0) = planned_and_general(monkeypatch, triton_device, shapes, torch.float32, **kw)
    assert len(direct) == 2 and len(through_run) == 2  # the planned call's two, then the general path's
    for a, b in zip((z, kl, *grads), (z0, kl0, *grads0)):
        assert_same(a, b)


def test_other_backends_keep_the_general_path(backend):
    """The plans serve the triton backend's eager calls only (parameters
    included: a learned prior); the cpp and reference backends keep their path."""
    name, device = backend
    kl_op.PLANS.clear()
    x = torch.randn(2, 3, device=device)
    prior = torch.nn.Parameter(torch.zeros(3, device=device))
    _, kl = fastvae.sample_normal_kl(x, x, prior, prior, param="logstd", reduce=True)
    kl.sum().backward()
    assert [p is not None for p in kl_op.PLANS.values()] == ([True] if name == "triton" else [])
    assert prior.grad.shape == (3,)
    kl_op.PLANS.clear()


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(lambda m, s, pm, ps: fastvae.sample_normal_kl(m, s, pm, ps, param="logstd", reduce=True),
              (B, L), (B, L), (B, L), (B, L))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (the row sums)."""
    m, s, pm, ps = (leaf(8, 16, 40, 40) for _ in range(4))
    return [lambda reduce=reduce: run(lambda a, b, c, d: fastvae.sample_normal_kl(
        a, b, c, d, param="logvar", reduce=reduce, generator=gen(2)), m, s, pm, ps) for reduce in (False, True)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    m, s, pm, ps = (leaf(3, 4) for _ in range(4))
    return lambda: run(lambda a, b, c, d: fastvae.sample_normal_kl(a, b, c, d, param="logstd", residual=True,
                                                                   generator=gen(1)), m, s, pm, ps)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck (every form:
    test_double_backward above)."""
    return {
        "sample_normal_kl": (lambda m, s, pm, ps: fastvae.sample_normal_kl(m, s, pm, ps, param="logvar",
                                                                           reduce=True, generator=gen(3)),
                             [r(3, 4), r(3, 4), r(3, 4), r(3, 4)], False),
    }


# -- the op's own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(kl_op)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L", [(1, 1), (5, 7), (3, 1025)])
@pytest.mark.parametrize("logvar, residual", [(False, False), (True, True)])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, N, L, logvar,
                                                                     residual):
    """fastvae::sample_normal_kl and its backward called as a compiled graph
    calls them (the four (N, L) tensors SampleNormalKL hands it): on the
    triton backend from a plan of the call's signature (OP_PLANS, the eager
    plans' KLPlan), with the general launch's z, KL and gradients bit for
    bit, the KL per element and per row, every gradient variant, from the
    first call and the second; half precision, a strided input, an empty
    batch and a gradient of another dtype take the general launch and make
    no plan."""
    kl_op.OP_PLANS.clear()
    g = torch.Generator().manual_seed(N + L)
    m, ls, pm, pls = (torch.randn(N, L, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
                      for _ in range(4))
    gz = torch.randn(N, L, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    gk_rows = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    gk = torch.randn(N, L, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    seed = seed_tensor(11, plan_device)
    op, backward = kl_op.sample_normal_kl_op, kl_op.sample_normal_kl_backward_op
    op_plans_match_the_general_launch(monkeypatch, kl_op, lambda: (
        *op(m, ls, pm, pls, seed, logvar, residual, True), *op(m, ls, pm, pls, seed, logvar, residual, False),
        *(d for grad_z, grad_kl in ((gz, gk_rows), (gz, gk), (None, gk_rows), (gz, None), (None, gk))
          for d in backward(m, ls, pm, pls, seed, grad_z, grad_kl, logvar, residual))))
    kl_op.OP_PLANS.clear()
    op(m.half(), ls.half(), pm.half(), pls.half(), seed, logvar, residual, True)
    if L > 1:
        op(m, torch.cat([ls, ls], -1)[:, ::2], pm, pls, seed, logvar, residual, True)
    op(m[:0], ls[:0], pm[:0], pls[:0], seed, logvar, residual, True)
    other = torch.float64 if dtype is torch.float32 else torch.float32
    backward(m, ls, pm, pls, seed, gz.to(other), None, logvar, residual)
    assert len(kl_op.OP_PLANS) == 0
