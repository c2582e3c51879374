// The forward's statistics on the CPU: per-channel mean and M2 of x, each tile's partial moments
// around a shift near its mean, merged per channel in tile order (Chan et al.), recomputed exactly
// where the float sums cannot be trusted; `finish(c, Moments)` receives each channel's result.
// T is the tensor dtype; A = acc_t<T> (float or double) is the dtype of all arithmetic.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "tile_sums.h"
#include "two_pass.h"

namespace bnfused::cpu {

// A row or plane tile's one-sweep moments (below) are kept for a channel when its sum of squared
// deviations from its shift is at most this many times its M2, that is when the shift lies within one
// of the tile's standard deviations from the tile's mean; else the channel's mean and M2 are summed
// again around the tile's mean. Cancellation and the rounding of sum d (weighted by the shift's
// distance) then cost M2 a few times what the two-sweep sums' rounding does (invstd within about 1e-6
// in float32).
constexpr double kMaxShiftedLoss = 2.0;

// The values a one-sweep shift averages, out of count: 1, 2, 4 or 8.
inline int64_t shift_samples(int64_t count) { return count >= 8 ? 8 : count >= 4 ? 4 : count >= 2 ? 2 : 1; }

// The mean of value(0) .. value(k - 1) (k from shift_samples; scalars or vectors), summed pairwise as
// deviations from the first, times inv_k = 1 / k: exact when the values are equal, and finite wherever
// their differences are.
template <typename X, typename Value>
X mean_from_first(int64_t k, const Value& value, const X& inv_k) {
  const X first = value(0);
  X d[8];
  for (int64_t i = 0; i < k; ++i) d[i] = value(i) - first;
  for (int64_t half = k / 2; half >= 1; half /= 2) {
    for (int64_t i = 0; i < half; ++i) d[i] = d[2 * i] + d[2 * i + 1];
  }
  return first + d[0] * inv_k;
}

// The shift of a row tile's one-sweep moments: per channel, the mean of its first k = 1, 2, 4 or 8
// rows, summed pairwise as deviations from the first row. Exact for a constant channel (its
// deviations are 0) and finite wherever the rows' differences are; with 8 rows it lies within a
// third of a standard deviation of the tile's mean, typically. Into shift[0 .. W).
template <typename T>
void row_shift(const T* xp, const Tiling& tl, int64_t t, acc_t<T>* shift) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  constexpr int64_t VW = vec_width<A>();
  const int64_t rows = tl.count(t), W = tl.width();
  const int64_t k = shift_samples(rows);
  int64_t off[8];
  RowOffsets next_row(tl.L, t * tl.block);
  for (int64_t i = 0; i < k; ++i) off[i] = next_row();
  const V inv_k(A(1) / A(k));  // a power of two: exact
  const auto shift_of = [&](auto tag, int64_t c) {
    st(tag, shift + c, mean_from_first(k, [&](int64_t i) { return ld(tag, xp + off[i] + c); }, inv_k));
  };
  int64_t c = 0;
  for (; c + VW <= W; c += VW) shift_of(Full{}, c);
  if (c < W) shift_of(Part{W - c}, c);
}

// The shift of a plane tile's one-sweep moments: the mean of k = 1, 2, 4 or 8 of its values, summed
// pairwise as deviations from the first (exact for a constant tile). Value i lies in plane i * planes
// / k and at position i * len / k of it: spread over the planes and over the positions alike. (Value
// i * count / k of the tile in order fell on one position of every plane when the tile held a multiple
// of 8 planes, pixel (0, 0) of 4x4 to 32x32 ones: a border unlike the rest sent every tile of the
// channel to the second sweep.)
template <typename T>
acc_t<T> plane_shift(const T* xp, const Tiling& tl, int64_t t) {
  using A = acc_t<T>;
  const PlaneSpan p = tl.plane_span(t);
  const int64_t planes = p.n1 - p.n0, count = planes * p.len;
  const int64_t k = shift_samples(count);
  // k is a power of two: shifts, not divisions (18 of them took a sixth of the statistics of (2, 512,
  // 4, 4), a tile per channel of two 16-value planes)
  const int log2_k = k == 8 ? 3 : k == 4 ? 2 : k == 2 ? 1 : 0;
  const auto value = [&](int64_t i) {
    const int64_t n = p.n0 + ((i * planes) >> log2_k), s = p.s0 + ((i * p.len) >> log2_k);
    return static_cast<A>(xp[n * tl.L.sn + p.c * tl.L.sc + s * tl.es]);
  };
  return mean_from_first(k, value, A(1) / A(k));
}

