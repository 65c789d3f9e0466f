"""The plans as graph ops: the triton backend's lean path under torch.compile.

Under torch.compile the objectives' steps before and after the decoder are
traced into the graph (fastvae/_opaque.py). On the triton backend they trace
into the ops of this module wherever the eager call would take the plans
(fastvae/_plan.py): the sampler (``plan_sample``) and the fused tail after
the decoder (``plan_elbo_tail``, ``plan_iwae_tail``), with a backward op each.
Each op's implementation looks its plan up by its arguments' metadata (the
shapes, strides, dtypes and device, and the options), makes it once as the
eager path does, and launches the plan's kernels directly (``_launch.Launch``).

So a compiled step's fastvae nodes run what an eager step's plans run, the
same kernels with the same arguments, bit for bit, and no more: Dynamo's
guards and the trace did the checks, the graph holds the decoder and the
autograd bookkeeping, and each node is one call from the graph into Python
that looks up a dict and launches. The general ops' implementations, which
the graph called before, choose a backend, lay out their inputs, plan the
kernels' geometry and go through Triton's general launcher on every call.

Under ``fastvae.set_compiled_nodes("triton_op")`` a graph traced on CUDA
calls each op's ``torch.library.triton_op`` twin instead (``TRITON_OPS``,
fastvae/_triton_ops.py): the same implementation, its plan's launches
through ``wrap_triton``, so that Inductor launches the kernels from its
generated code (``_node``, _op.graph_node).

Double backward (create_graph=True) is not supported by torch.compile's AOT
autograd; the eager plans replay the general composition for it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _backend, _op, _plan, _registry
from ._op import LIB

_FLOATS = (torch.float32, torch.float64)
_HALF = (torch.bfloat16, torch.float16)


# -- the sampler ----------------------------------------------------------------------


def _sample_plan(mu: Tensor, logvar: Tensor, k: int, with_ratio: bool, stop_score: bool,
                 z_dtype: torch.dtype) -> _plan.SamplePlan:
    """The SamplePlan of these arguments (k = 0: one sample, no sample dimension)."""
    key = ("plan_sample", mu.shape, mu.stride(), logvar.stride(), mu.dtype, mu.device, k, with_ratio, stop_score,
           z_dtype)
    plan = _plan.PLANS.get(key)
    if plan is None:
        plan = _plan.store(key, _plan.SamplePlan(mu.shape, mu.dtype, mu.device, k or None, with_ratio, stop_score,
                                                 z_dtype, _plan.in_stride(mu, logvar)))
    return plan


def _sample(mu: Tensor, logvar: Tensor, seed: Tensor, k: int, with_ratio: bool, stop_score: bool,
            z_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    plan = _sample_plan(mu, logvar, k, with_ratio, stop_score, z_dtype)
    mu2, lv2 = (mu, logvar) if plan.in_place else (mu.contiguous(), logvar.contiguous())
    z, kl = _plan.empty(plan.z_like), _plan.empty(plan.kl_like)
    ratio = _plan.empty(plan.ratio_like) if with_ratio else kl.new_empty((0,))
    if plan.forward is not None:
        plan.forward(mu2, lv2, seed, z, kl, ratio if with_ratio else kl, *plan.ints)
    else:
        plan.kern.sample_normal_forward(mu2, lv2, seed, 0, 0, 0, z.view(plan.K, plan.N, plan.L), kl,
                                        ratio if with_ratio else None)
    return z, kl, ratio


def _sample_fake(mu, logvar, seed, k, with_ratio, stop_score, z_dtype):
    lead = (k,) if k else ()
    batch = mu.shape[:-1]
    ratio = mu.new_empty((k or 1, *batch), dtype=z_dtype) if with_ratio else mu.new_empty((0,), dtype=z_dtype)
    return mu.new_empty((*lead, *mu.shape), dtype=z_dtype), mu.new_empty(batch, dtype=z_dtype), ratio


def _sample_backward(mu: Tensor, logvar: Tensor, seed: Tensor, grad_z: Tensor | None, grad_kl: Tensor | None,
                     grad_ratio: Tensor | None, k: int, with_ratio: bool, stop_score: bool,
                     z_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    plan = _sample_plan(mu, logvar, k, with_ratio, stop_score, z_dtype)
    mu2, lv2 = (mu, logvar) if plan.in_place else (mu.contiguous(), logvar.contiguous())
    dmu, dlogvar = _plan.empty(plan.mu_like), _plan.empty(plan.mu_like)
    if plan.N * plan.L == 0 or (grad_z is None and grad_kl is None and grad_ratio is None):
        return dmu.zero_(), dlogvar.zero_()
    grad_z = None if grad_z is None else grad_z.contiguous()
    run, part, counters, per_split, splits, K = plan.backward(grad_z is not None, grad_kl is not None,
                                                              grad_ratio is not None, False)
    run(mu2 if grad_z is None else grad_z, mu2 if grad_kl is None else grad_kl.contiguous(),
        mu2 if grad_ratio is None else grad_ratio.contiguous(), mu2, lv2, seed, dmu, dlogvar, part, counters,
        mu2, plan.N, plan.L, plan.N * plan.L, plan.in_stride, K, per_split, splits)
    return dmu, dlogvar


LIB.define("plan_sample(Tensor mu, Tensor logvar, Tensor seed, int k, bool with_ratio, bool stop_score,"
           " ScalarType z_dtype) -> (Tensor, Tensor, Tensor)")
LIB.define("plan_sample_backward(Tensor mu, Tensor logvar, Tensor seed, Tensor? grad_z, Tensor? grad_kl,"
           " Tensor? grad_ratio, int k, bool with_ratio, bool stop_score, ScalarType z_dtype) -> (Tensor, Tensor)")


class PlannedSample(torch.autograd.Function):
    """z, the KL and (with_ratio) the latent term of a SamplePlan, as graph ops."""

    @staticmethod
    def forward(ctx, mu, logvar, seed, k, with_ratio, stop_score, z_dtype):
        z, kl, ratio = _node("plan_sample", mu)(mu, logvar, seed, k, with_ratio, stop_score, z_dtype)
        ctx.save_for_backward(mu, logvar, seed)
        ctx.options = k, with_ratio, stop_score, z_dtype
        ctx.set_materialize_grads(False)
        return z, kl, ratio

    @staticmethod
    def backward(ctx, grad_z, grad_kl, grad_ratio):
        mu, logvar, seed = ctx.saved_tensors
        k, with_ratio, stop_score, z_dtype = ctx.options
        dmu, dlogvar = _node("plan_sample_backward", mu)(mu, logvar, seed, grad_z, grad_kl,
                                                          grad_ratio if with_ratio else None, k, with_ratio,
                                                          stop_score, z_dtype)
        return dmu, dlogvar, None, None, None, None, None


def sample(mu: Tensor, logvar: Tensor, seed: Tensor, k: int, with_ratio: bool, stop_score: bool,
           z_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(z, kl, the latent term or an empty tensor): what sample_normal (k = 0:
    one sample, no sample dimension) or sample_normal_with_ratio return, from
    the plan's kernels."""
    return PlannedSample.apply(mu, logvar, seed, k, with_ratio, stop_score, z_dtype)


