"""benchmarks/gpu_check.sh: its CPU dry run end to end (so that its first GPU run does not die on a typo),
and the deadline logic that keeps the real run within its budget."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import bench_kernels, gpu_check

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DRY_RUN_BUDGET_S = 200  # about 100 s on a loaded 2-core CPU


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.slow
def test_dry_run_exercises_every_step_and_prints_the_summary_last(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), "--budget", str(DRY_RUN_BUDGET_S)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=DRY_RUN_BUDGET_S + 60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    steps = [
        "install", "info", "validate", "tests", "memcheck", "kernels float32 nchw", "kernels bfloat16 channels_last",
        "kernels plot", "profile", "deferred", "models lenet nchw", "models lenet channels_last",
    ]  # fmt: skip
    for step in steps:
        assert f"\n{step} " in summary and f"\n{step} " in done.stdout, step
    assert "timeout" not in summary and "failed" not in summary and "no time left" not in summary, summary
    # The table is the last thing printed.
    assert done.stdout.rstrip().endswith(summary.strip().strip("`").rstrip().splitlines()[-1])

    assert "cpu:" in (out / "info.txt").read_text()
    assert " passed" in (out / "pytest.txt").read_text()
    header, kernels = _rows(out / "kernels.csv")
    assert header == list(bench_kernels.COLUMNS)
    assert {(r["dtype"], r["layout"]) for r in kernels} == {("float32", "nchw"), ("bfloat16", "channels_last")}
    assert (out / "kernels.png").read_bytes().startswith(PNG_MAGIC)
    _, profiled = _rows(out / "profile.csv")
    assert {r["provider"] for r in profiled} == {"torch", "bnfused"} and all(float(r["us"]) > 0 for r in profiled)
    _, models = _rows(out / "models.csv")
    assert {(r["model"], r["layout"]) for r in models} == {("lenet", "nchw"), ("lenet", "channels_last")}
    log = (out / "gpu_check.log").read_text()
    assert "pip install --dry-run --no-deps --no-build-isolation -e ." in log
    assert "bnfused" in log and "Found (speedup" in log


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    runner = gpu_check.Runner(tmp_path, time.monotonic() + 60, {})
    sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    start = time.monotonic()
    runner.run("sleep", [sys.executable, "-c", sleeper + "print('started', flush=True); time.sleep(60)"], limit_s=6)
    assert time.monotonic() - start < 20  # the grandchild does not keep the pipe open either
    assert runner.results[-1].status == "timeout"
    assert "started" in (tmp_path / "gpu_check.log").read_text()


def test_steps_past_the_budget_are_skipped_and_failures_reported(tmp_path):
    runner = gpu_check.Runner(tmp_path, time.monotonic() + gpu_check.SUMMARY_RESERVE_S + 30, {})
    runner.run("fails", [sys.executable, "-c", "raise SystemExit(3)"], limit_s=20)
    runner.deadline = time.monotonic()  # the budget is spent
    assert runner.run("late", [sys.executable, "-c", "print('never')"], limit_s=20) is None
    assert [(r.name, r.status) for r in runner.results] == [("fails", "failed (rc 3)"), ("late", "skipped")]
    table = gpu_check.summary_table(runner.results, 100, dry_run=False)
    assert "fails" in table and "no time left in the budget" in table


def test_a_test_step_where_every_test_skipped_has_failed(tmp_path):
    """A sanitizer step over GPU tests that all skipped (no GPU visible) checked nothing."""
    runner = gpu_check.Runner(tmp_path, time.monotonic() + gpu_check.SUMMARY_RESERVE_S + 60, {})
    for name, counts in (("all-skipped", "12 skipped in 0.5s"), ("ran", "3 passed, 9 skipped in 1.0s")):
        output = runner.run(name, [sys.executable, "-c", f"print('===== {counts} =====')"], limit_s=20)
        runner.require_passed_tests(output)
    assert [(r.name, r.status) for r in runner.results] == [("all-skipped", "failed (no test passed)"), ("ran", "ok")]


def test_outcome_parsers():
    assert gpu_check.pytest_outcome("..s\n==== 3 passed, 1 skipped in 2.0s ====\n") == "3 passed, 1 skipped in 2.0s"
    assert gpu_check.pytest_outcome("ssss\n4 skipped, 9 deselected in 1.2s\n") == "4 skipped, 9 deselected in 1.2s"
    # As the first H200 run printed it: the sanitizer's summary comes after pytest's.
    sanitized = "36 passed, 615 deselected in 15.95s\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check.pytest_outcome(sanitized) == "36 passed, 615 deselected in 15.95s"
    output = "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check.sanitizer_outcome(output) == "========= ERROR SUMMARY: 0 errors"
    rows = [{"provider": "bnfused", "baseline": "torch", "mode": "train", "ratio": r} for r in ("0.5", "2.0")]
    rows.append({"provider": "torch", "baseline": "torch", "mode": "train", "ratio": "1"})
    assert gpu_check.model_findings(rows) == ["bnfused train: time / torch 1.000 (geomean of 2)"]


def test_the_real_runs_test_selection_names_existing_tests():
    # pytest ignores a --deselect that matches nothing, and the dry run does not run this selection.
    deselected = gpu_check.TESTS[gpu_check.TESTS.index("--deselect") + 1]
    path, name = deselected.split("::")
    assert name in {f.__name__ for f in globals().values() if callable(f)} and path == "tests/test_gpu_check.py"
    for path in gpu_check.TESTS[:3] + gpu_check.SANITIZED_TESTS[:1]:
        assert (REPO_ROOT / path).exists(), path
