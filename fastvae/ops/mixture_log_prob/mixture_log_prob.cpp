// mixture_log_prob on the CPU: out[n] = logsumexp_u term[n, u] with
//   term[n, u] = c[u] - 0.5 * sum_l (z[n, l] - means[u, l])^2 * inv_var[u, l],
//   c[u] = log_softmax(logits)[u] - 0.5 * sum_l (logvars[u, l] + log 2 pi),
// from direct differences (the expanded z^2 - 2 z m + m^2 form cancels
// catastrophically when inv_var is large), and its gradient.
//
// Per call, the components are prepared once (O(U * L)): c in double, and
// means and inv_var transposed to (L, Up) with U padded to a multiple of
// kTile (padding: mean 0, inv_var 0, c = -inf, so a padded term is -inf and
// its weight exactly 0). The hot loop takes kRows rows of z against kTile
// components: acc[r][u] += (z[r][l] - mT[l][u])^2 * ivT[l][u] over l, a
// register tile that GCC vectorizes over u. Rows stream over components in
// chunks of kChunk with a running (max, sumexp) state, so a thread holds
// kRows x kChunk terms at a time, never a row's U terms.
//
// The backward recomputes the terms of a chunk, w = exp(term - out), and
// adds the chunk's contributions: dz[r] -= g w t, dmeans[u] += g w t and
// dlogvars[u] += g w t d (halved, minus sum g w, at the end), with
// d = z - means[u] and t = d * inv_var[u], vectorized over l; components
// whose weight underflowed to 0 for all kRows rows are skipped.
#include "mixture_log_prob.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastmath.h"  // exp_t
#include "ops.h"       // FASTVAE_CLONES, FASTVAE_INLINE
#include "rows.h"      // slab_count, slab_begin

namespace fastvae {
namespace {

constexpr int64_t kRows = 4;      // rows of z per register tile
constexpr int64_t kTile = 16;     // components per register tile
constexpr int64_t kChunk = 64;    // components per streaming step (a multiple of kTile)
constexpr int64_t kRowsPerTask = 32;  // rows per OpenMP work item (a multiple of kRows)

template <typename T>
struct Components {
  int64_t U, L, Up;
  const T* means;          // (U, L), the caller's
  std::vector<T> mT, ivT;  // (L, Up): transposed, padded
  std::vector<T> iv;       // (U, L)
  std::vector<T> c;        // (Up,), -inf past U
  std::vector<double> softmax;  // (U,)

