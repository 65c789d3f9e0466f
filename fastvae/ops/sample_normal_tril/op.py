"""sample_normal_tril's front end: the public function, the torch.library ops
fastvae::sample_normal_tril and fastvae::sample_normal_tril_backward, and their
autograd Function (its double backward included).

Reparameterized sampling from a full-covariance Gaussian N(mu, S S^T) with the
analytic KL to N(0, I), fused.

The custom ops ``fastvae::sample_normal_tril`` and
``fastvae::sample_normal_tril_backward`` take the kernels' layout (mu (N, L),
scale_tril (N, L, L)) and the Philox seed as a 0-d int64 tensor. eps is
sample_normal's noise, z[k, n, :] = mu[n] + tril(S[n]) @ eps[k, n, :] with
eps[k, n, l] at offset k * N * L + n * L + l, so a diagonal scale_tril gives
sample_normal's z exactly; the backward regenerates eps and nothing of size
K x N x L is saved (only mu, scale_tril and the seed).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import _backend, _validate
from ..._dtypes import accumulation_dtype
from ..._launch import Launch, PlanCache, template
from ..._op import define, draw_seed, flat, run, shaped
from ..._sampler import empty_z, z_dtype
from ..sample_normal.op import noise


def _flat_tril(scale_tril: Tensor) -> Tensor:
    """(..., L, L) -> contiguous (N, L, L)."""
    if scale_tril.dim() == 3:
        return scale_tril.contiguous()
    L = scale_tril.shape[-1]
    return scale_tril.reshape(math.prod(scale_tril.shape[:-2]), L, L).contiguous()


def _work(K: int, N: int, L: int) -> int:
    """Elements of work for the cpp thread count: a normal and a triangular
    row of multiply-adds per element of z."""
    return K * N * L * (1 + L // 8)


# The plans of the ops' own calls (a compiled graph's nodes) on the triton
# backend, per signature (bounded: fastvae._launch.PlanCache); ENABLED False
# sends every call the general way (the tests compare the two); ``empty``
# allocates each output like a template the plan holds (the tests' fixture may
# poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
_DTYPES = (torch.float32, torch.float64)


class TrilPlan:
    """The launches of one signature of the ops' own calls: mu (N, L) and
    scale_tril (N, L, L) contiguous, of one float32 or float64 dtype, N L >
    0, n_samples >= 1. The general launchers' variants (triton.py's
    forward_plan, backward_plan) on the same arguments: the forward's, and
    the backward's for each upstream gradient given (made at first use)."""

    __slots__ = ("N", "L", "dtype", "device", "z_like", "kl_like", "dmu_like", "ds_like", "forward", "forward_ints",
                 "_backward")

    def __init__(self, mu: Tensor, n_samples: int):
        kern = _backend.triton_module("sample_normal_tril")
        (N, L), dtype, device = mu.shape, mu.dtype, mu.device
        self.N, self.L, self.dtype, self.device = N, L, dtype, device
        self.z_like = template((n_samples, N, L), dtype, device)
        self.kl_like = template((N,), dtype, device)
        self.dmu_like = template((N, L), dtype, device)
        self.ds_like = template((N, L, L), dtype, device)
        grid, meta, self.forward_ints = kern.forward_plan(n_samples, N, L, dtype, device)
        self.forward = Launch(kern._sample_normal_tril_fwd_kernel, grid, meta)
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds: the forward's and the backward's made so
        far (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *self._backward.values()]

    def run_forward(self, mu: Tensor, scale_tril: Tensor, seed: Tensor) -> list[Tensor]:
        """_forward's [z, kl], launched from the plan."""
        z, kl = empty(self.z_like), empty(self.kl_like)
        self.forward(mu, scale_tril, seed, z, kl, *self.forward_ints)
        return [z, kl]

    def run_backward(self, mu: Tensor, scale_tril: Tensor, seed: Tensor, grad_z: Tensor | None,
                     grad_kl: Tensor | None) -> tuple[Tensor, Tensor]:
        """_backward's (dmu, dscale_tril), launched from the plan (an absent gradient's pointer is mu's)."""
        key = grad_z is not None, grad_kl is not None
        launch = self._backward.get(key)
        if launch is None:
            kern = _backend.triton_module("sample_normal_tril")
            launch = self._backward[key] = Launch(kern._sample_normal_tril_bwd_kernel,
                                                  *kern.backward_plan(self.N, self.L, self.dtype, self.device, *key))
        dmu, ds = empty(self.dmu_like), empty(self.ds_like)
        launch(mu if grad_z is None else grad_z.contiguous(), mu if grad_kl is None else grad_kl.contiguous(), mu,
               scale_tril, seed, dmu, ds, self.N, self.L, 0 if grad_z is None else grad_z.shape[0])
        return dmu, ds


