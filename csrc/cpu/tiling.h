// How the CPU kernels cut the (N, C, S) grid into tiles and walk a tile's values in vector chunks,
// and which planes count as short (their passes go in memory order or flat). The other kernel headers
// (channel_coefs.h, tile_chunks.h, tile_sums.h, two_pass.h, moments.h, normalize.h, backward_kernels.h)
// build on these.
//
// Two walks cover every layout without a copy:
//   planes  (spatial stride 1, e.g. NCHW): a tile holds values of one channel c: a block of one
//           (n, c) plane when planes are long, else several whole planes n0..n1 (LeNet's 8x8
//           planes would otherwise pay a tile's fixed costs every 64 values).
//   rows    (channel stride 1, e.g. channels_last, (N, C)): a tile is a block of (n, s) rows, each
//           C contiguous values; vector lanes are consecutive channels.
// Any other dense layout is walked as planes with a gather (stride `es`).
//
// Tiles are the unit of parallelism AND of reduction: each tile writes its own partial result,
// and partials are merged per channel in tile order afterwards. The result is therefore the same
// bit for bit whatever the number of threads (deterministic), and a channel with few values
// (LeNet's 6..120 channels) still spreads over all cores, since tiles also split N * S.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <utility>

#include "../layout.h"
#include "vec_chunks.h"
#include "walk_order.h"

namespace bnfused::cpu {

constexpr int64_t kTileValues = 16384;     // values per tile: its two passes stay in L1/L2
constexpr int64_t kMinTaskValues = 32768;  // fewer values than this per thread is not worth a fork
// Channels whose values (times `streams` tensors) take at most this many bytes are reduced and
// then transformed by one task while they sit in its core's L2 (two_pass); larger tensors' row sums
// keep their partials in memory (tile_sums).
constexpr int64_t kFuseBytes = 1 << 20;
// Row tiles of sequential walks (walk_order.h) hold up to this many values, where enough rows remain
// for at least kMinRowTiles tiles: their statistics pay per tile a shift from its first rows
// (row_shift), a few loops over its channels and a merge step per channel, which over the 16 rows of
// kTileValues took the float32 (32, 1024, 14, 14) channels_last training forward to 1.2-1.7x ATen's
// time (Zen 4, 2 threads; 64 rows and more: 0.8-0.95x). Blocked walks keep kTileValues: each block
// re-reads its tile, from L2 while it fits. At least 64 tiles left (8, 2048, 7, 7) 8 rows per tile,
// whose row_shift read the whole tile once more: its float32 training forward took 1.5x ATen's time
// (1 thread, op alone: 477 us against 313); at 16, 24 rows, 331 us (bfloat16 421 -> 260 us against
// ATen's 279), and (64, 512, 7, 7) 468 -> 378 us (ATen 600); 2 threads, (8, 2048, 7, 7) 292 -> 217 us
// (ATen 188-215), no shape slower.
constexpr int64_t kSequentialRowTileValues = 65536;
constexpr int64_t kMinRowTiles = 16;

// Rows of C channels that do not fill whole vectors (LeNet's 6 or 16 channels in channels_last, an
// MLP's 120 features) cost a partial vector per row when walked row by row: a masked load, and for a
// sum a masked load and store of the row's partial sums. A dense tensor whose channels are innermost
// is instead walked flat in whole vectors, with each lane's per-channel values read from arrays that
// repeat the channels' values over a period of lcm(C, VW) values, so that every vector starts at the
// same place of the pattern as its offset. The period is taken for float's vector width, a multiple
// of every vector width of the build (double's included). At most this many values per period
// (beyond it, the arrays would cost more than the partial vectors they save).
constexpr int64_t kMaxRowsPeriod = 4096;

// The training kernels (sums and elementwise passes over row tiles) walk flat only tensors of at least
// this many periods: each call and tile pays O(period) to repeat its coefficients and fold its
// period accumulators, which LeNet's (64, 84) and (64, 120) fully connected inputs (16 and 32
// periods) did not win back (about 10% slower at one thread; even at 64 periods, ahead from 128).
constexpr int64_t kFlatTilePeriods = 128;

// The values of one plane tile: channel c, planes n0..n1-1, positions s0..s0+len-1 of each.
struct PlaneSpan {
  int64_t c, n0, n1, s0, len;
};

struct Tiling {
  Ncs L;
  bool rows;       // true: rows walk; false: planes walk
  int64_t es;      // planes: element stride along S (1, or the gather stride)
  int64_t block;   // planes: positions per tile along S; rows: rows per tile
  int64_t blocks;  // planes: tiles per plane (> 1 only when planes > kTileValues)
  int64_t group;   // planes: whole planes per tile (> 1 only when planes are short)
  int64_t per_channel_tiles;  // planes
  int64_t tiles;
  // rows: the period of the flat walk over dense rows (see kMaxRowsPeriod), 0 when rows are walked
  // one by one.
  int64_t period;
  // True when the row tiles are walked flat too (see kFlatTilePeriods): tiles then hold whole
  // periods (but the last), so that each one starts at the pattern's start.
  bool flat;
  // The walks where two exist (walk_order.h): true for sequential, for row tiles and for planes.
  bool sequential_rows, sequential_planes;
  // Long 16-bit planes of large tensors in memory order (Walks::long_planes).
  bool long_planes_in_order;
  // Contiguous planes of up to this many bytes by blocks of channels (Walks::block_plane_bytes).
  int64_t block_plane_bytes;
  // planes: one whole plane per tile, the tiles numbered in memory order (tile t is plane t = n * C + c)
  // rather than channel-major (see one_plane_tiles).
  bool tiles_in_memory_order = false;

