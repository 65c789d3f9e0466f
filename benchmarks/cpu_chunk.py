"""Chunk size on the CPU: how long an evaluation takes against its memory
budget (the bytes a chunk may use, which sizes it), on two models: the
measurement behind fastvae.evaluation.DEFAULT_MEMORY_BUDGET (256 MiB).

What is measured
----------------
  log_likelihood   fastvae.log_likelihood on bench_log_likelihood's MLP VAE
                   (784 -> 400 -> 2 x 20, decoder 20 -> 400 -> 784 Bernoulli
                   logits), B binarized examples;
  pyro adapter     fastvae.integrations.pyro.log_likelihood on the Pyro VAE
                   tutorial's model and guide (784 -> 400 -> 50, a sigmoid
                   decoder), B random binary examples; beside it the loop Pyro
                   users write, vectorized_importance_weights one example per
                   call (bench_integrations' "pyro loop"), whose time does
                   not depend on the target.

Each fastvae case runs with memory_budget= one of --budgets (MiB): a
smaller budget gives shorter chunks, whose tensors stay in the last-level
cache (32 MiB on the EPYC these ran on) but whose matrix products are
smaller and whose per-chunk costs (Pyro's trace, the merge) are more. Time: one call per case per round, the cases
round-robin with the first rotated (common.time_interleaved_ms), --repeats
rounds after a warm-up; medians.

Reproduce (from the repository root; the Pyro cases need pyro-ppl):
  python -m benchmarks.cpu_chunk                 # B = 256, K = 1000, budgets 16 32 64 256 1024
  python -m benchmarks.cpu_chunk --quick         # a smoke run: B = 16, K = 50
Results go to benchmarks/results/cpu-chunk-cpu.json (--out to override).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import warnings

import torch

import fastvae
from fastvae import evaluation

from . import common
from .bench_integrations import pyro_loop, tutorial_vae
from .bench_log_likelihood import make_data, make_model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="B = 16, K = 50, 1 repeat: a smoke run")
    p.add_argument("--examples", type=int, default=None, help="B (default 256)")
    p.add_argument("--k", type=int, default=None, help="samples per example (default 1000)")
    p.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64, 256, 1024], help="MiB")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 3)")
    p.add_argument("--no-pyro", action="store_true", help="the log_likelihood cases only")
    p.add_argument("--out", default="benchmarks/results/cpu-chunk-cpu.json")
    args = p.parse_args(argv)
    b = args.examples or (16 if args.quick else 256)
    k = args.k or (50 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 3)
    cpu = torch.device("cpu")
    warnings.simplefilter("ignore")  # the random-weight models' ESS and k̂ warnings

    encode, decode = make_model(cpu)
    x_ll = make_data(b, cpu)
    cases = {}
    for mib in args.budgets:
        cases[f"log_likelihood {mib} MiB"] = (
            lambda mib=mib: fastvae.log_likelihood(x_ll, encode, decode, k=k, likelihood="bernoulli",
                                                   memory_budget=mib * 2**20), None, contextlib.nullcontext)
    if not args.no_pyro:
        from fastvae.integrations.pyro import log_likelihood as pyro_ll

        model, guide = tutorial_vae(784, 400, 50)
        x_pyro = (torch.rand(b, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float()
        for mib in args.budgets:
            cases[f"pyro adapter {mib} MiB"] = (
                lambda mib=mib: pyro_ll(model, guide, x_pyro, k=k, memory_budget=mib * 2**20), None,
                contextlib.nullcontext)
        cases["pyro loop"] = (lambda: pyro_loop(model, guide, x_pyro, k), None, contextlib.nullcontext)
    with torch.no_grad():
        times = common.time_interleaved_ms(cases, cpu, repeats=repeats, warmup=1)
    med = {name: common.median(t) for name, t in times.items()}
    results = []
    for name, t in times.items():
        row = {"case": name, "median_ms": med[name], "ms": t}
        if name.startswith("log_likelihood"):
            row["speedup_vs_256_MiB"] = med.get("log_likelihood 256 MiB", float("nan")) / med[name]
        if name.startswith("pyro adapter"):
            row["speedup_vs_256_MiB"] = med.get("pyro adapter 256 MiB", float("nan")) / med[name]
        if name.startswith("pyro adapter"):
            row["speedup_vs_pyro_loop"] = med["pyro loop"] / med[name]
        results.append(row)
        print(f"{name:24s} {med[name] / 1e3:7.2f} s", {key: round(v, 2) for key, v in row.items()
                                                       if key.startswith("speedup")})
    record = {"op": "cpu_chunk", "examples": b, "k": k, "repeats": repeats, "budgets_mib": args.budgets,
              "default_memory_budget_mb": evaluation.DEFAULT_MEMORY_BUDGET / 2**20, "results": results,
              **common.metadata(cpu)}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
