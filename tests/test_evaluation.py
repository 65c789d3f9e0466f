"""Large-K evaluation: log_likelihood, reconstruction_probability, evaluate.

Checked against a plain-PyTorch oracle that draws the documented noise
(eps[g, k, l] at Philox offset g*K*L + k*L + l) with the reference Philox, and
against the closed-form log p(x) of probabilistic PCA; chunk-, batch- and
process-count invariance; the strided noise fill on every backend.
"""
import math
import os
import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae
from fastvae import reference
from fastvae._backend import accumulation_dtype
from fastvae._noise import evaluation_noise, randn_fill
from fastvae.evaluation import (
    EvaluationResult,
    LogLikelihoodStats,
    evaluate,
    log_likelihood,
    reconstruction_probability,
)

from conftest import INTERPRET
from helpers import (
    FOLDED_FORMS,
    INTERPRETER_FOLDED_FORMS,
    assert_close,
    folded_decoder_case,
    gen,
    philox_seed_of,
    run_gloo_ranks,
    seed_tensor,
)

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)
main_process_only = pytest.mark.skipif(INTERPRET, reason="main-process tests (backend-independent)")


# -- models ---------------------------------------------------------------------------


def mlp_model(D, L, kind, *, seed=0, dtype=F64, hidden=8, device="cpu"):
    """A small nonlinear encoder/decoder pair; kind: "mean", "pair" (mean, logvar) or "bernoulli"."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(device, dtype)

    We, Wmu, Wlv = w(D, hidden, scale=1 / math.sqrt(D)), w(hidden, L), w(hidden, L, scale=0.3)
    Wd, Wout, Wvar = w(L, hidden), w(hidden, D, scale=0.5), w(hidden, D, scale=0.2)
    bias = w(D)

    def encode(x):
        h = torch.tanh(x @ We)
        return h @ Wmu, h @ Wlv - 0.5

    def decode(z):
        h = torch.tanh(z @ Wd)
        out = h @ Wout + bias
        return (out, h @ Wvar) if kind == "pair" else out

    return encode, decode


def make_data(B, D, kind, *, seed=1, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if kind == "bernoulli":
        return (torch.rand(B, D, generator=g, dtype=F64) < 0.4).to(device, dtype)
    return torch.randn(B, D, generator=g, dtype=F64).to(device, dtype)


def likelihood_of(kind):
    return "bernoulli" if kind == "bernoulli" else "gaussian"


def ppca(B=16, D=10, L=3, sigma=0.5, seed=0, device="cpu"):
    """Probabilistic PCA with orthogonal columns of W, so that the exact posterior is diagonal.

    Returns x (B, D), exact log p(x) (B,), the exact posterior (mean, logvar) as
    an encoder, the decoder ((mean, logvar) of p(x|z)) and the parts (W, b, sigma).
    """
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, L, generator=g, dtype=F64))
    W = U * torch.linspace(2.0, 0.5, L, dtype=F64)
    b = torch.randn(D, generator=g, dtype=F64)
    z = torch.randn(B, L, generator=g, dtype=F64)
    x = z @ W.T + b + sigma * torch.randn(B, D, generator=g, dtype=F64)
    cov = W @ W.T + sigma**2 * torch.eye(D, dtype=F64)
    exact = torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)
    # M = W^T W + sigma^2 I is diagonal because W's columns are orthogonal
    m_diag = (W * W).sum(0) + sigma**2
    post_logvar = torch.log(sigma**2 / m_diag)
    W, b, x, exact, m_diag, post_logvar = (t.to(device) for t in (W, b, x, exact, m_diag, post_logvar))

    def encode(xx):
        mu = (xx - b) @ W / m_diag
        return mu, post_logvar.expand_as(mu)

    x_logvar = torch.full((D,), math.log(sigma**2), dtype=F64, device=device)

    def decode(zz):
        return zz @ W.T + b, x_logvar

    return x, exact, encode, decode, (W, b, sigma)


# -- the oracle ----------------------------------------------------------------------


def oracle_log_weights(x, encode, decode, K, seed, kind, with_ratio, first_example=0):
    """(K, B) log-weights in plain PyTorch with the documented noise layout,
    and a scale for each example bounding the size of the terms summed."""
    mu, logvar = encode(x)
    B, L = mu.shape
    g = first_example + torch.arange(B, device=x.device)[None, :, None]
    offsets = g * K * L + torch.arange(K, device=x.device)[:, None, None] * L + torch.arange(L, device=x.device)
    eps = reference.philox_randn(seed, offsets, accumulation_dtype(x.dtype)).to(x.dtype)
    z = mu + torch.exp(0.5 * logvar) * eps
    out = decode(z)
    if kind == "bernoulli":
        terms = x * out - F.softplus(out)
    else:
        mean, lv = out if kind == "pair" else (out, torch.zeros_like(out))
        lv = lv.expand_as(mean)
        terms = -0.5 * ((x - mean) ** 2 * torch.exp(-lv) + lv + LOG_2PI)
    lw = terms.sum(-1)
    size = terms.abs().sum(-1)
    if with_ratio:
        ratio_terms = -0.5 * z**2 + 0.5 * eps**2 + 0.5 * logvar
        lw = lw + ratio_terms.sum(-1)
        size = size + ratio_terms.abs().sum(-1)
    return lw, size


def oracle_stats(lw):
    """log-mean-exp, ESS and delta-method standard error of (K, B) log-weights."""
    K = lw.shape[0]
    ll = torch.logsumexp(lw, 0) - math.log(K)
    w = torch.exp(lw - lw.max(0).values)
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    se = w.std(0) / (math.sqrt(K) * w.mean(0)) if K > 1 else torch.full_like(ll, math.nan)
    return ll, se, ess


# -- the noise ------------------------------------------------------------------------


@given(seed=st.integers(0, 2**63 - 1), offset0=st.integers(0, 2**36), rows=st.integers(0, 5),
       cols=st.integers(1, 600), stride=st.integers(0, 2000), f64=st.booleans())
def test_randn_fill_dispatch(backend, seed, offset0, rows, cols, stride, f64):
    """fastvae._noise.randn_fill on the backend under test equals the reference fill."""
    _, device = backend
    dtype = F64 if f64 else torch.float32
    out = randn_fill(seed_tensor(seed, device), offset0, torch.full((rows, cols), math.nan, dtype=dtype, device=device),
                     stride).cpu()
    expected = torch.empty(rows, cols, dtype=dtype)  # the noise of out's dtype, computed in float64
    reference.randn_fill(seed, offset0, expected, stride)
    expected = expected.double()
    if f64:
        assert torch.allclose(out, expected, rtol=1e-13, atol=1e-13)
    else:
        assert not out.isnan().any()
        assert ((out.double() - expected).abs() <= 2e-6 * expected.abs() + 1e-6).all()
    flat = randn_fill(seed_tensor(seed, device), offset0, torch.empty(cols, dtype=F64, device=device)).cpu()
    assert torch.allclose(flat, reference.philox_randn(seed, offset0 + torch.arange(cols)), rtol=1e-13, atol=1e-13)


@main_process_only
def test_randn_fill_rejects_bad_arguments():
    s = seed_tensor(3, "cpu")
    with pytest.raises(TypeError, match="float32 or float64"):
        randn_fill(s, 0, torch.empty(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous 1-d or 2-d"):
        randn_fill(s, 0, torch.empty(4, 3).t())
    with pytest.raises(ValueError, match="2-d out only"):
        randn_fill(s, 0, torch.empty(4), 2)
    with pytest.raises(ValueError, match="offset0 must be an int >= 0"):
        randn_fill(s, -1, torch.empty(4))
    with pytest.raises(ValueError, match="row_stride must be an int >= 0"):
        randn_fill(s, 0, torch.empty(2, 4), -3)
    with pytest.raises(ValueError, match="exceeds 2\\*\\*63 - 1"):
        randn_fill(s, 2**63 - 3, torch.empty(4))


@given(g0=st.integers(0, 10**6), n=st.integers(1, 4), K=st.integers(1, 9), L=st.integers(1, 5), data=st.data())
def test_evaluation_noise_layout(backend, g0, n, K, L, data):
    """Samples [k0, k1) of examples g0.. are the normals at offsets g*K*L + k*L + l."""
    k0 = data.draw(st.integers(0, K - 1))
    k1 = data.draw(st.integers(k0 + 1, K))
    _, device = backend
    eps = evaluation_noise(seed_tensor(99, device), first_example=g0, n_examples=n, n_samples=K,
                           k0=k0, k1=k1, latent=L, dtype=F64, device=device).cpu()
    g = g0 + torch.arange(n)[None, :, None]
    k = torch.arange(k0, k1)[:, None, None]
    expected = reference.philox_randn(99, g * K * L + k * L + torch.arange(L))
    assert eps.shape == (k1 - k0, n, L)
    assert torch.allclose(eps, expected, rtol=1e-13, atol=1e-13)


# -- against the oracle -------------------------------------------------------------


KINDS = ("mean", "pair", "bernoulli")


@given(B=st.integers(1, 5), D=st.integers(1, 40), L=st.integers(1, 4), K=st.integers(1, 12),
       kind=st.sampled_from(KINDS), with_ratio=st.booleans(), model_seed=st.integers(0, 100),
       chunk=st.one_of(st.none(), st.integers(1, 14)))
def test_matches_oracle_float64(backend, B, D, L, K, kind, with_ratio, model_seed, chunk):
    """Estimate, standard error and ESS equal the plain-PyTorch computation from the same noise."""
    _, device = backend
    encode, decode = mlp_model(D, L, kind, seed=model_seed, device=device)
    x = make_data(B, D, kind, seed=model_seed + 1, device=device)
    fn, k_arg = (log_likelihood, "k") if with_ratio else (reconstruction_probability, "n_samples")
    stats = fn(x, encode, decode, **{k_arg: K}, likelihood=likelihood_of(kind), chunk_size=chunk,
               generator=gen(model_seed), return_stats=True)
    assert isinstance(stats, LogLikelihoodStats)
    lw, size = oracle_log_weights(x, encode, decode, K, philox_seed_of(model_seed), kind, with_ratio)
    ll, se, ess = oracle_stats(lw)
    scale = 1 + size.max(0).values  # an error in any log-weight moves the result by at most this much
    assert_close(stats.log_likelihood, ll, scale, "log_likelihood")
    assert_close(stats.ess, ess, ess * 4 * scale, "ess")
    if K == 1:
        assert stats.stderr.isnan().all()
    else:
        # compared squared: se**2 = (r - 1) / (K - 1) with r = K / ESS is well-conditioned, se near 0 is not
        r = K / ess
        assert_close(stats.stderr**2, se**2, 4 * r * scale / (K - 1), "stderr**2")
    assert ((stats.ess >= 1 - 1e-9) & (stats.ess <= K + 1e-9)).all()


def test_float32_matches_float64_oracle(backend):
    """float32 inputs: float32 noise and arithmetic, the same estimate to float32 rounding."""
    _, device = backend
    B, D, L, K = 4, 30, 3, 9
    encode64, decode64 = mlp_model(D, L, "pair", seed=5, device=device)
    encode32, decode32 = mlp_model(D, L, "pair", seed=5, dtype=torch.float32, device=device)
    x = make_data(B, D, "pair", seed=6, device=device)
    out = log_likelihood(x.float(), encode32, decode32, k=K, chunk_size=4, generator=gen(2), likelihood="gaussian")
    assert out.dtype == torch.float32
    lw, size = oracle_log_weights(x, encode64, decode64, K, philox_seed_of(2), "pair", True)
    ll, _, _ = oracle_stats(lw)
    # float32 rounding of the encoder, the noise and the decoder, relayed through tanh layers
    assert not out.isnan().any()
    assert ((out.double() - ll).abs() <= 1e-4 * (1 + size.max(0).values)).all()


# -- probabilistic PCA: the closed form -------------------------------------------------


@pytest.mark.parametrize("K", [1, 7])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_exact_posterior_gives_exact_log_likelihood(backend, K, chunk):
    """With q the exact posterior every log-weight is log p(x): the estimate is exact at any K."""
    _, device = backend
    x, exact, encode, decode, _ = ppca(device=device)
    stats = log_likelihood(x, encode, decode, k=K, chunk_size=chunk, return_stats=True, generator=gen(0),
                           likelihood="gaussian")
    assert_close(stats.log_likelihood, exact, exact.abs() * 100, "log_likelihood")  # ~1e-10
    assert (stats.ess - K).abs().max() <= 1e-9 * K
    if K == 1:
        assert stats.stderr.isnan().all()
    else:
        assert (stats.stderr >= 0).all() and stats.stderr.max() <= 1e-6


@main_process_only
def test_worse_posterior_gap_shrinks_with_k():
    """With a shifted, inflated q the estimate lies below log p(x) and rises toward it as K grows."""
    x, exact, encode, decode, _ = ppca(B=64)

    def worse(xx):
        mu, lv = encode(xx)
        return mu + 0.4, lv + 0.8

    gaps, stderrs = [], []
    for K in (1, 10, 100, 1000):
        stats = log_likelihood(x, worse, decode, k=K, generator=gen(4), return_stats=True, likelihood="gaussian")
        gaps.append((exact - stats.log_likelihood).mean().item())
        stderrs.append(stats.stderr.mean().item() if K > 1 else math.inf)
    assert gaps[0] > gaps[1] > gaps[2], gaps
    # by K = 100 the gap is within Monte Carlo error of 0: K = 1000 must not be significantly worse
    assert gaps[3] < gaps[2] + 3 * stderrs[2] / math.sqrt(64), (gaps, stderrs)
    assert gaps[0] > 1.0  # a visibly worse q
    # the bound holds in expectation: at large K the mean gap is >= 0 up to its Monte Carlo error
    assert gaps[3] > -3 * stderrs[3] / math.sqrt(64)
    assert gaps[3] < 0.1 * gaps[0]


@main_process_only
def test_reconstruction_probability_converges_to_closed_form():
    """log (1/L) sum p(x|z_l) -> log E_q p(x|z) = log N(x; W m + b, sigma^2 I + W S W^T)."""
    x, exact, encode, decode, (W, b, sigma) = ppca(B=8)
    mu, logvar = encode(x)
    cov = W @ torch.diag(torch.exp(logvar[0])) @ W.T + sigma**2 * torch.eye(x.shape[1], dtype=F64)
    target = torch.distributions.MultivariateNormal(mu @ W.T + b, covariance_matrix=cov).log_prob(x)
    stats = reconstruction_probability(x, encode, decode, n_samples=4000, generator=gen(8), return_stats=True,
                                       likelihood="gaussian")
    assert ((stats.log_likelihood - target).abs() <= 4 * stats.stderr + 1e-3).all()
    # not the log-likelihood: it leaves out the KL of q to the prior
    assert ((stats.log_likelihood - exact).abs() > 10 * stats.stderr).all()


# -- invariance ----------------------------------------------------------------------


@main_process_only
@pytest.mark.parametrize("kind", KINDS)
def test_chunk_size_does_not_change_the_result(kind):
    """L = 3, K = 11: most chunks start mid-counter (offsets not divisible by 4)."""
    B, D, L, K = 6, 25, 3, 11
    encode, decode = mlp_model(D, L, kind, seed=3)
    x = make_data(B, D, kind)
    lik = likelihood_of(kind)
    base = log_likelihood(x, encode, decode, k=K, likelihood=lik, chunk_size=K, generator=gen(1))
    others = [log_likelihood(x, encode, decode, k=K, likelihood=lik, chunk_size=c, generator=gen(1))
              for c in (1, 3, 7, 50, None)]
    # a budget too small for one sample of every example: one example per block
    others.append(log_likelihood(x, encode, decode, k=K, likelihood=lik, memory_budget=1, generator=gen(1)))
    for out in others:
        assert_close(out, base, 1 + base.abs(), "chunked")
    out32 = [log_likelihood(x.float(), *mlp_model(D, L, kind, seed=3, dtype=torch.float32), k=K,
                            likelihood=lik, chunk_size=c, generator=gen(1)) for c in (1, 4, None)]
    for out in out32[1:]:
        assert_close(out, out32[0], 1 + out32[0].abs(), "chunked float32")


@main_process_only
def test_seed_and_generator():
    encode, decode = mlp_model(8, 2, "mean")
    x = make_data(3, 8, "mean")
    a = log_likelihood(x, encode, decode, k=5, generator=gen(7), likelihood="gaussian")
    assert torch.equal(a, log_likelihood(x, encode, decode, k=5, generator=gen(7), likelihood="gaussian"))
    assert not torch.equal(a, log_likelihood(x, encode, decode, k=5, generator=gen(8), likelihood="gaussian"))
    torch.manual_seed(11)
    b = log_likelihood(x, encode, decode, k=5, likelihood="gaussian")
    c = log_likelihood(x, encode, decode, k=5, likelihood="gaussian")
    torch.manual_seed(11)
    assert torch.equal(b, log_likelihood(x, encode, decode, k=5, likelihood="gaussian"))
    assert not torch.equal(b, c)


# -- evaluate ----------------------------------------------------------------------------


@main_process_only
def test_evaluate_is_batch_size_invariant_and_reports_the_summary():
    N, D, L, K = 10, 12, 2, 6
    encode, decode = mlp_model(D, L, "bernoulli", seed=2)
    x = make_data(N, D, "bernoulli", seed=3)
    y = torch.arange(N)
    full = log_likelihood(x, encode, decode, k=K, likelihood="bernoulli", generator=gen(5), return_stats=True)
    for batch_size in (1, 3, 4, N):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
        res = evaluate(loader, encode, decode, k=K, likelihood="bernoulli", generator=gen(5), progress=False)
        assert isinstance(res, EvaluationResult)
        assert_close(res.per_example, full.log_likelihood, 1 + full.log_likelihood.abs(), "per_example")
    ll = full.log_likelihood
    assert res.n_examples == N and res.dim == D and res.k == K
    assert math.isclose(res.log_likelihood, ll.mean().item(), rel_tol=1e-12)
    assert math.isclose(res.stderr, (ll.std() / math.sqrt(N)).item(), rel_tol=1e-12)
    assert res.nll == -res.log_likelihood
    assert math.isclose(res.bits_per_dim, res.nll / (D * math.log(2)), rel_tol=1e-14)
    assert math.isclose(res.mc_stderr, (full.stderr**2).sum().sqrt().item() / N, rel_tol=1e-12)
    # plain tensors as batches, and g continues across them
    res2 = evaluate([x[:7], x[7:]], encode, decode, k=K, likelihood="bernoulli", generator=gen(5), progress=False)
    assert_close(res2.per_example, ll, 1 + ll.abs(), "tensor batches")
    one = evaluate([x[:1]], encode, decode, k=K, likelihood="bernoulli", progress=False)
    assert one.n_examples == 1 and math.isnan(one.stderr)


@main_process_only
def test_progress_bar_only_when_asked(capsys, monkeypatch):
    encode, decode = mlp_model(5, 2, "mean")
    x = make_data(4, 5, "mean")
    log_likelihood(x, encode, decode, k=4, chunk_size=1, likelihood="gaussian")
    evaluate([x, x], encode, decode, k=4, progress=False, likelihood="gaussian")
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    # the default (progress=None) asks tqdm for a bar that appears only after 2 s
    import tqdm.auto
    seen = []
    real = tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **kw: seen.append(kw) or real(*a, **{**kw, "disable": True}))
    evaluate([x, x], encode, decode, k=4, likelihood="gaussian")
    assert len(seen) == 1 and seen[0]["delay"] == 2.0 and not seen[0]["disable"]
    monkeypatch.setattr(tqdm.auto, "tqdm", real)
    log_likelihood(x, encode, decode, k=4, chunk_size=1, progress=True, likelihood="gaussian")
    assert "log-likelihood" in capsys.readouterr().err
    evaluate([x, x], encode, decode, k=4, progress=True, likelihood="gaussian")
    assert "evaluate" in capsys.readouterr().err


@main_process_only
def test_all_zero_weights_give_minus_inf_not_nan():
    """A decoder putting the mean at infinity gives log p(x|z) = -inf: the estimate is -inf, ESS 0."""
    encode, _ = mlp_model(4, 2, "mean")
    x = make_data(3, 4, "mean")
    with pytest.warns(RuntimeWarning, match="importance weights are degenerate"):  # ESS 0 is flagged
        stats = log_likelihood(x, encode, lambda z: torch.full((*z.shape[:2], 4), math.inf, dtype=F64),
                               k=5, return_stats=True, likelihood="gaussian")
    assert (stats.log_likelihood == -math.inf).all()
    assert (stats.ess == 0).all()


# -- argument checks ----------------------------------------------------------------------


@main_process_only
def test_validation_errors():
    encode, decode = mlp_model(6, 2, "mean")
    x = make_data(3, 6, "mean")
    with pytest.raises(ValueError, match="k must be >= 1"):
        log_likelihood(x, encode, decode, k=0, likelihood="gaussian")
    with pytest.raises(TypeError, match="k must be an int"):
        log_likelihood(x, encode, decode, k=2.5, likelihood="gaussian")
    with pytest.raises(TypeError, match="k must be an int"):
        log_likelihood(x, encode, decode, k=True, likelihood="gaussian")
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        reconstruction_probability(x, encode, decode, n_samples=0, likelihood="gaussian")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        log_likelihood(x, encode, decode, k=4, chunk_size=0, likelihood="gaussian")
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        log_likelihood(x, encode, decode, k=4, chunk_size=2.0, likelihood="gaussian")
    with pytest.raises(ValueError, match="memory_budget must be >= 1"):
        log_likelihood(x, encode, decode, k=4, memory_budget=0, likelihood="gaussian")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        log_likelihood(x, encode, decode, k=4, likelihood="cauchy")
    with pytest.raises(ValueError, match="shard must be one of"):
        log_likelihood(x, encode, decode, k=4, shard="both", likelihood="gaussian")
    with pytest.raises(ValueError, match=r"shape \(B, \*event\)"):
        log_likelihood(x[0], encode, decode, k=4, likelihood="gaussian")
    with pytest.raises(TypeError, match="floating-point"):
        log_likelihood(x.long(), encode, decode, k=4, likelihood="gaussian")
    with pytest.raises(TypeError, match="\\(mu, logvar\\) pair, got Tensor"):
        log_likelihood(x, lambda xx: encode(xx)[0], decode, k=4, likelihood="gaussian")
    with pytest.raises(TypeError, match="pair, got tuple of 3 items"):
        log_likelihood(x, lambda xx: (*encode(xx), None), decode, k=4, likelihood="gaussian")
    with pytest.raises(ValueError, match="mu of shape \\(2, 2\\); expected \\(B, L\\) with B = 3"):
        log_likelihood(x, lambda xx: tuple(t[:2] for t in encode(xx)), decode, k=4, likelihood="gaussian")
    with pytest.raises(ValueError, match="shape mismatch"):
        log_likelihood(x, lambda xx: (encode(xx)[0], encode(xx)[1][:, :1]), decode, k=4, likelihood="gaussian")
    with pytest.raises(TypeError, match="on meta; x is torch.float64 on cpu"):
        log_likelihood(x, lambda xx: tuple(t.to("meta") for t in encode(xx)), decode, k=4, likelihood="gaussian")
    with pytest.raises(ValueError, match="decode returned a mean of shape \\(3, 3, 5\\); expected \\(3, 3, 6\\)"):
        log_likelihood(x, encode, lambda z: decode(z)[..., :5], k=4, chunk_size=3, likelihood="gaussian")
    with pytest.raises(ValueError, match="no examples"):
        evaluate([], encode, decode, k=4, likelihood="gaussian")
    with pytest.raises(ValueError, match="batch 1 has event shape \\(5,\\); earlier batches have \\(6,\\)"):
        evaluate([x, x[:, :5]], encode, decode, k=4, progress=False, likelihood="gaussian")
    with pytest.raises(TypeError, match="batch 0 must be a torch.Tensor"):
        evaluate([("a", "b")], encode, decode, k=4, likelihood="gaussian")
    # a callable argument that is not one is named, before any call: never "'str' object is not callable"
    with pytest.raises(TypeError, match="decode must be callable \\(z -> decoder output\\), got str"):
        log_likelihood(x, encode, "net", k=4, likelihood="gaussian")
    with pytest.raises(TypeError, match="encode must be callable .*, got NoneType"):
        reconstruction_probability(x, None, decode, n_samples=4, likelihood="gaussian")
    with pytest.raises(TypeError, match="decode must be callable .*, got Tensor"):
        evaluate([x], encode, x, k=4, likelihood="gaussian")


def test_the_users_callables_errors_carry_a_note_of_what_fastvae_passed():
    """encode, decode and log_weight_fn raising inside the evaluation: the
    same exception object, with a note of the argument's shape and dtype and
    the doc section that explains it."""
    encode, decode = mlp_model(6, 2, "mean")
    x = make_data(3, 6, "mean")
    error = KeyError("the model's own")

    def fail(_):
        raise error

    expected = {
        "encode(x) with x of shape (B, *event) = (3, 6)": lambda: log_likelihood(x, fail, decode, k=4,
                                                                                 likelihood="gaussian"),
        "decode(z) with z of shape (K_c, B, L) = (2, 3, 2)": lambda: evaluate([x], encode, fail, k=4, chunk_size=2,
                                                                              likelihood="gaussian"),
        "log_weight_fn(x_rep) with x_rep of shape (n, B, *event) = (4, 3, 6)": (
            lambda: fastvae.importance_log_likelihood(x, fail, k=4, chunk_size=4)),
    }
    for text, call in expected.items():
        with pytest.raises(KeyError) as info:
            call()
        assert info.value is error
        assert any(text in note for note in info.value.__notes__), (text, info.value.__notes__)
        error.__notes__.clear()


def test_log_likelihoods_dtype_is_x_and_the_encoders_on_every_path():
    """float64 when x or the encoder's output is float64, else float32, whatever
    the decoder's dtype: chunked or not, with stats, reconstruction_probability,
    an empty batch (which never calls the decoder)."""
    net = torch.nn.Linear(2, 6)
    for x_dtype, q_dtype, out_dtype, expected in [
        (torch.float32, torch.float64, torch.float32, torch.float64),
        (torch.float32, torch.float32, torch.float64, torch.float32),
        (torch.float64, torch.float32, torch.float32, torch.float64),
    ]:
        for B in (3, 0):
            x = torch.zeros(B, 6, dtype=x_dtype)

            def encode(xx, q_dtype=q_dtype):
                return torch.zeros(xx.shape[0], 2, dtype=q_dtype), torch.zeros(xx.shape[0], 2, dtype=q_dtype)

            def decode(z, out_dtype=out_dtype):
                return net(z.float()).to(out_dtype)

            results = [log_likelihood(x, encode, decode, k=4, likelihood="gaussian"),
                       log_likelihood(x, encode, decode, k=4, chunk_size=3, likelihood="gaussian",
                                      return_stats=True).log_likelihood,
                       reconstruction_probability(x, encode, decode, n_samples=4, likelihood="gaussian")]
            assert [r.dtype for r in results] == [expected] * 3, (x_dtype, q_dtype, out_dtype, B)


class _Decoded(Exception):
    """Raised by a decoder to stop an evaluation at its first chunk."""


@main_process_only
@pytest.mark.parametrize("k", [2**31, 2**40, 2**63])
def test_huge_k_streams_or_names_the_noise_limit(k):
    """The evaluation functions stream over k, so memory never refuses a huge k:
    2**31 and 2**40 reach the decoder in a chunk the memory budget allows, and
    only k past the Philox offsets (2**63 here) is a ValueError naming k."""
    x = torch.zeros(3, 4)
    mu = logvar = torch.zeros(3, 2)
    chunks = []

    def decode(z):
        chunks.append(z.shape)
        if z.shape[0] == 1:  # the probe of the decoder's width (_decoder_width): one sample
            return (z.new_zeros(*z.shape[:-1], 4), z.new_zeros(*z.shape[:-1], 4))  # (mean, logvar): W = 8
        raise _Decoded

    calls = {
        "k": lambda: log_likelihood(x, lambda a: (mu, logvar), decode, k=k, likelihood="gaussian"),
        "n_samples": lambda: reconstruction_probability(x, lambda a: (mu, logvar), decode, n_samples=k,
                                                        likelihood="gaussian"),
        "evaluate k": lambda: evaluate([x], lambda a: (mu, logvar), decode, k=k, likelihood="gaussian",
                                       progress=False),
    }
    for name, call in calls.items():
        if k < 2**63:
            with pytest.raises(_Decoded):
                call()
            assert chunks[-1][0] * 3 * (8 + 4 + 3 * 2) * 4 <= fastvae.evaluation.DEFAULT_MEMORY_BUDGET
        else:
            arg = name.split()[-1]  # the argument's own name, n_samples in reconstruction_probability
            with pytest.raises(ValueError, match=rf"^{arg}={k} is too large: .* Philox offset .* use {arg} <= "):
                call()


@main_process_only
def test_k_past_the_noise_stream_with_a_wide_latent():
    """k = 2**40 overflows the Philox offsets once examples x latents > 2**23."""
    x = torch.zeros(256, 1)
    mu = torch.zeros(256, 2**15 + 1)
    with pytest.raises(ValueError, match=r"^k=1099511627776 is too large: the noise of 256 examples"):
        log_likelihood(x, lambda a: (mu, mu), lambda z: z, k=2**40, likelihood="gaussian")


# -- torch.distributed -------------------------------------------------------------------

_DIST_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[5])
    from test_evaluation import gen, make_data, mlp_model
    from fastvae.evaluation import evaluate, log_likelihood
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    encode, decode = mlp_model(9, 2, "pair", seed=4)
    x = make_data(5, 9, "pair")
    results = {}
    for shard in ("examples", "samples"):
        for B in (5, 1):  # 5 does not split evenly; with 1 example, rank 1 has none
            s = log_likelihood(x[:B], encode, decode, k=31, chunk_size=3, generator=gen(3), shard=shard,
                               return_stats=True, likelihood="gaussian")
            results[(shard, B)] = tuple(s)
        results[(shard, "evaluate")] = evaluate([x[:2], x[2:]], encode, decode, k=7, generator=gen(3),
                                                shard=shard, progress=False, likelihood="gaussian").per_example
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()
""")


