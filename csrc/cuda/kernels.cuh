// CUDA kernels of BatchNorm: stats -> normalize(+activation) forward, reduce -> elementwise backward.
//
// Reductions are two-stage and deterministic (no float atomics): a block reduces one chunk of
// rows for up to kRowChannels channels with a fixed-shape tree, writes a partial per (chunk,
// channel), and a second kernel merges the partials of each channel in chunk order, in double.
// Elementwise kernels walk memory linearly: for a dense tensor the channel of offset o is
// (o / stride_c) % C in every layout (NCHW, channels_last, (N, L, C)), so loads stay coalesced.
//
// Two thread shapes cover the layouts (see launch_shape): spatial stride 1 (NCHW): a block's 256
// threads read consecutive spatial positions of one channel; channel stride 1 (channels_last):
// 32 threads read 32 consecutive channels of a row, 8 rows at a time.
//
// The layer is z = (x - mean) * invstd * w + b (+ residual), y = act(z). The backward's g = dy *
// act'(z) reads act' off y for relu, leaky_relu and relu6, and recomputes z (pre_activation, the
// forward's own arithmetic, so the kinks fall on the same side) for hardswish and silu. A residual
// is indexed with x's offsets: the ops hand the kernels one in x's layout.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <type_traits>

#include "../activation.h"
#include "../layout.h"

namespace bnfused::cuda {

constexpr int kThreads = 256;
constexpr int kRowChannels = 32;  // channels per block when the channel stride is 1

template <typename T>
using acc_t = at::opmath_type<T>;

// Which (channel, row) a thread starts at, and how rows (m = n * S + s) map to memory.
struct Grid2 {
  Ncs L;
  int64_t chunk;  // rows per block
  int bx, by;     // threads along channels, along rows (bx * by == kThreads)
};

// 1 + e^-z: silu(z) = z / (1 + e^-z) and sigmoid(z) = 1 / (1 + e^-z), as torch's CUDA kernels write them.
template <typename A>
__device__ __forceinline__ A one_plus_exp_neg(A z) {
  if constexpr (std::is_same_v<A, double>) return 1.0 + ::exp(-z);
  return 1.0f + ::expf(-z);
}

// act(z) with torch's formulas (relu6 and hardswish as clamps that keep a NaN, silu = z / (1 + e^-z)).
template <int kAct, typename A>
__device__ __forceinline__ A activate(A z, A slope) {
  if constexpr (kAct == kRelu) return z < A(0) ? A(0) : z;  // a NaN stays NaN, as in torch
  if constexpr (kAct == kLeakyRelu) return z > A(0) ? z : z * slope;
  if constexpr (kAct == kRelu6) return z <= A(0) ? A(0) : (z >= A(6) ? A(6) : z);
  if constexpr (kAct == kHardswish) {
    const A shifted = z + A(3);
    return z * (shifted <= A(0) ? A(0) : (shifted >= A(6) ? A(6) : shifted)) / A(6);
  }
  if constexpr (kAct == kSilu) return z / one_plus_exp_neg(z);
  if constexpr (kAct == kSigmoid) return A(1) / one_plus_exp_neg(z);
  return z;
}

// g = dy * act'(z) with torch's values at the kinks (relu6' = 0 at 0 and 6; hardswish' = 0 at -3,
// 1 at 3). v is the saved output y for relu, leaky_relu and relu6 (0 < y < 6 exactly where
// 0 < z < 6), the recomputed z for hardswish and silu, unused for none.
template <int kAct, typename A>
__device__ __forceinline__ A act_grad(A dy, A v, A slope) {
  // At NaN, as torch: relu passes dy, leaky_relu scales it by the slope.
  if constexpr (kAct == kRelu) return v <= A(0) ? A(0) : dy;
  if constexpr (kAct == kLeakyRelu) return v > A(0) ? dy : dy * slope;
  if constexpr (kAct == kRelu6) return v > A(0) && v < A(6) ? dy : A(0);
  if constexpr (kAct == kHardswish) {
    if (v <= A(-3)) return A(0);
    return v < A(3) ? dy * (v / A(3) + A(0.5)) : dy;
  }
  if constexpr (kAct == kSilu) {
    const A s = A(1) / one_plus_exp_neg(v);
    return dy * s * (A(1) + v * (A(1) - s));
  }
  if constexpr (kAct == kSigmoid) {
    const A s = A(1) / one_plus_exp_neg(v);
    return dy * (s * (A(1) - s));
  }
  return dy;
}

// The per-channel affine map of the layer and its optional residual: what z is made of. w, b and
// residual may be null.
template <typename T>
struct LayerTerms {
  const acc_t<T>* __restrict__ mean;
  const acc_t<T>* __restrict__ invstd;
  const acc_t<T>* __restrict__ w;
  const acc_t<T>* __restrict__ b;
  const T* __restrict__ residual;

