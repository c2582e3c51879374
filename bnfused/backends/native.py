"""The C++/CUDA backend: "cpp" for CPU tensors, "cuda" for CUDA tensors (one library, csrc/).

The ``bnfused_native`` operator library is found, in order, as
  1. the ahead-of-time module ``bnfused._C`` (``BNFUSED_BUILD_EXT=1 pip install -e . --no-build-isolation``);
  2. a just-in-time build with ``torch.utils.cpp_extension.load`` and ninja, cached under
     ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) and rebuilt when a source changes.
CUDA sources are compiled whenever torch is a CUDA build and a CUDA toolkit is found ($CUDA_HOME,
then /usr/local/cuda), whether or not a GPU is visible. Nothing happens at import: the first call
to ``available`` or to an op builds or loads the library, once per process, and a failure becomes
the reason ``available`` returns, never an exception at ``import bnfused``.

The contract functions (``forward_train``, ``backward``, ...) ARE the ``torch.ops.bnfused_native``
op overloads, so an eager call goes straight from Python into the C++ op, with no wrapper frame.
This module has no import-time side effects and imports nothing from bnfused at module level, so
setup.py can load it by path for the ahead-of-time build flags (``extension_kwargs``).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
OP_NAMES = (
    "forward_train",
    "forward_eval",
    "backward",
    "batch_stats",
    "normalize",
    "backward_reduce",
    "backward_elemt",
)
# Beyond the contract: the whole layer with its autograd in C++ (csrc/autograd.cpp), for eager
# calls where a Python autograd.Function would cost more than the kernels of a small layer:
# batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope) -> y
LAYER_OP = "batch_norm"
# torch's CPU capability -> compiler flags giving at::vec the same vector width ATen itself uses.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
# Compiled when no GPU is visible to pick the arch from (and TORCH_CUDA_ARCH_LIST is unset): Ampere,
# and Hopper with PTX so that newer GPUs can JIT it. Each entry costs a full device compile.
_DEFAULT_CUDA_ARCHS = ("80", "90")


@dataclass(frozen=True)
class Library:
    """Outcome of loading the extension: None, or why not, for the library and its CUDA kernels."""

    error: str | None
    cuda_error: str | None
    origin: str  # "aot", "jit" or "none"


# --------------------------------------------------------------------------- build configuration


def cuda_toolkit() -> tuple[str | None, str | None]:
    """(CUDA_HOME, None) when CUDA sources can be compiled here, else (None, reason).

    Keyed on torch being a CUDA build and on nvcc existing, never on a GPU being visible.
    """
    if torch.version.cuda is None:
        return None, "torch is a CPU-only build"
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home, None
    return None, "no CUDA toolkit found (no bin/nvcc under $CUDA_HOME or /usr/local/cuda)"


def _cpu_flags() -> tuple[str, list[str]]:
    capability = torch.backends.cpu.get_cpu_capability()
    isa = _ISA_FLAGS.get(capability)
    if isa is None:
        capability, isa = "DEFAULT", []
    macros = [f"-DCPU_CAPABILITY={capability}"] + ([f"-DCPU_CAPABILITY_{capability}"] if isa else [])
    return capability.lower(), ["-O3", *isa, *macros, *_openmp_flags()]


def _openmp_flags() -> list[str]:
    # With ATen's OpenMP backend, at::parallel_for is an inline `#pragma omp parallel` compiled into
    # the extension: without -fopenmp it silently runs on one thread.
    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


def _cuda_flags() -> list[str]:
    flags = ["-O3"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Explicit -gencode flags stop cpp_extension from querying a device that is not there.
        *older, newest = _DEFAULT_CUDA_ARCHS
        flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in older]
        flags.append(f"-gencode=arch=compute_{newest},code=[sm_{newest},compute_{newest}]")
    return flags


def extension_kwargs(with_cuda: bool) -> dict:
    """Name, sources and flags of the extension, shared by the JIT build here and setup.py."""
    isa, cflags = _cpu_flags()
    sources = [CSRC / "bnfused.cpp", CSRC / "autograd.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]
    kwargs = {"sources": [str(s) for s in sources], "extra_cflags": cflags, "extra_ldflags": _openmp_flags()}
    if with_cuda:
        kwargs["sources"] += [str(s) for s in sorted((CSRC / "cuda").glob("*.cu"))]
        kwargs["extra_cuda_cflags"] = _cuda_flags()
    kwargs["name"] = f"bnfused_native_{isa}" + ("_cuda" if with_cuda else "")
    return kwargs


# --------------------------------------------------------------------------- loading


def _jit_build(with_cuda: bool) -> None:
    home = cuda_toolkit()[0]
    if home is not None:
        # Before cpp_extension is imported: it fixes its CUDA_HOME then, from the nvcc on PATH when the
        # variable is unset, and that nvcc may be a wrapper script outside the toolkit.
        os.environ.setdefault("CUDA_HOME", home)
    from torch.utils import cpp_extension

    kwargs = extension_kwargs(with_cuda)
    if with_cuda:
        cpp_extension.CUDA_HOME = home  # in case cpp_extension was imported (and guessed) earlier
    if not CSRC.is_dir():
        raise FileNotFoundError(f"C++ sources not found at {CSRC} (install bnfused from a source checkout)")
    cpp_extension.verify_ninja_availability()
    built = Path(cpp_extension._get_build_directory(kwargs["name"], verbose=False)) / f"{kwargs['name']}.so"
    newest_source = max(p.stat().st_mtime for p in CSRC.rglob("*") if p.is_file())
    if not built.exists() or built.stat().st_mtime < newest_source:
        kind = "C++/CUDA" if with_cuda else "C++"
        print(f"bnfused: compiling the {kind} extension into {built.parent} (once; a few minutes)", file=sys.stderr)
    cpp_extension.load(**kwargs, with_cuda=with_cuda, is_python_module=False, verbose=False)


def _describe(exc: Exception) -> str:
    """One line for a build failure: the compiler's first error, not its whole log."""
    lines = str(exc).splitlines()
    first_error = next((line.strip() for line in lines if "error" in line.lower() and "Error building" not in line), "")
    head = lines[0][:120] if lines else ""
    return f"{type(exc).__name__}: {head}" + (f" ... {first_error[:300]}" if first_error else "")


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("bnfused_native::forward_train", "CUDA")


