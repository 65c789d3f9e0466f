"""The noise stream: element offset i is lane i % 4 of Box-Muller on Philox
counter i // 4 (tl.randn4x's four normals), on every backend.

fastvae/_philox.py emulates Philox with int64 tensor arithmetic (the reference's
normals are drawn from it); the cpp and triton
uniforms must equal it bit for bit, and the normals agree to float32 rounding.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvae
from fastvae import _philox, reference

from conftest import INTERPRET
from helpers import seed_tensor

seeds = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63 - 1]))
# offsets past 2**32 exercise the high counter word
offsets = st.one_of(st.integers(0, 2**40), st.sampled_from([0, 2**32 - 5, 2**32, 2**35 + 3]))


def fill(seed, offset0, n, dtype=torch.float32):
    """(u1, u2, eps) from the backend under test (cpp in the main process, triton in the interpreter one)."""
    u1, u2 = torch.empty(n), torch.empty(n)
    eps = torch.empty(n, dtype=dtype)
    if INTERPRET:
        from fastvae.kernels import philox

        s = seed_tensor(seed, "cpu")
        philox.uniform_fill(s, offset0, u1, u2)
        philox.randn_fill(s, offset0, eps)
    else:
        from fastvae import _C

        _C.uniform_fill(seed, offset0, u1.numpy(), u2.numpy())
        _C.randn_fill(seed, offset0, eps.numpy())
    return u1, u2, eps


@given(seed=seeds, offset0=offsets, n=st.integers(1, 3000))
def test_uniforms_bit_exact_and_normals_close(seed, offset0, n):
    u1, u2, eps = fill(seed, offset0, n)
    r1, r2 = reference.philox_uniform(seed, torch.arange(offset0, offset0 + n))
    assert torch.equal(u1, r1) and torch.equal(u2, r2)
    assert ((u1 >= 0) & (u1 < 1)).all()
    ref = reference.philox_randn(seed, torch.arange(offset0, offset0 + n), torch.float32).double()
    # float32 log/cos of a few ulp; r <= 5.7 bounds the absolute error near zeros of cos
    assert (eps.double() - ref).abs().max().item() <= 1e-6 * (1 + ref.abs().max().item())
    assert ((eps.double() - ref).abs() <= 2e-6 * ref.abs() + 1e-6).all()


@given(seed=seeds, offset0=offsets)
def test_float64_normals_match_reference(seed, offset0):
    _, _, eps = fill(seed, offset0, 513, torch.float64)
    ref = reference.philox_randn(seed, torch.arange(offset0, offset0 + 513))
    assert torch.allclose(eps, ref, rtol=1e-13, atol=1e-13)


# Random123's known-answer test: Philox4x32-10, key (0, 0), counter (0, 0, 0, 0)
KAT_WORDS = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


def test_known_values():
    """Pinned values of the stream, so a change to it is caught even if every backend changes."""
    words = _philox.philox_words(0, torch.tensor([0]))
    assert tuple(int(w[0]) for w in words) == KAT_WORDS
    r0, r1 = reference.philox_bits(0, torch.tensor([0, 1, 2, 3, 4, 2**34]))
    assert [int(v) for v in r0[:4]] == [KAT_WORDS[0]] * 2 + [KAT_WORDS[2]] * 2
    assert [int(v) for v in r1[:4]] == [KAT_WORDS[1]] * 2 + [KAT_WORDS[3]] * 2
    assert len({int(v) for v in r0[3:]}) == 3  # counters 0, 1 and 2**32 differ


def test_known_normals_of_the_four_lanes():
    """The mapping's known answer: the four normals of counter 0 (seed 0) are
    Box-Muller on the Random123 words, written out here independently of the
    reference (float32 uniforms of Triton's uint_to_uniform_float, u1 >= 1e-7)."""
    def uniform(word):
        x = np.array([word], dtype=np.uint32).view(np.int32)[0]
        x = ~x if x < 0 else x
        return float(np.float32(x) * np.float32(4.6566127342e-10))

    expected = []
    for a, b in (KAT_WORDS[:2], KAT_WORDS[2:]):
        r = math.sqrt(-2.0 * math.log(max(uniform(a), 1e-7)))
        expected += [r * math.cos(2 * math.pi * uniform(b)), r * math.sin(2 * math.pi * uniform(b))]
    got = reference.philox_randn(0, torch.arange(4), torch.float32).double()
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=0)
    # pinned, as computed by the lines above on 2026-11-22
    pinned = torch.tensor([0.0465515, 0.6699951, 0.2741978, -1.0954264], dtype=torch.float64)
    assert torch.allclose(got, pinned, rtol=0, atol=1e-7)
    # and every backend draws them
    _, _, eps = fill(0, 0, 4)
    assert torch.allclose(eps.double(), got, rtol=2e-6, atol=1e-6)


