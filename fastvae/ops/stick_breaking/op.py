"""stick_breaking's front end: the public function, the torch.library ops
fastvae::stick_breaking and fastvae::stick_breaking_backward, and their
autograd Function (its double backward included)."""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _backend, _validate
from ..._dtypes import accumulation_dtype
from ..._launch import Launch, PlanCache, template
from ..._op import define, flat, run, shaped
from . import stick_breaking_grad

# The plans of the op's own calls (a compiled graph's nodes) on the triton
# backend, per signature (bounded: fastvae._launch.PlanCache); ENABLED False
# sends every call the general way (the tests compare the two); ``empty``
# allocates each output like a template the plan holds (the tests' fixture may
# poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
_DTYPES = (torch.float32, torch.float64)


class StickBreakingPlan:
    """The launches of one signature, y (N, M) contiguous of one float32 or
    float64 dtype, N > 0: the forward kernel's and the backward kernel's, the
    general launchers' variants (triton.py's launch_plan) on the same
    arguments."""

    __slots__ = ("N", "M", "z_like", "dy_like", "forward", "backward")

    def __init__(self, y: Tensor):
        kern = _backend.triton_module("stick_breaking")
        (N, M), dtype, device = y.shape, y.dtype, y.device
        self.N, self.M = N, M
        self.z_like = template((N, M + 1), dtype, device)
        self.dy_like = template((N, M), dtype, device)
        grid, meta = kern.launch_plan(N, M, dtype)
        self.forward = Launch(kern._stick_breaking_fwd_kernel, grid, meta)
        self.backward = Launch(kern._stick_breaking_bwd_kernel, grid, meta)

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, self.backward]


def _op_plan(y: Tensor) -> StickBreakingPlan | None:
    """The plan of a call of the op itself (y (N, M) as StickBreaking hands it
    to a compiled graph), or None (the general launch, which on CUDA pays the
    launch geometry and Triton's binding of the arguments at every call): on
    the triton backend, outside autocast, a contiguous float32 or float64 y
    with N > 0."""
    device = y.device
    if (not ENABLED or not _backend.op_plans_serve(device) or y.dtype not in _DTYPES or y.dim() != 2
            or y.shape[0] == 0 or not y.is_contiguous()):
        return None
    key = (y.shape, y.dtype, device)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, StickBreakingPlan(y))


def _forward(y: Tensor) -> Tensor:
    """z (N, M + 1) in y's dtype for y (N, M) contiguous; computed in
    float32 for half precision (the cpp kernels read it widened)."""
    if (plan := _op_plan(y)) is not None:
        z = empty(plan.z_like)
        plan.forward(y, z, plan.N, plan.M)
        return z
    backend = _backend.backend_for(y.device)
    yk = _backend.kernel_input(backend, y, _backend.compute_dtype(y))
    z = _backend.empty_output((y.shape[0], y.shape[1] + 1), like=yk)
    _backend.launch(backend, "stick_breaking_forward", y.numel(), y=yk, z=z)
    return _backend.in_dtype(z, y.dtype)


def _backward(grad_z: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """dy (N, M) in y's dtype, for grad_z and z (N, M + 1) and y (N, M)."""
    if grad_z.dtype is y.dtype and z.dtype is y.dtype and (plan := _op_plan(y)) is not None:
        dy = empty(plan.dy_like)
        plan.backward(grad_z.contiguous(), y, z.contiguous(), dy, plan.N, plan.M)
        return dy
    backend = _backend.backend_for(y.device)
    dtype = _backend.compute_dtype(y)
    yk, zk, gk = (_backend.kernel_input(backend, t, dtype) for t in (y, z, grad_z.contiguous()))
    dy = _backend.empty_output(y.shape, like=yk)
    _backend.launch(backend, "stick_breaking_backward", y.numel(), grad_z=gk, y=yk, z=zk.contiguous(), dy=dy)
    return _backend.in_dtype(dy, y.dtype)


stick_breaking_op = define(
    "stick_breaking(Tensor y) -> Tensor",
    _forward,
    lambda y: y.new_empty((y.shape[0], y.shape[1] + 1)),
    cpu=lambda y: (y,),
)
stick_breaking_backward_op = define(
    "stick_breaking_backward(Tensor grad_z, Tensor y, Tensor z) -> Tensor",
    _backward,
    lambda grad_z, y, z: torch.empty_like(y),
    cpu=lambda grad_z, y, z: (y, grad_z, z),
)


def _double_backward(grad_z: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """dy as differentiable torch ops, for a create_graph=True backward: the
    oracle's stick_breaking_grad in the accumulation dtype. z is the saved
    output, so its own dependence on y is differentiated through this
    Function again."""
    acc = accumulation_dtype(y.dtype)
    return stick_breaking_grad(grad_z.to(acc), y.to(acc), z.to(acc)).to(y.dtype)


class StickBreaking(torch.autograd.Function):
    """Autograd of fastvae::stick_breaking. The op takes y as (N, M)
    contiguous, made here once and saved for the backward; y itself and the
    output z are saved too, for a double backward."""

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        y2 = flat(y)
        z = shaped(run(stick_breaking_op, y2), (*y.shape[:-1], y.shape[-1] + 1))
        ctx.save_for_backward(y2, z, y)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        y2, z, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return _double_backward(grad_z, y, z)
        M = y2.shape[1]
        dy = run(stick_breaking_backward_op, shaped(grad_z, (y2.shape[0], M + 1)), y2,
                 shaped(z, (y2.shape[0], M + 1)))
        return shaped(dy, y.shape)


# -- public function -----------------------------------------------------------


def stick_breaking(y: Tensor) -> Tensor:
    """z = stick_breaking(y) on the simplex of M + 1 components, for y (..., M).

    torch.distributions' StickBreakingTransform, computed in log space: with
    x_j = y_j - log(M - j) and S_j = sum_{i <= j} softplus(x_i),
    z_j = exp(x_j - S_j) for j < M and z_M = exp(-S_{M-1}); y = 0 maps to
    the simplex's centre. The logistic-normal posterior's transform
    (fastvae.latents.LogisticNormal).

    Args:
        y: a float tensor of shape (..., M), M >= 1.

    Returns:
        z of shape (..., M + 1) in y's dtype (computed in float32 for
        float16/bfloat16), each row on the simplex. Differentiable, twice.
    """
    _validate.float_tensors(y=y)
    if y.dim() < 1 or y.shape[-1] < 1:
        raise ValueError(f"y must have a last dimension of at least 1 (M, for a simplex of M + 1 components), "
                         f"got shape {tuple(y.shape)}")
    return stick_breaking_unchecked(y)


def stick_breaking_unchecked(y: Tensor) -> Tensor:
    """stick_breaking of a y the caller has checked (the logistic-normal
    posterior's sample): StickBreaking, or for eager CPU calls the C++
    operator that does the same (torch_op.cpp)."""
    ops = _backend.torch_ops(y)
    if ops is not None:
        return ops.stick_breaking(y)
    return StickBreaking.apply(y)
