"""The training objectives users call: fastvae.elbo and fastvae.iwae (and their
*_terms variants for logging), built from the fused ops.

Both take the encoder's output (mu, logvar) for x and a decode callable, and
return a bound on log p(x) (higher is better; minimize its negative). Noise is
drawn inside sample_normal from a seed taken from torch's generator, so
torch.manual_seed / generator= make a call repeatable, and nothing of size
K x B x L is stored for the backward.
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from . import _backend, _op, _plan, _plan_ops, _registry, _validate
from ._decoder import DECODER_DOCS, call_user, check_likelihood, decoder_log_prob, note_call, posterior_args
from ._double_backward import DREG_MESSAGE
from ._double_backward import dreg_once as _dreg_once
from ._families import KL_FAMILIES, POSITIVE_FAMILIES
from ._op import draw_seed
from ._sampler import z_dtype
from ._value_checks import settled as _checks_settled
from .distributions import DiagonalNormal, TrilNormal, sample_tril_with_log_q, widened
from .latents import (
    HIGH,
    LATENTS,
    LOG_SCALE,
    SCALE,
    LogNormal,
    check_normal_transform_scale,
    check_torch_scale,
    location_scale_form,
    log_scale_of,
    normal_transform_class,
    normal_transform_prior,
    normal_transform_record,
    normal_transform_scale,
    positive_form,
    stick_breaking,
)
from .ops.family_kl.op import FamilyKL, prior_layout
from .ops.kl_normal.op import kl_normal
from .ops.logmeanexp.op import (
    EffectiveSampleSize,
    ImportanceWeights,
    importance_weights_from_state,
    logmeanexp_with_state,
)
from .ops.sample_family.op import SampleLocationScale, SamplePositive, location_scale_index
from .ops.sample_normal.op import (
    sample_normal_of_scale_unchecked,
    sample_normal_unchecked,
    sample_normal_with_ratio_unchecked,
)
from .ops.sample_normal_tril.op import SampleNormalTril
from .priors import StandardNormal, analytic_kl, check_prior, has_analytic_kl, log_ratio_to_standard

REDUCTIONS = ("mean", "sum", "none")
ESTIMATORS = ("iwae", "dreg", "stl")


class ELBOTerms(NamedTuple):
    """What fastvae.elbo_terms returns, every field reduced like the bound.
    ``bound`` is the field's name in IWAETerms too; ``elbo`` is a deprecated
    alias of it."""

    bound: Tensor  # the ELBO, reconstruction - beta * kl
    reconstruction: Tensor  # E_q[log p(x | z)], averaged over the n_samples draws
    kl: Tensor  # the KL term as it enters the bound: after free bits, before beta
    # the analytic KL of each latent dimension (before free bits and beta), shape
    # (L,) reduced over the batch, (..., L) for reduction="none": the
    # posterior-collapse diagnostic (a dimension near 0 carries no information);
    # for a Concrete posterior against a relaxed prior, the Monte Carlo KL of
    # each latent (log q - log p of the same samples, averaged over them);
    # None where the KL does not split by dimension (a full-covariance posterior,
    # a mixture prior, another Monte Carlo KL)
    kl_per_dim: Tensor | None
    # True where the KL is the closed form (diagonal or full-covariance q against
    # a standard or diagonal prior), False where it is the Monte Carlo estimate
    # log q(z) - log p(z) from the same samples as the reconstruction
    kl_analytic: bool

    @property
    def elbo(self) -> Tensor:
        """Deprecated: the bound's old name here; use ``.bound``, as in IWAETerms.
        Warns in eager mode; under torch.compile, which cannot trace a warning
        with fullgraph=True, it is a plain alias."""
        if not _backend.compiling():
            warnings.warn("ELBOTerms.elbo is deprecated: use .bound (the name IWAETerms uses too)",
                          DeprecationWarning, stacklevel=2)
        return self.bound


class IWAETerms(NamedTuple):
    """What fastvae.iwae_terms returns, every field reduced like the bound
    except log_weights, which is always the per-sample (k, ...) tensor."""

    bound: Tensor  # the IWAE (alpha = 0) or Renyi bound
    reconstruction: Tensor  # mean over the k samples of log p(x | z_k)
    # KL(q(z|x) || p(z)): analytic where registered, else the mean of log q - log p
    # over the k samples; the bound does not use it
    kl: Tensor
    ess: Tensor  # effective sample size of the k importance weights, in [1, k]
    # log p(x | z_k) + beta (log p(z_k) - log q(z_k | x)) (beta = 1: log p(x, z_k) - log q(z_k | x)), shape (k, ...)
    log_weights: Tensor


# -- argument checks -----------------------------------------------------------


def _check_inputs(x: Tensor, q: DiagonalNormal | TrilNormal, reduction: Any, likelihood: Any = None) -> None:
    _validate.data_tensor("x", x, likelihood)  # integer x: class indices or counts
    _validate.event_dim("x", x)
    mu = q.mu
    batch = mu.shape[:-1]
    if x.dim() <= len(batch) or x.shape[:len(batch)] != batch:
        raise ValueError(
            f"x must have mu's batch shape {tuple(batch)} followed by its event shape (e.g. (C, H, W) "
            f"for images): x has shape {tuple(x.shape)}, mu has shape {tuple(mu.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _validate.nonempty_batch("x", x.shape, batch, reduction)


def _check_decode(decode: Any) -> None:
    # inline, not _validate.callable_arg: dynamo traces this line, and a call
    # into _validate would add guards on that module to every compiled step
    if not callable(decode):
        raise TypeError(f"decode must be callable (z -> decoder output), got {type(decode).__name__}")


def _reduce(t: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return t.mean()
    if reduction == "sum":
        return t.sum()
    return t


@functools.lru_cache(maxsize=64)
def _difference_divisors(shape: torch.Size, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2, *shape): n, then -n. Made once per shape (never written to)."""
    return torch.stack((torch.full(shape, n, dtype=dtype, device=device),
                        torch.full(shape, -n, dtype=dtype, device=device)))


class _ReducedDifference(torch.autograd.Function):
    """(a - b).mean() or .sum() (n = a.numel() or 1), whose backward is one
    division, g / (n, -n), that gives both gradients as two contiguous rows of
    one tensor: autograd's own backward of sub and mean is two launches (the
    mean's division, then the sub's negation), and on the CUDA path every
    launch costs host time."""

    @staticmethod
    def forward(ctx, a, b, n):
        ctx.n, ctx.shape = n, a.shape
        d = a - b
        return d.mean() if n > 1 else d.sum()

    @staticmethod
    def backward(ctx, g):
        both = g / _difference_divisors(ctx.shape, ctx.n, g.dtype, g.device)
        return both[0], both[1], None


def _reduced_difference(a: Tensor, b: Tensor, reduction: str) -> Tensor:
    """reduce(a - b): one launch fewer on the Triton backend (_ReducedDifference),
    plain torch elsewhere (a Python Function costs more host time on the CPU
    than the launch it saves) and while torch.compile traces (Inductor fuses it)."""
    if (reduction == "none" or a.shape != b.shape or a.dtype != b.dtype or _backend.compiling()
            or _backend.backend_for(a.device, warn=False) != "triton"):
        return _reduce(a - b, reduction)
    return _ReducedDifference.apply(a, b, a.numel() if reduction == "mean" else 1)


# -- the lean path (fastvae/_plan.py) ---------------------------------------------------

_LEAN_DTYPES = (torch.float32, torch.float64)
# the likelihoods whose op the plans fuse into their tail (the registry says which)
_LEAN_LIKELIHOODS = tuple(_registry.PLAN_TAILS)
# The cpp backend's plan is the checks alone, once per call signature: after
# them its C++ operators are already the short path to the kernels.
_LEAN_BACKENDS = ("triton", "cpp")


def _lean_device(x: Any, mu: Any, logvar: Any, decode: Any, prior: Any, generator: Any,
                 likelihood: Any, reduction: Any) -> tuple[torch.device, bool] | None:
    """(mu's device, whether the triton backend serves it, whether autocast is
    on) when this call can take the plans (fastvae/_plan.py): the triton or cpp
    backend in eager mode, tensors (x, mu, logvar) of one float32 or float64
    dtype and device, or under autocast on their device float32 x and a float32
    or half-precision encoder, x contiguous and without a gradient (mu and
    logvar may be strided: an encoder's halves, h.chunk(2, -1)), the standard normal prior, a
    "bernoulli" or "gaussian" likelihood; else None (the general path, which
    checks the arguments and says what is wrong). Its callers take
    _compiled_elbo / _compiled_iwae while torch.compile traces. The backend is part of the plan key, since
    set_backend can change it between calls."""
    if (not _plan.ENABLED or type(mu) is not Tensor or type(logvar) is not Tensor
            or type(x) is not Tensor or prior is not None or likelihood not in _LEAN_LIKELIHOODS
            or reduction not in REDUCTIONS or not callable(decode)
            or (generator is not None and type(generator) is not torch.Generator)):
        return None
    device = mu.device
    kind = device.type
    backend = _backend._chosen.get(kind) or _backend.backend_for(device, warn=False)
    if (backend not in _LEAN_BACKENDS or torch._C._get_tracing_state() is not None
            or torch._C._are_functorch_transforms_active() or _wrapped(mu) or _wrapped(logvar) or _wrapped(x)):
        return None
    dtype = mu.dtype
    if (logvar.dtype is not dtype or x.device != device or logvar.device != device or x.requires_grad
            or not x.is_contiguous()):
        return None
    if torch._C._is_any_autocast_enabled():
        # autocast on the tensors' device, float32 data x, and an encoder in float32
        # or half precision: z and the KL in float32 (sample_normal's z_dtype);
        # anything else (autocast on another device, float64) takes the general path
        if (kind not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(kind) or x.dtype is not torch.float32
                or dtype not in _AUTOCAST_ENCODER_DTYPES):
            return None
        return device, backend == "triton", True
    if dtype not in _LEAN_DTYPES or x.dtype is not dtype:
        return None
    return device, backend == "triton", False


