"""Benchmark of fastvae.kl_normal (analytic KL between diagonal Gaussians).

For mu, logvar of shape (B, L) (float32) the op returns
kl = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar, -1) of shape (B,), against the
standard normal prior. Two sizes: a small one, (100, 8), where the per-call
cost of the op layer is most of the time (issue 11's target: within 1.25x of
the eager formula, forward+backward), and a large one, (65536, 32).

Implementations (eager formula, torch.compile of it, fastvae on the device's
backend), modes, bandwidth and memory as in bench_sample_normal (harness.py).

Reproduce: python -m benchmarks.bench_kl_normal [--quick]
"""
from __future__ import annotations

import torch

import fastvae

from . import harness

OP = "kl_normal"
DTYPE = torch.float32


def eager_kl_normal(mu: torch.Tensor, logvar: torch.Tensor):
    return 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1 - logvar, -1)


def min_bytes(B: int, L: int, itemsize: int = 4) -> dict[str, int]:
    fwd = (2 * B * L + B) * itemsize  # mu, logvar -> kl
    bwd = (B + 2 * B * L + 2 * B * L) * itemsize  # dkl, mu, logvar -> dmu, dlogvar
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(B: int, L: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, L, generator=g, dtype=DTYPE).to(device).requires_grad_()
    logvar = (torch.randn(B, L, generator=g, dtype=DTYPE) - 1.0).to(device).requires_grad_()
    gk = torch.randn(B, generator=g, dtype=DTYPE).to(device)
    return (mu, logvar), [mu, logvar], (gk,)


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    args = harness.parse_args(p, argv)
    sizes = [(100, 8), (4096, 32)] if args.quick else [(100, 8), (65536, 32)]
    cases = [harness.Case(f"B={B},L={L}", {"B": B, "L": L}, lambda device, B=B, L=L: make_inputs(B, L, device),
                          min_bytes(B, L), repeats=200 if B * L < 10_000 else 20) for B, L in sizes]
    impls = harness.baseline_impls(eager_kl_normal, fastvae.kl_normal, OP, torch.device(args.device),
                                   args.fastvae_backends)
    return harness.run(__spec__.name, OP, "kl_normal, float32", cases, impls, args)


if __name__ == "__main__":
    main()
