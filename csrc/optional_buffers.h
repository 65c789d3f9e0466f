// Optional arrays at the checked NumPy boundary (buffers.h): None, or an array
// that passes the same checks as a required one. Used by the bindings whose
// kernels take null pointers for outputs or inputs that are not wanted.
#pragma once

#include "buffers.h"

namespace fastvae::bind {

// nullptr for None; otherwise `keep` holds the array (so the pointer stays
// valid) and it is checked like checked<T>(). Anything but a NumPy array is
// refused rather than converted, since a converted copy would swallow writes.
template <typename T>
T* checked_or_null(const py::object& obj, py::array& keep, const char* name,
                   const std::vector<int64_t>& shape, bool writable) {
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + ": expected a NumPy array or None");
  }
  keep = py::reinterpret_borrow<py::array>(obj);
  return checked<T>(keep, name, shape, writable);
}

}  // namespace fastvae::bind