def _import_prebuilt() -> bool:
    """Imports the ahead-of-time module bnfused._C; False when there is none (or it cannot load)."""
    try:
        importlib.import_module("bnfused._C")
        return True
    except ModuleNotFoundError:
        return False
    except Exception as exc:  # e.g. built against another torch: build just in time instead
        print(f"bnfused: ignoring the prebuilt bnfused._C ({type(exc).__name__}: {exc})", file=sys.stderr)
        return False


def _load() -> Library:
    """Imports the ahead-of-time module, else JIT-builds (with CUDA when possible, else without)."""
    origin = "aot" if _import_prebuilt() else "jit"
    cuda_reason = None
    if origin == "jit":
        home, cuda_reason = cuda_toolkit()
        try:
            _jit_build(with_cuda=home is not None)
        except Exception as exc:
            if home is None:
                return Library(f"building the C++ extension failed: {_describe(exc)}", cuda_reason, "none")
            cuda_reason = f"compiling the CUDA sources failed: {_describe(exc)}"
            try:  # the CPU kernels may still build without the CUDA sources
                _jit_build(with_cuda=False)
            except Exception as exc2:
                return Library(f"building the C++ extension failed: {_describe(exc2)}", cuda_reason, "none")
    if not _has_cuda_kernels():
        cuda_reason = cuda_reason or "the extension was built without its CUDA kernels"
    else:
        cuda_reason = None
    _register_fakes()
    return Library(None, cuda_reason, origin)


@functools.cache
def library() -> Library:
    """The loaded extension (built on the first call in a process; the outcome is cached)."""
    return _load()


def available(device: torch.device) -> str | None:
    """None when the extension has kernels for ``device``'s tensors, else the reason it has not."""
    lib = library()
    if lib.error is not None:
        return lib.error
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return lib.cuda_error
    return f"the extension has no kernels for {device.type} tensors"


def __getattr__(name: str):
    """The contract functions: the op overloads themselves, looked up once (PEP 562)."""
    if name not in OP_NAMES and name != LAYER_OP:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    lib = library()
    if lib.error is not None:
        from bnfused.backends import BackendUnavailableError

        raise BackendUnavailableError(f"bnfused: the C++ extension is unavailable: {lib.error}")
    op = getattr(torch.ops.bnfused_native, name).default
    globals()[name] = op  # later lookups find the op directly, without this function
    return op


# --------------------------------------------------------------------------- fake (meta) kernels


def _register_fakes() -> None:
    """Shape/dtype-only kernels, so that torch.compile and opcheck can trace the ops."""

    def stats_like(x):
        return x.new_empty(x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    def fake(name):
        def register(fn):
            try:
                torch.library.register_fake(f"bnfused_native::{name}")(fn)
            except RuntimeError as exc:  # a second _load() in one process (a reloaded module)
                if "already" not in str(exc):
                    raise
            return fn

        return register

    @fake("forward_train")
    def _(x, weight, bias, running_mean, running_var, momentum, eps, act, slope):
        return torch.empty_like(x), stats_like(x), stats_like(x)

    @fake("forward_eval")
    def _(x, weight, bias, running_mean, running_var, eps, act, slope):
        return torch.empty_like(x)

    @fake("backward")
    def _(dy, x, y, weight, mean, invstd, act, slope, training, needs_input, needs_weight, needs_bias):
        return (
            torch.empty_like(x) if needs_input else None,
            stats_like(x) if needs_weight else None,
            stats_like(x) if needs_bias else None,
        )

    @fake("batch_stats")
    def _(x):
        return stats_like(x), stats_like(x)

    @fake("normalize")
    def _(x, weight, bias, mean, invstd, act, slope):
        return torch.empty_like(x)

    @fake("backward_reduce")
    def _(dy, x, y, mean, invstd, act, slope):
        return stats_like(x), stats_like(x)

    @fake("backward_elemt")
    def _(dy, x, y, weight, mean, invstd, sum_dy, sum_dy_xhat, count, act, slope):
        return torch.empty_like(x)
