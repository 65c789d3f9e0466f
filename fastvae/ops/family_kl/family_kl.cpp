// family_kl on the CPU: the closed-form KL of a latent family against a prior
// of the same family (the Kumaraswamy's against a Beta) per element, summed
// over L or not, and its gradients, each in one pass over flat blocks of
// elements (as kl_normal.cpp: a loop per short row never fills a vector). The
// formulas are the oracle's (fastvae/ops/family_kl/__init__.py) in forms that
// stay finite where the KL is: no scale is exponentiated alone where a ratio
// of scales is meant (the Kumaraswamy-Beta series takes a and b themselves).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "count_log_prob/count_log_prob.h"  // log_pos_t, kShift
#include "family_kl.h"
#include "fastmath.h"
#include "ops.h"
#include "rows.h"

namespace fastvae {
namespace {

// KL_FAMILIES' positions (fastvae/_families.py)
constexpr int kLaplace = 0, kUniform = 1, kGumbel = 2, kCauchy = 3, kExponential = 4, kKumaraswamy = 5, kWeibull = 6;
// Not one of KL_FAMILIES: the Kumaraswamy's blocks whose Beta prior has beta = 1
// (log beta = 0 in every element), which take its KL without the series.
constexpr int kKumaraswamyUnitBeta = 7;
constexpr int64_t kRowsPerTask = 256;
constexpr int64_t kBlock = 512;  // elements per vector block (stack buffers)
constexpr double kEulerGamma = 0.5772156649015329;
constexpr double kLog4 = 1.3862943611198906;
constexpr int kKumaraswamyTerms = 10;  // KUMARASWAMY_KL_TERMS (fastvae/_families.py)

// The Kumaraswamy's lgamma, psi and psi' shift their argument z > 0 up to
// w >= kKumaShift<T> by the recurrences, then take the asymptotic series: 4 in
// float, where the series' next terms (691/(360360 w^11) of lgamma's,
// 691/(32760 w^12) of psi's, 7/(6 w^15) of psi''s) are below 2e-9, so a shift
// of 4 steps does what count_log_prob.h's 10 do at float precision; 10 in
// double (count_log_prob.h's kShift). The series takes 20 such arguments per
// element, which makes the shift most of the KL's work.
template <typename T>
inline constexpr int kKumaShift = std::is_same_v<T, float> ? 4 : kShift;

// z shifted to w: prod = z (z + 1) ... (w - 1), dprod its derivative in z
// (kPsi), lg = lgamma(w) and psi = psi(w) (kPsi) by Stirling. Then lgamma(z) =
// lg - log prod and psi(z) = psi - dprod / prod, and a ratio of gammas takes
// the products' ratio with no log at all. Each factor of prod is below the
// shift, so prod < kKumaShift^kKumaShift and a product of two stays finite.
template <typename T>
struct Shifted {
  T prod, dprod, lg, psi;
};

template <typename T, bool kPsi>
FASTVAE_INLINE void shift_up(T z, T& w, T& prod, T& dprod) {
  constexpr int n = kKumaShift<T>;
  w = z, prod = T(1), dprod = T(0);
  for (int i = 0; i < n; ++i) {
    const bool c = w < T(n);
    if constexpr (kPsi) dprod = c ? dprod * w + prod : dprod;
    prod = c ? prod * w : prod;
    w = c ? w + T(1) : w;
  }
}

// The Stirling parts at w >= kKumaShift<T>, iw = 1/w.
template <typename T, bool kPsi>
FASTVAE_INLINE Shifted<T> stirling(T w, T iw, T prod, T dprod) {
  const T lw = log_pos_t(w), iw2 = iw * iw;
  // stirling_corr and digamma_corr of count_log_prob.h, from one reciprocal
  const T corr =
      iw * (T(1.0 / 12) - iw2 * (T(1.0 / 360) - iw2 * (T(1.0 / 1260) - iw2 * (T(1.0 / 1680) - iw2 * T(1.0 / 1188)))));
  Shifted<T> s{prod, dprod, (w - T(0.5)) * lw - w + T(0.91893853320467274178) + corr, T(0)};
  if constexpr (kPsi) {
    const T dcorr = iw2 * (T(1.0 / 12) - iw2 * (T(1.0 / 120) - iw2 * (T(1.0 / 252) - iw2 * (T(1.0 / 240) -
                                                                                          iw2 * T(1.0 / 132)))));
    s.psi = lw - T(0.5) * iw - dcorr;
  }
  return s;
}

template <typename T, bool kPsi>
FASTVAE_INLINE Shifted<T> shifted(T z) {
  T w, prod, dprod;
  shift_up<T, kPsi>(z, w, prod, dprod);
  return stirling<T, kPsi>(w, T(1) / w, prod, dprod);
}

// x and y shifted, their 1/w from one division. Each w is capped at 1e18 in
// it, so that the product stays finite: past that, 1/w's terms (1/(12 w) in
// lgamma(w) > 4e19, 1/(2 w) in psi(w) > 41) are far below their rounding.
template <typename T, bool kPsi>
FASTVAE_INLINE void shifted_pair(T x, T y, Shifted<T>& sx, Shifted<T>& sy) {
  T wx, px, dpx, wy, py, dpy;
  shift_up<T, kPsi>(x, wx, px, dpx);
  shift_up<T, kPsi>(y, wy, py, dpy);
  const T cx = std::min(wx, T(1e18)), cy = std::min(wy, T(1e18));
  const T ixy = T(1) / (cx * cy);
  sx = stirling<T, kPsi>(wx, cy * ixy, px, dpx);
  sy = stirling<T, kPsi>(wy, cx * ixy, py, dpy);
}

template <typename T>
FASTVAE_INLINE T kuma_lgamma(T z) {
  const Shifted<T> s = shifted<T, false>(z);
  return s.lg - log_pos_t(s.prod);
}

template <typename T>
FASTVAE_INLINE T kuma_digamma(T z) {
  const Shifted<T> s = shifted<T, true>(z);
  return s.psi - s.dprod / s.prod;
}

// psi'(z), z > 0: shifted by psi'(z) = psi'(w) + sum 1/(z + i)^2, then the
// asymptotic series.
template <typename T>
FASTVAE_INLINE T trigamma_pos(T z) {
  constexpr int n = kKumaShift<T>;
  T w = z, acc = T(0);
  for (int i = 0; i < n; ++i) {
    const bool c = w < T(n);
    acc = c ? acc + T(1) / (w * w) : acc;
    w = c ? w + T(1) : w;
  }
  const T iw = T(1) / w, iw2 = iw * iw;
  const T tail = T(1.0 / 42) - iw2 * (T(1.0 / 30) - iw2 * (T(5.0 / 66) - iw2 * T(691.0 / 2730)));
  return acc + iw + iw2 * (T(0.5) + iw * (T(1.0 / 6) - iw2 * (T(1.0 / 30) - iw2 * tail)));
}

// What the KL and its gradient share per element: lgamma(b) and psi(1 + b)
// from lgamma(1 + b) - log b and psi(1 + b) (C = -gamma - psi(b) - 1/b =
// -gamma - psi(1 + b) has no cancellation at small b).
template <typename T>
struct KumaElement {
  T a, b, al, be, ia, ab, lg_b, psi_1b, c;
};

template <typename T>
FASTVAE_INLINE KumaElement<T> kuma_element(T la, T lb, T lal, T lbe) {
  KumaElement<T> k;
  k.a = exp_t(la), k.b = exp_t(lb), k.al = exp_t(lal), k.be = exp_t(lbe);
  const Shifted<T> s = shifted<T, true>(T(1) + k.b);
  k.lg_b = s.lg - log_pos_t(s.prod) - lb;
  k.psi_1b = s.psi - s.dprod / s.prod;
  k.c = -T(kEulerGamma) - k.psi_1b;
  k.ia = T(1) / k.a;
  k.ab = k.a * k.b;
  return k;
}

// B(x, b) = Gamma(x) Gamma(b) / Gamma(x + b) from the shifted x and x + b:
// exp of the Stirling parts times the shift products' ratio.
template <typename T>
FASTVAE_INLINE T kuma_beta_fn(T lg_b, const Shifted<T>& sx, const Shifted<T>& sxb, T inv_prod_x) {
  return exp_t(lg_b + sx.lg - sxb.lg) * sxb.prod * inv_prod_x;
}

// The KL but its series' term (beta - 1) b S, given log B(alpha, beta).
// kumaraswamy_kl and kumaraswamy_kl_unit_beta share it, so that an element
// with beta = 1 has the same value bit for bit in either (a block's form
// depends on its other elements, and blocks differ between callers).
template <typename T>
FASTVAE_INLINE T kuma_kl_base(const KumaElement<T>& k, T la, T lb, T log_beta_fn) {
  return (T(1) - k.al * k.ia) * k.c + la + lb + log_beta_fn - (k.b - T(1)) / k.b;
}

// base + w S where w = (beta - 1) b is not 0, and base exactly where it is
// (beta = 1, or b = 0), whatever S is (an overflowed series times 0 would be
// NaN): there w's sign bit is set and S's bits cleared, so that the product
// is -0 and base + -0 = base bit for bit (+0 and -0 included). Bit masks
// rather than `w == 0 ? base : base + w * S`: GCC compiled that select with
// more values live across the unrolled series, and the gradient's vector loop
// spilled registers (7% more instructions there, 2% in the KL's), which these
// masks do not. The sum still contracts to one fma(w, S, base) where FMA is.
template <typename T>
FASTVAE_INLINE T series_term(T base, T w, T s) {
  using U = std::conditional_t<std::is_same_v<T, float>, uint32_t, uint64_t>;
  constexpr U kSign = U(1) << (8 * sizeof(U) - 1);
  const U unit = U(w == T(0));
  U wu, su;
  std::memcpy(&wu, &w, sizeof wu);
  std::memcpy(&su, &s, sizeof su);
  wu |= unit * kSign;
  su &= unit - U(1);
  std::memcpy(&w, &wu, sizeof wu);
  std::memcpy(&s, &su, sizeof su);
  return base + w * s;
}

// The Kumaraswamy(a, b)-Beta(alpha, beta) KL of the oracle's kumaraswamy_beta_terms,
// a = e^la, b = e^lb, alpha = e^lal, beta = e^lbe. At log beta = 0, log
// B(alpha, 1) = lgamma(alpha) - lgamma(alpha + 1) = -log alpha exactly, and
// the series' term is left out where its factor beta - 1 is 0 (not 0 times
// an overflowed series).
template <typename T>
FASTVAE_INLINE T kumaraswamy_kl(T la, T lb, T lal, T lbe) {
  const KumaElement<T> k = kuma_element(la, lb, lal, lbe);
  const T lgammas = kuma_lgamma(k.al) + kuma_lgamma(k.be) - kuma_lgamma(k.al + k.be);
  const T base = kuma_kl_base(k, la, lb, lbe == T(0) ? -lal : lgammas);
  T s = T(0);
#pragma GCC unroll 10
  for (int m = 1; m <= kKumaraswamyTerms; ++m) {
    const T x = T(m) * k.ia;
    Shifted<T> sx, sxb;
    shifted_pair<T, false>(x, x + k.b, sx, sxb);
    s += kuma_beta_fn(k.lg_b, sx, sxb, T(1) / (sx.prod * (T(m) + k.ab)));
  }
  return series_term(base, (k.be - T(1)) * k.b, s);
}

// The parts of kumaraswamy_kl_grad's (la, lb, lal) gradients without the
// series (w = (beta - 1) b = 0 drops it from the first two), given
// alpha (psi(alpha) - psi(alpha + beta)); shared as kuma_kl_base is.
template <typename T>
struct KumaGradBase {
  T da, db, dal;
};

template <typename T>
FASTVAE_INLINE KumaGradBase<T> kuma_grad_base(const KumaElement<T>& k, T al_psi) {
  const T b = k.b, ratio = k.al * k.ia;
  return {ratio * k.c + T(1), -(T(1) - ratio) * b * trigamma_pos(T(1) + b) + T(1) - T(1) / b,
          al_psi - ratio * k.c};
}

// g times its gradient in (la, lb, lal, lbe) (the oracle's kumaraswamy_beta_grads),
// with 1/b - b psi'(b) = -b psi'(1 + b); at log beta = 0, alpha (psi(alpha)
// - psi(alpha + 1)) = -1 exactly.
template <typename T>
FASTVAE_INLINE void kumaraswamy_kl_grad(T g, T la, T lb, T lal, T lbe, T& da, T& db, T& dal, T& dbe) {
  const KumaElement<T> k = kuma_element(la, lb, lal, lbe);
  const T b = k.b, ab = k.ab;
  T s = T(0), sa = T(0), sb = T(0);
#pragma GCC unroll 10
  for (int m = 1; m <= kKumaraswamyTerms; ++m) {
    const T x = T(m) * k.ia;
    Shifted<T> sx, sxb;
    shifted_pair<T, true>(x, x + b, sx, sxb);
    const T ip = T(1) / (sx.prod * sxb.prod);  // both products' reciprocals from one division
    const T psi_x = sx.psi - sx.dprod * (sxb.prod * ip);
    const T psi_xb = sxb.psi - sxb.dprod * (sx.prod * ip);
    const T r = T(1) / (T(m) + ab);
    const T t = kuma_beta_fn(k.lg_b, sx, sxb, sxb.prod * ip) * r;
    const T e = ab * r;
    s += t;
    sa += t * (x * (psi_xb - psi_x) - e);
    sb += t * (b * (k.psi_1b - psi_xb) - T(1) - e);  // b (psi(b) - psi(x + b)) - e
  }
  const T w = (k.be - T(1)) * b;
  const T psi_sum = kuma_digamma(k.al + k.be);
  const T al_psi = k.al * (kuma_digamma(k.al) - psi_sum);
  const KumaGradBase<T> base = kuma_grad_base(k, lbe == T(0) ? -T(1) : al_psi);
  da = g * series_term(base.da, w, sa);
  db = g * series_term(base.db, w, s + sb);
  dal = g * base.dal;
  dbe = g * (k.be * (kuma_digamma(k.be) - psi_sum) + k.be * b * s);
}

// The KL against a Beta(alpha, 1) (a Kumaraswamy's usual prior, the uniform
// Beta(1, 1) among them), log beta = 0: the series enters only as (beta - 1)
// b S, so this is kumaraswamy_kl's value bit for bit in a fraction of its
// work (the series is most of it).
template <typename T>
FASTVAE_INLINE T kumaraswamy_kl_unit_beta(T la, T lb, T lal) {
  const KumaElement<T> k = kuma_element(la, lb, lal, T(0));  // its unused parts compiled away
  return kuma_kl_base(k, la, lb, -lal);
}

// kumaraswamy_kl_grad's (la, lb, lal) gradients at log beta = 0, bit for bit.
// Its d/dlbe = b S + ... needs the series: callers take this form only where
// that is not wanted.
template <typename T>
FASTVAE_INLINE void kumaraswamy_kl_grad_unit_beta(T g, T la, T lb, T lal, T& da, T& db, T& dal) {
  const KumaGradBase<T> base = kuma_grad_base(kuma_element(la, lb, lal, T(0)), -T(1));
  da = g * base.da;
  db = g * base.db;
  dal = g * base.dal;
}

// The Weibull-Weibull KL of the oracle's weibull_terms for (log scale, log
// concentration) pairs (a1, s1), (a2, s2): with r = k2/k1 = e^(s2 - s1) and
// u = k2 (a1 - a2), s1 - s2 + gamma (r - 1) - u + e^(u + lgamma(1 + r)) - 1
// (the Gumbel's of log z). lgamma(1 + r) by the Kumaraswamy's shifted
// Stirling series; r past the dtype's range: the KL is inf (lgamma takes
// finite arguments).
template <typename T>
FASTVAE_INLINE T weibull_kl(T a1, T s1, T a2, T s2) {
  const T r = exp_t(s2 - s1);
  const T u = (a1 - a2) * exp_t(s2);
  const T kl = s1 - s2 + T(kEulerGamma) * (r - T(1)) - u + exp_t(u + kuma_lgamma(T(1) + r)) - T(1);
  return r == T(INFINITY) ? r : kl;
}

// g times its gradient in (a1, s1, a2, s2) (the oracle's), lgamma(1 + r) and
// psi(1 + r) from one shift: with G = e^(u + lgamma(1 + r)),
// d/da1 = k2 (G - 1) = -d/da2, d/ds1 = 1 - r gamma - G r psi(1 + r),
// d/ds2 = -1 + r gamma - u + G (u + r psi(1 + r)).
template <typename T>
FASTVAE_INLINE void weibull_kl_grad(T g, T a1, T s1, T a2, T s2, T& da1, T& ds1, T& da2, T& ds2) {
  const T k2 = exp_t(s2);
  const T r = exp_t(s2 - s1);
  const T u = (a1 - a2) * k2;
  const Shifted<T> s = shifted<T, true>(T(1) + r);
  const T big_g = exp_t(u + s.lg - log_pos_t(s.prod));
  const T psi_r = (s.psi - s.dprod / s.prod) * r;
  const T rg = r * T(kEulerGamma);
  da1 = g * k2 * (big_g - T(1));
  ds1 = g * (T(1) - rg - big_g * psi_r);
  ds2 = g * (rg - T(1) - u + big_g * (u + psi_r));
  da2 = -da1;
}

// The Cauchy's scales relative to the larger one, m = max(s1, s2):
// a = (b1 + b2) / e^m in [1, 2], dd = (m1 - m2) / e^m, big = max(a, |dd|),
// and (b1 + b2)^2 + (m1 - m2)^2 = e^(2m) big^2 s with s in [1, 2].
template <typename T>
struct CauchyParts {
  T m, big, ra, rd, s;
};

template <typename T>
FASTVAE_INLINE CauchyParts<T> cauchy_parts(T m1, T s1, T m2, T s2) {
  const T m = s1 > s2 ? s1 : s2;
  const T a = exp_t(s1 - m) + exp_t(s2 - m);
  const T d = m1 - m2;
  const T dd = d == T(0) ? T(0) : d * exp_t(-m);  // no 0 * inf below the normal range
  const T ad = std::fabs(dd);
  const T big = a > ad ? a : ad;
  const T ra = a / big, rd = dd / big;
  return {m, big, ra, rd, ra * ra + rd * rd};
}

// The uniform's support test of one element: q's (m1, m1 + e^s1) inside p's
// (m2, m2 + e^s2) with two exps (kExact, the elementwise form), or
// uniform_block_inside's form once the element's block passed it.
template <bool kExact, typename T>
FASTVAE_INLINE bool uniform_inside(T m1, T s1, T m2, T s2, T s1_max = T(0), T s2_min = T(0)) {
  if constexpr (kExact) {
    return (m1 >= m2) & (m1 + exp_t(s1) <= m2 + exp_t(s2));
  } else {
    return (m1 >= m2) & (s1 <= s1_max) & (s2 >= s2_min);
  }
}

template <int F, typename T>
FASTVAE_INLINE T kl_term(T m1, T s1, T m2, T s2) {
  if constexpr (F == kExponential) {  // log-rates s1, s2
    return (s1 - s2) + exp_t(s2 - s1) - T(1);
  } else if constexpr (F == kKumaraswamy) {  // (log a, log b) against the Beta's (log alpha, log beta)
    return kumaraswamy_kl(m1, s1, m2, s2);
  } else if constexpr (F == kKumaraswamyUnitBeta) {  // log beta = s2 = 0
    return kumaraswamy_kl_unit_beta(m1, s1, m2);
  } else if constexpr (F == kWeibull) {  // (log scale, log concentration) pairs
    return weibull_kl(m1, s1, m2, s2);
  } else if constexpr (F == kLaplace) {
    const T d = std::fabs(m1 - m2);
    const bool exact = d == T(0);  // the d terms are 0 whatever the scales
    const T u = exact ? T(0) : d * exp_t(-s1);
    const T v = exact ? T(0) : d * exp_t(-s2);
    return s2 - s1 + v + exp_t(s1 - s2 - u) - T(1);
  } else if constexpr (F == kUniform) {
    return uniform_inside<true>(m1, s1, m2, s2) ? s2 - s1 : T(INFINITY);
  } else if constexpr (F == kGumbel) {
    const T t = (m1 - m2) * exp_t(-s2);
    const T r = exp_t(s1 - s2);
    // lgamma(1 + r) by the Kumaraswamy's shifted series (4 steps in float, not lgamma_pos's 10)
    const T kl = s2 - s1 + t + r * T(kEulerGamma) + exp_t(kuma_lgamma(T(1) + r) - t) - (T(1) + T(kEulerGamma));
    return r == T(INFINITY) ? r : kl;  // b1 / b2 past the dtype's range (the series takes finite arguments)
  } else {
    const CauchyParts<T> c = cauchy_parts(m1, s1, m2, s2);
    const T kl = T(2) * (c.m + log_pos_t(c.big)) + log_pos_t(c.s) - T(kLog4) - s1 - s2;
    // a location distance past the dtype's range relative to the scales: the
    // KL exceeds 2 log(max finite); NaN stays NaN (log_pos_t would hide it)
    return c.big == T(INFINITY) ? T(INFINITY) : (c.big == c.big ? kl : c.big);
  }
}

// g times the gradient in (m1, s1, m2, s2); the prior's location gradient
// dm2 is -dm1 (the Weibull's log scale's too) but the Kumaraswamy's (its m2 is the Beta's log alpha).
template <int F, typename T>
FASTVAE_INLINE void kl_grad(T g, T m1, T s1, T m2, T s2, T& dm1, T& ds1, T& dm2, T& ds2) {
  if constexpr (F == kKumaraswamy) {
    kumaraswamy_kl_grad(g, m1, s1, m2, s2, dm1, ds1, dm2, ds2);
    return;
  }
  if constexpr (F == kKumaraswamyUnitBeta) {  // ds2, d/dlog beta, is not wanted
    kumaraswamy_kl_grad_unit_beta(g, m1, s1, m2, dm1, ds1, dm2);
    ds2 = T(0);
    return;
  }
  if constexpr (F == kWeibull) {
    weibull_kl_grad(g, m1, s1, m2, s2, dm1, ds1, dm2, ds2);
    return;
  }
  if constexpr (F == kExponential) {
    ds1 = g * (T(1) - exp_t(s2 - s1));
    ds2 = -ds1;
    dm1 = T(0);
  } else if constexpr (F == kLaplace) {
    const T diff = m1 - m2;
    const T d = std::fabs(diff);
    const bool exact = d == T(0);
    const T ip = exp_t(-s2);
    const T u = exact ? T(0) : d * exp_t(-s1);
    const T e = exp_t(s1 - s2 - u);
    ds1 = g * ((e == T(0) ? T(0) : e * (T(1) + u)) - T(1));  // u = inf: e (1 + u) -> 0
    ds2 = g * (T(1) - (exact ? T(0) : d * ip) - e);
    // sign(0) = 0, as torch's abs: no gradient in the location where d = 0
    const T sgn = diff > T(0) ? T(1) : T(-1);
    dm1 = exact ? T(0) : g * sgn * ip * (T(1) - exp_t(-u));
  } else if constexpr (F == kUniform) {
    const bool inside = uniform_inside<true>(m1, s1, m2, s2);
    ds1 = inside ? -g : T(0);
    ds2 = inside ? g : T(0);
    dm1 = T(0);
  } else if constexpr (F == kGumbel) {
    const T ip = exp_t(-s2);
    const T t = (m1 - m2) * ip;
    const T r = exp_t(s1 - s2);
    // lgamma(1 + r) and psi(1 + r) from one shift (the Weibull's): no division per step
    const Shifted<T> sh = shifted<T, true>(T(1) + r);
    const T big_g = exp_t(sh.lg - log_pos_t(sh.prod) - t);
    const T psi_r = (sh.psi - sh.dprod / sh.prod) * r;
    const T rg = r * T(kEulerGamma);
    dm1 = g * ip * (T(1) - big_g);
    ds1 = g * (rg + big_g * psi_r - T(1));
    ds2 = g * (T(1) - t - rg + big_g * (t - psi_r));
  } else {
    const CauchyParts<T> c = cauchy_parts(m1, s1, m2, s2);
    const bool far = c.big == T(INFINITY);  // the KL's limit: its gradients are 0 and -1
    const T w = T(2) / (c.big * c.s);
    dm1 = far | (c.rd == T(0)) ? T(0) : g * w * c.rd * exp_t(-c.m);  // m1 = m2: no 0 * inf
    ds1 = far ? -g : g * (w * c.ra * exp_t(s1 - c.m) - T(1));
    ds2 = far ? -g : g * (w * c.ra * exp_t(s2 - c.m) - T(1));
  }
  dm2 = -dm1;
}

// out[i] = p[column of element first_elem + i]: a shared (L,) prior laid out
// like the block of q, one copy per row run.
template <typename T>
FASTVAE_INLINE void tile_columns(const T* p, int64_t first_elem, int64_t n, int64_t L, T* out) {
  int64_t col = first_elem % L;
  for (int64_t i = 0; i < n; col = 0) {
    const int64_t len = n - i < L - col ? n - i : L - col;
    for (int64_t j = 0; j < len; ++j) out[i + j] = p[col + j];
    i += len;
  }
}

// The block's prior: its own rows, or the shared (L,) prior indexed by
// column, read in place where the block stays in one row, from the periodic
// copy (FamilyKLIn's p_*_periodic) where there is one, else tiled into buf.
template <typename T>
FASTVAE_INLINE const T* prior_block(const T* p, const T* periodic, bool shared, int64_t e0, int64_t n, int64_t L,
                                    T* buf) {
  if (!shared) return p + e0;
  const int64_t col = e0 % L;
  if (col + n <= L) return p + col;
  if (periodic != nullptr) return periodic + col;
  tile_columns(p, e0, n, L, buf);
  return buf;
}

// A pass's own periodic copy of a shared prior (FamilyKLPeriodicPrior's
// layout) when the caller gave none and its blocks would tile it more than
// once: one copy per pass instead of one per block.
template <typename T>
FASTVAE_INLINE FamilyKLIn<T> with_periodic(const FamilyKLIn<T>& in, int64_t n_elems, T* loc_buf, T* log_buf) {
  FamilyKLIn<T> out = in;
  if (!in.p_shared || in.p_log_param_periodic != nullptr || in.L >= kBlock || n_elems <= kBlock) return out;
  tile_columns(in.p_log_param, 0, in.L + kBlock, in.L, log_buf);
  out.p_log_param_periodic = log_buf;
  if (in.p_loc != nullptr) {
    tile_columns(in.p_loc, 0, in.L + kBlock, in.L, loc_buf);
    out.p_loc_periodic = loc_buf;
  }
  return out;
}

// The uniform's support check once per block. Its elementwise form (kl_term,
// kl_grad) decides q's (m1, m1 + e^s1) inside p's (m2, m2 + e^s2) as
// m1 >= m2 and fl(m1 + E(s1)) <= fl(m2 + E(s2)), E = exp_t, two exps per
// element. Take M1 = max m1, S1 = max s1, M2 = min m2, S2 = min s2 over the
// block (NaN skipped), and bounds of E: E(s) <= e^s (1 + eta) + 2^-120 for
// s <= 88, E(s) >= e^min(s, 88) (1 - eta) for s >= -80 (exp_t's float form
// clamps its argument at 88.5 below its overflow to inf at 88.72), E(s) >= 0.
// When B1 = M1 + e^S1 (1 + eta) + 2^-120 <= B2 = M2 + e^min(S2, 88) (1 - eta)
// (S1 <= 88; e^S2's term 0 for S2 < -80), every element whose s1 and s2 are
// not NaN has m1 + E(s1) <= B1 <= B2 <= m2 + E(s2) as real numbers, and
// rounding to nearest is monotone, so fl(m1 + E(s1)) <= fl(m2 + E(s2))
// whatever contractions the sums get: the elements then take m1 >= m2 &
// s1 <= S1 & s2 >= S2, the same decision bit for bit, NaN included (a NaN s1
// or s2 fails its comparison as it fails the sum's), with no exp. Else (q near
// p's end or past it, infinite bounds) the block takes the elementwise form.
// exp_t's float relative error is below 8.5e-8 (every float in [-87.3, 88.5]
// measured against exp in double, for the baseline, AVX2 and AVX-512 builds),
// eta = 2^-18 (3.8e-6) is 45 times that; libm's double exp is within 1 ulp,
// 2^-52, eta = 2^-40. The test runs in double with a slack of 2^-40 of its terms'
// magnitudes for its own roundings.
template <typename T>
FASTVAE_INLINE bool uniform_block_inside(const T* __restrict qm, const T* __restrict qs, const T* __restrict pm,
                                         const T* __restrict ps, int64_t n, T& s1_max, T& s2_min) {
  // lane-wise maxima and minima, which GCC vectorizes (a float max does not
  // reassociate outside -ffast-math); x > a ? x : a skips a NaN x
  constexpr int kLanes = 16;
  T a[kLanes], b[kLanes], c[kLanes], d[kLanes];
  for (int j = 0; j < kLanes; ++j) a[j] = b[j] = T(-INFINITY), c[j] = d[j] = T(INFINITY);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      a[j] = qm[i + j] > a[j] ? qm[i + j] : a[j];
      b[j] = qs[i + j] > b[j] ? qs[i + j] : b[j];
      c[j] = pm[i + j] < c[j] ? pm[i + j] : c[j];
      d[j] = ps[i + j] < d[j] ? ps[i + j] : d[j];
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    a[j] = qm[i] > a[j] ? qm[i] : a[j];
    b[j] = qs[i] > b[j] ? qs[i] : b[j];
    c[j] = pm[i] < c[j] ? pm[i] : c[j];
    d[j] = ps[i] < d[j] ? ps[i] : d[j];
  }
  for (int j = 1; j < kLanes; ++j) {
    a[0] = a[j] > a[0] ? a[j] : a[0];
    b[0] = b[j] > b[0] ? b[j] : b[0];
    c[0] = c[j] < c[0] ? c[j] : c[0];
    d[0] = d[j] < d[0] ? d[j] : d[0];
  }
  s1_max = b[0], s2_min = d[0];
  constexpr double eta = std::is_same_v<T, float> ? 0x1p-18 : 0x1p-40;
  if (!(double(b[0]) <= 88.0)) return false;  // E(s1) may overflow
  const double b1 = std::exp(double(b[0])) * (1.0 + eta) + 0x1p-120;
  const double b2 = double(d[0]) >= -80.0 ? std::exp(std::min(double(d[0]), 88.0)) * (1.0 - eta) : 0.0;
  const double m1 = double(a[0]), m2 = double(c[0]);
  const double lhs = m1 + b1, rhs = m2 + b2;
  const double slack = 0x1p-40 * (std::fabs(m1) + b1 + std::fabs(m2) + b2);
  return std::isfinite(lhs) & std::isfinite(rhs) & std::isfinite(slack) & (lhs + slack <= rhs);
}

template <bool kExact, typename T>
FASTVAE_INLINE void uniform_term_loop(const T* __restrict qm, const T* __restrict qs, const T* __restrict pm,
                                      const T* __restrict ps, int64_t n, T s1_max, T s2_min, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const bool inside = uniform_inside<kExact>(qm[i], qs[i], pm[i], ps[i], s1_max, s2_min);
    out[i] = inside ? ps[i] - qs[i] : T(INFINITY);
  }
}

