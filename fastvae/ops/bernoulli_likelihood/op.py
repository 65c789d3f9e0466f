"""The front end of bernoulli_log_prob and continuous_bernoulli_log_prob:
their public functions, the torch.library ops fastvae::<op> and
fastvae::<op>_backward with the autograd Function around them, their double
backward, and the route of likelihood="continuous_bernoulli"
(continuous_bernoulli_decoder_log_prob, fastvae/_decoder.py's table; the
Bernoulli's route calls bernoulli_log_prob_unchecked).

The two take the same arguments and layout and differ only in the
per-element formula, which lives in each backend's kernels (triton.py,
bernoulli_likelihood.h, the oracle in __init__.py) and in the double backward
(below). ``op`` below is the op's name; its kernels are ``<op>_forward`` and
``<op>_backward`` in the registry.

Layout (fastvae/_likelihood_layout.py): x (P, D) broadcast over the decoder
samples of logits (K, P, D), never copied; the result is (K, P).

The continuous Bernoulli likelihood (Loaiza-Ganem and Cunningham 2019) with
logits, for x in [0, 1]:

    log p(x | l) = x l - softplus(l) + log C(l),   C(l) = l / tanh(l / 2),

the Bernoulli term plus the log normalizer, written in the logit (C equals
2 atanh(1 - 2 lambda) / (1 - 2 lambda), lambda = sigmoid(l)). C is even in l
and 0 / 0 at l = 0, where the kernels take its Taylor series in l^2 (and for
the gradient, 1/l - 1/sinh(l), which cancels there); at large |l|,
log C = log|l| - log(1 - e^-|l|) + log1p(e^-|l|), exact as |l| grows.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ... import _backend, _validate, _value_checks
from ..._double_backward import _acc, _like
from ..._launch import Launch, PlanCache, template
from ..._likelihood_layout import (
    broadcast_x,
    check_output,
    flat,
    fold_samples,
    folded,
    kernel_shape,
    kernel_views,
    likelihood_torch_ops,
    unfold_rows,
)
from ..._op import define, run, shaped
from . import _cb_log_norm_grad

_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def forward(kernel: str, x: Tensor, logits: Tensor) -> Tensor:
    """``kernel``'s sum over D, shape (K, P), for x (P, D) and logits (K, P, D),
    both contiguous (kernel_views makes them so). The ops' own calls (a
    compiled graph's nodes) launch from a plan where _op_plan takes them."""
    if (plan := _op_plan(x, logits, _KINDS[kernel])) is not None:
        out = empty(plan.out_like)
        plan.forward(x, logits, out, out, out, out, *plan.fwd_ints)
        return out
    backend = _backend.backend_for(logits.device)
    dtype = _backend.compute_dtype(x, logits)
    # logits are read in their own dtype (a bfloat16 decoder output is never
    # copied to float32); the result is float32, or float64
    x, logits = _backend.kernel_input(backend, x, dtype), _backend.kernel_input(backend, logits, dtype, True)
    if fold_samples(backend, logits):  # few x rows against many samples: every thread gets work
        K, P, _ = logits.shape
        x, folded_logits, _ = folded(x, logits)
        out = _backend.empty_output((1, K * P), like=logits, dtype=dtype)
        _backend.launch(backend, kernel, logits.numel(), x=x, logits=folded_logits, out=out)
        return out.view(K, P)
    out = _backend.empty_output(logits.shape[:2], like=logits, dtype=dtype)
    _backend.launch(backend, kernel, logits.numel(), x=x, logits=logits, out=out)
    return out


