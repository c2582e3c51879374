// The CPU forward kernels of BatchNorm, written once per tile (tiling.h, tile_chunks.h, tile_sums.h) and
// scheduled by two_pass: per-channel mean and M2 (tile_moments, merged in tile order), then
// y = act((x - mean) * scale + shift (+ residual)); and the one-pass schedules of that normalisation
// alone (normalize: eval, the normalize op, and with sequential walks (walk_order.h) the 16-bit
// training forward over short planes, see stats_then_normalize). The op wrappers
// (forward_train.cpp, forward_eval.cpp) supply `finish(c, Moments)`, which turns channel c's merged
// moments into its coefficients before any of its values are written.
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

#include "elementwise.h"
#include "tile_sums.h"
#include "two_pass.h"

namespace bnfused::cpu {

// A row tile's one-sweep moments (below) are kept for a channel when its sum of squared deviations
// from its shift is at most this many times its M2, that is when the shift lies within one of the
// tile's standard deviations from the tile's mean; else the channel's M2 is summed again around the
// tile's mean. Cancellation and the rounding of sum d (weighted by the shift's distance) then cost
// M2 a few times what the two-sweep sums' rounding does (invstd within about 1e-6 in float32).
constexpr double kMaxShiftedLoss = 2.0;

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
  const int64_t k = rows >= 8 ? 8 : rows >= 4 ? 4 : rows >= 2 ? 2 : 1;
  int64_t off[8];
  RowOffsets next_row(tl.L, t * tl.block);
  for (int64_t i = 0; i < k; ++i) off[i] = next_row();
  const V inv_k(A(1) / A(k));  // a power of two: exact
  const auto shift_of = [&](auto tag, int64_t c) {
    const V first = ld(tag, xp + off[0] + c);
    V d[8];
    for (int64_t i = 0; i < k; ++i) d[i] = ld(tag, xp + off[i] + c) - first;
    for (int64_t half = k / 2; half >= 1; half /= 2) {
      for (int64_t i = 0; i < half; ++i) d[i] = d[2 * i] + d[2 * i + 1];
    }
    st(tag, shift + c, V(first + d[0] * inv_k));
  };
  int64_t c = 0;
  for (; c + VW <= W; c += VW) shift_of(Full{}, c);
  if (c < W) shift_of(Part{W - c}, c);
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
// Stable for |mean| >> std: every value is taken relative to a shift near its channel's mean. A plane
// tile is summed twice while it sits in cache, first the mean of the deviations from the shift (the
// tile's first value), then the squared deviations from that mean. A row tile is read once, for the
// sums of the deviations from row_shift and of their squares (M2 = sum d^2 - (sum d)^2 / n); channels
// whose shift is too far out (kMaxShiftedLoss) are summed again. The second read of
// every tile cost about a third of a read from memory (float32) to all of one (bfloat16, whose values
// are converted on each read). Planes keep two sweeps: the one-sweep sums are two chains of dependent
// adds where the mean's sweep runs four.
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
  // Squares are taken around the rounded mean: sum (x - rounded)^2 = M2 + count * rest^2.
  auto squares_around_means = [&] {
    if (tl.flat) repeat_channels(tl, tile_mean, repeated);
    std::fill(tile_m2, tile_m2 + W, A(0));
    tile_sums<1>(
        tl, t, tl.flat ? repeated : tile_mean, kNoArrays<A>,
        [=](auto tag, int64_t off, const V& c, auto) {
          const V d = centered(tag, off, c);
          return contributions(V(d * d));
        },
        tile_m2);
    for (int64_t j = 0; j < W; ++j) {
      const double rest = tile_mean_rest[j];
      tile_m2[j] = static_cast<A>(double(tile_m2[j]) - count * rest * rest);
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
      squares_around_means();
      return;
    }
    for (int64_t i = 0; i < n_listed; ++i) {
      const int64_t j = far[i];
      double q = 0;
      RowOffsets next_row(tl.L, t * tl.block);
      for (int64_t r = rows; r > 0; --r) {
        const double d = double(static_cast<A>(xp[next_row() + j])) - double(tile_mean[j]);
        q += d * d;
      }
      const double rest = tile_mean_rest[j];
      tile_m2[j] = static_cast<A>(q - count * rest * rest);
    }
    return;
  }
  for (int64_t j = 0; j < W; ++j) tile_mean[j] = static_cast<A>(xp[first + j]);  // the shift
  const A* center = tl.flat ? repeated : tile_mean;
  if (tl.flat) repeat_channels(tl, tile_mean, repeated);
  std::fill(tile_m2, tile_m2 + W, A(0));
  tile_sums<1>(
      tl, t, center, kNoArrays<A>,
      [=](auto tag, int64_t off, const V& c, auto) { return contributions(V(centered(tag, off, c))); },
      tile_m2);
  for (int64_t j = 0; j < W; ++j) {
    store_tile_mean(tile_mean[j], tile_m2[j] * inv_count, tile_mean + j, tile_mean_rest + j);
  }
  squares_around_means();
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

// y = epi((x - mean[c]) * scale[c] + shift[c]) on tile t. Subtracting the mean first keeps the
// result exact when |mean| >> std (folding it into the shift would cancel catastrophically). The
// arrays as arranged for tl (arranged_size, arrange_channels), when it asks for an arrangement.
template <typename T, typename Epi>
void normalize_tile(const T* xp, T* yp, const Tiling& tl, int64_t t, const acc_t<T>* mean, const acc_t<T>* scale,
                    const acc_t<T>* shift, const Epi& epi) {
  const bool stream = tile_streams_output<T>(tl);
  const ChannelArrays<acc_t<T>, 3> arrays{mean, scale, shift};
  tile_chunks<acc_t<T>, has_pairs<T>()>(
      tl, t, arrays,
      [=](auto tag, int64_t off, auto coef) {
        auto y = [&](auto part) {  // part: the chunk's tag, or one register of a pair
          const auto& cf = coef.at(part);
          return epi(part, off, at::vec::fmadd(ld(part, xp + off) - cf(kMean), cf(kScale), cf(kShift)));
        };
        if constexpr (std::is_same_v<decltype(tag), Pair>) {
          st_pair(yp + off, y(PairLo{}), y(PairHi{}), stream);
        } else {
          st_out(tag, yp + off, y(tag), stream);
        }
      },
      stream, rows_in_pairs<T>(tl));
  stream_fence(stream);
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

template <typename T>
void normalize(const T* xp, const Tiling& tl, const acc_t<T>* mean, const acc_t<T>* scale, const acc_t<T>* shift,
               int64_t act, double slope, const T* rp, T* yp);

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
    const bool in_order =
        plane_bytes <= kShortPlaneBytes || tl.L.numel() * int64_t(sizeof(T)) >= kLongPlanesInOrderBytes;
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
  const int64_t P = arranged_size<T>(tl);
  std::vector<A> arranged(3 * P);
  const A* m = P ? arranged.data() : mean;
  const A* k = P ? m + P : scale;
  const A* b = P ? k + P : shift;
  auto reduce = [&](int64_t t) { tile_moments(xp, tl, t, part.get()); };
  RowMomentMerge rows(tl);
  auto merge = [&](int64_t c0, int64_t c1) { finish_channels(xp, tl, part.get(), rows, c0, c1, finish); };
  auto arrange = [&] {
    if (!P) return;
    arrange_channels<T>(tl, mean, arranged.data());
    arrange_channels<T>(tl, scale, arranged.data() + P);
    arrange_channels<T>(tl, shift, arranged.data() + 2 * P);
  };
  with_epilogue(act, slope, rp, [&](const auto& epi) {
    two_pass(tl, sizeof(T), true, true, reduce, merge,
             [&](int64_t t) { normalize_tile(xp, yp, tl, t, m, k, b, epi); }, 0, arrange);
  });
}


// normalize_tile over short planes, in memory order (see planes_in_memory_order).
template <typename T, typename Epi>
void normalize_planes(const T* xp, T* yp, const Tiling& tl, const acc_t<T>* mean, const acc_t<T>* scale,
                      const acc_t<T>* shift, const Epi& epi) {
  using V = VecA<T>;
  const bool stream = streams_output<T>(tl);
  parallel_planes(tl, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % tl.L.c;
      const V m(mean[c]), k(scale[c]), b(shift[c]);
      walk_run<acc_t<T>, has_pairs<T>()>(
          plane_offset(tl, p), tl.L.s, tl.es,
          [=](auto tag, int64_t off) {
            auto y = [&](auto part) { return epi(part, off, at::vec::fmadd(ld(part, xp + off) - m, k, b)); };
            if constexpr (std::is_same_v<decltype(tag), Pair>) {
              st_pair(yp + off, y(PairLo{}), y(PairHi{}), stream);
            } else {
              st_out(tag, yp + off, y(tag), stream);
            }
          },
          stream);
    }
    stream_fence(stream);
  });
}

