// The eager CPU path of the hot ops as torch operators, fastvae_cpp::<op>,
// whose autograd is a C++ torch::autograd::Function calling the kernels
// directly. At the sizes of many real models (a digits VAE: 100 x 8 latents)
// a kernel takes 1-5 us, and a Python autograd.Function with its NumPy
// boundary costs several times that per call, forward and backward; here the
// call costs about what one eager torch op does (benchmarks/bench_overhead.py).
//
// Same kernels, same arguments and results as the Python Functions in
// fastvae/<op>.py, which remain the path for torch.compile, the Triton and
// reference backends, and builds without torch headers. Built only when
// setup.py finds torch (then FASTVAE_TORCH_OPS is defined for bindings.cpp).
//
// The boundary: every tensor is checked for device, dtype and shape, made
// contiguous and aligned (a copy if needed) before a pointer is taken, and
// outputs are fresh; no pybind11 here (torch bundles its own).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "likelihood.h"
#include "logmeanexp.h"
#include "ops.h"
#include "outputs.h"

namespace fastvae::torch_ops {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// OpenMP threads for `work` elements: as fastvae._backend.num_threads.
int threads(int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kMinWorkPerThread)));
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": the cpp backend supports float32 and float64, got ", t.scalar_type());
}

// t as a contiguous, aligned tensor of `like`'s dtype and the given shape.
Tensor input(const Tensor& t, const char* name, const Tensor& like, at::IntArrayRef shape) {
  check_float(t, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  Tensor c = t.contiguous();
  // a view of a byte buffer at an odd offset: the kernels' loads assume alignment
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % c.element_size() != 0) c = c.clone();
  return c;
}

Tensor output(at::IntArrayRef shape, const Tensor& like) {
  Tensor t = at::empty(shape, like.options());
  if (poison_outputs) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    advise_huge_pages(t.data_ptr(), size_t(t.nbytes()));
  }
  return t;
}

template <typename F>
void by_dtype(const Tensor& t, F f) {
  if (t.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    f(double{});
  }
}

template <typename T>
T* ptr(const Tensor& t) { return t.data_ptr<T>(); }

// An output in its user's shape: the tensor itself where it has it already
// (so it stays modifiable in place, as the Python Function's outputs are),
// else a view.
Tensor shaped(const Tensor& t, at::IntArrayRef shape) { return t.sizes() == shape ? t : t.view(shape); }

// (..., L) as rows: N = the product of the leading dimensions.
std::pair<int64_t, int64_t> rows_of(const Tensor& mu) {
  TORCH_CHECK(mu.dim() >= 1, "mu: expected a tensor with a last (latent) dimension");
  return {c10::multiply_integers(mu.sizes().slice(0, mu.dim() - 1)), mu.size(-1)};
}

