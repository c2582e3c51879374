// Per-channel sums over a tile (K of them at once: the statistics' sums, the backward's two), in
// registers where the rows allow, in chains whose grouping depends on the tile alone, never on the
// thread count.
#pragma once

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>

#include "tile_chunks.h"

namespace bnfused::cpu {

template <typename A>
inline A lane_sum(const at::vec::Vectorized<A>& v) {
  A lanes[vec_width<A>()];
  v.store(lanes);
  A total = 0;
  for (int64_t i = 0; i < vec_width<A>(); ++i) total += lanes[i];
  return total;
}

// A float chain rounds every add to its running sum: over many adds of values that repeat (quantized
// data, as every bfloat16 tensor is), the roundings add up in step rather than cancelling. The chains
// of a plane tile (sample after sample of one channel's planes) and of a row tile summed in registers
// are therefore folded into the tile's total as they go, so that no chain adds more than
// kMaxChainAdds values per lane. Chains over the whole tile had the float32 moments of bfloat16
// values at 1000 standard deviations from zero 8e-6 off float64 in invstd ((2000, 8, 4, 4) with AVX2:
// 2048 adds per lane; torch 7e-8). Planes longer than a fold are folded inside too: the one-sweep
// moments (moments.h) of (2, 3, 130, 131) bfloat16 near 10, whose 8515-value tiles (half a plane)
// added 532 values per lane to a chain, had its variance 1.4e-5 off float64 with a row of its values 30
// standard deviations out (torch 3e-8).
constexpr int64_t kMaxChainAdds = 64;

// The most values one chain's lanes add per plane of len values (add_run's dealing), whole chunks or
// gathered ones (all to the first chain), and the samples per fold of a tile of such planes.
template <int kChains, int64_t VW>
int64_t samples_per_fold(int64_t len, bool gathered) {
  const int64_t fours = len / (4 * VW), whole = (len % (4 * VW)) / VW, partial = len % VW != 0;
  const int64_t most = gathered      ? (len + VW - 1) / VW
                       : kChains == 1 ? 4 * fours + whole + partial
                                      : (4 / kChains) * fours + std::max(whole, partial);
  return std::max<int64_t>(1, kMaxChainAdds / std::max<int64_t>(1, most));
}

// The chains' sum, in a fixed order: (q0 + q1) + (q2 + q3) with four chains, q0 + q1 with two, q0
// with one (the chains past kChains are not read).
template <int kChains, typename Acc>
inline Acc chains_total(const Acc& q0, const Acc& q1, const Acc& q2, const Acc& q3) {
  Acc sum;
  for (size_t k = 0; k < sum.size(); ++k) {
    if constexpr (kChains == 4) {
      sum[k] = (q0[k] + q1[k]) + (q2[k] + q3[k]);
    } else if constexpr (kChains == 2) {
      sum[k] = q0[k] + q1[k];
    } else {
      sum[k] = q0[k];
    }
  }
  return sum;
}

// total += chains_total(q0 .. q3), and the chains start again from zero.
template <int kChains, typename Acc>
inline void fold_chains(Acc& total, Acc& q0, Acc& q1, Acc& q2, Acc& q3, const Acc& zero) {
  const Acc sum = chains_total<kChains>(q0, q1, q2, q3);
  for (size_t k = 0; k < total.size(); ++k) total[k] = total[k] + sum[k];
  q0 = q1 = q2 = q3 = zero;
}

// K sums over the rows of tile t (walked row by row) of its channels c0 .. c0 + C - 1, C <= NV * VW,
// in NV vectors, added to out[k * L.c + c]. Accumulated in registers: summed in memory, each vector
// of every row was a store and a dependent reload (a row of one vector, the worst, a chain of them).
// The rows are dealt in turn to kSets sets of accumulators, so that at least four independent
// chains of adds hide an add's latency, and the sets are added in a fixed order, into a total every
// kMaxChainAdds rounds and at the end: the grouping depends on the tile alone, never on the thread
// count. contrib as for tile_sums.
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
  // The sets are folded into `total` every kMaxChainAdds rounds of rows (see kMaxChainAdds).
  std::array<V, K> zeros;
  zeros.fill(V(0));
  Acc total;
  total.fill(zeros);
  const auto fold = [&] {
    for (int v = 0; v < NV; ++v) {
      fold_chains<kSets>(total[v], acc[0][v], acc[1 % kSets][v], acc[2 % kSets][v], acc[3 % kSets][v], zeros);
    }
  };
  const int64_t rows = tl.count(t);
  RowOffsets next_row(tl.L, t * tl.block);
  int64_t r = 0;
  for (int64_t left = kMaxChainAdds; r + kSets <= rows; r += kSets) {
    for (int q = 0; q < kSets; ++q) row(acc[q], next_row());
    if (--left == 0) {
      fold();
      left = kMaxChainAdds;
    }
  }
  for (int q = 0; r < rows; ++r, ++q) row(acc[q], next_row());
  alignas(64) A lanes[K][NV * VW];
  for (int v = 0; v < NV; ++v) {
    const std::array<V, K> sets =
        chains_total<kSets>(acc[0][v], acc[1 % kSets][v], acc[2 % kSets][v], acc[3 % kSets][v]);
    for (int k = 0; k < K; ++k) V(total[v][k] + sets[k]).store(lanes[k] + v * VW);
  }
  for (int k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) out[k * tl.L.c + c0 + c] += lanes[k][c];
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
// With kPairs (16-bit values, has_pairs) the four chunks are read as two pairs (ld_pair), the lo
// and hi registers of the first to a0 and a1, of the second to a2 and a3: a bfloat16 pair is
// widened with one shift and one mask, where a vector of VW values takes a widening load and a
// shift. Each chain gets as many values as before, other ones for bfloat16 (a float16 pair is two
// whole vectors: the same chunks, the same bits). bfloat16 NCHW, op alone, Zen 1 (AVX2), three
// alternated processes each, 2 threads, vectors -> pairs: statistics (batch_stats) of (128, 256,
// 14, 14) 1.27-1.31 -> 0.98-1.15 ms, (32, 64, 56, 56) 1.25-1.26 -> 1.08; training forward 3.10-3.13
// -> 2.93-3.05 and 2.51-2.58 -> 2.32-2.46; backward 4.86-4.95 -> 4.46-4.51 and 3.53-3.64 -> 3.15-3.29
// (1 thread: statistics 2.1-2.3 -> 1.7-1.9, backward 8.0-8.8 -> 7.3-8.2 and 5.8-6.3 -> 5.1).
template <int64_t VW, bool kPairs = false, typename Acc, typename Added>
BNFUSED_INLINE void add_run(Acc& a0, Acc& a1, Acc& a2, Acc& a3, int64_t off, int64_t len, const Added& added) {
  int64_t i = 0;
  for (; i + 4 * VW <= len; i += 4 * VW) {
    if constexpr (kPairs) {
      a0 = added(a0, PairLo{}, off + i);
      a1 = added(a1, PairHi{}, off + i);
      a2 = added(a2, PairLo{}, off + i + 2 * VW);
      a3 = added(a3, PairHi{}, off + i + 2 * VW);
    } else {
      a0 = added(a0, Full{}, off + i);
      a1 = added(a1, Full{}, off + i + VW);
      a2 = added(a2, Full{}, off + i + 2 * VW);
      a3 = added(a3, Full{}, off + i + 3 * VW);
    }
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
template <int K, bool kPairs = false, typename A, size_t N, typename CenterOf, typename Contrib, typename OutOf>
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
    add_run<VW, kPairs>(q0, a1, a2, a3, off, p.len, added);  // blocks are of contiguous planes: no gathers
  };
  // Each channel's chains, and their total folded every `fold` samples, as tile_sums keeps them
  // (blocks hold planes shorter than one of tile_sums' runs between folds: no fold inside a plane).
  static_assert(kMaxBlockPlaneBytes / 2 <= kMaxChainAdds * VW, "a block's plane fits one run of tile_sums");
  struct Sums {
    std::array<Acc, kChains> q;
    Acc total;
  };
  const auto chains_of = [](const Sums& s) {
    return chains_total<kChains>(s.q[0], s.q[1 % kChains], s.q[2 % kChains], s.q[3 % kChains]);
  };
  const auto write = [&](const Sums& s, int64_t c) {
    A* out = out_of(c);
    const Acc last = chains_of(s);
    for (int k = 0; k < K; ++k) out[k] = lane_sum(s.total[k] + last[k]);
  };
  // Each channel's chains wait in memory (L1) between its planes; only the chains its planes' chunks
  // reach are loaded and stored.
  const int64_t fours = p.len / (4 * VW), tail = p.len % VW;
  const int live = fours == 0 && tail == 0 ? 1 : fours == 0 ? std::min(2, kChains) : kChains;
  alignas(64) Sums state[kMaxBlockChannels];
  Sums zeros;
  zeros.q.fill(zero);
  zeros.total = zero;
  std::fill(state, state + (b.c1 - b.c0), zeros);
  const int64_t fold = samples_per_fold<kChains, VW>(p.len, false);
  for (int64_t n = p.n0, left = fold; n < p.n1; ++n) {
    for (int64_t c = b.c0; c < b.c1; ++c) {
      std::array<Acc, kChains>& kept = state[c - b.c0].q;
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
    if (--left == 0) {
      for (int64_t c = b.c0; c < b.c1; ++c) {
        Sums& s = state[c - b.c0];
        fold_chains<kChains>(s.total, s.q[0], s.q[1 % kChains], s.q[2 % kChains], s.q[3 % kChains], zero);
      }
      left = fold;
    }
  }
  for (int64_t c = b.c0; c < b.c1; ++c) write(state[c - b.c0], c);
}

// Plane tiles group one channel's planes, C * S values apart. A plane of fewer than
// kPrefetchPlaneBytes is a short run of cache lines, and the hardware prefetcher, which follows a
// run within its 4 KB page, starts again at each one: the sums of such tiles prefetch the plane a few
// ahead of the one they add (PlaneStreams). A bfloat16 sum of one channel's planes after another's
// (a C++ loop of the same adds, 1 thread, AVX2 EPYC), without -> with the plane 2 ahead: planes of
// 98 bytes 0.93 -> 0.58 ms, 392 bytes 2.18 -> 1.71, 784 bytes 2.36 -> 1.75, 1568 bytes 2.04 -> 1.71,
// 3136 bytes 1.83 -> 1.65, 4096 bytes 2.28 -> 2.29 (reading the tensor in memory order: 0.48, 1.55,
// 1.85, 1.79, 1.71, 2.18). Tensors of up to kPrefetchTensorBytes, likely in cache, are not
// prefetched: the prefetches cost the float32 backward of LeNet's (64, 6, 24, 24) (885 KB) about 5%.
// Taken in builds of 8-float vectors or fewer, where it was measured (AVX2).
constexpr bool kPrefetchPlanes = kNarrowVectors;
constexpr int64_t kPrefetchPlaneBytes = 4096;
constexpr int64_t kPrefetchTensorBytes = int64_t{4} << 20;
// Bytes of planes ahead to prefetch, at least one plane and at most kMaxPlanesAhead.
constexpr int64_t kPrefetchAheadBytes = 2048;
constexpr int64_t kMaxPlanesAhead = 4;

// The tensors (up to four, of one dtype) whose values a plane tile's sums read at the chunks'
// offsets, for the prefetch above; none by default.
struct PlaneStreams {
  std::array<const void*, 4> base{};
  int64_t count = 0;
  int64_t value_bytes = 0;
  template <typename T, typename... More>
  static PlaneStreams of(const T* first, const More*... more) {
    static_assert(sizeof...(More) < 4, "at most four streams");
    static_assert((std::is_same_v<T, More> && ...), "streams of one dtype");
    PlaneStreams s;
    s.value_bytes = sizeof(T);
    for (const void* p : {static_cast<const void*>(first), static_cast<const void*>(more)...}) {
      if (p != nullptr) s.base[s.count++] = p;
    }
    return s;
  }
  // Planes ahead for planes of len values in tensors of numel values (0: none).
  int64_t planes_ahead(int64_t len, int64_t numel) const {
    const int64_t bytes = len * value_bytes;
    const bool in_cache = numel * value_bytes <= kPrefetchTensorBytes;
    if (!kPrefetchPlanes || count == 0 || bytes >= kPrefetchPlaneBytes || in_cache) return 0;
    return std::clamp<int64_t>(kPrefetchAheadBytes / bytes, 1, kMaxPlanesAhead);
  }
  void prefetch(int64_t off, int64_t len) const {
    for (int64_t i = 0; i < count; ++i) {
      const char* q = static_cast<const char*>(base[i]) + off * value_bytes;
      for (int64_t b = 0; b < len * value_bytes; b += 64) prefetch_line(q + b);
    }
  }
  // The cache line of each stream that holds value `index`, which may lie past the tensors' ends
  // (prefetch_byte). Constant indices: a kernel's chunk lambda holds a copy of its PlaneStreams, and
  // base[i] with a variable i takes that copy's address, after which the compiler keeps every value
  // the lambda captured in memory and re-reads it after each store (a vector store may alias
  // anything).
  void prefetch_value_at(int64_t index) const {
    const int64_t bytes = index * value_bytes;
    if (count > 0) prefetch_byte(base[0], bytes);
    if (count > 1) prefetch_byte(base[1], bytes);
    if (count > 2) prefetch_byte(base[2], bytes);
    if (count > 3) prefetch_byte(base[3], bytes);
  }
};

// K per-channel sums over tile t of contrib(tag, offset, center, coef) -> std::array<Vec, K>, written
// to out[k * width + j] (out zeroed by the caller). center points at the tile's per-channel centre
// values (center[0] for a plane tile, center[c] for a row tile) or is null (centre 0); coef gives
// the values of `arrays` for the chunk's lanes, as in tile_chunks. With tl.flat, center and the
// arrays hold values repeated over the period, and the tile is summed flat: one accumulator per
// place of the period, folded into the C sums at the end in a fixed order. contrib captures by
// value, as for tile_chunks. kPairs (has_pairs of the tensors' dtype): plane tiles are read by pairs
// (add_run; contrib then also takes the tags PairLo and PairHi), as plane_sums must read them too.
template <int K, bool kPairs = false, typename A, size_t N, typename Contrib>
void tile_sums(const Tiling& tl, int64_t t, const A* center, const ChannelArrays<A, N>& arrays,
               const Contrib& contrib_in, A* out, const PlaneStreams& streams = {}) {
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
    constexpr int kChains = kFourChains ? 4 : kTwoChains ? 2 : 1;
    const int64_t fold = samples_per_fold<kChains, VW>(p.len, tl.es != 1);
    Acc total = zero;
    const int64_t ahead = tl.es == 1 ? streams.planes_ahead(p.len, tl.L.numel()) : 0;
    for (int64_t n = p.n0, left = fold; n < p.n1; ++n) {
      const int64_t off = n * tl.L.sn + p.c * tl.L.sc + p.s0 * tl.es;
      if (ahead > 0 && n + ahead < p.n1) streams.prefetch(off + ahead * tl.L.sn, p.len);
      // A plane longer than a chain's kMaxChainAdds values per lane is folded as it goes too, every
      // `run` values but after its last (the fold below follows): whole rounds of four chunks, each
      // chunk to the chain it goes to unfolded.
      if (tl.es != 1) {
        constexpr int64_t run = kMaxChainAdds * VW;  // every chunk to a0
        for (int64_t i = 0; i < p.len; i += VW) {
          if (i > 0 && i % run == 0) fold_chains<kChains>(total, a0, c1, c2, c3, zero);
          a0 = added(a0, Gather{std::min(VW, p.len - i), tl.es}, off + i * tl.es);
        }
      } else {
        constexpr int64_t run = kMaxChainAdds * kChains * VW;
        for (int64_t i = 0; i < p.len; i += run) {
          if (i > 0) fold_chains<kChains>(total, a0, c1, c2, c3, zero);
          add_run<VW, kPairs>(a0, a1, a2, a3, off + i, std::min(run, p.len - i), added);
        }
      }
      if (--left == 0) {
        fold_chains<kChains>(total, a0, c1, c2, c3, zero);
        left = fold;
      }
    }
    const Acc last = chains_total<kChains>(a0, c1, c2, c3);
    for (int k = 0; k < K; ++k) out[k] = lane_sum(total[k] + last[k]);
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
  // Walked in runs of kMaxChainAdds periods, each run's sums folded into `total` (see kMaxChainAdds).
  alignas(64) A total[K * kMaxRowsPeriod];
  std::fill(total, total + K * P, A(0));
  const int64_t rows = tl.count(t), run = kMaxChainAdds * (P / C);
  for (int64_t r = 0; r < rows; r += run) {
    walk_rows<A>(tl, t * tl.block + r, std::min(run, rows - r), [=](auto tag, int64_t off, int64_t j) {
      add_chunk<K>(acc, P, contrib, arr, center, tag, j, off);  // by value: this loop stores
    });
    for (int64_t i = 0; i < K * P; ++i) total[i] += std::exchange(acc[i], A(0));
  }
  for (int k = 0; k < K; ++k) {
    for (int64_t j = 0, c = 0; j < P; ++j, c = c + 1 == C ? 0 : c + 1) out[k * C + c] += total[k * P + j];
  }
}

}  // namespace bnfused::cpu
