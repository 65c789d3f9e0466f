// Counter-based Philox4x32-10 and the Box-Muller transform, written to reproduce
// Triton's tl.randn stream (triton/language/random.py) bit for bit up to the
// final log/cos, plus branch-free float32 exp/log/cos that GCC vectorizes.
//
// Everything here is header-only and `inline` so that the target_clones
// functions in the .cpp files inline it into each of their ISA versions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// exp(x) in float32 (Cephes expf, about 1 ulp). Branch-free so loops over it
// vectorize; inf for x > 88.72, 0 below -87.3 (where the true value is a
// subnormal under 1.2e-38), NaN stays NaN. The clamp comes first because
// converting NaN or out-of-range floats to int is undefined behaviour.
inline float fast_exp(float x) {
  float xc = x > -87.5f ? x : -87.5f;  // NaN -> -87.5
  xc = xc < 88.5f ? xc : 88.5f;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  // 2^n with n in [-126, 127]: build the exponent field directly; split in
  // two factors so n = 128 (x near 88.7) does not overflow the field.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t h = ni >> 1;
  const float s1 = bits_float(static_cast<uint32_t>(h + 127) << 23);
  const float s2 = bits_float(static_cast<uint32_t>(ni - h + 127) << 23);
  float y = p * s1 * s2;
  y = x > 88.72283f ? INFINITY : y;
  y = x < -87.33654f ? 0.0f : y;
  return x != x ? x : y;
}

// log(u) for finite u > 0 of normal magnitude (Cephes logf, about 1 ulp).
// Only called on uniforms in [1e-7, 1), so no special cases are needed.
inline float fast_log_positive(float u) {
  const uint32_t b = float_bits(u);
  int32_t e = static_cast<int32_t>((b >> 23) & 0xffu) - 127;
  float m = bits_float((b & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;  // [-0.293, 0.414]
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = f * z * p;
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return f + y + fe * 0.693359375f;
}

// cos(x) for finite x in [0, 8192] (Cephes cosf, about 1 ulp). Both
// polynomials are evaluated and selected so the loop stays branch-free; the
// three-part pi/4 keeps the reduced argument accurate near the zeros of cos.
inline float fast_cos_nonneg(float x) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // 4/pi
  j += j & 1;
  const float y = static_cast<float>(j);
  j &= 7;
  const bool flip_j = j > 3;
  j = flip_j ? j - 4 : j;
  const bool negate = flip_j != (j > 1);
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                  y * 3.77489497744594108e-8f;
  const float z = r * r;
  const float c = 1.0f - 0.5f * z +
                  z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                           4.166664568298827e-2f);
  const float s =
      r + r * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  const float v = ((j == 1) | (j == 2)) ? s : c;
  return negate ? -v : v;
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
