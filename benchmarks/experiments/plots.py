"""PNG plots of the experiments: training loss and test (or validation) accuracy per epoch, one line per run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on these machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from benchmarks.experiments.report import PLOT_NAME  # noqa: E402

_COLORS = {"torch": "tab:blue", "bnfused": "tab:orange", "scratch": "tab:green", "none": "tab:gray"}
# Implementations that agree draw on top of each other: distinct markers keep each one visible.
_MARKERS = {"torch": ("o", 6), "bnfused": ("x", 6), "scratch": ("+", 8), "none": ("o", 3)}
_STYLES = ("-", "--", ":", "-.")


def plot(records: list[dict], experiment: str, out_dir: Path) -> Path:
    """Writes ``out_dir/experiments-<experiment>.png`` from that experiment's records (those of its
    first seed, when there are several); returns the path."""
    rows = [r for r in records if r["experiment"] == experiment]
    seed = rows[0]["seed"]
    rows = [r for r in rows if r["seed"] == seed]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    metric_name = "validation" if rows[0]["metric"] == "val_acc" else "test"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for record in rows:
        epochs = range(1, len(record["losses"]) + 1)
        marker, size = _MARKERS.get(record["bn"], ("o", 3))
        style = dict(color=_COLORS.get(record["bn"]), linestyle=_STYLES[configs.index(record["config"]) % len(_STYLES)],
                     marker=marker, markersize=size, label=f"{record['config']} / {record['bn']}")  # fmt: skip
        ax_loss.plot(epochs, record["losses"], **style)
        ax_acc.plot(epochs, record["eval_acc"], **style)
    ax_loss.set(title="training loss (mean over the epoch)", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    ax_acc.set(title=f"{metric_name} accuracy (BN in eval mode)", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=8)
    fig.suptitle(f"{experiment} (seed {seed})")
    fig.tight_layout()
    path = out_dir / PLOT_NAME.format(experiment=experiment)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
