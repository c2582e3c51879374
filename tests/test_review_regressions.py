"""Behaviours where an outside review found bnfused differing from torch.nn.BatchNorm; each now matches."""

import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused
from bnfused.functional import batch_norm


@pytest.mark.skipif(
    "bias" not in inspect.signature(nn.LazyBatchNorm2d).parameters, reason="this torch's LazyBatchNorm has no bias="
)
def test_lazy_conversion_keeps_bias_false():
    original = nn.LazyBatchNorm2d(bias=False)
    converted = bnfused.convert_model(nn.LazyBatchNorm2d(bias=False))
    x = torch.randn(2, 3, 4, 4)
    original(x)
    converted(x)
    assert converted.bias is None
    assert list(converted.state_dict()) == list(original.state_dict())


def test_lazy_conversion_keeps_dtype_without_affine():
    converted = bnfused.convert_model(nn.LazyBatchNorm2d(affine=False, dtype=torch.float64))
    y = converted(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert y.dtype == torch.float64 and converted.running_mean.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_empty_half_batch_keeps_its_dtype(dtype, training):
    m = bnfused.BatchNorm1d(3, activation="relu").train(training)
    assert m(torch.randn(0, 3, 4, dtype=dtype)).dtype == dtype


def test_compile_fullgraph_before_any_eager_call():
    """In a fresh process the first backend resolution (imports, maybe a build) must not be traced."""
    code = (
        "import torch, bnfused\n"
        "m = bnfused.BatchNorm2d(3)\n"
        "y = torch.compile(m, fullgraph=True)(torch.randn(2, 3, 4, 4))\n"
        "assert y.shape == (2, 3, 4, 4)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600, capture_output=True)


# bnfused's checks and messages are those of torch 2.14's F.batch_norm; older torch checks less.
_TORCH_HAS_THESE_CHECKS = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 14)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda bn, x: bn(x, torch.zeros(3), torch.ones(3), training=True, eps=0.0), "eps must be positive"),
        (lambda bn, x: bn(x, torch.zeros(3), torch.ones(3), training=False, eps=-2.0), "eps must be non-negative"),
        (lambda bn, x: bn(x, torch.zeros(3), None, training=True), "both be None or neither"),
        (lambda bn, x: bn(torch.randn(1, 0), None, None, training=True), "more than 1 value per channel"),
    ],
)
@pytest.mark.parametrize("bn", [batch_norm, F.batch_norm], ids=["bnfused", "torch"])
def test_value_errors_like_torch(bn, call, message):
    if bn is F.batch_norm and not _TORCH_HAS_THESE_CHECKS:
        pytest.skip("torch before 2.14 checks fewer of these arguments")
    with pytest.raises(ValueError, match=message):
        call(bn, torch.randn(4, 3, 5))


def test_eval_with_running_var_missing_names_it():
    with pytest.raises(RuntimeError, match="running_var must be defined in evaluation mode"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=False)


@pytest.mark.parametrize("backend", ["reference", None])
def test_eval_graph_survives_a_later_training_step(backend):
    """Backward of an eval forward after a train step updated the running stats in place: the gradient
    is the one of the forward that ran (torch's own module uses the updated buffers instead)."""
    m = bnfused.BatchNorm2d(3, backend=backend).eval()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    running_var_then = m.running_var.clone()
    y = m(x)
    m.train()
    m(torch.randn(4, 3, 5, 5) * 3)
    assert not torch.equal(m.running_var, running_var_then)
    g = torch.randn_like(y)
    y.backward(g)
    expected = g * (m.weight.detach() / torch.sqrt(running_var_then + m.eps)).view(1, 3, 1, 1)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_training_update_leaves_the_running_stats_version_as_torch(backend):
    """torch's kernels write the running stats through their data pointer: a graph that saved them
    still backpropagates after a training step (every backend, as torch.nn.BatchNorm)."""
    for layer in (nn.BatchNorm1d(3), bnfused.BatchNorm1d(3, backend=backend)):
        w = torch.ones(3, requires_grad=True)
        z = (w * layer.running_mean).sum() + (w * layer.running_var).sum()  # saves both buffers
        versions = (layer.running_mean._version, layer.running_var._version)
        layer(torch.randn(4, 3))
        assert (layer.running_mean._version, layer.running_var._version) == versions
        z.backward()
        # torch's answer: the buffers as the step left them, read by the backward through the saved tensors
        torch.testing.assert_close(w.grad, layer.running_mean + layer.running_var)


