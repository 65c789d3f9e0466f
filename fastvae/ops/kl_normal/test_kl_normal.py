"""kl_normal against its float64 oracle (fastvae/ops/kl_normal/__init__.py), per
backend (the root conftest.py), and its cases of the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import strategies as st

import fastvae
from fastvae.ops import kl_normal as oracle
from fastvae.ops.kl_normal.op import KLNormal, kl_normal_backward_op, kl_normal_op

from conftest import INTERPRET
from helpers import assert_close, reference_tests

LATENT = [1, 2, 3, 7, 32, 33, 100, 1025, 1537]


@st.composite
def problems(draw):
    L = draw(st.sampled_from(LATENT))
    batch = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)))
    while math.prod(batch) > max(1, 8000 // L):
        batch = batch[1:]
    prior = draw(st.sampled_from(["none", "full", "per_dim"]))
    lv_bound = draw(st.sampled_from([1.0, 5.0, 30.0]))
    return batch, L, prior, lv_bound, draw(st.integers(0, 2**31 - 1))


def make(shape, bound, g, dtype, device, kind):
    if kind == "normal":
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    else:
        t = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
    return t.to(dtype).to(device).requires_grad_()


def check_against_reference(problem, dtype, device):
    batch, L, prior, lv_bound, data_seed = problem
    if dtype == torch.float16:  # exp(logvar) in the gradient must fit float16's 65504
        lv_bound = min(lv_bound, 5.0)
    g = torch.Generator().manual_seed(data_seed)
    mu = make((*batch, L), 0, g, dtype, device, "normal")
    lv = make((*batch, L), lv_bound, g, dtype, device, "uniform")
    args = [mu, lv]
    if prior != "none":
        pshape = (*batch, L) if prior == "full" else (L,)
        # |prior_logvar| <= 10 keeps exp(-plv) * exp(lv) inside float32 range
        args += [make(pshape, 0, g, dtype, device, "normal"),
                 make(pshape, min(lv_bound, 10.0), g, dtype, device, "uniform")]
    gk = torch.randn(batch, generator=g, dtype=torch.float64)

    kl = fastvae.kl_normal(*args)
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = torch.autograd.grad(kl, args, gk.to(dtype).to(device))
    assert all(g.dtype == dtype for g in grads)

    args64 = [a.detach().double().cpu().requires_grad_() for a in args]
    if prior == "none":
        kl_ref = oracle.kl_normal(*args64)
    else:
        prior = (args64[2].expand_as(args64[0]), args64[3].expand_as(args64[0]))
        kl_ref = oracle.kl_normal(args64[0], args64[1], *prior)
    grads_ref = torch.autograd.grad(kl_ref, args64, gk.to(dtype).double())

    m, v = args64[0].detach(), torch.exp(args64[1].detach())
    if prior == "none":
        terms = v + m * m + 1.0 + args64[1].detach().abs()
        elem = v + m.abs() + 1.0
    else:
        pm, plv = args64[2].detach(), args64[3].detach()
        ip = torch.exp(-plv)
        terms = plv.abs() + args64[1].detach().abs() + (v + (m - pm) ** 2) * ip + 1.0
        elem = (v + (m - pm).abs() + (m - pm) ** 2) * ip + 1.0
    assert_close(kl, kl_ref.detach(), 0.5 * terms.sum(-1), "kl")
    gscale = gk.abs()[..., None] * elem
    for name, got, ref in zip(["dmu", "dlogvar", "dprior_mu", "dprior_logvar"], grads, grads_ref):
        # a per-dimension prior's gradient sums over the batch
        scale = gscale if ref.shape == gscale.shape else gscale.reshape(-1, L).sum(0)
        assert_close(got, ref, scale, name)


test_forward_backward_match_reference, test_half_precision_matches_reference = reference_tests(
    check_against_reference, problems())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pshape", [(5, 3, 37), (37,)], ids=["full", "per_dim"])
@pytest.mark.parametrize("wanted", ["none", "prior_logvar"])
def test_fixed_prior_gradients(backend, dtype, pshape, wanted):
    """A prior that needs no gradient (or only one of its two): dmu and dlogvar
    match the float64 oracle and equal, bit for bit, those of the same call
    with the prior's gradients formed; the prior gets no gradient it did not ask for."""
    _, device = backend
    g = torch.Generator().manual_seed(7)
    mu = make((5, 3, 37), 0, g, dtype, device, "normal")
    lv = make((5, 3, 37), 5.0, g, dtype, device, "uniform")
    pm = make(pshape, 0, g, dtype, device, "normal").detach()
    plv = make(pshape, 5.0, g, dtype, device, "uniform").detach().requires_grad_(wanted == "prior_logvar")
    gk = torch.randn(5, 3, generator=g, dtype=torch.float64)

    kl = fastvae.kl_normal(mu, lv, pm, plv)
    kl.backward(gk.to(dtype).to(device))
    assert pm.grad is None
    assert (plv.grad is not None) == (wanted == "prior_logvar")

    args64 = [a.detach().double().cpu().requires_grad_() for a in (mu, lv)]
    pm64, plv64 = (a.detach().double().cpu().expand(5, 3, 37) for a in (pm, plv))
    grads_ref = torch.autograd.grad(oracle.kl_normal(*args64, pm64, plv64), args64, gk)
    m, v, ip = args64[0].detach(), torch.exp(args64[1].detach()), torch.exp(-plv64)
    scale = gk.abs()[..., None] * ((v + (m - pm64).abs() + (m - pm64) ** 2) * ip + 1.0)
    for name, got, ref in zip(["dmu", "dlogvar"], (mu.grad, lv.grad), grads_ref):
        assert_close(got, ref, scale, name)

    full = [t.detach().clone().requires_grad_() for t in (mu, lv, pm, plv)]
    fastvae.kl_normal(*full).backward(gk.to(dtype).to(device))
    assert torch.equal(mu.grad, full[0].grad) and torch.equal(lv.grad, full[1].grad)


