"""Plain-PyTorch reference of every fastvae op not yet moved to a folder of its
own (an op folder's oracle is its ``__init__.py``): the test oracle and the
``reference`` backend.

Everything here is written for clarity, not speed, and runs in float64 when
given float64. The Philox stream is emulated with int64 tensor arithmetic
(fastvae/_philox.py) so that the reference draws exactly the noise the
kernels draw (see the RNG contract in docs/architecture.md): the float32
uniforms are bit-exact, and the Box-Muller transform is then evaluated in
float64.

Functions named ``<op>`` are differentiable (plain autograd) and serve as the
oracle for gradients; ``<op>_forward`` / ``<op>_backward`` are the explicit
formulas that the reference backend runs inside the custom ops.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dtypes import accumulation_dtype
from ._philox import (  # noqa: F401 (the reference backend's randn_fill and uniform_fill; the tests read the stream here)
    folded,
    philox_bits,
    philox_randn,
    philox_uniform,
    philox_words,
    randn_fill,
    sample_noise,
    uniform64_from_bits,
    uniform_fill,
    uniform_from_bits,
)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return accumulation_dtype(x.dtype)


# --------------------------------------------------------------------------
# gaussian_log_prob, bernoulli_log_prob
#
# Kernel layout (set up by fastvae/_likelihood_layout.py): mean (K, P, D); x (P, D)
# broadcast over K, or (K, P, D); the variance parameter v is (K, P, D),
# (P, D) or (D,). Plain broadcasting covers every case here.
# --------------------------------------------------------------------------

LOG_2PI = math.log(2.0 * math.pi)


def softplus(r: Tensor) -> Tensor:
    """log(1 + e^r) without overflow or the cut-off torch's softplus applies at r > 20."""
    return torch.logaddexp(torch.zeros_like(r), r)


def gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """-0.5 * sum((x - mean)^2 * exp(-logvar) + logvar + log 2 pi) over the last dim (broadcasting).

    Where x == mean exactly the squared term is 0 whatever the variance: an
    underflowing variance (exp(-logvar) = inf) must not give 0 * inf = NaN, in
    the value or, through the unselected branch of a where, in the gradient."""
    diff = x - mean
    exact = diff == 0
    return -0.5 * torch.sum(diff * diff * torch.exp(-torch.where(exact, 0.0, logvar)) + logvar + LOG_2PI, dim=-1)


def gaussian_log_prob_softplus(x: Tensor, mean: Tensor, softplus_var: Tensor, delta: float) -> Tensor:
    """The same with variance softplus(softplus_var) + delta (the lecture notes' decoder)."""
    var = softplus(softplus_var) + delta
    return -0.5 * torch.sum((x - mean) ** 2 / var + torch.log(var) + LOG_2PI, dim=-1)


def _times(a: Tensor, b: Tensor) -> Tensor:
    """a * b with 0 * inf = 0: a certain outcome weighted by zero contributes nothing.
    Only those elements are masked, so every other one keeps its gradient."""
    zero = (a == 0) & b.isinf()
    return torch.where(zero, 0.0, a) * torch.where(zero, 0.0, b)


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """sum(x * logits - softplus(logits)) over the last dim: log Bernoulli(x; sigmoid(logits)),
    written -(x softplus(-l) + (1 - x) softplus(l)) so that saturated logits (+-inf) give
    0 where the outcome is certain and right and -inf where it is certain and wrong."""
    return -torch.sum(_times(x, softplus(-logits)) + _times(1.0 - x, softplus(logits)), dim=-1)


def gaussian_log_prob_forward(x, mean, var_param, softplus_mode: bool, delta: float, out) -> None:
    acc = _compute_dtype(mean)
    x, mean, v = x.to(acc), mean.to(acc), var_param.to(acc)
    if softplus_mode:
        out.copy_(gaussian_log_prob_softplus(x, mean, v, delta))
    else:
        out.copy_(gaussian_log_prob(x, mean, v))


def _sum_to(t: Tensor, shape) -> Tensor:
    """Sum a broadcast gradient back to an operand's shape."""
    while t.dim() > len(shape):
        t = t.sum(0)
    return t


