"""The Triton backend: parity with torch.nn.BatchNorm and with the reference backend, on every layout,
dtype and flag, plus the numerics and the torch.library / torch.compile routes.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest), so shapes stay small;
``forced_blocks`` makes tiny shapes span many tiles and reduction chunks. GPU-only tests (larger
shapes, a tensor past 2^31 elements) each have a CPU twin with the same assertions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCES, assert_matches_torch, make_input
from test_compile import _op_samples, assert_compiled_matches_eager

from bnfused import activation
from bnfused.backends import reference
from bnfused.backends import triton as triton_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOW_PRECISION = [torch.float16, torch.bfloat16]

# Shapes with prime / odd extents and C not a power of two, in every layout the kernels index.
LAYOUTS = [
    pytest.param((7, 5), False, id="NC"),
    pytest.param((3, 5, 11), False, id="NCL"),
    pytest.param((3, 5, 11), True, id="NCL-channel-stride-1"),
    pytest.param((3, 6, 5, 7), False, id="NCHW"),
    pytest.param((3, 6, 5, 7), True, id="channels_last"),
    pytest.param((2, 3, 3, 4, 5), False, id="NCDHW"),
    pytest.param((2, 3, 3, 4, 5), True, id="channels_last_3d"),
]


@pytest.fixture(autouse=True)
def _default_device():
    """Every tensor a test (or the shared oracle) creates lands on the device the kernels run on."""
    with torch.device(DEVICE):
        yield


# --------------------------------------------------------------------------- availability


def test_available_on_this_machine():
    assert triton_backend.available(DEVICE) is None


def test_cpu_without_interpreter_gives_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_backend.available(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "CUDA" in reason


def test_other_devices_give_the_reason():
    assert "CUDA" in triton_backend.available(torch.device("meta"))


# --------------------------------------------------------------------------- parity with torch.nn


@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_layouts(shape, channels_last, training):
    assert_matches_torch("triton", shape, channels_last=channels_last, training=training, activation="relu")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_low_precision(dtype, channels_last, training):
    assert_matches_torch("triton", (4, 6, 5, 3), dtype=dtype, channels_last=channels_last, training=training)


def test_half_input_with_half_params():
    assert_matches_torch("triton", (4, 6, 5, 3), dtype=torch.float16, param_dtype=torch.float16)


@pytest.mark.parametrize(
    "flags",
    [
        dict(momentum=None, steps=3),
        dict(momentum=0.7),
        dict(affine=False),
        dict(affine=False, training=False, activation="leaky_relu"),
        dict(track_running_stats=False),
        dict(track_running_stats=False, training=False),
        dict(activation="leaky_relu", negative_slope=0.2),
        dict(activation="leaky_relu", negative_slope=0.2, channels_last=True, dtype=torch.bfloat16),
        dict(activation="relu", affine=False, channels_last=True),
    ],
    ids=str,
)
def test_matches_torch_flags(flags):
    assert_matches_torch("triton", (5, 6, 3, 4), **flags)


def test_float64_routes_to_reference():
    assert_matches_torch("triton", (4, 3, 5), dtype=torch.float64)


# Tiny blocks make every shape span many tiles (with tails): in several chunks per channel (the
# two-stage kernels), or in one (the fused kernels, which walk all the tiles of their channels).
@pytest.mark.parametrize(
    "shape, channels_last",
    [pytest.param((19, 5), False, id="NC"), *LAYOUTS[3:5], pytest.param((2, 3, 3, 4, 5), True, id="channels_last_3d")],
)
@pytest.mark.parametrize("chunks", [3, 1], ids=["two-stage", "fused"])
@pytest.mark.parametrize("int64", [False, True], ids=["int32-offsets", "int64-offsets"])
def test_matches_torch_multi_tile(shape, channels_last, chunks, int64):
    with triton_backend.forced_blocks(block_c=2, block_s=8, chunks=chunks, int64=int64):
        plan = triton_backend._plan(make_input(shape, torch.float32, channels_last))
        assert plan.chunks == chunks and plan.col_blocks > 1 and plan.c_blocks > 1 and plan.int64 == int64
        assert_matches_torch("triton", shape, channels_last=channels_last, activation="leaky_relu", steps=1)


def test_small_tensors_take_the_fused_kernels_and_large_ones_split():
    small = triton_backend._make_plan(torch.empty((8, 32, 8, 8), device="meta"))
    large = triton_backend._make_plan(torch.empty((64, 8, 32, 32), device="meta"))
    assert small.chunks == 1 and large.chunks > 1
    with triton_backend.forced_blocks(block_c=2, block_s=8, chunks=None):  # the tile only
        forced = triton_backend._make_plan(torch.empty((64, 8, 32, 32), device="meta"))
    # Chunks as the plan takes them: off a GPU it aims at 4 programs, which 4 channel blocks already are.
    assert (forced.block_c, forced.block_s, forced.c_blocks, forced.chunks) == (2, 8, 4, 1)


@pytest.mark.parametrize(
    "shape, view, col_vec",
    [
        ((4, 3, 14, 14), "contiguous", 4),  # 196-value planes: multiples of 4, not 16
        ((4, 3, 4, 4), "contiguous", 16),
        ((4, 3, 7, 7), "contiguous", 1),
        ((4, 3, 6), "contiguous", 2),
        ((4, 3, 8, 8), "channels_last", 1),  # channels are the contiguous axis
        ((4, 3, 8, 8), "every_other_channel", 16),  # stride_c 128: still whole rows of 64
        ((4, 3, 16), "rows_49_apart", 1),  # planes of 16 values, but the batch stride is odd
    ],
)
def test_column_vector_is_what_rows_of_the_tensor_are_multiples_of(shape, view, col_vec):
    x = torch.randn(shape)
    if view == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif view == "every_other_channel":
        x = torch.randn(shape[0], shape[1] * 2, *shape[2:])[:, ::2]
    elif view == "rows_49_apart":
        x = torch.randn(4 * 49).as_strided(shape, (49, 16, 1))
    assert triton_backend._make_plan(x).col_vec == col_vec


@pytest.mark.parametrize("view", ["every_other_sample", "every_other_channel"])
def test_backend_on_a_sliced_input_indexes_dy_with_its_strides(view):
    """The backend contract's x may have gaps (a slice of a larger tensor): dy, given contiguous, is laid
    out over x's strides before the kernels index both with one offset."""
    base = torch.randn(6, 6, 3, 4) * 3 + 2
    x = base[::2] if view == "every_other_sample" else base[:, ::2]
    dy = torch.randn(x.shape)
    weight, bias = torch.rand(x.shape[1]) + 0.5, torch.randn(x.shape[1])
    results = []
    for backend in (triton_backend, reference):
        y, mean, invstd = backend.forward_train(x, weight, bias, None, None, 0.1, 1e-5, 0, 0.0)
        results.append([y, *backend.backward(dy, x, y, weight, mean, invstd, 0, 0.0, True, True, True, True)[:3]])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 3, 4), (5, 3, 6), (2, 4, 2, 2)], ids=str)
