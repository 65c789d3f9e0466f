"""Benchmark of fastvae.log_likelihood: the K = 5000 importance-sampled
log-likelihood of a batch, streamed in chunks, against the two ways users
write it by hand.

What is measured
----------------
An MNIST-sized VAE with random weights (float32): encoder 784 -> 400 -> 2 x 20
(ReLU), decoder 20 -> 400 -> 784 Bernoulli logits (ReLU), and B binarized
examples (default B = 256, K = 5000). Every implementation computes, per
example, log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x) with z_k ~ q(z|x):

  fastvae       fastvae.log_likelihood(x, encode, decode, k=K, likelihood="bernoulli"):
                K in chunks picked from the default memory budget, each chunk
                decoded in one batched call, log-weights folded into the
                streaming (max, sumexp) state;
  naive         all at once in plain PyTorch: torch.randn (K, B, L), one decode
                of (K, B, 784), binary_cross_entropy_with_logits, logsumexp.
                When its estimated footprint (about K * B * (3 * 784 + 400) * 4
                bytes) exceeds half the memory available it runs on the most
                examples that fit (and is compared per example), or is skipped,
                the reason recorded either way;
  per-example   the naive computation in a Python loop over examples, K samples
                at a time: bounded memory, but B separate passes. Timed on
                --loop-examples examples (default 16) and reported per example
                and extrapolated to B.

Time: medians of --repeats calls after one warm-up, the implementations timed
round-robin (common.time_interleaved_ms). Peak memory: one fresh subprocess
per implementation (peak RSS above the inputs on CPU,
torch.cuda.max_memory_allocated on CUDA), one call each after a warm-up call
on a tiny problem. The mean log p̂(x) of each implementation (over the
examples it ran on) is recorded as a sanity check: the noise differs, so they
agree to Monte Carlo error, not exactly.

Reproduce (from the repository root):
  python -m benchmarks.bench_log_likelihood            # full run: K=5000, B=256 (minutes on 2 cores)
  python -m benchmarks.bench_log_likelihood --quick    # smoke run: K=200, B=32, 4 loop examples
Results go to benchmarks/results/log_likelihood-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch
import torch.nn.functional as F

import fastvae

from . import common

OP = "log_likelihood"
D, H, L = 784, 400, 20
IMPLS = ("fastvae", "naive", "per-example")


def make_model(device: torch.device):
    """Random-weight MLP encoder and Bernoulli decoder (PyTorch's default init)."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, 2 * L)).to(device)
    dec = torch.nn.Sequential(torch.nn.Linear(L, H), torch.nn.ReLU(), torch.nn.Linear(H, D)).to(device)
    enc.eval()
    dec.eval()

    def encode(x):
        mu, logvar = enc(x).chunk(2, dim=-1)
        return mu, logvar

    return encode, dec


def make_data(B: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(B, D, generator=g) < 0.3).float().to(device)


def naive_log_likelihood(x, encode, decode, k):
    """All K samples at once, as a user writes it: (K, B, D) decoder outputs in memory."""
    with torch.no_grad():
        mu, logvar = encode(x)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device)
        z = mu + std * eps
        logits = decode(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        # log p(z) - log q(z|x); the common.log(2 pi) terms cancel
        log_ratio = (-0.5 * z * z + 0.5 * eps * eps + 0.5 * logvar).sum(-1)
        return torch.logsumexp(log_px + log_ratio, dim=0) - math.log(k)


def per_example_log_likelihood(x, encode, decode, k):
    """The naive computation one example at a time."""
    return torch.cat([naive_log_likelihood(x[b:b + 1], encode, decode, k) for b in range(x.shape[0])])


def fastvae_log_likelihood(x, encode, decode, k):
    return fastvae.log_likelihood(x, encode, decode, k=k, likelihood="bernoulli")


FUNCTIONS = {"fastvae": fastvae_log_likelihood, "naive": naive_log_likelihood,
             "per-example": per_example_log_likelihood}


def naive_bytes(K: int, B: int) -> int:
    """Estimated footprint of the naive version: the (K, B, D) logits, about two
    more (K, B, D) temporaries inside the loss, and the (K, B, H) hidden layer."""
    return K * B * (3 * D + H) * 4


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def naive_fit(K: int, B: int, device: torch.device) -> tuple[int, str | None]:
    """How many examples the naive version runs on: all B when its estimated
    footprint fits in half the available memory (the machine is shared: no
    risk of the OOM killer), else the most that fit (timed per example, like
    the loop), 0 when not even one does; and the reason when not all B."""
    have = available_bytes(device)
    if have is None or naive_bytes(K, B) <= have // 2:
        return B, None
    n = min(B, (have // 2) // naive_bytes(K, 1))
    why = (f"all {B} examples need about {naive_bytes(K, B) / 2**30:.1f} GiB (K*B*(3D+H)*4 bytes), more "
           f"than half of the {have / 2**30:.1f} GiB available: ")
    return n, why + (f"run on {n} examples" if n else "skipped")


def examples_for(impl: str, args) -> int:
    if impl == "per-example":
        return min(args.B, args.loop_examples)
    if impl == "naive":
        return args.naive_examples
    return args.B


# -- peak memory in a subprocess -------------------------------------------------------


def memory_child(args) -> None:
    """Entry point of the --memory-child subprocess: one implementation, one call."""
    device = torch.device(args.device)
    encode, decode = make_model(device)
    x = make_data(examples_for(args.memory_child, args), device)
    fn = FUNCTIONS[args.memory_child]
    # One-time set-up (custom-op registration, the extension, BLAS buffers) on a
    # tiny problem first, so that the peak is the implementation's own.
    fn(x[:2], encode, decode, 2)
    print(json.dumps(common.peak_memory_mb(lambda: fn(x, encode, decode, args.k), device)))


def measure_memory(impl: str, args, device: torch.device) -> dict:
    child = ["benchmarks.bench_log_likelihood", "--memory-child", impl, "--device", str(device),
             "-B", str(args.B), "-K", str(args.k), "--loop-examples", str(args.loop_examples),
             "--naive-examples", str(args.naive_examples)]
    return common.run_child_json(child, timeout=3600)


# -- main ----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-B", type=int, default=None, help="examples (default 256)")
    p.add_argument("-K", "--k", type=int, default=None, help="importance samples per example (default 5000)")
    p.add_argument("--loop-examples", type=int, default=None,
                   help="examples timed for the per-example loop (default 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per implementation (default 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: K=200, B=32, 4 loop examples, 2 repeats (explicit flags still apply)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/log_likelihood-<tag>.json)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--naive-examples", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = dict(B=32, k=200, loop_examples=4, repeats=2) if args.quick else \
        dict(B=256, k=5000, loop_examples=16, repeats=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return None

    device = torch.device(args.device)
    meta = common.metadata(device)
    common.log(f"{meta['device_name']}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"fastvae backend {fastvae.backend_info(device)['logmeanexp']}")
    encode, decode = make_model(device)
    skipped, notes = {}, {}
    args.naive_examples, reason = naive_fit(args.k, args.B, device)
    if reason:
        (notes if args.naive_examples else skipped)["naive"] = reason
        common.log(f"naive: {reason}")
    impls = [i for i in IMPLS if i not in skipped]
    inputs = {i: make_data(examples_for(i, args), device) for i in impls}

    first_calls, estimates = {}, {}
    for impl in impls:
        common.sync(device)
        t0 = time.perf_counter()
        out = FUNCTIONS[impl](inputs[impl], encode, decode, args.k)
        common.sync(device)
        first_calls[impl] = time.perf_counter() - t0
        estimates[impl] = out.double().mean().item()
        common.log(f"{impl:<12} first call {first_calls[impl]:8.2f} s, mean log p(x) {estimates[impl]:.3f}")

    cases = {impl: ((lambda i=impl: FUNCTIONS[i](inputs[i], encode, decode, args.k)), None, contextlib.nullcontext)
             for impl in impls}
    times = common.time_interleaved_ms(cases, device, repeats=args.repeats, warmup=0)

    memory = {}
    if not args.no_memory:
        for impl in impls:
            memory[impl] = measure_memory(impl, args, device)
            common.log(f"{impl:<12} peak {memory[impl]['peak_mb']:9.1f} MB ({memory[impl]['method']})")

    records, rows = [], []
    for impl in impls:
        n = examples_for(impl, args)
        med = common.median(times[impl])
        record = {
            # mode/case/median_ms for the suite summary: the time for all B
            # examples, scaled per example when an implementation ran on fewer
            "impl": impl, "mode": "forward", "case": f"K={args.k}, B={args.B}", "K": args.k, "examples": n,
            "median_ms": med / n * args.B, "measured_ms": med, "times_ms": times[impl],
            "ms_per_example": med / n, "estimated_s_for_B": med / n * args.B / 1e3,
            "first_call_s": first_calls[impl], "mean_log_likelihood": estimates[impl],
            "peak_memory": memory.get(impl),
        }
        records.append(record)
    fast = next(r for r in records if r["impl"] == "fastvae")
    for r in records:
        r["speedup_of_fastvae"] = r["ms_per_example"] / fast["ms_per_example"]
        rows.append([r["impl"], r["examples"], common.fmt(r["measured_ms"] / 1e3, 2),
                     common.fmt(r["ms_per_example"], 1),
                     common.fmt(r["estimated_s_for_B"], 2), common.fmt(r["speedup_of_fastvae"]) + "x",
                     common.fmt(r["peak_memory"]["peak_mb"], 0) if r["peak_memory"] else "n/a",
                     common.fmt(r["mean_log_likelihood"], 2)])
    for impl, why in skipped.items():
        rows.append([impl, "-", "skipped", "", "", "", "", why])
    naive = next((r for r in records if r["impl"] == "naive"), None)
    fast["speedup_vs_eager"] = None if naive is None else naive["ms_per_example"] / fast["ms_per_example"]
    fast["speedup_vs_compiled"] = None
    if fast["peak_memory"]:
        fast["peak_mb"] = fast["peak_memory"]["peak_mb"]
    for r in records:
        if r["peak_memory"]:
            r["peak_mb"] = r["peak_memory"]["peak_mb"]
    headers = ["impl", "examples", "median s", "ms / example", f"s for B={args.B}", "fastvae faster by",
               "peak MB", "mean log p(x)"]
    table = common.markdown_table(headers, rows)
    title = (f"log_likelihood, K={args.k}, B={args.B}, MLP {D}-{H}-{L} Bernoulli VAE, float32, "
             f"{meta['device_name']}")
    print(f"\n{title}\n\n{table}\n")

    out = common.result_path(OP, device, args.quick, args.out)
    payload = {
        "op": OP,
        **meta,
        "config": {"B": args.B, "K": args.k, "loop_examples": args.loop_examples, "repeats": args.repeats,
                   "model": {"D": D, "hidden": H, "latent": L, "likelihood": "bernoulli", "dtype": "float32"},
                   "fastvae_chunking": {"memory_budget_bytes": fastvae.evaluation.DEFAULT_MEMORY_BUDGET}},
        "results": records,
        "skipped": skipped,
        "notes": notes,
        "loadavg_at_end": common.loadavg(),
        "table_markdown": table,
    }
    common.log(f"wrote {common.write_json(out, payload)}")
    return payload


if __name__ == "__main__":
    main()
