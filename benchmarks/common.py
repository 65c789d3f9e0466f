"""Shared pieces of the fastvae benchmarks: timing, the copy-bandwidth roofline,
memory, run metadata, and the markdown / JSON output.

Conventions: every figure is a median taken in
the same run as the baselines and the copy bandwidth it is compared with, because
these machines are shared and absolute times drift between runs.

Memory, two figures per implementation and case, both of forward+backward:
  peak MB         the extra memory at the peak of one forward+backward call, above
                  the inputs, parameters and upstream gradients that are live
                  before it (so it counts the outputs, the gradients, what is saved
                  for the backward and every temporary). CUDA:
                  torch.cuda.max_memory_allocated. CPU: the process's peak RSS
                  (VmHWM, reset through /proc/self/clear_refs) in a fresh child
                  process per (case, implementation), with glibc told to give
                  every buffer over 64 KB its own mapping so RSS follows the live
                  tensors (peak_memory_mb, run_child_json). Opt-in (--memory): a
                  child per case costs an interpreter start and, for compiled
                  baselines, a compile (mostly served by inductor's on-disk cache).
  activations MB  the bytes the autograd graph holds for the backward after the
                  forward, not counting tensors that are live anyway (inputs,
                  parameters): the sum over distinct storages of tensors packed
                  through torch.autograd.graph.saved_tensors_hooks
                  (saved_tensor_bytes). Exact and cheap, measured in every run; it
                  is where stored noise and K-times copies of x show up.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- timing --------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress lines go to stderr, so stdout keeps only the tables."""
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench():
    """triton.testing.do_bench, or None. Triton is only imported for CUDA runs."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def _warm_up(fn: Callable[..., Any], setup: Callable[[], Any] | None, warmup: int) -> None:
    for _ in range(warmup):
        out = fn(setup()) if setup else fn()
        del out


def time_ms(
    fn: Callable[..., Any],
    device: torch.device,
    *,
    setup: Callable[[], Any] | None = None,
    repeats: int = 20,
    warmup: int = 2,
) -> list[float]:
    """Wall times of ``fn`` in milliseconds, one per repetition.

    With ``setup``, each repetition first calls ``setup()`` outside the timed
    region and passes its result to ``fn``: this is how a backward is timed on a
    fresh autograd graph (a graph is consumed by the backward, so it must be
    rebuilt every time, and building it is the forward we do not want to count).

    On CUDA without setup this defers to triton.testing.do_bench (which flushes
    L2 between calls and picks its own repetition count) and returns its median
    as a single figure; with setup it uses CUDA events and flushes L2 by hand.
    """
    if device.type == "cuda":
        return _time_cuda_ms(fn, device, setup=setup, repeats=repeats, warmup=warmup)

    _warm_up(fn, setup, warmup)
    times = []
    for _ in range(repeats):
        arg = setup() if setup else None
        start = time.perf_counter()
        out = fn(arg) if setup else fn()
        stop = time.perf_counter()
        # Outputs are dropped after the clock stops so that freeing them (munmap
        # of large buffers) is not charged to the call.
        del out, arg
        times.append((stop - start) * 1e3)
    return times


def time_interleaved_ms(
    cases: dict[Any, tuple[Callable, Callable | None, Callable[[], Any]]],
    device: torch.device,
    *,
    repeats: int = 20,
    warmup: int = 2,
) -> dict[Any, list[float]]:
    """Times of several cases, ``name -> (fn, setup, context)``, where ``context()``
    returns a context manager entered around every call of that case.

    On CPU the cases are timed round-robin, one call each per round, with the
    starting case rotated every round: on a shared 2-core machine another
    process can steal a core for seconds, and interleaving spreads such bursts
    over all cases instead of hitting whichever one was being timed, so that
    ratios between cases stay meaningful. On CUDA each case is timed in one block.
    """
    names = list(cases)
    if device.type == "cuda":
        out = {}
        for name in names:
            fn, setup, context = cases[name]
            with context():
                out[name] = time_ms(fn, device, setup=setup, repeats=repeats, warmup=warmup)
        return out

    for name in names:
        fn, setup, context = cases[name]
        with context():
            time_ms(fn, device, setup=setup, repeats=0, warmup=warmup)
    out = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, setup, context = cases[name]
            with context():
                out[name] += time_ms(fn, device, setup=setup, repeats=1, warmup=0)
    return out


def _do_bench_median_ms(fn: Callable[[], Any], do_bench) -> float:
    try:
        return float(do_bench(fn, return_mode="median"))
    except TypeError:  # older Triton: no return_mode
        return float(do_bench(fn, quantiles=[0.5])[0])


def _time_cuda_ms(fn, device, *, setup, repeats, warmup) -> list[float]:
    do_bench = _do_bench()
    if setup is None and do_bench is not None:
        return [_do_bench_median_ms(fn, do_bench)]

    # 256 MB is larger than any current L2, so zeroing it evicts the inputs.
    flush = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    _warm_up(fn, setup, warmup)
    times = []
    for _ in range(repeats):
        arg = setup() if setup else None
        flush.zero_()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(arg) if setup else fn()
        stop.record()
        torch.cuda.synchronize(device)
        del out, arg
        times.append(start.elapsed_time(stop))
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def iqr(xs: list[float]) -> float | None:
    """Interquartile range: the spread of the repeats (a bimodal step time
    shows here, where the median hides it). None for fewer than 2 repeats."""
    if len(xs) < 2:
        return None
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return float(q3 - q1)


# -- per-call figures ------------------------------------------------------------
# What the GPU probe (benchmarks/README.md, "Columns") records beside the wall
# time, so that the suite measures what the probe measures: the host's share of a
# call, what it launches, and the GPU time alone. Written anew for the suite;
# the method (calls without a sync, torch.profiler's CUDA activity, a CUDA graph
# captured on a side stream after warm-up and replayed under do_bench) is the probe's.


def host_us_per_call(fn: Callable[[], Any], device: torch.device, *, calls: int = 200) -> float:
    """Host time of one call in microseconds: ``calls`` calls back to back with
    no synchronisation between them, divided by ``calls``.

    On CUDA the GPU runs behind the host, so this is the cost of the Python,
    dispatcher and launch path. It is not a pure host figure when the GPU is
    the bottleneck: once CUDA's launch queue is full the host waits for the GPU,
    and a GPU-bound call shows its GPU time here too. On CPU it is the wall time.
    """
    out = fn()
    del out
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
        del out
    stop = time.perf_counter()
    sync(device)
    return (stop - start) / calls * 1e6


def _event_duration_us(event: Any) -> float:
    # torch >= 2.4 calls it device_time; older releases cuda_time
    duration = getattr(event, "device_time", None)
    return float(event.cuda_time if duration is None else duration)


def kernel_stats(events: Iterable[Any], calls: int, *, device_type: Any = None, top: int = 12) -> dict[str, Any]:
    """Per-call count and summed duration of the profiler events that ran on
    ``device_type`` (default CUDA: kernels, memsets and memcpys), over ``calls``
    profiled calls; ``top_kernels`` are the most frequent names (60 characters)
    with their count per call."""
    if device_type is None:
        device_type = torch.autograd.DeviceType.CUDA
    count, total_us, names = 0, 0.0, {}
    for e in events:
        if e.device_type != device_type:
            continue
        count += 1
        total_us += _event_duration_us(e)
        names[e.name[:60]] = names.get(e.name[:60], 0) + 1
    frequent = sorted(names.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"kernels_per_call": count / calls, "gpu_us": total_us / calls,
            "top_kernels": [[name, n / calls] for name, n in frequent]}


def profile_kernels(fn: Callable[[], Any], device: torch.device, *, calls: int = 5) -> dict[str, Any]:
    """kernel_stats of ``calls`` calls of ``fn`` under torch.profiler (CUDA activity
    only), after one unprofiled call. CUDA only: on CPU nothing is launched."""
    from torch.profiler import ProfilerActivity, profile

    out = fn()
    del out
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            out = fn()
            del out
        sync(device)
    return kernel_stats(prof.events(), calls)


def graph_replay_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3) -> dict[str, Any]:
    """Median time of one replay of ``fn`` captured in a CUDA graph (do_bench):
    the GPU time of the call without its host cost. ``graph_error`` says why
    there is no figure: capture fails on host syncs, CPU tensors made inside
    the call, or anything else CUDA graphs forbid, and that is a finding."""
    do_bench = _do_bench()
    if device.type != "cuda" or do_bench is None:
        return {"graph_ms": None, "graph_error": "needs CUDA and triton"}
    graph = None
    try:
        # Capture needs the call warmed up (lazy init, autotuning, compilation)
        # on a side stream, as torch.cuda.graphs' documentation does it.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                out = fn()
                del out
        torch.cuda.current_stream(device).wait_stream(side)
        sync(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        del out
        sync(device)
        return {"graph_ms": _do_bench_median_ms(graph.replay, do_bench), "graph_error": None}
    except Exception as e:  # noqa: BLE001 - any capture failure is recorded, not raised
        sync(device)
        return {"graph_ms": None, "graph_error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    finally:
        del graph  # its private memory pool goes back to the allocator
        torch.cuda.empty_cache()


# -- roofline ------------------------------------------------------------------


def copy_bandwidth_gbs(device: torch.device, *, mbytes: int = 256, repeats: int = 10) -> dict[str, Any]:
    """Bandwidth of ``dst.copy_(src)`` for an ``mbytes`` MB float32 tensor into a
    preallocated buffer, counting read + write bytes: the practical ceiling for
    a memory-bound op on this machine, measured in the same run as the op."""
    n = mbytes * 2**20 // 4
    src = torch.rand(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    moved = 2 * src.numel() * src.element_size()
    return {
        "bytes_per_copy": moved,
        "tensor_mbytes": mbytes,
        "median_ms": median(times),
        "times_ms": times,
        "gbs": moved / (median(times) * 1e-3) / 1e9,
    }


def gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# -- peak memory ---------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Extra memory that ``fn`` needs at its peak, above what is live before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: tracemalloc does not see torch's
    allocator, so this reads the process's peak RSS (VmHWM), reset beforehand
    through /proc/self/clear_refs so that earlier work (imports, torch.compile,
    warm-up) does not set the high-water mark. Run it in a fresh subprocess per
    implementation so that allocator caches of other implementations do not
    interfere. Without /proc it falls back to ru_maxrss, which is not reset.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "torch.cuda.max_memory_allocated", "peak_mb": (peak - base) / 2**20}

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
        base_kb = _proc_status_kb("VmRSS")
        out = fn()
        del out
        peak_kb = _proc_status_kb("VmHWM")
        if base_kb is not None and peak_kb is not None:
            return {"method": "VmHWM - VmRSS (clear_refs reset)", "peak_mb": (peak_kb - base_kb) / 1024}
    except OSError:
        pass
    import resource

    out = fn()
    del out
    # ru_maxrss is in KiB on Linux, bytes on macOS; it is the whole-process peak.
    scale = 1 if sys.platform == "darwin" else 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {"method": "ru_maxrss (whole process, not reset)", "peak_mb": peak / 2**20}


def saved_tensor_bytes(fn: Callable[[], Any], live: Iterable[torch.Tensor] = ()) -> dict[str, Any]:
    """Bytes that autograd keeps for the backward of ``fn()``: distinct storages of
    the tensors packed by saved_tensors_hooks (custom autograd Functions and
    torch.compile's compiled graphs save through the same hooks). ``live`` are
    tensors that exist anyway (inputs, parameters); their storages are reported
    apart, so that ``activation_mb`` is the memory a forward adds for its backward."""
    live_keys = {t.untyped_storage().data_ptr() for t in live}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    activation = sum(n for k, n in saved.items() if k not in live_keys)
    return {"saved_mb": sum(saved.values()) / 2**20, "activation_mb": activation / 2**20}


def run_child_json(args: list[str], *, timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m <args>`` from the repository root and parse the last line
    of its stdout as JSON (how subprocess measurements report back)."""
    # glibc keeps freed heap memory in the process (and raises its mmap threshold
    # after large frees), so warm-up calls would leave memory that later calls
    # reuse and the peak RSS would not move. A fixed threshold makes every large
    # buffer its own mapping, returned to the OS when freed, so RSS tracks live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- metadata ------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vector_isa() -> str:
    """The widest vector ISA of this CPU that fastvae's C++ code paths tell
    apart: "AVX-512", "AVX2" or "SSE" on x86, "NEON" (or "SVE") on ARM, else the
    machine name. Read from /proc/cpuinfo's flags (x86) or Features (ARM)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    if machine in ("aarch64", "arm64"):  # Advanced SIMD is part of AArch64 (Apple silicon has no cpuinfo)
        return "SVE" if "sve" in flags else "NEON"
    return machine or "unknown"


def fastvae_noise_path() -> str | None:
    """The C++ noise path fastvae picked on this CPU (fastvae._C.noise_isa()), or None without the extension."""
    try:
        from fastvae import _C
    except ImportError:
        return None
    return _C.noise_isa() if hasattr(_C, "noise_isa") else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with its vector ISA ("AMD EPYC, AVX2"):
    the CPU figures depend on which of fastvae's ISA paths ran."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {cpu_vector_isa()}"


def device_tag(device: torch.device) -> str:
    """Short file-name tag: "cpu", or the GPU name slugged ("nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    v: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
    }
    try:
        import numpy

        v["numpy"] = numpy.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        try:
            import triton

            v["triton"] = triton.__version__
        except ImportError:
            pass
    try:
        import fastvae

        v["fastvae"] = fastvae.__version__
    except ImportError:
        pass
    return v


def command_line() -> str:
    """The command as typed: under ``python -m`` sys.argv[0] is the file path,
    so the module name is put back from __main__.__spec__."""
    import shlex

    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    # `python -m pkg` runs pkg.__main__; the command typed was `python -m pkg`.
    module = main_spec.name.removesuffix(".__main__") if main_spec is not None else None
    head = ["python", "-m", module] if module else ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# How time_interleaved_ms takes its figures, recorded with every result.
TIMING_METHOD = {
    "cpu": "time.perf_counter around one call; cases round-robin, --repeats calls each; median",
    "cuda": "without per-call setup (forward, fwd+bwd): triton.testing.do_bench's median over its own "
            "repeat count (times_ms holds that one median); with setup (backward): CUDA events around "
            "each of --repeats calls, L2 flushed before each; median",
}


# the environment a figure depends on: fastvae's and the threads', Triton's and
# the compiler's caches, and the allocator's (glibc's MALLOC_* tunables, a
# preloaded jemalloc or tcmalloc move every CPU figure: benchmarks/README.md)
RECORDED_ENV = ("FASTVAE_", "OMP_", "TRITON_", "TORCHINDUCTOR_", "MALLOC_", "LD_PRELOAD")


def metadata(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell where and how a result file was produced."""
    return {
        "command": command_line(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "vector_isa": cpu_vector_isa(),
            "fastvae_noise_path": fastvae_noise_path(),
            "cpu_count": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads(),
            # Other work on a shared machine shows here and explains noisy figures.
            "loadavg_at_start": loadavg(),
        },
        "device": str(device),
        "device_name": device_name(device),
        "timing": TIMING_METHOD[device.type],
        "versions": versions(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(RECORDED_ENV)},
    }


# -- output --------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; numbers are expected already formatted as strings."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def result_path(name: str, device: torch.device, quick: bool, out: str | Path | None = None) -> Path:
    """Where a benchmark writes its JSON: ``out`` if given, else
    benchmarks/results/<name>-<device-tag>.json for full runs. --quick runs are
    smoke tests whose figures mean nothing, so they go to a temporary folder and
    never into results/."""
    if out:
        return Path(out)
    folder = Path(tempfile.gettempdir()) / "fastvae-bench-quick" if quick else RESULTS_DIR
    return folder / f"{name}-{device_tag(device)}{'-quick' if quick else ''}.json"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def write_json(path: Path | str, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# -- the suite summary -----------------------------------------------------------

BASELINES = ("eager", "compiled")
# The per-call figures of a forward+backward call (CUDA runs; harness.call_figures):
# record field -> (column header, digits).
CALL_FIELDS = {"host_us": ("host us", 0), "kernels_per_call": ("kernels", 1), "gpu_us": ("GPU us", 0),
               "graph_ms": ("graph ms", 3)}
# Implementations that are baselines of one benchmark only: no summary row of their own.
OTHER_BASELINES = ("naive", "per-example")


def summary_rows(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (benchmark, case, fastvae implementation), with the baselines
    of the same case beside it: forward+backward, the mode the targets are stated
    in, or forward for a benchmark that has no backward (evaluation). Records
    without a mode, or payloads without records, are left out."""
    rows = []
    for p in payloads:
        modes = {r.get("mode") for r in p.get("results", [])}
        mode = "fwd+bwd" if "fwd+bwd" in modes else "forward"
        records = [r for r in p.get("results", []) if r.get("mode") == mode and "impl" in r]
        by_impl = {(r.get("case"), r["impl"]): r for r in records}
        for r in records:
            if r["impl"] in BASELINES + OTHER_BASELINES:
                continue
            base = {b: by_impl.get((r.get("case"), b), {}) for b in BASELINES}
            # evaluation's all-at-once version is its eager baseline
            base["eager"] = base["eager"] or by_impl.get((r.get("case"), "naive"), {})
            impls = {"eager": base["eager"], "compiled": base["compiled"], "fastvae": r}
            rows.append({
                "op": p.get("op"), "case": r.get("case"), "impl": r["impl"], "mode": mode,
                **{f"{k}_ms": v.get("median_ms") for k, v in impls.items()},
                "speedup_vs_eager": r.get("speedup_vs_eager"),
                "speedup_vs_compiled": r.get("speedup_vs_compiled"),
                "gbs": r.get("gbs"), "pct_copy_bw": r.get("pct_copy_bw"),
                "copy_gbs": (p.get("copy_bandwidth") or {}).get("gbs"),
                **{f"{k}_activation_mb": v.get("activation_mb") for k, v in impls.items()},
                **{f"{k}_peak_mb": v.get("peak_mb") for k, v in impls.items()},
                **{f"{k}_{f}": v.get(f) for f in CALL_FIELDS for k, v in impls.items()},
            })
    return rows


def _triple(row: dict[str, Any], field: str, digits: int = 1) -> str:
    """eager / compiled / fastvae values of one field, or n/a when none was measured."""
    values = [row.get(f"{k}_{field}") for k in ("eager", "compiled", "fastvae")]
    return "n/a" if all(v is None for v in values) else " / ".join(fmt(v, digits) for v in values)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The per-call columns (host us, kernels, GPU us, graph ms) appear only when
    some row has them: a CUDA run; the CPU table keeps its columns."""
    per_call = [f for f in CALL_FIELDS if any(r.get(f"{k}_{f}") is not None
                                              for r in rows for k in ("eager", "compiled", "fastvae"))]
    headers = ["benchmark", "case", "mode", "fastvae", "eager ms", "compiled ms", "fastvae ms", "vs eager",
               "vs compiled",
               "% copy BW", "activations MB (e / c / f)", "peak MB (e / c / f)"]
    headers += [f"{CALL_FIELDS[f][0]} (e / c / f)" for f in per_call]
    table = [[r["op"], r["case"], r["mode"], r["impl"], fmt(r["eager_ms"], 3), fmt(r["compiled_ms"], 3),
              fmt(r["fastvae_ms"], 3), fmt_ratio(r["speedup_vs_eager"]), fmt_ratio(r["speedup_vs_compiled"]),
              fmt(r["pct_copy_bw"], 0), _triple(r, "activation_mb"), _triple(r, "peak_mb")]
             + [_triple(r, f, CALL_FIELDS[f][1]) for f in per_call] for r in rows]
    return markdown_table(headers, table)
