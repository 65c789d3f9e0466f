// Raw-pointer kernels of bernoulli_log_prob and continuous_bernoulli_log_prob
// (cpp backend); gaussian_log_prob's, of the same layout, are in its folder
// (fastvae/ops/gaussian_log_prob/gaussian_log_prob.h).
//
// Layout, set up by fastvae/_likelihood_layout.py: the decoder output is
// (K, P, D) and x is (P, D), broadcast over K without a copy.
// The result is (K, P). dx, when asked for, sums over K.
#pragma once

#include <cstdint>

#include "half.h"
#include "ops.h"

namespace fastvae {

// T: the compute type (x, out, g, dx); H: the logits' storage type, T or, for
// T = float, bf16 / fp16 (half.h), read and written in its own dtype.
template <typename T, typename H>
void bernoulli_log_prob_forward(const T* x, const H* logits, int64_t K, int64_t P, int64_t D,
                                T* out, int n_threads);

// g: (K, P). dx: (P, D) or null; dlogits: (K, P, D).
template <typename T, typename H>
void bernoulli_log_prob_backward(const T* g, const T* x, const H* logits, int64_t K, int64_t P,
                                 int64_t D, T* dx, H* dlogits, int n_threads);

// The same layout and arguments as bernoulli_log_prob's.
template <typename T, typename H>
void continuous_bernoulli_log_prob_forward(const T* x, const H* logits, int64_t K, int64_t P,
                                           int64_t D, T* out, int n_threads);
template <typename T, typename H>
void continuous_bernoulli_log_prob_backward(const T* g, const T* x, const H* logits, int64_t K,
                                            int64_t P, int64_t D, T* dx, H* dlogits,
                                            int n_threads);

}  // namespace fastvae
