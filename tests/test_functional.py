"""bnfused.functional.batch_norm: the argument checks and edge cases, against torch's own behaviour."""

import functools
import random

import pytest
import torch
import torch.nn.functional as F

import bnfused
from bnfused.functional import batch_norm


def _stats(c=3, dtype=torch.float32):
    return torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)


@pytest.mark.parametrize("training", [True, False])
def test_same_result_as_torch_functional(training):
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm1, rv1 = torch.randn(3), torch.rand(3) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = F.batch_norm(x, rm1, rv1, w, b, training, 0.3, 1e-3)
    y2 = batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-3)
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(rm2, rm1)
    torch.testing.assert_close(rv2, rv1)


def test_training_without_running_stats():
    x = torch.randn(5, 4)
    torch.testing.assert_close(batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True))


def test_activation_is_applied_after_affine():
    x = torch.randn(8, 3, 4)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    plain = batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(batch_norm(x, None, None, w, b, True, activation="relu"), F.relu(plain))
    torch.testing.assert_close(
        batch_norm(x, None, None, w, b, True, activation="leaky_relu", negative_slope=0.3), F.leaky_relu(plain, 0.3)
    )


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: batch_norm(torch.randn(1, 3), *_stats(), training=True), ValueError, "more than 1 value per channel"),
        (lambda: batch_norm(torch.randn(1, 3, 1, 1), None, None, training=True), ValueError, "more than 1 value"),
        (lambda: batch_norm(torch.randn(3), *_stats(), training=True), ValueError, "at least 2D"),
        (
            lambda: batch_norm(torch.randn(4, 3), torch.zeros(4), torch.ones(3), training=True),
            RuntimeError,
            "running_mean should contain 3 elements not 4",
        ),
        (
            lambda: batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(2), training=True),
            RuntimeError,
            "running_var should contain 3 elements not 2",
        ),
        (
            lambda: batch_norm(torch.randn(4, 3), *_stats(), torch.ones(5), training=True),
            RuntimeError,
            "weight should contain 3 elements not 5",
        ),
        (
            lambda: batch_norm(torch.randn(4, 3), *_stats(), None, torch.ones(5), training=True),
            RuntimeError,
            "bias should contain 3 elements not 5",
        ),
        (
            lambda: batch_norm(torch.ones(4, 3, dtype=torch.long), *_stats(), training=True),
            NotImplementedError,
            "not implemented for 'Long'",
        ),
        (
            lambda: batch_norm(torch.ones(4, 3, dtype=torch.int32), *_stats()),
            NotImplementedError,
            "not implemented for 'Int'",
        ),
        (
            lambda: batch_norm(torch.randn(4, 3), None, None, training=False),
            RuntimeError,
            "running_mean must be defined in evaluation mode",
        ),
        (
            lambda: batch_norm(torch.randn(4, 3), torch.zeros(3, device="meta"), torch.ones(3), training=True),
            RuntimeError,
            "same device",
        ),
        (
            lambda: batch_norm(torch.randn(4, 3), *_stats(dtype=torch.float16), training=True),
            RuntimeError,
            "mixed dtype",
        ),
        (lambda: batch_norm(torch.randn(4, 3).double(), *_stats(), training=True), RuntimeError, "mixed dtype"),
        (
            lambda: batch_norm(torch.randn(4, 3).half(), *_stats(dtype=torch.bfloat16), training=True),
            RuntimeError,
            "mixed dtype",
        ),
        (
            lambda: batch_norm(torch.randn(4, 3), None, None, training=True, activation="gelu"),
            ValueError,
            "activation must be",
        ),
        (
            lambda: batch_norm(torch.randn(4, 3), None, None, True, activation="leaky_relu", negative_slope=-0.1),
            ValueError,
            "negative_slope >= 0",
        ),
        (
            lambda: batch_norm(torch.randn(4, 3), None, None, training=True, backend="nope"),
            ValueError,
            "unknown backend",
        ),
    ],  # fmt: skip
)
def test_bad_input_raises_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_mixed_precision_half_input_fp32_params():
    x = torch.randn(6, 4, 3).half()
    rm, rv = _stats(4)
    y = batch_norm(x, rm, rv, torch.ones(4), torch.zeros(4), training=True)
    assert y.dtype == torch.float16
    assert rm.dtype == torch.float32 and rm.abs().sum() > 0  # updated, kept in fp32


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (0, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_behaves_like_torch(shape, training):
    x1 = torch.randn(shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    w1, b1 = torch.rand(3, requires_grad=True), torch.rand(3, requires_grad=True)
    w2, b2 = w1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    rm1, rv1 = torch.randn(3), torch.rand(3) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = F.batch_norm(x1, rm1, rv1, w1, b1, training)
    y2 = batch_norm(x2, rm2, rv2, w2, b2, training)
    assert y2.shape == y1.shape
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(rm2, rm1)
    torch.testing.assert_close(rv2, rv1)
    torch.testing.assert_close(w2.grad, w1.grad)
    torch.testing.assert_close(b2.grad, b1.grad)
    assert x2.grad.shape == x1.grad.shape


def test_non_contiguous_inputs_give_correct_results():
    base = torch.randn(6, 8, 10, 12)
    views = [
        base[:, ::2],  # channel slice: strided, not dense
        base[..., ::3],  # spatial slice
        base.permute(0, 1, 3, 2),  # swapped spatial dims
        base.transpose(0, 1)[:4].transpose(0, 1),  # batch and channel strides swapped
    ]
    for x in views:
        c = x.shape[1]
        torch.testing.assert_close(
            batch_norm(x, None, None, torch.linspace(0.5, 2, c), torch.linspace(-1, 1, c), training=True),
            F.batch_norm(
                x.contiguous(), None, None, torch.linspace(0.5, 2, c), torch.linspace(-1, 1, c), training=True
            ),
        )


def test_module_and_functional_share_one_public_entry():
    assert bnfused.batch_norm is batch_norm


STRIDED_INPUTS = {
    "channels_last-channel-slice": lambda: torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)[:, :5],
    "channels_last-spatial-slice": lambda: torch.randn(4, 8, 6, 5).to(memory_format=torch.channels_last)[:, :, :5],
    "channels_last_3d-slice": lambda: torch.randn(2, 8, 3, 4, 5).to(memory_format=torch.channels_last_3d)[:, :5],
    "contiguous-channel-slice": lambda: torch.randn(4, 8, 5, 5)[:, :5],
    "NLC-transposed": lambda: torch.randn(4, 7, 6).transpose(1, 2),
    "spatial-dims-swapped": lambda: torch.randn(4, 5, 6, 7).permute(0, 1, 3, 2),
}


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make", STRIDED_INPUTS.values(), ids=STRIDED_INPUTS.keys())
def test_output_layout_of_strided_inputs_is_torchs(make, training, backend):
    # torch returns its input's suggested memory format: channels_last for a slice of a channels_last
    # tensor (the next convolution then runs channels_last), contiguous for the other layouts.
    torch.manual_seed(0)
    x = make()
    C = x.shape[1]
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    want = F.batch_norm(x, torch.zeros(C), torch.ones(C), w, b, training)
    got = batch_norm(x, torch.zeros(C), torch.ones(C), w, b, training, backend=backend)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want)


