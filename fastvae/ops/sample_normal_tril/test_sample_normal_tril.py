"""sample_normal_tril against torch.distributions and its float64 oracle
(fastvae/ops/sample_normal_tril/__init__.py), per backend (the root
conftest.py), and its cases of the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal, kl_divergence

import fastvae
from fastvae import reference
from fastvae._op import draw_seed
from fastvae.ops import sample_normal_tril as oracle
from fastvae.ops.sample_normal_tril import op as tril_module
from fastvae.ops.sample_normal_tril.op import SampleNormalTril, sample_normal_tril_backward_op, sample_normal_tril_op

from conftest import INTERPRET
from helpers import (
    assert_close,
    float_dtype_examples,
    gen,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    plan_device_fixture,
    sampler_checks,
    seed_tensor,
)

# odd, one, powers of two and +-1 around the register-tile limit (64) of the
# Triton kernels, and longer rows (chunked there)
LATENT = [1, 2, 3, 5, 7, 8, 16, 31, 33, 64, 65, 100]


@st.composite
def problems(draw):
    """(batch shape, L, n_samples, data seed, log-diagonal bound, off-diagonal scale) with K*B*L^2 kept small."""
    L = draw(st.sampled_from(LATENT))
    max_rows = max(1, 3000 // (L * L))
    batch = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    while math.prod(batch) > max_rows:
        batch = batch[1:]
    n_samples = draw(st.sampled_from([None, 1, 2, 5]))
    data_seed = draw(st.integers(0, 2**31 - 1))
    log_diag = draw(st.sampled_from([0.5, 5.0]))  # diagonals in exp(+-log_diag)
    off = draw(st.sampled_from([0.0, 0.3, 3.0]))
    return batch, L, n_samples, data_seed, log_diag, off


def make_inputs(batch, L, data_seed, log_diag, off, dtype, device, requires_grad=False, upper=0.0):
    """mu (..., L) and a lower-triangular S (..., L, L) with diagonal exp(U(-log_diag, log_diag));
    ``upper`` fills the strict upper triangle (which the op must ignore)."""
    g = torch.Generator().manual_seed(data_seed)
    mu = torch.randn((*batch, L), generator=g, dtype=torch.float64) * 2
    a = torch.randn((*batch, L, L), generator=g, dtype=torch.float64) * off
    d = torch.exp((torch.rand((*batch, L), generator=g, dtype=torch.float64) * 2 - 1) * log_diag)
    S = torch.tril(a, -1) + torch.diag_embed(d) + torch.triu(torch.full_like(a, upper), 1)
    mu, S = mu.to(dtype).to(device), S.to(dtype).to(device)
    return mu.requires_grad_(requires_grad), S.requires_grad_(requires_grad)


def standard_normal(L):
    return MultivariateNormal(torch.zeros(L, dtype=torch.float64), scale_tril=torch.eye(L, dtype=torch.float64))


def forward_scales(mu64, S64, eps):
    """z and kl with the tolerance scales of their terms (eps (K, ..., L) float64)."""
    S = torch.tril(S64)
    z = mu64 + (S @ eps.unsqueeze(-1)).squeeze(-1)
    # |eps| + 1: the kernels' float32 log/cos leave an absolute error in eps
    z_scale = mu64.abs() + (S.abs() @ (eps.abs() + 1.0).unsqueeze(-1)).squeeze(-1)
    diag = torch.diagonal(S, dim1=-2, dim2=-1)
    kl_scale = 0.5 * (S.square().sum((-2, -1)) + mu64.square().sum(-1) + mu64.shape[-1]
                      + 2 * torch.log(diag).abs().sum(-1))
    return z, z_scale, kl_scale


@float_dtype_examples(None, problem=problems())
def test_forward_matches_torch_distributions(backend, dtype, problem):
    """z = mu + S @ eps with the reference's eps; kl = torch's kl_divergence in float64."""
    _, device = backend
    batch, L, n_samples, data_seed, log_diag, off = problem
    mu, S = make_inputs(batch, L, data_seed, log_diag, off, dtype, device)
    z, kl, seed, K = sampler_checks.normal_call(fastvae.sample_normal_tril, mu, S, n_samples, data_seed)
    mu64, S64 = mu.double().cpu(), S.double().cpu()
    eps = reference.sample_noise(seed, K, mu64.shape, torch.float64, "cpu")
    z_ref, z_scale, kl_scale = forward_scales(mu64, S64, eps)
    kl_ref = kl_divergence(MultivariateNormal(mu64, scale_tril=S64), standard_normal(L))
    if n_samples is None:
        z_ref, z_scale = z_ref[0], z_scale[0]
    assert z.dtype == dtype and kl.dtype == dtype
    assert z.shape == ((*batch, L) if n_samples is None else (n_samples, *batch, L)) and kl.shape == batch
    assert_close(z, z_ref, z_scale, "z")
    assert_close(kl, kl_ref, kl_scale, "kl")


@float_dtype_examples(None, problem=problems())
def test_backward_matches_reference_autograd(backend, dtype, problem):
    """Gradients of z and kl for mu and S against autograd through the float64 reference."""
    _, device = backend
    batch, L, n_samples, data_seed, log_diag, off = problem
    K = 1 if n_samples is None else n_samples
    mu, S = make_inputs(batch, L, data_seed, log_diag, off, dtype, device, requires_grad=True)
    seed, gz_r, gk_r, (dmu, dS), (mu64, S64) = sampler_checks.normal_backward(SampleNormalTril.apply, mu, S, data_seed,
                                                                              K, dtype)
    z_ref, kl_ref = oracle.sample_normal_tril(mu64, S64, seed, K)
    dmu_ref, dS_ref = torch.autograd.grad((z_ref, kl_ref), (mu64, S64), (gz_r, gk_r))

    eps = reference.sample_noise(seed, K, mu64.shape, torch.float64, "cpu")
    St = torch.tril(S64.detach())
    inv_diag = torch.diag_embed(1.0 / torch.diagonal(St, dim1=-2, dim2=-1))
    dmu_scale = gz_r.abs().sum(0) + (gk_r[..., None] * mu64.detach()).abs()
    dS_scale = (torch.einsum("k...i,k...j->...ij", gz_r.abs(), eps.abs() + 1.0)
                + gk_r.abs()[..., None, None] * (St.abs() + inv_diag))
    assert_close(dmu, dmu_ref, dmu_scale, "dmu")
    assert_close(dS, dS_ref, dS_scale, "dscale_tril")
    assert torch.equal(torch.triu(dS, 1), torch.zeros_like(dS)), "gradient above the diagonal"


def test_reference_matches_torch_distributions():
    """The oracle itself: z's law and kl against MultivariateNormal in float64."""
    mu, S = make_inputs((3, 2), 6, 5, 5.0, 1.0, torch.float64, "cpu")
    z, kl = oracle.sample_normal_tril(mu, S, 11, 4)
    kl_ref = kl_divergence(MultivariateNormal(mu, scale_tril=S), standard_normal(6))
    torch.testing.assert_close(kl, kl_ref, rtol=1e-12, atol=1e-12)
    eps = reference.sample_noise(11, 4, mu.shape, torch.float64, "cpu")
    torch.testing.assert_close(z, mu + torch.einsum("...ij,k...j->k...i", S, eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_samples", [None, 3])
def test_diagonal_scale_equals_sample_normal(backend, dtype, n_samples):
    """S = diag(exp(logvar / 2)) draws sample_normal's eps: the same z and kl for the same generator state."""
    _, device = backend
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(5, 3, 33, generator=g, dtype=dtype).to(device)
    logvar = (torch.randn(5, 3, 33, generator=g, dtype=dtype) * 2).to(device)
    S = torch.diag_embed(torch.exp(logvar / 2))
    z1, kl1 = fastvae.sample_normal(mu, logvar, n_samples, generator=torch.Generator(device).manual_seed(8))
    z2, kl2 = fastvae.sample_normal_tril(mu, S, n_samples, generator=torch.Generator(device).manual_seed(8))
    s = torch.exp(logvar.double() / 2).cpu()
    assert_close(z2, z1.double(), mu.double().cpu().abs() + s * 6, "z")
    assert_close(kl2, kl1.double(), (s**2 + mu.double().cpu()**2 + 1 + logvar.double().cpu().abs()).sum(-1), "kl")


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
def test_upper_triangle_is_ignored(backend, garbage):
    """Anything in the strict upper triangle, NaN included, changes nothing, and its gradient is exactly 0."""
    _, device = backend
    outs = []
    for upper in (0.0, garbage):
        mu, S = make_inputs((4,), 7, 3, 2.0, 1.0, torch.float32, device, requires_grad=True, upper=upper)
        z, kl = SampleNormalTril.apply(mu, S, seed_tensor(5, device), 3)
        (z.sum() + (z * z).sum() + kl.sum()).backward()
        outs.append((z.detach(), kl.detach(), mu.grad, S.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    dS = outs[1][3]
    assert torch.equal(torch.triu(dS, 1), torch.zeros_like(dS)) and torch.isfinite(dS).all()


def test_non_positive_diagonal_is_never_a_silent_number(backend):
    """A negative diagonal: that row's kl is NaN and, where kl gets a gradient, its diagonal's gradient too;
    a zero diagonal: kl = +inf. Other rows are untouched, and z (and its gradient) is mu + S @ eps."""
    _, device = backend
    mu, S = make_inputs((3,), 4, 9, 1.0, 0.5, torch.float64, device)
    S = S.clone()
    S[0, 2, 2] = -0.5
    S[1, 1, 1] = 0.0
    S.requires_grad_()
    z, kl = SampleNormalTril.apply(mu, S, seed_tensor(3, device), 2)
    assert torch.isnan(kl[0]) and kl[1] == math.inf and torch.isfinite(kl[2])
    assert torch.isfinite(z).all()
    (dS,) = torch.autograd.grad(kl.sum(), S, retain_graph=True)
    assert torch.isnan(dS[0, 2, 2]) and torch.isfinite(dS[2]).all()
    # kl unused: no KL terms, so nothing non-finite reaches the gradient
    (dS_z,) = torch.autograd.grad(z.sum(), S)
    assert torch.isfinite(dS_z).all()


def test_notes_convention_maps_by_reversing_the_latent_order(backend):
    """The lecture notes' z = mu + L^T eps (covariance L^T L, L lower triangular) is the op on
    (mu.flip(-1), L^T.flip(-2, -1)) with z flipped back: their eps is the op's reversed."""
    _, device = backend
    g = torch.Generator().manual_seed(2)
    n, L = 6, 5
    mu = torch.randn(n, L, generator=g, dtype=torch.float64)
    low = torch.tril(torch.randn(n, L, L, generator=g, dtype=torch.float64), -1) + torch.diag_embed(
        torch.rand(n, L, generator=g, dtype=torch.float64) + 0.5)
    gen = torch.Generator(device).manual_seed(12)
    seed = int(draw_seed(torch.device(device), torch.Generator(device).manual_seed(12)))
    z_rev, kl = fastvae.sample_normal_tril(mu.flip(-1).to(device), low.transpose(-2, -1).flip(-2, -1).to(device),
                                           3, generator=gen)
    eps = reference.sample_noise(seed, 3, (n, L), torch.float64, "cpu").flip(-1)
    z_notes = mu + torch.einsum("nij,knj->kni", low.transpose(-2, -1), eps)
    torch.testing.assert_close(z_rev.flip(-1).cpu(), z_notes, rtol=1e-12, atol=1e-12)
    cov = low.transpose(-2, -1) @ low  # the notes' L^T L
    kl_notes = kl_divergence(MultivariateNormal(mu, covariance_matrix=cov), standard_normal(L))
    torch.testing.assert_close(kl.cpu(), kl_notes, rtol=1e-10, atol=1e-10)


def test_sample_covariance(backend):
    """z ~ N(mu, S S^T): the sample mean and covariance within 5 standard errors."""
    _, device = backend
    S0 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0], [-0.5, 0.3, 0.4, 0.0], [0.2, -0.7, 0.1, 0.9]])
    n_rows, K = 64, 200  # 12800 samples
    mu = torch.full((n_rows, 4), 1.5, device=device)
    S = S0.expand(n_rows, 4, 4).to(device)
    torch.manual_seed(1234)
    z, _ = fastvae.sample_normal_tril(mu, S, K)
    x = (z.double().cpu() - 1.5).reshape(-1, 4)
    n = x.shape[0]
    cov = (S0 @ S0.T).double()
    assert (x.mean(0).abs() < 5 * cov.diagonal().sqrt() / math.sqrt(n)).all()
    emp = x.T @ x / n
    se = torch.sqrt((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n)
    assert ((emp - cov).abs() < 5 * se).all(), (emp, cov)


def test_reproducible_and_independent(backend):
    _, device = backend
    mu, S = make_inputs((16,), 9, 0, 1.0, 0.5, torch.float32, device)
    torch.manual_seed(7)
    z1, _ = fastvae.sample_normal_tril(mu, S, 3)
    z2, _ = fastvae.sample_normal_tril(mu, S, 3)
    torch.manual_seed(7)
    z1_again, _ = fastvae.sample_normal_tril(mu, S, 3)
    assert torch.equal(z1, z1_again) and not torch.equal(z1, z2)


def test_n_samples_none_is_first_sample(backend):
    _, device = backend
    mu, S = make_inputs((4,), 5, 0, 1.0, 1.0, torch.float32, device)
    sampler_checks.n_samples_none_is_first_sample(fastvae.sample_normal_tril, mu, S)


def test_unbatched_and_non_contiguous_inputs(backend):
    _, device = backend
    mu, S = make_inputs((6, 4), 8, 5, 2.0, 1.0, torch.float32, device)
    mu_t, S_t = mu.transpose(0, 1)[::2], S.transpose(0, 1)[::2]
    assert not mu_t.is_contiguous() and not S_t.is_contiguous()
    gen = lambda: torch.Generator(device).manual_seed(11)  # noqa: E731
    z, kl = fastvae.sample_normal_tril(mu_t, S_t, 2, generator=gen())
    z_c, kl_c = fastvae.sample_normal_tril(mu_t.contiguous(), S_t.contiguous(), 2, generator=gen())
    assert torch.equal(z, z_c) and torch.equal(kl, kl_c)
    z1, kl1 = fastvae.sample_normal_tril(mu[0, 0], S[0, 0], generator=gen())  # no batch dimension
    assert z1.shape == (8,) and kl1.shape == ()


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)])
def test_empty_batches(backend, shape):
    _, device = backend
    L = shape[-1]
    mu = torch.zeros(shape, device=device, requires_grad=True)
    S = torch.zeros((*shape, L), device=device, requires_grad=True)
    z, kl = fastvae.sample_normal_tril(mu, S, 2)
    assert z.shape == (2, *shape) and kl.shape == shape[:-1]
    assert torch.equal(kl, torch.zeros(shape[:-1], device=device))
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == shape and S.grad.shape == S.shape


