#!/usr/bin/env python
"""Kernel benchmark: one BatchNorm layer, every provider side by side, on whatever device is here.

    python benchmarks/bench_kernels.py          # CUDA if present, else CPU: a first look (~2 min on 2 cores)
    python benchmarks/bench_kernels.py --full               # every shape set and provider, longer timings
    python benchmarks/bench_kernels.py --quick              # a few seconds: the CI smoke test
    python benchmarks/bench_kernels.py --shapes resnet50 --dtype bfloat16 --layout channels_last \\
        --csv benchmarks/results/kernels.csv --plot benchmarks/results/kernels.png
    python benchmarks/bench_kernels.py --dtype float32,bfloat16 --layout nchw,channels_last --threads 1

For each shape, provider and mode it reports the median time (and 20th/80th percentiles), the
speedup over torch.nn.BatchNorm from the same run, the effective bandwidth from the minimum bytes
the mode must move (byte model in benchmarks/memory.py) and that bandwidth as a fraction of two
copies measured in the same run: one of a buffer larger than any cache (memory bandwidth; a fraction
above 1 means the data stayed in cache) and one of the layer's input size (on a CPU, what its data
can move at where it stays in cache), the bytes kept for backward, and the peak memory.
The table ends with what the run found: the geometric-mean speedup of bnfused over torch per mode.

--dtype and --layout take comma-separated lists: every combination is run, one table each (the CSV
holds them all, with their dtype and layout columns).

On a CPU that other processes keep busy, multi-threaded timings stall whenever one thread loses
its core; ``--threads 1`` (and ``--repeat 3``) then give steadier numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks import cli, memory, providers, report, timing  # noqa: E402

SHAPE_SETS = {
    # The BatchNorm inputs of ResNet-50 at batch 256 (stem, then the last BN of each stage).
    "resnet50": [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)],
    # Large enough to leave the caches of a CPU, small enough to time in seconds.
    "cpu": [(32, 64, 56, 56), (128, 256, 14, 14)],
    # LeNet-5 and MLP layers at batch 64: microseconds of work, where per-call overhead dominates.
    "lenet-mlp": [(64, 6, 24, 24), (64, 16, 8, 8), (64, 120), (64, 84), (64, 512), (64, 256)],
    "tiny": [(8, 16, 8, 8), (16, 32)],
}
LAYOUTS = ("nchw", "channels_last")


@dataclass(frozen=True)
class Sweep:
    """What a run covers unless --shapes / --providers say otherwise."""

    shapes: str
    providers: tuple[str, ...] | None  # None: every default provider (providers.default_names)
    budget: timing.Budget
    copy_bytes: int  # big enough to leave every cache, so that the copy measures memory bandwidth


# The default run is a first look (about 2 minutes after the build on a 2-core CPU): the two large
# CPU shapes and two small layers, torch and torch.compile against bnfused's default backend.
_FIRST_LOOK_CPU = ("torch", "torch+relu", "compile", "bnfused", "bnfused+relu")
_CPU_BUDGET = timing.Budget(seconds=0.1, warmup_calls=3, warmup_ms=25, rep_ms=100)
SWEEPS = {
    ("default", "cpu"): Sweep("cpu,64x16x8x8,64x512", _FIRST_LOOK_CPU, _CPU_BUDGET, 1 << 28),
    ("default", "cuda"): Sweep("resnet50", None, timing.FULL, 1 << 30),
    ("full", "cpu"): Sweep("cpu,lenet-mlp", None, timing.FULL, 1 << 28),
    ("full", "cuda"): Sweep("resnet50,lenet-mlp", None, timing.FULL, 1 << 30),
}
QUICK = Sweep("tiny", None, timing.QUICK, 1 << 24)  # no compile providers: compiling takes longer than the run


def sweep_for(args: argparse.Namespace, device: torch.device) -> Sweep:
    """--quick, --full or the default sweep of ``device``'s type (other devices: the CPU's)."""
    if args.quick:
        return QUICK
    kind = "full" if args.full else "default"
    return SWEEPS.get((kind, device.type), SWEEPS[(kind, "cpu")])


COLUMNS = (
    "provider", "backend", "shape", "dtype", "layout", "mode",
    "ms", "q20_ms", "q80_ms", "speedup_vs_torch", "gbps", "roofline_frac", "copy_gbps", "x_copy_gbps",
    "x_copy_frac", "min_bytes", "saved_bytes", "peak_mem_bytes",
    "clock", "device", "torch", "triton", "commit", "date",
)  # fmt: skip
NUMERIC_COLUMNS = (
    "ms", "q20_ms", "q80_ms", "speedup_vs_torch", "gbps", "roofline_frac", "copy_gbps", "x_copy_gbps",
    "x_copy_frac", "min_bytes", "saved_bytes", "peak_mem_bytes",
)  # fmt: skip


def _fraction(numerator: str, denominator: str) -> str:
    """A ratio of two columns as written, so that the CSV agrees with itself to its printed digits."""
    return f"{float(numerator) / float(denominator):.4g}"


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """Comma-separated named sets (resnet50, cpu, lenet-mlp, tiny) and/or explicit NxCx... shapes."""
    shapes: list[tuple[int, ...]] = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        if item in SHAPE_SETS:
            shapes += SHAPE_SETS[item]
            continue
        try:
            shape = tuple(int(d) for d in item.split("x"))
        except ValueError:
            shape = ()
        if not 2 <= len(shape) <= 5 or min(shape) < 1 or math.prod(shape) // shape[1] < 2:
            raise ValueError(
                f"bad shape {item!r}: expected a set ({', '.join(SHAPE_SETS)}) or N x C x ... with 2 to 5 "
                "positive sizes and at least 2 values per channel, e.g. 32x64x56x56"
            )
        shapes.append(shape)
    return list(dict.fromkeys(shapes))


def make_input(shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: torch.device) -> torch.Tensor:
    """Random (N, C, *) input with a non-zero mean; channels_last is channels-innermost memory order."""
    x = torch.randn(shape, device=device).mul_(3.0).add_(2.0).to(dtype)
    if layout == "channels_last":
        if x.dim() in (4, 5):
            return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        if x.dim() == 3:  # (N, L, C) data seen as (N, C, L), as a transformer's activations are
            return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x  # (N, C) already has channels innermost


def _mode_call(mode: str, layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    """The callable one timed iteration of ``mode`` runs (the layer is put in the right train/eval state)."""
    layer.train(mode != "fwd-eval")
    if mode == "fwd-train":
        return lambda: layer(x)
    if mode == "fwd-eval":
        return lambda: layer(x)  # measured under torch.no_grad(), as inference runs
    if mode == "bwd":
        y = layer(x)  # one forward; the graph is kept so that only the backward is timed
        return lambda: y.backward(dy, retain_graph=True)
    return lambda: layer(x).backward(dy)


class KernelBenchmark:
    """Runs every (shape, provider, mode) case of one configuration and collects CSV rows."""

    def __init__(self, device, dtype, layout, provider_names, modes, budget, log=print):
        self.device, self.dtype, self.layout, self.modes, self.budget = device, dtype, layout, modes, budget
        self.param_dtype = providers.param_dtype(dtype)
        self.providers = [providers.parse(n) for n in provider_names]
        self.log = log
        self.failures: list[str] = []
        self.metadata = {"clock": timing.clock_name(device), **report.run_metadata(device)}

    def run(self, shapes: Sequence[tuple[int, ...]], copy_bytes: int, repeat: int = 1) -> list[dict]:
        """Measures every case ``repeat`` times, a whole round after another. Within a round, each mode
        of a shape is timed for every provider in turn, so that a burst of load from another process
        hits the providers alike; a row keeps the median of its rounds, and its speedup is the median
        of the per-round speedups over torch.

        Each round also times a copy of each shape's input size (``x_copy_gbps``): on a CPU, where the
        layer and its output stay in cache, that copy (not the large one) is the rate a one-pass kernel
        can reach; on CUDA, whose timing clears L2 before each call, it is a cold copy of that size."""
        cases: dict[tuple, dict] = {}  # (shape, provider, mode) -> the row's fixed fields and its timings
        copies = []
        x_copies: dict[str, list[float]] = {}
        start, done, total = time.monotonic(), 0, repeat * len(shapes) * len(self.providers)
        for round_index in range(repeat):
            copies.append(timing.copy_bandwidth_gbps(self.device, self.budget, copy_bytes))
            self.log(f"round {round_index + 1}/{repeat}: device copy bandwidth {copies[-1]:.1f} GB/s "
                     f"(read + write of {copy_bytes >> 20} MiB)")  # fmt: skip
            for shape in shapes:
                x_bytes = math.prod(shape) * self.dtype.itemsize
                x_copies.setdefault(shape_text(shape), []).append(
                    timing.copy_bandwidth_gbps(self.device, self.budget, x_bytes)
                )
                layers = []
                for provider in self.providers:
                    done += 1
                    self.log(f"  [{done}/{total}] {shape_text(shape)} {provider.name} "
                             f"({time.monotonic() - start:.0f} s)")  # fmt: skip
                    layer = self._setup(provider, shape)
                    if layer is not None:
                        layers.append((provider, layer))
                for mode in self.modes:
                    for provider, layer in layers:
                        self._run_mode(provider, shape, mode, layer, cases, round_index)
        self.copy_gbps = statistics.median(copies)
        rows = []
        for (shape, name, mode), case in cases.items():
            row = self._row(case["fields"], timing.median_timing(list(case["timings"].values())))
            x_copy_gbps = statistics.median(x_copies[shape])
            row["x_copy_gbps"] = f"{x_copy_gbps:.4g}"
            row["x_copy_frac"] = _fraction(row["gbps"], row["x_copy_gbps"])
            base = cases.get((shape, providers.parse(name).baseline, mode))
            rounds = [] if base is None else sorted(case["timings"].keys() & base["timings"].keys())
            speedups = [base["timings"][r].ms / case["timings"][r].ms for r in rounds]
            row["speedup_vs_torch"] = f"{statistics.median(speedups):.4g}" if speedups else None
            rows.append(row)
        return rows

    def _row(self, fields: dict, measured: timing.Timing) -> dict:
        gbps = f"{fields['min_bytes'] / (measured.ms * 1e-3) / 1e9:.4g}"
        copy_gbps = f"{self.copy_gbps:.4g}"
        return {
            **fields, **timing.as_columns(measured), "gbps": gbps,
            "roofline_frac": _fraction(gbps, copy_gbps), "copy_gbps": copy_gbps, **self.metadata,
        }  # fmt: skip

    def _fail(self, provider, shape, what: str, exc: BaseException) -> None:
        message = f"{provider.name} {shape_text(shape)} {what}: skipped ({report.short_reason(exc)})"
        self.failures.append(message)
        self.log(message)

    def _setup(self, provider, shape) -> dict | None:
        """One provider's layer for ``shape``, its input and upstream gradient; None if it cannot run."""
        try:
            layer = providers.build_layer(provider, shape, self.device, self.dtype)
            x = make_input(shape, self.dtype, self.layout, self.device).requires_grad_()
            return {
                "layer": layer,
                "backend": providers.resolved_backend(provider, self.device),
                "x": x,
                # The upstream gradient arrives in the output's dtype and memory layout.
                "dy": torch.randn_like(layer(x.detach())),
                "state": [b.detach().clone() for b in layer.buffers()],
                "saved": memory.saved_bytes(layer.train(), x),
            }
        except Exception as exc:  # a provider that cannot run this shape must not stop the others
            self._fail(provider, shape, "setup", exc)
            return None

    def _run_mode(self, provider, shape, mode: str, setup: dict, cases: dict[tuple, dict], round_index: int) -> None:
        """Times one mode of one (provider, shape) and records it under ``cases`` for this round (the
        peak memory is measured in the first round only: it does not vary)."""
        layer, x = setup["layer"], setup["x"]
        grads = [x, *layer.parameters()]
        key = (shape_text(shape), provider.name, mode)
        try:
            with torch.set_grad_enabled(mode != "fwd-eval"):
                call = _mode_call(mode, layer, x, setup["dy"])
                measured = timing.measure(call, self.device, self.budget, grads)
                peak = None
                if key not in cases:
                    peak = memory.peak_memory_bytes(timing.with_grad_reset(call, grads), self.device)
        except Exception as exc:
            self._fail(provider, shape, mode, exc)
            return
        finally:
            with torch.no_grad():  # timing ran many training steps: put the running stats back
                for buffer, value in zip(layer.buffers(), setup["state"]):
                    buffer.copy_(value)
        if key not in cases:
            fields = {
                "provider": provider.name, "backend": setup["backend"], "shape": key[0],
                "dtype": str(self.dtype).replace("torch.", ""), "layout": self.layout, "mode": mode,
                "min_bytes": memory.min_bytes(mode, shape, self.dtype, self.param_dtype, provider.relu),
                "saved_bytes": setup["saved"], "peak_mem_bytes": peak,
            }  # fmt: skip
            cases[key] = {"fields": fields, "timings": {}}
        cases[key]["timings"][round_index] = measured


