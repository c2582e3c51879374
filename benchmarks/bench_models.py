#!/usr/bin/env python
"""Whole-model benchmark: what a user who swaps in bnfused runs, eager and compiled, train and inference.

    python benchmarks/bench_models.py                    # every model, layout and mode; CUDA if present, else CPU
    python benchmarks/bench_models.py --quick            # seconds: the small models, short timings
    python benchmarks/bench_models.py --models resnet18,mobilenet_v3_small --modes eval --layouts channels_last
    python benchmarks/bench_models.py --models more      # DenseNet, ResNeXt, RegNet, ShuffleNet, VGG, a video net

Each model is timed as written (torch.nn.BatchNorm) and as converted with
``bnfused.convert_model(model, fuse=True)`` (the fusion pass: BN -> add -> act into one layer),
eagerly and under ``torch.compile``, on random data. Providers:

    torch                       the model as written
    compile                     torch.compile of that model
    bnfused[-backend]           bnfused.convert_model(model, fuse=True[, backend=...])
    bnfused[-backend]+inplace   the same with memory="inplace" (layers keep their output, not their input)
    bnfused[-backend]+compile   torch.compile of the converted model (bnfused's default compile mode)
    bnfused[-backend]+compile-kernels, ...+compile-decompose
                                the same in that compile mode (``bnfused.set_compile_mode``): how the
                                choice of default was measured
    scratch                     every BatchNorm swapped for the from-scratch tutorial BatchNorm
    torch-again, compile-again  a second, separately built copy of the model as written (compiled): its
                                ratio to torch (compile) is the run's noise floor, what an identical
                                model reads against itself

Modes: ``train`` (zero_grad, forward, cross-entropy, backward, SGD step) and ``eval`` (the model in
eval mode under ``torch.no_grad()``, forward only). Layouts: ``nchw`` and ``channels_last`` (model
and input; the MLPs take flattened images, so they run in nchw only).

Train rows of eager providers also give ``saved_mb``: the bytes one forward keeps for backward
(saved-tensor hooks, once per storage, parameters left out); every row gives ``peak_mb``, the peak
memory allocated by one step above what was allocated before it (CUDA: the allocator's statistic;
CPU: torch's profiler's allocation events, summed in time order).

Every row has ``ratio``: its time over its baseline's, where the baseline is ``compile`` for compiled
providers and ``torch`` for the others (below 1: faster). The providers of one (model, layout, mode)
are timed in turn, round after round (``--repeat``; every other round in reverse order), and the
ratio is the median of the per-round ratios, so that a burst of load on a shared machine hits the
provider and its baseline alike.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

import bnfused  # noqa: E402
from benchmarks import cli, memory, models, providers, report, timing  # noqa: E402

NUM_CLASSES = 10


@dataclass(frozen=True)
class Model:
    """A benchmark model: its builder (with torch.nn.BatchNorm), and the input shape without the batch dim."""

    build: Callable[[], nn.Module]
    input_shape: Callable[[int], tuple[int, ...]]  # image size -> (C, H, W)
    large: bool  # a torchvision network (batch and image size from --batch / --image-size)
    convolutional: bool  # takes images as images (so channels_last applies)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)


def _image(size: int) -> tuple[int, ...]:
    return (3, size, size)


def _digit(size: int) -> tuple[int, ...]:
    return (1, 28, 28)


def _clip(size: int) -> tuple[int, ...]:
    return (3, VIDEO_FRAMES, size, size)


MODELS: dict[str, Model] = {
    "resnet18": Model(_torchvision("resnet18"), _image, large=True, convolutional=True),
    "resnet50": Model(_torchvision("resnet50"), _image, large=True, convolutional=True),
    # ResNet-50 with nn.LeakyReLU(0.01) for every ReLU: the model of in-place activated BatchNorm.
    "resnet50_leaky": Model(
        lambda: models.with_leaky_relu(_torchvision("resnet50")()), _image, large=True, convolutional=True
    ),
    "mobilenet_v3_small": Model(_torchvision("mobilenet_v3_small"), _image, large=True, convolutional=True),
    "efficientnet_b0": Model(_torchvision("efficientnet_b0"), _image, large=True, convolutional=True),
    "lenet": Model(lambda: models.lenet("torch"), _digit, large=False, convolutional=True),
    "mlp_fashion": Model(lambda: models.mlp_fashion("torch"), _digit, large=False, convolutional=False),
    "mnist_bn_mlp": Model(lambda: models.mnist_bn_mlp("torch"), _digit, large=False, convolutional=False),
    "mnist_bn_after_relu": Model(lambda: models.mnist_bn_after_relu("torch"), _digit, large=False, convolutional=False),
}
# More torchvision networks, each with its own BatchNorm placement (pre-activation in DenseNet,
# grouped convolutions in ResNeXt and RegNet, channel shuffles, BatchNorm3d in a video network);
# timed when named, or all at once with --models more.
MORE_MODELS: dict[str, Model] = {
    name: Model(_torchvision(name), _image, large=True, convolutional=True)
    for name in ("mobilenet_v2", "densenet121", "shufflenet_v2_x1_0", "regnet_y_400mf", "resnext50_32x4d", "vgg11_bn")
}
MORE_MODELS["r3d_18"] = Model(
    lambda: torchvision.models.video.r3d_18(weights=None, num_classes=NUM_CLASSES),
    _clip,
    large=True,
    convolutional=True,
)
MODEL_SETS = {"all": list(MODELS), "more": list(MORE_MODELS)}
MODELS.update(MORE_MODELS)
MODES = ("train", "eval")
LAYOUTS = ("nchw", "channels_last")
BASES = ("torch", "scratch", "bnfused")
COMPILE_SUFFIX = "+compile"
INPLACE_SUFFIX = "+inplace"
# Per device: (batch of the torchvision models, their image size, batch of the small models).
DEFAULTS = {"cuda": (128, 224, 256), "cpu": (16, 112, 64)}
QUICK = (2, 32, 16)
QUICK_MODELS = "lenet,mnist_bn_mlp"
VIDEO_FRAMES = 8  # frames of the video network's clips

COLUMNS = (
    "model", "mode", "layout", "provider", "backend", "baseline", "batch", "input_shape", "dtype",
    "ms", "q20_ms", "q80_ms", "samples_per_s", "ratio", "saved_mb", "peak_mb",
    "clock", "device", "torch", "triton", "commit", "date",
)  # fmt: skip
NUMERIC_COLUMNS = ("batch", "ms", "q20_ms", "q80_ms", "samples_per_s", "ratio")


@dataclass(frozen=True)
class Provider:
    """A parsed provider name: ``torch`` | ``scratch`` | ``bnfused[-backend]``, optionally ``+compile``
    (``compile`` is ``torch+compile``)."""

    name: str
    base: str
    backend: str | None  # the bnfused backend request; None outside bnfused
    compiled: bool
    compile_mode: str | None = None  # bnfused's compile mode; None: its default
    inplace: bool = False  # memory="inplace"

    @property
    def baseline(self) -> str:
        return "compile" if self.compiled else "torch"


def parse_provider(name: str) -> Provider:
    text = name.strip().lower()
    if text in ("compile", "compile-again", "torch-again"):
        return Provider(text, "torch", None, text.startswith("compile"))
    compile_mode = None
    for mode in bnfused.torch_ops.COMPILE_MODES:
        if text.endswith(f"{COMPILE_SUFFIX}-{mode}"):
            text, compile_mode = text[: -len(mode) - 1], mode
    compiled = text.endswith(COMPILE_SUFFIX)
    base = text[: -len(COMPILE_SUFFIX)] if compiled else text
    inplace = base.endswith(INPLACE_SUFFIX)
    base = base[: -len(INPLACE_SUFFIX)] if inplace else base
    base, backend = providers.split_backend(base, name)
    if base not in BASES or (base == "torch" and compiled) or ((compile_mode or inplace) and base != "bnfused"):
        raise ValueError(
            f"unknown provider {name!r}: expected torch, compile, scratch, torch-again, compile-again, "
            "bnfused[-<backend>][+inplace] or bnfused[-<backend>][+inplace]+compile[-kernels|-decompose]"
        )
    return Provider(name.strip().lower(), base, backend, compiled, compile_mode, inplace)


DEFAULT_PROVIDERS = "torch,compile,bnfused,bnfused+compile,scratch"


def channels_last_format(name: str) -> torch.memory_format:
    """Channels innermost for the model's input: channels_last, or channels_last_3d for clips."""
    return torch.channels_last_3d if len(MODELS[name].input_shape(32)) == 4 else torch.channels_last