// One block's KL terms, the pointers as restrict parameters (which GCC
// vectorizes across, as it does not every local restrict pointer).
template <int F, typename T>
FASTVAE_INLINE void term_block(const T* __restrict qm, const T* __restrict qs, const T* __restrict pm,
                               const T* __restrict ps, int64_t n, T* __restrict out) {
  if constexpr (F == kUniform) {
    T s1_max, s2_min;
    if (uniform_block_inside(qm, qs, pm, ps, n, s1_max, s2_min)) {
      uniform_term_loop<false>(qm, qs, pm, ps, n, s1_max, s2_min, out);
    } else {
      uniform_term_loop<true>(qm, qs, pm, ps, n, s1_max, s2_min, out);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = kl_term<F>(qm[i], qs[i], pm[i], ps[i]);
  }
}

// Whether every log beta of a Kumaraswamy block is 0 (beta = 1): the block
// then takes the form without the series, decided per block so that the
// vector loop has no branch per lane. A NaN log beta is not 0: the general form.
// An int OR per chunk, which GCC vectorizes (a bool &= compiles to a scalar
// compare and cmov per element, 2% of the general form's KL and more of the
// fast form's), and a block with another beta is decided at its first chunk.
template <typename T>
FASTVAE_INLINE bool unit_beta_block(const T* __restrict ps, int64_t n) {
  constexpr int64_t kChunk = 64;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    int other = 0;
    for (int64_t i = i0; i < i1; ++i) other |= ps[i] != T(0);
    if (other != 0) return false;
  }
  return true;
}

