"""latent_log_ratio against its float64 oracle (fastvae/ops/latent_log_ratio/__init__.py),
per backend (the root conftest.py), and its cases of the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import strategies as st

import fastvae
from fastvae.ops import latent_log_ratio as oracle
from fastvae.ops import sample_normal as sample_normal_oracle
from fastvae.ops.latent_log_ratio.op import LatentLogRatio, latent_log_ratio_backward_op, latent_log_ratio_op
from fastvae.ops.sample_normal.op import SampleNormal

from conftest import INTERPRET
from helpers import assert_close, assert_compiled_matches_eager, reference_tests, seed_tensor

# L values: odd, powers of two and +-1, and longer than one Triton block (1024)
LATENT = [1, 2, 3, 7, 32, 33, 100, 1025, 1537]


@st.composite
def problems(draw):
    L = draw(st.sampled_from(LATENT))
    K = draw(st.sampled_from([None, 1, 2, 5]))  # None: z has mu's shape
    batch = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)))
    while math.prod(batch) * (K or 1) * L > 8000 and batch:
        batch = batch[1:]
    return dict(
        L=L, K=K, batch=batch, stop_score=draw(st.booleans()),
        lv_bound=draw(st.sampled_from([1.0, 5.0, 30.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make(p, dtype, device):
    """z (K, ..., L) near q's samples (and a few far from them), mu, logvar (..., L)."""
    g = torch.Generator().manual_seed(p["seed"])
    shape = (*p["batch"], p["L"])
    mu = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    lv = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * p["lv_bound"]
    zshape = shape if p["K"] is None else (p["K"], *shape)
    eps = torch.randn(zshape, generator=g, dtype=torch.float64) * 2
    z = mu + torch.exp(0.5 * lv) * eps
    return [t.to(dtype).to(device).requires_grad_() for t in (z, mu, lv)]


def scales(z, mu, lv, g):
    """Magnitudes of the terms behind r and its gradients (float64, (K, ..., L) z)."""
    inv_s = torch.exp(-0.5 * lv)
    eps = (z - mu) * inv_s
    r = 0.5 * (eps * eps + z * z + lv.abs()).sum(-1)
    gz = g[..., None].abs()
    dz = gz * (eps.abs() * inv_s + z.abs())
    dmu = (gz * eps.abs()).sum(0) * inv_s
    dlv = 0.5 * (gz * (1 + eps * eps)).sum(0)
    return r, dz, dmu, dlv


def check_against_reference(p, dtype, device):
    """r and its gradients in p's mode against the float64 reference."""
    z, mu, lv = make(p, dtype, device)
    r = fastvae.latent_log_ratio(z, mu, lv, stop_score=p["stop_score"])
    assert r.shape == z.shape[:-1] and r.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    g = torch.randn(r.shape, generator=torch.Generator().manual_seed(p["seed"] + 1), dtype=torch.float64)
    grads = torch.autograd.grad(r, (z, mu, lv), g.to(dtype).to(device), allow_unused=True)

    args64 = [t.detach().double().cpu().requires_grad_() for t in (z, mu, lv)]
    r_ref = oracle.latent_log_ratio(*args64, stop_score=p["stop_score"])
    g64 = g.to(dtype).double()
    refs = torch.autograd.grad(r_ref, args64, g64, allow_unused=True)

    z64, mu64, lv64 = (t.detach() for t in args64)
    if p["K"] is None:
        z64, g64 = z64[None], g64[None]
    r_scale, dz_scale, dmu_scale, dlv_scale = scales(z64, mu64, lv64, g64)
    if p["K"] is None:
        r_scale, dz_scale = r_scale[0], dz_scale[0]
    assert_close(r, r_ref.detach(), r_scale, "r")
    assert_close(grads[0], refs[0], dz_scale, "dz")
    if p["stop_score"]:
        assert grads[1] is None and grads[2] is None and refs[1] is None
    else:
        assert_close(grads[1], refs[1], dmu_scale, "dmu")
        assert_close(grads[2], refs[2], dlv_scale, "dlogvar")
    return r, grads


