"""Where "auto" leaves a CUDA call to torch's own BatchNorm: the regimes a GPU run measured faster.

A drop-in must never be slower than what it replaces. On CUDA, torch's BatchNorm is cuDNN or ATen,
and bnfused's kernels beat it only in some regimes. The first GPU run (H200, torch 2.11, triton 3.6,
``benchmarks/results/h200-2026-12-04-kernels-8e8548c.csv``: ResNet-50's five BatchNorm shapes at
batch 256, 25.7M to 205.5M values, float32 and bfloat16, NCHW and channels_last) measured, as time
over torch's (GPU time: CUDA events, launch costs not included):

    triton, train step, NCHW        S = 112x112: 0.30 (fp32), 0.16 (bf16); 56x56: 0.81, 0.41;
                                    28x28: 1.18, 0.76; 14x14: 2.65, 2.02; 7x7: 3.50, 2.17
    triton, train forward, NCHW     112x112: 0.54, 0.25; 56x56: 1.08, 0.54; 28x28: 1.53, 0.76;
                                    14x14: 4.9, 3.4
    triton, train step, chan. last  1.4 to 3.5 at every shape
    triton, eval, NCHW              S >= 28x28: 0.46 to 0.91; below: 0.52 to 1.33 (mixed)
    triton, eval, channels_last     S >= 56x56: 0.45 to 0.74; 28x28: 0.78 (fp32), 1.37 (bf16)
    cuda (C++), train step, NCHW    112x112: 0.48 (fp32), 0.36 (bf16); 56x56: 1.20, 0.92;
                                    smaller: 1.34 to 1.43 (fp32), 0.93 to 1.23 (bf16)
    cuda (C++), train forward       112x112: 0.95 (fp32), 0.54 (bf16); 56x56: 1.81, 1.10
    cuda (C++), eval                0.30 to 2.04 (mixed, mostly slower)

So "auto" runs bnfused's kernels on contiguous planes that are long enough (the step's figures
when a backward will follow, the forward's when none can), and torch's ops elsewhere:
channels_last training, short planes, (N, C) inputs, float64 (which the Triton backend would hand
to the pure-PyTorch reference path), and tensors under 100M values: the smallest tensor on which
the kernels won held 102.8M, and a smaller one pays a launch cost that this GPU time leaves out.
Asking for a backend by name (``backend="triton"``, ``set_backend``) always runs it. SyncBatchNorm's
multi-process path runs its own split primitives, always the kernels: each rank would decide on its
own local batch (ranks may hold different sizes, or none), and torch.nn.SyncBatchNorm's function
exchanges other collectives than bnfused's, so ranks that chose differently would pair mismatched
collectives (found with a simulated 2-rank run); a per-rank choice of local kernels inside bnfused's
own exchange is what a GPU run would have to measure. The CPU backends are at or
past ATen everywhere measured (README), so no CPU call defers.
"""

from __future__ import annotations

import torch

MEASURED_MIN_NUMEL = 100_000_000
# Shortest plane (values per (n, c)) at which each backend's kernels were measured faster than torch's,
# by (backend, element size): training step, and training forward alone.
_STEP_MIN_PLANE = {
    ("triton", 4): 56 * 56,
    ("triton", 2): 28 * 28,
    ("cuda", 4): 112 * 112,
    ("cuda", 2): 56 * 56,
}
_TRAIN_FORWARD_MIN_PLANE = {
    ("triton", 4): 112 * 112,
    ("triton", 2): 28 * 28,
    ("cuda", 4): 112 * 112,
    ("cuda", 2): 112 * 112,
}
_EVAL_MIN_PLANE = {"triton": 28 * 28}  # NCHW planes; the C++ CUDA eval kernels lose or tie at most shapes
_EVAL_MIN_PLANE_CHANNELS_LAST = {"triton": 56 * 56}


def outside_measured(x: torch.Tensor) -> bool:
    """x lies outside every regime the GPU run measured (fewer values than any win, (N, C) inputs, a
    dtype other than 16 or 32 bits): torch's BatchNorm is taken whatever the mode. The size is read
    last: under torch.compile with dynamic shapes a read of it is a guard (a recompile at 100M values)."""
    return x.dim() < 3 or x.element_size() not in (2, 4) or x.numel() < MEASURED_MIN_NUMEL


def torch_is_faster(name: str, x: torch.Tensor, training: bool, backward: bool = True) -> bool:
    """Whether torch's own BatchNorm was measured faster than backend ``name``'s kernels for x on CUDA
    (or x lies outside what was measured); ``backward``: a backward may follow (a training call with
    grad enabled and a tensor that requires it). x is (N, C, *) with N * C > 0."""
    if outside_measured(x):
        return True
    size = x.element_size()
    plane = x.numel() // (x.shape[0] * x.shape[1])
    planes_contiguous = x.stride(-1) == 1 and x.stride(1) >= plane
    if training:
        shortest = (_STEP_MIN_PLANE if backward else _TRAIN_FORWARD_MIN_PLANE).get((name, size), 1 << 62)
        return not planes_contiguous or plane < shortest
    if planes_contiguous:
        return plane < _EVAL_MIN_PLANE.get(name, 1 << 62)
    return x.stride(1) != 1 or plane < _EVAL_MIN_PLANE_CHANNELS_LAST.get(name, 1 << 62)
