"""torch.library registration: opcheck on the ops, and torch.compile(fullgraph=True) through the modules."""

import collections
import contextlib
import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import bnfused
from bnfused import activation, layout

OPS = torch.ops.bnfused


def _op_samples(backend, dtype=torch.float32):
    x = torch.randn(4, 3, 5, 5, dtype=dtype) + 1
    cl = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    mean, invstd = x.float().mean((0, 2, 3)), torch.rand(3) + 0.5
    dy = torch.randn_like(x)
    y = torch.randn_like(x)
    r = torch.randn_like(x)
    return [
        (OPS.forward_train, (x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5, activation.NONE, 0.0, None, backend)),
        (OPS.forward_train, (cl, None, None, None, None, 0.1, 1e-5, activation.RELU, 0.0, None, backend)),
        (OPS.forward_eval, (x, w, b, rm, rv, 1e-5, activation.LEAKY_RELU, 0.2, None, backend)),
        (OPS.backward, (dy, x, y, w, mean, invstd, activation.RELU, 0.0, True, True, True, True, None, None, False,
                        backend)),
        (OPS.backward, (dy, x, None, w, mean, invstd, activation.NONE, 0.0, False, True, False, True, None, None,
                        False, backend)),
        (OPS.forward_train, (x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5, activation.HARDSWISH, 0.0, r, backend)),
        (OPS.forward_eval, (cl, w, b, rm, rv, 1e-5, activation.SILU, 0.0, layout.like(cl, r), backend)),
        (OPS.backward, (dy, x, None, w, mean, invstd, activation.SILU, 0.0, True, True, True, True, b, r, True,
                        backend)),
        # act none: the residual's gradient is dy itself in the backends; the op must still return its own tensor
        (OPS.backward, (dy, x, None, w, mean, invstd, activation.NONE, 0.0, True, True, True, True, None, r, True,
                        backend)),
        (OPS.backward, (dy, x, y, w, mean, invstd, activation.RELU6, 0.0, False, False, False, False, None, r, True,
                        backend)),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(10))
def test_opcheck_reference(case):
    op, args = _op_samples("reference")[case]
    torch.library.opcheck(op, args)


def _small_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3),
    )  # fmt: skip


@contextlib.contextmanager
def compile_mode(mode):
    """bnfused's compile mode for the duration of a test, on a fresh Dynamo cache."""
    bnfused.set_compile_mode(mode)
    torch._dynamo.reset()
    try:
        yield
    finally:
        bnfused.set_compile_mode(None)
        torch._dynamo.reset()


def assert_compiled_matches_eager(backend: str, steps: int = 2, mode: str = "kernels") -> None:
    """torch.compile(fullgraph=True) of a bnfused model gives the eager model's outputs, grads and buffers.

    ``mode`` is bnfused's compile mode for training: "kernels" runs the backend's own kernels inside
    the compiled graph, "decompose" torch's ops. The last step is in eval mode (always torch's ops).
    """
    torch.manual_seed(0)
    eager = bnfused.convert_model(_small_model(), fuse_relu=True, backend=backend)
    compiled_model = copy.deepcopy(eager)
    with compile_mode(mode):
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


@pytest.mark.parametrize("mode", ["kernels", "decompose"])
def test_compile_fullgraph_matches_eager_reference(mode):
    assert_compiled_matches_eager("reference", mode=mode)


# --------------------------------------------------------------------------- what Inductor is given


