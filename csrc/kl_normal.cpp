// kl_normal on the CPU: KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar))
// summed over L, with the standard normal prior when no prior is given.
#include <algorithm>
#include <cmath>

#include "ops.h"
#include "philox.h"

namespace fastvae {
namespace {

constexpr int64_t kRowsPerTask = 256;

// Row sums accumulate in double: terms span exp(30) = 1e13 down to 1e-7, and
// the simd reduction keeps the loop vectorized all the same.
FASTVAE_CLONES void kl_rows_f32(const float* mu, const float* lv, const float* pm,
                                const float* plv, int64_t r0, int64_t r1, int64_t L,
                                float* kl) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * L;
    double acc = 0.0;
    if (pm == nullptr) {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = o; i < o + L; ++i) {
        acc += double(fast_exp(lv[i]) + mu[i] * mu[i] - 1.0f - lv[i]);
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = o; i < o + L; ++i) {
        const float d = mu[i] - pm[i];
        acc += double(plv[i] - lv[i] + (fast_exp(lv[i]) + d * d) * fast_exp(-plv[i]) - 1.0f);
      }
    }
    kl[r] = static_cast<float>(0.5 * acc);
  }
}

void kl_rows_f64(const double* mu, const double* lv, const double* pm, const double* plv,
                 int64_t r0, int64_t r1, int64_t L, double* kl) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * L;
    double acc = 0.0;
    for (int64_t i = o; i < o + L; ++i) {
      if (pm == nullptr) {
        acc += std::exp(lv[i]) + mu[i] * mu[i] - 1.0 - lv[i];
      } else {
        const double d = mu[i] - pm[i];
        acc += plv[i] - lv[i] + (std::exp(lv[i]) + d * d) * std::exp(-plv[i]) - 1.0;
      }
    }
    kl[r] = 0.5 * acc;
  }
}

// Gradients of rows [r0, r1); g = dkl.
FASTVAE_CLONES void kl_grad_rows_f32(const float* g, const float* mu, const float* lv,
                                     const float* pm, const float* plv, int64_t r0, int64_t r1,
                                     int64_t L, float* dmu, float* dlv, float* dpm, float* dplv) {
  for (int64_t r = r0; r < r1; ++r) {
    const float gr = g[r];
    const int64_t o = r * L;
    if (pm == nullptr) {
      for (int64_t i = o; i < o + L; ++i) {
        dmu[i] = gr * mu[i];
        dlv[i] = 0.5f * gr * (fast_exp(lv[i]) - 1.0f);
      }
    } else {
      for (int64_t i = o; i < o + L; ++i) {
        const float inv_pvar = fast_exp(-plv[i]);
        const float d = mu[i] - pm[i];
        const float var = fast_exp(lv[i]);
        dmu[i] = gr * d * inv_pvar;
        dpm[i] = -dmu[i];
        dlv[i] = 0.5f * gr * (var * inv_pvar - 1.0f);
        dplv[i] = 0.5f * gr * (1.0f - (var + d * d) * inv_pvar);
      }
    }
  }
}

void kl_grad_rows_f64(const double* g, const double* mu, const double* lv, const double* pm,
                      const double* plv, int64_t r0, int64_t r1, int64_t L, double* dmu,
                      double* dlv, double* dpm, double* dplv) {
  for (int64_t r = r0; r < r1; ++r) {
    const double gr = g[r];
    for (int64_t i = r * L; i < (r + 1) * L; ++i) {
      if (pm == nullptr) {
        dmu[i] = gr * mu[i];
        dlv[i] = 0.5 * gr * (std::exp(lv[i]) - 1.0);
      } else {
        const double inv_pvar = std::exp(-plv[i]);
        const double d = mu[i] - pm[i];
        const double var = std::exp(lv[i]);
        dmu[i] = gr * d * inv_pvar;
        dpm[i] = -dmu[i];
        dlv[i] = 0.5 * gr * (var * inv_pvar - 1.0);
        dplv[i] = 0.5 * gr * (1.0 - (var + d * d) * inv_pvar);
      }
    }
  }
}

void kl_grad_rows(const float* g, const float* mu, const float* lv, const float* pm,
                  const float* plv, int64_t r0, int64_t r1, int64_t L, float* dmu, float* dlv,
                  float* dpm, float* dplv) {
  kl_grad_rows_f32(g, mu, lv, pm, plv, r0, r1, L, dmu, dlv, dpm, dplv);
}

void kl_grad_rows(const double* g, const double* mu, const double* lv, const double* pm,
                  const double* plv, int64_t r0, int64_t r1, int64_t L, double* dmu,
                  double* dlv, double* dpm, double* dplv) {
  kl_grad_rows_f64(g, mu, lv, pm, plv, r0, r1, L, dmu, dlv, dpm, dplv);
}

}  // namespace

void kl_rows(const float* mu, const float* lv, const float* pm, const float* plv,
                    int64_t r0, int64_t r1, int64_t L, float* kl) {
  kl_rows_f32(mu, lv, pm, plv, r0, r1, L, kl);
}

void kl_rows(const double* mu, const double* lv, const double* pm, const double* plv,
                     int64_t r0, int64_t r1, int64_t L, double* kl) {
  kl_rows_f64(mu, lv, pm, plv, r0, r1, L, kl);
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
