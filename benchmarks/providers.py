"""Providers: the BatchNorm implementations a benchmark puts side by side, by name.

A provider name is ``<base>[+functional][+relu]``:

    torch              torch.nn.BatchNorm (native kernels; cuDNN / MIOpen on GPUs)
    compile            torch.compile of the torch.nn module
    scratch            the from-scratch tutorial BatchNorm (benchmarks/scratch_bn.py), the teaching baseline
    bnfused            bnfused with its default backend ("auto")
    bnfused-<backend>  bnfused with one backend: reference, triton, cpp, cuda, ...
    <base>+relu        followed by ReLU: a separate nn.ReLU for torch/compile/scratch, the fused
                       activation for bnfused
    <base>+functional  torch and bnfused only: the layer's tensors called through the functional
                       (F.batch_norm, bnfused.functional.batch_norm), the per-call path of code that
                       does not use the modules

The bnfused backends are discovered with ``bnfused.availability``, so a new backend shows up here
without a change to this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bnfused
from benchmarks.scratch_bn import ScratchBatchNorm

BASES = ("torch", "compile", "scratch", "bnfused")
RELU_SUFFIX = "+relu"
FUNCTIONAL_SUFFIX = "+functional"
# The Triton interpreter is orders of magnitude slower than any real kernel: on CPU it is a
# correctness tool, not a benchmark candidate, so it is only run when asked for by name.
_NOT_BENCHMARKED_BY_DEFAULT = {"cpu": ("triton",)}


@dataclass(frozen=True)
class Provider:
    """One parsed provider name. ``backend`` is the bnfused backend request (None outside bnfused)."""

    name: str
    base: str
    backend: str | None
    relu: bool
    functional: bool = False

    @property
    def compiled(self) -> bool:
        return self.base == "compile"

    @property
    def baseline(self) -> str:
        """The provider this one's speedup is measured against: torch, called the same way."""
        return "torch" + FUNCTIONAL_SUFFIX if self.functional else "torch"


def split_backend(base: str, name: str) -> tuple[str, str | None]:
    """("bnfused", backend) for ``bnfused`` ("auto") and ``bnfused-<backend>``, else (base, None);
    ``name`` is the whole provider name, for the error of an unknown backend."""
    if base == "bnfused":
        return base, "auto"
    if not base.startswith("bnfused-"):
        return base, None
    backend = base[len("bnfused-") :]
    known = tuple(n for n in bnfused.backends.NAMES if n != "auto")
    if backend not in known:
        raise ValueError(f"unknown bnfused backend {backend!r} in provider {name!r}; known: {', '.join(known)}")
    return "bnfused", backend


def parse(name: str) -> Provider:
    """Parses ``<base>[+functional][+relu]`` (see the module docstring); raises ValueError naming what
    is wrong."""
    text = name.strip().lower()
    rest = text
    relu = rest.endswith(RELU_SUFFIX)
    rest = rest[: -len(RELU_SUFFIX)] if relu else rest
    functional = rest.endswith(FUNCTIONAL_SUFFIX)
    base, backend = split_backend(rest[: -len(FUNCTIONAL_SUFFIX)] if functional else rest, name)
    if base not in BASES:
        raise ValueError(
            f"unknown provider {name!r}: expected one of {', '.join(BASES)}, bnfused-<backend>, each optionally "
            "+functional (torch, bnfused) and +relu"
        )
    if functional and base not in ("torch", "bnfused"):
        raise ValueError(f"provider {name!r}: +functional applies to torch and bnfused only")
    return Provider(text, base, backend, relu, functional)


def available_backends(device: torch.device) -> list[str]:
    """The bnfused backends that can run on ``device``, each implementation once, auto's choices first.

    Two names can share one implementation ("cpp" and "cuda" are one extension whose op dispatches
    on the tensor's device); the name auto uses for this device is the one kept.
    """
    skip = _NOT_BENCHMARKED_BY_DEFAULT.get(device.type, ())
    available = [n for n, reason in bnfused.availability(device).items() if reason is None and n not in skip]
    preferred = [n for n in bnfused.backends.AUTO_ORDER.get(device.type, ()) if n in available]
    names, modules = [], []
    for name in preferred + [n for n in available if n not in preferred]:
        module = bnfused.backends.module(name)
        if not any(module is seen for seen in modules):
            names.append(name)
            modules.append(module)
    return names


def default_names(device: torch.device) -> list[str]:
    """torch, torch+relu, compile, compile+relu, bnfused-<every available backend>, bnfused+relu, scratch."""
    backends = available_backends(device)
    return [
        "torch", "torch+relu", "compile", "compile+relu",
        *(f"bnfused-{b}" for b in backends), "bnfused+relu", "scratch",
    ]  # fmt: skip


def resolved_backend(provider: Provider, device: torch.device) -> str:
    """The concrete bnfused backend the provider runs ("" for non-bnfused providers)."""
    if provider.base != "bnfused":
        return ""
    return bnfused.backends.resolve(provider.backend, device)


_TORCH_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_FUSED_CLASSES = {2: bnfused.BatchNorm1d, 3: bnfused.BatchNorm1d, 4: bnfused.BatchNorm2d, 5: bnfused.BatchNorm3d}


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters and running stats of a layer fed ``dtype`` inputs: float32 (float64 for float64),
    as mixed-precision training keeps them."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def build_layer(provider: Provider, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A BatchNorm (+ReLU) layer for ``dtype`` inputs of ``shape`` (N, C, *).

    Parameters are in ``param_dtype(dtype)``, except the scratch layer's: written without mixed
    precision in mind, it keeps everything in the input dtype, as tutorial code does.
    """
    if len(shape) not in _TORCH_CLASSES:
        raise ValueError(f"BatchNorm takes 2D to 5D inputs (N, C, *); got shape {shape}")
    num_features = shape[1]
    factory = {"device": device, "dtype": param_dtype(dtype)}
    if provider.functional:
        return _FunctionalCall(_TORCH_CLASSES[len(shape)](num_features, **factory), provider)
    if provider.base == "bnfused":
        activation = "relu" if provider.relu else None
        return _FUSED_CLASSES[len(shape)](num_features, activation=activation, backend=provider.backend, **factory)
    if provider.base == "scratch":
        layer: nn.Module = ScratchBatchNorm(num_features).to(device=device, dtype=dtype)
    else:
        layer = _TORCH_CLASSES[len(shape)](num_features, **factory)
    if provider.relu:
        # In place, as torchvision's ResNets do: BatchNorm's backward does not need its output.
        layer = nn.Sequential(layer, nn.ReLU(inplace=True))
    if provider.compiled:
        # Dynamo caches compiled code per code object and gives up after a few recompiles; every
        # layer here is a new module, so start each from a clean cache rather than fall back to eager.
        torch._dynamo.reset()
        layer = torch.compile(layer)
    return layer


class _FunctionalCall(nn.Module):
    """A BatchNorm layer's tensors called through a functional, with the module's train/eval flag:
    ``F.batch_norm`` (then ``F.relu``) or ``bnfused.functional.batch_norm`` (relu fused). Both
    providers pay this wrapper's call alike; num_batches_tracked is not counted, as by neither
    functional."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, provider: Provider) -> None:
        super().__init__()
        self.layer = layer
        self.provider = provider

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, p = self.layer, self.provider
        args = (x, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training, bn.momentum, bn.eps)
        if p.base == "bnfused":
            return bnfused.functional.batch_norm(*args, activation="relu" if p.relu else None, backend=p.backend)
        y = F.batch_norm(*args)
        return F.relu(y, inplace=True) if p.relu else y
