"""fastvae.hierarchical_elbo and kl_warmup against hand-written versions of
each formula: NVAE's kl_balancer and kl_coeff (transcribed from its code),
VDVAE's per-pixel ELBO, free bits per group; values and gradients."""
import math
import re
from pathlib import Path

import pytest
import torch
from torch.distributions import Independent, Normal

import fastvae
from fastvae import HierarchicalTerms, hierarchical_elbo, kl_warmup

from conftest import INTERPRET

F64 = torch.float64
pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process tests (backend-independent)")


def groups(B=5, shapes=((4, 2, 2), (3, 4, 4), (2, 8, 8)), dtype=F64, seed=0, grad=True):
    """Per-element KLs of three spatial groups (positive, as KLs are) and log p(x | z) (B,)."""
    g = torch.Generator().manual_seed(seed)
    kls = [(torch.rand(B, *s, generator=g, dtype=F64) * (i + 1) * 0.3).to(dtype).requires_grad_(grad)
           for i, s in enumerate(shapes)]
    log_px = (-100 * torch.rand(B, generator=g, dtype=F64)).to(dtype).requires_grad_(grad)
    return kls, log_px


# -- the hand-written versions --------------------------------------------------------


def nvae_kl_balancer(kl_all, kl_coeff=1.0, kl_balance=False, alpha_i=None):
    """NVAE's utils.kl_balancer (Vahdat & Kautz 2020), as its code has it."""
    if kl_balance and kl_coeff < 1.0:
        alpha_i = alpha_i.unsqueeze(0)
        kl_all = torch.stack(kl_all, dim=1)
        kl_vals = torch.mean(kl_all, dim=0)
        kl_coeff_i = torch.mean(torch.abs(kl_all), dim=0, keepdim=True) + 0.01
        total_kl = torch.sum(kl_coeff_i)
        kl_coeff_i = kl_coeff_i / alpha_i * total_kl
        kl_coeff_i = kl_coeff_i / torch.mean(kl_coeff_i, dim=1, keepdim=True)
        kl = torch.sum(kl_all * kl_coeff_i.detach(), dim=1)
        kl_coeffs = kl_coeff_i.squeeze(0)
    else:
        kl_all = torch.stack(kl_all, dim=1)
        kl_vals = torch.mean(kl_all, dim=0)
        kl = torch.sum(kl_all, dim=1)
        kl_coeffs = torch.ones(size=(len(kl_vals),), dtype=kl_all.dtype)
    return kl_coeff * kl, kl_coeffs, kl_vals


def nvae_kl_coeff(step, total_step, constant_step, min_kl_coeff):
    """NVAE's utils.kl_coeff."""
    return max(min((step - constant_step) / total_step, 1.0), min_kl_coeff)


def nvae_alpha_square(groups_per_scale):
    """NVAE's kl_balancer_coeff(num_scales, groups_per_scale, fun='square'), normalized to min 1."""
    n = len(groups_per_scale)
    coeff = torch.cat([(4 ** i) / groups_per_scale[n - i - 1] * torch.ones(groups_per_scale[n - i - 1], dtype=F64)
                       for i in range(n)])
    return coeff / coeff.min()


def grads(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True)


