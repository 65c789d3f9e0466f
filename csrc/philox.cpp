// The Philox normal stream on the CPU (the per-element mapping is in
// philox.h): blocks for the kernels that draw noise, and the fills that
// fastvae._C exposes for tests and for the evaluation's noise.
#include <algorithm>
#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FASTVAE_PHILOX_X86 1
#endif

#include "avx2_math.h"
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

#if defined(FASTVAE_PHILOX_X86)
// The vector operations of philox_4x's rounds, per ISA, for philox_lanes: the
// 32-bit words in 64-bit lanes, one vpmuludq per multiply (it reads only the
// low half of each lane, so no masking is needed; GCC 12's vectorization of
// philox_4x masks every operand and multiplies with vpmullq for AVX-512, and
// builds each product from shifts and adds for AVX2: about 3x the
// instructions). Integer arithmetic: the words are exactly philox_4x's.
struct Avx512Lanes {
  using V = __m512i;
  static constexpr int kLanes = 8;
  __attribute__((target("avx512f"))) static V set1(uint64_t x) { return _mm512_set1_epi64(static_cast<int64_t>(x)); }
  __attribute__((target("avx512f"))) static V counters(uint64_t c0) {  // c0, c0 + 1, ..., c0 + 7
    return _mm512_add_epi64(set1(c0), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  }
  __attribute__((target("avx512f"))) static V zero() { return _mm512_setzero_si512(); }
  __attribute__((target("avx512f"))) static V high_half(V x) { return _mm512_srli_epi64(x, 32); }
  __attribute__((target("avx512f"))) static V mul_low(V x, V y) { return _mm512_mul_epu32(x, y); }
  __attribute__((target("avx512f"))) static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
};

struct Avx2Lanes {
  using V = __m256i;
  static constexpr int kLanes = 4;
  __attribute__((target("avx2"))) static V set1(uint64_t x) { return _mm256_set1_epi64x(static_cast<int64_t>(x)); }
  __attribute__((target("avx2"))) static V counters(uint64_t c0) {  // c0, c0 + 1, ..., c0 + 3
    return _mm256_add_epi64(set1(c0), _mm256_set_epi64x(3, 2, 1, 0));
  }
  __attribute__((target("avx2"))) static V zero() { return _mm256_setzero_si256(); }
  __attribute__((target("avx2"))) static V high_half(V x) { return _mm256_srli_epi64(x, 32); }
  __attribute__((target("avx2"))) static V mul_low(V x, V y) { return _mm256_mul_epu32(x, y); }
  __attribute__((target("avx2"))) static V xor3(V a, V b, V c) { return _mm256_xor_si256(a, _mm256_xor_si256(b, c)); }
};

// The ten rounds of philox_4x on the kVec * L::kLanes counters c0, c0 + 1,
// ...: x0[v] .. x3[v] end with the words w0 .. w3 (in the low halves) of
// counters c0 + L::kLanes v + lane. kVec vectors interleaved, so that the
// multiplies' latency overlaps. Called only from the flatten functions below,
// which inline it, and the operations of L, into their own ISA: the vectors
// never pass a call, so GCC's note that their ABI differs outside that ISA
// does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename L, int kVec>
inline void philox_lanes(const PhiloxKeys& keys, uint64_t c0, typename L::V (&x0)[kVec], typename L::V (&x1)[kVec],
                         typename L::V (&x2)[kVec], typename L::V (&x3)[kVec]) {
  using V = typename L::V;
  const V mul_a = L::set1(kPhiloxRoundA), mul_b = L::set1(kPhiloxRoundB);
  for (int v = 0; v < kVec; ++v) {
    const V c = L::counters(c0 + static_cast<uint64_t>(L::kLanes * v));
    x0[v] = c;  // the low half is lo(c); the high half is never read as c0
    x1[v] = L::high_half(c);
    x2[v] = L::zero();
    x3[v] = L::zero();
  }
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const V k0 = L::set1(keys.k0[round]), k1 = L::set1(keys.k1[round]);
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) {
      const V p0 = L::mul_low(x0[v], mul_a);
      const V p2 = L::mul_low(x2[v], mul_b);
      x0[v] = L::xor3(L::high_half(p2), x1[v], k0);
      x2[v] = L::xor3(L::high_half(p0), x3[v], k1);
      x1[v] = p2;
      x3[v] = p0;
    }
  }
}
#pragma GCC diagnostic pop