def _op_plan(mu: Tensor, scale_tril: Tensor, n_samples: int) -> TrilPlan | None:
    """The plan of a call of the ops themselves (mu (N, L) and scale_tril (N,
    L, L), as a compiled graph calls them for a batch of one dimension), or
    None (the general launch, which on CUDA pays the launch geometry and
    Triton's binding of the arguments at every call): on the triton backend,
    outside autocast, contiguous float32 or float64 tensors of one dtype and
    device, N L > 0, n_samples >= 1."""
    device = mu.device
    if (not ENABLED or not _backend.op_plans_serve(device) or mu.dtype not in _DTYPES or mu.dim() != 2
            or mu.numel() == 0 or n_samples < 1 or scale_tril.dtype is not mu.dtype or scale_tril.device != device
            or scale_tril.shape != (*mu.shape, mu.shape[1]) or not mu.is_contiguous()
            or not scale_tril.is_contiguous()):
        return None
    key = (mu.shape, mu.dtype, device, n_samples)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, TrilPlan(mu, n_samples))


def _forward(mu: Tensor, scale_tril: Tensor, seed: Tensor, n_samples: int) -> list[Tensor]:
    """[z (n_samples, ..., L), kl (...)] for mu (..., L), scale_tril (..., L, L);
    from a plan where _op_plan takes the call (a compiled graph's node on CUDA)."""
    if (plan := _op_plan(mu, scale_tril, n_samples)) is not None:
        return plan.run_forward(mu, scale_tril, seed)
    backend = _backend.backend_for(mu.device)
    dtype = _backend.compute_dtype(mu, scale_tril)
    mu2, s3 = (_backend.kernel_input(backend, t, dtype) for t in (flat(mu), _flat_tril(scale_tril)))
    N, L = mu2.shape
    # z in the encoder's dtype, as sample_normal's (z_dtype)
    z_type = z_dtype(mu, scale_tril)
    z = empty_z(backend, (n_samples, N, L), mu, dtype, z_type)
    kl = _backend.empty_output((N,), like=mu, dtype=dtype)
    _backend.launch(backend, "sample_normal_tril_forward", _work(n_samples, N, L), mu=mu2, scale_tril=s3,
                    seed=seed, z=z, kl=kl)
    z = _backend.in_dtype(z, z_type)
    if mu.dim() == 2:
        return [z, kl]
    return [z.reshape(n_samples, *mu.shape), kl.reshape(mu.shape[:-1])]


def _backward(mu: Tensor, scale_tril: Tensor, seed: Tensor, grad_z: Tensor | None,
              grad_kl: Tensor | None) -> tuple[Tensor, Tensor]:
    """dmu (..., L), dscale_tril (..., L, L) from grad_z (K, ..., L) and grad_kl (...),
    either None when its output has no gradient; eps is regenerated from seed;
    dscale_tril is 0 above the diagonal; from a plan as the forward's."""
    grads = [g for g in (grad_z, grad_kl) if g is not None]
    if (grads and all(g.dtype is mu.dtype for g in grads)
            and (plan := _op_plan(mu, scale_tril, 1 if grad_z is None else grad_z.shape[0])) is not None):
        return plan.run_backward(mu, scale_tril, seed, grad_z, grad_kl)
    backend = _backend.backend_for(mu.device)
    dtype = _backend.compute_dtype(mu, scale_tril)
    mu2 = _backend.kernel_input(backend, flat(mu), dtype)
    s3 = _backend.kernel_input(backend, _flat_tril(scale_tril), dtype)
    grad_z, grad_kl = _backend.kernel_input(backend, grad_z, dtype), _backend.kernel_input(backend, grad_kl, dtype)
    N, L = mu2.shape
    K = 0 if grad_z is None else grad_z.shape[0]
    dmu = _backend.empty_output((N, L), like=mu2)
    ds = _backend.empty_output((N, L, L), like=s3)
    _backend.launch(
        backend, "sample_normal_tril_backward", _work(max(K, 1), N, L),
        grad_z=None if grad_z is None else grad_z.reshape(K, N, L).contiguous(),
        grad_kl=None if grad_kl is None else grad_kl.reshape(N).contiguous(),
        mu=mu2, scale_tril=s3, seed=seed, dmu=dmu, dscale_tril=ds,
    )
    dmu, ds = _backend.in_dtype(dmu, mu.dtype), _backend.in_dtype(ds, scale_tril.dtype)
    if mu.dim() == 2:
        return dmu, ds
    return dmu.reshape(mu.shape), ds.reshape(scale_tril.shape)


