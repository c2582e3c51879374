"""The result records of experiment runs: what one record holds, and the results.json list they go to.

One record per run (configuration x BatchNorm implementation), a flat JSON object: the final
numbers (accuracies in percent), per-epoch curves, timing, and where it ran (device, versions, date).
"""

from __future__ import annotations

import json
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

import bnfused
from benchmarks import report
from benchmarks.experiments.specs import Experiment
from benchmarks.experiments.train import Data, Run

REQUIRED_FIELDS = ("experiment", "config", "bn", "epochs", "test_acc", "sec_per_epoch", "losses", "device", "date")


def environment(device: torch.device) -> dict:
    """Where the runs happen: device name, thread count, commit and library versions."""
    return {
        "device": str(device),
        "device_name": report.device_name(device),
        "threads": torch.get_num_threads(),
        "git_commit": report.git_commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,  # with its build tag (+cu132, +cpu), which the package metadata lacks
            **{dist: bnfused.package_version(dist) for dist in ("torchvision", "triton", "bnfused")},
        },
    }


def make_record(run: Run, experiment: Experiment, data: Data, *, seed: int, limit: int | None, backend: str | None,
                env: dict, command: str, date: str) -> dict:  # fmt: skip
    """The JSON record of one finished run. ``backend``: bnfused's concrete backend (kept for bnfused runs)."""
    times = run.history["epoch_sec"]
    return {
        "experiment": experiment.name,
        "config": run.config.name,
        "bn": run.bn,
        "backend": backend if run.bn == "bnfused" else None,
        "epochs": len(run.history["loss"]),
        "metric": experiment.metric,
        **run.final,
        # Median: one epoch slowed by another process on a shared machine should not move it.
        "sec_per_epoch": statistics.median(times),
        "sec_per_epoch_mean": statistics.fmean(times),
        "losses": run.history["loss"],
        "train_acc": run.history["train_acc"],
        "eval_acc": run.history["eval_acc"],
        "eval_loss": run.history["eval_loss"],
        "epoch_sec": times,
        "lr": run.history["lr"],
        "published": run.config.published_for(run.bn),
        "seed": seed,
        "limit": limit,
        "batch_size": experiment.batch_size,
        "n_train": len(data.train),
        "n_eval": len(data.eval),
        "n_test": len(data.test),
        **env,
        "date": date,
        "command": command,
    }


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def load(path: Path) -> list[dict]:
    """The records in ``path`` (an empty list when it does not exist yet)."""
    if not path.exists():
        return []
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path} should hold a JSON list of records, found {type(records).__name__}")
    return records


def append(path: Path, records: list[dict]) -> list[dict]:
    """Appends ``records`` to the list in ``path`` and returns the whole list."""
    everything = load(path) + records
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(everything, indent=1) + "\n")
    tmp.replace(path)  # a crash mid-write must not cost the records already there
    return everything


def latest(records: list[dict]) -> list[dict]:
    """The most recent record of each (experiment, config, bn, seed), in the order they first appeared."""
    by_key: dict[tuple, dict] = {}
    for record in records:
        key = (record["experiment"], record["config"], record["bn"], record["seed"])
        by_key[key] = record  # a dict keeps first-insertion order
    return list(by_key.values())