// term_block of family F, the Kumaraswamy's blocks against a Beta(alpha, 1)
// in the form without the series.
template <int F, typename T>
FASTVAE_INLINE void family_term_block(const T* qm, const T* qs, const T* pm, const T* ps, int64_t n, T* out) {
  if constexpr (F == kKumaraswamy) {
    if (unit_beta_block(ps, n)) return term_block<kKumaraswamyUnitBeta>(qm, qs, pm, ps, n, out);
  }
  term_block<F>(qm, qs, pm, ps, n, out);
}

template <int F, typename T>
FASTVAE_INLINE void forward_rows_t(const FamilyKLIn<T>& given, int64_t r0, int64_t r1, bool reduce, T* kl) {
  const int64_t L = given.L;
  if (L == 0) {
    if (reduce) std::fill(kl + r0, kl + r1, T(0));
    return;
  }
  constexpr bool kLoc = F != kExponential;
  T t[kBlock], pm_buf[kBlock], ps_buf[kBlock], pm_per[2 * kBlock], ps_per[2 * kBlock];
  const FamilyKLIn<T> in = with_periodic(given, (r1 - r0) * L, pm_per, ps_per);
  RowSums sums(r0, L);
  for (int64_t e0 = r0 * L; e0 < r1 * L; e0 += kBlock) {
    const int64_t n = std::min(kBlock, r1 * L - e0);
    const T* qs = in.q_log_param + e0;
    const T* qm = kLoc ? in.q_loc + e0 : qs;
    const T* ps = prior_block(in.p_log_param, in.p_log_param_periodic, in.p_shared, e0, n, L, ps_buf);
    const T* pm = kLoc ? prior_block(in.p_loc, in.p_loc_periodic, in.p_shared, e0, n, L, pm_buf) : ps;
    T* out = reduce ? t : kl + e0;
    family_term_block<F>(qm, qs, pm, ps, n, out);
    if (reduce) sums.feed(t, n, [&](int64_t row, double acc) { kl[row] = static_cast<T>(acc); });
  }
}