# -- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("kl_weight", [0.0, 0.3, 0.999, 1.0])
def test_balancing_matches_nvaes_kl_balancer(kl_weight):
    """NVAE's loss mean(recon_loss + kl_coeff · Σ_l γ_l KL_l) with its alpha_i
    passed as group_sizes, values and gradients; and the default sizes (the
    groups' C·H·W) give the documented formula."""
    kls, log_px = groups()
    kl_all = [kl.sum(dim=[1, 2, 3]) for kl in kls]
    alpha = nvae_alpha_square([1, 1, 1])
    balanced, coeffs, kl_vals = nvae_kl_balancer(kl_all, kl_weight, kl_balance=True, alpha_i=alpha)
    nvae_loss = torch.mean(-log_px + balanced)
    terms = hierarchical_elbo(None, None, kls, log_px=log_px, kl_weight=kl_weight, balance=True, group_sizes=alpha)
    assert isinstance(terms, HierarchicalTerms)
    torch.testing.assert_close(-terms.bound, nvae_loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(terms.coefficients, kl_weight * coeffs, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(terms.kl_per_group, kl_vals, rtol=1e-13, atol=1e-13)
    assert not terms.coefficients.requires_grad
    for got, want in zip(grads(-terms.bound, [log_px, *kls]), grads(nvae_loss, [log_px, *kls])):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    # the default group sizes: each KL's values per example, by the documented formula
    terms = hierarchical_elbo(None, None, kls, log_px=log_px, kl_weight=kl_weight, balance=True)
    per = torch.stack(kl_all, 1)
    ratio = (per.abs().mean(0) + 0.01) / torch.tensor([16.0, 48.0, 128.0], dtype=F64)
    gamma = 3 * ratio / ratio.sum() if kl_weight < 1 else torch.ones(3, dtype=F64)
    torch.testing.assert_close(terms.coefficients, kl_weight * gamma, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(terms.bound, (log_px - kl_weight * (per * gamma).sum(1)).mean(), rtol=1e-13, atol=0)
    if kl_weight < 1:
        assert terms.coefficients.sum().item() == pytest.approx(3 * kl_weight)


def test_vdvae_per_pixel_elbo_and_bits_per_dim():
    """VDVAE: elbo = (distortion + Σ_l kl_l.sum(C, H, W)) / (C·H·W), nats per
    dimension of the negative bound; bits_per_dim is that over ln 2."""
    x = torch.rand(5, 3, 4, 4, dtype=F64) * 2 - 1
    kls, log_px = groups()
    distortion_per_pixel = -log_px / x[0].numel()
    rate_per_pixel = sum(kl.sum(dim=(1, 2, 3)) for kl in kls) / x[0].numel()
    vdvae_elbo = (distortion_per_pixel + rate_per_pixel).mean()
    terms = hierarchical_elbo(x, None, kls, log_px=log_px)
    torch.testing.assert_close(terms.bits_per_dim * math.log(2), vdvae_elbo, rtol=1e-13, atol=0)
    torch.testing.assert_close(terms.elbo, terms.bound, rtol=0, atol=0)
    torch.testing.assert_close(terms.reconstruction, log_px.mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(terms.kl, rate_per_pixel.mean() * 48, rtol=1e-13, atol=0)
    for got, want in zip(grads(terms.bits_per_dim * math.log(2), [log_px, *kls]),
                         grads(vdvae_elbo, [log_px, *kls])):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-17)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_beta_warmup_free_bits_and_reductions(reduction):
    kls, log_px = groups()
    per = torch.stack([kl.sum(dim=(1, 2, 3)) for kl in kls], 1)  # (B, G)
    lam = per.mean(0)[0].item() + 0.1  # floors group 0 only
    beta, w = 2.0, 0.25
    floored = torch.where(per.mean(0) < lam, torch.full_like(per, lam), per)
    assert floored[:, 0].eq(lam).all() and torch.equal(floored[:, 1:], per[:, 1:])
    bound = log_px - beta * w * floored.sum(1)
    reduce = {"mean": lambda t: t.mean(0), "sum": lambda t: t.sum(0), "none": lambda t: t}[reduction]
    terms = hierarchical_elbo(None, None, kls, log_px=log_px, beta=beta, kl_weight=w, free_bits=lam,
                              reduction=reduction)
    torch.testing.assert_close(terms.bound, reduce(bound), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(terms.elbo, reduce(log_px - per.sum(1)), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(terms.kl_per_group, reduce(per), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(terms.coefficients, torch.full((3,), beta * w, dtype=F64))
    assert terms.bits_per_dim is None
    gs = grads(reduce(bound).sum(), [log_px, *kls])
    for got, want in zip(grads(terms.bound.sum(), [log_px, *kls]), gs):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    assert gs[1].abs().sum() == 0 and gs[2].abs().sum() > 0  # the floored group gets no gradient


def test_gradcheck():
    kls, log_px = groups(B=3, shapes=((2, 1, 1), (1, 2, 2)))
    lam = torch.stack([kl.sum(dim=(1, 2, 3)) for kl in kls], 1).mean(0)[0].item() + 0.2  # group 0 floored

    def f(log_px, a, b):
        t = hierarchical_elbo(None, None, [a, b], log_px=log_px, beta=1.5, kl_weight=0.5, free_bits=lam)
        return t.bound, t.elbo, t.kl, t.kl_per_group

    assert torch.autograd.gradcheck(f, (log_px, *kls))
    assert torch.autograd.gradgradcheck(f, (log_px, *kls))


def test_likelihoods_through_the_decoder_output():
    """The built-in likelihoods score the decoder output as fastvae.elbo does."""
    g = torch.Generator().manual_seed(1)
    B, M = 4, 3
    x = (torch.randint(0, 256, (B, 3, 4, 4), generator=g) / 127.5 - 1).to(F64)
    params = torch.randn(B, 10 * M, 4, 4, generator=g, dtype=F64, requires_grad=True)
    kls, _ = groups(B=B)
    terms = hierarchical_elbo(x, params, kls, likelihood="discretized_logistic_mixture")
    want = fastvae.discretized_logistic_mixture_log_prob(x, params)
    torch.testing.assert_close(terms.reconstruction, want.mean(), rtol=1e-13, atol=0)
    kl = sum(k.sum(dim=(1, 2, 3)) for k in kls)
    torch.testing.assert_close(terms.bits_per_dim, (-(want - kl) / (48 * math.log(2))).mean(), rtol=1e-13, atol=0)
    (gp,) = grads(terms.bound, [params])
    (wp,) = grads((want - kl).mean(), [params])
    torch.testing.assert_close(gp, wp, rtol=1e-12, atol=1e-14)
    # a Gaussian (mean, logvar) pair, and a torch distribution, which implies the likelihood
    xg = torch.randn(B, 6, generator=g, dtype=F64)
    mean, logvar = torch.randn(B, 6, generator=g, dtype=F64), torch.randn(B, 6, generator=g, dtype=F64) * 0.3
    exact = Normal(mean, (0.5 * logvar).exp()).log_prob(xg).sum(1)
    for out, lik in (((mean, logvar), "gaussian"), (Independent(Normal(mean, (0.5 * logvar).exp()), 1), None)):
        terms = hierarchical_elbo(xg, out, [k.detach() for k in kls], likelihood=lik, reduction="none")
        torch.testing.assert_close(terms.reconstruction, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_dtypes(dtype):
    kls, log_px = groups(dtype=dtype)
    terms = hierarchical_elbo(None, None, kls, log_px=log_px, kl_weight=0.5, balance=True)
    assert all(t.dtype == dtype for t in terms[:6])
    ref = hierarchical_elbo(None, None, [k.double() for k in kls], log_px=log_px.double(), kl_weight=0.5,
                            balance=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-14
    for got, want in zip(terms[:6], ref[:6]):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # a half-precision KL is widened: the terms in float32
    half = kls[0].detach().bfloat16()
    mixed = hierarchical_elbo(None, None, [half, kls[1].float()], log_px=log_px.float(), reduction="none")
    assert mixed.bound.dtype == torch.float32
    torch.testing.assert_close(mixed.kl_per_group[:, 0], half.double().sum(dim=(1, 2, 3)).float())


def test_kls_given_per_example():
    kls, log_px = groups()
    reduced = [kl.sum(dim=(1, 2, 3)) for kl in kls]
    a = hierarchical_elbo(None, None, kls, log_px=log_px, kl_weight=0.2, balance=True)
    b = hierarchical_elbo(None, None, reduced, log_px=log_px, kl_weight=0.2, balance=True, group_sizes=[16, 48, 128])
    for got, want in zip(a[:6], b[:6]):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match=r"balance=True divides each group's KL by its size, and kls\[1\] are given "
                                         r"per example \(B,\): pass those KLs per element"):
        hierarchical_elbo(None, None, [kls[0], reduced[1]], log_px=log_px, kl_weight=0.2, balance=True)


def test_kl_warmup_is_nvaes_kl_coeff():
    for step in (0, 5, 100, 2500, 5000, 5001, 10**6):
        for start, minimum in ((0, 0.0), (1000, 1e-4), (10, 0.5)):
            assert kl_warmup(step, 5000, start=start, minimum=minimum) == nvae_kl_coeff(step, 5000, start, minimum)
    assert kl_warmup(250, 1000) == 0.25 and kl_warmup(2000, 1000) == 1.0
    with pytest.raises(ValueError, match="warmup_steps must be"):
        kl_warmup(1, 0)
    with pytest.raises(ValueError, match="minimum must be <= 1"):
        kl_warmup(1, 10, minimum=2.0)
    with pytest.raises(TypeError, match="step must be"):
        kl_warmup(1.5, 10)


def test_bad_arguments_name_themselves():
    kls, log_px = groups(grad=False)
    x = torch.randn(5, 3, 4, 4)
    cases = [
        (dict(kls=kls[0]), TypeError, "kls must be a list or tuple"),
        (dict(kls=[]), ValueError, "kls is empty"),
        (dict(kls=[kls[0][:4]]), ValueError, r"kls\[0\] has shape \(4, 4, 2, 2\); expected \(B, ...\) with B = 5"),
        (dict(kls=[kls[0], kls[1].long()]), TypeError, r"kls\[1\] must be a floating-point tensor, got a torch.int64"),
        (dict(kls=[kls[0], 1.0]), TypeError, r"kls\[1\] must be a floating-point tensor, got float"),
        (dict(kl_weight=1.5), ValueError, r"kl_weight must be in \[0, 1\]"),
        (dict(kl_weight=-0.1), ValueError, "kl_weight must be >= 0"),
        (dict(beta=float("nan")), ValueError, "beta must be finite"),
        (dict(free_bits=-1), ValueError, "free_bits must be >= 0"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(balance="yes"), TypeError, "balance must be"),
        (dict(group_sizes=[1, 2]), ValueError, "group_sizes must be a sequence of 3 positive numbers"),
        (dict(group_sizes=[1, 0, 2]), ValueError, "group_sizes must be positive"),
        (dict(log_px=log_px[:, None]), ValueError, r"log_px must have shape \(B,\)"),
        (dict(x=x[:4]), ValueError, "they must share the batch dimension B"),
        (dict(decoder_output=torch.zeros(5, 3, 4, 4)), ValueError, "pass either log_px"),
        (dict(log_px=None), ValueError, "pass the decoder's output"),
        (dict(log_px=None, decoder_output=torch.zeros(5, 3, 4, 4)), ValueError, "x is required"),
        (dict(log_px=None, x=x, decoder_output=torch.zeros(5, 3, 4, 4)), ValueError, "likelihood= is required"),
        (dict(log_px=None, x=x, decoder_output=torch.zeros(5, 3, 4, 4), likelihood="normal"), ValueError,
         "likelihood must be one of"),
    ]
    for kwargs, err, msg in cases:
        args = dict(x=None, decoder_output=None, kls=kls, log_px=log_px) | kwargs
        with pytest.raises(err, match=msg):
            hierarchical_elbo(args.pop("x"), args.pop("decoder_output"), args.pop("kls"), **args)


def test_the_page_runs_as_written():
    """docs/hierarchical.md's code blocks, in order: VDVAE's and NVAE's losses
    equal the hierarchical_elbo calls that replace them (the page asserts it)."""
    page = Path(__file__).resolve().parents[1] / "docs" / "hierarchical.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 (the page's own examples)
    assert namespace["model_stats"].log_likelihood.shape == (8,)
    assert torch.isfinite(namespace["model_stats"].log_likelihood).all()
