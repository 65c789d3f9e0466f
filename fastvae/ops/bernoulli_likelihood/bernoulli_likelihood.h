// Raw-pointer kernels of bernoulli_log_prob and continuous_bernoulli_log_prob
// (cpp backend): their entry points, and what the two share on the CPU: one
// row loop for the forward and one for the backward, templated on the
// per-element formula (BernoulliKind), and the OpenMP driver. The two
// formulas stand side by side below (log_prob_term, dlogit);
// bernoulli_likelihood.cpp instantiates the loops in ISA-cloned entry points,
// once per op (FASTVAE_BERNOULLI_OP). Callers (bind.cpp, torch_op.cpp) have
// checked dtype, contiguity and every extent.
//
// Layout, set up by fastvae/_likelihood_layout.py: logits (K, P, D), x (P, D)
// broadcast over K, never copied; out and g (K, P); dx (P, D) summed over K,
// or null.
//
//   Bernoulli:            x l - softplus(l),
//   continuous Bernoulli: x l - softplus(l) + log C(l),
// with softplus(l) = max(l, 0) + log1p(e^-|l|), so that |l| of 100 and beyond
// stays exact, and the continuous Bernoulli's log normalizer (Loaiza-Ganem and
// Cunningham 2019), for lambda = sigmoid(l):
//   log C(l) = log(2 atanh(1 - 2 lambda) / (1 - 2 lambda)) = log(l / tanh(l / 2)),
// even in l. Near l = 0 that is 0 / 0 and its gradient 1/l - 1/sinh(l)
// cancels, so |l| < kTaylorBelow takes the Taylor series in l^2 (the
// coefficients of the oracle's CB_TAYLOR, __init__.py); above it, with t = e^-|l|,
//   log C = log|l| - log(1 - t) + log1p(t),  d log C / dl = sign(l) (1/|l| - 2t / (1 - t^2)),
// exact at large |l| (t underflows to 0: log C = log|l|).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fastmath.h"
#include "half.h"
#include "ops.h"

namespace fastvae {

// T: the compute type (x, out, g, dx); H: the logits' storage type, T or, for
// T = float, bf16 / fp16 (half.h), read and written in its own dtype.
template <typename T, typename H>
void bernoulli_log_prob_forward(const T* x, const H* logits, int64_t K, int64_t P, int64_t D,
                                T* out, int n_threads);

// g: (K, P). dx: (P, D) or null; dlogits: (K, P, D).
template <typename T, typename H>
void bernoulli_log_prob_backward(const T* g, const T* x, const H* logits, int64_t K, int64_t P,
                                 int64_t D, T* dx, H* dlogits, int n_threads);

// The same layout and arguments as bernoulli_log_prob's.
template <typename T, typename H>
void continuous_bernoulli_log_prob_forward(const T* x, const H* logits, int64_t K, int64_t P,
                                           int64_t D, T* out, int n_threads);
template <typename T, typename H>
void continuous_bernoulli_log_prob_backward(const T* g, const T* x, const H* logits, int64_t K,
                                            int64_t P, int64_t D, T* dx, H* dlogits,
                                            int n_threads);

enum class BernoulliKind : int { kBernoulli = 0, kContinuous = 1 };

namespace bernoulli {

constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kBlock = 512;  // elements per vector block (stack buffer)

// -- the continuous Bernoulli's log normalizer ---------------------------------

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

// -- the two formulas ---------------------------------------------------------

// A zero weight times an infinite softplus counts as 0 (not 0 * inf = NaN):
// the Bernoulli's saturated logits (+-inf) then give 0 where the outcome is
// certain and right and -inf where it is certain and wrong. The continuous
// Bernoulli takes finite logits only and keeps the plain products.
template <typename T>
FASTVAE_INLINE T weighted(T w, T s) { return w == T(0) ? T(0) : w * s; }

// x l - softplus(l) written as -(x softplus(-l) + (1 - x) softplus(l)), with
// one exp and one log1p; the continuous Bernoulli adds log C(l).
template <BernoulliKind Kd, typename T>
FASTVAE_INLINE T log_prob_term(T x, T l) {
  const T t = softplus_t(-std::fabs(l));  // log1p(e^-|l|)
  const T sp = (l > T(0) ? l : T(0)) + t;
  const T sp_neg = (l < T(0) ? -l : T(0)) + t;
  if constexpr (Kd == BernoulliKind::kBernoulli) {
    return -(weighted(x, sp_neg) + weighted(T(1) - x, sp));
  } else {
    return -(x * sp_neg + (T(1) - x) * sp) + log_norm(l);
  }
}

// dlogits = g (x - sigmoid(l)), plus g d log C / dl for the continuous Bernoulli.
template <BernoulliKind Kd, typename T>
FASTVAE_INLINE T dlogit(T g, T x, T l) {
  if constexpr (Kd == BernoulliKind::kBernoulli) {
    return weighted(g, x - sigmoid_t(l));  // exact where saturated: 0
  } else {
    return g * (x - sigmoid_t(l) + log_norm_grad(l));
  }
}

// -- row loops and the OpenMP driver ----------------------------------------------

// T: the compute type of x, out, g and dx; H: the logits' storage type.
template <BernoulliKind Kd, typename T, typename H>
FASTVAE_INLINE void forward_rows(const T* x, const H* logits, int64_t K, int64_t P, int64_t D,
                                 int64_t p0, int64_t p1, T* out) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* xp = x + p * D;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = k * P + p;
      const H* l = logits + r * D;
      // Terms in T first, then their sum in double: the loop that did both
      // at once vectorized poorly (1.1 ns per element against 0.3 ns).
      double acc = 0.0;
      T t[kBlock];
      for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
        const int64_t n = std::min(kBlock, D - d0);
        for (int64_t d = 0; d < n; ++d) t[d] = log_prob_term<Kd>(xp[d0 + d], T(widen(l[d0 + d])));
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < n; ++d) acc += double(t[d]);
      }
      out[r] = T(acc);
    }
  }
}

