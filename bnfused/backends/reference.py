"""Pure-PyTorch BatchNorm: the semantic definition every other backend is tested against.

Runs on any device. Arithmetic is done in float32 (float64 for float64 inputs) whatever the input
dtype, with the same formulas the fused kernels use:

Forward (training), per channel c over the M = N * spatial values of that channel:
    mean_c   = sum(x) / M
    var_c    = sum((x - mean_c)^2) / M                   (biased; two-pass, so stable for |mean| >> std)
    invstd_c = 1 / sqrt(var_c + eps)                     (these three in float64: see statistics_dtype)
    z        = (x - mean_c) * (invstd_c * w_c) + b_c [+ residual]   (subtract first: no cancellation at large mean)
    y        = act(z)                                    (relu, leaky_relu, relu6, hardswish or silu, as torch's)
    running_mean <- (1 - momentum) * running_mean + momentum * mean_c
    running_var  <- (1 - momentum) * running_var  + momentum * var_c * M / (M - 1)   (unbiased)

Backward, with g = dy * act'(z) and x_hat = (x - mean_c) * invstd_c. act' is read off the saved y
for relu, leaky_relu and relu6 (y > 0 exactly where z > 0; 0 < y < 6 exactly where 0 < z < 6) and
computed from z, recomputed from x (and bias and residual), for hardswish and silu:
    db_c = sum(g)                dw_c = sum(g * x_hat)          d(residual) = g
    training: dx = w_c * invstd_c * (g - db_c / M - x_hat * dw_c / M)
    eval:     dx = w_c * invstd_c * g          (mean and invstd are constants: the running stats)
"""

from __future__ import annotations

import torch

from bnfused import activation as act_codes


def available(device: torch.device) -> str | None:
    """Always available: returns no reason against it."""
    return None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Views a (C,) tensor so that it broadcasts against x of shape (N, C, *)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


ACTIVATIONS = frozenset(act_codes.NAMES)
RESIDUAL = True
DISPATCHED = True  # torch's ops


def _activate(z: torch.Tensor, act: int, slope: float) -> torch.Tensor:
    if act == act_codes.LEAKY_RELU:
        return torch.where(z > 0, z, z * slope)
    if act == act_codes.RELU:  # not z * 0, which is NaN at z = -inf (torch gives 0); a NaN stays NaN
        return torch.where(z < 0, 0.0, z)
    return act_codes.apply(z, act, slope)


def activation_grad(dy: torch.Tensor, y: torch.Tensor | None, act: int, slope: float, z: torch.Tensor | None = None):
    """dy * act'(z), with torch's value at each kink. ``y`` (float, any dtype) for relu, leaky_relu and
    relu6; ``z`` (the accumulation dtype) for hardswish and silu."""
    if act == act_codes.NONE:
        return dy
    # At NaN, as torch's vectorised CPU kernels: relu passes dy, leaky_relu scales it by the slope,
    # relu6 gives 0.
    if act == act_codes.RELU:
        return torch.where(y <= 0, 0.0, dy)
    if act == act_codes.LEAKY_RELU:
        return torch.where(y > 0, dy, dy * slope)
    if act == act_codes.RELU6:
        return torch.where((y > 0) & (y < 6), dy, 0.0)
    if act == act_codes.HARDSWISH:  # a NaN z gives NaN, as torch's vectorised hardswish_backward
        return torch.where(z <= -3, 0.0, torch.where(z >= 3, dy, dy * (z / 3 + 0.5)))
    sig = torch.sigmoid(z)
    if act == act_codes.SIGMOID:
        return dy * (sig * (1 - sig))
    return dy * (sig * (1 + z * (1 - sig)))


def _pre_activation(x, weight, bias, mean, invstd, residual) -> torch.Tensor:
    """z = x_hat * weight + bias (+ residual) in the accumulation dtype: what the forward activated."""
    acc = accumulation_dtype(x.dtype)
    scale = invstd if weight is None else invstd * weight.to(acc)
    z = (x.to(acc) - _per_channel(mean, x)) * _per_channel(scale, x)
    if bias is not None:
        z = z + _per_channel(bias.to(acc), x)
    if residual is not None:
        z = z + residual.to(acc)
    return z


def _gradient(dy, x, y, weight, bias, mean, invstd, act: int, slope: float, residual):
    """g = dy * act'(z) in the accumulation dtype."""
    z = _pre_activation(x, weight, bias, mean, invstd, residual) if act_codes.grad_from_input(act) else None
    return activation_grad(dy.to(accumulation_dtype(x.dtype)), y, act, slope, z)


def statistics_dtype(device: torch.device) -> torch.dtype:
    """float64 wherever the device has it. The squares of float32 values (1e-90 to 1e77) and a float32
    eps below 1.2e-38 (subnormal there) are exact in float64; in float32 the variance of |x| >= ~1e19
    overflows (torch's own float32 path then normalises to 0) and tiny ones lose their digits.
    float64 input of |x| >~ 1e154 still overflows its variance here, as in torch (the cpp backend
    scales such channels and stays right)."""
    return torch.float32 if device.type == "mps" else torch.float64


