"""The C++/CUDA backend: "cpp" for CPU tensors, "cuda" for CUDA tensors (one library, csrc/).

The ``bnfused_native`` operator library is found, in order, as
  1. the ahead-of-time module ``bnfused._C`` (``BNFUSED_BUILD_EXT=1 pip install -e . --no-build-isolation``);
  2. a just-in-time build with ``torch.utils.cpp_extension.load`` and ninja, under
     ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) in a folder named after a hash of the
     sources and flags (``build_key``): a tree built once is loaded without a compiler from then on,
     and two trees (a pip install and a checkout, two branches) never rebuild each other's.
The JIT build compiles the CUDA sources when torch is a CUDA build, a CUDA toolkit is found
($CUDA_HOME, then /usr/local/cuda) and a GPU is visible, or when $BNFUSED_BUILD_CUDA=1; the
ahead-of-time build whenever a toolkit is found. Nothing happens at import: the first call
to ``available`` or to an op builds or loads the library, once per process, and a failure becomes
the reason ``available`` returns, never an exception at ``import bnfused``.

The contract functions (``forward_train``, ``backward``, ...) ARE the ``torch.ops.bnfused_native``
op overloads, so an eager call goes straight from Python into the C++ op, with no wrapper frame.
``batch_norm`` (the layer op, eager calls only) is the extension module's own binding of it, which
skips torch.ops' argument parsing on plain calls (csrc/autograd.cpp, ``eager_batch_norm``).
This module has no import-time side effects and imports nothing from bnfused at module level, so
setup.py can load it by path for the ahead-of-time build flags (``extension_kwargs``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import shutil
import sys
import tempfile
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
# batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, residual=None) -> y
LAYER_OP = "batch_norm"
# The activation codes the kernels fuse (all of bnfused.activation's: none, relu, leaky_relu, relu6,
# hardswish, silu), and the residual add before the activation (forward_train, forward_eval,
# backward and the layer op; the split primitives take no residual, and backward_reduce and
# backward_elemt only the codes whose act' is read off y, 0-3).
ACTIVATIONS = frozenset({0, 1, 2, 3, 4, 5, 6})
RESIDUAL = True
DISPATCHED = True  # torch.ops.bnfused_native, with fake (meta) implementations
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
    module: object = None  # the extension's Python module (its eager binding of the layer op), if it loaded


# --------------------------------------------------------------------------- build configuration

# "1": the JIT build compiles the CUDA sources even with no GPU visible; "0": never. Unset: only when
# a GPU is visible (they cannot run otherwise, and they double the build time).
BUILD_CUDA_ENV = "BNFUSED_BUILD_CUDA"
# Core-seconds a cold build took on this project's 2-core CI machines, for the build message's estimate:
# the C++ translation units (they compile in parallel; an Intel Xeon, and an AMD EPYC with AVX2 at
# 2 x 244 s), and the CUDA ones (per target architecture).
_CPU_BUILD_CORE_S = (160, 490)
_CUDA_BUILD_S_PER_ARCH = 35
# The file a completed JIT build leaves in its folder: the source tree it was built from.
_BUILT_MARKER = "bnfused_build.txt"
# The files under csrc/ whose contents key a build.
_SOURCE_SUFFIXES = {".cpp", ".h", ".hpp", ".cu", ".cuh"}


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


def jit_cuda_plan() -> tuple[str | None, str | None]:
    """(CUDA_HOME, None) when the JIT build compiles the CUDA sources, else (None, why not).

    They are compiled when a toolkit exists and a GPU is visible, or when $BNFUSED_BUILD_CUDA is 1.
    """
    choice = os.environ.get(BUILD_CUDA_ENV, "").strip()
    if choice not in ("", "0", "1"):
        raise ValueError(f"bnfused: ${BUILD_CUDA_ENV} must be 1 (compile the CUDA kernels), 0 or unset, got {choice!r}")
    if choice == "0":
        return None, f"the CUDA kernels were not compiled (${BUILD_CUDA_ENV}=0)"
    home, reason = cuda_toolkit()
    if home is None:
        return None, reason
    if choice == "1" or torch.cuda.is_available():
        return home, None
    return None, f"no GPU was visible, so only the CPU kernels were compiled (${BUILD_CUDA_ENV}=1 compiles them too)"


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


def extension_kwargs(with_cuda: bool, csrc: Path = CSRC) -> dict:
    """Name, sources and flags of the extension, shared by the JIT build here and setup.py."""
    isa, cflags = _cpu_flags()
    # The CPU kernels first: ninja starts the files in this order, and each takes 3-5x as long to compile
    # as a binding file; with the bindings first, one kernel file compiled alone at the end (AVX2 EPYC,
    # 2 cores, a cold build: 278 s against 244).
    sources = [*sorted((csrc / "cpu").glob("*.cpp")), *sorted(csrc.glob("*.cpp"))]
    kwargs = {"sources": [str(s) for s in sources], "extra_cflags": cflags, "extra_ldflags": _openmp_flags()}
    if with_cuda:
        kwargs["sources"] += [str(s) for s in sorted((csrc / "cuda").glob("*.cu"))]
        kwargs["extra_cuda_cflags"] = _cuda_flags()
    kwargs["name"] = f"bnfused_native_{isa}" + ("_cuda" if with_cuda else "")
    return kwargs


def build_key(kwargs: dict, csrc: Path = CSRC) -> str:
    """A short hash of everything a JIT build's result depends on: the contents of every source and
    header under csrc/, the flags, the compilers, torch and Python. Equal trees share one build,
    wherever they are; any edit, flag or toolchain change gets a build folder of its own."""
    digest = hashlib.sha256()
    environment = [os.environ.get(v, "") for v in ("CXX", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")]
    inputs = [kwargs.get(k) for k in ("name", "extra_cflags", "extra_cuda_cflags", "extra_ldflags")]
    sources = sorted(os.path.relpath(s, csrc) for s in kwargs["sources"])
    digest.update(repr((inputs, sources, environment, torch.__version__, sys.version)).encode())
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file()):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------- loading


def build_estimate(kwargs: dict) -> str:
    """Roughly how long a cold build of ``kwargs`` takes on this machine, in words."""
    cores = max(1, min(os.cpu_count() or 1, len(kwargs["sources"])))
    cuda_s = 0
    if "extra_cuda_cflags" in kwargs:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split() or _DEFAULT_CUDA_ARCHS
        cuda_s = _CUDA_BUILD_S_PER_ARCH * len(archs)

    def words(seconds: float) -> str:
        return f"{round(seconds / 60)} min" if seconds >= 90 else f"{max(10, round(seconds, -1)):.0f} s"

    fast, slow = (core_s / cores + cuda_s for core_s in _CPU_BUILD_CORE_S)
    return f"about {words(fast)} to {words(slow)} on {os.cpu_count()} idle cores, longer on busy ones"


def _seed_from_previous_build(build_dir: Path, stem: str, csrc: Path) -> None:
    """Starts a new build folder from the newest completed build of the same source tree (its object
    files, with their times, and ninja's logs), so that ninja recompiles only what the edit changed."""
    if build_dir.exists():
        return
    previous = [
        d
        for d in build_dir.parent.glob(f"{stem}_*")
        if d.name.rsplit("_", 1)[0] == stem
        and (d / _BUILT_MARKER).is_file()
        and (d / _BUILT_MARKER).read_text().strip() == str(csrc)
    ]
    if not previous:
        return
    newest = max(previous, key=lambda d: (d / _BUILT_MARKER).stat().st_mtime)
    staging = Path(tempfile.mkdtemp(prefix=f".{build_dir.name}.", dir=build_dir.parent))
    staging.chmod(0o755)  # as a folder cpp_extension creates (mkdtemp makes it private)
    for item in newest.iterdir():
        if item.suffix == ".o" or item.name in (".ninja_log", ".ninja_deps"):
            shutil.copy2(item, staging / item.name)
    try:
        staging.rename(build_dir)  # atomic: another process may be creating the same folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def _jit_build(with_cuda: bool) -> Path:
    """Loads the build of this source tree and flags, compiling it first if there is none yet; returns
    the library's path."""
    home = cuda_toolkit()[0]
    if home is not None:
        # Before cpp_extension is imported: it fixes its CUDA_HOME then, from the nvcc on PATH when the
        # variable is unset, and that nvcc may be a wrapper script outside the toolkit.
        os.environ.setdefault("CUDA_HOME", home)
    if not CSRC.is_dir():
        raise FileNotFoundError(f"C++ sources not found at {CSRC} (install bnfused from a source checkout)")
    kwargs = extension_kwargs(with_cuda)
    name = kwargs["name"]
    key = build_key(kwargs)
    build_dir = extensions_root() / f"{name}_{key}"
    library_file = build_dir / f"{name}.so"
    if (build_dir / _BUILT_MARKER).is_file() and library_file.is_file():
        torch.ops.load_library(str(library_file))  # built before: no compiler, no ninja, no lock
        return library_file
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = home  # in case cpp_extension was imported (and guessed) earlier
    cpp_extension.verify_ninja_availability()
    kind = "C++ and CUDA kernels" if with_cuda else "C++ CPU kernels only"
    why = "" if with_cuda else f"; ${BUILD_CUDA_ENV}=1 adds the CUDA kernels"
    print(
        f"bnfused: compiling the extension ({kind}{why}) into {build_dir}: {build_estimate(kwargs)}, "
        "once for these sources and flags",
        file=sys.stderr,
        flush=True,
    )
    _seed_from_previous_build(build_dir, name, CSRC)
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(**kwargs, build_directory=str(build_dir), with_cuda=with_cuda, is_python_module=False)
    # Recomputed from fresh kwargs (cpp_extension appends to the flag lists it is given): when csrc/
    # changed while ninja compiled it, the folder stays unmarked and the next process lets ninja check it.
    if build_key(extension_kwargs(with_cuda)) == key:
        (build_dir / _BUILT_MARKER).write_text(f"{CSRC}\n")
    return library_file


def extensions_root() -> Path:
    """Where JIT builds go: $TORCH_EXTENSIONS_DIR, else torch's default folder for this Python and toolkit."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    import torch._appdirs  # what cpp_extension.get_default_build_root reads (importing that module logs warnings)

    accelerator = "cpu"
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    default_root = os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions"))
    return Path(default_root) / f"{python}_{accelerator}"


def _describe(exc: Exception) -> str:
    """One line for a build failure: the compiler's first error, not its whole log."""
    lines = str(exc).splitlines()
    first_error = next((line.strip() for line in lines if "error" in line.lower() and "Error building" not in line), "")
    head = lines[0][:120] if lines else ""
    return f"{type(exc).__name__}: {head}" + (f" ... {first_error[:300]}" if first_error else "")


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("bnfused_native::forward_train", "CUDA")


def _import_prebuilt():
    """Imports the ahead-of-time module bnfused._C; None when there is none (or it cannot load)."""
    try:
        return importlib.import_module("bnfused._C")
    except ModuleNotFoundError:
        return None
    except Exception as exc:  # e.g. built against another torch: build just in time instead
        print(f"bnfused: ignoring the prebuilt bnfused._C ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _import_jit_module(library_file: Path):
    """The JIT-built library (already loaded by torch.ops.load_library) as a Python module, for its
    eager binding; None if it cannot be imported (the layer op is then called through torch.ops).

    Python finds a module's init function by the last part of its name (PyInit__C), and dlopen hands
    back the library already loaded, so its op registrations do not run twice.
    """
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location(f"{library_file.stem}._C", library_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as exc:
        print(f"bnfused: the eager binding is unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _load() -> Library:
    """Imports the ahead-of-time module, else JIT-builds (with CUDA when planned and possible, else without)."""
    module = _import_prebuilt() or None  # tests stub it with lambda: False
    origin = "aot" if module is not None else "jit"
    cuda_reason = None
    if origin == "jit":
        try:
            home, cuda_reason = jit_cuda_plan()
        except ValueError as exc:
            return Library(str(exc), str(exc), "none")
        try:
            module = _import_jit_module(_jit_build(with_cuda=home is not None))
        except Exception as exc:
            if home is None:
                return Library(f"building the C++ extension failed: {_describe(exc)}", cuda_reason, "none")
            cuda_reason = f"compiling the CUDA sources failed: {_describe(exc)}"
            try:  # the CPU kernels may still build without the CUDA sources
                module = _import_jit_module(_jit_build(with_cuda=False))
            except Exception as exc2:
                return Library(f"building the C++ extension failed: {_describe(exc2)}", cuda_reason, "none")
    if not _has_cuda_kernels():
        cuda_reason = cuda_reason or "the extension was built without its CUDA kernels"
    else:
        cuda_reason = None
    _register_fakes()
    if getattr(module, "args_ok", None) is not None:
        from bnfused import functional

        functional.use_compiled_checks(module.args_ok)
    return Library(None, cuda_reason, origin, module)


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
    if name == LAYER_OP and getattr(lib.module, "batch_norm", None) is not None:
        lib.module.set_fallback(op)  # the binding calls the op itself off its fast path
        op = lib.module.batch_norm
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
    def _(x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual=None):
        return torch.empty_like(x), stats_like(x), stats_like(x)

    @fake("forward_eval")
    def _(x, weight, bias, running_mean, running_var, eps, act, slope, residual=None):
        return torch.empty_like(x)

    @fake("backward")
    def _(
        dy, x, y, weight, mean, invstd, act, slope, training, needs_input, needs_weight, needs_bias,
        bias=None, residual=None, needs_residual=False,
    ):  # fmt: skip
        return (
            torch.empty_like(x) if needs_input else None,
            stats_like(x) if needs_weight else None,
            stats_like(x) if needs_bias else None,
            torch.empty_like(x) if needs_residual else None,
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
