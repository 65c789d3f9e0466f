// Raw-pointer kernels of the importance-weighting ops (logmeanexp,
// effective_sample_size, importance_weights; logmeanexp.cpp), for their
// binding (bind.cpp) and eager operator (torch_op.cpp). Callers have checked
// dtype, contiguity and every extent.
//
// Layout: lw is (K, M) row-major, K samples of M independent columns; the
// reduction runs over K, down a column: lw[k * M + j].
//
// The state of a column is (max, sumexp): max is the largest non-NaN
// log-weight (-inf when there is none) and sumexp = sum_k exp(lw_k - shift),
// where shift = max when it is finite and 0 otherwise, so that an all -inf
// column gives sumexp = 0 (never exp(-inf - (-inf)) = NaN). A NaN log-weight
// makes sumexp NaN, which every derived output then propagates.
#pragma once

#include <cstdint>

namespace fastvae {

// max, sumexp: (M,). out (M,) = logmeanexp, written when non-null; ess (M,) =
// sumexp^2 / sum_k exp(2 (lw_k - shift)) (0 for an all -inf column), written when non-null.
template <typename T>
void logmeanexp_forward(const T* lw, int64_t K, int64_t M, T* max, T* sumexp, T* out, T* ess,
                        int n_threads);

// The evaluation's chunk (fastvae/evaluation.py): x = lw + latent (K, M), or lw
// when latent is null. (max, sumexp) (M,) <- their merge with the state of x,
// (sq_max, sq_sumexp) (M,) <- their merge with the state of 2 x, which is
// (2 max_x, sum_k exp(2 (x_k - shift))). With first, the running states are
// written without being read.
template <typename T>
void logmeanexp_accumulate(const T* lw, const T* latent, int64_t K, int64_t M, T* max, T* sumexp,
                           T* sq_max, T* sq_sumexp, bool first, int n_threads);

// dlw (K, M) = e * (a + b * e) with e = exp(lw - max) (exp(lw) for an empty
// column, max = -inf) and per column
//   a = g / sumexp + g_sumexp, b = 0                  (ess == nullptr; g_sumexp may be null)
//   a = 2 g ess / sumexp, b = -a ess / sumexp           (ess != nullptr)
// where 1 / sumexp is taken as 0 for an empty (all -inf) column. The first
// form is the logmeanexp gradient (and, with g = 1, the normalized weights);
// the second the effective_sample_size gradient.
template <typename T>
void logmeanexp_backward(const T* lw, const T* max, const T* sumexp, const T* g,
                         const T* g_sumexp, const T* ess, int64_t K, int64_t M, T* dlw,
                         int n_threads);

// Softmax backward over K: dlw = w * (gw - sum_k gw * w); all (K, M).
template <typename T>
void importance_weights_backward(const T* gw, const T* w, int64_t K, int64_t M, T* dlw,
                                 int n_threads);

}  // namespace fastvae
