// sample_concrete on the CPU (issue 35): relaxed one-hot (Concrete /
// Gumbel-softmax) samples of logits (N, L, C) at a temperature per latent,
// from C consecutive Philox uniforms per latent (one word per element: lane
// i % 4 of counter i // 4), and log q(z) summed over L from the same Exp(1)
// noise t = -log u (the Gumbel is -log t). The backward regenerates t instead
// of reading it. fastvae.reference.concrete_terms gives the closed forms;
// -inf logits mask their category (z_c = 0, left out of the density).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastmath.h"
#include "ops.h"
#include "philox.h"

namespace fastvae {
namespace {

constexpr int64_t kTileElems = 8192;

FASTVAE_INLINE float log_c(float x) { return fast_log_positive(x); }
FASTVAE_INLINE double log_c(double x) { return std::log(x); }
FASTVAE_INLINE float exp_c(float x) { return fast_exp(x); }
FASTVAE_INLINE double exp_c(double x) { return std::exp(x); }

// log(1 - v) for v in [0, 1/2] to v's relative precision.
FASTVAE_INLINE float log1m(float v) {
  const float w = 1.0f - v;
  const bool one = w == 1.0f;
  return one ? -v : fast_log_positive(w) * (-v / (one ? -1.0f : w - 1.0f));
}
FASTVAE_INLINE double log1m(double v) { return std::log1p(-v); }

// The Exp(1) variate of a folded word: -log u below 1/2, -log1p(-v) above.
template <typename T>
FASTVAE_INLINE T exp1(int32_t x) {
  T u, v;
  open_uniforms(x, u, v);
  return x < kHalfWord ? -log_c(u) : -log1m(v);
}

// One latent of C categories: z (soft, or the one-hot of its argmax when
// hard) and the latent's log q; y and t are scratch of C. Masked (-inf)
// categories get y = -inf, t = 0, so exp(y - m) = 0 needs no branch. Three
// transcendentals per element: log u, log t and exp(y - m) (z = e / s).
template <typename T>
FASTVAE_INLINE double latent_forward(const int32_t* x, const T* a, T lam, int64_t C, bool hard, T* y, T* t, T* z,
                                     T* w_out, T* count_out) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const T ilam = T(1) / lam;
  T m = ninf, sum_t = T(0), sum_lt = T(0), sum_y = T(0);
  int64_t cnt = 0;
  for (int64_t c = 0; c < C; ++c) {
    const bool ok = a[c] != ninf;
    const T tc = exp1<T>(x[c]);
    const T lt = log_c(tc);
    const T yc = (a[c] - lt) * ilam;
    t[c] = ok ? tc : T(0);
    y[c] = ok ? yc : ninf;
    sum_t += ok ? tc : T(0);
    sum_lt += ok ? lt : T(0);
    sum_y += ok ? yc : T(0);
    cnt += ok;
    m = std::max(m, y[c]);
  }
  T s = T(0);
  for (int64_t c = 0; c < C; ++c) {
    z[c] = exp_c(y[c] - m);
    s += z[c];
  }
  const T is = T(1) / s;
  for (int64_t c = 0; c < C; ++c) z[c] *= is;
  const T ls = log_c(s);
  const T cn = static_cast<T>(cnt);
  if (w_out) {
    const T it = T(1) / sum_t;
    for (int64_t c = 0; c < C; ++c) w_out[c] = t[c] * it;
    *count_out = cn;
  }
  if (hard) {
    int64_t arg = 0;
    for (int64_t c = 1; c < C; ++c) arg = y[c] > y[arg] ? c : arg;
    for (int64_t c = 0; c < C; ++c) z[c] = c == arg ? T(1) : T(0);
  }
  // -sum_c log z_c = cnt (m + ls) - sum_c y_c over the unmasked categories
  return std::lgamma(double(cnt)) + double(cn - T(1)) * double(log_c(lam)) + double(cn) * (double(m) + double(ls)) -
         double(sum_y) + double(sum_lt) - double(cn) * double(log_c(sum_t));
}

}  // namespace

