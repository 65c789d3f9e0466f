"""GPU model of the training path's ops: model, not measured.

For each op of the training path, direction and shape: the fewest bytes the
op must move (every input read once, every output written once; the noise is
never stored: its benchmark row's min_bytes, read from the op's registry
record), the time that takes at a stated HBM bandwidth (H100 SXM:
3.35 TB/s), and the programs the Triton launchers launch against the 132 SMs
of an H100 (recorded by python -m fastvae.kernels.aot on meta tensors: no GPU
needed, nothing compiled). A kernel at the predicted time would run at the
bandwidth floor; measured figures are in benchmarks/results/gpu-h100/.

    python -m benchmarks.gpu_model [--dtype float32] [--out FILE]

Writes benchmarks/results/gpu-model.json and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastvae import _registry

from . import common

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
SMS = 132
SHAPES = [dict(K=K, B=B, L=32, D=784) for K, B in ((1, 256), (5, 256), (50, 256), (50, 1024))] + [
    dict(K=5000, B=B, L=32, D=784) for B in (1, 64, 256)]


def modelled() -> list[str]:
    """The ops of the training path, which the model tabulates: those whose
    registry record gives its fewest bytes (Op.model_bytes, its benchmark row's
    min_bytes at a K x B x L x D problem), in the registry's order."""
    return [name for name, op in _registry.OPS.items() if op.model_bytes is not None]


def programs(op: str, shape: dict, dtype: str) -> dict[str, int]:
    """Largest grid among each direction's launches, from the AOT tool's record."""
    from fastvae.kernels import aot

    launches = aot.collect(["sm_90"], [op], [shape], [dtype])
    out: dict[str, int] = {}
    for launch in launches:
        direction = "backward" if "backward" in launch.launcher else "forward"
        if launch.launcher == "randn_fill":
            continue
        out[direction] = max(out.get(direction, 0), launch.programs)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for op in modelled():
        for shape in SHAPES:
            grid = programs(op, shape, args.dtype)
            min_bytes = _registry.OPS[op].model_bytes(shape, args.dtype)
            for direction in ("forward", "backward"):
                nbytes = min_bytes[direction]
                rows.append({"op": op, "direction": direction, "shape": shape, "min_bytes": nbytes,
                             "predicted_us": nbytes / HBM_BYTES_PER_S * 1e6, "programs": grid.get(direction),
                             "programs_per_sm": (grid.get(direction) or 0) / SMS})
    lines = [f"GPU model, not measured: {args.dtype}, H100 SXM at {HBM_BYTES_PER_S / 1e12:.2f} TB/s, {SMS} SMs",
             "", "| op | direction | K | B | L | D | min MB | predicted µs | programs | per SM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        lines.append(f"| {r['op']} | {r['direction']} | {s['K']} | {s['B']} | {s['L']} | {s['D']} | "
                     f"{r['min_bytes'] / 1e6:.2f} | {r['predicted_us']:.2f} | {r['programs']} | "
                     f"{r['programs_per_sm']:.1f} |")
    table = "\n".join(lines)
    print(table)
    payload = {"op": "gpu_model", "label": "model, not measured", "dtype": args.dtype,
               "hbm_bytes_per_s": HBM_BYTES_PER_S, "sms": SMS, "rows": rows, "table_markdown": table,
               "command": "python -m benchmarks.gpu_model"}
    out = Path(args.out) if args.out else common.REPO_ROOT / "benchmarks" / "results" / "gpu-model.json"
    out.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
