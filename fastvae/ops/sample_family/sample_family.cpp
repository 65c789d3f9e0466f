// sample_location_scale and sample_positive on the CPU: a family sampler of
// two (N, L) parameters draws z (K, N, L) and log q (K, N) at the noise
// offsets and regenerates the noise in its backward; the family is a template
// parameter (a compile-time variant), one runtime switch per call picks the
// instantiation. The loops over (K, N, L) (namespace sampler, below) are the
// two ops'; each adds only its transform and its density.
//
// sample_location_scale: z = loc + exp(log_scale) * e with e = F^-1(u) of a
// standardized family (uniform, Laplace, logistic, Gumbel, Cauchy), u the
// element's Philox uniform (one word per element: lane i % 4 of counter
// i // 4), and log q(z) = sum_l(log f(e) - log_scale) from the same e.
//
// sample_positive: the positive inverse-CDF families (exponential, Weibull,
// Kumaraswamy) as transforms of the Exp(1) variate t = -log u of the
// element's Philox uniform, log q(z) summed over L from the same t. The
// oracle's positive_terms (__init__.py) gives the closed forms.
//
// The _kl variants add family_kl's closed-form KL of the parameters against
// a prior (in family_kl's layout: a family with a location for
// sample_location_scale; the exponential's against an exponential, the
// Weibull's against a Weibull, the Kumaraswamy's against a Beta) inside the
// same loops: its row sums once a tile of z is drawn, its gradients added to
// each block of the sampler's while they are in cache. One pass over q each
// way instead of two, and no separate sum of the two gradients.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "family_kl/family_kl.h"
#include "ops.h"
#include "philox.h"
#include "rows.h"
#include "sample_family.h"
#include "sampler.h"

namespace fastvae {
namespace sampler {

constexpr int64_t kBlock = 512;  // elements per vector block (stack buffers)

// The Exp(1) variate of a folded word: -log u below 1/2, -log1p(-v) above, so
// that the upper tail keeps its bits; both, then a select (vectorizes).
template <typename T>
FASTVAE_INLINE T exp1(int32_t x) {
  T u, v;
  open_uniforms(x, u, v);
  const T t_lo = -log_t(u), t_hi = -log1m(v);
  return x < kHalfWord ? t_lo : t_hi;
}

// fn(std::integral_constant<int, family>) for a family index in [0, Count):
// the family as a compile-time variant, one runtime switch per call.
template <int Count, int F = 0, typename Fn>
void by_family(int family, Fn fn) {
  if constexpr (F < Count) {
    if (family == F) return fn(std::integral_constant<int, F>{});
    return by_family<Count, F + 1>(family, fn);
  } else {
    throw std::invalid_argument("family must be in [0, " + std::to_string(Count) + "), got " +
                                std::to_string(family));
  }
}

// A hook that does nothing: forward_rows' after_tile, backward_blocks' after_block.
struct NoHook {
  void operator()(int64_t, int64_t) const {}
};

// The forward of a family sampler: z (K, N, L) and log_q (K, N) or null, at
// the noise offsets offset0 + k * sample_stride + n * row_stride + l, in
// tiles of whole rows (about kTileElems elements, one parallel work item
// each). make() gives each tile its Block, which has:
//   prepare(b0, n): once per block of elements b0 .. b0 + n - 1 of the
//     parameters, before its samples (what they share, such as the scale);
//   draw(x, b0, n, z, lf, with_log_q): z of the block in one sample from its
//     folded words x, and with_log_q the log-density terms lf, which are
//     summed per sample row in double.
// after_tile(r0, r1) runs once a tile's rows r0 .. r1 - 1 are drawn, while
// their parameters are in cache (a closed-form KL of the same parameters).
template <typename T, typename Make, typename AfterTile = NoHook>
void forward_rows(uint64_t seed, uint64_t offset0, uint64_t sample_stride, uint64_t row_stride, int64_t K,
                  int64_t N, int64_t L, T* z, T* log_q, int n_threads, Make make, AfterTile after_tile = {}) {
  const int64_t NL = N * L;
  const int64_t tile_rows = std::max<int64_t>(1, kTileElems / std::max<int64_t>(L, 1));
  const int64_t n_tiles = (N + tile_rows - 1) / tile_rows;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const int64_t r0 = tile * tile_rows;
    const int64_t r1 = std::min(N, r0 + tile_rows);
    auto block = make();
    // per (sample, row of the tile) sums of the log-density terms, in double
    std::vector<double> acc(log_q ? static_cast<size_t>(K * (r1 - r0)) : 0, 0.0);
    alignas(64) int32_t x[kBlock];
    alignas(64) T lf[kBlock];
    for (int64_t b0 = r0 * L; b0 < r1 * L; b0 += kBlock) {
      const int64_t n = std::min(kBlock, r1 * L - b0);
      block.prepare(b0, n);
      for (int64_t k = 0; k < K; ++k) {
        folded_words(seed, offset0 + static_cast<uint64_t>(k) * sample_stride, b0, n, L, row_stride, x);
        block.draw(x, b0, n, z + k * NL + b0, lf, log_q != nullptr);
        if (log_q) {
          double* a = acc.data() + k * (r1 - r0);
          for (int64_t i = 0; i < n;) {  // row runs of the block
            const int64_t row = (b0 + i) / L;
            const int64_t len = std::min(n - i, (row + 1) * L - (b0 + i));
            double sum = 0.0;
            for (int64_t j = i; j < i + len; ++j) sum += double(lf[j]);
            a[row - r0] += sum;
            i += len;
          }
        }
      }
    }
    if (log_q) {
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t row = r0; row < r1; ++row) {
          log_q[k * N + row] = static_cast<T>(acc[size_t(k * (r1 - r0) + row - r0)]);
        }
      }
    }
    after_tile(r0, r1);
  }
}

// The backward of a family sampler over the flat elements of its (N, L)
// parameters in blocks of kBlock (one parallel work item each), with the noise
// regenerated at the training layout's offsets k * N * L + i. make() gives
// each block its Block, which has:
//   start(n): its sums set to 0;
//   step(x, b0, base, n, gq): sample k's terms of the block from its folded
//     words x (base = k * N * L + b0, grad_z's offset) and each element's
//     dlog_q[k, row] (gq; null when dlog_q is);
//   finish(b0, n): the gradients of elements b0 .. b0 + n - 1 from the sums.
// after_block(b0, n) runs once they are written, while they are in cache (a
// closed-form KL's gradients added to them).
template <typename T, typename Make, typename AfterBlock = NoHook>
void backward_blocks(const T* dlog_q, uint64_t seed, int64_t K, int64_t N, int64_t L, int n_threads, Make make,
                     AfterBlock after_block = {}) {
  const int64_t NL = N * L;
  parallel_blocks<kBlock>(NL, n_threads, [&](int64_t b0, int64_t n) {
    auto block = make();
    block.start(n);
    alignas(64) int32_t x[kBlock];
    alignas(64) T gq[kBlock];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t base = k * NL + b0;
      folded_words(seed, static_cast<uint64_t>(base), n, x);
      if (dlog_q) spread_rows(dlog_q + k * N, b0, n, L, gq);
      block.step(x, b0, base, n, dlog_q ? gq : nullptr);
    }
    block.finish(b0, n);
    after_block(b0, n);
  });
}

}  // namespace sampler

// -- sample_location_scale ----------------------------------------------------
namespace {
namespace location_scale {

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

// z = loc + s e and log f(e) - log_scale of a block in one sample; s = exp(log_scale) once per block,
// or with `scale` the scales as they are (no log_q then: log_scale is null).
template <int F, typename T>
struct ForwardBlock {
  ForwardBlock(const T* loc, const T* log_scale, const T* scale = nullptr)
      : loc(loc), log_scale(log_scale), scale(scale) {}
  const T* loc;
  const T* log_scale;
  const T* scale;
  const T* sp = nullptr;  // the block's scales: s, or scale's own
  alignas(64) T s[kBlock], e[kBlock], psi[kBlock];

  void prepare(int64_t b0, int64_t n) {
    if (scale) {
      sp = scale + b0;
      return;
    }
    exp_block(log_scale + b0, n, s);
    sp = s;
  }

