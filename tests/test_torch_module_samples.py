"""torch's own module samples (``common_modules.module_db``: the constructor arguments and inputs its
``test_modules.py`` runs nn.BatchNorm1d/2d/3d with) on bnfused's classes, against torch's: outputs,
gradients, running statistics and the counter, in training and evaluation, contiguous,
channels_last and strided; and torch's float64 gradient checks."""

import copy

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.testing._internal.common_modules import module_db  # needs the expecttest package

import bnfused

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # forward_ad imports torch.jit.script

EQUIVALENT = {
    nn.BatchNorm1d: bnfused.BatchNorm1d,
    nn.BatchNorm2d: bnfused.BatchNorm2d,
    nn.BatchNorm3d: bnfused.BatchNorm3d,
}


def _samples(dtype: torch.dtype) -> list:
    cases = []
    for info in (m for m in module_db if m.module_cls in EQUIVALENT):
        for training in (True, False):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
            for i, sample in enumerate(inputs):
                name = f"{info.name}-{sample.desc or i}-{'train' if training else 'eval'}"
                cases.append(pytest.param(info.module_cls, sample, training, id=name))
    return cases


def _pair(torch_cls, sample, training, dtype, backend):
    """torch's module and bnfused's, built from the sample's arguments, holding equal state."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    reference = torch_cls(*args, **kwargs, dtype=dtype).train(training)
    ours = EQUIVALENT[torch_cls](*args, **kwargs, dtype=dtype, backend=backend).train(training)
    with torch.no_grad():
        for tensor in (reference.weight, reference.bias, reference.running_mean, reference.running_var):
            if tensor is not None and tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _assert_same_state(ours: nn.Module, reference: nn.Module) -> None:
    for (name, want), (got_name, got) in zip(reference.state_dict().items(), ours.state_dict().items(), strict=True):
        assert got_name == name
        torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize(("torch_cls", "sample", "training"), _samples(torch.float32))
def test_torch_module_samples_match_torch(torch_cls, sample, training, layout, backend):
    reference, ours = _pair(torch_cls, sample, training, torch.float32, backend)
    x = sample.forward_input.args[0].detach()
    if layout == "channels_last" and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "strided":  # every other value of a tensor twice as long in its last dimension
        x = x.repeat_interleave(2, dim=-1)[..., ::2]
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # the second call sees the running statistics the first updated
        want, got = reference(x_ref), ours(x_ours)
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()
        _assert_same_state(ours, reference)
    if x.numel() == 0:
        return
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name).grad, param.grad, msg=name)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(("torch_cls", "sample", "training"), _samples(torch.float64))
def test_torch_module_samples_pass_gradient_checks(torch_cls, sample, training, backend):
    """torch's test_modules checks first and second derivatives in float64 (running statistics copied
    per call, so every evaluation sees the same ones)."""
    _, ours = _pair(torch_cls, sample, training, torch.float64, backend)
    x = sample.forward_input.args[0].detach().requires_grad_()
    if x.numel() == 0:
        return
    names = [name for name, _ in ours.named_parameters()]

    def layer(x, *weights):
        return torch.func.functional_call(copy.deepcopy(ours), dict(zip(names, weights, strict=True)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_() for p in ours.parameters()])
    assert gradcheck(layer, inputs)
    assert gradgradcheck(layer, inputs)
