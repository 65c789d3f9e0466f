"""What a ``torch.library.triton_op`` node would save a compiled step on CUDA:
the Concrete sampler at a Gumbel-softmax VAE's size, forward + backward.

Under torch.compile, each fastvae op in the graph is a custom op whose CUDA
implementation is Python (the dispatcher's call back into Python, the op's
checks and allocations, Triton's general launcher). A ``triton_op`` whose body
launches the kernel through ``wrap_triton`` lets Inductor launch the same
kernel from its generated code instead. This benchmark registers the
Concrete sampler's two kernels that way (``fastvae_exp::concrete`` and
``fastvae_exp::concrete_backward``, float32, one sample, no KL: the sampler
of a Gumbel-softmax step), checks them against fastvae's own ops on the same
seed, bit for bit, and times five losses back to back, rounds interleaved
(the training-loop figure of the GPU probe):

- ``hand eager`` / ``hand compiled``: the hand-written Gumbel-softmax
  (rand_like, two logs, softmax; a straight-through one-hot when hard);
- ``fastvae`` / ``fastvae compiled``: ``fastvae.sample_concrete``;
- ``triton_op compiled``: the same kernels as graph nodes Inductor launches.

It needs a GPU: ``python -m benchmarks.bench_triton_op [--hard] [--rounds 7]
[--steps 40] [--out FILE]``. The kernels are fastvae's, unchanged; only the
way the compiled graph reaches them differs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

import fastvae
from fastvae._op import SEED_HIGH
from fastvae.ops.sample_family import triton as kernels

SHAPE = (100, 30, 10)  # batch, latents, categories: a Gumbel-softmax VAE's


def _meta(meta: dict, keep_maxnreg: bool) -> dict:
    return meta if keep_maxnreg else {k: v for k, v in meta.items() if k != "maxnreg"}


MAXNREG = {"keep": True}  # set False when Inductor refuses the backward's register cap


_REGISTERED = []


def register() -> None:
    """Registers fastvae_exp::concrete and fastvae_exp::concrete_backward (once a process)."""
    from torch.library import triton_op, wrap_triton

    if _REGISTERED:
        return
    _REGISTERED.append(True)

    @triton_op("fastvae_exp::concrete", mutates_args=())
    def concrete(logits: Tensor, temperature: Tensor, seed: Tensor, hard: bool) -> tuple[Tensor, Tensor]:
        N, L, C = logits.shape
        z = logits.new_empty((1, N, L, C))
        log_q = logits.new_empty((1, N))
        grid, meta = kernels.concrete_forward_launch(1, N, L, C, logits.dtype, "cuda", hard, True, False)
        unused = logits.new_empty((1,))  # the KL's output, which this variant does not write
        wrap_triton(kernels._sample_concrete_fwd_kernel)[grid](
            logits, temperature, seed, z, log_q, logits, unused, 0, N * L * C, L * C, N, N, L, C, 0, **meta)
        return z, log_q

    @triton_op("fastvae_exp::concrete_backward", mutates_args=())
    def concrete_backward(grad_z: Tensor, logits: Tensor, temperature: Tensor, seed: Tensor) -> Tensor:
        N, L, C = logits.shape
        d = torch.empty_like(logits)
        grid, meta = kernels.concrete_backward_launch(N, L, C, logits.dtype, "cuda", True, False, False, False)
        wrap_triton(kernels._sample_concrete_bwd_kernel)[grid](
            grad_z, logits, logits, temperature, seed, d, logits, logits, N, L, N * L, C, 1, 0,
            **_meta(meta, MAXNREG["keep"]))
        return d


class ConcreteTO(torch.autograd.Function):
    """z (N, L, C) of the triton_op nodes; the backward regenerates the noise, as fastvae's CUDA path does."""

    @staticmethod
    def forward(ctx, logits, temperature, seed, hard):
        z, _ = torch.ops.fastvae_exp.concrete(logits, temperature, seed, hard)
        ctx.save_for_backward(logits, temperature, seed)
        return z[0]

    @staticmethod
    def backward(ctx, grad_z):
        logits, temperature, seed = ctx.saved_tensors
        d = torch.ops.fastvae_exp.concrete_backward(grad_z.unsqueeze(0).contiguous(), logits, temperature, seed)
        return d, None, None, None


