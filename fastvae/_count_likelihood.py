"""What the count likelihoods (poisson_log_prob, negative_binomial_log_prob,
zinb_log_prob) share: their argument checks, the kernel layout, the forward and
backward implementations of their ops, and the double backward.

Layout (as the other likelihoods, fastvae/_likelihood_layout.py): x (..., D)
broadcasts against the decoder outputs (K, ..., D) without K copies; the ops
take x as (P, D), log_mean / log_rate and zi_logits as (K, P, D), and
log_theta as (K, P, D) per element or (D,) per gene (scVI's ``dispersion="gene"``,
also a scalar spread over D), whose gradient is then summed over every row in
the kernel and whose lgamma/digamma terms are computed once per x row, not
per sample. Other broadcasts of log_theta or zi_logits are materialized with
``expand`` (autograd sums their gradients back).

Counts x get no gradient (a count is data, not a parameter): a float x that
requires grad is read as a constant. Integer x (int64 counts) is accepted and
read in the parameters' compute dtype; bool is refused. A negative or NaN count
raises (value check: on CPU at every call, on CUDA at the first). Non-integer
counts warn by the same rule (each likelihood in its own slot): they still give
the continuous extension through lgamma (scvi-tools does the same), a finite
number that is no likelihood of normalized or log-transformed data.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _backend, _validate, _value_checks
from ._likelihood_layout import _strip_leading_ones, fold_samples, folded, kernel_views
from ._validate import broadcasts_to

# op -> (its decoder-output argument names after x, in kernel order)
PARAMS = {
    "poisson_log_prob": ("log_rate",),
    "negative_binomial_log_prob": ("log_mean", "log_theta"),
    "zinb_log_prob": ("log_mean", "log_theta", "zi_logits"),
}


# -- the public boundary --------------------------------------------------------------


def check_counts(x: Tensor, name: str = "x", likelihood: str = "poisson") -> None:
    """The count likelihoods' data check (_value_checks.count_data): negative
    counts raise, non-integer ones warn, in ``likelihood``'s own slot."""
    _value_checks.count_data(x, name, likelihood)


def counts_as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Integer counts in the parameters' compute dtype; float x as it is."""
    return x.to(dtype) if not x.is_floating_point() else x


def check_inputs(x: Tensor, **params: Tensor) -> None:
    """Types, devices and the event dimension; x may be an integer tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"x must hold counts as an integer or floating-point tensor, got dtype {x.dtype}")
    _validate.float_tensors(**params)
    first = next(iter(params.values()))
    if x.device != first.device:
        raise ValueError(f"device mismatch: x is on {x.device}, {next(iter(params))} is on {first.device}")
    _validate.event_dim(next(iter(params)), first)  # the others broadcast against it (a scalar theta too)


def broadcast_param(t: Tensor, name: str, out: Tensor, out_name: str, per_gene: bool) -> Tensor:
    """t against the decoder output ``out``: out's shape (per element), or,
    with per_gene, a (D,) vector when t is one (or a scalar, spread over D)."""
    if not broadcasts_to(t.shape, out.shape):
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast against {out_name} of shape "
                         f"{tuple(out.shape)}")
    if t.shape == out.shape:
        return t
    if per_gene:
        t_min = _strip_leading_ones(t, 1)
        if t_min.dim() <= 1:
            return t_min.reshape(-1).expand(out.shape[-1]) if t_min.numel() == 1 else t_min
    return t.expand(out.shape)


def flatten_param(t: Tensor, out: Tensor, event_dims: int) -> Tensor:
    """A parameter broadcast to out's event shape and flattened like it."""
    if t.dim() >= event_dims and t.shape[t.dim() - event_dims:] == out.shape[out.dim() - event_dims:]:
        return _validate.flatten_events(t, "param", event_dims)
    lead = t.shape[:max(t.dim() - event_dims, 0)]
    full = t.expand(*torch.broadcast_shapes(t.shape, (*lead, *out.shape[out.dim() - event_dims:])))
    return _validate.flatten_events(full, "param", event_dims)


