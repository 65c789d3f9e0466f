"""sample_concrete against its float64 oracle (fastvae/ops/sample_concrete/__init__.py),
per backend (the root conftest.py):
values and gradients (plain and stop-score), the straight-through (hard)
variant, log q against torch.distributions' RelaxedOneHotCategorical, the
Gumbel-max property and a Kolmogorov-Smirnov test of the two-category
marginal, temperatures over [1e-3, 1e3], masked (-inf) categories, half
precision, the evaluation's layout, errors (its double backward's:
tests/test_double_backward.py); and its cases of the suite-wide checks."""
import math

import pytest
import torch
import torch.distributions as td
from hypothesis import strategies as st

import fastvae
from fastvae.ops import sample_concrete as described
from fastvae.ops.sample_concrete import op as concrete_op
from fastvae.ops.sample_concrete.op import SampleConcrete, concrete_at, sample_concrete_unchecked

from conftest import INTERPRET
from helpers import (
    RTOL,
    assert_close,
    float_dtype_examples,
    gen,
    needs_plan_triton,
    philox_seed_of,
    plan_device_fixture,
    seed_tensor,
)

EXAMPLES = 6 if INTERPRET else 30
TEMPERATURES = [1e-3, 0.1, 0.5, 1.0, 3.0, 1e3]


@st.composite
def problems(draw):
    """(batch, L, C, K, data seed, temperature)."""
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    return (batch, draw(st.sampled_from([1, 3, 7])), draw(st.sampled_from([2, 3, 5, 16, 33])),
            draw(st.sampled_from([1, 2, 5])), draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(TEMPERATURES)))


def make_logits(shape, data_seed, dtype, device, requires_grad=False, bound=3.0):
    g = torch.Generator().manual_seed(data_seed)
    a = ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
    return a.requires_grad_(requires_grad)


def noise(seed, K, shape, dtype, offset0=0):
    """The Exp(1) variates t (K, *shape) in float64 from the uniforms a `dtype` op draws."""
    n = K * math.prod(shape)
    offsets = offset0 + torch.arange(n, dtype=torch.int64)
    return described.concrete_noise(seed, offsets, dtype).reshape(K, *shape)


def oracle(logits, lam, seed, K, dtype, stop_score=False):
    """(z, log q) differentiable in float64 logits: plain autograd of the
    reference's closed form; with stop_score log q is the Concrete density of
    the (differentiable) z with the logits detached, written in log z."""
    t = noise(seed, K, logits.shape, dtype)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(logits.shape[:-1])
    z, log_q = described.concrete_terms(logits, lam, t)[:2]
    if stop_score:
        C = logits.shape[-1]
        log_z = torch.log_softmax((logits - torch.log(t)) / lam[..., None], -1)
        log_pi = torch.log_softmax(logits.detach(), -1)
        lm = lam[..., None]
        log_q = (math.lgamma(C) + (C - 1) * torch.log(lam) + (log_pi - (lm + 1) * log_z).sum(-1)
                 - C * torch.logsumexp(log_pi - lm * log_z, -1))
    return z, log_q.sum(-1)


def scales(logits, lam, t):
    """Per-latent condition numbers: Y = sum_c (|a_c| + |log t_c| + 1) / lam
    bounds the rounding of y = (a - log t) / lam and of everything made from it."""
    a = logits.detach().double().cpu()
    a = torch.where(a > -math.inf, a, 0.0)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(a.shape[:-1])[..., None]
    return ((a.abs() + t.log().abs() + 1.0) / lam).sum(-1, keepdim=True) + 1.0


def check_forward(z, log_q, logits, lam, seed, K, dtype, hard=False):
    t = noise(seed, K, logits.shape, dtype)
    a = logits.detach().double().cpu()
    lam64 = torch.as_tensor(lam, dtype=torch.float64).cpu().expand(a.shape[:-1])
    z_ref, q_ref = described.concrete_terms(a, lam64, t)[:2]
    Y = scales(logits, lam64, t)
    C = a.shape[-1]
    if hard:
        assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == 1).all()
        agree = z.double().cpu().argmax(-1) == z_ref.argmax(-1)
        # the argmax may differ only where the two largest are within rounding
        top2 = z_ref.topk(min(2, C), -1).values
        close = (top2[..., 0] - top2[..., -1]) <= 4 * RTOL[torch.float32] * (Y[..., 0] * top2[..., 0] + 1e-30)
        assert (agree | close).all()
    else:
        assert_close(z, z_ref, z_ref * Y, "z")
    q_scale = (Y[..., 0] * C + t.log().abs().sum(-1) + math.lgamma(C) + C * 2 + C * lam64.log().abs()).sum(-1)
    assert_close(log_q, q_ref.sum(-1), q_scale, "log_q")


@float_dtype_examples(EXAMPLES, problem=problems(), hard=st.booleans())
def test_forward_matches_reference(backend, dtype, problem, hard):
    _, device = backend
    batch, L, C, K, data_seed, lam = problem
    logits = make_logits((*batch, L, C), data_seed, dtype, device)
    seed = data_seed * 31 + 7
    z, log_q = SampleConcrete.apply(logits, torch.full((*batch, L), lam, dtype=dtype, device=device),
                                    seed_tensor(seed, device), hard, K, False)
    assert z.dtype == dtype and log_q.dtype == dtype
    assert z.shape == (K, *batch, L, C) and log_q.shape == (K, *batch)
    check_forward(z, log_q, logits, lam, seed, K, dtype, hard)


@float_dtype_examples(EXAMPLES, problem=problems(), stop_score=st.booleans(), hard=st.booleans())
def test_backward_matches_reference_autograd(backend, dtype, problem, stop_score, hard):
    """Gradients of z (relaxed, and straight-through: the same) and log q."""
    _, device = backend
    batch, L, C, K, data_seed, lam = problem
    logits = make_logits((*batch, L, C), data_seed, dtype, device, requires_grad=True)
    seed = data_seed * 13 + 5
    g = torch.Generator().manual_seed(data_seed + 1)
    gz = torch.randn((K, *batch, L, C), generator=g, dtype=torch.float64).to(dtype)
    gq = torch.randn((K, *batch), generator=g, dtype=torch.float64).to(dtype)
    z, log_q = SampleConcrete.apply(logits, torch.full((*batch, L), lam, dtype=dtype, device=device),
                                    seed_tensor(seed, device), hard, K, stop_score)
    (got,) = torch.autograd.grad((z, log_q), (logits,), (gz.to(device), gq.to(device)))
    a = logits.detach().double().cpu().requires_grad_()
    z_ref, q_ref = oracle(a, lam, seed, K, dtype, stop_score)
    (want,) = torch.autograd.grad((z_ref, q_ref), (a,), (gz.double(), gq.double()))
    t = noise(seed, K, a.shape, dtype)
    Y = scales(a, lam, t)
    zd = z_ref.detach()
    gza, gqa = gz.double().abs(), gq.double().abs()[..., None, None]
    scale = ((zd * (gza + (zd * gza).sum(-1, keepdim=True)) * Y + gqa * (C * zd * Y + C * lam + lam + 2.0)).sum(0)
             / lam + 1e-300)
    assert got.dtype == dtype
    assert_close(got, want, scale, "dlogits")


def test_log_q_matches_torch_distributions(backend):
    """log q of the drawn z equals RelaxedOneHotCategorical.log_prob of that z
    (float64, where torch's value is finite), at several temperatures."""
    _, device = backend
    logits = make_logits((4, 5, 6), 21, torch.float64, device)
    for seed, lam in enumerate((0.3, 0.5, 1.0, 2.0, 7.0)):
        torch.manual_seed(seed)
        z, log_q = fastvae.sample_concrete(logits, lam, n_samples=3)
        assert z.shape == (3, 4, 5, 6) and log_q.shape == (3, 4)
        torch.testing.assert_close(z.sum(-1), torch.ones(3, 4, 5, dtype=torch.float64, device=device))
        temperature = torch.tensor(lam, dtype=torch.float64, device=device)
        expected = td.Independent(td.RelaxedOneHotCategorical(temperature, logits=logits), 1).log_prob(z)
        assert torch.isfinite(expected).all()
        assert_close(log_q, expected, expected.abs() + 100.0, f"log_q at {lam}")


