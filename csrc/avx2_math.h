// Hand-vectorized AVX2 + FMA (8 float lanes) versions of fast_exp and of the
// Box-Muller transform of philox.h, for the AVX2 noise path.
//
// Bit for bit the functions of fastmath.h / philox.h as GCC compiles them in
// the x86-64-v3 clones: every a * b + c that GCC contracts there is an FMA here
// in the same place, and nothing else is fused (checked over every input word
// and every exp argument by tests/cpp and test_philox's stream comparisons).
// What they save is the work GCC's vectorization of the generic code does:
// fast_exp's clamps and special-case selects run only for a vector that has
// an argument outside (-87, 88) (then the scalar fast_exp, the same bits),
// and Box-Muller's quadrant rotation is integer sign flips instead of selects.
//
// Functions are always_inline with target("avx2,fma"): they compile only into
// callers compiled for x86-64-v3 or above.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTVAE_AVX2_MATH 1

#include <immintrin.h>

#include <cstdint>

#include "fastmath.h"
#include "philox.h"

#define FASTVAE_AVX2_INLINE inline __attribute__((target("avx2,fma"), always_inline))

namespace fastvae::avx2 {

// c[0] x^(N-1) + ... + c[N-1] on 8 lanes by Horner's rule, one FMA a step,
// as GCC contracts fastmath.h's polynomials (its p * x - c is the FMA with
// -c: the same bits).
template <int N>
FASTVAE_AVX2_INLINE __m256 horner8(__m256 x, const float (&c)[N]) {
  __m256 p = _mm256_set1_ps(c[0]);
#pragma GCC unroll 16
  for (int i = 1; i < N; ++i) p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(c[i]));
  return p;
}

// fast_exp on 8 lanes. For x in (-87, 88) (NaN fails both tests) n lies in
// [-125, 127], so p * 2^n is a normal float and equals fast_exp's p * s1 * s2,
// and none of its clamps or selects changes anything: the short path below.
FASTVAE_AVX2_INLINE __m256 exp8(__m256 x) {
  const __m256 in_range = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GT_OQ),
                                        _mm256_cmp_ps(x, _mm256_set1_ps(88.0f), _CMP_LT_OQ));
  if (__builtin_expect(_mm256_movemask_ps(in_range) != 0xff, 0)) {
    alignas(32) float v[8];
    _mm256_store_ps(v, x);
    for (float& e : v) e = fast_exp(e);
    return _mm256_load_ps(v);
  }
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);  // r - n * -2.12194440e-4
  const __m256 r2 = _mm256_mul_ps(r, r);
  static constexpr float kExp[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                   4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  const __m256 p = _mm256_add_ps(_mm256_fmadd_ps(horner8(r, kExp), r2, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// uniform_from_bits on 8 words: the folded int32 (~x for negatives) times the scale.
FASTVAE_AVX2_INLINE __m256 uniform8(__m256i w) {
  const __m256i folded = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(kUniformScale));
}

// fast_log_positive on 8 lanes of normal, positive floats.
FASTVAE_AVX2_INLINE __m256 log8(__m256 u) {
  const __m256i b = _mm256_castps_si256(u);
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(0xff)),
                               _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // + 1 where big (the mask is -1)
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(f, f);
  static constexpr float kLog[] = {7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f,
                                   -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                                   2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f};
  const __m256 p = horner8(f, kLog);
  const __m256 fe = _mm256_cvtepi32_ps(e);
  // y = f z p + fe * -2.12194440e-4: GCC fuses the first product into the add
  __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(f, z), p, _mm256_mul_ps(fe, _mm256_set1_ps(-2.12194440e-4f)));
  y = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.5f), y);
  return _mm256_fmadd_ps(fe, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

// cos_sin_turns on 8 lanes of u in [0, 1].
FASTVAE_AVX2_INLINE void cos_sin8(__m256 u, __m256& c_out, __m256& s_out) {
  const __m256 four_u = _mm256_mul_ps(u, _mm256_set1_ps(4.0f));  // exact
  const __m256 q = _mm256_floor_ps(_mm256_add_ps(four_u, _mm256_set1_ps(0.5f)));
  const __m256 x = _mm256_mul_ps(_mm256_sub_ps(four_u, q), _mm256_set1_ps(1.57079632679489662f));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 pc = _mm256_fmsub_ps(z, _mm256_set1_ps(2.443315711809948e-5f), _mm256_set1_ps(1.388731625493765e-3f));
  pc = _mm256_fmadd_ps(pc, z, _mm256_set1_ps(4.166664568298827e-2f));
  const __m256 c = _mm256_fmadd_ps(_mm256_mul_ps(z, z), pc, _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f)));
  __m256 ps = _mm256_fmadd_ps(z, _mm256_set1_ps(-1.9515295891e-4f), _mm256_set1_ps(8.3321608736e-3f));
  ps = _mm256_fmsub_ps(ps, z, _mm256_set1_ps(1.6666654611e-1f));
  const __m256 s = _mm256_fmadd_ps(_mm256_mul_ps(x, z), ps, x);
  // quadrant k = q mod 4: swap for odd k, negate cos for k = 1, 2 and sin for k = 2, 3
  const __m256i k = _mm256_cvttps_epi32(q);
  const __m256 odd = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(k, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256 cc = _mm256_blendv_ps(c, s, odd);
  const __m256 ss = _mm256_blendv_ps(s, c, odd);
  const __m256i two = _mm256_set1_epi32(2);
  const __m256i flip_c = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(k, _mm256_set1_epi32(1)), two), 30);
  const __m256i flip_s = _mm256_slli_epi32(_mm256_and_si256(k, two), 30);
  c_out = _mm256_xor_ps(cc, _mm256_castsi256_ps(flip_c));
  s_out = _mm256_xor_ps(ss, _mm256_castsi256_ps(flip_s));
}

// box_muller_f32 on 8 pairs of words (a, b).
FASTVAE_AVX2_INLINE void box_muller8(__m256i a, __m256i b, __m256& n_cos, __m256& n_sin) {
  const __m256 u1 = _mm256_max_ps(uniform8(a), _mm256_set1_ps(kMinU1));
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log8(u1)));
  __m256 c, s;
  cos_sin8(uniform8(b), c, s);
  n_cos = _mm256_mul_ps(r, c);
  n_sin = _mm256_mul_ps(r, s);
}

}  // namespace fastvae::avx2

#endif
