// Python bindings of sample_normal_tril (checked buffers -> sample_normal_tril.cpp).
#include "buffers.h"
#include "optional_buffers.h"
#include "sample_normal_tril.h"

namespace fastvae::bind {
namespace {

template <typename T>
void sample_normal_tril_forward_t(py::array mu, py::array scale_tril, uint64_t seed, py::array z,
                                  py::array kl, int n_threads) {
  const auto [K, N, L] = sample_dims(mu, z);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* s = checked<T>(scale_tril, "scale_tril", {N, L, L}, false);
  T* zp = checked<T>(z, "z", {K, N, L}, true);
  T* klp = checked<T>(kl, "kl", {N}, true);
  py::gil_scoped_release release;
  fastvae::sample_normal_tril_forward<T>(m, s, seed, K, N, L, zp, klp, n_threads);
}

template <typename T>
void sample_normal_tril_backward_t(py::object dz, py::object dkl, py::array mu, py::array scale_tril,
                                   uint64_t seed, py::array dmu, py::array dscale_tril,
                                   int n_threads) {
  check_2d(mu, "mu");
  const int64_t N = mu.shape(0), L = mu.shape(1);
  // grad_z or grad_kl None: that output has no gradient (K = 0 without grad_z)
  int64_t K = 0;
  if (!dz.is_none()) {
    if (!py::isinstance<py::array>(dz) || py::reinterpret_borrow<py::array>(dz).ndim() != 3) {
      throw py::value_error("grad_z: expected a 3-d (K, N, L) array or None");
    }
    K = py::reinterpret_borrow<py::array>(dz).shape(0);
  }
  py::array dz_holder, dkl_holder;  // keep the arrays alive while their pointers are used
  const T* g = checked_or_null<T>(dz, dz_holder, "grad_z", {K, N, L}, false);
  const T* gk = checked_or_null<T>(dkl, dkl_holder, "grad_kl", {N}, false);
  const T* m = checked<T>(mu, "mu", {N, L}, false);
  const T* s = checked<T>(scale_tril, "scale_tril", {N, L, L}, false);
  T* dm = checked<T>(dmu, "dmu", {N, L}, true);
  T* ds = checked<T>(dscale_tril, "dscale_tril", {N, L, L}, true);
  py::gil_scoped_release release;
  fastvae::sample_normal_tril_backward<T>(g, gk, m, s, seed, K, N, L, dm, ds, n_threads);
}

}  // namespace

void bind_sample_normal_tril(py::module_& m) {
  m.def("sample_normal_tril_forward", [](py::array mu, py::array scale_tril, uint64_t seed,
                                         py::array z, py::array kl, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { sample_normal_tril_forward_t<decltype(t)>(mu, scale_tril, seed, z, kl, n_threads); });
  }, py::arg("mu"), py::arg("scale_tril"), py::arg("seed"), py::arg("z"), py::arg("kl"),
     py::arg("n_threads"));

  m.def("sample_normal_tril_backward", [](py::object dz, py::object dkl, py::array mu,
                                          py::array scale_tril, uint64_t seed, py::array dmu,
                                          py::array dscale_tril, int n_threads) {
    check_threads(n_threads);
    by_dtype(mu, [&](auto t) { sample_normal_tril_backward_t<decltype(t)>(dz, dkl, mu, scale_tril, seed, dmu,
                                                                          dscale_tril, n_threads); });
  }, py::arg("grad_z").none(true), py::arg("grad_kl").none(true), py::arg("mu"), py::arg("scale_tril"),
     py::arg("seed"),
     py::arg("dmu"), py::arg("dscale_tril"), py::arg("n_threads"));
}

FASTVAE_BIND(bind_sample_normal_tril);

}  // namespace fastvae::bind
