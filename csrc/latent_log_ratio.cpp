// latent_log_ratio on the CPU: r[k, n] = 0.5 * sum_l(eps^2 - z^2 + logvar) with
// eps = (z - mu) * exp(-logvar / 2), and its gradient in full or in the
// "stop the score" mode (STL, DReG), where only the path through z has one.
//
// exp(-logvar / 2) is computed once per row of mu and reused by the K samples
// of that row. Row sums accumulate in double: the per-element terms
// eps^2 - z^2 (each formed in T) have both signs and can be large, so a sum
// over L in T would lose a small total to rounding.
#include "latent_log_ratio.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fastmath.h"  // exp_t
#include "ops.h"       // FASTVAE_CLONES, FASTVAE_INLINE

namespace fastvae {
namespace {

constexpr int64_t kSamplesPerTask = 64;  // forward work item: one row of mu, up to 64 samples


// inv_s[l] = exp(-logvar[l] / 2); returns sum_l logvar[l] / 2.
template <typename T>
FASTVAE_INLINE double inv_std(const T* __restrict lv, int64_t L,
                              T* __restrict inv_s) {
  double half_lv = 0.0;
#pragma omp simd reduction(+ : half_lv)
  for (int64_t l = 0; l < L; ++l) {
    inv_s[l] = exp_t(T(-0.5) * lv[l]);
    half_lv += 0.5 * double(lv[l]);
  }
  return half_lv;
}

// sum_l (eps^2 - z^2) / 2 of one sample row.
template <typename T>
FASTVAE_INLINE double ratio_row(const T* __restrict z, const T* __restrict mu,
                                const T* __restrict inv_s, int64_t L) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t l = 0; l < L; ++l) {
    const T eps = (z[l] - mu[l]) * inv_s[l];
    acc += double(eps * eps - z[l] * z[l]);
  }
  return 0.5 * acc;
}

// dz of one sample row, and (acc_mu != nullptr) the running sums over samples
// of g * eps and g * (1 - eps^2).
template <typename T>
FASTVAE_INLINE void ratio_grad_row(T g, const T* __restrict z,
                                   const T* __restrict mu,
                                   const T* __restrict inv_s, int64_t L,
                                   T* __restrict dz, T* __restrict acc_mu,
                                   T* __restrict acc_lv) {
  if (acc_mu == nullptr) {
    for (int64_t l = 0; l < L; ++l) {
      const T eps = (z[l] - mu[l]) * inv_s[l];
      dz[l] = g * (eps * inv_s[l] - z[l]);
    }
    return;
  }
  for (int64_t l = 0; l < L; ++l) {
    const T eps = (z[l] - mu[l]) * inv_s[l];
    dz[l] = g * (eps * inv_s[l] - z[l]);
    acc_mu[l] += g * eps;
    acc_lv[l] += g * (T(1) - eps * eps);
  }
}

FASTVAE_CLONES double inv_std_f32(const float* lv, int64_t L, float* inv_s) {
  return inv_std(lv, L, inv_s);
}
FASTVAE_CLONES double ratio_row_f32(const float* z, const float* mu, const float* inv_s,
                                    int64_t L) {
  return ratio_row(z, mu, inv_s, L);
}
FASTVAE_CLONES void ratio_grad_row_f32(float g, const float* z, const float* mu,
                                       const float* inv_s, int64_t L, float* dz, float* acc_mu,
                                       float* acc_lv) {
  ratio_grad_row(g, z, mu, inv_s, L, dz, acc_mu, acc_lv);
}

double inv_std_any(const float* lv, int64_t L, float* inv_s) { return inv_std_f32(lv, L, inv_s); }
double inv_std_any(const double* lv, int64_t L, double* inv_s) { return inv_std(lv, L, inv_s); }
double ratio_row_any(const float* z, const float* mu, const float* inv_s, int64_t L) {
  return ratio_row_f32(z, mu, inv_s, L);
}
double ratio_row_any(const double* z, const double* mu, const double* inv_s, int64_t L) {
  return ratio_row(z, mu, inv_s, L);
}
void ratio_grad_row_any(float g, const float* z, const float* mu, const float* inv_s, int64_t L,
                        float* dz, float* acc_mu, float* acc_lv) {
  ratio_grad_row_f32(g, z, mu, inv_s, L, dz, acc_mu, acc_lv);
}
void ratio_grad_row_any(double g, const double* z, const double* mu, const double* inv_s,
                        int64_t L, double* dz, double* acc_mu, double* acc_lv) {
  ratio_grad_row(g, z, mu, inv_s, L, dz, acc_mu, acc_lv);
}

}  // namespace

template <typename T>
void latent_log_ratio_forward(const T* z, const T* mu, const T* logvar, int64_t K, int64_t N,
                              int64_t L, T* r, int n_threads) {
  const int64_t k_tasks = (K + kSamplesPerTask - 1) / kSamplesPerTask;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> inv_s(static_cast<size_t>(L));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N * k_tasks; ++t) {
      const int64_t n = t / k_tasks, k0 = (t % k_tasks) * kSamplesPerTask;
      const double half_lv = inv_std_any(logvar + n * L, L, inv_s.data());
      for (int64_t k = k0; k < std::min(K, k0 + kSamplesPerTask); ++k) {
        const int64_t row = k * N + n;
        r[row] = static_cast<T>(ratio_row_any(z + row * L, mu + n * L, inv_s.data(), L) + half_lv);
      }
    }
  }
}

template <typename T>
void latent_log_ratio_backward(const T* g, const T* z, const T* mu, const T* logvar, int64_t K,
                               int64_t N, int64_t L, T* dz, T* dmu, T* dlogvar, int n_threads) {
  const bool full = dmu != nullptr;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> buf(static_cast<size_t>(3 * L));
    T* inv_s = buf.data();
    T* acc_mu = full ? inv_s + L : nullptr;
    T* acc_lv = full ? inv_s + 2 * L : nullptr;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      inv_std_any(logvar + n * L, L, inv_s);
      if (full) std::fill(buf.begin() + L, buf.end(), T(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = k * N + n;
        ratio_grad_row_any(g[row], z + row * L, mu + n * L, inv_s, L, dz + row * L, acc_mu,
                           acc_lv);
      }
      if (full) {
        for (int64_t l = 0; l < L; ++l) {
          dmu[n * L + l] = -acc_mu[l] * inv_s[l];
          dlogvar[n * L + l] = T(0.5) * acc_lv[l];
        }
      }
    }
  }
}

template void latent_log_ratio_forward<float>(const float*, const float*, const float*, int64_t,
                                              int64_t, int64_t, float*, int);
template void latent_log_ratio_forward<double>(const double*, const double*, const double*,
                                               int64_t, int64_t, int64_t, double*, int);
template void latent_log_ratio_backward<float>(const float*, const float*, const float*,
                                               const float*, int64_t, int64_t, int64_t, float*,
                                               float*, float*, int);
template void latent_log_ratio_backward<double>(const double*, const double*, const double*,
                                                const double*, int64_t, int64_t, int64_t,
                                                double*, double*, double*, int);

}  // namespace fastvae
