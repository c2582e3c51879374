"""Time of one SyncBatchNorm training step (forward + backward) across processes, under torchrun.

    python -m benchmarks.distributed.bench_sync                 # torchrun --standalone: 2 CPU processes, or 1 per GPU
    python -m benchmarks.distributed.bench_sync --quick --csv benchmarks/results/sync_cpu.csv
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST0 --master-port 29500 \
        -m benchmarks.distributed.bench_sync --csv sync.csv      # on each node, with its --node-rank

What is compared:

* ``torch-local``: ``nn.BatchNorm`` + ``F.relu`` on each rank's own batch, no communication. Not
  the same computation (local statistics): the floor a synchronised step can approach.
* ``torch-sync`` (CUDA only): ``nn.SyncBatchNorm`` + ``F.relu``. It refuses CPU tensors (the ops it
  is built on, ``torch.batch_norm_stats`` and friends, have no CPU kernels).
* ``bnfused-sync[<backend>]``: ``bnfused.SyncBatchNorm(activation="relu")`` with each backend that
  runs on the device (on CPU: "reference", pure PyTorch ops, and "cpp", the C++ kernels).
* ``collectives``: the step's two collectives alone (all_gather of 1 + 2C float64 values, all_reduce
  of 2C float32 values): the communication part of a synchronised step.

Every rank runs the same fixed number of steps (collectives pair up by call order, so adaptive
repetition counts are ruled out); a block of ``--inner`` steps is timed between barriers, and the
row reports the median block over ``--blocks`` blocks, per step, of the slowest rank.

How processes start and find each other (NCCL on GPUs, gloo on CPUs): ``benchmarks/distributed/launch.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bnfused
from benchmarks import providers, report
from benchmarks.distributed import launch

# (per-rank batch shape, what it stands for)
SHAPES = {
    "full": [((32, 64, 28, 28), "conv stage"), ((16, 256, 14, 14), "deep conv stage"), ((256, 1024), "MLP layer")],
    "quick": [((8, 16, 14, 14), "conv stage"), ((64, 256), "MLP layer")],
}
COLUMNS = (
    "provider", "shape_per_rank", "world_size", "ms", "ms_min", "ms_max", "collective_backend", "device", "torch",
    "commit", "date",
)  # fmt: skip


# --------------------------------------------------------------------------- what one step is


def _torch_step(shape, device, sync: bool):
    layer = nn.SyncBatchNorm(shape[1]) if sync else (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(shape[1])
    layer.to(device)
    return lambda x: F.relu(layer(x)), list(layer.parameters())


def _bnfused_sync_step(shape, device, backend):
    layer = bnfused.SyncBatchNorm(shape[1], activation="relu", backend=backend, device=device)
    return layer, list(layer.parameters())


def _collectives_step(shape, device):
    num_channels = shape[1]
    stats = torch.zeros(1 + 2 * num_channels, dtype=torch.float64, device=device)
    sums = torch.zeros(2 * num_channels, device=device)

    def step(x):
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, stats)
        dist.all_reduce(sums)

    return step, []


def _providers(shape, device):
    """(name, step factory) for every row of one shape."""
    rows = [("torch-local", lambda: _torch_step(shape, device, sync=False))]
    if device.type == "cuda":
        rows.append(("torch-sync", lambda: _torch_step(shape, device, sync=True)))
    # Each implementation once, the interpreter-only Triton left out on CPU (benchmarks/providers.py).
    for name in providers.available_backends(device):
        rows.append((f"bnfused-sync[{name}]", lambda name=name: _bnfused_sync_step(shape, device, name)))
    rows.append(("collectives", lambda: _collectives_step(shape, device)))
    return rows


# --------------------------------------------------------------------------- timing, in every process


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _synchronize(x.device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(inner):
            step()
        _synchronize(x.device)
        times.append(1e3 * (time.perf_counter() - start) / inner)
    return times


def _benchmark(worker: launch.Worker, args: argparse.Namespace) -> None:
    rank, world_size, device = worker.rank, worker.world_size, worker.device
    threads = launch.cpu_threads(args.threads)
    torch.set_num_threads(threads)
    torch.manual_seed(rank)
    rows = []
    for shape, purpose in SHAPES["quick" if args.quick else "full"]:
        x = (torch.randn(shape, device=device) * 3 + 2).requires_grad_()
        dy = torch.randn(shape, device=device)
        for provider, make in _providers(shape, device):
            forward, params = make()
            times = _time_step(forward, params, x, dy, args.warmup, args.blocks, args.inner)
            # The slowest rank sets the step time of a synchronised job.
            summary = torch.tensor([statistics.median(times), min(times), max(times)], dtype=torch.float64)
            summary = summary.to(device)
            dist.all_reduce(summary, op=dist.ReduceOp.MAX)
            rows.append({
                "provider": provider, "shape_per_rank": "x".join(map(str, shape)), "purpose": purpose,
                "world_size": world_size, "ms": f"{summary[0]:.4f}", "ms_min": f"{summary[1]:.4f}",
                "ms_max": f"{summary[2]:.4f}", "collective_backend": dist.get_backend(),
            })  # fmt: skip
    if rank == 0:
        meta = report.run_metadata(device)
        for row in rows:
            row.update(meta)
        header = ("provider", "shape per rank", "", "ms / step")
        body = [(r["provider"], r["shape_per_rank"], r["purpose"], r["ms"]) for r in rows]
        print(f"{world_size} processes ({worker.local_world_size} per node) x {threads} threads, "
              f"{dist.get_backend()}; {meta['device']}; torch {meta['torch']}")  # fmt: skip
        print(report.format_table(header, body, markdown=args.markdown))
        if args.csv:
            report.write_csv(args.csv, rows, COLUMNS)
            print(f"wrote {args.csv}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, help="torch threads per process (default: CPU count / local processes)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke run)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (default 3)")
    p.add_argument("--blocks", type=int, default=15, help="timed blocks per row (default 15)")
    p.add_argument("--inner", type=int, default=5, help="steps per timed block (default 5)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows to this CSV file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    launch.add_arguments(p, default_timeout_s=300)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if min(args.warmup + 1, args.blocks, args.inner) < 1:
        raise SystemExit("--blocks and --inner must be positive, --warmup >= 0")
    launch.check_arguments(args)
    if args.quick:
        args.warmup, args.blocks, args.inner = 1, 3, 2
    # Build/load the C++ extension before any rendezvous, not while other ranks wait in a collective.
    providers.available_backends(torch.device(launch.device_type(args)))
    launch.run(__spec__.name, argv, args, _benchmark)


if __name__ == "__main__":
    main()