def test_gumbel_max_frequencies(backend):
    """The straight-through one-hot is argmax(logits + Gumbel): its category
    frequencies follow softmax(logits), whatever the temperature (three seeds,
    |f - p| < 4.5 standard errors)."""
    _, device = backend
    probs = torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64)
    logits = probs.log().expand(50, 40, 4).contiguous().to(device)
    for seed, lam in ((1, 0.2), (2, 1.0), (3, 10.0)):
        torch.manual_seed(seed)
        z, _ = fastvae.sample_concrete(logits, lam, n_samples=5, hard=True)
        f = z.double().cpu().reshape(-1, 4).mean(0)
        n = z.numel() // 4
        assert ((f - probs).abs() < 4.5 * (probs * (1 - probs) / n).sqrt()).all(), (seed, f)


def test_two_category_marginal_kolmogorov_smirnov(backend):
    """C = 2: z_0 = sigmoid((a_0 - a_1 + logistic) / lam), so
    P(z_0 <= s) = sigmoid(lam logit(s) - (a_0 - a_1)); D < 1.95 / sqrt(n) over three seeds."""
    _, device = backend
    lam, delta = 0.7, 0.8
    logits = torch.tensor([delta, 0.0], device=device).expand(60, 50, 2).contiguous()
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        z, _ = fastvae.sample_concrete(logits, lam, n_samples=2)
        x = z[..., 0].double().flatten().cpu().sort().values
        s = x.clamp(1e-300, 1 - 1e-16)
        cdf = torch.sigmoid(lam * (s.log() - torch.log1p(-s)) - delta)
        n = x.numel()
        i = torch.arange(n, dtype=torch.float64)
        d = torch.maximum((i + 1) / n - cdf, cdf - i / n).max().item()
        assert d < 1.95 / math.sqrt(n), (seed, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_temperatures(backend, dtype):
    """lam in [1e-3, 1e3]: z on the simplex (nearly one-hot at 1e-3, nearly
    uniform at 1e3), log q finite (the 1e-3 density is ~1e3 C nats, taken
    from the noise: z itself underflows) and equal to the reference, gradients finite."""
    _, device = backend
    lam = torch.tensor([1e-3, 1e-2, 1.0, 1e2, 1e3], dtype=dtype, device=device)
    logits = make_logits((3, 5, 9), 4, dtype, device, requires_grad=True, bound=5.0)
    z, log_q = SampleConcrete.apply(logits, lam.expand(3, 5), seed_tensor(8, device), False, 4, False)
    assert torch.isfinite(z).all() and (z >= 0).all() and torch.isfinite(log_q).all()
    assert (z[:, :, 0] == 0).any()  # the coldest latent's z underflows somewhere
    check_forward(z, log_q, logits, lam.double().cpu().expand(3, 5), 8, 4, dtype)
    (z.sum() + log_q.sum() + (z * torch.arange(9, device=device)).sum()).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_logits_at_tiny_temperatures(backend, dtype):
    """Only the logits' differences matter: each latent's largest logit is
    subtracted before the division by the temperature, so logits far above
    where logits / temperature overflows (float32: about 3e35 at 1e-3) give
    finite z, log q and gradients, equal to the float64 reference; NaN never
    passes. Equal huge logits give exactly the sample of zero logits."""
    _, device = backend
    top = 1e37 if dtype == torch.float32 else 1e306
    lam = torch.tensor([1e-3, 1e-2, 0.5], dtype=dtype, device=device).expand(2, 3).contiguous()
    # per latent: top * (1 - 2^-e) for e in 10..14, and one category masked in latent (1, 2)
    frac = torch.tensor([0.0, 2.0**-10, 2.0**-12, 2.0**-13, 2.0**-14], dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)[:, None]  # latent 1: all logits near -top
    logits = (top * sign * (1.0 - frac)).expand(2, 3, 5).clone()
    logits[1, 2, 3] = -math.inf
    logits = logits.to(dtype).to(device).requires_grad_()
    for hard in (False, True):
        z, log_q = SampleConcrete.apply(logits, lam, seed_tensor(4, device), hard, 3, False)
        assert torch.isfinite(z).all() and torch.isfinite(log_q).all()
        t = noise(4, 3, (2, 3, 5), dtype)
        a = logits.detach().double().cpu()
        z_ref, q_ref = described.concrete_terms(a, lam.double().cpu(), t)[:2]
        ok = a > -math.inf
        shifted = torch.where(ok, a - a.amax(-1, keepdim=True), 0.0)
        Y = ((shifted.abs() + t.log().abs() + 1.0) / lam.double().cpu()[..., None]).sum(-1, keepdim=True) + 1.0
        if hard:
            assert (z.double().cpu().argmax(-1) == z_ref.argmax(-1)).all()
        else:
            assert_close(z, z_ref, z_ref * Y, "z")
        assert_close(log_q, q_ref.sum(-1), (Y[..., 0] * 5 + 100.0).sum(-1), "log_q")
        (grad,) = torch.autograd.grad((z * torch.arange(5.0, dtype=dtype, device=device)).sum() + log_q.sum(),
                                      logits)
        assert torch.isfinite(grad).all() and (grad[1, 2, 3] == 0)
    # equal logits: y = -log t / lam whatever their common value, bit for bit
    big = torch.full((2, 3, 5), top, dtype=dtype, device=device)
    zero = torch.zeros(2, 3, 5, dtype=dtype, device=device)
    z_big, q_big = SampleConcrete.apply(big, lam, seed_tensor(9, device), False, 2, False)
    z_zero, q_zero = SampleConcrete.apply(zero, lam, seed_tensor(9, device), False, 2, False)
    torch.testing.assert_close(z_big, z_zero, rtol=0, atol=0)
    torch.testing.assert_close(q_big, q_zero, rtol=0, atol=0)
    assert (z_big > 0).any(dim=-1).all() and (z_big[..., 2, :] < 1).all()  # lam = 0.5: not one-hot


def test_masked_categories(backend):
    """-inf logits: z_c = 0 exactly, log q finite and equal to the Concrete
    density on the remaining categories (torch's, with those columns dropped);
    the masked logits get zero gradient. A latent with one category left is
    its one-hot with log q = 0."""
    _, device = backend
    logits = make_logits((2, 3, 5), 9, torch.float64, device).detach()
    mask = torch.zeros(2, 3, 5, dtype=torch.bool, device=device)
    mask[:, :, 1] = True
    mask[1, 2, :4] = True  # one category left
    logits = logits.masked_fill(mask, -math.inf).requires_grad_()
    z, log_q = fastvae.sample_concrete(logits, 0.6, n_samples=4)
    assert (z[:, mask] == 0).all() and torch.isfinite(log_q).all()
    assert (z[:, 1, 2, 4] == 1).all()
    keep = [0, 2, 3, 4]
    torch.manual_seed(3)
    z, log_q = fastvae.sample_concrete(logits[0], 0.6, n_samples=4)
    expected = td.Independent(td.RelaxedOneHotCategorical(torch.tensor(0.6, dtype=torch.float64, device=device),
                                                          logits=logits[0][:, keep].detach()), 1).log_prob(z[..., keep])
    assert_close(log_q, expected, expected.abs() + 100.0, "log_q")
    (z * torch.randn_like(z)).sum().add(log_q.sum()).backward()
    assert (logits.grad[mask] == 0).all() and torch.isfinite(logits.grad).all()
    assert (logits.grad[0][:, keep] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    """Half-precision logits compute in float32: z in their dtype, log q in float32."""
    _, device = backend
    logits = make_logits((4, 3, 6), 2, dtype, device, requires_grad=True)
    z, log_q = SampleConcrete.apply(logits, torch.full((4, 3), 0.5, device=device), seed_tensor(6, device), False,
                                    2, False)
    assert z.dtype == dtype and log_q.dtype == torch.float32
    t = noise(6, 2, (4, 3, 6), torch.float32)
    z_ref, q_ref = described.concrete_terms(logits.detach().double().cpu(), torch.full((4, 3), 0.5).double(), t)[:2]
    assert_close(z, z_ref, z_ref + 1e-3, "z")
    assert_close(log_q, q_ref.sum(-1), (q_ref.abs() + 10.0).sum(-1) * scales(logits, 0.5, t).sum((-1, -2)), "log_q")
    (z.float().sum() + log_q.sum()).backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()


def test_hard_gradient_is_the_relaxed_gradient(backend):
    _, device = backend
    logits = make_logits((3, 4, 7), 5, torch.float64, device, requires_grad=True)
    lam = torch.full((3, 4), 0.4, dtype=torch.float64, device=device)
    w = torch.randn(2, 3, 4, 7, dtype=torch.float64, device=device)
    grads = []
    for hard in (False, True):
        z, log_q = SampleConcrete.apply(logits, lam, seed_tensor(3, device), hard, 2, False)
        grads.append(torch.autograd.grad((z * w).sum() + log_q.sum(), logits)[0])
        if hard:
            assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == 1).all()
            z_soft = SampleConcrete.apply(logits, lam, seed_tensor(3, device), False, 2, False)[0]
            assert (z.argmax(-1) == z_soft.argmax(-1)).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_evaluation_layout_matches_the_reference(backend):
    """concrete_at at an offset not divisible by 4 and a row stride (the evaluation's layout)."""
    _, device = backend
    logits = make_logits((3, 2, 5), 11, torch.float32, device)
    lam = torch.full((3, 2), 0.8, device=device)
    z, log_q = concrete_at(logits, lam, seed_tensor(5, device), 4, False, offset0=7, sample_stride=10,
                           row_stride=4 * 10)
    zr = torch.empty(4, 3, 2, 5, dtype=torch.float64)
    qr = torch.empty(4, 3, dtype=torch.float64)
    described.sample_concrete_forward(logits.double().cpu(), lam.double().cpu(), 5, False, 7, 10, 40, zr, qr)
    assert_close(z, zr, zr * 100.0, "z")
    assert_close(log_q, qr, qr.abs() + 100.0, "log_q")


def test_empty_and_one_sample(backend):
    _, device = backend
    z, log_q = fastvae.sample_concrete(torch.zeros(0, 3, 4, device=device), 1.0, 2)
    assert z.shape == (2, 0, 3, 4) and log_q.shape == (2, 0)
    z, log_q = fastvae.sample_concrete(torch.zeros(3, 4, device=device), 1.0)
    assert z.shape == (3, 4) and log_q.shape == () and torch.isfinite(log_q)
    torch.testing.assert_close(z.sum(-1), torch.ones(3, device=device))


def test_generator_reproduces(backend):
    _, device = backend
    logits = torch.randn(2, 3, 4, device=device)
    a = fastvae.sample_concrete(logits, 0.5, 2, generator=torch.Generator().manual_seed(4))
    b = fastvae.sample_concrete(logits, 0.5, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_errors_name_the_argument():
    fastvae.set_value_checks("always")
    x = torch.zeros(2, 3, 4)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fastvae.sample_concrete(x, bad)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastvae.sample_concrete(x, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="temperature must not require grad"):
        fastvae.sample_concrete(x, torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="temperature of shape"):
        fastvae.sample_concrete(x, torch.ones(5))
    with pytest.raises(ValueError, match="logits must have C >= 2"):
        fastvae.sample_concrete(torch.zeros(2, 3, 1), 1.0)
    with pytest.raises(ValueError, match="logits must have shape"):
        fastvae.sample_concrete(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="logits must be finite or -inf"):
        fastvae.sample_concrete(torch.full((2, 3, 4), math.nan), 1.0)
    with pytest.raises(ValueError, match="logits must be finite or -inf"):
        fastvae.sample_concrete(x.index_fill(2, torch.tensor([0]), math.inf), 1.0)
    with pytest.raises(ValueError, match="logits has a latent with every category -inf"):
        fastvae.sample_concrete(torch.full((2, 3, 4), -math.inf), 1.0)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        fastvae.sample_concrete(torch.zeros(2, 3, 4, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="n_samples"):
        fastvae.sample_concrete(x, 1.0, 0)


def test_double_backward_is_a_named_error(backend):
    """create_graph=True: the first derivative is the kernel's (usable as a
    number); differentiating it again raises an error naming the op."""
    _, device = backend
    logits = make_logits((2, 3, 4), 6, torch.float64, device, requires_grad=True)
    z, log_q = fastvae.sample_concrete(logits, 0.5, 2, generator=torch.Generator().manual_seed(1))
    loss = (z.pow(2) * torch.arange(4, device=device)).sum() + log_q.sum()
    plain = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    (d,) = torch.autograd.grad(loss, logits, create_graph=True)
    torch.testing.assert_close(d, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"fastvae\.sample_concrete does not support double backward"):
        torch.autograd.grad((d**2).sum(), logits)


def test_compiles_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) traces sample_concrete (float and tensor
    temperatures, hard or not) and gives eager's values and gradients."""
    _, device = backend
    logits = make_logits((3, 4, 5), 12, torch.float32, device, requires_grad=True)
    lam = torch.full((3, 4), 0.7, device=device)
    w = torch.randn(2, 3, 4, 5).to(device)

    def f(a):
        z, log_q = fastvae.sample_concrete(a, 0.5, 2)
        z2, log_q2 = fastvae.sample_concrete(a, lam, 2, hard=True)
        return (z * w).sum() + log_q.sum() + (z2 * w).sum() + log_q2.sum(), z, z2

    from helpers import assert_compiled_matches_eager
    assert_compiled_matches_eager(f, (logits,), [logits])


def test_opcheck(backend):
    from fastvae.ops.sample_concrete.op import sample_concrete_backward_op, sample_concrete_op
    _, device = backend
    logits = make_logits((4, 3, 5), 6, torch.float32, device)
    lam = torch.full((4, 3), 0.6, device=device)
    seed = seed_tensor(2024, device)
    torch.library.opcheck(sample_concrete_op, (logits, lam, seed, False, 3))
    torch.library.opcheck(sample_concrete_op, (logits, lam, seed, True, 2))
    dz = torch.randn(3, 4, 3, 5, device=device)
    dq = torch.randn(3, 4, device=device)
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, dz, dq, False))
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, None, dq, True))
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, dz, None, False))
    log_p = torch.log_softmax(torch.randn(3, 5, device=device), -1)
    torch.library.opcheck(sample_concrete_op, (logits, lam, seed, False, 2, log_p))
    dk = torch.randn(4, device=device)
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, dz, dq, False, dk, log_p))
    torch.library.opcheck(sample_concrete_backward_op, (logits, lam, seed, None, None, False, dk, log_p))


