// discretized_logistic_mixture_log_prob on the CPU: PixelCNN++'s likelihood
// (Salimans et al. 2017; openai/pixel-cnn nn.py discretized_mix_logistic_loss)
// per image, out[k, p] = sum_pixels (lse_m(logit_m + sum_c lp_mc) - lse_m(logit_m)),
// lp_mc the log mass of x's bin under logistic m of channel c (the oracle's
// discretized_logistic_terms, __init__.py, gives the formula and its branches).
//
// Work items are (image, chunk of kChunk pixels): an image's chunks add their
// partial sums in chunk order, so the result does not depend on the thread
// count. Within a chunk, loops run over pixels (contiguous in every layout),
// branch-free, so GCC vectorizes them in each ISA clone; PixelCNN++'s
// low-mass fallback, which well-fitted models rarely take, is flagged in that
// loop and recomputed serially afterwards for the flagged pixels only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "discretized_logistic_mixture_log_prob.h"
#include "fastmath.h"

namespace fastvae {
namespace {

constexpr int64_t kChunk = 1024;  // pixels per work item
constexpr double kEdge = 0.999;  // PixelCNN++'s first and last bin: x < -0.999, x > 0.999
constexpr double kLogMinDelta = -11.512925464970229;  // log(1e-5): below it, the pdf fallback
constexpr double kLogScaleMin = -7.0;  // PixelCNN++'s floor of the log scales

// expm1 in float32: for |x| < 0.5 a degree-8 Taylor polynomial (its remainder
// is below 1e-8 relative there), e^x - 1 beyond (at most 2.5 ulp).
FASTVAE_INLINE float expm1_small_t(float x) {
  return x * (1.0f + x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120 + x * (
      1.0f / 720 + x * (1.0f / 5040 + x * (1.0f / 40320))))))));
}
FASTVAE_INLINE double expm1_small_t(double x) { return std::expm1(x); }
FASTVAE_INLINE float expm1_t(float x) { return std::fabs(x) < 0.5f ? expm1_small_t(x) : fast_exp(x) - 1.0f; }
FASTVAE_INLINE double expm1_t(double x) { return std::expm1(x); }

FASTVAE_INLINE float log_t(float u) { return fast_log_positive(u); }  // u a positive normal number
FASTVAE_INLINE double log_t(double u) { return std::log(u); }

// log(1 - e^-d) for d >= 0 with one exp and one log, given e = e^-d: below
// d = 0.5, 1 - e^-d = -expm1(-d) (the Taylor polynomial, no cancellation);
// above, log1p(-e) = log(v) + (-e - (v - 1)) / v with v = 1 - e rounded
// (Goldberg's correction). Also returns v = 1 - e^-d, whose ratio d e / v is
// d / (e^d - 1), the derivative's term. Below d = 1e-5 the value is under
// log(1e-5), so the caller's fallback replaces it: a float32 v that
// underflows may then give -inf.
template <typename T>
FASTVAE_INLINE T log1mexp_t(T d, T e, T& v) {
  const bool small = d < T(0.5);
  v = small ? -expm1_small_t(-d) : T(1) - e;
  const T corr = small ? T(0) : (-e - (v - T(1))) / v;
  const T lv = v >= std::numeric_limits<T>::min() ? log_t(v) : -std::numeric_limits<T>::infinity();
  return lv + corr;
}

// log(1 + t) for t in [0, 1] (Goldberg's correction) and softplus / sigmoid
// sharing one exp: e = e^-|z| gives softplus(z) = max(z, 0) + log1p(e) and
// sigmoid(z) = z >= 0 ? 1 / (1 + e) : e / (1 + e).
template <typename T>
FASTVAE_INLINE T log1p_unit_t(T t) {
  const T u = T(1) + t;
  const T du = u - T(1);
  return du == T(0) ? t : log_t(u) + (t - du) / u;
}

// tanh from expm1 (no cancellation near 0).
FASTVAE_INLINE float tanh_t(float v) {
  const float t = expm1_t(-2.0f * std::fabs(v));
  const float r = -t / (2.0f + t);
  return v < 0.0f ? -r : r;
}
FASTVAE_INLINE double tanh_t(double v) { return std::tanh(v); }

