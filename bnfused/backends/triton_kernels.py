"""Triton kernels of the "triton" backend; the launchers that size and call them are in ``triton.py``.

Every kernel sees its tensor as per-channel tiles. The N * S values of one channel are laid out as
``rows x cols`` with one stride each (the launcher collapses what it can: a channels_last tensor
is one row of N * S columns, a contiguous one N rows of S columns), so the value ``(row, col)`` of
channel ``c`` sits at ``row * stride_row + col * stride_col + c * stride_c``. A tile is
``[BLOCK_C channels, BLOCK_S columns]`` of one row; tiles are numbered row-major. Triton specialises
an integer argument equal to 1, so whichever of ``stride_col`` and ``stride_c`` is 1 becomes the
tile's contiguous axis and loads coalesce in both contiguous and channels_last layouts, with one
kernel and no copy.

Design limits: every reduction is two-stage and deterministic (per-chunk partials in fp32
workspace, then a fixed-order merge); there are no atomics. Arithmetic is fp32 whatever the input
dtype (fp64 never reaches these kernels). Offsets are 64-bit only when the launcher says a tensor
needs it (``INT64``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(
    t,  # tile number, row-major over rows x col_blocks
    c_start,  # first channel of the program's channel block
    C,  # number of channels
    cols,  # columns per row
    col_blocks,  # cdiv(cols, BLOCK_S)
    stride_row,
    stride_col,
    stride_c,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
):
    """Element offsets [BLOCK_C, BLOCK_S], their mask, and how many columns of the tile are real."""
    c = c_start + tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    if INT64:
        t = tl.cast(t, tl.int64)  # a plain int, not a tensor, in the interpreter's loops
        c = c.to(tl.int64)
        s = s.to(tl.int64)
    row = t // col_blocks
    col0 = (t - row * col_blocks) * BLOCK_S
    col = col0 + s
    offsets = row * stride_row + col[None, :] * stride_col + c[:, None] * stride_c
    mask = (c < C)[:, None] & (col < cols)[None, :]
    return offsets, mask, tl.minimum(cols - col0, BLOCK_S)


@triton.jit
def _activation_grad(dy, y, ACT: tl.constexpr, slope):
    """g = dy * act'(z). act' comes from the saved output: y > 0 exactly where z > 0 (slope >= 0).

    Callers pass y as fp32: Triton's CPU interpreter compares bfloat16 as raw bits (-1 > 0 holds there).
    """
    if ACT:
        dy = tl.where(y > 0, dy, dy * slope)
    return dy


@triton.jit
def _output(value, ptr, ROUND_BF16: tl.constexpr):
    """fp32 ``value`` cast to ``ptr``'s element type.

    ROUND_BF16 (set only under the CPU interpreter, whose fp32 -> bf16 cast truncates where compiled
    kernels round to nearest even): round by hand first, so the cast below is exact.
    """
    if ROUND_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        value = tl.where(value == value, (bits & 0xFFFF0000).to(tl.float32, bitcast=True), value)  # keep NaN
    return value.to(ptr.dtype.element_ty)


# --------------------------------------------------------------------------- forward statistics
#
# Stage 1 (``_stats_partial_kernel``), grid (channel blocks, chunks): chunk k of a channel block
# walks its run of tiles. Each tile is reduced exactly in registers (mean_t, then the sum of squared
# deviations from mean_t: no E[x^2] - E[x]^2 cancellation), and folded into the chunk's running
# (n, mean, M2) with Chan's pairwise merge:
#     n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta * n_b / n,
#     M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
# Stage 2 (``_stats_finalize_kernel``), one program per channel block: the K chunk partials merged
# in a fixed order by the K-way form of the same identity,
#     mean = sum_k n_k mean_k / n,   M2 = sum_k (M2_k + n_k (mean_k - mean)^2),
# so the result is deterministic and every subtraction is between nearby values.


@triton.jit
def _stats_partial_kernel(
    x_ptr,  # *x: input, any float dtype, indexed through the strides below
    partial_ptr,  # *fp32 [3, K, C] out: for chunk k and channel c, the count of values seen, their
    #               mean, and the sum of their squared deviations from that mean (M2)
    C,
    cols,
    col_blocks,
    num_tiles,  # rows * col_blocks
    tiles_per_chunk,
    stride_row,
    stride_col,
    stride_c,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
):
    """Per-chunk (count, mean, M2) of each channel. Grid: (cdiv(C, BLOCK_C), K)."""
    c_start = tl.program_id(0) * BLOCK_C
    chunk = tl.program_id(1)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    t_start = chunk * tiles_per_chunk
    t_end = tl.minimum(t_start + tiles_per_chunk, num_tiles)
    for t in range(t_start, t_end):
        offsets, mask, n_valid = _tile(
            t, c_start, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64
        )
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        n_tile = n_valid.to(tl.float32)
        mean_tile = tl.sum(x, axis=1) / n_tile
        dev = tl.where(mask, x - mean_tile[:, None], 0.0)
        m2_tile = tl.sum(dev * dev, axis=1)
        new_count = count + n_tile
        delta = mean_tile - mean
        weight = n_tile / new_count
        mean += delta * weight
        m2 += m2_tile + delta * delta * count * weight
        count = new_count
    c = c_start + tl.arange(0, BLOCK_C)
    out = partial_ptr + chunk * C + c
    c_mask = c < C
    plane = tl.num_programs(1) * C
    tl.store(out, count, mask=c_mask)
    tl.store(out + plane, mean, mask=c_mask)
    tl.store(out + 2 * plane, m2, mask=c_mask)


@triton.jit
def _stats_finalize_kernel(
    partial_ptr,  # *fp32 [3, K, C]: stage-1 (count, mean, M2) partials
    mean_ptr,  # *fp32 [C] out: batch mean
    second_ptr,  # *fp32 [C] out: invstd = 1/sqrt(var + eps) if OUTPUT_INVSTD, else the biased var
    running_mean_ptr,  # *[C] in/out (fp32, fp16 or bf16), read only if HAS_RUNNING_MEAN
    running_var_ptr,  # *[C] in/out, read only if HAS_RUNNING_VAR
    C,
    K,
    total,  # fp32: N * S, the values per channel
    momentum,  # fp32: weight of this batch in the running averages
    eps,
    OUTPUT_INVSTD: tl.constexpr,
    HAS_RUNNING_MEAN: tl.constexpr,
    HAS_RUNNING_VAR: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # see _output
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Merges the K partials of each channel; updates the running stats. Grid: (cdiv(C, BLOCK_C),)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count_ptr = partial_ptr
    mean_part_ptr = partial_ptr + K * C
    m2_part_ptr = partial_ptr + 2 * K * C
    weighted = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        offsets = k[:, None] * C + c[None, :]
        mask = (k < K)[:, None] & c_mask[None, :]
        n = tl.load(count_ptr + offsets, mask=mask, other=0.0)
        weighted += n * tl.load(mean_part_ptr + offsets, mask=mask, other=0.0)
    mean = tl.sum(weighted, axis=0) / total
    m2 = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        offsets = k[:, None] * C + c[None, :]
        mask = (k < K)[:, None] & c_mask[None, :]
        n = tl.load(count_ptr + offsets, mask=mask, other=0.0)
        delta = tl.load(mean_part_ptr + offsets, mask=mask, other=0.0) - mean[None, :]
        m2 += tl.load(m2_part_ptr + offsets, mask=mask, other=0.0) + n * delta * delta
    var = tl.sum(m2, axis=0) / total
    tl.store(mean_ptr + c, mean, mask=c_mask)
    if OUTPUT_INVSTD:
        tl.store(second_ptr + c, 1.0 / tl.sqrt(var + eps), mask=c_mask)
    else:
        tl.store(second_ptr + c, var, mask=c_mask)
    if HAS_RUNNING_MEAN:
        old = tl.load(running_mean_ptr + c, mask=c_mask).to(tl.float32)
        new = (1.0 - momentum) * old + momentum * mean
        tl.store(running_mean_ptr + c, _output(new, running_mean_ptr, ROUND_BF16), mask=c_mask)
    if HAS_RUNNING_VAR:
        old = tl.load(running_var_ptr + c, mask=c_mask).to(tl.float32)
        unbiased = var * (total / (total - 1.0))
        new = (1.0 - momentum) * old + momentum * unbiased
        tl.store(running_var_ptr + c, _output(new, running_var_ptr, ROUND_BF16), mask=c_mask)


# --------------------------------------------------------------------------- elementwise forward


@triton.jit
def _normalize_kernel(
    x_ptr,  # *x: input (fp32, fp16 or bf16), indexed through the strides below
    y_ptr,  # *y out: x's dtype and strides
    weight_ptr,  # *[C] (any float dtype), read only if HAS_WEIGHT
    bias_ptr,  # *[C], read only if HAS_BIAS
    mean_ptr,  # *[C]: fp32 batch mean, or the running mean if FROM_RUNNING_VAR
    spread_ptr,  # *[C]: fp32 invstd, or the running variance if FROM_RUNNING_VAR
    C,
    cols,
    col_blocks,
    num_tiles,
    stride_row,
    stride_col,
    stride_c,
    eps,
    slope,  # leaky_relu slope (0 for relu)
    FROM_RUNNING_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,  # nonzero: z -> where(z > 0, z, z * slope)
    ROUND_BF16: tl.constexpr,  # see _output
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
):
    """y = act((x - mean) * (invstd * w) + b), one tile per program. Grid: (cdiv(C, BLOCK_C) * num_tiles,).

    The subtraction comes first: at |mean| >> std, x * scale + shift would cancel catastrophically.
    """
    pid = tl.program_id(0)
    c_block = pid // num_tiles
    t = pid - c_block * num_tiles
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if FROM_RUNNING_VAR:
        scale = 1.0 / tl.sqrt(tl.load(spread_ptr + c, mask=c_mask, other=1.0).to(tl.float32) + eps)
    else:
        scale = tl.load(spread_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    offsets, mask, _ = _tile(
        t, c_block * BLOCK_C, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean[:, None]) * scale[:, None]
    if HAS_BIAS:
        z += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
    if ACT:
        z = tl.where(z > 0, z, z * slope)
    tl.store(y_ptr + offsets, _output(z, y_ptr, ROUND_BF16), mask=mask)


# --------------------------------------------------------------------------- backward
#
# With x_hat = (x - mean) * invstd, z = w * x_hat + b, y = act(z) and g = dL/dz = dy * act'(z):
#     dL/db = sum(g),   dL/dw = sum(g * x_hat)                         (sums over the M = N * S values)
# Training mode: mean and invstd depend on x. dx_hat = w * g, and differentiating
# x_hat_i = (x_i - mean) * invstd through mean = sum(x)/M and invstd = (sum((x - mean)^2)/M + eps)^-1/2
# gives
#     dL/dx_i = invstd * (dx_hat_i - sum(dx_hat)/M - x_hat_i * sum(dx_hat * x_hat)/M)
#             = w * invstd * (g_i - sum(g)/M - x_hat_i * sum(g * x_hat)/M).
# So one reduction pass produces the two per-channel sums (which are also db and dw), and one
# elementwise pass applies dx = (g - a - (x - mean) * b2) * (w * invstd) with a = sum(g)/M and
# b2 = sum(g * x_hat) * invstd / M.
# Eval mode: mean and invstd are the running stats, constants, so dL/dx = w * invstd * g; no sums
# needed for dx, and no x read.


@triton.jit
def _backward_partial_kernel(
    dy_ptr,  # *dy: x's dtype and strides
    x_ptr,  # *x, read only if NEED_G_XHAT
    y_ptr,  # *y: saved output, read only if ACT (for act'(z))
    mean_ptr,  # *fp32 [C]
    invstd_ptr,  # *fp32 [C]
    partial_ptr,  # *fp32 [2, K, C] out: per-chunk sum(g), then sum(g * x_hat) (if NEED_G_XHAT)
    C,
    cols,
    col_blocks,
    num_tiles,
    tiles_per_chunk,
    stride_row,
    stride_col,
    stride_c,
    slope,
    ACT: tl.constexpr,
    NEED_G_XHAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
):
    """Per-chunk sum(g) and sum(g * x_hat) of each channel. Grid: (cdiv(C, BLOCK_C), K).

    Tiles are accumulated elementwise and reduced once at the end: one cross-lane reduction per
    program instead of one per tile.
    """
    c_start = tl.program_id(0) * BLOCK_C
    chunk = tl.program_id(1)
    c = c_start + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    acc_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_g_xhat = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    t_start = chunk * tiles_per_chunk
    t_end = tl.minimum(t_start + tiles_per_chunk, num_tiles)
    for t in range(t_start, t_end):
        offsets, mask, _ = _tile(
            t, c_start, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64
        )
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if ACT:
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        else:
            y = dy
        g = _activation_grad(dy, y, ACT, slope)
        acc_g += g
        if NEED_G_XHAT:
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            acc_g_xhat += g * ((x - mean[:, None]) * invstd[:, None])  # g is 0 where masked
    out = partial_ptr + chunk * C + c
    tl.store(out, tl.sum(acc_g, axis=1), mask=c_mask)
    if NEED_G_XHAT:
        tl.store(out + tl.num_programs(1) * C, tl.sum(acc_g_xhat, axis=1), mask=c_mask)


@triton.jit
def _sum_chunks_kernel(
    partial_ptr,  # *fp32 [2, K, C]: per-chunk partial sums of two quantities
    first_ptr,  # *fp32 [C] out: sum over k of partial[0, k, c], always in the same order
    second_ptr,  # *fp32 [C] out: the same for partial[1], written only if BOTH
    C,
    K,
    BOTH: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Deterministic sums of chunk partials over k. Grid: (cdiv(C, BLOCK_C),)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_first = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    acc_second = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (k < K)[:, None] & c_mask[None, :]
        offsets = k[:, None] * C + c[None, :]
        acc_first += tl.load(partial_ptr + offsets, mask=mask, other=0.0)
        if BOTH:
            acc_second += tl.load(partial_ptr + K * C + offsets, mask=mask, other=0.0)
    tl.store(first_ptr + c, tl.sum(acc_first, axis=0), mask=c_mask)
    if BOTH:
        tl.store(second_ptr + c, tl.sum(acc_second, axis=0), mask=c_mask)


@triton.jit
def _backward_dx_kernel(
    dy_ptr,  # *dy: x's dtype and strides
    x_ptr,  # *x, read only if TRAINING
    y_ptr,  # *y: saved output, read only if ACT
    dx_ptr,  # *dx out: x's dtype and strides
    weight_ptr,  # *[C] (any float dtype), read only if HAS_WEIGHT
    mean_ptr,  # *fp32 [C], read only if TRAINING
    invstd_ptr,  # *fp32 [C]
    sum_g_ptr,  # *fp32 [C]: sum(g), read only if TRAINING
    sum_g_xhat_ptr,  # *fp32 [C]: sum(g * x_hat), read only if TRAINING
    C,
    cols,
    col_blocks,
    num_tiles,
    stride_row,
    stride_col,
    stride_c,
    inv_count,  # fp32: 1 / M, M the values per channel the sums were taken over
    slope,
    TRAINING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ACT: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # see _output
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
):
    """dx from the derivation above, one tile per program. Grid: (cdiv(C, BLOCK_C) * num_tiles,)."""
    pid = tl.program_id(0)
    c_block = pid // num_tiles
    t = pid - c_block * num_tiles
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    scale = invstd
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    offsets, mask, _ = _tile(
        t, c_block * BLOCK_C, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64
    )
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        y = dy
    g = _activation_grad(dy, y, ACT, slope)
    if TRAINING:
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
        mean_g = tl.load(sum_g_ptr + c, mask=c_mask, other=0.0) * inv_count
        xhat_coef = tl.load(sum_g_xhat_ptr + c, mask=c_mask, other=0.0) * (invstd * inv_count)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = g - mean_g[:, None] - (x - mean[:, None]) * xhat_coef[:, None]
    tl.store(dx_ptr + offsets, _output(g * scale[:, None], dx_ptr, ROUND_BF16), mask=mask)
