"""Benchmark of fastvae.gaussian_log_prob: forward, backward, forward+backward
against eager PyTorch and torch.compile of it, x of shape (B, D) broadcast
against decoder means of shape (K, B, D): float32, and bfloat16 decoder outputs
(mean and logvar) with float32 x (a decoder under autocast; rows "... bf16"),
where eager computes in float32 on float32 copies, as autocast would.

Variances: "logvar" (a decoder that predicts a per-element log-variance, the
most bytes) and "scale" (a fixed standard deviation: the squared-error case).
Effective bandwidth counts the fewest bytes: forward reads x once, mean (and
logvar) once and writes the (K, B) result; backward reads them again with the
upstream gradient and writes dmean (and dlogvar).

Reproduce: python -m benchmarks.bench_gaussian_log_prob [--quick] [--memory]
Results: one JSON per variance, gaussian_log_prob-<variance>-<device-tag>.json;
main() returns the list of their payloads.
"""
import argparse
import math
from pathlib import Path

import torch

import fastvae
from fastvae.reference import LOG_2PI

from . import harness


def _widened(*ts):
    return [t.float() for t in ts]


def eager_logvar(x, mean, logvar):
    """As users write it: broadcasting does the K copies of x implicitly."""
    x, mean, logvar = _widened(x, mean, logvar)
    return -0.5 * torch.sum((x - mean) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI, dim=-1)


def eager_scale(x, mean):
    x, mean = _widened(x, mean)
    return -0.5 * torch.sum((x - mean) ** 2 / 0.25 + math.log(0.25) + LOG_2PI, dim=-1)


def cases(B, D, ks, variance, dtype=torch.float32):
    out = []
    suffix = "" if dtype == torch.float32 else " bf16"
    for K in ks:
        def make(device, K=K):
            g = torch.Generator().manual_seed(0)
            x = torch.rand(B, D, generator=g).to(device)
            mean = torch.rand(K, B, D, generator=g).to(dtype).to(device).requires_grad_()
            up = torch.randn(K, B, generator=g).to(device)
            if variance == "logvar":
                logvar = (torch.randn(K, B, D, generator=g) - 2).to(dtype).to(device).requires_grad_()
                return (x, mean, logvar), [mean, logvar], up
            return (x, mean), [mean], up

        n = 4  # float32 bytes (x, the result)
        h = torch.empty((), dtype=dtype).element_size()  # the decoder outputs' bytes
        per_out = 2 if variance == "logvar" else 1  # mean (and logvar): read, and their grads written
        fwd = n * (B * D + K * B) + h * per_out * K * B * D
        bwd = n * (K * B + B * D) + h * 2 * per_out * K * B * D
        out.append(harness.Case(f"K={K}{suffix}", {"B": B, "D": D, "K": K, "variance": variance,
                                                   "decoder_dtype": str(dtype).split(".")[-1]}, make,
                                {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}))
    return out


def main(argv=None) -> list[dict] | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("--variance", choices=["logvar", "scale"], nargs="+", default=["logvar", "scale"])
    args = harness.parse_args(p, argv)
    B, D, ks = (512, 784, [1, 4]) if args.quick else (4096, 784, [1, 8])
    device = torch.device(args.device)
    fns = {"logvar": (eager_logvar, lambda x, m, lv: fastvae.gaussian_log_prob(x, m, lv)),
           "scale": (eager_scale, lambda x, m: fastvae.gaussian_log_prob(x, m, scale=0.5))}
    payloads = []
    for variance in args.variance:
        impls = harness.baseline_impls(*fns[variance], "gaussian_log_prob", device, args.fastvae_backends)
        run_args = argparse.Namespace(**vars(args))
        # one file per variance, whatever suffix --out has
        run_args.out = args.out and str(Path(args.out).with_name(f"{Path(args.out).stem}-{variance}.json"))
        # A memory subprocess measures one variance: the last --variance given wins.
        run_args.argv = [*args.argv, "--variance", variance]
        payloads.append(harness.run(__spec__.name, f"gaussian_log_prob-{variance}",
                                    f"gaussian_log_prob ({variance}), B={B}, D={D}, float32 and bfloat16",
                                    cases(B, D, ks, variance)
                                    + cases(B, D, ks[-1:] if args.quick else ks, variance, torch.bfloat16),
                                    impls, run_args))
    return None if args.memory_child else payloads


if __name__ == "__main__":
    main()
