"""How x and the decoder outputs of the likelihood ops meet the kernels.

The decoder output (mean, or logits) has shape (K, ..., D) or (..., D); x
broadcasts against it. The kernels see one layout: the decoder output as
(K, P, D) and x as (P, D), broadcast over K by indexing (no K copies of x).
The public functions bring their arguments into one of these forms; only an
unusual broadcast (say x of shape (1, D) against a (B, D) output) is
materialized with expand, whose autograd sums gradients back to x's shape.

The Gaussian variance parameter v goes to the kernel as
- (K, P, D): one value per element (a decoder that predicts its variance);
- (P, D): shared over K, one per x row;
- (D,): one per dimension, or a scalar spread over D (fixed or learned
  scale): then 1/var is computed once per dimension, not once per element.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from . import _backend, _validate
from ._launch import Launch, PlanCache, template
from ._op import shaped
from ._validate import broadcasts_to, decoder_shape_hint


def _broadcast_error(name: str, t: Tensor, out_name: str, out: Tensor) -> ValueError:
    return ValueError(
        f"{name} of shape {tuple(t.shape)} does not broadcast against {out_name} of shape "
        f"{tuple(out.shape)} (the result keeps {out_name}'s leading shape)"
    )


def _strip_leading_ones(t: Tensor, ndim: int) -> Tensor:
    """Drop leading size-1 dims until t has at most ndim dims (a view)."""
    while t.dim() > ndim and t.shape[0] == 1:
        t = t[0]
    return t


def broadcast_x(x: Tensor, out: Tensor, out_name: str) -> Tensor:
    """x as out's shape, or as out.shape[1:] (broadcast over K), for the ops."""
    if not broadcasts_to(x.shape, out.shape):
        raise _broadcast_error("x", x, out_name, out)
    if x.shape == out.shape:
        return x
    x = _strip_leading_ones(x, out.dim() - 1)
    if out.dim() >= 1 and x.shape == out.shape[1:]:
        return x
    return x.expand(out.shape)


def broadcast_var(v: Tensor, name: str, x: Tensor, mean: Tensor) -> Tensor:
    """v in one of the three kernel forms (see the module docstring)."""
    if not broadcasts_to(v.shape, mean.shape):
        raise _broadcast_error(name, v, "mean", mean)
    if v.shape == mean.shape:
        return v
    D = mean.shape[-1]
    v_min = _strip_leading_ones(v, 1)
    if v_min.dim() <= 1:  # scalar, (1,) or (D,): one value per dimension
        return v_min.reshape(-1).expand(D) if v_min.numel() == 1 else v_min
    if x.dim() < mean.dim() and _strip_leading_ones(v, x.dim()).shape == x.shape:
        return _strip_leading_ones(v, x.dim())
    return v.expand(mean.shape)


def kernel_shape(x: Tensor, out: Tensor) -> tuple[int, int, int]:
    """(K, P, D) of the kernel layout for x as broadcast_x returns it (out's
    shape, or out's without the first dimension); csrc/torch_ops.cpp's
    likelihood_layout is the same rule."""
    D = out.shape[-1]
    if x.dim() == out.dim():
        return 1, math.prod(out.shape[:-1]), D
    return out.shape[0], math.prod(out.shape[1:-1]), D