// The words of the kGroup counters c0, c0 + 1, ... in AVX-512 (8 counters a
// vector, four vectors interleaved): a[j] = w0, a[kGroup + j] = w2, b[j] =
// w1, b[kGroup + j] = w3 of counter c0 + j.
// GCC 12's own _mm512_undefined_* trips -Wuninitialized in the conversions.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
__attribute__((target("avx512f"), noinline, flatten)) void philox_group_avx512(const PhiloxKeys& keys, uint64_t c0,
                                                                              uint32_t* a, uint32_t* b) {
  constexpr int kVec = kGroup / 8;
  __m512i x0[kVec], x1[kVec], x2[kVec], x3[kVec];
  philox_lanes<Avx512Lanes>(keys, c0, x0, x1, x2, x3);
  for (int v = 0; v < kVec; ++v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 8 * v), _mm512_cvtepi64_epi32(x0[v]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(b + 8 * v), _mm512_cvtepi64_epi32(x1[v]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + kGroup + 8 * v), _mm512_cvtepi64_epi32(x2[v]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(b + kGroup + 8 * v), _mm512_cvtepi64_epi32(x3[v]));
  }
}

#pragma GCC diagnostic pop

// The low 32-bit halves of the 4 + 4 lanes of lo and hi, in order (AVX2 has
// no vpmovqd): one shuffle picks them per 128-bit half, one permute joins.
__attribute__((target("avx2"))) inline void store_low_halves(uint32_t* out, __m256i lo, __m256i hi) {
  const __m256 picked = _mm256_shuffle_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), _MM_SHUFFLE(2, 0, 2, 0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permute4x64_epi64(_mm256_castps_si256(picked), _MM_SHUFFLE(3, 1, 2, 0)));
}

// The same words as philox_group_avx512, in AVX2: 4 counters a vector, kVec
// vectors interleaved while the state (4 kVec registers) and the constants
// fit the 16 ymm registers.
__attribute__((target("avx2"), noinline, flatten)) void philox_group_avx2(const PhiloxKeys& keys, uint64_t c0,
                                                                          uint32_t* a, uint32_t* b) {
  constexpr int kVec = 2;
  for (int g = 0; g < kGroup; g += 4 * kVec) {
    __m256i x0[kVec], x1[kVec], x2[kVec], x3[kVec];
    philox_lanes<Avx2Lanes>(keys, c0 + g, x0, x1, x2, x3);
    for (int v = 0; v < kVec; v += 2) {
      store_low_halves(a + g + 4 * v, x0[v], x0[v + 1]);
      store_low_halves(b + g + 4 * v, x1[v], x1[v + 1]);
      store_low_halves(a + kGroup + g + 4 * v, x2[v], x2[v + 1]);
      store_low_halves(b + kGroup + g + 4 * v, x3[v], x3[v + 1]);
    }
  }
}

