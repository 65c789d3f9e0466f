"""sample_positive's front end: reparameterized samples of the positive
inverse-CDF latent families with log q(z) from the noise that drew them,
fused; the public function, the torch.library ops and their
autograd Function (its double backward included).

Every family is a transform of the Exp(1) variate t = -log u of the element's
Philox uniform (-log1p(-v) above 1/2, so the upper tail keeps its bits):

- "exponential" (log_rate): z = t / rate, log f = log rate - t;
- "weibull" (log_scale, log_concentration k): z = scale * t^(1/k),
  log f = log k - log scale + (1 - 1/k) log t - t;
- "kumaraswamy" (log_a, log_b) on (0, 1): z = (1 - u^(1/b))^(1/a) in log
  space, log z = log(m) / a with m = -expm1(-t / b) (log1p(-e^(-t/b)) above
  t / b = log 2), log f = log a + log b + (1 - 1/a) log m - t + t / b. log q is
  taken from log z, never from z, so it is finite for every a, b; z itself is
  exp(log z) clamped into [tiny, 1 - ulp] of the compute dtype (float32:
  [2**-126, 1 - 2**-24]), which a, b in [1e-3, 1e3] reach at the extreme
  uniforms (docs/latents.md).

The custom ops ``fastvae::sample_positive`` and ``fastvae::sample_positive_backward``
take the family as an int (a compile-time variant of one C++ and one Triton
kernel pair), the two log parameters (exponential ignores the second) and the
Philox seed as a 0-d int64 tensor: the backward regenerates t and nothing of
size K x N x L is saved. The uniforms are sample_location_scale's (element i:
lane i % 4 of Philox counter i // 4, u = (x + 1/2) / 2**31 in [2**-32, 1 - 2**-32]):
t lies in [2.3e-10, 22.18], the tails clipped there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _backend, _validate, _value_checks
from ..._double_backward import _acc
from ..._families import KL_FAMILIES, POSITIVE_FAMILIES
from ..._op import define, draw_seed, flat, run, shaped
from ..._sampler import FamilySampler, family_index_of
from ..family_kl.op import FamilyKL, prior_layout

# a declared use (docs/architecture.md, "Layers"): the double backward's closed forms
from . import positive_terms

FAMILIES = POSITIVE_FAMILIES  # the kernels' `family` index is the position here
PARAMETERS = {"exponential": ("log_rate",), "weibull": ("log_scale", "log_concentration"),
              "kumaraswamy": ("log_a", "log_b")}


def family_index(family) -> int:
    """The kernels' index of a family name, or a ValueError naming the choices."""
    return family_index_of(FAMILIES, family)


SAMPLER = FamilySampler("sample_positive", ("log_p0", "log_p1"))
sample_positive_op, sample_positive_backward_op = SAMPLER.op, SAMPLER.backward_op


def _double_backward(grad_z, grad_log_q, stop_score, family, log_p0, log_p1, seed, n_samples, shape):
    """The gradients as differentiable torch ops (create_graph=True): t comes
    from the sampling op itself (exponential at log_rate = 0: z is t bit for
    bit) and enters as a constant; the oracle's positive_terms' closed forms."""
    acc = _backend.compute_dtype(log_p0, log_p1)
    zero = torch.zeros(flat(log_p0).shape, dtype=acc, device=log_p0.device)
    with torch.no_grad():
        t = run(sample_positive_op, zero, zero, seed, 0, n_samples)[0].to(acc)
    t = t.reshape(n_samples, *shape)
    p0, p1 = _acc(log_p0), _acc(log_p1)
    z, _, c0, c1, f0, f1, s0, s1 = positive_terms(family, t, torch.log(t), p0, p1, acc)
    d0 = torch.zeros_like(p0 + p1)
    d1 = torch.zeros_like(d0)
    if grad_z is not None:
        gz = _acc(grad_z).reshape(n_samples, *shape) * z
        d0, d1 = d0 + (gz * c0).sum(0), d1 + (gz * c1).sum(0)
    if grad_log_q is not None:
        gq = _acc(grad_log_q).reshape(n_samples, *shape[:-1]).unsqueeze(-1)
        d0 = d0 + (gq * (s0 if stop_score else f0)).sum(0)
        d1 = d1 + (gq * (s1 if stop_score else f1)).sum(0)
    return d0.to(log_p0.dtype), d1.to(log_p1.dtype)


# Autograd of fastvae::sample_positive: (z (K, ..., L), log q (K, ...)), saving the
# log parameters as (N, L) and the seed only; the exponential's second
# parameter is a stand-in and gets no gradient.
SamplePositive = SAMPLER.function("SamplePositive", _double_backward, stand_in_second=0)