def _captured_graphs(model, x, mode):
    """The FX graphs Dynamo hands a compiler backend for ``model(x)``, under bnfused compile ``mode``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with compile_mode(mode):
        torch.compile(model, backend=backend, fullgraph=True)(x)
    return graphs


def _call_targets(graphs):
    """Every function called, in the graphs and in the subgraphs they hold (an autograd.Function's
    forward and backward are captured as subgraphs)."""
    modules = [m for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)]
    return [n.target for m in modules for n in m.graph.nodes if n.op == "call_function"]


def _is_bnfused_op(target) -> bool:
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and target.namespace in (
        "bnfused",
        "bnfused_native",
    )


@pytest.mark.parametrize("mode", ["kernels", "decompose"])
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
def test_eval_under_compile_is_torch_batch_norm_not_a_bnfused_op(mode, activation):
    """Eval mode is a per-channel affine: Inductor must see it (to fuse it and fold it into a conv)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), bnfused.BatchNorm2d(4, activation=activation, negative_slope=0.2, backend="reference")
    ).eval()
    targets = _call_targets(_captured_graphs(model, torch.randn(2, 3, 6, 6), mode))
    assert not any(_is_bnfused_op(t) for t in targets), targets
    assert F.batch_norm in targets
    assert (F.relu in targets) == (activation == "relu")
    assert (F.leaky_relu in targets) == (activation == "leaky_relu")


class _ResidualBlock(nn.Module):
    """conv -> BN -> relu -> conv -> BN, + x, relu: what the fusion pass turns into BN+relu and BN+add+relu."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


def _inductor_code(model, x):
    """The output and the Python/C++ code Inductor generates for ``model`` in inference, with what
    changes from one compilation to the next (comments, with the kernels' paths and hashes, and object
    addresses) taken out."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch.no_grad():
        y, codes = run_and_get_code(torch.compile(model), x)
    torch._dynamo.reset()
    lines = (re.sub(r"0x[0-9a-f]+", "", line.split("#")[0]).rstrip() for c in codes for line in c.splitlines())
    return y, [line for line in lines if line]


@pytest.mark.slow
def test_eval_batch_norm_folds_into_the_convolution_under_freezing():
    """With Inductor's freezing, eval-mode BatchNorm is folded into the convolution before it (its
    scale and shift computed once, into the frozen weights): for a converted model, fused activation
    and residual add included, Inductor generates torch's code, line for line, with no invstd left
    to compute per call and, with mkldnn, the activations and the add as the convolutions' post-ops."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), _ResidualBlock(8),
                             nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Hardswish()).eval()  # fmt: skip
    with torch.no_grad():
        for bn in (m for m in original.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    converted = bnfused.convert_model(copy.deepcopy(original), fuse=True)
    assert sum(isinstance(m, bnfused.BatchNorm2d) and m.activation is not None for m in converted.modules()) == 4
    x = torch.randn(2, 3, 10, 10)
    # config.patch, not monkeypatch: pytest 9.2's monkeypatch undoes a setattr on a torch config
    # module with a delattr, which deletes the setting for the rest of the process.
    with torch._inductor.config.patch(freezing=True):
        got, got_code = _inductor_code(converted, x)
        want, want_code = _inductor_code(original, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_code == want_code
    assert any("convolution" in line for line in got_code)
    assert not any("sqrt" in line for line in got_code)  # invstd computed once, at freezing
    convolutions = [line for line in got_code if "mkldnn._convolution_pointwise" in line]
    post_ops = [re.findall(r"'(relu|add|hardswish)'", line) for line in convolutions]
    if post_ops:  # mkldnn's convolutions: each takes what followed its BatchNorm, which the BN would block
        assert post_ops == [["relu"], ["relu"], ["add", "relu"], ["hardswish"]]


@pytest.mark.parametrize(("mode", "expect_bnfused_op"), [("kernels", True), ("decompose", False)])
def test_training_under_compile_follows_the_compile_mode(mode, expect_bnfused_op):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnfused.BatchNorm2d(4, activation="relu", backend="reference")).train()
    targets = _call_targets(_captured_graphs(model, torch.randn(2, 3, 6, 6), mode))
    assert any(_is_bnfused_op(t) for t in targets) == expect_bnfused_op, targets
    assert (F.batch_norm in targets) != expect_bnfused_op


@pytest.mark.parametrize(
    ("training", "mode", "through_functional"),
    [(False, "decompose", False), (False, "kernels", False), (True, "decompose", False), (True, "kernels", True)],
)
def test_layers_compiled_to_torch_ops_skip_the_functional_path(monkeypatch, training, mode, through_functional):
    """A layer that becomes torch's ops under compile (eval, or training in "decompose" mode) is traced
    as torch's BatchNorm forward, the add and the activation, not through bnfused.functional: every
    global and attribute read Dynamo traces there becomes a guard that each compiled call checks. The
    opaque-op route ("kernels" training) still goes through it, and so trips the stand-in."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), bnfused.BatchNorm2d(4, activation="relu", backend="reference"), nn.Flatten(),
        nn.Linear(64, 8), bnfused.BatchNorm1d(8, backend="reference"),
    ).train(training)  # fmt: skip
    x = torch.randn(3, 3, 6, 6)
    expected = copy.deepcopy(model)(x)

    def functional_batch_norm(*args, **kwargs):
        raise RuntimeError("bnfused.functional.batch_norm traced")

    monkeypatch.setattr(bnfused.modules, "batch_norm", functional_batch_norm)
    with compile_mode(mode):
        compiled = torch.compile(model, fullgraph=True)
        if through_functional:
            with pytest.raises(Exception, match="functional.batch_norm traced"):
                compiled(x)
        else:
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_layer_refuses_a_negative_slope_set_after_construction(training):
    """The eager path refuses it (the mask is read off y); the compiled path, torch's ops, must too."""
    layer = bnfused.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.2).train(training)
    layer.negative_slope = -0.5
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="negative_slope >= 0"):
        layer(x)
    with compile_mode("decompose"), pytest.raises(Exception, match="negative_slope >= 0"):
        torch.compile(layer, fullgraph=True)(x)


