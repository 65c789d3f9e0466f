// Importance weighting on the CPU: logmeanexp, effective_sample_size and the
// normalized weights over the K rows of (K, M) log-weights (see logmeanexp.h
// for the (max, sumexp) state of a column).
//
// The forward reads lw once. Columns are cut into blocks of up to kMaxCols
// contiguous floats (the vector dimension) and K into chunks that stay in L2:
// per chunk a max pass, one rescale of the running sum per column, and one exp
// per element. When there are too few column blocks to occupy the threads, K
// is also split, and the per-split states are merged at the end with the same
// associative rule the Python state functions use.
//
// The backward reads lw once and writes dlw once, in contiguous tiles.
//
// Both are bound by their one exp per element (lw of 10-16 MB sits in L3), so
// the float32 exp of an exponent known to be <= 0 (exp_shifted) is a cheaper
// variant of fast_exp. Every loop is written once, as an always-inline
// template; the float32 instance is wrapped in a FASTVAE_CLONES function
// (AVX-512 / AVX2 / baseline), the float64 one uses std::exp.
#include "logmeanexp.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastmath.h"  // fast_exp, fast_log_positive
#include "ops.h"       // FASTVAE_CLONES, FASTVAE_INLINE

namespace fastvae {
namespace {

// Columns per block of the reductions: wide, so that every row of a block is
// a long contiguous run (8 KB) the hardware prefetcher can follow; the
// per-column state arrays of a block live on the stack.
constexpr int64_t kMaxCols = 2048;
// 256 KB of float32 per chunk: it stays in L2 from the max pass to the exp pass.
constexpr int64_t kChunkElems = 65536;
// Bounds the rounding of a chunk's own sum (rows are summed in sequence) for narrow blocks.
constexpr int64_t kMaxChunkRows = 256;
constexpr int64_t kMinSplitRows = 1024;  // shorter K-splits cost more in merging than they gain
// tasks a reduction is cut into when its column blocks are fewer (K permitting):
// fixed, not per thread, so that the result does not depend on the thread count
// (4 tasks per thread of a 16-core machine)
constexpr int64_t kMinTasks = 64;
constexpr int64_t kTileElems = 16384;    // elements per elementwise work item (64 KB of float32)

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();


// exp(x) for x = a log-weight minus the max of its column: x <= 0, or -inf
// (-> 0), or NaN (-> NaN). That range lets it skip most of fast_exp's work
// (one scale factor 2^n, n in [-126, 0]; one select), which matters because
// the exp is what bounds these loops. Results below FLT_MIN flush to 0. Also
// +inf -> +inf and a finite positive value for finite x > 0: those occur only
// in a column holding +inf, whose sum is +inf whatever they are. The
// polynomial is a relative minimax fit of e^r on [-ln2/2, ln2/2]: under 1 ulp.
FASTVAE_INLINE float exp_shifted(float x) {
  constexpr float kLogMin = -87.33654f;  // log(FLT_MIN)
  float xc = x > kLogMin ? x : kLogMin;  // NaN and -inf -> kLogMin: n converts safely
  xc = xc < 0.0f ? xc : 0.0f;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);  // in [-126, 0]
  float r = x - n * 0.693359375f;  // x, not xc: NaN and +inf flow through
  r = r - n * -2.12194440e-4f;
  float q = 1.3814613e-3f;
  q = q * r + 8.3687100e-3f;
  q = q * r + 4.1668387e-2f;
  q = q * r + 1.6666521e-1f;
  q = q * r + 4.9999993e-1f;
  const float p = q * (r * r) + r + 1.0f;
  const float y = p * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < kLogMin ? 0.0f : y;  // also -inf, where the polynomial gave inf - inf
}
FASTVAE_INLINE double exp_shifted(double x) { return std::exp(x); }

// log of a sumexp, which is 0 (empty column), inf, NaN, or finite and >= 1
// (the max term contributes exp(0) = 1): inside fast_log_positive's domain.
FASTVAE_INLINE float log_sum(float s) {
  const float y = fast_log_positive(s);  // bit arithmetic only: safe on 0, inf and NaN
  return s == 0.0f ? -kInf<float> : ((s == kInf<float> || s != s) ? s : y);
}
FASTVAE_INLINE double log_sum(double s) { return std::log(s); }

// The exponent shift of a column: its max when finite, else 0, so that
// exp(lw - shift) is never exp(-inf - (-inf)) = NaN.
template <typename T>
FASTVAE_INLINE T shift_of(T m) {
  return (m == kInf<T> || m == -kInf<T>) ? T(0) : m;
}

// What a sum kept at shift_of(m_old) is multiplied by to be kept at
// shift_of(m_new). An empty state (m_old = -inf) has sum 0, or NaN if a NaN
// was seen, and the factor 0 keeps either.
template <typename T>
FASTVAE_INLINE T rescale(T m_old, T m_new) {
  const T f = exp_t(shift_of(m_old) - shift_of(m_new));
  return m_old == -kInf<T> ? T(0) : f;
}

// -- forward -------------------------------------------------------------------

// Asks for row r of the next chunk (w columns from `next`) to be brought into
// L2 while the exp pass of the current chunk computes: the exp pass reads from
// L2 and leaves the memory bus idle, the max pass of the next chunk then finds
// its data there. One prefetch per 64-byte line.
template <typename T>
FASTVAE_INLINE void prefetch_row(const T* next, int64_t w) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t j = 0; j < w; j += kLine) __builtin_prefetch(next + j, 0, 2);
}

