"""Benchmark of fastvae.mixture_log_prob (log density of a diagonal Gaussian mixture).

For z of shape (K, B, L) = (30, 1024, 32) and U = 10, 100, 500 components
(means, logvars (U, L), logits (U,); float32) the op returns
log sum_u softmax(logits)_u N(z; means_u, diag(exp(logvars_u))), shape (K, B),
streaming over the components (memory O(z + U * L)).

The eager baseline is torch.distributions as users write it,
MixtureSameFamily(Categorical(logits), Independent(Normal(means, exp(logvars / 2)), 1)).log_prob(z)
(argument validation off, its best case), which materializes (K, B, U, L)
tensors: 2 GB each at U = 500. "compiled" is torch.compile of the same code.
Each case's params carry io_mb, the inputs and outputs of a forward+backward
(z, means, logvars, logits, grad_out -> out, dz, dmeans, dlogvars, dlogits),
the yardstick for the peak memory that --memory measures.

Reproduce: python -m benchmarks.bench_mixture_log_prob [--quick] [--memory]
"""
from __future__ import annotations

import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import fastvae

from . import harness

OP = "mixture_log_prob"
DTYPE = torch.float32


def eager_mixture_log_prob(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor, logits: torch.Tensor):
    comp = Independent(Normal(means, torch.exp(0.5 * logvars), validate_args=False), 1, validate_args=False)
    mix = MixtureSameFamily(Categorical(logits=logits, validate_args=False), comp, validate_args=False)
    return mix.log_prob(z)


def min_bytes(N: int, U: int, L: int, itemsize: int = 4) -> dict[str, int]:
    params = 2 * U * L + U  # means, logvars, logits
    fwd = (N * L + params + N) * itemsize  # z, params -> out
    bwd = (N + N * L + params + N + N * L + params) * itemsize  # g, z, params, out -> dz, dparams
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def io_mb(N: int, U: int, L: int, itemsize: int = 4) -> float:
    """Inputs and outputs of one forward+backward, in MB."""
    params = 2 * U * L + U
    return (2 * (N * L + params) + 2 * N) * itemsize / 2**20


def make_inputs(K: int, B: int, U: int, L: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    means = torch.randn(U, L, generator=g, dtype=DTYPE).to(device).requires_grad_()
    logvars = (torch.randn(U, L, generator=g, dtype=DTYPE) * 0.5 - 1.0).to(device).requires_grad_()
    logits = torch.randn(U, generator=g, dtype=DTYPE).to(device).requires_grad_()
    z = torch.randn(K, B, L, generator=g, dtype=DTYPE).to(device).requires_grad_()
    gr = torch.randn(K, B, generator=g, dtype=DTYPE).to(device)
    return (z, means, logvars, logits), [z, means, logvars, logits], (gr,)


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    args = harness.parse_args(p, argv)
    K, B, L = (2, 64, 32) if args.quick else (30, 1024, 32)
    us = [4, 16] if args.quick else [10, 100, 500]
    # the eager baseline takes seconds a call at U = 500: fewer repeats there
    repeats = {10: 15, 100: 5, 500: 3}
    cases = [harness.Case(f"U={U}", {"K": K, "B": B, "U": U, "L": L, "io_mb": io_mb(K * B, U, L)},
                          lambda device, U=U: make_inputs(K, B, U, L, device), min_bytes(K * B, U, L),
                          repeats=repeats.get(U)) for U in us]
    impls = harness.baseline_impls(eager_mixture_log_prob, fastvae.mixture_log_prob, OP, torch.device(args.device),
                                   args.fastvae_backends)
    return harness.run(__spec__.name, OP, f"mixture_log_prob, K={K}, B={B}, L={L}, float32", cases, impls, args)


if __name__ == "__main__":
    main()
