"""sample_normal against its float64 oracle (fastvae/ops/sample_normal/__init__.py),
per backend (the root conftest.py), and its cases of the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvae
from fastvae import reference
from fastvae._op import draw_seed
from fastvae.ops import sample_normal as oracle
from fastvae.ops.kl_normal import kl_normal as kl_normal_oracle
from fastvae.ops.sample_normal import op as sample_normal_module
from fastvae.ops.sample_normal.op import (
    SampleNormal,
    SampleNormalWithRatio,
    sample_normal_backward_op,
    sample_normal_of_scale_unchecked,
    sample_normal_op,
    sample_normal_unchecked,
    sample_normal_with_ratio_op,
    sample_normal_with_ratio_unchecked,
)

from conftest import INTERPRET
from helpers import (
    assert_close,
    float_dtype_examples,
    gen,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    philox_seed_of,
    plan_device_fixture,
    sampler_checks,
    seed_tensor,
)

# L values: odd, powers of two and +-1, and longer than one Triton block (1024)
LATENT = [1, 2, 3, 7, 31, 32, 33, 100, 1025, 1537]


@st.composite
def problems(draw, max_logvar=30.0):
    """(batch shape, L, n_samples, float64 seed, logvar bound) with K*B*L kept small."""
    L = draw(st.sampled_from(LATENT))
    max_rows = max(1, 6000 // L)
    batch = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)))
    while math.prod(batch) > max_rows:
        batch = batch[1:]
    n_samples = draw(st.sampled_from([None, 1, 2, 3, 5]))
    data_seed = draw(st.integers(0, 2**31 - 1))
    lv_bound = draw(st.sampled_from([1.0, 5.0, max_logvar]))
    return batch, L, n_samples, data_seed, lv_bound


def make_inputs(batch, L, data_seed, lv_bound, dtype, device, requires_grad=False):
    g = torch.Generator().manual_seed(data_seed)
    mu = (torch.randn((*batch, L), generator=g, dtype=torch.float64) * 3).to(dtype)
    logvar = ((torch.rand((*batch, L), generator=g, dtype=torch.float64) * 2 - 1) * lv_bound).to(dtype)
    mu, logvar = mu.to(device), logvar.to(device)
    return mu.requires_grad_(requires_grad), logvar.requires_grad_(requires_grad)



def reference_pieces(mu, logvar, seed, K):
    """float64 reference outputs plus the tolerance scales of each output."""
    mu64, lv64 = mu.detach().double().cpu(), logvar.detach().double().cpu()
    eps = reference.sample_noise(seed, K, mu64.shape, torch.float64, "cpu")
    s = torch.exp(0.5 * lv64)
    z = mu64 + s * eps
    kl = kl_normal_oracle(mu64, lv64)
    z_scale = mu64.abs() + s * (eps.abs() + 1.0)
    kl_scale = 0.5 * torch.sum(torch.exp(lv64) + mu64 * mu64 + 1.0 + lv64.abs(), dim=-1)
    return eps, s, z, kl, z_scale, kl_scale


@float_dtype_examples(None, problem=problems())
def test_forward_matches_reference(backend, dtype, problem):
    _, device = backend
    batch, L, n_samples, data_seed, lv_bound = problem
    mu, logvar = make_inputs(batch, L, data_seed, lv_bound, dtype, device)
    z, kl, seed, K = sampler_checks.normal_call(fastvae.sample_normal, mu, logvar, n_samples, data_seed)
    _, _, z_ref, kl_ref, z_scale, kl_scale = reference_pieces(mu, logvar, seed, K)
    if n_samples is None:
        z_ref, z_scale = z_ref[0], z_scale[0]
    assert z.dtype == dtype and kl.dtype == dtype
    assert_close(z, z_ref, z_scale, "z")
    assert_close(kl, kl_ref, kl_scale, "kl")


@float_dtype_examples(None, problem=problems())
def test_backward_matches_reference_autograd(backend, dtype, problem):
    """Gradients of the op against autograd through the differentiable reference."""
    _, device = backend
    batch, L, n_samples, data_seed, lv_bound = problem
    K = 1 if n_samples is None else n_samples
    mu, logvar = make_inputs(batch, L, data_seed, lv_bound, dtype, device, requires_grad=True)
    seed, gz_r, gk_r, (dmu, dlv), (mu64, lv64) = sampler_checks.normal_backward(SampleNormal.apply, mu, logvar,
                                                                                data_seed, K, dtype)
    z_ref, kl_ref = oracle.sample_normal(mu64, lv64, seed, K)
    dmu_ref, dlv_ref = torch.autograd.grad((z_ref, kl_ref), (mu64, lv64), (gz_r, gk_r))

    eps = reference.sample_noise(seed, K, mu64.shape, torch.float64, "cpu")
    var = torch.exp(lv64.detach())
    dmu_scale = gz_r.abs().sum(0) + (gk_r[..., None] * mu64.detach()).abs()
    # dlogvar = sum_k gz * eps * s / 2 + gk (var - 1) / 2. The float32 kernel's own rounding (a few ulp of each
    # term) is within RTOL of the terms' sizes; but a float32 op draws eps from float32 uniforms (the RNG contract)
    # and the float64 reference from exact ones, and that eps differs by |eps32 - eps| absolute (the uniforms'
    # float32 rounding times d eps / d u: up to ~1e-6 for a typical radius, more for u1 < 1e-5), however small
    # eps itself is. That difference enters at its own size, exactly as the reference computes it.
    from helpers import RTOL

    eps_contract = reference.sample_noise(seed, K, mu64.shape, dtype, "cpu").double()
    dlv_scale = (0.5 * (gz_r * eps).abs().sum(0) * var.sqrt() + 0.5 * gk_r.abs()[..., None] * (var + 1.0)
                 + 0.5 * (gz_r * (eps_contract - eps)).abs().sum(0) * var.sqrt() / RTOL[dtype])
    assert_close(dmu, dmu_ref, dmu_scale, "dmu")
    assert_close(dlv, dlv_ref, dlv_scale, "dlogvar")


@pytest.mark.parametrize("lv", [-30.0, 30.0])
def test_extreme_logvar_matches_reference(backend, lv):
    _, device = backend
    mu = torch.linspace(-5, 5, 3 * 37, device=device).reshape(3, 37).requires_grad_()
    logvar = torch.full((3, 37), lv, device=device, requires_grad=True)
    z, kl = SampleNormal.apply(mu, logvar, seed_tensor(77, device), 4)
    (z.sum() + kl.sum()).backward()
    mu64 = mu.detach().double().cpu().requires_grad_()
    lv64 = logvar.detach().double().cpu().requires_grad_()
    z_ref, kl_ref = oracle.sample_normal(mu64, lv64, 77, 4)
    (z_ref.sum() + kl_ref.sum()).backward()
    s = torch.exp(lv64.detach() / 2)
    assert_close(z, z_ref, mu64.detach().abs() + 6 * s, "z")
    assert_close(kl, kl_ref, (torch.exp(lv64) + mu64**2 + 1 + lv64.abs()).detach().sum(-1), "kl")
    assert_close(mu.grad, mu64.grad, 4 + mu64.detach().abs(), "dmu")
    assert_close(logvar.grad, lv64.grad, 4 * 6 * s + torch.exp(lv64.detach()) + 1, "dlogvar")


def test_moments_of_samples(backend):
    """z ~ N(mu, s^2): mean, variance and the 1-sigma mass within 5 standard errors."""
    _, device = backend
    n_rows, L, K = 64, 50, 40  # n = 128000 samples
    mu = torch.full((n_rows, L), 1.5, device=device)
    logvar = torch.full((n_rows, L), math.log(0.25), device=device)
    torch.manual_seed(1234)
    z, _ = fastvae.sample_normal(mu, logvar, K)
    x = ((z.double() - 1.5) / 0.5).flatten().cpu()
    n = x.numel()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    p1 = 0.6826894921370859
    assert abs((x.abs() < 1).double().mean().item() - p1) < 5 * math.sqrt(p1 * (1 - p1) / n)
    # independence across samples k and across neighbouring elements
    e = x.reshape(K, n_rows * L)
    assert abs((e[:-1] * e[1:]).mean().item()) < 5 / math.sqrt(e[1:].numel())
    assert abs((e[:, :-1] * e[:, 1:]).mean().item()) < 5 / math.sqrt(e[:, 1:].numel())


def test_reproducible_and_independent(backend):
    _, device = backend
    mu = torch.zeros(16, 9, device=device)
    logvar = torch.zeros(16, 9, device=device)
    torch.manual_seed(7)
    z1, _ = fastvae.sample_normal(mu, logvar, 3)
    z2, _ = fastvae.sample_normal(mu, logvar, 3)
    torch.manual_seed(7)
    z1_again, _ = fastvae.sample_normal(mu, logvar, 3)
    assert torch.equal(z1, z1_again)
    assert not torch.equal(z1, z2)
    assert abs((z1 * z2).mean().item()) < 5 / math.sqrt(z1.numel())
    za, _ = fastvae.sample_normal(mu, logvar, 3, generator=torch.Generator(device).manual_seed(99))
    zb, _ = fastvae.sample_normal(mu, logvar, 3, generator=torch.Generator(device).manual_seed(99))
    assert torch.equal(za, zb)


def test_n_samples_none_is_first_sample(backend):
    _, device = backend
    mu, logvar = make_inputs((4,), 5, 0, 1.0, torch.float32, device)
    sampler_checks.n_samples_none_is_first_sample(fastvae.sample_normal, mu, logvar)


def test_non_contiguous_inputs(backend):
    _, device = backend
    base_mu, base_lv = make_inputs((6, 10), 8, 5, 2.0, torch.float32, device)
    mu, logvar = base_mu.transpose(0, 1)[:, ::2], base_lv.transpose(0, 1)[:, ::2]
    assert not mu.is_contiguous()
    gen = lambda: torch.Generator(device).manual_seed(11)  # noqa: E731
    z, kl = fastvae.sample_normal(mu, logvar, 2, generator=gen())
    z_c, kl_c = fastvae.sample_normal(mu.contiguous(), logvar.contiguous(), 2, generator=gen())
    assert torch.equal(z, z_c) and torch.equal(kl, kl_c)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)])
def test_empty_batches(backend, shape):
    _, device = backend
    mu = torch.zeros(shape, device=device, requires_grad=True)
    logvar = torch.zeros(shape, device=device, requires_grad=True)
    z, kl = fastvae.sample_normal(mu, logvar, 2)
    assert z.shape == (2, *shape) and kl.shape == shape[:-1]
    assert torch.equal(kl, torch.zeros(shape[:-1], device=device))
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == shape


def test_no_noise_saved_for_backward(backend):
    """Only mu, logvar and the seed are saved: nothing of size K x B x L."""
    _, device = backend
    mu, logvar = make_inputs((32,), 16, 0, 1.0, torch.float32, device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        z, kl = fastvae.sample_normal(mu, logvar, 8)
    assert saved and max(saved) <= mu.numel()
    (z.sum() + kl.sum()).backward()


def test_gradcheck_float64(backend):
    name, device = backend
    mu, logvar = make_inputs((3,), 5, 4, 2.0, torch.float64, device, requires_grad=True)
    seed = seed_tensor(12345, device)
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(lambda m, lv: SampleNormal.apply(m, lv, seed, 3), (mu, logvar), fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    mu, logvar = make_inputs((4, 3), 6, 8, 2.0, torch.float32, device, requires_grad=True)
    seed = seed_tensor(2024, device)
    torch.library.opcheck(sample_normal_op, (mu, logvar, seed, 3))
    dz = torch.randn(3, 4, 3, 6, device=device)
    dkl = torch.randn(4, 3, device=device)
    dr = torch.randn(3, 4, 3, device=device)
    m, lv = mu.detach(), logvar.detach()
    torch.library.opcheck(sample_normal_backward_op, (m, lv, seed, dz, dkl, None, False))
    torch.library.opcheck(sample_normal_backward_op, (m, lv, seed, None, dkl, dr, True))
    torch.library.opcheck(sample_normal_backward_op, (m, lv, seed, dz, None, None, False))


def test_errors_on_bad_input(backend):
    _, device = backend
    mu = torch.zeros(4, 3, device=device)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        fastvae.sample_normal(mu, torch.zeros(4, 2, device=device))
    # mixed dtypes are read as they are; float64 wins
    z, kl = fastvae.sample_normal(mu, torch.zeros(4, 3, dtype=torch.float64, device=device))
    assert z.dtype == kl.dtype == torch.float64
    with pytest.raises(TypeError, match="int64"):
        fastvae.sample_normal(torch.zeros(4, 3, dtype=torch.int64, device=device), mu)
    sampler_checks.refuses_bad_arguments(fastvae.sample_normal, mu, mu, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    """bf16/fp16 mu and logvar on every backend, computed in float32: z in the
    encoder's dtype (the activation a half-precision decoder takes), the KL and
    the latent log-ratio in float32, equal to the float64 ones of the same
    rounded inputs to float32 error; gradients in each input's dtype."""
    _, device = backend
    mu, logvar = make_inputs((5,), 37, 3, 3.0, dtype, device)
    mu.requires_grad_()
    seed = 77
    z, kl = SampleNormal.apply(mu, logvar, seed_tensor(seed, device), 2)
    _, _, z_ref, kl_ref, z_scale, kl_scale = reference_pieces(mu, logvar, seed, 2)
    assert (z.dtype, kl.dtype) == (dtype, torch.float32)
    assert_close(z, z_ref, z_scale, "z")
    assert_close(kl, kl_ref, kl_scale, "kl")
    z, kl, ratio = SampleNormalWithRatio.apply(mu, logvar, seed_tensor(seed, device), 2, False)
    assert ratio.dtype == torch.float32
    mu64, lv64 = mu.detach().double().cpu(), logvar.double().cpu()
    eps = reference.sample_noise(seed, 2, mu64.shape, torch.float64, "cpu")
    z64 = mu64 + torch.exp(0.5 * lv64) * eps
    ratio_ref = 0.5 * (eps * eps + lv64 - z64 * z64).sum(-1)
    assert_close(ratio, ratio_ref, (eps * eps + lv64.abs() + z64 * z64).sum(-1), "log_ratio")
    (dmu,) = torch.autograd.grad(z.float().sum() + kl.sum() + ratio.sum(), [mu])
    assert dmu.dtype == dtype
    # a float32 mu beside a half logvar: z is float32
    z, kl = SampleNormal.apply(mu.detach().float(), logvar, seed_tensor(seed, device), 2)
    assert (z.dtype, kl.dtype) == (torch.float32, torch.float32)