def backward(kernel: str, grad_out: Tensor, x: Tensor, logits: Tensor, need_dx: bool) -> list[Tensor]:
    """[dlogits (K, P, D)], and dx (P, D) when need_dx, for grad_out (K, P)
    and the layout of forward (an unwanted gradient is not allocated at all:
    that cost as much as a small kernel). Each gradient in its input's dtype;
    from a plan as the forward's."""
    if grad_out.dtype is logits.dtype and (plan := _op_plan(x, logits, _KINDS[kernel])) is not None:
        launch, ints, part_like, tiles, splits = plan.backward(need_dx)
        dlogits = empty(plan.dlogits_like)
        dx = empty(plan.dx_like) if need_dx else dlogits
        launch(shaped(grad_out, logits.shape[:2]).contiguous(), x, logits, dlogits, dx, empty(part_like),
               plan.kern.tile_counters(plan.device, tiles, splits), dlogits, *ints)
        return [dlogits, dx] if need_dx else [dlogits]
    backend = _backend.backend_for(logits.device)
    K, P, D = logits.shape
    dtype = _backend.compute_dtype(x, logits)
    x_dtype, logits_dtype = x.dtype, logits.dtype
    x, logits = _backend.kernel_input(backend, x, dtype), _backend.kernel_input(backend, logits, dtype, True)
    grad_out = _backend.kernel_input(backend, grad_out, dtype)
    x2, l3 = x, logits
    fold = fold_samples(backend, logits)
    if fold:
        x2, l3, _ = folded(x, logits)
    dlogits = _backend.empty_output(l3.shape, like=logits)
    dx = _backend.empty_output((l3.shape[1], D), like=x) if need_dx else None
    _backend.launch(
        backend, kernel, dlogits.numel(),
        grad_out=shaped(grad_out, l3.shape[:2]).contiguous(), x=x2, logits=l3, dx=dx, dlogits=dlogits,
    )
    dlogits = _backend.in_dtype(dlogits.view(K, P, D) if fold else dlogits, logits_dtype)
    if not need_dx:
        return [dlogits]
    return [dlogits, _backend.in_dtype(unfold_rows(dx, K, P) if fold else dx, x_dtype)]


def define_ops(op: str, cpu: bool = False):
    """fastvae::<op> and fastvae::<op>_backward (_op.define), in the kernels'
    layout; ``cpu``: the ops have C++ twins (torch_op.cpp), which serve
    every layout but the folded one."""
    return (
        define(
            f"{op}(Tensor x, Tensor logits) -> Tensor",
            functools.partial(forward, f"{op}_forward"),
            lambda x, logits: logits.new_empty(logits.shape[:2], dtype=_backend.compute_dtype(x, logits)),
            cpu=(lambda x, logits: None if fold_samples("cpp", logits.shape) else (logits, x)) if cpu else None,
        ),
        define(
            f"{op}_backward(Tensor grad_out, Tensor x, Tensor logits, bool need_dx) -> Tensor[]",
            functools.partial(backward, f"{op}_backward"),
            lambda grad_out, x, logits, need_dx: [torch.empty_like(logits)]
            + ([torch.empty_like(x)] if need_dx else []),
            cpu=(lambda grad_out, x, logits, need_dx: None if fold_samples("cpp", logits.shape)
                 else (logits, x, grad_out)) if cpu else None,
        ),
    )


def autograd_function(name: str, module: str, ops: tuple, double_backward) -> type:
    """The autograd Function ``name`` of ``ops`` (define_ops'). The op takes
    the kernels' layout, x (P, D) and logits (K, P, D); made in its forward
    once, and saved, so the backward reuses it (the inputs too, for
    ``double_backward``, the closed form that a create_graph=True backward
    differentiates)."""

    op, backward_op = ops

    def forward(ctx, x, logits):
        x2, l3 = kernel_views(x, logits)
        ctx.save_for_backward(x2, l3, x, logits)
        ctx.shapes = x.shape, logits.shape
        return shaped(run(op, x2, l3), logits.shape[:-1])

    def backward(ctx, grad_out):
        x2, l3, x, logits = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return double_backward(grad_out, x, logits, ctx.needs_input_grad)
        need_dx = ctx.needs_input_grad[0]
        grads = run(backward_op, grad_out, x2, l3, need_dx)
        x_shape, logits_shape = ctx.shapes
        return (shaped(grads[1], x_shape) if need_dx else None), shaped(grads[0], logits_shape)

    doc = f"Autograd of {op.name()} (fastvae/ops/bernoulli_likelihood/op.py)."
    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": module, "__qualname__": name,
        "forward": staticmethod(forward), "backward": staticmethod(backward),
    })