def serves_sample(mu: Tensor, logvar: Tensor, z_dtype: torch.dtype) -> bool:
    """Whether the plan ops serve this draw (the eager plans' conditions):
    the triton backend, mu and logvar of one dtype and device, z in float32
    or float64 (a half-precision encoder under autocast draws a float32 z)."""
    return (_plan.ENABLED and mu.dtype is logvar.dtype and mu.device == logvar.device
            and z_dtype in _FLOATS and (mu.dtype is z_dtype or mu.dtype in _HALF)
            and mu.dim() > 0 and _backend.backend_for(mu.device, warn=False) == "triton")


# -- after the decoder ------------------------------------------------------------------


def _tail_plan(x: Tensor, out: Tensor, term: Tensor, likelihood: str, reduction: str, iwae: bool) -> _plan.TailPlan:
    key = ("plan_tail", iwae, x.shape, out.shape, out.dtype, term.shape, term.dtype, x.device, likelihood, reduction)
    plan = _plan.PLANS.get(key)
    if plan is None:
        batch = term.shape[1:] if iwae else term.shape
        P = batch.numel()
        K = term.shape[0] if iwae else 1
        plan = _plan.store(key, _plan.TailPlan(likelihood, K, P, x.numel() // P, term.dtype, x.device, reduction,
                                               batch, iwae, None, out.shape, out.dtype))
    return plan


def _elbo_tail(x: Tensor, out: Tensor, kl: Tensor, beta: float, likelihood: str, reduction: str) -> Tensor:
    plan = _tail_plan(x, out, kl, likelihood, reduction, False)
    return plan.log_prob(x, out.contiguous(), None, kl.contiguous(), plan.weight_bits(beta), plan.reduced)