  void draw(const int32_t* x, int64_t b0, int64_t n, T* z, T* log_f, bool with_log_q) {
    noise_block<F>(x, n, e, log_f, psi);
    const T* m = loc + b0;
    const T* __restrict st = sp;
    for (int64_t i = 0; i < n; ++i) z[i] = m[i] + st[i] * e[i];
    if (with_log_q) {
      const T* ls = log_scale + b0;
      for (int64_t i = 0; i < n; ++i) log_f[i] -= ls[i];
    }
  }
};

// dloc = sum_k dz_k (+ (sum_k dq_k psi_k) / s with stop_score),
// dlog_scale = s sum_k dz_k e_k + (sum_k dq_k psi_k e_k with stop_score, else -sum_k dq_k).
// The score's 1 / s multiplies the sum once: a zero sum stays 0 where 1 / s overflows.
// With `scale`, s is read as it is (log_scale is null).
template <int F, typename T>
struct BackwardBlock {
  BackwardBlock(const T* dz, const T* log_scale, bool stop_score, T* dloc, T* dlog_scale, const T* scale = nullptr)
      : dz(dz), log_scale(log_scale), scale(scale), stop_score(stop_score), dloc(dloc), dlog_scale(dlog_scale) {}
  const T* dz;
  const T* log_scale;
  const T* scale;
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
    add_terms(dz ? dz + base : nullptr, gq, n);
  }

  // One sample's terms from the block's e and psi: z's gradient g and log q's
  // gq per element, each null when it has none.
  void add_terms(const T* g, const T* gq, int64_t n) {
    if (g) {
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
    alignas(64) T s_buf[kBlock];
    const T* s = s_buf;
    if (scale) {
      s = scale + b0;
    } else {
      exp_block(log_scale + b0, n, s_buf);
    }
    for (int64_t i = 0; i < n; ++i) {
      const T score = acc_psi[i] == T(0) ? T(0) : acc_psi[i] / s[i];
      dloc[b0 + i] = acc_z[i] + score;
      dlog_scale[b0 + i] = s[i] * acc_ze[i] + acc_q[i];
    }
  }
};

// out[i] = log(scale[i]) with log's values at the edges (fast_log_of_scale;
// libm's in float64): the log-scales the KL reads where the kernels take scales.
FASTVAE_CLONES void log_of_scale_f32(const float* scale, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = fast_log_of_scale(scale[i]);
}
FASTVAE_INLINE void log_of_scale(const float* scale, int64_t n, float* out) { log_of_scale_f32(scale, n, out); }
FASTVAE_INLINE void log_of_scale(const double* scale, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::log(scale[i]);
}

// -- the log-ratio to the family's own prior ------------------------------------
//
// The _ratio variants write log q(z) - log p(z) in log_q's place for a prior of
// the posterior's own family with parameters (a, b) of shape (L,) shared by the
// rows (a torch Laplace(loc, scale), Gumbel, Cauchy, Uniform(low, high)): the
// importance weight's latent term in the draw's own loop, instead of a second
// pass over z for log p(z) and another for its gradient.

// log(1 + x) for x >= 0, inf at inf, from one log: log(u) x / (u - 1) at
// u = 1 + x corrects u's rounding (Goldberg; u - 1 is exact below 2^24), x
// itself where u rounds to 1, log(u) alone above 2^24.
FASTVAE_INLINE float log1p_nonnegative(float x) {
  const float u = 1.0f + x;
  const float lu = fast_log_of_scale(u);
  const float corrected = lu * x / (u == 1.0f ? 1.0f : u - 1.0f);
  return u == 1.0f ? x : (x > 16777216.0f ? lu : corrected);
}
FASTVAE_INLINE double log1p_nonnegative(double x) { return std::log1p(x); }

// log f(t) and psi(t) = d log f / dt of the standardized family at t, for the
// prior (the uniform's support is tested on z itself, by the callers).
template <int F, typename T>
FASTVAE_INLINE void prior_density(T t, T& log_f, T& psi) {
  if constexpr (F == kUniform) {
    log_f = T(0);
    psi = T(0);
  } else if constexpr (F == kLaplace) {
    log_f = -std::abs(t) - T(0.6931471805599453);
    psi = t > T(0) ? T(-1) : (t < T(0) ? T(1) : T(0));  // torch's |t|' is 0 at 0
  } else if constexpr (F == kLogistic) {
    log_f = -t - T(2) * softplus_t(-t);
    psi = T(1) - T(2) * sigmoid_t(t);
  } else if constexpr (F == kGumbel) {
    const T et = exp_t(-t);
    log_f = -t - et;
    psi = et - T(1);
  } else {  // Cauchy
    const T t2 = t * t;
    log_f = -T(1.1447298858494002) - log1p_nonnegative(t2);
    psi = T(-2) * t / (T(1) + t2);
  }
}

// The prior's (L,) parameters laid out for blocks of kBlock elements: element
// j of a block whose first element sits at column c reads column (c + j) % L
// at [c + j]. a: the location (the uniform's low); inv: 1 / scale (1 / (high
// - low)); hi: the uniform's high; log_b: log scale (log(high - low)).
template <typename T>
class RatioPrior {
 public:
  RatioPrior(const T* a, const T* b, int family, int64_t L) : L_(L) {
    const size_t len = static_cast<size_t>(L + kBlock);
    a_.resize(len);
    inv_.resize(len);
    hi_.resize(len);
    log_b_.resize(len);
    for (size_t j = 0; j < len; ++j) {
      const size_t l = j % static_cast<size_t>(L);
      const T width = family == kUniform ? b[l] - a[l] : b[l];
      a_[j] = a[l];
      hi_[j] = b[l];
      inv_[j] = T(1) / width;
      log_b_[j] = std::log(width);
    }
  }
  // the block's columns, its first element at flat index b0
  const T* a(int64_t b0) const { return a_.data() + b0 % L_; }
  const T* inv(int64_t b0) const { return inv_.data() + b0 % L_; }
  const T* hi(int64_t b0) const { return hi_.data() + b0 % L_; }
  const T* log_b(int64_t b0) const { return log_b_.data() + b0 % L_; }

