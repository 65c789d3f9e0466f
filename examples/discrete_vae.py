"""A discrete VAE on digits: L categorical latents of C categories each,
trained with the straight-through Gumbel-softmax estimator (Jang et al. 2017;
the Concrete distribution of Maddison et al. 2017) by fastvae.elbo with a
``fastvae.Concrete(logits, temperature, hard=True)`` posterior and a uniform
``OneHotCategorical`` prior (the analytic categorical KL), against the same
model trained with the hand-written torch.distributions loss
(``RelaxedOneHotCategorical.rsample``, the straight-through one-hot by hand,
``Bernoulli.log_prob``, ``kl_divergence`` of the categoricals): same
initialization, same batches, same number of steps, the two trained in turn
one step each (alternating which goes first), every step timed.

The data: scikit-learn's 8x8 digits (fastvae.demo.load_digits: pixels / 16 in
[0, 1], its 297 held-out digits) binarized, a pixel above 8 of 16 being 1, so
the Bernoulli likelihood is a normalized pmf and log p(x) is in nats per
*binary* 8x8 image (not comparable with the demo's grey-digit figures, whose
Bernoulli "likelihood" of grey targets is not normalized).

What is estimated. The straight-through decoder only ever sees one-hot z, so
the model trained is the discrete one: p(x) = sum_z p(z) p(x|z) over the C^L
one-hot configurations, p(z) uniform. Held-out log p(x) is estimated by
importance sampling with q(z|x) = prod_l Categorical(softmax(logits_l)) as
the proposal: the hard sample is the argmax of logits + Gumbel noise, which is
distributed exactly as that categorical whatever the temperature (the
Gumbel-max trick), so

    log w = log p(x|z) + sum_l [log p(c_l) - log softmax(logits_l)(c_l)],

c_l the hot category of latent l: the ratio of two pmfs, not the Concrete
density, which the one-hot z does not have (the temperature shapes only the
training gradient). fastvae.log_likelihood computes these weights for a
hard=True Concrete posterior with a OneHotCategorical prior (K streamed in
chunks, memory bounded); the hand-written estimate draws the relaxed sample
with torch (RelaxedOneHotCategorical.sample), takes its argmax, and scores it
with OneHotCategorical.log_prob. Each reports, per held-out digit, log (1/K)
sum_k w_k (a stochastic lower bound whose expectation rises to log p(x) with
K), averaged over the digits (± the standard error across digits); the
evaluations of one model differ by the Monte Carlo error alone (their
delta-method standard error, sqrt(sum of the per-digit ones) / N). A few
digits get a Pareto k̂ above 0.7 (fastvae warns, the table counts them): the
categorical q(z|x) puts little mass where their posterior has some, so those
estimates may sit further below log p(x) than the standard error says, in
both evaluations alike. The two trained models differ by training noise (their
own random draws): which scores higher changes with --seed.

Run: python examples/discrete_vae.py [--epochs 200] [--latents 8] [--categories 8] [--k 5000]
     [--seed 0] [--temperature 0.5]   (about a minute on 2 cores)
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.distributions import (
    Bernoulli,
    Categorical,
    Independent,
    OneHotCategorical,
    RelaxedOneHotCategorical,
    kl_divergence,
)

import fastvae
from fastvae.demo import load_digits


class DiscreteVAE(nn.Module):
    """64 -> hidden -> L x C logits; one-hot z (L, C) -> hidden -> 64 Bernoulli logits."""

    def __init__(self, latents: int, categories: int, hidden: int = 256):
        super().__init__()
        self.latents, self.categories = latents, categories
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, latents * categories))
        self.decoder = nn.Sequential(nn.Flatten(-2), nn.Linear(latents * categories, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 64))

    def encode(self, x):  # logits (B, L, C)
        return self.encoder(x).unflatten(-1, (self.latents, self.categories))

    def decode(self, z):  # z (..., L, C) -> pixel logits (..., 64)
        return self.decoder(z)


def uniform_prior(categories: int) -> OneHotCategorical:
    return OneHotCategorical(logits=torch.zeros(categories))


def fastvae_loss(model: DiscreteVAE, x, temperature: float):
    """Negative ELBO: straight-through Concrete samples, the analytic categorical KL."""
    q = fastvae.Concrete(model.encode(x), temperature, hard=True)
    return -fastvae.elbo(x, q, model.decode, likelihood="bernoulli", prior=uniform_prior(model.categories))


def hand_written_loss(model: DiscreteVAE, x, temperature: float):
    """The same negative ELBO written with torch.distributions."""
    logits = model.encode(x)
    y = RelaxedOneHotCategorical(torch.tensor(temperature), logits=logits).rsample()
    hard = F.one_hot(y.argmax(-1), model.categories).to(y.dtype)
    z = hard + (y - y.detach())  # straight-through: one-hot forward, the relaxed gradient backward
    rec = Independent(Bernoulli(logits=model.decode(z)), 1).log_prob(x)
    kl = kl_divergence(Categorical(logits=logits), Categorical(logits=torch.zeros_like(logits))).sum(-1)
    return -(rec - kl).mean()


def fastvae_log_px(model: DiscreteVAE, x, k: int, temperature: float, seed: int):
    """fastvae.log_likelihood's LogLikelihoodStats (per digit) with the categorical weights."""
    return fastvae.log_likelihood(
        x, lambda xb: fastvae.Concrete(model.encode(xb), temperature, hard=True), model.decode, k=k,
        likelihood="bernoulli", prior=uniform_prior(model.categories), return_stats=True,
        generator=torch.Generator().manual_seed(seed))


