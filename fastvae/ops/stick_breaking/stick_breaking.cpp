// stick_breaking on the CPU: z = stick_breaking(y) on the simplex of M + 1
// components, in log space (fastvae/ops/stick_breaking/__init__.py gives the
// formulas), and its gradient.
#include <algorithm>
#include <cmath>
#include <vector>

#include "fastmath.h"
#include "ops.h"
#include "stick_breaking.h"

namespace fastvae {
namespace {

constexpr int64_t kRowsPerTask = 256;
constexpr int64_t kBlock = 512;  // elements of y per chunk of rows (the buffers')

// The elementwise parts (softplus, sigmoid, exp) run over a chunk of whole
// rows as one flat loop, which vectorizes however short a row is (M = 8 or 32
// in a latent space); only the scans run row by row. Each chunk reads the
// offsets log(M - j) from a tile of them repeated once per row of the chunk.
struct Chunks {
  int64_t rows;        // rows per chunk
  std::vector<double> log_w;  // log(M - j), tiled `rows` times

  explicit Chunks(int64_t M) : rows(std::max<int64_t>(1, kBlock / M)), log_w(rows * M) {
    for (int64_t j = 0; j < M; ++j) log_w[j] = std::log(static_cast<double>(M - j));
    for (int64_t r = 1; r < rows; ++r) std::copy_n(log_w.begin(), M, log_w.begin() + r * M);
  }
};

// x = y - log w and softplus(x) for n elements.
template <typename T>
FASTVAE_INLINE void x_softplus(const T* __restrict y, const T* __restrict log_w, int64_t n, T* __restrict x,
                               T* __restrict sp) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] = y[i] - log_w[i];
    sp[i] = softplus_t(x[i]);
  }
}

template <typename T>
FASTVAE_INLINE void exp_in_place(T* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = exp_t(v[i]);
}

template <typename T>
FASTVAE_INLINE void products(const T* __restrict a, const T* __restrict b, int64_t n, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

template <typename T>
FASTVAE_INLINE void sigmoids(const T* __restrict y, const T* __restrict log_w, int64_t n, T* __restrict s) {
  for (int64_t i = 0; i < n; ++i) s[i] = sigmoid_t(y[i] - log_w[i]);
}

// Rows [r0, r1). The running sums accumulate in double: for float32 they
// cost nothing beside the row's softplus, and S_j is a sum of M terms.
template <typename T>
FASTVAE_INLINE void forward_rows_t(const T* y, int64_t r0, int64_t r1, int64_t M, const T* log_w, int64_t chunk,
                                   T* x, T* sp, T* z) {
  for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
    const int64_t rows = std::min(chunk, r1 - c0);
    x_softplus(y + c0 * M, log_w, rows * M, x, sp);
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * M;
      const T* spr = sp + r * M;
      T* zr = z + (c0 + r) * (M + 1);
      double S = 0.0;
      for (int64_t j = 0; j < M; ++j) {
        S += static_cast<double>(spr[j]);
        zr[j] = static_cast<T>(static_cast<double>(xr[j]) - S);  // log z_j
      }
      zr[M] = static_cast<T>(-S);
    }
    exp_in_place(z + c0 * (M + 1), rows * (M + 1));
  }
}

template <typename T>
FASTVAE_INLINE void backward_rows_t(const T* grad_z, const T* y, const T* z, int64_t r0, int64_t r1, int64_t M,
                                    const T* log_w, int64_t chunk, T* g, T* s, T* dy) {
  for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
    const int64_t rows = std::min(chunk, r1 - c0);
    products(grad_z + c0 * (M + 1), z + c0 * (M + 1), rows * (M + 1), g);
    sigmoids(y + c0 * M, log_w, rows * M, s);
    for (int64_t r = 0; r < rows; ++r) {
      const T* gr = g + r * (M + 1);
      const T* sr = s + r * M;
      T* dyr = dy + (c0 + r) * M;
      double R = static_cast<double>(gr[M]);  // sum_{i >= j} g_i, from the end
      for (int64_t j = M - 1; j >= 0; --j) {
        R += static_cast<double>(gr[j]);
        dyr[j] = static_cast<T>(static_cast<double>(gr[j]) - static_cast<double>(sr[j]) * R);
      }
    }
  }
}

