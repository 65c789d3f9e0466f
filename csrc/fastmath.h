// Branch-free float32 exp/log/log1p/sigmoid (Cephes polynomials, about
// 1 ulp) that GCC vectorizes: libm calls would keep every hot loop scalar.
// Header-only and inline, so each ISA clone (FASTVAE_CLONES) inlines them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "ops.h"

namespace fastvae {

FASTVAE_INLINE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

FASTVAE_INLINE float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// exp(x) in float32 (Cephes expf, about 1 ulp). Branch-free so loops over it
// vectorize; inf for x > 88.72, 0 below -87.3 (where the true value is a
// subnormal under 1.2e-38), NaN stays NaN. The clamp comes first because
// converting NaN or out-of-range floats to int is undefined behaviour.
FASTVAE_INLINE float fast_exp(float x) {
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
  // NaN by its bits, not x != x: GCC folds (float)h != (float)h of a widened
  // _Float16 back into h != h, a libgcc call per element that stopped the
  // float16 loops from vectorizing (gaussian_log_prob ran 5x slower in float16)
  return (float_bits(x) & 0x7fffffffu) > 0x7f800000u ? x : y;
}

// log(u) for finite u > 0 of normal magnitude (Cephes logf, about 1 ulp): the
// Philox uniforms, variances (floored at a normal delta at the boundary), 1 + t
// in log1p. It reads the exponent bits, so 0, subnormals, inf and NaN give
// wrong values; callers that can see them (logmeanexp's sums) select around it.
FASTVAE_INLINE float fast_log_positive(float u) {
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

// log(x) for any float x, with log's values at the edges: 0 gives -inf, inf
// gives inf, a negative x or NaN gives NaN; subnormals are scaled into the
// normal range first (fast_log_positive reads the exponent bits). For a torch
// distribution's scale read as it is by a kernel that works in log-scales.
FASTVAE_INLINE float fast_log_of_scale(float x) {
  const bool tiny = x < 1.17549435e-38f;  // below FLT_MIN: times 2^23, less 23 log 2
  float y = fast_log_positive(tiny ? x * 8388608.0f : x) - (tiny ? 15.9423851528787f : 0.0f);
  y = x == 0.0f ? -INFINITY : y;
  y = x == INFINITY ? INFINITY : y;
  return x >= 0.0f ? y : NAN;
}

// log(1 + t) for t in [0, 1]: log of u = 1 + t plus the rounding of u,
// log(1 + t) = log(u) + log(1 + (t - du)/u) ~ log(u) + (t - du)/u, du = u - 1
// exact. 1/u is replaced by 2 - u: off by t^2/u, times |t - du| <= 2^-24, which
// is below float rounding for every t. No division and no branch, and tiny t
// (u == 1) give t exactly.
FASTVAE_INLINE float fast_log1p_unit(float t) {
  const float u = 1.0f + t;
  const float du = u - 1.0f;
  return fast_log_positive(u) + (t - du) * (2.0f - u);
}

// softplus(l) = log(1 + e^l) = max(l, 0) + log1p(e^-|l|), exact for |l| large.
FASTVAE_INLINE float fast_softplus(float l) {
  const float a = std::fabs(l);
  return (l > 0.0f ? l : 0.0f) + fast_log1p_unit(fast_exp(-a));
}

// sigmoid(l) from e^-|l|, so neither branch overflows.
FASTVAE_INLINE float fast_sigmoid(float l) {
  const float e = fast_exp(-std::fabs(l));
  const float r = 1.0f / (1.0f + e);
  return l >= 0.0f ? r : e * r;
}

// The overloads the kernels' templates call: the fast float versions above,
// libm for double (the float64 path is the precise one). always_inline so
// they are compiled into each ISA clone of the calling loop.
FASTVAE_INLINE float exp_t(float x) { return fast_exp(x); }
FASTVAE_INLINE double exp_t(double x) { return std::exp(x); }
FASTVAE_INLINE float softplus_t(float x) { return fast_softplus(x); }
FASTVAE_INLINE double softplus_t(double l) {
  return (l > 0.0 ? l : 0.0) + std::log1p(std::exp(-std::fabs(l)));
}
FASTVAE_INLINE float sigmoid_t(float x) { return fast_sigmoid(x); }
FASTVAE_INLINE double sigmoid_t(double l) {
  const double e = std::exp(-std::fabs(l));
  return l >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

}  // namespace fastvae
