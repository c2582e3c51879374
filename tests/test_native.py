"""The C++/CUDA backend ("cpp" on CPU tensors, "cuda" on CUDA tensors): build, parity, ops, gradients.

The first test that touches the backend builds the extension (minutes when ~/.cache/torch_extensions
is cold); every later one reuses the process-wide library.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import assert_matches_torch, make_input

import bnfused
from bnfused import activation as act_codes
from bnfused import backends
from bnfused.backends import native
from bnfused.backends import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ACTS = [(act_codes.NONE, 0.0), (act_codes.RELU, 0.0), (act_codes.LEAKY_RELU, 0.2)]


@pytest.fixture(scope="module", autouse=True)
def built():
    lib = native.library()
    assert lib.error is None, f"the C++ extension did not build: {lib.error}"
    return lib


def backend_for(device: str) -> str:
    return "cpp" if device == "cpu" else "cuda"


# --------------------------------------------------------------------------- parity with torch.nn


@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((8, 5), False),  # (N, C): rows of C values
        ((4, 7, 9), False),  # (N, C, L)
        ((4, 7, 9), True),  # (N, L, C) data viewed as (N, C, L)
        ((3, 6, 5, 7), False),  # NCHW
        ((3, 6, 5, 7), True),  # channels_last
        ((2, 3, 4, 5, 3), False),  # NCDHW
        ((2, 3, 4, 5, 3), True),  # channels_last_3d
        ((7, 13, 11, 3), False),  # primes everywhere
        ((5, 37, 1, 1), False),  # 1x1 spatial: C not a multiple of any vector width
        ((2, 19, 41, 43), False),  # a plane longer than one vector, odd tail
        ((2, 70, 3, 5), True),  # channels_last, C over a vector plus a tail
    ],
)
def test_matches_torch_layouts(shape, channels_last):
    assert_matches_torch("cpp", shape, channels_last=channels_last, steps=2)


@pytest.mark.parametrize(
    "dtype, param_dtype, channels_last",
    [
        (torch.float64, None, False),
        (torch.float64, None, True),
        (torch.float16, None, False),  # half input, float32 parameters (mixed)
        (torch.float16, None, True),
        (torch.bfloat16, None, False),
        (torch.bfloat16, None, True),
        (torch.float16, torch.float16, False),  # half parameters and running stats too
        (torch.bfloat16, torch.bfloat16, True),
    ],
)
def test_matches_torch_dtypes(dtype, param_dtype, channels_last):
    assert_matches_torch("cpp", (4, 11, 6, 5), dtype=dtype, param_dtype=param_dtype, channels_last=channels_last)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(training=False),
        dict(training=False, activation="relu"),
        dict(affine=False),
        dict(affine=False, training=False, activation="leaky_relu", negative_slope=0.1),
        dict(activation="relu"),
        dict(activation="leaky_relu", negative_slope=0.2, channels_last=True),
        dict(momentum=None, steps=3),  # cumulative moving average
        dict(momentum=0.5, steps=3),
        dict(track_running_stats=False),
        dict(track_running_stats=False, training=False),  # eval without running stats: batch stats
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_matches_torch_modes(kwargs):
    assert_matches_torch("cpp", (6, 9, 7, 5), **kwargs)


def test_lenet_and_mlp_shapes():
    for shape in ((64, 6, 24, 24), (64, 16, 8, 8), (64, 512), (64, 120)):
        assert_matches_torch("cpp", shape, steps=1)


# --------------------------------------------------------------------------- contract functions vs reference


def _layouts(device):
    """(name, x) pairs covering the three walks: planes, rows, and strided (gathered) planes."""
    base = torch.randn(3, 10, 6, 7, device=device, dtype=torch.float64) * 2 + 3
    return [
        ("nchw", base),
        ("channels_last", base.contiguous(memory_format=torch.channels_last)),
        ("nlc", (torch.randn(4, 9, 10, device=device, dtype=torch.float64) - 1).transpose(1, 2)),
        # Dense but neither spatial nor channel stride 1: (N, C, H, W) strides (1, 3, 90, 18).
        ("strided", (torch.randn(4, 5, 6, 3, device=device, dtype=torch.float64) + 1).permute(3, 2, 0, 1)),
    ]


def _params(x, affine=True):
    c = x.shape[1]
    if not affine:
        return None, None
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(c, generator=g, dtype=x.dtype) + 0.5).to(x.device)
    b = torch.randn(c, generator=g, dtype=x.dtype).to(x.device)
    return w, b


def _close(actual, expected, **kw):
    if expected is None:
        assert actual is None
        return
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act, slope", ACTS)
def test_forward_functions_match_reference(device, act, slope):
    for name, x in _layouts(device):
        w, b = _params(x, affine=act != act_codes.LEAKY_RELU)
        rm = torch.linspace(-1, 1, x.shape[1], dtype=x.dtype, device=device)
        rv = torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype, device=device)
        got_rm, got_rv = rm.clone(), rv.clone()
        y, mean, invstd = native.forward_train(x, w, b, got_rm, got_rv, 0.3, 1e-5, act, slope)
        y_ref, mean_ref, invstd_ref = ref.forward_train(x, w, b, rm, rv, 0.3, 1e-5, act, slope)
        for got, want in ((y, y_ref), (mean, mean_ref), (invstd, invstd_ref), (got_rm, rm), (got_rv, rv)):
            _close(got, want, msg=lambda m, n=name: f"{n}: {m}")
        assert y.stride() == x.stride(), f"{name}: output lost the input's layout"
        _close(
            native.forward_eval(x, w, b, rm, rv, 1e-3, act, slope), ref.forward_eval(x, w, b, rm, rv, 1e-3, act, slope)
        )
        for got, want in zip(native.batch_stats(x), ref.batch_stats(x)):
            _close(got, want)
        _close(
            native.normalize(x, w, b, mean_ref, invstd_ref, act, slope),
            ref.normalize(x, w, b, mean_ref, invstd_ref, act, slope),
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act, slope", ACTS)
def test_backward_functions_match_reference(device, act, slope):
    for name, x in _layouts(device):
        w, _ = _params(x)
        y, mean, invstd = ref.forward_train(x, w, None, None, None, 0.1, 1e-5, act, slope)
        dy = torch.randn_like(x)
        y_arg = y if act else None
        for training in (True, False):
            for needs in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
                got = native.backward(dy, x, y_arg, w, mean, invstd, act, slope, training, *needs)
                want = ref.backward(dy, x, y_arg, w, mean, invstd, act, slope, training, *needs)
                for g, r in zip(got, want):
                    _close(g, r, msg=lambda m, n=name, t=training, k=needs: f"{n} training={t} needs={k}: {m}")
                if got[0] is not None:
                    assert got[0].stride() == x.stride()
        sums = native.backward_reduce(dy, x, y_arg, mean, invstd, act, slope)
        for g, r in zip(sums, ref.backward_reduce(dy, x, y_arg, mean, invstd, act, slope)):
            _close(g, r)
        count = x.numel() // x.shape[1]
        _close(
            native.backward_elemt(dy, x, y_arg, w, mean, invstd, *sums, count, act, slope),
            ref.backward_elemt(dy, x, y_arg, w, mean, invstd, *sums, count, act, slope),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_dy_with_other_strides_is_accepted(device):
    x = torch.randn(3, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    _, mean, invstd = ref.forward_train(x, None, None, None, None, 0.1, 1e-5, 0, 0.0)
    dy = torch.randn(3, 4, 5, 6, device=device)  # NCHW while x is channels_last
    got = native.backward(dy, x, None, None, mean, invstd, 0, 0.0, True, True, True, True)
    want = ref.backward(dy, x, None, None, mean, invstd, 0, 0.0, True, True, True, True)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_variance_is_stable_at_large_mean(device, channels_last):
    """|mean| = 1e4 with std 1: E[x^2] - E[x]^2 in float32 would lose every digit of the variance."""
    x = make_input((16, 3, 32, 32), torch.float32, channels_last, offset=1e4, scale=1.0).to(device)
    mean, var = native.batch_stats(x)
    var_exact, mean_exact = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean_exact, rtol=3e-7, atol=0)  # a few float32 ulps
    torch.testing.assert_close(var.double(), var_exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "shape",
    [
        (8, 6, 33, 17),
        # One channel: with one thread a task per channel reduces and normalises it in one go; with two,
        # the tiles of the channel are spread over both threads. Both schedules must give the same bits.
        (8, 1, 33, 17),
    ],
)
def test_results_do_not_depend_on_thread_count(shape):
    x = make_input(shape, torch.float32)
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, mean, invstd = native.forward_train(x, None, None, None, None, 0.1, 1e-5, 0, 0.0)
            dx, dw, db, dresidual = native.backward(dy, x, None, None, mean, invstd, 0, 0.0, True, True, True, True)
            assert dresidual is None  # not asked for
            results.append((y, mean, invstd, dx, dw, db))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b), "results changed with the number of threads"


def test_channels_too_large_for_cache_match_reference():
    """1.3 MB per channel: tiles of one channel's planes are spread over threads, planes split in blocks."""
    x = make_input((2, 2, 400, 400), torch.float32)
    w, b = torch.rand(2) + 0.5, torch.randn(2)
    y, mean, invstd = native.forward_train(x, w, b, None, None, 0.1, 1e-5, 1, 0.0)
    y_ref, mean_ref, invstd_ref = ref.forward_train(x, w, b, None, None, 0.1, 1e-5, 1, 0.0)
    for got, want in ((y, y_ref), (mean, mean_ref), (invstd, invstd_ref)):
        torch.testing.assert_close(got, want)
    dy = torch.randn_like(x)
    got = native.backward(dy, x, y, w, mean, invstd, 1, 0.0, True, True, True, True)
    want = ref.backward(dy, x, y, w, mean, invstd, 1, 0.0, True, True, True, True)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "shape, dtype, channels_last",
    [
        ((3, 5, 601, 467), torch.float32, False),  # odd planes: aligned (streamed) and unaligned chunks mix
        ((4, 32, 241, 137), torch.float32, True),  # rows of 32 channels: whole cache lines
        ((2, 3, 1201, 1171), torch.bfloat16, False),
    ],
)
def test_outputs_large_enough_to_stream_are_exact(shape, dtype, channels_last):
    """Outputs of 16 MiB and more are written with streaming stores wherever a whole vector is aligned,
    and with ordinary stores elsewhere; every element must be what the elementwise pass computes on a
    small tensor (ordinary stores only), bit for bit, and the gradients must match the reference."""
    x = make_input(shape, dtype, channels_last=channels_last)
    assert x.numel() * x.element_size() >= 16 << 20
    C = shape[1]
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv = torch.zeros(C), torch.ones(C)
    y, mean, invstd = native.forward_train(x, w, b, rm, rv, 0.1, 1e-5, act_codes.RELU, 0.0)
    head = x[:1]  # one sample: far below the streaming size, the same values and layout
    assert torch.equal(y[:1], native.normalize(head, w, b, mean, invstd, act_codes.RELU, 0.0))
    y_eval = native.forward_eval(x, w, b, rm, rv, 1e-5, act_codes.LEAKY_RELU, 0.2)
    assert torch.equal(y_eval[:1], native.forward_eval(head, w, b, rm, rv, 1e-5, act_codes.LEAKY_RELU, 0.2))

    y_ref, mean_ref, invstd_ref = ref.forward_train(x, w, b, None, None, 0.1, 1e-5, act_codes.RELU, 0.0)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(invstd, invstd_ref)
    dy = torch.randn_like(x)
    got = native.backward(dy, x, y, w, mean, invstd, act_codes.RELU, 0.0, True, True, True, True)
    want = ref.backward(dy, x, y, w, mean, invstd, act_codes.RELU, 0.0, True, True, True, True)
    atol, rtol = (1e-3, 1e-4) if dtype == torch.float32 else (1.6e-2, 1.6e-2)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol)
    assert got[0].stride() == x.stride()


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        native.forward_train(x, torch.ones(4), None, None, None, 0.1, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="act must be"):
        native.forward_eval(x, None, None, torch.zeros(3), torch.ones(3), 1e-5, 7, 0.0)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        native.batch_stats(torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="dense"):
        native.batch_stats(torch.randn(4, 6, 5)[:, ::2])
    with pytest.raises(RuntimeError, match="y .the forward output. is needed"):
        native.backward(x, x, None, None, torch.zeros(3), torch.ones(3), 1, 0.0, True, True, False, False)