# -- double backward ---------------------------------------------------------------
# The closed forms a create_graph=True backward differentiates (fastvae/_double_backward.py).


def bernoulli_log_prob_double_backward(grad_out, x, logits, needs):
    """dx, dlogits of sum(x * logits - softplus(logits))."""
    return _bernoulli_kind(grad_out, x, logits, needs, None)


def continuous_bernoulli_log_prob_double_backward(grad_out, x, logits, needs):
    """dx, dlogits of sum(x * logits - softplus(logits) + log C(logits)): the
    oracle's d log C / dl (a Taylor branch near 0) carries the second derivative."""
    return _bernoulli_kind(grad_out, x, logits, needs, _cb_log_norm_grad)


def _bernoulli_kind(grad_out, x, logits, needs, log_norm_grad):
    g, xx, lg = _acc(grad_out).unsqueeze(-1), _acc(x), _acc(logits)
    e = xx - torch.sigmoid(lg)
    dl = g * (e if log_norm_grad is None else e + log_norm_grad(lg))
    return (_like((g * lg).sum_to_size(x.shape), x, needs[0]), _like(dl.sum_to_size(logits.shape), logits, needs[1]))


# -- the value checks: data in [0, 1], logits that are no probabilities (fastvae/_value_checks.py) --

# The [0, 1]-data likelihoods' words: each has its own slot (a Bernoulli warning
# must not silence the continuous Bernoulli's check) and names its own fix.
_UNIT_DATA = {
    "bernoulli": ("the Bernoulli likelihood takes binary data or values in [0, 1]",
                  "torch.distributions.Bernoulli(probs=...)"),
    "continuous_bernoulli": ("the continuous Bernoulli likelihood is a density on [0, 1]",
                             "torch.distributions.ContinuousBernoulli(probs=...)"),
}


def bernoulli_logits(logits: Tensor, name: str = "logits", likelihood: str = "bernoulli") -> None:
    """Warn when every value read lies in [0, 1]: probabilities, not logits
    (a fresh decoder's logits straddle 0; one that ends in a sigmoid gives
    values in (0, 1), which, read as logits, give a wrong likelihood).
    ``likelihood``: "bernoulli" or "continuous_bernoulli" (its own slot and words)."""
    kind = f"{likelihood} logits"
    if not _value_checks.should_check(kind, logits):
        return
    lo, hi = _value_checks.value_range(logits)
    if 0.0 <= lo and 0.0 < hi <= 1.0:  # all zeros: a zero-initialized last layer, not a sigmoid
        _value_checks.warn(kind,
            f"{name}: logits expected, but the values lie in [0, 1] (min {lo:.3g}, max {hi:.3g}): did you "
            f"apply a sigmoid? Pass the pre-sigmoid output (drop the final Sigmoid), or return "
            f"{_UNIT_DATA[likelihood][1]} from decode (docs/migrating.md)")


def bernoulli_data(x: Tensor, name: str = "x", likelihood: str = "bernoulli") -> None:
    """Warn when data under the Bernoulli or continuous Bernoulli likelihood
    leaves [0, 1] (raw pixel values, say, or standardized data): the result
    is then no log-likelihood. ``likelihood`` picks the slot and the words."""
    kind = f"{likelihood} data"
    if not _value_checks.should_check(kind, x):
        return
    lo, hi = _value_checks.value_range(x)
    if lo < 0.0 or hi > 1.0:
        _value_checks.warn(kind,
            f"{name} lies outside [0, 1] (min {lo:.3g}, max {hi:.3g}): {_UNIT_DATA[likelihood][0]}. Scale the "
            f"data into [0, 1] (e.g. pixels / 255), or use likelihood='gaussian' for real-valued data")


