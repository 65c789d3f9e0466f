// kl_normal on the CPU: KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar))
// summed over L, with the standard normal prior when no prior is given.
#include <algorithm>
#include <cmath>

#include "fastmath.h"
#include "kl_normal.h"
#include "ops.h"
#include "rows.h"

namespace fastvae {
namespace {

constexpr int64_t kRowsPerTask = 256;
constexpr int64_t kBlock = 512;  // elements per vector block (stack buffers)

// Every loop runs over a flat block of elements, whatever the row length: a
// loop per row of a short row (L = 8 in a digits-size VAE) never fills a
// 16-wide vector and ran 10x slower per element than at L = 80.

// t[i] = the KL term of element i (its row sum, halved, is the row's KL).
template <typename T>
FASTVAE_INLINE void kl_terms(const T* __restrict mu, const T* __restrict lv,
                             const T* __restrict pm, const T* __restrict plv, int64_t n,
                             T* __restrict t) {
  if (pm == nullptr) {
    for (int64_t i = 0; i < n; ++i) t[i] = exp_t(lv[i]) + mu[i] * mu[i] - T(1) - lv[i];
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T d = mu[i] - pm[i];
      t[i] = plv[i] - lv[i] + (exp_t(lv[i]) + d * d) * exp_t(-plv[i]) - T(1);
    }
  }
}

// Row sums accumulate in double: terms span exp(30) = 1e13 down to 1e-7.
template <typename T>
FASTVAE_INLINE void kl_rows_t(const T* mu, const T* lv, const T* pm, const T* plv, int64_t r0,
                              int64_t r1, int64_t L, T* kl) {
  if (L == 0) {
    std::fill(kl + r0, kl + r1, T(0));
    return;
  }
  T t[kBlock];
  RowSums sums(r0, L);
  for (int64_t e0 = r0 * L; e0 < r1 * L; e0 += kBlock) {
    const int64_t n = std::min(kBlock, r1 * L - e0);
    kl_terms(mu + e0, lv + e0, pm ? pm + e0 : nullptr, plv ? plv + e0 : nullptr, n, t);
    sums.feed(t, n, [&](int64_t row, double acc) { kl[row] = static_cast<T>(0.5 * acc); });
  }
}

// One block's gradients, without a prior and with one. The pointers are
// restrict parameters: GCC vectorizes across those, not across local restrict
// pointers (the prior's loop, with four outputs, stayed scalar).
template <typename T>
FASTVAE_INLINE void grad_block(const T* __restrict gs, const T* __restrict m, const T* __restrict v, int64_t n,
                               T* __restrict gm, T* __restrict gv) {
  for (int64_t i = 0; i < n; ++i) {
    gm[i] = gs[i] * m[i];
    gv[i] = T(0.5) * gs[i] * (exp_t(v[i]) - T(1));
  }
}

template <typename T>
FASTVAE_INLINE void grad_block(const T* __restrict gs, const T* __restrict m, const T* __restrict v,
                               const T* __restrict p, const T* __restrict pv, int64_t n, T* __restrict gm,
                               T* __restrict gv, T* __restrict gp, T* __restrict gpv) {
  for (int64_t i = 0; i < n; ++i) {
    const T inv_pvar = exp_t(-pv[i]);
    const T d = m[i] - p[i];
    const T var = exp_t(v[i]);
    gm[i] = gs[i] * d * inv_pvar;
    gp[i] = -gm[i];
    gv[i] = T(0.5) * gs[i] * (var * inv_pvar - T(1));
    gpv[i] = T(0.5) * gs[i] * (T(1) - (var + d * d) * inv_pvar);
  }
}

// A prior whose own gradients are not wanted (a fixed prior): dmu and dlogvar only.
template <typename T>
FASTVAE_INLINE void grad_block(const T* __restrict gs, const T* __restrict m, const T* __restrict v,
                               const T* __restrict p, const T* __restrict pv, int64_t n, T* __restrict gm,
                               T* __restrict gv) {
  for (int64_t i = 0; i < n; ++i) {
    const T inv_pvar = exp_t(-pv[i]);
    const T d = m[i] - p[i];
    const T var = exp_t(v[i]);
    gm[i] = gs[i] * d * inv_pvar;
    gv[i] = T(0.5) * gs[i] * (var * inv_pvar - T(1));
  }
}

// Gradients of rows [r0, r1); g = dkl, spread over each row's elements first
// so that the arithmetic is one flat loop. dpm and dplv null with a prior
// given: the prior's gradients are not formed.
template <typename T>
FASTVAE_INLINE void kl_grad_rows_t(const T* g, const T* mu, const T* lv, const T* pm, const T* plv,
                                   int64_t r0, int64_t r1, int64_t L, T* dmu, T* dlv, T* dpm,
                                   T* dplv) {
  T gs[kBlock];
  for (int64_t e0 = r0 * L; e0 < r1 * L; e0 += kBlock) {
    const int64_t n = std::min(kBlock, r1 * L - e0);
    spread_rows(g, e0, n, L, gs);
    if (pm == nullptr) {
      grad_block(gs, mu + e0, lv + e0, n, dmu + e0, dlv + e0);
    } else if (dpm == nullptr) {
      grad_block(gs, mu + e0, lv + e0, pm + e0, plv + e0, n, dmu + e0, dlv + e0);
    } else {
      grad_block(gs, mu + e0, lv + e0, pm + e0, plv + e0, n, dmu + e0, dlv + e0, dpm + e0, dplv + e0);
    }
  }
}

// float runs in the ISA clones; double is the precise (libm) path.
FASTVAE_CLONES void kl_rows_f32(const float* mu, const float* lv, const float* pm,
                                const float* plv, int64_t r0, int64_t r1, int64_t L, float* kl) {
  kl_rows_t(mu, lv, pm, plv, r0, r1, L, kl);
}

FASTVAE_CLONES void kl_grad_rows_f32(const float* g, const float* mu, const float* lv,
                                     const float* pm, const float* plv, int64_t r0, int64_t r1,
                                     int64_t L, float* dmu, float* dlv, float* dpm, float* dplv) {
  kl_grad_rows_t(g, mu, lv, pm, plv, r0, r1, L, dmu, dlv, dpm, dplv);
}

void kl_grad_rows(const float* g, const float* mu, const float* lv, const float* pm,
                  const float* plv, int64_t r0, int64_t r1, int64_t L, float* dmu, float* dlv,
                  float* dpm, float* dplv) {
  kl_grad_rows_f32(g, mu, lv, pm, plv, r0, r1, L, dmu, dlv, dpm, dplv);
}

void kl_grad_rows(const double* g, const double* mu, const double* lv, const double* pm,
                  const double* plv, int64_t r0, int64_t r1, int64_t L, double* dmu,
                  double* dlv, double* dpm, double* dplv) {
  kl_grad_rows_t(g, mu, lv, pm, plv, r0, r1, L, dmu, dlv, dpm, dplv);
}

}  // namespace