std::vector<int64_t> with_samples(int64_t K, at::IntArrayRef shape) {
  std::vector<int64_t> out{K};
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

// -- sample_normal and sample_normal_with_ratio --------------------------------

// z (K, N, L) [and log_ratio (K, N)] for mu, logvar (N, L) as contiguous tensors.
void sample_forward(const Tensor& m, const Tensor& lv, int64_t seed, int64_t K, const Tensor& z, const Tensor& kl,
                    const Tensor* ratio) {
  const int64_t N = m.size(0), L = m.size(1);
  by_dtype(m, [&](auto tag) {
    using T = decltype(tag);
    sample_normal_forward<T>(ptr<T>(m), ptr<T>(lv), uint64_t(seed), 0, uint64_t(N * L), uint64_t(L), K, N, L,
                             ptr<T>(z), ptr<T>(kl), ratio ? ptr<T>(*ratio) : nullptr, threads(K * N * L));
  });
}

// dmu, dlogvar (N, L) from the upstream gradients of z (K, N, L), kl (N,) and
// log_ratio (K, N), each undefined when its output has none (nothing is
// materialized): one kernel, which also folds in the log-ratio's path terms.
std::pair<Tensor, Tensor> sample_backward(const Tensor& grad_z, const Tensor& grad_kl, const Tensor& grad_ratio,
                                          bool stop_score, const Tensor& m, const Tensor& lv, int64_t seed,
                                          int64_t K) {
  const int64_t N = m.size(0), L = m.size(1);
  const Tensor g = grad_z.defined() ? input(grad_z.reshape({K, N, L}), "grad_z", m, {K, N, L}) : Tensor();
  const Tensor gk = grad_kl.defined() ? input(grad_kl.reshape({N}), "grad_kl", m, {N}) : Tensor();
  const Tensor gr = grad_ratio.defined() ? input(grad_ratio.reshape({K, N}), "grad_log_ratio", m, {K, N}) : Tensor();
  Tensor dmu = output({N, L}, m), dlv = output({N, L}, m);
  by_dtype(m, [&](auto tag) {
    using T = decltype(tag);
    auto opt = [](const Tensor& t) { return t.defined() ? ptr<T>(t) : nullptr; };
    sample_normal_backward<T>(opt(g), opt(gk), opt(gr), ptr<T>(m), ptr<T>(lv), uint64_t(seed), stop_score, K, N, L,
                              ptr<T>(dmu), ptr<T>(dlv), threads(K * N * L));
  });
  return {dmu, dlv};
}

// mu, logvar (..., L) -> contiguous (N, L), checked.
std::pair<Tensor, Tensor> latent_rows(const Tensor& mu, const Tensor& logvar, int64_t seed, int64_t K) {
  check_float(mu, "mu");
  const auto [N, L] = rows_of(mu);
  TORCH_CHECK(K >= 1, "n_samples must be >= 1, got ", K);
  TORCH_CHECK(seed >= 0, "seed must be >= 0, got ", seed);
  TORCH_CHECK(N * L == 0 || K <= std::numeric_limits<int64_t>::max() / (N * L),
              "n_samples x mu.numel() overflows int64");
  TORCH_CHECK(logvar.sizes() == mu.sizes(), "logvar: expected shape ", mu.sizes(), ", got ", logvar.sizes());
  const Tensor m = input(mu.reshape({N, L}), "mu", mu, {N, L});
  return {m, input(logvar.reshape({N, L}), "logvar", mu, {N, L})};
}

// n_samples None (stored as K = 1 with no sample dimension) gives z shaped like mu.
struct SampleNormal : torch::autograd::Function<SampleNormal> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar, int64_t seed,
                               std::optional<int64_t> n_samples) {
    const int64_t K = n_samples.value_or(1);
    const auto [m, lv] = latent_rows(mu, logvar, seed, K);
    const int64_t N = m.size(0), L = m.size(1);
    Tensor z = output({K, N, L}, m), kl = output({N}, m);
    sample_forward(m, lv, seed, K, z, kl, nullptr);
    ctx->set_materialize_grads(false);  // an output with no gradient gets none: no zeros
    ctx->save_for_backward({m, lv});
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["K"] = K;
    ctx->saved_data["shape"] = mu.sizes().vec();
    const auto batch = mu.sizes().slice(0, mu.dim() - 1);
    const std::vector<int64_t> z_shape = n_samples ? with_samples(K, mu.sizes()) : mu.sizes().vec();
    return {shaped(z, z_shape), shaped(kl, batch)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t K = ctx->saved_data["K"].toInt();
    if (!grads[0].defined() && !grads[1].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    auto [dmu, dlv] = sample_backward(grads[0], grads[1], Tensor(), false, saved[0], saved[1],
                                      ctx->saved_data["seed"].toInt(), K);
    const auto shape = ctx->saved_data["shape"].toIntVector();
    return {dmu.view(shape), dlv.view(shape), Tensor(), Tensor()};
  }
};

// z, kl and log_ratio = log N(z; 0, I) - log q(z) from the drawn eps; see
// fastvae/sample_normal.py's SampleNormalWithRatio for the gradient.
struct SampleNormalWithRatio : torch::autograd::Function<SampleNormalWithRatio> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar, int64_t seed,
                               int64_t n_samples, bool stop_score) {
    const int64_t K = n_samples;
    const auto [m, lv] = latent_rows(mu, logvar, seed, K);
    const int64_t N = m.size(0), L = m.size(1);
    Tensor z = output({K, N, L}, m), kl = output({N}, m), ratio = output({K, N}, m);
    sample_forward(m, lv, seed, K, z, kl, &ratio);
    ctx->set_materialize_grads(false);  // an output with no gradient gets none: no zeros
    ctx->save_for_backward({m, lv});  // z is recomputed from the regenerated eps
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["K"] = K;
    ctx->saved_data["stop_score"] = stop_score;
    ctx->saved_data["shape"] = mu.sizes().vec();
    const auto batch = mu.sizes().slice(0, mu.dim() - 1);
    return {shaped(z, with_samples(K, mu.sizes())), shaped(kl, batch), shaped(ratio, with_samples(K, batch))};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t K = ctx->saved_data["K"].toInt();
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) {
      return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto [dmu, dlv] = sample_backward(grads[0], grads[1], grads[2], ctx->saved_data["stop_score"].toBool(), saved[0],
                                      saved[1], ctx->saved_data["seed"].toInt(), K);
    const auto shape = ctx->saved_data["shape"].toIntVector();
    return {dmu.view(shape), dlv.view(shape), Tensor(), Tensor(), Tensor()};
  }
};

