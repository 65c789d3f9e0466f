// Python bindings of categorical_log_prob (checked buffers ->
// categorical_log_prob.cpp). Every class index is checked against [0, C)
// here, once per call (P x D reads against K x P x D x C in the kernel), so
// the kernels never read outside a row of logits.
#include <string>

#include "buffers.h"
#include "categorical_log_prob.h"

namespace fastvae::bind {
namespace {

struct ClassDims {
  int64_t K, P, D, C;
};

ClassDims logits_dims(const py::array& logits) {
  if (logits.ndim() != 4 || logits.shape(3) < 1) {
    throw py::value_error("logits: expected a 4-d (K, P, D, C) array with C >= 1, got " +
                          shape_str(logits));
  }
  return {logits.shape(0), logits.shape(1), logits.shape(2), logits.shape(3)};
}

const int64_t* checked_classes(py::array& x, const ClassDims& s) {
  const int64_t* xp = checked<int64_t>(x, "x", {s.P, s.D}, false);
  for (int64_t i = 0; i < s.P * s.D; ++i) {
    if (xp[i] < 0 || xp[i] >= s.C) {
      throw py::value_error("x: class index " + std::to_string(xp[i]) + " at flat position " +
                            std::to_string(i) + " is outside [0, " + std::to_string(s.C) + ")");
    }
  }
  return xp;
}

template <typename T, typename H>
void categorical_forward_t(Storage<T, H>, py::array x, py::array logits, py::array out, int n_threads) {
  const ClassDims s = logits_dims(logits);
  const int64_t* xp = checked_classes(x, s);
  const H* lp = checked<H>(logits, "logits", {s.K, s.P, s.D, s.C}, false);
  T* op = checked<T>(out, "out", {s.K, s.P}, true);
  py::gil_scoped_release release;
  categorical_log_prob_forward<T>(xp, lp, s.K, s.P, s.D, s.C, op, n_threads);
}

template <typename T, typename H>
void categorical_backward_t(Storage<T, H>, py::array g, py::array x, py::array logits, py::array dlogits,
                int n_threads) {
  const ClassDims s = logits_dims(logits);
  const T* gp = checked<T>(g, "grad_out", {s.K, s.P}, false);
  const int64_t* xp = checked_classes(x, s);
  const H* lp = checked<H>(logits, "logits", {s.K, s.P, s.D, s.C}, false);
  H* dlp = checked<H>(dlogits, "dlogits", {s.K, s.P, s.D, s.C}, true);
  py::gil_scoped_release release;
  categorical_log_prob_backward<T>(gp, xp, lp, s.K, s.P, s.D, s.C, dlp, n_threads);
}

}  // namespace

void bind_categorical_log_prob(py::module_& m) {
  m.def("categorical_log_prob_forward", [](py::array x, py::array logits, py::array out,
                                           int n_threads) {
    check_threads(n_threads);
    by_storage_dtype(logits, [&](auto s) { categorical_forward_t(s, x, logits, out, n_threads); });
  }, py::arg("x"), py::arg("logits"), py::arg("out"), py::arg("n_threads"));

  m.def("categorical_log_prob_backward", [](py::array g, py::array x, py::array logits,
                                            py::array dlogits, int n_threads) {
    check_threads(n_threads);
    by_storage_dtype(logits, [&](auto s) { categorical_backward_t(s, g, x, logits, dlogits, n_threads); });
  }, py::arg("grad_out"), py::arg("x"), py::arg("logits"), py::arg("dlogits"), py::arg("n_threads"));
}

FASTVAE_BIND(bind_categorical_log_prob);

}  // namespace fastvae::bind
