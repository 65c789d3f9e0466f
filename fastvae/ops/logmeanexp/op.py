"""The importance-weighting family's front end: logmeanexp, the normalized
importance weights, the effective sample size, and the (max, sumexp) state
that lets K be streamed in chunks or split across processes; their
torch.library ops and autograd Functions (their double backwards included).

Layout: the custom ops reduce over the leading dimension of lw (K, ...); the
public functions take any ``dim`` and move it to the front (``movedim``, a
view). The op then hands its kernels one contiguous (K, M) layout, M the
product of the other dimensions, so a ``dim`` other than the leading one costs
one transposing copy.

The state of a column is (max, sumexp): max is its largest non-NaN log-weight
(-inf when it has none) and sumexp = sum_k exp(lw_k - shift) with shift = max
when max is finite and 0 otherwise. So an all -inf column is (-inf, 0), whose
logmeanexp is -inf with a zero gradient, never exp(-inf - (-inf)) = NaN; a NaN
log-weight makes sumexp, and everything derived from it, NaN. States merge
associatively: (m1, s1) + (m2, s2) = (M, s1 e^(m1 - M) + s2 e^(m2 - M)) with
M = max(m1, m2), an empty side contributing 0.

Two kernels serve the ops: ``logmeanexp_forward`` (one pass over lw with a
running max and sum per column: the state, and optionally logmeanexp and the
effective sample size) and ``logmeanexp_backward`` (one pass reading lw and
writing e * (a + b e), e = exp(lw - max), with per-column a and b: the
logmeanexp and ESS gradients, and with a = 1 / sumexp the normalized weights
themselves, which are the gradient of log-sum-exp). A third,
``importance_weights_backward``, is the softmax backward.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from ... import _backend, _validate
from ..._double_backward import _acc
from ..._launch import Launch, PlanCache, template
from ..._op import define, run

_NEG_INF = float("-inf")


def _columns(lw: Tensor) -> Tensor:
    """(K, ...) -> contiguous (K, M)."""
    if lw.dim() == 2:
        return lw.contiguous()  # lw itself when it is
    return lw.reshape(lw.shape[0], math.prod(lw.shape[1:])).contiguous()


def _state_buffers(lw: Tensor, M: int) -> tuple[Tensor, Tensor]:
    dtype = _backend.accumulation_dtype(lw.dtype)
    return _backend.empty_output((M,), like=lw, dtype=dtype), _backend.empty_output((M,), like=lw, dtype=dtype)


def _column_vector(t: Tensor | None, M: int, dtype: torch.dtype) -> Tensor | None:
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return (t if t.dim() == 1 else t.reshape(M)).contiguous()  # no new tensor in the common case


def _state(backend: str, lw2: Tensor, out: Tensor | None = None, ess: Tensor | None = None
           ) -> tuple[Tensor, Tensor]:
    """The column states (lw_max, sumexp), each (M,), of lw2 (K, M); out and
    ess (M,) are written too when given."""
    lw_max, sumexp = _state_buffers(lw2, lw2.shape[1])
    _backend.launch(backend, "logmeanexp_forward", lw2.numel(), lw=lw2, lw_max=lw_max, sumexp=sumexp,
                    out=out, ess=ess)
    return lw_max, sumexp


def _forward_with_state(lw: Tensor, *, ess: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logmeanexp or ESS, lw_max, sumexp) of lw (K, ...), each (...), in one pass."""
    backend = _backend.backend_for(lw.device)
    dtype = _backend.compute_dtype(lw)
    lw2 = _backend.kernel_input(backend, _columns(lw), dtype)
    value = _backend.empty_output((lw2.shape[1],), like=lw, dtype=dtype)
    lw_max, sumexp = _state(backend, lw2, out=None if ess else value, ess=value if ess else None)
    if lw.dim() == 2:
        return value, lw_max, sumexp
    shape = lw.shape[1:]
    return value.reshape(shape), lw_max.reshape(shape), sumexp.reshape(shape)


