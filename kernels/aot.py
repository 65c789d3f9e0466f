"""Compile every Triton kernel of fastvae ahead of time for a GPU, without one.

    python -m fastvae.kernels.aot                       # sm_90 and sm_80, every op, shape and dtype
    python -m fastvae.kernels.aot --arch sm_90 --op sample_normal --shape K=50,B=256,L=32,D=784
    python -m fastvae.kernels.aot --json                # one JSON object per launch
    python -m fastvae.kernels.aot --noise-cost          # SASS instructions per normal of the noise
    python -m fastvae.kernels.aot --json --sass         # ... with each variant's global load widths (SASS)

Each op's launchers run with torch "meta" tensors (shapes and dtypes, no
data: every pointer counts as 16-byte aligned, as a fresh CUDA allocation is).
Triton's own launcher path (binder, argument packing, ASTSource) is replayed
up to ``triton.compile`` for ``GPUTarget("cuda", 90 or 80, 32)``, so what
compiles here is what a GPU would run; ptxas (shipped with Triton) reports
registers and spills. Each distinct variant compiles once. The exit status is
1 if any variant fails to compile.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime import jit

from fastvae import _registry
from fastvae._dtypes import accumulation_dtype

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
SMS = {"sm_90": 132, "sm_80": 108}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
TRAINING = [dict(K=K, B=B, L=L, D=D) for K, B, L, D in
            itertools.product((1, 5, 50), (64, 256, 1024), (16, 32, 128), (64, 784, 3072, 12288))]
EVALUATION = [dict(K=5000, B=B, L=32, D=784) for B in (1, 64, 256)]
SHAPES = TRAINING + EVALUATION


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def calls(op: str, s: dict, dtype: torch.dtype):
    """(kernel, arguments) of every launch the op makes at shape s: the
    forward and backward in each mode the front end uses (a training decoder
    of D outputs per sample; log-weights of K samples for B examples): each
    op's folder gives them (a family's: all its ops'), with ``m`` and ``r``
    making meta tensors of the input dtype and of its accumulation dtype."""
    acc = accumulation_dtype(dtype)
    m = lambda *shape: meta(*shape, dtype=dtype)  # noqa: E731
    # bounds, KL terms, log-probabilities and log-weights (and their incoming
    # gradients) are float32 for half-precision inputs
    r = lambda *shape: meta(*shape, dtype=acc)  # noqa: E731
    yield from _registry.FOLDERS[_registry.FOLDER_OF[op]].aot_calls(s, m, r)


@dataclass
class Launch:
    op: str
    kernel: str
    launcher: str
    arch: str
    dtype: str
    shape: dict
    grid: tuple
    num_warps: int
    key: tuple
    source: object = field(repr=False)
    options: object = field(repr=False)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@contextlib.contextmanager
def recording(arch: str, launches: list):
    """Within the block, every ``kernel[grid](...)`` is recorded instead of run:
    Triton's launcher up to the compile call, for the target arch."""
    backend = make_backend(TARGETS[arch])
    binders = {}
    original = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
        for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what Triton 3.9's run() adds
            if hasattr(triton.knobs.compilation, knob):
                kwargs[knob] = getattr(triton.knobs.compilation, knob)
        if self not in binders:
            binders[self] = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        # the arch is part of a variant: sm_80 and sm_90 compile the same source to different code
        key = (self.fn.__name__, arch, tuple(signature.items()), repr(sorted(constexprs.items(), key=str)),
               repr(sorted(attrs.items(), key=str)), options.num_warps, options.num_stages)
        launches.append(Launch("", self.fn.__name__, "", arch, "", {}, grid, options.num_warps, key,
                               ASTSource(self, signature, constexprs, attrs), options))

    jit.JITFunction.run = run
    try:
        yield
    finally:
        jit.JITFunction.run = original


_PTXAS = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes spill stores, (\d+) bytes spill loads)?", re.S)


# The compiled kernel of each variant compile_variant built, by Launch.key: its SASS is read on demand.
_COMPILED: dict = {}


def compile_variant(launch: Launch, cache: dict) -> dict:
    """Registers, spill bytes and any error of the launch's variant (compiled once)."""
    if launch.key in cache:
        return cache[launch.key]
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            compiled = triton.compile(launch.source, target=TARGETS[launch.arch], options=launch.options.__dict__)
        _COMPILED[launch.key] = compiled
        info = _resources(compiled, log.getvalue())
    except Exception as err:  # noqa: BLE001 (every compile failure is reported, not raised)
        info = {"ok": False, "registers": None, "spill_bytes": None, "error": f"{type(err).__name__}: {err}"[:2000]}
    cache[launch.key] = info
    return info


