"""Priors p(z) for fastvae's objectives and evaluation (``prior=``).

- ``StandardNormal()``: N(0, I), the default; KL terms against it are analytic
  and fused.
- ``MixtureOfGaussians(means, logvars, logits=None)``: a Gaussian mixture with
  U diagonal components (lecture notes, seed 003); log p(z) by the fused,
  streaming ``mixture_log_prob`` (no (..., U, L) tensor).
- ``VampPrior(encode, pseudo_inputs)``: the equal-weight mixture of the
  encoder's posteriors at U learnable pseudo-inputs (Tomczak & Welling 2018;
  seed 000), differentiable in both; the encoder runs on the pseudo-inputs once
  per log_prob call.
- a learned diagonal prior is a ``fastvae.DiagonalNormal`` of shape (L,).
- a torch.distributions object (``TorchPrior`` wraps it): a torch
  ``Normal`` or ``Independent(Normal, 1)`` over L becomes a DiagonalNormal of
  shape (L,) (so Gaussian posteriors keep the fused analytic KL), any other
  (Laplace(0, 1), Uniform, Gumbel, LogNormal, ...) is used through its
  ``log_prob``; the latent families of fastvae/latents.py find their closed
  forms against their own family, and a record of theirs of shape (L,) is a
  prior too.

Every prior has ``log_prob(z)`` for z of shape (..., L) and ``sample(n)`` to
generate latents.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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
    Laplace,
    Normal,
    OneHotCategorical,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
    Uniform,
    Weibull,
)

from . import _backend, _validate
from .distributions import DiagonalNormal, TrilNormal, widened
from .ops.kl_normal import kl_normal as kl_normal_formula
from .ops.kl_normal.op import kl_normal
from .ops.mixture_log_prob.op import check_components, mixture_log_prob

LOG_2PI = math.log(2.0 * math.pi)


class StandardNormal:
    """p(z) = N(0, I)."""

    def log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, I) summed over the last dimension."""
        _validate.float_tensors(z=z)
        (z,) = widened(z)  # a half-precision z gives a float32 log-density
        return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI

    def sample(self, n: int, latent_size: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """n latents (n, L) drawn from N(0, I)."""
        return torch.randn(n, latent_size, generator=generator, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return "StandardNormal()"


class MixtureOfGaussians:
    """p(z) = sum_u softmax(logits)_u N(z; means_u, diag(exp(logvars_u))).

    Args:
        means, logvars: (U, L) tensors (learnable parameters, typically).
        logits: (U,) mixture weights before the softmax, or None for equal
            weights 1/U.
    """

    def __init__(self, means: Tensor, logvars: Tensor, logits: Tensor | None = None):
        check_components(means, logvars, logits)
        self.means, self.logvars, self.logits = means, logvars, logits

    def components(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.means, self.logvars, self.logits

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) for z of shape (..., L), shape (...): fused and streaming over U."""
        if z.dim() >= 1 and z.shape[-1] != self.means.shape[-1]:
            raise latent_size_error(self.means.shape[-1], z.shape[-1])
        return mixture_log_prob(z, self.means, self.logvars, self.logits)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n latents (n, L) drawn from the mixture (not differentiable: for generation)."""
        return _sample_mixture(n, *self.components(), generator)

    def __repr__(self) -> str:
        U, L = self.means.shape
        return f"MixtureOfGaussians(components={U}, latent_size={L})"


class VampPrior:
    """p(z) = (1/U) sum_u q(z | u_u): the encoder's posteriors at U pseudo-inputs.

    Args:
        encode: the VAE's encoder, x -> (mu, logvar) or a DiagonalNormal, the
            same callable the objectives use. Full-covariance encoders are not
            supported here (their mixture has no fused density).
        pseudo_inputs: (U, *event) learnable inputs (an ``nn.Parameter``),
            shaped like a batch of data.
    """

    def __init__(self, encode: Callable, pseudo_inputs: Tensor):
        if not callable(encode):
            raise TypeError(f"encode must be callable, got {type(encode).__name__}")
        _validate.float_tensors(pseudo_inputs=pseudo_inputs)
        if pseudo_inputs.dim() < 2:
            raise ValueError(f"pseudo_inputs must be a batch (U, *event), got shape {tuple(pseudo_inputs.shape)}")
        self.encode, self.pseudo_inputs = encode, pseudo_inputs

    def components(self) -> tuple[Tensor, Tensor, None]:
        """(means, logvars, None) of the U components: the encoder at the pseudo-inputs."""
        out = self.encode(self.pseudo_inputs)
        if isinstance(out, TrilNormal):
            raise TypeError("VampPrior needs a diagonal encoder (mu, logvar) or DiagonalNormal; "
                            "a TrilNormal mixture has no fused density")
        q = out if isinstance(out, DiagonalNormal) else DiagonalNormal(*out)
        if q.mu.dim() != 2:
            raise ValueError(f"the encoder must map the pseudo-inputs to (U, L), got {tuple(q.mu.shape)}")
        return q.mu, q.logvar, None

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) for z of shape (..., L), shape (...): the encoder at the
        pseudo-inputs, then the fused mixture density."""
        means, logvars, _ = self.components()
        if z.dim() >= 1 and z.shape[-1] != means.shape[-1]:
            raise latent_size_error(means.shape[-1], z.shape[-1])
        return mixture_log_prob(z, means, logvars)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return _sample_mixture(n, *self.components(), generator)

    def __repr__(self) -> str:
        return f"VampPrior(pseudo_inputs={tuple(self.pseudo_inputs.shape)})"


def _sample_mixture(n: int, means: Tensor, logvars: Tensor, logits: Tensor | None, generator) -> Tensor:
    n = _validate.positive_int("n", n)
    means, logvars = means.detach(), logvars.detach()
    U = means.shape[0]
    weights = torch.ones(U, device=means.device) if logits is None else torch.softmax(logits.detach().float(), 0)
    u = torch.multinomial(weights, n, replacement=True, generator=generator)
    eps = torch.randn(n, means.shape[1], generator=generator, dtype=means.dtype, device=means.device)
    return means[u] + torch.exp(0.5 * logvars[u]) * eps


class TorchPrior:
    """A torch.distributions object as a prior over z (..., Lz): its log_prob
    summed over the last dimension (an ``Independent`` sums it already).
    ``dist`` is the object; the latent families read their same-family
    closed-form KLs from it (fastvae/latents.py)."""

    def __init__(self, dist: Distribution):
        base = dist.base_dist if isinstance(dist, Independent) else dist
        if type(base) in (RelaxedOneHotCategorical, RelaxedBernoulli) and not isinstance(base.temperature, Tensor):
            # torch keeps a Python or NumPy float temperature as given, and its
            # own log_prob then fails (it takes the temperature's full_like)
            lam = torch.tensor(float(base.temperature), dtype=base.logits.dtype, device=base.logits.device)
            base = type(base)(lam, logits=base.logits)
            dist = Independent(base, dist.reinterpreted_batch_ndims) if isinstance(dist, Independent) else base
        # a categorical's z (..., L, C) has two latent dimensions (a Concrete's)
        self.z_dims = 2 if isinstance(base, (RelaxedOneHotCategorical, OneHotCategorical)) else 1
        self.categorical = type(base) in (OneHotCategorical, Bernoulli)  # pmfs: no density at a relaxed z
        if len(dist.event_shape) > self.z_dims:
            raise ValueError(f"a torch prior has at most one event dimension (the latent), got event shape "
                             f"{tuple(dist.event_shape)}")
        self.dist = dist

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) summed over the last dimension, in z's compute dtype."""
        if self.categorical:
            base = self.dist.base_dist if isinstance(self.dist, Independent) else self.dist
            pmf, q, relaxed = (("OneHotCategorical", "Concrete", "RelaxedOneHotCategorical")
                               if type(base) is OneHotCategorical else ("Bernoulli", "BinaryConcrete",
                                                                         "RelaxedBernoulli"))
            raise ValueError(f"a {pmf} prior has no density at a relaxed z: it gives the ELBO's "
                             f"analytic categorical KL, and the weights of log_likelihood / evaluate for a "
                             f"hard=True {q} posterior (one-hot z) only; iwae, and log_likelihood, evaluate "
                             f"or a Monte Carlo KL of a relaxed z, need a {relaxed} prior")
        if self.z_dims == 2 and (z.dim() < 2 or z.shape[-1] != self.dist.event_shape[-1]):
            base = self.dist.base_dist if isinstance(self.dist, Independent) else self.dist
            raise ValueError(f"a {type(base).__name__} prior takes the z (..., L, C) of a Concrete posterior of "
                             f"C = {self.dist.event_shape[-1]} categories, got z of shape {tuple(z.shape)} (a "
                             "BinaryConcrete's z (..., L) takes a Bernoulli or RelaxedBernoulli prior)")
        (z,) = widened(z)
        lp = _location_scale_log_prob(self.dist, z)
        if lp is None and POSITIVE_FORM:
            lp = _positive_log_prob(self.dist, z)
        if lp is not None:
            return lp
        lp = self.dist.log_prob(z)
        extra = self.z_dims - len(self.dist.event_shape)
        return lp.sum(tuple(range(-extra, 0))) if extra > 0 else lp

    def sample(self, n: int) -> Tensor:
        """n latents (n, Lz) (torch's own sampler: not differentiable, for generation)."""
        return self.dist.sample((_validate.positive_int("n", n),))

    def __repr__(self) -> str:
        return f"TorchPrior({self.dist!r})"


LOG_PI = math.log(math.pi)


def _location_scale_log_prob(dist: Distribution, z: Tensor) -> Tensor | None:
    """log p(z) summed over L for a torch Laplace, Gumbel, Cauchy or Uniform
    prior (or an Independent of one over L) whose parameters are of shape ()
    or (L,) in z's dtype and device, in fewer passes over z (..., L) than its
    own log_prob: the parameters' reciprocals and logs taken once on (L,), no
    full-size tensor per term, a uniform's support test in booleans. None for
    anything else (torch's log_prob then). Where the object validates its
    arguments (torch's default) and the result shows a z it would refuse (a
    NaN; a uniform's z outside [low, high]), torch's own log_prob runs and
    raises its error. Values equal torch's to float rounding. Under
    torch.compile, torch's log_prob as it traces it (the check here reads a
    value on the host)."""
    found = _latent_parameters(dist, z, _LOCATION_SCALE_PRIORS)
    if found is None:
        return None
    base, n, (a, b) = found
    kind, L = type(base), z.shape[-1]
    if kind is Uniform:
        inside = ((z >= a) & (z < b)).all(-1)
        log_width = torch.log(b - a).sum()
        lp = torch.where(inside, -log_width, -math.inf)
        refused = base._validate_args and not bool(inside.all())
    else:
        d = z - a
        inv = torch.reciprocal(b)
        if kind is Laplace:  # -|z - loc| / b - log 2b: the sum over L as a product with 1 / b
            lp = -_sum_over_latents(d.abs(), inv) - torch.log(2.0 * b).sum()
        elif kind is Gumbel:  # -(t + e^-t) - log b, t = (z - loc) / b
            t = d * inv
            lp = -(t + torch.exp(-t)).sum(-1) - torch.log(b).sum()
        else:  # Cauchy: -log(pi b) - log1p(t^2)
            t = d * inv
            lp = -torch.log1p(t.square()).sum(-1) - (torch.log(b).sum() + L * LOG_PI)
        refused = base._validate_args and bool(torch.isnan(lp).any())
    # torch's check names the value (or, a NaN from elsewhere, its log_prob gives the same NaN)
    return _torch_log_prob(dist, z, n) if refused else lp


# the torch priors whose log-density fastvae takes in its own form, and their parameters by name
_LOCATION_SCALE_PRIORS = {Laplace: ("loc", "scale"), Gumbel: ("loc", "scale"), Cauchy: ("loc", "scale"),
                          Uniform: ("low", "high")}
_POSITIVE_PRIORS = {Exponential: ("rate",), Weibull: ("scale", "concentration"),
                    Beta: ("concentration1", "concentration0")}


def _latent_parameters(dist: Distribution, z: Tensor, kinds: dict) -> tuple | None:
    """(the distribution, its Independent's reinterpreted dims, its parameters
    expanded to (L,)) of a torch prior of one of ``kinds`` (or an Independent
    of one over L) whose parameters are of shape () or (L,) in z's dtype and
    device, eagerly (the fast forms read values on the host); None otherwise."""
    base, n = (dist.base_dist, dist.reinterpreted_batch_ndims) if isinstance(dist, Independent) else (dist, 0)
    names = kinds.get(type(base))
    if names is None or n > 1 or z.dim() == 0 or _backend.compiling():
        return None
    L = z.shape[-1]
    params = [getattr(base, name) for name in names]
    if any(t.dtype != z.dtype or t.device != z.device or t.shape not in ((), (L,)) for t in params):
        return None
    return base, n, [t.expand(L) for t in params]


def _sum_over_latents(x: Tensor, w: Tensor) -> Tensor:
    """sum_l x[..., l] w[l] as one product, but under autocast (which would run
    it in half precision), where it is a float32 sum."""
    return (x * w).sum(-1) if torch._C._is_any_autocast_enabled() else x @ w


def _torch_log_prob(dist: Distribution, z: Tensor, n: int) -> Tensor:
    """The object's own log_prob summed over L (its error where it refuses z)."""
    lp = dist.log_prob(z)
    return lp if n == 1 else lp.sum(-1)


def _positive_log_prob(dist: Distribution, z: Tensor) -> Tensor | None:
    """log p(z) summed over L for a torch Exponential, Weibull or Beta prior
    (or an Independent of one over L) whose parameters are of shape () or
    (L,) in z's dtype and device, in fewer passes over z (..., L) than its own
    log_prob (a Weibull's runs its transforms one by one; a Beta's stacks z and
    1 - z for a Dirichlet): the parameters' terms taken once on (L,), the
    sums over L of a per-latent factor as one product. None for anything else
    (torch's log_prob then), and under torch.compile (torch's, as it traces
    it). Where the object validates its arguments (torch's default) and z
    leaves the support (a NaN; an exponential's z < 0; a non-finite density,
    as a Weibull's at z <= 0 or a Beta's outside [0, 1] gives), torch's own
    log_prob runs: its error, or at the support's edge its value. Values equal
    torch's to float rounding."""
    found = _latent_parameters(dist, z, _POSITIVE_PRIORS)
    if found is None:
        return None
    base, n, params = found
    kind = type(base)
    if kind is Exponential:  # log rate - rate z
        (rate,) = params
        lp = torch.log(rate).sum() - _sum_over_latents(z, rate)
        refused = base._validate_args and not bool(z.amin() >= 0)  # (a NaN compares False)
    else:
        if kind is Weibull:  # log(c / s) + (c - 1) log(z / s) - (z / s)^c
            scale, c = params
            log_s = torch.log(scale)
            log_x = torch.log(z) - log_s
            lp = _sum_over_latents(log_x, c - 1.0) - torch.exp(log_x * c).sum(-1) + (torch.log(c) - log_s).sum()
        else:  # Beta: (a - 1) log z + (b - 1) log(1 - z) - log B(a, b), as torch's xlogy takes them
            a, b = params
            lp = (torch.xlogy(a - 1.0, z) + torch.xlogy(b - 1.0, 1.0 - z)).sum(-1) - (
                torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)).sum()
        refused = base._validate_args and not bool(torch.isfinite(lp).all())
    # torch's check names the value; at the support's edge, its value
    return _torch_log_prob(dist, z, n) if refused else lp