// Folds a (rows, w) chunk with row stride M into the running state of its w
// columns, prefetching the next chunk (next_rows x next_w at `next`, or none).
// The chunk's own sum is formed first and then added (two-level summation:
// the rounding grows with rows + K / rows instead of K).
template <typename T>
FASTVAE_INLINE void fold_chunk(const T* __restrict x, int64_t M, int64_t rows,
                               int64_t w, const T* next, int64_t next_rows,
                               int64_t next_w, T* __restrict mx,
                               T* __restrict s, T* __restrict s2) {
  T cm[kMaxCols], sh[kMaxCols], cs[kMaxCols], cs2[kMaxCols];
  for (int64_t j = 0; j < w; ++j) cm[j] = mx[j];
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * M;
    for (int64_t j = 0; j < w; ++j) cm[j] = xr[j] > cm[j] ? xr[j] : cm[j];  // NaN never wins
  }
  for (int64_t j = 0; j < w; ++j) {
    const T f = rescale(mx[j], cm[j]);
    s[j] *= f;
    mx[j] = cm[j];
    sh[j] = shift_of(cm[j]);
    cs[j] = T(0);
    cs2[j] = T(0);
    if (s2 != nullptr) s2[j] *= f * f;
  }
  if (s2 == nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      if (r < next_rows) prefetch_row(next + r * M, next_w);
      const T* xr = x + r * M;
      for (int64_t j = 0; j < w; ++j) cs[j] += exp_shifted(xr[j] - sh[j]);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      if (r < next_rows) prefetch_row(next + r * M, next_w);
      const T* xr = x + r * M;
      for (int64_t j = 0; j < w; ++j) {
        const T e = exp_shifted(xr[j] - sh[j]);
        cs[j] += e;
        cs2[j] += e * e;
      }
    }
    for (int64_t j = 0; j < w; ++j) s2[j] += cs2[j];
  }
  for (int64_t j = 0; j < w; ++j) s[j] += cs[j];
}

// Merges one split's states (qm, qs, qs2) into split 0's (pm, ps, ps2) over n
// columns; qs2 and ps2 null together. Another split's row never overlaps
// split 0's, so the pointers are restrict parameters: GCC vectorizes across
// those, while with ordinary pointers this loop needs more run-time alias
// checks than it allows and stays scalar.
template <typename T>
FASTVAE_INLINE void merge_split(const T* __restrict qm, const T* __restrict qs, const T* __restrict qs2,
                                int64_t n, T* __restrict pm, T* __restrict ps, T* __restrict ps2) {
  for (int64_t j = 0; j < n; ++j) {
    const T m = qm[j] > pm[j] ? qm[j] : pm[j];
    const T fa = rescale(pm[j], m), fb = rescale(qm[j], m);
    ps[j] = ps[j] * fa + qs[j] * fb;
    if (qs2 != nullptr) ps2[j] = ps2[j] * (fa * fa) + qs2[j] * (fb * fb);
    pm[j] = m;
  }
}

