"""sample_location_scale's front end: reparameterized samples of a
location-scale latent family with log q(z) from the noise that drew them,
fused; the public function, the torch.library ops and their
autograd Function (its double backward included).

z = loc + exp(log_scale) * e with e = F^-1(u) the standardized family's
inverse CDF (uniform on (0, 1), Laplace, logistic, Gumbel, Cauchy) of the
element's Philox uniform, and log q(z) = sum_l(log f(e) - log_scale) per
sample from that e: exact however small the scale, never (z - loc) / scale
divided back out. The custom ops ``fastvae::sample_location_scale`` and
``fastvae::sample_location_scale_backward`` take the family as an int (a
compile-time variant of one C++ and one Triton kernel pair) and the Philox
seed as a 0-d int64 tensor: the backward regenerates e and nothing of size
K x N x L is saved (only loc, log_scale and the seed).

The uniforms (docs/architecture.md, "The RNG contract"): element i takes the
folded word x of lane i % 4 of Philox counter i // 4 and maps it into the
open (0, 1) as u = (x + 1/2) / 2**31 and v = 1 - u = (2**31 - 1/2 - x) / 2**31,
each from the integer (float32: in float32 arithmetic, at most 1 - 2**-24), so
u and v lie in [2**-32, 1 - 2**-32] and the tails are clipped there
(docs/latents.md gives each family's largest |e|).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _backend, _validate
from ..._double_backward import _acc
from ..._families import LOCATION_SCALE_FAMILIES
from ..._op import flat, run
from ..._sampler import FamilyKLSampler, FamilySampler, family_index_of
from ..family_kl.op import FamilyKL, prior_layout

FAMILIES = LOCATION_SCALE_FAMILIES  # the kernels' `family` index is the position here


def family_index(family) -> int:
    """The kernels' index of a family name, or a ValueError naming the choices."""
    return family_index_of(FAMILIES, family)


SAMPLER = FamilySampler("sample_location_scale", ("loc", "log_scale"))
sample_location_scale_op, sample_location_scale_backward_op = SAMPLER.op, SAMPLER.backward_op


def _score(family: int, e: Tensor) -> Tensor:
    """psi(e) = d log f / de of the standardized family, from e (the double
    backward's closed form; the kernels take it from the uniforms)."""
    if family == 0:
        return torch.zeros_like(e)
    if family == 1:
        return -torch.sign(e)
    if family == 2:
        return -torch.tanh(0.5 * e)
    if family == 3:
        return torch.expm1(-e)
    return -2.0 * e / (1.0 + e * e)


def _double_backward(grad_z, grad_log_q, stop_score, family, loc, log_scale, seed, n_samples, shape):
    """The gradients as differentiable torch ops (create_graph=True): e comes
    from the sampling op itself at loc = 0, log_scale = 0 (z is e bit for bit)
    and enters as a constant; the same closed forms as the kernels."""
    acc = _backend.compute_dtype(loc, log_scale)
    zero = torch.zeros(flat(loc).shape, dtype=acc, device=loc.device)
    with torch.no_grad():
        e = run(sample_location_scale_op, zero, zero, seed, family, n_samples)[0].to(acc)
    e = e.reshape(n_samples, *shape)
    ls = _acc(log_scale)
    s = torch.exp(ls)
    dloc = torch.zeros_like(s)
    dls = torch.zeros_like(s)
    if grad_z is not None:
        gz = _acc(grad_z).reshape(n_samples, *shape)
        dloc = dloc + gz.sum(0)
        dls = dls + s * (gz * e).sum(0)
    if grad_log_q is not None:
        gq = _acc(grad_log_q).reshape(n_samples, *shape[:-1]).unsqueeze(-1)
        if stop_score:
            psi = _score(family, e)
            score = (gq * psi).sum(0)
            dloc = dloc + torch.where(score == 0, 0.0, score * torch.exp(-ls))
            dls = dls + (gq * psi * e).sum(0)
        else:
            dls = dls - gq.sum(0).expand_as(dls)
    return dloc.to(loc.dtype), dls.to(log_scale.dtype)


# Autograd of fastvae::sample_location_scale: (z (K, ..., L), log q (K, ...)), saving
# loc and log_scale as (N, L) and the seed only; with stop_score (STL / DReG)
# d/dz log q = psi(e) / scale from the regenerated e.
SampleLocationScale = SAMPLER.function("SampleLocationScale", _double_backward)


def sample_location_scale(
    family: str,
    loc: Tensor,
    log_scale: Tensor,
    n_samples: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Reparameterized samples of a location-scale family and their log-density.

    Args:
        family: "uniform" (on (loc, loc + scale)), "laplace", "logistic",
            "gumbel" or "cauchy".
        loc, log_scale: (..., L) on one device; scale = exp(log_scale).
        n_samples: None for one sample shaped like loc; an int K >= 1 for (K, ..., L).
        generator: torch.Generator the Philox seed is drawn from.

    Returns:
        (z, log_q): z = loc + exp(log_scale) * F^-1(u), and log q(z) summed
        over L (shape (...) or (K, ...)) from the e that drew z. Both are
        differentiable in loc and log_scale; the noise is regenerated in the
        backward, never stored.
    """
    index = family_index(family)
    _validate.float_tensors(loc=loc, log_scale=log_scale)
    _validate.event_dim("loc", loc)
    _validate.same_shape(loc=loc, log_scale=log_scale)
    return SAMPLER.sample(index, loc, log_scale, n_samples, generator)


# (z (K, ..., L), log q (K, ...)) of (family, loc, log_scale, n_samples, stop_score, generator)
# for arguments the caller has validated (the latents' records)
sample_location_scale_unchecked = SAMPLER.unchecked


# (z (n_samples, N, L), log q (n_samples, N)) for loc, log_scale (N, L) at the noise offsets
# offset0 + k * sample_stride + n * row_stride + l: the evaluation's layout. No gradient.
location_scale_at = SAMPLER.at


# -- the draw with the closed-form KL fused (sample_location_scale_kl_*) -------------


# the ELBO's draw against a prior of a family with a location (family_kl's (loc,
# log_scale) against (prior_loc, prior_log_scale)): z is SampleLocationScale's, the
# KL FamilyKL's, the gradients their sum, bit for bit, in one pass each way
KL_SAMPLER = FamilyKLSampler(SAMPLER, FamilyKL.apply, prior_layout, lambda kl_family, *params: params)
SampleLocationScaleKL = KL_SAMPLER.function("SampleLocationScaleKL")

# (z (K, ..., L), KL (...)) of (family, kl_family, loc, log_scale, prior_loc,
# prior_log_scale, n_samples, generator) for arguments the caller has validated
sample_location_scale_kl_unchecked = KL_SAMPLER.unchecked
