"""gaussian_log_prob: the Gaussian reconstruction term log N(x; mean, diag(var)),
fused forward and backward, with x broadcast over decoder samples."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, _validate
from ._likelihood_layout import (
    broadcast_var,
    broadcast_x,
    fold_samples,
    folded,
    kernel_var,
    kernel_views,
    unfold_rows,
)
from ._op import define, run


def _forward(x: Tensor, mean: Tensor, var_param: Tensor, softplus_mode: bool, delta: float) -> Tensor:
    """log N(x; mean, var) summed over D, shape mean.shape[:-1]. var =
    exp(var_param), or softplus(var_param) + delta in softplus_mode. x is
    mean's shape or mean.shape[1:]; var_param is mean's shape, x's shape
    (shared over K) or (D,)."""
    backend = _backend.backend_for(mean.device)
    _validate.dtype_for_backend(backend, mean.dtype)
    x2, m3, K, P, D = kernel_views(x, mean)
    v = kernel_var(var_param, K, P, D)
    if fold_samples(backend, m3, _backend.num_threads(m3.numel())):
        x2, m3, v = folded(x2, m3, v)
    out = _backend.empty_output(m3.shape[:2], like=mean)
    _backend.launch(
        backend, "gaussian_log_prob_forward", m3.numel(),
        x=x2, mean=m3, var_param=v, softplus_mode=softplus_mode, delta=delta, out=out,
    )
    return out.reshape(mean.shape[:-1])


def _backward(grad_out: Tensor, x: Tensor, mean: Tensor, var_param: Tensor, softplus_mode: bool, delta: float,
              need_dx: bool, need_dvar_param: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dmean, dvar_param) in the shapes of x, mean and var_param. dx and
    dvar_param are empty (0,) tensors unless asked for (x's gradient is summed
    over K in the kernel; a fixed scale needs no variance gradient, which saves
    its reductions)."""
    backend = _backend.backend_for(mean.device)
    x2, m3, K, P, D = kernel_views(x, mean)
    v = kernel_var(var_param, K, P, D)
    fold = fold_samples(backend, m3, _backend.num_threads(m3.numel()))
    if fold:
        x2, m3, v = folded(x2, m3, v)
    rows = m3.shape[1]
    dx = _backend.empty_output((rows, D) if need_dx else (0,), like=mean)
    dmean = _backend.empty_output(m3.shape, like=mean)
    dv = _backend.empty_output(v.shape if need_dvar_param else (0,), like=mean)
    _backend.launch(
        backend, "gaussian_log_prob_backward", dmean.numel(),
        grad_out=grad_out.to(mean.dtype).reshape(m3.shape[:2]).contiguous(), x=x2, mean=m3, var_param=v,
        softplus_mode=softplus_mode, delta=delta,
        dx=dx if need_dx else None, dmean=dmean, dvar_param=dv if need_dvar_param else None,
    )
    if fold and need_dx:
        dx = unfold_rows(dx, K, P)
    if fold and need_dvar_param and var_param.numel() == P * D and v.dim() == 2:
        dv = unfold_rows(dv, K, P)
    dx = dx.reshape(x.shape) if need_dx else dx
    return dx, dmean.reshape(mean.shape), dv.reshape(var_param.shape) if need_dvar_param else dv


gaussian_log_prob_op = define(
    "gaussian_log_prob(Tensor x, Tensor mean, Tensor var_param, bool softplus_mode, float delta) -> Tensor",
    _forward,
    lambda x, mean, var_param, softplus_mode, delta: mean.new_empty(mean.shape[:-1]),
)
gaussian_log_prob_backward_op = define(
    "gaussian_log_prob_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor var_param, bool softplus_mode,"
    " float delta, bool need_dx, bool need_dvar_param) -> (Tensor, Tensor, Tensor)",
    _backward,
    lambda grad_out, x, mean, var_param, softplus_mode, delta, need_dx, need_dvar_param: (
        x.new_empty(x.shape if need_dx else (0,)), torch.empty_like(mean),
        var_param.new_empty(var_param.shape if need_dvar_param else (0,))),
)


class GaussianLogProb(torch.autograd.Function):
    """Autograd of fastvae::gaussian_log_prob: saves x, mean and var_param."""

    @staticmethod
    def forward(ctx, x, mean, var_param, softplus_mode, delta):
        ctx.softplus_mode, ctx.delta = softplus_mode, delta
        ctx.save_for_backward(x, mean, var_param)
        return run(gaussian_log_prob_op, x, mean, var_param, softplus_mode, delta)

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, var_param = ctx.saved_tensors
        need_dx, need_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dx, dmean, dv = run(
            gaussian_log_prob_backward_op, grad_out, x, mean, var_param, ctx.softplus_mode, ctx.delta, need_dx, need_dv)
        return (dx if need_dx else None), dmean, (dv if need_dv else None), None, None


# -- public function -----------------------------------------------------------


def gaussian_log_prob(
    x: Tensor,
    mean: Tensor,
    logvar: Tensor | None = None,
    *,
    scale: float | Tensor | None = None,
    softplus_var: Tensor | None = None,
    delta: float = 1e-6,
) -> Tensor:
    """log N(x; mean, diag(var)) summed over the last dimension D.

    The variance is given in exactly one of three ways:

    - ``logvar``: var = exp(logvar), a tensor broadcastable to ``mean``: per
      element (a decoder that predicts its variance), per dimension (D,), or a
      scalar tensor;
    - ``scale``: a fixed standard deviation (float or tensor, var = scale^2);
      the default when neither of the others is given is ``scale=1.0``, the
      squared-error case;
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
    tensors = {"x": x, "mean": mean}
    if logvar is not None:
        tensors["logvar"] = logvar
    if softplus_var is not None:
        tensors["softplus_var"] = softplus_var
    if isinstance(scale, Tensor):
        tensors["scale"] = scale
    _validate.float_tensors(**tensors)
    _validate.event_dim("mean", mean)
    # var >= delta must be a normal number in the kernels' compute dtype
    tiny = torch.finfo(_backend.accumulation_dtype(mean.dtype)).tiny
    if delta < tiny:
        raise ValueError(f"delta must be at least {tiny} (the smallest normal {mean.dtype} number), got {delta!r}")
    x_b = broadcast_x(x, mean, "mean")

    softplus = softplus_var is not None
    if softplus:
        v = broadcast_var(softplus_var, "softplus_var", x_b, mean)
    elif logvar is not None:
        v = broadcast_var(logvar, "logvar", x_b, mean)
    elif isinstance(scale, Tensor):
        v = broadcast_var(2.0 * torch.log(scale), "scale", x_b, mean)
    else:
        scale = 1.0 if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise ValueError(f"scale must be a finite float > 0 or a tensor, got {scale!r}")
        v = torch.full((mean.shape[-1],), 2.0 * math.log(scale), dtype=mean.dtype, device=mean.device)
    return GaussianLogProb.apply(x_b, mean, v, softplus, float(delta))