def test_standard_prior_equals_explicit_zero_prior(backend):
    _, device = backend
    mu = torch.randn(4, 9, device=device)
    lv = torch.randn(4, 9, device=device)
    k0 = fastvae.kl_normal(mu, lv)
    k1 = fastvae.kl_normal(mu, lv, torch.zeros(9, device=device), torch.zeros(9, device=device))
    assert_close(k0, k1.double(), 0.5 * (lv.exp() + mu * mu + 1 + lv.abs()).sum(-1), "kl")


def test_matches_sample_normal_kl(backend):
    _, device = backend
    mu = torch.randn(6, 11, device=device)
    lv = torch.randn(6, 11, device=device)
    _, kl = fastvae.sample_normal(mu, lv)
    assert_close(fastvae.kl_normal(mu, lv), kl.double(), 0.5 * (lv.exp() + mu * mu + 1 + lv.abs()).sum(-1), "kl")


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(4)]
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(lambda *a: KLNormal.apply(*a), args, fast_mode=INTERPRET)
    assert torch.autograd.gradcheck(lambda m, lv: KLNormal.apply(m, lv, None, None), args[:2], fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    # the op takes the kernels' (N, L) layout; KLNormal brings any (..., L) to it
    args = [torch.randn(6, 5, device=device, requires_grad=True) for _ in range(4)]
    torch.library.opcheck(kl_normal_op, tuple(args))
    torch.library.opcheck(kl_normal_op, (args[0], args[1], None, None))
    dkl = torch.randn(6, device=device)
    torch.library.opcheck(kl_normal_backward_op, (dkl, *[a.detach() for a in args]))
    torch.library.opcheck(kl_normal_backward_op, (dkl, args[0].detach(), args[1].detach(), None, None))


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_empty(backend, shape):
    _, device = backend
    mu = torch.zeros(shape, device=device, requires_grad=True)
    kl = fastvae.kl_normal(mu, torch.zeros(shape, device=device))
    assert kl.shape == shape[:-1]
    kl.sum().backward()
    assert mu.grad.shape == shape


def test_non_contiguous(backend):
    _, device = backend
    mu = torch.randn(8, 6, device=device).t()
    lv = torch.randn(8, 6, device=device).t()
    assert_close(fastvae.kl_normal(mu, lv), fastvae.kl_normal(mu.contiguous(), lv.contiguous()).double(),
                 0.5 * (lv.exp() + mu * mu + 1 + lv.abs()).sum(-1), "kl")


def test_errors_on_bad_input(backend):
    _, device = backend
    mu = torch.zeros(4, 3, device=device)
    with pytest.raises(ValueError, match="both"):
        fastvae.kl_normal(mu, mu, prior_mu=mu)
    with pytest.raises(ValueError, match=r"prior_mu of shape \(2,\)"):
        fastvae.kl_normal(mu, mu, torch.zeros(2, device=device), torch.zeros(2, device=device))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 4\)"):
        fastvae.kl_normal(mu, torch.zeros(3, 4, device=device))
    with pytest.raises(TypeError, match="int32"):
        fastvae.kl_normal(mu, torch.zeros(4, 3, dtype=torch.int32, device=device))
    # mixed dtypes: float64 wins
    assert fastvae.kl_normal(mu, mu, torch.zeros(3, dtype=torch.float64, device=device),
                             torch.zeros(3, device=device)).dtype == torch.float64


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(fastvae.kl_normal, (B, L), (B, L))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (a learned (L,) prior: its
    gradients are sums over rows)."""
    mu, lv, pm, plv = leaf(20000, 8), leaf(20000, 8), leaf(8), leaf(8)
    return [lambda: run(fastvae.kl_normal, mu, lv, pm, plv)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    mu, lv = leaf(3, 4), leaf(3, 4)
    return lambda: run(fastvae.kl_normal, mu, lv)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck."""
    return {
        "kl_normal": (lambda m, lv: fastvae.kl_normal(m, lv), [r(3, 4), r(3, 4)], True),
        "kl_normal_prior": (lambda m, lv, pm, plv: fastvae.kl_normal(m, lv, pm, plv),
                            [r(3, 4), r(3, 4), r(4), r(4)], True),
    }


def compile_cases(mu, lv):
    """tests/test_compile.py: (name, function, float inputs) whose compiled graph
    calls the C++ twins, forward and backward (mu, lv: (5, 2, 3))."""
    return [("kl_normal", lambda m, v: fastvae.kl_normal(m, v), (mu, lv)),
            ("kl_normal (prior)", fastvae.kl_normal, (mu, lv, mu.flip(0), lv.flip(1)))]


def twin_op_cases(m2, l2):
    """tests/test_torch_ops.py: (twin, arguments) in the Python op's layout, each
    checked bit for bit against fastvae::<twin> and by opcheck (m2, l2: (12, 6))."""
    return [("kl_normal", (m2, l2, None, None)), ("kl_normal", (m2, l2, l2, m2)),
            ("kl_normal_backward", (torch.randn(12), m2, l2, l2, m2))]
