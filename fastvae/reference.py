"""Plain-PyTorch reference of every fastvae op not yet moved to a folder of its
own (an op folder's oracle is its ``__init__.py``): the test oracle and the
``reference`` backend.

Everything here is written for clarity, not speed, and runs in float64 when
given float64. The Philox stream is emulated with int64 tensor arithmetic
(fastvae/_philox.py) so that the reference draws exactly the noise the
kernels draw (see the RNG contract in docs/architecture.md): the float32
uniforms are bit-exact, and the Box-Muller transform is then evaluated in
float64.

Functions named ``<op>`` are differentiable (plain autograd) and serve as the
oracle for gradients; ``<op>_forward`` / ``<op>_backward`` are the explicit
formulas that the reference backend runs inside the custom ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._dtypes import accumulation_dtype
from ._philox import (  # noqa: F401 (the reference backend's randn_fill and uniform_fill; the tests read the stream here)
    folded,
    philox_bits,
    philox_randn,
    philox_uniform,
    philox_words,
    randn_fill,
    sample_noise,
    uniform64_from_bits,
    uniform_fill,
    uniform_from_bits,
)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return accumulation_dtype(x.dtype)


# --------------------------------------------------------------------------
