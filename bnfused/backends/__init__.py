"""Backend registry and selection: the one place that decides which implementation runs.

Every backend is a module exposing the same functions with the same arguments (the reference
backend, ``reference.py``, defines them and their semantics):

    available(device) -> str | None          reason the backend cannot run on ``device``, or None
    ACTIVATIONS: frozenset[int]              the activation codes its kernels fuse
    RESIDUAL: bool                           whether its kernels fuse the residual add
    DISPATCHED: bool                         whether its kernels run as ops of torch's dispatcher, which
                                             tensor subclasses, fake tensors and dispatch modes see
                                             (inputs that need it go to torch's ops otherwise)
    forward_train(x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual=None)
        -> (y, mean, invstd)
    forward_eval(x, weight, bias, running_mean, running_var, eps, act, slope, residual=None) -> y
    backward(dy, x, y, weight, mean, invstd, act, slope, training, needs_input, needs_weight, needs_bias,
             bias=None, residual=None, needs_residual=False)
        -> (dx | None, dweight | None, dbias | None, dresidual | None)
    and the split primitives used by SyncBatchNorm (activations 0-2, no residual):
    batch_stats(x) -> (mean, biased_var)
    normalize(x, weight, bias, mean, invstd, act, slope) -> y
    backward_reduce(dy, x, y, mean, invstd, act, slope) -> (sum_g, sum_g_xhat)
    backward_elemt(dy, x, y, weight, mean, invstd, sum_g, sum_g_xhat, count, act, slope) -> dx
    and optionally, for eager calls where a Python autograd.Function costs more than a small layer:
    batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, residual=None) -> y
        the whole layer with an autograd of its own (same forward and backward as the functions above)

Arguments: x is (N, C, *) with N * prod(*) > 0, dense, with its spatial dims collapsible to one
stride (contiguous, channels_last, or an (N, L, C) tensor viewed as (N, C, L)); dy and residual
have x's shape, dtype and strides. weight, bias, running_mean, running_var are (C,) or None. mean
and invstd are (C,) float32 (float64 for float64 x). y, dx, dresidual come back with x's dtype and
strides; dweight and dbias in float32 (float64). ``act`` is a code from ``bnfused.activation``
(0 none, 1 relu, 2 leaky_relu, 3 relu6, 4 hardswish, 5 silu, 6 sigmoid); ``slope`` the leaky_relu slope (0
otherwise).

The layer: z = (x - mean) * invstd * weight + bias (+ residual), y = act(z), computed in the
accumulation dtype and rounded once to x's dtype. The backward's g = dy * act'(z), with torch's
conventions at the kinks (relu' = 0 and leaky_relu' = slope at z = 0; relu6' = 0 at z = 0 and 6;
hardswish' = z / 3 + 1/2 on -3 < z < 3, 0 at z <= -3, 1 at z >= 3). For relu, leaky_relu and relu6, act'
is read off the saved output y (y is passed for those codes, None for the others: 0 < y exactly
where 0 < z, and 0 < y < 6 exactly where 0 < z < 6). For hardswish, silu and sigmoid, z is recomputed from
x, mean, invstd, weight and the ``bias`` and ``residual`` the forward had. dresidual = g
(for act 0 it may be dy itself); dweight = sum(g * x_hat), dbias = sum(g), and dx as for the plain
layer with g in place of dy.

Names: "reference" (pure PyTorch, anywhere), "triton" (CUDA tensors, or CPU tensors when
TRITON_INTERPRET=1), "cpp" (the C++ extension on CPU tensors), "cuda" (the extension's CUDA kernels),
and "auto", which picks the first available of ``AUTO_ORDER[device type]`` and warns once when it
has to fall back. The default comes from ``set_backend`` or the BNFUSED_BACKEND environment variable.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from types import ModuleType

import torch

from bnfused.backends import auto_policy

_MODULES = {
    "reference": "bnfused.backends.reference",
    "triton": "bnfused.backends.triton",
    "cpp": "bnfused.backends.native",
    "cuda": "bnfused.backends.native",
}
NAMES = ("auto", *_MODULES)

# Fastest first. The reference path closes every list, so "auto" always finds something.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}
_AUTO_DEFAULT_ORDER = ("reference",)

# Names that share a module but serve one device type each (the C++ extension's CPU and CUDA kernels).
_DEVICE_TYPE = {"cpp": "cpu", "cuda": "cuda"}

_loaded: dict[str, ModuleType] = {}
_resolved: dict[tuple[str, torch.device], str] = {}
_default = os.environ.get("BNFUSED_BACKEND", "auto").strip().lower() or "auto"
if _default not in NAMES:  # at import, as BNFUSED_COMPILE: compiled and scripted calls never resolve a backend
    raise ValueError(f"bnfused: BNFUSED_BACKEND must be one of {', '.join(NAMES)}, got {_default!r}")


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run here; the message says why."""