  __device__ __forceinline__ acc_t<T> scale(int64_t c) const { return w ? invstd[c] * w[c] : invstd[c]; }
  __device__ __forceinline__ acc_t<T> shift(int64_t c) const { return b ? b[c] : acc_t<T>(0); }
};

// z at offset o of a channel with mean mu, scale invstd * w and shift b: the one expression the
// forward and the backward's recomputation share, so that both round it the same way.
template <typename T, typename A, typename I>
__device__ __forceinline__ A pre_activation(const LayerTerms<T>& t, A xv, A mu, A scale, A shift, I o) {
  const A z = (xv - mu) * scale + shift;
  return t.residual ? z + static_cast<A>(t.residual[o]) : z;
}

// What the backward reads per element: dy, x, and y (codes 1-3) or the terms of z (codes 4, 5).
template <typename T>
struct GradTerms {
  const T* __restrict__ dy;
  const T* __restrict__ x;
  const T* __restrict__ y;  // null unless grad_from_output(act)
  LayerTerms<T> layer;      // mean and invstd always; w, b, residual as the forward had them
  acc_t<T> slope;
};

// g = dy * act'(z) at offset o of channel c; scale and shift are the channel's (LayerTerms).
template <int kAct, typename T, typename A, typename I>
__device__ __forceinline__ A grad_at(const GradTerms<T>& a, I o, A xv, A mu, A scale, A shift) {
  const A dy = static_cast<A>(a.dy[o]);
  if constexpr (grad_from_output(kAct)) return act_grad<kAct>(dy, static_cast<A>(a.y[o]), a.slope);
  if constexpr (grad_from_input(kAct)) {
    return act_grad<kAct>(dy, pre_activation(a.layer, xv, mu, scale, shift, o), a.slope);
  }
  return dy;
}

// Calls f(offset) for the rows m0, m0 + step, ... below m1 of channel c (m = n * S + s).
template <typename F>
__device__ __forceinline__ void for_rows(const Ncs& L, int64_t c, int64_t m0, int64_t m1, int64_t step, F&& f) {
  int64_t n = m0 / L.s, s = m0 % L.s;
  const int64_t dn = step / L.s, ds = step % L.s;
  for (int64_t m = m0; m < m1; m += step) {
    f(n * L.sn + s * L.ss + c * L.sc);
    n += dn;
    s += ds;
    if (s >= L.s) {
      s -= L.s;
      ++n;
    }
  }
}

// Chan et al.'s merge of (count, mean, M2) b into a.
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A nb, A mb, A m2b) {
  const A total = n + nb;
  if (nb == A(0)) return;
  const A delta = mb - mean, frac = nb / total;
  mean += delta * frac;
  m2 += m2b + delta * delta * n * frac;
  n = total;
}

