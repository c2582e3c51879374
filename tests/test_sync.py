"""SyncBatchNorm across 2 and 3 processes (gloo on loopback) against one nn.BatchNorm over the global batch.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so the oracle is a plain ``nn.BatchNorm`` run on the
concatenation of every rank's batch: each rank's output and input gradient must equal its slice,
the running stats on every rank must equal the oracle's, and the local weight/bias gradients summed
over ranks must equal the oracle's. Every rank builds the same global batch from a shared seed.

Spawning costs seconds, so one spawned job runs many cases. A collective that never completes
fails the test: the process group has a 60 s timeout and the parent stops waiting after
``JOIN_TIMEOUT_S``.
"""

from __future__ import annotations

import copy
import datetime
import inspect
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TOLERANCES, TORCH_CLASSES, _activate, make_input
from processes import run_processes
from torch import nn

import bnfused
from bnfused import backends
from bnfused.sync import merge_stats

COLLECTIVE_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 240
SYNC_BACKENDS = ("reference", "cpp", "triton")  # the backends that run on CPU tensors
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce")
ONE_VALUE_ERROR = "Expected more than 1 value per channel when training"


# --------------------------------------------------------------------------- process plumbing


def _run_in_processes(world_size: int, job, *args) -> None:
    """Runs ``job(rank, world_size, *args)`` in ``world_size`` processes (gloo, loopback); an exception
    or a hang in any of them fails the calling test."""
    run_processes(world_size, job, *args, timeout_s=JOIN_TIMEOUT_S, collective_timeout_s=COLLECTIVE_TIMEOUT_S)


