// Python bindings of family_kl (checked buffers -> family_kl.cpp).
#include "buffers.h"
#include "family_kl.h"
#include "optional_buffers.h"

namespace fastvae::bind {
namespace {

// The checked inputs of a call; keep holds the optional arrays alive.
template <typename T>
FamilyKLIn<T> family_kl_inputs(py::object q_loc, py::array q_log_param, py::object p_loc, py::array p_log_param,
                               int family, py::array (&keep)[2]) {
  if (family < 0 || family >= kFamilyKLFamilies) {
    throw py::value_error("family must be in [0, " + std::to_string(kFamilyKLFamilies) + "), got " +
                          std::to_string(family));
  }
  check_2d(q_log_param, "q_log_param");
  const int64_t N = q_log_param.shape(0), L = q_log_param.shape(1);
  const bool has_loc = family_kl_has_loc(family);
  if (q_loc.is_none() == has_loc || p_loc.is_none() == has_loc) {
    throw py::value_error(has_loc ? "q_loc and p_loc are required for this family"
                                  : "q_loc and p_loc must be None for the exponential");
  }
  const bool shared = p_log_param.ndim() == 1;
  const std::vector<int64_t> p_shape = shared ? std::vector<int64_t>{L} : std::vector<int64_t>{N, L};
  FamilyKLIn<T> in{};
  in.q_log_param = checked<T>(q_log_param, "q_log_param", {N, L}, false);
  in.p_log_param = checked<T>(p_log_param, "p_log_param", p_shape, false);
  in.q_loc = checked_or_null<T>(q_loc, keep[0], "q_loc", {N, L}, false);
  in.p_loc = checked_or_null<T>(p_loc, keep[1], "p_loc", p_shape, false);
  in.p_shared = shared;
  in.N = N;
  in.L = L;
  return in;
}

template <typename T>
void family_kl_forward_t(py::object q_loc, py::array q_log_param, py::object p_loc, py::array p_log_param,
                         int family, py::array kl, int n_threads) {
  py::array keep[2];
  const FamilyKLIn<T> in = family_kl_inputs<T>(q_loc, q_log_param, p_loc, p_log_param, family, keep);
  const bool reduce = kl.ndim() == 1;
  T* out = checked<T>(kl, "kl", reduce ? std::vector<int64_t>{in.N} : std::vector<int64_t>{in.N, in.L}, true);
  py::gil_scoped_release release;
  fastvae::family_kl_forward<T>(family, in, reduce, out, n_threads);
}

template <typename T>
void family_kl_backward_t(py::array grad_kl, py::object q_loc, py::array q_log_param, py::object p_loc,
                          py::array p_log_param, int family, py::object dq_loc, py::array dq_log_param,
                          py::object dp_loc, py::object dp_log_param, int n_threads) {
  py::array keep[2], dkeep[3];
  const FamilyKLIn<T> in = family_kl_inputs<T>(q_loc, q_log_param, p_loc, p_log_param, family, keep);
  const bool reduce = grad_kl.ndim() == 1;
  const bool has_loc = family_kl_has_loc(family);
  if (dq_loc.is_none() == has_loc || (has_loc && dp_loc.is_none() != dp_log_param.is_none()) ||
      (!has_loc && !dp_loc.is_none())) {
    throw py::value_error("dq_loc (and dp_loc with dp_log_param) go with q_loc: given for a location family only");
  }
  const std::vector<int64_t> shape{in.N, in.L};
  const T* g = checked<T>(grad_kl, "grad_kl", reduce ? std::vector<int64_t>{in.N} : shape, false);
  T* dqs = checked<T>(dq_log_param, "dq_log_param", shape, true);
  T* dqm = checked_or_null<T>(dq_loc, dkeep[0], "dq_loc", shape, true);
  T* dpm = checked_or_null<T>(dp_loc, dkeep[1], "dp_loc", shape, true);
  T* dps = checked_or_null<T>(dp_log_param, dkeep[2], "dp_log_param", shape, true);
  py::gil_scoped_release release;
  fastvae::family_kl_backward<T>(family, g, in, reduce, dqm, dqs, dpm, dps, n_threads);
}

}  // namespace

void bind_family_kl(py::module_& m) {
  m.def("family_kl_forward", [](py::object q_loc, py::array q_log_param, py::object p_loc, py::array p_log_param,
                                int family, py::array kl, int n_threads) {
    check_threads(n_threads);
    by_dtype(q_log_param,
             [&] { family_kl_forward_t<float>(q_loc, q_log_param, p_loc, p_log_param, family, kl, n_threads); },
             [&] { family_kl_forward_t<double>(q_loc, q_log_param, p_loc, p_log_param, family, kl, n_threads); });
  }, py::arg("q_loc").none(true), py::arg("q_log_param"), py::arg("p_loc").none(true), py::arg("p_log_param"),
     py::arg("family"), py::arg("kl"), py::arg("n_threads"));

  m.def("family_kl_backward", [](py::array grad_kl, py::object q_loc, py::array q_log_param, py::object p_loc,
                                 py::array p_log_param, int family, py::object dq_loc, py::array dq_log_param,
                                 py::object dp_loc, py::object dp_log_param, int n_threads) {
    check_threads(n_threads);
    by_dtype(q_log_param,
             [&] { family_kl_backward_t<float>(grad_kl, q_loc, q_log_param, p_loc, p_log_param, family, dq_loc,
                                               dq_log_param, dp_loc, dp_log_param, n_threads); },
             [&] { family_kl_backward_t<double>(grad_kl, q_loc, q_log_param, p_loc, p_log_param, family, dq_loc,
                                                dq_log_param, dp_loc, dp_log_param, n_threads); });
  }, py::arg("grad_kl"), py::arg("q_loc").none(true), py::arg("q_log_param"), py::arg("p_loc").none(true),
     py::arg("p_log_param"), py::arg("family"), py::arg("dq_loc").none(true), py::arg("dq_log_param"),
     py::arg("dp_loc").none(true), py::arg("dp_log_param").none(true), py::arg("n_threads"));
}

FASTVAE_BIND(bind_family_kl);

}  // namespace fastvae::bind
