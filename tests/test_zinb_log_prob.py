"""zinb_log_prob against the float64 reference and scvi-tools' log_zinb_positive,
per backend (see conftest.py): values and gradients, theta per element and per
gene, all-zero rows, saturated zero-inflation logits, theta -> inf."""
import count_helpers
import pytest
import torch
from count_helpers import (
    F64,
    check_repeatable,
    count_scales,
    log_zinb_positive,
    make,
    problems,
    random_counts,
    softplus,
)
from hypothesis import given, settings

import fastvae
from fastvae import reference
from fastvae.zinb_log_prob import ZinbLogProb, zinb_log_prob_backward_op, zinb_log_prob_op

from conftest import INTERPRET
from helpers import assert_close, assert_compiled_matches_eager

OP = "zinb_log_prob"


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
    if p["lt_range"][1] > 11 or p["counts"] == "large":
        p = dict(p, lt_range=(-3.0, 3.0), counts="sparse")  # float16's range ends at 65504
    check_against_reference(p, dtype, backend[1])


@pytest.mark.parametrize("theta", ["element", "gene"])
def test_matches_scvi(backend, theta):
    """float64, moderate values: scvi-tools' log_zinb_positive, values and gradients."""
    _, device = backend
    p = dict(D=40, batch=(6,), K=3, counts="sparse", theta=theta, lt_range=(-3.0, 3.0), lm_range=(-3.0, 3.0),
             zi_bound=4.0, seed=11)
    x, lm, lt, zl, _ = make(p, F64, device)
    out = fastvae.zinb_log_prob(x, lm, lt, zl)
    p64 = [t.detach().cpu().requires_grad_() for t in (lm, lt, zl)]
    scvi = log_zinb_positive(x.cpu(), p64[0].exp(), p64[1].exp(), p64[2]).sum(-1)
    vs, gs = count_scales(x.cpu(), *p64)
    assert_close(out, scvi.detach(), vs.sum(-1), "vs scvi log_zinb_positive")
    got = torch.autograd.grad(out.sum(), [lm, lt, zl])
    want = torch.autograd.grad(scvi.sum(), p64)
    for name, a, b, t in zip(("dlog_mean", "dlog_theta", "dzi_logits"), got, want, p64):
        assert_close(a, b, gs.sum_to_size(t.shape), name)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_all_zero_rows_and_saturated_logits(backend, dtype):
    """All-zero rows: sum of logsumexp(log pi, log(1 - pi) - theta log(1 + mu/theta));
    zi_logits of +-60 (pi = 1 or 0 to the dtype) give the limits without NaN."""
    _, device = backend
    g = torch.Generator().manual_seed(3)
    D = 29
    lm = (torch.randn(2, 3, D, generator=g, dtype=F64) * 2).to(dtype).to(device).requires_grad_()
    lt = (torch.randn(D, generator=g, dtype=F64) * 2).to(dtype).to(device).requires_grad_()
    zl = torch.cat([torch.full((2, 3, 10), 60.0, dtype=F64), torch.full((2, 3, 10), -60.0, dtype=F64),
                    torch.randn(2, 3, D - 20, generator=g, dtype=F64)], -1).to(dtype).to(device).requires_grad_()
    x = torch.zeros(3, D, dtype=dtype, device=device)
    x[1, :] = 2.0  # one nonzero row: log(1 - pi) = -60 there
    out = fastvae.zinb_log_prob(x, lm, lt, zl)
    x64, p64 = x.double().cpu(), [t.detach().double().cpu() for t in (lm, lt, zl)]
    theta, mu = p64[1].exp(), p64[0].exp()
    nb0 = -theta * torch.log1p(mu / theta)
    zero = torch.logaddexp(-softplus(-p64[2]), -softplus(p64[2]) + nb0)
    want = torch.where(x64 == 0, zero, reference.nb_log_prob_terms(x64, p64[0], p64[1]) - softplus(p64[2])).sum(-1)
    vs, _ = count_scales(x64, *p64)
    assert_close(out, want, vs.sum(-1), "log_prob")
    grads = torch.autograd.grad(out.sum(), [lm, lt, zl])
    assert all(torch.isfinite(t).all() for t in grads)


def test_theta_to_infinity_is_zero_inflated_poisson(backend):
    _, device = backend
    g = torch.Generator().manual_seed(4)
    x = random_counts((4, 30), g, "sparse")
    lm = torch.randn(2, 4, 30, generator=g, dtype=F64)
    zl = torch.randn(2, 4, 30, generator=g, dtype=F64)
    out = fastvae.zinb_log_prob(x.to(device), lm.to(device), torch.full((30,), 60.0, dtype=F64, device=device),
                                zl.to(device))
    pois = x * lm - lm.exp() - torch.lgamma(x + 1)
    want = torch.where(x == 0, torch.logaddexp(-softplus(-zl), -softplus(zl) - lm.exp()), pois - softplus(zl)).sum(-1)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K,batch,D", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (None, (2, 3), 5), (64, (1,), 40)])
