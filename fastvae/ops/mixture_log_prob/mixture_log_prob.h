// Raw-pointer kernels of mixture_log_prob: the log density of a diagonal
// Gaussian mixture, out[n] = log sum_u softmax(logits)_u N(z[n]; means[u],
// diag(exp(logvars[u]))). Callers (bind.cpp) have checked
// dtype, contiguity and every extent.
//
// Layout: z (N, L); means, logvars (U, L), U >= 1; logits (U,) or null (equal
// weights); out, grad_out (N,).
#pragma once

#include <cstdint>

namespace fastvae {

// Streams over the components with a running (max, sumexp) state per row:
// no (N, U) or (N, U, L) intermediate.
template <typename T>
void mixture_log_prob_forward(const T* z, const T* means, const T* logvars, const T* logits,
                              int64_t N, int64_t U, int64_t L, T* out, int n_threads);

// Recomputes each component's term from z and out (w = exp(term - out), 0
// where out is -inf) and writes whichever of dz (N, L), dmeans, dlogvars
// (U, L) and dlogits (U,; only with logits) are non-null. The sums over rows
// are per-thread partial sums reduced in thread order.
template <typename T>
void mixture_log_prob_backward(const T* g, const T* z, const T* means, const T* logvars,
                               const T* logits, const T* out, int64_t N, int64_t U, int64_t L,
                               T* dz, T* dmeans, T* dlogvars, T* dlogits, int n_threads);

}  // namespace fastvae
