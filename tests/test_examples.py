"""The examples run (small settings) and do what they say."""
import importlib.util
import math
from pathlib import Path

import pytest

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
