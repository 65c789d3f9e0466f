"""Do bfloat16 and float16 compile alike? Every sm_90 variant tests/test_aot.py
compiles, in bfloat16 and in float16, compiled (no GPU needed) and compared
pair by pair: whether each compiles, its registers and its spill bytes.

The GPU compile tests compile bfloat16 only: a float16 launch is its bfloat16
twin with the other 16-bit element type (tests/test_aot.py checks that), and
this measurement is what says the two compile to the same verdicts
(docs/architecture.md, The tiers).

Reproduce (from the repository root; minutes of CPU with an empty Triton cache):
  python -m benchmarks.aot_half_pairs --out benchmarks/results/aot-half-pairs-sm90.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fastvae.kernels import aot
from tests.test_aot import SHAPES

from . import common


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    start = time.perf_counter()
    pairs: dict[str, dict] = {}
    for dtype in ("bfloat16", "float16"):
        cache: dict = {}
        for launch in aot.collect(["sm_90"], list(aot._registry.OPS), SHAPES, [dtype]):
            info = aot.compile_variant(launch, cache)
            twin = repr(launch.key).replace("bf16", "16-bit").replace("fp16", "16-bit")
            pairs.setdefault(twin, {})[dtype] = {"kernel": launch.kernel, "ok": info["ok"],
                                                 "registers": info["registers"], "spill_bytes": info["spill_bytes"]}
    both = [p for p in pairs.values() if len(p) == 2]
    diff = [p["float16"]["registers"] - p["bfloat16"]["registers"] for p in both
            if p["float16"]["ok"] and p["bfloat16"]["ok"]]
    record = {
        "variants_each": len(pairs), "pairs": len(both), "unpaired": len(pairs) - len(both),
        "compile_verdict_differs": sum(p["float16"]["ok"] != p["bfloat16"]["ok"] for p in both),
        "failed": sum(not p[d]["ok"] for p in both for d in p),
        "spilling": sum(bool(p[d]["spill_bytes"]) for p in both for d in p),
        "spill_bytes_differ": sum(p["float16"]["spill_bytes"] != p["bfloat16"]["spill_bytes"] for p in both),
        "registers_differ": sum(d != 0 for d in diff), "largest_register_difference": max(map(abs, diff), default=0),
        "most_registers": max((p[d]["registers"] or 0) for p in both for d in p),
        "seconds": time.perf_counter() - start,
        "metadata": common.metadata(torch.device("cpu")),
    }
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