# --------------------------------------------------------------------------- torch.library and autograd


def _opcheck_samples():
    x = make_input((3, 4, 5, 6), torch.float32)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    y, mean, invstd = ref.forward_train(x, w, b, None, None, 0.1, 1e-5, 1, 0.0)
    dy = torch.randn_like(x)
    sums = ref.backward_reduce(dy, x, y, mean, invstd, 1, 0.0)
    ops = torch.ops.bnfused_native
    return [
        (ops.forward_train.default, (x, w, b, torch.zeros(4), torch.ones(4), 0.1, 1e-5, 1, 0.0)),
        (
            ops.forward_train.default,
            (x.contiguous(memory_format=torch.channels_last), None, None, None, None, 0.1, 1e-5, 0, 0.0),
        ),
        (ops.forward_eval.default, (x, w, b, torch.zeros(4), torch.ones(4), 1e-5, 2, 0.1)),
        (ops.backward.default, (dy, x, y, w, mean, invstd, 1, 0.0, True, True, True, True)),
        (ops.backward.default, (dy, x, y, w, mean, invstd, 1, 0.0, False, True, False, True)),
        (ops.batch_stats.default, (x,)),
        (ops.normalize.default, (x, w, b, mean, invstd, 0, 0.0)),
        (ops.backward_reduce.default, (dy, x, y, mean, invstd, 1, 0.0)),
        (ops.backward_elemt.default, (dy, x, y, w, mean, invstd, *sums, x.numel() // 4, 1, 0.0)),
    ]


@pytest.mark.parametrize("index", range(9))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


def _via_functional(x, w, b, rm, rv, training, act, slope):
    activation = act_codes.NAMES[act]
    return bnfused.functional.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation, slope, backend="cpp")


def _via_layer_op(x, w, b, rm, rv, training, act, slope):
    return native.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5, act, slope)


