"""sample_positive, described once: reparameterized samples of the
positive inverse-CDF latent families (exponential, Weibull, Kumaraswamy:
POSITIVE_FAMILIES, fastvae/_families.py, whose position is the kernels'
``family``), each a transform of the Exp(1) variate t = -log u of the
element's Philox uniform, with log q(z) summed over L from the same t.

The op's description and its oracle, from the uniforms of fastvae/_philox.py
(fastvae/ops/__init__.py lists the folder's files). ``positive_terms`` (the
families' closed forms, differentiable) also serves the op's double backward
(op.py) and ``Positive.point`` (fastvae/latents.py), and ``positive_exp1`` the
relaxed categorical's oracle (sample_concrete).
"""
from __future__ import annotations

import math

import torch
import torch.distributions as td
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._families import KL_FAMILIES, POSITIVE_FAMILIES
from ..._philox import F32_BELOW_ONE, exp1, philox_word
from ..._spec import Bench, Op, family_sampler_kernels, family_sampler_kl_kernels, family_sampler_min_bytes
from ..family_kl import family_kl_backward, family_kl_forward

# `family` picks exponential, Weibull or Kumaraswamy (POSITIVE_FAMILIES), a
# compile-time variant; log_p1 unused by the exponential. Then the training
# layout's draw with family_kl's closed form against a prior ((L,) or (N, L))
# of the family's KL (the exponential's against an exponential, the Weibull's
# against a Weibull, the Kumaraswamy's against a Beta), summed over L: one pass
# over q each way
PARAMS = ("log_p0", "log_p1")
KERNELS = family_sampler_kernels("sample_positive", PARAMS) + family_sampler_kl_kernels(
    "sample_positive", PARAMS)

OP = Op("sample_positive", tuple(k.name for k in KERNELS), "fastvae/ops/sample_positive/test_sample_positive.py",
        "sample_positive", launches=(1, 1, 1))


# -- the oracle ------------------------------------------------------------------


# The positive families, in the kernels' order (the `family` argument: POSITIVE_FAMILIES); their
# parameters in log space: exponential (log_rate), Weibull (log_scale,
# log_concentration), Kumaraswamy (log_a, log_b). Exponential ignores log_p1.
_LOG2 = math.log(2.0)


positive_exp1 = exp1  # the positive families' noise (the samplers' Exp(1) variate)


def _kumaraswamy_clamp(dtype: torch.dtype) -> tuple[float, float]:
    """z's clamp [tiny, largest below 1] of the compute dtype (docs/latents.md)."""
    if dtype == torch.float64:
        return 2.0**-1022, 1.0 - 2.0**-53
    return 2.0**-126, F32_BELOW_ONE


