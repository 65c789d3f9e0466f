// kl_normal on the CPU: KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar))
// summed over L, with the standard normal prior when no prior is given.
#include <cmath>

#include "ops.h"
#include "philox.h"

namespace fastvae {
namespace {

inline float exp_t(float x) { return fast_exp(x); }
inline double exp_t(double x) { return std::exp(x); }

}  // namespace

template <typename T>
void kl_normal_forward(const T* mu, const T* logvar, const T* prior_mu, const T* prior_logvar,
                       int64_t N, int64_t L, T* kl, int n_threads) {
  const bool has_prior = prior_mu != nullptr;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    const int64_t o = r * L;
    double acc = 0.0;  // double: the terms can span 1e13 (logvar = 30) down to 1e-7
    if (has_prior) {
      for (int64_t i = o; i < o + L; ++i) {
        const double d = double(mu[i]) - double(prior_mu[i]);
        const double inv_pvar = exp_t(-prior_logvar[i]);
        acc += double(prior_logvar[i]) - logvar[i] + (double(exp_t(logvar[i])) + d * d) * inv_pvar - 1.0;
      }
    } else {
      for (int64_t i = o; i < o + L; ++i) {
        const double m = mu[i];
        acc += double(exp_t(logvar[i])) + m * m - 1.0 - logvar[i];
      }
    }
    kl[r] = static_cast<T>(0.5 * acc);
  }
}

template <typename T>
void kl_normal_backward(const T* dkl, const T* mu, const T* logvar, const T* prior_mu,
                        const T* prior_logvar, int64_t N, int64_t L, T* dmu, T* dlogvar,
                        T* dprior_mu, T* dprior_logvar, int n_threads) {
  const bool has_prior = prior_mu != nullptr;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    const T g = dkl[r];
    const int64_t o = r * L;
    if (has_prior) {
      for (int64_t i = o; i < o + L; ++i) {
        const T inv_pvar = exp_t(-prior_logvar[i]);
        const T d = mu[i] - prior_mu[i];
        const T var = exp_t(logvar[i]);
        dmu[i] = g * d * inv_pvar;
        dprior_mu[i] = -dmu[i];
        dlogvar[i] = T(0.5) * g * (var * inv_pvar - T(1));
        dprior_logvar[i] = T(0.5) * g * (T(1) - (var + d * d) * inv_pvar);
      }
    } else {
      for (int64_t i = o; i < o + L; ++i) {
        dmu[i] = g * mu[i];
        dlogvar[i] = T(0.5) * g * (exp_t(logvar[i]) - T(1));
      }
    }
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