# TorchPrior.log_prob takes _positive_log_prob's form where it applies; False: the
# object's own log_prob (the benchmarks' other arm)
POSITIVE_FORM = True


def _torch_prior(prior: Distribution, latent_size: int | None, device: torch.device | None) -> Any:
    """A torch Normal / Independent(Normal, 1) whose parameters broadcast to (L,)
    as a DiagonalNormal of shape (L,) (when L is known); anything else as a TorchPrior.
    ``device``: the posterior's, which scalar parameters follow, as a 0-d tensor
    does in torch's own arithmetic (``Normal(0.0, 1.0)`` with latents on a GPU)."""
    base, n = (prior.base_dist, prior.reinterpreted_batch_ndims) if isinstance(prior, Independent) else (prior, 0)
    if type(base) is Normal and n <= 1 and latent_size is not None and base.loc.dim() <= 1 \
            and base.loc.shape[-1:] in ((), (1,), (latent_size,)):
        loc, scale = base.loc, base.scale
        if device is not None and loc.dim() == 0 and scale.dim() == 0:
            loc, scale = loc.to(device), scale.to(device)
        shape = (latent_size,)
        return DiagonalNormal(loc.expand(shape), (2.0 * torch.log(scale)).expand(shape))
    return TorchPrior(prior)


