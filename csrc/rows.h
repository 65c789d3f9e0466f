// Helpers for kernels over (rows, L) data stored flat: the kernels loop over
// flat blocks of elements rather than row by row, because a loop over one
// short row (L = 8) never fills a vector register.
#pragma once

#include <cstdint>

namespace fastvae {

// Runs block(e0, n) over the flat elements [0, total) in blocks of Block
// elements (n = Block but in the last), one OpenMP work item a block: a
// kernel whose block keeps its sums over all the samples in stack buffers of
// Block elements.
template <int64_t Block, typename Body>
inline void parallel_blocks(int64_t total, int n_threads, const Body& block) {
  const int64_t n_blocks = (total + Block - 1) / Block;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t e0 = blk * Block;
    block(e0, total - e0 < Block ? total - e0 : Block);
  }
}

// A reduction over many work items whose result must not depend on the thread
// count (a DataLoader worker runs one thread, its parent several): the items
// are cut into at most kMaxSlabs contiguous slabs fixed by the item count alone,
// each slab's partial sum is accumulated by whichever thread runs it, and the
// partials are added in slab order. Slab s holds items [slab_begin(s), slab_begin(s + 1)).
constexpr int64_t kMaxSlabs = 64;

inline int64_t slab_count(int64_t n_items) {
  return n_items < 1 ? 1 : (n_items < kMaxSlabs ? n_items : kMaxSlabs);
}

inline int64_t slab_begin(int64_t n_items, int64_t n_slabs, int64_t s) { return n_items * s / n_slabs; }

// out[i] = row_values[row of element first_elem + i], for rows of L elements:
// one fill per row run, which vectorizes for long rows.
template <typename T>
inline void spread_rows(const T* row_values, int64_t first_elem, int64_t n, int64_t L, T* out) {
  int64_t row = first_elem / L;
  int64_t col = first_elem % L;
  for (int64_t i = 0; i < n; ++row, col = 0) {
    const int64_t len = n - i < L - col ? n - i : L - col;
    const T v = row_values[row];
    for (int64_t j = 0; j < len; ++j) out[i + j] = v;
    i += len;
  }
}

// Sums a flat stream of per-element terms into per-row double sums, block by
// block: feed(t, n) takes the next n terms and calls done(row, sum) for each
// row that ends inside them. A row may span blocks.
struct RowSums {
  int64_t row, L;
  int64_t col = 0;
  double acc = 0.0;

  RowSums(int64_t first_row, int64_t row_len) : row(first_row), L(row_len) {}

  template <typename T, typename Done>
  inline void feed(const T* t, int64_t n, Done done) {
    for (int64_t i = 0; i < n;) {
      const int64_t len = n - i < L - col ? n - i : L - col;
      double a = acc;
#pragma omp simd reduction(+ : a)
      for (int64_t j = i; j < i + len; ++j) a += double(t[j]);
      acc = a;
      i += len;
      col += len;
      if (col == L) {
        done(row++, acc);
        acc = 0.0;
        col = 0;
      }
    }
  }
};

}  // namespace fastvae
