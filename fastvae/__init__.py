"""fastvae: fused kernels for training and evaluating VAEs in PyTorch.

Ops (each a torch.library custom op in the namespace "fastvae" with Triton
(CUDA), C++ (CPU) and plain-PyTorch reference backends):

- sample_normal(mu, logvar, n_samples=None, *, generator=None) -> (z, kl)
- sample_normal_tril(mu, scale_tril, n_samples=None, *, generator=None) -> (z, kl): full covariance
- kl_normal(mu, logvar, prior_mu=None, prior_logvar=None) -> kl
- family_kl(family, q, p, *, reduce=True) -> kl: the closed-form KL of a latent family (Laplace,
  uniform, Gumbel, Cauchy, exponential) against a prior of its own family
- sample_normal_kl(mu, log_scale, prior_mu, prior_log_scale, *, param, residual=False, reduce=False,
  free_bits=0.0, generator=None) -> (z, kl): one latent group of a hierarchical VAE against its
  conditional prior (VDVAE's log-std, log-variances, NVAE's residual form)
- gaussian_log_prob(x, mean, logvar=None, *, scale=None, softplus_var=None, delta=1e-6)
- bernoulli_log_prob(x, logits)
- laplace_log_prob(x, loc, log_scale=None, *, scale=None): the Laplace (L1) likelihood
- logmeanexp(lw, dim=0, keepdim=False), importance_weights(lw, dim=0),
  effective_sample_size(lw, dim=0, keepdim=False)
- logmeanexp_state(lw, dim=0), merge_logmeanexp_states(*states),
  logmeanexp_from_state(state), all_reduce_logmeanexp_state(state, group=None)
- latent_log_ratio(z, mu, logvar, *, stop_score=False)
- mixture_log_prob(z, means, logvars, logits=None)
- poisson_log_prob(x, log_rate), negative_binomial_log_prob(x, log_mean, log_theta),
  zinb_log_prob(x, log_mean, log_theta, zi_logits): count likelihoods (scvi-tools' NB/ZINB)
- categorical_log_prob(x, logits): x integer classes (..., D), logits (..., D, C)
- continuous_bernoulli_log_prob(x, logits): the normalized continuous Bernoulli
- discretized_logistic_mixture_log_prob(x, params, num_bins=256): PixelCNN++'s likelihood
- sample_location_scale(family, loc, log_scale, n_samples=None, *, generator=None) -> (z, log_q):
  uniform, Laplace, logistic, Gumbel and Cauchy latents (docs/latents.md)
- sample_positive(family, log_param, log_param2=None, n_samples=None, *, generator=None) -> (z, log_q):
  exponential, Weibull and Kumaraswamy latents (docs/latents.md)
- stick_breaking(y) -> z: z (..., M + 1) on the simplex from y (..., M), torch's
  StickBreakingTransform in log space (the logistic-normal posterior's transform)
- sample_concrete(logits, temperature, n_samples=None, *, hard=False, generator=None, log_p=None) -> (z, log_q):
  relaxed categorical (Concrete / Gumbel-softmax, straight-through with hard=True) latents;
  with a prior log-pmf log_p also the analytic categorical KL, (z, log_q, kl)

Objectives (fastvae/objectives.py), higher is better:

- elbo(x, mu, logvar, decode, *, likelihood, beta, free_bits, n_samples, reduction, generator, prior)
- iwae(x, mu, logvar, decode, *, k, likelihood, estimator, alpha, reduction, generator, prior)
  (or elbo(x, q, decode, ...) with q a DiagonalNormal, TrilNormal or torch Normal / MultivariateNormal)
- elbo_terms(...) -> ELBOTerms, iwae_terms(...) -> IWAETerms: the bound and its terms
- hierarchical_elbo(x, decoder_output, kls, *, likelihood, log_px, beta, kl_weight, balance,
  group_sizes, free_bits, reduction) -> HierarchicalTerms: a hierarchical VAE's bound with its
  terms per latent group, NVAE's KL balancing; kl_warmup(step, warmup_steps) (docs/hierarchical.md)

Large-K evaluation (fastvae/evaluation.py, docs/evaluation.md):

- log_likelihood(x, encode, decode, *, k=5000, likelihood, chunk_size, generator,
  progress, return_stats, memory_budget, shard, group) -> (B,) or LogLikelihoodStats
- evaluate(data, encode, decode, *, k=5000, ...) -> EvaluationResult
- reconstruction_probability(x, encode, decode, *, n_samples=100, ...): the anomaly score
- importance_log_likelihood(x, log_weight_fn, *, k=5000, chunk_size, ...): log p(x) of any
  model (a hierarchical VAE, a flow) from its own log-weights, streamed over K (docs/hierarchical.md)

Posteriors and priors: DiagonalNormal(mu, logvar), TrilNormal(mu, scale_tril)
(fastvae/distributions.py); LocationScale(family, loc, log_scale), LogNormal(mu,
logvar), LogisticNormal(mu, logvar) (fastvae/latents.py, docs/latents.md: also
accepted as torch Laplace, Uniform, Gumbel, Cauchy, LogNormal, LogisticNormal;
Positive(family, log_param, log_param2): Exponential, Weibull, Kumaraswamy);
fastvae.priors.StandardNormal, MixtureOfGaussians, VampPrior, or a torch
distribution (prior= of the objectives and the evaluation functions).

backend_info(device) reports which backend serves each op; set_backend(name) and
use_backend(name) (a context manager) override the choice, as FASTVAE_BACKEND
does at import. set_compiled_nodes(name) chooses what a graph compiled on CUDA
calls where the plans serve: "graph_ops" (the default) or "triton_op" (the
plans' kernels as torch.library.triton_op nodes, which Inductor launches), as
FASTVAE_COMPILED_NODES does at import; compiled_nodes() reads it.
set_value_checks(mode) sets how argument values are checked for the common
silent mistakes (fastvae/_value_checks.py). ThreadsWarning:
given once, at the first call on CPU tensors, where torch was imported first
and its OpenMP threads spin on a busy machine (fastvae/_openmp.py).
"""
from . import _openmp, priors  # noqa: F401 (_openmp first: before anything imports torch)
from ._backend import backend_info, compiled_nodes, set_backend, use_backend
from ._openmp import ThreadsWarning
from ._value_checks import set_value_checks
from .distributions import DiagonalNormal, TrilNormal
from .evaluation import (
    EvaluationResult,
    EvaluationWarning,
    LogLikelihoodStats,
    evaluate,
    importance_log_likelihood,
    log_likelihood,
    reconstruction_probability,
)
from .latents import LocationScale, LogisticNormal, LogNormal
from .objectives import ELBOTerms, IWAETerms, elbo, elbo_terms, iwae, iwae_terms
from .ops.bernoulli_likelihood.op import bernoulli_log_prob, continuous_bernoulli_log_prob
from .ops.categorical_log_prob.op import categorical_log_prob
from .ops.count_log_prob.op import negative_binomial_log_prob, poisson_log_prob, zinb_log_prob
from .ops.discretized_logistic_mixture_log_prob.op import discretized_logistic_mixture_log_prob
from .ops.family_kl.op import family_kl
from .ops.gaussian_log_prob.op import gaussian_log_prob
from .ops.kl_normal.op import kl_normal
from .ops.laplace_log_prob.op import laplace_log_prob
from .ops.latent_log_ratio.op import latent_log_ratio
from .ops.logmeanexp.op import (
    LogMeanExpState,
    all_reduce_logmeanexp_state,
    effective_sample_size,
    importance_weights,
    logmeanexp,
    logmeanexp_from_state,
    logmeanexp_state,
    merge_logmeanexp_states,
)
from .ops.mixture_log_prob.op import mixture_log_prob
from .ops.sample_family.op import sample_location_scale
from .ops.sample_normal.op import sample_normal
from .ops.sample_normal_kl.op import sample_normal_kl
from .ops.sample_normal_tril.op import sample_normal_tril
from .ops.stick_breaking.op import stick_breaking

