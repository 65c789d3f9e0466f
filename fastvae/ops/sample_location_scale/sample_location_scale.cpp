// sample_location_scale on the CPU: z = loc + exp(log_scale) * e
// with e = F^-1(u) of a standardized family (uniform, Laplace, logistic,
// Gumbel, Cauchy), u the element's Philox uniform (one word per element: lane
// i % 4 of counter i // 4), and log q(z) = sum_l(log f(e) - log_scale) from
// the same e. The backward regenerates e instead of reading it.
//
// The family is a template parameter (the standardized inverse CDF as a
// compile-time variant); one runtime switch per call picks the instantiation.
// The loops over (K, N, L) are the family samplers' (csrc/sampler.h).
//
// The _kl variants add a closed-form KL of (loc, log_scale) against a prior
// (family_kl's, in its layout) inside the same loops: its row sums once a
// tile of z is drawn, its gradients added to each block of the sampler's
// while they are in cache. One pass over q each way instead of two, and no
// separate sum of the two gradients.
#include <algorithm>
#include <cmath>

#include "family_kl/family_kl.h"
#include "sample_location_scale.h"
#include "sampler.h"

namespace fastvae {
namespace {

using sampler::kBlock;
using sampler::log_t;

// log(1 - v) for v in (0, 1/2], to v's relative precision: log w corrected by
// the rounding of w = 1 - v (Goldberg), or -v where w rounds to 1. (Not
// sampler::log1m's guarded division: the float32 bits follow the form.)
FASTVAE_INLINE float log1m(float v) {
  const float w = 1.0f - v;
  return w == 1.0f ? -v : fast_log_positive(w) * (-v / (w - 1.0f));
}
FASTVAE_INLINE double log1m(double v) { return std::log1p(-v); }

enum Family : int { kUniform = 0, kLaplace = 1, kLogistic = 2, kGumbel = 3, kCauchy = 4 };

// cos and sin of pi w for w in (0, 1/2].
FASTVAE_INLINE void cos_sin_pi(float w, float& c, float& s) { cos_sin_turns(0.5f * w, c, s); }
FASTVAE_INLINE void cos_sin_pi(double w, double& c, double& s) {
  c = std::cos(3.141592653589793 * w);
  s = std::sin(3.141592653589793 * w);
}

// e = F^-1(u), log f(e) and psi(e) = d log f / de of the standardized family,
// from the word x (so the tails keep their bits: see the oracle's standardized, __init__.py).
template <int F, typename T>
FASTVAE_INLINE void standardized(int32_t x, T& e, T& log_f, T& psi) {
  T u, v;
  open_uniforms(x, u, v);
  const bool lower = x < kHalfWord;
  if constexpr (F == kUniform) {
    e = u;
    log_f = T(0);
    psi = T(0);
  } else if constexpr (F == kLaplace) {
    const T a = log_t(T(2) * (lower ? u : v));  // <= 0
    e = lower ? a : -a;
    log_f = a - T(0.6931471805599453);
    psi = lower ? T(1) : T(-1);
  } else if constexpr (F == kLogistic) {
    const T lu = log_t(u), lv = log_t(v);
    e = lu - lv;
    log_f = lu + lv;
    psi = v - u;
  } else if constexpr (F == kGumbel) {
    const T t = lower ? -log_t(u) : -log1m(v);  // the Exp(1) variate -log u
    e = -log_t(t);
    log_f = -e - t;
    psi = t - T(1);
  } else {  // Cauchy: e = -/+ cot(pi w), w = min(u, v); 1 + e^2 = 1 / sin^2
    T c, s;
    cos_sin_pi(lower ? u : v, c, s);
    const T sign = lower ? T(-1) : T(1);
    e = sign * c / s;
    log_f = T(2) * log_t(s) - T(1.1447298858494002);  // log pi
    psi = T(-2) * sign * c * s;
  }
}

// exp for a block
FASTVAE_CLONES void exp_block(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = fast_exp(x[i]);
}
FASTVAE_INLINE void exp_block(const double* x, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp(x[i]);
}

// The transform of a block of words. The float32 loops are ISA-cloned entry
// points (clones cannot be templates: one per family, by macro); float64 runs
// libm and is the precise path, not the fast one.
template <int F>
FASTVAE_INLINE void noise_block(const int32_t* x, int64_t n, double* e, double* log_f, double* psi) {
  for (int64_t i = 0; i < n; ++i) standardized<F, double>(x[i], e[i], log_f[i], psi[i]);
}

#define FASTVAE_LS_NOISE_F32(F)                                                                        \
  FASTVAE_CLONES void noise_block_f32_##F(const int32_t* x, int64_t n, float* e, float* log_f, float* psi) { \
    for (int64_t i = 0; i < n; ++i) standardized<F, float>(x[i], e[i], log_f[i], psi[i]);              \
  }
FASTVAE_LS_NOISE_F32(0)
FASTVAE_LS_NOISE_F32(1)
FASTVAE_LS_NOISE_F32(2)
FASTVAE_LS_NOISE_F32(3)
FASTVAE_LS_NOISE_F32(4)
#undef FASTVAE_LS_NOISE_F32

template <int F>
FASTVAE_INLINE void noise_block(const int32_t* x, int64_t n, float* e, float* log_f, float* psi) {
  if constexpr (F == 0) noise_block_f32_0(x, n, e, log_f, psi);
  else if constexpr (F == 1) noise_block_f32_1(x, n, e, log_f, psi);
  else if constexpr (F == 2) noise_block_f32_2(x, n, e, log_f, psi);
  else if constexpr (F == 3) noise_block_f32_3(x, n, e, log_f, psi);
  else noise_block_f32_4(x, n, e, log_f, psi);
}

// z = loc + s e and log f(e) - log_scale of a block in one sample; s = exp(log_scale) once per block.
template <int F, typename T>
struct ForwardBlock {
  ForwardBlock(const T* loc, const T* log_scale) : loc(loc), log_scale(log_scale) {}
  const T* loc;
  const T* log_scale;
  alignas(64) T s[kBlock], e[kBlock], psi[kBlock];