@pytest.mark.parametrize("route", [_via_functional, _via_layer_op], ids=["functional", "layer_op"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act, slope", ACTS)
def test_gradcheck_float64(route, training, act, slope):
    x = make_input((4, 3, 3, 2), torch.float64).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    rm, rv = torch.linspace(-1, 1, 3, dtype=torch.float64), torch.linspace(0.5, 2, 3, dtype=torch.float64)
    upstream = torch.randn(x.shape, dtype=torch.float64)

    def loss(x, w, b):
        y = route(x, w, b, None if training else rm, None if training else rv, training, act, slope)
        return (y * upstream).sum()

    assert torch.autograd.gradcheck(loss, (x, w, b))


# --------------------------------------------------------------------------- the C++ autograd layer op


def _layer_vs_torch(shape, training, act, slope, channels_last=False, dtype=torch.float32, affine=True):
    """Runs native.batch_norm and torch's batch_norm (+activation) side by side; compares everything."""
    x = make_input(shape, dtype, channels_last)
    c = shape[1]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(c, dtype=pdtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=pdtype).requires_grad_() if affine else None
    rm, rv = torch.linspace(-1, 1, c, dtype=pdtype), torch.linspace(0.5, 2, c, dtype=pdtype)
    x1, x2 = x.clone().requires_grad_(), x.to(pdtype).requires_grad_()
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    w2 = b2 = None
    if affine:
        w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y1 = native.batch_norm(x1, w, b, rm1, rv1, training, 0.2, 1e-5, act, slope)
    y2 = torch.nn.functional.batch_norm(x2, rm2, rv2, w2, b2, training, 0.2, 1e-5)
    if act != act_codes.NONE:
        y2 = torch.nn.functional.leaky_relu(y2, slope)
    grad = torch.randn(shape, dtype=pdtype)
    y1.backward(grad.to(dtype))
    y2.backward(grad)
    atol, rtol = (1e-2, 1e-2) if dtype in (torch.float16, torch.bfloat16) else (1e-5, 1e-5)
    torch.testing.assert_close(y1.to(pdtype), y2, atol=atol, rtol=rtol)
    assert y1.dtype == dtype and y1.stride() == x.stride()
    torch.testing.assert_close(x1.grad.to(pdtype), x2.grad, atol=atol * 5, rtol=rtol * 5)
    if affine:
        assert w.grad.dtype == w.dtype and b.grad.dtype == b.dtype
        torch.testing.assert_close(w.grad, w2.grad, atol=atol * 20, rtol=rtol * 5)
        torch.testing.assert_close(b.grad, b2.grad, atol=atol * 20, rtol=rtol * 5)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act, slope", ACTS)
def test_layer_op_matches_torch(training, act, slope):
    _layer_vs_torch((6, 5, 4, 3), training, act, slope)


@pytest.mark.parametrize(
    "shape, channels_last, dtype, affine",
    [
        ((64, 120), False, torch.float32, True),
        ((5, 7, 9), True, torch.float32, False),
        ((4, 6, 5, 3), True, torch.float16, True),
        ((2, 3, 4, 5, 3), False, torch.bfloat16, True),
        ((4, 6, 5, 3), False, torch.float64, True),
    ],
)
def test_layer_op_layouts_and_dtypes(shape, channels_last, dtype, affine):
    _layer_vs_torch(shape, True, act_codes.RELU, 0.0, channels_last, dtype, affine)


@pytest.mark.parametrize("training", [True, False])
def test_layer_op_double_backward(training):
    """Under create_graph=True the C++ node computes its gradients in differentiable ATen ops."""
    x = make_input((4, 3, 5), torch.float64).requires_grad_()
    w, b = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def run(x, w):
        return native.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5, act_codes.LEAKY_RELU, 0.1)

    assert torch.autograd.gradgradcheck(run, (x, w))


def test_layer_op_saved_tensors_follow_autograd_rules():
    """The C++ node saves x, y and weight as torch's own nodes do: in-place changes are caught,
    saved-tensor hooks apply, a second backward is refused, and only requested gradients are computed."""
    x = make_input((4, 3, 5), torch.float32).requires_grad_()
    w, b = (torch.rand(3) + 0.5).requires_grad_(), torch.randn(3).requires_grad_()

    def run(x, w, b):
        return native.batch_norm(x * 1.0, w, b, None, None, True, 0.1, 1e-5, act_codes.RELU, 0.0)

    y = run(x, w, b)
    assert y.grad_fn.name() == "BatchNormBackward"
    y.mul_(2.0)  # y is saved (the relu mask is read off it)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    y = run(x, w, b)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    expected = (x.grad.clone(), w.grad.clone(), b.grad.clone())

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(), lambda t: t):
        y = run(x, w, b)
    assert len(packed) >= 3  # x, y, weight, mean, invstd
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    for got, want in zip((dx, dw, db), expected):
        torch.testing.assert_close(got, want)
    (dw_only,) = torch.autograd.grad(run(x, w, b).sum(), w)
    torch.testing.assert_close(dw_only, expected[1])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.autograd.forward_ad imports torch.jit.script
