"""discretized_logistic_mixture_log_prob, described once: PixelCNN++'s
likelihood of 8-bit images (Salimans et al. 2017; openai/pixel-cnn nn.py,
discretized_mix_logistic_loss), a mixture of discretized logistics per pixel,
for images x (..., C, H, W) in [-1, 1] against the packed params
(K, ..., 10 M, H, W) or a (logit_probs, means, log_scales) tuple; the decoder
likelihood of likelihood="discretized_logistic_mixture".

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._oracle_math import softplus
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("discretized_logistic_mixture_log_prob_forward", "discretized_logistic_mixture_log_prob",
           ("x", "params", "means", "log_scales", "num_bins", "out")),
    Kernel("discretized_logistic_mixture_log_prob_backward", "discretized_logistic_mixture_log_prob",
           ("grad_out", "x", "params", "means", "log_scales", "num_bins", "dparams", "dmeans", "dlog_scales")),
)

OP = Op("discretized_logistic_mixture_log_prob", tuple(k.name for k in KERNELS),
        "fastvae/ops/discretized_logistic_mixture_log_prob/test_discretized_logistic_mixture_log_prob.py",
        "discretized_logistic_mixture_log_prob", double_backward="not_twice", likelihood="discretized_logistic_mixture",
        triton_ops=("discretized_logistic_mixture_log_prob", "discretized_logistic_mixture_log_prob_backward"))


# -- the oracle ------------------------------------------------------------------
# Kernel layout: x (P, C, S), S = H * W pixels, broadcast over K; either the
# packed PixelCNN++ params (K, P, 10 M, S) with C = 3 (means and log_scales
# None), or the mixture logits (K, P, M, S) with means and log_scales
# (K, P, M, C, S) and no channel coupling. out (K, P): summed over pixels.

DLM_EDGE = 0.999  # PixelCNN++'s tests for the first and last bin: x < -0.999, x > 0.999
DLM_LOG_MIN_DELTA = math.log(1e-5)  # below a bin mass of 1e-5: the log pdf at the bin's centre
DLM_LOG_SCALE_MIN = -7.0  # PixelCNN++'s floor of the log scales
_LN2 = math.log(2.0)


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - e^-d) for d >= 0 (Maechler's two branches, no cancellation)."""
    return torch.where(d <= _LN2, torch.log(-torch.expm1(-d)), torch.log1p(-torch.exp(-d)))


def discretized_logistic_terms(x: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int):
    """(lp, dlp/dmean, dlp/dlog_scale) of one discretized logistic per element.

    With s = max(log_scale, -7), inv = e^-s, h = 1 / (num_bins - 1) (half a
    bin), a = inv (x - mean + h), b = inv (x - mean - h):
    - x < -0.999 (the first bin, down to -inf): log sigmoid(a) = -softplus(-a);
    - x > 0.999 (the last bin, up to +inf): log(1 - sigmoid(b)) = -softplus(b);
    - else the bin's mass sigmoid(a) - sigmoid(b), whose log is
      -softplus(-a) - softplus(b) + log(1 - e^-(a - b)) with a - b = 2 h inv:
      the same number as PixelCNN++'s log(cdf_plus - cdf_min), without the
      cancellation of the difference;
    - where that mass is not above 1e-5, PixelCNN++'s fallback: the log pdf
      at the bin's centre plus the log of the bin width,
      mid - s - 2 softplus(mid) - log((num_bins - 1) / 2), mid = inv (x - mean)
      (for 256 bins, PixelCNN++'s log_pdf_mid - log(127.5)).
    dlp/dlog_scale is 0 where log_scale < -7 (the floor's gradient, as torch.clamp's)."""
    s = torch.clamp(log_scale, min=DLM_LOG_SCALE_MIN)
    inv = torch.exp(-s)
    h = 1.0 / (num_bins - 1)
    c = x - mean
    a, b, mid, d = inv * (c + h), inv * (c - h), inv * c, (2.0 * h) * inv
    sa, sb = softplus(-a), softplus(b)
    pa, pb = torch.sigmoid(-a), torch.sigmoid(b)
    left, right = x < -DLM_EDGE, x > DLM_EDGE
    lp_mid = -sa - sb + _log1mexp(d)
    fallback = ~left & ~right & ~(lp_mid > DLM_LOG_MIN_DELTA)
    tmid = 1.0 - 2.0 * torch.sigmoid(mid)
    lp_pdf = mid - s - 2.0 * softplus(mid) - math.log((num_bins - 1) / 2.0)
    lp = torch.where(left, -sa, torch.where(right, -sb, torch.where(fallback, lp_pdf, lp_mid)))
    dmu = torch.where(left, -inv * pa, torch.where(right, inv * pb,
                      torch.where(fallback, -inv * tmid, -inv * (pa - pb))))
    q = torch.where(fallback | left | right, 0.0, d / torch.expm1(torch.where(d > 0, d, 1.0)))  # d / (e^d - 1)
    dls = torch.where(left, -a * pa, torch.where(right, b * pb,
                      torch.where(fallback, -mid * tmid - 1.0, -a * pa + b * pb - q)))
    return lp, dmu, torch.where(log_scale >= DLM_LOG_SCALE_MIN, dls, 0.0)


