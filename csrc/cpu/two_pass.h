// The schedule of the two-pass kernels (statistics then normalize; backward sums then input
// gradient): which tiles run where, and when the per-channel finish step runs between the passes.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "tiling.h"

namespace bnfused::cpu {

// Channel partials (channels x tiles) per task of two_pass's finish step, where it forks.
constexpr int64_t kMinFinishWork = 8192;

// True when two_pass over tl, with both passes and no blocks, runs channel by channel (see below).
inline bool runs_by_channel(const Tiling& tl, int64_t bytes_per_value) {
  return !tl.rows && !tl.tiles_in_memory_order && tl.L.c >= at::get_num_threads() &&
         tl.L.per_channel() * bytes_per_value <= kFuseBytes;
}

// Channel by channel, a thread's reduce pass reads each channel from memory and its apply pass
// re-reads it from cache, so memory sits idle during the apply pass: there the apply pass
// prefetches, a chunk at a time, the same places of the next channel, which the thread reduces next
// (apply_prefetch_ahead: the distance in values, 0 for none). Only for channels of up to
// kPrefetchChannelBytes, so that two fit in L2 (512 KB a core on Zen 1), and for tensors of more
// than kApplyPrefetchTensorBytes (all the tensors read), which are not likely in cache already (as
// with PlaneStreams, whose prefetches cost LeNet's float32 backward 5%). Op alone, in-process A/B,
// Zen 1, 2 threads, without -> with: bfloat16 NCHW (32, 64, 56, 56) training forward 3.05 -> 2.65 ms,
// backward 3.95 -> 3.56; float16 2.75 -> 2.39, 3.87 -> 3.62; float32 forward (32, 64, 56, 56) 2.74 ->
// 2.57, (128, 256, 14, 14) 4.85 -> 4.50, backward 6.57 -> 6.35; the float32 backward of (32, 64,
// 56, 56), 800 KB a channel, lost 3% (3.99 -> 4.11) and is left without.
constexpr int64_t kPrefetchChannelBytes = kFuseBytes / 2;
constexpr int64_t kApplyPrefetchTensorBytes = int64_t{4} << 20;
inline int64_t apply_prefetch_ahead(const Tiling& tl, int64_t bytes_per_value, int64_t block = 0) {
  const bool prefetch = block == 0 && runs_by_channel(tl, bytes_per_value) &&
                        tl.L.per_channel() * bytes_per_value <= kPrefetchChannelBytes &&
                        tl.L.numel() * bytes_per_value > kApplyPrefetchTensorBytes;
  return prefetch ? tl.L.sc : 0;
}

// Channels of at most kGroupBytes / 2 (all the tensors read) run by channel several at a time (two_pass
// with kGrouped: the backward; the training forward gained 2-4% on these shapes, in the noise):
// the reduce pass of every channel of the group, one finish over them, then their apply pass, all from
// L1. One channel at a time, each channel's apply waited on its own sums, merge and coefficients, a
// fixed cost per channel that ATen's kernels pay less of. float32 backward op alone, 1 thread, Zen 5,
// same build, alternate processes, one channel -> groups of up to 16 KB, time over ATen's: (1, 1024,
// 12, 12) 2.32-2.36 -> 1.77-1.87, (2, 256, 14, 14) 1.46-1.47 -> 1.31-1.37, (4, 64, 12, 12) 1.32-1.37 ->
// 1.24-1.32 (64 KB gave the same); channels of more than 8 KB run one at a time as before. The same
// per-channel work in the same order: the same bits.
constexpr int64_t kGroupBytes = 16 << 10;
constexpr int64_t kMaxGroupChannels = 64;
inline int64_t channels_per_group(const Tiling& tl, int64_t bytes_per_value) {
  const int64_t channel_bytes = std::max<int64_t>(1, tl.L.per_channel() * bytes_per_value);
  return std::clamp<int64_t>(kGroupBytes / channel_bytes, 1, kMaxGroupChannels);
}

// The schedule of every two-pass kernel: reduce(t) on every tile, then finish(c0, c1) on every channel
// in ranges (it merges channels c0 .. c1 - 1's tile partials, each in tile order; ranges may run
// concurrently, in any order), then before_apply() once, then apply(t) on every tile; either pass may
// be absent (null flags). (The schedules below that fuse the three per block or per channel take
// plane tilings only and call before_apply() first: the kernels that need it run over rows.)
// With `block` channels per block (plane_block_channels), where reduce and apply also take
// PlaneTiles (kernels opt in so: a callable of int64_t alone keeps the tiles), one task per block of
// channels runs reduce on the block's tiles, finish on its channels and apply on its tiles,
// re-reading the block from cache when it fits and in memory order when not. Else, for planes whose
// channels fit in L2, and with at least as many channels as threads, a thread runs all three for one
// channel at a time (with kGrouped, a few small ones at a time: channels_per_group), so apply() re-reads values that
// reduce() just brought into cache; otherwise
// (and always for tiles in memory order) each step runs over all tiles at once, apply's tiles last
// to first (parallel_tiles). Each tile's partials are the same whichever way (plane_sums): so are
// the results.
template <bool kGrouped = false, typename Reduce, typename Finish, typename Apply, typename BeforeApply = void (*)()>
void two_pass(const Tiling& tl, int64_t bytes_per_value, bool has_reduce, bool has_apply, const Reduce& reduce,
              const Finish& finish, const Apply& apply, int64_t block = 0, const BeforeApply& before_apply = [] {}) {
  if constexpr (std::is_invocable_v<const Reduce&, PlaneTiles> && std::is_invocable_v<const Apply&, PlaneTiles>) {
    if (block > 0) {
      const int64_t C = tl.L.c;
      // kMinTaskValues per task, as everywhere: a small layer's blocks run on one thread, not forked
      const int64_t grain = std::max<int64_t>(1, kMinTaskValues / (block * tl.L.per_channel()));
      const auto each_block = [&](auto&& body) {
        at::parallel_for(0, (C + block - 1) / block, grain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) body(i * block, std::min(C, (i + 1) * block));
        });
      };
      const auto over_tiles = [&](const auto& pass, int64_t c0, int64_t c1) {
        for (int64_t k = 0; k < tl.per_channel_tiles; ++k) pass(PlaneTiles{k, c0, c1});
      };
      if (has_reduce && has_apply) {
        before_apply();
        each_block([&](int64_t c0, int64_t c1) {
          over_tiles(reduce, c0, c1);
          finish(c0, c1);
          over_tiles(apply, c0, c1);
        });
        return;
      }
      if (has_reduce) each_block([&](int64_t c0, int64_t c1) { over_tiles(reduce, c0, c1); });
      finish(0, C);
      before_apply();
      if (has_apply) each_block([&](int64_t c0, int64_t c1) { over_tiles(apply, c0, c1); });
      return;
    }
  }
  if (has_reduce && has_apply && runs_by_channel(tl, bytes_per_value)) {
    before_apply();
    const int64_t grain = std::max<int64_t>(1, kMinTaskValues / tl.L.per_channel());
    if constexpr (kGrouped) {
      const int64_t group = channels_per_group(tl, bytes_per_value);
      at::parallel_for(0, tl.L.c, grain, [&](int64_t begin, int64_t end) {
        for (int64_t c0 = begin; c0 < end; c0 += group) {
          const int64_t c1 = std::min(end, c0 + group);
          for (int64_t c = c0; c < c1; ++c) tl.for_channel_tiles(c, [&](int64_t t, int64_t) { reduce(t); });
          finish(c0, c1);
          for (int64_t c = c0; c < c1; ++c) tl.for_channel_tiles(c, [&](int64_t t, int64_t) { apply(t); });
        }
      });
    } else {
      at::parallel_for(0, tl.L.c, grain, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          tl.for_channel_tiles(c, [&](int64_t t, int64_t) { reduce(t); });
          finish(c, c + 1);
          tl.for_channel_tiles(c, [&](int64_t t, int64_t) { apply(t); });
        }
      });
    }
    return;
  }
  if (has_reduce) parallel_tiles(tl, reduce);
  // Serial while the merges are small next to the data: one parallel region less is one barrier less
  // (on a loaded machine, a barrier waits for the slowest, descheduled thread). The 17 tiles x 2048
  // channels of (8, 2048, 7, 7) channels_last took 52 us on one thread to finish, a sixth of its
  // 2-thread training forward. A channel merges every tile of a rows tiling, its own of planes.
  const int64_t merged_per_channel = std::max<int64_t>(1, tl.rows ? tl.tiles : tl.per_channel_tiles);
  const int64_t grain = std::max<int64_t>(1, kMinFinishWork / merged_per_channel);
  at::parallel_for(0, tl.L.c, grain, [&](int64_t begin, int64_t end) { finish(begin, end); });
  before_apply();
  // Last to first: the values the reduce pass read last are still in cache.
  if (has_apply) parallel_tiles(tl, apply, /*last_first=*/has_reduce);
}

}  // namespace bnfused::cpu
