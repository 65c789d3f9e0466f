"""What the scvi-tools and pythae adapters share: each example's noise keyed
by (example, sample), and the evaluation call with its warnings re-raised at
the caller's line."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._noise import evaluation_noise
from .._op import draw_seed
from ..evaluation import LogLikelihoodStats, importance_log_likelihood


class RowNoise:
    """Standard normal noise for sample s of example i, a function of the
    call's seed, i, s and the latent index alone (the Philox layout of
    fastvae.log_likelihood): the estimate does not depend on how fastvae
    chunks the samples or splits the examples (memory budget,
    target_stderr), to float rounding.

    fastvae draws a chunk's samples for all its rows alike, and each row's
    samples in increasing order, so a count of the samples each row has drawn
    gives the chunk's first sample."""

    def __init__(self, n_rows: int, k: int, latent: int, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator | None):
        self.seed = draw_seed(device, generator)
        self.k, self.latent, self.dtype, self.device = k, latent, dtype, device
        self.drawn = [0] * n_rows

    def __call__(self, rows: Tensor, n: int) -> Tensor:
        """eps (n, len(rows), latent) for the next n samples of ``rows``."""
        rows_list = rows.tolist()
        c0 = self.drawn[rows_list[0]]
        if any(self.drawn[r] != c0 for r in rows_list):
            raise RuntimeError("the rows of a chunk are at different samples: the noise layout assumes they are not")
        parts, start = [], 0
        for i in range(1, len(rows_list) + 1):  # runs of consecutive rows: one draw each
            if i == len(rows_list) or rows_list[i] != rows_list[i - 1] + 1:
                parts.append(evaluation_noise(self.seed, first_example=rows_list[start], n_examples=i - start,
                                              n_samples=self.k, k0=c0, k1=c0 + n, latent=self.latent,
                                              dtype=self.dtype, device=self.device))
                start = i
        for r in rows_list:
            self.drawn[r] = c0 + n
        eps = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return eps.to(self.dtype)


def evaluate(n_rows: int, device: torch.device, index_dtype: torch.dtype, log_weight_fn: Callable,
             **options) -> Tensor | LogLikelihoodStats:
    """fastvae.importance_log_likelihood over the row indices 0..n_rows-1
    (log_weight_fn gets the rows it scores, not the data), its warnings (low
    ESS, k̂, target missed) re-raised at the adapter's caller's line."""
    index = torch.arange(n_rows, device=device, dtype=index_dtype)
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return importance_log_likelihood(index, log_weight_fn, **options)
    finally:
        for w in caught:
            warnings.warn(w.message, stacklevel=3)
