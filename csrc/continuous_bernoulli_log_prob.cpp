// continuous_bernoulli_log_prob on the CPU: the Bernoulli term of
// bernoulli_log_prob plus the log normalizer of the continuous Bernoulli
// (Loaiza-Ganem and Cunningham 2019), for lambda = sigmoid(l):
//   log C(l) = log(2 atanh(1 - 2 lambda) / (1 - 2 lambda)) = log(l / tanh(l / 2)),
// even in l. Near l = 0 that is 0 / 0 and its gradient 1/l - 1/sinh(l)
// cancels, so |l| < kTaylorBelow takes the Taylor series in l^2 (the
// coefficients of fastvae.reference.CB_TAYLOR); above it, with t = e^-|l|,
//   log C = log|l| - log(1 - t) + log1p(t),  d log C / dl = sign(l) (1/|l| - 2t / (1 - t^2)),
// exact at large |l| (t underflows to 0: log C = log|l|).
#include <algorithm>
#include <cmath>

#include "continuous_bernoulli_log_prob.h"
#include "fastmath.h"
#include "ops.h"

namespace fastvae {
namespace {

constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kBlock = 512;  // elements per vector block (stack buffer)

// The branch point: 1 - t loses about t / (1 - t) ulps, the series converges
// by about 1/pi^2 a term. float32: 8 terms leave 1e-10 at |l| = 1; float64:
// 2e-21 at |l| = 0.25, where 1 - t costs 3.5 ulps.
template <typename T> constexpr T kTaylorBelow = T(0.25);
template <> constexpr float kTaylorBelow<float> = 1.0f;

constexpr double kLog2 = 0.69314718055994530942;
constexpr double kA[8] = {1.0 / 12, -7.0 / 1440, 31.0 / 90720, -127.0 / 4838400, 73.0 / 34214400,
                          -1414477.0 / 7846046208000, 8191.0 / 523069747200,
                          -16931177.0 / 12194997534720000};

FASTVAE_INLINE float log_pos(float v) { return fast_log_positive(v); }
FASTVAE_INLINE double log_pos(double v) { return std::log(v); }
FASTVAE_INLINE float log1p_unit(float t) { return fast_log1p_unit(t); }
FASTVAE_INLINE double log1p_unit(double t) { return std::log1p(t); }

// Both branches are evaluated and one selected, so the loops stay branch-free;
// the exact branch reads |l| clamped to the branch point (no log 0 at l = 0).
template <typename T>
FASTVAE_INLINE T log_norm(T l) {
  const T a = std::fabs(l);
  const T u = l * l;
  T poly = T(kA[7]);
  for (int n = 6; n >= 0; --n) poly = poly * u + T(kA[n]);
  const T ab = a < kTaylorBelow<T> ? kTaylorBelow<T> : a;
  const T t = exp_t(-ab);
  const T exact = log_pos(ab) - log_pos(T(1) - t) + log1p_unit(t);
  return a < kTaylorBelow<T> ? T(kLog2) + poly * u : exact;
}

template <typename T>
FASTVAE_INLINE T log_norm_grad(T l) {
  const T a = std::fabs(l);
  const T u = l * l;
  T poly = T(16 * kA[7]);
  for (int n = 6; n >= 0; --n) poly = poly * u + T(2 * (n + 1) * kA[n]);
  const T ab = a < kTaylorBelow<T> ? kTaylorBelow<T> : a;
  const T t = exp_t(-ab);
  const T mag = T(1) / ab - T(2) * t / ((T(1) - t) * (T(1) + t));
  return a < kTaylorBelow<T> ? poly * l : (l < T(0) ? -mag : mag);
}

// x l - softplus(l) as bernoulli_log_prob writes it, with one exp and one log1p.
template <typename T>
FASTVAE_INLINE T log_prob_term(T x, T l) {
  const T t = softplus_t(-std::fabs(l));  // log1p(e^-|l|)
  const T sp = (l > T(0) ? l : T(0)) + t;
  const T sp_neg = (l < T(0) ? -l : T(0)) + t;
  return -(x * sp_neg + (T(1) - x) * sp) + log_norm(l);
}

template <typename T, typename H>
FASTVAE_INLINE void forward_rows(const T* x, const H* logits, int64_t K, int64_t P, int64_t D,
                                 int64_t p0, int64_t p1, T* out) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* xp = x + p * D;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = k * P + p;
      const H* l = logits + r * D;
      double acc = 0.0;  // terms in T, their sum in double (as bernoulli_log_prob)
      T t[kBlock];
      for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
        const int64_t n = std::min(kBlock, D - d0);
        for (int64_t d = 0; d < n; ++d) t[d] = log_prob_term(xp[d0 + d], T(widen(l[d0 + d])));
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < n; ++d) acc += double(t[d]);
      }
      out[r] = T(acc);
    }
  }
}

