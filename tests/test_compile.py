"""torch.library registration: opcheck on the ops, and torch.compile(fullgraph=True) through the modules."""

import copy

import pytest
import torch
from torch import nn

import bnfused
from bnfused import activation

OPS = torch.ops.bnfused


def _op_samples(backend, dtype=torch.float32):
    x = torch.randn(4, 3, 5, 5, dtype=dtype) + 1
    cl = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    mean, invstd = x.float().mean((0, 2, 3)), torch.rand(3) + 0.5
    dy = torch.randn_like(x)
    y = torch.randn_like(x)
    return [
        (OPS.forward_train, (x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5, activation.NONE, 0.0, backend)),
        (OPS.forward_train, (cl, None, None, None, None, 0.1, 1e-5, activation.RELU, 0.0, backend)),
        (OPS.forward_eval, (x, w, b, rm, rv, 1e-5, activation.LEAKY_RELU, 0.2, backend)),
        (OPS.backward, (dy, x, y, w, mean, invstd, activation.RELU, 0.0, True, True, True, True, backend)),
        (OPS.backward, (dy, x, None, w, mean, invstd, activation.NONE, 0.0, False, True, False, True, backend)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck_reference(case):
    op, args = _op_samples("reference")[case]
    torch.library.opcheck(op, args)


def _small_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3),
    )  # fmt: skip


def assert_compiled_matches_eager(backend: str, steps: int = 2) -> None:
    """torch.compile(fullgraph=True) of a bnfused model gives the eager model's outputs, grads and buffers."""
    torch.manual_seed(0)
    eager = bnfused.convert_model(_small_model(), fuse_relu=True, backend=backend)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(steps):
        x = torch.randn(4, 3, 10, 10)
        if step == steps - 1:
            eager.eval()
            compiled_model.eval()
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e, msg=lambda m, n=name: f"{n}: {m}")


def test_compile_fullgraph_matches_eager_reference():
    torch._dynamo.reset()
    assert_compiled_matches_eager("reference")