  Components(const T* means_, const T* logvars, const T* logits, int64_t U_, int64_t L_)
      : U(U_), L(L_), Up((U_ + kTile - 1) / kTile * kTile), means(means_) {
    mT.assign(size_t(L * Up), T(0));
    ivT.assign(size_t(L * Up), T(0));
    iv.resize(size_t(std::max<int64_t>(1, U * L)));  // never empty: no null base pointers at L = 0
    c.assign(size_t(Up), -std::numeric_limits<T>::infinity());
    softmax.resize(size_t(U));
    // log_softmax in double: max-shifted, so any finite logits work
    double lmax = -std::numeric_limits<double>::infinity();
    if (logits != nullptr) {
      for (int64_t u = 0; u < U; ++u) lmax = std::max(lmax, double(logits[u]));
    }
    double lsum = 0.0;
    if (logits != nullptr) {
      for (int64_t u = 0; u < U; ++u) lsum += std::exp(double(logits[u]) - lmax);
    }
    const double log_norm = logits != nullptr ? lmax + std::log(lsum) : std::log(double(U));
    const double half_log_2pi = 0.5 * std::log(2.0 * M_PI);
    for (int64_t u = 0; u < U; ++u) {
      const double lsm = logits != nullptr ? double(logits[u]) - log_norm : -log_norm;
      softmax[size_t(u)] = std::exp(lsm);
      double half_lv = 0.0;
      for (int64_t l = 0; l < L; ++l) {
        const T lv = logvars[u * L + l];
        const T inv = std::exp(-lv);
        half_lv += 0.5 * double(lv);
        iv[size_t(u * L + l)] = inv;
        ivT[size_t(l * Up + u)] = inv;
        mT[size_t(l * Up + u)] = means_[u * L + l];
      }
      c[size_t(u)] = static_cast<T>(lsm - half_lv - double(L) * half_log_2pi);
    }
  }
};

// terms[r][u] = c[u] - 0.5 * sum_l (z_r[l] - mT[l][u])^2 ivT[l][u] for the n
// components from u0 (n a multiple of kTile, at most kChunk) and the kRows rows z_r.
template <typename T>
FASTVAE_INLINE void chunk_terms(const T* const* zr, const T* __restrict mT,
                                const T* __restrict ivT, const T* __restrict c, int64_t Up,
                                int64_t L, int64_t u0, int64_t n, T (*__restrict terms)[kChunk]) {
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    T acc[kRows][kTile] = {};
    for (int64_t l = 0; l < L; ++l) {
      const T* __restrict m = mT + l * Up + u0 + t0;
      const T* __restrict iv = ivT + l * Up + u0 + t0;
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRows; ++r) {
        const T zl = zr[r][l];
#pragma omp simd
        for (int64_t u = 0; u < kTile; ++u) {
          const T d = zl - m[u];
          acc[r][u] += d * d * iv[u];
        }
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
      for (int64_t u = 0; u < kTile; ++u) terms[r][t0 + u] = c[u0 + t0 + u] - T(0.5) * acc[r][u];
    }
  }
}

// One chunk of the streaming log-sum-exp of a row: (mx, sum) is the running
// state, sum = sum_u exp(term_u - shift), shift = mx when finite, else 0.
template <typename T>
FASTVAE_INLINE void lse_update(const T* __restrict t, int64_t n, T& mx, T& sum) {
  T bmax = -std::numeric_limits<T>::infinity();
  for (int64_t u = 0; u < n; ++u) bmax = t[u] > bmax ? t[u] : bmax;  // NaN ignored
  const T new_max = bmax > mx ? bmax : mx;
  const T old_shift = std::isinf(mx) ? T(0) : mx;
  const T shift = std::isinf(new_max) ? T(0) : new_max;
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t u = 0; u < n; ++u) s += exp_t(t[u] - shift);
  // an empty state (sum 0) is not rescaled: exp(old - new) may overflow there
  sum = (sum == T(0) ? T(0) : sum * exp_t(old_shift - shift)) + s;
  mx = new_max;
}

// The forward of one task: rows t0 .. t0 + nt (nt <= kRowsPerTask). Components
// are the outer loop, so a chunk's means and inverse variances stay in L1
// while the task's row groups stream past them; each row keeps its state.
template <typename T>
FASTVAE_INLINE void forward_task(const T* z, const Components<T>& cp, int64_t t0, int64_t nt,
                                 T* out) {
  T mx[kRowsPerTask], sum[kRowsPerTask];
  for (int64_t r = 0; r < kRowsPerTask; ++r) {
    mx[r] = -std::numeric_limits<T>::infinity();
    sum[r] = T(0);
  }
  T terms[kRows][kChunk];
  for (int64_t u0 = 0; u0 < cp.Up; u0 += kChunk) {
    const int64_t n = std::min(kChunk, cp.Up - u0);
    // padded components are left out (their 0 * inf for an inf z would be NaN)
    const int64_t n_real = std::min(n, cp.U - u0);
    for (int64_t g0 = 0; g0 < nt; g0 += kRows) {
      const int64_t nr = std::min(kRows, nt - g0);
      const T* zr[kRows];
      for (int64_t r = 0; r < kRows; ++r) zr[r] = z + (t0 + g0 + std::min(r, nr - 1)) * cp.L;
      chunk_terms(zr, cp.mT.data(), cp.ivT.data(), cp.c.data(), cp.Up, cp.L, u0, n, terms);
      for (int64_t r = 0; r < nr; ++r) lse_update(terms[r], n_real, mx[g0 + r], sum[g0 + r]);
    }
  }
  for (int64_t r = 0; r < nt; ++r) {
    const T shift = std::isinf(mx[r]) ? T(0) : mx[r];
    // sum 0: every term -inf (or the max +inf, which the sum carries as inf/NaN)
    out[t0 + r] = sum[r] == T(0) ? -std::numeric_limits<T>::infinity() : shift + std::log(sum[r]);
  }
}

