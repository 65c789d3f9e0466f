// Raw-pointer kernels of sample_normal_kl (sample_normal_kl.cpp), for its
// binding (bind.cpp). As in csrc/ops.h, the callers have checked every
// extent; these trust them.
#pragma once

#include <cstdint>

namespace fastvae {

// mu, log_scale, prior_mu, prior_log_scale, z: (N, L); kl: (N, L) per element,
// or (N,) row sums when kl_rows. z's element i (flat) uses the noise at offset i.
// logvar: the scales are log-variances, else log standard deviations;
// residual: mu and log_scale are q's offsets from the prior (NVAE).
template <typename T>
void sample_normal_kl_forward(const T* mu, const T* log_scale, const T* prior_mu, const T* prior_log_scale,
                              uint64_t seed, bool logvar, bool residual, int64_t N, int64_t L, T* z, T* kl,
                              bool kl_rows, int n_threads);

// dz: (N, L) or null; dkl: (N, L), (N,) when dkl_rows, or null; the rest (N, L).
template <typename T>
void sample_normal_kl_backward(const T* dz, const T* dkl, bool dkl_rows, const T* mu, const T* log_scale,
                               const T* prior_mu, const T* prior_log_scale, uint64_t seed, bool logvar,
                               bool residual, int64_t N, int64_t L, T* dmu, T* dlog_scale, T* dprior_mu,
                               T* dprior_log_scale, int n_threads);

}  // namespace fastvae
