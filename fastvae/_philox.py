"""The Philox4x32-10 noise stream in plain PyTorch, as the kernels draw it
(docs/architecture.md, "The RNG contract"): the words of a counter, emulated
with int64 tensor arithmetic so that the oracles draw exactly the kernels'
bits, and the one word per element the samplers of issue 35 map into the open
(0, 1) (``philox_word``, ``open_uniforms``: csrc/philox.h's in C++).

The base layer (docs/architecture.md, "Layers"): it imports nothing of
fastvae, so the reference backend (sample_normal's normals) and the op
descriptions' oracles (the location-scale, positive and relaxed categorical
samplers) take the one emulation from here.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57

HALF_WORD = 2**30  # folded words below it are the uniforms below 1/2
F32_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of a * b for a constant a < 2**32 and b < 2**32.

    b is split in 16-bit halves so every partial product fits in int64.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = ((p_hi << 16) + p_lo) & _MASK32
    return hi, lo


def philox_words(seed: int, counters: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four words of Philox4x32-10 at counter (lo(c), hi(c), 0, 0), key
    (lo(seed), hi(seed)), as uint32 values held in int64 tensors."""
    counters = counters.to(torch.int64)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def folded(bits: Tensor) -> Tensor:
    """The word as int32, negatives folded by ~x: an integer in [0, 2**31)."""
    x = torch.where(bits >= 2**31, bits - 2**32, bits)
    return torch.where(x < 0, ~x, x)


def philox_word(seed: int, offsets: Tensor) -> Tensor:
    """The folded Philox word x in [0, 2**31) of each element offset: lane
    offset % 4 of counter offset // 4 (one uniform per element)."""
    offsets = offsets.to(torch.int64)
    w = philox_words(seed, offsets >> 2)
    lane = offsets & 3
    word = torch.where(lane == 0, w[0], torch.where(lane == 1, w[1], torch.where(lane == 2, w[2], w[3])))
    return folded(word)


def open_uniforms(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(u, v = 1 - u) of folded words x, both in (0, 1) and each computed from
    the integer (x + 1/2) / 2**31 and (2**31 - 1/2 - x) / 2**31, so a tail
    near 1 keeps its bits in v. float64: exact. float32 (the kernels' rounding,
    bit for bit): (float32(x) + 0.5) * 2**-31 in float32 arithmetic, at most
    1 - 2**-24 (float32(x) rounds x near 2**31 up to 2**31)."""
    if dtype == torch.float64:
        return (x.double() + 0.5) * 2.0**-31, (float(2**31) - 0.5 - x.double()) * 2.0**-31
    half = torch.tensor(0.5, dtype=torch.float32)
    scale = torch.tensor(2.0**-31, dtype=torch.float32)
    top = torch.tensor(F32_BELOW_ONE, dtype=torch.float32)
    u = torch.minimum((x.to(torch.float32) + half) * scale, top)
    v = torch.minimum(((2**31 - 1 - x).to(torch.float32) + half) * scale, top)
    return u, v