// dlogits = dlogit(g, x, l); dx = sum_k g l.
template <BernoulliKind Kd, typename T, typename H>
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
        dl[d] = narrow<H>(dlogit<Kd>(gr, xp[d], ld));
        if (dxp) dxp[d] += gr * ld;
      }
    }
  }
}

// task(p0, p1) over tasks of about kRowsPerTask x rows (each with all K
// samples), so no two threads write the same dx row. The task count is a
// multiple of the threads and the rows are dealt evenly: P = 100 on two
// threads is 8 tasks of 12-13 rows, 52 and 48 rows a thread, where 7 tasks of
// 16 gave one thread 64 and the step waited for it. Each row's result is the
// same whichever task has it.
template <typename Task>
void for_row_tasks(int64_t P, int n_threads, const Task& task) {
  const int64_t threads = std::max(n_threads, 1);
  const int64_t tasks = ((P + kRowsPerTask - 1) / kRowsPerTask + threads - 1) / threads * threads;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    task(t * P / tasks, (t + 1) * P / tasks);
  }
}

}  // namespace bernoulli

// One ISA-cloned pair of row loops per float32 storage type of the logits
// (used by FASTVAE_BERNOULLI_OP; the clones cannot be templates): overloads
// forward_task / backward_task that the entry points pick by type.
#define FASTVAE_BERNOULLI_F32(kind, H)                                                          \
  FASTVAE_CLONES void forward_task(const float* x, const H* logits, int64_t K, int64_t P,      \
                                   int64_t D, int64_t p0, int64_t p1, float* out) {            \
    bernoulli::forward_rows<kind, float, H>(x, logits, K, P, D, p0, p1, out);                  \
  }                                                                                            \
  FASTVAE_CLONES void backward_task(const float* g, const float* x, const H* logits, int64_t K, \
                                    int64_t P, int64_t D, int64_t p0, int64_t p1, float* dx,   \
                                    H* dlogits) {                                              \
    bernoulli::backward_rows<kind, float, H>(g, x, logits, K, P, D, p0, p1, dx, dlogits);      \
  }

// One op's instantiations (in bernoulli_likelihood.cpp, once per op): the row
// loops of formula `kind` for float32 logits (cloned), bf16 and fp16 logits
// (cloned) and float64, in a namespace of their own (name##_rows: both ops
// share one translation unit), and the entry points name_forward /
// name_backward declared above.
#define FASTVAE_BERNOULLI_OP(name, kind)                                                        \
  namespace {                                                                                  \
  namespace name##_rows {                                                                      \
  FASTVAE_BERNOULLI_F32(kind, float)                                                           \
  FASTVAE_BERNOULLI_F32(kind, bf16)                                                            \
  FASTVAE_BERNOULLI_F32(kind, fp16)                                                            \
  void forward_task(const double* x, const double* l, int64_t K, int64_t P, int64_t D,         \
                    int64_t p0, int64_t p1, double* out) {                                     \
    bernoulli::forward_rows<kind, double, double>(x, l, K, P, D, p0, p1, out);                 \
  }                                                                                            \
  void backward_task(const double* g, const double* x, const double* l, int64_t K, int64_t P,  \
                     int64_t D, int64_t p0, int64_t p1, double* dx, double* dl) {              \
    bernoulli::backward_rows<kind, double, double>(g, x, l, K, P, D, p0, p1, dx, dl);          \
  }                                                                                            \
  }                                                                                            \
  }                                                                                            \
  template <typename T, typename H>                                                            \
  void name##_forward(const T* x, const H* logits, int64_t K, int64_t P, int64_t D, T* out,    \
                      int n_threads) {                                                         \
    bernoulli::for_row_tasks(P, n_threads, [&](int64_t p0, int64_t p1) {                       \
      name##_rows::forward_task(x, logits, K, P, D, p0, p1, out);                              \
    });                                                                                        \
  }                                                                                            \
  template <typename T, typename H>                                                            \
  void name##_backward(const T* g, const T* x, const H* logits, int64_t K, int64_t P,          \
                       int64_t D, T* dx, H* dlogits, int n_threads) {                          \
    bernoulli::for_row_tasks(P, n_threads, [&](int64_t p0, int64_t p1) {                       \
      name##_rows::backward_task(g, x, logits, K, P, D, p0, p1, dx, dlogits);                  \
    });                                                                                        \
  }                                                                                            \
  FASTVAE_BERNOULLI_INSTANTIATE(name, float, float)                                            \
  FASTVAE_BERNOULLI_INSTANTIATE(name, float, bf16)                                             \
  FASTVAE_BERNOULLI_INSTANTIATE(name, float, fp16)                                             \
  FASTVAE_BERNOULLI_INSTANTIATE(name, double, double)

#define FASTVAE_BERNOULLI_INSTANTIATE(name, T, H)                                               \
  template void name##_forward<T, H>(const T*, const H*, int64_t, int64_t, int64_t, T*, int);  \
  template void name##_backward<T, H>(const T*, const T*, const H*, int64_t, int64_t, int64_t, \
                                      T*, H*, int);

}  // namespace fastvae