def test_column_vector_changes_no_value(shape, monkeypatch):
    """The kernels round the strides and row length to multiples of COL_VEC: exact only if they are."""
    x, dy = torch.randn(shape) * 3 + 2, torch.randn(shape)
    weight, bias = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])

    def step():
        triton_backend._plans.clear()
        y, mean, invstd = triton_backend.forward_train(x, weight, bias, None, None, 0.1, 1e-5, 0, 0.0)
        grads = triton_backend.backward(dy, x, y, weight, mean, invstd, 0, 0.0, True, True, True, True)
        return triton_backend._plan(x).col_vec, [y, mean, invstd, *grads[:3]]

    col_vec, vectorised = step()
    monkeypatch.setattr(triton_backend, "_column_vector", lambda *args: 1)
    assert col_vec > 1 and step()[0] == 1
    for got, want in zip(vectorised, step()[1], strict=True):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- each contract function


def _contract_inputs(shape, dtype, channels_last):
    x = make_input(shape, dtype, channels_last)
    c = shape[1]
    dy = make_input(shape, dtype, channels_last, offset=0.0, scale=1.0)
    weight = torch.rand(c) + 0.5
    bias = torch.randn(c)
    mean, var = reference.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    y = reference.normalize(x, weight, bias, mean, invstd, activation.LEAKY_RELU, 0.1)
    return x, dy, y, weight, bias, mean, invstd