# -- the analytic categorical KL (a prior log-pmf log_p) ----------------------------------


def torch_kl(logits, log_p):
    """What Concrete.kl_per_dim computed before the kernels did: the per-latent
    KL (..., L) in torch ops, pi = softmax(logits), where(pi > 0, ...)."""
    log_pi = torch.log_softmax(logits, -1)
    pi = torch.exp(log_pi)
    return torch.where(pi > 0, pi * (log_pi - log_p.to(log_pi.dtype)), 0.0).sum(-1)


def make_log_p(L, C, per_latent, data_seed, dtype, device, requires_grad=False):
    """A non-uniform normalized prior log-pmf, (C,) or (L, C)."""
    g = torch.Generator().manual_seed(data_seed + 3)
    shape = (L, C) if per_latent else (C,)
    lp = torch.log_softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, -1)
    return lp.to(dtype).to(device).requires_grad_(requires_grad)


def kl_scale(logits, log_p):
    """Per-row condition number of the KL: (sum_l sum_c pi_c (|log pi_c| + |log p_c| + 1) + 1) C."""
    a = logits.detach().double().cpu()
    lp = log_p.detach().double().cpu().expand(a.shape[-2:])
    log_pi = torch.log_softmax(a, -1)
    pi = torch.exp(log_pi)
    live = pi > 0
    t = torch.where(live, pi * (log_pi.abs() + torch.where(live, lp, 0.0).abs() + 1.0), 0.0)
    return (t.sum(-1).sum(-1) + 1.0) * a.shape[-1]


def test_the_kl_oracle_is_torch_s_and_its_closed_form_gradient_is_autograd_s():
    """concrete_kl equals torch's KL of the two Categoricals (and the torch
    formula Concrete used), a masked category adds 0, a prior -inf where pi > 0
    gives +inf; concrete_kl_grad is plain autograd of concrete_kl."""
    logits = make_logits((3, 4, 5), 1, torch.float64, "cpu", requires_grad=True)
    log_p = make_log_p(4, 5, True, 1, torch.float64, "cpu", requires_grad=True)
    kl = described.concrete_kl(logits, log_p)
    want = td.kl_divergence(td.Categorical(logits=logits), td.Categorical(logits=log_p))
    torch.testing.assert_close(kl, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, torch_kl(logits, log_p), rtol=1e-12, atol=1e-12)
    g = torch.randn(3, 4, dtype=torch.float64)
    da, dp = torch.autograd.grad(kl, (logits, log_p), g)
    ga, gp = described.concrete_kl_grad(logits.detach(), log_p.detach())
    torch.testing.assert_close(da, (g[..., None] * ga), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dp, (g[..., None] * gp).sum(0), rtol=1e-12, atol=1e-14)
    masked = logits.detach().clone()
    masked[:, 0, 2] = -math.inf
    lp = log_p.detach().clone()
    lp[0, 2] = -math.inf
    assert torch.isfinite(described.concrete_kl(masked, lp)).all()
    ga = described.concrete_kl_grad(masked, lp)[0]
    assert torch.isfinite(ga).all() and (ga[:, 0, 2] == 0).all()
    assert described.concrete_kl(logits.detach(), lp)[:, 0].eq(math.inf).all()


