"""Starting a multi-process benchmark the way PyTorch jobs start: under ``torchrun``, rendezvous by ``env://``.

One machine, two processes, or N machines with P processes each (run the same command on every
node, with its own ``--node-rank``; the first node's address and a free port as the master):

    torchrun --standalone --nproc-per-node 2 -m benchmarks.distributed.ddp_lenet --synthetic
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr 10.0.0.1 --master-port 29500 \\
        -m benchmarks.distributed.ddp_lenet

Each process reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from
the environment torchrun gives it, and uses one device per local rank: ``cuda:LOCAL_RANK`` with
NCCL, or the CPU with gloo. Run as a plain ``python -m ...``, a script starts torchrun itself on
this machine (``--standalone``, ``--nproc-per-node`` processes), so one command still does it all.
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True)
class Worker:
    """This process's place in the job and the device it runs on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def under_torchrun() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process and set its rendezvous variables."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def add_arguments(parser: argparse.ArgumentParser, default_timeout_s: float) -> None:
    """--device, --nproc-per-node (the plain command's process count) and --timeout (of every collective)."""
    parser.add_argument(
        "--device", choices=tuple(BACKENDS), help="cuda (NCCL, one GPU per local rank) or cpu (gloo); "
        "default: cuda if a GPU is visible, else cpu",
    )  # fmt: skip
    parser.add_argument(
        "--nproc-per-node", type=int, help="processes to start when run without torchrun (default: the number of "
        "GPUs with --device cuda, else 2); under torchrun, torchrun's own --nproc-per-node decides",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=default_timeout_s, metavar="SECONDS",
        help="a collective waiting longer than this fails its process instead of hanging "
        f"(e.g. when another rank died; default {default_timeout_s:g})",
    )  # fmt: skip


def device_type(args: argparse.Namespace) -> str:
    """The device type the job runs on (--device, else cuda when a GPU is visible)."""
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_arguments(args: argparse.Namespace) -> None:
    """Exits with a message for a bad --nproc-per-node, --timeout or --device."""
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise SystemExit(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.timeout <= 0:
        raise SystemExit(f"--timeout must be > 0, got {args.timeout}")
    if device_type(args) == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")


def relaunch_under_torchrun(module: str, argv: Sequence[str], args: argparse.Namespace) -> None:
    """Runs ``python -m module argv`` under ``torchrun --standalone`` on this machine and waits for it.

    Raises:
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError: a process failed (torchrun
            has then stopped the others and printed which rank failed and why).
    """
    from torch.distributed import run as torchrun

    default = torch.cuda.device_count() if device_type(args) == "cuda" else 2
    nproc = args.nproc_per_node or default
    torchrun.main(["--standalone", f"--nproc-per-node={nproc}", "--module", module, *argv])


def cpu_threads(requested: int | None) -> int:
    """torch threads per process: ``requested``, else this machine's cores shared by its local ranks."""
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return requested or max(1, (os.cpu_count() or 1) // local_world_size)


def init_process_group(args: argparse.Namespace) -> Worker:
    """Joins the job torchrun started (env:// rendezvous): NCCL on ``cuda:LOCAL_RANK``, or gloo on the CPU."""
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    kind = device_type(args)
    device = torch.device("cpu")
    if kind == "cuda":
        if local_world_size > torch.cuda.device_count():
            raise SystemExit(
                f"{local_world_size} processes on this node but {torch.cuda.device_count()} CUDA device(s): "
                "NCCL needs one device per local rank (--nproc-per-node <= GPUs, or --device cpu)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        BACKENDS[kind], init_method="env://", timeout=datetime.timedelta(seconds=args.timeout)
    )  # fmt: skip
    return Worker(dist.get_rank(), dist.get_world_size(), local_rank, local_world_size, device)


def run(module: str, argv: Sequence[str], args: argparse.Namespace, job: Callable[[Worker, argparse.Namespace], None]):
    """The main of a multi-process program: under torchrun, joins the job and runs ``job(worker, args)``;
    otherwise starts ``python -m module argv`` under ``torchrun --standalone`` and waits for it.
    ``args`` must have passed ``check_arguments``."""
    if not under_torchrun():
        relaunch_under_torchrun(module, argv, args)
        return
    worker = init_process_group(args)
    try:
        job(worker, args)
    finally:
        dist.destroy_process_group()
