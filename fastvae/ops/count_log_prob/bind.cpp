// Python bindings of poisson_log_prob, negative_binomial_log_prob and
// zinb_log_prob (checked buffers -> count_log_prob.h). float32 or float64
// throughout (the front end casts half-precision inputs to float32).
#include "buffers.h"
#include "count_log_prob.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

// (K, P, D) from log_mean / log_rate; log_theta is (K, P, D) or (D,).
template <typename T>
CountIn<T> count_in(py::array& x, py::array& lm, const char* lm_name, py::array* lt, py::array* zi) {
  const DecoderDims s = decoder_dims(lm, lm_name);
  CountIn<T> in{nullptr, nullptr, nullptr, nullptr, false, s.K, s.P, s.D};
  in.x = checked<T>(x, "x", {s.P, s.D}, false);
  in.lm = checked<T>(lm, lm_name, {s.K, s.P, s.D}, false);
  if (lt) {
    if (lt->ndim() != 1 && lt->ndim() != 3) {
      throw py::value_error("log_theta: expected (K, P, D) or (D,), got " + shape_str(*lt));
    }
    in.theta_dim = lt->ndim() == 1;
    in.lt = in.theta_dim ? checked<T>(*lt, "log_theta", {s.D}, false)
                         : checked<T>(*lt, "log_theta", {s.K, s.P, s.D}, false);
  }
  if (zi) in.zi = checked<T>(*zi, "zi_logits", {s.K, s.P, s.D}, false);
  return in;
}

template <typename T>
std::vector<int64_t> theta_shape(const CountIn<T>& in) {
  return in.theta_dim ? std::vector<int64_t>{in.D} : std::vector<int64_t>{in.K, in.P, in.D};
}

}  // namespace

