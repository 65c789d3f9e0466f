"""The per-cell log p(x) of a scvi-tools model (SCVI and the models built on
its VAE module), streamed over K by fastvae (docs/integrations.md).

scvi-tools is imported when :func:`marginal_ll` is called, not when this
module is imported: ``pip install fastvae[integrations]`` adds it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._validate import positive_int
from ..evaluation import LogLikelihoodStats
from ._common import RowNoise, evaluate

# per-cell inputs of the generative model besides z and the library, as
# module._get_generative_input names them
_COVARIATES = ("batch_index", "y", "cont_covs", "cat_covs", "size_factor")


def marginal_ll(
    model: Any,
    adata: Any = None,
    indices: Sequence[int] | None = None,
    k: int = 5000,
    chunk_size: int | None = None,
    target_stderr: float | None = None,
    return_stats: bool = False,
    generator: torch.Generator | None = None,
    memory_budget: int | None = None,
    bytes_per_sample: int | None = None,
    progress: bool = False,
    batch_size: int | None = None,
) -> Tensor | LogLikelihoodStats:
    """log p(x_i) of each cell under a trained scvi-tools model, by importance
    sampling from its encoder: log p̂(x_i) = logmeanexp_k [log p(x_i | z_ik,
    l_ik) + log p(z_ik) − log q(z_ik | x_i) (+ log p(l_ik) − log q(l_ik | x_i)
    for a latent library)], the estimate of ``model.get_marginal_ll(...,
    return_mean=False)``, with the diagnostics of :func:`fastvae.log_likelihood`.

    The encoder runs once per cell (in batches of ``batch_size`` cells); its
    posterior's mean and scale, the observed library size and the covariates
    are kept per cell, and each chunk of samples runs the decoder on all its
    rows at once (the samples folded into the batch), with each row's own
    library size, batch index, labels and covariates: fastvae may split the
    cells (memory budget, ``target_stderr``) without another cell's library
    reaching a cell's decoder.

    Args:
        model: a trained scvi-tools model whose ``module`` is
            ``scvi.module.VAE`` or a subclass (SCVI, LinearSCVI, and models
            sharing that module's ``inference``/``generative``): observed or
            latent library, batch, label and covariate inputs, any gene
            likelihood, ``latent_distribution`` "normal" or "ln".
        adata: the AnnData to score, registered as for the model (default:
            the model's own), as in ``get_marginal_ll``.
        indices: the cells of ``adata`` to score (default: every cell).
        k: samples per cell (K >= 1; 5000 is the usual report).
        chunk_size, memory_budget, bytes_per_sample, generator, progress:
            as in :func:`fastvae.importance_log_likelihood`; the chunk size by
            default comes from the memory the decoder is measured to use per
            sample of a cell.
        target_stderr: stop sampling a cell once its standard error reaches
            this (nats), as in :func:`fastvae.log_likelihood`.
        return_stats: return a :class:`fastvae.LogLikelihoodStats` instead of
            the estimates alone.
        batch_size: cells per encoder pass (default ``scvi.settings.batch_size``).

    Returns:
        (N,) estimates of log p(x_i) in nats for the N cells, in ``indices``'
        order (float32, on the module's device), or LogLikelihoodStats with
        ``return_stats=True``.

    Raises:
        TypeError: when ``model`` is not a scvi-tools model with a module, or
            its module is not a ``scvi.module.VAE``.
        ValueError: when the AnnData is minified (the counts are not there to
            score), or for an invalid k, chunk_size, memory_budget,
            target_stderr or indices.

    Runs under torch.no_grad() with the module in eval mode (dropout off,
    batch norm on its running statistics), restored after.

    For ``latent_distribution="ln"`` the weight is taken in the space the
    encoder samples (before the softmax), where the prior and the posterior
    are both normal, so it is log p(x) of the model; ``get_marginal_ll``
    evaluates those densities at the softmax's output instead.
    """
    import scvi
    from scvi.module import VAE

    module = getattr(model, "module", None)
    if module is None or not hasattr(model, "_validate_anndata"):
        raise TypeError(f"model must be a trained scvi-tools model (SCVI, LinearSCVI, ...), "
                        f"got {type(model).__name__}")
    if not isinstance(module, VAE):
        raise TypeError(
            f"model's module is {type(module).__name__}, not scvi.module.VAE or a subclass: marginal_ll needs "
            f"that module's inference (qz, library) and generative (px) interface")
    if getattr(module, "minified_data_type", None) is not None or getattr(model, "minified_data_type", None):
        raise ValueError("adata is minified (only the latent posterior is stored): the counts are not there to "
                         "score; pass the full AnnData")
    k = positive_int("k", k)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    adata = model._validate_anndata(adata)
    loader = model._make_data_loader(adata=adata, indices=indices, batch_size=batch_size or scvi.settings.batch_size,
                                     shuffle=False)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            cells = _encode_cells(module, loader)
        N = cells["x"].shape[0]
        if N == 0:
            raise ValueError("indices selects no cells: nothing to score")
        latent_library = not module.use_observed_lib_size
        transform = module.z_encoder.z_transformation
        dtype = cells["qz_loc"].dtype

        L = cells["qz_loc"].shape[1]
        noise = RowNoise(N, k, L + latent_library, dtype, cells["qz_loc"].device, generator)

        def log_weight_fn(x_rep: Tensor) -> Tensor:
            n, b = x_rep.shape
            rows = x_rep[0]
            every = b == N  # every cell, in order: no gather
            take = (lambda t: t) if every else (lambda t: t[rows])
            loc, scale = take(cells["qz_loc"]), take(cells["qz_scale"])
            eps_all = noise(rows, n)
            eps = eps_all[..., :L]
            u = torch.addcmul(loc, scale, eps)  # (n, b, L): the encoder's sample, before z_transformation
            log_w = (-0.5 * u.square() + 0.5 * eps.square()).sum(-1) + scale.log().sum(-1)  # log p(u) - log q(u)
            if latent_library:
                l_loc, l_scale = take(cells["ql_loc"]), take(cells["ql_scale"])
                eps_l = eps_all[..., L:]
                library = torch.addcmul(l_loc, l_scale, eps_l)
                p_mean, p_var = module._compute_local_library_params(take(cells["batch_index"]))
                log_w = log_w + (-0.5 * (library - p_mean).square() / p_var - 0.5 * p_var.log()
                                 + 0.5 * eps_l.square() + l_scale.log()).sum(-1)
            else:
                library = take(cells["library"]).expand(n, b, 1)
            # the samples folded into the batch (row s*b + j is cell j's sample s),
            # so every per-cell input is tiled the same way: scVI's layers take (rows, features)
            covariates = {name: None if cells[name] is None else take(cells[name]).repeat(n, 1)
                          for name in _COVARIATES}
            gen = module.generative(z=transform(u.reshape(n * b, -1)), library=library.reshape(n * b, 1),
                                    **covariates)
            return log_w + _log_px(gen["px"], take(cells["x"]), n, b)

        out = evaluate(N, cells["x"].device, torch.int64, log_weight_fn, k=k, chunk_size=chunk_size,
                       generator=generator, progress=progress, return_stats=return_stats,
                       memory_budget=memory_budget, bytes_per_sample=bytes_per_sample, target_stderr=target_stderr)
    finally:
        module.train(was_training)
    return out


def _encode_cells(module: Any, loader: Any) -> dict[str, Tensor | None]:
    """One encoder pass over the loader's cells: each cell's posterior mean and
    scale (z, and the library's when it is latent), its observed log library,
    counts and the generative model's covariates, concatenated in order."""
    parts: dict[str, list] = {}
    for tensors in loader:
        tensors = {key: v.to(module.device) if isinstance(v, Tensor) else v for key, v in tensors.items()}
        inference_inputs = module._get_inference_input(tensors, full_forward_pass=True)
        out = module.inference(**inference_inputs, n_samples=1)
        generative_inputs = module._get_generative_input(tensors, out)
        qz, ql = out["qz"], out["ql"]
        fields = {"x": inference_inputs["x"], "qz_loc": qz.loc, "qz_scale": qz.scale,
                  "library": out["library"] if ql is None else None,
                  "ql_loc": None if ql is None else ql.loc, "ql_scale": None if ql is None else ql.scale,
                  **{name: generative_inputs.get(name) for name in _COVARIATES}}
        for name, value in fields.items():
            parts.setdefault(name, []).append(value)
    if not parts:
        raise ValueError("indices selects no cells: nothing to score")
    cells: dict[str, Tensor | None] = {}
    for name, values in parts.items():
        if any(v is None for v in values):
            cells[name] = None
        else:
            cells[name] = torch.cat([v.reshape(v.shape[0], -1) for v in values]).contiguous()
    return cells


def _log_px(px: Any, x: Tensor, n: int, b: int) -> Tensor:
    """log p(x | z, l) summed over the genes, (n, b), for px over the n * b
    folded rows. scVI's count likelihoods go to fastvae's fused ops with x
    broadcast over the samples (no copies of x, and lgamma terms that depend
    on x and theta alone are not the samples' cost); any other (its "normal")
    to px.log_prob on x tiled over the samples."""
    from .. import negative_binomial_log_prob, poisson_log_prob, zinb_log_prob

    kind = type(px).__name__
    if kind in ("ZeroInflatedNegativeBinomial", "NegativeBinomial", "Poisson"):
        def per_sample(t: Tensor) -> Tensor:  # (n * b, G) -> (n, b, G); a per-gene (G,) as it is
            return t.reshape(n, b, -1) if t.dim() > 1 and t.shape[0] == n * b else t

        if kind == "Poisson":
            return poisson_log_prob(x, per_sample(px.rate).log())
        log_mean, log_theta = per_sample(px.mu).log(), per_sample(px.theta).log()
        if kind == "NegativeBinomial":
            return negative_binomial_log_prob(x, log_mean, log_theta)
        return zinb_log_prob(x, log_mean, log_theta, per_sample(px.zi_logits))
    return px.log_prob(x.repeat(n, 1)).sum(-1).reshape(n, b)