def kl_oracle(logits, lam, seed, K, dtype, log_p, stop_score=False):
    """(z, log q, kl) differentiable in the float64 logits and log_p."""
    z, log_q = oracle(logits, lam, seed, K, dtype, stop_score)
    return z, log_q, described.concrete_kl(logits, log_p).sum(-1)


@float_dtype_examples(EXAMPLES, problem=problems(), hard=st.booleans(), stop_score=st.booleans(),
                      per_latent=st.booleans(), masked=st.booleans())
def test_kl_matches_the_oracle_forward_and_backward(backend, dtype, problem, hard, stop_score, per_latent, masked):
    """With a prior log-pmf ((C,) or (L, C), non-uniform) the op adds the
    analytic KL per row (no sample dimension) and its gradient; z and log q
    keep the bits they have without it."""
    check_with_kl(backend[1], dtype, problem, hard, stop_score, per_latent, masked)


def check_with_kl(device, dtype, problem, hard, stop_score, per_latent, masked, forward=False):
    """test_kl_matches_the_oracle_forward_and_backward's checks of one
    problem (batch, L, C, K, data seed, temperature); with ``forward`` also z
    and log q against the oracle (check_forward)."""
    batch, L, C, K, data_seed, lam = problem
    logits = make_logits((*batch, L, C), data_seed, dtype, device)
    stop_score = stop_score and not masked  # the test's stop-score oracle (log_softmax) takes no mask
    if masked and logits.numel():
        logits.view(-1, C)[::2, C // 2] = -math.inf  # every other latent has a masked category
    logits.requires_grad_()
    log_p = make_log_p(L, C, per_latent, data_seed, dtype, device)
    seed = data_seed * 7 + 1
    temperature = torch.full((*batch, L), lam, dtype=dtype, device=device)
    z, log_q, kl = SampleConcrete.apply(logits, temperature, seed_tensor(seed, device), hard, K, stop_score,
                                        log_p.expand(L, C))
    z0, log_q0 = SampleConcrete.apply(logits, temperature, seed_tensor(seed, device), hard, K, stop_score)
    assert torch.equal(z, z0) and torch.equal(log_q, log_q0)
    assert kl.shape == batch and kl.dtype == dtype
    if forward:
        check_forward(z, log_q, logits, lam, seed, K, dtype, hard)
    a = logits.detach().double().cpu().requires_grad_()
    z_ref, q_ref, kl_ref = kl_oracle(a, lam, seed, K, dtype, log_p.double().cpu(), stop_score)
    assert_close(kl, kl_ref, kl_scale(a, log_p), "kl")
    assert_close(kl, torch_kl(logits.detach(), log_p).sum(-1), kl_scale(a, log_p), "kl (torch's formula)")
    g = torch.Generator().manual_seed(data_seed + 2)
    gz = torch.randn((K, *batch, L, C), generator=g, dtype=torch.float64).to(dtype)
    gq = torch.randn((K, *batch), generator=g, dtype=torch.float64).to(dtype)
    gk = torch.randn(batch, generator=g, dtype=torch.float64).to(dtype)
    (got,) = torch.autograd.grad((z, log_q, kl), (logits,), (gz.to(device), gq.to(device), gk.to(device)),
                                 retain_graph=True)
    (want,) = torch.autograd.grad((z_ref, q_ref, kl_ref), (a,), (gz.double(), gq.double(), gk.double()),
                                  retain_graph=True)
    # the KL's alone, against the oracle and against autograd of torch's formula
    (got_kl,) = torch.autograd.grad(kl, (logits,), gk.to(device))
    (want_kl,) = torch.autograd.grad(kl_ref, (a,), gk.double())
    b = logits.detach().double().cpu().requires_grad_()
    (torch_grad,) = torch.autograd.grad(torch_kl(b, log_p.double().cpu()).sum(-1), (b,), gk.double())
    t = noise(seed, K, a.shape, dtype)
    Y = scales(a, lam, t)
    zd = z_ref.detach()
    gza, gqa = gz.double().abs(), gq.double().abs()[..., None, None]
    pi = torch.softmax(a.detach(), -1)
    k_scale = gk.double().abs()[..., None, None] * pi * (kl_scale(a, log_p)[..., None, None] + 1.0)
    scale = ((zd * (gza + (zd * gza).sum(-1, keepdim=True)) * Y + gqa * (C * zd * Y + C * lam + lam + 2.0)).sum(0)
             / lam + k_scale + 1e-300)
    assert got.dtype == dtype
    assert_close(got, want, scale, "dlogits")
    assert_close(got_kl, want_kl, k_scale + 1e-300, "dlogits (the KL's)")
    if not masked:  # torch's formula: a masked category's 0 * inf makes its latent's gradient NaN
        assert_close(got_kl, torch_grad, k_scale + 1e-300, "dlogits (torch's formula)")
    if masked and logits.numel():
        assert (got_kl.reshape(-1, C)[::2, C // 2] == 0).all()


# -- the Triton forward's tiles (fastvae/ops/sample_concrete/triton.py) --------------------
# (batch, L, C, K, tile): the tile (elements, on the GPU and under the interpreter
# alike) shrunk so that small problems take each of the forward's forms.
TILE_CASES = [
    pytest.param((5,), 7, 5, 1, 64, id="two-latent-chunks-two-rows-a-program"),  # BLOCK_L 4 < L, the last chunk
    # and program part dead
    pytest.param((1,), 37, 16, 3, 64, id="one-row-ten-chunks"),  # BLOCK_L 4, BLOCK_R 1
    pytest.param((3, 2), 3, 33, 2, 64, id="a-latent-a-tile"),  # BLOCK_C 64 = the tile: BLOCK_L 1
    pytest.param((2,), 5, 100, 1, 64, id="large-C"),  # BLOCK_C 128 > the tile: one latent, a loop over L
    pytest.param((9,), 30, 10, 1, 512, id="gpu-tile-(9,30,10)"),  # the GPU's: a row a program, L whole
    pytest.param((3,), 5, 3, 2, 512, id="gpu-tile-rows-share"),  # the GPU's: 16 rows of 8 x 4 a program
]


@pytest.fixture
def concrete_tile(request, monkeypatch):
    """Sets the Triton kernels' tile (GPU and interpreter) to request.param."""
    kernels = pytest.importorskip("fastvae.ops.sample_concrete.triton")
    monkeypatch.setattr(kernels, "TILE", request.param)
    monkeypatch.setattr(kernels, "INTERPRETER_TILE", request.param)
    concrete_op.PLANS.clear()  # the plans hold the geometry they were made with
    yield request.param
    concrete_op.PLANS.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,L,C,K,concrete_tile", TILE_CASES, indirect=["concrete_tile"])
def test_triton_tiles_match_the_oracle(backend, batch, L, C, K, concrete_tile, dtype):
    """Every form of the Triton forward's tile (latent chunks, rows sharing a
    program, a latent a tile, large C) against the float64 oracle, forward
    (z, log q, KL) and backward, relaxed and hard, with masked categories and
    a per-latent prior; the stop-score backward on the unmasked logits."""
    name, device = backend
    if name != "triton":
        pytest.skip("the tile is the Triton kernels'")
    for hard, stop_score, per_latent, masked in ((False, False, True, True), (True, False, False, True),
                                                 (False, True, True, False)):
        check_with_kl(device, dtype, (batch, L, C, K, 41 + L, 0.5), hard, stop_score, per_latent, masked,
                      forward=True)


def test_triton_tiles_keep_the_bits_of_z():
    """z's bits do not follow the tile (each element keeps its Philox offset):
    the same draw at four tiles; log q, the KL and the backward within
    rounding (their sums change order)."""
    kernels = pytest.importorskip("fastvae.ops.sample_concrete.triton")
    if INTERPRET:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        pytest.skip("the Triton kernels run under the interpreter or on a GPU")
    logits = make_logits((6, 13, 11), 4, torch.float32, device)
    logits[0, 0, 3] = -math.inf
    lam = torch.full((6, 13), 0.7, device=device)
    log_p = make_log_p(13, 11, True, 4, torch.float32, device)
    g = torch.Generator().manual_seed(5)
    gz, gq, gk = (torch.randn(shape, generator=g).to(device) for shape in ((2, 6, 13, 11), (2, 6), (6,)))
    outs, tiles = [], (kernels.TILE, kernels.INTERPRETER_TILE)
    for tile in (16, 64, 512, 1 << 14):
        kernels.TILE = kernels.INTERPRETER_TILE = tile
        try:
            z = torch.full((2, 6, 13, 11), math.nan, device=device)
            q = torch.full((2, 6), math.nan, device=device)
            kl = torch.full((6,), math.nan, device=device)
            kernels.sample_concrete_forward(logits, lam, seed_tensor(9, device), False, 5, 6 * 13 * 11, 13 * 11, z, q,
                                            log_p, kl)
            dz = torch.full_like(logits, math.nan)
            kernels.sample_concrete_backward(gz, gq, logits, lam, seed_tensor(9, device), False, dz, gk, log_p)
        finally:
            kernels.TILE, kernels.INTERPRETER_TILE = tiles
        assert not (z.isnan().any() or q.isnan().any() or kl.isnan().any() or dz.isnan().any())
        outs.append((z, q, kl, dz))
    for z, q, kl, dz in outs[1:]:
        assert torch.equal(z, outs[0][0])
        torch.testing.assert_close(q, outs[0][1], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(kl, outs[0][2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dz, outs[0][3], rtol=1e-5, atol=1e-6)  # a row's sums may change order on a GPU


def test_triton_geometry_fills_an_h100():
    """The GPU launch's program counts, a function of the shape alone (nothing
    launched): a Gumbel-softmax VAE's sampler (100, 30, 10) runs its K N = 100
    rows at once, one program each, and (4096, 32, 16) at least 2 programs per
    SM of an H100 (132 SMs); the backward's latents at (100, 30, 10) run in
    tiles of 32 latents (94 programs, 24 with the forward's former tile).
    The block shapes follow L and C only (no variant per batch size)."""
    kernels = pytest.importorskip("fastvae.ops.sample_concrete.triton")
    sms = 132
    for N, L, C in ((100, 30, 10), (4096, 32, 16)):
        programs, meta = kernels.forward_geometry(1, N, L, C)
        assert programs >= min(2 * sms, N), (N, L, C, programs)
        assert meta["BLOCK_L"] >= L and meta["num_warps"] >= 4
        assert meta["BLOCK_R"] * meta["BLOCK_L"] * meta["BLOCK_C"] <= kernels.TILE
        for K, M in ((5, 17), (50, 1023)):
            assert kernels.forward_geometry(K, M, L, C)[1] == meta
    assert kernels.forward_geometry(1, 100, 30, 10)[0] == 100
    assert kernels.backward_geometry(100, 30, 10) == (94, dict(BLOCK_J=32, BLOCK_C=16, num_warps=4, maxnreg=128))
    assert kernels.backward_geometry(4096, 32, 16)[0] >= 2 * sms
    # L longer than the tile holds: chunks of latents; C more than it holds: one latent a tile, 8 warps
    assert kernels.forward_geometry(1, 100, 200, 10)[1] == dict(BLOCK_R=1, BLOCK_L=32, BLOCK_C=16, num_warps=4)
    assert kernels.forward_geometry(1, 100, 30, 2000)[1] == dict(BLOCK_R=1, BLOCK_L=1, BLOCK_C=2048, num_warps=8)
    # the interpreter's tile: few programs
    assert kernels.forward_geometry(1, 100, 30, 10, "cpu")[0] == 4
    with pytest.raises(ValueError, match="C = 16385"):
        kernels.forward_geometry(1, 2, 3, kernels.MAX_C + 1)


@pytest.mark.parametrize("per_latent", [False, True], ids=["(C,)", "(L,C)"])
def test_a_learned_prior_gets_its_gradient(backend, per_latent):
    """log_p requiring grad (a learned prior): d log_p = -sum over rows of
    grad_kl pi, summed back to log_p's shape; the Python Function serves it
    (the C++ operator takes fixed priors only)."""
    _, device = backend
    L, C = 3, 5
    logits = make_logits((4, 2, L, C), 8, torch.float64, device, requires_grad=True)
    raw = make_log_p(L, C, per_latent, 8, torch.float64, device, requires_grad=True)
    log_p = torch.log_softmax(raw, -1)
    z, log_q, kl = fastvae.sample_concrete(logits, 0.5, 2, generator=gen(3), log_p=log_p)
    assert "SampleConcrete" in kl.grad_fn.name() and "CppNode" not in kl.grad_fn.name()
    gk = torch.randn(4, 2, dtype=torch.float64, device=device)
    got = torch.autograd.grad(kl, (logits, raw), gk)
    a, r = logits.detach().cpu().requires_grad_(), raw.detach().cpu().requires_grad_()
    want = torch.autograd.grad(described.concrete_kl(a, torch.log_softmax(r, -1)).sum(-1), (a, r), gk.cpu())
    for x, y, name in zip(got, want, ("dlogits", "dlog_p")):
        assert_close(x, y, y.abs() + 1.0, name)


def test_kl_at_extreme_logits_and_a_prior_that_rules_a_category_out(backend):
    """Logits of 1e30 (float32: the shifted softmax stays finite), a masked
    category beside a prior that rules it out (adds 0), and a prior log p = -inf
    where pi > 0 (+inf, as torch's formula gives); a one-row batch."""
    _, device = backend
    C = 4
    logits = torch.tensor([[[1e30, -1e30, 0.0, -math.inf], [-3.0, 50.0, -50.0, -math.inf]]], device=device)
    log_p = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], device=device))
    log_p_ruled = log_p.clone()
    log_p_ruled[3] = -math.inf
    lam = torch.full((1, 2), 0.3, device=device)
    for lp in (log_p, log_p_ruled):
        a = logits.clone().requires_grad_()
        z, log_q, kl = SampleConcrete.apply(a, lam, seed_tensor(4, device), False, 1, False, lp.expand(2, C))
        want = described.concrete_kl(logits.double().cpu(), lp.double().cpu()).sum(-1)
        assert torch.isfinite(want).all()
        assert_close(kl, want, kl_scale(logits, lp), "kl")
        (g,) = torch.autograd.grad(kl.sum(), a)
        gw = described.concrete_kl_grad(logits.double().cpu(), lp.double().cpu())[0]
        assert_close(g, gw, gw.abs() + 1.0, "dlogits")
        assert g[0, 0, 3] == 0
    ruled = log_p.clone()
    ruled[1] = -math.inf
    kl = SampleConcrete.apply(logits, lam, seed_tensor(4, device), False, 1, False, ruled.expand(2, C))[2]
    assert kl.item() == math.inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kl_in_half_precision(backend, dtype):
    """Half-precision logits: the KL in float32 against the oracle of the rounded logits."""
    _, device = backend
    logits = make_logits((3, 4, 6), 2, dtype, device, requires_grad=True)
    log_p = make_log_p(4, 6, True, 2, torch.float32, device)
    z, log_q, kl = SampleConcrete.apply(logits, torch.full((3, 4), 0.5, device=device), seed_tensor(6, device),
                                        False, 2, False, log_p)
    assert kl.dtype == torch.float32 and kl.shape == (3,)
    a = logits.detach().double().cpu().requires_grad_()
    want = described.concrete_kl(a, log_p.double().cpu()).sum(-1)
    assert_close(kl, want, kl_scale(a, log_p) * 10, "kl")
    gk = torch.randn(3, dtype=torch.float64)
    (got,) = torch.autograd.grad(kl, logits, gk.float().to(device))
    (ref,) = torch.autograd.grad(want, a, gk)
    assert got.dtype == dtype
    assert_close(got, ref.to(dtype), ref.abs() + 1e-2, "dlogits")


def test_the_public_function_takes_log_p_and_checks_it(backend):
    """fastvae.sample_concrete(log_p=...) returns (z, log q, kl), z and log q
    those of the call without it; a bad log_p is refused by name."""
    _, device = backend
    logits = make_logits((5, 3, 4), 9, torch.float32, device)
    log_p = make_log_p(3, 4, False, 9, torch.float32, device)
    for K in (None, 1, 3):
        z, log_q, kl = fastvae.sample_concrete(logits, 0.5, K, generator=gen(2), log_p=log_p)
        z0, log_q0 = fastvae.sample_concrete(logits, 0.5, K, generator=gen(2))
        assert torch.equal(z, z0) and torch.equal(log_q, log_q0) and kl.shape == (5,)
        assert_close(kl, torch_kl(logits.double(), log_p.double()).sum(-1), kl_scale(logits, log_p), "kl")
    for shape in ((0, 3, 4), (2, 0, 4)):  # no rows; no latents (a KL of 0)
        a = torch.zeros(shape, device=device, requires_grad=True)
        z, log_q, kl = fastvae.sample_concrete(a, 0.5, 2, log_p=log_p)
        assert kl.shape == shape[:1] and (kl == 0).all()
        (kl.sum() + log_q.sum()).backward()
        assert a.grad.shape == shape
    fastvae.set_value_checks("always")
    with pytest.raises(ValueError, match="log_p must be a prior log-pmf of shape"):
        fastvae.sample_concrete(logits, 0.5, log_p=torch.zeros(5, device=device))
    with pytest.raises(ValueError, match="log_p must be a prior log-pmf of shape"):
        fastvae.sample_concrete(logits, 0.5, log_p=torch.zeros(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="log_p must be finite or -inf"):
        fastvae.sample_concrete(logits, 0.5, log_p=torch.full((4,), math.nan, device=device))
    with pytest.raises(TypeError, match="log_p must be a floating-point"):
        fastvae.sample_concrete(logits, 0.5, log_p=torch.zeros(4, dtype=torch.int64, device=device))


@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
def test_kl_compiles_across_batch_sizes_and_sample_counts(backend):
    """torch.compile(fullgraph=True) with a prior log-pmf, as the batch (B,
    B - 2, B) and the sample count change between calls: eager's values and
    gradients."""
    _, device = backend
    logits = make_logits((7, 3, 5), 12, torch.float32, device)
    log_p = make_log_p(3, 5, True, 12, torch.float32, device)

    def f(a, K):
        z, log_q, kl = fastvae.sample_concrete(a, 0.7, K, log_p=log_p)
        return (z * torch.arange(5.0, device=a.device)).sum() + log_q.sum() + 2.0 * kl.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for rows, K in ((7, 2), (5, 2), (7, 2), (7, 1), (7, 3)):
        a = logits[:rows].detach().requires_grad_()
        results = []
        for fn in (f, compiled):
            torch.manual_seed(rows + K)
            value = fn(a, K)
            results.append((value, torch.autograd.grad(value, a)[0]))
        (v, g), (cv, cg) = results
        torch.testing.assert_close(cv, v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cg, g, rtol=1e-5, atol=1e-6)


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing. Its double backward is refused by name (not_twice):
# tests/test_double_backward.py tests the error, so it has no double_backward_cases.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(lambda a: fastvae.sample_concrete(a, 0.5, K), (B, L, 5))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (the backward sums over samples)."""
    logits = leaf(5000, 8, 4)
    return [lambda: run(lambda a: fastvae.sample_concrete(a, 0.5, 4, generator=gen(2)), logits)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    logits = leaf(3, 4, 3)
    return lambda: run(lambda a: fastvae.sample_concrete(a, 0.5, 5, generator=gen(1)), logits)


def compile_cases(mu, lv):
    """tests/test_compile.py: (name, function, float inputs) whose compiled graph
    calls the C++ twins, forward and backward (mu, read as logits: (5, 2, 3))."""
    return [
        ("sample_concrete", lambda a: fastvae.sample_concrete(a, 0.5, 3), (mu,)),
        ("sample_concrete (hard)", lambda a: fastvae.sample_concrete(a, 2.0, hard=True), (mu,)),
        ("sample_concrete (kl)",
         lambda a: fastvae.sample_concrete(a, 0.5, 2, log_p=torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=a.dtype))),
         (mu,)),
    ]


def twin_op_cases(m2, l2):
    """tests/test_torch_ops.py: (twin, arguments) in the Python op's layout, each
    checked bit for bit against fastvae::<twin> and by opcheck (m2, l2: (12, 6),
    read here as logits (4, 3, 6) and a temperature (4, 3))."""
    logits, lam, seed = m2.reshape(4, 3, 6), l2[:, 0].reshape(4, 3).exp(), torch.tensor(2024)
    return [
        ("sample_concrete", (logits, lam, seed, False, 3)),
        ("sample_concrete", (logits, lam, seed, True, 1)),
        ("sample_concrete_backward", (logits, lam, seed, torch.randn(3, 4, 3, 6), torch.randn(3, 4), False)),
        ("sample_concrete_backward", (logits, lam, seed, None, torch.randn(2, 4), True)),
        ("sample_concrete_backward", (logits, lam, seed, torch.randn(2, 4, 3, 6), None, False)),
        ("sample_concrete", (logits, lam, seed, False, 2, torch.log_softmax(m2[:3], -1))),
        ("sample_concrete_backward", (logits, lam, seed, torch.randn(2, 4, 3, 6), torch.randn(2, 4), False,
                                      torch.randn(4), torch.log_softmax(m2[:3], -1))),
        ("sample_concrete_backward", (logits, lam, seed, None, None, False, torch.randn(4),
                                      torch.log_softmax(m2[:3], -1))),
    ]


# -- the eager C++ operator (fastvae_cpp::sample_concrete) -----------------------------

needs_torch_ops = pytest.mark.skipif(
    not fastvae._backend.cpp_available() or not fastvae._backend.cpp_module().HAS_TORCH_OPS,
    reason="built without torch headers: no C++ operators")


def _draw_with_grads(logits, temperature, K, hard, stop_score):
    """(z, log q, dlogits, the node's name) of one seeded draw and backward."""
    from fastvae.ops.sample_concrete.op import check_args, sample_concrete_unchecked
    a = logits.detach().clone().requires_grad_()
    torch.manual_seed(5)
    z, log_q = sample_concrete_unchecked(a, check_args(a, temperature), K, hard, stop_score, None)
    g = torch.Generator().manual_seed(6)
    gz, gq = torch.randn(z.shape, generator=g, dtype=z.dtype), torch.randn(log_q.shape, generator=g, dtype=z.dtype)
    ((z * gz).sum() + (log_q * gq).sum()).backward()
    return z.detach(), log_q.detach(), a.grad, z.grad_fn.name()


@needs_torch_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hard,stop_score", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shape,K,temperature", [((100, 30, 10), None, 0.5), ((100, 30, 10), 1, 0.5),
                                                 ((3, 4, 5, 2), 3, 1e-3),
                                                 ((7, 16), 2, "tensor"), ((0, 3, 4), 2, 1.0)])
def test_eager_cpu_calls_take_the_cpp_operator_with_the_functions_bits(monkeypatch, dtype, hard, stop_score, shape,
                                                                        K, temperature):
    """On the cpp backend an eager float32/float64 CPU call runs the C++
    operator, whose values and gradients equal the Python Function's bit for
    bit (same kernels), with masked categories, a per-latent temperature and
    non-contiguous logits; n_samples None gives one sample with no sample
    dimension either way."""
    fastvae._backend.set_backend(None)
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(*shape, generator=g, dtype=dtype) * 3).transpose(-1, -2).contiguous().transpose(-1, -2)
    if logits.numel():
        logits[..., 0, 1] = -math.inf
    if temperature == "tensor":
        temperature = torch.rand(shape[:-1], generator=g, dtype=dtype) + 0.1
    ours = _draw_with_grads(logits, temperature, K, hard, stop_score)
    monkeypatch.setattr(fastvae._backend, "torch_ops", lambda *t: None)
    function = _draw_with_grads(logits, temperature, K, hard, stop_score)
    assert "CppNode" in ours[3] and "SampleConcrete" in ours[3] and "CppNode" not in function[3]
    for a, b in zip(ours[:3], function[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    samples = () if K is None else (K,)
    assert ours[0].shape == (*samples, *shape) and ours[1].shape == (*samples, *shape[:-2])


@needs_torch_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [None, 1, 3])
@pytest.mark.parametrize("per_latent", [False, True], ids=["(C,)", "(L,C)"])
def test_the_cpp_operator_gives_the_kl_with_the_functions_bits(monkeypatch, dtype, K, per_latent):
    """With a (fixed) prior log-pmf the eager C++ operator's z, log q, kl and
    gradients equal the Python Function's bit for bit, masked category included."""
    from fastvae.ops.sample_concrete.op import check_args, sample_concrete_unchecked
    fastvae._backend.set_backend(None)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 4, 5, generator=g, dtype=dtype) * 3
    logits[0, 1, 2] = -math.inf
    log_p = make_log_p(4, 5, per_latent, 3, dtype, "cpu")

    def draw():
        a = logits.clone().requires_grad_()
        torch.manual_seed(5)
        z, log_q, kl = sample_concrete_unchecked(a, check_args(a, 0.5), K, False, False, None, log_p)
        gz, gq, gk = (torch.randn(t.shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
                      for t in (z, log_q, kl))
        ((z * gz).sum() + (log_q * gq).sum() + (kl * gk).sum()).backward()
        return z.detach(), log_q.detach(), kl.detach(), a.grad, kl.grad_fn.name()

    ours = draw()
    monkeypatch.setattr(fastvae._backend, "torch_ops", lambda *t: None)
    function = draw()
    assert "CppNode" in ours[4] and "CppNode" not in function[4]
    for a, b in zip(ours[:4], function[:4]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert ours[2].shape == (9,)


@needs_torch_ops
@pytest.mark.parametrize("stop_score", [False, True])
@pytest.mark.parametrize("K", [None, 3])
def test_the_cpp_operators_backward_reads_the_relaxed_z_with_the_functions_bits(monkeypatch, stop_score, K):
    """The eager operator's backward reads the forward's relaxed z instead of
    regenerating the noise: a gradient through z alone (which the stop-score
    term does not touch) equals the Python Function's, which regenerates,
    bit for bit, masked category included. The z it reads cannot change
    under it: an in-place write to the returned z is refused."""
    fastvae._backend.set_backend(None)
    logits = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(8)) * 2
    logits[1, 2, 3] = -math.inf

    def grad():
        a = logits.clone().requires_grad_()
        torch.manual_seed(2)
        z, _ = fastvae.ops.sample_concrete.op.sample_concrete_unchecked(
            a, torch.full(a.shape[:-1], 0.7), K, False, stop_score, None)
        (z * torch.linspace(-1, 1, z.numel()).reshape(z.shape)).sum().backward()
        return a.grad

    ours = grad()
    monkeypatch.setattr(fastvae._backend, "torch_ops", lambda *t: None)
    assert torch.equal(ours, grad()) and torch.isfinite(ours).all() and ours[1, 2, 3] == 0
    monkeypatch.undo()
    fastvae._backend.set_backend(None)
    a = logits.clone().requires_grad_()
    z, _ = fastvae.sample_concrete(a, 0.7)
    with pytest.raises(RuntimeError, match="inplace"):
        z.mul_(2.0)


@needs_torch_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stop_score", [False, True])
def test_the_backward_twin_given_z_keeps_the_bits_and_passes_opcheck(dtype, stop_score):
    """fastvae_cpu::sample_concrete_backward handed the forward's relaxed z
    (what the compiled graph passes) gives what fastvae::sample_concrete_backward,
    which regenerates the noise, gives, bit for bit (a masked category
    included), and torch.library.opcheck passes with z."""
    fastvae._backend.set_backend(None)
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(4, 3, 6, generator=g) * 2).to(dtype)
    logits[1, 2, 0] = -math.inf
    lam, seed = (torch.rand(4, 3, generator=g) + 0.3).to(dtype), torch.tensor(2024)
    z = torch.ops.fastvae.sample_concrete(logits, lam, seed, False, 3)[0]
    gz, gq = torch.randn(3, 4, 3, 6, generator=g).to(dtype), torch.randn(3, 4, generator=g).to(dtype)
    want = torch.ops.fastvae.sample_concrete_backward(logits, lam, seed, gz, gq, stop_score)
    got = torch.ops.fastvae_cpu.sample_concrete_backward(logits, lam, seed, gz, gq, stop_score, None, None, z)
    assert got.dtype == want.dtype and torch.equal(got, want) and torch.isfinite(got).all()
    torch.library.opcheck(torch.ops.fastvae_cpu.sample_concrete_backward.default,
                          (logits, lam, seed, gz, gq, stop_score, None, None, z))
    with pytest.raises(RuntimeError, match="z: expected the forward's relaxed z"):  # refused by name
        torch.ops.fastvae_cpu.sample_concrete_backward(logits, lam, seed, gz, gq, stop_score, None, None, z[:2])