@pytest.mark.parametrize("use", ["z", "kl"])
def test_gradient_through_one_output(backend, use):
    """A loss that uses only z or only kl gets the gradient of that output alone."""
    _, device = backend
    mu, logvar = make_inputs((5,), 6, 1, 2.0, torch.float64, device, requires_grad=True)
    seed = 99
    z, kl = SampleNormal.apply(mu, logvar, seed_tensor(seed, device), 2)
    out = z.sum() if use == "z" else kl.sum()
    dmu, dlv = torch.autograd.grad(out, (mu, logvar))
    mu64 = mu.detach().cpu().requires_grad_()
    lv64 = logvar.detach().cpu().requires_grad_()
    z_ref, kl_ref = oracle.sample_normal(mu64, lv64, seed, 2)
    dmu_ref, dlv_ref = torch.autograd.grad(z_ref.sum() if use == "z" else kl_ref.sum(), (mu64, lv64))
    torch.testing.assert_close(dmu.cpu(), dmu_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dlv.cpu(), dlv_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampling_kernel_at_strided_offsets(backend, dtype):
    """Evaluation draws z with the sampling kernel at example-major offsets:
    z[k, n, l] = mu + s * randn(seed, offset0 + k * sample_stride + n * row_stride + l),
    equal to the reference noise at those offsets (offset0 of any residue)."""
    from fastvae.ops.sample_normal.op import sample_at

    _, device = backend
    g = torch.Generator().manual_seed(3)
    N, L, K, total_k = 5, 7, 3, 11
    mu = torch.randn(N, L, generator=g, dtype=dtype)
    logvar = torch.randn(N, L, generator=g, dtype=dtype)
    for offset0 in (0, 13, 2**33 + 5):
        z = sample_at(mu.to(device), logvar.to(device), seed_tensor(99, device), K, offset0=offset0,
                      sample_stride=L, row_stride=total_k * L)
        k, n, c = torch.arange(K), torch.arange(N), torch.arange(L)
        offsets = offset0 + k[:, None, None] * L + n[None, :, None] * total_k * L + c
        eps = reference.philox_randn(99, offsets, torch.float64)
        expected = mu.double() + torch.exp(0.5 * logvar.double()) * eps
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(z.double().cpu(), expected, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        sample_at(mu.to(device), logvar.to(device), seed_tensor(99, device), K, offset0=2**63 - 10,
                  sample_stride=L, row_stride=L)


# -- the backward kernel: optional upstream gradients and the log-ratio's terms ---------------------

OUTPUT_SUBSETS = [("z",), ("kl",), ("ratio",), ("z", "kl"), ("z", "ratio"), ("kl", "ratio"), ("z", "kl", "ratio")]


def ratio_gradients_from_eps(mu, logvar, seed, K, gz, gk, gr, stop_score, dtype):
    """dmu, dlogvar of sample_normal_with_ratio in float64 from the kernel's eps
    (drawn as a ``dtype`` op draws it), each upstream gradient None when its
    output is unused, with their tolerance scales (the sizes of the terms):
    dz_k = gz_k + gr_k * (-z_k, or eps_k / s - z_k with stop_score); dmu = sum_k dz_k
    + gk mu; dlogvar = s / 2 sum_k dz_k eps_k + gk (e^logvar - 1) / 2 (+ sum_k gr_k / 2)."""
    mu64, lv64 = mu.detach().double().cpu(), logvar.detach().double().cpu()
    eps = reference.sample_noise(seed, K, mu64.shape, dtype, "cpu").double()
    s, inv_s = torch.exp(0.5 * lv64), torch.exp(-0.5 * lv64)
    z = mu64 + s * eps
    z_abs = mu64.abs() + s * eps.abs()
    d = torch.zeros_like(eps) if gz is None else gz.double().clone()
    d_abs = torch.zeros_like(eps) if gz is None else gz.double().abs()
    dlv = torch.zeros_like(mu64)
    dlv_abs = torch.zeros_like(mu64)
    if gr is not None:
        g = gr.double()[..., None]
        if stop_score:
            d = d + g * (eps * inv_s - z)
            d_abs = d_abs + g.abs() * (eps.abs() * inv_s + z_abs)
        else:
            d = d - g * z
            d_abs = d_abs + g.abs() * z_abs
            dlv = dlv + 0.5 * g.sum(0)
            dlv_abs = dlv_abs + 0.5 * g.abs().sum(0)
    dmu, dmu_abs = d.sum(0), d_abs.sum(0)
    dlv = dlv + 0.5 * s * (d * eps).sum(0)
    dlv_abs = dlv_abs + 0.5 * s * (d_abs * eps.abs()).sum(0)
    if gk is not None:
        g = gk.double()[..., None]
        dmu, dmu_abs = dmu + g * mu64, dmu_abs + (g * mu64).abs()
        var = torch.exp(lv64)
        dlv, dlv_abs = dlv + 0.5 * g * (var - 1.0), dlv_abs + 0.5 * g.abs() * (var + 1.0)
    return dmu, dlv, dmu_abs, dlv_abs


def run_with_ratio(mu, logvar, seed, K, stop_score, use, data_seed, dtype, device):
    """The op's gradients for a loss on the outputs in ``use`` only, and those upstream gradients."""
    z, kl, ratio = SampleNormalWithRatio.apply(mu, logvar, seed_tensor(seed, device), K, stop_score)
    g = torch.Generator().manual_seed(data_seed + 5)
    ups = {name: torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
           for name, out in (("z", z), ("kl", kl), ("ratio", ratio))}
    outs = {"z": z, "kl": kl, "ratio": ratio}
    loss = sum((outs[name] * ups[name].to(device)).sum() for name in use)
    dmu, dlv = torch.autograd.grad(loss, (mu, logvar))
    return dmu, dlv, *(ups[name] if name in use else None for name in ("z", "kl", "ratio"))


@pytest.mark.parametrize("stop_score", [False, True])
@pytest.mark.parametrize("use", OUTPUT_SUBSETS, ids="+".join)
@pytest.mark.parametrize("batch,L,K", [((1,), 5, 1), ((1,), 33, 3), ((3,), 5, 1), ((2, 3), 33, 2), ((), 5, 2),
                                       ((4,), 32, 3)])
def test_with_ratio_gradients_of_any_outputs(backend, batch, L, K, use, stop_score):
    """Every subset of (z, kl, log_ratio) used by the loss (the others get no
    gradient: None reaches the kernel, no zeros), K = 1, one-row batches and odd
    L: the one backward kernel against the float64 formula from its eps."""
    _, device = backend
    dtype = torch.float32
    mu, logvar = make_inputs(batch, L, 3, 5.0, dtype, device, requires_grad=True)
    seed = 4242
    dmu, dlv, gz, gk, gr = run_with_ratio(mu, logvar, seed, K, stop_score, use, 3, dtype, device)
    want_mu, want_lv, mu_scale, lv_scale = ratio_gradients_from_eps(mu, logvar, seed, K, gz, gk, gr, stop_score,
                                                                     dtype)
    assert dmu.dtype == dtype and dlv.dtype == dtype
    assert_close(dmu, want_mu, mu_scale, f"dmu {use} stop_score={stop_score}")
    assert_close(dlv, want_lv, lv_scale, f"dlogvar {use} stop_score={stop_score}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(problem=problems(), stop_score=st.booleans(), use=st.sampled_from(OUTPUT_SUBSETS))
def test_with_ratio_backward_matches_the_formula(backend, dtype, problem, stop_score, use):
    _, device = backend
    batch, L, n_samples, data_seed, lv_bound = problem
    K = 1 if n_samples is None else n_samples
    mu, logvar = make_inputs(batch, L, data_seed, lv_bound, dtype, device, requires_grad=True)
    seed = data_seed * 31 + 7
    dmu, dlv, gz, gk, gr = run_with_ratio(mu, logvar, seed, K, stop_score, use, data_seed, dtype, device)
    want_mu, want_lv, mu_scale, lv_scale = ratio_gradients_from_eps(mu, logvar, seed, K, gz, gk, gr, stop_score,
                                                                     dtype)
    assert_close(dmu, want_mu, mu_scale, "dmu")
    assert_close(dlv, want_lv, lv_scale, "dlogvar")


@pytest.mark.parametrize("stop_score", [False, True])
def test_with_ratio_full_mode_is_the_autograd_gradient(backend, stop_score):
    """The formula itself, in float64: the full mode is autograd of
    0.5 * sum(eps^2 + logvar - z^2) with z = mu + s eps; stop_score is autograd
    of log N(z; 0, I) - log N(z; mu.detach(), e^logvar.detach()) along z."""
    _, device = backend
    mu, logvar = make_inputs((3, 2), 7, 11, 3.0, torch.float64, device, requires_grad=True)
    dmu, dlv, gz, gk, gr = run_with_ratio(mu, logvar, 99, 3, stop_score, ("z", "kl", "ratio"), 11, torch.float64,
                                          device)
    m64 = mu.detach().cpu().requires_grad_()
    l64 = logvar.detach().cpu().requires_grad_()
    eps = reference.sample_noise(99, 3, m64.shape, torch.float64, "cpu")
    z = m64 + torch.exp(0.5 * l64) * eps
    kl = kl_normal_oracle(m64, l64)
    sm, sl = (m64.detach(), l64.detach()) if stop_score else (m64, l64)
    e = (z - sm) * torch.exp(-0.5 * sl)
    ratio = 0.5 * (e * e + sl - z * z).sum(-1)
    loss = (z * gz).sum() + (kl * gk).sum() + (ratio * gr).sum()
    w_mu, w_lv = torch.autograd.grad(loss, (m64, l64))
    torch.testing.assert_close(dmu.cpu(), w_mu, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dlv.cpu(), w_lv, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stop_score", [False, True])
def test_collapsed_posterior_gradients_are_finite(backend, stop_score):
    """logvar = -100 in float32: exp(-logvar) overflows, and (z - mu) *
    exp(-logvar) would be 0 * inf = NaN. The kernel takes (z - mu) / s^2 as
    eps * exp(-logvar / 2) from its regenerated eps: finite, and equal to the
    float64 formula from that eps."""
    _, device = backend
    dtype = torch.float32
    g = torch.Generator().manual_seed(8)
    mu = torch.randn(3, 6, generator=g).to(device).requires_grad_()
    logvar = torch.full((3, 6), -100.0, device=device, requires_grad=True)
    seed = 31337
    dmu, dlv, gz, gk, gr = run_with_ratio(mu, logvar, seed, 4, stop_score, ("z", "kl", "ratio"), 8, dtype, device)
    assert torch.isfinite(dmu).all() and torch.isfinite(dlv).all()
    want_mu, want_lv, mu_scale, lv_scale = ratio_gradients_from_eps(mu, logvar, seed, 4, gz, gk, gr, stop_score,
                                                                     dtype)
    assert torch.isfinite(want_mu).all() and torch.isfinite(want_lv).all()
    assert_close(dmu, want_mu, mu_scale, "dmu")
    assert_close(dlv, want_lv, lv_scale, "dlogvar")


@pytest.mark.parametrize("use", OUTPUT_SUBSETS, ids="+".join)
@pytest.mark.parametrize("stop_score", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_operator_matches_the_function_for_any_outputs(backend, monkeypatch, use, stop_score, dtype):
    """cpp: the C++ eager operators (torch_op.cpp) and the Python Functions
    give the same bits for every subset of outputs that gets a gradient."""
    name, device = backend
    if name != "cpp" or fastvae._backend.torch_ops(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("the C++ eager operators serve the cpp backend only")
    mu0, lv0 = make_inputs((2, 3), 5, 21, 4.0, dtype, device)

    def grads():
        mu, logvar = mu0.clone().requires_grad_(), lv0.clone().requires_grad_()
        g = torch.Generator().manual_seed(9)
        with_ratio = "ratio" in use or stop_score
        outs = (sample_normal_with_ratio_unchecked(mu, logvar, 3, stop_score, torch.Generator().manual_seed(1))
                if with_ratio else sample_normal_unchecked(mu, logvar, 3, torch.Generator().manual_seed(1)))
        named = dict(zip(("z", "kl", "ratio"), outs))
        loss = sum((named[n] * torch.randn(named[n].shape, generator=g, dtype=dtype)).sum() for n in use
                   if n in named)
        return [t.detach() for t in outs] + list(torch.autograd.grad(loss, (mu, logvar)))

    fast = grads()
    with monkeypatch.context() as m:
        m.setattr(fastvae._backend, "torch_ops", lambda *t: None)
        slow = grads()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


@pytest.mark.parametrize("L", [5, 32, 33])
def test_triton_small_tiles(backend, monkeypatch, L):
    """Under the interpreter a launch is one big program; forced here to GPU-like
    small tiles (several backward programs of 8 elements of mu, the last one
    partial, whose noise starts mid-row; forward tiles of 4 rows x 8 columns),
    the kernels still match the formula."""
    name, device = backend
    if name != "triton":
        pytest.skip("the Triton launchers' tiles")
    from fastvae.ops.sample_normal import triton as kernels

    monkeypatch.setattr(kernels, "backward_geometry", lambda device, fp64: (8, 4))
    monkeypatch.setattr(kernels, "forward_geometry", lambda L, device, fp64: (4, 8, 4))
    for stop_score in (False, True):
        mu, logvar = make_inputs((5,), L, 2, 3.0, torch.float32, device, requires_grad=True)
        dmu, dlv, gz, gk, gr = run_with_ratio(mu, logvar, 77, 3, stop_score, ("z", "kl", "ratio"), 2,
                                              torch.float32, device)
        want_mu, want_lv, mu_scale, lv_scale = ratio_gradients_from_eps(mu, logvar, 77, 3, gz, gk, gr, stop_score,
                                                                         torch.float32)
        assert_close(dmu, want_mu, mu_scale, "dmu")
        assert_close(dlv, want_lv, lv_scale, "dlogvar")
        z, kl = SampleNormal.apply(mu.detach(), logvar.detach(), seed_tensor(77, device), 3)
        _, _, z_ref, kl_ref, z_scale, kl_scale = reference_pieces(mu, logvar, 77, 3)
        assert_close(z, z_ref, z_scale, "z")
        assert_close(kl, kl_ref, kl_scale, "kl")


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("stop_score", [False, True])
@pytest.mark.parametrize("use", [("z",), ("ratio",), ("z", "kl", "ratio")], ids="+".join)
@pytest.mark.parametrize("batch,L,K", [((1,), 5, 7), ((3,), 33, 5), ((2,), 32, 2)])
def test_backward_split_over_samples(backend, monkeypatch, splits, stop_score, use, batch, L, K):
    """The GPU's path where the blocks of mu do not fill a wave (a few rows
    against many samples): the samples split over programs, each split's sums
    added in split order by the last program of a block to arrive, forced
    under the interpreter (with small blocks, several per launch, the last one
    partial): against the float64 formula; a second call gives the same bits
    (the arrival counters are back at 0)."""
    name, device = backend
    if name != "triton":
        pytest.skip("the Triton launcher's split")
    from fastvae.kernels import _common
    from fastvae.ops.sample_normal import triton as kernels

    monkeypatch.setattr(_common, "FORCE_SPLITS", splits)
    monkeypatch.setattr(kernels, "backward_geometry", lambda device, fp64: (16, 4))
    mu, logvar = make_inputs(batch, L, 4, 3.0, torch.float32, device, requires_grad=True)
    dmu, dlv, gz, gk, gr = run_with_ratio(mu, logvar, 91, K, stop_score, use, 4, torch.float32, device)
    want_mu, want_lv, mu_scale, lv_scale = ratio_gradients_from_eps(mu, logvar, 91, K, gz, gk, gr, stop_score,
                                                                     torch.float32)
    assert_close(dmu, want_mu, mu_scale, f"dmu split {splits}")
    assert_close(dlv, want_lv, lv_scale, f"dlogvar split {splits}")
    again = run_with_ratio(mu, logvar, 91, K, stop_score, use, 4, torch.float32, device)
    assert torch.equal(again[0], dmu) and torch.equal(again[1], dlv)


# -- each C++ noise path, forced in turn ---------------------------------------

@pytest.fixture(params=["portable", "avx2", "avx512"])
def cpp_noise_path(request):
    """The cpp backend's sample_normal with the noise path request.param forced
    (the AVX2 path also does the forward's exp/KL/z and the backward's exp in
    its own AVX2 code): a path this CPU would not pick is still run."""
    from fastvae import _C

    if fastvae.backend_info("cpu")["sample_normal"] != "cpp":
        pytest.skip("the cpp backend is not built")
    if request.param not in _C.noise_isas():
        pytest.skip(f"this CPU cannot run the {request.param} noise path")
    _C.set_noise_isa(request.param)
    try:
        yield request.param
    finally:
        _C.set_noise_isa("auto")


# exp's out-of-range lanes (the scalar fallback of the AVX2 exp), NaN and infinities among them
EXTREME_LOGVARS = [-200.0, -175.0, -174.6, -87.5, -87.0, -86.9, 0.0, 88.0, 88.7, 90.0, 177.4, 300.0]


@pytest.mark.parametrize("L,batch,K", [(7, (3, 5), 3), (32, (37,), 1), (33, (4,), 2), (1, (13,), None)])
def test_each_noise_path_samples_and_differentiates(cpp_noise_path, L, batch, K):
    """On every noise path: z, kl and the gradients against the float64
    reference (tails that are not a whole vector or group included), and kl
    equal bit for bit to kl_normal's (the same exp and row sums, whichever
    loop computes them), extreme logvars too."""

    mu, logvar = make_inputs(batch, L, 5, 4.0, torch.float32, "cpu", requires_grad=True)
    seed = 987654321
    z, kl = fastvae.sample_normal(mu, logvar, K, generator=torch.Generator().manual_seed(seed))
    drawn = draw_seed(torch.device("cpu"), torch.Generator().manual_seed(seed))
    K_ = K or 1
    eps, s, z64, kl64, z_scale, kl_scale = reference_pieces(mu, logvar, drawn, K_)
    assert_close(z.reshape(z64.shape), z64, z_scale)
    assert_close(kl, kl64, kl_scale)
    assert torch.equal(kl, fastvae.kl_normal(mu, logvar))
    gz, gk = torch.randn_like(z), torch.randn_like(kl)
    dmu, dlv = torch.autograd.grad((z, kl), (mu, logvar), (gz, gk))
    gz64 = gz.double().reshape(z64.shape)
    dmu64 = gz64.sum(0) + gk.double().unsqueeze(-1) * mu.detach().double()
    dlv64 = 0.5 * (gz64 * eps).sum(0) * s + 0.5 * gk.double().unsqueeze(-1) * (s * s - 1)
    assert_close(dmu, dmu64, gz64.abs().sum(0) + mu.detach().double().abs() + 1)
    assert_close(dlv, dlv64, (gz64.abs() * eps.abs()).sum(0) * s + s * s + 1)

    lv = torch.tensor(EXTREME_LOGVARS + [math.nan, math.inf, -math.inf]).repeat(3, 1)
    m = torch.randn_like(lv)
    z, kl = fastvae.sample_normal(m, lv, generator=torch.Generator().manual_seed(3))
    kl_ref = fastvae.kl_normal(m, lv)
    assert ((kl == kl_ref) | (kl.isnan() & kl_ref.isnan())).all()
    eps1 = fastvae.sample_normal(torch.zeros_like(lv), torch.zeros_like(lv),
                                 generator=torch.Generator().manual_seed(3))[0]
    finite = lv.isfinite() & (lv.abs() < 170)
    expected = m.double() + torch.exp(0.5 * lv.double()) * eps1.double()
    assert torch.allclose(z.double()[finite], expected[finite], rtol=1e-5, atol=1e-30)
    assert torch.isnan(z[lv.isnan()]).all()


# -- its cases of the checks that run over every op (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(lambda mu, lv: fastvae.sample_normal(mu, lv, K), (B, L), (B, L))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (its backward sums over samples)."""
    mu, lv = leaf(20000, 8), leaf(20000, 8)
    return [lambda: run(lambda a, b: fastvae.sample_normal(a, b, 4, generator=gen(2)), mu, lv)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    mu, lv = leaf(3, 4), leaf(3, 4)
    return lambda: run(lambda a, b: fastvae.sample_normal(a, b, 5, generator=gen(1)), mu, lv)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck: one and K
    samples, and the IWAE's draw with its log-ratio."""
    return {
        "sample_normal": (lambda m, lv: fastvae.sample_normal(m, lv, 2, generator=gen(3)), [r(3, 4), r(3, 4)], True),
        "sample_normal_one_sample": (lambda m, lv: fastvae.sample_normal(m, lv, generator=gen(3)),
                                     [r(3, 4), r(3, 4)], True),
        "sample_normal_with_ratio": (lambda m, lv: sample_normal_with_ratio_unchecked(m, lv, 2, False, gen(3)),
                                     [r(3, 4), r(3, 4)], True),
    }


def compile_cases(mu, lv):
    """tests/test_compile.py: (name, function, float inputs) whose compiled graph
    calls the C++ twins, forward and backward (mu, lv: (5, 2, 3))."""
    return [
        ("sample_normal", lambda m, v: fastvae.sample_normal(m, v, 3), (mu, lv)),
        ("sample_normal (one sample)", lambda m, v: fastvae.sample_normal(m, v), (mu, lv)),
        ("sample_normal_with_ratio", lambda m, v: sample_normal_with_ratio_unchecked(m, v, 3, False, None), (mu, lv)),
        ("sample_normal_with_ratio (stop_score)",
         lambda m, v: sample_normal_with_ratio_unchecked(m, v, 3, True, None), (mu, lv)),
    ]


def twin_op_cases(m2, l2):
    """tests/test_torch_ops.py: (twin, arguments) in the Python op's layout, each
    checked bit for bit against fastvae::<twin> and by opcheck (m2, l2: (12, 6),
    read here as (4, 3, 6): the twins take any leading shape)."""
    mu, lv, seed = m2.reshape(4, 3, 6), l2.reshape(4, 3, 6), torch.tensor(2024)
    return [
        ("sample_normal", (mu, lv, seed, 3)),
        ("sample_normal_with_ratio", (mu, lv, seed, 3)),
        ("sample_normal_backward", (mu, lv, seed, torch.randn(3, 4, 3, 6), torch.randn(4, 3), None, False)),
        ("sample_normal_backward", (mu, lv, seed, None, torch.randn(4, 3), torch.randn(3, 4, 3), True)),
        ("sample_normal_backward", (mu, lv, seed, None, torch.randn(4, 3), None, False)),
    ]


# -- the ops' own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(sample_normal_module)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K", [(1, 1, 1), (5, 7, 1), (6, 33, 3)])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, N, L, K):
    """fastvae::sample_normal, ::sample_normal_with_ratio and their backward
    called as a compiled graph calls them (mu, logvar (N, L)): on the triton
    backend from a plan of the call's signature (OP_PLANS), with the general
    launch's z, KL, log-ratio and gradients bit for bit, for every gradient
    variant, with and without stop_score, from the first call and the
    second; half precision, a strided logvar and an empty batch take the
    general launch and make no plan."""
    sample_normal_module.OP_PLANS.clear()
    g = torch.Generator().manual_seed(N + L + K)
    mu, lv = (torch.randn(N, L, generator=g, dtype=torch.float64).to(dtype).to(plan_device) for _ in range(2))
    gz = torch.randn(K, N, L, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    gk = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    gr = torch.randn(K, N, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    seed = seed_tensor(17, plan_device)
    variants = [(gz, gk, None, False), (gz, None, gr, True), (None, gk, gr, False), (None, gk, None, False),
                (None, None, gr, True)]
    op_plans_match_the_general_launch(monkeypatch, sample_normal_module, lambda: (
        *sample_normal_op(mu, lv, seed, K), *sample_normal_with_ratio_op(mu, lv, seed, K),
        *(d for grad_z, grad_kl, grad_ratio, stop in variants
          for d in sample_normal_backward_op(mu, lv, seed, grad_z, grad_kl, grad_ratio, stop))))
    sample_normal_module.OP_PLANS.clear()
    sample_normal_op(mu.half(), lv.half(), seed, K)
    if L > 1:  # (a (N, 1) view is contiguous whatever its strides)
        sample_normal_op(mu, torch.cat([lv, lv], -1)[:, ::2], seed, K)
    sample_normal_op(mu[:0], lv[:0], seed, K)
    assert len(sample_normal_module.OP_PLANS) == 0


# -- the (mu, scale) form: a torch Normal's parameters -----------------------------


def _of_scale_and_logvar_forms(mu, scale, n_samples, seed, exp_z=False):
    """(z, kl, dmu, dscale) of sample_normal_of_scale_unchecked and of
    sample_normal_unchecked on logvar = 2 log(scale), autograd's gradient to
    the scale through that logvar (with ``exp_z``, of z = exp of its draw),
    on the same seed and upstream gradients."""
    out = []
    for form in ("scale", "logvar"):
        m, s = mu.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
        if form == "scale":
            z, kl = sample_normal_of_scale_unchecked(m, s, n_samples, gen(seed), exp_z)
        else:
            z, kl = sample_normal_unchecked(m, 2.0 * torch.log(s), n_samples, gen(seed))
            z = torch.exp(z) if exp_z else z
        g = torch.Generator().manual_seed(seed + 1)
        dz = torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)
        dk = torch.randn(kl.shape, generator=g, dtype=kl.dtype).to(kl.device)
        out.append((z.detach(), kl.detach(), *torch.autograd.grad((z, kl), (m, s), (dz, dk))))
    return out


@pytest.mark.parametrize("exp_z", [False, True], ids=["normal", "lognormal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,n_samples", [((5, 3), None), ((1, 1), None), ((1, 7), 1), ((33, 31), None),
                                             ((2, 3, 33), 4), ((300, 1025), None), ((4, 0), 2)])
def test_of_scale_matches_the_logvar_form(backend, dtype, shape, n_samples, exp_z):
    """sample_normal_of_scale_unchecked(mu, scale) is sample_normal of logvar =
    2 log(scale), and its scale gradient autograd's through that logvar; with
    exp_z, z is exp of that draw (a LogNormal's) and the gradients go through
    the exp: float64 to its rounding, float32 to the rounding of the kernels'
    own log and exp (the eager C++ operator's; the other backends form the
    logvar and the exp in torch), on odd sizes, one row, several samples and
    empty rows; scales from 1e-3 to 1e3."""
    _, device = backend
    g = torch.Generator().manual_seed(11)
    mu = ((0.5 if exp_z else 3) * torch.randn(shape, generator=g, dtype=dtype)).to(device)
    scale = torch.exp((1.0 if exp_z else 6.9) * (2 * torch.rand(shape, generator=g, dtype=dtype) - 1)).to(device)
    got, want = _of_scale_and_logvar_forms(mu, scale, n_samples, 5, exp_z)
    for name, a, b in zip(("z", "kl", "dmu", "dscale"), got, want):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, 1 + b.abs(), name)


def test_of_scale_against_the_float64_oracle(backend):
    """In float64 the scale form's values and gradients are the oracle's
    (ops/sample_normal: z = mu + e^(logvar / 2) eps, its analytic KL) at
    logvar = 2 log(scale), differentiated by plain autograd to the scale."""
    _, device = backend
    g = torch.Generator().manual_seed(12)
    mu = torch.randn(9, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    scale = (torch.rand(9, 7, generator=g, dtype=torch.float64) * 4 + 0.01).to(device).requires_grad_()
    z, kl = sample_normal_of_scale_unchecked(mu, scale, 3, gen(7))
    seed = philox_seed_of(7)
    want_z, want_kl = oracle.sample_normal(mu, 2.0 * torch.log(scale), seed, 3)
    assert_close(z, want_z, 1 + want_z.abs(), "z")
    assert_close(kl, want_kl, 1 + want_kl.abs(), "kl")
    gz, gk = torch.randn(z.shape, generator=g, dtype=z.dtype).to(device), torch.randn(kl.shape, generator=g,
                                                                                        dtype=kl.dtype).to(device)
    got = torch.autograd.grad((z, kl), (mu, scale), (gz, gk))
    want = torch.autograd.grad((want_z, want_kl), (mu, scale), (gz, gk))
    for name, a, b in zip(("dmu", "dscale"), got, want):
        assert_close(a, b, 1 + b.abs(), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_of_scale_at_the_edges_of_the_scale(backend, dtype):
    """The kernels' log of the scale has log's values at its edges: a scale
    of 0 gives z = mu and an infinite KL, inf an infinite z, a negative or
    NaN scale NaN (the logvar form's values, never a finite number);
    subnormal and extreme normal scales are the logvar form's to rounding."""
    _, device = backend
    tiny = torch.finfo(dtype).tiny
    edge = torch.tensor([0.0, tiny / 2**10, tiny, 1e-30, 1.0, 1e30, float("inf"), -1.0, float("nan")], dtype=dtype)
    scale = edge.repeat(3, 1).to(device)  # three rows, one edge value per column
    mu = torch.full_like(scale, 0.5)
    with torch.no_grad():
        got = sample_normal_of_scale_unchecked(mu, scale, None, gen(4))
        want = sample_normal_unchecked(mu, 2.0 * torch.log(scale), None, gen(4))
    z, want_z = got[0].cpu(), want[0].cpu()
    assert torch.equal(torch.isnan(z), torch.isnan(want_z)) and torch.isnan(z[:, 7:]).all()
    assert torch.equal(z[:, 0], mu[:, 0].cpu()) and torch.isinf(z[:, 6]).all()
    finite = torch.isfinite(want_z)
    assert_close(z[finite], want_z[finite], 1 + want_z[finite].abs(), "z")
    assert torch.isnan(got[1]).all() and torch.isnan(want[1]).all()  # every row holds a NaN scale
    # rows with a scale of 0 and finite positive ones: KL = +inf, as e^logvar - logvar at logvar = -inf
    # (an infinite scale's e^logvar - logvar is inf - inf: NaN in both forms)
    with torch.no_grad():
        kl = sample_normal_of_scale_unchecked(mu[:, :6], scale[:, :6], None, gen(4))[1]
        want_kl = sample_normal_unchecked(mu[:, :6], 2.0 * torch.log(scale[:, :6]), None, gen(4))[1]
    assert torch.isposinf(kl).all() and torch.isposinf(want_kl).all()


@pytest.mark.full_interpreted  # 10 s a case interpreted; the replay is the same Functions' on every backend
@pytest.mark.parametrize("exp_z", [False, True], ids=["normal", "lognormal"])
def test_of_scale_second_derivatives(backend, exp_z):
    """create_graph=True through the scale form: gradcheck and gradgradcheck
    in float64 (the operator's double backward forms logvar, and the exp,
    with ATen ops)."""
    _, device = backend
    g = torch.Generator().manual_seed(13)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    scale = (torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.3).to(device).requires_grad_()

    def fn(m, s):
        return sample_normal_of_scale_unchecked(m, s, 2, gen(3), exp_z)

    assert torch.autograd.gradcheck(fn, (mu, scale))
    assert torch.autograd.gradgradcheck(fn, (mu, scale))
