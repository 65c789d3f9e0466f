// sample_concrete on the CPU: relaxed one-hot (Concrete /
// Gumbel-softmax) samples of logits (N, L, C) at a temperature per latent,
// from C consecutive Philox uniforms per latent (one word per element: lane
// i % 4 of counter i // 4), and log q(z) summed over L from the same Exp(1)
// noise t = -log u (the Gumbel is -log t). The backward regenerates t instead
// of reading it, or reads the forward's relaxed z when its caller kept it
// (the eager operator: the noise is the costly part on the CPU). The oracle's concrete_terms (__init__.py) gives the closed forms;
// -inf logits mask their category (z_c = 0, left out of the density).
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "sample_concrete.h"
#include "sampler.h"

namespace fastvae {
namespace {

using sampler::exp_t;
using sampler::kTileElems;
using sampler::log1m;
using sampler::log_t;

// The Exp(1) variate of a folded word: -log u below 1/2, -log1p(-v) above.
// A branch here, not sampler::exp1's select: GCC vectorizes the two forms
// differently, and the float32 bits follow the form.
template <typename T>
FASTVAE_INLINE T exp1(int32_t x) {
  T u, v;
  open_uniforms(x, u, v);
  return x < kHalfWord ? -log_t(u) : -log1m(v);
}

// The per-element transcendentals run in flat loops over a whole tile (ISA
// clones for float32, as sample_positive's): t and log t of every element,
// then exp(y - m) of every element; only the sums and the max run per latent.

// t = the Exp(1) variate, lt = log t, of n folded words.
template <typename T>
FASTVAE_INLINE void noise_terms_t(const int32_t* x, int64_t n, T* t, T* lt) {
  for (int64_t i = 0; i < n; ++i) {
    const T tc = exp1<T>(x[i]);
    t[i] = tc;
    lt[i] = log_t(tc);
  }
}

// z = exp(y - m) of n elements.
template <typename T>
FASTVAE_INLINE void exp_shifted_t(const T* y, const T* m, int64_t n, T* z) {
  for (int64_t i = 0; i < n; ++i) z[i] = exp_t(y[i] - m[i]);
}

FASTVAE_CLONES void noise_terms_f32(const int32_t* x, int64_t n, float* t, float* lt) { noise_terms_t(x, n, t, lt); }
FASTVAE_CLONES void exp_shifted_f32(const float* y, const float* m, int64_t n, float* z) { exp_shifted_t(y, m, n, z); }

// What one latent's density needs besides z.
template <typename T>
struct LatentSums {
  T m, sum_t, sum_lt, sum_y;
  int64_t cnt;
};

// One latent's scores y = (a - max a - log t) / lam, its max and sums; masked
// (-inf) categories get y = -inf and t = 0 (so exp(y - m) = 0 needs no
// branch), and are left out of the sums. mm[c] = the max, for the flat exp
// pass. The shift by the largest logit changes neither z nor log q (only the
// logits' differences matter) but keeps y finite: (a - log t) / lam overflows
// for float32 logits above about 3e35 at lam = 1e-3.
template <typename T>
FASTVAE_INLINE LatentSums<T> latent_scores(const T* a, T lam, int64_t C, T* t, const T* lt, T* y, T* mm) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const T ilam = T(1) / lam;
  T top = ninf;
  for (int64_t c = 0; c < C; ++c) top = std::max(top, a[c]);
  top = top == ninf ? T(0) : top;
  LatentSums<T> r{ninf, T(0), T(0), T(0), 0};
  for (int64_t c = 0; c < C; ++c) {
    const bool ok = a[c] != ninf;
    const T yc = ((a[c] - top) - lt[c]) * ilam;
    r.sum_t += ok ? t[c] : T(0);
    r.sum_lt += ok ? lt[c] : T(0);
    r.sum_y += ok ? yc : T(0);
    r.cnt += ok;
    t[c] = ok ? t[c] : T(0);
    y[c] = ok ? yc : ninf;
    r.m = std::max(r.m, y[c]);
  }
  for (int64_t c = 0; c < C; ++c) mm[c] = r.m;
  return r;
}

// z /= its sum (then the one-hot of its argmax when hard); returns log q of
// the latent when asked (lgammas given: the forward only), lgammas[cnt] =
// lgamma(cnt) looked up (std::lgamma is a costly call, and a latent's count
// takes at most C + 1 values), and three logs:
// -sum_c log z_c = cnt (m + log s) - sum_c y_c over the unmasked categories.
template <typename T>
FASTVAE_INLINE double latent_finish(const LatentSums<T>& r, T lam, int64_t C, bool hard, const double* lgammas,
                                    const T* y, T* z) {
  T s = T(0);
  for (int64_t c = 0; c < C; ++c) s += z[c];
  const T is = T(1) / s;
  for (int64_t c = 0; c < C; ++c) z[c] *= is;
  if (hard) {
    int64_t arg = 0;
    for (int64_t c = 1; c < C; ++c) arg = y[c] > y[arg] ? c : arg;
    for (int64_t c = 0; c < C; ++c) z[c] = c == arg ? T(1) : T(0);
  }
  if (!lgammas) return 0.0;
  const T cn = static_cast<T>(r.cnt);
  return lgammas[r.cnt] + double(cn - T(1)) * double(log_t(lam)) +
         double(cn) * (double(r.m) + double(log_t(s))) - double(r.sum_y) + double(r.sum_lt) -
         double(cn) * double(log_t(r.sum_t));
}

// Scratch of one tile of n elements.
template <typename T>
struct TileScratch {
  std::vector<int32_t> x;
  std::vector<T> t, lt, y, mm;
  explicit TileScratch(int64_t n)
      : x(static_cast<size_t>(n)), t(static_cast<size_t>(n)), lt(static_cast<size_t>(n)), y(static_cast<size_t>(n)),
        mm(static_cast<size_t>(n)) {}
};

// The per-latent passes over a tile's latents (short loops over C, which the
// ISA clones vectorize too): the scores, then z's normalization and (when
// lq is given) each latent's log q.
template <typename T>
FASTVAE_INLINE void tile_scores_t(const T* logits, const T* temperature, int64_t n, int64_t C, T* t, const T* lt, T* y,
                                  T* mm, LatentSums<T>* sums) {
  for (int64_t j = 0, e = 0; e < n; ++j, e += C) {
    sums[j] = latent_scores(logits + e, temperature[j], C, t + e, lt + e, y + e, mm + e);
  }
}

template <typename T>
FASTVAE_INLINE void tile_finish_t(const LatentSums<T>* sums, const T* temperature, int64_t n, int64_t C, bool hard,
                                  const T* y, T* z, double* lq, const double* lgammas) {
  for (int64_t j = 0, e = 0; e < n; ++j, e += C) {
    const double q = latent_finish(sums[j], temperature[j], C, hard, lq ? lgammas : nullptr, y + e, z + e);
    if (lq) lq[j] = q;
  }
}

FASTVAE_CLONES void tile_scores_f32(const float* logits, const float* temperature, int64_t n, int64_t C, float* t,
                                    const float* lt, float* y, float* mm, LatentSums<float>* sums) {
  tile_scores_t(logits, temperature, n, C, t, lt, y, mm, sums);
}
FASTVAE_CLONES void tile_finish_f32(const LatentSums<float>* sums, const float* temperature, int64_t n, int64_t C,
                                    bool hard, const float* y, float* z, double* lq, const double* lgammas) {
  tile_finish_t(sums, temperature, n, C, hard, y, z, lq, lgammas);
}

// z (n elements, whole latents of C), normalized (one-hot when hard), and
// the per-latent sums and (lq given) log q of the latents [j0, j0 + n / C)
// from the words in w.x; temperature and logits at latent j0; lgammas[i] =
// lgamma(i) for i <= C, read when lq is given.
template <typename T>
FASTVAE_INLINE void tile_samples(TileScratch<T>& w, const T* logits, const T* temperature, int64_t n, int64_t C,
                                 bool hard, T* z, LatentSums<T>* sums, double* lq, const double* lgammas = nullptr) {
  if constexpr (std::is_same_v<T, float>) {  // the loops compiled per ISA level
    noise_terms_f32(w.x.data(), n, w.t.data(), w.lt.data());
    tile_scores_f32(logits, temperature, n, C, w.t.data(), w.lt.data(), w.y.data(), w.mm.data(), sums);
    exp_shifted_f32(w.y.data(), w.mm.data(), n, z);
    tile_finish_f32(sums, temperature, n, C, hard, w.y.data(), z, lq, lgammas);
  } else {
    noise_terms_t(w.x.data(), n, w.t.data(), w.lt.data());
    tile_scores_t(logits, temperature, n, C, w.t.data(), w.lt.data(), w.y.data(), w.mm.data(), sums);
    exp_shifted_t(w.y.data(), w.mm.data(), n, z);
    tile_finish_t(sums, temperature, n, C, hard, w.y.data(), z, lq, lgammas);
  }
}

// The analytic categorical KL of latents, sum_c pi_c (log pi_c - log p_c)
// with pi = softmax(a): for each latent, top = max_c a (0 when every category
// is masked), e_c = exp(a_c - top), s = sum_c e_c, log pi_c = (a_c - top) -
// log s and KL = sum_c e_c ((a_c - top) - log p_c) / s - log s (sum_c pi_c =
// 1). A category with e_c = 0 (masked, or underflowed) adds 0, as torch's
// where(pi > 0, ...) does, even where log p_c = -inf. The noise plays no
// part: the sampler's kernels compute it only because they already hold the
// logits (one launch for z, log q and the KL).
//
// A latent's C categories are too few for a vector, and its sums must run in
// order, so the latents are transposed: category-major, (C, J) for J
// latents, every pass runs across the latents (the ISA clones vectorize it),
// each latent's max and sums still in category order.
template <typename T>
struct KLScratch {
  std::vector<T> a, e, lp;         // (C, J): the logits, exp(a - top), log p of each latent's row
  std::vector<T> top, s, ls, kl;   // (J,)
  KLScratch(int64_t J, int64_t C)
      : a(static_cast<size_t>(J * C)), e(static_cast<size_t>(J * C)), lp(static_cast<size_t>(J * C)),
        top(static_cast<size_t>(J)), s(static_cast<size_t>(J)), ls(static_cast<size_t>(J)),
        kl(static_cast<size_t>(J)) {}
};

// The category-major passes over J latents (w's a and lp filled).
// The scratch arrays are distinct (__restrict): else the runtime alias checks
// GCC would need exceed what it versions a loop for, and the loops stay scalar.
template <typename T>
FASTVAE_INLINE void kl_passes_t(int64_t J, int64_t C, const T* __restrict a, T* __restrict e,
                                const T* __restrict lp, T* __restrict top, T* __restrict s, T* __restrict ls,
                                T* __restrict kl) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < J; ++j) top[j] = ninf;
  for (int64_t c = 0; c < C; ++c) {
    const T* ac = a + c * J;
    for (int64_t j = 0; j < J; ++j) top[j] = ac[j] > top[j] ? ac[j] : top[j];
  }
  for (int64_t j = 0; j < J; ++j) {
    top[j] = top[j] == ninf ? T(0) : top[j];
    s[j] = T(0);
    kl[j] = T(0);  // the sum of e_c ((a_c - top) - log p_c), until the last pass
  }
  for (int64_t c = 0; c < C; ++c) {
    const T *ac = a + c * J, *lc = lp + c * J;
    T* ec = e + c * J;
    for (int64_t j = 0; j < J; ++j) {
      const T x = exp_t(ac[j] - top[j]);
      ec[j] = x;
      s[j] += x;
      kl[j] += x > T(0) ? x * ((ac[j] - top[j]) - lc[j]) : T(0);
    }
  }
  for (int64_t j = 0; j < J; ++j) {
    ls[j] = log_t(s[j]);
    kl[j] = kl[j] / s[j] - ls[j];
  }
}
FASTVAE_CLONES void kl_passes_f32(int64_t J, int64_t C, const float* a, float* e, const float* lp, float* top,
                                  float* s, float* ls, float* kl) {
  kl_passes_t(J, C, a, e, lp, top, s, ls, kl);
}

