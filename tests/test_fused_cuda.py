"""The kernels' fused activations and residual add, called as ops (forward_train, forward_eval,
backward) and checked against torch ops in float64: every activation code 0-5, with and without a
residual, training and eval, float32 / bfloat16 / float16 / float64, NCHW, channels_last and
(N, C); the kinks of relu6 (0, 6) and hardswish (-3, 3) at exactly representable points.

bfloat16 and float16 are held to at most twice the error of torch's own layers in that dtype
(batch_norm, add, activation) plus a tenth of its step, the rule of tests/test_cpu_kernels.py. Each
side's gradients are measured against the float64 gradient taken where that side evaluated act':
for relu, leaky_relu and relu6 the op's own output y (the contract reads act' off y, and a z just
below 6 rounds to y = 6 in bfloat16), for torch its own low-precision pre-activation. So a rounding
that moves a value across a kink is not counted as an error of either side.

BACKENDS lists the backends under test. The cpp backend's kernels take the same schemas: adding
"cpp" to it runs every test here on the CPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, make_input

from bnfused import activation as act_codes
from bnfused import backends
from bnfused.backends import reference

BACKENDS = [pytest.param("cuda", marks=pytest.mark.gpu)]
DEVICES = {"cuda": "cuda", "cpp": "cpu"}

ACTS = [
    pytest.param(act_codes.NONE, 0.0, id="none"),
    pytest.param(act_codes.RELU, 0.0, id="relu"),
    pytest.param(act_codes.LEAKY_RELU, 0.2, id="leaky_relu"),
    pytest.param(act_codes.RELU6, 0.0, id="relu6"),
    pytest.param(act_codes.HARDSWISH, 0.0, id="hardswish"),
    pytest.param(act_codes.SILU, 0.0, id="silu"),
    pytest.param(act_codes.SIGMOID, 0.0, id="sigmoid"),
]
# The codes whose act' the backward reads off the saved output y (the others get y=None).
GRAD_FROM_OUTPUT = frozenset((act_codes.RELU, act_codes.LEAKY_RELU, act_codes.RELU6))
LAYOUTS = [
    pytest.param((5, 6, 7, 9), False, id="NCHW"),
    pytest.param((5, 6, 7, 9), True, id="channels_last"),
    pytest.param((3, 40, 4, 5), True, id="channels_last-C40"),  # more channels than one block's 32
    pytest.param((64, 37), False, id="NC"),
    pytest.param((4, 3, 61, 67), False, id="NCHW-chunks"),  # 16348 rows per channel: several reduction chunks
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOW_PRECISION = (torch.bfloat16, torch.float16)
EPS, MOMENTUM = 1e-5, 0.1


@pytest.fixture
def ops(backend):
    """The backend's module: its functions are the torch.ops.bnfused_native overloads."""
    reason = backends.unavailable_reason(backend, torch.device(DEVICES[backend]))
    assert reason is None, f"backend {backend!r} is unavailable: {reason}"
    return backends.module(backend)


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    residual: torch.Tensor | None
    dy: torch.Tensor


def _param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make_case(backend, shape, dtype, channels_last, residual):
    """Weights in [1, 3] and a residual of std 2 spread z over every piece of every activation."""
    C = shape[1]
    pd = _param_dtype(dtype)
    case = Case(
        x=make_input(shape, dtype, channels_last),
        weight=torch.rand(C, dtype=pd) * 2 + 1,
        bias=torch.randn(C, dtype=pd),
        running_mean=torch.linspace(1.0, 3.0, C, dtype=pd),
        running_var=torch.linspace(4.0, 12.0, C, dtype=pd),
        residual=make_input(shape, dtype, channels_last, offset=0.0, scale=2.0) if residual else None,
        dy=make_input(shape, dtype, channels_last, offset=0.0, scale=1.0),
    )
    device = DEVICES[backend]
    return Case(*(None if t is None else t.to(device) for t in vars(case).values()))


def _leaf(t):
    return None if t is None else t.detach().requires_grad_()


@dataclass
class Result:
    y: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    dx: torch.Tensor
    dweight: torch.Tensor
    dbias: torch.Tensor
    dresidual: torch.Tensor | None
    z: torch.Tensor | None = None  # the pre-activation (torch's runs only)