def check(hard: bool) -> dict:
    """The triton_op nodes, compiled, against fastvae's ops on the same seed: z and dlogits, bit for bit."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*SHAPE, generator=g).cuda()
    lam = torch.ones(SHAPE[:2], device="cuda")
    seed = torch.tensor(12345, dtype=torch.int64, device="cuda")
    gz = torch.randn(1, *SHAPE, generator=g).cuda()
    z_ref, lq_ref, _, _ = torch.ops.fastvae.sample_concrete(logits, lam, seed, hard, 1, None, False)
    d_ref = torch.ops.fastvae.sample_concrete_backward(logits, lam, seed, gz, None, False, None, None, None)
    fwd = torch.compile(lambda a, t, s: torch.ops.fastvae_exp.concrete(a, t, s, hard), fullgraph=True)
    bwd = torch.compile(lambda g_, a, t, s: torch.ops.fastvae_exp.concrete_backward(g_, a, t, s), fullgraph=True)
    z, lq = fwd(logits, lam, seed)
    d = bwd(gz, logits, lam, seed)
    return {"z_equal": bool(torch.equal(z, z_ref)), "log_q_equal": bool(torch.equal(lq, lq_ref)),
            "dlogits_equal": bool(torch.equal(d, d_ref)), "dlogits_max_diff": float((d - d_ref).abs().max())}


def losses(logits: Tensor, w: Tensor, hard: bool) -> dict:
    lam = torch.ones(SHAPE[:2], device="cuda")

    def hand():
        u = torch.rand_like(logits)
        y = F.softmax(logits - torch.log(-torch.log(u + 1e-20) + 1e-20), dim=-1)
        if hard:
            one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
            y = (one_hot - y).detach() + y
        return (y * w).sum()

    def fv():
        z, _ = fastvae.sample_concrete(logits, 1.0, hard=hard)
        return (z * w).sum()

    def to():
        seed = torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device="cuda")
        return (ConcreteTO.apply(logits, lam, seed, hard) * w).sum()

    return {"hand eager": hand, "hand compiled": torch.compile(hand, fullgraph=True), "fastvae": fv,
            "fastvae compiled": torch.compile(fv, fullgraph=True),
            "triton_op compiled": torch.compile(to, fullgraph=True)}


def time_loop(steps: dict, rounds: int, n: int, leaf: Tensor) -> dict:
    """ms per forward + backward step, n back to back before a sync, rounds interleaved."""
    calls = {k: (lambda f=f: torch.autograd.grad(f(), leaf)) for k, f in steps.items()}
    for c in calls.values():
        for _ in range(10):
            c()
    torch.cuda.synchronize()
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, c in calls.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                c()
            torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) / n * 1e3)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


TITLE = ("The Concrete sampler at (100, 30, 10), forward + backward, ms per step (steps back to back, rounds "
         "interleaved): fastvae's kernels as triton_op nodes against fastvae's ops, compiled")


def table(records: list[dict]) -> str:
    """The records' ms per step as a markdown table, one row per sample kind."""
    impls = list(records[0]["ms_per_step"]) if records else []
    lines = ["| sample | " + " | ".join(impls) + " | bits equal |", "|---" * (len(impls) + 2) + "|"]
    for r in records:
        same = r["z_equal"] and r["log_q_equal"] and r["dlogits_equal"]
        cells = [f"{r['ms_per_step'][k]:.3f} ({r['vs_hand_compiled'][k]:.2f}x)" for k in impls]
        lines.append(f"| {'hard' if r['hard'] else 'relaxed'} | " + " | ".join(cells) + f" | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    """Runs the benchmark and returns its payload; on a machine without CUDA
    (or --device cpu, as the suite passes there) says so and returns None."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hard", action="store_true", help="the straight-through (hard) sample too")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--device", default="cuda", help="cuda (anything else: nothing to measure)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 5 steps: a smoke run, not figures")
    p.add_argument("--memory", action="store_true", help="accepted for the suite; no memory figures here")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device != "cuda" or not torch.cuda.is_available():
        print("bench_triton_op: Inductor launches triton_op nodes only on CUDA tensors; nothing to measure here")
        return None
    rounds, steps = (2, 5) if args.quick else (args.rounds, args.steps)
    register()
    records = []
    for hard in (False, True) if args.hard else (False,):
        try:
            rec = {"hard": hard, **check(hard)}
        except Exception as ex:  # noqa: BLE001 (a refused register cap: retry without it, and say so)
            print(f"check with maxnreg failed: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
            MAXNREG["keep"] = False
            torch._dynamo.reset()
            rec = {"hard": hard, **check(hard)}
        rec["backward_maxnreg"] = MAXNREG["keep"]
        print(rec, flush=True)
        logits = torch.randn(*SHAPE, device="cuda", requires_grad=True)
        w = torch.randn(*SHAPE, device="cuda")
        ms = time_loop(losses(logits, w, hard), rounds, steps, logits)
        rec["ms_per_step"] = ms
        rec["vs_hand_compiled"] = {k: round(ms["hand compiled"] / v, 2) for k, v in ms.items()}
        print(json.dumps(rec), flush=True)
        records.append(rec)
    payload = {"op": "triton_op", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "shape": SHAPE, "records": records, "title": TITLE, "table_markdown": table(records)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    return payload


if __name__ == "__main__":
    main()
