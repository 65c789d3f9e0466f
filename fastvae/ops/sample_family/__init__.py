"""sample_location_scale and sample_positive, described once: a family of
two samplers of inverse-CDF latent families that share their front end
(op.py's FamilySampler and FamilyKLSampler), their kernels' loops and binding
(sample_family.cpp, bind.cpp; kernels/sampler.py for Triton) and their fused
closed-form KL (family_kl's after the draw). Each family is an int
``family``, its position in fastvae/_families.py, a compile-time variant of
one kernel pair per op:

- sample_location_scale: z = loc + exp(log_scale) * e with e = F^-1(u) the
  standardized family's inverse CDF (uniform, Laplace, logistic, Gumbel,
  Cauchy: LOCATION_SCALE_FAMILIES) of the element's Philox uniform, and
  log q(z) = sum_l(log f(e) - log_scale) from the same e;
- sample_positive: the positive families (exponential, Weibull, Kumaraswamy:
  POSITIVE_FAMILIES), each a transform of the Exp(1) variate t = -log u of
  the element's Philox uniform, with log q(z) summed over L from the same t.

and a third sampler on the same uniforms, which shares their front end's
checks, the Philox words, the launch geometry and the binding's checks but
has a transform and density of its own:

- sample_concrete: reparameterized relaxed-categorical (Concrete /
  Gumbel-softmax) samples of logits (N, L, C) at a temperature per latent,
  from C consecutive Philox uniforms per latent, with log q(z) summed over L
  from the same Exp(1) noise t = -log u (fastvae/_philox.py's ``exp1``);
  ``hard`` is the straight-through one-hot. Given a prior log-pmf log_p
  (L, C), the same launch also gives the analytic categorical KL of each
  row, sum_l sum_c pi_c (log pi_c - log p_c) with pi = softmax(logits)
  (noise-free: one value per row whatever the sample count), which an ELBO
  with a OneHotCategorical (or Bernoulli) prior takes instead of ~8 separate
  torch ops.

This file is the family's description (its ops' registry entries, their
kernels' argument names, their ahead-of-time cases and their benchmark row)
and its oracles, from the uniforms of fastvae/_philox.py (fastvae/ops/__init__.py
lists the folder's files). ``positive_terms`` (the positive families' closed
forms, differentiable) also serves sample_positive's double backward (op.py)
and ``Positive.point`` (fastvae/latents.py), and ``positive_exp1`` the
relaxed categorical's oracle (sample_concrete).
"""
from __future__ import annotations

import math

import torch
import torch.distributions as td
from torch import Tensor
from torch.distributions.transforms import AffineTransform, SigmoidTransform

from ..._dtypes import accumulation_dtype
from ..._families import KL_FAMILIES, LOCATION_SCALE_FAMILIES, POSITIVE_FAMILIES
from ..._philox import F32_BELOW_ONE, HALF_WORD, exp1, open_uniforms, philox_word
from ..._spec import Bench, Kernel, Op
from ..family_kl import family_kl_backward, family_kl_forward


def family_sampler_kernels(name: str, params: tuple[str, str]) -> tuple[Kernel, Kernel]:
    """The two kernels of a family sampler ``name`` of two (N, L) parameters
    (op.py's FamilySampler, whose arguments these name): <name>_forward draws
    z (K, N, L) and log q (K, N) at the noise offsets, <name>_backward gives
    the two parameters' gradients; ``family`` picks the family, a
    compile-time variant of the C++ and Triton kernels. The C++ kernels'
    ``prior_a``, ``prior_b`` (the location-scale sampler's; the positive
    sampler's refuses them) make log_q log q(z) - log p(z) for a prior of the
    posterior's own family with (L,) parameters, and the backward's
    ``dprior_a``, ``dprior_b`` take the prior's gradients."""
    a, b = params
    return (
        Kernel(f"{name}_forward", "sample_family", (a, b, "seed", "family", "offset0", "sample_stride",
                                                    "row_stride", "z", "log_q"), heavy="L", vector_loads=True,
               cpp_options=("prior_a", "prior_b")),
        Kernel(f"{name}_backward", "sample_family", ("grad_z", "grad_log_q", a, b, "seed", "family", "stop_score",
                                                     f"d{a}", f"d{b}"), heavy="L",
               cpp_options=("prior_a", "prior_b", "dprior_a", "dprior_b")),
    )