// dlogits = g (x - sigmoid(l) + d log C / dl); dx = sum_k g l.
template <typename T, typename H>
FASTVAE_INLINE void backward_rows(const T* g, const T* x, const H* logits, int64_t K, int64_t P,
                                  int64_t D, int64_t p0, int64_t p1, T* dx, H* dlogits) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* xp = x + p * D;
    T* dxp = dx ? dx + p * D : nullptr;
    if (dxp) std::fill(dxp, dxp + D, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = k * P + p;
      const T gr = g[r];
      const H* l = logits + r * D;
      H* dl = dlogits + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const T ld = T(widen(l[d]));
        dl[d] = narrow<H>(gr * (xp[d] - sigmoid_t(ld) + log_norm_grad(ld)));
        if (dxp) dxp[d] += gr * ld;
      }
    }
  }
}

#define FASTVAE_CB_F32(H, suffix)                                                               \
  FASTVAE_CLONES void forward_rows_##suffix(const float* x, const H* logits, int64_t K,        \
                                            int64_t P, int64_t D, int64_t p0, int64_t p1,      \
                                            float* out) {                                      \
    forward_rows<float, H>(x, logits, K, P, D, p0, p1, out);                                   \
  }                                                                                            \
  FASTVAE_CLONES void backward_rows_##suffix(const float* g, const float* x, const H* logits,  \
                                             int64_t K, int64_t P, int64_t D, int64_t p0,      \
                                             int64_t p1, float* dx, H* dlogits) {              \
    backward_rows<float, H>(g, x, logits, K, P, D, p0, p1, dx, dlogits);                       \
  }                                                                                            \
  void forward_task(const float* x, const H* l, int64_t K, int64_t P, int64_t D, int64_t p0,   \
                    int64_t p1, float* out) {                                                  \
    forward_rows_##suffix(x, l, K, P, D, p0, p1, out);                                         \
  }                                                                                            \
  void backward_task(const float* g, const float* x, const H* l, int64_t K, int64_t P,         \
                     int64_t D, int64_t p0, int64_t p1, float* dx, H* dl) {                    \
    backward_rows_##suffix(g, x, l, K, P, D, p0, p1, dx, dl);                                  \
  }

FASTVAE_CB_F32(float, f32)
FASTVAE_CB_F32(bf16, bf16)
FASTVAE_CB_F32(fp16, fp16)
#undef FASTVAE_CB_F32

void forward_task(const double* x, const double* l, int64_t K, int64_t P, int64_t D, int64_t p0,
                  int64_t p1, double* out) {
  forward_rows<double, double>(x, l, K, P, D, p0, p1, out);
}
void backward_task(const double* g, const double* x, const double* l, int64_t K, int64_t P,
                   int64_t D, int64_t p0, int64_t p1, double* dx, double* dl) {
  backward_rows<double, double>(g, x, l, K, P, D, p0, p1, dx, dl);
}

}  // namespace

template <typename T, typename H>
void continuous_bernoulli_log_prob_forward(const T* x, const H* logits, int64_t K, int64_t P,
                                           int64_t D, T* out, int n_threads) {
  const int64_t tasks = (P + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t p0 = t * kRowsPerTask;
    forward_task(x, logits, K, P, D, p0, std::min(P, p0 + kRowsPerTask), out);
  }
}

template <typename T, typename H>
void continuous_bernoulli_log_prob_backward(const T* g, const T* x, const H* logits, int64_t K,
                                            int64_t P, int64_t D, T* dx, H* dlogits,
                                            int n_threads) {
  const int64_t tasks = (P + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t p0 = t * kRowsPerTask;
    backward_task(g, x, logits, K, P, D, p0, std::min(P, p0 + kRowsPerTask), dx, dlogits);
  }
}

#define FASTVAE_CB_INSTANTIATE(T, H)                                                        \
  template void continuous_bernoulli_log_prob_forward<T, H>(const T*, const H*, int64_t,   \
                                                            int64_t, int64_t, T*, int);    \
  template void continuous_bernoulli_log_prob_backward<T, H>(                              \
      const T*, const T*, const H*, int64_t, int64_t, int64_t, T*, H*, int);
FASTVAE_CB_INSTANTIATE(float, float)
FASTVAE_CB_INSTANTIATE(float, bf16)
FASTVAE_CB_INSTANTIATE(float, fp16)
FASTVAE_CB_INSTANTIATE(double, double)
#undef FASTVAE_CB_INSTANTIATE

}  // namespace fastvae
