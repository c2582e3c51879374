"""Data-parallel training of LeNet on CPU processes (gloo) with ``bnfused.SyncBatchNorm``.

    python -m benchmarks.ddp_lenet                         # 2 processes, 1 epoch of MNIST
    python -m benchmarks.ddp_lenet --synthetic --epochs 2   # no dataset needed
    python -m benchmarks.ddp_lenet --world-size 3 --limit 6000

MNIST is read from ``--data-root`` (default ``../shared/data`` beside the repository, else
``./data``, torchvision layout ``<root>/MNIST/raw``); without it the run falls back to synthetic
28x28 images (a fixed random template per class plus noise) and says so.

Each step splits one global batch of ``world_size * batch_size`` samples between the ranks; the last
step of an epoch is short, so ranks get unequal (possibly empty) batches there, which SyncBatchNorm
handles. The loss is scaled so that DistributedDataParallel's gradient averaging yields the
gradient of the mean loss over the global batch. After training, rank 0 evaluates alone: eval-mode
SyncBatchNorm uses the running statistics and never communicates.

Processes are launched with ``benchmarks.processes.run_processes`` (spawn, gloo on loopback).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bnfused
from benchmarks import datasets
from benchmarks.models import lenet
from benchmarks.processes import run_processes

NUM_CLASSES = 10


# --------------------------------------------------------------------------- data


def synthetic_split(num_samples: int, seed: int) -> datasets.Split:
    """Learnable fake digits: (N, 1, 28, 28) float32 = the label's fixed random template + noise."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(NUM_CLASSES, 1, 28, 28, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    images = templates[labels] + 0.5 * torch.randn(num_samples, 1, 28, 28, generator=generator)
    return datasets.Split(images, labels)


def load_splits(args: argparse.Namespace) -> tuple[datasets.Split, datasets.Split, str]:
    """(train, test, description): MNIST when found (and not --synthetic), else synthetic data."""
    if not args.synthetic:
        try:
            train = datasets.load("MNIST", args.data_root, train=True, limit=args.limit)
            test = datasets.load("MNIST", args.data_root, train=False, limit=args.limit)
            return train, test, f"MNIST from {args.data_root}"
        except datasets.DatasetMissingError as exc:
            print(f"{exc}\nfalling back to synthetic data")
    n_train = args.limit or 12000
    return synthetic_split(n_train, seed=0), synthetic_split(max(1, n_train // 6), seed=1), "synthetic"


# --------------------------------------------------------------------------- training, one process per rank


def _train(rank: int, world_size: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    train, test, source = load_splits(args)
    model = bnfused.convert_model(lenet("torch"), sync=True)  # every BatchNorm -> bnfused.SyncBatchNorm
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    global_batch = world_size * args.batch_size
    order_generator = torch.Generator().manual_seed(args.seed)
    if rank == 0:
        print(f"{source}: {len(train)} train / {len(test)} test samples; {world_size} processes x "
              f"batch {args.batch_size}; backend {args.backend!r}")  # fmt: skip
    for epoch in range(args.epochs):
        ddp.train()
        order = torch.randperm(len(train), generator=order_generator)  # same order on every rank
        totals = torch.zeros(3, dtype=torch.float64)  # summed loss, correct predictions, samples
        start = time.perf_counter()
        for first in range(0, len(train), global_batch):
            mine = order[first : first + global_batch][rank::world_size]  # may be short, or empty
            images, labels = train.images[mine], train.labels[mine]
            logits = ddp(images)
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
            n_global = min(global_batch, len(train) - first)
            # DDP averages gradients over ranks: scale so the result is d(mean loss over the global batch).
            optimizer.zero_grad(set_to_none=True)
            (loss_sum * (world_size / n_global)).backward()
            optimizer.step()
            with torch.no_grad():
                totals += torch.tensor([loss_sum.item(), (logits.argmax(1) == labels).sum().item(), len(mine)])
        dist.all_reduce(totals)
        seconds = time.perf_counter() - start
        identical = _running_stats_identical(model, world_size)
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {totals[0] / totals[2]:.4f}, train acc {totals[1] / totals[2]:.4f}, "
                  f"{seconds:.1f} s; running stats identical on all ranks: {identical}")  # fmt: skip
    if rank == 0:
        print(f"test accuracy (rank 0 alone, eval mode): {_accuracy(model.eval(), test):.4f}")


def _running_stats_identical(model: nn.Module, world_size: int) -> bool:
    buffers = torch.cat([b.flatten().double() for n, b in model.named_buffers() if "running" in n])
    gathered = [torch.empty_like(buffers) for _ in range(world_size)]
    dist.all_gather(gathered, buffers)
    return all(torch.equal(g, gathered[0]) for g in gathered)


@torch.no_grad()
def _accuracy(model: nn.Module, split: datasets.Split, batch_size: int = 1000) -> float:
    correct = sum(
        (model(split.images[i : i + batch_size]).argmax(1) == split.labels[i : i + batch_size]).sum().item()
        for i in range(0, len(split), batch_size)
    )
    return correct / len(split)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="number of CPU processes (default 2)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128, help="samples per process and step (default 128)")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", type=Path, default=datasets.default_data_root())
    p.add_argument("--synthetic", action="store_true", help="use synthetic images even when MNIST is present")
    p.add_argument("--limit", type=int, help="use only the first N training and N test samples")
    p.add_argument("--threads", type=int, help="torch threads per process (default: CPU count / world size)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.world_size < 1 or args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("--world-size, --epochs and --batch-size must be positive")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.world_size)
    # Resolve (and, for the C++ backend, build) here, once: a process that compiled while the others
    # waited in a collective would run into the collective timeout.
    args.backend = bnfused.backends.resolve(None, torch.device("cpu"))
    run_processes(args.world_size, _train, args, timeout_s=24 * 3600)


if __name__ == "__main__":
    main()
