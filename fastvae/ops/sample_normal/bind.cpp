// Python bindings of sample_normal (checked buffers -> sample_normal.cpp).
#include "sample_normal.h"
#include "sampler_bind.h"

namespace fastvae::bind {
namespace {

template <typename T>
void sample_normal_forward_t(py::array mu, py::array logvar, uint64_t seed, uint64_t offset0,
                             uint64_t sample_stride, uint64_t row_stride, py::array z,
                             py::array kl, py::object log_ratio, int n_threads) {
  const auto [K, N, L] = sample_dims(mu, z);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* lv = checked<T>(logvar, "logvar", {N, L}, false);
  T* zp = checked<T>(z, "z", {K, N, L}, true);
  T* klp = checked<T>(kl, "kl", {N}, true);
  py::array ratio_holder;  // keeps the array alive while its pointer is used
  T* rp = checked_or_null<T>(log_ratio, ratio_holder, "log_ratio", {K, N}, true);
  py::gil_scoped_release release;
  fastvae::sample_normal_forward<T>(m, lv, seed, offset0, sample_stride, row_stride, K, N, L,
                                    zp, klp, rp, n_threads);
}

template <typename T>
void sample_normal_backward_t(py::object dz, py::object dkl, py::object dratio, py::array mu,
                              py::array logvar, uint64_t seed, bool stop_score, py::array dmu,
                              py::array dlogvar, int n_threads) {
  check_2d(mu, "mu");
  const int64_t N = mu.shape(0), L = mu.shape(1);
  // K from whichever per-sample gradient is given (none: only the KL's terms)
  const int64_t K = gradient_samples(dz, dratio, 3, "(K, N, L)", "grad_log_ratio");
  py::array dz_holder, dkl_holder, dratio_holder;  // keep the arrays alive while their pointers are used
  const T* g = checked_or_null<T>(dz, dz_holder, "grad_z", {K, N, L}, false);
  const T* gk = checked_or_null<T>(dkl, dkl_holder, "grad_kl", {N}, false);
  const T* gr = checked_or_null<T>(dratio, dratio_holder, "grad_log_ratio", {K, N}, false);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* lv = checked<T>(logvar, "logvar", {N, L}, false);
  T* dm = checked<T>(dmu, "dmu", {N, L}, true);
  T* dlv = checked<T>(dlogvar, "dlogvar", {N, L}, true);
  py::gil_scoped_release release;
  fastvae::sample_normal_backward<T>(g, gk, gr, m, lv, seed, stop_score, K, N, L, dm, dlv, n_threads);
}

}  // namespace

void bind_sample_normal(py::module_& m) {
  m.def("sample_normal_forward", [](py::array mu, py::array logvar, uint64_t seed,
                                    uint64_t offset0, uint64_t sample_stride, uint64_t row_stride,
                                    py::array z, py::array kl, py::object log_ratio, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { sample_normal_forward_t<decltype(t)>(mu, logvar, seed, offset0, sample_stride,
                                                                    row_stride, z, kl, log_ratio, n_threads); });
  }, py::arg("mu"), py::arg("logvar"), py::arg("seed"), py::arg("offset0"),
     py::arg("sample_stride"), py::arg("row_stride"), py::arg("z"), py::arg("kl"),
     py::arg("log_ratio").none(true), py::arg("n_threads"));

  m.def("sample_normal_backward", [](py::object dz, py::object dkl, py::object dratio, py::array mu,
                                     py::array logvar, uint64_t seed, bool stop_score, py::array dmu,
                                     py::array dlogvar, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { sample_normal_backward_t<decltype(t)>(dz, dkl, dratio, mu, logvar, seed, stop_score, dmu,
                                                                     dlogvar, n_threads); });
  }, py::arg("grad_z").none(true), py::arg("grad_kl").none(true), py::arg("grad_log_ratio").none(true),
     py::arg("mu"), py::arg("logvar"), py::arg("seed"), py::arg("stop_score"), py::arg("dmu"),
     py::arg("dlogvar"), py::arg("n_threads"));
}

FASTVAE_BIND(bind_sample_normal);

}  // namespace fastvae::bind
