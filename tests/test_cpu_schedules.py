"""The C++ CPU kernels' schedules give the same bits: elementwise passes over short planes walk the
planes in memory order, the training forward walks tiles of one channel; both apply the same
per-channel coefficients, for any thread count, layout and dtype."""

import pytest
import torch
from helpers import make_input

from bnfused import activation as act_codes
from bnfused.backends import native

pytestmark = pytest.mark.skipif(native.available(torch.device("cpu")) is not None, reason="C++ extension unavailable")


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "shape, channels_last, dtype",
    [
        ((9, 13, 1, 1), False, torch.float32),  # planes of 1 value
        ((9, 13, 7, 1), False, torch.float32),  # planes of 7: a partial vector each
        ((6, 19, 14, 14), False, torch.float32),  # 196 values, C not a multiple of the vector width
        ((6, 19, 14, 14), False, torch.bfloat16),  # 16-bit short planes: AVX2's forward in memory order
        ((6, 19, 20, 20), False, torch.float16),  # 16-bit planes of 800 bytes: every forward by channel
        ((33, 61, 45, 47), False, torch.bfloat16),  # long 16-bit planes in 8.5 MB: sequential walks in memory order
        ((6, 19, 14, 14), True, torch.float32),  # rows of C channels
        ((3, 5, 130, 131), False, torch.float64),  # planes long enough for one tile each
        # float64 takes the memory-order schedules too (its activations chosen per vector)
        ((9, 13, 7, 1), False, torch.float64),  # planes shorter than a vector: plane by plane
        ((6, 19, 14, 14), False, torch.float64),  # 196 values: walked flat
        ((6, 19, 14, 14), True, torch.float64),  # rows of C channels
    ],
)
@pytest.mark.parametrize("act, slope", [(act_codes.NONE, 0.0), (act_codes.LEAKY_RELU, 0.2)])
def test_normalize_schedules_agree_bit_for_bit(shape, channels_last, dtype, act, slope):
    x = make_input(shape, dtype, channels_last=channels_last)
    C = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.rand(C, dtype=acc) + 0.5, torch.randn(C, dtype=acc)
    y_train, mean, invstd = native.forward_train(x, w, b, None, None, 0.1, 1e-5, act, slope)
    for threads in (1, 2):
        y = _with_threads(threads, lambda: native.normalize(x, w, b, mean, invstd, act, slope))
        assert torch.equal(y, y_train), f"{threads} thread(s)"
        assert y.stride() == x.stride()
    # Eval with running stats equal to the batch's: the same coefficients again.
    running_var = (1.0 / invstd.double() ** 2 - 1e-5).to(acc)
    y_eval = native.forward_eval(x, w, b, mean, running_var, 1e-5, act, slope)
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}.get(dtype, 1e-5)  # 16-bit: one rounding of the output apart
    torch.testing.assert_close(y_eval.float(), y_train.float(), rtol=tol, atol=tol)
    for threads in (1, 2):
        again = _with_threads(threads, lambda: native.forward_eval(x, w, b, mean, running_var, 1e-5, act, slope))
        assert torch.equal(again, y_eval), f"eval, {threads} thread(s)"


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((9, 13, 2, 2), torch.float32),  # planes of 4 values, walked flat with a repeated pattern
        ((9, 13, 3, 3), torch.bfloat16),  # 9 values
        ((5, 7, 7, 1), torch.float16),  # 7 values, a sample of 49
        ((9, 13, 2, 2), torch.float64),
        ((2, 1000, 3, 3), torch.float32),  # a period (18000 values) too long for the pattern: plane by plane
    ],
)
@pytest.mark.parametrize("act, slope", [(act_codes.NONE, 0.0), (act_codes.LEAKY_RELU, 0.2), (act_codes.SILU, 0.0)])
@pytest.mark.parametrize("residual", [False, True])
def test_short_planes_walked_flat_give_the_bits_of_the_plane_walk(shape, dtype, act, slope, residual):
    """Contiguous planes shorter than a vector are normalised walked flat; the same values stored
    channels_last are normalised as rows of C channels: the eval forward, the normalize op and the
    training forward's output give the same bits."""
    x = make_input(shape, dtype)
    apart = x.contiguous(memory_format=torch.channels_last)
    r = make_input(shape, dtype) if residual else None
    C = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.rand(C, dtype=acc) + 0.5, torch.randn(C, dtype=acc)
    rm, rv = torch.randn(C, dtype=acc), torch.rand(C, dtype=acc) + 0.5
    for threads in (1, 2):
        eval_flat, eval_apart = (
            _with_threads(threads, lambda t=t, rt=rt: native.forward_eval(t, w, b, rm, rv, 1e-5, act, slope, rt))
            for t, rt in ((x, r), (apart, None if r is None else r.contiguous(memory_format=torch.channels_last)))
        )
        assert torch.equal(eval_flat, eval_apart), f"eval, {threads} thread(s)"
        y_train, mean, invstd = _with_threads(
            threads, lambda: native.forward_train(x, w, b, None, None, 0.1, 1e-5, act, slope, r)
        )
        if r is None:
            y_apart = _with_threads(threads, lambda m=mean, i=invstd: native.normalize(apart, w, b, m, i, act, slope))
            assert torch.equal(y_train, y_apart), f"train, {threads} thread(s)"
    want = act_codes.apply(
        torch.nn.functional.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False, 0.0, 1e-5)
        + (0 if r is None else r.double()),
        act,
        slope,
    )
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-5}.get(dtype, 1e-12)
    torch.testing.assert_close(eval_flat.double(), want, rtol=tol, atol=tol)


def test_short_planes_large_enough_to_stream_match_a_small_slice():
    """(128, 256, 14, 14) float32 is 25.7 MB: its eval output is streamed (aligned whole vectors) in
    memory order; every value must equal the same computation on one sample, which is not streamed."""
    x = make_input((128, 256, 14, 14), torch.float32)
    C = x.shape[1]
    w, b, rm, rv = torch.rand(C) + 0.5, torch.randn(C), torch.randn(C), torch.rand(C) + 0.5
    y = native.forward_eval(x, w, b, rm, rv, 1e-5, act_codes.RELU, 0.0)
    for n in (0, 77, 127):
        assert torch.equal(y[n : n + 1], native.forward_eval(x[n : n + 1], w, b, rm, rv, 1e-5, act_codes.RELU, 0.0))
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5)))
