// Raw-pointer kernels of sample_normal_tril (sample_normal_tril.cpp), for its
// binding (bind.cpp). As in csrc/ops.h, the callers have checked every extent;
// these trust them.
#pragma once

#include <cstdint>

namespace fastvae {

// sample_normal_tril: mu (N, L), S (N, L, L) of which only the lower triangle
// is read; z (K, N, L) with z[k, n, :] = mu[n] + tril(S[n]) @ eps, eps[k, n, l]
// = randn(seed, k * N * L + n * L + l); kl (N,).
template <typename T>
void sample_normal_tril_forward(const T* mu, const T* S, uint64_t seed, int64_t K, int64_t N,
                                int64_t L, T* z, T* kl, int n_threads);

// dz: (K, N, L); dkl: (N,); dmu (N, L); dS (N, L, L), written whole (0 above the diagonal).
template <typename T>
void sample_normal_tril_backward(const T* dz, const T* dkl, const T* mu, const T* S,
                                 uint64_t seed, int64_t K, int64_t N, int64_t L, T* dmu, T* dS,
                                 int n_threads);

}  // namespace fastvae
