"""Benchmark of fastvae.zinb_log_prob: forward, backward, forward+backward
against eager PyTorch (scvi-tools' log_zinb_positive as written, summed over
genes) and torch.compile of it, x (B, D) counts broadcast against (K, B, D)
decoder outputs with a per-gene log theta (scVI's dispersion="gene"): the
issue's size, B=512 cells, D=2000 genes, K=50 samples, float32.

Reproduce: python -m benchmarks.bench_zinb_log_prob [--quick] [--memory]
"""
import torch
import torch.nn.functional as F  # noqa: N812

import fastvae

from . import harness


def eager(x, log_mean, log_theta, zi_logits):
    """log_zinb_positive (scvi-tools) on mu = e^log_mean, theta = e^log_theta, eps = 1e-8."""
    eps = 1e-8
    mu, theta, pi = log_mean.exp(), log_theta.exp(), zi_logits
    softplus_pi = F.softplus(-pi)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (log_theta_eps - log_theta_mu_eps)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    mul_case_zero = (x < eps).to(mu.dtype) * case_zero
    case_non_zero = (-softplus_pi + pi_theta_log + x * (torch.log(mu + eps) - log_theta_mu_eps)
                     + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    mul_case_non_zero = (x > eps).to(mu.dtype) * case_non_zero
    return (mul_case_zero + mul_case_non_zero).sum(-1)


def make_counts(B, D, g):
    """scRNA-like counts: about 70% zeros, the rest geometric with mean 3."""
    u = torch.rand(B, D, generator=g)
    return torch.where(u < 0.7, 0.0, torch.floor(-3.0 * torch.log(torch.rand(B, D, generator=g))))


def count_cases(B, D, ks, theta: bool, zi: bool):
    """The count benchmarks' cases: x (B, D) make_counts against (K, B, D) log
    means, with a per-gene log theta when theta and (K, B, D) zero-inflation
    logits when zi; bytes are the kernels' float32 reads and writes."""
    full = 1 + zi  # (K, B, D) inputs, each with a gradient of its size
    out = []
    for K in ks:
        def make(device, K=K):
            g = torch.Generator().manual_seed(0)
            x = make_counts(B, D, g).to(device)
            params = [torch.randn(K, B, D, generator=g) + 0.5]
            if theta:
                params.append(torch.randn(D, generator=g))
            if zi:
                params.append(torch.randn(K, B, D, generator=g) - 1.0)
            params = [t.to(device).requires_grad_() for t in params]
            return (x, *params), params, torch.randn(K, B, generator=g).to(device)

        fwd = 4 * (B * D + K * B + theta * D) + full * 4 * K * B * D
        bwd = 4 * (K * B + B * D + theta * 2 * D) + 2 * full * 4 * K * B * D
        out.append(harness.Case(f"K={K}", {"B": B, "D": D, "K": K, **({"theta": "per gene"} if theta else {})}, make,
                                {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}))
    return out


def cases(B, D, ks):
    return count_cases(B, D, ks, theta=True, zi=True)


def main(argv=None) -> dict | None:
    args = harness.parse_args(harness.parser(__doc__.split("\n")[0]), argv)
    B, D, ks = (64, 500, [4]) if args.quick else (512, 2000, [50])
    impls = harness.baseline_impls(eager, fastvae.zinb_log_prob, "zinb_log_prob", torch.device(args.device),
                                   args.fastvae_backends)
    return harness.run(__spec__.name, "zinb_log_prob", f"zinb_log_prob, B={B}, D={D}, per-gene theta, float32",
                       cases(B, D, ks), impls, args)


if __name__ == "__main__":
    main()
