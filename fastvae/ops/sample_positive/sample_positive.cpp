// sample_positive on the CPU: the positive inverse-CDF families
// (exponential, Weibull, Kumaraswamy) as transforms of the Exp(1) variate
// t = -log u of the element's Philox uniform (one word per element: lane i % 4
// of counter i // 4), log q(z) summed over L from the same t. The backward
// regenerates t instead of reading it. The oracle's positive_terms (__init__.py)
// gives the closed forms; the family is a template parameter (a compile-time
// variant), one runtime switch per call picks the instantiation. The loops
// over (K, N, L) are the family samplers' (csrc/sampler.h).
//
// The _kl variants add family_kl's closed-form KL (the exponential's against
// an exponential, the Weibull's against a Weibull, the Kumaraswamy's against
// a Beta) inside the same loops:
// its row sums once a tile of z is drawn, its gradients added to each block
// of the sampler's while they are in cache. One pass over q each way instead
// of two, and no separate sum of the two gradients.
#include <algorithm>
#include <cmath>

#include "family_kl/family_kl.h"
#include "sample_positive.h"
#include "sampler.h"

namespace fastvae {
namespace {

using sampler::exp1;
using sampler::exp_t;
using sampler::kBlock;
using sampler::log1m;
using sampler::log_t;

enum Family : int { kExponential = 0, kWeibull = 1, kKumaraswamy = 2 };

// expm1(x) for x <= 0 (Kahan's form in float32; libm in float64).
FASTVAE_INLINE float expm1_neg(float x) {
  const float w = fast_exp(x);
  const bool one = w == 1.0f, zero = w == 0.0f;
  const float l = fast_log_positive(one || zero ? 0.5f : w);
  return one ? x : (zero ? -1.0f : (w - 1.0f) * x / l);
}
FASTVAE_INLINE double expm1_neg(double x) { return std::expm1(x); }

template <typename T> constexpr T kTiny = T(0x1p-126f);
template <> constexpr double kTiny<double> = 0x1p-1022;
template <typename T> constexpr T kTop = T(kBelowOne);
template <> constexpr double kTop<double> = 1.0 - 0x1p-53;

// (z, log f, c0, c1, f0, f1, s0, s1) of the family (the oracle's positive_terms).
template <int F, typename T>
FASTVAE_INLINE void terms(int32_t x, T p0, T p1, T& z, T& log_f, T& c0, T& c1, T& f0, T& f1, T& s0, T& s1) {
  const T t = exp1<T>(x);
  const T lt = log_t(t);
  if constexpr (F == kExponential) {
    z = t * exp_t(-p0);
    log_f = p0 - t;
    c0 = T(-1); c1 = T(0); f0 = T(1); f1 = T(0); s0 = t; s1 = T(0);
  } else if constexpr (F == kWeibull) {
    const T ik = exp_t(-p1), k = exp_t(p1);
    c1 = -lt * ik;
    const T w = (k - T(1)) - k * t;
    z = exp_t(p0 - c1);
    log_f = p1 - p0 + (T(1) - ik) * lt - t;
    c0 = T(1); f0 = T(-1); f1 = T(1) - c1; s0 = w; s1 = w * c1;
  } else {
    const T a = exp_t(p0), b = exp_t(p1), ia = exp_t(-p0);
    const T s = t * exp_t(-p1);
    const T y = exp_t(-s);
    const T m = -expm1_neg(-s);
    const T lm_hi = log1m(std::min(y, T(0.5))), lm_lo = log_t(m);
    const T log_m = s > T(0.6931471805599453) ? lm_hi : lm_lo;
    const T log_z = log_m * ia;
    z = std::min(std::max(exp_t(log_z), kTiny<T>), kTop<T>);
    const T r = s * y / m;
    const bool y0 = y == T(0);
    const T q = y0 ? -m : m * log_m / (y0 ? T(1) : y);
    log_f = p0 + p1 + (T(1) - ia) * log_m - t + s;
    c0 = -log_z;
    c1 = -r * ia;
    f0 = T(1) + log_z;
    f1 = T(1) - s - (T(1) - ia) * r;
    s0 = (b - T(1)) * q - (a - T(1)) * log_z;
    s1 = (b - T(1)) * s - (a - T(1)) * r * ia;
  }
}

// The per-element loops over a block: the float32 ones are ISA-cloned entry
// points (one per family, by macro: clones cannot be templates); float64 runs
// libm, the precise path.
template <int F, typename T>
FASTVAE_INLINE void fwd_loop(const int32_t* x, const T* p0, const T* p1, int64_t n, T* z, T* lf) {
  for (int64_t i = 0; i < n; ++i) {
    T c0, c1, f0, f1, s0, s1;
    terms<F, T>(x[i], p0[i], F == kExponential ? T(0) : p1[i], z[i], lf[i], c0, c1, f0, f1, s0, s1);
  }
}

template <int F, typename T, bool HZ, bool HQ, bool STOP>
FASTVAE_INLINE void bwd_loop_t(const int32_t* x, const T* p0, const T* p1, const T* dz, const T* gq, int64_t n,
                               T* a0, T* a1) {
  for (int64_t i = 0; i < n; ++i) {
    T z, lf, c0, c1, f0, f1, s0, s1;
    terms<F, T>(x[i], p0[i], F == kExponential ? T(0) : p1[i], z, lf, c0, c1, f0, f1, s0, s1);
    T d0 = T(0), d1 = T(0);
    if constexpr (HZ) {
      const T g = dz[i] * z;
      d0 += g * c0;
      d1 += g * c1;
    }
    if constexpr (HQ) {
      d0 += gq[i] * (STOP ? s0 : f0);
      d1 += gq[i] * (STOP ? s1 : f1);
    }
    a0[i] += d0;
    a1[i] += d1;
  }
}

// One branch-free loop per (grad_z given, grad_log_q given, stop_score).
template <int F, typename T>
FASTVAE_INLINE void bwd_loop(const int32_t* x, const T* p0, const T* p1, const T* dz, const T* gq, bool stop,
                             int64_t n, T* a0, T* a1) {
  if (dz && gq) {
    if (stop) bwd_loop_t<F, T, true, true, true>(x, p0, p1, dz, gq, n, a0, a1);
    else bwd_loop_t<F, T, true, true, false>(x, p0, p1, dz, gq, n, a0, a1);
  } else if (dz) {
    bwd_loop_t<F, T, true, false, false>(x, p0, p1, dz, gq, n, a0, a1);
  } else if (gq) {
    if (stop) bwd_loop_t<F, T, false, true, true>(x, p0, p1, dz, gq, n, a0, a1);
    else bwd_loop_t<F, T, false, true, false>(x, p0, p1, dz, gq, n, a0, a1);
  }
}

#define FASTVAE_POS_BLOCKS(F)                                                                                  \
  FASTVAE_CLONES void fwd_f32_##F(const int32_t* x, const float* p0, const float* p1, int64_t n, float* z,     \
                                  float* lf) {                                                                  \
    fwd_loop<F, float>(x, p0, p1, n, z, lf);                                                                    \
  }                                                                                                             \
  FASTVAE_CLONES void bwd_f32_##F(const int32_t* x, const float* p0, const float* p1, const float* dz,         \
                                  const float* gq, bool stop, int64_t n, float* a0, float* a1) {               \
    bwd_loop<F, float>(x, p0, p1, dz, gq, stop, n, a0, a1);                                                     \
  }
