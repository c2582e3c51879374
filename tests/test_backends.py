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


def test_auto_resolves_to_an_available_backend():
    assert bnfused.availability(CPU)[backends.resolve("auto", CPU)] is None


def test_unknown_backend_name_is_rejected(restore_default):
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        bnfused.set_backend("fastest")
    with pytest.raises(ValueError, match="unknown backend"):
        bnfused.BatchNorm1d(3, backend="fastest")(torch.randn(4, 3))


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