def check_params(family: str, log_param: Tensor, log_param2: Tensor | None) -> tuple[int, Tensor, Tensor]:
    """(index, log_p0, log_p1) of a family's log parameters, checked by name
    (dtype, shape, finite values); exponential's second is a detached alias
    of log_p0 (read by no formula; not log_p0 itself, which torch.compile
    cannot trace into one Function twice)."""
    index = family_index(family)
    names = PARAMETERS[family]
    if len(names) == 1:
        if log_param2 is not None:
            raise ValueError(f"the {family} family takes one parameter ({names[0]}), got a second")
        _validate.float_tensors(**{names[0]: log_param})
        _validate.event_dim(names[0], log_param)
        _value_checks.finite_log_param(log_param, names[0])
        return index, log_param, log_param.detach()
    if log_param2 is None:
        raise ValueError(f"the {family} family takes two parameters ({', '.join(names)}), got one")
    _validate.float_tensors(**{names[0]: log_param, names[1]: log_param2})
    _validate.event_dim(names[0], log_param)
    _validate.same_shape(**{names[0]: log_param, names[1]: log_param2})
    _value_checks.finite_log_param(log_param, names[0])
    _value_checks.finite_log_param(log_param2, names[1])
    return index, log_param, log_param2


def sample_positive(
    family: str,
    log_param: Tensor,
    log_param2: Tensor | None = None,
    n_samples: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Reparameterized samples of a positive family and their log-density.

    Args:
        family: "exponential" (log_param = log rate), "weibull" (log scale,
            log concentration) or "kumaraswamy" (log a, log b), as an encoder
            outputs them.
        log_param, log_param2: (..., L) on one device (log_param2 None for
            the exponential); every finite value is valid.
        n_samples: None for one sample shaped like log_param; an int K >= 1 for (K, ..., L).
        generator: torch.Generator the Philox seed is drawn from.

    Returns:
        (z, log_q): z the family's inverse CDF of the uniforms, and log q(z)
        summed over L (shape (...) or (K, ...)) from the t that drew z. Both
        are differentiable in the log parameters; the noise is regenerated in
        the backward, never stored.
    """
    index, p0, p1 = check_params(family, log_param, log_param2)
    return SAMPLER.sample(index, p0, p1, n_samples, generator)


# (z (K, ..., L), log q (K, ...)) of (family, log_p0, log_p1, n_samples, stop_score, generator)
# for arguments the caller has validated (the latents' records)
sample_positive_unchecked = SAMPLER.unchecked


# (z (n_samples, N, L), log q (n_samples, N)) for log_p0, log_p1 (N, L) at the noise offsets
# offset0 + k * sample_stride + n * row_stride + l: the evaluation's layout. No gradient.
positive_at = SAMPLER.at


# -- the draw with the closed-form KL fused (sample_positive_kl_*) -------------------


def _kl_forward(log_p0: Tensor, log_p1: Tensor, prior_log_p0: Tensor, prior_log_p1: Tensor, seed: Tensor,
                family: int, kl_family: int, n_samples: int) -> tuple[Tensor, Tensor]:
    """(z (n_samples, N, L), kl (N,)) for q's (N, L) and the prior's (L,) or
    (N, L), one float32 or float64 dtype: the draw at the training layout's
    offsets and family_kl's closed form summed over L."""
    backend = _backend.backend_for(log_p0.device)
    N, L = log_p0.shape
    z = _backend.empty_output((n_samples, N, L), like=log_p0)
    kl = _backend.empty_output((N,), like=log_p0)
    _backend.launch(backend, "sample_positive_kl_forward", z.numel(), log_p0=log_p0, log_p1=log_p1,
                    prior_log_p0=prior_log_p0, prior_log_p1=prior_log_p1, seed=seed, family=family,
                    kl_family=kl_family, z=z, kl=kl)
    return z, kl


def _kl_backward(grad_z: Tensor | None, grad_kl: Tensor | None, log_p0: Tensor, log_p1: Tensor,
                 prior_log_p0: Tensor, prior_log_p1: Tensor, seed: Tensor, family: int, kl_family: int,
                 need_dp: bool) -> list[Tensor]:
    """[dlog_p0, dlog_p1] (N, L), the sampler's plus the KL's, then (need_dp)
    the prior's per row (N, L), whatever its layout."""
    backend = _backend.backend_for(log_p0.device)
    grads = [_backend.empty_output(log_p0.shape, like=log_p0) for _ in range(4 if need_dp else 2)]
    _backend.launch(backend, "sample_positive_kl_backward", log_p0.numel() * (1 if grad_z is None else
                                                                              grad_z.shape[0]),
                    grad_z=None if grad_z is None else grad_z.contiguous(),
                    grad_kl=None if grad_kl is None else grad_kl.contiguous(), log_p0=log_p0, log_p1=log_p1,
                    prior_log_p0=prior_log_p0, prior_log_p1=prior_log_p1, seed=seed, family=family,
                    kl_family=kl_family, dlog_p0=grads[0], dlog_p1=grads[1],
                    dprior_log_p0=grads[2] if need_dp else None, dprior_log_p1=grads[3] if need_dp else None)
    return grads


sample_positive_kl_op = define(
    "sample_positive_kl(Tensor log_p0, Tensor log_p1, Tensor prior_log_p0, Tensor prior_log_p1, Tensor seed,"
    " int family, int kl_family, int n_samples) -> (Tensor, Tensor)",
    _kl_forward,
    lambda log_p0, log_p1, prior_log_p0, prior_log_p1, seed, family, kl_family, n_samples: (
        log_p0.new_empty((n_samples, *log_p0.shape)), log_p0.new_empty(log_p0.shape[:1])),
)
sample_positive_kl_backward_op = define(
    "sample_positive_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor log_p0, Tensor log_p1,"
    " Tensor prior_log_p0, Tensor prior_log_p1, Tensor seed, int family, int kl_family, bool need_dp)"
    " -> Tensor[]",
    _kl_backward,
    lambda grad_z, grad_kl, log_p0, log_p1, prior_log_p0, prior_log_p1, seed, family, kl_family, need_dp: [
        torch.empty_like(log_p0) for _ in range(4 if need_dp else 2)],
)

_EXPONENTIAL_KL = KL_FAMILIES.index("exponential")


def _kl_parameters(kl_family: int, p0, p1, prior0, prior1) -> tuple:
    """FamilyKL's (q_loc, q_log_param, p_loc, p_log_param): the exponential's
    log-rates alone, the Kumaraswamy's and its Beta prior's pairs as (loc,
    log_param)."""
    return (None, p0, None, prior0) if kl_family == _EXPONENTIAL_KL else (p0, p1, prior0, prior1)


class SamplePositiveKL(torch.autograd.Function):
    """(z (K, ..., L), KL(q || p) (...)) of a positive family's q = (log_p0,
    log_p1) against a prior of its KL family ((prior_log_p0, prior_log_p1),
    each broadcastable to q's shape: the exponential's log-rate, or a Beta's
    (log alpha, log beta) for the Kumaraswamy), drawn and computed in one pass
    each way (fastvae::sample_positive_kl): z is SamplePositive's, the KL
    FamilyKL's, the gradients their sum, bit for bit. The exponential's second
    parameters are stand-ins (detached aliases of the first), which get no
    gradient. Saves q and the prior in the kernels' layout and the seed; a
    create_graph backward replays the two ops' Functions."""

    @staticmethod
    def forward(ctx, log_p0, log_p1, prior_log_p0, prior_log_p1, seed, family, kl_family, n_samples):
        shape = log_p0.shape
        a, b = flat(log_p0), flat(log_p1)
        _, _, p_loc, p_lp = _kl_parameters(kl_family, None, None, prior_log_p0, prior_log_p1)
        pa, pb = prior_layout(p_loc, p_lp, shape)
        if pa is None:  # the exponential: the log-rate twice (the kernels read the first alone)
            pa = pb
        z, kl = run(sample_positive_kl_op, a, b, pa, pb, seed, family, kl_family, n_samples)
        ctx.save_for_backward(a, b, pa, pb, seed, log_p0, log_p1, prior_log_p0, prior_log_p1)
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
                z, _ = SamplePositive.apply(inputs[0], inputs[1], seed, ctx.family, K, False)
                kl = FamilyKL.apply(ctx.kl_family, True, *_kl_parameters(ctx.kl_family, *inputs))
            outs = [(o, g) for o, g in ((z, grad_z), (kl, grad_kl)) if g is not None]
            wanted = [t for t, need in zip(inputs, needs) if need]
            got = iter(torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs], create_graph=True,
                                           allow_unused=True))
            grads = [next(got) if need else None for need in needs]
            return (*(torch.zeros_like(t) if need and d is None else d for t, d, need in zip(inputs, grads, needs)),
                    *none)
        N, L = a.shape
        need_dp = grad_kl is not None and (needs[2] or needs[3])
        grads = run(sample_positive_kl_backward_op, None if grad_z is None else shaped(grad_z, (K, N, L)),
                    None if grad_kl is None else shaped(grad_kl, (N,)), a, b, pa, pb, seed, ctx.family,
                    ctx.kl_family, need_dp)
        out = [shaped(grads[0], shape), shaped(grads[1], shape), None, None]
        if need_dp:  # the prior's, summed back to its shape
            out[2:] = [shaped(d, shape).sum_to_size(t.shape) for d, t in zip(grads[2:], inputs[2:])]
        return (*(d if need else None for d, need in zip(out, needs)), *none)


def sample_positive_kl_unchecked(family: int, kl_family: int, log_p0: Tensor, log_p1: Tensor, prior_log_p0: Tensor,
                                 prior_log_p1: Tensor, n_samples: int,
                                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(z (K, ..., L), KL (...)) for arguments the caller has validated (the
    latents' records): every tensor float32 or float64, one dtype and device,
    the prior's broadcastable to q's shape; the exponential's second
    parameters detached aliases of the first."""
    seed = draw_seed(log_p0.device, generator)
    return SamplePositiveKL.apply(log_p0, log_p1, prior_log_p0, prior_log_p1, seed, family, kl_family, n_samples)
