"""The README's main job (python -m fastvae) runs, and its estimate is right."""
import pytest
import torch

from conftest import INTERPRET
from fastvae.__main__ import iwae_on_linear_gaussian, main

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process test")


def test_importance_weighted_bound_approaches_exact_log_likelihood(monkeypatch):
    monkeypatch.delenv("FASTVAE_BACKEND", raising=False)
    torch.manual_seed(0)
    exact, bounds = iwae_on_linear_gaussian("cpu", ks=(1, 30, 1000))
    # a lower bound in expectation (256 points average out the noise), rising with K
    assert all(b <= exact + 0.01 for b in bounds.values())
    assert bounds[1] < bounds[30] < bounds[1000]
    assert exact - bounds[1] > 0.1 and exact - bounds[1000] < 0.02


def test_main_runs(capsys, monkeypatch):
    monkeypatch.delenv("FASTVAE_BACKEND", raising=False)
    main(["--batch", "512", "--latent", "8", "--samples", "2"])
    out = capsys.readouterr().out
    assert "backends" in out and "exact log p(x)" in out and "forward+backward" in out