 private:
  int64_t L_;
  std::vector<T> a_, inv_, hi_, log_b_;
};

// log_f[i] -= log p(z[i]) for a block: log f(t) - log b at t = (z - a) / b, or
// the uniform's -log(high - low) inside [low, high) and -inf outside.
template <int F, typename T>
FASTVAE_INLINE void subtract_prior(const T* z, int64_t n, const T* a, const T* inv, const T* hi, const T* log_b,
                                   T* log_f) {
  for (int64_t i = 0; i < n; ++i) {
    T lp;
    if constexpr (F == kUniform) {
      lp = (z[i] >= a[i]) & (z[i] < hi[i]) ? -log_b[i] : -std::numeric_limits<T>::infinity();
    } else {
      T lf, psi;
      prior_density<F, T>((z[i] - a[i]) * inv[i], lf, psi);
      lp = lf - log_b[i];
    }
    log_f[i] -= lp;
  }
}

// z's total gradient in one sample of a block of the ratio's backward, gz =
// dz - gq psi_p(t) / b (dz null: none), from the ratio's gq per element; with_dp,
// the prior's sums too: acc_pa += gq psi_p / b and acc_pb += gq (psi_p t + 1) / b
// (the uniform's: -gq / w and gq / w). One branch-free loop per term, so that
// each vectorizes.
template <int F, typename T>
FASTVAE_INLINE void ratio_step(const T* dz, const T* gq, const T* m, const T* s, const T* e, const T* a,
                               const T* inv, int64_t n, bool with_dp, T* gz, T* acc_pa, T* acc_pb) {
  if constexpr (F == kUniform) {  // no z gradient through the prior's density
    if (with_dp) {
      for (int64_t i = 0; i < n; ++i) {
        acc_pa[i] -= gq[i] * inv[i];
        acc_pb[i] += gq[i] * inv[i];
      }
    }
    for (int64_t i = 0; i < n; ++i) gz[i] = T(0);
  } else if (with_dp) {
    for (int64_t i = 0; i < n; ++i) {
      const T t = (m[i] + s[i] * e[i] - a[i]) * inv[i];
      T lf, psi_p;
      prior_density<F, T>(t, lf, psi_p);
      const T g = gq[i] * psi_p * inv[i];
      gz[i] = -g;
      acc_pa[i] += g;
      acc_pb[i] += gq[i] * (psi_p * t + T(1)) * inv[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      T lf, psi_p;
      prior_density<F, T>((m[i] + s[i] * e[i] - a[i]) * inv[i], lf, psi_p);
      gz[i] = -(gq[i] * psi_p * inv[i]);
    }
  }
  if (dz) {
    for (int64_t i = 0; i < n; ++i) gz[i] += dz[i];
  }
}

// float32: ISA-cloned entry points per family (clones cannot be templates)
#define FASTVAE_LS_RATIO_F32(F)                                                                                  \
  FASTVAE_CLONES void subtract_prior_f32_##F(const float* z, int64_t n, const float* a, const float* inv,         \
                                             const float* hi, const float* log_b, float* log_f) {                \
    subtract_prior<F, float>(z, n, a, inv, hi, log_b, log_f);                                                    \
  }                                                                                                              \
  FASTVAE_CLONES void ratio_step_f32_##F(const float* dz, const float* gq, const float* m, const float* s,        \
                                         const float* e, const float* a, const float* inv, int64_t n,            \
                                         bool with_dp, float* gz, float* acc_pa, float* acc_pb) {                \
    ratio_step<F, float>(dz, gq, m, s, e, a, inv, n, with_dp, gz, acc_pa, acc_pb);                               \
  }
FASTVAE_LS_RATIO_F32(0)
FASTVAE_LS_RATIO_F32(1)
FASTVAE_LS_RATIO_F32(2)
FASTVAE_LS_RATIO_F32(3)
FASTVAE_LS_RATIO_F32(4)
#undef FASTVAE_LS_RATIO_F32

template <int F, typename T>
FASTVAE_INLINE void subtract_prior_block(const T* z, int64_t n, const T* a, const T* inv, const T* hi,
                                         const T* log_b, T* log_f) {
  if constexpr (std::is_same_v<T, double>) {
    subtract_prior<F, double>(z, n, a, inv, hi, log_b, log_f);
  } else if constexpr (F == 0) {
    subtract_prior_f32_0(z, n, a, inv, hi, log_b, log_f);
  } else if constexpr (F == 1) {
    subtract_prior_f32_1(z, n, a, inv, hi, log_b, log_f);
  } else if constexpr (F == 2) {
    subtract_prior_f32_2(z, n, a, inv, hi, log_b, log_f);
  } else if constexpr (F == 3) {
    subtract_prior_f32_3(z, n, a, inv, hi, log_b, log_f);
  } else {
    subtract_prior_f32_4(z, n, a, inv, hi, log_b, log_f);
  }
}

template <int F, typename T>
FASTVAE_INLINE void ratio_step_block(const T* dz, const T* gq, const T* m, const T* s, const T* e, const T* a,
                                     const T* inv, int64_t n, bool with_dp, T* gz, T* acc_pa, T* acc_pb) {
  if constexpr (std::is_same_v<T, double>) {
    ratio_step<F, double>(dz, gq, m, s, e, a, inv, n, with_dp, gz, acc_pa, acc_pb);
  } else if constexpr (F == 0) {
    ratio_step_f32_0(dz, gq, m, s, e, a, inv, n, with_dp, gz, acc_pa, acc_pb);
  } else if constexpr (F == 1) {
    ratio_step_f32_1(dz, gq, m, s, e, a, inv, n, with_dp, gz, acc_pa, acc_pb);
  } else if constexpr (F == 2) {
    ratio_step_f32_2(dz, gq, m, s, e, a, inv, n, with_dp, gz, acc_pa, acc_pb);
  } else if constexpr (F == 3) {
    ratio_step_f32_3(dz, gq, m, s, e, a, inv, n, with_dp, gz, acc_pa, acc_pb);
  } else {
    ratio_step_f32_4(dz, gq, m, s, e, a, inv, n, with_dp, gz, acc_pa, acc_pb);
  }
}

// The forward's block: ForwardBlock's draw, then the prior's log-density
// subtracted from each element's log q term.
template <int F, typename T>
struct RatioForwardBlock : ForwardBlock<F, T> {
  RatioForwardBlock(const T* loc, const T* log_scale, const RatioPrior<T>& prior)
      : ForwardBlock<F, T>(loc, log_scale), prior(prior) {}
  const RatioPrior<T>& prior;

  void draw(const int32_t* x, int64_t b0, int64_t n, T* z, T* log_f, bool with_log_q) {
    ForwardBlock<F, T>::draw(x, b0, n, z, log_f, with_log_q);
    if (with_log_q) {
      subtract_prior_block<F, T>(z, n, prior.a(b0), prior.inv(b0), prior.hi(b0), prior.log_b(b0), log_f);
    }
  }
};

// The backward's block: the sums of BackwardBlock (whose finish writes dloc,
// dlog_scale) with z's gradient through the prior added, and the prior's
// gradients per element (summed over the samples) where dprior_a is not null.
template <int F, typename T>
struct RatioBackwardBlock : BackwardBlock<F, T> {
  using Base = BackwardBlock<F, T>;
  RatioBackwardBlock(const T* dz, const T* loc, const T* log_scale, bool stop_score, T* dloc, T* dlog_scale,
                     const RatioPrior<T>& prior, T* dprior_a, T* dprior_b)
      : Base(dz, log_scale, stop_score, dloc, dlog_scale), loc(loc), prior(prior), dprior_a(dprior_a),
        dprior_b(dprior_b) {}
  const T* loc;
  const RatioPrior<T>& prior;
  T* dprior_a;
  T* dprior_b;
  alignas(64) T s[kBlock], gz[kBlock], acc_pa[kBlock], acc_pb[kBlock];
  int64_t s_b0 = -1;  // the block whose scales s holds

  void start(int64_t n) {
    Base::start(n);
    for (int64_t i = 0; i < n; ++i) acc_pa[i] = acc_pb[i] = T(0);
  }

  void step(const int32_t* x, int64_t b0, int64_t base, int64_t n, const T* gq) {
    if (gq == nullptr) return Base::step(x, b0, base, n, gq);
    if (s_b0 != b0) {
      exp_block(this->log_scale + b0, n, s);
      s_b0 = b0;
    }
    noise_block<F>(x, n, this->e, this->log_f, this->psi);
    ratio_step_block<F, T>(this->dz ? this->dz + base : nullptr, gq, loc + b0, s, this->e, prior.a(b0),
                           prior.inv(b0), n, dprior_a != nullptr, gz, acc_pa, acc_pb);
    this->add_terms(gz, gq, n);  // z's total gradient and log q's score, as the draw's backward sums them
  }

  void finish(int64_t b0, int64_t n) {
    Base::finish(b0, n);
    if (dprior_a) {
      std::copy(acc_pa, acc_pa + n, dprior_a + b0);
      std::copy(acc_pb, acc_pb + n, dprior_b + b0);
    }
  }
};

}  // namespace location_scale
}  // namespace

template <typename T>
void sample_location_scale_forward(const T* loc, const T* log_scale, uint64_t seed, int family, uint64_t offset0,
                                   uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L,
                                   T* z, T* log_q, int n_threads) {
  sampler::by_family<5>(family, [&](auto f) {
    sampler::forward_rows<T>(seed, offset0, sample_stride, row_stride, K, N, L, z, log_q, n_threads,
                             [&] { return location_scale::ForwardBlock<decltype(f)::value, T>(loc, log_scale); });
  });
}

template <typename T>
void sample_location_scale_backward(const T* dz, const T* dlog_q, const T* loc, const T* log_scale, uint64_t seed,
                                    int family, bool stop_score, int64_t K, int64_t N, int64_t L, T* dloc,
                                    T* dlog_scale, int n_threads) {
  (void)loc;  // z's path does not need loc: dz/dloc = 1, dz/dlog_scale = s e
  sampler::by_family<5>(family, [&](auto f) {
    sampler::backward_blocks<T>(dlog_q, seed, K, N, L, n_threads, [&] {
      return location_scale::BackwardBlock<decltype(f)::value, T>(dz, log_scale, stop_score, dloc, dlog_scale);
    });
  });
}

template <typename T>
void sample_location_scale_kl_forward(const T* loc, const T* log_scale, const T* prior_loc,
                                      const T* prior_log_scale, bool prior_shared, uint64_t seed, int family,
                                      int kl_family, int64_t K, int64_t N, int64_t L, T* z, T* kl, int n_threads,
                                      bool of_scale) {
  const FamilyKLIn<T> in{loc, log_scale, prior_loc, prior_log_scale, prior_shared, N, L};
  const T* scale = of_scale ? log_scale : nullptr;  // of_scale: `log_scale` points at the scales
  sampler::by_family<5>(family, [&](auto f) {
    sampler::forward_rows<T>(
        seed, 0, N * L, L, K, N, L, z, nullptr, n_threads,
        [&] {
          return location_scale::ForwardBlock<decltype(f)::value, T>(loc, of_scale ? nullptr : log_scale, scale);
        },
        [&](int64_t r0, int64_t r1) {
          if (!of_scale) return family_kl_forward_rows<T>(kl_family, in, r0, r1, kl);
          // the KL of the tile's rows from their log-scales, taken once here while the tile is in cache
          const int64_t base = r0 * L, n = (r1 - r0) * L;
          std::vector<T> tile_log_scale(static_cast<size_t>(n));
          location_scale::log_of_scale(scale + base, n, tile_log_scale.data());
          FamilyKLIn<T> tile = in;
          tile.q_loc = loc + base;
          tile.q_log_param = tile_log_scale.data();
          if (!prior_shared) {
            tile.p_loc = prior_loc + base;
            tile.p_log_param = prior_log_scale + base;
          }
          tile.N = r1 - r0;
          family_kl_forward_rows<T>(kl_family, tile, 0, r1 - r0, kl + r0);
        });
  });
}

