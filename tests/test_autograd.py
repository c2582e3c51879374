"""The explicit backward: gradcheck in float64 with a random upstream gradient (with bias=0 and a plain
sum() the input gradient of BN is identically zero and would pass trivially)."""

import pytest
import torch

from bnfused.functional import batch_norm


def _gradcheck(backend, shape, training, activation, affine, channels_last=False):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64).requires_grad_() if affine else None
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    upstream = torch.randn(shape, dtype=torch.float64)

    def f(x, w, b):
        y = batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation, 0.1, backend)
        return (y * upstream).sum()

    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(lambda *a: f(*a, *([None, None] if not affine else [])), inputs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradcheck_reference(training, activation, affine):
    _gradcheck("reference", (5, 3, 4), training, activation, affine)


def test_gradcheck_channels_last_reference():
    _gradcheck("reference", (3, 4, 3, 2), True, "relu", True, channels_last=True)


def test_eval_backward_treats_running_stats_as_constants():
    """Eval-mode dx = dy * w / sqrt(running_var + eps): no batch-statistics terms (a known bug elsewhere)."""
    x = torch.randn(6, 3, 4, requires_grad=True)
    w = torch.rand(3) + 0.5
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    g = torch.randn(6, 3, 4)
    batch_norm(x, rm, rv, w, None, training=False).backward(g)
    torch.testing.assert_close(x.grad, g * (w / torch.sqrt(rv + 1e-5)).view(1, 3, 1))


def test_only_requested_gradients_are_computed():
    x = torch.randn(6, 3, 4)
    w = torch.rand(3, requires_grad=True)
    b = torch.randn(3)  # no grad wanted
    batch_norm(x, None, None, w, b, training=True).pow(2).sum().backward()
    assert w.grad is not None and b.grad is None and x.grad is None


def test_double_backward_is_differentiable():
    """create_graph=True records a differentiable backward (tests/test_transforms.py checks the values)."""
    x = torch.randn(6, 3, requires_grad=True)
    y = batch_norm(x, None, None, training=True)
    (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
    assert gx.requires_grad


def test_grad_of_non_contiguous_upstream():
    """dy in another layout than x, or with stride 0 (what sum() sends), must still be handled."""
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    g = torch.randn(4, 3, 5, 5)  # contiguous NCHW while x is channels_last
    (gx,) = torch.autograd.grad(batch_norm(x, None, None, w, b, training=True), x, g)
    x2 = x.detach().contiguous().requires_grad_()
    (gx2,) = torch.autograd.grad(torch.nn.functional.batch_norm(x2, None, None, w, b, True), x2, g)
    torch.testing.assert_close(gx, gx2)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    # d(sum(BN(x)))/dx is 0 in training mode: every value's shift is cancelled by the mean's
    batch_norm(x, None, None, w, b, training=True).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x), atol=1e-5, rtol=0)


def _torch_layer(x, rm, rv, w, b, training, activation, residual):
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training)
    y = y if residual is None else y + residual
    return {None: lambda t: t, "relu": torch.relu, "silu": torch.nn.functional.silu}[activation](y)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_create_graph_gradients_require_grad_as_torchs(backend, training, activation):
    """Under create_graph=True each gradient requires grad exactly where torch's does, including the
    ones that are constants of the graph (eval dx without a trainable weight, the sums when dy is a
    constant): torch records them, and code that differentiates them again must not fail."""
    import itertools

    for weight_grad, x_grad, dy_grad, with_residual in itertools.product(
        ["trained", "frozen", "absent"], [True, False], [True, False], [True, False]
    ):
        seen = {}
        for name, layer in (("torch", _torch_layer), ("bnfused", None)):
            torch.manual_seed(0)
            x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=x_grad)
            w = b = None
            if weight_grad != "absent":
                w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(weight_grad == "trained")
                b = torch.randn(3, dtype=torch.float64).requires_grad_(weight_grad == "trained")
            r = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True) if with_residual else None
            rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
            if layer is None:
                y = batch_norm(x, rm, rv, w, b, training, activation=activation, backend=backend, residual=r)
            else:
                y = layer(x, rm, rv, w, b, training, activation, r)
            leaves = [t for t in (x, w, b, r) if t is not None and t.requires_grad]
            if not leaves:
                continue
            dy = torch.randn(y.shape, dtype=torch.float64, requires_grad=dy_grad)
            grads = torch.autograd.grad(y, leaves, dy, create_graph=True)
            seen[name] = [g.requires_grad for g in grads]
        case = (weight_grad, x_grad, dy_grad, with_residual)
        assert seen.get("bnfused") == seen.get("torch"), case


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradient_penalty_through_a_frozen_eval_layer(backend):
    """A gradient penalty on the input of a frozen model in eval mode whose last layer is BatchNorm:
    dx is a constant of the graph; torch lets the penalty backpropagate (no gradient reaches x),
    and so must bnfused."""
    import bnfused

    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    dy = torch.randn(6, 3, 4, 4)
    got = []
    for layer in (torch.nn.BatchNorm2d(3, affine=False), bnfused.BatchNorm2d(3, affine=False, backend=backend)):
        layer.running_var.fill_(2.0)
        layer.eval()
        (dx,) = torch.autograd.grad(layer(x), x, dy, create_graph=True)
        dx.pow(2).sum().backward()
        got.append((dx.detach(), x.grad))
        x.grad = None
    torch.testing.assert_close(got[1][0], got[0][0])
    assert got[0][1] is None and got[1][1] is None


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vectorized_jacobian_keeps_its_graph(backend, training):
    """jacobian(create_graph=True, vectorize=True) backpropagates batched gradients, which report
    requires_grad=False even where autograd records them: their graph must be kept, so that a
    function of the Jacobian differentiates as torch's does."""
    from torch.autograd.functional import jacobian

    torch.manual_seed(0)
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    weight = torch.rand(2, dtype=torch.float64) + 0.5
    results = []
    for layer in ("torch", "bnfused"):
        w = weight.clone().requires_grad_()
        if layer == "torch":

            def f(x, w=w):
                return torch.nn.functional.silu(torch.nn.functional.batch_norm(x, rm, rv, w, None, training))
        else:

            def f(x, w=w):
                return batch_norm(x, rm, rv, w, None, training, activation="silu", backend=backend)

        jac = jacobian(f, x, create_graph=True, vectorize=True)
        assert jac.requires_grad
        results.append(torch.autograd.grad(jac.pow(2).sum(), w))
    torch.testing.assert_close(results[1], results[0])
