// Python bindings of continuous_bernoulli_log_prob (checked buffers ->
// continuous_bernoulli_log_prob.cpp).
#include "buffers.h"
#include "continuous_bernoulli_log_prob.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

struct Dims {
  int64_t K, P, D;
};

Dims logits_dims(const py::array& logits) {
  if (logits.ndim() != 3) {
    throw py::value_error("logits: expected a 3-d (K, P, D) array, got " + shape_str(logits));
  }
  return {logits.shape(0), logits.shape(1), logits.shape(2)};
}

template <typename T, typename H = T>
void forward_t(py::array x, py::array logits, py::array out, int n_threads) {
  const Dims s = logits_dims(logits);
  const T* xp = checked<T>(x, "x", {s.P, s.D}, false);
  const H* lp = checked<H>(logits, "logits", {s.K, s.P, s.D}, false);
  T* op = checked<T>(out, "out", {s.K, s.P}, true);
  py::gil_scoped_release release;
  continuous_bernoulli_log_prob_forward<T>(xp, lp, s.K, s.P, s.D, op, n_threads);
}

template <typename T, typename H = T>
void backward_t(py::array g, py::array x, py::array logits, py::object dx, py::array dlogits,
                int n_threads) {
  const Dims s = logits_dims(logits);
  const T* gp = checked<T>(g, "grad_out", {s.K, s.P}, false);
  const T* xp = checked<T>(x, "x", {s.P, s.D}, false);
  const H* lp = checked<H>(logits, "logits", {s.K, s.P, s.D}, false);
  py::array dx_holder;
  T* dxp = checked_or_null<T>(dx, dx_holder, "dx", {s.P, s.D}, true);
  H* dlp = checked<H>(dlogits, "dlogits", {s.K, s.P, s.D}, true);
  py::gil_scoped_release release;
  continuous_bernoulli_log_prob_backward<T>(gp, xp, lp, s.K, s.P, s.D, dxp, dlp, n_threads);
}

}  // namespace

void bind_continuous_bernoulli_log_prob(py::module_& m) {
  m.def("continuous_bernoulli_log_prob_forward", [](py::array x, py::array logits, py::array out,
                                                    int n_threads) {
    check_threads(n_threads);
    // half-precision logits with float32 x and out: read as they are
    if (is_bf16(logits)) return forward_t<float, bf16>(x, logits, out, n_threads);
    if (is_fp16(logits)) return forward_t<float, fp16>(x, logits, out, n_threads);
    by_dtype(logits, [&] { forward_t<float>(x, logits, out, n_threads); },
             [&] { forward_t<double>(x, logits, out, n_threads); });
  }, py::arg("x"), py::arg("logits"), py::arg("out"), py::arg("n_threads"));

  m.def("continuous_bernoulli_log_prob_backward", [](py::array g, py::array x, py::array logits,
                                                     py::object dx, py::array dlogits,
                                                     int n_threads) {
    check_threads(n_threads);
    if (is_bf16(logits)) return backward_t<float, bf16>(g, x, logits, dx, dlogits, n_threads);
    if (is_fp16(logits)) return backward_t<float, fp16>(g, x, logits, dx, dlogits, n_threads);
    by_dtype(logits, [&] { backward_t<float>(g, x, logits, dx, dlogits, n_threads); },
             [&] { backward_t<double>(g, x, logits, dx, dlogits, n_threads); });
  }, py::arg("grad_out"), py::arg("x"), py::arg("logits"), py::arg("dx").none(true),
     py::arg("dlogits"), py::arg("n_threads"));
}

FASTVAE_BIND(bind_continuous_bernoulli_log_prob);

}  // namespace fastvae::bind
