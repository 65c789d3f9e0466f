// Half-precision storage types the cpp kernels read and write (bfloat16 and
// float16), converted to and from their float32 compute type in registers:
// a decoder output in half precision is read as it is, never copied to
// float32 first (docs/architecture.md, "Mixed precision").
//
// bfloat16 arrives from Python as its uint16 bits (NumPy has no bfloat16;
// fastvae._backend._numpy), float16 as NumPy's float16 (_Float16 here, which
// GCC converts with F16C's vcvtph2ps/vcvtps2ph in the x86-64-v3 and v4
// clones; __fp16 on AArch64). The bfloat16 conversions are integer shifts and adds, which GCC
// vectorizes in every clone.
#pragma once

#include <cstdint>
#include <cstring>

#include "ops.h"

namespace fastvae {

// An enum over uint16_t rather than a struct: a distinct type for overloads
// that is still a scalar, so that GCC vectorizes its loads (a struct member
// load stopped the vectorizer: "no vectype", the bfloat16 gaussian_log_prob
// backward ran 5x slower than its float16 twin).
enum class bf16 : uint16_t {};
#if defined(__aarch64__) && defined(__ARM_FP16_FORMAT_IEEE)
// GCC 12 has no _Float16 in C++ on AArch64 (.ci/cross-arm found it); ARM's
// __fp16 is the same IEEE binary16 storage, converted with fcvt.
using fp16 = __fp16;
#else
using fp16 = _Float16;
#endif

// The value in the compute type: float for float and the half types, double for double.
FASTVAE_INLINE float widen(float v) { return v; }
FASTVAE_INLINE double widen(double v) { return v; }
FASTVAE_INLINE float widen(fp16 v) { return float(v); }
FASTVAE_INLINE float widen(bf16 v) {
  const uint32_t u = uint32_t(static_cast<uint16_t>(v)) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A computed value stored as H, rounded to nearest even (as torch rounds).
template <typename H>
struct Narrow {
  template <typename T>
  static FASTVAE_INLINE H of(T v) { return H(v); }
};
template <>
struct Narrow<bf16> {
  static FASTVAE_INLINE bf16 of(float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    // a NaN stays a (quiet) NaN: rounding could carry its payload into inf
    const uint32_t nan = (u >> 16) | 0x40u;
    return static_cast<bf16>(uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded));
  }
};

template <typename H, typename T>
FASTVAE_INLINE H narrow(T v) { return Narrow<H>::of(v); }

}  // namespace fastvae
