"""The fastvae benchmark suite: every op, one training step and the K = 5000
evaluation, in one command.

  python -m benchmarks                   # full run; results in benchmarks/results/
  python -m benchmarks --quick           # smoke run (tiny sizes); results in a temporary folder
  python -m benchmarks --only train_step logmeanexp --device cuda

Each benchmark runs in its own subprocess (`python -m benchmarks.bench_<name>`, or
`python -m benchmarks.bench_op <name>` for an op in a folder of its own,
so that its figures start from a fresh allocator and fresh compile caches) and
writes its own JSON; the suite then writes
  suite-<device-tag>.json   metadata + every benchmark's payload + the summary rows,
  suite-<device-tag>.md     the summary table (forward+backward) and every
                            benchmark's own table,
  suite-<device-tag>-speedup.png, -bandwidth.png   (benchmarks/plots.py),
and, in a full run, each benchmark's JSON under its usual name
(<op>-<device-tag>.json) in the same folder. benchmarks/README.md says what the
columns mean. Run it on a quiet machine: the figures are medians, but a
benchmark that shares its cores measures the other load.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastvae import _registry

from . import common

# every op's benchmark (from the registry), then every other bench_*.py in this
# folder (those above the ops) but bench_overhead, which runs in this process
_OP_BENCHMARKS = list(dict.fromkeys(op.benchmark for op in _registry.OPS.values()))
BENCHMARKS = _OP_BENCHMARKS + sorted(
    name for name in (p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))
    if name not in _OP_BENCHMARKS and name not in ("overhead", "op"))


def command(name: str) -> list[str]:
    """The module (and argument) that runs benchmark ``name``: an op in a folder
    of its own runs its benchmark row through bench_op."""
    return ["benchmarks.bench_op", name] if name in _registry.FOLDERS else [f"benchmarks.bench_{name}"]


def available(name: str) -> bool:
    return name in _registry.FOLDERS or (Path(__file__).parent / f"bench_{name}.py").exists()


def memory_flags(name: str, memory: bool) -> list[str]:
    """bench_log_likelihood measures peak memory unless told not to; the others
    (harness.parser) only when asked."""
    if name == "log_likelihood":
        return [] if memory else ["--no-memory"]
    return ["--memory"] if memory else []


def run_benchmark(name: str, args, folder: Path) -> list[dict]:
    """Runs one benchmark in a subprocess (its output goes to this terminal) and
    returns the payloads it wrote into ``folder``."""
    cmd = [sys.executable, "-m", *command(name), "--device", args.device,
           "--out", str(folder / f"{name}.json")]
    cmd += ["--quick"] * args.quick + memory_flags(name, not args.no_memory)
    common.log(f"\n=== {name}: {' '.join(cmd[1:])}")
    folder.mkdir(parents=True)
    subprocess.run(cmd, cwd=common.REPO_ROOT, check=True)
    return [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]


def suite_markdown(suite: dict) -> str:
    m = suite["machine"]
    lines = [
        f"# fastvae benchmarks, {suite['device_name']}",
        "",
        (f"`{suite['command']}`; commit {suite['git_commit']}; torch {suite['versions']['torch']}, "
         f"triton {suite['versions']['triton']}; {m['torch_num_threads']} threads of {m['cpu_count']} CPUs; "
         f"{suite['timestamp']}; load average at start "
         f"{' '.join(f'{x:.2f}' for x in m['loadavg_at_start'] or [])}."),
        "",
        "## Summary: forward+backward (forward for evaluation), medians of one run",
        "",
        ("Speedups are ratios of medians taken in the same run; % copy BW is the effective bandwidth "
         "(fewest bytes / median) over the copy bandwidth measured in the same run; activations are "
         "the bytes kept for the backward beyond inputs and parameters; peak is one call's peak above "
         "what was live before it (e / c / f: eager / torch.compile / fastvae). See benchmarks/README.md."
         + (" On CUDA, host us (host time per call, no sync), kernels (per call, torch.profiler), GPU us "
            "(their summed time) and graph ms (CUDA-graph replay) are those of one forward+backward call, "
            "as the GPU probe records them." if suite.get("device", "").startswith("cuda") else "")),
        "",
        common.summary_table(suite["summary"]),
    ]
    for failure in suite["failures"]:
        lines += ["", f"**{failure['benchmark']} failed**: {failure['error']}"]
    for p in suite["payloads"]:
        lines += ["", f"## {p.get('op')}", "", p.get("title", ""), "", p.get("table_markdown", "")]
        if p.get("fastvae_compile"):
            lines += ["", f"torch.compile of the fastvae step: `{json.dumps(p['fastvae_compile'])}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 3 repeats: a smoke run, not figures")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, metavar="NAME",
                   help=f"run only these ({', '.join(BENCHMARKS)})")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="default benchmarks/results/ (full run) or a temporary folder (--quick)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out_dir = args.out_dir or common.result_path("suite", device, args.quick).parent
    stem = common.result_path("suite", device, args.quick).stem
    names = [n for n in (args.only or BENCHMARKS) if available(n)]
    missing = ", ".join(n for n in BENCHMARKS if not available(n)) or "-"
    common.log(f"benchmarks: {', '.join(names)} (not present: {missing})")

    meta = common.metadata(device)
    start = time.perf_counter()
    payloads, failures = [], []
    with tempfile.TemporaryDirectory(prefix="fastvae-suite-") as tmp:
        for name in names:
            try:
                payloads += run_benchmark(name, args, Path(tmp) / name)
            except subprocess.CalledProcessError as e:  # the others still run and are reported
                failures.append({"benchmark": name, "error": f"exit status {e.returncode}"})
                common.log(f"=== {name} FAILED (exit status {e.returncode})")
    if not args.quick:  # each benchmark's file where it writes it when run alone
        for payload in payloads:
            common.write_json(out_dir / common.result_path(payload["op"], device, False).name, payload)

    suite = {"op": "suite", **meta, "benchmarks": names, "failures": failures, "elapsed_s": time.perf_counter() - start,
             "summary": common.summary_rows(payloads), "payloads": payloads}
    common.log(f"\nwrote {common.write_json(out_dir / f'{stem}.json', suite)}")
    md = suite_markdown(suite)
    if device.type == "cpu":  # the fixed cost of a call: what decides at small model sizes
        from . import bench_overhead

        overhead = bench_overhead.main((["--quick"] if args.quick else [])
                                       + ["--out", str(out_dir / "overhead-cpu.json")])
        md += "\n\n## Per-call overhead (python -m benchmarks.bench_overhead)\n\n" + overhead["table_markdown"] + "\n"
    (out_dir / f"{stem}.md").write_text(md)
    common.log(f"wrote {out_dir / f'{stem}.md'}")
    try:
        from .plots import write_plots

        for path in write_plots(suite, out_dir, stem):
            common.log(f"wrote {path}")
    except ImportError as e:
        common.log(f"no plots ({e}); pip install -e '.[bench]' adds matplotlib")
    print("\n" + common.summary_table(suite["summary"]))
    try:  # the GPU model (model, not measured) needs only triton, not a GPU
        from . import gpu_model

        gpu_model.main(["--out", str(out_dir / "gpu-model.json")])
    except Exception as e:  # noqa: BLE001 (the model is an extra: it never fails the measured suite)
        common.log(f"no GPU model ({type(e).__name__}: {e}); it needs triton (tested with 3.9)")
    if failures:
        sys.exit(1)
    return suite


if __name__ == "__main__":
    main()