// out[0, 128) = the normals of the 32 counters whose words philox_group_avx2
// wrote to a and b: box_muller8 on the 8-lane rows (the same bits as the
// generic loop in the x86-64-v3 clone), then the cos/sin results of the lane
// pairs (w0, w1) and (w2, w3) interleaved into counter order by shuffles.
__attribute__((target("arch=x86-64-v3"))) void normals_from_words_avx2(const uint32_t* a, const uint32_t* b,
                                                                      float* out) {
  static_assert(kGroup == 32, "four rows of 8 counters");
  for (int v = 0; v < kGroup / 8; ++v) {
    __m256 c01, s01, c23, s23;  // lanes (w0, w1) and (w2, w3) of counters 8v .. 8v + 7
    avx2::box_muller8(_mm256_load_si256(reinterpret_cast<const __m256i*>(a + 8 * v)),
                      _mm256_load_si256(reinterpret_cast<const __m256i*>(b + 8 * v)), c01, s01);
    avx2::box_muller8(_mm256_load_si256(reinterpret_cast<const __m256i*>(a + kGroup + 8 * v)),
                      _mm256_load_si256(reinterpret_cast<const __m256i*>(b + kGroup + 8 * v)), c23, s23);
    const __m256 lo01 = _mm256_unpacklo_ps(c01, s01), hi01 = _mm256_unpackhi_ps(c01, s01);
    const __m256 lo23 = _mm256_unpacklo_ps(c23, s23), hi23 = _mm256_unpackhi_ps(c23, s23);
    // counters (0 | 4), (1 | 5), (2 | 6), (3 | 7) of the row, four normals each
    const __m256 q04 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(lo01), _mm256_castps_pd(lo23)));
    const __m256 q15 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(lo01), _mm256_castps_pd(lo23)));
    const __m256 q26 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(hi01), _mm256_castps_pd(hi23)));
    const __m256 q37 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(hi01), _mm256_castps_pd(hi23)));
    float* o = out + 32 * v;
    _mm256_storeu_ps(o, _mm256_permute2f128_ps(q04, q15, 0x20));
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(q26, q37, 0x20));
    _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(q04, q15, 0x31));
    _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(q26, q37, 0x31));
  }
}

// The best path this CPU and OS (XCR0) run: the GCC names of the ISA levels
// that the clones below are compiled for.
NoiseIsa detect_noise_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return NoiseIsa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return NoiseIsa::kAvx2;
  return NoiseIsa::kPortable;
}
#else
NoiseIsa detect_noise_isa() { return NoiseIsa::kPortable; }
#endif

// Chosen once when the module loads; set_noise_isa forces another (tests and
// benchmarks, to run the paths this CPU would not pick).
const NoiseIsa kBestNoiseIsa = detect_noise_isa();
std::atomic<int> g_noise_isa{static_cast<int>(kBestNoiseIsa)};

// The words of the kGroup counters from c0 in the layout of
// philox_group_avx512, by the path Isa.
template <NoiseIsa Isa>
FASTVAE_INLINE void philox_group(const PhiloxKeys& keys, uint64_t c0, uint32_t* a, uint32_t* b) {
#if defined(FASTVAE_PHILOX_X86)
  if constexpr (Isa == NoiseIsa::kAvx512) {
    philox_group_avx512(keys, c0, a, b);
    return;
  } else if constexpr (Isa == NoiseIsa::kAvx2) {
    philox_group_avx2(keys, c0, a, b);
    return;
  }
#endif
  for (int j = 0; j < kGroup; ++j) {
    const Philox4 w = philox_4x(keys, c0 + static_cast<uint64_t>(j));
    a[j] = w.w0;
    b[j] = w.w1;
    a[kGroup + j] = w.w2;
    b[kGroup + j] = w.w3;
  }
}