class _CountCollectives:
    """Counts calls of the torch.distributed collectives while active (patched in this process only)."""

    def __enter__(self):
        self.calls: list[str] = []
        self._originals = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, original in self._originals.items():
            setattr(dist, name, self._counted(name, original))
        return self

    def _counted(self, name, original):
        def call(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        return call

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _require_backend(name: str) -> None:
    reason = backends.unavailable_reason(name, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable on CPU: {reason}")


# --------------------------------------------------------------------------- the oracle


def _pair(num_features, dims, backend, dtype, *, affine=True, track=True, momentum=0.1, activation=None, slope=0.01):
    """(bnfused.SyncBatchNorm, torch oracle) with the same random affine parameters; for float16 and
    bfloat16 input both hold float32 parameters and the oracle runs in float32 (the helpers' rule)."""
    kwargs = dict(affine=affine, track_running_stats=track, momentum=momentum, dtype=_oracle_dtype(dtype))
    ref = TORCH_CLASSES[dims](num_features, **kwargs)
    mod = bnfused.SyncBatchNorm(num_features, activation=activation, negative_slope=slope, backend=backend, **kwargs)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    mod.load_state_dict(ref.state_dict())
    return mod, ref


def _oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_sync_step(rank, sizes, tail, mod, ref, *, dtype=torch.float32, activation=None, slope=0.01,
                     channels_last=False, offset=2.0, scale=3.0, where=""):  # fmt: skip
    """One forward/backward of mod on this rank's slice and of ref on the global batch; asserts parity
    and that the layer used exactly one collective each way."""
    x = make_input((sum(sizes), *tail), dtype, channels_last, offset=offset, scale=scale)
    dy = torch.randn(x.shape, dtype=_oracle_dtype(dtype))
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x_ref = x.to(_oracle_dtype(dtype)).detach().requires_grad_()
    y_ref = _activate(ref(x_ref), activation, slope)
    y_ref.backward(dy)
    dy = dy.to(dtype)
    x_mod = x[lo:hi].detach().requires_grad_()
    for p in mod.parameters():
        p.grad = None
    with _CountCollectives() as forward:
        y = mod(x_mod)
    with _CountCollectives() as backward:
        y.backward(dy[lo:hi])
    where = f"{where} rank {rank} sizes {sizes}"
    assert forward.calls == ["all_gather"], f"{where}: forward collectives {forward.calls}"
    assert backward.calls == ["all_reduce"], f"{where}: backward collectives {backward.calls}"
    atol, rtol = TOLERANCES[dtype]
    assert y.shape == x_mod.shape and y.dtype == dtype
    y, dx = y.to(y_ref.dtype), x_mod.grad.to(y_ref.dtype)
    torch.testing.assert_close(y, y_ref[lo:hi], atol=atol, rtol=rtol, msg=lambda m: f"output, {where}: {m}")
    torch.testing.assert_close(dx, x_ref.grad[lo:hi], atol=atol * 5, rtol=rtol * 5,
                               msg=lambda m: f"input grad, {where}: {m}")  # fmt: skip
    if ref.affine:
        grad_scale = max(1.0, (x.numel() / x.shape[1]) ** 0.5)  # sums over more values carry more rounding
        for name in ("weight", "bias"):
            summed = getattr(mod, name).grad.clone()
            dist.all_reduce(summed)
            torch.testing.assert_close(summed, getattr(ref, name).grad, atol=atol * 5 * grad_scale, rtol=rtol * 5,
                                       msg=lambda m, n=name: f"{n} grad summed over ranks, {where}: {m}")  # fmt: skip
        ref.zero_grad()
    _assert_same_running_stats(mod, ref, atol, rtol, where)


def _assert_same_running_stats(mod, ref, atol, rtol, where):
    if not ref.track_running_stats:
        assert mod.running_mean is None and mod.running_var is None
        return
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(mod, name), getattr(ref, name), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}, {where}: {m}")  # fmt: skip
    assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item(), where


# --------------------------------------------------------------------------- jobs run in every process

# (local batch sizes per world size, trailing shape (C, *), options); one row per case.
CASES = {
    2: [
        ((3, 3), (4, 3, 2), dict(steps=2)),
        ((5, 2), (3, 4, 3), dict(activation="relu", momentum=None, steps=3, channels_last=True)),
        ((4, 0), (3, 5), dict(activation="leaky_relu", slope=0.2, steps=2)),
        ((1, 1), (6,), dict(steps=2)),  # 1 value per channel per rank, 2 globally: allowed
        ((2, 5), (3, 4), dict(affine=False, track=False)),
        # |mean| >> std: only a merge made of deviations from the mean stays exact in float64
        ((3, 4), (2, 5), dict(dtype=torch.float64, offset=1e4, scale=0.1, steps=2)),
        ((3, 2), (3, 4), dict(dtype=torch.float16)),
    ],
    3: [
        ((3, 0, 2), (3, 2, 3), dict(activation="relu", momentum=None, steps=2)),
        ((1, 1, 0), (4,), dict(steps=2)),
        ((2, 3, 4), (2, 3), dict(dtype=torch.float64, activation="leaky_relu", slope=0.1)),
        ((2, 0, 3), (3, 2, 2), dict(dtype=torch.bfloat16, activation="relu", steps=2)),
    ],
}


def _job_sync_cases(rank: int, world_size: int, backend: str) -> None:
    torch.set_num_threads(1)  # up to 3 processes share the CI machine's 2 cores
    torch.manual_seed(1234)  # same on every rank: every rank builds the same global batches
    for case, (sizes, tail, opts) in enumerate(CASES[world_size]):
        opts = dict(opts)
        steps, dtype = opts.pop("steps", 1), opts.pop("dtype", torch.float32)
        data = {k: opts.pop(k) for k in ("channels_last", "offset", "scale") if k in opts}
        activation, slope = opts.get("activation"), opts.get("slope", 0.01)
        mod, ref = _pair(tail[0], 1 + len(tail), backend, dtype, **opts)
        for step in range(steps):
            _check_sync_step(rank, sizes, tail, mod, ref, dtype=dtype, activation=activation, slope=slope,
                             where=f"case {case} step {step}", **data)  # fmt: skip
    _check_eval_without_communication(rank, mod, ref, tail)
    _check_global_batch_of_one_or_none(rank, world_size, backend)
    for dtype in (torch.float32, torch.bfloat16):
        _check_variance_beyond_float32(rank, world_size, backend, dtype)


def _job_three_processes(rank: int, world_size: int) -> None:
    _job_sync_cases(rank, world_size, "reference")
    _check_converted_model_under_ddp(rank, world_size, (3, 1, 0))
    _check_under_torch_compile(rank, (4, 2, 0))


def _check_under_torch_compile(rank: int, sizes) -> None:
    """torch.compile(model) runs the synchronised layer eagerly (one graph break) with the same numbers."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), bnfused.SyncBatchNorm(4, activation="relu", backend="reference"))
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(sum(sizes), 3)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for m in (compiled, twin):
        m(x[lo:hi]).sum().backward()
    for (name, p), p_twin in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, p_twin.grad, msg=lambda m, n=name: f"{n} grad under compile: {m}")
    for (name, b), b_twin in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, b_twin, msg=lambda m, n=name: f"{n} under compile: {m}")


def _check_eval_without_communication(rank: int, mod, ref, tail) -> None:
    """Eval mode uses the running stats and never communicates: only rank 0 runs it here, so a
    collective would pair with the barrier below and fail."""
    mod.eval()
    ref.eval()
    if rank == 0:
        x = make_input((3, *tail), mod.running_mean.dtype).requires_grad_()
        with _CountCollectives() as counted:
            y = mod(x)
            y.sum().backward()
        assert counted.calls == [], f"eval mode communicated: {counted.calls}"
        x_ref = x.detach().requires_grad_()
        y_ref = _activate(ref(x_ref), mod.activation, mod.negative_slope)
        y_ref.sum().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
    dist.barrier()


def _check_global_batch_of_one_or_none(rank: int, world_size: int, backend: str) -> None:
    """A global batch of 1 value per channel raises on every rank (after the one collective, so no
    rank is left waiting); a global batch of 0 values is an empty output."""
    mod = bnfused.SyncBatchNorm(3, backend=backend)
    x = torch.randn(1 if rank == 0 else 0, 3)
    with pytest.raises(ValueError, match=ONE_VALUE_ERROR):
        mod(x)
    assert torch.equal(mod.running_mean, torch.zeros(3)), "a refused batch must not update the running stats"
    # Every rank empty: an empty output, as for an empty batch without synchronisation; stats untouched.
    y = mod(torch.randn(0, 3))
    assert y.shape == (0, 3)
    assert torch.equal(mod.running_mean, torch.zeros(3)) and torch.equal(mod.running_var, torch.ones(3))


def _check_variance_beyond_float32(rank: int, world_size: int, backend: str, dtype: torch.dtype) -> None:
    """Values near 1e30 on rank 0 only: the global variance (1e60) overflows float32 on every rank, which
    then takes a second gather of float64 statistics; output, input gradient and parameter gradients
    equal a float64 oracle (torch's float32 kernels give y = bias there), the running variance is inf
    as the oracle's rounded to float32."""
    sizes = (3, *[2] * (world_size - 1))
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    torch.manual_seed(7)
    x = make_input((sum(sizes), 3, 2, 2), torch.float64)
    x[: sizes[0]] *= 1e30
    x = x.to(dtype)
    dy = torch.randn(x.shape, dtype=torch.float64)
    ref = nn.BatchNorm2d(3, momentum=0.5, dtype=torch.float64)
    mod = bnfused.SyncBatchNorm(3, momentum=0.5, activation="relu", backend=backend)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    mod.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    x_ref = x.to(torch.float64).requires_grad_()
    y_ref = torch.relu(ref(x_ref))
    y_ref.backward(dy)
    x_mod = x[lo:hi].detach().requires_grad_()
    with _CountCollectives() as forward:
        y = mod(x_mod)
    y.backward(dy[lo:hi].to(dtype))
    where = f"{dtype} rank {rank}"
    assert forward.calls == ["all_gather"] * 2, f"{where}: forward collectives {forward.calls}"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), y_ref[lo:hi], atol=atol, rtol=rtol, msg=lambda m: f"output, {where}: {m}")
    grad_unit = x_ref.grad.abs().max()  # about 1e-30: compared relative to the largest
    torch.testing.assert_close(x_mod.grad.double() / grad_unit, x_ref.grad[lo:hi] / grad_unit, atol=atol * 5,
                               rtol=rtol * 5, msg=lambda m: f"input grad, {where}: {m}")  # fmt: skip
    for name in ("weight", "bias"):
        summed = getattr(mod, name).grad.clone()
        dist.all_reduce(summed)
        torch.testing.assert_close(summed.double(), getattr(ref, name).grad, atol=atol * 10, rtol=rtol * 5,
                                   msg=lambda m, n=name: f"{n} grad summed over ranks, {where}: {m}")  # fmt: skip
    torch.testing.assert_close(mod.running_mean, ref.running_mean.float(), msg=lambda m: f"running_mean, {where}: {m}")
    assert torch.isinf(mod.running_var).all() and torch.isinf(ref.running_var.float()).all(), where