  static Tiling of(const Ncs& L) {
    const Walks walks = sequential_walks();
    Tiling t{L, false, 1, 0, 1, 1, 0, 0, 0, false, walks.rows, walks.planes, walks.long_planes,
             walks.block_plane_bytes};
    if (L.s > 1 && L.ss == 1) {
      t.rows = false;
    } else if (L.sc == 1 || L.c == 1) {
      t.rows = true;
    } else {
      t.es = L.ss;
    }
    if (t.rows) {
      constexpr int64_t VW = vec_width<float>();
      const bool dense = L.sc == 1 && (L.s == 1 || L.ss == L.c) && (L.n == 1 || L.sn == L.s * L.c);
      if (dense && L.c % VW != 0 && std::lcm(L.c, VW) <= kMaxRowsPeriod) {
        t.period = std::lcm(L.c, VW);
      }
      t.flat = t.period && L.numel() >= kFlatTilePeriods * t.period;
      t.block = std::max<int64_t>(1, kTileValues / L.c);
      if (t.sequential_rows) {
        t.block = std::max(t.block, std::min(kSequentialRowTileValues / L.c, L.n * L.s / kMinRowTiles));
      }
      if (t.flat) {  // whole periods: block * C a multiple of the period
        const int64_t q = t.period / L.c;
        t.block = (t.block + q - 1) / q * q;
      }
      t.tiles = (L.n * L.s + t.block - 1) / t.block;
    } else {
      t.blocks = (L.s + kTileValues - 1) / kTileValues;
      t.block = (L.s + t.blocks - 1) / t.blocks;
      t.group = t.blocks > 1 ? 1 : std::max<int64_t>(1, kTileValues / L.s);
      t.per_channel_tiles = t.blocks > 1 ? L.n * t.blocks : (L.n + t.group - 1) / t.group;
      t.tiles = L.c * t.per_channel_tiles;
    }
    return t;
  }

  // True for planes stored as a contiguous (N, C, S) tensor: plane n * C + c starts at (n * C + c) * S.
  bool contiguous_planes() const { return !rows && es == 1 && L.sc == L.s && L.sn == L.c * L.s; }

  // This plane tiling (of planes grouped several to a tile) with one plane per tile, numbered
  // n * C + c: for contiguous_planes, memory order, so that a pass over the tiles in order reads the
  // tensor from start to end, where the grouped tiles jump C * S values from plane to plane. (Another
  // order of the strides, such as a transposed (C, N, S), would jump instead.) The partials of a
  // channel are still merged in a fixed order (its planes'), so the results are the same for any
  // thread count; they differ from the grouped tiles' (each plane is summed on its own).
  Tiling one_plane_tiles() const {
    Tiling t = *this;
    t.group = 1;
    t.per_channel_tiles = L.n;
    t.tiles = L.n * L.c;
    t.tiles_in_memory_order = true;
    return t;
  }