def family_sampler_kl_kernels(name: str, params: tuple[str, str]) -> tuple[Kernel, Kernel]:
    """The two kernels of a family sampler's ELBO draw fused with family_kl's
    closed form (op.py's FamilyKLSampler, whose arguments these name):
    <name>_kl_forward draws z (K, N, L) at the training layout's noise and
    the KL against the prior's prior_<param>s ((L,) or (N, L)) summed over L,
    kl (N,); <name>_kl_backward gives q's gradients (the draw's plus the
    KL's) and the prior's per row where asked. ``kl_family`` picks the KL's
    family (family_kl's). The C++ kernels' ``of_scale`` takes the second
    parameter as the scale itself (the location-scale sampler's; the
    positive sampler's refuses it)."""
    a, b = params
    return (
        Kernel(f"{name}_kl_forward", "sample_family", (a, b, f"prior_{a}", f"prior_{b}", "seed", "family",
                                                       "kl_family", "z", "kl"), cpp_options=("of_scale",)),
        Kernel(f"{name}_kl_backward", "sample_family", ("grad_z", "grad_kl", a, b, f"prior_{a}", f"prior_{b}",
                                                        "seed", "family", "kl_family", f"d{a}", f"d{b}",
                                                        f"dprior_{a}", f"dprior_{b}"), cpp_options=("of_scale",)),
    )


# sample_location_scale: `family` picks the standardized inverse CDF
# (LOCATION_SCALE_FAMILIES); then the training layout's draw with family_kl's
# closed form of (loc, log_scale) against a prior of a family with a location
# ((L,) or (N, L)), summed over L: one pass over q each way.
# sample_positive: `family` picks exponential, Weibull or Kumaraswamy
# (POSITIVE_FAMILIES); log_p1 unused by the exponential. Then the training
# layout's draw with family_kl's closed form against a prior ((L,) or (N, L))
# of the family's KL (the exponential's against an exponential, the Weibull's
# against a Weibull, the Kumaraswamy's against a Beta), summed over L.
LOCATION_SCALE_PARAMS = ("loc", "log_scale")
POSITIVE_PARAMS = ("log_p0", "log_p1")
_LS_KERNELS = family_sampler_kernels("sample_location_scale", LOCATION_SCALE_PARAMS) + family_sampler_kl_kernels(
    "sample_location_scale", LOCATION_SCALE_PARAMS)
_POSITIVE_KERNELS = family_sampler_kernels("sample_positive", POSITIVE_PARAMS) + family_sampler_kl_kernels(
    "sample_positive", POSITIVE_PARAMS)
# sample_concrete: logits (N, L, C), C consecutive uniforms per latent
_CONCRETE_KERNELS = (
    Kernel("sample_concrete_forward", "sample_family",
           ("logits", "temperature", "seed", "hard", "offset0", "sample_stride", "row_stride", "z", "log_q",
            "log_p", "kl"),
           heavy="L"),
    Kernel("sample_concrete_backward", "sample_family",
           ("grad_z", "grad_log_q", "logits", "temperature", "seed", "stop_score", "dlogits", "grad_kl", "log_p"),
           heavy="L"),
)
KERNELS = _LS_KERNELS + _POSITIVE_KERNELS + _CONCRETE_KERNELS

_TEST = "fastvae/ops/sample_family/test_sample_family.py"
OPS = (
    # the draw with log q and the ELBO's fused draw and KL, each with its backward
    Op("sample_location_scale", tuple(k.name for k in _LS_KERNELS), _TEST, "sample_family", launches=(1, 1, 1),
       triton_ops=("sample_location_scale", "sample_location_scale_backward", "sample_location_scale_kl",
                   "sample_location_scale_kl_backward")),
    Op("sample_positive", tuple(k.name for k in _POSITIVE_KERNELS), _TEST, "sample_family", launches=(1, 1, 1),
       triton_ops=("sample_positive", "sample_positive_backward", "sample_positive_kl", "sample_positive_kl_backward")),
    # other kernels: the seed's randint and a float temperature's fill (N, L) (a tensor temperature is used as it is)
    Op("sample_concrete", tuple(k.name for k in _CONCRETE_KERNELS), _TEST, "sample_family", launches=(1, 1, 2),
       double_backward="not_twice", other_kernels=("full",), torch_ops=("sample_concrete",),
       triton_ops=("sample_concrete", "sample_concrete_backward")),
)


# -- sample_location_scale's oracle ---------------------------------------------


