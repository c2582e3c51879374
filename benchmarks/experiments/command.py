"""The command line of the training experiments: parse, train each experiment, write records, table and plots.

    python -m benchmarks.experiments {mlp-fashion,lenet,mnist-bn,mnist-dropout,all} \\
        [--bn {torch,bnfused,scratch,all}] [--epochs N] [--device cpu|cuda] [--seed S] \\
        [--data-root DIR] [--download] [--limit N] [--out DIR] [--threads N] [--report-only] [--quiet]

Each run appends one record per configuration and BatchNorm implementation to ``OUT/results.json``,
then rewrites ``OUT/experiments.md`` (the comparison table, latest record of each run) and
``OUT/experiments-<experiment>.png`` (loss and accuracy curves).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import datasets
from benchmarks.experiments import records as experiment_records
from benchmarks.experiments import report as experiment_report
from benchmarks.experiments.plots import plot
from benchmarks.experiments.specs import EXPERIMENTS, Experiment
from benchmarks.experiments.train import Data, bnfused_backend, run_experiment
from benchmarks.models import NORMS
from benchmarks.report import REPO_ROOT

PROG = "python -m benchmarks.experiments"

RESULTS_NAME = "results.json"
REPORT_NAME = "experiments.md"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train the classic BatchNorm experiments with torch.nn.BatchNorm, bnfused and a from-scratch "
        "BatchNorm; write results.json, a Markdown table and plots.",
    )
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--bn", choices=[*NORMS, "all"], default="all", help="BatchNorm implementation(s) (default: all)")
    p.add_argument("--epochs", type=_positive, help="epochs per run (default: the experiment's own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the data order and the validation split, the same for every "
                   "BatchNorm implementation (default: 0)")  # fmt: skip
    p.add_argument("--data-root", type=Path, default=datasets.default_data_root(),
                   help="folder holding MNIST/raw and FashionMNIST/raw (default: %(default)s)")  # fmt: skip
    p.add_argument("--download", action="store_true", help="download the datasets into --data-root if missing")
    p.add_argument("--limit", type=_positive, help="use only the first N training and N test samples")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "experiments", help="output folder")
    p.add_argument("--threads", type=_positive,
                   help="CPU threads for torch (default: torch's own). On a CPU shared with other jobs, 1 avoids "
                   "threads waiting for descheduled ones, which can make these small models 10x slower")  # fmt: skip
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild the table and plots from every record in OUT/results.json")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are off anyway when not on a TTY)")
    return p


def load_data(experiment: Experiment, args: argparse.Namespace, cache: dict) -> Data:
    """The experiment's splits on ``args.device`` (loaded once per dataset and normalisation)."""
    key = (experiment.dataset, experiment.normalize)
    if key not in cache:
        cache[key] = tuple(
            datasets.load(experiment.dataset, args.data_root, train=train, download=args.download,
                          normalize=experiment.normalize, limit=args.limit).to(torch.device(args.device))
            for train in (True, False)
        )  # fmt: skip
    train, test = cache[key]
    if experiment.val_fraction:
        # Its own generator: the same split for every run, whatever else consumed random numbers.
        train, val = datasets.random_split(train, 1 - experiment.val_fraction, torch.Generator().manual_seed(args.seed))
        return Data(train=train, eval=val, test=test)
    return Data(train=train, eval=test, test=test)


def train(args: argparse.Namespace) -> list[dict]:
    """Runs the chosen experiments, appending each one's records to OUT/results.json; returns all records there.

    Raises:
        datasets.DatasetMissingError: a dataset is not under --data-root (and --download was not given).
    """
    device = torch.device(args.device)
    norms = list(NORMS) if args.bn == "all" else [args.bn]
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    progress = not args.quiet and sys.stderr.isatty()
    command = f"{PROG} {shlex.join(args.argv)}"
    env = experiment_records.environment(device)
    cache: dict = {}
    records = experiment_records.load(args.out / RESULTS_NAME)
    for name in names:
        experiment = EXPERIMENTS[name]
        data = load_data(experiment, args, cache)
        epochs = args.epochs or experiment.epochs
        tqdm.write(f"== {name}: {experiment.title}; {len(data.train)} training samples, {epochs} epochs, "
                   f"BatchNorm {', '.join(norms)}, device {device}")  # fmt: skip
        runs = run_experiment(experiment, norms, data, epochs, args.seed, progress, tqdm.write)
        backend = bnfused_backend(device) if "bnfused" in norms else None
        date = experiment_records.now()
        new = [
            experiment_records.make_record(run, experiment, data, seed=args.seed, limit=args.limit, backend=backend,
                                           env=env, command=command, date=date)
            for run in runs
        ]  # fmt: skip
        # Saved after each experiment, so a long "all" run that dies keeps what it finished.
        records = experiment_records.append(args.out / RESULTS_NAME, new)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        records = experiment_records.load(args.out / RESULTS_NAME) if args.report_only else train(args)
    except datasets.DatasetMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: no records to report in {args.out / RESULTS_NAME}", file=sys.stderr)
        return 2
    latest = experiment_records.latest(records)
    (args.out / REPORT_NAME).write_text(experiment_report.markdown(latest))
    for name in dict.fromkeys(r["experiment"] for r in latest):
        plot(latest, name, args.out)
    tqdm.write(f"results: {args.out / RESULTS_NAME}, table: {args.out / REPORT_NAME}")
    return 0
