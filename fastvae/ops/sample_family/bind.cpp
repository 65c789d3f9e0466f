// Python bindings of sample_location_scale, sample_positive and
// sample_concrete (checked buffers -> sample_family.cpp): one binding of a family sampler of two (N, L)
// parameters, whose kernels take the family as an int and differ only in
// their transform and density, with the closed-form KL fused into the draw
// (family_kl's); each op names its kernels, its parameters and its families.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "buffers.h"
#include "family_kl/family_kl.h"
#include "optional_buffers.h"
#include "sample_family.h"
#include "sampler_bind.h"

namespace fastvae::bind {

// (N, L) of a sampler's first (N, L) parameter, checked 2-d.
inline std::pair<int64_t, int64_t> extents(const py::array& p0, const char* name) {
  check_2d(p0, name);
  return {p0.shape(0), p0.shape(1)};
}

// The names a family sampler is bound with: its kernels' prefix, its two
// parameters and their gradients, and its families in index order (for the
// error that names them).
struct FamilySamplerNames {
  const char* op;  // "sample_location_scale": binds <op>_forward and <op>_backward
  const char* p0;
  const char* p1;
  const char* dp0;
  const char* dp1;
  int families;
  const char* family_names;  // "uniform, laplace, ..."
  // the prior's parameters and their gradients, of an op with <op>_kl_forward
  // and <op>_kl_backward (family_kl's KL of (p0, p1) against the prior); null
  // for one without
  const char* prior0 = nullptr;
  const char* prior1 = nullptr;
  const char* dprior0 = nullptr;
  const char* dprior1 = nullptr;
  // per family, the one KL family its fused KL takes (-1: none); null: any of
  // family_kl's location-scale families
  const int* kl_families = nullptr;
};

// A family sampler's C++ kernels in one dtype, which trust every extent checked here.
template <typename T>
struct FamilyKernels {
  // (p0, p1, seed, family, offset0, sample_stride, row_stride, K, N, L, z, log_q or null, n_threads)
  void (*forward)(const T*, const T*, uint64_t, int, uint64_t, uint64_t, uint64_t, int64_t, int64_t, int64_t, T*,
                  T*, int);
  // (dz or null, dlog_q or null, p0, p1, seed, family, stop_score, K, N, L, dp0, dp1, n_threads)
  void (*backward)(const T*, const T*, const T*, const T*, uint64_t, int, bool, int64_t, int64_t, int64_t, T*, T*,
                   int);
  // (p0, p1, prior0, prior1, prior_shared, seed, family, kl_family, K, N, L, z, kl, n_threads, of_scale), or null
  void (*kl_forward)(const T*, const T*, const T*, const T*, bool, uint64_t, int, int, int64_t, int64_t, int64_t, T*,
                     T*, int, bool) = nullptr;
  // (dz or null, grad_kl or null, p0, p1, prior0, prior1, prior_shared, seed, family, kl_family, K, N, L,
  //  dp0, dp1, dprior0 or null, dprior1 or null, n_threads, of_scale), or null
  void (*kl_backward)(const T*, const T*, const T*, const T*, const T*, const T*, bool, uint64_t, int, int, int64_t,
                      int64_t, int64_t, T*, T*, T*, T*, int, bool) = nullptr;
  // forward's with log_q <- log q - log p, the prior's (L,) (prior_a, prior_b) after p1; or null
  void (*ratio_forward)(const T*, const T*, const T*, const T*, uint64_t, int, uint64_t, uint64_t, uint64_t, int64_t,
                        int64_t, int64_t, T*, T*, int) = nullptr;
  // backward's of that ratio: (dz, dlog_q, p0, p1, prior_a, prior_b, seed, family, stop_score, K, N, L, dp0, dp1,
  //  dprior_a or null, dprior_b or null, n_threads); or null
  void (*ratio_backward)(const T*, const T*, const T*, const T*, const T*, const T*, uint64_t, int, bool, int64_t,
                         int64_t, int64_t, T*, T*, T*, T*, int) = nullptr;
};

// The options of a sampler's log-ratio to its own family's prior: given
// together, and only to an op that has them.
inline bool ratio_prior(const FamilySamplerNames& names, bool has_ratio, const py::object& prior_a,
                        const py::object& prior_b) {
  if (prior_a.is_none() && prior_b.is_none()) return false;
  if (!has_ratio) {
    throw py::value_error(std::string(names.op) + " takes no prior_a, prior_b (the log-ratio to its own family's "
                          "prior is sample_location_scale's)");
  }
  if (prior_a.is_none() != prior_b.is_none()) throw py::value_error("prior_a and prior_b: give both or neither");
  return true;
}

template <typename T>
void family_forward(const FamilySamplerNames& names, const FamilyKernels<T>& kernels, py::array p0, py::array p1,
                    uint64_t seed, int family, uint64_t offset0, uint64_t sample_stride, uint64_t row_stride,
                    py::array z, py::object log_q, int n_threads, py::object prior_a, py::object prior_b) {
  const auto [N, L] = extents(p0, names.p0);
  if (z.ndim() != 3) throw py::value_error("z: expected a 3-d (K, N, L) array, got " + shape_str(z));
  const int64_t K = z.shape(0);
  const bool ratio = ratio_prior(names, kernels.ratio_forward != nullptr, prior_a, prior_b);
  const T* a = checked<T>(p0, names.p0, {N, L}, false);
  const T* b = checked<T>(p1, names.p1, {N, L}, false);
  T* zp = checked<T>(z, "z", {K, N, L}, true);
  py::array q_holder;  // keeps the array alive while its pointer is used
  T* qp = checked_or_null<T>(log_q, q_holder, "log_q", {K, N}, true);
  if (ratio && qp == nullptr) throw py::value_error("log_q: the log-ratio to the prior needs its output");
  py::array prior_holder[2];
  const T* pa = ratio ? checked_or_null<T>(prior_a, prior_holder[0], "prior_a", {L}, false) : nullptr;
  const T* pb = ratio ? checked_or_null<T>(prior_b, prior_holder[1], "prior_b", {L}, false) : nullptr;
  py::gil_scoped_release release;
  if (ratio) {
    kernels.ratio_forward(a, b, pa, pb, seed, family, offset0, sample_stride, row_stride, K, N, L, zp, qp, n_threads);
  } else {
    kernels.forward(a, b, seed, family, offset0, sample_stride, row_stride, K, N, L, zp, qp, n_threads);
  }
}

template <typename T>
void family_backward(const FamilySamplerNames& names, const FamilyKernels<T>& kernels, py::object dz, py::object dq,
                     py::array p0, py::array p1, uint64_t seed, int family, bool stop_score, py::array dp0,
                     py::array dp1, int n_threads, py::object prior_a, py::object prior_b, py::object dprior_a,
                     py::object dprior_b) {
  const auto [N, L] = extents(p0, names.p0);
  const int64_t K = gradient_samples(dz, dq, 3, "(K, N, L)", "grad_log_q");
  const bool ratio = ratio_prior(names, kernels.ratio_backward != nullptr, prior_a, prior_b);
  if (!ratio && !(dprior_a.is_none() && dprior_b.is_none())) {
    throw py::value_error("dprior_a, dprior_b: the prior's gradients need prior_a, prior_b");
  }
  if (dprior_a.is_none() != dprior_b.is_none()) throw py::value_error("dprior_a and dprior_b: give both or neither");
  py::array dz_holder, dq_holder, prior_holder[4];
  const T* g = checked_or_null<T>(dz, dz_holder, "grad_z", {K, N, L}, false);
  const T* gq = checked_or_null<T>(dq, dq_holder, "grad_log_q", {K, N}, false);
  const T* a = checked<T>(p0, names.p0, {N, L}, false);
  const T* b = checked<T>(p1, names.p1, {N, L}, false);
  T* da = checked<T>(dp0, names.dp0, {N, L}, true);
  T* db = checked<T>(dp1, names.dp1, {N, L}, true);
  const T* pa = ratio ? checked_or_null<T>(prior_a, prior_holder[0], "prior_a", {L}, false) : nullptr;
  const T* pb = ratio ? checked_or_null<T>(prior_b, prior_holder[1], "prior_b", {L}, false) : nullptr;
  T* dpa = checked_or_null<T>(dprior_a, prior_holder[2], "dprior_a", {N, L}, true);
  T* dpb = checked_or_null<T>(dprior_b, prior_holder[3], "dprior_b", {N, L}, true);
  py::gil_scoped_release release;
  if (ratio && gq != nullptr) {
    kernels.ratio_backward(g, gq, a, b, pa, pb, seed, family, stop_score, K, N, L, da, db, dpa, dpb, n_threads);
    return;
  }
  // no gradient of the ratio: the draw's alone, and the prior's 0
  kernels.backward(g, gq, a, b, seed, family, stop_score, K, N, L, da, db, n_threads);
  if (dpa != nullptr) {
    std::fill(dpa, dpa + N * L, T(0));
    std::fill(dpb, dpb + N * L, T(0));
  }
}

// The prior of a fused KL, checked: (prior0, prior1) (L,) (shared by the
// rows) or (N, L); kl_family the family's (names.kl_families), or else one of
// family_kl's location-scale families.
struct FusedPrior {
  bool shared;
  std::vector<int64_t> shape;
};

inline FusedPrior fused_prior(const FamilySamplerNames& names, int family, int kl_family, const py::array& prior1,
                              int64_t N, int64_t L) {
  if (names.kl_families != nullptr) {
    const int want = names.kl_families[family];
    if (want < 0) {
      throw py::value_error("family: " + std::to_string(family) + " has no fused closed-form KL (families " +
                            names.family_names + ")");
    }
    if (kl_family != want) {
      throw py::value_error("kl_family: expected " + std::to_string(want) + " (family_kl's of family " +
                            std::to_string(family) + "), got " + std::to_string(kl_family));
    }
  } else if (!family_kl_location_scale(kl_family)) {
    throw py::value_error("kl_family: expected one of family_kl's location-scale families (0-" +
                          std::to_string(kFamilyKLExponential - 1) + "), got " + std::to_string(kl_family));
  }
  const bool shared = prior1.ndim() == 1;
  if (!shared && prior1.ndim() != 2) {
    throw py::value_error(std::string(names.prior1) + ": expected a 1-d (L,) or 2-d (N, L) array, got " +
                          shape_str(prior1));
  }
  return {shared, shared ? std::vector<int64_t>{L} : std::vector<int64_t>{N, L}};
}

template <typename T>
void fused_kl_forward(const FamilySamplerNames& names, const FamilyKernels<T>& kernels, py::array p0, py::array p1,
                       py::array prior0, py::array prior1, uint64_t seed, int family, int kl_family, py::array z,
                       py::array kl, int n_threads, bool of_scale) {
  const auto [N, L] = extents(p0, names.p0);
  if (z.ndim() != 3) throw py::value_error("z: expected a 3-d (K, N, L) array, got " + shape_str(z));
  const int64_t K = z.shape(0);
  const FusedPrior prior = fused_prior(names, family, kl_family, prior1, N, L);
  const T* a = checked<T>(p0, names.p0, {N, L}, false);
  const T* b = checked<T>(p1, names.p1, {N, L}, false);
  const T* pa = checked<T>(prior0, names.prior0, prior.shape, false);
  const T* pb = checked<T>(prior1, names.prior1, prior.shape, false);
  T* zp = checked<T>(z, "z", {K, N, L}, true);
  T* klp = checked<T>(kl, "kl", {N}, true);
  py::gil_scoped_release release;
  kernels.kl_forward(a, b, pa, pb, prior.shared, seed, family, kl_family, K, N, L, zp, klp, n_threads, of_scale);
}

template <typename T>
void fused_kl_backward(const FamilySamplerNames& names, const FamilyKernels<T>& kernels, py::object dz,
                        py::object dkl, py::array p0, py::array p1, py::array prior0, py::array prior1, uint64_t seed,
                        int family, int kl_family, py::array dp0, py::array dp1, py::object dprior0,
                        py::object dprior1, int n_threads, bool of_scale) {
  const auto [N, L] = extents(p0, names.p0);
  const int64_t K = gradient_samples(dz, py::none(), 3, "(K, N, L)", "grad_kl");
  const FusedPrior prior = fused_prior(names, family, kl_family, prior1, N, L);
  if (dprior0.is_none() != dprior1.is_none()) {
    throw py::value_error(std::string(names.dprior0) + " and " + names.dprior1 + ": expected both or neither");
  }
  py::array dz_holder, dkl_holder, dprior_holder[2];
  const T* g = checked_or_null<T>(dz, dz_holder, "grad_z", {K, N, L}, false);
  const T* gkl = checked_or_null<T>(dkl, dkl_holder, "grad_kl", {N}, false);
  const T* a = checked<T>(p0, names.p0, {N, L}, false);
  const T* b = checked<T>(p1, names.p1, {N, L}, false);
  const T* pa = checked<T>(prior0, names.prior0, prior.shape, false);
  const T* pb = checked<T>(prior1, names.prior1, prior.shape, false);
  T* da = checked<T>(dp0, names.dp0, {N, L}, true);
  T* db = checked<T>(dp1, names.dp1, {N, L}, true);
  T* dpa = checked_or_null<T>(dprior0, dprior_holder[0], names.dprior0, {N, L}, true);
  T* dpb = checked_or_null<T>(dprior1, dprior_holder[1], names.dprior1, {N, L}, true);
  py::gil_scoped_release release;
  kernels.kl_backward(g, gkl, a, b, pa, pb, prior.shared, seed, family, kl_family, K, N, L, da, db, dpa, dpb,
                      n_threads, of_scale);
}

// Binds <op>_forward and <op>_backward, which check the family index and the
// buffers by name and run the kernels of the arrays' dtype.
inline void bind_family_sampler(py::module_& m, const FamilySamplerNames& names, FamilyKernels<float> f32,
                                FamilyKernels<double> f64) {
  // the thread count and family checked, then run(the kernels of p0's dtype)
  auto dispatch = [names, f32, f64](const py::array& p0, int family, int n_threads, auto run) {
    check_threads(n_threads);
    if (family < 0 || family >= names.families) {
      throw py::value_error("family: expected 0-" + std::to_string(names.families - 1) + " (" +
                            names.family_names + "), got " + std::to_string(family));
    }
    by_dtype(p0, [&] { run(f32); }, [&] { run(f64); });
  };

  m.def((std::string(names.op) + "_forward").c_str(),
        [=](py::array p0, py::array p1, uint64_t seed, int family, uint64_t offset0, uint64_t sample_stride,
            uint64_t row_stride, py::array z, py::object log_q, int n_threads, py::object prior_a,
            py::object prior_b) {
          dispatch(p0, family, n_threads, [&](const auto& kernels) {
            family_forward(names, kernels, p0, p1, seed, family, offset0, sample_stride, row_stride, z, log_q,
                           n_threads, prior_a, prior_b);
          });
        },
        py::arg(names.p0), py::arg(names.p1), py::arg("seed"), py::arg("family"), py::arg("offset0"),
        py::arg("sample_stride"), py::arg("row_stride"), py::arg("z"), py::arg("log_q").none(true),
        py::arg("n_threads"), py::arg("prior_a") = py::none(), py::arg("prior_b") = py::none());

  m.def((std::string(names.op) + "_backward").c_str(),
        [=](py::object dz, py::object dq, py::array p0, py::array p1, uint64_t seed, int family, bool stop_score,
            py::array dp0, py::array dp1, int n_threads, py::object prior_a, py::object prior_b,
            py::object dprior_a, py::object dprior_b) {
          dispatch(p0, family, n_threads, [&](const auto& kernels) {
            family_backward(names, kernels, dz, dq, p0, p1, seed, family, stop_score, dp0, dp1, n_threads, prior_a,
                            prior_b, dprior_a, dprior_b);
          });
        },
        py::arg("grad_z").none(true), py::arg("grad_log_q").none(true), py::arg(names.p0), py::arg(names.p1),
        py::arg("seed"), py::arg("family"), py::arg("stop_score"), py::arg(names.dp0), py::arg(names.dp1),
        py::arg("n_threads"), py::arg("prior_a") = py::none(), py::arg("prior_b") = py::none(),
        py::arg("dprior_a") = py::none(), py::arg("dprior_b") = py::none());

  if (f32.kl_forward == nullptr) return;

  m.def((std::string(names.op) + "_kl_forward").c_str(),
        [=](py::array p0, py::array p1, py::array prior0, py::array prior1, uint64_t seed, int family, int kl_family,
            py::array z, py::array kl, int n_threads, bool of_scale) {
          dispatch(p0, family, n_threads, [&](const auto& kernels) {
            fused_kl_forward(names, kernels, p0, p1, prior0, prior1, seed, family, kl_family, z, kl, n_threads,
                             of_scale);
          });
        },
        py::arg(names.p0), py::arg(names.p1), py::arg(names.prior0), py::arg(names.prior1), py::arg("seed"),
        py::arg("family"), py::arg("kl_family"), py::arg("z"), py::arg("kl"), py::arg("n_threads"),
        py::arg("of_scale") = false);

  m.def((std::string(names.op) + "_kl_backward").c_str(),
        [=](py::object dz, py::object dkl, py::array p0, py::array p1, py::array prior0, py::array prior1,
            uint64_t seed, int family, int kl_family, py::array dp0, py::array dp1, py::object dprior0,
            py::object dprior1, int n_threads, bool of_scale) {
          dispatch(p0, family, n_threads, [&](const auto& kernels) {
            fused_kl_backward(names, kernels, dz, dkl, p0, p1, prior0, prior1, seed, family, kl_family, dp0, dp1,
                              dprior0, dprior1, n_threads, of_scale);
          });
        },
        py::arg("grad_z").none(true), py::arg("grad_kl").none(true), py::arg(names.p0), py::arg(names.p1),
        py::arg(names.prior0), py::arg(names.prior1), py::arg("seed"), py::arg("family"), py::arg("kl_family"),
        py::arg(names.dp0), py::arg(names.dp1), py::arg(names.dprior0).none(true),
        py::arg(names.dprior1).none(true), py::arg("n_threads"), py::arg("of_scale") = false);
}

// sample_concrete's binding: its own extents (logits (N, L, C)), the samplers'
// shared checks (sampler_bind.h)
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

}  // namespace