@needs_torch_ops
@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process (as test_compile.py)")
@pytest.mark.parametrize("hard", [False, True])
def test_the_compiled_backward_reads_the_relaxed_z(hard):
    """Under torch.compile on the CPU the graph's backward twin is handed the
    forward's relaxed z (none when hard: the one-hot is not it), and the
    gradients equal eager's bit for bit as the batch and K change."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    fastvae._backend.set_backend(None)
    seen = []

    def backward_graph(gm, example_inputs):
        seen.extend(n for n in gm.graph.nodes if n.target is torch.ops.fastvae_cpu.sample_concrete_backward.default)
        return make_boxed_func(gm)

    def f(a, K):
        z, log_q = fastvae.sample_concrete(a, 0.6, K, hard=hard)
        return (z * torch.linspace(-1, 1, z.shape[-1])).sum() + log_q.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm),
                                                                     bw_compiler=backward_graph))
    logits = torch.randn(9, 4, 6, generator=torch.Generator().manual_seed(3)) * 2
    logits[2, 1, 0] = -math.inf
    for rows, K in ((9, 2), (7, 2), (9, 1)):
        grads = []
        for fn in (f, compiled):
            a = logits[:rows].clone().requires_grad_()
            torch.manual_seed(rows + K)
            grads.append(torch.autograd.grad(fn(a, K), a)[0])
        assert torch.equal(grads[0], grads[1]) and torch.isfinite(grads[0]).all()
    assert seen
    for node in seen:
        z = node.kwargs.get("z", node.args[8] if len(node.args) > 8 else None)
        assert (z is None) == hard, node.format_node()


@needs_torch_ops
def test_the_cpp_operator_refuses_a_double_backward_as_the_function_does(monkeypatch):
    """create_graph=True gives the kernel's gradient, and differentiating it
    again raises the Python Function's error, by name."""
    logits = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    messages = []
    for path in ("cpp", "function"):
        if path == "function":
            monkeypatch.setattr(fastvae._backend, "torch_ops", lambda *t: None)
        messages.append(_second_backward_error(logits, 1, lambda z, _: (z * torch.arange(5.0, dtype=z.dtype)).sum()))
    _assert_same_double_backward_error(*messages)


