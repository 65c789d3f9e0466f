// Python bindings of gaussian_log_prob (checked buffers ->
// gaussian_log_prob.cpp).
#include <cmath>
#include <limits>

#include "buffers.h"
#include "gaussian_log_prob.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

// The variance layout follows from v's rank: (K, P, D), (P, D) or (D,).
VarLayout var_layout(const py::array& v, const DecoderDims& s, std::vector<int64_t>& shape) {
  return static_cast<VarLayout>(scale_param_layout(v, s, shape, "var_param"));
}

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
  const DecoderDims s = decoder_dims(mean);
  std::vector<int64_t> v_shape;
  const VarLayout layout = var_layout(v, s, v_shape);
  const T* xp = checked<T>(x, "x", {s.P, s.D}, false);
  const H* mp = checked<H>(mean, "mean", {s.K, s.P, s.D}, false);
  const V* vp = checked<V>(v, "var_param", v_shape, false);
  T* op = checked<T>(out, "out", {s.K, s.P}, true);
  py::gil_scoped_release release;
  gaussian_log_prob_forward<T>(xp, mp, vp, layout, softplus, delta, s.K, s.P, s.D, op, n_threads);
}

template <typename T, typename H = T, typename V = T>
void gaussian_backward_t(py::array g, py::array x, py::array mean, py::array v, bool softplus,
                         double delta, py::object dx, py::array dmean, py::object dv,
                         int n_threads) {
  check_delta<T>(delta);
  const DecoderDims s = decoder_dims(mean);
  std::vector<int64_t> v_shape;
  const VarLayout layout = var_layout(v, s, v_shape);
  const T* gp = checked<T>(g, "grad_out", {s.K, s.P}, false);
  const T* xp = checked<T>(x, "x", {s.P, s.D}, false);
  const H* mp = checked<H>(mean, "mean", {s.K, s.P, s.D}, false);
  const V* vp = checked<V>(v, "var_param", v_shape, false);
  py::array dx_holder;
  T* dxp = checked_or_null<T>(dx, dx_holder, "dx", {s.P, s.D}, true);
  H* dmp = checked<H>(dmean, "dmean", {s.K, s.P, s.D}, true);
  py::array dv_holder;
  V* dvp = checked_or_null<V>(dv, dv_holder, "dvar_param", v_shape, true);
  py::gil_scoped_release release;
  gaussian_log_prob_backward<T>(gp, xp, mp, vp, layout, softplus, delta, s.K, s.P, s.D, dxp, dmp,
                                dvp, n_threads);
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
    by_dtype(mean, [&] { gaussian_forward_t<float>(x, mean, v, softplus, delta, out, n_threads); },
             [&] { gaussian_forward_t<double>(x, mean, v, softplus, delta, out, n_threads); });
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
    by_dtype(mean,
             [&] { gaussian_backward_t<float>(g, x, mean, v, softplus, delta, dx, dmean, dv, n_threads); },
             [&] { gaussian_backward_t<double>(g, x, mean, v, softplus, delta, dx, dmean, dv, n_threads); });
  }, py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("var_param"), py::arg("softplus_mode"),
     py::arg("delta"), py::arg("dx").none(true), py::arg("dmean"), py::arg("dvar_param").none(true),
     py::arg("n_threads"));
}

FASTVAE_BIND(bind_gaussian_log_prob);

}  // namespace fastvae::bind
