"""Which implementation serves an op, and how a kernel is run on it.

Automatic choice: CUDA tensors -> "triton", CPU tensors -> "cpp" (the
reference, with a warning, when the extension is missing).
FASTVAE_BACKEND=reference|cpp|triton overrides it; it is read once, when
fastvae is imported, because reading the environment on every call cost more
than a small kernel. Change it at run time with ``set_backend`` or the
``use_backend`` context manager. "triton" on CPU tensors runs the Triton
interpreter, which needs TRITON_INTERPRET=1 set before Triton is imported.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import types
import warnings

import numpy as np
import torch

from . import _openmp, _registry
from ._dtypes import HALF_DTYPES, accumulation_dtype, compute_dtype  # noqa: F401 (the ops' names for them)

BACKENDS = ("reference", "cpp", "triton")

_BUILD_HINT = (
    "fastvae's C++ extension (fastvae._C) is not built or failed to load{why}. "
    "Build it with `pip install -e .` (or `python setup.py build_ext --inplace`) from the "
    "fastvae source tree; set FASTVAE_BACKEND=reference to run the slow plain-PyTorch ops instead."
)


@functools.cache
def _load_cpp():
    """The extension module, or the ImportError that explains why it is missing."""
    global MIN_WORK_PER_THREAD
    try:
        mod = importlib.import_module("fastvae._C")
    except ImportError as err:
        return err
    MIN_WORK_PER_THREAD = mod.MIN_WORK_PER_THREAD
    return mod


# fastvae._C.MIN_WORK_PER_THREAD once the extension is loaded, as a plain
# global: code that torch.compile traces reads it (Dynamo cannot trace the
# import behind _load_cpp's cache)
MIN_WORK_PER_THREAD: int | None = None


# How many functions of fastvae._opaque.call are running. Dynamo runs such a
# function outside its own trace (on fake tensors), and AOT autograd traces it
# again, with the backward of its autograd Functions: torch.compiler.is_compiling()
# is True there only from torch 2.13 on (a flag held for the whole compile); on
# earlier torch it is False, and a kernel would launch on a FakeTensor. So
# compiling() also asks whether a fake tensor mode is active (AOT autograd traces
# the backward under one), about 0.1 us.
opaque_depth = 0
_FAKE_MODE = torch._C._TorchDispatchModeKey.FAKE
# bound once: compiling() runs on every eager op call, and the attribute lookups were most of its cost
_is_compiling, _dispatch_mode = torch.compiler.is_compiling, torch._C._get_dispatch_mode


# The tensor types the kernels and the plans take as they are: a plain tensor,
# and nn.Parameter (a plain tensor marked as a module's: a learned prior's
# location, logits learned directly). Other subclasses (FakeTensor, functorch
# wrappers, DTensor, a user's __torch_function__) take the ops' general path.
# A tuple: torch 2.7's Dynamo cannot trace `in` on a frozenset.
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def compiling() -> bool:
    """Whether torch.compile is tracing this code, on any torch version:
    Dynamo's own trace, the function of one of the objectives' opaque calls
    (fastvae/_opaque.py), or AOT autograd's trace under a fake tensor mode.
    fastvae asks this, not is_compiling() alone (but on the objectives' first
    line, which only Dynamo traces: tests/test_layers.py)."""
    return _is_compiling() or opaque_depth > 0 or _dispatch_mode(_FAKE_MODE) is not None


def cpp_module():
    """fastvae._C, or a RuntimeError that says how to build it."""
    mod = _load_cpp()
    if isinstance(mod, ImportError):
        raise RuntimeError(_BUILD_HINT.format(why=f" ({mod})")) from mod
    return mod


def cpp_available() -> bool:
    return not isinstance(_load_cpp(), ImportError)


def triton_module(module: str):
    """The Triton kernels of ``module``: fastvae.ops.<module>.triton for an op
    folder, fastvae.kernels.philox for the noise stream's fills (imports Triton
    on first use: CPU work never does)."""
    try:
        return importlib.import_module(
            f"fastvae.ops.{module}.triton" if module in _registry.FOLDERS else f"fastvae.kernels.{module}")
    except ModuleNotFoundError as err:
        if err.name != "triton":
            raise
        raise RuntimeError(
            "the triton backend needs Triton, which is not installed: CUDA builds of torch include it; "
            "otherwise `pip install triton` (or fastvae[gpu])"
        ) from err


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _warn_missing_cpp() -> None:
    warnings.warn(
        _BUILD_HINT.format(why="") + " Falling back to the reference backend for CPU tensors.",
        RuntimeWarning,
        stacklevel=4,
    )


def _parse(name: str | None) -> str | None:
    name = (name or "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTVAE_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


_override: str | None = _parse(os.environ.get("FASTVAE_BACKEND"))
_chosen: dict[str, str] = {}  # device type -> backend, valid until the override changes


# What a compiled graph calls where the plans serve (the triton backend on CUDA):
# "graph_ops", the ops whose implementation looks up the plan and launches it
# (fastvae/_plan_ops.py, and each op's OP_PLANS), or "triton_op", their
# torch.library.triton_op twins (fastvae/_triton_ops.py), which Inductor
# launches from its generated code. Off until a GPU run measures the twins ahead.
COMPILED_NODES = ("graph_ops", "triton_op")


def _parse_compiled_nodes(name: str | None) -> str:
    name = (name or "").strip().lower()
    if not name:
        return COMPILED_NODES[0]
    if name not in COMPILED_NODES:
        raise ValueError(f"FASTVAE_COMPILED_NODES={name!r} is not one of {', '.join(COMPILED_NODES)}")
    return name


_compiled_nodes: str = _parse_compiled_nodes(os.environ.get("FASTVAE_COMPILED_NODES"))


def compiled_nodes() -> str:
    """The compiled nodes in force: "graph_ops" (the default) or "triton_op"
    (FASTVAE_COMPILED_NODES at import, or fastvae.set_compiled_nodes, which
    fastvae/_triton_ops.py defines: it registers the twins, a layer above this one)."""
    return _compiled_nodes


def traced_choice() -> str:
    """The objectives' opaque calls' ``backend`` argument, on which Dynamo
    guards (fastvae/_opaque.py): the requested backend ("" for automatic),
    and "+triton_op" where set_compiled_nodes chose the triton_op twins, the
    two settings their trace depends on; either change recompiles."""
    choice = _override or ""
    return choice if _compiled_nodes == "graph_ops" else f"{choice}+{_compiled_nodes}"


def requested_backend() -> str | None:
    """The override in force (FASTVAE_BACKEND at import, or set_backend); None for automatic."""
    return _override


def set_backend(name: str | None) -> None:
    """Serve every op with backend ``name`` ("reference", "cpp" or "triton"),
    or choose by device again with None. Replaces FASTVAE_BACKEND, which is
    read once at import."""
    global _override
    _override = _parse(name)
    _chosen.clear()
    _torch_ops.cache_clear()


@contextlib.contextmanager
def use_backend(name: str | None):
    """``with fastvae.use_backend("reference"): ...`` runs the block on that
    backend and restores the previous choice afterwards."""
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# (backend, device type) pairs an override was checked for: set_backend clears
# _chosen, and a loop that enters use_backend every step (as the host-cost
# tool does) would otherwise check again on every call
_VALID: set[tuple[str, str]] = set()


def _choose(device_type: str, warn: bool) -> str:
    name = _override
    if (name, device_type) in _VALID:
        return name
    if name is None:
        if device_type == "cuda":
            return "triton"
        if cpp_available():
            return "cpp"
        if warn:
            _warn_missing_cpp()
        return "reference"
    if name == "cpp" and device_type != "cpu":
        raise ValueError(f"the cpp backend serves CPU tensors only, got a {device_type} tensor")
    if name == "triton" and device_type == "cpu" and not _interpreting():
        raise RuntimeError(
            "the triton backend on CPU tensors runs the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before Python starts"
        )
    if name == "triton" and device_type not in ("cpu", "cuda"):
        raise ValueError(f"the triton backend serves CUDA tensors, got a {device_type} tensor")
    _VALID.add((name, device_type))
    return name


def op_plans_serve(device: torch.device) -> bool:
    """Whether an op's own plans (its OP_PLANS: the per-signature launches of
    the calls a compiled graph makes) serve a call on ``device``: the triton
    backend, outside autocast there (autocast picks dtypes per call, which a
    plan fixes). The first check an op's _op_plan makes, so that a call on
    another backend leaves after one dict look-up."""
    return ((_chosen.get(device.type) or backend_for(device, warn=False)) == "triton"
            and not (torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device.type)))


def backend_for(device: torch.device | str, *, warn: bool = True) -> str:
    """The backend that runs ops on tensors of this device."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    name = _chosen.get(device_type)
    if name is None:
        name = _chosen[device_type] = _choose(device_type, warn)
        if device_type == "cpu" and not compiling():  # once: a CPU run on a busy machine (fastvae/_openmp.py)
            _openmp.warn_if_spinning()
    return name


