// sample_normal_kl on the CPU: one latent group, z = mu_q + sigma_q * eps with
// eps from the Philox stream at the element's flat index, and KL(q || p) per
// element or summed per row, in one pass; the backward regenerates eps.
//
// Each element works in delta = log sigma_q - log sigma_p, d = mu_q - mu_p and
// b = log sigma_p: KL = 0.5 (e^(2 delta) + (d e^(-b))^2 - 1) - delta, the same
// for q given directly and for NVAE's residual form (the op's __init__.py).
// Work is split into tiles (of whole rows when the KL is summed per row), and
// each tile runs in fixed-size blocks through FASTVAE_CLONES functions.
#include <algorithm>
#include <cmath>

#include "fastmath.h"
#include "ops.h"
#include "rows.h"
#include "sample_normal_kl.h"

namespace fastvae {
namespace {

constexpr int64_t kBlock = 512;       // elements per vector block (stack buffers)
constexpr int64_t kTileElems = 8192;  // elements per parallel work item

// z and the KL terms t of n elements.
template <typename T, bool Residual>
FASTVAE_INLINE void forward_block(const T* __restrict m, const T* __restrict ls, const T* __restrict pm,
                                  const T* __restrict pls, const T* __restrict eps, T c, int64_t n,
                                  T* __restrict z, T* __restrict t) {
  for (int64_t i = 0; i < n; ++i) {
    const T b = c * pls[i];
    const T delta = Residual ? c * ls[i] : c * ls[i] - b;
    const T a = Residual ? b + delta : c * ls[i];
    const T d = Residual ? m[i] : m[i] - pm[i];
    const T u = d * exp_t(-b);
    t[i] = T(0.5) * (exp_t(T(2) * delta) + u * u - T(1)) - delta;
    z[i] = (Residual ? pm[i] + m[i] : m[i]) + exp_t(a) * eps[i];
  }
}

// The four gradients of n elements from gz (the upstream gradient of z, 0
// where none), g (of the KL term) and eps.
template <typename T, bool Residual>
FASTVAE_INLINE void backward_block(const T* __restrict gz, const T* __restrict g, const T* __restrict eps,
                                   const T* __restrict m, const T* __restrict ls, const T* __restrict pm,
                                   const T* __restrict pls, T c, int64_t n, T* __restrict dm,
                                   T* __restrict dls, T* __restrict dpm, T* __restrict dpls) {
  for (int64_t i = 0; i < n; ++i) {
    const T b = c * pls[i];
    const T delta = Residual ? c * ls[i] : c * ls[i] - b;
    const T a = Residual ? b + delta : c * ls[i];
    const T d = Residual ? m[i] : m[i] - pm[i];
    const T ib = exp_t(-b);
    const T u = d * ib;
    const T zs = gz[i] * exp_t(a) * eps[i];
    const T gd = g[i] * u * ib;
    const T gdelta = g[i] * (exp_t(T(2) * delta) - T(1));
    const T gb = -g[i] * u * u;
    dm[i] = gz[i] + gd;
    dls[i] = c * (zs + gdelta);
    dpm[i] = Residual ? gz[i] : -gd;
    dpls[i] = Residual ? c * (zs + gb) : c * (gb - gdelta);
  }
}

template <typename T>
FASTVAE_INLINE void forward_block_t(const T* m, const T* ls, const T* pm, const T* pls, const T* eps, T c,
                                    bool residual, int64_t n, T* z, T* t) {
  if (residual) forward_block<T, true>(m, ls, pm, pls, eps, c, n, z, t);
  else forward_block<T, false>(m, ls, pm, pls, eps, c, n, z, t);
}

template <typename T>
FASTVAE_INLINE void backward_block_t(const T* gz, const T* g, const T* eps, const T* m, const T* ls,
                                     const T* pm, const T* pls, T c, bool residual, int64_t n, T* dm, T* dls,
                                     T* dpm, T* dpls) {
  if (residual) backward_block<T, true>(gz, g, eps, m, ls, pm, pls, c, n, dm, dls, dpm, dpls);
  else backward_block<T, false>(gz, g, eps, m, ls, pm, pls, c, n, dm, dls, dpm, dpls);
}

// float runs in the ISA clones; double is the precise (libm) path.
FASTVAE_CLONES void forward_f32(const float* m, const float* ls, const float* pm, const float* pls,
                                const float* eps, float c, bool residual, int64_t n, float* z, float* t) {
  forward_block_t(m, ls, pm, pls, eps, c, residual, n, z, t);
}

FASTVAE_CLONES void backward_f32(const float* gz, const float* g, const float* eps, const float* m,
                                 const float* ls, const float* pm, const float* pls, float c, bool residual,
                                 int64_t n, float* dm, float* dls, float* dpm, float* dpls) {
  backward_block_t(gz, g, eps, m, ls, pm, pls, c, residual, n, dm, dls, dpm, dpls);
}

void forward_any(const float* m, const float* ls, const float* pm, const float* pls, const float* eps, float c,
                 bool residual, int64_t n, float* z, float* t) {
  forward_f32(m, ls, pm, pls, eps, c, residual, n, z, t);
}

void forward_any(const double* m, const double* ls, const double* pm, const double* pls, const double* eps,
                 double c, bool residual, int64_t n, double* z, double* t) {
  forward_block_t(m, ls, pm, pls, eps, c, residual, n, z, t);
}

void backward_any(const float* gz, const float* g, const float* eps, const float* m, const float* ls,
                  const float* pm, const float* pls, float c, bool residual, int64_t n, float* dm, float* dls,
                  float* dpm, float* dpls) {
  backward_f32(gz, g, eps, m, ls, pm, pls, c, residual, n, dm, dls, dpm, dpls);
}

void backward_any(const double* gz, const double* g, const double* eps, const double* m, const double* ls,
                  const double* pm, const double* pls, double c, bool residual, int64_t n, double* dm,
                  double* dls, double* dpm, double* dpls) {
  backward_block_t(gz, g, eps, m, ls, pm, pls, c, residual, n, dm, dls, dpm, dpls);
}

// The tiles: whole rows when a per-row sum is involved (a row's sum is then
// made by one task, in one order, whatever the thread count), else flat runs.
struct Tiles {
  int64_t count, elems;  // tiles of `elems` elements each (the last may be short)
  Tiles(int64_t N, int64_t L, bool rows) {
    const int64_t total = N * L;
    elems = rows ? std::max<int64_t>(1, kTileElems / std::max<int64_t>(L, 1)) * L : kTileElems;
    count = elems == 0 ? 0 : (total + elems - 1) / elems;
  }
};

}  // namespace

template <typename T>
void sample_normal_kl_forward(const T* mu, const T* log_scale, const T* prior_mu, const T* prior_log_scale,
                              uint64_t seed, bool logvar, bool residual, int64_t N, int64_t L, T* z, T* kl,
                              bool kl_rows, int n_threads) {
  const int64_t total = N * L;
  if (kl_rows && L == 0) std::fill(kl, kl + N, T(0));
  const Tiles tiles(N, L, kl_rows);
  const T c = logvar ? T(0.5) : T(1);
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t tile = 0; tile < tiles.count; ++tile) {
    const int64_t e0 = tile * tiles.elems, e1 = std::min(total, e0 + tiles.elems);
    T eps[kBlock], t[kBlock];
    RowSums sums(kl_rows ? e0 / L : 0, std::max<int64_t>(L, 1));
    for (int64_t b0 = e0; b0 < e1; b0 += kBlock) {
      const int64_t n = std::min(kBlock, e1 - b0);
      randn_block(seed, static_cast<uint64_t>(b0), n, eps);
      T* terms = kl_rows ? t : kl + b0;
      forward_any(mu + b0, log_scale + b0, prior_mu + b0, prior_log_scale + b0, eps, c, residual, n, z + b0,
                  terms);
      if (kl_rows) sums.feed(t, n, [&](int64_t row, double acc) { kl[row] = static_cast<T>(acc); });
    }
  }
}

