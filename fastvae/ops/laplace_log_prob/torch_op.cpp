// laplace_log_prob's eager CPU operator, fastvae_cpp::laplace_log_prob (a C++
// autograd Function around the kernels of laplace_log_prob.cpp), and its
// graph twins fastvae_cpu::laplace_log_prob / laplace_log_prob_backward,
// which a torch.compile graph calls (csrc/torch_ops.cpp says what these are;
// docs/architecture.md why). Compiled in one unit with csrc/torch_ops.cpp,
// which defines the libraries; the likelihoods' layout (Layout,
// likelihood_layout, graph_layout) is csrc/torch_ops.h's.
#include <utility>
#include <vector>

#include "laplace_log_prob.h"
#include "torch_ops.h"

namespace fastvae::torch_ops {
namespace {

// The log-scale as fastvae/_likelihood_layout.py's kernel_var lays it out:
// (D,) one per dimension, (K, P, D) per element, else (P, D) per x row.
std::pair<Tensor, ScaleLayout> laplace_scale_layout(const Tensor& s, const Tensor& loc, const Layout& l) {
  if (s.dim() == 1 && s.size(0) == l.D && l.K * l.P * l.D != l.D) {
    return {input(s, "log_scale", loc, {l.D}), ScaleLayout::kDim};
  }
  if (s.numel() == l.K * l.P * l.D) {
    return {input(s.reshape({l.K, l.P, l.D}), "log_scale", loc, {l.K, l.P, l.D}), ScaleLayout::kElement};
  }
  TORCH_CHECK(s.numel() == l.P * l.D, "log_scale of shape ", s.sizes(), " is neither per element, per x row nor per "
              "dimension of loc ", loc.sizes());
  return {input(s.reshape({l.P, l.D}), "log_scale", loc, {l.P, l.D}), ScaleLayout::kRow};
}

// The gradients of -sum(|x - loc| / b + log b + log 2), b = exp(log_scale), as
// differentiable ATen ops on the inputs (broadcasting against loc), for
// create_graph=True; as op.py's _double_backward: sign(0) = 0, and where
// x == loc the scale's exp(-0) keeps an underflowing scale's inf out of the graph.
variable_list laplace_backward_graph(const Tensor& grad_out, const Tensor& x, const Tensor& loc, const Tensor& s,
                                     bool need_dx, bool need_ds) {
  const Tensor g = grad_out.unsqueeze(-1), diff = x - loc;
  const Tensor inv = at::exp(-at::where(diff == 0, at::zeros_like(s), s));
  const Tensor gl = g * at::sign(diff) * inv;
  const Tensor gs = g * (diff.abs() * inv - 1.0);
  return {need_dx ? (-gl).sum_to_size(x.sizes()) : Tensor(), gl.sum_to_size(loc.sizes()),
          need_ds ? gs.sum_to_size(s.sizes()) : Tensor()};
}

// out (K, P) <- the kernel's log-densities of x2 (P, D) under loc m (K, P, D)
// and log-scale s (the layout's shape), each a contiguous input of m's dtype.
Tensor laplace_forward(const Tensor& x2, const Tensor& m, const Tensor& s, ScaleLayout layout, const Layout& l) {
  Tensor out = output({l.K, l.P}, m);
  by_dtype(m, [&](auto tag) {
    using T = decltype(tag);
    laplace_log_prob_forward<T>(ptr<T>(x2), ptr<T>(m), ptr<T>(s), layout, l.K, l.P, l.D, ptr<T>(out),
                                threads(m.numel()));
  });
  return out;
}

struct LaplaceLogProb : torch::autograd::Function<LaplaceLogProb> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& loc, const Tensor& log_scale) {
    check_float(loc, "loc");
    const Layout l = likelihood_layout(x, loc, "loc");
    const Tensor m = input(loc.reshape({l.K, l.P, l.D}), "loc", loc, {l.K, l.P, l.D});
    const Tensor x2 = input(x.reshape({l.P, l.D}), "x", loc, {l.P, l.D});
    const auto [s, layout] = laplace_scale_layout(log_scale, loc, l);
    Tensor out = laplace_forward(x2, m, s, layout, l);
    ctx->save_for_backward({x2, m, s, x, loc, log_scale});  // the inputs, for a double backward
    ctx->saved_data["layout"] = int64_t(layout);
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["loc_shape"] = loc.sizes().vec();
    ctx->saved_data["scale_shape"] = log_scale.sizes().vec();
    return shaped(out, loc.sizes().slice(0, loc.dim() - 1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x2 = saved[0], &m = saved[1], &s = saved[2];
    const bool need_dx = ctx->needs_input_grad(0), need_ds = ctx->needs_input_grad(2);
    if (double_backward()) return laplace_backward_graph(grads[0], saved[3], saved[4], saved[5], need_dx, need_ds);
    const int64_t K = m.size(0), P = m.size(1), D = m.size(2);
    const Tensor g = input(grads[0].reshape({K, P}), "grad_out", m, {K, P});
    Tensor dloc = output({K, P, D}, m);
    Tensor dx = need_dx ? output({P, D}, m) : Tensor();
    Tensor ds = need_ds ? output(s.sizes(), m) : Tensor();
    by_dtype(m, [&](auto tag) {
      using T = decltype(tag);
      laplace_log_prob_backward<T>(ptr<T>(g), ptr<T>(x2), ptr<T>(m), ptr<T>(s),
                                   ScaleLayout(ctx->saved_data["layout"].toInt()), K, P, D,
                                   need_dx ? ptr<T>(dx) : nullptr, ptr<T>(dloc), need_ds ? ptr<T>(ds) : nullptr,
                                   threads(m.numel()));
    });
    return {need_dx ? dx.view(ctx->saved_data["x_shape"].toIntVector()) : Tensor(),
            dloc.view(ctx->saved_data["loc_shape"].toIntVector()),
            need_ds ? ds.view(ctx->saved_data["scale_shape"].toIntVector()) : Tensor()};
  }
};

Tensor laplace_log_prob(const Tensor& x, const Tensor& loc, const Tensor& log_scale) {
  return LaplaceLogProb::apply(x, loc, log_scale);
}

// -- the graph ops (fastvae_cpu::*) ------------------------------------------------

// log_scale in its kernel form, told apart by rank as the binding does:
// (K, P, D) per element, (P, D) per x row, (D,) per dimension.
std::pair<Tensor, ScaleLayout> graph_scale(const Tensor& s, const Tensor& loc, const Layout& l) {
  switch (s.dim()) {
    case 3: return {input(s, "log_scale", loc, {l.K, l.P, l.D}), ScaleLayout::kElement};
    case 2: return {input(s, "log_scale", loc, {l.P, l.D}), ScaleLayout::kRow};
    case 1: return {input(s, "log_scale", loc, {l.D}), ScaleLayout::kDim};
    default: TORCH_CHECK(false, "log_scale: expected (K, P, D), (P, D) or (D,), got shape ", s.sizes());
  }
}

Tensor graph_laplace_log_prob(const Tensor& x, const Tensor& loc, const Tensor& log_scale) {
  const Layout l = graph_layout(x, loc, "loc");
  const Tensor m = input(loc, "loc", loc, {l.K, l.P, l.D}), x2 = input(x, "x", loc, {l.P, l.D});
  const auto [s, layout] = graph_scale(log_scale, loc, l);
  return laplace_forward(x2, m, s, layout, l);
}

std::vector<Tensor> graph_laplace_log_prob_backward(const Tensor& grad_out, const Tensor& x, const Tensor& loc,
                                                    const Tensor& log_scale, bool need_dx, bool need_dlog_scale) {
  const Layout l = graph_layout(x, loc, "loc");
  const Tensor m = input(loc, "loc", loc, {l.K, l.P, l.D}), x2 = input(x, "x", loc, {l.P, l.D});
  const auto [s, layout] = graph_scale(log_scale, loc, l);
  const Tensor g = input(grad_out.reshape({l.K, l.P}), "grad_out", m, {l.K, l.P});
  Tensor dloc = output({l.K, l.P, l.D}, m);
  Tensor dx = need_dx ? output({l.P, l.D}, m) : Tensor(), ds = need_dlog_scale ? output(s.sizes(), m) : Tensor();
  by_dtype(m, [&](auto tag) {
    using T = decltype(tag);
    laplace_log_prob_backward<T>(ptr<T>(g), ptr<T>(x2), ptr<T>(m), ptr<T>(s), layout, l.K, l.P, l.D,
                                 need_dx ? ptr<T>(dx) : nullptr, ptr<T>(dloc),
                                 need_dlog_scale ? ptr<T>(ds) : nullptr, threads(m.numel()));
  });
  std::vector<Tensor> grads{dloc};
  if (need_dx) grads.push_back(dx);
  if (need_dlog_scale) grads.push_back(ds);
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvae_cpp, m) {
  m.def("laplace_log_prob(Tensor x, Tensor loc, Tensor log_scale) -> Tensor");
}

TORCH_LIBRARY_FRAGMENT(fastvae_cpu, m) {
  m.def("laplace_log_prob(Tensor x, Tensor loc, Tensor log_scale) -> Tensor");
  m.def("laplace_log_prob_backward(Tensor grad_out, Tensor x, Tensor loc, Tensor log_scale, bool need_dx,"
        " bool need_dlog_scale) -> Tensor[]");
}

FASTVAE_TORCH_OP_IMPLS(laplace_log_prob)

}  // namespace fastvae::torch_ops