// True when x is contiguous (N, C, S) with planes of at least one vector: normalize_flat applies.
template <typename T>
inline bool flat_planes(const Tiling& tl) {
  return tl.contiguous_planes() && tl.L.s >= vec_width<acc_t<T>>();
}

// normalize_planes over a contiguous tensor, walked flat in whole vectors: a vector that straddles
// two planes takes each lane's coefficients from its own plane's channel (at most one boundary per
// vector, since planes hold at least one vector). Every store but the tensor's last is a whole,
// aligned vector that can stream, where a plane-by-plane walk pays a partial vector at both ends
// of each plane (196 values: 12 whole vectors and two partial ones). Each lane computes what
// normalize_tile computes for its value: the results are the same bits.
template <typename T, typename Epi>
void normalize_flat(const T* xp, T* yp, const Tiling& tl, const acc_t<T>* mean, const acc_t<T>* scale,
                    const acc_t<T>* shift, const Epi& epi) {
  using A = acc_t<T>;
  using V = VecA<T>;
  constexpr int64_t VW = vec_width<A>();
  const int64_t S = tl.L.s, C = tl.L.c, total = tl.L.numel();
  const bool stream = streams_output<T>(tl);
  const V lane = V::arange(A(0), A(1));
  at::parallel_for(0, (total + VW - 1) / VW, std::max<int64_t>(1, kMinTaskValues / VW), [&](int64_t v0, int64_t v1) {
    int64_t i = v0 * VW, p = i / S;
    int64_t left = (p + 1) * S - i;  // values of plane p from i on
    int64_t c = p % C;
    V m(mean[c]), k(scale[c]), b(shift[c]);
    auto apply = [=](auto tag, int64_t off, const V& mv, const V& kv, const V& bv) {
      st_out(tag, yp + off, epi(tag, off, at::vec::fmadd(ld(tag, xp + off) - mv, kv, bv)), stream);
    };
    const int64_t end = std::min(v1 * VW, total);
    // 16-bit values go by pairs of vectors (see ld_pair) while whole pairs remain, then by vectors.
    // Planes of at least a pair hold at most one boundary per pair.
    if constexpr (has_pairs<T>()) {
      if (S >= 2 * VW) {
        const auto [index_lo, index_hi] = pair_index<T>();
        auto apply_pair = [=](int64_t off, const V& m_lo, const V& k_lo, const V& b_lo, const V& m_hi, const V& k_hi,
                              const V& b_hi) {
          V lo, hi;
          ld_pair(xp + off, lo, hi);
          const V y_lo = epi(PairLo{}, off, at::vec::fmadd(lo - m_lo, k_lo, b_lo));
          const V y_hi = epi(PairHi{}, off, at::vec::fmadd(hi - m_hi, k_hi, b_hi));
          st_pair(yp + off, y_lo, y_hi, stream);
        };
        for (; end - i >= 2 * VW; i += 2 * VW) {
          if (left > 2 * VW) {  // inside plane p
            apply_pair(i, m, k, b, m, k, b);
            left -= 2 * VW;
            continue;
          }
          c = c + 1 == C ? 0 : c + 1;
          const V m_next(mean[c]), k_next(scale[c]), b_next(shift[c]);
          if (left == 2 * VW) {
            apply_pair(i, m, k, b, m, k, b);
          } else {
            const V first_lo = index_lo < V(A(left)), first_hi = index_hi < V(A(left));
            apply_pair(i, V::blendv(m_next, m, first_lo), V::blendv(k_next, k, first_lo),
                       V::blendv(b_next, b, first_lo), V::blendv(m_next, m, first_hi),
                       V::blendv(k_next, k, first_hi), V::blendv(b_next, b, first_hi));
          }
          m = m_next;
          k = k_next;
          b = b_next;
          left += S - 2 * VW;
        }
      }
    }
    while (i < end) {
      // The whole vectors inside plane p (with at least one of its values after them) in a loop of
      // their own, without the checks below.
      const int64_t inside = std::min((left - 1) / VW, (end - i) / VW);
      for (const int64_t stop = i + inside * VW; i < stop; i += VW) apply(Full{}, i, m, k, b);
      left -= inside * VW;
      if (i >= end) break;
      const int64_t n = std::min(VW, total - i);
      if (left > VW) {  // the tensor's partial last vector, inside plane p
        apply(Part{n}, i, m, k, b);
        break;
      }
      // Plane p ends at lane `left`; the lanes after it (if any) open plane p + 1.
      c = c + 1 == C ? 0 : c + 1;
      const V m_next(mean[c]), k_next(scale[c]), b_next(shift[c]);
      if (left == VW) {
        n == VW ? apply(Full{}, i, m, k, b) : apply(Part{n}, i, m, k, b);
      } else {
        const V first = lane < V(A(left));
        const V mv = V::blendv(m_next, m, first), kv = V::blendv(k_next, k, first), bv = V::blendv(b_next, b, first);
        n == VW ? apply(Full{}, i, mv, kv, bv) : apply(Part{n}, i, mv, kv, bv);
      }
      m = m_next;
      k = k_next;
      b = b_next;
      left += S - VW;
      i += VW;
    }
    stream_fence(stream);
  });
}