# check_prior's answer to prior=None: the standard normal as this one object, so
# that a latent family on a simplex (a Concrete, a LogisticNormal), where N(0, I)
# has no density, can tell the default from a StandardNormal passed on purpose
# and put its own default in its place (fastvae/latents.py, resolve_prior)
DEFAULT = StandardNormal()

_RECORDS: tuple = ()  # the latent families' records (fastvae/latents.py registers them: no import cycle)


def check_prior(prior: Any, latent_size: int | None = None, device: torch.device | None = None) -> Any:
    """The prior itself (None is the standard normal; a torch distribution is
    mapped by _torch_prior, on the posterior's ``device``), or a TypeError naming the choices."""
    if prior is None:
        return DEFAULT
    if isinstance(prior, Distribution):
        prior = _torch_prior(prior, latent_size, device)
    if isinstance(prior, _RECORDS):
        if prior.mu.dim() != 1:
            raise ValueError(f"a {type(prior).__name__} prior has shape (L,), got {tuple(prior.mu.shape)}")
        return prior
    if not isinstance(prior, (StandardNormal, MixtureOfGaussians, VampPrior, DiagonalNormal, TorchPrior)):
        raise TypeError("prior must be fastvae.priors.StandardNormal, MixtureOfGaussians, VampPrior, a "
                        "fastvae.DiagonalNormal of shape (L,), a fastvae latent record of shape (L,) or a torch "
                        f"distribution, got {type(prior).__name__}")
    if isinstance(prior, DiagonalNormal) and prior.mu.dim() != 1:
        raise ValueError(f"a DiagonalNormal prior has shape (L,), got {tuple(prior.mu.shape)}")
    if latent_size is not None and isinstance(prior, (MixtureOfGaussians, DiagonalNormal)):
        L = prior.means.shape[1] if isinstance(prior, MixtureOfGaussians) else prior.latent_size
        if L != latent_size:
            raise latent_size_error(L, latent_size)
    return prior


