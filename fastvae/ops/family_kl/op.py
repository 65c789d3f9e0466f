"""family_kl's front end: the public function, the torch.library ops
fastvae::family_kl and fastvae::family_kl_backward, and their autograd
Function, whose double backward is autograd of the oracle's formula.

The closed-form KL of the latent families against a prior of their own
family (the Weibull's against a Weibull), or the Kumaraswamy's against a Beta (fastvae/latents.py's
LocationScale and Positive call it), fused:
one pass forward, one backward, with no full-size temporary."""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _backend, _validate
from ..._double_backward import replay_inputs
from ..._families import KL_FAMILIES
from ..._op import define, flat, run, shaped

# each family's parameters, in the order family_kl takes them: q's, and the prior's
PARAMETERS = {name: ("loc", "log_scale") for name in KL_FAMILIES}
PARAMETERS["exponential"] = ("log_rate",)
PARAMETERS["kumaraswamy"] = ("log_a", "log_b")
PARAMETERS["weibull"] = ("log_scale", "log_concentration")
PRIOR_PARAMETERS = dict(PARAMETERS, kumaraswamy=("log_alpha", "log_beta"))  # a Beta prior


def _forward(q_log_param: Tensor, q_loc: Tensor | None, p_log_param: Tensor, p_loc: Tensor | None,
             family: int, reduce: bool) -> Tensor:
    """kl (N,) (reduce) or (N, L) for q's parameters (N, L) and p's (N, L) or (L,), contiguous
    (the log-parameter first: the exponential has no location)."""
    backend = _backend.backend_for(q_log_param.device)
    dtype = _backend.compute_dtype(q_loc, q_log_param, p_loc, p_log_param)
    q_loc, q_log_param, p_loc, p_log_param = (_backend.kernel_input(backend, t, dtype)
                                              for t in (q_loc, q_log_param, p_loc, p_log_param))
    N = q_log_param.shape[0]
    kl = _backend.empty_output((N,) if reduce else q_log_param.shape, like=q_log_param, dtype=dtype)
    _backend.launch(backend, "family_kl_forward", q_log_param.numel(), q_loc=q_loc, q_log_param=q_log_param,
                    p_loc=p_loc, p_log_param=p_log_param, family=family, kl=kl)
    return kl


def _backward(grad_kl: Tensor, q_loc: Tensor | None, q_log_param: Tensor, p_loc: Tensor | None,
              p_log_param: Tensor, family: int, need_dp: bool) -> list[Tensor]:
    """[dq_log_param], with dq_loc first for a family with a location, then
    (need_dp) the prior's in the same order, each (N, L) (the prior's too,
    whatever its layout) in its input's dtype."""
    backend = _backend.backend_for(q_log_param.device)
    inputs = (q_loc, q_log_param, p_loc, p_log_param)
    dtype = _backend.compute_dtype(*inputs)
    q_loc_k, q_lp_k, p_loc_k, p_lp_k = (_backend.kernel_input(backend, t, dtype) for t in inputs)
    shape = q_log_param.shape

    def grad_for(t: Tensor | None, wanted: bool) -> Tensor | None:
        return _backend.empty_output(shape, like=q_lp_k) if t is not None and wanted else None

    grads = [grad_for(t, wanted) for t, wanted in zip(inputs, (True, True, need_dp, need_dp))]
    _backend.launch(
        backend, "family_kl_backward", q_log_param.numel(),
        grad_kl=_backend.kernel_input(backend, grad_kl, dtype).contiguous(), q_loc=q_loc_k, q_log_param=q_lp_k,
        p_loc=p_loc_k, p_log_param=p_lp_k, family=family,
        dq_loc=grads[0], dq_log_param=grads[1], dp_loc=grads[2], dp_log_param=grads[3],
    )
    return [_backend.in_dtype(g, t.dtype) for g, t in zip(grads, inputs) if g is not None]


