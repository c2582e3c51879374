"""THE dispatch point: the BatchNorm ops, their fake implementations, and the autograd Function.

Two routes into the same backend functions (``bnfused.backends``):

* Eager: ``BatchNormFunction`` calls the chosen backend's Python function directly. A
  ``torch.library`` op call, and ``register_autograd`` above all, costs tens of microseconds per
  step, which is the whole time of the small layers in an MLP or LeNet.
* ``torch.compile``: the same Function calls ``torch.ops.bnfused.*`` instead. Those ops carry fake
  implementations and declare the running-stat mutation, so Dynamo traces them without graph
  breaks and AOTAutograd functionalises the buffer update.

The backward is an explicit formula (saved mean and invstd, x_hat recomputed), never autograd
through the forward. Under ``create_graph=True`` (double backward) that same formula runs as
differentiable torch ops (``differentiable_backward``), so autograd records it.
"""

from __future__ import annotations

import torch

from bnfused import backends, layout

_EMPTY_GRAD_SHAPE = (0,)  # an op cannot return None: ungrad outputs are empty and dropped by the Function


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- library ops (compile path)


@torch.library.custom_op("bnfused::forward_train", mutates_args=("running_mean", "running_var"))
def _forward_train_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    act: int,
    slope: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.module(backend).forward_train(x, weight, bias, running_mean, running_var, momentum, eps, act, slope)


@_forward_train_op.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, act, slope, backend):
    stats = x.new_empty(x.shape[1], dtype=_acc_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("bnfused::forward_eval", mutates_args=())
def _forward_eval_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    act: int,
    slope: float,
    backend: str,
) -> torch.Tensor:
    return backends.module(backend).forward_eval(x, weight, bias, running_mean, running_var, eps, act, slope)


@_forward_eval_op.register_fake
def _(x, weight, bias, running_mean, running_var, eps, act, slope, backend):
    return torch.empty_like(x)


@torch.library.custom_op("bnfused::backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    act: int,
    slope: float,
    training: bool,
    needs_input: bool,
    needs_weight: bool,
    needs_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = backends.module(backend).backward(
        dy, x, y, weight, mean, invstd, act, slope, training, needs_input, needs_weight, needs_bias
    )
    empty = mean.new_empty(_EMPTY_GRAD_SHAPE)
    return (
        dx if dx is not None else x.new_empty(_EMPTY_GRAD_SHAPE),
        dw if dw is not None else empty,
        db if db is not None else empty.clone(),
    )


@_backward_op.register_fake
def _(dy, x, y, weight, mean, invstd, act, slope, training, needs_input, needs_weight, needs_bias, backend):
    def per_channel(needed):
        return mean.new_empty(x.shape[1] if needed else 0)

    dx = torch.empty_like(x) if needs_input else x.new_empty(_EMPTY_GRAD_SHAPE)
    return dx, per_channel(needs_weight), per_channel(needs_bias)


# --------------------------------------------------------------------------- one call per op, two routes


def forward_train(backend, x, weight, bias, running_mean, running_var, momentum, eps, act, slope):
    if torch.compiler.is_compiling():
        return _forward_train_op(x, weight, bias, running_mean, running_var, momentum, eps, act, slope, backend)
    return backends.module(backend).forward_train(x, weight, bias, running_mean, running_var, momentum, eps, act, slope)


def forward_eval(backend, x, weight, bias, running_mean, running_var, eps, act, slope):
    if torch.compiler.is_compiling():
        return _forward_eval_op(x, weight, bias, running_mean, running_var, eps, act, slope, backend)
    return backends.module(backend).forward_eval(x, weight, bias, running_mean, running_var, eps, act, slope)


def backward(backend, dy, x, y, weight, mean, invstd, act, slope, training, needs):
    if torch.compiler.is_compiling():
        dx, dw, db = _backward_op(dy, x, y, weight, mean, invstd, act, slope, training, *needs, backend)
        return (dx if needs[0] else None), (dw if needs[1] else None), (db if needs[2] else None)
    return backends.module(backend).backward(dy, x, y, weight, mean, invstd, act, slope, training, *needs)


# --------------------------------------------------------------------------- the one entry point


def batch_norm(backend, x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope):
    """y = act(batch_norm(x)) on a checked, kernel-ready x with a concrete backend name.

    Eager calls take the backend's own whole-layer op when it has one (the C++ extension's, whose
    autograd lives in C++ and costs less than a Python Function on small layers); everything else,
    and every compiled call, goes through ``BatchNormFunction``.
    """
    if not torch.compiler.is_compiling():
        layer = getattr(backends.module(backend), "batch_norm", None)
        if layer is not None:
            return layer(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope)
    return BatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, backend
    )