def latent_size_error(prior_size: int, posterior_size: int) -> ValueError:
    """The one message for a prior over another latent size than the posterior
    (check_prior, a mixture's or VampPrior's log_prob, the evaluation)."""
    return ValueError(f"the prior is over {prior_size} latent dimensions, the posterior over {posterior_size}")


def has_analytic_kl(prior: Any) -> bool:
    """Whether KL(q || prior) has a registered closed form (for either posterior)."""
    return isinstance(prior, (StandardNormal, DiagonalNormal))


def analytic_kl(q: DiagonalNormal | TrilNormal, prior: Any) -> Tensor | None:
    """KL(q || prior) per example in closed form where one is registered
    (diagonal or tril q against a standard or diagonal prior), else None."""
    if isinstance(prior, StandardNormal):
        return q.kl_standard_normal()
    if not isinstance(prior, DiagonalNormal):
        return None
    if isinstance(q, DiagonalNormal):
        if _backend.compiling():
            # The fused kl_normal lays a shared (L,) prior out as (N, L) copies;
            # kl_normal's formula in torch expressions broadcasts it instead,
            # and Inductor fuses it with the posterior's own elementwise work
            # (its logvar from a softplus, say), forward and backward.
            return kl_normal_formula(*widened(q.mu, q.logvar, prior.mu, prior.logvar))
        return kl_normal(q.mu, q.logvar, prior.mu, prior.logvar)
    # KL(N(mu, S S^T) || N(m, D)) = 1/2 [tr(D^-1 S S^T) + (m - mu)^T D^-1 (m - mu) - L + log|D| - log|S S^T|]
    S, q_mu, p_mu, p_logvar = widened(q.scale_tril, q.mu, prior.mu, prior.logvar)
    S = S.tril()
    inv_var = torch.exp(-p_logvar)
    diff = p_mu - q_mu
    trace = ((S * S).sum(-1) * inv_var).sum(-1)  # row i of S S^T's diagonal: sum_j S_ij^2
    log_det_q = 2.0 * torch.log(torch.diagonal(S, dim1=-2, dim2=-1)).sum(-1)
    return 0.5 * (trace + (diff * diff * inv_var).sum(-1) - q.latent_size + p_logvar.sum(-1) - log_det_q)




def log_ratio_to_standard(prior: Any, z: Tensor) -> Tensor | None:
    """log p(z) - log N(z; 0, I), or None for the standard normal itself: what
    a prior adds to the sampler's exact log N(z; 0, I) - log q(z). Under
    torch.compile a diagonal prior's is one expression, 0.5 sum_l (z^2 -
    (z - m)^2 e^-logvar - logvar) (the log 2 pi terms cancel), which Inductor
    fuses into one pass over z each way; eager, the fused gaussian_log_prob."""
    if isinstance(prior, StandardNormal):
        return None
    if type(prior) is DiagonalNormal and _backend.compiling():
        z, mu, logvar = widened(z, prior.mu, prior.logvar)
        d = z - mu
        return 0.5 * (z * z - d * d * torch.exp(-logvar) - logvar).sum(-1)
    return prior.log_prob(z) - StandardNormal().log_prob(z)
