// The per-channel arrays (mean, scale, shift, ...) that the chunks of a tile read: broadcast once per
// plane tile, read per lane over rows, repeated over the period of a flat walk or put in pair order
// for 16-bit rows.
#pragma once

#include <array>
#include <type_traits>

#include "tiling.h"

namespace bnfused::cpu {

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

// Whether a pair's lanes hold its values out of order (bfloat16: lo the even ones, hi the odd ones;
// float16 in order).
template <typename T>
constexpr bool pairs_reorder() {
  return pair_value<T>(1) != 1;
}

// A (C,) array in pair order: out[j] = arr[j - j % (2 VW) + pair_value(j % (2 VW))], so that the
// lanes of the pair at place j (lo, then hi) read out[j .. j + 2 VW) in turn. Written as the even
// and odd values of each pair's block, a loop that vectorises (GCC 12 left the one above scalar,
// with a division per value: a quarter of the bfloat16 (2, 8192) backward's time).
template <typename T>
inline void pair_order_channels(const Tiling& tl, const acc_t<T>* arr, acc_t<T>* out) {
  constexpr int64_t VW = vec_width<acc_t<T>>();
  static_assert(pair_value<T>(1) == 2 && pair_value<T>(VW) == 1 && pair_value<T>(2 * VW - 1) == 2 * VW - 1,
                "pair_order_channels writes the bfloat16 pair order: lo the even values, hi the odd ones");
  for (int64_t b = 0; b < tl.L.c; b += 2 * VW) {
    for (int64_t i = 0; i < VW; ++i) {
      out[b + i] = arr[b + 2 * i];
      out[b + VW + i] = arr[b + 2 * i + 1];
    }
  }
}

// How an elementwise pass over tiling tl reads its per-channel arrays: as given, repeated over the
// period (tl.flat), or in pair order (rows_in_pairs, where pairs_reorder). arranged_size: the values
// of one arranged array (0: read as given); arrange_channels writes one.
template <typename T>
inline int64_t arranged_size(const Tiling& tl) {
  if constexpr (pairs_reorder<T>()) {
    if (rows_in_pairs<T>(tl)) return tl.L.c;
  }
  return tl.flat ? tl.period : 0;
}
template <typename T>
inline void arrange_channels(const Tiling& tl, const acc_t<T>* arr, acc_t<T>* out) {
  if constexpr (pairs_reorder<T>()) {
    if (!tl.flat) return pair_order_channels<T>(tl, arr, out);
  }
  repeat_channels(tl, arr, out);
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
// No arrays: the sums whose chunks read no per-channel values.
template <typename A>
constexpr ChannelArrays<A, 0> kNoArrays{};

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

}  // namespace bnfused::cpu
