// Python bindings of sample_positive (checked buffers -> sample_positive.cpp).
#include "buffers.h"
#include "optional_buffers.h"
#include "sample_positive.h"

namespace fastvae::bind {
namespace {

void check_positive_family(int family) {
  if (family < 0 || family > 2) {
    throw py::value_error("family: expected 0-2 (exponential, weibull, kumaraswamy), got " +
                          std::to_string(family));
  }
}

template <typename T>
void positive_forward_t(py::array loc, py::array log_scale, uint64_t seed, int family, uint64_t offset0,
               uint64_t sample_stride, uint64_t row_stride, py::array z, py::object log_q, int n_threads) {
  check_2d(loc, "log_p0");
  const int64_t N = loc.shape(0), L = loc.shape(1);
  if (z.ndim() != 3) throw py::value_error("z: expected a 3-d (K, N, L) array, got " + shape_str(z));
  const int64_t K = z.shape(0);
  const T* m = checked<T>(loc, "log_p0", {N, L}, false);
  const T* ls = checked<T>(log_scale, "log_p1", {N, L}, false);
  T* zp = checked<T>(z, "z", {K, N, L}, true);
  py::array q_holder;  // keeps the array alive while its pointer is used
  T* qp = checked_or_null<T>(log_q, q_holder, "log_q", {K, N}, true);
  py::gil_scoped_release release;
  fastvae::sample_positive_forward<T>(m, ls, seed, family, offset0, sample_stride, row_stride, K, N, L, zp,
                                            qp, n_threads);
}

template <typename T>
void positive_backward_t(py::object dz, py::object dq, py::array loc, py::array log_scale, uint64_t seed, int family,
                bool stop_score, py::array dloc, py::array dlog_scale, int n_threads) {
  check_2d(loc, "log_p0");
  const int64_t N = loc.shape(0), L = loc.shape(1);
  int64_t K = 0;  // from whichever per-sample gradient is given
  const py::object& samples = dz.is_none() ? dq : dz;
  if (!samples.is_none()) {
    const int dims = dz.is_none() ? 2 : 3;
    if (!py::isinstance<py::array>(samples) || py::reinterpret_borrow<py::array>(samples).ndim() != dims) {
      throw py::value_error(dz.is_none() ? "grad_log_q: expected a 2-d (K, N) array or None"
                                         : "grad_z: expected a 3-d (K, N, L) array or None");
    }
    K = py::reinterpret_borrow<py::array>(samples).shape(0);
  }
  py::array dz_holder, dq_holder;
  const T* g = checked_or_null<T>(dz, dz_holder, "grad_z", {K, N, L}, false);
  const T* gq = checked_or_null<T>(dq, dq_holder, "grad_log_q", {K, N}, false);
  const T* m = checked<T>(loc, "log_p0", {N, L}, false);
  const T* ls = checked<T>(log_scale, "log_p1", {N, L}, false);
  T* dl = checked<T>(dloc, "dlog_p0", {N, L}, true);
  T* dls = checked<T>(dlog_scale, "dlog_p1", {N, L}, true);
  py::gil_scoped_release release;
  fastvae::sample_positive_backward<T>(g, gq, m, ls, seed, family, stop_score, K, N, L, dl, dls, n_threads);
}

}  // namespace

void bind_sample_positive(py::module_& m) {
  m.def("sample_positive_forward", [](py::array loc, py::array log_scale, uint64_t seed, int family,
                                            uint64_t offset0, uint64_t sample_stride, uint64_t row_stride,
                                            py::array z, py::object log_q, int n_threads) {
    check_threads(n_threads);
    check_positive_family(family);
    by_dtype(loc,
             [&] { positive_forward_t<float>(loc, log_scale, seed, family, offset0, sample_stride, row_stride, z, log_q,
                                    n_threads); },
             [&] { positive_forward_t<double>(loc, log_scale, seed, family, offset0, sample_stride, row_stride, z, log_q,
                                     n_threads); });
  }, py::arg("log_p0"), py::arg("log_p1"), py::arg("seed"), py::arg("family"), py::arg("offset0"),
     py::arg("sample_stride"), py::arg("row_stride"), py::arg("z"), py::arg("log_q").none(true),
     py::arg("n_threads"));

  m.def("sample_positive_backward", [](py::object dz, py::object dq, py::array loc, py::array log_scale,
                                             uint64_t seed, int family, bool stop_score, py::array dloc,
                                             py::array dlog_scale, int n_threads) {
    check_threads(n_threads);
    check_positive_family(family);
    by_dtype(loc,
             [&] { positive_backward_t<float>(dz, dq, loc, log_scale, seed, family, stop_score, dloc, dlog_scale, n_threads); },
             [&] { positive_backward_t<double>(dz, dq, loc, log_scale, seed, family, stop_score, dloc, dlog_scale,
                                      n_threads); });
  }, py::arg("grad_z").none(true), py::arg("grad_log_q").none(true), py::arg("log_p0"), py::arg("log_p1"),
     py::arg("seed"), py::arg("family"), py::arg("stop_score"), py::arg("dlog_p0"), py::arg("dlog_p1"),
     py::arg("n_threads"));
}

FASTVAE_BIND(bind_sample_positive);

}  // namespace fastvae::bind
