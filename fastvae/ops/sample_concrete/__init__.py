"""sample_concrete, described once: reparameterized relaxed-categorical
(Concrete / Gumbel-softmax) samples of logits (N, L, C) at a temperature per
latent, from C consecutive Philox uniforms per latent, with log q(z) summed
over L from the same Exp(1) noise t = -log u (fastvae/_philox.py's
``exp1``); ``hard`` is the straight-through one-hot. Given a prior
log-pmf log_p (L, C), the same launch also gives the analytic categorical KL
of each row, sum_l sum_c pi_c (log pi_c - log p_c) with pi = softmax(logits)
(noise-free: one value per row whatever the sample count), which an ELBO with a
OneHotCategorical (or Bernoulli) prior takes instead of ~8 separate torch ops.

The op's description and its oracle, from the uniforms of
fastvae/_philox.py (fastvae/ops/__init__.py lists the folder's files).
"""
from __future__ import annotations

import math

import torch
import torch.distributions as td
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._philox import exp1, philox_word
from ..._spec import Bench, Kernel, Op

# logits (N, L, C), C consecutive uniforms per latent
KERNELS = (
    Kernel("sample_concrete_forward", "sample_concrete",
           ("logits", "temperature", "seed", "hard", "offset0", "sample_stride", "row_stride", "z", "log_q",
            "log_p", "kl"),
           heavy="L"),
    Kernel("sample_concrete_backward", "sample_concrete",
           ("grad_z", "grad_log_q", "logits", "temperature", "seed", "stop_score", "dlogits", "grad_kl", "log_p"),
           heavy="L"),
)

# other kernels: the seed's randint and a float temperature's fill (N, L) (a tensor temperature is used as it is)
OP = Op("sample_concrete", tuple(k.name for k in KERNELS), "fastvae/ops/sample_concrete/test_sample_concrete.py",
        "sample_concrete", launches=(1, 1, 2), double_backward="not_twice", other_kernels=("full",),
        torch_ops=("sample_concrete",))


# -- the oracle ------------------------------------------------------------------


def concrete_noise(seed: int, offsets: Tensor, dtype: torch.dtype) -> Tensor:
    """The Exp(1) variates t = -log u (-log1p(-v) above 1/2) of the element
    offsets in float64 from the `dtype` uniforms; the Gumbel is g = -log t."""
    return exp1(philox_word(seed, offsets), accumulation_dtype(dtype))[0]


def concrete_terms(logits: Tensor, temperature: Tensor, t: Tensor):
    """(z, log_q, soft_z, w, count) per latent of logits (..., C), temperature
    (...) and the Exp(1) noise t (..., C), in the arguments' dtype (float64 in
    the oracle), -inf logits masked out of the simplex:
    y = (logits - max logits - log t) / temperature (the shift by the latent's
    largest unmasked logit changes nothing but keeps y finite), z = softmax(y) (0 where masked),
    log q = lgamma(C') + (C' - 1) log temperature - sum_c log z_c
    + sum_c log t_c - C' log sum_c t_c over the C' unmasked categories: the
    Concrete density (Maddison et al. 2017) with sum_c pi_c z_c^-temperature
    written through the noise (pi_c z_c^-temperature is proportional to t_c).
    w = t / sum_c t (the stop-score term)."""
    mask = logits > -math.inf
    lam = temperature[..., None]
    # only the logits' differences matter (softmax and the density are
    # shift-invariant): subtracting the latent's largest logit first keeps y
    # finite for logits of any size at any temperature (a detached constant:
    # the shift's own gradient is 0)
    top = torch.where(mask, logits, -math.inf).amax(-1, keepdim=True).detach()
    top = torch.where(top > -math.inf, top, 0.0)
    y = torch.where(mask, ((logits - top) - torch.log(t)) / lam, -math.inf)
    log_z = torch.log_softmax(y, dim=-1)
    z = torch.where(mask, torch.exp(log_z), 0.0)
    count = mask.sum(-1).to(t.dtype)
    tm = torch.where(mask, t, 0.0)
    sum_t = tm.sum(-1)
    log_q = (torch.lgamma(count) + (count - 1.0) * torch.log(temperature)
             - torch.where(mask, log_z, 0.0).sum(-1) + torch.where(mask, torch.log(t), 0.0).sum(-1)
             - count * torch.log(sum_t))
    return z, log_q, tm / sum_t[..., None], count


def concrete_kl(logits: Tensor, log_p: Tensor) -> Tensor:
    """The analytic categorical KL of each latent (..., L), sum_c pi_c (log pi_c
    - log p_c) with pi = softmax(logits (..., L, C)) and log_p broadcasting to
    (L, C), differentiable in both with plain autograd: a category with pi_c = 0
    (masked, -inf, or underflowed) adds 0, as torch's where(pi > 0, ...) does
    (its log pi and log p are replaced by 0 first, so no 0 * inf reaches a
    gradient); log p_c = -inf where pi_c > 0 gives +inf."""
    log_pi = torch.log_softmax(logits, -1)
    pi = torch.exp(log_pi)
    live = pi > 0
    log_p = log_p.to(log_pi.dtype).expand(log_pi.shape)
    terms = pi * (torch.where(live, log_pi, 0.0) - torch.where(live, log_p, 0.0))
    return torch.where(live, terms, 0.0).sum(-1)