# exp(-logvar) in the gradient must fit float16's 65504
test_forward_backward_match_reference, test_half_precision_matches_reference = reference_tests(
    check_against_reference, problems(), float16_caps={"lv_bound": 5.0})


@pytest.mark.parametrize("stop_score", [False, True])
@pytest.mark.parametrize("K,batch,L", [(7, (5,), 33), (1, (3,), 1), (5, (1,), 300), (4, (300,), 3), (None, (2, 3), 5)])
def test_sums_over_samples_in_one_backward(backend, sample_splits, stop_score, K, batch, L):
    """dmu and dlogvar summed over K in one backward (K = 1, one row, odd L,
    more rows than one interpreter program), the samples in one pass or
    split, against the float64 reference; a second call gives the same bits."""
    _, device = backend
    p = dict(L=L, K=K, batch=batch, stop_score=stop_score, lv_bound=3.0, seed=L)
    r, grads = check_against_reference(p, torch.float32, device)
    again, grads_again = check_against_reference(p, torch.float32, device)
    assert torch.equal(r, again)
    for a, b in zip(grads, grads_again):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("L", [3, 1025])  # short rows and cpp's long-row path
def test_overflowing_z_gives_the_rounded_exact_value(backend, L):
    """z = +-1e30 in float32: the naive formula gives NaN (eps^2 and z^2 both
    inf) or -inf. Every backend gives the float64 value of
    the same float32 inputs rounded to float32: -inf where it overflows, a finite
    value where eps = z (logvar = 0 and mu below z's rounding), never NaN."""
    _, device = backend
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, L, generator=g)
    lv = torch.rand(4, L, generator=g) + 0.1
    lv[1] = 0.0  # eps = z - mu = z exactly in float32: eps^2 - z^2 = 0, the sum finite
    z = torch.randn(2, 4, L, generator=g)
    z[:, :, 0] = 1e30
    z[1, :, -1] = -1e30
    want = oracle.latent_log_ratio(z.double(), mu.double(), lv.double()).float()
    assert torch.isneginf(want[:, [0, 2, 3]]).all() and torch.isfinite(want[:, 1]).all()  # both cases occur
    got = fastvae.latent_log_ratio(z.to(device), mu.to(device), lv.to(device)).cpu()
    assert not got.isnan().any(), got
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), (got, want)
    # the scale of the finite rows' terms (where eps = z the term is 0 exactly)
    eps = (z.double() - mu.double()) * torch.exp(-0.5 * lv.double())
    terms = torch.where(z.abs() < 1e10, eps * eps + z.double() ** 2 + lv.double().abs(), 0.0).sum(-1)
    fin = torch.isfinite(want)
    assert_close(got[fin], want[fin], 1 + terms[fin], "finite rows")


def test_equals_difference_of_log_densities(backend):
    """r = log N(z; 0, I) - log N(z; mu, diag(e^logvar)): the log 2pi terms cancel."""
    _, device = backend
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(4, 6, generator=g, dtype=torch.float64)
    lv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    z = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) * 2
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    post = torch.distributions.Normal(mu, torch.exp(0.5 * lv)).log_prob(z).sum(-1)
    r = fastvae.latent_log_ratio(z.to(device), mu.to(device), lv.to(device))
    assert_close(r, prior - post, (prior.abs() + post.abs()), "r")


