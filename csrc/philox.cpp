// The Philox normal stream on the CPU (the per-element mapping is in
// philox.h): blocks for the kernels that draw noise, and the fills that
// fastvae._C exposes for tests and for the evaluation's noise.
#include <algorithm>

#include "ops.h"
#include "philox.h"

namespace fastvae {
namespace {

constexpr int64_t kBlock = 512;  // elements per work item of a fill

FASTVAE_CLONES void randn_block_f32(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  const PhiloxKeys keys(seed);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = randn_from_bits_f32(philox_2x(keys, offset0 + static_cast<uint64_t>(i)));
  }
}

}  // namespace

void randn_block(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  randn_block_f32(seed, offset0, n, out);
}

void randn_block(uint64_t seed, uint64_t offset0, int64_t n, double* out) {
  const PhiloxKeys keys(seed);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = randn_from_bits_f64(philox_2x(keys, offset0 + static_cast<uint64_t>(i)));
  }
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
    const Philox2 w = philox_2x(keys, offset0 + static_cast<uint64_t>(i));
    u1[i] = uniform_from_bits(w.r0);
    u2[i] = uniform_from_bits(w.r1);
  }
}

}  // namespace fastvae