// One block's gradients, the pointers restrict as term_block's.
template <int F, typename T>
FASTVAE_INLINE void grad_block(const T* __restrict g, const T* __restrict qm, const T* __restrict qs,
                               const T* __restrict pm, const T* __restrict ps, int64_t n, T* __restrict gm,
                               T* __restrict gs, T* __restrict gpm, T* __restrict gps) {
  for (int64_t i = 0; i < n; ++i) {
    T dm1, ds1, dm2, ds2;
    kl_grad<F>(g[i], qm[i], qs[i], pm[i], ps[i], dm1, ds1, dm2, ds2);
    gm[i] = dm1;
    gs[i] = ds1;
    gpm[i] = dm2;
    gps[i] = ds2;
  }
}

// The uniform's gradients straight into the outputs: g times (0, -1, 0, 1)
// inside the support, 0 outside (kl_grad's: dm2 = -dm1 is -0). kAdd: q's
// log-scale gradient added to what dqs holds (add_backward's), and dqm left
// as it is: adding kl_grad's +0 to it changes no value but a -0, which the
// samplers' gradients never hold (their sums start at +0); else both written.
// The prior's are written where dpm, dps are not null.
template <bool kExact, bool kAdd, typename T>
FASTVAE_INLINE void uniform_grad_loop(const T* __restrict g, const T* __restrict qm, const T* __restrict qs,
                                      const T* __restrict pm, const T* __restrict ps, int64_t n, T s1_max,
                                      T s2_min, T* __restrict dqm, T* __restrict dqs, T* __restrict dpm,
                                      T* __restrict dps) {
  for (int64_t i = 0; i < n; ++i) {
    const bool inside = uniform_inside<kExact>(qm[i], qs[i], pm[i], ps[i], s1_max, s2_min);
    const T ds1 = inside ? -g[i] : T(0);
    if constexpr (kAdd) {
      dqs[i] += ds1;
    } else {
      dqs[i] = ds1;
    }
  }
  if constexpr (!kAdd) std::fill(dqm, dqm + n, T(0));
  if (dps != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const bool inside = uniform_inside<kExact>(qm[i], qs[i], pm[i], ps[i], s1_max, s2_min);
      dps[i] = inside ? g[i] : T(0);
    }
  }
  if (dpm != nullptr) std::fill(dpm, dpm + n, T(-0.0));
}

