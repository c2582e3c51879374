"""Test set-up: the Triton interpreter on machines without a GPU, seeding, and the gpu marker."""

import os

import pytest
import torch

# Must happen before anything imports triton: without a GPU, Triton kernels run under its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
# The triton backend runs on CPU tensors only under the interpreter (set above when there is no GPU).
TRITON_ON_GPU = HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _triton_cases_on_the_gpu(request):
    """Backend-parametrized tests make their tensors on the default device. Where a GPU is present,
    their triton cases make them on it: the compiled kernels run, with the same assertions."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    if TRITON_ON_GPU and any(isinstance(v, str) and v == "triton" for v in params):
        with torch.device("cuda"):
            yield
    else:
        yield
