// sample_concrete's eager CPU operator, fastvae_cpp::sample_concrete (a C++
// autograd Function around its kernels in sample_family.cpp), and the graph
// twins fastvae_cpu::sample_concrete / sample_concrete_backward, which a
// torch.compile graph calls (csrc/torch_ops.cpp says what these are). At a
// small model's sizes (100 x 30 latents of 10 categories) the Python
// Function's host path would cost about as much as the kernels.
// Compiled in one unit with csrc/torch_ops.cpp, which defines the libraries.
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "sample_family.h"
#include "torch_ops.h"

namespace fastvae::torch_ops {
namespace {

// op.py's not_twice message for this op: the backward is a kernel with no
// differentiable form (tests/test_torch_ops.py compares the two paths' errors).
constexpr const char* kConcreteNotTwice =
    "fastvae.sample_concrete does not support double backward (create_graph=True): its backward is a kernel with "
    "no differentiable form. Differentiate it once, or use fastvae.ops.sample_family.sample_concrete (plain "
    "PyTorch) where a second derivative is needed";

// (N, L, C) of logits (..., L, C), checked, with the sample count.
struct ConcreteRows {
  int64_t N, L, C;
};

ConcreteRows concrete_rows(const Tensor& logits, int64_t seed, int64_t K) {
  check_float(logits, "logits");
  TORCH_CHECK(logits.dim() >= 2, "logits: expected a tensor (..., L, C), got shape ", logits.sizes());
  TORCH_CHECK(K >= 1, "n_samples must be >= 1, got ", K);
  TORCH_CHECK(seed >= 0, "seed must be >= 0, got ", seed);
  const int64_t L = logits.size(-2), C = logits.size(-1);
  const int64_t N = c10::multiply_integers(logits.sizes().slice(0, logits.dim() - 2));
  TORCH_CHECK(N * L * C == 0 || K <= std::numeric_limits<int64_t>::max() / (N * L * C),
              "n_samples x logits.numel() overflows int64");
  return {N, L, C};
}

// logits (N, L, C) and temperature (N, L) as the kernels' contiguous inputs.
std::pair<Tensor, Tensor> concrete_inputs(const Tensor& logits, const Tensor& temperature, const ConcreteRows& r) {
  const Tensor a = input(as_shape(logits, {r.N, r.L, r.C}), "logits", logits, {r.N, r.L, r.C});
  TORCH_CHECK(temperature.sizes() == logits.sizes().slice(0, logits.dim() - 1), "temperature: expected shape ",
              logits.sizes().slice(0, logits.dim() - 1), ", got ", temperature.sizes());
  return {a, input(as_shape(temperature, {r.N, r.L}), "temperature", logits, {r.N, r.L})};
}

// A prior log-pmf broadcasting to (L, C) (given as (C,) or (L, C)) as the
// kernels' contiguous (L, C) input; undefined stays undefined.
Tensor concrete_log_p(const Tensor& log_p, const Tensor& a) {
  if (!log_p.defined()) return log_p;
  const int64_t L = a.size(1), C = a.size(2);
  TORCH_CHECK((log_p.dim() == 1 || log_p.dim() == 2) && log_p.size(-1) == C &&
                  (log_p.dim() == 1 || log_p.size(0) == L || log_p.size(0) == 1),
              "log_p: expected a prior log-pmf of shape (C,) or (L, C) = (", L, ", ", C, "), got ", log_p.sizes());
  return input(log_p.expand({L, C}), "log_p", a, {L, C});
}

// z (K, N, L, C), log_q (K, N), kl (N,) (with log_p (L, C); else an empty
// (0,) tensor) and, hard with keep_relaxed, the relaxed z (K, N, L, C) the
// one-hot is the argmax of (else an empty (0,) tensor), of the contiguous
// inputs, in the training layout.
std::tuple<Tensor, Tensor, Tensor, Tensor> concrete_forward(const Tensor& a, const Tensor& lam, int64_t seed,
                                                            bool hard, int64_t K, const Tensor& log_p,
                                                            bool keep_relaxed = false) {
  const int64_t N = a.size(0), L = a.size(1), C = a.size(2);
  Tensor z = output({K, N, L, C}, a), log_q = output({K, N}, a);
  Tensor kl = log_p.defined() ? output({N}, a) : at::empty({0}, a.options());
  Tensor relaxed = hard && keep_relaxed ? output({K, N, L, C}, a) : at::empty({0}, a.options());
  by_dtype(a, [&](auto tag) {
    using T = decltype(tag);
    sample_concrete_forward<T>(ptr<T>(a), ptr<T>(lam), uint64_t(seed), hard, 0, uint64_t(N * L * C), uint64_t(L * C),
                               K, N, L, C, ptr<T>(z), ptr<T>(log_q), log_p.defined() ? ptr<T>(log_p) : nullptr,
                               log_p.defined() ? ptr<T>(kl) : nullptr, threads(kConcreteWork * K * N * L * C),
                               relaxed.numel() ? ptr<T>(relaxed) : nullptr);
  });
  return {z, log_q, kl, relaxed};
}

// dlogits (N, L, C) from the upstream gradients of z (K, ..., L, C), log_q
// (K, ...) and kl (...), each undefined when its output has none; K is 0
// with neither of the first two. The KL's gradient needs log_p (L, C).
// z_saved, when defined, is the forward's relaxed z (K, N, L, C), which the
// kernel reads in place of regenerating the noise.
Tensor concrete_backward(const Tensor& grad_z, const Tensor& grad_log_q, bool stop_score, const Tensor& a,
                         const Tensor& lam, int64_t seed, int64_t K, const Tensor& grad_kl, const Tensor& log_p,
                         const Tensor& z_saved = Tensor()) {
  const int64_t N = a.size(0), L = a.size(1), C = a.size(2);
  const Tensor g = grad_z.defined() ? input(as_shape(grad_z, {K, N, L, C}), "grad_z", a, {K, N, L, C}) : Tensor();
  const Tensor gq = grad_log_q.defined() ? input(as_shape(grad_log_q, {K, N}), "grad_log_q", a, {K, N}) : Tensor();
  TORCH_CHECK(!grad_kl.defined() || log_p.defined(), "grad_kl: the KL's gradient needs log_p");
  const Tensor gk = grad_kl.defined() ? input(as_shape(grad_kl, {N}), "grad_kl", a, {N}) : Tensor();
  const Tensor lp = gk.defined() ? concrete_log_p(log_p, a) : Tensor();
  const Tensor zs = z_saved.defined() && K > 0 ? input(z_saved, "z_saved", a, {K, N, L, C}) : Tensor();
  Tensor d = output({N, L, C}, a);
  by_dtype(a, [&](auto tag) {
    using T = decltype(tag);
    auto opt = [](const Tensor& t) { return t.defined() ? ptr<T>(t) : nullptr; };
    sample_concrete_backward<T>(opt(g), opt(gq), ptr<T>(a), ptr<T>(lam), uint64_t(seed), stop_score, K, N, L, C,
                                ptr<T>(d), opt(gk), opt(lp), threads(kConcreteWork * std::max<int64_t>(K, 1) * N * L * C),
                                opt(zs));
  });
  return d;
}

// d passed through as a view, on a node linked to the op's inputs and upstream
// gradients (`links`) whose backward raises kConcreteNotTwice:
// fastvae/_double_backward.py's not_twice.
struct ConcreteNotTwice : torch::autograd::Function<ConcreteNotTwice> {
  static Tensor forward(AutogradContext*, const Tensor& d, const Tensor&, const Tensor&, const Tensor&) {
    return d.view_as(d);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, kConcreteNotTwice);
    return {};
  }
};

// n_samples None (stored as K = 1 with no sample dimension) gives z shaped like
// the logits and log_q like their batch: no indexing op (and its backward) after.
// log_p (a prior log-pmf, (C,) or (L, C), no gradient: op.py takes a learned
// prior to the Python Function) adds the analytic categorical KL (batch,),
// else kl is an empty (0,) tensor with no gradient. An absent log_p is passed
// as the temperature with has_log_p false (an autograd Function's inputs must
// be defined tensors).
struct SampleConcrete : torch::autograd::Function<SampleConcrete> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& temperature, int64_t seed,
                               bool hard, std::optional<int64_t> n_samples, bool stop_score, const Tensor& log_p,
                               bool has_log_p) {
    const int64_t K = n_samples.value_or(1);
    const ConcreteRows r = concrete_rows(logits, seed, K);
    const auto [a, lam] = concrete_inputs(logits, temperature, r);
    TORCH_CHECK(!has_log_p || !log_p.requires_grad(), "log_p: the C++ operator takes a prior log-pmf without gradient");
    const Tensor lp = has_log_p ? concrete_log_p(log_p, a) : Tensor();
    // the relaxed z spares the backward the noise's regeneration (about 60% of
    // its time): the output itself when relaxed (no memory cost where the
    // decoder keeps z for its own backward anyway), a copy the kernel writes
    // beside the one-hot when hard
    auto [z, log_q, kl, relaxed] = concrete_forward(a, lam, seed, hard, K, lp, logits.requires_grad());
    if (!lp.defined()) ctx->mark_non_differentiable({kl});
    ctx->set_materialize_grads(false);  // an output with no gradient gets none: no zeros
    // the logits link a double backward's error node
    ctx->save_for_backward({a, lam, logits, lp.defined() ? lp : a, hard ? (relaxed.numel() ? relaxed : a) : z});
    ctx->saved_data["z_saved"] = !hard || relaxed.numel() > 0;
    ctx->saved_data["has_kl"] = lp.defined();
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["K"] = K;
    ctx->saved_data["stop_score"] = stop_score;
    ctx->saved_data["shape"] = logits.sizes().vec();
    const auto batch = logits.sizes().slice(0, logits.dim() - 2);
    const Tensor kl_out = lp.defined() ? shaped(kl, batch) : kl;
    if (!n_samples) return {shaped(z, logits.sizes()), shaped(log_q, batch), kl_out};
    return {shaped(z, with_samples(K, logits.sizes())), shaped(log_q, with_samples(K, batch)), kl_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list none{Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const bool has_kl = ctx->saved_data["has_kl"].toBool() && grads[2].defined();
    if (!grads[0].defined() && !grads[1].defined() && !has_kl) return none;
    const auto saved = ctx->get_saved_variables();
    Tensor d;
    {
      at::NoGradGuard no_grad;  // the kernel's numbers; a double backward's error node is added below
      d = concrete_backward(grads[0].defined() ? grads[0].detach() : Tensor(),
                            grads[1].defined() ? grads[1].detach() : Tensor(), ctx->saved_data["stop_score"].toBool(),
                            saved[0], saved[1], ctx->saved_data["seed"].toInt(),
                            grads[0].defined() || grads[1].defined() ? ctx->saved_data["K"].toInt() : 0,
                            has_kl ? grads[2].detach() : Tensor(), has_kl ? saved[3] : Tensor(),
                            ctx->saved_data["z_saved"].toBool() ? saved[4] : Tensor());
    }
    d = d.view(ctx->saved_data["shape"].toIntVector());
    if (double_backward() && (saved[2].requires_grad() || (grads[0].defined() && grads[0].requires_grad()) ||
                              (grads[1].defined() && grads[1].requires_grad()) ||
                              (has_kl && grads[2].requires_grad()))) {
      // an absent upstream gradient is linked as the logits again (an input must be defined)
      auto link = [&](const Tensor& t) { return t.defined() ? t : saved[2]; };
      d = ConcreteNotTwice::apply(d, saved[2], link(grads[0]), link(grads[1]));
    }
    variable_list out = none;
    out[0] = d;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> sample_concrete(const Tensor& logits, const Tensor& temperature, int64_t seed,
                                                   bool hard, std::optional<int64_t> n_samples, bool stop_score,
                                                   const std::optional<Tensor>& log_p) {
  auto out = SampleConcrete::apply(logits, temperature, seed, hard, n_samples, stop_score,
                                   log_p.has_value() && log_p->defined() ? *log_p : temperature,
                                   log_p.has_value() && log_p->defined());
  return {out[0], out[1], out[2]};
}

// -- the graph twins (fastvae_cpu::*): op.py's layout, logits (N, L, C) ------------

std::tuple<Tensor, Tensor, Tensor, Tensor> graph_sample_concrete(const Tensor& logits, const Tensor& temperature,
                                                                 const Tensor& seed, bool hard, int64_t n_samples,
                                                                 const std::optional<Tensor>& log_p,
                                                                 bool keep_relaxed) {
  const int64_t s = seed_value(seed);
  const ConcreteRows r = concrete_rows(logits, s, n_samples);
  const auto [a, lam] = concrete_inputs(logits, temperature, r);
  auto [z, log_q, kl, relaxed] = concrete_forward(a, lam, s, hard, n_samples,
                                                  concrete_log_p(log_p.value_or(Tensor()), a), keep_relaxed);
  const auto batch = logits.sizes().slice(0, logits.dim() - 2);
  const auto z_shape = with_samples(n_samples, logits.sizes());
  return {shaped(z, z_shape), shaped(log_q, with_samples(n_samples, batch)),
          log_p.has_value() ? shaped(kl, batch) : kl, relaxed.numel() ? shaped(relaxed, z_shape) : relaxed};
}

Tensor graph_sample_concrete_backward(const Tensor& logits, const Tensor& temperature, const Tensor& seed,
                                      const std::optional<Tensor>& grad_z, const std::optional<Tensor>& grad_log_q,
                                      bool stop_score, const std::optional<Tensor>& grad_kl,
                                      const std::optional<Tensor>& log_p, const std::optional<Tensor>& z) {
  const int64_t s = seed_value(seed);
  const Tensor gz = grad_z.value_or(Tensor()), gq = grad_log_q.value_or(Tensor());
  const int64_t K = gz.defined() ? gz.size(0) : gq.defined() ? gq.size(0) : 0;
  const ConcreteRows r = concrete_rows(logits, s, std::max<int64_t>(K, 1));
  const auto [a, lam] = concrete_inputs(logits, temperature, r);
  // z, the forward's relaxed z, is read in place of the regenerated noise
  const bool has_z = z.has_value() && z->defined() && K > 0;
  TORCH_CHECK(!has_z || z->numel() == K * r.N * r.L * r.C, "z: expected the forward's relaxed z (", K, ", ..., ",
              r.L, ", ", r.C, ") of ", K * r.N * r.L * r.C, " elements, got shape ", z->sizes());
  const Tensor zs = has_z ? as_shape(*z, {K, r.N, r.L, r.C}) : Tensor();
  return shaped(concrete_backward(gz, gq, stop_score, a, lam, s, K, grad_kl.value_or(Tensor()),
                                  log_p.value_or(Tensor()), zs),
                logits.sizes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvae_cpp, m) {
  m.def("sample_concrete(Tensor logits, Tensor temperature, int seed, bool hard, int? n_samples, bool stop_score,"
        " Tensor? log_p=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(fastvae_cpu, m) {
  m.def("sample_concrete(Tensor logits, Tensor temperature, Tensor seed, bool hard, int n_samples,"
        " Tensor? log_p=None, bool keep_relaxed=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sample_concrete_backward(Tensor logits, Tensor temperature, Tensor seed, Tensor? grad_z,"
        " Tensor? grad_log_q, bool stop_score, Tensor? grad_kl=None, Tensor? log_p=None, Tensor? z=None) -> Tensor");
}

FASTVAE_TORCH_OP_IMPLS(sample_concrete)

}  // namespace fastvae::torch_ops