_MISMATCH_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[5])
    from test_evaluation import gen, make_data, mlp_model
    from fastvae.evaluation import evaluate, log_likelihood
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    encode, decode = mlp_model(9, 2, "pair", seed=4)
    x = make_data(5, 9, "pair")[: 5 - rank]  # rank 0: 5 examples, rank 1: 4
    raised = {}
    for shard in ("examples", "samples"):
        try:
            log_likelihood(x, encode, decode, k=7, generator=gen(3), shard=shard, likelihood="gaussian")
            raised[shard] = "returned"
        except ValueError as err:
            raised[shard] = str(err)
    # evaluate: the batches after the first, and the number of batches, are checked too
    x = make_data(5, 9, "pair")
    datasets = {"later batch": [x[:2], x[2:5 - rank]],  # rank 0: (2, 3), rank 1: (2, 2)
                "batch count": [x[:2], x[2:]][: 2 - rank],  # rank 1 runs out of batches first
                "no data": [x[:2]] if rank == 0 else []}
    for what, data in datasets.items():
        try:
            evaluate(data, encode, decode, k=7, generator=gen(3), progress=False, likelihood="gaussian")
            raised[what] = "returned"
        except ValueError as err:
            raised[what] = str(err)
    # after a refused call the ranks are still in step: a matching call works
    raised["after"] = log_likelihood(x, encode, decode, k=7, generator=gen(3), likelihood="gaussian")
    torch.save(raised, f"{out}.{rank}")
    dist.destroy_process_group()
