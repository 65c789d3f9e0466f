"""log p(x | z) from whatever the user's decoder returned: the one convention
shared by fastvae.elbo, fastvae.iwae and the evaluation functions.

- likelihood="gaussian": decode(z) returns the mean (unit variance, i.e. the
  squared-error loss plus a constant) or a (mean, logvar) pair (a decoder
  that learns its variance; logvar per element or broadcastable to the mean).
  The second item is the log-variance: a (mean, std) pair gives a finite,
  wrong number that no check can detect (return (mean, 2 * std.log()), or a
  torch Normal(mean, std)).
- likelihood="laplace": decode(z) returns the location (scale 1: the L1 loss)
  or a (loc, log_scale) pair (a learned scale, b = exp(log_scale); per
  element or broadcastable to loc). The second item is the log-scale, as the
  Gaussian's is the log-variance (a torch Laplace(loc, scale) passes the
  scale itself; fastvae/ops/laplace_log_prob/op.py).
- likelihood="bernoulli": decode(z) returns the logits (before any sigmoid:
  fastvae warns when every value it reads lies in [0, 1]), for x binary or in
  [0, 1] (it warns when x leaves [0, 1]).
- likelihood="categorical": decode(z) returns logits (*x.shape, C) for x of
  integer class indices (fastvae/ops/categorical_log_prob/op.py).
- likelihood="continuous_bernoulli": decode(z) returns logits, for x in
  [0, 1] (the normalized continuous Bernoulli; fastvae/ops/bernoulli_likelihood/op.py).
- likelihood="poisson" / "negative_binomial" / "zinb" (counts): decode(z)
  returns the log rate, (log mean, log theta) or (log mean, log theta,
  zero-inflation logits) as in scvi-tools (log theta per element or per
  gene; fastvae/ops/count_log_prob/op.py), or a dict that names each
  parameter's form ({"mean": mu, "theta": theta}, {"log_mean": ...,
  "log_theta": ..., "zi_logits": ...}, {"rate": ...}), which also implies the
  likelihood: a theta can then never be read as a log theta.
- likelihood="discretized_logistic_mixture": decode(z) returns PixelCNN++'s
  packed parameters (..., 10 M, H, W) for x (..., 3, H, W), or a
  (logit_probs, means, log_scales) tuple ((..., M, H, W), (..., M, C, H, W)
  twice), for images x in [-1, 1] with 256 levels
  (fastvae/ops/discretized_logistic_mixture_log_prob/op.py).
- or decode(z) returns a torch.distributions Bernoulli (logits or probs),
  Normal, Laplace, Categorical, ContinuousBernoulli, Poisson, NegativeBinomial,
  or Independent of any, or scvi-tools' Poisson, NegativeBinomial or
  ZeroInflatedNegativeBinomial, and the likelihood follows from it
  (likelihood= may then be omitted).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Categorical,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Laplace,
    MultivariateNormal,
    Normal,
)

from . import _backend, _registry
from . import ops as _ops
from .distributions import DiagonalNormal, TrilNormal
from .latents import LATENTS, from_torch
from .ops.count_log_prob.op import from_distribution as counts_from_distribution
from .ops.count_log_prob.op import from_named as counts_from_named


def torch_posterior(q: Distribution) -> DiagonalNormal | TrilNormal:
    """The fused posterior of a torch Normal or Independent(Normal, 1)
    (DiagonalNormal) or MultivariateNormal (TrilNormal of its scale_tril),
    differentiable in their parameters; others are refused by name."""
    base, reinterpreted = (q.base_dist, q.reinterpreted_batch_ndims) if isinstance(q, Independent) else (q, 0)
    if type(base) is Normal and reinterpreted <= 1:
        return DiagonalNormal(base.loc, 2.0 * torch.log(base.scale))
    if type(base) is MultivariateNormal and reinterpreted == 0:
        return TrilNormal(base.loc, base.scale_tril)
    if (record := from_torch(q)) is not None:  # the other latent families (fastvae/latents.py)
        return record
    raise TypeError(f"the posterior must be a torch Normal, Independent(Normal, 1), MultivariateNormal, Laplace, "
                    f"Uniform, Gumbel, Cauchy, LogNormal or LogisticNormal (or a fastvae.DiagonalNormal, "
                    f"TrilNormal or latent record), got {type(q).__name__}")


def as_posterior(q: Any, what: str = "the posterior") -> DiagonalNormal | TrilNormal:
    """What an encoder returned, as a fastvae posterior: a DiagonalNormal or
    TrilNormal as is, a torch distribution mapped (torch_posterior), or a
    (mu, logvar) pair."""
    if isinstance(q, (DiagonalNormal, TrilNormal, *LATENTS)):
        return q
    if isinstance(q, Distribution):
        return torch_posterior(q)
    if isinstance(q, (tuple, list)) and len(q) == 2:
        return DiagonalNormal(*q)
    raise TypeError(
        f"{what} must be a fastvae.DiagonalNormal or TrilNormal, a torch Normal, Independent(Normal, 1) or "
        f"MultivariateNormal, or a (mu, logvar) pair, got {type(q).__name__}"
        + (f" of {len(q)} items" if isinstance(q, (tuple, list)) else "")
        + (_SAMPLING_ENCODER if isinstance(q, (tuple, list)) and len(q) == 3 else ""))


# An encoder that samples returns z with (mu, logvar); fastvae draws z itself.
_SAMPLING_ENCODER = (". An encoder that samples z itself passes only (mu, logvar): fastvae draws z. Take "
                     "enc(x)[1:] of (z, mu, logvar), enc(x)[:2] of (mu, logvar, z); for log_likelihood and "
                     "evaluate, encode=lambda x: enc(x)[1:] (docs/migrating.md, 'Encoders that sample')")


# The sections that explain what fastvae passes to the user's callables (a note on their errors names them)
DECODER_DOCS = "docs/objectives.md#the-decoder-convention"
FOLDED_DOCS = "docs/migrating.md#convolutional-decoders-that-fold-the-samples-into-the-batch"
EVALUATION_DOCS = "docs/evaluation.md#api"
LOG_WEIGHT_DOCS = "docs/hierarchical.md#log-px-of-any-model-streamed-over-k"
NOTE_PREFIX = "fastvae called "


def call_user(fn: Callable, arg: Tensor, name: str, arg_name: str, samples: str | None, docs: str) -> Any:
    """fn(arg) for the user's callable ``fn`` (decode, encode, log_weight_fn).
    An exception it raises propagates unchanged (the same object, so
    ``except`` clauses and tracebacks keep working) with a PEP 678 note of
    what fastvae passed (note_call). Without the note a conv decoder's error
    from inside torch does not say that iwae hands it (k, B, L). Under
    torch.compile the call is traced as it is: the note is for eager errors.
    The hot paths (the plans, the objectives' lean calls) inline the same
    try/except around their own call, which costs nothing until it raises."""
    if _backend.compiling():
        return fn(arg)
    try:
        return fn(arg)
    except Exception as error:
        note_call(error, fn, arg, name, arg_name, samples, docs)
        raise


def note_call(error: BaseException, fn: Any, arg: Any, name: str, arg_name: str, samples: str | None,
              docs: str) -> None:
    """Attach to ``error``, raised by the user's ``fn`` called on ``arg``, a note of
    arg's shape named dimension by dimension (``samples``: the name of a
    leading sample dimension, "k", "n_samples"; None when there is none),
    its dtype, a dtype mismatch with an nn.Module decoder's parameters, and
    the doc section ``docs`` that explains it. One note per error: the
    innermost call's (a fastvae call inside the user's callable)."""
    if not any(str(note).startswith(NOTE_PREFIX) for note in getattr(error, "__notes__", ())):
        error.add_note(_call_note(fn, arg, name, arg_name, samples, docs))


def _call_note(fn: Any, arg: Any, name: str, arg_name: str, samples: str | None, docs: str) -> str:
    """The note call_user attaches: what was passed, and where the docs explain it."""
    if not isinstance(arg, Tensor):
        return f"{NOTE_PREFIX}{name}({arg_name}) (see {docs})"
    lead = [samples] if samples is not None and arg.dim() >= 2 else []
    if name == "decode":  # z (*samples, *batch, L)
        batch = arg.dim() - 1 - len(lead)
        dims = [*lead, *(["B"] if batch == 1 else [f"B{i + 1}" for i in range(batch)]), "L"][-arg.dim():]
    else:  # encode's x (B, *event), log_weight_fn's x_rep (n, B, *event)
        dims = [*lead, "B"] + (["*event"] if arg.dim() > len(lead) + 1 else [])
    dtype = str(arg.dtype).removeprefix("torch.")
    text = (f"{NOTE_PREFIX}{name}({arg_name}) with {arg_name} of shape ({', '.join(dims)}) = "
            f"({', '.join(str(d) for d in arg.shape)}) {dtype}")
    if lead:
        text += f": the {samples} samples stacked ahead of the batch"
        if name == "decode":
            text += "; a decoder that takes (N, L), such as a conv net, folds them: net(z.reshape(-1, z.shape[-1]))"
            docs = f"{docs}, {FOLDED_DOCS}"
    param = next((p for p in fn.parameters() if p.is_floating_point()), None) \
        if isinstance(fn, torch.nn.Module) else None
    if name == "decode" and param is not None and param.dtype != arg.dtype:
        wanted = str(param.dtype).removeprefix("torch.")
        text += (f". z has the posterior's dtype, {dtype}, and decode's parameters are {wanted}: pass the "
                 f"posterior in {wanted} (mu.to(torch.{wanted}), logvar likewise), or convert z in the decoder "
                 f"(lambda z: net(z.to(torch.{wanted})))")
    return text + f" (see {docs})"


def posterior_args(mu: Any, logvar: Any, decode: Any) -> tuple[DiagonalNormal | TrilNormal, Any]:
    """(q, decode) from either calling form: (x, mu, logvar, decode) or
    (x, q, decode) with q a fastvae.DiagonalNormal / TrilNormal or a torch
    Normal / Independent(Normal, 1) / MultivariateNormal."""
    if isinstance(mu, (Distribution, DiagonalNormal, TrilNormal, *LATENTS)):
        if decode is None:  # (x, q, decode): decode arrived in logvar's place
            decode, logvar = logvar, None
        if logvar is not None:
            raise TypeError("with a distribution as the posterior, call (x, q, decode), without logvar")
        return as_posterior(mu), decode
    if decode is None or logvar is None:
        raise TypeError("pass (x, mu, logvar, decode), or (x, q, decode) with q a fastvae.DiagonalNormal, "
                        "TrilNormal or a torch Normal / MultivariateNormal"
                        + _posterior_sequence_hint(mu))
    return DiagonalNormal(mu, logvar), decode  # validates mu and logvar


def _posterior_sequence_hint(mu: Any) -> str:
    """The error's tail when the encoder's output came as one tuple."""
    if not isinstance(mu, (tuple, list)):
        return ""
    if len(mu) == 2:
        return f"; the posterior came as a {type(mu).__name__} of 2 items: unpack it, (x, *encoder(x), decode)"
    return f"; the posterior came as a {type(mu).__name__} of {len(mu)} items" + _SAMPLING_ENCODER


_REQUIRED = (
    "likelihood= is required: 'bernoulli' if decode returns logits (binary or [0, 1] data), "
    "'gaussian' if it returns the mean (unit variance) or a (mean, logvar) pair, 'laplace' if it returns "
    "the location (scale 1: the L1 loss) or a (loc, log_scale) pair, 'categorical' if it "
    "returns logits (*x.shape, C) for integer class indices x, 'continuous_bernoulli' if it returns "
    "logits for [0, 1] data under the normalized continuous Bernoulli; for counts 'poisson' (log rate), "
    "'negative_binomial' ((log mean, log theta)) or 'zinb' ((log mean, log theta, zero-inflation logits)); "
    "'discretized_logistic_mixture' if it returns PixelCNN++'s mixture parameters (images in [-1, 1]); "
    "or let decode return a torch.distributions Bernoulli, Normal, Laplace, Categorical, ContinuousBernoulli, "
    "Poisson, NegativeBinomial or Independent of one"
)


def check_likelihood(likelihood: Any) -> None:
    """A valid likelihood name, or None: then decode must return a torch
    distribution, which implies it (checked when decode has run)."""
    if likelihood is not None and likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def _from_distribution(d: Distribution, likelihood: str | None, event_ndim: int) -> tuple[str, Any]:
    """(likelihood, decoder output) for a torch distribution that a fused
    likelihood computes exactly; anything else is refused by name."""
    base, reinterpreted = (d.base_dist, d.reinterpreted_batch_ndims) if isinstance(d, Independent) else (d, 0)
    if reinterpreted > event_ndim:
        raise ValueError(f"decode returned {type(d).__name__} with {reinterpreted} event dimensions; "
                         f"x has {event_ndim}")
    if type(base) is Bernoulli:
        implied, out = "bernoulli", base.logits
    elif type(base) is Normal:
        implied, out = "gaussian", (base.loc, 2.0 * torch.log(base.scale))
    elif type(base) is Laplace:
        implied, out = "laplace", (base.loc, torch.log(base.scale))
    elif type(base) in (Categorical, ContinuousBernoulli):  # their logits (probs mapped by torch)
        implied, out = ("categorical" if type(base) is Categorical else "continuous_bernoulli"), base.logits
    elif (counts := counts_from_distribution(base)) is not None:
        implied, out = counts
    else:
        raise TypeError(
            f"decode returned a {type(base).__name__} distribution; the fused likelihoods compute "
            f"Bernoulli (logits or probs), Normal, Laplace, Categorical, ContinuousBernoulli, Poisson, "
            f"NegativeBinomial and Independent of one exactly (and read scvi-tools' Poisson, "
            f"NegativeBinomial and ZeroInflatedNegativeBinomial through their parameters). For others, "
            f"e.g. Beta, compute the loss with torch.distributions"
        )
    if likelihood is not None and likelihood != implied:
        raise ValueError(f"decode returned {type(d).__name__} but likelihood={likelihood!r}: drop likelihood= "
                         f"(the distribution implies {implied!r}) or make them agree")
    return implied, out


def _built_from_logits(d: Distribution) -> bool:
    """Whether a (Independent of a) torch Bernoulli or ContinuousBernoulli was
    made with logits= (torch keeps the argument it was given as ``_param``)."""
    base = d.base_dist if isinstance(d, Independent) else d
    return type(base) in (Bernoulli, ContinuousBernoulli) and base._param is base.__dict__.get("logits")


def output_numel(out: Any, likelihood: str | None, event_ndim: int) -> int:
    """Elements of the tensors in a decoder output (a distribution's parameters):
    what a chunk of the evaluation holds per sample, whatever the likelihood's
    layout (categorical logits (..., D, C), a mixture's 10 M rows per pixel)."""
    if isinstance(out, Distribution):
        _, out = _from_distribution(out, likelihood, event_ndim)
    if isinstance(out, Tensor):
        return out.numel()
    if isinstance(out, dict):  # named parameters
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        return sum(t.numel() for t in out if isinstance(t, Tensor))
    return 0


def unfold_samples(out: Any, x: Tensor, likelihood: str, sample_shape: tuple[int, ...], batch_ndim: int) -> Any:
    """A decoder output whose samples are folded into the batch, viewed with
    z's leading shape: decode(z) for z (S, *B, L) may return (S·B, *event)
    (a conv decoder that ran on z.reshape(-1, L)) instead of (S, *B, *event).

    How it decides: the output's first tensor (the mean, logits, log rate or
    mixture logits) is folded when it has exactly one leading dimension, of
    size N = S·prod(B), before the dimensions one example's output has
    (x's event shape, and the classes for "categorical"). The expected shape
    has len(z.shape) - 1 >= 2 leading dimensions, so the two never have the
    same number of dimensions, and no output that fits the contract is ever
    reshaped. Then every tensor of the output with a leading N and at least
    the event's dimensions is viewed as (S, *B, ...); a parameter that only
    broadcasts (a per-channel logvar, a per-gene log theta) has fewer
    dimensions and is left as it is. What cannot be checked is the order of
    the N rows: they must be sample-major, as z.reshape(-1, L) gives them
    (row s·B + b is sample s of example b); a decoder that folds z in another
    order (z.transpose(0, 1).reshape(-1, L)) is misread without an error.
    The view copies nothing."""
    if len(sample_shape) + batch_ndim < 2:  # nothing to fold: the batch is already one dimension
        return out
    first = out if isinstance(out, Tensor) else out[0] if isinstance(out, (tuple, list)) and out else None
    events = x.dim() - batch_ndim
    if not isinstance(first, Tensor) or first.dim() != 1 + events + _TABLE[likelihood].class_dims:
        return out  # not folded (or a wrong shape, which the likelihood's check reports)
    lead_shape = (*sample_shape, *x.shape[:batch_ndim])
    n = 1
    for size in lead_shape:
        n *= size
    if first.shape[0] != n:
        return out

    def unfold(t: Any) -> Any:
        return t.unflatten(0, lead_shape) if isinstance(t, Tensor) and t.dim() > events and t.shape[0] == n else t

    return unfold(out) if isinstance(out, Tensor) else type(out)(unfold(t) for t in out)


def decoder_log_prob(x: Tensor, out: Any, likelihood: str, sample_shape: tuple[int, ...],
                     batch_ndim: int = 1) -> Tensor:
    """log p(x | z) summed over all of x's event dimensions, shape (*sample_shape, *batch).

    Args:
        x: data (*batch, *event): the first ``batch_ndim`` dimensions are the
            batch (mu's leading shape), the rest one event of any shape, e.g.
            (C, H, W) images.
        out: decode(z) for z of shape (*sample_shape, *batch, L): the decoder
            output of shape (*sample_shape, *x.shape), a (mean, logvar) pair, or
            a torch distribution (Bernoulli, Normal, Independent of either).
        likelihood: one of LIKELIHOODS (see the module docstring); None
            when out is a distribution, which implies it.
        sample_shape: () for one sample, (K,) for K samples.

    The likelihood's entry in _TABLE (below) routes the output to its op.
    """
    events = x.dim() - batch_ndim
    probs_given = False  # logits derived from probabilities: no sigmoid check
    if isinstance(out, Distribution):
        # Bernoulli(probs=p) gives logits of p, which may lie in [0, 1]: not
        # checked; Bernoulli(logits=sigmoid(h)) is the raw-output mistake
        # itself, so logits the user passed are checked like a raw output
        probs_given = not _built_from_logits(out)
        likelihood, out = _from_distribution(out, likelihood, events)
    elif isinstance(out, dict):  # the count likelihoods' named parameters: each one's form by its key
        likelihood, out = counts_from_named(out, likelihood)
    elif likelihood is None:
        raise ValueError(_REQUIRED)
    if (entry := _TABLE.get(likelihood)) is None:  # the objectives checked it already: a direct caller's error
        check_likelihood(likelihood)
    # an output of the contract's rank is never folded: one dim() comparison (unfold_samples decides the rest)
    first = out if isinstance(out, Tensor) else out[0] if isinstance(out, (tuple, list)) and out else None
    if isinstance(first, Tensor) and first.dim() != x.dim() + len(sample_shape) + entry.class_dims:
        out = unfold_samples(out, x, likelihood, sample_shape, batch_ndim)
    return entry.route(x, out, sample_shape, batch_ndim, probs_given)


# -- the likelihoods: one route per likelihood= name, one signature ------------------------------
# A route takes (x, out, sample_shape, batch_ndim, probs_given) after decoder_log_prob has
# mapped a distribution to its output and unfolded folded samples: it checks the output's
# shape (_likelihood_layout.check_output, or the op's own decoder step), maps it to its op's
# arguments and calls the op; each is its op folder's (Op.route, in its op.py). probs_given:
# the logits came from a distribution's probabilities (no raw-output check); only the
# Bernoulli likelihoods read it.


@dataclass(frozen=True)
class Likelihood:
    """One likelihood= name: the registry's op that computes it (its Op entry's
    ``likelihood``), the route from the decoder output to that op (the Op's
    ``route``, in its folder's op.py), and the dimensions the output has beyond
    x's (the categorical's classes: what unfold_samples allows for)."""

    name: str
    op: str
    route: Callable[[Tensor, Any, tuple[int, ...], int, bool], Tensor]
    class_dims: int = 0


def _table() -> dict[str, Likelihood]:
    """Every op the registry describes with a likelihood, by that name."""
    table = {}
    for op in _registry.OPS.values():
        if op.likelihood is not None:
            module = importlib.import_module(f"{_ops.__name__}.{_registry.FOLDER_OF[op.name]}.op")
            table[op.likelihood] = Likelihood(op.likelihood, op.name, getattr(module, op.route), op.class_dims)
    return table


# The one list of likelihoods: LIKELIHOODS (the accepted names, in this order in the error) derives from it.
_TABLE: dict[str, Likelihood] = _table()
LIKELIHOODS = tuple(_TABLE)