template <bool kAdd, typename T>
FASTVAE_INLINE void uniform_grad_block(const T* g, const T* qm, const T* qs, const T* pm, const T* ps, int64_t n,
                                       T* dqm, T* dqs, T* dpm, T* dps) {
  T s1_max, s2_min;
  if (uniform_block_inside(qm, qs, pm, ps, n, s1_max, s2_min)) {
    uniform_grad_loop<false, kAdd>(g, qm, qs, pm, ps, n, s1_max, s2_min, dqm, dqs, dpm, dps);
  } else {
    uniform_grad_loop<true, kAdd>(g, qm, qs, pm, ps, n, s1_max, s2_min, dqm, dqs, dpm, dps);
  }
}

// grad_block of family F, the Kumaraswamy's blocks against a Beta(alpha, 1)
// in the form without the series where d/dlog beta (gps) is not wanted
// (want_dps false: gps is scratch).
template <int F, typename T>
FASTVAE_INLINE void family_grad_block(const T* g, const T* qm, const T* qs, const T* pm, const T* ps, int64_t n,
                                      T* gm, T* gs, T* gpm, T* gps, bool want_dps) {
  if constexpr (F == kKumaraswamy) {
    if (!want_dps && unit_beta_block(ps, n))
      return grad_block<kKumaraswamyUnitBeta>(g, qm, qs, pm, ps, n, gm, gs, gpm, gps);
  }
  grad_block<F>(g, qm, qs, pm, ps, n, gm, gs, gpm, gps);
}