""")


@main_process_only
def test_ranks_with_different_batches_all_raise(tmp_path):
    """gloo, 2 ranks given 5 and 4 examples: both raise the same ValueError (none
    returns while the other hangs in a collective), for both sharding modes;
    in evaluate also when a later batch differs or one rank has fewer batches."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    run_gloo_ranks(_MISMATCH_WORKER, lambda r: [str(tmp_path / "out"), tests_dir], tmp_path, timeout=120)
    for rank in range(2):
        raised = torch.load(tmp_path / f"out.{rank}")
        for shard in ("examples", "samples"):
            assert "needs the same batch on every rank" in raised[shard], (rank, shard, raised[shard])
            assert "rank 0: (5, 9), rank 1: (4, 9)" in raised[shard]
        assert "needs the same batch on every rank" in raised["later batch"], raised["later batch"]
        assert "got batch 1 of shape rank 0: (3, 9), rank 1: (2, 9)" in raised["later batch"]
        assert "rank 0: (3, 9), rank 1: no batch" in raised["batch count"], raised["batch count"]
        assert "rank 0: (2, 9), rank 1: no batch" in raised["no data"], raised["no data"]
        assert torch.isfinite(raised["after"]).all()


@main_process_only
def test_two_processes_give_the_single_process_result(tmp_path):
    """gloo, 2 ranks: example and sample sharding both equal one process with the same seed."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    run_gloo_ranks(_DIST_WORKER, lambda r: [str(tmp_path / "out"), tests_dir], tmp_path)
    encode, decode = mlp_model(9, 2, "pair", seed=4)
    x = make_data(5, 9, "pair")
    single_eval = evaluate([x], encode, decode, k=7, generator=gen(3), progress=False,
                           likelihood="gaussian").per_example
    for rank in range(2):
        results = torch.load(tmp_path / f"out.{rank}")
        for shard in ("examples", "samples"):
            for B in (5, 1):
                # k = 31: enough samples for a Pareto fit (a tail of 7), merged over the ranks' tails
                single = log_likelihood(x[:B], encode, decode, k=31, generator=gen(3), return_stats=True,
                                        likelihood="gaussian")
                for got, want, name in zip(results[(shard, B)], single, single._fields):
                    if name in ("unreliable", "k_used"):  # exact: flags and counts
                        assert torch.equal(got, want), (shard, B, rank, name, got, want)
                        continue
                    scale = 1 + want.abs() if name != "stderr" else 1 + want
                    if name == "pareto_k":  # float64 from float32 log-weights: float32's tolerance
                        got, want, scale = got.float(), want.float(), scale.float()
                    assert_close(got, want, scale * 10, f"{shard}, B={B}, rank {rank}: {name}")
            got = results[(shard, "evaluate")]
            assert_close(got, single_eval, 1 + single_eval.abs(), f"{shard} evaluate, rank {rank}")


def test_log_likelihood_survives_a_collapsed_posterior(backend):
    """logvar = -1e4: the latent term comes from the sampler's eps, so the
    estimate is finite and float32 agrees with float64 (it was NaN)."""
    name, device = backend
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 6, generator=g, dtype=F64)
    x = torch.randn(3, 6, generator=g, dtype=F64)
    mu = torch.randn(3, 4, generator=g, dtype=F64) * 0.5
    out = {}
    for dtype, backend_name in ((torch.float32, name), (F64, "reference")):
        def encode(a, dtype=dtype):
            return mu.to(device, dtype), torch.full((3, 4), -1e4, dtype=dtype, device=device)

        with fastvae.use_backend(backend_name):
            out[dtype] = log_likelihood(x.to(device, dtype), encode, lambda z, dtype=dtype: z @ W.to(device, dtype),
                                        k=16, chunk_size=5, generator=gen(2), likelihood="gaussian")
    assert torch.isfinite(out[torch.float32]).all()
    assert_close(out[torch.float32], out[F64], 1 + out[F64].abs(), f"{name} log p(x) at logvar -1e4")


def test_evaluation_result_repr_and_ess():
    """repr is one line (not the per-example tensor); ess_fraction is the mean ESS / K."""
    encode, decode = mlp_model(5, 2, "mean", seed=1)
    x = make_data(6, 5, "mean")
    res = evaluate([x[:3], x[3:]], encode, decode, k=20, likelihood="gaussian", generator=gen(0), progress=False)
    text = repr(res)
    assert "\n" not in text and "per_example" not in text and "ess_fraction=" in text
    stats = log_likelihood(x, encode, decode, k=20, likelihood="gaussian", generator=gen(0), return_stats=True)
    assert res.ess_fraction == pytest.approx(stats.ess.double().mean().item() / 20, rel=1e-6)


def test_degenerate_weights_are_flagged():
    """An encoder far from the posterior: few weights dominate, and the user is told."""
    _, decode = mlp_model(5, 2, "mean", seed=1)
    x = make_data(6, 5, "mean")

    def bad_encode(a):  # a proposal far wider than the posterior: a few samples carry the weight
        return torch.zeros(a.shape[0], 2, dtype=a.dtype), torch.full((a.shape[0], 2), 4.0, dtype=a.dtype)

    with pytest.warns(RuntimeWarning, match="importance weights are degenerate"):
        res = evaluate([x], bad_encode, decode, k=200, likelihood="gaussian", generator=gen(0), progress=False)
    assert res.ess_fraction < 0.05
    with pytest.warns(RuntimeWarning, match="mean ESS/K"):
        log_likelihood(x, bad_encode, decode, k=200, likelihood="gaussian", generator=gen(0), return_stats=True)


# -- chunk sizing and what a chunk launches -------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """The test's own count of the peak bytes of live tensors created under
    it (a storage freed when its last Python tensor goes), written apart from
    fastvae's _PeakBytes so the test does not check the code with itself."""

    def __init__(self):
        super().__init__()
        self.sizes, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.sizes[key][1] -= 1
        if self.sizes[key][1] == 0:
            self.current -= self.sizes.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        before = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                key = t.untyped_storage().data_ptr()
                if key not in self.sizes:
                    if key in before:
                        continue
                    self.sizes[key] = [t.untyped_storage().nbytes(), 0]
                    self.current += self.sizes[key][0]
                    self.peak = max(self.peak, self.current)
                self.sizes[key][1] += 1
                weakref.finalize(t, self._free, key)
        return out


