"""Benchmark of fastvae.continuous_bernoulli_log_prob: forward, backward,
forward+backward against eager PyTorch and torch.compile of the same formula
(the Bernoulli term plus log C(l) = log(l / tanh(l / 2)), with the Taylor
branch near 0 written as a torch.where, as a user who wants it exact writes
it; torch.distributions.ContinuousBernoulli's own log_prob is slower still and
drifts at large |l|), x (B, D) in [0, 1] broadcast against logits (K, B, D), float32.

Reproduce: python -m benchmarks.bench_continuous_bernoulli_log_prob [--quick] [--memory]
"""
import math

import torch
import torch.nn.functional as F

import fastvae

from . import harness


def eager(x, logits):
    a = logits.abs()
    small = a < 1.0
    u = torch.where(small, logits, 0.0) ** 2
    taylor = math.log(2.0) + u * (1 / 12 + u * (-7 / 1440 + u * (31 / 90720 + u * (-127 / 4838400))))
    ab = torch.where(small, 1.0, a)
    exact = torch.log(ab) - torch.log(-torch.expm1(-ab)) + torch.log1p(torch.exp(-ab))
    bern = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    return (bern + torch.where(small, taylor, exact)).sum(-1)


def cases(B, D, ks):
    out = []
    for K in ks:
        def make(device, K=K):
            g = torch.Generator().manual_seed(0)
            x = torch.rand(B, D, generator=g).to(device)
            logits = (torch.randn(K, B, D, generator=g) * 3).to(device).requires_grad_()
            return (x, logits), [logits], torch.randn(K, B, generator=g).to(device)

        fwd = 4 * (B * D + K * B) + 4 * K * B * D
        bwd = 4 * (K * B + B * D) + 2 * 4 * K * B * D
        out.append(harness.Case(f"K={K}", {"B": B, "D": D, "K": K}, make,
                                {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}))
    return out


def main(argv=None) -> dict | None:
    args = harness.parse_args(harness.parser(__doc__.split("\n")[0]), argv)
    B, D, ks = (512, 784, [1, 4]) if args.quick else (4096, 784, [1, 8])
    impls = harness.baseline_impls(eager, fastvae.continuous_bernoulli_log_prob, "continuous_bernoulli_log_prob",
                                   torch.device(args.device), args.fastvae_backends)
    return harness.run(__spec__.name, "continuous_bernoulli_log_prob",
                       f"continuous_bernoulli_log_prob, B={B}, D={D}, float32", cases(B, D, ks), impls, args)


if __name__ == "__main__":
    main()
