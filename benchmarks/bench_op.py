"""The benchmark of an op in a folder of its own, from its description's
benchmark row (``BENCH`` in fastvae/ops/<op>/__init__.py; fastvae/_spec.py):
the op against the same formula in eager torch and torch.compile of it, at
each of the row's sizes, forward, backward and forward+backward.

Implementations, modes, bandwidth and memory as in every op benchmark
(harness.py; benchmarks/README.md says what the columns mean).

Reproduce: python -m benchmarks.bench_op <op> [--quick] [--set KEY=VALUE ...]
(--set replaces an entry of every size: B=1024, family=laplace, ...)
"""
from __future__ import annotations

import functools
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


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return text


def _sizes(rows, assignments: list[str]) -> list[dict]:
    """The row's sizes with each KEY=VALUE of --set replacing that entry (an
    integer or True / False where VALUE is one), the sizes that become equal
    kept once."""
    changes = dict(a.split("=", 1) for a in assignments)
    unknown = sorted(set(changes) - {k for size in rows for k in size})
    if unknown or any("=" not in a for a in assignments):
        raise SystemExit(f"--set takes KEY=VALUE with the keys of the sizes ({', '.join(rows[0])}): {assignments}")
    sizes = []
    for size in rows:
        size = {k: _value(changes[k]) if k in changes else v for k, v in size.items()}
        if size not in sizes:
            sizes.append(size)
    return sizes


def _repeats(bench, size: dict) -> int:
    if callable(bench.repeats):
        return bench.repeats(size)
    if bench.repeats is not None:
        return bench.repeats
    return 200 if math.prod(v for v in size.values() if type(v) is int) < 10_000 else 20


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("op", choices=sorted(_registry.FOLDERS),
                   help="the op, or family of ops (its folder under fastvae/ops/)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="replace an entry of every size, e.g. B=1024 or family=laplace")
    args = harness.parse_args(p, argv)
    bench = _registry.FOLDERS[args.op].BENCH
    device = torch.device(args.device)
    sizes = _sizes(bench.quick if args.quick else bench.sizes, args.set)
    cases = [harness.Case(label(size, bench.label_keys), dict(size),
                          lambda device, size=size: bench.inputs(size, device), bench.min_bytes(size),
                          repeats=_repeats(bench, size))
             for size in sizes]
    names = (bench.fastvae,) if isinstance(bench.fastvae, str) else bench.fastvae
    fn = getattr(fastvae, names[0])
    if bench.call is not None:
        fn = functools.partial(bench.call, *(getattr(fastvae, name) for name in names))
    # the backend that serves the row's (first) op (a family's folder name is no op of backend_info)
    impls = harness.baseline_impls(bench.eager, fn, names[0], device, args.fastvae_backends)
    return harness.run(__spec__.name, args.op, bench.title.format(**sizes[0]), cases, impls, args)


if __name__ == "__main__":
    main()
