"""Command-line options shared by the benchmark scripts, and turning them into a device."""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import report

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def add_common_arguments(parser: argparse.ArgumentParser, quick_help: str, csv_help: str) -> None:
    """--device, --dtype, --threads, --repeat, --quick, --csv, --markdown."""
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="input dtype (default float32)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's default)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all cases; each result is their median")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--csv", metavar="PATH", help=csv_help)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")


def setup(args: argparse.Namespace) -> torch.device:
    """Checks the common options, applies --threads, and returns the device to run on (CUDA when
    present unless --device says otherwise)."""
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be >= 1, got {args.repeat}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    note = report.contention_note(device)
    if note:
        log(note)
    return device


def split(text: str) -> list[str]:
    """Items of a comma-separated option, stripped, empty ones dropped."""
    return [s.strip() for s in text.split(",") if s.strip()]


def log(message: str) -> None:
    """Progress and notes go to stderr, so stdout holds only the results."""
    print(message, file=sys.stderr, flush=True)
