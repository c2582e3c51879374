"""memory="inplace": the layer keeps only its output for backward and recovers x_hat from it."""

import copy

import pytest
import torch
import torchvision
from helpers import make_input

import bnfused
from benchmarks import models


def _layer(backend, training, activation, x, w, b, rm, rv, memory):
    return bnfused.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation, 0.2, backend, memory=memory)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_equal_the_default_mode(backend, activation, training, channels_last):
    x = make_input((4, 5, 3, 6), torch.float32, channels_last=channels_last)
    w, b = torch.rand(5) - 1.5, torch.randn(5)  # negative weights: x_hat = (z - b) / w must keep the sign
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    results = []
    for memory in ("default", "inplace"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        running = (rm.clone(), rv.clone())
        y = _layer(backend, training, activation, leaves[0], leaves[1], leaves[2], *running, memory)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        results.append((y, *running, *(t.grad for t in leaves)))
    for name, got, want in zip(("y", "running_mean", "running_var", "dx", "dweight", "dbias"), *results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert results[1][3].stride() == x.stride()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
def test_residual_gradients_equal_the_default_mode(backend, activation):
    x = make_input((4, 5, 3, 6), torch.float32)
    r, w, b = torch.randn_like(x), torch.rand(5) + 0.5, torch.randn(5)
    results = []
    for memory in ("default", "inplace"):
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
        y = bnfused.batch_norm(
            leaves[0], None, None, leaves[2], leaves[3], True, 0.1, 1e-5, activation, 0.2, backend,
            residual=leaves[1], memory=memory,
        )  # fmt: skip
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        results.append((y, *(t.grad for t in leaves)))
    for name, got, want in zip(("y", "dx", "dresidual", "dweight", "dbias"), *results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(backend, training):
    x = (torch.randn(3, 2, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def layer(x, w, b):
        return _layer(backend, training, "leaky_relu", x, w, b, rm.clone(), rv.clone(), "inplace")

    assert torch.autograd.gradcheck(layer, (x, w, b))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("residual", [False, True])
def test_eval_double_backward_is_exact(backend, residual):
    """Eval mode's gradients are recorded under create_graph=True: invstd is a constant there, and
    x_hat depends on x only through y. gradgradcheck differentiates them in every input."""
    x = (torch.randn(3, 2, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def layer(x, w, b, *r):
        return bnfused.batch_norm(
            x, rm, rv, w, b, False, 0.1, 1e-5, "leaky_relu", 0.2, backend, residual=r[0] if r else None,
            memory="inplace",
        )  # fmt: skip

    assert torch.autograd.gradgradcheck(layer, (x, w, b, *([r] if residual else [])))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("upstream_requires_grad", [False, True])
def test_training_double_backward_raises(backend, upstream_requires_grad):
    """In training the statistics depend on x, which is not kept: differentiating a gradient taken
    with create_graph=True raises, whether or not dy requires grad (with a constant dy nothing else
    in the graph would have noticed, and the second derivative would lack the statistics' terms)."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    w = (torch.rand(3) + 0.5).requires_grad_()
    y = bnfused.batch_norm(x, None, None, w, None, True, backend=backend, memory="inplace")
    dy = torch.randn(4, 3, 5, requires_grad=upstream_requires_grad)
    dx, dw = torch.autograd.grad(y, (x, w), dy, create_graph=True)
    assert dx.requires_grad and dw.requires_grad
    with pytest.raises(RuntimeError, match="memory='inplace' has no second derivative in training mode"):
        dx.pow(2).sum().backward()
    # batched gradients (jacobian(vectorize=True)) cannot carry the refusal: raised at once
    layer = lambda x: bnfused.batch_norm(x, None, None, w, None, True, backend=backend, memory="inplace")  # noqa: E731
    with pytest.raises(RuntimeError, match="memory='inplace' has no second derivative in training mode"):
        torch.autograd.functional.jacobian(layer, torch.randn(4, 3, 5), create_graph=True, vectorize=True)


def test_bfloat16_input_against_float32():
    x = make_input((8, 4, 5, 5), torch.bfloat16)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    grads = []
    for dtype, memory in ((torch.bfloat16, "inplace"), (torch.float32, "default")):
        leaf = x.to(dtype).detach().requires_grad_()
        y = _layer("cpp", True, "leaky_relu", leaf, w, b, None, None, memory)
        y.float().square().sum().backward()
        grads.append(leaf.grad.float())
    torch.testing.assert_close(grads[0], grads[1], atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    ("activation", "slope", "residual"),
    [("relu", 0.0, None), ("leaky_relu", 0.0, None), ("hardswish", 0.0, None), ("silu", 0.0, None),
     ("sigmoid", 0.0, None), ("relu6", 0.0, None), (None, 0.0, torch.ones(1, 3))],
)  # fmt: skip
def test_what_cannot_be_inverted_raises(activation, slope, residual):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="memory='inplace'"):
        bnfused.batch_norm(
            x, None, None, training=True, activation=activation, negative_slope=slope, residual=residual,
            memory="inplace",
        )  # fmt: skip
    if residual is None:
        with pytest.raises(ValueError, match="memory='inplace'"):
            bnfused.BatchNorm1d(3, activation=activation, negative_slope=slope, memory="inplace")
    with pytest.raises(ValueError, match="memory must be one of default, inplace"):
        bnfused.BatchNorm1d(3, memory="small")


def test_weight_near_zero_raises_at_backward():
    x = torch.randn(4, 2, requires_grad=True)
    w = torch.tensor([1.0, 0.0], requires_grad=True)
    y = bnfused.batch_norm(x, None, None, w, torch.zeros(2), True, memory="inplace", backend="reference")
    with pytest.raises(RuntimeError, match=r"\|weight\| > eps"):
        y.sum().backward()


@pytest.mark.parametrize("zero_weight", [False, True])
def test_compiles_in_kernels_mode_with_its_weight_check_in_the_graph(zero_weight):
    """Under torch.compile(fullgraph=True) with the kernels as opaque ops, the backward's |weight| > eps
    check cannot branch on the weight's values while tracing: it runs inside the graph instead (where
    the compiler may place it in the step's forward, since it reads the weight alone)."""
    torch.manual_seed(0)
    layer = bnfused.BatchNorm2d(3, memory="inplace", backend="reference")
    if zero_weight:
        with torch.no_grad():
            layer.weight[1] = 0.0
    eager = copy.deepcopy(layer)
    x = torch.randn(2, 3, 4, 4)
    bnfused.set_compile_mode("kernels")
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True)
        if zero_weight:
            with pytest.raises(RuntimeError, match=r"\|weight\| > eps"):
                compiled(x).square().sum().backward()
            return
        compiled(x).square().sum().backward()
    finally:
        bnfused.set_compile_mode(None)
        torch._dynamo.reset()
    eager(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, eager.bias.grad, rtol=1e-5, atol=1e-6)


def test_saves_the_output_not_the_input_and_follows_autograd_rules():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    layer = bnfused.BatchNorm2d(3, activation="leaky_relu", memory="inplace", backend="cpp")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x * 1.0)  # the layer's input is a fresh tensor nobody else keeps
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert y.untyped_storage().data_ptr() in storages
    assert sum(t.numel() for t in saved if t.dim() == 4) == y.numel()  # one activation-sized tensor: y
    y = layer(x * 1.0)
    y.mul_(2)  # modifying the saved output in place: autograd's version check, as for torch's layers
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _leaky_resnet50():
    return models.with_leaky_relu(torchvision.models.resnet50(num_classes=10))


def _saved_bytes(model, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(n for p, n in storages.items() if p not in params), out


@pytest.mark.slow
def test_resnet50_with_leaky_relu_keeps_less_and_trains_the_same():
    torch.manual_seed(0)
    original = _leaky_resnet50()
    compact = bnfused.convert_model(copy.deepcopy(original), fuse=True, backend="cpp", memory="inplace")
    layers = [m for m in compact.modules() if isinstance(m, bnfused.BatchNorm2d)]
    assert sum(m.memory == "inplace" for m in layers) == 53  # BN -> (add) -> leaky_relu and the shortcut BNs
    x = torch.randn(2, 3, 64, 64)
    kept = {name: _saved_bytes(model, x)[0] for name, model in (("torch", original), ("inplace", compact))}
    assert kept["inplace"] <= 0.7 * kept["torch"], kept  # the goal: at least 30% less
    # The same training step, in float64 (float32 rounding is amplified through 53 layers at this size).
    for model in (original, compact):
        model.double()
        model(x.double()).square().mean().backward()
    for (name, p_o), p_c in zip(original.named_parameters(), compact.parameters()):
        scale = max(p_o.grad.abs().max().item(), 1.0)
        assert (p_c.grad - p_o.grad).abs().max().item() <= 1e-9 * scale, name
