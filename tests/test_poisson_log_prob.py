"""poisson_log_prob against the float64 reference and torch.distributions.Poisson,
per backend (see conftest.py)."""
import math

import pytest
import torch
from count_helpers import F64, random_counts, torch_poisson, value_scale
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvae
from fastvae import reference
from fastvae.poisson_log_prob import PoissonLogProb, poisson_log_prob_backward_op, poisson_log_prob_op

from helpers import assert_close

DIMS = [1, 2, 3, 31, 33, 100, 257, 1025]


@st.composite
def problems(draw):
    D = draw(st.sampled_from(DIMS))
    batch = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    K = draw(st.sampled_from([None, 1, 2, 5]))
    while math.prod(batch) * (K or 1) * D > 8000 and batch:
        batch = batch[1:]
    return dict(D=D, batch=batch, K=K, counts=draw(st.sampled_from(["zeros", "sparse", "moderate", "large"])),
                lr_range=draw(st.sampled_from([(-3.0, 3.0), (-20.0, 5.0)])), seed=draw(st.integers(0, 2**31 - 1)))


def check_against_reference(p, dtype, device):
    g = torch.Generator().manual_seed(p["seed"])
    D, batch, K = p["D"], p["batch"], p["K"]
    out_shape = (*(() if K is None else (K,)), *batch, D)
    x = random_counts((*batch, D), g, p["counts"])
    lo, hi = p["lr_range"]
    lr = lo + (hi - lo) * torch.rand(out_shape, generator=g, dtype=F64)
    if p["counts"] == "large":
        lr = torch.log(x + 1.0) + torch.randn(out_shape, generator=g, dtype=F64) * 0.5
    x, lr = x.to(dtype).to(device), lr.to(dtype).to(device).requires_grad_()
    out = fastvae.poisson_log_prob(x, lr)
    up = torch.randn(out.shape, generator=g, dtype=F64)
    (grad,) = torch.autograd.grad(out, [lr], up.to(dtype).to(device))
    x64, lr64 = x.double().cpu(), lr.detach().double().cpu().requires_grad_()
    ref = reference.poisson_log_prob(x64, lr64)
    (ref_grad,) = torch.autograd.grad(ref, [lr64], up)
    assert out.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(out, ref.detach(), value_scale(x64, lr64).sum(-1), "log_prob")
    assert_close(grad, ref_grad, up.abs()[..., None] * (1 + x64 + lr64.detach().exp()), "dlog_rate")
    return out, grad


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@given(p=problems())
def test_forward_backward_match_reference(backend, dtype, p):
    check_against_reference(p, dtype, backend[1])


@settings(max_examples=8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(p=problems())
def test_half_precision_matches_reference(backend, dtype, p):
    if p["counts"] == "large":
        p = dict(p, counts="moderate")  # float16's range ends at 65504
    check_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (None, (2, 3), 5), (64, (1,), 40)])
def test_odd_sizes_and_repeatable(backend, K, batch, D):
    _, device = backend
    p = dict(D=D, batch=batch, K=K, counts="moderate", lr_range=(-3.0, 3.0), seed=D)
    out, grad = check_against_reference(p, torch.float32, device)
    again, grad_again = check_against_reference(p, torch.float32, device)
    assert torch.equal(out, again) and torch.equal(grad, grad_again)


def test_matches_torch_distributions(backend):
    _, device = backend
    g = torch.Generator().manual_seed(1)
    x = random_counts((6, 40), g, "moderate")
    lr = torch.randn(3, 6, 40, generator=g, dtype=F64) * 2
    out = fastvae.poisson_log_prob(x.to(device), lr.to(device))
    assert_close(out, torch_poisson(x, lr), value_scale(x, lr).sum(-1), "vs torch Poisson")


def test_zero_counts_with_zero_rate(backend):
    """x = 0 with log_rate = -inf: probability 1 (log 0), not 0 * -inf = NaN; x > 0 there: -inf."""
    _, device = backend
    lr = torch.tensor([[-math.inf, 0.0]], device=device, requires_grad=True)
    out = fastvae.poisson_log_prob(torch.tensor([[0.0, 0.0]], device=device), lr)
    assert out.item() == -1.0
    (d,) = torch.autograd.grad(out.sum(), [lr])
    assert torch.equal(d.cpu(), torch.tensor([[0.0, -1.0]]))
    assert fastvae.poisson_log_prob(torch.tensor([[1.0, 0.0]], device=device), lr.detach()).item() == -math.inf


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = random_counts((3, 5), g, "moderate").to(device)
    lr = (torch.randn(2, 3, 5, generator=g, dtype=F64) * 2).to(device).requires_grad_()
    assert torch.autograd.gradcheck(PoissonLogProb.apply, (x, lr))
    assert torch.autograd.gradgradcheck(lambda t: fastvae.poisson_log_prob(x, t), (lr,))


def test_opcheck(backend):
    _, device = backend
    x = torch.randint(0, 9, (3, 7), device=device).float()
    lr = torch.randn(2, 3, 7, device=device)
    torch.library.opcheck(poisson_log_prob_op, (x, lr))
    torch.library.opcheck(poisson_log_prob_backward_op, (torch.randn(2, 3, device=device), x, lr, True))


def test_errors_on_bad_input(backend):
    _, device = backend
    lr = torch.zeros(2, 4, 3, device=device)
    with pytest.raises(ValueError, match=r"x of shape \(4, 2\)"):
        fastvae.poisson_log_prob(torch.zeros(4, 2, device=device), lr)
    with pytest.raises(TypeError, match="bool"):
        fastvae.poisson_log_prob(torch.zeros(4, 3, dtype=torch.bool, device=device), lr)
    fastvae.set_value_checks("always")  # on the Triton path only the first call of a kind is checked
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.poisson_log_prob(torch.full((4, 3), -2.0, device=device), lr)
    assert fastvae.poisson_log_prob(torch.ones(4, 3, dtype=torch.long, device=device), lr).dtype == torch.float32


def test_objectives_and_evaluation_take_the_likelihood(backend):
    """likelihood="poisson" with the log rate from decode, and a torch Poisson decoder."""
    from count_helpers import check_objectives

    _, device = backend
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(7), dtype=F64).to(device)
    check_objectives(device, "poisson", lambda z: z @ w, lambda x, z: torch_poisson(x, z @ w),
                     lambda z: torch.distributions.Independent(torch.distributions.Poisson((z @ w).exp()), 1))