// The per-element constants of num_bins: half a bin and log((num_bins - 1) / 2).
template <typename T>
struct Bins {
  T h, two_h, log_half_bins;
  explicit Bins(int num_bins)
      : h(T(1.0 / (num_bins - 1))), two_h(T(2.0 / (num_bins - 1))),
        log_half_bins(T(std::log((num_bins - 1) / 2.0))) {}
};

// What a bin's log mass and its derivatives share, for one pixel of one
// component and channel: s = max(ls, -7), inv = e^-s, a = inv (x - mu + h),
// b = inv (x - mu - h), d = a - b, e^-|a|, e^-|b|, e^-d, softplus(-a),
// softplus(b), the interior bin's log mass mid and v = 1 - e^-d.
template <typename T>
struct BinTerms {
  T inv, a, b, d, ea, eb, ed, sa, sb, v, mid;
  bool left, right, fallback;
};

template <typename T>
FASTVAE_INLINE BinTerms<T> bin_terms(T x, T mu, T ls_raw, const Bins<T>& bins) {
  BinTerms<T> t;
  const T s = ls_raw > T(kLogScaleMin) ? ls_raw : T(kLogScaleMin);
  t.inv = exp_t(-s);
  const T c = x - mu;
  t.a = t.inv * (c + bins.h);
  t.b = t.inv * (c - bins.h);
  t.d = bins.two_h * t.inv;
  t.ea = exp_t(-std::fabs(t.a));
  t.eb = exp_t(-std::fabs(t.b));
  t.ed = exp_t(-t.d);
  t.sa = (t.a < T(0) ? -t.a : T(0)) + log1p_unit_t(t.ea);  // softplus(-a)
  t.sb = (t.b > T(0) ? t.b : T(0)) + log1p_unit_t(t.eb);  // softplus(b)
  t.mid = -t.sa - t.sb + log1mexp_t(t.d, t.ed, t.v);
  t.left = x < T(-kEdge);
  t.right = x > T(kEdge);
  t.fallback = !t.left && !t.right && !(t.mid > T(kLogMinDelta));
  return t;
}

// log mass of x's bin except in the fallback, and whether it is the fallback.
template <typename T>
FASTVAE_INLINE T bin_log_mass(T x, T mu, T ls_raw, const Bins<T>& bins, bool& fallback) {
  const BinTerms<T> t = bin_terms(x, mu, ls_raw, bins);
  fallback = t.fallback;
  return t.left ? -t.sa : (t.right ? -t.sb : t.mid);
}

// The same with its derivatives in mu and in the raw log scale (0 below the floor).
template <typename T>
FASTVAE_INLINE T bin_log_mass_grad(T x, T mu, T ls_raw, const Bins<T>& bins, bool& fallback, T& dmu,
                                   T& dls) {
  const BinTerms<T> t = bin_terms(x, mu, ls_raw, bins);
  const T pa = (t.a > T(0) ? t.ea : T(1)) / (T(1) + t.ea);  // sigmoid(-a)
  const T pb = (t.b > T(0) ? T(1) : t.eb) / (T(1) + t.eb);  // sigmoid(b)
  fallback = t.fallback;
  const T q = t.v > T(0) ? t.d * t.ed / t.v : T(1);  // d / (e^d - 1); unused where d underflows (fallback)
  dmu = t.left ? -t.inv * pa : (t.right ? t.inv * pb : -t.inv * (pa - pb));
  const T g = t.left ? -t.a * pa : (t.right ? t.b * pb : -t.a * pa + t.b * pb - q);
  dls = ls_raw >= T(kLogScaleMin) ? g : T(0);
  return t.left ? -t.sa : (t.right ? -t.sb : t.mid);
}