def gaussian_log_prob_backward(grad_out, x, mean, var_param, softplus_mode, delta, dx, dmean, dvar_param) -> None:
    """d/dmean = g (x - m) / var;  d/dlogvar = g ((x - m)^2 / var - 1) / 2;
    softplus: d/dr = g ((x - m)^2 / var^2 - 1 / var) / 2 * sigmoid(r);  d/dx = -d/dmean."""
    acc = _compute_dtype(mean)
    x, mean, v, g = x.to(acc), mean.to(acc), var_param.to(acc), grad_out.to(acc)[..., None]
    diff = x - mean
    if softplus_mode:
        var = softplus(v) + delta
        inv = 1.0 / var
        gv = 0.5 * g * (diff * diff * inv * inv - inv) * torch.sigmoid(v)
    else:
        inv = torch.where(diff == 0, 0.0, torch.exp(-v))  # x == mean: no 0 * inf
        gv = 0.5 * g * (diff * diff * inv - 1.0)
    gm = g * diff * inv
    dmean.copy_(gm)
    if dvar_param is not None:
        dvar_param.copy_(_sum_to(gv, dvar_param.shape))
    if dx is not None:
        dx.copy_(_sum_to(-gm, dx.shape))


def bernoulli_log_prob_forward(x, logits, out) -> None:
    acc = _compute_dtype(logits)
    out.copy_(bernoulli_log_prob(x.to(acc), logits.to(acc)))


def bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """d/dlogits = g (x - sigmoid(l));  d/dx = g l."""
    acc = _compute_dtype(logits)
    x, logits, g = x.to(acc), logits.to(acc), grad_out.to(acc)[..., None]
    dlogits.copy_(_times(g, x - torch.sigmoid(logits)))
    if dx is not None:
        dx.copy_(_sum_to(g * logits, dx.shape))


# ==========================================================================
# Importance weighting (logmeanexp, importance_weights, effective_sample_size).
# Log-weights lw are (K, ...), reduced over the leading
# sample dim K. A column's state is (m, s): m the largest non-NaN log-weight
# (-inf if none), s = sum_k exp(lw_k - shift(m)) with shift(m) = m when finite,
# else 0. The differentiable oracles below route their gradients around the
# empty (all -inf) columns with where() on safe values, so those get zero
# gradients instead of inf * 0 = NaN.
# ==========================================================================


def _lme_shift(m: Tensor) -> Tensor:
    return torch.where(m.isinf(), torch.zeros_like(m), m)


def logmeanexp_state(lw: Tensor) -> tuple[Tensor, Tensor]:
    """(m, s) over dim 0; m carries no gradient (the shift cancels in every
    quantity derived from the state), s does."""
    m = torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw).amax(0).detach()
    return m, torch.exp(lw - _lme_shift(m)).sum(0)


def _logmeanexp_from_state(m: Tensor, s: Tensor, K: int) -> Tensor:
    empty = s == 0
    out = _lme_shift(m) + torch.log(torch.where(empty, torch.ones_like(s), s)) - math.log(K)
    return torch.where(empty, torch.full_like(s, -math.inf), out)


def logmeanexp(lw: Tensor) -> Tensor:
    """log(mean_k exp(lw_k)) over dim 0: -inf with zero gradient for an all -inf column."""
    return _logmeanexp_from_state(*logmeanexp_state(lw), lw.shape[0])


def importance_weights(lw: Tensor) -> Tensor:
    """softmax over dim 0; all-zero weights for an all -inf column."""
    m, s = logmeanexp_state(lw)
    return torch.exp(lw - _lme_shift(m)) / torch.where(s == 0, torch.ones_like(s), s)


def effective_sample_size(lw: Tensor) -> Tensor:
    """1 / sum_k w_k^2 of the normalized weights; 0 for an all -inf column."""
    q = importance_weights(lw).square().sum(0)
    empty = q == 0
    return torch.where(empty, torch.zeros_like(q), 1.0 / torch.where(empty, torch.ones_like(q), q))


def logmeanexp_forward(lw, lw_max, sumexp, out, ess) -> None:
    """lw_max, sumexp (M,) <- the state of lw (K, M); out = logmeanexp and
    ess = sumexp^2 / sum_k exp(2 (lw_k - shift)) (0 if sumexp = 0) when given."""
    x = lw.to(_compute_dtype(lw))
    m_ref, s_ref = logmeanexp_state(x)
    lw_max.copy_(m_ref)
    sumexp.copy_(s_ref)
    if out is not None:
        out.copy_(_logmeanexp_from_state(m_ref, s_ref, x.shape[0]))
    if ess is not None:
        s2 = torch.exp(2.0 * (x - _lme_shift(m_ref))).sum(0)
        ess.copy_(torch.where(s_ref == 0, torch.zeros_like(s_ref), s_ref * s_ref / s2))