@main_process_only
def test_the_default_chunk_keeps_a_wide_decoder_within_the_budget():
    """A decoder with a 1024-wide hidden layer at D = 8: a sample costs it
    ~8 KiB per example, 180 times what x's D counts. The chunk is sized from
    the memory the first chunks are measured to use, so the call's peak
    stays within the budget (+10%), with the same estimate as a fixed chunk
    size (the noise does not depend on the chunking). Categorical logits
    (D · C per sample) likewise; bytes_per_sample sets the cost instead."""
    torch.manual_seed(0)
    B, D, L, H, K, budget = 32, 8, 2, 1024, 300, 2**22
    decoder = torch.nn.Sequential(torch.nn.Linear(L, H), torch.nn.Tanh(), torch.nn.Linear(H, D))
    x = torch.randn(B, D)
    mu, logvar = 0.3 * torch.randn(B, L), torch.full((B, L), -1.0)
    encode = lambda a: (mu, logvar)  # noqa: E731
    sizes = []

    def decode(z):
        sizes.append(z.shape[0])
        return decoder(z)

    with _LiveBytes() as meter, torch.no_grad():
        est = log_likelihood(x, encode, decode, k=K, likelihood="gaussian", memory_budget=budget, generator=gen(0))
    assert sizes[:2] == [1, 2] and sum(sizes) == K and 2 < max(sizes) < K, sizes
    assert meter.peak <= 1.1 * budget, (meter.peak, budget)
    fixed = log_likelihood(x, encode, decode, k=K, likelihood="gaussian", chunk_size=K, generator=gen(0))
    torch.testing.assert_close(est, fixed, rtol=1e-5, atol=1e-5)

    sizes.clear()  # the user's figure: 16 KiB a sample of one example, 8 samples a chunk
    log_likelihood(x, encode, decode, k=K, likelihood="gaussian", memory_budget=B * 8 * 2**14,
                   bytes_per_sample=2**14, generator=gen(0))
    assert max(sizes) == 8 and sum(sizes) == K

    C = 1000
    W = torch.randn(L, D * C)
    xc = torch.randint(0, C, (3, D))
    with _LiveBytes() as meter:
        log_likelihood(xc, lambda a: (mu[:3], logvar[:3]), lambda z: (z @ W).unflatten(-1, (D, C)), k=200,
                       likelihood="categorical", memory_budget=2**20, generator=gen(0))
    assert meter.peak <= 1.1 * 2**20, meter.peak


