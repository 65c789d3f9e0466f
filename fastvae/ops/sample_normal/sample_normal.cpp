// sample_normal on the CPU: z = mu + exp(logvar / 2) * eps with eps from the
// Philox stream at the element's flat index in (K, N, L), and the analytic
// KL(q || N(0, I)) per row. The backward regenerates eps instead of reading it.
//
// Work is split into tiles of whole rows; within a tile the transcendental
// work runs in fixed-size blocks through FASTVAE_CLONES functions (ops.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "avx2_math.h"
#include "kl_normal/kl_normal.h"  // kl_rows
#include "ops.h"
#include "philox.h"
#include "rows.h"
#include "sample_normal.h"

namespace fastvae {
namespace {

constexpr int64_t kBlock = 512;        // elements per vector block (stack buffers)
constexpr int64_t kTileElems = 8192;   // elements per parallel work item


// out[i] = exp(scale * x[i])
FASTVAE_CLONES void exp_block_f32(const float* x, float scale, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = fast_exp(scale * x[i]);
}

// s[i] = exp(logvar[i] / 2)
void half_exp_block(const float* lv, int64_t n, float* s) { exp_block_f32(lv, 0.5f, n, s); }

void half_exp_block(const double* lv, int64_t n, double* s) {
  for (int64_t i = 0; i < n; ++i) s[i] = std::exp(0.5 * lv[i]);
}

// inv_s[i] = exp(-logvar[i] / 2)
void neg_half_exp_block(const float* lv, int64_t n, float* inv_s) { exp_block_f32(lv, -0.5f, n, inv_s); }

void neg_half_exp_block(const double* lv, int64_t n, double* inv_s) {
  for (int64_t i = 0; i < n; ++i) inv_s[i] = std::exp(-0.5 * lv[i]);
}

// x[i] = exp(x[i]): a LogNormal's z = exp(y), in place (exp_z).
void exp_in_place(float* x, int64_t n) { exp_block_f32(x, 1.0f, n, x); }

void exp_in_place(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

// lv[i] = 2 log(scale[i]): a torch Normal's scale read as the logvar the
// kernels take, in their loops instead of two torch ops each way, with log's
// values at the edges (fast_log_of_scale).
FASTVAE_CLONES void logvar_of_scale_f32(const float* scale, int64_t n, float* lv) {
  for (int64_t i = 0; i < n; ++i) lv[i] = 2.0f * fast_log_of_scale(scale[i]);
}

void logvar_of_scale(const float* scale, int64_t n, float* lv) { logvar_of_scale_f32(scale, n, lv); }

void logvar_of_scale(const double* scale, int64_t n, double* lv) {
  for (int64_t i = 0; i < n; ++i) lv[i] = 2.0 * std::log(scale[i]);
}

#if defined(FASTVAE_AVX2_MATH)
// The forward's element work on the AVX2 noise path, in 8-lane vectors with
// the bits of the generic loops in the x86-64-v3 clones (avx2_math.h):
// s[i] = exp(logvar / 2), and the KL terms exp(logvar) + mu^2 - 1 - logvar
// summed into the rows (one pass over mu and logvar instead of two).
// The last n % 8 elements run as one vector padded with mu = logvar = 0.
FASTVAE_AVX2_INLINE void scale_kl_eight(const float* m8, const float* v8, float* s8, float* t8) {
  const __m256 m = _mm256_loadu_ps(m8), v = _mm256_loadu_ps(v8);
  _mm256_storeu_ps(s8, avx2::exp8(_mm256_mul_ps(v, _mm256_set1_ps(0.5f))));
  const __m256 e = _mm256_fmadd_ps(m, m, avx2::exp8(v));  // the v3 clone contracts mu * mu into the sum
  _mm256_storeu_ps(t8, _mm256_sub_ps(_mm256_sub_ps(e, _mm256_set1_ps(1.0f)), v));
}

__attribute__((target("arch=x86-64-v3"))) void scale_kl_block_avx2(const float* mu, const float* lv, int64_t n,
                                                                   float* s, RowSums& sums, float* kl) {
  float t[kBlock];
  const auto eight = scale_kl_eight;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) eight(mu + i, lv + i, s + i, t + i);
  if (i < n) {
    float m8[8] = {}, v8[8] = {}, s8[8], t8[8];
    std::copy(mu + i, mu + n, m8);
    std::copy(lv + i, lv + n, v8);
    eight(m8, v8, s8, t8);
    std::copy(s8, s8 + (n - i), s + i);
    std::copy(t8, t8 + (n - i), t + i);
  }
  sums.feed(t, n, [&](int64_t row, double acc) { kl[row] = static_cast<float>(0.5 * acc); });
}

// s[i] = exp(logvar[i] / 2): exp_block_f32's bits (the backward's scale).
__attribute__((target("arch=x86-64-v3"))) void half_exp_block_avx2(const float* lv, int64_t n, float* s) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(s + i, avx2::exp8(_mm256_mul_ps(_mm256_loadu_ps(lv + i), _mm256_set1_ps(0.5f))));
  }
  if (i < n) {
    float v8[8] = {}, s8[8];
    std::copy(lv + i, lv + n, v8);
    _mm256_storeu_ps(s8, avx2::exp8(_mm256_mul_ps(_mm256_loadu_ps(v8), _mm256_set1_ps(0.5f))));
    std::copy(s8, s8 + (n - i), s + i);
  }
}

