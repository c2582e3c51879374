"""The C++ CPU kernels with the activations relu6, hardswish and silu and the residual add fused
(z = bn(x) (+ residual), y = act(z)): the ops and the layer op against torch's own ops, on every CPU
schedule and dtype, gradients (all four) included; gradcheck; torch's conventions at the kinks;
bit-for-bit the same results for any thread count."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, make_input
from test_cpu_schedules import _with_threads

from bnfused import activation as act_codes
from bnfused.backends import native

pytestmark = pytest.mark.skipif(native.available(torch.device("cpu")) is not None, reason="C++ extension unavailable")

ALL_ACTS = [
    (act_codes.NONE, 0.0),
    (act_codes.RELU, 0.0),
    (act_codes.LEAKY_RELU, 0.2),
    (act_codes.RELU6, 0.0),
    (act_codes.HARDSWISH, 0.0),
    (act_codes.SILU, 0.0),
    (act_codes.SIGMOID, 0.0),
]
ACT_IDS = [act_codes.NAMES[a] or "none" for a, _ in ALL_ACTS]
EPS = 1e-5

# Every CPU schedule, odd sizes: (shape, channels_last)
LAYOUTS = [
    pytest.param((6, 19, 14, 14), False, id="NCHW-196"),  # short planes (flat walk in eval)
    pytest.param((5, 19, 14, 14), True, id="channels-last-C19"),  # rows, C not a multiple of the vector
    pytest.param((64, 37), False, id="NC-37"),  # (N, C) rows
    pytest.param((9, 5, 7), False, id="NCL-7"),  # planes of 7
    pytest.param((9, 5, 7), True, id="NLC-7"),  # (N, L, C) viewed as (N, C, L)
    pytest.param((40, 13, 1, 1), False, id="planes-1"),
    pytest.param((2, 3, 131, 131), False, id="long-planes"),  # planes split in two tiles
    pytest.param((41, 6, 9, 9), True, id="rows-flat-C6"),  # rows walked flat: two tiles, the last partial
]


def _params(C, dtype=torch.float32):
    w = torch.linspace(0.5, 1.5, C, dtype=dtype)
    b = torch.linspace(-1.0, 1.0, C, dtype=dtype)
    return w, b


def _torch_layer(x, w, b, rm, rv, training, act, slope, residual):
    """torch's ops: F.batch_norm (+ residual), then the activation, in x's dtype."""
    z = F.batch_norm(x, rm, rv, w, b, training, 0.1, EPS)
    if residual is not None:
        z = z + residual
    return act_codes.apply(z, act, slope)


def _kernel_layer(x, w, b, rm, rv, training, act, slope, residual, dy):
    """forward_train / forward_eval then backward (4 results) of the ops: (y, dx, dw, db, dr)."""
    if training:
        y, mean, invstd = native.forward_train(x, w, b, rm, rv, 0.1, EPS, act, slope, residual)
    else:
        y = native.forward_eval(x, w, b, rm, rv, EPS, act, slope, residual)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean, invstd = rm.to(acc), (rv.double() + EPS).rsqrt().to(acc)
    y_arg = y if act_codes.RELU <= act <= act_codes.RELU6 else None
    grads = native.backward(dy, x, y_arg, w, mean, invstd, act, slope, training, True, True, True, b, residual, True)
    assert len(grads) == 4
    return (y, *grads)


def _reference(x, w, b, rm, rv, training, act, slope, residual, dy, y_kernel):
    """Everything in float64 through torch's autograd: (y, dx, dw, db, dr, running_mean, running_var).

    relu, leaky_relu and relu6 are differentiated where the kernel's own output y_kernel says z
    lies (y > 0 exactly where z > 0, 0 < y < 6 exactly where 0 < z < 6), as the kernels do: a z
    within rounding of a kink may fall on either side of it in float32 (one of 18,620 values did
    with 8-lane vectors), and the derivative jumps there by dy, moving its whole channel's sums."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, residual if residual is not None else x)]
    rm64, rv64 = rm.double(), rv.double()
    r = leaves[3] if residual is not None else None
    if act_codes.RELU <= act <= act_codes.RELU6:
        z = _torch_layer(leaves[0], leaves[1], leaves[2], rm64, rv64, training, act_codes.NONE, 0.0, r)
        y, yk, g = act_codes.apply(z.detach(), act, slope), y_kernel.double(), dy.double()
        if act == act_codes.RELU6:
            g = torch.where((yk > 0) & (yk < 6), g, 0.0)
        else:
            g = torch.where(yk > 0, g, g * slope)
        grads = torch.autograd.grad(z, leaves[: 3 + (residual is not None)], g)
    else:
        y = _torch_layer(leaves[0], leaves[1], leaves[2], rm64, rv64, training, act, slope, r)
        grads = torch.autograd.grad(y, leaves[: 3 + (residual is not None)], dy.double())
    return (y.detach(), *grads, rm64, rv64)