def positive_terms(family: int, t: Tensor, log_t: Tensor, lp0: Tensor, lp1: Tensor, dtype: torch.dtype):
    """(z, log f, c0, c1, f0, f1, s0, s1) per element (float64 closed forms):
    z the sample, log f its log-density term of log q (summed over L), c_j =
    d log z / d lp_j (the path: dz/dlp_j = z c_j), f_j = d log f / d lp_j with
    the noise fixed (plain autograd), s_j = (z d log f / dz) c_j (stop-score:
    the score through z only). With r = s / expm1(s), s = t / b, m = 1 - e^-s:
    exponential z = t / rate, log f = log rate - t;
    Weibull z = scale t^(1/k), log f = log k - log scale + (1 - 1/k) log t - t;
    Kumaraswamy log z = log(m) / a, log f = log a + log b + (1 - 1/a) log m - t + s,
    z = exp(log z) clamped into [tiny, 1 - ulp] of the compute dtype."""
    zero = torch.zeros_like(t)
    if family == 0:
        z = t * torch.exp(-lp0)
        return z, lp0 - t, -torch.ones_like(t), zero, torch.ones_like(t), zero, t, zero
    if family == 1:
        k = torch.exp(lp1)
        c1 = -log_t / k
        w = (k - 1.0) - k * t
        z = torch.exp(lp0 - c1)
        return (z, lp1 - lp0 + (1.0 - 1.0 / k) * log_t - t, torch.ones_like(t), c1, -torch.ones_like(t),
                1.0 - c1, w, w * c1)
    if family == 2:
        a, b = torch.exp(lp0), torch.exp(lp1)
        s = t / b
        y = torch.exp(-s)
        m = -torch.expm1(-s)
        log_m = torch.where(s > _LOG2, torch.log1p(-y), torch.log(m))
        log_z = log_m / a
        tiny, top = _kumaraswamy_clamp(dtype)
        z = torch.exp(log_z).clamp(tiny, top)
        r = s * y / m
        q = torch.where(y == 0, -m, m * log_m / torch.where(y == 0, 1.0, y))
        return (z, lp0 + lp1 + (1.0 - 1.0 / a) * log_m - t + s, -log_z, -r / a, 1.0 + log_z,
                1.0 - s - (1.0 - 1.0 / a) * r, -(a - 1.0) * log_z + (b - 1.0) * q, -(a - 1.0) * r / a + (b - 1.0) * s)
    raise ValueError(f"family must be in [0, {len(POSITIVE_FAMILIES)}), got {family}")


def positive_noise(family: int, seed: int, offsets: Tensor, lp0: Tensor, lp1: Tensor, dtype: torch.dtype):
    """positive_terms at the element offsets (lp0, lp1 broadcast against them),
    from the uniforms of dtype's accumulation rule, in float64."""
    acc = accumulation_dtype(dtype)
    t, log_t = positive_exp1(philox_word(seed, offsets), acc)
    return positive_terms(family, t, log_t, lp0.double(), lp1.double(), acc)


def sample_positive(family: int, log_p0: Tensor, log_p1: Tensor, seed: int, n_samples: int) -> tuple[Tensor, Tensor]:
    """(z (n_samples, ..., L), log q(z) (n_samples, ...)) in float64, differentiable
    with plain autograd in log_p0 and log_p1 (the training layout's offsets):
    the oracle of the fused op, written from the closed forms in terms of t."""
    offsets = torch.arange(n_samples * log_p0.numel(), dtype=torch.int64, device=log_p0.device)
    acc = accumulation_dtype(log_p0.dtype)
    t, log_t = (w.reshape(n_samples, *log_p0.shape) for w in positive_exp1(philox_word(seed, offsets), acc))
    z, log_f = positive_terms(family, t, log_t, log_p0.double(), log_p1.double(), acc)[:2]
    return z, log_f.sum(-1)


def sample_positive_forward(log_p0: Tensor, log_p1: Tensor, seed: int, family: int, offset0: int,
                            sample_stride: int, row_stride: int, z: Tensor, log_q: Tensor | None) -> None:
    """z (K, N, L) <- the family's sample of t = -log u at offset0 + k *
    sample_stride + n * row_stride + l, parameters log_p0, log_p1 (N, L);
    log_q (K, N), when given, <- sum_l log f from the same t."""
    acc = accumulation_dtype(log_p0.dtype)
    K, N, L = z.shape
    k, n, c = (torch.arange(d, dtype=torch.int64, device=log_p0.device) for d in (K, N, L))
    offsets = offset0 + k[:, None, None] * sample_stride + n[None, :, None] * row_stride + c
    zz, log_f = positive_noise(family, seed, offsets, log_p0, log_p1, acc)[:2]
    z.copy_(zz)
    if log_q is not None:
        log_q.copy_(log_f.sum(-1))


