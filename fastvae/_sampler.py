"""What the samplers' front ends share: z's dtype, the outputs and the noise
offsets of a forward and the samples of a backward. The front end of a family
sampler of two (N, L) parameters (FamilySampler, FamilyKLSampler) is the
sample_family folder's (its op.py).

Element (k, n, l) of a draw takes the noise at offset0 + k * sample_stride +
n * row_stride + l (the training layout: offset0 = 0, sample_stride = N * L,
row_stride = L); docs/architecture.md, "The RNG contract".
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend

MAX_OFFSET = 2**63 - 1  # Philox offsets are int64 in the Triton kernels

_AUTOCAST_DEVICES = ("cpu", "cuda")


def z_dtype(mu: Tensor, logvar: Tensor) -> torch.dtype:
    """z's dtype. z is an activation the decoder consumes, and also the point
    where a prior's log p(z) is evaluated:
    - under torch.autocast (on mu's device type), the compute dtype (float32):
      the decoder's autocast matmuls round z to half precision themselves (a
      copy of K x B x L, small beside the decoder output), while a prior's
      log p(z) and log q(z) see the same unrounded z as the KL and the
      sampler's log-ratio, so the bound is the float32 bound of the rounded
      encoder and decoder outputs;
    - otherwise the encoder's dtype (mu's and logvar's, promoted): a model
      cast to half precision takes z as it is (its matmuls refuse float32)."""
    # (meta tensors have no autocast state to ask about)
    if mu.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(mu.device.type):
        return _backend.compute_dtype(mu, logvar)
    return mu.dtype if mu.dtype == logvar.dtype else torch.promote_types(mu.dtype, logvar.dtype)


def empty_z(backend: str, shape, like: Tensor, dtype: torch.dtype, z_type: torch.dtype) -> Tensor:
    """z of ``shape`` for a forward kernel: the C++ kernels write it in their
    compute type ``dtype`` and the caller casts it to ``z_type`` after
    (in_dtype; z is encoder-sized), the others in ``z_type`` directly."""
    return _backend.empty_output(shape, like=like, dtype=dtype if backend == "cpp" else z_type)


def check_offsets(offset0: int, sample_stride: int, row_stride: int, last: int) -> None:
    """A ValueError unless the strides are >= 0 and the noise offsets of a draw,
    offset0 to ``last``, lie in [0, 2**63 - 1]."""
    if min(offset0, sample_stride, row_stride) < 0 or last > MAX_OFFSET:
        raise ValueError(f"the noise offsets run from {offset0} to {last}: they must lie in [0, 2**63 - 1]")


def gradient_samples(grad_z: Tensor | None, grad_log_q: Tensor | None) -> int:
    """K of a backward: from whichever per-sample gradient is given, 0 with neither."""
    samples = grad_z if grad_z is not None else grad_log_q
    return 0 if samples is None else samples.shape[0]
