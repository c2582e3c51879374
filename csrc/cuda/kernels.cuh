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
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

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

template <int kAct, typename A>
__device__ __forceinline__ A activate(A z, A slope) {
  if constexpr (kAct == kRelu) return z > A(0) ? z : A(0);
  if constexpr (kAct == kLeakyRelu) return z > A(0) ? z : z * slope;
  return z;
}

template <int kAct, typename A>
__device__ __forceinline__ A act_grad(A dy, A y, A slope) {
  if constexpr (kAct == kRelu) return y > A(0) ? dy : A(0);
  if constexpr (kAct == kLeakyRelu) return y > A(0) ? dy : dy * slope;
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
__global__ void grad_partial(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,
                             const acc_t<T>* __restrict__ mean, acc_t<T> slope, Grid2 g, acc_t<T>* part_g,
                             acc_t<T>* part_gx) {
  using A = acc_t<T>;
  __shared__ A sh_g[kThreads], sh_gx[kThreads];
  const int tx = threadIdx.x % g.bx, ty = threadIdx.x / g.bx;
  const int64_t c = int64_t(blockIdx.y) * g.bx + tx;
  const int64_t m0 = int64_t(blockIdx.x) * g.chunk, m1 = min(m0 + g.chunk, g.L.n * g.L.s);
  A sg = 0, sgx = 0;
  if (c < g.L.c) {
    const A mu = mean[c];
    for_rows(g.L, c, m0 + ty, m1, g.by, [&](int64_t off) {
      const A gv = act_grad<kAct>(static_cast<A>(dy[off]), kAct == kNone ? A(0) : static_cast<A>(y[off]), slope);
      sg += gv;
      sgx += gv * (static_cast<A>(x[off]) - mu);
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

// y = act((x - mean) * invstd * w + b) over all elements, in memory order. w, b may be null.
template <typename T, int kAct, typename I>
__global__ void normalize_kernel(const T* __restrict__ x, T* __restrict__ y, I numel, I stride_c, I C,
                                 const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
                                 const acc_t<T>* __restrict__ w, const acc_t<T>* __restrict__ b, acc_t<T> slope) {
  using A = acc_t<T>;
  for (I o = I(blockIdx.x) * blockDim.x + threadIdx.x; o < numel; o += I(gridDim.x) * blockDim.x) {
    const I c = (o / stride_c) % C;
    const A scale = w ? invstd[c] * w[c] : invstd[c];
    const A z = (static_cast<A>(x[o]) - mean[c]) * scale + (b ? b[c] : A(0));
    y[o] = static_cast<T>(activate<kAct>(z, slope));
  }
}

// dx = (g - sum_g / M - x_hat * sum_gxhat / M) * invstd * w, or g * invstd * w when the sums are
// null (eval mode: the statistics are constants).
template <typename T, int kAct, typename I>
__global__ void grad_input_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,
                                  T* __restrict__ dx, I numel, I stride_c, I C, const acc_t<T>* __restrict__ mean,
                                  const acc_t<T>* __restrict__ invstd, const acc_t<T>* __restrict__ w,
                                  const acc_t<T>* __restrict__ sum_g, const acc_t<T>* __restrict__ sum_gxhat,
                                  acc_t<T> inv_count, acc_t<T> slope) {
  using A = acc_t<T>;
  for (I o = I(blockIdx.x) * blockDim.x + threadIdx.x; o < numel; o += I(gridDim.x) * blockDim.x) {
    const I c = (o / stride_c) % C;
    const A k1 = w ? invstd[c] * w[c] : invstd[c];
    const A gv = act_grad<kAct>(static_cast<A>(dy[o]), kAct == kNone ? A(0) : static_cast<A>(y[o]), slope);
    A v = gv * k1;
    if (sum_g) {
      const A x_hat = (static_cast<A>(x[o]) - mean[c]) * invstd[c];
      v = (gv - sum_g[c] * inv_count - x_hat * sum_gxhat[c] * inv_count) * k1;
    }
    dx[o] = static_cast<T>(v);
  }
}

}  // namespace bnfused::cuda
