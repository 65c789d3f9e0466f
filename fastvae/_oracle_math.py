"""Plain-PyTorch formulas that several oracles share: ``softplus`` without
torch's cut-off (the likelihoods' oracles: the Gaussian's softplus variance,
the Bernoulli and count likelihoods, the discretized logistic mixture).

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
