"""The objective of a hierarchical VAE (Ladder VAE, IAF-VAE, NVAE, VDVAE):
the reconstruction term and one KL term per latent group, with β, KL
warm-up, free bits per group and NVAE's KL balancing, and the terms per
group for logging. docs/hierarchical.md shows VDVAE's and NVAE's loss code
next to it.

A model with groups l = 1..G, each q(z_l | x, z_<l) against a prior
p(z_l | z_<l) that the top-down network computes, has the ELBO

    log p(x) >= E_q[log p(x | z)] - Σ_l E_q[KL(q(z_l | x, z_<l) || p(z_l | z_<l))]

with each group's KL evaluated at the sampled z_<l (analytic per group for
Gaussian groups). The model computes the KLs; this module weighs and sums them.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution

from . import _validate
from ._decoder import check_likelihood, decoder_log_prob
from ._dtypes import accumulation_dtype, compute_dtype

REDUCTIONS = ("mean", "sum", "none")
# NVAE's kl_per_group adds this to each group's batch-mean |KL| before the
# coefficients are formed, so that a collapsed group (KL 0) keeps a positive one
BALANCE_EPSILON = 0.01


class HierarchicalTerms(NamedTuple):
    """What fastvae.hierarchical_elbo returns; every field is reduced like
    the bound (a scalar for reduction "mean" or "sum", per example for
    "none") except the per-group fields.

    bound: the training objective, reconstruction − Σ_l c_l · KL_l (KL_l
        after free bits; c_l the coefficients). Maximize it: loss = −bound.
    elbo: reconstruction − Σ_l KL_l, the ELBO itself (every coefficient 1,
        no free bits): the bound on log p(x) to report.
    reconstruction: log p(x | z).
    kl: Σ_l KL_l, before free bits and coefficients.
    kl_per_group: each group's KL before free bits and coefficients, (G,)
        reduced over the batch, (B, G) for reduction "none": the collapse
        diagnostic (a group near 0 carries no information).
    coefficients: (G,) c_l = beta · kl_weight · γ_l, γ_l NVAE's balancing
        coefficient (1 without balancing), without gradient.
    bits_per_dim: −elbo / (D · ln 2) with D the number of values of one
        example of x: the negative ELBO in bits per dimension (no
        dequantization offset; for 8-bit images under the discretized
        logistic mixture, the usual figure). None when x is not given.
    """
    bound: Tensor
    elbo: Tensor
    reconstruction: Tensor
    kl: Tensor
    kl_per_group: Tensor
    coefficients: Tensor
    bits_per_dim: Tensor | None


def kl_warmup(step: int, warmup_steps: int, *, start: int = 0, minimum: float = 0.0) -> float:
    """NVAE's KL warm-up coefficient at ``step``: 0 (or ``minimum``) until
    ``start``, then rising linearly to 1 over ``warmup_steps`` steps:
    max(minimum, min(1, (step − start) / warmup_steps)). NVAE's kl_coeff with
    total_step = warmup_steps, constant_step = start, min_kl_coeff = minimum
    (its default 1e-4). Pass it as hierarchical_elbo's ``kl_weight``."""
    step = _validate.integer("step", step)
    warmup_steps = _validate.positive_int("warmup_steps", warmup_steps)
    start = _validate.integer("start", start)
    minimum = _validate.real("minimum", minimum, minimum=0.0)
    if minimum > 1:
        raise ValueError(f"minimum must be <= 1, got {minimum}")
    return max(minimum, min(1.0, (step - start) / warmup_steps))


def balance_coefficients(kls: Tensor, group_sizes: Tensor) -> Tensor:
    """NVAE's KL balancing coefficients γ (G,) of the per-example group KLs
    kls (B, G), without gradient: γ_l ∝ (mean_b |KL_bl| + 0.01) / s_l,
    normalized to sum to G, s_l group l's size (group_sizes)."""
    with torch.no_grad():
        mean = kls.detach().abs().mean(0) + BALANCE_EPSILON
        ratio = mean / group_sizes.to(mean.dtype)
        return ratio * (kls.shape[1] / ratio.sum())


