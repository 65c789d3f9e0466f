"""sample_normal_kl's front end: the public function, the torch.library ops
fastvae::sample_normal_kl and fastvae::sample_normal_kl_backward, and their
autograd Function (its double backward included).

One latent group of a hierarchical VAE per call: the reparameterized draw
from q and KL(q || p) against a conditional Gaussian prior given as tensors,
one kernel forward and one backward. The ops take every tensor as (N, L)
with N the batch and L the product of the other dimensions (all the work is
elementwise, so the latent dimension may be any of them), and the Philox
seed as a 0-d int64 tensor: the backward regenerates eps, so nothing but the
four parameter tensors and the seed is saved.

A hierarchical VAE calls this 20-60 times a training step at small sizes,
where on a GPU the host's work per call, not the kernels, sets the step
time. So eager calls on the triton backend keep a plan per call signature
(the tensors' shapes, strides, dtypes and devices, the form, the reduction,
autocast): its first call runs the general path's checks and works out the
outputs' templates and both kernels' grids and compile-time parameters (the
``forward_plan`` / ``backward_plan`` of triton.py, which the general
launchers call on every call, so both paths launch the same variants); later
calls look the plan up, draw the seed, allocate and launch through
``fastvae._launch.Launch`` (on CUDA the compiled kernel's launcher directly),
with one autograd node of their own (``PlannedSampleNormalKL``). Values and
gradients are the general path's bit for bit (test_sample_normal_kl.py).
Other backends, torch.compile, functorch transforms, tracing and tensor
subclasses take the general path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import _backend, _validate
from ..._double_backward import _acc
from ..._launch import Launch, PlanCache, template
from ..._op import SEED_HIGH, define, draw_seed, run, shaped
from ..._sampler import z_dtype
from ..sample_normal.op import noise
from . import sample_normal_kl_grad

PARAMS = ("logvar", "logstd")  # what the scale tensors hold: log-variances or log standard deviations


def _rows(t: Tensor) -> Tensor:
    """(B, ...) -> contiguous (B, L), L the product of the other dimensions."""
    t2 = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    return t2 if t2.is_contiguous() else t2.contiguous()


def _op_plan(mu: Tensor, log_scale: Tensor, prior_mu: Tensor, prior_log_scale: Tensor, logvar: bool,
             residual: bool, reduce: bool) -> KLPlan | None:
    """The plan of a call of the ops themselves (the four (N, L) tensors as
    SampleNormalKL hands them to a compiled graph), or None (the general
    launch, which on CUDA pays the launch geometry and Triton's binding of
    the arguments at every call): on the triton backend, outside autocast,
    contiguous float32 or float64 tensors of one dtype and device, N L > 0.
    The plan is the eager plans' KLPlan, whose launches are the general
    launcher's variants: the same bits."""
    device = mu.device
    if (not ENABLED or not _backend.op_plans_serve(device) or mu.dtype not in _DTYPES or mu.dim() != 2
            or mu.numel() == 0
            or any(t.dtype is not mu.dtype or t.shape != mu.shape or t.device != device or not t.is_contiguous()
                   for t in (mu, log_scale, prior_mu, prior_log_scale))):
        return None
    key = (mu.shape, mu.dtype, device, logvar, residual, reduce)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, KLPlan(mu, log_scale, prior_mu, prior_log_scale, logvar, residual, reduce))


