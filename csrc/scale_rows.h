// The thread drivers of the location-scale likelihoods (gaussian_log_prob,
// laplace_log_prob): x (P, D) against a decoder output (K, P, D) and a scale
// parameter per element, per x row or per dimension. The work is cut into
// tasks of rows_per_task x rows, each over every sample; each thread keeps one
// row of a per-row parameter's 1/scale (inv_row) and, where a gradient is
// summed over the samples, one row of its sums (a_row). A task's loops over
// its rows and samples are here too (scale_forward_rows, scale_backward_rows);
// the op's own functions in them do the math.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "ops.h"   // FASTVAE_INLINE
#include "rows.h"  // slab_count, slab_begin

namespace fastvae {

// Runs task(p0, p1, inv_row) over the tasks of P x rows.
template <typename T, typename Task>
void scale_forward_tasks(int64_t P, int64_t D, int64_t rows_per_task, bool per_row, int n_threads,
                         const Task& task) {
  const int64_t tasks = (P + rows_per_task - 1) / rows_per_task;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> inv_row(per_row ? D : 0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t p0 = t * rows_per_task;
      task(p0, std::min(P, p0 + rows_per_task), inv_row.data());
    }
  }
}

// Runs task(p0, p1, inv_row, a_row, dim_a, dim_g) over the tasks of P x rows,
// then, where dim_sums (a per-dimension parameter's gradient, summed over
// every row), finish(A, G) with A (D,) the sum of the tasks' dim_a rows and G
// that of their dim_g. Each slab of tasks (rows.h) keeps its own partial sums,
// added in slab order afterwards, so the bits do not depend on the thread count.
template <typename T, typename Task, typename Finish>
void scale_backward_tasks(int64_t P, int64_t D, int64_t rows_per_task, bool per_row, bool per_element,
                          bool dim_sums, int n_threads, const Task& task, const Finish& finish) {
  const int64_t tasks = (P + rows_per_task - 1) / rows_per_task;
  const int64_t slabs = slab_count(tasks);
  std::vector<double> dim_a(dim_sums ? size_t(slabs) * D : 0, 0.0);
  std::vector<double> dim_g(size_t(slabs), 0.0);
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> inv_row(per_row ? D : 0);
    std::vector<T> a_row(per_element ? 0 : D);
#pragma omp for schedule(static)
    for (int64_t sl = 0; sl < slabs; ++sl) {
      double* my_a = dim_sums ? dim_a.data() + size_t(sl) * D : nullptr;
      for (int64_t t = slab_begin(tasks, slabs, sl); t < slab_begin(tasks, slabs, sl + 1); ++t) {
        const int64_t p0 = t * rows_per_task;
        task(p0, std::min(P, p0 + rows_per_task), inv_row.data(), a_row.data(), my_a, dim_g[size_t(sl)]);
      }
    }
  }
  if (dim_sums) {
    std::vector<double> a(D, 0.0);
    double G = 0.0;
    for (int64_t sl = 0; sl < slabs; ++sl) {
      for (int64_t d = 0; d < D; ++d) a[d] += dim_a[size_t(sl) * D + d];
      G += dim_g[size_t(sl)];
    }
    finish(a.data(), G);
  }
}

// The row loops of one task of x rows [p0, p1), each against its K samples
// (decoder rows r = k P + p): where the scale is shared by a row's samples
// (per row or per dimension) its 1/scale is inv_row, which row_inv(p,
// inv_row) fills for a per-row scale and returns its log-scale term for, or
// else dim_inv with the term dim_term. The op's math is sample(). Inlined,
// lambdas and all, into each ISA clone of the op's entry points.

// Forward: sample(r, x's row, 1/scale, log-scale term) writes output row r.
template <typename T, typename RowInv, typename Sample>
FASTVAE_INLINE void scale_forward_rows(const T* x, int64_t K, int64_t P, int64_t D, int64_t p0, int64_t p1,
                                       bool per_row, const T* dim_inv, double dim_term, T* inv_row,
                                       const RowInv& row_inv, const Sample& sample) {
  for (int64_t p = p0; p < p1; ++p) {
    const double term = per_row ? row_inv(p, inv_row) : dim_term;
    const T* inv = per_row ? inv_row : dim_inv;
    for (int64_t k = 0; k < K; ++k) sample(k * P + p, x + p * D, inv, term);
  }
}

// Backward: dx's row (where dx) and a_acc (where given: a shared scale's
// gradient summed over the samples) start at 0, sample(r, x's row, 1/scale,
// dx's row) adds its terms to them and returns row r's gradient g, and the
// row ends with the sums: row_done(p, 1/scale, sum of g) for a per-row scale,
// else (a per-dimension one, summed over every row) a_acc and the sum of g
// added to dim_a and dim_g.
template <typename T, typename RowInv, typename Sample, typename RowDone>
FASTVAE_INLINE void scale_backward_rows(const T* x, T* dx, int64_t K, int64_t P, int64_t D, int64_t p0,
                                        int64_t p1, bool per_row, const T* dim_inv, T* inv_row, T* a_acc,
                                        double* dim_a, double& dim_g, const RowInv& row_inv,
                                        const Sample& sample, const RowDone& row_done) {
  for (int64_t p = p0; p < p1; ++p) {
    T* dxp = dx ? dx + p * D : nullptr;
    if (dxp) std::fill(dxp, dxp + D, T(0));
    if (per_row) row_inv(p, inv_row);
    const T* inv = per_row ? inv_row : dim_inv;
    if (a_acc) std::fill(a_acc, a_acc + D, T(0));
    double g_sum = 0.0;
    for (int64_t k = 0; k < K; ++k) g_sum += double(sample(k * P + p, x + p * D, inv, dxp));
    if (a_acc && per_row) {
      row_done(p, inv, g_sum);
    } else if (a_acc) {
      for (int64_t d = 0; d < D; ++d) dim_a[d] += double(a_acc[d]);
      dim_g += g_sum;
    }
  }
}

}  // namespace fastvae
