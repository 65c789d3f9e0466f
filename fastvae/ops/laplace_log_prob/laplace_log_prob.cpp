// laplace_log_prob on the CPU:
//   out[k, p] = -sum_d(|x[p,d] - loc[k,p,d]| / b + log b + log 2),  b = exp(s)
// with s laid out per element, per x row or per dimension
// (laplace_log_prob.h). x is read once per (k, p) row from cache, never
// copied K times; the backward fuses dloc, ds and dx into one pass. Where
// x == loc exactly the deviation term is 0 whatever the scale (no 0 * inf
// when 1/b overflows) and sign(0) = 0, as torch's abs gives loc's gradient.
#include <algorithm>
#include <cmath>
#include <vector>

#include <omp.h>

#include "fastmath.h"
#include "laplace_log_prob.h"
#include "ops.h"
#include "scale_rows.h"

namespace fastvae {
namespace {

constexpr double kLog2 = 0.69314718055994530941723212145818;
constexpr int64_t kRowsPerTask = 16;

// |x - loc| / b and sign(x - loc) / b, 0 where x == loc exactly.
template <typename T>
FASTVAE_INLINE T dev_over_scale(T diff, T inv) { return diff == T(0) ? T(0) : std::abs(diff) * inv; }
template <typename T>
FASTVAE_INLINE T sign_over_scale(T diff, T inv) { return diff > T(0) ? inv : diff < T(0) ? -inv : T(0); }

// sum_d(|x - loc| / b + s) over one row with s per element.
template <typename T>
FASTVAE_INLINE double row_sum_element(const T* x, const T* m, const T* s, int64_t D) {
  T acc = 0;  // accumulation in T: the simd lanes keep partial sums
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += dev_over_scale(x[d] - m[d], exp_t(-s[d])) + s[d];
  return acc;
}

// sum_d |x - loc| * inv over one row with a shared 1/b row.
template <typename T>
FASTVAE_INLINE double row_sum_shared(const T* x, const T* m, const T* inv, int64_t D) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += dev_over_scale(x[d] - m[d], inv[d]);
  return acc;
}

// Backward of one (k, p) row, s per element: dloc, ds when given, and dx_acc
// -= dloc when given (the sum over k). One loop per (ds, dx) pair: no branch
// inside, so that GCC vectorizes each.
template <typename T, bool kDs, bool kDx>
FASTVAE_INLINE void row_grad_element_loop(const T* x, const T* m, const T* s, T g, int64_t D, T* dloc,
                                          T* ds, T* dx_acc) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const T diff = x[d] - m[d];
    const T inv = exp_t(-s[d]);
    const T gl = g * sign_over_scale(diff, inv);
    dloc[d] = gl;
    if constexpr (kDs) ds[d] = g * (dev_over_scale(diff, inv) - T(1));
    if constexpr (kDx) dx_acc[d] -= gl;
  }
}

template <typename T>
FASTVAE_INLINE void row_grad_element(const T* x, const T* m, const T* s, T g, int64_t D, T* dloc, T* ds,
                                     T* dx_acc) {
  if (ds && dx_acc) row_grad_element_loop<T, true, true>(x, m, s, g, D, dloc, ds, dx_acc);
  else if (ds) row_grad_element_loop<T, true, false>(x, m, s, g, D, dloc, ds, dx_acc);
  else if (dx_acc) row_grad_element_loop<T, false, true>(x, m, s, g, D, dloc, ds, dx_acc);
  else row_grad_element_loop<T, false, false>(x, m, s, g, D, dloc, ds, dx_acc);
}

// Backward of one row with a shared 1/b row: dloc, dx_acc as above, and (when
// a_acc is given) a_acc[d] += g |x - loc| / b, from which the shared ds is
// formed: ds = sum g |x - loc| / b - sum g.
template <typename T>
FASTVAE_INLINE void row_grad_shared(const T* x, const T* m, const T* inv, T g, int64_t D, T* dloc, T* a_acc,
                                    T* dx_acc) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const T diff = x[d] - m[d];
    const T gl = g * sign_over_scale(diff, inv[d]);
    dloc[d] = gl;
    if (a_acc) a_acc[d] += g * dev_over_scale(diff, inv[d]);
    if (dx_acc) dx_acc[d] -= gl;
  }
}