@main_process_only
def test_the_chunk_is_sized_from_the_models_cost_where_fastvaes_own_buffers_peak_higher():
    """At K = 4000 the k̂ tail's merge (about 190 rows of the 256 examples,
    sorted) holds more than a 1- or 2-sample chunk of this model's
    log-weights: measured as one peak, the model's cost per sample would read
    as nearly nothing and one chunk would take every sample (over 100 times
    the budget). The model's peak and fastvae's are measured apart, so the
    chunks stay small and the call within the budget (+10%)."""
    B, D, K, budget = 256, 128, 4000, 2**26  # above the k̂ fit's own 32 MiB block (_pareto.gpd_fit)
    x = torch.randn(B, D)
    g = torch.Generator().manual_seed(0)
    sizes = []

    def log_weight_fn(x_rep):
        sizes.append(x_rep.shape[0])
        return -(x_rep + torch.randn(x_rep.shape, generator=g)).square().sum(-1)

    with _LiveBytes() as meter, torch.no_grad():
        fastvae.importance_log_likelihood(x, log_weight_fn, k=K, memory_budget=budget)
    assert sizes[:2] == [1, 2] and sum(sizes) == K and max(sizes) < K // 10, sizes
    assert meter.peak <= 1.1 * budget, (meter.peak, budget)


@main_process_only
def test_a_cost_that_appears_past_a_few_samples_is_measured_on_the_third_chunk():
    """A model whose buffer of 64 floats per sample and example appears only
    from 8 samples on (as a kernel's path for larger inputs does: fastvae's
    fused count ops): the 1- and 2-sample chunks do not see it, the third (a
    quarter of the chunk they predict) does, and the call stays within the
    budget (+10%)."""
    B, D, K, budget = 64, 16, 20000, 2**24
    x = torch.randn(B, D)
    g = torch.Generator().manual_seed(0)
    sizes = []

    def log_weight_fn(x_rep):
        n = x_rep.shape[0]
        sizes.append(n)
        lw = -(x_rep + torch.randn(x_rep.shape, generator=g)).square().sum(-1)
        if n >= 8:  # the large-input path's buffer
            lw = lw + torch.zeros(n, B, 64).sum(-1)
        return lw

    with _LiveBytes() as meter, torch.no_grad():
        fastvae.importance_log_likelihood(x, log_weight_fn, k=K, memory_budget=budget)
    assert sizes[:2] == [1, 2] and sizes[2] >= 8 and sum(sizes) == K, sizes[:4]
    assert meter.peak <= 1.1 * budget, (meter.peak, budget)


