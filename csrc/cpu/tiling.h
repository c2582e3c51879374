// How the CPU kernels cut the (N, C, S) grid into tiles, walk a tile in vector chunks, and sum.
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
#include <array>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "../layout.h"
#include "vec_chunks.h"
#include "walk_order.h"

namespace bnfused::cpu {

constexpr int64_t kTileValues = 16384;     // values per tile: its two passes stay in L1/L2
constexpr int64_t kMinTaskValues = 32768;  // fewer values than this per thread is not worth a fork
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
  // planes: one whole plane per tile, the tiles numbered in memory order (tile t is plane t = n * C + c)
  // rather than channel-major (see one_plane_tiles).
  bool tiles_in_memory_order = false;

  static Tiling of(const Ncs& L) {
    const Walks walks = sequential_walks();
    Tiling t{L, false, 1, 0, 1, 1, 0, 0, 0, false, walks.rows, walks.planes};
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
// partial vector) per few vectors: planes of under kBlockPlaneBytes (and of kBlockPlaneBytes where
// planes are walked blocked), contiguous, grouped several to a tile, with either walk (walk_order.h).
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
constexpr int64_t kBlockRunBytes = 2048;
constexpr int64_t kMaxBlockChannels = 64;
constexpr int64_t kMaxBlockValues = 1024;  // per sample: C * S of a block

// The channels of a block for tl's passes over values of value_bytes, 0 when tl is not walked by blocks.
inline int64_t plane_block_channels(const Tiling& tl, int64_t value_bytes) {
  const int64_t plane_bytes = tl.L.s * value_bytes;
  const bool short_plane =
      plane_bytes < kBlockPlaneBytes || (plane_bytes == kBlockPlaneBytes && !tl.sequential_planes);
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

// Runs body(t) for every tile, in parallel. Tiles write disjoint outputs.
template <typename F>
void parallel_tiles(const Tiling& tl, F&& body) {
  const int64_t mean_tile_values = std::max<int64_t>(1, tl.L.numel() / tl.tiles);
  const int64_t grain = std::max<int64_t>(1, kMinTaskValues / mean_tile_values);
  at::parallel_for(0, tl.tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) body(t);
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

// Row tile t in chunks: f(tag, offset of the chunk's first element, place of its first lane), the
// place indexing the per-channel arrays. Row by row, each row is a run of C values whose places are
// its channels; walked flat (tl.flat), the tile is one run of whole vectors whose places go round
// the period (only the tensor's last tile can end in a partial chunk). One walk for both, so that
// the chunk bodies are compiled once for either. With kPairs (see rows_in_pairs), each row is walked
// in Pair chunks only. (The sums and most elementwise passes walk rows that are not flat two at a
// time: see rows_head_in_registers and tile_chunks.)
template <typename A, bool kPairs = false, typename F>
inline void walk_rows(const Tiling& tl, int64_t t, F&& f) {
  constexpr int64_t VW = vec_width<A>();
  const int64_t C = tl.L.c, r0 = t * tl.block, rows = tl.count(t);
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

// A (C,) array's values repeated over the period: out[j] = arr[j % C] (the flat walk's coefficients).
template <typename A>
inline void repeat_channels(const Tiling& tl, const A* arr, A* out) {
  for (int64_t j = 0, c = 0; j < tl.period; ++j, c = c + 1 == tl.L.c ? 0 : c + 1) out[j] = arr[c];
}

// Elementwise passes over 16-bit rows of whole pairs (C a multiple of 2 * VW, so every row starts a
// pair) convert them a pair at a time (see has_pairs), as plane walks do: a pair's lanes hold its
// channels in pair order, so the per-channel arrays are read in that order (pair_order_channels).
// bfloat16 channels_last eval of (128, 256, 14, 14) against ATen, AVX2, 1 thread, three processes
// each: 1.00 / 1.06 / 1.04 one vector at a time, 0.96 / 0.84 / 0.90 by pairs.
template <typename T>
inline bool rows_in_pairs(const Tiling& tl) {
  return has_pairs<T>() && tl.rows && !tl.flat && tl.L.c % (2 * vec_width<acc_t<T>>()) == 0;
}

// A (C,) array in pair order: out[j] = arr[j - j % (2 VW) + pair_value(j % (2 VW))], so that the
// lanes of the pair at place j (lo, then hi) read out[j .. j + 2 VW) in turn.
template <typename T>
inline void pair_order_channels(const Tiling& tl, const acc_t<T>* arr, acc_t<T>* out) {
  constexpr int64_t PW = 2 * vec_width<acc_t<T>>();
  for (int64_t j = 0; j < tl.L.c; ++j) out[j] = arr[j - j % PW + pair_value<T>(j % PW)];
}

// How an elementwise pass over tiling tl reads its per-channel arrays: as given, repeated over the
// period (tl.flat), or in pair order (rows_in_pairs). arranged_size: the values of one arranged
// array (0: read as given); arrange_channels writes one.
template <typename T>
inline int64_t arranged_size(const Tiling& tl) {
  return tl.flat ? tl.period : rows_in_pairs<T>(tl) ? tl.L.c : 0;
}
template <typename T>
inline void arrange_channels(const Tiling& tl, const acc_t<T>* arr, acc_t<T>* out) {
  if (tl.flat) {
    repeat_channels(tl, arr, out);
  } else {
    pair_order_channels<T>(tl, arr, out);
  }
}

// The per-channel (C,) arrays that a kernel's chunks read, in a fixed order: a chunk asks for the
// values of array I on its lanes with coef(CoefIndex<I>{}) (kernels name the indices). An array
// that is never asked for may be null; one that is not null must be readable at [c] when a plane
// tile of channel c starts, asked for or not (PlaneCoefs reads them all then). With tl.flat the
// arrays must hold the channels' values repeated over the period (repeat_channels), as the rows
// are then walked flat; an elementwise pass over rows in pairs (rows_in_pairs) reads them in pair
// order (pair_order_channels). arrange_channels writes either.
template <typename A, size_t N>
using ChannelArrays = std::array<const A*, N>;
template <int I>
using CoefIndex = std::integral_constant<int, I>;

// coef for the chunks of a plane tile: its channel's values, broadcast once per tile. Loaded per
// chunk instead, they were loaded again after every store of an elementwise pass (a store through
// a T* might, for all the compiler knows, overwrite them): the float32 backward of (64, 16, 8, 8)
// took about 1.04x the time.
template <typename A, size_t N>
class PlaneCoefs {
  using V = at::vec::Vectorized<A>;

 public:
  PlaneCoefs(const ChannelArrays<A, N>& arrays, int64_t c) {
    for (size_t i = 0; i < N; ++i) v_[i] = arrays[i] ? V(arrays[i][c]) : V(A(0));
  }
  template <int I>
  V operator()(CoefIndex<I>) const {
    static_assert(I >= 0 && I < int(N), "no such per-channel array");
    return v_[I];
  }
  // The coefficients of one register of a pair: the same broadcasts.
  template <typename Part>
  const PlaneCoefs& at(Part) const {
    return *this;
  }

 private:
  std::array<V, N> v_;
};

// coef for a row chunk: the arrays' values from place j on, one per lane. A Pair chunk's lanes read
// theirs with at(PairLo{}) and at(PairHi{}) (arrays in pair order, see rows_in_pairs).
template <typename A, size_t N, typename Tag>
struct RowCoefs {
  ChannelArrays<A, N> arrays;
  Tag tag;
  int64_t j;
  template <int I>
  at::vec::Vectorized<A> operator()(CoefIndex<I>) const {
    static_assert(I >= 0 && I < int(N), "no such per-channel array");
    return ld(tag, arrays[I] + j);
  }
  template <typename Part>
  auto at(Part) const {
    if constexpr (std::is_same_v<Part, PairLo>) {
      return RowCoefs<A, N, Full>{arrays, Full{}, j};
    } else if constexpr (std::is_same_v<Part, PairHi>) {
      return RowCoefs<A, N, Full>{arrays, Full{}, j + vec_width<A>()};
    } else {
      return *this;
    }
  }
};

// coef for the chunks of two rows at the same places (tile_chunks): RowCoefs' values, loaded once
// for both. A null array (never asked for, see ChannelArrays) reads zeros; the loads of arrays the
// op does not ask for are dead code. A Pair's holds its two registers' coefficients.
template <typename A, size_t N, typename Tag>
struct LoadedRowCoefs {
  std::array<at::vec::Vectorized<A>, N> v;
  BNFUSED_INLINE LoadedRowCoefs(const ChannelArrays<A, N>& arrays, Tag tag, int64_t j) {
    alignas(64) static constexpr A kZeros[vec_width<A>()] = {};
    for (size_t i = 0; i < N; ++i) v[i] = ld(tag, arrays[i] ? arrays[i] + j : kZeros);
  }
  template <int I>
  at::vec::Vectorized<A> operator()(CoefIndex<I>) const {
    static_assert(I >= 0 && I < int(N), "no such per-channel array");
    return v[I];
  }
  template <typename Part>
  const LoadedRowCoefs& at(Part) const {
    return *this;
  }
};
template <typename A, size_t N>
struct LoadedRowCoefs<A, N, Pair> {
  LoadedRowCoefs<A, N, Full> lo, hi;
  BNFUSED_INLINE LoadedRowCoefs(const ChannelArrays<A, N>& arrays, Pair, int64_t j)
      : lo(arrays, Full{}, j), hi(arrays, Full{}, j + vec_width<A>()) {}
  template <typename Part>
  const LoadedRowCoefs<A, N, Full>& at(Part) const {
    static_assert(std::is_same_v<Part, PairLo> || std::is_same_v<Part, PairHi>, "a pair's registers");
    if constexpr (std::is_same_v<Part, PairLo>) {
      return lo;
    } else {
      return hi;
    }
  }
};

// One row of C values in chunks, f(tag, place of the chunk's first lane): whole vectors then a
// part, or (kPairs, see rows_in_pairs) pairs alone.
template <typename A, bool kPairs, typename F>
BNFUSED_INLINE void walk_row(int64_t C, F&& f) {
  constexpr int64_t VW = vec_width<A>();
  if constexpr (kPairs) {
    for (int64_t j = 0; j < C; j += 2 * VW) f(Pair{}, j);
  } else {
    int64_t j = 0;
    for (; j + VW <= C; j += VW) f(Full{}, j);
    if (j < C) f(Part{C - j}, j);
  }
}

// Row tile t's rows two at a time: two(off_a, off_b) for the i-th rows of the tile's first and second
// halves in turn, then one(off) for the first half's last row when the tile has an odd number of rows.
// Each half is read in address order; neighbouring rows together took 1.7-2x the time of one row at a
// time at 1 KB rows (float32 (128, 256, 14, 14) channels_last, Zen 4: normalize, and the statistics).
template <typename Two, typename One>
inline void for_row_pairs(const Tiling& tl, int64_t t, const Two& two, const One& one) {
  const int64_t rows = tl.count(t), half = rows / 2;
  RowOffsets next_a(tl.L, t * tl.block), next_b(tl.L, t * tl.block + rows - half);
  for (int64_t r = 0; r < half; ++r) {
    const int64_t off_a = next_a();
    two(off_a, next_b());
  }
  if (rows % 2 != 0) one(next_a());
}

// coef for a chunk read by `rows` rows at once: RowCoefs for one, LoadedRowCoefs for more.
template <size_t kRows, typename A, size_t N, typename Tag>
BNFUSED_INLINE auto row_coefs(const ChannelArrays<A, N>& arrays, Tag tag, int64_t j) {
  if constexpr (kRows == 1) {
    return RowCoefs<A, N, Tag>{arrays, tag, j};
  } else {
    return LoadedRowCoefs<A, N, Tag>(arrays, tag, j);
  }
}

// tile_chunks over row tile t walked row by row (not flat), two rows at a time (for_row_pairs): each
// chunk's coefficients are loaded once for both. Wide rows and their arrays overflow L1 (float32
// (32, 2048, 7, 7): 8 KB rows and normalize's three 8 KB arrays), where one row at a time took
// 1.2-1.3x the time (op alone, 1 thread, Zen 4; the backward's input gradient 1.3x).
template <typename A, bool kPairs, size_t N, typename Op>
void row_tile_chunks(const Tiling& tl, int64_t t, const ChannelArrays<A, N>& arrays, const Op& local) {
  const int64_t C = tl.L.c;
  const auto walk = [&](auto... off) {  // by value into the chunk loop, as in tile_chunks
    walk_row<A, kPairs>(C, [=](auto tag, int64_t j) {
      const auto coef = row_coefs<sizeof...(off)>(arrays, tag, j);
      (local(tag, off + j, coef), ...);
    });
  };
  for_row_pairs(tl, t, walk, walk);
}

// The plane tiles b in chunks: local(tag, offset of the chunk's first element, coef). A single tile
// goes plane by plane, coef its channel's PlaneCoefs. A block (whole contiguous planes, as
// plane_block_channels gives) goes as one run per sample, planes (n, c0) .. (n, c1 - 1) together, one
// vector at a time (16-bit values too: no Pair chunks, whose lanes would need the arrays in pair
// order), coef a RowCoefs over the arrays' values repeated S times per channel: a plane of a few vectors, walked alone, paid more per plane
// (broadcasting its coefficients, starting its run) than for its chunks (float32 (32, 576, 4, 4),
// the backward's input gradient alone, 1 thread, Zen 4: 111-115 us in channel tiles, 139-142 plane
// by plane in blocks, 66-70 as runs).
template <typename A, bool kPairs, size_t N, typename Op>
void plane_chunks(const Tiling& tl, const PlaneTiles& b, const ChannelArrays<A, N>& arr, const Op& local,
                  bool aligned) {
  const PlaneSpan p = tl.span_of(b.c0, b.k);
  if (b.c1 - b.c0 == 1) {
    const PlaneCoefs<A, N> coef(arr, b.c0);
    const auto chunk = [=](auto tag, int64_t off) { local(tag, off, coef); };
    for (int64_t n = p.n0; n < p.n1; ++n) {
      walk_run<A, kPairs>(n * tl.L.sn + b.c0 * tl.L.sc + p.s0 * tl.es, p.len, tl.es, chunk, aligned);
    }
    return;
  }
  using V = at::vec::Vectorized<A>;
  constexpr int64_t VW = vec_width<A>();
  const int64_t S = tl.L.s, run = (b.c1 - b.c0) * S;
  alignas(64) A repeated[N][kMaxBlockValues + VW];  // VW past the end: the last channel's whole vectors
  ChannelArrays<A, N> flat{};
  for (size_t i = 0; i < N; ++i) {
    if (!arr[i]) continue;
    for (int64_t c = b.c0; c < b.c1; ++c) {
      const V v(arr[i][c]);
      // whole vectors from the channel's first place on; the next channel's overwrite the overhang
      for (int64_t s = 0; s < S; s += VW) v.store(repeated[i] + (c - b.c0) * S + s);
    }
    flat[i] = repeated[i];
  }
  for (int64_t n = p.n0; n < p.n1; ++n) {
    const int64_t off = n * tl.L.sn + b.c0 * tl.L.sc;
    walk_run<A>(off, run, 1, [=](auto tag, int64_t o) { local(tag, o, RowCoefs<A, N, decltype(tag)>{flat, tag, o - off}); },
                aligned);
  }
}

// Rows not walked flat go two at a time (row_tile_chunks), unless kTwoRows is false: for chunks whose
// work is bound by arithmetic rather than memory, where four of them in one loop body (two rows of
// pairs) left GCC 12 calling the activation's gradient out of line, and forcing it inline spilled
// registers (the bfloat16 silu and sigmoid backward's input gradient, channels_last (32, 256, 14, 14)
// and (32, 1024, 7, 7), 1 thread: 0.80-0.88 ms one row at a time, 1.00-1.07 two).
//
// Kernels pass lambdas that capture their pointers BY VALUE, and each tile calls a local copy: the
// compiler can then keep the pointers in registers, where a captured reference would be re-read
// after every store (a store through a T* might, for all it knows, overwrite the pointer).
template <typename A, bool kPairs = false, bool kTwoRows = true, size_t N, typename Op>
void tile_chunks(const Tiling& tl, int64_t t, const ChannelArrays<A, N>& arrays, const Op& op, bool aligned = false,
                 bool row_pairs = false) {
  const Op local = op;
  const ChannelArrays<A, N> arr = arrays;
  if constexpr (kTwoRows) {
    if (tl.rows && !tl.flat) {
      if constexpr (kPairs) {
        if (row_pairs) {
          row_tile_chunks<A, true>(tl, t, arr, local);
          return;
        }
      }
      row_tile_chunks<A, false>(tl, t, arr, local);
      return;
    }
  }
  if (tl.rows) {
    const auto chunk = [=](auto tag, int64_t off, int64_t j) {
      local(tag, off, RowCoefs<A, N, decltype(tag)>{arr, tag, j});
    };
    if constexpr (kPairs) {
      if (row_pairs) {
        walk_rows<A, true>(tl, t, chunk);
        return;
      }
    }
    walk_rows<A>(tl, t, chunk);
  } else {
    plane_chunks<A, kPairs>(tl, single_tile(tl, t), arr, local, aligned);
  }
}

// tile_chunks over the plane tiles of a block (plane_block_channels), in memory order.
template <typename A, bool kPairs = false, bool kTwoRows = true, size_t N, typename Op>
void tile_chunks(const Tiling& tl, const PlaneTiles& b, const ChannelArrays<A, N>& arrays, const Op& op,
                 bool aligned = false, bool = false) {
  const Op local = op;
  const ChannelArrays<A, N> arr = arrays;
  plane_chunks<A, kPairs>(tl, b, arr, local, aligned);
}

// Channel partials (channels x tiles) per task of two_pass's finish step, where it forks.
constexpr int64_t kMinFinishWork = 8192;

// Channels whose values (times `streams` tensors) take at most this many bytes are reduced and
// then transformed by one task while they sit in its core's L2.
constexpr int64_t kFuseBytes = 1 << 20;

// The schedule of every two-pass kernel: reduce(t) on every tile, then finish(c0, c1) on every channel
// in ranges (it merges channels c0 .. c1 - 1's tile partials, each in tile order; ranges may run
// concurrently, in any order), then before_apply() once, then apply(t) on every tile; either pass may
// be absent (null flags). (The schedules below that fuse the three per block or per channel take
// plane tilings only and call before_apply() first: the kernels that need it run over rows.) With `block` channels per block (plane_block_channels), where reduce and apply
// also take PlaneTiles (kernels opt in so: a callable of int64_t alone keeps the tiles), one task per
// block of channels runs reduce on the block's tiles, finish on its channels and apply on its tiles,
// re-reading the block from cache when it fits and in memory order when not. Else, for planes whose channels fit in L2, and with at least
// as many channels as threads, one task per channel runs all three for its channel, so apply()
// re-reads values that reduce() just brought into cache; otherwise (and always for tiles in memory
// order) each step runs over all tiles at once.
// Each tile's partials are the same whichever way (plane_sums): so are the results.
template <typename Reduce, typename Finish, typename Apply, typename BeforeApply = void (*)()>
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
  const bool by_channel = !tl.rows && !tl.tiles_in_memory_order && has_reduce && has_apply &&
                          tl.L.c >= at::get_num_threads() && tl.L.per_channel() * bytes_per_value <= kFuseBytes;
  if (by_channel) {
    before_apply();
    const int64_t grain = std::max<int64_t>(1, kMinTaskValues / tl.L.per_channel());
    at::parallel_for(0, tl.L.c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        tl.for_channel_tiles(c, [&](int64_t t, int64_t) { reduce(t); });
        finish(c, c + 1);
        tl.for_channel_tiles(c, [&](int64_t t, int64_t) { apply(t); });
      }
    });
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
  if (has_apply) parallel_tiles(tl, apply);
}

template <typename A>
inline A lane_sum(const at::vec::Vectorized<A>& v) {
  A lanes[vec_width<A>()];
  v.store(lanes);
  A total = 0;
  for (int64_t i = 0; i < vec_width<A>(); ++i) total += lanes[i];
  return total;
}

// K sums over the rows of tile t (walked row by row) of its channels c0 .. c0 + C - 1, C <= NV * VW,
// in NV vectors, added to out[k * L.c + c]. Accumulated in registers: summed in memory, each vector
// of every row was a store and a dependent reload (a row of one vector, the worst, a chain of them).
// The rows are dealt in turn to kSets sets of accumulators, so that at least four independent
// chains of adds hide an add's latency, and the sets are added in a fixed order at the end: the
// grouping depends on the tile alone, never on the thread count. contrib as for tile_sums.
template <int NV, int K, typename A, size_t N, typename Contrib>
void row_block_sums(const Tiling& tl, int64_t t, int64_t c0, int64_t C, const A* center,
                    const ChannelArrays<A, N>& arrays, const Contrib& contrib, A* out) {
  using V = at::vec::Vectorized<A>;
  using Acc = std::array<std::array<V, K>, NV>;
  constexpr int64_t VW = vec_width<A>();
  constexpr int kSets = NV == 1 ? 4 : NV == 2 ? 2 : K == 1 ? 2 : 1;  // at most 8 accumulators, in registers
  const int64_t last = C - (NV - 1) * VW;  // lanes of the last vector, 1 .. VW
  const Part last_part{last};
  const Contrib local = contrib;  // a copy in registers, as in tile_chunks
  std::array<Acc, kSets> acc;
  for (auto& set : acc) {
    for (auto& vec : set) vec.fill(V(0));
  }
  const auto add = [&](std::array<V, K>& a, auto tag, int64_t off, int64_t lane0) {
    const int64_t j = c0 + lane0;
    const RowCoefs<A, N, decltype(tag)> coef{arrays, tag, j};
    const std::array<V, K> v = local(tag, off + j, center ? ld(tag, center + j) : V(0), coef);
    for (int k = 0; k < K; ++k) a[k] = a[k] + valid(tag, v[k]);
  };
  const auto row = [&](Acc& a, int64_t off) {
    for (int v = 0; v + 1 < NV; ++v) add(a[v], Full{}, off, v * VW);
    if (last == VW) {
      add(a[NV - 1], Full{}, off, (NV - 1) * VW);
    } else {
      add(a[NV - 1], last_part, off, (NV - 1) * VW);
    }
  };
  const int64_t rows = tl.count(t);
  RowOffsets next_row(tl.L, t * tl.block);
  int64_t r = 0;
  for (; r + kSets <= rows; r += kSets) {
    for (int q = 0; q < kSets; ++q) row(acc[q], next_row());
  }
  for (int q = 0; r < rows; ++r, ++q) row(acc[q], next_row());
  alignas(64) A lanes[kSets][K][NV * VW];
  for (int q = 0; q < kSets; ++q) {
    for (int k = 0; k < K; ++k) {
      for (int v = 0; v < NV; ++v) acc[q][v][k].store(lanes[q][k] + v * VW);
    }
  }
  for (int k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      A total = lanes[0][k][c];
      if constexpr (kSets == 2) total += lanes[1][k][c];
      if constexpr (kSets == 4) total = (total + lanes[1][k][c]) + (lanes[2][k][c] + lanes[3][k][c]);
      out[k * tl.L.c + c0 + c] += total;
    }
  }
}

// Accumulator registers a row tile's sums may use (rows_head_in_registers): AVX512 has 32 vector
// registers and AVX2 16, the rest hold the sums' operands; other builds (at::vec's generic or NEON
// vectors, not measured) sum rows in memory alone.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRowSumRegisters = 24;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kRowSumRegisters = 8;
#else
constexpr int kRowSumRegisters = 0;
#endif

// The type of those accumulators: the compiler's own vector type where it has one (GCC, clang), as
// an array of Vectorized stayed in registers but was also stored to the stack after every row (GCC
// 12); Vectorized itself elsewhere. Copied in and out with bit_copy.
#if defined(__GNUC__)
template <typename A>
struct RegisterVec {
  typedef A type __attribute__((vector_size(sizeof(at::vec::Vectorized<A>))));
};
#else
template <typename A>
struct RegisterVec {
  using type = at::vec::Vectorized<A>;
};
#endif

template <typename To, typename From>
inline To bit_copy(const From& from) {
  static_assert(sizeof(To) == sizeof(From) && std::is_trivially_copyable_v<To> && std::is_trivially_copyable_v<From>,
                "bit_copy needs two trivially copyable types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// Adds a row chunk's K contributions to acc[k * stride + j ..] (the sums of tile_sums kept in memory):
// contrib at offset off of each row given, in that order, with the lanes' centre and coefficients at
// place j.
template <int K, typename A, size_t N, typename Contrib, typename Tag, typename... Off>
inline void add_chunk(A* acc, int64_t stride, const Contrib& contrib, const ChannelArrays<A, N>& arrays,
                      const A* center, Tag tag, int64_t j, Off... off) {
  using V = at::vec::Vectorized<A>;
  const auto coef = row_coefs<sizeof...(Off)>(arrays, tag, j);
  const V cen = center ? ld(tag, center + j) : V(0);
  const std::array<std::array<V, K>, sizeof...(Off)> v{contrib(tag, off, cen, coef)...};
  for (int k = 0; k < K; ++k) {
    A* o = acc + k * stride + j;
    V sum = ld(tag, o);
    for (const auto& row : v) sum = sum + valid(tag, row[k]);
    st(tag, o, sum);
  }
}

// The sums of tile_sums over rows walked one after another (sequential walks), with the first NR
// vectors of every row summed in registers and the rest of the row in acc, which holds all C sums at
// the end, the K sums of each vector's channels side by side: sum k of channel j at
// acc[(j - j % VW) * K + k * VW + j % VW] (zeroed by the caller, whole vectors). Kept as K arrays of
// C, a chunk's K sums lay C values apart, 4 or 8 KB for 1024 or 2048 float32 channels: the same low
// 12 address bits, so that each load of one waited on the store to the other (Zen 4, channels_last,
// 1 thread, op alone, two runs in each order, medians: statistics of (32, 1024, 14, 14) 1.52 ms
// side by side against 1.82, (32, 2048, 7, 7) 0.94 against 1.05). Summed in acc alone, every vector was a
// load, an add and a store per sum; the stores, queued behind the loads of x that wait on memory,
// stalled the walk (Zen 4, float32 (128, 256, 14, 14) channels_last, 1 thread, op alone: the
// forward's statistics 2.0-2.1 -> 1.5-1.6 ms, the backward's sums 2.6-3.1 -> 1.8-2.0 ms). Rows are
// added two at a time (for_row_pairs: each chunk's centre and coefficients loaded, and its sums
// loaded and stored, once for both): float32 (32, 2048, 7, 7) channels_last backward sums 1.77 ->
// 1.27 ms, statistics 1.14 -> 1.05, (32, 1024, 14, 14) statistics 1.74 -> 1.38 (1 thread, op alone,
// one run in each order, medians). Each value is added in the order tile_sums' rows in memory add it
// (which path a tensor takes depends on the build's vector width; contracted multiply-adds in the
// contributions can still differ between builds).
template <int NR, int K, typename A, size_t N, typename Contrib>
void rows_head_in_registers(const Tiling& tl, int64_t t, const A* center, const ChannelArrays<A, N>& arrays,
                            const Contrib& contrib, A* __restrict acc) {
  using V = at::vec::Vectorized<A>;
  using Raw = typename RegisterVec<A>::type;
  constexpr int64_t VW = vec_width<A>();
  const int64_t C = tl.L.c, rows = tl.count(t);
  const Contrib local = contrib;  // copies in registers, as in tile_chunks
  const ChannelArrays<A, N> arr = arrays;
  Raw reg[NR][K];
#pragma GCC unroll 16
  for (int v = 0; v < NR; ++v) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) reg[v][k] = bit_copy<Raw>(V(0));
  }
  const auto add_rows = [&](auto... off) {  // one row or two, added in that order
#pragma GCC unroll 16
    for (int v = 0; v < NR; ++v) {
      const auto coef = row_coefs<sizeof...(off)>(arr, Full{}, v * VW);
      const V cen = center ? V::loadu(center + v * VW) : V(0);
      const auto add_row = [&](int64_t o) {
        const std::array<V, K> c = local(Full{}, o + v * VW, cen, coef);
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) reg[v][k] = reg[v][k] + bit_copy<Raw>(c[k]);
      };
      (add_row(off), ...);
    }
    int64_t j = NR * VW;
    for (; j + VW <= C; j += VW) add_chunk<K>(acc + j * (K - 1), VW, local, arr, center, Full{}, j, (off + j)...);
    if (j < C) add_chunk<K>(acc + j * (K - 1), VW, local, arr, center, Part{C - j}, j, (off + j)...);
  };
  for_row_pairs(tl, t, add_rows, add_rows);
#pragma GCC unroll 16
  for (int v = 0; v < NR; ++v) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) bit_copy<V>(reg[v][k]).store(acc + (v * K + k) * VW);
  }
}

