"""Triton kernels of the "triton" backend; the launchers that size and call them are in ``triton.py``.

Every kernel sees its tensor as per-channel tiles. The N * S values of one channel are laid out as
``rows x cols`` with one stride each (the launcher collapses what it can: a channels_last tensor
is one row of N * S columns, a contiguous one N rows of S columns), so the value ``(row, col)`` of
channel ``c`` sits at ``row * stride_row + col * stride_col + c * stride_c``. A tile is
``[BLOCK_C channels, BLOCK_S columns]`` of one row; tiles are numbered row-major. Triton specialises
an integer argument equal to 1, so whichever of ``stride_col`` and ``stride_c`` is 1 becomes the
tile's contiguous axis and loads coalesce in both contiguous and channels_last layouts, with one
kernel and no copy.

Two ways to run a training forward or backward:
* two-stage, for large tensors: the N * S reduction of each channel block is split into K chunks
  that run in parallel (partials in fp32 workspace), a tiny kernel merges them in a fixed order,
  then an elementwise kernel over all tiles writes y or dx;
* fused (K = 1), when a channel block has few tiles (launches would cost more than the data) or
  the channel blocks alone fill the GPU: one program per channel block reduces its channels, then
  walks the same tiles again (in cache, when they are few) to write y or dx — one launch, not three.
The per-tile math lives in the ``@triton.jit`` helpers below, shared by both.

Design limits: reductions are deterministic (fixed order, no atomics). Arithmetic is fp32 whatever
the input dtype (fp64 never reaches these kernels). Offsets are 64-bit only when the launcher says
a tensor needs it (``INT64``).
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
    COL_VEC: tl.constexpr,
):
    """Element offsets [BLOCK_C, BLOCK_S], their mask, and how many columns of the tile are real.

    COL_VEC > 1: columns are the contiguous axis (stride_col 1) and stride_row, stride_c and cols are
    multiples of it (the launcher checked). Rounded to multiples here, which changes no value, they
    let the compiler prove that every row of a tile starts aligned and is masked in whole vectors, so
    it loads and stores vectors: the compiler assumes nothing of an integer that is not a multiple of
    16, and 14x14 planes (196 values) would otherwise move one value per instruction.
    """
    if COL_VEC > 1:
        stride_row = stride_row // COL_VEC * COL_VEC
        stride_c = stride_c // COL_VEC * COL_VEC
        cols = cols // COL_VEC * COL_VEC
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
def _elementwise_program(num_tiles, BLOCK_C: tl.constexpr):
    """(tile number, first channel, channels [BLOCK_C]) of this program in a one-tile-per-program grid
    of cdiv(C, BLOCK_C) * num_tiles programs."""
    pid = tl.program_id(0)
    c_block = pid // num_tiles
    c_start = c_block * BLOCK_C
    return pid - c_block * num_tiles, c_start, c_start + tl.arange(0, BLOCK_C)


@triton.jit
def _partials_block(k0, c, c_mask, C, K, BLOCK_K: tl.constexpr):
    """Offsets [BLOCK_K, BLOCK_C] into a [K, C] partials plane for chunks k0.., and their mask."""
    k = k0 + tl.arange(0, BLOCK_K)
    return k[:, None] * C + c[None, :], (k < K)[:, None] & c_mask[None, :]


@triton.jit
def _clamp(v, lo, hi):
    """min(max(v, lo), hi), written with compares so that a NaN stays NaN (as in torch)."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _activate(z, ACT: tl.constexpr, slope):
    """act(z) for the codes of ``bnfused.activation``, in z's (fp32) arithmetic, as torch writes each one."""
    if ACT == 3:  # relu6
        z = _clamp(z, 0.0, 6.0)
    elif ACT == 4:  # hardswish
        z = z * _clamp(z + 3.0, 0.0, 6.0) / 6.0
    elif ACT == 5:  # silu
        z = z * tl.sigmoid(z)
    elif ACT == 6:  # sigmoid
        z = tl.sigmoid(z)
    elif ACT == 2:  # leaky_relu
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 1:  # relu: not z * 0, which is NaN at z = -inf (torch gives 0)
        z = tl.where(z < 0, 0.0, z)
    return z


