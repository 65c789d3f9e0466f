"""sample_normal's front end: the public function, the torch.library ops
fastvae::sample_normal, fastvae::sample_normal_with_ratio and
fastvae::sample_normal_backward, and their autograd Functions (their double
backward included); the unchecked entry points the objectives call, and the
evaluation's draw at strided offsets (sample_at).

Reparameterized Gaussian sampling with the analytic KL, fused. The custom ops
take the Philox seed as a 0-d int64 tensor, so the noise is a pure function of
(seed, element offset): the backward regenerates it and nothing of size
K x B x L is saved (only mu, logvar and the seed).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _backend, _validate
from ..._dtypes import accumulation_dtype
from ..._launch import Launch, PlanCache, template
from ..._op import define, draw_seed, flat, run, shaped
from ..._sampler import check_offsets, empty_z, gradient_samples, z_dtype
from ..kl_normal import kl_normal_grad


def _forward(mu: Tensor, logvar: Tensor, seed: Tensor, n_samples: int, with_ratio: bool = False) -> list[Tensor]:
    """[z (n_samples, ..., L), kl (...)] for mu, logvar (..., L), and with_ratio
    the log-ratio log N(z; 0, I) - log q(z) (n_samples, ...) from the same eps.
    z has the encoder's dtype (z_dtype), kl and the log-ratio the compute dtype.
    A call _op_plan takes (a compiled graph's node on CUDA) launches from its plan."""
    if (plan := _op_plan(mu, logvar, n_samples)) is not None:
        z, kl = empty(plan.z_like), empty(plan.kl_like)
        ratio = empty(plan.ratio_like) if with_ratio else None
        plan.forward(with_ratio)(mu, logvar, seed, z, kl, kl if ratio is None else ratio, *plan.fwd_ints)
        return [z, kl] if ratio is None else [z, kl, ratio]
    backend = _backend.backend_for(mu.device)
    dtype = _backend.compute_dtype(mu, logvar)
    mu2, lv2 = _backend.kernel_input(backend, flat(mu), dtype), _backend.kernel_input(backend, flat(logvar), dtype)
    N, L = mu2.shape
    # the cpp kernel writes z in its compute type: cast after (z is encoder-sized)
    z = empty_z(backend, (n_samples, N, L), mu, dtype, z_dtype(mu, logvar))
    kl = _backend.empty_output((N,), like=mu, dtype=dtype)
    ratio = _backend.empty_output((n_samples, N), like=mu, dtype=dtype) if with_ratio else None
    # the training layout: z[k, n, l] uses the noise at its own flat offset
    _backend.launch(backend, "sample_normal_forward", z.numel(), mu=mu2, logvar=lv2, seed=seed,
                    offset0=0, sample_stride=N * L, row_stride=L, z=z, kl=kl, log_ratio=ratio)
    z = _backend.in_dtype(z, z_dtype(mu, logvar))
    out = [z, kl] if ratio is None else [z, kl, ratio]
    if mu.dim() == 2:
        return out
    return [t.reshape(n_samples, *mu.shape[:-1], *t.shape[2:]) if i != 1 else t.reshape(mu.shape[:-1])
            for i, t in enumerate(out)]


def _backward(mu: Tensor, logvar: Tensor, seed: Tensor, grad_z: Tensor | None, grad_kl: Tensor | None,
              grad_log_ratio: Tensor | None, stop_score: bool) -> tuple[Tensor, Tensor]:
    """dmu, dlogvar (..., L) from grad_z (K, ..., L), grad_kl (...) and grad_log_ratio
    (K, ...), each None when its output has no gradient; eps is regenerated from
    seed, and the log-ratio's terms are added in the same kernel; from a plan
    as the forward's."""
    K = gradient_samples(grad_z, grad_log_ratio)
    if (all(g is None or g.dtype is mu.dtype for g in (grad_z, grad_kl, grad_log_ratio))
            and (grad_z is not None or grad_kl is not None or grad_log_ratio is not None)
            and (plan := _op_plan(mu, logvar, max(K, 1))) is not None):
        launch, part, counters, per_split, splits = plan.backward(K, grad_z is not None, grad_kl is not None,
                                                                  grad_log_ratio is not None, stop_score)
        dmu, dlv = empty(plan.d_like), empty(plan.d_like)
        N, L = plan.N, plan.L
        launch(mu if grad_z is None else grad_z.reshape(K, N, L).contiguous(),
               mu if grad_kl is None else grad_kl.reshape(N).contiguous(),
               mu if grad_log_ratio is None else grad_log_ratio.reshape(K, N).contiguous(),
               mu, logvar, seed, dmu, dlv, part, counters, mu, N, L, N * L, L, K, per_split, splits)
        return dmu, dlv
    backend = _backend.backend_for(mu.device)
    dtype = _backend.compute_dtype(mu, logvar)
    mu2, lv2 = _backend.kernel_input(backend, flat(mu), dtype), _backend.kernel_input(backend, flat(logvar), dtype)
    grad_z, grad_kl, grad_log_ratio = (_backend.kernel_input(backend, g, dtype)
                                       for g in (grad_z, grad_kl, grad_log_ratio))
    N, L = mu2.shape
    dmu = _backend.empty_output((N, L), like=mu2)
    dlv = _backend.empty_output((N, L), like=lv2)
    _backend.launch(
        backend, "sample_normal_backward", max(K, 1) * N * L,
        grad_z=None if grad_z is None else grad_z.reshape(K, N, L).contiguous(),
        grad_kl=None if grad_kl is None else grad_kl.reshape(N).contiguous(),
        grad_log_ratio=None if grad_log_ratio is None else grad_log_ratio.reshape(K, N).contiguous(),
        mu=mu2, logvar=lv2, seed=seed, stop_score=stop_score, dmu=dmu, dlogvar=dlv,
    )
    dmu, dlv = _backend.in_dtype(dmu, mu.dtype), _backend.in_dtype(dlv, logvar.dtype)
    if mu.dim() == 2:
        return dmu, dlv
    return dmu.reshape(mu.shape), dlv.reshape(mu.shape)


# The ops' own calls' plans (_op_plan): a compiled graph's nodes on CUDA. ENABLED
# False: none (the tests compare both launches); ``empty`` allocates each output
# like a template the plan holds (the tests' fixture may poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
_DTYPES = (torch.float32, torch.float64)


class SampleNormalPlan:
    """The launches of one signature of the ops' own calls, mu and logvar
    (N, L) contiguous of one float32 or float64 dtype and K samples at the
    training layout's noise: the forward kernel's (with and without the
    log-ratio) and a backward's per variant with its partial sums and arrival
    counters (back at 0 after each launch), the general launchers' variants
    (forward_plan, backward_plan) on the same arguments."""

    __slots__ = ("kern", "N", "L", "K", "dtype", "device", "z_like", "kl_like", "ratio_like", "d_like",
                 "fwd_ints", "_forward", "_backward")

    def __init__(self, mu: Tensor, n_samples: int):
        self.kern = _backend.triton_module("sample_normal")
        (N, L), dtype, device = mu.shape, mu.dtype, mu.device
        self.N, self.L, self.K, self.dtype, self.device = N, L, n_samples, dtype, device
        self.z_like = template((n_samples, N, L), dtype, device)
        self.kl_like = template((N,), dtype, device)
        self.ratio_like = template((n_samples, N), dtype, device)
        self.d_like = template((N, L), dtype, device)
        self.fwd_ints = (0, N * L, L, N, n_samples * N, L, L)  # offset0, strides, N, K N, L, L
        self._forward: dict = {}
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [*self._forward.values(), *(b[0] for b in self._backward.values())]

    def forward(self, with_ratio: bool) -> Launch:
        launch = self._forward.get(with_ratio)
        if launch is None:
            N, L = self.N, self.L
            grid, meta = self.kern.forward_plan(self.K, N, L, self.dtype, self.device, with_ratio, 0, N * L, L)
            launch = self._forward[with_ratio] = Launch(self.kern._sample_normal_fwd_kernel, grid, meta)
        return launch

    def backward(self, K: int, has_grad_z: bool, has_grad_kl: bool, has_grad_ratio: bool, stop_score: bool):
        """(Launch, partial sums, counters, samples per split, splits) of one backward variant."""
        key = K, has_grad_z, has_grad_kl, has_grad_ratio, bool(stop_score)
        made = self._backward.get(key)
        if made is None:
            kern = self.kern
            grid, meta, blocks, splits, per_split = kern.backward_plan(
                K, self.N, self.L, self.dtype, self.device, has_grad_z, has_grad_kl, has_grad_ratio, stop_score)
            part, counters = kern.split_buffers(self.N, self.L, self.dtype, self.device, blocks, splits,
                                                has_grad_ratio, stop_score)
            made = self._backward[key] = (Launch(kern._sample_normal_bwd_kernel, grid, meta), part, counters,
                                          per_split, splits)
        return made


def _op_plan(mu: Tensor, logvar: Tensor, n_samples: int) -> SampleNormalPlan | None:
    """The plan of a call of the ops themselves (mu, logvar (N, L) as the
    Functions hand them to a compiled graph), or None (the general launch,
    which on CUDA pays the launch geometry and Triton's binding of the
    arguments at every call): on the triton backend, outside autocast,
    contiguous float32 or float64 tensors of one dtype and device, N L > 0,
    n_samples >= 1."""
    device = mu.device
    if (not ENABLED or not _backend.op_plans_serve(device) or mu.dtype not in _DTYPES
            or logvar.dtype is not mu.dtype or mu.dim() != 2 or logvar.shape != mu.shape or mu.numel() == 0
            or n_samples < 1 or not mu.is_contiguous() or not logvar.is_contiguous() or logvar.device != device):
        return None
    key = (mu.shape, mu.dtype, device, n_samples)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, SampleNormalPlan(mu, n_samples))