FASTVAE_POS_BLOCKS(0)
FASTVAE_POS_BLOCKS(1)
FASTVAE_POS_BLOCKS(2)
#undef FASTVAE_POS_BLOCKS

template <int F>
FASTVAE_INLINE void fwd_block(const int32_t* x, const float* p0, const float* p1, int64_t n, float* z, float* lf) {
  if constexpr (F == 0) fwd_f32_0(x, p0, p1, n, z, lf);
  else if constexpr (F == 1) fwd_f32_1(x, p0, p1, n, z, lf);
  else fwd_f32_2(x, p0, p1, n, z, lf);
}
template <int F>
FASTVAE_INLINE void fwd_block(const int32_t* x, const double* p0, const double* p1, int64_t n, double* z,
                              double* lf) {
  fwd_loop<F, double>(x, p0, p1, n, z, lf);
}
template <int F>
FASTVAE_INLINE void bwd_block(const int32_t* x, const float* p0, const float* p1, const float* dz, const float* gq,
                              bool stop, int64_t n, float* a0, float* a1) {
  if constexpr (F == 0) bwd_f32_0(x, p0, p1, dz, gq, stop, n, a0, a1);
  else if constexpr (F == 1) bwd_f32_1(x, p0, p1, dz, gq, stop, n, a0, a1);
  else bwd_f32_2(x, p0, p1, dz, gq, stop, n, a0, a1);
}
template <int F>
FASTVAE_INLINE void bwd_block(const int32_t* x, const double* p0, const double* p1, const double* dz,
                              const double* gq, bool stop, int64_t n, double* a0, double* a1) {
  bwd_loop<F, double>(x, p0, p1, dz, gq, stop, n, a0, a1);
}

