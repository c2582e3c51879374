"""Argument checks as torch's (issue 16, item 13): torch.nn.functional.batch_norm is the oracle for
each exception type and message, and for what it accepts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnfused
from bnfused.functional import batch_norm

BACKENDS = ["reference", "cpp", "triton"]
C = 3


def _stats():
    return torch.randn(C), torch.rand(C) + 0.5


def _torch_error(call):
    with pytest.raises(Exception) as torch_error:
        call(F.batch_norm, {})
    return torch_error


@pytest.mark.parametrize("training", [None, torch.tensor(True), 1, np.bool_(True), "yes"], ids=repr)
def test_item13_training_must_be_a_bool_like_torch(training):
    def call(fn, kwargs):
        return fn(torch.randn(4, C), *_stats(), training=training, **kwargs)

    expected = _torch_error(call)
    assert expected.type is TypeError
    for backend in ("reference", "cpp"):
        with pytest.raises(TypeError) as got:
            call(batch_norm, {"backend": backend})
        assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_item13_running_stats_that_require_grad_raise_like_torch(which, training, backend):
    x, stats = torch.randn(4, C, 2), dict(zip(("running_mean", "running_var"), _stats()))

    def call(fn, kwargs):
        own = {name: t.clone().requires_grad_(name == which) for name, t in stats.items()}
        return fn(x, own["running_mean"], own["running_var"], training=training, **kwargs)

    expected = _torch_error(call)
    assert expected.type is RuntimeError
    with pytest.raises(RuntimeError) as got:
        call(batch_norm, {"backend": backend})
    assert str(got.value) == str(expected.value)
    with torch.no_grad():  # nothing is recorded: torch accepts them, and so does bnfused
        torch.testing.assert_close(call(batch_norm, {"backend": backend}), call(F.batch_norm, {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_item13_strided_and_expanded_running_stats(backend):
    """Strided running stats work as in torch. Expanded (stride-0) ones are read in eval as torch reads
    them; in training bnfused refuses them with torch's in-place overlap error, where torch writes
    every channel's update into the one shared element (its result depends on channel order and
    thread count)."""
    x = torch.randn(6, C, 4) * 2 + 1
    mean, var = _stats()

    def strided(t):
        base = torch.full((2 * C,), 7.0)
        base[::2] = t
        return base[::2]

    for training in (True, False):
        got_mean, got_var, want_mean, want_var = strided(mean), strided(var), mean.clone(), var.clone()
        got = batch_norm(x, got_mean, got_var, training=training, backend=backend)
        torch.testing.assert_close(got, F.batch_norm(x, want_mean, want_var, training=training))
        torch.testing.assert_close(got_mean, want_mean), torch.testing.assert_close(got_var, want_var)
        assert (got_mean._base[1::2] == 7).all()  # nothing written between the elements
    one_mean, one_var = torch.randn(1), torch.rand(1) + 0.5
    expanded = one_mean.expand(C), one_var.expand(C)
    got = batch_norm(x, *expanded, training=False, backend=backend)
    torch.testing.assert_close(got, F.batch_norm(x, *expanded, training=False))
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        batch_norm(x, *expanded, training=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shapes", [((1, C), (C,)), ((C,), (C, 1))], ids=["mean(1,C)", "var(C,1)"])
def test_item13_running_stats_must_be_one_dimensional_as_in_torch(shapes, training, backend):
    running_mean, running_var = torch.zeros(shapes[0]), torch.ones(shapes[1])
    x = torch.randn(4, C)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, running_mean, running_var, training=training)
    name = "running_mean" if running_mean.dim() != 1 else "running_var"
    with pytest.raises(RuntimeError, match=rf"{name} should be a 1-D tensor of 3 elements, got shape"):
        batch_norm(x, running_mean, running_var, training=training, backend=backend)


@pytest.mark.parametrize(
    "argument, position, value",
    [
        ("input", 1, torch.randn(4, C).numpy()),
        ("input", 1, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
        ("weight", 2, [1.0, 1.0, 1.0]),
        ("bias", 3, 0.5),
        ("running_mean", 4, np.zeros(C, dtype=np.float32)),
        ("running_var", 5, np.ones(C, dtype=np.float32)),
    ],
    ids=["numpy-input", "list-input", "list-weight", "float-bias", "numpy-mean", "numpy-var"],
)
def test_item13_non_tensor_arguments_raise_torchs_type_error(argument, position, value):
    arguments = {"input": torch.randn(4, C), "running_mean": torch.zeros(C), "running_var": torch.ones(C)}
    arguments[argument] = value
    if argument != "input":  # torch's own message for these (for input, torch fails on input.size())
        with pytest.raises(TypeError) as expected:
            F.batch_norm(training=True, **arguments)
        assert f"argument '{argument}' (position {position}) must be Tensor" in str(expected.value)
    name = type(value).__name__ if type(value).__module__ == "builtins" else "numpy.ndarray"
    message = f"batch_norm(): argument '{argument}' (position {position}) must be Tensor, not {name}"
    for backend in ("reference", "cpp"):
        with pytest.raises(TypeError) as got:
            batch_norm(training=True, backend=backend, **arguments)
        assert str(got.value) == message


@pytest.mark.parametrize("backend", ["cpp", "reference", "auto"])
def test_item13_meta_input_gives_a_meta_output_as_torch(backend):
    x = torch.randn(4, C, 5, 5, device="meta").contiguous(memory_format=torch.channels_last).requires_grad_()
    fused, plain = bnfused.BatchNorm2d(C, backend=backend, device="meta"), torch.nn.BatchNorm2d(C, device="meta")
    for training in (True, False):
        fused.train(training), plain.train(training)
        got, want = fused(x), plain(x)
        assert (got.device, got.shape, got.stride(), got.dtype) == (want.device, want.shape, want.stride(), want.dtype)
        (grad,) = torch.autograd.grad(got.sum(), x)
        assert grad.device.type == "meta" and grad.shape == x.shape


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, C, 5), (4, C, 0), (4, 0, 5)])
def test_item13_empty_input_with_wrong_size_per_channel_tensors_is_returned_empty_as_torch(shape, training, backend):
    wrong = (torch.zeros(C + 1), torch.ones(C + 1), torch.rand(C + 1, requires_grad=True), torch.rand(C + 1))
    x = torch.randn(shape, requires_grad=True)
    want = F.batch_norm(x, *[t.detach().clone() for t in wrong], training=training)
    got = batch_norm(x, *wrong, training=training, backend=backend)
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
    got.sum().backward()
    torch.testing.assert_close(wrong[2].grad, torch.zeros(C + 1))  # connected to weight, as torch's output is
    torch.testing.assert_close(wrong[0], torch.zeros(C + 1))  # running stats untouched


@pytest.mark.parametrize(("name", "value"), [
    ("momentum", "0.1"), ("momentum", None), ("eps", "1e-5"), ("eps", [1e-5]),
    ("momentum", torch.tensor([0.5])), ("momentum", torch.tensor(0.5, requires_grad=True)),
    ("eps", torch.tensor([1e-5])),
])  # fmt: skip
def test_item13_momentum_and_eps_must_be_numbers_as_in_torch(name, value):
    x = torch.randn(4, 3)
    kwargs = {"training": True, name: value}
    with pytest.raises(TypeError) as expected:
        F.batch_norm(x, torch.zeros(3), torch.ones(3), **kwargs)
    with pytest.raises(TypeError) as got:
        bnfused.batch_norm(x, torch.zeros(3), torch.ones(3), **kwargs)
    if name == "momentum":
        assert str(got.value) == str(expected.value)
    else:  # torch's eps check compares first ("'<=' not supported ..."): ours names the argument
        assert str(got.value) == f"batch_norm(): argument 'eps' (position 8) must be float, not {type(value).__name__}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_item13_momentum_and_eps_as_0d_tensors_are_their_numbers_as_in_torch(backend):
    """torch's argument parser takes a 0-d tensor (that needs no grad) for a float: functional and module."""
    x = torch.randn(4, 3, 5)
    stats, want_stats = [torch.zeros(3), torch.ones(3)], [torch.zeros(3), torch.ones(3)]
    momentum, eps = torch.tensor(0.5), torch.tensor(1e-3, dtype=torch.float64)
    got = bnfused.batch_norm(x, *stats, training=True, momentum=momentum, eps=eps, backend=backend)
    want = F.batch_norm(x, *want_stats, training=True, momentum=momentum, eps=eps)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(stats, want_stats)
    ours, theirs = bnfused.BatchNorm1d(3, backend=backend), torch.nn.BatchNorm1d(3)
    ours.momentum = theirs.momentum = torch.tensor(0.25)
    for layer in (ours, theirs):
        layer(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


# --------------------------------------------------------------------------- the checks' C++ fast path


def _python_checks_pass(x, rm, rv, w, b, training) -> bool:
    """What the C++ args_ok may answer True for: the Python checks pass, x has elements and needs no
    new layout, and weight and bias need no reshaping."""
    from bnfused import functional, layout

    try:
        shape = functional.check_arguments(x, rm, rv, w, b)
        functional._check_mode(x, shape, rm, rv, training)
    except Exception:
        return False
    return x.numel() > 0 and layout.kernel_ready(x) is x and all(t is None or t.dim() == 1 for t in (w, b))


def _argument_cases():
    """Valid calls and every way of being off by one thing: dtypes, ranks, sizes, devices, grads,
    missing stats, subclasses, empty inputs, one value per channel."""
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    base = {"x": (8, C, 5, 5), "xd": f32, "pd": f32, "stats": True, "w": True, "b": True, "training": True}
    variants = [
        {}, {"training": False}, {"stats": False}, {"stats": False, "training": False},
        {"x": (8, C)}, {"x": (8, C, 7)}, {"x": (2, C, 2, 3, 4)}, {"w": False}, {"b": False}, {"w": False, "b": False},
        {"xd": bf16}, {"xd": bf16, "pd": bf16}, {"xd": torch.float16}, {"xd": f64, "pd": f64}, {"xd": f64},
        {"pd": bf16}, {"xd": torch.int32}, {"x": (C,)}, {"x": (0, C, 2)}, {"x": (1, C)},
        {"x": (1, C), "training": False},
        {"x": (1, C, 1, 1)}, {"only_mean": True}, {"only_var": True}, {"stat_size": C + 1}, {"w_size": C - 1},
        {"w_shape": (1, C)}, {"b_shape": (C, 1)}, {"stat_shape": (1, C)}, {"stat_grad": True}, {"var_dtype": f64},
        {"w_dtype": f64}, {"b_dtype": f64}, {"meta_stat": True}, {"meta_x": True}, {"subclass": True},
        {"param": True}, {"not_tensor": True}, {"training_int": True}, {"sparse": True},
        {"layout": "channels_last"}, {"layout": "sliced"}, {"layout": "transposed"},
        {"x": (8, C, 1, 1), "layout": "channels_last"}, {"x": (8, 1, 5, 5), "layout": "channels_last"},
    ]  # fmt: skip
    for v in variants:
        case = {**base, **v}
        shape = case["x"]
        x = torch.randn(shape).to(case["xd"]) if case["xd"].is_floating_point else torch.ones(shape, dtype=case["xd"])
        if case.get("layout") == "channels_last":  # on (8, C, 1, 1) or one channel: size-1 dims' strides
            x = x.contiguous(memory_format=torch.channels_last)
        elif case.get("layout") == "sliced":
            x = x[:, :, ::2]
        elif case.get("layout") == "transposed":
            x = x.transpose(2, 3)
        if case.get("meta_x"):
            x = x.to("meta")
        if case.get("subclass"):
            x = x.as_subclass(_TensorSubclass)
        if case.get("sparse"):
            x = x.to_sparse()
        pd = case["pd"]
        rm = torch.zeros(case.get("stat_size", C), dtype=pd).reshape(case.get("stat_shape", (-1,)))
        rv = torch.ones(C, dtype=case.get("var_dtype", pd))
        if case.get("stat_grad"):
            rm.requires_grad_()
        if case.get("meta_stat"):
            rv = rv.to("meta")
        if not case["stats"]:
            rm = rv = None
        if case.get("only_mean"):
            rv = None
        if case.get("only_var"):
            rm = None
        w = torch.rand(case.get("w_size", C), dtype=case.get("w_dtype", pd)).reshape(case.get("w_shape", (-1,)))
        b = torch.randn(C, dtype=case.get("b_dtype", pd)).reshape(case.get("b_shape", (-1,)))
        if case.get("param"):
            w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
        w = w if case["w"] else None
        b = b if case["b"] else None
        if case.get("not_tensor"):
            w = [1.0] * C
        training = 1 if case.get("training_int") else case["training"]
        yield pytest.param(x, rm, rv, w, b, training, id=repr(v))


class _TensorSubclass(torch.Tensor):
    pass


def _compiled_checks():
    from bnfused.backends import native

    if native.available(torch.device("cpu")) is not None:
        pytest.skip("C++ extension unavailable")
    return native.library().module.args_ok


@pytest.mark.parametrize("x, rm, rv, w, b, training", list(_argument_cases()))
def test_compiled_checks_pass_only_what_the_python_checks_pass(x, rm, rv, w, b, training):
    """args_ok (csrc/bnfused.cpp) lets a call skip the Python checks: it must never pass a call the
    Python checks refuse or would adapt."""
    args_ok = _compiled_checks()
    if args_ok(x, rm, rv, w, b, training):
        assert _python_checks_pass(x, rm, rv, w, b, training)


@pytest.mark.parametrize(
    "shape, x_dtype, param_dtype, stats, training",
    [
        ((64, 120), torch.float32, torch.float32, True, False),
        ((64, 120), torch.float32, torch.float32, True, True),
        ((8, C, 5, 5), torch.bfloat16, torch.float32, True, True),
        ((8, C, 5, 5), torch.float16, torch.float16, True, False),
        ((8, C, 5, 5), torch.float64, torch.float64, False, True),
    ],
)
def test_compiled_checks_pass_the_common_calls(shape, x_dtype, param_dtype, stats, training):
    """The fast path is taken by what modules pass (else it would be dead code that only costs)."""
    args_ok = _compiled_checks()
    x = torch.randn(shape).to(x_dtype)
    m = bnfused.BatchNorm1d(shape[1], track_running_stats=stats).to(param_dtype)
    args = (x, m.running_mean, m.running_var, m.weight, m.bias, training)
    assert args_ok(*args) and _python_checks_pass(*args)


def test_functional_uses_the_compiled_checks_once_the_extension_loads():
    from bnfused import functional

    assert functional._compiled_checks is _compiled_checks()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_sparse_and_mkldnn_inputs_get_torchs_batch_norm(backend):
    """Tensors of other layouts are torch's business: its result, or its exception type."""
    x = torch.randn(8, C)
    rm, rv = _stats()
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    with pytest.raises(Exception) as expected:
        F.batch_norm(x.to_sparse(), rm.clone(), rv.clone(), w, b, True)
    with pytest.raises(expected.type):
        batch_norm(x.to_sparse(), rm.clone(), rv.clone(), w, b, True, backend=backend)
    if torch.backends.mkldnn.is_available():
        x4 = torch.randn(4, C, 5, 5)
        want = F.batch_norm(x4.to_mkldnn(), rm, rv, w, b, False).to_dense()
        got = batch_norm(x4.to_mkldnn(), rm, rv, w, b, False, backend=backend).to_dense()
        torch.testing.assert_close(got, want)


def test_compiled_checks_refuse_running_stats_sharing_memory_in_training():
    """Running stats that share memory with another argument take the Python path (torch's ops give
    torch's result there); in eval the stats are only read, so sharing is harmless."""
    args_ok = _compiled_checks()
    x = torch.randn(8, C)
    buf = torch.rand(4 * C) + 0.5
    rm, rv, w, b = buf[:C], buf[C : 2 * C], buf[2 * C : 3 * C], buf[3 * C :]
    assert not args_ok(x, rm, rv, w, b, True)
    assert args_ok(x, rm, rv, w, b, False)
    assert not args_ok(x, x[0], torch.ones(C), None, None, True)
    assert args_ok(x, torch.zeros(C), torch.ones(C), torch.ones(C), None, True)