def _forward(mu: Tensor, log_scale: Tensor, prior_mu: Tensor, prior_log_scale: Tensor, seed: Tensor, logvar: bool,
             residual: bool, reduce: bool) -> tuple[Tensor, Tensor]:
    """z (N, L) in z_dtype and kl ((N, L), or (N,) with reduce) in the compute dtype."""
    if (plan := _op_plan(mu, log_scale, prior_mu, prior_log_scale, logvar, residual, reduce)) is not None:
        z, kl = empty(plan.z_like), empty(plan.kl_like)
        plan.forward(mu, log_scale, prior_mu, prior_log_scale, seed, z, kl,
                     kl if plan.partial is None else plan.partial, plan.counters, *plan.ints)
        return z, kl
    backend = _backend.backend_for(mu.device)
    inputs = (mu, log_scale, prior_mu, prior_log_scale)
    dtype = _backend.compute_dtype(*inputs)
    m, ls, pm, pls = (_backend.kernel_input(backend, t, dtype) for t in inputs)
    N, L = m.shape
    # the cpp kernel writes z in its compute type: cast after
    z = _backend.empty_output((N, L), like=mu, dtype=dtype if backend == "cpp" else z_dtype(mu, log_scale))
    kl = _backend.empty_output((N,) if reduce else (N, L), like=mu, dtype=dtype)
    _backend.launch(backend, "sample_normal_kl_forward", N * L, mu=m, log_scale=ls, prior_mu=pm,
                    prior_log_scale=pls, seed=seed, logvar=logvar, residual=residual, z=z, kl=kl)
    return _backend.in_dtype(z, z_dtype(mu, log_scale)), kl


def _backward(mu: Tensor, log_scale: Tensor, prior_mu: Tensor, prior_log_scale: Tensor, seed: Tensor,
              grad_z: Tensor | None, grad_kl: Tensor | None, logvar: bool, residual: bool) -> list[Tensor]:
    """[dmu, dlog_scale, dprior_mu, dprior_log_scale] (N, L), each in its input's dtype."""
    if ((grad_z is not None or grad_kl is not None)
            and all(g is None or g.dtype is mu.dtype for g in (grad_z, grad_kl))
            and (plan := _op_plan(mu, log_scale, prior_mu, prior_log_scale, logvar, residual,
                                  grad_kl is not None and grad_kl.dim() == 1)) is not None):
        grads = [empty(plan.grad_like) for _ in range(4)]
        gz = mu if grad_z is None else grad_z.contiguous()
        gk = mu if grad_kl is None else grad_kl.contiguous()
        plan.backward(grad_z is not None, grad_kl is not None)(gz, gk, mu, log_scale, prior_mu, prior_log_scale,
                                                               seed, *grads, plan.N * plan.L, plan.L)
        return grads
    backend = _backend.backend_for(mu.device)
    inputs = (mu, log_scale, prior_mu, prior_log_scale)
    dtype = _backend.compute_dtype(*inputs)
    m, ls, pm, pls = (_backend.kernel_input(backend, t, dtype) for t in inputs)
    grad_z, grad_kl = (None if g is None else _backend.kernel_input(backend, g, dtype).contiguous()
                       for g in (grad_z, grad_kl))
    grads = [_backend.empty_output(m.shape, like=m) for _ in inputs]
    _backend.launch(backend, "sample_normal_kl_backward", m.numel(), grad_z=grad_z, grad_kl=grad_kl, mu=m,
                    log_scale=ls, prior_mu=pm, prior_log_scale=pls, seed=seed, logvar=logvar, residual=residual,
                    dmu=grads[0], dlog_scale=grads[1], dprior_mu=grads[2], dprior_log_scale=grads[3])
    return [_backend.in_dtype(g, t.dtype) for g, t in zip(grads, inputs)]


def _fake(mu, log_scale, prior_mu, prior_log_scale, seed, logvar, residual, reduce):
    dtype = _backend.compute_dtype(mu, log_scale, prior_mu, prior_log_scale)
    return (mu.new_empty(mu.shape, dtype=z_dtype(mu, log_scale)),
            mu.new_empty(mu.shape[:1] if reduce else mu.shape, dtype=dtype))


sample_normal_kl_op = define(
    "sample_normal_kl(Tensor mu, Tensor log_scale, Tensor prior_mu, Tensor prior_log_scale, Tensor seed,"
    " bool logvar, bool residual, bool reduce) -> (Tensor, Tensor)",
    _forward,
    _fake,
)
sample_normal_kl_backward_op = define(
    "sample_normal_kl_backward(Tensor mu, Tensor log_scale, Tensor prior_mu, Tensor prior_log_scale, Tensor seed,"
    " Tensor? grad_z, Tensor? grad_kl, bool logvar, bool residual) -> Tensor[]",
    _backward,
    lambda mu, log_scale, prior_mu, prior_log_scale, seed, grad_z, grad_kl, logvar, residual: [
        torch.empty_like(t) for t in (mu, log_scale, prior_mu, prior_log_scale)],
)


