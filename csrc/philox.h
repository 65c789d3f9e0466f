// Counter-based Philox4x32-10 and the Box-Muller transform of the noise
// contract (docs/architecture.md): element i is lane i % 4 of counter i // 4,
// whose four words are Triton's tl.randint4x and whose float32 normals are
// tl.randn4x's up to the rounding of log, sin and cos.
//
// Everything here is header-only and `inline` so that the target_clones
// functions in the .cpp files inline it into each of their ISA versions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastmath.h"

namespace fastvae {

// Philox constants, as in Triton (and Salmon et al. 2011).
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

// Triton's scale: the largest float with INT32_MAX * scale < 1.0 after rounding.
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kMinU1 = 1.0e-7f;

struct Philox4 {
  uint32_t w0, w1, w2, w3;
};

// The ten round keys of one seed: the same for every element, so they are
// computed once per block instead of once per element.
struct PhiloxKeys {
  uint64_t k0[10], k1[10];
  explicit PhiloxKeys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      k0[round] = a;
      k1[round] = b;
      a += kPhiloxKeyA;
      b += kPhiloxKeyB;
    }
  }
};

// Ten rounds of Philox4x32 on counter (lo(counter), hi(counter), 0, 0) and
// key (lo(seed), hi(seed)): Triton's tl.randint4x.
//
// The 32-bit state words live in 64-bit lanes and are never masked back to 32
// bits: every multiply reads only the low half of its operand (one vpmuludq,
// no shuffles), XOR is bitwise, and the result takes the low halves, so the
// garbage that collects in the high halves never reaches the output.
inline Philox4 philox_4x(const PhiloxKeys& keys, uint64_t counter) {
  constexpr uint64_t kLow = 0xffffffffull;
  uint64_t c0 = counter & kLow, c1 = counter >> 32, c2 = 0, c3 = 0;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = (c0 & kLow) * kPhiloxRoundA;
    const uint64_t p2 = (c2 & kLow) * kPhiloxRoundB;
    const uint64_t n0 = (p2 >> 32) ^ c1 ^ keys.k0[round];
    const uint64_t n2 = (p0 >> 32) ^ c3 ^ keys.k1[round];
    c1 = p2;
    c3 = p0;
    c0 = n0;
    c2 = n2;
  }
  return {static_cast<uint32_t>(c0), static_cast<uint32_t>(c1), static_cast<uint32_t>(c2),
          static_cast<uint32_t>(c3)};
}

// The word as int32 with negatives folded by ~x: an integer in [0, 2**31).
inline int32_t folded(uint32_t bits) {
  int32_t x;
  std::memcpy(&x, &bits, sizeof x);
  return x < 0 ? ~x : x;
}

// The uniforms of the other latent families (design.md's RNG contract) come
// from a folded word x: u < 1/2 exactly when x < kHalfWord.
constexpr int32_t kHalfWord = int32_t(1) << 30;
constexpr float kBelowOne = 0x1.fffffep-1f;  // 1 - 2^-24, the largest float below 1

// (u, v = 1 - u) of a folded word, each from the integer: (x + 1/2) / 2^31 and
// (2^31 - 1/2 - x) / 2^31. float32: in float32 arithmetic, at most 1 - 2^-24
// (the reference and Triton round the same way, bit for bit); float64: exact.
FASTVAE_INLINE void open_uniforms(int32_t x, float& u, float& v) {
  u = std::min((static_cast<float>(x) + 0.5f) * 0x1p-31f, kBelowOne);
  v = std::min((static_cast<float>(2147483647 - x) + 0.5f) * 0x1p-31f, kBelowOne);
}

FASTVAE_INLINE void open_uniforms(int32_t x, double& u, double& v) {
  u = (static_cast<double>(x) + 0.5) * 0x1p-31;
  v = (2147483647.5 - static_cast<double>(x)) * 0x1p-31;
}

// Triton's uint_to_uniform_float for 32-bit words. Result lies in [0, 1).
inline float uniform_from_bits(uint32_t bits) { return static_cast<float>(folded(bits)) * kUniformScale; }

// The float64 uniform of a word, (x + 1/2) / 2**31, exact and in (0, 1).
inline double uniform64_from_bits(uint32_t bits) { return (folded(bits) + 0.5) * 0x1p-31; }

// cos and sin of 2 pi u for u in [0, 1], about 1 ulp. The reduction is in
// turns, where it is exact: t = 4u - round(4u) in [-1/2, 1/2], then the
// Cephes polynomials on x = t pi/2 in [-pi/4, pi/4] and a quarter-turn
// rotation by round(4u) mod 4. Branch-free, so loops over it vectorize.
inline void cos_sin_turns(float u, float& c_out, float& s_out) {
  const float q = std::floor(4.0f * u + 0.5f);
  const float x = (4.0f * u - q) * 1.57079632679489662f;
  const float z = x * x;
  const float c = 1.0f - 0.5f * z +
                  z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                           4.166664568298827e-2f);
  const float s =
      x + x * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  const int32_t k = static_cast<int32_t>(q) & 3;
  const float cc = (k & 1) ? s : c;
  const float ss = (k & 1) ? c : s;
  c_out = (k == 1 || k == 2) ? -cc : cc;
  s_out = k >= 2 ? -ss : ss;
}

// Box-Muller on one pair of words, in float32: r = sqrt(-2 log u1) with u1
// clamped to 1e-7 as tl.randn4x does, then (r cos 2 pi u2, r sin 2 pi u2).
inline void box_muller_f32(uint32_t a, uint32_t b, float& n_cos, float& n_sin) {
  const float u0 = uniform_from_bits(a);
  const float u1 = u0 > kMinU1 ? u0 : kMinU1;
  const float r = std::sqrt(-2.0f * fast_log_positive(u1));
  float c, s;
  cos_sin_turns(uniform_from_bits(b), c, s);
  n_cos = r * c;
  n_sin = r * s;
}

// The same in float64 from the exact float64 uniforms (no clamp needed).
inline void box_muller_f64(uint32_t a, uint32_t b, double& n_cos, double& n_sin) {
  const double r = std::sqrt(-2.0 * std::log(uniform64_from_bits(a)));
  const double theta = 6.283185307179586477 * uniform64_from_bits(b);
  n_cos = r * std::cos(theta);
  n_sin = r * std::sin(theta);
}

// The four normals of one counter, lanes 0..3 (the noise contract).
inline void normals4(const Philox4& w, float& n0, float& n1, float& n2, float& n3) {
  box_muller_f32(w.w0, w.w1, n0, n1);
  box_muller_f32(w.w2, w.w3, n2, n3);
}

inline void normals4(const Philox4& w, double& n0, double& n1, double& n2, double& n3) {
  box_muller_f64(w.w0, w.w1, n0, n1);
  box_muller_f64(w.w2, w.w3, n2, n3);
}

template <typename T>
inline void normals4(const Philox4& w, T* out) { normals4(w, out[0], out[1], out[2], out[3]); }

}  // namespace fastvae
