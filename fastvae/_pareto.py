"""The Pareto k̂ diagnostic of importance weights (Vehtari, Simpson, Gelman,
Yao & Gabry, "Pareto smoothed importance sampling", JMLR 25, 2024), computed
from the largest log-weights streamed through the evaluation's chunks.

The M = ceil(min(K / 5, 3 √K)) largest weights of K (the paper's tail size,
with r_eff = 1 for independent draws) are fitted with a generalized Pareto
distribution above the next largest one, the threshold, by the estimator of
Zhang & Stephens (2009) with the paper's weakly informative prior on k (10
pseudo-observations at 0.5), as PSIS implementations do (loo's gpdfit,
ArviZ's _gpdfit). k̂ estimates how many moments the weights have: 1/k̂. Below
0.5 the variance of the weights is finite and the central limit theorem,
hence the delta-method standard error, applies; between 0.5 and 0.7 the
estimate still converges, slowly, and its standard error is unreliable;
above 0.7 (the paper's threshold for the sample sizes used here) the
estimate is not to be trusted.

Streaming needs only the M + 1 largest log-weights of each example so far:
each chunk merges its own with them by one torch.topk on the device, never a
(K, B) tensor.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# the paper's threshold: above it the importance-sampling estimate is unreliable
HIGH_K = 0.7
# fewer tail points than this and the fit says nothing (ArviZ returns inf; here NaN)
MIN_TAIL = 5
_PRIOR_BS, _PRIOR_K = 3.0, 10.0  # Zhang & Stephens' b grid scale; the prior's pseudo-observations


def tail_size(k: int) -> int:
    """M, the number of largest weights the generalized Pareto fit uses."""
    return math.ceil(min(0.2 * k, 3.0 * math.sqrt(k)))


def merge_tail(tail: Tensor | None, lw: Tensor, keep: int) -> Tensor:
    """The ``keep`` largest values over the leading dimension of tail (m, n)
    and lw (K_c, n) together, largest first (fewer while fewer were seen)."""
    both = lw if tail is None else torch.cat([tail, lw.to(tail.dtype)])
    return torch.topk(both, min(keep, both.shape[0]), dim=0, sorted=True).values


def pad_tail(tail: Tensor, keep: int) -> Tensor:
    """tail (m, n) with -inf rows below it to make ``keep`` rows (a weight of 0
    never enters the tail)."""
    if tail.shape[0] >= keep:
        return tail
    return torch.cat([tail, tail.new_full((keep - tail.shape[0], tail.shape[1]), float("-inf"))])


# Bytes the fit's temporaries may hold at once (two float64 (rows, m_est, M)
# tensors): the evaluation passes its memory budget instead
FIT_BYTES = 2**26


def gpd_fit(x: Tensor, max_bytes: int = FIT_BYTES) -> tuple[Tensor, Tensor]:
    """(k̂, σ̂) per row of x (n, M): exceedances over a threshold, sorted
    ascending, positive. Zhang & Stephens (2009) with the PSIS prior on k;
    NaN for a row whose fit is undefined (e.g. every exceedance 0). The rows
    are fitted in blocks whose temporaries stay within max_bytes (at least
    one row a block)."""
    x = x.double()
    n_rows, M = x.shape
    m_est = 30 + int(math.sqrt(M))
    j = torch.arange(1, m_est + 1, dtype=x.dtype, device=x.device)
    grid = 1.0 - torch.sqrt(m_est / (j - 0.5))
    ks, sigmas = [], []
    rows = max(1, max_bytes // (2 * x.element_size() * m_est * M))  # two (rows, m_est, M) temporaries
    for r0 in range(0, n_rows, rows):
        xr = x[r0:r0 + rows]
        quartile = xr[:, int(M / 4 + 0.5) - 1]
        b = grid / (_PRIOR_BS * quartile[:, None]) + 1.0 / xr[:, -1:]  # (rows, m_est)
        k_b = torch.log1p(-b[:, :, None] * xr[:, None, :]).mean(-1)
        profile = M * (torch.log(-(b / k_b)) - k_b - 1.0)
        profile = torch.where(torch.isnan(profile), float("-inf"), profile)
        # the posterior weight of each b on the grid, 1 / Σ_j exp(L_j - L_i)
        weights = 1.0 / torch.exp(profile[:, None, :] - profile[:, :, None]).sum(-1)
        weights = torch.where(weights >= 10 * torch.finfo(x.dtype).eps, weights, 0.0)
        weights = weights / weights.sum(-1, keepdim=True)
        b_post = (b * weights).sum(-1)
        k = torch.log1p(-b_post[:, None] * xr).mean(-1)
        sigmas.append(-k / b_post)
        ks.append((M * k + _PRIOR_K * 0.5) / (M + _PRIOR_K))
    k, sigma = torch.cat(ks), torch.cat(sigmas)
    bad = ~(torch.isfinite(k) & torch.isfinite(sigma))
    return torch.where(bad, float("nan"), k), torch.where(bad, float("nan"), sigma)


def pareto_k(tail: Tensor, k: int, max_bytes: int = FIT_BYTES) -> Tensor:
    """k̂ per example (n,) from the largest log-weights tail (≥ M + 1, n), largest
    first (merge_tail); NaN when K gives fewer than MIN_TAIL tail points, when
    every weight is 0, or when the tail is flat. max_bytes: as gpd_fit's."""
    M = tail_size(k)
    n = tail.shape[1]
    if M < MIN_TAIL or tail.shape[0] < M + 1 or n == 0:
        return tail.new_full((n,), float("nan"), dtype=torch.float64)
    t = tail[:M + 1].double()
    shift = t[0]
    empty = shift == float("-inf")
    shift = torch.where(empty, 0.0, shift)
    # weights over the threshold (the (M+1)-th largest), relative to the largest
    threshold = torch.exp(t[M] - shift)
    exceed = (torch.exp(t[:M] - shift) - threshold).flip(0).T.clamp_min(0.0)  # (n, M), ascending
    k_hat, _ = gpd_fit(exceed, max_bytes)
    # Weights tied with the threshold (quantized log-weights) are no exceedances:
    # as in ArviZ's psislw, only weights strictly above it enter the fit, which
    # a zero exceedance would otherwise break (a zero quartile: NaN). Such rows
    # are rare, so each is refitted on its own, shorter tail.
    tied = (exceed[:, 0] == 0) & ~empty
    for row in tied.nonzero().flatten().tolist():
        above = exceed[row][exceed[row] > 0]
        k_hat[row] = gpd_fit(above[None])[0][0] if above.numel() >= MIN_TAIL else float("nan")
    return torch.where(empty, float("nan"), k_hat)
