"""The Triton kernels build for a real GPU (sm_90) without one, and their code has
the marks of a fast kernel (docs/internals/triton.md, Geometry): every launch at a reduced
shape set compiles, nothing spills in fp32/bf16/fp16, the heavy ops run at least
4 warps a program wherever the problem has the elements for it, big problems
launch at least one wave over an H100's 132 SMs, the forward kernels of the
likelihoods and the sampler read contiguous float32 rows 128 bits at a time, and
a new batch size or K compiles nothing new. Speed itself is judged by measured
bandwidth on a GPU, which no test here can do.

Compiling every variant takes minutes of CPU: the tests that compile are
marked ``gpu_compile`` (``-m "not gpu_compile"`` leaves them out) and split by
op, dtype and shape, each case's compile in one test of seconds, so that
pytest reports progress as they go. float16 is not compiled: its launches are
bfloat16's with the other 16-bit element type (a test checks it, launch by
launch), and every such pair compiled to the same registers and spills when
measured (docs/architecture.md, The tiers); ``python -m fastvae.kernels.aot
--dtype float16`` compiles them."""
import pytest

from conftest import FULL, INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles for a GPU target; not an interpreter test")
aot = pytest.importorskip("fastvae.kernels.aot", reason="needs triton")
gpu_compile = pytest.mark.gpu_compile

SHAPES = [dict(K=50, B=256, L=32, D=784), dict(K=5, B=256, L=16, D=64), dict(K=5000, B=1, L=32, D=784)]
SMS = aot.SMS["sm_90"]  # 132 on an H100
MIN_WARPS = 4
# A tile of a few thousand elements at 4-8 warps: a problem of at least one such tile
# can give every program 4 warps of work (4 warps x 32 threads x 32 elements).
TILE_ELEMENTS = 4096
# A problem of at least one tile per SM can fill a wave over every SM.
WAVE_ELEMENTS = SMS * TILE_ELEMENTS


def rows(launch) -> str | None:
    """The rows' dimension of the launch's kernel where it is heavy ("D" or "L"), else None
    (its registry record: Kernel.heavy)."""
    return aot._registry.KERNELS[launch.launcher].heavy


def problem_elements(launch) -> int:
    """The elements of the heavy kernel's problem: K x B x D or K x B x L."""
    s = launch.shape
    return s["K"] * s["B"] * s[rows(launch)]


def heavy(compiled):
    return [(launch, info) for launch, info in compiled if rows(launch)]


def describe(launch, *extra):
    shape = ",".join(f"{k}={v}" for k, v in launch.shape.items())
    return (launch.launcher, launch.kernel, launch.dtype, shape, *extra)


# one op of each folder (a family's folder compiles all its ops' launches), dtype and shape: one case each
FAMILIES = list(dict.fromkeys(aot._registry.FOLDER_OF[op] for op in aot._registry.OPS))
DTYPES = ["float32", "bfloat16", "float16"]
COMPILED_DTYPES = ["float32", "bfloat16"]  # float16: bfloat16's launches (test_float16_launches_are_bfloat16s)
SHAPE_IDS = ["_".join(f"{k}{v}" for k, v in shape.items()) for shape in SHAPES]


def cases(dtypes):
    return [pytest.param(folder, dtype, i, id=f"{folder}-{dtype}-{SHAPE_IDS[i]}")
            for folder in FAMILIES for dtype in dtypes for i in range(len(SHAPES))]


CASES = cases(COMPILED_DTYPES)
_CACHE: dict = {}  # compile_variant's results by variant, shared by the cases (some kernels serve several ops)
_COMPILED: dict = {}  # (folder, dtype, shape index): [(launch, info)]
# pytest's progress shows only this file's name: conftest.py prints this line before its first test
NOTE = (f"tests/test_aot.py: compiling the Triton kernels for an H100 (sm_90) on the CPU, no GPU used: "
        f"{len(CASES)} cases of an op, dtype and shape, seconds each" if FULL else
        "tests/test_aot.py: the compile tool's own checks (its GPU compiles are the full tier's)")


def launches(folder: str, dtype: str, shape: int) -> list:
    """Every launch of the folder's ops at SHAPES[shape] in dtype, for sm_90 (recorded, not compiled)."""
    op = next(op for op in aot._registry.OPS if aot._registry.FOLDER_OF[op] == folder)
    return aot.collect(["sm_90"], [op], [SHAPES[shape]], [dtype])


