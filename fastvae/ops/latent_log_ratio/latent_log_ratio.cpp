// latent_log_ratio on the CPU: r[k, n] = 0.5 * sum_l(eps^2 - z^2 + logvar) with
// eps = (z - mu) * exp(-logvar / 2), and its gradient in full or in the
// "stop the score" mode (STL, DReG), where only the path through z has one.
//
// exp(-logvar / 2) is computed once per element of mu and reused by the K
// samples. Row sums accumulate in double: the per-element terms
// eps^2 - z^2 (each formed in T) have both signs and can be large, so a sum
// over L in T would lose a small total to rounding.
#include "latent_log_ratio.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fastmath.h"  // exp_t
#include "ops.h"       // FASTVAE_CLONES, FASTVAE_INLINE
#include "rows.h"

namespace fastvae {
namespace {

constexpr int64_t kBlock = 512;       // elements per vector block (stack buffers)
constexpr int64_t kTileElems = 4096;  // forward work item: this many elements of one sample
constexpr int64_t kLongRow = 64;      // rows this long take the row-by-row path (measured faster)
constexpr int64_t kSamplesPerTask = 64;  // long-row forward work item: one row of mu, up to 64 samples

// Short rows run over flat blocks of elements: a loop per row never fills a
// vector register at L = 8, and a function call per row of 8 cost more than
// the arithmetic (3x slower at (100, 8), K = 16).

// inv_s[i] = exp(-logvar[i] / 2)
template <typename T>
FASTVAE_INLINE void inv_std(const T* __restrict lv, int64_t n, T* __restrict inv_s) {
  for (int64_t i = 0; i < n; ++i) inv_s[i] = exp_t(T(-0.5) * lv[i]);
}

// t[i] = eps^2 - z^2 with eps = (z - mu) * inv_s, as (eps - z)(eps + z): an
// overflowing |z| then gives the rounding of the exact value (+-inf, or finite
// where eps = z), never inf - inf, and every backend the same
template <typename T>
FASTVAE_INLINE void ratio_terms(const T* __restrict z, const T* __restrict mu,
                                const T* __restrict inv_s, int64_t n, T* __restrict t) {
  for (int64_t i = 0; i < n; ++i) {
    const T eps = (z[i] - mu[i]) * inv_s[i];
    t[i] = (eps - z[i]) * (eps + z[i]);
  }
}

// dz of one sample's block, and (acc_mu != nullptr) the running sums over
// samples of g * eps and g * (1 - eps^2); g is spread per element.
template <typename T>
FASTVAE_INLINE void ratio_grad(const T* __restrict g, const T* __restrict z,
                               const T* __restrict mu, const T* __restrict inv_s, int64_t n,
                               T* __restrict dz, T* __restrict acc_mu, T* __restrict acc_lv) {
  if (acc_mu == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const T eps = (z[i] - mu[i]) * inv_s[i];
      dz[i] = g[i] * (eps * inv_s[i] - z[i]);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T eps = (z[i] - mu[i]) * inv_s[i];
    dz[i] = g[i] * (eps * inv_s[i] - z[i]);
    acc_mu[i] += g[i] * eps;
    acc_lv[i] += g[i] * (T(1) - eps * eps);
  }
}

FASTVAE_CLONES void inv_std_f32(const float* lv, int64_t n, float* inv_s) { inv_std(lv, n, inv_s); }
FASTVAE_CLONES void ratio_terms_f32(const float* z, const float* mu, const float* inv_s, int64_t n,
                                    float* t) {
  ratio_terms(z, mu, inv_s, n, t);
}
FASTVAE_CLONES void ratio_grad_f32(const float* g, const float* z, const float* mu,
                                   const float* inv_s, int64_t n, float* dz, float* acc_mu,
                                   float* acc_lv) {
  ratio_grad(g, z, mu, inv_s, n, dz, acc_mu, acc_lv);
}

void inv_std_any(const float* lv, int64_t n, float* inv_s) { inv_std_f32(lv, n, inv_s); }
void inv_std_any(const double* lv, int64_t n, double* inv_s) { inv_std(lv, n, inv_s); }
void ratio_terms_any(const float* z, const float* mu, const float* inv_s, int64_t n, float* t) {
  ratio_terms_f32(z, mu, inv_s, n, t);
}
void ratio_terms_any(const double* z, const double* mu, const double* inv_s, int64_t n,
                     double* t) {
  ratio_terms(z, mu, inv_s, n, t);
}
void ratio_grad_any(const float* g, const float* z, const float* mu, const float* inv_s,
                    int64_t n, float* dz, float* acc_mu, float* acc_lv) {
  ratio_grad_f32(g, z, mu, inv_s, n, dz, acc_mu, acc_lv);
}
void ratio_grad_any(const double* g, const double* z, const double* mu, const double* inv_s,
                    int64_t n, double* dz, double* acc_mu, double* acc_lv) {
  ratio_grad(g, z, mu, inv_s, n, dz, acc_mu, acc_lv);
}

// Long rows (L >= kLongRow) run row by row: exp(-logvar / 2) of a row stays in
// L1 for its K samples, and the per-row loops vectorize by themselves.
// inv_s[l] = exp(-logvar[l] / 2); returns sum_l logvar[l] / 2.
template <typename T>
FASTVAE_INLINE double row_inv_std(const T* __restrict lv, int64_t L,
                              T* __restrict inv_s) {
  double half_lv = 0.0;
#pragma omp simd reduction(+ : half_lv)
  for (int64_t l = 0; l < L; ++l) {
    inv_s[l] = exp_t(T(-0.5) * lv[l]);
    half_lv += 0.5 * double(lv[l]);
  }
  return half_lv;
}

// sum_l (eps^2 - z^2) / 2 of one sample row.
template <typename T>
FASTVAE_INLINE double row_ratio(const T* __restrict z, const T* __restrict mu,
                                const T* __restrict inv_s, int64_t L) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t l = 0; l < L; ++l) {
    const T eps = (z[l] - mu[l]) * inv_s[l];
    acc += double((eps - z[l]) * (eps + z[l]));  // as ratio_terms
  }
  return 0.5 * acc;
}