def _elbo_tail_fake(x, out, kl, beta, likelihood, reduction):
    return kl.new_empty(() if reduction != "none" else kl.shape)


def _elbo_tail_backward(grad: Tensor, x: Tensor, out: Tensor, kl: Tensor, beta: float, likelihood: str,
                        reduction: str) -> tuple[Tensor, Tensor]:
    plan = _tail_plan(x, out, kl, likelihood, reduction, False)
    dkl = _plan.empty(kl)
    dout = plan.log_prob_backward(grad.contiguous(), x, out.contiguous(), None, dkl, plan.weight_bits(beta))
    return dout, dkl


LIB.define("plan_elbo_tail(Tensor x, Tensor out, Tensor kl, float beta, str likelihood, str reduction) -> Tensor")
LIB.define("plan_elbo_tail_backward(Tensor grad, Tensor x, Tensor out, Tensor kl, float beta, str likelihood,"
           " str reduction) -> (Tensor, Tensor)")


class PlannedElboTail(torch.autograd.Function):
    """reduce(log p(x | z) - beta kl) from a TailPlan's kernels, as graph ops."""

    @staticmethod
    def forward(ctx, x, out, kl, beta, likelihood, reduction):
        ctx.save_for_backward(x, out, kl)
        ctx.options = beta, likelihood, reduction
        return _node("plan_elbo_tail", x)(x, out, kl, beta, likelihood, reduction)

    @staticmethod
    def backward(ctx, grad):
        x, out, kl = ctx.saved_tensors
        dout, dkl = _node("plan_elbo_tail_backward", x)(grad, x, out, kl, *ctx.options)
        return None, dout, dkl, None, None, None


