"""How an op is registered, and the tensor helpers the op modules share.

Each op is ``torch.library.define`` with a schema, one implementation for
the CPU and CUDA dispatch keys (it picks the backend), and a fake (meta)
implementation for torch.compile; autograd is a ``torch.autograd.Function``
around the op in the op's module. Measured on this machine
(benchmarks/bench_overhead.py), this costs about half of
``torch.library.custom_op`` with ``register_autograd`` per forward+backward,
and torch.compile still traces it with no graph break
(pytorch/pytorch#139500).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LIB = torch.library.Library("fastvae", "DEF")  # noqa: TOR901 (one library for the package)


def define(schema: str, impl, fake):
    """Registers ``fastvae::<schema>`` ("name(Tensor x, ...) -> Tensor") with
    ``impl`` for CPU and CUDA tensors and ``fake`` for meta/fake tensors, and
    returns the op (``torch.ops.fastvae.<name>.default``)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"fastvae::{name}", fake, lib=LIB)
    op = getattr(torch.ops.fastvae, name).default
    _IMPLS[op] = impl
    return op


_IMPLS: dict = {}  # op -> its impl, for run()
_EAGER_DEVICES = ("cpu", "cuda")


def run(op, *args):
    """Calls ``op``: through the dispatcher while torch.compile traces, or for
    tensors on other devices (meta, fake); in eager mode its impl directly,
    the one the dispatcher would run, without the dispatcher's cost (about
    1.5 us a call here, a tenth of a small op; benchmarks/bench_overhead.py)."""
    if torch.compiler.is_compiling() or args[0].device.type not in _EAGER_DEVICES:
        return op(*args)
    return _IMPLS[op](*args)


_SEED_HIGH = 2**63 - 1


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
    seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=gen_device, generator=generator)
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
