"""The dtype rules every layer shares: what an op accumulates and computes in.

The bottom layer of the front end (docs/architecture.md, "Layers"): it imports
nothing of fastvae, so the reference backend (fastvae/reference.py), the
backend choice (``_backend``, which re-exports these names) and the ops all
take the one rule from here.
"""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The one accumulation rule: reductions and noise run in float32, or
    float64 for float64 inputs (never in half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype an op computes in and writes its bounds, KL terms,
    log-probabilities and log-weights in, whatever mix of dtypes its inputs
    have: float64 when any input is float64, else float32 (half-precision
    inputs never give a half-precision result: bfloat16 steps by 4 nats at a
    bound of -544, where IWAE's weights differ by fractions of a nat)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
