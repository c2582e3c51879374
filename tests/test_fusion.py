"""BatchNorm + residual add + activation: the functional API on every CPU backend, and the FX pass
of ``convert_model(fuse=True)`` on torchvision's models."""

import contextlib
import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import bnfused
from bnfused import activation as act_codes
from bnfused import fusion

ACTIVATIONS = [None, "relu", "leaky_relu", "relu6", "hardswish", "silu", "sigmoid"]
CPU_BACKENDS = ["reference", "cpp", "triton"]


def _torch_layer(x, rm, rv, w, b, training, activation, residual):
    y = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if residual is not None:
        y = y + residual
    return act_codes.apply(y, *act_codes.parse(activation, 0.2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_and_activation_match_torch(backend, activation, training):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    residual = torch.randn_like(x)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    leaves = [t.clone().requires_grad_() for t in (x, residual, w, b)]
    twins = [t.clone().requires_grad_() for t in (x, residual, w, b)]
    rm2, rv2 = rm.clone(), rv.clone()
    got = bnfused.batch_norm(
        leaves[0], rm, rv, leaves[2], leaves[3], training, 0.1, 1e-5, activation, 0.2, backend, residual=leaves[1]
    )
    want = _torch_layer(twins[0], rm2, rv2, twins[2], twins[3], training, activation, twins[1])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    dy = torch.randn_like(got)
    got.backward(dy)
    want.backward(dy)
    for name, a, t in zip(("x", "residual", "weight", "bias"), leaves, twins):
        torch.testing.assert_close(a.grad, t.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("activation", ["relu6", "hardswish", "silu", "sigmoid", "leaky_relu"])
def test_gradcheck_float64_with_residual(backend, activation):
    torch.manual_seed(0)
    x = (torch.randn(3, 2, 3, dtype=torch.float64) * 2).requires_grad_()
    residual = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def layer(x, residual, w, b):
        return bnfused.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, activation, 0.2, backend, residual=residual)

    assert torch.autograd.gradcheck(layer, (x, residual, w, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fused_layer_is_one_autograd_node_saving_the_fewest_tensors(backend, activation, residual):
    """Where the backend's kernels fuse the activation (and the add), the layer is one autograd node,
    and it saves the output only for activations whose derivative is read off it, the input (plus
    bias and residual) for the others: never both x and y, never z."""
    module = bnfused.backends.module(backend)
    code = act_codes.parse(activation, 0.2)[0]
    assert code in module.ACTIVATIONS and module.RESIDUAL, f"{backend}'s kernels no longer fuse {activation}"
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, requires_grad=True) if residual else None
    w, b = (torch.rand(3) + 0.5).requires_grad_(), torch.randn(3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bnfused.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, activation, 0.2, backend, residual=r)
    assert all(f[0] is None or "Accumulate" in type(f[0]).__name__ for f in y.grad_fn.next_functions), (
        f"more than one autograd node: {y.grad_fn.next_functions}"
    )
    big = [t for t in saved if t.numel() == x.numel()]
    names = {id(x): "x", id(y): "y"} | ({id(r): "residual"} if residual else {})
    found = sorted(names.get(id(t), "other") if t.data_ptr() != y.data_ptr() else "y" for t in big)
    want = ["x"] + (["y"] if code in (act_codes.RELU, act_codes.LEAKY_RELU, act_codes.RELU6) else [])
    if act_codes.grad_from_input(code) and residual:
        want.append("residual")
    assert found == sorted(want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["relu6", "hardswish", "silu", None])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_with_residual_matches_torch(backend, activation, training):
    """create_graph=True through the fused layer: second derivatives (hardswish'' and silu'' are not 0)."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, dtype=torch.float64) * 2 + 1
    r = torch.randn_like(x)
    w, b = torch.rand(2, dtype=torch.float64) + 0.5, torch.randn(2, dtype=torch.float64)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    dy = torch.randn_like(x)
    results = []
    for fn in (
        lambda *t: bnfused.batch_norm(t[0], rm.clone(), rv.clone(), t[2], t[3], training, 0.1, 1e-5, activation, 0.2,
                                      backend, residual=t[1]),
        lambda *t: _torch_layer(t[0], rm.clone(), rv.clone(), t[2], t[3], training, activation, t[1]),
    ):  # fmt: skip
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
        grads = torch.autograd.grad(fn(*leaves), leaves, dy, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), leaves, allow_unused=True)
        results.append([*grads, *second])
    for i, (got, want) in enumerate(zip(*results)):  # an unused input's None is a zero gradient
        got, want = (t if t is not None else torch.zeros_like(results[0][i % 4]) for t in (got, want))
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "relu6", "hardswish", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_channels_last_and_bfloat16_match_torch(backend, activation, dtype):
    """The fused add reads the residual with the input's strides, whatever the residual's own are."""
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 4, 3) * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    r = torch.randn(3, 5, 4, 3).to(dtype)  # contiguous: the layer must not read it with x's strides
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    leaves = [t.clone().requires_grad_() for t in (x, r)]
    got = bnfused.batch_norm(leaves[0], None, None, w, b, True, 0.1, 1e-5, activation, 0.2, backend, residual=leaves[1])
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
    twins = [t.float().requires_grad_() for t in (x, r)]
    want = _torch_layer(twins[0], None, None, w, b, True, activation, twins[1])
    dy = torch.randn(x.shape)
    got.backward(dy.to(dtype))
    want.backward(dy)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    for name, a, t in zip(("x", "residual"), leaves, twins):
        torch.testing.assert_close(a.grad.float(), t.grad, **tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_residual_broadcasts_and_promotes_as_torch():
    x = torch.randn(4, 3, 2, 2)
    for residual in (torch.randn(1, 3, 1, 1), torch.randn(4, 3, 2, 2, dtype=torch.float64)):
        got = bnfused.batch_norm(x, None, None, training=True, activation="silu", residual=residual, backend="cpp")
        want = F.silu(F.batch_norm(x, None, None, training=True) + residual)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="residual"):
        bnfused.batch_norm(x, None, None, training=True, residual=[1.0])


def test_compiled_layer_with_residual_is_torch_graph():
    layer = bnfused.BatchNorm2d(3, activation="hardswish", backend="reference")
    x, r = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    twin = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, r), twin(x, r))
    torch.testing.assert_close(layer.running_var, twin.running_var)


# --------------------------------------------------------------------------- the FX pass on real models

# (model, {(activation, residual?): number of fused layers}) as the pass must find them.
_EXPECTED_SITES = {
    "resnet18": {("relu", False): 9, ("relu", True): 8},
    "resnet50": {("relu", False): 33, ("relu", True): 16},
    "mobilenet_v3_small": {("hardswish", False): 18, ("relu", False): 5, (None, True): 6},
    "efficientnet_b0": {("silu", False): 33},
}


def _fused_sites(model):
    found = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            key = (m.activation, getattr(m, "takes_residual", False))
            if key != (None, False):
                found[key] = found.get(key, 0) + 1
    return found


def _train_step(model, x):
    torch.manual_seed(1)  # the same dropout and stochastic-depth draws for each model
    out = model(x)
    out.square().mean().backward()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_EXPECTED_SITES))
def test_fx_pass_fuses_torchvision_models(name):
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None, num_classes=5).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that traces must not warn
        fused = bnfused.convert_model(copy.deepcopy(original), fuse=True, backend="reference")
    assert _fused_sites(fused) == _EXPECTED_SITES[name]
    assert fusion.find_sites(fused) == []  # nothing fusable is left behind
    # state_dict round trip, both ways, with the same keys in the same order.
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict())
    copy.deepcopy(original).load_state_dict(fused.state_dict())

    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        original.train(training)
        fused.train(training)
        for p in [*original.parameters(), *fused.parameters()]:
            p.grad = None
        out_o, out_f = (_train_step(m, x) for m in (original, fused))
        _assert_float64_equal(out_f, out_o, "output")
        for (n, p_o), p_f in zip(original.named_parameters(), fused.parameters()):
            _assert_float64_equal(p_f.grad, p_o.grad, f"{n}.grad")
        for (n, b_o), b_f in zip(original.named_buffers(), fused.buffers()):
            _assert_float64_equal(b_f, b_o, n)


def _assert_float64_equal(got, want, name):
    """Equal within 1e-9 of the tensor's scale. Absolute differences grow with depth: at 32x32, the
    last stage of ResNet-50 normalises 4 values per channel, and its rounding errors reach conv
    gradients of size 1e2 (the plain layer swap shows the same differences as the fused one)."""
    scale = max(want.abs().max().item(), 1.0)
    assert (got - want).abs().max().item() <= 1e-9 * scale, name


def test_fused_resnet_compiles_in_one_graph_and_matches_eager():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double()
    fused = bnfused.convert_model(model, fuse=True, backend="reference")
    twin = copy.deepcopy(fused)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    explained = torch._dynamo.explain(copy.deepcopy(fused))(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), twin(x))
    for (n, b_c), b_e in zip(fused.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b_c, b_e, msg=lambda m, n=n: f"{n}: {m}")


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.relu(self.bn(x))
        return self.bn(x)


class _ModeDependent(_Branchy):
    def forward(self, x):
        return self.relu(self.bn(x)) if self.training else self.bn(x)


@pytest.mark.parametrize(("cls", "reason"), [(_Branchy, "torch.fx cannot trace it"), (_ModeDependent, "self.training")])
def test_untraceable_models_fall_back_with_one_warning(cls, reason):
    model = cls()
    with pytest.warns(RuntimeWarning, match=reason) as record:
        converted = bnfused.convert_model(model, fuse=True)
    assert len(record) == 1
    assert type(converted) is cls and isinstance(converted.bn, bnfused.BatchNorm1d)
    assert converted.bn.activation is None


class _Made(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.bn, self.make = nn.BatchNorm1d(3), make

    def forward(self, x):
        return F.relu(self.bn(x) + self.make(x))


class _Jitter(_Made):
    def forward(self, x):
        return F.relu(self.bn(x) + torch.rand(1))  # new noise on every call


class _TensorAttribute(_Made):
    def forward(self, x):
        return F.relu(self.bn(x) * self.scale)


class _Counter(_Made):
    def forward(self, x):
        self.calls += 1  # a buffer updated in place at every call
        return F.relu(self.bn(x) + x)


class _Reassigned(_Made):
    def forward(self, x):
        self.calls = self.calls + 1  # a new tensor in the buffer's place at every call
        return F.relu(self.bn(x) + x)


class _DrawnNumber(_Made):
    def forward(self, x):
        return F.relu(self.bn(x) + x) * torch.rand(1).item()  # a Python number drawn at every call


class _BufferInput(_Made):
    def forward(self, x):
        y = self.bn(self.memory)
        self.memory.add_(x)  # written after the BatchNorm read it, before the add (a node: x is traced)
        return y + x


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (_Jitter, "a tensor its forward makes without tensor inputs"),
        (_TensorAttribute, "attribute 'scale'"),
        (_Counter, "changes 'calls'"),
        (_Reassigned, "changes 'calls'"),
        (_DrawnNumber, "turns a tensor into a Python value"),
    ],
)
def test_what_a_trace_would_freeze_is_not_traced(cls, reason):
    """A trace runs the forward once: a tensor that is not a parameter or buffer becomes a constant of
    the graph (and a state_dict key), a buffer updated in the forward is updated once, a number taken
    from a tensor is taken once. Such a model is converted without the pass, left as it was."""
    model = cls(None)
    model.scale = torch.tensor(2.0)
    model.register_buffer("calls", torch.zeros(()))
    with pytest.warns(RuntimeWarning, match=reason):
        converted = bnfused.convert_model(model, fuse=True)
    assert type(converted) is cls and converted.bn.activation is None
    assert list(converted.state_dict()) == ["calls", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                            "bn.num_batches_tracked"]  # fmt: skip
    assert not [name for name in vars(model) if name.startswith("_tensor_constant")]  # fx's attribute removed
    assert converted.calls.item() == 0  # the trace's update undone
    x = torch.randn(4, 3)
    converted.eval()
    converted(x)
    assert converted.calls.item() == (1 if cls in (_Counter, _Reassigned) else 0)
    if cls in (_Jitter, _DrawnNumber):
        assert not torch.equal(converted(x), converted(x))


def test_a_buffer_the_batchnorm_reads_and_the_forward_then_writes_keeps_it_in_place():
    torch.manual_seed(0)
    original = _BufferInput(None)
    original.register_buffer("memory", torch.randn(4, 3))
    converted = bnfused.convert_model(copy.deepcopy(original), fuse=True)
    assert not converted.bn.takes_residual
    x = torch.randn(4, 3)
    torch.testing.assert_close(converted(x), original(x))
    torch.testing.assert_close(converted.memory, original.memory)


def _writes_into_bn_input(kind):
    """A block whose BatchNorm's input is ``h``; between the BatchNorm and the add, ``kind`` says what
    writes in place, and into what."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.proj = nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3), nn.Conv1d(3, 3, 1)
            self.act = nn.ReLU(inplace=True)
            self.own = _InPlaceLeaf()
            # out= refuses a tensor that requires grad, and autograd an in-place write into one of chunk's views
            self.conv.requires_grad_(kind not in ("out", "tuple of views"))

        def forward(self, x):
            h = self.conv(x)
            out = self.bn(h)
            if kind == "method":
                shortcut = self.proj(h.relu_())
            elif kind == "view":
                flat = h.flatten(1)
                flat.mul_(2.0)
                shortcut = self.proj(h)
            elif kind == "function":
                shortcut = self.proj(torch.relu_(h))
            elif kind == "out":
                shortcut = self.proj(torch.mul(h, 2.0, out=h))
            elif kind == "torch module":
                shortcut = self.proj(self.act(h))
            elif kind == "own module":
                shortcut = self.proj(self.own(h))
            elif kind == "running stats":
                shortcut = (self.proj(x).transpose(1, 2) + self.bn.running_mean).transpose(1, 2)
            elif kind == "tuple of views":
                parts = h.chunk(3, 1) + x.chunk(3, 1)  # operator.add of two tuples, the first of views of h
                parts[0].add_(1.0)
                shortcut = self.proj(x)
            elif kind == "aten overload":
                shortcut = self.proj(torch.ops.aten.relu_.default(h))
            elif kind == "block input":  # x is not h, nor shares its memory: fused
                shortcut = self.proj(x.relu_())
            else:  # the new tensor the conv gives is written into, not h: fused
                shortcut = self.proj(self.proj(h).relu_())
            return F.relu(out + shortcut)

    return Block()


class _InPlaceLeaf(nn.Module):
    def forward(self, t):
        return t.sigmoid_()


@pytest.mark.parametrize(
    "kind",
    [
        "method",
        "view",
        "function",
        "out",
        "tuple of views",
        "aten overload",
        "torch module",
        "own module",
        "running stats",
        "block input",
        "new tensor",
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_batchnorm_is_not_moved_past_a_write_into_its_input(kind, training):
    """A fused BN -> add runs where the add was: a node between them that writes in place into the
    BatchNorm's input (or a view of it), or reads the BatchNorm's running stats, keeps the BatchNorm
    where it is; writes into other tensors do not."""
    torch.manual_seed(0)
    original = _writes_into_bn_input(kind).train(training)
    converted = bnfused.convert_model(copy.deepcopy(original), fuse=True)
    fused = kind in ("block input", "new tensor")
    assert converted.bn.takes_residual if fused else type(converted) is type(original), kind
    x = torch.randn(4, 3, 5)
    torch.testing.assert_close(converted(x.clone()), original(x.clone()))
    torch.testing.assert_close(converted.bn.running_mean, original.bn.running_mean)


@pytest.mark.parametrize("memory", ["default", "inplace"])
def test_fusing_a_converted_model_keeps_its_memory_mode_and_results(memory):
    """A model converted before (memory="inplace" layers write their output over their input): the
    shortcut's layer writing into its own input does not stop the fusion of the other BatchNorm's add,
    and an activation an "inplace" layer cannot invert stays a module of its own."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)
            self.shortcut = nn.Sequential(nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3))

        def forward(self, x):
            out = self.bn(self.conv(x))
            return F.relu(out.add_(self.shortcut(x)))

    torch.manual_seed(0)
    original = Block()  # torch's layers: the reference (an "inplace" layer's output may not be added into)
    converted = bnfused.convert_model(copy.deepcopy(original), memory=memory)
    fused = bnfused.convert_model(converted, fuse=True)
    assert fused.bn.takes_residual and fused.bn.memory == memory
    assert fused.bn.activation == ("relu" if memory == "default" else None)
    x = torch.randn(4, 3, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    got, want = fused(x), original(x2)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_every_module_keeps_its_mode_through_conversion_copies_and_pickles():
    """fx builds a new container (in training mode) for each module it traces through: the fused
    model's modules keep the model's modes (an eval model stays all eval), in copies and pickles too."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.spare = nn.Sequential(nn.Linear(2, 2), nn.Dropout())  # not read by the forward

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.extra = nn.ModuleDict({"a": Block()})

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.extra["a"](x)

    def modes(model):
        return [(name, m.training) for name, m in model.named_modules(remove_duplicate=False)]

    torch.manual_seed(0)
    for original in (Net().eval(), torchvision.models.resnet18(num_classes=4).eval()):
        fused = bnfused.convert_model(copy.deepcopy(original), fuse=True)
        assert modes(fused) == modes(original)
        for twin in (copy.copy(fused), copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert modes(twin) == modes(original)
    mixed = Net().eval()
    mixed.blocks[1].train()
    mixed.blocks[1].spare[1].eval()
    fused = bnfused.convert_model(copy.deepcopy(mixed), fuse=True)
    assert modes(fused) == modes(mixed)
    assert modes(pickle.loads(pickle.dumps(fused))) == modes(mixed)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x), mixed(x))


def test_a_block_that_overrides_train_is_kept_whole():
    """A block whose train() keeps its BatchNorms' statistics frozen (a detection backbone's pattern)
    stays a module of its class (fx would put a container there, whose train() is nn.Module's); a
    root that overrides train() is not traced at all."""

    class FrozenStats(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

        def train(self, mode=True):
            super().train(mode)
            self.bn.eval()
            return self

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = FrozenStats()
            self.head = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())

        def forward(self, x):
            return self.head(self.backbone(x))

    torch.manual_seed(0)
    original = Net().train()
    fused = bnfused.convert_model(copy.deepcopy(original), fuse=True)
    assert type(fused.backbone) is FrozenStats and fused.head._modules["1"].activation == "relu"
    x = torch.randn(2, 3, 4, 4)
    for model in (original, fused):
        model.eval().train()
        model(x)
    assert not fused.backbone.bn.training
    torch.testing.assert_close(fused.backbone.bn.running_mean, original.backbone.bn.running_mean)
    torch.testing.assert_close(fused.head._modules["1"].running_mean, original.head[1].running_mean)
    with pytest.warns(RuntimeWarning, match="FrozenStats overrides train"):
        root = bnfused.convert_model(FrozenStats(), fuse=True)
    assert type(root) is FrozenStats

    class NeverCalled:  # after nn.Module in the MRO: its train() is not the one that runs
        def train(self, mode=True):
            raise AssertionError("not called")

    class MixedIn(_Block, NeverCalled):
        pass

    fused = bnfused.convert_model(MixedIn(), fuse=True)
    assert fused.bn.takes_residual and fused.bn.activation == "relu"


def test_parameters_keep_their_registration_order():
    """fx registers submodules in the order the forward first uses them; the fused model keeps the
    model's order, which an optimizer's state_dict and parameters_to_vector index by."""

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, used last
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.register_buffer("unused", torch.zeros(1))
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3))) * self.scale

    torch.manual_seed(0)
    original = HeadFirst()
    original.body.unused = nn.Parameter(torch.ones(3))  # in a container traced through, not read by the forward
    original.body.register_buffer("unused_buffer", torch.ones(1))
    original.body.register_buffer("scratch", torch.ones(1), persistent=False)
    fused = bnfused.convert_model(copy.deepcopy(original), fuse=True)
    assert fused.body._modules["1"].activation == "relu"
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in original.named_buffers()]
    assert list(fused.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 6, 6)
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9)
    original(x).sum().backward()
    optimizer.step()
    resumed = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    resumed.load_state_dict(optimizer.state_dict())
    for (name, p), q in zip(fused.named_parameters(), original.parameters()):
        assert (p in resumed.state) == (q in optimizer.state), name  # the unused parameter has none
        if q in optimizer.state:
            torch.testing.assert_close(resumed.state[p]["momentum_buffer"], optimizer.state[q]["momentum_buffer"])