// y = epi((x - m[j]) * k[j] + b[j]) over x walked flat as a whole, in parallel over vectors, where
// value i takes the coefficients at j = i % period (m, k, b: the channels' coefficients repeated
// over the period). Each lane computes what normalize_tile computes for its value: the same bits.
template <typename T, typename Epi>
void normalize_periodic(const T* xp, T* yp, int64_t total, int64_t period, const acc_t<T>* mp,
                        const acc_t<T>* kp, const acc_t<T>* bp, const Epi& epi) {
  using V = VecA<T>;
  constexpr int64_t VW = vec_width<acc_t<T>>();
  at::parallel_for(0, (total + VW - 1) / VW, std::max<int64_t>(1, kMinTaskValues / VW), [&](int64_t v0, int64_t v1) {
    int64_t i = v0 * VW, j = i % period;
    auto apply = [=](auto tag, int64_t off, int64_t at) {
      const V z = at::vec::fmadd(ld(tag, xp + off) - V::loadu(mp + at), V::loadu(kp + at), V::loadu(bp + at));
      st(tag, yp + off, epi(tag, off, z));
    };
    for (int64_t v = v0; v < v1; ++v, i += VW) {
      const int64_t n = std::min(VW, total - i);
      n == VW ? apply(Full{}, i, j) : apply(Part{n}, i, j);
      j += VW;
      if (j == period) j = 0;
    }
  });
}

