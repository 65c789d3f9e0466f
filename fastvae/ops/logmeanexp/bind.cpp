// Python bindings of the importance-weighting kernels (checked buffers ->
// logmeanexp.cpp): logmeanexp_forward, logmeanexp_accumulate, logmeanexp_backward
// and importance_weights_backward.
#include "logmeanexp.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

void check_columns(const py::array& lw, const char* name) {
  if (lw.ndim() != 2) {
    throw py::value_error(std::string(name) + ": expected a 2-d (K, M) array, got shape " +
                          shape_str(lw));
  }
}

template <typename T>
void logmeanexp_forward_t(py::array lw, py::array max, py::array sumexp, const py::object& out,
                          const py::object& ess, int n_threads) {
  check_columns(lw, "lw");
  const int64_t K = lw.shape(0), M = lw.shape(1);
  const T* x = checked<T>(lw, "lw", {K, M}, false);
  T* mx = checked<T>(max, "lw_max", {M}, true);
  T* s = checked<T>(sumexp, "sumexp", {M}, true);
  py::array out_a, ess_a;
  T* o = checked_or_null<T>(out, out_a, "out", {M}, true);
  T* e = checked_or_null<T>(ess, ess_a, "ess", {M}, true);
  py::gil_scoped_release release;
  fastvae::logmeanexp_forward<T>(x, K, M, mx, s, o, e, n_threads);
}

template <typename T>
void logmeanexp_accumulate_t(py::array lw, const py::object& latent, py::array max, py::array sumexp,
                             py::array sq_max, py::array sq_sumexp, bool first, int n_threads) {
  check_columns(lw, "lw");
  const int64_t K = lw.shape(0), M = lw.shape(1);
  const T* x = checked<T>(lw, "lw", {K, M}, false);
  py::array latent_a;
  const T* lat = checked_or_null<T>(latent, latent_a, "latent", {K, M}, false);
  T* mx = checked<T>(max, "lw_max", {M}, true);
  T* s = checked<T>(sumexp, "sumexp", {M}, true);
  T* qm = checked<T>(sq_max, "sq_max", {M}, true);
  T* qs = checked<T>(sq_sumexp, "sq_sumexp", {M}, true);
  py::gil_scoped_release release;
  fastvae::logmeanexp_accumulate<T>(x, lat, K, M, mx, s, qm, qs, first, n_threads);
}

template <typename T>
void logmeanexp_backward_t(py::array lw, py::array max, py::array sumexp, py::array g,
                           const py::object& g_sumexp, const py::object& ess, py::array dlw,
                           int n_threads) {
  check_columns(lw, "lw");
  const int64_t K = lw.shape(0), M = lw.shape(1);
  const T* x = checked<T>(lw, "lw", {K, M}, false);
  const T* mx = checked<T>(max, "lw_max", {M}, false);
  const T* s = checked<T>(sumexp, "sumexp", {M}, false);
  const T* gp = checked<T>(g, "grad_out", {M}, false);
  py::array gs_a, ess_a;
  const T* gs = checked_or_null<T>(g_sumexp, gs_a, "grad_sumexp", {M}, false);
  const T* e = checked_or_null<T>(ess, ess_a, "ess", {M}, false);
  if (gs != nullptr && e != nullptr) {
    throw py::value_error("g_sumexp and ess: at most one of them may be given");
  }
  T* d = checked<T>(dlw, "dlw", {K, M}, true);
  py::gil_scoped_release release;
  fastvae::logmeanexp_backward<T>(x, mx, s, gp, gs, e, K, M, d, n_threads);
}

template <typename T>
void importance_weights_backward_t(py::array gw, py::array w, py::array dlw, int n_threads) {
  check_columns(w, "w");
  const int64_t K = w.shape(0), M = w.shape(1);
  const T* g = checked<T>(gw, "grad_w", {K, M}, false);
  const T* wp = checked<T>(w, "w", {K, M}, false);
  T* d = checked<T>(dlw, "dlw", {K, M}, true);
  py::gil_scoped_release release;
  fastvae::importance_weights_backward<T>(g, wp, K, M, d, n_threads);
}

}  // namespace

void bind_logmeanexp(py::module_& m) {
  m.def("logmeanexp_forward", [](py::array lw, py::array max, py::array sumexp, py::object out,
                                 py::object ess, int n_threads) {
    check_threads(n_threads);
    by_dtype(lw, [&](auto t) { logmeanexp_forward_t<decltype(t)>(lw, max, sumexp, out, ess, n_threads); });
  }, py::arg("lw"), py::arg("lw_max"), py::arg("sumexp"), py::arg("out").none(true),
     py::arg("ess").none(true), py::arg("n_threads"),
     "Column states (max, sumexp) of (K, M) log-weights; out = logmeanexp and ess when given.");

  m.def("logmeanexp_accumulate", [](py::array lw, py::object latent, py::array max,
                                    py::array sumexp, py::array sq_max, py::array sq_sumexp,
                                    bool first, int n_threads) {
    check_threads(n_threads);
    by_dtype(lw, [&](auto t) { logmeanexp_accumulate_t<decltype(t)>(lw, latent, max, sumexp, sq_max, sq_sumexp, first,
                                                                    n_threads); });
  }, py::arg("lw"), py::arg("latent").none(true), py::arg("lw_max"), py::arg("sumexp"),
     py::arg("sq_max"), py::arg("sq_sumexp"), py::arg("first"), py::arg("n_threads"),
     "Running states of lw + latent and of twice that, merged with the chunk's in place.");

  m.def("logmeanexp_backward", [](py::array lw, py::array max, py::array sumexp, py::array g,
                                  py::object g_sumexp, py::object ess, py::array dlw,
                                  int n_threads) {
    check_threads(n_threads);
    by_dtype(lw, [&](auto t) { logmeanexp_backward_t<decltype(t)>(lw, max, sumexp, g, g_sumexp, ess, dlw,
                                                                  n_threads); });
  }, py::arg("lw"), py::arg("lw_max"), py::arg("sumexp"), py::arg("grad_out"),
     py::arg("grad_sumexp").none(true), py::arg("ess").none(true), py::arg("dlw"),
     py::arg("n_threads"),
     "dlw = e * (a + b e), e = exp(lw - max), per-column a, b (see fastvae/ops/logmeanexp/logmeanexp.h).");

  m.def("importance_weights_backward", [](py::array gw, py::array w, py::array dlw,
                                          int n_threads) {
    check_threads(n_threads);
    by_dtype(w, [&](auto t) { importance_weights_backward_t<decltype(t)>(gw, w, dlw, n_threads); });
  }, py::arg("grad_w"), py::arg("w"), py::arg("dlw"), py::arg("n_threads"),
     "Softmax backward over K: dlw = w * (gw - sum_k gw * w).");
}

FASTVAE_BIND(bind_logmeanexp);

}  // namespace fastvae::bind
