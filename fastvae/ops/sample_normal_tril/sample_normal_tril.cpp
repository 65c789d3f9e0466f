// sample_normal_tril on the CPU: z = mu + tril(S) @ eps per row and sample,
// with eps from the Philox stream at sample_normal's offsets (k * N * L +
// n * L + l, drawn by randn_block), and the analytic
// KL(N(mu, S S^T) || N(0, I)) = 0.5 * (|S|_F^2 + |mu|^2 - L - 2 sum_i log S_ii)
// per row. Only the lower triangle of S is read. The backward regenerates eps.
//
// Work is split into tiles of whole rows (OpenMP over tiles); a tile's noise
// for one sample is one contiguous randn_block call, and its rows' S (at most
// kTileElems * L values) stays in cache while the tile walks the K samples.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "sample_normal_tril.h"

namespace fastvae {
namespace {

constexpr int64_t kTileElems = 256;  // noise values per tile and sample

int64_t tile_rows_for(int64_t L) { return std::max<int64_t>(1, kTileElems / std::max<int64_t>(L, 1)); }

// Runs tile(r0, r1, eps) over the tiles of whole rows [r0, r1) of N rows of L
// (OpenMP over tiles), eps a thread's buffer for a tile's noise of one sample.
template <typename T, typename Tile>
void for_each_tile(int64_t N, int64_t L, int n_threads, const Tile& tile) {
  const int64_t tile_rows = tile_rows_for(L);
  const int64_t n_tiles = (N + tile_rows - 1) / tile_rows;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> eps(static_cast<size_t>(tile_rows * L));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t r0 = t * tile_rows;
      tile(r0, std::min(N, r0 + tile_rows), eps.data());
    }
  }
}

// d log S_ii / d S_ii, NaN for a negative diagonal (whose kl is NaN too).
template <typename T>
inline T inv_diag(T s) {
  return s < T(0) ? std::numeric_limits<T>::quiet_NaN() : T(1) / s;
}

}  // namespace

template <typename T>
void sample_normal_tril_forward(const T* mu, const T* S, uint64_t seed, int64_t K, int64_t N,
                                int64_t L, T* z, T* kl, int n_threads) {
  if (N == 0) return;
  if (L == 0) {
    for (int64_t n = 0; n < N; ++n) kl[n] = T(0);
    return;
  }
  const int64_t NL = N * L, LL = L * L;
  for_each_tile<T>(N, L, n_threads, [&](int64_t r0, int64_t r1, T* eps) {
    for (int64_t n = r0; n < r1; ++n) {  // the KL, in double
      const T* m = mu + n * L;
      const T* s = S + n * LL;
      double sq = 0.0, logs = 0.0;
      for (int64_t i = 0; i < L; ++i) {
        const T* row = s + i * L;
        double a = double(m[i]) * double(m[i]);
#pragma omp simd reduction(+ : a)
        for (int64_t j = 0; j <= i; ++j) a += double(row[j]) * double(row[j]);
        sq += a;
        logs += std::log(double(row[i]));
      }
      kl[n] = static_cast<T>(0.5 * (sq - double(L) - 2.0 * logs));
    }
    for (int64_t k = 0; k < K; ++k) {
      randn_block(seed, static_cast<uint64_t>(k * NL + r0 * L), (r1 - r0) * L, eps);
      for (int64_t n = r0; n < r1; ++n) {
        const T* e = eps + (n - r0) * L;
        const T* m = mu + n * L;
        const T* s = S + n * LL;
        T* zr = z + k * NL + n * L;
        for (int64_t i = 0; i < L; ++i) {
          const T* row = s + i * L;
          T a = T(0);
#pragma omp simd reduction(+ : a)
          for (int64_t j = 0; j <= i; ++j) a += row[j] * e[j];
          zr[i] = m[i] + a;
        }
      }
    }
  });
}

template <typename T>
void sample_normal_tril_backward(const T* dz, const T* dkl, const T* mu, const T* S,
                                 uint64_t seed, int64_t K, int64_t N, int64_t L, T* dmu, T* dS,
                                 int n_threads) {
  if (N * L == 0) return;
  const int64_t NL = N * L, LL = L * L;
  for_each_tile<T>(N, L, n_threads, [&](int64_t r0, int64_t r1, T* eps) {
    // the strict upper triangle stays 0: its gradient is exactly 0
    std::fill(dS + r0 * LL, dS + r1 * LL, T(0));
    std::fill(dmu + r0 * L, dmu + r1 * L, T(0));
    for (int64_t k = 0; dz && k < K; ++k) {  // dz null: z has no gradient
      randn_block(seed, static_cast<uint64_t>(k * NL + r0 * L), (r1 - r0) * L, eps);
      for (int64_t n = r0; n < r1; ++n) {
        const T* e = eps + (n - r0) * L;
        const T* g = dz + k * NL + n * L;
        T* dm = dmu + n * L;
        T* ds = dS + n * LL;
        for (int64_t i = 0; i < L; ++i) {
          const T gi = g[i];
          dm[i] += gi;
          T* row = ds + i * L;
#pragma omp simd
          for (int64_t j = 0; j <= i; ++j) row[j] += gi * e[j];
        }
      }
    }
    for (int64_t n = r0; dkl && n < r1; ++n) {  // dkl null: kl has no gradient
      const T gk = dkl[n];
      if (gk == T(0)) continue;  // kl unused: none of its terms (not 0 * NaN)
      const T* m = mu + n * L;
      const T* s = S + n * LL;
      T* dm = dmu + n * L;
      T* ds = dS + n * LL;
      for (int64_t i = 0; i < L; ++i) {
        dm[i] += gk * m[i];
        const T* srow = s + i * L;
        T* row = ds + i * L;
#pragma omp simd
        for (int64_t j = 0; j < i; ++j) row[j] += gk * srow[j];
        row[i] += gk * (srow[i] - inv_diag(srow[i]));
      }
    }
  });
}

template void sample_normal_tril_forward<float>(const float*, const float*, uint64_t, int64_t,
                                                int64_t, int64_t, float*, float*, int);
template void sample_normal_tril_forward<double>(const double*, const double*, uint64_t, int64_t,
                                                 int64_t, int64_t, double*, double*, int);
template void sample_normal_tril_backward<float>(const float*, const float*, const float*,
                                                 const float*, uint64_t, int64_t, int64_t, int64_t,
                                                 float*, float*, int);
template void sample_normal_tril_backward<double>(const double*, const double*, const double*,
                                                  const double*, uint64_t, int64_t, int64_t,
                                                  int64_t, double*, double*, int);

}  // namespace fastvae