def _fake_outputs(mu: Tensor, logvar: Tensor, n_samples: int, with_ratio: bool):
    dtype = _backend.compute_dtype(mu, logvar)
    out = (mu.new_empty((n_samples, *mu.shape), dtype=z_dtype(mu, logvar)), mu.new_empty(mu.shape[:-1], dtype=dtype))
    return out + (mu.new_empty((n_samples, *mu.shape[:-1]), dtype=dtype),) if with_ratio else out


sample_normal_op = define(
    "sample_normal(Tensor mu, Tensor logvar, Tensor seed, int n_samples) -> (Tensor, Tensor)",
    lambda mu, logvar, seed, n_samples: tuple(_forward(mu, logvar, seed, n_samples)),
    lambda mu, logvar, seed, n_samples: _fake_outputs(mu, logvar, n_samples, False),
    cpu=lambda mu, logvar, seed, n_samples: (mu, logvar),
)
# The same kernel, also writing log N(z; 0, I) - log q(z) per sample from the
# eps it draws: the IWAE log-weights' latent term, exact however small the
# variance (latent_log_ratio divides eps back out of z, which overflows or
# loses its bits when the posterior collapses).
sample_normal_with_ratio_op = define(
    "sample_normal_with_ratio(Tensor mu, Tensor logvar, Tensor seed, int n_samples) -> (Tensor, Tensor, Tensor)",
    lambda mu, logvar, seed, n_samples: tuple(_forward(mu, logvar, seed, n_samples, True)),
    lambda mu, logvar, seed, n_samples: _fake_outputs(mu, logvar, n_samples, True),
    cpu=lambda mu, logvar, seed, n_samples: (mu, logvar),
)
# The gradients of both ops: grad_log_ratio (None for sample_normal) and
# stop_score are the log-ratio output's; an output with no gradient passes None.
sample_normal_backward_op = define(
    "sample_normal_backward(Tensor mu, Tensor logvar, Tensor seed, Tensor? grad_z, Tensor? grad_kl,"
    " Tensor? grad_log_ratio, bool stop_score) -> (Tensor, Tensor)",
    _backward,
    lambda mu, logvar, seed, grad_z, grad_kl, grad_log_ratio, stop_score: (torch.empty_like(mu),
                                                                            torch.empty_like(logvar)),
    cpu=lambda mu, logvar, seed, grad_z, grad_kl, grad_log_ratio, stop_score: (mu, logvar, grad_z, grad_kl,
                                                                               grad_log_ratio),
)