# -- bernoulli_log_prob ------------------------------------------------------------
# The Bernoulli reconstruction term with logits, fused forward and backward,
# with x broadcast over decoder samples.

_BERNOULLI_OPS = define_ops("bernoulli_log_prob", cpu=True)
bernoulli_log_prob_op, bernoulli_log_prob_backward_op = _BERNOULLI_OPS
BernoulliLogProb = autograd_function("BernoulliLogProb", __name__, _BERNOULLI_OPS, bernoulli_log_prob_double_backward)


def bernoulli_log_prob(x: Tensor, logits: Tensor, *, event_dims: int = 1) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last dimension D.

    Args:
        x: data of shape (..., D), binary or in [0, 1] (continuous Bernoulli
            targets are used as is, without the normalizing constant); it
            broadcasts against ``logits`` of shape (K, ..., D) without being
            copied K times. Values outside [0, 1] give a number that is no
            log-likelihood: fastvae warns (on CPU at every call, on CUDA at
            the first; ``fastvae.set_value_checks``).
        logits: decoder logits, shape (K, ..., D) or (..., D): the
            pre-sigmoid output. Probabilities (a decoder ending in a sigmoid)
            give a wrong likelihood without an error; fastvae warns when every
            value it reads lies in [0, 1].
        event_dims: how many trailing dimensions form one event, summed over:
            3 for (..., C, H, W) images (x then ends in (C, H, W) too).

    Returns:
        sum(x * logits - softplus(logits)) over D, with ``logits``' leading
        shape. softplus is evaluated as max(l, 0) + log1p(exp(-|l|)), exact for
        |logits| of 100 and beyond. Differentiable in logits and in x when x
        requires grad.

    Dtypes may differ (bfloat16 logits with float32 x, as under autocast):
    each is read in its own dtype; the result is float32 when any input is
    half precision (float64 when any is float64), and each gradient comes
    back in its input's dtype.
    """
    _validate.float_tensors(x=x, logits=logits)
    _validate.event_dim("logits", logits)
    if type(event_dims) is not int or event_dims < 1:  # True and 1.0 must not pass as 1
        event_dims = _validate.positive_int("event_dims", event_dims)
    bernoulli_data(x)
    bernoulli_logits(logits)
    return bernoulli_log_prob_unchecked(x, logits, event_dims)


def bernoulli_log_prob_unchecked(x: Tensor, logits: Tensor, event_dims: int = 1) -> Tensor:
    """bernoulli_log_prob after the metadata checks and without the value
    checks (the caller ran them, with its own argument names)."""
    if event_dims != 1:
        x, logits = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(logits, "logits", event_dims)
    x = broadcast_x(x, logits, "logits")
    if ENABLED and (plan := _plan_for(x, logits)) is not None:
        return planned_apply(x, logits, plan)
    ops = likelihood_torch_ops(x, logits, half_out=True)
    if ops is not None:
        return ops.bernoulli_log_prob(x, logits)
    return BernoulliLogProb.apply(x, logits)


# -- the plans: eager calls of bernoulli_log_prob on the triton backend -------------
# A small decoder's step (a Gumbel-softmax VAE's, whose latent has no
# objective plan) is host-bound on a GPU: the general path's layout work per
# call (kernel_views, the op's dtype rules, forward_plan / backward_plan and
# tile_geometry) and Triton's general launcher cost more than the kernels. So
# eager calls of bernoulli_log_prob_unchecked (the public function after its
# checks, and likelihood="bernoulli" where no objective plan serves the step)
# on the triton backend keep a plan per call signature (x's and the logits'
# shapes, strides, dtypes and devices): its first call works out the outputs'
# templates and the kernels' grids and compile-time parameters (triton.py's
# forward_plan / backward_plan, which bernoulli_forward / bernoulli_backward
# call too, so both paths launch the same variants on the same arguments);
# later calls allocate and launch through fastvae._launch.Launch, with one
# autograd node of their own (PlannedBernoulliLogProb). Values and gradients
# are the general path's bit for bit (test_bernoulli_likelihood.py); a
# create_graph=True backward differentiates the same closed form. Other
# backends, torch.compile, functorch transforms, tracing, tensor subclasses,
# half precision, autocast, mixed dtypes and empty tensors take the general
# path. (The objectives' plans launch these kernels from their own tails,
# BernoulliTail below; these plans are the op's alone.)

# Per signature a BernoulliPlan, or None (the general path, on every call),
# in a bounded fastvae._launch.PlanCache; ENABLED = False: no plans (the tests
# compare the two paths); ``empty`` allocates each output like a template the
# plan holds (the tests' fixture may poison it).
PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
# the ops' own calls' plans (_op_plan): a compiled graph's nodes
OP_PLANS = PlanCache()


class BernoulliPlan:
    """The launches of one call signature: x (broadcast_x's form) and logits
    (K, ..., D) of one float32 or float64 dtype, as kernel_views lays them
    out: x as (P, D) and the logits as (K, P, D), views where contiguous,
    copies where not (``copy``); the Bernoulli's formula, or (``kind``, the
    ops' own plans) the continuous Bernoulli's."""

    __slots__ = ("kern", "kind", "K", "P", "D", "dtype", "device", "copy", "out_like", "dlogits_like", "dx_like",
                 "forward", "fwd_ints", "_backward")

    def __init__(self, x: Tensor, logits: Tensor, K: int, P: int, D: int, kind: int | None = None):
        kern = self.kern = _backend.triton_module("bernoulli_likelihood")
        self.kind = kern.BERNOULLI if kind is None else kind
        dtype, device = logits.dtype, logits.device
        self.K, self.P, self.D, self.dtype, self.device = K, P, D, dtype, device
        self.copy = (not x.is_contiguous(), not logits.is_contiguous())
        self.out_like = template(logits.shape[:-1], dtype, device)
        self.dlogits_like = template(logits.shape, dtype, device)
        self.dx_like = template(x.shape, dtype, device)
        grid, meta = kern.forward_plan(self.kind, K, P, D, dtype, device)
        self.forward = Launch(kern._bernoulli_log_prob_fwd_kernel, grid, meta)
        self.fwd_ints = (P, K * P, D, 0, 1)  # P, K * P, D, no term's weight, no divisor
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds: the forward's and the backward's made so
        far (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *(b[0] for b in self._backward.values())]

    def backward(self, has_dx: bool) -> tuple:
        """(Launch, runtime integers, partial sums' template or None, tiles)
        of the backward kernel with or without dx (made at first use)."""
        entry = self._backward.get(has_dx)
        if entry is None:
            kern = self.kern
            grid, meta, ints, tiles = kern.backward_plan(self.kind, self.K, self.P, self.D, self.dtype,
                                                         self.device, has_dx)
            entry = self._backward[has_dx] = (Launch(kern._bernoulli_log_prob_bwd_kernel, grid, meta),
                                              (*ints, 0, 1),
                                              template(kern.backward_part_shape(ints),
                                                       _backend.accumulation_dtype(self.dtype), self.device),
                                              tiles, ints[-1])
        return entry


class PlannedBernoulliLogProb(torch.autograd.Function):
    """BernoulliLogProb's kernels launched from a BernoulliPlan, without its
    per-call layout work (the plan did it); a create_graph=True backward
    differentiates BernoulliLogProb's closed form."""

    @staticmethod
    def forward(ctx, x, logits, plan):
        x2 = x.reshape(plan.P, plan.D).contiguous() if plan.copy[0] else x.view(plan.P, plan.D)
        l3 = logits.contiguous() if plan.copy[1] else logits
        out = empty(plan.out_like)
        plan.forward(x2, l3, out, out, out, out, *plan.fwd_ints)
        ctx.save_for_backward(x2, l3, x, logits)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, l3, x, logits = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (*bernoulli_log_prob_double_backward(grad_out, x, logits, ctx.needs_input_grad), None)
        need_dx = ctx.needs_input_grad[0]
        # the engine hands grad_out in the output's dtype and device (it casts
        # one given in another dtype); a sum's is an expanded scalar: copied, as
        # the general path's contiguous() does
        g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()
        launch, ints, part_like, tiles, splits = plan.backward(need_dx)
        dlogits = empty(plan.dlogits_like)
        dx = empty(plan.dx_like) if need_dx else dlogits
        counters = plan.kern.tile_counters(plan.device, tiles, splits)
        launch(g, x2, l3, dlogits, dx, empty(part_like), counters, dlogits, *ints)
        return (dx if need_dx else None), dlogits, None


# Function.apply without its Python wrapper (which binds default arguments and
# unwraps dead functorch wrappers): the plans serve only plain tensors outside
# functorch transforms
planned_apply = super(torch.autograd.Function, PlannedBernoulliLogProb).apply
_DTYPES = (torch.float32, torch.float64)


def _plan_for(x: Tensor, logits: Tensor) -> BernoulliPlan | None:
    """The plan of this call's signature, or None (the general path): plain
    tensors on the triton backend in eager mode, without autocast, x
    (broadcast_x's form) and logits of one float32 or float64 dtype and
    device, no empty dimension."""
    if type(x) is not Tensor or type(logits) is not Tensor or _backend.compiling():
        return None
    device = logits.device
    if ((_backend._chosen.get(device.type) or _backend.backend_for(device, warn=False)) != "triton"
            or torch._C._get_tracing_state() is not None or torch._C._are_functorch_transforms_active()
            or _wrapped(x) or _wrapped(logits)):
        return None
    autocast = torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device.type)
    key = (x.shape, x.stride(), x.dtype, x.device, logits.shape, logits.stride(), logits.dtype, device, autocast)
    try:
        return PLANS[key]
    except KeyError:
        pass
    plan = None
    if (not autocast and logits.dtype in _DTYPES and x.dtype is logits.dtype and x.device == device
            and logits.dim() >= 1 and logits.numel() > 0):
        K, P, D = kernel_shape(x, logits)
        plan = BernoulliPlan(x, logits, K, P, D)
    return PLANS.store(key, plan)


def _op_plan(x: Tensor, logits: Tensor, kind: int) -> BernoulliPlan | None:
    """The plan of a call of bernoulli_log_prob's or (``kind``)
    continuous_bernoulli_log_prob's ops themselves, x (P, D) and logits (K,
    P, D) as the Function hands them (a compiled graph calls the ops so), or
    None (the general launch, which on CUDA pays the launch geometry and
    Triton's binding of the arguments at every call): on the triton backend,
    outside autocast, contiguous float32 or float64 tensors of one dtype and
    device, no empty dimension. The launches are the eager plans' (the same
    kernels and arguments as the general launch)."""
    device = logits.device
    if (not ENABLED or not _backend.op_plans_serve(device) or logits.dtype not in _DTYPES
            or x.dtype is not logits.dtype or logits.dim() != 3 or x.shape != logits.shape[1:]
            or logits.numel() == 0 or not x.is_contiguous() or not logits.is_contiguous() or x.device != device):
        return None
    key = (logits.shape, logits.dtype, device, kind)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, BernoulliPlan(x, logits, *logits.shape, kind))