def _speedup_text(row: dict) -> str:
    if not row["speedup_vs_torch"]:
        return ""
    value = float(row["speedup_vs_torch"])
    return f" ({value:.2f}x)" if value >= 0.1 else f" ({value:.2g}x)"


def results_table(rows: Sequence[dict], modes: Sequence[str], markdown: bool = False) -> str:
    """One line per (shape, provider): each mode's median ms and speedup, then the last mode's
    bandwidth and peak memory and the bytes saved for backward as a multiple of x's."""
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["shape"], r["provider"]), {})[r["mode"]] = r
    last = modes[-1]
    with_peak = any(r["peak_mem_bytes"] is not None for r in rows)
    header = ["shape", "provider", *(f"{m} ms (vs torch)" for m in modes), f"{last} GB/s (% of copy, x copy)"]
    header += [f"{last} peak MiB"] * with_peak + ["saved / x"]
    body = []
    for by_mode in cells.values():
        first = next(iter(by_mode.values()))
        shape = first["shape"]
        line = [shape, report.provider_label(first)]
        line += [
            f"{float(by_mode[m]['ms']):.4g}{_speedup_text(by_mode[m])}" if m in by_mode else "failed" for m in modes
        ]
        r = by_mode.get(last)
        copies = f"{100 * float(r['roofline_frac']):.0f}%, {100 * float(r['x_copy_frac']):.0f}%" if r else ""
        line.append(f"{float(r['gbps']):.3g} ({copies})" if r else "-")
        if with_peak:
            line.append(f"{r['peak_mem_bytes'] / 2**20:.1f}" if r else "-")
        x_bytes = math.prod(int(d) for d in shape.split("x")) * cli.DTYPES[first["dtype"]].itemsize
        line.append(f"{first['saved_bytes'] / x_bytes:.2f}")
        body.append(line)
    return report.format_table(header, body, markdown)