# vmap through a lambda: vmap names a function by its repr, which Dynamo cannot trace for a module
# (torch's BatchNorm's either). No jvp or forward-mode AD: Dynamo's fake run of torch's own
# BatchNorm trips an internal assert there (test_transforms.py runs a compiled jvp in a subprocess).
_TRANSFORMS = {
    "vmap": lambda layer, x: torch.func.vmap(lambda x: layer(x))(x),
    "grad": lambda layer, x: torch.func.grad(lambda x: layer(x).square().sum())(x),
}


@pytest.mark.parametrize("transform", list(_TRANSFORMS))
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_transforms_inside_a_compiled_step_decompose_in_kernels_mode(transform, functional):
    """In "kernels" mode a training layer under compile is an opaque op, with no batching rule or jvp
    formula: under a transform traced in the same graph it must be torch's ops. The functorch depth is
    read while Dynamo traces (torch 2.11's Dynamo refuses the builtin that reads it)."""
    torch.manual_seed(0)
    layer = bnfused.BatchNorm1d(3, activation="relu", track_running_stats=False, backend="reference")
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    reference = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.ReLU())
    reference[0].load_state_dict(layer.state_dict())
    if functional:
        w, b = layer.weight, layer.bias
        layer = lambda x: bnfused.functional.batch_norm(x, None, None, w, b, True, activation="relu")
    x = torch.randn(2, 4, 3, 5) if transform == "vmap" else torch.randn(4, 3, 5)
    step = _TRANSFORMS[transform]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with compile_mode("kernels"):
        got = torch.compile(lambda x: step(layer, x), backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(got, step(reference, x), rtol=1e-4, atol=1e-5)
    targets = _call_targets(graphs)
    assert F.batch_norm in targets and not any(_is_bnfused_op(t) for t in targets), targets


def test_compile_mode_setting():
    assert bnfused.get_compile_mode("cpu") == "decompose"  # measured default (README, "Under torch.compile")
    with compile_mode("kernels"):
        assert bnfused.get_compile_mode("cpu") == bnfused.get_compile_mode("cuda") == "kernels"
    with pytest.raises(ValueError, match="compile mode must be one of decompose, kernels"):
        bnfused.set_compile_mode("inductor")


def test_compile_mode_from_the_environment():
    code = "import bnfused; print(bnfused.get_compile_mode('cpu'))"
    env = {**os.environ, "BNFUSED_COMPILE": "kernels"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "kernels"
    env["BNFUSED_COMPILE"] = "fast"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "BNFUSED_COMPILE must be one of decompose, kernels" in bad.stderr


# --------------------------------------------------------------------------- whole torchvision models

# ResNet-50's blocks hold ResNet-18's BatchNorm -> ReLU pairs; its compiled graphs are compared op for op
# with torch's below (test_compiled_converted_model_is_torchs_own_graph).
_TORCHVISION_MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0"]


def _models_pair(name):
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None, num_classes=5).double()
    return original, bnfused.convert_model(copy.deepcopy(original), fuse_relu=True, backend="reference")


def _step(model, x, training):
    torch.manual_seed(1)  # the same dropout masks for each model
    model.train(training)
    out = model(x)
    if training:
        out.square().mean().backward()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", _TORCHVISION_MODELS)
def test_compiled_torchvision_models_match_eager_and_torch(name, training):
    """Values, gradients, running stats and num_batches_tracked of the compiled converted model equal
    the eager converted model and the torch.nn original (float64, one graph, no graph break).

    Compiled with aot_eager: Dynamo capture and AOTAutograd (functionalised buffer updates, the
    backward graph) are bnfused's concern; Inductor's code generation for torch's ops is torch's,
    and is run on the small model above."""
    from torch._dynamo.testing import CompileCounterWithBackend

    original, converted = _models_pair(name)
    twin = copy.deepcopy(converted)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, backend=counter, fullgraph=True)  # a graph break raises
    outs = [_step(m, x, training) for m in (original, converted, compiled)]
    assert counter.frame_count == 1  # one graph
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(outs[2], outs[0])
    for reference in (original, converted):
        for (name_r, t_r), (_, t_c) in zip(
            [*reference.named_parameters(), *reference.named_buffers()],
            [*twin.named_parameters(), *twin.named_buffers()],
        ):
            torch.testing.assert_close(t_c, t_r, msg=lambda m, n=name_r: f"{n}: {m}")
            if isinstance(t_r, nn.Parameter) and training:
                torch.testing.assert_close(t_c.grad, t_r.grad, msg=lambda m, n=name_r: f"{n}.grad: {m}")
    torch._dynamo.reset()