def test_shared_and_multiply_used_batchnorms_are_not_fused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            a = F.relu(self.bn(x))  # one module called twice: its activation cannot differ per call
            y = self.bn(a)
            return F.silu(y) + y  # an output used twice: the activation is not its only use

    model = bnfused.convert_model(Shared(), fuse=True)
    assert isinstance(model.bn, bnfused.BatchNorm1d) and model.bn.activation is None


def test_functional_activations_and_methods_are_found():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)
            self.d, self.e = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

        def forward(self, x):
            y = F.leaky_relu(self.a(x), 0.3)
            y = torch.relu(self.b(y) + x)
            y = torch.sigmoid(self.d(y))
            y = self.e(y).sigmoid()
            return (x + self.c(y)).relu()

    torch.manual_seed(0)
    model = Functional()
    fused = bnfused.convert_model(copy.deepcopy(model), fuse=True, backend="reference")
    assert (fused.a.activation, fused.a.negative_slope) == ("leaky_relu", 0.3)
    assert fused.b.activation == fused.c.activation == "relu"
    assert fused.b.takes_residual and fused.c.takes_residual
    assert fused.d.activation == fused.e.activation == "sigmoid"
    x = torch.randn(5, 4)
    torch.testing.assert_close(fused(x), model(x))


def test_revert_model_after_fusion():
    fused = bnfused.convert_model(torchvision.models.mobilenet_v3_small(num_classes=5), fuse=True)
    with pytest.raises(ValueError, match="cannot undo a fused residual add"):
        bnfused.revert_model(fused)
    seq = bnfused.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardswish()), fuse=True)
    x = torch.randn(2, 3, 6, 6)
    want = seq(x)
    reverted = bnfused.revert_model(seq)
    assert not any(isinstance(m, bnfused.BatchNorm2d) for m in reverted.modules())
    torch.testing.assert_close(reverted(x), want)