// A tile's partial statistics per channel, kTileParts arrays of W values at part[t * kTileParts * W ..]:
// its mean rounded to A, its M2 (around the mean), and the mean's rounding error (mean - rounded, in
// A). Tiles are merged in double with the mean as that pair: the rounded means alone would put
// their rounding, half an ulp of |mean|, into the merged M2 at first order wherever |mean| >> std
// (float32 (64, 512) rows at |mean| = 1e3 std: invstd 1.1e-5 off, torch 1e-7; 1e4: 1.4e-4).
constexpr int64_t kTileParts = 3;

// The pair (rounded, rest) of a tile mean shift + deviation: their sum in A and its rounding error,
// in A's arithmetic (Fast2Sum: exact when |shift| >= |deviation|, as where |mean| >> std; otherwise
// |mean| is within a few deviations and so is its rounding). Computing the pair in double instead
// took the float32 statistics of (8, 2048, 7, 7) channels_last 10% longer (one thread: 35 000 channel
// means over its 17 tiles).
template <typename A>
inline void store_tile_mean(A shift, A deviation, A* rounded, A* rest) {
  const A sum = shift + deviation;
  *rounded = sum;
  *rest = deviation - (sum - shift);
}

// Tile t's three arrays within the partials (P is A, or const A where they are read).
template <typename P>
struct TilePartials {
  P* mean;
  P* m2;
  P* rest;
  TilePartials(P* part, int64_t t, int64_t W)
      : mean(part + t * kTileParts * W), m2(mean + W), rest(mean + 2 * W) {}
};

// The tiles' partials, uninitialised: tile_moments writes all of its tile's (zeroing them took 5% of
// the float32 (256, 2048) training forward's time, one thread).
template <typename A>
std::unique_ptr<A[]> tile_parts(const Tiling& tl) {
  return std::unique_ptr<A[]>(new A[tl.tiles * kTileParts * tl.width()]);
}

