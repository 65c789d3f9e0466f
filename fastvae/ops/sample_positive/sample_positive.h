// sample_positive's C++ kernels (sample_positive.cpp), for its binding
// (bind.cpp). As in csrc/ops.h, the callers have checked every extent; these
// trust them.
#pragma once

#include <cstdint>

namespace fastvae {

// sample_positive: log_p0, log_p1 (N, L); z (K, N, L); log_q (K, N)
// or null. family: 0 exponential, 1 Weibull, 2 Kumaraswamy
// (POSITIVE_FAMILIES, fastvae/_families.py); offsets as sample_normal's.
template <typename T>
void sample_positive_forward(const T* log_p0, const T* log_p1, uint64_t seed, int family, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L, T* z,
                             T* log_q, int n_threads);

// dz (K, N, L) and dlog_q (K, N) may be null (no gradient); dlog_p0, dlog_p1 (N, L).
template <typename T>
void sample_positive_backward(const T* dz, const T* dlog_q, const T* log_p0, const T* log_p1, uint64_t seed,
                              int family, bool stop_score, int64_t K, int64_t N, int64_t L, T* dlog_p0, T* dlog_p1,
                              int n_threads);

}  // namespace fastvae
