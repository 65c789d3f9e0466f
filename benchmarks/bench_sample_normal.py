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

The noise generator alone (CPU): fastvae._C.randn_fill of 2**22 float32
normals on one thread, interleaved with torch.randn of the same size and with
the whole op ("sample_normal forward": the training forward of (2**17, 32),
inputs requiring grad, outputs allocated), medians in ns per normal or element
(issue 13's target: <= 0.7 ns; issue 36's: the forward at <= 2 ns and at least
2x faster than torch.randn on AVX2); "fastvae" is the noise path
the loader picked (fastvae._C.noise_isa()), and every other path this CPU runs
is timed too, forced (fastvae[portable], ...).

Peak memory of fwd+bwd (above the live inputs and upstream gradients) is
measured on CUDA always, and on CPU with --memory, one fresh subprocess per
implementation and K (peak RSS); the bytes saved for the backward are measured
in every run (see common.py).

Reproduce (from the repository root):
  python -m benchmarks.bench_sample_normal                 # full run, ~1.5 min on 2 CPU cores
  python -m benchmarks.bench_sample_normal --quick         # tiny smoke run
  python -m benchmarks.bench_sample_normal --memory        # also peak memory on CPU
  FASTVAE_BACKEND=reference python -m benchmarks.bench_sample_normal --quick
Results go to benchmarks/results/sample_normal-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import torch

import fastvae

from . import common, harness

OP = "sample_normal"
DTYPE = torch.float32


def eager_sample_normal(mu: torch.Tensor, logvar: torch.Tensor, n_samples: int):
    """The baseline, written the way a VAE user writes it."""
    eps = torch.randn((n_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1 - logvar, -1)
    return z, kl


def rng_ns_per_normal(n: int = 2**22, repeats: int = 15) -> dict:
    """Median ns per normal of the C++ generator alone and of torch.randn, one
    thread, timed alternately so that the machine's noise hits both alike."""
    import statistics
    import time

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


def min_bytes(B: int, L: int, K: int, itemsize: int = 4) -> dict[str, int]:
    """Fewest bytes each mode must move: every input read once, every output
    written once, no noise tensor stored."""
    fwd = (2 * B * L + K * B * L + B) * itemsize  # mu, logvar -> z, kl
    bwd = (K * B * L + B + 2 * B * L + 2 * B * L) * itemsize  # dz, dkl, mu, logvar -> dmu, dlogvar
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(B: int, L: int, K: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, L, generator=g, dtype=DTYPE).to(device).requires_grad_()
    # Encoders emit log-variances around a few units below zero; the value does
    # not change the work, only keeps exp() in a realistic range.
    logvar = (torch.randn(B, L, generator=g, dtype=DTYPE) - 1.0).to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g, dtype=DTYPE).to(device)
    gk = torch.randn(B, generator=g, dtype=DTYPE).to(device)
    return (mu, logvar, K), [mu, logvar], (gz, gk)


def cases(B: int, L: int, ks: list[int]) -> list[harness.Case]:
    # K=16 moves ~10x more data per call; fewer repeats keep the run short.
    return [harness.Case(f"K={K}", {"B": B, "L": L, "K": K}, lambda device, K=K: make_inputs(B, L, K, device),
                         min_bytes(B, L, K), repeats=20 if K < 8 else 10) for K in ks]


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("-B", type=int, default=None, help="batch size (default 65536, 4096 with --quick)")
    p.add_argument("-L", type=int, default=32, help="latent size (default 32)")
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help="numbers of samples K (default 1 16, 1 4 with --quick)")
    args = harness.parse_args(p, argv)
    B = args.B or (4096 if args.quick else 65536)
    ks = args.ks or ([1, 4] if args.quick else [1, 16])
    impls = harness.baseline_impls(eager_sample_normal, fastvae.sample_normal, OP, torch.device(args.device),
                                   args.fastvae_backends)
    extra = {}
    if args.device == "cpu" and not args.memory_child and "cpp" in fastvae.backend_info("cpu").values():
        rng = rng_ns_per_normal(2**18 if args.quick else 2**22)
        common.log("noise alone, 1 thread: " + ", ".join(
            f"{name} {r['median_ns_per_normal']:.3f} ns/normal" for name, r in rng.items()))
        extra["rng_1_thread"] = rng
    return harness.run(__spec__.name, OP, f"sample_normal, B={B}, L={args.L}, float32", cases(B, args.L, ks),
                       impls, args, extra)


if __name__ == "__main__":
    main()
