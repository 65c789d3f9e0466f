// kl_normal's C++ kernels (kl_normal.cpp), for its binding (bind.cpp), its
// eager operator (torch_op.cpp) and sample_normal, which sums the same KL rows.
// As in csrc/ops.h, the callers have checked every extent; these trust them.
#pragma once

#include <cstdint>

namespace fastvae {

// mu, logvar and (optional, may be null together) prior_mu, prior_logvar: (N, L); kl: (N,).
template <typename T>
void kl_normal_forward(const T* mu, const T* logvar, const T* prior_mu, const T* prior_logvar,
                       int64_t N, int64_t L, T* kl, int n_threads);

// kl[r] for rows r0 <= r < r1 of (N, L) inputs (shared by sample_normal).
void kl_rows(const float* mu, const float* logvar, const float* prior_mu,
             const float* prior_logvar, int64_t r0, int64_t r1, int64_t L, float* kl);
void kl_rows(const double* mu, const double* logvar, const double* prior_mu,
             const double* prior_logvar, int64_t r0, int64_t r1, int64_t L, double* kl);

// dkl: (N,); the rest (N, L). dprior_* are written only when the prior is given;
// with a prior they may both be null: then only dmu and dlogvar are formed.
template <typename T>
void kl_normal_backward(const T* dkl, const T* mu, const T* logvar, const T* prior_mu,
                        const T* prior_logvar, int64_t N, int64_t L, T* dmu, T* dlogvar,
                        T* dprior_mu, T* dprior_logvar, int n_threads);

}  // namespace fastvae
