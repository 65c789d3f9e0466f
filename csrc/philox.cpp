// The Philox normal stream on the CPU (the per-element mapping is in
// philox.h): blocks for the kernels that draw noise, and the fills that
// fastvae._C exposes for tests and for the evaluation's noise.
#include <algorithm>

#include "ops.h"
#include "philox.h"

namespace fastvae {
namespace {

constexpr int64_t kBlock = 512;  // elements per work item of a fill
constexpr int kGroup = 32;       // counters per vector batch: 128 normals

// Elements [i0, i1) of the run that starts at offset0, one counter at a time:
// the unaligned head and the short tail of a block.
template <typename T>
FASTVAE_INLINE void randn_lanes(const PhiloxKeys& keys, uint64_t offset0, int64_t i0, int64_t i1, T* out) {
  for (int64_t i = i0; i < i1;) {
    const uint64_t offset = offset0 + static_cast<uint64_t>(i);
    const int lane = static_cast<int>(offset & 3);
    T four[4];
    normals4(philox_4x(keys, offset >> 2), four);
    for (int j = lane; j < 4 && i < i1; ++j, ++i) out[i] = four[j];
  }
}

// out[i, i + 4m) = the normals of the m (<= kGroup) counters from offset0 + i,
// which starts a counter: one array per lane, interleaved into out.
template <typename T, typename M>
FASTVAE_INLINE void normals_group(const PhiloxKeys& keys, uint64_t offset0, int64_t i, M m, T* out) {
  const uint64_t c0 = (offset0 + static_cast<uint64_t>(i)) >> 2;
  T n0[kGroup], n1[kGroup], n2[kGroup], n3[kGroup];
  for (M j = 0; j < m; ++j) {
    normals4(philox_4x(keys, c0 + static_cast<uint64_t>(j)), n0[j], n1[j], n2[j], n3[j]);
  }
  T* o = out + i;
  for (M j = 0; j < m; ++j) {
    o[4 * j] = n0[j];
    o[4 * j + 1] = n1[j];
    o[4 * j + 2] = n2[j];
    o[4 * j + 3] = n3[j];
  }
}

// out[i] = the normal at offset0 + i. The aligned middle runs up to kGroup
// counters at a time (a short run, such as one evaluation row of L = 32, is
// one group of 8), a loop that GCC vectorizes (the 64-bit Philox lanes and
// Box-Muller, fused), into one array per lane that is interleaved into out.
// Measured on one AVX-512 thread (bench_sample_normal's rng_1_thread): groups
// of 16 counters cost 0.90 ns a normal, 32 cost 0.70, 64 cost 0.72; a
// variable trip count for every group (not only the last) cost 0.77.
template <typename T>
FASTVAE_INLINE void randn_run(uint64_t seed, uint64_t offset0, int64_t n, T* out) {
  const PhiloxKeys keys(seed);
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((4 - (offset0 & 3)) & 3));
  randn_lanes(keys, offset0, 0, head, out);
  int64_t i = head;
  // whole groups (a fixed trip count vectorizes best), then one shorter group
  for (; n - i >= 4 * kGroup; i += 4 * kGroup) normals_group(keys, offset0, i, kGroup, out);
  if (const int64_t m = (n - i) / 4; m > 0) {
    normals_group(keys, offset0, i, m, out);
    i += 4 * m;
  }
  randn_lanes(keys, offset0, i, n, out);
}

FASTVAE_CLONES void randn_block_f32(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  randn_run(seed, offset0, n, out);
}

}  // namespace

void randn_block(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  randn_block_f32(seed, offset0, n, out);
}

// libm's log, sin and cos stay scalar: the float64 path is the precise one.
void randn_block(uint64_t seed, uint64_t offset0, int64_t n, double* out) {
  randn_run(seed, offset0, n, out);
}

// Work items are (row, block of kBlock columns), so a single long row and
// many short rows both spread over the threads.
template <typename T>
void randn_fill_rows(uint64_t seed, uint64_t offset0, int64_t rows, int64_t cols,
                     uint64_t row_stride, T* out, int n_threads) {
  const int64_t col_blocks = (cols + kBlock - 1) / kBlock;
  const int64_t items = rows * col_blocks;
  // A few thousand normals take microseconds: not worth waking a thread team.
  const bool parallel = n_threads > 1 && rows * cols >= 4 * kBlock;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (parallel)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t r = item / col_blocks;
    const int64_t c0 = (item % col_blocks) * kBlock;
    const uint64_t offset = offset0 + static_cast<uint64_t>(r) * row_stride + static_cast<uint64_t>(c0);
    randn_block(seed, offset, std::min(kBlock, cols - c0), out + r * cols + c0);
  }
}

void randn_fill(uint64_t seed, uint64_t offset0, int64_t rows, int64_t cols,
                uint64_t row_stride, float* out, int n_threads) {
  randn_fill_rows(seed, offset0, rows, cols, row_stride, out, n_threads);
}

void randn_fill(uint64_t seed, uint64_t offset0, int64_t rows, int64_t cols,
                uint64_t row_stride, double* out, int n_threads) {
  randn_fill_rows(seed, offset0, rows, cols, row_stride, out, n_threads);
}

void uniform_fill(uint64_t seed, uint64_t offset0, int64_t n, float* u1, float* u2) {
  const PhiloxKeys keys(seed);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t offset = offset0 + static_cast<uint64_t>(i);
    const Philox4 w = philox_4x(keys, offset >> 2);
    const bool second_pair = (offset & 3) >= 2;
    u1[i] = uniform_from_bits(second_pair ? w.w2 : w.w0);
    u2[i] = uniform_from_bits(second_pair ? w.w3 : w.w1);
  }
}

}  // namespace fastvae
