// gaussian_log_prob's eager CPU operator, fastvae_cpp::gaussian_log_prob (a
// C++ autograd Function around the kernels of gaussian_log_prob.cpp), and its
// graph twins fastvae_cpu::gaussian_log_prob / gaussian_log_prob_backward,
// which a torch.compile graph calls (csrc/torch_ops.cpp says what these are;
// docs/architecture.md why). Compiled in one unit with csrc/torch_ops.cpp,
// which defines the libraries; the likelihoods' layout (Layout,
// likelihood_layout, graph_layout) is csrc/torch_ops.h's.
#include <utility>
#include <vector>

#include "gaussian_log_prob.h"
#include "torch_ops.h"

namespace fastvae::torch_ops {
namespace {

// The gradients of -0.5 sum((x - mean)^2 / var + log var + log 2 pi) as
// differentiable ATen ops on the inputs (x, mean, var_param broadcasting
// against mean), for create_graph=True; as fastvae/_double_backward.py's.
variable_list gaussian_backward_graph(const Tensor& grad_out, const Tensor& x, const Tensor& mean, const Tensor& v,
                                      bool softplus_mode, double delta, bool need_dx, bool need_dv) {
  const Tensor g = grad_out.unsqueeze(-1), r = x - mean;
  Tensor inv, gv;
  if (softplus_mode) {
    inv = 1.0 / (at::logaddexp(at::zeros_like(v), v) + delta);  // softplus without torch's cut-off at 20
    gv = 0.5 * g * (r * r * inv - 1.0) * inv * at::sigmoid(v);
  } else {
    inv = at::exp(-v);
    inv = at::where((r == 0) & inv.isinf(), 0.0, inv);  // x == mean: the squared term is 0, not 0 * inf
    gv = 0.5 * g * (r * r * inv - 1.0);
  }
  const Tensor gm = g * r * inv;
  return {need_dx ? (-gm).sum_to_size(x.sizes()) : Tensor(), gm.sum_to_size(mean.sizes()),
          need_dv ? gv.sum_to_size(v.sizes()) : Tensor(), Tensor(), Tensor()};
}

template <typename T>
void check_delta(double delta) {
  TORCH_CHECK(valid_delta<T>(delta), "delta must be finite and at least the smallest normal number of the dtype, got ",
              delta);
}

// The kernels on inputs in their layout, as the eager and the graph ops call them.
Tensor gaussian_forward(const LocScaleInputs<VarLayout>& in, bool softplus_mode, double delta) {
  const auto [K, P, D] = in.s;
  Tensor out = output({K, P}, in.loc);
  by_dtype(in.loc, [&](auto tag) {
    using T = decltype(tag);
    check_delta<T>(delta);
    gaussian_log_prob_forward<T>(ptr<T>(in.x), ptr<T>(in.loc), ptr<T>(in.scale), in.layout, softplus_mode, delta, K,
                                 P, D, ptr<T>(out), threads(in.loc.numel()));
  });
  return out;
}

LocScaleGrads gaussian_backward(const Tensor& grad_out, const LocScaleInputs<VarLayout>& in, bool softplus_mode,
                                double delta, bool need_dx, bool need_dv) {
  const Tensor g = grad_rows(grad_out, in);
  const LocScaleGrads d = loc_scale_grads(in, need_dx, need_dv);
  by_dtype(in.loc, [&](auto tag) {
    using T = decltype(tag);
    check_delta<T>(delta);
    gaussian_log_prob_backward<T>(ptr<T>(g), ptr<T>(in.x), ptr<T>(in.loc), ptr<T>(in.scale), in.layout,
                                  softplus_mode, delta, in.s.K, in.s.P, in.s.D, need_dx ? ptr<T>(d.dx) : nullptr,
                                  ptr<T>(d.dloc), need_dv ? ptr<T>(d.dscale) : nullptr, threads(in.loc.numel()));
  });
  return d;
}

struct GaussianLogProb : torch::autograd::Function<GaussianLogProb> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& var_param,
                        bool softplus_mode, double delta) {
    const auto in = loc_scale_inputs<VarLayout>(x, mean, "mean", var_param, "var_param");
    Tensor out = gaussian_forward(in, softplus_mode, delta);
    save_loc_scale(ctx, in, x, mean, var_param);
    ctx->saved_data["softplus_mode"] = softplus_mode;
    ctx->saved_data["delta"] = delta;
    return shaped(out, mean.sizes().slice(0, mean.dim() - 1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_dx = ctx->needs_input_grad(0), need_dv = ctx->needs_input_grad(2);
    const bool softplus_mode = ctx->saved_data["softplus_mode"].toBool();
    const double delta = ctx->saved_data["delta"].toDouble();
    if (double_backward()) {
      return gaussian_backward_graph(grads[0], saved[3], saved[4], saved[5], softplus_mode, delta, need_dx, need_dv);
    }
    const auto in = saved_loc_scale<VarLayout>(ctx, saved);
    variable_list d = eager_grads(ctx, gaussian_backward(grads[0], in, softplus_mode, delta, need_dx, need_dv));
    d.resize(5);  // softplus_mode and delta take none
    return d;
  }
};

Tensor gaussian_log_prob(const Tensor& x, const Tensor& mean, const Tensor& var_param, bool softplus_mode,
                         double delta) {
  return GaussianLogProb::apply(x, mean, var_param, softplus_mode, delta);
}

// -- the graph ops (fastvae_cpu::*) ------------------------------------------------

Tensor graph_gaussian_log_prob(const Tensor& x, const Tensor& mean, const Tensor& var_param, bool softplus_mode,
                               double delta) {
  return gaussian_forward(graph_loc_scale_inputs<VarLayout>(x, mean, "mean", var_param, "var_param"), softplus_mode,
                          delta);
}

std::vector<Tensor> graph_gaussian_log_prob_backward(const Tensor& grad_out, const Tensor& x, const Tensor& mean,
                                                     const Tensor& var_param, bool softplus_mode, double delta,
                                                     bool need_dx, bool need_dvar_param) {
  const auto in = graph_loc_scale_inputs<VarLayout>(x, mean, "mean", var_param, "var_param");
  return graph_grads(gaussian_backward(grad_out, in, softplus_mode, delta, need_dx, need_dvar_param));
}

}  // namespace

FASTVAE_TORCH_OP(gaussian_log_prob,
                 "(Tensor x, Tensor mean, Tensor var_param, bool softplus_mode, float delta) -> Tensor",
                 "(Tensor grad_out, Tensor x, Tensor mean, Tensor var_param, bool softplus_mode, float delta,"
                 " bool need_dx, bool need_dvar_param) -> Tensor[]")

}  // namespace fastvae::torch_ops
