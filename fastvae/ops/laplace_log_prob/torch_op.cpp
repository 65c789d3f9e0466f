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

// The kernels on inputs in their layout, as the eager and the graph ops call them.
Tensor laplace_forward(const LocScaleInputs<ScaleLayout>& in) {
  const auto [K, P, D] = in.s;
  Tensor out = output({K, P}, in.loc);
  by_dtype(in.loc, [&](auto tag) {
    using T = decltype(tag);
    laplace_log_prob_forward<T>(ptr<T>(in.x), ptr<T>(in.loc), ptr<T>(in.scale), in.layout, K, P, D, ptr<T>(out),
                                threads(in.loc.numel()));
  });
  return out;
}

LocScaleGrads laplace_backward(const Tensor& grad_out, const LocScaleInputs<ScaleLayout>& in, bool need_dx,
                               bool need_ds) {
  const Tensor g = grad_rows(grad_out, in);
  const LocScaleGrads d = loc_scale_grads(in, need_dx, need_ds);
  by_dtype(in.loc, [&](auto tag) {
    using T = decltype(tag);
    laplace_log_prob_backward<T>(ptr<T>(g), ptr<T>(in.x), ptr<T>(in.loc), ptr<T>(in.scale), in.layout, in.s.K,
                                 in.s.P, in.s.D, need_dx ? ptr<T>(d.dx) : nullptr, ptr<T>(d.dloc),
                                 need_ds ? ptr<T>(d.dscale) : nullptr, threads(in.loc.numel()));
  });
  return d;
}

struct LaplaceLogProb : torch::autograd::Function<LaplaceLogProb> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& loc, const Tensor& log_scale) {
    const auto in = loc_scale_inputs<ScaleLayout>(x, loc, "loc", log_scale, "log_scale");
    Tensor out = laplace_forward(in);
    save_loc_scale(ctx, in, x, loc, log_scale);
    return shaped(out, loc.sizes().slice(0, loc.dim() - 1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_dx = ctx->needs_input_grad(0), need_ds = ctx->needs_input_grad(2);
    if (double_backward()) return laplace_backward_graph(grads[0], saved[3], saved[4], saved[5], need_dx, need_ds);
    return eager_grads(ctx, laplace_backward(grads[0], saved_loc_scale<ScaleLayout>(ctx, saved), need_dx, need_ds));
  }
};

Tensor laplace_log_prob(const Tensor& x, const Tensor& loc, const Tensor& log_scale) {
  return LaplaceLogProb::apply(x, loc, log_scale);
}

// -- the graph ops (fastvae_cpu::*) ------------------------------------------------

Tensor graph_laplace_log_prob(const Tensor& x, const Tensor& loc, const Tensor& log_scale) {
  return laplace_forward(graph_loc_scale_inputs<ScaleLayout>(x, loc, "loc", log_scale, "log_scale"));
}

std::vector<Tensor> graph_laplace_log_prob_backward(const Tensor& grad_out, const Tensor& x, const Tensor& loc,
                                                    const Tensor& log_scale, bool need_dx, bool need_dlog_scale) {
  const auto in = graph_loc_scale_inputs<ScaleLayout>(x, loc, "loc", log_scale, "log_scale");
  return graph_grads(laplace_backward(grad_out, in, need_dx, need_dlog_scale));
}

}  // namespace

FASTVAE_TORCH_OP(laplace_log_prob, "(Tensor x, Tensor loc, Tensor log_scale) -> Tensor",
                 "(Tensor grad_out, Tensor x, Tensor loc, Tensor log_scale, bool need_dx, bool need_dlog_scale)"
                 " -> Tensor[]")

}  // namespace fastvae::torch_ops
