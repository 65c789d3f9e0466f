"""fastvae.integrations.pyro: the per-example log p(x) of a Pyro model/guide
pair, checked against the closed form of a linear-Gaussian model and against
Pyro's own importance sampler run one example at a time."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pyro = pytest.importorskip("pyro", reason="the Pyro adapter's tests need pyro-ppl (pip install fastvae[integrations])")
dist = pytest.importorskip("pyro.distributions")

from fastvae import EvaluationWarning, LogLikelihoodStats  # noqa: E402
from fastvae.integrations.pyro import log_likelihood  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
D, L = 5, 2


class LinearGaussian:
    """z ~ N(0, I_L), x | z ~ N(W z, σ_i² I_D) with a per-example σ (an extra
    argument of the model), whose log p(x_i) = log N(x_i; 0, W Wᵀ + σ_i² I) and
    exact posterior are known. ``guide`` is that posterior, its mean shifted by
    ``shift`` and its scale widened by ``widen`` (0 and 1: the exact one)."""

    def __init__(self, shift=0.0, widen=1.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, L, generator=g, dtype=torch.float64)
        self.shift, self.widen = shift, widen
        self.calls = []  # the shape of x at each guide call (the encoder's input)

    def model(self, x, sigma):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], L), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T, sigma[:, None].expand(x.shape)).to_event(1), obs=x)

    def posterior(self, x, sigma):
        prec = torch.eye(L, dtype=x.dtype) + (self.W.T @ self.W) / sigma[:, None, None] ** 2  # (B, L, L)
        cov = torch.linalg.inv(prec)
        mean = (cov @ (self.W.T @ x.unsqueeze(-1))).squeeze(-1) / sigma[:, None] ** 2
        return mean, torch.linalg.cholesky(cov)

    def guide(self, x, sigma):
        self.calls.append(tuple(x.shape))
        with pyro.plate("data", x.shape[0]):
            mean, tril = self.posterior(x, sigma)
            pyro.sample("z", dist.MultivariateNormal(mean + self.shift, scale_tril=self.widen * tril))

    def exact(self, x, sigma):
        cov = self.W @ self.W.T + sigma[:, None, None] ** 2 * torch.eye(D, dtype=x.dtype)
        return torch.distributions.MultivariateNormal(torch.zeros(D, dtype=x.dtype), cov).log_prob(x)


def data(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g, dtype=torch.float64) * 2, 0.5 + torch.rand(b, generator=g,
                                                                                      dtype=torch.float64)


def test_exact_posterior_gives_the_closed_form_with_zero_stderr():
    """With q the exact posterior every log-weight equals log p(x_i), so the
    estimate is exact and its stderr 0; float64 data keep float64."""
    m = LinearGaussian()
    x, sigma = data()
    stats = log_likelihood(m.model, m.guide, x, sigma, k=200, return_stats=True)
    assert isinstance(stats, LogLikelihoodStats) and stats.log_likelihood.dtype == torch.float64
    torch.testing.assert_close(stats.log_likelihood, m.exact(x, sigma), atol=1e-9, rtol=0)
    assert float(stats.stderr.max()) < 1e-6


def test_an_off_guide_is_within_three_stderr_of_the_closed_form():
    """A per-example estimate (the joint of the batch would be their sum, one
    number): each example within 3 of its own stderr of log N(x_i; 0, WWᵀ+σ_i²I)."""
    m = LinearGaussian(shift=0.3, widen=1.3)
    x, sigma = data()
    stats = log_likelihood(m.model, m.guide, x, sigma, k=1000, return_stats=True,
                           generator=torch.Generator().manual_seed(0))
    assert stats.log_likelihood.shape == (6,) and bool((stats.stderr > 1e-4).all())
    err = (stats.log_likelihood - m.exact(x, sigma)).abs()
    assert bool((err < 3 * stats.stderr).all()), (err, stats.stderr)
    assert bool((stats.k_used == 1000).all())


def test_the_guide_runs_once_per_chunk_on_the_examples_not_once_per_sample():
    """Under the outer samples plate the guide (the encoder) sees the B
    examples once per chunk: 4 chunks of 50 samples and the one checking trace
    make 5 calls on (B, D), not K·B rows."""
    m = LinearGaussian()
    x, sigma = data()
    out = log_likelihood(m.model, m.guide, x, sigma, k=200, chunk_size=50)
    assert out.shape == (6,)
    assert m.calls == [(6, D)] * 5


def test_a_batch_split_by_the_memory_budget_slices_data_and_per_example_args():
    """A budget that holds one sample of 2 examples: fastvae scores the batch 2
    rows at a time, and each row keeps its own σ (the exact guide: the
    closed form per example, to rounding)."""
    m = LinearGaussian()
    x, sigma = data()
    out = log_likelihood(m.model, m.guide, x, sigma, k=20, bytes_per_sample=1000, memory_budget=2000)
    torch.testing.assert_close(out, m.exact(x, sigma), atol=1e-9, rtol=0)
    assert max(shape[0] for shape in m.calls[1:]) <= 2


def test_target_stderr_slices_data_and_per_example_args():
    """target_stderr scores the unconverged rows only; the per-example σ
    (an extra tensor argument of B rows) is sliced with them, else the model
    would see mismatched shapes or another example's σ."""
    m = LinearGaussian(shift=0.3, widen=1.3)
    x, sigma = data(b=8)
    sigma[:4] *= 4  # a broader likelihood: a posterior closer to the guide, fewer samples
    stats = log_likelihood(m.model, m.guide, x, sigma, k=3200, target_stderr=0.04, return_stats=True,
                           generator=torch.Generator().manual_seed(0))
    assert int(stats.k_used.min()) < 3200  # rows were dropped, so the model saw a subset
    err = (stats.log_likelihood - m.exact(x, sigma)).abs()
    assert bool((err < 3 * stats.stderr + 1e-9).all()), (err, stats.stderr)
    assert any(shape[0] < 8 for shape in m.calls)


