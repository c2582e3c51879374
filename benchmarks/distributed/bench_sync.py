"""Time of one SyncBatchNorm training step (forward + backward) on CPU processes joined with gloo.

    python -m benchmarks.bench_sync                    # 2 processes, default shapes
    python -m benchmarks.bench_sync --quick --csv benchmarks/results/sync_cpu.csv

What is compared, since ``torch.nn.SyncBatchNorm`` cannot run here (it refuses CPU tensors, and
the ops it is built on, ``torch.batch_norm_stats`` and friends, have no CPU kernels):

* ``torch-local``: ``nn.BatchNorm`` + ``F.relu`` on each rank's own batch, no communication. Not
  the same computation (local statistics): the floor a synchronised step can approach.
* ``bnfused-sync[<backend>]``: ``bnfused.SyncBatchNorm(activation="relu")`` with each backend that
  runs on CPU tensors here ("reference" is pure PyTorch ops, "cpp" the C++ kernels).
* ``collectives``: the step's two collectives alone (all_gather of 1 + 2C float64 values, all_reduce
  of 2C float32 values): the communication part of a synchronised step.

Every rank runs the same fixed number of steps (collectives pair up by call order, so adaptive
repetition counts are ruled out); a block of ``--inner`` steps is timed between barriers, and the
row reports the median block over ``--blocks`` blocks, per step, of the slowest rank.

Processes are launched with ``benchmarks.processes.run_processes`` (spawn, gloo on loopback).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bnfused
from benchmarks import report
from benchmarks.processes import run_processes

# (per-rank batch shape, what it stands for)
SHAPES = {
    "full": [((32, 64, 28, 28), "conv stage"), ((16, 256, 14, 14), "deep conv stage"), ((256, 1024), "MLP layer")],
    "quick": [((8, 16, 14, 14), "conv stage"), ((64, 256), "MLP layer")],
}
SYNC_BACKENDS = ("reference", "cpp")  # the CPU backends worth timing (Triton on CPU is its interpreter)
COLUMNS = ("provider", "shape_per_rank", "world_size", "ms", "ms_min", "ms_max", "device", "torch", "commit", "date")


# --------------------------------------------------------------------------- what one step is


def _torch_local_step(shape):
    layer = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(shape[1])
    return lambda x: F.relu(layer(x)), list(layer.parameters())


def _bnfused_sync_step(shape, backend):
    layer = bnfused.SyncBatchNorm(shape[1], activation="relu", backend=backend)
    return layer, list(layer.parameters())


def _collectives_step(shape):
    num_channels = shape[1]
    stats = torch.zeros(1 + 2 * num_channels, dtype=torch.float64)
    sums = torch.zeros(2 * num_channels)

    def step(x):
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, stats)
        dist.all_reduce(sums)

    return step, []


def _providers(shape):
    """(name, step factory) for every row of one shape."""
    rows = [("torch-local", lambda: _torch_local_step(shape))]
    for name in SYNC_BACKENDS:
        if bnfused.backends.unavailable_reason(name, torch.device("cpu")) is None:
            rows.append((f"bnfused-sync[{name}]", lambda name=name: _bnfused_sync_step(shape, name)))
    rows.append(("collectives", lambda: _collectives_step(shape)))
    return rows


# --------------------------------------------------------------------------- timing, in every process


def _time_step(forward, params, x, dy, warmup: int, blocks: int, inner: int) -> list[float]:
    """Milliseconds per step of each block (forward + backward when x needs a gradient)."""

    def step():
        for t in (x, *params):
            t.grad = None
        y = forward(x)
        if y is not None:
            y.backward(dy)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(blocks):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(inner):
            step()
        times.append(1e3 * (time.perf_counter() - start) / inner)
    return times


def _benchmark(rank: int, world_size: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(rank)
    rows = []
    for shape, purpose in SHAPES["quick" if args.quick else "full"]:
        x = (torch.randn(shape) * 3 + 2).requires_grad_()
        dy = torch.randn(shape)
        for provider, make in _providers(shape):
            forward, params = make()
            times = _time_step(forward, params, x, dy, args.warmup, args.blocks, args.inner)
            # The slowest rank sets the step time of a synchronised job.
            summary = torch.tensor([statistics.median(times), min(times), max(times)], dtype=torch.float64)
            dist.all_reduce(summary, op=dist.ReduceOp.MAX)
            rows.append({
                "provider": provider, "shape_per_rank": "x".join(map(str, shape)), "purpose": purpose,
                "world_size": world_size, "ms": f"{summary[0]:.4f}", "ms_min": f"{summary[1]:.4f}",
                "ms_max": f"{summary[2]:.4f}",
            })  # fmt: skip
    if rank == 0:
        meta = report.run_metadata(torch.device("cpu"))
        for row in rows:
            row.update(meta)
        header = ("provider", "shape per rank", "", "ms / step")
        body = [(r["provider"], r["shape_per_rank"], r["purpose"], r["ms"]) for r in rows]
        print(f"{world_size} processes x {args.threads} threads, gloo; {meta['device']}; torch {meta['torch']}")
        print(report.format_table(header, body, markdown=args.markdown))
        if args.csv:
            report.write_csv(args.csv, rows, COLUMNS)
            print(f"wrote {args.csv}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="number of CPU processes (default 2)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: CPU count / world size)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke run)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (default 3)")
    p.add_argument("--blocks", type=int, default=15, help="timed blocks per row (default 15)")
    p.add_argument("--inner", type=int, default=5, help="steps per timed block (default 5)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows to this CSV file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if min(args.world_size, args.warmup + 1, args.blocks, args.inner) < 1:
        raise SystemExit("--world-size, --blocks and --inner must be positive, --warmup >= 0")
    if args.quick:
        args.warmup, args.blocks, args.inner = 1, 3, 2
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.world_size)
    for name in SYNC_BACKENDS:  # build/load the C++ extension here, not while other ranks wait in a collective
        bnfused.backends.unavailable_reason(name, torch.device("cpu"))
    run_processes(args.world_size, _benchmark, args)


if __name__ == "__main__":
    main()
