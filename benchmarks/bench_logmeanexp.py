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
(--input-copy-mb, default 16) is measured too and printed beside it: that is the
ceiling that applies here, and on these shapes the op is bound by its one exp
per element per pass rather than by memory.

On CPU the benchmark first tells glibc to keep freed memory mapped
(keep_freed_memory; --default-malloc leaves it alone), so that page faults on
fresh output buffers, which cost far more than the ops on the VMs this runs on
and land on whichever case happens to allocate after a trim, stay out of the
figures of every implementation. (The --memory subprocesses leave malloc as
common.run_child_json sets it, so that their RSS follows the live tensors.)

Reproduce (from the repository root):
  python -m benchmarks.bench_logmeanexp            # full run, ~1 min on 2 CPU cores
  python -m benchmarks.bench_logmeanexp --quick    # tiny smoke run
Results go to benchmarks/results/logmeanexp-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import ctypes
import math
import sys

import torch

import fastvae

from . import common, harness

OP = "logmeanexp"
DTYPE = torch.float32


def eager_logmeanexp(lw: torch.Tensor) -> torch.Tensor:
    """The baseline, written the way an IWAE user writes it."""
    return torch.logsumexp(lw, 0) - math.log(lw.shape[0])


def min_bytes(K: int, B: int, itemsize: int = 4) -> dict[str, int]:
    """Fewest bytes each mode must move: lw read once per pass, outputs written once."""
    fwd = (K * B + B) * itemsize  # lw -> out
    bwd = (K * B + B + K * B) * itemsize  # lw, grad -> dlw (the (B,) state is noise)
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(K: int, B: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    # log-weights of a trained IWAE spread over tens of nats within a column
    lw = (torch.randn(K, B, generator=g, dtype=DTYPE) * 10 - 100).to(device).requires_grad_()
    grad = torch.randn(B, generator=g, dtype=DTYPE).to(device)
    return (lw,), [lw], grad


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


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=None,
                   help="KxB pairs, e.g. 5000x512 64x65536 (the default; 500x64 16x4096 with --quick)")
    p.add_argument("--input-copy-mb", type=int, default=None,
                   help="MB of the second, input-sized copy probe (default 16, 1 with --quick)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc settings alone (see keep_freed_memory)")
    p.set_defaults(warmup=3)
    args = harness.parse_args(p, argv)
    shapes = args.shapes or (["500x64", "16x4096"] if args.quick else ["5000x512", "64x65536"])
    input_copy_mb = args.input_copy_mb or (1 if args.quick else 16)
    device = torch.device(args.device)
    keep = not (args.default_malloc or args.memory_child or device.type != "cpu")
    malloc = keep_freed_memory() if keep else None

    cases = []
    for K, B in (tuple(int(v) for v in s.lower().split("x")) for s in shapes):
        cases.append(harness.Case(f"{K}x{B}", {"K": K, "B": B}, lambda dev, K=K, B=B: make_inputs(K, B, dev),
                                  min_bytes(K, B), repeats=30))
    impls = harness.baseline_impls(eager_logmeanexp, lambda lw: fastvae.logmeanexp(lw, 0), OP, device,
                                   args.fastvae_backends)
    copy_same = None if args.memory_child else common.copy_bandwidth_gbs(device, mbytes=input_copy_mb, repeats=30)
    title = "logmeanexp over K, float32" + (
        f" (an input-sized {input_copy_mb} MB copy: {copy_same['gbs']:.1f} GB/s)" if copy_same else "")
    extra = {"copy_bandwidth_input_sized": copy_same, "malloc_settings": malloc, "input": "lw = 10 * randn - 100"}
    return harness.run(__spec__.name, OP, title, cases, impls, args, extra)


if __name__ == "__main__":
    main()
