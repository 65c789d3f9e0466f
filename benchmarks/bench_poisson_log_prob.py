"""Benchmark of fastvae.poisson_log_prob: forward, backward, forward+backward
against eager PyTorch (torch.distributions.Poisson's formula as written,
x log rate - rate - lgamma(x + 1), summed) and torch.compile of it, x (B, D)
counts broadcast against (K, B, D) log rates, float32.

Reproduce: python -m benchmarks.bench_poisson_log_prob [--quick] [--memory]
"""
import torch

import fastvae

from . import harness
from .bench_zinb_log_prob import make_counts


def eager(x, log_rate):
    return (x * log_rate - log_rate.exp() - torch.lgamma(x + 1)).sum(-1)


def cases(B, D, ks):
    out = []
    for K in ks:
        def make(device, K=K):
            g = torch.Generator().manual_seed(0)
            x = make_counts(B, D, g).to(device)
            lr = (torch.randn(K, B, D, generator=g) + 0.5).to(device).requires_grad_()
            return (x, lr), [lr], torch.randn(K, B, generator=g).to(device)

        fwd = 4 * (B * D + K * B) + 4 * K * B * D
        bwd = 4 * (K * B + B * D) + 2 * 4 * K * B * D
        out.append(harness.Case(f"K={K}", {"B": B, "D": D, "K": K}, make,
                                {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}))
    return out


def main(argv=None) -> dict | None:
    args = harness.parse_args(harness.parser(__doc__.split("\n")[0]), argv)
    B, D, ks = (64, 500, [4]) if args.quick else (512, 2000, [1, 50])
    impls = harness.baseline_impls(eager, fastvae.poisson_log_prob, "poisson_log_prob", torch.device(args.device),
                                   args.fastvae_backends)
    return harness.run(__spec__.name, "poisson_log_prob", f"poisson_log_prob, B={B}, D={D}, float32",
                       cases(B, D, ks), impls, args)


if __name__ == "__main__":
    main()
