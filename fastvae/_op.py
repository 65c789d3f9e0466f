"""How an op is registered, and the tensor helpers the op modules share.

Each op is ``torch.library.define`` with a schema, one implementation for
the CPU and CUDA dispatch keys (it picks the backend), and a fake (meta)
implementation for torch.compile; autograd is a ``torch.autograd.Function``
around the op in the op's module. Measured on this machine
(benchmarks/bench_overhead.py), this costs about half of
``torch.library.custom_op`` with ``register_autograd`` per forward+backward,
and torch.compile still traces it with no graph break
(pytorch/pytorch#139500).

The ops of a training step also have a C++ twin, ``fastvae_cpu::<name>``
(csrc/torch_ops.cpp: the same schema, a CPU kernel that calls the cpp
kernels, no autograd), which the graph calls instead while torch.compile
traces CPU tensors on the cpp backend (``define``'s ``cpu``, ``run``): so a
compiled step runs what an eager one does, with no Python between the
graph and the kernels.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend

LIB = torch.library.Library("fastvae", "DEF")  # noqa: TOR901 (one library for the package)


def define(schema: str, impl, fake, cpu=None):
    """Registers ``fastvae::<schema>`` ("name(Tensor x, ...) -> Tensor") with
    ``impl`` for CPU and CUDA tensors and ``fake`` for meta/fake tensors, and
    returns the op (``torch.ops.fastvae.<name>.default``).

    ``cpu`` (the ops of a training step, which csrc/torch_ops.cpp also
    implements as ``fastvae_cpu::<name>``): a function of the op's arguments
    that returns the float tensors whose dtypes must agree, or None where the
    twin must not serve them (the likelihoods' folded layout, which eager
    calls also leave to the Python op). The twin gets ``fake`` too; ``run``
    puts it in a traced graph (cpu_twin_serves says when)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"fastvae::{name}", fake, lib=LIB)
    op = getattr(torch.ops.fastvae, name).default
    _IMPLS[op] = impl
    twin = _cpu_twin(name, fake) if cpu is not None else None
    if twin is not None:
        _CPU_TWINS[op] = twin, cpu
    return op


_IMPLS: dict = {}  # op -> its impl, for run() (and the triton_op twins' bodies: fastvae/_triton_ops.py)
_CPU_TWINS: dict = {}  # op -> (fastvae_cpu::<name>, its cpu function), for run() while tracing
# op -> its torch.library.triton_op twin, fastvae_triton::<name> (fastvae/_triton_ops.py registers
# them when set_compiled_nodes("triton_op") asks, or FASTVAE_COMPILED_NODES=triton_op at import)
_TRITON_TWINS: dict = {}
# the devices whose graphs take the triton_op twins: Inductor generates the launch of a
# user's Triton kernel for CUDA tensors only (tests add "cpu" to trace the twins on the CPU)
TWIN_DEVICES = ("cuda",)
_EAGER_DEVICES = ("cpu", "cuda")


def _cpu_twin(name: str, fake):
    """torch.ops.fastvae_cpu.<name>.default with ``fake`` registered, or None
    in a build without the C++ operators (or without the extension)."""
    mod = _backend._load_cpp()
    if isinstance(mod, ImportError) or not mod.HAS_TORCH_OPS:
        return None
    global _CPU_LIB
    if _CPU_LIB is None:
        _CPU_LIB = torch.library.Library("fastvae_cpu", "FRAGMENT")  # noqa: TOR901 (the C++ ops' fakes)
    torch.library.register_fake(f"fastvae_cpu::{name}", fake, lib=_CPU_LIB)
    return getattr(torch.ops.fastvae_cpu, name).default


_CPU_LIB = None


def run(op, *args):
    """Calls ``op``: through the dispatcher while torch.compile traces, or for
    tensors on other devices (meta, fake); in eager mode its impl directly,
    the one the dispatcher would run, without the dispatcher's cost (about
    1.5 us a call here, a tenth of a small op; benchmarks/bench_overhead.py).
    While tracing CPU tensors on the cpp backend, an op with a C++ twin puts
    the twin in the graph: the Python impl would cost the compiled step
    15-30 us a call (the dispatcher's call back into Python, NumPy views, the
    launch's checks), more than the kernel at a small model's sizes. In
    eager mode the twin serves the same tensors the C++ operators do
    (_backend.torch_ops): an op that a Python Function or helper still runs
    there (the DReG weights, importance_weights_from_state) then skips the
    same 10-15 us of Python for the same kernel, threads and bits."""
    twin = _CPU_TWINS.get(op)
    if _backend.compiling():
        if twin is not None and _backend.cpu_twin_serves(twin[1](*args)):
            return twin[0](*args)
        return graph_node(op, args)(*args)
    if args[0].device.type not in _EAGER_DEVICES:
        return op(*args)
    if twin is not None and (tensors := twin[1](*args)) is not None and _backend.torch_ops(*tensors) is not None:
        return twin[0](*args)
    return _IMPLS[op](*args)


def graph_node(op, args: tuple):
    """What a graph that torch.compile traces calls for ``op`` on ``args``:
    its triton_op twin (fastvae_triton::<name>) where set_compiled_nodes
    chose "triton_op", the op has one, its tensors are on a device of
    TWIN_DEVICES and the triton backend serves them (the automatic choice,
    or set_backend("triton")); else ``op`` itself. Read while tracing only:
    Dynamo guards on the setting (one guard while it is "graph_ops"), so a
    change recompiles. The twin's body takes the op's plan where the op's
    implementation would, and puts ``op`` in the graph where it would not
    (fastvae/_triton_ops.py)."""
    if _backend._compiled_nodes != "triton_op":
        return op
    twin = _TRITON_TWINS.get(op)
    if twin is None or _backend._override not in (None, "triton"):
        return op
    device = next((a.device for a in args if isinstance(a, Tensor)), None)
    return twin if device is not None and device.type in TWIN_DEVICES else op


OPAQUE: dict = {}  # name -> function, for fastvae._opaque.call


def opaque(fn):
    """Registers ``fn`` (returned unchanged) as one that fastvae._opaque.call
    runs by its name under torch.compile: the objectives' steps before and
    after the decoder, which Dynamo then neither traces nor guards on."""
    OPAQUE[fn.__name__] = fn
    return fn


SEED_HIGH = 2**63 - 1


def draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A 0-d int64 Philox seed drawn from torch's generator (the default one of
    ``device``, or ``generator``), so torch.manual_seed makes runs repeatable
    and two calls get independent noise. Stays on the device: no host sync
    (except that a CPU generator with CUDA tensors copies its seed to the GPU,
    which waits for the host). Every public function that takes ``generator``
    draws through here, so this is where the argument is checked."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen_device = device if generator is None else generator.device
    if generator is not None and gen_device.type == "meta":
        raise ValueError("generator is on the meta device, which draws no numbers: pass a CPU generator or one "
                         f"on the tensors' device ({device})")
    seed = torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=gen_device, generator=generator)
    return seed if seed.device == device else seed.to(device)


def shaped(t: Tensor, shape) -> Tensor:
    """t with ``shape``: t itself when it has it already (a reshape makes a
    new tensor even then, at a tenth of a small op's cost)."""
    return t if t.shape == shape else t.reshape(shape)


def flat(t: Tensor) -> Tensor:
    """(..., L) -> contiguous (N, L)."""
    if t.dim() == 2:
        return t.contiguous()  # t itself when it is
    L = t.shape[-1]
    return t.reshape(math.prod(t.shape[:-1]), L).contiguous()