@pytest.mark.parametrize("make", [lambda: torch.randn(4, 7, 3).transpose(1, 2), lambda: torch.randn(3, 5).t()])
def test_output_layout_follows_torch(make):
    x = make()
    c = x.shape[1]
    ours = bnfused.BatchNorm1d(c)(x)
    theirs = nn.BatchNorm1d(c)(x)
    assert ours.stride() == theirs.stride()
    assert ours.view(-1).shape == theirs.view(-1).shape  # torch's output can be viewed: so must ours


def test_converted_module_does_not_share_registries_with_the_original():
    old = nn.BatchNorm1d(3)
    new = bnfused.convert_model(old)
    assert new.weight is old.weight  # the same tensors
    new.register_buffer("extra", torch.zeros(1))
    assert "extra" not in dict(old.named_buffers())


def test_weight_and_bias_of_another_shape_are_accepted_like_torch():
    """torch's forward takes a (1, C) weight and bias (its CPU backward then fails; ours works)."""
    x = torch.randn(4, 3, 5)
    w, b = torch.rand(1, 3, requires_grad=True), torch.randn(1, 3, requires_grad=True)
    w1, b1 = w.detach().view(-1).clone().requires_grad_(), b.detach().view(-1).clone().requires_grad_()
    y = batch_norm(x, torch.zeros(3), torch.ones(3), w, b, training=True)
    torch.testing.assert_close(y, F.batch_norm(x, torch.zeros(3), torch.ones(3), w, b, training=True))
    g = torch.randn(4, 3, 5)
    y.backward(g)
    batch_norm(x, torch.zeros(3), torch.ones(3), w1, b1, training=True).backward(g)
    assert w.grad.shape == (1, 3) and b.grad.shape == (1, 3)
    torch.testing.assert_close(w.grad.view(-1), w1.grad)
    torch.testing.assert_close(b.grad.view(-1), b1.grad)


@pytest.mark.parametrize(
    "cls", [bnfused.BatchNorm1d, bnfused.BatchNorm2d, bnfused.BatchNorm3d, bnfused.BatchNormReLU2d]
)
def test_constructor_signature_is_torchs_and_skip_init_works(cls):
    """inspect.signature shows torch's arguments (nn.utils.skip_init asks for ``device``) and bnfused's."""
    torch_cls = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn"))
    params = inspect.signature(cls).parameters
    assert list(params)[:-4] == list(inspect.signature(torch_cls).parameters)
    assert list(params)[-4:] == ["activation", "negative_slope", "backend", "memory"]
    layer = torch.nn.utils.skip_init(cls, 3, eps=1e-3, activation="leaky_relu")
    assert type(layer) is cls and layer.eps == 1e-3 and layer.activation == "leaky_relu"
    assert layer.weight.shape == (3,) and layer.weight.device.type == "cpu"
    default_act = params["activation"].default
    assert cls(3).activation == default_act