  // Channels a tile holds partial sums for: all C for a row tile, one for a plane tile.
  int64_t width() const { return rows ? L.c : 1; }
  // Plane tiles are ordered channel-major, so one channel's tiles are consecutive (one_plane_tiles'
  // are numbered n * C + c instead).
  int64_t plane_channel(int64_t t) const { return tiles_in_memory_order ? t % L.c : t / per_channel_tiles; }
  // Plane tiles by channel c and place k among the channel's tiles (0 .. per_channel_tiles - 1): the
  // tile's number, and its span, whose planes and positions depend on k alone (the tiles at place k of
  // all channels cover the same n and s).
  int64_t tile_of(int64_t c, int64_t k) const { return tiles_in_memory_order ? k * L.c + c : c * per_channel_tiles + k; }
  PlaneSpan span_of(int64_t c, int64_t k) const {
    if (tiles_in_memory_order) return {c, k, k + 1, 0, L.s};
    if (blocks > 1) {
      const int64_t s0 = (k % blocks) * block;
      return {c, k / blocks, k / blocks + 1, s0, std::min(block, L.s - s0)};
    }
    return {c, k * group, std::min(L.n, (k + 1) * group), 0, L.s};
  }
  int64_t plane_place(int64_t t) const { return tiles_in_memory_order ? t / L.c : t % per_channel_tiles; }
  PlaneSpan plane_span(int64_t t) const { return span_of(plane_channel(t), plane_place(t)); }
  // Values of each channel inside tile t.
  int64_t count(int64_t t) const {
    if (rows) return std::min(block, L.n * L.s - t * block);
    const PlaneSpan p = plane_span(t);
    return (p.n1 - p.n0) * p.len;
  }
  // Offset of the first value of tile t (of its first channel, for a row tile).
  int64_t first_offset(int64_t t) const {
    if (rows) return row_offset(t * block);
    const PlaneSpan p = plane_span(t);
    return p.n0 * L.sn + p.c * L.sc + p.s0 * es;
  }
  int64_t row_offset(int64_t r) const { return (r / L.s) * L.sn + (r % L.s) * L.ss; }

