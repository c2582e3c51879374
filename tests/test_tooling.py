"""The model tooling that works with torch.nn.BatchNorm works with bnfused's layers (issue 16):
torch.jit.trace (items 1, 11), torch.fx.symbolic_trace (item 9), torch.ao.quantization fusion and
QAT through ``revert_model`` (item 10), ONNX export (item 12)."""

import copy
import io
import warnings

import onnx
import onnxruntime
import pytest
import torch
import torch.fx
import torchvision
from torch import nn
from torch.ao.quantization import (
    disable_fake_quant,
    disable_observer,
    fuse_modules,
    fuse_modules_qat,
    get_default_qat_qconfig,
    get_default_qat_qconfig_mapping,
    prepare_qat,
)
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import bnfused

BACKENDS = ["reference", "cpp", "triton"]


def _trace(module, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in favour of torch.export
        return torch.jit.trace(module, (x,), check_trace=False)


def _buffers(module):
    return [b.clone() for b in module.buffers()]


# --------------------------------------------------------------------------- torch.jit.trace


@pytest.mark.parametrize("backend", BACKENDS)
def test_item01_jit_trace_training_updates_running_stats_once(backend):
    fused, plain = bnfused.BatchNorm2d(3, backend=backend), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    traced_fused, traced_plain = _trace(fused, x), _trace(plain, x)
    for step in range(2):
        x = torch.randn(4, 3, 2, 2) * 2 + step
        torch.testing.assert_close(traced_fused(x), traced_plain(x))
    for got, want in zip(_buffers(fused), _buffers(plain)):
        torch.testing.assert_close(got, want)
    assert int(fused.num_batches_tracked) == 3  # the tracing call and two steps


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_item11_jit_trace_every_backend_saves_and_loads(backend, training):
    fused = bnfused.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.2, backend=backend).train(training)
    plain = nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(0.2)).train(training)
    fused.running_mean.uniform_(-1, 1), fused.running_var.uniform_(0.5, 2)
    fused.weight.data.uniform_(0.5, 2), fused.bias.data.uniform_(-1, 1)
    plain[0].load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 5, 5)
    loaded = []
    for module in (fused, plain):
        buffer = io.BytesIO()
        torch.jit.save(_trace(module, x), buffer)
        buffer.seek(0)
        loaded.append(torch.jit.load(buffer))
    assert "aten::batch_norm" in str(loaded[0].graph) and "PythonOp" not in str(loaded[0].graph)
    x = torch.randn(4, 3, 5, 5) + 1
    torch.testing.assert_close(loaded[0](x), loaded[1](x))
    for got, want in zip(loaded[0].buffers(), loaded[1].buffers()):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- torch.fx


def test_item09_fx_symbolic_trace_of_a_converted_resnet18():
    model = bnfused.convert_model(torchvision.models.resnet18(num_classes=10))
    twin = copy.deepcopy(model)
    graph_module = torch.fx.symbolic_trace(twin)
    layers = [n for n in graph_module.graph.nodes if n.op == "call_module"]
    bn_nodes = [n for n in layers if isinstance(graph_module.get_submodule(n.target), bnfused.BatchNorm2d)]
    assert len(bn_nodes) == 20 == len({n.target for n in bn_nodes})  # one leaf node per BatchNorm
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(graph_module(x), model(x))  # training: batch statistics, stats updated
    for got, want in zip(graph_module.buffers(), model.buffers()):
        torch.testing.assert_close(got, want)
    graph_module.eval(), model.eval()
    assert not any(m.training for m in graph_module.modules())
    torch.testing.assert_close(graph_module(x), model(x))  # eval: the running statistics


