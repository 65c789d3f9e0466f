"""A generic forward / backward / forward+backward benchmark of one op (or one
training step) against its eager and torch.compile baselines, built on
common.py. A benchmark script supplies its cases (problem sizes), the
implementations and the fewest bytes each mode must move; this runs them
interleaved in one process, measures memory (common.py's docstring says how),
prints the markdown table, writes the JSON and returns it.

Implementations named "eager" and "compiled" are the baselines every other one
is compared with, per case and mode.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import fastvae

from . import common

MODES = ("forward", "backward", "fwd+bwd")
DEFAULT_REPEATS = 15


@dataclass
class Impl:
    name: str
    fn: Callable[..., Any]
    backend: str | None = None  # FASTVAE_BACKEND while this implementation runs


@dataclass
class Case:
    label: str  # e.g. "K=8"; unique within one run
    params: dict[str, Any]
    # device -> (positional args of fn, tensors to differentiate, upstream gradient)
    make_inputs: Callable[[torch.device], tuple[tuple, list[torch.Tensor], Any]]
    # mode -> fewest bytes it must move; None where bandwidth means nothing (a
    # training step is bound by its matrix products, not by memory)
    min_bytes: dict[str, int] | None = field(default=None)
    repeats: int | None = None  # default for this case when --repeats is not given


@contextlib.contextmanager
def fastvae_backend(name: str | None):
    """Runs the block with fastvae's ops on backend ``name`` (None: by device)."""
    if name is None:
        yield
        return
    with fastvae.use_backend(name):
        yield


def default_fastvae_backend(device: torch.device, op: str) -> str:
    """The backend fastvae picks for op on device (backend_info says
    "reference (cpp extension missing)" when it falls back)."""
    return fastvae.backend_info(device)[op].split()[0]


def baseline_impls(eager: Callable, fastvae_fn: Callable, op: str, device: torch.device,
                   backends: list[str] | None) -> list[Impl]:
    """eager, torch.compile(eager) and fastvae on each backend (default: the one it picks)."""
    if backends is None:
        backends = [default_fastvae_backend(device, op)]
    # dynamic=False: one graph specialised per shape, the best case for the baseline.
    impls = [Impl("eager", eager), Impl("compiled", torch.compile(eager, dynamic=False))]
    return impls + [Impl(f"fastvae[{b}]", fastvae_fn, b) for b in backends]