def _double_backward(grad_z, grad_kl, inputs, seed, m2, logvar, residual, reduce, needs):
    """The four gradients as differentiable torch ops, for a create_graph=True
    backward: the oracle's sample_normal_kl_grad in the accumulation dtype on
    the inputs as given (their graphs kept), eps regenerated by the sampling
    kernel (sample_normal's noise) as a constant; each in its input's dtype."""
    mu = inputs[0]
    B = mu.shape[0]
    eps = None if grad_z is None else noise(seed, 1, m2)[0].reshape(mu.shape)
    gk = _acc(grad_kl)
    if gk is not None and reduce:
        gk = gk.reshape(B, *([1] * (mu.dim() - 1)))
    grads = sample_normal_kl_grad(_acc(grad_z), gk, *(_acc(t) for t in inputs), eps, logvar, residual)
    return tuple(g.to(t.dtype) if need else None for g, t, need in zip(grads, inputs, needs))


class SampleNormalKL(torch.autograd.Function):
    """Autograd of fastvae::sample_normal_kl: the inputs (all of q's shape) are
    flattened to (N, L) once and saved with the seed; an output with no
    gradient passes None to the backward kernel (no zeros)."""

    @staticmethod
    def forward(ctx, mu, log_scale, prior_mu, prior_log_scale, seed, logvar, residual, reduce):
        flat = [_rows(t) for t in (mu, log_scale, prior_mu, prior_log_scale)]
        ctx.save_for_backward(*flat, seed, mu, log_scale, prior_mu, prior_log_scale)
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.logvar, ctx.residual, ctx.reduce = mu.shape, logvar, residual, reduce
        z, kl = run(sample_normal_kl_op, *flat, seed, logvar, residual, reduce)
        return shaped(z, mu.shape), kl if reduce else shaped(kl, mu.shape)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        none = (None,) * 4
        if grad_z is None and grad_kl is None:
            return (None,) * 8
        m2, ls2, pm2, pls2, seed, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (*_double_backward(grad_z, grad_kl, inputs, seed, m2, ctx.logvar, ctx.residual, ctx.reduce,
                                      ctx.needs_input_grad), *none)
        N, L = m2.shape
        grads = run(sample_normal_kl_backward_op, m2, ls2, pm2, pls2, seed,
                    None if grad_z is None else shaped(grad_z, (N, L)),
                    None if grad_kl is None else shaped(grad_kl, (N,) if ctx.reduce else (N, L)),
                    ctx.logvar, ctx.residual)
        return (*(shaped(g, ctx.shape) for g in grads), *none)


# -- the plans: eager calls on the triton backend ---------------------------------

# call signature -> KLPlan, or None where the general path serves the
# signature, checks included, on every call (bounded: fastvae._launch.PlanCache).
# ENABLED False sends every call the general way (the tests compare the two).
# empty, the plans' allocator: every output is empty_like a template the plan
# keeps (a third of torch.empty's cost with a shape); the tests poison it.
PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
# the op's own calls' plans (_op_plan): a compiled graph's nodes
OP_PLANS = PlanCache()
_DTYPES = (torch.float32, torch.float64)


