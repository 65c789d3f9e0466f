"""PNG plots of a benchmark suite run (matplotlib, the `bench` extra):

  <stem>-speedup.png    forward+backward speedup (forward for an evaluation-only
                        benchmark, marked) of each fastvae implementation over
                        eager and over torch.compile, per benchmark and case,
                        log scale, with the 1x and 5x target lines;
  <stem>-bandwidth.png  effective bandwidth (fewest bytes / median time) of
                        every implementation, forward+backward, per benchmark
                        and case, against the copy bandwidth measured in the
                        same run (solid) and 70% of it (dashed); fastvae's
                        forward and backward alone are the markers.

Regenerate from a suite JSON without rerunning anything:
  python -m benchmarks.plots benchmarks/results/suite-cpu.json [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import common

IMPL_COLORS = {"eager": "#9e9e9e", "compiled": "#5c6bc0"}
FASTVAE_COLORS = ["#e65100", "#ff9800", "#2e7d32", "#66bb6a"]


def _pyplot():
    """matplotlib is optional (the `bench` extra); imported only when plotting,
    with a backend that needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(op: str, case: str, *more: str | None) -> str:
    return " ".join(str(part) for part in (op, case, *more) if part)


def _finish(fig, ax, labels: list[str], title: str, path: Path) -> Path:
    """Slanted tick labels (the names are long), the legend outside the axes."""
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def speedup_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    many = len({r["impl"] for r in rows}) > 1
    fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(rows) + 4), 5.5))
    width = 0.4
    for shift, key, color, name in ((-width / 2, "speedup_vs_eager", IMPL_COLORS["eager"], "vs eager"),
                                    (width / 2, "speedup_vs_compiled", IMPL_COLORS["compiled"], "vs torch.compile")):
        values = [r[key] or float("nan") for r in rows]
        bars = ax.bar([i + shift for i in range(len(rows))], values, width, color=color, label=name)
        ax.bar_label(bars, [f"{v:.1f}" for v in values], fontsize=6)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.axhline(5.0, color="#c62828", linestyle="--", linewidth=1, label="5x (target vs eager)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("speedup, forward+backward unless marked (log scale)")
    labels = [_label(r["op"], r["case"], r["impl"] if many else None, None if r["mode"] == "fwd+bwd" else r["mode"])
              for r in rows]
    return _finish(fig, ax, labels, title, path)


def bandwidth_plot(payloads: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Only benchmarks with a bytes model (memory-bound ops) appear."""
    plt = _pyplot()
    groups = []  # (label, copy GB/s, {impl: {mode: GB/s}})
    for p in payloads:
        by_case: dict[str, dict[str, dict[str, float]]] = {}
        for r in p.get("results", []):
            if r.get("gbs") is not None:
                by_case.setdefault(r.get("case"), {}).setdefault(r["impl"], {})[r["mode"]] = r["gbs"]
        for case, impls in by_case.items():
            groups.append((_label(p.get("op"), case), (p.get("copy_bandwidth") or {}).get("gbs"), impls))
    impl_names = list(dict.fromkeys(name for _, _, impls in groups for name in impls))
    fastvae_names = [n for n in impl_names if n not in IMPL_COLORS]
    colors = {**IMPL_COLORS, **dict(zip(fastvae_names, FASTVAE_COLORS))}
    width = 0.8 / max(1, len(impl_names))

    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(groups) + 4), 5.5))
    for g, (_, copy, impls) in enumerate(groups):
        for j, name in enumerate(impl_names):
            if name not in impls:
                continue
            xpos = g - 0.4 + (j + 0.5) * width
            ax.bar(xpos, impls[name].get("fwd+bwd", float("nan")), width, color=colors.get(name),
                   label=name if g == 0 else None)
            if name in fastvae_names:
                for mode, marker in (("forward", "^"), ("backward", "v")):
                    if mode in impls[name]:
                        ax.plot(xpos, impls[name][mode], marker, color="black", markersize=4,
                                label=f"{name} {mode}" if g == 0 else None)
        if copy:
            ax.hlines(copy, g - 0.45, g + 0.45, color="black", linewidth=1.5,
                      label="copy bandwidth (same run)" if g == 0 else None)
            ax.hlines(0.7 * copy, g - 0.45, g + 0.45, color="#c62828", linestyle="--", linewidth=1,
                      label="70% of copy" if g == 0 else None)
    ax.set_ylabel("effective bandwidth, GB/s (fewest bytes / median)")
    return _finish(fig, ax, [label for label, _, _ in groups], title, path)


def write_plots(suite: dict[str, Any], folder: Path | str, stem: str) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    where = f"{suite.get('device_name', '?')}, torch {suite.get('versions', {}).get('torch', '?')}"
    rows = common.summary_rows(suite["payloads"])
    return [
        speedup_plot(rows, folder / f"{stem}-speedup.png", f"fastvae speedup, {where}"),
        bandwidth_plot(suite["payloads"], folder / f"{stem}-bandwidth.png",
                       f"effective bandwidth against the copy roofline, forward+backward, {where}"),
    ]


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description="Plot a benchmark suite JSON (python -m benchmarks writes one).")
    p.add_argument("suite_json", type=Path)
    p.add_argument("--out-dir", type=Path, default=None, help="default: the JSON's folder")
    args = p.parse_args(argv)
    suite = json.loads(args.suite_json.read_text())
    paths = write_plots(suite, args.out_dir or args.suite_json.parent, args.suite_json.stem)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
