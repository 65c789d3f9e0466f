"""What bernoulli_log_prob and continuous_bernoulli_log_prob share: the
forward and backward implementations of their ops, the ops' definitions and
the autograd Function around them. The two take the same arguments and
layout and differ only in the per-element formula, which lives in each
backend's kernels (kernels/_bernoulli_likelihood.py,
csrc/bernoulli_likelihood.h, fastvae/reference.py) and in the double backward
(fastvae/_double_backward.py). ``op`` below is the op's name; its kernels
are ``<op>_forward`` and ``<op>_backward`` in the registry.

Layout (fastvae/_likelihood_layout.py): x (P, D) broadcast over the decoder
samples of logits (K, P, D), never copied; the result is (K, P).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _backend
from ._likelihood_layout import fold_samples, folded, kernel_views, unfold_rows
from ._op import define, run, shaped


def forward(kernel: str, x: Tensor, logits: Tensor) -> Tensor:
    """``kernel``'s sum over D, shape (K, P), for x (P, D) and logits (K, P, D),
    both contiguous (kernel_views makes them so)."""
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
    that cost as much as a small kernel). Each gradient in its input's dtype."""
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
    layout; ``cpu``: the ops have C++ twins (csrc/torch_ops.cpp), which serve
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

    doc = f"Autograd of {op.name()} (fastvae/_bernoulli_likelihood.py)."
    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": module, "__qualname__": name,
        "forward": staticmethod(forward), "backward": staticmethod(backward),
    })