@pytest.mark.skipif(not INTERPRET, reason="checks Triton's own tl.randn4x: runs in the interpreter process")
def test_triton_stream_is_tl_randn4x():
    """The contract's documented equivalent: lane j of counter c is tl.randn4x(seed, c)[j]
    (to float32 rounding: tl.randn4x rounds theta = 2 pi u to float32 before cos and sin)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(seed_ptr, out_ptr, c0, BLOCK: tl.constexpr):
        c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        n0, n1, n2, n3 = tl.randn4x(tl.load(seed_ptr), c0 + c)
        tl.store(out_ptr + 4 * c, n0)
        tl.store(out_ptr + 4 * c + 1, n1)
        tl.store(out_ptr + 4 * c + 2, n2)
        tl.store(out_ptr + 4 * c + 3, n3)

    counters, c0, seed = 1024, 2**31 + 3, 987654321
    expected = torch.empty(4 * counters)
    kernel[(2,)](seed_tensor(seed, "cpu"), expected, c0, BLOCK=counters // 2)
    _, _, eps = fill(seed, 4 * c0, 4 * counters)
    assert torch.allclose(eps, expected, rtol=2e-6, atol=3e-6)


# -- the strided fill: out[r, c] = randn(seed, offset0 + r * row_stride + c) ------


def fill_strided(seed, offset0, out, row_stride):
    """The backend under test's 2-d fill (cpp here, with 2 threads; triton in the interpreter process)."""
    if INTERPRET:
        from fastvae.kernels import philox

        philox.randn_fill(seed_tensor(seed, "cpu"), offset0, out, row_stride)
    else:
        from fastvae import _C

        _C.randn_fill(seed, offset0, out.numpy(), row_stride, 2)
    return out


@given(seed=seeds, offset0=offsets, rows=st.integers(1, 6), cols=st.integers(1, 1100),
       stride=st.one_of(st.integers(0, 5000), st.just(2**33 + 1)), f64=st.booleans())
def test_strided_fill_matches_reference(seed, offset0, rows, cols, stride, f64):
    """Rows of any stride (overlapping, gapped, past 2**32) against the reference at the same offsets."""
    dtype = torch.float64 if f64 else torch.float32
    out = fill_strided(seed, offset0, torch.full((rows, cols), float("nan"), dtype=dtype), stride)
    expected = torch.empty(rows, cols, dtype=torch.float64)
    reference.randn_fill(seed, offset0, expected, stride)
    offs = offset0 + torch.arange(rows)[:, None] * stride + torch.arange(cols)
    assert torch.equal(expected, reference.philox_randn(seed, offs))
    assert not out.isnan().any()
    if not f64:
        expected = reference.philox_randn(seed, offs, torch.float32).double()
    if f64:
        assert torch.allclose(out, expected, rtol=1e-13, atol=1e-13)
    else:
        assert ((out.double() - expected).abs() <= 2e-6 * expected.abs() + 1e-6).all()