def compiled(folder: str, dtype: str, shape: int):
    """launches(), each compiled for sm_90, with compile_variant's report
    (compiled by the first test that asks)."""
    if (folder, dtype, shape) not in _COMPILED:
        _COMPILED[folder, dtype, shape] = [(launch, aot.compile_variant(launch, _CACHE))
                                           for launch in launches(folder, dtype, shape)]
    return _COMPILED[folder, dtype, shape]


@gpu_compile
@pytest.mark.parametrize(("folder", "dtype", "shape"), CASES)
def test_gpu_compile_without_spills(folder, dtype, shape):
    launches = compiled(folder, dtype, shape)
    assert launches
    failed = {(launch.kernel, launch.dtype): info["error"] for launch, info in launches if not info["ok"]}
    assert not failed, failed
    spilling = {(launch.kernel, launch.dtype, info["spill_bytes"]) for launch, info in launches if info["spill_bytes"]}
    assert not spilling, spilling


@gpu_compile
@pytest.mark.parametrize(("folder", "dtype", "shape"), cases(DTYPES))
def test_gpu_compile_heavy_ops_run_enough_warps(folder, dtype, shape):
    """Every heavy kernel (the registry's Kernel.heavy: the likelihoods and the
    samplers, forward and backward): at least 4 warps a program wherever the
    problem has a tile's worth of elements (K x B x L or D >= 4096): fewer warps
    cannot keep enough loads in flight to reach the memory bandwidth."""
    few = sorted({describe(launch, f"elements={problem_elements(launch)}", f"warps={launch.num_warps}")
                  for launch in launches(folder, dtype, shape)
                  if rows(launch) and problem_elements(launch) >= TILE_ELEMENTS and launch.num_warps < MIN_WARPS})
    assert not few, few


@gpu_compile
@pytest.mark.parametrize(("folder", "dtype", "shape"), cases(DTYPES))
def test_gpu_compile_big_problems_launch_a_wave(folder, dtype, shape):
    """Where the problem has at least a tile per SM (132 x 4096 elements), a heavy
    op's launch has at least one program per SM (one wave)."""
    small = sorted({describe(launch, f"elements={problem_elements(launch)}", f"programs={launch.programs}")
                    for launch in launches(folder, dtype, shape)
                    if rows(launch) and problem_elements(launch) >= WAVE_ELEMENTS and launch.programs < SMS})
    assert not small, small


@gpu_compile
@pytest.mark.parametrize("folder", sorted({kernel.module for kernel in aot._registry.KERNELS.values()
                                            if kernel.vector_loads}))
@pytest.mark.parametrize("shape", range(len(SHAPES)), ids=SHAPE_IDS)
def test_gpu_compile_forward_kernels_load_128_bits_at_a_time(folder, shape):
    """The kernels whose registry record says vector_loads (the likelihoods' and
    the samplers' forward kernels) read contiguous float32 rows whose length (D
    or L, their Kernel.heavy) is a multiple of 4 with 128-bit loads (LDG.E.128
    in their SASS): 4 floats a thread a load, the widest a GPU has."""
    checked, scalar = 0, set()
    for launch, info in compiled(folder, "float32", shape):
        kernel = aot._registry.KERNELS[launch.launcher]
        if not kernel.vector_loads or launch.dtype != "float32" or launch.shape[kernel.heavy] % 4 or not info["ok"]:
            continue
        checked += 1
        if not aot.has_128bit_global_loads(launch, _CACHE):
            text = aot.launch_sass(launch, _CACHE)
            scalar.add(describe(launch, f"LDG bits={aot.global_load_widths(text)}"))
    assert checked
    assert not scalar, sorted(scalar)


@pytest.mark.parametrize("shape", range(len(SHAPES)), ids=SHAPE_IDS)
def test_float16_launches_are_bfloat16s(shape):
    """Every op's float16 launches are its bfloat16 launches, one for one, with
    the other 16-bit element type and nothing else changed: the same kernels,
    grids, warps, stages, constants and specializations. So compiling bfloat16
    compiles float16's code paths, and the GPU compile tests compile one of the
    two (both compiled to the same registers and spills where measured)."""
    def key(launch):
        return (launch.op, launch.kernel, launch.grid, launch.num_warps,
                repr(launch.key).replace("bf16", "16-bit").replace("fp16", "16-bit"))

    ops = list(aot._registry.OPS)
    bf16 = [key(launch) for launch in aot.collect(["sm_90"], ops, [SHAPES[shape]], ["bfloat16"])]
    fp16 = [key(launch) for launch in aot.collect(["sm_90"], ops, [SHAPES[shape]], ["float16"])]
    assert bf16 and fp16 == bf16
    assert any("16-bit" in k[-1] for k in bf16)  # the element type is in the key, and only it differed