void bind_count_log_prob(py::module_& m) {
  m.def("poisson_log_prob_forward", [](py::array x, py::array log_rate, py::array out, int n_threads) {
    check_threads(n_threads);
    auto run = [&](auto zero) {
      using T = decltype(zero);
      const CountIn<T> in = count_in<T>(x, log_rate, "log_rate", nullptr, nullptr);
      T* op = checked<T>(out, "out", {in.K, in.P}, true);
      py::gil_scoped_release release;
      poisson_log_prob_forward<T>(in, op, n_threads);
    };
    by_dtype(log_rate, [&] { run(0.0f); }, [&] { run(0.0); });
  }, py::arg("x"), py::arg("log_rate"), py::arg("out"), py::arg("n_threads"));

  m.def("poisson_log_prob_backward", [](py::array g, py::array x, py::array log_rate, py::array dlog_rate,
                                        int n_threads) {
    check_threads(n_threads);
    auto run = [&](auto zero) {
      using T = decltype(zero);
      const CountIn<T> in = count_in<T>(x, log_rate, "log_rate", nullptr, nullptr);
      const T* gp = checked<T>(g, "grad_out", {in.K, in.P}, false);
      const CountGrads<T> gr{checked<T>(dlog_rate, "dlog_rate", {in.K, in.P, in.D}, true), nullptr, nullptr};
      py::gil_scoped_release release;
      poisson_log_prob_backward<T>(in, gp, gr, n_threads);
    };
    by_dtype(log_rate, [&] { run(0.0f); }, [&] { run(0.0); });
  }, py::arg("grad_out"), py::arg("x"), py::arg("log_rate"), py::arg("dlog_rate"), py::arg("n_threads"));

  m.def("negative_binomial_log_prob_forward", [](py::array x, py::array log_mean, py::array log_theta,
                                                 py::array out, int n_threads) {
    check_threads(n_threads);
    auto run = [&](auto zero) {
      using T = decltype(zero);
      const CountIn<T> in = count_in<T>(x, log_mean, "log_mean", &log_theta, nullptr);
      T* op = checked<T>(out, "out", {in.K, in.P}, true);
      py::gil_scoped_release release;
      negative_binomial_log_prob_forward<T>(in, op, n_threads);
    };
    by_dtype(log_mean, [&] { run(0.0f); }, [&] { run(0.0); });
  }, py::arg("x"), py::arg("log_mean"), py::arg("log_theta"), py::arg("out"), py::arg("n_threads"));

  m.def("negative_binomial_log_prob_backward", [](py::array g, py::array x, py::array log_mean,
                                                  py::array log_theta, py::object dlog_mean,
                                                  py::object dlog_theta, int n_threads) {
    check_threads(n_threads);
    auto run = [&](auto zero) {
      using T = decltype(zero);
      const CountIn<T> in = count_in<T>(x, log_mean, "log_mean", &log_theta, nullptr);
      const T* gp = checked<T>(g, "grad_out", {in.K, in.P}, false);
      py::array keep_m, keep_t;
      const CountGrads<T> gr{checked_or_null<T>(dlog_mean, keep_m, "dlog_mean", {in.K, in.P, in.D}, true),
                             checked_or_null<T>(dlog_theta, keep_t, "dlog_theta", theta_shape(in), true),
                             nullptr};
      py::gil_scoped_release release;
      negative_binomial_log_prob_backward<T>(in, gp, gr, n_threads);
    };
    by_dtype(log_mean, [&] { run(0.0f); }, [&] { run(0.0); });
  }, py::arg("grad_out"), py::arg("x"), py::arg("log_mean"), py::arg("log_theta"),
     py::arg("dlog_mean").none(true), py::arg("dlog_theta").none(true), py::arg("n_threads"));

  m.def("zinb_log_prob_forward", [](py::array x, py::array log_mean, py::array log_theta, py::array zi_logits,
                                    py::array out, int n_threads) {
    check_threads(n_threads);
    auto run = [&](auto zero) {
      using T = decltype(zero);
      const CountIn<T> in = count_in<T>(x, log_mean, "log_mean", &log_theta, &zi_logits);
      T* op = checked<T>(out, "out", {in.K, in.P}, true);
      py::gil_scoped_release release;
      zinb_log_prob_forward<T>(in, op, n_threads);
    };
    by_dtype(log_mean, [&] { run(0.0f); }, [&] { run(0.0); });
  }, py::arg("x"), py::arg("log_mean"), py::arg("log_theta"), py::arg("zi_logits"), py::arg("out"),
     py::arg("n_threads"));

  m.def("zinb_log_prob_backward", [](py::array g, py::array x, py::array log_mean, py::array log_theta,
                                     py::array zi_logits, py::object dlog_mean, py::object dlog_theta,
                                     py::object dzi_logits, int n_threads) {
    check_threads(n_threads);
    auto run = [&](auto zero) {
      using T = decltype(zero);
      const CountIn<T> in = count_in<T>(x, log_mean, "log_mean", &log_theta, &zi_logits);
      const T* gp = checked<T>(g, "grad_out", {in.K, in.P}, false);
      py::array keep_m, keep_t, keep_z;
      const CountGrads<T> gr{checked_or_null<T>(dlog_mean, keep_m, "dlog_mean", {in.K, in.P, in.D}, true),
                             checked_or_null<T>(dlog_theta, keep_t, "dlog_theta", theta_shape(in), true),
                             checked_or_null<T>(dzi_logits, keep_z, "dzi_logits", {in.K, in.P, in.D}, true)};
      py::gil_scoped_release release;
      zinb_log_prob_backward<T>(in, gp, gr, n_threads);
    };
    by_dtype(log_mean, [&] { run(0.0f); }, [&] { run(0.0); });
  }, py::arg("grad_out"), py::arg("x"), py::arg("log_mean"), py::arg("log_theta"), py::arg("zi_logits"),
     py::arg("dlog_mean").none(true), py::arg("dlog_theta").none(true), py::arg("dzi_logits").none(true),
     py::arg("n_threads"));
}

FASTVAE_BIND(bind_count_log_prob);

}  // namespace fastvae::bind
