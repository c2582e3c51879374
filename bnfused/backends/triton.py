"""The "triton" backend: launchers for the kernels in ``triton_kernels.py``.

Same functions and arguments as ``reference.py`` (see ``bnfused.backends``); x is (N, C, *)
float16 | bfloat16 | float32 on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1``.
float64 input is passed to the reference backend: the kernels accumulate in fp32 only. So eps is
an fp32 scalar in the kernels, as in torch's CUDA kernels: an eps below fp32's smallest normal
(1.2e-38) rounds to a subnormal, which matters only for a channel whose variance is as small.

Passes over memory (E = x's element size, per value of x):
    forward_train   stats (read x) + tiny merge + normalize (read x, write y)       3E (+E residual)
    forward_eval    normalize (read x, write y)                                    2E (+E residual)
    backward        reduce (read dy, x, y if act' from y) + tiny merge
                    + dx (read dy, x, y if act' from y; write dx)                  5E (+2E with act)
    eval backward   dx only (read dy, y if act' from y; write dx)                  2E (+E)
relu, leaky_relu and relu6 take act' from the saved y; hardswish and silu recompute z instead, from
x (read anyway in training; +E in eval) and the residual (+E in each pass that forms g). dresidual
(+E written) comes out of the dx pass, or the reduction when no dx is asked for; with no activation
it is dy itself.
For large tensors the reductions split N * S into chunks so the whole GPU works on them even when
C is small, and merge the chunks deterministically (no atomics). Channel blocks of at most
_FUSED_MAX_TILES tiles (and any, once the channel blocks alone fill the GPU) take the fused kernels
instead: one launch for the whole training forward or backward, whose second read of x (and dy)
hits the cache when the block is small.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple

import torch

from bnfused import activation as act_codes
from bnfused import layout
from bnfused.backends import reference

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_NO_DEVICE = "Triton needs a CUDA device (or TRITON_INTERPRET=1 for its CPU interpreter)"


try:
    from bnfused.backends import triton_kernels as kernels
except ImportError as exc:  # reported by available(), so "auto" can fall back with the reason
    kernels, _IMPORT_ERROR = None, f"triton is not importable ({exc})"

# Every activation code and the residual add are fused in the kernels.
ACTIVATIONS = frozenset(act_codes.NAMES)
RESIDUAL = True
DISPATCHED = False  # launched from Python on the tensors' memory


def available(device: torch.device) -> str | None:
    """None when Triton can run kernels on ``device``, else the reason it cannot."""
    if kernels is None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return _NO_DEVICE


# --------------------------------------------------------------------------- planning

_TILE = 4096  # values per [BLOCK_C, BLOCK_S] tile: 16 KiB of fp32, a few loads in flight per thread
# A channel block with at most this many tiles is reduced and normalised by one program (the fused
# kernels): 64K values, a few microseconds of one SM, about what the two launches it saves cost.
_FUSED_MAX_TILES = 16
_FINALIZE_BLOCK_C = 64
_FINALIZE_BLOCK_K = 16
_INT32_LIMIT = 2**31


class _Plan(NamedTuple):
    """How the kernels walk one (shape, strides, dtype): see the ``triton_kernels`` docstring."""

    C: int
    cols: int
    col_blocks: int
    num_tiles: int
    stride_row: int
    stride_col: int
    stride_c: int
    block_c: int
    block_s: int
    c_blocks: int
    chunks: int  # K: how many pieces each channel's reduction is split into; 1: the fused kernels
    tiles_per_chunk: int
    int64: bool
    num_warps: int
    count: int  # N * S
    col_vec: int  # see _column_vector


class _Forced(NamedTuple):
    block_c: int
    block_s: int
    chunks: int | None
    int64: bool


_forced: _Forced | None = None
_plans: dict[tuple, _Plan] = {}


@contextlib.contextmanager
def forced_blocks(block_c: int, block_s: int, chunks: int | None, int64: bool = False):
    """Within the block, every launch uses these block sizes (powers of two), at most ``chunks``
    reduction chunks (1: the fused kernels; None: as many as the plan would take) and, if ``int64``,
    64-bit offsets: lets tests exercise multi-tile, multi-chunk merges and the 64-bit indexing on tiny
    shapes, and benchmarks time other tiles."""
    global _forced
    for name, value in (("block_c", block_c), ("block_s", block_s)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"bnfused: {name} must be a power of two, got {value}")
    if chunks is not None and chunks < 1:
        raise ValueError(f"bnfused: chunks must be >= 1, got {chunks}")
    previous, _forced = _forced, _Forced(block_c, block_s, chunks, int64)
    _plans.clear()
    try:
        yield
    finally:
        _forced = previous
        _plans.clear()


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Reduction programs worth launching: a few per SM on a GPU; few under the (serial) interpreter."""
    if device.type != "cuda" or _INTERPRETED:
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _plan(x: torch.Tensor) -> _Plan:
    key = (x.shape, x.stride(), x.element_size(), x.device)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 4096:  # shapes keep changing (dynamic batch sizes): don't grow forever
            _plans.clear()
        plan = _plans[key] = _make_plan(x)
    return plan