def _torch_layer(case, act, slope, training, dtype, grad_point=None, eps=EPS):
    """torch ops in ``dtype`` (params in its accumulation dtype): batch_norm, + residual, activation,
    and their autograd. act' is taken at ``grad_point`` when given, else at z. The float64 oracle
    runs on the CPU: torch's CUDA hardswish multiplies by 1/6 rounded to float32 even in float64 (a
    3e-8 relative error), its CPU one divides by 6."""
    on = torch.device("cpu") if dtype == torch.float64 else case.x.device
    pd = _param_dtype(dtype)
    x, w, b = _leaf(case.x.to(on, dtype)), _leaf(case.weight.to(on, pd)), _leaf(case.bias.to(on, pd))
    r = _leaf(None if case.residual is None else case.residual.to(on, dtype))
    rm, rv = case.running_mean.to(on, pd, copy=True), case.running_var.to(on, pd, copy=True)
    z = F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, eps)
    if r is not None:
        z = z + r
    y = act_codes.apply(z, act, slope)
    at = _leaf(z if grad_point is None else grad_point.to(on, dtype))
    (g,) = torch.autograd.grad(act_codes.apply(at, act, slope), at, case.dy.to(on, dtype))
    leaves = [x, w, b] + ([r] if r is not None else [])
    dx, dw, db, *dr = torch.autograd.grad(z, leaves, g)
    back = [None if t is None else t.to(case.x.device) for t in (y.detach(), rm, rv, dx, dw, db, dr[0] if dr else None)]
    return Result(*back, z.detach().to(case.x.device))


def _ours(ops, case, act, slope, training, eps=EPS):
    """forward_train or forward_eval, then backward with every gradient asked for."""
    rm, rv = case.running_mean.clone(), case.running_var.clone()
    if training:
        y, mean, invstd = ops.forward_train(
            case.x, case.weight, case.bias, rm, rv, MOMENTUM, eps, act, slope, case.residual
        )
    else:
        y = ops.forward_eval(case.x, case.weight, case.bias, rm, rv, eps, act, slope, case.residual)
        mean, invstd = reference.eval_stats(rm, rv, eps, case.x.dtype)
    y_arg = y if act in GRAD_FROM_OUTPUT else None
    needs_residual = case.residual is not None
    dx, dw, db, dr = ops.backward(
        case.dy, case.x, y_arg, case.weight, mean, invstd, act, slope, training, True, True, True,
        case.bias, case.residual, needs_residual,
    )  # fmt: skip
    assert (dr is not None) == needs_residual
    return Result(y, rm, rv, dx, dw, db, dr), mean, invstd


def _assert_covers_every_piece(z, act):
    """The data reaches each piece of the activation (else a wrong piece could pass unseen)."""
    edges = {act_codes.RELU6: (0.0, 6.0), act_codes.HARDSWISH: (-3.0, 3.0)}.get(act, (0.0,))
    assert (z < edges[0]).any() and (z > edges[-1]).any(), f"z spans only [{z.min()}, {z.max()}]"
    if len(edges) == 2:
        assert ((z > edges[0]) & (z < edges[1])).any()


OUTPUTS = ("y", "dx", "dresidual", "dweight", "dbias")


def _assert_close_with_tolerances(ours, ref, x, tol):
    """tests/helpers.py's rule: the output within tol, the input grads within 5 tol, the parameter
    grads (sums over N * spatial values) within 5 tol scaled by the square root of that count."""
    atol, rtol = tol
    scale = max(1.0, (x.numel() / x.shape[1]) ** 0.5)
    tols = {"y": (atol, rtol), "dx": (5 * atol, 5 * rtol), "dresidual": (5 * atol, 5 * rtol)}
    tols["dweight"] = tols["dbias"] = (5 * atol * scale, 5 * rtol)
    for name in OUTPUTS:
        mine, want = getattr(ours, name), getattr(ref, name)
        if want is None:
            continue
        a, r = tols[name]
        torch.testing.assert_close(mine.double(), want, atol=a, rtol=r, msg=lambda m, n=name: f"{n}: {m}")


