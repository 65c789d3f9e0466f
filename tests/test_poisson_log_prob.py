"""poisson_log_prob against the float64 reference and torch.distributions.Poisson,
per backend (see conftest.py)."""
import math

import count_helpers
import pytest
import torch
from count_helpers import F64, check_repeatable, problems, random_counts, torch_poisson, value_scale
from hypothesis import given, settings

import fastvae
from fastvae.poisson_log_prob import PoissonLogProb, poisson_log_prob_backward_op, poisson_log_prob_op

from helpers import assert_close

OP = "poisson_log_prob"


def check_against_reference(p, dtype, device):
    return count_helpers.check_against_reference(OP, p, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@given(p=problems(OP))
def test_forward_backward_match_reference(backend, dtype, p):
    check_against_reference(p, dtype, backend[1])


@settings(max_examples=8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(p=problems(OP))
def test_half_precision_matches_reference(backend, dtype, p):
    if p["counts"] == "large":
        p = dict(p, counts="moderate")  # float16's range ends at 65504
    check_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (None, (2, 3), 5), (64, (1,), 40)])
def test_odd_sizes_and_repeatable(backend, K, batch, D):
    _, device = backend
    check_repeatable(OP, dict(D=D, batch=batch, K=K, counts="moderate", lm_range=(-3.0, 3.0), seed=D), device)


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
