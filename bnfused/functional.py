"""``batch_norm``: ``torch.nn.functional.batch_norm`` plus a fused activation and a backend choice.

All argument checking lives here, with torch's exception types and wording where torch has them,
so that backends receive only valid, kernel-ready tensors.
"""

from __future__ import annotations

import numbers
import warnings

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from bnfused import activation as act_codes
from bnfused import backends, inplace, layout, ops, torch_ops

_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REDUCED = (torch.float16, torch.bfloat16)
# ATen's names, which torch's "not implemented for" messages use.
_ATEN_NAMES = {
    torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short",
    torch.int32: "Int", torch.int64: "Long", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}  # fmt: skip


# Under torch.jit.trace the checks read sizes as traced values, and the tracer warns that their outcome
# is not recorded. It need not be: the graph holds aten::batch_norm, which checks its arguments itself.
# torch silences these warnings for its own modules the same way (TracerWarning.ignore_lib_warnings).
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"bnfused\.")

# torch.batch_norm's argument positions, which torch's TypeErrors name.
_POSITIONS = {
    "input": 1, "weight": 2, "bias": 3, "running_mean": 4, "running_var": 5, "training": 6, "momentum": 7,
    "eps": 8, "residual": 12,
}  # fmt: skip


def _type_name(value) -> str:
    """A type as torch's argument parser names it: "NoneType", "list", "Tensor", "numpy.ndarray"."""
    cls = type(value)
    return cls.__name__ if cls.__module__ in ("builtins", "torch") else f"{cls.__module__}.{cls.__name__}"


def _type_error(name: str, value, expected: str) -> TypeError:
    return TypeError(
        f"batch_norm(): argument '{name}' (position {_POSITIONS[name]}) must be {expected}, not {_type_name(value)}"
    )


def float_arguments(momentum, eps) -> tuple:
    """momentum and eps as torch's argument parser takes them: numbers, or 0-d tensors that need no
    grad (their numbers); anything else raises torch's TypeError."""
    if momentum.__class__ is not float and not isinstance(momentum, numbers.Real):
        momentum = _float_argument("momentum", momentum)
    if eps.__class__ is not float and not isinstance(eps, numbers.Real):
        eps = _float_argument("eps", eps)
    return momentum, eps


def _float_argument(name: str, value) -> float:
    """A 0-d tensor that needs no grad passes as its number, as torch's argument parser takes it."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad and not value.is_complex():
        return float(value)
    raise _type_error(name, value, "float")


def _check_per_channel_slowly(x, named: tuple) -> None:
    """The slow path of ``check_arguments``: finds the offending argument and raises torch's error, or
    returns when nothing is wrong after all (running stats that require grad under no_grad, strided
    running stats, an empty input)."""
    if not isinstance(x, torch.Tensor):
        raise _type_error("input", x, "Tensor")
    for name, t in named:
        if t is not None and not isinstance(t, torch.Tensor):
            raise _type_error(name, t, "Tensor")
    check_input(x)
    num_channels = x.shape[1]
    # An input without elements is returned empty whatever the per-channel tensors' sizes, as torch does.
    check_sizes = x.numel() != 0
    dtypes: set[torch.dtype] = set()
    for name, t in named:
        if t is None:
            continue
        if check_sizes and t.numel() != num_channels:
            raise RuntimeError(f"{name} should contain {num_channels} elements not {t.numel()}")
        is_stat = name.startswith("running")
        if check_sizes and is_stat and t.dim() != 1:  # weight and bias may have any C-element shape, as in torch
            raise RuntimeError(f"{name} should be a 1-D tensor of {num_channels} elements, got shape {tuple(t.shape)}")
        if is_stat and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"The function 'native_batch_norm' is not differentiable with respect to argument '{name}'. "
                "This input cannot have requires_grad True."
            )
        if t.device != x.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found {name} on {t.device} and input on {x.device}"
            )
        dtypes.add(t.dtype)
    dtype = x.dtype
    if len(dtypes) <= 1 and (not dtypes or dtype in dtypes or (dtypes == {torch.float32} and dtype in _REDUCED)):
        return
    allowed = f"{dtype}" + (" (or all float32)" if dtype in _REDUCED else "")
    found = ", ".join(sorted(str(d) for d in dtypes))
    raise RuntimeError(f"mixed dtype: expected weight, bias, running_mean and running_var to be {allowed}, got {found}")


class EmptyVector(ValueError):
    """An empty 1-D input: torch returns it as it is (no channels to check or normalise)."""

    def __init__(self) -> None:
        super().__init__("batch_norm got an empty 1-D input: there are no channels to normalise")


def check_input(x) -> None:
    """Input dtype and rank (torch's messages)."""
    dtype = x.dtype
    if dtype not in _FLOATING:
        if x.is_quantized:
            # torch.ao.quantization.convert swaps torch's own BatchNorm classes for quantized ones by
            # exact type; a bnfused layer stays and is handed the quantized tensor.
            raise NotImplementedError(
                f"bnfused BatchNorm takes floating-point input, got a quantized tensor ({dtype}): eager-mode "
                "quantization (torch.ao.quantization.prepare/convert) swaps only torch.nn's BatchNorm classes "
                "for quantized ones; call bnfused.revert_model(model) before quantizing"
            )
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_ATEN_NAMES.get(dtype, dtype)}'")
    if x.dim() == 1 and x.numel() == 0:
        raise EmptyVector
    if x.dim() < 2:
        raise ValueError(f"batch_norm expected an input of at least 2D (N, C, *) (got {x.dim()}D input)")