// Tile t's (mean, M2) of x for each of its `width()` channels, into part[t * kTileParts * W ..].
//
// Stable for |mean| >> std: every value is taken relative to a shift near its channel's mean. A row
// tile is read once, for the sums of the deviations from row_shift and of their squares (M2 = sum d^2
// - (sum d)^2 / n); channels whose shift is too far out (kMaxShiftedLoss) are summed again. The second
// read of every tile cost about a third of a read from memory (float32) to all of one (bfloat16,
// whose values are converted on each read). A plane tile likewise, around plane_shift, and summed
// again around its mean when that shift is too far out. batch_stats alone, AVX2
// EPYC, 1 thread, two sweeps -> one: bfloat16 (32, 64, 56, 56) 2.92-3.09 -> 2.13-2.17 ms, float32
// 2.83-2.96 -> 2.33-2.41; (128, 256, 14, 14) bfloat16 3.76-3.97 -> 2.73-2.95, float32 3.93-4.09 ->
// 3.31-3.39 (with PlaneStreams' prefetch too: bfloat16 2.04-2.06, float32 2.61-2.71). AVX512 builds
// summed plane tiles twice until 21ba234 (the mean's deviations from the tile's first value, then the
// squares around that mean, which kept the first value's rounding in the mean); one sweep there, Zen
// 5, batch_stats alone, 1 thread: float32 (128, 256, 14, 14) 1.42-1.49 -> 1.25-1.28 ms, bfloat16
// 0.57-0.60 -> 0.41-0.55. Rows wider than kMaxRowsPeriod (not flat) are summed twice: around their
// first row, then sums_around_means.
template <typename T>
void tile_moments(const T* xp, const Tiling& tl, int64_t t, acc_t<T>* part) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  const int64_t W = tl.width();
  const TilePartials<A> tile(part, t, W);
  A* tile_mean = tile.mean;
  A* tile_m2 = tile.m2;  // follows tile_mean: tile_sums<2> below writes both as one array of 2W
  A* tile_mean_rest = tile.rest;
  const int64_t first = tl.first_offset(t);
  // The flat walk over rows takes its centre repeated over the period (see tile_sums).
  alignas(64) A repeated[kMaxRowsPeriod];
  auto centered = [=](auto tag, int64_t off, const V& center) { return ld(tag, xp + off) - center; };
  const double count = double(tl.count(t));
  const A inv_count = A(1) / A(tl.count(t));
  // The second sweep, around the first sweep's rounded means: sums of d = x - rounded and of d^2,
  // then the mean rounded + sum d / count (as its pair) and M2 = sum d^2 - (sum d)^2 / count. The
  // first sweep's mean, from deviations around a shift that may lie far out, carries that shift's
  // rounding (sum d's error grows with the distance: 1000 standard deviations out, 1e-5 to 2e-4 of
  // the mean in float32); the second sweep's sum d, around a centre within rounding of the mean,
  // takes it out.
  std::unique_ptr<A[]> wide_centre;  // the centres of rows wider than `repeated`
  auto sums_around_means = [&] {
    A* centre = repeated;
    if (tl.flat) {
      repeat_channels(tl, tile_mean, repeated);
    } else {
      if (W > kMaxRowsPeriod) {
        if (!wide_centre) wide_centre.reset(new A[W]);
        centre = wide_centre.get();
      }
      std::copy(tile_mean, tile_mean + W, centre);
    }
    std::fill(tile_mean, tile_mean + 2 * W, A(0));  // tile_sums<2> writes sum d there, sum d^2 to tile_m2
    tile_sums<2, has_pairs<T>()>(
        tl, t, centre, kNoArrays<A>,
        [=](auto tag, int64_t off, const V& c, auto) {
          const V d = centered(tag, off, c);
          return contributions(d, V(d * d));
        },
        tile_mean);
    for (int64_t j = 0; j < W; ++j) {
      const double sum_d = tile_mean[j], squares = tile_m2[j];
      tile_m2[j] = static_cast<A>(squares - sum_d * sum_d / count);
      store_tile_mean(centre[j], static_cast<A>(sum_d) * inv_count, tile_mean + j, tile_mean_rest + j);
    }
  };
  if (tl.rows && (tl.flat || W <= kMaxRowsPeriod)) {
    A* shift = repeated;  // repeated[c] is channel c's shift, flat or not
    row_shift(xp, tl, t, tl.flat ? tile_mean : shift);
    if (tl.flat) repeat_channels(tl, tile_mean, repeated);
    std::fill(tile_mean, tile_mean + 2 * W, A(0));
    tile_sums<2>(
        tl, t, shift, kNoArrays<A>,
        [=](auto tag, int64_t off, const V& c, auto) {
          const V d = centered(tag, off, c);
          return contributions(d, V(d * d));
        },
        tile_mean);
    const int64_t rows = tl.count(t);
    // One vectorised loop over the channels turns the sums into the tile's moments and flags the
    // channels whose shift is too far out (one loop with a branch per channel was a scalar division per
    // channel and tile, about a tenth of the sums' time: float32 (128, 256, 14, 14) channels_last); the
    // flagged ones are then listed eight flags at a time (testing every channel again, one by one up
    // to the last far one, was about 40% of this function's time at 2048 channels).
    // Also true for NaN sums; an infinite M2 is left to needs_exact_moments.
    const auto is_far = [](double squares, double m2) { return !(squares <= kMaxShiftedLoss * m2); };
    alignas(64) uint8_t far_flag[kMaxRowsPeriod + 8];
    int64_t n_far = 0;
    {
      A* __restrict means = tile_mean;
      A* __restrict m2s = tile_m2;
      A* __restrict rests = tile_mean_rest;
      const A* __restrict shifts = shift;
      uint8_t* __restrict flags = far_flag;
      for (int64_t j = 0; j < W; ++j) {
        const double sum_d = means[j], squares = m2s[j];
        // Divided, not multiplied by 1 / rows: the product moves a float64 M2 by an ulp or so.
        const double m2 = squares - sum_d * sum_d / double(rows);
        const uint8_t f = is_far(squares, m2) ? 1 : 0;
        flags[j] = f;
        n_far += f;
        m2s[j] = static_cast<A>(m2);
        store_tile_mean(shifts[j], static_cast<A>(sum_d) * inv_count, means + j, rests + j);
      }
    }
    // A few such channels (one in 200 for normal data) are summed again one by one, in double; more
    // (rows whose first values are alike, as neighbouring pixels are) cost less as one more sweep.
    const bool sweep = n_far * 16 > W || n_far > 16;
    int64_t far[16], n_listed = 0;  // the channels whose shift is too far out, when not swept
    if (!sweep && n_far > 0) {
      std::fill(far_flag + W, far_flag + W + 8, uint8_t(0));
      for (int64_t j0 = 0; j0 < W && n_listed < n_far; j0 += 8) {
        uint64_t word;  // the flags of channels j0 .. j0 + 7, zero when none is far
        std::memcpy(&word, far_flag + j0, sizeof(word));
        if (word == 0) continue;
        for (int64_t j = j0; j < j0 + 8; ++j) {
          if (far_flag[j]) far[n_listed++] = j;
        }
      }
    }
    if (sweep) {
      sums_around_means();
      return;
    }
    for (int64_t i = 0; i < n_listed; ++i) {  // as sums_around_means, one channel in double
      const int64_t j = far[i];
      const A centre = tile_mean[j];
      double sum_d = 0, q = 0;
      RowOffsets next_row(tl.L, t * tl.block);
      for (int64_t r = rows; r > 0; --r) {
        const double d = double(static_cast<A>(xp[next_row() + j])) - double(centre);
        sum_d += d;
        q += d * d;
      }
      tile_m2[j] = static_cast<A>(q - sum_d * sum_d / count);
      store_tile_mean(centre, static_cast<A>(sum_d / count), tile_mean + j, tile_mean_rest + j);
    }
    return;
  }
  if (!tl.rows) {
    // One sweep around `centre`: the tile's mean (as its pair) and M2; false when the centre lies too
    // far out for M2.
    const auto sweep = [&](A centre, const PlaneStreams& streams) {
      tile_mean[0] = tile_m2[0] = A(0);  // W == 1: tile_sums<2> writes both
      tile_sums<2, has_pairs<T>()>(
          tl, t, &centre, kNoArrays<A>,
          [=](auto tag, int64_t off, const V& c, auto) {
            const V d = centered(tag, off, c);
            return contributions(d, V(d * d));
          },
          tile_mean, streams);
      const double sum_d = tile_mean[0], squares = tile_m2[0];
      const double m2 = squares - sum_d * sum_d / count;
      tile_m2[0] = static_cast<A>(m2);
      store_tile_mean(centre, static_cast<A>(sum_d) * inv_count, tile_mean, tile_mean_rest);
      return squares <= kMaxShiftedLoss * m2;
    };
    // A shift too far out costs the mean its rounding too (sum d's error grows with the distance):
    // both are summed again, around the mean, from cache.
    if (!sweep(plane_shift(xp, tl, t), PlaneStreams::of(xp))) sweep(tile_mean[0], PlaneStreams{});
    return;
  }
  // Rows wider than kMaxRowsPeriod, not walked flat: the first row is the shift of a first sweep for
  // the means alone, then sums_around_means.
  for (int64_t j = 0; j < W; ++j) tile_mean[j] = static_cast<A>(xp[first + j]);  // the shift
  std::fill(tile_m2, tile_m2 + W, A(0));
  tile_sums<1, has_pairs<T>()>(
      tl, t, tile_mean, kNoArrays<A>,
      [=](auto tag, int64_t off, const V& c, auto) { return contributions(V(centered(tag, off, c))); },
      tile_m2, PlaneStreams::of(xp));
  for (int64_t j = 0; j < W; ++j) {
    store_tile_mean(tile_mean[j], tile_m2[j] * inv_count, tile_mean + j, tile_mean_rest + j);
  }
  sums_around_means();
}

