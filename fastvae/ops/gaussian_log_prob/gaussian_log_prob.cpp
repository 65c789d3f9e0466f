// gaussian_log_prob on the CPU:
//   out[k, p] = -0.5 * sum_d((x[p,d] - m[k,p,d])^2 / var + log var + log 2 pi)
// with var = exp(v) (log-variance) or softplus(v) + delta, v laid out per
// element, per x row or per dimension (gaussian_log_prob.h). x is read once per
// (k, p) row from cache, never copied K times; the backward fuses dmean, dv
// and dx into one pass. The decoder outputs, mean (storage type H) and a
// per-element v (V = H), are read in their own dtype (bfloat16/float16 with
// float32 compute: half.h) and their gradients written in it; a shared
// (per-row or per-dimension) v is V = T.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <omp.h>

#include "fastmath.h"
#include "gaussian_log_prob.h"
#include "half.h"
#include "scale_rows.h"

namespace fastvae {
namespace {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;
constexpr int64_t kRowsPerTask = 16;

// var >= delta > 0 is a normal float; inf and NaN pass through unchanged.
FASTVAE_INLINE float log_var_t(float v) {
  return v < std::numeric_limits<float>::max() ? fast_log_positive(v) : v;
}
FASTVAE_INLINE double log_var_t(double v) { return std::log(v); }

// 1/var and log var of one element (returned by value: references to locals
// keep GCC from vectorizing the loops that call this).
template <typename T>
struct InvLogVar {
  T inv, log_var;
};

template <typename T, bool kSoftplus>
FASTVAE_INLINE InvLogVar<T> inv_and_log_var(T v, T delta) {
  if (kSoftplus) {
    const T var = softplus_t(v) + delta;
    return {T(1) / var, log_var_t(var)};
  }
  return {exp_t(-v), v};
}

// (x - m)^2 / var and (x - m) / var that are 0 where x == m exactly, even
// when 1/var overflowed (an underflowing variance): never 0 * inf = NaN.
template <typename T>
FASTVAE_INLINE T sq_over_var(T diff, T inv) { return diff == T(0) ? T(0) : diff * diff * inv; }
template <typename T>
FASTVAE_INLINE T over_var(T diff, T inv) { return diff == T(0) ? T(0) : diff * inv; }

// sum_d((x - m)^2 / var + log var) over one row with var per element.
template <typename T, bool kSoftplus, typename H, typename V>
FASTVAE_INLINE double row_sum_element(const T* x, const H* m, const V* v, T delta, int64_t D) {
  T acc = 0;  // float32 accumulation: the simd lanes keep 16 partial sums
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) {
    const InvLogVar<T> w = inv_and_log_var<T, kSoftplus>(T(widen(v[d])), delta);
    const T diff = x[d] - T(widen(m[d]));
    acc += sq_over_var(diff, w.inv) + w.log_var;
  }
  return acc;
}

// sum_d (x - m)^2 * inv over one row with a shared 1/var row.
template <typename T, typename H>
FASTVAE_INLINE double row_sum_shared(const T* x, const H* m, const T* inv, int64_t D) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) {
    const T diff = x[d] - T(widen(m[d]));
    acc += sq_over_var(diff, inv[d]);
  }
  return acc;
}

// Backward of one (k, p) row, var per element: writes dmean, and dv when it
// is given, and subtracts into dx_acc (the sum over k) when it is given.
// The loop for one (dv given, dx_acc given) pair: no branch inside, which
// GCC did not unswitch for the half-precision storage types (their loops did
// not vectorize: "control flow in loop").
template <typename T, bool kSoftplus, bool kDv, bool kDx, typename H, typename V>
FASTVAE_INLINE void row_grad_element_loop(const T* x, const H* m, const V* v, T delta, T g, int64_t D,
                                          H* dmean, V* dv, T* dx_acc) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const T diff = x[d] - T(widen(m[d]));
    const T vd = T(widen(v[d]));
    const T inv = inv_and_log_var<T, kSoftplus>(vd, delta).inv;
    const T gm = g * over_var(diff, inv);
    dmean[d] = narrow<H>(gm);
    if constexpr (kDv) {
      dv[d] = narrow<V>(kSoftplus ? T(0.5) * g * (diff * diff * inv * inv - inv) * sigmoid_t(vd)
                                  : T(0.5) * g * (sq_over_var(diff, inv) - T(1)));
    }
    if constexpr (kDx) dx_acc[d] -= gm;
  }
}