def test_quantized_input_names_revert_model():
    """Eager-mode quantization swaps torch's BatchNorm classes by exact type and leaves bnfused's: the
    quantized model's call says what to do. After revert_model, quantization works as for torch."""
    import torch.ao.quantization as tq

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.dequant(self.bn(self.conv(self.quant(x))))

    def quantize(model):
        model.eval().qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(model)
        prepared(torch.randn(4, 3, 8, 8))
        return tq.convert(prepared)

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(NotImplementedError, match="revert_model"):
        quantize(bnfused.convert_model(Net()))(x)
    quantized = quantize(bnfused.revert_model(bnfused.convert_model(Net())))
    assert quantized(x).shape == (2, 4, 6, 6)
    with pytest.raises(NotImplementedError, match="quantized tensor"):
        batch_norm(torch.quantize_per_tensor(x, 0.1, 0, torch.quint8), None, None, training=True)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_compiled_cumulative_average_has_one_graph_for_every_step(activation):
    """momentum=None under torch.compile: the factor 1 / num_batches_tracked stays a tensor, so there is
    no graph break (fullgraph=True) and no recompile per step; the state follows eager torch's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def net(lib):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), lib.BatchNorm2d(4, momentum=None), nn.ReLU(), nn.Conv2d(4, 4, 3))

    original = net(nn).double()
    twin = bnfused.convert_model(net(nn), fuse=activation is not None).double()
    if activation is None:
        twin[1].activation = None
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, backend=counter, fullgraph=True)
    for _ in range(4):
        x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
        outs = [m(x) for m in (original, compiled)]
        for out in outs:
            out.square().mean().backward()
        torch.testing.assert_close(outs[1], outs[0])
    assert counter.frame_count == 1
    state, twin_state = original.state_dict(), twin.state_dict()
    assert list(twin_state) == list(state)
    for key in state:
        torch.testing.assert_close(twin_state[key], state[key], msg=key)
    assert int(twin_state["1.num_batches_tracked"]) == 4
    for p, q in zip(original.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("training", [True, False])
def test_subclasses_and_fake_tensors_reach_every_backend_as_torch(backend, training):
    """A tensor subclass comes back as its class, and FakeTensorMode gives a fake output (no kernel
    launched on fake memory, no warning about fake data pointers), on every backend."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    class Marked(torch.Tensor):
        pass

    layer, reference = bnfused.BatchNorm2d(4, backend=backend).train(training), nn.BatchNorm2d(4).train(training)
    x = torch.randn(2, 4, 3, 3)
    y = layer(x.as_subclass(Marked))
    assert type(y) is Marked and type(reference(x.as_subclass(Marked))) is Marked
    torch.testing.assert_close(y.as_subclass(torch.Tensor), reference(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with FakeTensorMode():
            fake_layer = bnfused.BatchNorm2d(4, backend=backend).train(training)
            out = fake_layer(torch.empty(2, 4, 3, 3))
    assert isinstance(out, FakeTensor) and out.shape == (2, 4, 3, 3)


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_subclass_weight_and_gradient_reach_every_backend_as_torch(backend):
    """A subclass weight gives an output of that class, and a subclass gradient an input gradient of
    that class, as torch's BatchNorm does (the triton kernels would read their memory as plain tensors)."""

    class Marked(torch.Tensor):
        pass

    x, weight = torch.randn(3, 4, 2, 2), torch.rand(4).add_(0.5)
    results = []
    for layer in (nn.BatchNorm2d(4), bnfused.BatchNorm2d(4, backend=backend)):
        layer.weight = nn.Parameter(weight.clone().as_subclass(Marked))
        y = layer(x)
        xg = x.clone().requires_grad_()
        layer(xg).backward(torch.ones_like(x).as_subclass(Marked))
        results.append((type(y), type(xg.grad), y.as_subclass(torch.Tensor), xg.grad.as_subclass(torch.Tensor)))
    (torch_y_cls, torch_g_cls, torch_y, torch_g), (y_cls, g_cls, y, g) = results
    assert (y_cls, g_cls) == (torch_y_cls, torch_g_cls)
    torch.testing.assert_close(y, torch_y)
    torch.testing.assert_close(g, torch_g)


def test_compiled_cumulative_average_keeps_torchs_checks_and_empty_batches():
    """The compiled momentum=None path checks the running stats as torch does, and an empty batch
    leaves them as they are (its statistics are NaN)."""
    layer = bnfused.BatchNorm2d(3, momentum=None)
    compiled = torch.compile(layer, backend="aot_eager")
    torch._dynamo.reset()
    compiled(torch.randn(4, 3, 2, 2))
    stats = layer.running_mean.clone(), layer.running_var.clone()
    assert compiled(torch.randn(0, 3, 2, 2)).shape == (0, 3, 2, 2)
    assert torch.equal(layer.running_mean, stats[0]) and torch.equal(layer.running_var, stats[1])
    assert int(layer.num_batches_tracked) == 2
    layer.running_var = layer.running_var.double()
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="float64"):
        torch.compile(layer, backend="aot_eager")(torch.randn(4, 3, 2, 2))
    torch._dynamo.reset()
