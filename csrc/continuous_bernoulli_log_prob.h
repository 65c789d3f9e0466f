// Raw-pointer kernels of continuous_bernoulli_log_prob (cpp backend), in the
// layout of the other likelihoods (likelihood.h): logits (K, P, D), x (P, D)
// broadcast over K without a copy, out and grad_out (K, P), dx (P, D) or null,
// summed over K. Callers (continuous_bernoulli_log_prob_bind.cpp) have checked
// dtype, contiguity and every extent.
#pragma once

#include <cstdint>

#include "half.h"

namespace fastvae {

// T: the compute type (x, out, g, dx); H: the logits' storage type, T or, for
// T = float, bf16 / fp16, read and written in its own dtype.
template <typename T, typename H>
void continuous_bernoulli_log_prob_forward(const T* x, const H* logits, int64_t K, int64_t P,
                                           int64_t D, T* out, int n_threads);

template <typename T, typename H>
void continuous_bernoulli_log_prob_backward(const T* g, const T* x, const H* logits, int64_t K,
                                            int64_t P, int64_t D, T* dx, H* dlogits,
                                            int n_threads);

}  // namespace fastvae
