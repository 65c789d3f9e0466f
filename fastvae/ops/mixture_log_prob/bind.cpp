// Python bindings of mixture_log_prob (checked buffers -> mixture_log_prob.cpp).
#include "mixture_log_prob.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

// (N, U, L) from z (N, L) and means (U, L); U >= 1.
void mixture_shape(const py::array& z, const py::array& means, int64_t& N, int64_t& U, int64_t& L) {
  if (means.ndim() != 2) {
    throw py::value_error("means: expected a 2-d (U, L) array, got shape " + shape_str(means));
  }
  U = means.shape(0);
  L = means.shape(1);
  if (U < 1) throw py::value_error("means: a mixture needs at least one component, got shape " + shape_str(means));
  if (z.ndim() != 2) throw py::value_error("z: expected a 2-d (N, L) array, got shape " + shape_str(z));
  N = z.shape(0);
}

template <typename T>
void mixture_log_prob_forward_t(py::array z, py::array means, py::array logvars,
                                const py::object& logits, py::array out, int n_threads) {
  int64_t N, U, L;
  mixture_shape(z, means, N, U, L);
  const T* zp = checked<T>(z, "z", {N, L}, false);
  const T* m = checked<T>(means, "means", {U, L}, false);
  const T* lv = checked<T>(logvars, "logvars", {U, L}, false);
  py::array logits_a;
  const T* lg = checked_or_null<T>(logits, logits_a, "logits", {U}, false);
  T* o = checked<T>(out, "out", {N}, true);
  py::gil_scoped_release release;
  fastvae::mixture_log_prob_forward<T>(zp, m, lv, lg, N, U, L, o, n_threads);
}

template <typename T>
void mixture_log_prob_backward_t(py::array g, py::array z, py::array means, py::array logvars,
                                 const py::object& logits, py::array out, const py::object& dz,
                                 const py::object& dmeans, const py::object& dlogvars,
                                 const py::object& dlogits, int n_threads) {
  int64_t N, U, L;
  mixture_shape(z, means, N, U, L);
  const T* gp = checked<T>(g, "grad_out", {N}, false);
  const T* zp = checked<T>(z, "z", {N, L}, false);
  const T* m = checked<T>(means, "means", {U, L}, false);
  const T* lv = checked<T>(logvars, "logvars", {U, L}, false);
  py::array logits_a, dz_a, dm_a, dlv_a, dlg_a;
  const T* lg = checked_or_null<T>(logits, logits_a, "logits", {U}, false);
  const T* op = checked<T>(out, "out", {N}, false);
  T* dzp = checked_or_null<T>(dz, dz_a, "dz", {N, L}, true);
  T* dm = checked_or_null<T>(dmeans, dm_a, "dmeans", {U, L}, true);
  T* dlv = checked_or_null<T>(dlogvars, dlv_a, "dlogvars", {U, L}, true);
  T* dlg = checked_or_null<T>(dlogits, dlg_a, "dlogits", {U}, true);
  if (dlg != nullptr && lg == nullptr) {
    throw py::value_error("dlogits needs logits: equal weights (logits None) have no gradient");
  }
  py::gil_scoped_release release;
  fastvae::mixture_log_prob_backward<T>(gp, zp, m, lv, lg, op, N, U, L, dzp, dm, dlv, dlg, n_threads);
}

}  // namespace

void bind_mixture_log_prob(py::module_& m) {
  m.def("mixture_log_prob_forward", [](py::array z, py::array means, py::array logvars,
                                       py::object logits, py::array out, int n_threads) {
    check_threads(n_threads);
    by_dtype(means, [&](auto t) { mixture_log_prob_forward_t<decltype(t)>(z, means, logvars, logits, out,
                                                                          n_threads); });
  }, py::arg("z"), py::arg("means"), py::arg("logvars"), py::arg("logits").none(true), py::arg("out"),
     py::arg("n_threads"));

  m.def("mixture_log_prob_backward", [](py::array g, py::array z, py::array means, py::array logvars,
                                        py::object logits, py::array out, py::object dz,
                                        py::object dmeans, py::object dlogvars, py::object dlogits,
                                        int n_threads) {
    check_threads(n_threads);
    by_dtype(means, [&](auto t) { mixture_log_prob_backward_t<decltype(t)>(g, z, means, logvars, logits, out, dz,
                                                                           dmeans, dlogvars, dlogits, n_threads); });
  }, py::arg("grad_out"), py::arg("z"), py::arg("means"), py::arg("logvars"), py::arg("logits").none(true),
     py::arg("out"), py::arg("dz").none(true), py::arg("dmeans").none(true), py::arg("dlogvars").none(true),
     py::arg("dlogits").none(true), py::arg("n_threads"));
}

FASTVAE_BIND(bind_mixture_log_prob);

}  // namespace fastvae::bind
