"""Benchmark of fastvae.sample_normal (reparameterized sampling + analytic KL).

What is measured
----------------
For mu, logvar of shape (B, L) (float32, default B=65536, L=32) and K samples
(default K=1 and K=16), the op returns z = mu + exp(logvar/2) * eps of shape
(K, B, L) and kl = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar, -1) of shape (B,).

Implementations, side by side in one run:
  eager            the reference as users write it: torch.randn, exp, sum;
  compiled         torch.compile of that same function (compiled before timing);
  fastvae[<name>]  fastvae.sample_normal on the backend <name> (default: the one
                   fastvae picks for the device: cpp on CPU, triton on CUDA).

Modes, each a median over --repeats repetitions after warm-up (on CPU all
cases of one K are timed round-robin, so that bursts of other load on a shared
machine hit every case alike):
  forward   the training forward: inputs require grad, so the autograd graph
            and whatever it saves are built, as they would be in training;
  backward  torch.autograd.grad of (z, kl) w.r.t. (mu, logvar) with fixed random
            upstream gradients; the graph is built by a forward outside the timed
            region on every repetition (a graph is consumed by its backward);
  fwd+bwd   both, in one timed region.

Effective bandwidth is the fewest bytes each mode must move divided by the
median time (forward: read mu, logvar, write z, kl; backward: read dz, dkl,
mu, logvar, write dmu, dlogvar; the noise is never stored), reported next to
the copy bandwidth of the same machine measured in the same run (copy_ of a
256 MB float32 tensor into a preallocated buffer, counting read + write).

Peak memory of fwd+bwd (above the live inputs and upstream gradients) is
measured on CUDA always, and on CPU with --memory, one fresh subprocess per
implementation and K (peak RSS).

Reproduce (from the repository root):
  python -m benchmarks.bench_sample_normal                 # full run, ~1.5 min on 2 CPU cores
  python -m benchmarks.bench_sample_normal --quick         # tiny smoke run
  python -m benchmarks.bench_sample_normal --memory        # also peak memory on CPU
  FASTVAE_BACKEND=reference python -m benchmarks.bench_sample_normal --quick
Results go to benchmarks/results/sample_normal-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

import fastvae

from . import common
from .harness import Impl, default_fastvae_backend, fastvae_backend, mode_callables

OP = "sample_normal"
MODES = ("forward", "backward", "fwd+bwd")
DTYPE = torch.float32


def eager_sample_normal(mu: torch.Tensor, logvar: torch.Tensor, n_samples: int):
    """The baseline, written the way a VAE user writes it."""
    eps = torch.randn((n_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1 - logvar, -1)
    return z, kl


def make_impls(backends: list[str]) -> list[Impl]:
    # dynamic=False: one graph specialised per K, the best case for the baseline.
    compiled = torch.compile(eager_sample_normal, dynamic=False)
    impls = [Impl("eager", eager_sample_normal), Impl("compiled", compiled)]
    for b in backends:
        impls.append(Impl(f"fastvae[{b}]", lambda mu, lv, k: fastvae.sample_normal(mu, lv, k), b))
    return impls


def min_bytes(B: int, L: int, K: int, mode: str, itemsize: int = 4) -> int:
    """Fewest bytes each mode must move: every input read once, every output
    written once, no noise tensor stored."""
    fwd = (2 * B * L + K * B * L + B) * itemsize  # mu, logvar -> z, kl
    bwd = (K * B * L + B + 2 * B * L + 2 * B * L) * itemsize  # dz, dkl, mu, logvar -> dmu, dlogvar
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


def make_inputs(B: int, L: int, K: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, L, generator=g, dtype=DTYPE).to(device).requires_grad_()
    # Encoders emit log-variances around a few units below zero; the value does
    # not change the work, only keeps exp() in a realistic range.
    logvar = (torch.randn(B, L, generator=g, dtype=DTYPE) - 1.0).to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g, dtype=DTYPE).to(device)
    gk = torch.randn(B, generator=g, dtype=DTYPE).to(device)
    return mu, logvar, gz, gk


def default_repeats(K: int) -> int:
    # K=16 moves ~10x more data per call; fewer repeats keep the run short.
    return 20 if K < 8 else 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- peak memory in a subprocess (CPU) ----------------------------------------


def memory_child(args) -> None:
    """Entry point of the --memory subprocess: one implementation, one K."""
    device = torch.device(args.device)
    K = args.ks[0]
    impl = next(i for i in make_impls(args.fastvae_backends) if i.name == args.memory_child)
    mu, logvar, gz, gk = make_inputs(args.B, args.L, K, device)
    fn, _ = mode_callables(impl, "fwd+bwd", (mu, logvar, K), (mu, logvar), (gz, gk))
    with fastvae_backend(impl.backend):
        for _ in range(2):  # compile and warm allocator caches before the peak is reset
            fn()
        gc.collect()
        result = common.peak_memory_mb(fn, device)
    print(json.dumps(result))


def measure_memory(impl: Impl, K: int, args, device: torch.device) -> dict:
    if device.type == "cuda":
        mu, logvar, gz, gk = make_inputs(args.B, args.L, K, device)
        fn, _ = mode_callables(impl, "fwd+bwd", (mu, logvar, K), (mu, logvar), (gz, gk))
        with fastvae_backend(impl.backend):
            fn()
            return common.peak_memory_mb(fn, device)
    child = [
        "benchmarks.bench_sample_normal", "--memory-child", impl.name,
        "--device", str(device), "-B", str(args.B), "-L", str(args.L), "--ks", str(K),
        "--fastvae-backends", *args.fastvae_backends,
    ]
    return common.run_child_json(child)


# -- main ----------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-B", type=int, default=None, help="batch size (default 65536)")
    p.add_argument("-L", type=int, default=32, help="latent size (default 32)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of samples K (default 1 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 20 for K<8, else 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before each measurement (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fastvae-backends", nargs="+", default=None,
                   help="fastvae backends to time (default: the one fastvae picks for the device)")
    p.add_argument("--copy-mb", type=int, default=None, help="MB copied by the copy-bandwidth probe (default 256)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory on CPU (subprocesses)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: B=4096, K=1 4, 3 repeats (flags given explicitly still apply)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sample_normal-<tag>.json)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # Defaults are filled in here so that --quick changes only what was not given.
    defaults = dict(B=4096, ks=[1, 4], repeats=3, warmup=1, copy_mb=32) if args.quick else \
        dict(B=65536, ks=[1, 16], repeats=None, warmup=2, copy_mb=256)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.fastvae_backends is None:
        args.fastvae_backends = [default_fastvae_backend(torch.device(args.device), OP)]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return

    device = torch.device(args.device)
    torch.manual_seed(0)
    meta = common.metadata(device)
    log(f"{meta['device_name']}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    copy = common.copy_bandwidth_gbs(device, mbytes=args.copy_mb)
    log(f"copy bandwidth: {copy['gbs']:.1f} GB/s (read + write, {args.copy_mb} MB)")

    impls = make_impls(args.fastvae_backends)
    records, warmups, memory = [], [], []
    for K in args.ks:
        repeats = args.repeats or default_repeats(K)
        mu, logvar, gz, gk = make_inputs(args.B, args.L, K, device)

        # The first calls compile (torch.compile forward and backward graphs) and
        # warm allocators; their time is recorded but kept out of the figures.
        for impl in impls:
            fn, _ = mode_callables(impl, "fwd+bwd", (mu, logvar, K), (mu, logvar), (gz, gk))
            with fastvae_backend(impl.backend):
                common.sync(device)
                t0 = time.perf_counter()
                fn()
                common.sync(device)
                warmups.append({"impl": impl.name, "K": K, "first_call_s": time.perf_counter() - t0})
                fn()

        # All (mode, implementation) cases of one K are timed interleaved, so the
        # figures compared with each other are taken as close in time as possible.
        cases = {}
        for mode in MODES:
            for impl in impls:
                fn, setup = mode_callables(impl, mode, (mu, logvar, K), (mu, logvar), (gz, gk))
                cases[(mode, impl.name)] = (fn, setup, lambda b=impl.backend: fastvae_backend(b))
        all_times = common.time_interleaved_ms(cases, device, repeats=repeats, warmup=args.warmup)
        for mode in MODES:
            for impl in impls:
                times = all_times[(mode, impl.name)]
                med = common.median(times)
                nbytes = min_bytes(args.B, args.L, K, mode)
                records.append({
                    "impl": impl.name, "K": K, "mode": mode, "B": args.B, "L": args.L,
                    "median_ms": med, "times_ms": times, "min_bytes": nbytes,
                    "gbs": common.gbs(nbytes, med), "pct_copy_bw": 100 * common.gbs(nbytes, med) / copy["gbs"],
                })
                log(f"K={K:<3} {mode:<8} {impl.name:<14} {med:9.3f} ms")
        del mu, logvar, gz, gk

        if device.type == "cuda" or args.memory:
            for impl in impls:
                m = measure_memory(impl, K, args, device)
                memory.append({"impl": impl.name, "K": K, "mode": "fwd+bwd", **m})
                log(f"K={K:<3} peak     {impl.name:<14} {m['peak_mb']:9.1f} MB ({m['method']})")

    # Speedups compare medians of the same (K, mode) taken in this run.
    by_key = {(r["impl"], r["K"], r["mode"]): r for r in records}
    for r in records:
        r["speedup_vs_eager"] = by_key[("eager", r["K"], r["mode"])]["median_ms"] / r["median_ms"]
        r["speedup_vs_compiled"] = by_key[("compiled", r["K"], r["mode"])]["median_ms"] / r["median_ms"]
    peak = {(m["impl"], m["K"]): m["peak_mb"] for m in memory}

    headers = ["impl", "K", "mode", "median ms", "GB/s", "% copy BW", "vs eager", "vs compiled"]
    if peak:
        headers.append("peak MB")
    rows = []
    for K in args.ks:
        for mode in MODES:
            for impl in impls:
                r = by_key[(impl.name, K, mode)]
                row = [impl.name, K, mode, common.fmt(r["median_ms"], 3), common.fmt(r["gbs"], 1),
                       common.fmt(r["pct_copy_bw"], 1), common.fmt(r["speedup_vs_eager"]) + "x",
                       common.fmt(r["speedup_vs_compiled"]) + "x"]
                if peak:
                    row.append(common.fmt(peak.get((impl.name, K)), 1) if mode == "fwd+bwd" else "")
                rows.append(row)

    title = (f"sample_normal, B={args.B}, L={args.L}, float32, {meta['device_name']}; "
             f"copy bandwidth {copy['gbs']:.1f} GB/s (read + write)")
    table = common.markdown_table(headers, rows)
    print(f"\n{title}\n\n{table}\n")

    tag = common.device_tag(device) + ("-quick" if args.quick else "")
    out = args.out or common.RESULTS_DIR / f"{OP}-{tag}.json"
    payload = {
        "op": OP,
        **meta,
        "config": {"B": args.B, "L": args.L, "ks": args.ks, "dtype": "float32", "repeats": args.repeats,
                   "default_repeats": "20 for K<8, else 10", "warmup": args.warmup,
                   "fastvae_backends": args.fastvae_backends, "modes": list(MODES)},
        "copy_bandwidth": copy,
        "results": records,
        "first_calls": warmups,
        "loadavg_at_end": common.loadavg(),
        "peak_memory": memory,
        "table_markdown": table,
    }
    log(f"wrote {common.write_json(out, payload)}")


if __name__ == "__main__":
    main()
