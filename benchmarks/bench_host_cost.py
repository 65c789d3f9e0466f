"""Host time per training call of the objectives, and of one latent group of a
hierarchical VAE (fastvae.sample_normal_kl, called 20-60 times a step).

  python -m benchmarks.bench_host_cost [--quick] [--out FILE]                 # no GPU needed
  python -m benchmarks.bench_host_cost --device cuda [--profile] [--out FILE] # on a GPU
  python -m benchmarks.bench_host_cost --compiled [--device cuda] [--profile]  # under torch.compile

On the CPU (the default), the method of the host-cost tool (benchmarks/README.md):
the triton backend runs on tiny CPU tensors under TRITON_INTERPRET=1 with every
Triton launch replaced by a no-op, so what is timed is what the host does
around the kernels on a GPU (fastvae's Python, the dispatcher, autograd, the
torch ops the path issues). Each stubbed launch returns a stand-in for the
compiled kernel whose launcher does nothing, so that, as on a GPU, a plan's
second call launches directly (_launch.Launch's check of the tensors' alignment,
the device and the hooks is timed; Triton's C launcher and the driver are not).
Beside it, the CPU path (the cpp backend: the C++ operators of
csrc/torch_ops.cpp, kernels included, at these tiny sizes nearly all host time)
and the same loss written by hand in torch, on the same tensors, rounds
interleaved, one thread. Each subtracts a baseline step (the decoder and
autograd.grad alone), so the figures are the loss's own host time.

With ``--device cuda`` the same cases run on a GPU with real launches: the host
time of a call is the time of 200 calls enqueued without a sync (the kernels of
these sizes finish faster than the host enqueues them), the CPU path left out.
Each record says how many of the plans' launches went to the compiled kernel
directly (``direct_launches``: all of them, where the lean path holds);
``--profile`` adds cProfile's top functions of the Bernoulli elbo's calls.

With ``--compiled`` each case also runs under ``torch.compile(fullgraph=True)``:
fastvae's loss on the CUDA code path (``compiled_us``; on the CPU with the same
stubbed launches, so the graph's fastvae nodes are timed as far as the
launcher) and the hand-written loss compiled (``hand_compiled_us``; on the CPU
Inductor's kernels are C++ functions, so its launches cost less than a GPU's).
The step around the loss (autograd.grad) is not compiled, as in a training
loop that compiles the model's loss. The compiled figures subtract the
baseline step compiled: torch.compile's own cost per call (Dynamo's guards,
AOT autograd's runtime wrappers, the compiled backward's node; the record's
``compile_floor_us``, compiled baseline less eager) is paid once per compiled
region, by a step that compiles its model with the loss whether or not the
loss is fastvae's, so what remains is what the loss adds to a compiled step.
benchmarks/README.md says how to read them.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastvae
from fastvae import _launch, _plan, _registry

from . import common

B, D, L, K = 4, 8, 2, 5
LOG2PI = 1.8378770664093453
GROUP = (B, 2, 2, 2)  # one latent group of a hierarchical VAE: (B, C, H, W), tiny


def gaussian_analytical_kl(mu1, mu2, logsigma1, logsigma2):
    """VDVAE's (vae_helpers.py): KL(N(mu1, sigma1) || N(mu2, sigma2)) per element."""
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (logsigma1.exp() ** 2 + (mu1 - mu2) ** 2) / (logsigma2.exp() ** 2)


def draw_gaussian_diag_samples(mu, logsigma):
    """VDVAE's (vae_helpers.py)."""
    eps = torch.empty_like(mu).normal_(0., 1.)
    return torch.exp(logsigma) * eps + mu


# launches per call on the CPU measure: through Triton's run (stubbed), directly
_COUNTS = {"run": 0, "direct": 0}


class _NoOpCompiled:
    """What a stubbed launch returns in place of Triton's CompiledKernel: a
    launcher that does nothing (the CPU measure's direct launches)."""

    function = packed_metadata = None

    @staticmethod
    def run(*args) -> None:
        _COUNTS["direct"] += 1


class _NoOpRuntime:
    """Triton's driver calls as _launch.Launch makes them (no CUDA driver here)."""

    def __init__(self):
        from types import SimpleNamespace
        self.knobs = SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def current_stream(device) -> int:
        return 0

    @staticmethod
    def is_compiled(kernel) -> bool:
        return isinstance(kernel, _NoOpCompiled)


