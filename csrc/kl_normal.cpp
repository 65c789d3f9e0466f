// kl_normal on the CPU: KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar))
// summed over L, with the standard normal prior when no prior is given.
#include <algorithm>
#include <cmath>

#include "fastmath.h"
#include "ops.h"

namespace fastvae {
namespace {

constexpr int64_t kRowsPerTask = 256;

// Row sums accumulate in double: terms span exp(30) = 1e13 down to 1e-7, and
// the simd reduction keeps the loop vectorized all the same.
template <typename T>
FASTVAE_INLINE void kl_rows_t(const T* mu, const T* lv, const T* pm, const T* plv, int64_t r0,
                              int64_t r1, int64_t L, T* kl) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * L;
    double acc = 0.0;
    if (pm == nullptr) {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = o; i < o + L; ++i) acc += double(exp_t(lv[i]) + mu[i] * mu[i] - T(1) - lv[i]);
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = o; i < o + L; ++i) {
        const T d = mu[i] - pm[i];
        acc += double(plv[i] - lv[i] + (exp_t(lv[i]) + d * d) * exp_t(-plv[i]) - T(1));
      }
    }
    kl[r] = static_cast<T>(0.5 * acc);
  }
}

// Gradients of rows [r0, r1); g = dkl.
template <typename T>
FASTVAE_INLINE void kl_grad_rows_t(const T* g, const T* mu, const T* lv, const T* pm, const T* plv,
                                   int64_t r0, int64_t r1, int64_t L, T* dmu, T* dlv, T* dpm,
                                   T* dplv) {
  for (int64_t r = r0; r < r1; ++r) {
    const T gr = g[r];
    const int64_t o = r * L;
    if (pm == nullptr) {
      for (int64_t i = o; i < o + L; ++i) {
        dmu[i] = gr * mu[i];
        dlv[i] = T(0.5) * gr * (exp_t(lv[i]) - T(1));
      }
    } else {
      for (int64_t i = o; i < o + L; ++i) {
        const T inv_pvar = exp_t(-plv[i]);
        const T d = mu[i] - pm[i];
        const T var = exp_t(lv[i]);
        dmu[i] = gr * d * inv_pvar;
        dpm[i] = -dmu[i];
        dlv[i] = T(0.5) * gr * (var * inv_pvar - T(1));
        dplv[i] = T(0.5) * gr * (T(1) - (var + d * d) * inv_pvar);
      }
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
