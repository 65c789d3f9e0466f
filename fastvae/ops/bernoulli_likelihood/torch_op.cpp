// bernoulli_log_prob's eager CPU operator, fastvae_cpp::bernoulli_log_prob (a
// C++ autograd Function around the kernels of bernoulli_likelihood.cpp), and
// its graph twins fastvae_cpu::bernoulli_log_prob / bernoulli_log_prob_backward,
// which a torch.compile graph calls (csrc/torch_ops.cpp says what these are;
// docs/architecture.md why). continuous_bernoulli_log_prob has no operator.
// Compiled in one unit with csrc/torch_ops.cpp, which defines the libraries.
#include <vector>

#include "bernoulli_likelihood.h"
#include "torch_ops.h"

namespace fastvae::torch_ops {
namespace {

// sum(x * logits - softplus(logits)) over the last dimension, x broadcast
// against the logits (torch_ops.h, likelihood_layout); as op.py's BernoulliLogProb.
// The logits may be bfloat16 or float16 against float32 x (autocast's decoder
// output): read as stored, the result float32, dlogits in the logits' dtype.
struct BernoulliLogProb : torch::autograd::Function<BernoulliLogProb> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& logits) {
    const auto [K, P, D] = likelihood_layout(x, logits, "logits");
    const Tensor l = storage_input(as_shape(logits, {K, P, D}), "logits", {K, P, D});
    const Tensor x2 = input(as_shape(x, {P, D}), "x", compute_dtype(l), {P, D});
    Tensor out = output({K, P}, x2);
    by_storage_dtype(l, [&](auto t, auto h) {
      using T = decltype(t);
      using H = decltype(h);
      bernoulli_log_prob_forward<T, H>(ptr<T>(x2), stored<H>(l), K, P, D, ptr<T>(out), threads(K * P * D));
    });
    ctx->save_for_backward({x2, l, x, logits});  // the inputs, for a double backward
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["logits_shape"] = logits.sizes().vec();
    return shaped(out, logits.sizes().slice(0, logits.dim() - 1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x2 = saved[0], &l = saved[1];
    const bool need_dx = ctx->needs_input_grad(0);
    if (double_backward()) {  // sum(x * logits - softplus(logits)) differentiated by ATen ops
      const Tensor &x = saved[2], &logits = saved[3], g = grads[0].unsqueeze(-1);
      const Tensor lc = logits.to(x.scalar_type());  // half-precision logits: computed in x's dtype
      return {need_dx ? (g * lc).sum_to_size(x.sizes()) : Tensor(),
              (g * (x - at::sigmoid(lc))).sum_to_size(logits.sizes()).to(logits.scalar_type())};
    }
    const int64_t K = l.size(0), P = l.size(1), D = l.size(2);
    const Tensor g = input(as_shape(grads[0], {K, P}), "grad_out", x2, {K, P});
    Tensor dlogits = output({K, P, D}, l);
    Tensor dx = need_dx ? output({P, D}, x2) : Tensor();
    by_storage_dtype(l, [&](auto t, auto h) {
      using T = decltype(t);
      using H = decltype(h);
      bernoulli_log_prob_backward<T, H>(ptr<T>(g), ptr<T>(x2), stored<H>(l), K, P, D,
                                        need_dx ? ptr<T>(dx) : nullptr, stored<H>(dlogits), threads(K * P * D));
    });
    return {need_dx ? dx.view(ctx->saved_data["x_shape"].toIntVector()) : Tensor(),
            dlogits.view(ctx->saved_data["logits_shape"].toIntVector())};
  }
};

Tensor bernoulli_log_prob(const Tensor& x, const Tensor& logits) { return BernoulliLogProb::apply(x, logits); }

Tensor graph_bernoulli_log_prob(const Tensor& x, const Tensor& logits) {
  const auto [K, P, D] = graph_layout(x, logits, "logits");
  const Tensor l = input(logits, "logits", logits, {K, P, D}), x2 = input(x, "x", logits, {P, D});
  Tensor out = output({K, P}, l);
  by_dtype(l, [&](auto tag) {
    using T = decltype(tag);
    bernoulli_log_prob_forward<T>(ptr<T>(x2), ptr<T>(l), K, P, D, ptr<T>(out), threads(K * P * D));
  });
  return out;
}

std::vector<Tensor> graph_bernoulli_log_prob_backward(const Tensor& grad_out, const Tensor& x, const Tensor& logits,
                                                      bool need_dx) {
  const auto [K, P, D] = graph_layout(x, logits, "logits");
  const Tensor l = input(logits, "logits", logits, {K, P, D}), x2 = input(x, "x", logits, {P, D});
  const Tensor g = input(as_shape(grad_out, {K, P}), "grad_out", l, {K, P});
  Tensor dlogits = output({K, P, D}, l), dx = need_dx ? output({P, D}, l) : Tensor();
  by_dtype(l, [&](auto tag) {
    using T = decltype(tag);
    bernoulli_log_prob_backward<T>(ptr<T>(g), ptr<T>(x2), ptr<T>(l), K, P, D, need_dx ? ptr<T>(dx) : nullptr,
                                   ptr<T>(dlogits), threads(K * P * D));
  });
  return need_dx ? std::vector<Tensor>{dlogits, dx} : std::vector<Tensor>{dlogits};
}

}  // namespace

FASTVAE_TORCH_OP(bernoulli_log_prob, "(Tensor x, Tensor logits) -> Tensor",
                 "(Tensor grad_out, Tensor x, Tensor logits, bool need_dx) -> Tensor[]")

}  // namespace fastvae::torch_ops
