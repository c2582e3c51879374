"""Per-call cost of a layer that "auto" leaves to torch's own BatchNorm (``backends.auto_policy``).

On CUDA, "auto" runs torch's BatchNorm wherever it was measured faster than bnfused's kernels, and
a GPU layer of a small model takes microseconds: there, what a call costs on the CPU before its
launch is the difference a user sees. This times that CPU-side cost per module call, interleaved
rounds, medians, against torch's modules doing the same (BatchNorm, and BatchNorm then an
activation module for a fused one), in training and in inference.

On a CPU the deferral never happens (the C++ kernels are at or past ATen's), so the same work is
timed by hand: the decision (``_defers_to_torch``, with the backend resolved to "triton", whose
policy defers a small layer) and the forward a deferred call runs (``_deferred_forward``), without
the few checks ``forward`` makes before them (TorchScript, compile, fx, device). On CUDA the plain
module call is timed.

    python benchmarks/bench_deferred.py                 # CUDA if present, else CPU
    python benchmarks/bench_deferred.py --rounds 3 --calls 200 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bnfused
from bnfused import backends


@contextlib.contextmanager
def _deferring_on_cpu(device: torch.device):
    """On a CPU, "auto" resolves to a backend whose policy defers (what it resolves to on CUDA)."""
    if device.type == "cuda":
        yield
        return
    resolve = backends.resolve
    backends.resolve = lambda request, dev: "triton"
    try:
        yield
    finally:
        backends.resolve = resolve


def _bnfused_call(layer: torch.nn.Module, x: torch.Tensor):
    if x.is_cuda:
        return lambda: layer(x)

    def call():  # what forward runs for a deferred CUDA call
        assert layer._defers_to_torch(x, None)
        return layer._deferred_forward(x, None)

    return call


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds; each figure is their median")
    parser.add_argument("--calls", type=int, default=3000, help="calls per provider per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = torch.randn(8, 16, 8, 8, device=device, requires_grad=True)
    cases = {
        "batchnorm": (torch.nn.BatchNorm2d(16), bnfused.BatchNorm2d(16)),
        "batchnorm+hardswish": (
            torch.nn.Sequential(torch.nn.BatchNorm2d(16), torch.nn.Hardswish()),
            bnfused.BatchNorm2d(16, activation="hardswish"),
        ),
    }
    rows = []
    with _deferring_on_cpu(device):
        for mode in ("train", "eval"):
            calls = {}
            for case, (theirs, ours) in cases.items():
                theirs.to(device).train(mode == "train")
                ours.to(device).train(mode == "train")
                calls[(case, "torch")] = lambda m=theirs: m(x)
                calls[(case, "bnfused")] = _bnfused_call(ours, x)
            times = {key: [] for key in calls}
            with torch.set_grad_enabled(mode == "train"):
                for _ in range(args.rounds):
                    for key, call in calls.items():
                        for _ in range(min(100, args.calls)):
                            call()
                        start = time.perf_counter()
                        for _ in range(args.calls):
                            call()
                        times[key].append((time.perf_counter() - start) / args.calls * 1e6)
            for case in cases:
                torch_us = statistics.median(times[(case, "torch")])
                ours_us = statistics.median(times[(case, "bnfused")])
                rows.append({"case": case, "mode": mode, "torch_us": torch_us, "bnfused_us": ours_us})
    print(f"{device.type} ({args.threads} thread(s)), per call, medians of {args.rounds} rounds of {args.calls} calls")
    for r in rows:
        ratio = r["bnfused_us"] / r["torch_us"]
        print(f"{r['case']:22s} {r['mode']:5s}  torch {r['torch_us']:7.2f} us  bnfused {r['bnfused_us']:7.2f} us  "
              f"ratio {ratio:.3f}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
