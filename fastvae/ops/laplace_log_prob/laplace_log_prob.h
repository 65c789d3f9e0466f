// Raw-pointer kernels of laplace_log_prob (cpp backend). Callers (bind.cpp)
// have checked dtype, contiguity and every extent.
//
// Layout, set up by fastvae/_likelihood_layout.py (as gaussian_log_prob's):
// the decoder location is (K, P, D) and x is (P, D), broadcast over K without
// a copy. The log-scale s is either per element (K, P, D), per x row (P, D),
// or per dimension (D,); the last two share one 1/b row across K, so no exp
// runs per element. The result is (K, P). dx, when asked for, sums over K.
// T is the compute and storage type (float or double): the front end gives
// half-precision inputs in float32.
#pragma once

#include <cstdint>

namespace fastvae {

enum class ScaleLayout : int { kElement = 0, kRow = 1, kDim = 2 };

template <typename T>
void laplace_log_prob_forward(const T* x, const T* loc, const T* s, ScaleLayout layout, int64_t K,
                              int64_t P, int64_t D, T* out, int n_threads);

// g: (K, P). dx: (P, D) or null; dloc: (K, P, D); ds: the shape of s, or null.
template <typename T>
void laplace_log_prob_backward(const T* g, const T* x, const T* loc, const T* s,
                               ScaleLayout layout, int64_t K, int64_t P, int64_t D, T* dx, T* dloc,
                               T* ds, int n_threads);

}  // namespace fastvae
