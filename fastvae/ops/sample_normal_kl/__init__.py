"""sample_normal_kl, described once: one latent group of a hierarchical VAE
(VDVAE, NVAE, Ladder VAE) in one call. Given q = N(mu_q, sigma_q^2) and a
conditional prior p = N(mu_p, sigma_p^2) elementwise, it draws the
reparameterized z = mu_q + sigma_q * eps and computes
KL(q || p) = log sigma_p - log sigma_q + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2
per element (or summed over every dimension but the first), with gradients
to q and to p.

The scales are log standard deviations (``logvar`` false: VDVAE) or
log-variances (``logvar`` true); with ``residual`` q is given relative to p,
as NVAE parametrizes it: mu_q = mu_p + mu, log sigma_q = log sigma_p + delta
(delta = log_scale, halved for log-variances), whose KL is
0.5 * (mu^2 / sigma_p^2 + e^(2 delta)) - delta - 1/2.

Every form is computed as the same element formula in delta = log sigma_q -
log sigma_p, d = mu_q - mu_p and b = log sigma_p:
KL = 0.5 * (e^(2 delta) + (d e^(-b))^2 - 1) - delta, so neither sigma_p^2
nor its inverse is formed (each overflows long before the KL does).

The noise is sample_normal's at the training layout (docs/architecture.md,
"The RNG contract"): z's element i, in the flat order of q's shape, uses
offset i, so ``sample_normal(mu, logvar)`` and this op draw the same z for
the same seed. Elementwise throughout: the latent dimension may be any
dimension (the channels of (B, C, H, W), or the last).

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._philox import sample_noise
from ..._spec import Bench, Kernel, Op

# Layout: every tensor (N, L) contiguous, N the batch and L the product of the
# other dimensions; kl and grad_kl are (N, L) per element or (N,) row sums.
# logvar: the scales are log-variances (else log standard deviations);
# residual: mu and log_scale are q's offsets from the prior.
KERNELS = (
    Kernel("sample_normal_kl_forward", "sample_normal_kl",
           ("mu", "log_scale", "prior_mu", "prior_log_scale", "seed", "logvar", "residual", "z", "kl")),
    Kernel("sample_normal_kl_backward", "sample_normal_kl",
           ("grad_z", "grad_kl", "mu", "log_scale", "prior_mu", "prior_log_scale", "seed", "logvar", "residual",
            "dmu", "dlog_scale", "dprior_mu", "dprior_log_scale")),
)

OP = Op("sample_normal_kl", tuple(k.name for k in KERNELS), "fastvae/ops/sample_normal_kl/test_sample_normal_kl.py",
        "sample_normal_kl", launches=(1, 1, 1), triton_ops=("sample_normal_kl", "sample_normal_kl_backward"))


# -- the oracle ------------------------------------------------------------------


def group_terms(mu: Tensor, log_scale: Tensor, prior_mu: Tensor, prior_log_scale: Tensor, logvar: bool,
                residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mu_q, log sigma_q, d = mu_q - mu_p, delta = log sigma_q - log sigma_p)
    of the arguments in any of the op's forms; differentiable torch ops."""
    c = 0.5 if logvar else 1.0
    b = c * prior_log_scale
    if residual:
        delta = c * log_scale
        return prior_mu + mu, b + delta, mu, delta
    a = c * log_scale
    return mu, a, mu - prior_mu, a - b


def group_kl(d: Tensor, delta: Tensor, prior_log_std: Tensor) -> Tensor:
    """KL(q || p) per element from d = mu_q - mu_p, delta = log sigma_q - log
    sigma_p and log sigma_p: 0.5 * (e^(2 delta) + (d / sigma_p)^2 - 1) - delta."""
    u = d * torch.exp(-prior_log_std)
    return 0.5 * (torch.exp(2.0 * delta) + u * u - 1.0) - delta