@main_process_only
def test_default_chunk_is_sized_from_free_cuda_memory(monkeypatch):
    """On CUDA, memory_budget=None means CUDA_FREE_MEMORY_FRACTION of the free
    memory reported by torch.cuda.mem_get_info at the call; elsewhere
    DEFAULT_MEMORY_BUDGET; an explicit memory_budget wins everywhere."""
    from fastvae import evaluation

    calls = []

    def mem_get_info(device=None):
        calls.append(device)
        return 40 * 2**30, 80 * 2**30  # (free, total)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert evaluation.memory_budget_for(cuda) == int(40 * 2**30 * evaluation.CUDA_FREE_MEMORY_FRACTION)
    assert calls == [cuda]
    assert evaluation.memory_budget_for(cpu) == evaluation.DEFAULT_MEMORY_BUDGET
    assert evaluation.memory_budget_for(cuda, 12345) == 12345 and len(calls) == 1
    monkeypatch.setattr(evaluation, "DEFAULT_MEMORY_BUDGET", 2**20)  # the module attribute is read per call
    assert evaluation.memory_budget_for(cpu) == 2**20

    # the plan: the largest chunk whose cost (fixed + per_sample * K_c, measured for n
    # examples and scaled to the rows decoded) fits the budget, at most what remains
    assert evaluation._chunk_plan(1000, 4, 4, 100, 90, 5000) == (10, 4)
    assert evaluation._chunk_plan(1000, 2, 4, 100, 90, 5000) == (21, 2)  # half the rows: (1000 - 50) // 45
    assert evaluation._chunk_plan(10**9, 4, 4, 100, 90, 7) == (7, 4)
    assert evaluation._chunk_plan(100, 4, 4, 100, 90, 5000) == (1, 2)  # one sample of all is 190: blocks of 2


_REAL_EMPTY_OUTPUT = fastvae._backend.empty_output  # before the NaN-poisoning fixture wraps it