def concrete_kl_grad(logits: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    """(d KL_l / d logits_c, d KL_l / d log_p_c) (..., L, C) in closed form:
    pi_c ((log pi_c - log p_c) - KL_l) and -pi_c, 0 where pi_c = 0."""
    log_pi = torch.log_softmax(logits, -1)
    pi = torch.exp(log_pi)
    live = pi > 0
    kl = concrete_kl(logits, log_p)[..., None]
    log_p = log_p.to(log_pi.dtype).expand(log_pi.shape)
    d = torch.where(live, pi * ((torch.where(live, log_pi, 0.0) - torch.where(live, log_p, 0.0)) - kl), 0.0)
    return d, -pi


def sample_concrete(logits: Tensor, temperature: Tensor, seed: int, n_samples: int,
                    hard: bool = False) -> tuple[Tensor, Tensor]:
    """(z (n_samples, ..., L, C), log q(z) (n_samples, ...)) in float64,
    differentiable with plain autograd in logits (the training layout's
    offsets: C consecutive uniforms per latent): the oracle of the fused op.
    hard: z is the one-hot of argmax, with the relaxed z's gradient."""
    offsets = torch.arange(n_samples * logits.numel(), dtype=torch.int64, device=logits.device)
    t = concrete_noise(seed, offsets, logits.dtype).reshape(n_samples, *logits.shape)
    z, log_q = concrete_terms(logits.double(), temperature.double().expand(logits.shape[:-1]), t)[:2]
    if hard:
        one_hot = torch.nn.functional.one_hot(z.argmax(-1), logits.shape[-1]).to(z.dtype)
        z = one_hot + z - z.detach()
    return z, log_q.sum(-1)


def sample_concrete_forward(logits: Tensor, temperature: Tensor, seed: int, hard: bool, offset0: int,
                            sample_stride: int, row_stride: int, z: Tensor, log_q: Tensor | None,
                            log_p: Tensor | None = None, kl: Tensor | None = None) -> None:
    """z (K, N, L, C) <- softmax((logits - log t) / temperature) (one-hot of its
    argmax when hard) with t the Exp(1) variate of the uniform at offset0 +
    k * sample_stride + n * row_stride + l * C + c; logits (N, L, C),
    temperature (N, L); log_q (K, N), when given, <- the Concrete log-density
    summed over L from the same t (concrete_terms); kl (N,), with the prior
    log-pmf log_p (L, C), <- the analytic categorical KL summed over L (concrete_kl)."""
    acc = accumulation_dtype(logits.dtype)
    K, N, L, C = z.shape
    k, n, lc = (torch.arange(d, dtype=torch.int64, device=logits.device) for d in (K, N, L * C))
    offsets = offset0 + k[:, None, None] * sample_stride + n[None, :, None] * row_stride + lc
    t = concrete_noise(seed, offsets, acc).reshape(K, N, L, C)
    zz, lq = concrete_terms(logits.double(), temperature.double(), t)[:2]
    if hard:
        zz = torch.nn.functional.one_hot(zz.argmax(-1), C).to(zz.dtype)
    z.copy_(zz)
    if log_q is not None:
        log_q.copy_(lq.sum(-1))
    if kl is not None:
        kl.copy_(concrete_kl(logits.double(), log_p.double()).sum(-1))


def sample_concrete_backward(grad_z: Tensor | None, grad_log_q: Tensor | None, logits: Tensor, temperature: Tensor,
                             seed: int, stop_score: bool, dlogits: Tensor, grad_kl: Tensor | None = None,
                             log_p: Tensor | None = None) -> None:
    """dlogits (N, L, C) from grad_z (K, N, L, C) and grad_log_q (K, N) (None: no
    gradient), t regenerated, z the relaxed sample (hard or not: straight-through):
    sum_k (z (grad_z - <z, grad_z>) + grad_log_q h) / temperature, with
    h = C' z - 1 (plain autograd) or, with stop_score (the score through z
    only), h = C' z + C' temperature w - (temperature + 1), w = t / sum t;
    masked categories get 0. grad_kl (N,), with log_p (L, C), adds the analytic
    KL's grad_kl pi_c ((log pi_c - log p_c) - KL_l) (concrete_kl_grad)."""
    samples = grad_z if grad_z is not None else grad_log_q
    K = 0 if samples is None else samples.shape[0]
    N, L, C = logits.shape
    offsets = torch.arange(K * N * L * C, dtype=torch.int64, device=logits.device)
    t = concrete_noise(seed, offsets, accumulation_dtype(logits.dtype)).reshape(K, N, L, C)
    lam = temperature.double()
    z, _, w, count = concrete_terms(logits.double(), lam, t)
    mask = logits > -math.inf
    d = torch.zeros(K, N, L, C, dtype=torch.float64, device=logits.device)
    if grad_z is not None:
        g = grad_z.double()
        d = d + z * (g - (z * g).sum(-1, keepdim=True))
    if grad_log_q is not None:
        gq = grad_log_q.double()[:, :, None, None]
        c = count[..., None]
        h = c * z + c * lam[..., None] * w - (lam[..., None] + 1.0) if stop_score else c * z - 1.0
        d = d + gq * h
    d = torch.where(mask, d.sum(0) / lam[..., None], 0.0)
    if grad_kl is not None:
        d = d + grad_kl.double()[:, None, None] * concrete_kl_grad(logits.double(), log_p.double())[0]
    dlogits.copy_(d)


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op sample_concrete) --