def test_sync_conversion_fuses_only_what_syncbatchnorm_runs():
    model = bnfused.convert_model(torchvision.models.resnet18(num_classes=5), fuse=True, sync=True)
    sync_layers = [m for m in model.modules() if isinstance(m, bnfused.SyncBatchNorm)]
    assert len(sync_layers) == 20
    assert sum(m.activation == "relu" for m in sync_layers) == 9
    assert not any(getattr(m, "takes_residual", False) for m in sync_layers)
    fused = bnfused.convert_model(torchvision.models.resnet18(num_classes=5), fuse=True)
    with pytest.raises(ValueError, match=r"SyncBatchNorm takes no residual.*fuse=True, sync=True"):
        bnfused.SyncBatchNorm.convert_sync_batchnorm(fused)
    with_relu = bnfused.SyncBatchNorm.convert_sync_batchnorm(bnfused.BatchNorm2d(3, activation="relu"))
    assert isinstance(with_relu, bnfused.SyncBatchNorm) and with_relu.activation == "relu"


# --------------------------------------------------------------------------- what the outside review found


class _DropoutBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.dropout(F.relu(self.bn(x)), 0.5, training=self.training)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _DropoutBlock()

    def forward(self, x):
        return self.block(x)


def test_a_child_that_reads_self_training_stays_a_leaf():
    torch.manual_seed(0)
    model = _Outer()
    fused = bnfused.convert_model(copy.deepcopy(model), fuse=True)
    x = torch.randn(4, 3, 5, 5)
    model.eval()
    fused.eval()  # a traced dropout would stay on: the block must be called, not inlined
    torch.testing.assert_close(fused(x), model(x))


