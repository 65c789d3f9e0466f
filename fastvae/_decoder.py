"""log p(x | z) from whatever the user's decoder returned: the one convention
shared by fastvae.elbo, fastvae.iwae and the evaluation functions.

- likelihood="gaussian": decode(z) returns the mean (unit variance, i.e. the
  squared-error loss plus a constant) or a (mean, logvar) pair (a decoder
  that learns its variance; logvar per element or broadcastable to the mean).
- likelihood="bernoulli": decode(z) returns the logits.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .bernoulli_log_prob import bernoulli_log_prob
from .gaussian_log_prob import gaussian_log_prob

LIKELIHOODS = ("gaussian", "bernoulli")


def check_likelihood(likelihood: Any) -> None:
    if likelihood is None:  # no default: a Gaussian default silently mis-scored Bernoulli models
        raise ValueError(
            "likelihood= is required: 'bernoulli' if decode returns logits (binary or [0, 1] data), "
            "'gaussian' if it returns the mean (unit variance) or a (mean, logvar) pair"
        )
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def _check_output(name: str, out: Any, x: Tensor, sample_shape: tuple[int, ...]) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"decode must return a tensor as the {name}, got {type(out).__name__}")
    want = (*sample_shape, *x.shape)
    if tuple(out.shape) != want:
        raise ValueError(
            f"decode returned a {name} of shape {tuple(out.shape)}; expected {want} "
            f"(sample shape {sample_shape} followed by x's shape {tuple(x.shape)})"
        )
    return out


def _flat_events(t: Tensor, lead: int) -> Tensor:
    """t with every dimension after the first ``lead`` merged into one: a view
    of a contiguous tensor (a conv decoder's output), a copy otherwise."""
    return t.reshape(*t.shape[:lead], -1)


def decoder_log_prob(x: Tensor, out: Any, likelihood: str, sample_shape: tuple[int, ...],
                     batch_ndim: int = 1) -> Tensor:
    """log p(x | z) summed over all of x's event dimensions, shape (*sample_shape, *batch).

    Args:
        x: data (*batch, *event): the first ``batch_ndim`` dimensions are the
            batch (mu's leading shape), the rest one event of any shape, e.g.
            (C, H, W) images.
        out: decode(z) for z of shape (*sample_shape, *batch, L): the decoder
            output of shape (*sample_shape, *x.shape), or a (mean, logvar) pair.
        likelihood: "gaussian" or "bernoulli" (see the module docstring).
        sample_shape: () for one sample, (K,) for K samples.
    """
    events = x.dim() - batch_ndim
    lead = len(sample_shape) + batch_ndim

    def flat(t: Tensor, lead_dims: int) -> Tensor:
        return t if events == 1 else _flat_events(t, lead_dims)

    if likelihood == "bernoulli":
        logits = _check_output("logits", out, x, sample_shape)
        return bernoulli_log_prob(flat(x, batch_ndim), flat(logits, lead))
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(
                f"for likelihood='gaussian' decode returns the mean or a (mean, logvar) pair, "
                f"got a sequence of {len(out)} items"
            )
        mean = _check_output("mean", out[0], x, sample_shape)
        logvar = out[1]
        if not isinstance(logvar, Tensor):
            raise TypeError(f"decode must return a tensor as the logvar, got {type(logvar).__name__}")
        if events > 1 and logvar.dim() > 1:  # a per-pixel or per-channel logvar: spread over the event
            logvar = flat(logvar.expand(mean.shape) if logvar.shape != mean.shape else logvar, lead)
        return gaussian_log_prob(flat(x, batch_ndim), flat(mean, lead), logvar)
    mean = _check_output("mean", out, x, sample_shape)
    return gaussian_log_prob(flat(x, batch_ndim), flat(mean, lead))