def _geometric_mean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def findings(rows: Sequence[dict], modes: Sequence[str]) -> str:
    """One line saying what the run found: per mode, the geometric mean over shapes of the speedup of
    the first plain bnfused provider over torch, of fused BN + ReLU over torch's BN then ReLU, and of
    the first bnfused functional over torch's functional (each against torch called the same way)."""
    providers_in_run = list(dict.fromkeys(r["provider"] for r in rows))
    fused = [providers.parse(p) for p in providers_in_run if p.startswith("bnfused")]
    firsts = (
        next((p for p in fused if not p.relu and not p.functional), None),
        next((p for p in fused if p.relu and not p.functional), None),
        next((p for p in fused if not p.relu and p.functional), None),
    )
    pairs = [(p.name, p.baseline + (providers.RELU_SUFFIX if p.relu else "")) for p in firsts if p]
    ms = {(r["provider"], r["shape"], r["mode"]): float(r["ms"]) for r in rows}
    parts = []
    for provider, baseline in pairs:
        per_mode = []
        for mode in modes:
            shapes = [s for (p, s, m) in ms if p == provider and m == mode and (baseline, s, m) in ms]
            if shapes:
                speedup = _geometric_mean([ms[(baseline, s, mode)] / ms[(provider, s, mode)] for s in shapes])
                per_mode.append(f"{mode} {speedup:.2f}x")
        if per_mode:
            label = report.provider_label(next(r for r in rows if r["provider"] == provider))
            parts.append(f"{label} vs {baseline}: {', '.join(per_mode)}")
    if not parts:
        return "Found: nothing to compare (the run needs a bnfused provider and torch)."
    shapes = len({r["shape"] for r in rows})
    return f"Found (speedup, geometric mean over {shapes} shapes; > 1 is faster): " + "; ".join(parts)