// rows_head_in_registers with as many vectors in registers as the row and kRowSumRegisters allow
// (rows of at least 4 vectors, kRowSumRegisters / K >= 4).
template <int K, typename A, size_t N, typename Contrib>
void rows_sums_sequential(const Tiling& tl, int64_t t, const A* center, const ChannelArrays<A, N>& arrays,
                          const Contrib& contrib, A* acc) {
  constexpr int kMaxVectors = kRowSumRegisters / K;
  const int64_t vectors = tl.L.c / vec_width<A>();
  if constexpr (kMaxVectors >= 12) {
    if (vectors >= 12) return rows_head_in_registers<12, K>(tl, t, center, arrays, contrib, acc);
  }
  if constexpr (kMaxVectors >= 8) {
    if (vectors >= 8) return rows_head_in_registers<8, K>(tl, t, center, arrays, contrib, acc);
  }
  rows_head_in_registers<4, K>(tl, t, center, arrays, contrib, acc);
}

// One contiguous run of a plane tile's sums: runs of four chunks to chains a0 .. a3 in turn, the
// whole chunks after them to a0 and a partial one to a1 (chains may alias, see tile_sums).
// acc = added(acc, tag, offset) adds a chunk. Forced inline, where GCC keeps the chains in registers.
template <int64_t VW, typename Acc, typename Added>
BNFUSED_INLINE void add_run(Acc& a0, Acc& a1, Acc& a2, Acc& a3, int64_t off, int64_t len, const Added& added) {
  int64_t i = 0;
  for (; i + 4 * VW <= len; i += 4 * VW) {
    a0 = added(a0, Full{}, off + i);
    a1 = added(a1, Full{}, off + i + VW);
    a2 = added(a2, Full{}, off + i + 2 * VW);
    a3 = added(a3, Full{}, off + i + 3 * VW);
  }
  for (; i + VW <= len; i += VW) a0 = added(a0, Full{}, off + i);
  if (i < len) a1 = added(a1, Part{len - i}, off + i);
}