def hand_written_log_px(model: DiscreteVAE, x, k: int, temperature: float, chunk: int = 250):
    """(log p̂(x), its delta-method standard error) per digit by plain-PyTorch
    importance sampling: z the one-hot of a relaxed sample's argmax (so
    z ~ Categorical(softmax(logits))), weights from OneHotCategorical's pmfs."""
    logits = model.encode(x)
    relaxed = RelaxedOneHotCategorical(torch.tensor(temperature), logits=logits)
    q, p = OneHotCategorical(logits=logits), OneHotCategorical(logits=torch.zeros_like(logits))
    lws = []
    for start in range(0, k, chunk):
        y = relaxed.sample((min(chunk, k - start),))
        z = F.one_hot(y.argmax(-1), model.categories).to(y.dtype)
        rec = Independent(Bernoulli(logits=model.decode(z)), 1).log_prob(x)
        lws.append(rec + p.log_prob(z).sum(-1) - q.log_prob(z).sum(-1))
    lw = torch.cat(lws)  # (K, N)
    w = torch.exp(lw - lw.max(0).values)
    stderr = w.std(0) / (w.mean(0) * math.sqrt(k))
    return torch.logsumexp(lw, 0) - math.log(k), stderr


def train_interleaved(models: dict, losses: dict, x, *, epochs: int, temperature: float, batch: int = 100,
                      lr: float = 1e-3, seed: int = 0) -> dict[str, list[float]]:
    """Adam, the models' steps in turn on the same batch (the first alternates);
    the seconds of every step (forward, backward, optimizer) per model."""
    opts = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    g = torch.Generator().manual_seed(seed)
    names, step = list(models), 0
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            xb = x[idx]
            for name in names if step % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                loss = losses[name](models[name], xb, temperature)
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
                times[name].append(time.perf_counter() - start)
            step += 1
    return times


def main(epochs: int = 200, latents: int = 8, categories: int = 8, k: int = 5000, seed: int = 0,
         temperature: float = 0.5) -> dict:
    train_x, test_x = ((t > 0.5).float() for t in load_digits("cpu", seed=seed))  # a pixel > 8 of 16: 1
    torch.manual_seed(seed)
    base = DiscreteVAE(latents, categories)
    models = {"fastvae": base, "hand-written": copy.deepcopy(base)}  # the same initialization
    losses = {"fastvae": fastvae_loss, "hand-written": hand_written_loss}
    times = train_interleaved(models, losses, train_x, epochs=epochs, temperature=temperature, seed=seed)
    results = {}
    for name, model in models.items():
        with torch.no_grad():
            stats = fastvae_log_px(model, test_x, k, temperature, seed + 1)
            torch.manual_seed(seed + 2)
            plain, plain_se = hand_written_log_px(model, test_x, k, temperature)
        n = len(test_x)
        ll = stats.log_likelihood.double()
        mc = math.sqrt((stats.stderr.double() ** 2).sum().item()) / n
        mc_plain = math.sqrt((plain_se.double() ** 2).sum().item()) / n
        results[name] = dict(
            log_px=ll.mean().item(), stderr=(ll.std() / math.sqrt(n)).item(), mc_stderr=mc,
            log_px_plain=plain.double().mean().item(), stderr_plain=(plain.double().std() / math.sqrt(n)).item(),
            mc_stderr_plain=mc_plain, ess_fraction=stats.ess.double().mean().item() / k,
            pareto_high=int((stats.pareto_k > 0.7).sum()),
            step_ms=1e3 * statistics.median(times[name]), step_ms_mean=1e3 * statistics.fmean(times[name]),
            steps=len(times[name]),
            per_digit=ll)
    print(f"held-out log p(x), nats per binarized 8x8 digit ({len(test_x)} digits), K={k}; {latents} latents x "
          f"{categories} categories, straight-through at temperature {temperature}, {epochs} epochs")
    print("| model trained by | log p(x), fastvae.log_likelihood | log p(x), hand-written IS | "
          "difference (MC s.e.) | ESS/K | Pareto k̂ > 0.7 | step: median (mean) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        diff = r["log_px"] - r["log_px_plain"]
        se = math.hypot(r["mc_stderr"], r["mc_stderr_plain"])
        print(f"| {name} | {r['log_px']:.3f} ± {r['stderr']:.3f} | {r['log_px_plain']:.3f} ± "
              f"{r['stderr_plain']:.3f} | {diff:+.4f} ({se:.4f}) | {r['ess_fraction']:.2f} | "
              f"{r['pareto_high']} of {len(test_x)} | {r['step_ms']:.2f} ms ({r['step_ms_mean']:.2f} ms) |")
    a, b = results["fastvae"], results["hand-written"]
    paired = a["per_digit"] - b["per_digit"]
    print(f"fastvae-trained minus hand-written-trained (fastvae.log_likelihood, paired over digits): "
          f"{paired.mean().item():+.3f} ± {(paired.std() / math.sqrt(len(paired))).item():.3f} nats")
    print(f"median training step, hand-written / fastvae: {b['step_ms'] / a['step_ms']:.2f} ({a['steps']} steps "
          f"each, interleaved; forward, backward and Adam step)")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--latents", type=int, default=8, help="L categorical latents")
    p.add_argument("--categories", type=int, default=8, help="C categories per latent")
    p.add_argument("--k", type=int, default=5000, help="importance samples per held-out digit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.5, help="of the relaxed sample (gradient only)")
    a = p.parse_args()
    main(a.epochs, a.latents, a.categories, a.k, a.seed, a.temperature)