def check_name(name: str) -> str:
    """``name`` as the backends know it (case and spaces aside); ValueError for an unknown one."""
    if not isinstance(name, str):
        raise TypeError(f"bnfused: a backend is named by a string, got {type(name).__name__}")
    known = name.strip().lower()
    if known not in NAMES:
        raise ValueError(f"bnfused: unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return known


def check_request(request: str | None) -> str | None:
    """A ``backend=`` argument as the backends know it (None asks for the default); raises for one
    that names no backend. Names already so pass with one membership test, the per-call case."""
    return request if request is None or request in NAMES else check_name(request)


def set_backend(name: str) -> None:
    """Sets the backend used by modules and functions that are not given one explicitly."""
    global _default
    _default = check_name(name)
    _resolved.clear()


def get_backend() -> str:
    """The process-wide default backend name ("auto" unless changed)."""
    return _default


def module(name: str) -> ModuleType:
    """Imports a backend module (lazily: Triton and the C++ build are only touched when used)."""
    mod = _loaded.get(name)
    if mod is None:
        mod = _loaded[name] = importlib.import_module(_MODULES[name])
    return mod


def needs_dispatch(*tensors: torch.Tensor | None) -> bool:
    """Whether a backend whose kernels are launched from Python (``DISPATCHED = False``) must leave this
    call to torch's ops: a tensor subclass (its ``__torch_function__`` / ``__torch_dispatch__``, and its
    class on the output, as torch's BatchNorm gives them), a fake tensor, or any tensor while a dispatch
    mode is active (FakeTensorMode, FlopCounterMode). Compiled calls reach the kernels through
    bnfused's registered ops, which Dynamo traces."""
    if torch.compiler.is_compiling():
        return False
    plain = (torch.Tensor, torch.nn.Parameter)
    return torch._C._len_torch_dispatch_stack() > 0 or any(t is not None and t.__class__ not in plain for t in tensors)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if device.index >= count:
            return f"{device} does not exist: torch sees {count} CUDA device(s)"
    wanted = _DEVICE_TYPE.get(name)
    if wanted is not None and device.type != wanted:
        other = next(n for n, t in _DEVICE_TYPE.items() if t == device.type) if device.type in ("cpu", "cuda") else None
        return f"backend {name!r} runs on {wanted} tensors" + (f"; use {other!r}" if other else "")
    try:
        return module(name).available(device)
    except Exception as exc:  # an import or build failure is a reason, not a crash
        return f"{type(exc).__name__}: {exc}"


@torch.compiler.assume_constant_result  # traced as its value: the first call imports and may build
def resolve(name: str | None, device: torch.device) -> str:
    """Turns a requested backend ("auto", None or a name) into a concrete, available backend name.

    Cached per (request, device), so a module call pays one dict lookup after the first (keyed by the
    device itself: reading ``device.type`` costs more than the lookup).
    """
    key = (name or _default, device)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve_uncached(key[0], device)
    return found


def _resolve_uncached(name: str, device: torch.device) -> str:
    name = check_name(name)
    if device.type == "meta":  # shapes only, no data: the reference path propagates them, as torch's meta kernels do
        return "reference"
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"bnfused: backend {name!r} is unavailable for {device.type} tensors: {reason}"
            )
        return name
    skipped = []
    for candidate in AUTO_ORDER.get(device.type, _AUTO_DEFAULT_ORDER):
        reason = unavailable_reason(candidate, device)
        if reason is None:
            if skipped:
                warnings.warn(
                    f"bnfused: using backend {candidate!r} for {device.type} tensors; "
                    + "; ".join(f"{n!r} is unavailable ({r})" for n, r in skipped),
                    RuntimeWarning,
                    stacklevel=_caller_stacklevel(),
                )
            return candidate
        skipped.append((candidate, reason))
    # Only a device no tensor can live on gets here (the reference backend runs on every other one).
    raise BackendUnavailableError(
        f"bnfused: no backend can run on {device}: " + "; ".join(f"{n!r}: {r}" for n, r in skipped)
    )


# Frames of these packages are skipped when a warning names the line that caused it: the user's call
# reaches the backends through a module's __call__ (torch) and bnfused's layers.
_LIBRARY_DIRS = tuple(os.path.dirname(p) + os.sep for p in (os.path.dirname(__file__), torch.__file__))
# torch.fx's generated forward (a converted model's GraphModule) names its code "<eval_with_key>.N ...".
_GENERATED_CODE = ("<eval_with_key>",)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function point at the first
    frame outside bnfused and torch: the user's line that called the layer."""
    frame, level = sys._getframe(1), 1  # level 1: the frame that calls warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS + _GENERATED_CODE):
        frame, level = frame.f_back, level + 1
    return level


def defers_to_torch(request: str | None, name: str, x: torch.Tensor, training: bool, backward: bool) -> bool:
    """Whether this call, which ``request`` resolved to backend ``name`` (one of ``DEFERS_WHEN_AUTO``),
    goes to torch's own BatchNorm instead: only for "auto", only where torch was measured faster
    (``auto_policy``); ``backward``: a backward may follow."""
    return _asks_auto(request) and auto_policy.torch_is_faster(name, x, training, backward)


def defers_in_every_mode(request: str | None, x: torch.Tensor) -> bool:
    """True only where ``defers_to_torch`` is True whatever the training flag and backward (x lies
    outside every measured regime); False decides nothing. Most layers are such, so a caller asks this
    first and works out its mode (about 1 us a call) only when it says False."""
    return _asks_auto(request) and auto_policy.outside_measured(x)


def _asks_auto(request: str | None) -> bool:
    return (request or _default).strip().lower() == "auto"


# The backends whose kernels "auto" may leave to torch's (CUDA ones: the CPU kernels are at or past
# ATen's wherever measured).
DEFERS_WHEN_AUTO = frozenset(("triton", "cuda"))


def availability(device: torch.device | str | int) -> dict[str, str | None]:
    """Every concrete backend name mapped to None (available) or the reason it is not; ``device`` as
    torch takes one ("cpu", "cuda:0", a CUDA index or a ``torch.device``)."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device) for name in _MODULES}