def _assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype and actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape, channels_last", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[3], LAYOUTS[4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_primitives_match_reference(shape, channels_last, dtype):
    x, dy, y, weight, bias, mean, invstd = _contract_inputs(shape, dtype, channels_last)
    for got, want in zip(triton_backend.batch_stats(x), reference.batch_stats(x)):
        _assert_close(got, want, torch.float32)
    for w, b, act in ((weight, bias, activation.LEAKY_RELU), (None, None, activation.NONE)):
        _assert_close(
            triton_backend.normalize(x, w, b, mean, invstd, act, 0.1),
            reference.normalize(x, w, b, mean, invstd, act, 0.1),
            dtype,
        )
    sums = triton_backend.backward_reduce(dy, x, y, mean, invstd, activation.LEAKY_RELU, 0.1)
    ref_sums = reference.backward_reduce(dy, x, y, mean, invstd, activation.LEAKY_RELU, 0.1)
    for got, want in zip(sums, ref_sums):
        _assert_close(got, want, torch.float32)
    # A count that is not N * S (SyncBatchNorm passes the global one) must be used as given.
    count = 3 * x.numel() // x.shape[1]
    _assert_close(
        triton_backend.backward_elemt(dy, x, y, weight, mean, invstd, *ref_sums, count, activation.LEAKY_RELU, 0.1),
        reference.backward_elemt(dy, x, y, weight, mean, invstd, *ref_sums, count, activation.LEAKY_RELU, 0.1),
        dtype,
    )


@pytest.mark.parametrize("shape, channels_last", [LAYOUTS[3], LAYOUTS[4]])
def test_forward_train_and_eval_match_reference(shape, channels_last):
    x = make_input(shape, torch.float16, channels_last)
    c = shape[1]
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    # Half-precision running stats: loaded, updated in fp32 and stored back as half.
    running = [torch.linspace(-1, 1, c).half(), torch.linspace(0.5, 2, c).half()]
    ref_running = [t.clone() for t in running]
    got = triton_backend.forward_train(x, weight, bias, *running, 0.3, 1e-3, activation.RELU, 0.0)
    want = reference.forward_train(x, weight, bias, *ref_running, 0.3, 1e-3, activation.RELU, 0.0)
    for a, b, dtype in zip(got, want, (torch.float16, torch.float32, torch.float32)):
        _assert_close(a, b, dtype)
    for a, b in zip(running, ref_running):
        _assert_close(a, b, torch.float16)
    _assert_close(
        triton_backend.forward_eval(x, weight, None, *running, 1e-3, activation.LEAKY_RELU, 0.2),
        reference.forward_eval(x, weight, None, *running, 1e-3, activation.LEAKY_RELU, 0.2),
        torch.float16,
    )


NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (True, False, True)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("needs", NEEDS, ids=str)
@pytest.mark.parametrize("chunks", [1, 3], ids=["fused", "two-stage"])
def test_backward_matches_reference_and_skips_unneeded(training, needs, chunks):
    x, dy, y, weight, _, mean, invstd = _contract_inputs((4, 6, 3, 5), torch.float32, True)
    args = (dy, x, y, weight, mean, invstd, activation.LEAKY_RELU, 0.1, training, *needs)
    with triton_backend.forced_blocks(block_c=4, block_s=8, chunks=chunks):
        assert triton_backend._plan(x).chunks == chunks
        results = triton_backend.backward(*args)
    assert len(results) == 4 and results[3] is None  # no dresidual unless asked for
    for got, want, needed in zip(results, reference.backward(*args)[:3], needs):
        assert (got is None) == (not needed)
        if needed:
            _assert_close(got, want, torch.float32)


def test_backward_without_weight_or_activation():
    x, dy, _, _, _, mean, invstd = _contract_inputs((5, 3, 7), torch.float32, False)
    args = (dy, x, None, None, mean, invstd, activation.NONE, 0.0, True, True, True, True)
    for got, want in zip(triton_backend.backward(*args)[:3], reference.backward(*args)[:3], strict=True):
        _assert_close(got, want, torch.float32)