  // Calls f(t, j) for every tile holding values of channel c, in a fixed order; j indexes c's
  // slot among that tile's `width()` partials.
  template <typename F>
  void for_channel_tiles(int64_t c, F&& f) const {
    if (rows) {
      for (int64_t t = 0; t < tiles; ++t) f(t, c);
    } else if (tiles_in_memory_order) {
      for (int64_t t = c; t < tiles; t += L.c) f(t, int64_t{0});
    } else {
      for (int64_t t = c * per_channel_tiles; t < (c + 1) * per_channel_tiles; ++t) f(t, int64_t{0});
    }
  }
};

// The plane tiles at place k of channels c0 .. c1 - 1 (tiles tile_of(c, k)), walked together in
// memory order (see plane_block_channels): plane (n, c0) .. (n, c1 - 1), then the same channels of
// plane n + 1. A single tile is the block of its one channel.
struct PlaneTiles {
  int64_t k, c0, c1;
};
inline PlaneTiles single_tile(const Tiling& tl, int64_t t) {
  const int64_t c = tl.plane_channel(t);
  return {tl.plane_place(t), c, c + 1};
}

// Short planes are walked by blocks of channels, in memory order, where a tile of one channel's
// planes reads a few cache lines and jumps C * S values to the next (past the hardware prefetcher's
// reach: it does not cross 4 KB pages), and pays a plane's fixed costs (its run's start and end, a
// partial vector) per few vectors: planes of under kBlockPlaneBytes (and up to kMaxBlockPlaneBytes
// where Walks::block_plane_bytes says), contiguous, grouped several to a tile, with either walk
// (walk_order.h).
// A block holds at least kBlockRunBytes of each sample (one run of memory) where it can, at most
// kMaxBlockChannels channels and kMaxBlockValues values per sample (the state of its sums, and its
// coefficients repeated per value, stay in L1), and the count of blocks aims at a multiple of the
// threads, so that each thread gets as many (at most C blocks, and rounding the channels per block up
// can leave fewer; with fewer channels than threads, the tiles are kept). The backward
// (grad_sums_then_input) against the channel tiles, op alone, two processes each, 1 / 2 threads:
//   Zen 4, float32: (32, 576, 4, 4) 217-218 -> 135-142 us / 148-152 -> 106-138 (ATen 150-160 /
//   84-150); (32, 240, 7, 7) 229-234 -> 177-187 / 119-137 -> 94-101; (32, 40, 7, 7) 44-45 -> 32-36 /
//   26-30 -> 21-24; (32, 512, 5, 5) 353-373 -> 209-216 / 171-180 -> 116; (64, 256, 3, 3) 189-225 ->
//   110-113 / 100-105 -> 66-83; bfloat16 (32, 576, 4, 4) 234-237 -> 129-130 / 129-159 -> 84-86; (32,
//   240, 7, 7) 244-251 -> 145-146 / 212-214 -> 80-94; (128, 64, 8, 8) 176-180 -> 164-178 / 118-138 ->
//   88-128. Planes of 256 bytes stay in tiles there: float32 (128, 64, 8, 8) 204-213 -> 207-240 us /
//   103-123 -> 126-131 with blocks.
//   Intel Xeon (AVX512; its blocked walk kept the tiles until measured), float32: (32, 576, 4, 4)
//   366-408 -> 177-185 us / 182 -> 106-133 (ATen 284-307 / 128-236); (64, 256, 3, 3) 210-282 ->
//   127-133 / 132-225 -> 71-114; (32, 96, 7, 7) 78-93 -> 75 / 47-67 -> 49-65 (ATen 82-96 / 45-81);
//   bfloat16 (32, 576, 4, 4) 238-252 -> 122-150 / 159-249 -> 109-156; (128, 32, 2, 2) 50-52 -> 26-29.
//   Planes of 256 bytes go by blocks there (where planes are walked blocked, walk_order.h), float32,
//   op alone, four processes each: (64, 16, 8, 8) 37-50 -> 28-43 us / 30-37 -> 26-35 (time over
//   ATen's 0.80-0.94 -> 0.68-0.73 / 0.84-0.98 -> 0.81-0.85); (32, 32, 8, 8) 37-50 -> 32-33 / 31-41 ->
//   27-37; (128, 64, 8, 8) 488-649 -> 418-548 / 235-332 -> 200-317 (ATen 442-1295); bfloat16 (64,
//   64, 8, 16) 267-522 -> 236-386 / 120-190 -> 112-196, (16, 32, 8, 16) the same within the noise.
//   Larger planes stay in tiles (blocks below 512 bytes, measured): float32 (32, 64, 10, 10), 400
//   bytes, 140-235 -> 139-197 us (0.84-1.01 -> 0.75-1.04 of ATen's), bfloat16 (32, 64, 14, 14), 392
//   bytes, 0.41-0.51 -> 0.54-0.70 of ATen's at 2 threads.
constexpr int64_t kBlockPlaneBytes = 256;
constexpr int64_t kMaxBlockPlaneBytes = 512;
constexpr int64_t kBlockRunBytes = 2048;
constexpr int64_t kMaxBlockChannels = 64;
constexpr int64_t kMaxBlockValues = 1024;  // per sample: C * S of a block

// The channels of a block for tl's passes over values of value_bytes, 0 when tl is not walked by blocks.
inline int64_t plane_block_channels(const Tiling& tl, int64_t value_bytes) {
  const int64_t plane_bytes = tl.L.s * value_bytes;
  const bool short_plane =
      plane_bytes < kBlockPlaneBytes || plane_bytes <= std::min(tl.block_plane_bytes, kMaxBlockPlaneBytes);
  if (!tl.contiguous_planes() || tl.tiles_in_memory_order || tl.group == 1 || !short_plane) {
    return 0;
  }
  const int64_t C = tl.L.c, threads = at::get_num_threads();
  if (C < threads) return 0;  // a block per channel would leave threads idle; the tiles split planes too
  const int64_t most = std::min(kMaxBlockChannels, kMaxBlockValues / tl.L.s);
  const int64_t least = std::min(most, (kBlockRunBytes + plane_bytes - 1) / plane_bytes);
  const int64_t by_run = (C + least - 1) / least;
  const int64_t blocks = std::min(C, (by_run + threads - 1) / threads * threads);
  return (C + blocks - 1) / blocks;
}

// Runs body(t) for every tile, in parallel. Tiles write disjoint outputs. With last_first, each
// thread runs its range of tiles backwards in runs of about kLastFirstRunValues values, each run's
// tiles first to last: at::parallel_for splits the range the same way on every call, so a pass that
// follows another over the same tiles (two_pass's apply after its reduce) starts on the values that
// one read last, still in cache, and reads each run in memory order as prefetchers expect. Measured
// against first to last (op alone, interleaved in one process, Zen 1, 2 threads): float32
// channels_last (32, 64, 56, 56) / (128, 256, 14, 14) training forward 0.89 / 0.87 of the time,
// backward 0.93 / 0.90; one tile a run instead lost 8-30% on the backward of bfloat16 planes of one
// tile each ((64, 128, 28, 28) with sequential walks: 1.30x).
constexpr int64_t kLastFirstRunValues = 65536;
template <typename F>
void parallel_tiles(const Tiling& tl, F&& body, bool last_first = false) {
  const int64_t mean_tile_values = std::max<int64_t>(1, tl.L.numel() / tl.tiles);
  const int64_t grain = std::max<int64_t>(1, kMinTaskValues / mean_tile_values);
  const int64_t run = std::max<int64_t>(1, kLastFirstRunValues / mean_tile_values);
  at::parallel_for(0, tl.tiles, grain, [&](int64_t begin, int64_t end) {
    if (!last_first) {
      for (int64_t t = begin; t < end; ++t) body(t);
      return;
    }
    for (int64_t first = begin + (end - 1 - begin) / run * run; first >= begin; first -= run) {
      for (int64_t t = first; t < std::min(end, first + run); ++t) body(t);
    }
  });
}

// Plane tile t in chunks: f(tag, offset of the chunk's first element). With `aligned`, each run
// starts with a partial chunk up to the next multiple of VW elements, so that the full chunks after
// it sit on whole vectors of a 64-byte-aligned tensor (and can be streamed, see st_out); only
// elementwise passes may ask for it, since it changes how a sum would be grouped. With kPairs
// (elementwise passes over 16-bit values, see has_pairs), whole pairs of vectors come as Pair
// chunks before the last Full and Part chunks.
template <typename A, bool kPairs = false, typename F>
inline void walk_run(int64_t off, int64_t len, int64_t es, F&& f, bool aligned) {
  constexpr int64_t VW = vec_width<A>();
  if (es == 1) {
    int64_t i = aligned ? std::min(len, (VW - off % VW) % VW) : 0;
    if (i > 0) f(Part{i}, off);
    if constexpr (kPairs) {
      for (; i + 2 * VW <= len; i += 2 * VW) f(Pair{}, off + i);
    }
    for (; i + VW <= len; i += VW) f(Full{}, off + i);
    if (i < len) f(Part{len - i}, off + i);
  } else {
    for (int64_t i = 0; i < len; i += VW) f(Gather{std::min(VW, len - i), es}, off + i * es);
  }
}

// 16-bit planes of at most this many bytes (8 cache lines) are short for the schedules that walk
// longer ones in memory order (stats_then_normalize, grad_tiling).
constexpr int64_t kShortPlaneBytes = 512;

// Elementwise passes over short planes go plane by plane in memory order, (n, c) after (n, c),
// rather than by tiles: a tile groups one channel's planes n0..n1, which lie C * S values apart, so
// its runs are a few cache lines each between jumps that the hardware prefetcher cannot follow
// (eval on (128, 256, 14, 14) walked that way ran at about 2/3 of ATen's speed). Reductions keep the
// tiles, whose partial sums must be grouped the same way for any thread count (one_plane_tiles puts
// them in memory order, one plane each).
inline bool planes_in_memory_order(const Tiling& tl) { return !tl.rows && tl.group > 1; }

// Contiguous planes shorter than a vector (2x2, 3x3 feature maps) are walked flat too, with each
// channel's coefficients repeated over its plane for one sample, and the samples' pattern over a
// period of whole vectors (the least common multiple of a sample's values and VW): a plane-by-plane
// walk pays a partial vector, and fresh coefficient registers, for every few values. The training
// forward takes its statistics first, then this walk. float32, op alone, 1 thread, alternated
// processes, time over ATen's, by planes -> flat: eval (16, 256, 2, 2) 1.44-1.52 -> 0.52-0.60, (16,
// 96, 3, 3) 1.01-1.10 -> 0.65-0.71, (4, 96, 2, 2) 1.06-1.08 -> 0.94-0.99; training forward (16, 256,
// 2, 2) 1.45-1.51 -> 0.99, (16, 96, 3, 3) 0.88-1.06 -> 0.68-0.70, (4, 96, 2, 2) 1.93-1.97 -> 1.51-1.65
// (the statistics' cost per channel, since taken over positions: see short_plane_stats).
// The period holds at most this many values per array (the three arrays stay in L2).
constexpr int64_t kMaxShortPlanesPeriod = 8192;

template <typename T>
inline int64_t short_planes_period(const Tiling& tl) {
  constexpr int64_t VW = vec_width<acc_t<T>>();
  const int64_t sample = tl.L.c * tl.L.s;
  return sample / std::gcd(sample, VW) * VW;
}

// True for contiguous planes shorter than a vector, grouped several to a tile (planes_in_memory_order),
// whose pattern over the period fits kMaxShortPlanesPeriod: their statistics are taken over positions
// (short_plane_stats) and their normalisation walked flat (normalize_short_planes).
template <typename T>
inline bool short_flat_planes(const Tiling& tl) {
  return planes_in_memory_order(tl) && tl.contiguous_planes() && tl.L.s < vec_width<acc_t<T>>() &&
         short_planes_period<T>(tl) <= kMaxShortPlanesPeriod;
}

// Runs body(p0, p1) over ranges of planes p = n * C + c, in parallel; a plane starts at plane_offset(p).
template <typename F>
void parallel_planes(const Tiling& tl, F&& body) {
  const int64_t grain = std::max<int64_t>(1, kMinTaskValues / std::max<int64_t>(1, tl.L.s));
  at::parallel_for(0, tl.L.n * tl.L.c, grain, body);
}

inline int64_t plane_offset(const Tiling& tl, int64_t p) { return (p / tl.L.c) * tl.L.sn + (p % tl.L.c) * tl.L.sc; }

// Calls f(offset) for each of channel c's N * S values: the scalar walk of the exact (rare) paths.
template <typename F>
void for_channel_values(const Tiling& tl, int64_t c, F&& f) {
  const Ncs& L = tl.L;
  for (int64_t n = 0; n < L.n; ++n) {
    for (int64_t s = 0; s < L.s; ++s) f(n * L.sn + c * L.sc + s * L.ss);
  }
}

// The offsets of rows r0, r0 + 1, ... in turn (row r = n * S + s), stepped without a division per row.
class RowOffsets {
 public:
  RowOffsets(const Ncs& L, int64_t r0) : S_(L.s), sn_(L.sn), ss_(L.ss), n_(r0 / L.s), s_(r0 % L.s) {}
  int64_t operator()() {
    const int64_t off = n_ * sn_ + s_ * ss_;
    if (++s_ == S_) {
      s_ = 0;
      ++n_;
    }
    return off;
  }