def check_arguments(x, running_mean, running_var, weight, bias) -> torch.Size:
    """Argument types, input dtype and rank, and each per-channel tensor's size, device and dtype, with
    torch's exception types and messages; running stats must be (C,) and, while autograd records,
    must not require grad (torch's rule).

    Runs on every layer call, so the common case is a handful of attribute reads; messages are only
    composed once something is wrong. Returns x's shape, which callers need too (reading it is not free).
    """
    try:
        dtype, shape = x.dtype, x.shape
        if dtype in _FLOATING and len(shape) >= 2:
            num_channels, device = shape[1], x.device
            param_dtype = None
            if running_mean is not None and running_var is not None:  # unrolled: this runs on every call
                channels, param_dtype = (num_channels,), running_mean.dtype
                stats_ok = not (
                    running_mean.shape != channels
                    or running_var.shape != channels
                    or running_mean.requires_grad
                    or running_var.requires_grad
                    or running_var.dtype != param_dtype
                    or running_mean.device != device
                    or running_var.device != device
                )
            else:  # one of them alone is left to the slow path (and then to _check_mode)
                stats_ok = running_mean is None and running_var is None
            if stats_ok:
                for t in (weight, bias):
                    if t is not None:
                        if param_dtype is None:
                            param_dtype = t.dtype
                        if t.numel() != num_channels or t.dtype != param_dtype or t.device != device:
                            break
                else:
                    if param_dtype in (None, dtype) or (param_dtype == torch.float32 and dtype in _REDUCED):
                        return shape
    except AttributeError:  # a non-tensor argument: the slow path names it
        pass
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    _check_per_channel_slowly(x, named)
    return x.shape


# The C++ extension's args_ok (csrc/bnfused.cpp), once the extension has loaded (set by
# bnfused.backends.native): True when a call passes every check below (check_arguments, _check_mode)
# with x non-empty and kernel-ready (bnfused.layout.kernel_ready would return it as it is) and weight
# and bias 1-D, read in C++ at a fraction of the cost; False sends the call
# through those checks, which raise torch's error or adapt the arguments. None: checks in Python only.
_compiled_checks = None


def use_compiled_checks(args_ok) -> None:
    """Installs the extension's argument checks (None removes them)."""
    global _compiled_checks
    _compiled_checks = args_ok


