"""The per-example log p(x) of a Pyro model/guide pair, streamed over K by
fastvae (docs/integrations.md).

Pyro is imported when :func:`log_likelihood` is called, not when this module
is imported: ``pip install fastvae[integrations]`` adds it.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..evaluation import LogLikelihoodStats, importance_log_likelihood

# the outer plate over a chunk's samples (the name vectorized_importance_weights'
# "num_particles_vectorized" would take, kept apart from any plate of the user's)
SAMPLES_PLATE = "_fastvae_samples"


def log_likelihood(
    model: Callable,
    guide: Callable,
    data: Tensor,
    *args: Any,
    k: int = 5000,
    chunk_size: int | None = None,
    target_stderr: float | None = None,
    return_stats: bool = False,
    generator: torch.Generator | None = None,
    memory_budget: int | None = None,
    bytes_per_sample: int | None = None,
    progress: bool = False,
    data_plate: str = "data",
    **kwargs: Any,
) -> Tensor | LogLikelihoodStats:
    """log p(x_i) of each example of ``data`` under a Pyro model, by
    importance sampling from its guide: log p̂(x_i) = logmeanexp_k
    [log p(x_i, z_ik) − log q(z_ik | x_i)], K samples per example, the same
    estimate and diagnostics as :func:`fastvae.log_likelihood`.

    Each example gets its own estimate, not the joint of the batch (what
    ``pyro.infer.importance.vectorized_importance_weights`` gives on a batch):
    the log-weights are summed over every dimension but the samples' and the
    data plate's, giving (K_c, B) per chunk, which
    :func:`fastvae.importance_log_likelihood` streams (memory bounded by one
    chunk, standard error, ESS, Pareto k̂, ``target_stderr``). A chunk's
    samples are drawn under one outer ``pyro.plate`` (vectorized), so a guide
    that computes its encoder's output inside ``pyro.plate(data_plate)`` runs
    the encoder once per chunk on the examples, not once per sample.

    Args:
        model, guide: the Pyro model and guide, called as ``model(data, *args,
            **kwargs)``. Every latent must be per example: drawn inside
            ``pyro.plate(data_plate, B)`` in the guide, as every observed site
            in the model, whose plate dimension (any ``dim``) indexes the rows
            of ``data``. Each latent of the model must be drawn by the guide.
            No other vectorized plate may be called ``"_fastvae_samples"``.
        data: the batch, a tensor whose first dimension is the B examples.
        *args: further arguments of model and guide. A tensor whose first
            dimension is B is per example and is sliced with ``data`` when
            fastvae scores a subset of the rows (``target_stderr``, a memory
            budget too small for one sample of every example, or
            torch.distributed); anything else is passed as it is.
        k: samples per example (K >= 1; 5000 is the usual report).
        chunk_size, memory_budget, bytes_per_sample, generator, progress:
            as in :func:`fastvae.importance_log_likelihood`. Pyro draws with
            torch's generators, which fastvae seeds per chunk, so the same
            generator state gives the same result.
        target_stderr: stop sampling an example once its standard error
            reaches this (nats), as in :func:`fastvae.log_likelihood`; the
            model and guide then receive only the rows still sampling
            (``data`` and the per-example ``*args`` sliced).
        return_stats: return a :class:`fastvae.LogLikelihoodStats` instead of
            the estimates alone.
        data_plate: the name of the plate over the examples.
        **kwargs: passed to model and guide unchanged.

    Returns:
        (B,) estimates of log p(x_i) in nats (float32; float64 for float64
        ``data``), or LogLikelihoodStats with ``return_stats=True``.

    Raises:
        ValueError: naming the site, when a latent sample site of the guide
            (or an observed site of the model) is not inside the data plate
            of size B (a global latent: the examples share it, so log p(x_i)
            of one example is not the estimate of a per-example sample), when
            a model's latent is not drawn by the guide, or a site is scaled
            (``poutine.scale``, a subsampled plate).
        TypeError: when model or guide is not callable or data not a tensor.

    Runs under torch.no_grad(); put the networks in eval mode first.
    """
    import pyro
    from pyro import poutine
    from pyro.poutine.util import prune_subsample_sites

    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable Pyro {name}, got {type(fn).__name__}")
    if not isinstance(data, Tensor):
        raise TypeError(f"data must be a tensor whose first dimension is the examples, got {type(data).__name__}")
    if data.dim() < 1 or data.shape[0] < 1:
        raise ValueError(f"data must have shape (B, ...) with B >= 1, got {tuple(data.shape)}")
    if not isinstance(data_plate, str):
        raise TypeError(f"data_plate must be a plate's name (str), got {type(data_plate).__name__}")
    B = data.shape[0]

    def rows_of(rows: Tensor) -> tuple[Tensor, tuple]:
        if rows.numel() == B:  # every row, in order: no copy
            return data, args
        return data[rows], tuple(a[rows] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == B else a
                                 for a in args)

    # One trace on the whole batch, before any sample is streamed: it refuses a
    # global latent by name, and gives the plate nesting the samples' plate must
    # sit left of (what vectorized_importance_weights asks its caller for).
    cuda = [data.device.index if data.device.index is not None else torch.cuda.current_device()] \
        if data.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        guide_trace = poutine.trace(guide).get_trace(data, *args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(data, *args, **kwargs)
    # a plate's own "sample" site (its indices) is no random variable
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    _check_sites(model_trace, guide_trace, data_plate, B)
    nesting = max([len(site["fn"].batch_shape) for tr in (model_trace, guide_trace)
                   for site in tr.nodes.values() if site["type"] == "sample"] or [0])
    nesting = max([nesting] + [-frame.dim for tr in (model_trace, guide_trace) for site in tr.nodes.values()
                               if site["type"] == "sample" for frame in site["cond_indep_stack"] if frame.vectorized])
    samples_dim = -(nesting + 1)

    def log_weight_fn(x_rep: Tensor) -> Tensor:
        n, b = x_rep.shape
        d, a = rows_of(x_rep[0].long())

        def vectorized(fn):
            def run(*fn_args, **fn_kwargs):
                with pyro.plate(SAMPLES_PLATE, n, dim=samples_dim):
                    return fn(*fn_args, **fn_kwargs)
            return run

        mt, gt = _importance_trace(nesting + 1, vectorized(model), vectorized(guide), (d, *a), kwargs)
        _check_sites(mt, gt, data_plate, b)
        lw = x_rep.new_zeros((n, b), dtype=torch.float64 if data.dtype == torch.float64 else torch.float32)
        for tr, sign in ((mt, 1.0), (gt, -1.0)):
            for name, site in tr.nodes.items():
                if site["type"] == "sample" and not (tr is gt and site["is_observed"]):
                    lw = lw + sign * _per_example(site, name, nesting + 1, data_plate, n, b)
        return lw

    # fastvae hands log_weight_fn the rows it scores, not the data: x holds
    # each example's index, exact in float64 (float64 data, whose log-weights
    # then accumulate in float64) and in int64 (float32 accumulation)
    index = torch.arange(B, device=data.device, dtype=torch.float64 if data.dtype == torch.float64 else torch.int64)
    # the evaluation's warnings (low ESS, k̂) re-raised at the caller's line, not this one's
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = importance_log_likelihood(
                index, log_weight_fn, k=k, chunk_size=chunk_size, generator=generator, progress=progress,
                return_stats=return_stats, memory_budget=memory_budget, bytes_per_sample=bytes_per_sample,
                target_stderr=target_stderr)
    finally:
        for w in caught:
            warnings.warn(w.message, stacklevel=2)
    return out


def _importance_trace(max_plate_nesting: int, model: Callable, guide: Callable, args: tuple, kwargs: dict):
    """pyro.infer.enum.get_importance_trace (the guide traced, the model
    replayed on it, each sample site's log_prob), with a Bernoulli observation
    scored by fastvae's fused op (_fused_log_prob) before Pyro computes the
    rest: summed over its event in one pass, without the per-pixel log_prob
    tensor, the decoder's largest cost after its own layers."""
    from pyro import poutine
    from pyro.infer.enum import get_importance_trace
    from pyro.infer.util import is_validation_enabled
    from pyro.poutine.util import prune_subsample_sites
    from pyro.util import check_model_guide_match, check_site_shape

    if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):  # a GuideMessenger: Pyro's own path
        return get_importance_trace("flat", max_plate_nesting, model, guide, args, kwargs)
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and (lp := _fused_log_prob(site)) is not None:
            site["unscaled_log_prob"] = site["log_prob"] = lp  # compute_log_prob keeps a site's log_prob
            site["log_prob_sum"] = lp.sum()
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    if is_validation_enabled():
        for tr in (model_trace, guide_trace):
            for site in tr.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, max_plate_nesting)
    return model_trace, guide_trace


