// Count likelihoods on the CPU: poisson_log_prob, negative_binomial_log_prob
// and zinb_log_prob share this header: the per-element math (lgamma and
// digamma of positive arguments, the NB normalizer in forms that stay exact as
// theta -> infinity), one templated row loop for the forward and one for the
// backward (the per-element formula is the template's CountKind), and the
// OpenMP drivers. count_log_prob.cpp instantiates them for each op in ISA-cloned
// entry points.
//
// Layout (fastvae/_likelihood_layout.py, fastvae/ops/count_log_prob/op.py): x is
// (P, D) counts broadcast over K; log_mean (the Poisson log rate) and
// zi_logits are (K, P, D); log_theta is (K, P, D) per element or (D,) per gene
// (scVI's dispersion), whose lgamma/digamma terms depend on (x, theta) only
// and are then computed once per x row and reused for all K samples. The
// result is (K, P). Counts get no gradient. A per-gene log_theta's gradient
// sums over every row in per-slab partial sums (rows.h), so its bits do not
// depend on the thread count.
//
// NB(x; mu, theta) with a = log mu - log theta (scvi-tools' log_nb_positive):
//   log p = -x softplus(-a) - theta softplus(a) + Dg(x, theta)
//   Dg = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
// theta softplus(a) is mu log1p(u)/u with u = e^a for a < 0 (-> mu as
// theta -> inf, never theta * 0), theta (a + log1p(e^-a)) otherwise. Dg is
// a difference of huge lgammas when theta or x is large; it is evaluated as
// - theta >= 10 and theta >= x + 1 ("Poisson side"): Dg - x log theta =
//   x q(x/theta) + (x - 1/2) log1p(x/theta) + S(x + theta) - S(theta) - lgamma(x + 1)
//   with q(t) = (log1p(t) - t)/t and S Stirling's correction, and the x log theta
//   folded into the x term: -x softplus(-a) + x log theta = x (log mu - softplus(a));
//   so the theta -> inf limit is x log mu - mu - lgamma(x + 1) with no cancellation;
// - x + 1 >= 10 > ... (x the large one): lgamma(y + b) - lgamma(y) with y = x + 1,
//   b = theta - 1, by Stirling: b log y + y log1pmx(b/y) + (b - 1/2) log1p(b/y)
//   + S(y + b) - S(y), then - lgamma(theta);
// - both small: the lgammas directly.
// x = 0 gives Dg = 0 exactly. The derivative in log theta has the same three
// regimes with digamma (theta (psi(x + theta) - psi(theta))).
// ZINB: x = 0: logsumexp(-softplus(-z), -softplus(z) - theta softplus(a));
//       x > 0: -softplus(z) + NB.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fastmath.h"
#include "ops.h"
#include "rows.h"