FASTVAE_CLONES void forward_task_f32(const float* z, const Components<float>& cp, int64_t t0,
                                     int64_t nt, float* out) {
  forward_task(z, cp, t0, nt, out);
}
void forward_task_any(const float* z, const Components<float>& cp, int64_t t0, int64_t nt,
                      float* out) {
  forward_task_f32(z, cp, t0, nt, out);
}
void forward_task_any(const double* z, const Components<double>& cp, int64_t t0, int64_t nt,
                      double* out) {
  forward_task(z, cp, t0, nt, out);
}

// The backward of one task, rows t0 .. t0 + nt: dz rows into dzb
// (kRowsPerTask x L, zeroed by the caller) when DZ; the thread's sums over
// rows of g w t and g w t d into dm, dlv (U, L) when PARAMS, and of g w into
// sgw (U,) always. Components outer, as in the forward: a chunk's parameters
// and accumulators stay in L1 for the task's row groups.
template <typename T, bool DZ, bool PARAMS>
FASTVAE_INLINE void backward_task(const T* g, const T* z, const T* out, const Components<T>& cp,
                                  int64_t t0, int64_t nt, const T* zeros, T* __restrict dzb,
                                  T* __restrict dm, T* __restrict dlv, T* __restrict sgw) {
  const int64_t L = cp.L;
  const T* zr_all[kRowsPerTask];
  T gr[kRowsPerTask], outr[kRowsPerTask];
  for (int64_t r = 0; r < kRowsPerTask; ++r) {
    // rows past nt and rows whose out is -inf (every term -inf) weigh nothing,
    // and read zeros: their z may be inf, and 0 * inf would be NaN
    const bool live = r < nt && !(std::isinf(out[t0 + r]) && out[t0 + r] < T(0));
    zr_all[r] = live ? z + (t0 + r) * L : zeros;
    gr[r] = live ? g[t0 + r] : T(0);
    outr[r] = live ? out[t0 + r] : T(0);
  }
  T terms[kRows][kChunk];
  for (int64_t u0 = 0; u0 < cp.Up; u0 += kChunk) {
    const int64_t n = std::min(kChunk, cp.Up - u0);
    const int64_t u1 = std::min(cp.U, u0 + kChunk);
    for (int64_t g0 = 0; g0 < nt; g0 += kRows) {
      const T* const* zr = zr_all + g0;
      chunk_terms(zr, cp.mT.data(), cp.ivT.data(), cp.c.data(), cp.Up, L, u0, n, terms);
      for (int64_t r = 0; r < kRows; ++r) {
        const T gg = gr[g0 + r], o = outr[g0 + r];
#pragma omp simd
        for (int64_t u = 0; u < n; ++u) terms[r][u] = gg == T(0) ? T(0) : gg * exp_t(terms[r][u] - o);
      }
      for (int64_t u = u0; u < u1; ++u) {
        const T w0 = terms[0][u - u0], w1 = terms[1][u - u0], w2 = terms[2][u - u0],
                w3 = terms[3][u - u0];
        sgw[u] += (w0 + w1) + (w2 + w3);
        if (!DZ && !PARAMS) continue;
        if (w0 == T(0) && w1 == T(0) && w2 == T(0) && w3 == T(0)) continue;
        const T* __restrict m = cp.means + u * L;
        const T* __restrict iv = cp.iv.data() + u * L;
        const T *__restrict z0 = zr[0], *__restrict z1 = zr[1], *__restrict z2 = zr[2],
                *__restrict z3 = zr[3];
        // the rows' dz (DZ) and the component's dmeans and dlogvars (PARAMS)
        T *__restrict d0 = DZ ? dzb + g0 * L : nullptr, *__restrict d1 = DZ ? d0 + L : nullptr,
          *__restrict d2 = DZ ? d0 + 2 * L : nullptr, *__restrict d3 = DZ ? d0 + 3 * L : nullptr;
        T* __restrict dmu = PARAMS ? dm + u * L : nullptr;
        T* __restrict dlvu = PARAMS ? dlv + u * L : nullptr;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          const T e0 = z0[l] - m[l], e1 = z1[l] - m[l], e2 = z2[l] - m[l], e3 = z3[l] - m[l];
          const T t0_ = w0 * e0 * iv[l], t1 = w1 * e1 * iv[l], t2 = w2 * e2 * iv[l],
                  t3 = w3 * e3 * iv[l];
          if (DZ) {
            d0[l] -= t0_;
            d1[l] -= t1;
            d2[l] -= t2;
            d3[l] -= t3;
          }
          if (PARAMS) {
            dmu[l] += (t0_ + t1) + (t2 + t3);
            dlvu[l] += (t0_ * e0 + t1 * e1) + (t2 * e2 + t3 * e3);
          }
        }
      }
    }
  }
}

