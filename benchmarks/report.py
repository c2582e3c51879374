"""What every benchmark row carries (device, versions, commit, date), CSV output and printed tables."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

import bnfused

REPO_ROOT = Path(__file__).resolve().parent.parent


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo on Linux) with the vector instruction
    set ATen's CPU kernels use and the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # The vector instruction set both providers' CPU kernels were built for (AVX2, AVX512, ...).
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short commit of the checkout, with "+dirty" when the working tree has changes; "unknown" outside git."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=10"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def contention_note(device: torch.device) -> str | None:
    """A warning when other processes keep this machine's CPUs busy, which ruins multi-threaded CPU timings."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load, cores, threads = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    if threads == 1 or load <= cores:
        return None
    # A parallel region waits for its slowest thread; a thread that lost its core stalls all of them.
    return (
        f"note: load average {load:.1f} on {cores} CPUs with {threads} torch threads: other processes compete "
        "for the cores and multi-threaded timings stall; --threads 1 measures more steadily"
    )


def run_metadata(device: torch.device) -> dict[str, str]:
    """The columns that say where and when a row was measured."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": bnfused.package_version("triton"),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Writes ``rows`` (dicts; missing or None values become empty fields) with a header line."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def short_reason(exc: BaseException) -> str:
    """One line saying why a case failed: the exception type and the first line of its message."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:160]}"


def provider_label(row: dict) -> str:
    """The row's provider, with the backend that ran when the name does not say it ("bnfused+relu [cpp]")."""
    backend = row.get("backend")
    return f"{row['provider']} [{backend}]" if backend and backend not in row["provider"] else row["provider"]


def format_table(header: Sequence[str], body: Iterable[Sequence[str]], markdown: bool = False) -> str:
    """A table with a header row: aligned plain text, or GitHub Markdown."""
    body = [list(r) for r in body]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = [
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