template <typename T>
void sample_location_scale_kl_backward(const T* dz, const T* grad_kl, const T* loc, const T* log_scale,
                                       const T* prior_loc, const T* prior_log_scale, bool prior_shared,
                                       uint64_t seed, int family, int kl_family, int64_t K, int64_t N, int64_t L,
                                       T* dloc, T* dlog_scale, T* dprior_loc, T* dprior_log_scale, int n_threads,
                                       bool of_scale) {
  FamilyKLIn<T> in{loc, log_scale, prior_loc, prior_log_scale, prior_shared, N, L};
  const FamilyKLPeriodicPrior<T> periodic(in);  // the KL's hook runs per block: its prior's columns laid out once
  const T* scale = of_scale ? log_scale : nullptr;  // of_scale: `log_scale` points at the scales
  sampler::by_family<5>(family, [&](auto f) {
    sampler::backward_blocks<T>(
        nullptr, seed, dz ? K : 0, N, L, n_threads,  // no grad_z: no sample's terms, the KL's gradients alone
        [&] {
          return location_scale::BackwardBlock<decltype(f)::value, T>(dz, of_scale ? nullptr : log_scale, false,
                                                                      dloc, dlog_scale, scale);
        },
        [&](int64_t b0, int64_t n) {
          if (grad_kl) {
            alignas(64) T block_log_scale[sampler::kBlock];
            FamilyKLIn<T> block = in;
            if (of_scale) {
              location_scale::log_of_scale(scale + b0, n, block_log_scale);
              block.q_log_param_block = block_log_scale;
            }
            family_kl_add_backward<T>(kl_family, grad_kl, block, b0, n, dloc, dlog_scale, dprior_loc,
                                      dprior_log_scale);
          } else {  // no KL term: the prior's gradients are 0
            if (dprior_loc) std::fill(dprior_loc + b0, dprior_loc + b0 + n, T(0));
            if (dprior_log_scale) std::fill(dprior_log_scale + b0, dprior_log_scale + b0 + n, T(0));
          }
          // of_scale: the scale's gradient, as autograd takes it through log_scale = log(scale)
          if (of_scale) {
            T* d = dlog_scale + b0;
            const T* sc = scale + b0;
            for (int64_t i = 0; i < n; ++i) d[i] = d[i] / sc[i];
          }
        });
  });
}

template <typename T>
void sample_location_scale_ratio_forward(const T* loc, const T* log_scale, const T* prior_a, const T* prior_b,
                                         uint64_t seed, int family, uint64_t offset0, uint64_t sample_stride,
                                         uint64_t row_stride, int64_t K, int64_t N, int64_t L, T* z, T* log_q,
                                         int n_threads) {
  const location_scale::RatioPrior<T> prior(prior_a, prior_b, family, L);
  sampler::by_family<5>(family, [&](auto f) {
    sampler::forward_rows<T>(seed, offset0, sample_stride, row_stride, K, N, L, z, log_q, n_threads, [&] {
      return location_scale::RatioForwardBlock<decltype(f)::value, T>(loc, log_scale, prior);
    });
  });
}

template <typename T>
void sample_location_scale_ratio_backward(const T* dz, const T* dlog_q, const T* loc, const T* log_scale,
                                          const T* prior_a, const T* prior_b, uint64_t seed, int family,
                                          bool stop_score, int64_t K, int64_t N, int64_t L, T* dloc, T* dlog_scale,
                                          T* dprior_a, T* dprior_b, int n_threads) {
  const location_scale::RatioPrior<T> prior(prior_a, prior_b, family, L);
  sampler::by_family<5>(family, [&](auto f) {
    sampler::backward_blocks<T>(dlog_q, seed, K, N, L, n_threads, [&] {
      return location_scale::RatioBackwardBlock<decltype(f)::value, T>(dz, loc, log_scale, stop_score, dloc,
                                                                       dlog_scale, prior, dprior_a, dprior_b);
    });
  });
}

template void sample_location_scale_ratio_forward<float>(const float*, const float*, const float*, const float*,
                                                         uint64_t, int, uint64_t, uint64_t, uint64_t, int64_t,
                                                         int64_t, int64_t, float*, float*, int);
template void sample_location_scale_ratio_forward<double>(const double*, const double*, const double*,
                                                          const double*, uint64_t, int, uint64_t, uint64_t, uint64_t,
                                                          int64_t, int64_t, int64_t, double*, double*, int);
template void sample_location_scale_ratio_backward<float>(const float*, const float*, const float*, const float*,
                                                          const float*, const float*, uint64_t, int, bool, int64_t,
                                                          int64_t, int64_t, float*, float*, float*, float*, int);
template void sample_location_scale_ratio_backward<double>(const double*, const double*, const double*,
                                                           const double*, const double*, const double*, uint64_t, int,
                                                           bool, int64_t, int64_t, int64_t, double*, double*, double*,
                                                           double*, int);
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
                                                      int, bool);
template void sample_location_scale_kl_forward<double>(const double*, const double*, const double*, const double*,
                                                       bool, uint64_t, int, int, int64_t, int64_t, int64_t, double*,
                                                       double*, int, bool);
template void sample_location_scale_kl_backward<float>(const float*, const float*, const float*, const float*,
                                                       const float*, const float*, bool, uint64_t, int, int, int64_t,
                                                       int64_t, int64_t, float*, float*, float*, float*, int, bool);
template void sample_location_scale_kl_backward<double>(const double*, const double*, const double*, const double*,
                                                        const double*, const double*, bool, uint64_t, int, int,
                                                        int64_t, int64_t, int64_t, double*, double*, double*,
                                                        double*, int, bool);

// -- sample_positive ----------------------------------------------------------
namespace {
namespace positive {

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

}  // namespace positive
}  // namespace

template <typename T>
void sample_positive_forward(const T* log_p0, const T* log_p1, uint64_t seed, int family, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L, T* z,
                             T* log_q, int n_threads) {
  sampler::by_family<3>(family, [&](auto f) {
    sampler::forward_rows<T>(seed, offset0, sample_stride, row_stride, K, N, L, z, log_q, n_threads,
                             [&] { return positive::ForwardBlock<decltype(f)::value, T>{log_p0, log_p1}; });
  });
}

template <typename T>
void sample_positive_backward(const T* dz, const T* dlog_q, const T* log_p0, const T* log_p1, uint64_t seed,
                              int family, bool stop_score, int64_t K, int64_t N, int64_t L, T* dlog_p0, T* dlog_p1,
                              int n_threads) {
  sampler::by_family<3>(family, [&](auto f) {
    sampler::backward_blocks<T>(dlog_q, seed, K, N, L, n_threads, [&] {
      return positive::BackwardBlock<decltype(f)::value, T>(dz, log_p0, log_p1, stop_score, dlog_p0, dlog_p1);
    });
  });
}

// family_kl's layout of the parameters: the exponential's log-rates alone (no
// location), the Weibull's (log scale, log concentration) and the Kumaraswamy's
// (log a, log b) with their priors' pairs as (loc, log_param).
namespace {
namespace positive {
template <typename T>
FamilyKLIn<T> kl_in(int kl_family, const T* log_p0, const T* log_p1, const T* prior_log_p0, const T* prior_log_p1,
                    bool prior_shared, int64_t N, int64_t L) {
  if (!family_kl_has_loc(kl_family)) return {nullptr, log_p0, nullptr, prior_log_p0, prior_shared, N, L};
  return {log_p0, log_p1, prior_log_p0, prior_log_p1, prior_shared, N, L};
}
}  // namespace positive
}  // namespace

template <typename T>
void sample_positive_kl_forward(const T* log_p0, const T* log_p1, const T* prior_log_p0, const T* prior_log_p1,
                                bool prior_shared, uint64_t seed, int family, int kl_family, int64_t K, int64_t N,
                                int64_t L, T* z, T* kl, int n_threads, bool of_scale) {
  if (of_scale) throw std::invalid_argument("of_scale: sample_positive takes its parameters as logs");
  const FamilyKLIn<T> in =
      positive::kl_in(kl_family, log_p0, log_p1, prior_log_p0, prior_log_p1, prior_shared, N, L);
  sampler::by_family<3>(family, [&](auto f) {
    sampler::forward_rows<T>(
        seed, 0, N * L, L, K, N, L, z, nullptr, n_threads,
        [&] { return positive::ForwardBlock<decltype(f)::value, T>{log_p0, log_p1}; },
        [&](int64_t r0, int64_t r1) { family_kl_forward_rows<T>(kl_family, in, r0, r1, kl); });
  });
}