class KLPlan:
    """The launches of one call signature: mu, log_scale (N, ...) and the
    prior's tensors (broadcast to mu's shape: ``expand``), all of one dtype,
    with N * L > 0. The kernels read the inputs in place where contiguous
    (``copy``: which to copy, as the general path's _rows does); the
    forward's split partial sums and arrival counters are the plan's own,
    made once (the counters are zero between launches, so a plan serves one
    stream at a time, as the objectives' plans do)."""

    __slots__ = ("kern", "N", "L", "dtype", "device", "logvar", "residual", "reduce", "expand", "copy", "shape",
                 "z_like", "kl_like", "grad_like", "rows_like", "forward", "partial", "counters", "ints",
                 "_backward")

    def __init__(self, mu: Tensor, log_scale: Tensor, prior_mu: Tensor, prior_log_scale: Tensor, logvar: bool,
                 residual: bool, reduce: bool):
        kern = self.kern = _backend.triton_module("sample_normal_kl")
        shape, dtype, device = mu.shape, mu.dtype, mu.device
        N, L = shape[0], math.prod(shape[1:])
        self.N, self.L, self.dtype, self.device, self.shape = N, L, dtype, device, shape
        self.logvar, self.residual, self.reduce = logvar, residual, reduce
        self.expand = (prior_mu.shape != shape, prior_log_scale.shape != shape)
        inputs = (mu, log_scale, prior_mu.expand(shape), prior_log_scale.expand(shape))
        self.copy = tuple(not t.is_contiguous() for t in inputs)
        self.z_like = template(shape, z_dtype(mu, log_scale), device)
        self.kl_like = template((N,) if reduce else shape, _backend.compute_dtype(mu), device)
        self.grad_like = template(shape, dtype, device)
        self.rows_like = self.grad_like.view(N, L)  # the double backward's noise: its shape and dtype
        grid, meta, cols_per, splits, row_tiles = kern.forward_plan(N, L, dtype, device, logvar, residual, reduce)
        self.forward = Launch(kern._sample_normal_kl_fwd_kernel, grid, meta)
        self.partial, self.counters = kern.forward_buffers(N, dtype, device, row_tiles, splits, reduce)
        self.ints = (N, L, cols_per, splits)
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds: the forward's and the backward's made so
        far (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *self._backward.values()]

    def backward(self, has_grad_z: bool, has_grad_kl: bool) -> Launch:
        """The backward kernel's launch for the gradients given (made at first use)."""
        key = has_grad_z, has_grad_kl
        launch = self._backward.get(key)
        if launch is None:
            grid, meta = self.kern.backward_plan(self.N, self.L, self.dtype, self.device, self.logvar, self.residual,
                                                 has_grad_z, has_grad_kl, self.reduce)
            launch = self._backward[key] = Launch(self.kern._sample_normal_kl_bwd_kernel, grid, meta)
        return launch


class PlannedSampleNormalKL(torch.autograd.Function):
    """SampleNormalKL's forward and backward kernels launched from a KLPlan,
    without its per-call layout work (the plan did it). A create_graph=True
    backward is SampleNormalKL's (the same closed form)."""

    @staticmethod
    def forward(ctx, mu, log_scale, prior_mu, prior_log_scale, seed, plan):
        inputs = (mu, log_scale, prior_mu, prior_log_scale)
        m, ls, pm, pls = (t.contiguous() for t in inputs) if any(plan.copy) else inputs
        z, kl = empty(plan.z_like), empty(plan.kl_like)
        plan.forward(m, ls, pm, pls, seed, z, kl, kl if plan.partial is None else plan.partial, plan.counters,
                     *plan.ints)
        ctx.save_for_backward(m, ls, pm, pls, seed, mu, log_scale, prior_mu, prior_log_scale)
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        if grad_z is None and grad_kl is None:
            return (None,) * 6
        m, ls, pm, pls, seed, *inputs = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (*_double_backward(grad_z, grad_kl, inputs, seed, plan.rows_like, plan.logvar, plan.residual,
                                      plan.reduce, ctx.needs_input_grad), None, None)
        grads = [empty(plan.grad_like) for _ in range(4)]
        gz = m if grad_z is None else grad_z.contiguous()
        gk = m if grad_kl is None else grad_kl.contiguous()
        plan.backward(grad_z is not None, grad_kl is not None)(gz, gk, m, ls, pm, pls, seed, *grads,
                                                               plan.N * plan.L, plan.L)
        return (*grads, None, None)


# Function.apply without its Python wrapper (which binds default arguments and
# unwraps dead functorch wrappers): the plans serve only plain tensors outside
# functorch transforms
planned_apply = super(torch.autograd.Function, PlannedSampleNormalKL).apply
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# the tensor types the plans serve: plain tensors, and parameters (a learned prior)
_PLAIN = (Tensor, torch.nn.Parameter)