// tile_sums over the plane tiles of a block (plane_block_channels), in memory order: K sums of
// contrib(tag, offset, centre, coef) -> std::array<Vec, K> per tile, channel c's into out_of(c)[0 ..
// K) with centre center_of(c) (broadcast) and coef its PlaneCoefs. Each plane's chunks go to the
// same chains, in the same order, as in tile_sums' walk of the tile (see there): the same sums, bit
// for bit, whichever walk a tensor takes. (Not one function for both: walked as here, a tile's chains
// kept in memory between planes, or with tile_sums' loop moved into a lambda, GCC 12 compiled the
// float32 statistics of a single tile's short planes to 1.5-1.6x the time, (32, 576, 4, 4).)
template <int K, typename A, size_t N, typename CenterOf, typename Contrib, typename OutOf>
void plane_sums(const Tiling& tl, const PlaneTiles& b, const CenterOf& center_of, const ChannelArrays<A, N>& arrays,
                const Contrib& contrib, const OutOf& out_of) {
  using V = at::vec::Vectorized<A>;
  using Acc = std::array<V, K>;
  constexpr int64_t VW = vec_width<A>();
  constexpr bool kFourChains = K == 1;
  constexpr bool kTwoChains = !kFourChains && sizeof(V) <= 32;
  constexpr int kChains = kFourChains ? 4 : kTwoChains ? 2 : 1;
  Acc zero;
  zero.fill(V(0));
  const PlaneSpan p = tl.span_of(b.c0, b.k);
  // Plane (n, c)'s chunks into chains q0 .. q3 (tile_sums' a0, c1, c2, c3; those past kChains stand
  // for the ones they alias there, and stay zero).
  const auto plane = [&](Acc& q0, Acc& q1, Acc& q2, Acc& q3, int64_t off, const V& cen, const PlaneCoefs<A, N>& coef) {
    Acc &a1 = (kFourChains || kTwoChains) ? q1 : q0, &a2 = kFourChains ? q2 : q0;
    Acc& a3 = kFourChains ? q3 : (kTwoChains ? q1 : q0);
    // By value in and out, so that the accumulators stay in registers across the loops.
    const auto added = [&](const Acc& acc, auto tag, int64_t o) {
      const Acc v = contrib(tag, o, cen, coef);
      Acc sum;
      for (int k = 0; k < K; ++k) sum[k] = acc[k] + valid(tag, v[k]);
      return sum;
    };
    add_run<VW>(q0, a1, a2, a3, off, p.len, added);  // blocks are of contiguous planes: no gathers
  };
  // Channel c's chains added as tile_sums adds them.
  const auto write = [&](const std::array<Acc, kChains>& q, int64_t c) {
    A* out = out_of(c);
    for (int k = 0; k < K; ++k) {
      if constexpr (kFourChains) {
        out[k] = lane_sum((q[0][k] + q[1 % kChains][k]) + (q[2 % kChains][k] + q[3 % kChains][k]));
      } else if constexpr (kTwoChains) {
        out[k] = lane_sum(q[0][k] + q[1 % kChains][k]);
      } else {
        out[k] = lane_sum(q[0][k]);
      }
    }
  };
  // Each channel's chains wait in memory (L1) between its planes; only the chains its planes' chunks
  // reach are loaded and stored.
  const int64_t fours = p.len / (4 * VW), tail = p.len % VW;
  const int live = fours == 0 && tail == 0 ? 1 : fours == 0 ? std::min(2, kChains) : kChains;
  alignas(64) std::array<Acc, kChains> state[kMaxBlockChannels];
  std::array<Acc, kChains> zeros;
  zeros.fill(zero);
  std::fill(state, state + (b.c1 - b.c0), zeros);
  for (int64_t n = p.n0; n < p.n1; ++n) {
    for (int64_t c = b.c0; c < b.c1; ++c) {
      std::array<Acc, kChains>& kept = state[c - b.c0];
      Acc q0 = kept[0], q1 = zero, q2 = zero, q3 = zero;
      if constexpr (kChains > 1) {
        if (live > 1) q1 = kept[1 % kChains];
      }
      if constexpr (kChains > 2) {
        if (live > 2) q2 = kept[2 % kChains], q3 = kept[3 % kChains];
      }
      plane(q0, q1, q2, q3, n * tl.L.sn + c * tl.L.sc, V(center_of(c)), PlaneCoefs<A, N>(arrays, c));
      kept[0] = q0;
      if constexpr (kChains > 1) {
        if (live > 1) kept[1 % kChains] = q1;
      }
      if constexpr (kChains > 2) {
        if (live > 2) kept[2 % kChains] = q2, kept[3 % kChains] = q3;
      }
    }
  }
  for (int64_t c = b.c0; c < b.c1; ++c) write(state[c - b.c0], c);
}

