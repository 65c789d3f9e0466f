// Raw-pointer kernels of latent_log_ratio: log p(z) - log q(z|x) per sample for
// p = N(0, I) and q = N(mu, diag(exp(logvar))), summed over L. Callers
// (bind.cpp) have checked dtype, contiguity and every extent.
//
// Layout: z (K, N, L), K samples of N rows; mu, logvar (N, L), shared by the K
// samples (read, never broadcast in memory); r (K, N).
#pragma once

#include <cstdint>

namespace fastvae {

// r = 0.5 * sum_l(eps^2 - z^2 + logvar), eps = (z - mu) * exp(-logvar / 2).
template <typename T>
void latent_log_ratio_forward(const T* z, const T* mu, const T* logvar, int64_t K, int64_t N,
                              int64_t L, T* r, int n_threads);

// g: (K, N). dz = g * (eps * exp(-logvar / 2) - z); dmu = -exp(-logvar / 2) *
// sum_k g * eps and dlogvar = sum_k g * (1 - eps^2) / 2 are written when
// dmu and dlogvar are non-null (both null: the "stop the score" mode).
template <typename T>
void latent_log_ratio_backward(const T* g, const T* z, const T* mu, const T* logvar, int64_t K,
                               int64_t N, int64_t L, T* dz, T* dmu, T* dlogvar, int n_threads);

}  // namespace fastvae
