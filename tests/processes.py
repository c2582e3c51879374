"""Test plumbing: a group of CPU processes joined by gloo on loopback, with a deadline around them.

The SyncBatchNorm tests run many cases in one group of spawned processes, and a broken or unpaired
collective must fail the test (timeout inside the process, or TimeoutError here) instead of hanging
it. Programs start under torchrun instead (benchmarks/distributed/launch.py; tests/test_torchrun.py).
"""

from __future__ import annotations

import datetime
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_and_run(rank: int, world_size: int, port: int, collective_timeout_s: float, fn, args) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    try:
        fn(rank, world_size, *args)
        # All ranks tear down together: a rank destroying its group while a peer still talks to it
        # made gloo abort that peer ("terminate called without an active exception", SIGABRT) once
        # in CI. Only after success: a rank that raised must not wait for partners here.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_processes(world_size: int, fn, *args, timeout_s: float = 600.0, collective_timeout_s: float = 60.0) -> None:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes that share a gloo
    process group on 127.0.0.1 (a free port chosen now). ``fn`` must be importable (module level).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a process raised (its traceback is in the message);
            a collective that waits more than ``collective_timeout_s`` raises inside its process.
        TimeoutError: not all processes finished within ``timeout_s`` (they are killed).
    """
    context = mp.spawn(
        _init_and_run,
        args=(world_size, _free_port(), collective_timeout_s, fn, args),
        nprocs=world_size,
        join=False,
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=5):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world_size} processes did not finish within {timeout_s} s (a hung collective?)")
