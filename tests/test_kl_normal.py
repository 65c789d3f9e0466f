"""kl_normal against the float64 reference, per backend (see conftest.py)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvae
from fastvae import reference
from fastvae.kl_normal import KLNormal, kl_normal_backward_op, kl_normal_op

from helpers import assert_close

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(problem=problems())
def test_forward_backward_match_reference(backend, dtype, problem):
    check_against_reference(backend, dtype, problem)


@settings(max_examples=8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(problem=problems())
def test_half_precision_matches_reference(backend, dtype, problem):
    """Half-precision inputs: a float32 KL equal to the float64 one of the same
    rounded inputs to float32 error; gradients in the inputs' dtype."""
    check_against_reference(backend, dtype, problem)


def check_against_reference(backend, dtype, problem):
    _, device = backend
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
        kl_ref = reference.kl_normal(*args64)
    else:
        prior = (args64[2].expand_as(args64[0]), args64[3].expand_as(args64[0]))
        kl_ref = reference.kl_normal(args64[0], args64[1], *prior)
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
    assert torch.autograd.gradcheck(lambda *a: KLNormal.apply(*a), args)
    assert torch.autograd.gradcheck(lambda m, lv: KLNormal.apply(m, lv, None, None), args[:2])


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
