"""The plans' kernels as ``torch.library.triton_op`` nodes: the twins that a
graph compiled on CUDA calls under ``set_compiled_nodes("triton_op")``.

Under torch.compile on the triton backend a compiled step's fastvae nodes
are custom ops whose implementation looks its plan up and launches the
plan's kernels (fastvae/_plan_ops.py, and each op's own plans, its folder's
``OP_PLANS``): each node is a call from the graph into Python. A
``triton_op`` whose body launches a kernel through ``wrap_triton`` lets
Inductor launch that kernel from its generated code instead
(benchmarks/bench_triton_op.py measured it for the Concrete's two kernels on
an H200: the same bits, the compiled step 1.7-2.0x faster).

Every op that launches from a plan, forward and backward, has a twin
``fastvae_triton::<name>``: the ops an op record lists in ``triton_ops``
(fastvae/_spec.py) and the objectives' plan ops (``_plan_ops.TRITON_OPS``).
The twin's body is the op's own implementation (``_op._IMPLS``), run in a
``_scope`` where each ``_launch.Launch`` of its plan launches through
``wrap_triton`` with the grid, compile-time parameters and arguments the
eager launch passes. So the twin launches the plan's kernels, with the
plan's arguments, by construction (tests/test_triton_ops.py records both).
Inside the scope:

- the plan stores (``_plan.PLANS``, the ops' ``OP_PLANS`` and ``PLANS``) and
  the kernels' arrival counters (``kernels/_common.py``'s ``_COUNTERS``) are
  set aside: a plan made while torch.compile traces holds fake tensors,
  which must neither reach an eager call nor come from one, so the body
  makes its plan afresh and it is dropped after. The buffers a plan keeps
  for its launches (partial sums, arrival counters that the kernels leave at
  zero) become allocations of the graph, one per call;
- a Triton launch that is not the plan's (the op's general launch, which an
  implementation takes where its plan does not serve the call: another
  dtype, a layout the plan does not take) raises
  ``_GeneralLaunch`` before it launches, and the twin puts the op itself in
  the graph instead, as today;
- a tensor of a symbolic shape (dynamic shapes) takes the op itself too:
  the plans' geometry is Python integers.

The scope is entered only while a twin's body runs (while torch.compile
traces, and in a direct eager call of a twin): it swaps process-wide state
(the plan stores' contents, ``Launch.__call__``, Triton's ``run``) under a
lock, so two threads do not trace twins at once. Eager calls of the ops
never enter it: they keep the plans. But an eager fastvae call on the
triton backend in another thread while a twin is traced shares the plan
stores with the trace (it could find the trace's plan, of fake tensors, or
leave it a real one): trace in the thread that trains, as torch.compile's
first call does, not beside eager calls in another.

What only a GPU can confirm (docs/architecture.md, "Under torch.compile"):
that Inductor launches the twins' kernels from its generated code, with the
eager launch's bits, and how fast. Registration is lazy (``register``: the
first ``set_compiled_nodes("triton_op")``, or FASTVAE_COMPILED_NODES=triton_op
at import), so that ``import fastvae`` registers no twin and imports no Triton.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import threading
import typing

import torch
from torch import Tensor

from . import _backend, _op, _plan, _plan_ops, _registry
from ._launch import Launch

NAMESPACE = "fastvae_triton"


class _GeneralLaunch(Exception):
    """A Triton launch in a twin's body that is not a plan's: the op's general
    launch, which the twin leaves to the op itself."""


_state = threading.local()  # depth: scopes entered in this thread; own: inside a twin's own launch
_lock = threading.RLock()
_LAUNCH_CALL = Launch.__call__  # the eager launch, which the scope replaces


def _launcher(kernel):
    """What a twin's launch calls ``[grid](*args, **meta)`` on:
    ``wrap_triton(kernel)`` for a compiled Triton kernel (a node of the
    graph while torch.compile traces; the kernel itself in an eager call of
    the twin), else the kernel as it is (the Triton interpreter's, in CPU
    tests, which Inductor cannot launch). Tests replace it with a recorder."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)
    return kernel


