"""Benchmark of one VAE training step: fastvae.elbo and fastvae.iwae against the
loss written by hand, eager and under torch.compile.

What is measured
----------------
The MLP VAE of PyTorch's examples (784-400-20-400-784, ReLU, float32; the
decoder returns Bernoulli logits), on a batch of 256 binarized 784-pixel images
(random: speed does not depend on the values). Bernoulli because that is the
likelihood this architecture is used with (binarized MNIST, the IWAE paper's
benchmark) and the one users copy from the examples.

Cases: "elbo" (one sample per example) and "iwae k=50" (50 importance samples:
the decoder runs on 50 x 256 latents). Implementations, side by side in one run:
  eager                 the loss as users write it: torch.randn_like noise,
                        binary_cross_entropy_with_logits against x expanded over
                        the k samples, the Gaussian log-densities written out
                        (not torch.distributions, whose argument validation would
                        only slow the baseline), torch.logsumexp;
  compiled              torch.compile of that same loss (dynamic=False);
  fastvae[<b>]          -fastvae.elbo / -fastvae.iwae(k=50) on backend <b>;
  fastvae[<b>]+compile  torch.compile(fullgraph=True) of the fastvae loss; if
                        fullgraph tracing fails, it is compiled with graph breaks
                        and the payload's "fastvae_compile" says why.
The encoder and decoder are the same module with the same weights everywhere.

Modes (as in every fastvae benchmark): forward = the loss with the autograd graph
built; backward = the gradients of all parameters (torch.autograd.grad, which
is loss.backward() without accumulating into .grad); fwd+bwd = one training
step without the optimizer. The optimizer update is the same for every
implementation (same parameters), so it is left out rather than added to every
figure alike. Memory: "activations MB" is what the forward keeps for the
backward beyond the parameters and x (the noise and x's k copies show up here),
"peak MB" (--memory) the peak of one step; common.py says how both are measured.
There is no bandwidth figure: the step is bound by its matrix products.

Reproduce (from the repository root):
  python -m benchmarks.bench_train_step [--quick] [--memory]
Results go to benchmarks/results/train_step-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import fastvae
from fastvae.reference import LOG_2PI

from . import harness

OP = "train_step"


class MLPVAE(nn.Module):
    """pytorch/examples' VAE, with a logits output (the sigmoid goes into the likelihood)."""

    def __init__(self, d: int = 784, hidden: int = 400, latent: int = 20):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, hidden), nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, d)

    def encode(self, x):
        h = F.relu(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def decode(self, z):  # z (B, L) or (k, B, L)
        return self.fc4(F.relu(self.fc3(z)))


# -- the losses (minimized: the negative bound, averaged over the batch) --------


def handwritten_elbo(model: MLPVAE, x: torch.Tensor, k: int) -> torch.Tensor:
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn_like(std)
    logits = model.decode(z)
    reconstruction = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), -1)
    return -(reconstruction - kl).mean()


def handwritten_iwae(model: MLPVAE, x: torch.Tensor, k: int) -> torch.Tensor:
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device)  # (k, B, L)
    logits = model.decode(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
    log_qz = -0.5 * (((z - mu) / std).pow(2) + logvar + LOG_2PI).sum(-1)
    log_w = log_px + log_pz - log_qz
    return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()


def fastvae_elbo(model: MLPVAE, x: torch.Tensor, k: int) -> torch.Tensor:
    mu, logvar = model.encode(x)
    return -fastvae.elbo(x, mu, logvar, model.decode, likelihood="bernoulli")


def fastvae_iwae(model: MLPVAE, x: torch.Tensor, k: int) -> torch.Tensor:
    mu, logvar = model.encode(x)
    return -fastvae.iwae(x, mu, logvar, model.decode, k=k, likelihood="bernoulli")


LOSSES = {"elbo": (handwritten_elbo, fastvae_elbo), "iwae": (handwritten_iwae, fastvae_iwae)}


def compile_fullgraph(fn, notes: dict, key: str):
    """torch.compile(fn, fullgraph=True), falling back to a compile with graph
    breaks if tracing fails; notes[key] records which one ran and why."""
    compiled = {"fullgraph": torch.compile(fn, fullgraph=True, dynamic=False)}

    def call(*args):
        if key not in notes:  # the first call traces
            try:
                out = compiled["fullgraph"](*args)
                notes[key] = {"fullgraph": True}
                return out
            except Exception as e:  # noqa: BLE001 - any tracing failure is the finding
                notes[key] = {"fullgraph": False, "error": f"{type(e).__name__}: {e}"[:2000]}
                compiled["fullgraph"] = torch.compile(fn, dynamic=False)
        return compiled["fullgraph"](*args)

    return call


def make_impls(model: MLPVAE, backends: list[str], notes: dict) -> list[harness.Impl]:
    """Every implementation takes (objective, x, k), objective a key of LOSSES."""
    hand = {o: torch.compile(lambda x, k, f=f: f(model, x, k), dynamic=False) for o, (f, _) in LOSSES.items()}
    impls = [harness.Impl("eager", lambda o, x, k: LOSSES[o][0](model, x, k)),
             harness.Impl("compiled", lambda o, x, k: hand[o](x, k))]
    if not (hasattr(fastvae, "elbo") and hasattr(fastvae, "iwae")):
        notes["missing"] = "fastvae.elbo / fastvae.iwae not in this fastvae: only the baselines were timed"
        return impls
    for b in backends:
        full = {o: compile_fullgraph(lambda x, k, f=f: f(model, x, k), notes, f"{o} [{b}]")
                for o, (_, f) in LOSSES.items()}
        impls += [harness.Impl(f"fastvae[{b}]", lambda o, x, k: LOSSES[o][1](model, x, k), b),
                  harness.Impl(f"fastvae[{b}]+compile", lambda o, x, k, full=full: full[o](x, k), b)]
    return impls


def cases(model: MLPVAE, batch: int, k: int) -> list[harness.Case]:
    def make(objective, k):
        def inputs(device):
            g = torch.Generator().manual_seed(0)
            x = (torch.rand(batch, 784, generator=g) > 0.5).float().to(device)
            return (objective, x, k), list(model.parameters()), torch.ones((), device=device)
        return inputs

    return [harness.Case("elbo", {"objective": "elbo", "batch": batch, "k": 1}, make("elbo", 1)),
            harness.Case(f"iwae k={k}", {"objective": "iwae", "batch": batch, "k": k}, make("iwae", k))]


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None, help="batch size (default 256, 32 with --quick)")
    p.add_argument("-k", type=int, default=None, help="IWAE samples (default 50, 5 with --quick)")
    args = harness.parse_args(p, argv)
    batch, k = args.batch or (32 if args.quick else 256), args.k or (5 if args.quick else 50)
    device = torch.device(args.device)
    backends = args.fastvae_backends or [harness.default_fastvae_backend(device, "sample_normal")]
    torch.manual_seed(0)
    model = MLPVAE().to(device)
    notes: dict = {}
    title = f"one training step, MLP VAE 784-400-20-400-784, Bernoulli, batch {batch}, float32"
    return harness.run(__spec__.name, OP, title, cases(model, batch, k), make_impls(model, backends, notes), args,
                       {"fastvae_compile": notes})


if __name__ == "__main__":
    main()