def test_a_data_plate_left_of_a_per_pixel_plate():
    """The data plate at dim=-2 with the observation in a nested plate over the
    D coordinates: the log-weight is summed over the pixels' dimension and kept
    over the data plate's, wherever that sits."""
    m = LinearGaussian()
    x, sigma = data()

    def model(x, sigma):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1, L), 1.0).to_event(1))  # (..., B, 1, L)
            with pyro.plate("pixels", D, dim=-1):
                pyro.sample("x", dist.Normal((z @ m.W.T)[..., 0, :], sigma[:, None]), obs=x)

    def guide(x, sigma):
        with pyro.plate("data", x.shape[0], dim=-2):
            mean, tril = m.posterior(x, sigma)
            pyro.sample("z", dist.MultivariateNormal(mean[:, None], scale_tril=tril[:, None]))

    out = log_likelihood(model, guide, x, sigma, k=50)
    torch.testing.assert_close(out, m.exact(x, sigma), atol=1e-9, rtol=0)


def test_the_evaluations_warnings_point_at_the_callers_line():
    """A guide far from the posterior: the low-ESS and k̂ warnings of the
    evaluation are the caller's, at the line that called the adapter."""
    m = LinearGaussian(shift=3.0, widen=0.3)
    x, sigma = data()
    with pytest.warns(EvaluationWarning) as record:
        log_likelihood(m.model, m.guide, x, sigma, k=200)
    assert {Path(w.filename).name for w in record} == {Path(__file__).name}


