"""fastvae.integrations.pythae: the per-example log p(x) of pythae's
Gaussian-posterior VAEs, checked against pythae's own get_nll run one example
at a time on tiny models trained a few steps, and its refusals by name."""
import math
from pathlib import Path

import pytest
import torch

pythae_models = pytest.importorskip(
    "pythae.models", reason="the pythae adapter's tests need pythae (pip install fastvae[integrations])")

from pythae.data.datasets import DatasetOutput  # noqa: E402

from fastvae import LogLikelihoodStats  # noqa: E402
from fastvae.integrations.pythae import log_likelihood  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
D, L = 12, 2


def data(b=64, seed=0):
    return (torch.rand(b, D, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


def trained(cls, config_cls, steps=60, **config):
    """A pythae model (its default MLP encoder and decoder) trained a few Adam
    steps on data(): pythae's own loss, no trainer."""
    torch.manual_seed(0)
    model = cls(config_cls(input_dim=(D,), latent_dim=L, **config))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x = data()
    for _ in range(steps):
        opt.zero_grad()
        model(DatasetOutput(data=x)).loss.backward()
        opt.step()
    return model.eval()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.full  # trains five models (a few seconds)
@pytest.mark.parametrize("name, recon, binary", [("VAE", "bce", True), ("VAE", "bce", False),
                                                  ("VAE", "mse", True), ("BetaVAE", "bce", True),
                                                  ("IWAE", "bce", True)])
def test_agrees_with_get_nll_per_example(name, recon, binary):
    """Per example, fastvae's estimate at K = 2000 and pythae's get_nll on
    that example alone at K = 8000 agree within 3 combined standard errors
    (get_nll's, which it does not report, is the same weights' at 4x the
    samples: half of fastvae's). Binarized data take the adapter's one-log
    path, grey levels in [0, 1] binary_cross_entropy's."""
    cls, config_cls = getattr(pythae_models, name), getattr(pythae_models, f"{name}Config")
    model = trained(cls, config_cls, reconstruction_loss=recon)
    x = data(8, seed=1) if binary else torch.rand(8, D, generator=gen(1)) * 0.6
    stats = log_likelihood(model, x, k=2000, return_stats=True, generator=gen())
    assert isinstance(stats, LogLikelihoodStats) and stats.log_likelihood.shape == (8,)
    assert not bool(stats.unreliable.any()), stats.pareto_k
    torch.manual_seed(1)
    with torch.no_grad():
        ref = torch.tensor([model.get_nll(x[i:i + 1], n_samples=8000, batch_size=2000) for i in range(8)],
                           dtype=torch.float32)
    se = stats.stderr * math.sqrt(1 + 2000 / 8000)
    err = (stats.log_likelihood - ref).abs()
    assert bool((err < 3 * se).all()), (stats.log_likelihood - ref, se)


def test_a_split_batch_and_another_chunking_give_the_same_values():
    """Each example's noise is keyed by (example, sample): a memory budget
    that splits the batch into blocks of 2, another chunk size and another
    encoder batch size give the values of the plain call; another generator
    other values. The model is left in the mode it was in."""
    torch.manual_seed(0)
    model = pythae_models.VAE(pythae_models.VAEConfig(input_dim=(D,), latent_dim=L, reconstruction_loss="bce"))
    x = data(6)
    whole = log_likelihood(model, x, k=100, generator=gen())
    assert model.training
    split = log_likelihood(model, x, k=100, generator=gen(), bytes_per_sample=1000, memory_budget=2500)
    other = log_likelihood(model, x, k=100, generator=gen(), chunk_size=7, batch_size=4)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(other, whole, rtol=1e-6, atol=1e-5)
    assert not torch.equal(log_likelihood(model, x, k=100, generator=gen(1)), whole)


@pytest.mark.full  # trains a model
def test_target_stderr_stops_the_converged_examples():
    model = trained(pythae_models.VAE, pythae_models.VAEConfig, reconstruction_loss="bce")
    stats = log_likelihood(model, data(6, seed=1), k=4000, target_stderr=0.02, return_stats=True, generator=gen())
    assert int(stats.k_used.min()) < 4000
    assert bool(((stats.stderr <= 0.02) | (stats.k_used == 4000)).all())


REFUSED = [
    ("AE", "AEConfig", "AE has no posterior"),
    ("WAE_MMD", "WAE_MMD_Config", "WAE_MMD has no posterior"),
    ("VAMP", "VAMPConfig", "VAMP is not supported.*VampPrior"),
    ("VAE_IAF", "VAE_IAF_Config", "VAE_IAF is not supported.*normalizing flow"),
    ("VAE_LinNF", "VAE_LinNF_Config", "VAE_LinNF is not supported.*normalizing flow"),
    ("HVAE", "HVAEConfig", "HVAE is not supported.*Hamiltonian"),
    ("RHVAE", "RHVAEConfig", "RHVAE is not supported.*Riemannian Hamiltonian"),
    ("SVAE", "SVAEConfig", "SVAE is not supported.*von Mises-Fisher"),
    ("MSSSIM_VAE", "MSSSIM_VAEConfig", "MSSSIM_VAE is not supported.*MS-SSIM"),
]


@pytest.mark.full  # builds nine models (the quick tier refuses one)
@pytest.mark.parametrize("name, config, match", REFUSED, ids=[r[0] for r in REFUSED])
def test_models_without_a_gaussian_posterior_are_refused_by_name(name, config, match):
    model = getattr(pythae_models, name)(getattr(pythae_models, config)(input_dim=(D,), latent_dim=L))
    with pytest.raises(TypeError, match=match):
        log_likelihood(model, data(2), k=10)


def test_a_deterministic_autoencoder_and_bad_arguments_are_refused_by_name():
    """An AE has no posterior to sample from; a subclass of VAE that changes
    get_nll has other densities; and the arguments are checked by name."""
    with pytest.raises(TypeError, match="AE has no posterior q"):
        log_likelihood(pythae_models.AE(pythae_models.AEConfig(input_dim=(D,), latent_dim=L)), data(2), k=10)

    class OwnNll(pythae_models.VAE):
        def get_nll(self, data, n_samples=1, batch_size=100):
            return 0.0

    model = pythae_models.VAE(pythae_models.VAEConfig(input_dim=(D,), latent_dim=L))
    with pytest.raises(TypeError, match="OwnNll overrides pythae's VAE.get_nll"):
        log_likelihood(OwnNll(model.model_config), data(2), k=10)
    with pytest.raises(TypeError, match="model must be a pythae model"):
        log_likelihood(torch.nn.Linear(2, 2), data(2))
    with pytest.raises(TypeError, match="data must be a tensor"):
        log_likelihood(model, data(2).tolist())
    with pytest.raises(ValueError, match=r"data must have shape \(B, \*input_dim\) = \(B, 12\)"):
        log_likelihood(model, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="k must be"):
        log_likelihood(model, data(2), k=0)
    with pytest.raises(ValueError, match="batch_size must be"):
        log_likelihood(model, data(2), batch_size=0)


def test_the_docs_signature_is_the_functions():
    """docs/integrations.md gives the adapter's signature in its section: its
    parameters in order, with their defaults."""
    import inspect
    import re

    text = (REPO / "docs" / "integrations.md").read_text()
    written = re.search(r"fastvae\.integrations\.pythae\.log_likelihood\((.*?)\) ->", text, re.S).group(1)
    params = [p.strip() for p in " ".join(written.split()).split(",")]
    actual = [p.name + ("" if p.default is p.empty else f"={p.default!r}".replace("'", '"'))
              for p in inspect.signature(log_likelihood).parameters.values()]
    assert params == actual