namespace fastvae {

enum class CountKind : int { kPoisson = 0, kNB = 1, kZINB = 2 };

// The inputs of one call. lt, zi: null where the kind has none.
template <typename T>
struct CountIn {
  const T* x;   // (P, D)
  const T* lm;  // (K, P, D): log mean, or the Poisson log rate
  const T* lt;  // (K, P, D), or (D,) when theta_dim
  const T* zi;  // (K, P, D)
  bool theta_dim;
  int64_t K, P, D;
};

// The gradients asked for (null: not wanted). dlt is (K, P, D), or (D,) when theta_dim.
template <typename T>
struct CountGrads {
  T* dlm;
  T* dlt;
  T* dzi;
};

// -- math of positive arguments ----------------------------------------------

FASTVAE_INLINE float log_pos_t(float v) { return fast_log_positive(v); }
FASTVAE_INLINE double log_pos_t(double v) { return std::log(v); }
FASTVAE_INLINE float log1p_unit_t(float t) { return fast_log1p_unit(t); }
FASTVAE_INLINE double log1p_unit_t(double t) { return std::log1p(t); }
// log1p(v) for v > -1 (Goldberg: log(u) v / (u - 1), u = 1 + v rounded).
FASTVAE_INLINE float log1p_any_t(float v) {
  const float u = 1.0f + v;
  const float du = u - 1.0f;
  return du == 0.0f ? v : fast_log_positive(u) * (v / (du == 0.0f ? 1.0f : du));
}
FASTVAE_INLINE double log1p_any_t(double v) { return std::log1p(v); }

// Stirling's correction S(z) = lgamma(z) - ((z - 1/2) log z - z + log(2 pi)/2), z >= 10
// (the next term, 691/(360360 z^11), is below 2e-14 there).
template <typename T>
FASTVAE_INLINE T stirling_corr(T z) {
  const T iz = T(1) / z;
  const T iz2 = iz * iz;
  return iz * (T(1.0 / 12) -
               iz2 * (T(1.0 / 360) - iz2 * (T(1.0 / 1260) - iz2 * (T(1.0 / 1680) - iz2 * T(1.0 / 1188)))));
}

// R(z) = log z - 1/(2z) - psi(z), z >= 10.
template <typename T>
FASTVAE_INLINE T digamma_corr(T z) {
  const T iz2 = T(1) / (z * z);
  return iz2 * (T(1.0 / 12) -
                iz2 * (T(1.0 / 120) - iz2 * (T(1.0 / 252) - iz2 * (T(1.0 / 240) - iz2 * T(1.0 / 132)))));
}

constexpr int kShift = 10;  // arguments below this are shifted up by the recurrences

// lgamma(z) for z > 0: shifted to w >= 10 by lgamma(z) = lgamma(w) - log(z (z+1) ... (w-1)),
// then Stirling. Branch-free (selects), so loops over it vectorize; no libm
// lgamma, whose signgam is a global that threads would race on.
template <typename T>
FASTVAE_INLINE T lgamma_pos(T z) {
  T w = z, prod = T(1);
  for (int i = 0; i < kShift; ++i) {
    const bool c = w < T(kShift);
    prod = c ? prod * w : prod;
    w = c ? w + T(1) : w;
  }
  return (w - T(0.5)) * log_pos_t(w) - w + T(0.91893853320467274178) + stirling_corr(w) - log_pos_t(prod);
}

// psi(z) for z > 0, the same way: psi(z) = psi(w) - sum 1/(z + i).
template <typename T>
FASTVAE_INLINE T digamma_pos(T z) {
  T w = z, acc = T(0);
  for (int i = 0; i < kShift; ++i) {
    const bool c = w < T(kShift);
    acc = c ? acc + T(1) / w : acc;
    w = c ? w + T(1) : w;
  }
  return log_pos_t(w) - T(0.5) / w - digamma_corr(w) - acc;
}

// (log1p(s) - s) / s^2 = -1/2 + s/3 - s^2/4 + ... for |s| < 0.1 (15 terms: below
// double rounding there).
template <typename T>
FASTVAE_INLINE T log1pmx_poly(T s) {
  T p = T(-1.0 / 16);
  for (int n = 15; n >= 2; --n) p = p * s + T((n % 2 ? 1.0 : -1.0) / n);
  return p;
}

// log1p(s) - s for s > -1, without the cancellation at small s.
template <typename T>
FASTVAE_INLINE T log1pmx(T s) {
  const bool small = std::fabs(s) < T(0.1);
  return small ? s * s * log1pmx_poly(s) : log1p_any_t(s) - s;
}

// q(t) = (log1p(t) - t) / t for t in [0, 1] (0 at t = 0).
template <typename T>
FASTVAE_INLINE T log1pmx_over(T t) {
  const bool small = t < T(0.1);
  return small ? t * log1pmx_poly(t) : (log1p_unit_t(t) - t) / (small ? T(1) : t);
}

// log1p(u)/u for u in [0, 1] (1 at u = 0): sum (-u)^n / (n + 1), n <= 12, below 0.05.
template <typename T>
FASTVAE_INLINE T log1p_over(T u, T log1p_u) {
  T p = T(1.0 / 13);
  for (int n = 12; n >= 1; --n) p = p * u + T((n % 2 ? 1.0 : -1.0) / n);
  const bool small = u < T(0.05);
  return small ? p : log1p_u / (small ? T(1) : u);
}

// 1/(1+u) - log1p(u)/u for u in [0, 1]: -u/2 + 2u^2/3 - ... below 0.05.
template <typename T>
FASTVAE_INLINE T sigmoid_minus_log1p_over(T u, T log1p_u) {
  T p = T(12.0 / 13);
  for (int n = 11; n >= 1; --n) p = p * (-u) + T(double(n) / (n + 1));
  const bool small = u < T(0.05);
  return small ? -u * p : T(1) / (T(1) + u) - log1p_u / (small ? T(1) : u);
}

// -- the NB pieces ----------------------------------------------------------------

// Whether (x, theta) is on the Poisson side (see the top of the file).
template <typename T>
FASTVAE_INLINE bool poisson_side(T x, T theta) { return theta >= T(10) && theta >= x + T(1); }

// Dg(x, theta), or Dg - x log theta on the Poisson side; 0 for x = 0.
template <typename T>
FASTVAE_INLINE T nb_lgamma_term(T x, T theta) {
  const T y = x + T(1);
  const T lg_y = lgamma_pos(y);
  const T lg_th = lgamma_pos(theta);
  // Poisson side: t = x/theta in [0, 1)
  const T t = x / theta;
  const T c1 = x * log1pmx_over(t) + (x - T(0.5)) * log1p_unit_t(std::min(t, T(1))) +
               stirling_corr(theta + x) - stirling_corr(std::max(theta, T(kShift))) - lg_y;
  // large x: lgamma(y + b) - lgamma(y) by Stirling, b = theta - 1 in (-1, y)
  const T yb = std::max(y, T(kShift));
  const T b = theta - T(1);
  const T s = b / yb;
  const T c2 = b * log_pos_t(yb) + yb * log1pmx(s) + (b - T(0.5)) * log1p_any_t(s) +
               stirling_corr(yb + b) - stirling_corr(yb) - lg_th;
  const T c3 = lgamma_pos(x + theta) - lg_th - lg_y;
  const T c = poisson_side(x, theta) ? c1 : (y >= T(kShift) ? c2 : c3);
  return x == T(0) ? T(0) : c;
}

// theta (psi(x + theta) - psi(theta)), minus x on the Poisson side; 0 for x = 0.
template <typename T>
FASTVAE_INLINE T nb_digamma_term(T x, T theta) {
  const T t = x / theta;
  const T th = std::max(theta, T(kShift));
  // theta * dcorr is O(x / theta): 0 when dcorr is, also for theta = inf (log theta
  // past the dtype's exp range, the Poisson limit), where the product is inf * 0
  const T dcorr = digamma_corr(th) - digamma_corr(th + x);
  const T e = x * log1pmx_over(std::min(t, T(1))) + x / (T(2) * (x + theta)) +
              (dcorr == T(0) ? T(0) : theta * dcorr);
  const T psi = theta * (digamma_pos(x + theta) - digamma_pos(theta));
  const T c = poisson_side(x, theta) ? e : psi;
  return x == T(0) ? T(0) : c;
}

// What one element's NB forward and backward share: a = lm - lt, u = e^-|a|,
// m = e^min(lm, lt) (mu where a < 0, theta where a >= 0).
template <typename T>
struct NbElement {
  T a, u, m, log1p_u;
  bool neg;
};

template <typename T>
FASTVAE_INLINE NbElement<T> nb_element(T lm, T lt) {
  NbElement<T> e;
  e.a = lm - lt;
  e.neg = e.a < T(0);
  e.u = exp_t(-std::fabs(e.a));
  e.m = exp_t(e.neg ? lm : lt);
  e.log1p_u = log1p_unit_t(e.u);
  return e;
}

// theta softplus(a): mu log1p(u)/u for a < 0 (-> mu as theta -> inf), theta softplus(a) else.
template <typename T>
FASTVAE_INLINE T nb_t1(const NbElement<T>& e) {
  return e.m * (e.neg ? log1p_over(e.u, e.log1p_u) : e.a + e.log1p_u);
}

// log NB without its lgamma term c (nb_lgamma_term); x = 0 gives -theta softplus(a) exactly.
template <typename T>
FASTVAE_INLINE T nb_value(T x, T lm, T theta, T c, const NbElement<T>& e) {
  const T pos_a = e.neg ? T(0) : e.a;
  const T neg_a = e.neg ? -e.a : T(0);
  const T xs = poisson_side(x, theta) ? x * (lm - pos_a - e.log1p_u) : -x * (neg_a + e.log1p_u);
  return (x == T(0) ? T(0) : xs) - nb_t1(e) + c;
}

// theta sigmoid(a) - theta softplus(a): d(-theta softplus(a))/d log theta.
template <typename T>
FASTVAE_INLINE T nb_v(const NbElement<T>& e) {
  const T inv = T(1) / (T(1) + e.u);
  return e.m * (e.neg ? sigmoid_minus_log1p_over(e.u, e.log1p_u) : inv - e.a - e.log1p_u);
}

// d log NB / d log mu = x sigmoid(-a) - theta sigmoid(a).
template <typename T>
FASTVAE_INLINE T nb_dlm(T x, const NbElement<T>& e) {
  const T inv = T(1) / (T(1) + e.u);
  const T sig_neg_a = e.neg ? inv : e.u * inv;
  return (x == T(0) ? T(0) : x * sig_neg_a) - e.m * inv;
}

// d log NB / d log theta, given dc = nb_digamma_term(x, theta).
template <typename T>
FASTVAE_INLINE T nb_dlt(T x, T theta, T dc, const NbElement<T>& e) {
  const T inv = T(1) / (T(1) + e.u);
  const T sig_a = e.neg ? e.u * inv : inv;
  const T sig_neg_a = e.neg ? inv : e.u * inv;
  const T xs = poisson_side(x, theta) ? x * sig_a : -x * sig_neg_a;
  return (x == T(0) ? T(0) : xs) + nb_v(e) + dc;
}

// softplus(z), softplus(-z), sigmoid(z) and sigmoid(-z) from one exp and one
// log1p: the zero-inflation logit's four functions (each alone would cost its own).
template <typename T>
struct LogitParts {
  T sp, sp_neg, sig, sig_neg;
};

template <typename T>
FASTVAE_INLINE LogitParts<T> logit_parts(T z) {
  const T e = exp_t(-std::fabs(z));
  const T l = log1p_unit_t(e);
  const T inv = T(1) / (T(1) + e);
  const bool pos = z >= T(0);
  return {(pos ? z : T(0)) + l, (pos ? T(0) : -z) + l, pos ? inv : e * inv, pos ? e * inv : inv};
}

// logsumexp of two terms, -inf when both are.
template <typename T>
FASTVAE_INLINE T logaddexp_t(T p, T q) {
  const T mx = std::max(p, q);
  const T d = -std::fabs(p - q);
  const T r = mx + log1p_unit_t(exp_t(d == d ? d : T(0)));
  return mx == -T(INFINITY) ? mx : r;
}

// -- the row loops ------------------------------------------------------------------

constexpr int64_t kCountRowsPerTask = 16;
constexpr int64_t kCountBlock = 256;  // elements per vector block (stack buffer)

// out[k, p] for x rows [p0, p1). scratch: 2 D values (the per-gene rows of
// the lgamma term and theta), used when theta is per gene.
template <CountKind Kd, typename T>
FASTVAE_INLINE void count_forward_rows(const CountIn<T>& in, int64_t p0, int64_t p1, T* scratch, T* out) {
  const int64_t K = in.K, P = in.P, D = in.D;
  T* crow = scratch;
  T* th_row = scratch + D;
  for (int64_t p = p0; p < p1; ++p) {
    const T* xp = in.x + p * D;
    double row_const = 0.0;
    if constexpr (Kd == CountKind::kPoisson) {  // -sum_d lgamma(x + 1), once per x row
      for (int64_t d = 0; d < D; ++d) row_const -= double(xp[d] == T(0) ? T(0) : lgamma_pos(xp[d] + T(1)));
    } else if (in.theta_dim) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const T theta = exp_t(in.lt[d]);
        th_row[d] = theta;
        crow[d] = nb_lgamma_term(xp[d], theta);
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = k * P + p;
      const T* lm = in.lm + r * D;
      const T* lt = Kd == CountKind::kPoisson ? nullptr : (in.theta_dim ? in.lt : in.lt + r * D);
      const T* zi = Kd == CountKind::kZINB ? in.zi + r * D : nullptr;
      if constexpr (Kd != CountKind::kPoisson) {
        // theta per element: its row of theta and lgamma terms first, in a loop of
        // its own, so that the main loop below reads rows in either layout (a
        // select between the two would evaluate the lgammas for every element)
        if (!in.theta_dim) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            const T theta = exp_t(lt[d]);
            th_row[d] = theta;
            crow[d] = nb_lgamma_term(xp[d], theta);
          }
        }
      }
      double acc = 0.0;
      T t[kCountBlock];
      for (int64_t d0 = 0; d0 < D; d0 += kCountBlock) {
        const int64_t n = std::min(kCountBlock, D - d0);
        if constexpr (Kd == CountKind::kPoisson) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const T x = xp[d0 + i], l = lm[d0 + i];
            t[i] = (x == T(0) ? T(0) : x * l) - exp_t(l);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const int64_t d = d0 + i;
            const T x = xp[d];
            const NbElement<T> e = nb_element(lm[d], lt[d]);
            const T nb = nb_value(x, lm[d], th_row[d], crow[d], e);
            if constexpr (Kd == CountKind::kZINB) {
              const T z = zi[d];
              const LogitParts<T> zp = logit_parts(z);
              const T zero = logaddexp_t(-zp.sp_neg, -zp.sp - nb_t1(e));
              t[i] = x == T(0) ? zero : nb - zp.sp;
            } else {
              t[i] = nb;
            }
          }
        }
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; ++i) acc += double(t[i]);
      }
      out[r] = T(acc + row_const);
    }
  }
}

