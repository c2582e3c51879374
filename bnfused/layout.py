"""Memory layouts the kernels accept, and the (N, C, S) view they index with.

Kernels see a tensor as N x C x S (S = product of the spatial dims) with three strides. That view
exists without a copy for contiguous tensors, channels_last / channels_last_3d, and an (N, L, C)
tensor transposed to (N, C, L) — the layouts models produce. Anything else is copied once.
"""

from __future__ import annotations

import torch


def spatial_stride(x: torch.Tensor) -> int | None:
    """Stride between consecutive flattened spatial positions, or None when the dims don't collapse."""
    stride = expected = None
    for d in range(x.dim() - 1, 1, -1):
        size = x.shape[d]
        if size == 1:
            continue  # a size-1 dim's stride is arbitrary and never used
        if stride is None:
            stride, expected = x.stride(d), x.stride(d) * size
        elif x.stride(d) != expected:
            return None
        else:
            expected *= size
    return 1 if stride is None else stride


def _is_dense(x: torch.Tensor) -> bool:
    """True when x's elements fill its storage span exactly (no gaps, no overlap)."""
    dims = sorted((x.stride(d), x.shape[d]) for d in range(x.dim()) if x.shape[d] != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """x itself when kernels can index it as (N, C, S) in place, else a contiguous copy."""
    if x.is_contiguous():
        return x
    if _is_dense(x) and spatial_stride(x) is not None:
        return x
    return x.contiguous()


def ncs(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(N, C, S, stride_n, stride_c, stride_s) of a kernel-ready tensor."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c) if n * c else 0
    return n, c, s, x.stride(0), x.stride(1), spatial_stride(x)


def like(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t with x's strides (copied only when they differ), so kernels can index both with one offset."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)
