// Python bindings of bernoulli_log_prob and continuous_bernoulli_log_prob
// (checked buffers -> bernoulli_likelihood.cpp).
#include <string>

#include "bernoulli_likelihood.h"
#include "buffers.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

// bernoulli_log_prob and continuous_bernoulli_log_prob take the same buffers:
// `forward` and `backward` call the op's kernels (generic over T and H), and
// `dims_name` names the logits in a rank error (bernoulli_log_prob's has
// always said "mean", the name gaussian_log_prob's binding gives its own).
template <typename Forward, typename Backward>
void bind_bernoulli_kind(py::module_& m, const std::string& op, const char* dims_name, Forward forward,
                         Backward backward) {
  m.def((op + "_forward").c_str(), [=](py::array x, py::array logits, py::array out, int n_threads) {
    check_threads(n_threads);
    // half-precision logits with float32 x and out: read as they are
    by_storage_dtype(logits, [&](auto storage) {
      using T = typename decltype(storage)::compute;
      const auto in = decoder_inputs<T, typename decltype(storage)::stored>(x, logits, "logits", dims_name);
      const auto [K, P, D] = in.dims;
      T* o = checked<T>(out, "out", {K, P}, true);
      py::gil_scoped_release release;
      forward(in.x, in.decoder, K, P, D, o, n_threads);
    });
  }, py::arg("x"), py::arg("logits"), py::arg("out"), py::arg("n_threads"));

  m.def((op + "_backward").c_str(), [=](py::array g, py::array x, py::array logits, py::object dx,
                                        py::array dlogits, int n_threads) {
    check_threads(n_threads);
    by_storage_dtype(logits, [&](auto storage) {
      using T = typename decltype(storage)::compute;
      using H = typename decltype(storage)::stored;
      const auto in = decoder_inputs<T, H>(x, logits, "logits", dims_name);
      const auto [K, P, D] = in.dims;
      const T* gp = checked<T>(g, "grad_out", {K, P}, false);
      py::array dx_holder;
      T* dxp = checked_or_null<T>(dx, dx_holder, "dx", {P, D}, true);
      H* dlp = checked<H>(dlogits, "dlogits", {K, P, D}, true);
      py::gil_scoped_release release;
      backward(gp, in.x, in.decoder, K, P, D, dxp, dlp, n_threads);
    });
  }, py::arg("grad_out"), py::arg("x"), py::arg("logits"), py::arg("dx").none(true),
     py::arg("dlogits"), py::arg("n_threads"));
}

}  // namespace

void bind_bernoulli_log_prob(py::module_& m) {
  bind_bernoulli_kind(m, "bernoulli_log_prob", "mean",
                      [](auto... a) { bernoulli_log_prob_forward(a...); },
                      [](auto... a) { bernoulli_log_prob_backward(a...); });
}

void bind_continuous_bernoulli_log_prob(py::module_& m) {
  bind_bernoulli_kind(m, "continuous_bernoulli_log_prob", "logits",
                      [](auto... a) { continuous_bernoulli_log_prob_forward(a...); },
                      [](auto... a) { continuous_bernoulli_log_prob_backward(a...); });
}

FASTVAE_BIND(bind_bernoulli_log_prob);
FASTVAE_BIND(bind_continuous_bernoulli_log_prob);

}  // namespace fastvae::bind
