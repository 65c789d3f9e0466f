"""Benchmark of fastvae's noise stream alone on the CPU (the C++ Philox normals).

What is measured
----------------
fastvae._C.randn_fill of 2**22 float32 normals (2**18 with --quick) on one
thread, interleaved with torch.randn of the same size and with the whole
sampling op ("sample_normal forward": fastvae.sample_normal's training forward
of (2**17, 32), inputs requiring grad, outputs allocated), medians in ns per
normal or element (targets: <= 0.7 ns for the noise; the forward at <= 2 ns and at least
2x faster than torch.randn on AVX2). "fastvae" is the
noise path the loader picked (fastvae._C.noise_isa()), and every other path
this CPU runs is timed too, forced (fastvae[portable], ...). The stream is
shared by every sampler (kernels/philox.py, csrc/philox.cpp); sample_normal's
own benchmark row is `python -m benchmarks.bench_op sample_normal`.

CPU only, and only with the C++ extension: on another device, or without it,
the run writes a payload that says why nothing was measured.

Reproduce (from the repository root):
  python -m benchmarks.bench_noise                 # full run
  python -m benchmarks.bench_noise --quick         # tiny smoke run
Results go to benchmarks/results/noise-cpu.json (--out to override); the
same figures were the `rng_1_thread` entry of sample_normal's result file
before its benchmark became the op folder's row.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastvae

from . import common


def rng_ns_per_normal(n: int = 2**22, repeats: int = 15) -> dict:
    """Median ns per normal of the C++ generator alone and of torch.randn, one
    thread, timed alternately so that the machine's noise hits both alike."""
    from fastvae import _C

    out = torch.empty(n)
    # the op itself, 1 thread, in the same round-robin: the training forward
    # (inputs require grad) of n elements as (n / 32, 32)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(n // 32, 32, generator=g).requires_grad_()
    logvar = (torch.randn(n // 32, 32, generator=g) - 1.0).requires_grad_()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # "fastvae" is the path the loader picked; the other paths this CPU runs
    # are forced in turn (fastvae[portable], ...), so one machine compares them
    best = _C.noise_isa()
    others = [p for p in _C.noise_isas() if p != best]
    try:
        times: dict[str, list[float]] = {"fastvae": [], "torch.randn": [], "sample_normal forward": [],
                                         **{f"fastvae[{p}]": [] for p in others}}
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            _C.randn_fill(12345, 4 * i, out.numpy(), None, 1)
            t1 = time.perf_counter()
            torch.randn(n, out=out)
            t2 = time.perf_counter()
            z, kl = fastvae.sample_normal(mu, logvar)
            t3 = time.perf_counter()
            del z, kl
            if i >= 2:  # warm-up
                times["fastvae"].append(t1 - t0)
                times["torch.randn"].append(t2 - t1)
                times["sample_normal forward"].append(t3 - t2)
            for p in others:
                _C.set_noise_isa(p)
                try:
                    t0 = time.perf_counter()
                    _C.randn_fill(12345, 4 * i, out.numpy(), None, 1)
                    if i >= 2:
                        times[f"fastvae[{p}]"].append(time.perf_counter() - t0)
                finally:
                    _C.set_noise_isa("auto")
    finally:
        torch.set_num_threads(threads)
    return {name: {"median_ns_per_normal": 1e9 * statistics.median(t) / n,
                   "min_ns_per_normal": 1e9 * min(t) / n} for name, t in times.items()}


def table(rng: dict) -> str:
    return common.markdown_table(["implementation", "median ns / normal", "min ns / normal"],
                                 [[name, f"{r['median_ns_per_normal']:.3f}", f"{r['min_ns_per_normal']:.3f}"]
                                  for name, r in rng.items()])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2**18 normals: a smoke run, not figures")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--device", default="cpu", help="the noise measured is the CPU's: any other device measures nothing")
    p.add_argument("--memory", action="store_true", help="ignored: nothing here allocates beyond its buffers")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    payload = {"op": "noise", **common.metadata(device),
               "title": "The noise stream alone: ns per float32 normal, 1 thread (CPU, the C++ noise paths)"}
    if device.type != "cpu" or "cpp" not in fastvae.backend_info("cpu").values():
        why = "the C++ extension is not built" if device.type == "cpu" else f"device {device} is not the CPU"
        payload.update(skipped=why, table_markdown=f"not measured: {why}")
    else:
        rng = rng_ns_per_normal(2**18 if args.quick else 2**22, args.repeats)
        common.log("noise alone, 1 thread: " + ", ".join(
            f"{name} {r['median_ns_per_normal']:.3f} ns/normal" for name, r in rng.items()))
        payload.update(rng_1_thread=rng, table_markdown=table(rng))
    path = common.write_json(common.result_path("noise", device, args.quick, args.out), payload)
    common.log(f"wrote {path}")
    print(payload["table_markdown"])
    return payload


if __name__ == "__main__":
    main()
