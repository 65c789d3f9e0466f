"""Benchmark of fastvae.categorical_log_prob: forward, backward, forward+backward
against eager PyTorch (log_softmax + gather, as users write it; the same
formula as torch.distributions.Categorical's log_prob) and torch.compile of
it, x (B, D) integer classes broadcast against logits (K, B, D, C): 256-way
pixels (C = 256, a PixelRNN-style decoder) and a few thousand classes (C =
4096, a vocabulary), float32.

Reproduce: python -m benchmarks.bench_categorical_log_prob [--quick] [--memory]
"""
import torch

import fastvae

from . import harness


def eager(x, logits):
    idx = x.expand(logits.shape[:-1])[..., None]
    return torch.log_softmax(logits, -1).gather(-1, idx)[..., 0].sum(-1)


def cases(B, D, C, ks):
    out = []
    for K in ks:
        def make(device, K=K):
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, C, (B, D), generator=g).to(device)
            logits = (torch.randn(K, B, D, C, generator=g) * 3).to(device).requires_grad_()
            return (x, logits), [logits], torch.randn(K, B, generator=g).to(device)

        fwd = 8 * B * D + 4 * K * B + 4 * K * B * D * C
        bwd = 4 * K * B + 8 * B * D + 2 * 4 * K * B * D * C
        out.append(harness.Case(f"C={C} K={K}", {"B": B, "D": D, "C": C, "K": K}, make,
                                {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}))
    return out


def main(argv=None) -> dict | None:
    args = harness.parse_args(harness.parser(__doc__.split("\n")[0]), argv)
    if args.quick:
        shapes = [(16, 64, 256, [1, 4]), (16, 4, 4096, [1])]
    else:
        shapes = [(64, 784, 256, [1, 4]), (64, 16, 4096, [1, 4])]
    impls = harness.baseline_impls(eager, fastvae.categorical_log_prob, "categorical_log_prob",
                                   torch.device(args.device), args.fastvae_backends)
    return harness.run(__spec__.name, "categorical_log_prob", "categorical_log_prob, float32 logits (K, B, D, C)",
                       [c for B, D, C, ks in shapes for c in cases(B, D, C, ks)], impls, args)


if __name__ == "__main__":
    main()
