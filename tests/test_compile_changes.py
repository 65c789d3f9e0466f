"""A compiled objective survives what training and evaluation loops change
between calls: k, the batch, the data's size and shape, the dtype,
n_samples, a decoder that folds the samples into the batch, and
torch._dynamo.mark_dynamic on the batch. Each second call recompiles or runs
with dynamic shapes, and gives eager's bound and gradients.

One compiled function serves both calls, as a training script that compiles
its loss once and a probe that compiles one loss for two models do. The
matrix runs Dynamo and AOT autograd (backend="aot_eager": the tracing that
broke, without Inductor's code generation, which test_compile.py covers);
in the main process on the cpp backend (its C++ operators in the graph), and
under the Triton interpreter on the triton backend (the plans' graph ops,
fastvae/_plan_ops.py), where every case's kernels run as programs of Python:
there a smaller matrix."""
import itertools

import pytest
import torch
from torch import nn

import fastvae
from fastvae import objectives

from conftest import INTERPRET


class Encoder(nn.Module):
    def __init__(self, d: int, latent: int):
        super().__init__()
        self.f = nn.Linear(d, 2 * latent)

    def forward(self, x):
        return self.f(x.flatten(1)).chunk(2, -1)


class Decoder(nn.Module):
    """z (..., L) -> the decoder output for x (B, *event); ``folded``: it runs
    on z.reshape(-1, L) and returns (S·B, *event) rows (a conv decoder's habit)."""

    def __init__(self, latent: int, event: tuple, likelihood: str, folded: bool = False):
        super().__init__()
        self.event, self.likelihood, self.folded = event, likelihood, folded
        size = 1
        for e in event:
            size *= e
        self.f = nn.Linear(latent, size * (2 if likelihood == "gaussian" else 1))

    def forward(self, z):
        h = self.f(z.reshape(-1, z.shape[-1]) if self.folded else z)
        shape = (-1, *self.event) if self.folded else (*z.shape[:-1], *self.event)
        if self.likelihood == "gaussian":
            mean, logvar = h.chunk(2, -1)
            return mean.reshape(shape), logvar.reshape(shape)
        if self.likelihood == "poisson":
            h = h.clamp(-5.0, 5.0)
        return h.reshape(shape)


def _data(batch: int, event: tuple, likelihood: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.rand(batch, *event, generator=torch.Generator().manual_seed(batch), dtype=dtype)
    if likelihood == "bernoulli":
        return (x > 0.5).to(dtype)
    if likelihood == "poisson":
        return (5 * x).floor()
    return x


def _objective(name: str, likelihood: str, x, encoder, decoder, k: int, n: int):
    mu, logvar = encoder(x)
    if name == "elbo":
        return fastvae.elbo(x, mu, logvar, decoder, likelihood=likelihood, n_samples=n)
    if name == "elbo_terms":
        terms = fastvae.elbo_terms(x, mu, logvar, decoder, likelihood=likelihood, n_samples=n)
        return terms.bound + 0.1 * terms.kl.sum()
    if name == "iwae_terms":
        terms = fastvae.iwae_terms(x, mu, logvar, decoder, k=k, likelihood=likelihood)
        return terms.bound + 0.1 * terms.kl.sum()
    if name == "elbo tensor beta":  # the general path under compile
        return fastvae.elbo(x, mu, logvar, decoder, likelihood=likelihood, n_samples=n,
                            beta=torch.tensor(0.5, dtype=x.dtype))
    if name == "renyi":
        return fastvae.iwae(x, mu, logvar, decoder, k=k, likelihood=likelihood, alpha=0.5)
    if name == "iwae torch prior":
        prior = torch.distributions.Normal(torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype))
        return fastvae.iwae(x, mu, logvar, decoder, k=k, likelihood=likelihood, prior=prior)
    return fastvae.iwae(x, mu, logvar, decoder, k=k, likelihood=likelihood, estimator=name.split()[1])


