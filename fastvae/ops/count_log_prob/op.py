"""The count likelihoods' front end: the public functions poisson_log_prob,
negative_binomial_log_prob and zinb_log_prob, their torch.library ops
(fastvae::<op> and fastvae::<op>_backward) and autograd Functions, and what
the three share: their argument checks, the kernel layout, the forward and
backward implementations of their ops, the double backward, and the route of
likelihood="poisson" / "negative_binomial" / "zinb" (decoder_log_prob and
from_distribution, which fastvae/_decoder.py calls).

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

from ... import _backend, _validate, _value_checks
from ..._double_backward import replay_inputs
from ..._launch import Launch, PlanCache, template
from ..._likelihood_layout import _strip_leading_ones, broadcast_x, check_output, fold_samples, folded, kernel_views
from ..._op import define, run, shaped
from ..._validate import broadcasts_to

# op -> (its decoder-output argument names after x, in kernel order)
PARAMS = {
    "poisson_log_prob": ("log_rate",),
    "negative_binomial_log_prob": ("log_mean", "log_theta"),
    "zinb_log_prob": ("log_mean", "log_theta", "zi_logits"),
}


# -- the public boundary --------------------------------------------------------------


def check_counts(x: Tensor, name: str = "x", likelihood: str = "poisson") -> None:
    """Raise for a negative or NaN count among the values read (the result
    would be NaN: lgamma(x + 1) of a negative x); warn, in ``likelihood``'s
    own slot, for a non-integer one (normalized or log1p-transformed
    expression gives a finite number that is no likelihood of the data, which
    torch's ``Poisson(validate_args=True)`` refuses)."""
    kind = f"{likelihood} data"
    if not _value_checks.should_check(kind, x):
        return
    p = _value_checks.prefix(x)
    lo = torch.min(p).item()
    if not lo >= 0:  # also NaN
        raise ValueError(f"{name} must hold counts >= 0 (the count likelihoods' data), got a value of {lo:.3g}")
    if x.is_floating_point() and bool(torch.any(p != torch.round(p))):
        frac = p[p != torch.round(p)][0].item()
        _value_checks.warn(kind,
            f"{name} holds a non-integer value ({frac:.4g}): likelihood={likelihood!r} is a distribution of "
            f"counts, so normalized or log-transformed data gives a number that is no log-likelihood. Pass the "
            f"raw counts (e.g. adata.layers['counts'] in scanpy), or use likelihood='gaussian' for "
            f"continuous data")


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


# The plans of the ops' own calls (a compiled graph's nodes) on the triton
# backend, per signature (bounded: fastvae._launch.PlanCache); ENABLED False
# sends every call the general way (the tests compare the two); ``empty``
# allocates each output like a template the plan holds (the tests' fixture may
# poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
_DTYPES = (torch.float32, torch.float64)
# each op's formula (triton.py's POISSON, NB, ZINB)
KINDS = {"poisson_log_prob": 0, "negative_binomial_log_prob": 1, "zinb_log_prob": 2}


class CountPlan:
    """The launches of one signature of a count likelihood's own op calls: x
    (P, D), the log mean (K, P, D), log theta (K, P, D) or (D,) per gene
    and the zero-inflation logits (K, P, D) as the op has them, contiguous,
    of one float32 or float64 dtype, K P D > 0. The general launchers'
    variants (triton.py's forward_plan, backward_plan) on the same
    arguments: the forward's, and the backward's for each set of gradients
    asked for (made at first use)."""

    __slots__ = ("kind", "K", "P", "D", "dtype", "device", "theta_dim", "out_like", "lm_like", "lt_like",
                 "forward", "forward_ints", "_backward")

    def __init__(self, kind: int, lm: Tensor, lt: Tensor | None):
        kern = _backend.triton_module("count_log_prob")
        (K, P, D), dtype, device = lm.shape, lm.dtype, lm.device
        self.kind, self.K, self.P, self.D, self.dtype, self.device = kind, K, P, D, dtype, device
        self.theta_dim = lt is not None and lt.dim() == 1
        self.out_like = template((K, P), dtype, device)
        self.lm_like = template(lm.shape, dtype, device)  # dlog_mean's and dzi_logits'
        self.lt_like = None if lt is None else template(lt.shape, dtype, device)
        grid, meta = kern.forward_plan(kind, K, P, D, dtype, device, self.theta_dim)
        self.forward, self.forward_ints = Launch(kern._count_fwd_kernel, grid, meta), (P, K * P, D)
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds: the forward's and the backward's made so
        far (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *(b[0] for b in self._backward.values())]

    def run_forward(self, x: Tensor, lm: Tensor, lt: Tensor | None, zl: Tensor | None) -> Tensor:
        """forward's log p (K, P), launched from the plan."""
        out = empty(self.out_like)  # a pointer a kernel never reads stands for an absent parameter: lm
        self.forward(x, lm, lm if lt is None else lt, lm if zl is None else zl, out, *self.forward_ints)
        return out

    def run_backward(self, grad_out: Tensor, x: Tensor, lm: Tensor, lt: Tensor | None, zl: Tensor | None,
                     needs: tuple[bool, ...]) -> list[Tensor]:
        """backward's gradients, those ``needs`` asks for in PARAMS order, launched from the plan."""
        has = (*needs, False, False)[:3]
        entry = self._backward.get(has)
        if entry is None:
            kern = _backend.triton_module("count_log_prob")
            grid, meta, row_tiles, part_shape, counters = kern.backward_plan(
                self.kind, self.K, self.P, self.D, self.dtype, self.device, self.theta_dim, *has)
            entry = self._backward[has] = (Launch(kern._count_bwd_kernel, grid, meta), row_tiles,
                                           template(part_shape, _backend.accumulation_dtype(self.dtype),
                                                    self.device), counters, kern.tile_counters)
        launch, row_tiles, part_like, counters, tile_counters = entry
        grads = [empty(like) if need else None for like, need in zip((self.lm_like, self.lt_like, self.lm_like), has)]
        dlm, dlt, dzl = (lm if t is None else t for t in grads)
        g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()  # (K, P) in any shape: read flat
        launch(g, x, lm, lm if lt is None else lt, lm if zl is None else zl, dlm, dlt, empty(part_like),
               tile_counters(self.device, *counters), dzl, self.P, self.K * self.P, self.D, row_tiles)
        return [t for t in grads if t is not None]


def _op_plan(op: str, x: Tensor, lm: Tensor, lt: Tensor | None, zl: Tensor | None) -> CountPlan | None:
    """The plan of a call of ``op``'s ops themselves (its Function hands them
    the kernel layout, as a compiled graph calls them), or None (the general
    launch, which on CUDA pays the launch geometry and Triton's binding of the
    arguments at every call): on the triton backend, outside autocast,
    contiguous float32 or float64 tensors of one dtype and device, log theta
    per element or per gene, no empty dimension."""
    device = lm.device
    if (not ENABLED or not _backend.op_plans_serve(device) or lm.dtype not in _DTYPES or lm.dim() != 3
            or x.dtype is not lm.dtype or x.shape != lm.shape[1:] or lm.numel() == 0 or not lm.is_contiguous()
            or not x.is_contiguous() or x.device != device):
        return None
    for t in (lt, zl):
        if t is not None and (t.dtype is not lm.dtype or t.device != device or not t.is_contiguous()):
            return None
    if (lt is not None and lt.shape not in (lm.shape, lm.shape[2:])) or (zl is not None and zl.shape != lm.shape):
        return None
    key = (op, lm.shape, None if lt is None else lt.shape, lm.dtype, device)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, CountPlan(KINDS[op], lm, lt))


