// stick_breaking's eager CPU operator, fastvae_cpp::stick_breaking (a C++
// autograd Function around the kernels of stick_breaking.cpp), and its graph
// twins fastvae_cpu::stick_breaking / stick_breaking_backward, which a
// torch.compile graph calls (csrc/torch_ops.cpp says what these are;
// docs/architecture.md why). Compiled in one unit with csrc/torch_ops.cpp,
// which defines the libraries.
#include <vector>

#include "stick_breaking.h"
#include "torch_ops.h"

namespace fastvae::torch_ops {
namespace {

// y (..., M) as (N, M), M >= 1.
std::pair<int64_t, int64_t> stick_breaking_rows(const Tensor& y) {
  check_float(y, "y");
  TORCH_CHECK(y.dim() >= 1 && y.size(-1) >= 1, "y: expected a tensor with a last dimension of at least 1, got shape ",
              y.sizes());
  return {c10::multiply_integers(y.sizes().slice(0, y.dim() - 1)), y.size(-1)};
}

Tensor stick_breaking_z(const Tensor& y2) {
  const int64_t N = y2.size(0), M = y2.size(1);
  Tensor z = output({N, M + 1}, y2);
  by_dtype(y2, [&](auto tag) {
    using T = decltype(tag);
    stick_breaking_forward<T>(ptr<T>(y2), N, M, ptr<T>(z), threads(N * M));
  });
  return z;
}

Tensor stick_breaking_dy(const Tensor& grad_z, const Tensor& y2, const Tensor& z) {
  const int64_t N = y2.size(0), M = y2.size(1);
  const Tensor g = input(as_shape(grad_z, {N, M + 1}), "grad_z", y2, {N, M + 1});
  const Tensor z2 = input(as_shape(z, {N, M + 1}), "z", y2, {N, M + 1});
  Tensor dy = output({N, M}, y2);
  by_dtype(y2, [&](auto tag) {
    using T = decltype(tag);
    stick_breaking_backward<T>(ptr<T>(g), ptr<T>(y2), ptr<T>(z2), N, M, ptr<T>(dy), threads(N * M));
  });
  return dy;
}

// z = stick_breaking(y), as op.py's StickBreaking: y and z saved (z, an
// output, with its graph), so that a create_graph=True backward is the
// closed form in torch ops, differentiable in y and through z.
struct StickBreaking : torch::autograd::Function<StickBreaking> {
  static Tensor forward(AutogradContext* ctx, const Tensor& y) {
    const auto [N, M] = stick_breaking_rows(y);
    const Tensor y2 = input(as_shape(y, {N, M}), "y", y, {N, M});
    std::vector<int64_t> shape = y.sizes().vec();
    shape.back() = M + 1;
    Tensor z = shaped(stick_breaking_z(y2), shape);
    ctx->save_for_backward({y2, z, y});
    return z;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &y2 = saved[0], &z = saved[1], &y = saved[2];
    if (double_backward()) {  // the oracle's stick_breaking_grad
      const int64_t M = y.size(-1);
      const Tensor g = grads[0] * z;
      const Tensor R = g.flip(-1).cumsum(-1).flip(-1).narrow(-1, 0, M);  // sum_{i >= j} g_i
      const Tensor x = y - at::arange(M, 0, -1, y.options()).log();
      return {g.narrow(-1, 0, M) - at::sigmoid(x) * R};
    }
    return {stick_breaking_dy(grads[0], y2, z).view(y.sizes())};
  }
};

Tensor stick_breaking(const Tensor& y) { return StickBreaking::apply(y); }

Tensor graph_stick_breaking(const Tensor& y) {
  check_float(y, "y");
  TORCH_CHECK(y.dim() == 2 && y.size(1) >= 1, "y: expected a 2-d (N, M) tensor with M >= 1, got shape ", y.sizes());
  return stick_breaking_z(input(y, "y", y, y.sizes()));
}

Tensor graph_stick_breaking_backward(const Tensor& grad_z, const Tensor& y, const Tensor& z) {
  check_float(y, "y");
  TORCH_CHECK(y.dim() == 2 && y.size(1) >= 1, "y: expected a 2-d (N, M) tensor with M >= 1, got shape ", y.sizes());
  return stick_breaking_dy(grad_z, input(y, "y", y, y.sizes()), z);
}

}  // namespace

FASTVAE_TORCH_OP(stick_breaking, "(Tensor y) -> Tensor", "(Tensor grad_z, Tensor y, Tensor z) -> Tensor")

}  // namespace fastvae::torch_ops