def _reduce(t: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return t.mean(0)
    if reduction == "sum":
        return t.sum(0)
    return t


def _reconstruction(x: Any, decoder_output: Any, likelihood: Any, log_px: Any) -> Tensor:
    """log p(x | z) per example (B,): log_px as given, or the built-in
    likelihood of the decoder output."""
    if log_px is not None:
        if decoder_output is not None or likelihood is not None:
            raise ValueError("pass either log_px (log p(x | z) per example) or decoder_output with likelihood=, "
                             "not both")
        _validate.float_tensors(log_px=log_px)
        if log_px.dim() != 1 or log_px.shape[0] < 1:
            raise ValueError(f"log_px must have shape (B,): log p(x | z) summed over each example's dimensions; "
                             f"got {tuple(log_px.shape)}")
        if x is not None:
            if x.dim() < 1 or x.shape[0] != log_px.shape[0]:
                raise ValueError(f"x has shape {tuple(x.shape)}; log_px has shape {tuple(log_px.shape)}: "
                                 f"they must share the batch dimension B")
        return log_px
    if decoder_output is None:
        raise ValueError("pass the decoder's output (with likelihood=) or log_px, log p(x | z) per example")
    if x is None:
        raise ValueError("x is required with decoder_output: the likelihood scores x under it")
    if not isinstance(decoder_output, Distribution):
        if likelihood is None:
            raise ValueError("likelihood= is required with a decoder output that is not a torch distribution, "
                             "e.g. likelihood=\"discretized_logistic_mixture\" (docs/likelihoods.md)")
        check_likelihood(likelihood)
    _validate.data_tensor("x", x, likelihood)
    _validate.event_dim("x", x)
    return decoder_log_prob(x, decoder_output, likelihood, (), 1)


def _group_kls(kls: Any, B: int) -> tuple[list[Tensor], list[int | None]]:
    """Each group's KL per example (B,), and its size (values per example;
    None for a KL given as (B,))."""
    if isinstance(kls, Tensor) or not isinstance(kls, (list, tuple)):
        raise TypeError(f"kls must be a list or tuple of per-group KL tensors (B, ...) or (B,), got "
                        f"{type(kls).__name__}")
    if not kls:
        raise ValueError("kls is empty: pass one KL tensor per latent group")
    per_example, sizes = [], []
    for i, kl in enumerate(kls):
        if not isinstance(kl, Tensor) or not kl.dtype.is_floating_point:
            kind = f"a {kl.dtype} tensor" if isinstance(kl, Tensor) else type(kl).__name__
            raise TypeError(f"kls[{i}] must be a floating-point tensor, got {kind}")
        if kl.dim() < 1 or kl.shape[0] != B:
            raise ValueError(f"kls[{i}] has shape {tuple(kl.shape)}; expected (B, ...) with B = {B} (the "
                             f"reconstruction's batch): each group's KL per element, e.g. (B, C, H, W), or per "
                             f"example, (B,)")
        if kl.dim() == 1:
            per_example.append(kl)
            sizes.append(None)
        else:
            # summed in float32 at least: a bfloat16 sum of thousands of values loses nats
            per_example.append(kl.reshape(B, -1).sum(1, dtype=accumulation_dtype(kl.dtype)))
            sizes.append(math.prod(kl.shape[1:]))
    return per_example, sizes


def _sizes_tensor(group_sizes: Any, sizes: list[int | None], balance: bool, like: Tensor) -> Tensor | None:
    """The group sizes s_l NVAE's balancing divides by: group_sizes, else
    the values per example of each per-element KL."""
    G = len(sizes)
    if group_sizes is not None:
        if isinstance(group_sizes, Tensor):
            group_sizes = group_sizes.tolist()
        if not isinstance(group_sizes, (list, tuple)) or len(group_sizes) != G:
            raise ValueError(f"group_sizes must be a sequence of {G} positive numbers, one per group, got "
                             f"{group_sizes!r}")
        values = [_validate.real(f"group_sizes[{i}]", s) for i, s in enumerate(group_sizes)]
        if any(v <= 0 for v in values):
            raise ValueError(f"group_sizes must be positive, got {values}")
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    if not balance:
        return None
    if any(s is None for s in sizes):
        missing = [i for i, s in enumerate(sizes) if s is None]
        raise ValueError(f"balance=True divides each group's KL by its size, and kls{missing} are given per "
                         f"example (B,): pass those KLs per element (B, C, H, W), or group_sizes=")
    return torch.tensor(sizes, dtype=like.dtype, device=like.device)


def hierarchical_elbo(
    x: Tensor | None,
    decoder_output: Any,
    kls: list[Tensor] | tuple[Tensor, ...],
    *,
    likelihood: str | None = None,
    log_px: Tensor | None = None,
    beta: float = 1.0,
    kl_weight: float = 1.0,
    balance: bool = False,
    group_sizes: Any = None,
    free_bits: float = 0.0,
    reduction: str = "mean",
) -> HierarchicalTerms:
    """The ELBO of a hierarchical VAE with its terms per group:

        bound = log p(x | z) − Σ_l c_l · KL_l,   c_l = beta · kl_weight · γ_l

    Args:
        x: the data (B, *event), e.g. (B, C, H, W) images in [-1, 1] for
            "discretized_logistic_mixture". May be None with log_px (then
            bits_per_dim is None).
        decoder_output: the decoder's output for x, scored by the built-in
            ``likelihood`` exactly as fastvae.elbo scores decode(z) (the same
            forms: PixelCNN++'s packed mixture parameters (B, 10 M, H, W), a
            (mean, logvar) pair, logits, a torch distribution ...;
            docs/likelihoods.md). None with log_px.
        kls: one KL per latent group, in any order (it is the order of the
            per-group fields): KL(q(z_l | x, z_<l) || p(z_l | z_<l)) at the
            sampled z_<l, per element (B, C_l, H_l, W_l), summed here over
            all but the batch dimension, or per example (B,). Gradients flow
            to each.
        likelihood: the name of the likelihood of decoder_output (required
            unless it is a torch distribution).
        log_px: instead of decoder_output: log p(x | z) per example (B,), from
            any likelihood.
        beta: weight of every KL term (β-VAE), >= 0.
        kl_weight: the KL warm-up coefficient in [0, 1] at this step (e.g.
            fastvae.kl_warmup(step, warmup_steps)); multiplies every KL term
            like beta, and switches balancing on while it is below 1.
        balance: NVAE's KL balancing (Vahdat & Kautz 2020, appendix A).
            While kl_weight < 1, group l's KL is weighted by

                γ_l = G · (k̄_l / s_l) / Σ_j (k̄_j / s_j),  k̄_l = mean_b |KL_bl| + 0.01,

            computed without gradient (a coefficient, not a term), so the
            γ_l sum to G and a group with a large KL per latent value is
            pushed harder, which keeps groups from collapsing during
            warm-up. s_l is the group's size: the values per example of
            kls[l] (C_l · H_l · W_l), or group_sizes[l]. At kl_weight = 1
            every γ_l is 1 (NVAE's kl_balancer does the same).
        group_sizes: s_l, one positive number per group (needed for a KL
            given per example). NVAE's own code divides by its alpha_i, 4^i
            over the groups at the i-th scale ('square'), top scale first:
            pass that to reproduce its coefficients exactly.
        free_bits: a floor λ >= 0 in nats per group (Kingma et al. 2016):
            a group whose KL, averaged over the batch, is below λ contributes
            λ to every example instead, with no gradient; applied before the
            coefficients.
        reduction: "mean" over the batch (default), "sum", or "none".
            "mean" of an empty batch is a ValueError (it would be NaN); "sum" gives 0.

    Returns:
        HierarchicalTerms(bound, elbo, reconstruction, kl, kl_per_group,
        coefficients, bits_per_dim), in nats except bits_per_dim. Train
        with ``loss = -terms.bound``; report ``terms.elbo`` or
        ``terms.bits_per_dim``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    beta = _validate.real("beta", beta, minimum=0.0)
    kl_weight = _validate.real("kl_weight", kl_weight, minimum=0.0)
    if kl_weight > 1:
        raise ValueError(f"kl_weight must be in [0, 1] (a warm-up coefficient; beta scales beyond 1), got {kl_weight}")
    balance = _validate.boolean("balance", balance)
    free_bits = _validate.real("free_bits", free_bits, minimum=0.0)
    if x is not None and not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor (B, *event) or None, got {type(x).__name__}")
    reconstruction = _reconstruction(x, decoder_output, likelihood, log_px)
    B = reconstruction.shape[0]
    _validate.nonempty_batch("x" if x is not None else "log_px", (x if x is not None else log_px).shape, (B,),
                             reduction)
    per_example, sizes = _group_kls(kls, B)
    dtype = compute_dtype(reconstruction, *per_example)
    reconstruction = reconstruction.to(dtype)
    group = torch.stack([kl.to(dtype) for kl in per_example], 1)  # (B, G)
    sizes_t = _sizes_tensor(group_sizes, sizes, balance, group)
    G = group.shape[1]
    if balance and kl_weight < 1:
        gamma = balance_coefficients(group, sizes_t)
    else:
        gamma = torch.ones(G, dtype=dtype, device=group.device)
    coefficients = (beta * kl_weight) * gamma
    floored = group
    if free_bits > 0:
        below = group.detach().mean(0) < free_bits
        floored = torch.where(below, torch.full_like(group, free_bits), group)
    bound = reconstruction - (floored * coefficients).sum(1)
    kl = group.sum(1)
    elbo = reconstruction - kl
    bits_per_dim = None
    if x is not None:
        D = math.prod(x.shape[1:])
        bits_per_dim = _reduce(-elbo / (D * math.log(2)), reduction)
    return HierarchicalTerms(_reduce(bound, reduction), _reduce(elbo, reduction), _reduce(reconstruction, reduction),
                             _reduce(kl, reduction), _reduce(group, reduction), coefficients, bits_per_dim)
