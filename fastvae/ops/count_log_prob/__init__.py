"""The count likelihoods, described once: a family of three ops
that share their kernels and code (fastvae/ops/__init__.py), each the decoder
likelihood of its likelihood= name:
- poisson_log_prob (likelihood="poisson"): log Poisson(x; e^log_rate);
- negative_binomial_log_prob (likelihood="negative_binomial"): scvi-tools'
  log_nb_positive in (log mean, log inverse dispersion theta), theta per
  element or per gene;
- zinb_log_prob (likelihood="zinb"): scvi-tools' log_zinb_positive (log
  mean, log theta, zero-inflation logits);
each summed over the last dimension D of the counts x, which broadcast over
the decoder samples.

This file is the family's description (its registry entries, its kernels'
argument names, its ahead-of-time cases and its benchmark row) and its
oracle: the plain-PyTorch formulas the reference backend runs and the tests
compare with. The rest of the family sits beside it (fastvae/ops/__init__.py
lists the files).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from ..._oracle_math import softplus
from ..._spec import Bench, Kernel, Op

# log_theta (K, P, D) or per gene (D,); counts get no gradient
KERNELS = (
    Kernel("poisson_log_prob_forward", "count_log_prob", ("x", "log_rate", "out")),
    Kernel("poisson_log_prob_backward", "count_log_prob", ("grad_out", "x", "log_rate", "dlog_rate")),
    Kernel("negative_binomial_log_prob_forward", "count_log_prob", ("x", "log_mean", "log_theta", "out")),
    Kernel("negative_binomial_log_prob_backward", "count_log_prob",
           ("grad_out", "x", "log_mean", "log_theta", "dlog_mean", "dlog_theta")),
    Kernel("zinb_log_prob_forward", "count_log_prob", ("x", "log_mean", "log_theta", "zi_logits", "out")),
    Kernel("zinb_log_prob_backward", "count_log_prob",
           ("grad_out", "x", "log_mean", "log_theta", "zi_logits", "dlog_mean", "dlog_theta", "dzi_logits")),
)

_TEST = "fastvae/ops/count_log_prob/test_count_log_prob.py"
OPS = (
    Op("poisson_log_prob", ("poisson_log_prob_forward", "poisson_log_prob_backward"), _TEST, "count_log_prob",
       likelihood="poisson", route="poisson_route",
       triton_ops=("poisson_log_prob", "poisson_log_prob_backward")),
    Op("negative_binomial_log_prob", ("negative_binomial_log_prob_forward", "negative_binomial_log_prob_backward"),
       _TEST, "count_log_prob", likelihood="negative_binomial",
       route="negative_binomial_route",
       triton_ops=("negative_binomial_log_prob", "negative_binomial_log_prob_backward")),
    Op("zinb_log_prob", ("zinb_log_prob_forward", "zinb_log_prob_backward"), _TEST, "count_log_prob",
       likelihood="zinb", route="zinb_route", triton_ops=("zinb_log_prob", "zinb_log_prob_backward")),
)


# -- the oracle ------------------------------------------------------------------
# Kernel layout: x (P, D) counts broadcast over K; log_mean (the Poisson log
# rate) and zi_logits (K, P, D); log_theta (K, P, D) or (D,) per gene.
# NB in scvi-tools' parameterization (mean mu, inverse dispersion theta),
# with a = log mu - log theta:
#   log p = -x softplus(-a) - theta softplus(a) + Dg,
#   Dg = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1),
# evaluated in the forms of count_log_prob.h (its header says why),
# which stay exact as theta -> inf (the Poisson limit) and for large counts.
# Counts get no gradient. Every where() below feeds its unselected branch safe
# values, so autograd through these functions never meets 0 * inf.


def _count_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _log1pmx_poly(s: Tensor) -> Tensor:
    """(log1p(s) - s) / s^2 = -1/2 + s/3 - s^2/4 + ... (for |s| < 0.1)."""
    p = torch.full_like(s, -1.0 / 16)
    for n in range(15, 1, -1):
        p = p * s + (1.0 if n % 2 else -1.0) / n
    return p


def _log1pmx(s: Tensor) -> Tensor:
    """log1p(s) - s for s > -1, with a series where it would cancel."""
    small = s.abs() < 0.1
    ss, sb = torch.where(small, s, 0.0), torch.where(small, 0.5, s)
    return torch.where(small, ss * ss * _log1pmx_poly(ss), torch.log1p(sb) - sb)


def _log1pmx_over(t: Tensor) -> Tensor:
    """(log1p(t) - t) / t for t >= 0 (0 at t = 0)."""
    small = t < 0.1
    ts, tb = torch.where(small, t, 0.0), torch.where(small, 0.5, t)
    return torch.where(small, ts * _log1pmx_poly(ts), (torch.log1p(tb) - tb) / tb)


def _stirling_corr(z: Tensor) -> Tensor:
    """lgamma(z) - ((z - 1/2) log z - z + log(2 pi)/2) for z >= 10."""
    iz = 1.0 / z
    iz2 = iz * iz
    return iz * (1 / 12 - iz2 * (1 / 360 - iz2 * (1 / 1260 - iz2 * (1 / 1680 - iz2 / 1188))))


def _digamma_corr(z: Tensor) -> Tensor:
    """log z - 1/(2z) - digamma(z) for z >= 10."""
    iz2 = 1.0 / (z * z)
    return iz2 * (1 / 12 - iz2 * (1 / 120 - iz2 * (1 / 252 - iz2 * (1 / 240 - iz2 / 132))))


def _poisson_side(x: Tensor, theta: Tensor) -> Tensor:
    return (theta >= 10.0) & (theta >= x + 1.0)


def nb_lgamma_term(x: Tensor, theta: Tensor) -> Tensor:
    """lgamma(x + theta) - lgamma(theta) - lgamma(x + 1), minus x log theta where
    theta >= 10 and theta >= x + 1 (the Poisson side); 0 where x = 0."""
    x, theta = torch.broadcast_tensors(x, theta)
    y = x + 1.0
    side = _poisson_side(x, theta)
    big_x = ~side & (y >= 10.0)
    direct = ~side & ~big_x
    x1, th1 = torch.where(side, x, 0.0), torch.where(side, theta, 10.0)
    t = x1 / th1
    c1 = (x1 * _log1pmx_over(t) + (x1 - 0.5) * torch.log1p(t) + _stirling_corr(th1 + x1) - _stirling_corr(th1)
          - torch.lgamma(x1 + 1.0))
    y2, th2 = torch.where(big_x, y, 10.0), torch.where(big_x, theta, 1.0)
    b = th2 - 1.0
    s = b / y2
    c2 = (b * torch.log(y2) + y2 * _log1pmx(s) + (b - 0.5) * torch.log1p(s) + _stirling_corr(y2 + b)
          - _stirling_corr(y2) - torch.lgamma(th2))
    x3, th3 = torch.where(direct, x, 0.0), torch.where(direct, theta, 1.0)
    c3 = torch.lgamma(x3 + th3) - torch.lgamma(th3) - torch.lgamma(x3 + 1.0)
    c = torch.where(side, c1, torch.where(big_x, c2, c3))
    return torch.where(x == 0, 0.0, c)


def nb_digamma_term(x: Tensor, theta: Tensor) -> Tensor:
    """theta (digamma(x + theta) - digamma(theta)), minus x on the Poisson side; 0 where x = 0."""
    x, theta = torch.broadcast_tensors(x, theta)
    side = _poisson_side(x, theta)
    x1, th1 = torch.where(side, x, 0.0), torch.where(side, theta, 10.0)
    dcorr = _digamma_corr(th1) - _digamma_corr(th1 + x1)  # theta * dcorr: 0, not inf * 0, at theta = inf
    e = x1 * _log1pmx_over(x1 / th1) + x1 / (2.0 * (x1 + th1)) + torch.where(dcorr == 0, 0.0, th1 * dcorr)
    x2, th2 = torch.where(side, 0.0, x), torch.where(side, 1.0, theta)
    psi = th2 * (torch.digamma(x2 + th2) - torch.digamma(th2))
    return torch.where(x == 0, 0.0, torch.where(side, e, psi))


def _log1p_over(u: Tensor) -> Tensor:
    """log1p(u) / u for u in [0, 1] (1 at u = 0)."""
    small = u < 0.05
    us, ub = torch.where(small, u, 0.0), torch.where(small, 0.5, u)
    p = torch.full_like(u, 1.0 / 13)  # sum (-u)^n / (n + 1), n <= 12
    for n in range(12, 0, -1):
        p = p * us + (1.0 if n % 2 else -1.0) / n
    return torch.where(small, p, torch.log1p(ub) / ub)


def _sigmoid_minus_log1p_over(u: Tensor) -> Tensor:
    """1 / (1 + u) - log1p(u) / u for u in [0, 1]: -u/2 + 2u^2/3 - ... below 0.05."""
    small = u < 0.05
    us, ub = torch.where(small, u, 0.0), torch.where(small, 0.5, u)
    p = torch.full_like(u, 12.0 / 13)
    for n in range(11, 0, -1):
        p = p * (-us) + n / (n + 1)
    return torch.where(small, -us * p, 1.0 / (1.0 + ub) - torch.log1p(ub) / ub)


def _nb_parts(log_mean: Tensor, log_theta: Tensor):
    """(a, u, m, neg) of count_log_prob.h's nb_element: a = lm - lt,
    u = e^-|a|, m = e^min(lm, lt)."""
    a = log_mean - log_theta
    neg = a < 0
    # branches, not abs/minimum, so that autograd is smooth at a = 0 (a tie gets no split subgradient)
    return a, torch.exp(torch.where(neg, a, -a)), torch.exp(torch.where(neg, log_mean, log_theta)), neg


def nb_theta_softplus(log_mean: Tensor, log_theta: Tensor) -> Tensor:
    """theta softplus(log mu - log theta) = theta log(1 + mu / theta): mu log1p(u)/u
    where mu < theta (-> mu as theta -> inf), theta softplus(a) otherwise."""
    a, u, m, neg = _nb_parts(log_mean, log_theta)
    return m * torch.where(neg, _log1p_over(u), a + torch.log1p(u))


def _times0(x: Tensor, t: Tensor) -> Tensor:
    """x * t with 0 where x == 0 (a zero count times log mu = -inf counts 0)."""
    zero = x == 0
    return torch.where(zero, 0.0, torch.where(zero, 0.0, x) * torch.where(zero, 0.0, t))


def nb_log_prob_terms(x: Tensor, log_mean: Tensor, log_theta: Tensor) -> Tensor:
    """log NB(x; mu, theta) per element (broadcasting), without the reduction."""
    theta = torch.exp(log_theta)
    a, u, _, neg = _nb_parts(log_mean, log_theta)
    l1pu = torch.log1p(u)
    side = _poisson_side(x, theta)
    pos_a, neg_a = torch.where(neg, 0.0, a), torch.where(neg, -a, 0.0)
    xs = torch.where(side, _times0(x, log_mean - pos_a - l1pu), -_times0(x, neg_a + l1pu))
    return xs - nb_theta_softplus(log_mean, log_theta) + nb_lgamma_term(x, theta)


def zinb_log_prob_terms(x: Tensor, log_mean: Tensor, log_theta: Tensor, zi_logits: Tensor) -> Tensor:
    """log ZINB per element: x = 0: logsumexp(log pi, log(1 - pi) + log NB(0));
    x > 0: log(1 - pi) + log NB(x), pi = sigmoid(zi_logits)."""
    nb = nb_log_prob_terms(x, log_mean, log_theta)
    zero = torch.logaddexp(-softplus(-zi_logits), -softplus(zi_logits) - nb_theta_softplus(log_mean, log_theta))
    return torch.where(x == 0, zero, nb - softplus(zi_logits))


def poisson_log_prob(x: Tensor, log_rate: Tensor) -> Tensor:
    """sum_D(x log_rate - exp(log_rate) - lgamma(x + 1)): log Poisson(x; exp(log_rate))."""
    return torch.sum(_times0(x, log_rate) - torch.exp(log_rate) - torch.lgamma(x + 1.0), dim=-1)


def negative_binomial_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor) -> Tensor:
    """sum_D log NB(x; mu, theta) (scvi-tools' log_nb_positive, in stable form)."""
    return torch.sum(nb_log_prob_terms(x, log_mean, log_theta), dim=-1)


def zinb_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor, zi_logits: Tensor) -> Tensor:
    """sum_D log ZINB(x; mu, theta, pi = sigmoid(zi_logits)) (scvi-tools' log_zinb_positive)."""
    return torch.sum(zinb_log_prob_terms(x, log_mean, log_theta, zi_logits), dim=-1)