def test_no_noise_saved_for_backward(backend):
    """Only mu, scale_tril and the seed are saved: nothing of size K x B x L."""
    _, device = backend
    mu, S = make_inputs((32,), 4, 0, 1.0, 1.0, torch.float32, device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        z, kl = fastvae.sample_normal_tril(mu, S, 16)
    assert saved and max(saved) <= S.numel() < z.numel()
    (z.sum() + kl.sum()).backward()


def test_gradcheck_float64(backend):
    _, device = backend
    mu, S = make_inputs((3,), 5, 4, 1.0, 1.0, torch.float64, device, requires_grad=True)
    seed = seed_tensor(12345, device)
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(lambda m, s: SampleNormalTril.apply(m, s, seed, 3), (mu, S), fast_mode=INTERPRET)


@pytest.mark.parametrize("use", ["z", "kl"])
def test_gradient_through_one_output(backend, use):
    _, device = backend
    mu, S = make_inputs((5,), 6, 1, 2.0, 1.0, torch.float64, device, requires_grad=True)
    z, kl = SampleNormalTril.apply(mu, S, seed_tensor(99, device), 2)
    dmu, dS = torch.autograd.grad(z.sum() if use == "z" else kl.sum(), (mu, S))
    mu64 = mu.detach().cpu().requires_grad_()
    S64 = S.detach().cpu().requires_grad_()
    z_ref, kl_ref = oracle.sample_normal_tril(mu64, S64, 99, 2)
    dmu_ref, dS_ref = torch.autograd.grad(z_ref.sum() if use == "z" else kl_ref.sum(), (mu64, S64))
    torch.testing.assert_close(dmu.cpu(), dmu_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dS.cpu(), dS_ref, rtol=1e-12, atol=1e-12)


def test_opcheck(backend):
    _, device = backend
    mu, S = make_inputs((4, 3), 6, 8, 1.0, 1.0, torch.float32, device, requires_grad=True)
    seed = seed_tensor(2024, device)
    torch.library.opcheck(sample_normal_tril_op, (mu, S, seed, 3))
    dz = torch.randn(3, 4, 3, 6, device=device)
    dkl = torch.randn(4, 3, device=device)
    m, s = mu.detach(), S.detach()
    torch.library.opcheck(sample_normal_tril_backward_op, (m, s, seed, dz, dkl))
    torch.library.opcheck(sample_normal_tril_backward_op, (m, s, seed, None, dkl))
    torch.library.opcheck(sample_normal_tril_backward_op, (m, s, seed, dz, None))


def test_errors_on_bad_input(backend):
    _, device = backend
    mu = torch.zeros(4, 3, device=device)
    S = torch.eye(3, device=device).expand(4, 3, 3)
    for bad in (torch.zeros(4, 3, device=device), torch.zeros(4, 3, 2, device=device),
                torch.zeros(5, 3, 3, device=device), torch.zeros(3, 3, device=device),
                torch.zeros(1, 4, 3, 3, device=device)):
        with pytest.raises(ValueError, match=r"scale_tril must have shape \(4, 3, 3\)"):
            fastvae.sample_normal_tril(mu, bad)
    assert fastvae.sample_normal_tril(mu, S.double())[1].dtype == torch.float64  # mixed dtypes: float64 wins
    with pytest.raises(TypeError, match="int64"):
        fastvae.sample_normal_tril(mu.long(), S)
    sampler_checks.refuses_bad_arguments(fastvae.sample_normal_tril, mu, S, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    """bf16/fp16 on every backend, computed in float32: z in the encoder's
    dtype, the KL in float32 (to float32 error of the rounded inputs'),
    gradients in each input's dtype."""
    _, device = backend
    mu, S = make_inputs((5,), 7, 3, 1.0, 0.5, dtype, device)
    mu, S = mu.detach().requires_grad_(), S.detach().requires_grad_()
    z, kl = SampleNormalTril.apply(mu, S, seed_tensor(77, device), 2)
    mu64, S64 = mu.detach().double().cpu(), S.detach().double().cpu()
    eps = reference.sample_noise(77, 2, mu64.shape, torch.float64, "cpu")
    z_ref, z_scale, kl_scale = forward_scales(mu64, S64, eps)
    assert (z.dtype, kl.dtype) == (dtype, torch.float32)
    grads = torch.autograd.grad(z.float().sum() + kl.sum(), [mu, S])
    assert [g.dtype for g in grads] == [dtype, dtype]
    assert_close(z, z_ref, z_scale, "z")
    assert_close(kl, oracle.sample_normal_tril(mu64, S64, 77, 1)[1], kl_scale, "kl")


def test_triton_split_over_samples(backend, monkeypatch):
    """The Triton forward splits K over programs on a GPU (one split under the interpreter): forced
    here to 3 splits of K = 5, the first split alone writes kl; the backward, one program per block
    of rows over every sample, matches the reference."""
    name, device = backend
    if name != "triton":
        pytest.skip("the Triton launchers' split over samples")
    from fastvae.ops.sample_normal_tril import triton as kernels

    monkeypatch.setattr(kernels, "sample_splits", lambda K, row_blocks, device: (3, 2))
    for L in (6, 70):  # one tile, and chunks
        mu, S = make_inputs((3,), L, 1, 2.0, 1.0, torch.float64, device, requires_grad=True)
        z, kl = SampleNormalTril.apply(mu, S, seed_tensor(21, device), 5)
        g = torch.Generator().manual_seed(5)
        gz = torch.randn(5, 3, L, generator=g, dtype=torch.float64)
        gk = torch.randn(3, generator=g, dtype=torch.float64)
        dmu, dS = torch.autograd.grad((z, kl), (mu, S), (gz.to(device), gk.to(device)))
        mu64, S64 = mu.detach().cpu().requires_grad_(), S.detach().cpu().requires_grad_()
        z_ref, kl_ref = oracle.sample_normal_tril(mu64, S64, 21, 5)
        dmu_ref, dS_ref = torch.autograd.grad((z_ref, kl_ref), (mu64, S64), (gz, gk))
        for a, b in ((z, z_ref), (kl, kl_ref), (dmu, dmu_ref), (dS, dS_ref)):
            torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-11, atol=1e-11)


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(lambda mu, s: fastvae.sample_normal_tril(mu, s, K), (B, L), (B, L, L))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (5000 rows of L = 8, 3 samples)."""
    mu = leaf(5000, 8)
    S = (leaf(5000, 8, 8, scale=0.3).detach() + 2 * torch.eye(8)).requires_grad_()
    return [lambda: run(lambda a, b: fastvae.sample_normal_tril(a, b, 3, generator=gen(2)), mu, S)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    mu = leaf(3, 4)
    return lambda: run(lambda a: fastvae.sample_normal_tril(
        a, torch.eye(4, dtype=a.dtype).expand(3, 4, 4), 5, generator=gen(1)), mu)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck; scale_tril
    lower triangular with a diagonal in (1, 2) (kept away from 0 by the steps)."""
    def tril(N, L):
        return r(N, L, L).tril(-1) + torch.diag_embed(torch.sigmoid(r(N, L)) + 1)

    return {
        "sample_normal_tril": (lambda m, s: fastvae.sample_normal_tril(m, s, 2, generator=gen(3)),
                               [r(3, 4), tril(3, 4)], False),
        "sample_normal_tril_one_sample": (lambda m, s: fastvae.sample_normal_tril(m, s, generator=gen(3)),
                                          [r(2, 3), tril(2, 3)], False),
    }


# -- the ops' own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(tril_module)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, L, K", [(1, 1, 1), (13, 5, 3), (3, 70, 2)])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, N, L, K):
    """fastvae::sample_normal_tril and its backward called as a compiled graph
    calls them (mu (N, L), scale_tril (N, L, L), contiguous): on the triton
    backend from a plan of the call's signature (OP_PLANS), with the general
    launch's z, KL and both gradients bit for bit, for either upstream
    gradient and both, from the first call and the second; one element, K =
    1 and several, L past MAX_SINGLE_L (rows in chunks); half precision, a
    batch of two dimensions and a gradient of another dtype take the general
    launch and make no plan."""
    tril_module.OP_PLANS.clear()
    mu, S = make_inputs((N,), L, N * L + K, 0.5, 0.3, dtype, plan_device)
    seed = seed_tensor(N * 100 + L, plan_device)
    g = torch.Generator().manual_seed(K)
    grad_z = torch.randn(K, N, L, generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    grad_kl = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).to(plan_device)

    def calls():
        return [*sample_normal_tril_op(mu, S, seed, K),
                *(d for gz, gk in ((grad_z, grad_kl), (grad_z, None), (None, grad_kl))
                  for d in sample_normal_tril_backward_op(mu, S, seed, gz, gk))]

    op_plans_match_the_general_launch(monkeypatch, tril_module, calls)
    tril_module.OP_PLANS.clear()
    sample_normal_tril_op(mu.half(), S.half(), seed, K)
    sample_normal_tril_op(mu.unsqueeze(0), S.unsqueeze(0), seed, K)
    other = torch.float64 if dtype is torch.float32 else torch.float32
    sample_normal_tril_backward_op(mu, S, seed, grad_z.to(other), None)
    assert len(tril_module.OP_PLANS) == 0
