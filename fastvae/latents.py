"""Latent families beyond the Gaussian: posteriors (and priors)
that the objectives and the evaluation take wherever a DiagonalNormal goes.

- ``LocationScale(family, loc, log_scale)``: z = loc + exp(log_scale) * e with
  e the standardized "uniform" (on (0, 1)), "laplace", "logistic", "gumbel"
  or "cauchy" variate, per latent dimension; sampled with log q(z) by the
  fused ``sample_location_scale`` op (one kernel pair, the inverse CDF a
  compile-time variant).
- ``LogNormal(mu, logvar)``: z = exp(y), y ~ N(mu, diag(exp(logvar))).
- ``LogisticNormal(mu, logvar)``: z = stick_breaking(y) on the simplex of
  L + 1 components, torch's ``LogisticNormal``. Both transforms draw y with the
  fused ``sample_normal`` (its exact log-ratio gives log q(y)) and add the
  transform's log-Jacobian; no new kernel.

- ``Positive(family, ...)``: the inverse-CDF families on (0, inf) and (0, 1),
  "exponential", "weibull" and "kumaraswamy", sampled with log q by the fused
  ``sample_positive``.
- ``Concrete(logits, temperature, hard)``: the relaxed categorical (Gumbel-
  softmax) over C categories per latent, and its straight-through one-hot
  (``hard=True``), sampled with log q by the fused ``sample_concrete``;
  ``BinaryConcrete(logits, temperature, hard)``, the relaxed Bernoulli (torch's
  ``RelaxedBernoulli``), is its first component for the logits (logits, 0).

The file keeps one section per mechanism (location-scale and the normal
transforms, the positive families, the relaxed categorical), then the list of
records (``LATENTS``) and ``from_torch``, which maps the torch.distributions
objects users have to these records: Laplace, Uniform, Gumbel, Cauchy,
LogNormal, LogisticNormal, Exponential, Weibull, Kumaraswamy,
RelaxedOneHotCategorical, RelaxedBernoulli and ``Independent`` of one (logistic has no torch
class: use the record).

Every record offers what the objectives call (one generic branch there):
``rsample_with_log_q(K, generator, stop_score)`` -> (z (K, ..., Lz), log q (K, ...)),
``rsample_with_log_ratio(K, generator, stop_score, prior, dreg)`` -> (z, log p - log q,
the term DReG's hook scales) for the importance weights,
``analytic_kl(prior)`` -> KL (...) or None (no closed form: the Monte Carlo
estimate from the same samples), ``kl_per_dim(prior)`` (free bits),
``draw_at(...)`` (the evaluation's noise layout), ``rows(b0, b1)``,
``log_prob(z)``, ``rsample`` and ``torch_distribution()``. ``mu`` is the
location tensor (..., L): it carries the batch shape, dtype and device, as a
DiagonalNormal's mu does.

Closed-form KLs (summed over L): Laplace-Laplace, uniform-uniform, Gumbel-Gumbel,
Cauchy-Cauchy, log-normal-log-normal and logistic-normal-logistic-normal (the
KL of the underlying normals: the transforms are bijections). The prior is a
torch object of the same family (or an ``Independent`` of one, or a record of
shape (L,)); anything else, torch Normal and StandardNormal included, gives
the Monte Carlo KL.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Beta,
    Cauchy,
    Distribution,
    Exponential,
    Gumbel,
    Independent,
    Kumaraswamy,
    Laplace,
    OneHotCategorical,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
    TransformedDistribution,
    Uniform,
    Weibull,
    constraints,
)
from torch.distributions import (
    LogisticNormal as TorchLogisticNormal,
)
from torch.distributions import (
    LogNormal as TorchLogNormal,
)
from torch.distributions.transforms import AffineTransform, SigmoidTransform, StickBreakingTransform

from . import _backend, _validate, _value_checks
from . import priors as _priors
from ._families import KL_FAMILIES, KUMARASWAMY_KL_TERMS, POSITIVE_FAMILIES
from ._families import LOCATION_SCALE_FAMILIES as FAMILIES  # the location-scale families, exported
from .distributions import DiagonalNormal, PosteriorShapes, widened
from .ops.family_kl.op import family_kl
from .ops.kl_normal.op import kl_normal
from .ops.sample_family.op import (
    PARAMETERS,
    check_params,
    concrete_at,
    location_scale_at,
    location_scale_index,
    location_scale_ratio_at,
    positive_at,
    sample_concrete_unchecked,
    sample_location_scale_kl_unchecked,
    sample_location_scale_ratio_unchecked,
    sample_location_scale_unchecked,
    sample_positive_kl_unchecked,
    sample_positive_unchecked,
)
from .ops.sample_family.op import check_args as _concrete_args
from .ops.sample_normal.op import sample_at, sample_normal_unchecked, sample_normal_with_ratio_unchecked
from .ops.stick_breaking.op import stick_breaking_unchecked
from .priors import MixtureOfGaussians, StandardNormal, TorchPrior, VampPrior

LOG_2PI = math.log(2.0 * math.pi)
EULER_GAMMA = 0.5772156649015329
_TORCH_CLASSES = {Uniform: "uniform", Laplace: "laplace", Gumbel: "gumbel", Cauchy: "cauchy"}
_GAUSSIAN_PRIORS = (StandardNormal, DiagonalNormal, MixtureOfGaussians, VampPrior)  # densities on R^L


def _gaussian_prior_name(prior) -> str:
    """How an error names a Gaussian prior: prior=None's default, or the class passed."""
    return "the default prior N(0, I) (prior=None)" if prior is _priors.DEFAULT else f"a {type(prior).__name__} prior"


