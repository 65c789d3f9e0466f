// Python bindings of gaussian_log_prob (checked buffers ->
// gaussian_log_prob.cpp).
#include <cmath>
#include <limits>

#include "buffers.h"
#include "gaussian_log_prob.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

template <typename T>
void check_delta(double delta) {
  if (!valid_delta<T>(delta)) {
    throw py::value_error("delta must be finite and at least the smallest normal number of the "
                          "dtype, got " + std::to_string(delta));
  }
}

template <typename T, typename H = T, typename V = T>
void gaussian_forward_t(py::array x, py::array mean, py::array v, bool softplus, double delta,
                        py::array out, int n_threads) {
  check_delta<T>(delta);
  const auto in = loc_scale_inputs<T, H, V>(x, mean, v, "mean", "var_param");
  const auto [K, P, D] = in.dims;
  T* op = checked<T>(out, "out", {K, P}, true);
  py::gil_scoped_release release;
  gaussian_log_prob_forward<T>(in.x, in.decoder, in.scale, VarLayout(in.layout), softplus, delta, K, P, D, op,
                               n_threads);
}

template <typename T, typename H = T, typename V = T>
void gaussian_backward_t(py::array g, py::array x, py::array mean, py::array v, bool softplus,
                         double delta, py::object dx, py::array dmean, py::object dv,
                         int n_threads) {
  check_delta<T>(delta);
  const auto in = loc_scale_inputs<T, H, V>(x, mean, v, "mean", "var_param");
  const auto [K, P, D] = in.dims;
  const T* gp = checked<T>(g, "grad_out", {K, P}, false);
  const auto grads = loc_scale_grads(in, dx, dmean, dv, "dmean", "dvar_param");
  py::gil_scoped_release release;
  gaussian_log_prob_backward<T>(gp, in.x, in.decoder, in.scale, VarLayout(in.layout), softplus, delta, K, P, D,
                                grads.dx, grads.dloc, grads.dscale, n_threads);
}

}  // namespace

void bind_gaussian_log_prob(py::module_& m) {
  m.def("gaussian_log_prob_forward", [](py::array x, py::array mean, py::array v, bool softplus,
                                        double delta, py::array out, int n_threads) {
    check_threads(n_threads);
    // a half-precision mean (and per-element v of its dtype) with float32 x, out
    // and shared v: read as they are
    const bool element = v.ndim() == 3;
    if (is_bf16(mean) && element) return gaussian_forward_t<float, bf16, bf16>(x, mean, v, softplus, delta, out, n_threads);
    if (is_bf16(mean)) return gaussian_forward_t<float, bf16, float>(x, mean, v, softplus, delta, out, n_threads);
    if (is_fp16(mean) && element) return gaussian_forward_t<float, fp16, fp16>(x, mean, v, softplus, delta, out, n_threads);
    if (is_fp16(mean)) return gaussian_forward_t<float, fp16, float>(x, mean, v, softplus, delta, out, n_threads);
    by_dtype(mean, [&](auto t) { gaussian_forward_t<decltype(t)>(x, mean, v, softplus, delta, out, n_threads); });
  }, py::arg("x"), py::arg("mean"), py::arg("var_param"), py::arg("softplus_mode"), py::arg("delta"),
     py::arg("out"), py::arg("n_threads"));

  m.def("gaussian_log_prob_backward", [](py::array g, py::array x, py::array mean, py::array v,
                                         bool softplus, double delta, py::object dx,
                                         py::array dmean, py::object dv, int n_threads) {
    check_threads(n_threads);
    const bool element = v.ndim() == 3;
    if (is_bf16(mean) && element) {
      return gaussian_backward_t<float, bf16, bf16>(g, x, mean, v, softplus, delta, dx, dmean, dv, n_threads);
    }
    if (is_bf16(mean)) {
      return gaussian_backward_t<float, bf16, float>(g, x, mean, v, softplus, delta, dx, dmean, dv, n_threads);
    }
    if (is_fp16(mean) && element) {
      return gaussian_backward_t<float, fp16, fp16>(g, x, mean, v, softplus, delta, dx, dmean, dv, n_threads);
    }
    if (is_fp16(mean)) {
      return gaussian_backward_t<float, fp16, float>(g, x, mean, v, softplus, delta, dx, dmean, dv, n_threads);
    }
    by_dtype(mean, [&](auto t) { gaussian_backward_t<decltype(t)>(g, x, mean, v, softplus, delta, dx, dmean, dv,
                                                                  n_threads); });
  }, py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("var_param"), py::arg("softplus_mode"),
     py::arg("delta"), py::arg("dx").none(true), py::arg("dmean"), py::arg("dvar_param").none(true),
     py::arg("n_threads"));
}

FASTVAE_BIND(bind_gaussian_log_prob);

}  // namespace fastvae::bind
