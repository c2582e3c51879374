#!/usr/bin/env python
"""Plots kernel-benchmark results: speedup over torch.nn.BatchNorm per shape and provider, one panel per mode.

    python benchmarks/plot_results.py benchmarks/results/kernels.csv --out kernels.png

Reads the CSV that ``bench_kernels.py --csv`` writes (``bench_kernels.py --plot`` calls the same code).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402


def plot_speedups(rows: Sequence[dict], path: str) -> None:
    """Grouped bars (one group per shape, one bar per provider) of speedup_vs_torch, a panel per mode.

    Rows without a speedup (no torch row to compare with) are left out; the y axis is logarithmic
    so that 2x faster and 2x slower are the same distance from the 1.0 line.
    """
    missing = {"mode", "shape", "provider", "speedup_vs_torch"} - set(rows[0] if rows else ())
    if missing:
        raise ValueError(f"not bench_kernels.py rows: no {', '.join(sorted(missing))} column")
    rows = [r for r in rows if r.get("speedup_vs_torch") not in (None, "")]
    if not rows:
        raise ValueError("no rows with speedup_vs_torch to plot (is the torch provider in the run?)")
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    speedup = {(r["mode"], r["shape"], r["provider"]): float(r["speedup_vs_torch"]) for r in rows}

    fig, axes = plt.subplots(
        len(modes), 1, figsize=(max(8, 1.1 * len(shapes) * len(names) / 4), 3.2 * len(modes)), squeeze=False
    )
    width = 0.8 / len(names)
    for ax, mode in zip(axes[:, 0], modes):
        for i, name in enumerate(names):
            xs = [s + (i - (len(names) - 1) / 2) * width for s in range(len(shapes))]
            ys = [speedup.get((mode, shape, name), float("nan")) for shape in shapes]
            ax.bar(xs, ys, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        # Ticks at 1-2-5 steps labelled 0.5, 1, 2 (not 5x10^-1); the other minor ticks unlabelled.
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(mode, fontsize=10)
        ax.set_ylabel("speedup vs torch")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=8)
    # Title, then the legend below it, in a band at the top measured in inches (figure height varies).
    inch = 1 / fig.get_figheight()
    first = rows[0]
    title = f"{first['device']} | {first['dtype']} {first['layout']} | torch {first['torch']} | {first['date']}"
    fig.suptitle(title, fontsize=9, y=1 - 0.08 * inch, va="top")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=min(len(names), 5), fontsize=8, bbox_to_anchor=(0.5, 1 - 0.3 * inch)
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.4 + 0.22 * math.ceil(len(names) / 5)) * inch))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1])
    parser.add_argument("csv", help="CSV written by bench_kernels.py --csv")
    parser.add_argument("--out", help="PNG path (default: the CSV's path with .png)")
    args = parser.parse_args(argv)
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    out = args.out or str(Path(args.csv).with_suffix(".png"))
    plot_speedups(rows, out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