@given(seed=seeds, offset0=st.integers(0, 2**40), rows=st.integers(1, 5), cols=st.integers(1, 700))
def test_contiguous_strided_fill_is_the_1d_fill(seed, offset0, rows, cols):
    """row_stride = cols (also the default) reads the 1-d stream: bit for bit, same backend."""
    flat = fill(seed, offset0, rows * cols)[2]
    block = fill_strided(seed, offset0, torch.empty(rows, cols), cols)
    assert torch.equal(block.flatten(), flat)
    default = fill_strided(seed, offset0, torch.empty(rows, cols), None)
    assert torch.equal(default, block)


@pytest.mark.skipif(INTERPRET, reason="checks the C++ binding")
def test_cpp_fill_threads_and_bounds():
    from fastvae import _C

    one, many = torch.empty(37, 1500), torch.empty(37, 1500)
    _C.randn_fill(5, 3, one.numpy(), 4000, 1)
    _C.randn_fill(5, 3, many.numpy(), 4000, 2)
    assert torch.equal(one, many)
    with pytest.raises(ValueError, match="2-d out only"):
        _C.randn_fill(5, 0, torch.empty(4).numpy(), 4)
    with pytest.raises(ValueError, match="row_stride must be >= 0"):
        _C.randn_fill(5, 0, torch.empty(2, 4).numpy(), -1)
    with pytest.raises(ValueError, match="exceeds 2\\*\\*63 - 1"):
        _C.randn_fill(5, 2**63 - 7, torch.empty(2, 4).numpy(), 4)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.randn_fill(5, 0, torch.empty(4, 2).t().numpy(), 4)
    with pytest.raises(ValueError, match="1-d .* or 2-d"):
        _C.randn_fill(5, 0, torch.empty(2, 2, 2).numpy())
    with pytest.raises(TypeError, match="float32 and float64"):
        _C.randn_fill(5, 0, torch.empty(2, 4, dtype=torch.float16).numpy())
    with pytest.raises(ValueError, match="n_threads"):
        _C.randn_fill(5, 0, torch.empty(2, 4).numpy(), None, 0)
    # the largest offset that fits is accepted, and is the reference's value there
    out = torch.empty(1, 1, dtype=torch.float64)
    _C.randn_fill(5, 2**63 - 1, out.numpy(), 0)
    assert torch.allclose(out[0], reference.philox_randn(5, torch.tensor([2**63 - 1])), rtol=1e-13, atol=0)


# -- each vector path of the C++ noise, forced in turn -------------------------

NOISE_ISAS = ("portable", "avx2", "avx512")
# (seed, offset0, n): an unaligned head and a tail around whole groups of 128,
# one short group, a run past counter 2**32 and the largest seeds
NOISE_CASES = [(0, 0, 4 * 32 * 5), (12345, 3, 1031), (2**63 - 1, 4 * (2**32 - 40) + 1, 700), (2**32, 6, 90),
               (987654321, 2**40 + 2, 4099)]


@pytest.fixture(params=NOISE_ISAS)
def noise_isa(request):
    """Forces the C++ noise path request.param for the test (skipped where this
    CPU cannot run it), then restores the loader's choice."""
    from fastvae import _C

    isa = request.param
    if isa not in _C.noise_isas():
        pytest.skip(f"this CPU cannot run the {isa} noise path (it runs {', '.join(_C.noise_isas())})")
    _C.set_noise_isa(isa)
    try:
        assert _C.noise_isa() == isa
        yield isa
    finally:
        _C.set_noise_isa("auto")


def cpp_noise(seed, offset0, n):
    """(float32, float64) normals of the C++ fill on the path in use."""
    from fastvae import _C

    f32, f64 = torch.empty(n), torch.empty(n, dtype=torch.float64)
    _C.randn_fill(seed, offset0, f32.numpy())
    _C.randn_fill(seed, offset0, f64.numpy())
    return f32, f64