# The plans of logmeanexp's own calls (a compiled graph's nodes: an IWAE whose
# likelihood the objectives' plans do not fuse) on the triton backend, per
# signature (bounded: fastvae._launch.PlanCache); ENABLED False sends every call
# the general way (the tests compare the two); ``empty`` allocates each output
# like a template the plan holds (the tests' fixture may poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
_DTYPES = (torch.float32, torch.float64)


class LogMeanExpPlan:
    """The launches of one signature of fastvae::logmeanexp and its backward:
    lw (K, ...) contiguous, float32 or float64, K > 0 and M > 0 columns. The
    general launchers' variants (triton.py's forward_plan, or split_plan's
    two launches where the columns are split over programs; backward_plan)
    on the same arguments."""

    __slots__ = ("K", "M", "value_like", "part_like", "dlw_like", "forward", "forward_ints", "finish",
                 "finish_ints", "_backward")

    def __init__(self, lw: Tensor):
        kern = _backend.triton_module("logmeanexp")
        dtype, device = lw.dtype, lw.device
        K = lw.shape[0]
        M = lw.numel() // K
        self.K, self.M = K, M
        self.value_like = template(lw.shape[1:], dtype, device)  # the value, lw_max and sumexp (dtype = ACC)
        self.dlw_like = template(lw.shape, dtype, device)
        planned = kern.forward_plan(K, M, dtype, device)
        if planned is not None:  # one program a column: one launch
            grid, meta, rows = planned
            self.finish = self.part_like = None
        else:  # the columns split over programs: their partial states, then the finishing launch
            grid, meta, finish_grid, finish_meta, splits, rows = kern.split_plan(K, M, dtype, device)
            self.finish = Launch(kern._logmeanexp_finish_kernel, finish_grid, finish_meta)
            self.finish_ints = (K, M, splits, 1)  # K, M, splits, first
            self.part_like = template((splits, M), dtype, device)
        self.forward = Launch(kern._logmeanexp_fwd_kernel, grid, meta)
        self.forward_ints = (K, M, rows, 1, 1)  # K, M, rows per split, first, no divisor
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds: the forward's and the backward's made so
        far (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *([self.finish] if self.finish is not None else []), *self._backward.values()]

    def run_forward(self, lw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """_forward_with_state's (logmeanexp, lw_max, sumexp), launched from the plan."""
        value, lw_max, sumexp = empty(self.value_like), empty(self.value_like), empty(self.value_like)
        if self.finish is None:  # the unused outputs and buffers: a pointer never read or written
            self.forward(lw, lw, sumexp, sumexp, sumexp, lw_max, sumexp, value, sumexp, sumexp, sumexp, sumexp,
                         *self.forward_ints)
        else:
            part_m, part_s = empty(self.part_like), empty(self.part_like)
            self.forward(lw, lw, part_m, part_s, part_s, lw_max, sumexp, value, sumexp, sumexp, sumexp, sumexp,
                         *self.forward_ints)
            self.finish(part_m, part_s, part_s, lw_max, sumexp, value, sumexp, sumexp, sumexp, *self.finish_ints)
        return value, lw_max, sumexp

    def run_backward(self, lw: Tensor, lw_max: Tensor, sumexp: Tensor, grad_out: Tensor,
                     grad_sumexp: Tensor | None) -> Tensor:
        """_backward_with_state's dlw for logmeanexp (no ESS), launched from the plan."""
        has_gs = grad_sumexp is not None
        launch = self._backward.get(has_gs)
        if launch is None:
            kern = _backend.triton_module("logmeanexp")
            grid, meta = kern.backward_plan(self.K, self.M, lw.dtype, lw.device, has_gs, False)
            launch = self._backward[has_gs] = Launch(kern._logmeanexp_bwd_kernel, grid, meta)
        g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()  # a mean's: an expanded scalar
        gs = g if grad_sumexp is None else grad_sumexp.contiguous()
        dlw = empty(self.dlw_like)
        launch(lw, lw_max.contiguous(), sumexp.contiguous(), g, gs, g, dlw, dlw, self.K, self.M, 1)
        return dlw


def _op_plan(lw: Tensor) -> LogMeanExpPlan | None:
    """The plan of a call of the ops themselves (LogMeanExp hands them lw
    (K, ...) as the caller gave it, as a compiled graph calls them), or None
    (the general launch, which on CUDA pays the launch geometry and Triton's
    binding of the arguments at every call): on the triton backend, outside
    autocast, a contiguous float32 or float64 lw with K > 0 and M > 0."""
    device = lw.device
    if (not ENABLED or not _backend.op_plans_serve(device) or lw.dtype not in _DTYPES or lw.dim() == 0
            or lw.numel() == 0 or not lw.is_contiguous()):
        return None
    key = (lw.shape, lw.dtype, device)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, LogMeanExpPlan(lw))