// -- the likelihoods --------------------------------------------------------------

// x (..., D) broadcast against the decoder output (K, ..., D) or (..., D), in
// the layout of fastvae/_likelihood_layout.py's kernel_views: x (P, D), the
// output (K, P, D).
struct Layout {
  int64_t K, P, D;
};

Layout likelihood_layout(const Tensor& x, const Tensor& out, const char* out_name) {
  const int64_t dims = out.dim();
  const bool same = x.dim() == dims;
  TORCH_CHECK(dims >= (same ? 1 : 2), out_name, ": expected a tensor with a last (event) dimension",
              same ? "" : " and a first (sample) dimension");
  TORCH_CHECK(same ? x.sizes() == out.sizes() : x.sizes() == out.sizes().slice(1), "x of shape ", x.sizes(),
              " must have the shape of ", out_name, ", ", out.sizes(), ", or its shape without the first dimension");
  int64_t P = 1;
  for (int64_t d = same ? 0 : 1; d < dims - 1; ++d) P *= out.size(d);
  return {same ? 1 : out.size(0), P, out.size(-1)};
}

struct BernoulliLogProb : torch::autograd::Function<BernoulliLogProb> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& logits) {
    check_float(logits, "logits");
    const auto [K, P, D] = likelihood_layout(x, logits, "logits");
    const Tensor l = input(logits.reshape({K, P, D}), "logits", logits, {K, P, D});
    const Tensor x2 = input(x.reshape({P, D}), "x", logits, {P, D});
    Tensor out = output({K, P}, l);
    by_dtype(l, [&](auto tag) {
      using T = decltype(tag);
      bernoulli_log_prob_forward<T>(ptr<T>(x2), ptr<T>(l), K, P, D, ptr<T>(out), threads(K * P * D));
    });
    ctx->save_for_backward({x2, l});
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["logits_shape"] = logits.sizes().vec();
    return shaped(out, logits.sizes().slice(0, logits.dim() - 1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x2 = saved[0], &l = saved[1];
    const int64_t K = l.size(0), P = l.size(1), D = l.size(2);
    const Tensor g = input(grads[0].reshape({K, P}), "grad_out", l, {K, P});
    const bool need_dx = ctx->needs_input_grad(0);
    Tensor dlogits = output({K, P, D}, l);
    Tensor dx = need_dx ? output({P, D}, l) : Tensor();
    by_dtype(l, [&](auto tag) {
      using T = decltype(tag);
      bernoulli_log_prob_backward<T>(ptr<T>(g), ptr<T>(x2), ptr<T>(l), K, P, D, need_dx ? ptr<T>(dx) : nullptr,
                                     ptr<T>(dlogits), threads(K * P * D));
    });
    return {need_dx ? dx.view(ctx->saved_data["x_shape"].toIntVector()) : Tensor(),
            dlogits.view(ctx->saved_data["logits_shape"].toIntVector())};
  }
};

// The variance parameter as fastvae/_likelihood_layout.py's kernel_var lays it
// out: (D,) one per dimension, (K, P, D) per element, else (P, D) per x row.
std::pair<Tensor, VarLayout> var_layout(const Tensor& v, const Tensor& mean, const Layout& s) {
  if (v.dim() == 1 && v.size(0) == s.D && s.K * s.P * s.D != s.D) {
    return {input(v, "var_param", mean, {s.D}), VarLayout::kDim};
  }
  if (v.numel() == s.K * s.P * s.D) {
    return {input(v.reshape({s.K, s.P, s.D}), "var_param", mean, {s.K, s.P, s.D}), VarLayout::kElement};
  }
  TORCH_CHECK(v.numel() == s.P * s.D, "var_param of shape ", v.sizes(), " is neither per element, per x row nor per "
              "dimension of mean ", mean.sizes());
  return {input(v.reshape({s.P, s.D}), "var_param", mean, {s.P, s.D}), VarLayout::kRow};
}

struct GaussianLogProb : torch::autograd::Function<GaussianLogProb> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& var_param,
                        bool softplus_mode, double delta) {
    check_float(mean, "mean");
    const Layout s = likelihood_layout(x, mean, "mean");
    const Tensor m = input(mean.reshape({s.K, s.P, s.D}), "mean", mean, {s.K, s.P, s.D});
    const Tensor x2 = input(x.reshape({s.P, s.D}), "x", mean, {s.P, s.D});
    const auto [v, layout] = var_layout(var_param, mean, s);
    Tensor out = output({s.K, s.P}, m);
    by_dtype(m, [&](auto tag) {
      using T = decltype(tag);
      TORCH_CHECK(valid_delta<T>(delta), "delta must be finite and at least the smallest normal number of the "
                  "dtype, got ", delta);
      gaussian_log_prob_forward<T>(ptr<T>(x2), ptr<T>(m), ptr<T>(v), layout, softplus_mode, delta, s.K, s.P, s.D,
                                   ptr<T>(out), threads(m.numel()));
    });
    ctx->save_for_backward({x2, m, v});
    ctx->saved_data["layout"] = int64_t(layout);
    ctx->saved_data["softplus_mode"] = softplus_mode;
    ctx->saved_data["delta"] = delta;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["mean_shape"] = mean.sizes().vec();
    ctx->saved_data["var_shape"] = var_param.sizes().vec();
    return shaped(out, mean.sizes().slice(0, mean.dim() - 1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x2 = saved[0], &m = saved[1], &v = saved[2];
    const int64_t K = m.size(0), P = m.size(1), D = m.size(2);
    const Tensor g = input(grads[0].reshape({K, P}), "grad_out", m, {K, P});
    const bool need_dx = ctx->needs_input_grad(0), need_dv = ctx->needs_input_grad(2);
    Tensor dmean = output({K, P, D}, m);
    Tensor dx = need_dx ? output({P, D}, m) : Tensor();
    Tensor dv = need_dv ? output(v.sizes(), m) : Tensor();
    by_dtype(m, [&](auto tag) {
      using T = decltype(tag);
      gaussian_log_prob_backward<T>(ptr<T>(g), ptr<T>(x2), ptr<T>(m), ptr<T>(v),
                                    VarLayout(ctx->saved_data["layout"].toInt()),
                                    ctx->saved_data["softplus_mode"].toBool(), ctx->saved_data["delta"].toDouble(),
                                    K, P, D, need_dx ? ptr<T>(dx) : nullptr, ptr<T>(dmean),
                                    need_dv ? ptr<T>(dv) : nullptr, threads(m.numel()));
    });
    return {need_dx ? dx.view(ctx->saved_data["x_shape"].toIntVector()) : Tensor(),
            dmean.view(ctx->saved_data["mean_shape"].toIntVector()),
            need_dv ? dv.view(ctx->saved_data["var_shape"].toIntVector()) : Tensor(), Tensor(), Tensor()};
  }
};

// -- logmeanexp ------------------------------------------------------------------

// (logmeanexp, lw_max, sumexp) over the leading dimension of lw (K, ...), as
// fastvae/logmeanexp.py's LogMeanExp: lw_max carries no gradient; the
// backward is exp(lw - lw_max) * (grad_out / sumexp + grad_sumexp). The cpp
// dtypes accumulate in their own precision, so the state has lw's dtype.
struct LogMeanExp : torch::autograd::Function<LogMeanExp> {
  static variable_list forward(AutogradContext* ctx, const Tensor& lw) {
    check_float(lw, "lw");
    TORCH_CHECK(lw.dim() >= 1 && lw.size(0) >= 1, "lw: expected (K, ...) with K >= 1, got shape ", lw.sizes());
    const int64_t K = lw.size(0), M = c10::multiply_integers(lw.sizes().slice(1));
    const Tensor l = input(lw.reshape({K, M}), "lw", lw, {K, M});
    Tensor out = output({M}, l), lw_max = output({M}, l), sumexp = output({M}, l);
    by_dtype(l, [&](auto tag) {
      using T = decltype(tag);
      logmeanexp_forward<T>(ptr<T>(l), K, M, ptr<T>(lw_max), ptr<T>(sumexp), ptr<T>(out), nullptr, threads(K * M));
    });
    ctx->mark_non_differentiable({lw_max});
    ctx->save_for_backward({l, lw_max, sumexp});
    ctx->saved_data["shape"] = lw.sizes().vec();
    const auto columns = lw.sizes().slice(1);
    return {shaped(out, columns), shaped(lw_max, columns), shaped(sumexp, columns)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &l = saved[0], &lw_max = saved[1], &sumexp = saved[2];
    const int64_t K = l.size(0), M = l.size(1);
    const Tensor g = input(grads[0].reshape({M}), "grad_out", l, {M});
    const Tensor gs = input(grads[2].reshape({M}), "grad_sumexp", l, {M});
    Tensor dlw = output({K, M}, l);
    by_dtype(l, [&](auto tag) {
      using T = decltype(tag);
      logmeanexp_backward<T>(ptr<T>(l), ptr<T>(lw_max), ptr<T>(sumexp), ptr<T>(g), ptr<T>(gs), nullptr, K, M,
                             ptr<T>(dlw), threads(K * M));
    });
    return {dlw.view(ctx->saved_data["shape"].toIntVector())};
  }
};

// -- kl_normal ------------------------------------------------------------------

// KL(N(mu, exp(logvar)) || prior) over the last dimension, the prior N(0, I)
// or (prior_mu, prior_logvar) of mu's shape (the front end expands a
// broadcast prior); as fastvae/kl_normal.py's KLNormal.
struct KLNormal : torch::autograd::Function<KLNormal> {
  static Tensor forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar,
                        const std::optional<Tensor>& prior_mu, const std::optional<Tensor>& prior_logvar) {
    check_float(mu, "mu");
    const auto [N, L] = rows_of(mu);
    TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
                "prior_mu and prior_logvar must both be given or both be None");
    const bool prior = prior_mu.has_value();
    TORCH_CHECK(logvar.sizes() == mu.sizes(), "logvar: expected shape ", mu.sizes(), ", got ", logvar.sizes());
    const Tensor m = input(mu.reshape({N, L}), "mu", mu, {N, L});
    const Tensor lv = input(logvar.reshape({N, L}), "logvar", mu, {N, L});
    Tensor pm, plv;
    if (prior) {
      TORCH_CHECK(prior_mu->sizes() == mu.sizes() && prior_logvar->sizes() == mu.sizes(),
                  "prior_mu and prior_logvar: expected mu's shape ", mu.sizes());
      pm = input(prior_mu->reshape({N, L}), "prior_mu", mu, {N, L});
      plv = input(prior_logvar->reshape({N, L}), "prior_logvar", mu, {N, L});
    }
    Tensor kl = output({N}, m);
    by_dtype(m, [&](auto tag) {
      using T = decltype(tag);
      kl_normal_forward<T>(ptr<T>(m), ptr<T>(lv), prior ? ptr<T>(pm) : nullptr, prior ? ptr<T>(plv) : nullptr, N, L,
                           ptr<T>(kl), threads(N * L));
    });
    ctx->save_for_backward(prior ? variable_list{m, lv, pm, plv} : variable_list{m, lv});
    ctx->saved_data["shape"] = mu.sizes().vec();
    return shaped(kl, mu.sizes().slice(0, mu.dim() - 1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool prior = saved.size() == 4;
    const Tensor &m = saved[0], &lv = saved[1];
    const int64_t N = m.size(0), L = m.size(1);
    const Tensor g = input(grads[0].reshape({N}), "grad_kl", m, {N});
    Tensor dmu = output({N, L}, m), dlv = output({N, L}, m);
    Tensor dpm = prior ? output({N, L}, m) : Tensor(), dplv = prior ? output({N, L}, m) : Tensor();
    by_dtype(m, [&](auto tag) {
      using T = decltype(tag);
      kl_normal_backward<T>(ptr<T>(g), ptr<T>(m), ptr<T>(lv), prior ? ptr<T>(saved[2]) : nullptr,
                            prior ? ptr<T>(saved[3]) : nullptr, N, L, ptr<T>(dmu), ptr<T>(dlv),
                            prior ? ptr<T>(dpm) : nullptr, prior ? ptr<T>(dplv) : nullptr, threads(N * L));
    });
    const auto shape = ctx->saved_data["shape"].toIntVector();
    return {dmu.view(shape), dlv.view(shape), prior ? dpm.view(shape) : Tensor(), prior ? dplv.view(shape) : Tensor()};
  }
};

std::tuple<Tensor, Tensor> sample_normal(const Tensor& mu, const Tensor& logvar, int64_t seed,
                                         std::optional<int64_t> n_samples) {
  auto out = SampleNormal::apply(mu, logvar, seed, n_samples);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> sample_normal_with_ratio(const Tensor& mu, const Tensor& logvar, int64_t seed,
                                                            int64_t n_samples, bool stop_score) {
  auto out = SampleNormalWithRatio::apply(mu, logvar, seed, n_samples, stop_score);
  return {out[0], out[1], out[2]};
}

Tensor bernoulli_log_prob(const Tensor& x, const Tensor& logits) { return BernoulliLogProb::apply(x, logits); }

Tensor kl_normal(const Tensor& mu, const Tensor& logvar, const std::optional<Tensor>& prior_mu,
                 const std::optional<Tensor>& prior_logvar) {
  return KLNormal::apply(mu, logvar, prior_mu, prior_logvar);
}

std::tuple<Tensor, Tensor, Tensor> logmeanexp(const Tensor& lw) {
  auto out = LogMeanExp::apply(lw);
  return {out[0], out[1], out[2]};
}

Tensor gaussian_log_prob(const Tensor& x, const Tensor& mean, const Tensor& var_param, bool softplus_mode,
                         double delta) {
  return GaussianLogProb::apply(x, mean, var_param, softplus_mode, delta);
}

}  // namespace

// The schemas mirror the Python ops' (fastvae/<op>.py), with the seed as an
// int: these are called only in eager mode, where reading it costs nothing.
TORCH_LIBRARY(fastvae_cpp, m) {
  m.def("sample_normal(Tensor mu, Tensor logvar, int seed, int? n_samples) -> (Tensor, Tensor)");
  m.def("sample_normal_with_ratio(Tensor mu, Tensor logvar, int seed, int n_samples, bool stop_score)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("bernoulli_log_prob(Tensor x, Tensor logits) -> Tensor");
  m.def("gaussian_log_prob(Tensor x, Tensor mean, Tensor var_param, bool softplus_mode, float delta) -> Tensor");
  m.def("logmeanexp(Tensor lw) -> (Tensor, Tensor, Tensor)");
  m.def("kl_normal(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar) -> Tensor");
}

// CompositeImplicitAutograd: the dispatcher runs these for the autograd key,
// and the autograd Function inside records the graph node.
TORCH_LIBRARY_IMPL(fastvae_cpp, CompositeImplicitAutograd, m) {
  m.impl("sample_normal", &sample_normal);
  m.impl("sample_normal_with_ratio", &sample_normal_with_ratio);
  m.impl("bernoulli_log_prob", &bernoulli_log_prob);
  m.impl("gaussian_log_prob", &gaussian_log_prob);
  m.impl("logmeanexp", &logmeanexp);
  m.impl("kl_normal", &kl_normal);
}

}  // namespace fastvae::torch_ops