def _second_backward_error(logits, seed, loss_of):
    """The first line of the error a second backward through a
    create_graph=True gradient of ``loss_of(z, log_q)`` raises (the first
    gives a gradient that requires grad)."""
    z, log_q = fastvae.sample_concrete(logits, 0.5, generator=gen(seed))
    (d,) = torch.autograd.grad(loss_of(z, log_q), logits, create_graph=True)
    assert d.requires_grad
    with pytest.raises(RuntimeError) as err:
        d.sum().backward()
    return str(err.value).splitlines()[0]


def _assert_same_double_backward_error(first, second):
    assert "fastvae.sample_concrete does not support double backward" in first
    assert first == second


@needs_torch_ops
def test_the_cpp_operator_checks_its_arguments():
    """The boundary's checks by name (the public function's own checks run first)."""
    op = torch.ops.fastvae_cpp.sample_concrete
    logits = torch.zeros(4, 3, 5)
    lam = torch.ones(4, 3)
    with pytest.raises(RuntimeError, match="temperature: expected shape"):
        op(logits, torch.ones(4, 5), 1, False, 1, False)
    with pytest.raises(RuntimeError, match="temperature: expected dtype"):
        op(logits, lam.double(), 1, False, 1, False)
    with pytest.raises(RuntimeError, match="logits: the cpp backend supports float32 and float64"):
        op(logits.half(), lam, 1, False, 1, False)
    with pytest.raises(RuntimeError, match="logits: expected a tensor"):
        op(torch.zeros(5), torch.ones(()), 1, False, 1, False)
    with pytest.raises(RuntimeError, match="n_samples must be >= 1"):
        op(logits, lam, 1, False, 0, False)
    with pytest.raises(RuntimeError, match="seed must be >= 0"):
        op(logits, lam, -1, False, 1, False)
    with pytest.raises(RuntimeError, match="seed: expected a 0-d int64 CPU tensor"):
        torch.ops.fastvae_cpu.sample_concrete(logits, lam, torch.tensor(1.0), False, 1)
    with pytest.raises(ValueError, match="logits must be finite or -inf"):
        fastvae.sample_concrete(torch.full((4, 3, 5), math.nan, requires_grad=True), 0.5)