def test_layers_with_an_activation_or_a_forward_of_their_own_are_left_alone():
    class Preactivated(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnfused.BatchNorm2d(3, activation="relu")

        def forward(self, x):
            return F.hardswish(self.bn(x) + x)

    class MyBN(nn.BatchNorm2d):  # a subclass with its own forward: not one of the classes bnfused converts
        def forward(self, x):
            return super().forward(x) * 2

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = MyBN(3)

        def forward(self, x):
            return F.relu(self.bn(x))

    x = torch.randn(4, 3, 5, 5)
    for model in (Preactivated(), Custom()):
        fused = bnfused.convert_model(copy.deepcopy(model), fuse=True)
        torch.testing.assert_close(fused(x), model(x))
    twice = bnfused.convert_model(bnfused.convert_model(_Branchless(), fuse=True), fuse=True)
    torch.testing.assert_close(twice(x), _Branchless()(x))


class _Branchless(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.silu(F.relu(self.bn(x)))


def test_unused_submodules_and_buffers_keep_their_state_dict_keys_and_the_model_pickles():
    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.proj = nn.Linear(3, 8)  # used outside forward
            self.register_buffer("temperature", torch.tensor(0.07))

        def forward(self, x):
            return F.relu(self.bn(x))

    fused = bnfused.convert_model(Extra(), fuse=True)
    assert set(fused.state_dict()) == set(Extra().state_dict())
    fused.load_state_dict(Extra().state_dict())
    assert fused.proj is not None and len(list(fused.parameters())) == 4
    x = torch.randn(2, 3, 4, 4)
    again = pickle.loads(pickle.dumps(fused))
    torch.testing.assert_close(again(x), fused(x))


class _Nested(nn.Module):
    """Containers within containers, as torchvision's models have them, with a residual add."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardswish()))
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 5))

    def forward(self, x):
        y = self.stem(x)
        return self.head(self.block(y) + y)


def _container_lookups(model, x, monkeypatch) -> int:
    """How often a call of ``model`` asks ``nn.Module.__getattr__`` for a submodule of a container:
    the fused forward reaches them through ``_modules``."""
    calls = []
    slow_lookup = nn.Module.__getattr__

    def counted(module, name):
        found = slow_lookup(module, name)
        calls.extend([name] if isinstance(found, nn.Module) else [])
        return found

    with monkeypatch.context() as patch:
        patch.setattr(nn.Module, "__getattr__", counted)
        model(x)
    return len(calls)


def test_fused_forward_looks_submodules_up_directly_and_as_they_are_now(monkeypatch):
    original = _Nested()
    fused = bnfused.convert_model(copy.deepcopy(original), fuse=True, backend="reference")
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fused(x), original(x))
    assert fused.get_submodule("block.1").takes_residual  # the add went into the layer
    assert _container_lookups(original, x, monkeypatch) > 0  # nn.Sequential's own forward
    assert _container_lookups(fused, x, monkeypatch) == 0
    assert "getattr(self.stem" in fused.code  # fx's code: what prints, pickles and scripts
    # A submodule replaced after the conversion, at any depth, is the one called.
    conv, head = nn.Conv2d(3, 4, 3), nn.Linear(4 * 3 * 3, 5)
    original.stem[0][0], original.head[1] = conv, head
    setattr(fused.get_submodule("stem.0"), "0", conv)
    setattr(fused.get_submodule("head"), "1", head)
    torch.testing.assert_close(fused(x), original(x))
    for twin in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)), copy.copy(fused)):
        torch.testing.assert_close(twin(x), original(x))
        assert _container_lookups(twin, x, monkeypatch) == 0
        assert set(twin.state_dict()) == set(original.state_dict())
    del fused.head
    with pytest.raises(AttributeError, match="head"):  # fx's error, not a KeyError
        fused(x)


class _Forwarding(nn.Module):
    """A wrapper that forwards attribute lookups to the module it wraps, as torch.compile's and
    activation checkpointing's do: the wrapped module's children are not in its ``_modules``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_fused_forward_follows_wrapped_containers_and_keeps_aliases_and_constants():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
            self.backbone = self.body  # a second name, used outside forward (checkpoints hold both)
            self.scale = nn.Parameter(torch.tensor(2.0))
            self.scale_alias = self.scale

        def forward(self, x):
            return self.body(x) * self.scale, "y = self.body(x)", 'say "y = self.body(x)"'

    original = Aliased()
    fused = bnfused.convert_model(copy.deepcopy(original), fuse=True)
    x = torch.randn(2, 3, 4, 4)
    got, want = fused(x), original(x)
    torch.testing.assert_close(got[0], want[0])
    assert got[1:] == want[1:]  # string constants that look like a submodule call are left as they are
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.body = _Forwarding(fused.body)
    torch.testing.assert_close(fused(x)[0], want[0])


def test_names_fx_cannot_write_fall_back():
    model = nn.Sequential()
    model.add_module("a\\b", nn.BatchNorm2d(3))
    model.add_module("act", nn.ReLU())
    with pytest.warns(RuntimeWarning, match="cannot write the submodule name"):
        fused = bnfused.convert_model(model, fuse=True)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(pickle.loads(pickle.dumps(fused))(x), fused(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_scripting_a_model_that_holds_a_fused_one_leaves_it_in_place():
    fused = bnfused.convert_model(_Nested().eval(), fuse=True)
    parent = nn.Sequential(fused, nn.Identity()).eval()
    scripted = torch.jit.script(parent)
    assert parent[0] is fused
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(scripted(x), fused(x))


def test_fusing_a_fused_model_again_keeps_it(recwarn):
    fused = bnfused.convert_model(_Nested(), fuse=True)
    assert bnfused.convert_model(fused, fuse=True) is fused
    assert not [w for w in recwarn if "bnfused" in str(w.message)]


def test_lazy_numbers_and_optional_arguments():
    class LazyResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.LazyBatchNorm2d()

        def forward(self, x):
            return F.relu(self.bn(x) + x)

    class PlusNumber(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return F.relu(self.bn(x) + x.shape[0])  # the add's other operand is an int, not a tensor

    class Optional(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x, mask=None):
            y = F.relu(self.bn(x))
            return y if mask is None else y * mask

    x = torch.randn(4, 3, 5, 5)
    for make in (LazyResidual, PlusNumber):
        torch.manual_seed(0)
        model, fused = make(), bnfused.convert_model(make(), fuse=True)  # lazy layers cannot be deep-copied
        torch.testing.assert_close(fused(x), model(x))
    with pytest.warns(RuntimeWarning, match="optional arguments"):
        fused = bnfused.convert_model(Optional(), fuse=True)
    assert fused(x).shape == x.shape and fused(x, torch.zeros_like(x)).abs().max() == 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inference_overwrites_only_its_own_output(activation):
    """Without autograd the unfused add and activation work in place on the layer's fresh output; the
    input and the residual stay as they were."""
    x, residual = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    x0, r0 = x.clone(), residual.clone()
    with torch.no_grad():
        for r in (residual, residual[:1], None):  # same shape (in place), broadcast, none
            got = bnfused.batch_norm(x, rm, rv, activation=activation, negative_slope=0.2, residual=r, backend="cpp")
            torch.testing.assert_close(got, _torch_layer(x, rm, rv, None, None, False, activation, r))
    assert torch.equal(x, x0) and torch.equal(residual, r0)


# --------------------------------------------------------------------------- outside review's regressions


@pytest.mark.parametrize("as_keyword", [False, True])
def test_lazy_module_takes_a_residual_on_its_first_call(as_keyword):
    x, r = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    lazy = bnfused.LazyBatchNorm2d(activation="silu", backend="cpp")
    got = lazy(x, residual=r) if as_keyword else lazy(x, r)
    assert type(lazy) is bnfused.BatchNorm2d and lazy.num_features == 3
    torch.testing.assert_close(got, F.silu(F.batch_norm(x, None, None, training=True) + r))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_of_minus_infinity_is_zero_and_of_nan_is_nan(backend, training):
    """relu(z) at z = -inf is 0 (z * 0 would be NaN), and a NaN stays NaN, as in torch."""
    x = torch.randn(4, 2, 3)
    r = torch.zeros_like(x)
    r[0, 0, 0], r[1, 1, 2] = -float("inf"), float("nan")
    rm, rv = torch.zeros(2), torch.ones(2)
    got = bnfused.batch_norm(x, rm, rv, None, None, training, 0.1, 1e-5, "relu", 0.0, backend, residual=r)
    want = F.relu(F.batch_norm(x, rm.clone(), rv.clone(), None, None, training, 0.1, 1e-5) + r)
    assert got[0, 0, 0] == 0 and torch.isnan(got[1, 1, 2])
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["sigmoid", "silu", "hardswish"])
def test_a_nan_reaching_a_smooth_activation_gives_nan_gradients(backend, training, activation):
    """A NaN in the residual makes z NaN there: its gradients are NaN, as torch's, not dropped (for
    hardswish, as torch's vectorised kernel, which every value of this 64-value tensor goes through)."""
    x = torch.randn(4, 2, 8)
    r = torch.randn(4, 2, 8)
    r[0, 0, 3] = float("nan")
    grads = []
    for layer in ("bnfused", "torch"):
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        rm, rv = torch.zeros(2), torch.ones(2)
        if layer == "bnfused":
            y = bnfused.batch_norm(xi, rm, rv, None, None, training, 0.1, 1e-5, activation, 0.0, backend, residual=ri)
        else:
            y = act_codes.apply(
                F.batch_norm(xi, rm, rv, None, None, training, 0.1, 1e-5) + ri, *act_codes.parse(activation, 0)
            )
        y.sum().backward()
        grads.append((xi.grad, ri.grad))
    (dx, dr), (want_dx, want_dr) = grads
    assert torch.isnan(dr[0, 0, 3]) and torch.isnan(want_dr[0, 0, 3])
    torch.testing.assert_close(dr, want_dr, equal_nan=True)
    torch.testing.assert_close(dx, want_dx, equal_nan=True)


@pytest.mark.parametrize("mode", ["kernels", "decompose"])
def test_compiled_layer_with_its_own_input_as_residual(mode):
    """bn(x, x) (what the fusion pass makes of act(bn(x) + x)) compiles in one graph in either compile mode."""
    layer = bnfused.BatchNorm2d(3, activation="silu", backend="reference")
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 3, 5, 5)
    previous = bnfused.torch_ops._compile_mode  # None: the per-device default
    bnfused.set_compile_mode(mode)
    try:
        torch._dynamo.reset()
        got = torch.compile(lambda t: layer(t, t), fullgraph=True, backend="aot_eager")(x)
    finally:
        bnfused.set_compile_mode(previous)
        torch._dynamo.reset()
    torch.testing.assert_close(got, twin(x, x))
    torch.testing.assert_close(layer.running_mean, twin.running_mean)


# ------------------------------------------------ what a graph does not hold: with blocks, modes, hooks


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.block, self.reentrant = _Block(), reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)


class _FrozenStem(_Block):
    def forward(self, x):
        with torch.no_grad():
            h = self.conv(x)
        return F.relu(self.bn(h) + x)


class _GradInside(_Block):
    def forward(self, x):
        with torch.enable_grad():  # changes nothing when traced with grad on, as convert_model is called
            h = self.conv(x)
        return F.relu(self.bn(h) + x)


class _Float32Head(_Block):
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):  # changes nothing when traced outside autocast
            return F.relu(self.bn(self.conv(x.float())) + x)


class _CudaAutocastOff(_Block):
    def forward(self, x):
        with torch.autocast("cuda", enabled=False):  # the same block a GPU user writes for a float32 head
            return F.relu(self.bn(self.conv(x)) + x)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _GradientReversal(_Block):
    def forward(self, x):
        return F.relu(self.bn(_Reverse.apply(self.conv(x))) + x)


def _dropout_for(module, x):  # reads module.training outside the class the pass reads
    return F.dropout(x, 0.5, module.training)


class _HelperReadsMode(_Block):
    def forward(self, x):
        return _dropout_for(self, F.relu(self.bn(self.conv(x)) + x))


class _HelperReadsStemMode(_Block):
    """The mode of a submodule that is in eval while the model trains (a frozen stem)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.stem.eval()

    def forward(self, x):
        return _dropout_for(self.stem, F.relu(self.bn(self.conv(self.stem(x))) + x))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _Checkpointed(False), "changes autograd or autocast"),
        (lambda: _Checkpointed(True), "autograd.Function CheckpointFunction"),
        (_FrozenStem, "changes autograd or autocast"),
        (_GradInside, "changes autograd or autocast"),
        (_Float32Head, "changes autograd or autocast"),
        (_CudaAutocastOff, "changes autograd or autocast"),
        (_GradientReversal, "autograd.Function _Reverse"),
        (_HelperReadsMode, "differs with every module.s train/eval flag flipped"),
        (_HelperReadsStemMode, "differs with every module.s train/eval flag flipped"),
    ],
    ids=[
        "checkpoint",
        "checkpoint-reentrant",
        "no_grad",
        "enable_grad",
        "autocast-off",
        "cuda-autocast-off",
        "autograd-function",
        "helper-reads-mode",
        "helper-reads-a-submodules-mode",
    ],  # fmt: skip
)
@pytest.mark.parametrize("outer", ["none", "no_grad", "inference_mode", "autocast"])
def test_forwards_a_graph_would_change_are_not_traced(make, reason, outer):
    """A torch.fx graph holds the calls, not the with blocks around them (no_grad, autocast, activation
    checkpointing), nor a custom autograd.Function's backward, nor a mode read by code the pass does
    not read: such a model falls back, with a warning, whatever modes convert_model is called in, and
    behaves as the original in both modes, under autocast and in backward."""
    torch.manual_seed(0)
    original = make()
    modes = {m: m.training for m in original.modules()}
    contexts = {"none": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
                "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}  # fmt: skip
    copied = copy.deepcopy(original)
    with pytest.warns(RuntimeWarning, match=reason), contexts[outer]():
        converted = bnfused.convert_model(copied, fuse=True)
    assert {m: m.training for m in original.modules()} == modes
    assert not isinstance(converted, torch.fx.GraphModule)
    x = torch.randn(4, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        want = original(x)
        torch.manual_seed(1)
        got = converted(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)
    original.eval(), converted.eval()
    torch.testing.assert_close(converted(x), original(x))
    original.train(), converted.train()
    for model in (original, converted):
        torch.manual_seed(2)
        model(x.requires_grad_()).sum().backward()
    want_grad = original.block.conv.weight.grad if hasattr(original, "block") else original.conv.weight.grad
    got_grad = converted.block.conv.weight.grad if hasattr(converted, "block") else converted.conv.weight.grad
    assert (got_grad is None) == (want_grad is None)  # the frozen stem stays without a gradient
    if want_grad is not None:  # bnfused's BatchNorm against torch's: the same sums in another order
        torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-4)


def test_layers_with_hooks_are_not_fused():
    """A hook sees what its module takes and gives: a BatchNorm's pre-hook written for bn(x) would drop
    the residual of bn(x, residual), a forward hook would see act(bn(x) + r); an activation's hooks
    would not run once it is folded away. Such layers are converted but not fused."""
    torch.manual_seed(0)
    seen = []
    original = _Block()
    original.bn.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    converted = bnfused.convert_model(copy.deepcopy(original), fuse=True)
    assert not converted.bn.takes_residual
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(converted(x), original(x))
    relu = nn.ReLU()
    relu.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    seq = bnfused.convert_model(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), relu), fuse_relu=True)
    assert seq[1].activation is None and seq[2] is relu
    seq(x)
    assert seen == [x.shape]


def test_a_pre_hook_that_drops_the_residual_is_an_error():
    converted = bnfused.convert_model(_Block(), fuse=True)
    assert converted.bn.takes_residual
    converted.bn.register_forward_pre_hook(lambda m, args: (args[0].float(),))  # written for bn(x)
    with pytest.raises(RuntimeError, match="called without the residual"):
        converted(torch.randn(4, 3, 5, 5))


class _SizeArithmetic(_Block):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x.size(1) * 0.5)


class _MathOfSizes(_Block):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + math.sqrt(x.size(1)) + torch.numel(x))


@pytest.mark.parametrize("cls", [_SizeArithmetic, _MathOfSizes])
def test_arithmetic_on_sizes_is_not_a_residual(cls):
    """``bn(x) + x.size(1) * 0.5`` adds a number: the layer's residual must be a tensor under TorchScript."""
    original = cls()
    converted = bnfused.convert_model(copy.deepcopy(original), fuse=True)
    assert not converted.bn.takes_residual
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(torch.jit.script(converted)(x), original(x))


class _MergesOnEval(_Block):
    """A layer whose train() does more than set flags (LoRA-style: merges an update into its weight)."""

    def train(self, mode=True):
        if not mode:
            with torch.no_grad():
                self.conv.weight.add_(1.0)
        return super().train(mode)


def test_conversion_does_not_call_train():
    """The pass tries the model in the other mode by setting flags, never through train(): such a
    layer's weight is left as it is, and the layer is kept whole (its train() is its own)."""
    original = nn.Sequential(_Block(), _MergesOnEval())
    weight = original[1].conv.weight.detach().clone()
    converted = bnfused.convert_model(original, fuse=True)
    assert converted._modules["0"].bn.takes_residual  # the model was traced
    assert type(converted._modules["1"]) is _MergesOnEval
    assert torch.equal(converted._modules["1"].conv.weight, weight)


def test_another_threads_autograd_function_does_not_stop_the_fusion():
    """The trace wraps the process-wide Function.apply: calls from other threads are not its forward's."""
    import threading

    stop = threading.Event()
    x = torch.randn(8, requires_grad=True)

    def worker():
        while not stop.is_set():
            _Reverse.apply(x).sum().backward()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                converted = bnfused.convert_model(_Block(), fuse=True)
                assert converted.bn.takes_residual
    finally:
        stop.set()
        thread.join()
    assert type(torch.autograd.Function.__dict__["apply"]).__name__ == "classmethod_descriptor"  # put back


class _RootAlias(_Block):
    def __init__(self):
        super().__init__()
        self.alias = self.bn  # the same layer under a second name of the root


def test_copies_and_pickles_keep_a_root_level_alias():
    """fx rebuilds a copied or unpickled GraphModule from named_children(), which lists a shared module once."""
    converted = bnfused.convert_model(_RootAlias(), fuse=True)
    keys = list(converted.state_dict())
    assert "alias.weight" in keys
    for twin in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert twin.alias is twin.bn and twin.bn is not converted.bn
        assert list(twin.state_dict()) == keys
        converted.load_state_dict(twin.state_dict())


class _SaysTraining(_Block):
    """A block for training on CIFAR: the word in a docstring or comment is no read of the mode."""

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)  # trained with SGD, training schedule of 90 epochs


class _ReadsTrainingByName(_Block):
    def forward(self, x):
        flag = "training"  # read by name, as a config-driven model may
        return F.dropout(F.relu(self.bn(self.conv(x)) + x), 0.5, getattr(self, flag))


def test_a_docstring_about_training_is_not_a_read_of_the_mode():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = bnfused.convert_model(_SaysTraining(), fuse=True)
    assert converted.bn.takes_residual
    with pytest.warns(RuntimeWarning, match="depends on self.training"):
        bnfused.convert_model(_ReadsTrainingByName(), fuse=True)
