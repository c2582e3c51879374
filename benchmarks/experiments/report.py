"""The Markdown report of the experiments: torch vs bnfused vs from-scratch BatchNorm vs published numbers.

Built from result records (``records.py``); accuracies in percent.
"""

from __future__ import annotations

import math
import statistics

from benchmarks.experiments.specs import EXPERIMENTS

PLOT_NAME = "experiments-{experiment}.png"
PUBLISHED_TOLERANCE = 2.0  # points: acceptance asks every configuration to land this close to the published number
_METRIC_NAMES = {"test_acc": "test acc", "val_acc": "val acc", "test_acc_train_mode": "test acc, BN in train mode"}


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _same_run(a: dict, b: dict) -> bool:
    """Same experiment, configuration and seed: records that differ at most in the BatchNorm."""
    return a["experiment"] == b["experiment"] and a["config"] == b["config"] and a["seed"] == b["seed"]


def _torch_twin(record: dict, records: list[dict]) -> dict | None:
    """The nn.BatchNorm record of the same experiment, configuration and seed, if any."""
    if record["bn"] in ("torch", "none"):
        return None
    return next((r for r in records if r["bn"] == "torch" and _same_run(r, record)), None)


def _diff(record: dict, other: dict | None, key: str) -> float | None:
    if other is None or record.get(key) is None or other.get(key) is None:
        return None
    return record[key] - other[key]


def _ratio(record: dict, other: dict | None) -> str:
    return "–" if other is None else f"{record['sec_per_epoch'] / other['sec_per_epoch']:.2f}×"


def _columns(name: str, rows: list[dict]) -> list[tuple[str, callable]]:
    """(header, cell(record, torch_twin)) for one experiment's table."""
    metric = rows[0]["metric"]
    label = _METRIC_NAMES[metric]

    def published(record, key):
        return record["published"].get(key)

    columns = [
        ("config", lambda r, t: r["config"]),
        *([("seed", lambda r, t: str(r["seed"]))] if len({r["seed"] for r in rows}) > 1 else []),
        ("BN", lambda r, t: r["bn"] + (f" ({r['backend']})" if r.get("backend") else "")),
        ("epochs", lambda r, t: str(r["epochs"])),
        (label, lambda r, t: _num(r.get(metric))),
        ("published", lambda r, t: _num(published(r, metric))),
        ("Δ published", lambda r, t: _num(_diff(r, {metric: published(r, metric)}, metric), signed=True)),
    ]
    if any("test_acc_train_mode" in r for r in rows):
        columns += [
            ("test acc, BN in train mode", lambda r, t: _num(r.get("test_acc_train_mode"))),
            ("published", lambda r, t: _num(published(r, "test_acc_train_mode"))),
        ]
    if any("first_loss" in r["published"] for r in rows):
        columns.append(("train loss, epoch 1 → last (published)", lambda r, t: (
            f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f} "
            f"({_num(published(r, 'first_loss'), 3)} → {_num(published(r, 'last_loss'), 3)})")))  # fmt: skip
    if metric != "test_acc":
        columns.append(("test acc", lambda r, t: _num(r.get("test_acc"))))
    columns += [
        (f"Δ {label} vs torch", lambda r, t: _num(_diff(r, t, metric), signed=True)),
        ("s/epoch", lambda r, t: _num(r["sec_per_epoch"])),
        ("time vs torch", lambda r, t: _ratio(r, t)),
    ]
    return columns