def test_item09_fx_leaf_for_fused_activation_and_sync_batchnorm():
    model = nn.Sequential(
        nn.Linear(4, 6), bnfused.BatchNormReLU1d(6), nn.Linear(6, 6), bnfused.SyncBatchNorm(6, activation="relu")
    )
    graph_module = torch.fx.symbolic_trace(copy.deepcopy(model))
    assert [n.target for n in graph_module.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3"]
    x = torch.randn(8, 4)
    torch.testing.assert_close(graph_module(x), model(x))


def test_item09_fx_tracing_a_batchnorm_itself_fails_as_torch_does():
    # The traced root cannot be a leaf of its own graph; torch's BatchNorm raises the same error.
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(nn.BatchNorm2d(3))
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(bnfused.BatchNorm2d(3))


# --------------------------------------------------------------------------- quantization fusion


def _conv_bn_relu():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


def test_item10_fuse_modules_rejects_converted_models_but_not_reverted_ones():
    converted = bnfused.convert_model(_conv_bn_relu(), fuse_relu=True)
    with pytest.raises(AssertionError, match="did not find fuser method"):
        fuse_modules(copy.deepcopy(converted).eval(), [["0", "1", "2"]])
    for _ in range(3):  # running stats away from their initial values
        converted(torch.randn(4, 3, 8, 8))
    converted.eval()
    keys, tensors = list(converted.state_dict()), list(converted.state_dict(keep_vars=True).values())
    x = torch.randn(2, 3, 8, 8)
    expected = converted(x)
    reverted = bnfused.revert_model(converted)
    assert [type(m) for m in reverted] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    assert list(reverted.state_dict()) == keys
    assert all(a is b for a, b in zip(reverted.state_dict(keep_vars=True).values(), tensors))
    fused = fuse_modules(reverted, [["0", "1", "2"], ["3", "4"]])
    assert type(fused[0]).__name__ == "ConvReLU2d" and type(fused[3]) is nn.Conv2d  # BN folded into the conv
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_item10_qat_prepare_on_a_reverted_model():
    converted = bnfused.convert_model(_conv_bn_relu(), fuse_relu=True)
    qat = fuse_modules_qat(bnfused.revert_model(copy.deepcopy(converted)), [["0", "1", "2"], ["3", "4"]])
    qat.qconfig = get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        qat = prepare_qat(qat)
    assert [type(m).__name__ for m in qat][::3] == ["ConvBnReLU2d", "ConvBn2d"]
    x = torch.randn(4, 3, 8, 8)
    fake_quantised = copy.deepcopy(qat)(x)  # a QAT training step, fake quantisation on
    # With fake quantisation off, the QAT modules compute what the bnfused model computes.
    qat.apply(disable_fake_quant), qat.apply(disable_observer)
    exact = qat(x)
    torch.testing.assert_close(exact, converted(x), rtol=1e-5, atol=1e-5)  # training: batch statistics
    assert 0 < (fake_quantised - exact).abs().max() < 0.1
    qat.eval(), converted.eval()
    torch.testing.assert_close(qat(x), converted(x), rtol=1e-5, atol=1e-5)  # eval: the running statistics


def test_item10_fx_graph_mode_qat_fuses_a_reverted_model():
    model = bnfused.revert_model(bnfused.convert_model(_conv_bn_relu(), fuse_relu=True))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,))
    fused = [type(m).__name__ for m in prepared.children() if "FakeQuantize" not in type(m).__name__]
    assert fused == ["ConvBnReLU2d", "ConvBn2d"]
    assert prepared(x).shape == (2, 4, 6, 6)


def test_item10_revert_without_a_slot_keeps_the_activation_as_a_hook():
    model = nn.ModuleDict({"bn": bnfused.BatchNormReLU2d(3), "leaky": bnfused.BatchNorm2d(3, activation="leaky_relu")})
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    reverted = bnfused.revert_model(model)
    assert type(reverted["bn"]) is nn.BatchNorm2d and type(reverted["leaky"]) is nn.BatchNorm2d
    assert list(reverted.state_dict()) == keys
    x = torch.randn(4, 3, 5, 5)
    for name in ("bn", "leaky"):
        torch.testing.assert_close(reverted[name](x), reference[name](x))
    bare = bnfused.revert_model(bnfused.BatchNormReLU1d(3).eval())
    assert type(bare) is nn.BatchNorm1d and not bare.training
    assert (bare(torch.randn(4, 3)) >= 0).all()


def test_item10_revert_lazy_and_sync_and_round_trip():
    model = nn.Sequential(bnfused.LazyBatchNorm2d(), bnfused.SyncBatchNorm(3), bnfused.BatchNorm1d(3, backend="cpp"))
    reverted = bnfused.revert_model(model)
    assert [type(m) for m in reverted] == [nn.LazyBatchNorm2d, nn.SyncBatchNorm, nn.BatchNorm1d]
    assert not hasattr(reverted[2], "backend")
    reverted[0](torch.randn(2, 5, 3, 3))  # the lazy layer still infers its size
    assert type(reverted[0]) is nn.BatchNorm2d and reverted[0].num_features == 5
    again = bnfused.convert_model(reverted)
    assert [type(m) for m in again] == [bnfused.BatchNorm2d, nn.SyncBatchNorm, bnfused.BatchNorm1d]


# --------------------------------------------------------------------------- ONNX


def _onnx_model(model, x, dynamo):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), None if dynamo else buffer, dynamo=dynamo, verbose=False)
    return program.model_proto if dynamo else onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_item12_onnx_export_gives_standard_ops_that_onnxruntime_runs(dynamo):
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.BatchNorm2d(4)
    )
    model = bnfused.convert_model(model, fuse_relu=True, backend="cpp")
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    proto = _onnx_model(model, x, dynamo)
    ops = [node.op_type for node in proto.graph.node]
    # The first BatchNorm has no conv to fold into; the others may be folded (constant folding).
    assert ops[:2] == ["BatchNormalization", "Relu"] and "LeakyRelu" in ops
    assert all(op in ("BatchNormalization", "Relu", "Conv", "LeakyRelu") for op in ops), ops
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-5, atol=1e-5)