def test_layer_op_refuses_forward_mode_ad():
    """No jvp formula exists: a dual input must raise, not return a tangent-less (silently zero) output."""
    import torch.autograd.forward_ad as fwAD

    x = make_input((4, 3, 5), torch.float32)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            native.batch_norm(dual, None, None, None, None, True, 0.1, 1e-5, 0, 0.0)


def test_layer_op_graph_is_freed_with_its_output():
    """y is saved by its own node (for the relu mask): that must not form a cycle that keeps the
    graph, and so every 4 MB output, alive after the output is dropped."""

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    x = make_input((1, 1, 1024, 1024), torch.float32).requires_grad_()
    w, b = (torch.rand(1) + 0.5).requires_grad_(), torch.randn(1).requires_grad_()
    native.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, act_codes.RELU, 0.0)
    before = rss_bytes()
    for _ in range(50):
        y = native.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, act_codes.RELU, 0.0)
        del y
    assert rss_bytes() - before < 100 << 20, "outputs of dropped graphs were not freed"


def test_layer_op_opcheck():
    x = make_input((3, 4, 5, 6), torch.float32)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    torch.library.opcheck(
        torch.ops.bnfused_native.batch_norm.default, (x, w, b, torch.zeros(4), torch.ones(4), True, 0.1, 1e-5, 1, 0.0)
    )
    torch.library.opcheck(
        torch.ops.bnfused_native.batch_norm.default, (x, w, b, torch.zeros(4), torch.ones(4), False, 0.1, 1e-5, 2, 0.1)
    )


