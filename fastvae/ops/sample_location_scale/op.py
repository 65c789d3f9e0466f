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
from ..._op import define, draw_seed, flat, run, shaped
from ..._sampler import FamilySampler, family_index_of
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


def _kl_forward(loc: Tensor, log_scale: Tensor, prior_loc: Tensor, prior_log_scale: Tensor, seed: Tensor,
                family: int, kl_family: int, n_samples: int) -> tuple[Tensor, Tensor]:
    """(z (n_samples, N, L), kl (N,)) for q's (N, L) and the prior's (L,) or
    (N, L), one float32 or float64 dtype: the draw at the training layout's
    offsets and family_kl's closed form summed over L."""
    backend = _backend.backend_for(loc.device)
    N, L = loc.shape
    z = _backend.empty_output((n_samples, N, L), like=loc)
    kl = _backend.empty_output((N,), like=loc)
    _backend.launch(backend, "sample_location_scale_kl_forward", z.numel(), loc=loc, log_scale=log_scale,
                    prior_loc=prior_loc, prior_log_scale=prior_log_scale, seed=seed, family=family,
                    kl_family=kl_family, z=z, kl=kl)
    return z, kl


def _kl_backward(grad_z: Tensor | None, grad_kl: Tensor | None, loc: Tensor, log_scale: Tensor, prior_loc: Tensor,
                 prior_log_scale: Tensor, seed: Tensor, family: int, kl_family: int,
                 need_dp: bool) -> list[Tensor]:
    """[dloc, dlog_scale] (N, L), the sampler's plus the KL's, then (need_dp)
    the prior's per row (N, L), whatever its layout."""
    backend = _backend.backend_for(loc.device)
    grads = [_backend.empty_output(loc.shape, like=loc) for _ in range(4 if need_dp else 2)]
    _backend.launch(backend, "sample_location_scale_kl_backward", loc.numel() * (1 if grad_z is None else
                                                                                 grad_z.shape[0]),
                    grad_z=None if grad_z is None else grad_z.contiguous(),
                    grad_kl=None if grad_kl is None else grad_kl.contiguous(), loc=loc, log_scale=log_scale,
                    prior_loc=prior_loc, prior_log_scale=prior_log_scale, seed=seed, family=family,
                    kl_family=kl_family, dloc=grads[0], dlog_scale=grads[1],
                    dprior_loc=grads[2] if need_dp else None, dprior_log_scale=grads[3] if need_dp else None)
    return grads


sample_location_scale_kl_op = define(
    "sample_location_scale_kl(Tensor loc, Tensor log_scale, Tensor prior_loc, Tensor prior_log_scale, Tensor seed,"
    " int family, int kl_family, int n_samples) -> (Tensor, Tensor)",
    _kl_forward,
    lambda loc, log_scale, prior_loc, prior_log_scale, seed, family, kl_family, n_samples: (
        loc.new_empty((n_samples, *loc.shape)), loc.new_empty(loc.shape[:1])),
)
sample_location_scale_kl_backward_op = define(
    "sample_location_scale_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor loc, Tensor log_scale,"
    " Tensor prior_loc, Tensor prior_log_scale, Tensor seed, int family, int kl_family, bool need_dp) -> Tensor[]",
    _kl_backward,
    lambda grad_z, grad_kl, loc, log_scale, prior_loc, prior_log_scale, seed, family, kl_family, need_dp: [
        torch.empty_like(loc) for _ in range(4 if need_dp else 2)],
)


class SampleLocationScaleKL(torch.autograd.Function):
    """(z (K, ..., L), KL(q || p) (...)) of a location-scale family's q =
    (loc, log_scale) against a prior of a family with a location ((prior_loc,
    prior_log_scale), each broadcastable to q's shape), drawn and computed in
    one pass each way (fastvae::sample_location_scale_kl): z is
    SampleLocationScale's, the KL FamilyKL's, the gradients their sum, bit
    for bit. Saves q and the prior in the kernels' layout and the seed; a
    create_graph backward replays the two ops' Functions."""

    @staticmethod
    def forward(ctx, loc, log_scale, prior_loc, prior_log_scale, seed, family, kl_family, n_samples):
        shape = loc.shape
        a, b = flat(loc), flat(log_scale)
        pa, pb = prior_layout(prior_loc, prior_log_scale, shape)
        z, kl = run(sample_location_scale_kl_op, a, b, pa, pb, seed, family, kl_family, n_samples)
        ctx.save_for_backward(a, b, pa, pb, seed, loc, log_scale, prior_loc, prior_log_scale)
        ctx.set_materialize_grads(False)
        ctx.family, ctx.kl_family, ctx.n_samples, ctx.shape = family, kl_family, n_samples, shape
        return shaped(z, (n_samples, *shape)), shaped(kl, shape[:-1])

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        none = (None,) * 4
        if grad_z is None and grad_kl is None:
            return (None,) * 4 + none
        a, b, pa, pb, seed, *inputs = ctx.saved_tensors
        needs, K, shape = ctx.needs_input_grad[:4], ctx.n_samples, ctx.shape
        if torch.is_grad_enabled():  # create_graph=True: the two ops' Functions, whose gradients have a graph
            with torch.enable_grad():
                z, _ = SampleLocationScale.apply(inputs[0], inputs[1], seed, ctx.family, K, False)
                kl = FamilyKL.apply(ctx.kl_family, True, *inputs)
            outs = [(o, g) for o, g in ((z, grad_z), (kl, grad_kl)) if g is not None]
            wanted = [t for t, need in zip(inputs, needs) if need]
            got = iter(torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs], create_graph=True,
                                           allow_unused=True))
            grads = [next(got) if need else None for need in needs]
            return (*(torch.zeros_like(t) if need and d is None else d for t, d, need in zip(inputs, grads, needs)),
                    *none)
        N, L = a.shape
        need_dp = grad_kl is not None and (needs[2] or needs[3])
        grads = run(sample_location_scale_kl_backward_op, None if grad_z is None else shaped(grad_z, (K, N, L)),
                    None if grad_kl is None else shaped(grad_kl, (N,)), a, b, pa, pb, seed, ctx.family,
                    ctx.kl_family, need_dp)
        out = [shaped(grads[0], shape), shaped(grads[1], shape), None, None]
        if need_dp:  # the prior's, summed back to its shape
            out[2:] = [shaped(d, shape).sum_to_size(t.shape) for d, t in zip(grads[2:], inputs[2:])]
        return (*(d if need else None for d, need in zip(out, needs)), *none)


def sample_location_scale_kl_unchecked(family: int, kl_family: int, loc: Tensor, log_scale: Tensor,
                                       prior_loc: Tensor, prior_log_scale: Tensor, n_samples: int,
                                       generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(z (K, ..., L), KL (...)) for arguments the caller has validated (the
    latents' records): every tensor float32 or float64, one dtype and device,
    the prior's broadcastable to q's shape."""
    seed = draw_seed(loc.device, generator)
    return SampleLocationScaleKL.apply(loc, log_scale, prior_loc, prior_log_scale, seed, family, kl_family,
                                       n_samples)