template <typename T>
void sample_positive_kl_backward(const T* dz, const T* grad_kl, const T* log_p0, const T* log_p1,
                                 const T* prior_log_p0, const T* prior_log_p1, bool prior_shared, uint64_t seed,
                                 int family, int kl_family, int64_t K, int64_t N, int64_t L, T* dlog_p0, T* dlog_p1,
                                 T* dprior_log_p0, T* dprior_log_p1, int n_threads, bool of_scale) {
  if (of_scale) throw std::invalid_argument("of_scale: sample_positive takes its parameters as logs");
  FamilyKLIn<T> in = positive::kl_in(kl_family, log_p0, log_p1, prior_log_p0, prior_log_p1, prior_shared, N, L);
  const FamilyKLPeriodicPrior<T> periodic(in);  // the KL's hook runs per block: its prior's columns laid out once
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
        [&] {
          return positive::BackwardBlock<decltype(f)::value, T>(dz, log_p0, log_p1, false, dlog_p0, dlog_p1);
        },
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
                                                uint64_t, int, int, int64_t, int64_t, int64_t, float*, float*, int, bool);
template void sample_positive_kl_forward<double>(const double*, const double*, const double*, const double*, bool,
                                                 uint64_t, int, int, int64_t, int64_t, int64_t, double*, double*,
                                                 int, bool);
template void sample_positive_kl_backward<float>(const float*, const float*, const float*, const float*,
                                                 const float*, const float*, bool, uint64_t, int, int, int64_t,
                                                 int64_t, int64_t, float*, float*, float*, float*, int, bool);
template void sample_positive_kl_backward<double>(const double*, const double*, const double*, const double*,
                                                  const double*, const double*, bool, uint64_t, int, int, int64_t,
                                                  int64_t, int64_t, double*, double*, double*, double*, int, bool);

}  // namespace fastvae

// -- sample_concrete ------------------------------------------------------------
// sample_concrete on the CPU: relaxed one-hot (Concrete /
// Gumbel-softmax) samples of logits (N, L, C) at a temperature per latent,
// from C consecutive Philox uniforms per latent (one word per element: lane
// i % 4 of counter i // 4), and log q(z) summed over L from the same Exp(1)
// noise t = -log u (the Gumbel is -log t). The backward regenerates t instead
// of reading it, or reads the forward's relaxed z when its caller kept it
// (the eager operator: the noise is the costly part on the CPU). The oracle's concrete_terms (__init__.py) gives the closed forms;
// -inf logits mask their category (z_c = 0, left out of the density).

namespace fastvae {
namespace {
namespace concrete {

using sampler::exp_t;
using sampler::kTileElems;
using sampler::log1m;
using sampler::log_t;

// The Exp(1) variate of a folded word: -log u below 1/2, -log1p(-v) above.
// A branch here, not sampler::exp1's select: GCC vectorizes the two forms
// differently, and the float32 bits follow the form.
template <typename T>
FASTVAE_INLINE T exp1(int32_t x) {
  T u, v;
  open_uniforms(x, u, v);
  return x < kHalfWord ? -log_t(u) : -log1m(v);
}

// The per-element transcendentals run in loops over a whole tile (ISA clones
// for float32, as sample_positive's): t and log t of every element, then
// exp(y - m) of every element.

// t = the Exp(1) variate, lt = log t, of n folded words.
template <typename T>
FASTVAE_INLINE void noise_terms_t(const int32_t* x, int64_t n, T* t, T* lt) {
  for (int64_t i = 0; i < n; ++i) {
    const T tc = exp1<T>(x[i]);
    t[i] = tc;
    lt[i] = log_t(tc);
  }
}

FASTVAE_CLONES void noise_terms_f32(const int32_t* x, int64_t n, float* t, float* lt) { noise_terms_t(x, n, t, lt); }

// A scratch buffer left uninitialized: std::vector would first zero it, a
// pass over memory that its users overwrite anyway.
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  explicit Scratch(int64_t n) : p(new T[static_cast<size_t>(n)]) {}
  T* data() const { return p.get(); }
};

// A latent's count of unmasked categories (at most C), in an integer as wide
// as T, so that the loops across latents vectorize.
template <typename T>
using Count = std::conditional_t<std::is_same_v<T, float>, int32_t, int64_t>;

// out (cols, rows) <- in (rows, cols): in blocks of 8 x 8 (eight row loads,
// three rounds of shuffles, eight column stores), the edges element by
// element. A plain loop would not vectorize (its loads are strided by cols,
// which GCC gives up on), and the tiles pass every element through two or
// three of these. Only moves: the bits are the input's.
using Lanes8 = uint32_t __attribute__((vector_size(32)));

FASTVAE_INLINE void transpose_8x8(const uint32_t* in, int64_t in_stride, uint32_t* out, int64_t out_stride) {
  Lanes8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], in + i * in_stride, sizeof(Lanes8));
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved, per 128-bit half
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // then quads: u[i + k] holds columns k and k + 4 of four rows
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int k = 0; k < 4; ++k) {  // the halves of rows 0-3 and 4-7 joined
    const Lanes8 lo = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const Lanes8 hi = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    std::memcpy(out + k * out_stride, &lo, sizeof(Lanes8));
    std::memcpy(out + (k + 4) * out_stride, &hi, sizeof(Lanes8));
  }
}

FASTVAE_INLINE void transpose_u32(const uint32_t* __restrict in, int64_t rows, int64_t cols,
                                  uint32_t* __restrict out) {
  const int64_t rows8 = rows - rows % 8, cols8 = cols - cols % 8;
  for (int64_t r = 0; r < rows8; r += 8) {
    for (int64_t c = 0; c < cols8; c += 8) transpose_8x8(in + r * cols + c, cols, out + c * rows + r, rows);
    for (int64_t c = cols8; c < cols; ++c) {
      for (int64_t i = r; i < r + 8; ++i) std::memcpy(out + c * rows + i, in + i * cols + c, 4);
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t i = rows8; i < rows; ++i) std::memcpy(out + c * rows + i, in + i * cols + c, 4);
  }
}
FASTVAE_CLONES void transpose_u32_clones(const uint32_t* in, int64_t rows, int64_t cols, uint32_t* out) {
  transpose_u32(in, rows, cols, out);
}

// The same for any T: 4-byte elements (float32, the words) by their bits
// (every access a memcpy, so no type is read as another).
template <typename T>
FASTVAE_INLINE void transpose(const T* in, int64_t rows, int64_t cols, T* out) {
  if constexpr (sizeof(T) == 4) {
    transpose_u32_clones(reinterpret_cast<const uint32_t*>(in), rows, cols, reinterpret_cast<uint32_t*>(out));
  } else {
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = 0; r < rows; ++r) out[c * rows + r] = in[r * cols + c];
    }
  }
}

// A latent's C categories are too few for a vector, and its sums must run in
// category order (no -ffast-math: the bits follow the order), so a tile of J
// latents is held category-major, (C, J): every pass runs across the latents
// (vectorized), each latent's max and sums still in category order.
//
// The scratch of a tile: the words (latent-major, as drawn, then
// category-major), t, log t, the scores y and z, (C, J); per latent (J,) the
// max of the logits, 1 / lam, the max of y, the sums (of the unmasked
// categories: t, log t, y, z) and the count of unmasked categories.
template <typename T>
struct TileScratch {
  Scratch<int32_t> x, xc;
  Scratch<T> t, lt, y, z;
  Scratch<T> top, ilam, m, sum_t, sum_lt, sum_y, s;
  Scratch<Count<T>> cnt, arg;
  TileScratch(int64_t J, int64_t C)
      : x(J * C), xc(J * C), t(J * C), lt(J * C), y(J * C), z(J * C), top(J), ilam(J), m(J), sum_t(J), sum_lt(J),
        sum_y(J), s(J), cnt(J), arg(J) {}
};

