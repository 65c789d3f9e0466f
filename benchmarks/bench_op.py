"""The benchmark of an op in a folder of its own, from its description's
benchmark row (``BENCH`` in fastvae/ops/<op>/__init__.py; fastvae/_spec.py):
the op against the same formula in eager torch and torch.compile of it, at
each of the row's sizes, forward, backward and forward+backward.

Implementations, modes, bandwidth and memory as in every op benchmark
(harness.py; benchmarks/README.md says what the columns mean).

Reproduce: python -m benchmarks.bench_op <op> [--quick]
"""
from __future__ import annotations

import math

import torch

import fastvae
from fastvae import _registry

from . import harness


def label(size: dict, keys: tuple[str, ...] | None = None) -> str:
    """A case's label: its size's values of ``keys`` (the row's label_keys), or of all of them."""
    return ",".join(f"{k}={size[k]}" for k in (size if keys is None else keys))


def _repeats(size: dict) -> int:
    return 200 if math.prod(size.values()) < 10_000 else 20


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("op", choices=sorted(_registry.FOLDERS), help="the op (its folder under fastvae/ops/)")
    args = harness.parse_args(p, argv)
    bench = _registry.FOLDERS[args.op].BENCH
    device = torch.device(args.device)
    sizes = bench.quick if args.quick else bench.sizes
    repeats = bench.repeats or _repeats
    cases = [harness.Case(label(size, bench.label_keys), dict(size),
                          lambda device, size=size: bench.inputs(size, device), bench.min_bytes(size),
                          repeats=repeats(size))
             for size in sizes]
    impls = harness.baseline_impls(bench.eager, getattr(fastvae, bench.fastvae), args.op, device,
                                   args.fastvae_backends)
    return harness.run(__spec__.name, args.op, bench.title.format(**sizes[0]), cases, impls, args)


if __name__ == "__main__":
    main()
