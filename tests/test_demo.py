"""The README's main job (python -m fastvae) trains, evaluates, times and plots."""
import contextlib
import io
import math
import re
from pathlib import Path

import pytest

import fastvae._backend
from fastvae.__main__ import main

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process test")


@pytest.fixture(scope="module")
def default_job(tmp_path_factory):
    """One run of the main job with its defaults (the README's command), its
    report and what it printed: the minutes of training and the K=5000
    evaluation are spent once for the tests that read them."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    previous = fastvae._backend.requested_backend()
    fastvae._backend.set_backend(None)
    png = tmp_path_factory.mktemp("demo") / "digits.png"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            report = main(["--out", str(png)])
    finally:
        fastvae._backend.set_backend(previous)
    return report, out.getvalue(), png


def test_main_job_trains_evaluates_and_writes_png(default_job):
    report, out, png = default_job
    assert "held-out bounds" in out and "time per training step" in out and "backend" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for name, losses in report["train_loss"].items():
        assert losses[-1] < losses[0] - 5, (name, losses)  # it learns (nats per image)
    for bounds in report["bounds"].values():
        values = [v for key, v in bounds.items() if not key.endswith("stderr")]
        assert len(values) == 3 and all(math.isfinite(v) and -200 < v < 0 for v in values), bounds
        assert 0 < bounds["log p(x), K=5000 stderr"] < 5, bounds
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


def test_the_benchmarks_readme_quotes_what_the_main_job_prints(default_job):
    """The held-out bounds benchmarks/README.md quotes (its "The main job", which
    the README links for what the demo prints) are what `python -m fastvae` computes with
    its defaults (the step timing, which varies by machine, is not compared;
    it runs after the evaluation and draws no noise the bounds use). The
    training is deterministic on one machine; 0.02 nats allows the last
    printed digit to move with another BLAS or CPU."""
    report, _, _ = default_job
    readme = (Path(__file__).resolve().parents[1] / "benchmarks" / "README.md").read_text()
    names = list(report["bounds"])
    for key in ("ELBO", "IWAE k=50", "log p(x), K=5000"):
        (line,) = re.findall(rf"^  {re.escape(key)}  +(.+)$", readme, re.M)
        quoted = [float(v) for v in re.findall(r"-?\d+\.\d+", re.sub(r"± *\d+\.\d+", "", line))]
        assert len(quoted) == len(names), (key, line)
        for name, want in zip(names, quoted):
            assert abs(report["bounds"][name][key] - want) <= 0.02, (key, name, want, report["bounds"][name][key])