# name: the two calls' (batch, event, L, k, n_samples, dtype, folded decoder)
F32, F64 = torch.float32, torch.float64
CHANGES = {
    "k": [(4, (12,), 3, 5, 1, F32, False), (4, (12,), 3, 8, 1, F32, False)],
    "batch": [(4, (12,), 3, 5, 1, F32, False), (6, (12,), 3, 5, 1, F32, False)],
    "D": [(4, (12,), 3, 5, 1, F32, False), (4, (20,), 3, 5, 1, F32, False)],
    "latent size": [(4, (12,), 3, 5, 1, F32, False), (4, (12,), 5, 5, 1, F32, False)],
    "image shape": [(4, (2, 3, 4), 3, 5, 1, F32, False), (4, (3, 4, 4), 3, 5, 1, F32, False)],
    "flat to image": [(4, (12,), 3, 5, 1, F32, False), (4, (3, 2, 2), 3, 5, 1, F32, False)],
    "dtype": [(4, (12,), 3, 5, 1, F32, False), (4, (12,), 3, 5, 1, F64, False)],
    "n_samples": [(4, (12,), 3, 5, 1, F32, False), (4, (12,), 3, 5, 3, F32, False)],
    "folded decoder": [(4, (2, 3, 2), 3, 5, 2, F32, False), (4, (2, 3, 2), 3, 5, 2, F32, True)],
    "all at once": [(4, (12,), 3, 50, 1, F32, False), (6, (3, 2, 2), 5, 8, 3, F32, True)],
}
PLANNED = ("elbo", "elbo_terms", "iwae iwae", "iwae dreg", "iwae stl", "iwae_terms")
GENERAL = ("elbo tensor beta", "renyi", "iwae torch prior")


INTERPRETED = [("elbo", "bernoulli", "k", False), ("iwae dreg", "bernoulli", "k", False),
               ("iwae_terms", "bernoulli", "k", False), ("elbo", "bernoulli", "batch", False),
               ("iwae iwae", "bernoulli", "batch", True)]


def _cases():
    """Every change for the ELBO and DReG, the counts' changes for the other
    estimators and the terms, the general path's objectives, the other
    likelihoods' shape changes, and mark_dynamic: what can break where (the
    heads take the counts, the tails the shapes), in a few minutes on 2 cores."""
    counts = ("k", "n_samples", "all at once")
    # the plans' graph ops (triton backend): every objective they serve after a new k; the shapes for two
    planned = ([(o, "bernoulli", "k", False) for o in PLANNED]
               + [(o, "bernoulli", c, False) for o, c in itertools.product(("elbo", "iwae dreg"), ("batch", "dtype"))]
               + [(o, "bernoulli", "batch", True) for o in ("elbo", "iwae iwae")])
    if INTERPRET:  # a compile each, slow under the interpreter: the counts, a batch, mark_dynamic (on a GPU, all)
        return [(*case, "cpu") for case in planned if case in INTERPRETED]
    cuda = [(*case, "cuda") for case in planned] if torch.cuda.is_available() else []
    cpp = ([(o, "bernoulli", c, False) for o, c in itertools.product(("elbo", "iwae dreg"), CHANGES)]
           + [(o, "bernoulli", c, False) for o, c in itertools.product(PLANNED[1:], counts) if o != "iwae dreg"]
           + [(o, "bernoulli", c, False) for o, c in itertools.product(GENERAL, ("k", "all at once"))]
           + [(o, lik, c, False) for o, lik, c in itertools.product(("elbo", "iwae dreg"), ("gaussian", "poisson"),
                                                                     ("batch", "image shape", "all at once"))]
           + [(o, "bernoulli", "batch", True) for o in ("elbo", "iwae iwae", "iwae dreg")])
    return cuda + [(*case, "cpu") for case in cpp]


@pytest.mark.parametrize("objective,likelihood,change,mark_dynamic,device", _cases(),
                         ids=lambda v: v if isinstance(v, str) else ("mark_dynamic" if v is True else None))
def test_a_compiled_objective_survives_a_change_between_calls(objective, likelihood, change, mark_dynamic, device):
    if "dreg" in objective and not objectives.DREG_COMPILES:
        pytest.skip("estimator='dreg' compiles from torch 2.13 on")
    fastvae.set_backend("triton" if INTERPRET else None)
    torch._dynamo.reset()

    def loss(x, encoder, decoder, k, n):
        return _objective(objective, likelihood, x, encoder, decoder, k, n)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for batch, event, latent, k, n, dtype, folded in CHANGES[change]:
        size = 1
        for e in event:
            size *= e
        torch.manual_seed(0)
        encoder = Encoder(size, latent).to(device, dtype)
        decoder = Decoder(latent, event, likelihood, folded).to(device, dtype)
        x = _data(batch, event, likelihood, dtype).to(device)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 0)
        params = [*encoder.parameters(), *decoder.parameters()]
        torch.manual_seed(1)
        got = compiled(x, encoder, decoder, k, n)
        got_grads = torch.autograd.grad(got, params)
        torch.manual_seed(1)
        want = loss(x, encoder, decoder, k, n)
        want_grads = torch.autograd.grad(want, params)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_grads, want_grads):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
