#!/usr/bin/env python
"""End-to-end benchmark: training throughput (samples/s) of whole models with each BatchNorm.

    python benchmarks/bench_models.py                    # CUDA if present, else CPU
    python benchmarks/bench_models.py --quick            # seconds: small models, short timings
    python benchmarks/bench_models.py --models resnet18 --batch 64 --csv benchmarks/results/models.csv

One training step (zero_grad, forward, cross-entropy, backward, SGD step) on random data, timed
like the kernel benchmark. Providers (same names as bench_kernels.py):

    torch              the model as written, with torch.nn.BatchNorm
    compile            torch.compile of that model
    scratch            the model with the from-scratch tutorial BatchNorm (benchmarks/scratch_bn.py)
    bnfused[-backend]  bnfused.convert_model(model, backend=...)
    bnfused+relu       bnfused.convert_model(model, fuse_relu=True): only models with a BatchNorm
                       directly followed by nn.ReLU in an nn.Sequential (the MLPs), others are skipped
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

import bnfused  # noqa: E402
from benchmarks import cli, models, providers, report, timing  # noqa: E402


def _resnet18(norm: str) -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10, norm_layer=lambda c: models.batch_norm(norm, c, 2))


# name -> (builder taking a norm name, input shape without the batch dim given the image size)
MODELS: dict[str, tuple[Callable[[str], nn.Module], Callable[[int], tuple[int, ...]]]] = {
    "resnet18": (_resnet18, lambda size: (3, size, size)),
    "lenet": (models.lenet, lambda size: (1, 28, 28)),
    "mlp_fashion": (models.mlp_fashion, lambda size: (1, 28, 28)),
    "mnist_bn_mlp": (models.mnist_bn_mlp, lambda size: (1, 28, 28)),
    "mnist_bn_after_relu": (models.mnist_bn_after_relu, lambda size: (1, 28, 28)),
}
NUM_CLASSES = 10
# Per device: (ResNet-18 batch, ResNet-18 image size, batch of the other models).
DEFAULTS = {"cuda": (128, 224, 256), "cpu": (16, 64, 64)}
QUICK = (2, 32, 32)
QUICK_MODELS = "lenet,mnist_bn_mlp"

COLUMNS = (
    "model", "provider", "backend", "batch", "input_shape", "dtype",
    "ms", "q20_ms", "q80_ms", "samples_per_s", "speedup_vs_torch",
    "clock", "device", "torch", "triton", "commit", "date",
)  # fmt: skip
NUMERIC_COLUMNS = ("batch", "ms", "q20_ms", "q80_ms", "samples_per_s", "speedup_vs_torch")


def default_provider_names(device: torch.device) -> list[str]:
    """torch, every available bnfused backend, bnfused+relu and scratch (compile only by name: its
    compilation of a whole model takes minutes on a small CPU)."""
    keep = []
    for name in providers.default_names(device):
        p = providers.parse(name)
        if p.base == "bnfused" or (p.base in ("torch", "scratch") and not p.relu):
            keep.append(name)
    return keep


def build_model(name: str, provider: providers.Provider, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Model ``name`` with ``provider``'s BatchNorm, on ``device`` in ``dtype``, in training mode.

    Raises ValueError when the provider does not apply (a ReLU to fuse that the model does not have).
    """
    builder = MODELS[name][0]
    if provider.relu and provider.base != "bnfused":
        raise ValueError("only bnfused fuses ReLU into a model; the others keep the model's own ReLU")
    model = builder("scratch" if provider.base == "scratch" else "torch")
    if provider.base == "bnfused":
        model = bnfused.convert_model(model, fuse_relu=provider.relu, backend=provider.backend)
        if provider.relu and not any(getattr(m, "activation", None) for m in model.modules()):
            raise ValueError("fuse_relu=True found no BatchNorm followed by nn.ReLU in an nn.Sequential")
    model = model.to(device=device, dtype=dtype).train()
    if provider.compiled:
        torch._dynamo.reset()  # a fresh cache per model: see providers.build_layer
        model = torch.compile(model)
    return model


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """One SGD-with-momentum step on the batch (x, target)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def run(model_names, provider_names, device, dtype, sizes: tuple[int, int, int], budget, log, repeat=1) -> list[dict]:
    """Measures every (model, provider) pair ``repeat`` times, round after round, and keeps the median
    of the rounds; returns CSV rows. A pair that fails is logged and skipped."""
    resnet_batch, image_size, small_batch = sizes
    metadata = {"clock": timing.clock_name(device), **report.run_metadata(device)}
    cases: dict[tuple[str, str], dict] = {}  # (model, provider) -> the row's fixed fields and its timings
    for round_index in range(repeat):
        log(f"round {round_index + 1}/{repeat}")
        for model_name in model_names:
            batch = resnet_batch if model_name == "resnet18" else small_batch
            shape = (batch, *MODELS[model_name][1](image_size))
            log(f"  {model_name} {'x'.join(map(str, shape))}")
            for name in provider_names:
                provider = providers.parse(name)
                try:
                    torch.manual_seed(0)
                    model = build_model(model_name, provider, device, dtype)
                    x = torch.randn(shape, device=device, dtype=dtype)
                    target = torch.randint(0, NUM_CLASSES, (batch,), device=device)
                    measured = timing.measure(training_step(model, x, target), device, budget)
                    backend = providers.resolved_backend(provider, device)
                except Exception as exc:  # one provider failing must not stop the others
                    log(f"    {name}: skipped ({report.short_reason(exc)})")
                    continue
                fields = {
                    "model": model_name, "provider": name, "backend": backend, "batch": batch,
                    "input_shape": "x".join(map(str, shape[1:])), "dtype": str(dtype).replace("torch.", ""),
                }  # fmt: skip
                cases.setdefault((model_name, name), {"fields": fields, "timings": []})["timings"].append(measured)
    rows = []
    for case in cases.values():
        measured = timing.median_timing(case["timings"])
        batch = case["fields"]["batch"]
        samples_per_s = f"{batch / (measured.ms * 1e-3):.6g}"
        rows.append({**case["fields"], **timing.as_columns(measured), "samples_per_s": samples_per_s, **metadata})
    report.add_speedups(rows, ("model", "batch", "dtype"))
    return rows


def results_table(rows: Sequence[dict], markdown: bool = False) -> str:
    header = ["model", "batch", "provider", "ms / step", "samples/s", "vs torch"]
    body = [
        [r["model"], str(r["batch"]), report.provider_label(r), f"{float(r['ms']):.4g}",
         f"{float(r['samples_per_s']):,.0f}", f"{float(r['speedup_vs_torch']):.2f}x" if r["speedup_vs_torch"] else "-"]
        for r in rows
    ]  # fmt: skip
    return report.format_table(header, body, markdown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    cli.add_common_arguments(
        parser,
        quick_help="seconds: small models, small batches, short timings",
        csv_help="write one row per model x provider",
    )
    parser.add_argument("--models", help=f"subset of {', '.join(MODELS)} (default: all; {QUICK_MODELS} with --quick)")
    parser.add_argument("--providers", help="default: torch, bnfused-<each available backend>, bnfused+relu, scratch")
    cpu, cuda = DEFAULTS["cpu"], DEFAULTS["cuda"]
    parser.add_argument(
        "--batch", type=int,
        help=f"batch size of every model (default: ResNet-18 {cpu[0]}, others {cpu[2]} on CPU; "
        f"{cuda[0]} and {cuda[2]} on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--image-size", type=int, help=f"ResNet-18 input height and width (default: {cpu[1]} on CPU, {cuda[1]} on CUDA)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    device = cli.setup(args)
    model_names = cli.split(args.models or (QUICK_MODELS if args.quick else ",".join(MODELS)))
    unknown = [m for m in model_names if m not in MODELS]
    if unknown or not model_names:
        raise SystemExit(f"--models: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(MODELS)}")
    names = cli.split(args.providers) if args.providers else default_provider_names(device)
    try:
        for name in names:
            providers.parse(name)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    resnet_batch, image_size, small_batch = QUICK if args.quick else DEFAULTS.get(device.type, DEFAULTS["cpu"])
    if args.batch is not None:
        resnet_batch = small_batch = args.batch
    if args.image_size is not None:
        image_size = args.image_size
    if min(resnet_batch, small_batch) < 2 or image_size < 32:
        raise SystemExit(
            "--batch must be >= 2 (BatchNorm needs 2 samples), --image-size >= 32 (ResNet downsamples 32x)"
        )
    budget = timing.QUICK if args.quick else timing.FULL
    sizes = (resnet_batch, image_size, small_batch)
    rows = run(model_names, names, device, cli.DTYPES[args.dtype], sizes, budget, cli.log, args.repeat)
    if rows:
        meta = rows[0]
        print(
            f"{meta['device']} | torch {meta['torch']} | commit {meta['commit']} | {meta['date']} | {args.dtype} "
            f"| clock {meta['clock']}"
        )
    print(results_table(rows, args.markdown))
    if args.csv:
        report.write_csv(args.csv, rows, COLUMNS)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