# -- the plans (op.py): eager calls on the triton backend ------------------------------
# The planned path launches the general path's kernel variants (triton.py's
# forward_launch / backward_launch) on the same inputs, so its values and
# gradients are the general path's bit for bit, under the interpreter (which
# runs each Launch through kernel.run, checking its grid, meta and argument
# order) and on a GPU. About 1 ms an interpreted program: few, small calls.

plan_device = plan_device_fixture(concrete_op)


def planned_and_general(monkeypatch, device, shape, dtype, n_samples, hard, stop_score, prior, masked,
                        public=True):
    """[(outputs, dlogits) of the planned path, of the general path] of one
    call (the public function, or sample_concrete_unchecked as the latents
    call it) on the same logits with the same seed; the loss weighs every
    output, so each gradient's kernel term is taken."""
    L, C = shape[-2:]
    logits = make_logits(shape, 7, dtype, device, requires_grad=True)
    if masked:
        with torch.no_grad():
            logits[..., 0, 1] = -math.inf
    log_p = None if prior is None else make_log_p(L, C, prior == "per-latent", 7, dtype, device)
    lam = torch.full(shape[:-1], 0.6, dtype=dtype, device=device)
    out = []
    for enabled in (True, False):
        monkeypatch.setattr(concrete_op, "ENABLED", enabled)
        if public:
            res = fastvae.sample_concrete(logits, 0.6, n_samples, hard=hard, generator=gen(11), log_p=log_p)
        else:
            res = sample_concrete_unchecked(logits, lam, n_samples, hard, stop_score, gen(11), log_p)
        g = torch.Generator().manual_seed(2)
        loss = sum((r * torch.randn(r.shape, generator=g, dtype=torch.float64).to(dtype).to(device)).sum()
                   for r in res)
        d, = torch.autograd.grad(loss, logits)
        out.append((res, d))
    return out