def sample_positive_backward(grad_z: Tensor | None, grad_log_q: Tensor | None, log_p0: Tensor, log_p1: Tensor,
                             seed: int, family: int, stop_score: bool, dlog_p0: Tensor, dlog_p1: Tensor) -> None:
    """dlog_p0, dlog_p1 (N, L) from grad_z (K, N, L) and grad_log_q (K, N) (None:
    no gradient), t regenerated: dlog_p_j = sum_k grad_z_k z_k c_j + grad_log_q_k
    (s_j with stop_score, else f_j) (positive_terms)."""
    samples = grad_z if grad_z is not None else grad_log_q
    K = 0 if samples is None else samples.shape[0]
    N, L = log_p0.shape
    offsets = torch.arange(K * N * L, dtype=torch.int64, device=log_p0.device).reshape(K, N, L)
    acc = accumulation_dtype(log_p0.dtype)
    z, _, c0, c1, f0, f1, s0, s1 = positive_noise(family, seed, offsets, log_p0, log_p1, acc)
    d0 = torch.zeros((N, L), dtype=torch.float64, device=log_p0.device)
    d1 = torch.zeros_like(d0)
    if grad_z is not None:
        gz = grad_z.double() * z
        d0, d1 = d0 + (gz * c0).sum(0), d1 + (gz * c1).sum(0)
    if grad_log_q is not None:
        g = grad_log_q.double()[..., None]
        d0 = d0 + (g * (s0 if stop_score else f0)).sum(0)
        d1 = d1 + (g * (s1 if stop_score else f1)).sum(0)
    dlog_p0.copy_(d0)
    dlog_p1.copy_(d1)


def kl_layout(kl_family: int, p0, p1, prior0, prior1) -> tuple:
    """family_kl's (q_loc, q_log_param, p_loc, p_log_param) of the sampler's
    parameters and the prior's: the exponential's log-rates alone (no
    location; the second parameters are stand-ins), the Weibull's (log scale,
    log concentration) and the Kumaraswamy's (log a, log b) with their priors'
    pairs (a Weibull's, a Beta's (log alpha, log beta)) as (loc, log_param)."""
    if kl_family == KL_FAMILIES.index("exponential"):
        return None, p0, None, prior0
    return p0, p1, prior0, prior1


def sample_positive_kl_forward(log_p0: Tensor, log_p1: Tensor, prior_log_p0: Tensor, prior_log_p1: Tensor,
                               seed: int, family: int, kl_family: int, z: Tensor, kl: Tensor) -> None:
    """z (K, N, L) as sample_positive_forward draws it at the training layout's
    offsets, and kl (N,) <- family_kl's closed form of (log_p0, log_p1) against
    (prior_log_p0, prior_log_p1) ((L,) or (N, L)) summed over L (kl_layout)."""
    N, L = log_p0.shape
    sample_positive_forward(log_p0, log_p1, seed, family, 0, N * L, L, z, None)
    family_kl_forward(*kl_layout(kl_family, log_p0, log_p1, prior_log_p0, prior_log_p1), kl_family, kl)


