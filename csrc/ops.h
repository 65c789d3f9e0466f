// Raw-pointer kernels of the cpp backend. Their callers, the *_bind.cpp files,
// have checked dtype, alignment, contiguity and every extent (buffers.h); these
// functions trust their arguments.
// Shapes are written out: N rows of L latent dimensions, K samples.
#pragma once

#include <algorithm>
#include <cstdint>

// Hot loops are compiled for x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and the
// baseline, and the loader picks one per CPU: a portable binary with no
// -march=native. GCC 12 vectorizes the 64-bit Philox lanes about 3x better
// for x86-64-v4 than for plain avx512f.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTVAE_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTVAE_CLONES
#endif

// Helpers whose loops must be vectorized inside each clone: without forced
// inlining GCC may compile them once, for the baseline ISA, and call that.
#define FASTVAE_INLINE inline __attribute__((always_inline))
// The same for a lambda with such loops (passed to a FASTVAE_INLINE driver;
// a lambda takes no `inline`).
#define FASTVAE_LAMBDA_INLINE __attribute__((always_inline))

namespace fastvae {

// Elements a kernel call must have per extra OpenMP thread. Waking a thread
// costs microseconds, and far more when the other cores are busy (the team
// waits at the barrier for a descheduled thread), while a kernel covers
// 16384 elements in about 10-50 us: smaller calls run on the calling thread.
// (fastvae._backend.num_threads reads it as fastvae._C.MIN_WORK_PER_THREAD.)
constexpr int64_t kMinWorkPerThread = int64_t(1) << 14;

// The noise stream read as a (rows, cols) block with a row stride:
// out[r * cols + c] = randn(seed, offset0 + r * row_stride + c). A 1-d fill is
// rows = 1; the evaluation noise (one row per example, its samples' counters
// contiguous) is a block with row_stride = K * L. Callers check that the last
// offset fits in int64, as Triton's offsets do.
void randn_fill(uint64_t seed, uint64_t offset0, int64_t rows, int64_t cols,
                uint64_t row_stride, float* out, int n_threads);
void randn_fill(uint64_t seed, uint64_t offset0, int64_t rows, int64_t cols,
                uint64_t row_stride, double* out, int n_threads);
// out[i] = randn(seed, offset0 + i) for i < n: the stream as one contiguous
// block, for the kernels that draw noise (philox.cpp).
void randn_block(uint64_t seed, uint64_t offset0, int64_t n, float* out);
void randn_block(uint64_t seed, uint64_t offset0, int64_t n, double* out);

// The two float32 uniforms behind each normal, for bit-exactness tests.
void uniform_fill(uint64_t seed, uint64_t offset0, int64_t n, float* u1, float* u2);

// The vector paths of the noise, one compiled per ISA level in philox.cpp;
// the loader picks the best this CPU runs (best_noise_isa). Every path draws
// the same Philox words and uniforms; the float32 normals differ between paths
// only by the rounding of log, sin and cos (FMA contraction).
enum class NoiseIsa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
const char* noise_isa_name(NoiseIsa isa);
NoiseIsa best_noise_isa();
NoiseIsa noise_isa();
// Forces a path for every later draw, for tests and benchmarks; false (and no
// change) when this CPU cannot run it. Not for use while kernels run.
bool set_noise_isa(NoiseIsa isa);
// out[4 j + w] = word w of Philox counter counter0 + j, for j < n, by the
// vector path in use: the bit-exactness test of each path's words.
void philox_words(uint64_t seed, uint64_t counter0, int64_t n, uint32_t* out);
// out[i] = the folded word x in [0, 2**31) of offset offset0 + i (lane offset % 4
// of counter offset / 4), for i < n: what the uniforms of the location-scale
// and positive families are made from (design.md's RNG contract). Whole
// counters take the vector path in use.
void folded_words(uint64_t seed, uint64_t offset0, int64_t n, int32_t* out);
// The same for one sample's elements [b0, b0 + n) of a flat (N, L) block:
// offsets base + row * row_stride + col (one run when row_stride == L; the
// evaluation's example-major layout is a run per row).
void folded_words(uint64_t seed, uint64_t base, int64_t b0, int64_t n, int64_t L, uint64_t row_stride,
                  int32_t* out);

// One sample's elements [b0, b0 + n) of a flat (N, L) block, whose noise sits
// at offsets base + row * row_stride + col, as runs of contiguous offsets:
// fill(offset, i, len) for the elements b0 + i .. b0 + i + len - 1. One run
// where row_stride == L (the training layout); a run per row in the
// evaluation's example-major layout.
template <typename Fill>
inline void row_runs(uint64_t base, int64_t b0, int64_t n, int64_t L, uint64_t row_stride, Fill fill) {
  if (row_stride == static_cast<uint64_t>(L)) {
    fill(base + static_cast<uint64_t>(b0), int64_t(0), n);
    return;
  }
  for (int64_t i = 0; i < n;) {
    const int64_t row = (b0 + i) / L, col = (b0 + i) % L;
    const int64_t len = std::min(n - i, L - col);
    fill(base + static_cast<uint64_t>(row) * row_stride + static_cast<uint64_t>(col), i, len);
    i += len;
  }
}

}  // namespace fastvae