def _random_layouts(count: int, seed: int):
    """Small inputs in random layouts: permuted dims, channels_last (3d), step slices, size-1 dims."""
    rng = random.Random(seed)
    made = 0
    while made < count:
        rank = rng.choice([2, 3, 4, 5])
        shape = [rng.choice([1, 1, 2, 3, 4]) for _ in range(rank)]
        perm = list(range(rank))
        rng.shuffle(perm)
        x = torch.randn([shape[p] for p in perm]).permute([perm.index(d) for d in range(rank)])
        if rank in (4, 5) and rng.random() < 0.4:
            x = x.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
        if rank >= 3 and x.shape[2] > 1 and rng.random() < 0.3:
            x = x[:, :, ::2]
        if x.numel() // x.shape[1] < 2:
            continue
        made += 1
        yield x


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_output_strides_are_torchs_for_random_layouts(backend):
    # torch's output is contiguous when the input is, else channels_last (3d) when the input is, with
    # that format's standard strides (size-1 dims included), else the suggested format's: a following
    # convolution picks its layout from them.
    for x in _random_layouts(40 if backend == "triton" else 150, seed=7):
        C = x.shape[1]
        for training in (True, False):
            want = F.batch_norm(x, torch.zeros(C), torch.ones(C), None, None, training)
            got = batch_norm(x, torch.zeros(C), torch.ones(C), None, None, training, backend=backend)
            assert got.stride() == want.stride(), (tuple(x.shape), x.stride(), training)
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_input_grad_strides_are_torchs_for_random_layouts(backend):
    # x.grad as torch's BatchNorm leaves it (the format's standard strides on size-1 dims too), with
    # no as_strided node in the graph: its backward scatters into a zeroed copy of the storage.
    # Values are checked against torch on a contiguous copy: torch's CPU backward of a channels_last
    # input with an unusual size-1 stride and a contiguous dy is wrong (torch 2.14: (1, 3, 3, 1) with
    # strides (1, 1, 3, 3) is off by 0.4).
    for x in _random_layouts(20 if backend == "triton" else 100, seed=5):
        C = x.shape[1]
        weight, bias = torch.randn(C), torch.randn(C)
        g = torch.randn(x.shape)
        grads = []
        for bn in (F.batch_norm, functools.partial(batch_norm, backend=backend)):
            leaf = x.detach().requires_grad_()
            y = bn(leaf, None, None, weight, bias, True)
            nodes, names = [y.grad_fn], set()
            while nodes:
                node = nodes.pop()
                names.add(type(node).__name__)
                nodes += [n for n, _ in node.next_functions if n is not None]
            assert "AsStridedBackward0" not in names, (tuple(x.shape), x.stride())
            y.backward(g)
            grads.append(leaf.grad)
        formats = [torch.contiguous_format] + {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(x.dim(), [])
        # Where x is dense in exactly one format. Copied inputs' grads take torch's internal choice
        # of size-1 strides; an input dense in both formats (C == 1, say) gets torch's contiguous
        # output but a channels_last dx from torch; bnfused gives dx its output's layout.
        if sum(x.is_contiguous(memory_format=f) for f in formats) == 1:
            assert grads[1].stride() == grads[0].stride(), (tuple(x.shape), x.stride())
        leaf = x.detach().contiguous().requires_grad_()
        F.batch_norm(leaf, None, None, weight, bias, True).backward(g)
        torch.testing.assert_close(grads[1], leaf.grad)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize(
    "shape, strides",
    [((1, 1), (5, 3)), ((1, 1, 1), (0, 7, 1)), ((1, 1, 1, 1), (0, 7, 1, 1000)), ((1, 1, 1, 1, 1), (9, 1, 4, 2, 8))],
    ids=str,
)
def test_input_grad_strides_of_a_single_value_are_torchs(shape, strides, backend):
    # Every dim of size 1 (eval: training needs two values a channel): views keep the odd strides.
    x = torch.randn(1).as_strided(shape, strides)
    grads = []
    for bn in (F.batch_norm, functools.partial(batch_norm, backend=backend)):
        leaf = x.detach().requires_grad_()
        y = bn(leaf, torch.zeros(1), torch.ones(1), torch.full((1,), 2.0), None, False)
        assert "AsStrided" not in type(y.grad_fn.next_functions[0][0]).__name__
        y.backward(torch.ones_like(y))
        grads.append(leaf.grad)
    assert grads[1].stride() == grads[0].stride()
    torch.testing.assert_close(grads[1], grads[0])


def test_suggested_format_is_torchs():
    # bnfused.layout keeps its own copy of torch's (private) suggested-format rule.
    from torch._prims_common import suggest_memory_format

    from bnfused import layout

    for x in [make() for make in STRIDED_INPUTS.values()] + list(_random_layouts(400, seed=11)):
        assert layout.suggested_format(x) == suggest_memory_format(x), (tuple(x.shape), x.stride())


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("create_graph", [False, True], ids=["", "create_graph"])
def test_activation_gradient_at_nan_and_inf_is_torchs(create_graph, activation, training, backend):
    # A NaN or infinite residual makes z NaN or infinite at its elements: torch's relu passes dy there
    # ("zero where z <= 0"), leaky_relu scales it ("dy where z > 0"), silu gives NaN. The residual's
    # gradient (dy * act'(z)) shows it; the statistics stay finite in training too (the residual is
    # added after the normalisation). Not relu6 nor hardswish: torch's own CPU kernels give 0 and NaN
    # at NaN on their vector path and dy on their scalar tail.
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    residual = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    residual[0, :, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    C = x.shape[1]
    w, b = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    dy = torch.randn_like(x)
    grads = []
    for ours in (False, True):
        xs, rs = x.clone().requires_grad_(), residual.clone().requires_grad_()
        rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
        if ours:
            y = batch_norm(
                xs, rm, rv, w, b, training, activation=activation, negative_slope=0.2, residual=rs, backend=backend
            )
        else:
            z = F.batch_norm(xs, rm, rv, w, b, training) + rs
            y = getattr(F, activation)(z, 0.2) if activation == "leaky_relu" else getattr(F, activation)(z)
        grads.append(torch.autograd.grad(y, (rs,), dy, create_graph=create_graph)[0])
    torch.testing.assert_close(grads[1].detach(), grads[0].detach(), equal_nan=True)
