"""Backend selection: explicit names, the global default, the environment variable and "auto"."""

import os
import subprocess
import sys

import pytest
import torch

import bnfused
from bnfused import backends

CPU = torch.device("cpu")


@pytest.fixture
def restore_default():
    saved = backends.get_backend()
    yield
    backends.set_backend(saved)


def test_reference_is_always_available():
    assert bnfused.availability(CPU)["reference"] is None
    assert backends.resolve("reference", CPU) == "reference"


def test_availability_takes_a_device_as_torch_does():
    assert bnfused.availability("cpu") == bnfused.availability(CPU)
    with pytest.raises(RuntimeError, match="device string"):
        bnfused.availability("cpux")


def test_availability_names_a_cuda_index_past_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    reasons = bnfused.availability("cuda:7")
    assert set(reasons) == set(backends._MODULES)
    for reason in reasons.values():
        assert reason == "cuda:7 does not exist: torch sees 2 CUDA device(s)"
    monkeypatch.setattr(backends, "_resolved", {})
    with pytest.raises(bnfused.BackendUnavailableError, match="no backend can run on cuda:7: 'triton'"):
        backends.resolve("auto", torch.device("cuda", 7))


def test_auto_resolves_to_an_available_backend():
    assert bnfused.availability(CPU)[backends.resolve("auto", CPU)] is None


def test_unknown_backend_name_is_rejected(restore_default):
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        bnfused.set_backend("fastest")
    for make in (bnfused.BatchNorm1d, bnfused.LazyBatchNorm2d, bnfused.SyncBatchNorm):  # at construction
        with pytest.raises(ValueError, match="unknown backend 'fastest'"):
            make(3, backend="fastest") if make is not bnfused.LazyBatchNorm2d else make(backend="fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        bnfused.functional.batch_norm(torch.randn(4, 3), None, None, training=True, backend="fastest")
    layer = bnfused.BatchNorm1d(3, backend=" CPP ")  # case and spaces aside, kept as the backends know it
    assert layer.backend == "cpp" and layer(torch.randn(4, 3)).shape == (4, 3)
    assert backends._asks_auto(" Auto ") and not backends._asks_auto(" cpp ")
    assert backends.check_request(" Auto ") == "auto" and backends.check_request(None) is None
    # The functional checks the name itself: an empty batch, vmap and compiled calls resolve none.
    for name in ("fastest", ""):
        with pytest.raises(ValueError, match=f"unknown backend {name!r}"):
            bnfused.functional.batch_norm(torch.randn(0, 3), None, None, training=True, backend=name)
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        torch.func.vmap(lambda x: bnfused.functional.batch_norm(x, None, None, training=True, backend="fastest"))(
            torch.randn(2, 4, 3)
        )
    with pytest.raises(TypeError, match="named by a string, got int"):
        bnfused.BatchNorm1d(3, backend=5)


def test_explicit_backend_that_cannot_run_raises_its_reason(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "cpp", "bnfused.backends.no_such_module")
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_resolved", {})
    with pytest.raises(bnfused.BackendUnavailableError, match="'cpp' is unavailable for cpu tensors.*no_such_module"):
        bnfused.batch_norm(torch.randn(4, 3), None, None, training=True, backend="cpp")


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "cpp", "bnfused.backends.no_such_module")
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("cpp", "reference"))
    with pytest.warns(RuntimeWarning, match="using backend 'reference'.*'cpp' is unavailable.*no_such_module"):
        backends.resolve("auto", CPU)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second resolution is cached: no second warning
        assert backends.resolve("auto", CPU) == "reference"