def _aten_graphs(model, x, training):
    """The forward (and backward) ATen graphs AOTAutograd makes of ``model``, as counts of each op."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def grab(gm, example_inputs):
        graphs.append(collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=grab, bw_compiler=grab), fullgraph=True)
    with torch.set_grad_enabled(training):  # inference as users run it: eval mode, no autograd
        _step(compiled, x, training)
    torch._dynamo.reset()
    return graphs


# Ops that Inductor removes or that cost no pass over memory: where a graph saves an activation's
# output (detach) and torchvision's in-place hardswish keeps its input (clone).
_FREE_OPS = ("aten.detach.default", "aten.clone.default")


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0"])
def test_compiled_converted_model_is_torchs_own_graph(name, training):
    """Under torch.compile (the default compile mode), a model converted with ``fuse=True`` compiles to
    the same ATen ops, op for op, as the torch.nn original: Inductor gets torch's graph to fuse and
    fold, so compiled bnfused costs what compiled torch costs by construction, not just within the
    noise of a timing. Only ops that move no data may differ."""
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None, num_classes=5)
    converted = bnfused.convert_model(copy.deepcopy(original), fuse=True)
    x = torch.randn(2, 3, 32, 32)
    got, want = _aten_graphs(converted, x, training), _aten_graphs(original, x, training)
    assert len(got) == len(want) == (2 if training else 1)
    for g, w in zip(got, want):
        for op in _FREE_OPS:
            g.pop(op, None)
            w.pop(op, None)
        assert g == w, f"only in bnfused's graph: {g - w}; only in torch's: {w - g}"
