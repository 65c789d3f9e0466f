// Python bindings of laplace_log_prob (checked buffers -> laplace_log_prob.cpp).
#include "buffers.h"
#include "laplace_log_prob.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

// The log-scale's layout follows from its rank: (K, P, D), (P, D) or (D,).
ScaleLayout laplace_scale_layout(const py::array& s, const DecoderDims& dims, std::vector<int64_t>& shape) {
  return static_cast<ScaleLayout>(scale_param_layout(s, dims, shape, "log_scale"));
}

template <typename T>
void laplace_forward_t(py::array x, py::array loc, py::array s, py::array out, int n_threads) {
  const DecoderDims dims = decoder_dims(loc);
  std::vector<int64_t> s_shape;
  const ScaleLayout layout = laplace_scale_layout(s, dims, s_shape);
  const T* xp = checked<T>(x, "x", {dims.P, dims.D}, false);
  const T* lp = checked<T>(loc, "loc", {dims.K, dims.P, dims.D}, false);
  const T* sp = checked<T>(s, "log_scale", s_shape, false);
  T* op = checked<T>(out, "out", {dims.K, dims.P}, true);
  py::gil_scoped_release release;
  laplace_log_prob_forward<T>(xp, lp, sp, layout, dims.K, dims.P, dims.D, op, n_threads);
}

template <typename T>
void laplace_backward_t(py::array g, py::array x, py::array loc, py::array s, py::object dx,
                        py::array dloc, py::object ds, int n_threads) {
  const DecoderDims dims = decoder_dims(loc);
  std::vector<int64_t> s_shape;
  const ScaleLayout layout = laplace_scale_layout(s, dims, s_shape);
  const T* gp = checked<T>(g, "grad_out", {dims.K, dims.P}, false);
  const T* xp = checked<T>(x, "x", {dims.P, dims.D}, false);
  const T* lp = checked<T>(loc, "loc", {dims.K, dims.P, dims.D}, false);
  const T* sp = checked<T>(s, "log_scale", s_shape, false);
  py::array dx_holder;
  T* dxp = checked_or_null<T>(dx, dx_holder, "dx", {dims.P, dims.D}, true);
  T* dlp = checked<T>(dloc, "dloc", {dims.K, dims.P, dims.D}, true);
  py::array ds_holder;
  T* dsp = checked_or_null<T>(ds, ds_holder, "dlog_scale", s_shape, true);
  py::gil_scoped_release release;
  laplace_log_prob_backward<T>(gp, xp, lp, sp, layout, dims.K, dims.P, dims.D, dxp, dlp, dsp, n_threads);
}

}  // namespace

void bind_laplace_log_prob(py::module_& m) {
  m.def("laplace_log_prob_forward", [](py::array x, py::array loc, py::array s, py::array out, int n_threads) {
    check_threads(n_threads);
    by_dtype(loc, [&] { laplace_forward_t<float>(x, loc, s, out, n_threads); },
             [&] { laplace_forward_t<double>(x, loc, s, out, n_threads); });
  }, py::arg("x"), py::arg("loc"), py::arg("log_scale"), py::arg("out"), py::arg("n_threads"));

  m.def("laplace_log_prob_backward", [](py::array g, py::array x, py::array loc, py::array s, py::object dx,
                                        py::array dloc, py::object ds, int n_threads) {
    check_threads(n_threads);
    by_dtype(loc, [&] { laplace_backward_t<float>(g, x, loc, s, dx, dloc, ds, n_threads); },
             [&] { laplace_backward_t<double>(g, x, loc, s, dx, dloc, ds, n_threads); });
  }, py::arg("grad_out"), py::arg("x"), py::arg("loc"), py::arg("log_scale"), py::arg("dx").none(true),
     py::arg("dloc"), py::arg("dlog_scale").none(true), py::arg("n_threads"));
}

FASTVAE_BIND(bind_laplace_log_prob);

}  // namespace fastvae::bind