@triton.jit
def _grad_tile(
    dy_ptr,
    x_ptr,
    y_ptr,  # saved output, read only for ACT 1-3
    residual_ptr,  # read only if HAS_RESIDUAL (for ACT 4-5: the z it recomputes had it added)
    offsets,
    mask,
    mean,  # fp32 [BLOCK_C]
    scale,  # fp32 [BLOCK_C]: invstd * w, used only to recompute z (ACT 4-5)
    shift,  # fp32 [BLOCK_C]: b, the same
    slope,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    LOAD_X: tl.constexpr,  # the caller needs x (it is loaded anyway for ACT 4-5)
):
    """(g, x): g = dy * act'(z) as fp32, 0 where masked, and x as fp32 (0 unless loaded).

    relu, leaky_relu and relu6 read act' off the saved output: y > 0 exactly where z > 0 (slope >= 0)
    and y < 6 exactly where z < 6, so no mask tensor is stored. hardswish and silu need z itself,
    recomputed from x as the forward computed it (same formula, same bits), which costs less memory
    traffic than saving z; so does sigmoid (ACT 6), whose derivative s (1 - s) is then formed in fp32.
    """
    g = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.zeros_like(g)
    if LOAD_X or ACT >= 4:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ACT >= 4:
        z = (x - mean[:, None]) * scale[:, None] + shift[:, None]
        if HAS_RESIDUAL:
            z += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if ACT == 4:  # hardswish' = 0 at z <= -3, z / 3 + 1/2 between, 1 at z >= 3 (torch's kinks; a
            # NaN z falls to the middle case and gives NaN, as torch's vectorised kernel)
            g = tl.where(z <= -3.0, 0.0, tl.where(z >= 3.0, g, g * (z / 3.0 + 0.5)))
        elif ACT == 6:  # sigmoid' = s (1 - s)
            s = tl.sigmoid(z)
            g = g * (s * (1.0 - s))
        else:  # silu' = s (1 + z (1 - s)), s = sigmoid(z)
            s = tl.sigmoid(z)
            g = g * (s * (1.0 + z * (1.0 - s)))
    elif ACT:
        # Compared in fp32: Triton's CPU interpreter compares bfloat16 as raw bits (-1 > 0 holds there).
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # At NaN, as torch: relu passes g, leaky_relu scales it by the slope.
        if ACT == 3:
            g = tl.where((y > 0) & (y < 6.0), g, 0.0)
        elif ACT == 1:
            g = tl.where(y <= 0, 0.0, g)
        else:
            g = tl.where(y > 0, g, g * slope)
    return g, x


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


# --------------------------------------------------------------------------- forward: the math
#
# Statistics of a run of tiles (``_chunk_stats``): each tile is reduced exactly in registers (its
# mean, then the sum of squared deviations from that mean: no E[x^2] - E[x]^2 cancellation) and
# folded into the running (n, mean, M2) with Chan's pairwise merge:
#     n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta * n_b / n,
#     M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
# K chunk partials are merged (``_stats_finalize_kernel``) in a fixed order by the K-way form,
#     mean = sum_k n_k mean_k / n,   M2 = sum_k (M2_k + n_k (mean_k - mean)^2),
# so the result is deterministic and every subtraction is between nearby values.
#
# float32 range: the squares of deviations past ~1.8e19 overflow float32, so M2 is carried as the
# standard deviation sqrt(M2 / n), whose merges are scaled hypotenuses:
#     std^2 = (1 - w) std_a^2 + w std_b^2 + w (1 - w) delta^2,  w = n_b / n,
# a tile's std is its largest |deviation| times the root of the mean of the squared deviations scaled
# by it (its deviations halved first when one overflowed float32), and invstd = 1 / sqrt(std^2 + eps)
# is formed with std scaled out. A tile sum that overflows is redone on values divided by the count.
# So any finite float32 input gets its mean and invstd; only a running variance past float32's range
# saturates to inf (as torch's). A +-inf makes the mean +-inf (NaN for both signs), as in torch,
# rather than the NaN that Chan's update would give.


@triton.jit
def _not_finite(v):
    return (v - v) != 0  # inf - inf and NaN - NaN are NaN; any finite v - v is 0


@triton.jit
def _finite(v):
    return (v - v) == 0  # not ~_not_finite(v): Triton 3.2's interpreter cannot invert a boolean


@triton.jit
def _scale_by(m):
    """(inv, back) for values of magnitude <= m: multiply them by inv before squaring, and their root by
    back. inv = 1 / m and back = m, except where 1 / m overflows float32 (m = 0 or subnormal): there
    2^126 and 2^-126, which bring the values to at most 1 without their squares underflowing."""
    small = m < 1.1754943508222875e-38  # float32's smallest normal, 2^-126
    return tl.where(small, 8.507059173023462e37, 1.0 / m), tl.where(small, 1.1754943508222875e-38, m)


@triton.jit
def _hypot3(a, b, c):
    """sqrt(a^2 + b^2 + c^2) of non-negative fp32 [BLOCK_C] vectors, scaled so that no square overflows."""
    inv, back = _scale_by(tl.maximum(tl.maximum(a, b), c))
    a, b, c = a * inv, b * inv, c * inv
    return back * tl.sqrt(a * a + b * b + c * c)


