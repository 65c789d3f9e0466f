// Raw-pointer kernels of discretized_logistic_mixture_log_prob (PixelCNN++'s
// discretized logistic mixture likelihood). Callers (bind.cpp) have checked
// dtype, contiguity and every extent.
//
// Layout: x (P, C, S) with S = H * W pixels, broadcast over K samples; either
// params (K, P, 10 M, S), PixelCNN++'s packed output with C = 3 (means and
// log_scales null), or params = the mixture logits (K, P, M, S) with means and
// log_scales (K, P, M, C, S). out and g: (K, P); num_bins >= 2.
#pragma once

#include <cstdint>

#include "ops.h"

namespace fastvae {

template <typename T>
void discretized_logistic_mixture_log_prob_forward(const T* x, const T* params, const T* means,
                                                   const T* log_scales, int64_t K, int64_t P, int64_t M,
                                                   int64_t C, int64_t S, int num_bins, T* out, int n_threads);

// Writes every gradient: dparams in params' layout (packed: the logits', the
// means', the log scales' and the raw coefficients' rows), and dmeans,
// dlog_scales (null when packed).
template <typename T>
void discretized_logistic_mixture_log_prob_backward(const T* g, const T* x, const T* params, const T* means,
                                                    const T* log_scales, int64_t K, int64_t P, int64_t M,
                                                    int64_t C, int64_t S, int num_bins, T* dparams, T* dmeans,
                                                    T* dlog_scales, int n_threads);

}  // namespace fastvae