// PixelCNN++'s fallback: the log pdf at the bin's centre plus the log bin width.
template <typename T>
T pdf_log_mass(T x, T mu, T ls_raw, const Bins<T>& bins, T* dmu, T* dls) {
  const T s = ls_raw > T(kLogScaleMin) ? ls_raw : T(kLogScaleMin);
  const T inv = exp_t(-s);
  const T mid = inv * (x - mu);
  if (dmu) {
    const T t = T(1) - T(2) * sigmoid_t(mid);
    *dmu = -inv * t;
    *dls = ls_raw >= T(kLogScaleMin) ? -mid * t - T(1) : T(0);
  }
  return mid - s - T(2) * softplus_t(mid) - bins.log_half_bins;
}

// Where one image's parameters lie. Packed (PixelCNN++): params (K, P, 10 M, S),
// after the M logits channel c's block of 3 M rows holds its M means, M log
// scales and M raw coefficients. Otherwise logits (K, P, M, S) and means,
// log scales (K, P, M, C, S).
template <typename T>
struct Layout {
  const T* logits;
  const T* means;
  const T* log_scales;
  const T* coeffs;  // packed only
  int64_t img_logits, img_means, mean_m, mean_c;
  int64_t M, C, S;
  bool packed;

  Layout(const T* params, const T* means_, const T* log_scales_, int64_t M_, int64_t C_, int64_t S_)
      : M(M_), C(C_), S(S_), packed(means_ == nullptr) {
    logits = params;
    if (packed) {
      means = params + M * S;
      log_scales = params + 2 * M * S;
      coeffs = params + 3 * M * S;
      img_logits = img_means = 10 * M * S;
      mean_m = S;
      mean_c = 3 * M * S;
    } else {
      means = means_;
      log_scales = log_scales_;
      coeffs = nullptr;
      img_logits = M * S;
      img_means = M * C * S;
      mean_m = C * S;
      mean_c = S;
    }
  }
  // offset of (image r, component m, channel c, pixel s) in means / log_scales / coeffs
  int64_t at(int64_t r, int64_t m, int64_t c, int64_t s) const {
    return r * img_means + m * mean_m + c * mean_c + s;
  }
};

// mu'[i] of channel c: PixelCNN++'s coupled means m1 + tanh(c0) x0 and
// m2 + tanh(c1) x0 + tanh(c2) x1 (packed), the means themselves otherwise.
template <typename T>
FASTVAE_INLINE const T* channel_means(const Layout<T>& L, const T* x, int64_t r, int64_t m, int64_t c,
                                      int64_t s0, int64_t n, T* tmp) {
  const T* mu = L.means + L.at(r, m, c, s0);
  if (!L.packed || c == 0) return mu;
  const T* x0 = x + s0;
  const T* a0 = L.coeffs + L.at(r, m, c - 1, s0);  // c = 1: coefficient 0; c = 2: coefficient 1
  if (c == 1) {
    for (int64_t i = 0; i < n; ++i) tmp[i] = mu[i] + tanh_t(a0[i]) * x0[i];
  } else {
    const T* x1 = x + L.S + s0;
    const T* a2 = L.coeffs + L.at(r, m, 2, s0);
    for (int64_t i = 0; i < n; ++i) tmp[i] = mu[i] + tanh_t(a0[i]) * x0[i] + tanh_t(a2[i]) * x1[i];
  }
  return tmp;
}

// (max, log sum exp) over M rows of n values: lse[i] = log sum_m e^v[m][i].
template <typename T>
FASTVAE_INLINE void logsumexp_rows(const T* v, int64_t stride, int64_t M, int64_t n, T* mx, T* lse) {
  for (int64_t i = 0; i < n; ++i) mx[i] = v[i];
  for (int64_t m = 1; m < M; ++m) {
    const T* vm = v + m * stride;
    for (int64_t i = 0; i < n; ++i) mx[i] = vm[i] > mx[i] ? vm[i] : mx[i];
  }
  for (int64_t i = 0; i < n; ++i) {
    lse[i] = T(0);
    mx[i] = std::isfinite(mx[i]) ? mx[i] : T(0);  // all -inf: e^(-inf - 0) = 0, no -inf - -inf
  }
  for (int64_t m = 0; m < M; ++m) {
    const T* vm = v + m * stride;
    for (int64_t i = 0; i < n; ++i) lse[i] += exp_t(vm[i] - mx[i]);
  }
  for (int64_t i = 0; i < n; ++i) lse[i] = mx[i] + log_t(lse[i]);
}

