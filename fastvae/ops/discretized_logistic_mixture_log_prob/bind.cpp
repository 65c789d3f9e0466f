// Python bindings of discretized_logistic_mixture_log_prob (checked buffers ->
// discretized_logistic_mixture_log_prob.cpp).
#include <string>

#include "discretized_logistic_mixture_log_prob.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

struct DlmShape {
  int64_t K, P, M, C, S;
  bool packed;
};

// The shape from x (P, C, S) and params: (K, P, 10 M, S) when means is None
// (then C = 3), else the logits (K, P, M, S).
DlmShape dlm_shape(const py::array& x, const py::array& params, const py::object& means, int num_bins) {
  if (num_bins < 2 || num_bins > 2001) {
    throw py::value_error("num_bins must be in [2, 2001], got " + std::to_string(num_bins));
  }
  if (x.ndim() != 3) throw py::value_error("x: expected a 3-d (P, C, S) array, got shape " + shape_str(x));
  if (params.ndim() != 4) {
    throw py::value_error("params: expected a 4-d (K, P, rows, S) array, got shape " + shape_str(params));
  }
  DlmShape s{params.shape(0), params.shape(1), params.shape(2), x.shape(1), params.shape(3), means.is_none()};
  if (s.packed) {
    if (s.M % 10 != 0 || s.M == 0) {
      throw py::value_error("params: the packed layout has 10 M rows, M >= 1, got shape " + shape_str(params));
    }
    s.M /= 10;
    if (s.C != 3) throw py::value_error("x: the packed layout is for 3 channels, got shape " + shape_str(x));
  } else if (s.M < 1) {
    throw py::value_error("params: a mixture needs at least one component, got shape " + shape_str(params));
  }
  return s;
}

template <typename T>
void dlm_forward_t(py::array x, py::array params, const py::object& means, const py::object& log_scales,
               int num_bins, py::array out, int n_threads) {
  const DlmShape s = dlm_shape(x, params, means, num_bins);
  const T* xp = checked<T>(x, "x", {s.P, s.C, s.S}, false);
  const T* pp = checked<T>(params, "params", {s.K, s.P, s.packed ? 10 * s.M : s.M, s.S}, false);
  py::array means_a, ls_a;
  const T* mp = checked_or_null<T>(means, means_a, "means", {s.K, s.P, s.M, s.C, s.S}, false);
  const T* lp = checked_or_null<T>(log_scales, ls_a, "log_scales", {s.K, s.P, s.M, s.C, s.S}, false);
  if ((mp == nullptr) != (lp == nullptr)) throw py::value_error("means and log_scales: pass both or neither");
  T* op = checked<T>(out, "out", {s.K, s.P}, true);
  py::gil_scoped_release release;
  discretized_logistic_mixture_log_prob_forward<T>(xp, pp, mp, lp, s.K, s.P, s.M, s.C, s.S, num_bins, op,
                                                   n_threads);
}

template <typename T>
void dlm_backward_t(py::array g, py::array x, py::array params, const py::object& means,
                const py::object& log_scales, int num_bins, py::array dparams, const py::object& dmeans,
                const py::object& dlog_scales, int n_threads) {
  const DlmShape s = dlm_shape(x, params, means, num_bins);
  const std::vector<int64_t> params_shape{s.K, s.P, s.packed ? 10 * s.M : s.M, s.S};
  const std::vector<int64_t> means_shape{s.K, s.P, s.M, s.C, s.S};
  const T* gp = checked<T>(g, "grad_out", {s.K, s.P}, false);
  const T* xp = checked<T>(x, "x", {s.P, s.C, s.S}, false);
  const T* pp = checked<T>(params, "params", params_shape, false);
  py::array means_a, ls_a, dmeans_a, dls_a;
  const T* mp = checked_or_null<T>(means, means_a, "means", means_shape, false);
  const T* lp = checked_or_null<T>(log_scales, ls_a, "log_scales", means_shape, false);
  T* dpp = checked<T>(dparams, "dparams", params_shape, true);
  T* dmp = checked_or_null<T>(dmeans, dmeans_a, "dmeans", means_shape, true);
  T* dlp = checked_or_null<T>(dlog_scales, dls_a, "dlog_scales", means_shape, true);
  // the kernel writes every gradient of the layout: none may be missing
  if ((mp == nullptr) != (lp == nullptr) || (mp == nullptr) != (dmp == nullptr) ||
      (mp == nullptr) != (dlp == nullptr)) {
    throw py::value_error("means, log_scales, dmeans and dlog_scales: pass all four or none (packed params)");
  }
  py::gil_scoped_release release;
  discretized_logistic_mixture_log_prob_backward<T>(gp, xp, pp, mp, lp, s.K, s.P, s.M, s.C, s.S, num_bins, dpp,
                                                    dmp, dlp, n_threads);
}

}  // namespace

void bind_discretized_logistic_mixture_log_prob(py::module_& m) {
  m.def("discretized_logistic_mixture_log_prob_forward",
        [](py::array x, py::array params, py::object means, py::object log_scales, int num_bins, py::array out,
           int n_threads) {
          check_threads(n_threads);
          by_dtype(params, [&](auto t) { dlm_forward_t<decltype(t)>(x, params, means, log_scales, num_bins, out,
                                                                    n_threads); });
        },
        py::arg("x"), py::arg("params"), py::arg("means").none(true), py::arg("log_scales").none(true),
        py::arg("num_bins"), py::arg("out"), py::arg("n_threads"));

  m.def("discretized_logistic_mixture_log_prob_backward",
        [](py::array g, py::array x, py::array params, py::object means, py::object log_scales, int num_bins,
           py::array dparams, py::object dmeans, py::object dlog_scales, int n_threads) {
          check_threads(n_threads);
          by_dtype(params, [&](auto t) { dlm_backward_t<decltype(t)>(g, x, params, means, log_scales, num_bins, dparams,
                                                                     dmeans, dlog_scales, n_threads); });
        },
        py::arg("grad_out"), py::arg("x"), py::arg("params"), py::arg("means").none(true),
        py::arg("log_scales").none(true), py::arg("num_bins"), py::arg("dparams"), py::arg("dmeans").none(true),
        py::arg("dlog_scales").none(true), py::arg("n_threads"));
}

FASTVAE_BIND(bind_discretized_logistic_mixture_log_prob);

}  // namespace fastvae::bind