def _make_plan(x: torch.Tensor) -> _Plan:
    n, c, s, stride_n, stride_c, stride_s = layout.ncs(x)
    if stride_s is None:
        raise ValueError(
            f"bnfused triton backend: the spatial dims of x (strides {x.stride()}) do not collapse to one "
            "stride; pass it through bnfused.layout.kernel_ready first"
        )
    # Collapse the N * S values of a channel into as few (rows x cols) as the strides allow.
    if s == 1:
        rows, cols, stride_row, stride_col = 1, n, 0, stride_n
    elif n == 1 or stride_n == s * stride_s:  # channels_last-like: (n, s) is one run of stride_s
        rows, cols, stride_row, stride_col = 1, n * s, 0, stride_s
    else:
        rows, cols, stride_row, stride_col = n, s, stride_n, stride_s
    if _forced is not None:
        block_c, block_s = min(_forced.block_c, _next_pow2(c)), min(_forced.block_s, _next_pow2(cols))
    elif stride_c == 1 and stride_col != 1:
        # Channels are the contiguous axis: a tile row spans 256 bytes of channels.
        block_c = min(_next_pow2(c), 256 // x.element_size())
        block_s = min(_next_pow2(cols), _TILE // block_c)
    else:
        block_s = min(_next_pow2(cols), _TILE)
        block_c = min(_next_pow2(c), max(1, _TILE // block_s))
    col_blocks = _cdiv(cols, block_s)
    num_tiles = rows * col_blocks
    c_blocks = _cdiv(c, block_c)
    if _forced is not None and _forced.chunks is not None:
        chunks = min(_forced.chunks, num_tiles)
    elif num_tiles <= _FUSED_MAX_TILES:
        chunks = 1
    else:  # enough chunks for the GPU to be busy; 1 (fused) once the channel blocks alone fill it
        chunks = max(1, min(num_tiles, _cdiv(_target_programs(x.device), c_blocks)))
    tiles_per_chunk = _cdiv(num_tiles, chunks)
    chunks = _cdiv(num_tiles, tiles_per_chunk)  # no empty chunk
    # Largest offset any lane computes, masked lanes included.
    max_offset = (rows - 1) * stride_row + (col_blocks * block_s) * stride_col + (c_blocks * block_c) * stride_c
    int64 = max_offset >= _INT32_LIMIT or (_forced is not None and _forced.int64)
    num_warps = 8 if block_c * block_s >= 2048 else 4
    return _Plan(
        c, cols, col_blocks, num_tiles, stride_row, stride_col, stride_c, block_c, block_s, c_blocks,
        chunks, tiles_per_chunk, int64, num_warps, n * s, _column_vector(cols, stride_row, stride_col, stride_c),
    )  # fmt: skip


def _column_vector(cols: int, stride_row: int, stride_col: int, stride_c: int) -> int:
    """The kernels' COL_VEC: where columns are contiguous, the largest power of two up to 16 that divides
    cols, stride_row and stride_c (every row of a tile then starts on a multiple of it); else 1."""
    if stride_col != 1:
        return 1
    common = math.gcd(cols, stride_row, stride_c)
    return min(common & -common, 16) if common else 16


def _blocks(plan: _Plan) -> dict:
    """The block sizes, index width, column vector and warps every tile kernel is launched with."""
    return {"BLOCK_C": plan.block_c, "BLOCK_S": plan.block_s, "INT64": plan.int64, "COL_VEC": plan.col_vec,
            "num_warps": plan.num_warps}  # fmt: skip


def _tiling(plan: _Plan) -> tuple:
    """The tile-geometry arguments every data kernel takes, in order."""
    return (plan.C, plan.cols, plan.col_blocks, plan.num_tiles)


def _strides(plan: _Plan) -> tuple:
    return (plan.stride_row, plan.stride_col, plan.stride_c)


def _round_bf16(t: torch.Tensor | None) -> bool:
    """Whether kernels must round bf16 stores by hand (the interpreter's cast truncates)."""
    return _INTERPRETED and t is not None and t.dtype == torch.bfloat16


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor with x's shape, dtype and strides (kernels index both with one offset)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index per-channel tensors as dense (C,) vectors: a strided or expanded one is copied."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _stats(x, plan: _Plan, running_mean, running_var, momentum: float, eps: float, output_invstd: bool):
    """(mean, invstd or biased var), both (C,) fp32; updates the running stats that are given."""
    C, K = plan.C, plan.chunks
    partial = torch.empty((3, K, C), dtype=torch.float32, device=x.device)
    kernels._stats_partial_kernel[(plan.c_blocks, K)](
        x, partial, *_tiling(plan), plan.tiles_per_chunk, *_strides(plan),
        **_blocks(plan),
    )  # fmt: skip
    mean = torch.empty(C, dtype=torch.float32, device=x.device)
    second = torch.empty(C, dtype=torch.float32, device=x.device)
    kernels._stats_finalize_kernel[(_cdiv(C, _FINALIZE_BLOCK_C),)](
        partial, mean, second,
        mean if running_mean is None else running_mean, mean if running_var is None else running_var,
        C, K, float(plan.count), momentum, eps,
        OUTPUT_INVSTD=output_invstd, HAS_RUNNING_MEAN=running_mean is not None,
        HAS_RUNNING_VAR=running_var is not None, ROUND_BF16=_round_bf16(running_mean) or _round_bf16(running_var),
        BLOCK_C=_FINALIZE_BLOCK_C, BLOCK_K=_FINALIZE_BLOCK_K,
    )  # fmt: skip
    return mean, second


def _normalize(
    x, plan: _Plan, weight, bias, mean, spread, from_running_var: bool, eps: float, act: int, slope: float, residual
):
    y = _empty_like(x)
    kernels._normalize_kernel[(plan.c_blocks * plan.num_tiles,)](
        x, y, x if residual is None else residual, mean if weight is None else weight, mean if bias is None else bias,
        mean, spread, *_tiling(plan), *_strides(plan), eps, slope,
        FROM_RUNNING_VAR=from_running_var, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act,
        HAS_RESIDUAL=residual is not None, ROUND_BF16=_round_bf16(x),
        **_blocks(plan),
    )  # fmt: skip
    return y


def _forward_fused(x, plan: _Plan, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual):
    y = _empty_like(x)
    mean = torch.empty(plan.C, dtype=torch.float32, device=x.device)
    invstd = torch.empty(plan.C, dtype=torch.float32, device=x.device)
    kernels._forward_fused_kernel[(plan.c_blocks,)](
        x, y, x if residual is None else residual, mean if weight is None else weight, mean if bias is None else bias,
        mean, invstd, mean if running_mean is None else running_mean, mean if running_var is None else running_var,
        *_tiling(plan), *_strides(plan), float(plan.count), momentum, eps, slope,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RUNNING_MEAN=running_mean is not None,
        HAS_RUNNING_VAR=running_var is not None, ACT=act, HAS_RESIDUAL=residual is not None,
        ROUND_BF16=_round_bf16(x), ROUND_BF16_RUNNING=_round_bf16(running_mean) or _round_bf16(running_var),
        **_blocks(plan),
    )  # fmt: skip
    return y, mean, invstd


class _GradInputs(NamedTuple):
    """What g = dy * act'(z) is formed from, as the backward kernels take it (see ``_grad_tile``)."""

    dy: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor | None  # the saved output: act' of relu, leaky_relu, relu6
    weight: torch.Tensor | None
    bias: torch.Tensor | None  # read only where z is recomputed (hardswish, silu)
    residual: torch.Tensor | None  # the same
    mean: torch.Tensor
    invstd: torch.Tensor
    act: int
    slope: float

    def tensors(self) -> tuple:
        """(dy, x, y, residual) pointers; an absent tensor is replaced by dy, never read."""
        dy = self.dy
        return dy, self.x, dy if self.y is None else self.y, dy if self.residual is None else self.residual

    def flags(self) -> dict:
        return dict(
            ACT=self.act, HAS_RESIDUAL=self.residual is not None,
            HAS_WEIGHT=self.weight is not None, HAS_BIAS=self.bias is not None,
        )  # fmt: skip

    def per_channel(self) -> tuple:
        """(weight, bias) pointers; an absent one is replaced by invstd, never read."""
        return (self.invstd if self.weight is None else self.weight, self.invstd if self.bias is None else self.bias)


def _grad_inputs(dy, x, y, weight, bias, residual, mean, invstd, act: int, slope: float) -> _GradInputs:
    """dy (and residual) given x's strides, dense per-channel vectors, and bias and residual kept only
    where act' needs z (for the other activations they need not be read)."""
    recomputes_z = act_codes.grad_from_input(act)
    return _GradInputs(
        layout.like(x, dy), x, y, _dense(weight), _dense(bias) if recomputes_z else None,
        layout.like(x, residual) if recomputes_z and residual is not None else None, mean, invstd, act, slope,
    )  # fmt: skip


def _backward_fused(grad: _GradInputs, plan: _Plan, need_g_xhat: bool, need_dx: bool, need_dres: bool):
    """Training-mode (dx | None, dresidual | None, sum(g), sum(g * x_hat) | None) in one launch."""
    x = grad.x
    dx = _empty_like(x) if need_dx else None
    dres = _empty_like(x) if need_dres else None
    sum_g = torch.empty(plan.C, dtype=torch.float32, device=x.device)
    sum_g_xhat = torch.empty(plan.C, dtype=torch.float32, device=x.device) if need_g_xhat else None
    kernels._backward_fused_kernel[(plan.c_blocks,)](
        *grad.tensors(), x if dx is None else dx, x if dres is None else dres, *grad.per_channel(),
        grad.mean, grad.invstd, sum_g, sum_g if sum_g_xhat is None else sum_g_xhat,
        *_tiling(plan), *_strides(plan), 1.0 / plan.count, grad.slope,
        NEED_G_XHAT=need_g_xhat, NEED_DX=need_dx, STORE_G=need_dres, **grad.flags(), ROUND_BF16=_round_bf16(x),
        **_blocks(plan),
    )  # fmt: skip
    return dx, dres, sum_g, sum_g_xhat


# --------------------------------------------------------------------------- the backend contract


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var) of x: (N, C, *) -> two (C,) fp32 tensors."""
    if x.dtype == torch.float64:
        return reference.batch_stats(x)
    return _stats(x, _plan(x), None, None, 0.0, 0.0, output_invstd=False)


def normalize(x, weight, bias, mean, invstd, act: int, slope: float) -> torch.Tensor:
    """y = act((x - mean) * invstd * weight + bias): x's shape, dtype and strides. mean, invstd: (C,) fp32."""
    if x.dtype == torch.float64:
        return reference.normalize(x, weight, bias, mean, invstd, act, slope)
    return _normalize(x, _plan(x), _dense(weight), _dense(bias), mean, invstd, False, 0.0, act, slope, None)


def forward_train(
    x, weight, bias, running_mean, running_var, momentum: float, eps: float, act: int, slope: float, residual=None
):
    """Training forward. x: (N, C, *) fp16|bf16|fp32, residual None or like x. Returns (y like x, mean (C,)
    fp32, invstd (C,) fp32) and updates running_mean / running_var (each (C,) or None) in place."""
    if x.dtype == torch.float64:
        return reference.forward_train(x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual)
    mean_dense, var_dense = _dense(running_mean), _dense(running_var)
    if mean_dense is not running_mean or var_dense is not running_var:
        # Update dense copies, then write them back (an expanded tensor raises torch's overlap error there).
        out = forward_train(x, weight, bias, mean_dense, var_dense, momentum, eps, act, slope, residual)
        for stat, dense in ((running_mean, mean_dense), (running_var, var_dense)):
            if dense is not stat:
                stat.copy_(dense)
        return out
    weight, bias = _dense(weight), _dense(bias)
    residual = None if residual is None else layout.like(x, residual)
    plan = _plan(x)
    if plan.chunks == 1:
        return _forward_fused(x, plan, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual)
    mean, invstd = _stats(x, plan, running_mean, running_var, momentum, eps, output_invstd=True)
    return _normalize(x, plan, weight, bias, mean, invstd, False, 0.0, act, slope, residual), mean, invstd


def forward_eval(
    x, weight, bias, running_mean, running_var, eps: float, act: int, slope: float, residual=None
) -> torch.Tensor:
    """Eval forward with the running stats ((C,) tensors), one elementwise pass: y like x."""
    if x.dtype == torch.float64:
        return reference.forward_eval(x, weight, bias, running_mean, running_var, eps, act, slope, residual)
    weight, bias, running_mean, running_var = map(_dense, (weight, bias, running_mean, running_var))
    residual = None if residual is None else layout.like(x, residual)
    return _normalize(x, _plan(x), weight, bias, running_mean, running_var, True, eps, act, slope, residual)


def _reduce(grad: _GradInputs, plan: _Plan, need_g_xhat: bool, store_g: bool):
    """(dresidual | None, sum(g), sum(g * x_hat) | None); dresidual = g is written if ``store_g``."""
    x, C, K = grad.x, plan.C, plan.chunks
    dres = _empty_like(x) if store_g else None
    partial = torch.empty((2, K, C), dtype=torch.float32, device=x.device)
    kernels._backward_partial_kernel[(plan.c_blocks, K)](
        *grad.tensors(), x if dres is None else dres, *grad.per_channel(), grad.mean, grad.invstd, partial,
        *_tiling(plan), plan.tiles_per_chunk, *_strides(plan), grad.slope,
        **grad.flags(), NEED_G_XHAT=need_g_xhat, STORE_G=store_g, ROUND_BF16=_round_bf16(x),
        **_blocks(plan),
    )  # fmt: skip
    sum_g = torch.empty(C, dtype=torch.float32, device=x.device)
    sum_g_xhat = torch.empty(C, dtype=torch.float32, device=x.device) if need_g_xhat else None
    kernels._sum_chunks_kernel[(_cdiv(C, _FINALIZE_BLOCK_C),)](
        partial, sum_g, sum_g if sum_g_xhat is None else sum_g_xhat, C, K,
        BOTH=need_g_xhat, BLOCK_C=_FINALIZE_BLOCK_C, BLOCK_K=_FINALIZE_BLOCK_K,
    )  # fmt: skip
    return dres, sum_g, sum_g_xhat


def _dx(grad: _GradInputs, plan: _Plan, sum_g, sum_g_xhat, count: int, training: bool, need_dx: bool, store_g: bool):
    """(dx | None, dresidual | None) in one elementwise pass; training-mode dx uses the sums over ``count``
    values per channel."""
    x, invstd = grad.x, grad.invstd
    dx = _empty_like(x) if need_dx else None
    dres = _empty_like(x) if store_g else None
    kernels._backward_dx_kernel[(plan.c_blocks * plan.num_tiles,)](
        *grad.tensors(), x if dx is None else dx, x if dres is None else dres, *grad.per_channel(), grad.mean, invstd,
        invstd if sum_g is None else sum_g, invstd if sum_g_xhat is None else sum_g_xhat,
        *_tiling(plan), *_strides(plan), 1.0 / count, grad.slope,
        TRAINING=training and need_dx, NEED_DX=need_dx, STORE_G=store_g, **grad.flags(), ROUND_BF16=_round_bf16(x),
        **_blocks(plan),
    )  # fmt: skip
    return dx, dres


def _check_split_act(act: int) -> None:
    """The SyncBatchNorm primitives take no bias: they cannot recompute z for act' (hardswish, silu)."""
    if act_codes.grad_from_input(act):
        raise ValueError(
            f"bnfused triton backend: backward_reduce / backward_elemt take act' from the saved output (activation "
            f"codes 0-3), got {act} ({act_codes.NAMES.get(act)}), whose act' needs z"
        )


def backward_reduce(dy, x, y, mean, invstd, act: int, slope: float):
    """Per-channel (sum(g), sum(g * x_hat)), g = dy * act'(z): two (C,) fp32 tensors."""
    _check_split_act(act)
    if x.dtype == torch.float64:
        return reference.backward_reduce(dy, x, y, mean, invstd, act, slope)
    grad = _grad_inputs(dy, x, y, None, None, None, mean, invstd, act, slope)
    _, sum_g, sum_g_xhat = _reduce(grad, _plan(x), need_g_xhat=True, store_g=False)
    return sum_g, sum_g_xhat


def backward_elemt(dy, x, y, weight, mean, invstd, sum_dy, sum_dy_xhat, count: int, act: int, slope: float):
    """Training-mode dx (like x) from the per-channel sums; count is the values per channel they cover."""
    _check_split_act(act)
    if x.dtype == torch.float64:
        return reference.backward_elemt(dy, x, y, weight, mean, invstd, sum_dy, sum_dy_xhat, count, act, slope)
    grad = _grad_inputs(dy, x, y, weight, None, None, mean, invstd, act, slope)
    return _dx(grad, _plan(x), sum_dy, sum_dy_xhat, count, training=True, need_dx=True, store_g=False)[0]


def backward(dy, x, y, weight, mean, invstd, act: int, slope: float, training: bool, needs_input: bool,
             needs_weight: bool, needs_bias: bool, bias=None, residual=None, needs_residual: bool = False):  # fmt: skip
    """(dx like x | None, dweight (C,) fp32 | None, dbias (C,) fp32 | None, dresidual like x | None); only
    the asked-for work runs. bias and residual are the forward's (read only where z is recomputed)."""
    if x.dtype == torch.float64:
        return reference.backward(
            dy, x, y, weight, mean, invstd, act, slope, training, needs_input, needs_weight, needs_bias,
            bias, residual, needs_residual,
        )  # fmt: skip
    grad = _grad_inputs(dy, x, y, weight, bias, residual, mean, invstd, act, slope)
    plan = _plan(x)
    dres = grad.dy if needs_residual and act == act_codes.NONE else None  # g is dy itself
    store_g = needs_residual and dres is None
    dx = sum_g = sum_g_xhat = None
    need_g_xhat = needs_weight or (training and needs_input)
    if (need_g_xhat or needs_bias) and plan.chunks == 1:  # writes dresidual too
        dx, g, sum_g, sum_g_xhat = _backward_fused(grad, plan, need_g_xhat, training and needs_input, store_g)
        dres = dres if g is None else g
    elif need_g_xhat or needs_bias:  # dresidual comes with the reduction when no dx pass follows
        g, sum_g, sum_g_xhat = _reduce(grad, plan, need_g_xhat, store_g and not needs_input)
        dres = dres if g is None else g
    need_dx = needs_input and dx is None
    if need_dx or (needs_residual and dres is None):
        dx_pass, g = _dx(grad, plan, sum_g, sum_g_xhat, plan.count, training, need_dx, needs_residual and dres is None)
        dx = dx if dx_pass is None else dx_pass
        dres = dres if g is None else g
    return dx, (sum_g_xhat if needs_weight else None), (sum_g if needs_bias else None), dres
