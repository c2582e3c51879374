"""Where one BatchNorm layer's time goes, kernel by kernel: each provider's training forward and
backward under ``torch.profiler``, device time per kernel per call.

``bench_kernels.py`` says how long a mode takes; this says which launches take it. On a GPU it lists
every kernel a call launches (name, launches per call, microseconds of device time per call, share of
the call's device time); on a CPU it lists the ATen ops by self CPU time, which is what the C++
kernels are called through.

    python benchmarks/profile_kernels.py --shapes 256x1024x14x14 --providers torch,bnfused-triton
    python benchmarks/profile_kernels.py --shapes 256x2048x7x7 --blocks 32x64,16x64   # Triton tiles
    python benchmarks/profile_kernels.py --quick     # tiny shapes on whatever device is present
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import cli, providers, report
from benchmarks.bench_kernels import LAYOUTS, _mode_call, make_input, parse_shapes, shape_text
from bnfused import layout as bn_layout
from bnfused.backends import triton as triton_launcher

MODES = ("fwd-train", "bwd", "fwd-eval")
COLUMNS = ("shape", "dtype", "layout", "provider", "mode", "kernel", "launches", "us", "share")


def _device_time(event) -> float:
    """Device (or, on CPU, self CPU) microseconds of a profiler average, in any torch from 2.6."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def profile_case(call, device: torch.device, calls: int) -> list[tuple[str, float, float]]:
    """(kernel or op name, launches per call, microseconds per call) of ``call``, the largest first."""
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        if device.type == "cuda":
            us = _device_time(event)
        else:
            us = float(event.self_cpu_time_total)
        if us > 0 and event.count >= calls:  # each call's own launches, not one-off set-up
            rows.append((event.key, event.count / calls, us / calls))
    return sorted(rows, key=lambda r: -r[2])


def _variants(names: Sequence[str], blocks: Sequence[tuple[int, int]], device: torch.device) -> list[tuple]:
    """(label, provider, tile or None): each provider as it plans, then each Triton one on every tile."""
    variants = []
    for name in names:
        provider = providers.parse(name)
        variants.append((name, provider, None))
        if providers.resolved_backend(provider, device) == "triton":
            variants += [(f"{name}@{c}x{s}", provider, (c, s)) for c, s in blocks]
    return variants


def run(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    dtype = cli.DTYPES[args.dtype]
    for shape in args.shapes:
        for layout in args.layout:
            x = make_input(shape, dtype, layout, device)
            dy = torch.randn_like(x)
            done = set()
            for name, provider, tile in _variants(args.providers, args.blocks, device):
                if tile:  # the tile the plan takes (a block is capped at the tensor's extent), once
                    with triton_launcher.forced_blocks(*tile, None):
                        plan = triton_launcher._make_plan(bn_layout.kernel_ready(x))
                    name = f"{name.split('@')[0]}@{plan.block_c}x{plan.block_s}"
                    if name in done:
                        continue
                done.add(name)
                for mode in args.modes:
                    layer = providers.build_layer(provider, shape, device, dtype)
                    xi = x.detach().requires_grad_(mode != "fwd-eval")
                    forced = triton_launcher.forced_blocks(*tile, None) if tile else contextlib.nullcontext()
                    with torch.set_grad_enabled(mode != "fwd-eval"), forced:
                        call = _mode_call(mode, layer, xi, dy)
                        kernels = profile_case(call, device, args.calls)
                    total = sum(us for _, _, us in kernels) or 1.0
                    cli.log(f"{shape_text(shape)} {args.dtype} {layout} {name} {mode}: {total:.1f} us")
                    for kernel, launches, us in kernels[: args.top]:
                        rows.append({
                            "shape": shape_text(shape), "dtype": args.dtype, "layout": layout, "provider": name,
                            "mode": mode, "kernel": kernel[:90], "launches": f"{launches:g}", "us": f"{us:.1f}",
                            "share": f"{us / total:.0%}",
                        })  # fmt: skip
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=cli.DTYPES, default="float32")
    parser.add_argument("--shapes", default="resnet50", help="shape sets or NxCx... (bench_kernels.py's)")
    parser.add_argument("--layout", default="nchw,channels_last", help=f"comma-separated: {', '.join(LAYOUTS)}")
    parser.add_argument("--providers", default="torch,bnfused-triton", help="comma-separated provider names")
    parser.add_argument("--modes", default="fwd-train,bwd", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument(
        "--blocks",
        default="",
        help="Triton tiles to profile too, as CxS (channels x columns, "
        "powers of two), comma-separated; each Triton provider runs on its own plan and on each",
    )
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per case (after 3 warm-up calls)")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per case")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 calls: a smoke run")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV (with the run's metadata)")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.quick:
        args.shapes, args.calls = "tiny", 2
        if device.type != "cuda":
            args.providers = "torch,bnfused"
    try:
        args.shapes = parse_shapes(args.shapes)
    except ValueError as err:
        raise SystemExit(f"--shapes: {err}") from None
    args.layout = cli.split(args.layout)
    args.providers = cli.split(args.providers)
    args.modes = cli.split(args.modes)
    text = args.blocks
    try:
        args.blocks = [tuple(int(v) for v in spec.split("x")) for spec in cli.split(text)]
        if any(len(b) != 2 or min(b) < 1 or any(v & (v - 1) for v in b) for b in args.blocks):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--blocks: expected CxS with powers of two, e.g. 32x64; got {text!r}") from None
    for option, values, allowed in (("--layout", args.layout, LAYOUTS), ("--modes", args.modes, MODES)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise SystemExit(f"{option}: unknown {', '.join(unknown)}; expected {', '.join(allowed)}")
    try:
        for name in args.providers:
            providers.resolved_backend(providers.parse(name), device)  # unknown or unavailable: say so now
    except Exception as err:
        raise SystemExit(f"--providers: {report.short_reason(err)}") from None
    if args.calls < 1 or args.top < 1:
        raise SystemExit(f"--calls and --top must be >= 1, got {args.calls} and {args.top}")
    rows = run(args, device)
    metadata = report.run_metadata(device)
    print(" | ".join(metadata.values()))
    print(report.format_table(COLUMNS, ([row[c] for c in COLUMNS] for row in rows)))
    if args.csv:
        report.write_csv(args.csv, [{**row, **metadata} for row in rows], [*COLUMNS, *metadata])
    return rows


if __name__ == "__main__":
    main()