def assert_same(a, b):
    """Bit for bit (the same kernels on the same inputs), no NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape and not torch.isnan(a).any()
    assert torch.equal(a, b)


PLAN_CASES = [  # (shape, n_samples, hard, stop_score, prior, masked, public)
    pytest.param((4, 3, 5), None, False, False, None, False, True, id="relaxed"),
    pytest.param((2, 3, 3, 5), 3, True, False, "shared", True, True, id="hard-K3-shared-prior-masked"),
    pytest.param((4, 3, 5), 3, False, True, "per-latent", False, False, id="stop-score-K3-per-latent"),
    pytest.param((1, 6, 4), None, True, True, "shared", True, False, id="one-row-hard-stop-score"),
    pytest.param((4, 3, 5), None, False, False, "per-latent", True, False, id="unchecked-per-latent-masked"),
]


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, n_samples, hard, stop_score, prior, masked, public", PLAN_CASES)
def test_planned_path_equals_the_general_path(plan_device, monkeypatch, dtype, shape, n_samples, hard, stop_score,
                                              prior, masked, public):
    """The plan's launches give the general path's z, log q, KL and
    gradients bit for bit, from the signature's first call (which makes the
    plan) and from its second (which finds it); one plan serves both."""
    for _ in range(2):
        (res, d), (res0, d0) = planned_and_general(monkeypatch, plan_device, shape, dtype, n_samples, hard,
                                                   stop_score, prior, masked, public)
        assert len(res) == len(res0) == (2 if prior is None else 3)
        for a, b in zip((*res, d), (*res0, d0)):
            assert_same(a, b)
        assert type(res[0].grad_fn).__name__ == "PlannedSampleConcreteBackward"
        assert len(concrete_op.PLANS) == 1 and next(iter(concrete_op.PLANS.values())) is not None


@needs_plan_triton
def test_planned_gradient_of_one_output(plan_device, monkeypatch):
    """A backward given z's gradient alone, log q's alone or the KL's alone
    (each a backward variant of the plan) gives the general path's bits."""
    logits = make_logits((3, 4, 5), 2, torch.float32, plan_device, requires_grad=True)
    log_p = make_log_p(4, 5, False, 2, torch.float32, plan_device)
    for which in range(3):
        grads = []
        for enabled in (True, False):
            monkeypatch.setattr(concrete_op, "ENABLED", enabled)
            res = fastvae.sample_concrete(logits, 0.5, 2, generator=gen(4), log_p=log_p)
            grads.append(torch.autograd.grad((res[which] * res[which]).sum(), logits)[0])
        assert_same(*grads)
    assert len(next(iter(concrete_op.PLANS.values())).launches()) == 4


@needs_plan_triton
def test_planned_double_backward_is_refused_as_the_general_path(plan_device, monkeypatch):
    """create_graph=True through the plan: the kernel's gradient, then the
    general path's named error at a second backward."""
    logits = make_logits((2, 3, 4), 1, torch.float32, plan_device, requires_grad=True)
    messages = []
    for enabled in (True, False):
        monkeypatch.setattr(concrete_op, "ENABLED", enabled)
        messages.append(_second_backward_error(logits, 3, lambda z, log_q: (z * z).sum() + log_q.sum()))
    _assert_same_double_backward_error(*messages)


@needs_plan_triton
def test_planned_signature_errors_as_the_general_path(plan_device):
    """A bad argument on a planned signature raises the general path's error
    (the public function checks every call: its values as the value-check
    policy says, here "always")."""
    x = torch.zeros(2, 3, 4, device=plan_device)
    fastvae.sample_concrete(x, 0.5)
    assert len(concrete_op.PLANS) == 1
    bad = x.clone()
    bad[0, 0, 0] = math.nan
    fastvae.set_value_checks("always")
    try:
        with pytest.raises(ValueError, match="logits must be finite or -inf"):
            fastvae.sample_concrete(bad, 0.5)
    finally:
        fastvae.set_value_checks("auto")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastvae.sample_concrete(x, -1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastvae.sample_concrete(x, torch.zeros(2, 3, device=plan_device))
    with pytest.raises(ValueError, match="log_p must be a prior log-pmf"):
        fastvae.sample_concrete(x, 0.5, log_p=torch.zeros(5, device=plan_device))


@needs_plan_triton
def test_each_signature_has_its_plan_and_the_cache_is_bounded(plan_device, monkeypatch):
    """Another shape or strides make another plan (the oracle's values); a
    signature the plans do not serve (half precision) is kept as None and
    takes the general path, as does a learned prior; past PLANS.max_plans the plans are
    forgotten, not grown."""
    for shape, make in [((2, 3, 4), lambda t: t), ((5, 3, 4), lambda t: t),
                        ((5, 3, 4), lambda t: t.transpose(0, 1).contiguous().transpose(0, 1))]:
        logits = make(make_logits(shape, 5, torch.float64, plan_device))
        z, log_q = fastvae.sample_concrete(logits, 0.5, generator=gen(6))
        seed = philox_seed_of(6)
        offsets = torch.arange(logits.numel(), dtype=torch.int64).reshape(shape)
        z_ref, lq_ref = described.concrete_terms(logits.detach().double().cpu(), torch.full(shape[:-1], 0.5,
                                                 dtype=torch.float64),
                                                 described.concrete_noise(seed, offsets, torch.float64))[:2]
        assert_close(z, z_ref, z_ref.abs() + 1e-3, "z")
        assert_close(log_q, lq_ref.sum(-1), lq_ref.abs().sum(-1) + 1.0, "log_q")
    assert len(concrete_op.PLANS) == 3 and all(p is not None for p in concrete_op.PLANS.values())
    logits = make_logits((2, 3, 4), 5, torch.float32, plan_device, requires_grad=True)
    learned = make_log_p(3, 4, False, 5, torch.float32, plan_device, requires_grad=True)
    z, log_q, kl = fastvae.sample_concrete(logits, 0.5, log_p=learned)
    assert type(z.grad_fn).__name__ != "PlannedSampleConcreteBackward"
    kl.sum().backward()
    assert learned.grad is not None and torch.isfinite(learned.grad).all()
    assert len(concrete_op.PLANS) == 3  # a learned prior is refused before any look-up
    z, log_q = fastvae.sample_concrete(logits.detach().half(), 0.5)
    assert type(z.grad_fn).__name__ != "PlannedSampleConcreteBackward" and z.dtype == torch.float16
    assert len(concrete_op.PLANS) == 4 and None in concrete_op.PLANS.values()
    monkeypatch.setattr(concrete_op.PLANS, "max_plans", 4)
    fastvae.sample_concrete(make_logits((3, 3, 4), 5, torch.float64, plan_device), 0.5)  # a fifth signature
    assert len(concrete_op.PLANS) == 1


@needs_plan_triton
def test_a_compiling_call_takes_the_general_path(plan_device, monkeypatch):
    """Under torch.compile (here: _backend.compiling() made true) no plan is
    looked up or made."""
    monkeypatch.setattr(fastvae._backend, "compiling", lambda: True)
    x = make_logits((2, 3, 4), 1, torch.float32, plan_device)
    lam = torch.full((2, 3), 0.5, device=plan_device)
    assert concrete_op._plan_for(x, lam, None, False, False, None, None) is None
    assert len(concrete_op.PLANS) == 0
