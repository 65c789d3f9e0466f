"""categorical_log_prob's front end: the public function, the torch.library
ops fastvae::categorical_log_prob and fastvae::categorical_log_prob_backward,
their autograd Function (its double backward included), the class-range check
(check_classes) and the route of likelihood="categorical" (decoder_log_prob,
fastvae/_decoder.py's table).

The categorical likelihood with logits, fused forward and backward: x holds integer class indices (..., D), the decoder
logits (K, ..., D, C) with the class dim C innermost, and

    log p(x | l) = sum_d log softmax(l[..., d, :])[x[..., d]].

x broadcasts over decoder samples without copies. The backward recomputes
each row's log-sum-exp from the logits (nothing of size K x ... x D is kept)
and writes dlogits = g (onehot(x) - softmax(l)); x, being integer, has no
gradient. An index outside [0, C) is refused with an error naming x: on CPU
at every call, on CUDA at the first (``fastvae.set_value_checks``; later
out-of-range indices give NaN, never a read outside the row).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ... import _backend, _validate, _value_checks
from ..._double_backward import _acc
from ..._launch import Launch, PlanCache, template
from ..._likelihood_layout import broadcast_x, kernel_shape
from ..._op import define, run, shaped

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                  torch.uint64)


# The plans of the ops' own calls (a compiled graph's nodes) on the triton
# backend, per signature (bounded: fastvae._launch.PlanCache); ENABLED False
# sends every call the general way (the tests compare the two); ``empty``
# allocates each output like a template the plan holds (the tests' fixture may
# poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
_DTYPES = (torch.float32, torch.float64)


class CategoricalPlan:
    """The launches of one signature of the ops' own calls: x (P, D) int64
    and logits (K, P, D, C) contiguous, float32 or float64, K P D C > 0. The
    general launchers' variants (triton.py's forward_plan, backward_plan) on
    the same arguments."""

    __slots__ = ("out_like", "dlogits_like", "forward", "forward_ints", "backward", "backward_ints")

    def __init__(self, logits: Tensor):
        kern = _backend.triton_module("categorical_log_prob")
        (K, P, D, C), dtype, device = logits.shape, logits.dtype, logits.device
        self.out_like = template((K, P), dtype, device)
        self.dlogits_like = template(logits.shape, dtype, device)
        grid, meta = kern.forward_plan(K, P, D, C, dtype, device)
        self.forward, self.forward_ints = Launch(kern._categorical_log_prob_fwd_kernel, grid, meta), (P, K * P, D, C)
        grid, meta = kern.backward_plan(K, P, D, C, dtype, device)
        self.backward, self.backward_ints = (Launch(kern._categorical_log_prob_bwd_kernel, grid, meta),
                                             (P, D, K * P * D, C))

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, self.backward]


def _op_plan(x: Tensor, logits: Tensor) -> CategoricalPlan | None:
    """The plan of a call of the ops themselves (CategoricalLogProb hands them
    x (P, D) int64 and logits (K, P, D, C), as a compiled graph calls them),
    or None (the general launch, which on CUDA pays the launch geometry and
    Triton's binding of the arguments at every call): on the triton backend,
    outside autocast, contiguous float32 or float64 logits and x int64 of
    their device, no empty dimension."""
    device = logits.device
    if (not ENABLED or not _backend.op_plans_serve(device) or logits.dtype not in _DTYPES or logits.dim() != 4
            or x.dtype is not torch.int64 or x.shape != logits.shape[1:3] or logits.numel() == 0
            or not logits.is_contiguous() or not x.is_contiguous() or x.device != device):
        return None
    key = (logits.shape, logits.dtype, device)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, CategoricalPlan(logits))


def _forward(x: Tensor, logits: Tensor) -> Tensor:
    """out (K, P) for x (P, D) int64 and logits (K, P, D, C), both contiguous;
    from a plan where _op_plan takes the call (a compiled graph's node on CUDA)."""
    if (plan := _op_plan(x, logits)) is not None:
        out = empty(plan.out_like)
        plan.forward(x, logits, out, *plan.forward_ints)
        return out
    backend = _backend.backend_for(logits.device)
    dtype = _backend.compute_dtype(logits)
    logits = _backend.kernel_input(backend, logits, dtype, True)
    out = _backend.empty_output(logits.shape[:2], like=logits, dtype=dtype)
    _backend.launch(backend, "categorical_log_prob_forward", logits.numel(), x=x, logits=logits, out=out)
    return out


def _backward(grad_out: Tensor, x: Tensor, logits: Tensor) -> Tensor:
    """dlogits (K, P, D, C) in the logits' dtype for grad_out (K, P); from a
    plan as the forward's."""
    if grad_out.dtype is logits.dtype and (plan := _op_plan(x, logits)) is not None:
        dlogits = empty(plan.dlogits_like)
        g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()  # (K, P) in any shape: read flat
        plan.backward(g, x, logits, dlogits, *plan.backward_ints)
        return dlogits
    backend = _backend.backend_for(logits.device)
    dtype = _backend.compute_dtype(logits)
    logits_dtype = logits.dtype
    logits = _backend.kernel_input(backend, logits, dtype, True)
    grad_out = _backend.kernel_input(backend, grad_out, dtype)
    dlogits = _backend.empty_output(logits.shape, like=logits)
    _backend.launch(backend, "categorical_log_prob_backward", dlogits.numel(),
                    grad_out=shaped(grad_out, logits.shape[:2]).contiguous(), x=x, logits=logits, dlogits=dlogits)
    return _backend.in_dtype(dlogits, logits_dtype)


categorical_log_prob_op = define(
    "categorical_log_prob(Tensor x, Tensor logits) -> Tensor",
    _forward,
    lambda x, logits: logits.new_empty(logits.shape[:2], dtype=_backend.compute_dtype(logits)),
)
categorical_log_prob_backward_op = define(
    "categorical_log_prob_backward(Tensor grad_out, Tensor x, Tensor logits) -> Tensor",
    _backward,
    lambda grad_out, x, logits: torch.empty_like(logits),
)


def _double_backward(grad_out: Tensor, x: Tensor, logits: Tensor) -> Tensor:
    """dlogits = g (onehot(x) - softmax(l)) as differentiable torch code
    (create_graph=True); x is the kernel layout's (P, D) or (K, P, D)."""
    lg = _acc(logits)
    onehot = torch.zeros_like(lg).scatter_(-1, torch.broadcast_to(x, lg.shape[:-1])[..., None], 1.0)
    lse = torch.logsumexp(lg, -1, keepdim=True)
    empty = torch.isneginf(lse)  # every logit -inf: no softmax
    p = torch.where(empty, 0.0, torch.exp(lg - torch.where(empty, 0.0, lse)))
    return (_acc(grad_out)[..., None, None] * (onehot - p)).to(logits.dtype)


class CategoricalLogProb(torch.autograd.Function):
    """Autograd of fastvae::categorical_log_prob: saves x (P, D) and the
    logits (K, P, D, C), never a per-row log-sum-exp."""

    @staticmethod
    def forward(ctx, x, logits):
        K, P, D = kernel_shape(x, logits[..., 0])
        x2 = x.reshape(P, D).to(torch.int64).contiguous()
        l4 = logits.contiguous().view(K, P, D, logits.shape[-1])
        ctx.save_for_backward(x2, l4, logits)  # logits itself links a double backward's graph
        ctx.logits_shape = logits.shape
        return shaped(run(categorical_log_prob_op, x2, l4), logits.shape[:-2])

    @staticmethod
    def backward(ctx, grad_out):
        x2, l4, logits = ctx.saved_tensors
        g = grad_out.reshape(l4.shape[:2])
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return None, shaped(_double_backward(g, x2, logits.reshape(l4.shape)), ctx.logits_shape)
        return None, shaped(run(categorical_log_prob_backward_op, g, x2, l4), ctx.logits_shape)


# -- public function -----------------------------------------------------------


def check_classes(x: Tensor, C: int, name: str = "x") -> None:
    """Raise when a class index of x lies outside [0, C), by the rule of the
    value checks: on CPU at every call, on CUDA (the Triton backend) at the
    first (one host sync; set_value_checks changes the rule). The whole of x
    is read (it is the decoder output's size / C). Unchecked, the cpp kernels
    refuse such an index themselves and the Triton kernels give NaN; neither
    reads outside a row."""
    if not _value_checks.should_check("categorical classes", x):
        return
    lo, hi = (v.item() for v in torch.aminmax(x))
    if lo < 0 or hi >= C:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds class index {bad}, outside [0, {C}): the logits' last dim has "
                         f"C={C} classes (min {lo}, max {hi})")


def _check(x: Tensor, logits: Tensor, x_name: str, logits_name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{x_name} must be a torch.Tensor of class indices, got {type(x).__name__}")
    if not isinstance(logits, Tensor):
        raise TypeError(f"{logits_name} must be a torch.Tensor, got {type(logits).__name__}")
    if x.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{x_name} must be an integer tensor of class indices (e.g. torch.int64), got dtype "
                        f"{x.dtype}" + (": convert with x.long()" if x.dtype.is_floating_point else ""))
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{logits_name} must be a floating-point tensor, got dtype {logits.dtype}")
    if x.device != logits.device:
        raise ValueError(f"device mismatch: {x_name} is on {x.device}, {logits_name} is on {logits.device}")
    if x.dim() < 1 or logits.dim() < 2:
        raise ValueError(f"{x_name} must have shape (..., D) and {logits_name} (..., D, C); got "
                         f"{tuple(x.shape)} and {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{logits_name} of shape {tuple(logits.shape)} has no classes (C = 0)")


def categorical_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log Categorical(x; softmax(logits)) summed over the last dimension D of x.

    Args:
        x: integer class indices of shape (..., D), each in [0, C) (an index
            outside is an error naming x); it broadcasts against ``logits``'
            leading shape (K, ..., D) without being copied K times.
        logits: unnormalized log-probabilities of shape (K, ..., D, C) or
            (..., D, C), the C classes in the last dimension (the layout of
            torch.distributions.Categorical(logits=...)). A logit of -inf is a
            class of probability 0.

    Returns:
        sum over D of logits[..., d, x_d] - logsumexp_c logits[..., d, c],
        with logits' leading shape (K, ...). Equal to
        ``Independent(Categorical(logits=logits), 1).log_prob(x)``.
        Differentiable in logits (g (onehot(x) - softmax(logits))); the
        backward recomputes the log-sum-exp instead of keeping it.

    Half-precision logits are read as they are and give a float32 result
    (float64 logits a float64 one); the gradient comes back in their dtype.
    """
    _check(x, logits, "x", "logits")
    check_classes(x, logits.shape[-1])
    return categorical_log_prob_unchecked(x, logits)


def categorical_log_prob_unchecked(x: Tensor, logits: Tensor) -> Tensor:
    """categorical_log_prob after the checks."""
    x = broadcast_x(x, logits[..., 0], "logits[..., 0]")
    return CategoricalLogProb.apply(x, logits)


def decoder_log_prob(x: Tensor, logits: Any, sample_shape: tuple[int, ...], batch_ndim: int) -> Tensor:
    """likelihood="categorical" in the objectives and evaluation: x (*batch,
    *event) integer classes against decode(z)'s logits (*sample_shape,
    *batch, *event, C), summed over every event dimension."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"for likelihood='categorical' decode must return the logits (a tensor of shape "
                        f"(*sample_shape, *x.shape, C)), got {type(logits).__name__}")
    _check(x, logits, "x (likelihood='categorical')", "decode(z)")
    want = (*sample_shape, *x.shape)
    if tuple(logits.shape[:-1]) != want:
        raise ValueError(f"decode returned logits of shape {tuple(logits.shape)}; expected {(*want, 'C')} "
                         f"(sample shape {sample_shape}, x's shape {tuple(x.shape)}, then the classes)."
                         + _validate.decoder_shape_hint(x, sample_shape, batch_ndim,
                                                        (*x.shape[batch_ndim:], logits.shape[-1])))
    check_classes(x, logits.shape[-1], "x (likelihood='categorical')")
    if x.dim() - batch_ndim != 1:  # (C, H, W) events: one flat event of class rows
        lead = len(sample_shape) + batch_ndim
        x = x.reshape(*x.shape[:batch_ndim], -1)
        logits = logits.reshape(*logits.shape[:lead], -1, logits.shape[-1])
    return categorical_log_prob_unchecked(x, logits)


# -- the decoder route: likelihood= of the objectives and evaluation (fastvae/_decoder.py) --


def decoder_route(x: Tensor, out: Any, sample_shape: tuple[int, ...], batch_ndim: int, probs_given: bool) -> Tensor:
    """Logits (*x.shape, C) for integer classes x."""
    return decoder_log_prob(x, out, sample_shape, batch_ndim)
