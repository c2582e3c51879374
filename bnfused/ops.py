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

from bnfused import activation as act_codes
from bnfused import backends, layout
from bnfused.backends import reference

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
    residual: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.module(backend).forward_train(
        x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual
    )


@_forward_train_op.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual, backend):
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
    residual: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return backends.module(backend).forward_eval(x, weight, bias, running_mean, running_var, eps, act, slope, residual)


@_forward_eval_op.register_fake
def _(x, weight, bias, running_mean, running_var, eps, act, slope, residual, backend):
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
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    needs_residual: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # dy with x's strides here, on real tensors: torch 2.6's Dynamo refuses .stride() in a traced backward.
    dx, dw, db, dres = backends.module(backend).backward(
        layout.like(x, dy), x, y, weight, mean, invstd, act, slope, training, needs_input, needs_weight,
        needs_bias, bias, residual, needs_residual,
    )  # fmt: skip
    empty = mean.new_empty(_EMPTY_GRAD_SHAPE)
    return (
        dx if dx is not None else x.new_empty(_EMPTY_GRAD_SHAPE),
        dw if dw is not None else empty,
        db if db is not None else empty.clone(),
        # A fresh tensor even where the backend hands dy back (act none): an op's output may not alias its input.
        (dres if dres is not dy else dy.clone()) if dres is not None else x.new_empty(_EMPTY_GRAD_SHAPE),
    )


@_backward_op.register_fake
def _(
    dy, x, y, weight, mean, invstd, act, slope, training, needs_input, needs_weight, needs_bias,
    bias, residual, needs_residual, backend,
):  # fmt: skip
    def per_channel(needed):
        return mean.new_empty(x.shape[1] if needed else 0)

    def like_x(needed):
        return torch.empty_like(x) if needed else x.new_empty(_EMPTY_GRAD_SHAPE)

    return like_x(needs_input), per_channel(needs_weight), per_channel(needs_bias), like_x(needs_residual)


# --------------------------------------------------------------------------- one call per op, two routes


def forward_train(backend, x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual):
    if torch.compiler.is_compiling():
        return _forward_train_op(
            x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual, backend
        )
    return backends.module(backend).forward_train(
        x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual
    )


def forward_eval(backend, x, weight, bias, running_mean, running_var, eps, act, slope, residual):
    if torch.compiler.is_compiling():
        return _forward_eval_op(x, weight, bias, running_mean, running_var, eps, act, slope, residual, backend)
    return backends.module(backend).forward_eval(x, weight, bias, running_mean, running_var, eps, act, slope, residual)


def backward(backend, dy, x, y, weight, bias, residual, mean, invstd, act, slope, training, needs):
    """(dx, dweight, dbias, dresidual); ``needs`` says which of the four are wanted (None for the others)."""
    if torch.compiler.is_compiling():
        grads = _backward_op(
            dy, x, y, weight, mean, invstd, act, slope, training, *needs[:3], bias, residual, needs[3], backend
        )
        return tuple(grad if needed else None for grad, needed in zip(grads, needs))
    return backends.module(backend).backward(
        layout.like(x, dy), x, y, weight, mean, invstd, act, slope, training, *needs[:3], bias, residual, needs[3]
    )


# --------------------------------------------------------------------------- the one entry point


def batch_norm(backend, x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, residual=None):
    """y = act(batch_norm(x) [+ residual]) on a checked, kernel-ready x (and residual: x's shape, dtype
    and strides) with a concrete backend name whose kernels fuse ``act`` (and the residual).

    Eager calls take the backend's own whole-layer op when it has one (the C++ extension's, whose
    autograd lives in C++ and costs less than a Python Function on small layers); everything else,
    and every compiled call, goes through ``BatchNormFunction``.
    """
    if not torch.compiler.is_compiling():
        layer = getattr(backends.module(backend), "batch_norm", None)
        if layer is not None:
            if residual is None:
                return layer(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope)
            return layer(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, residual)
    if residual is x and torch.compiler.is_compiling():  # bn(x, x): Dynamo refuses one tensor as two inputs
        residual = x.clone()
    return BatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, backend, residual
    )


