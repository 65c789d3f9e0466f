"""The memory the launch plans keep after their calls: the bytes behind
every tensor a cached plan holds (its output templates, partial sums and
counters), for the calls of a training or evaluation step on the triton
backend (CPU tensors under the interpreter stand in for CUDA ones: the plans
are the same objects).

  TRITON_INTERPRET=1 python -m benchmarks.plan_memory [--k 1000] [--eval-k 5000] [--batch 100]

The calls: an IWAE step at k samples (Gaussian posterior of 32 latents,
Bernoulli likelihood, a linear decoder to 784 logits) and the same bound
under torch.no_grad (an evaluation, whose likelihood takes its op's own
plan); then, the plans cleared, ``fastvae.log_likelihood`` at --eval-k
samples (streamed in chunks from its memory budget). Prints the bytes each
plan class holds after each."""
from __future__ import annotations

import argparse
import gc

import torch

import fastvae
from fastvae import _launch


def _held(obj, seen: set, depth: int = 0) -> int:
    """Bytes of the distinct storages reachable from a plan's attributes."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if depth > 4 or obj is None:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(_held(v, seen, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return sum(_held(v, seen, depth + 1) for v in obj.values())
    if type(obj).__module__.startswith("fastvae") and not isinstance(obj, _launch.Launch):
        names = [n for k in type(obj).__mro__ for n in getattr(k, "__slots__", ())]
        return sum(_held(getattr(obj, n, None), seen, depth + 1) for n in [*names, *getattr(obj, "__dict__", {})])
    return 0


def held_by_plans() -> dict[str, int]:
    """Bytes held per plan class, over every PlanCache (a storage counted once)."""
    seen: set = set()
    held: dict[str, int] = {}
    for cache in [o for o in gc.get_objects() if isinstance(o, _launch.PlanCache)]:
        for plan in cache.values():
            name = type(plan).__name__
            held[name] = held.get(name, 0) + _held(plan, seen)
    return held


def _report(title: str, output_bytes: int) -> dict[str, int]:
    held = held_by_plans()
    print(f"{title} (one (k, batch, 784) float32 tensor: {output_bytes / 2**20:.1f} MiB):")
    for name, n in sorted(held.items()):
        print(f"  {name}: {n / 2**20:.3f} MiB")
    print(f"  every plan: {sum(held.values()) / 2**20:.3f} MiB")
    return held


def _clear_plans() -> None:
    for cache in [o for o in gc.get_objects() if isinstance(o, _launch.PlanCache)]:
        cache.clear()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=1000, help="the IWAE step's and evaluation's samples")
    p.add_argument("--eval-k", type=int, default=5000, help="log_likelihood's samples")
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args(argv)
    fastvae.set_backend("triton")
    torch.manual_seed(0)
    B, L, D, K = args.batch, 32, 784, args.k
    x = (torch.rand(B, D) < 0.5).float()
    mu, logvar = torch.randn(B, L, requires_grad=True), torch.randn(B, L, requires_grad=True)
    W = (torch.randn(L, D) * 0.1).requires_grad_()
    W_enc = torch.randn(D, 2 * L) * 0.01
    _clear_plans()
    bound = fastvae.iwae(x, mu, logvar, lambda z: z @ W, k=K, likelihood="bernoulli")
    torch.autograd.grad(bound, (mu, logvar, W))
    with torch.no_grad():
        fastvae.iwae(x, mu, logvar, lambda z: z @ W, k=K, likelihood="bernoulli")
    out = {"iwae": _report(f"after an IWAE step and an evaluation at k = {K}, batch {B}, 784 logits",
                           K * B * D * 4)}
    _clear_plans()
    with torch.no_grad():
        fastvae.log_likelihood(x, lambda x: (x @ W_enc).chunk(2, -1), lambda z: z @ W, k=args.eval_k,
                               likelihood="bernoulli")
    out["log_likelihood"] = _report(f"after log_likelihood at k = {args.eval_k}, batch {B}, 784 logits",
                                    args.eval_k * B * D * 4)
    return out


if __name__ == "__main__":
    main()
