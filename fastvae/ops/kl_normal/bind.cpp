// Python bindings of kl_normal (checked buffers -> kl_normal.cpp).
#include "buffers.h"
#include "kl_normal.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

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
  py::array pm_a, plv_a;  // keep the arrays alive while their pointers are used
  const T* pm = checked_or_null<T>(prior_mu, pm_a, "prior_mu", {N, L}, false);
  const T* plv = checked_or_null<T>(prior_logvar, plv_a, "prior_logvar", {N, L}, false);
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
  const T* gk = checked<T>(dkl, "grad_kl", {N}, false);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* lv = checked<T>(logvar, "logvar", {N, L}, false);
  T* dm = checked<T>(dmu, "dmu", {N, L}, true);
  T* dlv = checked<T>(dlogvar, "dlogvar", {N, L}, true);
  py::array pm_a, plv_a, dpm_a, dplv_a;  // keep the arrays alive while their pointers are used
  const T* pm = checked_or_null<T>(prior_mu, pm_a, "prior_mu", {N, L}, false);
  const T* plv = checked_or_null<T>(prior_logvar, plv_a, "prior_logvar", {N, L}, false);
  T* dpm = checked_or_null<T>(dprior_mu, dpm_a, "dprior_mu", {N, L}, true);
  T* dplv = checked_or_null<T>(dprior_logvar, dplv_a, "dprior_logvar", {N, L}, true);
  py::gil_scoped_release release;
  fastvae::kl_normal_backward<T>(gk, m, lv, pm, plv, N, L, dm, dlv, dpm, dplv, n_threads);
}

}  // namespace

void bind_kl_normal(py::module_& m) {
  m.def("kl_normal_forward", [](py::array mu, py::array logvar, py::object prior_mu,
                                py::object prior_logvar, py::array kl, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { kl_normal_forward_t<decltype(t)>(mu, logvar, prior_mu, prior_logvar, kl, n_threads); });
  }, py::arg("mu"), py::arg("logvar"), py::arg("prior_mu").none(true),
     py::arg("prior_logvar").none(true), py::arg("kl"), py::arg("n_threads"));

  m.def("kl_normal_backward", [](py::array dkl, py::array mu, py::array logvar,
                                 py::object prior_mu, py::object prior_logvar, py::array dmu,
                                 py::array dlogvar, py::object dprior_mu,
                                 py::object dprior_logvar, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { kl_normal_backward_t<decltype(t)>(dkl, mu, logvar, prior_mu, prior_logvar, dmu, dlogvar,
                                                                 dprior_mu, dprior_logvar, n_threads); });
  }, py::arg("grad_kl"), py::arg("mu"), py::arg("logvar"), py::arg("prior_mu").none(true),
     py::arg("prior_logvar").none(true), py::arg("dmu"), py::arg("dlogvar"),
     py::arg("dprior_mu").none(true), py::arg("dprior_logvar").none(true),
     py::arg("n_threads"));
}

FASTVAE_BIND(bind_kl_normal);

}  // namespace fastvae::bind