// Chan et al.'s pairwise update of a running (n, mean, M2) by a tile's (nb, mean_b, M2_b), in
// double: with delta = mean_b - mean, mean += delta * nb / (n + nb) and M2 += M2_b + delta^2 * n * nb /
// (n + nb). The two weights depend on the counts alone, the same for every channel of a tile:
// computed once per tile, they leave the channels' updates without a division (a merge of 256
// channels over 392 tiles was bound by its two divisions per channel and tile, about 0.1 ms).
// mean_b comes as its pair (rounded, rest; kTileParts), the rest added to the difference: for float64
// tiles, adding it to the rounded mean first would round it away.
struct ChanStep {
  double mean_weight;  // nb / (n + nb)
  double m2_weight;    // n * nb / (n + nb)
  ChanStep(double n, double nb) : mean_weight(nb / (n + nb)), m2_weight(n * mean_weight) {}
  void apply(double& mu, double& q, double tile_mean, double tile_mean_rest, double tile_m2) const {
    const double delta = (tile_mean - mu) + tile_mean_rest;
    mu += delta * mean_weight;
    q += tile_m2 + delta * delta * m2_weight;
  }
};

// Channel c's (mean, M2) from its tiles' triples, merged in double with Chan et al.'s pairwise
// update (ChanStep), in tile order.
template <typename A>
std::pair<double, double> merged_moments(const Tiling& tl, const A* part, int64_t c) {
  const int64_t W = tl.width();
  double n = 0, mu = 0, q = 0;
  tl.for_channel_tiles(c, [&](int64_t t, int64_t j) {
    const double nb = double(tl.count(t));
    const TilePartials<const A> tile(part, t, W);
    ChanStep(n, nb).apply(mu, q, double(tile.mean[j]), double(tile.rest[j]), double(tile.m2[j]));
    n += nb;
  });
  return {mu, q};
}