def _list_of(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``allowed``, in the order given."""

    def parse(text: str) -> list[str]:
        items = cli.split(text)
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}"
            )
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints a table; optional CSV and PNG.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        conflict_handler="resolve",  # --dtype below replaces the common, single-valued one
    )
    cli.add_common_arguments(
        parser,
        quick_help="a few seconds: tiny shapes, short timings, no compile (a smoke test)",
        csv_help="write one row per shape x provider x mode",
    )
    parser.add_argument(
        "--dtype", type=_list_of(list(cli.DTYPES)), default=["float32"],
        help=f"comma-separated input dtypes, each run in turn ({', '.join(cli.DTYPES)}; default float32)",
    )  # fmt: skip
    parser.add_argument(
        "--full", action="store_true", help="the whole sweep: every shape set of the device, every provider, "
        "longer timings (CPU: about 5 minutes on 2 cores, more under load)",
    )  # fmt: skip
    parser.add_argument(
        "--layout", type=_list_of(LAYOUTS), default=["nchw"],
        help=f"comma-separated input memory layouts, each run in turn ({', '.join(LAYOUTS)}; default nchw)",
    )  # fmt: skip
    parser.add_argument(
        "--shapes",
        help=f"comma-separated: named sets ({', '.join(SHAPE_SETS)}) and/or shapes like 32x64x56x56,64x512 "
        f"(default: {SWEEPS[('default', 'cuda')].shapes} on CUDA, {SWEEPS[('default', 'cpu')].shapes} on CPU; "
        f"--full: {SWEEPS[('full', 'cuda')].shapes} / {SWEEPS[('full', 'cpu')].shapes}; --quick: {QUICK.shapes})",
    )
    parser.add_argument(
        "--providers",
        help="comma-separated: torch, compile, scratch, bnfused, bnfused-<backend>, each optionally +relu "
        f"(default on CPU: {','.join(_FIRST_LOOK_CPU)}; on CUDA and with --full: all, with every bnfused backend "
        "available on the device, triton on CPU only by name; --quick: all but compile)",
    )
    parser.add_argument(
        "--modes", default=",".join(memory.MODES), help=f"comma-separated subset of {', '.join(memory.MODES)}"
    )
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the speedups (benchmarks/plot_results.py)")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.quick and args.full:
        raise SystemExit("--quick and --full: choose one")
    device = cli.setup(args)
    sweep = sweep_for(args, device)
    if device.type == "cpu" and "triton" in (args.providers or ""):
        # Triton on CPU means its interpreter, which must be chosen before Triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    modes = cli.split(args.modes)
    unknown = [m for m in modes if m not in memory.MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(memory.MODES)}")
    try:
        shapes = parse_shapes(args.shapes or sweep.shapes)
        names = cli.split(args.providers or ",".join(sweep.providers or ()))
        for name in names:
            providers.parse(name)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not names:  # discovering the backends may build the C++ extension: only once the options are valid
        names = [n for n in providers.default_names(device) if not (args.quick and n.startswith("compile"))]

    rows, failures = [], []
    for dtype_name in args.dtype:
        for layout in args.layout:
            if rows:
                print()  # a blank line between the configurations' tables
            bench = KernelBenchmark(device, cli.DTYPES[dtype_name], layout, names, modes, sweep.budget, log=cli.log)
            print(f"{bench.metadata['device']} | torch {bench.metadata['torch']} | triton {bench.metadata['triton']} "
                  f"| commit {bench.metadata['commit']} | {bench.metadata['date']} | {dtype_name} {layout} "
                  f"| clock {bench.metadata['clock']}")  # fmt: skip
            config_rows = bench.run(shapes, sweep.copy_bytes, args.repeat)
            print(results_table(config_rows, modes, args.markdown))
            print(findings(config_rows, modes))
            rows += config_rows
            failures += bench.failures
    busy = report.contention_note(device)  # checked again at the end: the load may have come during the run
    if busy:
        print(f"Caution, {busy.removeprefix('note: ')}")
    if failures:
        print(f"\n{len(failures)} case(s) skipped:\n  " + "\n  ".join(failures))
    if args.csv:
        report.write_csv(args.csv, rows, COLUMNS)
        print(f"wrote {args.csv}")
    if args.plot:
        from benchmarks.plot_results import plot_speedups

        plot_speedups(rows, args.plot)
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
