// The four CPU kernels of BatchNorm, written once per chunk (see tiling.h) and shared by the ops:
//   moments     per-channel mean and M2 (forward statistics)
//   normalize   y = act((x - mean) * scale + shift)
//   grad_sums   per-channel sum(g) and sum(g * (x - mean)), g = dy * act'(z)
//   grad_input  dx = g * k1 - (x - mean) * k2 - k3
// T is the tensor dtype; A = acc_t<T> (float or double) is the dtype of all arithmetic.
#pragma once

#include <cmath>
#include <vector>

#include "../activation.h"
#include "tiling.h"

namespace bnfused::cpu {

template <int Act, typename V>
inline V activate(const V& z, const V& slope) {
  if constexpr (Act == kRelu) {
    return at::vec::maximum(z, V(0));
  } else if constexpr (Act == kLeakyRelu) {
    return V::blendv(z * slope, z, z > V(0));
  } else {
    return z;
  }
}

// dy * act'(z), with act' read off the saved output: y > 0 exactly where z > 0 (slope >= 0).
template <int Act, typename V>
inline V act_grad(const V& dy, const V& y, const V& slope) {
  if constexpr (Act == kRelu) {
    return V::blendv(V(0), dy, y > V(0));
  } else if constexpr (Act == kLeakyRelu) {
    return V::blendv(dy * slope, dy, y > V(0));
  } else {
    return dy;
  }
}

// Per-channel mean and M2 = sum((x - mean)^2) of x (N, C, S), written to mean[C] and m2[C].
//
// One read of x from memory, stable for |mean| >> std: each tile is summed twice while it sits in
// cache, first its mean (as a shift, the tile's first value, plus the mean of the small deviations
// from it), then the squared deviations from that mean. The tiles' (count, mean, M2) triples are
// merged in double with Chan et al.'s pairwise update, in tile order.
template <typename T>
void moments(const at::Tensor& x, const Tiling& tl, double* mean, double* m2) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  const T* xp = x.const_data_ptr<T>();
  const int64_t W = tl.width();
  std::vector<A> part(tl.tiles * 2 * W, A(0));  // per tile: W means, then W M2s
  parallel_tiles(tl, [&](int64_t t) {
    A* tile_mean = part.data() + t * 2 * W;
    A* tile_m2 = tile_mean + W;
    const int64_t first = tl.first_offset(t);
    for (int64_t j = 0; j < W; ++j) tile_mean[j] = static_cast<A>(xp[first + j]);  // the shift
    auto centered = [=](auto tag, int64_t off, const V& center) { return ld(tag, xp + off) - center; };
    tile_sums<1>(
        tl, t, tile_mean, [=](auto tag, int64_t off, const V& c) { return std::array<V, 1>{centered(tag, off, c)}; },
        tile_m2);
    const A inv_count = A(1) / A(tl.count(t));
    for (int64_t j = 0; j < W; ++j) {
      tile_mean[j] += tile_m2[j] * inv_count;
      tile_m2[j] = A(0);
    }
    tile_sums<1>(
        tl, t, tile_mean,
        [=](auto tag, int64_t off, const V& c) {
          const V d = centered(tag, off, c);
          return std::array<V, 1>{d * d};
        },
        tile_m2);
  });
  // Serial: C x tiles is small next to the data, and one parallel region less is one barrier less
  // (on a loaded machine, a barrier waits for the slowest, descheduled thread).
  for (int64_t c = 0; c < tl.L.c; ++c) {
    double n = 0, mu = 0, q = 0;
    tl.for_channel_tiles(c, [&](int64_t t, int64_t j) {
      const double nb = double(tl.count(t)), delta = double(part[t * 2 * W + j]) - mu;
      const double total = n + nb;
      mu += delta * nb / total;
      q += double(part[t * 2 * W + W + j]) + delta * delta * n * nb / total;
      n = total;
    });
    mean[c] = mu;
    m2[c] = q;
  }
}

// y = act((x - mean[c]) * scale[c] + shift[c]); y has x's layout. Subtracting the mean first keeps
// the result exact when |mean| >> std (folding it into the shift would cancel catastrophically).
template <typename T>
void normalize(const at::Tensor& x, const Tiling& tl, const acc_t<T>* mean, const acc_t<T>* scale,
               const acc_t<T>* shift, int64_t act, double slope, at::Tensor& y) {
  using V = VecA<T>;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const V vslope(static_cast<acc_t<T>>(slope));
  with_act(act, [&](auto act_c) {
    constexpr int kAct = decltype(act_c)::value;
    for_each_chunk<acc_t<T>>(tl, [=](auto tag, int64_t off, auto coef) {
      const V z = at::vec::fmadd(ld(tag, xp + off) - coef(mean), coef(scale), coef(shift));
      st(tag, yp + off, activate<kAct>(z, vslope));
    });
  });
}

// Per-channel sum(g) and sum(g * (x - mean)) with g = dy * act'(z), summed per tile in A and merged
// in double in tile order. yp is only read when an activation is fused.
template <typename T>
void grad_sums(const T* dyp, const T* xp, const T* yp, const Tiling& tl, const acc_t<T>* mean, int64_t act,
               double slope, double* sum_g, double* sum_gxc) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  const int64_t W = tl.width();
  const V vslope(static_cast<A>(slope));
  std::vector<A> part(tl.tiles * 2 * W, A(0));  // per tile: W sums of g, then W of g * (x - mean)
  with_act(act, [&](auto act_c) {
    constexpr int kAct = decltype(act_c)::value;
    parallel_tiles(tl, [&](int64_t t) {
      const A* center = tl.rows ? mean : mean + tl.plane_channel(t);
      tile_sums<2>(
          tl, t, center,
          [=](auto tag, int64_t off, const V& cen) {
            const V g = act_grad<kAct>(ld(tag, dyp + off), kAct == kNone ? V(0) : ld(tag, yp + off), vslope);
            return std::array<V, 2>{g, g * (ld(tag, xp + off) - cen)};
          },
          part.data() + t * 2 * W);
    });
  });
  for (int64_t c = 0; c < tl.L.c; ++c) {  // serial, as in moments()
    double sg = 0, sgx = 0;
    tl.for_channel_tiles(c, [&](int64_t t, int64_t j) {
      sg += double(part[t * 2 * W + j]);
      sgx += double(part[t * 2 * W + W + j]);
    });
    sum_g[c] = sg;
    sum_gxc[c] = sgx;
  }
}

// dx = g * k1[c] - (x - mean[c]) * k2[c] - k3[c], g = dy * act'(z); dx has x's layout.
template <typename T>
void grad_input(const T* dyp, const T* xp, const T* yp, const Tiling& tl, const acc_t<T>* mean,
                const acc_t<T>* k1, const acc_t<T>* k2, const acc_t<T>* k3, int64_t act, double slope, T* dxp) {
  using V = VecA<T>;
  const V vslope(static_cast<acc_t<T>>(slope));
  with_act(act, [&](auto act_c) {
    constexpr int kAct = decltype(act_c)::value;
    for_each_chunk<acc_t<T>>(tl, [=](auto tag, int64_t off, auto coef) {
      const V g = act_grad<kAct>(ld(tag, dyp + off), kAct == kNone ? V(0) : ld(tag, yp + off), vslope);
      const V centered = ld(tag, xp + off) - coef(mean);
      st(tag, dxp + off, at::vec::fmsub(g, coef(k1), at::vec::fmadd(centered, coef(k2), coef(k3))));
    });
  });
}

}  // namespace bnfused::cpu
