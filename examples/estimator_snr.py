"""Signal-to-noise ratio of the encoder gradient for the IWAE, DReG and STL
estimators as k grows (Rainforth et al. 2018; Tucker et al. 2018).

For one fixed x and a small fixed decoder, n independent gradient estimates of
d bound / d(mu, logvar) come from one call: mu and logvar are leaf tensors
with n identical rows and reduction="sum" keeps the rows' gradients apart.
SNR per coordinate = |mean| / std over the n estimates; the table shows the
mean over the 2L coordinates. Run: python examples/estimator_snr.py
"""
import argparse

import torch

import fastvae


def encoder_gradients(estimator: str, k: int, n: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    dec = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    x = torch.tensor([[0.5, -1.0, 2.0, 0.3]], dtype=torch.float64).expand(n, 4)
    mu = torch.tensor([[0.3, -0.2]], dtype=torch.float64).repeat(n, 1).requires_grad_()
    logvar = torch.tensor([[-0.5, 0.4]], dtype=torch.float64).repeat(n, 1).requires_grad_()
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        bound = fastvae.iwae(x, mu, logvar, dec, k=k, estimator=estimator, reduction="sum", likelihood="gaussian")
    return torch.cat(torch.autograd.grad(bound, [mu, logvar]), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="independent estimates per cell")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    args = p.parse_args()
    print("| k | " + " | ".join(f"SNR {e}" for e in ("iwae", "dreg", "stl")) + " |")
    print("|---|---|---|---|")
    for k in args.ks:
        snr = []
        for est in ("iwae", "dreg", "stl"):
            g = encoder_gradients(est, k, args.n)
            snr.append((g.mean(0).abs() / g.std(0)).mean().item())
        print(f"| {k} | " + " | ".join(f"{s:.2f}" for s in snr) + " |")


if __name__ == "__main__":
    main()
