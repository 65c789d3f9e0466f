// Python bindings of the raw noise stream, for the bit-exactness tests.
#include "buffers.h"
#include "ops.h"

namespace fastvae::bind {

void bind_philox(py::module_& m) {
  m.def("randn_fill", [](uint64_t seed, uint64_t offset0, py::array out) {
    if (out.ndim() != 1) throw py::value_error("out: expected a 1-d array, got " + shape_str(out));
    const int64_t n = out.shape(0);
    by_dtype(out,
             [&] { float* p = checked<float>(out, "out", {n}, true);
                   py::gil_scoped_release r; fastvae::randn_fill(seed, offset0, n, p); },
             [&] { double* p = checked<double>(out, "out", {n}, true);
                   py::gil_scoped_release r; fastvae::randn_fill(seed, offset0, n, p); });
  }, py::arg("seed"), py::arg("offset0"), py::arg("out"),
     "out[i] = the standard normal at Philox offset offset0 + i (the tl.randn stream).");

  m.def("uniform_fill", [](uint64_t seed, uint64_t offset0, py::array u1, py::array u2) {
    if (u1.ndim() != 1) throw py::value_error("u1: expected a 1-d array, got " + shape_str(u1));
    const int64_t n = u1.shape(0);
    float* a = checked<float>(u1, "u1", {n}, true);
    float* b = checked<float>(u2, "u2", {n}, true);
    py::gil_scoped_release r;
    fastvae::uniform_fill(seed, offset0, n, a, b);
  }, py::arg("seed"), py::arg("offset0"), py::arg("u1"), py::arg("u2"),
     "The two float32 uniforms behind each normal of randn_fill.");
}

}  // namespace fastvae::bind