template <typename T>
void sample_concrete_forward(const T* logits, const T* temperature, uint64_t seed, bool hard, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N, int64_t L, int64_t C,
                             T* z, T* log_q, int n_threads) {
  const int64_t LC = L * C, NLC = N * LC;
  if (K * N == 0) return;
  if (LC == 0) {
    if (log_q) std::fill(log_q, log_q + K * N, T(0));
    return;
  }
  const int64_t tile_rows = std::max<int64_t>(1, kTileElems / LC);
  const int64_t n_tiles = (N + tile_rows - 1) / tile_rows;
#pragma omp parallel for num_threads(n_threads) schedule(static) collapse(2)
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      const int64_t r0 = tile * tile_rows, r1 = std::min(N, r0 + tile_rows);
      const int64_t n = (r1 - r0) * LC;
      std::vector<int32_t> x(static_cast<size_t>(n));
      std::vector<T> y(static_cast<size_t>(C)), t(static_cast<size_t>(C));
      folded_words(seed, offset0 + static_cast<uint64_t>(k) * sample_stride, r0 * LC, n, LC, row_stride, x.data());
      for (int64_t row = r0; row < r1; ++row) {
        double acc = 0.0;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t e = row * LC + l * C;
          acc += latent_forward<T>(x.data() + (e - r0 * LC), logits + e, temperature[row * L + l], C, hard,
                                   y.data(), t.data(), z + k * NLC + e, static_cast<T*>(nullptr),
                                   static_cast<T*>(nullptr));
        }
        if (log_q) log_q[k * N + row] = static_cast<T>(acc);
      }
    }
  }
}

template <typename T>
void sample_concrete_backward(const T* dz, const T* dlog_q, const T* logits, const T* temperature, uint64_t seed,
                              bool stop_score, int64_t K, int64_t N, int64_t L, int64_t C, T* dlogits,
                              int n_threads) {
  const int64_t NL = N * L, NLC = NL * C;
  if (NLC == 0) return;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t block = std::max<int64_t>(1, kTileElems / C);  // latents per block
  const int64_t n_blocks = (NL + block - 1) / block;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t j0 = blk * block, j1 = std::min(NL, j0 + block);
    const int64_t n = (j1 - j0) * C;
    std::vector<int32_t> x(static_cast<size_t>(n));
    std::vector<T> acc(static_cast<size_t>(n), T(0)), y(static_cast<size_t>(C)), t(static_cast<size_t>(C)),
        z(static_cast<size_t>(C)), w(static_cast<size_t>(C));
    for (int64_t k = 0; k < K; ++k) {
      folded_words(seed, static_cast<uint64_t>(k * NLC + j0 * C), n, x.data());
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t e = j * C;
        const T lam = temperature[j];
        T cnt = T(0);
        latent_forward<T>(x.data() + (e - j0 * C), logits + e, lam, C, false, y.data(), t.data(), z.data(),
                          w.data(), &cnt);
        T* d = acc.data() + (e - j0 * C);
        if (dz) {
          const T* g = dz + k * NLC + e;
          T zg = T(0);
          for (int64_t c = 0; c < C; ++c) zg += z[c] * g[c];
          for (int64_t c = 0; c < C; ++c) d[c] += z[c] * (g[c] - zg);
        }
        if (dlog_q) {
          const T gq = dlog_q[k * N + j / L];
          if (stop_score) {
            const T b = lam + T(1), cl = cnt * lam;
            for (int64_t c = 0; c < C; ++c) d[c] += gq * (cnt * z[c] + cl * w[c] - b);
          } else {
            for (int64_t c = 0; c < C; ++c) d[c] += gq * (cnt * z[c] - T(1));
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
  }
}

template void sample_concrete_forward<float>(const float*, const float*, uint64_t, bool, uint64_t, uint64_t, uint64_t,
                                             int64_t, int64_t, int64_t, int64_t, float*, float*, int);
template void sample_concrete_forward<double>(const double*, const double*, uint64_t, bool, uint64_t, uint64_t,
                                              uint64_t, int64_t, int64_t, int64_t, int64_t, double*, double*, int);
template void sample_concrete_backward<float>(const float*, const float*, const float*, const float*, uint64_t, bool,
                                              int64_t, int64_t, int64_t, int64_t, float*, int);
template void sample_concrete_backward<double>(const double*, const double*, const double*, const double*, uint64_t,
                                               bool, int64_t, int64_t, int64_t, int64_t, double*, int);

}  // namespace fastvae
