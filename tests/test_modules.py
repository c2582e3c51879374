"""The drop-in modules: torch's constructor, state_dict and behaviour, plus the fused activation."""

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn

import bnfused

PAIRS = [
    (nn.BatchNorm1d, bnfused.BatchNorm1d, (8, 5)),
    (nn.BatchNorm1d, bnfused.BatchNorm1d, (8, 5, 6)),
    (nn.BatchNorm2d, bnfused.BatchNorm2d, (4, 5, 6, 3)),
    (nn.BatchNorm3d, bnfused.BatchNorm3d, (2, 5, 3, 4, 2)),
]
LAZY = [
    (nn.LazyBatchNorm1d, bnfused.LazyBatchNorm1d, bnfused.BatchNorm1d, (8, 5)),
    (nn.LazyBatchNorm2d, bnfused.LazyBatchNorm2d, bnfused.BatchNorm2d, (4, 5, 6, 3)),
    (nn.LazyBatchNorm3d, bnfused.LazyBatchNorm3d, bnfused.BatchNorm3d, (2, 5, 3, 4, 2)),
]


def _torch_parameters(cls):
    return list(inspect.signature(cls.__init__).parameters.values())


@pytest.mark.parametrize("torch_cls, cls", [(t, f) for t, f, _ in PAIRS] + [(t, f) for t, f, _, _ in LAZY])
def test_constructor_accepts_torch_arguments(torch_cls, cls):
    # Every argument of the installed torch's constructor, by name and position.
    for p in _torch_parameters(torch_cls)[1:]:
        assert p.name in {"num_features", "eps", "momentum", "affine", "track_running_stats", "device", "dtype", "bias"}
    positional = (5, 1e-3, 0.2, True, False) if "num_features" in inspect.signature(torch_cls).parameters else (
        1e-3, 0.2, True, False)  # fmt: skip
    a, b = torch_cls(*positional), cls(*positional)
    assert (a.eps, a.momentum, a.affine, a.track_running_stats) == (b.eps, b.momentum, b.affine, b.track_running_stats)
    assert isinstance(b, torch_cls)


@pytest.mark.parametrize("torch_cls, cls, shape", PAIRS, ids=str)
def test_parameters_buffers_and_state_dict_keys_match(torch_cls, cls, shape):
    a, b = torch_cls(shape[1]), cls(shape[1])
    assert list(a.state_dict()) == list(b.state_dict())
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
    assert a.state_dict()._metadata[""]["version"] == b.state_dict()._metadata[""]["version"]


@pytest.mark.parametrize("torch_cls, cls, shape", PAIRS, ids=str)
def test_checkpoint_round_trip_both_ways(torch_cls, cls, shape):
    src = torch_cls(shape[1])
    src.train()
    for _ in range(3):  # non-trivial running stats and parameters
        src(torch.randn(shape) * 2 + 1)
    with torch.no_grad():
        src.weight.uniform_(0.5, 1.5)
        src.bias.uniform_(-1, 1)
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    dst = cls(shape[1])
    dst.load_state_dict(torch.load(buffer))
    back = torch_cls(shape[1])
    back.load_state_dict(dst.state_dict())
    x = torch.randn(shape)
    for m in (src, dst, back):
        m.eval()
    torch.testing.assert_close(dst(x), src(x))
    torch.testing.assert_close(back(x), src(x))
    assert dst.num_batches_tracked.item() == 3


def test_old_checkpoint_without_num_batches_tracked_loads():
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    m = bnfused.BatchNorm2d(3)
    m.load_state_dict(state)  # torch's versioned loader fills num_batches_tracked in
    assert m.num_batches_tracked.item() == 0


@pytest.mark.parametrize("torch_cls, cls, shape", PAIRS, ids=str)
def test_wrong_input_dimension_raises_torchs_error(torch_cls, cls, shape):
    bad = torch.randn(*shape, 2, 2) if len(shape) == 2 else torch.randn(*shape, 2)
    with pytest.raises(ValueError) as theirs:
        torch_cls(shape[1])(bad)
    with pytest.raises(ValueError) as ours:
        cls(shape[1])(bad)
    assert str(ours.value) == str(theirs.value)


def test_wrong_channel_count_raises():
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 5"):
        bnfused.BatchNorm2d(5)(torch.randn(2, 4, 3, 3))


def test_one_value_per_channel_in_training_raises_but_eval_works():
    m = bnfused.BatchNorm1d(4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 4))
    m.eval()
    assert m(torch.randn(1, 4)).shape == (1, 4)


