// logmeanexp's eager CPU operator, fastvae_cpp::logmeanexp (a C++ autograd
// Function around the kernels of logmeanexp.cpp), and its graph twins
// fastvae_cpu::logmeanexp / logmeanexp_backward, which a torch.compile graph
// calls (csrc/torch_ops.cpp says what these are; docs/architecture.md why).
// Compiled in one unit with csrc/torch_ops.cpp, which defines the libraries.
#include <limits>
#include <optional>
#include <tuple>

#include "logmeanexp.h"
#include "torch_ops.h"

namespace fastvae::torch_ops {
namespace {

// 1 / s, and 0 where s = 0 (an all -inf column), with no inf * 0 in its gradient.
Tensor safe_inv(const Tensor& s) {
  const Tensor empty = s == 0;
  return at::where(empty, 0.0, 1.0 / at::where(empty, 1.0, s));
}

// (logmeanexp, lw_max, sumexp) over the leading dimension of lw (K, ...), as
// op.py's LogMeanExp: lw_max carries no gradient; the backward is
// exp(lw - lw_max) * (grad_out / sumexp + grad_sumexp). The cpp dtypes
// accumulate in their own precision, so the state has lw's dtype.
struct LogMeanExp : torch::autograd::Function<LogMeanExp> {
  static variable_list forward(AutogradContext* ctx, const Tensor& lw) {
    check_float(lw, "lw");
    TORCH_CHECK(lw.dim() >= 1 && lw.size(0) >= 1, "lw: expected (K, ...) with K >= 1, got shape ", lw.sizes());
    const int64_t K = lw.size(0), M = c10::multiply_integers(lw.sizes().slice(1));
    const Tensor l = input(lw.reshape({K, M}), "lw", lw, {K, M});
    Tensor out = output({M}, l), lw_max = output({M}, l), sumexp = output({M}, l);
    by_dtype(l, [&](auto tag) {
      using T = decltype(tag);
      logmeanexp_forward<T>(ptr<T>(l), K, M, ptr<T>(lw_max), ptr<T>(sumexp), ptr<T>(out), nullptr, threads(K * M));
    });
    ctx->mark_non_differentiable({lw_max});
    // lw itself (for a double backward too), not l: the backward takes the
    // (K, M) view again, which copies only a non-contiguous lw, so nothing of
    // size K x M is held twice
    ctx->save_for_backward({lw, lw_max, sumexp});
    ctx->saved_data["shape"] = lw.sizes().vec();
    const auto columns = lw.sizes().slice(1);
    return {shaped(out, columns), shaped(lw_max, columns), shaped(sumexp, columns)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &lw = saved[0], &lw_max = saved[1], &sumexp = saved[2];
    if (double_backward()) {  // e (grad_out / sum_k e + grad_sumexp), e = exp(lw - shift), lw_max a constant shift
      const Tensor m = lw_max.detach().view(lw.sizes().slice(1));
      const Tensor e = at::exp(lw - at::where(m == -std::numeric_limits<double>::infinity(), 0.0, m));
      return {e * (grads[0] * safe_inv(e.sum(0)) + grads[2])};
    }
    const int64_t K = lw.size(0), M = lw_max.numel();
    const Tensor l = input(lw.reshape({K, M}), "lw", lw, {K, M});
    const Tensor g = input(grads[0].reshape({M}), "grad_out", l, {M});
    const Tensor gs = input(grads[2].reshape({M}), "grad_sumexp", l, {M});
    Tensor dlw = output({K, M}, l);
    by_dtype(l, [&](auto tag) {
      using T = decltype(tag);
      logmeanexp_backward<T>(ptr<T>(l), ptr<T>(lw_max), ptr<T>(sumexp), ptr<T>(g), ptr<T>(gs), nullptr, K, M,
                             ptr<T>(dlw), threads(K * M));
    });
    return {dlw.view(ctx->saved_data["shape"].toIntVector())};
  }
};

std::tuple<Tensor, Tensor, Tensor> logmeanexp(const Tensor& lw) {
  auto out = LogMeanExp::apply(lw);
  return {out[0], out[1], out[2]};
}

// lw (K, ...) as contiguous (K, M).
Tensor graph_columns(const Tensor& lw) {
  check_float(lw, "lw");
  TORCH_CHECK(lw.dim() >= 1 && lw.size(0) >= 1, "lw: expected (K, ...) with K >= 1, got shape ", lw.sizes());
  const int64_t K = lw.size(0), M = c10::multiply_integers(lw.sizes().slice(1));
  return input(lw.reshape({K, M}), "lw", lw, {K, M});
}

std::tuple<Tensor, Tensor, Tensor> graph_logmeanexp(const Tensor& lw) {
  const Tensor l = graph_columns(lw);
  const int64_t K = l.size(0), M = l.size(1);
  Tensor out = output({M}, l), lw_max = output({M}, l), sumexp = output({M}, l);
  by_dtype(l, [&](auto tag) {
    using T = decltype(tag);
    logmeanexp_forward<T>(ptr<T>(l), K, M, ptr<T>(lw_max), ptr<T>(sumexp), ptr<T>(out), nullptr, threads(K * M));
  });
  const auto columns = lw.sizes().slice(1);
  return {shaped(out, columns), shaped(lw_max, columns), shaped(sumexp, columns)};
}

Tensor graph_logmeanexp_backward(const Tensor& grad_out, const std::optional<Tensor>& grad_sumexp, const Tensor& lw,
                                 const Tensor& lw_max, const Tensor& sumexp) {
  const Tensor l = graph_columns(lw);
  const int64_t K = l.size(0), M = l.size(1);
  const auto column = [&](const Tensor& t, const char* name) { return input(t.reshape({M}), name, l, {M}); };
  const Tensor g = column(grad_out, "grad_out"), mx = column(lw_max, "lw_max"), se = column(sumexp, "sumexp");
  const Tensor gs = grad_sumexp.has_value() ? column(*grad_sumexp, "grad_sumexp") : Tensor();
  Tensor dlw = output({K, M}, l);
  by_dtype(l, [&](auto tag) {
    using T = decltype(tag);
    logmeanexp_backward<T>(ptr<T>(l), ptr<T>(mx), ptr<T>(se), ptr<T>(g), gs.defined() ? ptr<T>(gs) : nullptr,
                           nullptr, K, M, ptr<T>(dlw), threads(K * M));
  });
  return shaped(dlw, lw.sizes());
}

}  // namespace

FASTVAE_TORCH_OP(logmeanexp, "(Tensor lw) -> (Tensor, Tensor, Tensor)",
                 "(Tensor grad_out, Tensor? grad_sumexp, Tensor lw, Tensor lw_max, Tensor sumexp) -> Tensor")

}  // namespace fastvae::torch_ops