# the formula of each op's kernels (triton.py's BERNOULLI and CONTINUOUS)
_KINDS = {"bernoulli_log_prob_forward": 0, "bernoulli_log_prob_backward": 0,
          "continuous_bernoulli_log_prob_forward": 1, "continuous_bernoulli_log_prob_backward": 1}


# -- continuous_bernoulli_log_prob -------------------------------------------------
# The continuous Bernoulli likelihood (the module's docstring), fused forward and
# backward, with x in [0, 1] broadcast over decoder samples; bernoulli_log_prob's
# ops and Function with its formula.

_CONTINUOUS_OPS = define_ops("continuous_bernoulli_log_prob")
continuous_bernoulli_log_prob_op, continuous_bernoulli_log_prob_backward_op = _CONTINUOUS_OPS
ContinuousBernoulliLogProb = autograd_function("ContinuousBernoulliLogProb", __name__, _CONTINUOUS_OPS,
                                               continuous_bernoulli_log_prob_double_backward)


def continuous_bernoulli_log_prob(x: Tensor, logits: Tensor, *, event_dims: int = 1) -> Tensor:
    """log ContinuousBernoulli(x; logits) summed over the last dimension D:
    the normalized density of Loaiza-Ganem and Cunningham (2019), for data
    in [0, 1] such as grey-scale pixels.

    Args:
        x: data of shape (..., D) in [0, 1]; it broadcasts against ``logits``
            of shape (K, ..., D) without being copied K times (fastvae warns
            when x leaves [0, 1]).
        logits: decoder logits, shape (K, ..., D) or (..., D), finite.
        event_dims: how many trailing dimensions form one event, summed over:
            3 for (..., C, H, W) images.

    Returns:
        sum(x l - softplus(l) + log C(l)) over D with C(l) = l / tanh(l / 2)
        (= 2 atanh(1 - 2 sigmoid(l)) / (1 - 2 sigmoid(l))): log C is 2 at
        l = 0, taken from its Taylor series near 0 and from
        log|l| - log(1 - e^-|l|) + log1p(e^-|l|) beyond, exact at large |l|
        (torch.distributions.ContinuousBernoulli's normalizer, computed from
        the probability, drifts there). Equal to
        ``ContinuousBernoulli(logits=logits).log_prob(x).sum(-1)`` where that
        is accurate. Differentiable in logits, and in x when x requires grad.

    Dtypes may differ as in :func:`fastvae.bernoulli_log_prob`; half-precision
    inputs give a float32 result.
    """
    _validate.float_tensors(x=x, logits=logits)
    _validate.event_dim("logits", logits)
    if type(event_dims) is not int or event_dims < 1:
        event_dims = _validate.positive_int("event_dims", event_dims)
    bernoulli_data(x, likelihood="continuous_bernoulli")
    bernoulli_logits(logits, likelihood="continuous_bernoulli")
    return continuous_bernoulli_log_prob_unchecked(x, logits, event_dims)


