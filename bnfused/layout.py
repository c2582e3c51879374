"""Memory layouts the kernels accept, and the (N, C, S) view they index with.

Kernels see a tensor as N x C x S (S = product of the spatial dims) with three strides, which
exists without a copy for contiguous tensors, channels_last / channels_last_3d, and an (N, L, C)
tensor transposed to (N, C, L). The public API hands them contiguous or channels_last input only
(``kernel_ready``), so that outputs have the layout torch's BatchNorm gives them.
"""

from __future__ import annotations

import torch

# Dims from the fastest-varying to the slowest in each format the kernels take.
_DIM_ORDERS = {torch.channels_last: (1, 3, 2, 0), torch.channels_last_3d: (1, 4, 3, 2, 0)}


def suggested_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format torch suggests for ``x`` (``torch._prims_common.suggest_memory_format``'s
    rule, kept here rather than imported from a private module): channels_last (3d) when the
    strides grow in that format's dim order (C, W, H, [D,] N), with torch's tie-breaks, else
    contiguous."""
    if x.dim() not in (4, 5):
        return torch.contiguous_format
    channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    shape, strides = x.shape, x.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    least = 0
    for d in _DIM_ORDERS[channels_last]:
        if shape[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return torch.contiguous_format
        least = strides[d] * max(shape[d], 1)
    return channels_last


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


def standard_strides(shape: torch.Size, memory_format: torch.memory_format) -> tuple[int, ...]:
    """The strides a fresh tensor of ``shape`` gets in ``memory_format`` (what ``empty_like`` gives)."""
    order = _DIM_ORDERS.get(memory_format) or range(len(shape) - 1, -1, -1)
    strides = [0] * len(shape)
    step = 1
    for d in order:
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """x, with the strides torch's BatchNorm gives its output: the kernels' outputs take their input's.

    torch returns contiguous output when the input is contiguous, else channels_last (3d) when the
    input is, each with that format's standard strides; other layouts come back in their suggested
    format (channels_last for a slice of a channels_last tensor, contiguous otherwise: code that
    ``view``s the result relies on that). A contiguous or channels_last input may carry any stride
    on a size-1 dim; it is re-strided without a copy (a size-1 dim's stride never addresses memory).
    Other layouts are copied here, once. The C++ ``args_ok`` passes only inputs this returns as they are.
    """
    if x.is_contiguous():
        memory_format = torch.contiguous_format
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        memory_format = torch.channels_last
    elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        memory_format = torch.channels_last_3d
    else:
        return x.contiguous(memory_format=suggested_format(x))
    strides = standard_strides(x.shape, memory_format)
    return x if x.stride() == strides else _restrided(x, memory_format, strides)


def _restrided(x: torch.Tensor, memory_format: torch.memory_format, strides: tuple[int, ...]) -> torch.Tensor:
    """x with ``strides`` (its format's standard ones), through views whose backward is a reshape.

    ``as_strided`` would do it in one call, but its backward (AsStridedBackward0) scatters into a
    zeroed copy of the storage and gives x.grad x's odd strides, where torch's BatchNorm gives x.grad
    the standard ones. A flat view taken back to x's shape (in the format's dim order) gets them.
    """
    if memory_format is torch.contiguous_format:
        y = x.view(-1).view(x.shape)
    else:
        to_last = (0, *range(2, x.dim()), 1)
        back = (0, x.dim() - 1, *range(1, x.dim() - 1))
        last = x.permute(to_last)
        y = last.view(-1).view(last.shape).permute(back)
    if y.stride() == strides:
        return y
    if x.numel() == 1:  # every dim of size 1: views keep its strides, and a copy is one value
        return x.clone(memory_format=memory_format)
    return x.as_strided(x.shape, strides)


def ncs(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(N, C, S, stride_n, stride_c, stride_s) of a kernel-ready tensor."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c) if n * c else 0
    return n, c, s, x.stride(0), x.stride(1), spatial_stride(x)


def like(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t with x's strides (copied only when they differ), so kernels can index both with one offset."""
    if t.stride() == x.stride():
        return t
    out = torch.empty_like(x, dtype=t.dtype)
    if out.stride() != x.stride():  # x has gaps (a slice), which empty_like does not keep: x's strides exactly
        out = torch.empty_strided(x.shape, x.stride(), dtype=t.dtype, device=x.device)
    return out.copy_(t)
