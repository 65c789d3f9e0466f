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

// The inputs of a location-scale likelihood's kernels: x and the decoder
// output (decoder_inputs), and the output's scale parameter in the layout its
// rank gives (scale_param_layout), of storage type V.
template <typename T, typename H, typename V>
struct LocScaleInputs : DecoderInputs<T, H> {
  int layout;
  std::vector<int64_t> scale_shape;
  const V* scale;
};

template <typename T, typename H = T, typename V = T>
LocScaleInputs<T, H, V> loc_scale_inputs(py::array& x, py::array& loc, py::array& scale, const char* loc_name,
                                         const char* scale_name) {
  LocScaleInputs<T, H, V> in{decoder_inputs<T, H>(x, loc, loc_name, loc_name), 0, {}, nullptr};
  in.layout = scale_param_layout(scale, in.dims, in.scale_shape, scale_name);
  in.scale = checked<V>(scale, scale_name, in.scale_shape, false);
  return in;
}

// Their gradients, checked against the inputs': dx (P, D) or None, dloc
// (K, P, D), and dscale (the scale's shape) or None. The holders keep the
// optional arrays alive while their pointers are used.
template <typename T, typename H, typename V>
struct LocScaleGrads {
  py::array dx_holder, dscale_holder;
  T* dx;
  H* dloc;
  V* dscale;
};

template <typename T, typename H, typename V>
LocScaleGrads<T, H, V> loc_scale_grads(const LocScaleInputs<T, H, V>& in, const py::object& dx, py::array& dloc,
                                       const py::object& dscale, const char* dloc_name, const char* dscale_name) {
  const auto [K, P, D] = in.dims;
  LocScaleGrads<T, H, V> grads;
  grads.dx = checked_or_null<T>(dx, grads.dx_holder, "dx", {P, D}, true);
  grads.dloc = checked<H>(dloc, dloc_name, {K, P, D}, true);
  grads.dscale = checked_or_null<V>(dscale, grads.dscale_holder, dscale_name, in.scale_shape, true);
  return grads;
}

}  // namespace fastvae::bind