template <typename T, bool kSoftplus, typename H, typename V>
FASTVAE_INLINE void row_grad_element(const T* x, const H* m, const V* v, T delta, T g, int64_t D,
                             H* dmean, V* dv, T* dx_acc) {
  if (dv && dx_acc) row_grad_element_loop<T, kSoftplus, true, true>(x, m, v, delta, g, D, dmean, dv, dx_acc);
  else if (dv) row_grad_element_loop<T, kSoftplus, true, false>(x, m, v, delta, g, D, dmean, dv, dx_acc);
  else if (dx_acc) row_grad_element_loop<T, kSoftplus, false, true>(x, m, v, delta, g, D, dmean, dv, dx_acc);
  else row_grad_element_loop<T, kSoftplus, false, false>(x, m, v, delta, g, D, dmean, dv, dx_acc);
}

// Backward of one row with a shared 1/var row: dmean, dx_acc as above, and
// (when a_acc is given) a_acc[d] += g (x - m)^2, from which the shared dv is
// formed per x row.
template <typename T, typename H>
FASTVAE_INLINE void row_grad_shared(const T* x, const H* m, const T* inv, T g, int64_t D,
                                    H* dmean, T* a_acc, T* dx_acc) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const T diff = x[d] - T(widen(m[d]));
    const T gm = g * over_var(diff, inv[d]);
    dmean[d] = narrow<H>(gm);
    if (a_acc) a_acc[d] += g * diff * diff;
    if (dx_acc) dx_acc[d] -= gm;
  }
}

// 1/var of a shared row and the row's sum of log var.
template <typename T, typename V>
double shared_inv_row(const V* v, bool softplus, T delta, int64_t D, T* inv) {
  double sum_log_var = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const T vd = T(widen(v[d]));
    const InvLogVar<T> w = softplus ? inv_and_log_var<T, true>(vd, delta)
                                    : inv_and_log_var<T, false>(vd, delta);
    inv[d] = w.inv;
    sum_log_var += double(w.log_var);
  }
  return sum_log_var;
}

// dv of a shared row from A = sum g (x - m)^2 and G = sum g over its rows:
// logvar: (inv A - G) / 2;  softplus: (inv^2 A - inv G) / 2 * sigmoid(v).
template <typename T, typename A, typename V>
void shared_dv_row(const V* v, const T* inv, const A* a, double G, bool softplus,
                   int64_t D, V* dv) {
  for (int64_t d = 0; d < D; ++d) {
    const double iv = inv[d];
    const double ad = a[d];
    // ad == 0 (every x == m) with an overflowed iv is 0, not NaN
    dv[d] = narrow<V>(softplus ? T(0.5 * (iv * iv * ad - iv * G) * double(sigmoid_t(T(widen(v[d])))))
                               : T(0.5 * ((ad == 0.0 ? 0.0 : iv * ad) - G)));
  }
}

// The hot loops of one task of x rows [p0, p1). Templates are inlined into
// each ISA clone of the float32 entry points below.
template <typename T, typename H, typename V>
FASTVAE_INLINE void forward_rows(const T* x, const H* mean, const V* v, VarLayout layout, bool softplus,
                         T delta, int64_t K, int64_t P, int64_t D, int64_t p0, int64_t p1,
                         const T* dim_inv, double dim_log_var, T* inv_row, T* out) {
  const double log2pi = double(D) * kLog2Pi;
  scale_forward_rows(
      x, K, P, D, p0, p1, layout == VarLayout::kRow, dim_inv, dim_log_var, inv_row,
      [=](int64_t p, T* inv) FASTVAE_LAMBDA_INLINE { return shared_inv_row(v + p * D, softplus, delta, D, inv); },
      [=](int64_t r, const T* xp, const T* inv, double shared_log_var) FASTVAE_LAMBDA_INLINE {
        const H* m = mean + r * D;
        double s;
        if (layout == VarLayout::kElement) {
          s = softplus ? row_sum_element<T, true>(xp, m, v + r * D, delta, D)
                       : row_sum_element<T, false>(xp, m, v + r * D, delta, D);
        } else {
          s = row_sum_shared(xp, m, inv, D) + shared_log_var;
        }
        out[r] = T(-0.5 * (s + log2pi));
      });
}

