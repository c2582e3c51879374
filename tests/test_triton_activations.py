"""The Triton kernels' fused activations (all six codes) and residual add, against torch ops in float64.

The oracle is F.batch_norm on the kernels' own input values converted to float64, plus the residual,
then the torch activation (``bnfused.activation.apply``), differentiated by autograd: y, the running
stats, dx, dweight, dbias and dresidual are all compared with it. float32 results must sit within
float32's tolerance of it; float16 and bfloat16 results within twice the error of torch's own layer
run in that dtype (plus a small atol), as in test_triton's low-precision rule.

Runs under TRITON_INTERPRET=1 on the CPU (conftest), so shapes stay small.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, make_input
from test_triton import LAYOUTS as TRITON_LAYOUTS

from bnfused import activation
from bnfused.backends import reference
from bnfused.backends import triton as triton_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CODES = sorted(activation.NAMES)
FROM_OUTPUT = [c for c in CODES if c != activation.NONE and not activation.grad_from_input(c)]  # act' off y
MOMENTUM, EPS = 0.1, 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # tl.where evaluates both

LAYOUTS = TRITON_LAYOUTS[:5]  # the 5-d ones index as the 4-d ones do


@pytest.fixture(autouse=True)
def _default_device():
    with torch.device(DEVICE):
        yield


def _code_id(code):
    return str(activation.NAMES[code])


def _slope(code):
    return 0.1 if code == activation.LEAKY_RELU else 0.0


class Case(NamedTuple):
    x: torch.Tensor
    dy: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor


def _case(shape, dtype, channels_last, with_residual) -> Case:
    c = shape[1]
    x = make_input(shape, dtype, channels_last)
    dy = make_input(shape, dtype, channels_last, offset=0.0, scale=1.0)
    # Centred near zero, so that z crosses every activation's bends.
    residual = make_input(shape, dtype, channels_last, offset=0.0, scale=1.5) if with_residual else None
    weight, bias = torch.rand(c) + 0.5, torch.randn(c) * 2
    return Case(x, dy, residual, weight, bias, torch.linspace(-1.0, 2.0, c), torch.linspace(0.5, 4.0, c))


def _run_triton(case: Case, code, training, needs=(True, True, True), needs_residual=None):
    """(y, running_mean, running_var, dx, dweight, dbias, dresidual) from the triton backend's functions."""
    slope = _slope(code)
    rm, rv = case.running_mean.clone(), case.running_var.clone()
    if training:
        y, mean, invstd = triton_backend.forward_train(
            case.x, case.weight, case.bias, rm, rv, MOMENTUM, EPS, code, slope, case.residual
        )
    else:
        y = triton_backend.forward_eval(case.x, case.weight, case.bias, rm, rv, EPS, code, slope, case.residual)
        mean, invstd = reference.eval_stats(rm, rv, EPS, case.x.dtype)
    if needs_residual is None:
        needs_residual = case.residual is not None
    grads = triton_backend.backward(
        case.dy, case.x, y if code in FROM_OUTPUT else None, case.weight, mean, invstd, code, slope, training,
        *needs, case.bias, case.residual, needs_residual,
    )  # fmt: skip
    assert len(grads) == 4
    return (y, rm, rv, *grads)


def _run_torch(case: Case, code, training, dtype):
    """The same results from torch ops on x and residual in ``dtype``, by autograd. Parameters and
    running stats are float64 for float64, else float32 (torch's mixed-precision batch_norm)."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [case.x.to(dtype), case.weight.to(param_dtype), case.bias.to(param_dtype)]
    if case.residual is not None:
        leaves.append(case.residual.to(dtype))
    leaves = [t.detach().requires_grad_() for t in leaves]
    rm, rv = (t.to(param_dtype, copy=True) for t in (case.running_mean, case.running_var))
    z = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, MOMENTUM, EPS)
    if case.residual is not None:
        z = z + leaves[3]
    y = activation.apply(z, code, _slope(code))
    y.backward(case.dy.to(dtype))
    grads = [t.grad for t in leaves] + ([None] if case.residual is None else [])
    return (y, rm, rv, *grads)


NAMES = ("y", "running_mean", "running_var", "dx", "dweight", "dbias", "dresidual")


def _check_layout(got, case: Case):
    """y, dx and dresidual keep x's dtype and strides; dweight and dbias are float32 (C,)."""
    y, _, _, dx, dweight, dbias, dres = got
    for name, t in (("y", y), ("dx", dx), ("dresidual", dres)):
        if t is not None:
            assert t.dtype == case.x.dtype and t.stride() == case.x.stride(), name
    for name, t in (("dweight", dweight), ("dbias", dbias)):
        assert t.dtype == torch.float32 and t.shape == case.weight.shape, name