// merged_moments for channels c0 .. c1 - 1 of a rows tiling, where each channel has the same tiles.
// Channel by channel, a merge is a chain of dependent updates, one per tile: 256 channels over the 392
// tiles of a (128, 256, 14, 14) channels_last tensor took about a millisecond. Here the tiles are
// outermost, so that the channels' independent updates overlap (and vectorise), with the same
// operations in the same order per channel: the same bits. Ranges of channels may be merged
// concurrently (two_pass's finish).
class RowMomentMerge {
 public:
  explicit RowMomentMerge(const Tiling& tl) : mu_(tl.rows ? tl.width() : 0), q_(tl.rows ? tl.width() : 0) {}
  template <typename A>
  void merge(const Tiling& tl, const A* part, int64_t c0, int64_t c1) {
    const int64_t W = tl.width();
    double* mu = mu_.data();
    double* q = q_.data();
    std::fill(mu + c0, mu + c1, 0.0);
    std::fill(q + c0, q + c1, 0.0);
    double n = 0;
    for (int64_t t = 0; t < tl.tiles; ++t) {
      const double nb = double(tl.count(t));
      const ChanStep step(n, nb);
      const TilePartials<const A> tile(part, t, W);
      for (int64_t j = c0; j < c1; ++j) {
        step.apply(mu[j], q[j], double(tile.mean[j]), double(tile.rest[j]), double(tile.m2[j]));
      }
      n += nb;
    }
  }
  std::pair<double, double> operator[](int64_t c) const { return {mu_[c], q_[c]}; }