// dv may be null (its argument needs no gradient, e.g. a fixed scale): then
// no (x - m)^2 sums are formed at all.
template <typename T, typename H, typename V>
FASTVAE_INLINE void backward_rows(const T* g, const T* x, const H* mean, const V* v,
                                  VarLayout layout, bool softplus, T delta, int64_t K, int64_t P,
                                  int64_t D, int64_t p0, int64_t p1, const T* dim_inv, T* inv_row,
                                  T* a_row, double* dim_a, double& dim_g, T* dx, H* dmean, V* dv) {
  const bool shared = layout != VarLayout::kElement;
  T* a_acc = shared && dv ? a_row : nullptr;
  scale_backward_rows(
      x, dx, K, P, D, p0, p1, layout == VarLayout::kRow, dim_inv, inv_row, a_acc, dim_a, dim_g,
      [=](int64_t p, T* inv) FASTVAE_LAMBDA_INLINE { shared_inv_row(v + p * D, softplus, delta, D, inv); },
      [=](int64_t r, const T* xp, const T* inv, T* dxp) FASTVAE_LAMBDA_INLINE {
        const T gr = g[r];
        V* dvr = dv ? dv + r * D : nullptr;
        if (!shared && softplus) {
          row_grad_element<T, true>(xp, mean + r * D, v + r * D, delta, gr, D, dmean + r * D, dvr, dxp);
        } else if (!shared) {
          row_grad_element<T, false>(xp, mean + r * D, v + r * D, delta, gr, D, dmean + r * D, dvr, dxp);
        } else {
          row_grad_shared(xp, mean + r * D, inv, gr, D, dmean + r * D, a_acc, dxp);
        }
        return gr;
      },
      [=](int64_t p, const T* inv, double g_sum) FASTVAE_LAMBDA_INLINE {
        shared_dv_row(v + p * D, inv, a_acc, g_sum, softplus, D, dv + p * D);
      });
}

// One ISA-cloned entry point per (mean, v) storage pair with float32 compute.
#define FASTVAE_GAUSSIAN_F32(H, V, suffix)                                                       \
  FASTVAE_CLONES void forward_rows_##suffix(const float* x, const H* mean, const V* v,          \
                                            VarLayout layout, bool softplus, float delta,       \
                                            int64_t K, int64_t P, int64_t D, int64_t p0,        \
                                            int64_t p1, const float* dim_inv,                   \
                                            double dim_log_var, float* inv_row, float* out) {   \
    forward_rows<float>(x, mean, v, layout, softplus, delta, K, P, D, p0, p1, dim_inv,          \
                        dim_log_var, inv_row, out);                                             \
  }                                                                                             \
  FASTVAE_CLONES void backward_rows_##suffix(                                                   \
      const float* g, const float* x, const H* mean, const V* v, VarLayout layout,              \
      bool softplus, float delta, int64_t K, int64_t P, int64_t D, int64_t p0, int64_t p1,      \
      const float* dim_inv, float* inv_row, float* a_acc, double* dim_a, double& dim_g,         \
      float* dx, H* dmean, V* dv) {                                                             \
    backward_rows<float>(g, x, mean, v, layout, softplus, delta, K, P, D, p0, p1, dim_inv,      \
                         inv_row, a_acc, dim_a, dim_g, dx, dmean, dv);                          \
  }                                                                                             \
  void forward_task(const float* x, const H* mean, const V* v, VarLayout layout, bool softplus, \
                    float delta, int64_t K, int64_t P, int64_t D, int64_t p0, int64_t p1,       \
                    const float* dim_inv, double dim_log_var, float* inv_row, float* out) {     \
    forward_rows_##suffix(x, mean, v, layout, softplus, delta, K, P, D, p0, p1, dim_inv,        \
                          dim_log_var, inv_row, out);                                           \
  }                                                                                             \
  void backward_task(const float* g, const float* x, const H* mean, const V* v,                 \
                     VarLayout layout, bool softplus, float delta, int64_t K, int64_t P,        \
                     int64_t D, int64_t p0, int64_t p1, const float* dim_inv, float* inv_row,   \
                     float* a_acc, double* dim_a, double& dim_g, float* dx, H* dmean, V* dv) {  \
    backward_rows_##suffix(g, x, mean, v, layout, softplus, delta, K, P, D, p0, p1, dim_inv,    \
                           inv_row, a_acc, dim_a, dim_g, dx, dmean, dv);                        \
  }

// The storage of mean (H) and v (V) under a float32 compute type: float32, or
// half precision with v per element (V = H) or shared (V = float).
#define FASTVAE_GAUSSIAN_F32_STORAGE(X) \
  X(float, float, f32)                  \
  X(bf16, bf16, bf16)                   \
  X(bf16, float, bf16_shared)           \
  X(fp16, fp16, fp16)                   \
  X(fp16, float, fp16_shared)