@pytest.mark.skipif(not INTERPRET, reason="counts the Triton launchers under the interpreter")
def test_a_chunk_merges_its_states_in_one_launch(monkeypatch):
    """On the Triton path a chunk's states of w and w^2 are folded into the
    running ones by one logmeanexp launch, with no torch op: more chunks add
    launches (one per kernel of a chunk), and torch ops only for k̂'s tail."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    fastvae._backend.set_backend("triton")
    monkeypatch.setattr(fastvae._backend, "empty_output", _REAL_EMPTY_OUTPUT)  # no NaN fill to count
    launches, inside = [], [False]
    real_run = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        inside[0] = True
        try:
            return real_run(self, *args, **kwargs)
        finally:
            inside[0] = False

    # what the per-chunk merge used to run: dozens of these per chunk
    merge_ops = {"maximum", "where", "isinf", "eq", "abs", "fill", "fill_", "exp", "mul", "sub", "zeros", "full",
                 "cat", "scalar_tensor", "copy_", "_to_copy"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not inside[0] and name in merge_ops:
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    B, D, L, K = 5, 12, 4, 40
    encode, decode = mlp_model(D, L, "bernoulli", seed=2, dtype=torch.float32)
    x = make_data(B, D, "bernoulli", dtype=torch.float32)
    counts = {}
    interpreter.InterpretedFunction.run = run
    try:
        for stats in (False, True):
            for chunk in (40, 8):
                launches.clear()
                with Count() as c:
                    log_likelihood(x, encode, decode, k=K, likelihood="bernoulli", chunk_size=chunk,
                                   generator=gen(0), return_stats=stats)
                counts[stats, chunk] = (list(launches), c.ops)
    finally:
        interpreter.InterpretedFunction.run = real_run
    one, five = counts[False, 40], counts[False, 8]
    assert one[0].count("_logmeanexp_fwd_kernel") == 1 and five[0].count("_logmeanexp_fwd_kernel") == 5
    assert "_logmeanexp_finish_kernel" not in five[0]
    assert len(five[0]) - len(one[0]) == 4 * (len(one[0]))  # every kernel of a chunk, once a chunk
    # k̂'s tail, kept on every call (its warning): per chunk one cat with the kept
    # log-weights and one copy back into the rows' tail (and an add and a topk,
    # not merge ops); no merge op of the states per chunk; the same launches
    tail_ops = ["cat", "copy_"] * 4
    assert sorted(five[1]) == sorted(one[1] + tail_ops), (sorted(five[1]), sorted(one[1]))
    one_k, five_k = counts[True, 40], counts[True, 8]
    assert five_k[0] == five[0] and one_k[0] == one[0]
    assert sorted(five_k[1]) == sorted(one_k[1] + tail_ops), (sorted(five_k[1]), sorted(one_k[1]))


# -- Pareto k̂ ----------------------------------------------------------------------------


@main_process_only
@pytest.mark.parametrize("shape", [-0.3, 0.2, 0.5, 0.9])
def test_gpd_fit_recovers_a_known_shape(shape):
    """Exceedances drawn from a generalized Pareto distribution of known k and
    sigma = 2 (inverse CDF): the Zhang-Stephens fit with the PSIS prior finds
    them (20 fits of 1000 points; the spread of one fit is ~0.05)."""
    from fastvae._pareto import gpd_fit

    g = torch.Generator().manual_seed(7)
    u = torch.rand(20, 1000, generator=g, dtype=F64)
    x, _ = torch.sort(2.0 / shape * ((1 - u) ** (-shape) - 1), dim=-1)
    k, sigma = gpd_fit(x)
    assert abs(k.mean().item() - shape) < 0.04, k
    assert (k - shape).abs().max() < 0.2, k
    assert abs(sigma.mean().item() - 2.0) < 0.1, sigma


def _linear_gaussian(device, posterior_var_factor, B=4, L=4):
    """p(z) = N(0, I), p(x|z) = N(x; z, I) in L dimensions: the true posterior
    is N(x/2, I/2). The encoder's q(z|x) = N(x/2, factor I / 2): narrower than
    the true posterior for factor < 1 (weights heavy-tailed: k = 1 - factor
    in each dimension), wider for factor > 1 (weights bounded: k < 0)."""
    x = torch.linspace(-1.5, 1.5, B * L, dtype=torch.float32, device=device).reshape(B, L)

    def encode(a):
        return a / 2, torch.full_like(a, math.log(posterior_var_factor / 2))

    return x, encode, (lambda z: z)


def test_pareto_k_flags_a_posterior_much_narrower_than_the_true_one(backend):
    x, encode, decode = _linear_gaussian(backend[1], 0.1)  # k = 0.9 in theory
    with pytest.warns(RuntimeWarning, match=r"Pareto k̂ > 0.7 for 4 of 4 examples"):
        stats = log_likelihood(x, encode, decode, k=2000, generator=gen(5), return_stats=True,
                               likelihood="gaussian")
    assert stats.pareto_k.dtype == F64 and (stats.pareto_k > 0.7).all(), stats.pareto_k


def test_pareto_k_is_small_for_a_proposal_wider_than_the_target(backend):
    import warnings

    x, encode, decode = _linear_gaussian(backend[1], 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        stats = log_likelihood(x, encode, decode, k=2000, generator=gen(5), return_stats=True,
                               likelihood="gaussian")
    assert (stats.pareto_k < 0.3).all(), stats.pareto_k


def test_pareto_k_does_not_depend_on_the_chunking(backend):
    """The streamed top-M tail is exact: chunks of 70 samples give the k̂ of one chunk."""
    x, encode, decode = _linear_gaussian(backend[1], 0.5)
    ks = [log_likelihood(x, encode, decode, k=300, chunk_size=c, generator=gen(6), return_stats=True,
                         likelihood="gaussian").pareto_k for c in (None, 70)]
    assert torch.isfinite(ks[0]).all()
    torch.testing.assert_close(ks[1], ks[0], rtol=1e-5, atol=1e-5)


@main_process_only
def test_pareto_k_needs_enough_samples_and_evaluate_summarizes_it():
    x, encode, decode = _linear_gaussian("cpu", 0.1, B=6)
    assert torch.isnan(log_likelihood(x, encode, decode, k=20, return_stats=True,
                                      likelihood="gaussian").pareto_k).all()  # a tail of 5 needs K > 20
    with pytest.warns(RuntimeWarning, match="Pareto k̂ > 0.7"):
        res = evaluate([x[:4], x[4:]], encode, decode, k=1000, generator=gen(5), likelihood="gaussian")
    assert res.per_example_pareto_k.shape == (6,) and res.pareto_k_high == 1.0
    assert res.pareto_k_max == res.per_example_pareto_k.max().item() > 0.7
    assert "pareto_k_max=" in repr(res)


@main_process_only
def test_a_well_fitted_model_does_not_warn():
    """Linear-Gaussian, encoder the exact posterior: every weight is p(x), k̂
    has no tail to fit, and neither call warns or marks an example."""
    import warnings

    x, _, encode, decode, _ = ppca(B=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastvae.EvaluationWarning)
        log_likelihood(x, encode, decode, k=200, likelihood="gaussian", generator=gen(0))
        stats = log_likelihood(x, encode, decode, k=200, likelihood="gaussian", generator=gen(0), return_stats=True)
        res = evaluate([x], encode, decode, k=200, likelihood="gaussian", generator=gen(0), progress=False)
    assert not stats.unreliable.any() and not res.per_example_unreliable.any()
    assert stats.k_used.tolist() == [200] * 6 and res.per_example_k.tolist() == [200] * 6


@main_process_only
def test_a_poor_proposal_warns_once_on_every_path_and_marks_the_examples():
    """A proposal ten times narrower than the posterior (k = 0.9): the plain
    call (no return_stats) warns once, with the count, the worst k̂, that the
    stderr understates the error, and the remedies; the stats and evaluate
    mark the examples; importance_log_likelihood warns the same way."""
    x, encode, decode = _linear_gaussian("cpu", 0.1, B=4)
    text = (r"Pareto k̂ > 0.7 for 4 of 4 examples \(worst k̂ = \d+\.\d\d\): .*stderr understates the error.*"
            r"a larger k or, better, a better proposal: an encoder trained with fastvae.iwae \(estimator='dreg'")
    with pytest.warns(fastvae.EvaluationWarning, match=text) as record:
        log_likelihood(x, encode, decode, k=1000, generator=gen(5), likelihood="gaussian")
    assert sum("Pareto" in str(w.message) for w in record) == 1
    with pytest.warns(fastvae.EvaluationWarning, match="Pareto"):
        stats = log_likelihood(x, encode, decode, k=1000, generator=gen(5), likelihood="gaussian", return_stats=True)
    assert stats.unreliable.dtype == torch.bool and stats.unreliable.all()
    with pytest.warns(fastvae.EvaluationWarning, match="Pareto") as record:
        res = evaluate([x[:2], x[2:]], encode, decode, k=1000, generator=gen(5), likelihood="gaussian")
    assert sum("Pareto" in str(w.message) for w in record) == 1 and res.per_example_unreliable.all()

    def log_weights(x_rep):  # the same model, its own draws: z ~ q = N(x/2, 0.05 I)
        z = x_rep / 2 + math.sqrt(0.05) * torch.randn_like(x_rep)
        normal = torch.distributions.Normal
        return (normal(z, 1.0).log_prob(x_rep) + normal(0.0, 1.0).log_prob(z)
                - normal(x_rep / 2, math.sqrt(0.05)).log_prob(z)).sum(-1)

    with pytest.warns(fastvae.EvaluationWarning, match="Pareto k̂ > 0.7 for 4 of 4"):
        fastvae.importance_log_likelihood(x, log_weights, k=1000, generator=gen(5))


def _shifted_ppca(B):
    """ppca with the posterior's mean moved by 0 to 1 posterior standard
    deviations (by the example's first value) and its variance 1.5 times larger:
    bounded weights (k̂ < 0.5) whose spread grows along the batch."""
    x, exact, encode, decode, _ = ppca(B=B)
    lo, hi = x[:, 0].min(), x[:, 0].max()

    def shifted(a):  # the shift from the example itself: the same in any batch
        mu, logvar = encode(a)
        return mu + (a[:, :1] - lo) / (hi - lo) * torch.exp(logvar / 2), logvar + math.log(1.5)

    return x, exact, shifted, decode


@main_process_only
def test_target_stderr_stops_each_example_at_its_target():
    """target_stderr=0.05: every example ends at or below it, within 4 stderr
    of the closed form, with its own K (fewer than the cap in all); later
    rounds decode only the examples still short of the target. evaluate
    gives the same per-example K and estimates; the return type follows
    return_stats."""
    import warnings

    x, exact, encode, decode = _shifted_ppca(6)
    rows = []

    def watched(z):
        rows.append(z.shape[1])
        return decode(z)

    with warnings.catch_warnings():
        warnings.simplefilter("error", fastvae.EvaluationWarning)
        stats = log_likelihood(x, encode, watched, k=4000, likelihood="gaussian", generator=gen(1),
                               return_stats=True, target_stderr=0.05)
        res = evaluate([x[:4], x[4:]], encode, decode, k=4000, likelihood="gaussian", generator=gen(1),
                       progress=False, target_stderr=0.05)
    assert (stats.stderr <= 0.05).all() and not stats.unreliable.any(), stats.stderr
    assert ((stats.log_likelihood - exact).abs() <= 4 * stats.stderr).all()
    assert stats.k_used.min() >= 100 and stats.k_used.unique().numel() > 2, stats.k_used
    assert stats.k_used.sum() < 4000 * 6 and stats.k_used.max() <= 4000
    assert rows[0] == 6 and min(rows) < 6
    assert torch.equal(res.per_example_k, stats.k_used)
    torch.testing.assert_close(res.per_example, stats.log_likelihood, rtol=1e-6, atol=1e-6)
    plain = log_likelihood(x, encode, decode, k=4000, likelihood="gaussian", generator=gen(1), target_stderr=0.05)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, stats.log_likelihood)


@main_process_only
def test_target_stderr_draws_to_the_cap_where_it_cannot_trust_the_stderr():
    """k̂ > 0.7 (a proposal ten times too narrow): those examples draw every
    sample of k and the Pareto warning names them; a target out of reach
    warns that the cap was hit; bad targets are refused by name."""
    x, encode, decode = _linear_gaussian("cpu", 0.1, B=4)
    with pytest.warns(fastvae.EvaluationWarning, match="Pareto k̂ > 0.7"):
        stats = log_likelihood(x, encode, decode, k=800, likelihood="gaussian", generator=gen(4),
                               return_stats=True, target_stderr=0.5)
    assert stats.unreliable.any() and (stats.k_used[stats.unreliable] == 800).all(), stats
    x, _, encode, decode = _shifted_ppca(3)
    with pytest.warns(fastvae.EvaluationWarning, match=r"target_stderr=1e-05: 3 of 3 examples drew the cap k=200"):
        stats = log_likelihood(x, encode, decode, k=200, likelihood="gaussian", generator=gen(1),
                               return_stats=True, target_stderr=1e-5)
    assert stats.k_used.tolist() == [200] * 3
    with pytest.raises(ValueError, match="bytes_per_sample must be >= 1"):
        log_likelihood(x, encode, decode, k=200, likelihood="gaussian", bytes_per_sample=0)
    for bad, err, msg in [(0.0, ValueError, "target_stderr must be > 0"),
                          (-1, ValueError, "target_stderr must be > 0"),
                          (float("nan"), ValueError, "target_stderr must be finite"),
                          ("0.1", TypeError, "target_stderr must be a real number")]:
        with pytest.raises(err, match=msg):
            log_likelihood(x, encode, decode, k=200, likelihood="gaussian", target_stderr=bad)
        with pytest.raises(err, match=msg):
            evaluate([x], encode, decode, k=200, likelihood="gaussian", target_stderr=bad)


@main_process_only
def test_stats_repr_is_a_summary():
    x, encode, decode = _linear_gaussian("cpu", 2.0, B=300)
    stats = log_likelihood(x, encode, decode, k=50, return_stats=True, likelihood="gaussian")
    text = repr(stats)
    assert text.startswith("LogLikelihoodStats(300 examples") and "tensor(" not in text and len(text) < 400, text
    assert stats._fields == ("log_likelihood", "stderr", "ess", "pareto_k", "unreliable", "k_used")


def test_gaussian_halves_of_one_decoder_output_read_in_place(backend):
    """A decoder returning (mean, logvar) as the halves of one output, read in
    place by the Triton kernels in evaluation (no copies of the halves): the
    same estimate as from copies of the halves, and the one of elbo's path."""
    _, device = backend
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64).to(device)
    W = (torch.randn(2, 12, generator=g, dtype=torch.float64) * 0.5).to(device)

    def encode(xx):
        return xx[:, :2] * 0.5, xx[:, 2:4] * 0.1

    def decode(z, copies):
        h = z @ W
        return (h[..., :6].clone(), h[..., 6:].clone()) if copies else (h[..., :6], h[..., 6:])

    got = log_likelihood(x, encode, lambda z: decode(z, False), k=5, chunk_size=4, likelihood="gaussian",
                         generator=gen(8))
    want = log_likelihood(x, encode, lambda z: decode(z, True), k=5, chunk_size=4, likelihood="gaussian",
                          generator=gen(8))
    assert torch.equal(got, want)


# -- the categorical and continuous Bernoulli likelihoods --------------------------


