"""Plain-PyTorch formulas that several oracles share: ``softplus`` without
torch's cut-off (the likelihoods' oracles: the Gaussian's softplus variance,
the Bernoulli and count likelihoods, the discretized logistic mixture) and
``sum_to``, which sums a gradient over the samples x was broadcast over (the
Gaussian and Bernoulli likelihoods' dx and shared variance).

The base layer (docs/architecture.md, "Layers"): it imports nothing of
fastvae, so the reference backend (fastvae/reference.py, which re-exports
these names for its formulas and the tests) and the op descriptions' oracles
(fastvae/ops/<op>/__init__.py) take the one formula from here.
"""
from __future__ import annotations

import torch
from torch import Tensor


def softplus(r: Tensor) -> Tensor:
    """log(1 + e^r) without overflow or the cut-off torch's softplus applies at r > 20."""
    return torch.logaddexp(torch.zeros_like(r), r)


def sum_to(t: Tensor, shape) -> Tensor:
    """Sum a broadcast gradient back to an operand's shape."""
    while t.dim() > len(shape):
        t = t.sum(0)
    return t