# --------------------------------------------------------------------------- autograd


def differentiable_backward(dy, x, y, weight, bias, residual, mean, invstd, training, eps, act, slope, needs):
    """(dx, dweight, dbias, dresidual) as differentiable torch ops: the backward under ``create_graph=True``.

    The kernels' formula (bnfused/backends/reference.py) recorded by autograd, which is cheaper to
    differentiate than the forward (it is already the first derivative); written here with each
    of g and x_hat formed once, which halves the recorded graph of ``reference.backward`` (twice as
    fast a double backward at (32, 64, 28, 28)). In training, mean and invstd are recomputed from x
    so that the graph holds their dependence on x; eval's are constants (the running stats). A
    (leaky) relu's or relu6's mask, read off the saved output, is a constant too: their second
    derivative is 0, and at a kink torch's convention holds (relu' = 0, leaky_relu' = slope).
    hardswish', silu' and sigmoid' are functions of z, formed here from x, weight, bias and residual so that
    autograd sees those dependences. The C++ layer op does the same in ATen
    (``differentiable_backward`` in csrc/autograd.cpp).
    """
    acc = _acc_dtype(x)
    dims = [0, *range(2, x.dim())]
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    xf = x.to(acc)
    if training:
        var, mean = torch.var_mean(xf, dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    x_hat = (xf - mean.view(per_channel)) * invstd.view(per_channel)
    z = None
    if act_codes.grad_from_input(act):
        z = x_hat if weight is None else x_hat * weight.to(acc).view(per_channel)
        if bias is not None:
            z = z + bias.to(acc).view(per_channel)
        if residual is not None:
            z = z + residual.to(acc)
    g = reference.activation_grad(dy.to(acc), y, act, slope, z)
    sum_g, sum_g_xhat = g.sum(dims), (g * x_hat).sum(dims)
    dresidual = g.to(x.dtype) if needs[3] else None
    if training:
        count = x.numel() // x.shape[1]
        g = g - (sum_g / count).view(per_channel) - x_hat * (sum_g_xhat / count).view(per_channel)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = (g * scale.view(per_channel)).to(x.dtype) if needs[0] else None
    return dx, (sum_g_xhat if needs[1] else None), (sum_g if needs[2] else None), dresidual


class _ZeroDerivative(torch.autograd.Function):
    """``value`` recorded as a function of ``sources`` with derivative zero (no gradient flows back),
    or, given a ``refusal``, with a derivative that raises it.

    Under create_graph=True torch's BatchNorm gradients require grad whenever an input of its
    backward does (dy, x, weight; and always after an activation, whose backward reads y), even
    where they do not depend on it: eval mode's dx without a trainable weight, the affine sums when
    dy is a constant. Code that differentiates them again (a gradient penalty on a frozen model)
    must find a graph there, as with torch, and gets no gradient (None) for the sources.
    """

    @staticmethod
    def forward(ctx, refusal, value, *sources):
        ctx.refusal = refusal
        return value.clone()  # a new tensor: an input returned as is would be a view, refusing in-place ops

    @staticmethod
    def backward(ctx, grad):
        if ctx.refusal is not None:
            raise RuntimeError(ctx.refusal)
        return (None,) * len(ctx.needs_input_grad)


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _batched(t: torch.Tensor) -> bool:
    """A tensor of a vmap: is_grads_batched's legacy batching, or torch.func's."""
    return _is_legacy_batched(t) or torch._C._functorch.is_batchedtensor(t)


def recorded_like_torch(grads, dy, x_requires_grad, weight, act, sources, refusal=None):
    """(dx, dweight, dbias, dresidual) of a create_graph=True backward with torch's requires_grad
    (see ``_ZeroDerivative``); with a ``refusal``, every recorded gradient raises it when
    differentiated (``grads`` then come from a backward that autograd did not record)."""
    if _batched(dy):
        # is_grads_batched=True (jacobian(..., vectorize=True)): a batched tensor reports
        # requires_grad=False even where autograd records it, so nothing can be told apart here,
        # and a link would cut the recorded graph. A refusal cannot ride on a link either: raised now.
        if refusal is not None:
            raise RuntimeError(f"{refusal} (a batched backward with create_graph=True is refused at once)")
        return grads
    sources = [t for t in sources if t is not None and t.requires_grad]
    if not sources:
        return grads
    # torch: dx, dweight, dbias come from batch_norm's backward, whose inputs are g (the
    # activation's gradient: it requires grad after an activation, through y or z), x and weight;
    # dresidual is g itself.
    g_recorded = act != act_codes.NONE or dy.requires_grad
    bn_recorded = g_recorded or x_requires_grad or (weight is not None and weight.requires_grad)

    def linked(grad, recorded):
        if grad is None or not recorded or (grad.requires_grad and refusal is None):
            return grad
        return _ZeroDerivative.apply(refusal, grad, *sources)

    dx, dw, db, dres = grads
    return linked(dx, bn_recorded), linked(dw, bn_recorded), linked(db, bn_recorded), linked(dres, g_recorded)


class BatchNormFunction(torch.autograd.Function):
    """y = act(batch_norm(x) [+ residual]) with an explicit backward.

    Inputs are already checked and kernel-ready (see ``bnfused.functional.batch_norm``); ``backend``
    is a concrete backend name whose kernels fuse ``act`` (and the residual, when there is one).
    Saved for backward: x, the output y where act' is read off it (relu, leaky_relu, relu6), and the
    bias and residual where act' needs z (hardswish, silu, sigmoid).
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, backend, residual=None
    ):
        if training:
            y, mean, invstd = forward_train(
                backend, x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual
            )
        else:
            y = forward_eval(backend, x, weight, bias, running_mean, running_var, eps, act, slope, residual)
            # Eval-mode backward treats the running stats as constants. Saved as copies: a later
            # training step updates the buffers in place, and this graph must still backpropagate.
            mean = invstd = None
            if any(ctx.needs_input_grad[:3]) or ctx.needs_input_grad[11]:
                mean, invstd = reference.eval_stats(running_mean, running_var, eps, x.dtype)
        from_input = act_codes.grad_from_input(act)
        ctx.save_for_backward(
            x,
            y if act != act_codes.NONE and not from_input else None,
            weight,
            bias if from_input else None,
            residual if from_input else None,
            mean,
            invstd,
        )
        ctx.config = (training, eps, act, slope, backend, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, bias, residual, mean, invstd = ctx.saved_tensors
        training, eps, act, slope, backend, bias_dtype = ctx.config
        needs = (*ctx.needs_input_grad[:3], ctx.needs_input_grad[11])
        # create_graph=True, or a gradient the backend's kernels cannot take (backends.needs_dispatch)
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling()) or (
            not backends.module(backend).DISPATCHED and backends.needs_dispatch(dy)
        ):
            dx, dw, db, dres = differentiable_backward(
                dy, x, y, weight, bias, residual, mean, invstd, training, eps, act, slope, needs
            )
            if torch.is_grad_enabled():
                dx, dw, db, dres = recorded_like_torch(
                    (dx, dw, db, dres), dy, x.requires_grad, weight, act, (dy, x, y, weight, bias, residual)
                )
        else:
            dx, dw, db, dres = backward(
                backend, dy, x, y, weight, bias, residual, mean, invstd, act, slope, training, needs
            )
        if dw is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        if db is not None and db.dtype != bias_dtype:
            db = db.to(bias_dtype)
        return dx, dw, db, None, None, None, None, None, None, None, None, dres