// Columns [j0, j1): merges the states of splits 1.. into split 0 of the
// (n_splits, M) partial arrays, then writes max, sumexp and the requested outputs.
template <typename T>
FASTVAE_INLINE void finish_columns(T* pm, T* ps, T* ps2, int64_t n_splits,
                                   int64_t M, int64_t j0, int64_t j1, T log_k,
                                   T* mx, T* s, T* out, T* ess) {
  for (int64_t sp = 1; sp < n_splits; ++sp) {
    merge_split(pm + sp * M + j0, ps + sp * M + j0, ps2 == nullptr ? nullptr : ps2 + sp * M + j0, j1 - j0,
                pm + j0, ps + j0, ps2 == nullptr ? nullptr : ps2 + j0);
  }
  if (out != nullptr) {
    for (int64_t j = j0; j < j1; ++j) out[j] = shift_of(pm[j]) + log_sum(ps[j]) - log_k;
  }
  if (ess != nullptr) {
    for (int64_t j = j0; j < j1; ++j) ess[j] = ps[j] == T(0) ? T(0) : ps[j] * ps[j] / ps2[j];
  }
  if (pm != mx) {
    for (int64_t j = j0; j < j1; ++j) {
      mx[j] = pm[j];
      s[j] = ps[j];
    }
  }
}

FASTVAE_CLONES void fold_chunk_f32(const float* x, int64_t M, int64_t rows, int64_t w,
                                   const float* next, int64_t next_rows, int64_t next_w,
                                   float* mx, float* s, float* s2) {
  fold_chunk(x, M, rows, w, next, next_rows, next_w, mx, s, s2);
}

FASTVAE_CLONES void finish_columns_f32(float* pm, float* ps, float* ps2, int64_t n_splits,
                                       int64_t M, int64_t j0, int64_t j1, float log_k,
                                       float* mx, float* s, float* out, float* ess) {
  finish_columns(pm, ps, ps2, n_splits, M, j0, j1, log_k, mx, s, out, ess);
}

void fold_chunk_any(const float* x, int64_t M, int64_t rows, int64_t w, const float* next,
                    int64_t next_rows, int64_t next_w, float* mx, float* s, float* s2) {
  fold_chunk_f32(x, M, rows, w, next, next_rows, next_w, mx, s, s2);
}

void fold_chunk_any(const double* x, int64_t M, int64_t rows, int64_t w, const double* next,
                    int64_t next_rows, int64_t next_w, double* mx, double* s, double* s2) {
  fold_chunk(x, M, rows, w, next, next_rows, next_w, mx, s, s2);
}

void finish_columns_any(float* pm, float* ps, float* ps2, int64_t n_splits, int64_t M,
                        int64_t j0, int64_t j1, float log_k, float* mx, float* s, float* out,
                        float* ess) {
  finish_columns_f32(pm, ps, ps2, n_splits, M, j0, j1, log_k, mx, s, out, ess);
}

void finish_columns_any(double* pm, double* ps, double* ps2, int64_t n_splits, int64_t M,
                        int64_t j0, int64_t j1, double log_k, double* mx, double* s,
                        double* out, double* ess) {
  finish_columns(pm, ps, ps2, n_splits, M, j0, j1, log_k, mx, s, out, ess);
}

// How the (K, M) reduction is cut: column blocks of `cols`, and K split in
// n_splits ranges of split_rows when the column blocks alone are too few tasks.
struct Plan {
  int64_t cols, n_blocks, n_splits, split_rows;
};

// Task t of a plan: columns [j0, j0 + w) of the split's rows [k0, k1).
struct Task {
  int64_t j0, w, k0, k1;
};

Task task_at(const Plan& p, int64_t t, int64_t K, int64_t M) {
  const int64_t j0 = (t % p.n_blocks) * p.cols, k0 = (t / p.n_blocks) * p.split_rows;
  return {j0, std::min(p.cols, M - j0), k0, std::min(K, k0 + p.split_rows)};
}