// Gradients for x rows [p0, p1). scratch: 6 D values; dim_acc: the slab's
// per-gene dlt partial sums (D doubles), when theta is per gene and dlt wanted.
template <CountKind Kd, typename T>
FASTVAE_INLINE void count_backward_rows(const CountIn<T>& in, const T* g, const CountGrads<T>& gr, int64_t p0,
                                        int64_t p1, T* scratch, double* dim_acc) {
  const int64_t K = in.K, P = in.P, D = in.D;
  T* dcrow = scratch;
  T* th_row = scratch + D;
  T* arow = scratch + 2 * D;
  // Gradients not asked for are written to these rows and dropped: the element
  // loop then stores unconditionally, and a conditional store in it kept GCC
  // from vectorizing the NB backward ("control flow in loop").
  T* sink = scratch + 3 * D;
  const bool want_lt = gr.dlt != nullptr;
  for (int64_t p = p0; p < p1; ++p) {
    const T* xp = in.x + p * D;
    if (Kd != CountKind::kPoisson && in.theta_dim) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const T theta = exp_t(in.lt[d]);
        th_row[d] = theta;
        dcrow[d] = want_lt ? nb_digamma_term(xp[d], theta) : T(0);
        arow[d] = T(0);
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = k * P + p;
      const T gk = g[r];
      const T* lm = in.lm + r * D;
      T* dlm = gr.dlm ? gr.dlm + r * D : sink;
      if constexpr (Kd == CountKind::kPoisson) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dlm[d] = gk * (xp[d] - exp_t(lm[d]));
        continue;
      }
      const T* lt = in.theta_dim ? in.lt : in.lt + r * D;
      const T* zi = Kd == CountKind::kZINB ? in.zi + r * D : nullptr;
      T* dlt = want_lt && !in.theta_dim ? gr.dlt + r * D : sink + D;
      T* dzi = Kd == CountKind::kZINB && gr.dzi ? gr.dzi + r * D : sink + 2 * D;
      if (!in.theta_dim && want_lt) {  // as in the forward: the digamma row in a loop of its own
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const T theta = exp_t(lt[d]);
          th_row[d] = theta;
          dcrow[d] = nb_digamma_term(xp[d], theta);
        }
      } else if (!in.theta_dim) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          th_row[d] = exp_t(lt[d]);
          dcrow[d] = T(0);
        }
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const T x = xp[d];
        const T theta = th_row[d];
        const NbElement<T> e = nb_element(lm[d], lt[d]);
        T gm = nb_dlm(x, e);
        const T gt_nb = nb_dlt(x, theta, dcrow[d], e);  // unused (0 * ...) when !want_lt
        T gt = want_lt ? gt_nb : T(0);
        if constexpr (Kd == CountKind::kZINB) {
          // x = 0: log(pi + (1 - pi) NB(0)) with weight w = sigmoid(B - A) on the NB branch
          const T z = zi[d];
          const LogitParts<T> zp = logit_parts(z);
          const T lpi = -zp.sp_neg;
          const T lnb0 = -zp.sp - nb_t1(e);
          T dd = lpi - lnb0;
          dd = dd == dd ? dd : T(0);
          const T ed = exp_t(-std::fabs(dd));  // sigmoid(dd) and w = sigmoid(-dd) from one exp
          const T inv_d = T(1) / (T(1) + ed);
          const T sig_d = dd >= T(0) ? inv_d : ed * inv_d;
          const T w = dd >= T(0) ? ed * inv_d : inv_d;
          const T gz = x == T(0) ? sig_d * zp.sig_neg - w * zp.sig : -zp.sig;
          dzi[d] = gk * gz;
          gm = x == T(0) ? -w * (e.m / (T(1) + e.u)) : gm;
          gt = x == T(0) ? w * nb_v(e) : gt;
        }
        dlm[d] = gk * gm;
        dlt[d] = gk * gt;
        arow[d] += gk * gt;  // read only when theta is per gene (zeroed per x row then)
      }
    }
    if (Kd != CountKind::kPoisson && want_lt && in.theta_dim) {
      for (int64_t d = 0; d < D; ++d) dim_acc[d] += double(arow[d]);
    }
  }
}