template <typename T>
struct Scratch {
  std::vector<T> lp, tmp, e, mx, lse, zlse;
  std::vector<unsigned char> fb;
  Scratch(int64_t M, int64_t n) : lp(M * n), tmp(n), e(n), mx(n), lse(n), zlse(n), fb(n) {}
};

// The pass that the forward and the backward share: w.lp's M rows of n get
// logit_m + sum_c lp_mc at the chunk's pixels, w.lse and w.zlse their and the
// logits' log-sum-exps over m. kGrad also writes dlp/dmu' and dlp/dls to
// dmeans and dlog_scales (unscaled: the weights need the whole sum first);
// a template flag rather than a run-time one, so that each element loop
// compiles to one branch-free body.
template <bool kGrad, typename T>
FASTVAE_INLINE void mixture_terms(const Layout<T>& L, const T* x, const Bins<T>& bins, int64_t r, int64_t s0,
                                  int64_t n, T* dmeans, T* dlog_scales, Scratch<T>& w) {
  const int64_t M = L.M, S = L.S;
  for (int64_t m = 0; m < M; ++m) {
    T* lp = w.lp.data() + m * n;
    const T* lg = L.logits + r * L.img_logits + m * S + s0;
    for (int64_t i = 0; i < n; ++i) lp[i] = lg[i];
    for (int64_t c = 0; c < L.C; ++c) {
      const T* xc = x + c * S + s0;
      const T* mu = channel_means(L, x, r, m, c, s0, n, w.tmp.data());
      const int64_t off = L.at(r, m, c, s0);
      const T* ls = L.log_scales + off;
      T* dmu = kGrad ? dmeans + off : nullptr;
      T* dls = kGrad ? dlog_scales + off : nullptr;
      T* e = w.e.data();
      unsigned char* fb = w.fb.data();
      int flagged = 0;
#pragma omp simd reduction(+ : flagged)
      for (int64_t i = 0; i < n; ++i) {
        bool f;
        if constexpr (kGrad) {
          T a, b;
          e[i] = bin_log_mass_grad(xc[i], mu[i], ls[i], bins, f, a, b);
          dmu[i] = a;
          dls[i] = b;
        } else {
          e[i] = bin_log_mass(xc[i], mu[i], ls[i], bins, f);
        }
        fb[i] = f;
        flagged += f;
      }
      if (flagged) {
        for (int64_t i = 0; i < n; ++i) {
          if (fb[i]) {  // no offset to the forward's null pointers
            e[i] = pdf_log_mass<T>(xc[i], mu[i], ls[i], bins, kGrad ? dmu + i : nullptr, kGrad ? dls + i : nullptr);
          }
        }
      }
      for (int64_t i = 0; i < n; ++i) lp[i] += e[i];
    }
  }
  logsumexp_rows(w.lp.data(), n, M, n, w.mx.data(), w.lse.data());
  logsumexp_rows(L.logits + r * L.img_logits + s0, S, M, n, w.mx.data(), w.zlse.data());
}

// Sum over the chunk's pixels of one image's log-likelihood.
template <typename T>
FASTVAE_INLINE double forward_chunk(const Layout<T>& L, const T* x, const Bins<T>& bins, int64_t r, int64_t s0,
                                    int64_t n, Scratch<T>& w) {
  mixture_terms<false, T>(L, x, bins, r, s0, n, nullptr, nullptr, w);
  double acc = 0.0;
  const T* lse = w.lse.data();
  const T* z = w.zlse.data();
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += double(lse[i] - z[i]);
  return acc;
}