// The plan depends on (K, M) only, never on the thread count, so the partial
// states, and the order they merge in, are the same for 1 thread or 64: a
// DataLoader worker (one thread) gets its parent's bits.
Plan plan_reduction(int64_t K, int64_t M) {
  Plan p{};
  p.cols = std::max<int64_t>(1, std::min(M, kMaxCols));
  p.n_blocks = (M + p.cols - 1) / p.cols;
  const int64_t want = kMinTasks;
  p.n_splits = 1;
  if (p.n_blocks < want) {
    const int64_t by_rows = std::max<int64_t>(1, K / kMinSplitRows);
    p.n_splits = std::min((want + p.n_blocks - 1) / p.n_blocks, by_rows);
  }
  p.split_rows = std::max<int64_t>(1, (K + p.n_splits - 1) / p.n_splits);
  p.n_splits = std::max<int64_t>(1, (K + p.split_rows - 1) / p.split_rows);  // no empty split
  return p;
}

// -- backward ------------------------------------------------------------------

// Per-column coefficients of dlw = e * (a + ab * e), see logmeanexp.h; ab is
// only written (and only used) for the ESS gradient.
template <typename T>
FASTVAE_INLINE void column_coefs(const T* mx, const T* s, const T* g,
                                 const T* g_s, const T* ess, int64_t w,
                                 T* __restrict sh, T* __restrict a,
                                 T* __restrict ab) {
  for (int64_t j = 0; j < w; ++j) {
    // Shift by the max itself unless it is -inf: with a +inf max (where 1 /
    // sumexp = 0), finite lw then give 0 and the +inf one NaN, as the gradient
    // of torch.logsumexp, and the exponent is never positive.
    sh[j] = mx[j] == -kInf<T> ? T(0) : mx[j];
    // 1 / sumexp, and 0 for an empty column (whose e are all 0): no 0 * inf
    const T inv = s[j] == T(0) ? T(0) : T(1) / s[j];
    if (ess != nullptr) {
      a[j] = T(2) * g[j] * ess[j] * inv;
      ab[j] = -a[j] * ess[j] * inv;
    } else {
      a[j] = g[j] * inv + (g_s != nullptr ? g_s[j] : T(0));
    }
  }
}

// dlw = e * a (ab == nullptr) or e * (a + ab * e), e = exp(lw - sh), over a
// (rows, w) tile with row stride M.
template <typename T>
FASTVAE_INLINE void scaled_exp_rows(const T* __restrict x, int64_t M,
                                    int64_t rows, int64_t w,
                                    const T* __restrict sh,
                                    const T* __restrict a,
                                    const T* __restrict ab, T* __restrict out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * M;
    T* o = out + r * M;
    if (ab == nullptr) {
      for (int64_t j = 0; j < w; ++j) o[j] = exp_shifted(xr[j] - sh[j]) * a[j];
    } else {
      for (int64_t j = 0; j < w; ++j) {
        const T e = exp_shifted(xr[j] - sh[j]);
        o[j] = e * (a[j] + ab[j] * e);
      }
    }
  }
}

FASTVAE_CLONES void column_coefs_f32(const float* mx, const float* s, const float* g,
                                     const float* g_s, const float* ess, int64_t w, float* sh,
                                     float* a, float* ab) {
  column_coefs(mx, s, g, g_s, ess, w, sh, a, ab);
}

FASTVAE_CLONES void scaled_exp_rows_f32(const float* x, int64_t M, int64_t rows, int64_t w,
                                        const float* sh, const float* a, const float* ab,
                                        float* out) {
  scaled_exp_rows(x, M, rows, w, sh, a, ab, out);
}

void column_coefs_any(const float* mx, const float* s, const float* g, const float* g_s,
                      const float* ess, int64_t w, float* sh, float* a, float* ab) {
  column_coefs_f32(mx, s, g, g_s, ess, w, sh, a, ab);
}

void column_coefs_any(const double* mx, const double* s, const double* g, const double* g_s,
                      const double* ess, int64_t w, double* sh, double* a, double* ab) {
  column_coefs(mx, s, g, g_s, ess, w, sh, a, ab);
}

void scaled_exp_rows_any(const float* x, int64_t M, int64_t rows, int64_t w, const float* sh,
                         const float* a, const float* ab, float* out) {
  scaled_exp_rows_f32(x, M, rows, w, sh, a, ab, out);
}