template <int F, typename T>
FASTVAE_INLINE void backward_rows_t(const T* grad_kl, const FamilyKLIn<T>& given, int64_t r0, int64_t r1,
                                    bool reduce, T* dqm, T* dqs, T* dpm, T* dps) {
  const int64_t L = given.L;
  constexpr bool kLoc = F != kExponential;
  T gs_buf[kBlock], pm_buf[kBlock], ps_buf[kBlock], dm_buf[kBlock], dpm_buf[kBlock], dp_buf[kBlock];
  T pm_per[2 * kBlock], ps_per[2 * kBlock];
  const FamilyKLIn<T> in = with_periodic(given, (r1 - r0) * L, pm_per, ps_per);
  for (int64_t e0 = r0 * L; e0 < r1 * L; e0 += kBlock) {
    const int64_t n = std::min(kBlock, r1 * L - e0);
    const T* g = grad_kl + e0;
    if (reduce) {
      spread_rows(grad_kl, e0, n, L, gs_buf);
      g = gs_buf;
    }
    const T* qs = in.q_log_param + e0;
    const T* qm = kLoc ? in.q_loc + e0 : qs;
    const T* ps = prior_block(in.p_log_param, in.p_log_param_periodic, in.p_shared, e0, n, L, ps_buf);
    const T* pm = kLoc ? prior_block(in.p_loc, in.p_loc_periodic, in.p_shared, e0, n, L, pm_buf) : ps;
    if constexpr (F == kUniform) {
      uniform_grad_block<false>(g, qm, qs, pm, ps, n, dqm + e0, dqs + e0, dpm ? dpm + e0 : nullptr,
                                dps ? dps + e0 : nullptr);
      continue;
    }
    // the gradients that are not wanted go to scratch, so that the loop has no branch
    T* gm = kLoc ? dqm + e0 : dm_buf;
    T* gs = dqs + e0;
    T* gpm = kLoc && dpm != nullptr ? dpm + e0 : dpm_buf;
    T* gps = dps != nullptr ? dps + e0 : dp_buf;
    family_grad_block<F>(g, qm, qs, pm, ps, n, gm, gs, gpm, gps, dps != nullptr);
  }
}

