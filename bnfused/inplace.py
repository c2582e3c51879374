"""In-place activated BatchNorm (``memory="inplace"``): keep only the output for backward.

A BatchNorm + activation pair normally keeps its input ``x`` for backward (and an unfused
activation keeps its own input too), while the next layer (a convolution) keeps the output ``y``.
When the activation is invertible, ``x_hat`` can be recovered from ``y`` instead:

    z     = act^-1(y)             leaky_relu with slope s > 0: z = y where y >= 0, else y / s
    x_hat = (z - bias) / weight   needs |weight| > eps in every channel
    g     = dy * act'(z)          act'(z) = 1 where y > 0, else s (torch's convention at 0)
    dbias = sum(g)   dweight = sum(g * x_hat)
    training: dx = weight * invstd * (g - dbias / M - x_hat * dweight / M)
    eval:     dx = weight * invstd * g

so the layer saves ``y`` (which the next layer saves anyway: one storage) and the per-channel
invstd, and ``x`` is freed as soon as the forward is done: typically a third of a CNN's activation
memory (the idea of the inplace_abn project, here for every backend). Identity or leaky_relu with a
positive slope only: relu, relu6, hardswish, silu and sigmoid lose the information (sigmoid in floating
point, where it saturates). With a residual add (``act(bn(x) + r)``), ``r`` is saved too and
subtracted: a residual block's input, which its first convolution keeps anyway. The backward runs
as torch ops in float32 (float64 for float64).
"""

from __future__ import annotations

import torch

from bnfused import activation as act_codes
from bnfused import backends, layout, ops

MEMORY_MODES = ("default", "inplace")

# torch 2.11's Dynamo (fixed in 2.12: pytorch/pytorch#180642) makes an autograd.Function's
# intermediates extra outputs, and one that is the returned tensor itself (a no-op .to(), an in-place
# add) takes over its gradient slot: y's gradient is lost, silently (the reference kernels end with
# a .to()). A copy, under compile on 2.11 only, gives y a tensor of its own.
_ALIASED_INTERMEDIATES = torch.__version__.startswith("2.11.")


def check_memory_mode(memory: str, act: int, slope: float) -> None:
    """Raises ValueError when ``memory`` is unknown or cannot recover x_hat for this activation."""
    if memory == "default":
        return
    if memory != "inplace":
        raise ValueError(f"bnfused: memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
    if not (act == act_codes.NONE or (act == act_codes.LEAKY_RELU and slope > 0.0)):
        name = act_codes.NAMES[act] + (f" with negative_slope={slope}" if act == act_codes.LEAKY_RELU else "")
        raise ValueError(
            f"bnfused: memory='inplace' recovers the input from the output, so the activation must be "
            f"invertible (None, or leaky_relu with negative_slope > 0); {name} is not"
        )


def check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    """The residual must be what it adds to: x_hat is recovered as act^-1(y) - residual."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            "bnfused: memory='inplace' needs a residual of the input's shape, dtype and device "
            f"({tuple(x.shape)}, {x.dtype}, {x.device}), got ({tuple(residual.shape)}, {residual.dtype}, "
            f"{residual.device})"
        )


class InplaceBatchNormFunction(torch.autograd.Function):
    """y = act(batch_norm(x) [+ residual]), saving y (and the residual, which the block's first
    convolution keeps anyway) rather than x (see the module docstring)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, backend, residual
    ):
        module = backends.module(backend)
        fused = residual is None or (module.RESIDUAL and act in module.ACTIVATIONS)
        kernel_act = act if fused else act_codes.NONE
        kernel_residual = layout.like(x, residual) if fused and residual is not None else None
        if training:
            y, _, invstd = module.forward_train(
                x, weight, bias, running_mean, running_var, momentum, eps, kernel_act, slope, kernel_residual
            )
        else:
            y = module.forward_eval(x, weight, bias, running_mean, running_var, eps, kernel_act, slope, kernel_residual)
            invstd = backends.module("reference").eval_stats(running_mean, running_var, eps, x.dtype)[1]
        if not fused:
            y = act_codes.apply(y.add_(residual), act, slope)
        if _ALIASED_INTERMEDIATES and torch.compiler.is_compiling():
            y = y.clone()
        ctx.save_for_backward(y, weight, bias, invstd, residual)
        ctx.config = (training, eps, act, slope)
        return y

    @staticmethod
    def backward(ctx, dy):
        # create_graph=True: in eval mode the torch ops below are recorded and differentiate exactly
        # (invstd is the running variance's, a constant, and x_hat depends on x only through y, which
        # autograd follows back through this layer). In training invstd depends on x, which is not
        # kept: the recorded gradients raise when differentiated, rather than miss that term.
        training, act = ctx.config[0], ctx.config[2]
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return _gradients(ctx, dy)
        _, weight, bias, _, residual = ctx.saved_tensors
        refusal = None
        if training:
            refusal = _SECOND_DERIVATIVE_REFUSED
            with torch.no_grad():
                grads = _gradients(ctx, dy)
        else:
            grads = _gradients(ctx, dy)
        dx, dw, db, *_, dresidual = grads
        sources = (dy, ctx.saved_tensors[0], weight, bias, residual)
        dx, dw, db, dresidual = ops.recorded_like_torch(
            (dx, dw, db, dresidual), dy, ctx.needs_input_grad[0], weight, act, sources, refusal
        )
        return dx, dw, db, None, None, None, None, None, None, None, None, dresidual


_SECOND_DERIVATIVE_REFUSED = (
    "bnfused: memory='inplace' has no second derivative in training mode (a gradient taken with "
    "create_graph=True, then differentiated): the input is not kept, and the batch statistics' "
    "dependence on it is lost; use memory='default' for double backward"
)


def _gradients(ctx, dy):
    y, weight, bias, invstd, residual = ctx.saved_tensors
    training, eps, act, slope = ctx.config
    acc = invstd.dtype
    shape = (1, -1, *([1] * (y.dim() - 2)))
    yf = y.to(acc)
    z = yf if act == act_codes.NONE else torch.where(yf >= 0, yf, yf / slope)
    g = dy.to(acc) if act == act_codes.NONE else torch.where(yf > 0, dy.to(acc), dy.to(acc) * slope)
    w = torch.ones_like(invstd) if weight is None else weight.to(acc)
    needs = "bnfused: memory='inplace' recovers x_hat = (y - bias) / weight, which needs |weight| > eps"
    if torch.compiler.is_compiling():  # no branching on values there: the check runs in the graph
        torch._assert_async((w.abs() > eps).all(), f"{needs} in every channel")
    elif bool((w.abs() <= eps).any()):
        raise RuntimeError(f"{needs} in every channel; {int((w.abs() <= eps).sum())} channel(s) have |weight| <= {eps}")
    if residual is not None:
        z = z - residual.to(acc)
    shifted = z if bias is None else z - bias.to(acc).view(shape)
    x_hat = shifted / w.view(shape)
    dims = [0, *range(2, y.dim())]
    g_act = g  # the residual's gradient: the add passes dy * act'(z) through
    dbias, dweight = g.sum(dims), (g * x_hat).sum(dims)
    dx = None
    if ctx.needs_input_grad[0]:
        if training:
            count = y.numel() // y.shape[1]
            g = g - (dbias / count).view(shape) - x_hat * (dweight / count).view(shape)
        dx = (g * (w * invstd).view(shape)).to(y.dtype)
    dw = dweight.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    db = dbias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    dresidual = g_act.to(residual.dtype) if residual is not None and ctx.needs_input_grad[11] else None
    return dx, dw, db, None, None, None, None, None, None, None, None, dresidual