def _max_error(a, ref):
    return (a.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act, slope", ACTS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
def test_fused_layer_matches_torch_ops_in_float64(
    ops, backend, act, slope, residual, training, dtype, shape, channels_last
):
    case = _make_case(backend, shape, dtype, channels_last, residual)
    ours, mean, invstd = _ours(ops, case, act, slope, training)
    y_point = ours.y if act in GRAD_FROM_OUTPUT else None
    ref = _torch_layer(case, act, slope, training, torch.float64, grad_point=y_point)
    _assert_covers_every_piece(ref.z, act)

    x = case.x
    assert ours.y.dtype == x.dtype and ours.y.stride() == x.stride(), "y must have x's dtype and strides"
    for name in ("dx", "dresidual"):
        t = getattr(ours, name)
        assert t is None or (t.dtype == x.dtype and t.stride() == x.stride()), f"{name}: dtype or strides differ"
    assert ours.dweight.dtype == ours.dbias.dtype == _param_dtype(dtype)

    # Statistics come from the same (rounded) input: the accumulation dtype's tolerance, whatever x's dtype.
    stats_tol = dict(zip(("atol", "rtol"), TOLERANCES[_param_dtype(dtype)]))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name).double(), getattr(ref, name), **stats_tol, msg=name)
    if training:
        var, mu = torch.var_mean(x.double(), dim=[0, *range(2, x.dim())], correction=0)
        torch.testing.assert_close(mean.double(), mu, **stats_tol)
        torch.testing.assert_close(invstd.double(), torch.rsqrt(var + EPS), **stats_tol)

    if dtype not in LOW_PRECISION:
        _assert_close_with_tolerances(ours, ref, x, TOLERANCES[dtype])
        return

    torch_run = _torch_layer(case, act, slope, training, dtype)
    torch_ref = _torch_layer(case, act, slope, training, torch.float64, grad_point=torch_run.z)
    step = torch.finfo(dtype).eps / 10
    for name in OUTPUTS:
        mine, want = getattr(ours, name), getattr(ref, name)
        if want is None:
            continue
        err = _max_error(mine, want)
        torch_err = _max_error(getattr(torch_run, name), getattr(torch_ref, name))
        bound = 2 * torch_err + step * want.abs().max().item()
        assert err <= bound, f"{name}: error {err} vs torch's own {torch_err} (bound {bound})"


# z values at and around every kink, all exact in bfloat16: hardswish's at -3 and 3, relu6's at 0 and 6.
KINKS = (-3.5, -3.0, -2.5, -0.5, 0.0, 0.5, 2.5, 3.0, 3.5, 5.5, 6.0, 6.5)
KINK_POINTS = {
    act_codes.RELU: (0.0,), act_codes.LEAKY_RELU: (0.0,), act_codes.RELU6: (0.0, 6.0), act_codes.HARDSWISH: (-3.0, 3.0),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "act, slope",
    [ACTS[1], ACTS[2], ACTS[3], ACTS[4]],  # relu, leaky_relu, relu6, hardswish: the ones with kinks
)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kinks_follow_torchs_conventions(ops, backend, act, slope, residual, training, dtype):
    """z exactly on each kink: relu6' = 0 at 0 and 6, hardswish' = 0 at -3 and 1 at 3, relu' = 0 at 0
    (a flip to the other side would be off by at least 1/2 there).

    Eval: running mean 0, running var + eps = 1, w = 1 and b = 0 make z = x (+ residual) exactly.
    Training: w = 0 makes z = b (+ residual) exactly whatever the batch statistics; the kink then
    shows in dresidual, dweight and dbias."""
    C = len(KINKS)
    pd = _param_dtype(dtype)
    kinks = torch.tensor(KINKS, dtype=pd)
    shape = (4, C, 3, 2)
    if training:
        x, weight, bias = make_input(shape, dtype), torch.zeros(C, dtype=pd), kinks.clone()
    else:
        x, weight, bias = kinks[torch.randint(C, shape)].to(dtype), torch.ones(C, dtype=pd), torch.zeros(C, dtype=pd)
    eps = 0.25
    case = Case(
        x=x, weight=weight, bias=bias, running_mean=torch.zeros(C, dtype=pd),
        running_var=torch.full((C,), 1.0 - eps, dtype=pd),
        residual=torch.randint(-2, 3, shape).to(dtype) if residual else None,  # kinks moved by whole numbers
        dy=torch.ones(shape, dtype=dtype),
    )  # fmt: skip
    case = Case(*(None if t is None else t.to(DEVICES[backend]) for t in vars(case).values()))
    ours, _, invstd = _ours(ops, case, act, slope, training, eps=eps)
    if not training:
        assert torch.equal(invstd, torch.ones_like(invstd))
    ref = _torch_layer(case, act, slope, training, torch.float64, eps=eps)
    for kink in KINK_POINTS[act]:
        assert (ref.z == kink).any(), f"no z exactly at {kink}"
    _assert_close_with_tolerances(ours, ref, case.x, TOLERANCES[dtype])