def continuous_bernoulli_log_prob_unchecked(x: Tensor, logits: Tensor, event_dims: int = 1) -> Tensor:
    """continuous_bernoulli_log_prob after the metadata checks, without the value checks."""
    if event_dims != 1:
        x, logits = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(logits, "logits", event_dims)
    x = broadcast_x(x, logits, "logits")
    return ContinuousBernoulliLogProb.apply(x, logits)


def continuous_bernoulli_decoder_log_prob(x: Tensor, logits: Tensor, probs_given: bool) -> Tensor:
    """likelihood="continuous_bernoulli" in the objectives and evaluation: x
    (*batch, D) against decode(z)'s logits (*sample_shape, *batch, D), shapes
    checked and events flattened by fastvae._decoder."""
    _validate.float_tensors(x=x, logits=logits)
    bernoulli_data(x, "x (likelihood='continuous_bernoulli')", "continuous_bernoulli")
    if not probs_given:  # logits derived from a distribution's probs= may lie in [0, 1]
        bernoulli_logits(logits, "decode(z) (likelihood='continuous_bernoulli')",
                                      "continuous_bernoulli")
    return continuous_bernoulli_log_prob_unchecked(x, logits)


# -- the decoder route: likelihood= of the objectives and evaluation (fastvae/_decoder.py) --


