// pybind11 boundary of the cpp backend. Tensors arrive as NumPy views of
// torch's CPU memory (zero copy); every array is checked here for dtype,
// C-contiguity, writability and exact extents before a raw pointer is taken,
// so the kernels in ops.h never see an out-of-bounds shape. The GIL is
// released while they run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(a.shape(d));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks `a` against dtype T, C-contiguity and the exact shape, and returns its data.
template <typename T>
T* checked(py::array& a, const char* name, const std::vector<int64_t>& shape, bool writable) {
  if (!a.dtype().is(py::dtype::of<T>())) {
    throw py::type_error(std::string(name) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + ": array must be C-contiguous");
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
    return static_cast<T*>(a.mutable_data());
  }
  return const_cast<T*>(static_cast<const T*>(a.data()));
}

void check_2d(const py::array& a, const char* name) {
  if (a.ndim() != 2) {
    throw py::value_error(std::string(name) + ": expected a 2-d (N, L) array, got shape " +
                          shape_str(a));
  }
}

int check_threads(int n_threads) {
  if (n_threads < 1) throw py::value_error("n_threads must be >= 1");
  return n_threads;
}

template <typename T>
void sample_normal_forward_t(py::array mu, py::array logvar, uint64_t seed, py::array z,
                             py::array kl, int n_threads) {
  check_2d(mu, "mu");
  const int64_t N = mu.shape(0), L = mu.shape(1);
  if (z.ndim() != 3) throw py::value_error("z: expected a 3-d (K, N, L) array, got " + shape_str(z));
  const int64_t K = z.shape(0);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* lv = checked<T>(logvar, "logvar", {N, L}, false);
  T* zp = checked<T>(z, "z", {K, N, L}, true);
  T* klp = checked<T>(kl, "kl", {N}, true);
  py::gil_scoped_release release;
  fastvae::sample_normal_forward<T>(m, lv, seed, K, N, L, zp, klp, n_threads);
}

template <typename T>
void sample_normal_backward_t(py::array dz, py::array dkl, py::array mu, py::array logvar,
                              uint64_t seed, py::array dmu, py::array dlogvar, int n_threads) {
  check_2d(mu, "mu");
  const int64_t N = mu.shape(0), L = mu.shape(1);
  if (dz.ndim() != 3) throw py::value_error("dz: expected a 3-d (K, N, L) array, got " + shape_str(dz));
  const int64_t K = dz.shape(0);
  const T* g = checked<T>(dz, "dz", {K, N, L}, false);
  const T* gk = checked<T>(dkl, "dkl", {N}, false);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* lv = checked<T>(logvar, "logvar", {N, L}, false);
  T* dm = checked<T>(dmu, "dmu", {N, L}, true);
  T* dlv = checked<T>(dlogvar, "dlogvar", {N, L}, true);
  py::gil_scoped_release release;
  fastvae::sample_normal_backward<T>(g, gk, m, lv, seed, K, N, L, dm, dlv, n_threads);
}

template <typename T>
void kl_normal_forward_t(py::array mu, py::array logvar, py::object prior_mu,
                         py::object prior_logvar, py::array kl, int n_threads) {
  check_2d(mu, "mu");
  const int64_t N = mu.shape(0), L = mu.shape(1);
  if (prior_mu.is_none() != prior_logvar.is_none()) {
    throw py::value_error("prior_mu and prior_logvar must both be given or both be None");
  }
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* lv = checked<T>(logvar, "logvar", {N, L}, false);
  const T* pm = nullptr;
  const T* plv = nullptr;
  py::array pm_a, plv_a;  // keep the arrays alive while their pointers are used
  if (!prior_mu.is_none()) {
    pm_a = prior_mu.cast<py::array>();
    plv_a = prior_logvar.cast<py::array>();
    pm = checked<T>(pm_a, "prior_mu", {N, L}, false);
    plv = checked<T>(plv_a, "prior_logvar", {N, L}, false);
  }
  T* klp = checked<T>(kl, "kl", {N}, true);
  py::gil_scoped_release release;
  fastvae::kl_normal_forward<T>(m, lv, pm, plv, N, L, klp, n_threads);
}