def _assert_fp32_matches(case: Case, code, training):
    got = _run_triton(case, code, training)
    _check_layout(got, case)
    want = _run_torch(case, code, training, torch.float64)
    atol, rtol = TOLERANCES[torch.float32]
    count = case.x.numel() // case.x.shape[1]
    # As in helpers.assert_matches_torch: gradients get 5x the tolerance, and the parameter gradients,
    # sums of `count` values, an atol that grows with sqrt(count).
    factors = {"dx": (5, 5), "dresidual": (5, 5), "dweight": (5 * count**0.5, 5), "dbias": (5 * count**0.5, 5)}
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            assert a is None, name
            continue
        atol_factor, rtol_factor = factors.get(name, (1, 1))
        torch.testing.assert_close(
            a.double(), b, atol=atol * atol_factor, rtol=rtol * rtol_factor, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("code", CODES, ids=_code_id)
def test_float32_matches_torch_in_float64(shape, channels_last, training, with_residual, code):
    _assert_fp32_matches(_case(shape, torch.float32, channels_last, with_residual), code, training)


# Tiny blocks: many tiles (with tails) per channel, reduced in several chunks (the two-stage kernels)
# or walked twice by one program (the fused kernels).
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("chunks", [3, 1], ids=["two-stage", "fused"])
@pytest.mark.parametrize("code", [activation.RELU6, activation.HARDSWISH, activation.SILU], ids=_code_id)
def test_multi_tile_matches_torch(channels_last, chunks, code):
    case = _case((2, 3, 3, 5), torch.float32, channels_last, with_residual=True)
    with triton_backend.forced_blocks(block_c=2, block_s=4, chunks=chunks):
        assert triton_backend._plan(case.x).chunks == chunks
        for training in (True, False):
            _assert_fp32_matches(case, code, training)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("code", CODES, ids=_code_id)
def test_low_precision_within_twice_torchs_error(dtype, channels_last, training, with_residual, code):
    _assert_low_precision_rule(_case((4, 6, 5, 3), dtype, channels_last, with_residual), code, training)


def _assert_low_precision_rule(case: Case, code, training):
    """Error vs the float64 truth <= 2x that of torch's own layer in x's dtype + atol (TOLERANCES / 10);
    the running stats are float32 buffers and must be float32-accurate."""
    dtype = case.x.dtype
    got = _run_triton(case, code, training)
    _check_layout(got, case)
    truth = _run_torch(case, code, training, torch.float64)
    theirs = _run_torch(case, code, training, dtype)
    atol = TOLERANCES[dtype][0] / 10
    for name, a, b, t in zip(NAMES, got, truth, theirs):
        if b is None:
            assert a is None, name
        elif name.startswith("running"):
            torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
        else:
            ours, torchs = (a.double() - b).abs().max().item(), (t.double() - b).abs().max().item()
            assert ours <= 2 * torchs + atol, f"{name}: error {ours} vs torch's {torchs}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("code", [activation.RELU6, activation.HARDSWISH, activation.SILU], ids=_code_id)
def test_gpu_larger_shape(dtype, channels_last, training, code):
    """CPU twins: test_float32_matches_torch_in_float64, test_low_precision_within_twice_torchs_error
    (at this size the channels_last reductions take the two-stage kernels)."""
    case = _case((16, 64, 28, 28), dtype, channels_last, with_residual=True)
    if dtype == torch.float32:
        _assert_fp32_matches(case, code, training)
    else:
        _assert_low_precision_rule(case, code, training)


# --------------------------------------------------------------------------- which passes write what

NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (False, False, False)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("needs", NEEDS, ids=str)
@pytest.mark.parametrize("chunks", [1, 3], ids=["fused", "two-stage"])
@pytest.mark.parametrize("code", [activation.NONE, activation.RELU6, activation.SILU], ids=_code_id)
def test_backward_computes_only_what_is_asked(training, needs, chunks, code):
    """Every combination of needs, with and without dresidual: dresidual is written by whichever pass
    runs (dx, the reduction, or a pass of its own) and equals g; the rest is None or right."""
    case = _case((2, 3, 3, 5), torch.float32, True, with_residual=True)
    want = _run_torch(case, code, training, torch.float64)[3:]
    atol, rtol = TOLERANCES[torch.float32]
    with triton_backend.forced_blocks(block_c=2, block_s=4, chunks=chunks):
        assert triton_backend._plan(case.x).chunks == chunks
        for needs_residual in (True, False):
            got = _run_triton(case, code, training, needs, needs_residual)[3:]
            for name, a, b, needed in zip(NAMES[3:], got, want, (*needs, needs_residual)):
                assert (a is None) == (not needed), name
                if needed:
                    torch.testing.assert_close(a.double(), b, atol=atol * 25, rtol=rtol * 5, msg=name)


def test_dresidual_of_no_activation_is_dy():
    case = _case((4, 6, 3, 5), torch.float32, True, with_residual=True)
    dres = _run_triton(case, activation.NONE, True)[-1]
    assert torch.equal(dres, case.dy) and dres.stride() == case.x.stride()


def test_residual_and_dy_with_other_strides_are_accepted():
    """residual and dy laid out unlike x (the kernels index all with x's offsets: they are copied)."""
    case = _case((3, 6, 5, 7), torch.float32, True, with_residual=True)
    other = case._replace(residual=case.residual.contiguous(), dy=case.dy.contiguous())
    assert other.residual.stride() != case.x.stride()
    for a, b in zip(_run_triton(other, activation.HARDSWISH, True), _run_triton(case, activation.HARDSWISH, True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------- the kinks


# z exactly at each bend: hardswish's -3 and 3 and relu6's 0 and 6 (and points just either side).
KINKS = {
    activation.HARDSWISH: [-3.0, 3.0, -3.0 - 2**-20, 3.0 - 2**-21, -2.0, 4.0],
    activation.RELU6: [0.0, 6.0, -(2**-20), 6.0 - 2**-21, 2.0, 7.0],
}


@pytest.mark.parametrize("code", sorted(KINKS), ids=_code_id)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_gradients_at_the_kinks_follow_torch_training(code, with_residual):
    """weight 0 makes z = bias (+ residual) exactly, whatever the batch statistics; dbias and
    dresidual then carry act' at exactly the kink values."""
    values = torch.tensor(KINKS[code])
    c = len(values)
    x = make_input((2, c, 3, 3), torch.float32, True)
    if with_residual:  # z = (bias - 1) + 1, every term exact in float32
        residual = torch.ones_like(x)
        bias = values - 1.0
    else:
        residual, bias = None, values
    case = Case(x, torch.ones_like(x), residual, torch.zeros(c), bias, torch.zeros(c), torch.ones(c))
    got = _run_triton(case, code, True)
    want = _run_torch(case, code, True, torch.float64)
    for name, a, b in zip(NAMES, got, want):
        if name in ("y", "dbias", "dresidual") and b is not None:
            torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("code", sorted(KINKS), ids=_code_id)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_gradients_at_the_kinks_follow_torch_eval(code, with_residual):
    """Running mean 0, var 1, eps 0, weight 1, bias 0: z = x (+ residual) exactly, so dx is act' too."""
    values = torch.tensor(KINKS[code])
    x = values.repeat(4, 3).reshape(4, 3, 2, 3)  # each value in every channel
    residual = torch.zeros_like(x) if with_residual else None
    c = x.shape[1]
    case = Case(x, torch.ones_like(x), residual, torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c))
    slope = _slope(code)
    y = triton_backend.forward_eval(x, case.weight, case.bias, case.running_mean, case.running_var, 0.0, code, slope,
                                    residual)  # fmt: skip
    dx, _, _, dres = triton_backend.backward(
        case.dy, x, y if code in FROM_OUTPUT else None, case.weight, torch.zeros(c), torch.ones(c), code, slope,
        False, True, True, True, case.bias, residual, with_residual,
    )  # fmt: skip
    z = x.double().requires_grad_()
    y64 = activation.apply(z, code, slope)
    y64.backward(torch.ones_like(z))
    torch.testing.assert_close(y.double(), y64, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx.double(), z.grad, atol=1e-6, rtol=1e-6)
    if with_residual:
        torch.testing.assert_close(dres.double(), z.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("code", [c for c in CODES if activation.grad_from_input(c)], ids=_code_id)
def test_split_primitives_refuse_activations_that_need_z(code):
    case = _case((2, 3, 4), torch.float32, False, with_residual=False)
    stats = (torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="needs z"):
        triton_backend.backward_reduce(case.dy, case.x, None, *stats, code, 0.0)
    with pytest.raises(ValueError, match="needs z"):
        triton_backend.backward_elemt(case.dy, case.x, None, case.weight, *stats, *stats, 8, code, 0.0)


# --------------------------------------------------------------------------- the attributes


def test_backend_lists_every_activation_and_the_residual():
    assert triton_backend.ACTIVATIONS == frozenset(activation.NAMES) == frozenset(range(7))
    assert triton_backend.RESIDUAL is True
