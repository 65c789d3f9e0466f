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

// The variance parameter as fastvae/_likelihood_layout.py's kernel_var lays it
// out: (D,) one per dimension, (K, P, D) per element, else (P, D) per x row.
std::pair<Tensor, VarLayout> var_layout(const Tensor& v, const Tensor& mean, const Layout& s) {
  if (v.dim() == 1 && v.size(0) == s.D && s.K * s.P * s.D != s.D) {
    return {input(v, "var_param", mean, {s.D}), VarLayout::kDim};
  }
  if (v.numel() == s.K * s.P * s.D) {
    return {input(v.reshape({s.K, s.P, s.D}), "var_param", mean, {s.K, s.P, s.D}), VarLayout::kElement};
  }
  TORCH_CHECK(v.numel() == s.P * s.D, "var_param of shape ", v.sizes(), " is neither per element, per x row nor per "
              "dimension of mean ", mean.sizes());
  return {input(v.reshape({s.P, s.D}), "var_param", mean, {s.P, s.D}), VarLayout::kRow};
}

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

struct GaussianLogProb : torch::autograd::Function<GaussianLogProb> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& var_param,
                        bool softplus_mode, double delta) {
    check_float(mean, "mean");
    const Layout s = likelihood_layout(x, mean, "mean");
    const Tensor m = input(mean.reshape({s.K, s.P, s.D}), "mean", mean, {s.K, s.P, s.D});
    const Tensor x2 = input(x.reshape({s.P, s.D}), "x", mean, {s.P, s.D});
    const auto [v, layout] = var_layout(var_param, mean, s);
    Tensor out = output({s.K, s.P}, m);
    by_dtype(m, [&](auto tag) {
      using T = decltype(tag);
      TORCH_CHECK(valid_delta<T>(delta), "delta must be finite and at least the smallest normal number of the "
                  "dtype, got ", delta);
      gaussian_log_prob_forward<T>(ptr<T>(x2), ptr<T>(m), ptr<T>(v), layout, softplus_mode, delta, s.K, s.P, s.D,
                                   ptr<T>(out), threads(m.numel()));
    });
    ctx->save_for_backward({x2, m, v, x, mean, var_param});  // the inputs, for a double backward
    ctx->saved_data["layout"] = int64_t(layout);
    ctx->saved_data["softplus_mode"] = softplus_mode;
    ctx->saved_data["delta"] = delta;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["mean_shape"] = mean.sizes().vec();
    ctx->saved_data["var_shape"] = var_param.sizes().vec();
    return shaped(out, mean.sizes().slice(0, mean.dim() - 1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x2 = saved[0], &m = saved[1], &v = saved[2];
    const bool need_dx = ctx->needs_input_grad(0), need_dv = ctx->needs_input_grad(2);
    if (double_backward()) {
      return gaussian_backward_graph(grads[0], saved[3], saved[4], saved[5], ctx->saved_data["softplus_mode"].toBool(),
                                     ctx->saved_data["delta"].toDouble(), need_dx, need_dv);
    }
    const int64_t K = m.size(0), P = m.size(1), D = m.size(2);
    const Tensor g = input(grads[0].reshape({K, P}), "grad_out", m, {K, P});
    Tensor dmean = output({K, P, D}, m);
    Tensor dx = need_dx ? output({P, D}, m) : Tensor();
    Tensor dv = need_dv ? output(v.sizes(), m) : Tensor();
    by_dtype(m, [&](auto tag) {
      using T = decltype(tag);
      gaussian_log_prob_backward<T>(ptr<T>(g), ptr<T>(x2), ptr<T>(m), ptr<T>(v),
                                    VarLayout(ctx->saved_data["layout"].toInt()),
                                    ctx->saved_data["softplus_mode"].toBool(), ctx->saved_data["delta"].toDouble(),
                                    K, P, D, need_dx ? ptr<T>(dx) : nullptr, ptr<T>(dmean),
                                    need_dv ? ptr<T>(dv) : nullptr, threads(m.numel()));
    });
    return {need_dx ? dx.view(ctx->saved_data["x_shape"].toIntVector()) : Tensor(),
            dmean.view(ctx->saved_data["mean_shape"].toIntVector()),
            need_dv ? dv.view(ctx->saved_data["var_shape"].toIntVector()) : Tensor(), Tensor(), Tensor()};
  }
};

Tensor gaussian_log_prob(const Tensor& x, const Tensor& mean, const Tensor& var_param, bool softplus_mode,
                         double delta) {
  return GaussianLogProb::apply(x, mean, var_param, softplus_mode, delta);
}

// -- the graph ops (fastvae_cpu::*) ------------------------------------------------

// var_param in its kernel form, told apart by rank as the binding does:
// (K, P, D) per element, (P, D) per x row, (D,) per dimension.
std::pair<Tensor, VarLayout> graph_var(const Tensor& v, const Tensor& mean, const Layout& s) {
  switch (v.dim()) {
    case 3: return {input(v, "var_param", mean, {s.K, s.P, s.D}), VarLayout::kElement};
    case 2: return {input(v, "var_param", mean, {s.P, s.D}), VarLayout::kRow};
    case 1: return {input(v, "var_param", mean, {s.D}), VarLayout::kDim};
    default: TORCH_CHECK(false, "var_param: expected (K, P, D), (P, D) or (D,), got shape ", v.sizes());
  }
}

template <typename T>
void check_delta(double delta) {
  TORCH_CHECK(valid_delta<T>(delta), "delta must be finite and at least the smallest normal number of the dtype, got ",
              delta);
}

Tensor graph_gaussian_log_prob(const Tensor& x, const Tensor& mean, const Tensor& var_param, bool softplus_mode,
                               double delta) {
  const Layout s = graph_layout(x, mean, "mean");
  const Tensor m = input(mean, "mean", mean, {s.K, s.P, s.D}), x2 = input(x, "x", mean, {s.P, s.D});
  const auto [v, layout] = graph_var(var_param, mean, s);
  Tensor out = output({s.K, s.P}, m);
  by_dtype(m, [&](auto tag) {
    using T = decltype(tag);
    check_delta<T>(delta);
    gaussian_log_prob_forward<T>(ptr<T>(x2), ptr<T>(m), ptr<T>(v), layout, softplus_mode, delta, s.K, s.P, s.D,
                                 ptr<T>(out), threads(m.numel()));
  });
  return out;
}

std::vector<Tensor> graph_gaussian_log_prob_backward(const Tensor& grad_out, const Tensor& x, const Tensor& mean,
                                                     const Tensor& var_param, bool softplus_mode, double delta,
                                                     bool need_dx, bool need_dvar_param) {
  const Layout s = graph_layout(x, mean, "mean");
  const Tensor m = input(mean, "mean", mean, {s.K, s.P, s.D}), x2 = input(x, "x", mean, {s.P, s.D});
  const auto [v, layout] = graph_var(var_param, mean, s);
  const Tensor g = input(grad_out.reshape({s.K, s.P}), "grad_out", m, {s.K, s.P});
  Tensor dmean = output({s.K, s.P, s.D}, m);
  Tensor dx = need_dx ? output({s.P, s.D}, m) : Tensor(), dv = need_dvar_param ? output(v.sizes(), m) : Tensor();
  by_dtype(m, [&](auto tag) {
    using T = decltype(tag);
    check_delta<T>(delta);
    gaussian_log_prob_backward<T>(ptr<T>(g), ptr<T>(x2), ptr<T>(m), ptr<T>(v), layout, softplus_mode, delta, s.K,
                                  s.P, s.D, need_dx ? ptr<T>(dx) : nullptr, ptr<T>(dmean),
                                  need_dvar_param ? ptr<T>(dv) : nullptr, threads(m.numel()));
  });
  std::vector<Tensor> grads{dmean};
  if (need_dx) grads.push_back(dx);
  if (need_dvar_param) grads.push_back(dv);
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvae_cpp, m) {
  m.def("gaussian_log_prob(Tensor x, Tensor mean, Tensor var_param, bool softplus_mode, float delta) -> Tensor");
}

TORCH_LIBRARY_FRAGMENT(fastvae_cpu, m) {
  m.def("gaussian_log_prob(Tensor x, Tensor mean, Tensor var_param, bool softplus_mode, float delta) -> Tensor");
  m.def("gaussian_log_prob_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor var_param, bool softplus_mode,"
        " float delta, bool need_dx, bool need_dvar_param) -> Tensor[]");
}

FASTVAE_TORCH_OP_IMPLS(gaussian_log_prob)

}  // namespace fastvae::torch_ops