// the KL family each positive family's fused KL takes: the exponential's, the
// Weibull's, the Kumaraswamy's (against a Beta)
constexpr int kPositiveKLFamilies[3] = {kFamilyKLExponential, kFamilyKLWeibull, kFamilyKLKumaraswamy};

void bind_sample_family(py::module_& m) {
  bind_family_sampler(
      m,
      {"sample_location_scale", "loc", "log_scale", "dloc", "dlog_scale", 5,
       "uniform, laplace, logistic, gumbel, cauchy", "prior_loc", "prior_log_scale", "dprior_loc",
       "dprior_log_scale"},
      {fastvae::sample_location_scale_forward<float>, fastvae::sample_location_scale_backward<float>,
       fastvae::sample_location_scale_kl_forward<float>, fastvae::sample_location_scale_kl_backward<float>,
       fastvae::sample_location_scale_ratio_forward<float>, fastvae::sample_location_scale_ratio_backward<float>},
      {fastvae::sample_location_scale_forward<double>, fastvae::sample_location_scale_backward<double>,
       fastvae::sample_location_scale_kl_forward<double>, fastvae::sample_location_scale_kl_backward<double>,
       fastvae::sample_location_scale_ratio_forward<double>, fastvae::sample_location_scale_ratio_backward<double>});
  bind_family_sampler(
      m,
      {"sample_positive", "log_p0", "log_p1", "dlog_p0", "dlog_p1", 3, "exponential, weibull, kumaraswamy",
       "prior_log_p0", "prior_log_p1", "dprior_log_p0", "dprior_log_p1", kPositiveKLFamilies},
      {fastvae::sample_positive_forward<float>, fastvae::sample_positive_backward<float>,
       fastvae::sample_positive_kl_forward<float>, fastvae::sample_positive_kl_backward<float>},
      {fastvae::sample_positive_forward<double>, fastvae::sample_positive_backward<double>,
       fastvae::sample_positive_kl_forward<double>, fastvae::sample_positive_kl_backward<double>});
  bind_sample_concrete(m);
}

FASTVAE_BIND(bind_sample_family);

}  // namespace fastvae::bind
