"""fastvae.integrations.scvi: the per-cell log p(x) of scvi-tools' SCVI,
checked against scVI's own get_marginal_ll on small models trained on
synthetic counts (observed and latent library, a batch covariate and a
continuous one)."""
import math
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvae import EvaluationWarning, LogLikelihoodStats
from fastvae.integrations.scvi import marginal_ll

REPO = Path(__file__).resolve().parents[1]
SKIP = "the scvi-tools adapter's tests need scvi-tools (pip install fastvae[integrations])"


def test_importing_the_adapters_imports_neither_framework():
    code = ("import sys, fastvae.integrations.scvi, fastvae.integrations.pythae; "
            "assert not {'scvi', 'pythae', 'anndata'} & set(sys.modules), 'a framework was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.full  # imports scvi-tools (8 s)
def test_a_model_without_scvis_vae_module_is_refused_by_name():
    """A model whose module is not scvi.module.VAE (here a stand-in) names
    what the adapter needs, before touching any data."""
    pytest.importorskip("scvi", reason=SKIP)
    with pytest.raises(TypeError, match="must be a trained scvi-tools model"):
        marginal_ll(torch.nn.Linear(2, 2))
    other = types.SimpleNamespace(module=torch.nn.Linear(2, 2), _validate_anndata=lambda a: a)
    with pytest.raises(TypeError, match="module is Linear, not scvi.module.VAE"):
        marginal_ll(other)


@pytest.fixture(scope="module")
def trained():
    """Two SCVI models (ZINB) on 300 synthetic cells x 10 genes with two
    batches and a continuous covariate, each trained a few epochs: one with
    the observed library, whose encoder is a fair proposal, and one with a latent library
    trained briefly, whose library posterior sits far from the encoder's."""
    scvi = pytest.importorskip("scvi", reason=SKIP)
    anndata = pytest.importorskip("anndata", reason=SKIP)
    scvi.settings.seed = 0
    rng = np.random.default_rng(0)
    n, g = 300, 10
    counts = rng.negative_binomial(2, 0.5, size=(n, g)).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1  # an observed library of 0 counts has no log
    adata = anndata.AnnData(counts)
    adata.obs["batch"] = np.where(np.arange(n) % 2, "a", "b")
    adata.obs["c"] = rng.normal(size=n)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", continuous_covariate_keys=["c"])
    observed = scvi.model.SCVI(adata, n_latent=2, n_hidden=32, n_layers=1)
    observed.train(max_epochs=5, accelerator="cpu", enable_progress_bar=False)
    latent = scvi.model.SCVI(adata, n_latent=2, n_hidden=32, n_layers=1, use_observed_lib_size=False)
    latent.train(max_epochs=3, accelerator="cpu", enable_progress_bar=False)
    return observed, latent


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.full  # trains two scVI models (about 15 s with scvi's 8 s import)
def test_agrees_with_get_marginal_ll_per_cell(trained):
    """Per cell, fastvae's estimate at K = 5000 and scVI's get_marginal_ll at
    K = 20000 agree within 3 combined standard errors (scVI's, which it does
    not report, is the same weights' at 4x the samples: half of fastvae's), on
    every cell whose k̂ says the stderr can be trusted."""
    model, _ = trained
    cells = np.arange(12)
    stats = marginal_ll(model, indices=cells, k=5000, return_stats=True, generator=gen())
    assert isinstance(stats, LogLikelihoodStats) and stats.log_likelihood.shape == (12,)
    torch.manual_seed(0)
    ref = model.get_marginal_ll(indices=cells, n_mc_samples=20000, return_mean=False, n_mc_samples_per_pass=2000)
    reliable = ~stats.unreliable
    assert int(reliable.sum()) >= 8, stats.pareto_k
    se = stats.stderr * math.sqrt(1 + 5000 / 20000)
    err = (stats.log_likelihood - ref).abs()
    assert bool((err[reliable] < 3 * se[reliable]).all()), (stats.log_likelihood - ref, se, stats.pareto_k)


@pytest.mark.full  # trains an scVI model per likelihood (a few seconds each)
@pytest.mark.parametrize("likelihood, dispersion", [("nb", "gene-batch"), ("poisson", "gene")])
def test_other_gene_likelihoods_agree_with_get_marginal_ll(trained, likelihood, dispersion):
    """NB (its theta per batch, so per cell) and Poisson, scored by fastvae's
    fused count ops: per cell within 3 combined standard errors of
    get_marginal_ll, on the cells k̂ says are reliable."""
    import scvi

    observed, _ = trained
    scvi.settings.seed = 0
    model = scvi.model.SCVI(observed.adata, n_latent=2, n_hidden=16, n_layers=1, gene_likelihood=likelihood,
                            dispersion=dispersion)
    model.train(max_epochs=5, accelerator="cpu", enable_progress_bar=False)
    cells = np.arange(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)  # the cells k̂ marks are left out below
        stats = marginal_ll(model, indices=cells, k=3000, return_stats=True, generator=gen())
    torch.manual_seed(0)
    ref = model.get_marginal_ll(indices=cells, n_mc_samples=12000, return_mean=False, n_mc_samples_per_pass=2000)
    reliable = ~stats.unreliable
    assert int(reliable.sum()) >= 4, stats.pareto_k
    se = stats.stderr * math.sqrt(1 + 3000 / 12000)
    err = (stats.log_likelihood - ref).abs()
    assert bool((err[reliable] < 3 * se[reliable]).all()), (stats.log_likelihood - ref, se, stats.pareto_k)


def logistic_normal_oracle(model, cells, k: int, seed: int) -> torch.Tensor:
    """log p̂(x) of a latent_distribution="ln" model written with scVI's own
    calls: u ~ q(u | x) (the encoder's normal), z = softmax(u), and the weight
    log N(u; 0, I) + log p(x | z, l) - log q(u | x), all K samples in one
    generative pass, (len(cells),)."""
    module = model.module
    tensors = next(iter(model._make_data_loader(adata=model.adata, indices=cells, batch_size=len(cells),
                                                shuffle=False)))
    with torch.no_grad():
        inputs = module._get_inference_input(tensors, full_forward_pass=True)
        out = module.inference(**inputs, n_samples=1)
        torch.manual_seed(seed)
        u = out["qz"].sample((k,))
        gen_inputs = module._get_generative_input(tensors, out)
        gen_inputs.update(z=module.z_encoder.z_transformation(u), library=out["library"].expand(k, -1, -1))
        px = module.generative(**gen_inputs)["px"]
        log_w = (torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1) + px.log_prob(inputs["x"]).sum(-1)
                 - out["qz"].log_prob(u).sum(-1))
    return torch.logsumexp(log_w, 0) - math.log(k)


