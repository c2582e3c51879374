"""The training experiments (python -m benchmarks.experiments) end to end, on tiny datasets in the real IDX format."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.datasets import RAW_FILES
from benchmarks.experiments import command as experiments
from benchmarks.experiments.records import REQUIRED_FIELDS
from benchmarks.experiments.specs import EXPERIMENTS
from benchmarks.experiments.train import NO_BN, build_run

REPO_ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST = 64, 32  # one batch of 64: the first epoch's loss is measured before any update
IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801  # IDX magic numbers: unsigned bytes, 3 and 1 dimensions
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Runs per experiment with --bn all: BN configurations once per implementation they support, others once.
EXPECTED_RUNS = {
    name: sum(len(c.norms) if c.uses_bn else 1 for c in experiment.configs) for name, experiment in EXPERIMENTS.items()
}


def _write_idx(path: Path, magic: int, data: torch.Tensor) -> None:
    """The big-endian IDX format of the original MNIST files: magic, one int32 per dimension, then bytes."""
    header = struct.pack(f">{1 + data.dim()}i", magic, *data.shape)
    path.write_bytes(header + data.to(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generator = torch.Generator().manual_seed(1)
    for dataset in ("MNIST", "FashionMNIST"):
        raw = root / dataset / "raw"
        raw.mkdir(parents=True)
        for prefix, count in (("train", N_TRAIN), ("t10k", N_TEST)):
            labels = torch.arange(count) % 10
            # Class-dependent images, so the models have something to learn from.
            images = torch.randint(0, 100, (count, 28, 28), generator=generator) + 15 * labels.view(-1, 1, 1)
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", IDX_IMAGES, images)
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", IDX_LABELS, labels)
    return root


def _run(name: str, data_root: Path, out: Path, *extra: str) -> list[dict]:
    argv = [name, "--epochs", "1", "--data-root", str(data_root), "--out", str(out), "--quiet", *extra]
    assert experiments.main(argv) == 0
    return json.loads((out / experiments.RESULTS_NAME).read_text())


def _assert_accuracy(value) -> None:
    assert isinstance(value, float) and 0.0 <= value <= 100.0, value


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_runs_end_to_end(name, data_root, tmp_path):
    records = _run(name, data_root, tmp_path)
    experiment = EXPERIMENTS[name]
    assert len(records) == EXPECTED_RUNS[name]
    for record in records:
        for key in REQUIRED_FIELDS:
            assert key in record, f"{key} missing from {record['config']} / {record['bn']}"
        assert record["experiment"] == name and record["epochs"] == 1 and record["device"] == "cpu"
        for key in ("losses", "train_acc", "eval_acc", "epoch_sec"):
            assert len(record[key]) == 1 and all(math.isfinite(v) for v in record[key]), key
        assert record["sec_per_epoch"] > 0 and math.isfinite(record["sec_per_epoch"])
        for key in ("test_acc", "train_acc", "eval_acc", "val_acc", "test_acc_train_mode"):
            values = record.get(key, [])  # per-epoch lists, final numbers, or absent for this experiment
            for value in values if isinstance(values, list) else [values]:
                _assert_accuracy(value)
        assert (record["backend"] is not None) == (record["bn"] == "bnfused")
        assert set(record["published"]) >= {experiment.metric}
        assert record["versions"]["torch"] == torch.__version__ and record["seed"] == 0
    if experiment.val_fraction:
        assert {(r["n_train"], r["n_eval"], r["n_test"]) for r in records} == {(45, 19, N_TEST)}
        assert all("val_acc" in r for r in records)
    if experiment.eval_train_mode:
        assert all(("test_acc_train_mode" in r) == (r["bn"] != NO_BN) for r in records)

    # Same initial weights and the same first batch: BN implementations agree on the first loss.
    for config in {r["config"] for r in records if r["bn"] != NO_BN}:
        losses = {r["bn"]: r["losses"][0] for r in records if r["config"] == config}
        for bn, loss in losses.items():
            assert loss == pytest.approx(losses["torch"], rel=1e-4), f"{config}: {bn} vs torch"

    report = (tmp_path / experiments.REPORT_NAME).read_text()
    assert f"## {name}:" in report and "| config | BN | epochs |" in report
    row_starts = tuple(f"| {c.name} |" for c in experiment.configs)
    table_rows = [line for line in report.splitlines() if line.startswith(row_starts)]
    assert len(table_rows) == len(records)
    png = tmp_path / f"experiments-{name}.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000


def test_records_accumulate_and_report_keeps_latest_per_seed(data_root, tmp_path):
    _run("mnist-dropout", data_root, tmp_path, "--bn", "torch")
    records = _run("mnist-dropout", data_root, tmp_path, "--bn", "torch", "--limit", "40")
    assert len(records) == 4 and records[-1]["limit"] == 40 and records[-1]["n_train"] + records[-1]["n_eval"] == 40
    report = (tmp_path / experiments.REPORT_NAME).read_text()
    assert report.count("| BN after ReLU | torch |") == 1 and "--limit 40" in report  # the rerun replaced the first

    records = _run("mnist-dropout", data_root, tmp_path, "--bn", "torch", "--seed", "3")
    assert [r["seed"] for r in records] == [0, 0, 0, 0, 3, 3]
    report = (tmp_path / experiments.REPORT_NAME).read_text()
    assert "| BN after ReLU | 0 | torch |" in report and "| BN after ReLU | 3 | torch |" in report
    assert "Over seeds:" in report and "| BN after ReLU | torch | 0, 3 |" in report

    (tmp_path / experiments.REPORT_NAME).unlink()
    assert experiments.main(["all", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / experiments.REPORT_NAME).read_text() == report
    assert len(json.loads((tmp_path / experiments.RESULTS_NAME).read_text())) == 6  # nothing trained, nothing added
    assert experiments.main(["all", "--report-only", "--out", str(tmp_path / "empty")]) == 2


def test_missing_dataset_names_the_folder_and_download(tmp_path):
    empty = tmp_path / "nowhere"
    # The README's command, as a subprocess from the repository root.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.experiments", "mnist-bn", "--data-root", str(empty),
         "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert str(empty.resolve() / "MNIST" / "raw") in result.stderr
    assert "--download" in result.stderr and RAW_FILES[0] in result.stderr
    assert not (tmp_path / "out" / experiments.RESULTS_NAME).exists()


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_same_seed_gives_identical_initial_weights_and_data_order(name):
    experiment = EXPERIMENTS[name]
    sample = torch.rand(2, 1, 28, 28)
    for config in (c for c in experiment.configs if c.uses_bn):
        runs = {bn: build_run(experiment, config, bn, 7, sample) for bn in config.norms}
        reference = runs["torch"]
        orders = {bn: torch.randperm(100, generator=run.order_generator) for bn, run in runs.items()}
        for bn, run in runs.items():
            params = list(run.model.parameters())
            assert len(params) == len(list(reference.model.parameters()))
            for got, want in zip(params, reference.model.parameters()):
                assert got.shape == want.shape and torch.equal(got, want), f"{config.name}: {bn} differs from torch"
            assert torch.equal(orders[bn], orders["torch"])
            assert torch.equal(run.rng_state, reference.rng_state)
        # A different seed must give different weights, or the check above proves nothing.
        other = build_run(experiment, config, "torch", 8, sample)
        assert not torch.equal(next(other.model.parameters()), next(reference.model.parameters()))
