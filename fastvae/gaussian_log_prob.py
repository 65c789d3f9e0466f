"""gaussian_log_prob: the Gaussian reconstruction term log N(x; mean, diag(var)),
fused forward and backward, with x broadcast over decoder samples."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, _validate
from ._backend import backend_for
from ._likelihood_layout import broadcast_var, broadcast_x, kernel_var, kernel_views


# -- custom ops ----------------------------------------------------------------


@torch.library.custom_op("fastvae::gaussian_log_prob", mutates_args=(), device_types=("cpu", "cuda"))
def gaussian_log_prob_op(x: Tensor, mean: Tensor, v: Tensor, softplus: bool, delta: float) -> Tensor:
    """log N(x; mean, var) summed over D, shape mean.shape[:-1]. var = exp(v), or
    softplus(v) + delta when softplus is set. x is mean's shape or mean.shape[1:];
    v is mean's shape, x's shape (shared over K) or (D,)."""
    backend = backend_for(mean.device)
    _validate.dtype_for_backend(backend, mean.dtype)
    x2, m3, K, P, D = kernel_views(x, mean)
    v_k = kernel_var(v, K, P, D)
    out = _backend.empty_output((K, P), like=mean)
    _backend.launch(
        backend, "gaussian_log_prob", "gaussian_log_prob_forward",
        x2, m3, v_k, softplus, delta, out,
        work=m3.numel(),
    )
    return out.reshape(mean.shape[:-1])


@gaussian_log_prob_op.register_fake
def _(x, mean, v, softplus, delta):
    return mean.new_empty(mean.shape[:-1])


@torch.library.custom_op(
    "fastvae::gaussian_log_prob_backward", mutates_args=(), device_types=("cpu", "cuda")
)
def gaussian_log_prob_backward_op(
    g: Tensor, x: Tensor, mean: Tensor, v: Tensor, softplus: bool, delta: float, need_dx: bool, need_dv: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dmean, dv) in the shapes of x, mean and v. dx and dv are empty (0,)
    tensors unless asked for (x's gradient is summed over K in the kernel; a
    fixed scale needs no dv, which saves its reductions)."""
    backend = backend_for(mean.device)
    x2, m3, K, P, D = kernel_views(x, mean)
    v_k = kernel_var(v, K, P, D)
    g2 = g.to(mean.dtype).reshape(K, P).contiguous()
    dx = _backend.empty_output((P, D) if need_dx else (0,), like=mean)
    dmean = _backend.empty_output((K, P, D), like=mean)
    dv = _backend.empty_output(v_k.shape if need_dv else (0,), like=mean)
    dx_arg = dx if need_dx else None
    dv_arg = dv if need_dv else None
    _backend.launch(
        backend, "gaussian_log_prob", "gaussian_log_prob_backward",
        g2, x2, m3, v_k, softplus, delta, dx_arg, dmean, dv_arg,
        work=dmean.numel(),
    )
    dx = dx.reshape(x.shape) if need_dx else dx
    return dx, dmean.reshape(mean.shape), dv.reshape(v.shape) if need_dv else dv


@gaussian_log_prob_backward_op.register_fake
def _(g, x, mean, v, softplus, delta, need_dx, need_dv):
    return (x.new_empty(x.shape if need_dx else (0,)), torch.empty_like(mean),
            v.new_empty(v.shape if need_dv else (0,)))


def _setup_context(ctx, inputs, output):
    x, mean, v, softplus, delta = inputs
    ctx.softplus, ctx.delta = softplus, delta
    ctx.save_for_backward(x, mean, v)


def _backward(ctx, g):
    x, mean, v = ctx.saved_tensors
    need_dx, need_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dx, dmean, dv = gaussian_log_prob_backward_op(g, x, mean, v, ctx.softplus, ctx.delta, need_dx, need_dv)
    return (dx if need_dx else None), dmean, (dv if need_dv else None), None, None


gaussian_log_prob_op.register_autograd(_backward, setup_context=_setup_context)


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
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not delta > 0:
        raise ValueError(f"delta must be a float > 0, got {delta!r}")
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
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a float > 0 or a tensor, got {scale!r}")
        v = torch.full((mean.shape[-1],), 2.0 * math.log(scale), dtype=mean.dtype, device=mean.device)
    return gaussian_log_prob_op(x_b, mean, v, softplus, float(delta))
