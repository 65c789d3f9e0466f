"""fastvae.importance_log_likelihood: log p(x) of any model from its own
log-weights, streamed over K.

Checked against a hand-written log-sum-exp over the same draws (recorded
from the model's calls), and against the exact log p(x) of a two-group
linear-Gaussian hierarchy (z2 -> z1 -> x), whose marginal is Gaussian.
"""
import math
import os
import textwrap
import warnings

import pytest
import torch
from torch.distributions import Normal

import fastvae
from fastvae import _pareto
from fastvae.evaluation import LogLikelihoodStats, importance_log_likelihood

from conftest import INTERPRET
from helpers import gen, run_gloo_ranks

F64 = torch.float64
pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process tests (backend-independent)")


def linear_gaussian(B=6, D=4, L1=3, L2=2, seed=0, widen=1.3, dtype=F64):
    """A two-group top-down hierarchy z2 ~ N(0, I), z1 | z2 ~ N(A z2, s1² I),
    x | z1 ~ N(W z1 + b, σ² I), with a proposal q(z2 | x) q(z1 | x, z2) whose
    means are the exact posterior's and whose standard deviations are the
    exact conditionals' (diagonal) times ``widen``.

    Returns x (B, D), the exact log p(x) (B,), and log_weight_fn(x_rep) ->
    {"log_px_z", "group_2", "group_1"}, each (n, B')."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L1, L2, generator=g, dtype=F64)
    W = 0.8 * torch.randn(D, L1, generator=g, dtype=F64)
    b = torch.randn(D, generator=g, dtype=F64)
    s1, sigma = 0.6, 0.5
    z2 = torch.randn(B, L2, generator=g, dtype=F64)
    z1 = z2 @ A.T + s1 * torch.randn(B, L1, generator=g, dtype=F64)
    x = z1 @ W.T + b + sigma * torch.randn(B, D, generator=g, dtype=F64)
    # v = (z2, z1, x) = M eps + (0, 0, b)
    n = L2 + L1 + D
    M = torch.zeros(n, n, dtype=F64)
    M[:L2, :L2] = torch.eye(L2, dtype=F64)
    M[L2:L2 + L1, :L2], M[L2:L2 + L1, L2:L2 + L1] = A, s1 * torch.eye(L1, dtype=F64)
    M[L2 + L1:, :L2], M[L2 + L1:, L2:L2 + L1] = W @ A, s1 * W
    M[L2 + L1:, L2 + L1:] = sigma * torch.eye(D, dtype=F64)
    S = M @ M.T
    mean = torch.cat([torch.zeros(L2 + L1, dtype=F64), b])
    i2, i1, ix = list(range(L2)), list(range(L2, L2 + L1)), list(range(L2 + L1, n))
    exact = torch.distributions.MultivariateNormal(b, covariance_matrix=S[ix][:, ix]).log_prob(x)

    def conditional(target, given):
        """(gain G, shift c, sd) with E[target | given = v] = c + (v - mean_given) G^T."""
        Stc, Scc = S[target][:, given], S[given][:, given]
        G = torch.linalg.solve(Scc, Stc.T).T
        cov = S[target][:, target] - G @ Stc.T
        return G, mean[target], cov.diagonal().sqrt()

    G2, c2, sd2 = conditional(i2, ix)
    G1, c1, sd1 = conditional(i1, i2 + ix)
    sd2, sd1 = widen * sd2, widen * sd1
    x, exact = x.to(dtype), exact.to(dtype)

    def log_weight_fn(x_rep):
        xr = x_rep.to(F64)
        m2 = c2 + (xr - b) @ G2.T
        z2 = m2 + sd2 * torch.randn(m2.shape, dtype=F64)
        m1 = c1 + torch.cat([z2, xr - b], -1) @ G1.T
        z1 = m1 + sd1 * torch.randn(m1.shape, dtype=F64)
        out = {
            "log_px_z": Normal(z1 @ W.T + b, sigma).log_prob(xr).sum(-1),
            "group_2": Normal(0.0, 1.0).log_prob(z2).sum(-1) - Normal(m2, sd2).log_prob(z2).sum(-1),
            "group_1": Normal(z2 @ A.T, s1).log_prob(z1).sum(-1) - Normal(m1, sd1).log_prob(z1).sum(-1),
        }
        return {key: t.to(dtype) for key, t in out.items()}

    return x, exact, log_weight_fn


class Recorder:
    """Wraps a log-weight function: the n of each call and the summed
    log-weights it returned, so a test can redo the log-sum-exp by hand."""

    def __init__(self, fn):
        self.fn, self.sizes, self.rows, self.weights = fn, [], [], []

    def __call__(self, x_rep):
        out = self.fn(x_rep)
        self.sizes.append(x_rep.shape[0])
        self.rows.append(x_rep.shape[1])
        parts = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
        self.weights.append(sum(t.double() for t in parts))
        return out


def by_hand(weights, K):
    """log-mean-exp, stderr, ESS and k̂ of the recorded (K, B) log-weights."""
    lw = torch.cat(weights)
    assert lw.shape[0] == K
    ll = torch.logsumexp(lw, 0) - math.log(K)
    w = torch.exp(lw - lw.max(0).values)
    ess = w.sum(0) ** 2 / (w * w).sum(0)
    stderr = torch.sqrt((K / ess - 1) / (K - 1)) if K > 1 else torch.full_like(ll, float("nan"))
    rows = _pareto.tail_size(K) + 1
    tail = torch.topk(lw, min(rows, K), dim=0).values
    return ll, stderr, ess, _pareto.pareto_k(_pareto.pad_tail(tail, rows), K)


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_equals_a_hand_written_logsumexp_of_the_same_draws(chunk):
    x, _, fn = linear_gaussian()
    rec = Recorder(fn)
    stats = importance_log_likelihood(x, rec, k=64, chunk_size=chunk, generator=gen(0), return_stats=True)
    assert isinstance(stats, LogLikelihoodStats)
    ll, stderr, ess, khat = by_hand(rec.weights, 64)
    torch.testing.assert_close(stats.log_likelihood, ll, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(stats.stderr, stderr, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(stats.ess, ess, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.pareto_k, khat, rtol=1e-9, atol=1e-9)
    assert stats.log_likelihood.dtype == F64 and stats.pareto_k.dtype == F64
    if chunk is not None:
        assert max(rec.sizes) == chunk and sum(rec.sizes) == 64


def test_k5000_is_within_a_few_stderr_of_the_exact_log_likelihood():
    x, exact, fn = linear_gaussian(B=8)
    stats = importance_log_likelihood(x, fn, k=5000, generator=gen(1), return_stats=True)
    z = (stats.log_likelihood - exact) / stats.stderr
    assert torch.all(z.abs() < 4), z
    assert torch.all(stats.stderr > 0) and torch.all(stats.stderr < 0.05), stats.stderr
    assert torch.all(stats.ess > 1000) and torch.all(stats.pareto_k < 0.5), (stats.ess, stats.pareto_k)
    # the estimate is a stochastic lower bound: on average below the exact value by about stderr² / 2
    assert abs((stats.log_likelihood - exact).mean().item()) < 4 * stats.stderr.max().item()


def test_memory_is_bounded_by_one_chunk_whatever_k():
    """chunk_size=None: the samples per call come from the memory budget,
    not from K, and a budget below one sample of every example splits the batch."""
    x, _, fn = linear_gaussian(B=6)
    per = 1000
    biggest = {}
    for K in (100, 1000, 5000):
        rec = Recorder(fn)
        importance_log_likelihood(x, rec, k=K, generator=gen(2), memory_budget=per * 6 * 40, bytes_per_sample=per)
        biggest[K] = max(rec.sizes)
        assert sum(rec.sizes) == K and set(rec.rows) == {6}
    assert biggest == {100: 40, 1000: 40, 5000: 40}
    rec = Recorder(fn)
    importance_log_likelihood(x, rec, k=10, generator=gen(2), memory_budget=per * 4, bytes_per_sample=per)
    assert max(rec.sizes) == 1 and max(rec.rows) == 4 and sum(rec.rows) == 6 * 10
    # the default: the cost of a sample is measured on the first chunks (1, 2 and a quarter of the predicted chunk)
    rec = Recorder(fn)
    importance_log_likelihood(x, rec, k=5000, generator=gen(2), memory_budget=2**20)
    assert rec.sizes[:2] == [1, 2] and sum(rec.sizes) == 5000 and 2 < max(rec.sizes) < 5000


def test_split_batches_give_the_hand_written_result_too():
    x, _, fn = linear_gaussian(B=5)
    rec = Recorder(fn)
    ll = importance_log_likelihood(x, rec, k=30, generator=gen(3), memory_budget=2, bytes_per_sample=1)
    assert rec.rows[0] == 2 and rec.rows[-1] == 1 and sum(r * n for r, n in zip(rec.rows, rec.sizes)) == 5 * 30
    lws, i = [], 0
    while i < len(rec.weights):  # one block of examples after the other, K samples each
        block = []
        while sum(w.shape[0] for w in block) < 30:
            block.append(rec.weights[i])
            i += 1
        lws.append(torch.cat(block))
    want = torch.logsumexp(torch.cat(lws, 1), 0) - math.log(30)
    torch.testing.assert_close(ll, want, rtol=1e-13, atol=1e-13)


def test_one_row_batches_and_k_equal_to_one():
    x, _, fn = linear_gaussian(B=1)
    rec = Recorder(fn)
    stats = importance_log_likelihood(x, rec, k=1, generator=gen(4), return_stats=True)
    assert stats.log_likelihood.shape == (1,) and rec.sizes == [1] and rec.rows == [1]
    torch.testing.assert_close(stats.log_likelihood, rec.weights[0][0], rtol=1e-14, atol=0)
    assert torch.isnan(stats.stderr).all() and stats.ess.item() == 1.0 and torch.isnan(stats.pareto_k).all()
    rec = Recorder(fn)
    ll = importance_log_likelihood(x, rec, k=50, chunk_size=8, generator=gen(4))
    torch.testing.assert_close(ll, by_hand(rec.weights, 50)[0], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_dtypes(dtype):
    x, exact, fn = linear_gaussian(B=4, dtype=dtype)
    rec = Recorder(fn)
    stats = importance_log_likelihood(x, rec, k=2000, chunk_size=300, generator=gen(5), return_stats=True)
    assert stats.log_likelihood.dtype == dtype and stats.stderr.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(stats.log_likelihood.double(), by_hand(rec.weights, 2000)[0], rtol=tol, atol=tol)
    assert torch.all((stats.log_likelihood.double() - exact.double()).abs() < 5 * stats.stderr.double())


def test_parts_are_summed_whatever_their_container():
    x, _, fn = linear_gaussian(B=3)

    def as_tuple(x_rep):
        return tuple(fn(x_rep).values())

    def as_tensor(x_rep):
        return sum(fn(x_rep).values())

    results = [importance_log_likelihood(x, f, k=40, chunk_size=16, generator=gen(6))
               for f in (fn, as_tuple, as_tensor)]
    torch.testing.assert_close(results[0], results[1], rtol=1e-14, atol=0)
    torch.testing.assert_close(results[0], results[2], rtol=1e-13, atol=1e-13)


def test_reproducible_and_leaves_the_random_state_alone():
    x, _, fn = linear_gaussian(B=3)
    a = importance_log_likelihood(x, fn, k=40, chunk_size=16, generator=gen(7))
    before = torch.get_rng_state()
    b = importance_log_likelihood(x, fn, k=40, chunk_size=16, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), before)  # generator= given: torch's state untouched
    assert torch.equal(a, b)
    c = importance_log_likelihood(x, fn, k=40, chunk_size=16, generator=gen(8))
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = importance_log_likelihood(x, fn, k=40, chunk_size=16)
    torch.manual_seed(3)
    assert torch.equal(importance_log_likelihood(x, fn, k=40, chunk_size=16), d)


def test_x_rep_is_the_batch_repeated():
    x = torch.randn(3, 2, 5, dtype=F64)
    seen = []

    def fn(x_rep):
        seen.append(x_rep)
        return torch.zeros(x_rep.shape[:2], dtype=F64)

    ll = importance_log_likelihood(x, fn, k=10, chunk_size=4)
    assert [t.shape for t in seen] == [(4, 3, 2, 5), (4, 3, 2, 5), (2, 3, 2, 5)]
    assert all(torch.equal(t, x.expand_as(t)) for t in seen)
    assert torch.equal(ll, torch.zeros(3, dtype=F64))  # every weight 1: log p̂ = 0


def test_minus_inf_weights_are_allowed():
    x = torch.randn(2, 3)

    def fn(x_rep):
        lw = torch.zeros(x_rep.shape[:2])
        lw[0, :] = float("-inf")  # one impossible sample of each example
        lw[:, 1] = float("-inf")  # example 1: every sample impossible
        return lw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvae.EvaluationWarning)
        stats = importance_log_likelihood(x, fn, k=4, chunk_size=4, return_stats=True)
    torch.testing.assert_close(stats.log_likelihood[0], torch.tensor(math.log(3 / 4)))
    assert stats.log_likelihood[1].item() == float("-inf") and stats.ess[1].item() == 0
    assert stats.ess[0].item() == pytest.approx(3.0)


@pytest.mark.parametrize("value, what", [(float("inf"), "inf"), (float("nan"), "nan")])
def test_plus_inf_and_nan_weights_raise_naming_the_part_sample_and_example(value, what):
    x = torch.randn(3, 2)
    calls = []

    def fn(x_rep):
        n, B = x_rep.shape[:2]
        bad = torch.zeros(n, B)
        calls.append(n)
        if len(calls) == 2:  # the second chunk (samples 3..5)
            bad[1, 2] = value
        return {"log_px_z": torch.zeros(n, B), "group_1": bad}

    with pytest.raises(ValueError, match=rf"log_weight_fn\(x_rep\)\['group_1'\] is {what} at sample 4 of "
                                         rf"example 2: a log-weight must be finite, or -inf"):
        importance_log_likelihood(x, fn, k=6, chunk_size=3)

    def cancelling(x_rep):
        n, B = x_rep.shape[:2]
        return torch.full((n, B), float("inf")), torch.full((n, B), float("-inf"))

    with pytest.raises(ValueError, match=r"log_weight_fn\(x_rep\)\[0\] is inf at sample 0 of example 0"):
        importance_log_likelihood(x, cancelling, k=2)


def test_bad_arguments_name_themselves():
    x = torch.randn(3, 2)

    def ok(x_rep):
        return torch.zeros(x_rep.shape[:2])

    for kwargs, err, msg in [
        (dict(k=0), ValueError, "k must be"),
        (dict(k=2.5), TypeError, "k must be"),
        (dict(chunk_size=0), ValueError, "chunk_size must be"),
        (dict(memory_budget=-1), ValueError, "memory_budget must be"),
        (dict(bytes_per_sample=0), ValueError, "bytes_per_sample must be"),
        (dict(shard="rows"), ValueError, "shard must be one of"),
        (dict(target_stderr=0.0), ValueError, "target_stderr must be > 0"),
        (dict(target_stderr=float("nan")), ValueError, "target_stderr must be finite"),
        (dict(target_stderr="0.1"), TypeError, "target_stderr must be a real number"),
    ]:
        with pytest.raises(err, match=msg):
            importance_log_likelihood(x, ok, **kwargs)
    with pytest.raises(TypeError, match="log_weight_fn must be callable"):
        importance_log_likelihood(x, "model")
    with pytest.raises(TypeError, match="x must be a tensor"):
        importance_log_likelihood([1.0, 2.0], ok)
    with pytest.raises(ValueError, match=r"x must have shape \(B, \*event\) with B >= 1"):
        importance_log_likelihood(torch.zeros(0, 2), ok)
    for bad, err, msg in [
        (lambda x_rep: torch.zeros(x_rep.shape[0] * x_rep.shape[1]), ValueError,
         r"log_weight_fn\(x_rep\) has shape \(6,\); expected \(n, B\) = \(2, 3\).*\.reshape\(n, B\) restores"),
        (lambda x_rep: torch.zeros(x_rep.shape[:2], dtype=torch.int64), TypeError,
         r"log_weight_fn\(x_rep\) must be a floating-point tensor, got a torch.int64 tensor"),
        (lambda x_rep: x_rep.shape[0] * 1.0, TypeError, "must return a tensor of log-weights"),
        (lambda x_rep: {}, ValueError, "returned an empty dict"),
        (lambda x_rep: {"a": torch.zeros(x_rep.shape[:2]), "b": 0.0}, TypeError,
         r"log_weight_fn\(x_rep\)\['b'\] must be a floating-point tensor, got float"),
        (lambda x_rep: [torch.zeros(x_rep.shape[:2]), torch.zeros(x_rep.shape[0], 1)], ValueError,
         r"log_weight_fn\(x_rep\)\[1\] has shape \(2, 1\)"),
    ]:
        with pytest.raises(err, match=msg):
            importance_log_likelihood(x, bad, k=2, chunk_size=2)


def test_degenerate_weights_warn():
    x = torch.randn(2, 2, dtype=F64)

    def spiky(x_rep):
        return 50.0 * torch.randn(x_rep.shape[:2], dtype=F64)

    with pytest.warns(fastvae.EvaluationWarning, match="degenerate"):
        importance_log_likelihood(x, spiky, k=200, generator=gen(9))


_DIST_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    rank, world, init, out, tests_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    sys.path.insert(0, tests_dir)
    from test_importance import linear_gaussian
    from fastvae import importance_log_likelihood
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x, exact, fn = linear_gaussian(B=5)
    results = {}
    for shard in ("examples", "samples"):
        g = torch.Generator().manual_seed(11)
        results[shard] = importance_log_likelihood(x, fn, k=2000, chunk_size=250, generator=g, shard=shard,
                                                   return_stats=True)._asdict()
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()
""")