def mode_callables(impl: Impl, mode: str, args: tuple, wrt, g):
    """(fn, setup) for common.time_ms: the forward impl.fn(*args), the backward
    torch.autograd.grad of its output w.r.t. wrt with upstream g, or both."""

    def forward():
        return impl.fn(*args)

    def grads(out):
        return torch.autograd.grad(out, wrt, g)

    if mode == "forward":
        return forward, None
    if mode == "backward":
        return grads, forward
    return (lambda: grads(forward())), None


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=None, help=f"timed repetitions (default {DEFAULT_REPEATS})")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each case before timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fastvae-backends", nargs="+", default=None,
                   help="fastvae backends to time (default: the one fastvae picks for the device)")
    p.add_argument("--copy-mb", type=int, default=None,
                   help="MB copied by the copy-bandwidth probe (default 256, 32 with --quick)")
    p.add_argument("--memory", action="store_true",
                   help="also measure the peak memory of fwd+bwd (CPU: one subprocess per case and implementation)")
    p.add_argument("--quick", action="store_true", help="small sizes and 3 repeats: a smoke run")
    p.add_argument("--host-calls", type=int, default=None,
                   help="CUDA: calls without a sync behind host us (default 200, 20 with --quick)")
    p.add_argument("--no-graphs", action="store_true",
                   help="CUDA: skip each call's CUDA-graph replay (graph_ms); a training step whose capture fails "
                        "can leave the CUDA context unusable for the calls timed after it")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/<name>-<device>.json; --quick: a temporary folder)")
    # How run() tells a memory subprocess which measurement it is for.
    p.add_argument("--memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """p.parse_args, keeping the argument list: memory subprocesses replay it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.copy_mb is None:
        args.copy_mb = 32 if args.quick else 256
    if args.host_calls is None:
        args.host_calls = 20 if args.quick else 200
    return args


# -- memory --------------------------------------------------------------------


def peak_memory(case: Case, impl: Impl, device: torch.device) -> dict:
    """Peak memory of one fwd+bwd call, in this process, after two calls that
    compile and warm up (common.peak_memory_mb subtracts what is live before)."""
    args, wrt, g = case.make_inputs(device)
    fn, _ = mode_callables(impl, "fwd+bwd", args, wrt, g)
    with fastvae_backend(impl.backend):
        for _ in range(2):
            fn()
        gc.collect()
        return common.peak_memory_mb(fn, device)


def measure_peak_memory(module: str, case: Case, impl: Impl, args, device: torch.device) -> dict:
    """peak_memory on CUDA in this process (the allocator's own statistics), on
    CPU in a fresh `python -m module <same arguments> --memory-child ...`."""
    if device.type == "cuda":
        return peak_memory(case, impl, device)
    return common.run_child_json([module, *args.argv, "--memory-child", case.label, impl.name])


def saved_bytes(impl: Impl, args: tuple, wrt: list[torch.Tensor]) -> dict:
    live = [t for t in (*args, *wrt) if isinstance(t, torch.Tensor)]
    with fastvae_backend(impl.backend):
        return common.saved_tensor_bytes(lambda: impl.fn(*args), live)


# -- per-call figures (CUDA) ----------------------------------------------------


def call_figures(impl: Impl, inputs, device: torch.device, *, host_calls: int = 200, graphs: bool = True) -> dict:
    """What one fwd+bwd call costs beside its wall time, as the GPU probe
    measures it (common.py's per-call section): host_us always; on CUDA also
    kernels_per_call, gpu_us, top_kernels (torch.profiler) and graph_ms /
    graph_error (CUDA-graph replay; None when ``graphs`` is False), None on
    CPU where nothing is launched."""
    fn, _ = mode_callables(impl, "fwd+bwd", *inputs)
    with fastvae_backend(impl.backend):
        out = {"host_us": common.host_us_per_call(fn, device, calls=host_calls)}
        if device.type == "cuda":
            try:
                out.update(common.profile_kernels(fn, device))
            except Exception as e:  # noqa: BLE001 - e.g. no CUPTI: the other figures still count
                out.update(kernels_per_call=None, gpu_us=None, top_kernels=None,
                           profile_error=f"{type(e).__name__}: {e}"[:300])
            out.update(common.graph_replay_ms(fn, device) if graphs else dict(graph_ms=None, graph_error=None))
        else:
            out.update(kernels_per_call=None, gpu_us=None, top_kernels=None, graph_ms=None, graph_error=None)
    return out


def add_call_figures(records: list[dict], figures: dict[tuple[str, str], dict]) -> None:
    """Puts call_figures' results, keyed (impl, case), into the fwd+bwd records."""
    for r in records:
        if r["mode"] == "fwd+bwd" and (r["impl"], r["case"]) in figures:
            r.update(figures[(r["impl"], r["case"])])


# -- the run -------------------------------------------------------------------


def add_speedups(records: list[dict]) -> None:
    """Ratios of medians of the same case and mode, taken in this run."""
    by_key = {(r["impl"], r["case"], r["mode"]): r for r in records}
    for r in records:
        for base in ("eager", "compiled"):
            ref = by_key.get((base, r["case"], r["mode"]))
            r[f"speedup_vs_{base}"] = ref["median_ms"] / r["median_ms"] if ref else None


def first_calls(case: Case, impls: list[Impl], inputs, device: torch.device) -> list[dict]:
    """Compile and warm up every implementation outside the figures; the time
    of each first call (compilation included) is recorded."""
    out = []
    for impl in impls:
        fn, _ = mode_callables(impl, "fwd+bwd", *inputs)
        with fastvae_backend(impl.backend):
            common.sync(device)
            t0 = time.perf_counter()
            fn()
            common.sync(device)
            out.append({"impl": impl.name, "case": case.label, "first_call_s": time.perf_counter() - t0})
    return out


def time_case(case: Case, impls: list[Impl], inputs, copy_gbs: float, args, device: torch.device) -> list[dict]:
    """Every (mode, implementation) of one case, timed interleaved."""
    repeats = 3 if args.quick else args.repeats or case.repeats or DEFAULT_REPEATS
    timed = {}
    for mode in MODES:
        for impl in impls:
            fn, setup = mode_callables(impl, mode, *inputs)
            timed[(mode, impl.name)] = (fn, setup, lambda b=impl.backend: fastvae_backend(b))
    times = common.time_interleaved_ms(timed, device, repeats=repeats, warmup=args.warmup)
    saved = {impl.name: saved_bytes(impl, inputs[0], inputs[1]) for impl in impls}
    records = []
    for mode in MODES:
        for impl in impls:
            med = common.median(times[(mode, impl.name)])
            nbytes = case.min_bytes[mode] if case.min_bytes else None
            bw = common.gbs(nbytes, med) if nbytes else None
            records.append({
                "impl": impl.name, "case": case.label, **case.params, "mode": mode, "repeats": repeats,
                "median_ms": med, "iqr_ms": common.iqr(times[(mode, impl.name)]),
                "times_ms": times[(mode, impl.name)], "min_bytes": nbytes,
                "gbs": bw, "pct_copy_bw": 100 * bw / copy_gbs if bw else None, **saved[impl.name],
            })
            common.log(f"{case.label:<10} {mode:<8} {impl.name:<22} {med:9.3f} ms")
    return records


def _call_cell(r: dict, field: str) -> str:
    if field == "graph_ms" and r.get("graph_ms") is None and r.get("graph_error"):
        return "capture failed"
    return common.fmt(r.get(field), common.CALL_FIELDS[field][1])


def table(cases: list[Case], impls: list[Impl], records: list[dict]) -> str:
    """The markdown table; the per-call columns (fwd+bwd rows) only when measured
    (CUDA), with each failed graph capture's error in a line below the table."""
    by_key = {(r["impl"], r["case"], r["mode"]): r for r in records}
    memory = any("peak_mb" in r for r in records)
    per_call = [f for f in common.CALL_FIELDS if any(r.get(f) is not None for r in records)]
    if any(r.get("graph_error") for r in records) and "graph_ms" not in per_call:
        per_call.append("graph_ms")
    headers = ["impl", "case", "mode", "median ms", "IQR ms", "GB/s", "% copy BW", "vs eager", "vs compiled",
               "activations MB"] + (["peak MB"] if memory else []) + [common.CALL_FIELDS[f][0] for f in per_call]
    rows = []
    for case in cases:
        for mode in MODES:
            for impl in impls:
                r = by_key[(impl.name, case.label, mode)]
                row = [impl.name, case.label, mode, common.fmt(r["median_ms"], 3), common.fmt(r.get("iqr_ms"), 3),
                       common.fmt(r["gbs"], 1),
                       common.fmt(r["pct_copy_bw"], 1), common.fmt_ratio(r["speedup_vs_eager"]),
                       common.fmt_ratio(r["speedup_vs_compiled"]), common.fmt(r["activation_mb"], 1)]
                if memory:
                    row.append(common.fmt(r.get("peak_mb"), 1) if mode == "fwd+bwd" else "")
                row += [_call_cell(r, f) if mode == "fwd+bwd" else "" for f in per_call]
                rows.append(row)
    failures = [f"graph capture failed, {r['impl']} {r['case']}: {r['graph_error']}"
                for r in records if r.get("graph_error")]
    return "\n\n".join([common.markdown_table(headers, rows), *(["\n".join(failures)] if failures else [])])


def run(module: str, name: str, title: str, cases: list[Case], impls: list[Impl], args,
        extra: dict | None = None) -> dict | None:
    """Times every (case, mode, impl), prints the table, writes the JSON and
    returns the payload. ``module`` is the benchmark's module name (its
    ``__spec__.name``), rerun as the memory subprocess; in that subprocess
    (--memory-child) this measures one peak, prints it as JSON and returns None.
    ``extra`` goes into the payload as is."""
    device = torch.device(args.device)
    if args.memory_child:
        label, impl_name = args.memory_child
        case = next(c for c in cases if c.label == label)
        print(json.dumps(peak_memory(case, next(i for i in impls if i.name == impl_name), device)))
        return None

    torch.manual_seed(0)
    meta = common.metadata(device)
    common.log(f"{meta['device_name']}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    copy = common.copy_bandwidth_gbs(device, mbytes=args.copy_mb)
    common.log(f"copy bandwidth: {copy['gbs']:.1f} GB/s (read + write, {args.copy_mb} MB)")
    records, warmups = [], []
    for case in cases:
        inputs = case.make_inputs(device)
        warmups += first_calls(case, impls, inputs, device)
        case_records = time_case(case, impls, inputs, copy["gbs"], args, device)
        if device.type == "cuda":  # on CPU every call is synchronous: host time is the wall time
            figures = {}
            for impl in impls:
                figures[(impl.name, case.label)] = f = call_figures(impl, inputs, device, host_calls=args.host_calls,
                                                                       graphs=not args.no_graphs)
                graph = common.fmt(f["graph_ms"], 3) if f["graph_ms"] is not None else f"failed ({f['graph_error']})"
                common.log(f"{case.label:<10} per call {impl.name:<22} host {f['host_us']:9.1f} us, "
                           f"{common.fmt(f['kernels_per_call'], 1)} kernels, GPU {common.fmt(f['gpu_us'], 1)} us, "
                           f"graph {graph} ms")
            add_call_figures(case_records, figures)
        records += case_records
        del inputs
    if args.memory or device.type == "cuda":
        fwd_bwd = {(r["impl"], r["case"]): r for r in records if r["mode"] == "fwd+bwd"}
        for case in cases:
            for impl in impls:
                m = measure_peak_memory(module, case, impl, args, device)
                fwd_bwd[(impl.name, case.label)].update(peak_mb=m["peak_mb"], peak_method=m["method"])
                common.log(f"{case.label:<10} peak     {impl.name:<22} {m['peak_mb']:9.1f} MB ({m['method']})")
    add_speedups(records)

    title = f"{title}, {meta['device_name']}; copy bandwidth {copy['gbs']:.1f} GB/s (read + write)"
    md = table(cases, impls, records)
    print(f"\n{title}\n\n{md}\n")
    payload = {"op": name, **meta, "title": title, "copy_bandwidth": copy,
               "config": {"quick": args.quick, "warmup": args.warmup, "modes": list(MODES),
                          "host_calls": args.host_calls if device.type == "cuda" else None,
                          "impls": [{"name": i.name, "fastvae_backend": i.backend} for i in impls],
                          "cases": [{"label": c.label, **c.params} for c in cases]},
               **(extra or {}), "results": records, "first_calls": warmups,
               "loadavg_at_end": common.loadavg(), "table_markdown": md}
    common.log(f"wrote {common.write_json(common.result_path(name, device, args.quick, args.out), payload)}")
    return payload
