"""The ``reference`` backend's own functions: the noise stream's fills
(``randn_fill``, ``uniform_fill``, the registry's only kernels that no op
owns), and the Philox stream that the tests read.

Every op's plain-PyTorch formulas, its oracle, live in its folder's
description (fastvae/ops/<op>/__init__.py), which the reference backend runs
(``_backend.kernel_function``). The Philox stream is emulated with int64
tensor arithmetic (fastvae/_philox.py) so that the reference draws exactly the
noise the kernels draw (see the RNG contract in docs/architecture.md): the
float32 uniforms are bit-exact, and the Box-Muller transform is then
evaluated in float64.
"""
from __future__ import annotations

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