def _count_inputs(acc, *tensors):
    return [None if t is None else t.to(acc) for t in tensors]


def poisson_log_prob_forward(x, log_rate, out) -> None:
    acc = _count_dtype(log_rate, x)
    x, lr = _count_inputs(acc, x, log_rate)
    out.copy_(poisson_log_prob(x, lr))


def poisson_log_prob_backward(grad_out, x, log_rate, dlog_rate) -> None:
    """d/dlog_rate = g (x - exp(log_rate))."""
    acc = _count_dtype(log_rate, x)
    x, lr, g = _count_inputs(acc, x, log_rate, grad_out)
    dlog_rate.copy_(g[..., None] * (x - torch.exp(lr)))


def negative_binomial_log_prob_forward(x, log_mean, log_theta, out) -> None:
    acc = _count_dtype(log_mean, x, log_theta)
    x, lm, lt = _count_inputs(acc, x, log_mean, log_theta)
    out.copy_(negative_binomial_log_prob(x, lm, lt))


def _nb_grads(x: Tensor, lm: Tensor, lt: Tensor):
    """(dlog_mean, dlog_theta, theta sigmoid(a), V) per element of log NB:
    dlm = x sigmoid(-a) - theta sigmoid(a); dlt = -x sigmoid(-a) + V + theta (psi(x + theta) - psi(theta)),
    V = theta sigmoid(a) - theta softplus(a) (series where it cancels), written on the
    Poisson side as x sigmoid(a) + V + (that digamma term - x)."""
    theta = torch.exp(lt)
    a, u, m, neg = _nb_parts(lm, lt)
    inv = 1.0 / (1.0 + u)
    sig_a, sig_neg_a = torch.where(neg, u * inv, inv), torch.where(neg, inv, u * inv)
    th_sig_a = m * inv
    v = m * torch.where(neg, _sigmoid_minus_log1p_over(u), inv - a - torch.log1p(u))
    dlm = _times0(x, sig_neg_a) - th_sig_a
    side = _poisson_side(x, theta)
    xs = torch.where(side, _times0(x, sig_a), -_times0(x, sig_neg_a))
    dlt = xs + v + nb_digamma_term(x, theta)
    return dlm, dlt, th_sig_a, v


