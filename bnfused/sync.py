"""``SyncBatchNorm``: BatchNorm whose statistics span every process of a ``torch.distributed`` group.

The same split that ``torch.nn.SyncBatchNorm`` uses, built on bnfused's backend primitives
(``bnfused.backends``), so each step runs the fused kernels of the resolved backend:

Forward (training), on every rank:
    1. ``batch_stats`` -> local per-channel (mean_r, biased var_r) over the rank's n_r values
    2. ONE all_gather of the packed [n_r, mean_r, var_r] (float64, so counts stay exact), then the
       Chan et al. parallel merge, identical on every rank:
           n    = sum_r n_r
           mean = sum_r n_r * mean_r / n
           var  = sum_r n_r * (var_r + (mean_r - mean)^2) / n
       Every term is a deviation from a mean, so it is stable for |mean| >> std, and a rank with an
       empty batch (n_r = 0) adds nothing but still joins the collective, as it must. An all_reduce
       of (count, sum, sum of squares) would need the naive E[x^2] - E[x]^2 and is not used.
       Where a variance overflowed the backend's float32 (|x| beyond ~1e19), every rank sees it in the
       gathered numbers and gathers again, with local statistics in float64: invstd is then computed
       from the float64 variance, as torch's CPU kernels do.
    3. running stats updated with the global (mean, unbiased var): the same numbers on every rank
    4. ``normalize`` -> y = act((x - mean) * invstd * w + b)

Backward:
    1. ``backward_reduce`` -> local (sum g, sum g * x_hat)
    2. ONE all_reduce (SUM) of the two packed sums
    3. ``backward_elemt`` with the global sums and the global count -> dx
    dweight, dbias are the LOCAL sums, as in ``torch.nn.SyncBatchNorm``: DistributedDataParallel
    then averages them across ranks like any other parameter gradient.

Limits: every rank of the group must call forward (and, when the input needs a gradient, backward)
the same number of times, with the same number of channels: the collectives pair up in call order.
The forward reads the global count on the host (one device sync, as torch's does) because the
"more than 1 value per channel" check and the unbiased running variance need it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import Proxy

from bnfused import activation as act_codes
from bnfused import backends, layout, ops
from bnfused.functional import check_arguments, check_eps, empty_batch_norm, float_arguments
from bnfused.modules import _FusedBatchNorm, swap_submodules

# Dtype of the exchanged statistics: float64 keeps per-rank counts exact far beyond 2^24 values.
_EXCHANGE_DTYPE = torch.float64


def _gather(packed: torch.Tensor, process_group, world_size: int) -> torch.Tensor:
    """all_gather of one (K,) tensor per rank -> (world_size, K)."""
    # gloo (CPU tensors, also under a "cpu:gloo,cuda:nccl" group) has no all_gather_into_tensor.
    if packed.device.type == "cpu" or dist.get_backend(process_group) == "gloo":
        parts = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(parts, packed, group=process_group)
        return torch.stack(parts)
    gathered = packed.new_empty(world_size, packed.numel())
    dist.all_gather_into_tensor(gathered, packed, group=process_group)
    return gathered


def merge_stats(gathered: torch.Tensor, num_channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al. merge of per-rank statistics.

    Args:
        gathered: (R, 1 + 2C) rows [count_r, mean_r (C,), biased var_r (C,)]; rows with count 0 are ignored.
    Returns:
        (total count (scalar), mean (C,), biased var (C,)) in gathered's dtype; mean and var are NaN
        when the total count is 0.
    """
    counts = gathered[:, :1]
    means = gathered[:, 1 : 1 + num_channels]
    variances = gathered[:, 1 + num_channels :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    return total, mean, var


def _gathered_stats(x: torch.Tensor, backend: str, exact: bool, process_group, world_size: int):
    """Every rank's (count, mean, biased var), gathered and merged: (total, mean (C,), var (C,)) in float64.
    ``exact``: the local statistics in ``statistics_dtype`` (float64) rather than by the backend."""
    num_channels = x.shape[1]
    local_count = x.numel() // num_channels
    packed = torch.zeros(1 + 2 * num_channels, dtype=_EXCHANGE_DTYPE, device=x.device)
    packed[0] = local_count
    if local_count > 0:
        reference = backends.module("reference")
        mean, var = reference.batch_stats_exact(x) if exact else backends.module(backend).batch_stats(x)
        packed[1 : 1 + num_channels] = mean
        packed[1 + num_channels :] = var
    return merge_stats(_gather(packed, process_group, world_size), num_channels)


def global_batch_stats(
    x: torch.Tensor, backend: str, process_group, world_size: int
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per-channel statistics of the batch formed by x on every rank of the group (one all_gather, two
    where a variance overflows the accumulation dtype).

    Args:
        x: (N, C, *) kernel-ready; N may be 0 on some ranks.
    Returns:
        (global count of values per channel, mean (C,), biased var (C,)); mean and var in float64.
    """
    total, mean, var = _gathered_stats(x, backend, False, process_group, world_size)
    # One host read for both: the count, and whether a variance overflowed float32 (values beyond
    # ~1e19), which float64 holds, as torch's CPU kernels do. The gathered numbers are the same on
    # every rank, so every rank takes the second gather, or none.
    count, finite = torch.stack([total, torch.isfinite(var).all().to(total.dtype)]).tolist()
    if count > 0 and not finite and x.dtype != torch.float64:
        total, mean, var = _gathered_stats(x, backend, True, process_group, world_size)
    return int(count), mean, var


class SyncBatchNormFunction(torch.autograd.Function):
    """y = act(normalize(x)) with global statistics; the backward all-reduces the per-channel sums.

    Inputs are kernel-ready and checked (see ``sync_batch_norm``); mean, invstd are the global
    (C,) statistics in the accumulation dtype and ``count`` the global number of values per channel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, act, slope, backend, process_group):
        if x.numel() > 0:
            y = backends.module(backend).normalize(x, weight, bias, mean, invstd, act, slope)
        else:
            y = torch.empty_like(x)
        ctx.save_for_backward(x, y if act else None, weight, mean, invstd)
        ctx.config = (count, act, slope, backend, process_group, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        if not torch.is_grad_enabled():
            return _gradients(ctx, dy)
        # create_graph=True: no second derivative (the statistics' dependence on every rank's input
        # is not kept), but torch's requires_grad, and an error when differentiated, also where dy
        # is a constant and autograd would not otherwise notice
        with torch.no_grad():
            dx, dw, db, *rest = _gradients(ctx, dy)
        x, y, weight, _, _ = ctx.saved_tensors
        dx, dw, db, _ = ops.recorded_like_torch(
            (dx, dw, db, None), dy, ctx.needs_input_grad[0], weight, ctx.config[1], (dy, x, y, weight),
            _SECOND_DERIVATIVE_REFUSED,
        )  # fmt: skip
        return dx, dw, db, *rest


_SECOND_DERIVATIVE_REFUSED = (
    "bnfused: SyncBatchNorm has no second derivative (a gradient taken with create_graph=True, then "
    "differentiated), as torch's has none"
)


def _gradients(ctx, dy):
    x, y, weight, mean, invstd = ctx.saved_tensors
    count, act, slope, backend, process_group, bias_dtype = ctx.config
    impl = backends.module(backend)
    dy = layout.like(x, dy)
    if x.numel() > 0:
        sum_g, sum_g_xhat = impl.backward_reduce(dy, x, y, mean, invstd, act, slope)
    else:  # an empty rank still joins the all_reduce below, with zero sums
        sum_g, sum_g_xhat = torch.zeros_like(mean), torch.zeros_like(mean)
    dx = None
    if ctx.needs_input_grad[0]:
        sums = torch.cat([sum_g, sum_g_xhat])  # a new tensor: the local sums stay local
        dist.all_reduce(sums, group=process_group)
        global_g, global_g_xhat = sums.split(mean.numel())
        if x.numel() > 0:
            dx = impl.backward_elemt(dy, x, y, weight, mean, invstd, global_g, global_g_xhat, count, act, slope)
        else:
            dx = torch.empty_like(x)
    dw = sum_g_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = sum_g.to(bias_dtype) if ctx.needs_input_grad[2] else None
    return dx, dw, db, None, None, None, None, None, None, None


# Dynamo would split this at the host read of the count anyway; running it eagerly as a whole keeps
# the collectives out of compiled graphs.
@torch.compiler.disable
def sync_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
    activation: str | None = None,
    negative_slope: float = 0.01,
    backend: str | None = None,
    process_group=None,
) -> torch.Tensor:
    """Training-mode batch norm with statistics over the inputs of every rank in ``process_group``.

    Collective: every rank of the group must call it (an empty local batch included). Arguments mean
    what they mean in ``bnfused.functional.batch_norm`` (with ``training=True``); running stats, when
    given, are updated with the global statistics, identically on every rank.

    Args:
        input: (N, C, *) float16 | bfloat16 | float32 | float64; N may differ between ranks, and be 0.
        process_group: a ``torch.distributed`` group, or None for the default (world) group.
    Returns:
        (N, C, *) tensor with input's dtype.
    Raises:
        ValueError: the global batch has only 1 value per channel.
    """
    momentum, eps = float_arguments(momentum, eps)
    act, slope = act_codes.parse(activation, negative_slope)
    backend = backends.check_request(backend)
    if act not in act_codes.SPLIT_CODES:  # fused in no kernel: the torch activation after the layer
        y = sync_batch_norm(
            input, running_mean, running_var, weight, bias, momentum, eps, None, 0.0, backend, process_group
        )
        return act_codes.apply(y, act, slope)
    # No per-process batch-size rule here: only the global count matters, checked after the gather.
    check_arguments(input, running_mean, running_var, weight, bias)
    check_eps(eps, True)
    if process_group is None:
        process_group = dist.group.WORLD
    world_size = dist.get_world_size(process_group)
    x = layout.kernel_ready(input)
    name = backends.resolve(backend, x.device)
    with torch.no_grad():
        count, mean, var = global_batch_stats(x, name, process_group, world_size)
    if count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 value per channel over all "
            f"{world_size} processes (local input size {tuple(input.shape)})"
        )
    if count == 0:  # every rank is empty: nothing to normalise, running stats stay as they are
        return empty_batch_norm(input, weight, bias, act, slope)
    reference = backends.module("reference")
    reference.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    acc = reference.accumulation_dtype(x.dtype)
    invstd = reference.invstd_of(var, eps, acc)
    return SyncBatchNormFunction.apply(x, weight, bias, mean.to(acc), invstd, count, act, slope, name, process_group)