#define FASTVAE_MIX_BWD(DZ, PARAMS, NAME)                                                      \
  FASTVAE_CLONES void NAME(const float* g, const float* z, const float* out,                     \
                           const Components<float>& cp, int64_t t0, int64_t nt,                  \
                           const float* zeros, float* dzb, float* dm, float* dlv, float* sgw) {  \
    backward_task<float, DZ, PARAMS>(g, z, out, cp, t0, nt, zeros, dzb, dm, dlv, sgw);          \
  }
FASTVAE_MIX_BWD(true, true, backward_task_f32_all)
FASTVAE_MIX_BWD(true, false, backward_task_f32_dz)
FASTVAE_MIX_BWD(false, true, backward_task_f32_params)
FASTVAE_MIX_BWD(false, false, backward_task_f32_weights)
#undef FASTVAE_MIX_BWD

void backward_task_any(bool dz, bool params, const float* g, const float* z, const float* out,
                       const Components<float>& cp, int64_t t0, int64_t nt, const float* zeros,
                       float* dzb, float* dm, float* dlv, float* sgw) {
  if (dz && params) return backward_task_f32_all(g, z, out, cp, t0, nt, zeros, dzb, dm, dlv, sgw);
  if (dz) return backward_task_f32_dz(g, z, out, cp, t0, nt, zeros, dzb, dm, dlv, sgw);
  if (params) return backward_task_f32_params(g, z, out, cp, t0, nt, zeros, dzb, dm, dlv, sgw);
  backward_task_f32_weights(g, z, out, cp, t0, nt, zeros, dzb, dm, dlv, sgw);
}
void backward_task_any(bool dz, bool params, const double* g, const double* z, const double* out,
                       const Components<double>& cp, int64_t t0, int64_t nt, const double* zeros,
                       double* dzb, double* dm, double* dlv, double* sgw) {
  if (dz && params) return backward_task<double, true, true>(g, z, out, cp, t0, nt, zeros, dzb, dm, dlv, sgw);
  if (dz) return backward_task<double, true, false>(g, z, out, cp, t0, nt, zeros, dzb, dm, dlv, sgw);
  if (params) return backward_task<double, false, true>(g, z, out, cp, t0, nt, zeros, dzb, dm, dlv, sgw);
  backward_task<double, false, false>(g, z, out, cp, t0, nt, zeros, dzb, dm, dlv, sgw);
}

}  // namespace

template <typename T>
void mixture_log_prob_forward(const T* z, const T* means, const T* logvars, const T* logits,
                              int64_t N, int64_t U, int64_t L, T* out, int n_threads) {
  if (N == 0) return;
  const Components<T> cp(means, logvars, logits, U, L);
  const int64_t n_tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t t0 = task * kRowsPerTask;
    forward_task_any(z, cp, t0, std::min(kRowsPerTask, N - t0), out);
  }
}