def _backward_fake(grad_kl, q_loc, q_log_param, p_loc, p_log_param, family, need_dp):
    n = (1 if q_loc is None else 2) * (2 if need_dp else 1)
    return [torch.empty_like(q_log_param) for _ in range(n)]


family_kl_op = define(
    "family_kl(Tensor q_log_param, Tensor? q_loc, Tensor p_log_param, Tensor? p_loc, int family, bool reduce)"
    " -> Tensor",
    _forward,
    lambda q_log_param, q_loc, p_log_param, p_loc, family, reduce: q_log_param.new_empty(
        q_log_param.shape[:1] if reduce else q_log_param.shape,
        dtype=_backend.compute_dtype(q_loc, q_log_param, p_loc, p_log_param)),
)
family_kl_backward_op = define(
    "family_kl_backward(Tensor grad_kl, Tensor? q_loc, Tensor q_log_param, Tensor? p_loc, Tensor p_log_param,"
    " int family, bool need_dp) -> Tensor[]",
    _backward,
    _backward_fake,
)


def _double_backward(grad_kl: Tensor, family: int, inputs: tuple, needs: tuple) -> tuple:
    """create_graph=True: the gradient as autograd of the oracle's formula on
    the Function's inputs, in the accumulation dtype, so that a second
    derivative is exact (a declared use of the oracle: docs/architecture.md,
    "Layers")."""
    from .. import family_kl as oracle

    acc = _backend.compute_dtype(*inputs)
    cast = replay_inputs(*(None if t is None else t.to(acc) for t in inputs))
    with torch.enable_grad():
        terms = oracle.family_kl_terms(family, *cast)
        g = grad_kl.to(acc)
        g = g.unsqueeze(-1) if g.dim() < terms.dim() else g
        wanted = [c for c, n in zip(cast, needs) if n]
        grads = iter(torch.autograd.grad(terms, wanted, g.expand(terms.shape), create_graph=True,
                                         allow_unused=True))
    out = []
    for t, c, n in zip(inputs, cast, needs):
        if not n:
            out.append(None)
            continue
        d = next(grads)
        out.append((torch.zeros_like(c) if d is None else d).to(t.dtype))  # the uniform's location: zero
    return tuple(out)


class FamilyKL(torch.autograd.Function):
    """Autograd of fastvae::family_kl. The op takes q's parameters (N, L) and
    p's (N, L) or (L,), contiguous; made here once, and saved, so the backward
    reuses them; the inputs themselves are saved too, for a double backward."""

    @staticmethod
    def forward(ctx, family, reduce, q_loc, q_log_param, p_loc, p_log_param):
        q_shape = q_log_param.shape
        ctx.family, ctx.q_shape, ctx.p_shape = family, q_shape, p_log_param.shape
        q2 = [None if t is None else flat(t) for t in (q_loc, q_log_param)]
        p2 = prior_layout(p_loc, p_log_param, q_shape)
        ctx.save_for_backward(*q2, *p2, q_loc, q_log_param, p_loc, p_log_param)
        kl = run(family_kl_op, q2[1], q2[0], p2[1], p2[0], family, reduce)
        return shaped(kl, q_shape[:-1] if reduce else q_shape)

    @staticmethod
    def backward(ctx, grad_kl):
        saved = ctx.saved_tensors
        layout, inputs = saved[:4], saved[4:]
        needs = ctx.needs_input_grad[2:]
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            return (None, None, *_double_backward(grad_kl, ctx.family, inputs, needs))
        need_dp = needs[2] or needs[3]
        N, L = layout[1].shape
        g2 = shaped(grad_kl, (N,) if grad_kl.dim() < len(ctx.q_shape) else (N, L))
        grads = iter(run(family_kl_backward_op, g2, *layout, ctx.family, need_dp))
        out = []
        for i, t in enumerate(inputs):
            if t is None or (i >= 2 and not need_dp):
                out.append(None)
                continue
            d = next(grads)
            if not needs[i]:
                out.append(None)
            elif i < 2:
                out.append(shaped(d, ctx.q_shape))
            else:  # the prior's, summed back to its shape
                out.append(shaped(d, ctx.q_shape).sum_to_size(t.shape))
        return (None, None, *out)