def test_dy_with_other_strides_is_accepted():
    x, dy, y, weight, _, mean, invstd = _contract_inputs((4, 6, 3, 5), torch.float32, True)
    args = (x, y, weight, mean, invstd, activation.RELU, 0.0, True, True, True, True)
    got = triton_backend.backward(dy.contiguous(), *args)[:3]
    for a, b in zip(got, reference.backward(dy, *args)[:3], strict=True):
        _assert_close(a, b, torch.float32)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("forced", [False, True], ids=["default-blocks", "multi-chunk"])
def test_large_mean_variance_is_accurate_in_fp32(forced):
    """mean 1e4, std 1: E[x^2]-E[x]^2 in fp32 loses every digit of the variance; the kernels must not."""
    x = (torch.randn(16, 3, 9, 11, dtype=torch.float64) + 1e4).float()
    want_var, want_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    if forced:
        with triton_backend.forced_blocks(block_c=2, block_s=16, chunks=5):
            mean, var = triton_backend.batch_stats(x)
    else:
        mean, var = triton_backend.batch_stats(x)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-7, atol=0)
    if not forced:  # the training forward (fused kernels at this size) computes the same statistics
        _, mean, invstd = triton_backend.forward_train(x, None, None, None, None, 0.1, 1e-5, activation.NONE, 0.0)
        torch.testing.assert_close(invstd.double(), (want_var + 1e-5).rsqrt(), rtol=1e-4, atol=0)
        torch.testing.assert_close(mean.double(), want_mean, rtol=1e-7, atol=0)


@pytest.mark.parametrize("chunks", [1, 3])
def test_spread_of_one_rounding_step_at_the_mean(chunks):
    """Values -1e10 and +-1024 (float32's step there): a tile mean rounds by about the spread itself,
    so each tile's deviations must be taken from the mean it passes on to the merge, not the exact one
    (that gave a variance 6% low)."""
    a, u = -1e10, 1024.0
    x = torch.tensor(([a, a + u, a - u] * 14)[:40]).view(1, 1, 40).repeat(2, 1, 1)
    want_var, want_mean = torch.var_mean(x.double(), dim=(0, 2), correction=0)
    with triton_backend.forced_blocks(block_c=1, block_s=4, chunks=chunks):
        mean, var = triton_backend.batch_stats(x)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-7, atol=0)


def test_results_are_deterministic():
    x, dy, y, weight, _, mean, invstd = _contract_inputs((6, 5, 7, 3), torch.float32, True)
    with triton_backend.forced_blocks(block_c=4, block_s=8, chunks=4):
        first = (*triton_backend.batch_stats(x), *triton_backend.backward_reduce(dy, x, y, mean, invstd, 2, 0.1))
        second = (*triton_backend.batch_stats(x), *triton_backend.backward_reduce(dy, x, y, mean, invstd, 2, 0.1))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_plan_uses_64_bit_offsets_past_2_31_elements():
    big = torch.empty((1, 2, 2**30 + 7), device="meta")
    small = torch.empty((64, 2, 2**10), device="meta")
    assert triton_backend._make_plan(big).int64 and not triton_backend._make_plan(small).int64


def test_input_whose_spatial_dims_do_not_collapse_is_refused():
    x = torch.empty((2, 3, 4, 6), device="meta")[:, :, ::2, :]
    with pytest.raises(ValueError, match="do not collapse"):
        triton_backend._make_plan(x)


def test_forced_blocks_rejects_bad_sizes():
    with pytest.raises(ValueError, match="block_s must be a power of two"):
        with triton_backend.forced_blocks(block_c=2, block_s=6, chunks=2):
            pass