def row_sums(t: Tensor) -> Tensor:
    """t (B, ...) summed over every dimension but the first: (B,)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).sum(1)


def sample_normal_kl(mu: Tensor, log_scale: Tensor, prior_mu: Tensor, prior_log_scale: Tensor, seed: int, *,
                     logvar: bool, residual: bool, reduce: bool = False) -> tuple[Tensor, Tensor]:
    """(z, kl) of one group, differentiable with plain autograd in every input,
    computed in the inputs' dtype: z = mu_q + sigma_q * eps with eps the
    noise at the flat offsets of q's shape, kl per element or (reduce) summed
    over every dimension but the first. The prior's tensors have q's shape."""
    eps = sample_noise(seed, 1, mu.shape, mu.dtype, mu.device)[0]
    c = 0.5 if logvar else 1.0
    m, a, d, delta = group_terms(mu, log_scale, prior_mu, prior_log_scale, logvar, residual)
    kl = group_kl(d, delta, c * prior_log_scale)
    return m + torch.exp(a) * eps, row_sums(kl) if reduce else kl


def sample_normal_kl_grad(grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor, log_scale: Tensor,
                          prior_mu: Tensor, prior_log_scale: Tensor, eps: Tensor | None, logvar: bool,
                          residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dmu, dlog_scale, dprior_mu, dprior_log_scale) of the op for the upstream
    gradients grad_z and grad_kl (per element, or (N, 1) for row sums; None:
    no gradient), with eps the draw's noise (needed only with grad_z). With
    s = sigma_q, u = d / sigma_p, r = e^(2 delta), zs = grad_z * s * eps:
    d/d delta = zs + g (r - 1), d/d b = -g u^2 (+ zs with residual, whose
    sigma_q moves with sigma_p), d/d d = g u / sigma_p; then mu_q's and the
    scales' chain rules. Differentiable torch ops: the reference backend's
    backward and the Function's double backward both run it."""
    c = 0.5 if logvar else 1.0
    b = c * prior_log_scale
    m, a, d, delta = group_terms(mu, log_scale, prior_mu, prior_log_scale, logvar, residual)
    zero = torch.zeros_like(d)
    gz = zero if grad_z is None else grad_z
    zs = zero if grad_z is None else grad_z * torch.exp(a) * eps
    if grad_kl is None:
        gd = gdelta = gb = zero
    else:
        ib = torch.exp(-b)
        u = d * ib
        gd = grad_kl * u * ib
        gdelta = grad_kl * (torch.exp(2.0 * delta) - 1.0)
        gb = -grad_kl * u * u
    dmu = gz + gd
    dlog_scale = c * (zs + gdelta)
    if residual:
        return dmu, dlog_scale, gz, c * (zs + gb)
    return dmu, dlog_scale, -gd, c * (gb - gdelta)


def sample_normal_kl_forward(mu, log_scale, prior_mu, prior_log_scale, seed, logvar, residual, z, kl) -> None:
    """z (N, L) <- the group's draw, kl (N, L) <- its KL per element, or (N,) its row sums."""
    acc = accumulation_dtype(mu.dtype)
    zz, k = sample_normal_kl(mu.to(acc), log_scale.to(acc), prior_mu.to(acc), prior_log_scale.to(acc), seed,
                             logvar=logvar, residual=residual, reduce=kl.dim() == 1)
    z.copy_(zz)
    kl.copy_(k)