def forward(op: str, x: Tensor, lm: Tensor, lt: Tensor | None, zl: Tensor | None) -> Tensor:
    """The op's implementation: log p (K, P) in the compute dtype for the kernel
    layout; from a plan where _op_plan takes the call (a compiled graph's
    node on CUDA)."""
    if (plan := _op_plan(op, x, lm, lt, zl)) is not None:
        return plan.run_forward(x, lm, lt, zl)
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
    each in its input's dtype and kernel-layout shape; from a plan as the
    forward's."""
    if grad_out.dtype is lm.dtype and (plan := _op_plan(op, x, lm, lt, zl)) is not None:
        return plan.run_backward(grad_out, x, lm, lt, zl, needs)
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
    oracle formula (this folder's __init__.py, the same stable forms as the
    kernels) on the Function's inputs, so a second derivative is exact: a
    declared use of the oracle (docs/architecture.md, "Layers";
    tests/test_layers.py), tested against gradgradcheck and closed forms."""
    from .. import count_log_prob as oracle

    acc = _backend.compute_dtype(x, *params)
    cast = replay_inputs(*(p.to(acc) for p in params))
    with torch.enable_grad():
        value = getattr(oracle, op)(x.detach().to(acc), *cast)
        wanted = [c for c, n in zip(cast, needs) if n]
        grads = iter(torch.autograd.grad(value, wanted, grad_out.to(acc), create_graph=True))
    return tuple(next(grads).to(p.dtype) if n else None for p, n in zip(params, needs))


# -- likelihood= in the objectives and the evaluation (fastvae/_decoder.py) ----------------

_OUTPUTS = {"poisson": ("log_rate",), "negative_binomial": ("log_mean", "log_theta"),
            "zinb": ("log_mean", "log_theta", "zi_logits")}


# The named decoder outputs: a dict whose keys say each parameter's form, so a
# theta is never read as a log theta (any real number is a valid log theta,
# and most thetas are too: no check of the values can tell the two apart).
# Per likelihood, each parameter's (log form, natural form or None), in the
# order of the tuple form's items.
NAMED = {
    "poisson": (("log_rate", "rate"),),
    "negative_binomial": (("log_mean", "mean"), ("log_theta", "theta")),
    "zinb": (("log_mean", "mean"), ("log_theta", "theta"), ("zi_logits", None)),
}


def _named_likelihood(keys: set) -> str | None:
    """The count likelihood a dict's keys imply (zi_logits: zinb; a theta: NB; a rate: Poisson)."""
    if "zi_logits" in keys:
        return "zinb"
    if keys & {"theta", "log_theta"}:
        return "negative_binomial"
    if keys & {"rate", "log_rate"}:
        return "poisson"
    return None


