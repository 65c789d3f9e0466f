"""The lecture notes' richer models on digits (seed 000): a VampPrior VAE and a
full-covariance-encoder VAE, against the standard VAE, each trained with
fastvae.elbo and compared on held-out log p(x) at K = 5000 (fastvae.evaluate).

- standard: q(z|x) = N(mu, diag), p(z) = N(0, I);
- vampprior: the same encoder, p(z) = (1/U) sum_u q(z | u_u) over U learnable
  pseudo-inputs (fastvae.priors.VampPrior; its KL is the Monte Carlo one);
- full-covariance: q(z|x) = N(mu, S Sᵀ) with S lower triangular from the
  encoder (fastvae.TrilNormal), p(z) = N(0, I) (analytic KL).

Run: python examples/priors_and_posteriors.py   (about two minutes on 2 cores)
"""
from __future__ import annotations

import time

import torch
from torch import nn

import fastvae
from fastvae.demo import load_digits
from fastvae.priors import VampPrior


class Encoder(nn.Module):
    """x -> DiagonalNormal, or TrilNormal with full_covariance=True."""

    def __init__(self, latent: int, hidden: int, full_covariance: bool = False):
        super().__init__()
        self.latent, self.full = latent, full_covariance
        extra = latent * (latent - 1) // 2 if full_covariance else 0
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent + extra))
        self.register_buffer("lower", torch.tril_indices(latent, latent, -1), persistent=False)

    def forward(self, x):
        out = self.net(x)
        mu, log_diag = out[..., :self.latent], out[..., self.latent:2 * self.latent]
        if not self.full:
            return fastvae.DiagonalNormal(mu, 2 * log_diag)
        S = torch.diag_embed(torch.exp(log_diag))
        off = torch.zeros_like(S)
        off[..., self.lower[0], self.lower[1]] = out[..., 2 * self.latent:]
        return fastvae.TrilNormal(mu, S + off)


def build(kind: str, latent: int, hidden: int, n_pseudo: int, train_x):
    enc = Encoder(latent, hidden, full_covariance=kind == "full-covariance")
    dec = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, 64))
    params = [*enc.parameters(), *dec.parameters()]
    prior = None
    if kind == "vampprior":
        # pseudo-inputs start at random training digits (Tomczak & Welling 2018)
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1))[:n_pseudo]
        pseudo = nn.Parameter(train_x[pick].clone())
        params.append(pseudo)
        prior = VampPrior(enc, pseudo)
    return enc, dec, prior, params


def main(epochs: int = 150, latent: int = 8, hidden: int = 256, n_pseudo: int = 50, batch: int = 100,
         k_eval: int = 5000, seed: int = 0) -> dict[str, dict]:
    torch.manual_seed(seed)
    train_x, test_x = load_digits("cpu", seed=seed)
    results = {}
    for kind in ("standard", "vampprior", "full-covariance"):
        torch.manual_seed(seed)
        enc, dec, prior, params = build(kind, latent, hidden, n_pseudo, train_x)
        opt = torch.optim.Adam(params, lr=1e-3)
        start = time.perf_counter()
        for _ in range(epochs):
            for i in torch.randperm(len(train_x)).split(batch):
                x = train_x[i]
                loss = -fastvae.elbo(x, enc(x), dec, likelihood="bernoulli", prior=prior)
                opt.zero_grad()
                loss.backward()
                opt.step()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            result = fastvae.evaluate([test_x], enc, dec, k=k_eval, likelihood="bernoulli", prior=prior,
                                      generator=torch.Generator().manual_seed(seed), progress=False)
            elbo = fastvae.elbo(test_x, enc(test_x), dec, likelihood="bernoulli", prior=prior, n_samples=10,
                                generator=torch.Generator().manual_seed(seed)).item()
        results[kind] = {"log_px": result.log_likelihood, "stderr": result.stderr, "elbo": elbo, "train_s": seconds}
    print(f"held-out log p(x), K = {k_eval}, {len(test_x)} test digits, {epochs} epochs of ELBO training, L = {latent}")
    print("| model | log p(x) (nats) | ± stderr | held-out ELBO |\n|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['log_px']:.2f} | {r['stderr']:.2f} | {r['elbo']:.2f} |")
    return results


if __name__ == "__main__":
    main()