def _stub_launches() -> None:
    """Every interpreted launch a no-op that returns a _NoOpCompiled (counted
    in _COUNTS["run"]: a plan's first launches, and the general path's)."""
    from triton.runtime import interpreter

    def stub(self, *args, **kwargs):
        _COUNTS["run"] += 1
        return _NoOpCompiled()

    interpreter.InterpretedFunction.run = stub
    _launch._runtime = _NoOpRuntime()


def _setup(device: torch.device):
    """cases {name: (fastvae loss, hand-written loss, baseline, leaves)} on
    ``device``. The "halves" case takes mu and logvar as encoders return them,
    the strided halves of one output (h.chunk(2, -1), inside the loss), with a
    baseline of its own; "mean alone" is a Gaussian decoder that returns its
    mean (unit variance); "laplace" a Laplace posterior against a Laplace
    prior, both torch distributions made in the loss (validated, torch's
    default, and with validate_args=False); "autocast" runs the three steps under torch.autocast
    (bfloat16); "one group" is sample_normal_kl against VDVAE's two functions,
    with a baseline of its own."""
    torch.manual_seed(0)
    x = (torch.rand(B, D) > 0.5).float().to(device)
    W, W2 = (torch.randn(L, D) * 0.3).to(device), (torch.randn(L, 2 * D) * 0.3).to(device)
    mu, lv = (torch.randn(B, L).to(device).requires_grad_() for _ in range(2))
    h = torch.cat([mu, lv], -1).detach().requires_grad_()

    def dec(z):
        return z @ W

    def dec_g(z):
        h = z @ W2
        return h[..., :D], h[..., D:]

    def kl(m, v):
        return 0.5 * (v.exp() + m * m - 1 - v).sum(-1)

    def hand_elbo():
        z = mu + (0.5 * lv).exp() * torch.randn_like(mu)
        rec = -F.binary_cross_entropy_with_logits(dec(z), x, reduction="none").sum(-1)
        return -(rec - kl(mu, lv)).mean()

    def hand_elbo_g():
        z = mu + (0.5 * lv).exp() * torch.randn_like(mu)
        m, v = dec_g(z)
        rec = (-0.5 * ((x - m) ** 2 * torch.exp(-v) + v + LOG2PI)).sum(-1)
        return -(rec - kl(mu, lv)).mean()

    def hand_elbo_unit():  # a Gaussian decoder's mean alone: unit variance
        z = mu + (0.5 * lv).exp() * torch.randn_like(mu)
        rec = (-0.5 * ((x - dec(z)) ** 2 + LOG2PI)).sum(-1)
        return -(rec - kl(mu, lv)).mean()

    def hand_iwae():
        eps = torch.randn(K, *mu.shape, device=device)
        z = mu + (0.5 * lv).exp() * eps
        rec = -F.binary_cross_entropy_with_logits(dec(z), x.expand(K, -1, -1), reduction="none").sum(-1)
        lw = rec + (-0.5 * z * z).sum(-1) - (-0.5 * eps * eps - 0.5 * lv).sum(-1)
        return -(torch.logsumexp(lw, 0) - 1.6094379124341003).mean()

    def hand_elbo_halves():
        m, v = h.chunk(2, -1)
        z = m + (0.5 * v).exp() * torch.randn_like(m)
        rec = -F.binary_cross_entropy_with_logits(dec(z), x, reduction="none").sum(-1)
        return -(rec - kl(m, v)).mean()

    def elbo_halves():
        return -fastvae.elbo(x, *h.chunk(2, -1), dec, likelihood="bernoulli")

    def base_halves():
        m, v = h.chunk(2, -1)
        return dec(m + 0.0 * v).sum()

    def base():
        return dec(mu + 0.0 * lv).sum()

    leaves = (mu, lv)
    cases = {
        "elbo bernoulli": (lambda: -fastvae.elbo(x, mu, lv, dec, likelihood="bernoulli"), hand_elbo, base, leaves),
        "elbo bernoulli, halves": (elbo_halves, hand_elbo_halves, base_halves, (h,)),
        "elbo gaussian": (lambda: -fastvae.elbo(x, mu, lv, dec_g, likelihood="gaussian"), hand_elbo_g, base,
                          leaves),
        "elbo gaussian, mean alone": (lambda: -fastvae.elbo(x, mu, lv, dec, likelihood="gaussian"), hand_elbo_unit,
                                      base, leaves),
        "iwae k=5": (lambda: -fastvae.iwae(x, mu, lv, dec, k=K, likelihood="bernoulli"), hand_iwae, base, leaves),
        "iwae k=5 dreg": (lambda: -fastvae.iwae(x, mu, lv, dec, k=K, likelihood="bernoulli", estimator="dreg"),
                          hand_iwae, base, leaves),
    }
    # a latent family as users pass it: torch distributions built in the loss, a same-family prior
    p_loc, p_scale = torch.zeros(L, device=device), torch.ones(L, device=device)

    def elbo_laplace():
        q = torch.distributions.Laplace(mu, lv.exp())
        return -fastvae.elbo(x, q, dec, likelihood="bernoulli", prior=torch.distributions.Laplace(p_loc, p_scale))

    def hand_elbo_laplace():
        q, p = torch.distributions.Laplace(mu, lv.exp()), torch.distributions.Laplace(p_loc, p_scale)
        rec = -F.binary_cross_entropy_with_logits(dec(q.rsample()), x, reduction="none").sum(-1)
        return -(rec - torch.distributions.kl_divergence(q, p).sum(-1)).mean()

    cases["elbo laplace, laplace prior"] = (elbo_laplace, hand_elbo_laplace, base, leaves)
    Laplace = torch.distributions.Laplace

    def elbo_laplace_unvalidated():  # torch's argument checks off, as docs/latents.md advises in a training step
        q = Laplace(mu, lv.exp(), validate_args=False)
        return -fastvae.elbo(x, q, dec, likelihood="bernoulli", prior=Laplace(p_loc, p_scale, validate_args=False))

    def hand_elbo_laplace_unvalidated():
        q, p = Laplace(mu, lv.exp(), validate_args=False), Laplace(p_loc, p_scale, validate_args=False)
        rec = -F.binary_cross_entropy_with_logits(dec(q.rsample()), x, reduction="none").sum(-1)
        return -(rec - torch.distributions.kl_divergence(q, p).sum(-1)).mean()

    cases["elbo laplace, validate_args=False"] = (elbo_laplace_unvalidated, hand_elbo_laplace_unvalidated, base,
                                                  leaves)

    # a Gumbel-softmax VAE's loss (3 latents of 5 categories, a uniform prior), as
    # public training scripts write it: Gumbel noise, softmax, the categorical KL
    lg = torch.randn(B, 3, 5).to(device).requires_grad_()
    dec_c = torch.nn.Linear(15, D).to(device)

    def elbo_concrete():
        q = fastvae.Concrete(lg, 1.0)
        return -fastvae.elbo(x, q, lambda z: dec_c(z.flatten(-2)), likelihood="bernoulli")

    def hand_elbo_concrete():
        u = torch.rand_like(lg)
        y = F.softmax(lg - torch.log(-torch.log(u + 1e-20) + 1e-20), dim=-1)
        rec = -F.binary_cross_entropy_with_logits(dec_c(y.flatten(-2)), x, reduction="none").sum(-1)
        log_q = F.log_softmax(lg, dim=-1)
        return -(rec - (log_q.exp() * (log_q + math.log(5))).sum((-2, -1))).mean()

    def base_concrete():
        return dec_c(lg.flatten(-2) + 0.0).sum()

    cases["elbo concrete (gumbel-softmax)"] = (elbo_concrete, hand_elbo_concrete, base_concrete, (lg,))

    # one group of a hierarchical VAE, called 20-60 times a step: fastvae's fused
    # draw and KL against VDVAE's two functions, the KL summed over (C, H, W) as
    # VDVAE's decoder does; z meets a fixed weight in place of the next block
    qm, pm = (torch.randn(GROUP).to(device).requires_grad_() for _ in range(2))
    qs, ps = ((0.3 * torch.randn(GROUP)).to(device).requires_grad_() for _ in range(2))
    w = torch.randn(GROUP).to(device)

    def group():
        z, kl = fastvae.sample_normal_kl(qm, qs, pm, ps, param="logstd", reduce=True)
        return (z * w).sum() + kl.sum()

    def hand_group():
        z = draw_gaussian_diag_samples(qm, qs)
        kl = gaussian_analytical_kl(qm, pm, qs, ps).sum(dim=(1, 2, 3))
        return (z * w).sum() + kl.sum()

    def base_group():
        return (qm * w).sum() + (qs + pm + ps).sum()

    cases["sample_normal_kl, one group"] = (group, hand_group, base_group, (qm, qs, pm, ps))

    def autocast(loss):  # mixed precision, as most GPU training runs: bfloat16 matmuls
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return loss()
        return run

    cases["elbo bernoulli, autocast"] = (autocast(cases["elbo bernoulli"][0]), autocast(hand_elbo), autocast(base),
                                         leaves)
    return cases