def _merge_state(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """The state of the union of two disjoint sample sets; an empty side
    (max -inf) contributes 0 (its sum, 0 or NaN, times 0)."""
    m = torch.maximum(m1, m2)

    def rescale(mo):
        return torch.where(mo == -math.inf, torch.zeros_like(mo), torch.exp(_lme_shift(mo) - _lme_shift(m)))

    return m, s1 * rescale(m1) + s2 * rescale(m2)


def logmeanexp_accumulate(lw, latent, lw_max, sumexp, sq_max, sq_sumexp, first) -> None:
    """(lw_max, sumexp) <- its merge with the state of x = lw + latent (K, M)
    (lw when latent is None), (sq_max, sq_sumexp) <- its merge with the state
    of 2 x; with first the states of x and 2 x are written instead."""
    acc = _compute_dtype(lw)
    x = lw.to(acc) if latent is None else lw.to(acc) + latent.to(acc)
    for mx, sx, y in ((lw_max, sumexp, x), (sq_max, sq_sumexp, 2.0 * x)):
        m, s = logmeanexp_state(y)
        if not first:
            m, s = _merge_state(mx.to(acc), sx.to(acc), m, s)
        mx.copy_(m)
        sx.copy_(s)


def logmeanexp_backward(lw, lw_max, sumexp, grad_out, grad_sumexp, ess, dlw) -> None:
    """dlw = e * (a + b e), e = exp(lw - lw_max) (exp(lw) where lw_max = -inf); per column,
    inv = 1 / sumexp (0 where sumexp = 0): a = grad_out inv + grad_sumexp, b = 0 without
    ess; a = 2 grad_out ess inv, b = -a ess inv with ess."""
    acc = _compute_dtype(lw)
    mx = lw_max.to(acc)
    # shift by lw_max itself unless it is -inf (a +inf column then gives 0, and NaN
    # at the +inf entry, as the gradient of torch.logsumexp)
    e = torch.exp(lw.to(acc) - torch.where(mx == -math.inf, torch.zeros_like(mx), mx))
    s, g = sumexp.to(acc), grad_out.to(acc)
    inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    if ess is None:
        a = g * inv + (0.0 if grad_sumexp is None else grad_sumexp.to(acc))
        dlw.copy_(e * a)
    else:
        ess = ess.to(acc)
        dlw.copy_(2.0 * g * ess * inv * e * (1.0 - ess * inv * e))


def importance_weights_backward(grad_w, w, dlw) -> None:
    """dlw = w * (grad_w - sum_k grad_w * w)."""
    acc = _compute_dtype(w)
    grad_w, w = grad_w.to(acc), w.to(acc)
    dlw.copy_(w * (grad_w - (grad_w * w).sum(0)))


# ==========================================================================
# Count likelihoods: poisson_log_prob, negative_binomial_log_prob, zinb_log_prob
#
# Kernel layout: x (P, D) counts broadcast over K; log_mean (the Poisson log
# rate) and zi_logits (K, P, D); log_theta (K, P, D) or (D,) per gene.
# NB in scvi-tools' parameterization (mean mu, inverse dispersion theta),
# with a = log mu - log theta:
#   log p = -x softplus(-a) - theta softplus(a) + Dg,
#   Dg = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1),
# evaluated in the forms of csrc/count_likelihood.h (its header says why),
# which stay exact as theta -> inf (the Poisson limit) and for large counts.
# Counts get no gradient. Every where() below feeds its unselected branch safe
# values, so autograd through these functions never meets 0 * inf.
# ==========================================================================


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
    """(a, u, m, neg) of csrc/count_likelihood.h's nb_element: a = lm - lt,
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
# continuous_bernoulli_log_prob: x (P, D) in [0, 1] against logits (K, P, D);
# the Bernoulli term plus the log normalizer log C(l) of Loaiza-Ganem and
# Cunningham (2019).
# ==========================================================================


# log C(l) = log(l / tanh(l / 2)) = log 2 + sum_n CB_TAYLOR[n - 1] l^(2n), and
# d log C / dl = 1/l - 1/sinh(l) = sum_n 2n CB_TAYLOR[n - 1] l^(2n - 1): the
# coefficients 2 (2^(2n-1) - 1) B_2n / (2n)! / (2n) of the csch series, B the
# Bernoulli numbers (ratio about 1/pi^2 from one to the next).
CB_TAYLOR = (1 / 12, -7 / 1440, 31 / 90720, -127 / 4838400, 73 / 34214400, -1414477 / 7846046208000,
             8191 / 523069747200, -16931177 / 12194997534720000)
# Below this |logit| the gradient's Taylor branch: 1/l - 1/sinh(l) cancels
# there (l = 0.25 loses 7 bits); 8 terms leave 3e-21 at the branch point.
CB_TAYLOR_BELOW = 0.25


def _cb_log_norm_grad(lg: Tensor) -> Tensor:
    a = lg.abs()
    small = a < CB_TAYLOR_BELOW
    ls = torch.where(small, lg, 0.0)
    u = ls * ls
    poly = torch.zeros_like(lg)
    for n in range(len(CB_TAYLOR), 0, -1):
        poly = poly * u + 2 * n * CB_TAYLOR[n - 1]
    a_big = torch.where(small, 1.0, a)
    t = torch.exp(-a_big)
    exact = torch.sign(lg) * (1.0 / a_big - 2.0 * t / ((1.0 - t) * (1.0 + t)))
    return torch.where(small, poly * ls, exact)


class _CBLogNorm(torch.autograd.Function):
    """log C(l) by the closed form log(a / -expm1(-a)) + log1p(e^-a), a = |l|
    (accurate for every a > 0 in float64: expm1 is), log 2 at 0; its
    gradient 1/l - 1/sinh(l) with a Taylor branch near 0."""

    @staticmethod
    def forward(ctx, lg):
        ctx.save_for_backward(lg)
        a = lg.abs()
        zero = a == 0
        a1 = torch.where(zero, 1.0, a)
        value = torch.log(a1 / -torch.expm1(-a1)) + torch.log1p(torch.exp(-a1))
        return torch.where(zero, math.log(2.0), value)

    @staticmethod
    def backward(ctx, g):
        (lg,) = ctx.saved_tensors
        return g * _cb_log_norm_grad(lg)


def continuous_bernoulli_log_norm(lg: Tensor) -> Tensor:
    """log C(l), the continuous Bernoulli's log normalizer at logit l: C(l) =
    l / tanh(l / 2) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda), lambda = sigmoid(l)."""
    return _CBLogNorm.apply(lg)


def continuous_bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """sum over the last dim of x l - softplus(l) + log C(l) (finite logits, x in [0, 1])."""
    return (x * logits - softplus(logits) + continuous_bernoulli_log_norm(logits)).sum(-1)


def continuous_bernoulli_log_prob_forward(x, logits, out) -> None:
    acc = _compute_dtype(logits)
    out.copy_(continuous_bernoulli_log_prob(x.to(acc), logits.to(acc)))


def continuous_bernoulli_log_prob_backward(grad_out, x, logits, dx, dlogits) -> None:
    """d/dlogits = g (x - sigmoid(l) + 1/l - 1/sinh(l));  d/dx = g l (summed over samples)."""
    acc = _compute_dtype(logits)
    x, logits, g = x.to(acc), logits.to(acc), grad_out.to(acc)[..., None]
    dlogits.copy_(g * (x - torch.sigmoid(logits) + _cb_log_norm_grad(logits)))
    if dx is not None:
        dx.copy_(_sum_to(g * logits, dx.shape))
# discretized_logistic_mixture_log_prob (PixelCNN++'s likelihood; Salimans et
# al. 2017, openai/pixel-cnn nn.py discretized_mix_logistic_loss).
#
# Kernel layout: x (P, C, S), S = H * W pixels, broadcast over K; either the
# packed PixelCNN++ params (K, P, 10 M, S) with C = 3 (means and log_scales
# None), or the mixture logits (K, P, M, S) with means and log_scales
# (K, P, M, C, S) and no channel coupling. out (K, P): summed over pixels.
# --------------------------------------------------------------------------

DLM_EDGE = 0.999  # PixelCNN++'s tests for the first and last bin: x < -0.999, x > 0.999
DLM_LOG_MIN_DELTA = math.log(1e-5)  # below a bin mass of 1e-5: the log pdf at the bin's centre
DLM_LOG_SCALE_MIN = -7.0  # PixelCNN++'s floor of the log scales
_LN2 = math.log(2.0)


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - e^-d) for d >= 0 (Maechler's two branches, no cancellation)."""
    return torch.where(d <= _LN2, torch.log(-torch.expm1(-d)), torch.log1p(-torch.exp(-d)))


