"""Benchmark of fastvae.logmeanexp (the IWAE reduction over the sample dimension).

What is measured
----------------
For log-weights lw of shape (K, B) (float32), the op returns
logmeanexp_k(lw) = logsumexp_k(lw) - log K of shape (B,), and its backward
returns grad * softmax_k(lw) of shape (K, B). Default shapes, one per regime:
K=5000 x B=512 (large-K evaluation: long columns, few of them) and
K=64 x B=65536 (training: few samples, a wide batch).

Implementations, side by side in one run:
  eager            torch.logsumexp(lw, 0) - math.log(K), as users write it;
  compiled         torch.compile of that same function (compiled before timing);
  fastvae[<name>]  fastvae.logmeanexp on the backend <name> (default: the one
                   fastvae picks for the device: cpp on CPU, triton on CUDA).

Modes, each a median over --repeats repetitions after warm-up (on CPU all cases
of one shape are timed round-robin, so that bursts of other load on a shared
machine hit every case alike):
  forward   lw requires grad, so the autograd graph and what it saves are built;
  backward  torch.autograd.grad of the output w.r.t. lw with a fixed random
            upstream gradient; the graph is built outside the timed region on
            every repetition (a graph is consumed by its backward);
  fwd+bwd   both, in one timed region.

Effective bandwidth is the fewest bytes each mode must move divided by the
median time (forward: read lw, write the (B,) output; backward: read lw, the
(B,) gradient and state, write dlw), reported next to the copy bandwidth of the
same machine measured in the same run (copy_ of a 256 MB float32 tensor into a
preallocated buffer, counting read + write). The default shapes (10 MB and
16 MB of log-weights) fit in a large L3 cache, so a copy of their own size
(--copy-mb, default 16) is measured too and printed beside it: that is the
ceiling that applies here, and on these shapes the op is bound by its one exp
per element per pass rather than by memory.

On CPU the benchmark first tells glibc to keep freed memory mapped
(keep_freed_memory; --default-malloc leaves it alone), so that page faults on
fresh output buffers, which cost far more than the ops on the VMs this runs on
and land on whichever case happens to allocate after a trim, stay out of the
figures of every implementation.

Reproduce (from the repository root):
  python -m benchmarks.bench_logmeanexp            # full run, ~1 min on 2 CPU cores
  python -m benchmarks.bench_logmeanexp --quick    # tiny smoke run
Results go to benchmarks/results/logmeanexp-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import argparse
import ctypes
import math
import sys
import time

import torch

import fastvae

from . import common
from .harness import Impl, default_fastvae_backend, fastvae_backend, mode_callables

OP = "logmeanexp"
MODES = ("forward", "backward", "fwd+bwd")
DTYPE = torch.float32


def eager_logmeanexp(lw: torch.Tensor) -> torch.Tensor:
    """The baseline, written the way an IWAE user writes it."""
    return torch.logsumexp(lw, 0) - math.log(lw.shape[0])


def make_impls(backends: list[str]) -> list[Impl]:
    # dynamic=False: one graph specialised per shape, the best case for the baseline.
    compiled = torch.compile(eager_logmeanexp, dynamic=False)
    impls = [Impl("eager", eager_logmeanexp), Impl("compiled", compiled)]
    for b in backends:
        impls.append(Impl(f"fastvae[{b}]", lambda lw: fastvae.logmeanexp(lw, 0), b))
    return impls


def min_bytes(K: int, B: int, mode: str, itemsize: int = 4) -> int:
    """Fewest bytes each mode must move: lw read once per pass, outputs written once."""
    fwd = (K * B + B) * itemsize  # lw -> out
    bwd = (K * B + B + K * B) * itemsize  # lw, grad -> dlw (the (B,) state is noise)
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


def make_inputs(K: int, B: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    # log-weights of a trained IWAE spread over tens of nats within a column
    lw = (torch.randn(K, B, generator=g, dtype=DTYPE) * 10 - 100).to(device).requires_grad_()
    grad = torch.randn(B, generator=g, dtype=DTYPE).to(device)
    return lw, grad


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def keep_freed_memory() -> dict | None:
    """Makes glibc serve buffers up to 32 MB from the heap and never give freed
    heap memory back to the OS, so that every implementation's 10-16 MB outputs
    and temporaries land on pages already mapped. Otherwise whether a call
    pays for page faults (tens of microseconds each on this kind of VM, 500-4000
    per fresh buffer) depends on the order in which the interleaved cases
    happened to free memory, and that noise is larger than the differences
    measured. Applies to all implementations alike; returns what was set."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    settings = {"M_MMAP_THRESHOLD": 32 * 2**20, "M_TRIM_THRESHOLD": 2**30}
    ok = libc.mallopt(m_mmap_threshold, settings["M_MMAP_THRESHOLD"]) == 1
    ok &= libc.mallopt(m_trim_threshold, settings["M_TRIM_THRESHOLD"]) == 1
    return settings if ok else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=None,
                   help="KxB pairs, e.g. 5000x512 64x65536 (the default)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before each measurement (default 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fastvae-backends", nargs="+", default=None,
                   help="fastvae backends to time (default: the one fastvae picks for the device)")
    p.add_argument("--copy-mb", type=int, default=None,
                   help="MB of the second, input-sized copy probe (default 16; the first copies 256 MB)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: 500x64 and 16x4096, 3 repeats (flags given explicitly still apply)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc settings alone (see keep_freed_memory)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/logmeanexp-<tag>.json)")
    args = p.parse_args(argv)
    defaults = dict(shapes=["500x64", "16x4096"], repeats=3, warmup=1, copy_mb=1) if args.quick else \
        dict(shapes=["5000x512", "64x65536"], repeats=30, warmup=3, copy_mb=16)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    if args.fastvae_backends is None:
        args.fastvae_backends = [default_fastvae_backend(torch.device(args.device), "logmeanexp")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    malloc = None if args.default_malloc or device.type != "cpu" else keep_freed_memory()
    torch.manual_seed(0)
    meta = common.metadata(device)
    log(f"{meta['device_name']}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    copy = common.copy_bandwidth_gbs(device, mbytes=32 if args.quick else 256)
    copy_same = common.copy_bandwidth_gbs(device, mbytes=args.copy_mb, repeats=30)
    log(f"copy bandwidth: {copy['gbs']:.1f} GB/s ({copy['tensor_mbytes']} MB), "
        f"{copy_same['gbs']:.1f} GB/s ({args.copy_mb} MB), read + write")

    impls = make_impls(args.fastvae_backends)
    records, warmups = [], []
    for K, B in args.shapes:
        lw, grad = make_inputs(K, B, device)
        # The first calls compile (torch.compile forward and backward graphs) and
        # warm allocators; their time is recorded but kept out of the figures.
        for impl in impls:
            fn, _ = mode_callables(impl, "fwd+bwd", (lw,), lw, grad)
            with fastvae_backend(impl.backend):
                common.sync(device)
                t0 = time.perf_counter()
                fn()
                common.sync(device)
                warmups.append({"impl": impl.name, "K": K, "B": B, "first_call_s": time.perf_counter() - t0})
                fn()

        cases = {}
        for mode in MODES:
            for impl in impls:
                fn, setup = mode_callables(impl, mode, (lw,), lw, grad)
                cases[(mode, impl.name)] = (fn, setup, lambda b=impl.backend: fastvae_backend(b))
        all_times = common.time_interleaved_ms(cases, device, repeats=args.repeats, warmup=args.warmup)
        for mode in MODES:
            for impl in impls:
                times = all_times[(mode, impl.name)]
                med = common.median(times)
                nbytes = min_bytes(K, B, mode)
                records.append({
                    "impl": impl.name, "K": K, "B": B, "mode": mode,
                    "median_ms": med, "times_ms": times, "min_bytes": nbytes,
                    "gbs": common.gbs(nbytes, med), "pct_copy_bw": 100 * common.gbs(nbytes, med) / copy["gbs"],
                })
                log(f"K={K:<5} B={B:<6} {mode:<8} {impl.name:<14} {med:9.3f} ms")
        del lw, grad

    # Speedups compare medians of the same (shape, mode) taken in this run.
    by_key = {(r["impl"], r["K"], r["B"], r["mode"]): r for r in records}
    for r in records:
        key = (r["K"], r["B"], r["mode"])
        r["speedup_vs_eager"] = by_key[("eager", *key)]["median_ms"] / r["median_ms"]
        r["speedup_vs_compiled"] = by_key[("compiled", *key)]["median_ms"] / r["median_ms"]

    headers = ["impl", "K x B", "mode", "median ms", "GB/s", "% copy BW", "vs eager", "vs compiled"]
    rows = []
    for K, B in args.shapes:
        for mode in MODES:
            for impl in impls:
                r = by_key[(impl.name, K, B, mode)]
                rows.append([impl.name, f"{K}x{B}", mode, common.fmt(r["median_ms"], 3), common.fmt(r["gbs"], 1),
                             common.fmt(r["pct_copy_bw"], 1), common.fmt(r["speedup_vs_eager"]) + "x",
                             common.fmt(r["speedup_vs_compiled"]) + "x"])

    title = (f"logmeanexp over K, float32, {meta['device_name']}, {torch.get_num_threads()} threads; "
             f"copy bandwidth (read + write) {copy['gbs']:.1f} GB/s for {copy['tensor_mbytes']} MB "
             f"(the % column), {copy_same['gbs']:.1f} GB/s for {args.copy_mb} MB")
    table = common.markdown_table(headers, rows)
    print(f"\n{title}\n\n{table}\n")

    tag = common.device_tag(device) + ("-quick" if args.quick else "")
    out = args.out or common.RESULTS_DIR / f"{OP}-{tag}.json"
    payload = {
        "op": OP,
        **meta,
        "config": {"shapes": [list(s) for s in args.shapes], "dtype": "float32", "repeats": args.repeats,
                   "warmup": args.warmup, "fastvae_backends": args.fastvae_backends, "modes": list(MODES),
                   "input": "lw = 10 * randn - 100", "malloc_settings": malloc},
        "copy_bandwidth": copy,
        "copy_bandwidth_input_sized": copy_same,
        "results": records,
        "first_calls": warmups,
        "loadavg_at_end": common.loadavg(),
        "table_markdown": table,
    }
    log(f"wrote {common.write_json(out, payload)}")


if __name__ == "__main__":
    main()
