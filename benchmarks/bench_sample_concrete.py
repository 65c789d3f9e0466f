"""Benchmark of fastvae.sample_concrete (a relaxed-categorical latent's
reparameterized sampling with log q(z), issue 35), plain and straight-through.

What is measured
----------------
For logits of shape (B, L, C) (float32, default B=4096, L=32, C=16), a
temperature of 0.5 and K samples (default 1), the op returns z of shape
(K, B, L, C) (softmax of the logits plus Gumbel noise over the temperature, C
Philox uniforms per latent) and log q(z) summed over L, shape (K, B).

Implementations, side by side in one run:
  eager            torch.distributions as users write it:
                   q = RelaxedOneHotCategorical(temperature, logits=logits);
                   z = q.rsample((K,)), q.log_prob(z).sum(-1) (hard: z made
                   one-hot by z + (one_hot(argmax z) - z).detach(), log q of the relaxed z);
  compiled         torch.compile of that same function;
  fastvae[<name>]  fastvae.sample_concrete on the backend <name>.

Modes, medians, effective bandwidth and memory as in bench_sample_normal
(harness.py): forward reads the logits and writes z, log q; backward reads
dz, dlog_q and the logits and writes their gradient; the noise is never stored.

Reproduce (from the repository root):
  python -m benchmarks.bench_sample_concrete            # full run
  python -m benchmarks.bench_sample_concrete --quick    # tiny smoke run
Results go to benchmarks/results/sample_concrete-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import torch
import torch.distributions as td

import fastvae

from . import harness

OP = "sample_concrete"
DTYPE = torch.float32
TEMPERATURE = 0.5


def eager_sample_concrete(logits: torch.Tensor, hard: bool, n_samples: int):
    """The baseline: torch.distributions' rsample and log_prob."""
    q = td.RelaxedOneHotCategorical(torch.tensor(TEMPERATURE, device=logits.device), logits=logits)
    z = q.rsample((n_samples,))
    log_q = q.log_prob(z).sum(-1)
    if hard:
        z = z + (torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype) - z).detach()
    return z, log_q


def fastvae_sample_concrete(logits: torch.Tensor, hard: bool, n_samples: int):
    return fastvae.sample_concrete(logits, TEMPERATURE, n_samples, hard=hard)


def min_bytes(B: int, L: int, C: int, K: int, itemsize: int = 4) -> dict[str, int]:
    fwd = (B * L * C + K * B * L * C + K * B) * itemsize  # logits -> z, log q
    bwd = (K * B * L * C + K * B + 2 * B * L * C) * itemsize  # dz, dlog_q, logits -> dlogits
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(B: int, L: int, C: int, K: int, hard: bool, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(B, L, C, generator=g, dtype=DTYPE).to(device).requires_grad_()
    gz = torch.randn(K, B, L, C, generator=g, dtype=DTYPE).to(device)
    gq = torch.randn(K, B, generator=g, dtype=DTYPE).to(device)
    return (logits, hard, K), [logits], (gz, gq)


def cases(B: int, L: int, C: int, K: int) -> list[harness.Case]:
    return [harness.Case(f"{'hard' if hard else 'relaxed'} K={K}", {"hard": hard, "B": B, "L": L, "C": C, "K": K},
                         lambda device, hard=hard: make_inputs(B, L, C, K, hard, device), min_bytes(B, L, C, K),
                         repeats=15)
            for hard in (False, True)]


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("-B", type=int, default=None, help="batch size (default 4096, 256 with --quick)")
    p.add_argument("-L", type=int, default=32, help="latents (default 32)")
    p.add_argument("-C", type=int, default=16, help="categories per latent (default 16)")
    p.add_argument("-K", type=int, default=1, help="samples (default 1)")
    args = harness.parse_args(p, argv)
    B = args.B or (256 if args.quick else 4096)
    impls = harness.baseline_impls(eager_sample_concrete, fastvae_sample_concrete, OP,
                                   torch.device(args.device), args.fastvae_backends)
    return harness.run(__spec__.name, OP, f"sample_concrete, B={B}, L={args.L}, C={args.C}, K={args.K}, float32",
                       cases(B, args.L, args.C, args.K), impls, args)


if __name__ == "__main__":
    main()
