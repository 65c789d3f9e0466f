"""Benchmark of fastvae.negative_binomial_log_prob: forward, backward,
forward+backward against eager PyTorch (scvi-tools' log_nb_positive as
written, summed over genes) and torch.compile of it, x (B, D) counts broadcast
against (K, B, D) log means with a per-gene log theta, float32.

Reproduce: python -m benchmarks.bench_negative_binomial_log_prob [--quick] [--memory]
"""
import torch

import fastvae

from . import harness
from .bench_zinb_log_prob import count_cases


def eager(x, log_mean, log_theta):
    """log_nb_positive (scvi-tools) on mu = e^log_mean, theta = e^log_theta, eps = 1e-8."""
    eps = 1e-8
    mu, theta = log_mean.exp(), log_theta.exp()
    log_theta_mu_eps = torch.log(theta + mu + eps)
    res = (theta * (torch.log(theta + eps) - log_theta_mu_eps) + x * (torch.log(mu + eps) - log_theta_mu_eps)
           + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    return res.sum(-1)


def cases(B, D, ks):
    return count_cases(B, D, ks, theta=True, zi=False)


def main(argv=None) -> dict | None:
    args = harness.parse_args(harness.parser(__doc__.split("\n")[0]), argv)
    B, D, ks = (64, 500, [4]) if args.quick else (512, 2000, [50])
    impls = harness.baseline_impls(eager, fastvae.negative_binomial_log_prob, "negative_binomial_log_prob",
                                   torch.device(args.device), args.fastvae_backends)
    return harness.run(__spec__.name, "negative_binomial_log_prob",
                       f"negative_binomial_log_prob, B={B}, D={D}, per-gene theta, float32", cases(B, D, ks), impls,
                       args)


if __name__ == "__main__":
    main()
