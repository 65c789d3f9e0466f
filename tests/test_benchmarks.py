"""The benchmark suite's plumbing: the summary, the markdown, the plots, the
saved-tensor measure and one per-op benchmark end to end in --quick mode.
Nothing here checks a speed (benchmarks measure; tests never time anything)."""
import json
import math

import pytest
import torch

from benchmarks import __main__ as suite_main
from benchmarks import common, harness


def record(impl, case, mode, ms, **extra):
    return {"impl": impl, "case": case, "mode": mode, "median_ms": ms, **extra}


def synthetic_payload():
    """Two cases of one op; case K=2 has no memory figures and no bytes model."""
    results = []
    for case, (e, c, f) in {"K=1": (4.0, 2.0, 1.0), "K=2": (9.0, 3.0, 3.0)}.items():
        for mode in harness.MODES:
            for impl, ms in (("eager", e), ("compiled", c), ("fastvae[cpp]", f)):
                extra = {"gbs": 10 / ms, "pct_copy_bw": 50 / ms, "activation_mb": ms, "peak_mb": 2 * ms} \
                    if case == "K=1" else {"gbs": None, "pct_copy_bw": None}
                results.append(record(impl, case, mode, ms, **extra))
    harness.add_speedups(results)
    return {"op": "toy_op", "title": "toy", "copy_bandwidth": {"gbs": 20.0}, "results": results,
            "table_markdown": "| t |\n|---|"}


def synthetic_suite(payloads):
    meta = common.metadata(torch.device("cpu"))
    return {"op": "suite", **meta, "benchmarks": ["toy_op"], "failures": [],
            "summary": common.summary_rows(payloads), "payloads": payloads}


def test_summary_rows_pair_each_fastvae_figure_with_its_baselines():
    rows = common.summary_rows([synthetic_payload()])
    assert [(r["case"], r["impl"]) for r in rows] == [("K=1", "fastvae[cpp]"), ("K=2", "fastvae[cpp]")]
    first = rows[0]
    assert (first["eager_ms"], first["compiled_ms"], first["fastvae_ms"]) == (4.0, 2.0, 1.0)
    assert first["speedup_vs_eager"] == pytest.approx(4.0)
    assert first["speedup_vs_compiled"] == pytest.approx(2.0)
    assert first["fastvae_peak_mb"] == 2.0 and first["eager_activation_mb"] == 4.0
    assert rows[1]["pct_copy_bw"] is None and rows[1]["fastvae_peak_mb"] is None


def test_summary_table_and_suite_markdown():
    payload = synthetic_payload()
    table = common.summary_table(common.summary_rows([payload]))
    lines = table.splitlines()
    assert len(lines) == 4  # header, separator, two rows
    assert "4.00x" in lines[2] and "2.00x" in lines[2] and "8.0 / 4.0 / 2.0" in lines[2]
    assert "n/a" in lines[3]
    md = suite_main.suite_markdown(synthetic_suite([payload]))
    assert table in md and "## toy_op" in md and payload["table_markdown"] in md


