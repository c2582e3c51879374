"""Every kind of autograd torch.nn.BatchNorm supports: double backward, forward-mode AD, torch.func.

The oracle is torch's own OpInfo for ``nn.functional.batch_norm`` (its float64 samples; the
``without_cudnn`` variant repeats them with cuDNN off, the same thing on CPU), run through
``bnfused.functional.batch_norm`` on each CPU backend, with and without a fused activation, against
``F.batch_norm`` followed by the torch activation. Then the uses that need these: a MAML inner step,
per-sample gradients, model ensembles, Hessians through ``functional_call``, and compiled steps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from helpers import _activate
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, stack_module_state, vmap
from torch.testing._internal.common_methods_invocations import op_db  # needs the expecttest package

import bnfused
from bnfused import torch_ops
from bnfused.functional import batch_norm

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # forward_ad imports torch.jit.script

BACKENDS = ("reference", "cpp", "triton")
ACTIVATIONS = (None, "relu", "leaky_relu")
NEGATIVE_SLOPE = 0.2  # far from 0 and 1, so a slope mix-up shows


def _opinfo_samples() -> list:
    op = next(o for o in op_db if o.name == "nn.functional.batch_norm" and o.variant_test_name == "")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return list(op.sample_inputs("cpu", torch.float64, requires_grad=True))


def _sample_param(index: int, sample) -> pytest.param:
    training = sample.kwargs.get("training", False)
    stats = "" if sample.args[0] is not None else "-nostats"
    name = f"{index}-{'x'.join(map(str, sample.input.shape))}-{'train' if training else 'eval'}{stats}"
    return pytest.param(sample, id=name)


SAMPLES = [_sample_param(i, s) for i, s in enumerate(_opinfo_samples())]


def _layer(sample, activation, backend):
    """(fn, inputs): the sample as a function of its differentiable tensors (input, then weight and
    bias where given). backend None is torch: ``F.batch_norm`` and the activation. Every call gets
    fresh copies of the running stats, so repeated calls (gradcheck's) all see the sample's."""
    running_mean, running_var, weight, bias = sample.args
    kwargs = sample.kwargs

    def fn(x, *weight_bias):
        given = iter(weight_bias)
        w = next(given) if weight is not None else None
        b = next(given) if bias is not None else None
        stats = [None if t is None else t.clone() for t in (running_mean, running_var)]
        if backend is None:
            return _activate(F.batch_norm(x, *stats, w, b, **kwargs), activation, NEGATIVE_SLOPE)
        return batch_norm(
            x, *stats, w, b, activation=activation, negative_slope=NEGATIVE_SLOPE, backend=backend, **kwargs
        )

    return fn, tuple(t for t in (sample.input, weight, bias) if t is not None)


def _assert_same_outcome(run_bnfused, run_torch):
    """torch's result, or torch's error (type and message) where torch refuses."""
    try:
        expected = run_torch()
    except RuntimeError as err:
        with pytest.raises(type(err), match=re.escape(str(err))):
            run_bnfused()
        return
    torch.testing.assert_close(run_bnfused(), expected)


# --------------------------------------------------------------------------- every OpInfo sample


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_forward_and_first_order(sample, backend, activation):
    """Forward values as torch; reverse and forward mode (jvp under a dual level) against numbers."""
    fn, inputs = _layer(sample, activation, backend)
    torch_fn, _ = _layer(sample, activation, None)
    torch.testing.assert_close(fn(*inputs), torch_fn(*inputs))
    assert gradcheck(fn, inputs, check_forward_ad=True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_double_backward(sample, backend, activation):
    """gradgradcheck, and second derivatives equal to torch's (its convention at the relu kink included)."""
    fn, inputs = _layer(sample, activation, backend)
    torch_fn, _ = _layer(sample, activation, None)
    assert gradgradcheck(fn, inputs)
    if sample.input.numel() == 0:  # no values: torch's own second_order below has no graph to differentiate
        torch.testing.assert_close(fn(*inputs), torch_fn(*inputs))
        return
    upstream = torch.randn_like(fn(*inputs))
    directions = [torch.randn_like(t) for t in inputs]

    def second_order(f):
        first = torch.autograd.grad(f(*inputs), inputs, upstream, create_graph=True)
        inner = sum((g * u).sum() for g, u in zip(first, directions))
        return torch.autograd.grad(inner, inputs, materialize_grads=True)

    torch.testing.assert_close(second_order(fn), second_order(torch_fn))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_vmap_matches_a_loop(sample, backend, activation):
    """vmap over an extra input dimension: the per-slice loop (bnfused's kernels) and torch's vmap;
    where torch refuses (training updates unbatched running stats in place), the same error."""
    fn, inputs = _layer(sample, activation, backend)
    torch_fn, _ = _layer(sample, activation, None)
    x, params = inputs[0], inputs[1:]
    xs = torch.randn((3, *x.shape), dtype=x.dtype)
    in_dims = (0,) + (None,) * len(params)

    def run_bnfused():
        batched = vmap(fn, in_dims)(xs, *params)
        torch.testing.assert_close(batched, torch.stack([fn(xi, *params) for xi in xs]))
        return batched

    _assert_same_outcome(run_bnfused, lambda: vmap(torch_fn, in_dims)(xs, *params))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("transform", [jacrev, jacfwd])
def test_jacobians_match_torch(transform, sample, backend, activation):
    fn, inputs = _layer(sample, activation, backend)
    torch_fn, _ = _layer(sample, activation, None)
    argnums = tuple(range(len(inputs)))
    _assert_same_outcome(lambda: transform(fn, argnums)(*inputs), lambda: transform(torch_fn, argnums)(*inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_backward_channels_last_and_low_precision(backend, dtype):
    """The differentiable backward keeps the kernels' precision rules (float32 sums for bfloat16)
    and layouts: second derivatives of a channels_last layer against torch's in float32; in
    bfloat16, at most twice the error of torch's own bfloat16 result."""
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    upstream, direction = torch.randn_like(x), torch.randn_like(x)

    def second_order(layer, x, w, b):
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        gx, gw = torch.autograd.grad(layer(x, w, b), (x, w), upstream.to(x.dtype), create_graph=True)
        inner = (gx.float() * direction).sum() + gw.float().sum()
        return [g.float() for g in torch.autograd.grad(inner, (x, w))]

    def fused(x, w, b):
        return batch_norm(x, None, None, w, b, True, activation="relu", backend=backend)

    def unfused(x, w, b):
        return F.relu(F.batch_norm(x, None, None, w.to(x.dtype), b.to(x.dtype), True))

    expected = second_order(unfused, x, w, b)
    got = second_order(fused, x.to(dtype), w, b)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        return
    torch_low = second_order(unfused, x.to(dtype), w, b)
    for ours, theirs, exact in zip(got, torch_low, expected):
        assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_keep_the_kernels_and_transforms_take_torchs_ops(backend):
    x = torch.randn(4, 3, requires_grad=True)
    kernel_node = "BatchNormBackward" if backend == "cpp" else "BatchNormFunctionBackward"
    assert batch_norm(x, None, None, training=True, backend=backend).grad_fn.name() == kernel_node
    assert not torch_ops.transform_active()
    with fwAD.dual_level():
        assert torch_ops.transform_active()
        dual = fwAD.make_dual(x, torch.ones_like(x))
        assert "NativeBatchNorm" in batch_norm(dual, None, None, training=True, backend=backend).grad_fn.name()

    def inside(x):
        assert torch_ops.transform_active()
        return batch_norm(x, None, None, training=True, backend=backend)

    vmap(inside)(x.detach().unsqueeze(1).expand(4, 2, 3))
    jacrev(inside)(x.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_backward_of_an_eager_forward(backend):
    """An eager forward (bnfused's kernels) whose backward autograd runs under vmap:
    ``is_grads_batched=True`` and ``torch.autograd.functional.jacobian(vectorize=True)``."""
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()

    def fused(x, w):
        return batch_norm(x, None, None, w, None, True, activation="relu", backend=backend)

    def unfused(x, w):
        return F.relu(F.batch_norm(x, None, None, w, None, True))

    upstream = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    got = torch.autograd.grad(fused(x, w), (x, w), upstream, is_grads_batched=True)
    torch.testing.assert_close(got, torch.autograd.grad(unfused(x, w), (x, w), upstream, is_grads_batched=True))
    jacobian = torch.autograd.functional.jacobian
    torch.testing.assert_close(jacobian(fused, (x, w), vectorize=True), jacobian(unfused, (x, w), vectorize=True))


# --------------------------------------------------------------------------- the uses that need them


def _convnet(backend):
    """Two conv + BatchNorm + ReLU blocks and a linear head, float64. backend None: torch.nn's
    BatchNorm2d and ReLU; else bnfused's BatchNorm2d with the relu fused. Same initial weights."""

    def block(c_in, c_out, stride):
        conv = nn.Conv2d(c_in, c_out, 3, stride, 1)
        if backend is None:
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]
        return [conv, bnfused.BatchNorm2d(c_out, activation="relu", backend=backend)]

    torch.manual_seed(1)  # BatchNorm draws no random numbers: both nets get the same conv and linear weights
    return nn.Sequential(*block(2, 4, 1), *block(4, 4, 2), nn.Flatten(), nn.Linear(64, 3)).double()


def _maml_outer_grads(model, support, query, inner_lr=0.5):
    """One inner SGD step on the support set with create_graph=True, then the query loss's gradients
    with respect to the initial parameters (second order: through the inner step)."""
    params = dict(model.named_parameters())
    inner_loss = F.cross_entropy(functional_call(model, params, (support[0],)), support[1])
    inner_grads = torch.autograd.grad(inner_loss, list(params.values()), create_graph=True)
    fast = {name: p - inner_lr * g for (name, p), g in zip(params.items(), inner_grads)}
    outer_loss = F.cross_entropy(functional_call(model, fast, (query[0],)), query[1])
    return (outer_loss, *torch.autograd.grad(outer_loss, list(params.values())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_maml_outer_gradients_match_torch(backend):
    support = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    query = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = _maml_outer_grads(_convnet(backend), support, query)
    expected = _maml_outer_grads(_convnet(None), support, query)
    assert len(got) == len(expected) == 1 + 10
    torch.testing.assert_close(got, expected)


def _mlp(backend, activation="leaky_relu"):
    """Linear, BatchNorm1d(+activation), Linear in eval mode with non-trivial running stats."""
    torch.manual_seed(2)
    if backend is None:
        norm = [nn.BatchNorm1d(6), nn.LeakyReLU(NEGATIVE_SLOPE)]
    else:
        norm = [bnfused.BatchNorm1d(6, activation=activation, negative_slope=NEGATIVE_SLOPE, backend=backend)]
    model = nn.Sequential(nn.Linear(5, 6), *norm, nn.Linear(6, 2)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1.0, 1.0)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("samples", ["in_dims_1", "channels_last", "strided"])
@pytest.mark.parametrize("training", [False, True])
def test_vmap_over_samples_that_are_not_contiguous(samples, training, backend):
    """vmap hands the layer batched tensors whose samples are not contiguous (a batch dim other than
    0, channels_last or strided samples): they refuse every layout query but the contiguous one, which
    the argument checks of an eager call (the C++ ones, once the extension is loaded) must not make."""
    batch_norm(torch.randn(2, 3, 4, 4), None, None, training=True, backend=backend)  # an eager call first
    xs = torch.randn(2, 4, 3, 5, 5) if samples == "in_dims_1" else torch.randn(4, 2, 3, 5, 5)
    if samples == "channels_last":
        xs = torch.stack([x.to(memory_format=torch.channels_last) for x in xs])  # each sample channels_last
    elif samples == "strided":
        xs = torch.randn(4, 2, 3, 5, 10)[..., ::2]
    in_dims = 1 if samples == "in_dims_1" else 0
    ours = bnfused.BatchNorm2d(3, track_running_stats=not training, backend=backend).train(training)
    theirs = nn.BatchNorm2d(3, track_running_stats=not training).train(training)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(torch.linspace(0.5, 2.0, 3))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 3))
    torch.testing.assert_close(vmap(ours, in_dims)(xs), vmap(theirs, in_dims)(xs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_of_an_eval_model(backend):
    """vmap(grad(...)) through functional_call against one backward per sample (bnfused's kernels)."""
    model = _mlp(backend)
    x, target = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 2, (7,))
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(params, x, target):
        out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, target.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(len(x)):
        expected = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), target[i : i + 1]), model.parameters())
        torch.testing.assert_close([g[i] for g in per_sample.values()], list(expected))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_ensemble_with_stack_module_state(backend, training):
    """Model ensembling: vmap over stacked parameters and buffers, against running each model.
    Training uses batch statistics only (track_running_stats=False), as torch needs under vmap."""

    def make(seed):
        torch.manual_seed(seed)
        norm = bnfused.BatchNorm1d(4, activation="relu", backend=backend, track_running_stats=not training)
        model = nn.Sequential(nn.Linear(3, 4), norm, nn.Linear(4, 2)).double().train(training)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            if not training:
                norm.running_mean.uniform_(-1.0, 1.0)
                norm.running_var.uniform_(0.5, 2.0)
        return model

    models = [make(seed) for seed in range(3)]
    params, buffers = stack_module_state(models)
    x = torch.randn(5, 3, dtype=torch.float64)
    base = make(0).to("meta")

    got = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(got, torch.stack([m(x) for m in models]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_grad_jacobians_and_hessian_through_functional_call(backend, training):
    """grad, jacrev, jacfwd and hessian of a loss of the layer's parameters, as torch.nn gives them."""
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    target = torch.randn(6, 3, 4, dtype=torch.float64)

    def make(bnfused_layer):
        cls = bnfused.BatchNorm1d if bnfused_layer else nn.BatchNorm1d
        extra = dict(activation="relu", backend=backend) if bnfused_layer else {}
        layer = cls(3, track_running_stats=not training, **extra).double().train(training)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            if not training:
                layer.running_mean.copy_(torch.tensor([0.2, -0.1, 0.0]))
                layer.running_var.copy_(torch.tensor([0.7, 1.3, 2.0]))
        layer.post = (lambda y: y) if bnfused_layer else F.relu
        return layer

    def loss_of(layer):
        params = {name: p.detach() for name, p in layer.named_parameters()}

        def loss(params):
            return ((layer.post(functional_call(layer, params, (x,))) - target) ** 2).sum()

        return loss, params

    (loss, params), (torch_loss, _) = loss_of(make(True)), loss_of(make(False))
    for transform in (grad, jacrev, jacfwd, hessian):
        torch.testing.assert_close(transform(loss)(params), transform(torch_loss)(params))


# --------------------------------------------------------------------------- torch.compile

# Run in a fresh process without TRITON_INTERPRET. Dynamo cannot always trace torch's own batch_norm
# under forward-mode AD: on torch 2.14 and 2.15 a compiled torch.func.jvp through it can hit an internal
# assert in _make_dual or _fw_primal ("InferenceMode::is_enabled() && primal.is_inference()"), or not,
# depending on when the garbage collector last ran (a fresh process with torch alone fails on 2.15).
# bnfused writes such a step in ops Dynamo traces every time (torch_ops._composed_batch_norm), so its
# values are compared with torch's eager jvp, which is the reference for what the step computes.
_TORCH_BEFORE_2_14 = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 14)
_COMPILE_SCRIPT = """
import sys
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
import bnfused
from bnfused.functional import batch_norm

torch.manual_seed(0)


def bnfused_layer(x, w, stats=(None, None), training=True):
    return batch_norm(x, *stats, w, None, training, activation="leaky_relu", backend="cpp")


def torch_layer(x, w, stats=(None, None), training=True):
    return F.leaky_relu(F.batch_norm(x, *stats, w, None, training))


def jvp_step(x, w, tangent, layer, stats=(None, None), training=True):
    return torch.func.jvp(lambda x: layer(x, w, stats, training), (x,), (tangent,))


def running_stats_jvp_step(x, stats, tangents, layer):
    \"\"\"Eval mode, tangents on the running stats: torch's formula takes them as constants.\"\"\"
    return torch.func.jvp(lambda mean, var: layer(x, None, (mean, var), False), stats, tangents)


def dual_level_step(layer, x, tangent):
    with fwAD.dual_level():
        return tuple(fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent))))


def jacfwd_step(x, w, layer):
    return torch.func.jacfwd(lambda x: layer(x, w))(x)


def double_backward_step(x, w, layer):
    (gx,) = torch.autograd.grad((layer(x, w) ** 2).sum(), x, create_graph=True)
    return torch.autograd.grad((gx**2).sum(), (x, w))


def compiled(step, *args):
    torch._dynamo.reset()
    try:
        return torch.compile(step)(*args)
    except RuntimeError as err:
        return err


def copies(stats):
    return tuple(None if s is None else s.clone() for s in stats)


def jvp_cases():
    \"\"\"(x, w, tangent, running stats or Nones, training): batch statistics with and without running
    statistics to update, eval mode, a channels_last 4-d input, a permuted one, float64, bfloat16, a
    weight shaped (C, 1) (torch takes any shape with C elements).\"\"\"
    for shape, training, with_stats, dtype, layout, w_shape in (
        ((4, 3, 5), True, False, torch.float32, "", (3,)),
        ((4, 3, 5), True, True, torch.float32, "", (3,)),
        ((4, 3, 5), False, True, torch.float32, "", (3,)),
        ((4, 3, 2, 5), True, True, torch.float32, "channels_last", (3,)),
        ((5, 3, 4), True, True, torch.float32, "permuted", (3,)),
        ((4, 3, 5), True, True, torch.float64, "", (3, 1)),
        ((4, 3, 5), False, True, torch.float32, "", (3, 1)),
        ((4, 3, 5), True, True, torch.bfloat16, "", (3,)),
    ):
        x = torch.randn(shape, dtype=dtype) * 3 + 2
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        elif layout == "permuted":
            x = x.permute(2, 1, 0)
        stats = (torch.randn(3, dtype=dtype), torch.rand(3, dtype=dtype) + 0.5) if with_stats else (None, None)
        yield x, torch.rand(w_shape, dtype=dtype) + 0.5, torch.randn_like(x), stats, training


def module_cases():
    \"\"\"(torch.nn class, bnfused class, keyword arguments, training, channels_last)\"\"\"
    yield torch.nn.BatchNorm2d, bnfused.BatchNorm2d, dict(momentum=None), True, False
    yield torch.nn.BatchNorm2d, bnfused.BatchNorm2d, {}, True, True
    yield torch.nn.BatchNorm2d, bnfused.BatchNorm2d, {}, False, False
    yield torch.nn.BatchNorm1d, bnfused.BatchNorm1d, dict(affine=False), True, False


def modules_match_torch():
    \"\"\"Modules in a compiled step that opens a dual level: outputs, tangents and every buffer after
    each of two steps are torch.nn's in the same step run eagerly.\"\"\"
    for torch_class, bnfused_class, kwargs, training, channels_last in module_cases():
        reference = torch_class(3, **kwargs).train(training)
        reference.running_mean.uniform_(-1, 1)
        reference.running_var.uniform_(0.5, 2)
        layer = bnfused_class(3, **kwargs).train(training)
        layer.load_state_dict(reference.state_dict())
        torch._dynamo.reset()
        step = torch.compile(dual_level_step)
        for _ in range(2):
            x = torch.randn(4, 3, 2, 5) * 3 + 2 if torch_class is torch.nn.BatchNorm2d else torch.randn(4, 3, 5)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            tangent = torch.randn_like(x)
            expected, got = dual_level_step(reference, x, tangent), step(layer, x, tangent)
            torch.testing.assert_close(got, expected)
            assert got[0].stride() == expected[0].stride(), (got[0].stride(), expected[0].stride())
            torch.testing.assert_close(layer.state_dict(), reference.state_dict())


def plain_calls_stay_compiled():
    \"\"\"A compiled layer called once with a dual input keeps its graph for the plain calls after it,
    as torch's layer does: bnfused adds no guard on the forward-mode level.\"\"\"
    runs = []

    def recording_backend(gm, example_inputs):
        def run(*args):
            runs.append(len(gm.graph.nodes))
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    layer = torch.compile(lambda x: bnfused_layer(x, torch.ones(3)), backend=recording_backend)
    x = torch.randn(4, 3, 5)
    layer(x)
    with fwAD.dual_level():
        layer(fwAD.make_dual(x, torch.randn_like(x)))
    layer(x)
    assert len(runs) == 3, runs



for mode in bnfused.torch_ops.COMPILE_MODES:  # every jvp first: see the note above
    bnfused.set_compile_mode(mode)
    refused = []
    for x, w, tangent, stats, training in jvp_cases():
        torch_stats, bnfused_stats = copies(stats), copies(stats)
        expected = jvp_step(x, w, tangent, torch_layer, torch_stats, training)
        got = compiled(jvp_step, x, w, tangent, bnfused_layer, bnfused_stats, training)
        if isinstance(got, Exception):  # torch 2.6 to 2.11: Dynamo cannot run torch's own layer under jvp
            error = compiled(jvp_step, x, w, tangent, torch_layer, copies(stats), training)
            assert isinstance(error, type(got)), (got, error)
            refused.append(type(got).__name__)
            continue
        # torch's jvp gives a 16-bit input a float32 tangent; bnfused's has the input's dtype
        assert got[1].dtype == x.dtype, got[1].dtype
        tol = dict(atol=1.6e-2, rtol=1.6e-2) if x.dtype == torch.bfloat16 else {}  # helpers.TOLERANCES
        torch.testing.assert_close(got, expected, check_dtype=False, **tol)
        assert got[0].stride() == expected[0].stride(), (got[0].stride(), expected[0].stride())
        torch.testing.assert_close(bnfused_stats, torch_stats)
    x, w = torch.randn(3, 2, 2), torch.rand(2) + 0.5
    got = compiled(jacfwd_step, x, w, bnfused_layer)
    if isinstance(got, Exception):
        assert isinstance(compiled(jacfwd_step, x, w, torch_layer), type(got)), got
        refused.append(type(got).__name__)
    else:
        torch.testing.assert_close(got, jacfwd_step(x, w, torch_layer))
    x, stats, tangents = torch.randn(4, 3, 5), (torch.randn(3), torch.rand(3) + 0.5), (torch.randn(3), torch.randn(3))
    got = compiled(running_stats_jvp_step, x, stats, tangents, bnfused_layer)
    if isinstance(got, Exception):
        assert isinstance(compiled(running_stats_jvp_step, x, stats, tangents, torch_layer), type(got)), got
        refused.append(type(got).__name__)
    else:
        torch.testing.assert_close(got, running_stats_jvp_step(x, stats, tangents, torch_layer))
    if not refused:
        modules_match_torch()
        plain_calls_stay_compiled()
    print(mode, "jvp:", "torch's error: " + ", ".join(refused) if refused else "matches torch")

for mode in bnfused.torch_ops.COMPILE_MODES:
    bnfused.set_compile_mode(mode)
    x, w = torch.randn(4, 3, 5, requires_grad=True), (torch.rand(3) + 0.5).requires_grad_()
    got = compiled(double_backward_step, x, w, bnfused_layer)
    expected = compiled(double_backward_step, x, w, torch_layer)
    if isinstance(expected, Exception):
        assert isinstance(got, type(expected)) and str(got) == str(expected), (got, expected)
        print(mode, "double backward: torch's error:", got)
    else:
        torch.testing.assert_close(got, expected)
        print(mode, "double backward: matches torch")
"""


def test_compiled_jvp_and_double_backward_steps():
    """A compiled jvp or jacfwd step gives the values of torch's eager step, running statistics
    included (transforms decompose in either compile mode); before torch 2.14 it may instead give the
    error torch's own layer meets in the same compiled step. A compiled step taking a gradient of a
    gradient: torch.compile itself refuses it (AOTAutograd has no double backward), and bnfused must
    give torch's result or exactly torch's error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for mode in torch_ops.COMPILE_MODES:
        matches = f"{mode} jvp: matches torch" in done.stdout
        assert matches or (_TORCH_BEFORE_2_14 and f"{mode} jvp: torch's error" in done.stdout), done.stdout
        refused = f"{mode} double backward: torch's error: torch.compile with aot_autograd does not currently support"
        assert refused in done.stdout or f"{mode} double backward: matches torch" in done.stdout
