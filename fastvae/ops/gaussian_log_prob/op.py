"""gaussian_log_prob's front end: the public function, the torch.library ops
fastvae::gaussian_log_prob and fastvae::gaussian_log_prob_backward, their
autograd Function (its double backward: the closed form below), the packed
form of (mean, logvar) as the two halves of one decoder output
(packed_mean_logvar, gaussian_log_prob_packed) and the fixed scale's cached
log-variance (fixed_logvar), the route of likelihood="gaussian"
(decoder_route) and its fused tail in the objectives' plans (GaussianTail).

The Gaussian reconstruction term log N(x; mean, diag(var)), fused forward and
backward, with x broadcast over decoder samples. On the cpp backend an eager
call goes to the C++ operator fastvae_cpp::gaussian_log_prob (torch_op.cpp)."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ... import _backend, _validate, _value_checks
from ..._double_backward import _acc, _like
from ..._launch import Launch, PlanCache
from ..._likelihood_layout import (
    ScaleLikelihoodPlan,
    broadcast_var,
    broadcast_x,
    fixed_param,
    fixed_scale,
    flat,
    flatten_event_args,
    fold_samples,
    kernel_shape,
    kernel_var,
    kernel_views,
    launch_backward,
    launch_forward,
    likelihood_torch_ops,
    location_scale_route,
    scale_likelihood_plan,
)
from ..._op import define, run, shaped


def _forward(x: Tensor, mean: Tensor, var_param: Tensor, softplus_mode: bool, delta: float) -> Tensor:
    """log N(x; mean, var) summed over D, shape (K, P), for the kernels'
    layout: x (P, D), mean (K, P, D), var_param (K, P, D), (P, D) or (D,),
    all contiguous. var = exp(var_param), or softplus(var_param) + delta in
    softplus_mode. A call _op_plan takes (a compiled graph's node on CUDA)
    launches from its plan."""
    if (plan := _op_plan(x, mean, var_param, softplus_mode, delta)) is not None:
        return plan.run_forward(x, mean, var_param)
    backend = _backend.backend_for(mean.device)
    dtype = _backend.compute_dtype(x, mean, var_param)
    x, mean, var_param = _kernel_inputs(backend, dtype, x, mean, var_param)
    if backend != "triton":  # only the Triton kernels read rows at a stride (packed halves)
        mean, var_param = mean.contiguous(), var_param.contiguous()
    return launch_forward(backend, "gaussian_log_prob_forward", dtype, x, mean, var_param, _NAMES,
                          softplus_mode=softplus_mode, delta=delta)


def _backward(grad_out: Tensor, x: Tensor, mean: Tensor, var_param: Tensor, softplus_mode: bool, delta: float,
              need_dx: bool, need_dvar_param: bool) -> list[Tensor]:
    """[dmean], then dx if need_dx, then dvar_param if need_dvar_param, in the
    shapes of mean, x and var_param (the layout of _forward). A gradient not
    asked for is not computed or allocated (x's gradient is summed over K in
    the kernel; a fixed scale needs no variance gradient, which saves its
    reductions). Each gradient in its input's dtype; from a plan as the
    forward's."""
    if grad_out.dtype is mean.dtype and (plan := _op_plan(x, mean, var_param, softplus_mode, delta)) is not None:
        return plan.run_backward(grad_out, x, mean, var_param, need_dx, need_dvar_param)
    backend = _backend.backend_for(mean.device)
    dtype = _backend.compute_dtype(x, mean, var_param)
    dtypes = x.dtype, mean.dtype, var_param.dtype
    x, mean, var_param = _kernel_inputs(backend, dtype, x, mean, var_param)
    grad_out = _backend.kernel_input(backend, grad_out, dtype)
    return launch_backward(backend, "gaussian_log_prob_backward", grad_out, x, mean, var_param, dtypes, need_dx,
                           need_dvar_param, _NAMES, softplus_mode=softplus_mode, delta=delta)


_NAMES = "mean", "var_param"  # the kernels' names of the decoder output and its variance parameter


# The plans of the ops' own calls (a compiled graph's nodes) on the triton
# backend, per signature (bounded: fastvae._launch.PlanCache); ENABLED False
# sends every call the general way (the tests compare the two); ``empty``
# allocates each output like a template the plan holds (the tests' fixture may
# poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like


class GaussianPlan(ScaleLikelihoodPlan):
    """A ScaleLikelihoodPlan of gaussian_log_prob's kernels, for one variance
    form (softplus_mode) and delta."""

    __slots__ = ("softplus_mode", "delta_bits", "forward_ints")
    MODULE, BACKWARD_KERNEL = "gaussian_log_prob", "_gaussian_log_prob_bwd_kernel"

    def __init__(self, mean: Tensor, var_param: Tensor, softplus_mode: bool, delta: float):
        self.softplus_mode = softplus_mode
        self.delta_bits = _backend.triton_module("_common").float64_bits(delta)
        super().__init__(mean, var_param)
        K, P, D = mean.shape
        self.forward_ints = (P, K * P, D, D, 0, 1)  # P, K * P, D, the row stride, no term's weight, no divisor

    def forward_kernel(self, kern) -> tuple:
        grid, meta = kern.forward_plan(self.K, self.P, self.D, self.dtype, self.device, self.layout,
                                       self.softplus_mode)
        return kern._gaussian_log_prob_fwd_kernel, grid, meta

    def backward_meta(self, need_dvar_param: bool) -> dict:
        return dict(G_SCALAR=False, HAS_DTERM=False, SOFTPLUS=self.softplus_mode, HAS_DV=need_dvar_param)

    @staticmethod
    def empty(like: Tensor) -> Tensor:
        return empty(like)

    def run_forward(self, x: Tensor, mean: Tensor, var_param: Tensor) -> Tensor:
        """_forward's log-likelihood, launched from the plan."""
        out = empty(self.out_like)  # the bound's term, partial sums and counter: unused (out as placeholder)
        self.forward(x, mean, var_param, self.delta_bits, out, out, out, out, *self.forward_ints)
        return out

    def run_backward(self, grad_out: Tensor, x: Tensor, mean: Tensor, var_param: Tensor, need_dx: bool,
                     need_dvar_param: bool) -> list[Tensor]:
        """_backward's gradients, launched from the plan."""
        launch, ints, g, dmean, dx, dv, part_dx, part_dv, counters = self.backward(grad_out, need_dx,
                                                                                   need_dvar_param)
        # P, D, the row stride, (R, K, K_PER, SPLITS), no term's weight, no divisor, dv at its own start
        launch(g, x, mean, var_param, self.delta_bits, dmean, dx, dv, part_dx, part_dv, counters, dmean, self.P,
               self.D, self.D, *ints, 0, 1, 0)
        return [dmean] + [dx] * need_dx + [dv] * need_dvar_param


def _op_plan(x: Tensor, mean: Tensor, var_param: Tensor, softplus_mode: bool, delta: float) -> GaussianPlan | None:
    """The plan of a call of the ops themselves (GaussianLogProb hands them x
    (P, D), mean (K, P, D) and var_param in a kernel_var form, as a compiled
    graph calls them), or None: _likelihood_layout.scale_likelihood_plan."""
    return None if not ENABLED else scale_likelihood_plan(OP_PLANS, GaussianPlan, x, mean, var_param,
                                                          softplus_mode, delta)


def _kernel_inputs(backend: str, dtype: torch.dtype, x: Tensor, mean: Tensor, var_param: Tensor):
    """(x, mean, var_param) as the kernels read them (_backend.kernel_input):
    the decoder outputs, mean and a per-element var_param, in their own
    dtype; on cpp a per-element var_param of another dtype than mean's is
    read in the compute dtype, and so is mean then (the kernel reads both in
    one type)."""
    per_element = var_param.dim() == 3
    native = backend != "cpp" or (per_element and var_param.dtype == mean.dtype) or not per_element
    mean = _backend.kernel_input(backend, mean, dtype, native)
    var_param = _backend.kernel_input(backend, var_param, dtype, native and per_element)
    return _backend.kernel_input(backend, x, dtype), mean, var_param


gaussian_log_prob_op = define(
    "gaussian_log_prob(Tensor x, Tensor mean, Tensor var_param, bool softplus_mode, float delta) -> Tensor",
    _forward,
    lambda x, mean, var_param, softplus_mode, delta: mean.new_empty(
        mean.shape[:2], dtype=_backend.compute_dtype(x, mean, var_param)),
    cpu=lambda x, mean, var_param, softplus_mode, delta: (
        None if fold_samples("cpp", mean.shape) else (mean, x, var_param)),
)
gaussian_log_prob_backward_op = define(
    "gaussian_log_prob_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor var_param, bool softplus_mode,"
    " float delta, bool need_dx, bool need_dvar_param) -> Tensor[]",
    _backward,
    lambda grad_out, x, mean, var_param, softplus_mode, delta, need_dx, need_dvar_param: (
        [torch.empty_like(mean)] + ([torch.empty_like(x)] if need_dx else [])
        + ([torch.empty_like(var_param)] if need_dvar_param else [])),
    cpu=lambda grad_out, x, mean, var_param, softplus_mode, delta, need_dx, need_dvar_param: (
        None if fold_samples("cpp", mean.shape) else (mean, x, var_param, grad_out)),
)



def _double_backward_grads(grad_out, x, mean, var_param, softplus_mode, delta, needs):
    """dx, dmean, dvar_param of -0.5 sum((x - mean)^2 / var + log var + log 2 pi) for the
    Function's inputs (x, mean and var_param broadcast against mean: any kernel_var form)."""
    g = _acc(grad_out).unsqueeze(-1)
    v = _acc(var_param)
    r = _acc(x) - _acc(mean)
    if softplus_mode:
        inv = 1.0 / (torch.logaddexp(torch.zeros_like(v), v) + delta)  # softplus without torch's cut-off at 20
        gv = 0.5 * g * (r * r * inv - 1.0) * inv * torch.sigmoid(v)
    else:
        inv = torch.exp(-v)
        # x == mean under an underflowing variance: the squared term is 0, not 0 * inf
        inv = torch.where((r == 0) & inv.isinf(), 0.0, inv)
        gv = 0.5 * g * (r * r * inv - 1.0)
    gm = g * r * inv
    return (_like((-gm).sum_to_size(x.shape), x, needs[0]), _like(gm.sum_to_size(mean.shape), mean, needs[1]),
            _like(gv.sum_to_size(var_param.shape), var_param, needs[2]))


class GaussianLogProb(torch.autograd.Function):
    """Autograd of fastvae::gaussian_log_prob. The op takes the kernels'
    layout (x (P, D), mean (K, P, D), var_param in a kernel_var form); made
    here once, and saved, so the backward reuses it (the inputs too, for a
    double backward)."""

    @staticmethod
    def forward(ctx, x, mean, var_param, softplus_mode, delta):
        x2, m3 = kernel_views(x, mean)
        v = kernel_var(var_param, *m3.shape)
        ctx.softplus_mode, ctx.delta = softplus_mode, delta
        ctx.shapes = x.shape, mean.shape, var_param.shape
        ctx.save_for_backward(x2, m3, v, x, mean, var_param)
        return shaped(run(gaussian_log_prob_op, x2, m3, v, softplus_mode, delta), mean.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, m3, v, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (*_double_backward_grads(grad_out, *inputs, ctx.softplus_mode, ctx.delta,
                                                        ctx.needs_input_grad), None, None)
        need_dx, need_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grads = run(
            gaussian_log_prob_backward_op, grad_out, x2, m3, v, ctx.softplus_mode, ctx.delta, need_dx, need_dv)
        x_shape, mean_shape, var_shape = ctx.shapes
        dx = shaped(grads[1], x_shape) if need_dx else None
        dv = shaped(grads[-1], var_shape) if need_dv else None
        return dx, shaped(grads[0], mean_shape), dv, None, None


# -- (mean, logvar) as the two halves of one decoder output ----------------------


def _halves(packed: Tensor) -> tuple[Tensor, Tensor]:
    D = packed.shape[-1] // 2
    return packed[..., :D], packed[..., D:]


def _packed_backward(grad_out: Tensor, x: Tensor, packed: Tensor, need_dx: bool) -> list[Tensor]:
    """[dpacked (K, P, 2 D)], then dx if need_dx: the gradients of mean and
    logvar written into the two halves of one buffer by the Triton kernel
    (elsewhere computed apart and joined)."""
    mean, logvar = _halves(packed)
    backend = _backend.backend_for(packed.device)
    if backend != "triton":
        grads = _backward(grad_out, x, mean.contiguous(), logvar.contiguous(), False, 1.0, need_dx, True)
        return [torch.cat((grads[0], grads[-1]), -1)] + grads[1:2] * need_dx
    K, P, D = mean.shape
    dpacked = _backend.empty_output(packed.shape, like=packed)
    dmean, dlogvar = _halves(dpacked)
    dx = _backend.empty_output((P, D), like=packed) if need_dx else None
    _backend.launch(
        backend, "gaussian_log_prob_backward", dmean.numel(),
        grad_out=shaped(grad_out, (K, P)).contiguous(), x=x, mean=mean, var_param=logvar,
        softplus_mode=False, delta=1.0, dx=dx, dmean=dmean, dvar_param=dlogvar,
    )
    return [dpacked, dx] if need_dx else [dpacked]


gaussian_log_prob_packed_backward_op = define(
    "gaussian_log_prob_packed_backward(Tensor grad_out, Tensor x, Tensor packed, bool need_dx) -> Tensor[]",
    _packed_backward,
    lambda grad_out, x, packed, need_dx: [torch.empty_like(packed)] + ([torch.empty_like(x)] if need_dx else []),
)


class GaussianLogProbPacked(torch.autograd.Function):
    """log N(x; mean, exp(logvar)) for mean and logvar the two halves of one
    decoder output packed (..., 2 D), as decoders return them
    (``h[..., :D], h[..., D:]``): the kernels read the halves in place (no
    copies) and the backward writes one gradient for packed, so autograd
    runs no slice backward per half and no add to join them (a launch each on CUDA)."""

    @staticmethod
    def forward(ctx, x, packed):
        D = packed.shape[-1] // 2
        K, P, _ = kernel_shape(x, packed[..., :D])
        x2 = x.contiguous() if x.dim() == 2 else x.reshape(P, D).contiguous()
        p3 = packed.view(K, P, 2 * D)
        ctx.shapes = x.shape, packed.shape
        ctx.save_for_backward(x2, p3, x, packed)
        return shaped(run(gaussian_log_prob_op, x2, *_halves(p3), False, 1.0), packed.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, p3, x, packed = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph, from the halves
            mean, logvar = _halves(packed)
            dx, dmean, dlogvar = _double_backward_grads(
                grad_out, x, mean, logvar, False, 1.0, (need_dx, True, True))
            return dx, torch.cat((dmean, dlogvar), -1)
        grads = run(gaussian_log_prob_packed_backward_op, grad_out, x2, p3, need_dx)
        x_shape, packed_shape = ctx.shapes
        return (shaped(grads[1], x_shape) if need_dx else None), shaped(grads[0], packed_shape)


_VIEW_NODES = frozenset({
    "SliceBackward0", "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "SelectBackward0",
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0",
})


def _viewed_from(t: Tensor, base: Tensor, base_fn=None) -> bool:
    """Whether t's autograd path back to base is views only (no in-place op,
    arithmetic or custom Function between), so a gradient for base stands for
    t's. ``base_fn``: base.grad_fn, where the caller has it already (each
    read makes its Python object)."""
    node = t.grad_fn
    if base_fn is None:
        base_fn = base.grad_fn
    for _ in range(8):
        if node is None or type(node).__name__ not in _VIEW_NODES:
            return False
        following = node.next_functions
        if len(following) != 1:
            return False
        node = following[0][0]
        if base_fn is not None and node is base_fn:
            return True
        if base_fn is None and getattr(node, "variable", None) is base:  # base is a leaf
            return True
    return False


def _halves_viewed_from(mean: Tensor, logvar: Tensor, base: Tensor) -> bool:
    """Whether a gradient for base stands for those of mean and logvar, its
    halves: both differentiable, each a view of base by view ops alone; or
    none of the three differentiable."""
    if not (mean.requires_grad or logvar.requires_grad or base.requires_grad):
        return True
    if not (mean.requires_grad and logvar.requires_grad):
        return False
    base_fn = base.grad_fn
    return _viewed_from(mean, base, base_fn) and _viewed_from(logvar, base, base_fn)


class PackedLayout(NamedTuple):
    """mean and logvar of ``shape`` as the halves of one contiguous
    (*shape[:lead], 2 E) tensor (E the size of shape[lead:]): rows of E
    contiguous elements, 2 E apart, each half's ``strides``; the whole's
    ``size`` (elements) and ``shape``. Worked out once per call signature by
    the objectives' plans (packed_layout), which then check a decoder output
    against it (packed_halves)."""

    shape: torch.Size
    strides: tuple[int, ...]
    E: int
    size: int
    packed_shape: torch.Size


def packed_layout(shape: torch.Size, lead: int) -> PackedLayout:
    """The PackedLayout of halves of ``shape`` whose first ``lead`` dimensions are rows."""
    strides, step = [], 1
    for i in reversed(range(len(shape))):
        strides.append(step)
        step *= shape[i] * (2 if i == lead else 1)
    E = math.prod(shape[lead:])
    return PackedLayout(shape, tuple(reversed(strides)), E, 2 * shape.numel(), torch.Size((*shape[:lead], 2 * E)))


def packed_halves(mean: Tensor, logvar: Tensor, layout: PackedLayout) -> Tensor | None:
    """packed_mean_logvar for halves of ``layout``, with the checks that
    depend on the shape alone done once (packed_layout): the packed tensor,
    or None where mean and logvar are not exactly that layout's halves (then
    packed_mean_logvar, which accepts any stride of a size-1 dimension,
    decides)."""
    base = mean._base
    if (base is None or logvar._base is not base or mean.stride() != layout.strides
            or logvar.stride() != layout.strides or mean.shape != layout.shape or logvar.shape != layout.shape
            or logvar.dtype is not mean.dtype or not base.is_contiguous() or base.numel() != layout.size):
        return None
    offset = base.storage_offset()
    if mean.storage_offset() != offset or logvar.storage_offset() != offset + layout.E:
        return None
    if not _halves_viewed_from(mean, logvar, base):
        return None
    return base if base.shape == layout.packed_shape else base.view(layout.packed_shape)


def packed_mean_logvar(mean: Tensor, logvar: Tensor, lead: int) -> Tensor | None:
    """The (*lead shape, 2 E) view of the one tensor whose halves are mean and
    logvar (each (*lead shape, *event), E the event's size): rows of mean then
    logvar, as ``h[..., :D], h[..., D:]`` or ``h.chunk(2, channel dim)`` of a
    contiguous h give them. None for anything else (then the pair goes to
    gaussian_log_prob as it is)."""
    base = mean._base
    if base is None or logvar._base is not base or mean.shape != logvar.shape or mean.dtype != logvar.dtype:
        return None
    E = math.prod(mean.shape[lead:])
    if E == 0 or lead >= mean.dim() or not base.is_contiguous() or base.numel() != 2 * mean.numel():
        return None
    step = 1
    for i in reversed(range(mean.dim())):  # rows of E contiguous elements, 2 E apart
        if mean.shape[i] != 1 and (mean.stride(i) != step or logvar.stride(i) != step):
            return None
        step *= mean.shape[i] * (2 if i == lead else 1)
    if mean.storage_offset() != base.storage_offset() or logvar.storage_offset() != base.storage_offset() + E:
        return None
    if not _halves_viewed_from(mean, logvar, base):
        return None
    shape = (*mean.shape[:lead], 2 * E)
    return base if base.shape == shape else base.view(shape)  # the output itself when it has the shape


def gaussian_log_prob_packed(x: Tensor, packed: Tensor) -> Tensor:
    """gaussian_log_prob(x, mean, logvar) for (mean, logvar) the halves of
    packed (..., 2 D) (packed_mean_logvar), x (..., D) broadcasting as there."""
    mean = packed[..., :packed.shape[-1] // 2]
    _validate.float_tensors(x=x, mean=mean)
    return GaussianLogProbPacked.apply(broadcast_x(x, mean, "mean"), packed)


# -- public function -----------------------------------------------------------


# The (D,) log-variance of a fixed scale, made once per shape (the plans' unit variance: GaussianTail).
fixed_logvar = fixed_param


def gaussian_log_prob(
    x: Tensor,
    mean: Tensor,
    logvar: Tensor | None = None,
    *,
    scale: float | Tensor | None = None,
    softplus_var: Tensor | None = None,
    delta: float = 1e-6,
    event_dims: int = 1,
) -> Tensor:
    """log N(x; mean, diag(var)) summed over the last dimension D (the last
    ``event_dims`` dimensions, e.g. 3 for (..., C, H, W) images).

    The variance is given in exactly one of three ways:

    - ``logvar``: var = exp(logvar), a tensor broadcastable to ``mean``: per
      element (a decoder that predicts its variance), per dimension (D,), or a
      scalar tensor. The log-variance, 2 log(std): a standard deviation
      passed here gives a finite, wrong number that no check can tell from a
      real log-variance (pass it as ``scale=`` instead, or its 2 * log);
    - ``scale``: a fixed standard deviation (float or tensor, var = scale^2),
      > 0: a float <= 0 raises, and so does a tensor with a value <= 0 (on
      CPU at every call, on CUDA at the first, ``fastvae.set_value_checks``;
      unchecked, it would give NaN); the default when neither of the others
      is given is ``scale=1.0``, the squared-error case;
    - ``softplus_var``: var = softplus(softplus_var) + delta, the decoder of the
      lecture notes (s^2(z) = SoftPlus(K h(z) + c), p(x|z) = N(m, s^2 + delta));
      ``delta > 0`` floors the variance.

    Args:
        x: data of shape (..., D); broadcasts against ``mean`` of shape
            (K, ..., D) without being copied K times.
        mean: decoder mean, shape (K, ..., D) or (..., D).

    Returns:
        -0.5 * sum((x - mean)^2 / var + log var + log 2 pi) over D, with
        ``mean``'s leading shape (K, ...). Differentiable in mean, the variance
        argument (when it is a tensor) and x (when it requires grad).
    """
    given = [n for n, a in (("logvar", logvar), ("scale", scale), ("softplus_var", softplus_var)) if a is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of logvar, scale, softplus_var; got {', '.join(given)}")
    # inf and nan are refused here, the same on every backend (a kernel would
    # otherwise raise on one and return -inf on another)
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < math.inf:
        raise ValueError(f"delta must be a finite float > 0, got {delta!r}")
    x, mean, params, dtype = flatten_event_args(event_dims, x, "mean", mean, scale, logvar=logvar,
                                                softplus_var=softplus_var)
    logvar, softplus_var, scale = params["logvar"], params["softplus_var"], params["scale"]
    # var >= delta must be a normal number in the kernels' compute dtype
    tiny = torch.finfo(dtype).tiny
    if delta < tiny:
        raise ValueError(f"delta must be at least {tiny} (the smallest normal {dtype} number), got {delta!r}")
    x_b = broadcast_x(x, mean, "mean")

    softplus = softplus_var is not None
    if softplus:
        v = broadcast_var(softplus_var, "softplus_var", x_b, mean)
    elif logvar is not None:
        v = broadcast_var(logvar, "logvar", x_b, mean)
    elif isinstance(scale, Tensor):
        _value_checks.positive_scale(scale)
        # the log-variance in the compute dtype: a half-precision scale is not rounded again
        v = broadcast_var(2.0 * torch.log(scale.to(dtype)), "scale", x_b, mean)
    else:  # the log-variance 2 log(scale)
        v = fixed_scale(scale, 2.0, mean, dtype)
    ops = likelihood_torch_ops(x_b, mean, v)
    if ops is not None:
        return ops.gaussian_log_prob(x_b, mean, v, softplus, float(delta))
    return GaussianLogProb.apply(x_b, mean, v, softplus, float(delta))


# -- the decoder route: likelihood= of the objectives and evaluation (fastvae/_decoder.py) --


def decoder_route(x: Tensor, out: Any, sample_shape: tuple[int, ...], batch_ndim: int, probs_given: bool) -> Tensor:
    """The mean (unit variance) or a (mean, logvar) pair."""
    return location_scale_route(x, out, sample_shape, batch_ndim, "gaussian", ("mean", "logvar"), "mean",
                                gaussian_log_prob, _packed_route)


def _packed_route(x: Tensor, mean: Tensor, logvar: Tensor, lead: int, events: int) -> Tensor | None:
    """gaussian_log_prob_packed where (mean, logvar) are the halves of one
    decoder output on Triton (read in place), else None."""
    if (_backend.backend_for(mean.device, warn=False) == "triton" and not _backend.compiling()
            and (packed := packed_mean_logvar(mean, logvar, lead)) is not None):
        return gaussian_log_prob_packed(flat(x, x.dim() - events, events), packed)
    return None


# -- the objectives' plans: likelihood="gaussian" fused into their tail (Op.plan_tail) --

_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


class GaussianTail:
    """The Gaussian likelihood in the plans' tail (fastvae/_spec.py's
    FusedTail says what each method does): the gaussian_log_prob kernels with
    the bound's epilogue, for (mean, logvar) as the halves of one contiguous
    decoder output, the usual Gaussian decoder's (fit's aux: the logvar half),
    or the mean alone (aux None): unit variance, the fixed (D,) log-variance
    0 of fixed_logvar."""

    def __init__(self, K: int, P: int, D: int, dtype: torch.dtype, out_dtype: torch.dtype, device: torch.device,
                 reduce: bool, iwae: bool, out_shape, lead: int, placeholder: Tensor, counters: Tensor):
        self.out_shape, self.out_dtype, self.device, self.lead, self.D = out_shape, out_dtype, device, lead, D
        self.placeholder, self.counters = placeholder, counters
        # (mean, logvar) as the halves of one contiguous output: the layout, worked out once
        self.layout = None if out_shape is None else packed_layout(out_shape, lead)
        kern = _backend.triton_module("gaussian_log_prob")
        self.delta_bits = _backend.triton_module("_common").float64_bits(1.0)
        grid, meta = kern.forward_plan(K, P, D, out_dtype, device, kern.ELEMENT, False, True, reduce)
        self.lik_forward = Launch(kern._gaussian_log_prob_fwd_kernel, grid, meta)
        self.programs = grid[0]
        self.lik_ints = (P, K * P, D, 2 * D)
        grid, meta = kern.pointwise_backward_plan(K, P, D, out_dtype, device, kern.ELEMENT, True, reduce, not iwae)
        self.lik_backward = Launch(kern._gaussian_log_prob_bwd_kernel, grid, meta)
        self.lik_backward_ints = (P, D, 2 * D, K * P, 1, 1, 1)
        # the unit variance: the fixed (D,) log-variance 0, the same cached tensor as the general path's;
        # a constant of the graph where torch.compile traces the plan (a triton_op twin's: nothing cached)
        self.unit_logvar = (torch.zeros((D,), dtype=dtype, device=device) if _backend.compiling()
                            else fixed_logvar(D, 0.0, dtype, device))
        grid, meta = kern.forward_plan(K, P, D, out_dtype, device, kern.DIM, False, True, reduce)
        self.unit_forward = Launch(kern._gaussian_log_prob_fwd_kernel, grid, meta)
        self.unit_ints = (P, K * P, D, D)
        grid, meta = kern.pointwise_backward_plan(K, P, D, out_dtype, device, kern.DIM, False, reduce, not iwae)
        self.unit_backward = Launch(kern._gaussian_log_prob_bwd_kernel, grid, meta)
        self.unit_backward_ints = (P, D, D, K * P, 1, 1, 1)

    def fit(self, out) -> tuple[Tensor, Tensor | None] | None:
        if type(out) is Tensor:  # the mean alone (unit variance)
            if (out.shape != self.out_shape or out.dtype is not self.out_dtype or out.device != self.device
                    or not out.is_contiguous() or _wrapped(out)):
                return None
            return out, None
        if type(out) not in (tuple, list) or len(out) != 2:
            return None
        mean, logvar = out
        # halves share their base's dtype and device: checked on mean alone
        if (type(mean) is not Tensor or type(logvar) is not Tensor or mean.dtype is not self.out_dtype
                or mean.device != self.device or _wrapped(mean) or _wrapped(logvar)):
            return None
        packed = packed_halves(mean, logvar, self.layout)
        if packed is None and mean.shape == self.out_shape:  # halves with other strides of size-1 dimensions
            packed = packed_mean_logvar(mean, logvar, self.lead)
        return None if packed is None else (packed, logvar)

    def forward(self, x: Tensor, out: Tensor, logvar: Tensor | None, res: Tensor, term: Tensor, part: Tensor,
                counter: Tensor, term_bits: int, divisor: int) -> None:
        if logvar is None:  # the mean alone: unit variance
            self.unit_forward(x, out, self.unit_logvar, self.delta_bits, res, term, part, counter, *self.unit_ints,
                              term_bits, divisor)
        else:
            self.lik_forward(x, out, logvar, self.delta_bits, res, term, part, counter, *self.lik_ints, term_bits,
                             divisor)

    def backward(self, grad: Tensor, x: Tensor, out: Tensor, logvar: Tensor | None, dout: Tensor, dterm: Tensor,
                 term_bits: int, divisor: int) -> None:
        if logvar is None:  # the mean alone: no gradient of the fixed variance, no dx
            self.unit_backward(grad, x, out, self.unit_logvar, self.delta_bits, dout, dout, dout, self.placeholder,
                               self.placeholder, self.counters, dterm, *self.unit_backward_ints, term_bits, divisor,
                               0)
        else:  # dmean starts where dout does, dlogvar D further (dv_offset): one buffer, written in place
            self.lik_backward(grad, x, out, logvar, self.delta_bits, dout, dout, dout, self.placeholder,
                              self.placeholder, self.counters, dterm, *self.lik_backward_ints, term_bits, divisor,
                              self.D)

    def general_output(self, out: Tensor, logvar: Tensor | None):
        """The mean, or (mean, logvar) as halves of a copy of the packed output:
        of the output itself they would be views of the decoder's own output,
        which the general path reads whole, and the replay's gradient would
        bypass it."""
        if logvar is None:
            return out
        packed = out.clone()
        D = packed.shape[-1] // 2
        return packed[..., :D], packed[..., D:]