// normalize over dense rows walked flat (tl.period != 0, see kMaxRowsPeriod): the results are the
// same bits as the training forward's.
template <typename T, typename Epi>
void normalize_rows_flat(const T* xp, T* yp, const Tiling& tl, const acc_t<T>* mean, const acc_t<T>* scale,
                         const acc_t<T>* shift, const Epi& epi) {
  using A = acc_t<T>;
  std::vector<A> m(tl.period), k(tl.period), b(tl.period);
  repeat_channels(tl, mean, m.data());
  repeat_channels(tl, scale, k.data());
  repeat_channels(tl, shift, b.data());
  normalize_periodic(xp, yp, tl.L.numel(), tl.period, m.data(), k.data(), b.data(), epi);
}

// normalize over contiguous planes shorter than a vector (see short_flat_planes).
template <typename T, typename Epi>
void normalize_short_planes(const T* xp, T* yp, const Tiling& tl, const acc_t<T>* mean, const acc_t<T>* scale,
                            const acc_t<T>* shift, const Epi& epi) {
  using A = acc_t<T>;
  const int64_t S = tl.L.s, sample = tl.L.c * S, period = short_planes_period<T>(tl);
  auto repeated = [&](const A* per_channel) {
    std::vector<A> out(period);
    for (int64_t c = 0; c < tl.L.c; ++c) std::fill_n(out.begin() + c * S, S, per_channel[c]);
    for (int64_t r = sample; r < period; r += sample) std::copy_n(out.begin(), sample, out.begin() + r);
    return out;
  };
  const std::vector<A> m = repeated(mean), k = repeated(scale), b = repeated(shift);
  normalize_periodic(xp, yp, tl.L.numel(), period, m.data(), k.data(), b.data(), epi);
}

// y = act((x - mean[c]) * scale[c] + shift[c] (+ residual rp, when not null)) with known
// coefficients: one elementwise pass.
template <typename T>
void normalize(const T* xp, const Tiling& tl, const acc_t<T>* mean, const acc_t<T>* scale, const acc_t<T>* shift,
               int64_t act, double slope, const T* rp, T* yp) {
  using A = acc_t<T>;
  with_epilogue(act, slope, rp, [&](const auto& epi) {
    if (planes_in_memory_order(tl)) {
      if (short_flat_planes<T>(tl)) {
        normalize_short_planes(xp, yp, tl, mean, scale, shift, epi);
      } else if (flat_planes<T>(tl)) {
        normalize_flat(xp, yp, tl, mean, scale, shift, epi);
      } else {
        normalize_planes(xp, yp, tl, mean, scale, shift, epi);
      }
      return;
    }
    if (tl.period) {
      normalize_rows_flat(xp, yp, tl, mean, scale, shift, epi);
      return;
    }
    // The tile schedule over rows walked flat or in pairs reads the coefficients arranged.
    const int64_t P = arranged_size<T>(tl);
    std::vector<A> arranged(3 * P);
    const A* m = P ? arranged.data() : mean;
    const A* k = P ? m + P : scale;
    const A* b = P ? k + P : shift;
    if (P) {
      arrange_channels<T>(tl, mean, arranged.data());
      arrange_channels<T>(tl, scale, arranged.data() + P);
      arrange_channels<T>(tl, shift, arranged.data() + 2 * P);
    }
    two_pass(
        tl, sizeof(T), false, true, [](int64_t) {}, [](int64_t, int64_t) {},
        [&](int64_t t) { normalize_tile(xp, yp, tl, t, m, k, b, epi); });
  });
}

}  // namespace bnfused::cpu