@pytest.mark.parametrize("likelihood", ["categorical", "continuous_bernoulli"])
def test_categorical_and_continuous_bernoulli_log_likelihood_match_oracle(backend, likelihood):
    """log_likelihood and reconstruction_probability with likelihood="categorical"
    (integer x of (B, 2, 3) pixels, logits (..., 2, 3, C)) and
    "continuous_bernoulli" equal the plain-PyTorch oracle with the documented
    noise (torch.distributions' log-densities); a decoder returning the torch
    distribution gives the same."""
    import torch.distributions as dist

    _, device = backend
    g = torch.Generator().manual_seed(5)
    B, L, C, K = 4, 2, 5, 6
    W = torch.randn(L, 6 * C, generator=g, dtype=F64).to(device)
    if likelihood == "categorical":
        x = torch.randint(0, C, (B, 2, 3), generator=g).to(device)
        decode = lambda z: (z @ W).unflatten(-1, (2, 3, C))  # noqa: E731
        twin = lambda z: dist.Independent(dist.Categorical(logits=decode(z)), 2)  # noqa: E731
    else:
        x = torch.rand(B, 2, 3, generator=g, dtype=F64).to(device)
        decode = lambda z: (z @ W[:, :6]).unflatten(-1, (2, 3))  # noqa: E731
        twin = lambda z: dist.Independent(dist.ContinuousBernoulli(logits=decode(z)), 2)  # noqa: E731
    mu = 0.3 * torch.randn(B, L, generator=g, dtype=F64).to(device)
    logvar = 0.2 * torch.randn(B, L, generator=g, dtype=F64).to(device)
    encode = lambda a: (mu, logvar)  # noqa: E731
    seed = philox_seed_of(3)
    offsets = (torch.arange(B)[None, :, None] * K * L + torch.arange(K)[:, None, None] * L + torch.arange(L))
    eps = reference.philox_randn(seed, offsets, F64).to(device)
    z = mu + torch.exp(0.5 * logvar) * eps
    log_px = twin(z).log_prob(x)
    ratio = (-0.5 * z**2 + 0.5 * eps**2 + 0.5 * logvar).sum(-1)
    for dec, kw in ((decode, dict(likelihood=likelihood)), (twin, {})):
        got = log_likelihood(x, encode, dec, k=K, generator=gen(3), chunk_size=4, **kw)
        want = torch.logsumexp(log_px + ratio, 0) - math.log(K)
        assert_close(got, want, 1 + (log_px.abs() + ratio.abs()).max(0).values, f"log_likelihood {likelihood}")
        got = reconstruction_probability(x, encode, dec, n_samples=K, generator=gen(3), **kw)
        want = torch.logsumexp(log_px, 0) - math.log(K)
        assert_close(got, want, 1 + log_px.abs().max(0).values, f"reconstruction_probability {likelihood}")


@pytest.mark.parametrize("form", INTERPRETER_FOLDED_FORMS if INTERPRET else FOLDED_FORMS)
def test_evaluation_reads_decoders_that_fold_the_samples(backend, form):
    """A decoder that returns (S·B, *event) rows for z (S, B, L), in
    any output form, gives log_likelihood (chunked, with a last chunk of one
    sample and the decoder-width probe), reconstruction_probability and
    evaluate exactly what the contract's shape gives."""
    _, device = backend
    x, likelihood, decode, folded = folded_decoder_case(form, device)
    g = torch.Generator().manual_seed(2)
    W = torch.randn(x[0].numel(), 4, generator=g, dtype=F64).to(device) * 0.1

    def encode(t):  # (mu, logvar) of each row of t, whichever rows evaluate's batches hold
        mu, logvar = (t.flatten(1).to(F64) @ W).chunk(2, -1)
        return mu, logvar

    calls = [
        lambda d: log_likelihood(x, encode, d, k=5, chunk_size=2, likelihood=likelihood, generator=gen(3)),
        lambda d: log_likelihood(x, encode, d, k=5, likelihood=likelihood, generator=gen(3)),
        lambda d: reconstruction_probability(x, encode, d, n_samples=3, likelihood=likelihood, generator=gen(4)),
        lambda d: torch.tensor(evaluate([x[:2], x[2:]], encode, d, k=4, chunk_size=3, likelihood=likelihood,
                                        progress=False, generator=gen(5)).log_likelihood),
    ]
    for i, call in enumerate(calls):
        want, got = call(decode), call(folded)
        assert torch.isfinite(want).all(), (form, i)
        assert torch.equal(got, want), (form, i, got, want)


# -- warnings a user sees ----------------------------------------------------------------


def _degenerate(backend_device="cpu"):
    _, decode = mlp_model(5, 2, "mean", seed=1, device=backend_device)
    x = make_data(6, 5, "mean").to(backend_device)

    def bad_encode(a):  # a proposal far wider than the posterior: a few samples carry the weight
        return torch.zeros(a.shape[0], 2, dtype=a.dtype, device=a.device), \
            torch.full((a.shape[0], 2), 4.0, dtype=a.dtype, device=a.device)

    return x, bad_encode, decode


def test_plain_log_likelihood_flags_degenerate_weights_too(backend):
    """Without return_stats the ESS is at hand (the state of 2 log w), so the
    plain estimate warns as well, saying what the figure still is and what to do."""
    x, bad_encode, decode = _degenerate(backend[1])
    with pytest.warns(fastvae.EvaluationWarning, match=r"degenerate: mean ESS/K = 0\.0\d\d .*stochastic lower "
                      r"bound.*Use a larger k"):
        ll = log_likelihood(x, bad_encode, decode, k=200, likelihood="gaussian", generator=gen(0))
    assert ll.shape == (6,) and torch.isfinite(ll).all()
    assert issubclass(fastvae.EvaluationWarning, RuntimeWarning)


@main_process_only
def test_evaluation_warnings_repeat_under_pythons_default_filter(tmp_path):
    """A loop evaluating several models warns for each (Python's default filter
    shows a repeated warning once per call site; EvaluationWarning is exempt),
    and a user's own filter still silences them."""
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent("""
        import sys, warnings
        import torch, fastvae
        if sys.argv[1] == "ignore":
            warnings.filterwarnings("ignore", category=fastvae.EvaluationWarning)
        x = torch.linspace(-1, 1, 12).reshape(3, 4)
        for model in range(3):  # the same call site, the same message each time
            fastvae.log_likelihood(x, lambda a: (torch.zeros(3, 4), torch.full((3, 4), 6.0)), lambda z: z,
                                   k=100, likelihood="gaussian", generator=torch.Generator().manual_seed(0))
    """))
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": ""}
    for mode, shown in (("default", 3), ("ignore", 0)):
        run = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stderr.count("EvaluationWarning: the importance weights are degenerate") == shown, run.stderr


@main_process_only
def test_pareto_k_is_finite_on_tied_tails():
    """Log-weights quantized to a grid of 1/4 tie at the tail's threshold (on
    this data one example's k̂ was NaN: its zero exceedances gave a zero
    quartile). As ArviZ's psislw does, only the weights strictly above the
    threshold are fitted: k̂ is finite and equals the fit of exactly those,
    taken here from the full sample of weights, not from the streamed tail."""
    from fastvae import _pareto

    g = torch.Generator().manual_seed(3)
    K, n = 4000, 6
    u = torch.rand(K, n, generator=g, dtype=F64)
    lw = torch.log(2.0 / 0.5 * ((1 - u) ** (-0.5) - 1) + 1)  # weights with a Pareto tail of shape 0.5
    M = _pareto.tail_size(K)
    quantized = torch.round(lw * 4) / 4
    tail = torch.topk(quantized, M + 1, dim=0).values
    assert (tail[M] == tail[M - 1]).all(), "the test needs ties at the threshold"
    k_hat = _pareto.pareto_k(tail, K)
    assert torch.isfinite(k_hat).all(), k_hat
    for j in range(n):  # ArviZ's rule on the whole column: w > cutoff, exceedances w - cutoff, ascending
        w = torch.exp(quantized[:, j] - quantized[:, j].max())
        cutoff = torch.sort(w, descending=True).values[M]
        above = torch.sort(w[w > cutoff] - cutoff).values
        assert above.numel() < M  # ties were dropped
        torch.testing.assert_close(k_hat[j], _pareto.gpd_fit(above[None])[0][0], rtol=1e-12, atol=1e-12)
    # fewer than 5 weights above the threshold say nothing: NaN (ArviZ: inf)
    flat = torch.zeros(M + 1, 1, dtype=F64)
    flat[:3] = 1.0
    assert torch.isnan(_pareto.pareto_k(flat, K)).all()


@main_process_only
def test_pareto_k_fits_in_blocks_within_its_bytes_and_gives_the_same_values():
    """The k̂ fit's temporaries (two float64 tensors of rows x 30 + sqrt(M) x
    M) stay within max_bytes, the evaluation's memory budget, fitting the
    examples a block at a time: one row a block gives the values of one block
    of all rows."""
    from fastvae import _pareto

    g = torch.Generator().manual_seed(4)
    K, n = 5000, 40
    lw = torch.log(torch.rand(K, n, generator=g, dtype=F64)) * torch.linspace(0.5, 3.0, n, dtype=F64)
    M = _pareto.tail_size(K)
    tail = torch.topk(lw, M + 1, dim=0).values
    one_row = 2 * 8 * (30 + int(math.sqrt(M))) * M
    with _LiveBytes() as meter:
        small = _pareto.pareto_k(tail, K, max_bytes=one_row)
    whole = _pareto.pareto_k(tail, K, max_bytes=100 * one_row)
    torch.testing.assert_close(small, whole, rtol=1e-12, atol=0)
    assert torch.isfinite(whole).all()
    assert meter.peak <= 4 * one_row + 16 * M * n, meter.peak  # a block, plus the (n, M) exceedances