def prior_layout(p_loc: Tensor | None, p_log_param: Tensor, q_shape: torch.Size) -> list:
    """The prior's parameters as the kernels take them: (L,) each when both
    are the same for every row (no copy: the kernels read them per column),
    else each expanded to q's shape and flattened to (N, L)."""
    params = [t for t in (p_loc, p_log_param) if t is not None]
    L = q_shape[-1]
    if all(all(n == 1 for n in t.shape[:-1]) for t in params):
        return [None if t is None else t.reshape(-1).expand(L).contiguous() for t in (p_loc, p_log_param)]
    return [None if t is None else flat(t.expand(q_shape)) for t in (p_loc, p_log_param)]


# -- public function -----------------------------------------------------------


def family_kl(family: str, q: tuple[Tensor, ...], p: tuple[Tensor, ...], *, reduce: bool = True) -> Tensor:
    """KL(q || p) in closed form between two distributions of one latent family.

    Args:
        family: "laplace", "uniform", "gumbel", "cauchy" (each given as
            (loc, log_scale), scale = exp(log_scale); the uniform on
            (loc, loc + scale)), "exponential" (given as (log_rate,)) or
            "kumaraswamy" (q given as (log_a, log_b), the prior a Beta given
            as (log_alpha, log_beta): Nalisnick and Smyth's series truncated
            at fastvae.latents.KUMARASWAMY_KL_TERMS terms) or "weibull"
            (given as (log_scale, log_concentration), against a Weibull:
            Bauckhage's closed form).
        q: the posterior's parameters, a tuple of tensors of one shape (..., L).
        p: the prior's parameters in the same order, each broadcastable to
            q's shape: per example (..., L), or one prior for every row (L,).
        reduce: True (the default) sums over the last dimension L; False
            gives the KL of each dimension, (..., L) (free bits).

    Returns:
        The KL, (...) or (..., L), in the compute dtype (float32 for half
        precision inputs). The uniform's is inf where q's support is not
        inside p's (its gradient there is 0), as torch.distributions'.
        Differentiable in every parameter of q and p; a create_graph=True
        gradient differentiates the formula again.
    """
    if family not in KL_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, KL_FAMILIES))}, got {family!r}")
    names, p_names = PARAMETERS[family], PRIOR_PARAMETERS[family]
    for who, params, want in (("q", q, names), ("p", p, p_names)):
        if not isinstance(params, (tuple, list)) or len(params) != len(want):
            raise ValueError(f"{who}: the {family} family takes ({', '.join(want)}), a tuple of "
                             f"{len(want)} tensor{'s' * (len(want) > 1)}, got {_describe(params)}")
    if not isinstance(reduce, bool):
        raise TypeError(f"reduce must be True or False, got {reduce!r}")
    tensors = {f"q's {n}": t for n, t in zip(names, q)} | {f"p's {n}": t for n, t in zip(p_names, p)}
    _validate.float_tensors(**tensors)
    q_lp = q[-1]
    _validate.event_dim(f"q's {names[-1]}", q_lp)
    if len(q) == 2:
        _validate.same_shape(**{f"q's {names[0]}": q[0], f"q's {names[1]}": q_lp})
    for n, t in zip(p_names, p):
        if not _validate.broadcasts_to(t.shape, q_lp.shape):
            raise ValueError(f"p's {n} of shape {tuple(t.shape)} does not broadcast to q's shape {tuple(q_lp.shape)}")
    q_loc, p_loc = (q[0], p[0]) if len(q) == 2 else (None, None)
    return FamilyKL.apply(KL_FAMILIES.index(family), reduce, q_loc, q_lp, p_loc, p[-1])


def _describe(params) -> str:
    if isinstance(params, (tuple, list)):
        return f"{len(params)} item{'s' * (len(params) != 1)}"
    return type(params).__name__