// float runs in the ISA clones; double is the precise (libm) path.
FASTVAE_CLONES void forward_rows_f32(const float* y, int64_t r0, int64_t r1, int64_t M, const float* log_w,
                                     int64_t chunk, float* x, float* sp, float* z) {
  forward_rows_t(y, r0, r1, M, log_w, chunk, x, sp, z);
}

FASTVAE_CLONES void backward_rows_f32(const float* grad_z, const float* y, const float* z, int64_t r0, int64_t r1,
                                      int64_t M, const float* log_w, int64_t chunk, float* g, float* s, float* dy) {
  backward_rows_t(grad_z, y, z, r0, r1, M, log_w, chunk, g, s, dy);
}

void forward_rows(const float* y, int64_t r0, int64_t r1, int64_t M, const float* log_w, int64_t chunk, float* x,
                  float* sp, float* z) {
  forward_rows_f32(y, r0, r1, M, log_w, chunk, x, sp, z);
}

void forward_rows(const double* y, int64_t r0, int64_t r1, int64_t M, const double* log_w, int64_t chunk,
                  double* x, double* sp, double* z) {
  forward_rows_t(y, r0, r1, M, log_w, chunk, x, sp, z);
}

void backward_rows(const float* grad_z, const float* y, const float* z, int64_t r0, int64_t r1, int64_t M,
                   const float* log_w, int64_t chunk, float* g, float* s, float* dy) {
  backward_rows_f32(grad_z, y, z, r0, r1, M, log_w, chunk, g, s, dy);
}

void backward_rows(const double* grad_z, const double* y, const double* z, int64_t r0, int64_t r1, int64_t M,
                   const double* log_w, int64_t chunk, double* g, double* s, double* dy) {
  backward_rows_t(grad_z, y, z, r0, r1, M, log_w, chunk, g, s, dy);
}

// The offsets in T: log(M - j) rounded once from double.
template <typename T>
std::vector<T> offsets(const Chunks& c) {
  return std::vector<T>(c.log_w.begin(), c.log_w.end());
}

}  // namespace

template <typename T>
void stick_breaking_forward(const T* y, int64_t N, int64_t M, T* z, int n_threads) {
  if (N == 0) return;
  const Chunks c(M);
  const std::vector<T> log_w = offsets<T>(c);
  const int64_t n_tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> x(c.rows * M), sp(c.rows * M);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tasks; ++t) {
      const int64_t r0 = t * kRowsPerTask;
      forward_rows(y, r0, std::min(N, r0 + kRowsPerTask), M, log_w.data(), c.rows, x.data(), sp.data(), z);
    }
  }
}

template <typename T>
void stick_breaking_backward(const T* grad_z, const T* y, const T* z, int64_t N, int64_t M, T* dy,
                             int n_threads) {
  if (N == 0) return;
  const Chunks c(M);
  const std::vector<T> log_w = offsets<T>(c);
  const int64_t n_tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> g(c.rows * (M + 1)), s(c.rows * M);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tasks; ++t) {
      const int64_t r0 = t * kRowsPerTask;
      backward_rows(grad_z, y, z, r0, std::min(N, r0 + kRowsPerTask), M, log_w.data(), c.rows, g.data(), s.data(),
                    dy);
    }
  }
}

template void stick_breaking_forward<float>(const float*, int64_t, int64_t, float*, int);
template void stick_breaking_forward<double>(const double*, int64_t, int64_t, double*, int);
template void stick_breaking_backward<float>(const float*, const float*, const float*, int64_t, int64_t, float*,
                                             int);
template void stick_breaking_backward<double>(const double*, const double*, const double*, int64_t, int64_t,
                                              double*, int);

}  // namespace fastvae