def _opt(t: Tensor | None, shape) -> Tensor | None:
    return None if t is None else shaped(t, shape)


def noise(seed: Tensor, n_samples: int, mu2: Tensor) -> Tensor:
    """eps (K, N, L) for the seed, in the accumulation dtype, from the sampling kernel
    itself: with mu = 0 and logvar = 0 its z = 0 + 1 * eps is eps exactly (the
    double backward's constant: double_backward below, and sample_normal_tril's in
    fastvae/ops/sample_normal_tril/op.py)."""
    zeros = torch.zeros(mu2.shape, dtype=_backend.accumulation_dtype(mu2.dtype), device=mu2.device)
    return run(sample_normal_op, zeros, zeros, seed, n_samples)[0]


def _acc(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(accumulation_dtype(t.dtype))


def double_backward(grad_z, grad_kl, grad_ratio, stop_score, mu, logvar, seed, mu2, n_samples):
    """dmu, dlogvar of z = mu + e^(logvar/2) eps (K, ..., L), the KL to N(0, I) and, when
    grad_ratio is given, log N(z; 0, I) - log q(z) (K, ...), as differentiable torch
    ops, for a create_graph=True backward (the Functions' below, and the objectives'
    plans' in fastvae/_plan.py), in the accumulation dtype, each gradient in its
    input's dtype; eps is regenerated by ``noise(seed, n_samples, mu2)`` (the
    sampling kernel itself) and enters as a constant; with stop_score q's
    parameters enter log q as constants (STL, DReG)."""
    m, lv = _acc(mu), _acc(logvar)
    s = torch.exp(0.5 * lv)
    dmu = dlv = 0.0
    if grad_z is not None or grad_ratio is not None:
        eps = noise(seed, n_samples, mu2).reshape(n_samples, *mu.shape)
        dz = 0.0 if grad_z is None else _acc(grad_z).reshape(eps.shape)
        if grad_ratio is not None:
            gr = _acc(grad_ratio).reshape(eps.shape[:-1]).unsqueeze(-1)
            z = m + s * eps
            if stop_score:
                # d log q / dz = -(z - mu_c) / var_c with q's parameters constant, written as
                # ((mu - mu_c) / s_c) / s_c + eps e^(logvar/2 - logvar_c): its value is eps / s,
                # finite however small s (z - mu_c would lose eps, 1 / var_c overflow first)
                ih = torch.exp(-0.5 * lv.detach())
                score = ((m - m.detach()) * ih) * ih + eps * torch.exp(0.5 * lv - lv.detach())
                dz = dz + gr * (score - z)
            else:
                dz = dz + gr * -z
                dlv = 0.5 * gr.sum(0)
        dmu = dz.sum(0)
        dlv = dlv + 0.5 * (dz * eps).sum(0) * s
    if grad_kl is not None:
        kl_mu, kl_lv = kl_normal_grad(_acc(grad_kl).unsqueeze(-1), m, s * s)
        dmu = dmu + kl_mu
        dlv = dlv + kl_lv
    return dmu.to(mu.dtype), dlv.to(logvar.dtype)


class SampleNormal(torch.autograd.Function):
    """Autograd of fastvae::sample_normal: saves mu and logvar as (N, L) and
    the seed only. ``n_samples`` None gives one sample shaped like mu. An
    output with no gradient passes None to the backward kernel (no zeros)."""

    @staticmethod
    def forward(ctx, mu, logvar, seed, n_samples):
        # Flattened once here, so the backward reuses the contiguous copies.
        mu2, lv2 = flat(mu), flat(logvar)
        ctx.save_for_backward(mu2, lv2, seed, mu, logvar)  # the inputs, for a double backward
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.n_samples = mu.shape, 1 if n_samples is None else n_samples
        z, kl = run(sample_normal_op, mu2, lv2, seed, ctx.n_samples)
        return shaped(z, mu.shape if n_samples is None else (n_samples, *mu.shape)), shaped(kl, mu.shape[:-1])

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        if grad_z is None and grad_kl is None:
            return None, None, None, None
        mu2, lv2, seed, mu, logvar = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (*double_backward(grad_z, grad_kl, None, False, mu, logvar, seed, mu2, ctx.n_samples), None,
                    None)
        N, L = mu2.shape
        dmu, dlogvar = run(sample_normal_backward_op, mu2, lv2, seed, _opt(grad_z, (ctx.n_samples, N, L)),
                           _opt(grad_kl, (N,)), None, False)
        return shaped(dmu, ctx.shape), shaped(dlogvar, ctx.shape), None, None


class SampleNormalWithRatio(torch.autograd.Function):
    """(z (K, ..., L), kl (...), log_ratio (K, ...)) with log_ratio = log N(z; 0, I)
    - log q(z | x) = 0.5 * sum_l(eps^2 + logvar - z^2) computed from the drawn
    eps. Its gradient: -z along z (added to z's gradient) and 0.5 per element
    of logvar directly; with ``stop_score`` (the STL and DReG estimators) the
    direct term is dropped and z's path gets eps / sigma = (z - mu) / sigma^2
    as well, computed from the regenerated eps (finite however small sigma).
    The backward kernel adds these terms itself (one launch, nothing of size
    K x N x L in torch); nothing but mu, logvar and the seed is saved."""

    @staticmethod
    def forward(ctx, mu, logvar, seed, n_samples, stop_score):
        mu2, lv2 = flat(mu), flat(logvar)
        z, kl, ratio = run(sample_normal_with_ratio_op, mu2, lv2, seed, n_samples)
        ctx.save_for_backward(mu2, lv2, seed, mu, logvar)  # the inputs, for a double backward
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.n_samples, ctx.stop_score = mu.shape, n_samples, stop_score
        return (shaped(z, (n_samples, *mu.shape)), shaped(kl, mu.shape[:-1]),
                shaped(ratio, (n_samples, *mu.shape[:-1])))

    @staticmethod
    def backward(ctx, grad_z, grad_kl, grad_ratio):
        if grad_z is None and grad_kl is None and grad_ratio is None:
            return None, None, None, None, None
        mu2, lv2, seed, mu, logvar = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (*double_backward(grad_z, grad_kl, grad_ratio, bool(ctx.stop_score), mu, logvar, seed, mu2,
                                     ctx.n_samples), None, None, None)
        N, L = mu2.shape
        K = ctx.n_samples
        dmu, dlogvar = run(sample_normal_backward_op, mu2, lv2, seed, _opt(grad_z, (K, N, L)), _opt(grad_kl, (N,)),
                           _opt(grad_ratio, (K, N)), bool(ctx.stop_score))
        return shaped(dmu, ctx.shape), shaped(dlogvar, ctx.shape), None, None, None


# -- public function -----------------------------------------------------------


def sample_normal(
    mu: Tensor,
    logvar: Tensor,
    n_samples: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Reparameterized samples from q = N(mu, diag(exp(logvar))) and KL(q || N(0, I)).

    Args:
        mu, logvar: encoder outputs of shape (..., L) on one device; any float
            dtypes, each read as it is (float16/bfloat16 included).
        n_samples: None for one sample of shape (..., L); an int K >= 1 for
            z of shape (K, ..., L).
        generator: torch.Generator the Philox seed is drawn from (default: torch's
            default generator of mu's device, so torch.manual_seed applies).

    Returns:
        (z, kl): z = mu + exp(logvar / 2) * eps with eps ~ N(0, I), and the
        analytic kl = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar) over L, shape (...).
        kl is float32 for half-precision inputs (float64 if either is
        float64); z has the encoder's dtype, or float32 under torch.autocast
        (z_dtype says why).

    Both outputs are differentiable with respect to mu and logvar. The noise is
    generated in the kernel by counter-based Philox and regenerated in the
    backward, so no K x ... x L noise tensor is stored.
    """
    _validate.float_tensors(mu=mu, logvar=logvar)
    _validate.event_dim("mu", mu)
    _validate.same_shape(mu=mu, logvar=logvar)
    if n_samples is not None:
        n_samples = _validate.sample_count("n_samples", n_samples, mu.numel(), mu)
    return sample_normal_unchecked(mu, logvar, n_samples, generator)


def sample_at(mu: Tensor, logvar: Tensor, seed: Tensor, n_samples: int, *, offset0: int, sample_stride: int,
              row_stride: int, with_ratio: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """z (n_samples, N, L) for mu, logvar (N, L) with z[k, n, l] = mu + exp(logvar / 2)
    * randn(seed, offset0 + k * sample_stride + n * row_stride + l), straight from
    the sampling kernel: the evaluation's example-major noise layout, drawn where
    it is used, with no noise tensor. No gradient (evaluation). with_ratio: also
    log N(z; 0, I) - log q(z) (n_samples, N) from the same eps (exact however
    small the variance), as (z, log_ratio)."""
    backend = _backend.backend_for(mu.device)
    dtype = _backend.compute_dtype(mu, logvar)
    mu2 = _backend.kernel_input(backend, flat(mu.detach()), dtype)
    lv2 = _backend.kernel_input(backend, flat(logvar.detach()), dtype)
    N, L = mu2.shape
    z = empty_z(backend, (n_samples, N, L), mu, dtype, z_dtype(mu, logvar))
    ratio = _backend.empty_output((n_samples, N), like=mu, dtype=dtype) if with_ratio else None
    if z.numel() == 0:
        z = _backend.in_dtype(z, z_dtype(mu, logvar))
        return (z, ratio.zero_()) if with_ratio else z
    check_offsets(offset0, sample_stride, row_stride,
                  offset0 + (n_samples - 1) * sample_stride + (N - 1) * row_stride + L - 1)
    _backend.launch(backend, "sample_normal_forward", z.numel(), mu=mu2, logvar=lv2, seed=seed, offset0=offset0,
                    sample_stride=sample_stride, row_stride=row_stride, z=z,
                    kl=_backend.empty_output((N,), like=mu, dtype=dtype), log_ratio=ratio)
    z = _backend.in_dtype(z, z_dtype(mu, logvar))
    return (z, ratio) if with_ratio else z


def sample_normal_unchecked(mu: Tensor, logvar: Tensor, n_samples: int | None,
                            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """sample_normal for arguments the caller has validated (the objectives):
    checks cost as much as a small kernel, so they run once per call."""
    seed = draw_seed(mu.device, generator)
    ops = _backend.torch_ops(mu, logvar)
    if ops is not None:
        return ops.sample_normal(mu, logvar, int(seed), n_samples)
    return SampleNormal.apply(mu, logvar, seed, n_samples)


def sample_normal_of_scale_unchecked(mu: Tensor, scale: Tensor, n_samples: int | None,
                                     generator: torch.Generator | None, exp_z: bool = False) -> tuple[Tensor, Tensor]:
    """sample_normal_unchecked of (mu, scale), scale = exp(logvar / 2) (a torch
    Normal's parameters), and with ``exp_z`` z = exp of the draw (a torch
    LogNormal's, the KL still the normals'): the eager C++ operator takes
    logvar = 2 log(scale) and the exp in its kernels' loops, and the scale's
    gradient as autograd would take it through that logvar, two or three
    torch ops each way fewer; elsewhere the logvar (and the exp) are torch
    ops around sample_normal_unchecked. The operator's log and exp are the
    kernels' own (float32: about 1 ulp), so the two agree to rounding, not
    bit for bit."""
    ops = _backend.torch_ops(mu, scale)
    if ops is not None:
        return ops.sample_normal_of_scale(mu, scale, int(draw_seed(mu.device, generator)), n_samples, exp_z)
    z, kl = sample_normal_unchecked(mu, 2.0 * torch.log(scale), n_samples, generator)
    return (torch.exp(z) if exp_z else z), kl


def sample_normal_with_ratio_unchecked(mu: Tensor, logvar: Tensor, n_samples: int, stop_score: bool,
                                       generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """(z, kl, log_ratio) of SampleNormalWithRatio, for arguments the caller has validated."""
    seed = draw_seed(mu.device, generator)
    ops = _backend.torch_ops(mu, logvar)
    if ops is not None:
        return ops.sample_normal_with_ratio(mu, logvar, int(seed), n_samples, stop_score)
    return SampleNormalWithRatio.apply(mu, logvar, seed, n_samples, stop_score)