def _logmeanexp_forward(lw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fastvae::logmeanexp: from a plan where _op_plan takes the call."""
    if (plan := _op_plan(lw)) is not None:
        return plan.run_forward(lw)
    return _forward_with_state(lw, ess=False)


def _logmeanexp_backward(grad_out: Tensor, grad_sumexp: Tensor | None, lw: Tensor, lw_max: Tensor,
                         sumexp: Tensor) -> Tensor:
    """fastvae::logmeanexp_backward: from a plan where _op_plan takes the
    call and every gradient is in lw's dtype and shape (as the autograd engine hands them)."""
    if (grad_out.dtype is lw.dtype and grad_out.shape == lw.shape[1:]
            and (grad_sumexp is None or (grad_sumexp.dtype is lw.dtype and grad_sumexp.shape == lw.shape[1:]))
            and lw_max.dtype is lw.dtype and sumexp.dtype is lw.dtype and (plan := _op_plan(lw)) is not None):
        return plan.run_backward(lw, lw_max, sumexp, grad_out, grad_sumexp)
    return _backward_with_state(lw, lw_max, sumexp, grad_out, grad_sumexp, None)


def _fake_with_state(lw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dtype = _backend.accumulation_dtype(lw.dtype)
    shape = lw.shape[1:]
    return tuple(lw.new_empty(shape, dtype=dtype) for _ in range(3))


def _backward_with_state(lw: Tensor, lw_max: Tensor, sumexp: Tensor, grad_out: Tensor,
                         grad_sumexp: Tensor | None, ess: Tensor | None, out_dtype: torch.dtype | None = None
                         ) -> Tensor:
    """dlw (K, ...) = e * (a + b e), e = exp(lw - lw_max), with per-column a, b
    from grad_out and either grad_sumexp (logmeanexp) or ess
    (effective_sample_size); see logmeanexp.h. The one backward of both
    ops; dlw in lw's dtype, or out_dtype."""
    backend = _backend.backend_for(lw.device)
    dtype = _backend.accumulation_dtype(lw.dtype)
    lw2 = _backend.kernel_input(backend, _columns(lw), dtype)
    K, M = lw2.shape
    out_dtype = out_dtype or lw.dtype
    dlw = _backend.empty_output((K, M), like=lw, dtype=out_dtype if lw2.dtype == lw.dtype else dtype)
    _backend.launch(
        backend, "logmeanexp_backward", lw2.numel(),
        lw=lw2, lw_max=_column_vector(lw_max, M, dtype), sumexp=_column_vector(sumexp, M, dtype),
        grad_out=_column_vector(grad_out, M, dtype), grad_sumexp=_column_vector(grad_sumexp, M, dtype),
        ess=_column_vector(ess, M, dtype), dlw=dlw,
    )
    dlw = _backend.in_dtype(dlw, out_dtype)
    return dlw if lw.dim() == 2 else dlw.reshape(lw.shape)


# -- double backward (create_graph=True; fastvae/_double_backward.py) ----------


def _safe_inv(s: Tensor) -> Tensor:
    """1 / s, and 0 where s = 0 (an all -inf column), with no inf * 0 in its gradient."""
    empty = s == 0
    return torch.where(empty, 0.0, 1.0 / torch.where(empty, 1.0, s))


def _weights(lw: Tensor, lw_max: Tensor) -> tuple[Tensor, Tensor]:
    """e = exp(lw - shift) (K, ...) and 1 / sum_k e (0 for an all -inf column), with
    lw_max a constant shift (as in the kernels: it cancels in everything derived)."""
    m = lw_max.detach().to(_backend.accumulation_dtype(lw.dtype))
    e = torch.exp(_acc(lw) - torch.where(m == float("-inf"), 0.0, m))
    return e, _safe_inv(e.sum(0))


def _logmeanexp_double_backward(grad_out, grad_sumexp, lw, lw_max):
    """dlw = e * (grad_out / sumexp + grad_sumexp), e = exp(lw - lw_max), sumexp = sum_k e."""
    e, inv = _weights(lw, lw_max)
    a = 0.0 if grad_out is None else _acc(grad_out) * inv
    if grad_sumexp is not None:
        a = a + _acc(grad_sumexp)
    return (e * a).to(lw.dtype)


def _effective_sample_size_double_backward(grad_ess, lw, lw_max):
    """dlw = 2 g ess w (1 - ess w), w = softmax(lw), ess = 1 / sum_k w^2 (0 for an all -inf column)."""
    e, inv = _weights(lw, lw_max)
    w = e * inv
    ess = _safe_inv((w * w).sum(0))
    return (2.0 * _acc(grad_ess) * ess * w * (1.0 - ess * w)).to(lw.dtype)


def _importance_weights_double_backward(grad_w, w):
    """dlw = w * (grad_w - sum_k grad_w w): w is the saved output, so its own graph
    (back through this op) carries the second derivative, as torch's softmax does."""
    g, ww = _acc(grad_w), _acc(w)
    return (ww * (g - (g * ww).sum(0))).to(w.dtype)


# -- logmeanexp ---------------------------------------------------------------

logmeanexp_op = define(
    "logmeanexp(Tensor lw) -> (Tensor, Tensor, Tensor)",
    _logmeanexp_forward,
    _fake_with_state,
    cpu=lambda lw: (lw,),
)
logmeanexp_backward_op = define(
    "logmeanexp_backward(Tensor grad_out, Tensor? grad_sumexp, Tensor lw, Tensor lw_max, Tensor sumexp) -> Tensor",
    _logmeanexp_backward,
    lambda grad_out, grad_sumexp, lw, lw_max, sumexp: torch.empty_like(lw),
    cpu=lambda grad_out, grad_sumexp, lw, lw_max, sumexp: (lw, grad_out, grad_sumexp, lw_max, sumexp),
)


class LogMeanExp(torch.autograd.Function):
    """Autograd of fastvae::logmeanexp, whose outputs are (out, lw_max, sumexp)
    over the leading dim of lw (K, ...): out in lw's dtype, the column state in
    float32 (float64 for float64 lw). lw_max carries no gradient (a shift that
    cancels in every quantity derived from the state); sumexp does. The
    backward is exp(lw - lw_max) * (grad_out / sumexp + grad_sumexp), with
    1 / sumexp taken as 0 for an all -inf column (so its gradient is 0)."""

    @staticmethod
    def forward(ctx, lw):
        out, lw_max, sumexp = run(logmeanexp_op, lw)
        ctx.mark_non_differentiable(lw_max)
        ctx.save_for_backward(lw, lw_max, sumexp)
        # the gradients of unused outputs stay None: no zero-filled tensors
        ctx.set_materialize_grads(False)
        return out, lw_max, sumexp

    @staticmethod
    def backward(ctx, grad_out, grad_lw_max, grad_sumexp):
        if grad_out is None and grad_sumexp is None:
            return None
        lw, lw_max, sumexp = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return _logmeanexp_double_backward(grad_out, grad_sumexp, lw, lw_max)
        if grad_out is None:  # only the state was used (logmeanexp_state)
            grad_out = torch.zeros_like(sumexp)
        return run(logmeanexp_backward_op, grad_out, grad_sumexp, lw, lw_max, sumexp)


def logmeanexp_with_state(lw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logmeanexp, lw_max, sumexp) over the leading dimension of lw (K, ...):
    LogMeanExp, or for eager CPU calls the C++ operator that does the same
    (torch_op.cpp)."""
    ops = _backend.torch_ops(lw)
    if ops is not None:
        return ops.logmeanexp(lw)
    return LogMeanExp.apply(lw)


# -- effective_sample_size ----------------------------------------------------

effective_sample_size_op = define(
    "effective_sample_size(Tensor lw) -> (Tensor, Tensor, Tensor)",
    lambda lw: _forward_with_state(lw, ess=True),
    _fake_with_state,
)
effective_sample_size_backward_op = define(
    "effective_sample_size_backward(Tensor grad_ess, Tensor lw, Tensor lw_max, Tensor sumexp, Tensor ess) -> Tensor",
    lambda grad_ess, lw, lw_max, sumexp, ess: _backward_with_state(lw, lw_max, sumexp, grad_ess, None, ess),
    lambda grad_ess, lw, lw_max, sumexp, ess: torch.empty_like(lw),
)


class EffectiveSampleSize(torch.autograd.Function):
    """Autograd of fastvae::effective_sample_size, whose outputs are (ess,
    lw_max, sumexp): ess = 1 / sum_k w_k^2 for w = softmax_k(lw), from the same
    single pass as the state, as sumexp^2 / sum_k exp(2 (lw_k - shift)); 0 for
    an all -inf column. The backward is 2 g ess w (1 - ess w)."""

    @staticmethod
    def forward(ctx, lw):
        ess, lw_max, sumexp = run(effective_sample_size_op, lw)
        ctx.mark_non_differentiable(lw_max, sumexp)
        ctx.save_for_backward(lw, lw_max, sumexp, ess)
        ctx.set_materialize_grads(False)
        return ess, lw_max, sumexp

    @staticmethod
    def backward(ctx, grad_ess, grad_lw_max, grad_sumexp):
        if grad_ess is None:
            return None
        lw, lw_max, sumexp, ess = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return _effective_sample_size_double_backward(grad_ess, lw, lw_max)
        return run(effective_sample_size_backward_op, grad_ess, lw, lw_max, sumexp, ess)


# -- importance_weights -------------------------------------------------------


def _importance_weights(lw: Tensor) -> Tensor:
    """w = softmax over the leading dim of lw (K, ...), same shape; an all -inf
    column gets weights 0 (not NaN). The weights are float32 for half-precision lw."""
    backend = _backend.backend_for(lw.device)
    dtype = _backend.compute_dtype(lw)
    lw2 = _backend.kernel_input(backend, _columns(lw), dtype)
    lw_max, sumexp = _state(backend, lw2)
    # softmax is the gradient of log-sum-exp: the backward kernel with grad_out = 1
    return _backward_with_state(lw2, lw_max, sumexp, torch.ones_like(sumexp), None, None, dtype).reshape(lw.shape)


def _importance_weights_backward(grad_w: Tensor, w: Tensor) -> Tensor:
    """dlw (K, ...) = w * (grad_w - sum_k grad_w * w), the softmax backward."""
    backend = _backend.backend_for(w.device)
    w2 = _columns(w)
    K, M = w2.shape
    dlw = _backend.empty_output((K, M), like=w)
    _backend.launch(backend, "importance_weights_backward", dlw.numel(),
                    grad_w=grad_w.to(w.dtype).reshape(K, M).contiguous(), w=w2, dlw=dlw)
    return dlw.reshape(w.shape)


importance_weights_op = define(
    "importance_weights(Tensor lw) -> Tensor", _importance_weights,
    lambda lw: torch.empty_like(lw, dtype=_backend.compute_dtype(lw)),
)
importance_weights_backward_op = define(
    "importance_weights_backward(Tensor grad_w, Tensor w) -> Tensor",
    _importance_weights_backward,
    lambda grad_w, w: torch.empty_like(w),
)


class ImportanceWeights(torch.autograd.Function):
    """Autograd of fastvae::importance_weights: saves the weights only."""

    @staticmethod
    def forward(ctx, lw):
        w = run(importance_weights_op, lw)
        ctx.save_for_backward(w)
        return w

    @staticmethod
    def backward(ctx, grad_w):
        (w,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return _importance_weights_double_backward(grad_w, w)
        return run(importance_weights_backward_op, grad_w, w)


@functools.lru_cache(maxsize=64)
def _ones(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Ones made once per shape (never written to): filling them on every call
    cost a launch."""
    return torch.ones(shape, dtype=dtype, device=device)


def importance_weights_from_state(lw: Tensor, lw_max: Tensor, sumexp: Tensor) -> Tensor:
    """The normalized weights of lw (K, ...), without a gradient, from the
    state (lw_max, sumexp) that logmeanexp_with_state(lw) already computed:
    the logmeanexp backward kernel with grad_out = 1, as importance_weights'
    own forward, which would first compute the state again (one launch, and
    the fill of its ones, fewer)."""
    lw, sumexp = lw.detach(), sumexp.detach()
    ones = (torch.ones(sumexp.shape, dtype=sumexp.dtype, device=sumexp.device) if _backend.compiling()
            else _ones(sumexp.shape, sumexp.dtype, sumexp.device))
    return run(logmeanexp_backward_op, ones, None, lw, lw_max.detach(), sumexp)


# -- public functions -----------------------------------------------------------


def _sample_dim(lw: Tensor, dim) -> int:
    """Validates lw and dim (metadata only) and returns dim in [0, lw.dim())."""
    _validate.float_tensors(lw=lw)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if lw.dim() == 0:
        raise ValueError("lw must have a sample dimension, got a 0-d tensor")
    if not -lw.dim() <= dim < lw.dim():
        raise ValueError(f"dim={dim} is out of range for lw of shape {tuple(lw.shape)}")
    dim %= lw.dim()
    if lw.shape[dim] == 0:
        raise ValueError(f"lw of shape {tuple(lw.shape)} has no samples along dim={dim}")
    return dim


def logmeanexp(lw: Tensor, dim: int = 0, keepdim: bool = False) -> Tensor:
    """log(mean_k exp(lw_k)) over ``dim``: the importance-weighted (IWAE) bound
    when lw holds log p(x, z_k) - log q(z_k | x).

    Args:
        lw: log-weights, e.g. (K, B) with the K samples along ``dim``; any
            floating dtype (float16/bfloat16 on the triton backend).
        dim: the sample dimension (default 0, negative counts from the end).
        keepdim: keep ``dim`` with size 1.

    Returns:
        m + log(sum_k exp(lw_k - m)) - log K with m the column max, in lw's
        dtype (accumulated in float32, float64 for float64). One pass over lw.
        A column of only -inf gives -inf and a zero gradient, a NaN anywhere in
        a column gives NaN, and a +inf gives +inf (and NaN gradient, as
        torch.logsumexp). The gradient is grad * softmax_k(lw).
    """
    dim = _sample_dim(lw, dim)
    _validate.boolean("keepdim", keepdim)
    out = logmeanexp_with_state(lw.movedim(dim, 0))[0]
    return out.unsqueeze(dim) if keepdim else out


def importance_weights(lw: Tensor, dim: int = 0) -> Tensor:
    """Self-normalized importance weights softmax(lw) over ``dim``, shape of lw.

    A column of only -inf gets weights 0 (where torch.softmax gives NaN), with
    a zero gradient. Differentiable (softmax backward).
    """
    dim = _sample_dim(lw, dim)
    return ImportanceWeights.apply(lw.movedim(dim, 0)).movedim(0, dim)


def effective_sample_size(lw: Tensor, dim: int = 0, keepdim: bool = False) -> Tensor:
    """Kish's effective sample size 1 / sum_k w_k^2 of the normalized weights
    w = softmax(lw) over ``dim``: between 1 (one sample carries all the weight)
    and K (equal weights).

    Computed in one pass over lw (no weights tensor). A column of only -inf
    gives 0 (no sample carries weight). Differentiable:
    d ess / d lw_k = 2 ess w_k (1 - ess w_k).
    """
    dim = _sample_dim(lw, dim)
    _validate.boolean("keepdim", keepdim)
    ess = EffectiveSampleSize.apply(lw.movedim(dim, 0))[0]
    return ess.unsqueeze(dim) if keepdim else ess


# -- streaming state ------------------------------------------------------------


class LogMeanExpState(NamedTuple):
    """Sufficient statistics of logmeanexp over some samples, per column.

    max: the largest non-NaN log-weight (-inf if none); no gradient.
    sumexp: sum_k exp(lw_k - shift), shift = max if finite else 0; differentiable.
    count: the number of samples folded in (int, or an int64 tensor after a
        collective).
    Both tensors are float32 (float64 for float64 log-weights).
    """

    max: Tensor
    sumexp: Tensor
    count: int | Tensor


def logmeanexp_state(lw: Tensor, dim: int = 0) -> LogMeanExpState:
    """The (max, sumexp, count) state of lw over ``dim``, from one pass over lw.

    For K too large for one tensor (or spread over processes): take the state
    of each chunk, combine with :func:`merge_logmeanexp_states` (or
    :func:`all_reduce_logmeanexp_state`), finish with
    :func:`logmeanexp_from_state`. The result equals logmeanexp over all the
    samples, gradient included (sumexp is differentiable; max is a shift that
    cancels, so it carries none).
    """
    dim = _sample_dim(lw, dim)
    _, lw_max, sumexp = logmeanexp_with_state(lw.movedim(dim, 0))
    return LogMeanExpState(lw_max, sumexp, lw.shape[dim])


def _shift(m: Tensor) -> Tensor:
    return torch.where(m.isinf(), 0.0, m)


def _rescale(m_old: Tensor, m_new: Tensor) -> Tensor:
    """exp(shift(m_old) - shift(m_new)); 0 for an empty state, whose sumexp is 0
    (or NaN, which the product keeps)."""
    return torch.where(m_old == _NEG_INF, 0.0, torch.exp(_shift(m_old) - _shift(m_new)))


def _check_state(name: str, state) -> LogMeanExpState:
    if not (isinstance(state, tuple) and len(state) == 3):
        raise TypeError(f"{name} must be a LogMeanExpState (max, sumexp, count), got {type(state).__name__}")
    m, s, n = state
    _validate.float_tensors(**{f"{name}.max": m, f"{name}.sumexp": s})
    _validate.same_shape(**{f"{name}.max": m, f"{name}.sumexp": s})
    if isinstance(n, bool) or not isinstance(n, (int, Tensor)):
        raise TypeError(f"{name}.count must be an int or a tensor, got {type(n).__name__}")
    return LogMeanExpState(m, s, n)


def merge_logmeanexp_states(*states: LogMeanExpState) -> LogMeanExpState:
    """Combines the states of disjoint sample sets (same columns) into the state
    of their union. Associative and commutative; an all -inf column adds
    nothing to the sum (its samples still count in the mean). Plain tensor
    arithmetic on the (...)-shaped states: differentiable through sumexp and
    traceable by torch.compile."""
    if not states:
        raise ValueError("merge_logmeanexp_states needs at least one state")
    m, s, n = _check_state("states[0]", states[0])
    for i, other in enumerate(states[1:], 1):
        m2, s2, n2 = _check_state(f"states[{i}]", other)
        if m2.shape != m.shape or m2.dtype != m.dtype or m2.device != m.device:
            raise ValueError(
                f"states[{i}] has max of shape {tuple(m2.shape)} ({m2.dtype}, {m2.device}), "
                f"states[0] of shape {tuple(m.shape)} ({m.dtype}, {m.device})"
            )
        new_m = torch.maximum(m, m2)
        s = s * _rescale(m, new_m) + s2 * _rescale(m2, new_m)
        m, n = new_m, n + n2
    return LogMeanExpState(m, s, n)


def accumulate_states(lw: Tensor, latent: Tensor | None, state: LogMeanExpState | None,
                      sq_state: LogMeanExpState | None) -> tuple[LogMeanExpState, LogMeanExpState]:
    """The running states of w and of w² (log-weights lw + latent and twice
    that) over the leading dimension of lw (K, M), with the chunk lw folded in:
    ``merge_logmeanexp_states(state, logmeanexp_state(lw + latent))`` and the
    same of ``2 (lw + latent)``, to float32 rounding, in one kernel call (one
    Triton launch, two when a GPU splits K) and no other tensor op. The states
    are (M,) tensors of the accumulation dtype, updated in place and returned
    (fresh ones when state is None: the first chunk). For the evaluation's
    chunk loop, under no_grad: no gradient flows. latent may be None."""
    backend = _backend.backend_for(lw.device)
    K, M = lw.shape
    dtype = _backend.accumulation_dtype(lw.dtype)
    if backend != "triton":  # the cpp and reference kernels take one dtype
        lw = lw.to(dtype).contiguous()
        latent = None if latent is None else latent.to(dtype).contiguous()
    else:
        lw = lw.contiguous()
        latent = None if latent is None else latent.contiguous()
    first = state is None
    if first:
        state = LogMeanExpState(*_state_buffers(lw, M), 0)
        sq_state = LogMeanExpState(*_state_buffers(lw, M), 0)
    _backend.launch(backend, "logmeanexp_accumulate", lw.numel(), lw=lw, latent=latent,
                    lw_max=state.max, sumexp=state.sumexp, sq_max=sq_state.max, sq_sumexp=sq_state.sumexp,
                    first=first)
    return (LogMeanExpState(state.max, state.sumexp, state.count + K),
            LogMeanExpState(sq_state.max, sq_state.sumexp, sq_state.count + K))


def logmeanexp_from_state(state: LogMeanExpState) -> Tensor:
    """logmeanexp of the samples a state summarizes: shift + log(sumexp) - log(count);
    -inf (with zero gradient) for an empty column."""
    m, s, n = _check_state("state", state)
    if isinstance(n, int) and n <= 0:  # a tensor count (after a collective) is not read back: no host sync
        raise ValueError(f"state.count must be >= 1 (the number of samples folded in), got {n}")
    empty = s == 0
    # log of a safe value, then where: the -inf branch must not send inf * 0 = NaN back
    log_s = torch.log(torch.where(empty, 1.0, s))
    log_n = math.log(n) if isinstance(n, int) else torch.log(n.to(s.dtype))
    return torch.where(empty, _NEG_INF, _shift(m) + log_s - log_n)


def all_reduce_logmeanexp_state(state: LogMeanExpState, group=None) -> LogMeanExpState:
    """The merged state of every rank's state (torch.distributed; each rank
    holds the state of its own samples of the same columns). Two all_reduce
    calls (MAX of max, then SUM of the rescaled sumexp) and one for the count,
    which comes back as an int64 tensor. For evaluation: no gradient flows
    through the collectives."""
    import torch.distributed as dist

    m, s, n = _check_state("state", state)
    m_all = m.detach().clone()
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    s_all = (s.detach() * _rescale(m.detach(), m_all)).contiguous()
    dist.all_reduce(s_all, op=dist.ReduceOp.SUM, group=group)
    n_all = torch.as_tensor(n, dtype=torch.int64, device=m.device).clone()
    dist.all_reduce(n_all, op=dist.ReduceOp.SUM, group=group)
    return LogMeanExpState(m_all, s_all, n_all)
