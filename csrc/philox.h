// Counter-based Philox4x32-10 and the Box-Muller transform, written to reproduce
// Triton's tl.randn stream (triton/language/random.py) bit for bit up to the
// final log/cos (fastmath.h).
//
// Everything here is header-only and `inline` so that the target_clones
// functions in the .cpp files inline it into each of their ISA versions.
#pragma once

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
// Triton multiplies the float32 uniform by the Python float 2*pi, i.e. by this float.
constexpr float kTwoPiF = 6.283185307179586f;
constexpr float kMinU1 = 1.0e-7f;

struct Philox2 {
  uint32_t r0, r1;
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

// Ten rounds of Philox4x32 on counter (lo(offset), hi(offset), 0, 0) and key
// (lo(seed), hi(seed)); returns the first two output words, which are all that
// tl.randn consumes.
//
// The 32-bit state words live in 64-bit lanes and are never masked back to 32
// bits: every multiply reads only the low half of its operand (one vpmuludq,
// no shuffles), XOR is bitwise, and the result takes the low halves, so the
// garbage that collects in the high halves never reaches the output.
inline Philox2 philox_2x(const PhiloxKeys& keys, uint64_t offset) {
  constexpr uint64_t kLow = 0xffffffffull;
  uint64_t c0 = offset & kLow, c1 = offset >> 32, c2 = 0, c3 = 0;
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
  return {static_cast<uint32_t>(c0), static_cast<uint32_t>(c1)};
}

// Triton's uint_to_uniform_float for 32-bit words: reinterpret as int32, fold
// negatives with ~x, scale. Result lies in [0, 1).
inline float uniform_from_bits(uint32_t bits) {
  int32_t x;
  std::memcpy(&x, &bits, sizeof x);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// One standard normal from the Philox words, computed as tl.randn does in
// float32: u1 clamped to 1e-7, theta = float(2*pi) * u2, cosine branch.
inline float randn_from_bits_f32(Philox2 w) {
  const float u0 = uniform_from_bits(w.r0);
  const float u1 = u0 > kMinU1 ? u0 : kMinU1;
  const float u2 = uniform_from_bits(w.r1);
  const float theta = kTwoPiF * u2;
  return std::sqrt(-2.0f * fast_log_positive(u1)) * fast_cos_nonneg(theta);
}

// The same normal with the transcendental steps in float64 (used for float64
// tensors): the uniforms and theta are still the float32 values of the stream.
inline double randn_from_bits_f64(Philox2 w) {
  const float u1 = std::fmax(kMinU1, uniform_from_bits(w.r0));
  const float u2 = uniform_from_bits(w.r1);
  const float theta = kTwoPiF * u2;
  return std::sqrt(-2.0 * std::log(static_cast<double>(u1))) *
         std::cos(static_cast<double>(theta));
}

}  // namespace fastvae
