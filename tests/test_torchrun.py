"""The multi-process example under torchrun on CPU (gloo): one machine, two "nodes", a rank that dies.

The DDP LeNet with bnfused.SyncBatchNorm (benchmarks/distributed/ddp_lenet.py) trains on synthetic
digits; data-parallel training over a global batch of B samples must give the weights one process
gets on batches of B. Only loopback addresses are used, and every subprocess has a deadline.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the `torchrun` command runs
GLOBAL_BATCH = 16
# 73 samples: the last step's 9 are split 5 / 4 between two ranks.
LENET = [
    "-m", "benchmarks.distributed.ddp_lenet", "--device", "cpu", "--synthetic", "--limit", "73", "--threads", "1",
]  # fmt: skip
DEADLINE_S = 240
COLLECTIVE_TIMEOUT_S = 10


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def _start(command: list[str]) -> subprocess.Popen:
    # Its own process group, so that a deadline stops torchrun's workers along with the agent.
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _finish(processes: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    """Waits for every process until DEADLINE_S from now (TimeoutExpired past it); kills what is left."""
    deadline = time.monotonic() + DEADLINE_S
    done = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # leftovers of a finished job too
            process.wait()
    return done


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return _finish([_start(command)])[0]


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(program: list[str]) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents as two nodes of one process each (static rendezvous on 127.0.0.1), run to the end."""
    port = str(_free_loopback_port())
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    return _finish([_start([*TORCHRUN, *rendezvous, "--node-rank", str(node), *program]) for node in (0, 1)])


def _assert_same_weights(path: Path, expected: dict[str, torch.Tensor]) -> None:
    got = torch.load(path)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        # float32 sums over the batch split differently between processes: rounding only.
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The plain command, one process, batches of GLOBAL_BATCH: the oracle of the multi-process runs."""
    path = tmp_path_factory.mktemp("one") / "weights.pt"
    done = _run(
        [sys.executable, *LENET, "--nproc-per-node", "1", "--batch-size", str(GLOBAL_BATCH), "--save", str(path)]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"1 processes x batch {GLOBAL_BATCH} on cpu (gloo)" in done.stdout
    return torch.load(path)


def test_torchrun_standalone_two_processes(tmp_path, one_process_weights):
    path = tmp_path / "weights.pt"
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", *LENET, "--batch-size", str(GLOBAL_BATCH // 2)]
    done = _run([*command, "--save", str(path)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"2 processes x batch {GLOBAL_BATCH // 2} on cpu (gloo)" in done.stdout
    assert "running stats identical on all ranks: True" in done.stdout
    assert "test accuracy (rank 0 alone, eval mode)" in done.stdout
    _assert_same_weights(path, one_process_weights)


def test_two_nodes_on_loopback_match_one_process(tmp_path, one_process_weights):
    path = tmp_path / "weights.pt"
    nodes = _two_nodes([*LENET, "--batch-size", str(GLOBAL_BATCH // 2), "--save", str(path)])
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    assert (
        "2 processes x batch 8" in nodes[0].stdout and "running stats identical on all ranks: True" in nodes[0].stdout
    )
    assert nodes[1].stdout == ""  # rank 1 (node 1) prints nothing; only rank 0 writes the weights
    _assert_same_weights(path, one_process_weights)


DYING_RANK = """
import os, sys
import torch.distributed as dist
from benchmarks.distributed import ddp_lenet

all_reduce, calls = dist.all_reduce, []

def all_reduce_or_die(*args, **kwargs):  # SyncBatchNorm's backward collective
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        os._exit(3)  # killed mid-step: rank 0 is left waiting in this collective
    return all_reduce(*args, **kwargs)

dist.all_reduce = all_reduce_or_die
ddp_lenet.main(sys.argv[1:])
"""


def test_a_rank_that_dies_mid_step_fails_the_others_instead_of_hanging(tmp_path):
    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    start = time.monotonic()
    program = [str(script), "--device", "cpu", "--synthetic", "--limit", "80", "--threads", "1", "--batch-size", "8"]
    nodes = _two_nodes([*program, "--timeout", str(COLLECTIVE_TIMEOUT_S)])
    elapsed = time.monotonic() - start
    assert [node.returncode != 0 for node in nodes] == [True, True], [n.stderr[-2000:] for n in nodes]
    assert "exitcode  : 3" in nodes[1].stderr  # node 1's agent reports its rank's death
    assert "test accuracy" not in nodes[0].stdout  # rank 0 stopped in the step
    assert "[rank0]:" in nodes[0].stderr and "Traceback" in nodes[0].stderr  # ... by an error, not by a hang
    # Start-up costs seconds; the wait for the dead rank must not outlast the collective timeout by much.
    assert elapsed < COLLECTIVE_TIMEOUT_S + 90, elapsed


def test_bench_sync_plain_command_starts_torchrun_and_writes_csv(tmp_path):
    path = tmp_path / "sync.csv"
    done = _run([sys.executable, "-m", "benchmarks.distributed.bench_sync", "--quick", "--device", "cpu",
                 "--threads", "1", "--csv", str(path)])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (2 per node) x 1 threads, gloo" in done.stdout
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    providers = [r["provider"] for r in rows]
    assert providers[0] == "torch-local" and providers[-1] == "collectives" and "bnfused-sync[reference]" in providers
    for row in rows:
        assert row["world_size"] == "2" and row["collective_backend"] == "gloo"
        assert 0 < float(row["ms_min"]) <= float(row["ms"]) <= float(row["ms_max"])