def build_model(name: str, provider: Provider, device: torch.device, dtype: torch.dtype, layout: str, mode: str):
    """Model ``name`` with ``provider``'s BatchNorm, on ``device`` in ``dtype``, ``layout`` and ``mode``."""
    model = MODELS[name].build()
    if provider.base == "bnfused":
        memory = "inplace" if provider.inplace else "default"
        model = bnfused.convert_model(model, fuse=True, backend=provider.backend, memory=memory)
    elif provider.base == "scratch":
        model = models.to_scratch(model)
    model = model.to(device=device, dtype=dtype).train(mode == "train")
    if layout == "channels_last":
        model = model.to(memory_format=channels_last_format(name))
    if provider.compiled:
        model = torch.compile(model)
    return model


def step_function(model: nn.Module, x: torch.Tensor, target: torch.Tensor, mode: str) -> Callable[[], None]:
    """One SGD-with-momentum training step, or one inference forward."""
    if mode == "eval":

        def infer() -> None:
            with torch.no_grad():
                model(x)

        return infer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return train


def in_compile_mode(step: Callable[[], None], compile_mode: str | None) -> Callable[[], None]:
    """``step`` run with bnfused's compile mode set: Dynamo guards on it, so a compiled model must see
    the mode it was compiled in at every call, or it would be recompiled in the other."""
    if compile_mode is None:
        return step

    def call() -> None:
        bnfused.set_compile_mode(compile_mode)
        try:
            step()
        finally:
            bnfused.set_compile_mode(None)  # the benchmark sets no mode of its own otherwise

    return call


