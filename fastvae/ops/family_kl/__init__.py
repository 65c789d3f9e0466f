"""family_kl, described once: the closed-form KL(q || p) between two
distributions of one latent family, per latent dimension, summed over the last
dimension or not: Laplace, uniform, Gumbel and Cauchy against the same
family (each as (loc, log_scale)), the exponential against the exponential
(as its log-rate), the Kumaraswamy (as (log a, log b)) against a Beta (as
(log alpha, log beta)) and the Weibull against the Weibull (as (log scale,
log concentration)). The families' positions in KL_FAMILIES
(fastvae/_families.py) are the kernels' ``family``.

The kernels take the posterior's parameters as (N, L) and the prior's as
(N, L) or (L,) (a prior shared by every row); ``q_loc`` and ``p_loc`` are
None for the exponential, whose one parameter, the log-rate, sits in
``q_log_param`` and ``p_log_param`` (the log-scale of the others); the
Kumaraswamy's log a and log b sit in ``q_loc`` and ``q_log_param``, the Beta
prior's log alpha and log beta in ``p_loc`` and ``p_log_param``; the
Weibull's log scale in the loc arrays and its log concentration in the
log_param ones (the order of sample_positive's parameters). ``kl`` is
(N,) (summed over L) or (N, L) (per dimension), and so is ``grad_kl``; the
prior's gradients are written (N, L) whatever its layout, for the front end
to sum.

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._families import KL_FAMILIES, KUMARASWAMY_KL_TERMS
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("family_kl_forward", "family_kl", ("q_loc", "q_log_param", "p_loc", "p_log_param", "family", "kl")),
    Kernel("family_kl_backward", "family_kl",
           ("grad_kl", "q_loc", "q_log_param", "p_loc", "p_log_param", "family",
            "dq_loc", "dq_log_param", "dp_loc", "dp_log_param")),
)

# a learned prior shared by the rows, (L,): its two gradients are the per-row gradients
# summed back to its shape, one torch sum each in the backward
OP = Op("family_kl", tuple(k.name for k in KERNELS), "fastvae/ops/family_kl/test_family_kl.py", "family_kl",
        launches=(1, 1, 2), other_kernels=("sum",))

EULER_GAMMA = 0.5772156649015329
LOG_4 = math.log(4.0)


# -- the oracle ------------------------------------------------------------------


def family_kl_terms(family: int, q_loc: Tensor | None, q_log_param: Tensor, p_loc: Tensor | None,
                    p_log_param: Tensor) -> Tensor:
    """KL(q || p) per element (broadcasting), differentiable: q = (m1, s1),
    p = (m2, s2) with scales b = e^s, or the exponential's log-rates s1, s2.

    - laplace: s2 - s1 + d e^-s2 + e^(s1 - s2 - d e^-s1) - 1, d = |m1 - m2|;
      where d = 0 the d terms are 0 whatever the scales (no 0 * inf);
    - uniform (q on (m1, m1 + b1)): s2 - s1 where q's support lies inside
      p's, else inf (with a zero gradient);
    - gumbel: s2 - s1 + t + r gamma + e^(-t + lgamma(1 + r)) - (1 + gamma),
      t = (m1 - m2) e^-s2, r = e^(s1 - s2) (torch's _kl_gumbel_gumbel);
    - cauchy: log(((b1 + b2)^2 + (m1 - m2)^2) / (4 b1 b2)) (Chyzak and
      Nielsen 2019), with every scale taken relative to the larger one, so
      neither (b1 + b2)^2 overflows nor underflows where the KL is finite;
    - exponential: (s1 - s2) + e^(s2 - s1) - 1 for log-rates s1, s2;
    - kumaraswamy: kumaraswamy_beta_terms of q = (log a, log b) and the Beta
      prior's (alpha, beta) = (e^m2, e^s2);
    - weibull: weibull_terms of q = (log scale, log concentration) and p's.
    """
    name = KL_FAMILIES[family]
    if name == "exponential":
        return (q_log_param - p_log_param) + torch.exp(p_log_param - q_log_param) - 1.0
    if name == "kumaraswamy":
        return kumaraswamy_beta_terms(q_loc, q_log_param, torch.exp(p_loc), torch.exp(p_log_param))
    if name == "weibull":
        return weibull_terms(q_loc, q_log_param, p_loc, p_log_param)
    s1, s2 = q_log_param, p_log_param
    if name == "laplace":
        d = (q_loc - p_loc).abs()
        exact = d == 0
        u = d * torch.exp(-torch.where(exact, 0.0, s1))
        return s2 - s1 + d * torch.exp(-torch.where(exact, 0.0, s2)) + torch.exp(s1 - s2 - u) - 1.0
    if name == "uniform":
        inside = (q_loc >= p_loc) & (q_loc + torch.exp(s1) <= p_loc + torch.exp(s2))
        return torch.where(inside, s2 - s1, math.inf)
    if name == "gumbel":
        t = (q_loc - p_loc) * torch.exp(-s2)
        r = torch.exp(s1 - s2)
        return s2 - s1 + t + r * EULER_GAMMA + torch.exp(torch.lgamma(1.0 + r) - t) - (1.0 + EULER_GAMMA)
    if name == "cauchy":
        m = torch.maximum(s1, s2).detach()  # cancels out of the value: no gradient of its own
        a = torch.exp(s1 - m) + torch.exp(s2 - m)
        d = q_loc - p_loc
        dd = d * torch.exp(-torch.where(d == 0, 0.0, m))  # d = 0: no 0 * inf below the normal range
        return 2.0 * (m + torch.log(torch.hypot(a, dd))) - LOG_4 - s1 - s2
    raise ValueError(f"family must be in [0, {len(KL_FAMILIES)}), got {family}")


def kumaraswamy_beta_terms(log_a: Tensor, log_b: Tensor, alpha: Tensor, beta: Tensor,
                           terms: int = KUMARASWAMY_KL_TERMS) -> Tensor:
    """KL(Kumaraswamy(a, b) || Beta(alpha, beta)) per element, broadcasting,
    differentiable (Nalisnick and Smyth 2017, appendix), its infinite sum
    truncated at `terms`:
    (a - alpha) / a (-gamma - psi(b) - 1/b) + log ab + log B(alpha, beta)
    - (b - 1) / b + (beta - 1) b sum_{m=1}^{terms} B(m / a, b) / (m + ab)."""
    a, b = torch.exp(log_a), torch.exp(log_b)
    log_beta_fn = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    kl = (a - alpha) / a * (-EULER_GAMMA - torch.digamma(b) - 1.0 / b) + log_a + log_b + log_beta_fn - (b - 1.0) / b
    series = torch.zeros_like(kl)
    lg_b = torch.lgamma(b)
    for m in range(1, terms + 1):
        x = m / a
        series = series + torch.exp(torch.lgamma(x) + lg_b - torch.lgamma(x + b)) / (m + a * b)
    return kl + (beta - 1.0) * b * series


def weibull_terms(a1: Tensor, s1: Tensor, a2: Tensor, s2: Tensor) -> Tensor:
    """KL(Weibull(e^a1, e^s1) || Weibull(e^a2, e^s2)) per element (scale
    lambda = e^a, concentration k = e^s), broadcasting, differentiable.
    Bauckhage's (2013) closed form,
    log(k1 / lambda1^k1) - log(k2 / lambda2^k2) + (k1 - k2)(log lambda1 - gamma/k1)
    + (lambda1/lambda2)^k2 Gamma(k2/k1 + 1) - 1,
    in log parameters: with r = k2/k1 = e^(s2 - s1) and u = k2 (a1 - a2),
    s1 - s2 + gamma (r - 1) - u + e^(u + lgamma(1 + r)) - 1 (the -k1 a1 + k2 a2
    + (k1 - k2) a1 of the first form cancel to -u). log z of a Weibull is a
    (minimum) Gumbel of location log lambda and scale 1/k: this is the Gumbel
    KL with the scales' logs negated and the location's sign flipped."""
    r = torch.exp(s2 - s1)
    u = (a1 - a2) * torch.exp(s2)
    return s1 - s2 + EULER_GAMMA * (r - 1.0) - u + torch.exp(u + torch.lgamma(1.0 + r)) - 1.0


def kumaraswamy_beta_grads(g: Tensor, log_a: Tensor, log_b: Tensor, log_alpha: Tensor,
                           log_beta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """g times the gradient of kumaraswamy_beta_terms in (log a, log b, log
    alpha, log beta), the kernels' closed form: with C = -gamma - psi(b) - 1/b,
    T_m = B(x_m, b) / (m + ab), x_m = m / a, S = sum T_m,
    d/dlog a = (alpha/a) C + 1 + (beta - 1) b sum T_m (x_m (psi(x_m + b) - psi(x_m)) - ab/(m + ab)),
    d/dlog b = (1 - alpha/a) (1/b - b psi'(b)) + 1 - 1/b
               + (beta - 1) b (S + sum T_m (b (psi(b) - psi(x_m + b)) - ab/(m + ab))),
    d/dlog alpha = -(alpha/a) C + alpha (psi(alpha) - psi(alpha + beta)),
    d/dlog beta = beta (psi(beta) - psi(alpha + beta)) + beta b S."""
    a, b, al, be = (torch.exp(t) for t in (log_a, log_b, log_alpha, log_beta))
    c = -EULER_GAMMA - torch.digamma(b) - 1.0 / b
    ratio = al / a
    lg_b, psi_b, ab = torch.lgamma(b), torch.digamma(b), a * b
    s = sa = sb = torch.zeros_like(c)
    for m in range(1, KUMARASWAMY_KL_TERMS + 1):
        x = m / a
        t = torch.exp(torch.lgamma(x) + lg_b - torch.lgamma(x + b)) / (m + ab)
        e = ab / (m + ab)
        psi_xb = torch.digamma(x + b)
        s = s + t
        sa = sa + t * (x * (psi_xb - torch.digamma(x)) - e)
        sb = sb + t * (b * (psi_b - psi_xb) - e)
    w = (be - 1.0) * b
    psi_sum = torch.digamma(al + be)
    da = ratio * c + 1.0 + w * sa
    db = (1.0 - ratio) * (1.0 / b - b * torch.polygamma(1, b)) + 1.0 - 1.0 / b + w * (s + sb)
    dal = al * (torch.digamma(al) - psi_sum) - ratio * c
    dbe = be * (torch.digamma(be) - psi_sum) + be * b * s
    return g * da, g * db, g * dal, g * dbe


def _up(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def family_kl_forward(q_loc, q_log_param, p_loc, p_log_param, family, kl) -> None:
    acc = accumulation_dtype(q_log_param.dtype)
    terms = family_kl_terms(family, _up(q_loc, acc), q_log_param.to(acc), _up(p_loc, acc), p_log_param.to(acc))
    kl.copy_(terms.sum(-1) if kl.dim() == 1 else terms)


def family_kl_grads(family: int, g: Tensor, q_loc: Tensor | None, q_log_param: Tensor, p_loc: Tensor | None,
                    p_log_param: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """g times the gradient of family_kl_terms per element: (dq_loc, dq_log_param,
    dp_loc, dp_log_param); the prior's location gradient is -dq_loc (the
    Weibull's log scale's too) but the Kumaraswamy's (zeros for the exponential, which has none, and the uniform,
    whose location enters only a comparison). The closed forms of the kernels;
    the tests check them against autograd of family_kl_terms."""
    name = KL_FAMILIES[family]
    s1, s2 = q_log_param, p_log_param
    if name == "exponential":
        ds1 = g * (1.0 - torch.exp(s2 - s1))
        return torch.zeros_like(ds1), ds1, torch.zeros_like(ds1), -ds1
    if name == "kumaraswamy":
        return kumaraswamy_beta_grads(g, q_loc, s1, p_loc, s2)
    if name == "weibull":
        # G = e^(u + lgamma(1 + r)): d/da1 = k2 (G - 1), d/ds1 = 1 - r gamma - G r psi(1 + r),
        # d/ds2 = -1 + r gamma - u + G (u + r psi(1 + r)), d/da2 = -d/da1
        k2 = torch.exp(s2)
        r = torch.exp(s2 - s1)
        u = (q_loc - p_loc) * k2
        big_g = torch.exp(u + torch.lgamma(1.0 + r))
        psi_r = torch.digamma(1.0 + r) * r
        rg = r * EULER_GAMMA
        da1 = g * k2 * (big_g - 1.0)
        return da1, g * (1.0 - rg - big_g * psi_r), -da1, g * (rg - 1.0 - u + big_g * (u + psi_r))
    diff = q_loc - p_loc
    if name == "laplace":
        d = diff.abs()
        exact = d == 0
        u = d * torch.exp(-torch.where(exact, 0.0, s1))
        e = torch.exp(s1 - s2 - u)
        ds1 = g * (torch.where(e == 0, 0.0, e * (1.0 + u)) - 1.0)  # u = inf: e (1 + u) -> 0
        ds2 = g * (1.0 - d * torch.exp(-torch.where(exact, 0.0, s2)) - e)
        dm1 = torch.where(exact, 0.0, g * torch.sign(diff) * torch.exp(-s2) * -torch.expm1(-u))
        return dm1, ds1, -dm1, ds2
    if name == "uniform":
        inside = (q_loc >= p_loc) & (q_loc + torch.exp(s1) <= p_loc + torch.exp(s2))
        zero = torch.zeros_like(g * s1)
        return zero, torch.where(inside, -g, zero), zero, torch.where(inside, g, zero)
    if name == "gumbel":
        ip = torch.exp(-s2)
        t = diff * ip
        r = torch.exp(s1 - s2)
        big_g = torch.exp(torch.lgamma(1.0 + r) - t)
        psi_r = torch.digamma(1.0 + r) * r
        rg = r * EULER_GAMMA
        dm1 = g * ip * (1.0 - big_g)
        return dm1, g * (rg + big_g * psi_r - 1.0), -dm1, g * (1.0 - t - rg + big_g * (t - psi_r))
    m = torch.maximum(s1, s2)
    a = torch.exp(s1 - m) + torch.exp(s2 - m)
    exact = diff == 0
    e_m = torch.exp(-torch.where(exact, 0.0, m))
    dd = diff * e_m
    w = 2.0 / (a * a + dd * dd)
    dm1 = torch.where(exact, 0.0, g * w * dd * e_m)
    return dm1, g * (w * a * torch.exp(s1 - m) - 1.0), -dm1, g * (w * a * torch.exp(s2 - m) - 1.0)


def family_kl_backward(grad_kl, q_loc, q_log_param, p_loc, p_log_param, family,
                       dq_loc, dq_log_param, dp_loc, dp_log_param) -> None:
    acc = accumulation_dtype(q_log_param.dtype)
    g = grad_kl.to(acc)
    g = g[:, None] if g.dim() == 1 else g
    grads = family_kl_grads(family, g, _up(q_loc, acc), q_log_param.to(acc), _up(p_loc, acc), p_log_param.to(acc))
    shape = q_log_param.shape
    for out, grad in zip((dq_loc, dq_log_param, dp_loc, dp_log_param), grads):
        if out is not None:
            out.copy_(grad.expand(shape))


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op family_kl) ------


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (B rows of
    L): each family, summed and per dimension, a prior per row and one shared
    (L,), the backward with and without the prior's gradients; m makes a
    tensor of the input dtype, r one of its accumulation dtype (kernels/aot.py)."""
    B, L = s["B"], s["L"]
    for family, name in enumerate(KL_FAMILIES):
        has_loc = name != "exponential"
        for p_shape in ((B, L), (L,)):
            q = dict(q_loc=m(B, L) if has_loc else None, q_log_param=m(B, L),
                     p_loc=m(*p_shape) if has_loc else None, p_log_param=m(*p_shape), family=family)
            for out_shape in ((B,), (B, L)):
                yield "family_kl_forward", dict(q, kl=r(*out_shape))
                for need_dp in (False, True):
                    yield "family_kl_backward", dict(
                        grad_kl=r(*out_shape), **q, dq_loc=m(B, L) if has_loc else None, dq_log_param=m(B, L),
                        dp_loc=m(B, L) if need_dp and has_loc else None, dp_log_param=m(B, L) if need_dp else None)