def _fused_log_prob(site: dict) -> Tensor | None:
    """An observed Bernoulli's log_prob, ``Independent(Bernoulli(probs= or
    logits=), r)`` with r >= 1, by fastvae.bernoulli_log_prob's kernel: its
    batch_shape's log-densities, as Pyro's log_prob gives them to rounding.
    Probabilities become logits by torch.logit with Pyro's clamp (eps, 1 -
    eps), so a saturated sigmoid scores as Pyro scores it. None (Pyro
    computes the site) for any other site: another distribution (a subclass
    of Bernoulli too), r = 0, a mask, or data that is not a trailing slice of
    the parameters' shape."""
    from pyro.distributions import Bernoulli, Independent

    from ..ops.bernoulli_likelihood.op import bernoulli_log_prob_unchecked

    fn, event_dims = site["fn"], 0
    scale = site["scale"]
    if (not site["is_observed"] or site["mask"] is not None or site["args"] or site["kwargs"]
            or not (isinstance(scale, (int, float)) and scale == 1)):
        return None
    # exact types: a subclass may define its own log_prob
    while type(fn) in (Independent, torch.distributions.Independent):
        event_dims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if type(fn) not in (Bernoulli, torch.distributions.Bernoulli) or event_dims < 1:
        return None
    given_logits = "logits" in fn.__dict__  # the parameter as given (the other is a lazy property)
    param = fn.logits if given_logits else fn.probs
    x = site["value"]
    if (not isinstance(x, Tensor) or x.dim() < event_dims or x.dim() > param.dim()
            or x.shape != param.shape[param.dim() - x.dim():] or not x.dtype.is_floating_point
            or not param.dtype.is_floating_point):
        return None
    if fn._validate_args:  # Pyro's log_prob checks the data against the support: so does this one
        fn._validate_sample(x)
    logits = param if given_logits else torch.logit(param, eps=torch.finfo(param.dtype).eps)
    return bernoulli_log_prob_unchecked(x, logits, event_dims)