_AUTOCAST_DEVICES = ("cpu", "cuda")
_AUTOCAST_ENCODER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _lean_beta(beta: Any) -> float | None:
    """beta as a float when it is a Python number (validated: the general
    path's error otherwise), None for a tensor (the general path)."""
    if type(beta) is not float:
        if type(beta) is not int:
            return None
        beta = float(beta)
    if not 0.0 <= beta < math.inf:
        _validate.real("beta", beta, minimum=0.0)
    return beta


def _lean_dtypes(mu: Tensor, x: Tensor, device: torch.device, autocast: bool) -> tuple[torch.dtype, torch.dtype]:
    """(the compute dtype: z's, the KL's, the bound's; the decoder output's
    dtype the tail plan expects): mu's dtype for both, or under autocast
    float32 and autocast's dtype (what a decoder's autocast matmul returns;
    an output of another dtype takes the general tail)."""
    if not autocast:
        return mu.dtype, mu.dtype
    return _backend.compute_dtype(mu, x), torch.get_autocast_dtype(device.type)


def _general_elbo_tail(x: Tensor, out: Any, kl: Tensor, likelihood: str, beta: float, reduction: str,
                       n_samples: int = 1) -> Tensor:
    """The bound from the decoder output of n_samples samples, composed of the
    ops: what _plan.ElboTail fuses (one sample), its create_graph replay, and
    the tail wherever the tail plan does not apply."""
    reconstruction = _reconstruction(x, out, likelihood, n_samples, kl.dim())
    return _reduced_difference(reconstruction, kl if beta == 1.0 else beta * kl, reduction)


def _reconstruction(x: Tensor, out: Any, likelihood: str, n_samples: int, batch_dims: int) -> Tensor:
    """log p(x | z) of the decoder output, averaged over its n_samples samples
    (its first dimension) when there are several: the ELBO's reconstruction term."""
    reconstruction = decoder_log_prob(x, out, likelihood, () if n_samples == 1 else (n_samples,), batch_dims)
    return reconstruction.mean(0) if n_samples > 1 else reconstruction


def _general_iwae_tail(x: Tensor, out: Any, latent: Tensor, likelihood: str, reduction: str,
                       dreg_z: Tensor | None = None) -> Tensor:
    """The IWAE bound (alpha = 0) from the decoder output and the latent term,
    composed of the ops: _plan.IwaeTail's create_graph replay, and the tail
    wherever the tail plan does not apply (with DReG's hook on ``dreg_z``)."""
    dreg = dreg_z is not None and dreg_z.requires_grad  # no gradient, no hook (as _dreg_z_scale)
    bound, *scale = _iwae_tail(x, out, latent, None, likelihood, reduction, False, dreg)
    if dreg:
        _dreg_hooks(dreg_z, latent, scale[0])
    return bound


class _Scale(NamedTuple):
    """A torch posterior's scale in logvar's place (elbo's calls that the eager
    C++ operator serves, _backend.torch_ops): sample_normal_of_scale takes it
    as it is, two torch ops each way fewer than its logvar; ``logvar()`` forms
    that logvar, 2 log(scale), where the call goes elsewhere. ``exp_z``: a
    LogNormal's, whose exp the sampler takes too, the decoder given being
    the user's; ``decode_y`` is then the decoder of the draw y, decode(exp(y)),
    for the paths that form the logvar."""

    scale: Tensor
    exp_z: bool = False
    decode_y: Any = None

    def logvar(self) -> Tensor:
        return 2.0 * torch.log(self.scale)


# False: a torch posterior's logvar is formed in torch on every path
# (benchmarks/bench_families.py --scale-ab times both)
SCALE_FORM = True


def _takes_scale(loc: Tensor, scale: Tensor, of_scale: bool) -> bool:
    """Whether a torch posterior's scale goes on as a _Scale: ``of_scale``
    (elbo's call) and the C++ operator serves (loc, scale)."""
    return of_scale and SCALE_FORM and _backend.torch_ops(loc, scale) is not None


def _standard_normal_call(mu: Any, logvar: Any, decode: Any, prior: Any, of_scale: bool = False) -> tuple | None:
    """(mu, logvar, decode, None) when a call is the Gaussian's against the
    standard normal prior in another form than (x, mu, logvar, decode) with
    no prior: q a torch Normal, an Independent(Normal, 1) or a DiagonalNormal
    (the (x, q, decode) form, decode in logvar's place), or a prior that is
    N(0, I) given as a torch Normal or a DiagonalNormal. The call then goes
    on as the default prior's: to the plans, and to the general path where
    they decline (which makes the same logvar, 2 log(scale), from a torch
    Normal; with ``of_scale``, a _Scale where _takes_scale says so).
    None for anything else (unchanged)."""
    if type(mu) is Tensor:
        if prior is None or not _standard_normal_prior(prior, mu.shape[-1:], mu.device):
            return None
        return mu, logvar, decode, None
    if decode is not None:
        return None
    q = mu.base_dist if type(mu) is Independent and mu.reinterpreted_batch_ndims == 1 else mu
    if type(q) is DiagonalNormal:
        loc, log_variance = q.mu, q.logvar
    elif type(q) is Normal and type(q.loc) is Tensor:
        loc, log_variance = q.loc, None
    else:
        return None
    if loc.dim() == 0 or (prior is not None and not _standard_normal_prior(prior, loc.shape[-1:], loc.device)):
        return None
    if log_variance is None:  # torch_posterior's logvar (the general path's, and its gradient)
        log_variance = _Scale(q.scale) if _takes_scale(loc, q.scale, of_scale) else 2.0 * torch.log(q.scale)
    return loc, log_variance, logvar, None


def _gaussian_call(mu: Any, logvar: Any, decode: Any, prior: Any, of_scale: bool = False) -> tuple:
    """elbo's and iwae's (mu, logvar, decode, prior), read as the Gaussian's
    call where one is: a LogNormal / LogisticNormal posterior's, on its
    normals (_normal_transform_call); the plans' form of a standard normal
    call (_standard_normal_call), which the general path takes too if they
    decline; else the arguments unchanged. ``of_scale`` (elbo's): a torch
    posterior's scale may come as a _Scale in logvar's place (_takes_scale)."""
    if type(mu) is not Tensor and decode is None and (
            normal := _normal_transform_call(mu, logvar, prior, of_scale)) is not None:
        return normal
    normal = _standard_normal_call(mu, logvar, decode, prior, of_scale)
    return (mu, logvar, decode, prior) if normal is None else normal


def _normal_transform_call(q: Any, decode: Any, prior: Any, of_scale: bool = False) -> tuple | None:
    """(mu, logvar, decode', prior') when a call (x, q, decode) is a LogNormal
    or LogisticNormal posterior's (a record, or the torch object from_torch
    maps to one) against a prior of its own family whose underlying normal is
    over (L,) (parameters of shape (), (1,) or (L,); 0-d ones on any device):
    the Gaussian's call on the underlying normals, y ~ N(mu, diag(exp(logvar))),
    with decode' = decode(T(y)) (T = exp, or the stick-breaking) and prior'
    the prior's normal (None for N(0, I), read as _standard_normal_prior
    reads; else a DiagonalNormal of shape (L,)). The transform is a
    bijection, so KL(q || p) is the normals' KL, and log q(z) - log p(z) is
    log q(y) - log p(y) (the log-Jacobians cancel): the bound, its value and
    its gradients, is the general path's, which the Gaussian's plans and
    fused ops then serve (no log-Jacobian, no log p(z) of z). None for
    anything else (unchanged: the general path, which says what is wrong)."""
    if (transform := normal_transform_class(q)) is None or not callable(decode) or prior is None \
            or (p := normal_transform_prior(prior, transform)) is None:
        return None
    p_loc, p_b, p_scale = p
    if (given := normal_transform_scale(q)) is not None and _takes_scale(*given, of_scale):
        check_normal_transform_scale(given[1], transform)  # the record's check, without its logvar
        mu, logvar = given[0], _Scale(given[1])
    else:
        record = normal_transform_record(q)
        mu, logvar = record.mu, record.logvar
    L = mu.shape[-1]
    device = mu.device
    if any(type(t) not in _backend.PLAIN_TYPES or t.dim() > 1 or t.shape not in ((), (1,), (L,))
           or (t.dim() and t.device != device) for t in (p_loc, p_b)):
        return None
    T = torch.exp if transform is LogNormal else stick_breaking

    def transformed(y: Tensor) -> Any:
        return decode(T(y))

    if _standard_normal_prior(prior, mu.shape[-1:], device, transform):
        if type(logvar) is _Scale and transform is LogNormal:  # z = exp(y) from the sampler itself
            return mu, logvar._replace(exp_z=True, decode_y=transformed), decode, None
        return mu, logvar, transformed, None
    if type(logvar) is _Scale:  # another prior: the general path, which takes the logvar
        logvar = logvar.logvar()
    if p_loc.dim() == 0 and p_b.dim() == 0:  # as _torch_prior: a scalar prior follows the latents' device
        p_loc, p_b = p_loc.to(device), p_b.to(device)
    p_logvar = 2.0 * torch.log(widened(p_b)[0]) if p_scale else p_b
    return mu, logvar, transformed, DiagonalNormal(p_loc.expand(L), p_logvar.expand(L))