FASTVAE_GAUSSIAN_F32_STORAGE(FASTVAE_GAUSSIAN_F32)
#undef FASTVAE_GAUSSIAN_F32

void forward_task(const double* x, const double* mean, const double* v, VarLayout layout,
                  bool softplus, double delta, int64_t K, int64_t P, int64_t D, int64_t p0,
                  int64_t p1, const double* dim_inv, double dim_log_var, double* inv_row,
                  double* out) {
  forward_rows<double>(x, mean, v, layout, softplus, delta, K, P, D, p0, p1, dim_inv,
                       dim_log_var, inv_row, out);
}

void backward_task(const double* g, const double* x, const double* mean, const double* v,
                   VarLayout layout, bool softplus, double delta, int64_t K, int64_t P,
                   int64_t D, int64_t p0, int64_t p1, const double* dim_inv, double* inv_row,
                   double* a_acc, double* dim_a, double& dim_g, double* dx, double* dmean,
                   double* dv) {
  backward_rows<double>(g, x, mean, v, layout, softplus, delta, K, P, D, p0, p1, dim_inv,
                        inv_row, a_acc, dim_a, dim_g, dx, dmean, dv);
}

}  // namespace

template <typename T, typename H, typename V>
void gaussian_log_prob_forward(const T* x, const H* mean, const V* v, VarLayout layout,
                               bool softplus, double delta, int64_t K, int64_t P, int64_t D,
                               T* out, int n_threads) {
  // A per-dimension variance is turned into one 1/var row up front.
  std::vector<T> dim_inv(layout == VarLayout::kDim ? D : 0);
  double dim_log_var = 0.0;
  if (layout == VarLayout::kDim) dim_log_var = shared_inv_row(v, softplus, T(delta), D, dim_inv.data());
  scale_forward_tasks<T>(P, D, kRowsPerTask, layout == VarLayout::kRow, n_threads,
                         [&](int64_t p0, int64_t p1, T* inv_row) {
                           forward_task(x, mean, v, layout, softplus, T(delta), K, P, D, p0, p1,
                                        dim_inv.data(), dim_log_var, inv_row, out);
                         });
}

template <typename T, typename H, typename V>
void gaussian_log_prob_backward(const T* g, const T* x, const H* mean, const V* v,
                                VarLayout layout, bool softplus, double delta, int64_t K,
                                int64_t P, int64_t D, T* dx, H* dmean, V* dv, int n_threads) {
  const bool dim = layout == VarLayout::kDim;
  const bool dim_dv = dim && dv != nullptr;
  std::vector<T> dim_inv(dim ? D : 0);
  if (dim) shared_inv_row(v, softplus, T(delta), D, dim_inv.data());
  scale_backward_tasks<T>(
      P, D, kRowsPerTask, layout == VarLayout::kRow, layout == VarLayout::kElement, dim_dv, n_threads,
      [&](int64_t p0, int64_t p1, T* inv_row, T* a_row, double* dim_a, double& dim_g) {
        backward_task(g, x, mean, v, layout, softplus, T(delta), K, P, D, p0, p1, dim_inv.data(), inv_row,
                      a_row, dim_a, dim_g, dx, dmean, dv);
      },
      [&](const double* a, double G) { shared_dv_row(v, dim_inv.data(), a, G, softplus, D, dv); });
}

#define FASTVAE_GAUSSIAN_INSTANTIATE(T, H, V)                                                   \
  template void gaussian_log_prob_forward<T, H, V>(const T*, const H*, const V*, VarLayout, bool, \
                                                   double, int64_t, int64_t, int64_t, T*, int);  \
  template void gaussian_log_prob_backward<T, H, V>(const T*, const T*, const H*, const V*,       \
                                                    VarLayout, bool, double, int64_t, int64_t,   \
                                                    int64_t, T*, H*, V*, int);
#define FASTVAE_GAUSSIAN_INSTANTIATE_F32(H, V, suffix) FASTVAE_GAUSSIAN_INSTANTIATE(float, H, V)
FASTVAE_GAUSSIAN_F32_STORAGE(FASTVAE_GAUSSIAN_INSTANTIATE_F32)
FASTVAE_GAUSSIAN_INSTANTIATE(double, double, double)
#undef FASTVAE_GAUSSIAN_INSTANTIATE_F32
#undef FASTVAE_GAUSSIAN_INSTANTIATE
#undef FASTVAE_GAUSSIAN_F32_STORAGE

}  // namespace fastvae
