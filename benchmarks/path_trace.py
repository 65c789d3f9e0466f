"""The modules one training call passes through (its "stops").

  python -m benchmarks.path_trace [--backend triton|cpp] [--json]

Follows fastvae.elbo and fastvae.iwae (k=5), forward and backward, on tiny CPU
tensors after a warm-up call (so the triton backend's plan exists), and
records every time control enters a module of fastvae/ or kernels/: a call
into it, or a return to it from a callee. Each entry is a stop; a stop at a
module the call had already left is a return. Fewer stops and returns mean a
path a reader can follow top to bottom. A planned launch (fastvae/_launch.py,
with Triton's launcher behind it) is a call's leaf, as a kernel is: not a stop.

``--backend triton`` (default) runs the CUDA code path as
bench_host_cost.py does on the CPU: TRITON_INTERPRET=1 with every
Triton launch replaced by a no-op. ``--backend cpp`` follows the CPU path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

LEAF = os.path.join("fastvae", "_launch.py")  # the planned launch: a leaf of the call, not a stop


def trace(backend: str) -> dict:
    """{call name: {"stops", "modules" (module -> stops), "returns"}}."""
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
        from triton.runtime import interpreter

        interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
    import torch

    import fastvae

    fastvae.set_value_checks("never")  # as on CUDA after the first call of each kind
    fastvae.set_backend(backend)
    package = os.path.dirname(os.path.realpath(fastvae.__file__))
    roots = (package, os.path.realpath(os.path.join(package, os.pardir, "kernels")),
             os.path.realpath(os.path.join(package, "kernels")))

    def module(frame) -> str | None:
        path = os.path.realpath(frame.f_code.co_filename) if frame is not None else ""
        for root in roots:
            if path.startswith(root + os.sep):
                name = os.path.relpath(path, os.path.dirname(package))
                return None if name == LEAF else name
        return None

    torch.manual_seed(0)
    x = (torch.rand(4, 8) > 0.5).float()
    w = torch.randn(2, 8) * 0.3
    mu = torch.randn(4, 2, requires_grad=True)
    logvar = torch.randn(4, 2, requires_grad=True)
    calls = {
        "elbo": lambda: fastvae.elbo(x, mu, logvar, lambda z: z @ w, likelihood="bernoulli"),
        "iwae k=5": lambda: fastvae.iwae(x, mu, logvar, lambda z: z @ w, k=5, likelihood="bernoulli"),
    }
    out = {}
    for name, call in calls.items():
        call().backward()  # warm-up: plans, caches
        stops: list[str] = []

        def profile(frame, event, arg, stops=stops):
            if event in ("call", "return"):
                m = module(frame if event == "call" else frame.f_back)
                if m is not None and (not stops or stops[-1] != m):
                    stops.append(m)

        sys.setprofile(profile)
        try:
            call().backward()
        finally:
            sys.setprofile(None)
        left, returns = set(), 0
        for previous, m in zip([None, *stops], stops):
            returns += m in left
            if previous is not None:
                left.add(previous)
        modules = {m: stops.count(m) for m in dict.fromkeys(stops)}
        out[name] = {"stops": len(stops), "modules": modules, "returns": returns}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="triton", choices=("triton", "cpp"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = trace(args.backend)
    if args.json:
        print(json.dumps(result))
    else:
        for name, r in result.items():
            print(f"{args.backend} {name}: {r['stops']} stops in {len(r['modules'])} modules, "
                  f"{r['returns']} returns to a module already left")
            print("    " + ", ".join(f"{m} x{n}" for m, n in r["modules"].items()))
    return result


if __name__ == "__main__":
    main()