// -- OpenMP drivers --------------------------------------------------------------

template <typename T>
using CountForwardTask = void (*)(const CountIn<T>&, int64_t, int64_t, T*, T*);
template <typename T>
using CountBackwardTask = void (*)(const CountIn<T>&, const T*, const CountGrads<T>&, int64_t, int64_t, T*,
                                   double*);

template <typename T>
void count_forward(const CountIn<T>& in, T* out, int n_threads, CountForwardTask<T> task) {
  const int64_t tasks = (in.P + kCountRowsPerTask - 1) / kCountRowsPerTask;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> scratch(size_t(2 * in.D));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t p0 = t * kCountRowsPerTask;
      task(in, p0, std::min(in.P, p0 + kCountRowsPerTask), scratch.data(), out);
    }
  }
}

// A per-gene dlt sums over every row: each slab of tasks (rows.h) keeps its own
// partial sums, added in slab order afterwards.
template <typename T>
void count_backward(const CountIn<T>& in, const T* g, const CountGrads<T>& gr, int n_threads,
                    CountBackwardTask<T> task) {
  const int64_t tasks = (in.P + kCountRowsPerTask - 1) / kCountRowsPerTask;
  const int64_t slabs = slab_count(tasks);
  const bool dim_dlt = in.theta_dim && gr.dlt != nullptr;
  std::vector<double> dim_acc(dim_dlt ? size_t(slabs * in.D) : 0, 0.0);
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> scratch(size_t(6 * in.D));
#pragma omp for schedule(static)
    for (int64_t sl = 0; sl < slabs; ++sl) {
      double* acc = dim_dlt ? dim_acc.data() + size_t(sl * in.D) : nullptr;
      for (int64_t t = slab_begin(tasks, slabs, sl); t < slab_begin(tasks, slabs, sl + 1); ++t) {
        const int64_t p0 = t * kCountRowsPerTask;
        task(in, g, gr, p0, std::min(in.P, p0 + kCountRowsPerTask), scratch.data(), acc);
      }
    }
  }
  if (dim_dlt) {
    for (int64_t d = 0; d < in.D; ++d) {
      double s = 0.0;
      for (int64_t sl = 0; sl < slabs; ++sl) s += dim_acc[size_t(sl * in.D + d)];
      gr.dlt[d] = T(s);
    }
  }
}