// z and log f of a block in one sample.
template <int F, typename T>
struct ForwardBlock {
  const T* p0;
  const T* p1;
  void prepare(int64_t, int64_t) {}
  void draw(const int32_t* x, int64_t b0, int64_t n, T* z, T* lf, bool) {
    fwd_block<F>(x, p0 + b0, p1 + b0, n, z, lf);
  }
};

// dlog_p_j = sum_k dz_k z_k c_j + dq_k (s_j with stop_score, else f_j).
template <int F, typename T>
struct BackwardBlock {
  BackwardBlock(const T* dz, const T* p0, const T* p1, bool stop_score, T* d0, T* d1)
      : dz(dz), p0(p0), p1(p1), stop_score(stop_score), d0(d0), d1(d1) {}
  const T* dz;
  const T* p0;
  const T* p1;
  bool stop_score;
  T* d0;
  T* d1;
  alignas(64) T a0[kBlock], a1[kBlock];

  void start(int64_t n) {
    for (int64_t i = 0; i < n; ++i) a0[i] = a1[i] = T(0);
  }
  void step(const int32_t* x, int64_t b0, int64_t base, int64_t n, const T* gq) {
    bwd_block<F>(x, p0 + b0, p1 + b0, dz ? dz + base : nullptr, gq, stop_score, n, a0, a1);
  }
  void finish(int64_t b0, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      d0[b0 + i] = a0[i];
      d1[b0 + i] = a1[i];
    }
  }
};

}  // namespace

template <typename T>
void sample_positive_forward(const T* log_p0, const T* log_p1, uint64_t seed, int family, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L, T* z,
                             T* log_q, int n_threads) {
  sampler::by_family<3>(family, [&](auto f) {
    sampler::forward_rows<T>(seed, offset0, sample_stride, row_stride, K, N, L, z, log_q, n_threads,
                             [&] { return ForwardBlock<decltype(f)::value, T>{log_p0, log_p1}; });
  });
}

template <typename T>
void sample_positive_backward(const T* dz, const T* dlog_q, const T* log_p0, const T* log_p1, uint64_t seed,
                              int family, bool stop_score, int64_t K, int64_t N, int64_t L, T* dlog_p0, T* dlog_p1,
                              int n_threads) {
  sampler::by_family<3>(family, [&](auto f) {
    sampler::backward_blocks<T>(dlog_q, seed, K, N, L, n_threads, [&] {
      return BackwardBlock<decltype(f)::value, T>(dz, log_p0, log_p1, stop_score, dlog_p0, dlog_p1);
    });
  });
}

// family_kl's layout of the parameters: the exponential's log-rates alone (no
// location), the Weibull's (log scale, log concentration) and the Kumaraswamy's
// (log a, log b) with their priors' pairs as (loc, log_param).
namespace {
template <typename T>
FamilyKLIn<T> kl_in(int kl_family, const T* log_p0, const T* log_p1, const T* prior_log_p0, const T* prior_log_p1,
                    bool prior_shared, int64_t N, int64_t L) {
  if (!family_kl_has_loc(kl_family)) return {nullptr, log_p0, nullptr, prior_log_p0, prior_shared, N, L};
  return {log_p0, log_p1, prior_log_p0, prior_log_p1, prior_shared, N, L};
}
}  // namespace

