"""BatchNorm(+activation) written as torch's own ops, for compilers, tracers and exporters.

Under ``torch.compile`` an opaque custom op is a wall for Inductor: it cannot fuse BatchNorm with
its neighbours (the activation, a residual add, the next elementwise op) nor fold an eval-mode
BatchNorm into the preceding convolution (``torch._inductor.config.freezing``). Written as
``F.batch_norm`` followed by the activation, a bnfused layer gives Inductor exactly the graph that
``torch.nn.BatchNorm`` gives it, so a compiled model with bnfused layers is compiled as torch's is.
The same graph is what ``torch.jit.trace`` records and what ONNX exporters translate (into a
standard BatchNormalization node and the activation after it).

The compile policy picks, per device type, what a *training-mode* layer becomes under
``torch.compile``: "decompose" (this module) or "kernels" (bnfused's own kernels as opaque
``torch.ops.bnfused`` ops). Eval mode always decomposes: it is a per-channel affine, which Inductor
fuses and folds better than any standalone kernel.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from bnfused import activation as act_codes
from bnfused import layout

COMPILE_MODES = ("decompose", "kernels")
# Measured on whole models (benchmarks/bench_models.py, README "Under torch.compile"): on CPU the
# decomposition is what Inductor compiles best. CUDA has not been measured yet; it decomposes too,
# which is by construction what torch.nn.BatchNorm compiles to.
_DEFAULT_COMPILE_MODE = {"cpu": "decompose", "cuda": "decompose"}


def _mode_from_env() -> str | None:
    value = os.environ.get("BNFUSED_COMPILE", "").strip().lower()
    if value and value not in COMPILE_MODES:
        raise ValueError(f"bnfused: BNFUSED_COMPILE must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value or None


_compile_mode: str | None = _mode_from_env()


def set_compile_mode(mode: str | None) -> None:
    """What a training-mode bnfused layer becomes under ``torch.compile``, on every device.

    "decompose": torch's own ops, which Inductor fuses with neighbouring ops (the default);
    "kernels": bnfused's kernels as opaque ops (``torch.ops.bnfused.*``);
    None: back to the per-device default. The BNFUSED_COMPILE environment variable sets it at import.
    Takes effect for graphs compiled afterwards (call ``torch._dynamo.reset()`` to recompile).
    """
    global _compile_mode
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"bnfused: compile mode must be one of {', '.join(COMPILE_MODES)} or None, got {mode!r}")
    _compile_mode = mode


def get_compile_mode(device_type: str = "cpu") -> str:
    """The compile mode in force for training-mode layers on ``device_type``."""
    return _compile_mode or _DEFAULT_COMPILE_MODE.get(device_type, "decompose")


def use_torch_ops(x: torch.Tensor, training: bool) -> bool:
    """True when this call must be expressed in torch's ops: under jit tracing (a traced or exported
    graph must hold ops that torch, TorchScript and ONNX know), under torch.func transforms and
    forward-mode AD (see ``transform_active``), and under torch.compile in eval mode or when the
    compile mode says so (the kernels' ops have no batching rule or jvp formula, so transforms
    decompose there too)."""
    if torch.compiler.is_compiling():
        return (
            not training
            or get_compile_mode(x.device.type) == "decompose"
            or _functorch_depth_when_traced() > 0
            or _forward_level_when_traced() >= 0
        )
    return transform_active() or _tracing_state() is not None


# torch.jit.is_tracing() without its Python wrapper (62 ns against 177 ns: this runs on every call).
_tracing_state = torch._C._get_tracing_state

# torch.func's transform depth: 0 outside any transform (a C function: no Python frame per call).
functorch_depth = torch._C._functorch.get_dynamic_layer_stack_depth


# The depth under torch.compile: Dynamo folds the builtin on torch 2.14 but refuses it on 2.11
# (Unsupported, "marked as skipped"). A function marked constant-result it calls while tracing, when
# the transforms it inlines have pushed their levels for real, so the depth is this call's. One path
# on every torch (the one CI runs), no guard needed: Dynamo guards a frame entered under a transform
# on the functorch stack, and forward-mode AD on its dual level.
@torch.compiler.assume_constant_result
def _functorch_depth_when_traced() -> int:
    return functorch_depth()


# The forward-mode AD level under torch.compile, read the same way: Dynamo sets it for real while it
# traces a dual level or torch.func.jvp, and a read of the global would guard every compiled frame on
# it (a call with a dual input then fails the guard, and the recompile gives up on the whole frame).
@torch.compiler.assume_constant_result
def _forward_level_when_traced() -> int:
    return forward_ad._current_level


def transform_active() -> bool:
    """A torch.func transform (vmap, grad, jvp, jacrev, jacfwd, hessian) is running, or a
    forward-mode AD level (``torch.autograd.forward_ad.dual_level``) is open.

    bnfused's kernels see plain tensors only: under vmap they would normalise the whole stacked
    batch as one, and their autograd has no forward-mode (jvp) formula. torch's ops carry batching
    rules and forward derivatives, with torch's errors where torch refuses (e.g. an in-place
    running-stat update of an unbatched buffer under vmap). Two reads, about 50 ns together.
    """
    return functorch_depth() > 0 or forward_ad._current_level >= 0


def batch_norm(
    x, running_mean, running_var, weight, bias, training, momentum, eps, act, slope, residual=None
) -> torch.Tensor:
    """``act(F.batch_norm(...) [+ residual])`` on checked arguments: the graph torch's BatchNorm, the
    add and the activation give."""
    y = normalize(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return act_codes.apply(y, act, slope)


def normalize(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],  # noqa: UP045 (TorchScript compiles this function)
    running_var: Optional[torch.Tensor],  # noqa: UP045
    weight: Optional[torch.Tensor],  # noqa: UP045
    bias: Optional[torch.Tensor],  # noqa: UP045
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """``F.batch_norm``, and the same computation in plainer ops in a compiled forward-mode step (see
    ``_composed_batch_norm``). Scriptable: the scripted module forward calls it."""
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling() and _forward_level_when_traced() >= 0:
            return _composed_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


_HALF_TYPES = (torch.float16, torch.bfloat16)


def _composed_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) -> torch.Tensor:
    """``F.batch_norm`` as reductions and elementwise ops, for a compiled forward-mode (jvp) step.

    Dynamo on torch 2.14 and 2.15 fails to trace torch's batch_norm under forward-mode AD some of the
    time (an internal assert in ``_fw_primal``/``_make_dual``, or a pass, depending on when the
    garbage collector last ran), whoever calls it; these ops carry forward derivatives of their own
    and trace every time. The values are torch's to rounding (statistics in float32 for half/bfloat16
    input, as torch's), in the memory format torch's eager layer gives; the running statistics are
    updated by torch's own op on the detached input (torch.func refuses an in-place update of a
    captured tensor from Python ops, and the update carries no tangent), and in eval mode they are
    constants, as torch's derivative formula takes them.
    """
    stats_dims = [0, *range(2, x.dim())]
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    xf = x.float() if x.dtype in _HALF_TYPES else x
    if training:
        var, mean = torch.var_mean(xf, stats_dims, correction=0)
        if running_mean is not None:
            F.batch_norm(x.detach(), running_mean, running_var, None, None, True, momentum, eps)
    else:
        mean, var = running_mean.detach().to(xf.dtype), running_var.detach().to(xf.dtype)
    scale = torch.rsqrt(var + eps)
    if weight is not None:  # torch takes a weight and bias of any shape with C elements
        scale = scale * weight.reshape(-1)
    y = (xf - mean.reshape(per_channel)) * scale.reshape(per_channel)
    if bias is not None:
        y = y + bias.reshape(per_channel)
    return y.to(x.dtype).contiguous(memory_format=layout.suggested_format(x))