// The entry points of the three ops (float and double; defined in count_log_prob.cpp).
template <typename T>
void poisson_log_prob_forward(const CountIn<T>& in, T* out, int n_threads);
template <typename T>
void poisson_log_prob_backward(const CountIn<T>& in, const T* g, const CountGrads<T>& gr, int n_threads);
template <typename T>
void negative_binomial_log_prob_forward(const CountIn<T>& in, T* out, int n_threads);
template <typename T>
void negative_binomial_log_prob_backward(const CountIn<T>& in, const T* g, const CountGrads<T>& gr,
                                         int n_threads);
template <typename T>
void zinb_log_prob_forward(const CountIn<T>& in, T* out, int n_threads);
template <typename T>
void zinb_log_prob_backward(const CountIn<T>& in, const T* g, const CountGrads<T>& gr, int n_threads);

// One op's instantiations: ISA-cloned float32 row loops, double row loops, and
// the entry points above (used by count_log_prob.cpp with each op's name).
#define FASTVAE_COUNT_OP(name, kind)                                                                   \
  namespace {                                                                                          \
  FASTVAE_CLONES void name##_forward_rows_f32(const CountIn<float>& in, int64_t p0, int64_t p1,       \
                                               float* scratch, float* out) {                           \
    count_forward_rows<kind, float>(in, p0, p1, scratch, out);                                         \
  }                                                                                                    \
  FASTVAE_CLONES void name##_backward_rows_f32(const CountIn<float>& in, const float* g,              \
                                                const CountGrads<float>& gr, int64_t p0, int64_t p1,   \
                                                float* scratch, double* acc) {                         \
    count_backward_rows<kind, float>(in, g, gr, p0, p1, scratch, acc);                                 \
  }                                                                                                    \
  void name##_forward_rows_f64(const CountIn<double>& in, int64_t p0, int64_t p1, double* scratch,    \
                               double* out) {                                                          \
    count_forward_rows<kind, double>(in, p0, p1, scratch, out);                                        \
  }                                                                                                    \
  void name##_backward_rows_f64(const CountIn<double>& in, const double* g,                           \
                                const CountGrads<double>& gr, int64_t p0, int64_t p1, double* scratch, \
                                double* acc) {                                                         \
    count_backward_rows<kind, double>(in, g, gr, p0, p1, scratch, acc);                                \
  }                                                                                                    \
  }                                                                                                    \
  template <>                                                                                          \
  void name##_forward<float>(const CountIn<float>& in, float* out, int n_threads) {                    \
    count_forward<float>(in, out, n_threads, name##_forward_rows_f32);                                 \
  }                                                                                                    \
  template <>                                                                                          \
  void name##_forward<double>(const CountIn<double>& in, double* out, int n_threads) {                 \
    count_forward<double>(in, out, n_threads, name##_forward_rows_f64);                                \
  }                                                                                                    \
  template <>                                                                                          \
  void name##_backward<float>(const CountIn<float>& in, const float* g, const CountGrads<float>& gr,  \
                              int n_threads) {                                                         \
    count_backward<float>(in, g, gr, n_threads, name##_backward_rows_f32);                             \
  }                                                                                                    \
  template <>                                                                                          \
  void name##_backward<double>(const CountIn<double>& in, const double* g,                            \
                               const CountGrads<double>& gr, int n_threads) {                         \
    count_backward<double>(in, g, gr, n_threads, name##_backward_rows_f64);                            \
  }

}  // namespace fastvae