# --------------------------------------------------------------------------- autograd


def differentiable_backward(dy, x, y, weight, mean, invstd, training, eps, act, slope, needs):
    """(dx, dweight, dbias) as differentiable torch ops: the backward under ``create_graph=True``.

    The kernels' formula (bnfused/backends/reference.py) recorded by autograd, which is cheaper to
    differentiate than the forward (it is already the first derivative); written here with each
    of g and x_hat formed once, which halves the recorded graph of ``reference.backward`` (twice as
    fast a double backward at (32, 64, 28, 28)). In training, mean and invstd are recomputed from x
    so that the graph holds their dependence on x; eval's are constants (the running stats). The
    activation's mask, read off the saved output, is a constant too: relu'' = 0, and at the kink
    torch's convention (relu' = 0, leaky_relu' = slope). The C++ layer op does the same in ATen
    (``differentiable_backward`` in csrc/autograd.cpp).
    """
    acc = _acc_dtype(x)
    dims = [0, *range(2, x.dim())]
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    xf = x.to(acc)
    if training:
        var, mean = torch.var_mean(xf, dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    g = dy.to(acc)
    if act:
        g = torch.where(y > 0, g, g * slope)
    x_hat = (xf - mean.view(per_channel)) * invstd.view(per_channel)
    sum_g, sum_g_xhat = g.sum(dims), (g * x_hat).sum(dims)
    if training:
        count = x.numel() // x.shape[1]
        g = g - (sum_g / count).view(per_channel) - x_hat * (sum_g_xhat / count).view(per_channel)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = (g * scale.view(per_channel)).to(x.dtype) if needs[0] else None
    return dx, (sum_g_xhat if needs[1] else None), (sum_g if needs[2] else None)


class BatchNormFunction(torch.autograd.Function):
    """y = act(batch_norm(x)) with an explicit backward.

    Inputs are already checked and kernel-ready (see ``bnfused.functional.batch_norm``); ``backend``
    is a concrete backend name.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, backend):
        if training:
            y, mean, invstd = forward_train(
                backend, x, weight, bias, running_mean, running_var, momentum, eps, act, slope
            )
            ctx.save_for_backward(x, y if act else None, weight, mean, invstd)
        else:
            y = forward_eval(backend, x, weight, bias, running_mean, running_var, eps, act, slope)
            # Eval-mode backward treats the running stats as constants. Saved as copies: a later
            # training step updates the buffers in place, and this graph must still backpropagate.
            mean = invstd = None
            if any(ctx.needs_input_grad[:3]):
                mean, invstd = backends.module("reference").eval_stats(running_mean, running_var, eps, x.dtype)
            ctx.save_for_backward(x, y if act else None, weight, mean, invstd)
        ctx.config = (training, eps, act, slope, backend, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, mean, invstd = ctx.saved_tensors
        training, eps, act, slope, backend, bias_dtype = ctx.config
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
            dx, dw, db = differentiable_backward(dy, x, y, weight, mean, invstd, training, eps, act, slope, needs)
        else:
            dx, dw, db = backward(backend, layout.like(x, dy), x, y, weight, mean, invstd, act, slope, training, needs)
        if dw is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        if db is not None and db.dtype != bias_dtype:
            db = db.to(bias_dtype)
        return dx, dw, db, None, None, None, None, None, None, None, None