void scaled_exp_rows_any(const double* x, int64_t M, int64_t rows, int64_t w, const double* sh,
                         const double* a, const double* ab, double* out) {
  scaled_exp_rows(x, M, rows, w, sh, a, ab, out);
}

// Softmax backward of columns [j0, j0 + w) and rows [k0, k1): first the
// partial dot products sum_k gw * w (dot != nullptr), or, given the full dot
// products, the gradient.
template <typename T>
FASTVAE_INLINE void iw_dot(const T* __restrict gw, const T* __restrict w,
                           int64_t M, int64_t rows, int64_t cols,
                           T* __restrict dot) {
  const int64_t chunk =
      std::clamp<int64_t>(kChunkElems / std::max<int64_t>(cols, 1), 1, kMaxChunkRows);
  T cd[kMaxCols];
  for (int64_t j = 0; j < cols; ++j) dot[j] = T(0);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    for (int64_t j = 0; j < cols; ++j) cd[j] = T(0);
    for (int64_t r = r0; r < std::min(rows, r0 + chunk); ++r) {
      for (int64_t j = 0; j < cols; ++j) cd[j] += gw[r * M + j] * w[r * M + j];
    }
    for (int64_t j = 0; j < cols; ++j) dot[j] += cd[j];
  }
}

template <typename T>
FASTVAE_INLINE void iw_grad(const T* __restrict gw, const T* __restrict w,
                            int64_t M, int64_t rows, int64_t cols,
                            const T* __restrict dot, T* __restrict dlw) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) dlw[r * M + j] = w[r * M + j] * (gw[r * M + j] - dot[j]);
  }
}

FASTVAE_CLONES void iw_dot_f32(const float* gw, const float* w, int64_t M, int64_t rows,
                               int64_t cols, float* dot) {
  iw_dot(gw, w, M, rows, cols, dot);
}

FASTVAE_CLONES void iw_grad_f32(const float* gw, const float* w, int64_t M, int64_t rows,
                                int64_t cols, const float* dot, float* dlw) {
  iw_grad(gw, w, M, rows, cols, dot, dlw);
}

void iw_dot_any(const float* gw, const float* w, int64_t M, int64_t rows, int64_t cols,
                float* dot) {
  iw_dot_f32(gw, w, M, rows, cols, dot);
}
void iw_dot_any(const double* gw, const double* w, int64_t M, int64_t rows, int64_t cols,
                double* dot) {
  iw_dot(gw, w, M, rows, cols, dot);
}
void iw_grad_any(const float* gw, const float* w, int64_t M, int64_t rows, int64_t cols,
                 const float* dot, float* dlw) {
  iw_grad_f32(gw, w, M, rows, cols, dot, dlw);
}
void iw_grad_any(const double* gw, const double* w, int64_t M, int64_t rows, int64_t cols,
                 const double* dot, double* dlw) {
  iw_grad(gw, w, M, rows, cols, dot, dlw);
}

}  // namespace