def _iwae_tail(x: Tensor, out: Tensor, latent: Tensor, likelihood: str, reduction: str,
               dreg: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    plan = _tail_plan(x, out, latent, likelihood, reduction, True)
    out, latent = out.contiguous(), latent.contiguous()
    lw = plan.log_prob(x, out, None, latent, _plan.ONE_BITS, False)
    value, lw_max, sumexp = plan.log_mean_exp(lw)
    scale = plan.dreg_weights(lw, lw_max, sumexp) if dreg else lw.new_empty((0,))
    return value, lw, lw_max, sumexp, scale


def _iwae_tail_fake(x, out, latent, likelihood, reduction, dreg):
    acc = _backend.accumulation_dtype(latent.dtype)
    P = math.prod(latent.shape[1:])  # (torch.Size.numel would specialize a symbolic batch)
    value = latent.new_empty(() if reduction != "none" else latent.shape[1:])
    return (value, torch.empty_like(latent), latent.new_empty((P,), dtype=acc), latent.new_empty((P,), dtype=acc),
            torch.empty_like(latent) if dreg else latent.new_empty((0,)))


def _iwae_tail_backward(grad: Tensor, x: Tensor, out: Tensor, lw: Tensor, lw_max: Tensor, sumexp: Tensor,
                        likelihood: str, reduction: str) -> tuple[Tensor, Tensor]:
    plan = _tail_plan(x, out, lw, likelihood, reduction, True)
    dlw = _plan.empty(lw)
    grad = grad.contiguous()
    plan.lme_backward[plan.reduced, False](lw, lw_max, sumexp, grad, grad, grad, dlw, dlw, plan.K, plan.P,
                                           plan.divisor)
    dout = plan.log_prob_backward(dlw, x, out.contiguous(), None, None, 0)
    return dout, dlw


LIB.define("plan_iwae_tail(Tensor x, Tensor out, Tensor latent, str likelihood, str reduction, bool dreg)"
           " -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
LIB.define("plan_iwae_tail_backward(Tensor grad, Tensor x, Tensor out, Tensor lw, Tensor lw_max, Tensor sumexp,"
           " str likelihood, str reduction) -> (Tensor, Tensor)")


class PlannedIwaeTail(torch.autograd.Function):
    """reduce(logmeanexp_k(log p(x | z) + latent_k)) from a TailPlan's
    kernels, as graph ops; with ``dreg`` also DReG's weights (no gradient),
    which the caller hooks on z and the latent term."""

    @staticmethod
    def forward(ctx, x, out, latent, likelihood, reduction, dreg):
        value, lw, lw_max, sumexp, scale = _node("plan_iwae_tail", x)(x, out, latent, likelihood, reduction, dreg)
        ctx.save_for_backward(x, out, lw, lw_max, sumexp)
        ctx.options = likelihood, reduction
        ctx.mark_non_differentiable(scale)
        return value, scale

    @staticmethod
    def backward(ctx, grad, _):
        x, out, lw, lw_max, sumexp = ctx.saved_tensors
        dout, dlatent = _node("plan_iwae_tail_backward", x)(grad, x, out, lw, lw_max, sumexp, *ctx.options)
        return None, dout, dlatent, None, None, None


def serves_tail(x: Tensor, out, term: Tensor, likelihood: str, iwae: bool) -> bool:
    """Whether the plan ops serve the tail (the eager tail plan's conditions):
    the triton backend, a likelihood with a fused tail (the registry's
    PLAN_TAILS) whose decoder output is one tensor of x's shape (with the
    samples in front for iwae; the tail reads it alone, with aux None:
    _spec.FusedTail), x of the latent term's dtype, without a
    gradient, and a non-empty batch. The shapes are compared as the trace
    knows them (symbolic under dynamic shapes): a comparison that would need
    a guard takes the general tail, so a dynamic batch stays dynamic."""
    if (not _plan.ENABLED or not isinstance(out, Tensor) or likelihood not in _registry.PLAN_TAILS
            or _backend.backend_for(x.device, warn=False) != "triton"
            or x.requires_grad or x.dtype is not term.dtype or term.dtype not in _FLOATS
            or not (out.dtype is term.dtype or out.dtype in _HALF) or out.device != x.device
            or term.device != x.device or term.dim() < (2 if iwae else 1)):
        return False
    batch = term.shape[1:] if iwae else term.shape
    want = (term.shape[0], *x.shape) if iwae else tuple(x.shape)
    # each condition on its own: sym_and, which would join them, is newer than torch 2.7
    return (len(batch) <= x.dim() and len(out.shape) == len(want)
            and all(statically_known_true(c) for c in (*(a == b for a, b in zip(x.shape, batch)),
                                                        *(a == b for a, b in zip(out.shape, want)),
                                                        x.numel() > 0)))


def elbo_tail(x: Tensor, out: Tensor, kl: Tensor, beta: float, likelihood: str, reduction: str) -> Tensor:
    """The ELBO's tail (one sample) from the plan's kernels: serves_tail says where."""
    return PlannedElboTail.apply(x, out, kl, beta, likelihood, reduction)


def iwae_tail(x: Tensor, out: Tensor, latent: Tensor, likelihood: str, reduction: str,
              dreg: bool) -> tuple[Tensor, Tensor]:
    """(the IWAE bound, DReG's weights or an empty tensor) from the plan's kernels."""
    return PlannedIwaeTail.apply(x, out, latent, likelihood, reduction, dreg)


for _name, _impl, _fake in (
        ("plan_sample", _sample, _sample_fake),
        ("plan_sample_backward", _sample_backward,
         lambda mu, logvar, *args: (torch.empty_like(mu), torch.empty_like(logvar))),
        ("plan_elbo_tail", _elbo_tail, _elbo_tail_fake),
        ("plan_elbo_tail_backward", _elbo_tail_backward,
         lambda grad, x, out, kl, *args: (torch.empty_like(out), torch.empty_like(kl))),
        ("plan_iwae_tail", _iwae_tail, _iwae_tail_fake),
        ("plan_iwae_tail_backward", _iwae_tail_backward,
         lambda grad, x, out, lw, *args: (torch.empty_like(out), torch.empty_like(lw)))):
    # the kernels run wherever the triton backend does: CUDA, and CPU tensors under the interpreter
    LIB.impl(_name, _impl, "CPU")
    LIB.impl(_name, _impl, "CUDA")
    torch.library.register_fake(f"fastvae::{_name}", _fake, lib=LIB)
    _op._IMPLS[getattr(torch.ops.fastvae, _name).default] = _impl  # the triton_op twin's body

# The ops above, each of which gets a torch.library.triton_op twin (fastvae/_triton_ops.py: the
# same implementation, its plan's launches through wrap_triton), as an op record's triton_ops
TRITON_OPS = ("plan_sample", "plan_sample_backward", "plan_elbo_tail", "plan_elbo_tail_backward", "plan_iwae_tail",
              "plan_iwae_tail_backward")


def _node(name: str, t: Tensor):
    """fastvae::<name>, or its triton_op twin where set_compiled_nodes chose it (_op.graph_node)."""
    return _op.graph_node(getattr(torch.ops.fastvae, name).default, (t,))
