"""The shared oracle: run a bnfused module and torch.nn.BatchNorm side by side and compare everything.

Every backend's tests call ``assert_matches_torch``; only the shapes and flags differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bnfused

TORCH_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
FUSED_CLASSES = {2: bnfused.BatchNorm1d, 3: bnfused.BatchNorm1d, 4: bnfused.BatchNorm2d, 5: bnfused.BatchNorm3d}

# (atol, rtol) for comparing a backend with torch when both compute in this dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim(), torch.contiguous_format)


def make_input(shape, dtype, channels_last=False, offset=2.0, scale=3.0) -> torch.Tensor:
    """Random input with a non-zero mean (a BN kernel that forgets to centre fails visibly)."""
    x = torch.randn(shape, dtype=torch.float32) * scale + offset
    if channels_last and len(shape) in (4, 5):
        x = x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)])
    elif channels_last and len(shape) == 3:  # (N, L, C) data viewed as (N, C, L): channel stride 1
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(dtype)


def _activate(y, activation, negative_slope):
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    return y


def assert_matches_torch(
    backend: str,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    param_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    training: bool = True,
    affine: bool = True,
    track_running_stats: bool = True,
    momentum: float | None = 0.1,
    activation: str | None = None,
    negative_slope: float = 0.01,
    steps: int = 2,
    tol: tuple[float, float] | None = None,
) -> None:
    """Runs ``steps`` forward/backward passes through both modules and asserts that outputs, input,
    weight and bias gradients, running stats and num_batches_tracked agree.

    For float16/bfloat16, torch runs the same module in float32 on the upcast input (the fp32
    reference); the tolerance is then the dtype's, which holds PyTorch's own low-precision error.
    """
    param_dtype = param_dtype or (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    kwargs = dict(affine=affine, track_running_stats=track_running_stats, momentum=momentum)
    ref = TORCH_CLASSES[len(shape)](shape[1], dtype=param_dtype if dtype == torch.float64 else torch.float32, **kwargs)
    mod = FUSED_CLASSES[len(shape)](
        shape[1], dtype=param_dtype, activation=activation, negative_slope=negative_slope, backend=backend, **kwargs
    )
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
            mod.weight.copy_(ref.weight)
            mod.bias.copy_(ref.bias)
    ref.train(training)
    mod.train(training)
    if not training and track_running_stats:
        with torch.no_grad():
            for m in (ref, mod):  # non-trivial running stats for eval mode
                m.running_mean.copy_(torch.linspace(-1.0, 2.0, shape[1]))
                m.running_var.copy_(torch.linspace(0.5, 4.0, shape[1]))
    atol, rtol = tol or TOLERANCES[dtype]
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for step in range(steps):
        x = make_input(shape, dtype, channels_last)
        x_ref = x.to(ref_dtype).detach().requires_grad_()
        x_mod = x.detach().requires_grad_()
        y_ref = _activate(ref(x_ref), activation, negative_slope)
        y_mod = mod(x_mod)
        assert y_mod.dtype == dtype and y_mod.shape == x.shape
        if channels_last and len(shape) in (4, 5):
            assert y_mod.is_contiguous(memory_format=memory_format_of(x)), "output lost the channels_last layout"
        grad = torch.randn(shape, dtype=ref_dtype)
        y_ref.backward(grad)
        y_mod.backward(grad.to(dtype))
        where = f"step {step}"
        torch.testing.assert_close(
            y_mod.to(ref_dtype), y_ref, atol=atol, rtol=rtol, msg=lambda m, w=where: f"output, {w}: {m}"
        )
        torch.testing.assert_close(
            x_mod.grad.to(ref_dtype),
            x_ref.grad,
            atol=atol * 5,
            rtol=rtol * 5,
            msg=lambda m, w=where: f"input grad, {w}: {m}",
        )
        if affine:
            # Parameter grads are sums over N * spatial values: their error grows with that count.
            scale = max(1.0, (x.numel() / shape[1]) ** 0.5)
            for name in ("weight", "bias"):
                torch.testing.assert_close(
                    getattr(mod, name).grad.to(ref_dtype), getattr(ref, name).grad.to(ref_dtype),
                    atol=atol * 5 * scale, rtol=rtol * 5, msg=lambda m, n=name, w=where: f"{n} grad, {w}: {m}",
                )  # fmt: skip
        if track_running_stats:
            for name in ("running_mean", "running_var"):
                torch.testing.assert_close(
                    getattr(mod, name).to(ref_dtype), getattr(ref, name).to(ref_dtype), atol=atol, rtol=rtol,
                    msg=lambda m, n=name, w=where: f"{n}, {w}: {m}",
                )  # fmt: skip
            assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item()
