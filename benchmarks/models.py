"""The small models of the classic BatchNorm experiments, built with any BatchNorm implementation.

``norm`` picks the implementation: "torch" (``torch.nn``), "bnfused" (default backend for the
device) or "scratch" (the tutorial BatchNorm in ``scratch_bn.py``); None builds the model without
BatchNorm. Shapes follow 28x28 single-channel images (MNIST, FashionMNIST).
"""

from __future__ import annotations

from torch import nn

import bnfused
from benchmarks.scratch_bn import ScratchBatchNorm

NORMS = ("torch", "bnfused", "scratch")


def batch_norm(norm: str, num_features: int | None, dims: int = 1) -> nn.Module:
    """One BatchNorm layer; ``num_features=None`` asks for a lazy one (torch and bnfused only)."""
    if norm == "scratch":
        if num_features is None:
            raise ValueError("the from-scratch BatchNorm has no lazy variant")
        return ScratchBatchNorm(num_features)
    lib = {"torch": nn, "bnfused": bnfused}[norm]
    if num_features is None:
        return getattr(lib, f"LazyBatchNorm{dims}d")()
    return getattr(lib, f"BatchNorm{dims}d")(num_features)


def mlp_fashion(norm: str | None, lazy: bool = False) -> nn.Module:
    """Flatten -> Linear(784,512) -> [BN] -> ReLU -> Linear(512,512) -> [BN] -> ReLU -> Linear(512,10)."""
    has_bn = norm is not None

    def linear(n_in, n_out, bias=True):
        return nn.LazyLinear(n_out, bias=bias) if lazy else nn.Linear(n_in, n_out, bias=bias)

    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in ((784, 512), (512, 512)):
        layers.append(linear(n_in, n_out, bias=not has_bn))
        if has_bn:
            layers.append(batch_norm(norm, None if lazy else n_out))
        layers.append(nn.ReLU())
    layers.append(linear(512, 10))
    return nn.Sequential(*layers)


def lenet(norm: str | None) -> nn.Module:
    """LeNet-5 with BatchNorm after every conv and hidden linear layer, sigmoid activations."""

    def bn(n, dims):
        return [batch_norm(norm, n, dims)] if norm is not None else []

    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), *bn(6, 2), nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), *bn(16, 2), nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), *bn(120, 1), nn.Sigmoid(),
        nn.Linear(120, 84), *bn(84, 1), nn.Sigmoid(),
        nn.Linear(84, 10),
    )  # fmt: skip


def mnist_bn_mlp(norm: str | None) -> nn.Module:
    """Linear(784,512) -> BN -> ReLU -> Linear(512,256) -> BN -> ReLU -> Linear(256,10); biases only without BN."""
    has_bn = norm is not None
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in ((784, 512), (512, 256)):
        layers.append(nn.Linear(n_in, n_out, bias=not has_bn))
        if has_bn:
            layers.append(batch_norm(norm, n_out))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(256, 10))
    return nn.Sequential(*layers)


def mnist_bn_after_relu(norm: str | None, dropout: float = 0.25) -> nn.Module:
    """Linear(784,256) -> ReLU -> BN(256) -> Linear(256,10); without ``norm``, Dropout in BN's place."""
    middle = batch_norm(norm, 256) if norm is not None else nn.Dropout(dropout)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), middle, nn.Linear(256, 10))


def to_scratch(model: nn.Module) -> nn.Module:
    """``model`` with every torch.nn BatchNorm replaced (in place) by the from-scratch BatchNorm, same
    eps, momentum, parameters and running statistics."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            scratch = ScratchBatchNorm(child.num_features, child.eps, child.momentum or 0.1)
            scratch.load_state_dict({k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"})
            model._modules[name] = scratch.to(child.weight.device)
        else:
            to_scratch(child)
    return model


def with_leaky_relu(model: nn.Module, negative_slope: float = 0.01) -> nn.Module:
    """``model`` with every ``nn.ReLU`` replaced (in place) by ``nn.LeakyReLU(negative_slope)``."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.ReLU:
                module._modules[name] = nn.LeakyReLU(negative_slope)
    return model