def _direct() -> tuple[int, int]:
    """(launches that launch directly, launches called) of the plans kept:
    the objectives', and every op's (PLANS: its eager calls'; OP_PLANS: its
    own calls', the nodes of a compiled graph)."""
    launches = [launch for plan in _plan.PLANS.values() for launch in _plan.launches(plan)]
    launches += [launch for plans in (*_registry.plan_stores("PLANS"), *_registry.plan_stores())
                 for plan in plans.values() if plan is not None for launch in plan.launches()]
    called = [launch for launch in launches if launch.direct is not None]
    return sum(bool(launch.direct) for launch in called), len(called)


def _profile(run, n: int) -> str:
    profiler = cProfile.Profile()
    with fastvae.use_backend(run.backend):
        profiler.enable()
        for _ in range(n):
            run()
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def measure(rounds: int, n: int, device: torch.device | None = None, profile: bool = False,
            compiled: bool = False, only: str | None = None) -> list[dict]:
    """One record per case: the loss's own host time (us) on the CUDA code
    path, the CPU path (CPU only) and written by hand, their ratios, the
    launches of a call (CPU: through Triton's run and direct) and how many of
    the plans' launches launch directly. ``only``, a regular expression,
    keeps the cases whose name it matches (re.search)."""
    device = torch.device("cpu") if device is None else device
    torch.set_num_threads(1)
    fastvae.set_value_checks("never")  # on CUDA they run on the first call of each kind only
    cuda = device.type == "cuda"
    if not cuda:
        _stub_launches()
    cases = _setup(device)
    if only is not None:
        cases = {name: case for name, case in cases.items() if re.search(only, name)}
        if not cases:
            raise SystemExit(f"--cases {only!r} matches none of: {', '.join(_setup(device))}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(loss, backend, leaves):
        def run():
            torch.autograd.grad(loss(), leaves)
        run.backend = backend  # set around each round of calls (a compiled call guards on the backend)
        return run

    records = []
    for name, (fv, hand, baseline, leaves) in cases.items():
        steps = {"cuda_path": step(fv, "triton", leaves), "hand": step(hand, None, leaves),
                 "base": step(baseline, None, leaves)}
        if not cuda:
            steps["cpu_path"] = step(fv, "cpp", leaves)
        if compiled and not ("dreg" in name and not fastvae.objectives.DREG_COMPILES):
            torch._dynamo.reset()  # (DReG compiles from torch 2.13 on: before, its compiled row is left out)
            steps["compiled"] = step(torch.compile(fv, fullgraph=True), "triton", leaves)
            steps["hand_compiled"] = step(torch.compile(hand, fullgraph=True), None, leaves)
            steps["base_compiled"] = step(torch.compile(baseline, fullgraph=True), None, leaves)
        _plan.clear()
        for plans in (*_registry.plan_stores("PLANS"), *_registry.plan_stores()):
            plans.clear()
        for s in steps.values():
            with fastvae.use_backend(s.backend):
                for _ in range(30):
                    s()
        sync()
        _COUNTS.update(run=0, direct=0)
        with fastvae.use_backend("triton"):
            steps["cuda_path"]()
        counts = dict(_COUNTS)
        times = {k: [] for k in steps}
        for _ in range(rounds):  # interleaved, so drift hits all alike
            for k, s in steps.items():
                sync()
                with fastvae.use_backend(s.backend):
                    t = time.perf_counter()
                    for _ in range(n):
                        s()
                    times[k].append((time.perf_counter() - t) / n * 1e6)  # enqueued: no sync before the clock stops
        sync()
        # each loss's own time: less the baseline step, compiled for the compiled losses (torch.compile's
        # per-call cost, its guards and runtime wrappers, is paid once per compiled region: a step that
        # compiles its model and loss together pays it with or without the loss)
        med = {k: statistics.median(v) - statistics.median(times["base_compiled" if k.endswith("compiled") else "base"])
               for k, v in times.items()}
        direct, called = _direct()
        record = {"case": name, "cuda_path_us": round(med["cuda_path"], 1), "hand_us": round(med["hand"], 1),
                  "cuda_path_vs_hand": round(med["cuda_path"] / med["hand"], 2),
                  "direct_launches": f"{direct}/{called}"}
        if not cuda:
            record.update(cpu_path_us=round(med["cpu_path"], 1),
                          cpu_path_vs_hand=round(med["cpu_path"] / med["hand"], 2),
                          triton_launches=counts["run"] + counts["direct"], launches_through_run=counts["run"])
        if "compiled" in steps:
            record.update(compiled_us=round(med["compiled"], 1), hand_compiled_us=round(med["hand_compiled"], 1),
                          compile_floor_us=round(statistics.median(times["base_compiled"])
                                                 - statistics.median(times["base"]), 1),
                          compiled_vs_cuda_path=round(med["compiled"] / med["cuda_path"], 2),
                          compiled_vs_hand_compiled=round(med["compiled"] / med["hand_compiled"], 2))
        if profile and name == "elbo bernoulli":
            record["profile"] = _profile(steps["cuda_path"], 200)
            if compiled:
                record["profile_compiled"] = _profile(steps["compiled"], 200)
        records.append(record)
        common.log(f"{name}: { {k: v for k, v in record.items() if k != 'profile'} }")
    return records


def table(records: list[dict]) -> str:
    cpu = "cpu_path_us" in records[0]
    head = "| call (forward + backward) | fastvae, CUDA code path (us) |"
    head += " fastvae, CPU path (us) |" if cpu else ""
    head += " hand-written (us) | CUDA path / hand |"
    head += " CPU path / hand | Triton launches |" if cpu else ""
    head += " direct launches |"
    if "compiled_us" in records[0]:
        head += " compiled fastvae (us) | compiled hand-written (us) | compiled / eager CUDA path |"
        head += " compiled fastvae / compiled hand | torch.compile's floor (us) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        row = f"| {r['case']} | {r['cuda_path_us']} |"
        row += f" {r['cpu_path_us']} |" if cpu else ""
        row += f" {r['hand_us']} | {r['cuda_path_vs_hand']} |"
        row += f" {r['cpu_path_vs_hand']} | {r['triton_launches']} |" if cpu else ""
        row += f" {r['direct_launches']} |"
        if "compiled_us" in r:
            row += (f" {r['compiled_us']} | {r['hand_compiled_us']} | {r['compiled_vs_cuda_path']} |"
                    f" {r['compiled_vs_hand_compiled']} | {r['compile_floor_us']} |")
        elif "compiled_us" in records[0]:
            row += " not compiled on this torch |" + " - |" * 4
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds of 20 calls: a smoke run, not figures")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: the CUDA code path with stubbed launches (no GPU needed); cuda: real launches")
    p.add_argument("--profile", action="store_true", help="cProfile of the Bernoulli elbo's CUDA-path calls")
    p.add_argument("--compiled", action="store_true",
                   help="also time fastvae's loss and the hand-written one under torch.compile(fullgraph=True)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; 3 with --quick)")
    p.add_argument("--calls", type=int, default=None, help="calls per round (default 200; 20 with --quick)")
    p.add_argument("--cases", default=None, metavar="REGEX",
                   help="only the cases whose name matches (re.search), e.g. '^elbo.bernoulli$|laplace'")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("the CPU measure needs TRITON_INTERPRET=1 before Triton is imported: run it alone")
        os.environ["TRITON_INTERPRET"] = "1"
    rounds, n = (3, 20) if args.quick else (15, 200)
    rounds, n = args.rounds or rounds, args.calls or n
    records = measure(rounds, n, device, args.profile, args.compiled, args.cases)
    where = ("tiny CPU tensors, 1 thread; the CUDA code path with stubbed Triton launches" if device.type == "cpu"
             else "tiny CUDA tensors, 1 thread; calls enqueued without a sync")
    payload = {"op": "host_cost", **common.metadata(device),
               "title": f"Host time per forward + backward call, the loss's own (a baseline step subtracted), {where}",
               "records": records, "table_markdown": table(records)}
    path = common.write_json(common.result_path("host_cost", device, args.quick, args.out), payload)
    common.log(f"wrote {path}")
    print(payload["table_markdown"])
    for r in records:
        if "profile" in r:
            print(f"\ncProfile, {r['case']}, the CUDA code path, 200 calls:\n{r['profile']}")
        if "profile_compiled" in r:
            print(f"\ncProfile, {r['case']}, compiled, the CUDA code path, 200 calls:\n{r['profile_compiled']}")
    return payload


if __name__ == "__main__":
    main()