def test_plots_from_a_suite_json(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    path = tmp_path / "suite-toy.json"
    path.write_text(json.dumps(synthetic_suite([synthetic_payload()])))
    written = plots.main([str(path), "--out-dir", str(tmp_path / "png")])
    assert [p.name for p in written] == ["suite-toy-speedup.png", "suite-toy-bandwidth.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_tensor_bytes_counts_activations_not_live_tensors():
    x = torch.randn(1000, requires_grad=True)
    exp = common.saved_tensor_bytes(lambda: torch.exp(x), [x])  # exp saves its output
    assert exp["activation_mb"] * 2**20 == 4000 and exp["saved_mb"] * 2**20 == 4000
    square = common.saved_tensor_bytes(lambda: x * x, [x])  # saves x (twice, one storage)
    assert square["activation_mb"] == 0 and square["saved_mb"] * 2**20 == 4000


@pytest.mark.full  # a benchmark's run, 7-90 s: the quick tier runs one op row's end to end
def test_one_benchmark_quick_end_to_end(tmp_path):
    """bench_op bernoulli_likelihood --quick (a family's row: the size's op picks
    the op): returns its payload and writes it where --out says."""
    from benchmarks import bench_op

    out = tmp_path / "bernoulli.json"
    try:
        payload = bench_op.main(["bernoulli_likelihood", "--quick", "--device", "cpu", "--copy-mb", "4",
                                 "--out", str(out)])
    finally:
        torch._dynamo.reset()
    written = json.loads(out.read_text())
    assert written["results"] == payload["results"]
    # the CPU's vector ISA is in every result file: the figures depend on which C++ path ran
    assert written["machine"]["vector_isa"] in {"AVX-512", "AVX2", "SSE", "NEON", "SVE"}
    assert written["machine"]["vector_isa"] in written["device_name"]
    from fastvae import _C

    assert written["machine"]["fastvae_noise_path"] == _C.noise_isa()
    impls = {r["impl"] for r in payload["results"]}
    assert impls >= {"eager", "compiled"} and len(impls) == 3
    # bernoulli_log_prob: K = 1 and 4 in float32, K = 4 with bfloat16 logits (--quick keeps one
    # bfloat16 case); continuous_bernoulli_log_prob: K = 1 and 4 in float32
    assert len(payload["results"]) == 5 * 3 * len(harness.MODES)
    assert {r["logits"] for r in payload["results"]} == {"float32", "bfloat16"}
    assert {r["op"] for r in payload["results"]} == {"bernoulli_log_prob", "continuous_bernoulli_log_prob"}
    for r in payload["results"]:
        assert r["median_ms"] > 0
        if r["impl"].startswith("fastvae"):  # it keeps only its inputs for the backward
            assert r["activation_mb"] == 0
        if r["impl"] == "eager":
            assert r["speedup_vs_eager"] == 1.0


@pytest.mark.full  # a benchmark's run (15-60 s): the path traces run the benchmarks' code
def test_an_op_folder_s_benchmark_row_runs_end_to_end(tmp_path):
    """bench_op <op> --quick (an op in a folder of its own): its description's
    row, every size, mode and implementation, and the
    memory child, which replays the op's name with the other arguments."""
    from benchmarks import bench_op
    from fastvae import _registry

    name = sorted(_registry.FOLDERS)[0]
    bench = _registry.FOLDERS[name].BENCH
    out = tmp_path / "op.json"
    try:
        payload = bench_op.main([name, "--quick", "--device", "cpu", "--copy-mb", "4", "--out", str(out)])
    finally:
        torch._dynamo.reset()
    assert json.loads(out.read_text())["results"] == payload["results"]
    assert payload["op"] == name
    assert len(payload["results"]) == len(bench.quick) * 3 * len(harness.MODES)
    assert {r["impl"] for r in payload["results"]} >= {"eager", "compiled"}
    assert all(r["median_ms"] > 0 for r in payload["results"])
    label = bench_op.label(bench.quick[0], bench.label_keys)
    m = common.run_child_json(["benchmarks.bench_op", name, "--quick", "--memory-child", label, "eager"])
    assert m["peak_mb"] >= 0 and m["method"]


@pytest.mark.full  # a benchmark's run, 7-90 s: the quick tier runs one op row's end to end
def test_peak_memory_child():
    """The subprocess that --memory starts for one (case, implementation)."""
    m = common.run_child_json(["benchmarks.bench_op", "bernoulli_likelihood", "--quick", "--memory-child",
                               "op=bernoulli_log_prob,K=1,logits=float32", "eager"])
    # the quick K=1 case allocates a (1, 512, 784) float32 output and gradient: 3 MB
    assert m["peak_mb"] > 1 and m["method"]


def test_noise_benchmark_reports_every_noise_path(tmp_path):
    """bench_noise --quick (the noise stream alone, CPU): a figure for the path
    the loader picked, torch.randn, sample_normal's forward and every other path
    this CPU runs, in its JSON (speed is never asserted)."""
    from benchmarks import bench_noise
    from fastvae import _backend

    out = tmp_path / "noise.json"
    payload = bench_noise.main(["--quick", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text())["op"] == payload["op"] == "noise"
    if not _backend.cpp_available():
        assert payload["skipped"]
        return
    from fastvae import _C

    others = {f"fastvae[{p}]" for p in _C.noise_isas() if p != _C.noise_isa()}
    assert set(payload["rng_1_thread"]) == {"fastvae", "torch.randn", "sample_normal forward"} | others
    assert all(r["median_ns_per_normal"] > 0 for r in payload["rng_1_thread"].values())
    assert payload["machine"]["fastvae_noise_path"] == _C.noise_isa()


@pytest.mark.full  # a benchmark's run, 7-90 s: the quick tier runs one op row's end to end
def test_overhead_benchmark_reports_the_floor_and_every_op(tmp_path):
    """A smoke run: the rows exist and are positive times (speed is never asserted), one
    for every op of the training path."""
    from benchmarks import bench_overhead, gpu_model

    payload = bench_overhead.main(["--quick", "--out", str(tmp_path / "overhead.json")])
    cases = {r["case"] for r in payload["results"]}
    assert {"floor: x * 2", "floor: empty op (define + Function)"} <= cases
    for op in gpu_model.modelled():  # the training path's ops (the registry's Op.model_bytes)
        assert any(c.startswith(op) for c in cases), op
    assert all(r["median_us"] > 0 for r in payload["results"])
    assert json.loads((tmp_path / "overhead.json").read_text())["vector_isa"] == common.cpu_vector_isa()


def test_gpu_model_is_labelled_and_fills_the_gpu(tmp_path):
    """The model's rows say they are a model, and its programs column comes from
    the launchers: where a heavy kernel has 132 tiles of 4096 elements of work, it
    launches at least one wave over the H100's 132 SMs (docs/internals/triton.md: tiles
    are sized by bandwidth, not to fill a program count), sample_normal's
    backward too (it splits the samples where B * L is small)."""
    pytest.importorskip("triton")
    from benchmarks import gpu_model
    from fastvae import _registry

    payload = gpu_model.main(["--out", str(tmp_path / "model.json")])
    assert payload["label"] == "model, not measured"
    assert {row["op"] for row in payload["rows"]} == set(gpu_model.modelled()) >= {"sample_normal", "logmeanexp"}
    for row in payload["rows"]:
        assert row["min_bytes"] > 0 and row["predicted_us"] > 0
        shape = row["shape"]
        # a heavy kernel's rows (the registry's Kernel.heavy: "L" or "D"), None for a light one
        rows = _registry.KERNELS[f"{row['op']}_{row['direction']}"].heavy
        if rows is not None and shape["K"] * shape["B"] * shape[rows] >= 132 * 4096:
            assert row["programs"] >= 132, row
    # the bytes are the op's benchmark row's: sample_normal at K=1, B=256, L=32 in float32 reads mu and
    # logvar (B x L each) and writes z (K x B x L) and the KL (B)
    first = next(row for row in payload["rows"] if row["op"] == "sample_normal" and row["shape"]["K"] == 1)
    assert first["direction"] == "forward" and first["min_bytes"] == (2 * 256 * 32 + 256 * 32 + 256) * 4


# -- the per-call figures of a CUDA run (host us, kernels, GPU us, graph ms) -----
# Their measurement needs a GPU; what a CPU can check is the arithmetic on
# profiler events, the host timer, and how the figures reach the JSON and tables.


def cuda_like_payload():
    """synthetic_payload with the per-call figures a CUDA run adds to fwd+bwd
    records; fastvae's graph capture failed in case K=2."""
    payload = synthetic_payload()
    for r in payload["results"]:
        if r["mode"] != "fwd+bwd":
            continue
        failed = r["impl"].startswith("fastvae") and r["case"] == "K=2"
        r.update(host_us=100 * r["median_ms"], kernels_per_call=float(len(r["impl"])), gpu_us=10 * r["median_ms"],
                 graph_ms=None if failed else r["median_ms"] / 2,
                 graph_error="RuntimeError: operation not permitted when stream is capturing" if failed else None)
    return payload


def test_summary_rows_carry_the_per_call_figures():
    rows = common.summary_rows([cuda_like_payload()])
    first, second = rows
    assert (first["eager_host_us"], first["compiled_host_us"], first["fastvae_host_us"]) == (400.0, 200.0, 100.0)
    assert first["fastvae_kernels_per_call"] == len("fastvae[cpp]") and first["eager_gpu_us"] == 40.0
    assert first["fastvae_graph_ms"] == 0.5 and second["fastvae_graph_ms"] is None
    table = common.summary_table(rows).splitlines()
    for header in ("host us (e / c / f)", "kernels (e / c / f)", "GPU us (e / c / f)", "graph ms (e / c / f)"):
        assert header in table[0]
    assert "400 / 200 / 100" in table[2] and "5.0 / 8.0 / 12.0" in table[2] and "2.000 / 1.000 / 0.500" in table[2]
    assert "4.500 / 1.500 / n/a" in table[3]
    suite = {**synthetic_suite([cuda_like_payload()]), "device": "cuda"}
    md = suite_main.suite_markdown(suite)
    assert "\n".join(table) in md and "graph ms (CUDA-graph replay)" in md
    assert "CUDA-graph replay" not in suite_main.suite_markdown(synthetic_suite([synthetic_payload()]))


def test_cpu_tables_keep_their_columns():
    """A CPU payload has no per-call figures: no new columns, no None cells."""
    table = common.summary_table(common.summary_rows([synthetic_payload()]))
    assert "host us" not in table and "graph ms" not in table
    records = synthetic_payload()["results"]
    assert "host us" not in harness.table(*toy_cases_impls(records), records)


def toy_cases_impls(records):
    """Cases and implementations of a synthetic payload's records, for harness.table
    (which expects every record's activation figure, as a real run has)."""
    for r in records:
        r.setdefault("activation_mb", None)
    cases = [harness.Case(label, {}, None) for label in ("K=1", "K=2")]
    impls = [harness.Impl(name, None) for name in ("eager", "compiled", "fastvae[cpp]")]
    return cases, impls


def test_benchmark_table_has_per_call_columns_on_fwd_bwd_rows():
    payload = cuda_like_payload()
    md = harness.table(*toy_cases_impls(payload["results"]), payload["results"])
    table, notes = md.split("\n\n")
    lines = table.splitlines()
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    assert headers[-4:] == ["host us", "kernels", "GPU us", "graph ms"]
    cells = {(c[0], c[1], c[2]): c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert cells[("eager", "K=1", "fwd+bwd")][-4:] == ["400", "5.0", "40", "2.000"]
    assert cells[("fastvae[cpp]", "K=2", "fwd+bwd")][-1] == "capture failed"
    assert cells[("eager", "K=1", "forward")][-4:] == ["", "", "", ""]
    assert notes == ("graph capture failed, fastvae[cpp] K=2: "
                     "RuntimeError: operation not permitted when stream is capturing")


def test_kernel_stats_counts_device_events_per_call():
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(device_type=cuda, name="triton_kernel", device_time=3.0),
              SimpleNamespace(device_type=cuda, name="Memset (Device)", device_time=None, cuda_time=1.0),
              SimpleNamespace(device_type=cuda, name="triton_kernel", device_time=5.0),
              SimpleNamespace(device_type=cpu, name="aten::mul", device_time=0.0)]
    stats = common.kernel_stats(events, calls=2)
    assert stats["kernels_per_call"] == 1.5 and stats["gpu_us"] == 4.5
    assert stats["top_kernels"] == [["triton_kernel", 1.0], ["Memset (Device)", 0.5]]
    # real profiler events (CPU ones here: the attributes kernel_stats reads exist)
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(100)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            torch.mul(x, x)
    real = common.kernel_stats(prof.events(), calls=4, device_type=cpu)
    assert ["aten::mul", 1.0] in real["top_kernels"] and real["gpu_us"] >= 0


def test_call_figures_on_cpu():
    """host_us is measured on any device (calls + 1 calls, no sync); the rest is
    CUDA-only and None here, and a graph replay off CUDA says why it has no figure."""
    calls = []
    impl = harness.Impl("eager", lambda a: calls.append(1) or (a * a).sum())
    a = torch.randn(10, requires_grad=True)
    figures = harness.call_figures(impl, ((a,), [a], None), torch.device("cpu"), host_calls=7)
    assert len(calls) == 8 and figures["host_us"] > 0
    assert all(figures[f] is None for f in ("kernels_per_call", "gpu_us", "graph_ms"))
    assert common.graph_replay_ms(lambda: None, torch.device("cpu"))["graph_ms"] is None
    records = [record("eager", "K=1", m, 1.0) for m in harness.MODES]
    harness.add_call_figures(records, {("eager", "K=1"): figures})
    assert [("host_us" in r) for r in records] == [False, False, True]


def test_train_step_has_the_probes_four_steps():
    """The GPU probe's steps (MLP ELBO / IWAE k=50 at batch 256; conv ELBO at
    batch 128, IWAE k=8 at batch 64) on CUDA; the conv ones stay off the CPU
    suite by default. Both losses of the conv model run and differentiate."""
    from benchmarks import bench_train_step as ts

    assert ts.default_models(torch.device("cuda")) == ["mlp", "conv"]
    assert ts.default_models(torch.device("cpu")) == ["mlp"]
    assert ts.sizes(False, ["mlp", "conv"], None, None) == [
        ("elbo", "mlp", "elbo", 256, 1), ("iwae k=50", "mlp", "iwae", 256, 50),
        ("elbo autocast", "mlp", "elbo autocast", 256, 1), ("iwae k=50 autocast", "mlp", "iwae autocast", 256, 50),
        ("conv elbo", "conv", "elbo", 128, 1), ("conv iwae k=8", "conv", "iwae", 64, 8),
        ("conv elbo autocast", "conv", "elbo autocast", 128, 1),
        ("conv iwae k=8 autocast", "conv", "iwae autocast", 64, 8)]
    torch.manual_seed(0)
    model = ts.ConvVAE(channels=4, latent=8)
    x = ts.make_x("conv", 2, torch.device("cpu"))
    assert x.shape == (2, 3, 64, 64)
    assert ts.ConvVAE.decode(model, torch.zeros(3, 2, 8)).shape == (3, 2, 3, 64, 64)
    for objective, (hand, ours) in ts.LOSSES.items():
        if objective.startswith("gumbel"):
            continue
        for loss in (hand, ours):
            value = loss(model, x, 2)
            assert value.dim() == 0 and torch.isfinite(value) and value.dtype == torch.float32
            assert all(g is not None for g in torch.autograd.grad(value, list(model.parameters())))


def test_train_step_gumbel_sampler_cases():
    """The sampler-alone cases (--models concrete): (100, 30, 10) at every
    size, and both losses, relaxed and straight-through, are finite scalars
    that differentiate the logits; the relaxed z lies on the simplex either
    way, so with w = 1 both losses are the number of latents."""
    from benchmarks import bench_train_step as ts

    assert ts.sizes(True, ["concrete"], None, None) == ts.sizes(False, ["concrete"], None, None) == [
        ("gumbel sampler", "concrete", "gumbel sampler", 100, 1),
        ("gumbel sampler hard", "concrete", "gumbel sampler hard", 100, 1)]
    torch.manual_seed(0)
    model = ts.ConcreteLogits()
    w = ts.make_x("concrete", 100, torch.device("cpu"))
    assert w.shape == model.logits.shape == (100, 30, 10)
    for objective in ("gumbel sampler", "gumbel sampler hard"):
        for loss in ts.LOSSES[objective]:
            value = loss(model, w, 1)
            assert value.dim() == 0 and torch.isfinite(value)
            (grad,) = torch.autograd.grad(value, [model.logits])
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
            assert loss(model, torch.ones_like(w), 1).item() == pytest.approx(100 * 30, rel=1e-5)


def test_train_step_gumbel_softmax_losses_are_the_same_objective():
    """The Gumbel-softmax model's hand-written loss and fastvae's optimize the
    same ELBO: with the decoder's weights zeroed the reconstruction does not
    depend on z, so the two losses are equal to rounding (the same analytic
    categorical KL against the uniform prior), relaxed and straight-through;
    with the weights, both differentiate every parameter."""
    from benchmarks import bench_train_step as ts

    assert ts.sizes(False, ["gumbel"], None, None) == [
        ("gumbel elbo", "gumbel", "gumbel elbo", 100, 1), ("gumbel elbo hard", "gumbel", "gumbel elbo hard", 100, 1)]
    torch.manual_seed(0)
    model = ts.GumbelVAE(latents=3, categories=5)
    x = ts.make_x("gumbel", 7, torch.device("cpu"))
    for objective in ("gumbel elbo", "gumbel elbo hard"):
        hand, ours = ts.LOSSES[objective]
        for loss in (hand, ours):
            value = loss(model, x, 1)
            assert value.dim() == 0 and torch.isfinite(value)
            assert all(g is not None for g in torch.autograd.grad(value, list(model.parameters())))
        with torch.no_grad():
            model.decoder[-1].weight.zero_()
        assert ours(model, x, 1).item() == pytest.approx(hand(model, x, 1).item(), rel=1e-5, abs=1e-5)
        model = ts.GumbelVAE(latents=3, categories=5)


def test_the_suite_runs_every_benchmark_file():
    """docs/architecture.md says `python -m benchmarks` runs every bench_*.py: the
    registry's op benchmarks (an op folder's row through bench_op.py), then every
    other file found (bench_overhead runs in the suite's own process), with no
    hand-kept names."""
    from pathlib import Path

    from fastvae import _registry

    files = {p.stem.removeprefix("bench_") for p in Path(suite_main.__file__).parent.glob("bench_*.py")}
    assert set(suite_main.BENCHMARKS) | {"overhead", "op"} == files | set(_registry.FOLDERS)
    assert all(suite_main.command(name) == ["benchmarks.bench_op", name] for name in _registry.FOLDERS)
    assert len(suite_main.BENCHMARKS) == len(set(suite_main.BENCHMARKS))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_path_trace_counts_the_stops_of_a_training_call(backend):
    """benchmarks/path_trace.py (the stops of a call): every stop is at a fastvae
    module, the per-module counts add up to the stops, the call starts and ends
    in objectives.py, and the CUDA code path (plans) goes down to the plan and
    back, then the backward, leaving the plan only for its likelihood's fused
    tail (the op folder's: fit and forward, then backward), the numbers
    docs/architecture.md quotes."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastvae import _backend, _registry

    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    if backend == "cpp" and not _backend.cpp_available():
        pytest.skip("no C++ extension")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("FASTVAE_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.path_trace", "--backend", backend, "--json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"elbo", "iwae k=5"}
    for r in result.values():
        assert r["stops"] == sum(r["modules"].values()) > 0
        assert 0 <= r["returns"] < r["stops"]
        assert all(m.startswith(("fastvae/", "kernels/")) for m in r["modules"])
        assert next(iter(r["modules"])) == "fastvae/objectives.py"
        if backend == "triton":
            tail = f"fastvae/ops/{_registry.FOLDER_OF[_registry.PLAN_TAILS['bernoulli'].name]}/op.py"
            assert r["modules"] == {"fastvae/objectives.py": 2, "fastvae/_plan.py": 5, tail: 3}, r


@pytest.mark.full  # a benchmark's run, 7-90 s: the quick tier runs one op row's end to end
def test_host_cost_benchmark_times_the_cuda_code_path_with_direct_launches(tmp_path):
    """benchmarks/bench_host_cost.py --quick, in a child (it needs the Triton
    interpreter): every case has its three figures and their ratios; the
    CUDA code path's launches, stubbed, are the launch counts of
    tests/test_launches.py's lean path, and after a plan's first call every
    one goes to the (stand-in) compiled kernel directly, as on a GPU."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastvae import _backend

    if importlib.util.find_spec("triton") is None or not _backend.cpp_available():
        pytest.skip("needs Triton (its interpreter) and the C++ extension")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("FASTVAE_BACKEND", None)
    out = tmp_path / "host_cost.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_cost", "--quick", "--out", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = {r["case"]: r for r in json.loads(out.read_text())["records"]}
    launches = {"elbo bernoulli": 4, "elbo bernoulli, halves": 4, "elbo gaussian": 4, "elbo gaussian, mean alone": 4,
                "iwae k=5": 6, "iwae k=5 dreg": 7, "elbo bernoulli, autocast": 4,
                # the family's draw with its KL, then the likelihood, forward and backward
                "elbo laplace, laplace prior": 4, "elbo laplace, validate_args=False": 4,
                "sample_normal_kl, one group": 2,
                # the Concrete's draw with its KL (sample_concrete's plan), then the likelihood
                # (bernoulli_log_prob's plan: no objective plan serves a Concrete latent)
                "elbo concrete (gumbel-softmax)": 4}
    assert set(records) == set(launches)
    for name, r in records.items():
        n = launches[name]
        assert r["triton_launches"] == n
        assert r["launches_through_run"] == 0 and r["direct_launches"] == f"{n}/{n}", r
        # the figures of a quick run (3 rounds of 20 calls, less a baseline) are noise on a loaded
        # machine, even below 0: only that each was measured, and the ratio's arithmetic, are checked
        assert all(math.isfinite(r[k]) for k in ("hand_us", "cuda_path_us", "cpu_path_us"))
        if r["hand_us"] > 1:
            assert r["cuda_path_vs_hand"] == pytest.approx(r["cuda_path_us"] / r["hand_us"], abs=0.011)


@pytest.mark.full  # a benchmark's run, 7-90 s: the quick tier runs one op row's end to end
def test_host_cost_benchmark_runs_the_cases_asked_for(tmp_path):
    """bench_host_cost --cases REGEX keeps the cases whose name matches, and
    a pattern that matches none fails naming the cases there are."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastvae import _backend

    if importlib.util.find_spec("triton") is None or not _backend.cpp_available():
        pytest.skip("needs Triton (its interpreter) and the C++ extension")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("FASTVAE_BACKEND", None)
    out = tmp_path / "host_cost.json"

    def run(pattern):
        return subprocess.run([sys.executable, "-m", "benchmarks.bench_host_cost", "--quick", "--rounds", "1",
                               "--calls", "2", "--cases", pattern, "--out", str(out)],
                              cwd=root, env=env, capture_output=True, text=True, timeout=300)

    proc = run("^elbo laplace")
    assert proc.returncode == 0, proc.stderr
    assert [r["case"] for r in json.loads(out.read_text())["records"]] == [
        "elbo laplace, laplace prior", "elbo laplace, validate_args=False"]
    proc = run("no such case")
    assert proc.returncode != 0 and "matches none of" in proc.stderr and "elbo bernoulli" in proc.stderr


def test_families_benchmark_compares_like_with_like(tmp_path):
    import fastvae
    """benchmarks/bench_families.py: the hand-written objective's closed-form KL
    is fastvae's analytic KL on the same torch objects (so the rows compare the
    same objective), and a quick eager run of two families gives both
    implementations' figures and their ratio for the ELBO and the IWAE."""
    import torch.distributions as td

    from benchmarks import bench_families

    closed = ("normal", "laplace", "gumbel", "cauchy", "exponential", "lognormal", "uniform")
    cases = bench_families._cases(64, 6, 3, torch.device("cpu"), torch.float64, closed)
    families = bench_families._families(6, 3, "cpu", torch.float64)
    for name in closed:
        make_q, prior, _ = families[name]
        _, _, (a, s), _ = cases[f"{name} elbo"]
        q = make_q(a, s)
        x = torch.zeros(a.shape, dtype=torch.float64)
        terms = fastvae.elbo_terms(x, q, lambda z: z, prior=prior, likelihood="bernoulli")
        assert terms.kl_analytic, name
        want = td.kl_divergence(q, prior).sum(-1).mean()
        torch.testing.assert_close(terms.kl, want, rtol=1e-10, atol=1e-10, msg=name)
    out = tmp_path / "families.json"
    payload = bench_families.main(["--quick", "--eager", "--families", "laplace", "concrete", "--out", str(out)])
    records = {r["case"] for r in payload["records"]}
    assert records == {"laplace elbo", "laplace iwae k=5", "concrete elbo", "concrete iwae k=5"}
    for r in payload["records"]:
        for key in ("hand ms", "fastvae ms"):  # the compiled rows: tests/test_compile.py compiles the objectives
            assert r[key] > 0, (r["case"], key)
        # the ratio is of the medians before each ms is rounded to 3 decimals: those roundings (0.0005 ms
        # each) move the ratio of the rounded figures by up to their relative size, beside its own 0.005
        slack = 0.0005 / r["hand ms"] + 0.0005 / r["fastvae ms"]
        assert r["vs hand"] == pytest.approx(r["hand ms"] / r["fastvae ms"], rel=1.01 * slack, abs=0.011)
    assert json.loads(out.read_text())["records"] == payload["records"]


def test_families_benchmark_times_the_logvar_formed_in_torch(tmp_path, monkeypatch):
    """--scale-ab adds, for the ELBOs whose torch posterior's scale the eager
    C++ samplers take as it is (normal, log-normal, logistic-normal, and the
    location-scale families), the same call with that logvar (log-scale)
    formed in torch: the switches are off inside those calls only (the
    samplers then take the logs), and on again after."""
    from benchmarks import bench_families
    from fastvae import _backend, _plan, objectives
    from fastvae.ops.sample_normal import op as sample_normal_op

    seen, seen_laplace = [], []
    of_scale = objectives.sample_normal_of_scale_unchecked
    monkeypatch.setattr(objectives, "sample_normal_of_scale_unchecked",
                        lambda *a: seen.append(objectives.SCALE_FORM) or of_scale(*a))
    launch_cpp = _backend.launch_cpp
    monkeypatch.setattr(_backend, "launch_cpp", lambda kernel, work, opts, **a: (  # the ELBO's fused kernels
        "_kl_" in kernel and seen_laplace.append((kernel, _plan.SCALE_IN_KERNELS, opts.get("of_scale", False))))
        or launch_cpp(kernel, work, opts, **a))
    payload = bench_families.main(["--quick", "--eager", "--scale-ab", "--families", "lognormal", "laplace",
                                   "--rounds", "1", "--calls", "1", "--out", str(tmp_path / "ab.json")])
    assert objectives.SCALE_FORM is True and _plan.SCALE_IN_KERNELS is True
    by_case = {r["case"]: r for r in payload["records"]}
    for case, r in by_case.items():
        assert ("fastvae logvar ms" in r) == (case in ("lognormal elbo", "laplace elbo")), case
    # the Laplace ELBO's forward kernel took the scale exactly where the switch was on (both ways were
    # timed), and each backward as its forward did (it runs after the switch is restored)
    forwards = [(on, took) for kernel, on, took in seen_laplace if kernel.endswith("forward")]
    assert forwards and all(on == took for on, took in forwards) and {on for on, _ in forwards} == {True, False}
    kernels = [kernel.rsplit("_", 1)[1] for kernel, _, _ in seen_laplace]
    assert kernels == ["forward", "backward"] * len(forwards)
    assert [took for _, _, took in seen_laplace[1::2]] == [took for _, took in forwards]
    r = by_case["lognormal elbo"]
    assert r["fastvae logvar ms"] > 0
    assert r["logvar formed vs hand"] == pytest.approx(r["hand ms"] / r["fastvae logvar ms"], rel=0.05, abs=0.011)
    # the sampler took the scale only with the switch on (warm-up, and the rounds' fastvae calls)
    assert seen == [True] * 3 and sample_normal_op.sample_normal_of_scale_unchecked is of_scale  # 2 warm-ups, 1 call
    assert "logvar formed vs hand" in payload["table_markdown"]


def test_families_benchmark_times_the_iwae_with_the_priors_log_prob(tmp_path, monkeypatch):
    """--ratio-ab adds, for the IWAEs whose log q - log p the sampler's C++
    kernels take (the Laplace, uniform, Gumbel and Cauchy posteriors with
    their own family's prior), the same call with log p(z) from the prior's
    log_prob: the switch is off inside those calls only, and on again after."""
    from benchmarks import bench_families
    from fastvae import latents

    seen = []
    own_prior = latents._own_prior
    monkeypatch.setattr(latents, "_own_prior", lambda q, p: seen.append(latents.RATIO_IN_KERNELS) or own_prior(q, p))
    payload = bench_families.main(["--quick", "--eager", "--ratio-ab", "--families", "laplace", "lognormal",
                                   "--rounds", "1", "--calls", "1", "--out", str(tmp_path / "ab.json")])
    assert latents.RATIO_IN_KERNELS is True
    by_case = {r["case"]: r for r in payload["records"]}
    for case, r in by_case.items():
        assert ("fastvae log_prob ms" in r) == (case == "laplace iwae k=5"), case
    # _own_prior is asked only with the switch on: the Laplace IWAE's 2 warm-ups and 1 call
    assert seen == [True] * 3
    r = by_case["laplace iwae k=5"]
    assert r["prior log_prob vs hand"] == pytest.approx(r["hand ms"] / r["fastvae log_prob ms"], rel=0.05,
                                                        abs=0.011)
    assert "prior log_prob vs hand" in payload["table_markdown"]


def test_families_benchmark_times_a_positive_iwae_with_the_torch_priors_log_prob(tmp_path, monkeypatch):
    """--ratio-ab's arm for the exponential, Weibull and Kumaraswamy IWAEs:
    the torch prior's own log_prob, fastvae's form off inside those calls
    only, and on again after."""
    from benchmarks import bench_families
    from fastvae import priors

    seen = []
    form = priors._positive_log_prob
    monkeypatch.setattr(priors, "_positive_log_prob", lambda d, z: seen.append(priors.POSITIVE_FORM) or form(d, z))
    payload = bench_families.main(["--quick", "--eager", "--ratio-ab", "--families", "weibull", "--rounds", "1",
                                   "--calls", "1", "--out", str(tmp_path / "ab.json")])
    assert priors.POSITIVE_FORM is True
    by_case = {r["case"]: r for r in payload["records"]}
    assert "fastvae log_prob ms" in by_case["weibull iwae k=5"] and "fastvae log_prob ms" not in by_case[
        "weibull elbo"]
    # the form is asked only with the switch on: the IWAE's 2 warm-ups and 1 call (the ELBO's closed form asks none)
    assert seen == [True] * 3


def test_families_benchmark_refuses_a_family_it_does_not_have(capsys):
    """--families with a name the benchmark has not (``log-normal`` for
    ``lognormal``) is an error that names the argument and lists the
    families, not a run that leaves that family out."""
    from benchmarks import bench_families

    with pytest.raises(SystemExit) as exit_info:
        bench_families.main(["--quick", "--eager", "--families", "laplace", "log-normal"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--families" in err and "'log-normal'" in err and "lognormal" in err


def test_harness_can_leave_the_cuda_graph_replay_out():
    """--no-graphs (a training step whose capture fails on a GPU) reaches the
    per-call figures; the replay is on by default."""
    import inspect

    p = harness.parser("x")
    assert harness.parse_args(p, ["--no-graphs"]).no_graphs is True
    assert harness.parse_args(p, []).no_graphs is False
    assert inspect.signature(harness.call_figures).parameters["graphs"].default is True


def test_bench_triton_op_registers_the_concrete_as_triton_ops(tmp_path, capsys):
    """benchmarks/bench_triton_op.py: its two triton_op nodes give the shapes
    and dtypes of fastvae's CUDA ops for (fake) CUDA tensors, and their
    backward's shape; with no GPU (or --device cpu, as the suite passes on a
    CPU) it says that it measures nothing, writes nothing and exits cleanly;
    its table shows each record's figures and whether the bits agreed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    pytest.importorskip("triton")
    from benchmarks import bench_triton_op as bench

    bench.register()
    bench.register()  # once a process
    with FakeTensorMode():
        logits = torch.empty(7, 3, 5, device="cuda")
        lam = torch.empty(7, 3, device="cuda")
        seed = torch.empty((), dtype=torch.int64, device="cuda")
        for hard in (False, True):
            z, log_q = torch.ops.fastvae_exp.concrete(logits, lam, seed, hard)
            want_z, want_q = torch.ops.fastvae.sample_concrete(logits, lam, seed, hard, 1, None, False)[:2]
            assert (z.shape, z.dtype, log_q.shape, log_q.dtype) == (want_z.shape, want_z.dtype, want_q.shape,
                                                                  want_q.dtype)
            d = torch.ops.fastvae_exp.concrete_backward(z, logits, lam, seed)
            assert d.shape == logits.shape and d.device.type == "cuda"
    out = tmp_path / "triton_op.json"
    assert bench.main(["--device", "cpu", "--quick", "--memory", "--out", str(out)]) is None
    if not torch.cuda.is_available():  # (on a GPU the default device runs the benchmark)
        assert bench.main(["--quick", "--out", str(out)]) is None
    assert not out.exists() and "nothing to measure" in capsys.readouterr().out
    record = {"hard": True, "z_equal": True, "log_q_equal": True, "dlogits_equal": False,
              "ms_per_step": {"hand compiled": 0.5, "triton_op compiled": 0.25},
              "vs_hand_compiled": {"hand compiled": 1.0, "triton_op compiled": 2.0}}
    assert bench.table([record]).splitlines()[2] == "| hard | 0.500 (1.00x) | 0.250 (2.00x) | False |"


@pytest.mark.full  # a benchmark's run, 7-90 s: the quick tier runs one op row's end to end
def test_op_plans_ab_times_both_paths():
    """benchmarks/op_plans_ab.py (the ops' own plans under torch.compile on
    the CPU stand-in, A/B in one process): with TRITON_INTERPRET=1 it prints
    both figures of each step and leaves the plans on; without it, it says
    how to run it."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "TRITON_INTERPRET": "1"}
    env.pop("FASTVAE_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.op_plans_ab", "--rounds", "1", "--calls", "2"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("compiled ")]
    assert [line.split(":")[0] for line in lines] == ["compiled sampler", "compiled elbo", "compiled laplace elbo",
                                                         "compiled weibull elbo", "compiled logistic-normal elbo",
                                                         "compiled hierarchical group", "compiled gaussian elbo",
                                                         "compiled gaussian elbo, mean alone",
                                                         "compiled gaussian iwae k=5",
                                                         "compiled laplace-decoder elbo",
                                                         "compiled continuous-bernoulli elbo",
                                                         "compiled mixture-prior elbo", "compiled laplace iwae k=5",
                                                         "compiled full-covariance elbo",
                                                         "compiled categorical-decoder elbo",
                                                         "compiled negative-binomial elbo",
                                                         "compiled logistic-mixture elbo"]
    assert all("with the general launch" in line and "with the ops' plans" in line for line in lines)
    env.pop("TRITON_INTERPRET")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.op_plans_ab"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr


@pytest.mark.full  # a benchmark's run, 7-90 s: the quick tier runs one op row's end to end
def test_plan_memory_reports_what_the_plans_hold():
    """benchmarks/plan_memory.py (the bytes the cached launch plans keep
    after an IWAE step and an evaluation, under the interpreter): it names
    each plan class, and the plans hold no output-sized template (a few
    hundred bytes of counters and partial sums at these sizes)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "TRITON_INTERPRET": "1"}
    env.pop("FASTVAE_BACKEND", None)
    args = ["--k", "64", "--eval-k", "64", "--batch", "8"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plan_memory", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = proc.stdout.split("after ")[1:]
    assert [r.split(" at ")[0] for r in reports] == ["an IWAE step and an evaluation", "log_likelihood"]
    for report in reports:
        held = dict(line.strip().split(": ") for line in report.splitlines()[1:])
        assert "BernoulliPlan" in held and "every plan" in held
        assert float(held["every plan"].split()[0]) < 0.01  # MiB; one (64, 8, 784) float32 output is 1.5


def test_metadata_records_the_allocators_environment(monkeypatch):
    """A result records the allocator's settings it ran under (glibc's MALLOC_*
    tunables, a preloaded allocator), which move every CPU figure, beside
    fastvae's own; nothing else of the environment."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4000000000")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    monkeypatch.setenv("FASTVAE_UNUSED_FOR_THIS_TEST", "1")
    monkeypatch.setenv("SOME_OTHER_SETTING", "x")
    env = common.metadata(torch.device("cpu"))["env"]
    assert env["MALLOC_TRIM_THRESHOLD_"] == "4000000000" and env["LD_PRELOAD"] == "libjemalloc.so.2"
    assert env["FASTVAE_UNUSED_FOR_THIS_TEST"] == "1" and "SOME_OTHER_SETTING" not in env


def test_integrations_benchmark_models_and_the_pyro_loop():
    """bench_integrations' tutorial VAE and its baseline, Pyro's importance
    weights one example at a time, in this process: one estimate per example."""
    pytest.importorskip("pyro", reason="bench_integrations needs pyro-ppl (pip install fastvae[integrations])")
    from benchmarks import bench_integrations

    model, guide = bench_integrations.tutorial_vae(8, 4, 2)
    x = (torch.rand(3, 8) < 0.5).float()
    with torch.no_grad():
        assert bench_integrations.pyro_loop(model, guide, x, 5).shape == (3,)


@pytest.mark.full
def test_integrations_benchmark_end_to_end(tmp_path):
    """bench_integrations --quick: both implementations in fresh processes, a
    table row each, the speedup on the adapter's row."""
    pytest.importorskip("pyro", reason="bench_integrations needs pyro-ppl (pip install fastvae[integrations])")
    from benchmarks import bench_integrations

    payload = bench_integrations.main(["--quick", "--ks", "20", "--out", str(tmp_path / "integrations.json")])
    assert [(r["impl"], r["case"]) for r in payload["results"]] == [("fastvae[pyro]", "K=20"), ("pyro loop", "K=20")]
    assert payload["results"][0]["speedup_vs_pyro_loop"] > 0
    assert all(math.isfinite(r["mean_log_px"]) for r in payload["results"])
    assert json.loads((tmp_path / "integrations.json").read_text())["op"] == "integrations"


@pytest.mark.full  # imports scvi-tools (8 s) and runs four fresh processes
def test_integrations_benchmark_scvi_and_pythae_rows(tmp_path):
    """bench_integrations --frameworks scvi pythae --quick: each adapter's row
    beside its framework's own estimator, with the speedup and the peak as a
    fraction of the budget on the adapter's row."""
    pytest.importorskip("scvi", reason="bench_integrations' scVI rows need scvi-tools (fastvae[integrations])")
    pytest.importorskip("pythae", reason="bench_integrations' pythae rows need pythae (fastvae[integrations])")
    from benchmarks import bench_integrations

    payload = bench_integrations.main(["--quick", "--frameworks", "scvi", "pythae", "--ks", "20",
                                       "--out", str(tmp_path / "integrations.json")])
    assert [r["impl"] for r in payload["results"]] == ["fastvae[scvi]", "scvi get_marginal_ll", "fastvae[pythae]",
                                                       "pythae get_nll"]
    ours = [r for r in payload["results"] if r["impl"].startswith("fastvae")]
    assert all(r["speedup_vs_framework"] > 0 and r["peak_over_budget"] >= 0 for r in ours)
    assert all(math.isfinite(r["mean_log_px"]) for r in payload["results"])
    assert payload["memory_budget_mb"] > 0


@pytest.mark.full  # trains a small Pyro VAE, then a dozen evaluations: about 5 s
def test_target_stderr_benchmark_finds_a_fixed_k_that_serves_every_example(tmp_path):
    """target_stderr --quick: the fixed K it reports brings every example the
    adaptive run brought to the target there too, on the run of all B, and the
    record says whether every example ended at the target."""
    pytest.importorskip("pyro", reason="target_stderr needs pyro-ppl (pip install fastvae[integrations])")
    pytest.importorskip("sklearn", reason="target_stderr trains on scikit-learn's digits (fastvae[demo])")
    from benchmarks import target_stderr

    record = target_stderr.main(["--quick", "--out", str(tmp_path / "target.json")])
    per = record["per_example"]
    reached = [s <= record["target_stderr"] and not k > 0.7  # LogLikelihoodStats.unreliable: k̂ > 0.7
               for s, k in zip(per["adaptive_stderr"], per["adaptive_pareto_k"])]
    assert sum(reached) == record["reached"] > 0
    assert max(s for s, r in zip(per["fixed_stderr"], reached) if r) <= record["target_stderr"]
    assert record["fixed"]["worst_stderr_reached"] <= record["target_stderr"]
    assert record["fixed"]["total_samples"] == record["examples"] * record["fixed"]["k"]
    assert record["adaptive"]["total_samples"] == sum(per["adaptive_k_used"])
    assert record["every_example_at_target"] == (record["adaptive"]["at_target"] == record["examples"]
                                                 and record["adaptive"]["unreliable"] == 0)
    assert json.loads((tmp_path / "target.json").read_text())["fixed"]["k"] == record["fixed"]["k"]