  void prepare(int64_t b0, int64_t n) { exp_block(log_scale + b0, n, s); }

  void draw(const int32_t* x, int64_t b0, int64_t n, T* z, T* log_f, bool with_log_q) {
    noise_block<F>(x, n, e, log_f, psi);
    const T* m = loc + b0;
    for (int64_t i = 0; i < n; ++i) z[i] = m[i] + s[i] * e[i];
    if (with_log_q) {
      const T* ls = log_scale + b0;
      for (int64_t i = 0; i < n; ++i) log_f[i] -= ls[i];
    }
  }
};

// dloc = sum_k dz_k (+ (sum_k dq_k psi_k) / s with stop_score),
// dlog_scale = s sum_k dz_k e_k + (sum_k dq_k psi_k e_k with stop_score, else -sum_k dq_k).
// The score's 1 / s multiplies the sum once: a zero sum stays 0 where 1 / s overflows.
template <int F, typename T>
struct BackwardBlock {
  BackwardBlock(const T* dz, const T* log_scale, bool stop_score, T* dloc, T* dlog_scale)
      : dz(dz), log_scale(log_scale), stop_score(stop_score), dloc(dloc), dlog_scale(dlog_scale) {}
  const T* dz;
  const T* log_scale;
  bool stop_score;
  T* dloc;
  T* dlog_scale;
  alignas(64) T e[kBlock], log_f[kBlock], psi[kBlock];
  alignas(64) T acc_z[kBlock], acc_ze[kBlock], acc_psi[kBlock], acc_q[kBlock];

  void start(int64_t n) {
    for (int64_t i = 0; i < n; ++i) acc_z[i] = acc_ze[i] = acc_psi[i] = acc_q[i] = T(0);
  }

  void step(const int32_t* x, int64_t, int64_t base, int64_t n, const T* gq) {
    noise_block<F>(x, n, e, log_f, psi);
    if (dz) {
      const T* g = dz + base;
      for (int64_t i = 0; i < n; ++i) {
        acc_z[i] += g[i];
        acc_ze[i] += g[i] * e[i];
      }
    }
    if (gq) {
      if (stop_score) {
        for (int64_t i = 0; i < n; ++i) {
          acc_psi[i] += gq[i] * psi[i];
          acc_q[i] += gq[i] * psi[i] * e[i];
        }
      } else {
        for (int64_t i = 0; i < n; ++i) acc_q[i] -= gq[i];
      }
    }
  }

  void finish(int64_t b0, int64_t n) {
    alignas(64) T s[kBlock];
    exp_block(log_scale + b0, n, s);
    for (int64_t i = 0; i < n; ++i) {
      const T score = acc_psi[i] == T(0) ? T(0) : acc_psi[i] / s[i];
      dloc[b0 + i] = acc_z[i] + score;
      dlog_scale[b0 + i] = s[i] * acc_ze[i] + acc_q[i];
    }
  }
};

}  // namespace

template <typename T>
void sample_location_scale_forward(const T* loc, const T* log_scale, uint64_t seed, int family, uint64_t offset0,
                                   uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L,
                                   T* z, T* log_q, int n_threads) {
  sampler::by_family<5>(family, [&](auto f) {
    sampler::forward_rows<T>(seed, offset0, sample_stride, row_stride, K, N, L, z, log_q, n_threads,
                             [&] { return ForwardBlock<decltype(f)::value, T>(loc, log_scale); });
  });
}

