"""sample_location_scale, described once: reparameterized samples
of a location-scale latent, z = loc + exp(log_scale) * e with e = F^-1(u) the
standardized family's inverse CDF (uniform, Laplace, logistic, Gumbel, Cauchy:
LOCATION_SCALE_FAMILIES, fastvae/_families.py, whose position is the kernels'
``family``) of the element's Philox uniform, and log q(z) =
sum_l(log f(e) - log_scale) from the same e.

The op's description and its oracle, from the uniforms of
fastvae/_philox.py (fastvae/ops/__init__.py lists the folder's files).
"""
from __future__ import annotations

import math

import torch
import torch.distributions as td
from torch import Tensor
from torch.distributions.transforms import AffineTransform, SigmoidTransform

from ..._dtypes import accumulation_dtype
from ..._families import KL_FAMILIES, LOCATION_SCALE_FAMILIES
from ..._philox import HALF_WORD, open_uniforms, philox_word
from ..._spec import Bench, Op, family_sampler_kernels, family_sampler_kl_kernels, family_sampler_min_bytes
from ..family_kl import family_kl_backward, family_kl_forward

# `family` picks the standardized inverse CDF (LOCATION_SCALE_FAMILIES), a
# compile-time variant in the C++ and Triton kernels; then the training
# layout's draw with family_kl's closed form of (loc, log_scale) against a
# prior of a family with a location ((L,) or (N, L)), summed over L: one pass
# over q each way
PARAMS = ("loc", "log_scale")
KERNELS = family_sampler_kernels("sample_location_scale", PARAMS) + family_sampler_kl_kernels(
    "sample_location_scale", PARAMS)

OP = Op("sample_location_scale", tuple(k.name for k in KERNELS),
        "fastvae/ops/sample_location_scale/test_sample_location_scale.py", "sample_location_scale",
        launches=(1, 1, 1))


# -- the oracle ------------------------------------------------------------------


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


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op sample_location_scale)


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (K samples of
    B rows of L): every family (a constexpr) as the objectives launch it, and
    the evaluation's layout; m makes a tensor of the input dtype, r one of its
    accumulation dtype (kernels/aot.py)."""
    K, B, L = s["K"], s["B"], s["L"]
    seed = torch.empty((), dtype=torch.int64, device="meta")
    for family in range(len(LOCATION_SCALE_FAMILIES)):
        yield "sample_location_scale_forward", dict(loc=m(B, L), log_scale=m(B, L), seed=seed, family=family,
                                                    offset0=0, sample_stride=B * L, row_stride=L, z=m(K, B, L),
                                                    log_q=r(K, B))
        for stop in (False, True):  # iwae / elbo; STL and DReG
            yield "sample_location_scale_backward", dict(grad_z=m(K, B, L), grad_log_q=r(K, B), loc=m(B, L),
                                                         log_scale=m(B, L), seed=seed, family=family,
                                                         stop_score=stop, dloc=m(B, L), dlog_scale=m(B, L))
    # the ELBO's draw and KL against a prior of the posterior's family, shared (L,) or per row
    # (float32 and float64 only: the front end fuses no other dtype, LocationScale.sample_with_kl)
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
    # evaluation: the example-major layout of a chunk at an odd offset (the unaligned path)
    yield "sample_location_scale_forward", dict(loc=m(B, L), log_scale=m(B, L), seed=seed, family=1,
                                                offset0=7 * L + 1, sample_stride=L, row_stride=K * L,
                                                z=m(K, B, L), log_q=r(K, B))


# -- the benchmark row (python -m benchmarks.bench_op sample_location_scale) ------
# One case per family at B = 65536 (--quick: 4096), L = 32, K = 1, float32:
# against torch.distributions as users write it (rsample, log_prob). The
# forward reads loc, log_scale and writes z, log q; the backward reads dz,
# dlog_q, loc, log_scale and writes dloc, dlog_scale; the noise is never stored.


def _torch_distribution(family: str, loc: Tensor, scale: Tensor) -> td.Distribution:
    if family == "uniform":
        return td.Uniform(loc, loc + scale)
    if family == "logistic":  # torch has no Logistic class: its usual construction
        return td.TransformedDistribution(td.Uniform(torch.zeros_like(loc), torch.ones_like(loc)),
                                          [SigmoidTransform().inv, AffineTransform(loc, scale)])
    return {"laplace": td.Laplace, "gumbel": td.Gumbel, "cauchy": td.Cauchy}[family](loc, scale)


def _bench_eager(family: str, loc: Tensor, log_scale: Tensor, n_samples: int):
    """The baseline: torch.distributions' rsample and log_prob (Uniform, Laplace,
    Gumbel, Cauchy; logistic as TransformedDistribution(Uniform(0, 1),
    [sigmoid^-1, affine]))."""
    q = _torch_distribution(family, loc, torch.exp(log_scale))
    z = q.rsample((n_samples,))
    return z, q.log_prob(z).sum(-1)


def _bench_inputs(size: dict, device):
    B, L, K = size["B"], size["L"], size["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    loc = torch.randn(B, L, generator=g).to(device).requires_grad_()
    log_scale = (torch.randn(B, L, generator=g) * 0.3 - 0.5).to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g).to(device)
    gq = torch.randn(K, B, generator=g).to(device)
    return (size["family"], loc, log_scale, K), [loc, log_scale], (gz, gq)


BENCH = Bench("sample_location_scale, float32",
              sizes=tuple({"family": f, "B": 65536, "L": 32, "K": 1} for f in LOCATION_SCALE_FAMILIES),
              quick=tuple({"family": f, "B": 4096, "L": 32, "K": 1} for f in LOCATION_SCALE_FAMILIES),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=family_sampler_min_bytes,
              fastvae="sample_location_scale",
              repeats=15)