sample_normal_tril_op = define(
    "sample_normal_tril(Tensor mu, Tensor scale_tril, Tensor seed, int n_samples) -> (Tensor, Tensor)",
    lambda mu, scale_tril, seed, n_samples: tuple(_forward(mu, scale_tril, seed, n_samples)),
    lambda mu, scale_tril, seed, n_samples: (mu.new_empty((n_samples, *mu.shape), dtype=z_dtype(mu, scale_tril)),
                                             mu.new_empty(mu.shape[:-1], dtype=_backend.compute_dtype(mu, scale_tril))),
)
# An output with no gradient passes None (no zeros are made for it).
sample_normal_tril_backward_op = define(
    "sample_normal_tril_backward(Tensor mu, Tensor scale_tril, Tensor seed, Tensor? grad_z, Tensor? grad_kl)"
    " -> (Tensor, Tensor)",
    _backward,
    lambda mu, scale_tril, seed, grad_z, grad_kl: (torch.empty_like(mu), torch.empty_like(scale_tril)),
)


def _double_backward(grad_z, grad_kl, mu, scale_tril, seed, mu2, n_samples):
    """dmu, dscale_tril of z = mu + tril(S) eps (K, ..., L) and the KL to N(0, I),
    0.5 (|S|_F^2 + |mu|^2 - L) - sum_i log S_ii, with eps regenerated (sample_normal's
    noise: the sampling kernel itself), as differentiable torch ops, for a
    create_graph=True backward, in the accumulation dtype, each gradient in its
    input's dtype."""
    def up(t):
        return None if t is None else t.to(accumulation_dtype(t.dtype))

    m, S = up(mu), torch.tril(up(scale_tril))
    dmu, dS = torch.zeros_like(m), torch.zeros_like(S)
    if grad_z is not None:
        eps = noise(seed, n_samples, mu2).reshape(n_samples, *mu.shape)
        gz = up(grad_z).reshape(eps.shape)
        dmu = gz.sum(0)
        dS = torch.tril(torch.einsum("k...i,k...j->...ij", gz, eps))
    if grad_kl is not None:
        g = up(grad_kl)
        diag = torch.diagonal(S, dim1=-2, dim2=-1)
        inv = torch.where(diag < 0, torch.nan, 1.0 / diag)  # the KL is NaN there: so is its gradient
        gS = g[..., None, None] * (S - torch.diag_embed(inv))
        dmu = dmu + g.unsqueeze(-1) * m
        # a row whose kl gets no gradient takes none of the KL's terms (not 0 * NaN)
        dS = dS + torch.tril(torch.where(g[..., None, None] == 0, 0.0, gS))
    return dmu.to(mu.dtype), dS.to(scale_tril.dtype)


class SampleNormalTril(torch.autograd.Function):
    """Autograd of fastvae::sample_normal_tril: saves mu as (N, L), scale_tril
    as (N, L, L) and the seed only. ``n_samples`` None gives one sample shaped like mu."""

    @staticmethod
    def forward(ctx, mu, scale_tril, seed, n_samples):
        mu2, s3 = flat(mu), _flat_tril(scale_tril)
        ctx.save_for_backward(mu2, s3, seed, mu, scale_tril)  # the inputs, for a double backward
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.tril_shape = mu.shape, scale_tril.shape
        ctx.n_samples = 1 if n_samples is None else n_samples
        z, kl = run(sample_normal_tril_op, mu2, s3, seed, ctx.n_samples)
        return shaped(z, mu.shape if n_samples is None else (n_samples, *mu.shape)), shaped(kl, mu.shape[:-1])

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        if grad_z is None and grad_kl is None:
            return None, None, None, None
        mu2, s3, seed, mu, scale_tril = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (*_double_backward(grad_z, grad_kl, mu, scale_tril, seed, mu2, ctx.n_samples), None, None)
        N, L = mu2.shape
        dmu, ds = run(sample_normal_tril_backward_op, mu2, s3, seed,
                      None if grad_z is None else shaped(grad_z, (ctx.n_samples, N, L)),
                      None if grad_kl is None else shaped(grad_kl, (N,)))
        return shaped(dmu, ctx.shape), shaped(ds, ctx.tril_shape), None, None


