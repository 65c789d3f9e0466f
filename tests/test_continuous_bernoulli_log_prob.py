"""continuous_bernoulli_log_prob against the float64 reference, per backend
(see conftest.py), and against torch.distributions.ContinuousBernoulli where
torch's normalizer is accurate."""
import math
from fractions import Fraction

import bernoulli_helpers
import pytest
import torch
from bernoulli_helpers import problems
from hypothesis import given, settings

import fastvae
from fastvae import reference
from fastvae.continuous_bernoulli_log_prob import (
    ContinuousBernoulliLogProb,
    continuous_bernoulli_log_prob_backward_op,
    continuous_bernoulli_log_prob_op,
)

from helpers import assert_close

DIMS = [1, 2, 3, 31, 33, 100, 784, 1025]
BOUNDS = [0.02, 0.3, 2.0, 30.0, 200.0]  # straddle both branch points (0.25 in float64, 1 in float32), saturate


def _terms(x64, l64):
    """The size of the terms behind each value: |x l|, softplus(l) and |log C(l)|."""
    return (x64 * l64).abs() + reference.softplus(l64) + reference.continuous_bernoulli_log_norm(l64).abs()


def check_against_reference(p, dtype, device):
    return bernoulli_helpers.check_against_reference(p, dtype, device, fastvae.continuous_bernoulli_log_prob,
                                                     reference.continuous_bernoulli_log_prob, _terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(p=problems(DIMS, BOUNDS))
def test_forward_backward_match_reference(backend, dtype, p):
    check_against_reference(p, dtype, backend[1])


@settings(max_examples=8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(p=problems(DIMS, BOUNDS))
def test_half_precision_matches_reference(backend, dtype, p):
    """Half-precision logits and x: a float32 result equal to the float64 one of
    the same rounded inputs; gradients in their dtype."""
    check_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (4, (300,), 3), (None, (2, 3), 5)])
def test_dx_sums_over_samples(backend, sample_splits, K, batch, D):
    """dx of x broadcast over K (K = 1, one row, odd D, the folded CPU layout)
    against the reference, twice with the same bits."""
    bernoulli_helpers.check_dx_twice(K, batch, D, backend[1], fastvae.continuous_bernoulli_log_prob,
                                     reference.continuous_bernoulli_log_prob, _terms)


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
def test_log_normalizer_near_zero_and_at_large_logits(backend, dtype):
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
    bern = 0.5 * l64 - reference.softplus(l64)
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
def test_matches_torch_distributions_where_torch_is_accurate(backend, dtype):
    """Equal to ContinuousBernoulli(logits).log_prob(x) for |l| <= 8 (torch's
    normalizer is computed from the probability, which loses digits as
    sigmoid(l) nears 1: its log1p(-p) drifts by 1e-7 at |l| = 8 in float32),
    values and gradients; beyond that, against the float64 reference."""
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
    terms = _terms(x, logits).sum(-1)
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
    want = reference.continuous_bernoulli_log_prob(xb.double().cpu(), big.double().cpu())
    assert_close(fastvae.continuous_bernoulli_log_prob(xb, big), want,
                 _terms(xb.double().cpu(), big.double().cpu()).sum(-1), "saturated")


def test_density_integrates_to_one():
    """The normalizer is right: the density integrates to 1 over [0, 1] (a
    midpoint rule in float64, whose error is below 2e-8 at n = 20000) at
    logits across both branches."""
    n = 20000
    x = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    for lg in (0.0, 1e-4, 0.2, 0.7, 3.0, -12.0):
        density = torch.exp(fastvae.continuous_bernoulli_log_prob(x, torch.full((n, 1), lg, dtype=torch.float64)))
        assert abs(density.mean().item() - 1.0) < 1e-6, lg


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    logits = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2).to(device)
    logits[0, 0, :3] = torch.tensor([0.0, 0.2, -0.3])
    logits.requires_grad_()
    assert torch.autograd.gradcheck(ContinuousBernoulliLogProb.apply, (x, logits))
    assert torch.autograd.gradcheck(ContinuousBernoulliLogProb.apply, (x, logits[0]))
    assert torch.autograd.gradgradcheck(fastvae.continuous_bernoulli_log_prob, (x, logits))


def test_opcheck(backend):
    _, device = backend
    x = torch.rand(3, 7, device=device, requires_grad=True)
    logits = torch.randn(2, 3, 7, device=device, requires_grad=True)
    torch.library.opcheck(continuous_bernoulli_log_prob_op, (x, logits))
    for need_dx in (False, True):
        args = (torch.randn(2, 3, device=device), x.detach(), logits.detach(), need_dx)
        torch.library.opcheck(continuous_bernoulli_log_prob_backward_op, args)


def test_errors_on_bad_input(backend):
    _, device = backend
    logits = torch.zeros(2, 4, 3, device=device)
    with pytest.warns(UserWarning, match="outside"):  # first: on the triton backend only the first call is read
        fastvae.continuous_bernoulli_log_prob(torch.full((4, 3), 2.0, device=device), logits)
    with pytest.raises(ValueError, match=r"x of shape \(4, 2\)"):
        fastvae.continuous_bernoulli_log_prob(torch.zeros(4, 2, device=device), logits)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fastvae.continuous_bernoulli_log_prob(torch.zeros(4, 3, dtype=torch.int64, device=device), logits)


def test_compiles_without_graph_breaks(backend):
    _, device = backend
    x = torch.rand(3, 7, device=device)
    logits = torch.randn(2, 3, 7, device=device, requires_grad=True)
    f = torch.compile(fastvae.continuous_bernoulli_log_prob, fullgraph=True)
    torch.testing.assert_close(f(x, logits), fastvae.continuous_bernoulli_log_prob(x, logits))