template <typename T>
void mixture_log_prob_backward(const T* g, const T* z, const T* means, const T* logvars,
                               const T* logits, const T* out, int64_t N, int64_t U, int64_t L,
                               T* dz, T* dmeans, T* dlogvars, T* dlogits, int n_threads) {
  const bool need_dz = dz != nullptr;
  const bool params = dmeans != nullptr || dlogvars != nullptr;
  const bool weights = params || dlogits != nullptr;  // sums over rows wanted
  const Components<T> cp(means, logvars, logits, U, L);
  const int64_t UL = U * L;
  const int64_t n_tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  // per slab of tasks (rows.h): dm (U, L), dlv (U, L), sgw (U,), summed in slab
  // order below, so the bits do not depend on the thread count
  const int64_t slabs = slab_count(n_tasks);
  const int64_t team = std::max<int64_t>(1, std::min<int64_t>(n_threads, slabs));
  const int64_t stride = (params ? 2 * UL : 0) + U;
  std::vector<T> partial(size_t(weights ? slabs * stride : 0), T(0));
  std::vector<double> gsum(size_t(slabs), 0.0);
  if (N > 0 && (need_dz || weights)) {
#pragma omp parallel num_threads(int(team))
    {
      std::vector<T> dzb(size_t(kRowsPerTask * std::max<int64_t>(L, 1)));
      const std::vector<T> zeros(size_t(std::max<int64_t>(L, 1)), T(0));  // the z of a dead row
      std::vector<T> scratch(weights ? 0 : size_t(U));  // sgw when nothing is summed
#pragma omp for schedule(static)
      for (int64_t sl = 0; sl < slabs; ++sl) {
        T* base = weights ? partial.data() + sl * stride : nullptr;
        T* dm = params ? base : nullptr;
        T* dlv = params ? base + UL : nullptr;
        T* sgw = weights ? base + (params ? 2 * UL : 0) : scratch.data();
        double gs = 0.0;
        for (int64_t task = slab_begin(n_tasks, slabs, sl); task < slab_begin(n_tasks, slabs, sl + 1); ++task) {
          const int64_t t0 = task * kRowsPerTask, nt = std::min(kRowsPerTask, N - t0);
          if (need_dz) std::fill(dzb.begin(), dzb.end(), T(0));
          backward_task_any(need_dz, params, g, z, out, cp, t0, nt, zeros.data(), dzb.data(), dm, dlv,
                            sgw);
          for (int64_t r = 0; r < nt; ++r) gs += double(g[t0 + r]);
          if (need_dz) std::copy(dzb.begin(), dzb.begin() + nt * L, dz + t0 * L);
        }
        gsum[size_t(sl)] = gs;
      }
    }
  }
  if (!weights) return;
  double g_total = 0.0;
  for (double v : gsum) g_total += v;
  for (int64_t u = 0; u < U; ++u) {
    T s = 0;
    for (int64_t t = 0; t < slabs; ++t) s += partial[size_t(t * stride + (params ? 2 * UL : 0) + u)];
    if (dlogits != nullptr) dlogits[u] = static_cast<T>(double(s) - cp.softmax[size_t(u)] * g_total);
    if (!params) continue;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i = u * L + l;
      T a = 0, b = 0;
      for (int64_t t = 0; t < slabs; ++t) {
        a += partial[size_t(t * stride + i)];
        b += partial[size_t(t * stride + UL + i)];
      }
      if (dmeans != nullptr) dmeans[i] = a;
      if (dlogvars != nullptr) dlogvars[i] = T(0.5) * (b - s);
    }
  }
}

template void mixture_log_prob_forward<float>(const float*, const float*, const float*,
                                              const float*, int64_t, int64_t, int64_t, float*, int);
template void mixture_log_prob_forward<double>(const double*, const double*, const double*,
                                               const double*, int64_t, int64_t, int64_t, double*,
                                               int);
template void mixture_log_prob_backward<float>(const float*, const float*, const float*,
                                               const float*, const float*, const float*, int64_t,
                                               int64_t, int64_t, float*, float*, float*, float*,
                                               int);
template void mixture_log_prob_backward<double>(const double*, const double*, const double*,
                                                const double*, const double*, const double*,
                                                int64_t, int64_t, int64_t, double*, double*,
                                                double*, double*, int);

}  // namespace fastvae
