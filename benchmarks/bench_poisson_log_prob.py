"""Benchmark of fastvae.poisson_log_prob: forward, backward, forward+backward
against eager PyTorch (torch.distributions.Poisson's formula as written,
x log rate - rate - lgamma(x + 1), summed) and torch.compile of it, x (B, D)
counts broadcast against (K, B, D) log rates, float32.

Reproduce: python -m benchmarks.bench_poisson_log_prob [--quick] [--memory]
"""
import torch

import fastvae

from . import harness
from .bench_zinb_log_prob import count_cases


def eager(x, log_rate):
    return (x * log_rate - log_rate.exp() - torch.lgamma(x + 1)).sum(-1)


def cases(B, D, ks):
    return count_cases(B, D, ks, theta=False, zi=False)


def main(argv=None) -> dict | None:
    args = harness.parse_args(harness.parser(__doc__.split("\n")[0]), argv)
    B, D, ks = (64, 500, [4]) if args.quick else (512, 2000, [1, 50])
    impls = harness.baseline_impls(eager, fastvae.poisson_log_prob, "poisson_log_prob", torch.device(args.device),
                                   args.fastvae_backends)
    return harness.run(__spec__.name, "poisson_log_prob", f"poisson_log_prob, B={B}, D={D}, float32",
                       cases(B, D, ks), impls, args)


if __name__ == "__main__":
    main()
