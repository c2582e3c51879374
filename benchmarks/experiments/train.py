"""Training and evaluation for the experiments, with the BatchNorm implementations interleaved.

Every run of an experiment (one per configuration and BatchNorm implementation) lives in the same
process at once and they take turns, one epoch each, in an order that rotates every epoch. On a
shared, noisy machine this keeps their times per epoch comparable: a burst of load hits all of
them, not just whichever one happened to be running.

Same seed => same initial weights and same data order for every implementation: the global seed
is set right before each model is built, data order comes from a dedicated generator per run, and
each run keeps its own global RNG state (Dropout draws from it) across the interleaving.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import bnfused
from benchmarks.datasets import Split
from benchmarks.experiments.specs import Config, Experiment

NO_BN = "none"
EVAL_BATCH_SIZE = 1000  # eval-mode BatchNorm is per sample, so the batch size only sets the speed
PROGRESS_EVERY = 50  # batches between progress-bar refreshes (each refresh reads the running sums)


@dataclass(frozen=True)
class Data:
    """The splits of one experiment: ``train``; ``eval``, scored every epoch (the test split, or the
    validation split when the experiment holds one out); ``test``, scored at the end."""

    train: Split
    eval: Split
    test: Split


@dataclass
class Run:
    """One configuration trained with one BatchNorm implementation ("none" without BatchNorm)."""

    config: Config
    bn: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    order_generator: torch.Generator
    rng_state: torch.Tensor
    cuda_rng_state: torch.Tensor | None
    history: dict[str, list[float]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.config.name if self.bn == NO_BN else f"{self.config.name} / {self.bn}"

    def log(self, key: str, value: float) -> None:
        self.history.setdefault(key, []).append(value)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)``, ``batch_size`` long. A last batch of a single sample joins
    the one before it: BatchNorm cannot train on one sample, and no sample should be dropped."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        yield slice(start, starts[i + 1] if i + 1 < len(starts) else n)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(runs: list[Run], experiment: Experiment, train: Split) -> None:
    """One untimed training step per run, on a copy of its model with a fresh optimiser, so that
    one-time costs (a backend's import or native build, first-call dispatch, allocator growth) stay
    out of the timed epochs. The runs' own models, optimisers and RNG states are left untouched."""
    rows = next(batches(len(train), experiment.batch_size))
    for run in runs:
        model = copy.deepcopy(run.model).train()
        optimizer = experiment.optimizer(list(model.parameters()))
        F.cross_entropy(model(train.images[rows]), train.labels[rows]).backward()
        optimizer.step()


def build_run(experiment: Experiment, config: Config, bn: str, seed: int, sample: torch.Tensor) -> Run:
    """Builds the model, optimiser and scheduler of one run, seeded so that every BatchNorm
    implementation starts from the same weights. ``sample``: a few inputs on the target device."""
    torch.manual_seed(seed)
    model = config.build(None if bn == NO_BN else bn).to(sample.device)
    if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules()):
        # Lazy modules take their shapes (and draw their initial weights) on the first forward. Do
        # it now, before the optimiser sees the parameters, in eval mode so no running stat moves.
        model.eval()
        with torch.no_grad():
            model(sample)
        model.train()
    optimizer = experiment.optimizer(list(model.parameters()))
    scheduler = experiment.scheduler(optimizer) if experiment.scheduler else None
    cuda_state = torch.cuda.get_rng_state(sample.device) if sample.device.type == "cuda" else None
    order_generator = torch.Generator().manual_seed(seed)
    return Run(config, bn, model, optimizer, scheduler, order_generator, torch.get_rng_state(), cuda_state)


def _swap_rng(run: Run, device: torch.device) -> None:
    """Exchanges the global RNG state with the run's own (call once before and once after its epoch)."""
    state = torch.get_rng_state()
    torch.set_rng_state(run.rng_state)
    run.rng_state = state
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device)
        torch.cuda.set_rng_state(run.cuda_rng_state, device)
        run.cuda_rng_state = cuda_state