def bernoulli_route(x: Tensor, out: Any, sample_shape: tuple[int, ...], batch_ndim: int, probs_given: bool) -> Tensor:
    """Logits; the op's checks run here (its unchecked function is called)."""
    events, lead = x.dim() - batch_ndim, len(sample_shape) + batch_ndim
    logits = check_output("logits", out, x, sample_shape, batch_ndim)
    _validate.float_tensors(x=x, logits=logits)
    bernoulli_data(x, "x (likelihood='bernoulli')", "bernoulli")
    if not probs_given:
        bernoulli_logits(logits, "decode(z) (likelihood='bernoulli')")
    return bernoulli_log_prob_unchecked(flat(x, batch_ndim, events), flat(logits, lead, events))


def continuous_bernoulli_route(x: Tensor, out: Any, sample_shape: tuple[int, ...], batch_ndim: int,
                               probs_given: bool) -> Tensor:
    """Logits for x in [0, 1]."""
    events, lead = x.dim() - batch_ndim, len(sample_shape) + batch_ndim
    logits = check_output("logits", out, x, sample_shape, batch_ndim)
    return continuous_bernoulli_decoder_log_prob(flat(x, batch_ndim, events), flat(logits, lead, events),
                                                 probs_given)


# -- the objectives' plans: likelihood="bernoulli" fused into their tail (Op.plan_tail) --

