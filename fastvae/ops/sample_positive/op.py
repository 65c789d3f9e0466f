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
from ..._op import flat, run
from ..._sampler import FamilyKLSampler, FamilySampler, family_index_of
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


_EXPONENTIAL_KL = KL_FAMILIES.index("exponential")


def _kl_parameters(kl_family: int, p0, p1, prior0, prior1) -> tuple:
    """FamilyKL's (q_loc, q_log_param, p_loc, p_log_param): the exponential's
    log-rates alone, the Weibull's and the Kumaraswamy's pairs with their
    priors' (a Weibull's, a Beta's) as (loc, log_param)."""
    return (None, p0, None, prior0) if kl_family == _EXPONENTIAL_KL else (p0, p1, prior0, prior1)


# the ELBO's draw against a prior of the family's KL (the exponential's log-rate, a
# Weibull's (log scale, log concentration) for the Weibull, or a Beta's (log alpha,
# log beta) for the Kumaraswamy): z is SamplePositive's, the KL
# FamilyKL's, the gradients their sum, bit for bit, in one pass each way. The
# exponential's second parameters are stand-ins (detached aliases of the first),
# which get no gradient
KL_SAMPLER = FamilyKLSampler(SAMPLER, FamilyKL.apply, prior_layout, _kl_parameters)
SamplePositiveKL = KL_SAMPLER.function("SamplePositiveKL")

# (z (K, ..., L), KL (...)) of (family, kl_family, log_p0, log_p1, prior_log_p0,
# prior_log_p1, n_samples, generator) for arguments the caller has validated
sample_positive_kl_unchecked = KL_SAMPLER.unchecked
