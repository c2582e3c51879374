"""Timing a callable the right way for its device, and the device-copy bandwidth that is the roofline.

GPU: ``triton.testing.do_bench`` (CUDA events around many calls, L2 flushed between them, gradients
reset outside the timed region). CPU: ``torch.utils.benchmark.Timer`` over many blocks of about
0.5 ms each (enough calls per block that the timer's overhead is negligible), on the wall clock,
or on the thread's CPU clock when torch runs single-threaded (see ``clock_name``).
Both report the median and the 20th / 80th percentiles in milliseconds.
"""

from __future__ import annotations

import math
import statistics
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.utils.benchmark as torch_benchmark

QUANTILES = (0.5, 0.2, 0.8)
# CPU blocks: long enough that the timer's own cost (about a microsecond) is noise, short enough
# that most of them run without being preempted; at least a few of them per measurement.
_BLOCK_SECONDS = 5e-4
_MAX_BLOCK_CALLS = 1 << 16
_MIN_BLOCKS = 3


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20th / 80th percentiles."""

    ms: float
    q20_ms: float
    q80_ms: float


@dataclass(frozen=True)
class Budget:
    """How long to measure: ``seconds`` of timed calls (CPU), ``warmup_ms`` / ``rep_ms`` (GPU)."""

    seconds: float
    warmup_calls: int
    warmup_ms: int
    rep_ms: int


FULL = Budget(seconds=0.25, warmup_calls=3, warmup_ms=25, rep_ms=100)
QUICK = Budget(seconds=0.05, warmup_calls=2, warmup_ms=5, rep_ms=10)


def as_columns(measured: Timing) -> dict[str, str]:
    """The ms, q20_ms and q80_ms CSV fields."""
    return {"ms": f"{measured.ms:.6g}", "q20_ms": f"{measured.q20_ms:.6g}", "q80_ms": f"{measured.q80_ms:.6g}"}


def median_timing(timings: Sequence[Timing]) -> Timing:
    """Field by field median of repeated measurements of one case."""
    return Timing(*(statistics.median(getattr(t, f) for t in timings) for f in ("ms", "q20_ms", "q80_ms")))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending, non-empty sequence."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def with_grad_reset(fn: Callable[[], object], tensors: Sequence[torch.Tensor]) -> Callable[[], None]:
    """``fn`` preceded by setting ``.grad`` of ``tensors`` to None, so a backward allocates fresh
    gradients each call instead of accumulating into the previous call's."""

    def call() -> None:
        for t in tensors:
            t.grad = None
        fn()

    return call


def _time_cuda(fn: Callable[[], object], budget: Budget, grad_to_none: Sequence[torch.Tensor]) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:  # no Triton: torch.utils.benchmark's timer synchronises CUDA itself
        return _time_cpu(with_grad_reset(fn, grad_to_none), budget)
    # do_bench resets the gradients outside its CUDA-event-timed region.
    median, q20, q80 = do_bench(
        fn, warmup=budget.warmup_ms, rep=budget.rep_ms, grad_to_none=list(grad_to_none), quantiles=list(QUANTILES)
    )
    return Timing(median, q20, q80)


def clock_name(device: torch.device) -> str:
    """What the times of ``device`` are measured with: "cuda-events" (do_bench), "wall", or
    "thread-cpu" (single-threaded CPU runs: the calling thread's CPU time, which excludes the time
    the scheduler gives the core to other processes)."""
    if device.type == "cuda":
        return "cuda-events"
    return "thread-cpu" if torch.get_num_threads() == 1 else "wall"


def _time_cpu(call: Callable[[], object], budget: Budget) -> Timing:
    # With one thread all the work runs on this thread, so its CPU clock measures the work alone;
    # with more, time spent in other threads would be missed and only the wall clock is right.
    clock = time.thread_time if clock_name(torch.device("cpu")) == "thread-cpu" else timeit.default_timer
    # Timer defaults to one thread; the layers must be timed with the threads they really get.
    timer = torch_benchmark.Timer(
        stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads(), timer=clock
    )
    # Many short blocks rather than blocked_autorange's few long ones (>= 10 ms each): on a shared
    # machine a block that loses the CPU to another process is an outlier the median can then drop,
    # instead of a delay that every block contains.
    number = 1
    while True:
        per_call = timer.timeit(number).times[0]
        if per_call * number >= _BLOCK_SECONDS or number >= _MAX_BLOCK_CALLS:
            break
        number = min(_MAX_BLOCK_CALLS, max(2 * number, math.ceil(_BLOCK_SECONDS / max(per_call, 1e-9))))
    times = []
    start = time.perf_counter()
    while len(times) < _MIN_BLOCKS or time.perf_counter() - start < budget.seconds:
        times.append(timer.timeit(number).times[0])
    times.sort()
    return Timing(*(1e3 * _quantile(times, q) for q in QUANTILES))


def measure(
    fn: Callable[[], object], device: torch.device, budget: Budget, grad_to_none: Sequence[torch.Tensor] = ()
) -> Timing:
    """Times ``fn()`` on ``device``; ``.grad`` of ``grad_to_none`` is reset before every call.

    A few untimed calls come first: they compile (torch.compile, Triton), autotune and allocate.
    On CPU the reset is inside the timed statement, but it is a few attribute stores.
    """
    call = with_grad_reset(fn, grad_to_none)
    for _ in range(budget.warmup_calls):
        call()
    if device.type == "cuda":
        return _time_cuda(fn, budget, grad_to_none)
    return _time_cpu(call, budget)


def copy_bandwidth_gbps(device: torch.device, budget: Budget, nbytes: int) -> float:
    """Bandwidth of ``dst.copy_(src)`` for an ``nbytes`` buffer, counting bytes read + written (GB/s).

    This is what a memory-bound elementwise kernel can reach on this device, measured in the same
    run: the denominator of ``roofline_frac`` with ``nbytes`` well above the last-level cache, of
    ``x_copy_frac`` with a layer's input size (a layer that stays in cache moves data at that rate).
    """
    src = torch.empty((nbytes + 3) // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, budget)
    return 2 * src.nbytes / (timing.ms * 1e-3) / 1e9