def backend_info(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which backend serves each op for tensors on ``device``, e.g.
    ``{"sample_normal": "cpp", "kl_normal": "cpp", ...}``; a missing C++
    extension shows as ``"reference (cpp extension missing)"``."""
    name = backend_for(device, warn=False)
    if name == "reference" and _override is None:
        name = "reference (cpp extension missing)"
    return {op: name for op in _registry.OPS}


def empty_output(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fresh output buffer for a kernel to fill, on like's device with like's
    dtype (or ``dtype``). Every op allocates through here so that tests can
    poison outputs with NaN and catch unwritten elements."""
    return torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


def kernel_input(backend: str, t: torch.Tensor | None, dtype: torch.dtype, native_half: bool = False):
    """``t`` as the kernels of ``backend`` read it when the op computes in
    ``dtype``: as it is, in its own dtype (the Triton and reference kernels
    load any float dtype and convert in registers), except
    - a float64 computation casts every input to float64 (a rare mix: a
      float32 tensor beside a float64 one), and
    - the cpp kernels read half precision natively only for the decoder
      outputs of the likelihoods (``native_half``, the one K-fold input,
      whose bytes halve); their other inputs (encoder-sized (N, L) or (K, N)
      tensors) are cast to float32 first."""
    if t is None or t.dtype == dtype:
        return t
    if dtype == torch.float64 or (backend == "cpp" and not (native_half and t.dtype in HALF_DTYPES)):
        return t.to(dtype)
    return t


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A gradient computed on a cast kernel_input back in its input's dtype
    (t itself when no cast was made)."""
    return t if t.dtype == dtype else t.to(dtype)


_functions: dict[tuple[str, str], object] = {}


def kernel_function(backend: str, kernel: str):
    """The function that runs ``kernel`` on ``backend`` (looked up once)."""
    try:
        return _functions[backend, kernel]
    except KeyError:
        pass
    module = _registry.KERNELS[kernel].module
    if backend == "cpp":
        owner = cpp_module()
    elif backend == "triton":
        owner = triton_module(module)
    elif module in _registry.FOLDERS:  # the op's oracle, in its folder's description
        owner = _registry.FOLDERS[module]
    else:  # the noise stream's fills, which no op owns
        from . import reference as owner
    fn = _functions[backend, kernel] = getattr(owner, kernel)
    return fn


def launch(backend: str, kernel: str, work: int, **args) -> None:
    """Runs ``kernel`` on ``backend`` with the arguments named in its registry
    entry, by keyword and in that order (a call that differs raises).
    Tensors are passed as they are (None for an absent optional one), the
    Philox ``seed`` as a 0-d int64 tensor: Triton reads it on the device (no
    host sync); the cpp and reference kernels take its value, and cpp takes
    NumPy views of the tensors and a thread count for ``work`` elements."""
    if tuple(args) != _ARGS[kernel]:
        raise TypeError(f"{kernel} takes ({', '.join(_ARGS[kernel])}), got ({', '.join(args)})")
    fn = _functions.get((backend, kernel)) or kernel_function(backend, kernel)
    if backend == "cpp":
        _run_cpp(fn, args, work)
        return
    if backend == "reference" and "seed" in args:
        args["seed"] = int(args["seed"])
    # The op has no autograd kernel (autograd wraps it from outside), so torch
    # code inside a kernel must not record a graph onto the fresh outputs.
    with torch.no_grad():
        fn(**args)


def launch_cpp(kernel: str, work: int, options: dict, **args) -> None:
    """launch on the cpp backend, with keyword ``options`` that only the C++
    kernel takes: a variant of its inputs' form that the other backends do
    not have (sample_location_scale_kl_*'s of_scale, which the eager plans
    pass; sample_location_scale's prior_a, prior_b: its log-ratio to a prior
    of its own family)."""
    if tuple(args) != _ARGS[kernel] or (options and not _CPP_OPTIONS[kernel].issuperset(options)):
        raise TypeError(f"{kernel} takes ({', '.join(_ARGS[kernel])}) and the options "
                        f"({', '.join(_registry.KERNELS[kernel].cpp_options)}), got ({', '.join(args)}) and "
                        f"({', '.join(options)})")
    _run_cpp(_functions.get(("cpp", kernel)) or kernel_function("cpp", kernel), args, work, options)


_NO_OPTIONS: dict = {}  # (never written)


def _run_cpp(fn, args: dict, work: int, options: dict | None = None) -> None:
    """Runs a cpp kernel on ``args`` (launch's), positionally (pybind resolves
    keywords per call) but for ``options``."""
    # detach only what requires grad: it costs as much as the view
    values = [v if not isinstance(v, torch.Tensor) else int(v) if k == "seed" else _numpy(v)
              for k, v in args.items()]
    options = {k: _numpy(v) if isinstance(v, torch.Tensor) else v for k, v in options.items()} if options \
        else _NO_OPTIONS
    try:
        fn(*values, num_threads(work), **options)
    except cpp_module().MisalignedArrayError:
        # an input viewing a byte buffer at an odd offset: the kernel did
        # not start, and runs on aligned copies (outputs are always fresh,
        # hence aligned); checking every call instead would cost each op
        fn(*[v.copy() if isinstance(v, np.ndarray) and v.ctypes.data % v.itemsize else v
             for v in values], num_threads(work), **options)


_ARGS = {name: k.args for name, k in _registry.KERNELS.items()}
_CPP_OPTIONS = {name: frozenset(k.cpp_options) for name, k in _registry.KERNELS.items()}


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor for the cpp kernels (zero copy). NumPy has
    no bfloat16: a bfloat16 tensor goes as its uint16 bits, which the
    bindings read as bfloat16 (csrc/half.h); float16 is NumPy's own."""
    if t.requires_grad:
        t = t.detach()  # costs as much as the view: only where needed
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def num_threads(work: int) -> int:
    """OpenMP threads for a cpp kernel over ``work`` elements: torch.get_num_threads(),
    but only as many as there are ``fastvae._C.MIN_WORK_PER_THREAD`` elements for
    (csrc/ops.h says why; the C++ operators use the same rule)."""
    threads = torch.get_num_threads()
    return 1 if threads == 1 else max(1, min(threads, work // cpp_module().MIN_WORK_PER_THREAD))


# The eager CPU operators with C++ autograd (csrc/torch_ops.cpp), by name (each Op's torch_ops).
TORCH_OPS = _registry.TORCH_OPS
_TORCH_OPS_DTYPES = (torch.float32, torch.float64)


@functools.cache
def _torch_ops():
    """torch.ops.fastvae_cpp's overloads by name, or None in a build without them."""
    mod = _load_cpp()
    if isinstance(mod, ImportError) or not mod.HAS_TORCH_OPS:
        return None
    return types.SimpleNamespace(**{name: getattr(torch.ops.fastvae_cpp, name).default for name in TORCH_OPS})


def cpu_twin_serves(tensors) -> bool:
    """Whether, while torch.compile traces, an op's C++ twin (fastvae_cpu::<op>,
    _op.run) serves these tensors (``None``: it does not): CPU float32/float64
    tensors of one dtype on the cpp backend, the tensors torch_ops serves in
    eager mode. The twins exist only where the extension loaded, so the
    automatic choice is cpp; only ``_override`` is read, so Dynamo guards on
    it alone and set_backend recompiles, while an eager call that fills
    ``_chosen`` does not."""
    if tensors is None or _override not in (None, "cpp"):
        return False
    t = tensors[0]
    if t.device.type != "cpu" or t.dtype not in _TORCH_OPS_DTYPES:
        return False
    return all(o is None or o.dtype == t.dtype for o in tensors[1:])


def torch_ops(t: torch.Tensor, *others: torch.Tensor | None):
    """The C++ operators (``.sample_normal`` etc., TORCH_OPS) when they serve
    ``t``: a plain float32/float64 CPU tensor on the cpp backend, in eager mode,
    in a build that has them, with ``others`` (the op's other tensor inputs) of
    its dtype; else None, and the op's Python autograd.Function
    runs it (torch.compile, torch.jit.trace, which would freeze the seed these
    take as an int, the other backends, tensor subclasses such as FakeTensor,
    half precision and mixed dtypes). Same kernels, so the same numbers either way."""
    if (compiling() or torch._C._get_tracing_state() is not None
            or type(t) not in PLAIN_TYPES or t.device.type != "cpu"
            or t.dtype not in _TORCH_OPS_DTYPES or (_chosen.get("cpu") or backend_for("cpu")) != "cpp"):
        return None
    for o in others:
        if o is not None and o.dtype != t.dtype:
            return None
    return _torch_ops()