def _sum_theta(d: Tensor, like: Tensor) -> Tensor:
    return d if d.shape == like.shape else d.reshape(-1, like.shape[-1]).sum(0)


def negative_binomial_log_prob_backward(grad_out, x, log_mean, log_theta, dlog_mean, dlog_theta) -> None:
    acc = _count_dtype(log_mean, x, log_theta)
    x, lm, lt, g = _count_inputs(acc, x, log_mean, log_theta, grad_out)
    dlm, dlt, _, _ = _nb_grads(x, lm, lt)
    g = g[..., None]
    if dlog_mean is not None:
        dlog_mean.copy_(g * dlm)
    if dlog_theta is not None:
        dlog_theta.copy_(_sum_theta(g * dlt, dlog_theta))


def zinb_log_prob_forward(x, log_mean, log_theta, zi_logits, out) -> None:
    acc = _count_dtype(log_mean, x, log_theta, zi_logits)
    x, lm, lt, zl = _count_inputs(acc, x, log_mean, log_theta, zi_logits)
    out.copy_(zinb_log_prob(x, lm, lt, zl))


def zinb_log_prob_backward(grad_out, x, log_mean, log_theta, zi_logits, dlog_mean, dlog_theta, dzi_logits) -> None:
    """x > 0: the NB gradients and dz = -sigmoid(z); x = 0, with A = log pi,
    B = log(1 - pi) - theta softplus(a) and w = sigmoid(B - A) (the NB branch's
    weight): dz = (1 - w) sigmoid(-z) - w sigmoid(z), dlm = -w theta sigmoid(a), dlt = w V."""
    acc = _count_dtype(log_mean, x, log_theta, zi_logits)
    x, lm, lt, z, g = _count_inputs(acc, x, log_mean, log_theta, zi_logits, grad_out)
    dlm, dlt, th_sig_a, v = _nb_grads(x, lm, lt)
    lpi = -softplus(-z)
    lnb0 = -softplus(z) - nb_theta_softplus(lm, lt)
    d = torch.nan_to_num(lpi - lnb0, nan=0.0)
    w = torch.sigmoid(-d)
    zero = x == 0
    g = g[..., None]
    if dlog_mean is not None:
        dlog_mean.copy_(g * torch.where(zero, -w * th_sig_a, dlm))
    if dlog_theta is not None:
        dlog_theta.copy_(_sum_theta(g * torch.where(zero, w * v, dlt), dlog_theta))
    if dzi_logits is not None:
        dzi_logits.copy_(g * torch.where(zero, torch.sigmoid(d) * torch.sigmoid(-z) - w * torch.sigmoid(z),
                                         -torch.sigmoid(z)))


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op poisson_log_prob) --


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the family makes at shape s: counts
    x (B, D) in the compute dtype against (K, B, D) decoder outputs, log theta
    per element or per gene (scVI's common case), the forward and the backward
    of each op; m makes a tensor of the input dtype, r one of its accumulation
    dtype (kernels/aot.py)."""
    K, B, D = s["K"], s["B"], s["D"]
    x = r(B, D)
    yield "poisson_log_prob_forward", dict(x=x, log_rate=m(K, B, D), out=r(K, B))
    yield "poisson_log_prob_backward", dict(grad_out=r(K, B), x=x, log_rate=m(K, B, D), dlog_rate=m(K, B, D))
    for op in ("negative_binomial_log_prob", "zinb_log_prob"):
        for theta in ((K, B, D), (D,)):
            args = dict(x=x, log_mean=m(K, B, D), log_theta=m(*theta))
            grads = dict(dlog_mean=m(K, B, D), dlog_theta=m(*theta))
            if op == "zinb_log_prob":
                args["zi_logits"], grads["dzi_logits"] = m(K, B, D), m(K, B, D)
            yield f"{op}_forward", dict(args, out=r(K, B))
            yield f"{op}_backward", dict(grad_out=r(K, B), **args, **grads)


# -- the benchmark row (python -m benchmarks.bench_op count_log_prob) -------------
# x (B, D) scRNA-like counts broadcast against (K, B, D) decoder outputs, with
# a per-gene log theta (scVI's dispersion="gene") for NB and ZINB: an scRNA-seq
# batch, B=512 cells, D=2000 genes, K=50 samples (Poisson also K=1), float32.
# A size's "op" picks the family's op; the eager formulas are as users write
# them (torch.distributions' Poisson, scvi-tools' log_nb_positive and
# log_zinb_positive), summed over genes.


def _bench_poisson(x, log_rate):
    return (x * log_rate - log_rate.exp() - torch.lgamma(x + 1)).sum(-1)


def _bench_nb(x, log_mean, log_theta):
    """log_nb_positive (scvi-tools) on mu = e^log_mean, theta = e^log_theta, eps = 1e-8."""
    eps = 1e-8
    mu, theta = log_mean.exp(), log_theta.exp()
    log_theta_mu_eps = torch.log(theta + mu + eps)
    res = (theta * (torch.log(theta + eps) - log_theta_mu_eps) + x * (torch.log(mu + eps) - log_theta_mu_eps)
           + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    return res.sum(-1)


def _bench_zinb(x, log_mean, log_theta, zi_logits):
    """log_zinb_positive (scvi-tools) on mu = e^log_mean, theta = e^log_theta, eps = 1e-8."""
    eps = 1e-8
    mu, theta, pi = log_mean.exp(), log_theta.exp(), zi_logits
    softplus_pi = F.softplus(-pi)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (log_theta_eps - log_theta_mu_eps)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    mul_case_zero = (x < eps).to(mu.dtype) * case_zero
    case_non_zero = (-softplus_pi + pi_theta_log + x * (torch.log(mu + eps) - log_theta_mu_eps)
                     + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    mul_case_non_zero = (x > eps).to(mu.dtype) * case_non_zero
    return (mul_case_zero + mul_case_non_zero).sum(-1)


_BENCH_EAGER = {"poisson_log_prob": _bench_poisson, "negative_binomial_log_prob": _bench_nb,
                "zinb_log_prob": _bench_zinb}


def _bench_eager(op: str, x: Tensor, *params: Tensor) -> Tensor:
    """The size's op as users write it."""
    return _BENCH_EAGER[op](x, *params)


def _bench_call(fn, op: str, x: Tensor, *params: Tensor) -> Tensor:
    """fastvae.<op>: the row's ``fastvae`` is one op of the family, whose
    public functions share one module (op.py), where the size's op is found."""
    return getattr(sys.modules[fn.__module__], op)(x, *params)


def _bench_counts(B: int, D: int, g: torch.Generator) -> Tensor:
    """scRNA-like counts: about 70% zeros, the rest geometric with mean 3."""
    u = torch.rand(B, D, generator=g)
    return torch.where(u < 0.7, 0.0, torch.floor(-3.0 * torch.log(torch.rand(B, D, generator=g))))


def _bench_has(op: str) -> tuple[bool, bool]:
    """(a per-gene log theta, zero-inflation logits) among the op's inputs."""
    return op != "poisson_log_prob", op == "zinb_log_prob"


def _bench_inputs(size: dict, device):
    B, D, K = size["B"], size["D"], size["K"]
    theta, zi = _bench_has(size["op"])
    g = torch.Generator().manual_seed(0)
    x = _bench_counts(B, D, g).to(device)
    params = [torch.randn(K, B, D, generator=g) + 0.5]
    if theta:
        params.append(torch.randn(D, generator=g))
    if zi:
        params.append(torch.randn(K, B, D, generator=g) - 1.0)
    params = [t.to(device).requires_grad_() for t in params]
    return (size["op"], x, *params), params, torch.randn(K, B, generator=g).to(device)


def _bench_min_bytes(size: dict) -> dict[str, int]:
    """The kernels' float32 reads and writes: x, the (K, B, D) inputs (each with
    a gradient of its size), a per-gene log theta and its gradient, out and its gradient."""
    B, D, K = size["B"], size["D"], size["K"]
    theta, zi = _bench_has(size["op"])
    full = 1 + zi  # (K, B, D) inputs
    fwd = 4 * (B * D + K * B + theta * D) + full * 4 * K * B * D
    bwd = 4 * (K * B + B * D + theta * 2 * D) + 2 * full * 4 * K * B * D
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def _bench_sizes(B: int, D: int, ks: dict[str, tuple[int, ...]]) -> tuple[dict, ...]:
    return tuple({"op": op, "B": B, "D": D, "K": K} for op, k in ks.items() for K in k)


BENCH = Bench("count_log_prob, B={B}, D={D}, per-gene theta, float32",
              sizes=_bench_sizes(512, 2000, {"poisson_log_prob": (1, 50), "negative_binomial_log_prob": (50,),
                                             "zinb_log_prob": (50,)}),
              quick=_bench_sizes(64, 500, {op.name: (4,) for op in OPS}),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=_bench_min_bytes, fastvae="zinb_log_prob",
              label_keys=("op", "K"), call=_bench_call, repeats=lambda size: None)