def test_stop_score_keeps_the_path_gradient(backend):
    """STL: with z from sample_normal, mu and logvar still get the gradient that
    flows through z (and only that one)."""
    _, device = backend
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(5, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    lv = torch.randn(5, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    seed = 2468
    z, _ = SampleNormal.apply(mu, lv, seed_tensor(seed, device), 4)
    r = fastvae.latent_log_ratio(z, mu, lv, stop_score=True)
    dmu, dlv = torch.autograd.grad(r.sum(), (mu, lv), retain_graph=True)

    mu64 = mu.detach().cpu().requires_grad_()
    lv64 = lv.detach().cpu().requires_grad_()
    z_ref, _ = sample_normal_oracle.sample_normal(mu64, lv64, seed, 4)
    r_ref = oracle.latent_log_ratio(z_ref, mu64, lv64, stop_score=True)
    dmu_ref, dlv_ref = torch.autograd.grad(r_ref.sum(), (mu64, lv64))
    eps = (z_ref - mu64) * torch.exp(-0.5 * lv64)
    inv_s = torch.exp(-0.5 * lv64.detach())
    dz_mag = (eps.abs() * inv_s + z_ref.abs()).detach()
    assert_close(dmu, dmu_ref, dz_mag.sum(0), "dmu")
    assert_close(dlv, dlv_ref, (dz_mag * eps.abs().detach()).sum(0) / inv_s, "dlogvar")
    # the full mode differs: it adds the score terms
    r_full = fastvae.latent_log_ratio(z, mu, lv)
    dmu_full, _ = torch.autograd.grad(r_full.sum(), (mu, lv))
    assert not torch.allclose(dmu_full, dmu)


def test_non_contiguous(backend):
    _, device = backend
    g = torch.Generator().manual_seed(5)
    z = torch.randn(9, 3, 2, generator=g).to(device).transpose(0, 2)  # (2, 3, 9)
    mu = torch.randn(9, 3, generator=g).to(device).t()
    lv = torch.randn(9, 3, generator=g).to(device).t()
    assert not z.is_contiguous() and not mu.is_contiguous()
    r = fastvae.latent_log_ratio(z, mu, lv)
    assert torch.equal(r, fastvae.latent_log_ratio(z.contiguous(), mu.contiguous(), lv.contiguous()))


@pytest.mark.parametrize("shapes", [((3, 0, 4), (0, 4)), ((0, 2, 4), (2, 4)), ((2, 5, 0), (5, 0))])
def test_empty(backend, shapes):
    _, device = backend
    zs, ms = shapes
    z = torch.zeros(zs, device=device, requires_grad=True)
    mu = torch.zeros(ms, device=device, requires_grad=True)
    lv = torch.zeros(ms, device=device, requires_grad=True)
    r = fastvae.latent_log_ratio(z, mu, lv)
    assert r.shape == zs[:-1]
    assert torch.equal(r, torch.zeros(zs[:-1], device=device))
    r.sum().backward()
    assert z.grad.shape == zs and mu.grad.shape == ms


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    name, device = backend
    p = dict(L=37, K=3, batch=(4,), stop_score=False, lv_bound=3.0, seed=1)
    z, mu, lv = make(p, dtype, device)
    r = fastvae.latent_log_ratio(z, mu, lv)
    assert r.dtype == torch.float32  # a log-density is never rounded to half precision
    z64, mu64, lv64 = (t.detach().double().cpu() for t in (z, mu, lv))
    r_scale = scales(z64, mu64, lv64, torch.ones(3, 4, dtype=torch.float64))[0]
    assert_close(r, oracle.latent_log_ratio(z64, mu64, lv64), r_scale, "r")
    grads = torch.autograd.grad(r.sum(), [t for t in (z, mu, lv) if t.requires_grad])
    assert all(g.dtype == dtype for g in grads)
    r = fastvae.latent_log_ratio(z.float(), mu, lv)  # a float32 z beside half mu, logvar
    assert_close(r, oracle.latent_log_ratio(z64, mu64, lv64), r_scale, "r (float32 z)")


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    mu, lv = (torch.randn(3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(2))
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(lambda *a: LatentLogRatio.apply(*a, False), (z, mu, lv), fast_mode=INTERPRET)
    assert torch.autograd.gradcheck(lambda a: LatentLogRatio.apply(a, mu, lv, True), (z,), fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    z = torch.randn(3, 2, 5, device=device, requires_grad=True)
    mu = torch.randn(2, 5, device=device, requires_grad=True)
    lv = torch.randn(2, 5, device=device, requires_grad=True)
    for stop in (False, True):
        torch.library.opcheck(latent_log_ratio_op, (z, mu, lv, stop))
        g = torch.randn(3, 2, device=device)
        torch.library.opcheck(latent_log_ratio_backward_op, (g, z.detach(), mu.detach(), lv.detach(), stop))


def test_errors_on_bad_input(backend):
    _, device = backend
    mu = torch.zeros(4, 3, device=device)
    with pytest.raises(ValueError, match=r"z of shape \(2, 4, 2\) must have mu's shape \(4, 3\)"):
        fastvae.latent_log_ratio(torch.zeros(2, 4, 2, device=device), mu, mu)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        fastvae.latent_log_ratio(mu, mu, torch.zeros(4, 2, device=device))
    assert fastvae.latent_log_ratio(mu, mu, torch.zeros(4, 3, dtype=torch.float64, device=device)).dtype == \
        torch.float64  # mixed dtypes: float64 wins
    with pytest.raises(TypeError, match="stop_score"):
        fastvae.latent_log_ratio(mu, mu, mu, stop_score=1)
    with pytest.raises(ValueError, match="0-d"):
        zero = torch.zeros((), device=device)
        fastvae.latent_log_ratio(zero, zero, zero)


main_process_only = pytest.mark.skipif(INTERPRET, reason="main-process tests (cpp backend)")


@main_process_only
def test_cpp_boundary_checks():
    from fastvae import _C

    z, mu, r = torch.zeros(2, 4, 3).numpy(), torch.zeros(4, 3).numpy(), torch.zeros(2, 4).numpy()
    with pytest.raises(ValueError, match="out: expected shape"):
        _C.latent_log_ratio_forward(z, mu, mu, torch.zeros(2, 3).numpy(), 1)
    with pytest.raises(ValueError, match="z: expected shape"):
        _C.latent_log_ratio_forward(torch.zeros(2, 4, 2).numpy(), mu, mu, r, 1)
    with pytest.raises(ValueError, match="both be given"):
        _C.latent_log_ratio_backward(r, z, mu, mu, z.copy(), mu.copy(), None, 1)


def stl_loss(enc, dec, x, seed, stop_score):
    mu, logvar = enc(x).chunk(2, dim=-1)
    z, _ = SampleNormal.apply(mu, logvar, seed, 3)
    lw = -0.5 * ((dec(z) - x) ** 2).sum(-1) + fastvae.latent_log_ratio(z, mu, logvar, stop_score=stop_score)
    return -lw.mean()


@main_process_only
@pytest.mark.parametrize("stop_score", [False, True])
def test_compiles_fullgraph(monkeypatch, stop_score):
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)
    x, seed = torch.randn(5, 6), torch.tensor(99)
    params = list(enc.parameters()) + list(dec.parameters())
    assert_compiled_matches_eager(stl_loss, (enc, dec, x, seed, stop_score), params, atol=1e-6, grad_rtol=1e-5)


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(fastvae.latent_log_ratio, (K, B, L), (B, L), (B, L))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (dmu and dlogvar: sums over samples)."""
    mu, lv, zk = leaf(20000, 8), leaf(20000, 8), leaf(4, 20000, 8)
    return [lambda: run(lambda a, b, c: fastvae.latent_log_ratio(a, b, c), zk, mu, lv)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    mu, lv, zs = leaf(3, 4), leaf(3, 4), leaf(5, 3, 4)
    return lambda: run(lambda z, a, b: fastvae.latent_log_ratio(z, a, b), zs, mu, lv)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck."""
    ratio = lambda z, m, lv: fastvae.latent_log_ratio(z, m, lv)
    return {
        "latent_log_ratio": (ratio, [r(2, 3, 4), r(3, 4), r(3, 4)], False),
        "latent_log_ratio_one_sample": (ratio, [r(3, 4), r(3, 4), r(3, 4)], False),
    }