 private:
  std::vector<double> mu_, q_;
};

// A channel's statistics: its mean, and its sum of squared deviations m2 * unscale^2 (unscale is a
// power of two, 1 unless exact_moments had to scale the values to keep their squares in range).
struct Moments {
  double mean, m2, unscale = 1.0;
};

// True when the tile sums in A cannot be trusted: they overflowed (finite values of magnitude ~1e19
// and up square past float's range, ~1e155 past double's; a tile's sum of values ~1e34 overflows), or
// the input holds inf/NaN, or the variance is so small that A's squares were subnormal (and lost
// their precision: it matters once eps is as small). Never true for a constant channel (m2 == 0).
template <typename A>
bool needs_exact_moments(double mean, double m2, int64_t count) {
  constexpr double kTinyVar = std::is_same_v<A, float> ? 1e-30 : 1e-290;
  return !std::isfinite(mean) || !std::isfinite(m2) || (m2 > 0 && m2 < kTinyVar * double(count));
}

// Channel c's moments in double from values scaled by a power of two (exact) that brings the
// largest finite |x| near 1, so that no square overflows or underflows. Non-finite values propagate
// as in torch: a +inf gives mean inf and m2 NaN.
template <typename T>
Moments exact_moments(const T* xp, const Tiling& tl, int64_t c) {
  double amax = 0;
  for_channel_values(tl, c, [&](int64_t off) {
    const double a = std::abs(double(xp[off]));
    if (std::isfinite(a) && a > amax) amax = a;
  });
  const int e = amax > 0 ? std::clamp(std::ilogb(amax), -1000, 1000) : 0;
  const double scale = std::ldexp(1.0, -e), unscale = std::ldexp(1.0, e);
  double sum = 0;
  for_channel_values(tl, c, [&](int64_t off) { sum += double(xp[off]) * scale; });
  const double mean = sum / double(tl.L.per_channel());
  double m2 = 0;
  for_channel_values(tl, c, [&](int64_t off) {
    const double d = double(xp[off]) * scale - mean;
    m2 += d * d;
  });
  return {mean * unscale, m2, unscale};
}

// finish(c, Moments) for channels c0 .. c1 - 1 from the tiles' partials (two_pass's finish step):
// merged in double, or recomputed exactly where the float sums cannot be trusted.
template <typename T, typename Finish>
void finish_channels(const T* xp, const Tiling& tl, const acc_t<T>* part, RowMomentMerge& rows, int64_t c0,
                     int64_t c1, const Finish& finish) {
  if (tl.rows) rows.merge(tl, part, c0, c1);
  const int64_t count = tl.L.per_channel();
  for (int64_t c = c0; c < c1; ++c) {
    const auto [mean_c, m2_c] = tl.rows ? rows[c] : merged_moments(tl, part, c);
    finish(c, needs_exact_moments<acc_t<T>>(mean_c, m2_c, count) ? exact_moments(xp, tl, c) : Moments{mean_c, m2_c});
  }
}

// The forward's statistics over tl's tiles: finish(c, Moments) for each channel (see channel_stats).
template <typename T, typename Finish>
void tile_stats(const T* xp, const Tiling& tl, const Finish& finish) {
  using A = acc_t<T>;
  const auto part = tile_parts<A>(tl);
  RowMomentMerge rows(tl);
  two_pass(
      tl, sizeof(T), true, false, [&](int64_t t) { tile_moments(xp, tl, t, part.get()); },
      [&](int64_t c0, int64_t c1) { finish_channels(xp, tl, part.get(), rows, c0, c1, finish); }, [](int64_t) {});
}