def from_named(out: dict, likelihood: str | None, what: str = "decode(z)[{key!r}]") -> tuple[str, Any]:
    """(likelihood, the tuple form's output) of a dict of named parameters:
    "log_mean" or "mean", "log_theta" or "theta", "log_rate" or "rate",
    "zi_logits"; a natural form is logged here (a theta or rate <= 0, a mean
    < 0, raise by name: ``what``, formatted with the key). likelihood=None:
    the keys imply it."""
    keys = set(out)
    if likelihood is None:
        likelihood = _named_likelihood(keys)
    if likelihood not in NAMED:
        raise ValueError(f"decode returned a dict (named parameters) with keys {sorted(keys)}: named outputs are "
                         f"the count likelihoods' ('poisson': log_rate or rate; 'negative_binomial': log_mean or "
                         f"mean, log_theta or theta; 'zinb': those and zi_logits), got likelihood={likelihood!r}")
    forms = NAMED[likelihood]
    allowed = [n for form in forms for n in form if n is not None]
    if unknown := sorted(keys - set(allowed)):
        raise ValueError(f"decode returned a dict with keys {unknown} that likelihood={likelihood!r} does not take; "
                         f"its keys are {allowed} (one of each pair)")
    items = []
    for log_name, name in forms:
        given = [n for n in (log_name, name) if n is not None and n in out]
        if len(given) != 1:
            choice = f"exactly one of {log_name!r} or {name!r}" if name else repr(log_name)
            raise ValueError(f"decode's dict for likelihood={likelihood!r} must hold {choice}, "
                             f"got {given or 'neither'}")
        (key,) = given
        t = out[key]
        if not isinstance(t, Tensor):
            raise TypeError(f"decode must return a tensor as {key!r}, got {type(t).__name__}")
        if key == name:  # the natural form, logged
            _value_checks.positive_param(t, f"{what.format(key=key)} (likelihood={likelihood!r})",
                                         zero_ok=key == "mean")
            t = torch.log(t)
        items.append(t)
    return likelihood, items[0] if len(items) == 1 else tuple(items)