def test_two_processes(tmp_path):
    """gloo, 2 ranks: every rank gets the whole batch's result; sample
    sharding with chunks that tile each rank's share equals one process
    (the same chunks, so the same draws), example sharding is within a few
    stderr of the exact log p(x)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    run_gloo_ranks(_DIST_WORKER, lambda r: [str(tmp_path / "out"), tests_dir], tmp_path)
    x, exact, fn = linear_gaussian(B=5)
    single = importance_log_likelihood(x, fn, k=2000, chunk_size=250, generator=gen(11), return_stats=True)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    for name in single._fields:
        for shard in ("examples", "samples"):
            torch.testing.assert_close(ranks[0][shard][name], ranks[1][shard][name], rtol=0, atol=0, msg=shard)
        torch.testing.assert_close(ranks[0]["samples"][name], single._asdict()[name],
                                   rtol=1e-12, atol=1e-12, equal_nan=True)
    by_examples = ranks[0]["examples"]
    assert torch.all((by_examples["log_likelihood"] - exact).abs() < 4 * by_examples["stderr"])


def test_target_stderr_stops_each_example_at_its_target():
    """target_stderr with a model's own log-weights: each example stops at
    the target with its own K, within 4 stderr of the exact log p(x), and
    log_weight_fn sees only the examples still sampling. The model: p(z) =
    N(0, I), p(x|z) = N(z, I) (log p(x) = log N(x; 0, 2I)), q(z|x) 1.5 times
    wider than the posterior N(x/2, I/2), its mean moved by 0 to 1 posterior
    sd along the batch (so the examples need different K)."""
    x = torch.linspace(-1.5, 1.5, 12, dtype=F64).reshape(6, 2)
    exact = Normal(0.0, math.sqrt(2.0)).log_prob(x).sum(-1)

    def fn(x_rep):
        mean = x_rep / 2 + (x_rep[..., :1] + 1.5) / 3 * math.sqrt(0.5)
        sd = math.sqrt(0.75)
        z = mean + sd * torch.randn_like(x_rep)
        return (Normal(z, 1.0).log_prob(x_rep) + Normal(0.0, 1.0).log_prob(z) - Normal(mean, sd).log_prob(z)).sum(-1)

    rec = Recorder(fn)
    stats = importance_log_likelihood(x, rec, k=4000, generator=gen(7), return_stats=True, target_stderr=0.03)
    assert (stats.stderr <= 0.03).all() and not stats.unreliable.any(), stats.stderr
    assert ((stats.log_likelihood - exact).abs() <= 4 * stats.stderr).all()
    assert stats.k_used.unique().numel() > 1 and stats.k_used.sum() < 4000 * 6, stats.k_used
    assert rec.rows[0] == 6 and min(rec.rows) < 6
    assert sum(n * b for n, b in zip(rec.sizes, rec.rows)) == stats.k_used.sum()