def kernel_views(x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """(x as contiguous (P, D), out as contiguous (K, P, D)): the layout the ops take."""
    K, P, D = kernel_shape(x, out)
    x2 = x.contiguous() if x.dim() == 2 else x.reshape(P, D).contiguous()
    return x2, out.contiguous().view(K, P, D)


def kernel_var(v: Tensor, K: int, P: int, D: int) -> Tensor:
    """v as contiguous (K, P, D), (P, D) or (D,), from the forms broadcast_var returns."""
    if v.dim() == 1 and v.shape[0] == D and K * P * D != D:
        return v.contiguous()
    if v.numel() == K * P * D:
        return v.reshape(K, P, D).contiguous()
    return v.reshape(P, D).contiguous()


# The cpp kernels give each OpenMP task CPP_ROWS_PER_TASK rows of x with all K
# samples of them (so dx sums over K in registers). With fewer rows than that
# per thread (one example against K samples in evaluation, or x of shape
# (1, D) against a (B, D) output, where the B rows are K = B "samples" of one x
# row) most threads would idle: then x is copied per sample, which costs one
# extra pass over a K x P x D buffer, and the K * P rows become the tasks.
CPP_ROWS_PER_TASK = 16


# The folded layout is chosen for the threads a machine of this many cores would
# use, never for the threads of this run: folding changes the order in which dx
# and a per-row variance's gradient sum over K, and the bits must not depend on
# torch.set_num_threads (a DataLoader worker runs one thread, its parent several).
FOLD_FOR_THREADS = 16


def fold_samples(backend: str, out3: Tensor | tuple[int, int, int]) -> bool:
    """Whether to run (K, P, D) as (1, K * P, D) with x copied per sample
    (out3: the decoder output in the kernel layout, or that layout's shape):
    on cpp, when the x rows would give fewer tasks of CPP_ROWS_PER_TASK than the
    work has threads on a FOLD_FOR_THREADS-core machine. A function of the
    shape alone, and _C is asked only on the cpp backend (which has it)."""
    if backend != "cpp":
        return False
    K, P, D = out3 if isinstance(out3, tuple) else out3.shape
    if K < 2:
        return False
    min_work = _backend.MIN_WORK_PER_THREAD or _backend.cpp_module().MIN_WORK_PER_THREAD
    threads = min(FOLD_FOR_THREADS, K * P * D // min_work)
    return threads > 1 and P < CPP_ROWS_PER_TASK * threads


def folded(x2: Tensor, out3: Tensor, var_param: Tensor | None = None):
    """(x2, out3, var_param) of a (K, P, D) problem, var_param in a kernel_var
    form, as a (1, K * P, D) problem; per-row gradients come back through
    unfold_rows."""
    K, P, D = out3.shape
    # expand-then-reshape copies only when P > 1: with one row (one example
    # against K samples) it is a stride-0 view, which the kernels refuse, so
    # .contiguous() makes the per-sample copy in that case too
    if var_param is not None and var_param.dim() == 3:  # per element
        var_param = var_param.reshape(1, K * P, D)
    elif var_param is not None and var_param.dim() == 2:  # per x row: now per sample and row
        var_param = var_param.expand(K, P, D).reshape(K * P, D).contiguous()
    return x2.expand(K, P, D).reshape(K * P, D).contiguous(), out3.reshape(1, K * P, D), var_param


def unfold_rows(t: Tensor, K: int, P: int) -> Tensor:
    """A per-row gradient (K * P, D) of a folded problem summed back to (P, D)."""
    return t.reshape(K, P, t.shape[-1]).sum(0)


_HALF = (torch.bfloat16, torch.float16)


def likelihood_torch_ops(x: Tensor, out: Tensor, *others: Tensor, half_out: bool = False):
    """_backend.torch_ops(out) for a likelihood op whose x is broadcast_x's
    result, or None where the folded layout (few x rows against many samples)
    applies: that stays with the op's Function. With ``half_out`` the
    operator also reads a bfloat16 / float16 ``out`` against float32 x (and
    ``others``), as autocast's decoder gives it."""
    if (half_out and out.dtype in _HALF and x.dtype is torch.float32 and type(out) is Tensor
            and out.device.type == "cpu"):
        ops = _backend.torch_ops(x, *others)
    else:
        ops = _backend.torch_ops(out, x, *others)
    if ops is None or x.dim() == out.dim():
        return ops
    return None if fold_samples("cpp", kernel_shape(x, out)) else ops


# -- the location-scale likelihoods' front ends (gaussian_log_prob, laplace_log_prob) --
# Each takes x (P, D), a decoder output (K, P, D) and its scale parameter in a
# kernel_var form, in the kernels' dtypes; their kernels take the arguments
# (x, out, param, *extra, out) forward and (grad_out, x, out, param, *extra,
# dx, dout, dparam) backward, named by the op.


def launch_forward(backend: str, kernel: str, dtype: torch.dtype, x: Tensor, out: Tensor, param: Tensor,
                   names: tuple[str, str], **extra) -> Tensor:
    """The (K, P) log-likelihood of ``out`` (K, P, D) and ``param`` (named
    ``names`` in the kernel's arguments) at x (P, D), in ``dtype``: one
    launch of ``kernel``, on the folded problem where fold_samples says so."""
    K, P, _ = out.shape
    if fold_samples(backend, out):
        x, out, param = folded(x, out, param)
    result = _backend.empty_output(out.shape[:2], like=out, dtype=dtype)
    _backend.launch(backend, kernel, out.numel(), x=x, **{names[0]: out, names[1]: param}, **extra, out=result)
    return result.view(K, P)


def launch_backward(backend: str, kernel: str, grad_out: Tensor, x: Tensor, out: Tensor, param: Tensor,
                    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype], need_dx: bool, need_dparam: bool,
                    names: tuple[str, str], **extra) -> list[Tensor]:
    """[dout], then dx if need_dx, then dparam if need_dparam, in the shapes of
    out, x and param (launch_forward's layout) and in ``dtypes`` (x's, out's,
    param's as the caller got them): one launch of ``kernel``. A gradient not
    asked for is not computed or allocated (x's gradient is summed over K in
    the kernel; a fixed scale needs no gradient, which saves its reductions)."""
    K, P, D = out.shape
    x2, o3, p = x, out, param
    fold = fold_samples(backend, out)
    if fold:
        x2, o3, p = folded(x, out, param)
    dout = _backend.empty_output(o3.shape, like=out)
    dx = _backend.empty_output((o3.shape[1], D), like=x) if need_dx else None
    dp = _backend.empty_output(p.shape, like=param) if need_dparam else None
    out_name, param_name = names
    _backend.launch(
        backend, kernel, dout.numel(), grad_out=shaped(grad_out, o3.shape[:2]).contiguous(), x=x2,
        **{out_name: o3, param_name: p}, **extra, dx=dx, **{"d" + out_name: dout, "d" + param_name: dp},
    )
    grads = [_backend.in_dtype(dout.view(K, P, D) if fold else dout, dtypes[1])]
    if need_dx:
        grads.append(_backend.in_dtype(unfold_rows(dx, K, P) if fold else dx, dtypes[0]))
    if need_dparam:
        if fold and param.dim() == 2:  # per x row, unfolded per sample and row
            dp = unfold_rows(dp, K, P)
        grads.append(_backend.in_dtype(shaped(dp, param.shape), dtypes[2]))
    return grads


def location_scale_route(x: Tensor, out: Any, sample_shape: tuple[int, ...], batch_ndim: int, likelihood: str,
                         names: tuple[str, str], what: str, log_prob, packed=None) -> Tensor:
    """The decoder route of a location-scale likelihood (fastvae/_decoder.py):
    decode returns the location (unit scale) or a (location, scale
    parameter) pair, named ``names`` in messages; ``what`` names the location
    alone. Each is checked against x and its event flattened for
    ``log_prob(x, loc[, param])``. ``packed(x, loc, param, lead, events)``,
    where given, may take a pair in place of that (None: it does not)."""
    loc_name, param_name = names
    events, lead = x.dim() - batch_ndim, len(sample_shape) + batch_ndim
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(
                f"for likelihood={likelihood!r} decode returns the {what} or a ({loc_name}, {param_name}) pair, "
                f"got a sequence of {len(out)} items"
            )
        loc = check_output(loc_name, out[0], x, sample_shape, batch_ndim)
        param = out[1]
        if not isinstance(param, Tensor):
            raise TypeError(f"decode must return a tensor as the {param_name}, got {type(param).__name__}")
        if packed is not None and (result := packed(x, loc, param, lead, events)) is not None:
            return result
        if events > 1 and param.dim() > 1:  # a per-pixel or per-channel parameter: spread over the event
            param = flat(param.expand(loc.shape) if param.shape != loc.shape else param, lead, events)
        return log_prob(flat(x, batch_ndim, events), flat(loc, lead, events), param)
    loc = check_output(loc_name, out, x, sample_shape, batch_ndim)
    return log_prob(flat(x, batch_ndim, events), flat(loc, lead, events))


def flatten_event_args(event_dims: Any, x: Tensor, out_name: str, out: Tensor, scale: Tensor | float | None,
                       **params: Tensor | None) -> tuple[Tensor, Tensor, dict, torch.dtype]:
    """A location-scale likelihood's arguments checked and flattened: x, the
    decoder output ``out``, each of ``params`` given (not None) and ``scale``
    when it is a tensor (a float is a fixed scale) must be float tensors
    (checked in that order), ``out`` with an event dimension. Returns (x, out,
    params with "scale", their compute dtype), with the last ``event_dims``
    dimensions of each tensor merged into one (the event): ``out``'s event
    sets the shape; x and each tensor of params broadcast against ``out`` (a
    scalar stays a scalar); None and floats pass as they are. event_dims must
    be a positive int."""
    tensors = {"x": x, out_name: out}
    for name, t in params.items():
        if t is not None:
            tensors[name] = t
    params["scale"] = scale
    if isinstance(scale, Tensor):
        tensors["scale"] = scale
    _validate.float_tensors(**tensors)
    _validate.event_dim(out_name, out)
    dtype = _backend.compute_dtype(*tensors.values())
    if type(event_dims) is not int or event_dims < 1:  # True and 1.0 must not pass as 1
        event_dims = _validate.positive_int("event_dims", event_dims)
    if event_dims == 1:
        return x, out, params, dtype
    full = out.shape  # the shape everything broadcasts against, before it is flattened
    event = full[len(full) - event_dims:] if len(full) >= event_dims else None

    def flat_args(t: Tensor, name: str) -> Tensor:
        if t.numel() == 1 or t.dim() < event_dims or t.shape[t.dim() - event_dims:] != event:
            t = t.expand(torch.broadcast_shapes(t.shape, full)) if t.numel() != 1 else t.reshape(())
            if t.dim() == 0:
                return t
        return _validate.flatten_events(t, name, event_dims)

    x, out = flat_args(x, "x"), _validate.flatten_events(out, out_name, event_dims)
    return x, out, {n: flat_args(t, n) if isinstance(t, Tensor) else t for n, t in params.items()}, dtype


@functools.lru_cache(maxsize=64)
def fixed_param(D: int, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The (D,) scale parameter of a fixed scale, made once per shape: creating
    it cost as much as a small kernel on every call. Never written to: the ops
    only read it and it gets no gradient."""
    return torch.full((D,), value, dtype=dtype, device=device)


def fixed_scale(scale: float | None, factor: float, out: Tensor, dtype: torch.dtype) -> Tensor:
    """The (D,) parameter factor * log(scale) of a fixed float ``scale`` (1.0
    when None) for ``out`` (..., D), in the compute dtype (a bfloat16 decoder
    output does not round the scale): fixed_param's outside torch.compile,
    where it is a constant of the graph. A scale that is not a finite float >
    0 raises."""
    scale = 1.0 if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite float > 0 or a tensor, got {scale!r}")
    value = factor * math.log(scale)
    if _backend.compiling():  # a constant of the graph: nothing to cache
        return torch.full((out.shape[-1],), value, dtype=dtype, device=out.device)
    return fixed_param(out.shape[-1], value, dtype, out.device)


# -- the decoder output, before a likelihood op: its shape checked, its event flattened --

def check_output(name: str, out: Any, x: Tensor, sample_shape: tuple[int, ...], batch_ndim: int = 1) -> Tensor:
    """The decoder output ``name`` as a tensor of shape (*sample_shape, *x.shape),
    else a TypeError or ValueError naming it and the shape expected."""
    if not isinstance(out, Tensor):
        raise TypeError(f"decode must return a tensor as the {name}, got {type(out).__name__}")
    want = (*sample_shape, *x.shape)
    if tuple(out.shape) != want:
        raise ValueError(
            f"decode returned {'' if name == 'logits' else 'a '}{name} of shape {tuple(out.shape)}; expected {want} "
            f"(sample shape {sample_shape} followed by x's shape {tuple(x.shape)})."
            + decoder_shape_hint(x, sample_shape, batch_ndim, tuple(x.shape[batch_ndim:]))
        )
    return out


def flat_events(t: Tensor, lead: int) -> Tensor:
    """t with every dimension after the first ``lead`` merged into one: a view
    of a contiguous tensor (a conv decoder's output), a copy otherwise."""
    return t.reshape(*t.shape[:lead], -1)


def flat(t: Tensor, lead_dims: int, events: int) -> Tensor:
    """t (lead_dims dimensions, then an event of ``events`` dimensions) with the
    event as one dimension, as the likelihood kernels read it."""
    return t if events == 1 else flat_events(t, lead_dims)


# -- the location-scale likelihoods' own calls (a compiled graph's nodes) from plans --

_PLAN_DTYPES = (torch.float32, torch.float64)


class ScaleLikelihoodPlan:
    """The launches of one signature of a location-scale likelihood's own
    op calls (gaussian_log_prob's, laplace_log_prob's, as their Functions hand
    them to a compiled graph): x (P, D), the decoder output ``out`` (K, P,
    D) and its scale parameter (K, P, D), (P, D) or (D,), contiguous, of one
    float32 or float64 dtype, K P D > 0. The general launchers' variants
    on the same arguments: the forward kernel's (the op's triton.py
    forward_plan), and the backward's for each set of gradients asked for
    (_common.scale_backward_geometry, made at first use). A subclass names
    its kernels and passes their arguments (run_forward, run_backward)."""

    __slots__ = ("kern", "K", "P", "D", "dtype", "device", "layout", "out_like", "dout_like", "dx_like",
                 "dparam_like", "forward", "tile_counters", "_backward")
    MODULE = BACKWARD_KERNEL = ""  # the op's triton module and its backward kernel

    def __init__(self, out: Tensor, param: Tensor):
        kern = self.kern = _backend.triton_module(self.MODULE)
        common = _backend.triton_module("_common")
        (K, P, D), dtype, device = out.shape, out.dtype, out.device
        self.K, self.P, self.D, self.dtype, self.device = K, P, D, dtype, device
        self.layout, self.tile_counters = common.scale_layout(param), common.tile_counters
        self.out_like = template((K, P), dtype, device)
        self.dout_like = template(out.shape, dtype, device)
        self.dx_like = template((P, D), dtype, device)
        self.dparam_like = template(param.shape, dtype, device)
        self.forward = Launch(*self.forward_kernel(kern))
        self._backward: dict = {}

    def forward_kernel(self, kern) -> tuple:
        """(kernel, grid, meta) of the forward launch."""
        raise NotImplementedError

    @staticmethod
    def empty(like: Tensor) -> Tensor:
        """An output like the template ``like``: the op module's ``empty``
        (which the tests' fixture poisons)."""
        raise NotImplementedError

    def backward_meta(self, need_dparam: bool) -> dict:
        """The backward kernel's compile-time parameters beside the geometry's."""
        raise NotImplementedError

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds: the forward's and the backward's made so
        far (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *(b[0] for b in self._backward.values())]

    def backward(self, grad_out: Tensor, need_dx: bool, need_dparam: bool):
        """The backward's launch and buffers: (Launch, the kernel's (R, K,
        K_PER, SPLITS), grad_out contiguous, dout, dx (dout where not asked
        for), dparam (likewise), the splits' partial dx and dparam, the
        arrival counters)."""
        entry = self._backward.get((need_dx, need_dparam))
        if entry is None:
            common = _backend.triton_module("_common")
            g = common.scale_backward_geometry(self.K, self.P, self.D, self.layout, need_dx, need_dparam, self.dtype,
                                               self.device)
            acc = _backend.accumulation_dtype(self.dtype)
            launch = Launch(getattr(self.kern, self.BACKWARD_KERNEL), g.grid,
                            {**self.backward_meta(need_dparam), **g.meta})
            entry = self._backward[(need_dx, need_dparam)] = (
                launch, g.ints, template(g.part_dx_shape, acc, self.device),
                template(g.part_dparam_shape, acc, self.device), g.counters)
        launch, ints, part_dx_like, part_dparam_like, counters = entry
        empty = self.empty
        dout = empty(self.dout_like)
        return (launch, ints, grad_out if grad_out.is_contiguous() else grad_out.contiguous(), dout,
                empty(self.dx_like) if need_dx else dout, empty(self.dparam_like) if need_dparam else dout,
                empty(part_dx_like), empty(part_dparam_like), self.tile_counters(self.device, *counters))


def scale_likelihood_plan(plans: PlanCache, cls: type, x: Tensor, out: Tensor, param: Tensor, *options):
    """The plan (a ``cls``, kept in ``plans`` per signature and ``options``)
    of a call of a location-scale likelihood's ops themselves, x (P, D), out
    (K, P, D) and param in a kernel_var form, or None (the general launch,
    which on CUDA pays the launch geometry and Triton's binding of the
    arguments at every call): on the triton backend, outside autocast,
    contiguous float32 or float64 tensors of one dtype and device, no empty
    dimension."""
    device = out.device
    if (not _backend.op_plans_serve(device) or out.dtype not in _PLAN_DTYPES or out.dim() != 3
            or x.dtype is not out.dtype or param.dtype is not out.dtype or x.shape != out.shape[1:]
            or out.numel() == 0 or param.shape not in (out.shape, x.shape, out.shape[2:])
            or not (out.is_contiguous() and x.is_contiguous() and param.is_contiguous())
            or x.device != device or param.device != device):
        return None
    key = (out.shape, param.shape, out.dtype, device, *options)
    try:
        return plans[key]
    except KeyError:
        return plans.store(key, cls(out, param, *options))
