"""The objectives' opaque calls under torch.compile (imported while Dynamo
traces: it imports torch._dynamo, which ``import fastvae`` does not).

Dynamo guards on every global, attribute and function that a traced call
reads, and a compiled step checks those guards at every call. Traced whole,
the digits ELBO step (fastvae.demo) guarded on 224 sources, 170 of them
fastvae's (the modules, tables and helpers of its checks and of the op
dispatch); the hand-written step guards on 34, and the difference cost the
compiled step about 4%. So the objectives call
the steps before and after the decoder through ``call``, which Dynamo puts
in its graph as one opaque call (torch._dynamo.nonstrict_trace) with a guard
on each argument only; AOT autograd then traces the function, fastvae's
Python included, into the same graph. Each function's arguments must carry
everything its trace depends on (tensors, options, the requested backend),
so that a change recompiles as it did when Dynamo traced it.
"""
from __future__ import annotations

import torch

from . import _backend
from ._op import OPAQUE


def _call(name: str, args: tuple):
    """OPAQUE[name](*args): a function _op.opaque registered, with
    _backend.compiling() True while it runs. Dynamo calls it only to trace it
    (on fake tensors, then AOT autograd's), never in the compiled step; the
    eager paths inside it (the Triton launch, the value checks that read
    values) would fail on a fake tensor."""
    _backend.opaque_depth += 1
    try:
        return OPAQUE[name](*args)
    finally:
        _backend.opaque_depth -= 1


def _traced_call(name: str, args: tuple):
    """OPAQUE[name](*args), traced by Dynamo like the rest of the objective."""
    return OPAQUE[name](*args)


# torch before 2.7 has no nonstrict_trace: Dynamo then traces the call (and guards as it does)
_mark = getattr(torch._dynamo, "nonstrict_trace", None)
call = _traced_call if _mark is None else _mark(_call)