def _check(got, want, dtype, count, what):
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, count**0.5) if what in ("dweight", "dbias") else 1.0  # sums over `count` values
    factor = 1 if what == "y" else 5
    torch.testing.assert_close(
        got.double(), want, atol=atol * factor * scale, rtol=rtol * factor, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("act, slope", ALL_ACTS, ids=ACT_IDS)
def test_ops_match_torch(shape, channels_last, dtype, training, with_residual, act, slope):
    x = make_input(shape, dtype, channels_last=channels_last)
    dy = make_input(shape, dtype, channels_last=channels_last, offset=0.0, scale=1.0)
    residual = make_input(shape, dtype, channels_last=channels_last, offset=-1.0, scale=2.0) if with_residual else None
    C = shape[1]
    w, b = _params(C)
    rm, rv = torch.linspace(-1.0, 2.0, C), torch.linspace(0.5, 4.0, C)
    running = rm.clone(), rv.clone()
    got = _kernel_layer(x, w, b, rm, rv, training, act, slope, residual, dy)
    want = _reference(x, w, b, *running, training, act, slope, residual, dy, got[0])
    count = x.numel() // C
    for what, g, r in zip(("y", "dx", "dweight", "dbias", "dresidual"), got, want):
        if what == "dresidual" and residual is None:
            assert g.shape == x.shape  # asked for: g itself, whatever the layout of the forward
            continue
        _check(g, r, dtype, count, what)
        if what in ("y", "dx", "dresidual"):
            assert g.dtype == dtype and g.stride() == x.stride(), what
    _check(rm, want[-2], rm.dtype, count, "running_mean")  # float32 buffers
    _check(rv, want[-1], rv.dtype, count, "running_var")


def _max_error(a, reference):
    return (a.double() - reference).abs().max().item()


@pytest.mark.parametrize("shape, channels_last", [*LAYOUTS[:5], LAYOUTS[-1]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "act, with_residual",
    [(act_codes.RELU6, True), (act_codes.HARDSWISH, False), (act_codes.HARDSWISH, True), (act_codes.SILU, True)],
    ids=["relu6-residual", "hardswish", "hardswish-residual", "silu-residual"],
)
def test_low_precision_within_twice_torchs_error(shape, channels_last, dtype, training, act, with_residual):
    """The layer op in float16/bfloat16 against float64 torch ops on the same (rounded) inputs: at
    most twice the error of torch's own ops in that dtype (plus a tenth of the dtype's step)."""
    x = make_input(shape, dtype, channels_last=channels_last)
    dy = make_input(shape, dtype, channels_last=channels_last, offset=0.0, scale=1.0)
    residual = make_input(shape, dtype, channels_last=channels_last, offset=0.0, scale=2.0) if with_residual else None
    C = shape[1]
    w, b = _params(C)
    rm, rv = torch.linspace(-1.0, 2.0, C), torch.linspace(0.5, 4.0, C)

    def run(fn, cast, dtype_params):
        leaves = [cast(x).requires_grad_()] + ([cast(residual).requires_grad_()] if with_residual else [])
        y = fn(leaves[0], w.to(dtype_params), b.to(dtype_params), rm.to(dtype_params), rv.to(dtype_params),
               leaves[1] if with_residual else None)  # fmt: skip
        grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
        return (y.detach(), *grads)

    def torch_ops(x_, w_, b_, rm_, rv_, r_):
        return _torch_layer(x_, w_, b_, rm_, rv_, training, act, 0.0, r_)

    def ours(x_, w_, b_, rm_, rv_, r_):
        return native.batch_norm(x_, w_, b_, rm_, rv_, training, 0.1, EPS, act, 0.0, r_)

    want = run(torch_ops, lambda t: t.detach().double(), torch.float64)
    theirs = run(torch_ops, lambda t: t.detach().clone(), dtype)
    mine = run(ours, lambda t: t.detach().clone(), torch.float32)
    step = torch.finfo(dtype).eps / 10
    for what, m, t, r in zip(("output", "input grad", "residual grad"), mine, theirs, want):
        assert m.dtype == dtype
        err, torch_err = _max_error(m, r), _max_error(t, r)
        assert err <= 2 * torch_err + step * r.abs().max().item(), f"{what}: error {err} vs torch's {torch_err}"


def _layer(x, w, b, residual, training, act, slope):
    C = x.shape[1]
    rm = torch.zeros(C, dtype=x.dtype)
    rv = torch.linspace(0.5, 2.0, C, dtype=x.dtype)
    return torch.ops.bnfused_native.batch_norm(x, w, b, rm, rv, training, 0.1, EPS, act, slope, residual)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act, slope", ALL_ACTS, ids=ACT_IDS)
def test_gradcheck_layer_op_with_residual(training, act, slope):
    x = make_input((4, 3, 3, 2), torch.float64).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(3, torch.float64))
    residual = make_input((4, 3, 3, 2), torch.float64, offset=0.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: _layer(*a, training, act, slope), (x, w, b, residual))
    if act in (act_codes.HARDSWISH, act_codes.SILU, act_codes.SIGMOID):  # z recomputed in ATen ops under create_graph
        assert torch.autograd.gradgradcheck(lambda *a: _layer(*a, training, act, slope), (x, w, b, residual))


@pytest.mark.parametrize(
    "act",
    [act_codes.NONE, act_codes.RELU6, act_codes.HARDSWISH, act_codes.SILU, act_codes.SIGMOID],
    ids=["none", "relu6", "hardswish", "silu", "sigmoid"],
)
def test_layer_op_saves_what_its_activation_needs(act):
    """relu6 keeps y (act' is read off it); hardswish and silu keep bias and residual instead (z is
    recomputed), not y; d(residual) needs nothing saved."""
    x = make_input((4, 3, 5), torch.float32).requires_grad_()
    w, b = _params(3)
    residual = torch.randn(4, 3, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = native.batch_norm(x, w, b, None, None, True, 0.1, EPS, act, 0.0, residual)

    def kept(t):
        return any(s.data_ptr() == t.data_ptr() for s in saved)

    assert kept(x)
    assert kept(y) == (act == act_codes.RELU6)
    assert kept(residual) == kept(b) == (act in (act_codes.HARDSWISH, act_codes.SILU, act_codes.SIGMOID))
    dx, dr = torch.autograd.grad(y.sum(), (x, residual))
    assert dx.shape == dr.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kinks_follow_torch(dtype):
    """z exactly on the kinks (hardswish: -3, 3; relu6: 0, 6) and around them: outputs and gradients
    equal torch's. Eval with mean 0, var 1, eps 0 and no affine: z = x + residual exactly."""
    z = torch.tensor([-3.0, 3.0, 0.0, 6.0, -2.5, 2.5, 5.5, 7.0, -4.0, 1.0, -0.5, 0.25, 3.0, -3.0, 6.0, 0.0, 4.5])
    x = z.to(dtype).repeat(3, 2, 1)  # (3, 2, 17): planes of 17, the vector path and its tail
    residual = torch.zeros_like(x)
    residual[1] = 1.0  # z = x + 1 on the second sample: kinks met off the residual too
    x[1] -= 1.0
    C = x.shape[1]
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    for act in (act_codes.RELU6, act_codes.HARDSWISH):
        xs = x.clone().requires_grad_()
        y = native.batch_norm(xs, None, None, rm, rv, False, 0.1, 0.0, act, 0.0, residual)
        (dx,) = torch.autograd.grad(y, xs, torch.ones_like(y))
        zs = (x + residual).requires_grad_()
        y_torch = act_codes.apply(zs, act, 0.0)
        (dz,) = torch.autograd.grad(y_torch, zs, torch.ones_like(y_torch))
        assert torch.equal(y, y_torch.detach()), act_codes.NAMES[act]
        assert torch.equal(dx, dz), act_codes.NAMES[act]


@pytest.mark.parametrize(
    "act",
    [act_codes.RELU6, act_codes.HARDSWISH, act_codes.SILU, act_codes.SIGMOID],
    ids=["relu6", "hardswish", "silu", "sigmoid"],
)
def test_activation_rounds_as_torchs(act):
    """With z = x exactly (eval, mean 0, var 1, eps 0, no affine), y is torch's activation of x to the bit."""
    x = torch.randn(4, 3, 37) * 4
    y = native.forward_eval(x, None, None, torch.zeros(3), torch.ones(3), 0.0, act, 0.0)
    assert torch.equal(y, act_codes.apply(x, act, 0.0))


# Schedules with more values than one thread takes, as in test_cpu_kernels.py.
THREAD_SCHEDULES = [
    pytest.param((16, 12, 20, 20), False, id="short-planes-400"),
    pytest.param((2, 3, 130, 131), False, id="long-planes"),
    pytest.param((4096, 3, 7), False, id="planes-7"),
    pytest.param((8, 24, 20, 20), True, id="channels-last"),
    pytest.param((1024, 75), False, id="NC-75"),
    pytest.param((2048, 37, 1, 1), False, id="planes-1"),
    pytest.param((70, 6, 9, 9), True, id="rows-flat-C6"),
    pytest.param((2101, 75), False, id="rows-flat-NC-75"),
]


@pytest.mark.parametrize("shape, channels_last", THREAD_SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "act",
    [act_codes.RELU6, act_codes.HARDSWISH, act_codes.SILU, act_codes.SIGMOID],
    ids=["relu6", "hardswish", "silu", "sigmoid"],
)
def test_bitwise_identical_for_any_thread_count(shape, channels_last, dtype, act):
    x = make_input(shape, dtype, channels_last=channels_last)
    dy = make_input(shape, dtype, channels_last=channels_last, offset=0.0, scale=1.0)
    residual = make_input(shape, dtype, channels_last=channels_last, offset=0.0, scale=1.0)
    w, b = _params(shape[1])
    rm, rv = torch.linspace(-1.0, 2.0, shape[1]), torch.linspace(0.5, 4.0, shape[1])

    def step():
        train = _kernel_layer(x, w, b, rm.clone(), rv.clone(), True, act, 0.0, residual, dy)
        evaluated = _kernel_layer(x, w, b, rm, rv, False, act, 0.0, residual, dy)
        return (*train, *evaluated)

    one = _with_threads(1, step)
    for threads in (2, 3):
        other = _with_threads(threads, step)
        for i, (a, c) in enumerate(zip(one, other)):
            assert torch.equal(a, c), f"result {i} differs between 1 and {threads} threads"


def test_bad_residual_and_split_primitives_raise_clear_errors():
    x = torch.randn(4, 3, 5)
    w, b = _params(3)
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        native.forward_train(x, w, b, None, None, 0.1, EPS, 4, 0.0, torch.randn(4, 3, 4))
    with pytest.raises(RuntimeError, match="residual must have x's dtype"):
        native.forward_eval(x, w, b, torch.zeros(3), torch.ones(3), EPS, 5, 0.0, x.double())
    mean, invstd = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="y .the forward output. is needed"):
        native.backward(x, x, None, w, mean, invstd, act_codes.RELU6, 0.0, True, True, False, False)
    with pytest.raises(RuntimeError, match="backward_reduce supports activations 0-3"):
        native.backward_reduce(x, x, None, mean, invstd, act_codes.SILU, 0.0)


def test_opcheck_new_signatures():
    x = make_input((3, 4, 5, 6), torch.float32)
    w, b = _params(4)
    r, dy = torch.randn_like(x), torch.randn_like(x)
    ops = torch.ops.bnfused_native
    y, mean, invstd = ops.forward_train(x, w, b, torch.zeros(4), torch.ones(4), 0.1, EPS, act_codes.SILU, 0.0, r)
    samples = [
        (ops.forward_train.default, (x, w, b, torch.zeros(4), torch.ones(4), 0.1, EPS, act_codes.HARDSWISH, 0.0, r)),
        (ops.forward_eval.default, (x, w, b, torch.zeros(4), torch.ones(4), EPS, act_codes.RELU6, 0.0, r)),
        (ops.backward.default, (dy, x, None, w, mean, invstd, act_codes.SILU, 0.0, True, True, True, True, b, r, True)),
        (ops.backward.default, (dy, x, y, w, mean, invstd, 1, 0.0, False, True, False, True, None, None, True)),
        (ops.batch_norm.default, (x, w, b, torch.zeros(4), torch.ones(4), True, 0.1, EPS, act_codes.HARDSWISH, 0.0, r)),
    ]  # fmt: skip
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "act", [act_codes.HARDSWISH, act_codes.SILU, act_codes.SIGMOID], ids=["hardswish", "silu", "sigmoid"]
)
def test_outputs_large_enough_to_stream_are_exact(act):
    """y, dx and dresidual of 16 to 32 MiB are written with streaming stores where a whole vector is
    aligned: in eval (elementwise) every value equals the one computed on a single sample (too small
    to stream), bit for bit."""
    shape = (3, 5, 601, 467)
    x, dy, residual = (make_input(shape, torch.float32, offset=o) for o in (2.0, 0.0, -1.0))
    assert x.numel() * x.element_size() >= 16 << 20
    w, b = _params(5)
    rm, rv = torch.linspace(-1.0, 2.0, 5), torch.linspace(0.5, 4.0, 5)
    full = _kernel_layer(x, w, b, rm, rv, False, act, 0.0, residual, dy)
    head = _kernel_layer(x[1:2], w, b, rm, rv, False, act, 0.0, residual[1:2], dy[1:2])
    for what, i in (("y", 0), ("dx", 1), ("dresidual", 4)):
        assert torch.equal(full[i][1:2], head[i]), what