// K per-channel sums over tile t of contrib(tag, offset, center, coef) -> std::array<Vec, K>, written
// to out[k * width + j] (out zeroed by the caller). center points at the tile's per-channel centre
// values (center[0] for a plane tile, center[c] for a row tile) or is null (centre 0); coef gives
// the values of `arrays` for the chunk's lanes, as in tile_chunks. With tl.flat, center and the
// arrays hold values repeated over the period, and the tile is summed flat: one accumulator per
// place of the period, folded into the C sums at the end in a fixed order. contrib captures by
// value, as for tile_chunks.
template <int K, typename A, size_t N, typename Contrib>
void tile_sums(const Tiling& tl, int64_t t, const A* center, const ChannelArrays<A, N>& arrays,
               const Contrib& contrib_in, A* out) {
  using V = at::vec::Vectorized<A>;
  const Contrib contrib = contrib_in;
  if (!tl.rows) {
    // One sum (the moments) in four accumulators, the chunks of a run dealt to them in turn: one
    // accumulator is a chain of dependent adds, an add's latency (4 cycles) per vector, several times
    // what loading a vector from L1/L2 takes (the training forward took 0.77-0.98x the time of one chain).
    // The backward's two sums measured slower that way with AVX512 (1.05-1.17x), so they keep one
    // chain each there; with 256-bit vectors a plane has twice the vectors, each waiting on the last,
    // and two chains each (alternate chunks) took the (64, 16, 8, 8) float32 backward op from 1.11x
    // to 0.95x ATen's time, (32, 64, 56, 56) from 0.71x to 0.61x (AVX2 build and ATen on the AVX512
    // machine, 1 thread), where with AVX512 the first went from 0.87x to 0.96x.
    // Which chunk goes to which accumulator, and the order they are added in, depend on the tile
    // alone, never on the thread count (nor on the walk: plane_sums adds a block's planes alike).
    using Acc = std::array<V, K>;
    Acc zero;
    zero.fill(V(0));
    Acc a0 = zero, c1 = zero, c2 = zero, c3 = zero;
    constexpr bool kFourChains = K == 1;
    constexpr bool kTwoChains = !kFourChains && sizeof(V) <= 32;
    Acc &a1 = (kFourChains || kTwoChains) ? c1 : a0, &a2 = kFourChains ? c2 : a0;
    Acc& a3 = kFourChains ? c3 : (kTwoChains ? c1 : a0);
    const V cen(center ? center[0] : A(0));
    const PlaneSpan p = tl.plane_span(t);
    const PlaneCoefs<A, N> coef(arrays, p.c);
    // By value in and out, so that the accumulators stay in registers across the loops.
    const auto added = [&](const Acc& acc, auto tag, int64_t off) {
      const Acc v = contrib(tag, off, cen, coef);
      Acc sum;
      for (int k = 0; k < K; ++k) sum[k] = acc[k] + valid(tag, v[k]);
      return sum;
    };
    constexpr int64_t VW = vec_width<A>();
    for (int64_t n = p.n0; n < p.n1; ++n) {
      const int64_t off = n * tl.L.sn + p.c * tl.L.sc + p.s0 * tl.es;
      if (tl.es != 1) {
        for (int64_t i = 0; i < p.len; i += VW) {
          a0 = added(a0, Gather{std::min(VW, p.len - i), tl.es}, off + i * tl.es);
        }
        continue;
      }
      add_run<VW>(a0, a1, a2, a3, off, p.len, added);
    }
    for (int k = 0; k < K; ++k) {
      out[k] = lane_sum(kFourChains ? (a0[k] + a1[k]) + (a2[k] + a3[k]) : kTwoChains ? a0[k] + c1[k] : a0[k]);
    }
    return;
  }
  // Rows walked one by one: in blocks of up to four vectors of channels, each summed over the tile's rows in
  // registers (row_block_sums; a wider row re-reads the tile, from L1/L2, once per block). Summed in out
  // itself, row by row, the training forward of (128, 256, 14, 14) channels_last took 1.03x (float32) and
  // 1.05x (bfloat16) the time with AVX512 on an Intel Xeon (before the memory sums below were rewritten; rows
  // walk sequentially on every processor since). With sequential walks (walk_order.h) rows wider
  // than a block are summed one after another (rows_sums_sequential: the first vectors of each row in
  // registers, the rest in memory), in tensors too large for L2: read a block at a time, a tensor from memory
  // ran far slower than one row after another on AMD processors (AVX2: the float32 backward of (32, 64, 56,
  // 56) channels_last, whose 64-channel rows are two 32-channel blocks, at 1.57x ATen's time in register
  // blocks, 0.99x in memory; Zen 4, AVX512: the backward's sums of (128, 256, 14, 14) 1.6x the time); the
  // MLP's (64, 512), in cache, stays faster in registers (forward 0.83-0.84x against 0.90-0.92x). Walked
  // flat: one accumulator per place of the period, folded into out's C sums at the end. Rows of one block (C
  // <= 4 * VW) are read once either way and keep their registers: in memory, each row's adds wait on the
  // previous row's stores (channels_last (256, 8, 32, 32) training forward 1.60 ms in registers, 2.27 ms in
  // memory).
  constexpr int64_t VW = vec_width<A>();
  const int64_t C = tl.L.c;
  const bool rows_in_memory = tl.sequential_rows && C > 4 * VW && C <= kMaxRowsPeriod &&
                              tl.L.numel() * int64_t(sizeof(A)) > kFuseBytes;
  if (!tl.flat && !rows_in_memory) {
    for (int64_t c0 = 0; c0 < C; c0 += 4 * VW) {
      const int64_t width = std::min(4 * VW, C - c0);
      switch ((width + VW - 1) / VW) {
        case 1: row_block_sums<1, K>(tl, t, c0, width, center, arrays, contrib, out); break;
        case 2: row_block_sums<2, K>(tl, t, c0, width, center, arrays, contrib, out); break;
        case 3: row_block_sums<3, K>(tl, t, c0, width, center, arrays, contrib, out); break;
        default: row_block_sums<4, K>(tl, t, c0, width, center, arrays, contrib, out); break;
      }
    }
    return;
  }
  const int64_t P = tl.flat ? tl.period : C;
  static_assert(kMaxRowsPeriod % VW == 0, "P rounded up to whole vectors fits flat_acc");
  alignas(64) A flat_acc[K * kMaxRowsPeriod];
  A* const acc = flat_acc;
  std::fill(acc, acc + K * ((P + VW - 1) / VW * VW), A(0));  // whole vectors, as rows_head_in_registers uses it
  if constexpr (kRowSumRegisters / K >= 4) {  // not compiled where it cannot run
    if (!tl.flat) {
      rows_sums_sequential<K>(tl, t, center, arrays, contrib, acc);
      // acc holds each vector's K sums side by side (rows_head_in_registers)
      const auto fold = [&](auto tag, int64_t j) {
        for (int k = 0; k < K; ++k) st(tag, out + k * C + j, ld(tag, out + k * C + j) + ld(tag, acc + j * K + k * VW));
      };
      int64_t j = 0;
      for (; j + VW <= C; j += VW) fold(Full{}, j);
      if (j < C) fold(Part{C - j}, j);
      return;
    }
  }
  const ChannelArrays<A, N> arr = arrays;
  if (!tl.flat) {  // the rows in rows_head_in_registers' order: builds that take either path add alike
    const auto add_rows = [=](auto... off) {  // by value: this loop stores
      walk_row<A, false>(C, [=](auto tag, int64_t j) {
        add_chunk<K>(acc, P, contrib, arr, center, tag, j, (off + j)...);
      });
    };
    for_row_pairs(tl, t, add_rows, add_rows);
    for (int64_t i = 0; i < K * C; ++i) out[i] += acc[i];  // one loop over the K * C sums, which vectorises
    return;
  }
  walk_rows<A>(tl, t, [=](auto tag, int64_t off, int64_t j) {  // by value: this loop stores
    add_chunk<K>(acc, P, contrib, arr, center, tag, j, off);
  });
  for (int k = 0; k < K; ++k) {
    for (int64_t j = 0, c = 0; j < P; ++j, c = c + 1 == C ? 0 : c + 1) out[k * C + c] += acc[k * P + j];
  }
}

}  // namespace bnfused::cpu
