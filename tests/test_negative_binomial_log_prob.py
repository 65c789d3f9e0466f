"""negative_binomial_log_prob against the float64 reference and its peers
(scvi-tools' log_nb_positive, torch.distributions.NegativeBinomial), per
backend (see conftest.py): values and gradients, theta per element and per
gene, x = 0 rows, the theta -> inf (Poisson) limit, large counts."""
import math

import count_helpers
import pytest
import torch
from count_helpers import (
    F64,
    check_repeatable,
    grad_scale,
    log_nb_positive,
    problems,
    random_counts,
    torch_nb,
    torch_poisson,
    value_scale,
)
from hypothesis import given, settings

import fastvae
from fastvae import reference
from fastvae.negative_binomial_log_prob import (
    NegativeBinomialLogProb,
    negative_binomial_log_prob_backward_op,
    negative_binomial_log_prob_op,
)

from conftest import INTERPRET
from helpers import assert_close

OP = "negative_binomial_log_prob"


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
    """Half-precision parameters: a float32 result equal to the float64 one of
    the same rounded inputs, gradients in the inputs' dtype."""
    if p["lt_range"][1] > 11 or p["counts"] == "large":
        p = dict(p, lt_range=(-3.0, 3.0), counts="sparse")  # float16's range ends at 65504
    check_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("theta", ["element", "gene"])
def test_matches_scvi_and_torch_distributions(backend, theta):
    """float64, moderate values: scvi-tools' log_nb_positive and
    torch.distributions.NegativeBinomial(total_count=theta, logits=log mu - log theta)."""
    _, device = backend
    g = torch.Generator().manual_seed(1)
    x = random_counts((6, 40), g, "moderate")
    lm = torch.randn(3, 6, 40, generator=g, dtype=F64) * 2
    lt = torch.randn(*((3, 6, 40) if theta == "element" else (40,)), generator=g, dtype=F64) * 2
    lm_d, lt_d = lm.to(device).requires_grad_(), lt.to(device).requires_grad_()
    out = fastvae.negative_binomial_log_prob(x.to(device), lm_d, lt_d)
    lm_r, lt_r = lm.clone().requires_grad_(), lt.clone().requires_grad_()
    scvi = log_nb_positive(x, lm_r.exp(), lt_r.exp()).sum(-1)
    scale = value_scale(x, lm, lt.expand_as(lm)).sum(-1)
    assert_close(out, scvi.detach(), scale, "vs scvi log_nb_positive")
    assert_close(out, torch_nb(x, lm, lt), scale, "vs torch NegativeBinomial")
    got = torch.autograd.grad(out.sum(), [lm_d, lt_d])
    want = torch.autograd.grad(scvi.sum(), [lm_r, lt_r])
    gs = grad_scale(x, lm, lt.expand_as(lm))
    assert_close(got[0], want[0], gs, "dlog_mean")
    assert_close(got[1], want[1], gs.sum_to_size(lt.shape), "dlog_theta")


@pytest.mark.parametrize("dtype,log_theta", [(F64, 25.0), (F64, 60.0), (torch.float32, 30.0), (torch.float32, 80.0),
                                             (torch.float32, 100.0)])
