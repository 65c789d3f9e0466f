// Python bindings of sample_normal_kl (checked buffers -> sample_normal_kl.cpp).
#include "buffers.h"
#include "optional_buffers.h"
#include "sample_normal_kl.h"

namespace fastvae::bind {
namespace {

// kl or grad_kl: (N, L) per element or (N,) row sums; true for row sums.
bool group_kl_rows(const py::array& a, const char* name) {
  if (a.ndim() != 1 && a.ndim() != 2) {
    throw py::value_error(std::string(name) + ": expected a 1-d (N,) or 2-d (N, L) array, got " + shape_str(a));
  }
  return a.ndim() == 1;
}

template <typename T>
void sample_normal_kl_forward_t(py::array mu, py::array log_scale, py::array prior_mu, py::array prior_log_scale,
                                uint64_t seed, bool logvar, bool residual, py::array z, py::array kl,
                                int n_threads) {
  check_2d(mu, "mu");
  const int64_t N = mu.shape(0), L = mu.shape(1);
  const bool rows = group_kl_rows(kl, "kl");
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* ls = checked<T>(log_scale, "log_scale", {N, L}, false);
  const T* pm = checked<T>(prior_mu, "prior_mu", {N, L}, false);
  const T* pls = checked<T>(prior_log_scale, "prior_log_scale", {N, L}, false);
  T* zp = checked<T>(z, "z", {N, L}, true);
  T* klp = rows ? checked<T>(kl, "kl", {N}, true) : checked<T>(kl, "kl", {N, L}, true);
  py::gil_scoped_release release;
  fastvae::sample_normal_kl_forward<T>(m, ls, pm, pls, seed, logvar, residual, N, L, zp, klp, rows, n_threads);
}

template <typename T>
void sample_normal_kl_backward_t(py::object dz, py::object dkl, py::array mu, py::array log_scale,
                                 py::array prior_mu, py::array prior_log_scale, uint64_t seed, bool logvar,
                                 bool residual, py::array dmu, py::array dlog_scale, py::array dprior_mu,
                                 py::array dprior_log_scale, int n_threads) {
  check_2d(mu, "mu");
  const int64_t N = mu.shape(0), L = mu.shape(1);
  bool rows = false;
  if (!dkl.is_none()) {
    if (!py::isinstance<py::array>(dkl)) throw py::value_error("grad_kl: expected an array or None");
    rows = group_kl_rows(py::reinterpret_borrow<py::array>(dkl), "grad_kl");
  }
  py::array dz_holder, dkl_holder;  // keep the arrays alive while their pointers are used
  const T* gz = checked_or_null<T>(dz, dz_holder, "grad_z", {N, L}, false);
  const T* gk = rows ? checked_or_null<T>(dkl, dkl_holder, "grad_kl", {N}, false)
                     : checked_or_null<T>(dkl, dkl_holder, "grad_kl", {N, L}, false);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* ls = checked<T>(log_scale, "log_scale", {N, L}, false);
  const T* pm = checked<T>(prior_mu, "prior_mu", {N, L}, false);
  const T* pls = checked<T>(prior_log_scale, "prior_log_scale", {N, L}, false);
  T* dm = checked<T>(dmu, "dmu", {N, L}, true);
  T* dls = checked<T>(dlog_scale, "dlog_scale", {N, L}, true);
  T* dpm = checked<T>(dprior_mu, "dprior_mu", {N, L}, true);
  T* dpls = checked<T>(dprior_log_scale, "dprior_log_scale", {N, L}, true);
  py::gil_scoped_release release;
  fastvae::sample_normal_kl_backward<T>(gz, gk, rows, m, ls, pm, pls, seed, logvar, residual, N, L, dm, dls, dpm,
                                        dpls, n_threads);
}

}  // namespace

void bind_sample_normal_kl(py::module_& m) {
  m.def("sample_normal_kl_forward", [](py::array mu, py::array log_scale, py::array prior_mu,
                                       py::array prior_log_scale, uint64_t seed, bool logvar, bool residual,
                                       py::array z, py::array kl, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { sample_normal_kl_forward_t<decltype(t)>(mu, log_scale, prior_mu, prior_log_scale, seed,
                                                                       logvar, residual, z, kl, n_threads); });
  }, py::arg("mu"), py::arg("log_scale"), py::arg("prior_mu"), py::arg("prior_log_scale"), py::arg("seed"),
     py::arg("logvar"), py::arg("residual"), py::arg("z"), py::arg("kl"), py::arg("n_threads"));

  m.def("sample_normal_kl_backward", [](py::object dz, py::object dkl, py::array mu, py::array log_scale,
                                        py::array prior_mu, py::array prior_log_scale, uint64_t seed, bool logvar,
                                        bool residual, py::array dmu, py::array dlog_scale, py::array dprior_mu,
                                        py::array dprior_log_scale, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { sample_normal_kl_backward_t<decltype(t)>(dz, dkl, mu, log_scale, prior_mu,
                                                                        prior_log_scale, seed, logvar, residual, dmu,
                                                                        dlog_scale, dprior_mu, dprior_log_scale,
                                                                        n_threads); });
  }, py::arg("grad_z").none(true), py::arg("grad_kl").none(true), py::arg("mu"), py::arg("log_scale"),
     py::arg("prior_mu"), py::arg("prior_log_scale"), py::arg("seed"), py::arg("logvar"), py::arg("residual"),
     py::arg("dmu"), py::arg("dlog_scale"), py::arg("dprior_mu"), py::arg("dprior_log_scale"),
     py::arg("n_threads"));
}

FASTVAE_BIND(bind_sample_normal_kl);

}  // namespace fastvae::bind