def discretized_logistic_terms(x: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int):
    """(lp, dlp/dmean, dlp/dlog_scale) of one discretized logistic per element.

    With s = max(log_scale, -7), inv = e^-s, h = 1 / (num_bins - 1) (half a
    bin), a = inv (x - mean + h), b = inv (x - mean - h):
    - x < -0.999 (the first bin, down to -inf): log sigmoid(a) = -softplus(-a);
    - x > 0.999 (the last bin, up to +inf): log(1 - sigmoid(b)) = -softplus(b);
    - else the bin's mass sigmoid(a) - sigmoid(b), whose log is
      -softplus(-a) - softplus(b) + log(1 - e^-(a - b)) with a - b = 2 h inv:
      the same number as PixelCNN++'s log(cdf_plus - cdf_min), without the
      cancellation of the difference;
    - where that mass is not above 1e-5, PixelCNN++'s fallback: the log pdf
      at the bin's centre plus the log of the bin width,
      mid - s - 2 softplus(mid) - log((num_bins - 1) / 2), mid = inv (x - mean)
      (for 256 bins, PixelCNN++'s log_pdf_mid - log(127.5)).
    dlp/dlog_scale is 0 where log_scale < -7 (the floor's gradient, as torch.clamp's)."""
    s = torch.clamp(log_scale, min=DLM_LOG_SCALE_MIN)
    inv = torch.exp(-s)
    h = 1.0 / (num_bins - 1)
    c = x - mean
    a, b, mid, d = inv * (c + h), inv * (c - h), inv * c, (2.0 * h) * inv
    sa, sb = softplus(-a), softplus(b)
    pa, pb = torch.sigmoid(-a), torch.sigmoid(b)
    left, right = x < -DLM_EDGE, x > DLM_EDGE
    lp_mid = -sa - sb + _log1mexp(d)
    fallback = ~left & ~right & ~(lp_mid > DLM_LOG_MIN_DELTA)
    tmid = 1.0 - 2.0 * torch.sigmoid(mid)
    lp_pdf = mid - s - 2.0 * softplus(mid) - math.log((num_bins - 1) / 2.0)
    lp = torch.where(left, -sa, torch.where(right, -sb, torch.where(fallback, lp_pdf, lp_mid)))
    dmu = torch.where(left, -inv * pa, torch.where(right, inv * pb,
                      torch.where(fallback, -inv * tmid, -inv * (pa - pb))))
    q = torch.where(fallback | left | right, 0.0, d / torch.expm1(torch.where(d > 0, d, 1.0)))  # d / (e^d - 1)
    dls = torch.where(left, -a * pa, torch.where(right, b * pb,
                      torch.where(fallback, -mid * tmid - 1.0, -a * pa + b * pb - q)))
    return lp, dmu, torch.where(log_scale >= DLM_LOG_SCALE_MIN, dls, 0.0)