def _assert_low_precision_rule(shape, dtype, channels_last):
    """Error of the triton result vs an fp32 reference <= 2x torch's own low-precision error + atol."""
    x32 = make_input(shape, torch.float32, channels_last)
    x = x32.to(dtype)
    c = shape[1]
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    y32 = torch.nn.functional.batch_norm(x.float(), None, None, weight, bias, training=True)
    y_torch = torch.nn.functional.batch_norm(x, None, None, weight.to(dtype), bias.to(dtype), training=True)
    y, _, _ = triton_backend.forward_train(x, weight, bias, None, None, 0.1, 1e-5, activation.NONE, 0.0)
    atol = TOLERANCES[dtype][0] / 10
    ours = (y.float() - y32).abs().max().item()
    theirs = (y_torch.float() - y32).abs().max().item()
    assert ours <= 2 * theirs + atol, f"{dtype}: error {ours} vs torch's {theirs}"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_low_precision_error_rule(dtype, channels_last):
    _assert_low_precision_rule((4, 5, 6, 7), dtype, channels_last)


# --------------------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize("case", range(10))
def test_opcheck(case):
    op, args = _op_samples("triton")[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    assert_compiled_matches_eager("triton", mode="kernels")


# --------------------------------------------------------------------------- compiled kernels, without a GPU

# Run in a fresh interpreter (the test process has TRITON_INTERPRET=1, under which @triton.jit does
# not compile). Compiles each kernel for sm_90 (benchmarks/triton_codegen.py) as a launch on aligned
# tensors would (pointers, sizes and non-unit strides divisible by 16, which Triton detects and
# specialises on), for both layouts and both offset widths, and reports whether global loads and stores
# came out as vectors, i.e. along the unit-stride axis.
_COMPILE_SCRIPT = r"""
import json, sys
import torch
from benchmarks.triton_codegen import compile_kernel
from bnfused.backends import triton_kernels as K

TILE_ARGS = ("C", "cols", "col_blocks", "num_tiles", "tiles_per_chunk", "stride_row", "stride_col", "stride_c")
KERNELS = {
    K._stats_partial_kernel: {},
    K._normalize_kernel: dict(FROM_RUNNING_VAR=False, HAS_WEIGHT=True, HAS_BIAS=True, ACT=4, HAS_RESIDUAL=True,
                              ROUND_BF16=False),
    K._backward_partial_kernel: dict(ACT=4, HAS_WEIGHT=True, HAS_BIAS=True, HAS_RESIDUAL=True, NEED_G_XHAT=True,
                                     STORE_G=True, ROUND_BF16=False),
    K._backward_dx_kernel: dict(TRAINING=True, NEED_DX=True, STORE_G=True, HAS_WEIGHT=True, HAS_BIAS=True, ACT=4,
                                HAS_RESIDUAL=True, ROUND_BF16=False),
    K._forward_fused_kernel: dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_RUNNING_MEAN=True, HAS_RUNNING_VAR=True, ACT=4,
                                  HAS_RESIDUAL=True, ROUND_BF16=False, ROUND_BF16_RUNNING=False),
    K._backward_fused_kernel: dict(NEED_G_XHAT=True, NEED_DX=True, STORE_G=True, HAS_WEIGHT=True, HAS_BIAS=True,
                                   ACT=4, HAS_RESIDUAL=True, ROUND_BF16=False),
    K._stats_finalize_kernel: dict(OUTPUT_INVSTD=True, HAS_RUNNING_MEAN=True, HAS_RUNNING_VAR=True, ROUND_BF16=False,
                                   BLOCK_C=64, BLOCK_K=16),
    K._sum_chunks_kernel: dict(BOTH=True, BLOCK_C=64, BLOCK_K=16),
}
LAYOUTS = {
    "contiguous": dict(stride_col=1, BLOCK_C=2, BLOCK_S=1024, COL_VEC=1),
    "channels_last": dict(stride_c=1, BLOCK_C=64, BLOCK_S=32, COL_VEC=1),
}
# Contiguous planes of 196 values (14x14): the row stride, channel stride and row length are multiples
# of 4 but not of 16, so Triton assumes nothing of them; the launcher's COL_VEC says what they are.
SHORT_PLANE = dict(stride_col=1, BLOCK_C=16, BLOCK_S=256, COL_VEC=4, INT64=False)
# (kernel, its report name, its constexprs): both layouts and offset widths with the flags above
# (hardswish and the residual: the backward that reads the most), and every other activation code.
jobs = []
for fn, flags in KERNELS.items():
    tiled = "BLOCK_S" in fn.arg_names
    for layout, layout_consts in (LAYOUTS.items() if tiled else [("-", {})]):
        for int64 in ((False, True) if tiled else (False,)):
            consts = {**flags, **layout_consts, "INT64": int64} if tiled else flags
            jobs.append((fn, f"{layout},int64={int64}", consts))
        for act in (0, 1, 3, 5) if "ACT" in flags else ():
            jobs.append((fn, f"{layout},int64=False,act={act}", {**flags, **layout_consts, "INT64": False, "ACT": act}))
    if tiled:
        jobs.append((fn, "short_plane", {**flags, **SHORT_PLANE}))
report = {}
for fn, name, consts in jobs:
    # Sizes and strides 1024 (multiples of 16, which Triton specialises on) or, for short planes, 196.
    size = 196 if name == "short_plane" else 1024
    runtime = {arg: size if arg in TILE_ARGS or arg == "K" else 0.5 for arg in fn.arg_names
               if arg not in consts and not arg.endswith("_ptr")}  # fmt: skip
    found = compile_kernel(fn, runtime, consts, torch.float32, 4, 90)
    report[f"{fn.__name__}[{name}]"] = {"vector_loads": "v" in found["loads"], "vector_stores": "v" in found["stores"]}
json.dump(report, sys.stdout)
"""


def test_kernels_compile_for_gpu_with_coalesced_vector_access():
    """Catches what the interpreter cannot: kernels that fail to compile, or tiles whose fast axis
    is not the unit-stride one (no 128-bit vector accesses) in either layout, or planes whose length
    is a multiple of 4 but not of 16 moved one value at a time."""
    import inspect

    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("ahead-of-time compile through ASTSource(constexprs=...) needs triton >= 3.3")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert len(report) == 6 * 2 * 2 + 2 + 5 * 2 * 4 + 6, report
    for name, access in report.items():
        assert access["vector_loads"], f"{name}: scalar global loads"
        if name.startswith(("_normalize_kernel", "_backward_dx_kernel", "_forward_fused", "_backward_fused")):
            assert access["vector_stores"], f"{name}: scalar global stores"


# --------------------------------------------------------------------------- GPU: larger shapes, compiled kernels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_matches_torch_larger_shape(dtype, channels_last, training):
    """CPU twins: test_matches_torch_layouts and test_matches_torch_low_precision."""
    assert_matches_torch(
        "triton", (16, 64, 28, 28), dtype=dtype, channels_last=channels_last, training=training, activation="relu"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_gpu_low_precision_error_rule_larger_shape(dtype, channels_last):
    """CPU twin: test_low_precision_error_rule."""
    _assert_low_precision_rule((32, 64, 28, 28), dtype, channels_last)


@pytest.mark.gpu
def test_gpu_past_2_31_elements():
    """CPU twins: test_matches_torch_multi_tile[int64-offsets] and test_plan_uses_64_bit_offsets_past_2_31_elements."""
    x = torch.randn((1, 2, 2**30 + 2**20), device="cuda", dtype=torch.float16)
    assert triton_backend._plan(x).int64
    mean, var = triton_backend.batch_stats(x)
    want_var, want_mean = torch.var_mean(x[0].float(), dim=1, correction=0)
    torch.testing.assert_close(mean, want_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, want_var, rtol=1e-4, atol=1e-5)
    y = triton_backend.normalize(x, None, None, mean, torch.rsqrt(var + 1e-5), activation.NONE, 0.0)
    # y is float16, rounded once from the kernel's fp32 value: compare with the fp32 formula rounded alike.
    want_y = (x[0, 1, -5:].float() - mean[1]) * torch.rsqrt(var[1] + 1e-5)
    torch.testing.assert_close(y[0, 1, -5:], want_y.half())


def test_interpreter_is_active_without_gpu():
    """The CPU runs of this file mean something only if the kernels really ran in the interpreter."""
    if DEVICE.type == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
    else:
        assert os.environ.get("TRITON_INTERPRET") != "1"