// The scores y = (a - max a - log t) / lam of J latents (category-major a,
// t, lt, y), their max m and sums; masked (-inf) categories get y = -inf and
// t = 0 (so exp(y - m) = 0 needs no branch), and are left out of the sums.
// The shift by the largest logit changes neither z nor log q (only the
// logits' differences matter) but keeps y finite: (a - log t) / lam overflows
// for float32 logits above about 3e35 at lam = 1e-3.
template <typename T>
FASTVAE_INLINE void tile_scores_t(int64_t J, int64_t C, const T* __restrict a, const T* __restrict lam,
                                  T* __restrict t, const T* __restrict lt, T* __restrict y, T* __restrict top,
                                  T* __restrict ilam, T* __restrict m, T* __restrict sum_t, T* __restrict sum_lt,
                                  T* __restrict sum_y, Count<T>* __restrict cnt) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < J; ++j) top[j] = ninf;
  for (int64_t c = 0; c < C; ++c) {
    const T* ac = a + c * J;
    for (int64_t j = 0; j < J; ++j) top[j] = top[j] < ac[j] ? ac[j] : top[j];  // std::max's select
  }
  for (int64_t j = 0; j < J; ++j) {
    top[j] = top[j] == ninf ? T(0) : top[j];
    ilam[j] = T(1) / lam[j];
    m[j] = ninf;
    sum_t[j] = sum_lt[j] = sum_y[j] = T(0);
    cnt[j] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T *ac = a + c * J, *lc = lt + c * J;
    T *tc = t + c * J, *yc = y + c * J;
#pragma GCC ivdep
    for (int64_t j = 0; j < J; ++j) {
      const bool ok = ac[j] != ninf;
      const T v = ((ac[j] - top[j]) - lc[j]) * ilam[j];
      sum_t[j] += ok ? tc[j] : T(0);
      sum_lt[j] += ok ? lc[j] : T(0);
      sum_y[j] += ok ? v : T(0);
      cnt[j] += ok;
      tc[j] = ok ? tc[j] : T(0);
      const T yv = ok ? v : ninf;
      yc[j] = yv;
      m[j] = m[j] < yv ? yv : m[j];  // std::max's select, written out: its reference stops the vectorizer
    }
  }
}

// z = exp(y - m) of J latents, category-major.
template <typename T>
FASTVAE_INLINE void exp_shifted_t(int64_t J, int64_t C, const T* __restrict y, const T* __restrict m,
                                  T* __restrict z) {
  for (int64_t c = 0; c < C; ++c) {
    const T* yc = y + c * J;
    T* zc = z + c * J;
    for (int64_t j = 0; j < J; ++j) zc[j] = exp_t(yc[j] - m[j]);
  }
}

// z /= its sum s, category-major; lq given (the forward only), each latent's
// log q: lgammas[cnt] = lgamma(cnt) looked up (std::lgamma is a costly call,
// and a latent's count takes at most C + 1 values), and three logs:
// -sum_c log z_c = cnt (m + log s) - sum_c y_c over the unmasked categories.
// is: scratch (J,).
template <typename T>
FASTVAE_INLINE void tile_finish_t(int64_t J, int64_t C, const T* __restrict lam, T* __restrict z,
                                  T* __restrict s, T* __restrict is, const T* __restrict m,
                                  const T* __restrict sum_t, const T* __restrict sum_lt, const T* __restrict sum_y,
                                  const Count<T>* __restrict cnt, double* __restrict lq,
                                  const double* __restrict lgammas) {
  for (int64_t j = 0; j < J; ++j) s[j] = T(0);
  for (int64_t c = 0; c < C; ++c) {
    const T* zc = z + c * J;
    for (int64_t j = 0; j < J; ++j) s[j] += zc[j];
  }
  for (int64_t j = 0; j < J; ++j) is[j] = T(1) / s[j];
  for (int64_t c = 0; c < C; ++c) {
    T* zc = z + c * J;
    for (int64_t j = 0; j < J; ++j) zc[j] *= is[j];
  }
  if (!lq) return;
  for (int64_t j = 0; j < J; ++j) {
    const T cn = static_cast<T>(cnt[j]);
    lq[j] = lgammas[cnt[j]] + double(cn - T(1)) * double(log_t(lam[j])) +
            double(cn) * (double(m[j]) + double(log_t(s[j]))) - double(sum_y[j]) + double(sum_lt[j]) -
            double(cn) * double(log_t(sum_t[j]));
  }
}

FASTVAE_CLONES void tile_scores_f32(int64_t J, int64_t C, const float* a, const float* lam, float* t,
                                    const float* lt, float* y, float* top, float* ilam, float* m, float* sum_t,
                                    float* sum_lt, float* sum_y, int32_t* cnt) {
  tile_scores_t(J, C, a, lam, t, lt, y, top, ilam, m, sum_t, sum_lt, sum_y, cnt);
}
FASTVAE_CLONES void exp_shifted_f32(int64_t J, int64_t C, const float* y, const float* m, float* z) {
  exp_shifted_t(J, C, y, m, z);
}
FASTVAE_CLONES void tile_finish_f32(int64_t J, int64_t C, const float* lam, float* z, float* s, float* is,
                                    const float* m, const float* sum_t, const float* sum_lt, const float* sum_y,
                                    const int32_t* cnt, double* lq, const double* lgammas) {
  tile_finish_t(J, C, lam, z, s, is, m, sum_t, sum_lt, sum_y, cnt, lq, lgammas);
}

// z (C, J) <- the one-hot of each latent's first largest score y (y's argmax
// is the relaxed z's): the hard sample. best and arg: scratch (J,).
template <typename T>
FASTVAE_INLINE void tile_one_hot_t(int64_t J, int64_t C, const T* __restrict y, T* __restrict z,
                                   T* __restrict best, Count<T>* __restrict arg) {
  for (int64_t j = 0; j < J; ++j) {
    best[j] = y[j];
    arg[j] = 0;
  }
  for (int64_t c = 1; c < C; ++c) {
    const T* yc = y + c * J;
    for (int64_t j = 0; j < J; ++j) {
      const bool above = yc[j] > best[j];
      arg[j] = above ? Count<T>(c) : arg[j];
      best[j] = above ? yc[j] : best[j];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    T* zc = z + c * J;
    for (int64_t j = 0; j < J; ++j) zc[j] = arg[j] == c ? T(1) : T(0);
  }
}
FASTVAE_CLONES void tile_one_hot_f32(int64_t J, int64_t C, const float* y, float* z, float* best, int32_t* arg) {
  tile_one_hot_t(J, C, y, z, best, arg);
}

// w.z (C, J), normalized (one-hot when hard), with the per-latent sums and
// (lq given) log q of J latents from the words in w.x; a the latents'
// logits, category-major; lgammas[i] = lgamma(i) for i <= C, read when lq is
// given. relaxed given (hard only): the relaxed z, latent-major (J, C), is
// written there before the one-hot replaces it (the backward's z).
template <typename T>
FASTVAE_INLINE void tile_samples(TileScratch<T>& w, const T* a, const T* lam, int64_t J, int64_t C, bool hard,
                                 double* lq, const double* lgammas = nullptr, T* relaxed = nullptr) {
  transpose(w.x.data(), J, C, w.xc.data());
  if constexpr (std::is_same_v<T, float>) {  // the loops compiled per ISA level
    noise_terms_f32(w.xc.data(), J * C, w.t.data(), w.lt.data());
    tile_scores_f32(J, C, a, lam, w.t.data(), w.lt.data(), w.y.data(), w.top.data(), w.ilam.data(), w.m.data(),
                    w.sum_t.data(), w.sum_lt.data(), w.sum_y.data(), w.cnt.data());
    exp_shifted_f32(J, C, w.y.data(), w.m.data(), w.z.data());
    tile_finish_f32(J, C, lam, w.z.data(), w.s.data(), w.ilam.data(), w.m.data(), w.sum_t.data(), w.sum_lt.data(),
                    w.sum_y.data(), w.cnt.data(), lq, lgammas);
    if (relaxed) transpose(w.z.data(), C, J, relaxed);
    if (hard) tile_one_hot_f32(J, C, w.y.data(), w.z.data(), w.top.data(), w.arg.data());
  } else {
    noise_terms_t(w.xc.data(), J * C, w.t.data(), w.lt.data());
    tile_scores_t(J, C, a, lam, w.t.data(), w.lt.data(), w.y.data(), w.top.data(), w.ilam.data(), w.m.data(),
                  w.sum_t.data(), w.sum_lt.data(), w.sum_y.data(), w.cnt.data());
    exp_shifted_t(J, C, w.y.data(), w.m.data(), w.z.data());
    tile_finish_t(J, C, lam, w.z.data(), w.s.data(), w.ilam.data(), w.m.data(), w.sum_t.data(), w.sum_lt.data(),
                  w.sum_y.data(), w.cnt.data(), lq, lgammas);
    if (relaxed) transpose(w.z.data(), C, J, relaxed);
    if (hard) tile_one_hot_t(J, C, w.y.data(), w.z.data(), w.top.data(), w.arg.data());
  }
}

// The analytic categorical KL of latents, sum_c pi_c (log pi_c - log p_c)
// with pi = softmax(a): for each latent, top = max_c a (0 when every category
// is masked), e_c = exp(a_c - top), s = sum_c e_c, log pi_c = (a_c - top) -
// log s and KL = sum_c e_c ((a_c - top) - log p_c) / s - log s (sum_c pi_c =
// 1). A category with e_c = 0 (masked, or underflowed) adds 0, as torch's
// where(pi > 0, ...) does, even where log p_c = -inf. The noise plays no
// part: the sampler's kernels compute it only because they already hold the
// logits (one launch for z, log q and the KL).
//
// Category-major, as the tiles: (C, J) for J latents.
template <typename T>
struct KLScratch {
  Scratch<T> e, lp;                // (C, J): exp(a - top), log p of each latent's row
  Scratch<T> top, s, ls, kl;       // (J,)
  KLScratch(int64_t J, int64_t C) : e(J * C), lp(J * C), top(J), s(J), ls(J), kl(J) {}
};

// log_p (L, C) category-major, (C, L): each latent's category row of the
// scratch is then whole runs of one row of it (latent j's row is j % L), copied
// instead of read element by element with an index per latent.
template <typename T>
std::vector<T> log_p_by_category(const T* log_p, int64_t L, int64_t C) {
  std::vector<T> out(static_cast<size_t>(L * C));
  transpose(log_p, L, C, out.data());
  return out;
}

// The category-major passes over J latents (w's a and lp filled).
// The scratch arrays are distinct (__restrict): else the runtime alias checks
// GCC would need exceed what it versions a loop for, and the loops stay scalar.
template <typename T>
FASTVAE_INLINE void kl_passes_t(int64_t J, int64_t C, const T* __restrict a, T* __restrict e,
                                const T* __restrict lp, T* __restrict top, T* __restrict s, T* __restrict ls,
                                T* __restrict kl) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < J; ++j) top[j] = ninf;
  for (int64_t c = 0; c < C; ++c) {
    const T* ac = a + c * J;
    for (int64_t j = 0; j < J; ++j) top[j] = ac[j] > top[j] ? ac[j] : top[j];
  }
  for (int64_t j = 0; j < J; ++j) {
    top[j] = top[j] == ninf ? T(0) : top[j];
    s[j] = T(0);
    kl[j] = T(0);  // the sum of e_c ((a_c - top) - log p_c), until the last pass
  }
  for (int64_t c = 0; c < C; ++c) {
    const T *ac = a + c * J, *lc = lp + c * J;
    T* ec = e + c * J;
    for (int64_t j = 0; j < J; ++j) {
      const T x = exp_t(ac[j] - top[j]);
      ec[j] = x;
      s[j] += x;
      kl[j] += x > T(0) ? x * ((ac[j] - top[j]) - lc[j]) : T(0);
    }
  }
  for (int64_t j = 0; j < J; ++j) {
    ls[j] = log_t(s[j]);
    kl[j] = kl[j] / s[j] - ls[j];
  }
}
FASTVAE_CLONES void kl_passes_f32(int64_t J, int64_t C, const float* a, float* e, const float* lp, float* top,
                                  float* s, float* ls, float* kl) {
  kl_passes_t(J, C, a, e, lp, top, s, ls, kl);
}