def unpack_pixelcnn_params(params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PixelCNN++'s packed decoder output (..., 10 M, S) as (logits (..., M, S),
    means, log_scales, raw coefficients (..., M, 3, S)), views: after the M
    logits, channel c's block of 3 M holds its M means, M log scales and M
    coefficients (nn.py's reshape of l[..., M:] to (3, 3 M)); the coefficients
    are used as tanh(raw)."""
    M = params.shape[-2] // 10
    rest = params[..., M:, :].unflatten(-2, (3, 3 * M))  # (..., 3, 3M, S)
    blocks = [rest[..., j * M:(j + 1) * M, :].transpose(-3, -2) for j in range(3)]  # (..., M, 3, S)
    return params[..., :M, :], blocks[0], blocks[1], blocks[2]


def coupled_means(x: Tensor, means: Tensor, coeffs: Tensor) -> Tensor:
    """PixelCNN++'s autoregressive channel means for x (..., 3, S) and means,
    coeffs (= tanh of the raw ones) (..., M, 3, S): m0, m1 + c0 x0, m2 + c1 x0 + c2 x1."""
    x0, x1 = x[..., None, 0, :], x[..., None, 1, :]
    return torch.stack([means[..., 0, :], means[..., 1, :] + coeffs[..., 0, :] * x0,
                        means[..., 2, :] + coeffs[..., 1, :] * x0 + coeffs[..., 2, :] * x1], dim=-2)


def _dlm_unpacked(x, params, means, log_scales):
    """(logits, effective means, log_scales, tanh coefficients or None) of either layout."""
    if means is None:
        logits, means, log_scales, raw = unpack_pixelcnn_params(params)
        coeffs = torch.tanh(raw)
        return logits, coupled_means(x, means, coeffs), log_scales, coeffs
    return params, means, log_scales, None


def discretized_logistic_mixture_log_prob_forward(x, params, means, log_scales, num_bins: int, out) -> None:
    acc = accumulation_dtype(params.dtype)
    x, params = x.to(acc), params.to(acc)
    means = None if means is None else means.to(acc)
    log_scales = None if log_scales is None else log_scales.to(acc)
    logits, mu, ls, _ = _dlm_unpacked(x, params, means, log_scales)
    lp, _, _ = discretized_logistic_terms(x[:, None], mu, ls, num_bins)  # (K, P, M, C, S)
    per_pixel = torch.logsumexp(logits + lp.sum(-2), dim=-2) - torch.logsumexp(logits, dim=-2)
    out.copy_(per_pixel.sum(-1))


def discretized_logistic_mixture_log_prob_backward(grad_out, x, params, means, log_scales, num_bins: int,
                                                   dparams, dmeans, dlog_scales) -> None:
    """With w_m the posterior weight of component m at a pixel and pi_m =
    softmax(logits)_m: dlogits = g (w - pi), dmean = g w dlp/dmean,
    dlog_scale = g w dlp/dlog_scale; packed: the coupled means pass
    dmean1 x0 (1 - c0^2) to coefficient 0, dmean2 x0 (1 - c1^2) to 1 and
    dmean2 x1 (1 - c2^2) to 2."""
    acc = accumulation_dtype(params.dtype)
    x, params, g = x.to(acc), params.to(acc), grad_out.to(acc)
    means = None if means is None else means.to(acc)
    log_scales = None if log_scales is None else log_scales.to(acc)
    logits, mu, ls, coeffs = _dlm_unpacked(x, params, means, log_scales)
    lp, dmu, dls = discretized_logistic_terms(x[:, None], mu, ls, num_bins)
    w = torch.softmax(logits + lp.sum(-2), dim=-2)  # (K, P, M, S)
    gw = g[..., None, None] * w
    dlogits = gw - g[..., None, None] * torch.softmax(logits, dim=-2)
    dmu, dls = gw[..., None, :] * dmu, gw[..., None, :] * dls
    if means is not None:
        dparams.copy_(dlogits)
        dmeans.copy_(dmu)
        dlog_scales.copy_(dls)
        return
    M = logits.shape[-2]
    x0, x1 = x[:, None, 0, :], x[:, None, 1, :]
    one = 1.0 - coeffs * coeffs
    dcoef = torch.stack([dmu[..., 1, :] * x0 * one[..., 0, :], dmu[..., 2, :] * x0 * one[..., 1, :],
                         dmu[..., 2, :] * x1 * one[..., 2, :]], dim=-2)
    dparams[..., :M, :] = dlogits
    rest = dparams[..., M:, :].unflatten(-2, (3, 3 * M))
    for j, grad in enumerate((dmu, dls, dcoef)):
        rest[..., j * M:(j + 1) * M, :] = grad.transpose(-3, -2)


def discretized_logistic_mixture_log_prob(x: Tensor, params, num_bins: int = 256) -> Tensor:
    """The op in plain PyTorch for x (..., C, H, W) and params packed
    (..., 10 M, H, W) or a (logit_probs, means, log_scales) tuple; leading
    dimensions of params' shape, x broadcast against them (not differentiable:
    the kernels' closed forms; see the tests for PixelCNN++'s formula)."""
    packed = isinstance(params, Tensor)
    first = params if packed else params[0]
    lead = first.shape[:-3]
    x = x.expand(*lead, *x.shape[-3:]).reshape(-1, x.shape[-3], x.shape[-2] * x.shape[-1])
    P = x.shape[0]
    flat = [t.reshape(1, P, *t.shape[len(lead):-2], -1) for t in ((params,) if packed else params)]
    out = torch.empty((1, P), dtype=accumulation_dtype(flat[0].dtype), device=x.device)
    discretized_logistic_mixture_log_prob_forward(x, flat[0], None if packed else flat[1],
                                                  None if packed else flat[2], num_bins, out)
    return out.reshape(lead)


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op discretized_logistic_mixture_log_prob) --


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s: images of
    D pixels in 3 channels, PixelCNN++'s packed params (M = 10) and the tuple
    layout (M = 5), the forward and the backward; m makes a tensor of the input
    dtype, r one of its accumulation dtype (kernels/aot.py)."""
    K, B, D = s["K"], s["B"], s["D"]
    for M, packed in ((10, True), (5, False)):
        params = m(K, B, 10 * M if packed else M, D)
        per = None if packed else (K, B, M, 3, D)
        args = dict(x=m(B, 3, D), params=params, means=per and m(*per), log_scales=per and m(*per), num_bins=256)
        yield "discretized_logistic_mixture_log_prob_forward", dict(args, out=r(K, B))
        yield "discretized_logistic_mixture_log_prob_backward", dict(
            grad_out=r(K, B), **args, dparams=m(*params.shape), dmeans=per and m(*per),
            dlog_scales=per and m(*per))