CATEGORIES = 16  # the aot cases' C (kernels/aot.py had it inline)


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (K samples of
    B rows of L latents): logits (B, L, C) at C = 16, plain and straight-through,
    both backward modes, and the evaluation's layout; m makes a tensor of the
    input dtype, r one of its accumulation dtype (kernels/aot.py)."""
    K, B, L, C = s["K"], s["B"], s["L"], CATEGORIES
    seed = torch.empty((), dtype=torch.int64, device="meta")
    for hard in (False, True):
        yield "sample_concrete_forward", dict(logits=m(B, L, C), temperature=m(B, L), seed=seed, hard=hard,
                                              offset0=0, sample_stride=B * L * C, row_stride=L * C,
                                              z=m(K, B, L, C), log_q=r(K, B), log_p=None, kl=None)
    for stop in (False, True):
        yield "sample_concrete_backward", dict(grad_z=m(K, B, L, C), grad_log_q=r(K, B), logits=m(B, L, C),
                                               temperature=m(B, L), seed=seed, stop_score=stop,
                                               dlogits=m(B, L, C), grad_kl=None, log_p=None)
    # the ELBO's draw with the analytic categorical KL (a OneHotCategorical prior)
    yield "sample_concrete_forward", dict(logits=m(B, L, C), temperature=m(B, L), seed=seed, hard=False,
                                          offset0=0, sample_stride=B * L * C, row_stride=L * C,
                                          z=m(K, B, L, C), log_q=r(K, B), log_p=r(L, C), kl=r(B))
    yield "sample_concrete_backward", dict(grad_z=m(K, B, L, C), grad_log_q=None, logits=m(B, L, C),
                                           temperature=m(B, L), seed=seed, stop_score=False,
                                           dlogits=m(B, L, C), grad_kl=r(B), log_p=r(L, C))
    yield "sample_concrete_forward", dict(logits=m(B, L, C), temperature=m(B, L), seed=seed, hard=False,
                                          offset0=7 * L * C + 1, sample_stride=L * C, row_stride=K * L * C,
                                          z=m(K, B, L, C), log_q=r(K, B), log_p=None, kl=None)


# -- the benchmark row (python -m benchmarks.bench_op sample_concrete) -------------
# Relaxed and straight-through (hard) at B = 4096 (--quick: 256), L = 32,
# C = 16, K = 1, a temperature of 0.5, float32: against torch.distributions as
# users write it (RelaxedOneHotCategorical's rsample and log_prob; hard: z made
# one-hot by z + (one_hot(argmax z) - z).detach(), log q of the relaxed z). The
# forward reads the logits and writes z, log q; the backward reads dz, dlog_q
# and the logits and writes their gradient; the noise is never stored.

_BENCH_TEMPERATURE = 0.5


def _bench_eager(logits: Tensor, hard: bool, n_samples: int):
    """The baseline: torch.distributions' rsample and log_prob."""
    q = td.RelaxedOneHotCategorical(torch.tensor(_BENCH_TEMPERATURE, device=logits.device), logits=logits)
    z = q.rsample((n_samples,))
    log_q = q.log_prob(z).sum(-1)
    if hard:
        z = z + (torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype) - z).detach()
    return z, log_q


def _bench_call(sample_concrete, logits: Tensor, hard: bool, n_samples: int):
    """fastvae.sample_concrete with the eager formula's arguments (hard is a keyword)."""
    return sample_concrete(logits, _BENCH_TEMPERATURE, n_samples, hard=hard)


def _bench_inputs(size: dict, device):
    B, L, C, K = size["B"], size["L"], size["C"], size["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(B, L, C, generator=g).to(device).requires_grad_()
    gz = torch.randn(K, B, L, C, generator=g).to(device)
    gq = torch.randn(K, B, generator=g).to(device)
    return (logits, size["hard"], K), [logits], (gz, gq)


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    B, L, C, K = size["B"], size["L"], size["C"], size["K"]
    fwd = (B * L * C + K * B * L * C + K * B) * itemsize  # logits -> z, log q
    bwd = (K * B * L * C + K * B + 2 * B * L * C) * itemsize  # dz, dlog_q, logits -> dlogits
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


BENCH = Bench("sample_concrete, temperature 0.5, float32",
              sizes=tuple({"hard": hard, "B": 4096, "L": 32, "C": 16, "K": 1} for hard in (False, True)),
              quick=tuple({"hard": hard, "B": 256, "L": 32, "C": 16, "K": 1} for hard in (False, True)),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=_bench_min_bytes, fastvae="sample_concrete",
              call=_bench_call, repeats=15)