# -- the kernel layout -----------------------------------------------------------------


def theta_is_per_gene(lt: Tensor, lm: Tensor) -> bool:
    return lt.dim() == 1 and lt.shape != lm.shape


def kernel_layout(x: Tensor, lm: Tensor, lt: Tensor | None, zl: Tensor | None):
    """(x (P, D), lm (K, P, D), lt (K, P, D) or (D,), zl (K, P, D)), contiguous."""
    x2, lm3 = kernel_views(x, lm)
    K, P, D = lm3.shape
    if lt is not None:
        lt = lt.contiguous() if theta_is_per_gene(lt, lm) else lt.contiguous().view(K, P, D)
    if zl is not None:
        zl = zl.contiguous().view(K, P, D)
    return x2, lm3, lt, zl


def _args(op: str, x, lm, lt, zl) -> dict:
    names = PARAMS[op]
    values = (lm, lt, zl)[:len(names)]
    return dict(x=x, **dict(zip(names, values)))


def forward(op: str, x: Tensor, lm: Tensor, lt: Tensor | None, zl: Tensor | None) -> Tensor:
    """The op's implementation: log p (K, P) in the compute dtype for the kernel layout."""
    backend = _backend.backend_for(lm.device)
    dtype = _backend.compute_dtype(x, lm, lt, zl)
    x, lm, lt, zl = (_backend.kernel_input(backend, t, dtype) for t in (x, lm, lt, zl))
    K, P, D = lm.shape
    if fold_samples(backend, lm):  # few x rows, many samples: the K * P rows are the tasks
        x, lm_f, lt_f = folded(x, lm, lt)
        zl_f = None if zl is None else zl.reshape(1, K * P, D)
        out = _backend.empty_output((1, K * P), like=lm, dtype=dtype)
        _backend.launch(backend, f"{op}_forward", lm.numel(), **_args(op, x, lm_f, lt_f, zl_f), out=out)
        return out.view(K, P)
    out = _backend.empty_output((K, P), like=lm, dtype=dtype)
    _backend.launch(backend, f"{op}_forward", lm.numel(), **_args(op, x, lm, lt, zl), out=out)
    return out


def backward(op: str, grad_out: Tensor, x: Tensor, lm: Tensor, lt: Tensor | None, zl: Tensor | None,
             needs: tuple[bool, ...]) -> list[Tensor]:
    """The gradients of the parameters that ``needs`` asks for (in PARAMS order),
    each in its input's dtype and kernel-layout shape."""
    backend = _backend.backend_for(lm.device)
    dtype = _backend.compute_dtype(x, lm, lt, zl)
    inputs = (lm, lt, zl)[:len(PARAMS[op])]
    dtypes = [t.dtype for t in inputs]
    x, lm, lt, zl = (_backend.kernel_input(backend, t, dtype) for t in (x, lm, lt, zl))
    g = _backend.kernel_input(backend, grad_out, dtype)
    K, P, D = lm.shape
    args = (x, lm, lt, zl)
    if fold_samples(backend, lm):
        x_f, lm_f, lt_f = folded(x, lm, lt)
        args = (x_f, lm_f, lt_f, None if zl is None else zl.reshape(1, K * P, D))
    shapes = [args[1].shape, None if lt is None else args[2].shape, None if zl is None else args[3].shape]
    grads = [_backend.empty_output(shapes[i], like=args[1], dtype=dtype) if needs[i] else None
             for i in range(len(inputs))]
    names = ["d" + n for n in PARAMS[op]]
    _backend.launch(backend, f"{op}_backward", lm.numel(), grad_out=g.reshape(args[1].shape[:2]).contiguous(),
                    **_args(op, *args), **dict(zip(names, grads)))
    out = []
    for i, t in enumerate(grads):
        if t is not None:
            if t.shape != inputs[i].shape:
                t = t.view(inputs[i].shape)
            out.append(_backend.in_dtype(t, dtypes[i]))
    return out