// z[i] = mu[i] + s[i] * eps[i], unfused as the baseline loop computes it (the
// empty asm keeps GCC from contracting the product into an FMA).
__attribute__((target("arch=x86-64-v3"))) void scale_shift_avx2(const float* mu, const float* s, const float* eps,
                                                                int64_t n, float* z) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 prod = _mm256_mul_ps(_mm256_loadu_ps(s + i), _mm256_loadu_ps(eps + i));
    __asm__("" : "+x"(prod));
    _mm256_storeu_ps(z + i, _mm256_add_ps(_mm256_loadu_ps(mu + i), prod));
  }
  for (; i < n; ++i) {
    float prod = s[i] * eps[i];
    __asm__("" : "+x"(prod));
    z[i] = mu[i] + prod;
  }
}
#endif

int64_t rows_per_tile(int64_t L) { return std::max<int64_t>(1, kTileElems / std::max<int64_t>(L, 1)); }

// Asks for the cache lines of p[0, n) ahead of their use (write: for a store).
// The kernels issue it one sample ahead, so the lines of the next sample's
// block arrive while this one's noise is computed. A hint: no access happens.
template <typename T>
inline void prefetch_block(const T* p, int64_t n, bool write) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) {
    if (write) __builtin_prefetch(c + off, 1, 3);
    else __builtin_prefetch(c + off, 0, 3);
  }
}

// acc[row - r0] += the sum in double of t's terms of each row run of the block
// of n elements from flat element b0 (rows of L): each run summed in order from
// 0. Whole rows go four at a time, four independent chains of adds: a row of
// L = 8 is 8 dependent adds, latency-bound one row at a time, and a division
// per run found each row; the log-ratio took 12 of the forward's 31 us at
// K = 16, N = 100, L = 8 (AVX-512), 6 of 24 this way, with the same bits.
template <typename T>
void ratio_runs(const T* t, int64_t n, int64_t b0, int64_t L, int64_t r0, double* acc) {
  int64_t row = b0 / L - r0, i = 0;
  if (const int64_t col = b0 % L; col != 0) {  // the end of a row the last block began
    const int64_t len = std::min(n, L - col);
    double a = 0.0;
    for (int64_t j = 0; j < len; ++j) a += double(t[j]);
    acc[row++] += a;
    i = len;
  }
  for (; i + 4 * L <= n; i += 4 * L, row += 4) {
    const T* t0 = t + i;
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    for (int64_t j = 0; j < L; ++j) {
      a0 += double(t0[j]);
      a1 += double(t0[L + j]);
      a2 += double(t0[2 * L + j]);
      a3 += double(t0[3 * L + j]);
    }
    acc[row] += a0;
    acc[row + 1] += a1;
    acc[row + 2] += a2;
    acc[row + 3] += a3;
  }
  for (; i < n; i += L, ++row) {  // the last whole rows, and a row the next block ends
    const int64_t len = std::min(n - i, L);
    double a = 0.0;
    for (int64_t j = 0; j < len; ++j) a += double(t[i + j]);
    acc[row] += a;
  }
}

}  // namespace

