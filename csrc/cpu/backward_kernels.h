// The CPU backward kernel of BatchNorm, written once per tile (tiling.h, tile_chunks.h, tile_sums.h) and
// scheduled by two_pass: per-channel sum(g) and sum(g * (x - mean)) with g = dy * act'(z), then
// dx = g * k1 - x_hat * k2 - k3, x_hat = (x - mean) * invstd. The op wrapper (backward.cpp) supplies
// k1 and the arrays (GradCoefs) the pass fills with each channel's sums, k2 and k3 before any of its
// values are written.
// T is the tensor dtype; A = acc_t<T> (float or double) is the dtype of all arithmetic.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "elementwise.h"
#include "tile_sums.h"
#include "two_pass.h"

namespace bnfused::cpu {

// The tensors of one backward pass, all with x's layout; null when absent or not wanted.
template <typename T>
struct GradTensors {
  const T* dy;
  const T* x;
  const T* y;         // the forward output: read for relu, leaky_relu, relu6 (grad_from_output)
  const T* residual;  // the forward's residual: read to recompute z for hardswish, silu (grad_from_input)
  T* dx;
  T* dresidual;       // gets g itself
};

// 16-bit planes longer than kShortPlaneBytes but grouped several to a tile, in tensors x of at least
// this many bytes, are walked one plane per tile in memory order by the backward (grad_tiling).
constexpr int64_t kGradPlanesInOrderBytes = int64_t{4} << 20;

// The tiling the backward walks: with sequential walks (walk_order.h), 16-bit contiguous planes of 257
// to kTileValues / 2 values in an x of kGradPlanesInOrderBytes or more take one_plane_tiles, which read
// x and dy from start to end in both passes; the grouped tiles run each channel's two passes while
// its values sit in L2 (two_pass), reading them from memory once, but C * S values apart. bfloat16,
// op alone, interleaved in one process, Zen 4, grouped -> one plane per tile, 1 / 2 threads:
// (32, 64, 56, 56) 2.73-3.86 -> 1.78-2.13 ms / 1.17-1.62 -> 0.78-0.95; (64, 128, 28, 28) 3.09-3.43 ->
// 2.20-2.66 / 1.71-1.82 -> 1.11-1.44; (16, 64, 56, 56) 0.98-1.37 -> 0.74-0.83 / 0.57-0.61 -> 0.42-0.44;
// (64, 128, 24, 24) 2.47 -> 1.66 / 1.00 -> 0.83; (128, 128, 20, 20) 3.62 -> 2.87 / 1.60 -> 1.38;
// float16 (32, 64, 56, 56) 3.05 -> 1.87 / 1.68 -> 1.03. Not taken, as time ratios: smaller tensors
// ((12, 64, 56, 56), 4.8 MB: 1.00 / 0.83; (8, 64, 56, 56) 1.01 / 1.07), short planes ((128, 256, 14,
// 14) 1.07 / 1.20; (32, 256, 14, 14) 1.76 / 1.67), float32 (twice the bytes per plane: (32, 64, 56, 56)
// 0.99 / 0.93-1.03, (64, 128, 28, 28) 1.13 / 1.62), and planes of over kTileValues / 2 values, one per
// tile already but channel-major ((16, 64, 112, 112) bfloat16 in memory order: 0.95 / 0.99).
template <typename T>
Tiling grad_tiling(const Tiling& tl) {
  const int64_t plane_bytes = tl.L.s * int64_t(sizeof(T));
  const bool in_order = is_16bit_float<T>() && tl.long_planes_in_order && tl.contiguous_planes() && tl.group > 1 &&
                        plane_bytes > kShortPlaneBytes && tl.L.numel() * int64_t(sizeof(T)) >= kGradPlanesInOrderBytes;
  return in_order ? tl.one_plane_tiles() : tl;
}

// Per-channel arrays (C each) of one backward pass, owned by the op wrapper.
template <typename A>
struct GradCoefs {
  double* sum_g;      // sum(g): filled by the pass when it reduces, else given
  double* sum_gxhat;  // sum(g * x_hat): the same
  const A* k1;        // weight * invstd, given
  A* k2;              // k1 * sum_gxhat / M: filled by the pass when centered
  A* k3;              // k1 * sum_g / M: the same
  double per_count;   // 1 / M
};

// sqrt(M), the largest |x_hat| (exact_channel)
template <typename A>
A root_count_of(const GradCoefs<A>& cf) {
  return static_cast<A>(std::sqrt(1.0 / cf.per_count));
}

// dx = g * k1 - x_hat * k2 - k3 is computed as g * k1 - (x - mean) * k2x - k3, with k2x = k2 * invstd
// formed once per channel in double: one multiply per value fewer than forming x_hat first (op alone,
// in-process A/B, Zen 1, 2 threads: bfloat16 channels_last backward 0.90-0.95 of the time, NCHW
// 0.96-0.98; float32 0.94-1.01; float16 NCHW 0.99-1.00). Where k2x is no normal number of A, or is 0 with
// neither k2 nor invstd 0 (a tiny variance with a tiny eps makes invstd^2 overflow float; a variance
// beyond float's range makes it underflow), or is not finite (inf or NaN in k2 or invstd), the
// channel is `exact`: its vector pass runs with k2x = 0, and its dx is then rewritten in double.
template <typename A>
A k2_times_invstd(A k2, A invstd) {
  return static_cast<A>(double(k2) * double(invstd));
}
// 1 where the channel is exact, else 0: an int from bitwise operations, not a bool from branches nor
// a struct, so that a loop over channels vectorises (GCC 12 left the others scalar). Also exact: a
// channel whose x_hat * k2 + k3 may come near A's largest values (a dy near them), where the terms of A
// overflow (inf - inf = NaN, or an inf where dx is finite: the terms cancel); as |x_hat| <= sqrt(M) (the
// biased variance's definition), |x_hat * k2 + k3| <= root_count * |k2| + |k3|, flagged from A's
// largest / 256 (`kTermHeadroom`) up, which also leaves g * k1 room where such terms cancel it. Its dx
// is rewritten as k1 * (g - x_hat * sum_gxhat / M - sum_g / M), which stays finite where the result is.
constexpr int kTermHeadroom = 256;
template <typename A>
int exact_channel(A k2, A k3, A invstd, A root_count) {
  const A mag = std::abs(k2_times_invstd(k2, invstd));
  constexpr A kMax = std::numeric_limits<A>::max();
  const A terms = root_count * std::abs(k2) + std::abs(k3);
  // not finite (NaN fails every comparison), or under A's normal range from two factors not 0
  return int(!(mag <= kMax)) | int(!(terms <= kMax / kTermHeadroom)) |
         (int(mag < std::numeric_limits<A>::min()) & int(k2 != A(0)) & int(invstd != A(0)));
}

// The backward: per-channel sum(g) and sum(g * x_hat) with g = dy * act'(z) and x_hat =
// (x - mean) * invstd, summed per tile in A (as sum(g * (x - mean)), times invstd once merged in
// double, in tile order; recomputed in double from x_hat when a tile sum overflowed) into
// cf.sum_g and cf.sum_gxhat, then (training, `centered`) k2 and k3 from them; then
//   training: dx = g * k1 - x_hat * k2 - k3, as g * k1 - (x - mean) * k2x - k3 (see k2_times_invstd),
//   eval:     dx = g * k1 (x is not read unless z is: an inf or NaN in x, or in the running mean,
//             changes nothing, as in torch),
// skipped when io.dx is null, and dresidual = g when io.dresidual is not null. With reduce == false
// only those are computed, from the given sums. For hardswish and silu, z = (x - mean) * k1 + shift
// (+ residual) is recomputed exactly as the forward computed it (k1 = weight * invstd is its scale),
// in both passes.
template <typename T>
void grad_sums_then_input(const GradTensors<T>& io, const Tiling& tiling, const acc_t<T>* mean, const acc_t<T>* invstd,
                          const acc_t<T>* shift, bool reduce, const GradCoefs<acc_t<T>>& cf, bool centered,
                          int64_t act, double slope) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  const Tiling tl = grad_tiling<T>(tiling);
  const int64_t W = tl.width();
  const V vslope(static_cast<A>(slope));
  std::vector<A> part(reduce ? tl.tiles * 2 * W : 0, A(0));  // per tile: W sums of g, W of g * (x - mean)
  auto tile_part = [&](int64_t t) { return part.data() + t * 2 * W; };
  const T *dyp = io.dy, *xp = io.x, *yp = io.y, *rp = io.residual;
  T *dxp = io.dx, *drp = io.dresidual;
  // Rows walked flat read every per-channel array repeated over the period, and the elementwise pass
  // over rows in pairs reads them in pair order (arrange_channels): those known now are arranged
  // here, k2 and k3 once every channel is finished when the sums give them (two_pass's before_apply).
  // The sums read the arrays as given unless the rows are walked flat; the exact paths of merge read
  // the (C,) arrays.
  const int64_t C = tl.L.c, P = arranged_size<T>(tl);
  const std::unique_ptr<A[]> arranged(P ? new A[5 * P] : nullptr);  // not zeroed: each array written whole
  auto arrange = [&](int64_t i, const A* arr) -> const A* {
    if (!P || !arr) return arr;
    arrange_channels<T>(tl, arr, arranged.get() + i * P);
    return arranged.get() + i * P;
  };
  const A *k1 = cf.k1, *k2 = cf.k2, *k3 = cf.k3;
  // k2x per channel (k2_times_invstd), filled as each channel's k2 is known (not zeroed first: for
  // tens of thousands of channels that alone took microseconds).
  const std::unique_ptr<A[]> k2x(centered ? new A[C] : nullptr);
  std::atomic<bool> any_exact{false};  // set (rarely) from the threads that finish channels
  // k2, k3 and k2x of channels c0..c1 - 1 from their sums: loops over local pointers, without calls,
  // that vectorise (a loop per channel through captured references re-read them after each store);
  // k2x a loop apart, as reading each k2 just after it was stored stalled every channel.
  auto coefficients = [&](int64_t c0, int64_t c1) {
    if (!centered) return;
    const double *sg = cf.sum_g, *sgx = cf.sum_gxhat;
    const double per_count = cf.per_count;
    A *k2_out = cf.k2, *k3_out = cf.k3, *k2x_out = k2x.get();
    const A root_count = root_count_of(cf);
    for (int64_t c = c0; c < c1; ++c) {
      k2_out[c] = static_cast<A>(double(k1[c]) * sgx[c] * per_count);
      k3_out[c] = static_cast<A>(double(k1[c]) * sg[c] * per_count);
    }
    unsigned any = 0;  // an integer, not a bool: GCC vectorises the OR of those
    for (int64_t c = c0; c < c1; ++c) {
      const int exact = exact_channel(k2_out[c], k3_out[c], invstd[c], root_count);
      k2x_out[c] = exact ? A(0) : k2_times_invstd(k2_out[c], invstd[c]);
      any |= unsigned(exact);
    }
    if (any) any_exact.store(true, std::memory_order_relaxed);
  };
  const ChannelArrays<A, 5> given{mean, k1, shift, k2x.get(), k3};
  const A* later_k2x = P ? arranged.get() + kK2x * P : k2x.get();  // arranged by arrange_k2_k3
  const A* later_k3 = P ? arranged.get() + kK3 * P : k3;
  const ChannelArrays<A, 5> arrays{arrange(kMean, mean), arrange(kK1, k1), arrange(kShift, shift), later_k2x,
                                   later_k3};
  const ChannelArrays<A, 5>& sum_arrays = tl.flat ? arrays : given;
  auto arrange_k2_k3 = [&] {
    arrange(kK2x, k2x.get());
    arrange(kK3, k3);
  };
  if (!reduce) {
    coefficients(0, C);
    arrange_k2_k3();
  }
  const int64_t streams = 2 + (grad_from_output(act) ? 1 : 0) + (grad_from_input(act) && rp ? 1 : 0) +
                          (drp ? 1 : 0);
  // The tensors the sums read, prefetched ahead over short planes (PlaneStreams).
  const PlaneStreams sum_streams =
      PlaneStreams::of(dyp, xp, grad_from_output(act) ? yp : nullptr, grad_from_input(act) ? rp : nullptr);
  auto body = [&](auto act_c) {
    constexpr int kAct = decltype(act_c)::value;
    // g for a chunk, or for one register of a pair (tag PairLo, PairHi); coef(kIndex) gives one of
    // `arrays`' values for the chunk's lanes. inline_c: act_grad_inline (the input gradient) or
    // act_grad (the sums).
    auto grad = [=](auto tag, int64_t off, auto chunk_coef, auto inline_c) {
      constexpr bool kInline = decltype(inline_c)::value;
      const auto& coef = chunk_coef.at(tag);
      const V dy = ld(tag, dyp + off);
      if constexpr (kAct == kAnyAct) {  // float64: the same operations, chosen at run time
        if (grad_from_input(act)) {
          V z = at::vec::fmadd(ld(tag, xp + off) - coef(kMean), coef(kK1), coef(kShift));
          if (rp) z = z + ld(tag, rp + off);
          return act_grad_any(act, dy, z, vslope);
        } else if (grad_from_output(act)) {
          return act_grad_any(act, dy, ld(tag, yp + off), vslope);
        } else {
          return dy;
        }
      } else if constexpr (grad_from_input(kAct)) {
        V z = at::vec::fmadd(ld(tag, xp + off) - coef(kMean), coef(kK1), coef(kShift));
        if (rp) z = z + ld(tag, rp + off);
        return kInline ? act_grad_inline<kAct>(dy, z, vslope) : act_grad<kAct>(dy, z, vslope);
      } else if constexpr (grad_from_output(kAct)) {
        const V y = ld(tag, yp + off);
        return kInline ? act_grad_inline<kAct>(dy, y, vslope) : act_grad<kAct>(dy, y, vslope);
      } else {
        return dy;
      }
    };
    const auto sum_contrib = [=](auto tag, int64_t off, const V& cen, auto coef) {
      const V g = grad(tag, off, coef, std::false_type{});
      // A braced list, not contributions(): with it GCC 12 kept the row sums' register part
      // here in fewer registers, spilling six accumulators per row (channels_last (128, 256,
      // 14, 14) float32 backward sums, 1 thread: 2.1-2.4 ms against 1.7-2.0).
      return std::array<V, 2>{g, g * (ld(tag, xp + off) - cen)};
    };
    auto sums = [&](auto tiles) {  // a tile t, or a block's PlaneTiles (two_pass)
      if constexpr (std::is_same_v<decltype(tiles), PlaneTiles>) {
        plane_sums<2, has_pairs<T>()>(
            tl, tiles, [=](int64_t c) { return mean[c]; }, sum_arrays, sum_contrib,
            [&](int64_t c) { return tile_part(tl.tile_of(c, tiles.k)); });
      } else {
        const int64_t t = tiles;
        const A* center = tl.rows ? sum_arrays[kMean] : mean + tl.plane_channel(t);
        tile_sums<2, has_pairs<T>()>(tl, t, center, sum_arrays, sum_contrib, tile_part(t), sum_streams);
      }
    };
    // A rows tiling sums each range of channels tiles outermost (as RowMomentMerge, and for the same
    // reason: each channel's sum is a chain of dependent adds, one per tile), in the same order, into
    // cf.sum_g and cf.sum_gxhat (the latter times invstd after).
    auto merge_rows = [&](int64_t c0, int64_t c1) {
      for (int64_t half = 0; half < 2 * W; half += W) {
        double* sums = half ? cf.sum_gxhat : cf.sum_g;
        std::fill(sums + c0, sums + c1, 0.0);
        for (int64_t t = 0; t < tl.tiles; ++t) {
          const A* tile = tile_part(t) + half;
          for (int64_t j = c0; j < c1; ++j) sums[j] += double(tile[j]);
        }
      }
    };
    // g at offset off of channel c in double: the exact paths' (exact_sums, and the exact channels' dx).
    auto exact_grad = [&](int64_t c, int64_t off) {
      double y_or_z = 0;
      const int64_t act_v = kAct == kAnyAct ? act : kAct;
      if (grad_from_input(act_v)) {
        y_or_z = (double(xp[off]) - double(mean[c])) * double(k1[c]) + double(shift[c]) + (rp ? double(rp[off]) : 0.0);
      } else if (grad_from_output(act_v)) {
        y_or_z = double(yp[off]);
      }
      return act_grad_value(act_v, double(dyp[off]), y_or_z, slope);
    };
    // sum(g) and sum(g * x_hat) of channels c0..c1 - 1 into cf.sum_g and cf.sum_gxhat, their tiles'
    // partials merged in tile order.
    auto channel_sums = [&](int64_t c0, int64_t c1) {
      double *sg = cf.sum_g, *sgx = cf.sum_gxhat;
      if (tl.rows) {
        merge_rows(c0, c1);
        for (int64_t c = c0; c < c1; ++c) sgx[c] *= double(invstd[c]);
        return;
      }
      for (int64_t c = c0; c < c1; ++c) {
        double sum = 0, sum_x = 0;
        tl.for_channel_tiles(c, [&](int64_t t, int64_t j) {
          sum += double(tile_part(t)[j]);
          sum_x += double(tile_part(t)[W + j]);
        });
        sg[c] = sum;
        sgx[c] = sum_x * double(invstd[c]);
      }
    };
    // The sums again in double from the values, where a tile sum overflowed in A (or dy or x holds an
    // inf or NaN).
    auto exact_sums = [&](int64_t c) {
      double sg = 0, sgx = 0;
      const double m = double(mean[c]), is = double(invstd[c]);
      for_channel_values(tl, c, [&](int64_t off) {
        const double g = exact_grad(c, off);
        sg += g;
        sgx += g * ((double(xp[off]) - m) * is);
      });
      return std::array<double, 2>{sg, sgx};
    };
    // Channels c0..c1 - 1 finished: their sums from the tile sums, those that are not finite again
    // by exact_sums (the rare path, in a loop apart, so that the common loops make no calls), then
    // their coefficients.
    auto merge = [&](int64_t c0, int64_t c1) {
      if (!reduce) return;
      channel_sums(c0, c1);
      double *sg = cf.sum_g, *sgx = cf.sum_gxhat;
      // The exponent bits a sum lacks: none (0) when it is an inf or a NaN. Their minimum over the
      // channels, an integer reduction that vectorises (a bool one did not).
      const auto missing_exponent = [](double v) {
        constexpr uint64_t kExponent = uint64_t{0x7FF} << 52;
        uint64_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        return ~bits & kExponent;
      };
      uint64_t least = ~uint64_t{0};
      for (int64_t c = c0; c < c1; ++c) {
        least = std::min(least, std::min(missing_exponent(sg[c]), missing_exponent(sgx[c])));
      }
      for (int64_t c = c0; c < c1 && least == 0; ++c) {
        if (missing_exponent(sg[c]) != 0 && missing_exponent(sgx[c]) != 0) continue;
        const std::array<double, 2> e = exact_sums(c);
        sg[c] = e[0];
        sgx[c] = e[1];
      }
      coefficients(c0, c1);
    };
    const bool stream = tile_streams_output<T>(tl);
    // The next channel's values, prefetched while this one's are written from cache (two_pass's
    // schedule by channel).
    const int64_t ahead =
        reduce ? apply_prefetch_ahead(tl, streams * int64_t(sizeof(T)), plane_block_channels(tl, sizeof(T))) : 0;
    auto input_grad = [&](auto t) {  // a tile, or a block's PlaneTiles (two_pass)
      auto write = [&](auto centered_c) {
        // 16-bit silu and sigmoid: an exponential per value of a pair (see tile_chunks)
        constexpr bool kTwoRows = !has_pairs<T>() || (kAct != kSilu && kAct != kSigmoid);
        tile_chunks<A, has_pairs<T>(), kTwoRows>(tl, t, arrays, [=](auto tag, int64_t off, auto coef) {
          auto dx = [&](auto part, const V& g) {  // part: the chunk's tag, or one register of a pair
            const auto& cf = coef.at(part);
            if constexpr (decltype(centered_c)::value) {
              const V x_c = ld(part, xp + off) - cf(kMean);
              return at::vec::fmsub(g, cf(kK1), at::vec::fmadd(x_c, cf(kK2x), cf(kK3)));
            } else {
              return V(g * cf(kK1));
            }
          };
          if (ahead) sum_streams.prefetch_value_at(off + ahead);  // the tensors the next channel's sums read
          if constexpr (std::is_same_v<decltype(tag), Pair>) {
            const V g_lo = grad(PairLo{}, off, coef, std::true_type{});
            const V g_hi = grad(PairHi{}, off, coef, std::true_type{});
            if (drp) st_pair(drp + off, g_lo, g_hi, stream);
            if (dxp) st_pair(dxp + off, dx(PairLo{}, g_lo), dx(PairHi{}, g_hi), stream);
          } else {
            const V g = grad(tag, off, coef, std::true_type{});
            if (drp) st_out(tag, drp + off, g, stream);
            if (dxp) st_out(tag, dxp + off, dx(tag, g), stream);
          }
        }, stream, rows_in_pairs<T>(tl));
      };
      centered ? write(std::true_type{}) : write(std::false_type{});
      stream_fence(stream);
    };
    two_pass</*kGrouped=*/true>(tl, streams * int64_t(sizeof(T)), reduce, dxp != nullptr || drp != nullptr, sums,
                                merge, input_grad, plane_block_channels(tl, sizeof(T)), [&] {
                                  if (reduce) arrange_k2_k3();
                                });
    // The exact channels' dx in double (see exact_channel): x_hat first, as no k2x holds.
    if (dxp && any_exact.load(std::memory_order_relaxed)) {
      const A root_count = root_count_of(cf);
      for (int64_t c = 0; c < C; ++c) {
        if (!exact_channel(k2[c], k3[c], invstd[c], root_count)) continue;
        const double m = double(mean[c]), is = double(invstd[c]), k1_c = double(k1[c]);
        const double mean_g = cf.sum_g[c] * cf.per_count, mean_gxhat = cf.sum_gxhat[c] * cf.per_count;
        for_channel_values(tl, c, [&](int64_t off) {
          const double x_hat = (double(xp[off]) - m) * is;
          const double dx = k1_c * (exact_grad(c, off) - x_hat * mean_gxhat - mean_g);
          dxp[off] = static_cast<T>(static_cast<A>(dx));
        });
      }
    }
  };
  if constexpr (runtime_epilogue<T>()) {
    if (act == kNone) {
      body(std::integral_constant<int, kNone>{});
    } else {
      body(std::integral_constant<int, kAnyAct>{});
    }
  } else {
    with_act(act, body);
  }
}

}  // namespace bnfused::cpu
