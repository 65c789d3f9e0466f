"""The README's main job (python -m fastvae) trains, evaluates, times and plots."""
import math

import pytest

import fastvae._backend
from fastvae.__main__ import main

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process test")


def test_main_job_trains_evaluates_and_writes_png(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    fastvae._backend.set_backend(None)
    png = tmp_path / "digits.png"
    report = main(["--epochs", "4", "--k", "4", "--k-eval", "64", "--out", str(png)])
    out = capsys.readouterr().out
    assert "held-out bounds" in out and "time per training step" in out and "backend" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for name, losses in report["train_loss"].items():
        assert losses[-1] < losses[0] - 5, (name, losses)  # it learns (nats per image)
    for bounds in report["bounds"].values():
        values = [v for key, v in bounds.items() if not key.endswith("stderr")]
        assert len(values) == 3 and all(math.isfinite(v) and -200 < v < 0 for v in values), bounds
        assert 0 < bounds["log p(x), K=64 stderr"] < 5, bounds
    assert "not comparable with results on binarized digits" in out
    assert "likelihood='bernoulli'" in out and "not the continuous Bernoulli" in out  # says which, offers the other
    assert all(t > 0 for t in report["step_ms"].values())


def test_main_job_offers_the_continuous_bernoulli(tmp_path, capsys):
    """--likelihood continuous_bernoulli scores the grey-scale digits with the
    normalized continuous Bernoulli, and the report says so."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    fastvae._backend.set_backend(None)
    report = main(["--epochs", "2", "--k", "2", "--k-eval", "16", "--likelihood", "continuous_bernoulli",
                   "--out", str(tmp_path / "cb.png")])
    out = capsys.readouterr().out
    assert report["likelihood"] == "continuous_bernoulli"
    assert "likelihood='continuous_bernoulli'" in out and "continuous Bernoulli (normalized) density" in out
    assert "continuous_bernoulli_log_prob" in out
    for bounds in report["bounds"].values():  # log-densities: finite, of either sign
        assert all(math.isfinite(v) for v in bounds.values()), bounds
    with pytest.raises(SystemExit):
        main(["--likelihood", "poisson"])