# the value checks' kinds that the Bernoulli likelihood's general tail runs
# (bernoulli_route's; tests/test_plan.py checks the names)
BERNOULLI_CHECKS = ("bernoulli data", "bernoulli logits")


class BernoulliTail:
    """The Bernoulli likelihood of logits in the plans' tail
    (fastvae/_spec.py's FusedTail says what each method does): the
    bernoulli_log_prob kernels with the bound's epilogue. The logits fit as
    one contiguous tensor of the call's shape, once the general tail has run
    the value checks (its first call of each kind)."""

    def __init__(self, K: int, P: int, D: int, dtype: torch.dtype, out_dtype: torch.dtype, device: torch.device,
                 reduce: bool, iwae: bool, out_shape, lead: int, placeholder: Tensor, counters: Tensor):
        self.out_shape, self.out_dtype, self.device = out_shape, out_dtype, device
        self.placeholder, self.counters = placeholder, counters
        self.checks_epoch, self.checks_settled = -1, False  # fit's reading of _value_checks
        kern = _backend.triton_module("bernoulli_likelihood")
        grid, meta = kern.forward_plan(kern.BERNOULLI, K, P, D, out_dtype, device, True, reduce)
        self.lik_forward = Launch(kern._bernoulli_log_prob_fwd_kernel, grid, meta)
        self.programs = grid[0]
        self.lik_ints = (P, K * P, D)
        grid, meta, ints, tiles = kern.backward_plan(kern.BERNOULLI, K, P, D, out_dtype, device, False, reduce,
                                                     not iwae)
        self.lik_backward = Launch(kern._bernoulli_log_prob_bwd_kernel, grid, meta)
        self.lik_backward_ints = ints

    def fit(self, out) -> tuple[Tensor, None] | None:
        if (type(out) is not Tensor or out.shape != self.out_shape or out.dtype is not self.out_dtype
                or out.device != self.device or not out.is_contiguous() or _wrapped(out)):
            return None
        if self.checks_epoch != _value_checks.epoch:  # the checks' state changed: ask again
            self.checks_settled = _value_checks.settled(*BERNOULLI_CHECKS)
            self.checks_epoch = _value_checks.epoch
        return (out, None) if self.checks_settled else None

    def forward(self, x: Tensor, out: Tensor, aux: None, res: Tensor, term: Tensor, part: Tensor, counter: Tensor,
                term_bits: int, divisor: int) -> None:
        self.lik_forward(x, out, res, term, part, counter, *self.lik_ints, term_bits, divisor)

    def backward(self, grad: Tensor, x: Tensor, out: Tensor, aux: None, dout: Tensor, dterm: Tensor,
                 term_bits: int, divisor: int) -> None:
        self.lik_backward(grad, x, out, dout, dout, self.placeholder, self.counters, dterm,
                          *self.lik_backward_ints, term_bits, divisor)

    def general_output(self, out: Tensor, aux: None) -> Tensor:
        return out