def test_same_generator_same_result_and_the_callers_rng_is_untouched():
    m = LinearGaussian(shift=0.3, widen=1.3)
    x, sigma = data()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = log_likelihood(m.model, m.guide, x, sigma, k=100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    b = log_likelihood(m.model, m.guide, x, sigma, k=100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_agrees_with_pyros_per_example_importance_weights():
    """On a small nonlinear VAE trained a few SVI steps: fastvae's estimate and
    Pyro's vectorized_importance_weights on one example at a time (the loop
    users wrote by hand) agree within 3 combined stderr."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    dx, h, lz = 8, 16, 2
    enc = torch.nn.Sequential(torch.nn.Linear(dx, h), torch.nn.Tanh(), torch.nn.Linear(h, 2 * lz))
    dec = torch.nn.Sequential(torch.nn.Linear(lz, h), torch.nn.Tanh(), torch.nn.Linear(h, dx))

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], lz), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), 0.5).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = enc(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    x = torch.randn(32, dx)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    for _ in range(30):
        svi.step(x)
    xs, K = x[:4], 1000
    stats = log_likelihood(model, guide, xs, k=K, return_stats=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with torch.no_grad():
        for i in range(xs.shape[0]):
            lw, _, _ = pyro.infer.importance.vectorized_importance_weights(
                model, guide, xs[i:i + 1], num_samples=K, max_plate_nesting=1)
            ref = float(torch.logsumexp(lw, 0)) - math.log(K)
            w = (lw - lw.max()).exp()
            ref_se = float(w.std() / math.sqrt(K) / w.mean())
            se = math.hypot(ref_se, float(stats.stderr[i]))
            assert abs(float(stats.log_likelihood[i]) - ref) < 3 * se, (i, float(stats.log_likelihood[i]), ref, se)


def bernoulli_model(event_shape, given, dtype, mask=None, validate=False):
    """A model whose observation is Bernoulli over ``event_shape`` (to_event
    over all of it), its parameters given as "probs" (with probabilities at
    0, 1 and within float eps of them among random ones) or "logits" (with
    logits of +-100 among random ones)."""
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            n = math.prod(event_shape)
            p = torch.sigmoid(z * torch.linspace(-3, 3, n, dtype=dtype)).reshape(z.shape[:-1] + event_shape)
            edges = torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-9, 0.5], dtype=dtype)
            p = torch.cat([edges.expand(p.shape[:-1] + (5,)), p[..., 5:]], -1)
            if given == "probs":
                fn = dist.Bernoulli(probs=p, validate_args=validate)
            else:  # logits of +-100 where the probabilities are 0 and 1, finite in every dtype
                logits = torch.logit(p.double(), eps=1e-12).to(dtype)
                logits[..., :2] = torch.tensor([-100.0, 100.0], dtype=dtype)
                fn = dist.Bernoulli(logits=logits, validate_args=validate)
            pyro.sample("x", fn.to_event(len(event_shape)), obs=x, obs_mask=mask)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
    return model, guide


@pytest.mark.parametrize("event_shape", [(7,), (2, 6)], ids=["D", "CxW"])
@pytest.mark.parametrize("given", ["probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bernoulli_observation_is_scored_by_the_fused_op_as_pyro_scores_it(event_shape, given, dtype):
    """The observed Bernoulli's log_prob comes from fastvae's fused op, summed
    over the event, and equals Pyro's own log_prob of the site to rounding:
    binary data and data in (0, 1), probabilities at 0 and 1 (Pyro's clamp)
    and given as logits, one and two event dimensions, float32 and float64."""
    from fastvae.integrations import pyro as adapter

    model, guide = bernoulli_model(event_shape, given, dtype)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand((3,) + event_shape, generator=g, dtype=dtype) < 0.5).to(dtype)
    x[0] = torch.rand(event_shape, generator=g, dtype=dtype)  # continuous targets: the same formula
    calls = []
    fused = adapter._fused_log_prob

    def spy(site):
        out = fused(site)
        calls.append(out is not None)
        return out

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter, "_fused_log_prob", spy)
        mt, _ = adapter._importance_trace(1, model, guide, (x,), {})
    site = mt.nodes["x"]
    assert calls == [False, True]  # z is latent, x fused
    expected = site["fn"].log_prob(site["value"])
    assert site["log_prob"].shape == expected.shape == (3,)
    assert torch.isfinite(site["log_prob"]).all()
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(site["log_prob"], expected, **tol)
    # with the distribution's validation on, data outside {0, 1} is refused as Pyro refuses it
    model, guide = bernoulli_model(event_shape, given, dtype, validate=True)
    with torch.no_grad(), pytest.raises(ValueError, match="within the support"):
        adapter._importance_trace(1, model, guide, (x,), {})


def test_other_observations_are_left_to_pyro():
    """A masked observation, another distribution, a Bernoulli without
    to_event and a subclass of Bernoulli with its own log_prob are scored by
    Pyro's log_prob, as get_importance_trace scores them."""
    from pyro.infer.enum import get_importance_trace

    from fastvae.integrations import pyro as adapter

    x = (torch.rand(4, 7, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    masked = bernoulli_model((7,), "probs", torch.float32, mask=torch.tensor([True, False, True, True]))

    def per_pixel(x):  # a Bernoulli per pixel, in a plate, without to_event
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1, 1), 1.0).to_event(1))
            with pyro.plate("pixels", 7, dim=-1):
                pyro.sample("x", dist.Bernoulli(logits=z[..., 0] * torch.linspace(-2, 2, 7)), obs=x)

    def per_pixel_guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1, 1), 1.0).to_event(1))

    class Tempered(dist.Bernoulli):  # a subclass with its own log_prob
        def log_prob(self, value):
            return 0.5 * super().log_prob(value)

    def tempered(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("x", Tempered(logits=z * torch.linspace(-2, 2, 7)).to_event(1), obs=x)

    gaussian = LinearGaussian()
    for model, guide, args in [(*masked, (x,)), (per_pixel, per_pixel_guide, (x,)),
                               (tempered, masked[1], (x,)), (gaussian.model, gaussian.guide, data(4))]:
        assert all(adapter._fused_log_prob(s) is None for s in
                   pyro.poutine.trace(model).get_trace(*args).nodes.values() if s["type"] == "sample")
        with torch.no_grad():
            torch.manual_seed(0)
            mt, gt = adapter._importance_trace(2, model, guide, args, {})
            torch.manual_seed(0)
            mt_ref, gt_ref = get_importance_trace("flat", 2, model, guide, args, {})
        for ours, ref in ((mt, mt_ref), (gt, gt_ref)):
            for name, site in ref.nodes.items():
                if site["type"] == "sample":
                    torch.testing.assert_close(ours.nodes[name]["log_prob"], site["log_prob"])


def test_the_fused_bernoulli_estimate_equals_pyros_scoring():
    """End to end, a Bernoulli VAE's estimate with the fused observation
    equals the one with Pyro's log_prob for every site (same generator), to
    float32 rounding."""
    from fastvae.integrations import pyro as adapter

    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Softplus(), torch.nn.Linear(16, 9),
                              torch.nn.Sigmoid())

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(dec(z), validate_args=False).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x[:, :2] - 0.5, 0.8).to_event(1))

    x = (torch.rand(5, 9) < 0.4).float()
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = adapter._fused_log_prob
        mp.setattr(adapter, "_fused_log_prob", lambda site: calls.append(site["name"]) or real(site))
        fused = log_likelihood(model, guide, x, k=300, chunk_size=64, generator=torch.Generator().manual_seed(1))
    assert calls.count("x") == 5  # one per chunk of 64 samples: the observation went through the fused op
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter, "_fused_log_prob", lambda site: None)
        plain = log_likelihood(model, guide, x, k=300, chunk_size=64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)