// The KL terms of the J latents j0 .. j0 + J - 1 of logits a (latent j0 first,
// (J, C)) against log_p (L, C) (latent j's row j % L), into w.
template <typename T>
void latents_kl(const T* a, const T* log_p, int64_t j0, int64_t J, int64_t L, int64_t C, KLScratch<T>& w) {
  for (int64_t j = 0; j < J; ++j) {
    const T* aj = a + j * C;
    const T* lpj = log_p + ((j0 + j) % L) * C;
    for (int64_t c = 0; c < C; ++c) {
      w.a[static_cast<size_t>(c * J + j)] = aj[c];
      w.lp[static_cast<size_t>(c * J + j)] = lpj[c];
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    kl_passes_f32(J, C, w.a.data(), w.e.data(), w.lp.data(), w.top.data(), w.s.data(), w.ls.data(), w.kl.data());
  } else {
    kl_passes_t(J, C, w.a.data(), w.e.data(), w.lp.data(), w.top.data(), w.s.data(), w.ls.data(), w.kl.data());
  }
}

// kl[row] <- the analytic KL of rows [r0, r1) of logits (N, L, C), summed over L in double.
template <typename T>
void rows_kl(const T* logits, const T* log_p, int64_t r0, int64_t r1, int64_t L, int64_t C, T* kl) {
  KLScratch<T> w((r1 - r0) * L, C);
  latents_kl(logits + r0 * L * C, log_p, 0, (r1 - r0) * L, L, C, w);
  for (int64_t row = r0; row < r1; ++row) {
    double acc = 0.0;
    for (int64_t l = 0; l < L; ++l) acc += double(w.kl[static_cast<size_t>((row - r0) * L + l)]);
    kl[row] = static_cast<T>(acc);
  }
}

// d KL_j / d a_c = pi_c ((log pi_c - log p_c) - KL_j), pi_c = e_c / s, times
// g[j], where e_c > 0 (else 0), category-major into d (C, J).
template <typename T>
FASTVAE_INLINE void kl_grad_t(int64_t J, int64_t C, const T* __restrict g, const T* __restrict a,
                              const T* __restrict e, const T* __restrict lp, const T* __restrict top,
                              const T* __restrict s, const T* __restrict ls, const T* __restrict kl,
                              T* __restrict d) {
  for (int64_t c = 0; c < C; ++c) {
    const T *ac = a + c * J, *ec = e + c * J, *lc = lp + c * J;
    T* dc = d + c * J;
    for (int64_t j = 0; j < J; ++j) {
      dc[j] = ec[j] > T(0) ? g[j] * (ec[j] * (T(1) / s[j])) * ((((ac[j] - top[j]) - ls[j]) - lc[j]) - kl[j]) : T(0);
    }
  }
}
FASTVAE_CLONES void kl_grad_f32(int64_t J, int64_t C, const float* g, const float* a, const float* e,
                                const float* lp, const float* top, const float* s, const float* ls, const float* kl,
                                float* d) {
  kl_grad_t(J, C, g, a, e, lp, top, s, ls, kl, d);
}

}  // namespace

