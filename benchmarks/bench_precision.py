#!/usr/bin/env python
"""Precision of the batch statistics where |mean| >> std: each provider against float64.

    python benchmarks/bench_precision.py                  # the default shapes, layouts and offsets
    python benchmarks/bench_precision.py --shapes 64x512,16x256x14x14 --offsets 1e3,1e4 \\
        --providers torch,cpp,reference --csv benchmarks/results/precision.csv
    python benchmarks/bench_precision.py --values bfloat16 --offsets 10,1e3   # quantized values

The input is float32 randn (std 1) plus an offset of `offset` standard deviations; with `--values
bfloat16`, the same values rounded to bfloat16 (still a float32 tensor): few distinct values, so that
the roundings of float sums repeat instead of cancelling. Each provider
takes one training step with momentum 1, so that its running buffers hold the batch mean and the
unbiased variance; the table gives the largest error over the channels, relative to float64
statistics of the same float32 values (two passes): the mean's relative to the standard deviation,
the variance's relative to the variance (invstd's is half of it). `torch` is torch.nn.functional's
batch_norm on the same device; the others are bnfused backends by name (`triton` on a CPU needs
TRITON_INTERPRET=1 before anything imports triton).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bnfused  # noqa: E402
from benchmarks import cli, report  # noqa: E402
from benchmarks.bench_kernels import parse_shapes  # noqa: E402

DEFAULT_SHAPES = "64x512,256x40,8x40x7x7,32x64x28x28,16x256x14x14,64x96x3x3"
MAX_OFFSET = 2.0**24
# With --values bfloat16: beyond it bfloat16 spaces its values 16 standard deviations apart or more, and
# nearly every channel holds a single value.
MAX_BFLOAT16_OFFSET = 2.0**11
COLUMNS = ["shape", "layout", "offset", "values", "provider", "mean_error", "var_error"]
VALUES = ("float32", "bfloat16")


def make_input(
    shape: tuple[int, ...], offset: float, layout: str, device: torch.device, values: str = "float32"
) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).add_(offset)
    x = x.to(getattr(torch, values)).float().to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def batch_statistics(x: torch.Tensor, provider: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The provider's batch mean and biased variance of x, in float64."""
    C = x.shape[1]
    running_mean = torch.zeros(C, device=x.device)
    running_var = torch.zeros(C, device=x.device)
    if provider == "torch":
        F.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    else:
        bnfused.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, backend=provider)
    count = x.numel() // C
    return running_mean.double(), running_var.double() * (count - 1) / count


def errors(x: torch.Tensor, provider: str) -> tuple[float, float]:
    dims = [d for d in range(x.dim()) if d != 1]
    x64 = x.double()
    want_mean = x64.mean(dims)
    want_var = (x64 - want_mean.view(1, -1, *[1] * (x.dim() - 2))).square().mean(dims)
    mean, var = batch_statistics(x, provider)
    varies = want_var > 0  # a channel of one value has no relative error (nan when none varies)
    mean_error = ((mean - want_mean).abs() / want_var.sqrt())[varies].max().item() if varies.any() else math.nan
    var_error = ((var - want_var).abs() / want_var)[varies].max().item() if varies.any() else math.nan
    return mean_error, var_error


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"N x C x ... shapes (default {DEFAULT_SHAPES})")
    parser.add_argument("--layout", default="nchw,channels_last", help="nchw and/or channels_last (4-D/5-D shapes)")
    parser.add_argument(
        "--offsets",
        default="1e2,1e3,1e4,1e6",
        help="the means, in standard deviations, below 2**24 in magnitude (negative ones as --offsets=-1e4)",
    )
    parser.add_argument(
        "--values", default="float32", help="float32 (randn) and/or bfloat16 (the same values rounded to bfloat16)"
    )
    parser.add_argument("--providers", default="torch,cpp", help="torch and/or bnfused backends by name")
    parser.add_argument("--device", help="cuda, cpu (default: cuda if available, else cpu)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows, with where and when they were measured")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
        offsets = [float(o) for o in cli.split(args.offsets)]
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(str(exc)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if not all(math.isfinite(o) and abs(o) < MAX_OFFSET for o in offsets):
        raise SystemExit(
            f"--offsets {args.offsets!r}: each must be finite and below 2**24 in magnitude "
            "(beyond it float32 spaces its values more than a standard deviation apart)"
        )
    layouts = cli.split(args.layout)
    if not set(layouts) <= {"nchw", "channels_last"}:
        raise SystemExit(f"--layout takes nchw and/or channels_last, got {args.layout!r}")
    values = cli.split(args.values)
    if not set(values) <= set(VALUES):
        raise SystemExit(f"--values takes float32 and/or bfloat16, got {args.values!r}")
    if "bfloat16" in values and not all(abs(o) < MAX_BFLOAT16_OFFSET for o in offsets):
        raise SystemExit(
            f"--values bfloat16 takes offsets below 2**11 in magnitude, got {args.offsets!r} (beyond it bfloat16 "
            "spaces its values 16 standard deviations apart or more: nearly every channel one value)"
        )
    providers = cli.split(args.providers)
    cases = [(s, lay) for s in shapes for lay in layouts if lay == "nchw" or len(s) in (4, 5)]
    if not (offsets and values and providers and cases):
        raise SystemExit(
            "nothing to measure: give offsets, values, providers, and shapes that --layout applies to "
            "(channels_last takes 4-D and 5-D shapes)"
        )
    rows = []
    for shape, layout in cases:
        for offset, kind in ((o, v) for o in offsets for v in values):
            x = make_input(shape, offset, layout, device, kind)
            row = {"shape": "x".join(map(str, shape)), "layout": layout, "offset": f"{offset:g}", "values": kind}
            for provider in providers:
                try:
                    mean_error, var_error = errors(x, provider)
                except Exception as exc:  # a provider that cannot run here is reported, not fatal
                    cli.log(f"{provider} on {row['shape']} {layout}: {report.short_reason(exc)}")
                    continue
                rows.append(
                    {
                        **row,
                        "provider": provider,
                        "mean_error": f"{mean_error:.1e}",
                        "var_error": f"{var_error:.1e}",
                    }
                )
    if not rows:
        raise SystemExit("no provider ran (see the messages above)")
    print(report.format_table(COLUMNS, ([r[k] for k in COLUMNS] for r in rows), markdown=args.markdown))
    if args.csv:
        meta = report.run_metadata(device)
        report.write_csv(args.csv, [{**r, **meta} for r in rows], COLUMNS + list(meta))
        cli.log(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
