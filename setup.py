"""Package build. The C++/CUDA extension is not built here unless asked for:

    BNFUSED_BUILD_EXT=1 pip install -e . --no-build-isolation

builds it ahead of time as ``bnfused._C`` (with the CUDA kernels when torch is a CUDA build and a
CUDA toolkit is found). Otherwise bnfused.backends.native compiles it on first use, so a plain
install needs no compiler. Sources and flags come from that module (``extension_kwargs``), so the
two builds cannot drift apart.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def native_extension() -> dict:
    if os.environ.get("BNFUSED_BUILD_EXT", "0") != "1":
        return {}
    # Loaded by path: importing the bnfused package would need it installed already.
    spec = importlib.util.spec_from_file_location("bnfused_native_config", ROOT / "bnfused" / "backends" / "native.py")
    native = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(native)
    home, _ = native.cuda_toolkit()
    if home is not None:
        os.environ.setdefault("CUDA_HOME", home)  # before cpp_extension reads it at import
    from torch.utils import cpp_extension

    kwargs = native.extension_kwargs(with_cuda=home is not None)
    if home is not None:
        cpp_extension.CUDA_HOME = home
    extension = cpp_extension.CUDAExtension if home is not None else cpp_extension.CppExtension
    sources = [os.path.relpath(s, ROOT) for s in kwargs["sources"]]  # setuptools wants relative paths
    compile_args = {"cxx": kwargs["extra_cflags"], "nvcc": kwargs.get("extra_cuda_cflags", [])}
    return {
        "ext_modules": [
            extension("bnfused._C", sources, extra_compile_args=compile_args, extra_link_args=kwargs["extra_ldflags"])
        ],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension},
    }


setup(**native_extension())
