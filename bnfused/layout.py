"""Memory layouts the kernels accept, and the (N, C, S) view they index with.

Kernels see a tensor as N x C x S (S = product of the spatial dims) with three strides, which
exists without a copy for contiguous tensors, channels_last / channels_last_3d, and an (N, L, C)
tensor transposed to (N, C, L). The public API hands them contiguous or channels_last input only
(``kernel_ready``), so that outputs have the layout torch's BatchNorm gives them.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format


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


def kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """x itself when contiguous or channels_last (3d), else a copy in the layout torch suggests for it.

    The kernels could index any layout whose spatial dims collapse, but the output takes the input's
    strides, and torch's BatchNorm returns its input's suggested memory format: channels_last for a
    slice of a channels_last tensor, contiguous for every other layout (code that ``view``s the
    result relies on that). So other layouts are copied here, once, to that format.
    """
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous(memory_format=suggest_memory_format(x))


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
