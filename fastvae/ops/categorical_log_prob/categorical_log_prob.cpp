// categorical_log_prob on the CPU: for each (k, p, d) a row of C logits,
// log softmax at the class x[p, d], summed over d. Two passes over a row
// (its max, then sum_c e^(l_c - max)), each vectorized; a row of a few
// thousand classes stays in L1/L2 between them. The result is written as
// (l[x] - max) - log(sum), never l[x] - (max + log(sum)), which would round
// through a large max. A class with logit -inf has probability 0 (its
// log-probability is -inf, its gradient finite); a row of all -inf (no shift
// to subtract) has log-probability -inf and a zero softmax.
#include <algorithm>
#include <cmath>
#include <limits>

#include "categorical_log_prob.h"
#include "fastmath.h"
#include "ops.h"

namespace fastvae {
namespace {

// (shift, log sum_c e^(l_c - shift)) of one row, shift = its max where finite, else 0.
template <typename T, typename H>
FASTVAE_INLINE void row_state(const H* l, int64_t C, T& shift, double& log_sum) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) m = std::max(m, T(widen(l[c])));
  shift = std::isfinite(m) ? m : T(0);
  // Blocks summed in T, their sums in double: a float lane reduction
  // vectorizes on AVX2, where one that widens every term to double did not
  // (GCC vectorized it only in the AVX-512 clone). A block of 64 terms is off
  // by at most ~64 float ulp of its own sum, so the row's sum is too.
  constexpr int64_t kBlock = 64;
  double s = 0.0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = std::min(kBlock, C - c0);
    const H* lb = l + c0;
    T sb = T(0);
#pragma omp simd reduction(+ : sb)
    for (int64_t c = 0; c < n; ++c) sb += exp_t(T(widen(lb[c])) - shift);
    s += double(sb);
  }
  log_sum = std::log(s);
}

template <typename T, typename H>
FASTVAE_INLINE void forward_rows(const int64_t* x, const H* logits, int64_t P, int64_t D,
                                 int64_t C, int64_t r0, int64_t r1, T* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* xp = x + (r % P) * D;
    double acc = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const H* l = logits + (r * D + d) * C;
      T shift;
      double log_sum;
      row_state(l, C, shift, log_sum);
      const T picked = T(widen(l[xp[d]]));
      acc += picked == -std::numeric_limits<T>::infinity() ? double(picked)
                                                           : double(picked - shift) - log_sum;
    }
    out[r] = T(acc);
  }
}

template <typename T, typename H>
FASTVAE_INLINE void backward_rows(const T* g, const int64_t* x, const H* logits, int64_t P,
                                  int64_t D, int64_t C, int64_t r0, int64_t r1, H* dlogits) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* xp = x + (r % P) * D;
    const T gr = g[r];
    for (int64_t d = 0; d < D; ++d) {
      const H* l = logits + (r * D + d) * C;
      H* dl = dlogits + (r * D + d) * C;
      T shift;
      double log_sum;
      row_state(l, C, shift, log_sum);
      const bool empty = std::isinf(log_sum) && log_sum < 0;  // every logit -inf: no softmax
      const T ls = empty ? T(0) : T(log_sum);
      const T keep = empty ? T(0) : T(1);
      const int64_t cls = xp[d];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T p = keep * exp_t((T(widen(l[c])) - shift) - ls);
        dl[c] = narrow<H>(gr * ((c == cls ? T(1) : T(0)) - p));
      }
    }
  }
}

// One ISA-cloned pair of row loops per float32 storage type of the logits
// (the clones cannot be templates): overloads that the entry points pick by type.
#define FASTVAE_CATEGORICAL_F32(H)                                                              \
  FASTVAE_CLONES void forward_task(const int64_t* x, const H* logits, int64_t P, int64_t D,     \
                                   int64_t C, int64_t r0, int64_t r1, float* out) {             \
    forward_rows<float, H>(x, logits, P, D, C, r0, r1, out);                                    \
  }                                                                                             \
  FASTVAE_CLONES void backward_task(const float* g, const int64_t* x, const H* logits,          \
                                    int64_t P, int64_t D, int64_t C, int64_t r0, int64_t r1,    \
                                    H* dlogits) {                                               \
    backward_rows<float, H>(g, x, logits, P, D, C, r0, r1, dlogits);                            \
  }

FASTVAE_CATEGORICAL_F32(float)
FASTVAE_CATEGORICAL_F32(bf16)
FASTVAE_CATEGORICAL_F32(fp16)
#undef FASTVAE_CATEGORICAL_F32

void forward_task(const int64_t* x, const double* l, int64_t P, int64_t D, int64_t C, int64_t r0,
                  int64_t r1, double* out) {
  forward_rows<double, double>(x, l, P, D, C, r0, r1, out);
}
void backward_task(const double* g, const int64_t* x, const double* l, int64_t P, int64_t D,
                   int64_t C, int64_t r0, int64_t r1, double* dl) {
  backward_rows<double, double>(g, x, l, P, D, C, r0, r1, dl);
}

// Output rows (k, p) per task: about 16k logits, at least one row.
int64_t rows_per_task(int64_t D, int64_t C) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, D * C));
}

}  // namespace

template <typename T, typename H>
void categorical_log_prob_forward(const int64_t* x, const H* logits, int64_t K, int64_t P,
                                  int64_t D, int64_t C, T* out, int n_threads) {
  const int64_t R = K * P, per = rows_per_task(D, C);
  const int64_t tasks = (R + per - 1) / per;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    forward_task(x, logits, P, D, C, t * per, std::min(R, (t + 1) * per), out);
  }
}

template <typename T, typename H>
void categorical_log_prob_backward(const T* g, const int64_t* x, const H* logits, int64_t K,
                                   int64_t P, int64_t D, int64_t C, H* dlogits, int n_threads) {
  const int64_t R = K * P, per = rows_per_task(D, C);
  const int64_t tasks = (R + per - 1) / per;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    backward_task(g, x, logits, P, D, C, t * per, std::min(R, (t + 1) * per), dlogits);
  }
}

#define FASTVAE_CATEGORICAL_INSTANTIATE(T, H)                                                    \
  template void categorical_log_prob_forward<T, H>(const int64_t*, const H*, int64_t, int64_t,  \
                                                   int64_t, int64_t, T*, int);                  \
  template void categorical_log_prob_backward<T, H>(const T*, const int64_t*, const H*, int64_t, \
                                                    int64_t, int64_t, int64_t, H*, int);
FASTVAE_CATEGORICAL_INSTANTIATE(float, float)
FASTVAE_CATEGORICAL_INSTANTIATE(float, bf16)
FASTVAE_CATEGORICAL_INSTANTIATE(float, fp16)
FASTVAE_CATEGORICAL_INSTANTIATE(double, double)
#undef FASTVAE_CATEGORICAL_INSTANTIATE

}  // namespace fastvae