def _check_converted_model_under_ddp(rank: int, world_size: int, sizes) -> None:
    """convert_model(sync=True) + DistributedDataParallel: two steps equal the original model on the
    global batch; DDP averages the parameter gradients, so they equal the global ones / world_size."""
    torch.manual_seed(99)
    original = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 1), bnfused.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.1),
        nn.Flatten(), nn.Linear(3 * 16, 5), nn.BatchNorm1d(5),
    )  # fmt: skip
    converted = bnfused.convert_model(copy.deepcopy(original), fuse_relu=True, sync=True)
    assert [type(converted[i]) for i in (1, 4, 7)] == [bnfused.SyncBatchNorm] * 3
    assert converted[1].activation == "relu" and isinstance(converted[2], nn.Identity)
    assert (converted[4].activation, converted[4].negative_slope) == ("leaky_relu", 0.1)
    model = nn.parallel.DistributedDataParallel(converted)
    for step in range(2):
        x = torch.randn(sum(sizes), 2, 6, 6)
        dy = torch.randn(sum(sizes), 5)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        original.zero_grad()
        model.zero_grad()
        y_ref = original(x)
        y_ref.backward(dy)
        y = model(x[lo:hi])
        y.backward(dy[lo:hi])
        where = f"step {step} rank {rank}"
        torch.testing.assert_close(y, y_ref[lo:hi], atol=1e-4, rtol=1e-4, msg=lambda m, w=where: f"output, {w}: {m}")
        for (name, p_ref), p in zip(original.named_parameters(), converted.parameters()):
            torch.testing.assert_close(p.grad * world_size, p_ref.grad, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, n=name, w=where: f"{n} grad, {w}: {m}")  # fmt: skip
        for (name, b_ref), b in zip(original.named_buffers(), converted.buffers()):
            torch.testing.assert_close(b, b_ref, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=name, w=where: f"{n}, {w}: {m}")  # fmt: skip


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_two_processes_match_batchnorm_over_global_batch(backend):
    _require_backend(backend)
    _run_in_processes(2, _job_sync_cases, backend)


