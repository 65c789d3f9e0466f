"""Planned kernel launches: a Triton kernel's grid and compile-time
parameters bound once (``Launch``), then launched through the compiled
kernel's launcher directly, and the bounded store of plans per call signature
that holds them (``PlanCache``). The objectives' plans (fastvae/_plan.py) and
the ops that keep per-call-signature plans of their own build on it; it
imports nothing of fastvae's, so any layer may. A plan's outputs are
``torch.empty_like`` a ``template`` the plan keeps."""
from __future__ import annotations

import torch
from torch import Tensor


def template(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A plan's output template: what ``torch.empty_like`` reads (the shape,
    dtype and device; its result is contiguous, as of a contiguous template)
    with one element behind it. A plan lives as long as its signature stays
    in its cache, so a template of the output's own size would hold a second
    output's memory the whole time (a decoder output's gradient at k = 5000
    samples: gigabytes); empty_like of the expanded element costs the same."""
    return torch.empty((), dtype=dtype, device=device).expand(shape)


class PlanCache(dict):
    """Call signature -> plan (None where the general path serves the
    signature, checks included, on every call), kept at most ``max_plans``:
    a loop whose shapes keep changing makes no unbounded cache, so past it
    every plan is forgotten. A dict, so that the per-call look-up is a dict's
    own (``PLANS.get(key)`` or ``PLANS[key]``) and not a call into Python;
    only a signature's first call stores."""

    __slots__ = ("max_plans",)

    def __init__(self, max_plans: int = 64):
        super().__init__()
        self.max_plans = max_plans

    def store(self, key, plan):
        """Keeps ``plan`` for ``key`` and returns it."""
        if len(self) >= self.max_plans:
            self.clear()
        self[key] = plan
        return plan


class Launch:
    """One planned kernel launch: the kernel's ``run``, its grid and its
    compile-time parameters (and num_warps), bound once.

    On CUDA, the first call goes through Triton's ``JITFunction.run``, which
    binds and specializes the arguments, compiles or finds the kernel, and
    returns it (a ``CompiledKernel``). Later calls launch that kernel through
    its launcher directly, as vLLM's Triton kernel cache does (18.5 -> 7.7 us a
    launch on the H100 host, gpu-probe's launch_cost.py), skipping the binding
    and the cache lookup: the plan fixes everything those depend on but the
    tensors' addresses (the plan key fixes the shapes, hence the integer
    arguments, and the dtypes). Of an address Triton's specialization reads
    whether it is 16-byte aligned: a kernel compiled for an aligned pointer
    may use vector loads that an unaligned one would fault on, so each call
    checks that the pointers aligned at the first launch still are, and the
    current device, and takes ``JITFunction.run`` again where one is not or a
    launch hook is set (a profiler's). Under the interpreter ``run`` returns
    no compiled kernel and every call takes it."""

    __slots__ = ("kernel", "kwargs", "direct")

    def __init__(self, kernel, grid, meta):
        self.kernel, self.kwargs = kernel, dict(grid=grid, warmup=False, **meta)
        self.direct = None  # after the first launch: what _direct_launch returned, or False

    def __call__(self, *args) -> None:
        d = self.direct
        if d:
            launcher, function, packed, g0, g1, g2, tail, aligned, device, rt = d
            address_bits = 0
            for i in aligned:
                address_bits |= args[i].data_ptr()
            hooks = rt.knobs.runtime
            if (not address_bits & 15 and rt.current_device() == device and not _hooked(hooks.launch_enter_hook)
                    and not _hooked(hooks.launch_exit_hook)):
                launcher(g0, g1, g2, rt.current_stream(device), function, packed, None, None, None, *args, *tail)
                return
        # run looked up per call: a patched run (tests/test_launches.py counts launches) is seen
        compiled = self.kernel.run(*args, **self.kwargs)
        if d is None:
            self.direct = _direct_launch(self.kernel, compiled, args, self.kwargs) or False


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set: a callable, or (Triton >= 3.5) a
    HookChain holding any (an empty chain is Triton's default)."""
    return hook is not None and (type(hook).__name__ != "HookChain" or bool(hook.calls))




class _Runtime:
    """Triton's driver calls a direct launch makes (tests replace it: there is
    no CUDA driver on a CPU machine)."""

    def __init__(self):
        from triton import knobs
        from triton.runtime import driver
        self.knobs = knobs
        self.current_device = driver.active.get_current_device
        self.current_stream = driver.active.get_current_stream

    @staticmethod
    def is_compiled(kernel) -> bool:
        from triton.compiler.compiler import CompiledKernel
        return isinstance(kernel, CompiledKernel)


_runtime = None  # made at the first launch that returned a compiled kernel (tests and the host-cost
# benchmark put a stand-in here: there is no CUDA driver on a CPU machine)


def _direct_launch(kernel, compiled, args: tuple, kwargs: dict):
    """The direct launch of ``compiled``, the kernel ``kernel.run(*args,
    **kwargs)`` returned: (its launcher, function handle, packed metadata, the
    grid, the constexpr arguments in signature order after ``args``, the
    positions of the tensors whose address was 16-byte aligned, the device,
    the runtime); None where ``run``
    returned no compiled kernel (the interpreter, a stubbed launch) or the
    kernel has hooks of its own."""
    global _runtime
    grid = kwargs["grid"]
    if compiled is None or getattr(kernel, "pre_run_hooks", None) or callable(grid):
        return None
    if _runtime is None:
        try:
            _runtime = _Runtime()
        except Exception:  # no active driver: nothing to launch directly
            return None
    if not _runtime.is_compiled(compiled):
        return None
    import inspect
    params = list(inspect.signature(kernel.fn).parameters.values())
    tail = []
    for p in params[len(args):]:  # as JITFunction's binder: keywords by name, else the default
        if p.name in kwargs:
            tail.append(kwargs[p.name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            return None
    g0, g1, g2 = (*grid, 1, 1)[:3]
    aligned = tuple(i for i, a in enumerate(args) if isinstance(a, Tensor) and a.data_ptr() % 16 == 0)
    return (compiled.run, compiled.function, compiled.packed_metadata, g0, g1, g2, tuple(tail), aligned,
            _runtime.current_device(), _runtime)