// The KL terms of the J latents j0 .. j0 + J - 1 of logits a (category-major,
// (C, J)) against log_p, given category-major (C, L) (log_p_by_category), into w.
template <typename T>
void latents_kl(const T* a, const T* lp_cl, int64_t j0, int64_t J, int64_t L, int64_t C, KLScratch<T>& w) {
  for (int64_t c = 0; c < C; ++c) {  // row c of w.lp: row c of lp_cl repeated from column j0 % L
    const T* src = lp_cl + c * L;
    T* dst = w.lp.data() + c * J;
    for (int64_t j = 0, l = j0 % L; j < J; l = 0) {
      const int64_t len = std::min(J - j, L - l);
      std::copy(src + l, src + l + len, dst + j);
      j += len;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    kl_passes_f32(J, C, a, w.e.data(), w.lp.data(), w.top.data(), w.s.data(), w.ls.data(), w.kl.data());
  } else {
    kl_passes_t(J, C, a, w.e.data(), w.lp.data(), w.top.data(), w.s.data(), w.ls.data(), w.kl.data());
  }
}

// kl[row] <- the analytic KL of rows [r0, r1) of logits (N, L, C), summed over L in
// double; a the rows' logits category-major ((C, (r1 - r0) L)), log_p (C, L).
template <typename T>
void rows_kl(const T* a, const T* lp_cl, int64_t r0, int64_t r1, int64_t L, int64_t C, T* kl) {
  KLScratch<T> w((r1 - r0) * L, C);
  latents_kl(a, lp_cl, 0, (r1 - r0) * L, L, C, w);
  for (int64_t row = r0; row < r1; ++row) {
    double acc = 0.0;
    for (int64_t l = 0; l < L; ++l) acc += double(w.kl.data()[(row - r0) * L + l]);
    kl[row] = static_cast<T>(acc);
  }
}

// d KL_j / d a_c = pi_c ((log pi_c - log p_c) - KL_j), pi_c = e_c / s, times
// g[j], where e_c > 0 (else 0), category-major into d (C, J).
template <typename T>
FASTVAE_INLINE void kl_grad_t(int64_t J, int64_t C, const T* __restrict g, const T* __restrict a,
                              const T* __restrict e, const T* __restrict lp, const T* __restrict top,
                              const T* __restrict s, const T* __restrict ls, const T* __restrict kl,
                              T* __restrict d) {
  for (int64_t c = 0; c < C; ++c) {
    const T *ac = a + c * J, *ec = e + c * J, *lc = lp + c * J;
    T* dc = d + c * J;
    for (int64_t j = 0; j < J; ++j) {
      dc[j] = ec[j] > T(0) ? g[j] * (ec[j] * (T(1) / s[j])) * ((((ac[j] - top[j]) - ls[j]) - lc[j]) - kl[j]) : T(0);
    }
  }
}
FASTVAE_CLONES void kl_grad_f32(int64_t J, int64_t C, const float* g, const float* a, const float* e,
                                const float* lp, const float* top, const float* s, const float* ls, const float* kl,
                                float* d) {
  kl_grad_t(J, C, g, a, e, lp, top, s, ls, kl, d);
}

// Each latent's count of unmasked categories, of J latents (category-major
// logits a).
template <typename T>
FASTVAE_INLINE void unmasked_counts_t(int64_t J, int64_t C, const T* __restrict a, Count<T>* __restrict cnt) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < J; ++j) cnt[j] = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T* ac = a + c * J;
    for (int64_t j = 0; j < J; ++j) cnt[j] += ac[j] != ninf;
  }
}
FASTVAE_CLONES void unmasked_counts_f32(int64_t J, int64_t C, const float* a, int32_t* cnt) {
  unmasked_counts_t(J, C, a, cnt);
}

// The noise terms' factor 1 / lam: acc (C, J) <- acc * (1 / lam) per latent,
// 0 for a masked category. A division and a multiply, nothing to contract
// (FMA): the ISA clones give every CPU the same bits.
template <typename T>
FASTVAE_INLINE void scale_unmasked_t(int64_t J, int64_t C, const T* __restrict a, const T* __restrict lam,
                                     T* __restrict il, T* __restrict acc) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < J; ++j) il[j] = T(1) / lam[j];
  for (int64_t c = 0; c < C; ++c) {
    const T* ac = a + c * J;
    T* dc = acc + c * J;
    for (int64_t j = 0; j < J; ++j) dc[j] = ac[j] == ninf ? T(0) : dc[j] * il[j];
  }
}
FASTVAE_CLONES void scale_unmasked_f32(int64_t J, int64_t C, const float* a, const float* lam, float* il,
                                       float* acc) {
  scale_unmasked_t(J, C, a, lam, il, acc);
}

}  // namespace concrete
}  // namespace

using namespace concrete;