// The noise of one sample for the elements [b0, b0 + n) of the flat (N, L)
// block: offsets base + row * row_stride + col (row_runs).
template <typename T>
void noise_block(uint64_t seed, uint64_t base, int64_t b0, int64_t n, int64_t L,
                 uint64_t row_stride, T* eps) {
  row_runs(base, b0, n, L, row_stride,
           [&](uint64_t offset, int64_t i, int64_t len) { randn_block(seed, offset, len, eps + i); });
}

// Whether the element work runs in the AVX2 loops above too: float32 on the AVX2
// noise path.
template <typename T>
bool avx2_elements() {
#if defined(FASTVAE_AVX2_MATH)
  return sizeof(T) == sizeof(float) && noise_isa() == NoiseIsa::kAvx2;
#else
  return false;
#endif
}

// log_ratio (K, N), when not null, gets log N(z; 0, I) - log q(z) = 0.5 *
// sum_l(eps^2 + logvar - z^2) from the eps just drawn: dividing it back out of
// z, (z - mu) * exp(-logvar / 2), loses its bits or overflows when the
// posterior collapses (logvar of -30 and below in float32).
template <typename T>
void sample_normal_forward(const T* mu, const T* logvar, uint64_t seed, uint64_t offset0,
                           uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N,
                           int64_t L, T* z, T* kl, T* log_ratio, int n_threads, bool of_scale, bool exp_z) {
  const int64_t NL = N * L;
  const int64_t tile_rows = rows_per_tile(L);
  const int64_t n_tiles = (N + tile_rows - 1) / tile_rows;
  const bool avx2 = avx2_elements<T>() && L > 0;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const int64_t r0 = tile * tile_rows;
    const int64_t r1 = std::min(N, r0 + tile_rows);
    // of_scale: the tile's logvar from its scales (`logvar` points at them), taken once here
    std::vector<T> tile_logvar(of_scale ? static_cast<size_t>((r1 - r0) * L) : 0);
    if (of_scale) logvar_of_scale(logvar + r0 * L, (r1 - r0) * L, tile_logvar.data());
    const T* lvt = of_scale ? tile_logvar.data() : logvar + r0 * L;  // the tile's logvar, from its first element
    // The tile's mu and logvar stay in cache for the sampling loop below.
    if (!avx2) kl_rows(mu + r0 * L, lvt, nullptr, nullptr, 0, r1 - r0, L, kl + r0);
    RowSums kl_sums(r0, L);
    // per (sample, row of the tile) sums of the log-ratio terms, in double
    std::vector<double> ratio(log_ratio ? static_cast<size_t>(K * (r1 - r0)) : 0, 0.0);
    T s[kBlock], eps[kBlock], t[kBlock];
    for (int64_t b0 = r0 * L; b0 < r1 * L; b0 += kBlock) {
      const int64_t n = std::min(kBlock, r1 * L - b0);
#if defined(FASTVAE_AVX2_MATH)
      if constexpr (sizeof(T) == sizeof(float)) {
        if (avx2) {
          // The next block's mu, logvar and first sample's z lines are asked for
          // now, so that they arrive while this block's noise is computed: the
          // hardware prefetcher sees no stream during that long compute phase.
          if (const int64_t next = std::min(kBlock, N * L - b0 - n); next > 0) {
            prefetch_block(mu + b0 + n, next, false);
            prefetch_block(logvar + b0 + n, next, false);
            prefetch_block(z + b0 + n, next, true);
          }
          scale_kl_block_avx2(mu + b0, lvt + (b0 - r0 * L), n, s, kl_sums, kl);
        }
      }
#endif
      if (!avx2) half_exp_block(lvt + (b0 - r0 * L), n, s);
      for (int64_t k = 0; k < K; ++k) {
        T* zk = z + k * NL + b0;
        if (k + 1 < K) prefetch_block(zk + NL, n, true);
        noise_block(seed, offset0 + static_cast<uint64_t>(k) * sample_stride, b0, n, L, row_stride, eps);
        const T* mk = mu + b0;
#if defined(FASTVAE_AVX2_MATH)
        if constexpr (sizeof(T) == sizeof(float)) {
          if (avx2) scale_shift_avx2(mk, s, eps, n, zk);
        }
#endif
        if (!avx2) for (int64_t i = 0; i < n; ++i) zk[i] = mk[i] + s[i] * eps[i];
        if (exp_z) exp_in_place(zk, n);  // the caller asks for no log-ratio with it
        if (log_ratio) {
          const T* lk = lvt + (b0 - r0 * L);
          for (int64_t i = 0; i < n; ++i) t[i] = eps[i] * eps[i] + lk[i] - zk[i] * zk[i];
          ratio_runs(t, n, b0, L, r0, ratio.data() + k * (r1 - r0));  // the tile's rows of sample k
        }
      }
    }
    if (log_ratio) {
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t row = r0; row < r1; ++row) {
          log_ratio[k * N + row] = static_cast<T>(0.5 * ratio[size_t(k * (r1 - r0) + row - r0)]);
        }
      }
    }
  }
}