def _plan_for(mu, log_scale, prior_mu, prior_log_scale, param, residual, reduce, free_bits, generator):
    """The plan of this call's signature, or None (the general path): plain
    tensors (or parameters) on the triton backend in eager mode, one dtype, N * L > 0, a
    number free_bits (valid for the call), the default or a torch.Generator.
    A signature's first call runs the general path's checks (which raise
    what the general path raises) before the plan is made."""
    if (type(mu) not in _PLAIN or type(log_scale) not in _PLAIN or type(prior_mu) not in _PLAIN
            or type(prior_log_scale) not in _PLAIN or type(param) is not str or type(residual) is not bool
            or type(reduce) is not bool
            or type(free_bits) not in (float, int) or (free_bits != 0 and not (reduce and 0 < free_bits < math.inf))
            or (generator is not None and type(generator) is not torch.Generator)
            or _backend.compiling()):
        return None
    device = mu.device
    if ((_backend._chosen.get(device.type) or _backend.backend_for(device, warn=False)) != "triton"
            or torch._C._get_tracing_state() is not None or torch._C._are_functorch_transforms_active()
            or _wrapped(mu) or _wrapped(log_scale) or _wrapped(prior_mu) or _wrapped(prior_log_scale)):
        return None
    autocast = torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device.type)
    key = (mu.shape, mu.stride(), log_scale.shape, log_scale.stride(), prior_mu.shape, prior_mu.stride(),
           prior_log_scale.shape, prior_log_scale.stride(), mu.dtype, log_scale.dtype, prior_mu.dtype,
           prior_log_scale.dtype, device, log_scale.device, prior_mu.device, prior_log_scale.device, param, residual,
           reduce, autocast)
    try:
        return PLANS[key]
    except KeyError:
        pass
    _check(mu, log_scale, prior_mu, prior_log_scale, param, residual, reduce, free_bits)
    dtype = mu.dtype
    plan = None
    if (log_scale.dtype is dtype and prior_mu.dtype is dtype and prior_log_scale.dtype is dtype
            and mu.numel() > 0):
        plan = KLPlan(mu, log_scale, prior_mu, prior_log_scale, param == "logvar", residual, reduce)
    return PLANS.store(key, plan)


def _planned(plan: KLPlan, mu, log_scale, prior_mu, prior_log_scale, free_bits, generator):
    """sample_normal_kl once its plan is found."""
    device = plan.device
    if generator is None:  # draw_seed's draw, without its checks of the generator (the default one)
        seed = torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=device)
    else:
        seed = draw_seed(device, generator)
    shape = plan.shape
    expand_mu, expand_ls = plan.expand
    z, kl = planned_apply(mu, log_scale, prior_mu.expand(shape) if expand_mu else prior_mu,
                          prior_log_scale.expand(shape) if expand_ls else prior_log_scale, seed, plan)
    if free_bits > 0:
        floor = torch.as_tensor(free_bits, dtype=kl.dtype, device=kl.device)
        kl = torch.where(kl.mean() < floor, floor, kl)
    return z, kl


# -- public function -----------------------------------------------------------


def _check(mu, log_scale, prior_mu, prior_log_scale, param, residual, reduce, free_bits) -> tuple[bool, bool, object]:
    """The arguments' checks, each error naming its argument: (residual,
    reduce, free_bits) as validated (free_bits a float or a 0-d tensor)."""
    _validate.float_tensors(mu=mu, log_scale=log_scale, prior_mu=prior_mu, prior_log_scale=prior_log_scale)
    if mu.dim() == 0:
        raise ValueError("mu must have a batch dimension first, got a 0-d tensor")
    _validate.same_shape(mu=mu, log_scale=log_scale)
    for name, p in (("prior_mu", prior_mu), ("prior_log_scale", prior_log_scale)):
        if not _validate.broadcasts_to(p.shape, mu.shape):
            raise ValueError(f"{name} of shape {tuple(p.shape)} does not broadcast to mu's shape {tuple(mu.shape)}")
    if param not in PARAMS:
        raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
    residual = _validate.boolean("residual", residual)
    reduce = _validate.boolean("reduce", reduce)
    free_bits = _validate.real("free_bits", free_bits, minimum=0.0, tensor_ok=True)
    if not reduce and (isinstance(free_bits, Tensor) or free_bits > 0):
        raise ValueError("free_bits floors the group's summed KL: it needs reduce=True")
    return residual, reduce, free_bits


