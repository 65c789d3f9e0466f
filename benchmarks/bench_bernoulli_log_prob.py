"""Benchmark of fastvae.bernoulli_log_prob: forward, backward, forward+backward
against eager PyTorch (binary_cross_entropy_with_logits, as users write it)
and torch.compile of it, x (B, D) broadcast against logits (K, B, D): float32,
and bfloat16 logits with float32 x (a decoder under autocast; rows "... bf16").
There eager does what autocast does with this float32-list op: copies the
logits to float32 first; fastvae reads them as they are and returns float32.

Reproduce: python -m benchmarks.bench_bernoulli_log_prob [--quick] [--memory]
"""
import torch
import torch.nn.functional as F

import fastvae

from . import harness


def eager(x, logits):
    # half-precision logits: the float32 copy autocast makes for this op
    logits = logits if logits.dtype == x.dtype else logits.to(x.dtype)
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def cases(B, D, ks, dtype=torch.float32):
    out = []
    suffix = "" if dtype == torch.float32 else " bf16"
    size = torch.empty((), dtype=dtype).element_size()  # the logits' and dlogits' bytes
    for K in ks:
        def make(device, K=K):
            g = torch.Generator().manual_seed(0)
            x = (torch.rand(B, D, generator=g) > 0.5).float().to(device)
            logits = (torch.randn(K, B, D, generator=g) * 3).to(dtype).to(device).requires_grad_()
            return (x, logits), [logits], torch.randn(K, B, generator=g).to(device)

        fwd = 4 * (B * D + K * B) + size * K * B * D
        bwd = 4 * (K * B + B * D) + 2 * size * K * B * D
        out.append(harness.Case(f"K={K}{suffix}", {"B": B, "D": D, "K": K, "logits": str(dtype).split(".")[-1]},
                                make, {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}))
    return out


def main(argv=None) -> dict | None:
    args = harness.parse_args(harness.parser(__doc__.split("\n")[0]), argv)
    B, D, ks = (512, 784, [1, 4]) if args.quick else (4096, 784, [1, 8])
    impls = harness.baseline_impls(eager, fastvae.bernoulli_log_prob, "bernoulli_log_prob",
                                   torch.device(args.device), args.fastvae_backends)
    return harness.run(__spec__.name, "bernoulli_log_prob",
                       f"bernoulli_log_prob, B={B}, D={D}, float32 and bfloat16 logits",
                       cases(B, D, ks) + cases(B, D, ks[-1:] if args.quick else ks, torch.bfloat16), impls, args)


if __name__ == "__main__":
    main()