// Stage 1 of the statistics: Welford per thread, a fixed tree per block; writes the chunk's
// (mean, M2) of each of its channels to part_mean/part_m2[chunk * C + c].
template <typename T>
__global__ void stats_partial(const T* __restrict__ x, Grid2 g, acc_t<T>* part_mean, acc_t<T>* part_m2) {
  using A = acc_t<T>;
  __shared__ A sh_n[kThreads], sh_mean[kThreads], sh_m2[kThreads];
  const int tx = threadIdx.x % g.bx, ty = threadIdx.x / g.bx;
  const int64_t c = int64_t(blockIdx.y) * g.bx + tx;
  const int64_t m0 = int64_t(blockIdx.x) * g.chunk, m1 = min(m0 + g.chunk, g.L.n * g.L.s);
  A n = 0, mean = 0, m2 = 0;
  if (c < g.L.c) {
    for_rows(g.L, c, m0 + ty, m1, g.by, [&](int64_t off) {
      const A v = static_cast<A>(x[off]);
      n += A(1);
      const A delta = v - mean;
      mean += delta / n;
      m2 += delta * (v - mean);
    });
  }
  sh_n[threadIdx.x] = n;
  sh_mean[threadIdx.x] = mean;
  sh_m2[threadIdx.x] = m2;
  __syncthreads();
  for (int half = g.by / 2; half > 0; half /= 2) {
    if (ty < half) {
      const int other = threadIdx.x + half * g.bx;
      chan_merge(n, mean, m2, sh_n[other], sh_mean[other], sh_m2[other]);
      sh_n[threadIdx.x] = n;
      sh_mean[threadIdx.x] = mean;
      sh_m2[threadIdx.x] = m2;
    }
    __syncthreads();
  }
  if (ty == 0 && c < g.L.c) {
    part_mean[blockIdx.x * g.L.c + c] = mean;
    part_m2[blockIdx.x * g.L.c + c] = m2;
  }
}

// Stage 1 of the backward reduction: per chunk and channel, sum(g) and sum(g * (x - mean)).
template <typename T, int kAct>
__global__ void grad_partial(GradTerms<T> a, Grid2 g, acc_t<T>* part_g, acc_t<T>* part_gx) {
  using A = acc_t<T>;
  __shared__ A sh_g[kThreads], sh_gx[kThreads];
  const int tx = threadIdx.x % g.bx, ty = threadIdx.x / g.bx;
  const int64_t c = int64_t(blockIdx.y) * g.bx + tx;
  const int64_t m0 = int64_t(blockIdx.x) * g.chunk, m1 = min(m0 + g.chunk, g.L.n * g.L.s);
  A sg = 0, sgx = 0;
  if (c < g.L.c) {
    const A mu = a.layer.mean[c];
    const A scale = grad_from_input(kAct) ? a.layer.scale(c) : A(0);
    const A shift = grad_from_input(kAct) ? a.layer.shift(c) : A(0);
    for_rows(g.L, c, m0 + ty, m1, g.by, [&](int64_t off) {
      const A xv = static_cast<A>(a.x[off]);
      const A gv = grad_at<kAct>(a, off, xv, mu, scale, shift);
      sg += gv;
      sgx += gv * (xv - mu);
    });
  }
  sh_g[threadIdx.x] = sg;
  sh_gx[threadIdx.x] = sgx;
  __syncthreads();
  for (int half = g.by / 2; half > 0; half /= 2) {
    if (ty < half) {
      sh_g[threadIdx.x] = sg = sg + sh_g[threadIdx.x + half * g.bx];
      sh_gx[threadIdx.x] = sgx = sgx + sh_gx[threadIdx.x + half * g.bx];
    }
    __syncthreads();
  }
  if (ty == 0 && c < g.L.c) {
    part_g[blockIdx.x * g.L.c + c] = sg;
    part_gx[blockIdx.x * g.L.c + c] = sgx;
  }
}