def test_theta_to_infinity_is_poisson(backend, dtype, log_theta):
    """theta -> inf: the Poisson log-likelihood, to O((x^2 + mu^2) / theta) plus
    rounding of the Poisson terms (no cancellation of x log theta), and a log
    theta gradient that tends to 0; also where theta overflows the dtype (e^100
    in float32: the limit itself, never inf * 0 = NaN)."""
    _, device = backend
    g = torch.Generator().manual_seed(2)
    x = random_counts((4, 50), g, "moderate")
    lm = torch.randn(2, 4, 50, generator=g, dtype=F64) + 2
    lt = torch.full((50,), log_theta, dtype=F64)
    lt_d = lt.to(dtype).to(device).requires_grad_()
    out = fastvae.negative_binomial_log_prob(x.to(dtype).to(device), lm.to(dtype).to(device), lt_d)
    poisson = torch_poisson(x, lm.to(dtype).double())
    theta = math.exp(log_theta)
    limit = ((x * x + lm.exp() ** 2) / theta).sum(-1)
    rtol = 1e-12 if dtype == F64 else 2e-5
    err = (out.double().cpu() - poisson).abs()
    assert (err <= limit + rtol * value_scale(x, lm).sum(-1)).all(), err.max()
    (dlt,) = torch.autograd.grad(out.sum(), [lt_d])
    assert torch.isfinite(dlt).all()
    assert (dlt.double().cpu().abs() <= 2 * ((x * x + lm.exp() ** 2) / theta).sum((0, 1)) + rtol * 8 * (
        x.sum(0) + lm.exp().sum((0, 1)) + 1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_rows_are_exact(backend, dtype):
    """x = 0: log p = -theta log(1 + mu / theta) exactly (no lgamma terms), its gradients too."""
    _, device = backend
    g = torch.Generator().manual_seed(3)
    lm = (torch.randn(3, 2, 37, generator=g, dtype=F64) * 3).to(dtype).to(device).requires_grad_()
    lt = (torch.randn(37, generator=g, dtype=F64) * 3).to(dtype).to(device).requires_grad_()
    out = fastvae.negative_binomial_log_prob(torch.zeros(2, 37, dtype=dtype, device=device), lm, lt)
    lm64, lt64 = lm.detach().double().cpu(), lt.detach().double().cpu()
    theta, mu = lt64.exp(), lm64.exp()
    want = (-theta * torch.log1p(mu / theta)).sum(-1)
    assert_close(out, want, (mu + 1).sum(-1), "log_prob")
    dlm, dlt = torch.autograd.grad(out.sum(), [lm, lt])
    assert_close(dlm, -theta * mu / (theta + mu), mu + 1, "dlog_mean")
    assert_close(dlt, (theta * mu / (theta + mu) - theta * torch.log1p(mu / theta)).sum((0, 1)),
                 (mu + 1).sum((0, 1)), "dlog_theta")


@pytest.mark.parametrize("log_theta", [-2.0, 0.0, 2.3, 7.0, 11.5])
def test_large_counts_match_scvi_in_float64(backend, log_theta):
    """Counts up to 1e5 (the lgamma differences of the Stirling forms) against
    scvi-tools' formula in float64, whose lgammas of 1e6 carry ~1e-10 rounding."""
    _, device = backend
    g = torch.Generator().manual_seed(4)
    x = random_counts((5, 60), g, "large")
    lm = torch.log(x + 1) + torch.randn(2, 5, 60, generator=g, dtype=F64) * 0.3
    lt = torch.full((60,), log_theta, dtype=F64)
    out = fastvae.negative_binomial_log_prob(x.to(device), lm.to(device), lt.to(device))
    want = log_nb_positive(x, lm.exp(), lt.exp()).sum(-1)
    assert_close(out, want, value_scale(x, lm, lt.expand_as(lm)).sum(-1) * 100, "vs scvi (float64)")


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (4, (300,), 3), (None, (2, 3), 5),
                                       (64, (1,), 40)])
def test_per_gene_theta_gradient_sums_over_rows(backend, K, batch, D):
    """Odd sizes, K = 1, one row (the folded layout at K = 64): the per-gene
    dlog_theta sums over samples and rows; a second call gives the same bits."""
    _, device = backend
    p = dict(D=D, batch=batch, K=K, counts="sparse", theta="gene", lt_range=(-2.0, 3.0), lm_range=(-3.0, 3.0), seed=D)
    check_repeatable(OP, p, device)


def test_integer_counts_and_no_count_gradient(backend):
    _, device = backend
    x = torch.tensor([[0, 3, 10]], device=device)
    lm = torch.zeros(2, 1, 3, device=device, requires_grad=True)
    lt = torch.zeros(3, device=device)
    out = fastvae.negative_binomial_log_prob(x, lm, lt)
    assert out.dtype == torch.float32 and out.shape == (2, 1)
    torch.testing.assert_close(out, fastvae.negative_binomial_log_prob(x.float(), lm, lt))
    xf = x.float().requires_grad_()
    out = fastvae.negative_binomial_log_prob(xf, lm, lt)
    assert torch.autograd.grad(out.sum(), [xf], allow_unused=True) == (None,)