// channel_stats over contiguous planes shorter than a vector (short_flat_planes), where a tile of
// one channel's planes sums a partial vector per plane, at C * S values from the next: the tensor is
// taken instead as N rows of C * S positions, walked as channels_last rows are (a position per lane,
// whole vectors), in two sweeps, as plane tiles are summed:
//   1. per row tile and position, a shift near the tile's mean (row_shift: exactly the value of a
//      constant channel) and the sum of the deviations from it; each channel's mean in double from
//      these, tile by tile and position by position in a fixed order (the same for any thread count);
//   2. per row tile and position, the sum of squared deviations from the channel's mean rounded to A;
//      M2 = their sum (in double) less count * (mean - rounded mean)^2.
// Merging the positions' own (mean, M2) with Chan's update instead put the rounding of each position's
// mean, a few ulps of |mean|, into M2 at first order: invstd 1e-5 off at |mean| = 1000 std.
// A channel whose sums are not finite, or whose variance is tiny, takes exact_moments.
// Training forward through the layer (bench_kernels, time over torch's, two runs each), channel tiles
// (6351a50) -> positions (9709e0b), float32, 1 / 2 threads: (16, 256, 2, 2) 0.88 -> 0.44-0.45 /
// 1.15-1.30 -> 0.56 (a tensor under kMinTaskValues runs on one thread, where ATen takes two); (64,
// 512, 2, 2) 0.68-0.89 -> 0.31 / 0.70-0.90 -> 0.43-0.44; (16, 96, 3, 3) 0.63-0.64 -> 0.47 / 0.67-0.85 ->
// 0.54; (4, 96, 2, 2) 0.90-0.94 -> 0.71 / 0.79-0.82 -> 0.61; bfloat16 (16, 256, 2, 2) 0.61-0.63 -> 0.29 /
// 0.89-1.03 -> 0.43-0.44.
// At most this many rows per tile of positions: each lane's float sums then add at most this many
// values (the plane tiles' four chains added about as many) before they are taken to double. Tiles
// of up to 65536 values (the sequential walks' row tiles) left invstd 1.4e-5 off float64 on
// (300000, 1, 2, 2) at 1e5 standard deviations from zero (4e-6 with the plane tiles).
constexpr int64_t kMaxPositionRows = 256;

// The row tiling of short_plane_stats: N rows of C * S positions, in the tiles of the sequential walk
// (walk_order.h) capped at kMaxPositionRows rows, whichever walk is set: the same tiles and sums, so
// the same bits, under either walk. (Register blocks and tiles of kTileValues, the blocked walk's,
// took the float32 (512, 256, 3, 3) training forward from 0.28 to 0.40-0.42 of ATen's time, 1 thread.)
inline Tiling short_plane_positions(const Ncs& L) {
  const int64_t W = L.c * L.s;
  Tiling pos = Tiling::of(Ncs{L.n, W, 1, W, 1, 1});
  pos.sequential_rows = true;
  const int64_t block = std::max(kTileValues / W, std::min(kSequentialRowTileValues / W, L.n / kMinRowTiles));
  pos.block = std::clamp<int64_t>(block, 1, kMaxPositionRows);
  if (pos.flat) {  // whole periods, as Tiling::of makes them
    const int64_t q = pos.period / W;
    pos.block = (pos.block + q - 1) / q * q;
  }
  pos.tiles = (L.n + pos.block - 1) / pos.block;
  return pos;
}

