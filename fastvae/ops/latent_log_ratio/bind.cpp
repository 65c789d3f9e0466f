// Python bindings of latent_log_ratio (checked buffers -> latent_log_ratio.cpp).
#include "latent_log_ratio.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

template <typename T>
void latent_log_ratio_forward_t(py::array z, py::array mu, py::array logvar, py::array r,
                                int n_threads) {
  const auto [K, N, L] = sample_dims(mu, z);
  const T* zp = checked<T>(z, "z", {K, N, L}, false);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* lv = checked<T>(logvar, "logvar", {N, L}, false);
  T* rp = checked<T>(r, "out", {K, N}, true);
  py::gil_scoped_release release;
  fastvae::latent_log_ratio_forward<T>(zp, m, lv, K, N, L, rp, n_threads);
}

template <typename T>
void latent_log_ratio_backward_t(py::array g, py::array z, py::array mu, py::array logvar,
                                 py::array dz, const py::object& dmu,
                                 const py::object& dlogvar, int n_threads) {
  const auto [K, N, L] = sample_dims(mu, z);
  const T* gp = checked<T>(g, "grad_out", {K, N}, false);
  const T* zp = checked<T>(z, "z", {K, N, L}, false);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* lv = checked<T>(logvar, "logvar", {N, L}, false);
  T* dzp = checked<T>(dz, "dz", {K, N, L}, true);
  py::array dmu_a, dlv_a;
  T* dm = checked_or_null<T>(dmu, dmu_a, "dmu", {N, L}, true);
  T* dlv = checked_or_null<T>(dlogvar, dlv_a, "dlogvar", {N, L}, true);
  if ((dm == nullptr) != (dlv == nullptr)) {
    throw py::value_error("dmu and dlogvar must both be given or both be None");
  }
  py::gil_scoped_release release;
  fastvae::latent_log_ratio_backward<T>(gp, zp, m, lv, K, N, L, dzp, dm, dlv, n_threads);
}

}  // namespace

void bind_latent_log_ratio(py::module_& m) {
  m.def("latent_log_ratio_forward", [](py::array z, py::array mu, py::array logvar, py::array r,
                                       int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { latent_log_ratio_forward_t<decltype(t)>(z, mu, logvar, r, n_threads); });
  }, py::arg("z"), py::arg("mu"), py::arg("logvar"), py::arg("out"), py::arg("n_threads"));

  m.def("latent_log_ratio_backward", [](py::array g, py::array z, py::array mu,
                                        py::array logvar, py::array dz, py::object dmu,
                                        py::object dlogvar, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { latent_log_ratio_backward_t<decltype(t)>(g, z, mu, logvar, dz, dmu, dlogvar,
                                                                        n_threads); });
  }, py::arg("grad_out"), py::arg("z"), py::arg("mu"), py::arg("logvar"), py::arg("dz"),
     py::arg("dmu").none(true), py::arg("dlogvar").none(true), py::arg("n_threads"));
}

FASTVAE_BIND(bind_latent_log_ratio);

}  // namespace fastvae::bind
