"""The Philox4x32-10 noise stream in plain PyTorch, as the kernels draw it
(docs/architecture.md, "The RNG contract"): the words of a counter, emulated
with int64 tensor arithmetic so that the oracles draw exactly the kernels'
bits; the normals of Box-Muller on them (``philox_randn``, and the reference
backend's ``randn_fill`` and ``uniform_fill``, which fastvae.reference
serves); and the one word per element that the other latent families'
samplers map into the open (0, 1) (``philox_word``, ``open_uniforms``: csrc/philox.h's in C++).

The base layer (docs/architecture.md, "Layers"): it imports nothing of
fastvae, so the reference backend (sample_normal's normals) and the op
descriptions' oracles (sample_normal_tril's normals; the location-scale,
positive and relaxed categorical samplers' words) take the one emulation
from here.
"""
from __future__ import annotations

import math

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


_UNIFORM_SCALE = 4.6566127342e-10  # Triton's: INT32_MAX * scale rounds below 1.0
_MIN_U1 = 1.0e-7


def exp1(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(t, log t) of the Exp(1) variate t = -log u of the folded words x, in
    float64 from the `dtype` uniforms: -log u below 1/2, -log1p(-v) above (the
    upper tail keeps its bits). t lies in [-log(1 - 2**-32), 32 log 2] (float64
    uniforms) or [-log1p(-2**-32), 32 log 2] (float32: v >= 2**-32 too). The
    positive families and the Concrete draw from it."""
    u, v = (w.double() for w in open_uniforms(x, dtype))
    t = torch.where(x < HALF_WORD, -torch.log(u), -torch.log1p(-v))
    return t, torch.log(t)


def philox_bits(seed: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """The two Philox words behind the normal at each element offset: words
    (0, 1) of counter offset // 4 for lanes 0 and 1, words (2, 3) for lanes 2
    and 3 (the noise contract, docs/architecture.md)."""
    offsets = offsets.to(torch.int64)
    w0, w1, w2, w3 = philox_words(seed, offsets >> 2)
    second_pair = (offsets & 3) >= 2
    return torch.where(second_pair, w2, w0), torch.where(second_pair, w3, w1)


def uniform_from_bits(bits: Tensor) -> Tensor:
    """Triton's uint_to_uniform_float: int32 view, negatives folded by ~x, scaled (float32)."""
    return folded(bits).to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def uniform64_from_bits(bits: Tensor) -> Tensor:
    """The float64 uniform of a word: (x + 1/2) / 2**31 for its folded x, exact,
    in (0, 1) (so no clamp is needed before the log)."""
    return (folded(bits).double() + 0.5) * 2.0**-31


def philox_uniform(seed: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """The two float32 uniforms in [0, 1) behind the normal at each offset:
    the radius's and the angle's."""
    r0, r1 = philox_bits(seed, offsets)
    return uniform_from_bits(r0), uniform_from_bits(r1)


def philox_randn(seed: int, offsets: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Standard normals of the noise stream at the given flat element offsets.

    Element i is lane i % 4 of Box-Muller on the four words of Philox counter
    i // 4: lanes 0, 1 are r cos(2 pi u), r sin(2 pi u) of words (0, 1), lanes
    2, 3 the same of words (2, 3), with r = sqrt(-2 log u1). For a float32
    dtype the uniforms are Triton's float32 ones (u1 clamped to 1e-7), as
    tl.randn4x draws them; for float64 they are the exact (x + 1/2) / 2**31
    (uniform64_from_bits). The transcendental steps run in float64 here.
    """
    offsets = offsets.to(torch.int64)
    r0, r1 = philox_bits(seed, offsets)
    if dtype == torch.float64:
        u1, u2 = uniform64_from_bits(r0), uniform64_from_bits(r1)
    else:
        u1 = torch.clamp_min(uniform_from_bits(r0), _MIN_U1).double()
        u2 = uniform_from_bits(r1).double()
    theta = 2.0 * math.pi * u2
    sine = (offsets & 1) == 1
    eps = torch.sqrt(-2.0 * torch.log(u1)) * torch.where(sine, torch.sin(theta), torch.cos(theta))
    return eps.to(dtype)


def uniform_fill(seed: int, offset0: int, u1: Tensor, u2: Tensor) -> None:
    """u1, u2 (n,) <- the two float32 uniforms behind the normal at offset0 + i."""
    offsets = offset0 + torch.arange(u1.numel(), dtype=torch.int64, device=u1.device)
    a, b = philox_uniform(seed, offsets)
    u1.copy_(a)
    u2.copy_(b)


def randn_fill(seed: int, offset0: int, out: Tensor, row_stride: int | None = None) -> None:
    """out (n,) <- the normals at offsets offset0 + i; out (rows, cols) <- the
    normals at offset0 + r * row_stride + c (row_stride defaulting to cols)."""
    rows, cols = (1, out.shape[0]) if out.dim() == 1 else out.shape
    stride = cols if row_stride is None else row_stride
    r = torch.arange(rows, dtype=torch.int64, device=out.device)
    c = torch.arange(cols, dtype=torch.int64, device=out.device)
    offsets = offset0 + r[:, None] * stride + c
    out.copy_(philox_randn(seed, offsets, out.dtype).reshape(out.shape))


def sample_noise(seed: int, n_samples: int, shape: torch.Size, dtype, device) -> Tensor:
    """eps of shape (n_samples, *shape): element (k, i) uses offset k * numel + i."""
    numel = math.prod(shape)
    offsets = torch.arange(n_samples * numel, dtype=torch.int64, device=device)
    return philox_randn(seed, offsets, dtype).reshape(n_samples, *shape)
