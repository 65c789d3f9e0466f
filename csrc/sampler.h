// What the samplers' C++ kernels share (sample_location_scale,
// sample_positive, sample_concrete): log and exp in both precisions, log(1 - v)
// and the Exp(1) variate of a folded word, and the loops over (K, N, L) of a
// family sampler, which draw the words, sum each sample row's log-density and
// regenerate the noise in the backward. A family's kernel adds only its
// transform and its density. Element i's uniform is the folded word of lane
// i % 4 of Philox counter i // 4 (csrc/philox.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "fastmath.h"
#include "ops.h"
#include "philox.h"
#include "rows.h"

namespace fastvae::sampler {

constexpr int64_t kBlock = 512;       // elements per vector block (stack buffers)
constexpr int64_t kTileElems = 8192;  // elements per parallel work item of the forward

// The float32 forms vectorize inside the ISA clones; float64 runs libm, the
// precise path, not the fast one.
FASTVAE_INLINE float log_t(float x) { return fast_log_positive(x); }
FASTVAE_INLINE double log_t(double x) { return std::log(x); }
FASTVAE_INLINE float exp_t(float x) { return fast_exp(x); }
FASTVAE_INLINE double exp_t(double x) { return std::exp(x); }

// log(1 - v) for v in [0, 1/2] to v's relative precision: log w corrected by
// the rounding of w = 1 - v (Goldberg), or -v where w rounds to 1 (the
// division is kept finite there, so that the select vectorizes).
FASTVAE_INLINE float log1m(float v) {
  const float w = 1.0f - v;
  const bool one = w == 1.0f;
  return one ? -v : fast_log_positive(w) * (-v / (one ? -1.0f : w - 1.0f));
}
FASTVAE_INLINE double log1m(double v) { return std::log1p(-v); }

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
  const int64_t n_blocks = (NL + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t b0 = blk * kBlock;
    const int64_t n = std::min(kBlock, NL - b0);
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
  }
}

}  // namespace fastvae::sampler