def test_fallback_warning_points_at_the_users_call(monkeypatch):
    """The warning names the line that called the layer, not a line inside bnfused or torch."""
    monkeypatch.setitem(backends._MODULES, "cpp", "bnfused.backends.no_such_module")
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("cpp", "reference"))
    layer = bnfused.BatchNorm1d(3, backend="auto")
    with pytest.warns(RuntimeWarning, match="using backend 'reference'") as record:
        layer(torch.randn(4, 3))
    assert record[0].filename == __file__
    # A converted model runs torch.fx's generated forward, whose code has no file of its own.
    monkeypatch.setattr(backends, "_resolved", {})
    model = bnfused.convert_model(torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.ReLU()), fuse=True)
    with pytest.warns(RuntimeWarning, match="using backend 'reference'") as record:
        model(torch.randn(4, 3))
    assert record[0].filename == __file__


def test_set_backend_is_the_default_for_modules(restore_default, monkeypatch):
    calls = []
    reference = backends.module("reference")
    original = reference.forward_train

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(reference, "forward_train", spy)
    bnfused.set_backend("reference")
    assert bnfused.get_backend() == "reference"
    bnfused.BatchNorm1d(3)(torch.randn(4, 3))
    assert calls == [1]


def test_environment_variable_sets_the_default():
    code = "import bnfused; print(bnfused.get_backend())"
    env = dict(os.environ, BNFUSED_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_unknown_backend_in_the_environment_fails_the_import_naming_the_variable():
    """A typo in BNFUSED_BACKEND fails at import, as BNFUSED_COMPILE does: compiled, scripted and
    torch.func calls run torch's ops and never resolve a backend, so a later check would miss them."""
    env = dict(os.environ, BNFUSED_BACKEND="refrence")
    bad = subprocess.run([sys.executable, "-c", "import bnfused"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "BNFUSED_BACKEND must be one of auto, reference" in bad.stderr and "'refrence'" in bad.stderr
    env["BNFUSED_BACKEND"] = " Reference "  # case and spaces are forgiven, there as in set_backend
    code = "import bnfused; print(bnfused.get_backend()); bnfused.set_backend(' CPP '); print(bnfused.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "cpp"]


def test_python_m_bnfused_reports_backends():
    out = subprocess.run([sys.executable, "-m", "bnfused"], capture_output=True, text=True, check=True, timeout=600)
    assert "torch" in out.stdout and "reference" in out.stdout and "available" in out.stdout
    assert "auto ->" in out.stdout


def test_eager_calls_use_a_backends_whole_layer_op(monkeypatch):
    """A backend that offers ``batch_norm`` (a layer with its own autograd) gets eager calls whole."""
    reference = backends.module("reference")
    calls = []

    def layer(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope):
        calls.append((training, momentum, eps, act, slope))
        return x * 2

    monkeypatch.setattr(reference, "batch_norm", layer, raising=False)
    x = torch.randn(4, 3)
    y = bnfused.batch_norm(x, None, None, training=True, momentum=0.3, eps=1e-3, activation="relu", backend="reference")
    torch.testing.assert_close(y, x * 2)
    assert calls == [(True, 0.3, 1e-3, 1, 0.0)]


def test_compiled_calls_bypass_the_layer_op(monkeypatch):
    """Under torch.compile the layer op is not traceable: the library ops are used instead."""
    reference = backends.module("reference")
    monkeypatch.setattr(reference, "batch_norm", lambda *a: pytest.fail("layer op used while compiling"), raising=False)
    torch._dynamo.reset()
    f = torch.compile(lambda x: bnfused.batch_norm(x, None, None, training=True, backend="reference"), fullgraph=True)
    x = torch.randn(6, 3)
    torch.testing.assert_close(f(x), torch.nn.functional.batch_norm(x, None, None, training=True))


# --------------------------------------------------------------------------- "auto" on CUDA: torch where it is faster

BIG = (256, 64, 112, 112)  # ResNet-50's first BatchNorm at batch 256: long planes, 205.5M values
SHORT = (512, 1024, 14, 14)  # short planes, 102.8M values


@pytest.mark.parametrize(
    "name, shape, dtype, channels_last, training, backward, torch_faster",
    [
        ("triton", BIG, torch.float32, False, True, True, False),
        ("triton", BIG, torch.bfloat16, False, True, True, False),
        ("triton", SHORT, torch.float32, False, True, True, True),
        ("triton", (256, 512, 28, 28), torch.float32, False, True, True, True),
        ("triton", (256, 512, 28, 28), torch.bfloat16, False, True, True, False),
        ("triton", (256, 256, 56, 56), torch.float32, False, True, True, False),
        ("triton", (256, 256, 56, 56), torch.float32, False, True, False, True),  # forward alone: 1.08
        ("triton", BIG, torch.float32, False, True, False, False),
        ("triton", BIG, torch.float32, True, True, True, True),
        ("triton", BIG, torch.float32, True, False, False, False),
        ("triton", (256, 512, 28, 28), torch.float32, True, False, False, True),
        ("triton", (256, 512, 28, 28), torch.float32, False, False, False, False),
        ("triton", BIG, torch.float64, False, True, True, True),
        ("triton", (40000, 4096), torch.float32, False, True, True, True),
        ("triton", (128, 64, 112, 112), torch.float32, False, True, True, False),  # 102.8M values
        ("triton", (64, 64, 112, 112), torch.float32, False, True, True, True),  # 51.4M: below any win
        ("cuda", BIG, torch.float32, False, True, True, False),
        ("cuda", (256, 256, 56, 56), torch.float32, False, True, True, True),
        ("cuda", (256, 256, 56, 56), torch.bfloat16, False, True, True, False),
        ("cuda", (256, 256, 56, 56), torch.bfloat16, False, True, False, True),
        ("cuda", BIG, torch.float32, False, False, False, True),
    ],
)
def test_auto_policy_follows_the_measured_regimes(name, shape, dtype, channels_last, training, backward, torch_faster):
    """Meta tensors: the policy reads shapes and strides only."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert backends.auto_policy.torch_is_faster(name, x, training, backward) is torch_faster


def test_only_auto_defers_to_torch(restore_default):
    short = torch.empty(SHORT, device="meta")
    assert backends.defers_to_torch("auto", "triton", short, True, True)
    assert backends.defers_to_torch("AUTO", "triton", short, True, True)
    assert backends.defers_to_torch(None, "triton", short, True, True)
    assert not backends.defers_to_torch("triton", "triton", short, True, True)
    assert "cpp" not in backends.DEFERS_WHEN_AUTO and "reference" not in backends.DEFERS_WHEN_AUTO
    backends.set_backend("triton")
    assert not backends.defers_to_torch(None, "triton", short, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_auto_on_cuda_runs_torchs_batch_norm_where_it_is_faster(training, monkeypatch):
    """CPU twins: the two tests above. A deferred layer gives torch's output bit for bit; a layer in a
    regime the kernels win runs them."""
    triton = backends.module("triton")
    monkeypatch.setattr(triton, "batch_norm", lambda *a: pytest.fail("kernels ran on a deferred call"), raising=False)
    monkeypatch.setattr(triton, "forward_train", lambda *a: pytest.fail("kernels ran on a deferred call"))
    monkeypatch.setattr(triton, "forward_eval", lambda *a: pytest.fail("kernels ran on a deferred call"))
    ours, theirs = bnfused.BatchNorm2d(16).cuda().train(training), torch.nn.BatchNorm2d(16).cuda().train(training)
    x = torch.randn(8, 16, 14, 14, device="cuda").to(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=0)
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(a) or pytest.fail("deferred"))
    x = torch.randn(1, 1, 10240, 10240, device="cuda")  # 105M values on one long plane
    y = bnfused.BatchNorm2d(1).cuda().train(training)(x)
    assert not calls and y.shape == x.shape


@pytest.mark.parametrize("activation", [None, "hardswish"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(
    "mode", ["train", "eval", "no-stats-train", "no-stats-eval", "untracked-later", "cumulative", "frozen"]
)
def test_a_deferred_call_is_torchs_batch_norm(mode, with_residual, activation):
    """CPU twin of the deferred half of the GPU test above: the forward a deferred call runs gives
    torch's output, running stats, step count and gradients bit for bit, in every mode."""
    torch.manual_seed(0)
    kwargs = {"track_running_stats": not mode.startswith("no-stats"), "momentum": None if mode == "cumulative" else 0.1}
    ours = bnfused.BatchNorm2d(3, activation=activation, **kwargs)
    theirs = torch.nn.BatchNorm2d(3, **kwargs)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    for layer in (ours, theirs):
        layer.train(mode not in ("eval", "no-stats-eval"))
        if mode == "untracked-later":  # running stats kept, no longer updated: torch normalises with the batch's
            layer.track_running_stats = False
        if mode == "frozen":
            layer.requires_grad_(False)
    act = torch.nn.Hardswish() if activation else torch.nn.Identity()
    x = torch.randn(4, 3, 5, 5)
    residual = torch.randn(4, 3, 5, 5) if with_residual else None
    for _ in range(2):  # the second call sees the first's running stats and count
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours = ours._deferred_forward(x_ours, residual)
        y_theirs = theirs(x_theirs)
        y_theirs = act(y_theirs if residual is None else y_theirs + residual)
        assert torch.equal(y_ours, y_theirs)
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
        dy = torch.randn_like(y_ours)
        y_ours.backward(dy)
        y_theirs.backward(dy)
        assert torch.equal(x_ours.grad, x_theirs.grad)
        if mode != "frozen":
            assert torch.equal(ours.weight.grad, theirs.weight.grad) and torch.equal(ours.bias.grad, theirs.bias.grad)


@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-stats", "no-grad-train", "frozen"])
def test_a_module_asks_the_policy_with_its_mode_and_whether_a_backward_follows(mode, monkeypatch):
    """CPU twin of the module half of the GPU test above: what a layer passes to ``defers_to_torch``."""
    asked = []
    monkeypatch.setattr(backends, "resolve", lambda request, device: "triton")
    monkeypatch.setattr(backends, "defers_to_torch", lambda *args: asked.append(args[3:]) or True)
    layer = bnfused.BatchNorm2d(4, track_running_stats=mode != "eval-no-stats").train(
        mode in ("train", "no-grad-train")
    )
    if mode == "frozen":
        layer.requires_grad_(False)
    x = torch.empty(SHORT, device="meta").requires_grad_()  # inside the measured regimes: the mode matters
    if mode == "no-grad-train":
        with torch.no_grad():
            assert layer._defers_to_torch(x, None)
    else:
        assert layer._defers_to_torch(x, None)
    expected = {
        "train": (True, True), "eval": (False, False), "eval-no-stats": (True, True),
        "no-grad-train": (True, False), "frozen": (False, False),
    }[mode]  # fmt: skip
    assert asked == [expected]


@pytest.mark.parametrize(
    "shape, dtype",
    [((64, 16, 8, 8), torch.float32), ((40000, 4096), torch.float32), (BIG, torch.float64), (SHORT, torch.float32)],
)
def test_layers_outside_every_measured_regime_defer_without_working_out_their_mode(shape, dtype, monkeypatch):
    """The policy's answer for any mode, where it has one (small, (N, C), float64), without the mode:
    the same answer as asking with each mode; a layer asks nothing more then."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    outside = backends.auto_policy.outside_measured(x)
    assert outside == (shape != SHORT)
    every_mode = all(
        backends.defers_to_torch("auto", name, x, training, backward)
        for name in backends.DEFERS_WHEN_AUTO
        for training in (True, False)
        for backward in (True, False)
    )
    assert backends.defers_in_every_mode("auto", x) == outside
    assert not outside or every_mode
    assert not backends.defers_in_every_mode("triton", x)
    monkeypatch.setattr(backends, "resolve", lambda request, device: "triton")
    monkeypatch.setattr(backends, "defers_to_torch", lambda *args: pytest.fail("asked with a mode"))
    if outside:
        assert bnfused.BatchNorm2d(shape[1], dtype=dtype)._defers_to_torch(x, None)