def _plate_frame(site: dict, plate: str):
    return next((f for f in site["cond_indep_stack"] if f.name == plate and f.vectorized), None)


def _check_sites(model_trace, guide_trace, plate: str, b: int) -> None:
    """Refuses, by site, what makes the per-example estimate undefined or wrong."""
    guide_latents = {name for name, s in guide_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
    for who, tr in (("guide", guide_trace), ("model", model_trace)):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or (who == "guide" and site["is_observed"]):
                continue
            what = "observed site" if site["is_observed"] else "latent site"
            if who == "model" and not site["is_observed"] and name not in guide_latents:
                raise ValueError(
                    f"the model's latent site {name!r} is not drawn by the guide: importance sampling needs "
                    f"q(z | x) for every latent (each model latent must be a sample site of the guide)")
            if who == "model" and not site["is_observed"]:
                continue  # the guide's site of the same name was checked
            frame = _plate_frame(site, plate)
            if frame is None:
                plates = ", ".join(repr(f.name) for f in site["cond_indep_stack"]
                                   if f.name != SAMPLES_PLATE) or "none"
                why = ("a latent shared by every example (a global latent) couples the examples, so log p(x_i) of "
                       "one example is not defined by a per-example sample; fastvae's estimate is per example"
                       if what == "latent site" else
                       "an observation outside the plate is not one example's: it cannot be split among them")
                raise ValueError(f"the {who}'s {what} {name!r} is not inside pyro.plate({plate!r}) (its plates: "
                                 f"{plates}): {why}. Put it inside the data plate, or pass data_plate= the "
                                 f"name of the plate over the examples")
            if frame.size != b:
                raise ValueError(f"the {who}'s {what} {name!r} is in pyro.plate({plate!r}) of size {frame.size}; "
                                 f"data has {b} examples: the plate must range over data's rows (no subsampling)")
            scale = site["scale"]
            if not (isinstance(scale, (int, float)) and scale == 1):
                raise ValueError(f"the {who}'s {what} {name!r} is scaled ({scale}: poutine.scale or a subsampled "
                                 f"plate): a log-likelihood needs the unscaled log-densities")


def _per_example(site: dict, name: str, dims: int, plate: str, n: int, b: int) -> Tensor:
    """A site's log-density summed over every dimension but the samples' (the
    leftmost of ``dims``) and the data plate's: (n, b)."""
    lp = site["log_prob"]
    if lp.dim() > dims:
        raise ValueError(f"site {name!r}'s log_prob has shape {tuple(lp.shape)}, more batch dimensions than its "
                         f"{dims - 1} plates: declare them with pyro.plate or .to_event()")
    lp = lp.reshape((1,) * (dims - lp.dim()) + tuple(lp.shape))
    data_dim = dims + _plate_frame(site, plate).dim
    others = [i for i in range(1, dims) if i != data_dim]
    if others:
        lp = lp.sum(others, keepdim=True)
    return lp.reshape(lp.shape[0], lp.shape[data_dim]).expand(n, b)
