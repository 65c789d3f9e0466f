// Python bindings of stick_breaking (checked buffers -> stick_breaking.cpp).
#include "buffers.h"
#include "stick_breaking.h"

namespace fastvae::bind {
namespace {

// M of y (N, M): the simplex has M + 1 components, so M >= 1.
int64_t stick_breaking_width(const py::array& y) {
  check_2d(y, "y");
  if (y.shape(1) < 1) throw py::value_error("y: expected a last dimension of at least 1, got shape " + shape_str(y));
  return y.shape(1);
}

template <typename T>
void stick_breaking_forward_t(py::array y, py::array z, int n_threads) {
  const int64_t M = stick_breaking_width(y), N = y.shape(0);
  const T* yp = checked<T>(y, "y", {N, M}, false);
  T* zp = checked<T>(z, "z", {N, M + 1}, true);
  py::gil_scoped_release release;
  fastvae::stick_breaking_forward<T>(yp, N, M, zp, n_threads);
}

template <typename T>
void stick_breaking_backward_t(py::array grad_z, py::array y, py::array z, py::array dy, int n_threads) {
  const int64_t M = stick_breaking_width(y), N = y.shape(0);
  const T* gp = checked<T>(grad_z, "grad_z", {N, M + 1}, false);
  const T* yp = checked<T>(y, "y", {N, M}, false);
  const T* zp = checked<T>(z, "z", {N, M + 1}, false);
  T* dyp = checked<T>(dy, "dy", {N, M}, true);
  py::gil_scoped_release release;
  fastvae::stick_breaking_backward<T>(gp, yp, zp, N, M, dyp, n_threads);
}

}  // namespace

void bind_stick_breaking(py::module_& m) {
  m.def("stick_breaking_forward", [](py::array y, py::array z, int n_threads) {
    check_threads(n_threads);
    by_dtype(y, [&](auto t) { stick_breaking_forward_t<decltype(t)>(y, z, n_threads); });
  }, py::arg("y"), py::arg("z"), py::arg("n_threads"));

  m.def("stick_breaking_backward", [](py::array grad_z, py::array y, py::array z, py::array dy, int n_threads) {
    check_threads(n_threads);
    by_dtype(y, [&](auto t) { stick_breaking_backward_t<decltype(t)>(grad_z, y, z, dy, n_threads); });
  }, py::arg("grad_z"), py::arg("y"), py::arg("z"), py::arg("dy"), py::arg("n_threads"));
}

FASTVAE_BIND(bind_stick_breaking);

}  // namespace fastvae::bind
