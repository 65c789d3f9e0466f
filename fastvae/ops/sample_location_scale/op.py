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
from ..sample_normal.op import _MAX_OFFSET, z_dtype

FAMILIES = LOCATION_SCALE_FAMILIES  # the kernels' `family` index is the position here


def family_index(family) -> int:
    """The kernels' index of a family name, or a ValueError naming the choices."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return FAMILIES.index(family)


def _forward(loc: Tensor, log_scale: Tensor, seed: Tensor, family: int, n_samples: int) -> list[Tensor]:
    """[z (K, N, L), log_q (K, N)] for loc, log_scale (N, L) in the training layout."""
    backend = _backend.backend_for(loc.device)
    dtype = _backend.compute_dtype(loc, log_scale)
    loc2 = _backend.kernel_input(backend, flat(loc), dtype)
    ls2 = _backend.kernel_input(backend, flat(log_scale), dtype)
    N, L = loc2.shape
    # the cpp kernel writes z in its compute type: cast after (z is encoder-sized)
    z = _backend.empty_output((n_samples, N, L), like=loc,
                              dtype=dtype if backend == "cpp" else z_dtype(loc, log_scale))
    log_q = _backend.empty_output((n_samples, N), like=loc, dtype=dtype)
    _backend.launch(backend, "sample_location_scale_forward", z.numel(), loc=loc2, log_scale=ls2, seed=seed,
                    family=family, offset0=0, sample_stride=N * L, row_stride=L, z=z, log_q=log_q)
    return [_backend.in_dtype(z, z_dtype(loc, log_scale)), log_q]


def _backward(loc: Tensor, log_scale: Tensor, seed: Tensor, family: int, grad_z: Tensor | None,
              grad_log_q: Tensor | None, stop_score: bool) -> tuple[Tensor, Tensor]:
    """dloc, dlog_scale (N, L) from grad_z (K, N, L) and grad_log_q (K, N) (None: no gradient)."""
    backend = _backend.backend_for(loc.device)
    dtype = _backend.compute_dtype(loc, log_scale)
    loc2 = _backend.kernel_input(backend, flat(loc), dtype)
    ls2 = _backend.kernel_input(backend, flat(log_scale), dtype)
    grad_z, grad_log_q = (_backend.kernel_input(backend, g, dtype) for g in (grad_z, grad_log_q))
    N, L = loc2.shape
    samples = grad_z if grad_z is not None else grad_log_q
    K = 0 if samples is None else samples.shape[0]
    dloc = _backend.empty_output((N, L), like=loc2)
    dls = _backend.empty_output((N, L), like=ls2)
    _backend.launch(
        backend, "sample_location_scale_backward", max(K, 1) * N * L,
        grad_z=None if grad_z is None else grad_z.reshape(K, N, L).contiguous(),
        grad_log_q=None if grad_log_q is None else grad_log_q.reshape(K, N).contiguous(),
        loc=loc2, log_scale=ls2, seed=seed, family=family, stop_score=stop_score, dloc=dloc, dlog_scale=dls,
    )
    return _backend.in_dtype(dloc, loc.dtype), _backend.in_dtype(dls, log_scale.dtype)


def _fake(loc: Tensor, log_scale: Tensor, seed: Tensor, family: int, n_samples: int):
    dtype = _backend.compute_dtype(loc, log_scale)
    return (loc.new_empty((n_samples, *loc.shape), dtype=z_dtype(loc, log_scale)),
            loc.new_empty((n_samples, *loc.shape[:-1]), dtype=dtype))


sample_location_scale_op = define(
    "sample_location_scale(Tensor loc, Tensor log_scale, Tensor seed, int family, int n_samples)"
    " -> (Tensor, Tensor)",
    lambda loc, log_scale, seed, family, n_samples: tuple(_forward(loc, log_scale, seed, family, n_samples)),
    _fake,
)
sample_location_scale_backward_op = define(
    "sample_location_scale_backward(Tensor loc, Tensor log_scale, Tensor seed, int family, Tensor? grad_z,"
    " Tensor? grad_log_q, bool stop_score) -> (Tensor, Tensor)",
    _backward,
    lambda loc, log_scale, seed, family, grad_z, grad_log_q, stop_score: (torch.empty_like(loc),
                                                                           torch.empty_like(log_scale)),
)


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


class SampleLocationScale(torch.autograd.Function):
    """Autograd of fastvae::sample_location_scale: (z (K, ..., L), log q (K, ...)),
    saving loc and log_scale as (N, L) and the seed only. ``stop_score``
    (STL / DReG): log q's gradient reaches the parameters only along z, with
    d/dz log q = psi(e) / scale from the regenerated e."""

    @staticmethod
    def forward(ctx, loc, log_scale, seed, family, n_samples, stop_score):
        loc2, ls2 = flat(loc), flat(log_scale)
        z, log_q = run(sample_location_scale_op, loc2, ls2, seed, family, n_samples)
        ctx.save_for_backward(loc2, ls2, seed, loc, log_scale)
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.family, ctx.n_samples, ctx.stop_score = loc.shape, family, n_samples, stop_score
        return shaped(z, (n_samples, *loc.shape)), shaped(log_q, (n_samples, *loc.shape[:-1]))

    @staticmethod
    def backward(ctx, grad_z, grad_log_q):
        if grad_z is None and grad_log_q is None:
            return None, None, None, None, None, None
        loc2, ls2, seed, loc, log_scale = ctx.saved_tensors
        K = ctx.n_samples
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (*_double_backward(grad_z, grad_log_q, bool(ctx.stop_score), ctx.family, loc, log_scale, seed,
                                      K, ctx.shape), None, None, None, None)
        N, L = loc2.shape
        dloc, dls = run(sample_location_scale_backward_op, loc2, ls2, seed, ctx.family,
                        None if grad_z is None else shaped(grad_z, (K, N, L)),
                        None if grad_log_q is None else shaped(grad_log_q, (K, N)), bool(ctx.stop_score))
        return shaped(dloc, ctx.shape), shaped(dls, ctx.shape), None, None, None, None


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
    K = 1 if n_samples is None else _validate.sample_count("n_samples", n_samples, loc.numel(), loc)
    z, log_q = sample_location_scale_unchecked(index, loc, log_scale, K, False, generator)
    return (z[0], log_q[0]) if n_samples is None else (z, log_q)


def sample_location_scale_unchecked(family: int, loc: Tensor, log_scale: Tensor, n_samples: int, stop_score: bool,
                                    generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(z (K, ..., L), log q (K, ...)) for arguments the caller has validated (the latents' records)."""
    seed = draw_seed(loc.device, generator)
    return SampleLocationScale.apply(loc, log_scale, seed, family, n_samples, stop_score)


