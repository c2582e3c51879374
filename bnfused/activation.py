"""Activations that can be fused into the BatchNorm kernels.

Kernels and op schemas take the activation as a small integer code (a Triton ``constexpr`` and a
C++ ``int``); the Python API takes names. This module is the one place where the two meet.
"""

from __future__ import annotations

NONE = 0
RELU = 1
LEAKY_RELU = 2

_CODES = {None: NONE, "none": NONE, "identity": NONE, "relu": RELU, "leaky_relu": LEAKY_RELU}
NAMES = {NONE: None, RELU: "relu", LEAKY_RELU: "leaky_relu"}


def parse(activation: str | None, negative_slope: float) -> tuple[int, float]:
    """Returns ``(code, slope)``; relu is leaky_relu with slope 0 for the kernels' purposes.

    The backward pass recovers the activation's mask from the saved output ``y`` (``y > 0`` exactly
    where the pre-activation is positive). That holds only for a slope >= 0, so a negative slope is
    refused rather than given a silently wrong gradient.
    """
    try:
        code = _CODES[activation.lower() if isinstance(activation, str) else activation]
    except (KeyError, AttributeError):
        raise ValueError(f"bnfused: activation must be None, 'relu' or 'leaky_relu', got {activation!r}") from None
    if code == NONE:
        return NONE, 0.0
    if code == RELU:
        return RELU, 0.0
    slope = float(negative_slope)
    if not slope >= 0.0:  # also rejects NaN
        raise ValueError(f"bnfused: leaky_relu needs negative_slope >= 0, got {negative_slope}")
    return LEAKY_RELU, slope