# scvi-tools' distributions (duck-typed: scvi-tools is not a dependency): the
# class name -> (likelihood, the parameter attributes read, in NAMED's order)
_SCVI = {
    "Poisson": ("poisson", ("rate",)),
    "NegativeBinomial": ("negative_binomial", ("mu", "theta")),
    "ZeroInflatedNegativeBinomial": ("zinb", ("mu", "theta", "zi_logits")),
}


def _from_scvi(base) -> tuple[str, Any] | None:
    """(likelihood, decoder output) of scvi-tools' Poisson, NegativeBinomial or
    ZeroInflatedNegativeBinomial (scvi.distributions), read through their
    parameters (mu, theta: the mean and inverse dispersion; zi_logits); None for
    a class from elsewhere; a TypeError naming scvi-tools for its other classes."""
    cls = type(base)
    if cls.__module__.split(".")[0] != "scvi":
        return None
    if cls.__name__ not in _SCVI:
        raise TypeError(f"decode returned scvi-tools' {cls.__name__} ({cls.__module__}); fastvae reads scvi-tools' "
                        f"{', '.join(_SCVI)} through their parameters. For this one, return its parameters "
                        f"with a likelihood= name (docs/likelihoods.md), or compute the loss with its log_prob")
    likelihood, attributes = _SCVI[cls.__name__]
    params = {}
    for attribute, (log_name, name) in zip(attributes, NAMED[likelihood]):
        value = getattr(base, attribute, None)
        if not isinstance(value, Tensor):
            raise TypeError(f"decode returned scvi-tools' {cls.__name__} whose {attribute} is "
                            f"{type(value).__name__}, not a tensor; fastvae reads its {', '.join(attributes)}")
        params[name or log_name] = value
    return from_named(params, likelihood, f"the {{key}} of scvi-tools' {cls.__name__}")


