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

// An op's operators with their schemas, where the eager operator and its graph
// twin take the same arguments: fastvae_cpp::NAME and fastvae_cpu::NAME
// SCHEMA ("(Tensor x, ...) -> Tensor"), fastvae_cpu::NAME_backward
// BACKWARD_SCHEMA; and their implementations (FASTVAE_TORCH_OP_IMPLS).
#define FASTVAE_TORCH_OP(NAME, SCHEMA, BACKWARD_SCHEMA)                                   \
  TORCH_LIBRARY_FRAGMENT(fastvae_cpp, m) { m.def(#NAME SCHEMA); }                         \
  TORCH_LIBRARY_FRAGMENT(fastvae_cpu, m) {                                                \
    m.def(#NAME SCHEMA);                                                                  \
    m.def(#NAME "_backward" BACKWARD_SCHEMA);                                             \
  }                                                                                       \
  FASTVAE_TORCH_OP_IMPLS(NAME)

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

// The samplers' graph ops' seed: a 0-d int64 CPU tensor, read in place (a CPU
// scalar: no dispatcher call, as item's would be).
inline int64_t seed_value(const Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "seed: expected a 0-d int64 CPU tensor, got ", seed.scalar_type(), " of shape ", seed.sizes(), " on ",
              seed.device());
  return *seed.data_ptr<int64_t>();
}

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

// -- the location-scale likelihoods (gaussian_log_prob's and laplace_log_prob's torch_op.cpp) --

// A location-scale likelihood's scale parameter `v` (named `name`) against its
// decoder output `like` (named `like_name`), in the kernels' layout, as the
// op's layout enum E numbers it (kElement, kRow, kDim), of like's dtype:
// - scale_param, as fastvae/_likelihood_layout.py's kernel_var lays it out:
//   (D,) one per dimension, (K, P, D) per element, else (P, D) per x row;
// - graph_scale_param, in a graph op: told apart by rank as the binding does.
template <typename E>
std::pair<Tensor, E> scale_param(const Tensor& v, const char* name, const Tensor& like, const char* like_name,
                                 const Layout& s) {
  if (v.dim() == 1 && v.size(0) == s.D && s.K * s.P * s.D != s.D) {
    return {input(v, name, like, {s.D}), E::kDim};
  }
  if (v.numel() == s.K * s.P * s.D) {
    return {input(v.reshape({s.K, s.P, s.D}), name, like, {s.K, s.P, s.D}), E::kElement};
  }
  TORCH_CHECK(v.numel() == s.P * s.D, name, " of shape ", v.sizes(), " is neither per element, per x row nor per "
              "dimension of ", like_name, " ", like.sizes());
  return {input(v.reshape({s.P, s.D}), name, like, {s.P, s.D}), E::kRow};
}

template <typename E>
std::pair<Tensor, E> graph_scale_param(const Tensor& v, const char* name, const Tensor& like, const Layout& s) {
  switch (v.dim()) {
    case 3: return {input(v, name, like, {s.K, s.P, s.D}), E::kElement};
    case 2: return {input(v, name, like, {s.P, s.D}), E::kRow};
    case 1: return {input(v, name, like, {s.D}), E::kDim};
    default: TORCH_CHECK(false, name, ": expected (K, P, D), (P, D) or (D,), got shape ", v.sizes());
  }
}

// The kernels' inputs: x (P, D), the decoder output loc (K, P, D) and its
// scale parameter in `layout`, contiguous tensors of loc's dtype.
template <typename E>
struct LocScaleInputs {
  Layout s;
  Tensor x, loc, scale;
  E layout;
};

// An eager call's inputs (x and the scale parameter broadcasting against loc)
// in the kernels' layout.
template <typename E>
LocScaleInputs<E> loc_scale_inputs(const Tensor& x, const Tensor& loc, const char* loc_name, const Tensor& scale,
                                   const char* scale_name) {
  check_float(loc, loc_name);
  const Layout s = likelihood_layout(x, loc, loc_name);
  const Tensor m = input(loc.reshape({s.K, s.P, s.D}), loc_name, loc, {s.K, s.P, s.D});
  const Tensor x2 = input(x.reshape({s.P, s.D}), "x", loc, {s.P, s.D});
  auto [v, layout] = scale_param<E>(scale, scale_name, loc, loc_name, s);
  return {s, x2, m, v, layout};
}

// A graph op's inputs, which are in the kernels' layout already.
template <typename E>
LocScaleInputs<E> graph_loc_scale_inputs(const Tensor& x, const Tensor& loc, const char* loc_name,
                                         const Tensor& scale, const char* scale_name) {
  const Layout s = graph_layout(x, loc, loc_name);
  const Tensor m = input(loc, loc_name, loc, {s.K, s.P, s.D}), x2 = input(x, "x", loc, {s.P, s.D});
  auto [v, layout] = graph_scale_param<E>(scale, scale_name, loc, s);
  return {s, x2, m, v, layout};
}

// An eager Function's saved state: the kernels' inputs for its backward, the
// user's for a double backward (saved[3..5]), the layout and the user's
// shapes, which the gradients take (eager_grads).
template <typename E>
void save_loc_scale(AutogradContext* ctx, const LocScaleInputs<E>& in, const Tensor& x, const Tensor& loc,
                    const Tensor& scale) {
  ctx->save_for_backward({in.x, in.loc, in.scale, x, loc, scale});
  ctx->saved_data["layout"] = int64_t(in.layout);
  ctx->saved_data["x_shape"] = x.sizes().vec();
  ctx->saved_data["loc_shape"] = loc.sizes().vec();
  ctx->saved_data["scale_shape"] = scale.sizes().vec();
}

template <typename E>
LocScaleInputs<E> saved_loc_scale(AutogradContext* ctx, const variable_list& saved) {
  const Tensor& m = saved[1];
  return {{m.size(0), m.size(1), m.size(2)}, saved[0], m, saved[2], E(ctx->saved_data["layout"].toInt())};
}

// grad_out (K, P) of the rows, checked against loc.
template <typename E>
Tensor grad_rows(const Tensor& grad_out, const LocScaleInputs<E>& in) {
  return input(grad_out.reshape({in.s.K, in.s.P}), "grad_out", in.loc, {in.s.K, in.s.P});
}

// The backward kernel's outputs: dloc (K, P, D), and dx (P, D) and dscale (the
// scale parameter's shape) where asked for, else undefined.
struct LocScaleGrads {
  Tensor dloc, dx, dscale;
};

template <typename E>
LocScaleGrads loc_scale_grads(const LocScaleInputs<E>& in, bool need_dx, bool need_dscale) {
  const auto [K, P, D] = in.s;
  return {output({K, P, D}, in.loc), need_dx ? output({P, D}, in.loc) : Tensor(),
          need_dscale ? output(in.scale.sizes(), in.loc) : Tensor()};
}

// The gradients of an eager Function's (x, loc, scale) in the user's shapes.
inline variable_list eager_grads(AutogradContext* ctx, const LocScaleGrads& d) {
  const auto view = [&](const Tensor& t, const char* key) {
    return t.defined() ? t.view(ctx->saved_data[key].toIntVector()) : Tensor();
  };
  return {view(d.dx, "x_shape"), view(d.dloc, "loc_shape"), view(d.dscale, "scale_shape")};
}

// A graph backward's Tensor[]: dloc, then dx and dscale where asked for.
inline std::vector<Tensor> graph_grads(const LocScaleGrads& d) {
  std::vector<Tensor> grads{d.dloc};
  if (d.dx.defined()) grads.push_back(d.dx);
  if (d.dscale.defined()) grads.push_back(d.dscale);
  return grads;
}

// acc + t, where an undefined acc is 0.
inline void add_to(Tensor& acc, const Tensor& t) { acc = acc.defined() ? acc + t : t; }

}  // namespace fastvae::torch_ops