// dz of one sample row, and (acc_mu != nullptr) the running sums over samples
// of g * eps and g * (1 - eps^2).
template <typename T>
FASTVAE_INLINE void row_ratio_grad(T g, const T* __restrict z,
                                   const T* __restrict mu,
                                   const T* __restrict inv_s, int64_t L,
                                   T* __restrict dz, T* __restrict acc_mu,
                                   T* __restrict acc_lv) {
  if (acc_mu == nullptr) {
    for (int64_t l = 0; l < L; ++l) {
      const T eps = (z[l] - mu[l]) * inv_s[l];
      dz[l] = g * (eps * inv_s[l] - z[l]);
    }
    return;
  }
  for (int64_t l = 0; l < L; ++l) {
    const T eps = (z[l] - mu[l]) * inv_s[l];
    dz[l] = g * (eps * inv_s[l] - z[l]);
    acc_mu[l] += g * eps;
    acc_lv[l] += g * (T(1) - eps * eps);
  }
}

FASTVAE_CLONES double row_inv_std_f32(const float* lv, int64_t L, float* inv_s) {
  return row_inv_std(lv, L, inv_s);
}
FASTVAE_CLONES double row_ratio_f32(const float* z, const float* mu, const float* inv_s,
                                    int64_t L) {
  return row_ratio(z, mu, inv_s, L);
}
FASTVAE_CLONES void row_ratio_grad_f32(float g, const float* z, const float* mu,
                                       const float* inv_s, int64_t L, float* dz, float* acc_mu,
                                       float* acc_lv) {
  row_ratio_grad(g, z, mu, inv_s, L, dz, acc_mu, acc_lv);
}

double row_inv_std_any(const float* lv, int64_t L, float* inv_s) { return row_inv_std_f32(lv, L, inv_s); }
double row_inv_std_any(const double* lv, int64_t L, double* inv_s) { return row_inv_std(lv, L, inv_s); }
double row_ratio_any(const float* z, const float* mu, const float* inv_s, int64_t L) {
  return row_ratio_f32(z, mu, inv_s, L);
}
double row_ratio_any(const double* z, const double* mu, const double* inv_s, int64_t L) {
  return row_ratio(z, mu, inv_s, L);
}
void row_ratio_grad_any(float g, const float* z, const float* mu, const float* inv_s, int64_t L,
                        float* dz, float* acc_mu, float* acc_lv) {
  row_ratio_grad_f32(g, z, mu, inv_s, L, dz, acc_mu, acc_lv);
}
void row_ratio_grad_any(double g, const double* z, const double* mu, const double* inv_s,
                        int64_t L, double* dz, double* acc_mu, double* acc_lv) {
  row_ratio_grad(g, z, mu, inv_s, L, dz, acc_mu, acc_lv);
}


template <typename T>
void forward_long_rows(const T* z, const T* mu, const T* logvar, int64_t K, int64_t N,
                              int64_t L, T* r, int n_threads) {
  const int64_t k_tasks = (K + kSamplesPerTask - 1) / kSamplesPerTask;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> inv_s(static_cast<size_t>(L));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N * k_tasks; ++t) {
      const int64_t n = t / k_tasks, k0 = (t % k_tasks) * kSamplesPerTask;
      const double half_lv = row_inv_std_any(logvar + n * L, L, inv_s.data());
      for (int64_t k = k0; k < std::min(K, k0 + kSamplesPerTask); ++k) {
        const int64_t row = k * N + n;
        r[row] = static_cast<T>(row_ratio_any(z + row * L, mu + n * L, inv_s.data(), L) + half_lv);
      }
    }
  }
}