namespace {

// The forward of logmeanexp_forward, which also writes s2_out (M,) =
// sum_k exp(2 (lw_k - shift)) when it is non-null.
template <typename T>
void forward_columns(const T* lw, int64_t K, int64_t M, T* mx, T* s, T* s2_out, T* out, T* ess,
                     int n_threads) {
  if (M == 0) return;
  const Plan p = plan_reduction(K, M);
  const int64_t chunk_rows = std::clamp<int64_t>(kChunkElems / p.cols, 1, kMaxChunkRows);
  const bool want_s2 = ess != nullptr || s2_out != nullptr;
  // Partial states: one (M,) row per split; with a single split and no
  // second moment the outputs themselves hold the running state.
  std::vector<T> part;
  T* pm = mx;
  T* ps = s;
  T* ps2 = nullptr;
  if (p.n_splits > 1 || want_s2) {
    const int64_t n = p.n_splits * M;
    part.resize((p.n_splits > 1 ? 2 * n : 0) + (want_s2 ? n : 0));
    T* next = part.data();
    if (p.n_splits > 1) {
      pm = next;
      ps = next + n;
      next += 2 * n;
    }
    if (want_s2) ps2 = next;
  }
  const T log_k = static_cast<T>(std::log(static_cast<double>(K)));
  const int64_t n_tasks = p.n_blocks * p.n_splits;
#pragma omp parallel num_threads(n_threads)
  {
    // Each thread folds a contiguous range of tasks, chunk after chunk, and
    // prefetches the chunk after the current one, also across its tasks.
    const int64_t n_team = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t t_end = n_tasks * (tid + 1) / n_team;
    for (int64_t t = n_tasks * tid / n_team; t < t_end; ++t) {
      const Task c = task_at(p, t, K, M);
      const int64_t sp = t / p.n_blocks;
      T* tm = pm + sp * M + c.j0;
      T* ts = ps + sp * M + c.j0;
      T* ts2 = ps2 == nullptr ? nullptr : ps2 + sp * M + c.j0;
      for (int64_t j = 0; j < c.w; ++j) {
        tm[j] = -kInf<T>;
        ts[j] = T(0);
        if (ts2 != nullptr) ts2[j] = T(0);
      }
      for (int64_t k = c.k0; k < c.k1; k += chunk_rows) {
        // the next chunk: of this task, else the first of the next task; no
        // pointer past the end of lw is formed, not even one not dereferenced
        const T* next = nullptr;
        int64_t next_rows = 0, next_w = 0;
        if (k + chunk_rows < c.k1) {
          next = lw + (k + chunk_rows) * M + c.j0;
          next_rows = std::min(chunk_rows, c.k1 - k - chunk_rows);
          next_w = c.w;
        } else if (t + 1 < t_end) {
          const Task n = task_at(p, t + 1, K, M);
          next = lw + n.k0 * M + n.j0;
          next_rows = std::min(chunk_rows, n.k1 - n.k0);
          next_w = n.w;
        }
        fold_chunk_any(lw + k * M + c.j0, M, std::min(chunk_rows, c.k1 - k), c.w, next,
                       next_rows, next_w, tm, ts, ts2);
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < p.n_blocks; ++blk) {
      const int64_t j0 = blk * p.cols, j1 = std::min(M, j0 + p.cols);
      finish_columns_any(pm, ps, ps2, p.n_splits, M, j0, j1, log_k, mx, s, out, ess);
    }
  }
  if (s2_out != nullptr) std::copy(ps2, ps2 + M, s2_out);  // split 0 holds the merged sums
}

// (m, s) <- the merge of (m, s) with (cm, cs), as merge_logmeanexp_states.
template <typename T>
void merge_into(T* m, T* s, const T* cm, const T* cs, int64_t M, T scale) {
  for (int64_t j = 0; j < M; ++j) {
    const T c = scale * cm[j];  // the max of 2 x is 2 max_x (never NaN)
    const T nm = c > m[j] ? c : m[j];
    s[j] = s[j] * rescale(m[j], nm) + cs[j] * rescale(c, nm);
    m[j] = nm;
  }
}

}  // namespace

template <typename T>
void logmeanexp_forward(const T* lw, int64_t K, int64_t M, T* mx, T* s, T* out, T* ess,
                        int n_threads) {
  forward_columns(lw, K, M, mx, s, static_cast<T*>(nullptr), out, ess, n_threads);
}

template <typename T>
void logmeanexp_accumulate(const T* lw, const T* latent, int64_t K, int64_t M, T* mx, T* s,
                           T* sq_mx, T* sq_s, bool first, int n_threads) {
  if (M == 0) return;
  std::vector<T> sum;  // lw + latent, read once by the reduction
  const T* x = lw;
  if (latent != nullptr) {
    sum.resize(static_cast<size_t>(K * M));
    T* d = sum.data();
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t i = 0; i < K * M; ++i) d[i] = lw[i] + latent[i];
    x = d;
  }
  std::vector<T> chunk(3 * static_cast<size_t>(M));
  T* cm = chunk.data();
  T* cs = cm + M;
  T* cs2 = cs + M;
  forward_columns(x, K, M, cm, cs, cs2, static_cast<T*>(nullptr), static_cast<T*>(nullptr), n_threads);
  if (first) {
    for (int64_t j = 0; j < M; ++j) {
      mx[j] = cm[j];
      s[j] = cs[j];
      sq_mx[j] = T(2) * cm[j];
      sq_s[j] = cs2[j];
    }
    return;
  }
  merge_into(mx, s, cm, cs, M, T(1));
  merge_into(sq_mx, sq_s, cm, cs2, M, T(2));
}