# the priors found to be N(0, I) (or not), with their parameters' versions. A
# prior built once is read once (on a GPU a host sync), and again only after
# an in-place write. Parameters off the CPU are read at a prior's second call
# only: a prior made anew in every call (whose first call is its last) would
# otherwise stall the GPU's queue on every call; it keeps the general path.
_STANDARD_PRIORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _standard_normal_prior(prior: Any, latent: torch.Size, device: torch.device,
                           transform: type | None = None) -> bool:
    """Whether ``prior`` is N(0, I) over latents of shape ``latent`` (L,) on
    ``device`` with no gradient to its parameters: StandardNormal, or a torch
    Normal / Independent(Normal, 1) or DiagonalNormal whose parameters
    broadcast to (L,), sit on the latents' device (0-d ones anywhere, as the
    general path takes them) and are zeros (loc, logvar) and ones (scale).
    With ``transform`` (LogNormal or LogisticNormal): whether the prior is of
    that family with N(0, I) underneath (a record of zeros, torch's
    LogNormal(0, 1) / LogisticNormal(0, 1)), by the same rules.
    Under torch.compile only StandardNormal (reading the values would break
    the graph)."""
    if transform is not None:
        if (p := normal_transform_prior(prior, transform)) is None:
            return False
        params, ones = p[:2], p[2]
    elif type(prior) is StandardNormal:
        return True
    else:
        base = prior.base_dist if type(prior) is Independent and prior.reinterpreted_batch_ndims == 1 else prior
        if type(base) is Normal:
            params, ones = (base.loc, base.scale), True
        elif type(base) is DiagonalNormal:
            params, ones = (base.mu, base.logvar), False
        else:
            return False
    if (_backend.compiling() or any(type(t) not in _backend.PLAIN_TYPES or t.requires_grad or t.dim() > 1
                                    or t.shape not in ((), (1,), latent) or (t.dim() and t.device != device)
                                    for t in params)):
        return False
    versions = tuple((id(t), t._version) for t in params)
    seen = _STANDARD_PRIORS.get(prior)
    if seen is not None and seen[0] == versions and seen[1] is not None:
        return seen[1]
    if seen is None and any(t.device.type != "cpu" for t in params):
        _STANDARD_PRIORS[prior] = (versions, None)  # seen once: read at its next call
        return False
    standard = not bool(params[0].any()) and bool((params[1] == 1 if ones else params[1] == 0).all())
    _STANDARD_PRIORS[prior] = (versions, standard)
    return standard


def _gaussian_plans(x: Tensor, mu: Tensor, logvar: Tensor, decode: Any, likelihood: Any, reduction: Any,
                    count_name: str, count: int, device: torch.device, triton: bool, autocast: bool, iwae: bool,
                    stop_score: bool) -> tuple[int, Any, Any]:
    """The general path's checks of a Gaussian elbo (iwae False) or iwae call,
    and its plans: (the checked sample count, the SamplePlan, the TailPlan).
    The cpp backend gets no plans (the checks are its plan); the TailPlan is
    None where the general tail runs (no example, or several ELBO samples)."""
    q, decode = posterior_args(mu, logvar, decode)
    _check_inputs(x, q, reduction, likelihood)
    _check_decode(decode)
    check_likelihood(likelihood)
    n = _validate.sample_count(count_name, count, max(mu.numel(), x.numel()), mu)
    if not triton:
        return n, None, None
    batch = mu.shape[:-1]
    P = batch.numel()
    dtype, out_dtype = _lean_dtypes(mu, x, device, autocast)
    # the ELBO's one sample is drawn without its sample dimension
    sample = _plan.SamplePlan(mu.shape, mu.dtype, device, n if iwae or n != 1 else None, iwae, stop_score, dtype,
                              _plan.in_stride(mu, logvar))
    if P == 0 or x.numel() == 0 or (not iwae and n != 1):
        return n, sample, None
    if iwae:
        return n, sample, _plan.TailPlan(likelihood, n, P, x.numel() // P, dtype, device, reduction, batch, True,
                                         _general_iwae_tail, torch.Size((n, *x.shape)), out_dtype)
    return n, sample, _plan.TailPlan(likelihood, 1, P, x.numel() // P, dtype, device, reduction, batch, False,
                                     _general_elbo_tail, x.shape, out_dtype)


def _lean_elbo(x, mu, logvar, decode, likelihood, beta, free_bits, n_samples, reduction, generator, prior,
               of_scale=False, exp_z=False):
    """fastvae.elbo through the plans, or None where they do not apply.
    ``of_scale``: logvar is a torch posterior's scale (_Scale's), which only
    the eager C++ operator takes (sample_normal_of_scale), with ``exp_z`` a
    LogNormal's: decode takes z = exp(y)."""
    if torch.compiler.is_compiling():
        return _compiled_elbo(x, mu, logvar, decode, likelihood, beta, free_bits, n_samples, reduction, generator,
                              prior, False)
    if type(mu) is not Tensor:  # (x, q, decode): decode arrives in logvar's place
        if decode is not None:
            return None
        return _lean_family_elbo(x, mu, logvar, likelihood, beta, free_bits, n_samples, reduction, generator, prior)
    lean = _lean_device(x, mu, logvar, decode, prior, generator, likelihood, reduction)
    if (lean is None or type(n_samples) is not int or type(free_bits) not in (float, int) or free_bits != 0
            or (beta := _lean_beta(beta)) is None):
        return None
    device, triton, autocast = lean
    if of_scale and (triton or autocast):
        return None
    key = ("elbo", x.shape, mu.shape, mu.stride(), logvar.shape, logvar.stride(), mu.dtype, device, triton,
           autocast, likelihood, n_samples, reduction, of_scale, exp_z)
    plan = _plan.PLANS.get(key)
    if plan is None:  # the checks of the general path, once per call signature
        n, sample, tail = _gaussian_plans(x, mu, logvar, decode, likelihood, reduction, "n_samples", n_samples,
                                          device, triton, autocast, False, False)
        plan = _plan.store(key, _plan.Plan(sample, tail, likelihood, reduction, n, False, _general_elbo_tail))
    if triton:
        return _plan.run_elbo(plan, x, mu, logvar, decode, beta, generator)
    # the cpp backend: the general path's own calls, without its checks
    n = None if n_samples == 1 else n_samples
    if of_scale:
        z, kl = sample_normal_of_scale_unchecked(mu, logvar, n, generator, exp_z)
    else:
        z, kl = sample_normal_unchecked(mu, logvar, n, generator)
    try:  # call_user's note, inline: no call on the eager hot path
        out = decode(z)
    except Exception as error:
        note_call(error, decode, z, "decode", "z", None if n_samples == 1 else "n_samples", DECODER_DOCS)
        raise
    return _general_elbo_tail(x, out, kl, likelihood, beta, reduction, n_samples)


def _lean_iwae(x, mu, logvar, decode, k, likelihood, estimator, alpha, beta, reduction, generator, prior):
    """fastvae.iwae through the plans, or None where they do not apply (a
    tempered bound, beta != 1, takes the general path)."""
    if torch.compiler.is_compiling():
        return _compiled_iwae(x, mu, logvar, decode, k, likelihood, estimator, alpha, beta, reduction, generator,
                              prior, False)
    lean = _lean_device(x, mu, logvar, decode, prior, generator, likelihood, reduction)
    if (lean is None or type(k) is not int or estimator not in ESTIMATORS or type(alpha) not in (float, int)
            or alpha != 0 or type(beta) not in (float, int) or beta != 1):
        return None
    device, triton, autocast = lean
    key = ("iwae", x.shape, mu.shape, mu.stride(), logvar.shape, logvar.stride(), mu.dtype, device, triton,
           autocast, likelihood, k, estimator, reduction)
    plan = _plan.PLANS.get(key)
    if plan is None:  # the checks of the general path, once per call signature
        k, sample, tail = _gaussian_plans(x, mu, logvar, decode, likelihood, reduction, "k", k, device, triton,
                                          autocast, True, estimator != "iwae")
        plan = _plan.store(key, _plan.Plan(sample, tail, likelihood, reduction, k, estimator == "dreg",
                                           _general_iwae_tail))
    if triton:
        return _plan.run_iwae(plan, x, mu, logvar, decode, generator)
    # the cpp backend: the general path's own calls, without its checks
    z, _, latent = sample_normal_with_ratio_unchecked(mu, logvar, k, estimator != "iwae", generator)
    try:  # call_user's note, inline: no call on the eager hot path
        out = decode(z)
    except Exception as error:
        note_call(error, decode, z, "decode", "z", "k", DECODER_DOCS)
        raise
    return _general_iwae_tail(x, out, latent, likelihood, reduction, z if estimator == "dreg" else None)


