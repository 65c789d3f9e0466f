"""Per-call overhead: what a call costs when the work itself is tiny.

At the sizes of many real models (a digits-size VAE: batch 100, 8 latents,
64 pixels) a fused op's kernel takes a few microseconds, so the fixed cost of
each call decides whether fastvae beats the hand-written loss. This measures,
interleaved round-robin in one run, medians in microseconds per call:

  floor      a plain torch call (x * 2); an empty op registered the way fastvae
             registers its ops (torch.library.define + impl for CPU + fake, with a
             torch.autograd.Function around it); the same empty op as
             torch.library.custom_op + register_autograd, for comparison;
  ops        each public op at a tiny size through fastvae, against the same
             formula in eager torch, forward under no_grad ("forward") and
             forward+backward of the sum ("fwd+bwd");
  steps      one training step (forward, backward, Adam) of the main job's
             digits VAE with fastvae.elbo / fastvae.iwae(k=16) against the
             hand-written losses of fastvae.demo ("step"), and the fastvae
             loss under torch.compile(fullgraph=True) ("fastvae+compile",
             whose "compiled_over_fastvae" is its time over the eager fastvae
             step's: the compiled graph calls the same C++ operators, so it
             should be no slower), and the hand-written loss compiled the same
             way ("eager+compile"), against which the compiled fastvae step's
             "compiled_over_compiled_eager" is taken (the target: at least as
             fast); the compiled rows are left out with --quick, as compiling
             takes most of a minute.

Reproduce: python -m benchmarks.bench_overhead [--quick] [--steps] [--out FILE]
(CPU; ops on one thread, as a small call runs on the calling thread; steps
on two, the cores of this machine). Results go to
benchmarks/results/overhead-cpu.json. Speed is never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastvae

from . import common

_LIB = torch.library.Library("fastvae_bench", "DEF")  # noqa: TOR901
_LIB.define("empty(Tensor x) -> Tensor")
_LIB.impl("empty", lambda x: torch.empty_like(x), "CPU")
torch.library.register_fake("fastvae_bench::empty", lambda x: torch.empty_like(x), lib=_LIB)
_empty = torch.ops.fastvae_bench.empty.default


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _empty(x)

    @staticmethod
    def backward(ctx, grad):
        return _empty(grad)


@torch.library.custom_op("fastvae_bench::empty_custom", mutates_args=(), device_types=("cpu",))
def _empty_custom(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_empty_custom.register_fake(lambda x: torch.empty_like(x))
_empty_custom.register_autograd(lambda ctx, grad: torch.empty_like(grad),
                                setup_context=lambda ctx, inputs, output: None)


def cases():
    """(name, eager fn, fastvae fn, inputs) at the digits size: B=100, L=8, D=64, K=16 where sampled."""
    g = torch.Generator().manual_seed(0)
    B, L, D, K = 100, 8, 64, 16
    mu, lv = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    x = (torch.rand(B, D, generator=g) > 0.5).float()
    logits, z, lw = torch.randn(B, D, generator=g), torch.randn(K, B, L, generator=g), torch.randn(K, B, generator=g)

    def eager_sample(mu, lv):
        return mu + torch.exp(0.5 * lv) * torch.randn_like(mu), 0.5 * (lv.exp() + mu * mu - 1 - lv).sum(-1)

    def eager_llr(z, mu, lv):
        eps = (z - mu) * torch.exp(-0.5 * lv)
        return 0.5 * (eps * eps - z * z + lv).sum(-1)

    return [
        ("floor: x * 2", lambda t: t * 2, None, (mu,)),
        ("floor: empty op (define + Function)", None, lambda t: _Empty.apply(t), (mu,)),
        ("floor: empty op (custom_op + register_autograd)", None, lambda t: _empty_custom(t), (mu,)),
        ("sample_normal (100, 8)", eager_sample, fastvae.sample_normal, (mu, lv)),
        ("kl_normal (100, 8)", lambda m, v: 0.5 * (v.exp() + m * m - 1 - v).sum(-1), fastvae.kl_normal, (mu, lv)),
        ("bernoulli_log_prob (100, 64)", lambda a, lg: -F.binary_cross_entropy_with_logits(
            lg, a, reduction="none").sum(-1), fastvae.bernoulli_log_prob, (x, logits)),
        ("gaussian_log_prob (100, 64)", lambda a, m: -0.5 * ((a - m) ** 2 + 1.8378770664093453).sum(-1),
         fastvae.gaussian_log_prob, (x, logits)),
        ("latent_log_ratio (16, 100, 8)", eager_llr, fastvae.latent_log_ratio, (z, mu, lv)),
        ("logmeanexp (16, 100)", lambda w: torch.logsumexp(w, 0) - 2.772588722239781, fastvae.logmeanexp, (lw,)),
    ]


def step_cases(compile_loss: bool = True):
    """(name, hand-written step, fastvae step, compiled fastvae step or None,
    compiled hand-written step or None):
    one training step (forward, backward, Adam at lr 0) of the main job's
    digits VAE (fastvae.demo: 64-256-8, batch 100, Bernoulli), whose losses
    are the ones the demo times; the compiled steps compile the loss
    (fullgraph, static shapes) and step as the eager ones do."""
    from fastvae import demo

    torch.manual_seed(0)
    model = demo.VAE(latent=8)
    x = (torch.rand(100, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    opt = torch.optim.Adam(model.parameters(), lr=0.0)

    def step(loss_fn):
        def run():
            loss = loss_fn(model, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    def compiled(loss_fn):
        return step(torch.compile(loss_fn, fullgraph=True, dynamic=False)) if compile_loss else None

    def iwae(m, a):
        return demo.fastvae_iwae_loss(m, a, 16)

    def hand_iwae(m, a):
        return demo.hand_written_iwae_loss(m, a, 16)

    return [
        ("step: digits ELBO (B=100, D=64, L=8)", step(demo.hand_written_elbo_loss), step(demo.fastvae_elbo_loss),
         compiled(demo.fastvae_elbo_loss), compiled(demo.hand_written_elbo_loss)),
        ("step: digits IWAE k=16", step(hand_iwae), step(iwae), compiled(iwae), compiled(hand_iwae)),
    ]


def _scalar(out):
    first = out[0] if isinstance(out, tuple) else out
    return first.sum() + (out[1].sum() if isinstance(out, tuple) else 0)


def _modes(fn, inputs):
    grads = [t.clone().requires_grad_() for t in inputs]

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        _scalar(fn(*grads)).backward()

    return {"forward": forward, "fwd+bwd": fwd_bwd}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repeats: a smoke run, not figures")
    p.add_argument("--steps", action="store_true", help="time the training steps only (eager and compiled)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/overhead-cpu.json)")
    args = p.parse_args(argv)
    load_start = common.loadavg()
    user_threads = torch.get_num_threads()
    repeats, calls = (3, 50) if args.quick else (15, 300)
    timed = []  # (case, impl, mode, fn)
    for name, eager, fused, inputs in [] if args.steps else cases():
        for impl, fn in (("eager", eager), ("fastvae", fused)):
            if fn is not None:
                for mode, run in _modes(fn, inputs).items():
                    timed.append((name, impl, mode, run))
    timed = [(*entry, 1) for entry in timed]  # a small call runs on the calling thread
    step_threads = min(2, user_threads)  # whole steps: the threads a user has (2 here)
    for name, eager, fused, compiled, compiled_eager in step_cases(compile_loss=not args.quick):
        timed += [(name, "eager", "step", eager, step_threads), (name, "fastvae", "step", fused, step_threads)]
        if compiled is not None:
            timed += [(name, "fastvae+compile", "step", compiled, step_threads),
                      (name, "eager+compile", "step", compiled_eager, step_threads)]
    samples = {key[:3]: [] for key in timed}
    for entry in timed:
        torch.set_num_threads(entry[4])
        for _ in range(20):
            entry[3]()
    for _ in range(repeats):  # round-robin, so that bursts of other load hit every row alike
        for name, impl, mode, run, threads in timed:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            samples[name, impl, mode].append((time.perf_counter() - start) / calls * 1e6)
    torch.set_num_threads(user_threads)
    rows = [{"case": n, "impl": i, "mode": m, "median_us": statistics.median(v)} for (n, i, m), v in samples.items()]
    by_key = {(r["case"], r["impl"], r["mode"]): r["median_us"] for r in rows}
    for r in rows:
        if r["impl"] == "fastvae" and (r["case"], "eager", r["mode"]) in by_key:
            r["fastvae_over_eager"] = r["median_us"] / by_key[r["case"], "eager", r["mode"]]
        if r["impl"] == "fastvae+compile":
            r["compiled_over_fastvae"] = r["median_us"] / by_key[r["case"], "fastvae", r["mode"]]
            r["compiled_over_compiled_eager"] = r["median_us"] / by_key[r["case"], "eager+compile", r["mode"]]
    lines = ["| case | impl | mode | µs per call | fastvae / eager | compiled / eager fastvae "
             "| compiled / compiled eager |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['fastvae_over_eager']:.2f}x" if "fastvae_over_eager" in r else ""
        compiled = f"{r['compiled_over_fastvae']:.2f}x" if "compiled_over_fastvae" in r else ""
        both = f"{r['compiled_over_compiled_eager']:.2f}x" if "compiled_over_compiled_eager" in r else ""
        lines.append(f"| {r['case']} | {r['impl']} | {r['mode']} | {r['median_us']:.1f} | {ratio} | {compiled} "
                     f"| {both} |")
    table = "\n".join(lines)
    print(table)
    payload = {"op": "overhead", "device": common.device_name(torch.device("cpu")),
               "vector_isa": common.cpu_vector_isa(), "fastvae_noise_path": common.fastvae_noise_path(),
               "git_commit": common.git_commit(), "versions": common.versions(), "results": rows,
               "table_markdown": table, "loadavg_at_start": load_start, "loadavg_at_end": common.loadavg(),
               "command": "python -m benchmarks.bench_overhead" + (" --steps" if args.steps else "")}
    out = Path(args.out) if args.out else common.REPO_ROOT / "benchmarks" / "results" / "overhead-cpu.json"
    if not args.quick or args.out:
        out.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
