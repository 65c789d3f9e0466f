// What the samplers' pybind11 bindings share: the checks of their buffers
// (optional ones included) and of their per-sample gradients.
#pragma once

#include <string>

#include "buffers.h"
#include "optional_buffers.h"

namespace fastvae::bind {

// K of a sampler's backward, from whichever per-sample gradient is given:
// grad_z, a z_dims-d array shaped z_shape ("(K, N, L)"), else the per-sample
// row gradient q_name (K, N); 0 with neither (no per-sample term).
inline int64_t gradient_samples(const py::object& dz, const py::object& dq, int z_dims, const char* z_shape,
                                const char* q_name) {
  const py::object& samples = dz.is_none() ? dq : dz;
  if (samples.is_none()) return 0;
  const int dims = dz.is_none() ? 2 : z_dims;
  if (!py::isinstance<py::array>(samples) || py::reinterpret_borrow<py::array>(samples).ndim() != dims) {
    throw py::value_error(dz.is_none() ? std::string(q_name) + ": expected a 2-d (K, N) array or None"
                                       : "grad_z: expected a " + std::to_string(z_dims) + "-d " + z_shape +
                                             " array or None");
  }
  return py::reinterpret_borrow<py::array>(samples).shape(0);
}

}  // namespace fastvae::bind