def location_scale_at(family: int, loc: Tensor, log_scale: Tensor, seed: Tensor, n_samples: int, *, offset0: int,
                      sample_stride: int, row_stride: int) -> tuple[Tensor, Tensor]:
    """(z (n_samples, N, L), log q (n_samples, N)) for loc, log_scale (N, L) at the
    noise offsets offset0 + k * sample_stride + n * row_stride + l: the
    evaluation's example-major layout, drawn where it is used. No gradient."""
    backend = _backend.backend_for(loc.device)
    dtype = _backend.compute_dtype(loc, log_scale)
    loc2 = _backend.kernel_input(backend, flat(loc.detach()), dtype)
    ls2 = _backend.kernel_input(backend, flat(log_scale.detach()), dtype)
    N, L = loc2.shape
    z = _backend.empty_output((n_samples, N, L), like=loc, dtype=dtype if backend == "cpp" else z_dtype(loc, log_scale))
    log_q = _backend.empty_output((n_samples, N), like=loc, dtype=dtype)
    if z.numel() == 0:
        return _backend.in_dtype(z, z_dtype(loc, log_scale)), log_q.zero_()
    last = offset0 + (n_samples - 1) * sample_stride + (N - 1) * row_stride + L - 1
    if min(offset0, sample_stride, row_stride) < 0 or last > _MAX_OFFSET:
        raise ValueError(f"the noise offsets run from {offset0} to {last}: they must lie in [0, 2**63 - 1]")
    _backend.launch(backend, "sample_location_scale_forward", z.numel(), loc=loc2, log_scale=ls2, seed=seed,
                    family=family, offset0=offset0, sample_stride=sample_stride, row_stride=row_stride, z=z,
                    log_q=log_q)
    return _backend.in_dtype(z, z_dtype(loc, log_scale)), log_q