// Stage 2 of the statistics, one thread per channel: merges the chunks in order (in double) and
// writes mean, biased var and invstd; updates running stats of dtype R in place when given.
template <typename A, typename R>
__global__ void stats_finalize(const A* part_mean, const A* part_m2, int64_t chunks, int64_t chunk, int64_t C,
                               int64_t M, double eps, double momentum, A* mean_out, A* var_out, A* invstd_out,
                               R* running_mean, R* running_var) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0, mean = 0, m2 = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    const double nb = double(min(chunk, M - k * chunk));
    chan_merge(n, mean, m2, nb, double(part_mean[k * C + c]), double(part_m2[k * C + c]));
  }
  const double var = m2 / double(M);
  if (mean_out) mean_out[c] = static_cast<A>(mean);
  if (var_out) var_out[c] = static_cast<A>(var);
  if (invstd_out) invstd_out[c] = static_cast<A>(1.0 / sqrt(var + eps));
  if (running_mean) running_mean[c] = static_cast<R>((1.0 - momentum) * double(running_mean[c]) + momentum * mean);
  if (running_var) {
    const double unbiased = m2 / double(M - 1);
    running_var[c] = static_cast<R>((1.0 - momentum) * double(running_var[c]) + momentum * unbiased);
  }
}

// Stage 2 of the backward reduction: sum_g and sum_g * x_hat = invstd * sum(g * (x - mean)).
template <typename A>
__global__ void grad_finalize(const A* part_g, const A* part_gx, int64_t chunks, int64_t C, const A* invstd,
                              A* sum_g, A* sum_gxhat) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sg = 0, sgx = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    sg += double(part_g[k * C + c]);
    sgx += double(part_gx[k * C + c]);
  }
  sum_g[c] = static_cast<A>(sg);
  sum_gxhat[c] = static_cast<A>(sgx * double(invstd[c]));
}

// y = act((x - mean) * invstd * w + b (+ residual)) over all elements, in memory order.
template <typename T, int kAct, typename I>
__global__ void normalize_kernel(const T* __restrict__ x, T* __restrict__ y, I numel, I stride_c, I C,
                                 LayerTerms<T> t, acc_t<T> slope) {
  using A = acc_t<T>;
  for (I o = I(blockIdx.x) * blockDim.x + threadIdx.x; o < numel; o += I(gridDim.x) * blockDim.x) {
    const I c = (o / stride_c) % C;
    const A z = pre_activation(t, static_cast<A>(x[o]), t.mean[c], t.scale(c), t.shift(c), o);
    y[o] = static_cast<T>(activate<kAct>(z, slope));
  }
}

// Writes, each where its pointer is not null, dx = (g - sum_g / M - x_hat * sum_gxhat / M) *
// invstd * w (g * invstd * w when the sums are null: eval mode, the statistics are constants)
// and dresidual = g.
template <typename T, int kAct, typename I>
__global__ void grad_input_kernel(GradTerms<T> a, T* __restrict__ dx, T* __restrict__ dresidual, I numel,
                                  I stride_c, I C, const acc_t<T>* __restrict__ sum_g,
                                  const acc_t<T>* __restrict__ sum_gxhat, acc_t<T> inv_count) {
  using A = acc_t<T>;
  for (I o = I(blockIdx.x) * blockDim.x + threadIdx.x; o < numel; o += I(gridDim.x) * blockDim.x) {
    const I c = (o / stride_c) % C;
    const A mu = a.layer.mean[c], scale = a.layer.scale(c);
    // x only where it is used: eval mode's dx of codes 0-3 reads dy (and y) alone.
    const A xv = grad_from_input(kAct) || sum_g ? static_cast<A>(a.x[o]) : A(0);
    const A gv = grad_at<kAct>(a, o, xv, mu, scale, grad_from_input(kAct) ? a.layer.shift(c) : A(0));
    if (dresidual) dresidual[o] = static_cast<T>(gv);
    if (dx) {
      A v = gv * scale;
      if (sum_g) {
        const A x_hat = (xv - mu) * a.layer.invstd[c];
        v = (gv - sum_g[c] * inv_count - x_hat * sum_gxhat[c] * inv_count) * scale;
      }
      dx[o] = static_cast<T>(v);
    }
  }
}

}  // namespace bnfused::cuda