template <typename T>
void sample_concrete_forward(const T* logits, const T* temperature, uint64_t seed, bool hard, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L, int64_t C,
                             T* z, T* log_q, const T* log_p, T* kl, int n_threads) {
  const int64_t LC = L * C, NLC = N * LC;
  if (K * N == 0) return;
  if (LC == 0) {
    if (log_q) std::fill(log_q, log_q + K * N, T(0));
    if (kl) std::fill(kl, kl + N, T(0));
    return;
  }
  const int64_t tile_rows = std::max<int64_t>(1, kTileElems / LC);
  const int64_t n_tiles = (N + tile_rows - 1) / tile_rows;
  std::vector<double> lgammas(static_cast<size_t>(C + 1));  // lgamma of a latent's count of unmasked categories
  for (int64_t i = 0; i <= C; ++i) lgammas[static_cast<size_t>(i)] = std::lgamma(double(i));
#pragma omp parallel for num_threads(n_threads) schedule(static) collapse(2)
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      const int64_t r0 = tile * tile_rows, r1 = std::min(N, r0 + tile_rows);
      const int64_t n = (r1 - r0) * LC;
      TileScratch<T> w(n);
      std::vector<LatentSums<T>> sums(static_cast<size_t>((r1 - r0) * L));
      std::vector<double> lq(log_q ? static_cast<size_t>((r1 - r0) * L) : 0);
      folded_words(seed, offset0 + static_cast<uint64_t>(k) * sample_stride, r0 * LC, n, LC, row_stride, w.x.data());
      tile_samples(w, logits + r0 * LC, temperature + r0 * L, n, C, hard, z + k * NLC + r0 * LC, sums.data(),
                   log_q ? lq.data() : nullptr, lgammas.data());
      if (log_q) {
        for (int64_t row = r0; row < r1; ++row) {
          double acc = 0.0;
          for (int64_t l = 0; l < L; ++l) acc += lq[static_cast<size_t>((row - r0) * L + l)];
          log_q[k * N + row] = static_cast<T>(acc);
        }
      }
      if (kl && k == 0) rows_kl(logits, log_p, r0, r1, L, C, kl);  // per row, not per sample
    }
  }
}