// out[i, i + 4 kGroup) from the vector words: Box-Muller over the 2 kGroup
// pairs in one float loop (8 lanes in the AVX2 clone, 16 in AVX-512's), then
// interleaved into out.
template <NoiseIsa Isa, typename T>
FASTVAE_INLINE void normals_group_vector(const PhiloxKeys& keys, uint64_t offset0, int64_t i, T* out) {
  alignas(64) uint32_t a[2 * kGroup], b[2 * kGroup];
  philox_group<Isa>(keys, (offset0 + static_cast<uint64_t>(i)) >> 2, a, b);
#if defined(FASTVAE_PHILOX_X86)
  if constexpr (Isa == NoiseIsa::kAvx2 && sizeof(T) == sizeof(float)) {
    normals_from_words_avx2(a, b, out + i);
    return;
  }
#endif
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
// Measured on one AVX-512 thread (benchmarks/bench_noise.py's rng_1_thread): groups
// of 16 counters cost 0.90 ns a normal, 32 cost 0.70, 64 cost 0.72; a
// variable trip count for every group (not only the last) cost 0.77.
// On x86 the whole groups take the hand-vectorized Philox (vpmuludq, no
// masking) and one Box-Muller loop over the words: on AVX-512, 0.58 ns a
// normal against 0.76 for the fused loop, same bits (AMD EPYC, 1 thread, 2**22
// normals); AVX2 figures are in philox_group_avx2's comment.
template <NoiseIsa Isa, typename T>
FASTVAE_INLINE void randn_run(uint64_t seed, uint64_t offset0, int64_t n, T* out) {
  const PhiloxKeys keys(seed);
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((4 - (offset0 & 3)) & 3));
  randn_lanes(keys, offset0, 0, head, out);
  int64_t i = head;
  // whole groups (a fixed trip count vectorizes best), then one shorter group
  if constexpr (Isa != NoiseIsa::kPortable) {
    for (; n - i >= 4 * kGroup; i += 4 * kGroup) normals_group_vector<Isa>(keys, offset0, i, out);
  }
  for (; n - i >= 4 * kGroup; i += 4 * kGroup) normals_group(keys, offset0, i, kGroup, out);
  if (const int64_t m = (n - i) / 4; m > 0) {
    normals_group(keys, offset0, i, m, out);
    i += 4 * m;
  }
  randn_lanes(keys, offset0, i, n, out);
}

// One function per path, each compiled for its ISA level (the helpers above
// are inline, so they compile into each): what target_clones would make, with
// the choice in g_noise_isa, where a test can force it.
void randn_block_portable(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  randn_run<NoiseIsa::kPortable>(seed, offset0, n, out);
}

#if defined(FASTVAE_PHILOX_X86)
__attribute__((target("arch=x86-64-v3"))) void randn_block_avx2(uint64_t seed, uint64_t offset0, int64_t n,
                                                                float* out) {
  randn_run<NoiseIsa::kAvx2>(seed, offset0, n, out);
}

__attribute__((target("arch=x86-64-v4"))) void randn_block_avx512(uint64_t seed, uint64_t offset0, int64_t n,
                                                                  float* out) {
  randn_run<NoiseIsa::kAvx512>(seed, offset0, n, out);
}
#endif

}  // namespace

const char* noise_isa_name(NoiseIsa isa) {
  switch (isa) {
    case NoiseIsa::kAvx512: return "avx512";
    case NoiseIsa::kAvx2: return "avx2";
    case NoiseIsa::kPortable: break;
  }
  return "portable";
}

NoiseIsa best_noise_isa() { return kBestNoiseIsa; }

NoiseIsa noise_isa() { return static_cast<NoiseIsa>(g_noise_isa.load(std::memory_order_relaxed)); }