# -- the benchmark row (python -m benchmarks.bench_op discretized_logistic_mixture_log_prob) --


def _bench_inputs(size: dict, device):
    B, H, W, M, K = size["B"], size["H"], size["W"], size["M"], size["K"]
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (B, 3, H, W), generator=g).float() / 127.5 - 1.0).to(device)
    params = torch.randn(K, B, 10 * M, H, W, generator=g)
    params[:, :, M:].mul_(0.5)  # means and log scales about PixelCNN++'s size
    params = params.to(device).requires_grad_()
    return (x, params), [params], torch.randn(K, B, generator=g).to(device)


def _bench_eager(x: Tensor, params: Tensor) -> Tensor:
    """PixelCNN++'s formula (openai/pixel-cnn nn.py), channels first, as its
    PyTorch ports write it: x (B, 3, H, W) against params (K, B, 10 M, H, W);
    log p(x) per (k, b). "compiled" is torch.compile of it."""
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


def _bench_min_bytes(size: dict) -> dict[str, int]:
    B, H, W, M, K = size["B"], size["H"], size["W"], size["M"], size["K"]
    n = K * B * 10 * M * H * W
    fwd = 4 * (B * 3 * H * W + n + K * B)  # x, params -> out
    bwd = 4 * (K * B + B * 3 * H * W + 2 * n)  # g, x, params -> dparams
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


# x (B, 3, H, W) broadcast against the packed params (K, B, 10 M, H, W), float32:
# a CIFAR-sized PixelCNN++ head (B = 64, 3x32x32, M = 10, K = 16) and a single sample; 3 timed
# repeats (the eager baseline is slow at that size)
BENCH = Bench("discretized_logistic_mixture_log_prob, B={B}, 3x{H}x{W}, M={M}, float32",
              sizes=tuple({"B": 64, "C": 3, "H": 32, "W": 32, "M": 10, "K": K} for K in (1, 16)),
              quick=tuple({"B": 4, "C": 3, "H": 8, "W": 8, "M": 10, "K": K} for K in (1, 2)),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=_bench_min_bytes,
              fastvae="discretized_logistic_mixture_log_prob", label_keys=("K",), repeats=3)
