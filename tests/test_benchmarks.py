"""The benchmark suite's plumbing: the summary, the markdown, the plots, the
saved-tensor measure and one per-op benchmark end to end in --quick mode.
Nothing here checks a speed (benchmarks measure; tests never time anything)."""
import json

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


def test_one_benchmark_quick_end_to_end(tmp_path):
    """bench_bernoulli_log_prob --quick: returns its payload and writes it where --out says."""
    from benchmarks import bench_bernoulli_log_prob

    out = tmp_path / "bernoulli.json"
    try:
        payload = bench_bernoulli_log_prob.main(["--quick", "--device", "cpu", "--copy-mb", "4", "--out", str(out)])
    finally:
        torch._dynamo.reset()
    assert json.loads(out.read_text())["results"] == payload["results"]
    impls = {r["impl"] for r in payload["results"]}
    assert impls >= {"eager", "compiled"} and len(impls) == 3
    assert len(payload["results"]) == 2 * 3 * len(harness.MODES)
    for r in payload["results"]:
        assert r["median_ms"] > 0
        if r["impl"].startswith("fastvae"):  # it keeps only its inputs for the backward
            assert r["activation_mb"] == 0
        if r["impl"] == "eager":
            assert r["speedup_vs_eager"] == 1.0


def test_peak_memory_child():
    """The subprocess that --memory starts for one (case, implementation)."""
    m = common.run_child_json(["benchmarks.bench_bernoulli_log_prob", "--quick", "--memory-child", "K=1", "eager"])
    # the quick K=1 case allocates a (1, 512, 784) float32 output and gradient: 3 MB
    assert m["peak_mb"] > 1 and m["method"]


def test_overhead_benchmark_reports_the_floor_and_every_op(tmp_path):
    """A smoke run: the rows exist and are positive times (speed is never asserted)."""
    from benchmarks import bench_overhead

    payload = bench_overhead.main(["--quick", "--out", str(tmp_path / "overhead.json")])
    cases = {r["case"] for r in payload["results"]}
    assert {"floor: x * 2", "floor: empty op (define + Function)"} <= cases
    for op in ("sample_normal", "kl_normal", "bernoulli_log_prob", "gaussian_log_prob", "latent_log_ratio",
               "logmeanexp"):
        assert any(c.startswith(op) for c in cases), op
    assert all(r["median_us"] > 0 for r in payload["results"])
    assert (tmp_path / "overhead.json").exists()


def test_gpu_model_is_labelled_and_fills_the_gpu(tmp_path):
    """The model's rows say they are a model, and its programs column comes from
    the launchers: the heavy ops have at least 2 programs per SM from K = 5 up."""
    pytest.importorskip("triton")
    from benchmarks import gpu_model

    payload = gpu_model.main(["--out", str(tmp_path / "model.json")])
    assert payload["label"] == "model, not measured"
    for row in payload["rows"]:
        assert row["min_bytes"] > 0 and row["predicted_us"] > 0
        if row["op"] in ("sample_normal", "latent_log_ratio", "gaussian_log_prob", "bernoulli_log_prob") \
                and row["shape"]["K"] >= 5:
            assert row["programs"] >= 264, row
