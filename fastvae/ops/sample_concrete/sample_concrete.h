// sample_concrete's C++ kernels (sample_concrete.cpp), for its binding
// (bind.cpp). As in csrc/ops.h, the callers have checked every extent; these
// trust them.
#pragma once

#include <cstdint>

namespace fastvae {

// sample_concrete: logits (N, L, C); temperature (N, L); z (K, N, L, C);
// log_q (K, N) or null. z[k, n, l, c] uses the uniform at offset0 + k * sample_stride
// + n * row_stride + l * C + c (training: 0, N * L * C, L * C). log_p (L, C) a
// prior log-pmf and kl (N,), both or neither: kl[n] <- sum_l sum_c pi_c (log pi_c -
// log p_c), pi = softmax(logits[n, l]) (no noise: one value per row whatever K).
template <typename T>
void sample_concrete_forward(const T* logits, const T* temperature, uint64_t seed, bool hard, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L, int64_t C,
                             T* z, T* log_q, const T* log_p, T* kl, int n_threads);

// dz (K, N, L, C) and dlog_q (K, N) may be null (no gradient); dlogits (N, L, C).
// dkl (N,) with log_p (L, C): the analytic KL's gradient added (both or neither).
// z_saved (K, N, L, C): the forward's relaxed z (hard=false), read in place of
// regenerating the noise where the stop-score term is not asked; may be null.
template <typename T>
void sample_concrete_backward(const T* dz, const T* dlog_q, const T* logits, const T* temperature, uint64_t seed,
                              bool stop_score, int64_t K, int64_t N, int64_t L, int64_t C, T* dlogits,
                              const T* dkl, const T* log_p, int n_threads, const T* z_saved = nullptr);

}  // namespace fastvae