def _cases(model_names, modes, layouts):
    for model_name in model_names:
        for layout in layouts:
            if layout == "channels_last" and not MODELS[model_name].convolutional:
                continue
            for mode in modes:
                yield model_name, layout, mode


def run(model_names, provider_names, modes, layouts, device, dtype, sizes, budget, log, repeat=1) -> list[dict]:
    """Times every provider on every (model, layout, mode), interleaved round by round; returns CSV rows.

    A provider that fails to build or run is logged and left out; its baseline's row stays.
    """
    large_batch, image_size, small_batch = sizes
    metadata = {"clock": timing.clock_name(device), **report.run_metadata(device)}
    parsed = [parse_provider(n) for n in provider_names]
    rows = []
    for model_name, layout, mode in _cases(model_names, modes, layouts):
        spec = MODELS[model_name]
        batch = large_batch if spec.large else small_batch
        shape = (batch, *spec.input_shape(image_size))
        log(f"{model_name} {'x'.join(map(str, shape))} {layout} {mode}")
        torch.manual_seed(0)
        x = torch.randn(shape, device=device, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=channels_last_format(model_name))
        target = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        steps: dict[str, Callable[[], None]] = {}
        memory_columns: dict[str, dict[str, str | None]] = {}
        # Dynamo caches compiled code per code object, at most recompile_limit (8) entries each; past
        # that, a model whose forward is code already seen (every nn.Sequential shares one) silently
        # runs eagerly. Each case starts from an empty cache; its compiled models are all timed before
        # the next case resets it.
        torch._dynamo.reset()
        for provider in parsed:
            try:
                torch.manual_seed(0)
                model = build_model(model_name, provider, device, dtype, layout, mode)
                step = in_compile_mode(step_function(model, x, target, mode), provider.compile_mode)
                step()  # builds the extension, compiles: not part of any timing
                steps[provider.name] = step
                memory_columns[provider.name] = _memory_columns(model, x, step, provider, mode, device)
            except Exception as exc:  # one provider failing must not stop the others
                log(f"  {provider.name}: skipped ({report.short_reason(exc)})")
        timings: dict[str, list[timing.Timing]] = {name: [] for name in steps}
        order = list(steps.items())
        for round_ in range(repeat):
            # Every other round in reverse, so that no provider always runs first (after a model's
            # warm-up, or right behind another provider's allocations) in the pairs a ratio compares.
            for name, step in order if round_ % 2 == 0 else order[::-1]:
                timings[name].append(timing.measure(step, device, budget))
        for provider in parsed:
            if provider.name not in steps:
                continue
            measured = timing.median_timing(timings[provider.name])
            baseline = timings.get(provider.baseline)
            ratio = None
            if baseline is not None:
                ratio = statistics.median(t.ms / b.ms for t, b in zip(timings[provider.name], baseline))
            rows.append({
                "model": model_name, "mode": mode, "layout": layout, "provider": provider.name,
                "backend": bnfused.backends.resolve(provider.backend, device) if provider.backend else "",
                "baseline": provider.baseline, "batch": batch, "input_shape": "x".join(map(str, shape[1:])),
                "dtype": str(dtype).replace("torch.", ""), **timing.as_columns(measured),
                "samples_per_s": f"{batch / (measured.ms * 1e-3):.6g}",
                "ratio": None if ratio is None else f"{ratio:.4g}", **memory_columns[provider.name], **metadata,
            })  # fmt: skip
            log(f"  {provider.name:<22} {measured.ms:9.4g} ms" + (f"  ratio {ratio:.3f}" if ratio else ""))
    return rows


def _memory_columns(model, x, step, provider: Provider, mode: str, device: torch.device) -> dict[str, str | None]:
    """saved_mb (train mode, eager: saved-tensor hooks do not see inside compiled graphs) and peak_mb."""
    saved = memory.saved_bytes(model, x) if mode == "train" and not provider.compiled else None
    peak = memory.peak_memory_bytes(step, device)
    return {
        "saved_mb": None if saved is None else f"{saved / 2**20:.4g}",
        "peak_mb": None if peak is None else f"{peak / 2**20:.4g}",
    }


