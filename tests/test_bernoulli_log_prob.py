"""bernoulli_log_prob against the float64 reference, per backend (see conftest.py)."""
import math

import bernoulli_helpers
import pytest
import torch
from bernoulli_helpers import problems
from hypothesis import given, settings

import fastvae
from fastvae import reference
from fastvae.bernoulli_log_prob import BernoulliLogProb, bernoulli_log_prob_backward_op, bernoulli_log_prob_op

from helpers import assert_close

DIMS = [1, 2, 3, 31, 32, 33, 100, 784, 1025, 1537]
BOUNDS = [3.0, 30.0, 90.0, 200.0]


def _terms(x64, l64):
    """The size of the terms behind each value: |x l| and softplus(l)."""
    return (x64 * l64).abs() + reference.softplus(l64)


def check_against_reference(p, dtype, device):
    return bernoulli_helpers.check_against_reference(p, dtype, device, fastvae.bernoulli_log_prob,
                                                     reference.bernoulli_log_prob, _terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(p=problems(DIMS, BOUNDS))
def test_forward_backward_match_reference(backend, dtype, p):
    check_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (4, (300,), 3), (None, (2, 3), 5)])
def test_dx_sums_over_samples_in_one_backward(backend, sample_splits, K, batch, D):
    """dx of x broadcast over K (K = 1, one row, odd D, more rows than one
    interpreter program) against the float64 reference, the samples in one
    pass or split; a second call gives the same bits (the split's arrival
    counters are back at 0)."""
    bernoulli_helpers.check_dx_twice(K, batch, D, backend[1], fastvae.bernoulli_log_prob,
                                     reference.bernoulli_log_prob, _terms)


@pytest.mark.parametrize("lg", [-90.0, 90.0, -1000.0, 1000.0])
def test_large_logits_are_exact(backend, lg):
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


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    logits = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 4).to(device).requires_grad_()
    assert torch.autograd.gradcheck(BernoulliLogProb.apply, (x, logits))
    assert torch.autograd.gradcheck(BernoulliLogProb.apply, (x, logits[0]))


def test_opcheck(backend):
    _, device = backend
    x = torch.rand(3, 7, device=device, requires_grad=True)
    logits = torch.randn(2, 3, 7, device=device, requires_grad=True)
    torch.library.opcheck(bernoulli_log_prob_op, (x, logits))
    torch.library.opcheck(bernoulli_log_prob_op, (x.detach(), logits))
    for need_dx in (False, True):
        args = (torch.randn(2, 3, device=device), x.detach(), logits.detach(), need_dx)
        torch.library.opcheck(bernoulli_log_prob_backward_op, args)


def test_errors_on_bad_input(backend):
    _, device = backend
    logits = torch.zeros(2, 4, 3, device=device)
    with pytest.raises(ValueError, match=r"x of shape \(4, 2\)"):
        fastvae.bernoulli_log_prob(torch.zeros(4, 2, device=device), logits)
    with pytest.raises(TypeError, match="bool"):
        fastvae.bernoulli_log_prob(torch.zeros(4, 3, dtype=torch.bool, device=device), logits)
    # mixed dtypes are read as they are; a float64 input makes the result float64
    assert fastvae.bernoulli_log_prob(torch.zeros(4, 3, dtype=torch.float64, device=device), logits).dtype == \
        torch.float64
    with pytest.raises(ValueError, match="0-d"):
        fastvae.bernoulli_log_prob(torch.zeros((), device=device), torch.zeros((), device=device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", ["same", torch.float32])
def test_half_precision(backend, dtype, x_dtype):
    """Half-precision logits (with x in half precision, or float32 x as under
    autocast) on every backend: a float32 log-probability equal to the float64
    one of the same rounded inputs to float32 accumulation error, gradients in
    each input's dtype."""
    _, device = backend
    x_dtype = dtype if x_dtype == "same" else x_dtype
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(4, 37, generator=g) > 0.5).to(x_dtype).to(device).requires_grad_()
    logits = (torch.randn(3, 4, 37, generator=g) * 5).to(dtype).to(device).requires_grad_()
    out = fastvae.bernoulli_log_prob(x, logits)
    assert out.dtype == torch.float32
    x64, l64 = x.detach().double().cpu(), logits.detach().double().cpu()
    terms = ((x64 * l64).abs() + reference.softplus(l64)).sum(-1)
    assert_close(out, reference.bernoulli_log_prob(x64, l64), terms, "log_prob")
    dx, dl = torch.autograd.grad(out.sum(), [x, logits])
    assert (dx.dtype, dl.dtype) == (x_dtype, dtype)
    assert_close(dl, x64 - torch.sigmoid(l64), torch.ones_like(l64), "dlogits")
    assert_close(dx, l64.sum(0), l64.abs().sum(0) + 1, "dx")


@settings(max_examples=8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(p=problems(DIMS, BOUNDS))
def test_half_precision_matches_reference(backend, dtype, p):
    """The Hypothesis problems in half precision (float32 results; the float64
    reference sees the same rounded inputs, so the float32 tolerance applies to
    the value, the half one to the stored gradients)."""
    check_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_logits_give_the_limit_not_nan(backend, dtype):
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