def test_gradcheck_float64(backend):
    """Under the interpreter in gradcheck's fast mode (random directions)."""
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = random_counts((3, 5), g, "moderate").to(device)
    lm = (torch.randn(2, 3, 5, generator=g, dtype=F64) * 2).to(device).requires_grad_()
    for lt in (torch.randn(2, 3, 5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64) * 3,
               torch.randn(5, generator=g, dtype=F64) + 12):
        lt = lt.to(device).requires_grad_()
        assert torch.autograd.gradcheck(NegativeBinomialLogProb.apply, (x, lm, lt), fast_mode=INTERPRET)
    assert torch.autograd.gradgradcheck(lambda m, t: fastvae.negative_binomial_log_prob(x, m, t), (lm, lt),
                                        fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    x = torch.randint(0, 9, (3, 7), device=device).float()
    lm = torch.randn(2, 3, 7, device=device)
    for lt in (torch.randn(2, 3, 7, device=device), torch.randn(7, device=device)):
        torch.library.opcheck(negative_binomial_log_prob_op, (x, lm, lt))
        for need in ((True, True), (True, False), (False, True)):
            args = (torch.randn(2, 3, device=device), x, lm, lt, *need)
            torch.library.opcheck(negative_binomial_log_prob_backward_op, args)


def test_errors_on_bad_input(backend):
    _, device = backend
    lm = torch.zeros(2, 4, 3, device=device)
    lt = torch.zeros(3, device=device)
    with pytest.raises(ValueError, match=r"x of shape \(4, 2\)"):
        fastvae.negative_binomial_log_prob(torch.zeros(4, 2, device=device), lm, lt)
    with pytest.raises(ValueError, match=r"log_theta of shape \(2,\)"):
        fastvae.negative_binomial_log_prob(torch.zeros(4, 3, device=device), lm, torch.zeros(2, device=device))
    with pytest.raises(TypeError, match="bool"):
        fastvae.negative_binomial_log_prob(torch.zeros(4, 3, dtype=torch.bool, device=device), lm, lt)
    with pytest.raises(TypeError, match="log_theta"):
        fastvae.negative_binomial_log_prob(torch.zeros(4, 3, device=device), lm, torch.zeros(3, dtype=torch.long))
    fastvae.set_value_checks("always")  # on the Triton path only the first call of a kind is checked
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.negative_binomial_log_prob(torch.full((4, 3), -1.0, device=device), lm, lt)
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.negative_binomial_log_prob(torch.full((4, 3), math.nan, device=device), lm, lt)


def test_event_dims(backend):
    _, device = backend
    g = torch.Generator().manual_seed(6)
    x = random_counts((2, 3, 4), g, "sparse").to(device)
    lm = torch.randn(5, 2, 3, 4, generator=g, dtype=F64).to(device)
    lt = torch.randn(3, 4, generator=g, dtype=F64).to(device)
    out = fastvae.negative_binomial_log_prob(x, lm, lt, event_dims=2)
    want = reference.negative_binomial_log_prob(x.reshape(2, 12).cpu(), lm.reshape(5, 2, 12).cpu(),
                                                lt.reshape(12).cpu())
    torch.testing.assert_close(out.cpu(), want)


def test_objectives_and_evaluation_take_the_likelihood(backend):
    """likelihood="negative_binomial" with (log mean, per-gene log theta) from
    decode, and a torch NegativeBinomial(total_count=theta, logits) decoder."""
    from count_helpers import check_objectives

    _, device = backend
    g = torch.Generator().manual_seed(7)
    w = torch.randn(2, 6, generator=g, dtype=F64).to(device)
    lt = torch.randn(6, generator=g, dtype=F64).to(device)
    check_objectives(device, "negative_binomial", lambda z: (z @ w, lt),
                     lambda x, z: log_nb_positive(x, (z @ w).exp(), lt.exp()).sum(-1),
                     lambda z: torch.distributions.NegativeBinomial(lt.exp(), logits=z @ w - lt))