# -- the benchmark row (python -m benchmarks.bench_op family_kl) --------------------


def _bench_inputs(size: dict, device):
    B, L, family = size["B"], size["L"], size["family"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q_loc = torch.randn(B, L, generator=g).to(device).requires_grad_()
    q_ls = (0.3 * torch.randn(B, L, generator=g) - 1.0).to(device).requires_grad_()
    p_loc, p_ls = torch.zeros(L, device=device), torch.zeros(L, device=device)
    if family == "uniform":  # q inside p's support: a finite KL
        p_loc, p_ls = p_loc - 10.0, p_ls + math.log(20.0)
    if family == "kumaraswamy":  # Beta(1, 2): beta != 1, so that the series counts
        p_ls = p_ls + math.log(2.0)
    if family == "exponential":
        return (family, (q_ls,), (p_ls,)), [q_ls], torch.randn(B, generator=g).to(device)
    return (family, (q_loc, q_ls), (p_loc, p_ls)), [q_loc, q_ls], torch.randn(B, generator=g).to(device)


def _bench_eager(family: str, q: tuple, p: tuple) -> Tensor:
    """The closed form as plain torch ops on the parameters (the oracle's
    formula), summed over L: what the latent records computed before the
    fused op."""
    q_loc, q_ls = (None, *q) if len(q) == 1 else q
    p_loc, p_ls = (None, *p) if len(p) == 1 else p
    return family_kl_terms(KL_FAMILIES.index(family), q_loc, q_ls, p_loc, p_ls).sum(-1)


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    B, L = size["B"], size["L"]
    n_q = 1 if size["family"] == "exponential" else 2
    fwd = (n_q * B * L + B) * itemsize  # q's parameters -> kl (the (L,) prior is free)
    bwd = (B + 2 * n_q * B * L) * itemsize  # dkl, q's parameters -> their gradients
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


BENCH = Bench("family_kl, float32, a shared (L,) prior",
              sizes=tuple({"family": f, "B": 65536, "L": 32} for f in KL_FAMILIES),
              quick=tuple({"family": f, "B": 4096, "L": 32} for f in KL_FAMILIES),
              inputs=_bench_inputs, eager=_bench_eager, min_bytes=_bench_min_bytes, fastvae="family_kl",
              label_keys=("family",))