def test_odd_sizes_and_repeatable(backend, K, batch, D):
    _, device = backend
    p = dict(D=D, batch=batch, K=K, counts="sparse", theta="gene", lt_range=(-2.0, 3.0), lm_range=(-3.0, 3.0),
             zi_bound=3.0, seed=D)
    check_repeatable(OP, p, device)


def test_gradcheck_float64(backend):
    """Under the interpreter (a Python loop per kernel program) in gradcheck's
    fast mode: the Jacobian along random directions, not column by column."""
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = random_counts((3, 5), g, "sparse").to(device)
    lm = (torch.randn(2, 3, 5, generator=g, dtype=F64) * 2).to(device).requires_grad_()
    zl = torch.randn(2, 3, 5, generator=g, dtype=F64).to(device).requires_grad_()
    for lt in (torch.randn(2, 3, 5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64) * 3):
        lt = lt.to(device).requires_grad_()
        assert torch.autograd.gradcheck(ZinbLogProb.apply, (x, lm, lt, zl), fast_mode=INTERPRET)
    assert torch.autograd.gradgradcheck(lambda m, t, z: fastvae.zinb_log_prob(x, m, t, z), (lm, lt, zl),
                                        fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    x = torch.randint(0, 3, (3, 7), device=device).float()
    lm, zl = torch.randn(2, 3, 7, device=device), torch.randn(2, 3, 7, device=device)
    for lt in (torch.randn(2, 3, 7, device=device), torch.randn(7, device=device)):
        torch.library.opcheck(zinb_log_prob_op, (x, lm, lt, zl))
        for need in ((True, True, True), (False, False, True), (True, False, False)):
            args = (torch.randn(2, 3, device=device), x, lm, lt, zl, *need)
            torch.library.opcheck(zinb_log_prob_backward_op, args)


def test_errors_on_bad_input(backend):
    _, device = backend
    lm, zl = torch.zeros(2, 4, 3, device=device), torch.zeros(2, 4, 3, device=device)
    lt = torch.zeros(3, device=device)
    with pytest.raises(ValueError, match=r"zi_logits of shape \(2, 4, 2\)"):
        fastvae.zinb_log_prob(torch.zeros(4, 3, device=device), lm, lt, torch.zeros(2, 4, 2, device=device))
    fastvae.set_value_checks("always")  # on the Triton path only the first call of a kind is checked
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.zinb_log_prob(torch.full((4, 3), -1.0, device=device), lm, lt, zl)
    with pytest.raises(TypeError, match="zi_logits"):
        fastvae.zinb_log_prob(torch.zeros(4, 3, device=device), lm, lt, zl.long())


def test_objectives_and_evaluation_take_the_likelihood(backend):
    """likelihood="zinb" with (log mean, per-gene log theta, zero-inflation logits) from decode."""
    from count_helpers import check_objectives

    _, device = backend
    g = torch.Generator().manual_seed(7)
    w, wz = (torch.randn(2, 6, generator=g, dtype=F64).to(device) for _ in range(2))
    lt = torch.randn(6, generator=g, dtype=F64).to(device)
    check_objectives(device, "zinb", lambda z: (z @ w, lt, z @ wz),
                     lambda x, z: log_zinb_positive(x, (z @ w).exp(), lt.exp(), z @ wz).sum(-1))


def test_decoder_output_errors(backend):
    _, device = backend
    x = torch.zeros(3, 4, dtype=F64, device=device)
    mu = torch.zeros(3, 2, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"decode returns \(log_mean, log_theta, zi_logits\)"):
        fastvae.elbo(x, mu, mu, lambda z: (z.new_zeros(3, 4), z.new_zeros(4)), likelihood="zinb")
    with pytest.raises(ValueError, match="counts >= 0"):
        fastvae.elbo(x - 1, mu, mu, lambda z: z.new_zeros(3, 4), likelihood="poisson")


@pytest.mark.skipif(INTERPRET, reason="compiles a graph: once, in the main process")
def test_compile_fullgraph(backend):
    """The three count likelihoods trace with no graph break (one opaque op each)."""
    _, device = backend
    g = torch.Generator().manual_seed(9)
    x = random_counts((4, 7), g, "sparse").to(device)
    lm, zl = (torch.randn(3, 4, 7, generator=g).to(device).requires_grad_() for _ in range(2))
    lt = torch.randn(7, generator=g).to(device).requires_grad_()

    def loss(lm, lt, zl):
        return (fastvae.zinb_log_prob(x, lm, lt, zl).sum() + fastvae.negative_binomial_log_prob(x, lm, lt).sum()
                + fastvae.poisson_log_prob(x, zl).sum())

    assert_compiled_matches_eager(loss, (lm, lt, zl), [lm, lt, zl])