def sample_normal_kl(
    mu: Tensor,
    log_scale: Tensor,
    prior_mu: Tensor,
    prior_log_scale: Tensor,
    *,
    param: str,
    residual: bool = False,
    reduce: bool = False,
    free_bits: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One latent group of a hierarchical VAE: a reparameterized draw from q and
    KL(q || p) against a conditional Gaussian prior, in one kernel forward and
    one backward, with gradients to q's and to p's parameters.

    Args:
        mu, log_scale: q's parameters, of one shape (B, ...) with the batch
            first: (B, C, H, W) with the latent dimension in the channels, or
            (B, L); the work is elementwise, so any layout.
        prior_mu, prior_log_scale: p's, broadcastable to mu's shape (a learned
            (C, 1, 1) prior, or per example from the top-down network).
        param: what the scale tensors hold, both q's and p's: ``"logstd"``
            (log sigma, VDVAE) or ``"logvar"`` (log sigma^2). Required: the
            two differ by a factor of 2 and either gives a plausible number.
        residual: q is given relative to p, as NVAE does: mu_q = prior_mu + mu
            and log sigma_q = log sigma_p + delta (delta = log_scale for
            "logstd", log_scale / 2 for "logvar"); the KL is then
            0.5 * (mu^2 / sigma_p^2 + exp(2 delta)) - delta - 1/2.
        reduce: False for the KL per element (mu's shape); True for the KL
            summed over every dimension but the first, shape (B,).
        free_bits: with reduce, a floor lambda >= 0 on the group's KL
            (Kingma et al. 2016, per group): where the batch mean of the
            group's KL is below lambda, every example's KL is replaced by
            lambda (a constant: no gradient pushes the KL further down), so
            the batch mean is max(lambda, mean_b KL_b). A Python number, or a
            0-d tensor (an annealing schedule; not read on the host).
        generator: torch.Generator the Philox seed is drawn from (default:
            torch's default generator of mu's device).

    Returns:
        (z, kl): z = mu_q + sigma_q * eps of mu's shape and dtype (float32
        under torch.autocast), eps ~ N(0, I) from the Philox stream at z's
        flat offsets (``sample_normal``'s noise: the same z for the same seed);
        kl = log sigma_p - log sigma_q + (sigma_q^2 + (mu_q - mu_p)^2) /
        (2 sigma_p^2) - 1/2 per element, or its row sums, in float32 for
        half-precision inputs (float64 if any input is float64). Both are
        differentiable in all four tensors; a create_graph=True backward
        gives exact second derivatives.
    """
    if ENABLED and (plan := _plan_for(mu, log_scale, prior_mu, prior_log_scale, param, residual, reduce, free_bits,
                                      generator)) is not None:
        return _planned(plan, mu, log_scale, prior_mu, prior_log_scale, free_bits, generator)
    residual, reduce, free_bits = _check(mu, log_scale, prior_mu, prior_log_scale, param, residual, reduce, free_bits)
    seed = draw_seed(mu.device, generator)
    # expand is a view; the op makes it contiguous, and autograd's expand
    # backward sums the prior gradients back to the prior's own shape
    z, kl = SampleNormalKL.apply(mu, log_scale, prior_mu.expand(mu.shape), prior_log_scale.expand(mu.shape), seed,
                                 param == "logvar", residual, reduce)
    if isinstance(free_bits, Tensor) or free_bits > 0:
        floor = torch.as_tensor(free_bits, dtype=kl.dtype, device=kl.device)
        kl = torch.where(kl.mean() < floor, floor, kl)
    return z, kl