// d log p / d raw coefficient of one component's chunk from the channels'
// mean gradients: d tanh(a) / da = 1 - tanh^2. The pointers are restrict
// parameters: GCC vectorizes across those, while with ordinary pointers this
// loop (three outputs, seven inputs) needs more run-time alias checks than it
// allows and stays scalar. The three outputs are distinct rows of the
// coefficients, which the means rows read here never overlap.
template <typename T>
FASTVAE_INLINE void coeff_grads(const T* __restrict a0, const T* __restrict a1, const T* __restrict a2,
                                const T* __restrict dmu1, const T* __restrict dmu2, const T* __restrict x0,
                                const T* __restrict x1, int64_t n, T* __restrict d0, T* __restrict d1,
                                T* __restrict d2) {
  for (int64_t i = 0; i < n; ++i) {
    const T t0 = tanh_t(a0[i]), t1 = tanh_t(a1[i]), t2 = tanh_t(a2[i]);
    d0[i] = dmu1[i] * x0[i] * (T(1) - t0 * t0);
    d1[i] = dmu2[i] * x0[i] * (T(1) - t1 * t1);
    d2[i] = dmu2[i] * x1[i] * (T(1) - t2 * t2);
  }
}

// The gradients of one chunk of one image, given g = grad_out[r]. dmeans and
// dlog_scales (or dparams' rows of them) first receive dlp/dmu' and dlp/dls,
// then are scaled by g w_m once the pixel's posterior weights w_m are known.
template <typename T>
FASTVAE_INLINE void backward_chunk(const Layout<T>& L, const T* x, const Bins<T>& bins, int64_t r, int64_t s0,
                                   int64_t n, T g, T* dlogits_img, T* dmeans, T* dlog_scales,
                                   Scratch<T>& w) {
  const int64_t M = L.M, S = L.S;
  mixture_terms<true>(L, x, bins, r, s0, n, dmeans, dlog_scales, w);
  const T* lse = w.lse.data();
  const T* zlse = w.zlse.data();
  T* gw = w.tmp.data();
  const T* x0 = x + s0;
  const T* x1 = x + S + s0;
  for (int64_t m = 0; m < M; ++m) {
    const T* lp = w.lp.data() + m * n;
    const T* lg = L.logits + r * L.img_logits + m * S + s0;
    T* dlg = dlogits_img + m * S + s0;
    for (int64_t i = 0; i < n; ++i) {
      gw[i] = g * exp_t(lp[i] - lse[i]);
      dlg[i] = gw[i] - g * exp_t(lg[i] - zlse[i]);
    }
    for (int64_t c = 0; c < L.C; ++c) {
      const int64_t off = L.at(r, m, c, s0);
      T* dmu = dmeans + off;
      T* dls = dlog_scales + off;
      for (int64_t i = 0; i < n; ++i) {
        dmu[i] *= gw[i];
        dls[i] *= gw[i];
      }
    }
    if (L.packed) {  // d tanh(a) / da = 1 - tanh^2
      const T* dmu1 = dmeans + L.at(r, m, 1, s0);
      const T* dmu2 = dmeans + L.at(r, m, 2, s0);
      const int64_t c0 = L.at(r, m, 0, s0), c1 = L.at(r, m, 1, s0), c2 = L.at(r, m, 2, s0);
      T* dcoeffs = dmeans + 2 * M * S;  // coefficients lie 2 M rows after the means in each block
      coeff_grads(L.coeffs + c0, L.coeffs + c1, L.coeffs + c2, dmu1, dmu2, x0, x1, n, dcoeffs + c0,
                  dcoeffs + c1, dcoeffs + c2);
    }
  }
}