def unpack_pixelcnn_params(params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PixelCNN++'s packed decoder output (..., 10 M, S) as (logits (..., M, S),
    means, log_scales, raw coefficients (..., M, 3, S)), views: after the M
    logits, channel c's block of 3 M holds its M means, M log scales and M
    coefficients (nn.py's reshape of l[..., M:] to (3, 3 M)); the coefficients
    are used as tanh(raw)."""
    M = params.shape[-2] // 10
    rest = params[..., M:, :].unflatten(-2, (3, 3 * M))  # (..., 3, 3M, S)
    blocks = [rest[..., j * M:(j + 1) * M, :].transpose(-3, -2) for j in range(3)]  # (..., M, 3, S)
    return params[..., :M, :], blocks[0], blocks[1], blocks[2]


def coupled_means(x: Tensor, means: Tensor, coeffs: Tensor) -> Tensor:
    """PixelCNN++'s autoregressive channel means for x (..., 3, S) and means,
    coeffs (= tanh of the raw ones) (..., M, 3, S): m0, m1 + c0 x0, m2 + c1 x0 + c2 x1."""
    x0, x1 = x[..., None, 0, :], x[..., None, 1, :]
    return torch.stack([means[..., 0, :], means[..., 1, :] + coeffs[..., 0, :] * x0,
                        means[..., 2, :] + coeffs[..., 1, :] * x0 + coeffs[..., 2, :] * x1], dim=-2)


def _dlm_unpacked(x, params, means, log_scales):
    """(logits, effective means, log_scales, tanh coefficients or None) of either layout."""
    if means is None:
        logits, means, log_scales, raw = unpack_pixelcnn_params(params)
        coeffs = torch.tanh(raw)
        return logits, coupled_means(x, means, coeffs), log_scales, coeffs
    return params, means, log_scales, None


def discretized_logistic_mixture_log_prob_forward(x, params, means, log_scales, num_bins: int, out) -> None:
    acc = _compute_dtype(params)
    x, params = x.to(acc), params.to(acc)
    means = None if means is None else means.to(acc)
    log_scales = None if log_scales is None else log_scales.to(acc)
    logits, mu, ls, _ = _dlm_unpacked(x, params, means, log_scales)
    lp, _, _ = discretized_logistic_terms(x[:, None], mu, ls, num_bins)  # (K, P, M, C, S)
    per_pixel = torch.logsumexp(logits + lp.sum(-2), dim=-2) - torch.logsumexp(logits, dim=-2)
    out.copy_(per_pixel.sum(-1))


def discretized_logistic_mixture_log_prob_backward(grad_out, x, params, means, log_scales, num_bins: int,
                                                   dparams, dmeans, dlog_scales) -> None:
    """With w_m the posterior weight of component m at a pixel and pi_m =
    softmax(logits)_m: dlogits = g (w - pi), dmean = g w dlp/dmean,
    dlog_scale = g w dlp/dlog_scale; packed: the coupled means pass
    dmean1 x0 (1 - c0^2) to coefficient 0, dmean2 x0 (1 - c1^2) to 1 and
    dmean2 x1 (1 - c2^2) to 2."""
    acc = _compute_dtype(params)
    x, params, g = x.to(acc), params.to(acc), grad_out.to(acc)
    means = None if means is None else means.to(acc)
    log_scales = None if log_scales is None else log_scales.to(acc)
    logits, mu, ls, coeffs = _dlm_unpacked(x, params, means, log_scales)
    lp, dmu, dls = discretized_logistic_terms(x[:, None], mu, ls, num_bins)
    w = torch.softmax(logits + lp.sum(-2), dim=-2)  # (K, P, M, S)
    gw = g[..., None, None] * w
    dlogits = gw - g[..., None, None] * torch.softmax(logits, dim=-2)
    dmu, dls = gw[..., None, :] * dmu, gw[..., None, :] * dls
    if means is not None:
        dparams.copy_(dlogits)
        dmeans.copy_(dmu)
        dlog_scales.copy_(dls)
        return
    M = logits.shape[-2]
    x0, x1 = x[:, None, 0, :], x[:, None, 1, :]
    one = 1.0 - coeffs * coeffs
    dcoef = torch.stack([dmu[..., 1, :] * x0 * one[..., 0, :], dmu[..., 2, :] * x0 * one[..., 1, :],
                         dmu[..., 2, :] * x1 * one[..., 2, :]], dim=-2)
    dparams[..., :M, :] = dlogits
    rest = dparams[..., M:, :].unflatten(-2, (3, 3 * M))
    for j, grad in enumerate((dmu, dls, dcoef)):
        rest[..., j * M:(j + 1) * M, :] = grad.transpose(-3, -2)


def discretized_logistic_mixture_log_prob(x: Tensor, params, num_bins: int = 256) -> Tensor:
    """The op in plain PyTorch for x (..., C, H, W) and params packed
    (..., 10 M, H, W) or a (logit_probs, means, log_scales) tuple; leading
    dimensions of params' shape, x broadcast against them (not differentiable:
    the kernels' closed forms; see the tests for PixelCNN++'s formula)."""
    packed = isinstance(params, Tensor)
    first = params if packed else params[0]
    lead = first.shape[:-3]
    x = x.expand(*lead, *x.shape[-3:]).reshape(-1, x.shape[-3], x.shape[-2] * x.shape[-1])
    P = x.shape[0]
    flat = [t.reshape(1, P, *t.shape[len(lead):-2], -1) for t in ((params,) if packed else params)]
    out = torch.empty((1, P), dtype=_compute_dtype(flat[0]), device=x.device)
    discretized_logistic_mixture_log_prob_forward(x, flat[0], None if packed else flat[1],
                                                  None if packed else flat[2], num_bins, out)
    return out.reshape(lead)
