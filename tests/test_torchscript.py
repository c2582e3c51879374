"""TorchScript: ``torch.jit.script`` compiles bnfused layers and the models holding them, as it does
torch's BatchNorm, and a saved scripted model runs without bnfused."""

import copy
import io
import subprocess
import sys

import pytest
import torch
import torchvision

import bnfused

LAYERS = [
    (bnfused.BatchNorm1d, (8, 5)),
    (bnfused.BatchNorm1d, (6, 5, 4)),
    (bnfused.BatchNorm2d, (4, 5, 3, 3)),
    (bnfused.BatchNorm3d, (2, 5, 3, 2, 2)),
    (bnfused.BatchNormReLU2d, (4, 5, 3, 3)),
]
CONFIGS = [
    {},
    {"activation": "relu"},
    {"activation": "leaky_relu", "negative_slope": 0.2},
    {"activation": "ReLU6"},
    {"activation": "hardswish"},
    {"activation": "silu"},
    {"activation": "sigmoid"},
    {"momentum": None},
    {"track_running_stats": False},
    {"affine": False, "eps": 1e-3},
]


# torch >= 2.9 warns that torch.jit is deprecated; it still ships, and models still use it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    return torch.jit.script(module)


def saved_and_loaded(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("cls, shape", LAYERS, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_scripted_layer_matches_eager(cls, shape, config):
    torch.manual_seed(0)
    eager = cls(shape[1], dtype=torch.float64, **config)
    if eager.affine:
        with torch.no_grad():
            eager.weight.uniform_(0.5, 1.5)
            eager.bias.uniform_(-0.5, 0.5)
    scripted = script(copy.deepcopy(eager))
    for training in (True, True, False):  # two steps: the cumulative momentum's count moves
        eager.train(training)
        scripted.train(training)
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
        x_s = x.detach().clone().requires_grad_()
        y, y_s = eager(x), scripted(x_s)
        torch.testing.assert_close(y_s, y, rtol=1e-12, atol=1e-12)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_s.backward(dy)
        torch.testing.assert_close(x_s.grad, x.grad, rtol=1e-10, atol=1e-10)
        assert_same_state(eager, scripted)
    if eager.affine:
        for name, p in eager.named_parameters():
            torch.testing.assert_close(getattr(scripted, name).grad, p.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("training", [True, False])
def test_scripted_layer_adds_the_residual_before_the_activation(activation, training):
    eager = bnfused.BatchNorm2d(4, activation=activation, dtype=torch.float64).train(training)
    scripted = script(copy.deepcopy(eager))
    x, residual = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(scripted(x, residual), eager(x, residual), rtol=1e-12, atol=1e-12)
    assert_same_state(eager, scripted)


def test_scripted_lazy_layer_after_its_first_call():
    lazy = bnfused.LazyBatchNorm2d(activation="relu")
    x = torch.randn(2, 3, 4, 4)
    lazy(x)
    scripted = script(copy.deepcopy(lazy).eval())
    torch.testing.assert_close(scripted(x), lazy.eval()(x))


def test_scripted_layer_refuses_an_activation_it_does_not_know():
    m = bnfused.BatchNorm2d(3)
    m.activation = "tanh"  # set after construction, which checked the name
    with pytest.raises(torch.jit.Error, match="unknown activation tanh"):
        script(m)(torch.randn(2, 3, 4, 4))


def test_scripted_input_checks_are_torchs():
    scripted = script(bnfused.BatchNorm2d(3))
    with pytest.raises(torch.jit.Error, match="expected 4D input"):
        scripted(torch.randn(2, 3, 4))


@pytest.mark.parametrize(
    "name, options", [("resnet18", {"fuse": True}), ("mobilenet_v3_small", {"fuse_relu": True})], ids=str
)
def test_scripted_torchvision_model_matches_eager_and_saves(name, options):
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None, num_classes=5).double()
    model = bnfused.convert_model(original, **options)
    fused = sum(isinstance(m, bnfused.BatchNorm2d) and m.activation is not None for m in model.modules())
    assert fused > 0
    if options.get("fuse"):
        assert sum(getattr(m, "takes_residual", False) for m in model.modules()) > 0
    model.train()
    model(torch.randn(4, 3, 32, 32, dtype=torch.float64) * 2 + 1)  # running stats away from (0, 1)
    scripted = script(copy.deepcopy(model))
    loaded = saved_and_loaded(scripted)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.eval()
    for m in (scripted, loaded):
        torch.testing.assert_close(m.eval()(x), model(x), rtol=1e-10, atol=1e-10)
    if name == "resnet18":  # MobileNetV3's classifier has dropout: training outputs are random
        model.train()
        y = model(x)
        for m in (scripted, loaded):
            torch.testing.assert_close(m.train()(x), y, rtol=1e-10, atol=1e-10)
            assert_same_state(model, m)


_LOAD_WITHOUT_BNFUSED = """
import sys, torch
sys.modules["bnfused"] = None  # any import of bnfused fails
model = torch.jit.load(sys.argv[1]).eval()
x = torch.load(sys.argv[2])
torch.save(model(x), sys.argv[3])
"""


def test_saved_scripted_model_runs_without_bnfused(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), bnfused.BatchNorm2d(4, activation="hardswish"), torch.nn.Flatten()
    )
    model(torch.randn(4, 3, 6, 6))
    model.eval()
    torch.jit.save(script(model), tmp_path / "model.pt")
    x = torch.randn(2, 3, 6, 6)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_BNFUSED, *(str(tmp_path / f) for f in ("model.pt", "x.pt", "y.pt"))],
        check=True,
        timeout=300,
    )
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x))


class _AddsASize(torch.nn.Module):
    def __init__(self, size_of: str):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(4)
        self.size_of = size_of

    def forward(self, x):
        if self.size_of == "size":
            number = x.size(0)
        elif self.size_of == "shape":
            number = x.shape[-1]
        elif self.size_of == "dim":
            number = x.dim()
        elif self.size_of == "len":
            number = len(x)
        else:
            number = x.numel()
        return torch.nn.functional.relu(self.bn(x) + number)


@pytest.mark.parametrize("size_of", ["size", "shape", "dim", "len", "numel"])
def test_a_number_added_after_the_layer_stays_unfused_and_scripts(size_of):
    # The fusion pass leaves a number's add alone: a scripted layer takes a tensor residual only.
    model = bnfused.convert_model(_AddsASize(size_of).double(), fuse=True)
    assert isinstance(model.bn, bnfused.BatchNorm2d) and not model.bn.takes_residual
    scripted = script(copy.deepcopy(model))
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_numpy_slope_scripts():
    np = pytest.importorskip("numpy")
    eager = bnfused.BatchNorm2d(4, activation="leaky_relu", negative_slope=np.float32(0.25))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(script(copy.deepcopy(eager))(x), eager(x))


def test_sync_batch_norm_refuses_to_script_with_a_way_out():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnfused.SyncBatchNorm(4))
    with pytest.raises(RuntimeError, match="SyncBatchNorm cannot be scripted.*bnfused.BatchNorm1d/2d/3d"):
        script(model)