def results_table(rows: Sequence[dict], markdown: bool = False) -> str:
    header = ["model", "mode", "layout", "batch", "provider", "ms", "samples/s", "ratio (vs baseline)"]
    header += ["saved MiB", "peak MiB"]
    body = [
        [r["model"], r["mode"], r["layout"], str(r["batch"]), report.provider_label(r), f"{float(r['ms']):.4g}",
         f"{float(r['samples_per_s']):,.0f}",
         f"{float(r['ratio']):.3f} (vs {r['baseline']})" if r["ratio"] and r["provider"] != r["baseline"] else "-",
         r["saved_mb"] or "-", r["peak_mb"] or "-"]
        for r in rows
    ]  # fmt: skip
    return report.format_table(header, body, markdown)


def summary(rows: Sequence[dict]) -> str:
    """One line per (provider, mode): geometric mean and worst of its ratios over the models and layouts."""
    groups: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for r in rows:
        if r["ratio"] and r["provider"] != r["baseline"]:
            where = f"{r['model']} {r['layout']}"
            groups.setdefault((r["provider"], r["mode"]), []).append((float(r["ratio"]), where))
    lines = []
    for (provider, mode), ratios in groups.items():
        geomean = math.exp(statistics.fmean(math.log(v) for v, _ in ratios))
        worst, where = max(ratios)
        lines.append(
            f"{provider} {mode}: time ratio geometric mean {geomean:.3f} over {len(ratios)} configurations, "
            f"worst {worst:.3f} ({where})"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    cli.add_common_arguments(
        parser, quick_help="seconds: small models, small batches, short timings", csv_help="write one row per case"
    )
    parser.add_argument(
        "--models",
        help=f"comma-separated names or sets: all ({', '.join(MODEL_SETS['all'])}; the default, {QUICK_MODELS} with "
        f"--quick), more ({', '.join(MODEL_SETS['more'])})",
    )
    parser.add_argument("--providers", help=f"comma-separated (default: {DEFAULT_PROVIDERS})")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {', '.join(MODES)} (default: both)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"subset of {', '.join(LAYOUTS)} (default: both)")
    cpu, cuda = DEFAULTS["cpu"], DEFAULTS["cuda"]
    parser.add_argument(
        "--batch", type=int,
        help=f"batch size of every model (default: torchvision models {cpu[0]}, others {cpu[2]} on CPU; "
        f"{cuda[0]} and {cuda[2]} on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--image-size", type=int, help=f"torchvision models' input size (default: {cpu[1]} on CPU, {cuda[1]} on CUDA)"
    )
    return parser


def _choose(text: str, allowed: Sequence[str], option: str, sets: dict[str, list[str]] | None = None) -> list[str]:
    chosen = []
    for item in cli.split(text):
        chosen += (sets or {}).get(item, [item])
    chosen = list(dict.fromkeys(chosen))
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{option}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    device = cli.setup(args)
    model_names = _choose(args.models or (QUICK_MODELS if args.quick else "all"), list(MODELS), "--models", MODEL_SETS)
    modes = _choose(args.modes, MODES, "--modes")
    layouts = _choose(args.layouts, LAYOUTS, "--layouts")
    names = cli.split(args.providers or DEFAULT_PROVIDERS)
    try:
        for name in names:
            parse_provider(name)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    large_batch, image_size, small_batch = QUICK if args.quick else DEFAULTS.get(device.type, DEFAULTS["cpu"])
    if args.batch is not None:
        large_batch = small_batch = args.batch
    if args.image_size is not None:
        image_size = args.image_size
    if min(large_batch, small_batch) < 2 or image_size < 32:
        raise SystemExit(
            "--batch must be >= 2 (BatchNorm needs 2 samples), --image-size >= 32 (the nets downsample 32x)"
        )
    budget = timing.QUICK if args.quick else timing.FULL
    sizes = (large_batch, image_size, small_batch)
    dtype = cli.DTYPES[args.dtype]
    rows = run(model_names, names, modes, layouts, device, dtype, sizes, budget, cli.log, args.repeat)
    if rows:
        meta = rows[0]
        print(
            f"{meta['device']} | torch {meta['torch']} | commit {meta['commit']} | {meta['date']} | {args.dtype} "
            f"| clock {meta['clock']} | ratio = time / baseline's time, median of {args.repeat} interleaved rounds"
        )
    print(results_table(rows, args.markdown))
    print(summary(rows))
    if args.csv:
        report.write_csv(args.csv, rows, COLUMNS)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