def _table(rows: list[dict], columns, records: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for record in rows:
        twin = _torch_twin(record, records)
        lines.append("| " + " | ".join(cell(record, twin) for _, cell in columns) + " |")
    return lines


def _summary(records: list[dict]) -> list[str]:
    """One line per BatchNorm configuration (and seed): bnfused and scratch against nn.BatchNorm."""
    seeds = len({r["seed"] for r in records}) > 1
    lines = [
        "| experiment | config |" + (" seed |" if seeds else "") + " metric | bnfused − torch (points) "
        "| bnfused time / torch | scratch − torch (points) | scratch time / torch |",
        "|---|---|" + ("---|" if seeds else "") + "---|---|---|---|---|",
    ]
    for torch_rec in (r for r in records if r["bn"] == "torch"):
        twins = {r["bn"]: r for r in records if _same_run(r, torch_rec)}
        metric = torch_rec["metric"]
        cells = []
        for bn in ("bnfused", "scratch"):
            other = twins.get(bn)
            cells += [_num(_diff(other, torch_rec, metric), signed=True) if other else "–",
                      _ratio(other, torch_rec) if other else "–"]  # fmt: skip
        head = [torch_rec["experiment"], torch_rec["config"], *([str(torch_rec["seed"])] if seeds else [])]
        lines.append("| " + " | ".join([*head, _METRIC_NAMES[metric], *cells]) + " |")
    return lines


def _over_seeds(rows: list[dict], records: list[dict]) -> list[str]:
    """Spread of the final accuracy across seeds, per configuration and BatchNorm (rows of several seeds)."""
    metric = rows[0]["metric"]
    label = _METRIC_NAMES[metric]
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in rows:
        groups.setdefault((record["config"], record["bn"]), []).append(record)
    lines = [
        f"| config | BN | seeds | {label}: mean ± std | min – max | Δ vs torch: mean (min … max) |",
        "|---|---|---|---|---|---|",
    ]
    for (config, bn), group in groups.items():
        values = [r[metric] for r in group]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        diffs = [_diff(r, _torch_twin(r, records), metric) for r in group]
        diffs = [d for d in diffs if d is not None]
        vs_torch = f"{statistics.fmean(diffs):+.2f} ({min(diffs):+.2f} … {max(diffs):+.2f})" if diffs else "–"
        lines.append(
            f"| {config} | {bn} | {', '.join(str(r['seed']) for r in group)} | {statistics.fmean(values):.2f} ± "
            f"{_num(spread)} | {min(values):.2f} – {max(values):.2f} | {vs_torch} |"
        )
    return lines


def _notes(name: str, rows: list[dict]) -> list[str]:
    experiment = EXPERIMENTS.get(name)
    notes = []
    if experiment is None:
        return notes
    for config in experiment.configs:
        if config.note:
            notes.append(f"{config.name}: {config.note}")
        if config.uses_bn and len(config.norms) < 3:
            notes.append(f"“{config.name}” runs with {' and '.join(config.norms)} only: the from-scratch "
                         "BatchNorm has no lazy variant.")  # fmt: skip
    short = sorted({r["epochs"] for r in rows if r["epochs"] < experiment.epochs})
    if short:
        notes.append(f"**Fewer epochs than specified**: {', '.join(map(str, short))} instead of {experiment.epochs}.")
    for r in rows:
        for key, want in r["published"].items():
            if key in _METRIC_NAMES and key in r and abs(r[key] - want) > PUBLISHED_TOLERANCE:
                notes.append(f"**More than {PUBLISHED_TOLERANCE:g} points from the published number**: {r['config']} / "
                             f"{r['bn']}, {_METRIC_NAMES[key]} {r[key]:.2f} vs {want:.2f}.")  # fmt: skip
    limits = sorted({r["limit"] for r in rows if r.get("limit")})
    if limits:
        notes.append(f"**Subset run**: --limit {', '.join(map(str, limits))} (first samples only); "
                     "not comparable with the published numbers.")  # fmt: skip
    return notes


def markdown(records: list[dict], notes: dict[str, list[str]] | None = None) -> str:
    """The whole report for ``records`` (one per experiment, config and bn; see ``records.latest``).

    ``notes``: extra lines per experiment name (explanations of differences from the published numbers).
    """
    notes = notes or {}
    first = records[0]
    devices = sorted({f"{r['device']} ({r['device_name']})" for r in records})
    dates = sorted(r["date"] for r in records)
    backends = sorted({r["backend"] for r in records if r.get("backend")})
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items() if v)
    lines = [
        "# BatchNorm experiments: torch.nn.BatchNorm vs bnfused vs the from-scratch BatchNorm",
        "",
        f"- Device: {'; '.join(devices)}",
        f"- Dates: {dates[0]} to {dates[-1]} (UTC)",
        f"- Versions: {versions}; bnfused backend: {', '.join(backends) or 'not used'}",
        *(f"- Command: `{c}`" for c in sorted({r["command"] for r in records})),
        f"- Git commits: {', '.join(sorted({str(r.get('git_commit')) for r in records}))} "
        "(+dirty: the working tree had uncommitted changes)",
        "",
        "Accuracies in percent after the last epoch of one run per seed. s/epoch: median wall time of a training "
        "epoch (evaluation excluded); the implementations take turns epoch by epoch in one process, so "
        "their times see the same machine load. “vs torch”: against nn.BatchNorm with the same seed, "
        "hence the same initial weights and data order.",
        "",
        "## Summary",
        "",
        *_summary(records),
    ]
    for name in dict.fromkeys(r["experiment"] for r in records):
        rows = [r for r in records if r["experiment"] == name]
        experiment = EXPERIMENTS.get(name)
        lines += ["", f"## {name}: {experiment.title if experiment else ''}", ""]
        lines += _table(rows, _columns(name, rows), records)
        if len({r["seed"] for r in rows}) > 1:
            lines += ["", "Over seeds:", "", *_over_seeds(rows, records)]
        extra = _notes(name, rows) + notes.get(name, [])
        if extra:
            lines += ["", *(f"- {n}" for n in extra)]
        lines += ["", f"![{name} curves]({PLOT_NAME.format(experiment=name)})"]
    return "\n".join(lines) + "\n"
