// The checked boundary between NumPy buffers and raw pointers, shared by the
// per-op binding files. Tensors arrive as NumPy views of torch's CPU memory
// (zero copy); every array is checked for dtype, C-contiguity, writability and
// exact extents before a raw pointer is taken, so the kernels never see an
// out-of-bounds shape.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "half.h"
#include "outputs.h"


namespace fastvae::bind {

namespace py = pybind11;


inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(a.shape(d));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// The NumPy dtype of a kernel storage type: bfloat16 travels as its uint16
// bits (NumPy has none), float16 is NumPy's own.
template <typename T>
py::dtype numpy_dtype() { return py::dtype::of<T>(); }
template <>
inline py::dtype numpy_dtype<bf16>() { return py::dtype("uint16"); }
template <>
inline py::dtype numpy_dtype<fp16>() { return py::dtype("float16"); }

// Raised for an array whose data is not aligned to its element type (a view
// of a byte buffer at an odd offset, e.g. torch.frombuffer(buf, offset=1)):
// the kernels' loads assume alignment. A ValueError in Python
// (fastvae._C.MisalignedArrayError); the front end copies such inputs.
struct MisalignedArray : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Checks `a` against dtype T, C-contiguity, alignment, writability and the
// exact shape, and returns its data. Outputs must not overlap inputs (the kernels mark
// their pointers __restrict): the front end always passes fresh outputs, and
// direct callers of fastvae._C must do the same.
template <typename T>
T* checked(py::array& a, const char* name, const std::vector<int64_t>& shape, bool writable) {
  if (!a.dtype().is(numpy_dtype<T>())) {
    throw py::type_error(std::string(name) + ": expected dtype " +
                         std::string(py::str(numpy_dtype<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + ": array must be C-contiguous");
  }
  if (reinterpret_cast<uintptr_t>(a.data()) % alignof(T) != 0) {
    throw MisalignedArray(std::string(name) + ": data is not aligned to " +
                          std::to_string(alignof(T)) + " bytes; pass an aligned copy");
  }
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = a.shape(d) == shape[d];
  if (!ok) {
    std::string want = "(";
    for (size_t d = 0; d < shape.size(); ++d) want += (d ? ", " : "") + std::to_string(shape[d]);
    throw py::value_error(std::string(name) + ": expected shape " + want + "), got " +
                          shape_str(a));
  }
  if (writable) {
    if (!a.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
    advise_huge_pages(a.mutable_data(), size_t(a.nbytes()));
    return static_cast<T*>(a.mutable_data());
  }
  return const_cast<T*>(static_cast<const T*>(a.data()));
}

inline void check_2d(const py::array& a, const char* name) {
  if (a.ndim() != 2) {
    throw py::value_error(std::string(name) + ": expected a 2-d (N, L) array, got shape " +
                          shape_str(a));
  }
}

// The extents of a sampler's rows mu (N, L) and its samples z (K, N, L):
// mu's rank checked and K read from z (whose other extents its buffer's check
// compares).
struct SampleDims {
  int64_t K, N, L;
};

inline SampleDims sample_dims(const py::array& mu, const py::array& z) {
  check_2d(mu, "mu");
  if (z.ndim() != 3) throw py::value_error("z: expected a 3-d (K, N, L) array, got " + shape_str(z));
  return {z.shape(0), mu.shape(0), mu.shape(1)};
}

inline int check_threads(int n_threads) {
  if (n_threads < 1) throw py::value_error("n_threads must be >= 1");
  return n_threads;
}

// Whether `a` holds half-precision storage: float16, or bfloat16 as uint16 bits.
inline bool is_fp16(const py::array& a) { return a.dtype().is(numpy_dtype<fp16>()); }
inline bool is_bf16(const py::array& a) { return a.dtype().is(numpy_dtype<bf16>()); }

// Calls the float32 or float64 instantiation according to the dtype of `first`.
template <typename F32, typename F64>
auto by_dtype(const py::array& first, F32 f32, F64 f64) {
  if (first.dtype().is(py::dtype::of<float>())) return f32();
  if (first.dtype().is(py::dtype::of<double>())) return f64();
  throw py::type_error("cpp backend supports float32 and float64, got " +
                       std::string(py::str(first.dtype())));
}

// The same with one generic function: f(float{}) or f(double{}), so that a
// binding names its kernel's arguments once (f<decltype(t)>(...)).
template <typename F>
auto by_dtype(const py::array& first, F f) {
  return by_dtype(first, [&] { return f(float{}); }, [&] { return f(double{}); });
}

// The compute type T and storage type H of a likelihood's decoder output.
template <typename T, typename H>
struct Storage {
  using compute = T;
  using stored = H;
};

// Calls f(Storage<T, H>{}) for the dtype of `logits`: half-precision logits
// (H = bf16 / fp16) are read as they are and computed in float32 (T), other
// calls are float32 or float64 throughout.
template <typename F>
void by_storage_dtype(const py::array& logits, F f) {
  if (is_bf16(logits)) return f(Storage<float, bf16>{});
  if (is_fp16(logits)) return f(Storage<float, fp16>{});
  by_dtype(logits, [&] { f(Storage<float, float>{}); }, [&] { f(Storage<double, double>{}); });
}

// The extents of a likelihood's decoder output (K, P, D), the layout of
// fastvae/_likelihood_layout.py (gaussian_log_prob's mean, the Bernoulli
// likelihoods' logits); `name` names it in a rank error.
struct DecoderDims {
  int64_t K, P, D;
};

inline DecoderDims decoder_dims(const py::array& mean, const char* name = "mean") {
  if (mean.ndim() != 3) {
    throw py::value_error(std::string(name) + ": expected a 3-d (K, P, D) array, got " + shape_str(mean));
  }
  return {mean.shape(0), mean.shape(1), mean.shape(2)};
}

// The checked inputs of a decoder likelihood's kernels: x (P, D), of the
// compute type T, and the decoder output (K, P, D) of storage type H, named
// `name` (and `dims_name` in a rank error).
template <typename T, typename H>
struct DecoderInputs {
  DecoderDims dims;
  const T* x;
  const H* decoder;
};

template <typename T, typename H = T>
DecoderInputs<T, H> decoder_inputs(py::array& x, py::array& decoder, const char* name, const char* dims_name) {
  const DecoderDims s = decoder_dims(decoder, dims_name);
  return {s, checked<T>(x, "x", {s.P, s.D}, false), checked<H>(decoder, name, {s.K, s.P, s.D}, false)};
}

// The layout of a location-scale likelihood's scale parameter (gaussian_log_prob's
// var_param, laplace_log_prob's log_scale) from its rank, as the op's layout enum
// numbers it: 0 per element (K, P, D), 1 per x row (P, D), 2 per dimension (D,);
// `shape` receives the extents it must have.
inline int scale_param_layout(const py::array& s, const DecoderDims& dims, std::vector<int64_t>& shape,
                              const char* name) {
  switch (s.ndim()) {
    case 3: shape = {dims.K, dims.P, dims.D}; return 0;
    case 2: shape = {dims.P, dims.D}; return 1;
    case 1: shape = {dims.D}; return 2;
    default:
      throw py::value_error(std::string(name) + ": expected (K, P, D), (P, D) or (D,), got " + shape_str(s));
  }
}


// Each binding file registers its bind function when the library loads
// (FASTVAE_BIND(bind_x) after its definition), and PYBIND11_MODULE in
// bindings.cpp calls every registered one: a new op adds no line elsewhere.
using BindFn = void (*)(py::module_&);

inline std::vector<BindFn>& bind_functions() {
  static std::vector<BindFn> functions;  // a function-local static: safe from init-order issues
  return functions;
}

struct BindRegistration {
  explicit BindRegistration(BindFn fn) { bind_functions().push_back(fn); }
};

#define FASTVAE_BIND(fn) static const ::fastvae::bind::BindRegistration fastvae_bind_##fn(fn)

}  // namespace fastvae::bind