__all__ = [
    "DiagonalNormal",
    "TrilNormal",
    "priors",
    "sample_normal",
    "sample_normal_tril",
    "kl_normal",
    "family_kl",
    "gaussian_log_prob",
    "bernoulli_log_prob",
    "laplace_log_prob",
    "logmeanexp",
    "importance_weights",
    "effective_sample_size",
    "logmeanexp_state",
    "merge_logmeanexp_states",
    "logmeanexp_from_state",
    "all_reduce_logmeanexp_state",
    "LogMeanExpState",
    "latent_log_ratio",
    "mixture_log_prob",
    "stick_breaking",
    "backend_info",
    "set_backend",
    "use_backend",
    "set_compiled_nodes",
    "compiled_nodes",
    "set_value_checks",
    "ThreadsWarning",
    "elbo",
    "elbo_terms",
    "ELBOTerms",
    "iwae",
    "iwae_terms",
    "IWAETerms",
    "log_likelihood",
    "evaluate",
    "reconstruction_probability",
    "importance_log_likelihood",
    "LogLikelihoodStats",
    "EvaluationResult",
    "EvaluationWarning",
    "poisson_log_prob",
    "negative_binomial_log_prob",
    "zinb_log_prob",
    "categorical_log_prob",
    "continuous_bernoulli_log_prob",
    "discretized_logistic_mixture_log_prob",
    "sample_location_scale",
    "sample_normal_kl",
    "LocationScale",
    "LogNormal",
    "LogisticNormal",
]


def _version() -> str:
    """The installed distribution's version; "0+unknown" (PEP 440's local form,
    lower than any release) for a source tree on sys.path that was never
    installed, so that version comparisons still parse it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastvae")
    except PackageNotFoundError:
        return "0+unknown"


# not in __all__: a dunder is module metadata, not part of `from fastvae import *` (as in torch, numpy)
__version__ = _version()

# the positive latent families
from .latents import Positive  # noqa: E402
from .ops.sample_family.op import sample_positive  # noqa: E402

__all__ += ["sample_positive", "Positive"]

# the relaxed categorical (Concrete / Gumbel-softmax) latents
from .latents import BinaryConcrete, Concrete  # noqa: E402
from .ops.sample_family.op import sample_concrete  # noqa: E402

__all__ += ["sample_concrete", "Concrete", "BinaryConcrete"]

# hierarchical VAEs: the objective with its terms per latent group (docs/hierarchical.md)
from .hierarchical import HierarchicalTerms, hierarchical_elbo, kl_warmup  # noqa: E402

__all__ += ["hierarchical_elbo", "HierarchicalTerms", "kl_warmup"]

# what a graph compiled on CUDA calls (fastvae/_triton_ops.py); FASTVAE_COMPILED_NODES=triton_op at
# import registers the twins once every op is defined
from ._triton_ops import set_compiled_nodes  # noqa: E402

if compiled_nodes() == "triton_op":
    set_compiled_nodes("triton_op")