def test_global_load_widths_read_the_sass():
    sass = """
        /*0090*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*00a0*/              @!P0 LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
        /*00b0*/                   LDG.E R12, desc[UR4][R2.64] ;
        /*00c0*/                   LDG.E.64 R14, desc[UR4][R2.64] ;
        /*00d0*/                   LDG.E.U16 R16, desc[UR4][R2.64] ;
        /*00e0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
    """
    assert aot.global_load_widths(sass) == {128: 2, 32: 1, 64: 1, 16: 1}


def test_batch_size_compiles_no_new_variant():
    """Block shapes follow the row length only, and row, sample and batch
    counts are not specialized on: for every op, a run of any batch size and
    K compiles only the variants of two reference shapes (K = 50 and K = 5 of
    256 rows: logmeanexp's forward splits K only where K exceeds one tile's
    rows, a second code path, not a variant per size)."""
    ops = list(aot._registry.OPS)

    def variants(B, K):
        launches = aot.collect(["sm_90"], ops, [dict(K=K, B=B, L=32, D=784)], ["float32"])
        return {launch.key: launch.kernel for launch in launches}

    reference = {**variants(256, 50), **variants(256, 5)}
    assert {kernel for kernel in reference.values()} >= {"_kl_normal_fwd_kernel", "_logmeanexp_fwd_kernel",
                                                          "_logmeanexp_bwd_kernel", "_sample_normal_bwd_kernel"}
    for B, K in ((100, 50), (1, 5000), (1023, 7), (64, 1), (3, 333)):
        new = variants(B, K).keys() - reference.keys()
        assert not new, (B, K, sorted(variants(B, K)[key] for key in new))


def test_json_lines_report_each_launch(capsys):
    assert aot.main(["--arch", "sm_90", "--op", "bernoulli_log_prob", "--shape", "K=5,B=256,D=64",
                     "--dtype", "float32", "--json", "--sass"]) == 0
    import json

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {row["kernel"] for row in rows} == {"_bernoulli_log_prob_fwd_kernel", "_bernoulli_log_prob_bwd_kernel"}
    for row in rows:
        assert set(row) >= {"op", "kernel", "arch", "dtype", "shape", "grid", "programs", "num_warps", "registers",
                            "spill_bytes", "ok", "error", "ldg_bits"}
        assert row["ok"] and row["programs"] >= 1 and row["registers"] > 0 and row["ldg_bits"]


def test_every_triton_kernel_is_launched_by_the_tool():
    """Every @triton.jit kernel in kernels/ and in the op folders' triton.py is
    among the tool's launches, so a kernel the tool never compiles cannot hide
    a compile error."""
    import re
    from pathlib import Path

    import fastvae.ops

    paths = [*Path(aot.__file__).parent.glob("*.py"), *Path(fastvae.ops.__file__).parent.glob("*/triton.py")]
    source = "".join(p.read_text() for p in paths)
    kernels = set(re.findall(r"@triton\.jit[^\n]*\ndef (_\w+_kernel)\(", source))
    launched = {launch.kernel for launch in aot.collect(["sm_90"], list(aot._registry.OPS),
                                                        [dict(K=5, B=256, L=32, D=784), dict(K=5000, B=1, L=32, D=784)],
                                                        ["float32"])}
    assert kernels and kernels <= launched, kernels - launched


def test_mixture_log_prob_runs_enough_warps_and_a_wave_at_the_benchmark_size():
    """mixture_log_prob's forward and both backward kernels, at K = 30, B = 1024
    (its benchmark size, 30720 rows against U = 100 components): at least 4 warps
    a program and one program per SM."""
    launches = aot.collect(["sm_90"], ["mixture_log_prob"], [dict(K=30, B=1024, L=32, D=784)], ["float32"])
    assert {launch.kernel for launch in launches} == {"_mixture_fwd_kernel", "_mixture_dz_kernel",
                                                      "_mixture_params_kernel"}
    short = sorted({(launch.kernel, launch.programs, launch.num_warps) for launch in launches
                    if launch.programs < SMS or launch.num_warps < MIN_WARPS})
    assert not short, short
