"""The examples run (small settings) and do what they say."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fastvae._backend

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process test")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conditional_vae_trains(monkeypatch, capsys):
    pytest.importorskip("sklearn")
    fastvae._backend.set_backend(None)
    bound = load("conditional_vae").main(epochs=3)
    assert -40 < bound < 0  # nats per 8x8 digit after 3 epochs (the untrained model is near -45)
    assert capsys.readouterr().out.count("\n") >= 8  # the 8 rows of sampled digits


def test_estimator_snr_shape_of_the_table():
    snr = load("estimator_snr")
    g = snr.encoder_gradients("dreg", 10, 200)
    assert g.shape == (200, 4) and g.isfinite().all()


def test_priors_and_posteriors_example_runs(capsys):
    pytest.importorskip("sklearn")
    fastvae._backend.set_backend(None)
    results = load("priors_and_posteriors").main(epochs=1, k_eval=20)
    assert set(results) == {"standard", "vampprior", "full-covariance"}
    for r in results.values():
        # nats per 8x8 binary-ish digit: finite and, after one epoch, between the untrained model and 0
        assert -60 < r["elbo"] < 0 and -60 < r["log_px"] < 0 and r["stderr"] > 0
    assert "| vampprior |" in capsys.readouterr().out


def test_scvi_zinb_example_runs(capsys):
    """The scVI-style ZINB VAE at a small size: both models train, and for each
    fastvae.log_likelihood and the plain-PyTorch IWAE estimate of the same
    model agree to Monte Carlo error."""
    fastvae._backend.set_backend(None)
    results = load("scvi_zinb").main(epochs=2, cells=200, genes=40, k_eval=100)
    assert set(results) == {"fastvae zinb", "hand-written zinb"}
    for r in results.values():
        assert r["log_px"] < 0 and abs(r["log_px"] - r["log_px_plain"]) < 0.5 + 5 * r["stderr"]
    assert "| fastvae zinb |" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::fastvae.EvaluationWarning")  # a k̂ above 0.7 for a digit or two at K = 200
def test_discrete_vae_example_runs(capsys):
    """The straight-through Gumbel-softmax VAE at a small size: both models
    train; for each, fastvae.log_likelihood (categorical weights of the hard
    z) and the plain-PyTorch importance-sampled estimate of the same model
    agree to their Monte Carlo error; the two models score alike."""
    pytest.importorskip("sklearn")
    fastvae._backend.set_backend(None)
    results = load("discrete_vae").main(epochs=3, latents=4, categories=4, k=200)
    assert set(results) == {"fastvae", "hand-written"}
    for r in results.values():
        # nats per binarized 8x8 digit: below 0, above the untrained model (about -44), and at most the
        # 4 log 4 nats a 4 x 4 categorical code can carry above the decoder alone
        assert -40 < r["log_px"] < 0 and r["stderr"] > 0 and r["mc_stderr"] > 0 and r["step_ms"] > 0
        se = math.hypot(r["mc_stderr"], r["mc_stderr_plain"])
        assert abs(r["log_px"] - r["log_px_plain"]) < 5 * se + 1e-3, r
    assert abs(results["fastvae"]["log_px"] - results["hand-written"]["log_px"]) < 1.0
    out = capsys.readouterr().out
    assert "| fastvae |" in out and "| hand-written |" in out


@pytest.mark.filterwarnings("ignore::fastvae.EvaluationWarning")  # k̂ above 0.7 after a few steps at K = 40
def test_hierarchical_vae_example_runs(capsys):
    """The VDVAE-style hierarchical VAE at a small size: on the same noise
    the fused calls and VDVAE's formulas give the same loss and gradients, at
    initialization and trained; both models train; log p(x) at K = 40 lies
    above the ELBO and equals the hand reduction of the same samples to
    rounding."""
    pytest.importorskip("sklearn")
    fastvae._backend.set_backend(None)
    digits, k = 20, 40
    ex = load("hierarchical_vae")
    # a chunk of 10 samples of the 20 digits at the default width, 16
    results = ex.main(steps=4, warmup=2, k=k, n_test=digits, memory_budget=10 * digits * ex.bytes_per_sample(16))
    init, trained = results["agreement_at_init"], results["agreement_trained"]
    for a in (init, trained):
        # -ELBO per dimension: near log 17 = 2.83 nats for an untrained model of 17 levels
        assert 1.5 < a["vdvae"] < 3.5 and abs(a["fused"] - a["vdvae"]) < 1e-5 * a["vdvae"], a
        assert a["grad_rel_diff"] < 1e-5, a
    assert trained["fused"] < init["fused"] - 0.05  # 4 Adam steps lower the loss on the first batch
    for name in ("fused", "vdvae"):
        r = results[name]
        # nats per 17-level digit: a uniform model scores -64 log 17 = -181.3
        assert -200 < r["elbo"] < r["log_px"] < 0 and r["elbo_stderr"] > 0 and r["mc_stderr"] > 0, r
        assert 0 < r["bits_per_dim"] < 4.5 and len(r["kl_per_group"]) == 3 and min(r["kl_per_group"]) > 0
        assert r["gap"] > 2 * r["gap_stderr"] > 0  # K = 40 importance samples beat one
        assert r["same_samples_max_diff"] < 1e-4  # float32 log-weights near -160 nats
        assert r["samples_per_call"] == 10 and r["calls"] == 4  # the memory budget's chunk, K / 10 calls
    assert abs(results["fused"]["log_px"] - results["vdvae"]["log_px"]) < 1.0  # the same start, 4 steps apart
    assert -200 < results["fused"]["log_px_plain"] < 0
    out = capsys.readouterr().out
    assert "| fastvae.sample_normal_kl + hierarchical_elbo |" in out and "hand-written loop" in out


def test_hierarchical_vae_log_px_against_hand_written_loops():
    """fastvae.importance_log_likelihood on the example model against
    hand-written importance-sampling loops with their own draws: within 2 of
    the loops' empirical standard errors (replicates, not the delta method,
    which understates the error of an untrained model's heavy-tailed
    weights). The model runs on chunks whose size the memory budget sets:
    K = 200 takes twice the calls of K = 100, each of the same size."""
    fastvae._backend.set_backend(None)
    ex = load("hierarchical_vae")
    torch.manual_seed(0)
    model = ex.TopDownVAE(width=8, zdim=2, mixtures=2).eval()
    x = ex.to_images(torch.randint(0, 17, (6, 64)) / 16)
    budget = 25 * 6 * ex.bytes_per_sample(8)  # 25 samples of the 6 digits
    runs = {}
    with torch.no_grad():
        for k in (100, 200):
            stats, seen, calls, largest = ex.fastvae_log_px(model, x, k, 0, 8, budget)
            assert seen.shape == (k, 6) and stats.log_likelihood.isfinite().all()
            runs[k] = calls, largest, stats.log_likelihood.double().mean().item()
        torch.manual_seed(1)
        loops = torch.stack([ex.hand_written_log_px(model, x, 100, 25)[0].double().mean() for _ in range(8)])
    assert {k: r[:2] for k, r in runs.items()} == {100: (4, 25), 200: (8, 25)}
    spread = loops.std().item() * math.sqrt(1 + 1 / len(loops))  # of one estimate minus the loops' mean
    assert -300 < runs[100][2] < 0 and spread > 0, (runs, loops)
    assert abs(runs[100][2] - loops.mean().item()) < 2 * spread, (runs, loops)