template <typename T>
void sample_positive_kl_forward(const T* log_p0, const T* log_p1, const T* prior_log_p0, const T* prior_log_p1,
                                bool prior_shared, uint64_t seed, int family, int kl_family, int64_t K, int64_t N,
                                int64_t L, T* z, T* kl, int n_threads) {
  const FamilyKLIn<T> in = kl_in(kl_family, log_p0, log_p1, prior_log_p0, prior_log_p1, prior_shared, N, L);
  sampler::by_family<3>(family, [&](auto f) {
    sampler::forward_rows<T>(
        seed, 0, N * L, L, K, N, L, z, nullptr, n_threads,
        [&] { return ForwardBlock<decltype(f)::value, T>{log_p0, log_p1}; },
        [&](int64_t r0, int64_t r1) { family_kl_forward_rows<T>(kl_family, in, r0, r1, kl); });
  });
}

template <typename T>
void sample_positive_kl_backward(const T* dz, const T* grad_kl, const T* log_p0, const T* log_p1,
                                 const T* prior_log_p0, const T* prior_log_p1, bool prior_shared, uint64_t seed,
                                 int family, int kl_family, int64_t K, int64_t N, int64_t L, T* dlog_p0, T* dlog_p1,
                                 T* dprior_log_p0, T* dprior_log_p1, int n_threads) {
  const FamilyKLIn<T> in = kl_in(kl_family, log_p0, log_p1, prior_log_p0, prior_log_p1, prior_shared, N, L);
  const bool has_loc = family_kl_has_loc(kl_family);
  // family_kl's gradients in its layout: the exponential's go to the log-rates' alone
  T* dq_loc = has_loc ? dlog_p0 : nullptr;
  T* dq_log_param = has_loc ? dlog_p1 : dlog_p0;
  T* dp_loc = has_loc ? dprior_log_p0 : nullptr;
  T* dp_log_param = has_loc ? dprior_log_p1 : dprior_log_p0;
  T* unwritten = has_loc ? nullptr : dprior_log_p1;  // the exponential's stand-in: 0
  sampler::by_family<3>(family, [&](auto f) {
    sampler::backward_blocks<T>(
        nullptr, seed, dz ? K : 0, N, L, n_threads,  // no grad_z: no sample's terms, the KL's gradients alone
        [&] { return BackwardBlock<decltype(f)::value, T>(dz, log_p0, log_p1, false, dlog_p0, dlog_p1); },
        [&](int64_t b0, int64_t n) {
          if (grad_kl) {
            family_kl_add_backward<T>(kl_family, grad_kl, in, b0, n, dq_loc, dq_log_param, dp_loc, dp_log_param);
          } else {  // no KL term: the prior's gradients are 0
            if (dprior_log_p0) std::fill(dprior_log_p0 + b0, dprior_log_p0 + b0 + n, T(0));
            if (dprior_log_p1) std::fill(dprior_log_p1 + b0, dprior_log_p1 + b0 + n, T(0));
          }
          if (grad_kl && unwritten) std::fill(unwritten + b0, unwritten + b0 + n, T(0));
        });
  });
}

template void sample_positive_forward<float>(const float*, const float*, uint64_t, int, uint64_t, uint64_t,
                                             uint64_t, int64_t, int64_t, int64_t, float*, float*, int);
template void sample_positive_forward<double>(const double*, const double*, uint64_t, int, uint64_t, uint64_t,
                                              uint64_t, int64_t, int64_t, int64_t, double*, double*, int);
template void sample_positive_backward<float>(const float*, const float*, const float*, const float*, uint64_t,
                                              int, bool, int64_t, int64_t, int64_t, float*, float*, int);
template void sample_positive_backward<double>(const double*, const double*, const double*, const double*,
                                               uint64_t, int, bool, int64_t, int64_t, int64_t, double*, double*,
                                               int);

template void sample_positive_kl_forward<float>(const float*, const float*, const float*, const float*, bool,
                                                uint64_t, int, int, int64_t, int64_t, int64_t, float*, float*, int);
template void sample_positive_kl_forward<double>(const double*, const double*, const double*, const double*, bool,
                                                 uint64_t, int, int, int64_t, int64_t, int64_t, double*, double*,
                                                 int);
template void sample_positive_kl_backward<float>(const float*, const float*, const float*, const float*,
                                                 const float*, const float*, bool, uint64_t, int, int, int64_t,
                                                 int64_t, int64_t, float*, float*, float*, float*, int);
template void sample_positive_kl_backward<double>(const double*, const double*, const double*, const double*,
                                                  const double*, const double*, bool, uint64_t, int, int, int64_t,
                                                  int64_t, int64_t, double*, double*, double*, double*, int);

}  // namespace fastvae