template <typename T>
void sample_normal_kl_backward(const T* dz, const T* dkl, bool dkl_rows, const T* mu, const T* log_scale,
                               const T* prior_mu, const T* prior_log_scale, uint64_t seed, bool logvar,
                               bool residual, int64_t N, int64_t L, T* dmu, T* dlog_scale, T* dprior_mu,
                               T* dprior_log_scale, int n_threads) {
  const int64_t total = N * L;
  const Tiles tiles(N, L, false);
  const T c = logvar ? T(0.5) : T(1);
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t tile = 0; tile < tiles.count; ++tile) {
    const int64_t e0 = tile * tiles.elems, e1 = std::min(total, e0 + tiles.elems);
    T eps[kBlock], gz[kBlock], g[kBlock];
    for (int64_t b0 = e0; b0 < e1; b0 += kBlock) {
      const int64_t n = std::min(kBlock, e1 - b0);
      // no gradient: zeros, so that one loop serves every case
      if (dz != nullptr) {
        randn_block(seed, static_cast<uint64_t>(b0), n, eps);
        std::copy(dz + b0, dz + b0 + n, gz);
      } else {
        std::fill(eps, eps + n, T(0));
        std::fill(gz, gz + n, T(0));
      }
      if (dkl == nullptr) std::fill(g, g + n, T(0));
      else if (dkl_rows) spread_rows(dkl, b0, n, L, g);
      else std::copy(dkl + b0, dkl + b0 + n, g);
      backward_any(gz, g, eps, mu + b0, log_scale + b0, prior_mu + b0, prior_log_scale + b0, c, residual, n,
                   dmu + b0, dlog_scale + b0, dprior_mu + b0, dprior_log_scale + b0);
    }
  }
}

template void sample_normal_kl_forward<float>(const float*, const float*, const float*, const float*, uint64_t,
                                              bool, bool, int64_t, int64_t, float*, float*, bool, int);
template void sample_normal_kl_forward<double>(const double*, const double*, const double*, const double*,
                                               uint64_t, bool, bool, int64_t, int64_t, double*, double*, bool,
                                               int);
template void sample_normal_kl_backward<float>(const float*, const float*, bool, const float*, const float*,
                                               const float*, const float*, uint64_t, bool, bool, int64_t,
                                               int64_t, float*, float*, float*, float*, int);
template void sample_normal_kl_backward<double>(const double*, const double*, bool, const double*,
                                                const double*, const double*, const double*, uint64_t, bool,
                                                bool, int64_t, int64_t, double*, double*, double*, double*,
                                                int);

}  // namespace fastvae