def test_three_processes_match_global_batch_also_under_ddp_and_compile():
    backends.resolve(None, torch.device("cpu"))  # the DDP model's backend: built here, not while ranks wait
    _run_in_processes(3, _job_three_processes)


def _job_rank_one_skips_the_collective(rank: int, world_size: int) -> None:
    if rank == 0:
        bnfused.SyncBatchNorm(2, backend="reference")(torch.randn(4, 2))  # waits for a partner that never comes
    else:
        time.sleep(3)


def test_a_collective_without_partner_fails_instead_of_hanging():
    with pytest.raises(mp.ProcessRaisedException):
        run_processes(2, _job_rank_one_skips_the_collective, timeout_s=60, collective_timeout_s=2)


def _check_local_fallback(backend: str) -> None:
    """Plain BatchNorm semantics with no collective: matches nn.BatchNorm2d, and a local batch of 1
    value per channel is refused as torch refuses it."""
    mod, ref = _pair(3, 4, backend, torch.float32, activation="relu", momentum=None)
    for _ in range(2):
        x = make_input((4, 3, 2, 2), torch.float32).requires_grad_()
        x_ref = x.detach().requires_grad_()
        with _CountCollectives() as counted:
            y = mod(x)
            y.sum().backward()
        assert counted.calls == []
        y_ref = _activate(ref(x_ref), "relu", 0.0)
        y_ref.sum().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
        _assert_same_running_stats(mod, ref, *TOLERANCES[torch.float32], "fallback")
    with pytest.raises(ValueError, match=ONE_VALUE_ERROR):
        mod(torch.randn(1, 3, 1, 1))