def standardized(family: int, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(e, log f(e), psi(e) = d log f / de) of the standardized family at the
    folded words x, in float64 from the float32 (or float64) uniforms:
    uniform e = u; Laplace e = log 2u below 1/2, -log 2v above; logistic
    e = log u - log v; Gumbel e = -log t, t = -log u (-log1p(-v) above 1/2);
    Cauchy e = -cot(pi u) below 1/2, cot(pi v) above, log f = 2 log sin(pi w) - log pi."""
    u, v = (t.double() for t in open_uniforms(x, dtype))
    lower = x < HALF_WORD
    if family == 0:
        return u, torch.zeros_like(u), torch.zeros_like(u)
    if family == 1:
        e = torch.where(lower, torch.log(2.0 * u), -torch.log(2.0 * v))
        # psi = -sign(e), taken from the half (as the kernels do): e = 0 only where float32 rounds u to 1/2
        return e, -e.abs() - math.log(2.0), torch.where(lower, 1.0, -1.0).double()
    if family == 2:
        return torch.log(u) - torch.log(v), torch.log(u) + torch.log(v), v - u
    if family == 3:
        t = torch.where(lower, -torch.log(u), -torch.log1p(-v))
        return -torch.log(t), torch.log(t) - t, t - 1.0
    if family == 4:
        w = torch.where(lower, u, v)
        c, s = torch.cos(math.pi * w), torch.sin(math.pi * w)
        sign = torch.where(lower, -1.0, 1.0)
        return sign * c / s, 2.0 * torch.log(s) - math.log(math.pi), -2.0 * sign * c * s
    raise ValueError(f"family must be in [0, {len(LOCATION_SCALE_FAMILIES)}), got {family}")


def location_scale_noise(family: int, seed: int, offsets: Tensor, dtype: torch.dtype):
    """(e, log f(e), psi(e)) at the element offsets, in dtype (the uniforms of
    dtype's accumulation rule: float32 or float64)."""
    x = philox_word(seed, offsets)
    return tuple(t.to(dtype) for t in standardized(family, x, accumulation_dtype(dtype)))


def sample_location_scale(family: int, loc: Tensor, log_scale: Tensor, seed: int,
                          n_samples: int) -> tuple[Tensor, Tensor]:
    """(z (n_samples, ..., L), log q(z) (n_samples, ...)), differentiable with
    plain autograd in loc and log_scale (the training layout's offsets): the
    oracle of the fused op."""
    numel = loc.numel()
    offsets = torch.arange(n_samples * numel, dtype=torch.int64, device=loc.device)
    e, log_f, _ = location_scale_noise(family, seed, offsets, loc.dtype)
    e, log_f = e.reshape(n_samples, *loc.shape), log_f.reshape(n_samples, *loc.shape)
    z = loc + torch.exp(log_scale) * e
    return z, (log_f - log_scale).sum(-1)


def sample_location_scale_forward(loc: Tensor, log_scale: Tensor, seed: int, family: int, offset0: int,
                                  sample_stride: int, row_stride: int, z: Tensor, log_q: Tensor | None) -> None:
    """z (K, N, L) <- loc + exp(log_scale) * e, e the standardized family's
    inverse CDF of the uniform at offset0 + k * sample_stride + n * row_stride + l;
    log_q (K, N), when given, <- sum_l(log f(e) - log_scale) from that e."""
    acc = accumulation_dtype(loc.dtype)
    K, N, L = z.shape
    k, n, c = (torch.arange(d, dtype=torch.int64, device=loc.device) for d in (K, N, L))
    offsets = offset0 + k[:, None, None] * sample_stride + n[None, :, None] * row_stride + c
    e, log_f, _ = location_scale_noise(family, seed, offsets, acc)
    loc, log_scale = loc.to(acc), log_scale.to(acc)
    z.copy_(loc + torch.exp(log_scale) * e)
    if log_q is not None:
        log_q.copy_((log_f - log_scale).sum(-1))


def sample_location_scale_backward(grad_z: Tensor | None, grad_log_q: Tensor | None, loc: Tensor,
                                   log_scale: Tensor, seed: int, family: int, stop_score: bool, dloc: Tensor,
                                   dlog_scale: Tensor) -> None:
    """dloc, dlog_scale (N, L) from grad_z (K, N, L) and grad_log_q (K, N) (None:
    no gradient), with e regenerated and s = exp(log_scale):
    dloc = sum_k grad_z_k (+ (sum_k grad_log_q_k psi(e_k)) / s with stop_score),
    dlog_scale = s sum_k grad_z_k e_k + (sum_k grad_log_q_k psi(e_k) e_k with
    stop_score, else -sum_k grad_log_q_k). Stop-score: log q's parameters get
    no score, z keeps its path, d/dz log q = psi(e) / s (STL / DReG)."""
    acc = accumulation_dtype(loc.dtype)
    loc, log_scale = loc.to(acc), log_scale.to(acc)
    samples = grad_z if grad_z is not None else grad_log_q
    K = 0 if samples is None else samples.shape[0]
    N, L = loc.shape
    offsets = torch.arange(K * N * L, dtype=torch.int64, device=loc.device)
    e, _, psi = (t.reshape(K, N, L) for t in location_scale_noise(family, seed, offsets, acc))
    s = torch.exp(log_scale)
    gz = torch.zeros_like(e) if grad_z is None else grad_z.to(acc)
    d_loc = gz.sum(0)
    d_ls = s * (gz * e).sum(0)
    if grad_log_q is not None:
        g = grad_log_q.to(acc)[..., None]
        if stop_score:
            score = (g * psi).sum(0)
            d_loc = d_loc + torch.where(score == 0, 0.0, score * torch.exp(-log_scale))
            d_ls = d_ls + (g * psi * e).sum(0)
        else:
            d_ls = d_ls - g.sum(0)
    dloc.copy_(d_loc)
    dlog_scale.copy_(d_ls)


def sample_location_scale_kl_forward(loc: Tensor, log_scale: Tensor, prior_loc: Tensor, prior_log_scale: Tensor,
                                     seed: int, family: int, kl_family: int, z: Tensor, kl: Tensor) -> None:
    """z (K, N, L) as sample_location_scale_forward draws it at the training
    layout's offsets, and kl (N,) <- family_kl's closed form of (loc, log_scale)
    against (prior_loc, prior_log_scale) ((L,) or (N, L)) summed over L."""
    N, L = loc.shape
    sample_location_scale_forward(loc, log_scale, seed, family, 0, N * L, L, z, None)
    family_kl_forward(loc, log_scale, prior_loc, prior_log_scale, kl_family, kl)


def sample_location_scale_kl_backward(grad_z: Tensor | None, grad_kl: Tensor | None, loc: Tensor, log_scale: Tensor,
                                      prior_loc: Tensor, prior_log_scale: Tensor, seed: int, family: int,
                                      kl_family: int, dloc: Tensor, dlog_scale: Tensor, dprior_loc: Tensor | None,
                                      dprior_log_scale: Tensor | None) -> None:
    """dloc, dlog_scale (N, L) <- the sampler's gradients from grad_z (K, N, L)
    plus the KL's from grad_kl (N,) (None: no such term); dprior_loc,
    dprior_log_scale (N, L), when given, <- the KL's gradients of the prior,
    per row (a shared (L,) prior's are their column sums)."""
    dloc.zero_()
    dlog_scale.zero_()
    if grad_z is not None:
        sample_location_scale_backward(grad_z, None, loc, log_scale, seed, family, False, dloc, dlog_scale)
    if grad_kl is not None:
        d = [torch.empty_like(dloc), torch.empty_like(dlog_scale), dprior_loc, dprior_log_scale]
        family_kl_backward(grad_kl, loc, log_scale, prior_loc, prior_log_scale, kl_family, *d)
        dloc.add_(d[0])
        dlog_scale.add_(d[1])
    elif dprior_loc is not None:
        dprior_loc.zero_()
        dprior_log_scale.zero_()


# -- sample_positive's oracle ---------------------------------------------------


# The positive families, in the kernels' order (the `family` argument: POSITIVE_FAMILIES); their
# parameters in log space: exponential (log_rate), Weibull (log_scale,
# log_concentration), Kumaraswamy (log_a, log_b). Exponential ignores log_p1.
_LOG2 = math.log(2.0)


positive_exp1 = exp1  # the positive families' noise (the samplers' Exp(1) variate)


def _kumaraswamy_clamp(dtype: torch.dtype) -> tuple[float, float]:
    """z's clamp [tiny, largest below 1] of the compute dtype (docs/internals/latents.md)."""
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


# -- sample_concrete's oracle ----------------------------------------------------


def concrete_noise(seed: int, offsets: Tensor, dtype: torch.dtype) -> Tensor:
    """The Exp(1) variates t = -log u (-log1p(-v) above 1/2) of the element
    offsets in float64 from the `dtype` uniforms; the Gumbel is g = -log t."""
    return exp1(philox_word(seed, offsets), accumulation_dtype(dtype))[0]


def concrete_terms(logits: Tensor, temperature: Tensor, t: Tensor):
    """(z, log_q, soft_z, w, count) per latent of logits (..., C), temperature
    (...) and the Exp(1) noise t (..., C), in the arguments' dtype (float64 in
    the oracle), -inf logits masked out of the simplex:
    y = (logits - max logits - log t) / temperature (the shift by the latent's
    largest unmasked logit changes nothing but keeps y finite), z = softmax(y) (0 where masked),
    log q = lgamma(C') + (C' - 1) log temperature - sum_c log z_c
    + sum_c log t_c - C' log sum_c t_c over the C' unmasked categories: the
    Concrete density (Maddison et al. 2017) with sum_c pi_c z_c^-temperature
    written through the noise (pi_c z_c^-temperature is proportional to t_c).
    w = t / sum_c t (the stop-score term)."""
    mask = logits > -math.inf
    lam = temperature[..., None]
    # only the logits' differences matter (softmax and the density are
    # shift-invariant): subtracting the latent's largest logit first keeps y
    # finite for logits of any size at any temperature (a detached constant:
    # the shift's own gradient is 0)
    top = torch.where(mask, logits, -math.inf).amax(-1, keepdim=True).detach()
    top = torch.where(top > -math.inf, top, 0.0)
    y = torch.where(mask, ((logits - top) - torch.log(t)) / lam, -math.inf)
    log_z = torch.log_softmax(y, dim=-1)
    z = torch.where(mask, torch.exp(log_z), 0.0)
    count = mask.sum(-1).to(t.dtype)
    tm = torch.where(mask, t, 0.0)
    sum_t = tm.sum(-1)
    log_q = (torch.lgamma(count) + (count - 1.0) * torch.log(temperature)
             - torch.where(mask, log_z, 0.0).sum(-1) + torch.where(mask, torch.log(t), 0.0).sum(-1)
             - count * torch.log(sum_t))
    return z, log_q, tm / sum_t[..., None], count


def concrete_kl(logits: Tensor, log_p: Tensor) -> Tensor:
    """The analytic categorical KL of each latent (..., L), sum_c pi_c (log pi_c
    - log p_c) with pi = softmax(logits (..., L, C)) and log_p broadcasting to
    (L, C), differentiable in both with plain autograd: a category with pi_c = 0
    (masked, -inf, or underflowed) adds 0, as torch's where(pi > 0, ...) does
    (its log pi and log p are replaced by 0 first, so no 0 * inf reaches a
    gradient); log p_c = -inf where pi_c > 0 gives +inf."""
    log_pi = torch.log_softmax(logits, -1)
    pi = torch.exp(log_pi)
    live = pi > 0
    log_p = log_p.to(log_pi.dtype).expand(log_pi.shape)
    terms = pi * (torch.where(live, log_pi, 0.0) - torch.where(live, log_p, 0.0))
    return torch.where(live, terms, 0.0).sum(-1)


def concrete_kl_grad(logits: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    """(d KL_l / d logits_c, d KL_l / d log_p_c) (..., L, C) in closed form:
    pi_c ((log pi_c - log p_c) - KL_l) and -pi_c, 0 where pi_c = 0."""
    log_pi = torch.log_softmax(logits, -1)
    pi = torch.exp(log_pi)
    live = pi > 0
    kl = concrete_kl(logits, log_p)[..., None]
    log_p = log_p.to(log_pi.dtype).expand(log_pi.shape)
    d = torch.where(live, pi * ((torch.where(live, log_pi, 0.0) - torch.where(live, log_p, 0.0)) - kl), 0.0)
    return d, -pi


def sample_concrete(logits: Tensor, temperature: Tensor, seed: int, n_samples: int,
                    hard: bool = False) -> tuple[Tensor, Tensor]:
    """(z (n_samples, ..., L, C), log q(z) (n_samples, ...)) in float64,
    differentiable with plain autograd in logits (the training layout's
    offsets: C consecutive uniforms per latent): the oracle of the fused op.
    hard: z is the one-hot of argmax, with the relaxed z's gradient."""
    offsets = torch.arange(n_samples * logits.numel(), dtype=torch.int64, device=logits.device)
    t = concrete_noise(seed, offsets, logits.dtype).reshape(n_samples, *logits.shape)
    z, log_q = concrete_terms(logits.double(), temperature.double().expand(logits.shape[:-1]), t)[:2]
    if hard:
        one_hot = torch.nn.functional.one_hot(z.argmax(-1), logits.shape[-1]).to(z.dtype)
        z = one_hot + z - z.detach()
    return z, log_q.sum(-1)


def sample_concrete_forward(logits: Tensor, temperature: Tensor, seed: int, hard: bool, offset0: int,
                            sample_stride: int, row_stride: int, z: Tensor, log_q: Tensor | None,
                            log_p: Tensor | None = None, kl: Tensor | None = None) -> None:
    """z (K, N, L, C) <- softmax((logits - log t) / temperature) (one-hot of its
    argmax when hard) with t the Exp(1) variate of the uniform at offset0 +
    k * sample_stride + n * row_stride + l * C + c; logits (N, L, C),
    temperature (N, L); log_q (K, N), when given, <- the Concrete log-density
    summed over L from the same t (concrete_terms); kl (N,), with the prior
    log-pmf log_p (L, C), <- the analytic categorical KL summed over L (concrete_kl)."""
    acc = accumulation_dtype(logits.dtype)
    K, N, L, C = z.shape
    k, n, lc = (torch.arange(d, dtype=torch.int64, device=logits.device) for d in (K, N, L * C))
    offsets = offset0 + k[:, None, None] * sample_stride + n[None, :, None] * row_stride + lc
    t = concrete_noise(seed, offsets, acc).reshape(K, N, L, C)
    zz, lq = concrete_terms(logits.double(), temperature.double(), t)[:2]
    if hard:
        zz = torch.nn.functional.one_hot(zz.argmax(-1), C).to(zz.dtype)
    z.copy_(zz)
    if log_q is not None:
        log_q.copy_(lq.sum(-1))
    if kl is not None:
        kl.copy_(concrete_kl(logits.double(), log_p.double()).sum(-1))


def sample_concrete_backward(grad_z: Tensor | None, grad_log_q: Tensor | None, logits: Tensor, temperature: Tensor,
                             seed: int, stop_score: bool, dlogits: Tensor, grad_kl: Tensor | None = None,
                             log_p: Tensor | None = None) -> None:
    """dlogits (N, L, C) from grad_z (K, N, L, C) and grad_log_q (K, N) (None: no
    gradient), t regenerated, z the relaxed sample (hard or not: straight-through):
    sum_k (z (grad_z - <z, grad_z>) + grad_log_q h) / temperature, with
    h = C' z - 1 (plain autograd) or, with stop_score (the score through z
    only), h = C' z + C' temperature w - (temperature + 1), w = t / sum t;
    masked categories get 0. grad_kl (N,), with log_p (L, C), adds the analytic
    KL's grad_kl pi_c ((log pi_c - log p_c) - KL_l) (concrete_kl_grad)."""
    samples = grad_z if grad_z is not None else grad_log_q
    K = 0 if samples is None else samples.shape[0]
    N, L, C = logits.shape
    offsets = torch.arange(K * N * L * C, dtype=torch.int64, device=logits.device)
    t = concrete_noise(seed, offsets, accumulation_dtype(logits.dtype)).reshape(K, N, L, C)
    lam = temperature.double()
    z, _, w, count = concrete_terms(logits.double(), lam, t)
    mask = logits > -math.inf
    d = torch.zeros(K, N, L, C, dtype=torch.float64, device=logits.device)
    if grad_z is not None:
        g = grad_z.double()
        d = d + z * (g - (z * g).sum(-1, keepdim=True))
    if grad_log_q is not None:
        gq = grad_log_q.double()[:, :, None, None]
        c = count[..., None]
        h = c * z + c * lam[..., None] * w - (lam[..., None] + 1.0) if stop_score else c * z - 1.0
        d = d + gq * h
    d = torch.where(mask, d.sum(0) / lam[..., None], 0.0)
    if grad_kl is not None:
        d = d + grad_kl.double()[:, None, None] * concrete_kl_grad(logits.double(), log_p.double())[0]
    dlogits.copy_(d)


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op sample_location_scale) --

# each op's kernel prefix, parameters, families and the family of its evaluation case
_SAMPLERS = (("sample_location_scale", LOCATION_SCALE_PARAMS, LOCATION_SCALE_FAMILIES, 1),
             ("sample_positive", POSITIVE_PARAMS, POSITIVE_FAMILIES, 2))


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the family's ops make at shape s (K
    samples of B rows of L): each op's every family (a constexpr), both
    backward modes (iwae / elbo; STL and DReG) and the evaluation's layout,
    sample_location_scale's draw fused with its KL, and sample_concrete's
    launches (_concrete_aot_calls); m makes a tensor of
    the input dtype, r one of its accumulation dtype (kernels/aot.py)."""
    K, B, L = s["K"], s["B"], s["L"]
    seed = torch.empty((), dtype=torch.int64, device="meta")
    for name, (a, b), families, eval_family in _SAMPLERS:
        for family in range(len(families)):
            yield f"{name}_forward", {a: m(B, L), b: m(B, L), "seed": seed, "family": family, "offset0": 0,
                                      "sample_stride": B * L, "row_stride": L, "z": m(K, B, L), "log_q": r(K, B)}
            for stop in (False, True):
                yield f"{name}_backward", {"grad_z": m(K, B, L), "grad_log_q": r(K, B), a: m(B, L), b: m(B, L),
                                           "seed": seed, "family": family, "stop_score": stop,
                                           f"d{a}": m(B, L), f"d{b}": m(B, L)}
        # evaluation: the example-major layout of a chunk at an odd offset (the unaligned path)
        yield f"{name}_forward", {a: m(B, L), b: m(B, L), "seed": seed, "family": eval_family,
                                  "offset0": 7 * L + 1, "sample_stride": L, "row_stride": K * L, "z": m(K, B, L),
                                  "log_q": r(K, B)}
    # the ELBO's draw and KL against a prior of the posterior's family, shared (L,) or per row
    # (float32 and float64 only: the front end fuses no other dtype, LocationScale.sample_with_kl);
    # sample_positive's fused KL launches the sampler's kernels and family_kl's
    for kl_family, name in enumerate(KL_FAMILIES):
        if name not in LOCATION_SCALE_FAMILIES or m(1).dtype not in (torch.float32, torch.float64):
            continue
        family = LOCATION_SCALE_FAMILIES.index(name)
        for p_shape in ((L,), (B, L)):
            yield "sample_location_scale_kl_forward", dict(
                loc=m(B, L), log_scale=m(B, L), prior_loc=m(*p_shape), prior_log_scale=m(*p_shape), seed=seed,
                family=family, kl_family=kl_family, z=m(K, B, L), kl=r(B))
            yield "sample_location_scale_kl_backward", dict(
                grad_z=m(K, B, L), grad_kl=r(B), loc=m(B, L), log_scale=m(B, L), prior_loc=m(*p_shape),
                prior_log_scale=m(*p_shape), seed=seed, family=family, kl_family=kl_family, dloc=m(B, L),
                dlog_scale=m(B, L), dprior_loc=m(B, L), dprior_log_scale=m(B, L))
    yield from _concrete_aot_calls(s, m, r)


CATEGORIES = 16  # the aot cases' C (kernels/aot.py had it inline)


def _concrete_aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch sample_concrete makes at shape s (K samples of
    B rows of L latents): logits (B, L, C) at C = 16, plain and straight-through,
    both backward modes, and the evaluation's layout; m makes a tensor of the
    input dtype, r one of its accumulation dtype (kernels/aot.py)."""
    K, B, L, C = s["K"], s["B"], s["L"], CATEGORIES
    seed = torch.empty((), dtype=torch.int64, device="meta")
    for hard in (False, True):
        yield "sample_concrete_forward", dict(logits=m(B, L, C), temperature=m(B, L), seed=seed, hard=hard,
                                              offset0=0, sample_stride=B * L * C, row_stride=L * C,
                                              z=m(K, B, L, C), log_q=r(K, B), log_p=None, kl=None)
    for stop in (False, True):
        yield "sample_concrete_backward", dict(grad_z=m(K, B, L, C), grad_log_q=r(K, B), logits=m(B, L, C),
                                               temperature=m(B, L), seed=seed, stop_score=stop,
                                               dlogits=m(B, L, C), grad_kl=None, log_p=None)
    # the ELBO's draw with the analytic categorical KL (a OneHotCategorical prior)
    yield "sample_concrete_forward", dict(logits=m(B, L, C), temperature=m(B, L), seed=seed, hard=False,
                                          offset0=0, sample_stride=B * L * C, row_stride=L * C,
                                          z=m(K, B, L, C), log_q=r(K, B), log_p=r(L, C), kl=r(B))
    yield "sample_concrete_backward", dict(grad_z=m(K, B, L, C), grad_log_q=None, logits=m(B, L, C),
                                           temperature=m(B, L), seed=seed, stop_score=False,
                                           dlogits=m(B, L, C), grad_kl=r(B), log_p=r(L, C))
    yield "sample_concrete_forward", dict(logits=m(B, L, C), temperature=m(B, L), seed=seed, hard=False,
                                          offset0=7 * L * C + 1, sample_stride=L * C, row_stride=K * L * C,
                                          z=m(K, B, L, C), log_q=r(K, B), log_p=None, kl=None)


# -- the benchmark row (python -m benchmarks.bench_op sample_family) ---------------
# One case per family (the location-scale ones through sample_location_scale,
# the positive ones through sample_positive) at B = 65536 (--quick: 4096),
# L = 32, K = 1, float32: against torch.distributions as users write it
# (rsample, log_prob). The forward reads the two parameters and writes z,
# log q; the backward reads dz, dlog_q and the parameters and writes their
# gradients; the noise is never stored. The exponential takes no second
# parameter (None).


def _torch_distribution(family: str, loc: Tensor, scale: Tensor) -> td.Distribution:
    if family == "uniform":
        return td.Uniform(loc, loc + scale)
    if family == "logistic":  # torch has no Logistic class: its usual construction
        return td.TransformedDistribution(td.Uniform(torch.zeros_like(loc), torch.ones_like(loc)),
                                          [SigmoidTransform().inv, AffineTransform(loc, scale)])
    return {"laplace": td.Laplace, "gumbel": td.Gumbel, "cauchy": td.Cauchy}[family](loc, scale)


def _location_scale_eager(family: str, loc: Tensor, log_scale: Tensor, n_samples: int):
    """The baseline: torch.distributions' rsample and log_prob (Uniform, Laplace,
    Gumbel, Cauchy; logistic as TransformedDistribution(Uniform(0, 1),
    [sigmoid^-1, affine]))."""
    q = _torch_distribution(family, loc, torch.exp(log_scale))
    z = q.rsample((n_samples,))
    return z, q.log_prob(z).sum(-1)


def _location_scale_inputs(size: dict, device):
    B, L, K = size["B"], size["L"], size["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    loc = torch.randn(B, L, generator=g).to(device).requires_grad_()
    log_scale = (torch.randn(B, L, generator=g) * 0.3 - 0.5).to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g).to(device)
    gq = torch.randn(K, B, generator=g).to(device)
    return (size["family"], loc, log_scale, K), [loc, log_scale], (gz, gq)


def _positive_eager(family: str, p0: Tensor, p1: Tensor | None, n_samples: int):
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


def _positive_inputs(size: dict, device):
    family, B, L, K = size["family"], size["B"], size["L"], size["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    p0 = (torch.randn(B, L, generator=g) * 0.3).to(device).requires_grad_()
    p1 = (torch.randn(B, L, generator=g) * 0.3).to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g).to(device)
    gq = torch.randn(K, B, generator=g).to(device)
    if family == "exponential":
        return (family, p0, None, K), [p0], (gz, gq)
    return (family, p0, p1, K), [p0, p1], (gz, gq)


# The Concrete's cases ("family" "concrete"): relaxed and straight-through (hard) at B = 4096 (--quick: 256), L = 32,
# C = 16, K = 1, a temperature of 0.5, float32: against torch.distributions as
# users write it (RelaxedOneHotCategorical's rsample and log_prob; hard: z made
# one-hot by z + (one_hot(argmax z) - z).detach(), log q of the relaxed z). The
# forward reads the logits and writes z, log q; the backward reads dz, dlog_q
# and the logits and writes their gradient; the noise is never stored.

_BENCH_TEMPERATURE = 0.5


def _concrete_eager(logits: Tensor, hard: bool, n_samples: int):
    """The baseline: torch.distributions' rsample and log_prob."""
    q = td.RelaxedOneHotCategorical(torch.tensor(_BENCH_TEMPERATURE, device=logits.device), logits=logits)
    z = q.rsample((n_samples,))
    log_q = q.log_prob(z).sum(-1)
    if hard:
        z = z + (torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype) - z).detach()
    return z, log_q


