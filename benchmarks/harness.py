"""A generic forward / backward / forward+backward benchmark of one op against
its eager and torch.compile baselines, built on common.py. An op's benchmark
script supplies its cases (problem sizes), the implementations and the fewest
bytes each mode must move; this runs them interleaved in one process, prints
the markdown table and writes the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import fastvae

from . import common

MODES = ("forward", "backward", "fwd+bwd")


@dataclass
class Impl:
    name: str
    fn: Callable[..., torch.Tensor]
    backend: str | None = None  # FASTVAE_BACKEND while this implementation runs


@dataclass
class Case:
    label: str  # e.g. "K=8"
    params: dict[str, Any]
    # device -> (positional args of fn, tensors to differentiate, upstream gradient)
    make_inputs: Callable[[torch.device], tuple[tuple, list[torch.Tensor], torch.Tensor]]
    min_bytes: dict[str, int] = field(default_factory=dict)  # mode -> bytes


@contextlib.contextmanager
def fastvae_backend(name: str | None):
    """fastvae reads FASTVAE_BACKEND at every call, forward and backward alike."""
    if name is None:
        yield
        return
    old = os.environ.get("FASTVAE_BACKEND")
    os.environ["FASTVAE_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTVAE_BACKEND"]
        else:
            os.environ["FASTVAE_BACKEND"] = old


def default_fastvae_backend(device: torch.device, op: str) -> str:
    """The backend fastvae picks for op on device (backend_info says
    "reference (cpp extension missing)" when it falls back)."""
    return fastvae.backend_info(device)[op].split()[0]


def baseline_impls(eager: Callable, fastvae_fn: Callable, op: str, device: torch.device,
                   backends: list[str] | None) -> list[Impl]:
    """eager, torch.compile(eager) and fastvae on each backend (default: the one it picks)."""
    if backends is None:
        backends = [default_fastvae_backend(device, op)]
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
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fastvae-backends", nargs="+", default=None)
    p.add_argument("--copy-mb", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="small sizes and 3 repeats: a smoke run")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<name>-<device>.json)")
    return p


def run(name: str, title: str, cases: list[Case], impls: list[Impl], args) -> dict:
    """Times every (case, mode, impl), prints the table, writes the JSON; returns the payload."""
    device = torch.device(args.device)
    meta = common.metadata(device)
    print(f"{meta['device_name']}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          file=sys.stderr)
    copy = common.copy_bandwidth_gbs(device, mbytes=args.copy_mb)
    repeats = 3 if args.quick else args.repeats
    records, first_calls = [], []
    for case in cases:
        args_, wrt, g = case.make_inputs(device)
        for impl in impls:  # compile and warm up outside the figures
            fn, _ = mode_callables(impl, "fwd+bwd", args_, wrt, g)
            with fastvae_backend(impl.backend):
                common.sync(device)
                t0 = time.perf_counter()
                fn()
                common.sync(device)
                first_calls.append({"impl": impl.name, "case": case.label, "first_call_s": time.perf_counter() - t0})
        timed = {}
        for mode in MODES:
            for impl in impls:
                fn, setup = mode_callables(impl, mode, args_, wrt, g)
                timed[(mode, impl.name)] = (fn, setup, lambda b=impl.backend: fastvae_backend(b))
        times = common.time_interleaved_ms(timed, device, repeats=repeats, warmup=args.warmup)
        for mode in MODES:
            for impl in impls:
                med = common.median(times[(mode, impl.name)])
                nbytes = case.min_bytes[mode]
                records.append({
                    "impl": impl.name, "case": case.label, **case.params, "mode": mode,
                    "median_ms": med, "times_ms": times[(mode, impl.name)], "min_bytes": nbytes,
                    "gbs": common.gbs(nbytes, med), "pct_copy_bw": 100 * common.gbs(nbytes, med) / copy["gbs"],
                })
                print(f"{case.label:<6} {mode:<8} {impl.name:<16} {med:9.3f} ms", file=sys.stderr)
        del args_, wrt, g

    by_key = {(r["impl"], r["case"], r["mode"]): r for r in records}
    for r in records:
        r["speedup_vs_eager"] = by_key[("eager", r["case"], r["mode"])]["median_ms"] / r["median_ms"]
        r["speedup_vs_compiled"] = by_key[("compiled", r["case"], r["mode"])]["median_ms"] / r["median_ms"]
    headers = ["impl", "case", "mode", "median ms", "GB/s", "% copy BW", "vs eager", "vs compiled"]
    rows = [[r["impl"], r["case"], r["mode"], common.fmt(r["median_ms"], 3), common.fmt(r["gbs"], 1),
             common.fmt(r["pct_copy_bw"], 1), common.fmt(r["speedup_vs_eager"]) + "x",
             common.fmt(r["speedup_vs_compiled"]) + "x"]
            for case in cases for mode in MODES for impl in impls
            for r in [by_key[(impl.name, case.label, mode)]]]
    table = common.markdown_table(headers, rows)
    print(f"\n{title}, {meta['device_name']}; copy bandwidth {copy['gbs']:.1f} GB/s (read + write)\n\n{table}\n")
    payload = {"op": name, **meta, "title": title, "copy_bandwidth": copy, "repeats": repeats,
               "results": records, "first_calls": first_calls, "table_markdown": table}
    tag = common.device_tag(device) + ("-quick" if args.quick else "")
    out = args.out or common.RESULTS_DIR / f"{name}-{tag}.json"
    print(f"wrote {common.write_json(out, payload)}", file=sys.stderr)
    return payload
