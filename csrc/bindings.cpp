// The extension module fastvae._C: every binding file registers its bind
// function with FASTVAE_BIND (buffers.h), and this calls them all. The
// checked NumPy-buffer boundary every binding goes through is in buffers.h;
// the GIL is released while kernels run.
#include "buffers.h"
#include "ops.h"
#include "outputs.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastvae cpp backend (OpenMP kernels behind checked NumPy buffers)";
  py::register_exception<fastvae::bind::MisalignedArray>(m, "MisalignedArrayError", PyExc_ValueError);
  m.attr("MIN_WORK_PER_THREAD") = fastvae::kMinWorkPerThread;
  // whether torch_ops.cpp (the eager CPU operators, fastvae_cpp::*) is in this build
#ifdef FASTVAE_TORCH_OPS
  m.attr("HAS_TORCH_OPS") = true;
#else
  m.attr("HAS_TORCH_OPS") = false;
#endif
  m.def("_set_poison_outputs", [](bool on) { fastvae::poison_outputs = on; }, py::arg("on"),
        "Tests only: fill the torch operators' outputs with NaN before their kernels run.");
  for (const auto bind : fastvae::bind::bind_functions()) bind(m);
}