def _lean_family_elbo(x, q, decode, likelihood, beta, free_bits, n_samples, reduction, generator, prior):
    """fastvae.elbo through the plans for a location-scale family's posterior
    (a torch Laplace, Gumbel, Cauchy or Uniform, an Independent of one, or a
    LocationScale record) or a positive one (a torch Exponential, Weibull or
    Kumaraswamy, or a Positive record) against a prior of its closed-form KL
    given the same way (its own family; a torch Beta for the Kumaraswamy);
    None where they do not apply (the general path). The same conditions as
    the Gaussian's (_lean_device), on every tensor of both distributions: one
    float32 or float64 dtype and device, no autocast; and a torch object's
    value checks settled (they run on the general path; a record's log-scale
    needs none)."""
    if not _plan.ENABLED:
        return None
    positive = (posterior := location_scale_form(q)) is None
    if ((positive and (posterior := positive_form(q)) is None)
            or (p := positive_form(prior, True) if positive else location_scale_form(prior)) is None
            or posterior[0] != p[0]
            or posterior[0] not in KL_FAMILIES or type(x) is not Tensor or likelihood not in _LEAN_LIKELIHOODS
            or reduction not in REDUCTIONS or not callable(decode) or type(n_samples) is not int
            or type(free_bits) not in (float, int) or free_bits != 0 or (beta := _lean_beta(beta)) is None
            or (generator is not None and type(generator) is not torch.Generator)):
        return None
    family, loc, b, form = posterior
    _, p_loc, p_b, p_form = p
    if positive and family == "exponential":  # its one parameter in the scale's place; a pair's (p0, p1) as is
        loc, b, p_loc, p_b = None, loc, None, p_loc
    exponential = loc is None  # one log parameter, the rate's
    pair = positive and not exponential  # two log parameters: the Weibull's, the Kumaraswamy's
    if exponential:
        loc, p_loc = b, p_b  # (read for their dtype, device and shape alone)
    if any(type(t) not in _backend.PLAIN_TYPES for t in (loc, b, p_loc, p_b)):
        return None
    device, dtype = loc.device, loc.dtype
    backend = _backend._chosen.get(device.type) or _backend.backend_for(device, warn=False)
    if (backend not in _LEAN_BACKENDS or torch._C._get_tracing_state() is not None
            or torch._C._are_functorch_transforms_active() or torch._C._is_any_autocast_enabled()
            or dtype not in _LEAN_DTYPES or b.dtype is not dtype or p_loc.dtype is not dtype
            or p_b.dtype is not dtype or x.dtype is not dtype or b.device != device or p_loc.device != device
            or p_b.device != device or x.device != device or x.requires_grad or not x.is_contiguous()
            or loc.dim() == 0):
        return None
    triton = backend == "triton"
    check_width = False
    if not _family_checks_settled(positive, form, p_form):
        # on the cpp backend a torch posterior's scale is checked on every call (on the CPU a check
        # costs no sync), here as on the general path (a Uniform's high - low where the plan's node
        # takes it, FamilySample); on the triton backend, until it has been once
        if triton or positive:
            return None
        if form == HIGH:
            check_width = True
        else:
            check_torch_scale(q.base_dist if type(q) is Independent else q)
    key = ("family elbo", family, form, p_form, x.shape, loc.shape, loc.stride(), b.shape, b.stride(), p_loc.shape,
           p_b.shape, dtype, device, triton, likelihood, n_samples, reduction)
    plan = _plan.PLANS.get(key)
    if plan is None:  # the checks of the general path, once per call signature
        q_record, decode = posterior_args(q, decode, None)
        _check_inputs(x, q_record, reduction, likelihood)
        _check_decode(decode)
        check_likelihood(likelihood)
        check_prior(prior, q_record.latent_size, device)  # of q's family: the closed form is family_kl's
        n = _validate.sample_count("n_samples", n_samples, max(loc.numel(), x.numel()), loc)
        batch = loc.shape[:-1]
        P = batch.numel()
        if loc.shape != b.shape or P * loc.shape[-1] == 0 or x.numel() == 0:
            return None
        tail = None
        p_shared = all(n == 1 for t in (p_loc, p_b) for n in t.shape[:-1])
        if exponential:
            p_loc = None
        # on the cpp backend, the sampler's fused C++ draw and KL
        sampler, index = (("sample_positive", POSITIVE_FAMILIES.index(family)) if positive
                          else ("sample_location_scale", location_scale_index(family)))
        sample = _plan.FamilySamplePlan(sampler, index, KL_FAMILIES.index(family), loc.shape, dtype, device,
                                        None if n == 1 else n, p_shared, form == SCALE, _general_family_sample,
                                        cpp=not triton, q_high=form == HIGH)
        if triton and n == 1:  # several samples: the general tail
            tail = _plan.TailPlan(likelihood, 1, P, x.numel() // P, dtype, device, reduction, batch, False,
                                  _general_elbo_tail, x.shape, dtype)
        plan = _plan.store(key, _plan.Plan(sample, tail, likelihood, reduction, n, False, _general_elbo_tail))
    if exponential:
        loc = p_loc = None
    # the logs of torch objects' scales (a positive family's parameters, a
    # uniform posterior's high - low) are taken in the plan's node
    p_scale = p_form == SCALE
    if (p_b.dim() != 1 or not p_b.is_contiguous()
            or (p_loc is not None and (p_loc.dim() != 1 or not p_loc.is_contiguous()))):
        # (L,) contiguous is the kernels' layout already
        p_loc, p_b = prior_layout(log_scale_of(None, p_loc, p_form) if pair else p_loc,
                                  log_scale_of(p_loc, p_b, p_form), b.shape)
        p_scale = False
    elif p_form == HIGH:
        p_b = log_scale_of(p_loc, p_b, p_form)
    if not b.is_contiguous() or (loc is not None and not loc.is_contiguous()):  # (a log keeps its input's layout)
        loc, b = None if loc is None else loc.contiguous(), b.contiguous()
    return _plan.run_family_elbo(plan, x, loc, b, p_loc, p_b, p_scale, decode, beta, generator, check_width)


def _family_checks_settled(positive: bool, form: int, p_form: int) -> bool:
    """Whether the value checks the general path runs on this posterior and
    prior would run no more: a torch location-scale posterior's scale; a
    positive family's torch parameters (q's or the prior's: rate, scale,
    concentration) and its log parameters' finiteness. A location-scale
    record's log-scale needs none (nor a torch location-scale prior, which
    the general path does not check)."""
    if positive:
        param, log_param = FAMILY_CHECKS["positive"]
        return ((form == LOG_SCALE and p_form == LOG_SCALE) or _checks_settled(param)) and _checks_settled(log_param)
    return form == LOG_SCALE or _checks_settled(*FAMILY_CHECKS["location-scale"])


# the value checks' kinds that the general path runs on a torch object's
# parameters (fastvae/_value_checks.py; tests/test_plan.py checks the names)
FAMILY_CHECKS = {"location-scale": ("scale",), "positive": ("positive parameter", "log parameter")}


def _general_family_sample(family: int, kl_family: int, loc: Tensor, log_scale: Tensor, p_loc: Tensor,
                           p_log_scale: Tensor, seed: Tensor, n_samples: int | None) -> tuple[Tensor, Tensor]:
    """z and the closed-form KL of a location-scale or positive family from
    the general path's Functions (q as (loc, log_scale): a positive pair's
    (log p0, log p1), the exponential's (None, log-rate)), for the prior in
    the kernels' layout ((L,) or (N, L), family_kl's prior_layout): what
    _plan.FamilySample fuses, and its create_graph replay."""
    K = 1 if n_samples is None else n_samples
    if loc is None:  # the exponential: its log-rate, and a second parameter no formula reads
        z, _ = SamplePositive.apply(log_scale, log_scale.detach(), seed, family, K, False)
    elif KL_FAMILIES[kl_family] in POSITIVE_FAMILIES:  # the Weibull's, the Kumaraswamy's (log p0, log p1)
        z, _ = SamplePositive.apply(loc, log_scale, seed, family, K, False)
    else:
        z, _ = SampleLocationScale.apply(loc, log_scale, seed, family, K, False)
    L = log_scale.shape[-1]
    kl = FamilyKL.apply(kl_family, True, None if loc is None else loc.reshape(-1, L), log_scale.reshape(-1, L),
                        p_loc, p_log_scale)
    return z.squeeze(0) if n_samples is None else z, kl.reshape(log_scale.shape[:-1])


# -- under torch.compile ----------------------------------------------------------
#
# In the common case Dynamo traces the decoder alone: the checks and the draw
# before it, and the bound after it, run through fastvae._opaque.call, whose
# docstring says why (the guards) and what their arguments must carry.


def _tensors(out: Any) -> bool:
    """Whether a decoder output can enter a nonstrict call: a tensor or a tuple
    of tensors (a torch Distribution takes the bound as Dynamo traces it)."""
    return type(out) is Tensor or (type(out) is tuple and all(type(t) is Tensor for t in out))


def _compiled_head_checks(x: Tensor, mu: Tensor, logvar: Tensor, likelihood: str, reduction: str) -> None:
    """The general path's checks of x, the posterior, the likelihood and the reduction."""
    _check_inputs(x, DiagonalNormal(mu, logvar), reduction, likelihood)  # DiagonalNormal checks mu and logvar
    check_likelihood(likelihood)


def _static(count: Any) -> Any:
    """A sample count (k, n_samples) as a Python int. Called again with another
    count, Dynamo recompiles with the count symbolic (its automatic dynamic
    shapes); the sampler's launch and its plan take a fixed count, so the
    symbol is specialized here (a guard on its value: the next count
    recompiles once more) rather than refused as not an int."""
    return int(count) if isinstance(count, torch.SymInt) else count


@_op.opaque
def _compiled_elbo_head(x: Tensor, mu: Tensor, logvar: Tensor, likelihood: str, beta: float, n_samples: int,
                        reduction: str, backend: str) -> tuple[Tensor, Tensor]:
    """fastvae.elbo's checks and its draw (z, kl) under torch.compile.
    ``backend``: the requested backend ("" for automatic) and the compiled nodes
    (_backend.traced_choice), unused here; an argument so that Dynamo guards on
    it (set_backend and set_compiled_nodes then recompile, as the ops choose by them)."""
    _compiled_head_checks(x, mu, logvar, likelihood, reduction)
    n = _validate.sample_count("n_samples", _static(n_samples), max(mu.numel(), x.numel()), mu)
    _validate.real("beta", beta, minimum=0.0)
    dtype = z_dtype(mu, logvar)
    if _plan_ops.serves_sample(mu, logvar, dtype):  # the triton backend: the plans' kernels as graph ops
        z, kl, _ = _plan_ops.sample(mu, logvar, draw_seed(mu.device, None), 0 if n == 1 else n, False, False, dtype)
        return z, kl
    return sample_normal_unchecked(mu, logvar, None if n == 1 else n, None)


