"""Benchmark of the log-normal and logistic-normal latents (fastvae.LogNormal,
fastvae.LogisticNormal: transforms of a normal drawn by the fused sample_normal):
reparameterized sampling, log q(z) and the KL to a standard prior
of the same family.

What is measured
----------------
log-normal: mu, logvar of shape (B, L) (float32, default B=65536, L=32), K
samples (default 1): z = exp(mu + exp(logvar / 2) * eps) of shape (K, B, L),
log q(z) summed over L, shape (K, B), and KL(q || LogNormal(0, 1)) summed over
L, shape (B,).

logistic-normal: L latents per example, each a LogisticNormal over C
categories (default B=4096, L=32, C=16): mu, logvar of shape (B, L, C - 1),
z = stick_breaking(mu + exp(logvar / 2) * eps) of shape (K, B, L, C) on the
simplex, log q(z) summed over the L latents, shape (K, B), and
KL(q || LogisticNormal(0, 1)) summed over L, shape (B,).

Implementations, side by side in one run:
  eager            torch.distributions as users write it: q = LogNormal(mu,
                   exp(logvar / 2)) (LogisticNormal), z = q.rsample((K,)),
                   q.log_prob(z).sum(-1), kl_divergence(q, p).sum(-1);
  compiled         torch.compile of that same function;
  fastvae[<name>]  fastvae's record (fastvae.LogNormal(mu, logvar),
                   LogisticNormal): rsample_with_log_q_and_kl against the
                   standard prior of its family (a record of zeros): the fused
                   sample_normal (z's normal, its exact log-ratio and the KL of
                   the underlying normals), then the transform and its
                   log-Jacobian in one autograd node.

Modes, medians, effective bandwidth and memory as in sample_normal's
benchmark row (python -m benchmarks.bench_op sample_normal; harness.py):
forward reads mu, logvar and writes z, log q and the KL; backward reads dz,
dlog_q, dkl, mu, logvar and writes dmu, dlogvar; the noise is never stored.

Reproduce (from the repository root):
  python -m benchmarks.bench_normal_transforms            # full run
  python -m benchmarks.bench_normal_transforms --quick    # tiny smoke run
Results go to benchmarks/results/normal_transforms-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import torch
import torch.distributions as td

import fastvae

from . import harness

OP = "sample_normal"  # the op whose backend fastvae picks (the transforms run on its kernel)
NAME = "normal_transforms"
DTYPE = torch.float32
FAMILIES = ("lognormal", "logistic_normal")


def eager_normal_transform(family: str, mu: torch.Tensor, logvar: torch.Tensor, n_samples: int):
    """The baseline: torch.distributions' rsample, log_prob and kl_divergence."""
    scale = torch.exp(0.5 * logvar)
    zeros, ones = torch.zeros_like(mu[0]), torch.ones_like(mu[0])
    if family == "lognormal":
        q, p = td.LogNormal(mu, scale), td.LogNormal(zeros, ones)
    else:
        q, p = td.LogisticNormal(mu, scale), td.LogisticNormal(zeros, ones)
    z = q.rsample((n_samples,))
    return z, q.log_prob(z).sum(-1), td.kl_divergence(q, p).sum(-1)


_PRIORS: dict = {}


def _prior(family: str, mu: torch.Tensor):
    key = (family, mu.shape[-1], mu.dtype, mu.device)
    if key not in _PRIORS:
        zeros = torch.zeros(mu.shape[-1], dtype=mu.dtype, device=mu.device)
        _PRIORS[key] = (fastvae.LogNormal if family == "lognormal" else fastvae.LogisticNormal)(zeros, zeros)
    return _PRIORS[key]


def fastvae_normal_transform(family: str, mu: torch.Tensor, logvar: torch.Tensor, n_samples: int):
    q = (fastvae.LogNormal if family == "lognormal" else fastvae.LogisticNormal)(mu, logvar)
    z, log_q, kl = q.rsample_with_log_q_and_kl(n_samples, _prior(family, mu))
    if family == "logistic_normal":  # over the L latents (the record's latent dimension is C - 1)
        log_q, kl = log_q.sum(-1), kl.sum(-1)
    return z, log_q, kl


def min_bytes(family: str, B: int, L: int, C: int, K: int, itemsize: int = 4) -> dict[str, int]:
    n = B * L * (C - 1) if family == "logistic_normal" else B * L  # parameters per input
    nz = B * L * C if family == "logistic_normal" else B * L  # z per sample
    fwd = (2 * n + K * nz + K * B + B) * itemsize  # mu, logvar -> z, log q, kl
    bwd = (K * nz + K * B + B + 2 * n + 2 * n) * itemsize  # dz, dlog_q, dkl, mu, logvar -> dmu, dlogvar
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(family: str, B: int, L: int, C: int, K: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (B, L, C - 1) if family == "logistic_normal" else (B, L)
    zshape = (K, B, L, C) if family == "logistic_normal" else (K, B, L)
    mu = (torch.randn(shape, generator=g, dtype=DTYPE) * 0.5).to(device).requires_grad_()
    logvar = (torch.randn(shape, generator=g, dtype=DTYPE) * 0.3 - 1.0).to(device).requires_grad_()
    gz = torch.randn(zshape, generator=g, dtype=DTYPE).to(device)
    gq = torch.randn(K, B, generator=g, dtype=DTYPE).to(device)
    gkl = torch.randn(B, generator=g, dtype=DTYPE).to(device)
    return (family, mu, logvar, K), [mu, logvar], (gz, gq, gkl)


def cases(families, B_lognormal: int, B_logistic: int, L: int, C: int, K: int) -> list[harness.Case]:
    out = []
    for f in families:
        B = B_lognormal if f == "lognormal" else B_logistic
        label = f"log-normal B={B} L={L} K={K}" if f == "lognormal" else f"logistic-normal B={B} L={L} C={C} K={K}"
        out.append(harness.Case(label, {"family": f, "B": B, "L": L, "C": C if f == "logistic_normal" else None,
                                        "K": K},
                                lambda device, f=f, B=B: make_inputs(f, B, L, C, K, device), min_bytes(f, B, L, C, K),
                                repeats=15))
    return out


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("-B", type=int, default=None, help="log-normal batch size (default 65536, 4096 with --quick)")
    p.add_argument("--B-logistic", type=int, default=None,
                   help="logistic-normal batch size (default 4096, 256 with --quick)")
    p.add_argument("-L", type=int, default=32, help="latents (default 32)")
    p.add_argument("-C", type=int, default=16, help="logistic-normal categories per latent (default 16)")
    p.add_argument("-K", type=int, default=1, help="samples (default 1)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    args = harness.parse_args(p, argv)
    B = args.B or (4096 if args.quick else 65536)
    B_logistic = args.B_logistic or (256 if args.quick else 4096)
    impls = harness.baseline_impls(eager_normal_transform, fastvae_normal_transform, OP,
                                   torch.device(args.device), args.fastvae_backends)
    return harness.run(__spec__.name, NAME,
                       f"log-normal (B={B}, L={args.L}) and logistic-normal (B={B_logistic}, L={args.L}, "
                       f"C={args.C}) sampling + log q + KL, K={args.K}, float32",
                       cases(args.families, B, B_logistic, args.L, args.C, args.K), impls, args)


if __name__ == "__main__":
    main()
