"""Benchmark of fastvae.sample_positive (a positive latent's reparameterized
sampling with log q(z), issue 35), one case per family.

What is measured
----------------
For log parameters of shape (B, L) (float32, default B=65536, L=32) and K
samples (default 1), the op returns z of shape (K, B, L) (exponential,
Weibull, Kumaraswamy by the inverse CDF of one Philox uniform per element) and
log q(z) summed over L, shape (K, B).

Implementations, side by side in one run:
  eager            torch.distributions as users write it: q = Exponential(exp(log_rate)),
                   Weibull(exp(log_scale), exp(log_concentration)) or
                   Kumaraswamy(exp(log_a), exp(log_b)); z = q.rsample((K,)),
                   q.log_prob(z).sum(-1);
  compiled         torch.compile of that same function;
  fastvae[<name>]  fastvae.sample_positive on the backend <name>.

Modes, medians, effective bandwidth and memory as in bench_sample_normal
(harness.py): forward reads the two log parameters and writes z, log q;
backward reads dz, dlog_q and the parameters and writes their gradients; the
noise is never stored.

Reproduce (from the repository root):
  python -m benchmarks.bench_sample_positive            # full run
  python -m benchmarks.bench_sample_positive --quick    # tiny smoke run
Results go to benchmarks/results/sample_positive-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import torch
import torch.distributions as td

import fastvae
from fastvae.sample_positive import FAMILIES

from . import harness

OP = "sample_positive"
DTYPE = torch.float32


def torch_distribution(family: str, p0: torch.Tensor, p1: torch.Tensor) -> td.Distribution:
    if family == "exponential":
        return td.Exponential(torch.exp(p0))
    if family == "weibull":
        return td.Weibull(torch.exp(p0), torch.exp(p1))
    return td.Kumaraswamy(torch.exp(p0), torch.exp(p1))


def eager_sample_positive(family: str, p0: torch.Tensor, p1: torch.Tensor, n_samples: int):
    """The baseline: torch.distributions' rsample and log_prob."""
    q = torch_distribution(family, p0, p1)
    z = q.rsample((n_samples,))
    return z, q.log_prob(z).sum(-1)


def fastvae_sample_positive(family: str, p0: torch.Tensor, p1: torch.Tensor, n_samples: int):
    if family == "exponential":
        return fastvae.sample_positive(family, p0, None, n_samples)
    return fastvae.sample_positive(family, p0, p1, n_samples)


def min_bytes(B: int, L: int, K: int, itemsize: int = 4) -> dict[str, int]:
    fwd = (2 * B * L + K * B * L + K * B) * itemsize  # log parameters -> z, log q
    bwd = (K * B * L + K * B + 2 * B * L + 2 * B * L) * itemsize  # dz, dlog_q, parameters -> their gradients
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(family: str, B: int, L: int, K: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    p0 = (torch.randn(B, L, generator=g, dtype=DTYPE) * 0.3).to(device).requires_grad_()
    p1 = (torch.randn(B, L, generator=g, dtype=DTYPE) * 0.3).to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g, dtype=DTYPE).to(device)
    gq = torch.randn(K, B, generator=g, dtype=DTYPE).to(device)
    grads = [p0] if family == "exponential" else [p0, p1]
    return (family, p0, p1, K), grads, (gz, gq)


def cases(B: int, L: int, K: int, families) -> list[harness.Case]:
    return [harness.Case(f"{f} K={K}", {"family": f, "B": B, "L": L, "K": K},
                         lambda device, f=f: make_inputs(f, B, L, K, device), min_bytes(B, L, K), repeats=15)
            for f in families]


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("-B", type=int, default=None, help="batch size (default 65536, 4096 with --quick)")
    p.add_argument("-L", type=int, default=32, help="latent size (default 32)")
    p.add_argument("-K", type=int, default=1, help="samples (default 1)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    args = harness.parse_args(p, argv)
    B = args.B or (4096 if args.quick else 65536)
    impls = harness.baseline_impls(eager_sample_positive, fastvae_sample_positive, OP,
                                   torch.device(args.device), args.fastvae_backends)
    return harness.run(__spec__.name, OP, f"sample_positive, B={B}, L={args.L}, K={args.K}, float32",
                       cases(B, args.L, args.K, args.families), impls, args)


if __name__ == "__main__":
    main()