def global_latent_model(x):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(w.expand(x.shape[1:]), 1.0).to_event(1), obs=x)


def global_latent_guide(x):
    pyro.sample("w", dist.Normal(0.0, 1.0))


def test_a_global_latent_is_refused_by_name():
    with pytest.raises(ValueError, match=r"latent site 'w' is not inside pyro.plate\('data'\).*global latent"):
        log_likelihood(global_latent_model, global_latent_guide, torch.zeros(3, 2), k=10)


def test_an_observation_outside_the_plate_and_an_unguided_latent_are_refused_by_name():
    def outside(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=x.sum())

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="observed site 'x' is not inside"):
        log_likelihood(outside, guide, torch.zeros(3), k=10)

    def unguided(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(u, 1.0), obs=x)

    with pytest.raises(ValueError, match="latent site 'u' is not drawn by the guide"):
        log_likelihood(unguided, guide, torch.zeros(3), k=10)


def test_a_subsampled_plate_is_refused_by_name():
    def model(x):
        with pyro.plate("data", 2 * x.shape[0], subsample=torch.arange(x.shape[0])):
            pyro.sample("x", dist.Normal(pyro.sample("z", dist.Normal(0.0, 1.0)), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 2 * x.shape[0], subsample=torch.arange(x.shape[0])):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 'z' is scaled"):
        log_likelihood(model, guide, torch.zeros(3), k=10)


def test_arguments_are_checked_by_name():
    m = LinearGaussian()
    x, sigma = data()
    with pytest.raises(TypeError, match="model must be a callable"):
        log_likelihood(None, m.guide, x, sigma)
    with pytest.raises(TypeError, match="data must be a tensor"):
        log_likelihood(m.model, m.guide, x.tolist(), sigma)
    with pytest.raises(ValueError, match="k must be"):
        log_likelihood(m.model, m.guide, x, sigma, k=0)
    with pytest.raises(ValueError, match=r"pyro.plate\('examples'\)"):
        log_likelihood(m.model, m.guide, x, sigma, data_plate="examples")


def test_importing_fastvae_or_the_adapter_does_not_import_pyro():
    code = ("import sys, fastvae, fastvae.integrations, fastvae.integrations.pyro; "
            "assert 'pyro' not in sys.modules, 'pyro imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_the_docs_signature_is_the_functions():
    """docs/integrations.md opens with the adapter's signature: its parameters
    in order, with their defaults (tests/test_docs.py checks fastvae's own)."""
    import inspect
    import re

    text = (REPO / "docs" / "integrations.md").read_text()
    written = re.search(r"log_likelihood\((.*?)\) ->", text, re.S).group(1)
    params = [p.strip() for p in " ".join(written.split()).split(",")]
    actual = [("*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else "") + p.name
              + ("" if p.default is p.empty else f"={p.default!r}".replace("'", '"'))
              for p in inspect.signature(log_likelihood).parameters.values()]
    assert params == actual
