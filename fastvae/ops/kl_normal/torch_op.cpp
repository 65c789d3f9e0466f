// kl_normal's eager CPU operator, fastvae_cpp::kl_normal (a C++ autograd
// Function around the kernels of kl_normal.cpp), and its graph twins
// fastvae_cpu::kl_normal / kl_normal_backward, which a torch.compile graph
// calls (csrc/torch_ops.cpp says what these are; docs/architecture.md why).
// Compiled in one unit with csrc/torch_ops.cpp, which defines the libraries.
#include <optional>
#include <vector>

#include "kl_normal.h"
#include "torch_ops.h"

namespace fastvae::torch_ops {
namespace {

// KL(N(mu, exp(logvar)) || prior) over the last dimension, the prior N(0, I)
// or (prior_mu, prior_logvar) of mu's shape (the front end expands a
// broadcast prior); as op.py's KLNormal.
struct KLNormal : torch::autograd::Function<KLNormal> {
  static Tensor forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar,
                        const std::optional<Tensor>& prior_mu, const std::optional<Tensor>& prior_logvar) {
    check_float(mu, "mu");
    const auto [N, L] = rows_of(mu);
    TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
                "prior_mu and prior_logvar must both be given or both be None");
    const bool prior = prior_mu.has_value();
    TORCH_CHECK(logvar.sizes() == mu.sizes(), "logvar: expected shape ", mu.sizes(), ", got ", logvar.sizes());
    const Tensor m = input(mu.reshape({N, L}), "mu", mu, {N, L});
    const Tensor lv = input(logvar.reshape({N, L}), "logvar", mu, {N, L});
    Tensor pm, plv;
    if (prior) {
      TORCH_CHECK(prior_mu->sizes() == mu.sizes() && prior_logvar->sizes() == mu.sizes(),
                  "prior_mu and prior_logvar: expected mu's shape ", mu.sizes());
      pm = input(prior_mu->reshape({N, L}), "prior_mu", mu, {N, L});
      plv = input(prior_logvar->reshape({N, L}), "prior_logvar", mu, {N, L});
    }
    Tensor kl = output({N}, m);
    by_dtype(m, [&](auto tag) {
      using T = decltype(tag);
      kl_normal_forward<T>(ptr<T>(m), ptr<T>(lv), prior ? ptr<T>(pm) : nullptr, prior ? ptr<T>(plv) : nullptr, N, L,
                           ptr<T>(kl), threads(N * L));
    });
    // the inputs too, for a double backward
    ctx->save_for_backward(prior ? variable_list{m, lv, pm, plv, mu, logvar, *prior_mu, *prior_logvar}
                                 : variable_list{m, lv, mu, logvar});
    ctx->saved_data["shape"] = mu.sizes().vec();
    return shaped(kl, mu.sizes().slice(0, mu.dim() - 1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool prior = saved.size() == 8;
    const Tensor &m = saved[0], &lv = saved[1];
    if (double_backward()) {
      const Tensor g = grads[0].unsqueeze(-1);
      const Tensor &mu = saved[prior ? 4 : 2], &logvar = saved[prior ? 5 : 3];
      const Tensor var = at::exp(logvar);
      if (!prior) return {g * mu, 0.5 * g * (var - 1.0), Tensor(), Tensor()};
      const Tensor d = mu - saved[6], inv_pvar = at::exp(-saved[7]), dmu = g * d * inv_pvar;
      return {dmu, 0.5 * g * (var * inv_pvar - 1.0), -dmu, 0.5 * g * (1.0 - (var + d * d) * inv_pvar)};
    }
    const int64_t N = m.size(0), L = m.size(1);
    const Tensor g = input(grads[0].reshape({N}), "grad_kl", m, {N});
    // a fixed prior (no gradient wanted for either parameter) gets no
    // full-size gradients: the kernel then writes dmu and dlogvar only
    const bool prior_grads = prior && (ctx->needs_input_grad(2) || ctx->needs_input_grad(3));
    Tensor dmu = output({N, L}, m), dlv = output({N, L}, m);
    Tensor dpm = prior_grads ? output({N, L}, m) : Tensor(), dplv = prior_grads ? output({N, L}, m) : Tensor();
    by_dtype(m, [&](auto tag) {
      using T = decltype(tag);
      kl_normal_backward<T>(ptr<T>(g), ptr<T>(m), ptr<T>(lv), prior ? ptr<T>(saved[2]) : nullptr,
                            prior ? ptr<T>(saved[3]) : nullptr, N, L, ptr<T>(dmu), ptr<T>(dlv),
                            prior_grads ? ptr<T>(dpm) : nullptr, prior_grads ? ptr<T>(dplv) : nullptr,
                            threads(N * L));
    });
    const auto shape = ctx->saved_data["shape"].toIntVector();
    return {dmu.view(shape), dlv.view(shape), prior_grads ? dpm.view(shape) : Tensor(),
            prior_grads ? dplv.view(shape) : Tensor()};
  }
};

Tensor kl_normal(const Tensor& mu, const Tensor& logvar, const std::optional<Tensor>& prior_mu,
                 const std::optional<Tensor>& prior_logvar) {
  return KLNormal::apply(mu, logvar, prior_mu, prior_logvar);
}

// mu, logvar and the optional prior as contiguous (N, L) tensors of mu's dtype.
std::vector<Tensor> graph_kl_inputs(const Tensor& mu, const Tensor& logvar, const std::optional<Tensor>& prior_mu,
                                    const std::optional<Tensor>& prior_logvar) {
  check_float(mu, "mu");
  TORCH_CHECK(mu.dim() == 2, "mu: expected a 2-d (N, L) tensor, got shape ", mu.sizes());
  TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
              "prior_mu and prior_logvar must both be given or both be None");
  std::vector<Tensor> t{input(mu, "mu", mu, mu.sizes()), input(logvar, "logvar", mu, mu.sizes())};
  if (prior_mu.has_value()) {
    t.push_back(input(*prior_mu, "prior_mu", mu, mu.sizes()));
    t.push_back(input(*prior_logvar, "prior_logvar", mu, mu.sizes()));
  }
  return t;
}

Tensor graph_kl_normal(const Tensor& mu, const Tensor& logvar, const std::optional<Tensor>& prior_mu,
                       const std::optional<Tensor>& prior_logvar) {
  const auto t = graph_kl_inputs(mu, logvar, prior_mu, prior_logvar);
  const bool prior = t.size() == 4;
  const int64_t N = mu.size(0), L = mu.size(1);
  Tensor kl = output({N}, t[0]);
  by_dtype(t[0], [&](auto tag) {
    using T = decltype(tag);
    kl_normal_forward<T>(ptr<T>(t[0]), ptr<T>(t[1]), prior ? ptr<T>(t[2]) : nullptr, prior ? ptr<T>(t[3]) : nullptr,
                         N, L, ptr<T>(kl), threads(N * L));
  });
  return kl;
}

std::vector<Tensor> graph_kl_normal_backward(const Tensor& grad_kl, const Tensor& mu, const Tensor& logvar,
                                             const std::optional<Tensor>& prior_mu,
                                             const std::optional<Tensor>& prior_logvar) {
  const auto t = graph_kl_inputs(mu, logvar, prior_mu, prior_logvar);
  const bool prior = t.size() == 4;
  const int64_t N = mu.size(0), L = mu.size(1);
  const Tensor g = input(grad_kl, "grad_kl", t[0], {N});
  std::vector<Tensor> grads;
  for (size_t i = 0; i < t.size(); ++i) grads.push_back(output({N, L}, t[0]));
  by_dtype(t[0], [&](auto tag) {
    using T = decltype(tag);
    kl_normal_backward<T>(ptr<T>(g), ptr<T>(t[0]), ptr<T>(t[1]), prior ? ptr<T>(t[2]) : nullptr,
                          prior ? ptr<T>(t[3]) : nullptr, N, L, ptr<T>(grads[0]), ptr<T>(grads[1]),
                          prior ? ptr<T>(grads[2]) : nullptr, prior ? ptr<T>(grads[3]) : nullptr, threads(N * L));
  });
  return grads;
}

}  // namespace

FASTVAE_TORCH_OP(kl_normal, "(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar) -> Tensor",
                 "(Tensor grad_kl, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar) -> Tensor[]")

}  // namespace fastvae::torch_ops
