"""Benchmark of fastvae.sample_location_scale (a location-scale latent's
reparameterized sampling with log q(z), issue 35), one case per family.

What is measured
----------------
For loc, log_scale of shape (B, L) (float32, default B=65536, L=32) and K
samples (default 1), the op returns z = loc + exp(log_scale) * F^-1(u) of shape
(K, B, L) and log q(z) summed over L, shape (K, B).

Implementations, side by side in one run:
  eager            torch.distributions as users write it: q = Laplace(loc,
                   exp(log_scale)) (Uniform, Gumbel, Cauchy; logistic as
                   TransformedDistribution(Uniform(0, 1), [sigmoid^-1, affine])),
                   z = q.rsample((K,)), q.log_prob(z).sum(-1);
  compiled         torch.compile of that same function;
  fastvae[<name>]  fastvae.sample_location_scale on the backend <name>.

Modes, medians, effective bandwidth and memory as in bench_sample_normal
(harness.py): forward reads loc, log_scale and writes z, log q; backward reads
dz, dlog_q, loc, log_scale and writes dloc, dlog_scale; the noise is never stored.

Reproduce (from the repository root):
  python -m benchmarks.bench_sample_location_scale            # full run
  python -m benchmarks.bench_sample_location_scale --quick    # tiny smoke run
Results go to benchmarks/results/sample_location_scale-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import torch
import torch.distributions as td
from torch.distributions.transforms import AffineTransform, SigmoidTransform

import fastvae
from fastvae.sample_location_scale import FAMILIES

from . import harness

OP = "sample_location_scale"
DTYPE = torch.float32


def torch_distribution(family: str, loc: torch.Tensor, scale: torch.Tensor) -> td.Distribution:
    if family == "uniform":
        return td.Uniform(loc, loc + scale)
    if family == "logistic":  # torch has no Logistic class: its usual construction
        return td.TransformedDistribution(td.Uniform(torch.zeros_like(loc), torch.ones_like(loc)),
                                          [SigmoidTransform().inv, AffineTransform(loc, scale)])
    return {"laplace": td.Laplace, "gumbel": td.Gumbel, "cauchy": td.Cauchy}[family](loc, scale)


def eager_sample_location_scale(family: str, loc: torch.Tensor, log_scale: torch.Tensor, n_samples: int):
    """The baseline: torch.distributions' rsample and log_prob."""
    q = torch_distribution(family, loc, torch.exp(log_scale))
    z = q.rsample((n_samples,))
    return z, q.log_prob(z).sum(-1)


def fastvae_sample_location_scale(family: str, loc: torch.Tensor, log_scale: torch.Tensor, n_samples: int):
    return fastvae.sample_location_scale(family, loc, log_scale, n_samples)


def min_bytes(B: int, L: int, K: int, itemsize: int = 4) -> dict[str, int]:
    fwd = (2 * B * L + K * B * L + K * B) * itemsize  # loc, log_scale -> z, log q
    bwd = (K * B * L + K * B + 2 * B * L + 2 * B * L) * itemsize  # dz, dlog_q, loc, log_scale -> dloc, dlog_scale
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(family: str, B: int, L: int, K: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    loc = torch.randn(B, L, generator=g, dtype=DTYPE).to(device).requires_grad_()
    log_scale = (torch.randn(B, L, generator=g, dtype=DTYPE) * 0.3 - 0.5).to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g, dtype=DTYPE).to(device)
    gq = torch.randn(K, B, generator=g, dtype=DTYPE).to(device)
    return (family, loc, log_scale, K), [loc, log_scale], (gz, gq)


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
    impls = harness.baseline_impls(eager_sample_location_scale, fastvae_sample_location_scale, OP,
                                   torch.device(args.device), args.fastvae_backends)
    return harness.run(__spec__.name, OP, f"sample_location_scale, B={B}, L={args.L}, K={args.K}, float32",
                       cases(B, args.L, args.K, args.families), impls, args)


if __name__ == "__main__":
    main()