def from_distribution(base) -> tuple[str, Any] | None:
    """(likelihood, decoder output) of a torch Poisson or NegativeBinomial
    (NB's total_count is theta and its logits log mu - log theta), or of
    scvi-tools' Poisson, NegativeBinomial or ZeroInflatedNegativeBinomial
    (their mu, theta, zi_logits), else None."""
    from torch.distributions import NegativeBinomial, Poisson

    if (scvi := _from_scvi(base)) is not None:
        return scvi
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
    etc.), which its route (below) passes in."""
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


# -- poisson_log_prob: Poisson(x; e^log_rate) -----------------------------------------

poisson_log_prob_op = define(
    "poisson_log_prob(Tensor x, Tensor log_rate) -> Tensor",
    lambda x, log_rate: forward("poisson_log_prob", x, log_rate, None, None),
    fake_forward,
)
poisson_log_prob_backward_op = define(
    "poisson_log_prob_backward(Tensor grad_out, Tensor x, Tensor log_rate, bool need_log_rate) -> Tensor[]",
    lambda grad_out, x, log_rate, need: backward("poisson_log_prob", grad_out, x, log_rate, None, None, (need,)),
    fake_backward("poisson_log_prob"),
)


class PoissonLogProb(torch.autograd.Function):
    """Autograd of fastvae::poisson_log_prob in the kernels' layout (made once
    here and saved); counts get no gradient."""

    @staticmethod
    def forward(ctx, x, log_rate):
        x2, lr3, _, _ = kernel_layout(x, log_rate, None, None)
        ctx.save_for_backward(x2, lr3, x, log_rate)
        return shaped(run(poisson_log_prob_op, x2, lr3), log_rate.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, lr3, x, log_rate = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        if torch.is_grad_enabled():  # create_graph=True: the closed form g (x - e^l), differentiable
            acc = _backend.compute_dtype(x, log_rate)
            lr = log_rate.to(acc)
            d = grad_out.to(acc).unsqueeze(-1) * (x.detach().to(acc) - torch.exp(lr))
            return None, d.sum_to_size(log_rate.shape).to(log_rate.dtype)
        (d,) = run(poisson_log_prob_backward_op, grad_out, x2, lr3, True)
        return None, shaped(d, log_rate.shape)


def poisson_log_prob(x: Tensor, log_rate: Tensor, *, event_dims: int = 1) -> Tensor:
    """log Poisson(x; exp(log_rate)) summed over the last dimension D.

    Args:
        x: counts of shape (..., D), integer or floating-point, >= 0 (a
            negative or NaN count raises); broadcast against ``log_rate``
            (K, ..., D) without K copies. Counts get no gradient.
        log_rate: the decoder's log rate, shape (K, ..., D) or (..., D).
        event_dims: trailing dimensions that form one event, summed over.

    Returns:
        sum(x log_rate - exp(log_rate) - lgamma(x + 1)) over D, with
        ``log_rate``'s leading shape (x = 0 with log_rate = -inf gives 0, not
        NaN); equals torch.distributions.Poisson(log_rate.exp()).log_prob(x)
        summed. float32 for half-precision inputs, float64 when any is;
        differentiable in log_rate (twice as well).
    """
    check_inputs(x, log_rate=log_rate)
    if type(event_dims) is not int or event_dims < 1:
        event_dims = _validate.positive_int("event_dims", event_dims)
    check_counts(x, likelihood="poisson")
    return poisson_log_prob_unchecked(x, log_rate, event_dims)


def poisson_log_prob_unchecked(x: Tensor, log_rate: Tensor, event_dims: int = 1) -> Tensor:
    """poisson_log_prob after its checks (the caller ran them)."""
    if event_dims != 1:
        x, log_rate = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(
            log_rate, "log_rate", event_dims)
    x = broadcast_x(counts_as(x, _backend.compute_dtype(log_rate)), log_rate, "log_rate")
    return PoissonLogProb.apply(x, log_rate)


# -- negative_binomial_log_prob: scvi-tools' NB (log mean, log theta) ------------------

negative_binomial_log_prob_op = define(
    "negative_binomial_log_prob(Tensor x, Tensor log_mean, Tensor log_theta) -> Tensor",
    lambda x, log_mean, log_theta: forward("negative_binomial_log_prob", x, log_mean, log_theta, None),
    fake_forward,
)
negative_binomial_log_prob_backward_op = define(
    "negative_binomial_log_prob_backward(Tensor grad_out, Tensor x, Tensor log_mean, Tensor log_theta, "
    "bool need_log_mean, bool need_log_theta) -> Tensor[]",
    lambda grad_out, x, log_mean, log_theta, need_lm, need_lt: backward(
        "negative_binomial_log_prob", grad_out, x, log_mean, log_theta, None, (need_lm, need_lt)),
    fake_backward("negative_binomial_log_prob"),
)


class NegativeBinomialLogProb(torch.autograd.Function):
    """Autograd of fastvae::negative_binomial_log_prob in the kernels' layout
    (log_theta (K, P, D) or (D,)); counts get no gradient."""

    @staticmethod
    def forward(ctx, x, log_mean, log_theta):
        x2, lm3, lt, _ = kernel_layout(x, log_mean, log_theta, None)
        ctx.save_for_backward(x2, lm3, lt, x, log_mean, log_theta)
        return shaped(run(negative_binomial_log_prob_op, x2, lm3, lt), log_mean.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, lm3, lt, x, log_mean, log_theta = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        if not any(needs):
            return None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            return (None, *double_backward("negative_binomial_log_prob", grad_out, x, (log_mean, log_theta), needs))
        grads = iter(run(negative_binomial_log_prob_backward_op, grad_out, x2, lm3, lt, *needs))
        return (None, *(shaped(next(grads), t.shape) if n else None for t, n in zip((log_mean, log_theta), needs)))


def negative_binomial_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor, *, event_dims: int = 1) -> Tensor:
    """log NB(x; mean mu, inverse dispersion theta) summed over the last dimension D.

    The parameterization of scvi-tools' ``log_nb_positive`` (mean mu, variance
    mu + mu^2 / theta), and of ``torch.distributions.NegativeBinomial(
    total_count=theta, logits=log_mean - log_theta)``.

    Args:
        x: counts (..., D), integer or floating-point, >= 0 (a negative or NaN
            count raises); broadcast against ``log_mean`` (K, ..., D) without K
            copies. Counts get no gradient.
        log_mean: log mu, shape (K, ..., D) or (..., D).
        log_theta: log theta, of log_mean's shape (per element), (D,) per
            gene (scVI's common case: computed once per x row, its gradient
            summed over every row), a scalar, or anything that broadcasts.
        event_dims: trailing dimensions that form one event, summed over.

    Returns:
        log NB summed over D with ``log_mean``'s leading shape:
        -x softplus(-a) - theta softplus(a) + lgamma(x + theta) - lgamma(theta)
        - lgamma(x + 1), a = log mu - log theta, evaluated in forms without
        cancellation for large counts and as theta -> inf, where it tends to the
        Poisson log-likelihood (fastvae/ops/count_log_prob/count_log_prob.h):
        exact to float64 rounding in float64; in float32, counts near 1e5 are off
        by about 0.1 nat and the log theta gradient at theta >= 1e6 is mostly rounding, as
        with any float32 evaluation of these terms (docs/likelihoods.md); x = 0
        gives theta log(theta / (theta + mu)) exactly. float32 for half-precision
        inputs, float64 when any is; differentiable in log_mean and log_theta
        (twice too, through the reference formula).
    """
    check_inputs(x, log_mean=log_mean, log_theta=log_theta)
    if type(event_dims) is not int or event_dims < 1:
        event_dims = _validate.positive_int("event_dims", event_dims)
    check_counts(x, likelihood="negative_binomial")
    return negative_binomial_log_prob_unchecked(x, log_mean, log_theta, event_dims)


def negative_binomial_log_prob_unchecked(x: Tensor, log_mean: Tensor, log_theta: Tensor,
                                         event_dims: int = 1) -> Tensor:
    """negative_binomial_log_prob after its checks (the caller ran them)."""
    if event_dims != 1:
        log_theta = flatten_param(log_theta, log_mean, event_dims)
        x, log_mean = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(
            log_mean, "log_mean", event_dims)
    x = broadcast_x(counts_as(x, _backend.compute_dtype(log_mean, log_theta)), log_mean, "log_mean")
    log_theta = broadcast_param(log_theta, "log_theta", log_mean, "log_mean", per_gene=True)
    return NegativeBinomialLogProb.apply(x, log_mean, log_theta)


# -- zinb_log_prob: scvi-tools' ZINB (log mean, log theta, zero-inflation logits) -----

zinb_log_prob_op = define(
    "zinb_log_prob(Tensor x, Tensor log_mean, Tensor log_theta, Tensor zi_logits) -> Tensor",
    lambda x, log_mean, log_theta, zi_logits: forward("zinb_log_prob", x, log_mean, log_theta, zi_logits),
    fake_forward,
)
zinb_log_prob_backward_op = define(
    "zinb_log_prob_backward(Tensor grad_out, Tensor x, Tensor log_mean, Tensor log_theta, Tensor zi_logits, "
    "bool need_log_mean, bool need_log_theta, bool need_zi_logits) -> Tensor[]",
    lambda grad_out, x, log_mean, log_theta, zi_logits, need_lm, need_lt, need_zl: backward(
        "zinb_log_prob", grad_out, x, log_mean, log_theta, zi_logits, (need_lm, need_lt, need_zl)),
    fake_backward("zinb_log_prob"),
)


class ZinbLogProb(torch.autograd.Function):
    """Autograd of fastvae::zinb_log_prob in the kernels' layout (log_theta
    (K, P, D) or (D,), zi_logits (K, P, D)); counts get no gradient."""

    @staticmethod
    def forward(ctx, x, log_mean, log_theta, zi_logits):
        x2, lm3, lt, zl3 = kernel_layout(x, log_mean, log_theta, zi_logits)
        ctx.save_for_backward(x2, lm3, lt, zl3, x, log_mean, log_theta, zi_logits)
        return shaped(run(zinb_log_prob_op, x2, lm3, lt, zl3), log_mean.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, lm3, lt, zl3, x, log_mean, log_theta, zi_logits = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        params = (log_mean, log_theta, zi_logits)
        if not any(needs):
            return None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            return (None, *double_backward("zinb_log_prob", grad_out, x, params, needs))
        grads = iter(run(zinb_log_prob_backward_op, grad_out, x2, lm3, lt, zl3, *needs))
        return (None, *(shaped(next(grads), t.shape) if n else None for t, n in zip(params, needs)))


def zinb_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor, zi_logits: Tensor, *,
                  event_dims: int = 1) -> Tensor:
    """log ZINB(x; mu, theta, pi = sigmoid(zi_logits)) summed over the last dimension D.

    scvi-tools' ``log_zinb_positive``: a zero with probability pi, else a
    NB(mu, theta) count (negative_binomial_log_prob's parameterization).

    Args:
        x: counts (..., D), integer or floating-point, >= 0 (a negative or NaN
            count raises); broadcast against ``log_mean`` (K, ..., D) without K
            copies. Counts get no gradient.
        log_mean: log mu, shape (K, ..., D) or (..., D).
        log_theta: log theta: per element, (D,) per gene, a scalar, or anything
            that broadcasts against log_mean.
        zi_logits: zero-inflation logits (pi = sigmoid(zi_logits)), broadcast
            against log_mean.
        event_dims: trailing dimensions that form one event, summed over.

    Returns:
        The sum over D of logsumexp(log pi, log(1 - pi) + log NB(0)) where x = 0
        and log(1 - pi) + log NB(x) elsewhere, with ``log_mean``'s leading
        shape; float32 for half-precision inputs, float64 when any is;
        differentiable in log_mean, log_theta and zi_logits (twice too,
        through the reference formula).
    """
    check_inputs(x, log_mean=log_mean, log_theta=log_theta, zi_logits=zi_logits)
    if type(event_dims) is not int or event_dims < 1:
        event_dims = _validate.positive_int("event_dims", event_dims)
    check_counts(x, likelihood="zinb")
    return zinb_log_prob_unchecked(x, log_mean, log_theta, zi_logits, event_dims)


def zinb_log_prob_unchecked(x: Tensor, log_mean: Tensor, log_theta: Tensor, zi_logits: Tensor,
                            event_dims: int = 1) -> Tensor:
    """zinb_log_prob after its checks (the caller ran them)."""
    if event_dims != 1:
        log_theta = flatten_param(log_theta, log_mean, event_dims)
        zi_logits = flatten_param(zi_logits, log_mean, event_dims)
        x, log_mean = _validate.flatten_events(x, "x", event_dims), _validate.flatten_events(
            log_mean, "log_mean", event_dims)
    x = broadcast_x(counts_as(x, _backend.compute_dtype(log_mean, log_theta, zi_logits)), log_mean, "log_mean")
    log_theta = broadcast_param(log_theta, "log_theta", log_mean, "log_mean", per_gene=True)
    zi_logits = broadcast_param(zi_logits, "zi_logits", log_mean, "log_mean", per_gene=False)
    return ZinbLogProb.apply(x, log_mean, log_theta, zi_logits)


# -- the decoder route: likelihood= of the objectives and evaluation (fastvae/_decoder.py) --


def _route(likelihood: str, log_prob):
    """The route of one count likelihood: decoder_log_prob with its checked output
    and its unchecked function."""
    def route(x: Tensor, out: Any, sample_shape: tuple[int, ...], batch_ndim: int, probs_given: bool) -> Tensor:
        return decoder_log_prob(x, out, likelihood, sample_shape, x.dim() - batch_ndim,
                                lambda name, t, x_, shape: check_output(name, t, x_, shape, batch_ndim), log_prob)
    return route


poisson_route = _route("poisson", poisson_log_prob_unchecked)
negative_binomial_route = _route("negative_binomial", negative_binomial_log_prob_unchecked)
zinb_route = _route("zinb", zinb_log_prob_unchecked)
