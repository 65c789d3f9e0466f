"""torch.compile(fullgraph=True) traces a training step through the ops with no graph break."""
import pytest
import torch

import fastvae
from fastvae.sample_normal import SampleNormal

from conftest import INTERPRET
from helpers import assert_compiled_matches_eager

pytestmark = pytest.mark.skipif(INTERPRET, reason="compile tests run in the main process (cpp backend)")


class TinyVAE(torch.nn.Module):
    def __init__(self, d=12, latent=3):
        super().__init__()
        self.enc = torch.nn.Linear(d, 2 * latent)
        self.dec = torch.nn.Linear(latent, d)


def loss_public_api(model, x):
    mu, logvar = model.enc(x).chunk(2, dim=-1)
    z, kl = fastvae.sample_normal(mu, logvar, 4)
    prior_kl = fastvae.kl_normal(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar))
    out = model.dec(z)  # (4, B, D); x (B, D) broadcasts over the samples
    recon = fastvae.gaussian_log_prob(x, out, scale=0.5).mean(0)
    recon_sp = fastvae.gaussian_log_prob(x, out, softplus_var=out.detach() * 0 + model.dec.bias, delta=1e-3).mean(0)
    recon_bern = fastvae.bernoulli_log_prob(torch.sigmoid(x), out).mean(0)
    return (kl - recon - 0.1 * recon_sp - 0.1 * recon_bern + 0.1 * prior_kl).mean()


def loss_with_seed(model, x, seed):
    mu, logvar = model.enc(x).chunk(2, dim=-1)
    z, kl = SampleNormal.apply(mu, logvar, seed, 3)
    return (((model.dec(z) - x) ** 2).sum(-1).mean(0) + kl).mean()


def test_training_step_compiles_fullgraph_and_matches_eager(monkeypatch):
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.randn(8, 12)
    assert_compiled_matches_eager(loss_public_api, (model, x), list(model.parameters()), torch_seed=1)


def test_compiled_matches_eager_for_same_seed(monkeypatch):
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.randn(8, 12)
    assert_compiled_matches_eager(loss_with_seed, (model, x, torch.tensor(4242)), list(model.parameters()),
                                  atol=1e-6, grad_rtol=1e-5)


def loss_full_covariance(model, x):
    """A full-covariance encoder: mu and a lower-triangular S (softplus diagonal) from one linear layer."""
    L = model.dec.in_features
    h = model.enc_full(x)
    mu, raw = h[:, :L], h[:, L:].reshape(-1, L, L)
    diag = torch.nn.functional.softplus(torch.diagonal(raw, dim1=-2, dim2=-1)) + 1e-3
    S = torch.tril(raw, -1) + torch.diag_embed(diag)
    z, kl = fastvae.sample_normal_tril(mu, S, 3)
    return (((model.dec(z) - x) ** 2).sum(-1).mean(0) + kl).mean()


def test_full_covariance_step_compiles_fullgraph_and_matches_eager():
    fastvae._backend.set_backend(None)
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.randn(8, 12)
    model.enc_full = torch.nn.Linear(12, 3 + 3 * 3)
    assert_compiled_matches_eager(loss_full_covariance, (model, x), list(model.enc_full.parameters())
                                  + list(model.dec.parameters()), torch_seed=2)


def test_both_terms_objects_name_the_bound_bound_and_elbo_stays_an_alias():
    """ELBOTerms and IWAETerms share .bound (issue 26); ELBOTerms.elbo is a
    deprecated alias that warns in eager mode and traces under fullgraph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.rand(8, 12)

    def bounds(x):
        mu, logvar = model.enc(x).chunk(2, dim=-1)
        e = fastvae.elbo_terms(x, mu, logvar, model.dec, likelihood="bernoulli", generator=None)
        i = fastvae.iwae_terms(x, mu, logvar, model.dec, k=3, likelihood="bernoulli")
        return e.bound, e.elbo, i.bound

    compiled = torch.compile(bounds, fullgraph=True)
    torch.manual_seed(1)
    e_bound, e_alias, i_bound = compiled(x)
    assert torch.equal(e_bound, e_alias) and torch.isfinite(i_bound)
    torch.manual_seed(1)
    with pytest.warns(DeprecationWarning, match=r"ELBOTerms.elbo is deprecated: use .bound"):
        eager = bounds(x)
    torch.testing.assert_close(eager[0], e_bound)
    assert fastvae.ELBOTerms._fields[0] == fastvae.IWAETerms._fields[0] == "bound"