def train_epoch(
    run: Run, train: Split, batch_size: int, shuffle: bool, progress: bool, desc: str
) -> tuple[float, float, float]:
    """One pass over ``train``. Returns (mean training loss, training accuracy in %, seconds)."""
    device = train.images.device
    model, optimizer = run.model, run.optimizer
    n = len(train)
    order = torch.randperm(n, generator=run.order_generator).to(device) if shuffle else None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress, dynamic_ncols=True)
    _swap_rng(run, device)
    model.train()
    _synchronize(device)
    start = time.perf_counter()
    for step, rows in enumerate(batches(n, batch_size)):
        if order is None:
            images, labels = train.images[rows], train.labels[rows]
        else:
            index = order[rows]
            images, labels = train.images[index], train.labels[index]
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Sums stay on the device: reading them every step would synchronise a GPU every step.
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if progress:
            bar.update(labels.shape[0])
            if step % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct.item() / seen:.2f}%")
    _synchronize(device)
    seconds = time.perf_counter() - start
    _swap_rng(run, device)
    bar.close()
    return loss_sum.item() / seen, 100 * correct.item() / seen, seconds


def evaluate(
    model: nn.Module, split: Split, batch_size: int = EVAL_BATCH_SIZE, train_mode: bool = False
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) of ``model`` on ``split``.

    ``train_mode``: BatchNorm normalises each batch with its own statistics (and updates the running
    statistics, so pass a copy of a model you still need).
    """
    model.train(train_mode)
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for rows in batches(len(split), batch_size):
            logits = model(split.images[rows])
            loss_sum += F.cross_entropy(logits, split.labels[rows], reduction="sum").item()
            correct += (logits.argmax(1) == split.labels[rows]).sum().item()
    model.train()
    return loss_sum / len(split), 100 * correct / len(split)


def run_experiment(
    experiment: Experiment,
    norms: list[str],
    data: Data,
    epochs: int,
    seed: int,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> list[Run]:
    """Trains every configuration of ``experiment`` with every BatchNorm implementation in ``norms``
    (configurations without BatchNorm once), interleaved by epoch. Returns the finished runs, with
    per-epoch ``history`` (loss, train_acc, eval_loss, eval_acc, epoch_sec, lr) and ``final`` numbers."""
    sample = data.train.images[:2]
    runs = [
        build_run(experiment, config, bn, seed, sample)
        for config in experiment.configs
        for bn in ([n for n in norms if n in config.norms] if config.uses_bn else [NO_BN])
    ]
    warm_up(runs, experiment, data.train)
    eval_name = "val" if experiment.val_fraction else "test"
    for epoch in range(epochs):
        shift = epoch % len(runs)
        for run in runs[shift:] + runs[:shift]:
            desc = f"{experiment.name} | {run.label} | epoch {epoch + 1}/{epochs}"
            lr = run.optimizer.param_groups[0]["lr"]
            loss, acc, seconds = train_epoch(run, data.train, experiment.batch_size, experiment.shuffle, progress, desc)
            eval_loss, eval_acc = evaluate(run.model, data.eval)
            if run.scheduler is not None:
                run.scheduler.step(eval_loss)
            for key, value in (("loss", loss), ("train_acc", acc), ("eval_loss", eval_loss), ("eval_acc", eval_acc),
                               ("epoch_sec", seconds), ("lr", lr)):  # fmt: skip
                run.log(key, value)
            log(f"{desc}: loss {loss:.4f}, train acc {acc:.2f}%, {eval_name} acc {eval_acc:.2f}%, {seconds:.2f} s")
    for run in runs:
        _finish(run, experiment, data)
    return runs


def _finish(run: Run, experiment: Experiment, data: Data) -> None:
    """Final numbers: test accuracy in eval mode, and for ``eval_train_mode`` with test-batch statistics."""
    if experiment.val_fraction:
        run.final["val_acc"] = run.history["eval_acc"][-1]
        run.final["test_acc"] = evaluate(run.model, data.test)[1]
    else:
        run.final["test_acc"] = run.history["eval_acc"][-1]
    if experiment.eval_train_mode and run.bn != NO_BN:
        # A copy: train-mode evaluation moves the running statistics the eval-mode number relies on.
        probe = copy.deepcopy(run.model)
        run.final["test_acc_train_mode"] = evaluate(probe, data.test, experiment.batch_size, train_mode=True)[1]


def bnfused_backend(device: torch.device) -> str:
    """The concrete backend bnfused's modules use on ``device`` (the default, usually "auto", resolved)."""
    return bnfused.backends.resolve(None, device)
