"""Host time per training call of the objectives, measured without a GPU (issue 33).

  python -m benchmarks.bench_host_cost [--quick] [--out FILE]

The method of ../shared/tools/host-cost/host_cost.py: the triton backend runs on
tiny CPU tensors under TRITON_INTERPRET=1 with every Triton launch replaced by a
no-op, so what is timed is what the host does around the kernels on a GPU
(fastvae's Python, the dispatcher, autograd, the torch ops the path issues).
Beside it, the CPU path (the cpp backend: the C++ operators of
csrc/torch_ops.cpp, kernels included, at these tiny sizes nearly all host time)
and the same loss written by hand in torch, on the same tensors, rounds
interleaved, one thread. Each subtracts a baseline step (the decoder and
autograd.grad alone), so the figures are the loss's own host time.
benchmarks/README.md says how to read them.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastvae  # noqa: E402

from . import common  # noqa: E402

B, D, L, K = 4, 8, 2, 5
LOG2PI = 1.8378770664093453


def _setup():
    """(cases {name: (fastvae loss, hand-written loss, baseline, leaves)}, launch counter). The
    "halves" case takes mu and logvar as encoders return them, the strided halves
    of one output (h.chunk(2, -1), inside the loss), with a baseline of its own;
    "mean alone" is a Gaussian decoder that returns its mean (unit variance);
    "autocast" runs the three steps under torch.autocast (bfloat16)."""
    from triton.runtime import interpreter

    launches = [0]

    def stub(self, *args, **kwargs):
        launches[0] += 1

    interpreter.InterpretedFunction.run = stub
    torch.manual_seed(0)
    x = (torch.rand(B, D) > 0.5).float()
    W, W2 = torch.randn(L, D) * 0.3, torch.randn(L, 2 * D) * 0.3
    mu, lv = torch.randn(B, L, requires_grad=True), torch.randn(B, L, requires_grad=True)
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
        eps = torch.randn(K, *mu.shape)
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
    def autocast(loss):  # mixed precision, as most GPU training runs: bfloat16 matmuls
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return loss()
        return run

    cases["elbo bernoulli, autocast"] = (autocast(cases["elbo bernoulli"][0]), autocast(hand_elbo), autocast(base),
                                         leaves)
    return cases, launches


def measure(rounds: int, n: int) -> list[dict]:
    torch.set_num_threads(1)
    fastvae.set_value_checks("never")  # on CUDA they run on the first call of each kind only
    cases, launches = _setup()

    def step(loss, backend, leaves):
        def run():
            with fastvae.use_backend(backend):
                torch.autograd.grad(loss(), leaves)
        return run

    records = []
    for name, (fv, hand, baseline, leaves) in cases.items():
        steps = {"cuda_path": step(fv, "triton", leaves), "cpu_path": step(fv, "cpp", leaves),
                 "hand": step(hand, None, leaves), "base": step(baseline, None, leaves)}
        for s in steps.values():
            for _ in range(30):
                s()
        launches[0] = 0
        steps["cuda_path"]()
        n_launch = launches[0]
        times = {k: [] for k in steps}
        for _ in range(rounds):  # interleaved, so drift hits all alike
            for k, s in steps.items():
                t = time.perf_counter()
                for _ in range(n):
                    s()
                times[k].append((time.perf_counter() - t) / n * 1e6)
        med = {k: statistics.median(v) - statistics.median(times["base"]) for k, v in times.items()}
        records.append({"case": name, "cuda_path_us": round(med["cuda_path"], 1),
                        "cpu_path_us": round(med["cpu_path"], 1), "hand_us": round(med["hand"], 1),
                        "triton_launches": n_launch,
                        "cuda_path_vs_hand": round(med["cuda_path"] / med["hand"], 2),
                        "cpu_path_vs_hand": round(med["cpu_path"] / med["hand"], 2)})
        common.log(f"{name}: {records[-1]}")
    return records


def table(records: list[dict]) -> str:
    lines = ["| call (forward + backward) | fastvae, CUDA code path (us) | fastvae, CPU path (us) | hand-written (us) "
             "| CUDA path / hand | CPU path / hand | Triton launches |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['case']} | {r['cuda_path_us']} | {r['cpu_path_us']} | {r['hand_us']} | "
                     f"{r['cuda_path_vs_hand']} | {r['cpu_path_vs_hand']} | {r['triton_launches']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds of 20 calls: a smoke run, not figures")
    p.add_argument("--device", default="cpu", help="ignored: the measure runs on CPU tensors by design")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    records = measure(3, 20) if args.quick else measure(15, 200)
    payload = {"op": "host_cost", **common.metadata(torch.device("cpu")),
               "title": ("Host time per forward + backward call, the loss's own (a baseline step subtracted), "
                         "tiny CPU tensors, 1 thread; the CUDA code path with stubbed Triton launches"),
               "records": records, "table_markdown": table(records)}
    path = common.write_json(common.result_path("host_cost", torch.device("cpu"), args.quick, args.out), payload)
    common.log(f"wrote {path}")
    print(payload["table_markdown"])
    return payload


if __name__ == "__main__":
    main()
