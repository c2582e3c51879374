"""The reference backend against torch.nn.BatchNorm across the semantic matrix (it is the oracle the
other backends are compared with, so it must itself match torch)."""

import pytest
import torch
from helpers import assert_matches_torch

SHAPES = [(8, 3), (6, 5, 7), (4, 3, 5, 5), (3, 4, 3, 2, 5), (2, 7, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_layouts(shape, training):
    assert_matches_torch("reference", shape, training=training)
    assert_matches_torch("reference", shape, training=training, channels_last=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_dtypes(dtype, training):
    assert_matches_torch("reference", (6, 5, 4, 3), dtype=dtype, training=training)


def test_half_input_with_half_params():
    assert_matches_torch("reference", (6, 5, 4, 3), dtype=torch.float16, param_dtype=torch.float16)


@pytest.mark.parametrize(
    "flags",
    [
        dict(momentum=None, steps=4),
        dict(momentum=0.7, steps=3),
        dict(affine=False),
        dict(track_running_stats=False),
        dict(track_running_stats=False, training=False),
        dict(activation="relu"),
        dict(activation="leaky_relu", negative_slope=0.2),
        dict(activation="relu", training=False),
        dict(activation="relu", affine=False, channels_last=True),
    ],
    ids=str,
)
def test_matches_torch_flags(flags):
    assert_matches_torch("reference", (5, 6, 3, 4), **flags)


def test_large_mean_variance_is_accurate_in_fp32():
    """mean 1e4, std 1: E[x^2]-E[x]^2 in fp32 loses every digit of the variance; we must not."""
    from bnfused.backends import reference

    x64 = torch.randn(64, 3, 16, 16, dtype=torch.float64) + 1e4
    mean, var = reference.batch_stats(x64.float())
    ref_var = x64.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=0)
    y = reference.normalize(x64.float(), None, None, mean, torch.rsqrt(var + 1e-5), 0, 0.0)
    y_ref = (x64 - x64.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(ref_var.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(y.double(), y_ref, atol=2e-3, rtol=0)
