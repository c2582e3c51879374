"""The from-scratch BatchNorm of the classic tutorials: the teaching baseline bnfused is compared with.

Plain tensor ops (mean and variance over dims, (x - mean) / sqrt(var + eps)), autograd through the
forward, nothing fused. Same semantics as ``nn.BatchNorm`` (batch statistics in training, unbiased
running variance, running statistics in eval), so it can stand in for it in any model.
"""

from __future__ import annotations

import torch
from torch import nn


class ScratchBatchNorm(nn.Module):
    """BatchNorm over dim 1 of an (N, C) or (N, C, *) input, written the way the tutorials write it."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            mean = x.mean(dim=dims)
            var = ((x - mean.view(shape)) ** 2).mean(dim=dims)
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return self.weight.view(shape) * x_hat + self.bias.view(shape)