bool set_noise_isa(NoiseIsa isa) {
  if (static_cast<int>(isa) > static_cast<int>(kBestNoiseIsa)) return false;
  g_noise_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

void randn_block(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  switch (noise_isa()) {
#if defined(FASTVAE_PHILOX_X86)
    case NoiseIsa::kAvx512: return randn_block_avx512(seed, offset0, n, out);
    case NoiseIsa::kAvx2: return randn_block_avx2(seed, offset0, n, out);
#endif
    default: return randn_block_portable(seed, offset0, n, out);
  }
}

// libm's log, sin and cos stay scalar: the float64 path is the precise one.
// Its words come from the same Philox paths.
void randn_block(uint64_t seed, uint64_t offset0, int64_t n, double* out) {
  switch (noise_isa()) {
#if defined(FASTVAE_PHILOX_X86)
    case NoiseIsa::kAvx512: return randn_run<NoiseIsa::kAvx512>(seed, offset0, n, out);
    case NoiseIsa::kAvx2: return randn_run<NoiseIsa::kAvx2>(seed, offset0, n, out);
#endif
    default: return randn_run<NoiseIsa::kPortable>(seed, offset0, n, out);
  }
}

namespace {

// philox_group by the path isa (a runtime choice: the callers' loops are not cloned)
void philox_group_by(NoiseIsa isa, const PhiloxKeys& keys, uint64_t c0, uint32_t* a, uint32_t* b) {
  switch (isa) {
    case NoiseIsa::kAvx512: return philox_group<NoiseIsa::kAvx512>(keys, c0, a, b);
    case NoiseIsa::kAvx2: return philox_group<NoiseIsa::kAvx2>(keys, c0, a, b);
    default: return philox_group<NoiseIsa::kPortable>(keys, c0, a, b);
  }
}

// out[i, i1) = the folded words of offsets offset0 + [i, i1), one counter at a time
void folded_lanes(const PhiloxKeys& keys, uint64_t offset0, int64_t i, int64_t i1, int32_t* out) {
  while (i < i1) {
    const uint64_t offset = offset0 + static_cast<uint64_t>(i);
    const Philox4 w = philox_4x(keys, offset >> 2);
    const uint32_t words[4] = {w.w0, w.w1, w.w2, w.w3};
    for (int j = static_cast<int>(offset & 3); j < 4 && i < i1; ++j, ++i) out[i] = folded(words[j]);
  }
}

}  // namespace

void folded_words(uint64_t seed, uint64_t offset0, int64_t n, int32_t* out) {
  const PhiloxKeys keys(seed);
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((4 - (offset0 & 3)) & 3));
  folded_lanes(keys, offset0, 0, head, out);
  int64_t i = head;
  const NoiseIsa isa = noise_isa();
  for (; n - i >= 4 * kGroup; i += 4 * kGroup) {
    alignas(64) uint32_t a[2 * kGroup], b[2 * kGroup];
    philox_group_by(isa, keys, (offset0 + static_cast<uint64_t>(i)) >> 2, a, b);
    int32_t* o = out + i;
    for (int j = 0; j < kGroup; ++j) {
      o[4 * j] = folded(a[j]);
      o[4 * j + 1] = folded(b[j]);
      o[4 * j + 2] = folded(a[kGroup + j]);
      o[4 * j + 3] = folded(b[kGroup + j]);
    }
  }
  folded_lanes(keys, offset0, i, n, out);
}

void folded_words(uint64_t seed, uint64_t base, int64_t b0, int64_t n, int64_t L, uint64_t row_stride,
                  int32_t* out) {
  row_runs(base, b0, n, L, row_stride,
           [&](uint64_t offset, int64_t i, int64_t len) { folded_words(seed, offset, len, out + i); });
}

void philox_words(uint64_t seed, uint64_t counter0, int64_t n, uint32_t* out) {
  const PhiloxKeys keys(seed);
  const NoiseIsa isa = noise_isa();
  int64_t j = 0;
  for (; n - j >= kGroup; j += kGroup) {
    alignas(64) uint32_t a[2 * kGroup], b[2 * kGroup];
    philox_group_by(isa, keys, counter0 + static_cast<uint64_t>(j), a, b);
    for (int k = 0; k < kGroup; ++k) {
      uint32_t* w = out + 4 * (j + k);
      w[0] = a[k];
      w[1] = b[k];
      w[2] = a[kGroup + k];
      w[3] = b[kGroup + k];
    }
  }
  for (; j < n; ++j) {
    const Philox4 w = philox_4x(keys, counter0 + static_cast<uint64_t>(j));
    uint32_t* o = out + 4 * j;
    o[0] = w.w0;
    o[1] = w.w1;
    o[2] = w.w2;
    o[3] = w.w3;
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
    const uint64_t offset = offset0 + static_cast<uint64_t>(i);
    const Philox4 w = philox_4x(keys, offset >> 2);
    const bool second_pair = (offset & 3) >= 2;
    u1[i] = uniform_from_bits(second_pair ? w.w2 : w.w0);
    u2[i] = uniform_from_bits(second_pair ? w.w3 : w.w1);
  }
}

}  // namespace fastvae