@triton.jit
def _chunk_stats_by_tile(
    x_ptr,
    c_start,
    t_start,
    t_end,
    C,
    cols,
    col_blocks,
    stride_row,
    stride_col,
    stride_c,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """(count, mean, biased std) per channel, each fp32 [BLOCK_C], over tiles [t_start, t_end): each tile
    reduced on its own and merged (see "forward: the math"), right at every edge of float32's range."""
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    std = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(t_start, t_end):
        offsets, mask, n_valid = _tile(
            t, c_start, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64, COL_VEC
        )
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        n_tile = n_valid.to(tl.float32)
        # Sums of x - (the tile's first value) lose no digits to a large mean, and a constant channel
        # gets its mean exactly (total / n of the unshifted values rounds: then y = +-1, not 0).
        first = tl.sum(tl.where((tl.arange(0, BLOCK_S) == 0)[None, :], x, 0.0), axis=1)
        shifted = tl.where(mask, x - first[:, None], 0.0)
        mean_shifted = tl.sum(shifted, axis=1) / n_tile
        # Where the values span more than float32's range, x - first overflowed: mean the values scaled.
        wide = _not_finite(mean_shifted)
        mean_tile = tl.where(wide, tl.sum(x * (1.0 / n_tile), axis=1), first + mean_shifted)
        # Deviations from the rounded mean the tile passes on, which the merge below uses: from the exact
        # one, the merge would miss the rounding error's share (var 6% low at std ~ one ulp of the mean).
        centre = tl.where(wide, mean_tile, mean_tile - first)
        dev = tl.where(mask, tl.where(wide[:, None], x, shifted) - centre[:, None], 0.0)
        halve = tl.max(_not_finite(dev).to(tl.int32), axis=1) > 0
        dev = tl.where(halve[:, None], tl.where(mask, x * 0.5 - (mean_tile * 0.5)[:, None], 0.0), dev)
        inv, back = _scale_by(tl.max(tl.abs(dev), axis=1))
        scaled = dev * inv[:, None]
        std_tile = back * tl.sqrt(tl.sum(scaled * scaled, axis=1) / n_tile) * tl.where(halve, 2.0, 1.0)
        new_count = count + n_tile
        weight = n_tile / new_count
        delta = mean_tile - mean
        # Where delta overflowed, its share of the variance is taken from the two means scaled first.
        share = tl.sqrt(weight * (1.0 - weight))
        spread = tl.where(_not_finite(delta), tl.abs(mean_tile * share - mean * share), tl.abs(delta) * share)
        std = _hypot3(tl.sqrt(1.0 - weight) * std, tl.sqrt(weight) * std_tile, spread)
        moved = tl.where(_not_finite(delta), mean * (1.0 - weight) + mean_tile * weight, mean + delta * weight)
        mean = tl.where(_not_finite(mean) | _not_finite(mean_tile), mean + mean_tile, moved)
        count = new_count
    return count, mean, std


@triton.jit
def _chunk_stats(
    x_ptr,
    c_start,
    t_start,
    t_end,
    C,
    cols,
    col_blocks,
    stride_row,
    stride_col,
    stride_c,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """(count, mean, biased std) per channel, each fp32 [BLOCK_C], over tiles [t_start, t_end).

    The tile-by-tile walk reduces across lanes several times per tile, which on a GPU costs more than
    the loads. So first the deviations d = x - pivot are summed, and squared, per lane over all
    tiles and reduced once: pivot is the first tile's mean, taken about its first value (a constant
    channel's is then exact). M2 = sum d^2 - sum d * mean(d) loses at most 2 bits to cancellation
    when sum d^2 <= 4 M2 (the pivot within a standard deviation or so of the mean), and no square
    leaves float32's normal range when 2^-60 < |d| < 2^60. Where any channel of the block fails
    either, or a sum is not finite, the chunk is walked again tile by tile.
    """
    offsets, mask, n_first = _tile(
        t_start, c_start, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64, COL_VEC
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    first = tl.sum(tl.where((tl.arange(0, BLOCK_S) == 0)[None, :], x, 0.0), axis=1)
    pivot = first + tl.sum(tl.where(mask, x - first[:, None], 0.0), axis=1) / n_first.to(tl.float32)
    sum_d = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    sum_d2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    largest = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(t_start, t_end):
        offsets, mask, n_valid = _tile(
            t, c_start, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64, COL_VEC
        )
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - pivot[:, None], 0.0)
        sum_d += d
        sum_d2 += d * d
        largest = tl.maximum(largest, tl.abs(d))
        count += n_valid.to(tl.float32)
    s1 = tl.sum(sum_d, axis=1)
    s2 = tl.sum(sum_d2, axis=1)
    d_max = tl.max(largest, axis=1)
    mean_d = s1 / count
    mean = pivot + mean_d
    m2 = s2 - s1 * mean_d
    # About the rounded mean passed on, as the tile walk measures it (its rounding error's share).
    rounding = mean_d - (mean - pivot)
    std = tl.sqrt(tl.maximum(m2, 0.0) / count + rounding * rounding)
    in_range = (d_max > 8.673617379884035e-19) & (d_max < 1.152921504606847e18)  # 2^-60, 2^60
    trusted = _finite(s1) & _finite(s2) & ((d_max == 0) | (in_range & (s2 <= 4.0 * m2)))
    if tl.min(trusted.to(tl.int32), axis=0) == 0:
        count, mean, std = _chunk_stats_by_tile(
            x_ptr, c_start, t_start, t_end, C, cols, col_blocks, stride_row, stride_col, stride_c,
            BLOCK_C, BLOCK_S, INT64, COL_VEC,
        )  # fmt: skip
    return count, mean, std


@triton.jit
def _invstd(std, eps):
    """1 / sqrt(std^2 + eps) with std scaled out first: right where std^2 overflows float32."""
    s = tl.maximum(std, tl.sqrt(eps))
    q = std / s
    return (1.0 / s) / tl.sqrt(q * q + (eps / s) / s)


@triton.jit
def _finish_stats(
    mean,  # fp32 [BLOCK_C]: batch mean
    std,  # fp32 [BLOCK_C]: biased standard deviation
    c,  # channel indices [BLOCK_C]
    c_mask,
    running_mean_ptr,  # *[C] in/out (fp32, fp16 or bf16), touched only if HAS_RUNNING_MEAN
    running_var_ptr,  # *[C] in/out, touched only if HAS_RUNNING_VAR
    total,  # fp32: N * S
    momentum,  # fp32: weight of this batch in the running averages
    HAS_RUNNING_MEAN: tl.constexpr,
    HAS_RUNNING_VAR: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # see _output
):
    """Updates the running stats (their variance unbiased: * n / (n - 1))."""
    if HAS_RUNNING_MEAN:
        old = tl.load(running_mean_ptr + c, mask=c_mask).to(tl.float32)
        new = (1.0 - momentum) * old + momentum * mean
        tl.store(running_mean_ptr + c, _output(new, running_mean_ptr, ROUND_BF16), mask=c_mask)
    if HAS_RUNNING_VAR:
        old = tl.load(running_var_ptr + c, mask=c_mask).to(tl.float32)
        new = (1.0 - momentum) * old + momentum * (std * std * (total / (total - 1.0)))
        tl.store(running_var_ptr + c, _output(new, running_var_ptr, ROUND_BF16), mask=c_mask)


@triton.jit
def _affine(invstd, c, c_mask, weight_ptr, bias_ptr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel (scale, shift) = (invstd * w, b), fp32 [BLOCK_C]."""
    scale = invstd
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    shift = tl.zeros_like(invstd)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _normalize_tile(
    x_ptr,
    y_ptr,
    residual_ptr,  # read only if HAS_RESIDUAL: x's dtype and strides
    t,
    c_start,
    mean,  # fp32 [BLOCK_C]
    scale,  # fp32 [BLOCK_C]: invstd * w
    shift,  # fp32 [BLOCK_C]: b
    C,
    cols,
    col_blocks,
    stride_row,
    stride_col,
    stride_c,
    slope,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """Tile t of y = act((x - mean) * scale + shift (+ residual)).

    The subtraction comes first: at |mean| >> std, x * scale + (shift - mean * scale) would cancel.
    """
    offsets, mask, _ = _tile(
        t, c_start, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64, COL_VEC
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean[:, None]) * scale[:, None] + shift[:, None]
    if HAS_RESIDUAL:
        z += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, _output(_activate(z, ACT, slope), y_ptr, ROUND_BF16), mask=mask)


# --------------------------------------------------------------------------- forward: the kernels


@triton.jit
def _stats_partial_kernel(
    x_ptr,  # *x: input (fp32, fp16 or bf16), indexed through the strides below
    partial_ptr,  # *fp32 [3, K, C] out: for chunk k and channel c, the count of values seen, their
    #               mean, and their biased standard deviation
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
    COL_VEC: tl.constexpr,
):
    """Stage 1 of the statistics: per-chunk (count, mean, std). Grid: (cdiv(C, BLOCK_C), K)."""
    c_start = tl.program_id(0) * BLOCK_C
    chunk = tl.program_id(1)
    t_start = chunk * tiles_per_chunk
    t_end = tl.minimum(t_start + tiles_per_chunk, num_tiles)
    count, mean, std = _chunk_stats(
        x_ptr, c_start, t_start, t_end, C, cols, col_blocks, stride_row, stride_col, stride_c,
        BLOCK_C, BLOCK_S, INT64, COL_VEC,
    )  # fmt: skip
    c = c_start + tl.arange(0, BLOCK_C)
    out = partial_ptr + chunk * C + c
    c_mask = c < C
    plane = tl.num_programs(1) * C
    tl.store(out, count, mask=c_mask)
    tl.store(out + plane, mean, mask=c_mask)
    tl.store(out + 2 * plane, std, mask=c_mask)


@triton.jit
def _stats_finalize_kernel(
    partial_ptr,  # *fp32 [3, K, C]: stage-1 (count, mean, std) partials
    mean_ptr,  # *fp32 [C] out: batch mean
    second_ptr,  # *fp32 [C] out: invstd = 1/sqrt(var + eps) if OUTPUT_INVSTD, else the biased var
    running_mean_ptr,  # *[C] in/out (fp32, fp16 or bf16), touched only if HAS_RUNNING_MEAN
    running_var_ptr,  # *[C] in/out, touched only if HAS_RUNNING_VAR
    C,
    K,
    total,  # fp32: N * S, the values per channel
    momentum,  # fp32: weight of this batch in the running averages
    eps,
    OUTPUT_INVSTD: tl.constexpr,
    HAS_RUNNING_MEAN: tl.constexpr,
    HAS_RUNNING_VAR: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # see _output (for the running stats)
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Stage 2: merges the K partials of each channel; updates the running stats. Grid: (cdiv(C, BLOCK_C),)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count_ptr = partial_ptr
    mean_part_ptr = partial_ptr + K * C
    std_part_ptr = partial_ptr + 2 * K * C
    # The chunk means are summed shifted by the first chunk's, as the tiles' values are in _chunk_stats.
    first = tl.load(mean_part_ptr + c, mask=c_mask, other=0.0)
    weighted = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    shares = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offsets, mask = _partials_block(k0, c, c_mask, C, K, BLOCK_K)
        n = tl.load(count_ptr + offsets, mask=mask, other=0.0)
        mean_k = tl.load(mean_part_ptr + offsets, mask=mask, other=0.0)
        weighted += tl.where(mask, n * (mean_k - first[None, :]), 0.0)
        shares += (n / total) * mean_k  # used only where the sum above overflowed
    weighted_sum = tl.sum(weighted, axis=0)
    mean = tl.where(_not_finite(weighted_sum), tl.sum(shares, axis=0), first + weighted_sum / total)
    # std^2 = sum_k (n_k / n) (std_k^2 + delta_k^2), every term scaled by the largest first.
    largest = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offsets, mask = _partials_block(k0, c, c_mask, C, K, BLOCK_K)
        delta = tl.abs(tl.load(mean_part_ptr + offsets, mask=mask, other=0.0) - mean[None, :])
        std_k = tl.load(std_part_ptr + offsets, mask=mask, other=0.0)
        largest = tl.maximum(largest, tl.max(tl.maximum(delta, std_k), axis=0))
    inv, back = _scale_by(largest)
    var_scaled = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offsets, mask = _partials_block(k0, c, c_mask, C, K, BLOCK_K)
        n = tl.load(count_ptr + offsets, mask=mask, other=0.0)
        delta = (tl.load(mean_part_ptr + offsets, mask=mask, other=0.0) - mean[None, :]) * inv[None, :]
        std_k = tl.load(std_part_ptr + offsets, mask=mask, other=0.0) * inv[None, :]
        var_scaled += (n / total) * (std_k * std_k + delta * delta)
    std = back * tl.sqrt(tl.sum(var_scaled, axis=0))
    _finish_stats(
        mean, std, c, c_mask, running_mean_ptr, running_var_ptr, total, momentum,
        HAS_RUNNING_MEAN, HAS_RUNNING_VAR, ROUND_BF16,
    )  # fmt: skip
    tl.store(mean_ptr + c, mean, mask=c_mask)
    if OUTPUT_INVSTD:
        tl.store(second_ptr + c, _invstd(std, eps), mask=c_mask)
    else:
        tl.store(second_ptr + c, std * std, mask=c_mask)


@triton.jit
def _normalize_kernel(
    x_ptr,  # *x: input (fp32, fp16 or bf16), indexed through the strides below
    y_ptr,  # *y out: x's dtype and strides
    residual_ptr,  # *residual: x's dtype and strides, read only if HAS_RESIDUAL
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
    ACT: tl.constexpr,  # a code of bnfused.activation: see _activate
    HAS_RESIDUAL: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # see _output
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """y = act((x - mean) * (invstd * w) + b (+ residual)), one tile per program.

    Grid: (cdiv(C, BLOCK_C) * num_tiles,)."""
    t, c_start, c = _elementwise_program(num_tiles, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    spread = tl.load(spread_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    if FROM_RUNNING_VAR:
        spread = 1.0 / tl.sqrt(spread + eps)
    scale, shift = _affine(spread, c, c_mask, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS)
    _normalize_tile(
        x_ptr, y_ptr, residual_ptr, t, c_start, mean, scale, shift, C, cols, col_blocks,
        stride_row, stride_col, stride_c, slope, ACT, HAS_RESIDUAL, ROUND_BF16, BLOCK_C, BLOCK_S, INT64, COL_VEC,
    )  # fmt: skip


@triton.jit
def _forward_fused_kernel(
    x_ptr,  # *x: input (fp32, fp16 or bf16), indexed through the strides below
    y_ptr,  # *y out: x's dtype and strides
    residual_ptr,  # *residual: x's dtype and strides, read only if HAS_RESIDUAL
    weight_ptr,  # *[C] (any float dtype), read only if HAS_WEIGHT
    bias_ptr,  # *[C], read only if HAS_BIAS
    mean_ptr,  # *fp32 [C] out: batch mean
    invstd_ptr,  # *fp32 [C] out: 1 / sqrt(biased var + eps)
    running_mean_ptr,  # *[C] in/out, touched only if HAS_RUNNING_MEAN
    running_var_ptr,  # *[C] in/out, touched only if HAS_RUNNING_VAR
    C,
    cols,
    col_blocks,
    num_tiles,
    stride_row,
    stride_col,
    stride_c,
    total,  # fp32: N * S
    momentum,
    eps,
    slope,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RUNNING_MEAN: tl.constexpr,
    HAS_RUNNING_VAR: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # see _output (for y)
    ROUND_BF16_RUNNING: tl.constexpr,  # the same for the running stats
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """The whole training forward of a channel block in one program. Grid: (cdiv(C, BLOCK_C),)."""
    c_start = tl.program_id(0) * BLOCK_C
    c = c_start + tl.arange(0, BLOCK_C)
    c_mask = c < C
    _, mean, std = _chunk_stats(
        x_ptr, c_start, 0, num_tiles, C, cols, col_blocks, stride_row, stride_col, stride_c,
        BLOCK_C, BLOCK_S, INT64, COL_VEC,
    )  # fmt: skip
    _finish_stats(
        mean, std, c, c_mask, running_mean_ptr, running_var_ptr, total, momentum,
        HAS_RUNNING_MEAN, HAS_RUNNING_VAR, ROUND_BF16_RUNNING,
    )  # fmt: skip
    invstd = _invstd(std, eps)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(invstd_ptr + c, invstd, mask=c_mask)
    scale, shift = _affine(invstd, c, c_mask, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS)
    for t in range(0, num_tiles):
        _normalize_tile(
            x_ptr, y_ptr, residual_ptr, t, c_start, mean, scale, shift, C, cols, col_blocks,
            stride_row, stride_col, stride_c, slope, ACT, HAS_RESIDUAL, ROUND_BF16, BLOCK_C, BLOCK_S, INT64, COL_VEC,
        )  # fmt: skip


# --------------------------------------------------------------------------- backward: the math
#
# With x_hat = (x - mean) * invstd, z = w * x_hat + b (+ residual), y = act(z) and g = dL/dz = dy * act'(z):
#     dL/db = sum(g),   dL/dw = sum(g * x_hat),   dL/dresidual = g     (sums over the M = N * S values)
# Training mode: mean and invstd depend on x. dx_hat = w * g, and differentiating
# x_hat_i = (x_i - mean) * invstd through mean = sum(x)/M and invstd = (sum((x - mean)^2)/M + eps)^-1/2
# gives
#     dL/dx_i = invstd * (dx_hat_i - sum(dx_hat)/M - x_hat_i * sum(dx_hat * x_hat)/M)
#             = w * invstd * (g_i - sum(g)/M - x_hat_i * sum(g * x_hat)/M).
# So one reduction produces the two per-channel sums (which are also db and dw), and one
# elementwise pass applies dx = (g - mean_g - (x - mean) * xhat_coef) * (w * invstd) with
# mean_g = sum(g)/M and xhat_coef = sum(g * x_hat) * invstd / M.
# Eval mode: mean and invstd are the running stats, constants, so dL/dx = w * invstd * g; no sums
# needed for dx, and no x read (unless act' needs z: hardswish, silu).
# dresidual = g is written by the last pass that forms g: the dx pass when there is one, else the
# reduction, else a pass of its own.


@triton.jit
def _chunk_grad_sums(
    dy_ptr,
    x_ptr,
    y_ptr,
    residual_ptr,
    dres_ptr,  # written only if STORE_G
    mean,  # fp32 [BLOCK_C]
    invstd,  # fp32 [BLOCK_C]
    scale,  # fp32 [BLOCK_C]: invstd * w, for the z that ACT 4-5 recompute
    shift,  # fp32 [BLOCK_C]: b, the same
    c_start,
    t_start,
    t_end,
    C,
    cols,
    col_blocks,
    stride_row,
    stride_col,
    stride_c,
    slope,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NEED_G_XHAT: tl.constexpr,  # else the second sum is left 0 (and x not read, unless ACT recomputes z)
    STORE_G: tl.constexpr,  # write g (dresidual) on the way
    ROUND_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """(sum(g), sum(g * x_hat)) per channel, fp32 [BLOCK_C], over tiles [t_start, t_end).

    Tiles are accumulated elementwise and reduced once at the end: one cross-lane reduction per
    program instead of one per tile.
    """
    acc_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_g_xhat = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for t in range(t_start, t_end):
        offsets, mask, _ = _tile(
            t, c_start, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64, COL_VEC
        )
        g, x = _grad_tile(
            dy_ptr, x_ptr, y_ptr, residual_ptr, offsets, mask, mean, scale, shift, slope, ACT, HAS_RESIDUAL, NEED_G_XHAT
        )
        acc_g += g
        if NEED_G_XHAT:
            # Masked lanes hold x = 0, whose x_hat can overflow (mean 3e38): 0 * inf would be NaN.
            acc_g_xhat += tl.where(mask, g * ((x - mean[:, None]) * invstd[:, None]), 0.0)
        if STORE_G:
            tl.store(dres_ptr + offsets, _output(g, dres_ptr, ROUND_BF16), mask=mask)
    return tl.sum(acc_g, axis=1), tl.sum(acc_g_xhat, axis=1)


@triton.jit
def _dx_tile(
    dy_ptr,
    x_ptr,
    y_ptr,
    residual_ptr,
    dx_ptr,  # written only if NEED_DX
    dres_ptr,  # written only if STORE_G
    t,
    c_start,
    mean,  # fp32 [BLOCK_C]
    scale,  # fp32 [BLOCK_C]: w * invstd
    shift,  # fp32 [BLOCK_C]: b, used only to recompute z (ACT 4-5)
    mean_g,  # fp32 [BLOCK_C]: sum(g) / M, used only if TRAINING
    xhat_coef,  # fp32 [BLOCK_C]: sum(g * x_hat) * invstd / M, used only if TRAINING
    C,
    cols,
    col_blocks,
    stride_row,
    stride_col,
    stride_c,
    slope,
    TRAINING: tl.constexpr,
    NEED_DX: tl.constexpr,
    STORE_G: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """Tile t of dx (by the formulas above) and of dresidual = g."""
    offsets, mask, _ = _tile(
        t, c_start, C, cols, col_blocks, stride_row, stride_col, stride_c, BLOCK_C, BLOCK_S, INT64, COL_VEC
    )
    g, x = _grad_tile(
        dy_ptr, x_ptr, y_ptr, residual_ptr, offsets, mask, mean, scale, shift, slope, ACT, HAS_RESIDUAL, TRAINING
    )
    if STORE_G:
        tl.store(dres_ptr + offsets, _output(g, dres_ptr, ROUND_BF16), mask=mask)
    if NEED_DX:
        if TRAINING:
            g = g - mean_g[:, None] - (x - mean[:, None]) * xhat_coef[:, None]
        tl.store(dx_ptr + offsets, _output(g * scale[:, None], dx_ptr, ROUND_BF16), mask=mask)


# --------------------------------------------------------------------------- backward: the kernels


@triton.jit
def _backward_partial_kernel(
    dy_ptr,  # *dy: x's dtype and strides
    x_ptr,  # *x, read only if NEED_G_XHAT or ACT recomputes z (4-5)
    y_ptr,  # *y: saved output, read only for ACT 1-3 (for act'(z))
    residual_ptr,  # *residual: x's dtype and strides, read only if HAS_RESIDUAL
    dres_ptr,  # *dresidual out: x's dtype and strides, written only if STORE_G
    weight_ptr,  # *[C] (any float dtype), read only if HAS_WEIGHT (to recompute z)
    bias_ptr,  # *[C], read only if HAS_BIAS (the same)
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
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NEED_G_XHAT: tl.constexpr,
    STORE_G: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # see _output (for dresidual)
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """Per-chunk sum(g) and sum(g * x_hat) of each channel. Grid: (cdiv(C, BLOCK_C), K)."""
    c_start = tl.program_id(0) * BLOCK_C
    chunk = tl.program_id(1)
    c = c_start + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    scale, shift = _affine(invstd, c, c_mask, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS)
    t_start = chunk * tiles_per_chunk
    t_end = tl.minimum(t_start + tiles_per_chunk, num_tiles)
    sum_g, sum_g_xhat = _chunk_grad_sums(
        dy_ptr, x_ptr, y_ptr, residual_ptr, dres_ptr, mean, invstd, scale, shift, c_start, t_start, t_end, C, cols,
        col_blocks, stride_row, stride_col, stride_c, slope, ACT, HAS_RESIDUAL, NEED_G_XHAT, STORE_G, ROUND_BF16,
        BLOCK_C, BLOCK_S, INT64, COL_VEC,
    )  # fmt: skip
    out = partial_ptr + chunk * C + c
    tl.store(out, sum_g, mask=c_mask)
    if NEED_G_XHAT:
        tl.store(out + tl.num_programs(1) * C, sum_g_xhat, mask=c_mask)


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
        offsets, mask = _partials_block(k0, c, c_mask, C, K, BLOCK_K)
        acc_first += tl.load(partial_ptr + offsets, mask=mask, other=0.0)
        if BOTH:
            acc_second += tl.load(partial_ptr + K * C + offsets, mask=mask, other=0.0)
    tl.store(first_ptr + c, tl.sum(acc_first, axis=0), mask=c_mask)
    if BOTH:
        tl.store(second_ptr + c, tl.sum(acc_second, axis=0), mask=c_mask)


@triton.jit
def _dx_coefficients(
    c, c_mask, weight_ptr, bias_ptr, mean_ptr, invstd_ptr, sum_g_ptr, sum_g_xhat_ptr, inv_count,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Per-channel (mean, scale = w * invstd, shift = b, mean_g, xhat_coef) of _dx_tile, from the sums in memory."""
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    scale, shift = _affine(invstd, c, c_mask, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    mean_g = tl.zeros_like(invstd)
    xhat_coef = tl.zeros_like(invstd)
    if TRAINING:
        mean_g = tl.load(sum_g_ptr + c, mask=c_mask, other=0.0) * inv_count
        xhat_coef = tl.load(sum_g_xhat_ptr + c, mask=c_mask, other=0.0) * (invstd * inv_count)
    return mean, scale, shift, mean_g, xhat_coef


@triton.jit
def _backward_dx_kernel(
    dy_ptr,  # *dy: x's dtype and strides
    x_ptr,  # *x, read only if TRAINING or ACT recomputes z (4-5)
    y_ptr,  # *y: saved output, read only for ACT 1-3
    residual_ptr,  # *residual: x's dtype and strides, read only if HAS_RESIDUAL
    dx_ptr,  # *dx out: x's dtype and strides, written only if NEED_DX
    dres_ptr,  # *dresidual out: x's dtype and strides, written only if STORE_G
    weight_ptr,  # *[C] (any float dtype), read only if HAS_WEIGHT
    bias_ptr,  # *[C], read only if HAS_BIAS (to recompute z)
    mean_ptr,  # *fp32 [C]
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
    NEED_DX: tl.constexpr,
    STORE_G: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # see _output
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """dx and/or dresidual, one tile per program. Grid: (cdiv(C, BLOCK_C) * num_tiles,)."""
    t, c_start, c = _elementwise_program(num_tiles, BLOCK_C)
    mean, scale, shift, mean_g, xhat_coef = _dx_coefficients(
        c, c < C, weight_ptr, bias_ptr, mean_ptr, invstd_ptr, sum_g_ptr, sum_g_xhat_ptr, inv_count,
        TRAINING, HAS_WEIGHT, HAS_BIAS,
    )  # fmt: skip
    _dx_tile(
        dy_ptr, x_ptr, y_ptr, residual_ptr, dx_ptr, dres_ptr, t, c_start, mean, scale, shift, mean_g, xhat_coef, C,
        cols, col_blocks, stride_row, stride_col, stride_c, slope, TRAINING, NEED_DX, STORE_G, ACT, HAS_RESIDUAL,
        ROUND_BF16, BLOCK_C, BLOCK_S, INT64, COL_VEC,
    )  # fmt: skip


@triton.jit
def _backward_fused_kernel(
    dy_ptr,  # *dy: x's dtype and strides
    x_ptr,  # *x, read only if NEED_G_XHAT or ACT recomputes z (4-5)
    y_ptr,  # *y: saved output, read only for ACT 1-3
    residual_ptr,  # *residual: x's dtype and strides, read only if HAS_RESIDUAL
    dx_ptr,  # *dx out: x's dtype and strides, written only if NEED_DX
    dres_ptr,  # *dresidual out: x's dtype and strides, written only if STORE_G
    weight_ptr,  # *[C] (any float dtype), read only if HAS_WEIGHT
    bias_ptr,  # *[C], read only if HAS_BIAS (to recompute z)
    mean_ptr,  # *fp32 [C]
    invstd_ptr,  # *fp32 [C]
    sum_g_ptr,  # *fp32 [C] out: sum(g), i.e. dbias
    sum_g_xhat_ptr,  # *fp32 [C] out: sum(g * x_hat), i.e. dweight; written only if NEED_G_XHAT
    C,
    cols,
    col_blocks,
    num_tiles,
    stride_row,
    stride_col,
    stride_c,
    inv_count,  # fp32: 1 / (N * S)
    slope,
    NEED_G_XHAT: tl.constexpr,
    NEED_DX: tl.constexpr,  # training-mode dx (eval-mode dx needs no sums: _backward_dx_kernel)
    STORE_G: tl.constexpr,  # write dresidual: in the dx walk if NEED_DX, else in the reduction's
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # see _output
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INT64: tl.constexpr,
    COL_VEC: tl.constexpr,
):
    """The whole training backward of a channel block in one program. Grid: (cdiv(C, BLOCK_C),)."""
    c_start = tl.program_id(0) * BLOCK_C
    c = c_start + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    scale, shift = _affine(invstd, c, c_mask, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS)
    sum_g, sum_g_xhat = _chunk_grad_sums(
        dy_ptr, x_ptr, y_ptr, residual_ptr, dres_ptr, mean, invstd, scale, shift, c_start, 0, num_tiles, C, cols,
        col_blocks, stride_row, stride_col, stride_c, slope, ACT, HAS_RESIDUAL, NEED_G_XHAT, STORE_G and not NEED_DX,
        ROUND_BF16, BLOCK_C, BLOCK_S, INT64, COL_VEC,
    )  # fmt: skip
    tl.store(sum_g_ptr + c, sum_g, mask=c_mask)
    if NEED_G_XHAT:
        tl.store(sum_g_xhat_ptr + c, sum_g_xhat, mask=c_mask)
    if NEED_DX:
        mean_g = sum_g * inv_count
        xhat_coef = sum_g_xhat * (invstd * inv_count)
        for t in range(0, num_tiles):
            _dx_tile(
                dy_ptr, x_ptr, y_ptr, residual_ptr, dx_ptr, dres_ptr, t, c_start, mean, scale, shift, mean_g,
                xhat_coef, C, cols, col_blocks, stride_row, stride_col, stride_c, slope, True, True, STORE_G, ACT,
                HAS_RESIDUAL, ROUND_BF16, BLOCK_C, BLOCK_S, INT64, COL_VEC,
            )  # fmt: skip
