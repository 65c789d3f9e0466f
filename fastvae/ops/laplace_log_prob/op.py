"""laplace_log_prob's front end: the public function, the torch.library ops
fastvae::laplace_log_prob and fastvae::laplace_log_prob_backward, their
autograd Function and its double backward (a closed form, below).

The Laplace reconstruction term log Laplace(x; loc, b) = -|x - loc| / b -
log(2 b), summed over the event, fused forward and backward, with x broadcast
over decoder samples; fastvae/_decoder.py's route of likelihood="laplace"
(and of a decoder that returns a torch Laplace) calls it. On the cpp backend
an eager call goes to the C++ operator fastvae_cpp::laplace_log_prob
(torch_op.cpp)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ... import _backend, _value_checks
from ... import _likelihood_layout as layout
from ..._launch import PlanCache
from ..._op import define, run, shaped

_NAMES = "loc", "log_scale"  # the kernels' names of the decoder output and its scale parameter


def _kernel_inputs(backend: str, dtype: torch.dtype, *tensors: Tensor) -> list[Tensor]:
    """The tensors as the kernels read them (_backend.kernel_input): Triton and
    the reference in their own dtype; the cpp kernels in the compute dtype (a
    half-precision decoder output is cast to float32 first), contiguous."""
    tensors = [_backend.kernel_input(backend, t, dtype) for t in tensors]
    return tensors if backend == "triton" else [t.contiguous() for t in tensors]


# The plans of the ops' own calls (a compiled graph's nodes) on the triton
# backend, per signature (bounded: fastvae._launch.PlanCache); ENABLED False
# sends every call the general way (the tests compare the two); ``empty``
# allocates each output like a template the plan holds (the tests' fixture may
# poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like


class LaplacePlan(layout.ScaleLikelihoodPlan):
    """A ScaleLikelihoodPlan of laplace_log_prob's kernels."""

    __slots__ = ()
    MODULE, BACKWARD_KERNEL = "laplace_log_prob", "_laplace_log_prob_bwd_kernel"

    def forward_kernel(self, kern) -> tuple:
        grid, meta = kern.forward_plan(self.K, self.P, self.D, self.dtype, self.device, self.layout)
        return kern._laplace_log_prob_fwd_kernel, grid, meta

    def backward_meta(self, need_dlog_scale: bool) -> dict:
        return dict(HAS_DS=need_dlog_scale)

    @staticmethod
    def empty(like: Tensor) -> Tensor:
        return empty(like)

    def run_forward(self, x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
        """_forward's log-likelihood, launched from the plan."""
        out = empty(self.out_like)
        self.forward(x, loc, log_scale, out, self.P, self.K * self.P, self.D)
        return out

    def run_backward(self, grad_out: Tensor, x: Tensor, loc: Tensor, log_scale: Tensor, need_dx: bool,
                     need_dlog_scale: bool) -> list[Tensor]:
        """_backward's gradients, launched from the plan."""
        launch, ints, g, dloc, dx, ds, part_dx, part_ds, counters = self.backward(grad_out, need_dx,
                                                                                  need_dlog_scale)
        launch(g, x, loc, log_scale, dloc, dx, ds, part_dx, part_ds, counters, self.P, self.D, *ints)
        return [dloc] + [dx] * need_dx + [ds] * need_dlog_scale


def _op_plan(x: Tensor, loc: Tensor, log_scale: Tensor) -> LaplacePlan | None:
    """The plan of a call of the ops themselves (LaplaceLogProb hands them x
    (P, D), loc (K, P, D) and log_scale in a kernel_var form, as a compiled
    graph calls them), or None: _likelihood_layout.scale_likelihood_plan."""
    return None if not ENABLED else layout.scale_likelihood_plan(OP_PLANS, LaplacePlan, x, loc, log_scale)


def _forward(x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """log Laplace(x; loc, exp(log_scale)) summed over D, shape (K, P), for the
    kernels' layout: x (P, D), loc (K, P, D), log_scale (K, P, D), (P, D) or
    (D,), all contiguous. A call _op_plan takes (a compiled graph's node on
    CUDA) launches from its plan."""
    if (plan := _op_plan(x, loc, log_scale)) is not None:
        return plan.run_forward(x, loc, log_scale)
    backend = _backend.backend_for(loc.device)
    dtype = _backend.compute_dtype(x, loc, log_scale)
    x, loc, log_scale = _kernel_inputs(backend, dtype, x, loc, log_scale)
    return layout.launch_forward(backend, "laplace_log_prob_forward", dtype, x, loc, log_scale, _NAMES)


def _backward(grad_out: Tensor, x: Tensor, loc: Tensor, log_scale: Tensor, need_dx: bool,
              need_dlog_scale: bool) -> list[Tensor]:
    """[dloc], then dx if need_dx, then dlog_scale if need_dlog_scale, in the
    shapes of loc, x and log_scale (the layout of _forward). A gradient not
    asked for is not computed or allocated (a fixed scale needs none, which
    saves its reductions). Each gradient in its input's dtype; from a plan as
    the forward's."""
    if grad_out.dtype is loc.dtype and (plan := _op_plan(x, loc, log_scale)) is not None:
        return plan.run_backward(grad_out, x, loc, log_scale, need_dx, need_dlog_scale)
    backend = _backend.backend_for(loc.device)
    dtype = _backend.compute_dtype(x, loc, log_scale)
    dtypes = x.dtype, loc.dtype, log_scale.dtype
    x, loc, log_scale, grad_out = _kernel_inputs(backend, dtype, x, loc, log_scale, grad_out)
    return layout.launch_backward(backend, "laplace_log_prob_backward", grad_out, x, loc, log_scale, dtypes, need_dx,
                           need_dlog_scale, _NAMES)


laplace_log_prob_op = define(
    "laplace_log_prob(Tensor x, Tensor loc, Tensor log_scale) -> Tensor",
    _forward,
    lambda x, loc, log_scale: loc.new_empty(loc.shape[:2], dtype=_backend.compute_dtype(x, loc, log_scale)),
    cpu=lambda x, loc, log_scale: None if layout.fold_samples("cpp", loc.shape) else (loc, x, log_scale),
)
laplace_log_prob_backward_op = define(
    "laplace_log_prob_backward(Tensor grad_out, Tensor x, Tensor loc, Tensor log_scale, bool need_dx,"
    " bool need_dlog_scale) -> Tensor[]",
    _backward,
    lambda grad_out, x, loc, log_scale, need_dx, need_dlog_scale: (
        [torch.empty_like(loc)] + ([torch.empty_like(x)] if need_dx else [])
        + ([torch.empty_like(log_scale)] if need_dlog_scale else [])),
    cpu=lambda grad_out, x, loc, log_scale, need_dx, need_dlog_scale: (
        None if layout.fold_samples("cpp", loc.shape) else (loc, x, log_scale, grad_out)),
)


def _double_backward(grad_out: Tensor, x: Tensor, loc: Tensor, log_scale: Tensor, needs) -> tuple:
    """dx, dloc, dlog_scale from differentiable torch ops on the Function's
    inputs (create_graph=True), in the accumulation dtype: d/dloc = g sign(x -
    loc) / b (sign(0) = 0), d/dlog_scale = g (|x - loc| / b - 1), d/dx = -d/dloc."""
    acc = _backend.accumulation_dtype(loc.dtype)
    g = grad_out.to(acc).unsqueeze(-1)
    diff = x.to(acc) - loc.to(acc)
    # x == loc: both terms are 0 whatever the scale; exp(-0) there keeps an
    # underflowing scale's inf (and its 0 * inf gradient) out of the graph
    inv = torch.exp(-torch.where(diff == 0, 0.0, log_scale.to(acc)))
    gl = g * torch.sign(diff) * inv
    gs = g * (diff.abs() * inv - 1.0)

    def like(t: Tensor, grad: Tensor, need: bool) -> Tensor | None:
        return grad.sum_to_size(t.shape).to(t.dtype) if need else None

    return like(x, -gl, needs[0]), like(loc, gl, needs[1]), like(log_scale, gs, needs[2])


class LaplaceLogProb(torch.autograd.Function):
    """Autograd of fastvae::laplace_log_prob. The op takes the kernels' layout
    (x (P, D), loc (K, P, D), log_scale in a kernel_var form); made here once,
    and saved, so the backward reuses it (the inputs too, for a double
    backward)."""

    @staticmethod
    def forward(ctx, x, loc, log_scale):
        x2, l3 = layout.kernel_views(x, loc)
        s = layout.kernel_var(log_scale, *l3.shape)
        ctx.shapes = x.shape, loc.shape, log_scale.shape
        ctx.save_for_backward(x2, l3, s, x, loc, log_scale)
        return shaped(run(laplace_log_prob_op, x2, l3, s), loc.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, l3, s, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return _double_backward(grad_out, *inputs, ctx.needs_input_grad)
        need_dx, need_ds = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grads = run(laplace_log_prob_backward_op, grad_out, x2, l3, s, need_dx, need_ds)
        x_shape, loc_shape, s_shape = ctx.shapes
        dx = shaped(grads[1], x_shape) if need_dx else None
        ds = shaped(grads[-1], s_shape) if need_ds else None
        return dx, shaped(grads[0], loc_shape), ds


# -- public function -----------------------------------------------------------


def laplace_log_prob(
    x: Tensor,
    loc: Tensor,
    log_scale: Tensor | None = None,
    *,
    scale: float | Tensor | None = None,
    event_dims: int = 1,
) -> Tensor:
    """log Laplace(x; loc, b) = -|x - loc| / b - log(2 b) summed over the last
    dimension D (the last ``event_dims`` dimensions, e.g. 3 for (..., C, H, W)
    images): the L1 reconstruction term. Under b = 1 it is
    -(F.l1_loss(loc, x, reduction='sum') + D log 2) per row.

    The scale b is given in one of two ways:

    - ``log_scale``: b = exp(log_scale), a tensor broadcastable to ``loc``: per
      element (a decoder that predicts its scale), per dimension (D,), or a
      scalar tensor. The log of the scale: a scale passed here gives a
      finite, wrong number that no check can tell from a real log-scale (pass
      it as ``scale=`` instead);
    - ``scale``: b itself (float or tensor), > 0: a float <= 0 raises, and so
      does a tensor with a value <= 0 (on CPU at every call, on CUDA at the
      first, ``fastvae.set_value_checks``); the default when neither is given
      is ``scale=1.0``, the L1 case.

    Where x == loc exactly, loc's gradient is 0 (sign(0) = 0, as torch's abs
    and torch.distributions.Laplace give it) and log_scale's is -1 per element.

    Args:
        x: data of shape (..., D); broadcasts against ``loc`` of shape
            (K, ..., D) without being copied K times.
        loc: decoder location (the median), shape (K, ..., D) or (..., D).

    Returns:
        -sum(|x - loc| / b + log b + log 2) over D, with ``loc``'s leading
        shape (K, ...). Differentiable in loc, the scale argument (when it is
        a tensor) and x (when it requires grad).
    """
    if log_scale is not None and scale is not None:
        raise ValueError("give at most one of log_scale, scale; got log_scale, scale")
    x, loc, params, dtype = layout.flatten_event_args(event_dims, x, "loc", loc, scale, log_scale=log_scale)
    log_scale, scale = params["log_scale"], params["scale"]
    x_b = layout.broadcast_x(x, loc, "loc")
    if log_scale is not None:
        s = layout.broadcast_var(log_scale, "log_scale", x_b, loc)
    elif isinstance(scale, Tensor):
        _value_checks.positive_param(scale, "scale")
        # the log-scale in the compute dtype: a half-precision scale is not rounded again
        s = layout.broadcast_var(torch.log(scale.to(dtype)), "scale", x_b, loc)
    else:
        s = layout.fixed_scale(scale, 1.0, loc, dtype)
    ops = layout.likelihood_torch_ops(x_b, loc, s)
    if ops is not None:
        return ops.laplace_log_prob(x_b, loc, s)
    return LaplaceLogProb.apply(x_b, loc, s)


# -- the decoder route: likelihood= of the objectives and evaluation (fastvae/_decoder.py) --


def decoder_route(x: Tensor, out: Any, sample_shape: tuple[int, ...], batch_ndim: int, probs_given: bool) -> Tensor:
    """The location (scale 1) or a (loc, log_scale) pair."""
    return layout.location_scale_route(x, out, sample_shape, batch_ndim, "laplace", _NAMES, "location",
                                       laplace_log_prob)
