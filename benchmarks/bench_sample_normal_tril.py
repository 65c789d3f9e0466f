"""Benchmark of fastvae.sample_normal_tril (full-covariance reparameterized sampling + analytic KL).

What is measured
----------------
For mu of shape (B, L) and a lower-triangular scale_tril S of shape (B, L, L)
(float32, default B=4096, L in 8 32 64) and K samples (default K=1 and K=16),
the op returns z = mu + S @ eps of shape (K, B, L) and
kl = 0.5 * (|S|_F^2 + |mu|^2 - L - 2 sum_i log S_ii) of shape (B,).

Implementations, side by side in one run:
  eager            the formula as users write it: torch.randn, a batched
                   mat-vec (S @ eps[..., None]).squeeze(-1), the KL formula;
  compiled         torch.compile of that same function (compiled before timing);
  fastvae[<name>]  fastvae.sample_normal_tril on the backend <name> (default: the
                   one fastvae picks for the device: cpp on CPU, triton on CUDA).

Modes (harness.py): forward (inputs require grad), backward (torch.autograd.grad
of (z, kl) w.r.t. (mu, S) with fixed random upstream gradients) and fwd+bwd.

Effective bandwidth is the fewest bytes each mode must move divided by the
median time (forward: read mu and the lower triangle of S, write z and kl;
backward: read grad_z, grad_kl, mu and the triangle, write dmu and the whole
dS; the noise is never stored), next to the copy bandwidth of the same
machine. The eager baseline reads and differentiates the whole S.

Reproduce (from the repository root):
  python -m benchmarks.bench_sample_normal_tril              # full run, a few minutes on 2 CPU cores
  python -m benchmarks.bench_sample_normal_tril --quick      # tiny smoke run
  python -m benchmarks.bench_sample_normal_tril -L 32 --ks 16
Results go to benchmarks/results/sample_normal_tril-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import torch

import fastvae

from . import harness

OP = "sample_normal_tril"
DTYPE = torch.float32


def eager_sample_normal_tril(mu: torch.Tensor, scale_tril: torch.Tensor, n_samples: int):
    """The baseline, written the way a VAE user writes it."""
    eps = torch.randn((n_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    z = mu + (scale_tril @ eps[..., None]).squeeze(-1)
    diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1)
    kl = 0.5 * (scale_tril.square().sum((-2, -1)) + mu.square().sum(-1) - mu.shape[-1]
                - 2 * torch.log(diag).sum(-1))
    return z, kl


def min_bytes(B: int, L: int, K: int, itemsize: int = 4) -> dict[str, int]:
    """Fewest bytes each mode must move: every input read once (S's lower
    triangle only), every output written once, no noise tensor stored."""
    tri = B * L * (L + 1) // 2
    fwd = (B * L + tri + K * B * L + B) * itemsize  # mu, tril(S) -> z, kl
    bwd = (K * B * L + B + B * L + tri + B * L + B * L * L) * itemsize  # dz, dkl, mu, tril(S) -> dmu, dS
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(B: int, L: int, K: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, L, generator=g, dtype=DTYPE)
    # a well-conditioned factor, as an encoder's softplus diagonal gives
    S = torch.tril(torch.randn(B, L, L, generator=g, dtype=DTYPE) * 0.3, -1) + torch.diag_embed(
        torch.exp(torch.randn(B, L, generator=g, dtype=DTYPE) * 0.3))
    mu, S = mu.to(device).requires_grad_(), S.to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g, dtype=DTYPE).to(device)
    gk = torch.randn(B, generator=g, dtype=DTYPE).to(device)
    return (mu, S, K), [mu, S], (gz, gk)


def cases(B: int, latents: list[int], ks: list[int]) -> list[harness.Case]:
    return [harness.Case(f"K={K},L={L}", {"B": B, "L": L, "K": K},
                         lambda device, K=K, L=L: make_inputs(B, L, K, device),
                         min_bytes(B, L, K), repeats=15 if K < 8 else 10)
            for L in latents for K in ks]


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("-B", type=int, default=None, help="batch size (default 4096, 256 with --quick)")
    p.add_argument("-L", type=int, nargs="+", default=None, help="latent sizes (default 8 32 64, 8 32 with --quick)")
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help="numbers of samples K (default 1 16, 1 4 with --quick)")
    args = harness.parse_args(p, argv)
    B = args.B or (256 if args.quick else 4096)
    latents = args.L or ([8, 32] if args.quick else [8, 32, 64])
    ks = args.ks or ([1, 4] if args.quick else [1, 16])
    impls = harness.baseline_impls(eager_sample_normal_tril, fastvae.sample_normal_tril, OP,
                                   torch.device(args.device), args.fastvae_backends)
    return harness.run(__spec__.name, OP, f"sample_normal_tril, B={B}, L={latents}, float32",
                       cases(B, latents, ks), impls, args)


if __name__ == "__main__":
    main()
