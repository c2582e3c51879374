"""Data-parallel training of LeNet with ``bnfused.SyncBatchNorm``, under torchrun (NCCL on GPUs, gloo on CPUs).

    python -m benchmarks.distributed.ddp_lenet                    # torchrun --standalone, 2 processes (or 1 per GPU)
    python -m benchmarks.distributed.ddp_lenet --synthetic --epochs 2 --nproc-per-node 3
    torchrun --standalone --nproc-per-node 2 -m benchmarks.distributed.ddp_lenet --synthetic
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 4 --master-addr HOST0 --master-port 29500 \
        -m benchmarks.distributed.ddp_lenet                       # on each node, with its --node-rank

MNIST is read from ``--data-root`` (default ``../shared/data`` beside the repository, else
``./data``, torchvision layout ``<root>/MNIST/raw``); without it the run falls back to synthetic
28x28 images (a fixed random template per class plus noise) and says so.

Each step splits one global batch of ``world_size * batch_size`` samples between the ranks; the last
step of an epoch is short, so ranks get unequal (possibly empty) batches there, which SyncBatchNorm
handles. The loss is scaled so that DistributedDataParallel's gradient averaging yields the
gradient of the mean loss over the global batch. After training, rank 0 evaluates alone: eval-mode
SyncBatchNorm uses the running statistics and never communicates. ``--save PATH``: rank 0 writes
the trained model's state_dict there.

How processes start and find each other: ``benchmarks/distributed/launch.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bnfused
from benchmarks import datasets
from benchmarks.distributed import launch
from benchmarks.models import lenet

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


def _train(worker: launch.Worker, args: argparse.Namespace) -> None:
    rank, world_size, device = worker.rank, worker.world_size, worker.device
    torch.set_num_threads(launch.cpu_threads(args.threads))
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    train, test, source = load_splits(args)
    train, test = train.to(device), test.to(device)
    # Every BatchNorm -> bnfused.SyncBatchNorm.
    model = bnfused.convert_model(lenet("torch"), sync=True).to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    global_batch = world_size * args.batch_size
    order_generator = torch.Generator().manual_seed(args.seed)
    if rank == 0:
        print(f"{source}: {len(train)} train / {len(test)} test samples; {world_size} processes x "
              f"batch {args.batch_size} on {device.type} ({dist.get_backend()}); bnfused backend "
              f"{bnfused.backends.resolve(None, device)!r}", flush=True)  # fmt: skip
    for epoch in range(args.epochs):
        ddp.train()
        order = torch.randperm(len(train), generator=order_generator)  # same order on every rank
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, correct predictions, samples
        start = time.perf_counter()
        for first in range(0, len(train), global_batch):
            mine = order[first : first + global_batch][rank::world_size].to(device)  # may be short, or empty
            images, labels = train.images[mine], train.labels[mine]
            logits = ddp(images)
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
            n_global = min(global_batch, len(train) - first)
            # DDP averages gradients over ranks: scale so the result is d(mean loss over the global batch).
            optimizer.zero_grad(set_to_none=True)
            (loss_sum * (world_size / n_global)).backward()
            optimizer.step()
            with torch.no_grad():
                correct = (logits.argmax(1) == labels).sum()
                totals += torch.stack([loss_sum.double(), correct.double(), totals.new_tensor(len(mine))])
        dist.all_reduce(totals)
        seconds = time.perf_counter() - start
        identical = _running_stats_identical(model, world_size)
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {totals[0] / totals[2]:.4f}, train acc {totals[1] / totals[2]:.4f}, "
                  f"{seconds:.1f} s; running stats identical on all ranks: {identical}", flush=True)  # fmt: skip
    if rank == 0:
        print(f"test accuracy (rank 0 alone, eval mode): {_accuracy(model.eval(), test):.4f}", flush=True)
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.save)
            print(f"wrote {args.save}")


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
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128, help="samples per process and step (default 128)")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", type=Path, default=datasets.default_data_root())
    p.add_argument("--synthetic", action="store_true", help="use synthetic images even when MNIST is present")
    p.add_argument("--limit", type=int, help="use only the first N training and N test samples")
    p.add_argument("--threads", type=int, help="torch threads per process (default: CPU count / local processes)")
    p.add_argument("--save", type=Path, metavar="PATH", help="rank 0 writes the trained state_dict here")
    launch.add_arguments(p, default_timeout_s=300)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be positive")
    launch.check_arguments(args)
    # Resolve (and, for the C++ backend, build) before any rendezvous: a process that compiled while
    # the others waited in a collective would run into the collective timeout.
    bnfused.backends.resolve(None, torch.device(launch.device_type(args)))
    launch.run(__spec__.name, argv, args, _train)


if __name__ == "__main__":
    main()
