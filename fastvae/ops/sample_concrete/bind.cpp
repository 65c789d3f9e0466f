// Python bindings of sample_concrete (checked buffers -> sample_concrete.cpp).
#include "sample_concrete.h"
#include "sampler_bind.h"

namespace fastvae::bind {
namespace {

void check_3d(const py::array& a, const char* name) {
  if (a.ndim() != 3) throw py::value_error(std::string(name) + ": expected a 3-d (N, L, C) array, got " + shape_str(a));
}

template <typename T>
void concrete_forward_t(py::array logits, py::array temperature, uint64_t seed, bool hard, uint64_t offset0,
                        uint64_t sample_stride, uint64_t row_stride, py::array z, py::object log_q, py::object log_p,
                        py::object kl, int n_threads) {
  check_3d(logits, "logits");
  const int64_t N = logits.shape(0), L = logits.shape(1), C = logits.shape(2);
  if (z.ndim() != 4) throw py::value_error("z: expected a 4-d (K, N, L, C) array, got " + shape_str(z));
  const int64_t K = z.shape(0);
  const T* a = checked<T>(logits, "logits", {N, L, C}, false);
  const T* lam = checked<T>(temperature, "temperature", {N, L}, false);
  T* zp = checked<T>(z, "z", {K, N, L, C}, true);
  py::array q_holder;
  T* qp = checked_or_null<T>(log_q, q_holder, "log_q", {K, N}, true);
  py::array lp_holder, kl_holder;
  const T* lp = checked_or_null<T>(log_p, lp_holder, "log_p", {L, C}, false);
  T* klp = checked_or_null<T>(kl, kl_holder, "kl", {N}, true);
  if ((lp == nullptr) != (klp == nullptr)) throw py::value_error("log_p and kl: give both or neither");
  py::gil_scoped_release release;
  fastvae::sample_concrete_forward<T>(a, lam, seed, hard, offset0, sample_stride, row_stride, K, N, L, C, zp, qp, lp,
                                      klp, n_threads);
}

template <typename T>
void concrete_backward_t(py::object dz, py::object dq, py::array logits, py::array temperature, uint64_t seed,
                         bool stop_score, py::array dlogits, py::object dkl, py::object log_p, int n_threads) {
  check_3d(logits, "logits");
  const int64_t N = logits.shape(0), L = logits.shape(1), C = logits.shape(2);
  const int64_t K = gradient_samples(dz, dq, 4, "(K, N, L, C)", "grad_log_q");
  py::array dz_holder, dq_holder;
  const T* g = checked_or_null<T>(dz, dz_holder, "grad_z", {K, N, L, C}, false);
  const T* gq = checked_or_null<T>(dq, dq_holder, "grad_log_q", {K, N}, false);
  const T* a = checked<T>(logits, "logits", {N, L, C}, false);
  const T* lam = checked<T>(temperature, "temperature", {N, L}, false);
  T* d = checked<T>(dlogits, "dlogits", {N, L, C}, true);
  py::array dkl_holder, lp_holder;
  const T* gk = checked_or_null<T>(dkl, dkl_holder, "grad_kl", {N}, false);
  const T* lp = checked_or_null<T>(log_p, lp_holder, "log_p", {L, C}, false);
  if ((gk == nullptr) != (lp == nullptr)) throw py::value_error("grad_kl and log_p: give both or neither");
  py::gil_scoped_release release;
  fastvae::sample_concrete_backward<T>(g, gq, a, lam, seed, stop_score, K, N, L, C, d, gk, lp, n_threads);
}

}  // namespace

void bind_sample_concrete(py::module_& m) {
  m.def("sample_concrete_forward", [](py::array logits, py::array temperature, uint64_t seed, bool hard,
                                      uint64_t offset0, uint64_t sample_stride, uint64_t row_stride, py::array z,
                                      py::object log_q, py::object log_p, py::object kl, int n_threads) {
    check_threads(n_threads);
    by_dtype(logits, [&](auto t) { concrete_forward_t<decltype(t)>(logits, temperature, seed, hard, offset0,
                                                                   sample_stride, row_stride, z, log_q, log_p, kl,
                                                                   n_threads); });
  }, py::arg("logits"), py::arg("temperature"), py::arg("seed"), py::arg("hard"), py::arg("offset0"),
     py::arg("sample_stride"), py::arg("row_stride"), py::arg("z"), py::arg("log_q").none(true),
     py::arg("log_p").none(true), py::arg("kl").none(true), py::arg("n_threads"));

  m.def("sample_concrete_backward", [](py::object dz, py::object dq, py::array logits, py::array temperature,
                                       uint64_t seed, bool stop_score, py::array dlogits, py::object dkl,
                                       py::object log_p, int n_threads) {
    check_threads(n_threads);
    by_dtype(logits, [&](auto t) { concrete_backward_t<decltype(t)>(dz, dq, logits, temperature, seed, stop_score,
                                                                    dlogits, dkl, log_p, n_threads); });
  }, py::arg("grad_z").none(true), py::arg("grad_log_q").none(true), py::arg("logits"), py::arg("temperature"),
     py::arg("seed"), py::arg("stop_score"), py::arg("dlogits"), py::arg("grad_kl").none(true),
     py::arg("log_p").none(true), py::arg("n_threads"));
}

FASTVAE_BIND(bind_sample_concrete);

}  // namespace fastvae::bind
