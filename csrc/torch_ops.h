// What every eager CPU operator (csrc/torch_ops.cpp and each op folder's
// torch_op.cpp) is made of: the boundary checks, the outputs, the dtype
// dispatch and the thread count. setup.py compiles those files as one
// translation unit (libtorch's headers are parsed once), csrc/torch_ops.cpp
// first: it defines the libraries, the op folders' files add fragments.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "half.h"
#include "ops.h"
#include "outputs.h"

// The implementations of an op's operators, which its torch_op.cpp defines
// in TORCH_LIBRARY_FRAGMENTs: fastvae_cpp::NAME, its eager operator (the
// function NAME), and the graph twins fastvae_cpu::NAME and NAME_backward
// that a torch.compile graph calls (graph_NAME and graph_NAME_backward).
#define FASTVAE_TORCH_OP_IMPLS(NAME)                                                      \
  TORCH_LIBRARY_IMPL(fastvae_cpp, CompositeImplicitAutograd, m) { m.impl(#NAME, &NAME); } \
  TORCH_LIBRARY_IMPL(fastvae_cpu, CPU, m) {                                               \
    m.impl(#NAME, &graph_##NAME);                                                         \
    m.impl(#NAME "_backward", &graph_##NAME##_backward);                                  \
  }

namespace fastvae::torch_ops {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// OpenMP threads for `work` elements: as fastvae._backend.num_threads.
inline int threads(int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kMinWorkPerThread)));
}

inline void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": the cpp backend supports float32 and float64, got ", t.scalar_type());
}

// t of the given shape as a contiguous, aligned tensor (input and storage_input's end).
inline Tensor contiguous_input(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  Tensor c = t.contiguous();
  // a view of a byte buffer at an odd offset: the kernels' loads assume alignment
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % c.element_size() != 0) c = c.clone();
  return c;
}

// t as a contiguous, aligned tensor of the given dtype and shape.
inline Tensor input(const Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  check_float(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  return contiguous_input(t, name, shape);
}

// t as a contiguous, aligned tensor of `like`'s dtype and the given shape.
inline Tensor input(const Tensor& t, const char* name, const Tensor& like, at::IntArrayRef shape) {
  return input(t, name, like.scalar_type(), shape);
}

inline Tensor output(at::IntArrayRef shape, const Tensor& like) {
  Tensor t = at::empty(shape, like.options());
  if (poison_outputs) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    advise_huge_pages(t.data_ptr(), size_t(t.nbytes()));
  }
  return t;
}

template <typename F>
void by_dtype(const Tensor& t, F f) {
  if (t.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    f(double{});
  }
}

template <typename T>
T* ptr(const Tensor& t) { return t.data_ptr<T>(); }

// A decoder output of float32 or float64, or of bfloat16 / float16 read as it
// is stored (the likelihoods' kernels take H = bf16 / fp16 from half.h with a
// float32 compute type T, as autocast gives them): f(T{}, H{}).
template <typename F>
void by_storage_dtype(const Tensor& t, F f) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return f(float{}, bf16{});
    case at::kHalf: return f(float{}, fp16{});
    case at::kFloat: return f(float{}, float{});
    default: return f(double{}, double{});
  }
}

// The stored elements of a tensor by_storage_dtype dispatched on.
template <typename H>
H* stored(const Tensor& t) { return static_cast<H*>(t.data_ptr()); }

// A decoder output's compute dtype: float32 for half precision, else its own.
inline at::ScalarType compute_dtype(const Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kBFloat16 || st == at::kHalf ? at::kFloat : st;
}

// t (a decoder output) as a contiguous, aligned tensor of the given shape:
// float32, float64, or bfloat16 / float16 (by_storage_dtype).
inline Tensor storage_input(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, name,
              ": the cpp backend supports float32, float64, bfloat16 and float16, got ", st);
  return contiguous_input(t, name, shape);
}

// t in the given shape (a view or a copy, as Tensor::reshape): t itself where
// it has it already, without the dispatcher's call (the per-call host time of
// these operators is mostly such calls at training sizes).
inline Tensor as_shape(const Tensor& t, at::IntArrayRef shape) { return t.sizes() == shape ? t : t.reshape(shape); }

// An output in its user's shape: the tensor itself where it has it already
// (so it stays modifiable in place, as the Python Function's outputs are),
// else a view.
inline Tensor shaped(const Tensor& t, at::IntArrayRef shape) { return t.sizes() == shape ? t : t.view(shape); }

// (..., L) as rows: N = the product of the leading dimensions.
inline std::pair<int64_t, int64_t> rows_of(const Tensor& mu) {
  TORCH_CHECK(mu.dim() >= 1, "mu: expected a tensor with a last (latent) dimension");
  return {c10::multiply_integers(mu.sizes().slice(0, mu.dim() - 1)), mu.size(-1)};
}

inline std::vector<int64_t> with_samples(int64_t K, at::IntArrayRef shape) {
  std::vector<int64_t> out{K};
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

// Whether this backward must return gradients with a graph (create_graph=True).
inline bool double_backward() { return at::GradMode::is_enabled(); }

// -- the likelihoods' layout (bernoulli_log_prob here, gaussian_log_prob's torch_op.cpp) --

// x (..., D) broadcast against the decoder output (K, ..., D) or (..., D), in
// the layout of fastvae/_likelihood_layout.py's kernel_views: x (P, D), the
// output (K, P, D).
struct Layout {
  int64_t K, P, D;
};

inline Layout likelihood_layout(const Tensor& x, const Tensor& out, const char* out_name) {
  const int64_t dims = out.dim();
  const bool same = x.dim() == dims;
  TORCH_CHECK(dims >= (same ? 1 : 2), out_name, ": expected a tensor with a last (event) dimension",
              same ? "" : " and a first (sample) dimension");
  TORCH_CHECK(same ? x.sizes() == out.sizes() : x.sizes() == out.sizes().slice(1), "x of shape ", x.sizes(),
              " must have the shape of ", out_name, ", ", out.sizes(), ", or its shape without the first dimension");
  int64_t P = 1;
  for (int64_t d = same ? 0 : 1; d < dims - 1; ++d) P *= out.size(d);
  return {same ? 1 : out.size(0), P, out.size(-1)};
}

// The likelihoods' layout in a graph op: x (P, D), the decoder output (K, P, D).
inline Layout graph_layout(const Tensor& x, const Tensor& out, const char* out_name) {
  check_float(out, out_name);
  TORCH_CHECK(out.dim() == 3, out_name, ": expected a 3-d (K, P, D) tensor, got shape ", out.sizes());
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-d (P, D) tensor, got shape ", x.sizes());
  return {out.size(0), out.size(1), out.size(2)};
}

// acc + t, where an undefined acc is 0.
inline void add_to(Tensor& acc, const Tensor& t) { acc = acc.defined() ? acc + t : t; }

}  // namespace fastvae::torch_ops