def _small_case(backend):
    """A channels_last float32 case with a residual."""
    return _make_case(backend, (4, 6, 5, 3), torch.float32, True, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act, slope", [ACTS[0], ACTS[3], ACTS[5]])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_computes_exactly_what_is_asked(ops, backend, act, slope, training):
    """Every subset of (dx, dweight, dbias, dresidual): the ones asked for are bitwise those of the
    full call, the others None."""
    case = _small_case(backend)
    y, mean, invstd = ops.forward_train(case.x, case.weight, case.bias, None, None, 0.1, EPS, act, slope, case.residual)
    y_arg = y if act in GRAD_FROM_OUTPUT else None
    args = (case.dy, case.x, y_arg, case.weight, mean, invstd, act, slope, training)
    full = ops.backward(*args, True, True, True, case.bias, case.residual, True)
    for needs in itertools.product((False, True), repeat=4):
        got = ops.backward(*args, *needs[:3], case.bias, case.residual, needs[3])
        for name, asked, g, f in zip(("dx", "dweight", "dbias", "dresidual"), needs, got, full):
            if not asked:
                assert g is None, f"{name} was not asked for (needs={needs})"
            else:
                assert torch.equal(g, f), f"{name} differs from the full call's (needs={needs})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dresidual_without_activation_is_dy_in_xs_layout(ops, backend):
    case = _small_case(backend)  # channels_last
    _, mean, invstd = ops.forward_train(case.x, None, None, None, None, 0.1, EPS, 0, 0.0, case.residual)
    dy = case.dy.contiguous()  # NCHW while x is channels_last
    dr = ops.backward(
        dy, case.x, None, None, mean, invstd, 0, 0.0, True, False, False, False, None, case.residual, True
    )[3]
    assert torch.equal(dr, dy) and dr.stride() == case.x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act, slope", [ACTS[4], ACTS[5]])
def test_residual_in_another_layout_is_read_by_position(ops, backend, act, slope):
    """A residual whose strides differ from x's gives the same results as one in x's layout."""
    case = _small_case(backend)  # channels_last
    other = case.residual.contiguous()
    assert other.stride() != case.residual.stride()
    for training in (True, False):
        results = []
        for residual in (case.residual, other):
            rm, rv = case.running_mean.clone(), case.running_var.clone()
            if training:
                y, mean, invstd = ops.forward_train(
                    case.x, case.weight, case.bias, rm, rv, MOMENTUM, EPS, act, slope, residual
                )
            else:
                y = ops.forward_eval(case.x, case.weight, case.bias, rm, rv, EPS, act, slope, residual)
                mean, invstd = reference.eval_stats(rm, rv, EPS, case.x.dtype)
            grads = ops.backward(
                case.dy, case.x, None, case.weight, mean, invstd, act, slope, training, True, True, True,
                case.bias, residual, True,
            )  # fmt: skip
            results.append((y, *grads))
        for name, a, b in zip(("y", "dx", "dweight", "dbias", "dresidual"), *results):
            assert torch.equal(a, b), f"{name} (training={training}) depends on the residual's strides"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_residuals_and_split_backward_activations_raise(ops, backend):
    case = _small_case(backend)
    x, w, b = case.x, case.weight, case.bias
    rm, rv = case.running_mean, case.running_var
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        ops.forward_train(x, w, b, rm, rv, 0.1, EPS, act_codes.SILU, 0.0, case.residual[:, :, :2])
    with pytest.raises(RuntimeError, match="residual must have x's dtype"):
        ops.forward_eval(x, w, b, rm, rv, EPS, act_codes.SILU, 0.0, case.residual.double())
    if x.device.type != "cpu":
        with pytest.raises(RuntimeError, match="residual is on cpu"):
            ops.forward_eval(x, w, b, rm, rv, EPS, act_codes.SILU, 0.0, case.residual.cpu())
    _, mean, invstd = ops.forward_train(x, w, b, None, None, 0.1, EPS, act_codes.SILU, 0.0, case.residual)
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        ops.backward(
            case.dy, x, None, w, mean, invstd, act_codes.SILU, 0.0, True, True, True, True, b, case.residual[:1], True
        )
    # The split backward has no bias or residual to recompute a hardswish or silu z from: refused, not guessed.
    for act in (act_codes.HARDSWISH, act_codes.SILU):
        with pytest.raises(RuntimeError):
            ops.backward_reduce(case.dy, x, None, mean, invstd, act, 0.0)
        with pytest.raises(RuntimeError):
            ops.backward_elemt(case.dy, x, None, w, mean, invstd, mean, invstd, 10, act, 0.0)