def sample_normal_kl_backward(grad_z, grad_kl, mu, log_scale, prior_mu, prior_log_scale, seed, logvar, residual,
                              dmu, dlog_scale, dprior_mu, dprior_log_scale) -> None:
    """dmu, dlog_scale, dprior_mu, dprior_log_scale (N, L) from grad_z (N, L)
    and grad_kl ((N, L) or (N,)), each None when its output has no gradient;
    eps is regenerated from the seed."""
    acc = accumulation_dtype(mu.dtype)
    eps = None if grad_z is None else sample_noise(seed, 1, mu.shape, acc, mu.device)[0]
    gk = None if grad_kl is None else grad_kl.to(acc)
    if gk is not None and gk.dim() == 1:
        gk = gk[:, None]
    grads = sample_normal_kl_grad(None if grad_z is None else grad_z.to(acc), gk, mu.to(acc), log_scale.to(acc),
                                  prior_mu.to(acc), prior_log_scale.to(acc), eps, logvar, residual)
    for out, grad in zip((dmu, dlog_scale, dprior_mu, dprior_log_scale), grads):
        out.copy_(grad)


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op sample_normal_kl) --


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (B rows of
    L): each form, per element and reduced; m makes a tensor of the input
    dtype, r one of its accumulation dtype (kernels/aot.py)."""
    B, L = s["B"], s["L"]
    seed = torch.empty((), dtype=torch.int64, device="meta")
    for logvar in (False, True):
        for residual in (False, True):
            for kl in (r(B, L), r(B)):
                yield "sample_normal_kl_forward", dict(mu=m(B, L), log_scale=m(B, L), prior_mu=m(B, L),
                                                       prior_log_scale=m(B, L), seed=seed, logvar=logvar,
                                                       residual=residual, z=m(B, L), kl=kl)
                yield "sample_normal_kl_backward", dict(grad_z=m(B, L), grad_kl=kl, mu=m(B, L), log_scale=m(B, L),
                                                        prior_mu=m(B, L), prior_log_scale=m(B, L), seed=seed,
                                                        logvar=logvar, residual=residual, dmu=m(B, L),
                                                        dlog_scale=m(B, L), dprior_mu=m(B, L),
                                                        dprior_log_scale=m(B, L))
    # the KL alone, and z alone
    yield "sample_normal_kl_backward", dict(grad_z=None, grad_kl=r(B), mu=m(B, L), log_scale=m(B, L),
                                            prior_mu=m(B, L), prior_log_scale=m(B, L), seed=seed, logvar=False,
                                            residual=False, dmu=m(B, L), dlog_scale=m(B, L), dprior_mu=m(B, L),
                                            dprior_log_scale=m(B, L))
    yield "sample_normal_kl_backward", dict(grad_z=m(B, L), grad_kl=None, mu=m(B, L), log_scale=m(B, L),
                                            prior_mu=m(B, L), prior_log_scale=m(B, L), seed=seed, logvar=False,
                                            residual=False, dmu=m(B, L), dlog_scale=m(B, L), dprior_mu=m(B, L),
                                            dprior_log_scale=m(B, L))


# -- the benchmark row (python -m benchmarks.bench_op sample_normal_kl) ------------


def _bench_inputs(size: dict, device):
    B, C, H = size["B"], size["C"], size["H"]
    dtype = getattr(torch, size.get("dtype", "float32"))
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (B, C, H, H)
    qm, pm = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    qs, ps = ((0.3 * torch.randn(shape, generator=g) - 0.5).to(device, dtype).requires_grad_() for _ in range(2))
    gz = torch.randn(shape, generator=g).to(device, dtype)
    # the KL's gradient in its dtype: float32 for bfloat16 inputs (fastvae's), which the eager
    # formula's bfloat16 KL takes as it is
    gk = torch.randn(B, generator=g).to(device, torch.float32 if dtype == torch.bfloat16 else dtype)
    return (qm, qs, pm, ps), [qm, qs, pm, ps], (gz, gk)


def vdvae_group(qm: Tensor, qs: Tensor, pm: Tensor, ps: Tensor) -> tuple[Tensor, Tensor]:
    """VDVAE's per-group code (vae_helpers.py), in log standard deviations:
    draw_gaussian_diag_samples and gaussian_analytical_kl, the KL summed over
    (C, H, W) as its decoder block does."""
    eps = torch.randn_like(qm)
    z = eps * torch.exp(qs) + qm
    kl = -0.5 + ps - qs + 0.5 * (torch.exp(qs) ** 2 + (qm - pm) ** 2) / torch.exp(ps) ** 2
    return z, kl.sum(dim=(1, 2, 3))


def _bench_call(fn, qm, qs, pm, ps):
    """fastvae.sample_normal_kl in VDVAE's form: log standard deviations, the KL summed."""
    return fn(qm, qs, pm, ps, param="logstd", reduce=True)


def _bench_min_bytes(size: dict) -> dict[str, int]:
    itemsize = 2 if size.get("dtype") == "bfloat16" else 4
    n = size["B"] * size["C"] * size["H"] ** 2
    fwd = (4 * n + n + size["B"]) * itemsize  # q's and p's parameters -> z, kl
    bwd = (n + size["B"] + 4 * n + 4 * n) * itemsize  # dz, dkl, the parameters -> their gradients
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


# VDVAE's group shapes: B = 32, C = 16 channels, 32 x 32 and 64 x 64, in float32 and bfloat16
BENCH = Bench("sample_normal_kl (one latent group, log-std)",
              sizes=tuple({"B": 32, "C": 16, "H": H, "dtype": dtype} for dtype in ("float32", "bfloat16")
                          for H in (32, 64)),
              quick=({"B": 4, "C": 16, "H": 16},), inputs=_bench_inputs, eager=vdvae_group,
              min_bytes=_bench_min_bytes, fastvae="sample_normal_kl", call=_bench_call, repeats=20)