@pytest.mark.parametrize(
    "flags",
    [dict(momentum=None), dict(track_running_stats=False), dict(affine=False), dict(affine=True, bias=False)],
    ids=str,
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_behaviour_flags_follow_torch(flags, mode):
    if "bias" in flags and "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters:
        pytest.skip("this torch has no bias= argument")  # torch < 2.10
    a, b = nn.BatchNorm2d(3, **flags), bnfused.BatchNorm2d(3, **flags)
    b.load_state_dict(a.state_dict())
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        if mode == "eval" and step == 1:
            a.eval()
            b.eval()
        torch.testing.assert_close(b(x), a(x))
        for name, buf in a.named_buffers():
            torch.testing.assert_close(dict(b.named_buffers())[name], buf)


def test_eval_without_running_stats_uses_batch_statistics():
    a, b = nn.BatchNorm2d(3, track_running_stats=False).eval(), bnfused.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 5, 5) + 3
    torch.testing.assert_close(b(x), a(x))
    assert b.running_mean is None


@pytest.mark.parametrize("torch_lazy, lazy, final, shape", LAZY, ids=str)
def test_lazy_modules_infer_features_and_become_bnfused(torch_lazy, lazy, final, shape):
    a, b = torch_lazy(), lazy(activation="relu")
    x = torch.randn(shape)
    torch.testing.assert_close(b(x), torch.relu(a(x)))
    assert type(b) is final and b.num_features == shape[1] and b.activation == "relu"
    assert list(a.state_dict()) == list(b.state_dict())


def test_batchnorm_relu_sugar_and_repr():
    m = bnfused.BatchNormReLU2d(4)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m(x), torch.relu(nn.BatchNorm2d(4)(x)))
    assert "activation='relu'" in repr(m)
    assert "negative_slope=0.2" in repr(bnfused.BatchNorm1d(3, activation="leaky_relu", negative_slope=0.2))
    with pytest.raises(ValueError, match="activation must be"):
        bnfused.BatchNorm2d(4, activation="tanh")


def test_modules_pickle_and_deepcopy():
    m = bnfused.BatchNorm2d(3, activation="relu")
    m(torch.randn(2, 3, 4, 4))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is bnfused.BatchNorm2d and clone.activation == "relu"
        torch.testing.assert_close(clone.running_mean, m.running_mean)


