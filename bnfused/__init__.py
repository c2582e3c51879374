"""bnfused: fused BatchNorm(+activation) for PyTorch — Triton, C++/CUDA and pure-PyTorch backends.

import bnfused
bn = bnfused.BatchNorm2d(64)                       # drop-in for torch.nn.BatchNorm2d
bn = bnfused.BatchNorm2d(64, activation="relu")    # BN + ReLU in one kernel
y = bnfused.functional.batch_norm(x, rm, rv, w, b, training=True, activation="relu")
model = bnfused.convert_model(model, fuse_relu=True)
model = bnfused.revert_model(model)                # back to torch.nn classes (quantization fusion)
"""

from bnfused import functional
from bnfused.backends import BackendUnavailableError, availability, get_backend, set_backend
from bnfused.convert import convert_model, revert_model
from bnfused.functional import batch_norm
from bnfused.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from bnfused.sync import SyncBatchNorm
from bnfused.torch_ops import get_compile_mode, set_compile_mode

__version__ = "0.1.0"


def package_version(dist: str) -> str:
    """Installed version of a distribution (e.g. "triton"), or "not installed"."""
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


__all__ = [
    "BackendUnavailableError",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "availability",
    "batch_norm",
    "convert_model",
    "functional",
    "get_backend",
    "get_compile_mode",
    "package_version",
    "revert_model",
    "set_backend",
    "set_compile_mode",
]