# -- public function -----------------------------------------------------------


def sample_normal_tril(
    mu: Tensor,
    scale_tril: Tensor,
    n_samples: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Reparameterized samples from q = N(mu, S S^T), S = scale_tril, and KL(q || N(0, I)).

    Args:
        mu: encoder means of shape (..., L).
        scale_tril: S of shape (..., L, L), same batch shape, dtype and device:
            lower triangular with a positive diagonal, torch's
            ``MultivariateNormal(mu, scale_tril=S)`` convention (covariance S S^T).
            Only the lower triangle (diagonal included) is read; the strict
            upper triangle may hold anything, NaN included, and its gradient
            is exactly 0.
        n_samples: None for one sample of shape (..., L); an int K >= 1 for
            z of shape (K, ..., L).
        generator: torch.Generator the Philox seed is drawn from (default: torch's
            default generator of mu's device, so torch.manual_seed applies).

    Returns:
        (z, kl): z = mu + S @ eps with eps ~ N(0, I), and the analytic
        kl = 0.5 * (||S||_F^2 + ||mu||^2 - L - 2 * sum_i log S_ii) per row, shape (...).

    eps is exactly sample_normal's noise for the same seed and shape (z[k, n, l]
    uses the Philox offset k * N * L + n * L + l over the flattened rows n), so
    with S = diag(exp(logvar / 2)) this returns sample_normal(mu, logvar)'s z and
    kl for the same generator state. It is generated in the kernel and
    regenerated in the backward: no K x ... x L noise tensor is stored.

    The diagonal is not checked: that would read the values, a host sync on a
    GPU. Instead nothing wrong passes silently: a negative or NaN S_ii makes
    that row's kl NaN (and, where kl gets a gradient, the gradient of S_ii
    NaN); S_ii = 0 gives kl = +inf, the KL of the degenerate q. z is
    mu + S @ eps for any values. Where grad_kl is 0 (kl unused) the KL adds
    nothing to the gradients.

    Some texts on full-covariance encoders write q(z | x) = N(mu, L^T L) with
    L lower triangular and z = mu + L^T eps: their factor of the covariance is the upper-triangular
    L^T. Here the factor is the lower-triangular S with covariance S S^T.
    Passing their L as scale_tril gives covariance L L^T, which differs from
    L^T L unless L is diagonal; their L^T cannot be passed (its strict upper
    triangle would be ignored). The exact map reverses the latent order: with
    P the exchange matrix (P[i, j] = 1 iff i + j = L - 1), S = P L^T P is lower
    triangular with the diagonal of L (reversed) and S S^T = P (L^T L) P, so

        z_rev, kl = sample_normal_tril(mu.flip(-1), L.transpose(-2, -1).flip(-2, -1))
        z = z_rev.flip(-1)        # = mu + L^T @ eps.flip(-1): their z, their KL

    An encoder that just emits a lower-triangular matrix (such a text's Trig(.))
    may as well pass it as scale_tril: every positive-definite covariance has
    exactly one lower-triangular factor with a positive diagonal, so the family
    of encoders is the same, parameterized as S S^T instead of L^T L. (Their L
    is that matrix; L here is the latent size, their N.)
    """
    _validate.float_tensors(mu=mu, scale_tril=scale_tril)
    _validate.event_dim("mu", mu)
    L = mu.shape[-1]
    if tuple(scale_tril.shape) != (*mu.shape, L):
        raise ValueError(
            f"scale_tril must have shape {(*mu.shape, L)} (mu's shape {tuple(mu.shape)} and L = {L} again), "
            f"got {tuple(scale_tril.shape)}"
        )
    if n_samples is not None:
        n_samples = _validate.sample_count("n_samples", n_samples, mu.numel(), mu)
    return SampleNormalTril.apply(mu, scale_tril, draw_seed(mu.device, generator), n_samples)