@pytest.mark.full  # trains an scVI model (a few seconds)
def test_the_logistic_normal_latent_is_weighted_before_the_softmax(trained):
    """latent_distribution="ln": per cell within 3 combined standard errors of
    the estimate written with scVI's calls, whose weight takes the prior and
    the posterior in the space the encoder samples (the softmax's input), on
    the cells k̂ says are reliable."""
    import scvi

    observed, _ = trained
    scvi.settings.seed = 0
    model = scvi.model.SCVI(observed.adata, n_latent=3, n_hidden=16, n_layers=1, latent_distribution="ln")
    model.train(max_epochs=5, accelerator="cpu", enable_progress_bar=False)
    cells = np.arange(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)  # the cells k̂ marks are left out below
        stats = marginal_ll(model, indices=cells, k=3000, return_stats=True, generator=gen())
    ref = logistic_normal_oracle(model, cells, k=12000, seed=0)
    reliable = ~stats.unreliable
    assert int(reliable.sum()) >= 4, stats.pareto_k
    se = stats.stderr * math.sqrt(1 + 3000 / 12000)
    err = (stats.log_likelihood - ref).abs()
    assert bool((err[reliable] < 3 * se[reliable]).all()), (stats.log_likelihood - ref, se, stats.pareto_k)


def assert_same_distribution(model, cells, k: int = 20, reps: int = 30) -> None:
    """Where the proposal is poor (k̂ > 0.7: the stderr means nothing), the
    check is on the estimator's distribution, which for a given K is the same
    for any correct implementation: ``reps`` estimates at K = ``k`` from each
    agree in mean per cell within 3 standard errors of the difference of the
    means."""
    ours = torch.stack([marginal_ll(model, indices=cells, k=k, generator=gen(r)) for r in range(reps)])
    theirs = []
    for r in range(reps):
        torch.manual_seed(r)
        theirs.append(model.get_marginal_ll(indices=cells, n_mc_samples=k, return_mean=False,
                                            n_mc_samples_per_pass=k))
    theirs = torch.stack(theirs)
    se = ((ours.var(0) + theirs.var(0)) / reps).sqrt()
    err = (ours.mean(0) - theirs.mean(0)).abs()
    assert bool((err < 3 * se).all()), (err, se)


@pytest.mark.full  # trains two scVI models
def test_the_latent_library_estimator_has_scvis_distribution(trained):
    """With a latent library the briefly trained encoder is a poor proposal:
    the estimator has get_marginal_ll's distribution at K = 20."""
    assert_same_distribution(trained[1], np.arange(6))


