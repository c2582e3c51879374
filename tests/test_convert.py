"""convert_model: swapping torch BatchNorms for bnfused ones keeps the model's numbers."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import bnfused


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_resnet18_training_step_matches_original():
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10)
    converted = bnfused.convert_model(copy.deepcopy(original))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in original.modules())
    assert sum(isinstance(m, bnfused.BatchNorm2d) for m in converted.modules()) == n_bn == 20
    x, target = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    losses = []
    for model in (original, converted):
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    g0, g1 = _grads(original), _grads(converted)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b0), b1 in zip(original.named_buffers(), converted.buffers()):
        torch.testing.assert_close(b1, b0, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_conversion_keeps_tensors_state_and_dtype():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.3, eps=1e-3, dtype=torch.float64)).eval()
    weight = model[1].weight
    converted = bnfused.convert_model(model)
    bn = converted[1]
    assert type(bn) is bnfused.BatchNorm1d and not bn.training
    assert bn.weight is weight and bn.weight.dtype == torch.float64  # same Parameter: optimizers keep working
    assert (bn.momentum, bn.eps) == (0.3, 1e-3)


def test_fuse_relu_folds_the_following_relu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2),
                          nn.LeakyReLU(0.2), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU(inplace=True)))  # fmt: skip
    reference = copy.deepcopy(model)
    fused = bnfused.convert_model(model, fuse_relu=True)
    assert fused[1].activation == "relu" and isinstance(fused[2], nn.Identity)
    assert fused[4].activation == "leaky_relu" and fused[4].negative_slope == 0.2
    assert fused[6][0].activation == "relu" and isinstance(fused[6][1], nn.Identity)
    assert list(fused.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-5)


def test_without_fuse_relu_the_relu_stays():
    model = bnfused.convert_model(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))
    assert model[0].activation is None and isinstance(model[1], nn.ReLU)


def test_lazy_and_bare_batchnorm_conversion():
    lazy = bnfused.convert_model(nn.Sequential(nn.LazyBatchNorm2d()))[0]
    assert type(lazy) is bnfused.LazyBatchNorm2d
    lazy(torch.randn(2, 5, 3, 3))
    assert type(lazy) is bnfused.BatchNorm2d and lazy.num_features == 5
    bare = bnfused.convert_model(nn.BatchNorm3d(2))
    assert type(bare) is bnfused.BatchNorm3d


def test_backend_argument_reaches_the_modules():
    model = bnfused.convert_model(nn.Sequential(nn.BatchNorm1d(3)), backend="reference")
    assert model[0].backend == "reference"


@pytest.mark.parametrize("already", [bnfused.BatchNorm2d(3), bnfused.BatchNormReLU2d(3)])
def test_bnfused_layers_are_left_alone(already):
    model = nn.Sequential(already)
    assert bnfused.convert_model(model)[0] is already


class _SharedNorm(nn.Module):
    """One BatchNorm registered under two names (tied layers): in a branch with a ReLU after it and in one without."""

    def __init__(self):
        super().__init__()
        bn = nn.BatchNorm2d(3)
        self.a = nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 3, 1), bn)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_a_shared_batchnorm_stays_one_sync_layer():
    """torch's convert_sync_batchnorm leaves a parent's second name for a layer unconverted (unsynchronised)
    and makes one layer per parent; bnfused's keeps one SyncBatchNorm under every name."""
    model = _SharedNorm()
    model.again = model.a[1]  # a second name in the same parent
    converted = bnfused.convert_model(model, sync=True)
    layer = converted.a[1]
    assert isinstance(layer, bnfused.SyncBatchNorm)
    assert converted.b[1] is layer and converted.again is layer


@pytest.mark.parametrize("kwargs", [{}, {"fuse_relu": True}, {"fuse": True}], ids=["plain", "fuse_relu", "fuse"])
def test_a_shared_batchnorm_stays_one_layer(kwargs):
    torch.manual_seed(0)
    original = _SharedNorm()
    converted = bnfused.convert_model(copy.deepcopy(original), **kwargs)
    shared = converted.get_submodule("a.1")
    assert converted.get_submodule("b.1") is shared and isinstance(shared, bnfused.BatchNorm2d)
    assert shared.activation is None  # its ReLU runs in one branch only
    x = torch.randn(4, 3, 5, 5)
    original.a.eval(), converted.get_submodule("a").eval()  # both branches see the one layer's mode
    torch.testing.assert_close(converted(x), original(x))
    assert shared.num_batches_tracked.item() == original.a[1].num_batches_tracked.item() == 0
    reverted = bnfused.revert_model(converted)
    assert reverted.get_submodule("b.1") is reverted.get_submodule("a.1")
    assert type(reverted.get_submodule("a.1")) is nn.BatchNorm2d
