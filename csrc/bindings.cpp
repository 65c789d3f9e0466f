// The extension module fastvae._C: every binding file registers its bind
// function with FASTVAE_BIND (buffers.h), and this calls them all. The
// checked NumPy-buffer boundary every binding goes through is in buffers.h;
// the GIL is released while kernels run.
#include "buffers.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastvae cpp backend (OpenMP kernels behind checked NumPy buffers)";
  py::register_exception<fastvae::bind::MisalignedArray>(m, "MisalignedArrayError", PyExc_ValueError);
  for (const auto bind : fastvae::bind::bind_functions()) bind(m);
}
