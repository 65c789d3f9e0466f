// sample_location_scale's, sample_positive's and sample_concrete's C++
// kernels (sample_family.cpp), for their binding (bind.cpp). As in csrc/ops.h, the
// callers have checked every extent; these trust them.
#pragma once

#include <cstdint>

namespace fastvae {

// sample_location_scale: loc, log_scale (N, L); z (K, N, L); log_q
// (K, N) or null. family: 0 uniform, 1 Laplace, 2 logistic, 3 Gumbel, 4
// Cauchy (LOCATION_SCALE_FAMILIES, fastvae/_families.py); offsets as sample_normal's.
template <typename T>
void sample_location_scale_forward(const T* loc, const T* log_scale, uint64_t seed, int family, uint64_t offset0,
                                   uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L,
                                   T* z, T* log_q, int n_threads);

// dz (K, N, L) and dlog_q (K, N) may be null (no gradient); dloc, dlog_scale (N, L).
template <typename T>
void sample_location_scale_backward(const T* dz, const T* dlog_q, const T* loc, const T* log_scale, uint64_t seed,
                                    int family, bool stop_score, int64_t K, int64_t N, int64_t L, T* dloc,
                                    T* dlog_scale, int n_threads);

// The same draw (K samples at the training layout's offsets) with family_kl's
// closed form of (loc, log_scale) against the prior (prior_loc, prior_log_scale:
// (L,) when prior_shared, else (N, L)) summed over L into kl (N,), in the
// sampler's loops (kl_family: KL_FAMILIES' index, a family with a location).
// of_scale: `log_scale` holds q's scales themselves (a torch object's), whose
// logs the KL takes per tile; the backward then gives the scales' gradients.
template <typename T>
void sample_location_scale_kl_forward(const T* loc, const T* log_scale, const T* prior_loc,
                                      const T* prior_log_scale, bool prior_shared, uint64_t seed, int family,
                                      int kl_family, int64_t K, int64_t N, int64_t L, T* z, T* kl, int n_threads,
                                      bool of_scale = false);

// dloc, dlog_scale (N, L): the sampler's gradients from dz (K, N, L; null: none)
// plus the KL's from grad_kl (N,; null: none); the prior's (N, L, before any
// sum to a shared prior's shape) written where dprior_* are not null.
template <typename T>
void sample_location_scale_kl_backward(const T* dz, const T* grad_kl, const T* loc, const T* log_scale,
                                       const T* prior_loc, const T* prior_log_scale, bool prior_shared,
                                       uint64_t seed, int family, int kl_family, int64_t K, int64_t N, int64_t L,
                                       T* dloc, T* dlog_scale, T* dprior_loc, T* dprior_log_scale, int n_threads,
                                       bool of_scale = false);

// The draw of sample_location_scale_forward with log_q <- log q(z) - log p(z),
// p of the posterior's own family with (L,) parameters shared by the rows:
// prior_a, prior_b its location and scale, or the uniform's low and high. The
// backward takes dlog_q as that ratio's gradient (at the training layout's
// offsets); dprior_a, dprior_b (N, L), both or neither, get the prior's
// gradients per element summed over the K samples (the caller sums the rows).
template <typename T>
void sample_location_scale_ratio_forward(const T* loc, const T* log_scale, const T* prior_a, const T* prior_b,
                                         uint64_t seed, int family, uint64_t offset0, uint64_t sample_stride,
                                         uint64_t row_stride, int64_t K, int64_t N, int64_t L, T* z, T* log_q,
                                         int n_threads);

template <typename T>
void sample_location_scale_ratio_backward(const T* dz, const T* dlog_q, const T* loc, const T* log_scale,
                                          const T* prior_a, const T* prior_b, uint64_t seed, int family,
                                          bool stop_score, int64_t K, int64_t N, int64_t L, T* dloc, T* dlog_scale,
                                          T* dprior_a, T* dprior_b, int n_threads);

// sample_positive: log_p0, log_p1 (N, L); z (K, N, L); log_q (K, N)
// or null. family: 0 exponential, 1 Weibull, 2 Kumaraswamy
// (POSITIVE_FAMILIES, fastvae/_families.py); offsets as sample_normal's.
template <typename T>
void sample_positive_forward(const T* log_p0, const T* log_p1, uint64_t seed, int family, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L, T* z,
                             T* log_q, int n_threads);

// dz (K, N, L) and dlog_q (K, N) may be null (no gradient); dlog_p0, dlog_p1 (N, L).
template <typename T>
void sample_positive_backward(const T* dz, const T* dlog_q, const T* log_p0, const T* log_p1, uint64_t seed,
                              int family, bool stop_score, int64_t K, int64_t N, int64_t L, T* dlog_p0, T* dlog_p1,
                              int n_threads);

// The same draw (K samples at the training layout's offsets) with family_kl's
// closed form against the prior (prior_log_p0, prior_log_p1: (L,) when
// prior_shared, else (N, L)) summed over L into kl (N,), in the sampler's
// loops. kl_family: KL_FAMILIES' index, the exponential's (the log-rates in
// log_p0 and prior_log_p0 alone), the Weibull's (its (log scale, log
// concentration) and the Weibull prior's) or the Kumaraswamy's (its (log a,
// log b) and the Beta prior's (log alpha, log beta)).
// of_scale: must be false (the positive families' parameters are logs).
template <typename T>
void sample_positive_kl_forward(const T* log_p0, const T* log_p1, const T* prior_log_p0, const T* prior_log_p1,
                                bool prior_shared, uint64_t seed, int family, int kl_family, int64_t K, int64_t N,
                                int64_t L, T* z, T* kl, int n_threads, bool of_scale = false);

// dlog_p0, dlog_p1 (N, L): the sampler's gradients from dz (K, N, L; null:
// none) plus the KL's from grad_kl (N,; null: none); the prior's (N, L, before
// any sum to a shared prior's shape; the exponential's second: 0) written
// where dprior_* are not null.
template <typename T>
void sample_positive_kl_backward(const T* dz, const T* grad_kl, const T* log_p0, const T* log_p1,
                                 const T* prior_log_p0, const T* prior_log_p1, bool prior_shared, uint64_t seed,
                                 int family, int kl_family, int64_t K, int64_t N, int64_t L, T* dlog_p0, T* dlog_p1,
                                 T* dprior_log_p0, T* dprior_log_p1, int n_threads, bool of_scale = false);

// The elements each of sample_concrete's elements counts as in the thread rule
// (kMinWorkPerThread): its kernels take about four times a plain elementwise
// kernel's time per element (two logs and an exp, and the moves to and from
// category-major order), so a Gumbel-softmax VAE's (100, 30, 10) call is
// worth a second thread. op.py's _CONCRETE_WORK is the same number.
constexpr int64_t kConcreteWork = 4;

// sample_concrete: logits (N, L, C); temperature (N, L); z (K, N, L, C);
// log_q (K, N) or null. z[k, n, l, c] uses the uniform at offset0 + k * sample_stride
// + n * row_stride + l * C + c (training: 0, N * L * C, L * C). log_p (L, C) a
// prior log-pmf and kl (N,), both or neither: kl[n] <- sum_l sum_c pi_c (log pi_c -
// log p_c), pi = softmax(logits[n, l]) (no noise: one value per row whatever K).
// z_relaxed (K, N, L, C) or null, read when hard: the relaxed sample the
// one-hot z is the argmax of (what the backward differentiates).
template <typename T>
void sample_concrete_forward(const T* logits, const T* temperature, uint64_t seed, bool hard, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L, int64_t C,
                             T* z, T* log_q, const T* log_p, T* kl, int n_threads, T* z_relaxed = nullptr);

// dz (K, N, L, C) and dlog_q (K, N) may be null (no gradient); dlogits (N, L, C).
// dkl (N,) with log_p (L, C): the analytic KL's gradient added (both or neither).
// z_saved (K, N, L, C): the forward's relaxed z (hard=false), read in place of
// regenerating the noise where the stop-score term is not asked; may be null.
template <typename T>
void sample_concrete_backward(const T* dz, const T* dlog_q, const T* logits, const T* temperature, uint64_t seed,
                              bool stop_score, int64_t K, int64_t N, int64_t L, int64_t C, T* dlogits,
                              const T* dkl, const T* log_p, int n_threads, const T* z_saved = nullptr);

}  // namespace fastvae
