"""Benchmark of fastvae.latent_log_ratio (log N(z; 0, I) - log N(z; mu, e^logvar)).

For z of shape (K, B, L) and mu, logvar of shape (B, L) (float32, B=65536,
L=32, K=1 and 16) the op returns 0.5 * sum(eps^2 - z^2 + logvar, -1) with
eps = (z - mu) exp(-logvar / 2), shape (K, B), reading mu and logvar once per
sample instead of broadcasting them in memory.

Implementations (eager formula, torch.compile of it, fastvae on the device's
backend), modes, bandwidth and memory as in bench_sample_normal (harness.py).

Reproduce: python -m benchmarks.bench_latent_log_ratio [--quick]
"""
from __future__ import annotations

import torch

import fastvae

from . import harness

OP = "latent_log_ratio"
DTYPE = torch.float32


def eager_latent_log_ratio(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    eps = (z - mu) * torch.exp(-0.5 * logvar)
    return 0.5 * torch.sum(eps * eps - z * z + logvar, -1)


def min_bytes(B: int, L: int, K: int, itemsize: int = 4) -> dict[str, int]:
    fwd = (K * B * L + 2 * B * L + K * B) * itemsize  # z, mu, logvar -> r
    bwd = (K * B + K * B * L + 2 * B * L + K * B * L + 2 * B * L) * itemsize  # g, z, mu, logvar -> dz, dmu, dlv
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(B: int, L: int, K: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, L, generator=g, dtype=DTYPE).to(device).requires_grad_()
    logvar = (torch.randn(B, L, generator=g, dtype=DTYPE) - 1.0).to(device).requires_grad_()
    z = torch.randn(K, B, L, generator=g, dtype=DTYPE).to(device).requires_grad_()
    gr = torch.randn(K, B, generator=g, dtype=DTYPE).to(device)
    return (z, mu, logvar), [z, mu, logvar], (gr,)


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    args = harness.parse_args(p, argv)
    B = 4096 if args.quick else 65536
    ks = [1, 4] if args.quick else [1, 16]
    cases = [harness.Case(f"K={K}", {"B": B, "L": 32, "K": K}, lambda device, K=K: make_inputs(B, 32, K, device),
                          min_bytes(B, 32, K), repeats=20 if K < 8 else 10) for K in ks]
    impls = harness.baseline_impls(eager_latent_log_ratio, fastvae.latent_log_ratio, OP, torch.device(args.device),
                                   args.fastvae_backends)
    return harness.run(__spec__.name, OP, f"latent_log_ratio, B={B}, L=32, float32", cases, impls, args)


if __name__ == "__main__":
    main()