class SyncBatchNorm(_FusedBatchNorm, nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm`` (same constructor, state_dict and behaviour), on CPU
    (gloo) as well as GPU (NCCL).

    Extra keyword arguments, as on the other bnfused modules: ``activation`` (None, "relu",
    "leaky_relu") fused after the affine step, ``negative_slope`` for leaky_relu, ``backend``.
    Input: (N, C, *), N may differ between ranks and be 0 on some.

    In training mode with ``torch.distributed`` initialised and more than one process in
    ``process_group`` (default: the world), statistics are computed over the global batch (see
    ``sync_batch_norm``). Otherwise (eval mode, not initialised, world size 1) it is the plain
    bnfused BatchNorm, without any communication.

    Not a subclass of ``nn.SyncBatchNorm``: DistributedDataParallel refuses any ``nn.SyncBatchNorm``
    instance in a CPU model, which would rule out gloo training on CPUs.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
        backend: str | None = None,
        **kwargs,  # newer torch: bias=
    ) -> None:
        nn.modules.batchnorm._BatchNorm.__init__(
            self, num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.process_group = process_group
        self._init_fused(activation, negative_slope, backend)

    # torch's own input checks and messages.
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def _sync_group(self):
        """(group, world size) to synchronise over, world size 1 when this forward must not communicate."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group or dist.group.WORLD
        return group, dist.get_world_size(group)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "bnfused.SyncBatchNorm cannot be scripted (nor can torch.nn.SyncBatchNorm: TorchScript has no "
            "torch.distributed); to script a model trained with it, swap its SyncBatchNorm layers for "
            "bnfused.BatchNorm1d/2d/3d, which load their state_dict"
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.__class__ is not torch.Tensor and isinstance(input, Proxy):
            return self._fx_leaf(input)  # a torch.fx leaf, as nn.SyncBatchNorm is
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group, world_size = self._sync_group()
        if world_size == 1:
            return super().forward(input)  # the plain bnfused BatchNorm
        weight, bias, running_mean, running_var, momentum = self._tensors_and_momentum()
        tracked = self.track_running_stats
        return sync_batch_norm(
            input,
            running_mean if tracked else None,
            running_var if tracked else None,
            weight,
            bias,
            momentum,
            self.eps,
            self.activation,
            self.negative_slope,
            self.backend,
            group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replaces every BatchNorm layer in ``module`` (``torch.nn.BatchNorm*d``, ``nn.SyncBatchNorm``,
        bnfused's ``BatchNorm*d``) with a ``bnfused.SyncBatchNorm``.

        The very same parameter and buffer tensors are kept, with the train/eval flag and a bnfused
        layer's fused activation and backend. A layer registered under several names becomes one
        SyncBatchNorm under all of them (torch's converts the first of a parent's names only, leaving
        the others unsynchronised, and makes one layer per parent). Returns ``module`` converted in
        place, or the new layer when ``module`` itself is a BatchNorm.
        """
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return cls._from_batch_norm(module, process_group)
        is_bn = nn.modules.batchnorm._BatchNorm
        swap_submodules(module, lambda m: cls._from_batch_norm(m, process_group) if isinstance(m, is_bn) else None)
        return module

    @classmethod
    def _from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm, process_group) -> SyncBatchNorm:
        if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
            raise ValueError(
                f"convert_sync_batchnorm: {type(bn).__name__} has not inferred num_features yet; "
                "run one forward pass before converting"
            )
        fused = isinstance(bn, _FusedBatchNorm)
        if fused and bn.takes_residual:
            raise ValueError(
                "convert_sync_batchnorm: this layer adds a residual that convert_model(fuse=True) fused into it, "
                "and SyncBatchNorm takes no residual; convert the unfused model with "
                "bnfused.convert_model(model, fuse=True, sync=True), which fuses only what SyncBatchNorm runs"
            )
        new = cls(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
            activation=bn.activation if fused else None,
            negative_slope=bn.negative_slope if fused else 0.01,
            backend=bn.backend if fused else None,
        )  # fmt: skip
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias  # bias may be None (torch's bias=False)
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new