// The gradients of sample_normal and of its log-ratio output, in one pass over
// the samples: each upstream gradient may be null (its output has none). With
// z = mu + s * eps recomputed from the regenerated eps,
//   dz_k = dz_k + dratio[k, n] * (-z, or eps / s - z with stop_score),
//   dmu = sum_k dz_k + dkl * mu,
//   dlogvar = (sum_k dz_k * eps * s + dkl * (s^2 - 1)) / 2 (+ sum_k dratio / 2 without stop_score).
// The stop-score term eps / s enters as (sum_k dratio eps) * exp(-logvar / 2) in
// dmu and sum_k dratio eps^2 / 2 in dlogvar (its exact product with eps s / 2):
// never (z - mu) * exp(-logvar), which is 0 * inf for a collapsed posterior, nor
// (eps / s) * s, which is inf * 0 once 1 / s overflows.
template <typename T>
void sample_normal_backward(const T* dz, const T* dkl, const T* dratio, const T* mu, const T* logvar,
                            uint64_t seed, bool stop_score, int64_t K, int64_t N, int64_t L, T* dmu,
                            T* dlogvar, int n_threads, bool of_scale, bool exp_z) {
  const int64_t NL = N * L;
  const int64_t n_blocks = (NL + kBlock - 1) / kBlock;
  if (!dz && !dratio) K = 0;  // nothing to sum over the samples
  const bool avx2 = avx2_elements<T>();
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t b0 = blk * kBlock;
    const int64_t n = std::min(kBlock, NL - b0);
    T s[kBlock], eps[kBlock], acc_mu[kBlock], acc_lv[kBlock];
    T inv_s[kBlock], gr[kBlock], acc_g[kBlock], acc_score[kBlock], dy[kBlock];
    if (of_scale) {  // `logvar` points at the scales, which the backward needs as they are
      std::copy(logvar + b0, logvar + b0 + n, s);
      if (dratio && stop_score) {
        for (int64_t i = 0; i < n; ++i) inv_s[i] = T(1) / s[i];
      }
    } else {
#if defined(FASTVAE_AVX2_MATH)
      if constexpr (sizeof(T) == sizeof(float)) {
        if (avx2) half_exp_block_avx2(logvar + b0, n, s);
      }
#endif
      if (!avx2) half_exp_block(logvar + b0, n, s);
      if (dratio && stop_score) neg_half_exp_block(logvar + b0, n, inv_s);
    }
    for (int64_t i = 0; i < n; ++i) acc_mu[i] = acc_lv[i] = acc_g[i] = acc_score[i] = T(0);
    const T* m = mu + b0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t base = k * NL + b0;
      if (dz) {
        if (k + 1 < K) {
          prefetch_block(dz + base + NL, n, false);
        } else if (b0 + n < NL) {  // the next block's first sample
          prefetch_block(dz + b0 + n, std::min(kBlock, NL - b0 - n), false);
        }
      }
      randn_block(seed, static_cast<uint64_t>(base), n, eps);
      const T* g = dz ? dz + base : nullptr;
      if (exp_z && g) {  // dz is z = exp(y)'s gradient: y's is dz * z, z from y as the forward formed it
        for (int64_t i = 0; i < n; ++i) dy[i] = m[i] + s[i] * eps[i];
        exp_in_place(dy, n);
        for (int64_t i = 0; i < n; ++i) dy[i] *= g[i];
        g = dy;
      }
      if (!dratio) {
        for (int64_t i = 0; i < n; ++i) {
          acc_mu[i] += g[i];
          acc_lv[i] += g[i] * eps[i];
        }
        continue;
      }
      spread_rows(dratio + k * N, b0, n, L, gr);
      for (int64_t i = 0; i < n; ++i) {
        const T z = m[i] + s[i] * eps[i];
        const T d = (g ? g[i] : T(0)) - gr[i] * z;
        acc_mu[i] += d;
        acc_lv[i] += d * eps[i];
        // the direct logvar / 2 term, or with stop_score the score's eps^2 / 2
        acc_g[i] += stop_score ? gr[i] * eps[i] * eps[i] : gr[i];
        acc_score[i] += gr[i] * eps[i];
      }
    }
    // the score's dmu term (sum_k dratio eps) / s; a zero sum stays 0 where 1 / s overflows
    if (dratio && stop_score) {
      for (int64_t i = 0; i < n; ++i) acc_mu[i] += acc_score[i] == T(0) ? T(0) : acc_score[i] * inv_s[i];
    }
    if (dkl) {
      T g_kl[kBlock];
      spread_rows(dkl, b0, n, L, g_kl);
      for (int64_t i = 0; i < n; ++i) {
        dmu[b0 + i] = acc_mu[i] + g_kl[i] * m[i];
        dlogvar[b0 + i] = T(0.5) * (acc_lv[i] * s[i] + g_kl[i] * (s[i] * s[i] - T(1)) + acc_g[i]);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        dmu[b0 + i] = acc_mu[i];
        dlogvar[b0 + i] = T(0.5) * (acc_lv[i] * s[i] + acc_g[i]);
      }
    }
    // of_scale: the scale's gradient, as autograd takes it through logvar = 2 log(scale)
    if (of_scale) {
      for (int64_t i = 0; i < n; ++i) dlogvar[b0 + i] = (T(2) * dlogvar[b0 + i]) / logvar[b0 + i];
    }
  }
}

template void sample_normal_forward<float>(const float*, const float*, uint64_t, uint64_t,
                                           uint64_t, uint64_t, int64_t, int64_t, int64_t, float*,
                                           float*, float*, int, bool, bool);
template void sample_normal_forward<double>(const double*, const double*, uint64_t, uint64_t,
                                            uint64_t, uint64_t, int64_t, int64_t, int64_t,
                                            double*, double*, double*, int, bool, bool);
template void sample_normal_backward<float>(const float*, const float*, const float*, const float*,
                                            const float*, uint64_t, bool, int64_t, int64_t, int64_t,
                                            float*, float*, int, bool, bool);
template void sample_normal_backward<double>(const double*, const double*, const double*,
                                             const double*, const double*, uint64_t, bool, int64_t,
                                             int64_t, int64_t, double*, double*, int, bool, bool);

}  // namespace fastvae
