"""Benchmark of fastvae.discretized_logistic_mixture_log_prob (PixelCNN++'s
likelihood): forward, backward, forward+backward against eager PyTorch
(PixelCNN++'s discretized_mix_logistic_loss as its PyTorch ports write it,
channels first, per image) and torch.compile of it; x (B, 3, H, W) broadcast
against the packed params (K, B, 10 M, H, W), float32.

Reproduce: python -m benchmarks.bench_discretized_logistic_mixture_log_prob [--quick] [--memory]
(the issue's size: B=64, 3x32x32, M=10, K=16).
"""
import math

import torch
import torch.nn.functional as F

import fastvae

from . import harness


def eager(x, params):
    """PixelCNN++'s formula (openai/pixel-cnn nn.py), channels first: x
    (B, 3, H, W) against params (K, B, 10 M, H, W); log p(x) per (k, b)."""
    M = params.shape[-3] // 10
    logit_probs = params[..., :M, :, :]
    rest = params[..., M:, :, :].unflatten(-3, (3, 3 * M))  # (K, B, 3, 3M, H, W)
    means = rest[..., :M, :, :]
    log_scales = torch.clamp(rest[..., M:2 * M, :, :], min=-7.0)
    coeffs = torch.tanh(rest[..., 2 * M:, :, :])
    x = x.unsqueeze(2)  # (B, 3, 1, H, W): against the M components
    m2 = means[..., 1, :, :, :] + coeffs[..., 0, :, :, :] * x[:, 0]
    m3 = means[..., 2, :, :, :] + coeffs[..., 1, :, :, :] * x[:, 0] + coeffs[..., 2, :, :, :] * x[:, 1]
    means = torch.stack((means[..., 0, :, :, :], m2, m3), dim=-4)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    inner = torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)),
                        log_pdf_mid - math.log(127.5))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner))
    log_probs = log_probs.sum(-4) + torch.log_softmax(logit_probs, dim=-3)
    return torch.logsumexp(log_probs, dim=-3).sum((-2, -1))


def cases(B, H, W, M, ks, repeats=None):
    out = []
    for K in ks:
        def make(device, K=K):
            g = torch.Generator().manual_seed(0)
            x = (torch.randint(0, 256, (B, 3, H, W), generator=g).float() / 127.5 - 1.0).to(device)
            params = torch.randn(K, B, 10 * M, H, W, generator=g)
            params[:, :, M:].mul_(0.5)  # means and log scales about PixelCNN++'s size
            return (x, params.to(device).requires_grad_()), None, torch.randn(K, B, generator=g).to(device)

        def make_inputs(device, make=make):
            (x, params), _, g = make(device)
            return (x, params), [params], g

        n = K * B * 10 * M * H * W
        fwd = 4 * (B * 3 * H * W + n + K * B)
        bwd = 4 * (K * B + B * 3 * H * W + 2 * n)
        out.append(harness.Case(f"K={K}", {"B": B, "C": 3, "H": H, "W": W, "M": M, "K": K}, make_inputs,
                                {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}, repeats))
    return out


def main(argv=None) -> dict | None:
    args = harness.parse_args(harness.parser(__doc__.split("\n")[0]), argv)
    B, H, W, M, ks, repeats = (4, 8, 8, 10, [1, 2], None) if args.quick else (64, 32, 32, 10, [1, 16], 3)
    impls = harness.baseline_impls(eager, fastvae.discretized_logistic_mixture_log_prob,
                                   "discretized_logistic_mixture_log_prob", torch.device(args.device),
                                   args.fastvae_backends)
    return harness.run(__spec__.name, "discretized_logistic_mixture_log_prob",
                       f"discretized_logistic_mixture_log_prob, B={B}, 3x{H}x{W}, M={M}, float32",
                       cases(B, H, W, M, ks, repeats), impls, args)


if __name__ == "__main__":
    main()
