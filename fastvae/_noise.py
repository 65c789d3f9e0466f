"""The evaluation noise: the fastvae noise stream read as strided blocks.

Training (``sample_normal``) numbers the noise by the element's index in the
(K, N, L) output, which depends on the batch. Evaluation numbers it by the
example instead, so that a sample does not depend on how K or the batch is cut:

    eps[g, k, l] = randn(seed, g * K * L + k * L + l)

for the example with global index g (its position in the whole evaluation
run), sample k < K and latent dimension l < L. The samples [k0, k1) of the
examples g0 .. g0 + n - 1 are then a (n, (k1 - k0) * L) block whose row r
starts at offset (g0 + r) * K * L + k0 * L: one strided fill
(:func:`randn_fill` with row_stride = K * L), whatever the chunking.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate
from ._backend import accumulation_dtype, backend_for

_MAX_OFFSET = 2**63 - 1  # Triton's offsets are int64


def randn_fill(seed: Tensor, offset0: int, out: Tensor, row_stride: int | None = None) -> Tensor:
    """Fills ``out`` with the noise stream of ``seed`` (a 0-d int64 tensor)
    and returns it: out (n,) gets the normals at offsets offset0 + i, out
    (rows, cols) those at offset0 + r * row_stride + c (row_stride defaults to
    cols, a contiguous run). out must be a contiguous float32 or float64
    tensor; every backend draws the same normals (to float32 rounding)."""
    if not isinstance(out, Tensor) or out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"out must be a float32 or float64 tensor, got {getattr(out, 'dtype', type(out))}")
    if out.dim() not in (1, 2) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous 1-d or 2-d tensor, got shape {tuple(out.shape)}")
    if out.dim() == 1 and row_stride is not None:
        raise ValueError("row_stride applies to a 2-d out only")
    rows, cols = (1, out.shape[0]) if out.dim() == 1 else tuple(out.shape)
    stride = cols if row_stride is None else row_stride
    for name, value in (("offset0", offset0), ("row_stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if rows and cols and offset0 + (rows - 1) * stride + cols - 1 > _MAX_OFFSET:
        raise ValueError("randn_fill: the last Philox offset exceeds 2**63 - 1")
    if rows * cols == 0:
        return out
    _backend.launch(backend_for(out.device), "randn_fill", out.numel(),
                    seed=seed.to(out.device), offset0=offset0, out=out, row_stride=row_stride)
    return out


def evaluation_noise(seed: Tensor, *, first_example: int, n_examples: int, n_samples: int,
                     k0: int, k1: int, latent: int, dtype: torch.dtype, device) -> Tensor:
    """eps of shape (k1 - k0, n_examples, latent): samples [k0, k1) of K =
    n_samples for the examples first_example .. first_example + n_examples - 1,
    in the example-major layout of the module docstring. float64 for float64
    dtype, float32 otherwise (half-precision models cast z themselves)."""
    _validate.positive_int("latent", latent)
    width = (k1 - k0) * latent
    block = torch.empty((n_examples, width), dtype=accumulation_dtype(dtype), device=device)
    randn_fill(seed, (first_example * n_samples + k0) * latent, block, n_samples * latent)
    return block.view(n_examples, k1 - k0, latent).transpose(0, 1)
