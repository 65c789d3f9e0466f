// The thread drivers of the location-scale likelihoods (gaussian_log_prob,
// laplace_log_prob): x (P, D) against a decoder output (K, P, D) and a scale
// parameter per element, per x row or per dimension. The work is cut into
// tasks of rows_per_task x rows, each over every sample; each thread keeps one
// row of a per-row parameter's 1/scale (inv_row) and, where a gradient is
// summed over the samples, one row of its sums (a_row). The op's own task does
// the math.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <omp.h>

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

}  // namespace fastvae
