// The samplers' shared pybind11 binding: the checks of their per-sample
// gradients, and the whole binding of a family sampler of two (N, L)
// parameters (sample_location_scale, sample_positive), whose kernels take the
// family as an int and differ only in their transform and density. Each op's
// bind.cpp names its kernels, its parameters and its families.
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

// The names a family sampler is bound with: its kernels' prefix, its two
// parameters and their gradients, and its families in index order (for the
// error that names them).
struct FamilySamplerNames {
  const char* op;  // "sample_location_scale": binds <op>_forward and <op>_backward
  const char* p0;
  const char* p1;
  const char* dp0;
  const char* dp1;
  int families;
  const char* family_names;  // "uniform, laplace, ..."
};

// A family sampler's C++ kernels in one dtype, which trust every extent checked here.
template <typename T>
struct FamilyKernels {
  // (p0, p1, seed, family, offset0, sample_stride, row_stride, K, N, L, z, log_q or null, n_threads)
  void (*forward)(const T*, const T*, uint64_t, int, uint64_t, uint64_t, uint64_t, int64_t, int64_t, int64_t, T*,
                  T*, int);
  // (dz or null, dlog_q or null, p0, p1, seed, family, stop_score, K, N, L, dp0, dp1, n_threads)
  void (*backward)(const T*, const T*, const T*, const T*, uint64_t, int, bool, int64_t, int64_t, int64_t, T*, T*,
                   int);
};

template <typename T>
void family_forward(const FamilySamplerNames& names, const FamilyKernels<T>& kernels, py::array p0, py::array p1,
                    uint64_t seed, int family, uint64_t offset0, uint64_t sample_stride, uint64_t row_stride,
                    py::array z, py::object log_q, int n_threads) {
  check_2d(p0, names.p0);
  const int64_t N = p0.shape(0), L = p0.shape(1);
  if (z.ndim() != 3) throw py::value_error("z: expected a 3-d (K, N, L) array, got " + shape_str(z));
  const int64_t K = z.shape(0);
  const T* a = checked<T>(p0, names.p0, {N, L}, false);
  const T* b = checked<T>(p1, names.p1, {N, L}, false);
  T* zp = checked<T>(z, "z", {K, N, L}, true);
  py::array q_holder;  // keeps the array alive while its pointer is used
  T* qp = checked_or_null<T>(log_q, q_holder, "log_q", {K, N}, true);
  py::gil_scoped_release release;
  kernels.forward(a, b, seed, family, offset0, sample_stride, row_stride, K, N, L, zp, qp, n_threads);
}

template <typename T>
void family_backward(const FamilySamplerNames& names, const FamilyKernels<T>& kernels, py::object dz, py::object dq,
                     py::array p0, py::array p1, uint64_t seed, int family, bool stop_score, py::array dp0,
                     py::array dp1, int n_threads) {
  check_2d(p0, names.p0);
  const int64_t N = p0.shape(0), L = p0.shape(1);
  const int64_t K = gradient_samples(dz, dq, 3, "(K, N, L)", "grad_log_q");
  py::array dz_holder, dq_holder;
  const T* g = checked_or_null<T>(dz, dz_holder, "grad_z", {K, N, L}, false);
  const T* gq = checked_or_null<T>(dq, dq_holder, "grad_log_q", {K, N}, false);
  const T* a = checked<T>(p0, names.p0, {N, L}, false);
  const T* b = checked<T>(p1, names.p1, {N, L}, false);
  T* da = checked<T>(dp0, names.dp0, {N, L}, true);
  T* db = checked<T>(dp1, names.dp1, {N, L}, true);
  py::gil_scoped_release release;
  kernels.backward(g, gq, a, b, seed, family, stop_score, K, N, L, da, db, n_threads);
}

// Binds <op>_forward and <op>_backward, which check the family index and the
// buffers by name and run the kernels of the arrays' dtype.
inline void bind_family_sampler(py::module_& m, const FamilySamplerNames& names, FamilyKernels<float> f32,
                                FamilyKernels<double> f64) {
  auto check_family = [names](int family) {
    if (family < 0 || family >= names.families) {
      throw py::value_error("family: expected 0-" + std::to_string(names.families - 1) + " (" +
                            names.family_names + "), got " + std::to_string(family));
    }
  };

  m.def((std::string(names.op) + "_forward").c_str(),
        [=](py::array p0, py::array p1, uint64_t seed, int family, uint64_t offset0, uint64_t sample_stride,
            uint64_t row_stride, py::array z, py::object log_q, int n_threads) {
          check_threads(n_threads);
          check_family(family);
          by_dtype(p0,
                   [&] { family_forward(names, f32, p0, p1, seed, family, offset0, sample_stride, row_stride, z,
                                        log_q, n_threads); },
                   [&] { family_forward(names, f64, p0, p1, seed, family, offset0, sample_stride, row_stride, z,
                                        log_q, n_threads); });
        },
        py::arg(names.p0), py::arg(names.p1), py::arg("seed"), py::arg("family"), py::arg("offset0"),
        py::arg("sample_stride"), py::arg("row_stride"), py::arg("z"), py::arg("log_q").none(true),
        py::arg("n_threads"));

  m.def((std::string(names.op) + "_backward").c_str(),
        [=](py::object dz, py::object dq, py::array p0, py::array p1, uint64_t seed, int family, bool stop_score,
            py::array dp0, py::array dp1, int n_threads) {
          check_threads(n_threads);
          check_family(family);
          by_dtype(p0,
                   [&] { family_backward(names, f32, dz, dq, p0, p1, seed, family, stop_score, dp0, dp1,
                                         n_threads); },
                   [&] { family_backward(names, f64, dz, dq, p0, p1, seed, family, stop_score, dp0, dp1,
                                         n_threads); });
        },
        py::arg("grad_z").none(true), py::arg("grad_log_q").none(true), py::arg(names.p0), py::arg(names.p1),
        py::arg("seed"), py::arg("family"), py::arg("stop_score"), py::arg(names.dp0), py::arg(names.dp1),
        py::arg("n_threads"));
}

}  // namespace fastvae::bind