def check_eps(eps: float, training: bool) -> None:
    """torch's rule: eps > 0 in training (a constant channel would divide by zero), >= 0 in eval."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_mode(x, shape: torch.Size, running_mean, running_var, training: bool) -> None:
    """Training needs more than one value per channel (in this process's batch); eval needs running stats."""
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must either both be None or neither be None")
        if shape[0] == 1:  # N > 1 (or 0) can never give exactly one value per channel
            values_per_channel = 1  # counted as torch does, so a (1, 0) input is refused too
            for size in shape[2:]:
                values_per_channel *= size
            if values_per_channel == 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    elif running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    elif running_var is None:
        raise RuntimeError("running_var must be defined in evaluation mode")


def empty_batch_norm(x, weight, bias, act: int, slope: float, residual=None) -> torch.Tensor:
    """Output for an input with no elements: an empty tensor still connected to weight and bias
    (their gradients come out as zeros, as torch's do); running stats are left alone. As in torch,
    weight and bias may have any size here (torch scales by their first element): a size that does
    not match the channels is applied as a scalar."""
    shape = (1, -1, *([1] * (x.dim() - 2)))

    def broadcastable(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(shape) if t.numel() == x.shape[1] else t.sum()

    y = x * broadcastable(weight) if weight is not None else x.clone()
    if bias is not None:
        y = y + broadcastable(bias)
    y = y.to(x.dtype)  # float32 parameters must not promote a half/bfloat16 output
    return act_codes.apply(y if residual is None else y + residual, act, slope)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
    negative_slope: float = 0.01,
    backend: str | None = None,
    residual: torch.Tensor | None = None,
    memory: str = "default",
) -> torch.Tensor:
    """Batch normalization over dim 1 of ``input``, then an optional residual add and activation.

    Same meaning as ``torch.nn.functional.batch_norm`` for every shared argument: ``training=True``
    normalises with batch statistics and, when running stats are given, updates them in place
    (``momentum`` weights the new batch; the running variance is unbiased); ``training=False`` uses
    the running statistics.

    Args:
        input: (N, C, *) float16 | bfloat16 | float32 | float64.
        running_mean, running_var: (C,) or None; input's dtype, or float32 for half/bfloat16 input.
        weight, bias: (C,) or None, same dtype rule.
        activation: None, "relu", "leaky_relu", "relu6", "hardswish", "silu" or "sigmoid", applied after the
            affine step (and the residual add); relu and leaky_relu inside the kernels.
        negative_slope: leaky_relu's slope (>= 0).
        backend: "auto", "triton", "cpp", "cuda", "reference", or None for the global default.
        residual: None, or a tensor added before the activation: ``act(batch_norm(input) + residual)``
            (a ResNet block's shortcut), with torch's broadcasting and type promotion.
        memory: "default", or "inplace": keep only the output for backward and recover x_hat from it
            (activation None or leaky_relu with negative_slope > 0, a residual of input's shape and
            dtype, |weight| > eps; see ``bnfused.inplace``).

    Returns:
        (N, C, *) tensor with input's dtype; channels_last (3d) if input is, else contiguous (as torch).
    """
    if training is not True and training is not False:
        raise _type_error("training", training, "bool")
    backend = backends.check_request(backend)  # here, for the calls that never resolve one (compiled, vmap, empty)
    if momentum.__class__ is not float or eps.__class__ is not float:  # the common case skips a call
        momentum, eps = float_arguments(momentum, eps)
    act, slope = (act_codes.NONE, 0.0) if activation is None else act_codes.parse(activation, negative_slope)
    # Compiled calls check in Python: Dynamo cannot trace into the C++ function, and must not read
    # _compiled_checks either (the extension may load, and set it, while Dynamo traces this call).
    # Nor under torch.func: vmap's batched tensors refuse the layout queries the C++ checks make.
    checked = (
        not torch.compiler.is_compiling()
        and _compiled_checks is not None
        and not torch_ops.functorch_depth()
        and _compiled_checks(input, running_mean, running_var, weight, bias, training)
    )
    if not checked:
        if isinstance(input, torch.Tensor) and input.layout != torch.strided:
            # Sparse and MKL-DNN tensors: torch's own BatchNorm, with its results and its errors.
            return torch_ops.batch_norm(
                input, running_mean, running_var, weight, bias, training, momentum, eps, act, slope, residual
            )
        try:
            shape = check_arguments(input, running_mean, running_var, weight, bias)
        except EmptyVector:  # nothing to normalise: torch's own answer, graph connections included
            return torch_ops.batch_norm(
                input, running_mean, running_var, weight, bias, training, momentum, eps, act, slope, residual
            )
        _check_mode(input, shape, running_mean, running_var, training)
    if not eps > 0.0:  # positive eps passes both of torch's rules
        check_eps(eps, training)
    if residual is not None and not isinstance(residual, torch.Tensor):
        raise _type_error("residual", residual, "Tensor")
    if memory != "default":
        inplace.check_memory_mode(memory, act, slope)
        if residual is not None:
            inplace.check_residual(input, residual)
    if torch_ops.use_torch_ops(input, training):  # compiled, traced, exported, torch.func or jvp: torch's graph
        return torch_ops.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, act, slope, residual
        )
    if not checked:
        if input.numel() == 0:
            return empty_batch_norm(input, weight, bias, act, slope, residual)
        # torch accepts weight and bias of any C-element shape, e.g. (1, C); the kernels index vectors.
        if weight is not None and weight.dim() != 1:
            weight = weight.reshape(-1)
        if bias is not None and bias.dim() != 1:
            bias = bias.reshape(-1)
    if (
        training
        and running_mean is not None
        and not (checked and residual is None)
        and not torch.compiler.is_compiling()  # Dynamo traces fake tensors: storages are not its business
    ):
        # torch updates the running stats in place before it normalises: running stats that share
        # memory with x, the weight, the bias, the residual or each other change what it normalises
        # with, which torch's own ops reproduce (the kernels would read the values from before the
        # update). args_ok has checked all but the residual.
        others = (residual,) if checked else (input, weight, bias, residual)
        if _stats_share_memory(running_mean, running_var, others):
            return torch_ops.batch_norm(
                input, running_mean, running_var, weight, bias, training, momentum, eps, act, slope, residual
            )
    name = backends.resolve(backend, input.device)
    fused = backends.module(name)
    if not fused.DISPATCHED and backends.needs_dispatch(input, weight, bias, running_mean, running_var, residual):
        return torch_ops.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, act, slope, residual
        )
    if (
        name in backends.DEFERS_WHEN_AUTO
        and memory == "default"
        and (
            backends.defers_in_every_mode(backend, input)
            or backends.defers_to_torch(
                backend, name, input, training, training and backward_may_follow(input, weight, bias, residual)
            )
        )
    ):
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return _add_and_activate(y, residual, act, slope)
    if memory != "default":
        return inplace.InplaceBatchNormFunction.apply(
            layout.kernel_ready(input), weight, bias, running_mean, running_var,
            training, float(momentum), float(eps), act, slope, name, residual,
        )  # fmt: skip
    x = input if checked else layout.kernel_ready(input)  # args_ok passes only kernel-ready inputs
    if act in fused.ACTIVATIONS and (residual is None or (fused.RESIDUAL and _same_tensor_kind(x, residual))):
        if residual is not None:
            residual = layout.like(x, residual)
        return ops.batch_norm(
            name, x, weight, bias, running_mean, running_var,
            training, float(momentum), float(eps), act, slope, residual,
        )  # fmt: skip
    # What this backend's kernels do not fuse runs as torch ops after the BatchNorm kernel: what the
    # unfused layers cost, with torch's broadcasting, type promotion and gradients.
    y = ops.batch_norm(name, x, weight, bias, running_mean, running_var, training, float(momentum), float(eps), 0, 0.0)
    return _add_and_activate(y, residual, act, slope)