# --------------------------------------------------------------------------- build and availability


_CUDA_BUILD_SCRIPT = """
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("native_copy", sys.argv[1])
native = sys.modules["native_copy"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
native._import_prebuilt = lambda: False
lib = native.library()
assert lib.error is None and lib.cuda_error is None, lib
for name in native.OP_NAMES:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bnfused_native::{name}", "CUDA"), name
print("registered")
"""


@pytest.mark.slow
def test_cuda_kernels_compile_and_register_where_a_toolkit_is_present(tmp_path):
    """Keeps the CUDA sources from rotting on machines without a GPU: with $BNFUSED_BUILD_CUDA=1 the
    JIT build compiles them and registers every op's CUDA kernel. To bound the time, a copy of the
    tree with the schemas and the CUDA sources only (the CPU ones are built and tested everywhere
    else) is built for one architecture; the build is cached by content, so only the first run after
    an edit of those sources pays it."""
    home, reason = native.cuda_toolkit()
    if home is None:
        pytest.skip(f"no CUDA compilation possible here: {reason}")
    csrc = tmp_path / "csrc"
    shutil.copytree(native.CSRC / "cuda", csrc / "cuda")
    for source in [native.CSRC / "bnfused.cpp", *native.CSRC.glob("*.h")]:
        shutil.copy2(source, csrc / source.name)
    (tmp_path / "bnfused" / "backends").mkdir(parents=True)
    shutil.copy2(native.__file__, tmp_path / "bnfused" / "backends" / "native.py")
    env = dict(os.environ, BNFUSED_BUILD_CUDA="1", CUDA_HOME=home)
    if not torch.cuda.is_available():
        env["TORCH_CUDA_ARCH_LIST"] = "8.0"
    done = subprocess.run(
        [sys.executable, "-c", _CUDA_BUILD_SCRIPT, str(tmp_path / "bnfused" / "backends" / "native.py")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "registered" in done.stdout, done.stderr[-3000:]


def test_cpu_only_build_without_a_visible_gpu():
    if torch.cuda.is_available() or native.library().origin != "jit" or os.environ.get(native.BUILD_CUDA_ENV):
        pytest.skip("a GPU is visible, the library is prebuilt, or the CUDA build was asked for")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bnfused_native::forward_train", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bnfused_native::forward_train", "CPU")
    assert native.BUILD_CUDA_ENV in native.available(torch.device("cuda")) or native.cuda_toolkit()[0] is None


def test_cpu_availability():
    assert native.available(torch.device("cpu")) is None
    assert "no kernels for meta tensors" in native.available(torch.device("meta"))


def test_failed_build_falls_back_with_a_warning_and_explicit_request_raises(monkeypatch):
    def broken_build(with_cuda):
        raise RuntimeError("simulated: no C++ compiler")

    monkeypatch.setattr(native, "_import_prebuilt", lambda: False)
    monkeypatch.setattr(native, "_jit_build", broken_build)
    failed = native._load()
    assert failed.error is not None and "simulated: no C++ compiler" in failed.error

    monkeypatch.setattr(native, "library", lambda: failed)
    monkeypatch.setattr(backends, "_resolved", {})
    x = torch.randn(4, 3, 5)
    with pytest.warns(RuntimeWarning, match="simulated: no C.. compiler"):
        y = bnfused.functional.batch_norm(x, None, None, training=True, backend="auto")
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    with pytest.raises(bnfused.BackendUnavailableError, match="simulated: no C.. compiler"):
        bnfused.functional.batch_norm(x, None, None, training=True, backend="cpp")