 private:
  int64_t S_, sn_, ss_;  // copies, not a reference: kept in registers across the kernels' stores
  int64_t n_, s_;
};

// Rows r0 .. r0 + rows - 1 in chunks: f(tag, offset of the chunk's first element, place of its first
// lane), the place indexing the per-channel arrays. Row by row, each row is a run of C values whose
// places are its channels; walked flat (tl.flat), the rows are one run of whole vectors whose places
// go round the period from r0, the start of one (only the tensor's last tile can end in a partial
// chunk). One walk for both, so that the chunk bodies are compiled once for either. With kPairs (see
// rows_in_pairs), each row is walked in Pair chunks only. (The sums and most elementwise passes walk
// rows that are not flat two at a time: see rows_head_in_registers, tile_sums.h, and tile_chunks,
// tile_chunks.h.)
template <typename A, bool kPairs = false, typename F>
inline void walk_rows(const Tiling& tl, int64_t r0, int64_t rows, F&& f) {
  constexpr int64_t VW = vec_width<A>();
  const int64_t C = tl.L.c;
  const int64_t runs = tl.flat ? 1 : rows, len = tl.flat ? rows * C : C, wrap = tl.flat ? tl.period : C;
  RowOffsets next_row(tl.L, r0);
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t off = next_row();
    if constexpr (kPairs) {
      for (int64_t i = 0; i < len; i += 2 * VW) f(Pair{}, off + i, i);
    } else {
      int64_t i = 0, j = 0;
      for (; i + VW <= len; i += VW) {
        f(Full{}, off + i, j);
        j = j + VW == wrap ? 0 : j + VW;
      }
      if (i < len) f(Part{len - i}, off + i, j);
    }
  }
}

// Row tile t in chunks, as above.
template <typename A, bool kPairs = false, typename F>
inline void walk_rows(const Tiling& tl, int64_t t, F&& f) {
  walk_rows<A, kPairs>(tl, t * tl.block, tl.count(t), std::forward<F>(f));
}

}  // namespace bnfused::cpu