def _concrete_call(sample_concrete, logits: Tensor, hard: bool, n_samples: int):
    """fastvae.sample_concrete with the eager formula's arguments (hard is a keyword)."""
    return sample_concrete(logits, _BENCH_TEMPERATURE, n_samples, hard=hard)


def _concrete_inputs(size: dict, device):
    B, L, C, K = size["B"], size["L"], size["C"], size["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(B, L, C, generator=g).to(device).requires_grad_()
    gz = torch.randn(K, B, L, C, generator=g).to(device)
    gq = torch.randn(K, B, generator=g).to(device)
    return (logits, size["hard"], K), [logits], (gz, gq)


def _concrete_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    B, L, C, K = size["B"], size["L"], size["C"], size["K"]
    fwd = (B * L * C + K * B * L * C + K * B) * itemsize  # logits -> z, log q
    bwd = (K * B * L * C + K * B + 2 * B * L * C) * itemsize  # dz, dlog_q, logits -> dlogits
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def _bench_eager(family: str, *args):
    """The baseline of the family's case (its op's)."""
    if family == "concrete":
        return _concrete_eager(*args)
    eager = _location_scale_eager if family in LOCATION_SCALE_FAMILIES else _positive_eager
    return eager(family, *args)


def _bench_inputs(size: dict, device):
    if size["family"] == "concrete":
        args, leaves, grads = _concrete_inputs(size, device)
        return ("concrete", *args), leaves, grads
    inputs = _location_scale_inputs if size["family"] in LOCATION_SCALE_FAMILIES else _positive_inputs
    return inputs(size, device)


def _bench_call(sample_location_scale, sample_positive, sample_concrete, family: str, *args):
    """The case's op: sample_location_scale, sample_positive for a positive
    family, sample_concrete for the Concrete."""
    if family == "concrete":
        return _concrete_call(sample_concrete, *args)
    if family in LOCATION_SCALE_FAMILIES:
        return sample_location_scale(family, *args)
    return sample_positive(family, *args)


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    """Bench.min_bytes of a family sampler at size B, L, K: the two (B, L)
    parameters in, z (K, B, L) and log q (K, B) out; their gradients in, the
    parameters read again and their gradients out (the Concrete's:
    _concrete_min_bytes)."""
    if size["family"] == "concrete":
        return _concrete_min_bytes(size, itemsize)
    B, L, K = size["B"], size["L"], size["K"]
    fwd = (2 * B * L + K * B * L + K * B) * itemsize
    bwd = (K * B * L + K * B + 2 * B * L + 2 * B * L) * itemsize
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


_FAMILIES = LOCATION_SCALE_FAMILIES + POSITIVE_FAMILIES
BENCH = Bench("sample_location_scale, sample_positive and sample_concrete (temperature 0.5), float32",
              sizes=tuple({"family": f, "B": 65536, "L": 32, "K": 1} for f in _FAMILIES)
              + tuple({"family": "concrete", "hard": hard, "B": 4096, "L": 32, "C": 16, "K": 1}
                      for hard in (False, True)),
              quick=tuple({"family": f, "B": 4096, "L": 32, "K": 1} for f in _FAMILIES)
              + tuple({"family": "concrete", "hard": hard, "B": 256, "L": 32, "C": 16, "K": 1}
                      for hard in (False, True)),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=_bench_min_bytes,
              fastvae=("sample_location_scale", "sample_positive", "sample_concrete"), call=_bench_call, repeats=15)