// 1/b of a shared row, and the row's sum of s.
template <typename T>
double shared_inv_row(const T* s, int64_t D, T* inv) {
  double sum_s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    inv[d] = exp_t(-s[d]);
    sum_s += double(s[d]);
  }
  return sum_s;
}

// The hot loops of one task of x rows [p0, p1). Inlined into each ISA clone
// of the float32 entry points below.
template <typename T>
FASTVAE_INLINE void forward_rows(const T* x, const T* loc, const T* s, ScaleLayout layout, int64_t K,
                                 int64_t P, int64_t D, int64_t p0, int64_t p1, const T* dim_inv,
                                 double dim_sum_s, T* inv_row, T* out) {
  const double log2 = double(D) * kLog2;
  scale_forward_rows(
      x, K, P, D, p0, p1, layout == ScaleLayout::kRow, dim_inv, dim_sum_s, inv_row,
      [=](int64_t p, T* inv) FASTVAE_LAMBDA_INLINE { return shared_inv_row(s + p * D, D, inv); },
      [=](int64_t r, const T* xp, const T* inv, double shared_s) FASTVAE_LAMBDA_INLINE {
        const double sum = layout == ScaleLayout::kElement ? row_sum_element(xp, loc + r * D, s + r * D, D)
                                                           : row_sum_shared(xp, loc + r * D, inv, D) + shared_s;
        out[r] = T(-(sum + log2));
      });
}

// ds may be null (a fixed scale): then no deviation sums are formed.
template <typename T>
FASTVAE_INLINE void backward_rows(const T* g, const T* x, const T* loc, const T* s, ScaleLayout layout,
                                  int64_t K, int64_t P, int64_t D, int64_t p0, int64_t p1,
                                  const T* dim_inv, T* inv_row, T* a_row, double* dim_a,
                                  double& dim_g, T* dx, T* dloc, T* ds) {
  const bool shared = layout != ScaleLayout::kElement;
  T* a_acc = shared && ds ? a_row : nullptr;
  scale_backward_rows(
      x, dx, K, P, D, p0, p1, layout == ScaleLayout::kRow, dim_inv, inv_row, a_acc, dim_a, dim_g,
      [=](int64_t p, T* inv) FASTVAE_LAMBDA_INLINE { shared_inv_row(s + p * D, D, inv); },
      [=](int64_t r, const T* xp, const T* inv, T* dxp) FASTVAE_LAMBDA_INLINE {
        if (shared) {
          row_grad_shared(xp, loc + r * D, inv, g[r], D, dloc + r * D, a_acc, dxp);
        } else {
          row_grad_element(xp, loc + r * D, s + r * D, g[r], D, dloc + r * D, ds ? ds + r * D : nullptr, dxp);
        }
        return g[r];
      },
      [=](int64_t p, const T*, double g_sum) FASTVAE_LAMBDA_INLINE {
        for (int64_t d = 0; d < D; ++d) ds[p * D + d] = T(double(a_acc[d]) - g_sum);
      });
}

// The float32 entry points, ISA-cloned under names of their own (the
// overloads below call them), as gaussian_log_prob.cpp's.
FASTVAE_CLONES void forward_rows_f32(const float* x, const float* loc, const float* s,
                                     ScaleLayout layout, int64_t K, int64_t P, int64_t D, int64_t p0,
                                     int64_t p1, const float* dim_inv, double dim_sum_s,
                                     float* inv_row, float* out) {
  forward_rows<float>(x, loc, s, layout, K, P, D, p0, p1, dim_inv, dim_sum_s, inv_row, out);
}

FASTVAE_CLONES void backward_rows_f32(const float* g, const float* x, const float* loc, const float* s,
                                      ScaleLayout layout, int64_t K, int64_t P, int64_t D, int64_t p0,
                                      int64_t p1, const float* dim_inv, float* inv_row, float* a_row,
                                      double* dim_a, double& dim_g, float* dx, float* dloc,
                                      float* ds) {
  backward_rows<float>(g, x, loc, s, layout, K, P, D, p0, p1, dim_inv, inv_row, a_row, dim_a, dim_g,
                       dx, dloc, ds);
}