template <typename T>
void logmeanexp_backward(const T* lw, const T* mx, const T* s, const T* g, const T* g_s,
                         const T* ess, int64_t K, int64_t M, T* dlw, int n_threads) {
  if (M == 0 || K == 0) return;
  // The per-column coefficients once for all rows, then one streaming pass
  // over contiguous tiles of whole rows (or long row pieces when M is large):
  // each thread reads and writes one contiguous half of lw and dlw.
  std::vector<T> coefs((ess != nullptr ? 3 : 2) * M);
  T* sh = coefs.data();
  T* a = sh + M;
  T* ab = ess != nullptr ? a + M : nullptr;
  const int64_t cols = std::min(M, kTileElems);
  const int64_t rows = std::max<int64_t>(1, kTileElems / cols);
  const int64_t n_cb = (M + cols - 1) / cols, n_rb = (K + rows - 1) / rows;
#pragma omp parallel num_threads(n_threads)
  {
#pragma omp for schedule(static)
    for (int64_t cb = 0; cb < n_cb; ++cb) {
      const int64_t j0 = cb * cols;
      column_coefs_any(mx + j0, s + j0, g + j0, g_s == nullptr ? nullptr : g_s + j0,
                       ess == nullptr ? nullptr : ess + j0, std::min(cols, M - j0), sh + j0,
                       a + j0, ab == nullptr ? nullptr : ab + j0);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_rb * n_cb; ++t) {
      const int64_t k0 = (t / n_cb) * rows, j0 = (t % n_cb) * cols;
      scaled_exp_rows_any(lw + k0 * M + j0, M, std::min(rows, K - k0), std::min(cols, M - j0),
                          sh + j0, a + j0, ab == nullptr ? nullptr : ab + j0,
                          dlw + k0 * M + j0);
    }
  }
}

template <typename T>
void importance_weights_backward(const T* gw, const T* w, int64_t K, int64_t M, T* dlw,
                                 int n_threads) {
  if (M == 0 || K == 0) return;
  const Plan p = plan_reduction(K, M);
  // dots[sp * M + j]: the split's partial sum_k gw * w of column j
  std::vector<T> dots(p.n_splits * M);
  const int64_t n_tasks = p.n_blocks * p.n_splits;
#pragma omp parallel num_threads(n_threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tasks; ++t) {
      const Task a = task_at(p, t, K, M);
      iw_dot_any(gw + a.k0 * M + a.j0, w + a.k0 * M + a.j0, M, a.k1 - a.k0, a.w,
                 dots.data() + (t / p.n_blocks) * M + a.j0);
    }
#pragma omp for schedule(static)
    for (int64_t j = 0; j < M; ++j) {
      for (int64_t sp = 1; sp < p.n_splits; ++sp) dots[j] += dots[sp * M + j];
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tasks; ++t) {
      const Task a = task_at(p, t, K, M);
      iw_grad_any(gw + a.k0 * M + a.j0, w + a.k0 * M + a.j0, M, a.k1 - a.k0, a.w,
                  dots.data() + a.j0, dlw + a.k0 * M + a.j0);
    }
  }
}

template void logmeanexp_forward<float>(const float*, int64_t, int64_t, float*, float*, float*,
                                        float*, int);
template void logmeanexp_forward<double>(const double*, int64_t, int64_t, double*, double*,
                                         double*, double*, int);
template void logmeanexp_accumulate<float>(const float*, const float*, int64_t, int64_t, float*,
                                           float*, float*, float*, bool, int);
template void logmeanexp_accumulate<double>(const double*, const double*, int64_t, int64_t,
                                            double*, double*, double*, double*, bool, int);
template void logmeanexp_backward<float>(const float*, const float*, const float*, const float*,
                                         const float*, const float*, int64_t, int64_t, float*,
                                         int);
template void logmeanexp_backward<double>(const double*, const double*, const double*,
                                          const double*, const double*, const double*, int64_t,
                                          int64_t, double*, int);
template void importance_weights_backward<float>(const float*, const float*, int64_t, int64_t,
                                                 float*, int);
template void importance_weights_backward<double>(const double*, const double*, int64_t,
                                                  int64_t, double*, int);

}  // namespace fastvae