def fake_backward(op: str):
    """The backward op's fake: the gradients asked for, each like its input."""
    def fake(grad_out, x, *rest):
        n = len(PARAMS[op])
        params, needs = rest[:n], rest[n:]
        return [torch.empty_like(t) for t, need in zip(params, needs) if need]
    return fake


def fake_forward(x: Tensor, lm: Tensor, *rest: Tensor) -> Tensor:
    return lm.new_empty(lm.shape[:2], dtype=_backend.compute_dtype(x, lm, *rest))


# -- double backward -------------------------------------------------------------------


def double_backward(op: str, grad_out: Tensor, x: Tensor, params: tuple[Tensor, ...], needs) -> tuple:
    """create_graph=True: the gradient as autograd of the float64-capable
    reference formula (fastvae/reference.py, the same stable forms as the
    kernels) on the Function's inputs, so a second derivative is exact: a
    declared use of the reference layer (docs/architecture.md, "Layers";
    tests/test_layers.py), tested against gradgradcheck and closed forms."""
    from . import reference

    acc = _backend.compute_dtype(x, *params)
    cast = [p.to(acc) for p in params]
    with torch.enable_grad():
        value = getattr(reference, op)(x.detach().to(acc), *cast)
        wanted = [c for c, n in zip(cast, needs) if n]
        grads = iter(torch.autograd.grad(value, wanted, grad_out.to(acc), create_graph=True))
    return tuple(next(grads).to(p.dtype) if n else None for p, n in zip(params, needs))


# -- likelihood= in the objectives and the evaluation (fastvae/_decoder.py) ----------------

_OUTPUTS = {"poisson": ("log_rate",), "negative_binomial": ("log_mean", "log_theta"),
            "zinb": ("log_mean", "log_theta", "zi_logits")}


def from_distribution(base) -> tuple[str, Any] | None:
    """(likelihood, decoder output) of a torch Poisson or NegativeBinomial
    (NB's total_count is theta and its logits log mu - log theta), else None."""
    from torch.distributions import NegativeBinomial, Poisson

    if type(base) is Poisson:
        return "poisson", torch.log(base.rate)
    if type(base) is NegativeBinomial:
        log_theta = torch.log(torch.as_tensor(base.total_count, dtype=base.logits.dtype, device=base.logits.device))
        return "negative_binomial", (base.logits + log_theta, log_theta)
    return None


def decoder_log_prob(x: Tensor, out: Any, likelihood: str, sample_shape: tuple[int, ...], events: int,
                     check_output, log_prob) -> Tensor:
    """log p(x | z) for a count likelihood from what decode returned: the log
    rate ("poisson"), (log mean, log theta) ("negative_binomial") or (log mean,
    log theta, zero-inflation logits) ("zinb"); log mean / log rate has the
    shape (*sample_shape, *x.shape) (``check_output``, _decoder's check), the
    others broadcast against it (log theta per gene: shape x.shape[-1:]).
    ``log_prob`` is the op's unchecked function (``poisson_log_prob_unchecked``
    etc.): the caller, a layer above the ops, passes it in, so that this module
    (below them) imports none of them."""
    names = _OUTPUTS[likelihood]
    items = (out,) if len(names) == 1 else out
    if len(names) > 1 and (not isinstance(out, (tuple, list)) or len(out) != len(names)):
        got = f"a sequence of {len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ValueError(f"for likelihood={likelihood!r} decode returns ({', '.join(names)}), got {got}")
    first = check_output(names[0], items[0], x, sample_shape)
    for name, t in zip(names[1:], items[1:]):
        if not isinstance(t, Tensor):
            raise TypeError(f"decode must return a tensor as the {name}, got {type(t).__name__}")
    check_inputs(x, **dict(zip(names, (first, *items[1:]))))
    check_counts(x, f"x (likelihood={likelihood!r})", likelihood)
    return log_prob(x, first, *items[1:], events)