// One entry point per dtype and direction, cloned per ISA.
#define FASTVAE_DLM_TASKS(T, suffix)                                                                   \
  FASTVAE_CLONES double forward_task_##suffix(const Layout<T>& L, const T* x, const Bins<T>& bins,    \
                                              int64_t r, int64_t s0, int64_t n, Scratch<T>& w) {      \
    return forward_chunk(L, x, bins, r, s0, n, w);                                                     \
  }                                                                                                    \
  FASTVAE_CLONES void backward_task_##suffix(const Layout<T>& L, const T* x, const Bins<T>& bins,     \
                                             int64_t r, int64_t s0, int64_t n, T g, T* dlg, T* dmu,   \
                                             T* dls, Scratch<T>& w) {                                 \
    backward_chunk(L, x, bins, r, s0, n, g, dlg, dmu, dls, w);                                         \
  }                                                                                                    \
  double forward_task(const Layout<T>& L, const T* x, const Bins<T>& bins, int64_t r, int64_t s0,     \
                      int64_t n, Scratch<T>& w) {                                                     \
    return forward_task_##suffix(L, x, bins, r, s0, n, w);                                             \
  }                                                                                                    \
  void backward_task(const Layout<T>& L, const T* x, const Bins<T>& bins, int64_t r, int64_t s0,      \
                     int64_t n, T g, T* dlg, T* dmu, T* dls, Scratch<T>& w) {                         \
    backward_task_##suffix(L, x, bins, r, s0, n, g, dlg, dmu, dls, w);                                 \
  }

FASTVAE_DLM_TASKS(float, f32)
FASTVAE_DLM_TASKS(double, f64)
#undef FASTVAE_DLM_TASKS

}  // namespace

template <typename T>
void discretized_logistic_mixture_log_prob_forward(const T* x, const T* params, const T* means,
                                                   const T* log_scales, int64_t K, int64_t P, int64_t M,
                                                   int64_t C, int64_t S, int num_bins, T* out,
                                                   int n_threads) {
  const Layout<T> L(params, means, log_scales, M, C, S);
  const Bins<T> bins(num_bins);
  const int64_t images = K * P;
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  if (images == 0) return;
  if (chunks == 0) {  // no pixels: a sum over nothing
    std::fill(out, out + images, T(0));
    return;
  }
  std::vector<double> partial(chunks > 1 ? images * chunks : 0);
#pragma omp parallel num_threads(n_threads)
  {
    Scratch<T> w(M, std::min(S, kChunk));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < images * chunks; ++t) {
      const int64_t r = t / chunks, s0 = (t % chunks) * kChunk;
      const double v = forward_task(L, x + (r % P) * C * S, bins, r, s0, std::min(kChunk, S - s0), w);
      if (chunks == 1) {
        out[r] = T(v);
      } else {
        partial[t] = v;
      }
    }
  }
  if (chunks > 1) {
    for (int64_t r = 0; r < images; ++r) {
      double acc = 0.0;
      for (int64_t j = 0; j < chunks; ++j) acc += partial[r * chunks + j];
      out[r] = T(acc);
    }
  }
}

template <typename T>
void discretized_logistic_mixture_log_prob_backward(const T* g, const T* x, const T* params, const T* means,
                                                    const T* log_scales, int64_t K, int64_t P, int64_t M,
                                                    int64_t C, int64_t S, int num_bins, T* dparams, T* dmeans,
                                                    T* dlog_scales, int n_threads) {
  const Layout<T> L(params, means, log_scales, M, C, S);
  const Bins<T> bins(num_bins);
  const int64_t images = K * P;
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  // where each image's gradients go: dparams' rows mirror params' (packed), or three arrays
  T* dmu_base = L.packed ? dparams + M * S : dmeans;
  T* dls_base = L.packed ? dparams + 2 * M * S : dlog_scales;
#pragma omp parallel num_threads(n_threads)
  {
    Scratch<T> w(M, std::min(S, kChunk));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < images * chunks; ++t) {
      const int64_t r = t / chunks, s0 = (t % chunks) * kChunk;
      backward_task(L, x + (r % P) * C * S, bins, r, s0, std::min(kChunk, S - s0), g[r],
                    dparams + r * L.img_logits, dmu_base, dls_base, w);
    }
  }
}

#define FASTVAE_DLM_INSTANTIATE(T)                                                                     \
  template void discretized_logistic_mixture_log_prob_forward<T>(                                     \
      const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int, T*, int); \
  template void discretized_logistic_mixture_log_prob_backward<T>(                                    \
      const T*, const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int, \
      T*, T*, T*, int);
FASTVAE_DLM_INSTANTIATE(float)
FASTVAE_DLM_INSTANTIATE(double)
#undef FASTVAE_DLM_INSTANTIATE

}  // namespace fastvae