def _fake(args: tuple) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(a, Tensor) and is_fake(a) for a in args)


def _twin_launch(self: Launch, *args) -> None:
    """Launch.__call__ inside a scope: the kernel through ``_launcher`` with the
    grid and compile-time parameters the plan bound and the call's
    arguments, as the eager ``Launch`` passes them to the kernel's ``run``."""
    if not getattr(_state, "depth", 0):  # another thread's eager launch
        return _LAUNCH_CALL(self, *args)
    kwargs = self.kwargs
    meta = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    runner = _launcher(self.kernel)
    if runner is self.kernel and _fake(args):
        return None  # the interpreter's kernel while tracing (CPU tests): nothing runs on fake tensors
    _state.own += 1
    try:
        runner[kwargs["grid"]](*args, **meta)
    finally:
        _state.own -= 1
    return None


def _refusing(run):
    """A Triton kernel class's ``run`` that raises _GeneralLaunch for a
    launch inside a scope that is not a twin's own (the op's general launch)."""

    def guarded(self, *args, **kwargs):
        if getattr(_state, "depth", 0) and not _state.own:
            raise _GeneralLaunch(getattr(self, "__name__", repr(self)))
        return run(self, *args, **kwargs)

    return guarded


def _kernel_classes() -> list[type]:
    """The Triton kernel classes whose ``run`` a general launch calls."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover (a Triton without the interpreter)
        return classes
    return [*classes, InterpretedFunction]


def _stores() -> list:
    """Every plan store loaded: the objectives' plans and the ops' (own and eager)."""
    return [_plan.PLANS, *_registry.plan_stores("OP_PLANS"), *_registry.plan_stores("PLANS")]


def _counters() -> dict | None:
    common = sys.modules.get("fastvae.kernels._common")
    return None if common is None else common._COUNTERS


def _enter():
    """Sets the plan stores and the arrival counters aside and installs the
    twins' launch; returns what _exit puts back."""
    kept = [(store, dict(store)) for store in _stores()]
    for store, _ in kept:
        store.clear()
    counters = _counters()
    kept_counters = {} if counters is None else dict(counters)
    if counters is not None:
        counters.clear()
    runs = [(cls, cls.__dict__.get("run"), cls.run) for cls in _kernel_classes()]
    for cls, _, run in runs:
        cls.run = _refusing(run)
    Launch.__call__ = _twin_launch
    return kept, kept_counters, runs


def _exit(kept, kept_counters, runs) -> None:
    Launch.__call__ = _LAUNCH_CALL
    for cls, own, _ in runs:
        if own is None:
            del cls.run
        else:
            cls.run = own
    for store in _stores():  # the scope's plans (fake tensors), in every store loaded meanwhile too
        store.clear()
    for store, plans in kept:
        store.update(plans)
    counters = _counters()
    if counters is not None:
        counters.clear()
        counters.update(kept_counters)


@contextlib.contextmanager
def _scope():
    """Where a twin's body runs (the module's docstring); nested bodies (an
    implementation that calls another op) share the outermost scope."""
    if getattr(_state, "depth", 0):
        _state.depth += 1
        try:
            yield
        finally:
            _state.depth -= 1
        return
    with _lock:
        kept = _enter()
        _state.depth, _state.own = 1, 0
        try:
            yield
        finally:
            _state.depth = 0
            _exit(*kept)


def _static(args: tuple) -> bool:
    """Whether every size and integer of ``args`` is a Python int (no symbol
    of dynamic shapes): the plans' geometry is computed in integers."""
    for a in args:
        if isinstance(a, Tensor):
            if any(type(s) is not int for s in a.shape):
                return False
        elif isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return False
    return True


# schema types -> the annotations torch.library.infer_schema reads back as them (typing's
# Optional: the form its table holds on every torch since the floor)
_TYPES = {"Tensor": Tensor, "Optional[Tensor]": typing.Optional[Tensor],  # noqa: UP045
          "int": int, "float": float, "bool": bool, "str": str, "ScalarType": torch.dtype,
          "List[Tensor]": list[Tensor]}


