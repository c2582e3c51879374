// One tile (or a block of plane tiles) in vector chunks, each chunk handed with the per-channel
// coefficients of its lanes: the loop every elementwise pass and every sum is written against.
#pragma once

#include "channel_coefs.h"

namespace bnfused::cpu {

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

}  // namespace bnfused::cpu