template <typename T>
void sample_concrete_forward(const T* logits, const T* temperature, uint64_t seed, bool hard, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L, int64_t C,
                             T* z, T* log_q, const T* log_p, T* kl, int n_threads, T* z_relaxed) {
  const int64_t LC = L * C, NLC = N * LC;
  if (K * N == 0) return;
  if (LC == 0) {
    if (log_q) std::fill(log_q, log_q + K * N, T(0));
    if (kl) std::fill(kl, kl + N, T(0));
    return;
  }
  const int64_t tile_rows = std::max<int64_t>(1, kTileElems / LC);
  const int64_t n_tiles = (N + tile_rows - 1) / tile_rows;
  std::vector<double> lgammas(static_cast<size_t>(C + 1));  // lgamma of a latent's count of unmasked categories
  for (int64_t i = 0; i <= C; ++i) lgammas[static_cast<size_t>(i)] = std::lgamma(double(i));
  const std::vector<T> lp_cl = kl ? log_p_by_category(log_p, L, C) : std::vector<T>();
#pragma omp parallel for num_threads(n_threads) schedule(static) collapse(2)
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      const int64_t r0 = tile * tile_rows, r1 = std::min(N, r0 + tile_rows);
      const int64_t J = (r1 - r0) * L, n = J * C;
      TileScratch<T> w(J, C);
      Scratch<T> a(n);  // the tile's logits, category-major
      transpose(logits + r0 * LC, J, C, a.data());
      Scratch<double> lq(log_q ? J : 0);
      folded_words(seed, offset0 + static_cast<uint64_t>(k) * sample_stride, r0 * LC, n, LC, row_stride, w.x.data());
      tile_samples(w, a.data(), temperature + r0 * L, J, C, hard, log_q ? lq.data() : nullptr, lgammas.data(),
                   hard && z_relaxed ? z_relaxed + k * NLC + r0 * LC : nullptr);
      transpose(w.z.data(), C, J, z + k * NLC + r0 * LC);
      if (log_q) {
        for (int64_t row = r0; row < r1; ++row) {
          double acc = 0.0;
          for (int64_t l = 0; l < L; ++l) acc += lq.data()[(row - r0) * L + l];
          log_q[k * N + row] = static_cast<T>(acc);
        }
      }
      if (kl && k == 0) rows_kl(a.data(), lp_cl.data(), r0, r1, L, C, kl);  // per row, not per sample
    }
  }
}

// The backward's per-latent terms run category-major as the forward's, across
// the latents of a block, in this function's own (baseline ISA) code: the
// ISA clones would contract its multiply-adds (FMA), and the bits would
// follow the CPU.
template <typename T>
void sample_concrete_backward(const T* dz, const T* dlog_q, const T* logits, const T* temperature, uint64_t seed,
                              bool stop_score, int64_t K, int64_t N, int64_t L, int64_t C, T* dlogits,
                              const T* dkl, const T* log_p, int n_threads, const T* z_saved) {
  const int64_t NL = N * L, NLC = NL * C;
  if (NLC == 0) return;
  const int64_t block = std::max<int64_t>(1, kTileElems / C);  // latents per block
  const int64_t n_blocks = (NL + block - 1) / block;
  // the forward's relaxed z (K, N, L, C), when given, is the z that
  // regenerating the noise gives, bit for bit: read instead, unless the
  // stop-score term, which needs the noise itself, is asked
  const bool from_z = z_saved != nullptr && !(stop_score && dlog_q);
  const std::vector<T> lp_cl = dkl ? log_p_by_category(log_p, L, C) : std::vector<T>();
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t j0 = blk * block, j1 = std::min(NL, j0 + block);
    const int64_t J = j1 - j0, n = J * C;
    const T* lam = temperature + j0;
    // category-major (C, J): the logits, the gradient so far, dz of a sample;
    // per latent (J,): sums of a sample's terms, and the row of each latent
    TileScratch<T> w(J, C);
    Scratch<T> a(n), acc(n), g(dz ? n : 0), zg(J), gq(J), cn(J), cl(J), it(J), b(J);
    Scratch<int64_t> row(J);
    transpose(logits + j0 * C, J, C, a.data());
    std::fill(acc.data(), acc.data() + n, T(0));
    if (dlog_q || dkl) {  // each latent's row, counted on (a division per latent costs more than the loops)
      for (int64_t j = 0, r = j0 / L, l = j0 % L; j < J; ++j) {
        row.data()[j] = r;
        if (++l == L) l = 0, ++r;
      }
    }
    if (from_z) {  // only each latent's count of unmasked categories is left to find
      if constexpr (std::is_same_v<T, float>) {
        unmasked_counts_f32(J, C, a.data(), w.cnt.data());
      } else {
        unmasked_counts_t(J, C, a.data(), w.cnt.data());
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      if (from_z) {
        transpose(z_saved + k * NLC + j0 * C, J, C, w.z.data());
      } else {
        folded_words(seed, static_cast<uint64_t>(k * NLC + j0 * C), n, w.x.data());
        tile_samples(w, a.data(), lam, J, C, false, nullptr);
      }
      const T* zk = w.z.data();
      T* d = acc.data();
      if (dz) {  // d_c += z_c (g_c - sum_c' z_c' g_c')
        transpose(dz + k * NLC + j0 * C, J, C, g.data());
        for (int64_t j = 0; j < J; ++j) zg.data()[j] = T(0);
        for (int64_t e = 0; e < n; e += J) {
          for (int64_t j = 0; j < J; ++j) zg.data()[j] += zk[e + j] * g.data()[e + j];
        }
        for (int64_t e = 0; e < n; e += J) {
          for (int64_t j = 0; j < J; ++j) d[e + j] += zk[e + j] * (g.data()[e + j] - zg.data()[j]);
        }
      }
      if (dlog_q) {
        for (int64_t j = 0; j < J; ++j) {
          gq.data()[j] = dlog_q[k * N + row.data()[j]];
          cn.data()[j] = static_cast<T>(w.cnt.data()[j]);
        }
        if (stop_score) {
          for (int64_t j = 0; j < J; ++j) {
            b.data()[j] = lam[j] + T(1);
            cl.data()[j] = cn.data()[j] * lam[j];
            it.data()[j] = T(1) / w.sum_t.data()[j];
          }
          const T* t = w.t.data();
          for (int64_t e = 0; e < n; e += J) {
            for (int64_t j = 0; j < J; ++j) {
              d[e + j] += gq.data()[j] * (cn.data()[j] * zk[e + j] + cl.data()[j] * (t[e + j] * it.data()[j]) -
                                          b.data()[j]);
            }
          }
        } else {
          for (int64_t e = 0; e < n; e += J) {
            for (int64_t j = 0; j < J; ++j) d[e + j] += gq.data()[j] * (cn.data()[j] * zk[e + j] - T(1));
          }
        }
      }
    }
    // the noise terms' 1 / lam (masked categories: 0), then d KL_l / d a_c
    if constexpr (std::is_same_v<T, float>) {
      scale_unmasked_f32(J, C, a.data(), lam, it.data(), acc.data());
    } else {
      scale_unmasked_t(J, C, a.data(), lam, it.data(), acc.data());
    }
    if (dkl) {
      KLScratch<T> kw(J, C);
      latents_kl(a.data(), lp_cl.data(), j0, J, L, C, kw);
      for (int64_t j = 0; j < J; ++j) gq.data()[j] = dkl[row.data()[j]];
      T* dk = w.y.data();  // a scratch (C, J) no longer read
      if constexpr (std::is_same_v<T, float>) {
        kl_grad_f32(J, C, gq.data(), a.data(), kw.e.data(), kw.lp.data(), kw.top.data(), kw.s.data(),
                    kw.ls.data(), kw.kl.data(), dk);
      } else {
        kl_grad_t(J, C, gq.data(), a.data(), kw.e.data(), kw.lp.data(), kw.top.data(), kw.s.data(), kw.ls.data(),
                  kw.kl.data(), dk);
      }
      for (int64_t i = 0; i < n; ++i) acc.data()[i] += dk[i];
    }
    transpose(acc.data(), C, J, dlogits + j0 * C);
  }
}

template void sample_concrete_forward<float>(const float*, const float*, uint64_t, bool, uint64_t, uint64_t, uint64_t,
                                             int64_t, int64_t, int64_t, int64_t, float*, float*, const float*, float*,
                                             int, float*);
template void sample_concrete_forward<double>(const double*, const double*, uint64_t, bool, uint64_t, uint64_t,
                                              uint64_t, int64_t, int64_t, int64_t, int64_t, double*, double*,
                                              const double*, double*, int, double*);
template void sample_concrete_backward<float>(const float*, const float*, const float*, const float*, uint64_t, bool,
                                              int64_t, int64_t, int64_t, int64_t, float*, const float*, const float*,
                                              int, const float*);
template void sample_concrete_backward<double>(const double*, const double*, const double*, const double*, uint64_t,
                                               bool, int64_t, int64_t, int64_t, int64_t, double*, const double*,
                                               const double*, int, const double*);

}  // namespace fastvae
