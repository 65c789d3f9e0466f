// Raw-pointer kernels of gaussian_log_prob (cpp backend).
//
// Layout, set up by fastvae/_likelihood_layout.py: the decoder output is
// (K, P, D) and x is (P, D), broadcast over K without a copy. The Gaussian
// variance parameter v (a log-variance, or the softplus pre-activation) is
// either per element (K, P, D), per x row (P, D), or per dimension (D,); the
// last two share one 1/var row across K, so no exp runs per element.
// The result is (K, P). dx, when asked for, sums over K.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "half.h"
#include "ops.h"

namespace fastvae {

// The kernels take var >= delta > 0 to be a normal number of T (fast_log
// reads its exponent bits): both boundaries refuse a delta that is 0,
// subnormal or not finite in T.
template <typename T>
inline bool valid_delta(double delta) {
  return std::isfinite(delta) && T(delta) >= std::numeric_limits<T>::min();
}

enum class VarLayout : int { kElement = 0, kRow = 1, kDim = 2 };

// T: the compute type (x, out, g, dx, a shared v); H: mean's storage type
// and V: v's (T, or for T = float bf16 / fp16 with V = H per element, V = T
// shared), each read and its gradient written in its own dtype.
template <typename T, typename H, typename V>
void gaussian_log_prob_forward(const T* x, const H* mean, const V* v, VarLayout layout,
                               bool softplus, double delta, int64_t K, int64_t P, int64_t D,
                               T* out, int n_threads);

// g: (K, P). dx: (P, D) or null; dmean: (K, P, D); dv: the shape of v, or null.
template <typename T, typename H, typename V>
void gaussian_log_prob_backward(const T* g, const T* x, const H* mean, const V* v,
                                VarLayout layout, bool softplus, double delta, int64_t K,
                                int64_t P, int64_t D, T* dx, H* dmean, V* dv, int n_threads);

}  // namespace fastvae
