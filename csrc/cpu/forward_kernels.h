// The CPU training forward of BatchNorm: the statistics (moments.h), then
// y = act((x - mean) * scale + shift (+ residual)) (normalize.h), scheduled by two_pass (a channel's
// values normalised while its statistics brought them into cache) or, where it reads memory better,
// as the statistics then one pass in memory order (stats_then_normalize). The op wrappers
// (forward_train.cpp, forward_eval.cpp) supply `finish(c, Moments)`, which turns channel c's merged
// moments into its coefficients before any of its values are written.
// T is the tensor dtype; A = acc_t<T> (float or double) is the dtype of all arithmetic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "moments.h"
#include "normalize.h"

namespace bnfused::cpu {

// Longer 16-bit planes take the same schedule when x takes at least this many bytes,
constexpr int64_t kLongPlanesInOrderBytes = int64_t{8} << 20;
// and their statistics one plane per tile from this many bytes per plane.
constexpr int64_t kStatsPlaneBytes = 2048;

// The forward: statistics of x, then finish(c, Moments) for each channel (it must fill mean[c],
// scale[c], shift[c]), then y = act(z (+ residual rp, when not null)) (skipped when yp is null:
// statistics only).
template <typename T, typename Finish>
void stats_then_normalize(const T* xp, const Tiling& tl, const Finish& finish, const acc_t<T>* mean,
                          const acc_t<T>* scale, const acc_t<T>* shift, int64_t act, double slope, const T* rp, T* yp) {
  using A = acc_t<T>;
  if (yp == nullptr) {  // statistics only
    channel_stats(xp, tl, finish);
    return;
  }
  // Planes shorter than a vector, any dtype: the statistics (short_plane_stats), then the
  // normalisation walked flat (see normalize_short_planes) rather than plane by plane.
  if (short_flat_planes<T>(tl)) {
    channel_stats(xp, tl, finish);
    normalize(xp, tl, mean, scale, shift, act, slope, rp, yp);
    return;
  }
  // 16-bit values over short planes: the statistics, then the eval pass in memory order ("in order"),
  // rather than channel by channel (two_pass), whose normalize pass walks each channel's planes C * S
  // values apart. bfloat16 (128, 256, 14, 14) NCHW training forward against ATen, AVX2, three processes
  // of 15 rounds, by channel -> in order: 1 thread 1.27 / 0.92 / 1.10 -> 1.05 / 0.97 / 0.93, 2 threads
  // 1.08 / 1.22 / 1.13 -> 0.95 / 0.96 / 0.94. float32, with twice the bytes per plane, is faster by
  // channel. Longer 16-bit planes measured faster by channel on the Intel machine (AVX2 build,
  // bfloat16, 2 threads, medians of 7 alternating processes, in order -> by channel: (32, 64, 56, 56)
  // 1.22 -> 1.16 ms, (64, 128, 28, 28) 1.38 -> 1.28 ms), but in order on an AMD Zen 4 once the tensor
  // is large (op alone, two runs in each order, by channel -> in order, 1 / 2 threads, AVX512 build:
  // (32, 64, 56, 56) 2.17-2.30 -> 1.69-1.85 ms / 0.93-1.00 -> 0.76-0.80, (64, 128, 28, 28) 1.98-2.39 ->
  // 1.54-1.67 / 0.90 -> 0.73-0.77; AVX2 build 1.99-2.57 -> 1.86-2.10 / 0.87-1.30 -> 0.83-1.12 and
  // 2.04-2.70 -> 1.63 / 1.06-1.23 -> 0.76-0.86), and not in smaller ones ((16, 64, 56, 56), 6.4 MB, 2
  // threads: 0.30-0.32 -> 0.31-0.37 ms; (8, 64, 56, 56), AVX2, 0.18 -> 0.19). So longer planes go in
  // order when x takes at least kLongPlanesInOrderBytes; that includes AVX2 builds on Intel processors,
  // against the Intel figures above (20% gained on the Zen 4, 5% lost there; not re-measured on Intel).
  // On cores of half-width vector units (Zen 1) they keep two_pass (Walks::long_planes, walk_order.h).
  // Only planes grouped several to a tile take this path (planes_in_memory_order: up to kTileValues / 2
  // values); longer ones keep two_pass. Taken with sequential walks (walk_order.h): on the Intel AVX512
  // machine two_pass ran at 0.75-0.79 of ATen's time (not measured the other way); on an AMD Zen 4
  // with AVX512, (128, 256, 14, 14) bfloat16 at 1.09 / 1.29 (2 / 1 threads) with two_pass.
  // Contiguous planes of at least kStatsPlaneBytes take their statistics one plane per tile, in memory order
  // (one_plane_tiles), rather than in tiles of one channel's planes C * S values apart. bfloat16 op
  // alone, interleaved in one process, Zen 4, 1 / 2 threads, grouped -> one plane per tile:
  // (32, 64, 56, 56) 1.70-1.83 -> 1.39-1.42 ms / 0.69-0.84 -> 0.65-0.80; (128, 64, 32, 32) 3.18 -> 2.24 /
  // 2.16 -> 1.78; (64, 64, 40, 40) 2.21 -> 1.57 / 1.56 -> 1.26; (16, 64, 90, 90) 2.93 -> 2.52 / 1.34 ->
  // 1.18; float16 (32, 64, 56, 56) 1.70 -> 1.38 / 0.70 -> 0.63. Shorter planes, as time ratios, kept
  // grouped: (64, 128, 28, 28) 0.88-0.97 / 1.00-1.12, (128, 64, 28, 28) 0.92 / 1.12, (64, 128, 24, 24)
  // 1.14 / 1.24.
  if constexpr (is_16bit_float<T>()) {
    const int64_t plane_bytes = tl.L.s * int64_t(sizeof(T));
    const bool in_order = plane_bytes <= kShortPlaneBytes ||
                          (tl.long_planes_in_order && tl.L.numel() * int64_t(sizeof(T)) >= kLongPlanesInOrderBytes);
    if (tl.sequential_planes && planes_in_memory_order(tl) && in_order) {
      const bool one_plane = plane_bytes >= kStatsPlaneBytes && tl.contiguous_planes();
      channel_stats(xp, one_plane ? tl.one_plane_tiles() : tl, finish);
      normalize(xp, tl, mean, scale, shift, act, slope, rp, yp);
      return;
    }
  }
  const auto part = tile_parts<A>(tl);
  // Rows walked flat or in pairs read the coefficients arranged (arrange_channels): arranged once every
  // channel is finished, before any apply.
  NormalizeCoefs<T> coefs(tl, mean, scale, shift);
  const ChannelArrays<A, 3> arrays = coefs.arrays();
  auto reduce = [&](int64_t t) { tile_moments(xp, tl, t, part.get()); };
  RowMomentMerge rows(tl);
  auto merge = [&](int64_t c0, int64_t c1) { finish_channels(xp, tl, part.get(), rows, c0, c1, finish); };
  const int64_t ahead = apply_prefetch_ahead(tl, sizeof(T));
  with_epilogue(act, slope, rp, [&](const auto& epi) {
    two_pass(tl, sizeof(T), true, true, reduce, merge,
             [&](int64_t t) { normalize_tile(xp, yp, tl, t, arrays, epi, ahead); }, 0, [&] { coefs.arrange(); });
  });
}

}  // namespace bnfused::cpu