void forward_task(const float* x, const float* loc, const float* s, ScaleLayout layout, int64_t K,
                  int64_t P, int64_t D, int64_t p0, int64_t p1, const float* dim_inv,
                  double dim_sum_s, float* inv_row, float* out) {
  forward_rows_f32(x, loc, s, layout, K, P, D, p0, p1, dim_inv, dim_sum_s, inv_row, out);
}

void backward_task(const float* g, const float* x, const float* loc, const float* s,
                   ScaleLayout layout, int64_t K, int64_t P, int64_t D, int64_t p0, int64_t p1,
                   const float* dim_inv, float* inv_row, float* a_row, double* dim_a, double& dim_g,
                   float* dx, float* dloc, float* ds) {
  backward_rows_f32(g, x, loc, s, layout, K, P, D, p0, p1, dim_inv, inv_row, a_row, dim_a, dim_g, dx,
                    dloc, ds);
}

void forward_task(const double* x, const double* loc, const double* s, ScaleLayout layout, int64_t K,
                  int64_t P, int64_t D, int64_t p0, int64_t p1, const double* dim_inv,
                  double dim_sum_s, double* inv_row, double* out) {
  forward_rows<double>(x, loc, s, layout, K, P, D, p0, p1, dim_inv, dim_sum_s, inv_row, out);
}

void backward_task(const double* g, const double* x, const double* loc, const double* s,
                   ScaleLayout layout, int64_t K, int64_t P, int64_t D, int64_t p0, int64_t p1,
                   const double* dim_inv, double* inv_row, double* a_row, double* dim_a,
                   double& dim_g, double* dx, double* dloc, double* ds) {
  backward_rows<double>(g, x, loc, s, layout, K, P, D, p0, p1, dim_inv, inv_row, a_row, dim_a, dim_g,
                        dx, dloc, ds);
}

}  // namespace

template <typename T>
void laplace_log_prob_forward(const T* x, const T* loc, const T* s, ScaleLayout layout, int64_t K,
                              int64_t P, int64_t D, T* out, int n_threads) {
  // A per-dimension scale is turned into one 1/b row up front.
  std::vector<T> dim_inv(layout == ScaleLayout::kDim ? D : 0);
  double dim_sum_s = 0.0;
  if (layout == ScaleLayout::kDim) dim_sum_s = shared_inv_row(s, D, dim_inv.data());
  scale_forward_tasks<T>(P, D, kRowsPerTask, layout == ScaleLayout::kRow, n_threads,
                         [&](int64_t p0, int64_t p1, T* inv_row) {
                           forward_task(x, loc, s, layout, K, P, D, p0, p1, dim_inv.data(), dim_sum_s,
                                        inv_row, out);
                         });
}

template <typename T>
void laplace_log_prob_backward(const T* g, const T* x, const T* loc, const T* s,
                               ScaleLayout layout, int64_t K, int64_t P, int64_t D, T* dx, T* dloc,
                               T* ds, int n_threads) {
  const bool dim = layout == ScaleLayout::kDim;
  const bool dim_ds = dim && ds != nullptr;
  std::vector<T> dim_inv(dim ? D : 0);
  if (dim) shared_inv_row(s, D, dim_inv.data());
  scale_backward_tasks<T>(
      P, D, kRowsPerTask, layout == ScaleLayout::kRow, layout == ScaleLayout::kElement, dim_ds, n_threads,
      [&](int64_t p0, int64_t p1, T* inv_row, T* a_row, double* dim_a, double& dim_g) {
        backward_task(g, x, loc, s, layout, K, P, D, p0, p1, dim_inv.data(), inv_row, a_row, dim_a, dim_g,
                      dx, dloc, ds);
      },
      [&](const double* a, double G) {
        for (int64_t d = 0; d < D; ++d) ds[d] = T(a[d] - G);
      });
}

#define FASTVAE_LAPLACE_INSTANTIATE(T)                                                            \
  template void laplace_log_prob_forward<T>(const T*, const T*, const T*, ScaleLayout, int64_t,    \
                                            int64_t, int64_t, T*, int);                            \
  template void laplace_log_prob_backward<T>(const T*, const T*, const T*, const T*, ScaleLayout,  \
                                             int64_t, int64_t, int64_t, T*, T*, T*, int);
FASTVAE_LAPLACE_INSTANTIATE(float)
FASTVAE_LAPLACE_INSTANTIATE(double)
#undef FASTVAE_LAPLACE_INSTANTIATE

}  // namespace fastvae
