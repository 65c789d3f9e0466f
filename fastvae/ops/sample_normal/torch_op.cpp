// sample_normal's eager CPU operators, fastvae_cpp::sample_normal,
// sample_normal_of_scale and sample_normal_with_ratio (C++ autograd Functions around the kernels of
// sample_normal.cpp), the DReG weights' hooks on the latter's outputs,
// fastvae_cpp::sample_normal_dreg_hooks, and the graph twins
// fastvae_cpu::sample_normal / sample_normal_with_ratio / sample_normal_backward,
// which a torch.compile graph calls (csrc/torch_ops.cpp says what these are;
// docs/architecture.md why). Compiled in one unit with csrc/torch_ops.cpp,
// which defines the libraries.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "sample_normal.h"
#include "torch_ops.h"

namespace fastvae::torch_ops {
namespace {

// -- sample_normal and sample_normal_with_ratio --------------------------------

// z (K, N, L) [and log_ratio (K, N)] for mu, logvar (N, L) as contiguous tensors.
// of_scale: lv holds the scales exp(logvar / 2) (sample_normal_of_scale); exp_z:
// z is exp of the draw (a LogNormal's), with no ratio.
void sample_forward(const Tensor& m, const Tensor& lv, int64_t seed, int64_t K, const Tensor& z, const Tensor& kl,
                    const Tensor* ratio, bool of_scale = false, bool exp_z = false) {
  const int64_t N = m.size(0), L = m.size(1);
  by_dtype(m, [&](auto tag) {
    using T = decltype(tag);
    sample_normal_forward<T>(ptr<T>(m), ptr<T>(lv), uint64_t(seed), 0, uint64_t(N * L), uint64_t(L), K, N, L,
                             ptr<T>(z), ptr<T>(kl), ratio ? ptr<T>(*ratio) : nullptr, threads(K * N * L), of_scale,
                             exp_z);
  });
}

// dmu, dlogvar (N, L) from the upstream gradients of z (K, N, L), kl (N,) and
// log_ratio (K, N), each undefined when its output has none (nothing is
// materialized): one kernel, which also folds in the log-ratio's path terms.
// K is 0 when neither z nor log_ratio has a gradient (the graph op's call).
// of_scale: lv holds the scales, and the second gradient is the scales';
// exp_z: grad_z is the gradient of the forward's exp_z draw.
std::pair<Tensor, Tensor> sample_backward(const Tensor& grad_z, const Tensor& grad_kl, const Tensor& grad_ratio,
                                          bool stop_score, const Tensor& m, const Tensor& lv, int64_t seed,
                                          int64_t K, bool of_scale = false, bool exp_z = false) {
  const int64_t N = m.size(0), L = m.size(1);
  const Tensor g = grad_z.defined() ? input(as_shape(grad_z, {K, N, L}), "grad_z", m, {K, N, L}) : Tensor();
  const Tensor gk = grad_kl.defined() ? input(as_shape(grad_kl, {N}), "grad_kl", m, {N}) : Tensor();
  const Tensor gr =
      grad_ratio.defined() ? input(as_shape(grad_ratio, {K, N}), "grad_log_ratio", m, {K, N}) : Tensor();
  Tensor dmu = output({N, L}, m), dlv = output({N, L}, m);
  by_dtype(m, [&](auto tag) {
    using T = decltype(tag);
    auto opt = [](const Tensor& t) { return t.defined() ? ptr<T>(t) : nullptr; };
    sample_normal_backward<T>(opt(g), opt(gk), opt(gr), ptr<T>(m), ptr<T>(lv), uint64_t(seed), stop_score, K, N, L,
                              ptr<T>(dmu), ptr<T>(dlv), threads(std::max<int64_t>(K, 1) * N * L), of_scale,
                              exp_z);
  });
  return {dmu, dlv};
}

// eps (K, N, L) of the seed, from the sampling kernel itself: for mu = 0 and
// logvar = 0 its z = 0 + 1 * eps is eps exactly.
Tensor noise(const Tensor& m, int64_t seed, int64_t K) {
  const int64_t N = m.size(0), L = m.size(1);
  const Tensor zeros = at::zeros({N, L}, m.options());
  Tensor z = at::empty({K, N, L}, m.options()), kl = at::empty({N}, m.options());
  sample_forward(zeros, zeros, seed, K, z, kl, nullptr);
  return z;
}

// sample_backward as differentiable ATen ops on the inputs mu, logvar (..., L)
// (m: mu as the kernels' (N, L)), for create_graph=True; as op.py's
// double_backward. With stop_score q's parameters enter log q as constants:
// its z-gradient (z - mu_c) / var_c is written
// ((mu - mu_c) / s_c) / s_c + eps e^(logvar / 2 - logvar_c), whose value eps / s
// stays finite however small s.
std::pair<Tensor, Tensor> sample_backward_graph(const Tensor& grad_z, const Tensor& grad_kl, const Tensor& grad_ratio,
                                                bool stop_score, const Tensor& mu, const Tensor& logvar,
                                                const Tensor& m, int64_t seed, int64_t K) {
  const Tensor s = at::exp(0.5 * logvar);
  const auto batch = mu.sizes().slice(0, mu.dim() - 1);
  Tensor dmu, dlv;
  if (grad_z.defined() || grad_ratio.defined()) {
    const auto shape = with_samples(K, mu.sizes());
    const Tensor eps = noise(m, seed, K).view(shape);
    Tensor dz = grad_z.defined() ? grad_z.reshape(shape) : Tensor();
    if (grad_ratio.defined()) {
      const Tensor gr = grad_ratio.reshape(with_samples(K, batch)).unsqueeze(-1);
      const Tensor z = mu + s * eps;
      if (stop_score) {
        const Tensor ih = at::exp(-0.5 * logvar.detach());
        add_to(dz, gr * ((mu - mu.detach()) * ih * ih + eps * at::exp(0.5 * logvar - logvar.detach()) - z));
      } else {
        add_to(dz, -gr * z);
        dlv = 0.5 * gr.sum(0);
      }
    }
    dmu = dz.sum(0);
    add_to(dlv, 0.5 * (dz * eps).sum(0) * s);
  }
  if (grad_kl.defined()) {
    const Tensor gk = grad_kl.reshape(batch).unsqueeze(-1);
    add_to(dmu, gk * mu);
    add_to(dlv, 0.5 * gk * (s * s - 1.0));
  }
  return {dmu, dlv};
}

// mu, logvar (..., L) -> contiguous (N, L), checked (logvar named b_name: a
// scale in its place is checked as "scale").
std::pair<Tensor, Tensor> latent_rows(const Tensor& mu, const Tensor& logvar, int64_t seed, int64_t K,
                                      const char* b_name = "logvar") {
  check_float(mu, "mu");
  const auto [N, L] = rows_of(mu);
  TORCH_CHECK(K >= 1, "n_samples must be >= 1, got ", K);
  TORCH_CHECK(seed >= 0, "seed must be >= 0, got ", seed);
  TORCH_CHECK(N * L == 0 || K <= std::numeric_limits<int64_t>::max() / (N * L),
              "n_samples x mu.numel() overflows int64");
  TORCH_CHECK(logvar.sizes() == mu.sizes(), b_name, ": expected shape ", mu.sizes(), ", got ", logvar.sizes());
  const Tensor m = input(as_shape(mu, {N, L}), "mu", mu, {N, L});
  return {m, input(as_shape(logvar, {N, L}), b_name, mu, {N, L})};
}

// n_samples None (stored as K = 1 with no sample dimension) gives z shaped like mu.
// of_scale: b is the scale exp(logvar / 2), a torch Normal's parameter, whose
// logvar 2 log(scale) the kernels take in their loops (two torch ops each way
// fewer than forming it), and b's gradient is the scale's; exp_z: z = exp of
// the draw, a torch LogNormal's (one torch op each way fewer again). Else b
// is logvar. The double backward forms logvar (and the exp) with ATen ops.
struct SampleNormal : torch::autograd::Function<SampleNormal> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& b, int64_t seed,
                               std::optional<int64_t> n_samples, bool of_scale, bool exp_z) {
    const int64_t K = n_samples.value_or(1);
    const auto [m, bb] = latent_rows(mu, b, seed, K, of_scale ? "scale" : "logvar");
    const int64_t N = m.size(0), L = m.size(1);
    Tensor z = output({K, N, L}, m), kl = output({N}, m);
    sample_forward(m, bb, seed, K, z, kl, nullptr, of_scale, exp_z);
    ctx->set_materialize_grads(false);  // an output with no gradient gets none: no zeros
    ctx->save_for_backward({m, bb, mu, b});  // the inputs, for a double backward
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["K"] = K;
    ctx->saved_data["of_scale"] = of_scale;
    ctx->saved_data["exp_z"] = exp_z;
    ctx->saved_data["shape"] = mu.sizes().vec();
    const auto batch = mu.sizes().slice(0, mu.dim() - 1);
    const std::vector<int64_t> z_shape = n_samples ? with_samples(K, mu.sizes()) : mu.sizes().vec();
    return {shaped(z, z_shape), shaped(kl, batch)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t K = ctx->saved_data["K"].toInt(), seed = ctx->saved_data["seed"].toInt();
    const bool of_scale = ctx->saved_data["of_scale"].toBool(), exp_z = ctx->saved_data["exp_z"].toBool();
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(6);
    if (double_backward()) {
      const Tensor &mu = saved[2], &b = saved[3];
      const Tensor logvar = of_scale ? 2.0 * at::log(b) : b;
      Tensor grad_y = grads[0];
      if (exp_z && grad_y.defined()) {  // z = exp(y): y's gradient dz * z, z as a function of mu and the scale
        const Tensor eps = noise(saved[0], seed, K).view(with_samples(K, mu.sizes()));
        grad_y = grad_y.reshape(eps.sizes()) * at::exp(mu + at::exp(0.5 * logvar) * eps);
      }
      auto [dmu, dlv] = sample_backward_graph(grad_y, grads[1], Tensor(), false, mu, logvar, saved[0], seed, K);
      if (of_scale && dlv.defined()) dlv = 2.0 * dlv / b;
      return {dmu, dlv, Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto [dmu, db] = sample_backward(grads[0], grads[1], Tensor(), false, saved[0], saved[1], seed, K, of_scale,
                                     exp_z);
    const auto shape = ctx->saved_data["shape"].toIntVector();
    return {dmu.view(shape), db.view(shape), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// z, kl and log_ratio = log N(z; 0, I) - log q(z) from the drawn eps; see
// op.py's SampleNormalWithRatio for the gradient.
struct SampleNormalWithRatio : torch::autograd::Function<SampleNormalWithRatio> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar, int64_t seed,
                               int64_t n_samples, bool stop_score) {
    const int64_t K = n_samples;
    const auto [m, lv] = latent_rows(mu, logvar, seed, K);
    const int64_t N = m.size(0), L = m.size(1);
    Tensor z = output({K, N, L}, m), kl = output({N}, m), ratio = output({K, N}, m);
    sample_forward(m, lv, seed, K, z, kl, &ratio);
    ctx->set_materialize_grads(false);  // an output with no gradient gets none: no zeros
    // z is recomputed from the regenerated eps; the inputs are kept for a double backward
    ctx->save_for_backward({m, lv, mu, logvar});
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
    if (double_backward()) {
      auto [dmu, dlv] = sample_backward_graph(grads[0], grads[1], grads[2], ctx->saved_data["stop_score"].toBool(),
                                              saved[2], saved[3], saved[0], ctx->saved_data["seed"].toInt(), K);
      return {dmu, dlv, Tensor(), Tensor(), Tensor()};
    }
    auto [dmu, dlv] = sample_backward(grads[0], grads[1], grads[2], ctx->saved_data["stop_score"].toBool(), saved[0],
                                      saved[1], ctx->saved_data["seed"].toInt(), K);
    const auto shape = ctx->saved_data["shape"].toIntVector();
    return {dmu.view(shape), dlv.view(shape), Tensor(), Tensor(), Tensor()};
  }
};

// -- DReG's gradient weights ------------------------------------------------------

// g passed through as a view; a second backward that reaches it raises
// `message`: fastvae/_double_backward.py's not_twice, as dreg_once uses it.
struct NotTwice : torch::autograd::Function<NotTwice> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const std::string& message) {
    ctx->saved_data["message"] = message;
    return g.view_as(g);
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, ctx->saved_data["message"].toStringRef());
    return {};
  }
};

// g * scale, behind NotTwice when the backward builds a graph (create_graph=True).
Tensor dreg_scaled(const Tensor& g, const Tensor& scale, const std::string& message) {
  Tensor scaled = g * scale;
  return double_backward() && scaled.requires_grad() ? NotTwice::apply(scaled, message) : scaled;
}

// The hooks of fastvae/objectives.py's _dreg_z_scale as C++ hooks: z's
// gradient times scale_z, log_ratio's times scale, each through dreg_scaled.
// Python hooks cost the eager IWAE step two calls back into Python in its
// backward (about 18 us here against the two products' 16).
void sample_normal_dreg_hooks(const Tensor& z, const Tensor& scale_z, const Tensor& log_ratio, const Tensor& scale,
                              c10::string_view message) {
  TORCH_CHECK(at::infer_size(z.sizes(), scale_z.sizes()) == z.sizes(), "scale_z of shape ", scale_z.sizes(),
              " must broadcast to z's ", z.sizes());
  TORCH_CHECK(at::infer_size(log_ratio.sizes(), scale.sizes()) == log_ratio.sizes(), "scale of shape ",
              scale.sizes(), " must broadcast to log_ratio's ", log_ratio.sizes());
  const std::string text(message);
  z.register_hook([scale_z, text](const Tensor& g) { return dreg_scaled(g, scale_z, text); });
  log_ratio.register_hook([scale, text](const Tensor& g) { return dreg_scaled(g, scale, text); });
}

std::tuple<Tensor, Tensor> sample_normal(const Tensor& mu, const Tensor& logvar, int64_t seed,
                                         std::optional<int64_t> n_samples) {
  auto out = SampleNormal::apply(mu, logvar, seed, n_samples, false, false);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> sample_normal_of_scale(const Tensor& mu, const Tensor& scale, int64_t seed,
                                                  std::optional<int64_t> n_samples, bool exp_z) {
  auto out = SampleNormal::apply(mu, scale, seed, n_samples, true, exp_z);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> sample_normal_with_ratio(const Tensor& mu, const Tensor& logvar, int64_t seed,
                                                            int64_t n_samples, bool stop_score) {
  auto out = SampleNormalWithRatio::apply(mu, logvar, seed, n_samples, stop_score);
  return {out[0], out[1], out[2]};
}

// -- the graph twins (fastvae_cpu::*) ---------------------------------------------

std::vector<Tensor> graph_sample(const Tensor& mu, const Tensor& logvar, const Tensor& seed, int64_t K,
                                 bool with_ratio) {
  const int64_t s = seed_value(seed);
  const auto [m, lv] = latent_rows(mu, logvar, s, K);
  const int64_t N = m.size(0), L = m.size(1);
  Tensor z = output({K, N, L}, m), kl = output({N}, m), ratio = with_ratio ? output({K, N}, m) : Tensor();
  sample_forward(m, lv, s, K, z, kl, with_ratio ? &ratio : nullptr);
  const auto batch = mu.sizes().slice(0, mu.dim() - 1);
  std::vector<Tensor> out{shaped(z, with_samples(K, mu.sizes())), shaped(kl, batch)};
  if (with_ratio) out.push_back(shaped(ratio, with_samples(K, batch)));
  return out;
}

std::tuple<Tensor, Tensor> graph_sample_normal(const Tensor& mu, const Tensor& logvar, const Tensor& seed,
                                               int64_t n_samples) {
  auto out = graph_sample(mu, logvar, seed, n_samples, false);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> graph_sample_normal_with_ratio(const Tensor& mu, const Tensor& logvar,
                                                                  const Tensor& seed, int64_t n_samples) {
  auto out = graph_sample(mu, logvar, seed, n_samples, true);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> graph_sample_normal_backward(const Tensor& mu, const Tensor& logvar, const Tensor& seed,
                                                        const std::optional<Tensor>& grad_z,
                                                        const std::optional<Tensor>& grad_kl,
                                                        const std::optional<Tensor>& grad_log_ratio, bool stop_score) {
  const int64_t s = seed_value(seed);
  const Tensor gz = grad_z.value_or(Tensor()), gk = grad_kl.value_or(Tensor()), gr = grad_log_ratio.value_or(Tensor());
  const int64_t K = gz.defined() ? gz.size(0) : gr.defined() ? gr.size(0) : 0;
  const auto [m, lv] = latent_rows(mu, logvar, s, std::max<int64_t>(K, 1));
  auto [dmu, dlv] = sample_backward(gz, gk, gr, stop_score, m, lv, s, K);
  return {shaped(dmu, mu.sizes()), shaped(dlv, mu.sizes())};
}

}  // namespace

// The schemas mirror the Python ops' (op.py), with the seed as an int: these
// are called only in eager mode, where reading it costs nothing.
TORCH_LIBRARY_FRAGMENT(fastvae_cpp, m) {
  m.def("sample_normal(Tensor mu, Tensor logvar, int seed, int? n_samples) -> (Tensor, Tensor)");
  m.def("sample_normal_of_scale(Tensor mu, Tensor scale, int seed, int? n_samples, bool exp_z=False)"
        " -> (Tensor, Tensor)");
  m.def("sample_normal_with_ratio(Tensor mu, Tensor logvar, int seed, int n_samples, bool stop_score)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("sample_normal_dreg_hooks(Tensor z, Tensor scale_z, Tensor log_ratio, Tensor scale, str message) -> ()");
}

TORCH_LIBRARY_IMPL(fastvae_cpp, CompositeImplicitAutograd, m) {
  m.impl("sample_normal", &sample_normal);
  m.impl("sample_normal_of_scale", &sample_normal_of_scale);
  m.impl("sample_normal_with_ratio", &sample_normal_with_ratio);
  m.impl("sample_normal_dreg_hooks", &sample_normal_dreg_hooks);
}

TORCH_LIBRARY_FRAGMENT(fastvae_cpu, m) {
  m.def("sample_normal(Tensor mu, Tensor logvar, Tensor seed, int n_samples) -> (Tensor, Tensor)");
  m.def("sample_normal_with_ratio(Tensor mu, Tensor logvar, Tensor seed, int n_samples) -> (Tensor, Tensor, Tensor)");
  m.def("sample_normal_backward(Tensor mu, Tensor logvar, Tensor seed, Tensor? grad_z, Tensor? grad_kl,"
        " Tensor? grad_log_ratio, bool stop_score) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvae_cpu, CPU, m) {
  m.impl("sample_normal", &graph_sample_normal);
  m.impl("sample_normal_with_ratio", &graph_sample_normal_with_ratio);
  m.impl("sample_normal_backward", &graph_sample_normal_backward);
}

}  // namespace fastvae::torch_ops