template <typename T>
void kl_normal_backward_t(py::array dkl, py::array mu, py::array logvar, py::object prior_mu,
                          py::object prior_logvar, py::array dmu, py::array dlogvar,
                          py::object dprior_mu, py::object dprior_logvar, int n_threads) {
  check_2d(mu, "mu");
  const int64_t N = mu.shape(0), L = mu.shape(1);
  const bool has_prior = !prior_mu.is_none();
  if (has_prior != !prior_logvar.is_none() || has_prior != !dprior_mu.is_none() ||
      has_prior != !dprior_logvar.is_none()) {
    throw py::value_error("prior_mu, prior_logvar, dprior_mu, dprior_logvar: all or none");
  }
  const T* gk = checked<T>(dkl, "dkl", {N}, false);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* lv = checked<T>(logvar, "logvar", {N, L}, false);
  T* dm = checked<T>(dmu, "dmu", {N, L}, true);
  T* dlv = checked<T>(dlogvar, "dlogvar", {N, L}, true);
  const T* pm = nullptr;
  const T* plv = nullptr;
  T* dpm = nullptr;
  T* dplv = nullptr;
  py::array pm_a, plv_a, dpm_a, dplv_a;
  if (has_prior) {
    pm_a = prior_mu.cast<py::array>();
    plv_a = prior_logvar.cast<py::array>();
    dpm_a = dprior_mu.cast<py::array>();
    dplv_a = dprior_logvar.cast<py::array>();
    pm = checked<T>(pm_a, "prior_mu", {N, L}, false);
    plv = checked<T>(plv_a, "prior_logvar", {N, L}, false);
    dpm = checked<T>(dpm_a, "dprior_mu", {N, L}, true);
    dplv = checked<T>(dplv_a, "dprior_logvar", {N, L}, true);
  }
  py::gil_scoped_release release;
  fastvae::kl_normal_backward<T>(gk, m, lv, pm, plv, N, L, dm, dlv, dpm, dplv, n_threads);
}

// Calls the float32 or float64 instantiation according to the dtype of `first`.
template <typename F32, typename F64>
auto by_dtype(const py::array& first, F32 f32, F64 f64) {
  if (first.dtype().is(py::dtype::of<float>())) return f32();
  if (first.dtype().is(py::dtype::of<double>())) return f64();
  throw py::type_error("cpp backend supports float32 and float64, got " +
                       std::string(py::str(first.dtype())));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastvae cpp backend (OpenMP kernels behind checked NumPy buffers)";

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

  m.def("sample_normal_forward", [](py::array mu, py::array logvar, uint64_t seed, py::array z,
                                    py::array kl, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&] { sample_normal_forward_t<float>(mu, logvar, seed, z, kl, n_threads); },
             [&] { sample_normal_forward_t<double>(mu, logvar, seed, z, kl, n_threads); });
  }, py::arg("mu"), py::arg("logvar"), py::arg("seed"), py::arg("z"), py::arg("kl"),
     py::arg("n_threads"));

  m.def("sample_normal_backward", [](py::array dz, py::array dkl, py::array mu,
                                     py::array logvar, uint64_t seed, py::array dmu,
                                     py::array dlogvar, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu,
             [&] { sample_normal_backward_t<float>(dz, dkl, mu, logvar, seed, dmu, dlogvar, n_threads); },
             [&] { sample_normal_backward_t<double>(dz, dkl, mu, logvar, seed, dmu, dlogvar, n_threads); });
  }, py::arg("dz"), py::arg("dkl"), py::arg("mu"), py::arg("logvar"), py::arg("seed"),
     py::arg("dmu"), py::arg("dlogvar"), py::arg("n_threads"));

  m.def("kl_normal_forward", [](py::array mu, py::array logvar, py::object prior_mu,
                                py::object prior_logvar, py::array kl, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&] { kl_normal_forward_t<float>(mu, logvar, prior_mu, prior_logvar, kl, n_threads); },
             [&] { kl_normal_forward_t<double>(mu, logvar, prior_mu, prior_logvar, kl, n_threads); });
  }, py::arg("mu"), py::arg("logvar"), py::arg("prior_mu").none(true),
     py::arg("prior_logvar").none(true), py::arg("kl"), py::arg("n_threads"));

  m.def("kl_normal_backward", [](py::array dkl, py::array mu, py::array logvar,
                                 py::object prior_mu, py::object prior_logvar, py::array dmu,
                                 py::array dlogvar, py::object dprior_mu,
                                 py::object dprior_logvar, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu,
             [&] { kl_normal_backward_t<float>(dkl, mu, logvar, prior_mu, prior_logvar, dmu,
                                               dlogvar, dprior_mu, dprior_logvar, n_threads); },
             [&] { kl_normal_backward_t<double>(dkl, mu, logvar, prior_mu, prior_logvar, dmu,
                                                dlogvar, dprior_mu, dprior_logvar, n_threads); });
  }, py::arg("dkl"), py::arg("mu"), py::arg("logvar"), py::arg("prior_mu").none(true),
     py::arg("prior_logvar").none(true), py::arg("dmu"), py::arg("dlogvar"),
     py::arg("dprior_mu").none(true), py::arg("dprior_logvar").none(true),
     py::arg("n_threads"));
}