def test_module_dtype_and_device_arguments():
    m = bnfused.BatchNorm1d(3, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64
    assert m(torch.randn(4, 3, dtype=torch.float64)).dtype == torch.float64


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def _reassign_running_stats(m):
    m.running_mean = torch.full((3,), 0.5)
    m.running_var = torch.full((3,), 2.0)


def _reassign_weight(m):
    m.weight = nn.Parameter(torch.linspace(0.5, 1.5, 3))


def _parametrize_weight(m):
    nn.utils.parametrize.register_parametrization(m, "weight", _Doubled())


def _to_double_and_back(m):
    m.double().float()  # _apply replaces the buffer tensors in the module's dicts, not through setattr


CHANGES = [_reassign_running_stats, _reassign_weight, _parametrize_weight, _to_double_and_back]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_reads_the_tensors_the_module_holds_now(change, mode):
    # The forward reads weight, bias and the running stats where nn.Module keeps them; whatever a user
    # or torch did to the module since (a reassignment, a parametrization, a dtype round trip), the
    # forward must see what torch's forward sees.
    a, b = nn.BatchNorm2d(3), bnfused.BatchNorm2d(3)
    for m in (a, b):
        change(m)
        m.train(mode == "train")
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(yb, ya)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    for (name, want), (_, got) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(got, want, msg=name)


def test_functional_call_substitutes_parameters_and_buffers():
    a, b = nn.BatchNorm2d(3), bnfused.BatchNorm2d(3)
    tensors = {
        "weight": torch.rand(3) + 0.5, "bias": torch.randn(3), "running_mean": torch.randn(3),
        "running_var": torch.rand(3) + 0.5, "num_batches_tracked": torch.tensor(4),
    }  # fmt: skip
    x = torch.randn(4, 3, 5, 5)
    for training in (True, False):
        a.train(training)
        b.train(training)
        ta = {k: v.clone() for k, v in tensors.items()}
        tb = {k: v.clone() for k, v in tensors.items()}
        ya = torch.func.functional_call(a, ta, (x,))
        yb = torch.func.functional_call(b, tb, (x,))
        torch.testing.assert_close(yb, ya)
        for k in tensors:
            torch.testing.assert_close(tb[k], ta[k], msg=k)  # running stats and the count updated in place
        assert b.num_batches_tracked.item() == 0 and b.running_mean.abs().sum() == 0  # the module's own untouched


def _delete(name):
    def change(m):
        delattr(m, name)

    change.__name__ = f"del_{name}"
    return change


def _shadow_running_var(m):
    object.__setattr__(m, "running_var", torch.full((3,), 4.0))  # an instance attribute answers first


def _doubled_weight_class(m):
    class Doubled(type(m)):
        def __getattr__(self, name):
            if name == "weight":
                return self._parameters["weight"] * 2
            return super().__getattr__(name)

    m.__class__ = Doubled


@pytest.mark.parametrize(
    "flags, mode, change",
    [
        ({}, "eval", _delete("num_batches_tracked")),  # read only when training
        ({"momentum": None}, "eval", _delete("num_batches_tracked")),
        ({"track_running_stats": False}, "train", _delete("running_mean")),  # not read at all
        ({"track_running_stats": False}, "train", _delete("running_var")),
        ({}, "eval", _shadow_running_var),
        ({}, "train", _doubled_weight_class),
        ({}, "eval", _doubled_weight_class),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_forward_reads_names_as_torchs_forward_does(flags, mode, change):
    # Whatever nn.Module's attribute lookup would find, or not need, the forward finds or skips too.
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    a, b = nn.BatchNorm2d(3, **flags), bnfused.BatchNorm2d(3, **flags)
    outputs = []
    for m in (a, b):
        m.train(mode == "train")
        change(m)
        outputs.append(m(x))
    torch.testing.assert_close(outputs[1], outputs[0])


def test_missing_count_in_training_raises_as_torch_does():
    for cls in (nn.BatchNorm2d, bnfused.BatchNorm2d):
        m = cls(3)
        del m.num_batches_tracked
        with pytest.raises(AttributeError, match="num_batches_tracked"):
            m(torch.randn(4, 3, 5, 5))


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_a_failing_training_call_counts_its_step_as_torchs_does(name):
    # torch counts the step before it reads the tensors; a missing one then raises.
    counts = []
    for cls in (nn.BatchNorm2d, bnfused.BatchNorm2d):
        m = cls(3)
        delattr(m, name)
        with pytest.raises(AttributeError):
            m(torch.randn(4, 3, 5, 5))
        counts.append(int(m.num_batches_tracked))
    assert counts[1] == counts[0] == 1


def test_classes_made_on_the_fly_are_not_kept_alive():
    # parametrize makes a class per module; what the forward remembers of a class must not hold it.
    import gc
    import weakref

    m = bnfused.BatchNorm2d(3)
    nn.utils.parametrize.register_parametrization(m, "weight", _Doubled())
    m(torch.randn(4, 3, 5, 5))
    cls = weakref.ref(type(m))
    del m
    gc.collect()
    assert cls() is None


def test_a_class_that_takes_no_attributes_still_runs():
    class Frozen(type):
        def __setattr__(cls, name, value):
            raise TypeError(f"{cls.__name__} is frozen")

    class FrozenBatchNorm(bnfused.BatchNorm2d, metaclass=Frozen):
        pass

    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(FrozenBatchNorm(3)(x), nn.BatchNorm2d(3)(x))


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_matches_torch(autocast_dtype, input_dtype, mode):
    """Under CPU autocast BatchNorm runs in its input's dtype (float32 parameters), as torch's does: a
    float32 input (the model's first layer) stays float32, a conv's low-precision output stays low."""
    torch.manual_seed(0)
    torch_bn = nn.BatchNorm2d(4).train(mode == "train")
    ours = bnfused.BatchNorm2d(4, activation="relu").train(mode == "train")
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5)
        torch_bn.bias.uniform_(-0.5, 0.5)
        torch_bn.running_mean.uniform_(-1, 1)
    ours.load_state_dict(torch_bn.state_dict())
    x = (torch.randn(3, 4, 5, 5) * 2 + 1).to(input_dtype)
    x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype):
        y_t, y_o = torch.relu(torch_bn(x_t)), ours(x_o)
    assert y_o.dtype == y_t.dtype == input_dtype
    torch.testing.assert_close(y_o, y_t)
    dy = torch.randn(y_t.shape).to(y_t.dtype)
    y_t.backward(dy)
    y_o.backward(dy)
    assert x_o.grad.dtype == x_t.grad.dtype
    torch.testing.assert_close(x_o.grad, x_t.grad)
    torch.testing.assert_close(ours.weight.grad, torch_bn.weight.grad)
    torch.testing.assert_close(ours.running_mean, torch_bn.running_mean)
    torch.testing.assert_close(ours.running_var, torch_bn.running_var)