void kl_rows(const float* mu, const float* lv, const float* pm, const float* plv,
                    int64_t r0, int64_t r1, int64_t L, float* kl) {
  kl_rows_f32(mu, lv, pm, plv, r0, r1, L, kl);
}

void kl_rows(const double* mu, const double* lv, const double* pm, const double* plv,
                     int64_t r0, int64_t r1, int64_t L, double* kl) {
  kl_rows_t(mu, lv, pm, plv, r0, r1, L, kl);
}

template <typename T>
void kl_normal_forward(const T* mu, const T* logvar, const T* prior_mu, const T* prior_logvar,
                       int64_t N, int64_t L, T* kl, int n_threads) {
  const int64_t n_tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < n_tasks; ++t) {
    const int64_t r0 = t * kRowsPerTask;
    kl_rows(mu, logvar, prior_mu, prior_logvar, r0, std::min(N, r0 + kRowsPerTask), L, kl);
  }
}

template <typename T>
void kl_normal_backward(const T* dkl, const T* mu, const T* logvar, const T* prior_mu,
                        const T* prior_logvar, int64_t N, int64_t L, T* dmu, T* dlogvar,
                        T* dprior_mu, T* dprior_logvar, int n_threads) {
  const int64_t n_tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < n_tasks; ++t) {
    const int64_t r0 = t * kRowsPerTask;
    kl_grad_rows(dkl, mu, logvar, prior_mu, prior_logvar, r0, std::min(N, r0 + kRowsPerTask), L,
                 dmu, dlogvar, dprior_mu, dprior_logvar);
  }
}

template void kl_normal_forward<float>(const float*, const float*, const float*, const float*,
                                       int64_t, int64_t, float*, int);
template void kl_normal_forward<double>(const double*, const double*, const double*,
                                        const double*, int64_t, int64_t, double*, int);
template void kl_normal_backward<float>(const float*, const float*, const float*, const float*,
                                        const float*, int64_t, int64_t, float*, float*, float*,
                                        float*, int);
template void kl_normal_backward<double>(const double*, const double*, const double*,
                                         const double*, const double*, int64_t, int64_t,
                                         double*, double*, double*, double*, int);

}  // namespace fastvae
