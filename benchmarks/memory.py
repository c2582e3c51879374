"""Memory metrics of a BatchNorm layer: minimum bytes moved per mode, bytes saved for backward, peak memory.

The byte model (the numerator of effective bandwidth) counts the MINIMUM traffic any implementation
must have, with E = bytes of one (N, C, *) activation in the input dtype and V = bytes of one (C,)
vector in the parameter dtype:

    fwd-train  read x, write y                                       2E
               read weight, bias, running_mean, running_var;
               write running_mean, running_var, saved mean, invstd    + 8V
    fwd-eval   read x, write y                                       2E
               read weight, bias, running_mean, running_var           + 4V
    bwd        read x, dy, write dx (and read y for a fused ReLU,
               whose mask it is)                                     3E (4E)
               read weight, mean, invstd; write dweight, dbias        + 5V
    step       fwd-train + bwd: the forward must finish (all of x read for the statistics) before
               dy exists, so x is read twice however the work is fused  5E (6E) + 13V

A two-pass forward that reads x twice (statistics, then normalisation) moves 3E, so its effective
bandwidth tops out at 2/3 of the copy bandwidth; a one-pass kernel on data that stays in cache can
reach 1. A separate ReLU adds its own traffic, which this model deliberately does not count: it is
the cost that fusing removes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

MODES = ("fwd-train", "fwd-eval", "bwd", "step")

# (activation-sized tensors moved, (C,) vectors moved), without and with a fused ReLU.
_TRAFFIC = {
    "fwd-train": ((2, 8), (2, 8)),
    "fwd-eval": ((2, 4), (2, 4)),
    "bwd": ((3, 5), (4, 5)),
    "step": ((5, 13), (6, 13)),
}


def min_bytes(mode: str, shape: tuple[int, ...], dtype: torch.dtype, param_dtype: torch.dtype, relu: bool) -> int:
    """Minimum bytes ``mode`` must read + write for an input of ``shape`` (see the module docstring)."""
    activations, vectors = _TRAFFIC[mode][relu]
    activation_bytes = math.prod(shape) * dtype.itemsize
    vector_bytes = shape[1] * param_dtype.itemsize
    return activations * activation_bytes + vectors * vector_bytes


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes one training forward of ``layer`` keeps alive for backward (x: (N, C, *), requires grad).

    Counted with ``saved_tensors_hooks``, once per storage (a tensor saved by two ops, or a view of
    one already saved, costs nothing more). The layer's parameters and buffers are left out: they
    live anyway. The input x is counted, since keeping it is a real cost of the layer.
    """
    persistent = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in persistent:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory allocated during one call of ``fn`` above what was allocated before it.

    CUDA: the caching allocator's peak statistic. CPU: the running sum of the allocation and free
    events torch's profiler records with ``profile_memory=True`` (the CPU allocator keeps no peak of
    its own), in time order. None where neither exists.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    # A profile that recorded no allocation at all is retried once: in about one full test run in four
    # here, a compiled model's profiled step came back with no memory events (a step allocates at least
    # its outputs).
    peak = 0
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        try:
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
            deltas = [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns()) if e.device_type().name == "CPU"]
        except AttributeError:  # a torch whose profiler results lack these fields
            return None
        allocated = 0
        for delta in deltas:
            allocated += delta
            peak = max(peak, allocated)
        if peak > 0:
            break
    return peak