template <typename T, typename Finish>
void short_plane_stats(const T* xp, const Tiling& tl, const Finish& finish) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  const Ncs& L = tl.L;
  const int64_t S = L.s, W = L.c * S;
  const Tiling pos = short_plane_positions(L);
  const auto sum_around = [&](int64_t t, const A* centre, auto square, A* out) {
    tile_sums<1>(
        pos, t, centre, kNoArrays<A>,
        [=](auto tag, int64_t off, const V& c, auto) {
          const V d = ld(tag, xp + off) - c;
          if constexpr (decltype(square)::value) return contributions(V(d * d));
          else return contributions(d);
        },
        out);
  };
  // Sweep 1, per tile: each channel's reference (its first position's shift) and the sum of its
  // values' deviations from it, in double.
  const int64_t C = L.c;
  std::vector<A> refs(pos.tiles * C);
  std::vector<double> deviations(pos.tiles * C);
  parallel_tiles(pos, [&](int64_t t) {
    std::vector<A> shift(W), repeated(pos.flat ? pos.period : 0), sums(W, A(0));
    row_shift(xp, pos, t, shift.data());
    if (pos.flat) repeat_channels(pos, shift.data(), repeated.data());
    sum_around(t, pos.flat ? repeated.data() : shift.data(), std::false_type{}, sums.data());
    const double rows = double(pos.count(t));
    for (int64_t c = 0, j = 0; c < C; ++c) {
      const A ref = shift[c * S];
      double d = 0;
      for (int64_t s = 0; s < S; ++s, ++j) d += (double(shift[j]) - double(ref)) * rows + double(sums[j]);
      refs[t * C + c] = ref;
      deviations[t * C + c] = d;
    }
  });
  // Each channel's mean as its first reference plus the mean deviation from it: exactly the value of
  // a constant channel.
  const double count = double(L.per_channel());
  std::vector<double> mean(C);
  std::vector<A> centre(W);
  for (int64_t c = 0; c < C; ++c) {
    const double first = double(refs[c]);
    double d = 0;
    for (int64_t t = 0; t < pos.tiles; ++t) {
      d += (double(refs[t * C + c]) - first) * double(pos.count(t) * S) + deviations[t * C + c];
    }
    mean[c] = first + d / count;
    std::fill_n(centre.begin() + c * S, S, static_cast<A>(mean[c]));
  }
  // Sweep 2, per tile: each channel's sum of squared deviations from its mean rounded to A, in double.
  std::vector<A> repeated_centre(pos.flat ? pos.period : 0);
  if (pos.flat) repeat_channels(pos, centre.data(), repeated_centre.data());
  const A* centre_walk = pos.flat ? repeated_centre.data() : centre.data();
  std::vector<double> squares(pos.tiles * C);
  parallel_tiles(pos, [&](int64_t t) {
    std::vector<A> out(W, A(0));
    sum_around(t, centre_walk, std::true_type{}, out.data());
    for (int64_t c = 0, j = 0; c < C; ++c) {
      double q = 0;
      for (int64_t s = 0; s < S; ++s, ++j) q += double(out[j]);
      squares[t * C + c] = q;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double q = 0;
    for (int64_t t = 0; t < pos.tiles; ++t) q += squares[t * C + c];
    const double off = mean[c] - double(centre[c * S]);
    double m2 = q - count * off * off;
    if (m2 < 0) m2 = 0;  // (a NaN stays NaN, for needs_exact_moments)
    finish(c, needs_exact_moments<A>(mean[c], m2, L.per_channel()) ? exact_moments(xp, tl, c) : Moments{mean[c], m2});
  }
}

// The forward's statistics alone: finish(c, Moments) for each channel (batch_stats, and the training
// forward before a separate normalisation). The same reduction as stats_then_normalize's, without
// instantiating any normalisation.
template <typename T, typename Finish>
void channel_stats(const T* xp, const Tiling& tl, const Finish& finish) {
  if (short_flat_planes<T>(tl)) {
    short_plane_stats(xp, tl, finish);
  } else {
    tile_stats(xp, tl, finish);
  }
}

}  // namespace bnfused::cpu
