// The Philox normal stream on the CPU (the per-element mapping is in
// philox.h): blocks for the kernels that draw noise, and the fills that
// fastvae._C exposes for tests and for the evaluation's noise.
#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FASTVAE_PHILOX_AVX512 1
#endif

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

#if defined(FASTVAE_PHILOX_AVX512)
// The words of the kGroup counters c0, c0 + 1, ... in AVX-512 (philox_4x in
// 64-bit lanes, 8 counters a vector, four vectors interleaved): a[j] = w0,
// a[kGroup + j] = w2, b[j] = w1, b[kGroup + j] = w3 of counter c0 + j.
// vpmuludq reads only the low half of each lane, so no masking is needed;
// GCC 12's vectorization of philox_4x masks every operand and multiplies with
// vpmullq. Integer arithmetic: the words are exactly philox_4x's.
// GCC 12's own _mm512_undefined_* trips -Wuninitialized in the conversions.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
__attribute__((target("avx512f"), noinline)) void philox_group_avx512(const PhiloxKeys& keys, uint64_t c0,
                                                                     uint32_t* a, uint32_t* b) {
  constexpr int kVec = kGroup / 8;
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i mul_a = _mm512_set1_epi64(kPhiloxRoundA), mul_b = _mm512_set1_epi64(kPhiloxRoundB);
  __m512i x0[kVec], x1[kVec], x2[kVec], x3[kVec];
  for (int v = 0; v < kVec; ++v) {
    const __m512i c = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(c0 + 8 * v)), lane);
    x0[v] = c;  // the low half is lo(c); the high half is never read as c0
    x1[v] = _mm512_srli_epi64(c, 32);
    x2[v] = _mm512_setzero_si512();
    x3[v] = _mm512_setzero_si512();
  }
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i k0 = _mm512_set1_epi64(static_cast<int64_t>(keys.k0[round]));
    const __m512i k1 = _mm512_set1_epi64(static_cast<int64_t>(keys.k1[round]));
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) {
      const __m512i p0 = _mm512_mul_epu32(x0[v], mul_a);
      const __m512i p2 = _mm512_mul_epu32(x2[v], mul_b);
      x0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p2, 32), x1[v], k0, 0x96);
      x2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), x3[v], k1, 0x96);
      x1[v] = p2;
      x3[v] = p0;
    }
  }
  for (int v = 0; v < kVec; ++v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 8 * v), _mm512_cvtepi64_epi32(x0[v]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(b + 8 * v), _mm512_cvtepi64_epi32(x1[v]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + kGroup + 8 * v), _mm512_cvtepi64_epi32(x2[v]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(b + kGroup + 8 * v), _mm512_cvtepi64_epi32(x3[v]));
  }
}

#pragma GCC diagnostic pop

// The CPU and the OS (XCR0) support AVX-512F; run once when the module loads.
const bool kHaveAvx512 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}();

// out[i, i + 4 kGroup) from the AVX-512 words: Box-Muller over the 2 kGroup
// pairs in one float32 loop (16 lanes), then interleaved into out.
template <typename T>
FASTVAE_INLINE void normals_group_avx512(const PhiloxKeys& keys, uint64_t offset0, int64_t i, T* out) {
  alignas(64) uint32_t a[2 * kGroup], b[2 * kGroup];
  philox_group_avx512(keys, (offset0 + static_cast<uint64_t>(i)) >> 2, a, b);
  T nc[2 * kGroup], ns[2 * kGroup];
  if constexpr (sizeof(T) == sizeof(float)) {
    for (int j = 0; j < 2 * kGroup; ++j) box_muller_f32(a[j], b[j], nc[j], ns[j]);
  } else {
    for (int j = 0; j < 2 * kGroup; ++j) box_muller_f64(a[j], b[j], nc[j], ns[j]);
  }
  T* o = out + i;
  for (int j = 0; j < kGroup; ++j) {
    o[4 * j] = nc[j];
    o[4 * j + 1] = ns[j];
    o[4 * j + 2] = nc[kGroup + j];
    o[4 * j + 3] = ns[kGroup + j];
  }
}
#endif

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
// On AVX-512 CPUs the whole groups take philox_group_avx512 (vpmuludq, no
// masking) and one 16-lane Box-Muller loop: 0.58 ns a normal against 0.76 for
// the fused loop, same bits (AMD EPYC, 1 thread, 2**22 normals).
template <typename T>
FASTVAE_INLINE void randn_run(uint64_t seed, uint64_t offset0, int64_t n, T* out) {
  const PhiloxKeys keys(seed);
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((4 - (offset0 & 3)) & 3));
  randn_lanes(keys, offset0, 0, head, out);
  int64_t i = head;
  // whole groups (a fixed trip count vectorizes best), then one shorter group
#if defined(FASTVAE_PHILOX_AVX512)
  if (kHaveAvx512) {
    for (; n - i >= 4 * kGroup; i += 4 * kGroup) normals_group_avx512(keys, offset0, i, out);
  }
#endif
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