def batch_stats_exact(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance in ``statistics_dtype``, two passes: a +inf in a channel
    gives mean inf and variance NaN, as in torch (a one-pass var_mean gives a NaN mean)."""
    xs = x.to(statistics_dtype(x.device))
    dims = _reduce_dims(x)
    mean = xs.mean(dims)
    return mean, (xs - _per_channel(mean, x)).square().mean(dims)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x: (N, C, *) -> two (C,) tensors in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    mean, var = batch_stats_exact(x)
    return mean.to(acc), var.to(acc)


def invstd_of(var: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """1 / sqrt(var + eps) in ``dtype``, computed in ``statistics_dtype``."""
    return torch.rsqrt(var.to(statistics_dtype(var.device)) + eps).to(dtype)


def update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """In-place exponential (or, via the momentum the caller picks, cumulative) average update,
    computed in the statistics' dtype (as torch does on the CPU) and rounded once to the buffer's.

    Written through ``.data``, as torch's kernels write through the data pointer: the buffers'
    version counters stay as they are, so a graph that saved them backpropagates after a training
    step, as with torch.nn.BatchNorm."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.data.copy_(running_mean.to(mean.dtype) * (1.0 - momentum) + mean * momentum)
        if running_var is not None:
            unbiased = var * (count / (count - 1))
            running_var.data.copy_(running_var.to(var.dtype) * (1.0 - momentum) + unbiased * momentum)


def normalize(x, weight, bias, mean, invstd, act: int, slope: float, residual=None) -> torch.Tensor:
    """y = act((x - mean) * invstd * weight + bias [+ residual]), returned in x's dtype and layout."""
    return _activate(_pre_activation(x, weight, bias, mean, invstd, residual), act, slope).to(x.dtype)


def forward_train(
    x, weight, bias, running_mean, running_var, momentum: float, eps: float, act: int, slope: float, residual=None
):
    """Training forward. x: (N, C, *) float16|bfloat16|float32|float64.

    Returns (y like x, mean (C,), invstd (C,)), mean and invstd in the accumulation dtype; updates the
    running stats in place when given.
    """
    acc = accumulation_dtype(x.dtype)
    mean, var = batch_stats_exact(x)
    update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    mean, invstd = mean.to(acc), invstd_of(var, eps, acc)
    return normalize(x, weight, bias, mean, invstd, act, slope, residual), mean, invstd


def eval_stats(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, dtype: torch.dtype):
    """The (mean, invstd) pair that eval mode normalises with, in the accumulation dtype of ``dtype``."""
    acc = accumulation_dtype(dtype)
    # A copy, never the buffer itself: saved for backward, it must not change with the next update.
    return running_mean.to(acc, copy=True), invstd_of(running_var, eps, acc)


def forward_eval(x, weight, bias, running_mean, running_var, eps: float, act: int, slope: float, residual=None):
    """Eval forward with the running statistics: one elementwise pass."""
    mean, invstd = eval_stats(running_mean, running_var, eps, x.dtype)
    return normalize(x, weight, bias, mean, invstd, act, slope, residual)


def backward_reduce(dy, x, y, mean, invstd, act: int, slope: float):
    """Per-channel (sum(g), sum(g * x_hat)) with g = dy * act'(z); both (C,) in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    g = activation_grad(dy.to(acc), y, act, slope)
    x_hat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(invstd, x)
    dims = _reduce_dims(x)
    return g.sum(dims), (g * x_hat).sum(dims)


def backward_elemt(dy, x, y, weight, mean, invstd, sum_dy, sum_dy_xhat, count: int, act: int, slope: float):
    """Training-mode dx from the per-channel sums; count is the number of values per channel (M)."""
    acc = accumulation_dtype(x.dtype)
    g = activation_grad(dy.to(acc), y, act, slope)
    x_hat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(invstd, x)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = (g - _per_channel(sum_dy / count, x) - x_hat * _per_channel(sum_dy_xhat / count, x)) * _per_channel(scale, x)
    return dx.to(x.dtype)


def backward(
    dy,
    x,
    y,
    weight,
    mean,
    invstd,
    act: int,
    slope: float,
    training: bool,
    needs_input: bool,
    needs_weight: bool,
    needs_bias: bool,
    bias=None,
    residual=None,
    needs_residual: bool = False,
):
    """Gradients (dx, dweight, dbias, dresidual); each is None when not asked for.

    dy, x, y and residual share one shape and strides; y is read for relu, leaky_relu and relu6,
    bias and residual (the forward's) for hardswish and silu. dweight and dbias come back in the
    accumulation dtype (the caller casts them to the parameters' dtype), dresidual in x's dtype.
    """
    acc = accumulation_dtype(x.dtype)
    g = _gradient(dy, x, y, weight, bias, mean, invstd, act, slope, residual)
    sum_g = sum_g_xhat = x_hat = None
    if needs_weight or needs_bias or (training and needs_input):
        x_hat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(invstd, x)
        dims = _reduce_dims(x)
        sum_g, sum_g_xhat = g.sum(dims), (g * x_hat).sum(dims)
    dx = None
    if needs_input:
        scale = invstd if weight is None else invstd * weight.to(acc)
        if training:
            count = x.numel() // x.shape[1]
            g_centred = g - _per_channel(sum_g / count, x) - x_hat * _per_channel(sum_g_xhat / count, x)
            dx = (g_centred * _per_channel(scale, x)).to(x.dtype)
        else:
            dx = (g * _per_channel(scale, x)).to(x.dtype)
    dresidual = g.to(x.dtype) if needs_residual else None
    return dx, (sum_g_xhat if needs_weight else None), (sum_g if needs_bias else None), dresidual