template <typename T>
void backward_long_rows(const T* g, const T* z, const T* mu, const T* logvar, int64_t K,
                               int64_t N, int64_t L, T* dz, T* dmu, T* dlogvar, int n_threads) {
  const bool full = dmu != nullptr;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> buf(static_cast<size_t>(3 * L));
    T* inv_s = buf.data();
    T* acc_mu = full ? inv_s + L : nullptr;
    T* acc_lv = full ? inv_s + 2 * L : nullptr;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      row_inv_std_any(logvar + n * L, L, inv_s);
      if (full) std::fill(buf.begin() + L, buf.end(), T(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = k * N + n;
        row_ratio_grad_any(g[row], z + row * L, mu + n * L, inv_s, L, dz + row * L, acc_mu,
                           acc_lv);
      }
      if (full) {
        for (int64_t l = 0; l < L; ++l) {
          dmu[n * L + l] = -acc_mu[l] * inv_s[l];
          dlogvar[n * L + l] = T(0.5) * acc_lv[l];
        }
      }
    }
  }
}

}  // namespace

// r[k, n] = 0.5 * sum_l(eps^2 - z^2) + 0.5 * sum_l logvar: exp(-logvar / 2)
// and the logvar sums are computed once for the K samples; work items are
// (sample, tile of rows).
template <typename T>
void latent_log_ratio_forward(const T* z, const T* mu, const T* logvar, int64_t K, int64_t N,
                              int64_t L, T* r, int n_threads) {
  if (L >= kLongRow) return forward_long_rows(z, mu, logvar, K, N, L, r, n_threads);
  if (L == 0) {
    std::fill(r, r + K * N, T(0));
    return;
  }
  const int64_t NL = N * L;
  std::vector<T> inv_s(static_cast<size_t>(NL));
  std::vector<double> half_lv(static_cast<size_t>(N));
  const int64_t tile_rows = std::max<int64_t>(1, kTileElems / L);
  const int64_t n_tiles = (N + tile_rows - 1) / tile_rows;
#pragma omp parallel num_threads(n_threads)
  {
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      const int64_t r0 = tile * tile_rows, r1 = std::min(N, r0 + tile_rows);
      inv_std_any(logvar + r0 * L, (r1 - r0) * L, inv_s.data() + r0 * L);
      RowSums sums(r0, L);
      sums.feed(logvar + r0 * L, (r1 - r0) * L,
                [&](int64_t row, double acc) { half_lv[size_t(row)] = 0.5 * acc; });
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < K * n_tiles; ++item) {
      const int64_t k = item / n_tiles, tile = item % n_tiles;
      const int64_t r0 = tile * tile_rows, r1 = std::min(N, r0 + tile_rows);
      const T* zk = z + k * NL;
      T* rk = r + k * N;
      T t[kBlock];
      RowSums sums(r0, L);
      for (int64_t e0 = r0 * L; e0 < r1 * L; e0 += kBlock) {
        const int64_t n = std::min(kBlock, r1 * L - e0);
        ratio_terms_any(zk + e0, mu + e0, inv_s.data() + e0, n, t);
        sums.feed(t, n, [&](int64_t row, double acc) {
          rk[row] = static_cast<T>(0.5 * acc + half_lv[size_t(row)]);
        });
      }
    }
  }
}

// Work items are blocks of the (N, L) elements, each with all K samples, so
// the sums over samples for dmu and dlogvar stay in the block's buffers.
template <typename T>
void latent_log_ratio_backward(const T* g, const T* z, const T* mu, const T* logvar, int64_t K,
                               int64_t N, int64_t L, T* dz, T* dmu, T* dlogvar, int n_threads) {
  if (L >= kLongRow) return backward_long_rows(g, z, mu, logvar, K, N, L, dz, dmu, dlogvar, n_threads);
  const bool full = dmu != nullptr;
  const int64_t NL = N * L;
  parallel_blocks<kBlock>(NL, n_threads, [&](int64_t e0, int64_t n) {
    T inv_s[kBlock], gs[kBlock], acc_mu[kBlock], acc_lv[kBlock];
    inv_std_any(logvar + e0, n, inv_s);
    if (full) {
      std::fill(acc_mu, acc_mu + n, T(0));
      std::fill(acc_lv, acc_lv + n, T(0));
    }
    for (int64_t k = 0; k < K; ++k) {
      spread_rows(g + k * N, e0, n, L, gs);
      ratio_grad_any(gs, z + k * NL + e0, mu + e0, inv_s, n, dz + k * NL + e0,
                     full ? acc_mu : nullptr, full ? acc_lv : nullptr);
    }
    if (full) {
      for (int64_t i = 0; i < n; ++i) {
        dmu[e0 + i] = -acc_mu[i] * inv_s[i];
        dlogvar[e0 + i] = T(0.5) * acc_lv[i];
      }
    }
  });
}

template void latent_log_ratio_forward<float>(const float*, const float*, const float*, int64_t,
                                              int64_t, int64_t, float*, int);
template void latent_log_ratio_forward<double>(const double*, const double*, const double*,
                                               int64_t, int64_t, int64_t, double*, int);
template void latent_log_ratio_backward<float>(const float*, const float*, const float*,
                                               const float*, int64_t, int64_t, int64_t, float*,
                                               float*, float*, int);
template void latent_log_ratio_backward<double>(const double*, const double*, const double*,
                                                const double*, int64_t, int64_t, int64_t,
                                                double*, double*, double*, int);

}  // namespace fastvae