def _resources(compiled, ptxas_log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if regs is None:  # no ptxas log: read the cubin's resource usage
        import os
        import subprocess
        import tempfile

        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
        # spills live in the stack frame (LOCAL stays 0 for them): the frame's
        # bytes stand in for ptxas's spill count, 0 exactly when it is 0
        return {"ok": True, "registers": int(found[1]) if found else None,
                "spill_bytes": int(found[2]) + int(found[4]) if found else None, "error": None}
    return {"ok": True, "registers": int(regs[1]),
            "spill_bytes": int(spills[1]) + int(spills[2]) if spills else 0, "error": None}


_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass(compiled) -> str:
    """The kernel's SASS: cuobjdump -sass of its cubin (cuobjdump ships with Triton)."""
    import os
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def sass_opcodes(text: str) -> list[str]:
    """The opcodes (with their modifiers, e.g. LDG.E.128.CONSTANT) of SASS text, in order."""
    return _SASS_OP.findall(text)


# Width in bits of a global load by its size modifier; a plain LDG.E moves 32 bits.
_LOAD_BITS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def global_load_widths(text: str) -> dict[int, int]:
    """{bits: count} of the global loads (LDG) in SASS text: LDG.E.128 is a 128-bit
    (4 x float32) vector load, LDG.E.64 a 64-bit one, LDG.E a 32-bit one."""
    widths: dict[int, int] = {}
    for op in sass_opcodes(text):
        parts = op.split(".")
        if parts[0] != "LDG":
            continue
        bits = next((_LOAD_BITS[p] for p in parts[1:] if p in _LOAD_BITS), 32)
        widths[bits] = widths.get(bits, 0) + 1
    return widths


def launch_sass(launch: Launch, cache: dict) -> str | None:
    """The SASS of the launch's variant (compiled once, through compile_variant); None
    if it does not compile."""
    if not compile_variant(launch, cache)["ok"]:
        return None
    if launch.key not in _COMPILED:  # the info came from a cache filled elsewhere
        _COMPILED[launch.key] = triton.compile(launch.source, target=TARGETS[launch.arch],
                                               options=launch.options.__dict__)
    return sass(_COMPILED[launch.key])


def has_128bit_global_loads(launch: Launch, cache: dict) -> bool:
    """Whether the launch's variant loads global memory 128 bits at a time (LDG.E.128) anywhere."""
    text = launch_sass(launch, cache)
    return text is not None and 128 in global_load_widths(text)


def sass_instructions(compiled) -> int:
    """The static count of SASS instructions in the kernel's cubin (cuobjdump), NOPs and the
    trailing BRA-to-self excluded."""
    ops = [op for op in _SASS_OP.findall(sass(compiled)) if op != "NOP"]
    while ops and ops[-1] == "BRA":  # the end-of-kernel self loop
        ops.pop()
    return len(ops)


def _constexpr(launch: Launch, name: str):
    names = launch.source.fn.arg_names
    return launch.source.constants[(names.index(name),)]


# Noise kernels and the launches whose SASS the noise cost is read from: the pure
# fill (aligned and not) and the sampler at a training shape (L = 32: aligned; L = 30: not).
NOISE_LAUNCHES = {
    "randn_fill": [dict(seed=meta(dtype=torch.int64), offset0=o, out=meta(256, 4096), row_stride=4096)
                   for o in (0, 1)],
    "sample_normal_forward": [dict(mu=meta(1024, L), logvar=meta(1024, L), seed=meta(dtype=torch.int64),
                                   offset0=0, sample_stride=1024 * L, row_stride=L, z=meta(16, 1024, L),
                                   kl=meta(1024), log_ratio=None) for L in (32, 30)],
}


@triton.jit
def _no_randn4(seed, counters, ACC: tl.constexpr):
    """Stands in for philox.randn4 when the sampler's own instructions are counted."""
    return (counters + tl.arange(0, 4)).to(ACC)


@triton.jit
def _no_randn(seed, offsets, ACC: tl.constexpr):
    return offsets.to(ACC)


def _compile_launch(kernel: str, args: dict, arch: str, without_noise: bool = False):
    """(launch, compiled) of one launcher call; without_noise compiles the kernel with the
    noise replaced by a conversion of its counters (one instruction an element or so)."""
    import types

    from fastvae._backend import triton_module

    module = triton_module(_registry.KERNELS[kernel].module)
    swapped = {}
    if without_noise:
        for name, value in vars(module).items():
            if isinstance(value, jit.JITFunction) and {"randn", "randn4"} & set(value.fn.__code__.co_names):
                g = dict(value.fn.__globals__, randn=_no_randn, randn4=_no_randn4)
                fn = types.FunctionType(value.fn.__code__, g, value.fn.__name__, value.fn.__defaults__,
                                        value.fn.__closure__)
                fn.__annotations__, fn.__module__ = value.fn.__annotations__, value.fn.__module__
                swapped[name] = value
                setattr(module, name, jit.JITFunction(fn, do_not_specialize=value.do_not_specialize))
    launches: list = []
    try:
        with recording(arch, launches):
            getattr(module, kernel)(**args)
    finally:
        for name, value in swapped.items():
            setattr(module, name, value)
    launch = launches[0]
    return launch, triton.compile(launch.source, target=TARGETS[arch], options=launch.options.__dict__)


def noise_cost(arch: str = "sm_90") -> list[dict]:
    """SASS instructions per normal. For the fill: its whole static SASS count over
    the normals each thread draws (its tile over 32 * num_warps threads), noise,
    indexing and stores together. For the sampler: the count less that of the
    same kernel with the noise stubbed out, over the normals per thread: the
    noise's own cost in it (the whole kernel's is reported too)."""
    rows = []
    for kernel, variants in NOISE_LAUNCHES.items():
        for args in variants:
            launch, compiled = _compile_launch(kernel, args, arch)
            if kernel == "randn_fill":
                tile = _constexpr(launch, "BLOCK")
            else:
                tile = _constexpr(launch, "BLOCK_R") * _constexpr(launch, "BLOCK_L")
            per_thread = tile / (32 * launch.num_warps)
            count = sass_instructions(compiled)
            row = {"kernel": launch.kernel, "arch": arch, "aligned": _constexpr(launch, "ALIGNED"),
                   "normals_per_thread": per_thread, "sass_instructions": count,
                   "sass_per_normal": round(count / per_thread, 1)}
            if kernel != "randn_fill":
                rest = sass_instructions(_compile_launch(kernel, args, arch, without_noise=True)[1])
                row["sass_without_noise"] = rest
                row["noise_sass_per_normal"] = round((count - rest) / per_thread, 1)
            rows.append(row)
    return rows


def collect(archs, ops, shapes, dtypes) -> list[Launch]:
    """Every launch of every op at every shape and dtype, per arch (not compiled);
    a family's launches once, under the first of its ops named (its folder
    gives the cases of all its ops at once)."""
    from fastvae._backend import triton_module

    first = {}
    for op in ops:
        first.setdefault(_registry.FOLDER_OF[op], op)
    ops = list(first.values())
    launches = []
    for arch in archs:
        with recording(arch, launches):
            for op, shape, dtype_name in itertools.product(ops, shapes, dtypes):
                for kernel, args in calls(op, shape, DTYPES[dtype_name]):
                    spec = _registry.KERNELS[kernel]
                    names = tuple(args)
                    if names[:len(spec.args)] != spec.args or not set(names[len(spec.args):]) <= set(spec.bound):
                        raise AssertionError(f"{kernel}: arguments {names} differ from the registry")
                    first = len(launches)
                    getattr(triton_module(_registry.KERNELS[kernel].module), kernel)(**args)
                    for launch in launches[first:]:
                        launch.op, launch.launcher, launch.dtype, launch.shape = op, kernel, dtype_name, shape
    return launches


def parse_shape(text: str) -> dict:
    shape = dict(K=50, B=256, L=32, D=784)
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in shape:
            raise argparse.ArgumentTypeError(f"unknown dimension {name!r} (use K, B, L, D)")
        shape[name.strip()] = int(value)
    return shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvae.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(TARGETS), default=["sm_90", "sm_80"])
    parser.add_argument("--op", nargs="+", choices=list(_registry.OPS), default=None)
    parser.add_argument("--shape", type=parse_shape, action="append",
                        help="K=..,B=..,L=..,D=.. (unnamed dimensions: K=50,B=256,L=32,D=784); repeatable")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--json", action="store_true", help="one JSON object per launch")
    parser.add_argument("--sass", action="store_true",
                        help="also report each variant's global loads by width in bits (ldg_bits, from its SASS)")
    parser.add_argument("--noise-cost", action="store_true",
                        help="only the SASS instructions per normal of the noise kernels (sm_90)")
    args = parser.parse_args(argv)
    if args.noise_cost:
        for row in noise_cost():
            print(json.dumps(row))
        return 0
    ops = args.op or list(_registry.OPS)
    launches = collect(args.arch, ops, args.shape or SHAPES, args.dtype)
    cache: dict = {}
    failures = 0
    if not args.json:
        print(f"{'op':20} {'kernel':34} {'arch':6} {'dtype':9} {'shape':28} {'programs':>9} {'warps':>5} "
              f"{'regs':>5} {'spill':>6}  status")
    for launch in launches:
        info = compile_variant(launch, cache)
        failures += not info["ok"]
        row = {"op": launch.op, "kernel": launch.kernel, "launcher": launch.launcher, "arch": launch.arch,
               "dtype": launch.dtype, "shape": launch.shape, "grid": list(launch.grid), "programs": launch.programs,
               "num_warps": launch.num_warps, **info}
        if args.sass:
            text = launch_sass(launch, cache)
            row["ldg_bits"] = None if text is None else {str(b): n for b, n in sorted(global_load_widths(text).items())}
        if args.json:
            print(json.dumps(row))
        else:
            shape = ",".join(f"{k}={v}" for k, v in launch.shape.items())
            status = "ok" if info["ok"] else "FAILED: " + info["error"].splitlines()[0][:80]
            print(f"{launch.op:20} {launch.kernel:34} {launch.arch:6} {launch.dtype:9} {shape:28} "
                  f"{launch.programs:>9} {launch.num_warps:>5} {info['registers'] or '-':>5} "
                  f"{'-' if info['spill_bytes'] is None else info['spill_bytes']:>6}  {status}")
    summary = (f"{len(launches)} launches, {len(cache)} distinct variants compiled, {failures} failed "
               f"({', '.join(args.arch)})")
    print(summary, file=sys.stderr)
    return 1 if any(not info["ok"] for info in cache.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
