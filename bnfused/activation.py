"""Activations that can follow a BatchNorm in one bnfused layer.

Kernels and op schemas take the activation as a small integer code (a Triton ``constexpr`` and a
C++ ``int``); the Python API takes names. This module is the one place where the two meet, and
where the torch function of each activation is named (``apply``): that is its semantics.

Each backend lists the codes its kernels fuse (``ACTIVATIONS``, see ``bnfused.backends``); every
code is accepted everywhere: where a backend has no kernel for one, the BatchNorm kernel runs and
then the torch activation, which costs what the unfused layers cost and no more. ``SPLIT_CODES``
are the ones the split primitives behind SyncBatchNorm fuse: those whose derivative is read off the
output alone and needs no reduction of its own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NONE = 0
RELU = 1
LEAKY_RELU = 2
RELU6 = 3
HARDSWISH = 4
SILU = 5
SIGMOID = 6

_CODES = {
    None: NONE, "none": NONE, "identity": NONE, "relu": RELU, "leaky_relu": LEAKY_RELU,
    "relu6": RELU6, "hardswish": HARDSWISH, "silu": SILU, "sigmoid": SIGMOID,
}  # fmt: skip
NAMES = {NONE: None, RELU: "relu", LEAKY_RELU: "leaky_relu", RELU6: "relu6", HARDSWISH: "hardswish", SILU: "silu",
         SIGMOID: "sigmoid"}  # fmt: skip
# An activation's name, as parse and apply_named take it; typing's spelling, as TorchScript evaluates it
# and `str | None` does not evaluate on Python 3.9.
Name = Optional[str]  # noqa: UP045
# Fused by every backend's split primitives (SyncBatchNorm); their gradient mask is read off the output.
SPLIT_CODES = frozenset((NONE, RELU, LEAKY_RELU))


def grad_from_input(code: int) -> bool:
    """Whether the backward needs the pre-activation z (recomputed from x), not just the output y."""
    return code == HARDSWISH or code == SILU or code == SIGMOID


def parse(activation: str | None, negative_slope: float) -> tuple[int, float]:
    """Returns ``(code, slope)``; relu is leaky_relu with slope 0 for the kernels' purposes.

    The backward pass recovers the (leaky) relu's mask from the saved output ``y`` (``y > 0``
    exactly where the pre-activation is positive). That holds only for a slope >= 0, so a negative
    slope is refused rather than given a silently wrong gradient.
    """
    try:
        code = _CODES[activation.lower() if isinstance(activation, str) else activation]
    except (KeyError, AttributeError):
        names = ", ".join(repr(n) for n in NAMES.values() if n is not None)
        raise ValueError(f"bnfused: activation must be None or one of {names}, got {activation!r}") from None
    if code != LEAKY_RELU:
        return code, 0.0
    slope = float(negative_slope)
    check_slope(slope)
    return LEAKY_RELU, slope


def check_slope(negative_slope: float) -> None:
    """leaky_relu's slope must be >= 0 (see ``parse``); also rejects NaN. TorchScript compiles it."""
    if not negative_slope >= 0.0:
        raise ValueError("bnfused: leaky_relu needs negative_slope >= 0, got " + str(negative_slope))


def apply(z: torch.Tensor, code: int, slope: float, inplace: bool = False) -> torch.Tensor:
    """The activation ``code`` of z, as torch computes it (values, gradients and their conventions);
    ``inplace`` overwrites z (for a tensor nobody else holds)."""
    return apply_named(z, NAMES[code], slope, inplace)


def apply_named(z: torch.Tensor, activation: Name, negative_slope: float, inplace: bool = False) -> torch.Tensor:
    """``apply`` for an activation's name (as ``parse`` takes it). TorchScript compiles it: a scripted
    bnfused layer runs it after torch's BatchNorm (TorchScript reads no module-level constant, so the
    names are compared here, not their codes)."""
    if activation is None:
        return z
    name = activation.lower()
    if name == "relu":
        return F.relu(z, inplace)
    if name == "leaky_relu":
        check_slope(negative_slope)  # a layer's slope may have changed since parse checked it
        return F.leaky_relu(z, negative_slope, inplace)
    if name == "relu6":
        return F.relu6(z, inplace)
    if name == "hardswish":
        return F.hardswish(z, inplace)
    if name == "silu":
        return F.silu(z, inplace)
    if name == "sigmoid":
        return z.sigmoid_() if inplace else torch.sigmoid(z)
    if name == "none" or name == "identity":
        return z
    raise ValueError("bnfused: unknown activation " + activation)