def sample_positive_kl_backward(grad_z: Tensor | None, grad_kl: Tensor | None, log_p0: Tensor, log_p1: Tensor,
                                prior_log_p0: Tensor, prior_log_p1: Tensor, seed: int, family: int, kl_family: int,
                                dlog_p0: Tensor, dlog_p1: Tensor, dprior_log_p0: Tensor | None,
                                dprior_log_p1: Tensor | None) -> None:
    """dlog_p0, dlog_p1 (N, L) <- the sampler's gradients from grad_z (K, N, L)
    plus the KL's from grad_kl (N,) (None: no such term); dprior_log_p0,
    dprior_log_p1 (N, L), when given, <- the KL's gradients of the prior, per
    row (the exponential's second: 0)."""
    dlog_p0.zero_()
    dlog_p1.zero_()
    if grad_z is not None:
        sample_positive_backward(grad_z, None, log_p0, log_p1, seed, family, False, dlog_p0, dlog_p1)
    if dprior_log_p0 is not None:
        dprior_log_p0.zero_()
        dprior_log_p1.zero_()
    if grad_kl is None:
        return
    q_loc, q_lp, p_loc, p_lp = kl_layout(kl_family, log_p0, log_p1, prior_log_p0, prior_log_p1)
    dq_loc, dq_lp = torch.empty_like(dlog_p0), torch.empty_like(dlog_p1)
    dp_loc, dp_lp = dprior_log_p0, dprior_log_p1
    if q_loc is None:  # the exponential: its log-rates' gradients alone
        dq_loc, dp_loc, dp_lp = None, None, dprior_log_p0
    family_kl_backward(grad_kl, q_loc, q_lp, p_loc, p_lp, kl_family, dq_loc, dq_lp, dp_loc, dp_lp)
    if q_loc is None:
        dlog_p0.add_(dq_lp)
    else:
        dlog_p0.add_(dq_loc)
        dlog_p1.add_(dq_lp)


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op sample_positive) --


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (K samples of
    B rows of L): every family (a constexpr), both backward modes, and the
    evaluation's layout; m makes a tensor of the input dtype, r one of its
    accumulation dtype (kernels/aot.py)."""
    K, B, L = s["K"], s["B"], s["L"]
    seed = torch.empty((), dtype=torch.int64, device="meta")
    for family in range(len(POSITIVE_FAMILIES)):
        yield "sample_positive_forward", dict(log_p0=m(B, L), log_p1=m(B, L), seed=seed, family=family, offset0=0,
                                              sample_stride=B * L, row_stride=L, z=m(K, B, L), log_q=r(K, B))
        for stop in (False, True):
            yield "sample_positive_backward", dict(grad_z=m(K, B, L), grad_log_q=r(K, B), log_p0=m(B, L),
                                                   log_p1=m(B, L), seed=seed, family=family, stop_score=stop,
                                                   dlog_p0=m(B, L), dlog_p1=m(B, L))
    yield "sample_positive_forward", dict(log_p0=m(B, L), log_p1=m(B, L), seed=seed, family=2,
                                          offset0=7 * L + 1, sample_stride=L, row_stride=K * L, z=m(K, B, L),
                                          log_q=r(K, B))


# -- the benchmark row (python -m benchmarks.bench_op sample_positive) -------------
# One case per family at B = 65536 (--quick: 4096), L = 32, K = 1, float32:
# against torch.distributions as users write it (rsample, log_prob). The
# forward reads the two log parameters and writes z, log q; the backward reads
# dz, dlog_q and the parameters and writes their gradients; the noise is never
# stored. The exponential takes no second parameter (None).


def _bench_eager(family: str, p0: Tensor, p1: Tensor | None, n_samples: int):
    """The baseline: torch.distributions' rsample and log_prob (Exponential(exp(log_rate)),
    Weibull(exp(log_scale), exp(log_concentration)), Kumaraswamy(exp(log_a), exp(log_b)))."""
    if family == "exponential":
        q = td.Exponential(torch.exp(p0))
    elif family == "weibull":
        q = td.Weibull(torch.exp(p0), torch.exp(p1))
    else:
        q = td.Kumaraswamy(torch.exp(p0), torch.exp(p1))
    z = q.rsample((n_samples,))
    return z, q.log_prob(z).sum(-1)


def _bench_inputs(size: dict, device):
    family, B, L, K = size["family"], size["B"], size["L"], size["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    p0 = (torch.randn(B, L, generator=g) * 0.3).to(device).requires_grad_()
    p1 = (torch.randn(B, L, generator=g) * 0.3).to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g).to(device)
    gq = torch.randn(K, B, generator=g).to(device)
    if family == "exponential":
        return (family, p0, None, K), [p0], (gz, gq)
    return (family, p0, p1, K), [p0, p1], (gz, gq)


BENCH = Bench("sample_positive, float32",
              sizes=tuple({"family": f, "B": 65536, "L": 32, "K": 1} for f in POSITIVE_FAMILIES),
              quick=tuple({"family": f, "B": 4096, "L": 32, "K": 1} for f in POSITIVE_FAMILIES),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=family_sampler_min_bytes, fastvae="sample_positive",
              repeats=15)