def _per_sample(n_samples: int | None, z: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    return (z[0], log_q[0]) if n_samples is None else (z, log_q)


class _Latent(PosteriorShapes):
    """What every record shares: mu (..., L), its shapes and the generic ELBO draw."""

    def rsample(self, n_samples: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterized z: (..., Lz), or (K, ..., Lz) for n_samples=K (fused)."""
        K = 1 if n_samples is None else _validate.positive_int("n_samples", n_samples)
        z, log_q = self.rsample_with_log_q(K, generator, False)
        return _per_sample(n_samples, z, log_q)[0]

    def rsample_with_log_ratio(self, n_samples: int, generator, stop_score: bool, prior,
                               dreg: bool) -> tuple[Tensor, Tensor, Tensor]:
        """The importance weights' draw: (z (K, ..., Lz), log p(z) - log q(z)
        (K, ...), and the term whose gradient reaches the encoder outside z,
        which DReG's hook scales: log q here). stop_score: log q's parameters
        get no score (STL / DReG); ``dreg``: DReG will scale that term's
        gradient."""
        z, log_q = self.rsample_with_log_q(n_samples, generator, stop_score)
        return z, prior.log_prob(z) - log_q, log_q

    def sample_with_kl(self, n_samples: int | None, prior, generator) -> tuple[Tensor, Tensor, bool]:
        """(z, kl, analytic) for the ELBO: the closed-form KL (...) where
        analytic_kl has one, else log q(z) - log p(z) per sample ((K, ...) for
        n_samples=K, (...) for None), from the same z the decoder gets."""
        K = 1 if n_samples is None else n_samples
        z, log_q = self.rsample_with_log_q(K, generator, False)
        kl = self.analytic_kl(prior)
        analytic = kl is not None
        if not analytic:
            kl = log_q - prior.log_prob(z)
        if n_samples is None:
            z = z[0]
            kl = kl if analytic else kl[0]
        return z, kl, analytic

    def _kl(self, prior, reduce: bool) -> Tensor | None:
        """The closed-form KL against prior, summed over L (reduce) or per
        dimension (..., L); None where there is none (the Monte Carlo KL).
        A family with closed forms defines this one method; the others
        define analytic_kl and kl_per_dim themselves."""
        return None

    def analytic_kl(self, prior) -> Tensor | None:
        """The analytic KL summed over the latent dimensions (...), or None."""
        return self._kl(prior, True)

    def kl_per_dim(self, prior) -> Tensor | None:
        """The analytic KL of each latent dimension (..., L), or None."""
        return self._kl(prior, False)

    def mc_kl_splits(self, prior) -> bool:
        """Whether the Monte Carlo KL against this prior splits by latent
        (sample_with_mc_kl_per_dim): log q and log p of each latent from the
        same samples. False here: the samplers give log q summed over L."""
        return False

    def point(self) -> Tensor:
        """A z of the latent space's shape (..., Lz) with no noise drawn: the
        transform of the location (the evaluation's decoder-width probe)."""
        return self.mu

    def resolve_prior(self, prior, use: str):
        """The prior this posterior takes in ``use`` ("elbo", "iwae" or
        "evaluation"), given check_prior's answer: the prior itself here (the
        default N(0, I) has a density wherever z lies). The families on a
        simplex put their own default in place of N(0, I), or refuse it by name."""
        return prior

    def __repr__(self) -> str:
        return f"{type(self).__name__}(latent_size={self.latent_size}, batch_shape={tuple(self.batch_shape)})"


# LocationScale's importance weights take log q - log p from the sampler's kernels where
# _own_prior allows; False: from the prior's log_prob (the benchmarks' and tests' other arm)
RATIO_IN_KERNELS = True


def _validates(dist) -> bool:
    """Whether a torch distribution (or the one an Independent wraps) checks its arguments."""
    return bool((dist.base_dist if isinstance(dist, Independent) else dist)._validate_args)


def _refuse_as_torch_would(prior, z: Tensor, ratio: Tensor) -> None:
    """Torch's own error where a validating torch prior refuses z (a uniform's
    z outside its support, where the sampler's log q - log p is inf)."""
    if isinstance(prior, TorchPrior) and _validates(prior.dist) and not bool(torch.isfinite(ratio).all()):
        with torch.no_grad():
            prior.dist.log_prob(z)


def _own_prior(q: LocationScale, prior) -> tuple[Tensor, Tensor] | None:
    """The (L,) parameters (location, scale; a uniform's low, high) of a prior
    of q's own family, for the sampler's fused log-ratio: a torch Laplace,
    Gumbel, Cauchy or Uniform (or an Independent of one over L) whose
    parameters are of shape () or (L,), or this family's record of shape
    (L,), in q's dtype (float32 or float64) and device, with q on the cpp
    backend, eager, N L > 0. None for anything else (the prior's own log_prob)."""
    loc = q.loc
    if (loc.dtype not in (torch.float32, torch.float64) or q.log_scale.dtype is not loc.dtype or loc.numel() == 0
            or _backend.compiling() or _backend.backend_for(loc.device) != "cpp"):
        return None
    L = loc.shape[-1]
    if isinstance(prior, LocationScale):
        if prior.family != q.family:
            return None
        a, b = prior.loc, torch.exp(prior.log_scale)
        if q.family == "uniform":
            b = a + b
    elif isinstance(prior, TorchPrior):
        dist = prior.dist
        base, n = (dist.base_dist, dist.reinterpreted_batch_ndims) if isinstance(dist, Independent) else (dist, 0)
        if _TORCH_CLASSES.get(type(base)) != q.family or n > 1:
            return None
        a, b = (base.low, base.high) if type(base) is Uniform else (base.loc, base.scale)
    else:
        return None
    if any(t.dtype is not loc.dtype or t.device != loc.device or t.shape not in ((), (L,)) for t in (a, b)):
        return None
    return a.expand(L), b.expand(L)


class LocationScale(_Latent):
    """z = loc + exp(log_scale) * e per latent dimension, e of a standardized family.

    Args:
        family: "uniform" (z uniform on (loc, loc + scale)), "laplace",
            "logistic", "gumbel" or "cauchy".
        loc, log_scale: tensors of the same shape (..., L) (no batch shape for
            a prior); scale = exp(log_scale), so every value is valid.
    """

    def __init__(self, family: str, loc: Tensor, log_scale: Tensor):
        self.index = location_scale_index(family)
        _validate.float_tensors(loc=loc, log_scale=log_scale)
        _validate.event_dim("loc", loc)
        _validate.same_shape(loc=loc, log_scale=log_scale)
        self.family, self.loc, self.log_scale = family, loc, log_scale

    @property
    def mu(self) -> Tensor:
        return self.loc

    def rsample_with_log_q(self, n_samples: int, generator, stop_score: bool) -> tuple[Tensor, Tensor]:
        """(z (K, ..., L), log q(z) (K, ...)) from the fused op; stop_score: log q's
        parameters get no score, z keeps its path (STL / DReG)."""
        return sample_location_scale_unchecked(self.index, self.loc, self.log_scale, n_samples, stop_score, generator)

    def rsample_with_log_ratio(self, n_samples: int, generator, stop_score: bool, prior,
                               dreg: bool) -> tuple[Tensor, Tensor, Tensor]:
        """As _Latent's; on the cpp backend, for a prior of this family with
        (L,) parameters (_own_prior), log q(z) - log p(z) comes from the
        sampler's kernels in one pass each way, and the whole term reaches
        the encoder inside them (DReG scales it all: not with a prior that
        learns, whose gradient DReG must leave alone). A torch prior that
        validates its arguments still raises torch's error at a z it refuses."""
        params = _own_prior(self, prior) if RATIO_IN_KERNELS else None
        if params is None or (dreg and any(t.requires_grad for t in params)):
            return super().rsample_with_log_ratio(n_samples, generator, stop_score, prior, dreg)
        z, ratio = sample_location_scale_ratio_unchecked(self.index, self.loc, self.log_scale, *params, n_samples,
                                                         stop_score, generator)
        _refuse_as_torch_would(prior, z, ratio)
        latent = -ratio
        return z, latent, latent

    def draw_at(self, seed: Tensor, n_samples: int, offset0: int, sample_stride: int, row_stride: int,
                prior) -> tuple[Tensor, Tensor | None]:
        """(z, log p(z) - log q(z) or None when prior is None) at the evaluation's offsets (no gradient);
        for a prior of this family that _own_prior takes, from the sampler's kernels, as rsample_with_log_ratio's."""
        params = _own_prior(self, prior) if RATIO_IN_KERNELS and prior is not None else None
        if params is not None:
            z, ratio = location_scale_ratio_at(self.index, self.loc, self.log_scale, *params, seed, n_samples,
                                               offset0=offset0, sample_stride=sample_stride, row_stride=row_stride)
            _refuse_as_torch_would(prior, z, ratio)
            return z, -ratio
        z, log_q = location_scale_at(self.index, self.loc, self.log_scale, seed, n_samples, offset0=offset0,
                                     sample_stride=sample_stride, row_stride=row_stride)
        return z, None if prior is None else prior.log_prob(z) - log_q

    def rows(self, b0: int, b1: int) -> LocationScale:
        return LocationScale(self.family, self.loc[b0:b1], self.log_scale[b0:b1])

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z) summed over L for a given z (..., L) broadcasting against the
        batch shape (plain torch: the objectives take log q of their own samples
        from the noise instead)."""
        _validate.float_tensors(z=z)
        z, loc, ls = widened(z, self.loc, self.log_scale)
        e = (z - loc) * torch.exp(-ls)
        if self.family == "uniform":
            inside = (z >= loc) & (z < loc + torch.exp(ls))
            return torch.where(inside, -ls, -math.inf).sum(-1)
        if self.family == "laplace":
            log_f = -e.abs() - math.log(2.0)
        elif self.family == "logistic":
            log_f = -e - 2.0 * torch.nn.functional.softplus(-e)
        elif self.family == "gumbel":
            log_f = -e - torch.exp(-e)
        else:
            log_f = -math.log(math.pi) - torch.log1p(e * e)
        return (log_f - ls).sum(-1)

    def torch_distribution(self) -> Distribution:
        """The torch.distributions equivalent, Independent over L."""
        scale = torch.exp(self.log_scale)
        if self.family == "uniform":
            base = Uniform(self.loc, self.loc + scale)
        elif self.family == "logistic":  # torch has no Logistic class: its usual construction
            base = TransformedDistribution(Uniform(torch.zeros_like(self.loc), torch.ones_like(self.loc)),
                                           [SigmoidTransform().inv, AffineTransform(self.loc, scale)])
        else:
            base = {"laplace": Laplace, "gumbel": Gumbel, "cauchy": Cauchy}[self.family](self.loc, scale)
        return Independent(base, 1)

    def _kl(self, prior, reduce: bool) -> Tensor | None:
        """The closed-form KL against a same-family prior, summed over L
        (reduce) or per dimension (..., L), from the fused family_kl; None for
        any other prior and for the logistic (no closed form)."""
        if self.family not in KL_FAMILIES:
            return None
        p = _prior_location_scale(prior, self.family)
        if p is None:
            return None
        return family_kl(self.family, (self.loc, self.log_scale), p, reduce=reduce)

    def sample_with_kl(self, n_samples: int | None, prior, generator) -> tuple[Tensor, Tensor, bool]:
        """The ELBO's draw: against a prior of this family with a closed form,
        z and the KL from one fused call each way (sample_location_scale_kl:
        the sampler's z, family_kl's KL, the same bits), no log q formed;
        else the general draw (_Latent.sample_with_kl)."""
        p = _prior_location_scale(prior, self.family) if self.family in KL_FAMILIES else None
        if p is None or not _fuses(self.loc, self.log_scale, *p):
            return super().sample_with_kl(n_samples, prior, generator)
        z, kl = sample_location_scale_kl_unchecked(self.index, KL_FAMILIES.index(self.family), self.loc,
                                                   self.log_scale, *p, 1 if n_samples is None else n_samples,
                                                   generator)
        return (z.squeeze(0) if n_samples is None else z), kl, True


def _fuses(loc: Tensor, log_scale: Tensor, p_loc, p_log_scale) -> bool:
    """Whether the fused draw and KL take these parameters: tensors of one
    float32 or float64 dtype and one device (its kernels' types), the prior's
    broadcastable to q's shape, outside autocast; else the two ops (which
    widen half precision, and name a prior that does not broadcast)."""
    plain = _backend.PLAIN_TYPES
    return (type(p_loc) in plain and type(p_log_scale) in plain and loc.dtype in (torch.float32, torch.float64)
            and log_scale.dtype is loc.dtype and p_loc.dtype is loc.dtype and p_log_scale.dtype is loc.dtype
            and log_scale.device == loc.device and p_loc.device == loc.device and p_log_scale.device == loc.device
            and not torch.is_autocast_enabled(loc.device.type)
            and all(_validate.broadcasts_to(t.shape, loc.shape) for t in (p_loc, p_log_scale)))



def _standard_normal_prior(p_mu: Tensor, p_lv: Tensor) -> bool:
    """Whether a prior's underlying normal is N(0, I) with no gradient to its
    parameters: then the sampler's own KL(q || N(0, I)) is the KL, and the
    fused kl_normal is not run. Checked where reading the (L,) parameters is
    free: CPU tensors in eager mode (on CUDA it would be a host sync)."""
    if _backend.compiling() or p_mu.requires_grad or p_lv.requires_grad:
        return False
    if p_mu.device.type != "cpu" or p_lv.device.type != "cpu":
        return False
    return not bool(p_mu.any()) and not bool(p_lv.any())


def _saved(ctx, y: Tensor, z: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """The end of a transform's (z, log q(z)) forward: y and z saved, the
    outputs returned; an output without a gradient reaches the backward as None."""
    ctx.save_for_backward(y, z)
    ctx.set_materialize_grads(False)
    return z, log_q


class _LogNormalTerms(torch.autograd.Function):
    """(z, log q(z)) = (exp(y), log N(y; 0, I) - ratio - sum_l y) from the
    sampler's y and exact log-ratio log N(y; 0, I) - log q(y): one pass over y
    each way (autograd of the torch composition makes about eight). Backward:
    dy = dz * z - dlog_q * (y + 1), dratio = -dlog_q."""

    @staticmethod
    def forward(ctx, y: Tensor, ratio: Tensor):
        (yw,) = widened(y)
        z = torch.exp(y)
        # sum_l (y + y^2 / 2): log N(y; 0, I) - sum_l y = -that - L log(2 pi) / 2
        log_q = -torch.addcmul(yw, yw, yw, value=0.5).sum(-1) - (0.5 * y.shape[-1] * LOG_2PI) - ratio
        return _saved(ctx, y, z, log_q)

    @staticmethod
    def backward(ctx, grad_z, grad_log_q):
        y, z = ctx.saved_tensors
        dy = None if grad_z is None else grad_z * z
        if grad_log_q is None:
            return dy, None
        g = grad_log_q.unsqueeze(-1).to(y.dtype)
        if torch.is_grad_enabled() or dy is None:  # create_graph=True (or no dz): out of place
            dq = -g * (y + 1.0)
            dy = dq if dy is None else dy + dq
        else:
            dy = dy.addcmul_(g, y, value=-1.0).sub_(g)
        return dy, -grad_log_q


class _StickBreakingTerms(torch.autograd.Function):
    """(z, log q(z)) of z = stick_breaking(y) on the simplex of M + 1 components
    from the sampler's y (..., M) and exact log-ratio, in log space: with
    x_j = y_j - log(M - j) and S_j = sum_{i <= j} softplus(x_i),
    z_j = exp(x_j - S_j) (j < M), z_M = exp(-S_{M-1}) and
    log|det dz/dy| = sum_j (x_j - (M + 1 - j) softplus(x_j)) (torch's
    StickBreakingTransform and its log_abs_det_jacobian, without its clipped
    sigmoid: no z is 0 or 1 before it underflows). log q(z) = log N(y; 0, I) -
    ratio - log|det|. Backward: with g_j = dz_j z_j, R_j = sum_{i >= j} g_i and
    sigma = sigmoid(x), dy_j = g_j - sigma_j R_j + dlog_q (w_j sigma_j - y_j - 1),
    w_j = M + 1 - j; dratio = -dlog_q."""

    @staticmethod
    def forward(ctx, y: Tensor, ratio: Tensor):
        (yw,) = widened(y)
        M = yw.shape[-1]
        steps = torch.arange(M, 0, -1, dtype=yw.dtype, device=yw.device)  # M - j
        x = yw - torch.log(steps)
        sp = torch.nn.functional.softplus(x)
        S = torch.cumsum(sp, -1)
        z = torch.empty((*yw.shape[:-1], M + 1), dtype=y.dtype, device=y.device)
        z[..., :M] = torch.exp(x - S)
        z[..., M] = torch.exp(-S[..., -1])
        # -log N(y; 0, I) + log|det|, per element: y^2 / 2 + x - (w) softplus(x), w = M + 1 - j
        per = torch.addcmul(x, yw, yw, value=0.5).sub_(sp * (steps + 1.0))
        log_q = -per.sum(-1) - (0.5 * M * LOG_2PI) - ratio
        return _saved(ctx, y, z, log_q)

    @staticmethod
    def backward(ctx, grad_z, grad_log_q):
        y, z = ctx.saved_tensors
        (yw,) = widened(y)
        M = yw.shape[-1]
        steps = torch.arange(M, 0, -1, dtype=yw.dtype, device=yw.device)
        sigma = torch.sigmoid(yw - torch.log(steps))
        dy = None
        if grad_z is not None:
            (g,) = widened(grad_z * z)
            total = g.sum(-1, keepdim=True)
            head = g[..., :M]
            R = total - torch.cumsum(head, -1) + head  # sum_{i >= j} g_i
            dy = head - sigma * R
        if grad_log_q is not None:
            gq = grad_log_q.unsqueeze(-1).to(yw.dtype)
            dq = gq * (sigma * (steps + 1.0) - yw - 1.0)
            dy = dq if dy is None else dy + dq
        return (None if dy is None else dy.to(y.dtype)), (None if grad_log_q is None else -grad_log_q)


def stick_breaking(y: Tensor) -> Tensor:
    """z = stick_breaking(y) on the simplex of M + 1 components for y (..., M):
    torch's StickBreakingTransform in log space, one fused op
    (fastvae.stick_breaking, without its argument checks: y is a sample of
    the checked posterior)."""
    return stick_breaking_unchecked(y)


class _NormalTransform(_Latent):
    """z = T(y), y ~ N(mu, diag(exp(logvar))): y and log q(y) from the fused sampler."""

    def __init__(self, mu: Tensor, logvar: Tensor):
        _validate.float_tensors(mu=mu, logvar=logvar)
        _validate.event_dim("mu", mu)
        _validate.same_shape(mu=mu, logvar=logvar)
        self.mu, self.logvar = mu, logvar

    def _transform(self, y: Tensor, log_q_y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _z(self, y: Tensor) -> Tensor:
        """The transform alone (no log-Jacobian): the ELBO with a closed-form KL."""
        raise NotImplementedError

    def rsample_with_log_q(self, n_samples: int, generator, stop_score: bool) -> tuple[Tensor, Tensor]:
        """(z, log q(z)): y from sample_normal with its exact log N(y; 0, I) - log q(y)
        (stop_score: STL / DReG, as the Gaussian's), then the transform and its
        log-Jacobian along y's path (one autograd node: _LogNormalTerms,
        _StickBreakingTerms)."""
        y, _, ratio = sample_normal_with_ratio_unchecked(self.mu, self.logvar, n_samples, stop_score, generator)
        return self._terms.apply(y, ratio)

    def rsample_with_log_q_and_kl(self, n_samples: int, prior, generator=None) -> tuple[Tensor, Tensor, Tensor]:
        """(z (K, ..., Lz), log q(z) (K, ...), KL(q || prior) (...)) from one
        sampler call, for a prior of this family (the closed form); against
        N(0, I) underneath (a CPU prior of zeros) the sampler's own KL."""
        p = self._prior_normal(prior)
        if p is None:
            raise ValueError(f"prior: the closed-form KL of a {type(self).__name__} posterior needs a prior of the "
                             f"same family, got {_prior_name(prior)}")
        y, kl, ratio = sample_normal_with_ratio_unchecked(self.mu, self.logvar, n_samples, False, generator)
        z, log_q = self._terms.apply(y, ratio)
        return z, log_q, kl if _standard_normal_prior(*p) else self.analytic_kl(prior)

    def sample_with_kl(self, n_samples: int | None, prior, generator) -> tuple[Tensor, Tensor, bool]:
        """The ELBO's draw: with a closed-form KL, z from sample_normal (no log q
        is formed) and the sampler's KL when the prior is N(0, I) underneath;
        else the Monte Carlo KL from the same samples."""
        p = self._prior_normal(prior)
        if p is None:
            return super().sample_with_kl(n_samples, prior, generator)
        y, kl = sample_normal_unchecked(self.mu, self.logvar, n_samples, generator)
        return self._z(y), (kl if _standard_normal_prior(*p) else self.analytic_kl(prior)), True

    def draw_at(self, seed: Tensor, n_samples: int, offset0: int, sample_stride: int, row_stride: int,
                prior) -> tuple[Tensor, Tensor | None]:
        drawn = sample_at(self.mu, self.logvar, seed, n_samples, offset0=offset0, sample_stride=sample_stride,
                          row_stride=row_stride, with_ratio=prior is not None)
        if prior is None:
            return self._z(drawn), None
        y, ratio = drawn
        z, log_q = self._terms.apply(y, ratio)
        return z, prior.log_prob(z) - log_q

    def rows(self, b0: int, b1: int):
        return type(self)(self.mu[b0:b1], self.logvar[b0:b1])

    def _prior_normal(self, prior) -> tuple[Tensor, Tensor] | None:
        """The prior's underlying normal (mu, logvar) when it is this family's, else None."""
        if isinstance(prior, type(self)):
            return prior.mu, prior.logvar
        dist = prior.dist if isinstance(prior, TorchPrior) else None
        base = dist.base_dist if isinstance(dist, Independent) else dist
        if type(base) is self._torch_class:
            return base.loc, 2.0 * torch.log(base.scale)
        return None

    def analytic_kl(self, prior) -> Tensor | None:
        """KL of the underlying normals (the transform is a bijection), fused kl_normal."""
        p = self._prior_normal(prior)
        if p is None:
            return None
        p_mu, p_lv = (t.expand(self.mu.shape[-1:]) if t.dim() <= 1 else t.expand(self.mu.shape) for t in p)
        return kl_normal(self.mu, self.logvar, p_mu, p_lv)

    def kl_per_dim(self, prior) -> Tensor | None:
        p = self._prior_normal(prior)
        if p is None:
            return None
        p_mu, p_lv = (t.expand(self.mu.shape[-1:]) if t.dim() <= 1 else t.expand(self.mu.shape) for t in p)
        return kl_normal(self.mu.unsqueeze(-1), self.logvar.unsqueeze(-1), p_mu.unsqueeze(-1), p_lv.unsqueeze(-1))


class LogNormal(_NormalTransform):
    """z = exp(y), y ~ N(mu, diag(exp(logvar))) over the last dimension L
    (torch's LogNormal(mu, exp(logvar / 2))): scVI's library size."""

    _torch_class = TorchLogNormal
    _terms = _LogNormalTerms

    def _z(self, y: Tensor) -> Tensor:
        return torch.exp(y)

    def point(self) -> Tensor:
        return torch.exp(self.mu)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z) summed over L for a given z > 0."""
        return self.torch_distribution().log_prob(widened(z)[0])

    def torch_distribution(self) -> Distribution:
        mu, lv = widened(self.mu, self.logvar)
        return Independent(TorchLogNormal(mu, torch.exp(0.5 * lv)), 1)


class LogisticNormal(_NormalTransform):
    """z = stick_breaking(y) on the simplex of L + 1 components, y ~ N(mu,
    diag(exp(logvar))): torch's LogisticNormal(mu, exp(logvar / 2)) (ProdLDA-style
    topic proportions). The decoder gets z of L + 1 components."""

    _torch_class = TorchLogisticNormal
    _terms = _StickBreakingTerms

    def _z(self, y: Tensor) -> Tensor:  # the same log-space z as rsample_with_log_q's
        return stick_breaking_unchecked(y)

    def point(self) -> Tensor:
        return StickBreakingTransform()(self.mu)

    def resolve_prior(self, prior, use: str):
        """A Gaussian prior (prior=None's N(0, I) included) is refused by name:
        z lies on a simplex of L + 1 components, a set of no volume in R^(L+1),
        so log q(z) - log p(z) would mix densities of two dimensions."""
        if isinstance(prior, _GAUSSIAN_PRIORS):
            L = self.latent_size
            raise ValueError(f"prior: a LogisticNormal posterior's z lies on the simplex of L + 1 = {L + 1} "
                             f"components, where {_gaussian_prior_name(prior)} has no density; pass "
                             f"prior=torch.distributions.LogisticNormal(torch.zeros({L}), torch.ones({L})) (the "
                             f"family's standard prior) or another prior on the simplex")
        return prior

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z) for a given z on the simplex (..., L + 1)."""
        return self.torch_distribution().log_prob(widened(z)[0])

    def torch_distribution(self) -> Distribution:
        mu, lv = widened(self.mu, self.logvar)
        return TorchLogisticNormal(mu, torch.exp(0.5 * lv))


_LOCATION_SCALE_AND_TRANSFORMS = (LocationScale, LogNormal, LogisticNormal)


def _prior_location_scale(prior, family: str) -> tuple[Tensor, Tensor] | None:
    """(loc, log_scale) of a prior of the given location-scale family: a record
    of that family, or a torch object (or Independent of one) wrapped by check_prior."""
    if isinstance(prior, LocationScale):
        return (prior.loc, prior.log_scale) if prior.family == family else None
    if not isinstance(prior, TorchPrior):
        return None
    dist = prior.dist
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if _TORCH_CLASSES.get(type(base)) != family:
        return None
    if family == "uniform":
        return base.low, torch.log(base.high - base.low)
    return base.loc, torch.log(base.scale)


def _log(scale: Tensor) -> Tensor:
    """log of a torch scale in its compute dtype: a half-precision scale's log
    rounded to half precision would move the scale by up to 0.4% (bfloat16)."""
    return torch.log(widened(scale)[0])


def check_torch_scale(base: Distribution) -> Tensor:
    """The value check of a torch Laplace's, Gumbel's or Cauchy's scale, or a
    Uniform's high - low, by name (its log would be NaN); returns what it checked."""
    name = type(base).__name__
    if type(base) is Uniform:
        width = base.high - base.low
        _value_checks.positive_scale(width, f"the posterior's high - low (torch {name})")
        return width
    _value_checks.positive_scale(base.scale, f"the posterior's scale (torch {name})")
    return base.scale


def _location_scale_from_torch(q: Distribution) -> LocationScale | LogNormal | LogisticNormal | None:
    """The record of a torch Laplace, Uniform, Gumbel, Cauchy, LogNormal or
    LogisticNormal (or Independent of one over the last dimension),
    differentiable in its parameters; None for anything else. A scale (or
    high - low) <= 0 is refused by name (its log would be NaN): torch's own
    validation catches it unless validate_args=False."""
    base, n = (q.base_dist, q.reinterpreted_batch_ndims) if isinstance(q, Independent) else (q, 0)
    if type(base) in _TORCH_CLASSES and n <= 1:
        family = _TORCH_CLASSES[type(base)]
        width = check_torch_scale(base)
        if family == "uniform":
            return LocationScale(family, base.low, _log(width))
        return LocationScale(family, base.loc, _log(base.scale))
    if type(base) is TorchLogNormal and n <= 1:
        _value_checks.positive_scale(base.scale, "the posterior's scale (torch LogNormal)")
        return LogNormal(base.loc, 2.0 * _log(base.scale))
    if type(base) is TorchLogisticNormal and n == 0:
        _value_checks.positive_scale(base.scale, "the posterior's scale (torch LogisticNormal)")
        return LogisticNormal(base.loc, 2.0 * _log(base.scale))
    return None


def normal_transform_class(q) -> type | None:
    """LogNormal or LogisticNormal when q is a record of that class or the torch
    object _location_scale_from_torch maps to one (a LogNormal or an
    Independent of one over the last dimension, a LogisticNormal), read with
    no torch op; None for anything else."""
    if type(q) in (LogNormal, LogisticNormal):
        return type(q)
    base, n = (q.base_dist, q.reinterpreted_batch_ndims) if type(q) is Independent else (q, 0)
    if type(base) is TorchLogNormal and n <= 1:
        return LogNormal
    if type(base) is TorchLogisticNormal and n == 0:
        return LogisticNormal
    return None


def normal_transform_record(q) -> LogNormal | LogisticNormal:
    """The record of a posterior normal_transform_class accepts: itself, or
    _location_scale_from_torch's (the torch scale's value check, logvar = 2 log scale)."""
    return q if type(q) in (LogNormal, LogisticNormal) else _location_scale_from_torch(q)


def normal_transform_scale(q) -> tuple[Tensor, Tensor] | None:
    """(loc, scale) of a torch posterior normal_transform_class accepts, as
    given (no torch op, no check: check_normal_transform_scale); None for a
    record (which holds its logvar)."""
    if type(q) in (LogNormal, LogisticNormal):
        return None
    base = q.base_dist if type(q) is Independent else q
    return base.loc, base.scale


def check_normal_transform_scale(scale: Tensor, cls: type) -> None:
    """normal_transform_record's value check of a torch posterior's scale
    (``cls``: LogNormal or LogisticNormal), by name."""
    _value_checks.positive_scale(scale, f"the posterior's scale (torch {cls.__name__})")


def normal_transform_prior(prior, cls: type) -> tuple[Tensor, Tensor, bool] | None:
    """(loc, b, b_is_scale) of the underlying normal of a prior of ``cls``'s
    family, as given (no torch op): a record (b its logvar), a torch object
    of the family (b its scale), as normal_transform_class reads a posterior;
    None for anything else."""
    if type(prior) is cls:
        return prior.mu, prior.logvar, False
    if normal_transform_class(prior) is not cls:
        return None
    base = prior.base_dist if type(prior) is Independent else prior
    return base.loc, base.scale, True


# How location_scale_form's second tensor gives the log-scale (log_scale_of)
LOG_SCALE, SCALE, HIGH = 0, 1, 2


def location_scale_form(d) -> tuple[str, Tensor, Tensor, int] | None:
    """(family, loc, b, form) of a location-scale family's distribution,
    read with no torch op (the objectives' plans read it on every call): a
    record (b its log-scale, form LOG_SCALE), a torch Laplace, Gumbel or
    Cauchy (b its scale, SCALE) or Uniform (loc its low, b its high, HIGH),
    or an Independent of one over the last dimension; None for anything else."""
    if type(d) is LocationScale:
        return d.family, d.loc, d.log_scale, LOG_SCALE
    if type(d) is Independent:
        if d.reinterpreted_batch_ndims != 1:
            return None
        d = d.base_dist
    family = _TORCH_CLASSES.get(type(d))
    if family is None:
        return None
    if family == "uniform":
        return family, d.low, d.high, HIGH
    return family, d.loc, d.scale, SCALE


def positive_form(d, prior: bool = False) -> tuple[str, Tensor, Tensor | None, int] | None:
    """(family, p0, p1, form) of a positive family's distribution, read with
    no torch op (the objectives' plans read it on every call): a record (its
    log parameters, form LOG_SCALE) or a torch Exponential (its rate),
    Weibull (scale, concentration) or Kumaraswamy (concentration1,
    concentration0), each SCALE (the plan's node takes their logs), or an
    Independent of one over the last dimension; p1 None for the
    exponential. ``prior``: the priors with a closed-form KL instead: an
    exponential or a Weibull (a record or a torch object) or a torch Beta
    (concentration1, concentration0), read as the Kumaraswamy's (its KL's
    family); a Kumaraswamy is no prior of a closed form. None for anything else."""
    if type(d) is Positive:
        if prior and d.index == 2:
            return None
        return d.family, d.log_p0, None if d.index == 0 else d.log_p1, LOG_SCALE
    if type(d) is Independent:
        if d.reinterpreted_batch_ndims != 1:
            return None
        d = d.base_dist
    kind = type(d)
    if kind is Exponential:
        return "exponential", d.rate, None, SCALE
    if kind is Weibull:
        return "weibull", d.scale, d.concentration, SCALE
    if kind is (Beta if prior else Kumaraswamy):
        return "kumaraswamy", d.concentration1, d.concentration0, SCALE
    return None


def log_scale_of(loc: Tensor, b: Tensor, form: int) -> Tensor:
    """The log-scale of location_scale_form's (loc, b, form), float32 or
    float64: the same ops as the records' (_location_scale_from_torch's,
    _prior_location_scale's)."""
    if form == LOG_SCALE:
        return b
    return torch.log(b - loc if form == HIGH else b)




# --------------------------------------------------------------------------
# The positive inverse-CDF families: exponential, Weibull, Kumaraswamy
# --------------------------------------------------------------------------


_POSITIVE_TORCH = {Exponential: "exponential", Weibull: "weibull", Kumaraswamy: "kumaraswamy"}


def _support_error(family: str, prior) -> ValueError:
    return ValueError(f"prior: the {family} posterior's z lies in {'(0, 1)' if family == 'kumaraswamy' else '(0, inf)'}"
                      f", outside the support of the prior ({_prior_name(prior)}): the KL is infinite")


def _prior_name(prior) -> str:
    dist = prior.dist if isinstance(prior, TorchPrior) else prior
    base = dist.base_dist if isinstance(dist, Independent) else dist
    return f"torch {type(base).__name__}" if isinstance(base, Distribution) else type(base).__name__


def _covers(support, family: str) -> bool:
    """Whether a torch support contains the posterior's: (0, inf), or (0, 1) for the Kumaraswamy."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support in (constraints.real, constraints.positive, constraints.nonnegative):
        return True
    if isinstance(support, constraints.greater_than):  # greater_than_eq subclasses it
        return float(torch.as_tensor(support.lower_bound).max()) <= 0.0
    if family == "kumaraswamy":
        if support is constraints.unit_interval:
            return True
        if isinstance(support, (constraints.interval, constraints.half_open_interval)):
            return (float(torch.as_tensor(support.lower_bound).max()) <= 0.0
                    and float(torch.as_tensor(support.upper_bound).min()) >= 1.0)
    return False


def _check_prior_support(family: str, prior) -> None:
    """A ValueError naming prior where its support leaves out the posterior's
    (a Beta prior for an exponential posterior, a Normal is fine: MC KL)."""
    if isinstance(prior, Positive):
        if prior.family == "kumaraswamy" and family != "kumaraswamy":
            raise _support_error(family, prior)
        return
    if isinstance(prior, _LOCATION_SCALE_AND_TRANSFORMS):
        if isinstance(prior, LocationScale) and prior.family == "uniform":
            return  # a box: its log_prob says -inf outside, as torch's Uniform does
        if isinstance(prior, LogisticNormal):
            raise _support_error(family, prior)
        return
    if isinstance(prior, TorchPrior):
        try:
            support = prior.dist.support
        except NotImplementedError:
            return
        if isinstance(prior.dist.base_dist if isinstance(prior.dist, Independent) else prior.dist, Uniform):
            return
        if not _covers(support, family):
            raise _support_error(family, prior)


class Positive(_Latent):
    """A positive latent family per dimension, parameters in log space.

    Args:
        family: "exponential" (log_rate), "weibull" (log_scale,
            log_concentration) or "kumaraswamy" (log_a, log_b; z in (0, 1)).
        log_param, log_param2: tensors of one shape (..., L) (no batch shape
            for a prior); log_param2 None for the exponential. Every finite
            value is valid; a NaN or infinity is refused by name.
    """

    def __init__(self, family: str, log_param: Tensor, log_param2: Tensor | None = None):
        self.index, self.log_p0, self.log_p1 = check_params(family, log_param, log_param2)
        self.family = family
        self.log_param2 = log_param2

    @property
    def mu(self) -> Tensor:
        return self.log_p0

    @property
    def params(self) -> dict[str, Tensor]:
        """The log parameters by name (log_rate; log_scale, log_concentration; log_a, log_b)."""
        return dict(zip(PARAMETERS[self.family], (self.log_p0, self.log_p1)))

    def rsample_with_log_q(self, n_samples: int, generator, stop_score: bool) -> tuple[Tensor, Tensor]:
        """(z (K, ..., L), log q(z) (K, ...)) from the fused op (stop_score: STL / DReG)."""
        return sample_positive_unchecked(self.index, self.log_p0, self.log_p1, n_samples, stop_score, generator)

    def draw_at(self, seed: Tensor, n_samples: int, offset0: int, sample_stride: int, row_stride: int,
                prior) -> tuple[Tensor, Tensor | None]:
        if prior is not None:
            _check_prior_support(self.family, prior)
        z, log_q = positive_at(self.index, self.log_p0, self.log_p1, seed, n_samples, offset0=offset0,
                               sample_stride=sample_stride, row_stride=row_stride)
        return z, None if prior is None else prior.log_prob(z) - log_q

    def rows(self, b0: int, b1: int) -> Positive:
        return Positive(self.family, self.log_p0[b0:b1], None if self.index == 0 else self.log_p1[b0:b1])

    def point(self) -> Tensor:
        """The median (t = log 2): a z with no noise drawn."""
        p0, p1 = widened(self.log_p0, self.log_p1)
        t = torch.full_like(p0, math.log(2.0))
        from .ops.sample_family import positive_terms  # declared use (docs/architecture.md, "Layers")
        return positive_terms(self.index, t, torch.log(t), p0, p1, p0.dtype)[0].to(self.log_p0.dtype)

    def torch_distribution(self) -> Distribution:
        """The torch.distributions equivalent, Independent over L."""
        p0, p1 = widened(self.log_p0, self.log_p1)
        if self.index == 0:
            base = Exponential(torch.exp(p0))
        elif self.index == 1:
            base = Weibull(torch.exp(p0), torch.exp(p1))
        else:
            base = Kumaraswamy(torch.exp(p0), torch.exp(p1))
        return Independent(base, 1)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z) summed over L for a given z (torch's log_prob, in the compute dtype)."""
        _validate.float_tensors(z=z)
        return self.torch_distribution().log_prob(widened(z)[0])

    def _kl_prior(self, prior) -> tuple[Tensor, Tensor] | None:
        """The prior's parameters of a closed-form KL, in sample_positive_kl's
        order: an exponential prior's log-rate for the exponential (and a
        detached alias of it, the stand-in second that no formula reads), a
        Weibull's (log scale, log concentration) for the Weibull, a Beta's
        (log alpha, log beta) for the Kumaraswamy; None otherwise."""
        if self.index == 0:
            lp = _prior_log_rate(prior)
            return None if lp is None else (lp, lp.detach())
        if self.index == 1:
            return _prior_weibull(prior)
        beta = _prior_beta(prior)
        return None if beta is None else (_log(beta[0]), _log(beta[1]))

    def _kl(self, prior, reduce: bool) -> Tensor | None:
        """The KL summed over L (reduce) or per dimension (..., L):
        exponential-exponential and Weibull-Weibull in closed form,
        Kumaraswamy-Beta by the truncated series (each the fused family_kl);
        None otherwise (Monte Carlo)."""
        _check_prior_support(self.family, prior)
        p = self._kl_prior(prior)
        if p is None:
            return None
        if self.index == 0:
            return family_kl("exponential", (self.log_p0,), p[:1], reduce=reduce)
        return family_kl(self.family, (self.log_p0, self.log_p1), p, reduce=reduce)

    def sample_with_kl(self, n_samples: int | None, prior, generator) -> tuple[Tensor, Tensor, bool]:
        """The ELBO's draw: against a prior with a closed-form KL (the
        exponential's exponential, the Weibull's Weibull, the Kumaraswamy's
        Beta), z and the KL from
        one fused call each way (sample_positive_kl: the sampler's z,
        family_kl's KL, the same bits), no log q formed; else the general
        draw (_Latent.sample_with_kl)."""
        _check_prior_support(self.family, prior)
        p = self._kl_prior(prior)
        if p is None or not _fuses(self.log_p0, self.log_p1, *p):
            return super().sample_with_kl(n_samples, prior, generator)
        z, kl = sample_positive_kl_unchecked(self.index, KL_FAMILIES.index(self.family), self.log_p0, self.log_p1,
                                             *p, 1 if n_samples is None else n_samples, generator)
        return (z.squeeze(0) if n_samples is None else z), kl, True


def _torch_base(prior):
    if not isinstance(prior, TorchPrior):
        return None
    dist = prior.dist
    return dist.base_dist if isinstance(dist, Independent) else dist


def _prior_log_rate(prior) -> Tensor | None:
    """log rate of an exponential prior (a record or a torch Exponential), else None."""
    if isinstance(prior, Positive):
        return prior.log_p0 if prior.index == 0 else None
    base = _torch_base(prior)
    if type(base) is Exponential:
        _value_checks.positive_param(base.rate, "the prior's rate (torch Exponential)")
        return _log(base.rate)
    return None


def _prior_weibull(prior) -> tuple[Tensor, Tensor] | None:
    """(log scale, log concentration) of a Weibull prior (a record or a torch
    Weibull), else None."""
    if isinstance(prior, Positive):
        return (prior.log_p0, prior.log_p1) if prior.index == 1 else None
    base = _torch_base(prior)
    if type(base) is Weibull:
        _value_checks.positive_param(base.scale, "the prior's scale (torch Weibull)")
        _value_checks.positive_param(base.concentration, "the prior's concentration (torch Weibull)")
        return _log(base.scale), _log(base.concentration)
    return None


def _prior_beta(prior) -> tuple[Tensor, Tensor] | None:
    """(alpha, beta) of a torch Beta prior, else None."""
    base = _torch_base(prior)
    if type(base) is Beta:
        _value_checks.positive_param(base.concentration1, "the prior's concentration1 (torch Beta)")
        _value_checks.positive_param(base.concentration0, "the prior's concentration0 (torch Beta)")
        return base.concentration1, base.concentration0
    return None


def kumaraswamy_beta_kl(log_a: Tensor, log_b: Tensor, alpha: Tensor, beta: Tensor,
                        terms: int = KUMARASWAMY_KL_TERMS) -> Tensor:
    """KL(Kumaraswamy(a, b) || Beta(alpha, beta)) per element (Nalisnick and
    Smyth 2017, appendix), its infinite sum truncated at `terms`:
    (a - alpha) / a (-gamma - psi(b) - 1/b) + log ab + log B(alpha, beta)
    - (b - 1) / b + (beta - 1) b sum_{m=1}^{terms} B(m / a, b) / (m + ab).
    In torch ops, the fused family_kl's oracle: the records' KL is family_kl."""
    from .ops.family_kl import kumaraswamy_beta_terms  # declared use (docs/architecture.md, "Layers")
    return kumaraswamy_beta_terms(*widened(log_a, log_b, alpha, beta), terms=terms)


def _positive_from_torch(q: Distribution) -> Positive | None:
    """The record of a torch Exponential, Weibull or Kumaraswamy (or Independent
    of one over the last dimension); a parameter <= 0 is refused by name."""
    base, n = (q.base_dist, q.reinterpreted_batch_ndims) if isinstance(q, Independent) else (q, 0)
    family = _POSITIVE_TORCH.get(type(base))
    if family is None or n > 1:
        return None
    if family == "exponential":
        _value_checks.positive_param(base.rate, "the posterior's rate (torch Exponential)")
        return Positive(family, _log(base.rate))
    if family == "weibull":
        _value_checks.positive_param(base.scale, "the posterior's scale (torch Weibull)")
        _value_checks.positive_param(base.concentration, "the posterior's concentration (torch Weibull)")
        return Positive(family, _log(base.scale), _log(base.concentration))
    _value_checks.positive_param(base.concentration1, "the posterior's concentration1 (torch Kumaraswamy)")
    _value_checks.positive_param(base.concentration0, "the posterior's concentration0 (torch Kumaraswamy)")
    return Positive(family, _log(base.concentration1), _log(base.concentration0))




# --------------------------------------------------------------------------
# The relaxed categorical: Concrete / Gumbel-softmax, straight-through
# --------------------------------------------------------------------------



def _prior_categorical(prior) -> Tensor | None:
    """log p (C,) or (L, C) of a OneHotCategorical prior (or Independent of one), else None."""
    base = _torch_base(prior)
    if type(base) is OneHotCategorical:
        return base.logits  # normalized by torch
    return None


# prior=None's uniform pmf priors by (family, size, dtype, device): built once,
# as building a torch distribution normalizes and validates its logits (about
# 25 torch ops and 4 host reads), more than the Gumbel-softmax ELBO's KL itself
# costs at a small model's sizes
_UNIFORM_PRIORS: dict = {}


def _uniform_prior(family: type, size: int, logits: Tensor) -> TorchPrior:
    """The uniform ``family`` (OneHotCategorical or Bernoulli) prior of logits
    zeros (size,) in the compute dtype of ``logits`` and on its device, as a
    TorchPrior; cached outside a compiled graph (which builds it in the graph)."""
    dtype = _backend.compute_dtype(logits)
    if _backend.compiling():
        return TorchPrior(family(logits=torch.zeros(size, dtype=dtype, device=logits.device)))
    key = (family, size, dtype, logits.device)
    prior = _UNIFORM_PRIORS.get(key)
    if prior is None:
        with torch.inference_mode(False):  # a plain tensor, which later calls with autograd may use
            prior = TorchPrior(family(logits=torch.zeros(size, dtype=dtype, device=logits.device)))
        _UNIFORM_PRIORS[key] = prior
    return prior


def _hard_relaxed_error(q=None) -> ValueError:
    name, pmf = (type(q).__name__, q._pmf_prior) if q is not None else ("Concrete", "OneHotCategorical")
    return ValueError(f"a {name} posterior with hard=True takes a {pmf} prior (the analytic "
                      f"categorical KL): a relaxed prior's density at the one-hot z is not defined")


def _prior_relaxed(prior) -> Distribution | None:
    """The RelaxedOneHotCategorical of a relaxed prior (torch's, Independent of
    one over L, or a Concrete record of shape (L, C)), whose log_prob of z
    (..., L, C) is log p of each latent (..., L); else None."""
    if type(prior) is Concrete:
        return prior.torch_distribution().base_dist
    base = _torch_base(prior)
    return base if type(base) is RelaxedOneHotCategorical else None


class Concrete(_Latent):
    """The relaxed one-hot categorical (Concrete, Maddison et al. 2017; Gumbel-softmax,
    Jang et al. 2017) of L latents over C categories.

    Args:
        logits: (..., L, C) unnormalized log-probabilities, C >= 2 (-inf masks a
            category: z_c = 0).
        temperature: > 0, a float or a tensor broadcasting to (..., L) (no gradient).
        hard: straight-through: z is the one-hot of the relaxed sample's argmax
            forward and the relaxed sample's gradient backward.

    z has shape (K, ..., L, C): the decoder gets it as torch's
    ``RelaxedOneHotCategorical.rsample`` gives it. ``mu`` is the logits
    flattened to (..., L * C) (the batch shape and the evaluation's noise
    layout: L * C uniforms per example and sample).

    Priors: a ``OneHotCategorical`` (uniform or not; (C,) or (L, C)) gives the
    analytic categorical KL sum_l sum_c pi_c log(pi_c / p_c), pi = softmax(logits),
    what most Gumbel-softmax VAEs optimize (it is not the relaxed KL: ELBO
    only, kl_analytic True). A ``RelaxedOneHotCategorical`` (or Independent of
    one) gives the Monte Carlo KL log q(z) - log p(z) from the same samples
    (torch's log_prob of the relaxed z), as do iwae and log_likelihood. With
    hard=True the decoder's z is one-hot, where a relaxed density is not
    defined: it takes the categorical prior only, in elbo (the analytic KL) and
    in log_likelihood / evaluate, whose weights are then the categorical pmfs'
    ratio p(z) / pi(z) at the one-hot z (distributed as Categorical(pi) by the
    Gumbel-max trick): an estimate of the discrete model's log p(x).
    """

    _pmf_prior, _relaxed_prior = "OneHotCategorical", "RelaxedOneHotCategorical"  # in the error messages

    def __init__(self, logits: Tensor, temperature: float | Tensor, hard: bool = False):
        self.temperature = _concrete_args(logits, temperature)
        self.logits = logits
        self.hard = bool(hard)

    def _out(self, z: Tensor) -> Tensor:
        """The decoder's z of the sampler's simplex point z (..., L, C): itself here."""
        return z

    def _uniform_pmf(self) -> TorchPrior:
        """The uniform categorical prior over the C categories of every latent."""
        return _uniform_prior(OneHotCategorical, self.categories, self.logits)

    def _relaxed_prior_code(self) -> str:
        """The uniform relaxed prior of this shape, as code for an error message."""
        L, C = self.logits.shape[-2:]
        return f"torch.distributions.RelaxedOneHotCategorical(torch.tensor(temperature), logits=torch.zeros({L}, {C}))"

    def resolve_prior(self, prior, use: str):
        """prior=None gives the uniform categorical prior (docs/latents.md: a
        uniform OneHotCategorical, a BinaryConcrete's Bernoulli(1/2)) where it
        applies: elbo (the analytic categorical KL) and, with hard=True, the
        evaluation's weights of the one-hot z. iwae, and the evaluation of a
        relaxed posterior, need a density at the relaxed z: no default is
        taken there (the relaxed prior's temperature is the model's choice)
        and a ValueError says which prior to pass. A Gaussian prior passed on
        purpose is refused by name: it has no density on the simplex."""
        if not isinstance(prior, _GAUSSIAN_PRIORS):
            return prior
        name, pmf, relaxed = type(self).__name__, self._pmf_prior, self._relaxed_prior
        if prior is not _priors.DEFAULT:
            raise ValueError(f"prior: a {name} posterior's z lies on the simplex, where a {type(prior).__name__} "
                             f"prior has no density; pass a {pmf} prior (the analytic categorical KL) or a "
                             f"{relaxed} prior, e.g. prior={self._relaxed_prior_code()}")
        if use == "iwae" and self.hard:
            self.rsample_with_log_q(1, None, False)  # the named error: no density at the one-hot z
        if use == "elbo" or self.hard:
            return self._uniform_pmf()
        use = "log_likelihood / evaluate" if use == "evaluation" else use
        raise ValueError(f"prior: {use} of a relaxed {name} posterior needs a prior with a density at the relaxed "
                         f"z, and prior=None's uniform {pmf} prior (elbo's default) has none; pass a {relaxed} "
                         f"prior, e.g. the uniform prior={self._relaxed_prior_code()} (its temperature is part "
                         f"of the model: the posterior's is a common choice)")

    def _prior_pmf(self, prior) -> Tensor | None:
        """log p (C,) or (L, C) of the categorical prior this record takes, else None."""
        return _prior_categorical(prior)

    def _prior_relaxed_dist(self, prior) -> Distribution | None:
        """The relaxed prior's per-latent torch distribution, else None."""
        return _prior_relaxed(prior)

    @property
    def mu(self) -> Tensor:
        return self.logits.flatten(-2)

    @property
    def categories(self) -> int:
        return self.logits.shape[-1]

    def _draw(self, n_samples: int, generator, stop_score: bool) -> tuple[Tensor, Tensor]:
        z, log_q = sample_concrete_unchecked(self.logits, self.temperature, n_samples, self.hard, stop_score,
                                             generator)
        return self._out(z), log_q

    def rsample_with_log_q(self, n_samples: int, generator, stop_score: bool) -> tuple[Tensor, Tensor]:
        """(z (K, ..., L, C), log q(z) (K, ...)) of the relaxed sample from the
        fused op (stop_score: STL / DReG); for importance weights, which need a
        density at z: refused for hard=True (a one-hot z)."""
        if self.hard:
            name, pmf = type(self).__name__, self._pmf_prior
            raise ValueError(f"a {name} posterior with hard=True has no density at its one-hot z: iwae and a "
                             f"relaxed prior need log q(z) - log p(z) there; use hard=False, elbo with a "
                             f"{pmf} prior (the analytic categorical KL), or log_likelihood / evaluate "
                             f"with a {pmf} prior (the categorical weights of the one-hot z)")
        return self._draw(n_samples, generator, stop_score)

    def rsample(self, n_samples: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        K = 1 if n_samples is None else _validate.positive_int("n_samples", n_samples)
        z = self._draw(K, generator, False)[0]
        return z.squeeze(0) if n_samples is None else z

    def draw_at(self, seed: Tensor, n_samples: int, offset0: int, sample_stride: int, row_stride: int,
                prior) -> tuple[Tensor, Tensor | None]:
        """(z, log p(z) - log q(z) or None when prior is None) at the evaluation's offsets.
        hard=True with a OneHotCategorical prior: the one-hot z is the argmax
        of logits + Gumbel noise, distributed as Categorical(softmax(logits))
        whatever the temperature (the Gumbel-max trick), so the weight is the
        ratio of the two categorical pmfs, sum_l log p(z_l) - log pi(z_l)."""
        log_p_cat = None if prior is None else self._prior_pmf(prior)
        if prior is not None and self.hard and log_p_cat is None:
            self.rsample_with_log_q(1, None, False)  # the named error
        z, log_q = concrete_at(self.logits, self.temperature, seed, n_samples, self.hard, offset0=offset0,
                               sample_stride=sample_stride, row_stride=row_stride)
        z = z.reshape(n_samples, *self.logits.shape)
        log_q = log_q.reshape(n_samples, *self.logits.shape[:-2])
        if prior is None:
            return self._out(z), None
        if self.hard:
            return self._out(z), self._categorical_log_ratio(z, log_p_cat).to(log_q.dtype)
        z = self._out(z)
        return z, prior.log_prob(z) - log_q

    def _categorical_log_ratio(self, z: Tensor, log_p: Tensor) -> Tensor:
        """sum_l log p(c_l) - log softmax(logits)(c_l) (K, ...) for one-hot z (K, ..., L, C),
        c_l = argmax z_l: gathered, so a masked category (-inf) never enters a sum."""
        logits, log_p = widened(self.logits.detach(), log_p.detach())
        diff = log_p - torch.log_softmax(logits, -1)  # (..., L, C); log_p (C,) or (L, C) broadcasts
        diff = diff.expand(z.shape)
        return torch.gather(diff, -1, z.argmax(-1, keepdim=True)).squeeze(-1).sum(-1)

    def rows(self, b0: int, b1: int) -> Concrete:
        return Concrete(self.logits[b0:b1], self.temperature[b0:b1], self.hard)

    def point(self) -> Tensor:
        """softmax(logits) (..., L, C): a z with no noise drawn."""
        return torch.softmax(self.logits, -1)

    def _one_temperature(self) -> Tensor:
        lam = self.temperature.reshape(-1)[:1].reshape(()) if self.temperature.numel() else self.temperature
        if self.temperature.numel() and not bool((self.temperature == lam).all()):
            raise ValueError(f"torch's {self._relaxed_prior} takes one temperature; this record has one per latent")
        return lam

    def torch_distribution(self) -> Distribution:
        """torch's Independent(RelaxedOneHotCategorical, 1) (one temperature for all latents)."""
        lam = self._one_temperature()
        (logits,) = widened(self.logits)
        return Independent(RelaxedOneHotCategorical(lam.to(logits.dtype), logits=logits), 1)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z) summed over L for a given relaxed z (torch's log_prob)."""
        _validate.float_tensors(z=z)
        return self.torch_distribution().log_prob(widened(z)[0])

    def kl_per_dim(self, prior) -> Tensor | None:
        """KL(Cat(softmax(logits)) || prior) per latent (..., L) for a OneHotCategorical prior, else None."""
        log_p = self._prior_pmf(prior)
        if log_p is None:
            return None
        (logits,) = widened(self.logits)
        log_pi = torch.log_softmax(logits, -1)
        pi = torch.exp(log_pi)
        log_p = log_p.to(log_pi.dtype)
        # log pi and log p of a category with pi = 0 (a -inf logit) replaced by 0
        # before the product: 0 * -inf there would make the latent's gradient NaN
        live = pi > 0
        terms = torch.where(live, pi * (torch.where(live, log_pi, 0.0) - torch.where(live, log_p, 0.0)), 0.0)
        return terms.sum(-1)

    def analytic_kl(self, prior) -> Tensor | None:
        terms = self.kl_per_dim(prior)
        return None if terms is None else terms.sum(-1)

    def mc_kl_splits(self, prior) -> bool:
        """A relaxed prior's Monte Carlo KL splits by latent: the latents are
        independent under q and p, and the sampler gives log q per latent
        when each latent is its own row (sample_with_mc_kl_per_dim)."""
        return self.kl_per_dim(prior) is None and self._prior_relaxed_dist(prior) is not None

    def sample_with_mc_kl_per_dim(self, n_samples: int | None, prior, generator) -> tuple[Tensor, Tensor, Tensor]:
        """(z, kl, kl per latent) for a relaxed prior (mc_kl_splits): z and
        log q_l(z_l) of each latent from one sampler call whose rows are the
        latents (logits (..., L, 1, C): the same element offsets, so the same
        noise and z as sample_with_kl's), log p_l from the prior's
        RelaxedOneHotCategorical; kl = sum_l (log q_l - log p_l) per sample,
        (K, ...) for n_samples=K ((...) for None), and its per-latent terms
        averaged over the samples, (..., L)."""
        if self.hard:
            raise _hard_relaxed_error(self)
        K = 1 if n_samples is None else n_samples
        z, log_q = sample_concrete_unchecked(self.logits.unsqueeze(-2), self.temperature.unsqueeze(-1), K, False,
                                             False, generator)
        z = self._out(z.squeeze(-2))
        terms = log_q - self._prior_relaxed_dist(prior).log_prob(widened(z)[0])  # (K, ..., L)
        kl = terms.sum(-1)
        per_dim = terms.mean(0)
        return (z[0], kl[0], per_dim) if n_samples is None else (z, kl, per_dim)

    def sample_with_kl(self, n_samples: int | None, prior, generator) -> tuple[Tensor, Tensor, bool]:
        """(z, kl, analytic): against a categorical prior (a BinaryConcrete's
        Bernoulli: its log-pmf stacked as (log p, log(1 - p)), as the logits are)
        the analytic KL (...) comes from the sampler's own launch, next to z;
        against a relaxed prior, log q(z) - log p(z) per sample."""
        K = 1 if n_samples is None else n_samples
        log_p = self._prior_pmf(prior)
        if log_p is not None and log_p.dim() <= 2 and _validate.broadcasts_to(log_p.shape, self.logits.shape[-2:]):
            z, _, kl = sample_concrete_unchecked(self.logits, self.temperature, n_samples, self.hard, False,
                                                 generator, log_p)
            return self._out(z), kl, True
        kl = self.analytic_kl(prior)  # a prior pmf with a batch shape of its own: torch's formula
        if kl is None:
            if self.hard:
                raise _hard_relaxed_error(self)
            z, log_q = self._draw(K, generator, False)
            kl = log_q - prior.log_prob(z)
            return (z[0], kl[0], False) if n_samples is None else (z, kl, False)
        z = self._draw(K, generator, False)[0]
        return (z.squeeze(0) if n_samples is None else z), kl, True


class BinaryConcrete(Concrete):
    """The relaxed Bernoulli (binary Concrete) of L independent latents: torch's
    ``RelaxedBernoulli``. z = sigmoid((logits + g1 - g2) / temperature), g1 - g2
    ~ Logistic(0, 1): the first component of a 2-category Concrete of logits
    (logits, 0), whose density at the simplex point (z, 1 - z) is the density of
    z, so the fused ``sample_concrete`` on the stacked logits gives z and log q.

    Args:
        logits: (..., L) log-odds of z = 1 (-inf: z = 0).
        temperature: > 0, a float or a tensor broadcasting to (..., L) (no gradient).
        hard: straight-through: z in {0, 1} forward (z > 1/2), the relaxed z's
            gradient backward.

    z has shape (K, ..., L), as torch's ``RelaxedBernoulli.rsample`` gives it.
    ``logits`` is the stacked (..., L, 2) and ``mu`` its flattening (..., 2 L):
    the evaluation's noise layout, 2 uniforms per latent.

    Priors: a ``Bernoulli`` (probs or logits broadcasting to (L,), or
    Independent of one) gives the analytic KL of the two Bernoullis per latent
    (kl_analytic True, free bits per latent); with hard=True also the
    evaluation's weights p(z) / q(z) of the binary z (distributed as
    Bernoulli(sigmoid(logits))). A ``RelaxedBernoulli`` (or Independent of one,
    or a BinaryConcrete record of shape (L,)) gives the Monte Carlo KL
    log q(z) - log p(z) from the same samples (torch's log_prob; free bits per
    latent), as do iwae and log_likelihood.
    """

    _pmf_prior, _relaxed_prior = "Bernoulli", "RelaxedBernoulli"

    def __init__(self, logits: Tensor, temperature: float | Tensor, hard: bool = False):
        _validate.float_tensors(logits=logits)
        _validate.event_dim("logits", logits)
        self.binary_logits = logits
        super().__init__(torch.stack((logits, torch.zeros_like(logits)), -1), temperature, hard)

    def _out(self, z: Tensor) -> Tensor:
        return z[..., 0]

    def _uniform_pmf(self) -> TorchPrior:
        """Bernoulli(1/2) for every latent."""
        return _uniform_prior(Bernoulli, self.binary_logits.shape[-1], self.binary_logits)

    def _relaxed_prior_code(self) -> str:
        L = self.binary_logits.shape[-1]
        return f"torch.distributions.RelaxedBernoulli(torch.tensor(temperature), logits=torch.zeros({L}))"

    def _prior_pmf(self, prior) -> Tensor | None:
        """log (p, 1 - p) (2,) or (L, 2) of a Bernoulli prior (or Independent of one), else None."""
        base = _torch_base(prior)
        if type(base) is not Bernoulli:
            return None
        p_logits = base.logits
        return torch.stack((torch.nn.functional.logsigmoid(p_logits), torch.nn.functional.logsigmoid(-p_logits)), -1)

    def _prior_relaxed_dist(self, prior) -> Distribution | None:
        if type(prior) is BinaryConcrete:
            return prior.torch_distribution().base_dist
        base = _torch_base(prior)
        return base if type(base) is RelaxedBernoulli else None

    def rows(self, b0: int, b1: int) -> BinaryConcrete:
        return BinaryConcrete(self.binary_logits[b0:b1], self.temperature[b0:b1], self.hard)

    def point(self) -> Tensor:
        """sigmoid(logits) (..., L): a z with no noise drawn."""
        return torch.sigmoid(self.binary_logits)

    def torch_distribution(self) -> Distribution:
        """torch's Independent(RelaxedBernoulli, 1) (one temperature for all latents)."""
        lam = self._one_temperature()
        (logits,) = widened(self.binary_logits)
        return Independent(RelaxedBernoulli(lam.to(logits.dtype), logits=logits), 1)


def _concrete_from_torch(q: Distribution) -> Concrete | None:
    """The record of a torch RelaxedOneHotCategorical, logits (..., L, C), or
    RelaxedBernoulli (a BinaryConcrete), logits (..., L) (or Independent of
    one over the latents)."""
    base, n = (q.base_dist, q.reinterpreted_batch_ndims) if isinstance(q, Independent) else (q, 0)
    if type(base) is RelaxedBernoulli and n <= 1:
        logits = base.logits
        if logits.dim() < 1:
            logits = logits.unsqueeze(0)
        return BinaryConcrete(logits, _torch_temperature(base.temperature), False)
    if type(base) is not RelaxedOneHotCategorical or n > 1:
        return None
    logits = base.logits
    if logits.dim() < 2:
        logits = logits.unsqueeze(0)
    return Concrete(logits, _torch_temperature(base.temperature), False)


def _torch_temperature(temperature):
    """A torch relaxed distribution's temperature as the records take it. torch
    keeps what it was given: a tensor (detached here: the temperature gets no
    gradient; a 0-d one as a float) or a Python or NumPy float (an annealing
    schedule's), which the record's checks take as they are. Under torch.compile
    a 0-d one stays a tensor: float() of it is a graph break on torch 2.7."""
    if isinstance(temperature, Tensor):
        lam = temperature.detach()
        return lam if lam.dim() or _backend.compiling() else float(lam)
    return temperature


# -- every family -------------------------------------------------------------------

LATENTS = (*_LOCATION_SCALE_AND_TRANSFORMS, Positive, Concrete, BinaryConcrete)
_priors._RECORDS = LATENTS  # records of shape (L,) are priors too


def from_torch(q: Distribution) -> LocationScale | LogNormal | LogisticNormal | Positive | Concrete | None:
    """The record of a torch distribution the latent families cover (Laplace,
    Uniform, Gumbel, Cauchy, LogNormal, LogisticNormal, Exponential, Weibull,
    Kumaraswamy, RelaxedOneHotCategorical, RelaxedBernoulli, or Independent of one), None for
    anything else; bad parameters are refused by name."""
    for convert in (_location_scale_from_torch, _positive_from_torch, _concrete_from_torch):
        record = convert(q)
        if record is not None:
            return record
    return None


__all__ = ["FAMILIES", "LATENTS", "POSITIVE_FAMILIES", "BinaryConcrete", "Concrete", "LocationScale", "LogNormal",
           "LogisticNormal", "Positive", "from_torch", "kumaraswamy_beta_kl"]