def _annotation(arg):
    kind = str(getattr(arg, "real_type", arg.type))
    try:
        return _TYPES[kind]
    except KeyError:
        raise TypeError(f"no triton_op twin for an argument of type {kind} ({arg.name})") from None


def signature(op) -> inspect.Signature:
    """The Python signature of ``op``'s schema, from which torch.library.triton_op
    infers the twin's: the same names, types, defaults and returns, each int a
    SymInt (infer_schema's int)."""
    schema = op._schema
    params = [inspect.Parameter(a.name, inspect.Parameter.KEYWORD_ONLY if a.kwarg_only
                                else inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=a.default_value if a.has_default_value() else inspect.Parameter.empty,
                                annotation=_annotation(a))
              for a in schema.arguments]
    returns = [_annotation(r) for r in schema.returns]
    ret = returns[0] if len(returns) == 1 else tuple.__class_getitem__(tuple(returns))
    return inspect.Signature(params, return_annotation=ret)


def _body(op, impl, sig: inspect.Signature):
    """The twin's body: ``impl`` (``op``'s implementation) in a scope, or
    ``op`` itself where the implementation takes its general launch or the
    shapes are symbolic."""

    def body(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        args = bound.args
        if _static(args):
            try:
                with _scope():
                    return impl(*args)
            except _GeneralLaunch:
                pass
        return op(*args)

    body.__signature__ = sig
    body.__name__ = body.__qualname__ = op._schema.name.split("::")[-1]
    body.__module__ = __name__
    return body


def names() -> list[str]:
    """The names of the ops that have a twin: the objectives' plan ops and
    every op record's ``triton_ops``."""
    return [*_plan_ops.TRITON_OPS, *(name for op in _registry.OPS.values() for name in op.triton_ops)]


def register() -> dict:
    """Registers every twin (once a process) and returns {op: twin}, as
    _op._TRITON_TWINS holds them (torch.ops.fastvae.<name>.default ->
    torch.ops.fastvae_triton.<name>.default)."""
    with _lock:
        if _op._TRITON_TWINS:
            return _op._TRITON_TWINS
        triton_op = getattr(torch.library, "triton_op", None)
        if triton_op is None:  # pragma: no cover (torch before 2.6; the floor is 2.7)
            raise RuntimeError("the triton_op compiled nodes need torch.library.triton_op (torch 2.6 or newer); "
                               f"this is torch {torch.__version__}")
        for op in _registry.OPS.values():  # their implementations: each folder's op.py
            if op.triton_ops:
                importlib.import_module(f"fastvae.ops.{_registry.FOLDER_OF[op.name]}.op")
        twins = {}
        for name in names():
            op = getattr(torch.ops.fastvae, name).default
            triton_op(f"{NAMESPACE}::{name}", _body(op, _op._IMPLS[op], signature(op)), mutates_args=())
            twins[op] = getattr(getattr(torch.ops, NAMESPACE), name).default
        _op._TRITON_TWINS.update(twins)
        return _op._TRITON_TWINS


def set_compiled_nodes(name: str | None) -> None:
    """Choose what a graph that torch.compile traces on CUDA calls where
    fastvae's plans serve (the triton backend): ``"graph_ops"`` (the default;
    None or "" too), custom ops whose implementation looks its plan up and
    launches the plan's kernels, a call from the graph into Python per node;
    or ``"triton_op"``, their ``torch.library.triton_op`` twins (registered
    at the first such call), whose bodies launch the same kernels with the
    same arguments through ``wrap_triton``, so that Inductor launches them
    from its generated code. Eager calls keep the plans either way. Replaces
    FASTVAE_COMPILED_NODES, which is read once at import (the same values; a
    bad one raises a ValueError); ``fastvae.compiled_nodes()`` reads the
    setting. A compiled function guards on it: a change recompiles it at its
    next call. The default stays "graph_ops" until a GPU run measures the
    twins ahead (docs/architecture.md, "Under torch.compile")."""
    name = _backend._parse_compiled_nodes(name)
    if name == "triton_op":
        register()
    _backend._compiled_nodes = name