template <typename T>
FASTVAE_INLINE void forward_rows_any(int family, const FamilyKLIn<T>& in, int64_t r0, int64_t r1, bool reduce,
                                     T* kl) {
  switch (family) {
    case kLaplace: forward_rows_t<kLaplace>(in, r0, r1, reduce, kl); break;
    case kUniform: forward_rows_t<kUniform>(in, r0, r1, reduce, kl); break;
    case kGumbel: forward_rows_t<kGumbel>(in, r0, r1, reduce, kl); break;
    case kCauchy: forward_rows_t<kCauchy>(in, r0, r1, reduce, kl); break;
    case kKumaraswamy: forward_rows_t<kKumaraswamy>(in, r0, r1, reduce, kl); break;
    case kWeibull: forward_rows_t<kWeibull>(in, r0, r1, reduce, kl); break;
    default: forward_rows_t<kExponential>(in, r0, r1, reduce, kl); break;
  }
}

template <typename T>
FASTVAE_INLINE void backward_rows_any(int family, const T* grad_kl, const FamilyKLIn<T>& in, int64_t r0, int64_t r1,
                                      bool reduce, T* dqm, T* dqs, T* dpm, T* dps) {
  switch (family) {
    case kLaplace: backward_rows_t<kLaplace>(grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps); break;
    case kUniform: backward_rows_t<kUniform>(grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps); break;
    case kGumbel: backward_rows_t<kGumbel>(grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps); break;
    case kCauchy: backward_rows_t<kCauchy>(grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps); break;
    case kKumaraswamy: backward_rows_t<kKumaraswamy>(grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps); break;
    case kWeibull: backward_rows_t<kWeibull>(grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps); break;
    default: backward_rows_t<kExponential>(grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps); break;
  }
}

