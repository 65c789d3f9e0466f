"""The Triton kernels build for a real GPU (sm_90) without one: every launch at
a reduced shape set compiles, nothing spills in fp32/bf16/fp16, and the heavy
ops launch enough programs to fill an H100 (docs/triton.md)."""
import pytest

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles for a GPU target; not an interpreter test")
aot = pytest.importorskip("fastvae.kernels.aot", reason="needs triton")

HEAVY = ("sample_normal", "latent_log_ratio", "gaussian_log_prob", "bernoulli_log_prob")
SHAPES = [dict(K=50, B=256, L=32, D=784), dict(K=5, B=256, L=16, D=64), dict(K=5000, B=1, L=32, D=784)]
GPU_FILLING = 2 * 132  # two programs per H100 SM


@pytest.fixture(scope="module")
def compiled():
    launches = aot.collect(["sm_90"], list(aot._registry.OPS), SHAPES, ["float32", "bfloat16", "float16"])
    cache = {}
    return [(launch, aot.compile_variant(launch, cache)) for launch in launches]


def test_every_launch_compiles_without_spills(compiled):
    assert compiled
    failed = {(launch.kernel, launch.dtype): info["error"] for launch, info in compiled if not info["ok"]}
    assert not failed, failed
    spilling = {(launch.kernel, launch.dtype, info["spill_bytes"]) for launch, info in compiled if info["spill_bytes"]}
    assert not spilling, spilling


def test_heavy_ops_fill_the_gpu(compiled):
    """sample_normal, latent_log_ratio and both likelihoods, forward and
    backward, launch at least 2 programs per SM at K >= 5, B >= 256 and at
    K = 5000 with a single example."""
    small = {(launch.launcher, launch.kernel, str(launch.shape), launch.programs)
             for launch, _ in compiled
             # the plain noise fills (evaluation's optional strided fill, the uniforms' test hook) are not heavy ops
             if launch.op in HEAVY and launch.kernel not in ("_randn_kernel", "_uniform_kernel")
             and launch.programs < GPU_FILLING}
    assert not small, sorted(small)


def test_batch_size_compiles_no_new_variant():
    """Block shapes follow the row length only: every batch size and K of a run
    reuses the variants of the first."""
    def variants(B, K):
        launches = aot.collect(["sm_90"], ["sample_normal", "gaussian_log_prob", "bernoulli_log_prob"],
                               [dict(K=K, B=B, L=32, D=784)], ["float32"])
        return {launch.key for launch in launches}

    first = variants(256, 50)
    for B, K in ((100, 50), (1, 5000), (1023, 7), (64, 1)):
        assert variants(B, K) == first, (B, K)


def test_json_lines_report_each_launch(capsys):
    assert aot.main(["--arch", "sm_90", "--op", "bernoulli_log_prob", "--shape", "K=5,B=256,D=64",
                     "--dtype", "float32", "--json"]) == 0
    import json

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {row["kernel"] for row in rows} == {"_bernoulli_log_prob_fwd_kernel", "_bernoulli_log_prob_bwd_kernel"}
    for row in rows:
        assert set(row) >= {"op", "kernel", "arch", "dtype", "shape", "grid", "programs", "num_warps", "registers",
                            "spill_bytes", "ok", "error"}
        assert row["ok"] and row["programs"] >= GPU_FILLING and row["registers"] > 0


def test_every_triton_kernel_is_launched_by_the_tool():
    """Every @triton.jit kernel in kernels/ is among the tool's launches, so a
    kernel the tool never compiles cannot hide a compile error."""
    import re
    from pathlib import Path

    source = "".join(p.read_text() for p in (Path(aot.__file__).parent).glob("*.py"))
    kernels = set(re.findall(r"@triton\.jit[^\n]*\ndef (_\w+_kernel)\(", source))
    launched = {launch.kernel for launch in aot.collect(["sm_90"], list(aot._registry.OPS),
                                                        [dict(K=5, B=256, L=32, D=784)], ["float32"])}
    assert kernels and kernels <= launched, kernels - launched


def test_mixture_log_prob_fills_the_gpu_at_the_benchmark_size():
    """mixture_log_prob's forward and both backward kernels launch at least 2
    programs per SM at K = 30, B = 1024 (its benchmark size)."""
    launches = aot.collect(["sm_90"], ["mixture_log_prob"], [dict(K=30, B=1024, L=32, D=784)], ["float32"])
    assert {launch.kernel for launch in launches} == {"_mixture_fwd_kernel", "_mixture_dz_kernel",
                                                      "_mixture_params_kernel"}
    small = {(launch.kernel, launch.programs) for launch in launches if launch.programs < GPU_FILLING}
    assert not small, small
