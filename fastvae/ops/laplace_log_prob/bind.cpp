// Python bindings of laplace_log_prob (checked buffers -> laplace_log_prob.cpp).
#include "buffers.h"
#include "laplace_log_prob.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

template <typename T>
void laplace_forward_t(py::array x, py::array loc, py::array s, py::array out, int n_threads) {
  const auto in = loc_scale_inputs<T>(x, loc, s, "loc", "log_scale");
  const auto [K, P, D] = in.dims;
  T* op = checked<T>(out, "out", {K, P}, true);
  py::gil_scoped_release release;
  laplace_log_prob_forward<T>(in.x, in.decoder, in.scale, ScaleLayout(in.layout), K, P, D, op, n_threads);
}

template <typename T>
void laplace_backward_t(py::array g, py::array x, py::array loc, py::array s, py::object dx,
                        py::array dloc, py::object ds, int n_threads) {
  const auto in = loc_scale_inputs<T>(x, loc, s, "loc", "log_scale");
  const auto [K, P, D] = in.dims;
  const T* gp = checked<T>(g, "grad_out", {K, P}, false);
  const auto grads = loc_scale_grads(in, dx, dloc, ds, "dloc", "dlog_scale");
  py::gil_scoped_release release;
  laplace_log_prob_backward<T>(gp, in.x, in.decoder, in.scale, ScaleLayout(in.layout), K, P, D, grads.dx, grads.dloc,
                               grads.dscale, n_threads);
}

}  // namespace

void bind_laplace_log_prob(py::module_& m) {
  m.def("laplace_log_prob_forward", [](py::array x, py::array loc, py::array s, py::array out, int n_threads) {
    check_threads(n_threads);
    by_dtype(loc, [&](auto t) { laplace_forward_t<decltype(t)>(x, loc, s, out, n_threads); });
  }, py::arg("x"), py::arg("loc"), py::arg("log_scale"), py::arg("out"), py::arg("n_threads"));

  m.def("laplace_log_prob_backward", [](py::array g, py::array x, py::array loc, py::array s, py::object dx,
                                        py::array dloc, py::object ds, int n_threads) {
    check_threads(n_threads);
    by_dtype(loc, [&](auto t) { laplace_backward_t<decltype(t)>(g, x, loc, s, dx, dloc, ds, n_threads); });
  }, py::arg("grad_out"), py::arg("x"), py::arg("loc"), py::arg("log_scale"), py::arg("dx").none(true),
     py::arg("dloc"), py::arg("dlog_scale").none(true), py::arg("n_threads"));
}

FASTVAE_BIND(bind_laplace_log_prob);

}  // namespace fastvae::bind