template <typename T>
void sample_concrete_backward(const T* dz, const T* dlog_q, const T* logits, const T* temperature, uint64_t seed,
                              bool stop_score, int64_t K, int64_t N, int64_t L, int64_t C, T* dlogits,
                              const T* dkl, const T* log_p, int n_threads, const T* z_saved) {
  const int64_t NL = N * L, NLC = NL * C;
  if (NLC == 0) return;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t block = std::max<int64_t>(1, kTileElems / C);  // latents per block
  const int64_t n_blocks = (NL + block - 1) / block;
  // the forward's relaxed z (K, N, L, C), when given, is the z that
  // regenerating the noise gives, bit for bit: read instead, unless the
  // stop-score term, which needs the noise itself, is asked
  const bool from_z = z_saved != nullptr && !(stop_score && dlog_q);
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t j0 = blk * block, j1 = std::min(NL, j0 + block);
    const int64_t n = (j1 - j0) * C;
    TileScratch<T> w(from_z ? 0 : n);
    std::vector<T> acc(static_cast<size_t>(n), T(0)), z(static_cast<size_t>(from_z ? 0 : n));
    std::vector<LatentSums<T>> sums(static_cast<size_t>(j1 - j0));
    if (from_z) {  // only each latent's count of unmasked categories is left to find
      for (int64_t j = j0; j < j1; ++j) {
        int64_t cnt = 0;
        for (int64_t c = 0; c < C; ++c) cnt += logits[j * C + c] != ninf;
        sums[j - j0].cnt = cnt;
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      if (!from_z) {
        folded_words(seed, static_cast<uint64_t>(k * NLC + j0 * C), n, w.x.data());
        tile_samples(w, logits + j0 * C, temperature + j0, n, C, false, z.data(), sums.data(), nullptr);
      }
      const T* zk = from_z ? z_saved + k * NLC + j0 * C : z.data();
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t e = (j - j0) * C;
        const LatentSums<T>& r = sums[j - j0];
        const T lam = temperature[j];
        const T* zj = zk + e;
        T* d = acc.data() + e;
        if (dz) {
          const T* g = dz + k * NLC + j * C;
          T zg = T(0);
          for (int64_t c = 0; c < C; ++c) zg += zj[c] * g[c];
          for (int64_t c = 0; c < C; ++c) d[c] += zj[c] * (g[c] - zg);
        }
        if (dlog_q) {
          const T gq = dlog_q[k * N + j / L];
          const T cnt = static_cast<T>(r.cnt);
          if (stop_score) {
            const T b = lam + T(1), cl = cnt * lam, it = T(1) / r.sum_t;
            const T* t = w.t.data() + e;
            for (int64_t c = 0; c < C; ++c) d[c] += gq * (cnt * zj[c] + cl * (t[c] * it) - b);
          } else {
            for (int64_t c = 0; c < C; ++c) d[c] += gq * (cnt * zj[c] - T(1));
          }
        }
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      const T ilam = T(1) / temperature[j];
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = j * C + c;
        dlogits[e] = logits[e] == ninf ? T(0) : acc[e - j0 * C] * ilam;
      }
    }
    if (dkl) {  // d KL_l / d a_c, added after the noise terms' 1 / lam
      const int64_t J = j1 - j0;
      KLScratch<T> w(J, C);
      latents_kl(logits + j0 * C, log_p, j0, J, L, C, w);
      std::vector<T> g(static_cast<size_t>(J)), d(static_cast<size_t>(J * C));
      for (int64_t j = 0; j < J; ++j) g[static_cast<size_t>(j)] = dkl[(j0 + j) / L];
      if constexpr (std::is_same_v<T, float>) {
        kl_grad_f32(J, C, g.data(), w.a.data(), w.e.data(), w.lp.data(), w.top.data(), w.s.data(), w.ls.data(),
                    w.kl.data(), d.data());
      } else {
        kl_grad_t(J, C, g.data(), w.a.data(), w.e.data(), w.lp.data(), w.top.data(), w.s.data(), w.ls.data(),
                  w.kl.data(), d.data());
      }
      for (int64_t j = 0; j < J; ++j) {
        T* dj = dlogits + (j0 + j) * C;
        for (int64_t c = 0; c < C; ++c) dj[c] += d[static_cast<size_t>(c * J + j)];
      }
    }
  }
}

template void sample_concrete_forward<float>(const float*, const float*, uint64_t, bool, uint64_t, uint64_t, uint64_t,
                                             int64_t, int64_t, int64_t, int64_t, float*, float*, const float*, float*,
                                             int);
template void sample_concrete_forward<double>(const double*, const double*, uint64_t, bool, uint64_t, uint64_t,
                                              uint64_t, int64_t, int64_t, int64_t, int64_t, double*, double*,
                                              const double*, double*, int);
template void sample_concrete_backward<float>(const float*, const float*, const float*, const float*, uint64_t, bool,
                                              int64_t, int64_t, int64_t, int64_t, float*, const float*, const float*,
                                              int, const float*);
template void sample_concrete_backward<double>(const double*, const double*, const double*, const double*, uint64_t,
                                               bool, int64_t, int64_t, int64_t, int64_t, double*, const double*,
                                               const double*, int, const double*);

}  // namespace fastvae