def backward_may_follow(input, weight, bias, residual) -> bool:
    """Whether autograd will record this call (grad enabled, a tensor argument requiring grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual))


def _add_and_activate(y: torch.Tensor, residual: torch.Tensor | None, act: int, slope: float) -> torch.Tensor:
    """``act(y [+ residual])`` for a BatchNorm output y, as torch ops."""
    if y.requires_grad:
        return act_codes.apply(y if residual is None else y + residual, act, slope)
    # Inference: y is a fresh tensor nobody else holds, so the add and the activation may
    # overwrite it, as torchvision's in-place activations do (a new output is a new allocation).
    if residual is not None:
        y = y.add_(residual) if _same_tensor_kind(y, residual) else y + residual
    return act_codes.apply(y, act, slope, inplace=True)


def _stats_share_memory(running_mean: torch.Tensor, running_var: torch.Tensor, others) -> bool:
    """Whether the running stats share a storage with each other or with a tensor of ``others`` (None
    entries skipped). Tensors without a storage of their own (wrapper subclasses, fake tensors) share none."""
    if any(isinstance(t, FakeTensor) for t in (running_mean, running_var, *others)):
        return False
    try:
        stats = {running_mean.untyped_storage().data_ptr(), running_var.untyped_storage().data_ptr()}
        return len(stats) == 1 or any(t is not None and t.untyped_storage().data_ptr() in stats for t in others)
    except (RuntimeError, NotImplementedError):
        return False


def _same_tensor_kind(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether ``x + residual`` needs no broadcasting or type promotion (so a kernel can fuse the add)."""
    return residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device