@_op.opaque
def _compiled_elbo_terms_head(x: Tensor, mu: Tensor, logvar: Tensor, likelihood: str, beta: float, n_samples: int,
                              reduction: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """_compiled_elbo_head's (z, kl) and the KL of each latent dimension (elbo_terms' per_dim)."""
    z, kl = _compiled_elbo_head(x, mu, logvar, likelihood, beta, n_samples, reduction, backend)
    return z, kl, kl_normal(mu.unsqueeze(-1), logvar.unsqueeze(-1))


@_op.opaque
def _compiled_elbo_terms_tail(x: Tensor, out: Any, kl: Tensor, per_dim: Tensor, likelihood: str, beta: float,
                              reduction: str, n_samples: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """elbo_terms' (bound, reconstruction, kl, per_dim), reduced, from the decoder output."""
    reconstruction = _reconstruction(x, out, likelihood, n_samples, kl.dim())
    return _reduced_elbo_terms(reconstruction, kl if beta == 1.0 else beta * kl, kl, per_dim, reduction)


@_op.opaque
def _compiled_iwae_head(x: Tensor, mu: Tensor, logvar: Tensor, likelihood: str, k: int, estimator: str,
                        reduction: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """fastvae.iwae's checks and its draw (z, the KL, the latent term) under
    torch.compile; ``backend`` as _compiled_elbo_head's."""
    _compiled_head_checks(x, mu, logvar, likelihood, reduction)
    k = _validate.sample_count("k", _static(k), max(mu.numel(), x.numel()), mu)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    dtype = z_dtype(mu, logvar)
    if _plan_ops.serves_sample(mu, logvar, dtype):  # the triton backend: the plans' kernels as graph ops
        return _plan_ops.sample(mu, logvar, draw_seed(mu.device, None), k, True, estimator != "iwae", dtype)
    return sample_normal_with_ratio_unchecked(mu, logvar, k, estimator != "iwae", None)


@_op.opaque
def _iwae_tail(x: Tensor, out: Any, latent: Tensor, kl: Tensor | None, likelihood: str, reduction: str,
               terms: bool, dreg: bool) -> tuple[Tensor, ...]:
    """(the IWAE bound, reduced), or with ``terms`` iwae_terms' (bound,
    reconstruction, kl, ess), reduced, and the log-weights; with ``dreg``
    also DReG's scale of each sample (the normalized weights: _dreg_z_scale
    at alpha = 0, beta = 1), which the caller hooks on z and the latent term:
    under torch.compile a hook registered inside an opaque call would hang
    on a tensor of AOT autograd's trace, not on the graph's z. The compiled
    path and the eager general tail (_general_iwae_tail) both take it."""
    reconstruction = decoder_log_prob(x, out, likelihood, (latent.shape[0],), latent.dim() - 1)
    lw = reconstruction + latent
    bound, state = _bound(lw, 0.0)
    result = (*_reduced_iwae_terms(bound, reconstruction, kl, lw, reduction), lw) if terms else \
        (_reduce(bound, reduction),)
    return (*result, importance_weights_from_state(lw, *state)) if dreg else result


@_op.opaque
def _compiled_elbo_tail(x: Tensor, out: Any, kl: Tensor, likelihood: str, beta: float, reduction: str,
                        n_samples: int) -> Tensor:
    """fastvae.elbo's bound from the decoder output under torch.compile: on the
    triton backend, where the eager call would take the tail plan, the plan's
    kernels as graph ops (fastvae/_plan_ops.py); else the general tail."""
    if n_samples == 1 and _plan_ops.serves_tail(x, out, kl, likelihood, False):
        return _plan_ops.elbo_tail(x, out, kl, beta, likelihood, reduction)
    return _general_elbo_tail(x, out, kl, likelihood, beta, reduction, n_samples)


@_op.opaque
def _compiled_iwae_tail(x: Tensor, out: Any, latent: Tensor, kl: Tensor | None, likelihood: str, reduction: str,
                        terms: bool, dreg: bool) -> tuple[Tensor, ...]:
    """_iwae_tail under torch.compile: on the triton backend, where the eager
    call would take the tail plan, the plan's kernels as graph ops
    (fastvae/_plan_ops.py), with DReG's weights from the same kernels."""
    if not terms and _plan_ops.serves_tail(x, out, latent, likelihood, True):
        bound, scale = _plan_ops.iwae_tail(x, out, latent, likelihood, reduction, dreg)
        return (bound, scale) if dreg else (bound,)
    return _iwae_tail(x, out, latent, kl, likelihood, reduction, terms, dreg)


def _simple_call(x: Any, mu: Any, logvar: Any, likelihood: Any, reduction: Any, generator: Any, prior: Any) -> bool:
    """Whether the compiled path takes this call: tensors (x, mu, logvar), the
    standard normal prior, a likelihood and a reduction by name, torch's own
    generator. Anything else traces the general path, which also says what is
    wrong with it."""
    return (type(mu) is Tensor and type(logvar) is Tensor and type(x) is Tensor and prior is None
            and generator is None and type(likelihood) is str and type(reduction) is str)


def _compiled_elbo(x, mu, logvar, decode, likelihood, beta, free_bits, n_samples, reduction, generator, prior,
                   terms=False):
    """fastvae.elbo (``terms``: elbo_terms) while torch.compile traces, or
    None where the general path traces (_simple_call; free bits; a tensor beta)."""
    if (not _simple_call(x, mu, logvar, likelihood, reduction, generator, prior) or type(n_samples) is not int
            or type(beta) not in (float, int) or type(free_bits) not in (float, int) or free_bits != 0):
        return None
    from . import _opaque  # imports torch._dynamo, which fastvae's import does not

    beta = float(beta)
    head = x, mu, logvar, likelihood, beta, n_samples, reduction, _backend.traced_choice()
    if terms:
        z, kl, per_dim = _opaque.call("_compiled_elbo_terms_head", head)
    else:
        z, kl = _opaque.call("_compiled_elbo_head", head)
    _check_decode(decode)
    out = decode(z)
    if terms:
        name, args = "_compiled_elbo_terms_tail", (x, out, kl, per_dim, likelihood, beta, reduction, n_samples)
    else:
        name, args = "_compiled_elbo_tail", (x, out, kl, likelihood, beta, reduction, n_samples)
    if _tensors(out):
        result = _opaque.call(name, args)
    else:  # a decoder's torch distribution cannot enter an opaque call: Dynamo traces the tail
        result = (_compiled_elbo_terms_tail if terms else _compiled_elbo_tail)(*args)
    return ELBOTerms(*result, True) if terms else result


def _compiled_iwae(x, mu, logvar, decode, k, likelihood, estimator, alpha, beta, reduction, generator, prior,
                   terms=False):
    """fastvae.iwae (``terms``: iwae_terms) while torch.compile traces, or
    None where the general path traces (_simple_call; a tempered or Renyi
    bound). DReG's hooks on z and the latent term are registered here, where
    Dynamo traces them."""
    if (not _simple_call(x, mu, logvar, likelihood, reduction, generator, prior) or type(k) is not int
            or type(estimator) is not str or type(alpha) not in (float, int) or alpha != 0
            or type(beta) not in (float, int) or beta != 1):
        return None
    from . import _opaque  # imports torch._dynamo, which fastvae's import does not

    z, kl, latent = _opaque.call("_compiled_iwae_head", (x, mu, logvar, likelihood, k, estimator, reduction,
                                                         _backend.traced_choice()))
    _check_decode(decode)
    out = decode(z)
    dreg = estimator == "dreg"
    args = (x, out, latent, kl, likelihood, reduction, terms, dreg)
    # a decoder's torch distribution cannot enter an opaque call: Dynamo traces the tail
    result = _opaque.call("_compiled_iwae_tail", args) if _tensors(out) else _iwae_tail(*args)
    if dreg:
        *result, scale = result
        if z.requires_grad:
            _dreg_hooks(z, latent, scale)
    if terms:
        return IWAETerms(*result)
    return result[0]


# -- ELBO -----------------------------------------------------------------------


def _per_dim_kl(q: DiagonalNormal | TrilNormal, prior: Any) -> Tensor | None:
    """The analytic KL of each latent dimension (..., L), where it splits by
    dimension (a diagonal q against a standard or diagonal prior), else None."""
    if isinstance(q, LATENTS):  # the other latent families: their closed forms (fastvae/latents.py)
        return q.kl_per_dim(prior)
    if not isinstance(q, DiagonalNormal) or not isinstance(prior, (StandardNormal, DiagonalNormal)):
        return None
    # kl_normal on (..., L, 1) gives the per-dimension KL (..., L) with the fused op.
    if isinstance(prior, StandardNormal):
        return kl_normal(q.mu.unsqueeze(-1), q.logvar.unsqueeze(-1))
    return kl_normal(q.mu.unsqueeze(-1), q.logvar.unsqueeze(-1), prior.mu.unsqueeze(-1), prior.logvar.unsqueeze(-1))


def _free_bits_error(q: Any, prior: Any) -> ValueError:
    """Why free bits cannot take this posterior and prior: their KL does not split by dimension."""
    family = getattr(q, "family", None)
    q_name = type(q).__name__ + (f"({family!r})" if family is not None else "")
    dist = getattr(prior, "dist", None)
    if dist is not None:
        base = getattr(dist, "base_dist", dist)
        p_name = f"torch {type(base).__name__}"
    else:
        p_name = type(prior).__name__ + (f"({prior.family!r})" if getattr(prior, "family", None) else "")
    return ValueError(
        f"free_bits needs the KL of each latent dimension, and the KL of this posterior ({q_name}) against this "
        f"prior ({p_name}) does not split into one. Free bits take a diagonal Gaussian posterior against a "
        "standard normal or DiagonalNormal prior, a latent family's closed-form KL against a prior of its own "
        "family (docs/latents.md), or a Concrete posterior against a OneHotCategorical or RelaxedOneHotCategorical "
        "prior (a BinaryConcrete against a Bernoulli or RelaxedBernoulli). Elsewhere the KL is one sum over the "
        "latents: a full-covariance posterior couples them, a mixture "
        "or VampPrior prior (and a LogisticNormal's stick-breaking) does not factorize over them, and the other "
        "families' Monte Carlo KL takes log q(z) summed over L from their samplers")


def _free_bits_kl(per_dim: Tensor, free_bits: float) -> Tensor:
    """Per-example KL (...) whose batch mean is sum_j max(free_bits, mean_b KL_bj).

    A latent dimension whose KL, averaged over the batch, is below the floor
    contributes the constant floor to every example (so no gradient pushes it
    further down); the others contribute their own KL. The batch mean of the
    result is exactly the free-bits KL of Kingma et al. (2016), and reduction
    "none" stays consistent with "mean".
    """
    batch_mean = per_dim.reshape(-1, per_dim.shape[-1]).mean(0)  # (L,)
    floored = torch.where(batch_mean < free_bits, torch.full_like(per_dim, free_bits), per_dim)
    return floored.sum(-1)


def _elbo(x, mu, logvar, decode, *, likelihood, beta, free_bits, n_samples, reduction, generator, prior,
          want_per_dim=False):
    """(beta * kl, reconstruction, kl, q, prior, analytic, per_dim), unreduced: the one pass of
    elbo and elbo_terms (the bound is reconstruction - beta * kl; per_dim, the KL of each latent
    dimension, where free bits need it or want_per_dim asks for it (elbo_terms), None where it
    does not split: the closed form's terms, or a relaxed prior's Monte Carlo terms of a Concrete
    posterior averaged over the samples)."""
    q, decode = posterior_args(mu, logvar, decode)
    _check_inputs(x, q, reduction, likelihood)
    _check_decode(decode)
    check_likelihood(likelihood)
    prior = check_prior(prior, q.latent_size, q.mu.device)
    if isinstance(q, LATENTS):  # a family on a simplex takes its own default (fastvae/latents.py)
        prior = q.resolve_prior(prior, "elbo")
    mu = q.mu
    # decode(z) must return (n_samples, *x.shape): usually the largest K-fold tensor
    n_samples = _validate.sample_count("n_samples", n_samples, max(mu.numel(), x.numel()), mu)
    beta = _validate.real("beta", beta, minimum=0.0, tensor_ok=True)
    free_bits = _validate.real("free_bits", free_bits, minimum=0.0)
    analytic = has_analytic_kl(prior)
    per_dim = None
    mc_per_dim = False  # the Monte Carlo KL's per-latent terms, from the draw (a Concrete against a relaxed prior)
    if free_bits > 0 or want_per_dim:
        per_dim = _per_dim_kl(q, prior)
        if per_dim is None:
            mc_per_dim = isinstance(q, LATENTS) and q.mc_kl_splits(prior)
            if free_bits > 0 and not mc_per_dim:
                raise _free_bits_error(q, prior)
    K = None if n_samples == 1 else n_samples
    sample_shape = () if n_samples == 1 else (n_samples,)
    standard = isinstance(prior, StandardNormal)
    if mc_per_dim:  # log q - log p of each latent from the same samples (fastvae/latents.py's Concrete)
        z, kl, per_dim = q.sample_with_mc_kl_per_dim(K, prior, generator)
        analytic = False
    elif isinstance(q, LATENTS):  # the other latent families: the record draws z and its KL (fastvae/latents.py)
        z, kl, analytic = q.sample_with_kl(K, prior, generator)
    elif isinstance(q, DiagonalNormal) and analytic:
        z, kl = sample_normal_unchecked(q.mu, q.logvar, K, generator)  # the KL to N(0, I), fused
        if not standard:
            kl = analytic_kl(q, prior)
    elif isinstance(q, DiagonalNormal):
        # log q(z) - log p(z) from the sampler's exact log N(z; 0, I) - log q(z)
        z, _, latent = sample_normal_with_ratio_unchecked(q.mu, q.logvar, n_samples, False, generator)
        if K is None:
            z, latent = z[0], latent[0]
        kl = -(latent + log_ratio_to_standard(prior, z))
    else:
        if analytic:
            z, kl = SampleNormalTril.apply(q.mu, q.scale_tril, draw_seed(mu.device, generator), K)  # fused KL
        else:  # log q(z) from the eps that drew z: exact however small S is
            z, _, log_q = sample_tril_with_log_q(q, K, generator, False)
            kl = log_q - prior.log_prob(z)
        if analytic and not standard:
            kl = analytic_kl(q, prior)
    if not analytic and K is not None:
        kl = kl.mean(0)
    out = call_user(decode, z, "decode", "z", None if K is None else "n_samples", DECODER_DOCS)
    reconstruction = decoder_log_prob(x, out, likelihood, sample_shape, mu.dim() - 1)
    if n_samples > 1:
        reconstruction = reconstruction.mean(0)
    if free_bits > 0:
        kl = _free_bits_kl(per_dim, free_bits)
    weighted = kl if isinstance(beta, float) and beta == 1.0 else beta * kl
    return weighted, reconstruction, kl, q, prior, analytic, per_dim


def elbo_terms(x: Tensor, mu: Tensor | Distribution, logvar: Tensor | Callable[[Tensor], Any] | None = None,
               decode: Callable[[Tensor], Any] | None = None, *, likelihood: str | None = None,
               beta: float | Tensor = 1.0, free_bits: float = 0.0, n_samples: int = 1, reduction: str = "mean",
               generator: torch.Generator | None = None, prior: Any = None) -> ELBOTerms:
    """fastvae.elbo, returning the bound with its reconstruction and KL terms
    (one pass; for logging). Arguments as fastvae.elbo."""
    if torch.compiler.is_compiling():
        terms = _compiled_elbo(x, mu, logvar, decode, likelihood, beta, free_bits, n_samples, reduction, generator,
                               prior, terms=True)
        if terms is not None:
            return terms
    weighted, reconstruction, kl, q, prior, analytic, per_dim = _elbo(
        x, mu, logvar, decode, likelihood=likelihood, beta=beta, free_bits=free_bits, n_samples=n_samples,
        reduction=reduction, generator=generator, prior=prior, want_per_dim=True)
    return ELBOTerms(*_reduced_elbo_terms(reconstruction, weighted, kl, per_dim, reduction), analytic)


def _reduced_elbo_terms(reconstruction: Tensor, weighted: Tensor, kl: Tensor, per_dim: Tensor | None,
                        reduction: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """elbo_terms' (bound, reconstruction, kl, per_dim), reduced."""
    if per_dim is not None and reduction != "none":
        per_dim = per_dim.reshape(-1, per_dim.shape[-1])
        per_dim = per_dim.mean(0) if reduction == "mean" else per_dim.sum(0)
    return (_reduced_difference(reconstruction, weighted, reduction), _reduce(reconstruction, reduction),
            _reduce(kl, reduction), per_dim)


def elbo(
    x: Tensor,
    mu: Tensor | Distribution,
    logvar: Tensor | Callable[[Tensor], Any] | None = None,
    decode: Callable[[Tensor], Any] | None = None,
    *,
    likelihood: str | None = None,
    beta: float | Tensor = 1.0,
    free_bits: float = 0.0,
    n_samples: int = 1,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    prior: Any = None,
) -> Tensor:
    """The evidence lower bound E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)).

    Higher is better: train with ``loss = -fastvae.elbo(...)``.

    Args:
        x: data of shape (B, *event): (B, D) vectors or (B, C, H, W) images
            (any batch shape works: mu's leading shape, then the event). The
            likelihood sums over every event dimension, with no copy for a
            contiguous decoder output. A conv decoder takes z (..., L) in one
            line: ``lambda z: net(z.reshape(-1, L))``, whose (S·B, C, H, W)
            rows (the samples folded into the batch, in z.reshape's order)
            are read as (S, B, C, H, W) (docs/objectives.md, "The decoder
            convention").
        mu, logvar: the encoder's output for x, shape (B, L): q(z|x) =
            N(mu, diag(exp(logvar))). logvar is the log-variance, 2 log(std):
            a standard deviation passed here gives a finite, wrong bound that
            no check can tell from a log-variance (use 2 * std.log(), or pass
            a torch Normal(mu, std) as q). Or call ``elbo(x, q, decode)`` with q a
            torch Normal or Independent(Normal, 1) (gradients flow to its
            loc and scale).
        decode: any callable z -> decoder output (an nn.Module, a lambda, a
            conditional decoder closing over labels). It gets z of shape
            (B, L), or (n_samples, B, L) when n_samples > 1, in the posterior's
            dtype (an exception it raises comes out unchanged, with a note of
            z's shape and dtype), and returns, for
            likelihood="gaussian", the mean (unit variance: squared error) or a
            (mean, logvar) pair (learned variance; logvar, not std: a (mean,
            std) pair is not detected); for "laplace", the location (scale 1:
            the L1 loss) or a (loc, log_scale) pair; for "bernoulli", the logits, before
            any sigmoid (fastvae warns when every value it reads lies in
            [0, 1], and when x leaves [0, 1]); for counts, "poisson": the log
            rate, "negative_binomial": (log mean, log theta), "zinb": (log mean,
            log theta, zero-inflation logits), scvi-tools' parameterization
            (log theta per element or per gene).
            Outputs have x's shape with the sample dimension in front.
        likelihood: "gaussian", "laplace", "bernoulli", "categorical" (logits (..., C) for
            x of integer class indices), "continuous_bernoulli" (logits, x in
            [0, 1]), "poisson", "negative_binomial", "zinb" or
            "discretized_logistic_mixture" (PixelCNN++'s mixture parameters for
            images in [-1, 1]); docs/likelihoods.md. Required (there is no default:
            a wrong one gives a plausible but meaningless number).
        beta: weight of the KL term (beta-VAE); >= 0. Any real scalar (Python,
            NumPy, 0-d tensor). A 0-d floating tensor (an annealing schedule)
            is used as is: its value is not checked, which would cost a host
            sync, and changing it recompiles nothing under torch.compile.
        free_bits: per-latent-dimension KL floor lambda >= 0 (Kingma et al.
            2016): each dimension's KL, averaged over the batch, is replaced by
            max(lambda, that average), so dimensions below the floor get no
            gradient pushing them further down. The floor is applied first,
            then beta: elbo = reconstruction - beta * sum_j max(lambda, mean_b KL_bj).
            With reduction="none" a floored dimension contributes lambda to
            every example, so the per-example values average to the same bound.
            It needs the KL of each dimension: a closed form that splits (a
            diagonal Gaussian against a standard or diagonal prior, a latent
            family against its own family, a Concrete posterior against a
            OneHotCategorical prior, a BinaryConcrete against a Bernoulli), or a
            Concrete posterior's Monte Carlo KL against a RelaxedOneHotCategorical
            prior (a BinaryConcrete's against a RelaxedBernoulli), taken per
            latent from the same samples; elsewhere a ValueError says why not.
        n_samples: z samples per example; the reconstruction term is averaged
            over them (the KL is analytic). The decoder runs once on all of them.
        reduction: "mean" over the batch (default), "sum", or "none" (per example).
            "mean" of an empty batch is a ValueError (it would be NaN); "sum" gives 0.
        generator: torch.Generator for the noise seed (default: torch's default
            generator of mu's device, so torch.manual_seed applies).
        prior: p(z): None or ``fastvae.priors.StandardNormal()`` (the default
            N(0, I)), ``fastvae.priors.MixtureOfGaussians``, ``VampPrior``, or a
            ``fastvae.DiagonalNormal`` of shape (L,) (a learned diagonal prior).
            The KL is analytic where a closed form is registered (a diagonal or
            full-covariance q against a standard or diagonal prior), otherwise
            the Monte Carlo log q(z) - log p(z) from the same samples;
            ``elbo_terms(...).kl_analytic`` says which.

    The posterior may also be passed as one object, ``elbo(x, q, decode)``:
    q a ``fastvae.DiagonalNormal(mu, logvar)``, a full-covariance
    ``fastvae.TrilNormal(mu, scale_tril)`` (sampled by the fused
    sample_normal_tril), or a torch ``Normal``, ``Independent(Normal, 1)`` or
    ``MultivariateNormal`` (mapped to those two).

    Returns:
        The ELBO, a scalar (or per-example for reduction="none"). float32
        when the encoder or decoder outputs are half precision (under
        torch.autocast, or a model cast to bfloat16/float16), float64 when
        any input is; gradients reach each tensor in its own dtype.

    The sampling, KL, and likelihood run in fused kernels; no noise tensor and
    no K-fold copy of x is stored for the backward. Compiles under
    torch.compile(fullgraph=True). For the terms (reconstruction, KL) as well,
    use fastvae.elbo_terms.
    """
    if prior is not None or type(mu) is not Tensor:  # the default call (x, mu, logvar, decode) skips the helper
        mu, logvar, decode, prior = _gaussian_call(mu, logvar, decode, prior, True)
        if type(logvar) is _Scale:  # a torch posterior's scale, which the eager C++ sampler takes as it is
            bound = _lean_elbo(x, mu, logvar.scale, decode, likelihood, beta, free_bits, n_samples, reduction,
                               generator, prior, True, logvar.exp_z)
            if bound is not None:
                return bound
            if logvar.exp_z:
                decode = logvar.decode_y
            logvar = logvar.logvar()
    bound = _lean_elbo(x, mu, logvar, decode, likelihood, beta, free_bits, n_samples, reduction, generator, prior)
    if bound is not None:
        return bound
    weighted, reconstruction = _elbo(x, mu, logvar, decode, likelihood=likelihood, beta=beta, free_bits=free_bits,
                                     n_samples=n_samples, reduction=reduction, generator=generator, prior=prior)[:2]
    # the terms are not reduced: each reduction is a node in the graph
    return _reduced_difference(reconstruction, weighted, reduction)


# -- IWAE -----------------------------------------------------------------------


def _dreg_z_scale(z: Tensor, latent: Tensor | None, lw: Tensor, alpha: float,
                  state: tuple[Tensor, Tensor] | None, beta: float | Tensor = 1.0) -> None:
    """DReG (Tucker et al. 2018): the encoder gets sum_k c_k dlw_k/dz_k dz_k/dphi
    with the score term (d log q / d phi) dropped and replaced by its
    reparameterized equivalent. For the bound (1/(1-a)) logmeanexp((1-a) lw),
    with v = softmax((1-a) lw), c_k = v_k (a + (1-a) v_k): w~^2 at a = 0. The
    bound's own gradient already carries v_k on z_k, so a hook on z multiplies
    by (a + (1-a) v_k); z only feeds the encoder (through sample_normal), so the
    decoder's gradient stays the IWAE one. ``latent`` (log p(z) - log q(z | x)
    from the sampler, in stop-score mode) reaches the encoder only through z
    inside the sampler's backward, so its gradient gets the same scale.
    ``state``: the bound's (lw_max, sumexp) of lw at alpha = 0, from which the
    weights take one launch.

    With the latent term tempered by beta (lw = log p(x|z) + beta (log p(z) -
    log q(z|x))), the score term that DReG replaces is beta times as large, so
    c_k = v_k (1 - t (1 - v_k)) with t = beta (1 - alpha): the hook's factor is
    (1 - t) + t v_k, which is alpha + (1 - alpha) v_k at beta = 1 (and 1 at
    beta = 0, where no log q enters lw and there is no score term to replace)."""
    if not z.requires_grad:  # no gradient will flow (no_grad, a fixed encoder): the value is the same
        return
    untempered = isinstance(beta, float) and beta == 1.0
    if alpha == 0 and untempered:  # the IWAE bound: c_k = w~_k^2, and no arithmetic launches around the weights
        scale = importance_weights_from_state(lw, *state)  # 0 for an all -inf column
    elif untempered:
        scale = alpha + (1.0 - alpha) * ImportanceWeights.apply((1.0 - alpha) * lw.detach())
    else:
        v = importance_weights_from_state(lw, *state) if alpha == 0 else \
            ImportanceWeights.apply((1.0 - alpha) * lw.detach())
        t = beta if alpha == 0 else beta * (1.0 - alpha)
        scale = torch.addcmul(1.0 - t, t, v) if isinstance(t, Tensor) else (1.0 - t) + t * v  # one launch
    _dreg_hooks(z, latent, scale)


# Dynamo traces DReG's gradient hooks from torch 2.13 on. Before, it cannot:
# torch 2.10 refuses a hook on an intermediate tensor without compiled autograd,
# and 2.11-2.12 rewrite the hook into the graph and loop when its scale depends
# on the hooked tensor, as DReG's does (RecursionError; seen on the H200's torch 2.11).
DREG_COMPILES = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


@_op.opaque
def _refuse_compiled_dreg(scale: Tensor) -> None:
    """The error of estimator='dreg' under torch.compile before torch 2.13
    (DREG_COMPILES). It is raised inside an opaque call: Dynamo of torch 2.7
    replaces an exception raised in the code it traces by its own "Observed
    exception" error, which drops the message; one raised in an opaque call
    reaches the user as the cause of Dynamo's error, on every version."""
    raise RuntimeError(
        f"estimator='dreg' under torch.compile needs torch 2.13 or newer (this is torch {torch.__version__}, "
        "whose Dynamo cannot trace the gradient hooks DReG registers). Compile the rest of the step and run "
        "fastvae.iwae outside it (torch.compiler.disable), or use estimator='iwae' or 'stl', which compile")


def _dreg_hooks(z: Tensor, latent: Tensor | None, scale: Tensor) -> None:
    """Scales the gradients of z and of the latent term by DReG's ``scale``
    (K, ...) of each sample (_dreg_z_scale says why)."""
    if not DREG_COMPILES and _backend.compiling():
        from . import _opaque  # imports torch._dynamo, which fastvae's import does not

        _opaque.call("_refuse_compiled_dreg", (scale,))
    # one trailing dimension per latent event dimension (two for a Concrete z (K, ..., L, C))
    scale_z = scale.reshape(*scale.shape, *(1,) * (z.dim() - scale.dim()))
    if (latent is not None and latent.requires_grad and z.dtype == scale.dtype
            and (ops := _backend.torch_ops(z, scale)) is not None):
        # the same products as C++ hooks: the backward then never calls back into Python
        ops.sample_normal_dreg_hooks(z, scale_z, latent, scale, DREG_MESSAGE)
        return
    if z.dtype == scale.dtype:
        z.register_hook(lambda g: _dreg_once(g * scale_z))
    else:  # a half-precision z (an autocast encoder): its gradient keeps z's dtype, scaled in float32
        z.register_hook(lambda g: _dreg_once((g * scale_z).to(g.dtype)))
    if latent is not None:
        latent.register_hook(lambda g: _dreg_once(g * scale))


def _bound(lw: Tensor, alpha: float) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """(the bound, the state (lw_max, sumexp) of lw at alpha = 0, else None)."""
    if alpha == 0:
        bound, lw_max, sumexp = logmeanexp_with_state(lw)
        return bound, (lw_max, sumexp)
    if alpha == 1:  # the limit of the Renyi bound: the Monte Carlo ELBO
        return lw.mean(0), None
    return logmeanexp_with_state((1.0 - alpha) * lw)[0] / (1.0 - alpha), None


def _iwae(x, mu, logvar, decode, *, k, likelihood, estimator, alpha, beta, reduction, generator, prior,
          want_kl=False):
    """(bound, reconstruction, kl, log-weights), unreduced: the one pass of iwae and
    iwae_terms; kl is None unless want_kl (the bound does not use it)."""
    q, decode = posterior_args(mu, logvar, decode)
    _check_inputs(x, q, reduction, likelihood)
    _check_decode(decode)
    check_likelihood(likelihood)
    prior = check_prior(prior, q.latent_size, q.mu.device)
    if isinstance(q, LATENTS):
        prior = q.resolve_prior(prior, "iwae")
    mu = q.mu
    # decode(z) must return (k, *x.shape): usually the largest K-fold tensor
    k = _validate.sample_count("k", _static(k), max(mu.numel(), x.numel()), mu)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    alpha = _validate.real("alpha", alpha)
    beta = _validate.real("beta", beta, minimum=0.0, tensor_ok=True)
    stop_score = estimator != "iwae"

    hooked = None  # the latent term whose gradient reaches the encoder outside z (DReG scales it too)
    if isinstance(q, LATENTS):  # the other latent families: log q from the noise that drew z (fastvae/latents.py)
        z, latent, hooked = q.rsample_with_log_ratio(k, generator, stop_score, prior, estimator == "dreg")
    elif isinstance(q, DiagonalNormal):
        # log p(z) - log q(z | x) comes from the sampler, which knows each eps: exact
        # however small the variance (recomputing eps from z overflows when the
        # posterior collapses); another prior adds log p(z) - log N(z; 0, I)
        z, kl, hooked = sample_normal_with_ratio_unchecked(q.mu, q.logvar, k, stop_score, generator)
        extra = log_ratio_to_standard(prior, z)
        latent = hooked if extra is None else hooked + extra
    else:
        # log q from the eps that drew z (exact however small S is); STL / DReG:
        # its parameters' score stopped, z keeps its path
        z, kl, log_q = sample_tril_with_log_q(q, k, generator, stop_score)
        latent = prior.log_prob(z) - log_q
    if not want_kl:
        kl = None
    elif isinstance(q, LATENTS):
        kl = q.analytic_kl(prior)
        kl = -latent.mean(0) if kl is None else kl
    elif not has_analytic_kl(prior):
        kl = -latent.mean(0)  # the Monte Carlo KL from the same samples
    elif not isinstance(prior, StandardNormal):
        kl = analytic_kl(q, prior)
    reconstruction = decoder_log_prob(x, call_user(decode, z, "decode", "z", "k", DECODER_DOCS), likelihood, (k,),
                                      mu.dim() - 1)
    # beta tempers the latent term of each log-weight; at 1.0 (the IWAE bound) no launch is added
    lw = reconstruction + (latent if isinstance(beta, float) and beta == 1.0 else beta * latent)
    bound, state = _bound(lw, alpha)
    if estimator == "dreg":
        _dreg_z_scale(z, hooked, lw, alpha, state, beta)
    return bound, reconstruction, kl, lw


def iwae_terms(x: Tensor, mu: Tensor | Distribution, logvar: Tensor | Callable[[Tensor], Any] | None = None,
               decode: Callable[[Tensor], Any] | None = None, *, k: int = 5, likelihood: str | None = None,
               estimator: str = "iwae", alpha: float = 0.0, beta: float | Tensor = 1.0, reduction: str = "mean",
               generator: torch.Generator | None = None, prior: Any = None) -> IWAETerms:
    """fastvae.iwae, returning the bound with its terms (reconstruction, KL,
    ESS, log-weights) from the same pass, for logging. Arguments as fastvae.iwae."""
    if torch.compiler.is_compiling():
        terms = _compiled_iwae(x, mu, logvar, decode, k, likelihood, estimator, alpha, beta, reduction, generator,
                               prior, terms=True)
        if terms is not None:
            return terms
    bound, reconstruction, kl, lw = _iwae(
        x, mu, logvar, decode, k=k, likelihood=likelihood, estimator=estimator,
        alpha=alpha, beta=beta, reduction=reduction, generator=generator, prior=prior, want_kl=True,
    )
    return IWAETerms(*_reduced_iwae_terms(bound, reconstruction, kl, lw, reduction), lw)


def _reduced_iwae_terms(bound: Tensor, reconstruction: Tensor, kl: Tensor, lw: Tensor,
                        reduction: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """iwae_terms' (bound, reconstruction, kl, ess), reduced (no gradient reaches the ESS)."""
    with torch.no_grad():
        ess = EffectiveSampleSize.apply(lw.detach())[0]
    return (_reduce(bound, reduction), _reduce(reconstruction.mean(0), reduction), _reduce(kl, reduction),
            _reduce(ess, reduction))


def iwae(
    x: Tensor,
    mu: Tensor | Distribution,
    logvar: Tensor | Callable[[Tensor], Any] | None = None,
    decode: Callable[[Tensor], Any] | None = None,
    *,
    k: int = 5,
    likelihood: str | None = None,
    estimator: str = "iwae",
    alpha: float = 0.0,
    beta: float | Tensor = 1.0,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    prior: Any = None,
) -> Tensor:
    """The importance-weighted bound log (1/k) sum_k w_k (Burda et al. 2015),
    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x)
    (with beta, log p(x|z_k) + beta (log p(z_k) - log q(z_k|x))).

    Higher is better: train with ``loss = -fastvae.iwae(...)``.

    Args:
        x, mu, logvar, decode, likelihood, reduction, generator, prior: as
            fastvae.elbo (q may be one posterior object; any prior works with
            every estimator and both posteriors); decode gets z of shape
            (k, B, L) and runs once per call.
        k: importance samples per example (>= 1; k = 1 is the Monte Carlo ELBO).
        estimator: the gradient estimator; all three return the same value for
            the same seed.
            "iwae": plain reparameterization gradients.
            "dreg": doubly reparameterized (Tucker et al. 2018): the encoder
                gradient weights each sample's path derivative by w~_k^2 (for
                alpha != 0 by v_k (alpha + (1-alpha) v_k), v = softmax((1-alpha) lw))
                and drops the score term; unbiased for the same expectation as
                "iwae", with lower variance. The decoder gradient equals "iwae"'s.
            "stl": sticking the landing (Roeder et al. 2017): the score term
                is dropped and the path derivative weighted by w~_k. Unbiased at
                k = 1; biased for k > 1 (Tucker et al. 2018), but low variance.
            For "dreg" and "stl" log q is taken with q's parameters' score
            stopped, for the diagonal and the full-covariance posterior alike;
            the prior's parameters get the plain IWAE gradient.
        alpha: Renyi-alpha (variational Renyi) bound
            logmeanexp((1-alpha) lw) / (1-alpha). alpha = 0 is IWAE; alpha -> 1
            tends to the ELBO mean_k lw_k, and alpha = 1 returns exactly that.
        beta: weight of the latent term in each log-weight (>= 0; a KL
            warm-up or a beta-VAE-style IWAE): lw_k = log p(x|z_k) +
            beta (log p(z_k) - log q(z_k|x)), for every estimator and alpha.
            A tempered bound: for beta != 1 it bounds log of the integral of
            p(x|z) p(z)^beta q(z|x)^(1-beta) over z, not log p(x) (the IWAE
            bound approaches it from below as k grows). At k = 1 it is the
            single-sample Monte Carlo estimate of the beta-ELBO
            E_q[log p(x|z)] - beta KL(q || p), whose expectation that is
            (fastvae.elbo uses the analytic KL instead). "dreg" weights the
            encoder's path derivatives by v_k (1 - beta (1-alpha) (1 - v_k)),
            from the tempered lw, so it stays unbiased for the tempered bound.
            Accepted as elbo's beta (a 0-d tensor schedule is used as is, no
            host sync); beta = 1.0 adds no operation. Evaluate models with
            the untempered bound.

    Returns:
        The bound, a scalar (or per-example for reduction="none"); float32
        for half-precision encoder or decoder outputs, as fastvae.elbo's.

    All three estimators compile under torch.compile(fullgraph=True) ("dreg"'s
    backward hook on z is traced by Dynamo; the compiled gradients equal the
    eager ones). A generator must be created outside the compiled function.
    For the terms as well (reconstruction, KL, ESS, log-weights), use
    fastvae.iwae_terms.
    """
    if prior is not None or type(mu) is not Tensor:  # the default call (x, mu, logvar, decode) skips the helper
        mu, logvar, decode, prior = _gaussian_call(mu, logvar, decode, prior)
    bound = _lean_iwae(x, mu, logvar, decode, k, likelihood, estimator, alpha, beta, reduction, generator, prior)
    if bound is not None:
        return bound
    bound = _iwae(
        x, mu, logvar, decode, k=k, likelihood=likelihood, estimator=estimator,
        alpha=alpha, beta=beta, reduction=reduction, generator=generator, prior=prior,
    )[0]
    return _reduce(bound, reduction)  # no ESS pass: only iwae_terms reports it
