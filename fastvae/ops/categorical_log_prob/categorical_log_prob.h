// Raw-pointer kernels of categorical_log_prob (cpp backend): x (P, D) int64
// class indices, each in [0, C) (the binding checks every one), broadcast
// over K without a copy; logits (K, P, D, C), the class dim innermost;
// out and grad_out (K, P); dlogits (K, P, D, C). Callers
// (bind.cpp) have checked dtype, contiguity and every extent.
#pragma once

#include <cstdint>

#include "half.h"

namespace fastvae {

// out[k, p] = sum_d (l[x] - logsumexp_c l), l = logits[k, p, d, :]. T: the
// compute type (out, g); H: the logits' storage type, T or, for T = float,
// bf16 / fp16, read and written in its own dtype.
template <typename T, typename H>
void categorical_log_prob_forward(const int64_t* x, const H* logits, int64_t K, int64_t P,
                                  int64_t D, int64_t C, T* out, int n_threads);

// dlogits = g (onehot(x) - softmax(l)), the log-sum-exp recomputed (nothing
// of size K x P x D is kept from the forward).
template <typename T, typename H>
void categorical_log_prob_backward(const T* g, const int64_t* x, const H* logits, int64_t K,
                                   int64_t P, int64_t D, int64_t C, H* dlogits, int n_threads);

}  // namespace fastvae