template <typename T>
void sample_location_scale_backward(const T* dz, const T* dlog_q, const T* loc, const T* log_scale, uint64_t seed,
                                    int family, bool stop_score, int64_t K, int64_t N, int64_t L, T* dloc,
                                    T* dlog_scale, int n_threads) {
  (void)loc;  // z's path does not need loc: dz/dloc = 1, dz/dlog_scale = s e
  sampler::by_family<5>(family, [&](auto f) {
    sampler::backward_blocks<T>(dlog_q, seed, K, N, L, n_threads, [&] {
      return BackwardBlock<decltype(f)::value, T>(dz, log_scale, stop_score, dloc, dlog_scale);
    });
  });
}

template <typename T>
void sample_location_scale_kl_forward(const T* loc, const T* log_scale, const T* prior_loc,
                                      const T* prior_log_scale, bool prior_shared, uint64_t seed, int family,
                                      int kl_family, int64_t K, int64_t N, int64_t L, T* z, T* kl, int n_threads) {
  const FamilyKLIn<T> in{loc, log_scale, prior_loc, prior_log_scale, prior_shared, N, L};
  sampler::by_family<5>(family, [&](auto f) {
    sampler::forward_rows<T>(
        seed, 0, N * L, L, K, N, L, z, nullptr, n_threads,
        [&] { return ForwardBlock<decltype(f)::value, T>(loc, log_scale); },
        [&](int64_t r0, int64_t r1) { family_kl_forward_rows<T>(kl_family, in, r0, r1, kl); });
  });
}

template <typename T>
void sample_location_scale_kl_backward(const T* dz, const T* grad_kl, const T* loc, const T* log_scale,
                                       const T* prior_loc, const T* prior_log_scale, bool prior_shared,
                                       uint64_t seed, int family, int kl_family, int64_t K, int64_t N, int64_t L,
                                       T* dloc, T* dlog_scale, T* dprior_loc, T* dprior_log_scale, int n_threads) {
  const FamilyKLIn<T> in{loc, log_scale, prior_loc, prior_log_scale, prior_shared, N, L};
  sampler::by_family<5>(family, [&](auto f) {
    sampler::backward_blocks<T>(
        nullptr, seed, dz ? K : 0, N, L, n_threads,  // no grad_z: no sample's terms, the KL's gradients alone
        [&] { return BackwardBlock<decltype(f)::value, T>(dz, log_scale, false, dloc, dlog_scale); },
        [&](int64_t b0, int64_t n) {
          if (grad_kl) {
            family_kl_add_backward<T>(kl_family, grad_kl, in, b0, n, dloc, dlog_scale, dprior_loc,
                                      dprior_log_scale);
          } else {  // no KL term: the prior's gradients are 0
            if (dprior_loc) std::fill(dprior_loc + b0, dprior_loc + b0 + n, T(0));
            if (dprior_log_scale) std::fill(dprior_log_scale + b0, dprior_log_scale + b0 + n, T(0));
          }
        });
  });
}

template void sample_location_scale_forward<float>(const float*, const float*, uint64_t, int, uint64_t, uint64_t,
                                                   uint64_t, int64_t, int64_t, int64_t, float*, float*, int);
template void sample_location_scale_forward<double>(const double*, const double*, uint64_t, int, uint64_t,
                                                    uint64_t, uint64_t, int64_t, int64_t, int64_t, double*,
                                                    double*, int);
template void sample_location_scale_backward<float>(const float*, const float*, const float*, const float*,
                                                    uint64_t, int, bool, int64_t, int64_t, int64_t, float*,
                                                    float*, int);
template void sample_location_scale_backward<double>(const double*, const double*, const double*, const double*,
                                                     uint64_t, int, bool, int64_t, int64_t, int64_t, double*,
                                                     double*, int);

template void sample_location_scale_kl_forward<float>(const float*, const float*, const float*, const float*, bool,
                                                      uint64_t, int, int, int64_t, int64_t, int64_t, float*, float*,
                                                      int);
template void sample_location_scale_kl_forward<double>(const double*, const double*, const double*, const double*,
                                                       bool, uint64_t, int, int, int64_t, int64_t, int64_t, double*,
                                                       double*, int);
template void sample_location_scale_kl_backward<float>(const float*, const float*, const float*, const float*,
                                                       const float*, const float*, bool, uint64_t, int, int, int64_t,
                                                       int64_t, int64_t, float*, float*, float*, float*, int);
template void sample_location_scale_kl_backward<double>(const double*, const double*, const double*, const double*,
                                                        const double*, const double*, bool, uint64_t, int, int,
                                                        int64_t, int64_t, int64_t, double*, double*, double*,
                                                        double*, int);

}  // namespace fastvae