// dst[i] += src[i]: dst + src, as autograd adds two gradients (one rounding).
template <typename T>
FASTVAE_INLINE void add_block(const T* __restrict src, int64_t n, T* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// The gradients of elements e0 .. e0 + n - 1 (n <= kBlock) from the row
// gradients grad_kl (N,): q's added to dqm, dqs (a sampler's, which autograd
// would add them to), p's written where dpm, dps are not null.
template <int F, typename T>
FASTVAE_INLINE void add_backward_t(const T* grad_kl, const FamilyKLIn<T>& in, int64_t e0, int64_t n, T* dqm, T* dqs,
                                   T* dpm, T* dps) {
  const int64_t L = in.L;
  constexpr bool kLoc = F != kExponential;
  T g[kBlock], pm_buf[kBlock], ps_buf[kBlock];
  spread_rows(grad_kl, e0, n, L, g);
  const T* qs = in.q_log_param_block != nullptr ? in.q_log_param_block : in.q_log_param + e0;
  const T* qm = kLoc ? in.q_loc + e0 : qs;
  const T* ps = prior_block(in.p_log_param, in.p_log_param_periodic, in.p_shared, e0, n, L, ps_buf);
  const T* pm = kLoc ? prior_block(in.p_loc, in.p_loc_periodic, in.p_shared, e0, n, L, pm_buf) : ps;
  if constexpr (F == kUniform) {
    uniform_grad_block<true>(g, qm, qs, pm, ps, n, dqm + e0, dqs + e0, dpm ? dpm + e0 : nullptr,
                             dps ? dps + e0 : nullptr);
  } else {
    // the KL's own gradients first, then added: the sum in the loop would let GCC
    // contract a product of the gradient into it (another rounding than autograd's)
    T gm[kBlock], gs[kBlock], gpm_buf[kBlock], gps_buf[kBlock];
    T* gpm = kLoc && dpm != nullptr ? dpm + e0 : gpm_buf;
    T* gps = dps != nullptr ? dps + e0 : gps_buf;
    family_grad_block<F>(g, qm, qs, pm, ps, n, gm, gs, gpm, gps, dps != nullptr);
    add_block(gs, n, dqs + e0);
    if constexpr (kLoc) add_block(gm, n, dqm + e0);
  }
}

template <typename T>
FASTVAE_INLINE void add_backward_any(int family, const T* grad_kl, const FamilyKLIn<T>& in, int64_t e0, int64_t n,
                                     T* dqm, T* dqs, T* dpm, T* dps) {
  switch (family) {
    case kLaplace: add_backward_t<kLaplace>(grad_kl, in, e0, n, dqm, dqs, dpm, dps); break;
    case kUniform: add_backward_t<kUniform>(grad_kl, in, e0, n, dqm, dqs, dpm, dps); break;
    case kGumbel: add_backward_t<kGumbel>(grad_kl, in, e0, n, dqm, dqs, dpm, dps); break;
    case kCauchy: add_backward_t<kCauchy>(grad_kl, in, e0, n, dqm, dqs, dpm, dps); break;
    case kKumaraswamy: add_backward_t<kKumaraswamy>(grad_kl, in, e0, n, dqm, dqs, dpm, dps); break;
    case kWeibull: add_backward_t<kWeibull>(grad_kl, in, e0, n, dqm, dqs, dpm, dps); break;
    default: add_backward_t<kExponential>(grad_kl, in, e0, n, dqm, dqs, dpm, dps); break;
  }
}

// float runs in the ISA clones; double is the precise (libm) path.
FASTVAE_CLONES void forward_rows_f32(int family, const FamilyKLIn<float>& in, int64_t r0, int64_t r1, bool reduce,
                                     float* kl) {
  forward_rows_any(family, in, r0, r1, reduce, kl);
}

FASTVAE_CLONES void backward_rows_f32(int family, const float* grad_kl, const FamilyKLIn<float>& in, int64_t r0,
                                      int64_t r1, bool reduce, float* dqm, float* dqs, float* dpm, float* dps) {
  backward_rows_any(family, grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps);
}

void forward_rows(int family, const FamilyKLIn<float>& in, int64_t r0, int64_t r1, bool reduce, float* kl) {
  forward_rows_f32(family, in, r0, r1, reduce, kl);
}

void forward_rows(int family, const FamilyKLIn<double>& in, int64_t r0, int64_t r1, bool reduce, double* kl) {
  forward_rows_any(family, in, r0, r1, reduce, kl);
}

void backward_rows(int family, const float* grad_kl, const FamilyKLIn<float>& in, int64_t r0, int64_t r1,
                   bool reduce, float* dqm, float* dqs, float* dpm, float* dps) {
  backward_rows_f32(family, grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps);
}

void backward_rows(int family, const double* grad_kl, const FamilyKLIn<double>& in, int64_t r0, int64_t r1,
                   bool reduce, double* dqm, double* dqs, double* dpm, double* dps) {
  backward_rows_any(family, grad_kl, in, r0, r1, reduce, dqm, dqs, dpm, dps);
}

FASTVAE_CLONES void add_backward_f32(int family, const float* grad_kl, const FamilyKLIn<float>& in, int64_t e0,
                                     int64_t n, float* dqm, float* dqs, float* dpm, float* dps) {
  add_backward_any(family, grad_kl, in, e0, n, dqm, dqs, dpm, dps);
}

void add_backward(int family, const float* grad_kl, const FamilyKLIn<float>& in, int64_t e0, int64_t n, float* dqm,
                  float* dqs, float* dpm, float* dps) {
  add_backward_f32(family, grad_kl, in, e0, n, dqm, dqs, dpm, dps);
}

void add_backward(int family, const double* grad_kl, const FamilyKLIn<double>& in, int64_t e0, int64_t n,
                  double* dqm, double* dqs, double* dpm, double* dps) {
  add_backward_any(family, grad_kl, in, e0, n, dqm, dqs, dpm, dps);
}

}  // namespace

template <typename T>
void family_kl_forward(int family, const FamilyKLIn<T>& in, bool reduce, T* kl, int n_threads) {
  const int64_t n_tasks = (in.N + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < n_tasks; ++t) {
    const int64_t r0 = t * kRowsPerTask;
    forward_rows(family, in, r0, std::min(in.N, r0 + kRowsPerTask), reduce, kl);
  }
}

template <typename T>
void family_kl_backward(int family, const T* grad_kl, const FamilyKLIn<T>& in, bool reduce, T* dq_loc,
                        T* dq_log_param, T* dp_loc, T* dp_log_param, int n_threads) {
  const int64_t n_tasks = (in.N + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < n_tasks; ++t) {
    const int64_t r0 = t * kRowsPerTask;
    backward_rows(family, grad_kl, in, r0, std::min(in.N, r0 + kRowsPerTask), reduce, dq_loc, dq_log_param,
                  dp_loc, dp_log_param);
  }
}

template void family_kl_forward<float>(int, const FamilyKLIn<float>&, bool, float*, int);
template void family_kl_forward<double>(int, const FamilyKLIn<double>&, bool, double*, int);
template void family_kl_backward<float>(int, const float*, const FamilyKLIn<float>&, bool, float*, float*, float*,
                                        float*, int);
template void family_kl_backward<double>(int, const double*, const FamilyKLIn<double>&, bool, double*, double*,
                                         double*, double*, int);

template <typename T>
void family_kl_forward_rows(int family, const FamilyKLIn<T>& in, int64_t r0, int64_t r1, T* kl) {
  forward_rows(family, in, r0, r1, true, kl);
}

template <typename T>
void family_kl_add_backward(int family, const T* grad_kl, const FamilyKLIn<T>& in, int64_t e0, int64_t n,
                            T* dq_loc, T* dq_log_param, T* dp_loc, T* dp_log_param) {
  add_backward(family, grad_kl, in, e0, n, dq_loc, dq_log_param, dp_loc, dp_log_param);
}

template void family_kl_forward_rows<float>(int, const FamilyKLIn<float>&, int64_t, int64_t, float*);
template void family_kl_forward_rows<double>(int, const FamilyKLIn<double>&, int64_t, int64_t, double*);
template void family_kl_add_backward<float>(int, const float*, const FamilyKLIn<float>&, int64_t, int64_t, float*,
                                            float*, float*, float*);
template void family_kl_add_backward<double>(int, const double*, const FamilyKLIn<double>&, int64_t, int64_t,
                                             double*, double*, double*, double*);

}  // namespace fastvae