def test_falls_back_to_plain_batch_norm_when_not_distributed():
    assert not dist.is_initialized()
    _check_local_fallback("reference")


def test_falls_back_to_plain_batch_norm_with_world_size_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
    try:
        _check_local_fallback("reference")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sync_path_in_one_process_matches_torch(device, tmp_path):
    """The synchronised path itself (collectives included: gloo on CPU, NCCL on CUDA) in a group of
    one, against nn.SyncBatchNorm on CUDA (its world-size-1 fallback) or nn.BatchNorm2d on CPU."""
    init = f"file://{tmp_path}/store"
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=init, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
    try:
        ref = (nn.SyncBatchNorm if device == "cuda" else nn.BatchNorm2d)(3, momentum=0.5).to(device)
        weight, bias = nn.Parameter(torch.rand(3, device=device) + 0.5), nn.Parameter(torch.randn(3, device=device))
        with torch.no_grad():
            ref.weight.copy_(weight)
            ref.bias.copy_(bias)
        running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
        for _ in range(2):
            x = make_input((4, 3, 5, 5), torch.float32).to(device).requires_grad_()
            x_ref = x.detach().requires_grad_()
            dy = torch.randn_like(x)
            y = bnfused.sync.sync_batch_norm(x, running_mean, running_var, weight, bias, 0.5, 1e-5, "relu")
            y.backward(dy)
            y_ref = torch.nn.functional.relu(ref(x_ref))
            y_ref.backward(dy)
            atol, rtol = TOLERANCES[torch.float32]
            torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
            torch.testing.assert_close(x.grad, x_ref.grad, atol=atol * 5, rtol=rtol * 5)
            torch.testing.assert_close(running_mean, ref.running_mean, atol=atol, rtol=rtol)
            torch.testing.assert_close(running_var, ref.running_var, atol=atol, rtol=rtol)
        torch.testing.assert_close(weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("upstream_requires_grad", [False, True])
def test_sync_path_double_backward_raises(upstream_requires_grad, tmp_path):
    """The synchronised backward has no second derivative (nor has torch's): a gradient taken with
    create_graph=True requires grad, and differentiating it raises, also when dy is a constant
    (where nothing else in the graph would notice, and the result would silently lack terms)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
    try:
        x = make_input((4, 3, 5, 5), torch.float32).requires_grad_()
        weight = nn.Parameter(torch.rand(3) + 0.5)
        y = bnfused.sync.sync_batch_norm(x, None, None, weight, None, 0.1, 1e-5)
        dy = torch.randn(4, 3, 5, 5, requires_grad=upstream_requires_grad)
        dx, dw = torch.autograd.grad(y, (x, weight), dy, create_graph=True)
        assert dx.requires_grad and dw.requires_grad
        with pytest.raises(RuntimeError, match="SyncBatchNorm has no second derivative"):
            dx.pow(2).sum().backward()
    finally:
        dist.destroy_process_group()


def test_sync_path_takes_momentum_and_eps_as_torch_does(tmp_path):
    """0-d tensors are their numbers; other tensors raise torch's TypeError, as bnfused.batch_norm does."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
    try:
        x = make_input((4, 3, 5, 5), torch.float32)
        stats, want_stats = [torch.zeros(3), torch.ones(3)], [torch.zeros(3), torch.ones(3)]
        y = bnfused.sync.sync_batch_norm(x, *stats, None, None, torch.tensor(0.5), torch.tensor(1e-3))
        want = torch.nn.functional.batch_norm(x, *want_stats, None, None, True, 0.5, 1e-3)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(stats, want_stats)
        for momentum in (torch.tensor([0.5]), torch.tensor(0.5, requires_grad=True), torch.tensor([0.1, 0.5, 0.9])):
            with pytest.raises(TypeError, match="argument 'momentum' .* must be float, not Tensor"):
                bnfused.sync.sync_batch_norm(x, *stats, None, None, momentum, 1e-5)
    finally:
        dist.destroy_process_group()


def test_merge_stats_handles_empty_ranks_and_large_means():
    torch.manual_seed(0)
    parts = [torch.randn(n, 3, dtype=torch.float64) * 0.01 + 1e5 for n in (4, 0, 7, 1)]
    rows = [
        torch.cat([torch.tensor([float(len(p))], dtype=torch.float64), p.mean(0) if len(p) else p.new_zeros(3),
                   p.var(0, correction=0) if len(p) else p.new_zeros(3)])
        for p in parts
    ]  # fmt: skip
    count, mean, var = merge_stats(torch.stack(rows), 3)
    everything = torch.cat(parts)
    assert count.item() == 12
    torch.testing.assert_close(mean, everything.mean(0), atol=0, rtol=1e-14)
    torch.testing.assert_close(var, everything.var(0, correction=0), atol=0, rtol=1e-7)


def test_convert_sync_batchnorm_keeps_tensors_state_and_activation():
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=None, eps=1e-3, dtype=torch.float64),
        bnfused.BatchNorm1d(6, activation="leaky_relu", negative_slope=0.3, backend="reference"),
        nn.Sequential(nn.BatchNorm2d(2, affine=False, track_running_stats=False)),
    )  # fmt: skip
    model[1].eval()
    torch_bn = model[1]
    state = copy.deepcopy(model.state_dict())
    converted = bnfused.SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert converted is model
    first, second, third = converted[1], converted[2], converted[3][0]
    assert all(type(m) is bnfused.SyncBatchNorm for m in (first, second, third))
    assert first.weight is torch_bn.weight and first.running_var is torch_bn.running_var
    assert first.num_batches_tracked is torch_bn.num_batches_tracked
    assert not first.training and second.training
    assert (first.momentum, first.eps, first.weight.dtype) == (None, 1e-3, torch.float64)
    assert (second.activation, second.negative_slope, second.backend) == ("leaky_relu", 0.3, "reference")
    assert third.weight is None and third.running_mean is None
    assert converted.state_dict().keys() == state.keys()
    assert isinstance(bnfused.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2)), bnfused.SyncBatchNorm)