@pytest.mark.full  # trains an scVI model (a few seconds)
def test_the_normal_gene_likelihood_has_scvis_distribution(trained):
    """gene_likelihood="normal", scored by scVI's own px.log_prob (a normal
    on counts, so a poor proposal after brief training: k̂ well above 0.7):
    the estimator has get_marginal_ll's distribution at K = 20."""
    import scvi

    scvi.settings.seed = 0
    model = scvi.model.SCVI(trained[0].adata, n_latent=2, n_hidden=16, n_layers=1, gene_likelihood="normal")
    model.train(max_epochs=5, accelerator="cpu", enable_progress_bar=False)
    assert_same_distribution(model, np.arange(6))


@pytest.mark.full  # trains two scVI models
def test_a_poor_proposal_warns_with_k_hat_and_marks_the_cells(trained):
    """The latent-library model's encoder is far from its library posterior:
    the call warns once, at the caller's line, that k̂ > 0.7 (how many cells,
    the remedies), and the stats mark those cells."""
    _, model = trained
    with pytest.warns(EvaluationWarning, match=r"Pareto k̂ > 0.7 for \d+ of 16 examples") as record:
        stats = marginal_ll(model, indices=np.arange(16), k=1000, return_stats=True, generator=gen())
    assert bool(stats.unreliable.any())
    assert torch.equal(stats.unreliable, stats.pareto_k > 0.7)
    high = [w for w in record if "Pareto" in str(w.message)]
    assert len(high) == 1 and Path(high[0].filename).name == Path(__file__).name
    assert "iwae" in str(high[0].message)


@pytest.mark.full  # trains two scVI models
@pytest.mark.parametrize("which", [0, 1], ids=["observed-library", "latent-library"])
def test_a_split_batch_keeps_each_cells_library_and_covariates(trained, which):
    """A memory budget that holds one sample of 3 cells splits the 10 cells
    into blocks: each block's decoder gets its own cells' library sizes,
    batch indices and covariates, and each cell the same noise, so the values
    equal the unsplit ones (to float32 rounding); so do another chunk size
    and another encoder batch size."""
    model = trained[which]
    cells = np.arange(10)
    whole = marginal_ll(model, indices=cells, k=64, generator=gen())
    split = marginal_ll(model, indices=cells, k=64, generator=gen(), bytes_per_sample=1000, memory_budget=3000)
    other = marginal_ll(model, indices=cells, k=64, generator=gen(), chunk_size=7, batch_size=4)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(other, whole, rtol=1e-5, atol=1e-3)
    assert not torch.equal(marginal_ll(model, indices=cells, k=64, generator=gen(1)), whole)


@pytest.mark.full  # trains two scVI models
def test_target_stderr_and_the_module_mode(trained):
    """target_stderr scores the unconverged cells only (k_used below the cap
    for some), each reaching the target; the module is left in the mode it
    was in."""
    model, _ = trained
    model.module.train()
    stats = marginal_ll(model, indices=np.arange(8), k=4000, target_stderr=0.05, return_stats=True,
                        generator=gen())
    assert model.module.training
    model.module.eval()
    done = stats.stderr <= 0.05
    assert int(stats.k_used.min()) < 4000 and bool(done.any())
    assert bool((done | (stats.k_used == 4000)).all())


@pytest.mark.full  # trains two scVI models
def test_minified_data_and_bad_arguments_are_refused_by_name(trained):
    model, _ = trained
    model.module.minified_data_type = "latent_posterior_parameters"
    try:
        with pytest.raises(ValueError, match="adata is minified"):
            marginal_ll(model, k=10)
    finally:
        model.module.minified_data_type = None
    with pytest.raises(ValueError, match="batch_size must be"):
        marginal_ll(model, indices=[0], k=10, batch_size=0)
    with pytest.raises(ValueError, match="k must be"):
        marginal_ll(model, indices=[0], k=0)
    with pytest.raises(TypeError, match="generator must be"):
        marginal_ll(model, indices=[0], k=10, generator=0)


def test_the_docs_signature_is_the_functions():
    """docs/integrations.md gives the adapter's signature in its section: its
    parameters in order, with their defaults."""
    import inspect
    import re

    text = (REPO / "docs" / "integrations.md").read_text()
    written = re.search(r"fastvae\.integrations\.scvi\.marginal_ll\((.*?)\) ->", text, re.S).group(1)
    params = [p.strip() for p in " ".join(written.split()).split(",")]
    actual = [p.name + ("" if p.default is p.empty else f"={p.default!r}".replace("'", '"'))
              for p in inspect.signature(marginal_ll).parameters.values()]
    assert params == actual