@pytest.mark.skipif(INTERPRET, reason="checks the C++ noise paths")
def test_each_noise_path_draws_the_contract(noise_isa):
    """The path a machine does not pick is tested too: its Philox words equal the
    reference's bit for bit (so its uniforms, a function of the words, do too),
    its float64 normals are the portable path's bit for bit (the same libm
    code), and its float32 normals are the reference's to float32 rounding and
    the portable path's to the few ulp by which FMA contraction moves log and cos."""
    from fastvae import _C

    for seed, offset0, n in NOISE_CASES:
        counters = (offset0 + n + 3) // 4 - offset0 // 4
        words = np.empty((counters, 4), dtype=np.uint32)
        _C.philox_words(seed, offset0 // 4, words)
        expected = torch.stack(_philox.philox_words(seed, torch.arange(counters) + offset0 // 4), 1)
        assert torch.equal(torch.from_numpy(words.astype(np.int64)), expected), (seed, offset0)

        f32, f64 = cpp_noise(seed, offset0, n)
        _C.set_noise_isa("portable")
        try:
            p32, p64 = cpp_noise(seed, offset0, n)
        finally:
            _C.set_noise_isa(noise_isa)
        assert torch.equal(f64, p64)
        offs = torch.arange(offset0, offset0 + n)
        ref = reference.philox_randn(seed, offs, torch.float32).double()
        assert ((f32.double() - ref).abs() <= 2e-6 * ref.abs() + 1e-6).all(), (seed, offset0)
        assert ((f32.double() - p32.double()).abs() <= 2e-6 * p32.double().abs() + 1e-6).all(), (seed, offset0)
        assert torch.allclose(f64, reference.philox_randn(seed, offs), rtol=1e-13, atol=1e-13)


@pytest.mark.skipif(INTERPRET, reason="checks the C++ binding")
def test_noise_isa_binding():
    """The loader picks the best path the CPU runs; unknown and unsupported names are refused by name."""
    from fastvae import _C

    assert _C.noise_isa() == _C.noise_isas()[-1]
    assert _C.noise_isas()[0] == "portable"
    with pytest.raises(ValueError, match="'sse9'"):
        _C.set_noise_isa("sse9")
    missing = [isa for isa in NOISE_ISAS if isa not in _C.noise_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match=f"cannot run the '{isa}' path"):
            _C.set_noise_isa(isa)
    assert _C.noise_isa() == _C.noise_isas()[-1]
    with pytest.raises(ValueError, match="\\(n, 4\\)"):
        _C.philox_words(0, 0, np.empty((3, 2), dtype=np.uint32))
    with pytest.raises(TypeError, match="uint32"):
        _C.philox_words(0, 0, np.empty((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="exceeds 2\\*\\*63 - 1"):
        _C.philox_words(0, 2**61 - 2, np.empty((3, 4), dtype=np.uint32))


@pytest.mark.skipif(INTERPRET, reason="checks the C++ noise paths")
def test_each_noise_path_draws_the_families_uniforms(noise_isa):
    """The location-scale and positive families take their words from the same
    vector paths (csrc/philox.cpp's folded_words): on each path the uniform
    family at loc 0, scale 1 returns the contract's float32 uniforms bit for
    bit, in the training layout (whole groups, an unaligned tail) and in the
    evaluation's (an offset not divisible by 4, a row stride)."""
    from fastvae.ops.sample_family.op import location_scale_at

    uniform = 0  # LOCATION_SCALE_FAMILIES.index("uniform")
    for seed, offset0, rows, cols, row_stride in [(2024, 0, 29, 37, 37), (7, 5, 11, 300, 1000),
                                                  (2**63 - 1, 4 * (2**32 - 40) + 1, 3, 700, 700)]:
        zero = torch.zeros(rows, cols)
        with fastvae.use_backend("cpp"):
            z, _ = location_scale_at(uniform, zero, zero, seed_tensor(seed, "cpu"), 2, offset0=offset0,
                                     sample_stride=rows * row_stride, row_stride=row_stride)
        offsets = (offset0 + torch.arange(2)[:, None, None] * rows * row_stride
                   + torch.arange(rows)[None, :, None] * row_stride + torch.arange(cols))
        u, _ = _philox.open_uniforms(_philox.philox_word(seed, offsets.flatten()), torch.float32)
        assert torch.equal(z.flatten(), u), (noise_isa, seed, offset0)