def test_convert_sync_batchnorm_refuses_uninitialized_lazy_layer():
    with pytest.raises(ValueError, match="num_features"):
        bnfused.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))


def test_constructor_matches_torch_sync_batch_norm():
    mod = bnfused.SyncBatchNorm(5, 1e-3, 0.2, True, True, None, activation="relu")
    ref = nn.SyncBatchNorm(5, 1e-3, 0.2, True, True, None)
    # DistributedDataParallel refuses nn.SyncBatchNorm instances on CPU: bnfused's must not be one.
    assert isinstance(mod, nn.modules.batchnorm._BatchNorm) and not isinstance(mod, nn.SyncBatchNorm)
    torch_params = list(inspect.signature(nn.SyncBatchNorm).parameters)[:8]
    assert list(inspect.signature(bnfused.SyncBatchNorm).parameters)[:8] == torch_params
    assert mod.state_dict().keys() == ref.state_dict().keys()
    assert (mod.eps, mod.momentum, mod.activation) == (1e-3, 0.2, "relu")
    with pytest.raises(ValueError, match="activation"):
        bnfused.SyncBatchNorm(5, activation="gelu")
    with pytest.raises(ValueError, match="non-zero"):
        bnfused.SyncBatchNorm(0)(torch.randn(2, 0))
